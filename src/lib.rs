//! `balancer`: a Layer-7 load balancer and reverse proxy.
//!
//! The rule behind the layout: **the [`state::Snapshot`] holds what the config says
//! (immutable); each `Arc<`[`backend::Backend`]`>` holds what we observed (atomics). A reload
//! replaces the first and re-uses the second.**
//!
//! ```text
//! request path (no locks)                         control path (one task)
//! listener: accept -> TLS -> hyper h1|h2           SIGHUP | file change | POST /reload
//! proxy::handle                                      reload::apply
//!   snap = shared.snapshot.load_full()                 text -> Config::parse (file:line:col)
//!   pool = snap.route(host, path)      -> 404          next = Snapshot::build(cfg, prev)
//!   i    = pool.pick(now, tried)       -> 503                  (same Arc<Backend> per pool+address)
//!   g    = backend.start()  (in_flight += 1)           shared.snapshot.store(next)
//!   upstream::send (pooled conn)  -> 502/504           listeners: bind added, stop removed
//!   g.record(outcome)  breaker + counters              health tasks: spawn added, abort removed
//!   body streams back, guard drops at its end
//! ```

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod framing;
pub mod health;
pub mod listener;
pub mod proxy;
pub mod reload;
pub mod stall;
pub mod state;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{Config, ConfigError};
pub use reload::ReloadHandle;

/// Everything `run` needs. Tests pass listeners they bound themselves on `127.0.0.1:0` (and
/// wrote into the config), so no test ever races for a port.
pub struct Options {
    pub config_path: PathBuf,
    pub config: Config,
    /// Already-bound sockets, used for the config's listeners (and admin) with the same address.
    pub prebound: Vec<TcpListener>,
    /// Whether SIGHUP triggers a reload (the binary: yes; in-process tests: no).
    pub sighup: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// Runs the balancer until `shutdown` resolves, then drains: listeners stop accepting at once,
/// open connections finish their current request within `shutdown_grace`, idle ones close.
/// `on_ready` receives a handle once every listener is bound (tests use it to reload).
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(ReloadHandle),
) -> Result<(), RunError> {
    accesslog::init();
    let mut ctl = reload::Controller::start(opts).await?;
    on_ready(ctl.handle());
    ctl.serve(shutdown).await;
    let grace = ctl.shared().snapshot.load().config.shutdown_grace;
    ctl.drain(grace).await;
    Ok(())
}

/// Shared state for tests and benches that inspect it.
pub fn shared_of(h: &ReloadHandle) -> Arc<state::Shared> {
    h.shared()
}
