//! A backend's response body, whichever protocol carried it: the HTTP/1.1 exchange itself
//! (`http1.rs`), the h2 stream for HTTP/2 (`http2.rs`). Either holds its connection: the h1
//! socket, given back to the pool when the body ended cleanly (`into_idle`), or the h2
//! stream's slot, freed when the body is dropped.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use super::http1::{Exchange, H1Error};
use super::pipe::PipeTask;
use crate::h2pool::Stream;
use crate::idle::Conn;
use crate::reason::Failure;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

pub enum UpstreamBody {
    H1(Exchange),
    H2(H2Body),
}

impl UpstreamBody {
    /// The HTTP/1.1 connection, if this body ended cleanly and it can carry another request.
    pub fn into_idle(self) -> Option<Conn> {
        match self {
            UpstreamBody::H1(x) => x.into_idle(),
            UpstreamBody::H2(_) => None,
        }
    }
}

/// How a backend's body broke.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    H1(H1Error),
    #[error(transparent)]
    H2(h2::Error),
}

impl UpstreamBodyError {
    /// Bytes that are not HTTP (a bad chunk) are a protocol error; a body that stopped short
    /// (EOF, reset) is a reset.
    pub fn failure(&self) -> Failure {
        match self {
            UpstreamBodyError::H1(e) => e.failure(),
            UpstreamBodyError::H2(_) => Failure::UpstreamReset,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(UpstreamBodyError::H1),
            UpstreamBody::H2(b) => b.poll_frame(cx).map_err(UpstreamBodyError::H2),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b
                .length
                .map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

/// An h2 response stream as a body: data frames (their flow-control window handed back as
/// each is passed on, as hyper does), then the trailers.
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    /// The response's `Content-Length`, for the size hint.
    length: Option<u64>,
    /// The request body still being sent: stopped when the response ends or is dropped, since
    /// the stream is then over (a held send half would keep it open).
    _pipe: Option<PipeTask>,
    /// The stream's slot on its connection, freed when the body is dropped.
    _stream: Stream,
}

impl H2Body {
    pub fn new(
        recv: h2::RecvStream,
        headers: &HeaderMap,
        pipe: Option<PipeTask>,
        stream: Stream,
    ) -> H2Body {
        let mut all = headers.get_all(http::header::CONTENT_LENGTH).iter();
        let length = match (all.next(), all.next()) {
            (Some(v), None) => v.to_str().ok().and_then(|s| s.parse().ok()),
            _ => None,
        };
        H2Body {
            recv,
            data_done: false,
            length,
            _pipe: pipe,
            _stream: stream,
        }
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The stream's window reopens as the bytes move on to the client; what the
                    // client has not taken yet is bounded by the downstream side's own window.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}
