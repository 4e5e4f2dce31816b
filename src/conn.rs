//! What one client connection tells each of its requests: the peer, whether it came over TLS,
//! the drain guard that graceful shutdown waits on, and the per-connection flags that the
//! framing sniffer and WebSocket tunnels set.
//!
//! The listener creates one `ConnInfo` per accepted connection and shares it (an `Arc`) with
//! every request of that connection, with the sniffer and stall guard that read its bytes, and
//! with its listener's registry (`conns.rs`), which reads `activity` to find idle connections.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_queue::SegQueue;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, Notify};

/// Held by every live connection and tunnel; graceful shutdown waits until all are dropped.
pub type DrainGuard = mpsc::Sender<()>;

/// What the connection tells each of its requests. One per client connection, shared by its
/// requests through an `Arc`.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// TLS version and SNI as the access log's `tls` value (`tls_json`), made once per
    /// connection after the handshake; `None` on plain TCP.
    pub tls_log: Option<Box<str>>,
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
    /// Requests (h1) or streams (h2) of this connection: the low 32 bits count those in flight,
    /// the high 32 bits those ever started (wrapping). One word, so that a request costs one
    /// relaxed add when it starts and one relaxed sub when its response ends, and a reader can
    /// tell "idle all along" from "idle again after other requests" with one load.
    pub activity: AtomicU64,
    /// An HTTP/1 request head has started arriving and is not complete yet (set by
    /// `stall::StallTimeout`, only once the client paused mid-head): the connection is not idle,
    /// header_timeout bounds it.
    pub head_pending: AtomicBool,
    /// What the socket layers below hyper see of an HTTP/1 connection: `IO_WRITE_BLOCKED`
    /// (`stall::StallTimeout`) and `IO_MID_MESSAGE` (`framing::Sniffer`). Written only when a
    /// bit changes. `listener` parks an idle connection only when both are clear.
    pub io_state: AtomicU8,
    /// Why the connection is asked to close (`ASK_*` bits), and the one wake-up its task waits
    /// on besides the connection itself: one `Notify` rather than a future per reason, so a
    /// busy connection's task polls one extra future per wake, not four (watch receivers take
    /// a lock per poll).
    pub asked: AtomicU8,
    pub close: Notify,
    /// Set when the balancer gave up on a client that stopped reading (a write blocked past
    /// the send timeout): the responses cut then are the balancer's doing, and logged so.
    pub stalled: AtomicBool,
    /// h2 `:path`s that carried a `#`, as the URI parser cut them (`h2path.rs` finds them;
    /// `proxy::forward` refuses the requests they became).
    /// Made on the first one: a `SegQueue` is two cache-padded halves, which made every
    /// connection's `ConnInfo` 512 bytes, 128-aligned, for a report almost none ever gets.
    h2_fragments: OnceLock<Box<SegQueue<Box<str>>>>,
    /// The h2 header blocks could not be followed: paths can no longer be checked.
    pub h2_unchecked: AtomicBool,
}

/// `asked`: idle past idle_timeout, or making room for a new client (`conns.rs`).
pub const ASK_IDLE: u8 = 1;
/// `asked`: drain (shutdown) or the listener was removed by a reload: finish what is in
/// flight, then close.
pub const ASK_FINISH: u8 = 2;
/// `asked`: the h2 client floods with cancelled streams (`flood.rs`): GOAWAY and close.
pub const ASK_ABUSE: u8 = 4;
/// `asked`: idle for `conns::PARK_AFTER`: an HTTP/1 connection lets go of its hyper connection
/// and buffers until its client's next bytes (`listener::serve_h1`); others ignore it.
pub const ASK_PARK: u8 = 8;

/// `io_state`: a write to the client is blocked.
pub const IO_WRITE_BLOCKED: u8 = 1;
/// `io_state`: part of a request head or body has arrived, or the stream is no longer
/// followed as HTTP/1 messages (upgrade, h2, garbage).
pub const IO_MID_MESSAGE: u8 = 2;

/// One in-flight unit of `activity.started`.
pub const STARTED_ONE: u64 = 1 << 32;

/// Requests or streams in flight in an `activity` word.
pub fn in_flight(activity: u64) -> u32 {
    activity as u32
}

/// Requests or streams ever started (wrapping) in an `activity` word.
pub fn started(activity: u64) -> u32 {
    (activity >> 32) as u32
}

/// Counts one request or stream as in flight for as long as it lives: from the moment hyper
/// hands the request to the service until its response body is dropped (fully sent, or the
/// client went away).
pub struct Active(Arc<ConnInfo>);

impl Active {
    pub fn start(info: &Arc<ConnInfo>) -> Active {
        info.activity.fetch_add(STARTED_ONE | 1, Relaxed);
        Active(Arc::clone(info))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.activity.fetch_sub(1, Relaxed);
    }
}

/// A response body that keeps its request counted in flight (`Active`) until hyper drops it.
pub struct Tracked<B> {
    inner: B,
    _active: Active,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, active: Active) -> Tracked<B> {
        Tracked {
            inner,
            _active: active,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl ConnInfo {
    /// `tls_log`: `Some` (from `tls_json`) for a TLS connection.
    pub fn new(
        peer: SocketAddr,
        tls_log: Option<Box<str>>,
        body_timeout: Duration,
        drain: Option<DrainGuard>,
    ) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            peer,
            tls: tls_log.is_some(),
            tls_log,
            peer_ip: ip_value(peer.ip()),
            drain,
            body_timeout,
            requests: AtomicU64::new(0),
            ambiguous_at: AtomicU64::new(u64::MAX),
            upgraded: AtomicBool::new(false),
            activity: AtomicU64::new(0),
            head_pending: AtomicBool::new(false),
            io_state: AtomicU8::new(0),
            asked: AtomicU8::new(0),
            close: Notify::new(),
            stalled: AtomicBool::new(false),
            h2_fragments: OnceLock::new(),
            h2_unchecked: AtomicBool::new(false),
        })
    }

    /// Asks the connection to close, for `why` (an `ASK_*` bit). `notify_one` keeps a permit
    /// if the connection task is not waiting yet.
    pub fn ask(&self, why: u8) {
        self.asked.fetch_or(why, Relaxed);
        self.close.notify_one();
    }

    /// Clears `ASK_PARK`; true when nothing else is asked (the wake-up was only to park),
    /// false when something else was, which stays for the caller to act on.
    pub fn take_park(&self) -> bool {
        self.asked.fetch_and(!ASK_PARK, Relaxed) & !ASK_PARK == 0
    }

    /// Whether no request or stream is in flight.
    pub fn is_idle(&self) -> bool {
        in_flight(self.activity.load(Relaxed)) == 0
    }

    /// Whether an HTTP/1 connection is between requests with nothing half done: no request in
    /// flight, at least one started since `since` (the started count when its hyper connection
    /// was made, so hyper itself is idle rather than waiting for its first request), no
    /// partial head or body received, no write blocked, not a tunnel.
    pub fn parkable(&self, since: u32) -> bool {
        let a = self.activity.load(Relaxed);
        in_flight(a) == 0
            && started(a) != since
            && self.io_state.load(Relaxed) == 0
            && !self.upgraded.load(Relaxed)
    }

    /// Sets or clears one of the `io_state` bits.
    pub fn set_io(&self, bit: u8, on: bool) {
        if on {
            self.io_state.fetch_or(bit, Relaxed);
        } else {
            self.io_state.fetch_and(!bit, Relaxed);
        }
    }

    /// The started count of `activity`, for `parkable`.
    pub fn started(&self) -> u32 {
        started(self.activity.load(Relaxed))
    }
}

/// An address as a header value (X-Forwarded-For). IPv4 is written by hand: `Ipv4Addr`'s
/// `Display` goes through the formatting machinery, ~2,500 instructions per connection, about
/// 5% of a `Connection: close` request.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    let value = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    buf[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + o % 10;
                n += 1;
            }
            HeaderValue::from_bytes(&buf[..n])
        }
        std::net::IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()),
    };
    value.unwrap_or(HeaderValue::from_static("unknown"))
}

/// The access log's `tls` value for a handshake: `{"version":"TLSv1.3","sni":"a.example"}`
/// (`sni` null when the client sent none).
pub fn tls_json(version: Option<rustls::ProtocolVersion>, sni: Option<&str>) -> Box<str> {
    let version = match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    };
    let mut s = String::with_capacity(48);
    s.push_str("{\"version\":\"");
    s.push_str(version);
    s.push_str("\",\"sni\":");
    match sni {
        // rustls only hands out valid DNS names; escaped all the same, it is the client's.
        Some(n) => crate::accesslog::json_str(n, &mut s),
        None => s.push_str("null"),
    }
    s.push('}');
    s.into_boxed_str()
}

impl ConnInfo {
    /// Whether this h2 request's `:path` had a `#` (or could not be checked). Takes the
    /// matching report off the queue; the queue is empty, and this one load, for nearly every
    /// connection.
    pub fn h2_fragment(&self, path_and_query: &str) -> bool {
        if self.h2_unchecked.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let Some(queue) = self.h2_fragments.get() else {
            return false;
        };
        let mut found = false;
        for _ in 0..queue.len() {
            let Some(p) = queue.pop() else {
                break;
            };
            if !found && &*p == path_and_query {
                found = true;
            } else {
                queue.push(p);
            }
        }
        found
    }

    /// Reports an h2 `:path` that had a `#` (`h2path.rs`), for `h2_fragment` to find.
    pub fn report_h2_fragment(&self, path: Box<str>) {
        self.h2_fragments
            .get_or_init(|| Box::new(SegQueue::new()))
            .push(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client connection holds one, idle or not (10,000 idle connections: ~4 KB each
    /// in all). 192 bytes; 512, 128-aligned, while a cache-padded queue sat in it unused.
    #[test]
    fn conn_info_stays_small() {
        let size = std::mem::size_of::<ConnInfo>();
        assert!(size <= 256, "ConnInfo is {size} bytes");
    }

    #[test]
    fn peer_addresses_as_header_values_read_as_their_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.100.9",
            "192.168.10.255",
            "255.255.255.255",
            "1.20.3.40",
            "::1",
            "2001:db8::1",
            "::ffff:10.1.2.3",
        ] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(addr).to_str().unwrap(), addr.to_string(), "{ip}");
        }
    }
}
