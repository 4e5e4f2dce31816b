//! Idle keep-alive connections to one backend, ready for the next request.
//!
//! Each `Backend` owns one `IdleConns` (a lock-free queue), so pooled connections survive a
//! reload with the backend. The request path pops one, the response body puts it back when
//! the exchange completed cleanly, and the control task's reaper closes those idle past
//! `timeouts.idle`. Every connection is tagged with the transport it speaks (the pool's
//! `transport` id: plain or which TLS settings), so a reload that changes a pool's TLS can
//! never hand a request a connection of the old kind, even one that was still in flight
//! during the reload and comes back afterwards.

use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::backend_io::BackendIo;
use crate::clock::now_ms;

/// Idle keep-alive connections kept per backend; beyond it a finished connection is closed.
const MAX_IDLE_PER_BACKEND: usize = 512;

/// A connection together with what it speaks; the response body carries it back.
pub struct Conn {
    pub io: BackendIo,
    /// The pool's transport id when this connection was dialled.
    pub transport: u64,
}

struct Idle {
    conn: Conn,
    since_ms: u64,
}

pub struct IdleConns {
    q: ArrayQueue<Idle>,
}

impl Default for IdleConns {
    fn default() -> Self {
        IdleConns {
            q: ArrayQueue::new(MAX_IDLE_PER_BACKEND),
        }
    }
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleConns({})", self.q.len())
    }
}

impl IdleConns {
    /// The oldest usable connection speaking `transport`; stale, closed and mismatched ones
    /// met on the way are closed.
    pub fn pop(&self, transport: u64, idle: Duration) -> Option<Conn> {
        let now = now_ms();
        let idle_ms = idle.as_millis() as u64;
        while let Some(c) = self.q.pop() {
            if c.conn.transport == transport
                && now.saturating_sub(c.since_ms) < idle_ms
                && c.conn.io.is_open()
            {
                return Some(c.conn);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly (the exchange decides).
    pub fn put(&self, conn: Conn) {
        let _ = self.q.push(Idle {
            conn,
            since_ms: now_ms(),
        });
    }

    /// Closes connections idle for `idle` or more, those the backend closed, and those that
    /// speak another transport than `transport`.
    pub fn reap(&self, transport: u64, idle: Duration) {
        let now = now_ms();
        let idle_ms = idle.as_millis() as u64;
        for _ in 0..self.q.len() {
            let Some(c) = self.q.pop() else { break };
            if c.conn.transport == transport
                && now.saturating_sub(c.since_ms) < idle_ms
                && c.conn.io.is_open()
            {
                let _ = self.q.push(c);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Closes every idle connection (the backend left the config).
    pub fn clear(&self) {
        while self.q.pop().is_some() {}
    }
}
