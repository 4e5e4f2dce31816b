//! The admin API on `[admin].bind`: `GET /status`, `GET /metrics`, `POST /reload`,
//! `POST /pools/{pool}/backends/{address}`, `POST /cache/purge`, and the dashboard (`GET /`, `GET /events`: see
//! events.rs).
//!
//! Separate from the traffic listeners so that it can be bound to loopback only; with
//! `[admin] token_file` it asks for a bearer token (`auth.rs`). It reads the
//! current snapshot and the live atomics of each backend at request time; nothing here is
//! cached, so `/status` and `/metrics` never disagree with what the request path sees.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin_state::{self, AdminMode, Change};
use crate::backend::LATENCY_BUCKETS;
use crate::config::MAX_WEIGHT;
use crate::metrics::Format;
use crate::reload::{ReloadHandle, Trigger};
use crate::state::Shared;

pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    reload: ReloadHandle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::listener::stopped(&mut stop) => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let reload = reload.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                route(Arc::clone(&shared), reload.clone(), stop.clone(), req)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The dashboard's two routes, ahead of the API: `/events` streams, so its body is not a
/// `Full` like every other answer's.
async fn route(
    shared: Arc<Shared>,
    reload: ReloadHandle,
    stop: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => Ok(crate::events::dashboard().map(BodyExt::boxed)),
        // The stream is the status: it needs the token as /status does.
        (&Method::GET, "/events") => Ok(match unauthorized(&shared, &req) {
            Some(denied) => denied.map(BodyExt::boxed),
            None => crate::events::stream(shared, status_json, stop),
        }),
        // Only `GET /` is open: any other method there asks for the token first, as every
        // POST does.
        (_, "/" | "/events") => Ok(match unauthorized(&shared, &req) {
            Some(denied) => denied.map(BodyExt::boxed),
            None => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "405 Method Not Allowed\n".into(),
            )
            .map(BodyExt::boxed),
        }),
        _ => Ok(handle(shared, reload, req).await?.map(BodyExt::boxed)),
    }
}

async fn handle(
    shared: Arc<Shared>,
    reload: ReloadHandle,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const JSON: &str = "application/json";
    if let Some(denied) = unauthorized(&shared, &req) {
        return Ok(denied);
    }
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => reply(StatusCode::OK, JSON, status_json(&shared).to_string()),
        (&Method::GET, "/metrics") => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::from_accept(accept);
            match crate::metrics::render(&shared, format) {
                Ok(out) => {
                    let mut r = reply(StatusCode::OK, format.content_type(), out);
                    // The body depends on Accept: a cache in between must not mix the formats.
                    r.headers_mut()
                        .insert(header::VARY, HeaderValue::from_static("accept"));
                    r
                }
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics encoding failed\n".into(),
                ),
            }
        }
        (&Method::POST, "/reload") => match reload.reload(Trigger::Admin).await {
            Ok(v) => reply(StatusCode::OK, JSON, json!({ "version": v }).to_string()),
            Err(e) => reply(
                StatusCode::BAD_REQUEST,
                JSON,
                json!({ "error": e }).to_string(),
            ),
        },
        (&Method::POST, p) if p.starts_with("/pools/") => control(&shared, req).await,
        (&Method::POST, "/cache/purge") => purge(&shared, req).await,
        (_, "/status" | "/metrics" | "/reload" | "/cache/purge") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 Method Not Allowed\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 Not Found\n".into(),
        ),
    })
}

/// With `[admin] token_file`, every request but `GET /` (the dashboard page, which asks for
/// the token itself) must carry `Authorization: Bearer <token>`; the token is the one of the
/// snapshot in force, so a reload rotates it. The 401 answer when a request lacks it.
fn unauthorized(shared: &Shared, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    if req.method() == Method::GET && req.uri().path() == "/" {
        return None;
    }
    let snap = shared.snapshot.load();
    let token = snap.config.admin.as_ref()?.token.as_ref()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if token.admits(given) {
        return None;
    }
    let mut r = reply(
        StatusCode::UNAUTHORIZED,
        "application/json",
        json!({ "error": "this admin API needs \"Authorization: Bearer <token>\" with the token of [admin] token_file" }).to_string(),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"balancer admin\""),
    );
    Some(r)
}

/// `POST /pools/{pool}/backends/{address}`: applies the operator's intent (see
/// `admin_state.rs`) to the backend of the snapshot in force and answers with its `/status`
/// entry.
async fn control(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    let error = |status, msg: String| reply(status, JSON, json!({ "error": msg }).to_string());
    let Some((pool, address)) = admin_state::parse_path(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "expected /pools/{pool}/backends/{address}".into(),
        );
    };
    // A control body is a few bytes; anything large is a mistake, not something to buffer.
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")),
    };
    let change = match Change::parse(&body, MAX_WEIGHT) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let snap = shared.snapshot.load();
    if !snap.pools.iter().any(|p| *p.name == *pool) {
        return error(StatusCode::NOT_FOUND, format!("no pool named {pool:?}"));
    }
    let Some(backend) = snap.backend(&pool, &address) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("pool {pool:?} has no backend {address:?} (use the address as written in the config)"),
        );
    };
    backend.intent.apply(&change);
    if !backend.intent.takes_new() {
        // Nothing will be sent there: let the backend see its idle connections go now.
        backend.idle.clear();
    }
    tracing::info!(pool = %pool, backend = %address, state = backend.intent.mode().as_str(), weight = ?backend.intent.weight(), "operator changed a backend");
    let status = status_json(shared);
    let view = status["pools"][pool.as_str()]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["address"] == address.as_str()))
        .cloned()
        .unwrap_or_default();
    reply(StatusCode::OK, JSON, view.to_string())
}

/// `POST /cache/purge` with `{"prefix": "/static/", "host": "optional"}`: drops every stored
/// response whose target starts with the prefix (on that host only, if given; its port is
/// ignored) and answers `{"purged": N}`.
async fn purge(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    let error = |status, msg: String| reply(status, JSON, json!({ "error": msg }).to_string());
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        prefix: String,
        host: Option<String>,
    }
    let p: Purge = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"prefix\": \"/path/\", \"host\": \"optional\"}}: {e}"),
            )
        }
    };
    if !p.prefix.starts_with('/') {
        return error(
            StatusCode::BAD_REQUEST,
            format!("prefix {:?} must start with '/'", p.prefix),
        );
    }
    let snap = shared.snapshot.load();
    let Some(cache) = &snap.cache else {
        return error(
            StatusCode::NOT_FOUND,
            "no [cache] table in the config: nothing is cached".into(),
        );
    };
    let n = cache.purge(p.host.as_deref().filter(|h| !h.is_empty()), &p.prefix);
    tracing::info!(prefix = %p.prefix, host = ?p.host, purged = n, "cache purged");
    reply(StatusCode::OK, JSON, json!({ "purged": n }).to_string())
}

/// The contract's `/status` document, plus a few fields operators asked for.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let snap = shared.snapshot.load();
    let last_error = shared.last_error.load();
    let mut pools = serde_json::Map::new();
    let now = crate::clock::now_ms();
    for p in &snap.pools {
        let backends: Vec<_> = p
            .members
            .iter()
            .map(|m| {
                let b = &m.backend;
                let c = &b.counters;
                let (breaker, since) = b.breaker.effective_since(&p.breaker, now);
                let latency: Vec<u64> = c.latency_buckets.iter().map(|n| n.load(Relaxed)).collect();
                let last = b.last_error().map(|(r, at)| {
                    json!({ "reason": r.as_str(), "at": humantime::format_rfc3339_millis(at).to_string() })
                });
                let in_flight = b.in_flight.load(Relaxed);
                let mode = b.intent.mode();
                json!({
                    "address": &*b.address,
                    "weight": b.intent.effective_weight(m.weight),
                    "configured_weight": m.weight,
                    "backup": m.backup,
                    "admin_state": mode.as_str(),
                    // What a deploy script polls for: out of rotation and nothing in flight.
                    "drained": mode != AdminMode::Enabled && in_flight == 0,
                    "healthy": b.is_healthy(),
                    "breaker": breaker.as_str(),
                    // Seconds in that state (a number, not a time of day: the breaker keeps
                    // a monotonic clock, which no wall clock can be derived from exactly).
                    "breaker_since": seconds(now.saturating_sub(since)),
                    "in_flight": in_flight,
                    "requests": c.requests.load(Relaxed),
                    "failures": c.failures.load(Relaxed),
                    "connections_opened": c.connections_opened.load(Relaxed),
                    "idle_connections": b.idle.len(),
                    // Shared HTTP/2 connections (`protocol = "h2c" | "h2"`), draining ones
                    // included; 0 on HTTP/1.1 pools.
                    "h2_connections": b.h2.len(),
                    "last_error": last,
                    // Non-cumulative counts per bucket of `latency_bounds_s`, the last one
                    // +Inf: the dashboard takes p50/p99 over an interval from two readings.
                    "latency_buckets": latency,
                })
            })
            .collect();
        pools.insert(
            p.name.to_string(),
            json!({
                "strategy": p.strategy.as_str(),
                "protocol": p.dial.protocol.as_str(),
                "backends": backends,
            }),
        );
    }
    let listeners: Vec<_> = snap
        .config
        .listeners
        .iter()
        .map(|l| json!({ "bind": l.bind.to_string(), "tls": l.tls.is_some() }))
        .collect();
    let mut status = json!({
        "process": {
            "started_at": humantime::format_rfc3339_seconds(shared.started_at).to_string(),
            "uptime_s": seconds(now.saturating_sub(shared.started_ms)),
        },
        "listeners": listeners,
        "latency_bounds_s": LATENCY_BUCKETS,
        "config": {
            "version": snap.generation,
            "loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
            "last_error": last_error.as_ref().as_ref(),
        },
        "pools": pools,
    });
    // Only with [cache]: the key's absence says there is none.
    if let Some(c) = &snap.cache {
        status["cache"] = json!({
            "entries": c.entries(),
            "bytes": c.bytes(),
            "max_size": c.max_size(),
            "hits": c.stats.hits.load(Relaxed),
            "misses": c.stats.misses.load(Relaxed),
            "stores": c.stats.stores.load(Relaxed),
            "evictions": c.stats.evictions.load(Relaxed),
        });
    }
    status
}

/// Milliseconds as seconds with millisecond precision, for JSON.
fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}
