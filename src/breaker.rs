//! Circuit breaker per backend: closed -> open -> half-open -> closed.
//!
//! Lives inside each `Arc<Backend>` and so survives reloads. The request path reads it with one
//! atomic load (`admits`), reserves a trial slot with a compare-and-swap when half-open
//! (`acquire`), and feeds it the classified outcome of every attempt (`on_success`,
//! `on_failure`). The health checker never touches it. Every transition is a compare-and-swap
//! on one word that packs the state with the time it was entered, so exactly one caller wins a
//! flip and that caller alone logs it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::BreakerPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// For the `balancer_backend_breaker_state` gauge.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// A flip the caller should log (once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// What `acquire` granted: trials must report back (or be released) so the half-open slot frees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Trial,
}

#[derive(Debug, Default)]
pub struct Breaker {
    /// State in the low 2 bits, trials out while half-open in the next 14, and the
    /// millisecond the state was entered in the top 48: one word, so that a move to
    /// half-open and the reservation of its first trial are one compare-and-swap, and no
    /// thread can erase a trial another one reserved.
    word: AtomicU64,
    /// Consecutive failures while closed.
    failures: AtomicU32,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const TRIAL_BITS: u32 = 14;
const MAX_TRIALS: u64 = (1 << TRIAL_BITS) - 1;

fn pack(state: u64, trials: u64, since_ms: u64) -> u64 {
    (since_ms << (2 + TRIAL_BITS)) | (trials.min(MAX_TRIALS) << 2) | state
}

fn unpack(word: u64) -> (BreakerState, u64) {
    let state = match word & 3 {
        OPEN => BreakerState::Open,
        HALF_OPEN => BreakerState::HalfOpen,
        _ => BreakerState::Closed,
    };
    (state, word >> (2 + TRIAL_BITS))
}

fn trials_of(word: u64) -> u64 {
    (word >> 2) & MAX_TRIALS
}

fn elapsed(now_ms: u64, since_ms: u64, d: Duration) -> bool {
    now_ms.saturating_sub(since_ms) >= d.as_millis() as u64
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        unpack(self.word.load(Relaxed)).0
    }

    /// The state as an operator should see it, for `/status` and `/metrics` alike: an open
    /// breaker whose time is up is half-open, even if no request has come along yet to make
    /// the move.
    pub fn effective_state(&self, policy: &BreakerPolicy, now_ms: u64) -> BreakerState {
        let (state, since) = unpack(self.word.load(Relaxed));
        match state {
            BreakerState::Open if elapsed(now_ms, since, policy.open_duration) => {
                BreakerState::HalfOpen
            }
            s => s,
        }
    }

    /// `effective_state` with the monotonic millisecond (`clock::now_ms`) it began, for the
    /// dashboard's "open for 12 s": an open breaker whose time is up has been half-open since
    /// that time ran out, not since it opened.
    pub fn effective_since(&self, policy: &BreakerPolicy, now_ms: u64) -> (BreakerState, u64) {
        let (state, since) = unpack(self.word.load(Relaxed));
        match state {
            BreakerState::Open if elapsed(now_ms, since, policy.open_duration) => (
                BreakerState::HalfOpen,
                since.saturating_add(policy.open_duration.as_millis() as u64),
            ),
            s => (s, since),
        }
    }

    /// Read-only: would a request be let through now? Used by the picker to skip backends
    /// without reserving anything. Inlined: the picker calls it per member per pick.
    #[inline]
    pub fn admits(&self, policy: &BreakerPolicy, now_ms: u64) -> bool {
        let word = self.word.load(Relaxed);
        let (state, since) = unpack(word);
        match state {
            BreakerState::Closed => true,
            BreakerState::Open => elapsed(now_ms, since, policy.open_duration),
            BreakerState::HalfOpen => trials_of(word) < u64::from(policy.half_open_requests),
        }
    }

    /// Lets a request through, moving open -> half-open when its time is up and reserving a
    /// trial slot when half-open. `None`: the breaker refuses.
    pub fn acquire(
        &self,
        policy: &BreakerPolicy,
        now_ms: u64,
    ) -> Option<(Admission, Option<Transition>)> {
        let limit = u64::from(policy.half_open_requests).min(MAX_TRIALS);
        let mut word = self.word.load(Relaxed);
        loop {
            let (state, since) = unpack(word);
            let (next, transition) = match state {
                BreakerState::Closed => return Some((Admission::Normal, None)),
                BreakerState::Open => {
                    if !elapsed(now_ms, since, policy.open_duration) || limit == 0 {
                        return None;
                    }
                    (
                        pack(HALF_OPEN, 1, now_ms),
                        Some(Transition {
                            from: BreakerState::Open,
                            to: BreakerState::HalfOpen,
                        }),
                    )
                }
                BreakerState::HalfOpen => {
                    let t = trials_of(word);
                    if t >= limit {
                        return None;
                    }
                    (pack(HALF_OPEN, t + 1, since), None)
                }
            };
            match self
                .word
                .compare_exchange_weak(word, next, Relaxed, Relaxed)
            {
                Ok(_) => return Some((Admission::Trial, transition)),
                Err(w) => word = w,
            }
        }
    }

    /// A trial that ended without an outcome about the backend (the client went away).
    pub fn release(&self, admission: Admission) {
        if admission != Admission::Trial {
            return;
        }
        let _ = self.word.fetch_update(Relaxed, Relaxed, |w| {
            let (state, since) = unpack(w);
            (state == BreakerState::HalfOpen && trials_of(w) > 0)
                .then(|| pack(HALF_OPEN, trials_of(w) - 1, since))
        });
    }

    pub fn on_success(&self, admission: Admission, now_ms: u64) -> Option<Transition> {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if admission != Admission::Trial {
            return None;
        }
        self.word
            .fetch_update(Relaxed, Relaxed, |w| {
                (unpack(w).0 == BreakerState::HalfOpen).then_some(pack(CLOSED, 0, now_ms))
            })
            .ok()
            .map(|_| Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed,
            })
    }

    pub fn on_failure(
        &self,
        admission: Admission,
        policy: &BreakerPolicy,
        now_ms: u64,
    ) -> Option<Transition> {
        if policy.consecutive_failures == 0 {
            return None;
        }
        let word = self.word.load(Relaxed);
        let (state, _) = unpack(word);
        match (state, admission) {
            (BreakerState::HalfOpen, Admission::Trial) => self
                .word
                .fetch_update(Relaxed, Relaxed, |w| {
                    (unpack(w).0 == BreakerState::HalfOpen).then_some(pack(OPEN, 0, now_ms))
                })
                .ok()
                .map(|_| Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Open,
                }),
            (BreakerState::Closed, _) => {
                let n = self.failures.fetch_add(1, Relaxed).saturating_add(1);
                if n < policy.consecutive_failures {
                    return None;
                }
                let opened = self
                    .word
                    .compare_exchange(word, pack(OPEN, 0, now_ms), Relaxed, Relaxed)
                    .is_ok();
                if opened {
                    self.failures.store(0, Relaxed);
                }
                opened.then_some(Transition {
                    from: BreakerState::Closed,
                    to: BreakerState::Open,
                })
            }
            // Late answers to requests sent before the breaker opened say nothing new.
            _ => {
                self.release(admission);
                None
            }
        }
    }

    /// Policy changed on reload to "off": forget any open state.
    pub fn reset(&self) {
        self.word.store(pack(CLOSED, 0, 0), Relaxed);
        self.failures.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            open_duration: Duration::from_millis(1000),
            half_open_requests: 1,
            ..BreakerPolicy::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::default();
        let p = policy();
        assert_eq!(b.on_failure(Admission::Normal, &p, 10), None);
        assert_eq!(b.on_failure(Admission::Normal, &p, 10), None);
        b.on_success(Admission::Normal, 11);
        assert_eq!(b.on_failure(Admission::Normal, &p, 12), None);
        assert_eq!(b.on_failure(Admission::Normal, &p, 12), None);
        let t = b.on_failure(Admission::Normal, &p, 12).unwrap();
        assert_eq!(t.to, BreakerState::Open);
        assert!(!b.admits(&p, 500));
        assert!(b.acquire(&p, 500).is_none());
    }

    #[test]
    fn half_open_lets_limited_trials_and_closes_on_success() {
        let b = Breaker::default();
        let p = policy();
        for _ in 0..3 {
            b.on_failure(Admission::Normal, &p, 0);
        }
        assert!(b.admits(&p, 1000));
        let (adm, t) = b.acquire(&p, 1000).unwrap();
        assert_eq!(adm, Admission::Trial);
        assert_eq!(t.unwrap().to, BreakerState::HalfOpen);
        assert!(b.acquire(&p, 1001).is_none(), "only one trial at a time");
        assert!(!b.admits(&p, 1001));
        let t = b.on_success(adm, 1002).unwrap();
        assert_eq!(t.to, BreakerState::Closed);
        assert_eq!(b.acquire(&p, 1003).unwrap().0, Admission::Normal);
    }

    #[test]
    fn trial_failure_reopens_and_release_frees_slot() {
        let b = Breaker::default();
        let p = policy();
        for _ in 0..3 {
            b.on_failure(Admission::Normal, &p, 0);
        }
        let (adm, _) = b.acquire(&p, 1000).unwrap();
        b.release(adm);
        let (adm, _) = b.acquire(&p, 1000).unwrap();
        let t = b.on_failure(adm, &p, 1500).unwrap();
        assert_eq!(t.to, BreakerState::Open);
        assert!(b.acquire(&p, 2000).is_none());
        assert!(b.acquire(&p, 2500).is_some());
    }

    #[test]
    fn racing_trials_never_exceed_the_limit_nor_get_lost() {
        let b = std::sync::Arc::new(Breaker::default());
        let p = BreakerPolicy {
            half_open_requests: 3,
            ..policy()
        };
        for _ in 0..3 {
            b.on_failure(Admission::Normal, &p, 0);
        }
        // Many threads race the open -> half-open move; exactly `half_open_requests` win.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = std::sync::Arc::clone(&b);
                std::thread::spawn(move || b.acquire(&p, 5000).is_some())
            })
            .collect();
        let won = handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .filter(|w| *w)
            .count();
        assert_eq!(won, 3);
        assert_eq!(trials_of(b.word.load(Relaxed)), 3);
        b.release(Admission::Trial);
        assert!(b.acquire(&p, 5001).is_some());
        assert!(b.acquire(&p, 5001).is_none());
    }

    #[test]
    fn since_is_when_the_effective_state_began() {
        let b = Breaker::default();
        let p = policy();
        assert_eq!(b.effective_since(&p, 50), (BreakerState::Closed, 0));
        for _ in 0..3 {
            b.on_failure(Admission::Normal, &p, 200);
        }
        assert_eq!(b.effective_since(&p, 700), (BreakerState::Open, 200));
        // Open for its full second: half-open from then on, before any request moves it.
        assert_eq!(b.effective_since(&p, 1500), (BreakerState::HalfOpen, 1200));
        let (adm, _) = b.acquire(&p, 1600).unwrap();
        assert_eq!(b.effective_since(&p, 1650), (BreakerState::HalfOpen, 1600));
        b.on_success(adm, 1700);
        assert_eq!(b.effective_since(&p, 1800), (BreakerState::Closed, 1700));
    }

    #[test]
    fn zero_threshold_disables() {
        let b = Breaker::default();
        let p = BreakerPolicy {
            consecutive_failures: 0,
            ..policy()
        };
        for _ in 0..100 {
            assert_eq!(b.on_failure(Admission::Normal, &p, 0), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
