//! The memory: stored responses bounded in bytes, with `quick_cache`.
//!
//! `quick_cache` (weighted, sharded, CLOCK-PRO eviction close to S3-FIFO) rather than `moka`:
//! its weight bound is enforced on every insert under the shard lock, so the bytes in use
//! never exceed `max_size`, where moka applies evictions in batches later (its
//! `weighted_size` may run past the capacity until the next maintenance pass). Its eviction
//! keeps what is asked again (frequency-aware, scan-resistant: a crawl through a million cold
//! URLs does not flush the hot set), hits take a read lock on one shard and clone an `Arc`,
//! and it has no background threads.
//!
//! The weight of an entry is counted honestly: the key, the body (copied into an exact-size
//! buffer, never a slice pinning hyper's read buffer), every header name and value (copied for
//! the same reason) with a per-field allowance for `HeaderMap`'s own tables, the request
//! headers the policy keeps, and a fixed allowance for the structs. What is not in the weight
//! is `quick_cache`'s table: about 21 bytes plus two pointers per slot (see the README).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_cache_semantics::CachePolicy;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use super::key;
use super::policy::Directives;
use crate::config::CacheConfig;

/// Per header field: `HeaderMap`'s bucket and index slot, and the two allocations' headers.
const FIELD_OVERHEAD: u64 = 64;
/// Per entry: `Entry`, `CachePolicy` (two maps, a URI, two directive tables), the `Arc`s.
const ENTRY_OVERHEAD: u64 = 1024;
/// Per key: the `String` and quick_cache's bookkeeping for it.
const KEY_OVERHEAD: u64 = 64;
/// Freshness beyond what `SystemTime` can hold.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The most shards: enough that hits on different keys rarely meet on one lock.
const MAX_SHARDS: usize = 16;

/// One stored response.
pub struct Entry {
    pub status: StatusCode,
    /// As served: hop-by-hop headers, `Age` and `Cache-Status` removed.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub policy: CachePolicy,
    /// When freshness ends; the fast path compares only this.
    pub fresh_until: SystemTime,
    pub directives: Directives,
    /// What this entry costs, in bytes, against `max_size`.
    pub weight: u64,
}

impl Entry {
    /// `headers` and `policy` must have been built from owned copies (see `own`).
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        policy: CachePolicy,
        policy_request: &HeaderMap,
        now: SystemTime,
    ) -> Entry {
        // A backend's `max-age` can be any u64: far enough is forever.
        let fresh_until = now
            .checked_add(policy.time_to_live(now))
            .unwrap_or(now + FOREVER);
        let directives = Directives::of(&headers);
        // The policy keeps its own clone of the response headers (values shared, tables not).
        let weight = body.len() as u64
            + 2 * header_bytes(&headers)
            + header_bytes(policy_request)
            + ENTRY_OVERHEAD;
        Entry {
            status,
            headers,
            body,
            policy,
            fresh_until,
            directives,
            weight,
        }
    }

    /// How long past freshness this entry is; `None` while fresh.
    pub fn stale_by(&self, now: SystemTime) -> Option<Duration> {
        // `now == fresh_until` is already stale (RFC 9111 §4.2: fresh while age < lifetime).
        now.duration_since(self.fresh_until).ok()
    }
}

fn header_bytes(h: &HeaderMap) -> u64 {
    h.iter()
        .map(|(n, v)| (n.as_str().len() + v.len()) as u64 + FIELD_OVERHEAD)
        .sum::<u64>()
        + FIELD_OVERHEAD
}

/// A copy of `h` whose values own their bytes: hyper's parsed values are slices of the
/// connection's read buffer, which a stored copy would otherwise keep alive whole.
pub fn own(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(h.len());
    for (n, v) in h {
        let mut copy = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
        copy.set_sensitive(v.is_sensitive());
        out.append(n.clone(), copy);
    }
    out
}

/// The names a response varies on, and the generation in its variants' keys.
pub struct VaryIndex {
    pub names: Box<[HeaderName]>,
    pub generation: u64,
}

#[derive(Clone)]
pub enum Stored {
    Response(Arc<Entry>),
    /// At a plain key whose responses vary: where to look next.
    Vary(Arc<VaryIndex>),
}

#[derive(Clone)]
struct Weigh;

impl Weighter<String, Stored> for Weigh {
    fn weight(&self, k: &String, v: &Stored) -> u64 {
        k.capacity() as u64
            + KEY_OVERHEAD
            + match v {
                Stored::Response(e) => e.weight,
                Stored::Vary(i) => {
                    64 + i
                        .names
                        .iter()
                        .map(|n| n.as_str().len() as u64 + 32)
                        .sum::<u64>()
                }
            }
    }
}

/// Counts evictions; what was evicted is dropped after the shard lock is released.
#[derive(Clone)]
struct Evictions(Arc<AtomicU64>);

impl Lifecycle<String, Stored> for Evictions {
    type RequestState = Vec<Stored>;

    fn on_evict(&self, state: &mut Vec<Stored>, _key: String, val: Stored) {
        self.0.fetch_add(1, Relaxed);
        state.push(val);
    }
}

pub struct Store {
    map: Cache<String, Stored, Weigh, DefaultHashBuilder, Evictions>,
    /// The largest weight one shard holds: an entry above it could never be admitted.
    shard_capacity: u64,
}

impl Store {
    pub fn new(cfg: &CacheConfig, evictions: Arc<AtomicU64>) -> Store {
        // Shards split `max_size` evenly; each must hold a few of the largest objects, or
        // those could never be stored at all.
        let mut shards = 1usize;
        while shards < MAX_SHARDS
            && cfg.max_size / (shards as u64 * 2) >= cfg.max_object_size.saturating_mul(2)
        {
            shards *= 2;
        }
        let estimated = (cfg.max_size / 8192).clamp(32 * shards as u64, 1 << 20) as usize;
        let opts = OptionsBuilder::new()
            .shards(shards)
            .estimated_items_capacity(estimated)
            .weight_capacity(cfg.max_size)
            .build();
        let map = match opts {
            Ok(o) => Cache::with_options(
                o,
                Weigh,
                DefaultHashBuilder::default(),
                Evictions(evictions),
            ),
            // The builder refuses only options we never set (a negative allocation).
            Err(_) => Cache::with(
                estimated,
                cfg.max_size,
                Weigh,
                DefaultHashBuilder::default(),
                Evictions(evictions),
            ),
        };
        let shard_capacity = map.shard_capacity();
        Store {
            map,
            shard_capacity,
        }
    }

    pub fn get(&self, key: &str) -> Option<Stored> {
        self.map.get(key)
    }

    /// Stores `v` at `key`; `false` when it is too large ever to be admitted.
    pub fn insert(&self, key: String, v: Stored) -> bool {
        if Weigh.weight(&key, &v) > self.shard_capacity {
            return false;
        }
        self.map.insert(key, v);
        true
    }

    pub fn remove(&self, key: &str) -> bool {
        self.map.remove(key).is_some()
    }

    /// Drops every response under `prefix` (and host); the number of responses dropped.
    pub fn purge(&self, host: Option<&str>, prefix: &str) -> usize {
        let n = Cell::new(0usize);
        self.map.retain(|k, v| {
            let hit = key::purged_by(k, host, prefix);
            if hit && matches!(v, Stored::Response(_)) {
                n.set(n.get() + 1);
            }
            !hit
        });
        n.get()
    }

    /// Bytes in use, by the weights above; never more than `max_size`.
    pub fn bytes(&self) -> u64 {
        self.map.weight()
    }

    /// Stored responses and Vary indexes.
    pub fn entries(&self) -> usize {
        self.map.len()
    }

    pub fn capacity(&self) -> u64 {
        self.map.capacity()
    }
}
