//! Watching the config file for `watch = true`.
//!
//! Editors save by writing a new file and renaming it over the old one, and Kubernetes
//! mounts a ConfigMap as `balancer.toml -> ..data/balancer.toml` with `..data` a symlink that
//! is swapped atomically (`mv -T`). Watching the file itself (an inode) misses both, so this
//! watches the directories along the whole symlink chain and reports any change in them; the
//! control task then compares the file's content with what it last loaded and reloads only
//! when it differs. The set of directories is recomputed after every change, since a swap
//! moves the chain's end.

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
        let dirs = chain_dirs(path);
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let Ok(ev) = ev else { return };
            if !ev.kind.is_access() {
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
        chain_dirs(path) != self.dirs
    }
}

/// The directories holding each link of `path`'s symlink chain, and its final target.
fn chain_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut push = |d: PathBuf| {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    };
    let mut cur = absolute(path);
    // A bounded walk: a symlink loop ends here instead of spinning.
    for _ in 0..16 {
        push(parent_of(&cur));
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
    }
    dirs
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
