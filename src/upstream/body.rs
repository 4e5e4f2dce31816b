//! A backend's response body, whichever protocol carried it: hyper's `Incoming` for
//! HTTP/1.1, the h2 stream itself for HTTP/2 (driven here directly, without hyper's client
//! layer: see `http2.rs`).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pipe::PipeTask;
use crate::reason::Failure;

pub enum UpstreamBody {
    H1(Incoming),
    H2(H2Body),
}

/// How a backend's body broke.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error(transparent)]
    H1(hyper::Error),
    #[error(transparent)]
    H2(h2::Error),
}

impl UpstreamBodyError {
    /// Bytes that are not HTTP (a bad chunk) are a protocol error; a body that stopped short
    /// (EOF, reset) is a reset.
    pub fn failure(&self) -> Failure {
        match self {
            UpstreamBodyError::H1(e) => h1_failure(e),
            UpstreamBodyError::H2(_) => Failure::UpstreamReset,
        }
    }
}

fn h1_failure(e: &hyper::Error) -> Failure {
    use std::error::Error as _;
    if e.is_parse() {
        return Failure::UpstreamProtocol;
    }
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return Failure::UpstreamProtocol;
            }
        }
        src = s.source();
    }
    Failure::UpstreamReset
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
}

impl H2Body {
    pub fn new(recv: h2::RecvStream, headers: &HeaderMap, pipe: Option<PipeTask>) -> H2Body {
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
