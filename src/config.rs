//! The configuration file: `balancer.toml` -> raw serde structs -> `validate()` -> typed [`Config`].
//!
//! Read by `main` (`balancer check`), by `lib::run` at start and by the reload task; nothing here
//! knows about tokio or sockets. Every raw struct denies unknown fields so that a typo is an error
//! rather than a silently ignored setting, and every semantic error carries `file:line:col` taken
//! from `toml::Spanned`, because an operator fixing a config at 3 a.m. needs the line, not a guess.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_WATCH: bool = true;
pub const DEFAULT_ACCESS_LOG: bool = true;
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 65536;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 0;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
pub const DEFAULT_HC_PATH: &str = "/healthz";
pub const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HC_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HC_HEALTHY: u32 = 2;
pub const DEFAULT_HC_UNHEALTHY: u32 = 3;
pub const DEFAULT_CB_FAILURES: u32 = 5;
pub const DEFAULT_CB_OPEN: Duration = Duration::from_secs(10);
pub const DEFAULT_CB_HALF_OPEN: u32 = 1;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_ATTEMPTS: u32 = 2;
/// Weights above this would make the precomputed round-robin sequence needlessly long;
/// HAProxy caps at 256, so 1000 leaves room without surprising anyone.
pub const MAX_WEIGHT: u32 = 1000;
/// hyper refuses an h1 read buffer smaller than this.
pub const MIN_HEADER_BUFFER: u64 = 8192;

/// A rejected configuration. Displayed as `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the error can be tied to a place in the file.
    pub line: Option<(usize, usize)>,
    /// The dotted key the error is about (`pools.api.backends[1].weight`), when known.
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.line {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub access: bool,
    pub level: String,
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
    pub idle_timeout: Duration,
    pub allow_underscores_in_headers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub pool: String,
}

/// A route's host pattern, lower-cased at load so the request path compares without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: it matches `a.example.com` and
    /// `a.b.example.com`, not `example.com` itself (as in nginx's `server_name`).
    Suffix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
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

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub strategy: StrategyKind,
    pub backends: Vec<BackendConfig>,
    pub tls: Option<UpstreamTls>,
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
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `None`: the system's root certificates.
    pub ca: Option<PathBuf>,
    /// `None`: the host part of each backend's address.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// 0 turns the breaker off for the pool.
    pub consecutive_failures: u32,
    pub open_duration: Duration,
    pub half_open_requests: u32,
    pub failure_statuses: StatusSet,
    pub max_ejected_percent: u32,
}

/// A set of HTTP status codes (100..=599) as a bitset: `Copy`, and one load and mask to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub const fn empty() -> StatusSet {
        StatusSet([0; 10])
    }

    pub fn insert(&mut self, s: u16) {
        if let Some(w) = self.0.get_mut(usize::from(s) / 64) {
            *w |= 1 << (s % 64);
        }
    }

    pub fn contains(&self, s: u16) -> bool {
        self.0
            .get(usize::from(s) / 64)
            .is_some_and(|w| w & (1 << (s % 64)) != 0)
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        let mut s = StatusSet::empty();
        for c in [502, 503, 504] {
            s.insert(c);
        }
        s
    }
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: DEFAULT_CB_FAILURES,
            open_duration: DEFAULT_CB_OPEN,
            half_open_requests: DEFAULT_CB_HALF_OPEN,
            failure_statuses: StatusSet::default(),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub idle: Duration,
}

impl Config {
    /// Reads and validates `path`. The error names the file as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            key: None,
            msg: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file, path.parent())
    }

    /// Parses and validates `text`; relative certificate paths are resolved against `base_dir`
    /// (the config file's directory), so the config works from any working directory.
    pub fn parse(text: &str, file: &str, base_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let v = Validator {
            src: text,
            file,
            base_dir,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(raw)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw structs: exactly the file's shape.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    shutdown_grace: Option<Spanned<String>>,
    watch: Option<bool>,
    admin: Option<RawAdmin>,
    log: Option<RawLog>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    limits: Option<RawLimits>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pools: BTreeMap<Spanned<String>, Spanned<RawPool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<bool>,
    level: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    bind: Spanned<String>,
    tls: Option<Spanned<RawListenerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    certificates: Option<Vec<Spanned<RawCert>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<Spanned<RawSize>>,
    max_body_bytes: Option<Spanned<RawSize>>,
    header_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    pool: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    strategy: Option<Spanned<String>>,
    backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    tls: Option<Spanned<RawUpstreamTls>>,
    health_check: Option<RawHealthCheck>,
    circuit_breaker: Option<RawBreaker>,
    timeouts: Option<RawTimeouts>,
    retries: Option<RawRetries>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    consecutive_failures: Option<Spanned<i64>>,
    open_duration: Option<Spanned<String>>,
    half_open_requests: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<Spanned<String>>,
    response: Option<Spanned<String>>,
    idle: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    attempts: Option<Spanned<i64>>,
}

/// A backend is either `"host:port"` or `{ address = "host:port", weight = 3 }`.
enum RawBackend {
    Plain(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

/// Pool TLS is either a bool or `{ ca = "...", server_name = "..." }`.
enum RawUpstreamTls {
    Flag(bool),
    Table(RawUpstreamTlsTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTlsTable {
    ca: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
}

/// A size is an integer of bytes or a string with a unit.
enum RawSize {
    Int(i64),
    Str(String),
}

// Hand-written visitors instead of `#[serde(untagged)]`: untagged enums replace the inner error
// ("unknown field `wieght`") with "did not match any variant", which names no key.

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address string or a table { address, weight }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Plain(s.to_owned()))
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<RawBackend, M::Error> {
                RawBackendTable::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(RawBackend::Table)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawUpstreamTls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawUpstreamTls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a table { ca, server_name }")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RawUpstreamTls, E> {
                Ok(RawUpstreamTls::Flag(b))
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<RawUpstreamTls, M::Error> {
                RawUpstreamTlsTable::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(RawUpstreamTls::Table)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a string such as \"64KiB\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RawSize, E> {
                Ok(RawSize::Int(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RawSize, E> {
                Ok(RawSize::Int(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawSize, E> {
                Ok(RawSize::Str(s.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Units.

/// `"250ms"`, `"2s"`, `"1m"`, `"1h30m"`. A bare number is refused: "10" could mean seconds or
/// milliseconds depending on which proxy the operator came from.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
pub fn parse_size(s: &str) -> Result<u64, String> {
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

// ---------------------------------------------------------------------------------------------
// Validation.

/// A key found in the text before a value, for parser errors that only carry the value's span.
struct ValueKey {
    name: String,
    /// Inside an inline table (`{ address = "...", weight = "x" }`): not a key of the table.
    inline: bool,
}

struct Validator<'a> {
    src: &'a str,
    file: &'a str,
    base_dir: Option<&'a Path>,
}

impl Validator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let before = self.src.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before
            .get(line_start..)
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        (line, col)
    }

    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_col(span.start)),
            key: Some(key.into()),
            msg: msg.into(),
        }
    }

    fn err_nowhere(&self, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: None,
            key: Some(key.into()),
            msg: msg.into(),
        }
    }

    /// A syntax or type error from the TOML parser. Its span points at the offending key or
    /// value; we name the enclosing `[table]` so "unknown field `wieght`" says where.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut msg = e.message().trim().to_owned();
        let (line, key) = match e.span() {
            Some(span) => {
                let mut key = self.enclosing_table(span.start);
                // A type error points at the value: name the key written before its `=`.
                if let Some(k) = self.key_before_value(span.start) {
                    if k.inline {
                        msg = format!("`{}`: {msg}", k.name);
                    } else {
                        key = Some(match key {
                            Some(t) => format!("{t}.{}", k.name),
                            None => k.name,
                        });
                    }
                }
                (Some(self.line_col(span.start)), key)
            }
            None => (None, None),
        };
        ConfigError {
            file: self.file.to_owned(),
            line,
            key,
            msg,
        }
    }

    fn enclosing_table(&self, offset: usize) -> Option<String> {
        let before = self.src.get(..offset.min(self.src.len()))?;
        before.lines().rev().find_map(|l| {
            let l = l.trim();
            if l.starts_with('[') {
                // `[pools.api.health_check]   # comment` -> `pools.api.health_check`
                let inner = l.trim_start_matches('[');
                let end = inner.find(']').unwrap_or(inner.len());
                Some(inner[..end].trim().to_owned())
            } else {
                None
            }
        })
    }

    /// The key of `key = <offset>` when `offset` is the start of a value on that line.
    fn key_before_value(&self, offset: usize) -> Option<ValueKey> {
        let before = self.src.get(..offset.min(self.src.len()))?;
        let line = &before[before.rfind('\n').map_or(0, |i| i + 1)..];
        let lhs = line.trim_end().strip_suffix('=')?.trim_end();
        let start = lhs
            .char_indices()
            .rev()
            .find(|&(_, c)| c == '{' || c == ',' || c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let name = &lhs[start..];
        if name.is_empty() || name.starts_with('[') || name.starts_with('#') {
            return None;
        }
        Some(ValueKey {
            name: name.to_owned(),
            inline: lhs[..start].contains('{'),
        })
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        allow_zero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = parse_duration(v.get_ref()).map_err(|m| self.err(v.span(), key, m))?;
        if d.is_zero() && !allow_zero {
            return Err(self.err(v.span(), key, "must be greater than zero"));
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
                u64::try_from(*n).map_err(|_| self.err(v.span(), key, "must not be negative"))
            }
            RawSize::Str(s) => parse_size(s).map_err(|m| self.err(v.span(), key, m)),
        }
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: u32,
        min: u32,
    ) -> Result<u32, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match u32::try_from(*v.get_ref()) {
            Ok(n) if n >= min => Ok(n),
            _ => Err(self.err(
                v.span(),
                key,
                format!("must be an integer of at least {min}"),
            )),
        }
    }

    fn address(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        resolve(v.get_ref()).map_err(|m| self.err(v.span(), key, m))
    }

    fn path(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let p = v.get_ref().trim();
        if p.is_empty() {
            return Err(self.err(v.span(), key, "empty path"));
        }
        let p = Path::new(p);
        Ok(match self.base_dir {
            Some(base) if p.is_relative() => base.join(p),
            _ => p.to_path_buf(),
        })
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
            true,
        )?;

        let admin = match &raw.admin {
            Some(a) => Some(AdminConfig {
                bind: self.address(&a.bind, "admin.bind")?,
            }),
            None => None,
        };

        let log = match &raw.log {
            None => LogConfig {
                access: DEFAULT_ACCESS_LOG,
                level: DEFAULT_LOG_LEVEL.into(),
            },
            Some(l) => {
                LogConfig {
                    access: l.access.unwrap_or(DEFAULT_ACCESS_LOG),
                    level: match &l.level {
                        None => DEFAULT_LOG_LEVEL.into(),
                        Some(s) => {
                            let lvl = s.get_ref().trim().to_ascii_lowercase();
                            if !["trace", "debug", "info", "warn", "error", "off"]
                                .contains(&lvl.as_str())
                            {
                                return Err(self.err(
                                s.span(),
                                "log.level",
                                format!("unknown level {:?} (trace, debug, info, warn, error or off)", s.get_ref()),
                            ));
                            }
                            lvl
                        }
                    },
                }
            }
        };

        if raw.listeners.is_empty() {
            return Err(self.err_nowhere("listeners", "at least one [[listeners]] is required"));
        }
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut bound = HashSet::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = format!("listeners[{i}].bind");
            let bind = self.address(&l.bind, &key)?;
            if !bound.insert(bind) {
                return Err(self.err(
                    l.bind.span(),
                    key,
                    format!("{bind} is already used by another listener"),
                ));
            }
            if admin.as_ref().is_some_and(|a| a.bind == bind) {
                return Err(self.err(
                    l.bind.span(),
                    key,
                    format!("{bind} is also the admin address"),
                ));
            }
            let tls = match &l.tls {
                None => None,
                Some(t) => Some(self.listener_tls(t, i)?),
            };
            listeners.push(ListenerConfig { bind, tls });
        }

        let limits = match &raw.limits {
            None => Limits {
                max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                header_timeout: DEFAULT_HEADER_TIMEOUT,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                idle_timeout: Duration::from_secs(60),
                allow_underscores_in_headers: false,
            },
            Some(l) => {
                let max_header_bytes = self.size(
                    &l.max_header_bytes,
                    "limits.max_header_bytes",
                    DEFAULT_MAX_HEADER_BYTES,
                )?;
                if max_header_bytes < 1024 {
                    let span = l
                        .max_header_bytes
                        .as_ref()
                        .map(|s| s.span())
                        .unwrap_or(0..0);
                    return Err(self.err(span, "limits.max_header_bytes", "must be at least 1KiB"));
                }
                let max_connections = match &l.max_connections {
                    None => DEFAULT_MAX_CONNECTIONS,
                    Some(v) => match u64::try_from(*v.get_ref()) {
                        Ok(n) if n >= 1 => n,
                        _ => {
                            return Err(self.err(
                                v.span(),
                                "limits.max_connections",
                                "must be at least 1",
                            ))
                        }
                    },
                };
                Limits {
                    idle_timeout: Duration::from_secs(60),
                    allow_underscores_in_headers: false,
                    max_header_bytes,
                    max_body_bytes: self.size(
                        &l.max_body_bytes,
                        "limits.max_body_bytes",
                        DEFAULT_MAX_BODY_BYTES,
                    )?,
                    header_timeout: self.duration(
                        &l.header_timeout,
                        "limits.header_timeout",
                        DEFAULT_HEADER_TIMEOUT,
                        false,
                    )?,
                    max_connections,
                }
            }
        };

        if raw.pools.is_empty() {
            return Err(self.err_nowhere("pools", "at least one [pools.NAME] is required"));
        }
        // BTreeMap sorts by name; restore file order from the spans.
        let mut raw_pools: Vec<_> = raw.pools.iter().collect();
        raw_pools.sort_by_key(|(name, _)| name.span().start);
        let mut pools = Vec::with_capacity(raw_pools.len());
        for (name, p) in raw_pools {
            pools.push(self.pool(name, p)?);
        }

        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.iter().enumerate() {
            routes.push(self.route(r.get_ref(), i, &pools)?);
        }

        Ok(Config {
            shutdown_grace,
            watch: raw.watch.unwrap_or(DEFAULT_WATCH),
            admin,
            log,
            listeners,
            limits,
            routes,
            pools,
        })
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
            _ => return Err(self.err(t.span(), key, "`cert` and `key` go together")),
        }
        if let Some(list) = &raw.certificates {
            if !certificates.is_empty() {
                return Err(self.err(
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
            return Err(self.err(t.span(), key, "no certificate: set `cert` and `key`"));
        }
        Ok(ListenerTls { certificates })
    }

    fn route(
        &self,
        r: &RawRoute,
        i: usize,
        pools: &[PoolConfig],
    ) -> Result<RouteConfig, ConfigError> {
        let host = match &r.host {
            None => None,
            Some(h) => Some(
                parse_host_pattern(h.get_ref())
                    .map_err(|m| self.err(h.span(), format!("routes[{i}].host"), m))?,
            ),
        };
        let path_prefix = match &r.path_prefix {
            None => "/".to_owned(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/')
                    || s.contains(['?', '#'])
                    || s.chars().any(|c| c.is_ascii_control() || c == ' ')
                {
                    return Err(self.err(
                        p.span(),
                        format!("routes[{i}].path_prefix"),
                        format!("{s:?} must be a path starting with '/'"),
                    ));
                }
                s.clone()
            }
        };
        let pool = r.pool.get_ref();
        if !pools.iter().any(|p| &p.name == pool) {
            return Err(self.err(
                r.pool.span(),
                format!("routes[{i}].pool"),
                format!("no pool named {pool:?} (define [pools.{pool}])"),
            ));
        }
        Ok(RouteConfig {
            host,
            path_prefix,
            pool: pool.clone(),
        })
    }

    fn pool(
        &self,
        name: &Spanned<String>,
        p: &Spanned<RawPool>,
    ) -> Result<PoolConfig, ConfigError> {
        let n = name.get_ref();
        let key = |k: &str| format!("pools.{n}.{k}");
        if n.is_empty()
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(self.err(
                name.span(),
                format!("pools.{n}"),
                "pool names use letters, digits, '_', '-' and '.'",
            ));
        }
        let raw = p.get_ref();
        let strategy = match &raw.strategy {
            None => StrategyKind::RoundRobin,
            Some(s) => match s.get_ref().as_str() {
                "round_robin" => StrategyKind::RoundRobin,
                "least_connections" => StrategyKind::LeastConnections,
                other => {
                    return Err(self.err(
                        s.span(),
                        key("strategy"),
                        format!("unknown strategy {other:?} (round_robin or least_connections)"),
                    ))
                }
            },
        };
        let Some(list) = &raw.backends else {
            return Err(self.err(
                p.span(),
                key("backends"),
                "a pool needs at least one backend",
            ));
        };
        if list.get_ref().is_empty() {
            return Err(self.err(
                list.span(),
                key("backends"),
                "a pool needs at least one backend",
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(list.get_ref().len());
        for (i, b) in list.get_ref().iter().enumerate() {
            let bkey = format!("pools.{n}.backends[{i}]");
            let (address, weight) = match b.get_ref() {
                RawBackend::Plain(s) => (Spanned::new(b.span(), s.clone()), 1),
                RawBackend::Table(t) => {
                    let w = match &t.weight {
                        None => 1,
                        Some(w) => match u32::try_from(*w.get_ref()) {
                            Ok(v) if (1..=MAX_WEIGHT).contains(&v) => v,
                            _ => {
                                return Err(self.err(
                                    w.span(),
                                    format!("{bkey}.weight"),
                                    format!("weight must be an integer from 1 to {MAX_WEIGHT}"),
                                ))
                            }
                        },
                    };
                    (t.address.clone(), w)
                }
            };
            let addr = self.address(&address, &bkey)?;
            let address = address.into_inner();
            if backends.iter().any(|o| o.address == address) {
                return Err(self.err(
                    b.span(),
                    bkey,
                    format!("{address} is listed twice in this pool (use weight instead)"),
                ));
            }
            backends.push(BackendConfig {
                address,
                addr,
                weight,
            });
        }

        let tls = match &raw.tls {
            None => None,
            Some(t) => match t.get_ref() {
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
                            return Err(self.err(
                                s.span(),
                                key("tls.server_name"),
                                "empty server name",
                            ))
                        }
                        Some(s) => Some(s.get_ref().trim().to_owned()),
                        None => None,
                    },
                }),
            },
        };

        let health_check = match &raw.health_check {
            None => None,
            Some(h) => {
                let path = match &h.path {
                    None => DEFAULT_HC_PATH.to_owned(),
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
                        return Err(self.err(
                            p.span(),
                            key("health_check.path"),
                            "must be a path starting with '/'",
                        ))
                    }
                };
                let interval = self.duration(
                    &h.interval,
                    &key("health_check.interval"),
                    DEFAULT_HC_INTERVAL,
                    false,
                )?;
                let timeout = self.duration(
                    &h.timeout,
                    &key("health_check.timeout"),
                    DEFAULT_HC_TIMEOUT,
                    false,
                )?;
                Some(HealthCheckConfig {
                    path,
                    interval,
                    timeout,
                    healthy_threshold: self.count(
                        &h.healthy_threshold,
                        &key("health_check.healthy_threshold"),
                        DEFAULT_HC_HEALTHY,
                        1,
                    )?,
                    unhealthy_threshold: self.count(
                        &h.unhealthy_threshold,
                        &key("health_check.unhealthy_threshold"),
                        DEFAULT_HC_UNHEALTHY,
                        1,
                    )?,
                })
            }
        };

        let breaker = match &raw.circuit_breaker {
            None => BreakerPolicy::default(),
            Some(b) => BreakerPolicy {
                consecutive_failures: self.count(
                    &b.consecutive_failures,
                    &key("circuit_breaker.consecutive_failures"),
                    DEFAULT_CB_FAILURES,
                    0,
                )?,
                open_duration: self.duration(
                    &b.open_duration,
                    &key("circuit_breaker.open_duration"),
                    DEFAULT_CB_OPEN,
                    false,
                )?,
                half_open_requests: self.count(
                    &b.half_open_requests,
                    &key("circuit_breaker.half_open_requests"),
                    DEFAULT_CB_HALF_OPEN,
                    1,
                )?,
                ..BreakerPolicy::default()
            },
        };

        let timeouts = match &raw.timeouts {
            None => Timeouts {
                connect: DEFAULT_CONNECT_TIMEOUT,
                response: DEFAULT_RESPONSE_TIMEOUT,
                idle: DEFAULT_IDLE_TIMEOUT,
            },
            Some(t) => Timeouts {
                connect: self.duration(
                    &t.connect,
                    &key("timeouts.connect"),
                    DEFAULT_CONNECT_TIMEOUT,
                    false,
                )?,
                response: self.duration(
                    &t.response,
                    &key("timeouts.response"),
                    DEFAULT_RESPONSE_TIMEOUT,
                    false,
                )?,
                idle: self.duration(&t.idle, &key("timeouts.idle"), DEFAULT_IDLE_TIMEOUT, false)?,
            },
        };

        let attempts = match &raw.retries {
            None => DEFAULT_ATTEMPTS,
            Some(r) => self.count(&r.attempts, &key("retries.attempts"), DEFAULT_ATTEMPTS, 1)?,
        };

        Ok(PoolConfig {
            name: n.clone(),
            strategy,
            backends,
            tls,
            health_check,
            breaker,
            timeouts,
            attempts,
        })
    }
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
        assert_eq!(c.pools[0].attempts, 2);
        assert_eq!(c.pools[0].timeouts.connect, Duration::from_secs(2));
        assert_eq!(c.limits.max_header_bytes, 65536);
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("KiB").is_err());
    }

    #[test]
    fn errors_carry_line_and_col() {
        let e = parse(&format!("{MIN}weight = 0\n")).unwrap_err();
        assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
        let s = format!("{MIN}[pools.x]\nbackends = [{{ address = \"1.2.3.4:1\", weight = 0 }}]\n");
        let e = parse(&s).unwrap_err();
        assert_eq!(e.line, Some((6, 47)), "{e}");
        assert!(e.to_string().contains("pools.x.backends[0].weight"), "{e}");
    }
}
