//! What we observed about one backend: health, breaker, in-flight count, counters, idle
//! upstream connections.
//!
//! One `Arc<Backend>` per (pool, address). The request path reads and bumps its atomics, the
//! health task writes `healthy`, the admin API reads everything and writes the operator's
//! `intent`; nobody takes a lock. A reload
//! hands the same `Arc` to the next snapshot when the pool and address survive, so all of this
//! carries over; a removed backend is freed when its last request's guard drops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admin_state::Intent;
use crate::breaker::{Admission, Breaker, BreakerState, Transition};
use crate::clock::{now_ms, unix_ms};
use crate::config::BreakerPolicy;
use crate::grpc::{code_slot, CODE_SLOTS};
use crate::h2pool::H2Conns;
use crate::idle::IdleConns;
use crate::reason::Failure;

/// The classification of one upstream attempt. Made in one place (`classify::classify`) and
/// recorded in one call (`InFlight::record`), so breaker, counters, metrics and the access log
/// always agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered, with a status its pool does not count as a failure.
    Success,
    /// The backend failed: connect error, timeout, reset, broken framing, or a status listed
    /// in the pool's `failure_statuses`.
    Failure(Failure),
    /// The attempt ended for a reason that says nothing about the backend (client went away).
    Neutral,
}

/// Upper bounds, in seconds, of the latency histogram's buckets (Prometheus' defaults).
pub const LATENCY_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
pub struct Counters {
    /// Attempts sent to this backend (a retried request counts once per backend tried).
    pub requests: AtomicU64,
    /// Attempts classified as failures.
    pub failures: AtomicU64,
    /// Responses by status class 1xx..5xx (index 0..4).
    pub status: [AtomicU64; 5],
    /// Failures by reason, indexed by `Failure::index`.
    pub failure_reasons: [AtomicU64; Failure::ALL.len()],
    /// TCP connections opened to the backend: with `requests`, shows upstream reuse.
    pub connections_opened: AtomicU64,
    /// Attempts let through its open breaker by the pool's ejection cap.
    pub ejection_overrides: AtomicU64,
    /// Non-cumulative counts per bucket of `LATENCY_BUCKETS`, plus one for +Inf.
    pub latency_buckets: [AtomicU64; 12],
    pub latency_sum_us: AtomicU64,
    pub latency_count: AtomicU64,
    /// gRPC responses by the backend's `grpc-status`, indexed by `grpc::code_slot`.
    pub grpc_codes: [AtomicU64; CODE_SLOTS],
}

#[derive(Debug)]
pub struct Backend {
    /// The pool it belongs to: with `address`, its identity (and in every log line about it).
    pub pool: Arc<str>,
    /// As written in the config; the identity under which the backend survives reloads.
    pub address: Arc<str>,
    pub addr: SocketAddr,
    /// Written only by the health task; true when the pool has no health check.
    pub healthy: AtomicBool,
    pub breaker: Breaker,
    pub in_flight: AtomicUsize,
    pub counters: Counters,
    /// Last failure: `Failure::index` + 1 (0: none) and wall-clock time (ms since epoch), for
    /// `/status`.
    last_error: AtomicU8,
    last_error_at: AtomicU64,
    pub idle: IdleConns,
    /// Multiplexed connections of an h2/h2c pool (shared: a dialling request holds it).
    pub h2: Arc<H2Conns>,
    /// What the operator asked for through the admin API (drain, disable, weight). Here rather
    /// than in the snapshot because it is runtime state that must survive reloads.
    pub intent: Intent,
}

impl Backend {
    pub fn new(pool: &str, address: &str, addr: SocketAddr) -> Backend {
        Backend {
            pool: Arc::from(pool),
            address: Arc::from(address),
            addr,
            healthy: AtomicBool::new(true),
            breaker: Breaker::default(),
            in_flight: AtomicUsize::new(0),
            counters: Counters::default(),
            last_error: AtomicU8::new(0),
            last_error_at: AtomicU64::new(0),
            idle: IdleConns::default(),
            h2: Arc::default(),
            intent: Intent::default(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// Starts an attempt: the breaker must let it through. The guard counts it in flight until
    /// it drops (it rides in the response body, so that is when the body ends).
    /// `breaker_overridden`: the pool's ejection cap lets the request through an open breaker
    /// (counted, so `/metrics` shows it).
    pub fn start(
        self: &Arc<Self>,
        policy: &BreakerPolicy,
        now: u64,
        breaker_overridden: bool,
    ) -> Option<InFlight> {
        let admission = if breaker_overridden {
            self.counters.ejection_overrides.fetch_add(1, Relaxed);
            Admission::Normal
        } else {
            let (admission, transition) = self.breaker.acquire(policy, now)?;
            self.log_transition(transition, None);
            admission
        };
        self.in_flight.fetch_add(1, Relaxed);
        Some(InFlight {
            backend: Arc::clone(self),
            admission: Some(admission),
        })
    }

    pub fn last_error(&self) -> Option<(Failure, SystemTime)> {
        let i = usize::from(self.last_error.load(Relaxed)).checked_sub(1)?;
        let r = Failure::from_index(i)?;
        let at = UNIX_EPOCH + Duration::from_millis(self.last_error_at.load(Relaxed));
        Some((r, at))
    }

    fn note_error(&self, reason: Failure) {
        self.last_error.store(reason.index() as u8 + 1, Relaxed);
        self.last_error_at.store(unix_ms(), Relaxed);
        if let Some(c) = self.counters.failure_reasons.get(reason.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Counts a gRPC response by the `grpc-status` the backend ended it with (`None`: none,
    /// or not a number).
    pub fn note_grpc_status(&self, code: Option<u32>) {
        if let Some(c) = self.counters.grpc_codes.get(code_slot(code)) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A failure noticed after the attempt was classified (a reset in the middle of a body):
    /// counted and shown, but the breaker already had its say on this attempt.
    pub fn note_late_failure(&self, reason: Failure) {
        self.counters.failures.fetch_add(1, Relaxed);
        self.note_error(reason);
    }

    fn observe_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let idx = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        let c = &self.counters;
        if let Some(b) = c.latency_buckets.get(idx) {
            b.fetch_add(1, Relaxed);
        }
        c.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
        c.latency_count.fetch_add(1, Relaxed);
    }

    fn log_transition(&self, t: Option<Transition>, reason: Option<Failure>) {
        if let Some(t) = t {
            let reason = reason.map(Failure::as_str).unwrap_or("-");
            match t.to {
                BreakerState::Open => {
                    tracing::warn!(pool = %self.pool, backend = %self.address, from = t.from.as_str(), reason, "circuit breaker opened")
                }
                _ => {
                    tracing::info!(pool = %self.pool, backend = %self.address, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker changed")
                }
            }
        }
    }
}

/// One attempt in flight on a backend. Dropping it decrements `in_flight`; a trial admission
/// that never got an outcome hands its half-open slot back.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    /// Taken by `record`, so an attempt feeds the breaker exactly once.
    admission: Option<Admission>,
}

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Records the attempt's outcome: counters, status class, latency, last error and breaker,
    /// all from the one classification. `status` is the backend's answer, if any.
    pub fn record(
        &mut self,
        outcome: Outcome,
        status: Option<u16>,
        elapsed: Duration,
        policy: &BreakerPolicy,
    ) {
        if self.admission.is_none() {
            return;
        }
        if outcome != Outcome::Neutral {
            if let Some(s) = status {
                self.record_answer(s, elapsed);
            } else {
                self.backend.counters.requests.fetch_add(1, Relaxed);
            }
        }
        self.settle(outcome, policy);
    }

    /// The first half of `record`, for an answer whose verdict comes later (a gRPC status in
    /// the trailers): the attempt, its status class and its latency count now, and the
    /// breaker's admission waits for `settle`.
    pub fn record_answer(&mut self, status: u16, elapsed: Duration) {
        let b = &*self.backend;
        let c = &b.counters;
        c.requests.fetch_add(1, Relaxed);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        if let Some(ctr) = c.status.get(class) {
            ctr.fetch_add(1, Relaxed);
        }
        b.observe_latency(elapsed);
    }

    /// The verdict on the attempt: failures, last error and breaker. Only the first call
    /// counts (the admission is taken), so an attempt feeds the breaker exactly once.
    pub fn settle(&mut self, outcome: Outcome, policy: &BreakerPolicy) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        let b = &*self.backend;
        let now = now_ms();
        match outcome {
            Outcome::Neutral => b.breaker.release(admission),
            Outcome::Success => {
                let t = b.breaker.on_success(admission, now);
                b.log_transition(t, None);
            }
            Outcome::Failure(reason) => {
                b.counters.failures.fetch_add(1, Relaxed);
                b.note_error(reason);
                let t = b.breaker.on_failure(admission, policy, now);
                b.log_transition(t, Some(reason));
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            self.backend.breaker.release(admission);
        }
        self.backend.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_settled_after_the_answer_counts_once() {
        let b = Arc::new(Backend::new(
            "p",
            "127.0.0.1:1",
            "127.0.0.1:1".parse().unwrap(),
        ));
        let policy = BreakerPolicy {
            consecutive_failures: 2,
            ..BreakerPolicy::default()
        };
        for i in 1..=2u64 {
            let mut g = b
                .start(&policy, now_ms(), false)
                .expect("closed breaker admits");
            g.record_answer(200, Duration::from_millis(1));
            assert_eq!(b.counters.requests.load(Relaxed), i);
            assert_eq!(b.breaker.state(), BreakerState::Closed, "not judged yet");
            g.settle(Outcome::Failure(Failure::UpstreamGrpcStatus), &policy);
            // A second verdict on the same attempt is ignored.
            g.settle(Outcome::Failure(Failure::UpstreamGrpcStatus), &policy);
            assert_eq!(b.counters.failures.load(Relaxed), i);
        }
        assert_eq!(b.breaker.state(), BreakerState::Open);
        assert_eq!(
            b.counters.status[1].load(Relaxed),
            2,
            "both answers were 2xx"
        );
        assert_eq!(
            b.last_error().map(|(f, _)| f),
            Some(Failure::UpstreamGrpcStatus)
        );
    }
}
