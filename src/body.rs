//! The two bodies that cross the proxy: the client's request body on its way to a backend
//! (`UpBody`), and what goes back to the client (`ResponseBody`).
//!
//! Both stream frame by frame, so memory per request is bounded by hyper's buffers whatever
//! the body's size. `ResponseBody` also carries the request's tail end: the in-flight guard
//! (least-connections and graceful shutdown see the request until its last byte), the pooled
//! connection (returned only when the exchange completed cleanly) and the access-log entry
//! (written when the body ends or the client goes away).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::accesslog::{self, LogEntry};
use crate::backend::{InFlight, Reason};
use crate::upstream::Sender;

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

impl BodyError {
    pub fn reason(&self) -> Reason {
        match self {
            BodyError::TooLarge => Reason::BodyTooLarge,
            BodyError::Timeout(_) => Reason::BodyTimeout,
            BodyError::Client(_) => Reason::ClientClosed,
        }
    }
}

/// The request body sent upstream.
pub enum UpBody {
    /// No body, or a replay of a bodiless request.
    Empty,
    Stream(Box<Streaming>),
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
}

impl UpBody {
    pub fn stream(inner: Incoming, remaining: u64, idle: Duration) -> UpBody {
        UpBody::Stream(Box::new(Streaming {
            inner,
            remaining,
            idle,
            timer: None,
            last: Instant::now(),
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream(s) => s.inner.size_hint(),
        }
    }
}

/// The response sent to the client: one the balancer made itself, or a backend's, streamed.
pub struct ResponseBody {
    kind: Kind,
    log: Option<Box<LogEntry>>,
}

enum Kind {
    Local(Option<Bytes>),
    Upstream(Box<Upstream>),
}

struct Upstream {
    inner: Incoming,
    done: bool,
    failed: bool,
    bytes: u64,
    conn: Option<Sender>,
    guard: InFlight,
}

impl ResponseBody {
    pub fn local(text: &'static str, log: Option<Box<LogEntry>>) -> ResponseBody {
        let mut log = log;
        if let Some(l) = log.as_deref_mut() {
            l.bytes = text.len() as u64;
        }
        ResponseBody {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            log,
        }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(None),
            log: None,
        }
    }

    pub fn upstream(
        inner: Incoming,
        conn: Option<Sender>,
        guard: InFlight,
        log: Option<Box<LogEntry>>,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream(Box::new(Upstream {
                inner,
                done: false,
                failed: false,
                bytes: 0,
                conn,
                guard,
            })),
            log,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(up) => {
                let polled = Pin::new(&mut up.inner).poll_frame(cx);
                crate::stall::note_progress(polled.is_pending());
                let res = ready!(polled);
                match &res {
                    None => up.done = true,
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            up.bytes += d.len() as u64;
                        }
                        if up.inner.is_end_stream() {
                            up.done = true;
                        }
                    }
                    Some(Err(_)) => up.failed = true,
                }
                Poll::Ready(res)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(b) => b.is_none(),
            Kind::Upstream(up) => up.done || up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Upstream(up) => up.inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Kind::Upstream(up) = &mut self.kind {
            let complete = up.done || up.inner.is_end_stream();
            if let Some(conn) = up.conn.take() {
                if complete {
                    return_conn(&up.guard, conn);
                }
            }
            if up.failed {
                up.guard.backend().note_late_failure(Reason::UpstreamReset);
            }
            if let Some(l) = self.log.as_deref_mut() {
                l.bytes = up.bytes;
                if up.failed {
                    l.reason = Some(Reason::UpstreamReset);
                    l.outcome = accesslog::Outcome::UpstreamAborted;
                } else if !complete {
                    l.outcome = accesslog::Outcome::ClientClosed;
                }
            }
        }
        if let Some(l) = self.log.take() {
            accesslog::write(l);
        }
    }
}

/// How long a finished connection may take to become ready for the next request before it
/// is given up on (its request body still being written, typically).
const READY_WAIT: Duration = Duration::from_secs(5);

fn return_conn(guard: &InFlight, mut conn: Sender) {
    if conn.is_ready() {
        guard.backend().idle.put(conn);
    } else if !conn.is_closed() {
        // hyper flips the connection back to ready on its own task, a moment after the last
        // body byte; waiting for that is cheaper than a new connection.
        let backend = guard.backend().clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, conn.ready()).await {
                    backend.idle.put(conn);
                }
            });
        }
    }
}
