//! The two clocks the balancer reads: a monotonic one in milliseconds, packed into atomics by
//! breakers and idle connection queues (an `Instant` does not fit in a `u64`), and wall-clock
//! milliseconds for what an operator reads (`/status` last-error times).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on a monotonic clock private to this process.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `t` on the clock of `now_ms`, for a caller that has already read the time (0 if it is
/// before the clock's first reading).
pub fn ms_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// Milliseconds since the Unix epoch (0 if the system clock is set before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
