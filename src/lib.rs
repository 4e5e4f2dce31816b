//! `balancer`: a Layer-7 load balancer and reverse proxy.
//!
//! The rule behind the layout: **the [`state::Snapshot`] holds what the config says
//! (immutable); each `Arc<`[`backend::Backend`]`>` holds what we observed (atomics). A reload
//! replaces the first and re-uses the second.**
//!
//! ```text
//! request path (no locks)                         control path (one task: control.rs)
//! listener  accept -> TLS -> hyper h1|h2          SIGHUP | file change (watch) | POST /reload
//! conn(s)   ConnInfo; idle ones closed             reload::prepare  (blocking thread)
//! proxy     handle -> forward                        config: text -> Config (file:line:col)
//! request     check, authority, normalise path       state:  Snapshot::build(cfg, prev)
//! state       snap.route(host, path)     -> 404              (same Arc<Backend> per pool+address)
//! cache       lookup: hit -> answer; miss -> store step around the relay (cache = true routes)
//! balance     pool.pick(now, tried)      -> 503      listeners: bind added
//! upstream    send (own h1 exchange | h2 stream)     reload::swap (one store)
//! classify    classify(result) -> Verdict            listeners: stop removed, resize the rest
//! backend     guard.record(outcome)  breaker+counters health: sync tasks
//! answer      ProxyError -> status, close, log       idle conns of removed backends closed
//! response_body  streams back; guard drops at its end
//! ```

// One exception, with its reason: `sockopt`, for a socket option socket2 lacks.
#![deny(unsafe_code)]

pub(crate) mod accesslog;
pub(crate) mod admin;
pub mod admin_state;
pub(crate) mod answer;
pub mod auth;
pub mod backend;
pub mod backend_io;
pub mod balance;
pub mod breaker;
pub(crate) mod cache;
pub mod check;
pub(crate) mod classify;
pub mod clock;
pub(crate) mod coalesce;
pub mod config;
pub(crate) mod conn;
pub(crate) mod conns;
pub(crate) mod control;
pub mod diff;
pub(crate) mod events;
pub(crate) mod flood;
pub mod forwarded;
pub(crate) mod framing;
pub mod grpc;
pub mod h2io;
pub(crate) mod h2path;
pub mod h2pool;
pub mod headers;
pub(crate) mod health;
pub(crate) mod health_grpc;
pub mod idle;
pub(crate) mod listener;
// pub: the binary sets logging up.
pub mod logging;
pub(crate) mod metrics;
pub(crate) mod preface;
pub(crate) mod proxy;
pub mod reason;
pub mod reload;
pub mod replay;
pub(crate) mod request;
pub mod request_body;
pub(crate) mod request_id;
pub(crate) mod response_body;
pub(crate) mod sockopt;
pub(crate) mod stall;
pub mod state;
pub mod tls;
pub(crate) mod tunnel;
pub mod upstream;
pub(crate) mod watch;

use std::future::Future;

pub use config::{Config, ConfigError, ConfigErrors};
pub use control::{Options, RunError};
pub use reload::ReloadHandle;

/// Runs the balancer until `shutdown` resolves, then drains: listeners stop accepting at once,
/// open connections finish their current request within `shutdown_grace`, idle ones close.
/// `on_ready` receives a handle once every listener is bound (tests use it to reload).
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(ReloadHandle),
) -> Result<(), RunError> {
    accesslog::init();
    let file = opts.config.log.access_file.as_deref();
    accesslog::set_file(file, true).map_err(|e| {
        RunError::Setup(format!(
            "log.access_file: cannot open {}: {e}",
            file.map_or_else(String::new, |p| p.display().to_string())
        ))
    })?;
    let mut ctl = control::Controller::start(opts).await?;
    on_ready(ctl.handle());
    ctl.serve(shutdown).await;
    let grace = ctl.shared().snapshot.load().config.shutdown_grace;
    ctl.drain(grace).await;
    Ok(())
}
