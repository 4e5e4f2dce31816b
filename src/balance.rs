//! A pool and how it picks a backend: smooth weighted round-robin or least connections.
//!
//! `Pool` is part of the immutable snapshot; its moving parts are the round-robin cursor, an
//! atomic that a reload may reset without harm, and a cache of the sequence for weights an
//! operator overrode (see `admin_state.rs`). `pick` runs on every request and takes no lock:
//! it reads each member's health flag, operator intent and breaker word and, for least
//! connections, its in-flight count.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::admin_state::weights_epoch;
use crate::backend::Backend;
use crate::config::{BreakerPolicy, HealthCheckConfig, PoolConfig, StrategyKind};
use crate::reason::Refusal;
use crate::upstream::Dial;

pub struct Member {
    pub backend: Arc<Backend>,
    /// As the file says; an operator's override lives on the backend (`Backend::intent`).
    pub weight: u32,
    /// Picked only when no non-backup member is usable.
    pub backup: bool,
}

/// The two tiers a pick chooses from, in order: primaries, then backups; and the mark of a
/// member that is in neither (weight 0).
const PRIMARY: u8 = 0;
const BACKUP: u8 = 1;
const OUT: u8 = 2;

pub struct Pool {
    pub name: Arc<str>,
    pub strategy: StrategyKind,
    pub members: Vec<Member>,
    /// What picks use while no override is in force: from the file's weights.
    configured: Rotation,
    has_backups: bool,
    cursor: AtomicUsize,
    /// Weight overrides, without touching the snapshot: the `weights_epoch` this pool last
    /// looked at, shifted left by one, low bit set when some member's effective weight differs
    /// from the file's. While it matches the current epoch with the bit clear, picks use
    /// `sequences` and `Member::weight` as if overrides did not exist (one extra load).
    weights_seen: AtomicU64,
    /// The effective weights and their sequences for the epoch in it, rebuilt by the first pick
    /// that sees a newer epoch.
    overridden: ArcSwap<Weights>,
    /// Whether the ejection cap was in force at the last pick, so that entering and leaving
    /// it is logged once each rather than per request.
    capped: AtomicBool,
    pub breaker: BreakerPolicy,
    pub attempts: u32,
    pub health_check: Option<HealthCheckConfig>,
    pub dial: Dial,
}

/// Effective weights as of `epoch`; `custom` is `None` when they are the file's.
struct Weights {
    epoch: u64,
    custom: Option<Rotation>,
}

/// Everything a pick needs from one set of weights (the file's, or with overrides), computed
/// once per set.
struct Rotation {
    weights: Vec<u32>,
    /// Per member: `PRIMARY`, `BACKUP`, or `OUT` for weight 0, so that `usable` tests tier and
    /// weight with one compare.
    tier: Vec<u8>,
    /// nginx's smooth weighted round-robin, unrolled once: member indices in the order the
    /// algorithm would visit them (5,1,1 gives a a b a c a a). A shared cursor walks it, so
    /// picking is one `fetch_add` instead of a locked update of every member's current
    /// weight. One sequence per tier.
    sequences: [Vec<u32>; 2],
}

impl Rotation {
    fn new(members: &[Member], weights: Vec<u32>) -> Rotation {
        let tier = members
            .iter()
            .zip(&weights)
            .map(|(m, &w)| match (w, m.backup) {
                (0, _) => OUT,
                (_, false) => PRIMARY,
                (_, true) => BACKUP,
            })
            .collect();
        let of_tier = |t: u8| -> Vec<u32> {
            weights
                .iter()
                .zip(&tier)
                .map(|(&w, &mt)| if mt == t { w } else { 0 })
                .collect()
        };
        let sequences = [
            smooth_sequence(&of_tier(PRIMARY)),
            smooth_sequence(&of_tier(BACKUP)),
        ];
        Rotation {
            weights,
            tier,
            sequences,
        }
    }
}

/// The member to try, and whether its breaker is to be ignored because breakers already
/// eject more than `max_ejected_percent` of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub breaker_overridden: bool,
}

/// One pick's view of the pool: which weights apply, which tier it picks from, and what to skip.
struct Scan<'a> {
    pool: &'a Pool,
    /// The file's (`Pool::configured`) or the overrides'.
    rot: &'a Rotation,
    tier: u8,
    now: u64,
    tried: &'a [usize],
    ignore_breakers: bool,
}

impl Scan<'_> {
    fn weight(&self, i: usize) -> u32 {
        self.rot.weights.get(i).copied().unwrap_or(0)
    }

    /// Cheapest tests first: tier and weight, then the atomics the operator and the health
    /// task write, then the breaker word.
    #[inline]
    fn usable(&self, i: usize) -> bool {
        let b = &self.pool.members[i].backend;
        self.rot.tier.get(i) == Some(&self.tier)
            && !self.tried.contains(&i)
            && b.intent.takes_new()
            && b.is_healthy()
            && (self.ignore_breakers || b.breaker.admits(&self.pool.breaker, self.now))
    }

    fn sequence(&self) -> &[u32] {
        &self.rot.sequences[usize::from(self.tier == BACKUP)]
    }
}

impl Pool {
    pub fn new(cfg: &PoolConfig, members: Vec<Member>, dial: Dial) -> Pool {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        Pool {
            name: Arc::from(cfg.name.as_str()),
            strategy: cfg.strategy,
            configured: Rotation::new(&members, weights),
            has_backups: members.iter().any(|m| m.backup),
            members,
            cursor: AtomicUsize::new(0),
            // Epoch 0 is never current, so the first pick looks for overrides that surviving
            // backends carry over from before a reload.
            weights_seen: AtomicU64::new(0),
            overridden: ArcSwap::from_pointee(Weights {
                epoch: 0,
                custom: None,
            }),
            capped: AtomicBool::new(false),
            breaker: cfg.breaker,
            attempts: cfg.attempts,
            health_check: cfg.health_check.clone(),
            dial,
        }
    }

    /// The weight picks use for member `i` now: the operator's override, else the file's.
    pub fn effective_weight(&self, i: usize) -> u32 {
        self.members
            .get(i)
            .map_or(0, |m| m.backend.intent.effective_weight(m.weight))
    }

    /// The current effective weights, rebuilt if an override changed since they were built.
    /// Off the common path: only after some override changed somewhere, or while one is set.
    fn weights(&self) -> Guard<Arc<Weights>> {
        // Acquire (in `weights_epoch`): the overrides written before the bump are visible below.
        let epoch = weights_epoch();
        let cur = self.overridden.load();
        if cur.epoch >= epoch {
            return cur;
        }
        let weights: Vec<u32> = (0..self.members.len())
            .map(|i| self.effective_weight(i))
            .collect();
        let differs = weights
            .iter()
            .zip(&self.members)
            .any(|(w, m)| *w != m.weight);
        let custom = differs.then(|| Rotation::new(&self.members, weights));
        let on = u64::from(custom.is_some());
        let next = Arc::new(Weights { epoch, custom });
        // Only forward: a pick that read an older epoch and finished later must not put its
        // weights back over newer ones. `overridden` moves first, so `weights_seen` never
        // claims an epoch whose weights are not stored yet.
        self.overridden.rcu(|cur| {
            if cur.epoch > epoch {
                Arc::clone(cur)
            } else {
                Arc::clone(&next)
            }
        });
        self.weights_seen.fetch_max(epoch << 1 | on, Relaxed);
        self.overridden.load()
    }

    /// Whether open breakers take out more than `max_ejected_percent` of the members: then no
    /// breaker is obeyed (Envoy's ejection cap and panic threshold), so that one failing URL
    /// or an overloaded moment cannot take the whole pool out; health checks still are.
    fn over_ejection_cap(&self, now: u64) -> bool {
        let cap = u64::from(self.breaker.max_ejected_percent);
        if cap >= 100 || self.members.is_empty() {
            return false;
        }
        let ejected = self
            .members
            .iter()
            .filter(|m| !m.backend.breaker.admits(&self.breaker, now))
            .count() as u64;
        let over = ejected * 100 > cap * self.members.len() as u64;
        // Read first: a write per pick would bounce the cache line between cores for nothing.
        if self.capped.load(Relaxed) != over && self.capped.swap(over, Relaxed) != over {
            if over {
                tracing::warn!(pool = %self.name, ejected, members = self.members.len(), max_ejected_percent = cap, "open breakers exceed the ejection cap; sending to every healthy backend");
            } else {
                tracing::info!(pool = %self.name, ejected, "open breakers back under the ejection cap");
            }
        }
        over
    }

    /// Picks a member, skipping unhealthy backends, open breakers (unless too many are open),
    /// backends the operator drained or disabled or weighted 0, and those in `tried` (earlier
    /// attempts of this request): a retry never goes back to a backend that already failed
    /// this request (as nginx), so `attempts = 2` with one backend does not double the wait
    /// for a timed-out answer. Backup members are picked only when no primary is usable.
    pub fn pick(&self, now: u64, tried: &[usize]) -> Result<Pick, Refusal> {
        if self.weights_seen.load(Relaxed) == weights_epoch() << 1 {
            return self.pick_with(&self.configured, now, tried);
        }
        self.pick_overridden(now, tried)
    }

    /// Kept out of `pick` so that the common path stays small enough to inline and carries
    /// no guard to drop.
    #[inline(never)]
    fn pick_overridden(&self, now: u64, tried: &[usize]) -> Result<Pick, Refusal> {
        let w = self.weights();
        self.pick_with(w.custom.as_ref().unwrap_or(&self.configured), now, tried)
    }

    #[inline]
    fn pick_with(&self, rot: &Rotation, now: u64, tried: &[usize]) -> Result<Pick, Refusal> {
        let n = self.members.len();
        let mut scan = Scan {
            pool: self,
            rot,
            tier: PRIMARY,
            now,
            tried,
            ignore_breakers: self.over_ejection_cap(now),
        };
        // Checking first bounds an outage's cost: with every member unusable the round-robin
        // walk below would otherwise step through the whole weighted sequence per request.
        if !(0..n).any(|i| scan.usable(i)) {
            scan.tier = BACKUP;
            if !self.has_backups || !(0..n).any(|i| scan.usable(i)) {
                return Err(self.why_none(&scan));
            }
        }
        self.pick_among(&scan)
            .map(|index| Pick {
                index,
                breaker_overridden: scan.ignore_breakers
                    && !self.members[index]
                        .backend
                        .breaker
                        .admits(&self.breaker, now),
            })
            .ok_or_else(|| self.why_none(&scan))
    }

    fn pick_among(&self, scan: &Scan) -> Option<usize> {
        let n = self.members.len();
        match self.strategy {
            StrategyKind::RoundRobin => {
                // Each skipped entry takes a cursor step of its own, so the order is the
                // sequence with unusable members left out: a down backend's share is spread over
                // the others by weight, not all handed to its successor in the sequence. The
                // walk is bounded (heavy members recur within a few steps in a smooth
                // sequence); past it, the first usable member in list order from the cursor.
                let seq = scan.sequence();
                let len = seq.len();
                let steps = len.min(4 * n + 4);
                let walked = (0..steps).find_map(|_| {
                    let k = self.cursor.fetch_add(1, Relaxed);
                    let i = seq[k % len] as usize;
                    scan.usable(i).then_some(i)
                });
                walked.or_else(|| {
                    let start = self.cursor.load(Relaxed);
                    (0..n)
                        .map(|k| start.wrapping_add(k) % n)
                        .find(|&i| scan.usable(i))
                })
            }
            StrategyKind::LeastConnections => {
                // Scanning from a rotating start breaks ties in turn, so no backend wins every
                // tie because of where it sits in the list.
                let start = self.cursor.fetch_add(1, Relaxed);
                let mut best: Option<(usize, usize, u32)> = None;
                for k in 0..n {
                    let i = (start.wrapping_add(k)) % n;
                    if !scan.usable(i) {
                        continue;
                    }
                    let load = self.members[i].backend.in_flight.load(Relaxed);
                    let weight = scan.weight(i);
                    let better = match best {
                        None => true,
                        // load/weight < best_load/best_weight, without division.
                        Some((_, bl, bw)) => {
                            (load as u128) * (bw as u128) < (bl as u128) * (weight as u128)
                        }
                    };
                    if better {
                        best = Some((i, load, weight));
                    }
                }
                best.map(|(i, _, _)| i)
            }
        }
    }

    /// Why nothing could be picked. Members the operator took out of rotation (drain,
    /// disabled, weight 0) say nothing about health, so they are set aside first.
    fn why_none(&self, scan: &Scan) -> Refusal {
        let in_rotation =
            |i: &usize| scan.weight(*i) > 0 && self.members[*i].backend.intent.takes_new();
        let mut rotating = (0..self.members.len()).filter(in_rotation).peekable();
        if self.members.is_empty() {
            Refusal::NoBackendsConfigured
        } else if rotating.peek().is_none() {
            Refusal::AllDrained
        } else if rotating.all(|i| !self.members[i].backend.is_healthy()) {
            Refusal::AllUnhealthy
        } else {
            Refusal::AllBreakersOpen
        }
    }
}

/// Unrolls nginx's smooth weighted round-robin for one full cycle (sum of weights / gcd).
pub fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total.max(0) as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_round_robin_matches_nginx() {
        let seq: String = smooth_sequence(&[5, 1, 1])
            .iter()
            .map(|&i| (b'a' + i as u8) as char)
            .collect();
        assert_eq!(seq, "aabacaa");
        assert_eq!(smooth_sequence(&[2, 2]), vec![0, 1]);
        assert_eq!(smooth_sequence(&[1, 1, 1]), vec![0, 1, 2]);
        // Weight 0 (in the file, by override, or the other tier) never appears.
        assert_eq!(smooth_sequence(&[0, 3, 0, 1]), vec![1, 1, 3, 1]);
        assert_eq!(smooth_sequence(&[0, 0]), Vec::<u32>::new());
    }
}
