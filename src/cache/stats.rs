//! What the cache did, counted for `/metrics` and `/status`. Shared by a cache and the one
//! that replaces it when `[cache]` changes size, so counters never go backwards on a reload.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Default)]
pub struct Stats {
    /// Answered from a fresh stored response (client 304s and collapsed waiters included).
    pub hits: AtomicU64,
    /// Went to a backend for a cacheable request (cold, a Vary miss, stale, or forced).
    pub misses: AtomicU64,
    /// A stale response served at once while one background request refreshes it.
    pub stale_while_revalidate: AtomicU64,
    /// A stale response served because the backends failed.
    pub stale_if_error: AtomicU64,
    /// Stale responses a backend's 304 made fresh again, without a body transfer.
    pub revalidated: AtomicU64,
    /// Responses stored (their whole body arrived within `max_object_size`).
    pub stores: AtomicU64,
    /// Requests the cache stepped aside for: methods other than GET/HEAD, `no-store`,
    /// upgrades and requests with a body.
    pub bypass: AtomicU64,
    /// Responses dropped to make room.
    pub evictions: Arc<AtomicU64>,
}
