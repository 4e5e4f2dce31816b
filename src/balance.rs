//! A pool and how it picks a backend: smooth weighted round-robin or least connections.
//!
//! `Pool` is part of the immutable snapshot; its only moving part is the round-robin cursor,
//! an atomic that a reload may reset without harm. `pick` runs on every request and takes no
//! lock: it reads each member's health flag and breaker word and, for least connections, its
//! in-flight count.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{BreakerPolicy, HealthCheckConfig, PoolConfig, StrategyKind};
use crate::reason::Refusal;
use crate::upstream::Dial;

pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
}

pub struct Pool {
    pub name: Arc<str>,
    pub strategy: StrategyKind,
    pub members: Vec<Member>,
    /// nginx's smooth weighted round-robin, unrolled once at load: member indices in the order
    /// the algorithm would visit them (5,1,1 gives a a b a c a a). A shared cursor walks it, so
    /// picking is one `fetch_add` instead of a locked update of every member's current weight.
    sequence: Vec<u32>,
    cursor: AtomicUsize,
    /// Whether the ejection cap was in force at the last pick, so that entering and leaving
    /// it is logged once each rather than per request.
    capped: AtomicBool,
    pub breaker: BreakerPolicy,
    pub attempts: u32,
    pub health_check: Option<HealthCheckConfig>,
    pub dial: Dial,
}

/// The member to try, and whether its breaker is to be ignored because breakers already
/// eject more than `max_ejected_percent` of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub breaker_overridden: bool,
}

impl Pool {
    pub fn new(cfg: &PoolConfig, members: Vec<Member>, dial: Dial) -> Pool {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        Pool {
            name: Arc::from(cfg.name.as_str()),
            strategy: cfg.strategy,
            sequence: smooth_sequence(&weights),
            members,
            cursor: AtomicUsize::new(0),
            capped: AtomicBool::new(false),
            breaker: cfg.breaker,
            attempts: cfg.attempts,
            health_check: cfg.health_check.clone(),
            dial,
        }
    }

    fn usable(&self, i: usize, now: u64, tried: &[usize], ignore_breakers: bool) -> bool {
        let b = &self.members[i].backend;
        !tried.contains(&i)
            && b.is_healthy()
            && (ignore_breakers || b.breaker.admits(&self.breaker, now))
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

    /// Picks a member, skipping unhealthy backends, open breakers (unless too many are open)
    /// and those in `tried` (earlier attempts of this request): a retry never goes back to a
    /// backend that already failed this request (as nginx), so `attempts = 2` with one backend
    /// does not double the wait for a timed-out answer.
    pub fn pick(&self, now: u64, tried: &[usize]) -> Result<Pick, Refusal> {
        let ignore = self.over_ejection_cap(now);
        // Checking first bounds an outage's cost: with every member unusable the round-robin
        // walk below would otherwise step through the whole weighted sequence per request.
        if !(0..self.members.len()).any(|i| self.usable(i, now, tried, ignore)) {
            return Err(self.why_none());
        }
        self.pick_among(now, tried, ignore)
            .map(|index| Pick {
                index,
                breaker_overridden: ignore
                    && !self.members[index]
                        .backend
                        .breaker
                        .admits(&self.breaker, now),
            })
            .ok_or_else(|| self.why_none())
    }

    fn pick_among(&self, now: u64, tried: &[usize], ignore: bool) -> Option<usize> {
        let n = self.members.len();
        match self.strategy {
            StrategyKind::RoundRobin => {
                // Each skipped entry takes a cursor step of its own, so the order is the
                // sequence with unusable members left out: a down backend's share is spread over
                // the others by weight, not all handed to its successor in the sequence. The
                // walk is bounded (heavy members recur within a few steps in a smooth
                // sequence); past it, the first usable member in list order from the cursor.
                let len = self.sequence.len();
                let steps = len.min(4 * n + 4);
                let walked = (0..steps).find_map(|_| {
                    let k = self.cursor.fetch_add(1, Relaxed);
                    let i = self.sequence[k % len] as usize;
                    self.usable(i, now, tried, ignore).then_some(i)
                });
                walked.or_else(|| {
                    let start = self.cursor.load(Relaxed);
                    (0..n)
                        .map(|k| start.wrapping_add(k) % n)
                        .find(|&i| self.usable(i, now, tried, ignore))
                })
            }
            StrategyKind::LeastConnections => {
                // Scanning from a rotating start breaks ties in turn, so no backend wins every
                // tie because of where it sits in the list.
                let start = self.cursor.fetch_add(1, Relaxed);
                let mut best: Option<(usize, usize, u32)> = None;
                for k in 0..n {
                    let i = (start.wrapping_add(k)) % n;
                    if !self.usable(i, now, tried, ignore) {
                        continue;
                    }
                    let m = &self.members[i];
                    let load = m.backend.in_flight.load(Relaxed);
                    let better = match best {
                        None => true,
                        // load/weight < best_load/best_weight, without division.
                        Some((_, bl, bw)) => {
                            (load as u128) * (bw as u128) < (bl as u128) * (m.weight as u128)
                        }
                    };
                    if better {
                        best = Some((i, load, m.weight));
                    }
                }
                best.map(|(i, _, _)| i)
            }
        }
    }

    fn why_none(&self) -> Refusal {
        if self.members.is_empty() {
            Refusal::NoBackendsConfigured
        } else if self.members.iter().all(|m| !m.backend.is_healthy()) {
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
    }
}
