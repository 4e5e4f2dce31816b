//! What goes back to the client: an answer the balancer made itself, or a backend's response
//! streamed frame by frame (memory per request is bounded by hyper's buffers whatever the
//! body's size). `ResponseBody` also carries the request's tail end: the in-flight guard
//! (least-connections and graceful shutdown see the request until its last byte), the pooled
//! connection (returned only when the exchange completed cleanly) and the access-log entry
//! (written when the body ends or the client goes away). A gRPC response whose `grpc-status`
//! comes in its trailers also carries its attempt's verdict: read there, counted, logged, and
//! settled with the breaker (`InFlight::settle`).

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::accesslog::{self, Ending, LogEntry};
use crate::backend::{InFlight, Outcome};
use crate::classify::classify_grpc_status;
use crate::config::BreakerPolicy;
use crate::conn::ConnInfo;
use crate::grpc;
use crate::reason::{ClientEvent, Failure, Reason};
use crate::upstream::{BoxError, UpstreamBody};

/// The response sent to the client: one the balancer made itself, or a backend's, streamed.
pub struct ResponseBody {
    kind: Kind,
    log: Option<Box<LogEntry>>,
}

enum Kind {
    Local(Option<Bytes>),
    Upstream(Box<Upstream>),
    /// Another module's body around one of these (the cache's tee): the inner one keeps its
    /// guard, connection and log entry.
    Wrapped(Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>),
}

struct Upstream {
    inner: UpstreamBody,
    done: bool,
    /// The backend broke the body: how.
    failed: Option<Failure>,
    /// Body bytes hyper took on and came back for more after: written, or queued behind
    /// bytes that were (hyper asks for the next frame once the last one is on its way).
    bytes: u64,
    /// The last data frame handed to hyper, counted once hyper comes back or the body ends:
    /// an h2 stream without window holds it unsent.
    pending: u64,
    guard: InFlight,
    client: Arc<ConnInfo>,
    /// A gRPC response whose `grpc-status` is still to come in the trailers: the pool's
    /// breaker policy, to settle the attempt with when it does.
    grpc: Option<BreakerPolicy>,
}

impl ResponseBody {
    pub fn local(text: &'static str, log: Option<Box<LogEntry>>) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            log,
        }
    }

    /// A stored body (the cache's): cloning `Bytes` is a reference count, not a copy.
    pub fn bytes(body: Option<Bytes>, log: Option<Box<LogEntry>>) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(body),
            log,
        }
    }

    pub fn wrap(body: impl Body<Data = Bytes, Error = BoxError> + Send + 'static) -> ResponseBody {
        ResponseBody {
            kind: Kind::Wrapped(Box::pin(body)),
            log: None,
        }
    }

    /// The access-log entry this body writes when it ends.
    pub fn log_mut(&mut self) -> Option<&mut LogEntry> {
        self.log.as_deref_mut()
    }

    /// Takes the entry out, for an answer that replaces this one (the cache serving its copy
    /// after a backend's 304 or 5xx): dropping the body then writes no line.
    pub fn take_log(&mut self) -> Option<Box<LogEntry>> {
        self.log.take()
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::empty_logged(None)
    }

    /// No body at all (hyper then ends the stream with the headers), and the log entry.
    pub fn empty_logged(log: Option<Box<LogEntry>>) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local(None),
            log,
        }
    }

    /// The backend's gRPC status comes at the end of this body: read it from the trailers,
    /// count and log it, and settle the attempt's verdict with it (`classify_grpc_status`).
    pub fn awaiting_grpc_status(mut self, policy: BreakerPolicy) -> ResponseBody {
        if let Kind::Upstream(up) = &mut self.kind {
            up.grpc = Some(policy);
        }
        self
    }

    pub fn upstream(
        inner: UpstreamBody,
        guard: InFlight,
        log: Option<Box<LogEntry>>,
        client: Arc<ConnInfo>,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Upstream(Box::new(Upstream {
                inner,
                done: false,
                failed: None,
                bytes: 0,
                pending: 0,
                guard,
                client,
                grpc: None,
            })),
            log,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Local(b) => {
                let text = b.take();
                // Counted when hyper takes it: never for HEAD, nor for a client already gone.
                if let (Some(t), Some(l)) = (&text, this.log.as_deref_mut()) {
                    l.bytes = t.len() as u64;
                }
                Poll::Ready(text.map(|b| Ok(Frame::data(b))))
            }
            Kind::Upstream(up) => {
                up.bytes += std::mem::take(&mut up.pending);
                let polled = Pin::new(&mut up.inner).poll_frame(cx);
                crate::stall::note_progress(polled.is_pending());
                let res = ready!(polled);
                match &res {
                    None => up.done = true,
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            up.pending = d.len() as u64;
                        }
                        if let Some(t) = frame.trailers_ref() {
                            if let Some(policy) = up.grpc.take() {
                                let code = grpc::status_in(t).flatten();
                                let log = this.log.as_deref_mut();
                                grpc_status_seen(&mut up.guard, code, &policy, log);
                            }
                        }
                        if up.inner.is_end_stream() {
                            up.done = true;
                        }
                    }
                    Some(Err(e)) => up.failed = Some(e.failure()),
                }
                Poll::Ready(res.map(|r| r.map_err(BoxError::from)))
            }
            Kind::Wrapped(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(b) => b.is_none(),
            Kind::Upstream(up) => up.done || up.inner.is_end_stream(),
            Kind::Wrapped(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Upstream(up) => up.inner.size_hint(),
            Kind::Wrapped(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Kind::Upstream(up) = &mut self.kind {
            let complete = up.done || up.inner.is_end_stream();
            // Ours, not the client's: an h2 stream the watchdog resets, or a connection whose
            // writes stayed blocked past the send timeout.
            let reset = crate::stall::resetting() || up.client.stalled.load(Relaxed);
            match (up.failed, up.grpc.take()) {
                // The verdict was waiting for the end of the body, which broke: that is it.
                (Some(f), Some(policy)) => up.guard.settle(Outcome::Failure(f), &policy),
                (Some(f), None) => up.guard.backend().note_late_failure(f),
                // A gRPC body that ended cleanly without trailers: no status to hold against
                // the backend, and `unknown` in the metric.
                (None, Some(policy)) if complete => {
                    grpc_status_seen(&mut up.guard, None, &policy, None)
                }
                // Cut short (the client left): the guard's drop hands the admission back.
                (None, _) => {}
            }
            if let Some(l) = self.log.as_deref_mut() {
                l.bytes = up.bytes;
                if let Some(f) = up.failed {
                    l.reason = Some(Reason::Failed(f));
                    l.outcome = Ending::UpstreamAborted;
                } else if reset {
                    l.reason = Some(Reason::Client(ClientEvent::ClientStalled));
                    l.outcome = Ending::Reset;
                } else if !complete {
                    l.outcome = Ending::ClientClosed;
                } else {
                    l.bytes += up.pending;
                }
            }
        }
        if let Some(l) = self.log.take() {
            accesslog::write(l);
        }
        // Last: the in-flight guard still counts this request while the connection goes
        // back, so least-connections never sees the backend idle before its socket is.
        if let Kind::Upstream(up) = std::mem::replace(&mut self.kind, Kind::Local(None)) {
            let Upstream {
                inner, done, guard, ..
            } = *up;
            if done || inner.is_end_stream() {
                if let Some(conn) = inner.into_idle() {
                    guard.backend().idle.put(conn);
                }
            }
        }
    }
}

/// The end of a gRPC response: its status counted per backend, logged, and the attempt settled.
fn grpc_status_seen(
    guard: &mut InFlight,
    code: Option<u32>,
    policy: &BreakerPolicy,
    log: Option<&mut LogEntry>,
) {
    guard.backend().note_grpc_status(code);
    let outcome = classify_grpc_status(code);
    if let Some(l) = log {
        l.grpc_status = code;
        // As a trailers-only answer with that status would have been logged.
        if let Outcome::Failure(f) = outcome {
            l.reason = Some(Reason::Failed(f));
        }
    }
    guard.settle(outcome, policy);
}
