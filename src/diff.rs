//! What a reload would change: two configs (or a config and what `/status` shows) compared, as
//! lines for `balancer check --diff` and as one summary for the reload log line.
//!
//! Pure functions over [`Config`]; nothing here reads files or sockets. A backend is the same
//! backend across a reload when its pool name and address are (that is what keeps its health,
//! breaker and counters), so backends are matched on exactly that.

use std::fmt;
use std::time::Duration;

use crate::config::{Config, HostMatch, ListenerConfig, PoolConfig, RouteConfig};

/// What a change is about; the summary counts changes per sign and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Listener,
    Pool,
    Backend,
    Weight,
    Route,
    Setting,
}

/// One line of the diff: `+` added, `-` removed, `~` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub sign: char,
    pub kind: Kind,
    pub text: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.sign, self.text)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub changes: Vec<Change>,
    /// Backends in both (same pool, same address): they keep their state.
    pub kept: usize,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The lines `balancer check --diff` prints: every change, then how many backends keep
    /// their state; `no changes` alone when there are none.
    pub fn lines(&self) -> Vec<String> {
        if self.is_empty() {
            return vec!["no changes".to_owned()];
        }
        let mut out: Vec<String> = self.changes.iter().map(|c| c.to_string()).collect();
        match self.kept {
            0 => {}
            1 => out.push("= 1 backend keeps its state".to_owned()),
            n => out.push(format!("= {n} backends keep their state")),
        }
        out
    }

    /// One line for a log: `+1 backend, ~1 weight, routes changed`, or `none`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let count = |sign: char, kind: Kind| {
            self.changes
                .iter()
                .filter(|c| c.sign == sign && c.kind == kind)
                .count()
        };
        for (kind, one, many) in [
            (Kind::Listener, "listener", "listeners"),
            (Kind::Pool, "pool", "pools"),
            (Kind::Backend, "backend", "backends"),
        ] {
            for sign in ['+', '-', '~'] {
                let n = count(sign, kind);
                if n > 0 {
                    parts.push(format!("{sign}{n} {}", if n == 1 { one } else { many }));
                }
            }
        }
        let n = count('~', Kind::Weight);
        if n > 0 {
            parts.push(format!("~{n} weight{}", if n == 1 { "" } else { "s" }));
        }
        if self.changes.iter().any(|c| c.kind == Kind::Route) {
            parts.push("routes changed".to_owned());
        }
        let n = self
            .changes
            .iter()
            .filter(|c| c.kind == Kind::Setting)
            .count();
        if n > 0 {
            parts.push(format!(
                "{n} setting{} changed",
                if n == 1 { "" } else { "s" }
            ));
        }
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }

    fn push(&mut self, sign: char, kind: Kind, text: impl Into<String>) {
        self.changes.push(Change {
            sign,
            kind,
            text: text.into(),
        });
    }

    /// `~ key old -> new` when they differ.
    fn setting<T: PartialEq>(&mut self, key: &str, old: T, new: T, show: impl Fn(&T) -> String) {
        if old != new {
            self.push(
                '~',
                Kind::Setting,
                format!("{key} {} -> {}", show(&old), show(&new)),
            );
        }
    }
}

/// A pool as both a config and `/status` can describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    pub strategy: String,
    /// What the pool speaks to its backends; empty when a `/status` does not say.
    pub protocol: String,
    /// `(address as written, weight)`, in order.
    pub backends: Vec<(String, u32)>,
}

pub fn pool_views(c: &Config) -> Vec<PoolView> {
    c.pools
        .iter()
        .map(|p| PoolView {
            name: p.name.clone(),
            strategy: p.strategy.as_str().to_owned(),
            protocol: p.protocol.as_str().to_owned(),
            backends: p
                .backends
                .iter()
                .map(|b| (b.address.clone(), b.weight))
                .collect(),
        })
        .collect()
}

/// The pools of a `GET /status` answer. The configured weight is compared when `/status` shows
/// one (an operator's runtime weight is not something a reload changes).
pub fn status_pools(status: &serde_json::Value) -> Result<Vec<PoolView>, String> {
    let pools = status
        .get("pools")
        .and_then(|p| p.as_object())
        .ok_or("the answer has no \"pools\" object")?;
    let mut out = Vec::with_capacity(pools.len());
    for (name, p) in pools {
        let strategy = p
            .get("strategy")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned();
        let protocol = p
            .get("protocol")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned();
        let list = p
            .get("backends")
            .and_then(|b| b.as_array())
            .ok_or_else(|| format!("pool {name:?} has no \"backends\" list"))?;
        let mut backends = Vec::with_capacity(list.len());
        for b in list {
            let address = b
                .get("address")
                .and_then(|a| a.as_str())
                .ok_or_else(|| format!("a backend of pool {name:?} has no address"))?;
            let weight = b
                .get("configured_weight")
                .or_else(|| b.get("weight"))
                .and_then(|w| w.as_u64())
                .and_then(|w| u32::try_from(w).ok())
                .unwrap_or(1);
            backends.push((address.to_owned(), weight));
        }
        out.push(PoolView {
            name: name.clone(),
            strategy,
            protocol,
            backends,
        });
    }
    Ok(out)
}

/// Pools and backends only: what both a config and `/status` show.
pub fn pools(old: &[PoolView], new: &[PoolView]) -> Diff {
    let mut d = Diff::default();
    pools_into(&mut d, old, new);
    d
}

fn pools_into(d: &mut Diff, old: &[PoolView], new: &[PoolView]) {
    for o in old {
        if !new.iter().any(|n| n.name == o.name) {
            d.push('-', Kind::Pool, format!("pool {}", o.name));
            for (addr, _) in &o.backends {
                d.push('-', Kind::Backend, format!("backend {} {addr}", o.name));
            }
        }
    }
    for n in new {
        let Some(o) = old.iter().find(|o| o.name == n.name) else {
            d.push('+', Kind::Pool, format!("pool {} ({})", n.name, n.strategy));
            for (addr, w) in &n.backends {
                d.push('+', Kind::Backend, backend_text(&n.name, addr, *w));
            }
            continue;
        };
        if o.strategy != n.strategy && !o.strategy.is_empty() {
            d.push(
                '~',
                Kind::Setting,
                format!("pool {} strategy {} -> {}", n.name, o.strategy, n.strategy),
            );
        }
        // Compared here rather than with the other pool settings, so that a running
        // balancer's `/status` shows a protocol switch too.
        if o.protocol != n.protocol && !o.protocol.is_empty() && !n.protocol.is_empty() {
            d.push(
                '~',
                Kind::Setting,
                format!("pool {} protocol {} -> {}", n.name, o.protocol, n.protocol),
            );
        }
        for (addr, _) in &o.backends {
            if !n.backends.iter().any(|(a, _)| a == addr) {
                d.push('-', Kind::Backend, format!("backend {} {addr}", n.name));
            }
        }
        for (addr, w) in &n.backends {
            match o.backends.iter().find(|(a, _)| a == addr) {
                None => d.push('+', Kind::Backend, backend_text(&n.name, addr, *w)),
                Some((_, ow)) => {
                    d.kept += 1;
                    if ow != w {
                        d.push(
                            '~',
                            Kind::Weight,
                            format!("backend {} {addr} weight {ow} -> {w}", n.name),
                        );
                    }
                }
            }
        }
    }
}

fn backend_text(pool: &str, addr: &str, weight: u32) -> String {
    if weight == crate::config::DEFAULT_WEIGHT {
        format!("backend {pool} {addr}")
    } else {
        format!("backend {pool} {addr} weight {weight}")
    }
}

/// Everything a reload from `old` to `new` would change.
pub fn configs(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    listeners(&mut d, &old.listeners, &new.listeners);
    match (&old.admin, &new.admin) {
        (None, Some(a)) => d.push('+', Kind::Setting, format!("admin {}", a.bind)),
        (Some(a), None) => d.push('-', Kind::Setting, format!("admin {}", a.bind)),
        (Some(a), Some(b)) => d.setting("admin.bind", a.bind, b.bind, |v| v.to_string()),
        (None, None) => {}
    }
    pools_into(&mut d, &pool_views(old), &pool_views(new));
    for n in &new.pools {
        if let Some(o) = old.pools.iter().find(|o| o.name == n.name) {
            pool_settings(&mut d, o, n);
        }
    }
    routes(&mut d, &old.routes, &new.routes);
    match (&old.cache, &new.cache) {
        (None, Some(_)) => d.push('+', Kind::Setting, "cache"),
        (Some(_), None) => d.push('-', Kind::Setting, "cache (everything stored is dropped)"),
        (Some(a), Some(b)) => {
            // Either size changing starts an empty cache (see cache::Cache::carry).
            d.setting("cache.max_size", a.max_size, b.max_size, |v| v.to_string());
            d.setting(
                "cache.max_object_size",
                a.max_object_size,
                b.max_object_size,
                |v| v.to_string(),
            );
            d.setting(
                "cache.stale_if_error",
                a.stale_if_error,
                b.stale_if_error,
                |v| humantime::format_duration(*v).to_string(),
            );
        }
        (None, None) => {}
    }

    let dur = |v: &Duration| humantime::format_duration(*v).to_string();
    let show = |v: &dyn fmt::Display| v.to_string();
    d.setting(
        "shutdown_grace",
        old.shutdown_grace,
        new.shutdown_grace,
        dur,
    );
    d.setting("watch", old.watch, new.watch, |v| show(v));
    d.setting("log.access", old.log.access, new.log.access, |v| show(v));
    d.setting("log.level", &old.log.level, &new.log.level, |v| show(v));
    let (a, b) = (&old.limits, &new.limits);
    d.setting(
        "limits.max_header_bytes",
        a.max_header_bytes,
        b.max_header_bytes,
        |v| show(v),
    );
    d.setting(
        "limits.max_body_bytes",
        a.max_body_bytes,
        b.max_body_bytes,
        |v| show(v),
    );
    d.setting(
        "limits.header_timeout",
        a.header_timeout,
        b.header_timeout,
        dur,
    );
    d.setting(
        "limits.max_connections",
        a.max_connections,
        b.max_connections,
        |v| show(v),
    );
    d.setting("limits.idle_timeout", a.idle_timeout, b.idle_timeout, dur);
    d.setting(
        "limits.allow_underscores_in_headers",
        a.allow_underscores_in_headers,
        b.allow_underscores_in_headers,
        |v| show(v),
    );
    d
}

fn listeners(d: &mut Diff, old: &[ListenerConfig], new: &[ListenerConfig]) {
    let tls = |l: &ListenerConfig| if l.tls.is_some() { " (tls)" } else { "" };
    for o in old {
        if !new.iter().any(|n| n.bind == o.bind) {
            d.push(
                '-',
                Kind::Listener,
                format!("listener {}{}", o.bind, tls(o)),
            );
        }
    }
    for n in new {
        match old.iter().find(|o| o.bind == n.bind) {
            None => d.push(
                '+',
                Kind::Listener,
                format!("listener {}{}", n.bind, tls(n)),
            ),
            Some(o) if o.tls != n.tls => {
                let what = match (&o.tls, &n.tls) {
                    (None, Some(_)) => "plain -> tls",
                    (Some(_), None) => "tls -> plain",
                    _ => "certificates changed",
                };
                d.push('~', Kind::Listener, format!("listener {} {what}", n.bind));
            }
            Some(_) => {}
        }
    }
}

fn pool_settings(d: &mut Diff, o: &PoolConfig, n: &PoolConfig) {
    let key = |k: &str| format!("pool {} {k}", n.name);
    let dur = |v: &Duration| humantime::format_duration(*v).to_string();
    let num = |v: &u32| v.to_string();
    d.setting(&key("tls"), &o.tls, &n.tls, |t| match t {
        None => "off".to_owned(),
        Some(t) => match (&t.ca, &t.server_name) {
            (None, None) => "on".to_owned(),
            (ca, sn) => format!(
                "{{ ca = {}, server_name = {} }}",
                ca.as_ref()
                    .map_or("system".into(), |c| c.display().to_string()),
                sn.as_deref().unwrap_or("from the address")
            ),
        },
    });
    match (&o.health_check, &n.health_check) {
        (None, Some(_)) => d.push('+', Kind::Setting, key("health_check")),
        (Some(_), None) => d.push('-', Kind::Setting, key("health_check")),
        (Some(a), Some(b)) => {
            d.setting(&key("health_check.kind"), a.kind, b.kind, |v| {
                v.as_str().to_owned()
            });
            d.setting(&key("health_check.service"), &a.service, &b.service, |v| {
                format!("{v:?}")
            });
            d.setting(&key("health_check.path"), &a.path, &b.path, |v| {
                v.to_string()
            });
            d.setting(&key("health_check.interval"), a.interval, b.interval, dur);
            d.setting(&key("health_check.timeout"), a.timeout, b.timeout, dur);
            d.setting(
                &key("health_check.healthy_threshold"),
                a.healthy_threshold,
                b.healthy_threshold,
                num,
            );
            d.setting(
                &key("health_check.unhealthy_threshold"),
                a.unhealthy_threshold,
                b.unhealthy_threshold,
                num,
            );
        }
        (None, None) => {}
    }
    let (a, b) = (&o.breaker, &n.breaker);
    d.setting(
        &key("circuit_breaker.consecutive_failures"),
        a.consecutive_failures,
        b.consecutive_failures,
        num,
    );
    d.setting(
        &key("circuit_breaker.open_duration"),
        a.open_duration,
        b.open_duration,
        dur,
    );
    d.setting(
        &key("circuit_breaker.half_open_requests"),
        a.half_open_requests,
        b.half_open_requests,
        num,
    );
    d.setting(
        &key("circuit_breaker.failure_statuses"),
        a.failure_statuses,
        b.failure_statuses,
        |s| format!("{:?}", s.iter().collect::<Vec<_>>()),
    );
    d.setting(
        &key("circuit_breaker.max_ejected_percent"),
        a.max_ejected_percent,
        b.max_ejected_percent,
        |v| v.to_string(),
    );
    let (a, b) = (&o.timeouts, &n.timeouts);
    d.setting(&key("timeouts.connect"), a.connect, b.connect, dur);
    d.setting(&key("timeouts.response"), a.response, b.response, dur);
    d.setting(&key("timeouts.idle"), a.idle, b.idle, dur);
    d.setting(&key("retries.attempts"), o.attempts, n.attempts, num);
}

/// `api.example.com/v1 -> api`, `*.example.com/ -> web`, `/static -> files`.
fn route_text(r: &RouteConfig) -> String {
    let host = match &r.host {
        None => String::new(),
        Some(HostMatch::Exact(h)) => h.clone(),
        Some(HostMatch::Suffix(s)) => format!("*{s}"),
    };
    let cached = if r.cache { " (cached)" } else { "" };
    format!("route {host}{} -> {}{cached}", r.path_prefix, r.pool)
}

/// Routes are an ordered list (first match wins): removed and added ones by value, and a
/// reordering of the same routes said as such.
fn routes(d: &mut Diff, old: &[RouteConfig], new: &[RouteConfig]) {
    let same = |a: &RouteConfig, b: &RouteConfig| {
        a.host == b.host && a.path_prefix == b.path_prefix && a.pool == b.pool && a.cache == b.cache
    };
    if old.len() == new.len() && old.iter().zip(new).all(|(a, b)| same(a, b)) {
        return;
    }
    let before = d.changes.len();
    for o in old {
        if !new.iter().any(|n| same(n, o)) {
            d.push('-', Kind::Route, route_text(o));
        }
    }
    for n in new {
        if !old.iter().any(|o| same(n, o)) {
            d.push('+', Kind::Route, route_text(n));
        }
    }
    if d.changes.len() == before {
        d.push('~', Kind::Route, "routes reordered (first match wins)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        match Config::parse(text, "t.toml", None) {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    const BASE: &str = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\
        [[routes]]\npath_prefix = \"/api\"\npool = \"web\"\n\
        [pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n";

    #[test]
    fn equal_configs_have_no_changes() {
        let d = configs(&cfg(BASE), &cfg(BASE));
        assert!(d.is_empty());
        assert_eq!(d.lines(), ["no changes"]);
        assert_eq!(d.summary(), "none");
        assert_eq!(d.kept, 2);
    }

    #[test]
    fn cache_changes_are_named() {
        let cached = BASE.replace("pool = \"web\"\n", "pool = \"web\"\ncache = true\n")
            + "[cache]\nmax_size = \"1MiB\"\n";
        let d = configs(&cfg(BASE), &cfg(&cached));
        assert_eq!(
            d.lines()[..3],
            [
                "- route /api -> web",
                "+ route /api -> web (cached)",
                "+ cache"
            ]
        );
        let bigger = cached.replace("1MiB", "2MiB");
        let d = configs(&cfg(&cached), &cfg(&bigger));
        assert_eq!(d.lines()[0], "~ cache.max_size 1048576 -> 2097152");
    }

    #[test]
    fn every_kind_of_change_is_one_line() {
        let new = "watch = false\n[[listeners]]\nbind = \"127.0.0.1:8080\"\n\
            [[listeners]]\nbind = \"127.0.0.1:8081\"\n\
            [[routes]]\npath_prefix = \"/v2\"\npool = \"web\"\n\
            [pools.web]\nbackends = [{ address = \"127.0.0.1:9001\", weight = 3 }, \"127.0.0.1:9003\"]\n\
            [pools.web.timeouts]\nconnect = \"1s\"\n";
        let d = configs(&cfg(BASE), &cfg(new));
        assert_eq!(
            d.lines(),
            [
                "+ listener 127.0.0.1:8081",
                "- backend web 127.0.0.1:9002",
                "~ backend web 127.0.0.1:9001 weight 1 -> 3",
                "+ backend web 127.0.0.1:9003",
                "~ pool web timeouts.connect 2s -> 1s",
                "- route /api -> web",
                "+ route /v2 -> web",
                "~ watch true -> false",
                "= 1 backend keeps its state",
            ]
        );
        assert_eq!(
            d.summary(),
            "+1 listener, +1 backend, -1 backend, ~1 weight, routes changed, 2 settings changed"
        );
    }

    #[test]
    fn pools_from_status_compare_with_the_config() {
        let status = serde_json::json!({
            "config": { "version": 3 },
            "pools": { "web": { "strategy": "round_robin", "backends": [
                { "address": "127.0.0.1:9001", "weight": 5, "configured_weight": 2 },
                { "address": "127.0.0.1:9002", "weight": 1 }
            ] } }
        });
        let running = status_pools(&status).unwrap();
        let d = pools(&running, &pool_views(&cfg(BASE)));
        assert_eq!(
            d.lines(),
            [
                "~ backend web 127.0.0.1:9001 weight 2 -> 1",
                "= 2 backends keep their state"
            ]
        );
        assert!(status_pools(&serde_json::json!({})).is_err());
    }

    #[test]
    fn a_protocol_in_status_compares_with_the_config() {
        let status = serde_json::json!({
            "pools": { "web": { "strategy": "round_robin", "protocol": "http1", "backends": [
                { "address": "127.0.0.1:9001", "weight": 1 },
                { "address": "127.0.0.1:9002", "weight": 1 }
            ] } }
        });
        let running = status_pools(&status).unwrap();
        let h2c = BASE.replace("[pools.web]\n", "[pools.web]\nprotocol = \"h2c\"\n");
        assert_ne!(h2c, BASE);
        let d = pools(&running, &pool_views(&cfg(&h2c)));
        assert!(
            d.lines()
                .contains(&"~ pool web protocol http1 -> h2c".to_owned()),
            "{:?}",
            d.lines()
        );
    }

    #[test]
    fn reordered_routes_are_said_so() {
        let a = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[[routes]]\npath_prefix = \"/a\"\npool = \"web\"\n\
                 [[routes]]\npath_prefix = \"/b\"\npool = \"web\"\n[pools.web]\nbackends = [\"127.0.0.1:1\"]\n";
        let b = a
            .replace("\"/a\"", "\"/x\"")
            .replace("\"/b\"", "\"/a\"")
            .replace("\"/x\"", "\"/b\"");
        let d = configs(&cfg(a), &cfg(&b));
        assert_eq!(d.lines()[0], "~ routes reordered (first match wins)");
        assert_eq!(d.summary(), "routes changed");
    }
}
