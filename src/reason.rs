//! Reason codes: the short words an operator greps for in the access log, metric labels and
//! `/status`.
//!
//! They are split by boundary, because each boundary has different consequences: a
//! [`Refusal`] is the balancer answering by itself without a backend's fault, a [`Failure`]
//! is a backend's fault and feeds its breaker, a [`ClientEvent`] is the client's doing and
//! never counts against a backend, and a [`Note`] marks a request that succeeded after
//! something was worked around. [`Reason`] joins them for the one `reason` field.

/// Why the balancer answered a request itself, before or instead of any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    NoRoute,
    NoBackendsConfigured,
    AllUnhealthy,
    AllBreakersOpen,
    /// Every backend the pool would use is out of rotation by operator intent: drained,
    /// disabled or weighted 0 (in the file or through the admin API).
    AllDrained,
    BadRequest,
    MethodNotAllowed,
    HeadersTooLarge,
    BodyTooLarge,
    UnsupportedTransferCoding,
}

/// Why an attempt at a backend failed. Every one of these is the backend's (or the path to
/// it's) fault, so it is recorded against that backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    ConnectRefused,
    ConnectTimeout,
    ConnectError,
    TlsError,
    /// A pool with `protocol = "h2"`: the backend's TLS did not select ALPN `h2`.
    UpstreamAlpnMismatch,
    ResponseTimeout,
    UpstreamReset,
    /// The backend answered with a status its pool's `failure_statuses` lists.
    UpstreamStatus,
    /// The backend broke HTTP: ambiguous framing, a switch of protocols nobody asked for.
    UpstreamProtocol,
    /// The backend ended a gRPC call with a `grpc-status` that says it cannot serve
    /// (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL): gRPC's `failure_statuses`.
    UpstreamGrpcStatus,
}

/// What the client did that ended its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientEvent {
    /// Went away (closed, reset, half-closed) before its response was complete.
    ClientClosed,
    /// Stopped sending its request body for longer than `limits.header_timeout`.
    BodyTimeout,
    /// Stopped reading its response (a blocked write, or an h2 window never opened), so the
    /// balancer reset the stream or closed the connection.
    ClientStalled,
    /// The deadline the client set in `grpc-timeout` passed before the backend answered:
    /// the client's choice of wait, not the backend's fault.
    GrpcDeadline,
}

/// A request that was answered despite something the balancer worked around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Note {
    /// A pooled connection the backend had closed was replaced by a fresh one.
    StaleConnectionRetried,
    /// Sent to a backend whose breaker is open, because open breakers already take out more
    /// than the pool's `max_ejected_percent`.
    EjectionCapped,
    /// An HTTP/2 backend's GOAWAY said the stream was not processed; sent again on another
    /// connection.
    GoawayRetried,
    /// An HTTP/2 backend refused the stream (REFUSED_STREAM) before processing it; sent again.
    RefusedStreamRetried,
}

/// Any reason code, for the one `reason` field of a log line or metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Refused(Refusal),
    Failed(Failure),
    Client(ClientEvent),
    Note(Note),
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::NoRoute,
        Refusal::NoBackendsConfigured,
        Refusal::AllUnhealthy,
        Refusal::AllBreakersOpen,
        Refusal::AllDrained,
        Refusal::BadRequest,
        Refusal::MethodNotAllowed,
        Refusal::HeadersTooLarge,
        Refusal::BodyTooLarge,
        Refusal::UnsupportedTransferCoding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::NoBackendsConfigured => "no_backends_configured",
            Refusal::AllUnhealthy => "all_unhealthy",
            Refusal::AllBreakersOpen => "all_breakers_open",
            Refusal::AllDrained => "all_drained",
            Refusal::BadRequest => "bad_request",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::UnsupportedTransferCoding => "unsupported_transfer_coding",
        }
    }
}

impl Failure {
    pub const ALL: [Failure; 10] = [
        Failure::ConnectRefused,
        Failure::ConnectTimeout,
        Failure::ConnectError,
        Failure::TlsError,
        Failure::UpstreamAlpnMismatch,
        Failure::ResponseTimeout,
        Failure::UpstreamReset,
        Failure::UpstreamStatus,
        Failure::UpstreamProtocol,
        Failure::UpstreamGrpcStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::ConnectRefused => "connect_refused",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::ConnectError => "connect_error",
            Failure::TlsError => "tls_error",
            Failure::UpstreamAlpnMismatch => "upstream_alpn_mismatch",
            Failure::ResponseTimeout => "response_timeout",
            Failure::UpstreamReset => "upstream_reset",
            Failure::UpstreamStatus => "upstream_5xx",
            Failure::UpstreamProtocol => "upstream_protocol_error",
            Failure::UpstreamGrpcStatus => "upstream_grpc_error",
        }
    }

    /// Dense index for per-backend counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(i: usize) -> Option<Failure> {
        Failure::ALL.get(i).copied()
    }

    /// Whether the request never reached the backend, so it may go elsewhere whatever its
    /// method.
    pub fn before_sending(self) -> bool {
        match self {
            Failure::ConnectRefused
            | Failure::ConnectTimeout
            | Failure::ConnectError
            | Failure::TlsError
            | Failure::UpstreamAlpnMismatch => true,
            Failure::ResponseTimeout
            | Failure::UpstreamReset
            | Failure::UpstreamStatus
            | Failure::UpstreamProtocol
            | Failure::UpstreamGrpcStatus => false,
        }
    }
}

impl ClientEvent {
    pub const ALL: [ClientEvent; 4] = [
        ClientEvent::ClientClosed,
        ClientEvent::BodyTimeout,
        ClientEvent::ClientStalled,
        ClientEvent::GrpcDeadline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientEvent::ClientClosed => "client_closed",
            ClientEvent::BodyTimeout => "body_timeout",
            ClientEvent::ClientStalled => "client_stalled",
            ClientEvent::GrpcDeadline => "grpc_deadline_exceeded",
        }
    }
}

impl Note {
    pub const ALL: [Note; 4] = [
        Note::StaleConnectionRetried,
        Note::EjectionCapped,
        Note::GoawayRetried,
        Note::RefusedStreamRetried,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Note::StaleConnectionRetried => "stale_connection_retried",
            Note::EjectionCapped => "ejection_capped",
            Note::GoawayRetried => "upstream_goaway_retried",
            Note::RefusedStreamRetried => "refused_stream_retried",
        }
    }
}

/// Number of distinct reason codes: the length of arrays indexed by [`Reason::index`].
pub const REASON_SLOTS: usize =
    Refusal::ALL.len() + Failure::ALL.len() + ClientEvent::ALL.len() + Note::ALL.len();

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Refused(r) => r.as_str(),
            Reason::Failed(f) => f.as_str(),
            Reason::Client(c) => c.as_str(),
            Reason::Note(n) => n.as_str(),
        }
    }

    /// Dense index below [`REASON_SLOTS`], for counter arrays.
    pub fn index(self) -> usize {
        const F: usize = Refusal::ALL.len();
        const C: usize = F + Failure::ALL.len();
        const N: usize = C + ClientEvent::ALL.len();
        match self {
            Reason::Refused(r) => r as usize,
            Reason::Failed(f) => F + f as usize,
            Reason::Client(c) => C + c as usize,
            Reason::Note(n) => N + n as usize,
        }
    }

    /// Every reason code, in index order.
    pub fn all() -> impl Iterator<Item = Reason> {
        Refusal::ALL
            .into_iter()
            .map(Reason::Refused)
            .chain(Failure::ALL.into_iter().map(Reason::Failed))
            .chain(ClientEvent::ALL.into_iter().map(Reason::Client))
            .chain(Note::ALL.into_iter().map(Reason::Note))
    }
}

impl From<Refusal> for Reason {
    fn from(r: Refusal) -> Reason {
        Reason::Refused(r)
    }
}

impl From<Failure> for Reason {
    fn from(f: Failure) -> Reason {
        Reason::Failed(f)
    }
}

impl From<ClientEvent> for Reason {
    fn from(c: ClientEvent) -> Reason {
        Reason::Client(c)
    }
}

impl From<Note> for Reason {
    fn from(n: Note) -> Reason {
        Reason::Note(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        let all: Vec<Reason> = Reason::all().collect();
        assert_eq!(all.len(), REASON_SLOTS);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i, "{}", r.as_str());
        }
        let mut names: Vec<&str> = all.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REASON_SLOTS);
        for (i, f) in Failure::ALL.iter().enumerate() {
            assert_eq!(Failure::from_index(i), Some(*f));
        }
    }
}
