//! The control path: one task that owns the listeners, the health tasks and the reload
//! triggers (SIGHUP, file change, `POST /reload`), and applies each reload in turn.
//!
//! A reload reads and validates the whole file first; only then does it bind any new
//! listener, build the next snapshot (re-using every surviving `Arc<Backend>`) and swap it in
//! with one store. Anything failing before the swap leaves the old config serving and is
//! reported in `/status` (`config.last_error`) and to the caller of `POST /reload`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::config::Config;
use crate::health::HealthTasks;
use crate::listener::{self, Signals};
use crate::state::{Shared, Snapshot};
use crate::{admin, Options, RunError};

/// What asked for a reload; logged with the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    File,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::File => "file change",
            Trigger::Admin => "admin API",
        }
    }
}

struct Command {
    trigger: Trigger,
    reply: Option<oneshot::Sender<Result<u64, String>>>,
}

/// Asks the control task for a reload and waits for its result. Cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    addrs: Arc<Vec<SocketAddr>>,
}

impl ReloadHandle {
    /// Reloads the config file; `Ok(new version)` or the validation error as text.
    pub async fn reload(&self, trigger: Trigger) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        let cmd = Command {
            trigger,
            reply: Some(tx),
        };
        self.tx
            .send(cmd)
            .await
            .map_err(|_| "shutting down".to_owned())?;
        rx.await.map_err(|_| "shutting down".to_owned())?
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The listener addresses bound at start (traffic listeners, then admin if any).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

struct Running {
    stop: watch::Sender<bool>,
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
}

impl Controller {
    pub async fn start(opts: Options) -> Result<Controller, RunError> {
        let cfg = Arc::new(opts.config);
        let snap = Snapshot::build(Arc::clone(&cfg), None, 1).map_err(RunError::Setup)?;
        let shared = Arc::new(Shared::new(snap));
        let (drain_tx, _) = watch::channel(false);
        let (guard, drain_rx) = mpsc::channel(1);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
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
        };
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
        tokio::spawn(listener::run(l, Arc::clone(&self.shared), signals));
        self.listeners.insert(addr, Running { stop });
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
        self.admin = Some((addr, Running { stop }));
        self.started.push(addr);
    }

    /// Serves reload requests until `shutdown` resolves.
    pub async fn serve(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut hup = if self.sighup { signal_hup() } else { None };
        let (file_tx, mut file_rx) = mpsc::channel::<()>(1);
        let mut watcher = self.watch_file(&file_tx);
        let mut debounce: Option<Instant> = None;
        let mut reap = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                Some(cmd) = self.cmd_rx.recv() => {
                    let r = self.apply(cmd.trigger).await;
                    if let Some(reply) = cmd.reply { let _ = reply.send(r); }
                }
                Some(()) = recv_hup(&mut hup) => { let _ = self.apply(Trigger::Signal).await; }
                Some(()) = file_rx.recv() => {
                    // Editors write in several steps (truncate, write, rename); wait for quiet.
                    debounce = Some(Instant::now() + Duration::from_millis(200));
                }
                _ = sleep_until_opt(debounce) => {
                    debounce = None;
                    let _ = self.apply(Trigger::File).await;
                }
                _ = reap.tick() => self.reap_idle(),
            }
            let want_watch = self.shared.snapshot.load().config.watch;
            if want_watch != watcher.is_some() {
                watcher = if want_watch {
                    self.watch_file(&file_tx)
                } else {
                    None
                };
            }
        }
    }

    fn watch_file(&self, tx: &mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        if !self.shared.snapshot.load().config.watch {
            return None;
        }
        match watch_file(&self.path, tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
                None
            }
        }
    }

    fn reap_idle(&self) {
        let snap = self.shared.snapshot.load();
        for p in &snap.pools {
            for m in &p.members {
                m.backend.idle.reap(p.timeouts.idle);
            }
        }
    }

    /// Validates, binds, swaps. The old config keeps serving on any error.
    async fn apply(&mut self, trigger: Trigger) -> Result<u64, String> {
        let res = self.try_apply().await;
        match &res {
            Ok(v) => {
                self.shared.reloads.fetch_add(1, Relaxed);
                self.shared.last_error.store(Arc::new(None));
                let snap = self.shared.snapshot.load();
                let backends: usize = snap.pools.iter().map(|p| p.members.len()).sum();
                tracing::info!(
                    version = v,
                    trigger = trigger.as_str(),
                    pools = snap.pools.len(),
                    backends,
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
        // Reading the file and resolving backend names block; keep them off the workers (on a
        // single core, the only worker is the one serving traffic).
        let path = self.path.clone();
        let cfg = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("reload task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let prev = self.shared.snapshot.load_full();
        let next = Snapshot::build(Arc::new(cfg), Some(&prev), prev.generation + 1)?;

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
        self.shared.snapshot.store(Arc::clone(&next));

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

fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = abs.file_name().map(|n| n.to_owned());
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        let Ok(ev) = ev else { return };
        if ev.kind.is_access() {
            return;
        }
        // Watch the directory, not the file: editors that save by writing a new file and
        // renaming it over the old one would otherwise leave us watching a deleted inode.
        if ev.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = tx.try_send(());
        }
    })?;
    w.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(w)
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
