//! The client's request body on its way to a backend.
//!
//! Streamed frame by frame (memory per request does not grow with the body), with the two
//! limits hyper does not enforce for a proxy: `limits.max_body_bytes` and a pause in the
//! middle of the body longer than `limits.header_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::VecDeque;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Why the client's request body could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds limits.max_body_bytes")]
    TooLarge,
    #[error("client sent no body data for {0:?}")]
    Timeout(Duration),
    #[error("client request body failed: {0}")]
    Client(#[source] hyper::Error),
}

/// What went wrong with a client's body, as the request path decides on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Over `limits.max_body_bytes`: 413.
    TooLarge,
    /// Paused longer than `limits.header_timeout`: 408.
    Stalled,
    /// hyper's decoder refused it (a bad or overflowing chunk size): 400.
    Malformed,
    /// The client went away (EOF or reset mid-body).
    Gone,
}

impl BodyError {
    pub fn fault(&self) -> BodyFault {
        match self {
            BodyError::TooLarge => BodyFault::TooLarge,
            BodyError::Timeout(_) => BodyFault::Stalled,
            BodyError::Client(e) if is_malformed(e) => BodyFault::Malformed,
            BodyError::Client(_) => BodyFault::Gone,
        }
    }
}

/// A client body hyper's decoder refused: a malformed request, not a client that went away
/// (an early EOF or a reset).
fn is_malformed(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind::{InvalidData, InvalidInput};
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), InvalidData | InvalidInput);
        }
        src = s.source();
    }
    false
}

/// The request body sent upstream.
pub enum UpBody {
    /// No body, or a replay of a bodiless request.
    Empty,
    Stream(Box<Streaming>),
    /// A body sent again after an HTTP/2 backend refused it unprocessed (`replay.rs`): what
    /// was already sent, then the rest.
    Replayed(Box<Replayed>),
}

pub struct Replayed {
    /// Data frames sent on the refused attempt, in order.
    pub sent: VecDeque<Bytes>,
    /// The client's body from where the refused attempt stopped reading it.
    pub rest: Option<UpBody>,
    /// The client's trailers, if the refused attempt had already read them.
    pub trailers: Option<HeaderMap>,
}

pub struct Streaming {
    inner: Incoming,
    /// Bytes still allowed by `limits.max_body_bytes`; `u64::MAX` when unlimited.
    remaining: u64,
    /// hyper has no body read timeout: a client that stops sending mid-body would hold a
    /// backend connection forever. The timer is created the first time a read waits and only
    /// re-armed when it fires early: a frame just records when it came (`last`), so a body of
    /// many frames costs no timer-wheel update per frame.
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    last: Instant,
    /// Data bytes read from the client so far, for the access log's `bytes_received` (shared
    /// because the body travels into the upstream client while the log entry stays behind).
    received: Option<Arc<AtomicU64>>,
}

impl UpBody {
    pub fn stream(
        inner: Incoming,
        remaining: u64,
        idle: Duration,
        received: Option<Arc<AtomicU64>>,
    ) -> UpBody {
        UpBody::Stream(Box::new(Streaming {
            inner,
            remaining,
            idle,
            timer: None,
            last: Instant::now(),
            received,
        }))
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let s = match self.get_mut() {
            UpBody::Empty => return Poll::Ready(None),
            UpBody::Stream(s) => &mut **s,
            UpBody::Replayed(r) => {
                if let Some(d) = r.sent.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if let Some(rest) = r.rest.as_mut() {
                    match Pin::new(rest).poll_frame(cx) {
                        Poll::Ready(None) => r.rest = None,
                        other => return other,
                    }
                }
                return Poll::Ready(r.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
        };
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Pending => {
                let deadline = s.last + s.idle;
                let timer = s
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                loop {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if Instant::now() >= deadline {
                        return Poll::Ready(Some(Err(BodyError::Timeout(s.idle))));
                    }
                    // Fired for an older deadline: data came since. Wait for the current one.
                    timer.as_mut().reset(deadline);
                }
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                s.last = Instant::now();
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    // Read, whether or not it is forwarded.
                    if let Some(r) = &s.received {
                        r.fetch_add(n, Relaxed);
                    }
                    if n > s.remaining {
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                    if s.remaining != u64::MAX {
                        s.remaining -= n;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Stream(s) => s.inner.is_end_stream(),
            UpBody::Replayed(r) => {
                r.sent.is_empty()
                    && r.trailers.is_none()
                    && r.rest.as_ref().is_none_or(UpBody::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream(s) => s.inner.size_hint(),
            UpBody::Replayed(r) => {
                let sent: u64 = r.sent.iter().map(|b| b.len() as u64).sum();
                let rest = r
                    .rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), UpBody::size_hint);
                let mut h = SizeHint::new();
                h.set_lower(rest.lower() + sent);
                if let Some(u) = rest.upper() {
                    h.set_upper(u + sent);
                }
                h
            }
        }
    }
}
