//! One attempt's result, classified once: what it says about the backend (`Outcome`, which
//! feeds breaker, counters, metrics and the log through one `record` call) and what the
//! request does next (`Next`). `RetryBudget` then decides whether a retry may happen and
//! keeps the backends this request already tried.
//!
//! The rules, in one place: a request that never reached the backend may go elsewhere,
//! whatever its method; one that reached it and failed is retried only when it can be
//! replayed (idempotent, no body); a pooled connection the backend had just closed is our
//! race, not its sickness, and is replayed once for free (as are h2 streams the backend said it
//! did not process, which `upstream` sends again within the attempt and reports in
//! `Sent::resent`, noted here); an answer is relayed, never
//! retried, even one the pool counts as a failure; a response with broken framing is a
//! failure and never relayed. A gRPC answer is judged by its `grpc-status`
//! ([`classify_grpc_status`]): at once when it comes with the headers, else when the body's
//! trailers bring it; a client's gRPC deadline running out says nothing about the backend.

use http::header;
use http::StatusCode;

use crate::backend::Outcome;
use crate::config::BreakerPolicy;
use crate::grpc;
use crate::headers::has_token;
use crate::reason::{ClientEvent, Failure, Note, Reason};
use crate::upstream::{Cause, SendError, Sent};

/// What the request does after this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Relay the backend's answer.
    Respond,
    /// Try again; `free` when the attempt does not count (a stale pooled connection).
    Retry { free: bool },
    /// Give up with this attempt's error.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub next: Next,
    /// Something worth a reason code although the request goes on.
    pub note: Option<Reason>,
    /// A gRPC response whose `grpc-status` comes in the trailers: `outcome` only says the
    /// headers were fine, and the body's end settles the attempt with
    /// [`classify_grpc_status`].
    pub awaits_grpc_status: bool,
}

/// What `classify` needs to know about the request.
pub struct Context<'a> {
    /// Bodiless and idempotent: may be sent again after reaching a backend.
    pub replayable: bool,
    /// The free replay after a stale pooled connection is still unused.
    pub free_replay_left: bool,
    /// The client asked for a WebSocket upgrade, so a `101` is expected.
    pub upgrade: bool,
    pub policy: &'a BreakerPolicy,
}

/// The one classification of an attempt.
pub fn classify(result: &Result<Sent, SendError>, cx: &Context<'_>) -> Verdict {
    match result {
        Ok(sent) => {
            let note = sent
                .stale_retried
                .then_some(Note::StaleConnectionRetried)
                .or(sent.resent)
                .map(Reason::Note);
            if let Some(failure) = broken_response(sent, cx.upgrade) {
                return Verdict {
                    outcome: Outcome::Failure(failure),
                    next: Next::Fail,
                    note,
                    awaits_grpc_status: false,
                };
            }
            let r = &sent.response;
            let grpc = grpc::is_grpc(r.headers());
            let trailers_only = grpc::status_in(r.headers());
            let outcome = if cx.policy.failure_statuses.contains(r.status().as_u16()) {
                Outcome::Failure(Failure::UpstreamStatus)
            } else if let (true, Some(code)) = (grpc, trailers_only) {
                classify_grpc_status(code)
            } else {
                Outcome::Success
            };
            Verdict {
                outcome,
                next: Next::Respond,
                note,
                awaits_grpc_status: grpc && trailers_only.is_none() && outcome == Outcome::Success,
            }
        }
        Err(SendError::NotSent { failure, .. }) => Verdict {
            outcome: Outcome::Failure(*failure),
            next: Next::Retry { free: false },
            note: None,
            awaits_grpc_status: false,
        },
        Err(SendError::Failed {
            cause: Cause::Client(_),
            ..
        }) => Verdict {
            outcome: Outcome::Neutral,
            next: Next::Fail,
            note: None,
            awaits_grpc_status: false,
        },
        Err(SendError::Failed {
            cause: Cause::Backend(failure),
            stale,
            ..
        }) => {
            if *stale && cx.replayable && cx.free_replay_left {
                Verdict {
                    outcome: Outcome::Neutral,
                    next: Next::Retry { free: true },
                    note: Some(Reason::Note(Note::StaleConnectionRetried)),
                    awaits_grpc_status: false,
                }
            } else {
                Verdict {
                    outcome: Outcome::Failure(*failure),
                    next: if cx.replayable {
                        Next::Retry { free: false }
                    } else {
                        Next::Fail
                    },
                    note: None,
                    awaits_grpc_status: false,
                }
            }
        }
    }
}

/// The client's `grpc-timeout` ran out before the backend answered: the client chose that
/// wait, and a backend that needed longer is not sick for it (the pool's own
/// `timeouts.response` still is what counts against it). Not retried: the deadline is gone.
pub const GRPC_DEADLINE_PASSED: Verdict = Verdict {
    outcome: Outcome::Neutral,
    next: Next::Fail,
    note: Some(Reason::Client(ClientEvent::GrpcDeadline)),
    awaits_grpc_status: false,
};

/// What a backend's `grpc-status` says about the backend: UNAVAILABLE (14), DEADLINE_EXCEEDED
/// (4) and INTERNAL (13) are the codes a sick or overloaded server answers with, the gRPC
/// counterpart of 502/503/504; every other code, an application's answer (NOT_FOUND,
/// INVALID_ARGUMENT, ...), is a success for the breaker. A gRPC response that ended without
/// any status (`None`) is not held against the backend either.
pub fn classify_grpc_status(code: Option<u32>) -> Outcome {
    match code {
        Some(4 | 13 | 14) => Outcome::Failure(Failure::UpstreamGrpcStatus),
        _ => Outcome::Success,
    }
}

/// A response that must not reach the client: both `Content-Length` and `Transfer-Encoding`
/// (the length would be relayed with a chunked body: a truncated body for HTTP/1.1, a
/// PROTOCOL_ERROR for h2), or a `101` nobody asked for.
fn broken_response(sent: &Sent, upgrade: bool) -> Option<Failure> {
    let h = sent.response.headers();
    if h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING) {
        return Some(Failure::UpstreamProtocol);
    }
    if sent.response.status() == StatusCode::SWITCHING_PROTOCOLS
        && !(upgrade && has_token(h, header::UPGRADE, "websocket"))
    {
        return Some(Failure::UpstreamProtocol);
    }
    None
}

/// A request's attempts: how many are left, which backends it already tried, and whether the
/// free stale-connection replay was used.
pub struct RetryBudget {
    left: u32,
    tried: Vec<usize>,
    free_left: bool,
    spent: u32,
}

impl RetryBudget {
    pub fn new(attempts: u32) -> RetryBudget {
        RetryBudget {
            left: attempts,
            tried: Vec::new(),
            free_left: true,
            spent: 0,
        }
    }

    /// Members this request must not go back to.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// Attempts made so far (for the log).
    pub fn spent(&self) -> u32 {
        self.spent
    }

    pub fn free_replay_left(&self) -> bool {
        self.free_left
    }

    /// An attempt starts on `member`.
    pub fn spend(&mut self) {
        self.left = self.left.saturating_sub(1);
        self.spent += 1;
    }

    /// `member` refused before any attempt (its breaker flipped after the pick): look
    /// elsewhere without spending anything.
    pub fn skip(&mut self, member: usize) {
        self.tried.push(member);
    }

    /// Whether the attempt on `member` that ended in `next` may be followed by another.
    pub fn allows(&mut self, member: usize, next: Next) -> bool {
        match next {
            Next::Retry { free: true } if self.free_left => {
                // Same backend, fresh connection, and the attempt is handed back.
                self.free_left = false;
                self.left += 1;
                self.spent = self.spent.saturating_sub(1);
                true
            }
            Next::Retry { .. } => {
                self.tried.push(member);
                self.left > 0
            }
            Next::Respond | Next::Fail => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_that_mean_a_sick_backend() {
        for code in [4, 13, 14] {
            assert_eq!(
                classify_grpc_status(Some(code)),
                Outcome::Failure(Failure::UpstreamGrpcStatus),
                "{code}"
            );
        }
        for code in [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 99] {
            assert_eq!(classify_grpc_status(Some(code)), Outcome::Success, "{code}");
        }
        assert_eq!(classify_grpc_status(None), Outcome::Success);
    }

    #[test]
    fn budget_counts_attempts_and_one_free_replay() {
        let mut b = RetryBudget::new(2);
        b.spend();
        assert!(b.allows(0, Next::Retry { free: true }));
        assert_eq!(b.tried(), &[] as &[usize]);
        b.spend();
        assert!(b.allows(0, Next::Retry { free: false }));
        assert_eq!(b.tried(), &[0]);
        b.spend();
        assert!(!b.allows(1, Next::Retry { free: false }));
        assert!(!b.free_replay_left());
        assert_eq!(b.spent(), 2);
    }
}
