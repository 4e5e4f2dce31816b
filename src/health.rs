//! Active health checks: one task per (pool, backend) with a `health_check` table.
//!
//! A task probes `path` (or, with `kind = "grpc"`, the gRPC health service: `health_grpc.rs`)
//! every `interval` over a connection of its own (never a client's), keeps
//! its consecutive pass/fail counts to itself, and writes only `backend.healthy`, logging once
//! per flip. It skips its probes while the operator has the backend `disabled`. The control task calls `HealthTasks::sync` after each swap: it spawns tasks for new
//! keys, aborts those whose backend or settings went away, and marks backends of pools without
//! checks healthy.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::{Empty, Full};
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::config::{HealthCheckConfig, HealthKind, Protocol};
use crate::health_grpc;
use crate::state::Snapshot;
use crate::tls::UpstreamTlsConnector;
use crate::upstream;

const USER_AGENT: &str = concat!("balancer/", env!("CARGO_PKG_VERSION"), " (health check)");

struct Task {
    backend: Arc<Backend>,
    cfg: HealthCheckConfig,
    /// The pool's transport id: a change of TLS settings (CA, server name) restarts probes.
    transport: u64,
    handle: JoinHandle<()>,
}

#[derive(Default)]
pub struct HealthTasks {
    tasks: HashMap<(Arc<str>, String), Task>,
}

impl HealthTasks {
    pub fn sync(&mut self, snap: &Snapshot) {
        let mut keep = HashMap::with_capacity(self.tasks.len());
        for pool in &snap.pools {
            for m in &pool.members {
                let key = (Arc::clone(&pool.name), m.backend.address.to_string());
                let Some(cfg) = &pool.health_check else {
                    // No checks any more: nothing will ever mark it healthy again otherwise.
                    m.backend.healthy.store(true, Relaxed);
                    continue;
                };
                let transport = pool.dial.transport;
                match self.tasks.remove(&key) {
                    Some(t)
                        if Arc::ptr_eq(&t.backend, &m.backend)
                            && &t.cfg == cfg
                            && t.transport == transport =>
                    {
                        keep.insert(key, t);
                    }
                    old => {
                        if let Some(t) = old {
                            t.handle.abort();
                        }
                        let handle = tokio::spawn(probe_loop(
                            Arc::clone(&m.backend),
                            cfg.clone(),
                            pool.dial.tls.clone(),
                            pool.dial.protocol,
                        ));
                        keep.insert(
                            key,
                            Task {
                                backend: Arc::clone(&m.backend),
                                cfg: cfg.clone(),
                                transport,
                                handle,
                            },
                        );
                    }
                }
            }
        }
        for (_, t) in self.tasks.drain() {
            t.handle.abort();
        }
        self.tasks = keep;
    }

    pub fn stop_all(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.handle.abort();
        }
    }
}

impl Drop for HealthTasks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A random phase in [0, interval), so that many backends are not probed in one burst.
fn jitter(interval: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let ms = interval.as_millis().max(1) as u64;
    Duration::from_millis(r % ms)
}

async fn probe_loop(
    backend: Arc<Backend>,
    cfg: HealthCheckConfig,
    tls: Option<UpstreamTlsConnector>,
    protocol: Protocol,
) {
    tokio::time::sleep(jitter(cfg.interval)).await;
    let mut streak = Streak::default();
    let mut conn = Conn::None;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if backend.intent.skips_health_checks() {
            // Disabled by the operator: not probed, `healthy` keeps its last value, and the
            // counts start over when probing resumes so that old results do not count.
            conn = Conn::None;
            streak = Streak::default();
            continue;
        }
        let result = tokio::time::timeout(
            cfg.timeout,
            probe(&backend, &cfg, tls.as_ref(), protocol, &mut conn),
        )
        .await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {:?}", cfg.timeout)),
        };
        if failure.is_some() {
            conn = Conn::None;
        }
        let healthy = backend.healthy.load(Relaxed);
        match streak.observe(failure.is_none(), healthy, &cfg) {
            Some(true) => {
                backend.healthy.store(true, Relaxed);
                tracing::info!(pool = %backend.pool, backend = %backend.address, passes = streak.passes, "backend is healthy again");
            }
            Some(false) => {
                backend.healthy.store(false, Relaxed);
                let error = failure.as_deref().unwrap_or("-");
                tracing::warn!(pool = %backend.pool, backend = %backend.address, failures = streak.failures, error, "backend is unhealthy");
            }
            None => {
                if let Some(e) = &failure {
                    tracing::debug!(pool = %backend.pool, backend = %backend.address, error = %e, "health probe failed");
                }
            }
        }
    }
}

/// Consecutive probe results, kept by the probe task alone. A pure state machine (no clock,
/// no I/O), so the thresholds are tested directly.
#[derive(Debug, Default)]
struct Streak {
    passes: u32,
    failures: u32,
}

impl Streak {
    /// Records one probe; returns the new health when it flips (the caller stores and logs
    /// it, once).
    fn observe(&mut self, passed: bool, healthy: bool, cfg: &HealthCheckConfig) -> Option<bool> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            (!healthy && self.passes >= cfg.healthy_threshold).then_some(true)
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            (healthy && self.failures >= cfg.unhealthy_threshold).then_some(false)
        }
    }
}

/// The probe's own connection, kept between probes.
enum Conn {
    None,
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(health_grpc::Sender),
}

impl Conn {
    fn take_h2(&mut self) -> Option<health_grpc::Sender> {
        match std::mem::replace(self, Conn::None) {
            Conn::H2(c) => Some(c),
            Conn::None | Conn::Http1(_) => None,
        }
    }
}

/// One probe over the pool's protocol: an `http` probe of a pool that speaks HTTP/2 to its
/// backends goes over HTTP/2 too, since its backends may speak nothing else.
async fn probe(
    backend: &Backend,
    cfg: &HealthCheckConfig,
    tls: Option<&UpstreamTlsConnector>,
    protocol: Protocol,
    conn: &mut Conn,
) -> Result<(), String> {
    match (cfg.kind, protocol.is_h2()) {
        (HealthKind::Http, false) => {
            let mut c = match std::mem::replace(conn, Conn::None) {
                Conn::Http1(c) => Some(c),
                Conn::None | Conn::H2(_) => None,
            };
            let r = probe_http1(backend, cfg, tls, &mut c).await;
            if let Some(c) = c {
                *conn = Conn::Http1(c);
            }
            r
        }
        (HealthKind::Http, true) => {
            let mut c = conn.take_h2();
            let r = probe_http2(backend, cfg, tls, &mut c).await;
            if let Some(c) = c {
                *conn = Conn::H2(c);
            }
            r
        }
        (HealthKind::Grpc, _) => {
            let mut c = conn.take_h2();
            let r = health_grpc::probe(backend, &cfg.service, tls, cfg.timeout, USER_AGENT, &mut c)
                .await;
            if let Some(c) = c {
                *conn = Conn::H2(c);
            }
            r
        }
    }
}

async fn probe_http1(
    backend: &Backend,
    cfg: &HealthCheckConfig,
    tls: Option<&UpstreamTlsConnector>,
    conn: &mut Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
) -> Result<(), String> {
    let reusable = conn.as_ref().is_some_and(|c| c.is_ready());
    if !reusable {
        *conn = Some(
            upstream::probe_connect(backend, tls, cfg.timeout)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        );
    }
    let Some(tx) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let mut req = Request::new(Empty::<Bytes>::new());
    *req.uri_mut() = cfg.path.parse().map_err(|e| format!("bad path: {e}"))?;
    let host = HeaderValue::from_str(&backend.address).map_err(|e| e.to_string())?;
    req.headers_mut().insert(header::HOST, host);
    req.headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    verdict(resp).await
}

/// The `http` probe as an HTTP/2 stream: `:authority` is the backend's address, as `Host` is
/// over HTTP/1.1.
async fn probe_http2(
    backend: &Backend,
    cfg: &HealthCheckConfig,
    tls: Option<&UpstreamTlsConnector>,
    conn: &mut Option<health_grpc::Sender>,
) -> Result<(), String> {
    let tx = health_grpc::ready(backend, tls, cfg.timeout, conn).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri: http::Uri = format!("{scheme}://{}{}", backend.address, cfg.path)
        .parse()
        .map_err(|e| format!("bad path: {e}"))?;
    let mut req = Request::get(uri)
        .header(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    *req.version_mut() = http::Version::HTTP_2;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    verdict(resp).await
}

/// 2xx and 3xx pass. The body is read to the end so the connection can carry the next probe.
async fn verdict(resp: http::Response<hyper::body::Incoming>) -> Result<(), String> {
    let status = resp.status();
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_count_consecutive_results_only() {
        let cfg = HealthCheckConfig {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            ..HealthCheckConfig::default()
        };
        let mut s = Streak::default();
        let mut healthy = true;
        let mut run = |s: &mut Streak, passed: bool| {
            if let Some(h) = s.observe(passed, healthy, &cfg) {
                healthy = h;
            }
            healthy
        };
        // Two failures, a pass, two failures: never three in a row.
        for r in [false, false, true, false, false] {
            assert!(run(&mut s, r));
        }
        assert!(!run(&mut s, false), "third consecutive failure flips");
        assert!(!run(&mut s, true), "one pass is not enough");
        assert!(!run(&mut s, false));
        assert!(!run(&mut s, true));
        assert!(run(&mut s, true), "second consecutive pass flips back");
    }
}
