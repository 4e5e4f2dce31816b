//! The request path: from a client's request to a backend's response.
//!
//! `handle` is the outer shell (access log, error -> response); `forward` reads top to bottom
//! with one `?` per step: check the request, route it, pick a backend, send, classify, relay.
//! It loads the snapshot once and takes no lock. `ProxyError` is the one error type of this
//! path and `status` the one place that maps it to what the client sees.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};

use crate::accesslog::{self, LogEntry};
use crate::backend::{now_ms, Outcome, Reason};
use crate::body::{ResponseBody, UpBody};
use crate::state::{Shared, Snapshot};
use crate::upstream::{self, BoxError, SendError};

/// What the connection tells each of its requests. One per client connection, shared by its
/// requests through an `Arc`.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// Held by WebSocket tunnels, which outlive the HTTP connection they started on, so that
    /// graceful shutdown waits for them too.
    pub drain: Option<crate::listener::DrainGuard>,
    /// The peer's IP as a header value, built once per connection for X-Forwarded-For.
    pub peer_ip: HeaderValue,
    /// A client must make progress on its request body within this (limits.header_timeout).
    pub body_timeout: std::time::Duration,
    /// HTTP/1 requests seen on this connection, and the index of the first one that carried
    /// both Content-Length and Transfer-Encoding (`u64::MAX`: none), which `framing::Sniffer`
    /// finds because hyper drops the evidence.
    pub requests: AtomicU64,
    pub ambiguous_at: AtomicU64,
    /// Set once the connection became a WebSocket tunnel: from then on a shutdown of the
    /// socket is a real half-close that the peer must see.
    pub upgraded: std::sync::atomic::AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches")]
    NoRoute,
    #[error("no backend available: {}", .0.as_str())]
    NoBackend(Reason),
    #[error("upstream attempt failed: {}", .reason.as_str())]
    Upstream {
        reason: Reason,
        #[source]
        source: BoxError,
    },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("method not allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("request headers exceed limits.max_header_bytes")]
    HeadersTooLarge,
    #[error("request body exceeds limits.max_body_bytes")]
    BodyTooLarge,
    #[error("client stopped sending its request body")]
    BodyTimeout,
    #[error("client went away")]
    ClientClosed,
}

/// The one mapping from error to status.
pub fn status(e: &ProxyError) -> StatusCode {
    match e {
        ProxyError::NoRoute => StatusCode::NOT_FOUND,
        ProxyError::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
        ProxyError::Upstream { reason, .. } => match reason {
            // Only a backend that accepted the request and then took too long is a 504; one
            // that could not even be reached is a 502, whatever the reason.
            Reason::ResponseTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        },
        ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        // nginx's convention for "client closed request"; only ever seen in the access log.
        ProxyError::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
    }
}

impl ProxyError {
    pub fn reason(&self) -> Reason {
        match self {
            ProxyError::NoRoute => Reason::NoRoute,
            ProxyError::NoBackend(r) | ProxyError::Upstream { reason: r, .. } => *r,
            ProxyError::BadRequest(_) | ProxyError::MethodNotAllowed(_) => Reason::BadRequest,
            ProxyError::HeadersTooLarge => Reason::BadRequest,
            ProxyError::BodyTooLarge => Reason::BodyTooLarge,
            ProxyError::BodyTimeout => Reason::BodyTimeout,
            ProxyError::ClientClosed => Reason::ClientClosed,
        }
    }
}

/// Short plain-text bodies: enough for a human with curl, nothing about our internals.
fn error_text(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 => "400 Bad Request\n",
        404 => "404 Not Found\n",
        405 => "405 Method Not Allowed\n",
        408 => "408 Request Timeout\n",
        413 => "413 Payload Too Large\n",
        431 => "431 Request Header Fields Too Large\n",
        502 => "502 Bad Gateway\n",
        503 => "503 Service Unavailable\n",
        504 => "504 Gateway Timeout\n",
        _ => "error\n",
    }
}

pub fn local_response(
    s: StatusCode,
    log: Option<Box<LogEntry>>,
    close: bool,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::local(error_text(s), log));
    *r.status_mut() = s;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Answers the balancer made itself, by `Reason as usize`, for `/metrics`.
pub static LOCAL_RESPONSES: [AtomicU64; crate::backend::REASON_SLOTS] =
    [const { AtomicU64::new(0) }; crate::backend::REASON_SLOTS];

/// Writes the access-log entry if the request's future is dropped (client gone) before it
/// produced a response, so no request disappears from the log.
struct PendingLog(Option<Box<LogEntry>>);

impl Drop for PendingLog {
    fn drop(&mut self) {
        if let Some(mut l) = self.0.take() {
            l.status = 499;
            l.outcome = accesslog::Outcome::ClientClosed;
            l.reason.get_or_insert(Reason::ClientClosed);
            accesslog::write(l);
        }
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let snap = shared.snapshot.load_full();
    let mut log = PendingLog(snap.access_log.then(|| {
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        Box::new(LogEntry::new(
            conn.peer,
            req.method(),
            target,
            req.version(),
            start,
        ))
    }));
    match forward(&snap, &conn, req, &mut log.0).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            let s = status(&e);
            if let Some(c) = LOCAL_RESPONSES.get(e.reason() as usize) {
                c.fetch_add(1, Relaxed);
            }
            if let Some(l) = log.0.as_deref_mut() {
                l.status = s.as_u16();
                l.reason = Some(e.reason());
                l.outcome = match e {
                    ProxyError::Upstream { .. } => accesslog::Outcome::Failed,
                    ProxyError::ClientClosed => accesslog::Outcome::ClientClosed,
                    _ => accesslog::Outcome::Local,
                };
            }
            match &e {
                ProxyError::Upstream { source, .. } => {
                    tracing::warn!(peer = %conn.peer, error = %e, cause = %source, "answering {}", s.as_u16())
                }
                _ => tracing::debug!(peer = %conn.peer, error = %e, "answering {}", s.as_u16()),
            }
            // A request whose body we did not read leaves the connection out of sync.
            // A refused CONNECT likewise: what follows may be tunnel bytes sent optimistically.
            let close = matches!(
                e,
                ProxyError::BodyTooLarge
                    | ProxyError::BodyTimeout
                    | ProxyError::BadRequest(_)
                    | ProxyError::MethodNotAllowed(_)
                    | ProxyError::ClientClosed
            );
            // 499 is for the access log only: a client that half-closed mid-body may still be
            // reading, and gets a standard 400 for its incomplete request.
            let wire = if matches!(e, ProxyError::ClientClosed) {
                StatusCode::BAD_REQUEST
            } else {
                s
            };
            Ok(local_response(wire, log.0.take(), close))
        }
    }
}

const IDEMPOTENT: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::TRACE,
];

async fn forward(
    snap: &Snapshot,
    conn: &Arc<ConnInfo>,
    req: Request<Incoming>,
    log: &mut Option<Box<LogEntry>>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if req.version() != Version::HTTP_2 {
        let index = conn.requests.fetch_add(1, Relaxed);
        if conn.ambiguous_at.load(Relaxed) == index {
            return Err(ProxyError::BadRequest(
                "ambiguous framing or a fragment in the target",
            ));
        }
    }
    let (mut parts, body) = req.into_parts();
    check_request(snap, &parts)?;
    let authority = authority(&parts)?;
    let path = normalize_path(parts.uri.path());
    let pool = snap
        .route(authority.as_ref().and_then(|a| a.to_str().ok()), &path)
        .ok_or(ProxyError::NoRoute)?;
    if let Some(l) = log.as_deref_mut() {
        l.pool = Some(pool.name.clone());
    }

    let limit = snap.limits.max_body_bytes;
    if limit > 0 && declared_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    let bodiless = body.is_end_stream();
    let upstream_uri = upstream_uri(&parts.uri, &path)?;
    // A WebSocket handshake keeps its Upgrade through the proxy; any other Upgrade (h2c
    // included) is stripped as the hop-by-hop header it is.
    let upgrade = websocket_upgrade(&parts);
    let mut client_upgrade = match upgrade {
        Some(_) => parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        None => None,
    };
    rewrite_request_headers(&mut parts.headers, authority, conn);
    if let Some(proto) = &upgrade {
        parts.headers.insert(header::UPGRADE, proto.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let method = parts.method.clone();
    // A copy to replay only exists for requests that may be sent twice after reaching a
    // backend: bodiless and idempotent. Even with `attempts = 1` it serves the one free replay
    // after a stale pooled connection.
    let replay = (bodiless && IDEMPOTENT.contains(&method)).then(|| parts.headers.clone());
    let mut next = Some(build(
        &method,
        &upstream_uri,
        parts.headers,
        if bodiless {
            UpBody::Empty
        } else {
            UpBody::stream(
                body,
                if limit == 0 { u64::MAX } else { limit },
                conn.body_timeout,
            )
        },
    ));

    let mut tried: Vec<usize> = Vec::new();
    let mut attempts = 0u32;
    let mut last_err: Option<ProxyError> = None;
    let mut stale_retry_used = false;
    let mut note: Option<Reason> = None;
    // Each member is tried at most once per attempt budget; `refusals` bounds the loop when
    // breakers flip between pick and start.
    let mut refusals = 0usize;
    while attempts < pool.attempts {
        let Some(req) = next.take() else { break };
        let now = now_ms();
        let idx = match pool.pick(now, &tried) {
            Ok(i) => i,
            Err(reason) => return Err(last_err.unwrap_or(ProxyError::NoBackend(reason))),
        };
        let member = &pool.members[idx];
        let Some(mut guard) = member.backend.start(&pool.breaker, now) else {
            refusals += 1;
            tried.push(idx);
            next = Some(req);
            if refusals > pool.members.len() {
                return Err(last_err.unwrap_or(ProxyError::NoBackend(Reason::AllBreakersOpen)));
            }
            continue;
        };
        attempts += 1;
        if let Some(l) = log.as_deref_mut() {
            l.backend = Some(member.backend.clone());
            l.attempts = attempts;
        }
        let sent_at = Instant::now();
        match upstream::send(&member.backend, pool, req).await {
            Ok(sent) => {
                let status = sent.response.status();
                let outcome = if status.is_server_error() {
                    Outcome::Failure(Reason::Upstream5xx)
                } else {
                    Outcome::Success
                };
                guard.record(
                    outcome,
                    Some(status.as_u16()),
                    sent_at.elapsed(),
                    &pool.breaker,
                );
                if sent.stale_retried {
                    note = Some(Reason::StaleConnectionRetried);
                }
                if let Some(l) = log.as_deref_mut() {
                    l.status = status.as_u16();
                    l.reason = match outcome {
                        Outcome::Failure(r) => Some(r),
                        _ => note,
                    };
                    if attempts > 1 || note.is_some() {
                        l.outcome = accesslog::Outcome::Retried;
                    }
                }
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return match (&upgrade, client_upgrade.take()) {
                        (Some(_), Some(on_client))
                            if answers_websocket(sent.response.headers()) =>
                        {
                            Ok(tunnel(sent.response, on_client, guard, log.take(), conn))
                        }
                        _ => Err(ProxyError::Upstream {
                            reason: Reason::UpstreamProtocol,
                            source: "backend switched protocols without a matching upgrade".into(),
                        }),
                    };
                }
                let mut resp = relay(sent.response, sent.conn, guard, log.take());
                if upgrade.is_some() {
                    // The client asked to switch protocols and was refused: bytes it sends next
                    // may be WebSocket frames, never a request to parse. Close after this answer.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                return Ok(resp);
            }
            Err(SendError::NotSent {
                req,
                reason,
                source,
            }) => {
                // Never reached the backend: safe to send anywhere, whatever the method.
                guard.record(
                    Outcome::Failure(reason),
                    None,
                    sent_at.elapsed(),
                    &pool.breaker,
                );
                tracing::debug!(backend = %member.backend.address, reason = reason.as_str(), error = %source, "attempt failed before sending");
                note = Some(reason);
                tried.push(idx);
                next = Some(req);
                last_err = Some(ProxyError::Upstream { reason, source });
            }
            Err(SendError::Failed {
                reason,
                source,
                stale,
            }) => {
                match reason {
                    Reason::BodyTooLarge => {
                        guard.record(Outcome::Neutral, None, sent_at.elapsed(), &pool.breaker);
                        return Err(ProxyError::BodyTooLarge);
                    }
                    Reason::ClientClosed => {
                        guard.record(Outcome::Neutral, None, sent_at.elapsed(), &pool.breaker);
                        return Err(ProxyError::ClientClosed);
                    }
                    Reason::BodyTimeout => {
                        guard.record(Outcome::Neutral, None, sent_at.elapsed(), &pool.breaker);
                        return Err(ProxyError::BodyTimeout);
                    }
                    Reason::BadRequest => {
                        guard.record(Outcome::Neutral, None, sent_at.elapsed(), &pool.breaker);
                        return Err(ProxyError::BadRequest("malformed request body"));
                    }
                    _ => {}
                }
                let Some(headers) = replay.as_ref() else {
                    guard.record(
                        Outcome::Failure(reason),
                        None,
                        sent_at.elapsed(),
                        &pool.breaker,
                    );
                    return Err(ProxyError::Upstream { reason, source });
                };
                if stale && !stale_retry_used {
                    // The backend closed a pooled connection as we reused it: our race, not its
                    // sickness. Replay once on a fresh connection without spending an attempt.
                    guard.record(Outcome::Neutral, None, sent_at.elapsed(), &pool.breaker);
                    stale_retry_used = true;
                    attempts -= 1;
                    note = Some(Reason::StaleConnectionRetried);
                } else {
                    guard.record(
                        Outcome::Failure(reason),
                        None,
                        sent_at.elapsed(),
                        &pool.breaker,
                    );
                    tried.push(idx);
                    note = Some(reason);
                }
                next = Some(build(
                    &method,
                    &upstream_uri,
                    headers.clone(),
                    UpBody::Empty,
                ));
                last_err = Some(ProxyError::Upstream { reason, source });
            }
        }
    }
    Err(last_err.unwrap_or(ProxyError::NoBackend(Reason::AllBreakersOpen)))
}

fn build(method: &Method, uri: &Uri, headers: HeaderMap, body: UpBody) -> Request<UpBody> {
    let mut r = Request::new(body);
    *r.method_mut() = method.clone();
    *r.uri_mut() = uri.clone();
    *r.version_mut() = Version::HTTP_11;
    *r.headers_mut() = headers;
    r
}

/// The same cap as hyper's HTTP/1 parser, applied to h2 requests too.
const MAX_HEADER_FIELDS: usize = 100;

/// Requests the proxy refuses before routing.
fn check_request(snap: &Snapshot, parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed("CONNECT is not proxied"));
    }
    // hyper caps h1 at 100 fields itself; h2 has only a byte limit, and cookie crumbs arrive
    // as separate fields, so count here for every version.
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(ProxyError::HeadersTooLarge);
    }
    let max = snap.limits.max_header_bytes;
    // hyper enforces the limit itself from MIN_HEADER_BUFFER up; below that, count here.
    if max < crate::config::MIN_HEADER_BUFFER {
        let total: usize = parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + parts.uri.to_string().len();
        if total as u64 > max {
            return Err(ProxyError::HeadersTooLarge);
        }
    }
    Ok(())
}

/// The authority the request is for: an absolute-form target's wins over `Host` (RFC 9112
/// §3.2.2), h2's `:authority` likewise. Several `Host` headers are refused.
/// Returned as a `HeaderValue`: for the common `Host` case that is a reference-counted clone
/// of the parsed header, no copy.
fn authority(parts: &http::request::Parts) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("several Host headers"));
    }
    if let Some(a) = parts.uri.authority() {
        if parts.version == Version::HTTP_2 {
            if let Some(h) = host {
                if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                    return Err(ProxyError::BadRequest("host disagrees with :authority"));
                }
            }
        }
        return HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid authority"));
    }
    match host {
        Some(h) if !h.is_empty() && h.as_bytes().iter().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(h.clone()))
        }
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        None if parts.version == Version::HTTP_11 => {
            Err(ProxyError::BadRequest("missing Host header"))
        }
        None => Ok(None),
    }
}

fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Removes dot segments (RFC 3986 §5.2.4) so that routing and the backend see the same path,
/// and `/public/../admin` is routed as `/admin`. Paths without dot segments are borrowed.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    let has_dots = path.split('/').any(|s| {
        s == "."
            || s == ".."
            || s.eq_ignore_ascii_case("%2e")
            || s.eq_ignore_ascii_case("%2e%2e")
            || s.eq_ignore_ascii_case(".%2e")
            || s.eq_ignore_ascii_case("%2e.")
    });
    if !has_dots || !path.starts_with('/') {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        let dot = *seg == "." || seg.eq_ignore_ascii_case("%2e");
        let dotdot = *seg == ".."
            || seg.eq_ignore_ascii_case("%2e%2e")
            || seg.eq_ignore_ascii_case(".%2e")
            || seg.eq_ignore_ascii_case("%2e.");
        if dot || dotdot {
            if dotdot {
                out.pop();
            }
            if i == last {
                out.push("");
            }
        } else {
            out.push(seg);
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    std::borrow::Cow::Owned(s)
}

fn upstream_uri(uri: &Uri, path: &str) -> Result<Uri, ProxyError> {
    if path == uri.path() {
        if uri.scheme().is_none() && uri.authority().is_none() {
            return Ok(uri.clone());
        }
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        return Uri::try_from(pq).map_err(|_| ProxyError::BadRequest("invalid target"));
    }
    let mut s = String::with_capacity(path.len() + 32);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ProxyError::BadRequest("invalid target"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those the proxy re-frames or answers itself.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Request headers that are not hop-by-hop but still stop here: the encoder frames the body,
/// the balancer answers `Expect` itself, and proxy credentials are for the proxy.
const NOT_FORWARDED: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::EXPECT,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the (few) headers a request carries is cheaper than a hash lookup per
    // hop-by-hop name, and most requests carry none of them.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn is_hop_by_hop(n: &HeaderName) -> bool {
    HOP_BY_HOP.contains(n)
}

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

fn rewrite_request_headers(h: &mut HeaderMap, authority: Option<HeaderValue>, conn: &ConnInfo) {
    strip_hop_by_hop(h);
    if h.keys().any(|k| NOT_FORWARDED.contains(k)) {
        for n in &NOT_FORWARDED {
            h.remove(n);
        }
    }
    // X-Forwarded-For: the client's chain, then the peer we saw.
    let forwarded = match h.entry(&XFF) {
        Entry::Vacant(_) => conn.peer_ip.clone(),
        Entry::Occupied(e) => {
            let mut xff = BytesMut::with_capacity(64);
            for v in e.iter() {
                xff.extend_from_slice(v.as_bytes());
                xff.extend_from_slice(b", ");
            }
            xff.extend_from_slice(conn.peer_ip.as_bytes());
            HeaderValue::from_maybe_shared(xff.freeze()).unwrap_or_else(|_| conn.peer_ip.clone())
        }
    };
    h.insert(XFF.clone(), forwarded);
    h.insert(
        XFP.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(a) = authority {
        h.insert(XFH.clone(), a.clone());
        // The client's Host is kept; for h2 and absolute-form it is the authority.
        h.insert(header::HOST, a);
    }
}

fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Upgrade` value to forward when this is an HTTP/1.1 WebSocket handshake.
fn websocket_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.method != Method::GET {
        return None;
    }
    if !has_token(&parts.headers, header::CONNECTION, "upgrade")
        || !has_token(&parts.headers, header::UPGRADE, "websocket")
    {
        return None;
    }
    Some(HeaderValue::from_static("websocket"))
}

fn answers_websocket(h: &HeaderMap) -> bool {
    has_token(h, header::UPGRADE, "websocket")
}

/// Completes a WebSocket handshake: answers the client's 101 and copies bytes both ways until
/// either side closes. The tunnel keeps the in-flight guard (least-connections sees it) and a
/// drain guard (graceful shutdown waits for it); it belongs to no config generation, so a
/// reload never touches it.
fn tunnel(
    mut resp: Response<Incoming>,
    on_client: hyper::upgrade::OnUpgrade,
    guard: crate::backend::InFlight,
    log: Option<Box<LogEntry>>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let on_upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.remove(header::UPGRADE);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    conn.upgraded.store(true, Relaxed);
    let drain = conn.drain.clone();
    let peer = conn.peer;
    tokio::spawn(async move {
        let _drain = drain;
        let _guard = guard;
        let mut log = log;
        match tokio::try_join!(on_client, on_upstream) {
            Ok((client, upstream)) => {
                let client = hyper_util::rt::TokioIo::new(client);
                let upstream = hyper_util::rt::TokioIo::new(upstream);
                let (to_client, err) = splice(client, upstream).await;
                if let Some(e) = err {
                    tracing::debug!(%peer, error = %e, "tunnel ended with an error");
                }
                if let Some(l) = log.as_deref_mut() {
                    l.bytes = to_client;
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade did not complete"),
        }
        if let Some(mut l) = log {
            l.outcome = accesslog::Outcome::Upgraded;
            accesslog::write(l);
        }
    });
    Response::from_parts(parts, ResponseBody::empty())
}

/// How long the other direction of a tunnel may go on once one side has closed (a WebSocket
/// close handshake finishing), before both sockets are closed.
const TUNNEL_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Copies both ways until one side closes or fails, then gives the other direction
/// `TUNNEL_LINGER` to finish. Unlike `copy_bidirectional`, a peer that never closes its half
/// cannot keep the tunnel (and the backend's in-flight slot) once the other side is gone.
/// Returns the bytes sent to the client and the first error.
async fn splice<C, U>(client: C, upstream: U) -> (u64, Option<std::io::Error>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    async fn pump<R, W>(mut r: R, mut w: W, n: &mut u64) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let k = r.read(&mut buf).await?;
            if k == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..k]).await?;
            w.flush().await?;
            *n += k as u64;
        }
    }
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let (mut to_client, mut to_upstream) = (0u64, 0u64);
    let err = {
        let down = pump(ur, cw, &mut to_client);
        let up = pump(cr, uw, &mut to_upstream);
        tokio::pin!(down, up);
        let (first, rest) = tokio::select! {
            r = &mut down => (r, tokio::time::timeout(TUNNEL_LINGER, &mut up).await),
            r = &mut up => (r, tokio::time::timeout(TUNNEL_LINGER, &mut down).await),
        };
        first.err().or(rest.ok().and_then(|r| r.err()))
    };
    (to_client, err)
}

fn relay(
    resp: Response<Incoming>,
    conn: upstream::Sender,
    guard: crate::backend::InFlight,
    log: Option<Box<LogEntry>>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::upstream(body, Some(conn), guard, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_removed() {
        assert_eq!(normalize_path("/a/b"), "/a/b");
        assert_eq!(normalize_path("/public/../admin"), "/admin");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/../../x"), "/x");
        assert_eq!(normalize_path("/a/%2e%2e/b"), "/b");
        assert_eq!(normalize_path("/a/.."), "/");
    }

    #[test]
    fn connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("x-kept").is_some());
    }
}
