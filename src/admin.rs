//! The admin API on `[admin].bind`: `GET /status`, `GET /metrics`, `POST /reload`.
//!
//! Separate from the traffic listeners so that it can be bound to loopback only. It reads the
//! current snapshot and the live atomics of each backend at request time; nothing here is
//! cached, so `/status` and `/metrics` never disagree with what the request path sees.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backend::LATENCY_BUCKETS;
use crate::reason::{Failure, Reason};
use crate::reload::{ReloadHandle, Trigger};
use crate::state::Shared;

pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    reload: ReloadHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Metrics(Arc::clone(&shared))));
    let registry = Arc::new(registry);
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
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                handle(
                    Arc::clone(&shared),
                    reload.clone(),
                    Arc::clone(&registry),
                    req,
                )
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

async fn handle(
    shared: Arc<Shared>,
    reload: ReloadHandle,
    registry: Arc<Registry>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const JSON: &str = "application/json";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => reply(StatusCode::OK, JSON, status_json(&shared).to_string()),
        (&Method::GET, "/metrics") => {
            let mut out = String::with_capacity(16 * 1024);
            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    // prometheus-client writes OpenMetrics (counter families without `_total`,
                    // a closing `# EOF`); say so, or Prometheus loses the counter types.
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
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
        (_, "/status" | "/metrics" | "/reload") => reply(
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
                let last = b.last_error().map(|(r, at)| {
                    json!({ "reason": r.as_str(), "at": humantime::format_rfc3339_millis(at).to_string() })
                });
                json!({
                    "address": &*b.address,
                    "weight": m.weight,
                    "healthy": b.is_healthy(),
                    "breaker": b.breaker.effective_state(&p.breaker, now).as_str(),
                    "in_flight": b.in_flight.load(Relaxed),
                    "requests": c.requests.load(Relaxed),
                    "failures": c.failures.load(Relaxed),
                    "connections_opened": c.connections_opened.load(Relaxed),
                    "idle_connections": b.idle.len(),
                    "last_error": last,
                })
            })
            .collect();
        pools.insert(
            p.name.to_string(),
            json!({ "strategy": p.strategy.as_str(), "backends": backends }),
        );
    }
    json!({
        "config": {
            "version": snap.generation,
            "loaded_at": humantime::format_rfc3339_seconds(snap.loaded_at).to_string(),
            "last_error": last_error.as_ref().as_ref(),
        },
        "pools": pools,
    })
}

/// Reads the live atomics at scrape time.
struct Metrics(Arc<Shared>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let snap = shared.snapshot.load();
        let mut requests = Vec::new();
        let mut failures = Vec::new();
        let mut attempts = Vec::new();
        let mut opened = Vec::new();
        let mut in_flight = Vec::new();
        let mut healthy = Vec::new();
        let mut breaker = Vec::new();
        let mut hist = Vec::new();
        for p in &snap.pools {
            for m in &p.members {
                let b = &m.backend;
                let c = &b.counters;
                let id = || {
                    vec![
                        ("pool", p.name.to_string()),
                        ("backend", b.address.to_string()),
                    ]
                };
                for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                    let mut l = id();
                    l.push(("class", (*class).to_owned()));
                    requests.push((l, c.status[i].load(Relaxed)));
                }
                for r in Failure::ALL {
                    let v = c
                        .failure_reasons
                        .get(r.index())
                        .map(|a| a.load(Relaxed))
                        .unwrap_or(0);
                    if v > 0 {
                        let mut l = id();
                        l.push(("reason", r.as_str().to_owned()));
                        failures.push((l, v));
                    }
                }
                attempts.push((id(), c.requests.load(Relaxed)));
                opened.push((id(), c.connections_opened.load(Relaxed)));
                in_flight.push((id(), b.in_flight.load(Relaxed) as i64));
                healthy.push((id(), i64::from(b.is_healthy())));
                breaker.push((id(), b.breaker_state().as_gauge()));
                // prometheus-client's encoder takes per-bucket counts and accumulates them
                // itself, and writes `le="+Inf"` only for an upper bound of `f64::MAX`.
                let mut total = 0u64;
                let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
                for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
                    let n = c.latency_buckets[i].load(Relaxed);
                    total += n;
                    buckets.push((*le, n));
                }
                let n = c.latency_buckets[LATENCY_BUCKETS.len()].load(Relaxed);
                total += n;
                buckets.push((f64::MAX, n));
                let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
                hist.push((id(), sum, total, buckets));
            }
        }
        counter(
            &mut enc,
            "balancer_requests",
            "Responses from backends, by pool, backend and status class.",
            &requests,
        )?;
        counter(
            &mut enc,
            "balancer_upstream_failures",
            "Failed upstream attempts, by reason.",
            &failures,
        )?;
        counter(
            &mut enc,
            "balancer_upstream_attempts",
            "Requests sent to each backend (a retried request counts once per attempt).",
            &attempts,
        )?;
        counter(
            &mut enc,
            "balancer_upstream_connections_opened",
            "TCP connections opened to each backend; with attempts, the reuse ratio.",
            &opened,
        )?;
        {
            let mut family = enc.encode_descriptor(
                "balancer_request_duration_seconds",
                "Time from sending a request to a backend until its response headers.",
                None,
                MetricType::Histogram,
            )?;
            for (labels, sum, count, buckets) in &hist {
                family
                    .encode_family(labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        *sum, *count, buckets, None,
                    )?;
            }
        }
        gauge(
            &mut enc,
            "balancer_backend_in_flight",
            "Requests in flight per backend.",
            &in_flight,
        )?;
        gauge(
            &mut enc,
            "balancer_backend_healthy",
            "1 if the backend passes its health checks (or has none).",
            &healthy,
        )?;
        gauge(
            &mut enc,
            "balancer_backend_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            &breaker,
        )?;

        let local: Vec<_> = Reason::all()
            .filter_map(|r| {
                let v = crate::answer::LOCAL_RESPONSES.get(r.index())?.load(Relaxed);
                (v > 0).then(|| (vec![("reason", r.as_str().to_owned())], v))
            })
            .collect();
        counter(
            &mut enc,
            "balancer_local_responses",
            "Answers the balancer made itself (404, 413, 502, 503, 504, ...), by reason.",
            &local,
        )?;
        counter(
            &mut enc,
            "balancer_config_reloads",
            "Reloads applied.",
            &[(vec![], shared.reloads.load(Relaxed))],
        )?;
        counter(
            &mut enc,
            "balancer_config_reload_failures",
            "Reloads rejected (the old config kept serving).",
            &[(vec![], shared.reload_failures.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "balancer_config_version",
            "Version of the config in force.",
            &[(vec![], snap.generation as i64)],
        )?;
        gauge(
            &mut enc,
            "balancer_open_connections",
            "Client connections open.",
            &[(vec![], shared.open_connections.load(Relaxed) as i64)],
        )?;
        counter(
            &mut enc,
            "balancer_access_log_dropped",
            "Access-log lines dropped because stdout could not keep up.",
            &[(vec![], crate::accesslog::DROPPED.load(Relaxed))],
        )?;
        Ok(())
    }
}
