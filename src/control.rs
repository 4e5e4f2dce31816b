//! The process supervisor: one task that owns the listeners, the admin listener, the health
//! tasks and the reload triggers (SIGHUP, file change, `POST /reload`), applies each reload in
//! turn, reaps idle upstream connections, and drains on shutdown.
//!
//! A reload (`reload.rs`) is prepared whole on a blocking thread first; only then does this
//! task bind any new listener, swap the snapshot in, stop removed listeners and sync the
//! health tasks. Anything failing before the swap leaves the old config serving and is
//! reported in `/status` (`config.last_error`) and to the caller of `POST /reload`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::admin;
use crate::config::Config;
use crate::conns::Conns;
use crate::health::HealthTasks;
use crate::listener::{self, Signals};
use crate::reload::{self, Command, ReloadHandle, Trigger};
use crate::state::{Shared, Snapshot};
use crate::watch::{fingerprint, ConfigWatch};

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

struct Running {
    stop: watch::Sender<bool>,
    /// A client listener's connections, resized when a reload changes max_connections (the
    /// admin listener has none).
    conns: Option<Arc<Conns>>,
}

/// The config file as the watcher sees it.
struct FileWatch {
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
    watcher: Option<ConfigWatch>,
    /// Content last loaded (or rejected): a change event that leaves it as it was is ignored.
    loaded: Option<u64>,
    debounce: Option<Instant>,
    /// A failure to watch was logged; not again until watching works.
    warned: bool,
}

pub struct Controller {
    shared: Arc<Shared>,
    path: PathBuf,
    listeners: HashMap<SocketAddr, Running>,
    admin: Option<(SocketAddr, Running)>,
    prebound: HashMap<SocketAddr, TcpListener>,
    drain_tx: watch::Sender<bool>,
    drain_guard: Option<mpsc::Sender<()>>,
    drain_rx: mpsc::Receiver<()>,
    health: HealthTasks,
    cmd_tx: mpsc::Sender<Command>,
    cmd_rx: mpsc::Receiver<Command>,
    sighup: bool,
    started: Vec<SocketAddr>,
    file: FileWatch,
}

impl Controller {
    pub async fn start(opts: Options) -> Result<Controller, RunError> {
        let cfg = Arc::new(opts.config);
        // Certificates, CA files and the system root store are read while building: off the
        // runtime's workers.
        let build_cfg = Arc::clone(&cfg);
        let snap = tokio::task::spawn_blocking(move || Snapshot::build(build_cfg, None, 1))
            .await
            .map_err(|e| RunError::Setup(format!("start-up task failed: {e}")))?
            .map_err(RunError::Setup)?;
        let shared = Arc::new(Shared::new(snap));
        let (drain_tx, _) = watch::channel(false);
        let (guard, drain_rx) = mpsc::channel(1);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (file_tx, file_rx) = mpsc::channel(1);
        let mut prebound = HashMap::new();
        for l in opts.prebound {
            if let Ok(a) = l.local_addr() {
                prebound.insert(a, l);
            }
        }
        let mut ctl = Controller {
            shared,
            path: opts.config_path,
            listeners: HashMap::new(),
            admin: None,
            prebound,
            drain_tx,
            drain_guard: Some(guard),
            drain_rx,
            health: HealthTasks::default(),
            cmd_tx,
            cmd_rx,
            sighup: opts.sighup,
            started: Vec::new(),
            file: FileWatch {
                tx: file_tx,
                rx: file_rx,
                watcher: None,
                loaded: None,
                debounce: None,
                warned: false,
            },
        };
        // Watch before anything is served or reported ready, so that no edit made after the
        // caller learns we are up can be missed; then fingerprint what is on disk. The caller
        // read the file before we watched it: if what is there now is not what it read, the
        // file changed in between, and the first turn of `serve` reloads it.
        ctl.rearm_watch();
        ctl.file.loaded = ctl.read_fingerprint().await;
        if cfg.watch {
            let path = ctl.path.clone();
            let on_disk = tokio::task::spawn_blocking(move || Config::load(&path).ok())
                .await
                .ok()
                .flatten();
            if on_disk.as_ref() != Some(&*cfg) {
                ctl.file.loaded = None;
                ctl.file.debounce = Some(Instant::now());
            }
        }
        let mut bound = Vec::new();
        for l in &cfg.listeners {
            bound.push((l.bind, ctl.bind(l.bind).await?));
        }
        let admin = match &cfg.admin {
            Some(a) => Some((a.bind, ctl.bind(a.bind).await?)),
            None => None,
        };
        for (addr, l) in bound {
            ctl.spawn_listener(addr, l);
        }
        if let Some((addr, l)) = admin {
            ctl.spawn_admin(addr, l);
        }
        let snap = ctl.shared.snapshot.load_full();
        ctl.health.sync(&snap);
        log_startup(&ctl.path, &snap);
        Ok(ctl)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn handle(&self) -> ReloadHandle {
        ReloadHandle {
            tx: self.cmd_tx.clone(),
            shared: Arc::clone(&self.shared),
            addrs: Arc::new(self.started.clone()),
        }
    }

    async fn bind(&mut self, addr: SocketAddr) -> Result<TcpListener, RunError> {
        if let Some(l) = self.prebound.remove(&addr) {
            return Ok(l);
        }
        bind_listener(addr).map_err(|source| RunError::Bind { addr, source })
    }

    fn signals(&self, stop: watch::Receiver<bool>) -> Option<Signals> {
        Some(Signals {
            stop,
            drain: self.drain_tx.subscribe(),
            drain_guard: self.drain_guard.clone()?,
        })
    }

    fn spawn_listener(&mut self, addr: SocketAddr, l: TcpListener) {
        let (stop, stop_rx) = watch::channel(false);
        let Some(signals) = self.signals(stop_rx) else {
            return;
        };
        tracing::info!(%addr, "listening");
        let max = self.shared.snapshot.load().limits.max_connections;
        let conns = Conns::new(max);
        tokio::spawn(listener::run(
            l,
            Arc::clone(&self.shared),
            signals,
            Arc::clone(&conns),
        ));
        self.listeners.insert(
            addr,
            Running {
                stop,
                conns: Some(conns),
            },
        );
        self.started.push(addr);
    }

    fn spawn_admin(&mut self, addr: SocketAddr, l: TcpListener) {
        let (stop, stop_rx) = watch::channel(false);
        tracing::info!(%addr, "admin API listening");
        tokio::spawn(admin::run(
            l,
            Arc::clone(&self.shared),
            self.handle(),
            stop_rx,
        ));
        self.admin = Some((addr, Running { stop, conns: None }));
        self.started.push(addr);
    }

    /// Serves reload requests until `shutdown` resolves.
    pub async fn serve(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut hup = if self.sighup { signal_hup() } else { None };
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                Some(cmd) = self.cmd_rx.recv() => {
                    let r = self.apply(cmd.trigger).await;
                    if let Some(reply) = cmd.reply { let _ = reply.send(r); }
                }
                Some(()) = recv_hup(&mut hup) => { let _ = self.apply(Trigger::Signal).await; }
                Some(()) = self.file.rx.recv() => {
                    // Editors write in several steps (truncate, write, rename); wait for quiet.
                    self.file.debounce = Some(Instant::now() + Duration::from_millis(200));
                }
                _ = sleep_until_opt(self.file.debounce) => {
                    self.file.debounce = None;
                    let now = self.read_fingerprint().await;
                    if now != self.file.loaded {
                        let _ = self.apply(Trigger::File).await;
                    }
                }
                _ = reap.tick() => self.reap_idle(),
            }
            self.rearm_watch();
        }
    }

    async fn read_fingerprint(&self) -> Option<u64> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || fingerprint(&path))
            .await
            .ok()
            .flatten()
    }

    /// Starts, stops or re-points the file watcher to match `watch` and the path's current
    /// symlink chain.
    fn rearm_watch(&mut self) {
        let want = self.shared.snapshot.load().config.watch;
        if !want {
            self.file.watcher = None;
            return;
        }
        if let Some(w) = &self.file.watcher {
            if !w.is_stale(&self.path) {
                return;
            }
        }
        match ConfigWatch::start(&self.path, self.file.tx.clone()) {
            Ok(w) => {
                self.file.watcher = Some(w);
                self.file.warned = false;
            }
            Err(e) => {
                self.file.watcher = None;
                // Retried every turn (the directory may appear), said once.
                if !std::mem::replace(&mut self.file.warned, true) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
                }
            }
        }
    }

    fn reap_idle(&self) {
        let snap = self.shared.snapshot.load();
        for p in &snap.pools {
            for m in &p.members {
                m.backend.idle.reap(p.dial.transport, p.dial.timeouts.idle);
                m.backend.h2.reap(p.dial.transport, p.dial.timeouts.idle);
            }
        }
    }

    /// Validates, binds, swaps. The old config keeps serving on any error.
    async fn apply(&mut self, trigger: Trigger) -> Result<u64, String> {
        let before = self.shared.snapshot.load_full();
        let res = self.try_apply().await;
        match &res {
            Ok(v) => {
                self.shared.reloads.fetch_add(1, Relaxed);
                self.shared.last_error.store(Arc::new(None));
                let snap = self.shared.snapshot.load();
                crate::logging::set_level(&snap.config.log.level);
                // A failure to open it is logged by the writer, which keeps the old output.
                let _ = crate::accesslog::set_file(snap.config.log.access_file.as_deref(), false);
                // The same comparison as `balancer check --diff`, in one line.
                let changes = crate::diff::configs(&before.config, &snap.config).summary();
                tracing::info!(
                    version = v,
                    trigger = trigger.as_str(),
                    changes = %changes,
                    "config reloaded"
                );
            }
            Err(e) => {
                self.shared.reload_failures.fetch_add(1, Relaxed);
                self.shared.last_error.store(Arc::new(Some(e.clone())));
                tracing::error!(trigger = trigger.as_str(), error = %e, "reload rejected; the previous config keeps serving");
            }
        }
        res
    }

    async fn try_apply(&mut self) -> Result<u64, String> {
        // What this reload reads, so that a file event for the same content does not repeat it.
        self.file.loaded = self.read_fingerprint().await;
        let prev = self.shared.snapshot.load_full();
        let path = self.path.clone();
        let prev_for_build = Arc::clone(&prev);
        let next = tokio::task::spawn_blocking(move || reload::prepare(path, prev_for_build))
            .await
            .map_err(|e| format!("reload task failed: {e}"))??;

        // Bind every new socket before changing anything, so a busy port rejects the reload
        // whole instead of leaving it half applied.
        let wanted: Vec<SocketAddr> = next.listener_addrs();
        let mut fresh = Vec::new();
        let missing: Vec<SocketAddr> = wanted
            .iter()
            .filter(|a| !self.listeners.contains_key(a))
            .copied()
            .collect();
        for addr in missing {
            let l = self.bind(addr).await.map_err(|e| e.to_string())?;
            fresh.push((addr, l));
        }
        let admin_addr = next.config.admin.as_ref().map(|a| a.bind);
        let admin_changed = admin_addr != self.admin.as_ref().map(|(a, _)| *a);
        let new_admin = match (admin_changed, admin_addr) {
            (true, Some(a)) => Some((a, self.bind(a).await.map_err(|e| e.to_string())?)),
            _ => None,
        };

        let version = next.generation;
        let next = Arc::new(next);
        reload::swap(&self.shared, Arc::clone(&next));
        // Backends that left the config: nothing will ever pop their idle connections again.
        for gone in prev.backends_not_in(&next) {
            gone.idle.clear();
            gone.h2.clear();
        }

        let removed: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in removed {
            if let Some(r) = self.listeners.remove(&addr) {
                tracing::info!(%addr, "listener removed; its open connections finish");
                let _ = r.stop.send(true);
            }
        }
        // Listeners that stay take the new max_connections (new ones start with it).
        for r in self.listeners.values() {
            if let Some(c) = &r.conns {
                c.capacity().resize(next.limits.max_connections);
            }
        }
        for (addr, l) in fresh {
            self.spawn_listener(addr, l);
        }
        if admin_changed {
            if let Some((_, r)) = self.admin.take() {
                let _ = r.stop.send(true);
            }
            if let Some((addr, l)) = new_admin {
                self.spawn_admin(addr, l);
            }
        }
        self.health.sync(&next);
        Ok(version)
    }

    /// Stops accepting everywhere, asks connections to finish, and waits up to `grace`.
    pub async fn drain(mut self, grace: Duration) {
        for r in self.listeners.values() {
            let _ = r.stop.send(true);
        }
        if let Some((_, r)) = &self.admin {
            let _ = r.stop.send(true);
        }
        self.health.stop_all();
        let _ = self.drain_tx.send(true);
        self.drain_guard = None;
        let open = self.shared.open_connections.load(Relaxed);
        tracing::info!(open_connections = open, grace = ?grace, "shutting down: draining connections");
        match tokio::time::timeout(grace, self.drain_rx.recv()).await {
            Ok(_) => tracing::info!("all connections closed"),
            Err(_) => {
                let open = self.shared.open_connections.load(Relaxed);
                tracing::warn!(
                    open_connections = open,
                    "shutdown_grace expired; closing the remaining connections"
                );
            }
        }
    }
}

/// One line, once everything is bound, that says what this process runs: an operator reading
/// a journal after a restart sees the version, the file and what came of it without `/status`.
fn log_startup(path: &std::path::Path, snap: &Snapshot) {
    let s = StartupSummary::new(&snap.config, &snap.pools);
    // Absolute (from the working directory, no I/O), since a relative path in a journal says
    // nothing about which file it was.
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        listeners = ?s.listeners,
        pools = ?s.pools,
        admin = ?s.admin,
        "balancer started"
    );
}

/// The startup line's fields, as text (quoted by the log, since they contain spaces).
#[derive(Debug, PartialEq, Eq)]
struct StartupSummary {
    /// `ADDR (tls)` or `ADDR (plain)`, in file order.
    listeners: String,
    /// `NAME: N backend(s)`, in file order; N counts what was resolved, not what was written.
    pools: String,
    admin: String,
}

impl StartupSummary {
    fn new(cfg: &Config, pools: &[Arc<crate::balance::Pool>]) -> StartupSummary {
        let listeners = cfg
            .listeners
            .iter()
            .map(|l| {
                let kind = if l.tls.is_some() { "tls" } else { "plain" };
                format!("{} ({kind})", l.bind)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let pools = pools
            .iter()
            .map(|p| plural_backends(&p.name, p.members.len()))
            .collect::<Vec<_>>()
            .join(", ");
        let admin = match &cfg.admin {
            Some(a) => a.bind.to_string(),
            None => "no admin listener".to_owned(),
        };
        StartupSummary {
            listeners,
            pools,
            admin,
        }
    }
}

fn plural_backends(pool: &str, n: usize) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{pool}: {n} backend{s}")
}

/// Binds with SO_REUSEADDR (restarts do not wait for TIME_WAIT) and a deep backlog, since
/// connections beyond `max_connections` wait there.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(true);
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

type Hup = tokio::signal::unix::Signal;

fn signal_hup() -> Option<Hup> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            None
        }
    }
}

async fn recv_hup(h: &mut Option<Hup>) -> Option<()> {
    match h {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_summary_counts_backends_and_names_a_missing_admin() {
        let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n\
                    [pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\
                    [pools.one]\nbackends = [\"127.0.0.1:9003\"]\n";
        let cfg = Arc::new(Config::parse(text, "t.toml", None).unwrap());
        let snap = Snapshot::build(Arc::clone(&cfg), None, 1).unwrap();
        let s = StartupSummary::new(&cfg, &snap.pools);
        assert_eq!(
            s,
            StartupSummary {
                listeners: "127.0.0.1:8080 (plain)".into(),
                pools: "web: 2 backends, one: 1 backend".into(),
                admin: "no admin listener".into(),
            }
        );
    }
}
