//! The snapshot: everything the config says, compiled for the request path, behind one
//! `ArcSwap`.
//!
//! The request path loads the snapshot once per request and uses nothing else; the reload task
//! builds the next one with `Snapshot::build`, handing over every `Arc<Backend>` whose pool and
//! address survive, and swaps it in with one store. A snapshot is never mutated after it is
//! built (the round-robin cursors inside are its only atomics), so a request never sees half a
//! reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::backend::Backend;
use crate::balance::{Member, Pool};
use crate::cache::Cache;
use crate::config::{Config, HostMatch, Limits};
use crate::tls::{self, UpstreamTlsConnector};
use crate::upstream::Dial;

pub struct Route {
    host: Option<HostMatch>,
    prefix: String,
    pool: usize,
    cache: bool,
}

pub struct Snapshot {
    /// Starts at 1 and grows by one per applied reload (`config.version` in `/status`).
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub config: Arc<Config>,
    pub routes: Vec<Route>,
    pub pools: Vec<Arc<Pool>>,
    pub limits: Limits,
    pub access_log: bool,
    /// The response cache, carried across reloads like the backends (`None` without
    /// `[cache]`).
    pub cache: Option<Arc<Cache>>,
    /// TLS settings per listener address, certificates read when this snapshot was built.
    tls: Vec<(SocketAddr, Arc<rustls::ServerConfig>)>,
}

/// What every task shares: the current snapshot and the last reload error.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub last_error: ArcSwap<Option<String>>,
    /// Applied and rejected reloads, for `/metrics`.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Client connections open on all listeners.
    pub open_connections: AtomicUsize,
    /// Of those, idle HTTP/1 connections parked without a hyper connection (`listener`).
    pub parked_connections: AtomicUsize,
    /// When the process started serving, for `/status` `process.started_at` and `uptime_s`:
    /// wall clock to show, monotonic (`clock::now_ms`) to count from, since the wall clock
    /// may be stepped.
    pub started_at: SystemTime,
    pub started_ms: u64,
}

impl Shared {
    pub fn new(snap: Snapshot) -> Shared {
        Shared {
            snapshot: ArcSwap::from_pointee(snap),
            last_error: ArcSwap::from_pointee(None),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            open_connections: AtomicUsize::new(0),
            parked_connections: AtomicUsize::new(0),
            started_at: SystemTime::now(),
            started_ms: crate::clock::now_ms(),
        }
    }
}

impl Snapshot {
    /// Compiles `cfg`, re-using each backend of `prev` that has the same pool and address.
    /// Fails only on what validation cannot see (a TLS root store that cannot be built).
    pub fn build(
        cfg: Arc<Config>,
        prev: Option<&Snapshot>,
        generation: u64,
    ) -> Result<Snapshot, String> {
        let mut old: HashMap<(&str, &str), &Arc<Backend>> = HashMap::new();
        if let Some(prev) = prev {
            for p in &prev.pools {
                for m in &p.members {
                    old.insert((&*p.name, &*m.backend.address), &m.backend);
                }
            }
        }
        let mut pools = Vec::with_capacity(cfg.pools.len());
        for pc in &cfg.pools {
            let tls = match &pc.tls {
                Some(t) => Some(
                    UpstreamTlsConnector::new(t)
                        .map_err(|e| format!("pools.{}.tls: {e}", pc.name))?,
                ),
                None => None,
            };
            let prev_pool = prev.and_then(|p| p.pools.iter().find(|o| *o.name == *pc.name));
            // Pooled connections are tagged with this: same TLS trust, same transport, and
            // surviving backends keep their idle connections; otherwise none of the old ones is
            // ever handed out again (see idle.rs), and health probes restart. The trust is
            // compared as built, not as written: a CA file rewritten in place changes it.
            // A change of protocol is a change of transport too: an h2 connection must never
            // be handed to an HTTP/1.1 pool, nor the other way round.
            let same_transport = |pp: &Pool| {
                pp.dial.protocol == pc.protocol
                    && match (&pp.dial.tls, &tls) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a.fingerprint() == b.fingerprint(),
                        _ => false,
                    }
            };
            let transport = match prev_pool {
                Some(pp) if same_transport(pp) => pp.dial.transport,
                _ => generation,
            };
            let members = pc
                .backends
                .iter()
                .map(|bc| {
                    let backend = match old.get(&(pc.name.as_str(), bc.address.as_str())) {
                        Some(b) if b.addr == bc.addr => {
                            if pc.breaker.consecutive_failures == 0 {
                                b.breaker.reset();
                            }
                            Arc::clone(b)
                        }
                        _ => Arc::new(Backend::new(&pc.name, &bc.address, bc.addr)),
                    };
                    Member {
                        backend,
                        weight: bc.weight,
                        backup: bc.backup,
                    }
                })
                .collect();
            let dial = Dial {
                timeouts: pc.timeouts,
                tls,
                protocol: pc.protocol,
                transport,
            };
            pools.push(Arc::new(Pool::new(pc, members, dial)));
        }
        let mut tls = Vec::new();
        for l in &cfg.listeners {
            if let Some(t) = &l.tls {
                tls.push((l.bind, tls::server_config(t)?));
            }
        }
        let routes = cfg
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.clone(),
                prefix: r.path_prefix.clone(),
                pool: r.pool_index,
                cache: r.cache,
            })
            .collect();
        Ok(Snapshot {
            generation,
            loaded_at: SystemTime::now(),
            limits: cfg.limits,
            access_log: cfg.log.access,
            cache: Cache::carry(cfg.cache.as_ref(), prev.and_then(|p| p.cache.as_ref())),
            routes,
            pools,
            tls,
            config: cfg,
        })
    }

    /// The first route matching `host` (port and case ignored) and `path`; with no routes and
    /// a single pool, that pool.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        self.route_cached(host, path).map(|(p, _)| p)
    }

    /// [`Snapshot::route`], and the cache when the route has `cache = true`.
    pub fn route_cached(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Option<(&Arc<Pool>, Option<&Arc<Cache>>)> {
        if self.routes.is_empty() {
            return match self.pools.as_slice() {
                [only] => Some((only, None)),
                _ => None,
            };
        }
        let host = host.map(strip_port);
        let r = self
            .routes
            .iter()
            .find(|r| host_matches(r.host.as_ref(), host) && prefix_matches(&r.prefix, path))?;
        let cache = if r.cache { self.cache.as_ref() } else { None };
        Some((self.pools.get(r.pool)?, cache))
    }

    pub fn backend(&self, pool: &str, address: &str) -> Option<&Arc<Backend>> {
        self.pools
            .iter()
            .find(|p| &*p.name == pool)?
            .members
            .iter()
            .map(|m| &m.backend)
            .find(|b| &*b.address == address)
    }

    /// Backends of this snapshot that `next` no longer has (by identity, not address).
    pub fn backends_not_in<'a>(
        &'a self,
        next: &'a Snapshot,
    ) -> impl Iterator<Item = &'a Arc<Backend>> + 'a {
        self.pools
            .iter()
            .flat_map(|p| p.members.iter().map(|m| &m.backend))
            .filter(move |b| {
                !next
                    .pools
                    .iter()
                    .any(|p| p.members.iter().any(|m| Arc::ptr_eq(&m.backend, b)))
            })
    }

    pub fn tls_for(&self, bind: SocketAddr) -> Option<Arc<rustls::ServerConfig>> {
        self.tls
            .iter()
            .find(|(a, _)| *a == bind)
            .map(|(_, c)| Arc::clone(c))
    }

    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.config.listeners.iter().map(|l| l.bind).collect()
    }
}

fn strip_port(host: &str) -> &str {
    let h = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port -> v6
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    h.strip_suffix('.').unwrap_or(h)
}

fn host_matches(pattern: Option<&HostMatch>, host: Option<&str>) -> bool {
    match (pattern, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HostMatch::Exact(p)), Some(h)) => p.eq_ignore_ascii_case(h),
        (Some(HostMatch::Suffix(s)), Some(h)) => {
            h.len() > s.len()
                && h.get(h.len() - s.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(s))
        }
    }
}

/// Segment-aware: `/v1` matches `/v1`, `/v1/` and `/v1/x`, not `/v10`. A prefix ending in
/// `/` matches everything below it.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_segment_aware() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/v1", "/v1"));
        assert!(prefix_matches("/v1", "/v1/users"));
        assert!(!prefix_matches("/v1", "/v10"));
        assert!(prefix_matches("/v1/", "/v1/x"));
        assert!(!prefix_matches("/v1/", "/v1"));
    }

    #[test]
    fn hosts_ignore_port_and_case() {
        let exact = HostMatch::Exact("api.example.com".into());
        let wild = HostMatch::Suffix(".example.com".into());
        assert!(host_matches(
            Some(&exact),
            Some(strip_port("API.example.com:8080"))
        ));
        assert!(host_matches(
            Some(&wild),
            Some(strip_port("a.b.Example.com"))
        ));
        assert!(!host_matches(Some(&wild), Some(strip_port("example.com"))));
        assert!(!host_matches(
            Some(&wild),
            Some(strip_port("badexample.com"))
        ));
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com."), "example.com");
    }
}
