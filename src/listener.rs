//! Client-facing listeners: the accept loop, TLS, and serving each connection with hyper
//! (HTTP/1.1 with keep-alive and pipelining, HTTP/2 by ALPN or h2c prior knowledge).
//!
//! A listener task owns its bound socket until told to stop (shutdown, or a reload that removed
//! it). Each connection task holds a place under the listener's `max_connections` (`conns.rs`)
//! and a clone of the drain sender, so graceful shutdown can wait for the last one. Limits and
//! TLS certificates are read from the snapshot current at accept time.
//!
//! Idle connections (no request or stream in flight) are closed after `idle_timeout` by a
//! sweeper task per listener, and sooner when the listener is full and a new client waits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::config::Limits;
use crate::conn::{Active, ConnInfo, DrainGuard, Tracked, ASK_ABUSE, ASK_FINISH};
use crate::conns::{Conns, Slot, PARK_AFTER};
use crate::flood::{self, ConnWatch, Penalties};
use crate::framing::Sniffer;
use crate::preface::{self, Opening, Replay};
use crate::proxy;
use crate::response_body::ResponseBody;
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
/// refuses new connections at once). Accept errors never end the loop. `conns` is this
/// listener's table, sized by `max_connections` (the controller resizes it on reload).
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut signals: Signals,
    conns: Arc<Conns>,
) {
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one setsockopt here
    // instead of one per connection.
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on the listener");
    }
    // Connections are accepted with their first bytes (`sockopt::defer_accept`); a client
    // that connects and stays silent reaches `accept` after DEFER_SILENT, and header_timeout
    // runs from there.
    if let Err(e) = crate::sockopt::defer_accept(&listener, DEFER_SILENT) {
        tracing::warn!(error = %e, "cannot set TCP_DEFER_ACCEPT on the listener");
    }
    let bind = listener.local_addr().ok();
    tokio::spawn(sweep(
        Arc::clone(&conns),
        Arc::clone(&shared),
        signals.stop.clone(),
        signals.drain.clone(),
    ));
    let mut backoff = Duration::from_millis(5);
    // Peer addresses that abused HTTP/2 recently: their new connections are closed at once.
    let penalties = Penalties::new();
    // One wait for the stop signal, kept across accepts: made afresh in every turn of the
    // loop it registered and dropped a waiter per connection (~700 instructions, callgrind).
    // It is polled only when no client is waiting: polled first, it re-registered its waker
    // on every accept (~230 instructions a connection). A listener that always has a client
    // waiting sees the signal by reading it after each accept.
    let mut stop_rx = signals.stop.clone();
    let mut stop = std::pin::pin!(stopped(&mut stop_rx));
    loop {
        let accepted = tokio::select! {
            biased;
            a = listener.accept() => Some(a),
            _ = &mut stop => None,
        };
        let Some(accepted) = accepted.filter(|_| !*signals.stop.borrow()) else {
            // Removed by a reload (or shutting down): the connections finish what they
            // started, then close. A client accepted meanwhile is closed with the socket.
            conns.finish_all();
            return;
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
        if penalties.refused(peer.ip()) {
            drop(stream);
            continue;
        }
        // The place is taken after accepting, so a reload that lowers max_connections meanwhile
        // is obeyed. Full: this client waits in `admit` (an idle connection is asked to make
        // room), and the ones after it wait in the kernel's backlog.
        let slot = match conns.capacity().try_acquire() {
            Some(s) => s,
            None => match admit(&conns, &mut signals.stop).await {
                Some(s) => s,
                None => return,
            },
        };
        let shared = Arc::clone(&shared);
        let signals = signals.clone();
        let conns = Arc::clone(&conns);
        let penalties = Arc::clone(&penalties);
        // Boxed: the task's own state is then a pointer, which tokio moves and overwrites as
        // the task starts and ends, rather than the connection's whole future three times.
        let conn = boxed(|| serve(stream, peer, bind, shared, signals, conns, penalties));
        tokio::spawn(async move {
            conn.await;
            drop(slot);
        });
    }
}

/// How long the kernel holds a connection whose client has sent nothing before handing it to
/// `accept` anyway. Short, so a silent client is soon counted against max_connections and
/// timed by header_timeout like any other; long enough for a client's first bytes, which
/// follow its handshake within a round trip.
const DEFER_SILENT: Duration = Duration::from_secs(1);

/// How often the accept loop, waiting for a place, looks again for an idle connection to ask
/// to make room (none was idle, or the one asked started a request instead of closing).
const EVICT_RETRY: Duration = Duration::from_millis(200);

/// The listener is full and a client has been accepted: waits for a place, asking the
/// connection idle the longest to make room. `None`: the listener is stopping.
async fn admit(conns: &Conns, stop: &mut watch::Receiver<bool>) -> Option<Slot> {
    let mut asked: Option<(Arc<ConnInfo>, tokio::time::Instant)> = None;
    loop {
        if let Some(s) = conns.capacity().try_acquire() {
            return Some(s);
        }
        // One asked and still idle is on its way out (an h2 client answering the GOAWAY's
        // PING; `drive` drops it after IDLE_CLOSE_GRACE at worst): asking more would close
        // connections for nothing. Past that grace it is gone and its place went elsewhere
        // (to a lowered max_connections).
        let on_its_way = asked
            .as_ref()
            .is_some_and(|(c, at)| c.is_idle() && at.elapsed() < IDLE_CLOSE_GRACE + EVICT_RETRY);
        if !on_its_way {
            asked = conns
                .evict_one(now_ms())
                .map(|c| (c, tokio::time::Instant::now()));
        }
        tokio::select! {
            biased;
            _ = stopped(stop) => return None,
            s = conns.capacity().acquire() => return s,
            _ = tokio::time::sleep(EVICT_RETRY) => {}
        }
    }
}

/// Closes the listener's connections idle for `limits.idle_timeout` and parks HTTP/1 ones idle
/// for `conns::PARK_AFTER`, looking every `PARK_AFTER` (or a quarter of a shorter timeout), so
/// a connection closes within that after its timeout: a coarse clock instead of a timer re-armed
/// per request. Also tells every connection when draining starts.
async fn sweep(
    conns: Arc<Conns>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut drain: watch::Receiver<bool>,
) {
    let mut drained = false;
    loop {
        let idle = shared.snapshot.load().limits.idle_timeout;
        let tick = (idle / 4).clamp(Duration::from_millis(10), PARK_AFTER);
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = stopped(&mut drain), if !drained => {
                drained = true;
                conns.finish_all();
                continue;
            }
            _ = tokio::time::sleep(tick) => {}
        }
        let idle = shared.snapshot.load().limits.idle_timeout;
        let n = conns.sweep(now_ms(), idle);
        if n > 0 {
            tracing::debug!(closing = n, idle_timeout = ?idle, "closing idle client connections");
        }
    }
}

/// Resolves once the flag turns true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The largest read of a request (head and body) on an HTTP/1 connection; at least hyper's
/// minimum of 8 KiB.
const BODY_READ_MAX: usize = 128 * 1024;

fn is_per_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    let head = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX);
    // hyper's head timer starts when it waits for the next request, so it would cut idle
    // keep-alive connections at header_timeout: heads are timed from their first byte by
    // StallTimeout instead, and idle waits are idle_timeout's.
    b.header_read_timeout(None)
        .max_header_size(head)
        // hyper's reads grow while they fill its buffer, up to this: a 64 KiB upload then
        // comes in one read and goes to the backend in one write. An idle connection is
        // parked without its buffer.
        .max_buf_size(head.max(BODY_READ_MAX))
        // half_close stays off: a client's FIN while its request is in flight means it went
        // away (nginx's 499), so the request is abandoned at once and never counted against
        // the backend. The price: `printf ... | nc -N` gets no answer; use curl.
        .keep_alive(true);
    b
}

fn http2_builder(limits: &Limits) -> http2::Builder<StreamExec> {
    let mut b = http2::Builder::new(StreamExec {
        limit: limits.header_timeout,
    });
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// `Box::pin(make())`, with the value built in its box. `Box::pin(f(..))` builds `f`'s value
/// on the stack and then copies all of it into the new allocation: for a future, its full
/// size (a request's handler is ~4.4 KB, most of it room for states it has not reached),
/// written into cold memory on every request. Allocating first lets the compiler build the
/// value in place, which writes only what it holds (keep-alive: 726 → 278 instructions of
/// memcpy per request, L1 write misses 373 → 331).
#[inline(always)]
fn boxed<T>(make: impl FnOnce() -> T) -> Pin<Box<T>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Counts a client connection as open for as long as it lives.
struct OpenConn(Arc<Shared>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Relaxed);
    }
}

/// What serving one client connection needs besides its socket.
struct Session {
    info: Arc<ConnInfo>,
    limits: Limits,
    shared: Arc<Shared>,
    /// Its drain guard keeps graceful shutdown waiting for as long as the connection is
    /// served (`info.drain`, for what outlives the connection: h2 streams, tunnels).
    signals: Signals,
    conns: Arc<Conns>,
    penalties: Arc<Penalties>,
}

// The future spawned per connection stays small (its state is copied a few times on the way
// into its task and stays resident while the connection lives): the TLS handshake and the
// hyper connection, a few KB each, are boxed, and only the protocol the client speaks is
// ever allocated.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    bind: Option<SocketAddr>,
    shared: Arc<Shared>,
    signals: Signals,
    conns: Arc<Conns>,
    penalties: Arc<Penalties>,
) {
    shared.open_connections.fetch_add(1, Relaxed);
    let _open = OpenConn(Arc::clone(&shared));
    let snap = shared.snapshot.load_full();
    let limits = snap.limits;
    let tls = bind.and_then(|b| snap.tls_for(b));
    drop(snap);
    match tls {
        None => {
            let info = ConnInfo::new(
                peer,
                None,
                limits.header_timeout,
                Some(signals.drain_guard.clone()),
            );
            // StallTimeout closes a connection that sends nothing within header_timeout, and
            // times HTTP/1 request heads. Plain TCP closes without a shutdown() first: the
            // close sends the same FIN, one syscall fewer per connection (TLS keeps it for
            // close_notify).
            let io = StallTimeout::new(
                Sniffer::new(stream, Arc::clone(&info)).close_without_shutdown(),
                send_timeout(&limits),
                Arc::clone(&info),
            );
            let session = Session {
                info,
                limits,
                shared,
                signals,
                conns,
                penalties,
            };
            // h2c by prior knowledge, or HTTP/1.
            match preface::read_opening(io, None).await {
                Opening::H2(io) => serve_h2(io, session).await,
                Opening::Other(io) => {
                    let park: WaitReadable<StallTimeout<Sniffer<TcpStream>>> =
                        |io, cx| io.get_ref().get_ref().poll_read_ready(cx);
                    serve_h1(io, session, Some(park)).await
                }
                Opening::Gone => {}
            }
        }
        Some(cfg) => {
            boxed(|| serve_tls(stream, peer, cfg, limits, shared, signals, conns, penalties)).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<rustls::ServerConfig>,
    limits: Limits,
    shared: Arc<Shared>,
    signals: Signals,
    conns: Arc<Conns>,
    penalties: Arc<Penalties>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    // A handshake that stalls is cut off like a slow request head.
    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    // ALPN is binding: h2 means HTTP/2 only; http/1.1, or no ALPN, HTTP/1.1 only. The first
    // bytes are checked against it.
    let session = tls.get_ref().1;
    let h2 = session.alpn_protocol() == Some(b"h2");
    // Once per connection, for the access log's `tls` field.
    let tls_log = crate::conn::tls_json(session.protocol_version(), session.server_name());
    let info = ConnInfo::new(
        peer,
        Some(tls_log),
        limits.header_timeout,
        Some(signals.drain_guard.clone()),
    );
    let io = StallTimeout::new(
        Sniffer::new(tls, Arc::clone(&info)),
        send_timeout(&limits),
        Arc::clone(&info),
    );
    let session = Session {
        info,
        limits,
        shared,
        signals,
        conns,
        penalties,
    };
    let limit = limits.header_timeout;
    match preface::read_opening(io, Some(limit)).await {
        Opening::H2(io) if h2 => serve_h2(io, session).await,
        // TLS connections are not parked: rustls keeps its own buffers whatever hyper does.
        Opening::Other(io) if !h2 => serve_h1(io, session, None).await,
        Opening::H2(io) => preface::refuse_as_http1(io, limit).await,
        Opening::Other(io) => preface::refuse_as_h2(io, limit).await,
        Opening::Gone => {}
    }
}

/// How a parked HTTP/1 connection waits for its client's next bytes without hyper.
type WaitReadable<I> = fn(&I, &mut Context<'_>) -> Poll<std::io::Result<()>>;

/// Serves HTTP/1. With `park`, a keep-alive connection idle between requests for
/// `conns::PARK_AFTER` is parked: its hyper connection (read and write buffers of 8 KiB each,
/// its state) is taken apart and freed, and only the socket waits for the next request, which
/// gets a new one, as nginx's keep-alive handler does. 10,000 idle connections then cost their
/// sockets and a few hundred bytes each.
async fn serve_h1<I>(io: Replay<I>, mut s: Session, park: Option<WaitReadable<I>>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = ConnWatch::for_conn(&s.info, Arc::clone(&s.penalties));
    let svc = service(&s, &watch);
    let builder = http1_builder(&s.limits);
    let _registered = s.conns.register(Arc::clone(&s.info), now_ms());
    let mut io = io;
    loop {
        let since = s.info.started();
        let conn = boxed(|| {
            builder
                .serve_connection(TokioIo::new(io), svc.clone())
                .with_upgrades()
        });
        let parkable = park.is_some().then_some(since);
        let Some(conn) = drive(conn, |c| c.graceful_shutdown(), &mut s, parkable).await else {
            return;
        };
        let Some(parts) = Pin::into_inner(conn).into_parts() else {
            return;
        };
        io = parts.io.into_inner();
        io.unread(parts.read_buf);
        let Some(wait) = park else { return };
        if io.has_prefix() {
            continue;
        }
        let mut readable = std::future::poll_fn(|cx| wait(io.get_ref(), cx));
        let _parked = Parked::new(&s.shared);
        loop {
            tokio::select! {
                r = &mut readable => if r.is_err() { return } else { break },
                // Idle past idle_timeout, making room for a new client, draining: close.
                _ = s.info.close.notified() => if !s.info.take_park() { return },
            }
        }
    }
}

/// Counts a connection as parked (`balancer_parked_connections`) while it is.
struct Parked<'a>(&'a Shared);

impl<'a> Parked<'a> {
    fn new(shared: &'a Shared) -> Parked<'a> {
        shared.parked_connections.fetch_add(1, Relaxed);
        Parked(shared)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked_connections.fetch_sub(1, Relaxed);
    }
}

async fn serve_h2<I>(io: I, mut s: Session)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = ConnWatch::for_conn(&s.info, Arc::clone(&s.penalties));
    let svc = service(&s, &watch);
    let conn = boxed(|| http2_builder(&s.limits).serve_connection(TokioIo::new(io), svc));
    let _registered = s.conns.register(Arc::clone(&s.info), now_ms());
    drive(conn, |c| c.graceful_shutdown(), &mut s, None).await;
}

/// The request handler of one connection.
fn service(
    s: &Session,
    watch: &Arc<ConnWatch>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<Tracked<ResponseBody>>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    let (info, shared, streams) = (
        Arc::clone(&s.info),
        Arc::clone(&s.shared),
        Arc::clone(watch),
    );
    service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        // In flight from here until the response body is dropped (sent, or the client left).
        let active = Active::start(&info);
        let h2 = req.version() == http::Version::HTTP_2;
        let (shared, info, watch) = (Arc::clone(&shared), Arc::clone(&info), Arc::clone(&streams));
        streams.stream(h2, async move {
            if watch.is_tripped() {
                // The connection is being closed for abuse: no backend work for it any more.
                let body = ResponseBody::local("503 Service Unavailable\n", None);
                let mut r = http::Response::new(Tracked::new(body, active));
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                return Ok(r);
            }
            if h2 && flood::reset_before_start(req.body_mut()) {
                // hyper drops this future as soon as it looks at the reset; the drop counts
                // a premature reset.
                return std::future::pending().await;
            }
            // Boxed, so the handler's state (~11 KB) is allocated only when the stream first
            // runs: stream tasks queued behind a flood cost ~1 KB each until then.
            let resp = boxed(|| proxy::handle(shared, info, req)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, active)))
        })
    })
}

/// How long a blocked write to a client may wait: the header timeout, like nginx's
/// send_timeout defaulting to its client_header_timeout.
fn send_timeout(limits: &Limits) -> Duration {
    limits.header_timeout
}

/// How long a connection closed for being idle may take to finish closing (an h2 client
/// acknowledging the GOAWAY's PING) before it is dropped, if it is still idle by then.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Runs a hyper connection to its end, asking it to finish and close on drain, on a reload
/// that removed its listener, when idle past `idle_timeout` (or to make room), and when its
/// h2 client floods it with cancelled streams. With `park` (the started count when the
/// connection was made), an HTTP/1 connection that goes idle between requests is shut down
/// without closing its socket and handed back: `Some`.
async fn drive<C>(
    mut conn: Pin<Box<C>>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    s: &mut Session,
    park: Option<u32>,
) -> Option<Pin<Box<C>>>
where
    C: Future<Output = hyper::Result<()>>,
{
    let info = Arc::clone(&s.info);
    let peer = info.peer;
    if *s.signals.drain.borrow() || *s.signals.stop.borrow() {
        graceful_shutdown(conn.as_mut());
    }
    let asked = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if flood::is_calm_down(&e) {
                        s.penalties.penalize(peer.ip());
                    }
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return None;
            }
            // Asked to close: idle past idle_timeout or making room, draining, the listener
            // removed by a reload, or an h2 flood (`ConnInfo::ask`). Or to park.
            _ = info.close.notified() => {
                if !info.take_park() {
                    break info.asked.load(Relaxed);
                }
                // Idle between requests: hyper closes its side at once (nothing is in
                // flight), leaving the socket open. A request that started meanwhile, or a
                // connection that cannot park, goes on.
                if park.is_some_and(|since| info.parkable(since)) {
                    graceful_shutdown(conn.as_mut());
                    return match conn.as_mut().await {
                        Ok(()) => Some(conn),
                        Err(_) => None,
                    };
                }
            }
        }
    };
    if asked & ASK_ABUSE != 0 {
        // Too many streams cancelled as soon as opened: GOAWAY, a moment to flush it, close.
        graceful_shutdown(conn.as_mut());
        let _ = tokio::time::timeout(flood::TRIPPED_GRACE, conn.as_mut()).await;
        return None;
    }
    let idle_close = asked & ASK_FINISH == 0;
    // Finish the request in flight (a long stream included), then close; idle keep-alive
    // connections close at once, idle h2 ones after GOAWAY(NO_ERROR).
    graceful_shutdown(conn.as_mut());
    if idle_close {
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "idle connection ended with an error while closing");
                    }
                    return None;
                }
                // A stream that raced the GOAWAY is finished; a client that never answers
                // the PING is not waited for.
                _ = tokio::time::sleep(IDLE_CLOSE_GRACE) => if info.is_idle() { return None },
            }
        }
    }
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error while draining");
    }
    None
}
