//! Operator intent about one backend: HAProxy's `set server state` and `set server weight`.
//!
//! `POST /pools/{pool}/backends/{address}` writes it; the picker (`balance.rs`) and the health
//! task (`health.rs`) read it; `/status` and `/metrics` show it. It is runtime state, not
//! config: it lives in atomics on the `Arc<Backend>` (as `Backend::intent`), so a reload that
//! keeps the (pool, address) keeps the intent, and a backend that leaves the config takes its
//! intent with it (it comes back as the file says).
//!
//! Weight overrides change the round-robin sequence, which the immutable snapshot built from
//! the file's weights. Rather than scanning every member's override on each pick, a writer
//! bumps one process-wide [`weights_epoch`]; a pool compares it with the epoch it last looked
//! at (one load of a line that is written only by admin requests) and rebuilds its sequence
//! lazily when they differ.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use serde::Deserialize;

/// What the operator wants done with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminMode {
    /// As the file says: takes traffic when healthy.
    Enabled,
    /// No new requests or connections; in-flight requests and tunnels finish; health checks
    /// go on, so `/status` tells whether it is fit to come back.
    Drain,
    /// As `Drain`, and not probed either (a backend being rebuilt would only fail its checks
    /// and fill the log). `healthy` keeps its last value meanwhile.
    Disabled,
}

impl AdminMode {
    pub const ALL: [AdminMode; 3] = [AdminMode::Enabled, AdminMode::Drain, AdminMode::Disabled];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminMode::Enabled => "enabled",
            AdminMode::Drain => "drain",
            AdminMode::Disabled => "disabled",
        }
    }

    fn from_u8(v: u8) -> AdminMode {
        match v {
            1 => AdminMode::Drain,
            2 => AdminMode::Disabled,
            _ => AdminMode::Enabled,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            AdminMode::Enabled => 0,
            AdminMode::Drain => 1,
            AdminMode::Disabled => 2,
        }
    }
}

/// Stored in the weight atomic when the file's weight applies: no valid weight (0..=1000) is
/// anywhere near it.
const NO_OVERRIDE: u32 = u32::MAX;

/// Starts at 1 so that a pool built with epoch 0 looks once before trusting its file weights.
static WEIGHTS_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Bumped after every change of a weight override, anywhere in the process. Pools cache the
/// sequence for the epoch they saw; a new value makes the next pick look again.
pub fn weights_epoch() -> u64 {
    WEIGHTS_EPOCH.load(Ordering::Acquire)
}

/// The operator's intent, on `Backend`. Two independent atomics: a pick reads the mode, and
/// reads the weight only when the pool's epoch says some override may exist.
#[derive(Debug)]
pub struct Intent {
    mode: AtomicU8,
    weight: AtomicU32,
}

impl Default for Intent {
    fn default() -> Self {
        Intent {
            mode: AtomicU8::new(AdminMode::Enabled.to_u8()),
            weight: AtomicU32::new(NO_OVERRIDE),
        }
    }
}

impl Intent {
    pub fn mode(&self) -> AdminMode {
        AdminMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// Whether new requests may go to the backend (weights aside).
    pub fn takes_new(&self) -> bool {
        self.mode.load(Ordering::Relaxed) == AdminMode::Enabled.to_u8()
    }

    /// Whether the health task should skip its probes.
    pub fn skips_health_checks(&self) -> bool {
        self.mode() == AdminMode::Disabled
    }

    /// The weight override, if any.
    pub fn weight(&self) -> Option<u32> {
        match self.weight.load(Ordering::Relaxed) {
            NO_OVERRIDE => None,
            w => Some(w),
        }
    }

    /// The weight picks use: the override, else the file's.
    pub fn effective_weight(&self, configured: u32) -> u32 {
        self.weight().unwrap_or(configured)
    }

    /// Applies a control request. `Enabled` without a weight means "back to the file": it
    /// clears the weight override too, so drain -> deploy -> enable returns to exactly what
    /// the config says.
    pub fn apply(&self, change: &Change) {
        let weight = match (change.state, change.weight) {
            (_, Some(w)) => Some(w),
            (Some(AdminMode::Enabled), None) => None,
            (_, None) => self.weight(),
        };
        if let Some(m) = change.state {
            self.mode.store(m.to_u8(), Ordering::Relaxed);
        }
        let new = weight.unwrap_or(NO_OVERRIDE);
        // Release, then bump: a picker that sees the new epoch also sees this weight.
        if self.weight.swap(new, Ordering::Release) != new {
            WEIGHTS_EPOCH.fetch_add(1, Ordering::Release);
        }
    }
}

/// The body of `POST /pools/{pool}/backends/{address}`: `{"state": ...}`, `{"weight": N}` or
/// both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub state: Option<AdminMode>,
    pub weight: Option<u32>,
}

impl Change {
    /// Parses and checks a request body; the error is the message for the 400 answer.
    pub fn parse(body: &[u8], max_weight: u32) -> Result<Change, String> {
        let c: Change = serde_json::from_slice(body).map_err(|e| {
            format!(
                "invalid body ({e}); expected JSON such as {{\"state\": \"drain\"}} (drain, \
                 disabled or enabled) and/or {{\"weight\": 5}} (0 to {max_weight})"
            )
        })?;
        if c.state.is_none() && c.weight.is_none() {
            return Err("nothing to change: give \"state\" and/or \"weight\"".into());
        }
        if let Some(w) = c.weight {
            if w > max_weight {
                return Err(format!("weight {w} is outside 0 to {max_weight}"));
            }
        }
        Ok(c)
    }
}

/// Splits a request path `/pools/{pool}/backends/{address}` into its two names, percent-decoded, so that `[::1]:80` can be sent as `%5B::1%5D:80`.
pub fn parse_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/pools/")?;
    let (pool, rest) = rest.split_once('/')?;
    let address = rest.strip_prefix("backends/")?;
    if pool.is_empty() || address.is_empty() || address.contains('/') {
        return None;
    }
    Some((percent_decode(pool)?, percent_decode(address)?))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_clears_the_weight_and_changes_bump_the_epoch() {
        let i = Intent::default();
        assert_eq!((i.mode(), i.weight()), (AdminMode::Enabled, None));
        let e0 = weights_epoch();
        i.apply(&Change {
            state: Some(AdminMode::Drain),
            weight: Some(3),
        });
        assert_eq!((i.mode(), i.weight()), (AdminMode::Drain, Some(3)));
        assert!(!i.takes_new());
        assert!(weights_epoch() > e0);
        i.apply(&Change {
            state: Some(AdminMode::Disabled),
            weight: None,
        });
        assert_eq!(i.weight(), Some(3), "a state alone keeps the weight");
        assert!(i.skips_health_checks());
        let e1 = weights_epoch();
        i.apply(&Change {
            state: Some(AdminMode::Enabled),
            weight: None,
        });
        assert_eq!((i.mode(), i.weight()), (AdminMode::Enabled, None));
        assert!(weights_epoch() > e1);
        assert_eq!(i.effective_weight(7), 7);
    }

    #[test]
    fn bodies_and_paths() {
        assert_eq!(
            Change::parse(br#"{"state":"drain"}"#, 1000),
            Ok(Change {
                state: Some(AdminMode::Drain),
                weight: None
            })
        );
        assert!(Change::parse(br#"{"weight":1001}"#, 1000).is_err());
        assert!(Change::parse(br#"{"weight":-1}"#, 1000).is_err());
        assert!(Change::parse(br#"{"state":"off"}"#, 1000).is_err());
        assert!(Change::parse(br#"{}"#, 1000).is_err());
        assert!(Change::parse(br#"{"stat":"drain"}"#, 1000).is_err());
        assert!(Change::parse(b"drain", 1000).is_err());
        assert_eq!(
            parse_path("/pools/web/backends/%5B::1%5D:80"),
            Some(("web".into(), "[::1]:80".into()))
        );
        assert_eq!(parse_path("/pools/web/backends/"), None);
        assert_eq!(parse_path("/pools/web/x/1.2.3.4:80"), None);
        assert_eq!(parse_path("/pools/web/backends/%zz"), None);
    }
}
