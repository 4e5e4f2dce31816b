//! A reload: read the file, validate it, build the next snapshot (re-using every surviving
//! `Arc<Backend>`), and swap it in with one store.
//!
//! Reading, validating and building block (file reads, name resolution, PEM files, the system
//! root store), so `prepare` runs on a blocking thread; only `swap` touches the shared state.
//! The control task (`control.rs`) serialises reloads, binds new listeners between `prepare`
//! and `swap`, and runs the health tasks; a failure anywhere before the swap leaves the old
//! snapshot serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::state::{Shared, Snapshot};

/// What asked for a reload; logged with the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    File,
    Admin,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::File => "file change",
            Trigger::Admin => "admin API",
        }
    }
}

pub(crate) struct Command {
    pub(crate) trigger: Trigger,
    pub(crate) reply: Option<oneshot::Sender<Result<u64, String>>>,
}

/// Asks the control task for a reload and waits for its result. Cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) addrs: Arc<Vec<SocketAddr>>,
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

/// Reads, validates and builds the next snapshot from the file at `path`. Blocking: call it
/// from `spawn_blocking`.
pub fn prepare(path: PathBuf, prev: Arc<Snapshot>) -> Result<Snapshot, String> {
    // Every error, one per line: `/status` and the 400 of `POST /reload` show them all.
    let checked = Config::check_file(&path).map_err(|e| e.to_string())?;
    for w in &checked.warnings {
        tracing::warn!("config: {w}");
    }
    Snapshot::build(Arc::new(checked.config), Some(&prev), prev.generation + 1)
}

/// Swaps `next` in: requests that loaded the old snapshot finish on it, every later one sees
/// the new one.
pub fn swap(shared: &Shared, next: Arc<Snapshot>) {
    shared.snapshot.store(next);
}
