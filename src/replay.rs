//! A request body that can be sent a second time when an HTTP/2 backend says it did not
//! process the stream (REFUSED_STREAM, or a stream above a GOAWAY's last-stream-id; RFC 9113
//! §8.7, §6.8), whatever the method.
//!
//! hyper consumes the body on its own task as soon as the stream opens, so by the time the
//! refusal arrives some frames may be gone. `ReplayBody` keeps a copy of what it hands to
//! hyper, up to `REPLAY_LIMIT` bytes, until the backend's response headers arrive
//! (`commit`); when hyper drops the body of a refused stream, the copy and the rest of the
//! client's body come back through a oneshot channel to the request path, which builds the
//! next attempt from them. A body that outgrew the limit before the answer cannot be sent
//! again: it comes back as nothing, and the refusal is an ordinary failure.
//!
//! Linkerd's `ReplayBody` does the same job with a mutex shared by clones; here the body has
//! one owner at a time and is handed over by channel, so nothing locks.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::request_body::{BodyError, Replayed, UpBody};

/// Body bytes kept for a resend; a larger body sent before the answer is not resent (as in
/// linkerd and Envoy, whose retry buffers are of this order).
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub struct ReplayBody {
    /// The client's body (possibly itself a replay), read on.
    inner: Option<UpBody>,
    /// Copies of the data handed to hyper in this attempt.
    kept: VecDeque<Bytes>,
    kept_bytes: usize,
    /// Trailers handed to hyper in this attempt.
    trailers: Option<HeaderMap>,
    /// Kept data outgrew `REPLAY_LIMIT`, or the attempt was committed: this body cannot be
    /// sent again.
    spent: bool,
    /// The response headers arrived: stop keeping.
    committed: Arc<AtomicBool>,
    back: Option<oneshot::Sender<UpBody>>,
}

/// The request path's side: commits the attempt, or takes the body back after a refusal.
pub struct Rewind {
    committed: Arc<AtomicBool>,
    rx: oneshot::Receiver<UpBody>,
}

impl Rewind {
    /// The backend answered: the body need not be kept any more.
    pub fn commit(&self) {
        self.committed.store(true, Relaxed);
    }

    /// The body as it must be sent again, once hyper dropped it; `None` when it cannot be.
    pub async fn take(self) -> Option<UpBody> {
        self.rx.await.ok()
    }
}

impl ReplayBody {
    /// Wraps the client's body for one attempt; the `Rewind` gets it back.
    pub fn new(body: UpBody) -> (ReplayBody, Rewind) {
        let (tx, rx) = oneshot::channel();
        let committed = Arc::new(AtomicBool::new(false));
        let b = ReplayBody {
            inner: Some(body),
            kept: VecDeque::new(),
            kept_bytes: 0,
            trailers: None,
            spent: false,
            committed: Arc::clone(&committed),
            back: Some(tx),
        };
        (b, Rewind { committed, rx })
    }

    fn keep(&mut self, data: &Bytes) {
        if self.spent {
            return;
        }
        self.kept_bytes += data.len();
        if self.kept_bytes > REPLAY_LIMIT || self.committed.load(Relaxed) {
            self.spent = true;
            self.kept = VecDeque::new();
        } else {
            self.kept.push_back(data.clone());
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) => {
                this.inner = None;
                return Poll::Ready(None);
            }
            other => return other,
        };
        if let Some(d) = frame.data_ref() {
            let d = d.clone();
            this.keep(&d);
        } else if let Some(t) = frame.trailers_ref() {
            if !this.spent {
                this.trailers = Some(t.clone());
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(UpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), UpBody::size_hint)
    }
}

impl ReplayBody {
    /// The body to send next: what this attempt sent, then the rest.
    fn rewound(&mut self) -> UpBody {
        if self.kept.is_empty() && self.trailers.is_none() {
            self.inner.take().unwrap_or(UpBody::Empty)
        } else {
            UpBody::Replayed(Box::new(Replayed {
                sent: std::mem::take(&mut self.kept),
                rest: self.inner.take(),
                trailers: self.trailers.take(),
            }))
        }
    }

    /// The body back from a request hyper returned unsent.
    pub fn into_inner(mut self) -> UpBody {
        self.back = None;
        self.rewound()
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        let Some(back) = self.back.take() else {
            return;
        };
        if self.spent || self.committed.load(Relaxed) {
            return;
        }
        let body = self.rewound();
        let _ = back.send(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn replayed(parts: &[&'static str]) -> UpBody {
        UpBody::Replayed(Box::new(Replayed {
            sent: parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
            rest: None,
            trailers: None,
        }))
    }

    #[tokio::test]
    async fn a_dropped_body_comes_back_whole_and_in_order() {
        let (mut b, rewind) = ReplayBody::new(replayed(&["ab", "cd"]));
        let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "ab");
        drop(b);
        let again = rewind.take().await.expect("rewound");
        let (again, _) = ReplayBody::new(again);
        let all = again.collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcd");
    }

    #[tokio::test]
    async fn a_committed_or_oversized_body_does_not_come_back() {
        let (b, rewind) = ReplayBody::new(UpBody::Empty);
        rewind.commit();
        drop(b);
        assert!(rewind.take().await.is_none());

        let big = vec!["x"; REPLAY_LIMIT + 1];
        let (b, rewind) = ReplayBody::new(replayed(&big));
        let _ = b.collect().await;
        assert!(rewind.take().await.is_none());
    }
}
