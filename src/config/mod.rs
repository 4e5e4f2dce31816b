//! The configuration file: `balancer.toml` -> raw serde structs -> `validate()` -> typed [`Config`].
//!
//! Read by `main` (`balancer check`), by `lib::run` at start and by the reload task; nothing here
//! knows about tokio or sockets. The steps live in their own files: `raw` (the file's shape,
//! unknown keys refused), `span` (byte offsets -> `file:line:col`, [`ConfigError`]) and
//! `validate` (one function per section). This file holds what the rest of the program reads:
//! the typed structs and, all together at the top, every default and every limit, because an
//! operator fixing a config at 3 a.m. needs the line and the allowed range, not a guess.

mod collect;
mod raw;
mod span;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use span::{ConfigError, ConfigErrors};

use crate::auth::AdminToken;

pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_WATCH: bool = true;
pub(crate) const DEFAULT_ACCESS_LOG: bool = true;
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";
/// The de-facto standard name (Heroku, nginx's `$request_id` setups, many frameworks).
pub(crate) const DEFAULT_REQUEST_ID_HEADER: &str = "x-request-id";
pub(crate) const DEFAULT_MAX_HEADER_BYTES: u64 = 65536;
pub(crate) const DEFAULT_MAX_BODY_BYTES: u64 = 0;
pub(crate) const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// `[limits] idle_timeout`: a client connection with no request in flight.
pub(crate) const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's `underscores_in_headers off`: `X_Forwarded_For` must not be a way around a
/// proxy that sets `X-Forwarded-For`, since many backends treat `_` and `-` alike.
pub(crate) const DEFAULT_ALLOW_UNDERSCORES: bool = false;
pub(crate) const DEFAULT_WEIGHT: u32 = 1;
pub(crate) const DEFAULT_HC_PATH: &str = "/healthz";
pub(crate) const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_HC_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_HC_HEALTHY: u32 = 2;
pub(crate) const DEFAULT_HC_UNHEALTHY: u32 = 3;
pub(crate) const DEFAULT_CB_FAILURES: u32 = 5;
pub(crate) const DEFAULT_CB_OPEN: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_CB_HALF_OPEN: u32 = 1;
/// The gateway errors: what a backend (or a proxy in front of it) says when it cannot serve.
/// A plain 500 is left out because it is usually one request's bug, not a sick backend.
pub(crate) const DEFAULT_CB_FAILURE_STATUSES: StatusSet = StatusSet::from_codes(&[502, 503, 504]);
/// At most half a pool is ejected, so a fault that makes every backend fail at once (a bad
/// deploy, a dependency down) degrades the pool instead of emptying it.
pub(crate) const DEFAULT_CB_MAX_EJECTED_PERCENT: u8 = 50;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// `[pools.NAME.timeouts] idle`: a pooled upstream connection.
pub(crate) const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_ATTEMPTS: u32 = 2;
/// `[cache] max_size`: room for a few thousand typical pages and assets.
pub(crate) const DEFAULT_CACHE_MAX_SIZE: u64 = 256 << 20;
/// `[cache] max_object_size`: nginx's default buffers stream anything larger; this keeps one
/// object from taking more than a thirty-second of the default cache.
pub(crate) const DEFAULT_CACHE_MAX_OBJECT_SIZE: u64 = 8 << 20;
pub(crate) const DEFAULT_CACHE_STALE_IF_ERROR: Duration = Duration::ZERO;
/// The smallest `[cache] max_size`: below this the per-entry bookkeeping dominates.
pub(crate) const MIN_CACHE_SIZE: u64 = 64 << 10;

// Upper bounds. Every value read from the file is checked against one of these, so that no
// config can make `Instant + Duration` overflow (a panic), a millisecond count wrap, or a
// semaphore or buffer be sized from a typo.

/// Every duration key (timeouts, intervals, `open_duration`, `shutdown_grace`): a day is far
/// beyond any sensible wait, and far from where `Instant + d` or `d.as_millis() as u64` breaks.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Below this no real request's headers fit; nginx's smallest default buffer is 1KiB.
pub(crate) const MIN_HEADER_BYTES: u64 = 1024;
/// hyper may grow a connection's read buffer up to the limit: 1MiB is 16 times the default
/// and bounds what one slow client can pin.
pub(crate) const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Per listener; above what one process can hold in file descriptors, and well inside
/// tokio's `Semaphore::MAX_PERMITS` on every target.
pub(crate) const MAX_CONNECTIONS: u64 = 10_000_000;
/// Health-check thresholds, `consecutive_failures` and `half_open_requests`: a threshold of ten
/// thousand at the smallest interval is already hours; more is a typo.
pub(crate) const MAX_THRESHOLD: u32 = 10_000;
/// `retries.attempts`: each try may wait the full response timeout, and every extra try is
/// extra load on a pool that is already failing.
pub(crate) const MAX_ATTEMPTS: u32 = 10;
/// Weights above this would make the precomputed round-robin sequence needlessly long;
/// HAProxy caps at 256, so 1000 leaves room without surprising anyone.
pub(crate) const MAX_WEIGHT: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// Typed configuration: what the rest of the program reads.

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub shutdown_grace: Duration,
    pub watch: bool,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub routes: Vec<RouteConfig>,
    /// In file order, so that `/status` lists pools as the operator wrote them.
    pub pools: Vec<PoolConfig>,
    /// `None`: no `[cache]` table, nothing is cached anywhere.
    pub cache: Option<CacheConfig>,
}

/// `[cache]`: one response cache shared by every route with `cache = true`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Everything stored, headers and bodies, counted in bytes.
    pub max_size: u64,
    /// Larger responses stream through and are never stored; at most `max_size`.
    pub max_object_size: u64,
    /// How long past freshness a stored response may answer when the backends fail, for
    /// responses that do not say (`stale-if-error`) themselves.
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: DEFAULT_CACHE_MAX_SIZE,
            max_object_size: DEFAULT_CACHE_MAX_OBJECT_SIZE,
            stale_if_error: DEFAULT_CACHE_STALE_IF_ERROR,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// `token_file`'s content, read at load: every admin request but the dashboard page must
    /// carry it. `None` only with a loopback `bind` (validation sees to that).
    pub token: Option<AdminToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub access: bool,
    pub level: String,
    /// Where access lines go: `None` is stdout. Relative paths are already resolved against
    /// the config file's directory.
    pub access_file: Option<PathBuf>,
    /// The request ID header (lower case); `None`: request IDs are off.
    pub request_id_header: Option<http::HeaderName>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: DEFAULT_ACCESS_LOG,
            level: DEFAULT_LOG_LEVEL.to_owned(),
            access_file: None,
            request_id_header: Some(http::HeaderName::from_static(DEFAULT_REQUEST_ID_HEADER)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// The first one is served when SNI is absent or matches none.
    pub certificates: Vec<CertPair>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: u64,
    /// 0 means unlimited.
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub max_connections: u64,
    /// How long a client connection may sit with no request in flight before it is closed.
    pub idle_timeout: Duration,
    /// `false`: request headers whose name contains `_` are dropped before forwarding.
    pub allow_underscores_in_headers: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            allow_underscores_in_headers: DEFAULT_ALLOW_UNDERSCORES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub pool: String,
    /// Position of `pool` in [`Config::pools`]: validation has just found it there, so the
    /// snapshot needs no second lookup that would have to invent a fallback.
    pub pool_index: usize,
    /// Responses on this route are cached per RFC 9111 (validation ensures `[cache]` exists).
    pub cache: bool,
}

/// A route's host pattern, lower-cased at load so the request path compares without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: it matches `a.example.com` and
    /// `a.b.example.com`, not `example.com` itself (as in nginx's `server_name`).
    Suffix(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StrategyKind {
    #[default]
    RoundRobin,
    LeastConnections,
}

impl StrategyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::RoundRobin => "round_robin",
            StrategyKind::LeastConnections => "least_connections",
        }
    }
}

/// What a pool speaks to its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (no `Upgrade: h2c` dance).
    H2c,
    /// HTTP/2 over TLS, negotiated with ALPN `h2`; needs the pool's `tls`.
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
        }
    }

    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::H2c | Protocol::H2)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub strategy: StrategyKind,
    pub backends: Vec<BackendConfig>,
    pub tls: Option<UpstreamTls>,
    pub protocol: Protocol,
    pub health_check: Option<HealthCheckConfig>,
    pub breaker: BreakerPolicy,
    pub timeouts: Timeouts,
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// As written in the file: the backend's identity across reloads and in `/status`.
    pub address: String,
    /// Resolved once at load (like nginx), so the request path never waits on DNS.
    pub addr: SocketAddr,
    /// 0 to `MAX_WEIGHT`; 0 keeps the backend configured (and health-checked) but sends it no
    /// new traffic.
    pub weight: u32,
    /// Used only when no other backend of the pool is usable (nginx's and HAProxy's `backup`).
    pub backup: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `None`: the system's root certificates.
    pub ca: Option<PathBuf>,
    /// `None`: the host part of each backend's address.
    pub server_name: Option<String>,
}

/// What a health probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthKind {
    /// `GET path`; a 2xx or 3xx passes.
    #[default]
    Http,
    /// `grpc.health.v1.Health/Check` for `service`, over HTTP/2 whatever the pool's protocol;
    /// SERVING passes.
    Grpc,
}

impl HealthKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthKind::Http => "http",
            HealthKind::Grpc => "grpc",
        }
    }
}

/// The values an empty `[pools.NAME.health_check]` table gets; without the table there are no
/// active checks at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: HealthKind,
    /// `kind = "grpc"`: the service asked about; "" is the server as a whole.
    pub service: String,
    /// `kind = "http"`: the path probed.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthKind::default(),
            service: String::new(),
            path: DEFAULT_HC_PATH.to_owned(),
            interval: DEFAULT_HC_INTERVAL,
            timeout: DEFAULT_HC_TIMEOUT,
            healthy_threshold: DEFAULT_HC_HEALTHY,
            unhealthy_threshold: DEFAULT_HC_UNHEALTHY,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// 0 turns the breaker off for the pool.
    pub consecutive_failures: u32,
    pub open_duration: Duration,
    pub half_open_requests: u32,
    /// Backend answers that count as failures; an empty set means only transport errors do.
    pub failure_statuses: StatusSet,
    /// 0..=100: the largest share of a pool's backends that open breakers may take out at once.
    pub max_ejected_percent: u8,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: DEFAULT_CB_FAILURES,
            open_duration: DEFAULT_CB_OPEN,
            half_open_requests: DEFAULT_CB_HALF_OPEN,
            failure_statuses: DEFAULT_CB_FAILURE_STATUSES,
            max_ejected_percent: DEFAULT_CB_MAX_EJECTED_PERCENT,
        }
    }
}

/// A set of HTTP status codes, 100..=599, one bit per code.
///
/// A bitset rather than a `Vec` so that [`BreakerPolicy`] stays `Copy` and the request path
/// classifies an answer with one shift and mask, without following a pointer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub const MIN: u16 = 100;
    pub const MAX: u16 = 599;
    pub const EMPTY: StatusSet = StatusSet([0; 10]);

    /// Codes outside 100..=599 are ignored: validation reports them before they get here.
    pub const fn from_codes(codes: &[u16]) -> StatusSet {
        let mut set = StatusSet::EMPTY;
        let mut i = 0;
        while i < codes.len() {
            set = set.with(codes[i]);
            i += 1;
        }
        set
    }

    /// `self` plus `code`; unchanged when `code` is not a status code.
    pub const fn with(mut self, code: u16) -> StatusSet {
        if code >= Self::MIN && code <= Self::MAX {
            self.0[(code / 64) as usize] |= 1 << (code % 64);
        }
        self
    }

    pub const fn contains(&self, code: u16) -> bool {
        code >= Self::MIN
            && code <= Self::MAX
            && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Ascending, for `/status` and logs.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (Self::MIN..=Self::MAX).filter(|c| self.contains(*c))
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        DEFAULT_CB_FAILURE_STATUSES
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: DEFAULT_CONNECT_TIMEOUT,
            response: DEFAULT_RESPONSE_TIMEOUT,
            idle: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        }
    }
}

/// A config that validated, and what in it is legal but almost surely a mistake.
#[derive(Debug, Clone)]
pub struct Checked {
    pub config: Config,
    /// Same shape as errors (`file:line:col: key: message`); they never reject a config.
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// Reads and validates `path`. The error is the first of [`Config::check_file`]'s, and
    /// names the file as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::check_file(path)
            .map(|c| c.config)
            .map_err(ConfigErrors::into_first)
    }

    /// Parses and validates `text`; relative certificate paths are resolved against `base_dir`
    /// (the config file's directory), so the config works from any working directory. The
    /// error is the first of [`Config::check`]'s.
    pub fn parse(text: &str, file: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        Config::check(text, file, base_dir)
            .map(|c| c.config)
            .map_err(ConfigErrors::into_first)
    }

    /// [`Config::check`] on the file at `path`.
    pub fn check_file(path: &Path) -> Result<Checked, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            errors: vec![ConfigError {
                file: file.clone(),
                line: None,
                key: None,
                msg: format!("cannot read: {e}"),
            }],
            warnings: Vec::new(),
        })?;
        Config::check(&text, &file, path.parent())
    }

    /// Parses and validates `text`, going on after each error so that every mistake in the
    /// file is reported at once, in file order; the warnings come either way.
    pub fn check(text: &str, file: &str, base_dir: Option<&Path>) -> Result<Checked, ConfigErrors> {
        let src = span::Source { text, file };
        let collected = src.collect();
        let mut errors = collected.errors;
        let mut warnings = Vec::new();
        let mut config = None;
        if let Some(raw) = collected.raw {
            let v = validate::Validator {
                src,
                base_dir,
                errors: Default::default(),
                warnings: Default::default(),
            };
            let c = v.validate(raw);
            // What was taken out of the file for a shape error is missing now: do not report
            // that again ("a pool needs at least one backend" after "backends must be a list").
            let removed = &collected.removed;
            errors.extend(
                v.errors
                    .into_inner()
                    .into_iter()
                    .filter(|e| !removed.iter().any(|r| follows_from(e, r))),
            );
            warnings = v.warnings.into_inner();
            config = Some(c);
        }
        // File order reads best; errors without a place (a missing section) go last. The sort
        // is stable, so errors at one place keep the order they were found in.
        errors.sort_by_key(|e| e.line.map_or((usize::MAX, 0), |p| p));
        match config {
            Some(config) if errors.is_empty() => Ok(Checked { config, warnings }),
            _ => Err(ConfigErrors { errors, warnings }),
        }
    }
}

/// `true` when `e` is about the value `removed`, something in it, or a table it was in (whose
/// check, "`cert` and `key` go together", now misses it).
fn follows_from(e: &ConfigError, removed: &str) -> bool {
    let Some(key) = &e.key else { return false };
    let under = |a: &str, b: &str| {
        a == b
            || a.strip_prefix(b)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    under(key, removed) || under(removed, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, "t.toml", None)
    }

    const MIN: &str =
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

    #[test]
    fn smallest_file_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert!(c.watch);
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.pools[0].attempts, DEFAULT_ATTEMPTS);
        assert_eq!(c.pools[0].timeouts, Timeouts::default());
        assert_eq!(c.pools[0].breaker, BreakerPolicy::default());
    }

    #[test]
    fn status_set_holds_exactly_its_codes() {
        let d = StatusSet::default();
        let all: Vec<u16> = d.iter().collect();
        assert_eq!(all, [502, 503, 504]);
        assert!(!d.contains(500) && !d.contains(505) && !d.contains(0) && !d.contains(u16::MAX));
        let edges = StatusSet::EMPTY
            .with(100)
            .with(599)
            .with(99)
            .with(600)
            .with(639)
            .with(640);
        assert_eq!(edges.iter().collect::<Vec<_>>(), [100, 599]);
        assert!(StatusSet::EMPTY.is_empty() && !edges.is_empty());
        assert_eq!(format!("{d:?}"), "{502, 503, 504}");
    }

    #[test]
    fn cache_table_and_route_flag() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.cache, None);
        let s = format!(
            "{MIN}[[routes]]\npool = \"web\"\ncache = true\n[cache]\nmax_size = \"4MiB\"\n\
             stale_if_error = \"30s\"\n"
        );
        let c = parse(&s).unwrap();
        assert!(c.routes[0].cache);
        let cache = c.cache.unwrap();
        assert_eq!(cache.max_size, 4 << 20);
        assert_eq!(
            cache.max_object_size,
            4 << 20,
            "capped at max_size by default"
        );
        assert_eq!(cache.stale_if_error, Duration::from_secs(30));
        let e = parse(&format!("{MIN}[[routes]]\npool = \"web\"\ncache = true\n")).unwrap_err();
        assert_eq!(e.line.map(|l| l.0), Some(7), "{e}");
        assert!(e.to_string().contains("routes[0].cache"), "{e}");
        assert!(e.to_string().contains("[cache]"), "{e}");
        let e = parse(&format!(
            "{MIN}[cache]\nmax_size = \"1MiB\"\nmax_object_size = \"2MiB\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("cache.max_object_size"), "{e}");
        let e = parse(&format!("{MIN}[cache]\nstale_if_error = 5\n")).unwrap_err();
        assert!(e.to_string().contains("stale_if_error"), "{e}");
        let e = parse(&format!("{MIN}[cache]\nmax_sise = 5\n")).unwrap_err();
        assert!(e.to_string().contains("max_size"), "{e}");
    }

    #[test]
    fn errors_carry_line_and_col() {
        let e = parse(&format!("{MIN}weight = 0\n")).unwrap_err();
        assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
        let s =
            format!("{MIN}[pools.x]\nbackends = [{{ address = \"1.2.3.4:1\", weight = 1001 }}]\n");
        let e = parse(&s).unwrap_err();
        assert_eq!(e.line, Some((6, 47)), "{e}");
        assert!(e.to_string().contains("pools.x.backends[0].weight"), "{e}");
    }
}
