//! Exactly the file's shape: what serde reads from `balancer.toml`, before any meaning.
//!
//! Every struct denies unknown fields so that a typo is an error rather than a silently ignored
//! setting. Values that validation must point at are `Spanned`; integers are read as `i64` so
//! that a negative number reaches validation (with its position) instead of failing in serde.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub shutdown_grace: Option<Spanned<String>>,
    pub watch: Option<bool>,
    pub admin: Option<RawAdmin>,
    pub log: Option<RawLog>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub pools: BTreeMap<Spanned<String>, Spanned<RawPool>>,
    pub cache: Option<Spanned<RawCache>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub max_size: Option<Spanned<RawSize>>,
    pub max_object_size: Option<Spanned<RawSize>>,
    pub stale_if_error: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub bind: Spanned<String>,
    pub token_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub access: Option<bool>,
    pub level: Option<Spanned<String>>,
    pub access_file: Option<Spanned<String>>,
    pub request_id_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub bind: Spanned<String>,
    pub tls: Option<Spanned<RawListenerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub certificates: Option<Vec<Spanned<RawCert>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCert {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_header_bytes: Option<Spanned<RawSize>>,
    pub max_body_bytes: Option<Spanned<RawSize>>,
    pub header_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub allow_underscores_in_headers: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    /// Optional here only so that validation can name the route that lacks it.
    pub pool: Option<Spanned<String>>,
    pub cache: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub strategy: Option<Spanned<String>>,
    pub backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
    pub protocol: Option<Spanned<String>>,
    pub health_check: Option<RawHealthCheck>,
    pub circuit_breaker: Option<RawBreaker>,
    pub timeouts: Option<RawTimeouts>,
    pub retries: Option<RawRetries>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub kind: Option<Spanned<String>>,
    pub service: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub open_duration: Option<Spanned<String>>,
    pub half_open_requests: Option<Spanned<i64>>,
    /// Elements are any TOML value so that `["502"]` is reported by validation with the
    /// element's index, not by serde with only the enclosing table.
    pub failure_statuses: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub connect: Option<Spanned<String>>,
    pub response: Option<Spanned<String>>,
    pub idle: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetries {
    pub attempts: Option<Spanned<i64>>,
}

/// A backend is either `"host:port"` or `{ address = "host:port", weight = 3, backup = true }`.
pub(super) enum RawBackend {
    Plain(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackendTable {
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub backup: Option<bool>,
}

/// Pool TLS is either a bool or `{ ca = "...", server_name = "..." }`.
pub(super) enum RawUpstreamTls {
    Flag(bool),
    Table(RawUpstreamTlsTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTlsTable {
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
}

/// A size is an integer of bytes or a string with a unit.
pub(super) enum RawSize {
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
                f.write_str("an address string or a table { address, weight, backup }")
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
