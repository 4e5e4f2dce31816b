//! Diagnostic logging (tracing) on stderr; the access log owns stdout (`accesslog`).
//!
//! - Colour only when stderr is a terminal and `NO_COLOR` is unset or empty
//!   (<https://no-color.org>): escape codes in a file or a journal are noise.
//! - The level is `[log] level`, applied again on every reload through a
//!   `tracing_subscriber::reload` handle, unless `RUST_LOG` is set: an operator who set it is
//!   debugging and wants it to stick.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

struct Level {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The `[log] level` in force, so that a reload that keeps it changes nothing.
    current: Mutex<String>,
}

/// Set by `init` when the level follows the config (not when `RUST_LOG` rules, and not in
/// tests that run the balancer in-process without `init`).
static LEVEL: OnceLock<Level> = OnceLock::new();

/// Whether to write ANSI colours, given whether stderr is a terminal and `NO_COLOR`.
pub fn use_color(stderr_is_tty: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_tty && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. `level` is `[log] level` (already validated by the config).
pub fn init(level: &str) {
    let color = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let from_env = std::env::var_os("RUST_LOG")
        .is_some()
        .then(EnvFilter::try_from_default_env)
        .and_then(Result::ok);
    let follows_config = from_env.is_none();
    let filter = from_env.unwrap_or_else(|| config_filter(level));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(color)
        .with_writer(std::io::stderr);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_err()
    {
        // Someone installed a subscriber first (an embedding program): leave theirs alone.
        return;
    }
    if follows_config {
        let _ = LEVEL.set(Level {
            handle,
            current: Mutex::new(level.to_owned()),
        });
    }
}

fn config_filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("warning: log level {level:?}: {e}; using info");
        EnvFilter::new("info")
    })
}

/// SIGUSR1: reopens the access log file at its configured path (logrotate renamed the old
/// one). The diagnostic log is stderr, which a supervisor owns; stdout is never reopened.
pub fn reopen_files() {
    match crate::accesslog::reopen() {
        Some(p) => tracing::info!(path = %p.display(), "SIGUSR1: reopening the access log file"),
        None => tracing::info!("SIGUSR1: no log files to reopen (access log on stdout)"),
    }
}

/// Applies `[log] level` after a reload. A no-op when `RUST_LOG` is set, when the level did
/// not change, or without `init`.
pub fn set_level(level: &str) {
    let Some(l) = LEVEL.get() else { return };
    let Ok(mut current) = l.current.lock() else {
        return;
    };
    if *current == level {
        return;
    }
    let filter = match EnvFilter::try_new(level) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(level, error = %e, "log level not applied");
            return;
        }
    };
    match l.handle.reload(filter) {
        Ok(()) => {
            tracing::info!(from = %*current, to = level, "log level changed");
            *current = level.to_owned();
        }
        Err(e) => tracing::warn!(level, error = %e, "log level not applied"),
    }
}

#[cfg(test)]
mod tests {
    use super::use_color;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_color(true, None));
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(false, None));
        assert!(!use_color(false, Some(OsStr::new(""))));
    }
}
