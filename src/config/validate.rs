//! Raw structs -> typed [`Config`], one function per section, in file order of the contract:
//! admin, log, listeners, limits, pools, routes.
//!
//! Every check that can fail names the dotted key and the position of the offending value; a
//! missing value takes its default from the typed struct's `Default`, so each default is
//! written once, as a `DEFAULT_*` const in `mod.rs`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::*;
use super::span::{ConfigError, Source};
use super::*;
use crate::auth::AdminToken;

pub(super) struct Validator<'a> {
    pub src: Source<'a>,
    /// Relative certificate paths are resolved against it, so the config works from any
    /// working directory.
    pub base_dir: Option<&'a Path>,
    /// Every error found so far: validation goes on after one, so `balancer check` shows all
    /// of a file's mistakes in one run instead of one per edit.
    pub errors: RefCell<Vec<ConfigError>>,
    /// Legal but almost surely not what the operator meant.
    pub warnings: RefCell<Vec<ConfigError>>,
}

impl Validator<'_> {
    /// Every section is validated even after an error, each bad value replaced by its default
    /// so that the rest can still be checked; the caller decides from `errors` whether the
    /// returned config may be used.
    pub fn validate(&self, raw: RawConfig) -> Config {
        let shutdown_grace = self.keep(
            self.duration(
                &raw.shutdown_grace,
                "shutdown_grace",
                DEFAULT_SHUTDOWN_GRACE,
                true,
            ),
            DEFAULT_SHUTDOWN_GRACE,
        );
        let admin = match &raw.admin {
            Some(a) => self.keep(self.admin(a).map(Some), None),
            None => None,
        };
        let log = match &raw.log {
            Some(l) => self.log(l),
            None => LogConfig::default(),
        };
        let listeners = self.listeners(&raw.listeners, admin.as_ref());
        let limits = match &raw.limits {
            Some(l) => self.limits(l),
            None => Limits::default(),
        };
        let pools = self.pools(&raw);
        let cache = raw.cache.as_ref().map(|c| self.cache(c));
        let routes: Vec<RouteConfig> = raw
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| self.route(r, i, &pools, cache.is_some()))
            .collect();
        let config = Config {
            shutdown_grace,
            watch: raw.watch.unwrap_or(DEFAULT_WATCH),
            admin,
            log,
            listeners,
            limits,
            routes,
            pools,
            cache,
        };
        self.warn(&raw, &config);
        config
    }

    /// Records the error of `r`, if any, and goes on with `fallback`.
    fn keep<T>(&self, r: Result<T, ConfigError>, fallback: T) -> T {
        r.unwrap_or_else(|e| {
            self.report(e);
            fallback
        })
    }

    fn report(&self, e: ConfigError) {
        self.errors.borrow_mut().push(e);
    }

    fn admin(&self, a: &RawAdmin) -> Result<AdminConfig, ConfigError> {
        let bind = self.address(&a.bind, "admin.bind")?;
        let token = match &a.token_file {
            Some(f) => Some(
                AdminToken::read(&self.path(f, "admin.token_file")?)
                    .map_err(|m| self.src.err(f.span(), "admin.token_file", m))?,
            ),
            // The admin API can drain every backend and reload the config: without a token
            // only local users may reach it.
            None if !bind.ip().is_loopback() => {
                return Err(self.src.err(
                    a.bind.span(),
                    "admin.bind",
                    format!(
                        "{bind} is not a loopback address and [admin] has no token_file: anyone \
                         who can reach it could drain backends and reload the config; bind to \
                         127.0.0.1 or [::1], or set token_file"
                    ),
                ))
            }
            None => None,
        };
        Ok(AdminConfig { bind, token })
    }

    fn log(&self, l: &RawLog) -> LogConfig {
        let d = LogConfig::default();
        let level = match &l.level {
            None => d.level,
            Some(s) => {
                let lvl = s.get_ref().trim().to_ascii_lowercase();
                if ["trace", "debug", "info", "warn", "error", "off"].contains(&lvl.as_str()) {
                    lvl
                } else {
                    self.report(self.src.err(
                        s.span(),
                        "log.level",
                        format!(
                            "unknown level {:?} (trace, debug, info, warn, error or off)",
                            s.get_ref()
                        ),
                    ));
                    d.level
                }
            }
        };
        let access_file = match &l.access_file {
            // "" is the contract's way of saying stdout.
            Some(p) if !p.get_ref().trim().is_empty() => {
                self.keep(self.path(p, "log.access_file").map(Some), None)
            }
            Some(_) => None,
            None => d.access_file.clone(),
        };
        let request_id_header = match &l.request_id_header {
            None => d.request_id_header.clone(),
            Some(s) => self.keep(self.request_id_header(s), d.request_id_header.clone()),
        };
        LogConfig {
            access: l.access.unwrap_or(d.access),
            level,
            access_file,
            request_id_header,
        }
    }

    /// `""` turns request IDs off. A header the balancer owns or that frames the message
    /// cannot carry them: the ID would be stripped, or would overwrite it.
    fn request_id_header(
        &self,
        s: &Spanned<String>,
    ) -> Result<Option<http::HeaderName>, ConfigError> {
        let key = "log.request_id_header";
        let raw = s.get_ref().trim();
        if raw.is_empty() {
            return Ok(None);
        }
        let name = http::HeaderName::from_bytes(raw.as_bytes()).map_err(|_| {
            self.src
                .err(s.span(), key, format!("{raw:?} is not a valid header name"))
        })?;
        const RESERVED: [&str; 16] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "http2-settings",
            "host",
            "content-length",
            "content-type",
            "expect",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "traceparent",
        ];
        if RESERVED.contains(&name.as_str()) {
            return Err(self.src.err(
                s.span(),
                key,
                format!("{raw:?} cannot carry request IDs: the balancer removes or sets it"),
            ));
        }
        // The default name costs nothing to clone per request (a static); others share one
        // allocation.
        Ok(Some(if name == DEFAULT_REQUEST_ID_HEADER {
            http::HeaderName::from_static(DEFAULT_REQUEST_ID_HEADER)
        } else {
            name
        }))
    }

    fn listeners(&self, raw: &[RawListener], admin: Option<&AdminConfig>) -> Vec<ListenerConfig> {
        if raw.is_empty() {
            self.report(
                self.src
                    .err_nowhere("listeners", "at least one [[listeners]] is required"),
            );
        }
        let mut listeners = Vec::with_capacity(raw.len());
        let mut bound = HashSet::new();
        for (i, l) in raw.iter().enumerate() {
            let key = format!("listeners[{i}].bind");
            let bind = match self.address(&l.bind, &key) {
                Ok(b) => b,
                Err(e) => {
                    self.report(e);
                    continue;
                }
            };
            if !bound.insert(bind) {
                self.report(self.src.err(
                    l.bind.span(),
                    key,
                    format!("{bind} is already used by another listener"),
                ));
                continue;
            }
            if admin.is_some_and(|a| a.bind == bind) {
                self.report(self.src.err(
                    l.bind.span(),
                    key,
                    format!("{bind} is also the admin address"),
                ));
                continue;
            }
            let tls = match &l.tls {
                None => None,
                Some(t) => self.keep(self.listener_tls(t, i).map(Some), None),
            };
            listeners.push(ListenerConfig { bind, tls });
        }
        listeners
    }

    fn listener_tls(
        &self,
        t: &Spanned<RawListenerTls>,
        i: usize,
    ) -> Result<ListenerTls, ConfigError> {
        let key = format!("listeners[{i}].tls");
        let raw = t.get_ref();
        let mut certificates = Vec::new();
        match (&raw.cert, &raw.key) {
            (Some(c), Some(k)) => certificates.push(CertPair {
                cert: self.path(c, &format!("{key}.cert"))?,
                key: self.path(k, &format!("{key}.key"))?,
            }),
            (None, None) => {}
            _ => return Err(self.src.err(t.span(), key, "`cert` and `key` go together")),
        }
        if let Some(list) = &raw.certificates {
            if !certificates.is_empty() {
                return Err(self.src.err(
                    t.span(),
                    key,
                    "use either `cert`/`key` or [[listeners.tls.certificates]], not both",
                ));
            }
            for (j, c) in list.iter().enumerate() {
                let c = c.get_ref();
                certificates.push(CertPair {
                    cert: self.path(&c.cert, &format!("{key}.certificates[{j}].cert"))?,
                    key: self.path(&c.key, &format!("{key}.certificates[{j}].key"))?,
                });
            }
        }
        if certificates.is_empty() {
            return Err(self
                .src
                .err(t.span(), key, "no certificate: set `cert` and `key`"));
        }
        Ok(ListenerTls { certificates })
    }

    fn limits(&self, l: &RawLimits) -> Limits {
        let d = Limits::default();
        let max_header_bytes = match self.size(
            &l.max_header_bytes,
            "limits.max_header_bytes",
            d.max_header_bytes,
        ) {
            Ok(n) if (MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&n) => n,
            Ok(n) => {
                let span = l
                    .max_header_bytes
                    .as_ref()
                    .map(|s| s.span())
                    .unwrap_or(0..0);
                self.report(self.src.err(
                    span,
                    "limits.max_header_bytes",
                    format!(
                        "{n} bytes is outside {MIN_HEADER_BYTES} (1KiB) to \
                         {MAX_HEADER_BYTES} (1MiB)"
                    ),
                ));
                d.max_header_bytes
            }
            Err(e) => {
                self.report(e);
                d.max_header_bytes
            }
        };
        let max_connections = match &l.max_connections {
            None => d.max_connections,
            Some(v) => match u64::try_from(*v.get_ref()) {
                Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => n,
                _ => {
                    self.report(self.src.err(
                        v.span(),
                        "limits.max_connections",
                        format!("must be an integer from 1 to {MAX_CONNECTIONS}"),
                    ));
                    d.max_connections
                }
            },
        };
        Limits {
            max_header_bytes,
            max_body_bytes: self.keep(
                self.size(&l.max_body_bytes, "limits.max_body_bytes", d.max_body_bytes),
                d.max_body_bytes,
            ),
            header_timeout: self.keep(
                self.duration(
                    &l.header_timeout,
                    "limits.header_timeout",
                    d.header_timeout,
                    false,
                ),
                d.header_timeout,
            ),
            max_connections,
            idle_timeout: self.keep(
                self.duration(
                    &l.idle_timeout,
                    "limits.idle_timeout",
                    d.idle_timeout,
                    false,
                ),
                d.idle_timeout,
            ),
            allow_underscores_in_headers: l
                .allow_underscores_in_headers
                .unwrap_or(d.allow_underscores_in_headers),
        }
    }

    fn pools(&self, raw: &RawConfig) -> Vec<PoolConfig> {
        if raw.pools.is_empty() {
            self.report(
                self.src
                    .err_nowhere("pools", "at least one [pools.NAME] is required"),
            );
        }
        // BTreeMap sorts by name; restore file order from the spans.
        let mut raw_pools: Vec<_> = raw.pools.iter().collect();
        raw_pools.sort_by_key(|(name, _)| name.span().start);
        raw_pools
            .into_iter()
            .map(|(name, p)| self.pool(name, p))
            .collect()
    }

    /// A pool with errors is still returned (with defaults in their place), so that routes
    /// naming it are not reported as naming a missing pool.
    fn pool(&self, name: &Spanned<String>, p: &Spanned<RawPool>) -> PoolConfig {
        let n = name.get_ref();
        let key = |k: &str| format!("pools.{n}.{k}");
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            self.report(self.src.err(
                name.span(),
                format!("pools.{n}"),
                "pool names use letters, digits, '_', '-' and '.'",
            ));
        }
        let raw = p.get_ref();
        let strategy = match &raw.strategy {
            None => StrategyKind::default(),
            Some(s) => match s.get_ref().as_str() {
                "round_robin" => StrategyKind::RoundRobin,
                "least_connections" => StrategyKind::LeastConnections,
                other => {
                    self.report(self.src.err(
                        s.span(),
                        key("strategy"),
                        format!("unknown strategy {other:?} (round_robin or least_connections)"),
                    ));
                    StrategyKind::default()
                }
            },
        };
        let backends = self.backends(n, p);
        let tls = match &raw.tls {
            None => None,
            Some(t) => self.keep(self.upstream_tls(t.get_ref(), &key), None),
        };
        let protocol = self.protocol(raw, tls.is_some(), &key);
        let health_check = raw
            .health_check
            .as_ref()
            .map(|h| self.health_check(h, &key));
        let breaker = match &raw.circuit_breaker {
            None => BreakerPolicy::default(),
            Some(b) => self.breaker(b, &key),
        };
        let timeouts = match &raw.timeouts {
            None => Timeouts::default(),
            Some(t) => self.timeouts(t, &key),
        };
        let attempts = match &raw.retries {
            None => DEFAULT_ATTEMPTS,
            Some(r) => self.keep(
                self.count(
                    &r.attempts,
                    &key("retries.attempts"),
                    DEFAULT_ATTEMPTS,
                    1,
                    MAX_ATTEMPTS,
                ),
                DEFAULT_ATTEMPTS,
            ),
        };
        PoolConfig {
            name: n.clone(),
            strategy,
            backends,
            tls,
            protocol,
            health_check,
            breaker,
            timeouts,
            attempts,
        }
    }

    fn backends(&self, n: &str, p: &Spanned<RawPool>) -> Vec<BackendConfig> {
        let key = format!("pools.{n}.backends");
        let Some(list) = &p.get_ref().backends else {
            self.report(
                self.src
                    .err(p.span(), key, "a pool needs at least one backend"),
            );
            return Vec::new();
        };
        if list.get_ref().is_empty() {
            self.report(
                self.src
                    .err(list.span(), key, "a pool needs at least one backend"),
            );
            return Vec::new();
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(list.get_ref().len());
        for (i, b) in list.get_ref().iter().enumerate() {
            let bkey = format!("{key}[{i}]");
            let (address, weight, backup) = match b.get_ref() {
                RawBackend::Plain(s) => (Spanned::new(b.span(), s.clone()), DEFAULT_WEIGHT, false),
                RawBackend::Table(t) => {
                    let w = match &t.weight {
                        None => DEFAULT_WEIGHT,
                        Some(w) => match u32::try_from(*w.get_ref()) {
                            Ok(v) if v <= MAX_WEIGHT => v,
                            _ => {
                                self.report(self.src.err(
                                    w.span(),
                                    format!("{bkey}.weight"),
                                    format!(
                                        "weight must be an integer from 0 to {MAX_WEIGHT}, not {}",
                                        w.get_ref()
                                    ),
                                ));
                                DEFAULT_WEIGHT
                            }
                        },
                    };
                    (t.address.clone(), w, t.backup.unwrap_or(false))
                }
            };
            let addr = match self.address(&address, &bkey) {
                Ok(a) => a,
                Err(e) => {
                    self.report(e);
                    continue;
                }
            };
            let address = address.into_inner();
            if backends.iter().any(|o| o.address == address) {
                self.report(self.src.err(
                    b.span(),
                    bkey,
                    format!("{address} is listed twice in this pool (use weight instead)"),
                ));
                continue;
            }
            backends.push(BackendConfig {
                address,
                addr,
                weight,
                backup,
            });
        }
        backends
    }

    /// `protocol`, checked against the pool's `tls`: h2 is only ever negotiated over TLS (and
    /// h2c only without it), so a mismatch is a config error rather than a surprise at the
    /// first request.
    fn protocol(&self, raw: &RawPool, tls: bool, key: &dyn Fn(&str) -> String) -> Protocol {
        let Some(p) = &raw.protocol else {
            return Protocol::default();
        };
        let protocol = match p.get_ref().as_str() {
            "http1" => Protocol::Http1,
            "h2c" => Protocol::H2c,
            "h2" => Protocol::H2,
            other => {
                self.report(self.src.err(
                    p.span(),
                    key("protocol"),
                    format!("unknown protocol {other:?} (http1, h2c or h2)"),
                ));
                return Protocol::default();
            }
        };
        match (protocol, tls) {
            (Protocol::H2, false) => self.report(self.src.err(
                p.span(),
                key("protocol"),
                "protocol \"h2\" is HTTP/2 over TLS and needs `tls` in this pool (use \"h2c\" for cleartext)",
            )),
            (Protocol::H2c, true) => self.report(self.src.err(
                p.span(),
                key("protocol"),
                "protocol \"h2c\" is cleartext HTTP/2 but this pool has `tls` (use \"h2\")",
            )),
            _ => {}
        }
        protocol
    }

    fn upstream_tls(
        &self,
        t: &RawUpstreamTls,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Option<UpstreamTls>, ConfigError> {
        Ok(match t {
            RawUpstreamTls::Flag(false) => None,
            RawUpstreamTls::Flag(true) => Some(UpstreamTls {
                ca: None,
                server_name: None,
            }),
            RawUpstreamTls::Table(tt) => Some(UpstreamTls {
                ca: match &tt.ca {
                    Some(c) => Some(self.path(c, &key("tls.ca"))?),
                    None => None,
                },
                server_name: match &tt.server_name {
                    Some(s) if s.get_ref().trim().is_empty() => {
                        return Err(self.src.err(
                            s.span(),
                            key("tls.server_name"),
                            "empty server name",
                        ))
                    }
                    Some(s) => Some(s.get_ref().trim().to_owned()),
                    None => None,
                },
            }),
        })
    }

    fn health_check(&self, h: &RawHealthCheck, key: &dyn Fn(&str) -> String) -> HealthCheckConfig {
        let d = HealthCheckConfig::default();
        let path = match &h.path {
            None => d.path.clone(),
            Some(p)
                if p.get_ref().starts_with('/')
                    && !p
                        .get_ref()
                        .chars()
                        .any(|c| c.is_ascii_control() || c == ' ') =>
            {
                p.get_ref().clone()
            }
            Some(p) => {
                self.report(self.src.err(
                    p.span(),
                    key("health_check.path"),
                    "must be a path starting with '/'",
                ));
                d.path.clone()
            }
        };
        let count = |v: &Option<Spanned<i64>>, k: &str, default: u32| {
            self.keep(self.count(v, &key(k), default, 1, MAX_THRESHOLD), default)
        };
        let duration = |v: &Option<Spanned<String>>, k: &str, default: Duration| {
            self.keep(self.duration(v, &key(k), default, false), default)
        };
        let kind = match &h.kind {
            None => d.kind,
            Some(k) => match k.get_ref().as_str() {
                "http" => HealthKind::Http,
                "grpc" => HealthKind::Grpc,
                other => {
                    self.report(self.src.err(
                        k.span(),
                        key("health_check.kind"),
                        format!("unknown kind {other:?} (http or grpc)"),
                    ));
                    d.kind
                }
            },
        };
        // An explicit `service = ""` is the default and fits either kind (the contract's
        // example writes it so); a name under `kind = "http"` would be silently unused.
        let service = match &h.service {
            None => String::new(),
            Some(sv) if kind == HealthKind::Http && !sv.get_ref().is_empty() => {
                self.report(self.src.err(
                    sv.span(),
                    key("health_check.service"),
                    "only used with kind = \"grpc\" (an HTTP check probes `path`)",
                ));
                String::new()
            }
            Some(sv) => sv.get_ref().clone(),
        };
        HealthCheckConfig {
            kind,
            service,
            path,
            interval: duration(&h.interval, "health_check.interval", d.interval),
            timeout: duration(&h.timeout, "health_check.timeout", d.timeout),
            healthy_threshold: count(
                &h.healthy_threshold,
                "health_check.healthy_threshold",
                d.healthy_threshold,
            ),
            unhealthy_threshold: count(
                &h.unhealthy_threshold,
                "health_check.unhealthy_threshold",
                d.unhealthy_threshold,
            ),
        }
    }

    fn breaker(&self, b: &RawBreaker, key: &dyn Fn(&str) -> String) -> BreakerPolicy {
        let d = BreakerPolicy::default();
        BreakerPolicy {
            consecutive_failures: self.keep(
                self.count(
                    &b.consecutive_failures,
                    &key("circuit_breaker.consecutive_failures"),
                    d.consecutive_failures,
                    0,
                    MAX_THRESHOLD,
                ),
                d.consecutive_failures,
            ),
            open_duration: self.keep(
                self.duration(
                    &b.open_duration,
                    &key("circuit_breaker.open_duration"),
                    d.open_duration,
                    false,
                ),
                d.open_duration,
            ),
            half_open_requests: self.keep(
                self.count(
                    &b.half_open_requests,
                    &key("circuit_breaker.half_open_requests"),
                    d.half_open_requests,
                    1,
                    MAX_THRESHOLD,
                ),
                d.half_open_requests,
            ),
            failure_statuses: match &b.failure_statuses {
                None => d.failure_statuses,
                Some(list) => self.keep(
                    self.statuses(list, &key("circuit_breaker.failure_statuses")),
                    d.failure_statuses,
                ),
            },
            max_ejected_percent: match &b.max_ejected_percent {
                None => d.max_ejected_percent,
                Some(v) => match u8::try_from(*v.get_ref()) {
                    Ok(n) if n <= 100 => n,
                    _ => {
                        self.report(self.src.err(
                            v.span(),
                            key("circuit_breaker.max_ejected_percent"),
                            format!("{} is not a percentage from 0 to 100", v.get_ref()),
                        ));
                        d.max_ejected_percent
                    }
                },
            },
        }
    }

    /// An empty list is allowed: then no answer counts, only connect errors, timeouts and resets.
    fn statuses(
        &self,
        list: &Spanned<Vec<Spanned<toml::Value>>>,
        key: &str,
    ) -> Result<StatusSet, ConfigError> {
        let mut set = StatusSet::EMPTY;
        for (i, v) in list.get_ref().iter().enumerate() {
            let code = match v.get_ref() {
                toml::Value::Integer(n) => u16::try_from(*n)
                    .ok()
                    .filter(|c| (StatusSet::MIN..=StatusSet::MAX).contains(c)),
                _ => None,
            };
            let Some(code) = code else {
                return Err(self.src.err(
                    v.span(),
                    format!("{key}[{i}]"),
                    format!(
                        "{} is not an HTTP status code (an integer from {} to {})",
                        v.get_ref(),
                        StatusSet::MIN,
                        StatusSet::MAX
                    ),
                ));
            };
            set = set.with(code);
        }
        Ok(set)
    }

    fn timeouts(&self, t: &RawTimeouts, key: &dyn Fn(&str) -> String) -> Timeouts {
        let d = Timeouts::default();
        let duration = |v: &Option<Spanned<String>>, k: &str, default: Duration| {
            self.keep(self.duration(v, &key(k), default, false), default)
        };
        Timeouts {
            connect: duration(&t.connect, "timeouts.connect", d.connect),
            response: duration(&t.response, "timeouts.response", d.response),
            idle: duration(&t.idle, "timeouts.idle", d.idle),
        }
    }

    /// `None` when the route cannot be built; its errors are reported.
    fn route(
        &self,
        r: &Spanned<RawRoute>,
        i: usize,
        pools: &[PoolConfig],
        have_cache: bool,
    ) -> Option<RouteConfig> {
        let raw = r.get_ref();
        let cache = match &raw.cache {
            Some(c) if *c.get_ref() && !have_cache => {
                self.report(self.src.err(
                    c.span(),
                    format!("routes[{i}].cache"),
                    "cache = true needs a [cache] table (max_size, max_object_size, \
                     stale_if_error): without one nothing is cached",
                ));
                false
            }
            Some(c) => *c.get_ref(),
            None => false,
        };
        let host = match &raw.host {
            None => None,
            Some(h) => self.keep(
                parse_host_pattern(h.get_ref())
                    .map(Some)
                    .map_err(|m| self.src.err(h.span(), format!("routes[{i}].host"), m)),
                None,
            ),
        };
        let path_prefix = match &raw.path_prefix {
            None => "/".to_owned(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/')
                    || s.contains(['?', '#'])
                    || s.chars().any(|c| c.is_ascii_control() || c == ' ')
                {
                    self.report(self.src.err(
                        p.span(),
                        format!("routes[{i}].path_prefix"),
                        format!("{s:?} must be a path starting with '/'"),
                    ));
                }
                s.clone()
            }
        };
        let Some(pool) = &raw.pool else {
            // A route has no name: say which one by what it matches.
            let mut what = Vec::new();
            if let Some(h) = &raw.host {
                what.push(format!("host = {:?}", h.get_ref()));
            }
            if let Some(p) = &raw.path_prefix {
                what.push(format!("path_prefix = {:?}", p.get_ref()));
            }
            let name = if what.is_empty() {
                format!("routes[{i}]")
            } else {
                format!("routes[{i}] ({})", what.join(", "))
            };
            self.report(self.src.err(r.span(), name, "missing key `pool`"));
            return None;
        };
        let Some(pool_index) = pools.iter().position(|p| &p.name == pool.get_ref()) else {
            let name = pool.get_ref();
            self.report(self.src.err(
                pool.span(),
                format!("routes[{i}].pool"),
                format!("no pool named {name:?} (define [pools.{name}])"),
            ));
            return None;
        };
        Some(RouteConfig {
            host,
            path_prefix,
            pool: pool.get_ref().clone(),
            pool_index,
            cache,
        })
    }

    fn cache(&self, c: &Spanned<RawCache>) -> CacheConfig {
        let d = CacheConfig::default();
        let raw = c.get_ref();
        let max_size = match self.size(&raw.max_size, "cache.max_size", d.max_size) {
            Ok(n) if n >= MIN_CACHE_SIZE => n,
            Ok(n) => {
                let span = raw.max_size.as_ref().map_or(c.span(), |s| s.span());
                self.report(self.src.err(
                    span,
                    "cache.max_size",
                    format!("{n} bytes is below the minimum of {MIN_CACHE_SIZE} (64KiB)"),
                ));
                d.max_size
            }
            Err(e) => {
                self.report(e);
                d.max_size
            }
        };
        let max_object_size = match self.size(
            &raw.max_object_size,
            "cache.max_object_size",
            d.max_object_size.min(max_size),
        ) {
            Ok(n) if n > 0 && n <= max_size => n,
            Ok(n) => {
                let span = raw.max_object_size.as_ref().map_or(c.span(), |s| s.span());
                self.report(self.src.err(
                    span,
                    "cache.max_object_size",
                    format!("{n} bytes must be above 0 and at most cache.max_size ({max_size})"),
                ));
                d.max_object_size.min(max_size)
            }
            Err(e) => {
                self.report(e);
                d.max_object_size.min(max_size)
            }
        };
        let stale_if_error = self.keep(
            self.duration(
                &raw.stale_if_error,
                "cache.stale_if_error",
                d.stale_if_error,
                true,
            ),
            d.stale_if_error,
        );
        CacheConfig {
            max_size,
            max_object_size,
            stale_if_error,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Warnings: legal, but almost surely not what was meant.

    fn warn(&self, raw: &RawConfig, c: &Config) {
        let mut w = self.warnings.borrow_mut();
        for p in &c.pools {
            let Some(hc) = &p.health_check else { continue };
            let raw_hc = raw
                .pools
                .get(p.name.as_str())
                .and_then(|rp| rp.get_ref().health_check.as_ref());
            if let (HealthKind::Grpc, Some(path)) = (hc.kind, raw_hc.and_then(|h| h.path.as_ref()))
            {
                w.push(self.src.err(
                    path.span(),
                    format!("pools.{}.health_check.path", p.name),
                    "ignored with kind = \"grpc\": the probe is grpc.health.v1.Health/Check (name the service with `service`)",
                ));
            }
            if hc.timeout > hc.interval {
                let span = raw
                    .pools
                    .get(p.name.as_str())
                    .and_then(|rp| rp.get_ref().health_check.as_ref())
                    .and_then(|h| h.timeout.as_ref().or(h.interval.as_ref()))
                    .map(|s| s.span());
                let key = format!("pools.{}.health_check.timeout", p.name);
                let msg = format!(
                    "timeout {} is longer than the interval {}: a slow check delays the next one",
                    humantime::format_duration(hc.timeout),
                    humantime::format_duration(hc.interval)
                );
                w.push(match span {
                    Some(s) => self.src.err(s, key, msg),
                    None => self.src.err_nowhere(key, msg),
                });
            }
        }
        // Routes are compared only when every one was valid, so indices match the file.
        if c.routes.len() == raw.routes.len() {
            for (i, r) in c.routes.iter().enumerate() {
                let Some(j) = (0..i).find(|&j| route_covers(&c.routes[j], r)) else {
                    continue;
                };
                let earlier = &c.routes[j];
                w.push(self.src.err(
                    raw.routes[i].span(),
                    format!("routes[{i}]"),
                    format!(
                        "can never match: routes[{j}] ({}) comes first and catches every request \
                         it would",
                        describe_route(earlier)
                    ),
                ));
            }
        }
        if !c.routes.is_empty() {
            for (name, _) in raw.pools.iter() {
                if !c.routes.iter().any(|r| &r.pool == name.get_ref()) {
                    w.push(self.src.err(
                        name.span(),
                        format!("pools.{}", name.get_ref()),
                        "no route names this pool, so it gets no traffic",
                    ));
                }
            }
        }
        // Both bind with SO_REUSEADDR, which still refuses a specific address on a port that
        // the wildcard of the same family already listens on. IPv6 sockets are v6-only, so
        // `[::]` and an IPv4 address do not collide.
        let mut binds: Vec<(SocketAddr, String, std::ops::Range<usize>)> = raw
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                Some((
                    c.listeners.get(i)?.bind,
                    format!("listeners[{i}].bind"),
                    l.bind.span(),
                ))
            })
            .collect();
        if c.listeners.len() != raw.listeners.len() {
            binds.clear();
        }
        if let (Some(a), Some(ra)) = (&c.admin, &raw.admin) {
            binds.push((a.bind, "admin.bind".to_owned(), ra.bind.span()));
        }
        for (i, (a, key, span)) in binds.iter().enumerate() {
            for (b, other, _) in &binds[..i] {
                let same_family = a.is_ipv4() == b.is_ipv4();
                // Port 0 asks the kernel for a free port each time: never a collision.
                let collide = a.port() == b.port()
                    && a.port() != 0
                    && a.ip() != b.ip()
                    && same_family
                    && (a.ip().is_unspecified() || b.ip().is_unspecified());
                if collide {
                    w.push(self.src.err(
                        span.clone(),
                        key.clone(),
                        format!("{a} and {b} ({other}) share a port and one is a wildcard address: the second bind will fail"),
                    ));
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Value helpers: one place per kind of value, so every key of that kind is checked alike.

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = parse_duration(v.get_ref()).map_err(|m| self.src.err(v.span(), key, m))?;
        if d.is_zero() && !allow_zero {
            return Err(self.src.err(v.span(), key, "must be greater than zero"));
        }
        if d > MAX_DURATION {
            return Err(self.src.err(
                v.span(),
                key,
                format!(
                    "{:?} is longer than the maximum of {}h",
                    v.get_ref(),
                    MAX_DURATION.as_secs() / 3600
                ),
            ));
        }
        Ok(d)
    }

    fn size(
        &self,
        v: &Option<Spanned<RawSize>>,
        key: &str,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match v.get_ref() {
            RawSize::Int(n) => {
                u64::try_from(*n).map_err(|_| self.src.err(v.span(), key, "must not be negative"))
            }
            RawSize::Str(s) => parse_size(s).map_err(|m| self.src.err(v.span(), key, m)),
        }
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: u32,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match u32::try_from(*v.get_ref()) {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.src.err(
                v.span(),
                key,
                format!("{} is not an integer from {min} to {max}", v.get_ref()),
            )),
        }
    }

    fn address(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        resolve(v.get_ref()).map_err(|m| self.src.err(v.span(), key, m))
    }

    fn path(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let p = v.get_ref().trim();
        if p.is_empty() {
            return Err(self.src.err(v.span(), key, "empty path"));
        }
        let p = Path::new(p);
        Ok(match self.base_dir {
            Some(base) if p.is_relative() => base.join(p),
            _ => p.to_path_buf(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Units and patterns.

/// `"250ms"`, `"2s"`, `"1m"`, `"1h30m"`. A bare number is refused: "10" could mean seconds or
/// milliseconds depending on which proxy the operator came from.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration {s:?} has no unit (write e.g. \"{t}s\" or \"{t}ms\")"
        ));
    }
    humantime::parse_duration(t).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// `"64KiB"`, `"10MiB"`, `"1GiB"`, `"512B"`, `"64KB"` (decimal), or a bare number string.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}: expected a number then a unit"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// `host:port`, `[v6]:port` or `name:port`; a name is resolved now, once.
fn resolve(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = t.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}: expected host:port"));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("invalid address {s:?}: bad port"));
    };
    if host.is_empty() || host.contains(['/', ' ', '[', ']']) {
        return Err(format!("invalid address {s:?}: expected host:port"));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut it) => it
            .next()
            .ok_or_else(|| format!("address {s:?} resolves to nothing")),
        Err(e) => Err(format!("cannot resolve {s:?}: {e}")),
    }
}

/// `true` when every request `later` matches is caught by `earlier` first.
fn route_covers(earlier: &RouteConfig, later: &RouteConfig) -> bool {
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HostMatch::Exact(a)), Some(HostMatch::Exact(b))) => a == b,
        (Some(HostMatch::Suffix(s)), Some(HostMatch::Exact(h))) => {
            h.len() > s.len() && h.ends_with(s.as_str())
        }
        (Some(HostMatch::Suffix(s)), Some(HostMatch::Suffix(t))) => t.ends_with(s.as_str()),
        (Some(HostMatch::Exact(_)), Some(HostMatch::Suffix(_))) => false,
    };
    // Segment-aware like the router's `state::prefix_matches` (not called: `state` uses
    // `config`): `/v1` covers `/v1/x`, not `/v10`.
    host && match later.path_prefix.strip_prefix(earlier.path_prefix.as_str()) {
        None => false,
        Some(rest) => {
            earlier.path_prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/')
        }
    }
}

fn describe_route(r: &RouteConfig) -> String {
    let host = match &r.host {
        None => String::new(),
        Some(HostMatch::Exact(h)) => format!("host = {h:?}, "),
        Some(HostMatch::Suffix(s)) => format!("host = \"*{s}\", "),
    };
    format!("{host}path_prefix = {:?}", r.path_prefix)
}

fn parse_host_pattern(h: &str) -> Result<HostMatch, String> {
    let h = h.trim().to_ascii_lowercase();
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    };
    if let Some(rest) = h.strip_prefix("*.") {
        if valid(rest) {
            return Ok(HostMatch::Suffix(format!(".{rest}")));
        }
    } else if valid(&h) {
        return Ok(HostMatch::Exact(h));
    }
    Err(format!(
        "{h:?} is not a host name or \"*.suffix\" pattern (no port, no scheme)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }
}
