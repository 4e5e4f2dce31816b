//! Clients that make us work for nothing: HTTP/2 streams opened and cancelled at once (rapid
//! reset, CVE-2023-44487) and the reconnect storms that follow. One such client must not
//! starve the others.
//!
//! Where the time went before this module: h2 hands hyper every stream, reset or not (its own
//! guard, `max_pending_accept_reset_streams`, only counts streams reset before hyper accepted
//! them), and hyper polls the request handler once before it looks at the reset. That first
//! poll checked out a pooled backend connection, or opened a new one, and wrote the request;
//! the reset then dropped it. So each cancelled stream cost a backend connection: tens of
//! thousands per second, the backend's accept queue overflowed, the pool stayed empty, and a
//! normal client's request waited for a new backend connection behind them (up to seconds).
//! Each queued stream task also held the handler's ~11 KB state: a burst of them allocated
//! 100+ MB at once.
//!
//! The bounds, cheapest first:
//! - [`reset_before_start`]: an HTTP/2 request whose reset is already in when its handler
//!   first runs never reaches a backend; a new stream first yields once, so that a reset sent
//!   just after its HEADERS is seen too. Each new stream costs the connection task part of
//!   tokio's cooperative budget ([`STREAM_BUDGET_COST`]), so a connection that opens streams
//!   as fast as it can read them yields after a few dozen instead of queueing thousands of
//!   tasks ahead of everybody else.
//! - [`ConnWatch`]: a connection whose streams the client cancelled before they were answered
//!   (within [`PREMATURE_WITHIN`] of their start), at least [`PREMATURE_RESETS_MIN`] times
//!   and for at least half of its streams, is "tripped": it gets a GOAWAY and is closed [`TRIPPED_GRACE`] later (the idea of Envoy's
//!   premature-reset check); streams it opens meanwhile are answered 503 without a backend.
//!   A flood spread over many connections is caught by address: [`ADDRESS_RESETS_PER_SEC`]
//!   such resets from one address ban it, and then each of its connections that cancels
//!   most of its streams trips at its next stream. When the ban expires, the address stays on
//!   probation: its connections trip after [`PROBATION_RESETS`].
//! - [`Penalties`]: a peer IP whose connection tripped, or made h2 itself give up with
//!   ENHANCE_YOUR_CALM, has its new connections closed at accept for a while (1 s, doubling
//!   per repeat up to [`MAX_BAN`]), so a reconnect storm costs an accept and a close each. The
//!   table is per listener and bounded; clients behind one NAT address share its fate, which is
//!   why the first ban is short.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::clock::now_ms;
use crate::conn::{ConnInfo, ASK_ABUSE};

/// Cancelled-before-answered streams a connection may have before its ratio is judged: a
/// browser that navigates away cancels a few dozen at once, an attack thousands per second.
pub const PREMATURE_RESETS_MIN: u32 = 100;

/// A stream cancelled later than this after it started is not a premature reset.
pub const PREMATURE_WITHIN: Duration = Duration::from_secs(1);

/// How long a tripped connection may take to flush its GOAWAY before it is closed.
pub const TRIPPED_GRACE: Duration = Duration::from_millis(100);

/// The first ban of a peer IP; each repeat within [`STRIKE_MEMORY`] doubles it.
pub const FIRST_BAN: Duration = Duration::from_secs(1);
pub const MAX_BAN: Duration = Duration::from_secs(30);
/// A peer IP's strikes are forgotten after this long without a new one.
pub const STRIKE_MEMORY: Duration = Duration::from_secs(300);
/// Premature resets per second (from connections where they are the majority) that get an
/// address banned, however many connections it spreads them over.
pub const ADDRESS_RESETS_PER_SEC: u32 = 200;
/// Premature resets that trip a connection from an address banned within [`STRIKE_MEMORY`]:
/// a flood that comes back when its ban expires is cut off at once, not after another wave.
pub const PROBATION_RESETS: u32 = 4;
/// Peer IPs remembered per listener; beyond, a new offender is not banned (its connections
/// are still tripped one by one), so the table cannot be grown without bound.
pub const MAX_TRACKED: usize = 4096;

/// One per client connection: counts its streams and those the client cancelled before they
/// were answered.
pub struct ConnWatch {
    streams: AtomicU32,
    premature: AtomicU32,
    tripped: AtomicBool,
    /// The connection to ask to close when it trips (`None` in unit tests).
    conn: Option<Arc<ConnInfo>>,
    peer: IpAddr,
    penalties: Arc<Penalties>,
}

impl ConnWatch {
    #[cfg(test)]
    pub fn new(peer: IpAddr, penalties: Arc<Penalties>) -> Arc<ConnWatch> {
        Arc::new(ConnWatch {
            streams: AtomicU32::new(0),
            premature: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
            conn: None,
            peer,
            penalties,
        })
    }

    /// The watch of a client connection, which `trip` asks to close (`ASK_ABUSE`).
    pub fn for_conn(conn: &Arc<ConnInfo>, penalties: Arc<Penalties>) -> Arc<ConnWatch> {
        Arc::new(ConnWatch {
            streams: AtomicU32::new(0),
            premature: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
            conn: Some(Arc::clone(conn)),
            peer: conn.peer.ip(),
            penalties,
        })
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Relaxed)
    }

    /// Wraps one request's handler (which should start with [`reset_before_start`]). An h2
    /// handler dropped before it finished is counted as a premature reset.
    ///
    /// Must be called from the connection task (hyper's accept loop calls the service there):
    /// it charges that task's cooperative budget.
    pub fn stream<F, T>(self: &Arc<Self>, h2: bool, handler: F) -> impl Future<Output = T> + Send
    where
        F: Future<Output = T> + Send,
    {
        let streams = self.streams.fetch_add(1, Relaxed) + 1;
        if h2 {
            charge_connection_task();
            // A connection that has been cancelling most of its streams, from an address that
            // is banned by now: stop before this stream reaches a backend, rather than at its
            // next reset.
            let premature = self.premature.load(Relaxed);
            if premature > 0
                && premature.saturating_mul(2) >= streams
                && self.penalties.refused(self.peer)
            {
                self.trip();
            }
        }
        // Only h2 streams are judged: an HTTP/1 client that hangs up mid-request pays a TCP
        // connection for each, and a load test with short timeouts is no attack.
        let done = Done {
            watch: Arc::clone(self),
            finished: !h2,
            started_ms: if h2 { now_ms() } else { 0 },
        };
        async move {
            // Moves the whole guard in (a bare `done.finished = true` below would capture only
            // the field, and the guard would drop, counting a reset, when this returns).
            let mut done = done;
            // An h2 stream first lets the connection task run once more, so that a reset sent
            // just after the HEADERS is seen before the handler starts (then hyper drops it).
            // One turn of the scheduler per stream: within the noise of h2load's CPU per
            // request here, and it keeps most of a flood's first wave, sent before any reset
            // was seen, away from the backends (benches/flood.sh, split8).
            if h2 {
                tokio::task::yield_now().await;
            }
            let out = handler.await;
            done.finished = true;
            out
        }
    }

    fn premature_reset(&self) {
        let premature = self.premature.fetch_add(1, Relaxed) + 1;
        let streams = self.streams.load(Relaxed);
        // A connection whose streams are mostly answered is never judged, whatever its
        // address did: a few cancels are normal.
        if premature.saturating_mul(2) < streams {
            return;
        }
        // Its own count, or its address's: a flood spread over many connections trips each
        // of them at its first cancelled stream once the address crossed the line.
        if premature >= PREMATURE_RESETS_MIN || self.penalties.premature_reset(self.peer, premature)
        {
            self.trip();
        }
    }

    fn trip(&self) {
        if !self.tripped.swap(true, Relaxed) {
            self.penalties.penalize(self.peer);
            if let Some(c) = &self.conn {
                c.ask(ASK_ABUSE);
            }
        }
    }
}

/// Units of tokio's cooperative budget (128 per task poll) a new h2 stream costs the
/// connection task that accepted it: once spent, the task's next socket read yields to the
/// scheduler, so one connection starts at most about 32 streams (plus the frames already
/// buffered) before every other task, its own streams included, gets a turn. (8, 16 streams
/// a poll, cost h2load -m100 ~15% more CPU per request in flushes and wake-ups.)
pub const STREAM_BUDGET_COST: u32 = 4;

/// Whether an h2 request whose HEADERS ended the stream was reset by the client before its
/// handler first ran: then the handler must not start (hyper polls it once before it looks
/// at the reset, and it would reach a backend). The reset is seen when it came in the same
/// read as the HEADERS, as in a rapid-reset flood; for free, as the body is over anyway.
pub fn reset_before_start(body: &mut hyper::body::Incoming) -> bool {
    use hyper::body::Body;
    if !body.is_end_stream() {
        return false;
    }
    // A stream that ended normally answers Ready(None) at once; a reset one, the error. The
    // noop waker is never needed: nothing polls a finished body again.
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        std::pin::Pin::new(body).poll_frame(&mut cx),
        Poll::Ready(Some(Err(_)))
    )
}

/// Called from hyper's accept loop, inside the connection task's poll.
fn charge_connection_task() {
    // The waker is only registered when the budget is already spent, and then the task's
    // next I/O poll registers the real one and yields.
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..STREAM_BUDGET_COST {
        match tokio::task::coop::poll_proceed(&mut cx) {
            Poll::Ready(r) => r.made_progress(),
            Poll::Pending => break,
        }
    }
}

struct Done {
    watch: Arc<ConnWatch>,
    finished: bool,
    started_ms: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        // A long poll or a stream the user gave up on after a while is not an attack: only
        // streams cancelled within PREMATURE_WITHIN of their start count (Envoy's rule too).
        if !self.finished
            && now_ms().saturating_sub(self.started_ms) < PREMATURE_WITHIN.as_millis() as u64
        {
            self.watch.premature_reset();
        }
    }
}

/// Whether a connection's error is h2 giving up on a peer that sent too much of something
/// (resets, refused streams, CONTINUATION or empty DATA frames): GOAWAY ENHANCE_YOUR_CALM.
pub fn is_calm_down(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return !h2e.is_remote() && h2e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        cur = err.source();
    }
    false
}

/// What one address did lately.
struct Entry {
    strikes: u32,
    last_seen_ms: u64,
    banned_until_ms: u64,
    /// Premature resets (from connections where they are the majority) in the current
    /// one-second window, and when it began.
    window_start_ms: u64,
    window_resets: u32,
}

/// Per listener: addresses whose new connections are closed at accept for a while. IPv6
/// addresses are grouped by /64, the least a single host is usually given.
#[derive(Default)]
pub struct Penalties {
    table: Mutex<HashMap<IpAddr, Entry>>,
    /// Entries in `table`: lets `refused` skip the lock while nobody is tracked.
    len: AtomicUsize,
}

fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Penalties {
    pub fn new() -> Arc<Penalties> {
        Arc::new(Penalties::default())
    }

    /// Whether a connection from `ip` accepted now is to be closed at once.
    pub fn refused(&self, ip: IpAddr) -> bool {
        if self.len.load(Relaxed) == 0 {
            return false;
        }
        let Ok(table) = self.table.lock() else {
            return false;
        };
        table
            .get(&key(ip))
            .is_some_and(|e| e.banned_until_ms > now_ms())
    }

    /// Runs `f` on the entry of `ip`, made if needed; None when the table is full of
    /// addresses more recent than [`STRIKE_MEMORY`].
    fn with_entry<R>(&self, ip: IpAddr, now: u64, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let ip = key(ip);
        let mut table = self.table.lock().ok()?;
        if table.len() >= MAX_TRACKED && !table.contains_key(&ip) {
            let memory = STRIKE_MEMORY.as_millis() as u64;
            table.retain(|_, e| {
                e.banned_until_ms > now || now.saturating_sub(e.last_seen_ms) < memory
            });
            if table.len() >= MAX_TRACKED {
                self.len.store(table.len(), Relaxed);
                return None;
            }
        }
        let e = table.entry(ip).or_insert(Entry {
            strikes: 0,
            last_seen_ms: now,
            banned_until_ms: 0,
            window_start_ms: now,
            window_resets: 0,
        });
        let r = f(e);
        self.len.store(table.len(), Relaxed);
        Some(r)
    }

    /// Counts a premature reset against the address, from a connection that has had
    /// `on_conn` of them (the majority of its streams); true when the connection is to trip:
    /// the address is banned, or crossed [`ADDRESS_RESETS_PER_SEC`] now, or was banned
    /// within [`STRIKE_MEMORY`] and the connection reached [`PROBATION_RESETS`].
    fn premature_reset(&self, ip: IpAddr, on_conn: u32) -> bool {
        let now = now_ms();
        let crossed = self.with_entry(ip, now, |e| {
            if e.banned_until_ms > now {
                return None;
            }
            let on_probation = e.strikes > 0
                && now.saturating_sub(e.last_seen_ms) < STRIKE_MEMORY.as_millis() as u64;
            if on_probation && on_conn >= PROBATION_RESETS {
                return Some(true);
            }
            e.last_seen_ms = now;
            if now.saturating_sub(e.window_start_ms) >= 1000 {
                e.window_start_ms = now;
                e.window_resets = 0;
            }
            e.window_resets += 1;
            Some(e.window_resets >= ADDRESS_RESETS_PER_SEC)
        });
        match crossed {
            Some(None) => true,
            Some(Some(true)) => {
                self.penalize(ip);
                true
            }
            _ => false,
        }
    }

    /// Records an offence by `ip` and bans it: for [`FIRST_BAN`] the first time, twice as
    /// long for each repeat remembered. Logs once per ban, not per connection.
    pub fn penalize(&self, ip: IpAddr) {
        let now = now_ms();
        let started = self.with_entry(ip, now, |e| {
            if now.saturating_sub(e.last_seen_ms) >= STRIKE_MEMORY.as_millis() as u64 {
                e.strikes = 0;
            }
            e.last_seen_ms = now;
            let was_banned = e.banned_until_ms > now;
            // Connections that were already open when the ban started trip one after the
            // other: they extend the ban but do not escalate it.
            if !was_banned {
                e.strikes = e.strikes.saturating_add(1);
            }
            let ban = FIRST_BAN
                .saturating_mul(1u32 << e.strikes.saturating_sub(1).min(16))
                .min(MAX_BAN);
            e.banned_until_ms = e.banned_until_ms.max(now + ban.as_millis() as u64);
            (!was_banned).then_some(ban)
        });
        if let Some(Some(ban)) = started {
            tracing::warn!(
                peer = %key(ip),
                ban = ?ban,
                "HTTP/2 abuse (streams cancelled as soon as opened); closing new connections from this address"
            );
        }
    }

    #[cfg(test)]
    fn banned(&self, ip: IpAddr) -> bool {
        self.refused(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[tokio::test]
    async fn trips_on_a_majority_of_premature_resets_only() {
        let info = ConnInfo::new(
            std::net::SocketAddr::new(A, 1),
            None,
            Duration::from_secs(1),
            None,
        );
        let w = ConnWatch::for_conn(&info, Penalties::new());
        // 150 answered streams, then 149 cancelled ones: under half, not tripped.
        for _ in 0..150 {
            w.stream(true, async {}).await;
        }
        for _ in 0..149 {
            drop(w.stream(true, async {}));
        }
        assert!(!w.is_tripped());
        // The 150th cancel makes it half.
        drop(w.stream(true, async {}));
        assert!(w.is_tripped());
        assert!(w.penalties.banned(A), "its address is banned");
        tokio::time::timeout(Duration::from_secs(1), info.close.notified())
            .await
            .expect("the connection is woken once tripped");
        assert_eq!(info.asked.load(Relaxed), ASK_ABUSE);
    }

    #[test]
    fn http1_is_not_judged() {
        let w = ConnWatch::new(A, Penalties::new());
        for _ in 0..2 * PREMATURE_RESETS_MIN {
            drop(w.stream(false, async {}));
        }
        assert!(!w.is_tripped());
    }

    #[test]
    fn a_few_cancels_never_trip() {
        let w = ConnWatch::new(A, Penalties::new());
        for _ in 0..PREMATURE_RESETS_MIN - 1 {
            drop(w.stream(true, async {}));
        }
        assert!(!w.is_tripped());
    }

    #[tokio::test]
    async fn a_flood_over_many_connections_trips_them_by_address() {
        let p = Penalties::new();
        let conns: Vec<_> = (0..20).map(|_| ConnWatch::new(A, Arc::clone(&p))).collect();
        let mut resets = 0;
        while !p.banned(A) && resets < 10 * ADDRESS_RESETS_PER_SEC {
            drop(conns[resets as usize % conns.len()].stream(true, async {}));
            resets += 1;
        }
        assert!(p.banned(A), "never banned");
        assert!(resets <= ADDRESS_RESETS_PER_SEC, "banned after {resets}");
        // Every connection of the address trips at its next cancelled stream...
        for c in &conns {
            drop(c.stream(true, async {}));
            assert!(c.is_tripped());
        }
        // ...but one from the same address whose streams are answered does not.
        let good = ConnWatch::new(A, Arc::clone(&p));
        for _ in 0..10 {
            good.stream(true, async {}).await;
        }
        for _ in 0..3 {
            drop(good.stream(true, async {}));
        }
        assert!(!good.is_tripped());
        assert!(!p.banned(B), "another address is not affected");
    }

    #[test]
    fn bans_start_short_and_escalate() {
        let p = Penalties::new();
        assert!(!p.refused(A));
        p.penalize(A);
        assert!(p.refused(A));
        assert!(!p.refused(B), "another address is not affected");
        let until = |p: &Penalties| p.table.lock().unwrap()[&A].banned_until_ms;
        let first = until(&p);
        assert!(first >= now_ms() + FIRST_BAN.as_millis() as u64 - 50);
        // Offences while banned do not escalate.
        p.penalize(A);
        assert!(until(&p) <= first + 50);
        // A repeat after the ban does: pretend it expired.
        p.table.lock().unwrap().get_mut(&A).unwrap().banned_until_ms = 0;
        p.penalize(A);
        assert!(until(&p) >= now_ms() + 2 * FIRST_BAN.as_millis() as u64 - 50);
    }

    #[test]
    fn an_address_on_probation_trips_sooner() {
        let p = Penalties::new();
        p.penalize(A);
        // The ban expired, the strike is remembered.
        p.table.lock().unwrap().get_mut(&A).unwrap().banned_until_ms = 0;
        let w = ConnWatch::new(A, Arc::clone(&p));
        for _ in 0..PROBATION_RESETS - 1 {
            drop(w.stream(true, async {}));
        }
        assert!(!w.is_tripped());
        drop(w.stream(true, async {}));
        assert!(w.is_tripped());
        assert!(p.banned(A), "banned again");
        // Another address is judged by the usual rules.
        let w = ConnWatch::new(B, Arc::clone(&p));
        for _ in 0..PROBATION_RESETS {
            drop(w.stream(true, async {}));
        }
        assert!(!w.is_tripped());
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let p = Penalties::new();
        p.penalize(a);
        assert!(p.refused(b));
        assert!(!p.refused(c));
    }
}
