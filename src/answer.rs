//! What the client sees when the balancer answers a request itself.
//!
//! `ProxyError` is the one error type of the request path. `ProxyError::answer` is the one
//! place that decides, for each error, the status on the wire, the status in the access log,
//! whether the connection closes, the log's `outcome`, the reason code and the body text. It
//! is an exhaustive `match`: a new error cannot be added without deciding all of them.
//!
//! A gRPC client cannot read a plain-text 503: to a gRPC request (`content-type:
//! application/grpc...`) the same answer goes out as gRPC's "trailers-only" response, HTTP 200
//! with the `grpc-status` chosen in the same `match` and the reason code as `grpc-message`, in
//! one HEADERS frame that ends the stream.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::accesslog::{Ending, LogEntry};
use crate::grpc::{self, Code, CODE_SLOTS};
use crate::reason::{ClientEvent, Failure, Reason, Refusal, REASON_SLOTS};
use crate::response_body::ResponseBody;
use crate::upstream::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches")]
    NoRoute,
    #[error("no backend available: {}", .0.as_str())]
    NoBackend(Refusal),
    #[error("upstream attempt failed: {}", .failure.as_str())]
    Upstream {
        failure: Failure,
        #[source]
        source: BoxError,
    },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("request headers exceed limits")]
    HeadersTooLarge,
    #[error("request body exceeds limits.max_body_bytes")]
    BodyTooLarge,
    #[error("transfer coding not implemented: {0}")]
    UnsupportedTransferCoding(&'static str),
    #[error("client stopped sending its request body")]
    BodyTimeout,
    #[error("client went away")]
    ClientClosed,
    #[error("the client's grpc-timeout passed before the backend answered")]
    GrpcDeadline,
}

/// Everything the client and the log get from one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// What goes on the wire.
    pub status: StatusCode,
    /// What the access log records (differs only for a client that left: nginx's 499).
    pub logged: u16,
    /// Whether the connection closes after the answer: anything after a request whose body
    /// we did not read (or a refused CONNECT) could be misparsed as a request.
    pub close: bool,
    pub ending: Ending,
    pub reason: Reason,
    pub text: &'static str,
    /// The same answer to a gRPC request.
    pub grpc: Code,
}

impl Answer {
    fn new(
        status: StatusCode,
        grpc: Code,
        reason: impl Into<Reason>,
        ending: Ending,
        close: bool,
    ) -> Answer {
        Answer {
            status,
            logged: status.as_u16(),
            close,
            ending,
            reason: reason.into(),
            text: text_for(status),
            grpc,
        }
    }
}

impl ProxyError {
    /// The one mapping from an error to what the client sees.
    pub fn answer(&self) -> Answer {
        match self {
            ProxyError::NoRoute => Answer::new(
                StatusCode::NOT_FOUND,
                Code::Unimplemented,
                Refusal::NoRoute,
                Ending::Local,
                false,
            ),
            ProxyError::NoBackend(r) => Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                *r,
                Ending::Local,
                false,
            ),
            ProxyError::Upstream { failure, .. } => {
                // Only a backend that accepted the request and then took too long is a 504; one
                // that could not be reached, or broke the exchange, is a 502.
                // gRPC clients map 502 to UNAVAILABLE and 504 to DEADLINE_EXCEEDED themselves
                // (gRPC's http-grpc-status-mapping): the same codes.
                let (status, grpc) = match failure {
                    Failure::ResponseTimeout => {
                        (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded)
                    }
                    Failure::ConnectRefused
                    | Failure::ConnectTimeout
                    | Failure::ConnectError
                    | Failure::TlsError
                    | Failure::UpstreamAlpnMismatch
                    | Failure::UpstreamReset
                    | Failure::UpstreamStatus
                    | Failure::UpstreamProtocol
                    | Failure::UpstreamGrpcStatus => (StatusCode::BAD_GATEWAY, Code::Unavailable),
                };
                Answer::new(status, grpc, *failure, Ending::Failed, false)
            }
            ProxyError::BadRequest(_) => Answer::new(
                StatusCode::BAD_REQUEST,
                Code::Internal,
                Refusal::BadRequest,
                Ending::Local,
                true,
            ),
            ProxyError::MethodNotAllowed(_) => Answer::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                Refusal::MethodNotAllowed,
                Ending::Local,
                true,
            ),
            ProxyError::HeadersTooLarge => Answer::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Code::ResourceExhausted,
                Refusal::HeadersTooLarge,
                Ending::Local,
                false,
            ),
            ProxyError::BodyTooLarge => Answer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::ResourceExhausted,
                Refusal::BodyTooLarge,
                Ending::Local,
                true,
            ),
            ProxyError::UnsupportedTransferCoding(_) => Answer::new(
                StatusCode::NOT_IMPLEMENTED,
                Code::Internal,
                Refusal::UnsupportedTransferCoding,
                Ending::Local,
                true,
            ),
            ProxyError::BodyTimeout => Answer::new(
                StatusCode::REQUEST_TIMEOUT,
                Code::Cancelled,
                ClientEvent::BodyTimeout,
                Ending::Local,
                true,
            ),
            // A client that half-closed mid-body may still be reading: it gets a standard 400
            // for its incomplete request, and the log says 499 (nginx's "client closed").
            ProxyError::ClientClosed => Answer {
                logged: 499,
                ..Answer::new(
                    StatusCode::BAD_REQUEST,
                    Code::Cancelled,
                    ClientEvent::ClientClosed,
                    Ending::ClientClosed,
                    true,
                )
            },
            ProxyError::GrpcDeadline => Answer::new(
                StatusCode::GATEWAY_TIMEOUT,
                Code::DeadlineExceeded,
                ClientEvent::GrpcDeadline,
                Ending::Failed,
                false,
            ),
        }
    }
}

/// Short plain-text bodies: enough for a human with curl, nothing about our internals.
fn text_for(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 => "400 Bad Request\n",
        404 => "404 Not Found\n",
        405 => "405 Method Not Allowed\n",
        408 => "408 Request Timeout\n",
        413 => "413 Payload Too Large\n",
        431 => "431 Request Header Fields Too Large\n",
        501 => "501 Not Implemented\n",
        502 => "502 Bad Gateway\n",
        503 => "503 Service Unavailable\n",
        504 => "504 Gateway Timeout\n",
        _ => "error\n",
    }
}

/// Answers the balancer made itself, by `Reason::index`, for `/metrics`.
pub static LOCAL_RESPONSES: [AtomicU64; REASON_SLOTS] = [const { AtomicU64::new(0) }; REASON_SLOTS];

/// The balancer's own answers to gRPC requests, by `grpc::code_slot`, for `/metrics`.
pub static LOCAL_GRPC: [AtomicU64; CODE_SLOTS] = [const { AtomicU64::new(0) }; CODE_SLOTS];

/// Builds the response for `a`, counts it, and completes the log entry. `grpc`: the request
/// was a gRPC call, so the answer is a trailers-only gRPC response.
pub fn respond(a: &Answer, log: Option<Box<LogEntry>>, grpc: bool) -> Response<ResponseBody> {
    if let Some(c) = LOCAL_RESPONSES.get(a.reason.index()) {
        c.fetch_add(1, Relaxed);
    }
    let mut log = log;
    if let Some(l) = log.as_deref_mut() {
        l.status = a.logged;
        l.reason = Some(a.reason);
        l.outcome = a.ending;
    }
    if grpc {
        return respond_grpc(a, log);
    }
    let mut r = Response::new(ResponseBody::local(a.text, log));
    *r.status_mut() = a.status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if a.close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// HTTP 200 and an empty body: hyper sends the headers with END_STREAM, which is what gRPC
/// calls a trailers-only response. The log says 200 (499 stays for a client that left) and
/// the code.
fn respond_grpc(a: &Answer, mut log: Option<Box<LogEntry>>) -> Response<ResponseBody> {
    let code = a.grpc.as_u32();
    if let Some(c) = LOCAL_GRPC.get(grpc::code_slot(Some(code))) {
        c.fetch_add(1, Relaxed);
    }
    if let Some(l) = log.as_deref_mut() {
        if l.status != 499 {
            l.status = 200;
        }
        l.grpc_status = Some(code);
    }
    let mut r = Response::new(ResponseBody::empty_logged(log));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(grpc::GRPC_STATUS, a.grpc.header_value());
    h.insert(
        grpc::GRPC_MESSAGE,
        HeaderValue::from_static(a.reason.as_str()),
    );
    if a.close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_own_text_and_a_client_error_or_gateway_status() {
        let all = [
            ProxyError::NoRoute,
            ProxyError::NoBackend(Refusal::AllUnhealthy),
            ProxyError::Upstream {
                failure: Failure::ResponseTimeout,
                source: "t".into(),
            },
            ProxyError::Upstream {
                failure: Failure::ConnectRefused,
                source: "r".into(),
            },
            ProxyError::BadRequest("x"),
            ProxyError::MethodNotAllowed("x"),
            ProxyError::HeadersTooLarge,
            ProxyError::BodyTooLarge,
            ProxyError::UnsupportedTransferCoding("gzip"),
            ProxyError::BodyTimeout,
            ProxyError::ClientClosed,
            ProxyError::GrpcDeadline,
        ];
        for e in &all {
            let a = e.answer();
            assert_ne!(a.text, "error\n", "{e}");
            assert!(
                a.status.is_client_error() || a.status.is_server_error(),
                "{e}"
            );
        }
        assert_eq!(all[2].answer().status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(all[3].answer().status, StatusCode::BAD_GATEWAY);
        assert_eq!(all[10].answer().logged, 499);
        let codes: Vec<u32> = all.iter().map(|e| e.answer().grpc.as_u32()).collect();
        assert_eq!(codes, [12, 14, 4, 14, 13, 12, 8, 8, 13, 1, 1, 4]);
    }

    #[test]
    fn grpc_answers_are_trailers_only() {
        use http_body::Body as _;
        let a = ProxyError::NoBackend(Refusal::AllBreakersOpen).answer();
        let r = respond(&a, None, true);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(h[grpc::GRPC_STATUS], "14");
        assert_eq!(h[grpc::GRPC_MESSAGE], "all_breakers_open");
        assert!(r.body().is_end_stream(), "headers must end the stream");
        let plain = respond(&a, None, false);
        assert_eq!(plain.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!plain.headers().contains_key(grpc::GRPC_STATUS));
    }
}
