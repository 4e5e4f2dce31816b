//! Multiplexed HTTP/2 connections to one backend (`protocol = "h2c" | "h2"`).
//!
//! Each `Backend` owns one `H2Conns`, so its connections survive a reload with the backend.
//! Requests share a connection up to the backend's SETTINGS_MAX_CONCURRENT_STREAMS; a new one
//! is dialled only when every connection is saturated (one dial at a time: the requests that
//! wait for it share its outcome, so a burst of 64 requests opens one connection, not 64),
//! and never more than `MAX_CONNS_PER_BACKEND`, beyond which hyper queues streams on the
//! least-loaded connection until one frees.
//!
//! Who touches what: the request path reserves a stream slot (`reserve`, a CAS on the
//! connection's `active` count; the slot is released by `Stream`'s drop when the response body
//! ends), and adds a dialled connection; the control task's reaper removes connections idle
//! past `timeouts.idle`, closed, draining after a GOAWAY, or of another transport (a reload
//! that changed the pool's protocol or TLS) once their last stream is done. The list is an
//! `ArcSwap` updated by read-copy-update: nothing here locks, and nothing awaits while
//! holding anything but its own `Arc`s.
//!
//! Draining: `H2Io` watches the frames for a GOAWAY and flags the connection at once, before
//! hyper has even parsed it, so no new stream is put on a connection the backend is leaving;
//! streams h2 still opens there are refused on the spot (see `H2Io`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::client::conn::http2;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::reason::Failure;
use crate::replay::ReplayBody;

/// A multiplexed connection's request handle, as hyper's client gives it.
pub type H2Sender = http2::SendRequest<ReplayBody>;

/// Connections dialled per backend before streams queue on existing ones instead.
const MAX_CONNS_PER_BACKEND: usize = 8;

/// One HTTP/2 connection and what the pool knows about it.
pub struct H2Conn {
    tx: H2Sender,
    /// The pool's transport id when this connection was dialled (see `idle.rs`).
    transport: u64,
    /// Streams reserved on it (requests in flight, response bodies still streaming).
    active: AtomicUsize,
    /// The backend's SETTINGS_MAX_CONCURRENT_STREAMS as hyper last saw it (the connection
    /// task publishes it after every poll: hyper only tells it to the connection's owner).
    max_streams: Arc<AtomicUsize>,
    /// Set when a GOAWAY arrived: no new stream goes here.
    draining: Arc<AtomicBool>,
    /// When the last stream ended (ms, `clock::now_ms`), for the idle reaper.
    idle_since_ms: AtomicU64,
}

impl H2Conn {
    pub fn new(
        tx: H2Sender,
        transport: u64,
        max_streams: Arc<AtomicUsize>,
        draining: Arc<AtomicBool>,
    ) -> H2Conn {
        H2Conn {
            tx,
            transport,
            active: AtomicUsize::new(0),
            max_streams,
            draining,
            idle_since_ms: AtomicU64::new(now_ms()),
        }
    }

    fn usable(&self, transport: u64) -> bool {
        self.transport == transport && !self.draining.load(Relaxed) && !self.tx.is_closed()
    }

    /// Takes a stream slot if the backend allows one more concurrent stream.
    fn try_reserve(self: &Arc<Self>) -> Option<Stream> {
        let max = self.max_streams.load(Relaxed).max(1);
        self.active
            .fetch_update(Relaxed, Relaxed, |a| (a < max).then_some(a + 1))
            .ok()?;
        Some(Stream {
            conn: Arc::clone(self),
        })
    }

    /// Takes a slot whatever the backend's limit: hyper queues the stream until one frees.
    fn reserve_anyway(self: &Arc<Self>) -> Stream {
        self.active.fetch_add(1, Relaxed);
        Stream {
            conn: Arc::clone(self),
        }
    }

    /// Whether a GOAWAY arrived on this connection.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
}

/// One reserved stream on a connection; the slot frees when it drops (the response body
/// ended, or the attempt failed).
pub struct Stream {
    conn: Arc<H2Conn>,
}

impl Stream {
    /// A handle to send this stream's request on (hyper's handles are cheap clones of one
    /// channel to the connection task).
    pub fn sender(&self) -> H2Sender {
        self.conn.tx.clone()
    }

    pub fn conn(&self) -> &H2Conn {
        &self.conn
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Relaxed) == 1 {
            self.conn.idle_since_ms.store(now_ms(), Relaxed);
        }
    }
}

/// The outcome of the last dial, shared with the requests that waited for it.
const DIAL_OK: usize = 0;

pub struct H2Conns {
    conns: ArcSwap<Vec<Arc<H2Conn>>>,
    /// A dial is under way: other requests wait for it rather than dialling too.
    dialing: AtomicBool,
    /// Bumped when a dial ends; with `dial_failure`, tells a waiter how the dial it waited
    /// for went.
    dial_gen: AtomicU64,
    /// `DIAL_OK`, or the failed dial's `Failure::index() + 1`.
    dial_failure: AtomicUsize,
    dialled: Notify,
}

impl Default for H2Conns {
    fn default() -> Self {
        H2Conns {
            conns: ArcSwap::from_pointee(Vec::new()),
            dialing: AtomicBool::new(false),
            dial_gen: AtomicU64::new(0),
            dial_failure: AtomicUsize::new(DIAL_OK),
            dialled: Notify::new(),
        }
    }
}

impl std::fmt::Debug for H2Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "H2Conns({})", self.conns.load().len())
    }
}

/// What `H2Conns::acquire` decided.
pub enum Acquired {
    /// A slot on an existing connection.
    Stream(Stream),
    /// No connection has room: the caller dials, then calls `DialTurn::finish` with the result
    /// (dropping the turn unfinished hands it back, so a client that leaves mid-dial does not
    /// leave the backend without a dialler).
    Dial(DialTurn),
    /// The dial this request waited for failed, or took longer than the request may wait.
    DialFailed(Failure),
}

/// The right (and duty) to dial the next connection for this backend.
pub struct DialTurn {
    conns: Option<Arc<H2Conns>>,
}

impl DialTurn {
    /// Adds the new connection (when the dial worked) and wakes the requests waiting for it.
    /// Returns a slot on it for the dialler.
    pub fn finish(mut self, result: Result<H2Conn, Failure>) -> Option<Stream> {
        let conns = self.conns.take()?;
        conns.end_dial(result)
    }
}

impl Drop for DialTurn {
    fn drop(&mut self) {
        // The dialler went away mid-dial (its client left): let another request dial.
        if let Some(conns) = self.conns.take() {
            conns.dialing.store(false, Relaxed);
            conns.dialled.notify_waiters();
        }
    }
}

impl H2Conns {
    /// A stream slot on a connection speaking `transport` with room for one more stream;
    /// else the turn to dial, or (while another request dials) waits up to `wait` for that
    /// dial and tries again.
    pub async fn acquire(self: &Arc<Self>, transport: u64, wait: Duration) -> Acquired {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(s) = self.reserve(transport) {
                return Acquired::Stream(s);
            }
            let live = self.live(transport);
            if live >= MAX_CONNS_PER_BACKEND {
                if let Some(s) = self.least_loaded(transport) {
                    return Acquired::Stream(s);
                }
            }
            // Registered before the check, so a dial ending in between still wakes us.
            let woken = self.dialled.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let gen = self.dial_gen.load(Relaxed);
            if self
                .dialing
                .compare_exchange(false, true, Relaxed, Relaxed)
                .is_ok()
            {
                return Acquired::Dial(DialTurn {
                    conns: Some(Arc::clone(self)),
                });
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                // The dial we waited for took the whole connect timeout.
                return Acquired::DialFailed(Failure::ConnectTimeout);
            }
            if self.dial_gen.load(std::sync::atomic::Ordering::Acquire) != gen {
                let f = self.dial_failure.load(Relaxed);
                if let Some(failure) = f.checked_sub(1).and_then(Failure::from_index) {
                    return Acquired::DialFailed(failure);
                }
            }
        }
    }

    fn end_dial(&self, result: Result<H2Conn, Failure>) -> Option<Stream> {
        let slot = match result {
            Ok(conn) => {
                let conn = Arc::new(conn);
                let slot = conn.reserve_anyway();
                self.conns.rcu(|list| {
                    let mut next: Vec<Arc<H2Conn>> = Vec::with_capacity(list.len() + 1);
                    next.extend(list.iter().filter(|c| !c.tx.is_closed()).cloned());
                    next.push(Arc::clone(&conn));
                    next
                });
                self.dial_failure.store(DIAL_OK, Relaxed);
                Some(slot)
            }
            Err(failure) => {
                self.dial_failure.store(failure.index() + 1, Relaxed);
                None
            }
        };
        // Release: a waiter that sees the new generation sees the outcome stored above.
        self.dial_gen
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.dialing.store(false, Relaxed);
        self.dialled.notify_waiters();
        slot
    }

    /// A slot on the oldest usable connection with room (first fit packs streams onto few
    /// connections, leaving the others idle for the reaper; no allocation on this path).
    fn reserve(&self, transport: u64) -> Option<Stream> {
        self.conns
            .load()
            .iter()
            .filter(|c| c.usable(transport))
            .find_map(|c| c.try_reserve())
    }

    fn least_loaded(&self, transport: u64) -> Option<Stream> {
        let list = self.conns.load();
        list.iter()
            .filter(|c| c.usable(transport))
            .min_by_key(|c| c.active.load(Relaxed))
            .map(|c| c.reserve_anyway())
    }

    fn live(&self, transport: u64) -> usize {
        self.conns
            .load()
            .iter()
            .filter(|c| c.usable(transport))
            .count()
    }

    /// Connections open (any transport, draining ones included), for tests and `/status`.
    pub fn len(&self) -> usize {
        self.conns
            .load()
            .iter()
            .filter(|c| !c.tx.is_closed())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes (by dropping the pool's handle; hyper then ends the connection with a GOAWAY
    /// of its own once no stream is left) every connection without a stream that is idle for
    /// `idle` or more, draining, closed, or speaking another transport than `transport`.
    pub fn reap(&self, transport: u64, idle: Duration) {
        let now = now_ms();
        let idle_ms = idle.as_millis() as u64;
        let keep = |c: &Arc<H2Conn>| {
            if c.tx.is_closed() {
                return false;
            }
            if c.active.load(Relaxed) > 0 {
                return true;
            }
            c.usable(transport) && now.saturating_sub(c.idle_since_ms.load(Relaxed)) < idle_ms
        };
        if self.conns.load().iter().all(keep) {
            return;
        }
        self.conns
            .rcu(|list| list.iter().filter(|c| keep(c)).cloned().collect::<Vec<_>>());
    }

    /// Forgets every connection (the backend left the config); streams in flight finish.
    pub fn clear(&self) {
        self.conns.store(Arc::new(Vec::new()));
    }
}

// ------------------------------------------------------------------------------------------

/// The I/O of an h2 connection, watched at frame level in both directions (only the 9-byte
/// frame headers and a GOAWAY's last-stream-id are read; payloads are skipped).
///
/// A GOAWAY from the backend flags the connection draining at once. And because h2 goes on
/// opening streams that were queued before it saw the GOAWAY, with ids above the
/// last-stream-id, which the backend ignores (RFC 9113 §6.8), every such stream written after
/// the GOAWAY is answered here with a RST_STREAM(REFUSED_STREAM) from the backend's side of
/// the stream: the truth (the backend will not process it), told at once instead of as a
/// connection error when the backend closes, so the request is sent again on another
/// connection instead of failing.
pub struct H2Io<T> {
    inner: T,
    read: Frames,
    write: Frames,
    /// Client connection preface bytes still to be written (they are not a frame).
    preface_left: usize,
    /// The lowest last-stream-id of the GOAWAYs received.
    goaway_last: Option<u32>,
    /// Streams written above `goaway_last` after it arrived, to refuse; and the highest one
    /// queued (trailers are HEADERS too, and a stream is refused once).
    refuse: VecDeque<u32>,
    refused_up_to: u32,
    draining: Arc<AtomicBool>,
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;
const PREFACE_LEN: usize = 24;
const RST_LEN: usize = 13;

/// What `Frames::feed` found.
enum Seen {
    Headers(u32),
    Goaway(u32),
}

/// Frame boundaries over one direction of an h2 byte stream.
#[derive(Default)]
struct Frames {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// A GOAWAY's last-stream-id being collected: bytes and how many.
    goaway: Option<([u8; 4], usize)>,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    fn feed(&mut self, mut bytes: &[u8], seen: &mut impl FnMut(Seen)) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                if let Some((buf, got)) = &mut self.goaway {
                    let take = (4 - *got).min(n);
                    buf[*got..*got + take].copy_from_slice(&bytes[..take]);
                    *got += take;
                    if *got == 4 {
                        seen(Seen::Goaway(u32::from_be_bytes(*buf) & 0x7fff_ffff));
                        self.goaway = None;
                    }
                }
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let h = self.head;
            self.left = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            match h[3] {
                FRAME_HEADERS => seen(Seen::Headers(id)),
                FRAME_GOAWAY if self.left >= 8 => self.goaway = Some(([0; 4], 0)),
                _ => {}
            }
        }
    }
}

impl<T> H2Io<T> {
    pub fn new(inner: T, draining: Arc<AtomicBool>) -> H2Io<T> {
        H2Io {
            inner,
            read: Frames::default(),
            write: Frames::default(),
            preface_left: PREFACE_LEN,
            goaway_last: None,
            refuse: VecDeque::new(),
            refused_up_to: 0,
            draining,
        }
    }

    fn wrote(&mut self, mut bytes: &[u8], cx: &Context<'_>) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(bytes.len());
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        let (last, refuse, up_to) = (self.goaway_last, &mut self.refuse, &mut self.refused_up_to);
        self.write.feed(bytes, &mut |seen| {
            if let (Seen::Headers(id), Some(last)) = (seen, last) {
                if id > last && id > *up_to {
                    refuse.push_back(id);
                    *up_to = id;
                }
            }
        });
        if !self.refuse.is_empty() {
            // h2 reads after it writes, but make sure the refusal is read soon.
            cx.waker().wake_by_ref();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H2Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.at_boundary() && !this.refuse.is_empty() && buf.remaining() >= RST_LEN {
            while buf.remaining() >= RST_LEN {
                let Some(id) = this.refuse.pop_front() else {
                    break;
                };
                let mut frame = [0u8; RST_LEN];
                frame[2] = 4;
                frame[3] = FRAME_RST_STREAM;
                frame[5..9].copy_from_slice(&id.to_be_bytes());
                frame[9..13].copy_from_slice(&REFUSED_STREAM.to_be_bytes());
                buf.put_slice(&frame);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let (last, draining) = (&mut this.goaway_last, &this.draining);
            this.read.feed(&buf.filled()[before..], &mut |seen| {
                if let Seen::Goaway(id) = seen {
                    draining.store(true, Relaxed);
                    *last = Some(last.map_or(id, |l| l.min(id)));
                }
            });
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(&buf[..n], cx);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let k = n.min(b.len());
                this.wrote(&b[..k], cx);
                n -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0, payload.len() as u8, kind, 0];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_are_found_across_arbitrary_splits() {
        let mut bytes = frame(0x4, 0, &[0; 6]);
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&[0; 4]);
        bytes.extend(frame(FRAME_GOAWAY, 0, &goaway));
        bytes.extend(frame(FRAME_HEADERS, 7, &[1, 2, 3]));
        for split in 1..bytes.len() {
            let mut f = Frames::default();
            let mut found = Vec::new();
            for chunk in bytes.chunks(split) {
                f.feed(chunk, &mut |s| {
                    found.push(match s {
                        Seen::Headers(id) => ("headers", id),
                        Seen::Goaway(id) => ("goaway", id),
                    })
                });
            }
            assert_eq!(found, [("goaway", 5), ("headers", 7)], "split {split}");
            assert!(f.at_boundary());
        }
    }
}
