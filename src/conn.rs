//! What one client connection tells each of its requests: the peer, whether it came over TLS,
//! the drain guard that graceful shutdown waits on, and the per-connection flags that the
//! framing sniffer and WebSocket tunnels set.
//!
//! The listener creates one `ConnInfo` per accepted connection and shares it (an `Arc`) with
//! every request of that connection and with the sniffer that reads its bytes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::mpsc;

/// Held by every live connection and tunnel; graceful shutdown waits until all are dropped.
pub type DrainGuard = mpsc::Sender<()>;

/// What the connection tells each of its requests. One per client connection, shared by its
/// requests through an `Arc`.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// Held by WebSocket tunnels, which outlive the HTTP connection they started on, so that
    /// graceful shutdown waits for them too.
    pub drain: Option<DrainGuard>,
    /// The peer's IP as a header value, built once per connection for X-Forwarded-For.
    pub peer_ip: HeaderValue,
    /// A client must make progress on its request body within this (limits.header_timeout).
    pub body_timeout: std::time::Duration,
    /// HTTP/1 requests seen on this connection, and the index of the first one that carried
    /// both Content-Length and Transfer-Encoding (`u64::MAX`: none), which `framing::Sniffer`
    /// finds because hyper drops the evidence.
    pub requests: AtomicU64,
    pub ambiguous_at: AtomicU64,
    /// Set once the connection became a WebSocket tunnel: from then on a shutdown of the
    /// socket is a real half-close that the peer must see.
    pub upgraded: AtomicBool,
}

impl ConnInfo {
    pub fn new(
        peer: SocketAddr,
        tls: bool,
        body_timeout: Duration,
        drain: Option<DrainGuard>,
    ) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            peer,
            tls,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            drain,
            body_timeout,
            requests: AtomicU64::new(0),
            ambiguous_at: AtomicU64::new(u64::MAX),
            upgraded: AtomicBool::new(false),
        })
    }
}
