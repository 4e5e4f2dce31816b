//! Stampede protection: concurrent misses for one key send one request to a backend.
//!
//! The first miss becomes the leader and registers a flight under the plain key; later misses
//! wait for it (at most the pool's response timeout) and then look the cache up again. The
//! leader's `Leader` guard ends the flight when dropped: after the tee stored the body, or as
//! soon as the response turned out uncacheable, failed or was abandoned, so that waiters never
//! wait for a response they cannot use. The map's mutex is held for one insert or remove,
//! never across an await, and only on a miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<String, watch::Receiver<bool>>>,
}

pub enum Join {
    Leader(Leader),
    Wait(watch::Receiver<bool>),
}

impl Flights {
    /// Leads a new flight for `key`, or follows the one under way.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let Ok(mut map) = self.map.lock() else {
            // A panic elsewhere poisoned the map: no collapsing, every miss goes on its own.
            return Join::Wait(watch::channel(true).1);
        };
        if let Some(rx) = map.get(key) {
            return Join::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(false);
        map.insert(key.to_owned(), rx);
        Join::Leader(Leader {
            flights: Arc::clone(self),
            key: key.to_owned(),
            tx,
        })
    }

    /// Starts a flight only if none is under way (one background refresh per key).
    pub fn lead(self: &Arc<Self>, key: &str) -> Option<Leader> {
        match self.join(key) {
            Join::Leader(l) => Some(l),
            Join::Wait(_) => None,
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }
}

/// Waits until the flight ends or `limit` passes.
pub async fn wait(mut rx: watch::Receiver<bool>, limit: Duration) {
    // An error means the leader is gone, which also ends the wait.
    let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
}

/// The one request under way for a key; ends the flight when dropped.
pub struct Leader {
    flights: Arc<Flights>,
    key: String,
    tx: watch::Sender<bool>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Ok(mut map) = self.flights.map.lock() {
            map.remove(&self.key);
        }
        let _ = self.tx.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_followers_wake_when_it_ends() {
        let f = Arc::new(Flights::default());
        let Join::Leader(l) = f.join("k") else {
            panic!("first is the leader")
        };
        let Join::Wait(rx) = f.join("k") else {
            panic!("second waits")
        };
        assert!(f.lead("k").is_none());
        let w = tokio::spawn(wait(rx, Duration::from_secs(30)));
        tokio::task::yield_now().await;
        assert!(!w.is_finished());
        drop(l);
        w.await.unwrap();
        assert_eq!(f.in_flight(), 0);
        assert!(matches!(f.join("k"), Join::Leader(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_bounded() {
        let f = Arc::new(Flights::default());
        let _l = f.join("k");
        let Join::Wait(rx) = f.join("k") else {
            panic!("second waits")
        };
        let start = tokio::time::Instant::now();
        wait(rx, Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
