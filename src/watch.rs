//! Watching the config file for `watch = true`.
//!
//! Editors save by writing a new file and renaming it over the old one, and Kubernetes
//! mounts a ConfigMap as `balancer.toml -> ..data/balancer.toml` with `..data` a symlink that
//! is swapped atomically (`mv -T`). Watching the file itself (an inode) misses both, so this
//! watches the directories along the whole symlink chain and reports any change in them; the
//! control task then compares the file's content with what it last loaded and reloads only
//! when it differs. The set of directories is recomputed after every change, since a swap
//! moves the chain's end.
//!
//! A watched directory often holds other files that change all the time: an access log or
//! stderr redirected next to the config. Their events are dropped in the watcher's own
//! thread, so a busy log in the same directory costs no wakeup of the control task (before
//! this filter, every batch of access-log lines woke it and re-walked the chain: ~0.5
//! syscalls and a context switch per proxied request).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub struct ConfigWatch {
    /// The chain as computed when the watch started (watched or not, so that a directory
    /// that cannot be watched does not make the watch look stale on every turn).
    dirs: Vec<PathBuf>,
    // Dropping the watcher stops it.
    _watcher: RecommendedWatcher,
}

impl ConfigWatch {
    /// Starts watching every directory that `path` resolves through; `tx` receives a unit
    /// for each change seen there.
    pub fn start(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<ConfigWatch> {
        let Chain { dirs, paths } = chain(path);
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if !ev.kind.is_access() && concerns(&ev.paths, &paths) {
                let _ = tx.try_send(());
            }
        })?;
        let mut watched = Vec::new();
        for d in &dirs {
            if w.watch(d, RecursiveMode::NonRecursive).is_ok() {
                watched.push(d.clone());
            }
        }
        if watched.is_empty() {
            return Err(notify::Error::generic(
                "no directory of the config path can be watched",
            ));
        }
        Ok(ConfigWatch {
            dirs: watched,
            _watcher: w,
        })
    }

    /// Whether the symlink chain of `path` now runs through other directories.
    pub fn is_stale(&self, path: &Path) -> bool {
        chain(path).dirs != self.dirs
    }
}

/// Whether an event names a path of the chain, or a directory on the way to one (a swapped
/// `..data` link). An event without paths (a queue overflow) concerns everything.
fn concerns(event_paths: &[PathBuf], chain: &[PathBuf]) -> bool {
    event_paths.is_empty()
        || event_paths
            .iter()
            .any(|p| chain.iter().any(|c| c.starts_with(p)))
}

struct Chain {
    /// The directories holding each link of the symlink chain, and its final target.
    dirs: Vec<PathBuf>,
    /// Each link of the chain and the final target, as absolute paths.
    paths: Vec<PathBuf>,
}

fn chain(path: &Path) -> Chain {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut push = |d: PathBuf| {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    };
    let mut cur = absolute(path);
    // A bounded walk: a symlink loop ends here instead of spinning.
    for _ in 0..16 {
        push(parent_of(&cur));
        paths.push(cur.clone());
        match std::fs::read_link(&cur) {
            Ok(target) => {
                cur = if target.is_absolute() {
                    target
                } else {
                    parent_of(&cur).join(target)
                };
            }
            Err(_) => break,
        }
    }
    // Intermediate directory links (`..data/`) resolve here.
    if let Ok(real) = std::fs::canonicalize(path) {
        push(parent_of(&real));
        paths.push(real);
    }
    Chain { dirs, paths }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    std::env::current_dir()
        .map(|d| d.join(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fingerprint of the file's content (`None` when it cannot be read), so a change in a
/// watched directory that left the config as it was does not reload.
pub fn fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_the_chain_and_the_directories_on_its_way_concern_the_watch() {
        let chain = [
            PathBuf::from("/etc/b/balancer.toml"),
            PathBuf::from("/etc/b/..data/balancer.toml"),
            PathBuf::from("/etc/b/..2026_12_01/balancer.toml"),
        ];
        assert!(concerns(&[PathBuf::from("/etc/b/balancer.toml")], &chain));
        assert!(concerns(&[PathBuf::from("/etc/b/..data")], &chain));
        assert!(concerns(&[], &chain));
        assert!(!concerns(&[PathBuf::from("/etc/b/access.log")], &chain));
        assert!(!concerns(
            &[PathBuf::from("/etc/b/balancer.toml.swp")],
            &chain
        ));
    }

    #[tokio::test]
    async fn writes_to_a_neighbour_file_do_not_wake_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("balancer.toml");
        std::fs::write(&cfg, "a = 1\n").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = ConfigWatch::start(&cfg, tx).unwrap();
        let log = dir.path().join("access.log");
        for i in 0..20 {
            std::fs::write(&log, format!("line {i}\n")).unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "a neighbour's writes woke the controller");
        std::fs::write(&cfg, "a = 2\n").unwrap();
        let woke = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(woke, Ok(Some(()))),
            "the config's own change was missed"
        );
    }
}
