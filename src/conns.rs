//! The client connections of one listener: how many may be open (`max_connections`, resizable
//! by a reload), which of them are idle, and asking idle ones to close, either because they
//! have been idle for `idle_timeout` or because the listener is full and a new client waits
//! (idle keep-alive connections make room first, as nginx reuses them, so idle clients can
//! never lock out active ones).
//!
//! The request path never touches this module's lock: a request only moves its connection's
//! `ConnInfo::activity` word (`conn::Active`). The table is locked when a connection opens or
//! closes, by the sweeper (`listener::sweep`, every `PARK_AFTER`) and by the accept loop when
//! the listener is full.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn::{in_flight, ConnInfo, ASK_FINISH, ASK_IDLE, ASK_PARK};

/// How long an HTTP/1 keep-alive connection stays idle, holding hyper's connection and its
/// buffers, before it is parked (`listener::serve_h1`). Long enough that a busy client's next
/// request comes first, so parking costs nothing under load (parking at once cost 7k of 48k
/// instructions per request at 1000 connections: a hyper connection built per request), short
/// enough that idle connections hold sockets, not buffers, a moment after they go quiet.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// One listener's connections.
pub struct Conns {
    capacity: Arc<Capacity>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    next_id: u64,
    /// Idle connections found by the last scan, oldest last (so `pop` takes it): the accept
    /// loop evicts from here and rescans only once it is used up, so a full listener under a
    /// stream of new clients pays a scan per batch of evictions, not per eviction.
    candidates: Vec<Candidate>,
}

struct Entry {
    info: Arc<ConnInfo>,
    id: u64,
    /// `activity` as last seen, and since when (ms): a word unchanged since then means no
    /// request started or ended in between.
    seen: u64,
    seen_since: u64,
    /// Already asked to close.
    asked: bool,
    /// `activity` when last asked to park: asked once per idle spell.
    park_asked: Option<u64>,
}

struct Candidate {
    since: u64,
    slot: usize,
    id: u64,
}

impl Entry {
    /// Since when (ms, as far as observed) the connection has been idle; `None` if it is not.
    fn idle_since(&mut self, now: u64) -> Option<u64> {
        let a = self.info.activity.load(Relaxed);
        if a != self.seen {
            self.seen = a;
            self.seen_since = now;
        }
        // A head that has started is header_timeout's, not idle.
        (in_flight(a) == 0 && !self.info.head_pending.load(Relaxed)).then_some(self.seen_since)
    }

    fn ask(&mut self) {
        self.asked = true;
        self.info.ask(ASK_IDLE);
    }
}

/// Removes its connection from the table when the connection ends.
pub struct Registered {
    conns: Arc<Conns>,
    slot: usize,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut t = self.conns.lock();
        if let Some(s) = t.slots.get_mut(self.slot) {
            *s = None;
            t.free.push(self.slot);
        }
    }
}

impl Conns {
    pub fn new(max_connections: u64) -> Arc<Conns> {
        Arc::new(Conns {
            capacity: Capacity::new(max_connections),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding it; if something did, the table is still consistent
        // enough to go on with (worst case an idle connection is not found).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// Open connections known to the table.
    #[cfg(test)]
    fn len(&self) -> usize {
        let t = self.lock();
        t.slots.len() - t.free.len()
    }

    pub fn register(self: &Arc<Self>, info: Arc<ConnInfo>, now: u64) -> Registered {
        let mut t = self.lock();
        let id = t.next_id;
        t.next_id += 1;
        let entry = Entry {
            seen: info.activity.load(Relaxed),
            info,
            id,
            seen_since: now,
            asked: false,
            park_asked: None,
        };
        let slot = match t.free.pop() {
            Some(i) => {
                t.slots[i] = Some(entry);
                i
            }
            None => {
                t.slots.push(Some(entry));
                t.slots.len() - 1
            }
        };
        Registered {
            conns: Arc::clone(self),
            slot,
        }
    }

    /// Asks every connection to finish what it is doing and close (drain, or the listener was
    /// removed). Connections that register later see the signal themselves.
    pub fn finish_all(&self) {
        let t = self.lock();
        for e in t.slots.iter().flatten() {
            e.info.ask(ASK_FINISH);
        }
    }

    /// Asks every connection idle for `idle_timeout` or more to close, and every one idle for
    /// `PARK_AFTER` to park (once per idle spell). Returns how many were asked to close.
    pub fn sweep(&self, now: u64, idle_timeout: Duration) -> usize {
        let limit = idle_timeout.as_millis() as u64;
        let park_after = PARK_AFTER.as_millis() as u64;
        let mut t = self.lock();
        let mut n = 0;
        for e in t.slots.iter_mut().flatten() {
            if e.asked {
                continue;
            }
            let Some(idle) = e.idle_since(now).map(|s| now.saturating_sub(s)) else {
                continue;
            };
            if idle >= limit {
                e.ask();
                n += 1;
            } else if idle >= park_after && e.park_asked != Some(e.seen) {
                e.park_asked = Some(e.seen);
                e.info.ask(ASK_PARK);
            }
        }
        n
    }

    /// Asks the connection idle the longest to close, to make room for a new one. Returns
    /// the one asked, if any.
    pub fn evict_one(&self, now: u64) -> Option<Arc<ConnInfo>> {
        let mut t = self.lock();
        let Table {
            slots, candidates, ..
        } = &mut *t;
        for rescanned in [false, true] {
            if rescanned {
                candidates.clear();
                for (slot, e) in slots.iter_mut().enumerate() {
                    let Some(e) = e else { continue };
                    if let (false, Some(since)) = (e.asked, e.idle_since(now)) {
                        candidates.push(Candidate {
                            since,
                            slot,
                            id: e.id,
                        });
                    }
                }
                candidates.sort_unstable_by_key(|c| std::cmp::Reverse(c.since));
            }
            while let Some(c) = candidates.pop() {
                let Some(Some(e)) = slots.get_mut(c.slot) else {
                    continue;
                };
                // Still the same connection, still idle since then (no request in between).
                if e.id == c.id && !e.asked && e.idle_since(now) == Some(c.since) {
                    e.ask();
                    return Some(Arc::clone(&e.info));
                }
            }
        }
        None
    }
}

/// A listener's `max_connections`, as a semaphore whose size a reload can change: more
/// permits are added at once; fewer are taken back from those available, and the rest as
/// connections close (`debt`), so the open connections are never cut.
pub struct Capacity {
    sem: Arc<Semaphore>,
    /// Permits still to take back: the next this many connections to close forget their
    /// permit instead of returning it.
    debt: AtomicUsize,
    /// The size last asked for (clamped), changed only under this lock (reloads are serial,
    /// but the lock keeps `resize` correct on its own).
    size: Mutex<usize>,
}

/// A connection's place under `max_connections`.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    capacity: Arc<Capacity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            let owed = self
                .capacity
                .debt
                .fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1))
                .is_ok();
            if owed {
                p.forget();
            }
        }
    }
}

fn clamp(max: u64) -> usize {
    usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

impl Capacity {
    pub fn new(max_connections: u64) -> Arc<Capacity> {
        let n = clamp(max_connections);
        Arc::new(Capacity {
            sem: Arc::new(Semaphore::new(n)),
            debt: AtomicUsize::new(0),
            size: Mutex::new(n),
        })
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let p = Arc::clone(&self.sem).try_acquire_owned().ok()?;
        Some(self.slot(p))
    }

    /// Waits for a place; `None` only if the semaphore was closed (it never is).
    pub async fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let p = Arc::clone(&self.sem).acquire_owned().await.ok()?;
        Some(self.slot(p))
    }

    fn slot(self: &Arc<Self>, p: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(p),
            capacity: Arc::clone(self),
        }
    }

    /// Applies a new `max_connections`.
    pub fn resize(&self, max_connections: u64) {
        let new = clamp(max_connections);
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        let old = *size;
        *size = new;
        if new > old {
            // Cancel what is still owed before adding permits.
            let grow = new - old;
            let owed = self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(grow)))
                .unwrap_or(0);
            self.sem.add_permits(grow - owed.min(grow));
        } else if new < old {
            let shrink = old - new;
            let taken = self.sem.forget_permits(shrink);
            self.debt.fetch_add(shrink - taken, Relaxed);
        }
    }

    /// Places free right now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Active;

    fn info() -> Arc<ConnInfo> {
        ConnInfo::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            Duration::from_secs(1),
            None,
        )
    }

    #[test]
    fn shrinking_takes_permits_back_as_connections_close() {
        let c = Capacity::new(3);
        let a = c.try_acquire().unwrap();
        let b = c.try_acquire().unwrap();
        c.resize(1);
        // One was available and is gone; one more is owed.
        assert!(c.try_acquire().is_none());
        drop(a);
        assert!(c.try_acquire().is_none(), "the first close pays the debt");
        drop(b);
        let d = c.try_acquire().expect("one place at size 1");
        assert!(c.try_acquire().is_none());
        // Growing cancels what is owed before adding.
        c.resize(2);
        let e = c.try_acquire().expect("a second place at size 2");
        drop((d, e));
        assert_eq!(c.available(), 2);
    }

    #[test]
    fn growing_while_in_debt() {
        let c = Capacity::new(2);
        let a = c.try_acquire().unwrap();
        let b = c.try_acquire().unwrap();
        c.resize(1); // owes 1
        c.resize(3); // cancels the debt and adds 1
        let x = c.try_acquire().expect("one free place at size 3");
        assert!(c.try_acquire().is_none());
        drop((a, b, x));
        assert_eq!(c.available(), 3);
    }

    #[test]
    fn idle_connections_are_swept_and_evicted_oldest_first() {
        let conns = Conns::new(10);
        let (old, young, busy) = (info(), info(), info());
        let _r1 = conns.register(Arc::clone(&old), 1_000);
        let _r2 = conns.register(Arc::clone(&young), 2_000);
        let _r3 = conns.register(Arc::clone(&busy), 1_000);
        let _req = Active::start(&busy);
        assert_eq!(conns.sweep(2_500, Duration::from_millis(1_000)), 1);
        assert!(old.close.notified().now_or_never_ready());
        let asked = conns.evict_one(2_600).expect("one idle left");
        assert!(Arc::ptr_eq(&asked, &young));
        assert!(young.close.notified().now_or_never_ready());
        assert!(
            conns.evict_one(2_700).is_none(),
            "the busy one is never evicted"
        );
        assert_eq!(conns.len(), 3);
    }

    #[test]
    fn a_request_in_between_restarts_the_idle_clock() {
        let conns = Conns::new(10);
        let c = info();
        let _r = conns.register(Arc::clone(&c), 0);
        drop(Active::start(&c));
        // First look after the request: idle since now, not since registration.
        assert_eq!(conns.sweep(5_000, Duration::from_millis(1_000)), 0);
        assert_eq!(conns.sweep(5_999, Duration::from_millis(1_000)), 0);
        assert_eq!(conns.sweep(6_000, Duration::from_millis(1_000)), 1);
    }

    #[test]
    fn a_connection_idle_for_park_after_is_asked_to_park_once_per_idle_spell() {
        use crate::conn::ASK_PARK;
        let conns = Conns::new(10);
        let c = info();
        let _r = conns.register(Arc::clone(&c), 0);
        let idle = Duration::from_secs(60);
        let after = PARK_AFTER.as_millis() as u64;
        drop(Active::start(&c));
        // Busy a moment ago: left alone until it has been quiet for PARK_AFTER.
        conns.sweep(1_000, idle);
        conns.sweep(1_000 + after - 1, idle);
        assert!(!c.close.notified().now_or_never_ready());
        conns.sweep(1_000 + after, idle);
        assert_eq!(c.asked.load(Relaxed), ASK_PARK);
        assert!(c.close.notified().now_or_never_ready());
        assert!(c.take_park(), "only parking was asked");
        // Still the same idle spell (parked): not asked again.
        conns.sweep(1_000 + 5 * after, idle);
        assert!(!c.close.notified().now_or_never_ready());
        // A request later, quiet again: asked again.
        drop(Active::start(&c));
        conns.sweep(10_000, idle);
        conns.sweep(10_000 + after, idle);
        assert!(c.close.notified().now_or_never_ready());
        // Asked to close as well: parking is no longer all that is asked.
        c.ask(ASK_IDLE);
        assert!(!c.take_park());
        assert_eq!(c.asked.load(Relaxed), ASK_IDLE);
    }

    trait NowOrNever {
        fn now_or_never_ready(self) -> bool;
    }

    impl<F: std::future::Future> NowOrNever for F {
        fn now_or_never_ready(self) -> bool {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let mut f = std::pin::pin!(self);
            f.as_mut().poll(&mut cx).is_ready()
        }
    }
}
