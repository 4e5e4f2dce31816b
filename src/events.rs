//! The live dashboard: `GET /` serves one self-contained page (dashboard.html, embedded at
//! build time), `GET /events` streams `/status` to it as server-sent events.
//!
//! Each `/events` client gets a task that reads `/status` every [`SAMPLE`] and sends it as an
//! `event: status` every [`PERIOD`], or at once when something an operator watches changed
//! (health, breaker, admin state, weight, last error, config version). The page computes
//! rates and latency percentiles from successive documents, so the server keeps no history.
//!
//! Buffering per client is bounded: at most [`BUFFERED`] events wait for a slow reader; when
//! they are all still waiting the task skips the document rather than queue it, and a later
//! one (always the whole state) replaces it. The stream ends when the admin listener stops
//! (shutdown) or the client goes away.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::state::Shared;

/// The page, compiled in: no file to ship next to the binary, nothing fetched at run time.
const PAGE: &str = include_str!("dashboard.html");

/// How often a client's task looks for a change: the bound on how late a change shows.
const SAMPLE: Duration = Duration::from_millis(200);
/// How often a client gets the status when nothing changed (its counters move regardless).
const PERIOD: Duration = Duration::from_secs(1);
/// Events waiting for one slow client, at most.
const BUFFERED: usize = 4;

/// `GET /`: the dashboard. The policy lets the page load nothing but itself and talk to
/// nothing but this listener, so it works offline and a stray reference shows as an error.
pub fn dashboard() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// What `/status` answers; passed in by admin.rs, which owns the document (and uses this
/// module, so the module graph stays acyclic).
pub type StatusFn = fn(&Shared) -> Value;

/// `GET /events`: `event: status` with the `/status` document, now, every second, and on
/// every change, until shutdown.
pub fn stream(
    shared: Arc<Shared>,
    status: StatusFn,
    stop: watch::Receiver<bool>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (tx, rx) = mpsc::channel(BUFFERED);
    tokio::spawn(feed(shared, status, stop, tx));
    let mut r = Response::new(Events(rx).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The stream ends at shutdown; the connection must end with it rather than wait idle
    // for a next request that the stopped admin API would never read.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn feed(
    shared: Arc<Shared>,
    status_of: StatusFn,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<Bytes>,
) {
    // Tells EventSource clients to reconnect after a second (the default is up to 3 s).
    if tx.try_send(Bytes::from_static(b"retry: 1000\n\n")).is_err() {
        return;
    }
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<(String, Instant)> = None;
    loop {
        tokio::select! {
            _ = crate::listener::stopped(&mut stop) => return,
            _ = tx.closed() => return,
            _ = tick.tick() => {}
        }
        let status = status_of(&shared);
        let sig = signature(&status);
        let due = match &last {
            None => true,
            Some((s, at)) => *s != sig || at.elapsed() >= PERIOD,
        };
        if !due {
            continue;
        }
        let event = Bytes::from(format!("event: status\ndata: {status}\n\n"));
        match tx.try_send(event) {
            Ok(()) => last = Some((sig, Instant::now())),
            // The client reads slower than we write: skip this one, the next is complete.
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// What an operator would call a change: the status without the counters that move with
/// every request (the periodic event carries those).
fn signature(status: &Value) -> String {
    const WATCHED: [&str; 9] = [
        "address",
        "healthy",
        "breaker",
        "admin_state",
        "drained",
        "weight",
        "configured_weight",
        "backup",
        "last_error",
    ];
    let mut pools = Vec::new();
    if let Some(map) = status["pools"].as_object() {
        for (name, pool) in map {
            let backends: Vec<Value> = pool["backends"]
                .as_array()
                .map(|bs| {
                    bs.iter()
                        .map(|b| WATCHED.iter().map(|k| b[*k].clone()).collect())
                        .collect()
                })
                .unwrap_or_default();
            pools.push(serde_json::json!([name, backends]));
        }
    }
    serde_json::json!([status["config"], status["listeners"], pools]).to_string()
}

/// The body of an `/events` response: whatever `feed` sends, until it drops its sender.
struct Events(mpsc::Receiver<Bytes>);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_no_change_but_health_is() {
        let a = serde_json::json!({
            "config": {"version": 1},
            "pools": {"web": {"backends": [
                {"address": "x", "healthy": true, "breaker": "closed", "requests": 1}
            ]}}
        });
        let mut b = a.clone();
        b["pools"]["web"]["backends"][0]["requests"] = 2.into();
        assert_eq!(signature(&a), signature(&b));
        b["pools"]["web"]["backends"][0]["healthy"] = false.into();
        assert_ne!(signature(&a), signature(&b));
        let mut c = a.clone();
        c["config"]["version"] = 2.into();
        assert_ne!(signature(&a), signature(&c));
    }
}
