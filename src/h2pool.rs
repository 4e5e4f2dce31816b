//! Multiplexed HTTP/2 connections to one backend (`protocol = "h2c" | "h2"`).
//!
//! Each `Backend` owns one `H2Conns`, so its connections survive a reload with the backend.
//! Requests share a connection up to the backend's SETTINGS_MAX_CONCURRENT_STREAMS; a new one
//! is dialled only when every connection is saturated (one dial at a time: the requests that
//! wait for it share its outcome, so a burst of 64 requests opens one connection, not 64),
//! and never more than `MAX_CONNS_PER_BACKEND`, beyond which h2 queues streams on the
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
//! Draining: `h2io::H2Io` watches the frames for a GOAWAY and flags the connection at once,
//! before h2 has even parsed it, so no new stream is put on a connection the backend is
//! leaving; streams h2 still opens there are refused on the spot.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::reason::Failure;

/// A multiplexed connection's request handle (the h2 crate's; clones share the connection).
pub type H2Sender = h2::client::SendRequest<Bytes>;

/// Connections dialled per backend before streams queue on existing ones instead.
const MAX_CONNS_PER_BACKEND: usize = 8;

/// One HTTP/2 connection and what the pool knows about it.
pub struct H2Conn {
    tx: H2Sender,
    /// The pool's transport id when this connection was dialled (see `idle.rs`).
    transport: u64,
    /// Streams reserved on it (requests in flight, response bodies still streaming).
    active: AtomicUsize,
    /// The backend's SETTINGS_MAX_CONCURRENT_STREAMS as h2 last saw it (the connection
    /// task publishes it after every poll: h2 only tells it to the connection's owner).
    max_streams: Arc<AtomicUsize>,
    /// Set when a GOAWAY arrived: no new stream goes here.
    draining: Arc<AtomicBool>,
    /// Set by the connection's task when the connection has ended.
    closed: Arc<AtomicBool>,
    /// When the last stream ended (ms, `clock::now_ms`), for the idle reaper.
    idle_since_ms: AtomicU64,
}

impl H2Conn {
    pub fn new(
        tx: H2Sender,
        transport: u64,
        max_streams: Arc<AtomicUsize>,
        draining: Arc<AtomicBool>,
        closed: Arc<AtomicBool>,
    ) -> H2Conn {
        H2Conn {
            tx,
            transport,
            active: AtomicUsize::new(0),
            max_streams,
            draining,
            closed,
            idle_since_ms: AtomicU64::new(now_ms()),
        }
    }

    fn usable(&self, transport: u64) -> bool {
        self.transport == transport && !self.draining.load(Relaxed) && !self.is_closed()
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

    /// Takes a slot whatever the backend's limit: h2 queues the stream until one frees.
    fn reserve_anyway(self: &Arc<Self>) -> Stream {
        self.active.fetch_add(1, Relaxed);
        Stream {
            conn: Arc::clone(self),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// The connection refused a new stream (it has failed, or is closing): no request is put
    /// on it again, though its task may not have ended yet.
    pub fn retire(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether a GOAWAY arrived on this connection (or it was retired).
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
    /// A handle to send this stream's request on (a cheap clone: a few reference counts).
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
                    next.extend(list.iter().filter(|c| !c.is_closed()).cloned());
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
    pub fn reserve(&self, transport: u64) -> Option<Stream> {
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
        self.conns.load().iter().filter(|c| !c.is_closed()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes (by dropping the pool's handle; h2 then ends the connection with a GOAWAY
    /// of its own once no stream is left) every connection without a stream that is idle for
    /// `idle` or more, draining, closed, or speaking another transport than `transport`.
    pub fn reap(&self, transport: u64, idle: Duration) {
        let now = now_ms();
        let idle_ms = idle.as_millis() as u64;
        let keep = |c: &Arc<H2Conn>| {
            if c.is_closed() {
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
