//! The store step of a miss: the backend's body streams to the client frame by frame, and a
//! copy is kept on the side until it ends, then stored. The copy is abandoned (and the flight
//! ended, so waiters go to the backend themselves) as soon as it passes `max_object_size`,
//! the body fails, trailers arrive, or the client goes away; the client's stream is never
//! held back or buffered for it.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::Commit;
use crate::response_body::ResponseBody;
use crate::upstream::BoxError;

pub struct Tee {
    inner: ResponseBody,
    copy: Vec<u8>,
    limit: usize,
    commit: Option<Commit>,
}

impl Tee {
    pub(super) fn new(
        inner: ResponseBody,
        limit: u64,
        expected: Option<u64>,
        commit: Commit,
    ) -> Tee {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let want = expected.map_or(0, |n| usize::try_from(n).unwrap_or(0).min(limit));
        Tee {
            inner,
            copy: Vec::with_capacity(want),
            limit,
            commit: Some(commit),
        }
    }

    fn finish(&mut self) {
        if let Some(c) = self.commit.take() {
            let mut body = std::mem::take(&mut self.copy);
            // Stored at its exact size: the weight counts what is really held.
            body.shrink_to_fit();
            c.store(Bytes::from(body));
        }
    }

    fn abandon(&mut self) {
        self.commit = None;
        self.copy = Vec::new();
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let res = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &res {
            None => this.finish(),
            Some(Ok(frame)) => {
                if this.commit.is_some() {
                    match frame.data_ref() {
                        Some(d) if this.copy.len() + d.len() <= this.limit => {
                            this.copy.extend_from_slice(d)
                        }
                        // Too large, or trailers (which a stored copy could not replay).
                        _ => this.abandon(),
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Some(Err(_)) => this.abandon(),
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // An empty body is never polled: hyper sees its end from `is_end_stream` alone.
        if self.commit.is_some() && self.inner.is_end_stream() {
            self.finish();
        }
    }
}
