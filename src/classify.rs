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
//! failure and never relayed.

use http::header;
use http::StatusCode;

use crate::backend::Outcome;
use crate::config::BreakerPolicy;
use crate::headers::has_token;
use crate::reason::{Failure, Note, Reason};
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
                };
            }
            let outcome = if cx
                .policy
                .failure_statuses
                .contains(sent.response.status().as_u16())
            {
                Outcome::Failure(Failure::UpstreamStatus)
            } else {
                Outcome::Success
            };
            Verdict {
                outcome,
                next: Next::Respond,
                note,
            }
        }
        Err(SendError::NotSent { failure, .. }) => Verdict {
            outcome: Outcome::Failure(*failure),
            next: Next::Retry { free: false },
            note: None,
        },
        Err(SendError::Failed {
            cause: Cause::Client(_),
            ..
        }) => Verdict {
            outcome: Outcome::Neutral,
            next: Next::Fail,
            note: None,
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
                }
            }
        }
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
