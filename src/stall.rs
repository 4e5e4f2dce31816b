//! Clients that stop reading: hyper has no write timeout, so without these a client that
//! never reads its response would hold its connection, a backend connection and an in-flight
//! slot forever.
//!
//! - `StallTimeout` wraps a client socket: a write blocked for longer than the limit fails the
//!   connection. Covers HTTP/1.1 and a whole h2 connection that stops reading. It also times
//!   HTTP/1 request heads: hyper's own `header_read_timeout` starts as soon as hyper waits for
//!   the next request, so it would bound idle keep-alive waits too, which are `idle_timeout`'s
//!   (`conns.rs`). Here the clock starts at a head's first byte instead.
//! - `StreamExec` is the executor hyper spawns each h2 stream on: it resets a stream whose
//!   peer keeps the connection alive but never opens the stream's flow-control window. The
//!   response body (`body::ResponseBody`) reports, through `note_progress`, each time hyper
//!   asks it for data and whether it is itself waiting on the backend; a stream that has a
//!   response, is not waiting on its backend, and has not been asked for data within the limit
//!   is dropped, which makes h2 send RST_STREAM.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::clock::now_ms;
use crate::conn::{in_flight, started, ConnInfo, IO_WRITE_BLOCKED};

/// A client socket that gives up on a peer that stalls: one that never sends its first byte
/// (the protocol sniff of hyper-util's auto builder has no timeout), and one that stops
/// reading (hyper has no write timeout, so it would hold the connection, its backend
/// connection and its in-flight slot forever). Both limits are `limit`.
///
/// The timer is allocated once, the first time something waits, and re-armed only when a new
/// wait starts; progress just clears `since`, so a busy connection costs no timer-wheel work.
pub struct StallTimeout<I> {
    inner: I,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current wait began: the connection's start until its first byte arrives, then
    /// the start of each blocked write.
    since: Option<tokio::time::Instant>,
    first_byte_seen: bool,
    /// Mirrors `IO_WRITE_BLOCKED` in `ConnInfo::io_state`, so the shared word is written only
    /// when it changes.
    write_blocked: bool,
    heads: Heads,
}

impl<I> StallTimeout<I> {
    pub fn new(inner: I, limit: Duration, info: Arc<ConnInfo>) -> Self {
        StallTimeout {
            inner,
            limit,
            timer: None,
            since: Some(tokio::time::Instant::now()),
            first_byte_seen: false,
            write_blocked: false,
            heads: Heads {
                info,
                proto: Proto::Sniffing(0),
                head: None,
                since: None,
                timer: None,
            },
        }
    }

    fn waiting(&mut self, cx: &mut Context<'_>, what: &'static str) -> Poll<std::io::Error> {
        let since = *self.since.get_or_insert_with(tokio::time::Instant::now);
        let deadline = since + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if self.first_byte_seen {
                    self.heads.info.stalled.store(true, Relaxed);
                }
                Poll::Ready(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed(&mut self) {
        self.since = None;
    }

    fn write_blocked(&mut self, blocked: bool) {
        if self.write_blocked != blocked {
            self.write_blocked = blocked;
            self.heads.info.set_io(IO_WRITE_BLOCKED, blocked);
        }
    }

    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Pending => {
                self.write_blocked(true);
                self.waiting(cx, "client stopped reading").map(Err)
            }
            other => {
                self.write_blocked(false);
                self.progressed();
                other
            }
        }
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallTimeout<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.first_byte_seen {
            match r {
                Poll::Pending => return this.waiting(cx, "nothing received").map(Err),
                _ => {
                    this.first_byte_seen = true;
                    this.progressed();
                }
            }
        }
        match r {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    this.heads.received(got);
                }
                r
            }
            Poll::Pending => match this.heads.waiting(cx, this.limit) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
            Poll::Ready(Err(_)) => r,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum Proto {
    /// This many bytes of the connection so far match the h2 preface.
    Sniffing(usize),
    Http1,
    /// HTTP/2: its frames are not request heads (an idle h2 connection is `idle_timeout`'s).
    Http2,
}

/// Request-head timing for HTTP/1. A head starts with the first byte received while no
/// request is in flight (`ConnInfo::activity`), and ends when hyper hands the request over
/// (the started count moves). No clock is read unless the client pauses mid-head: the wait
/// starts when a read of an unfinished head finds nothing, microseconds after its first byte.
struct Heads {
    info: Arc<ConnInfo>,
    proto: Proto,
    /// The started count when the current head began; `None`: no head in progress.
    head: Option<u32>,
    /// When the client first paused in the current head.
    since: Option<tokio::time::Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Heads {
    fn received(&mut self, got: &[u8]) {
        if let Proto::Sniffing(n) = self.proto {
            let k = got.len().min(H2_PREFACE.len() - n);
            self.proto = if got[..k] != H2_PREFACE[n..n + k] {
                Proto::Http1
            } else if n + k == H2_PREFACE.len() {
                self.end();
                Proto::Http2
            } else {
                Proto::Sniffing(n + k)
            };
        }
        if let Proto::Http2 = self.proto {
            return;
        }
        let a = self.info.activity.load(Relaxed);
        if self.head == Some(started(a)) && in_flight(a) == 0 {
            // More of the same head.
            return;
        }
        self.end();
        // Bytes that arrive while a request is in flight are its body or a pipelined head that
        // hyper buffers; a tunnel's bytes are not HTTP at all.
        if in_flight(a) == 0 && !self.info.upgraded.load(Relaxed) {
            self.head = Some(started(a));
        }
    }

    /// The read found nothing: an error once the current head has been waited on for `limit`.
    fn waiting(&mut self, cx: &mut Context<'_>, limit: Duration) -> Option<std::io::Error> {
        let head = self.head?;
        let a = self.info.activity.load(Relaxed);
        if started(a) != head || in_flight(a) != 0 || self.info.upgraded.load(Relaxed) {
            // hyper took the head: it was complete.
            self.end();
            return None;
        }
        let since = *self.since.get_or_insert_with(|| {
            self.info.head_pending.store(true, Relaxed);
            tokio::time::Instant::now()
        });
        let deadline = since + limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head not received within header_timeout",
            )),
            Poll::Pending => None,
        }
    }

    fn end(&mut self) {
        self.head = None;
        self.timer = None;
        if self.since.take().is_some() {
            self.info.head_pending.store(false, Relaxed);
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallTimeout<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.written(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

thread_local! {
    /// The progress cell of the h2 stream being polled on this thread, if any.
    static CURRENT: RefCell<Option<Arc<AtomicU64>>> = const { RefCell::new(None) };
    /// True while a stalled h2 stream is being dropped, so its response body can log that
    /// the balancer reset it.
    static RESETTING: Cell<bool> = const { Cell::new(false) };
}

/// Whether the response body being dropped belongs to an h2 stream the watchdog is resetting.
pub fn resetting() -> bool {
    RESETTING.with(|r| r.get())
}

/// Bit 0 of a progress cell: the body is waiting on its backend, not on the client.
const WAITING_ON_BACKEND: u64 = 1;

/// Called by the response body each time hyper polls it (h2 streams only; a no-op elsewhere).
pub fn note_progress(waiting_on_backend: bool) {
    CURRENT.with(|c| {
        if let Some(cell) = c.borrow().as_ref() {
            cell.store(
                (now_ms().max(1) << 1) | u64::from(waiting_on_backend),
                Relaxed,
            );
        }
    });
}

/// hyper's executor for h2 streams: every stream runs under a stall watchdog.
#[derive(Clone)]
pub struct StreamExec {
    pub limit: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            inner: Some(Box::pin(fut)),
            progress: Some(Arc::new(AtomicU64::new(0))),
            timer: None,
            limit: self.limit,
        });
    }
}

struct Watched<F> {
    /// Taken out and dropped here when the stream is reset, to mark the drop as ours.
    inner: Option<Pin<Box<F>>>,
    /// 0 until the response body is first polled; then (ms << 1) | WAITING_ON_BACKEND.
    progress: Option<Arc<AtomicU64>>,
    timer: Option<Pin<Box<Sleep>>>,
    limit: Duration,
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(());
        };
        // Lend the cell to this thread for the duration of the poll, without cloning the Arc.
        let lent = CURRENT.with(|c| c.replace(this.progress.take()));
        let r = inner.as_mut().poll(cx);
        this.progress = CURRENT.with(|c| c.replace(lent));
        if r.is_ready() {
            return Poll::Ready(());
        }
        let p = this.progress.as_ref().map(|c| c.load(Relaxed)).unwrap_or(0);
        if p == 0 || p & WAITING_ON_BACKEND != 0 {
            // No response yet (the response timeout covers that), or the backend is the slow
            // side: nothing to hold against the client.
            this.timer = None;
            return Poll::Pending;
        }
        let limit_ms = this.limit.as_millis() as u64;
        let last = p >> 1;
        let now = now_ms();
        if now.saturating_sub(last) >= limit_ms {
            tracing::debug!(
                "h2 stream reset: peer did not open its window for {:?}",
                this.limit
            );
            RESETTING.with(|r| r.set(true));
            this.inner = None;
            RESETTING.with(|r| r.set(false));
            return Poll::Ready(());
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(limit_ms.saturating_sub(now.saturating_sub(last)));
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        // Registers the waker; if it fires, the next poll re-checks progress.
        let _ = timer.as_mut().poll(cx);
        Poll::Pending
    }
}
