//! The request path: from a client's request to a backend's response.
//!
//! `handle` is the outer shell (access log, error -> `answer`); `forward` reads top to bottom:
//! check the request, route it, prepare what goes upstream, then a loop of single attempts
//! (pick -> send -> classify -> record), then relay. It loads the snapshot once and takes no
//! lock.
//!
//! Every request gets its ID (`[log] request_id_header`) before anything else, so that the
//! backend, the client (on the balancer's own answers too), the access log and the debug lines
//! all carry the same one.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::{Body, Incoming};

use crate::accesslog::{self, Ending, LogEntry, Texts};
use crate::answer::{self, ProxyError};
use crate::backend::{InFlight, Outcome};
use crate::cache::{self, Fallback, Refresher, Step};
use crate::classify::{self, classify, Context, Next, RetryBudget};
use crate::clock;
use crate::config::MAX_DURATION;
use crate::conn::ConnInfo;
use crate::forwarded::Forwarded;
use crate::grpc;
use crate::headers::strip_hop_by_hop;
use crate::reason::{ClientEvent, Failure, Note, Reason};
use crate::request::{self, build};
use crate::request_body::{BodyFault, UpBody};
use crate::request_id;
use crate::response_body::ResponseBody;
use crate::state::{Shared, Snapshot};
use crate::tunnel;
use crate::upstream::{self, Cause, SendError, Sent, UpstreamBody};

/// Writes the access-log entry if the request's future is dropped (client gone) before it
/// produced a response, so no request disappears from the log.
struct PendingLog(Option<Box<LogEntry>>);

impl Drop for PendingLog {
    fn drop(&mut self) {
        if let Some(mut l) = self.0.take() {
            l.status = 499;
            l.outcome = Ending::ClientClosed;
            l.reason
                .get_or_insert(Reason::Client(ClientEvent::ClientClosed));
            accesslog::write(l);
        }
    }
}

/// The request ID header and this request's value.
type RequestId<'a> = (&'a HeaderName, HeaderValue);

/// What `handle` learnt about the request before it moved into `forward`.
struct Call<'a> {
    rid: Option<&'a RequestId<'a>>,
    /// When the request arrived: also when its first attempt starts.
    start: Instant,
    /// A gRPC call (`content-type: application/grpc...`).
    grpc: bool,
    /// When the gRPC call's `grpc-timeout`, counted from its arrival, runs out.
    deadline: Option<Instant>,
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let snap = shared.snapshot.load_full();
    let rid: Option<RequestId> = snap
        .config
        .log
        .request_id_header
        .as_ref()
        .map(|name| (name, request_id::pick(req.headers(), name)));
    let mut log = PendingLog(
        snap.access_log
            .then(|| log_entry(&conn, &req, rid.as_ref().map(|r| &r.1), start)),
    );
    let grpc = grpc::is_grpc(req.headers());
    // Only a gRPC call's own deadline counts; a malformed one is ignored (and forwarded as
    // is: the backend may judge it), as is one too far out to represent.
    let deadline = match grpc {
        true => req
            .headers()
            .get(grpc::GRPC_TIMEOUT)
            .and_then(grpc::parse_timeout)
            .and_then(|d| start.checked_add(d)),
        false => None,
    };
    let call = Call {
        start,
        grpc,
        deadline,
        rid: rid.as_ref(),
    };
    // A stale stored copy that may answer if every attempt fails (stale-if-error).
    let mut fallback = None;
    let forwarded = forward(&snap, &conn, req, &mut log.0, &call, &mut fallback).await;
    let mut resp = match forwarded {
        Ok(resp) => resp,
        Err(e) if fallback.as_ref().is_some_and(|f| f.covers(&e)) => {
            let id = request_id::as_str(rid.as_ref().map(|r| &r.1));
            tracing::debug!(peer = %conn.peer, request_id = id, error = %e, "answering from a stale stored copy");
            match fallback {
                Some(f) => f.respond(log.0.take()),
                None => answer::respond(&e.answer(), log.0.take(), grpc),
            }
        }
        Err(e) => {
            let a = e.answer();
            let id = request_id::as_str(rid.as_ref().map(|r| &r.1));
            match &e {
                ProxyError::Upstream { source, .. } => {
                    tracing::warn!(peer = %conn.peer, request_id = id, error = %e, cause = %source, "answering {}", a.status.as_u16())
                }
                _ => {
                    tracing::debug!(peer = %conn.peer, request_id = id, error = %e, "answering {}", a.status.as_u16())
                }
            }
            answer::respond(&a, log.0.take(), grpc)
        }
    };
    // The backend's own value, if it sent one, gives way: the client must be able to quote
    // the ID the log has.
    if let Some((name, id)) = rid {
        resp.headers_mut().insert(name, id);
    }
    Ok(resp)
}

/// The access-log entry for a request that just arrived: everything copied out of the request
/// now, since the request itself moves on.
fn log_entry(
    conn: &ConnInfo,
    req: &Request<Incoming>,
    rid: Option<&HeaderValue>,
    start: Instant,
) -> Box<LogEntry> {
    let h = req.headers();
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // As received: an absolute-form target's or h2's authority, else Host.
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().as_bytes()),
        None => h.get(header::HOST).map(HeaderValue::as_bytes),
    };
    let mut e = Box::new(LogEntry::new(
        conn.peer,
        req.method(),
        req.version(),
        start,
        Texts {
            target: target.as_bytes(),
            host,
            user_agent: h.get(header::USER_AGENT).map(HeaderValue::as_bytes),
            request_id: rid.map(HeaderValue::as_bytes),
            tls: conn.tls_log.as_deref(),
        },
    ));
    e.trace_id = request_id::trace_id(h);
    e
}

/// The request's headers as a backend gets them: hop-by-hop fields out, the request ID the
/// log has in, and the X-Forwarded-* fields to send with them. The ID goes in after the
/// rewrite, which may have dropped the client's copy (named in `Connection`, or with a '_'),
/// so that the backend always gets the ID the log has.
fn upstream_headers(
    h: &mut HeaderMap,
    authority: Option<HeaderValue>,
    conn: &ConnInfo,
    rid: Option<&RequestId<'_>>,
) -> Forwarded {
    let fwd = request::rewrite_request_headers(h, authority, conn);
    if let Some((name, value)) = rid {
        h.insert(*name, value.clone());
    }
    fwd
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
    call: &Call<'_>,
    fallback: &mut Option<Fallback>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let rid = call.rid;
    // Evaluated only when a debug line is enabled.
    let id = || request_id::as_str(rid.map(|r| &r.1));
    if req.version() != Version::HTTP_2 {
        let index = conn.requests.fetch_add(1, Relaxed);
        if conn.ambiguous_at.load(Relaxed) == index {
            return Err(ProxyError::BadRequest(
                "ambiguous framing or a fragment in the target",
            ));
        }
    } else if conn.h2_fragment(req.uri().path_and_query().map_or("", |p| p.as_str())) {
        return Err(ProxyError::BadRequest("a fragment in :path"));
    }
    let (mut parts, body) = req.into_parts();
    request::check_request(&parts)?;
    let authority = request::authority(&parts)?;
    let path = request::normalize_path(parts.uri.path());
    let (pool, cache) = snap
        .route_cached(authority.as_ref().and_then(|a| a.to_str().ok()), &path)
        .ok_or(ProxyError::NoRoute)?;
    tracing::debug!(request_id = id(), host = ?authority, path = %path, pool = %pool.name, "route matched");
    if let Some(l) = log.as_deref_mut() {
        l.pool = Some(pool.name.clone());
    }

    let limit = snap.limits.max_body_bytes;
    if limit > 0 && request::declared_length(&parts.headers).is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    let bodiless = body.is_end_stream();
    let upstream_uri = request::upstream_uri(&parts.uri, &path)?;
    // A WebSocket handshake keeps its Upgrade through the proxy; any other Upgrade (h2c
    // included) is stripped as the hop-by-hop header it is.
    let upgrade = tunnel::websocket_upgrade(&parts);
    let mut client_upgrade = match upgrade {
        Some(_) => parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        None => None,
    };
    if parts.version == Version::HTTP_2 {
        request::join_cookie_crumbs(&mut parts.headers);
    }
    if !snap.limits.allow_underscores_in_headers {
        request::drop_underscored(&mut parts.headers);
    }
    let method = parts.method;
    // The cache's lookup step: a hit is answered here; a miss may have waited for another
    // request's flight, and carries what to revalidate and what to store. It comes before
    // the upstream rewrite, which a hit never needs (~1,900 of a hit's 20,300 instructions,
    // callgrind); so Vary is matched on the headers the client sent (RFC 9111 §4.1), and a
    // background refresh applies the rewrite to its own copy.
    let mut miss = None;
    if let (Some(cache), Some(cfg)) = (cache, &snap.config.cache) {
        let asking = cache::Asking {
            method: &method,
            uri: &upstream_uri,
            headers: &mut parts.headers,
            plain: bodiless && upgrade.is_none(),
            wait: pool.dial.timeouts.response,
        };
        let prepare = |h: &mut HeaderMap| upstream_headers(h, authority.clone(), conn, rid);
        let refresher = Refresher {
            pool,
            conn,
            prepare: &prepare,
        };
        match cache::lookup(cache, cfg, asking, &refresher).await {
            Step::Serve(hit) => return Ok(hit.respond(log.take())),
            Step::Fetch(m) => {
                *fallback = m.fallback();
                miss = Some(m);
            }
        }
    }
    let fwd = upstream_headers(&mut parts.headers, authority, conn, rid);
    if let Some(proto) = &upgrade {
        parts.headers.insert(header::UPGRADE, proto.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Only bodiless idempotent requests may be sent twice after reaching a backend; their
    // head comes back with the failure (`SendError::Failed`). Even with `attempts = 1` that
    // serves the one free replay after a stale pooled connection.
    let replayable = bodiless && IDEMPOTENT.contains(&method);
    // Only counted when it will be logged: a shared counter is an allocation.
    let received = match log.as_deref_mut() {
        Some(l) if !bodiless => {
            let n = Arc::new(AtomicU64::new(0));
            l.received = Some(Arc::clone(&n));
            Some(n)
        }
        _ => None,
    };
    let mut next = build(
        &method,
        &upstream_uri,
        parts.headers,
        if bodiless {
            UpBody::Empty
        } else {
            UpBody::stream(
                body,
                if limit == 0 { u64::MAX } else { limit },
                // A gRPC stream's client may rightly send nothing for minutes (a bidi "watch"
                // call keeps its side open): its deadline, not a stall timer, ends it.
                if call.grpc {
                    MAX_DURATION
                } else {
                    conn.body_timeout
                },
                received,
            )
        },
    );

    let mut budget = RetryBudget::new(pool.attempts);
    let mut last_err: Option<ProxyError> = None;
    let mut note: Option<Reason> = None;
    // A stale pooled connection was replayed, or an h2 stream the backend did not process
    // was sent again: the log says `retried` although no attempt was spent.
    // (`ejection_capped` alone is not a retry.)
    let mut stale_replayed = false;
    // The first attempt is timed from the request's arrival, microseconds back: one clock
    // read where there were three (the pick's, the send's and the arrival's).
    let mut arrival = Some(call.start);
    loop {
        let sent_at = arrival.take().unwrap_or_else(Instant::now);
        // A retry never starts past the client's deadline (nor does a call that arrived
        // with none left).
        if call.deadline.is_some_and(|d| sent_at >= d) {
            return Err(ProxyError::GrpcDeadline);
        }
        let now = clock::ms_at(sent_at);
        let pick = match pool.pick(now, budget.tried()) {
            Ok(p) => p,
            Err(r) => return Err(last_err.unwrap_or(ProxyError::NoBackend(r))),
        };
        let member = &pool.members[pick.index];
        let Some(mut guard) = member
            .backend
            .start(&pool.breaker, now, pick.breaker_overridden)
        else {
            // The breaker opened between the pick and now: look elsewhere, for free.
            tracing::debug!(request_id = id(), pool = %pool.name, backend = %member.backend.address, "retry: breaker opened since the pick; picking again");
            budget.skip(pick.index);
            continue;
        };
        budget.spend();
        tracing::debug!(
            request_id = id(),
            pool = %pool.name,
            backend = %member.backend.address,
            attempt = budget.spent(),
            breaker_overridden = pick.breaker_overridden,
            "backend picked"
        );
        if pick.breaker_overridden {
            note = Some(Reason::Note(Note::EjectionCapped));
        }
        if let Some(l) = log.as_deref_mut() {
            l.backend = Some(member.backend.address.clone());
            l.attempts = budget.spent();
        }
        let result = match call.deadline {
            None => upstream::send(&member.backend, &pool.dial, next, Some(&fwd)).await,
            Some(deadline) => {
                // The backend gets what is left of the client's deadline (gRPC's rule for
                // proxies), and the wait ends with it, whatever `timeouts.response` says.
                next.headers_mut().insert(
                    grpc::GRPC_TIMEOUT,
                    grpc::format_timeout(deadline.saturating_duration_since(Instant::now())),
                );
                let send = upstream::send(&member.backend, &pool.dial, next, Some(&fwd));
                match tokio::time::timeout_at(deadline.into(), send).await {
                    Ok(r) => r,
                    Err(_) => {
                        let v = classify::GRPC_DEADLINE_PASSED;
                        guard.record(v.outcome, None, sent_at.elapsed(), &pool.breaker);
                        return Err(ProxyError::GrpcDeadline);
                    }
                }
            }
        };
        let took = sent_at.elapsed();
        let verdict = classify(
            &result,
            &Context {
                replayable,
                free_replay_left: budget.free_replay_left(),
                upgrade: client_upgrade.is_some(),
                policy: &pool.breaker,
            },
        );
        let status = result.as_ref().ok().map(|s| s.response.status().as_u16());
        match status {
            // The verdict is in the trailers: the body's end settles it.
            Some(s) if verdict.awaits_grpc_status => guard.record_answer(s, took),
            _ => guard.record(verdict.outcome, status, took, &pool.breaker),
        }
        stale_replayed |= matches!(
            verdict.note,
            Some(Reason::Note(
                Note::StaleConnectionRetried | Note::GoawayRetried | Note::RefusedStreamRetried
            ))
        );
        note = verdict.note.or(note);
        match (verdict.next, result) {
            (Next::Respond, Ok(sent)) => {
                // A trailers-only gRPC answer: its status is already here.
                let grpc_status = grpc::is_grpc(sent.response.headers())
                    .then(|| grpc::status_in(sent.response.headers()))
                    .flatten();
                if let Some(code) = grpc_status {
                    member.backend.note_grpc_status(code);
                }
                if let Some(l) = log.as_deref_mut() {
                    l.upstream_us = Some(took.as_micros() as u64);
                    l.status = sent.response.status().as_u16();
                    l.grpc_status = grpc_status.flatten();
                    l.reason = match verdict.outcome {
                        Outcome::Failure(f) => Some(Reason::Failed(f)),
                        Outcome::Success | Outcome::Neutral => note,
                    };
                    if budget.spent() > 1 || stale_replayed {
                        l.outcome = Ending::Retried;
                    }
                }
                let resp = respond(sent, guard, log.take(), conn, client_upgrade.take());
                let resp = match verdict.awaits_grpc_status {
                    true => resp.map(|b| b.awaiting_grpc_status(pool.breaker)),
                    false => resp,
                };
                // The store step: tee the body into the cache, or answer from the stored copy
                // after a 304 (or a 5xx within stale-if-error).
                return Ok(match miss.take() {
                    Some(m) => m.finish(resp),
                    None => resp,
                });
            }
            (next_step, Err(e)) if budget.allows(pick.index, next_step) => {
                let (back, err) = split(e, replayable);
                tracing::debug!(
                    request_id = id(),
                    pool = %pool.name,
                    backend = %member.backend.address,
                    attempt = budget.spent(),
                    error = %err,
                    note = verdict.note.map_or("-", Reason::as_str),
                    "retry: attempt failed; trying again"
                );
                next = match back {
                    Some(r) => r,
                    None => return Err(err),
                };
                last_err = Some(err);
            }
            // Dropping the response closes its connection: nothing of it reaches the client.
            (_, Ok(_)) => {
                return Err(ProxyError::Upstream {
                    failure: match verdict.outcome {
                        Outcome::Failure(f) => f,
                        Outcome::Success | Outcome::Neutral => Failure::UpstreamProtocol,
                    },
                    source: "backend broke HTTP framing or switched protocols unasked".into(),
                })
            }
            (_, Err(e)) => return Err(split(e, false).1),
        }
    }
}

/// The request back (when it never left) and the error the client would get for `e`.
fn split(e: SendError, replayable: bool) -> (Option<Request<UpBody>>, ProxyError) {
    match e {
        SendError::NotSent {
            req,
            failure,
            source,
        } => (Some(*req), ProxyError::Upstream { failure, source }),
        SendError::Failed {
            cause: Cause::Backend(failure),
            source,
            head,
            ..
        } => (
            head.filter(|_| replayable)
                .map(|h| Request::from_parts(*h, UpBody::Empty)),
            ProxyError::Upstream { failure, source },
        ),
        SendError::Failed {
            cause: Cause::Client(fault),
            ..
        } => (
            None,
            match fault {
                BodyFault::TooLarge => ProxyError::BodyTooLarge,
                BodyFault::Stalled => ProxyError::BodyTimeout,
                BodyFault::Malformed => ProxyError::BadRequest("malformed request body"),
                BodyFault::Gone => ProxyError::ClientClosed,
            },
        ),
    }
}

/// Relays a backend's answer: a WebSocket `101` becomes a tunnel, anything else streams back
/// with hop-by-hop headers removed, carrying the in-flight guard, the connection (pooled again
/// when the body ends cleanly) and the log entry.
fn respond(
    sent: Sent,
    guard: InFlight,
    log: Option<Box<LogEntry>>,
    conn: &Arc<ConnInfo>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    let upgrade_asked = client_upgrade.is_some();
    let switching = sent.response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = sent.response.into_parts();
    // Only HTTP/1.1 switches protocols (upgrades of an h2 pool go over HTTP/1.1 too).
    let body = match (client_upgrade, switching, body) {
        (Some(on_client), true, UpstreamBody::H1(x)) if x.is_upgrade() => {
            let upstream = x.into_upgraded();
            return tunnel::tunnel(parts, upstream, on_client, guard, log, conn);
        }
        (_, _, b) => b,
    };
    strip_hop_by_hop(&mut parts.headers);
    if upgrade_asked {
        // The client asked to switch protocols and was refused: bytes it sends next may be
        // WebSocket frames, never a request to parse. Close after this answer.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, guard, log, Arc::clone(conn)),
    )
}
