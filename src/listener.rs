//! Client-facing listeners: the accept loop, TLS, and serving each connection with hyper
//! (HTTP/1.1 with keep-alive and pipelining, HTTP/2 by ALPN or h2c prior knowledge).
//!
//! A listener task owns its bound socket until told to stop (shutdown, or a reload that removed
//! it). Each connection task holds a permit of the listener's `max_connections` semaphore and a
//! clone of the drain sender, so graceful shutdown can wait for the last one. Limits and TLS
//! certificates are read from the snapshot current at accept time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::{Limits, MIN_HEADER_BUFFER};
use crate::conn::{Active, ConnInfo, DrainGuard, Tracked};
use crate::framing::Sniffer;
use crate::proxy;
use crate::stall::{StallTimeout, StreamExec};
use crate::state::Shared;

/// Stop signals a listener task watches: `stop` (stop accepting) and `drain` (ask open
/// connections to finish their current request and close).
#[derive(Clone)]
pub struct Signals {
    pub stop: watch::Receiver<bool>,
    pub drain: watch::Receiver<bool>,
    pub drain_guard: DrainGuard,
}

/// Accepts until `signals.stop` turns true, then returns (dropping the socket, so the kernel
/// refuses new connections at once). Accept errors never end the loop.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut signals: Signals) {
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt here
    // instead of one per connection.
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on the listener");
    }
    let bind = listener.local_addr().ok();
    let max = shared.snapshot.load().limits.max_connections;
    let permits = Arc::new(Semaphore::new(
        usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS),
    ));
    let mut backoff = Duration::from_millis(5);
    loop {
        // Beyond max_connections we stop calling accept(): new connections wait in the
        // kernel's backlog instead of being accepted and starved.
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut signals.stop) => return,
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let accepted = tokio::select! {
            biased;
            _ = stopped(&mut signals.stop) => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                if is_per_connection_error(&e) {
                    continue;
                }
                // EMFILE/ENFILE/ENOBUFS: the socket stays readable, so retrying at once would
                // spin. Back off, and keep going.
                tracing::warn!(listener = ?bind, error = %e, backoff = ?backoff, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let signals = signals.clone();
        tokio::spawn(async move {
            serve(stream, peer, bind, shared, signals).await;
            drop(permit);
        });
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

fn builder(limits: &Limits) -> auto::Builder<StreamExec> {
    let mut b = auto::Builder::new(StreamExec {
        limit: limits.header_timeout,
    });
    let buf = limits.max_header_bytes.max(MIN_HEADER_BUFFER);
    b.http1()
        .timer(TokioTimer::new())
        // hyper's head timer starts when it waits for the next request, so it would cut idle
        // keep-alive connections at header_timeout: heads are timed from their first byte by
        // StallTimeout instead, and idle waits are idle_timeout's.
        .header_read_timeout(None)
        .max_buf_size(usize::try_from(buf).unwrap_or(usize::MAX))
        // half_close stays off: a client's FIN while its request is in flight means it went
        // away (nginx's 499), so the request is abandoned at once and never counted against
        // the backend. The price: `printf ... | nc -N` gets no answer; use curl.
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Counts a client connection as open for as long as it lives.
struct OpenConn(Arc<Shared>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    bind: Option<SocketAddr>,
    shared: Arc<Shared>,
    signals: Signals,
) {
    shared.open_connections.fetch_add(1, Relaxed);
    let _open = OpenConn(Arc::clone(&shared));
    let snap = shared.snapshot.load_full();
    let limits = snap.limits;
    let tls = bind.and_then(|b| snap.tls_for(b));
    drop(snap);
    // StallTimeout closes a connection that sends nothing within header_timeout (the protocol
    // sniff of hyper-util's auto builder has no timeout), and times HTTP/1 request heads.
    match tls {
        None => {
            let info = ConnInfo::new(
                peer,
                false,
                limits.header_timeout,
                Some(signals.drain_guard.clone()),
            );
            // Plain TCP closes without a shutdown() first: the close sends the same FIN, one
            // syscall fewer per connection (TLS keeps it for close_notify).
            let io = StallTimeout::new(
                Sniffer::new(stream, Arc::clone(&info)).close_without_shutdown(),
                send_timeout(&limits),
                Arc::clone(&info),
            );
            drive(TokioIo::new(io), info, &limits, shared, signals).await
        }
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            // A handshake that stalls is cut off like a slow request head.
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let info = ConnInfo::new(
                        peer,
                        true,
                        limits.header_timeout,
                        Some(signals.drain_guard.clone()),
                    );
                    let io = StallTimeout::new(
                        Sniffer::new(tls, Arc::clone(&info)),
                        send_timeout(&limits),
                        Arc::clone(&info),
                    );
                    drive(TokioIo::new(io), info, &limits, shared, signals).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

/// How long a blocked write to a client may wait: the header timeout, like nginx's
/// send_timeout defaulting to its client_header_timeout.
fn send_timeout(limits: &Limits) -> Duration {
    limits.header_timeout
}

async fn drive<I>(
    io: I,
    info: Arc<ConnInfo>,
    limits: &Limits,
    shared: Arc<Shared>,
    mut signals: Signals,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let b = builder(limits);
    let peer = info.peer;
    let svc = service_fn(move |req| {
        // In flight from here until the response body is dropped (sent, or the client left).
        let active = Active::start(&info);
        let handled = proxy::handle(Arc::clone(&shared), Arc::clone(&info), req);
        async move {
            let resp = handled.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, active)))
        }
    });
    let conn = b.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let _guard = signals.drain_guard.clone();
    if *signals.drain.borrow() || *signals.stop.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stopped(&mut signals.drain) => {}
        // A reload removed this listener: its connections finish what they started.
        _ = stopped(&mut signals.stop) => {}
    }
    // Finish the request in flight (a long stream included), then close; idle keep-alive
    // connections close at once.
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error while draining");
    }
}
