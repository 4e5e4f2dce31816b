//! Connections to backends: connect (TCP, optionally TLS) with a timeout, keep-alive reuse, and
//! sending one request with a response timeout.
//!
//! HTTP/1.1 pools: `send` pops one of the backend's idle connections (`idle.rs`) or dials a
//! new one, sends on it, and hands the connection to the response body, which puts it back
//! when the exchange completed cleanly. A connection that timed out, was aborted mid-body or
//! was upgraded is simply dropped, never pooled.
//!
//! HTTP/2 pools (`protocol = "h2c" | "h2"`): `send` reserves a stream on one of the backend's
//! multiplexed connections (`h2pool.rs`), dialling one when all are saturated; the response
//! body holds the stream until it ends. A stream the backend did not process (REFUSED_STREAM,
//! or above a GOAWAY's last-stream-id) is sent again on another connection within the same
//! attempt, whatever the method, with its body as `replay.rs` kept it. WebSocket upgrades
//! of an h2 pool go over HTTP/1.1 to the same address.
//!
//! Failures come back as a `Failure` reason for `classify`; a failure of the client's own
//! request body is told apart, since it is not the backend's.

use std::error::Error as StdError;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::config::{Protocol, Timeouts};
use crate::h2pool::{Acquired, H2Conn, H2Io, Stream};
use crate::idle::{Conn, Sender};
use crate::reason::{Failure, Note};
use crate::replay::ReplayBody;
use crate::request_body::{BodyError, BodyFault, UpBody};
use crate::tls::UpstreamTlsConnector;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What `send` needs to know about a pool: how long to wait, how to dial, and which transport
/// its pooled connections must speak. Built with the snapshot.
pub struct Dial {
    pub timeouts: Timeouts,
    pub tls: Option<UpstreamTlsConnector>,
    pub protocol: Protocol,
    /// Changes whenever the pool's TLS settings or protocol change (see `idle.rs`).
    pub transport: u64,
}

const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Why a send failed, and whether the request can be tried elsewhere.
pub enum SendError {
    /// The request never left: it comes back for another try, with any method.
    NotSent {
        // Boxed: the failure path should not make every `Result` of `send` request-sized.
        req: Box<Request<UpBody>>,
        failure: Failure,
        source: BoxError,
    },
    /// The request was (at least partly) written and then failed.
    Failed {
        cause: Cause,
        source: BoxError,
        /// On a pooled connection with no response byte: the backend's keep-alive close race.
        stale: bool,
    },
}

/// Whose fault a failed exchange was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Backend(Failure),
    /// The client's request body failed while we forwarded it.
    Client(BodyFault),
}

pub struct Sent {
    pub response: Response<Incoming>,
    /// The connection (or h2 stream), for the response body to release when it ends.
    pub conn: Lease,
    /// A pooled connection was found dead before the request left, and a fresh one was used.
    pub stale_retried: bool,
    /// An h2 backend did not process the request the first time (GOAWAY or REFUSED_STREAM)
    /// and it was sent again: which of the two, last.
    pub resent: Option<Note>,
}

/// What the response body holds on to until it ends.
pub enum Lease {
    /// An HTTP/1.1 connection, pooled again when the exchange completed cleanly.
    H1(Conn),
    /// A stream slot on a shared HTTP/2 connection, freed when dropped.
    H2(Stream),
}

/// Sends `req` to `backend` over the pool's protocol: HTTP/2 as a stream on a shared
/// connection, HTTP/1.1 on a pooled connection if one is idle, else on a new one.
///
/// One function rather than a dispatcher over two: a dispatcher's future would hold the
/// request beside whichever future it awaits, and every request's future (boxed and moved by
/// the listener) would grow by that much.
pub async fn send(
    backend: &Backend,
    dial: &Dial,
    mut req: Request<UpBody>,
) -> Result<Sent, SendError> {
    // WebSocket has no HTTP/2 form our backends are known to speak (RFC 8441 is rare): an
    // h2 pool tunnels it over HTTP/1.1 to the same address.
    if dial.protocol.is_h2() && !req.headers().contains_key(hyper::header::UPGRADE) {
        return send_h2(backend, dial, req).await;
    }
    // Upstream is HTTP/1.1, where Host is mandatory: a request that came without one (HTTP/1.0,
    // or h2 without :authority) gets the backend's address, like nginx's $proxy_host.
    if !req.headers().contains_key(hyper::header::HOST) {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&backend.address) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }
    let mut stale_retried = false;
    if let Some(mut conn) = backend.idle.pop(dial.transport, dial.timeouts.idle) {
        match exchange(&mut conn.tx, req, dial.timeouts.response, true).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    conn: Lease::H1(conn),
                    stale_retried,
                    resent: None,
                })
            }
            Err(Exchange::NotSent(r)) => {
                req = *r;
                stale_retried = true;
            }
            Err(Exchange::Failed(e)) => return Err(e),
        }
    }
    let tx = match connect(backend, dial).await {
        Ok(tx) => tx,
        Err((failure, source)) => {
            return Err(SendError::NotSent {
                req: Box::new(req),
                failure,
                source,
            })
        }
    };
    let mut conn = Conn {
        tx,
        transport: dial.transport,
    };
    match exchange(&mut conn.tx, req, dial.timeouts.response, false).await {
        Ok(response) => Ok(Sent {
            response,
            conn: Lease::H1(conn),
            stale_retried,
            resent: None,
        }),
        Err(Exchange::NotSent(req)) => Err(SendError::NotSent {
            req,
            failure: Failure::UpstreamReset,
            source: "new connection closed before the request was sent".into(),
        }),
        Err(Exchange::Failed(e)) => Err(e),
    }
}

enum Exchange {
    // Boxed like `SendError::NotSent`'s.
    NotSent(Box<Request<UpBody>>),
    Failed(SendError),
}

async fn exchange(
    tx: &mut Sender,
    req: Request<UpBody>,
    limit: Duration,
    reused: bool,
) -> Result<Response<Incoming>, Exchange> {
    match tokio::time::timeout(limit, tx.try_send_request(req)).await {
        Err(_) => Err(Exchange::Failed(SendError::Failed {
            cause: Cause::Backend(Failure::ResponseTimeout),
            source: format!("no response within {limit:?}").into(),
            stale: false,
        })),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(mut e)) => match e.take_message() {
            Some(req) => Err(Exchange::NotSent(Box::new(req))),
            None => {
                let err = e.into_error();
                let cause = cause_of(&err);
                // The backend closed the pooled connection as we reused it: EOF (FIN) or a
                // reset, before any response. Not the backend's sickness: replayable once.
                let stale = reused
                    && cause == Cause::Backend(Failure::UpstreamReset)
                    && (err.is_incomplete_message() || is_reset(&err));
                Err(Exchange::Failed(SendError::Failed {
                    cause,
                    source: err.into(),
                    stale,
                }))
            }
        },
    }
}

/// A connection reset (or a write into a socket the peer already closed) under a hyper error.
fn is_reset(err: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    let mut src: Option<&(dyn StdError + 'static)> = StdError::source(err);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted);
        }
        src = s.source();
    }
    false
}

/// Tells a failure of the client's own request body (carried up through hyper's error) from
/// the backend's.
fn cause_of(err: &hyper::Error) -> Cause {
    let mut src: Option<&(dyn StdError + 'static)> = StdError::source(err);
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return Cause::Client(b.fault());
        }
        src = s.source();
    }
    if err.is_parse() {
        return Cause::Backend(Failure::UpstreamProtocol);
    }
    Cause::Backend(Failure::UpstreamReset)
}

async fn tcp_connect(backend: &Backend) -> Result<TcpStream, (Failure, BoxError)> {
    let tcp = TcpStream::connect(backend.addr).await.map_err(|e| {
        let failure = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Failure::ConnectRefused
        } else {
            Failure::ConnectError
        };
        (failure, BoxError::from(e))
    })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn connect(backend: &Backend, dial: &Dial) -> Result<Sender, (Failure, BoxError)> {
    backend.counters.connections_opened.fetch_add(1, Relaxed);
    let limit = dial.timeouts.connect;
    let fut = async {
        let tcp = tcp_connect(backend).await?;
        match &dial.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some(tls) => {
                let stream = tls
                    .connect(&backend.address, tcp)
                    .await
                    .map_err(|e| (Failure::TlsError, e))?;
                handshake(TokioIo::new(stream)).await
            }
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err((
            Failure::ConnectTimeout,
            format!("connect to {} took over {limit:?}", backend.address).into(),
        )),
    }
}

async fn handshake<T>(io: T) -> Result<Sender, (Failure, BoxError)>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new()
        // hyper's default lets the read buffer grow to ~400 KiB per connection while a large
        // response streams to a slower client; 64 KiB keeps a 1 MiB response in flight from
        // costing most of a MiB of memory, and is still plenty for any response head.
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake(io)
        .await
        .map_err(|e| (Failure::ConnectError, BoxError::from(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(tx)
}

/// How many times one attempt sends again a request an h2 backend did not process, before
/// the refusal counts as the attempt's failure.
const MAX_RESENDS: u32 = 3;

/// PINGs on every h2 connection, idle ones included, so a backend that vanished without a
/// FIN (power loss, a dropped NAT entry) is noticed within interval + timeout, not at the next
/// request's response timeout.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Receive windows: how much of a response the backend may send ahead of the client reading
/// it. The stream window is fixed, so a large response costs the same memory as a small one,
/// yet fills loopback and LAN links. The connection window is shared by every stream on the
/// connection, so it is 64 stream windows: a few clients that stop reading hold their streams'
/// windows, not the whole connection (with hyper's 2 MiB / 5 MiB, three would stall everyone
/// else's responses). It is a bound, not an allocation: memory is spent only on what slow
/// clients have not read yet.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONN_WINDOW: u32 = 64 * H2_STREAM_WINDOW;

/// Streams assumed allowed before the backend's SETTINGS arrive (hyper's own assumption).
const H2_INITIAL_MAX_STREAMS: usize = 100;

/// Sends `req` as an HTTP/2 stream, on a connection shared with other requests.
async fn send_h2(backend: &Backend, dial: &Dial, req: Request<UpBody>) -> Result<Sent, SendError> {
    let mut req = to_h2(req, dial.tls.is_some(), &backend.address);
    let mut resent = None;
    let mut resends = 0;
    loop {
        let stream = match acquire_h2(backend, dial).await {
            Ok(s) => s,
            Err((failure, source)) => {
                return Err(SendError::NotSent {
                    req: Box::new(req),
                    failure,
                    source,
                })
            }
        };
        let (parts, body) = req.into_parts();
        // What a resend needs besides the body: kept only while the request may come back.
        let head = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let (body, rewind) = ReplayBody::new(body);
        let mut tx = stream.sender();
        let limit = dial.timeouts.response;
        let sending = tx.try_send_request(Request::from_parts(parts, body));
        let err = match tokio::time::timeout(limit, sending).await {
            Err(_) => {
                return Err(SendError::Failed {
                    cause: Cause::Backend(Failure::ResponseTimeout),
                    source: format!("no response within {limit:?}").into(),
                    stale: false,
                })
            }
            Ok(Ok(response)) => {
                rewind.commit();
                return Ok(Sent {
                    response,
                    conn: Lease::H2(stream),
                    stale_retried: false,
                    resent,
                });
            }
            Ok(Err(mut e)) => match e.take_message() {
                // The connection closed before the stream opened: try another one.
                Some(r) => {
                    let (parts, body) = r.into_parts();
                    req = Request::from_parts(parts, body.into_inner());
                    // Closed by a GOAWAY, or closed by the backend as it sat idle: the h2
                    // form of the stale keep-alive race.
                    resent = Some(if stream.conn().is_draining() {
                        Note::GoawayRetried
                    } else {
                        Note::StaleConnectionRetried
                    });
                    drop(stream);
                    resends += 1;
                    if resends > MAX_RESENDS {
                        return Err(SendError::NotSent {
                            req: Box::new(req),
                            failure: Failure::UpstreamReset,
                            source: "h2 connections kept closing before the request was sent"
                                .into(),
                        });
                    }
                    continue;
                }
                None => e.into_error(),
            },
        };
        // A stream refused on a connection the backend is leaving was refused because of the
        // GOAWAY (h2pool's `H2Io` refuses what h2 opened after it).
        let draining = stream.conn().is_draining();
        drop(stream);
        if let Some(note) = unprocessed(&err) {
            let note = if draining { Note::GoawayRetried } else { note };
            if resends < MAX_RESENDS {
                // hyper drops the body once the stream is reset; it hands back what it had
                // sent, unless that was more than it may keep.
                let back = tokio::time::timeout(dial.timeouts.connect, rewind.take()).await;
                if let Ok(Some(body)) = back {
                    let (method, uri, headers) = head;
                    let mut r = Request::new(body);
                    *r.method_mut() = method;
                    *r.uri_mut() = uri;
                    *r.headers_mut() = headers;
                    *r.version_mut() = http::Version::HTTP_2;
                    req = r;
                    resent = Some(note);
                    resends += 1;
                    tracing::debug!(backend = %backend.address, note = note.as_str(), error = %err, "h2 stream not processed; sending again");
                    continue;
                }
            }
        }
        return Err(SendError::Failed {
            cause: cause_of(&err),
            source: err.into(),
            stale: false,
        });
    }
}

/// The stream was not processed by the backend, by its own word: REFUSED_STREAM (RFC 9113
/// §8.7), or a GOAWAY whose last-stream-id is below it (§6.8; h2 fails exactly those streams
/// with the remote GOAWAY error, the others finish or fail on their own).
fn unprocessed(err: &hyper::Error) -> Option<Note> {
    let mut src: Option<&(dyn StdError + 'static)> = StdError::source(err);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            if h.is_go_away() && h.is_remote() {
                return Some(Note::GoawayRetried);
            }
            if h.is_reset() && h.is_remote() && h.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Some(Note::RefusedStreamRetried);
            }
            return None;
        }
        src = s.source();
    }
    None
}

/// An HTTP/1.1-shaped request (origin-form target, `Host`) as an h2 stream: `:scheme` and
/// `:authority` from the pool's transport and the `Host` the client sent (RFC 9113 §8.3.1),
/// and no `Host` field beside it.
fn to_h2(mut req: Request<UpBody>, tls: bool, address: &str) -> Request<UpBody> {
    let authority = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(address)
        .to_owned();
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let scheme = if tls { "https" } else { "http" };
    let uri = http::Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query(pq.as_str())
        .build()
        .or_else(|_| {
            http::Uri::builder()
                .scheme(scheme)
                .authority(address)
                .path_and_query(pq.as_str())
                .build()
        });
    if let Ok(uri) = uri {
        *req.uri_mut() = uri;
        req.headers_mut().remove(hyper::header::HOST);
    }
    *req.version_mut() = http::Version::HTTP_2;
    req
}

/// A stream slot on one of the backend's h2 connections; when every one is saturated, this
/// request dials the next (or waits for the request that already does).
async fn acquire_h2(backend: &Backend, dial: &Dial) -> Result<Stream, (Failure, BoxError)> {
    match backend
        .h2
        .acquire(dial.transport, dial.timeouts.connect)
        .await
    {
        Acquired::Stream(s) => Ok(s),
        Acquired::DialFailed(f) => Err((
            f,
            format!(
                "the h2 connection to {} this request waited for failed",
                backend.address
            )
            .into(),
        )),
        // Boxed: dialling is rare, and its future (TCP, TLS, handshake) would otherwise
        // make every request's future kilobytes larger.
        Acquired::Dial(turn) => match Box::pin(connect_h2(backend, dial)).await {
            Ok(conn) => turn
                .finish(Ok(conn))
                .ok_or_else(|| (Failure::ConnectError, "h2 dial abandoned".into())),
            Err((f, e)) => {
                turn.finish(Err(f));
                Err((f, e))
            }
        },
    }
}

async fn connect_h2(backend: &Backend, dial: &Dial) -> Result<H2Conn, (Failure, BoxError)> {
    backend.counters.connections_opened.fetch_add(1, Relaxed);
    let limit = dial.timeouts.connect;
    let fut = async {
        let tcp = tcp_connect(backend).await?;
        match &dial.tls {
            None => handshake_h2(tcp, dial).await,
            Some(tls) => {
                let stream = tls
                    .connect_h2(&backend.address, tcp)
                    .await
                    .map_err(|e| (tls_failure(&*e), e))?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err((
                        Failure::UpstreamAlpnMismatch,
                        format!("{} did not select ALPN h2", backend.address).into(),
                    ));
                }
                handshake_h2(stream, dial).await
            }
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err((
            Failure::ConnectTimeout,
            format!("connect to {} took over {limit:?}", backend.address).into(),
        )),
    }
}

/// A TLS handshake that failed because the backend has no protocol in common with our
/// `h2` (the `no_application_protocol` alert of RFC 7301) is an ALPN mismatch, not a TLS fault.
fn tls_failure(e: &(dyn StdError + 'static)) -> Failure {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) =
            s.downcast_ref::<rustls::Error>()
        {
            return Failure::UpstreamAlpnMismatch;
        }
        if let Some(inner) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            src = Some(inner);
            continue;
        }
        src = s.source();
    }
    Failure::TlsError
}

async fn handshake_h2<T>(io: T, dial: &Dial) -> Result<H2Conn, (Failure, BoxError)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let draining = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(H2Io::new(io, Arc::clone(&draining)));
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .initial_max_send_streams(H2_INITIAL_MAX_STREAMS)
        .handshake(io)
        .await
        .map_err(|e| (Failure::ConnectError, BoxError::from(e)))?;
    let max_streams = Arc::new(AtomicUsize::new(H2_INITIAL_MAX_STREAMS));
    let published = Arc::clone(&max_streams);
    tokio::spawn(async move {
        use std::future::Future;
        let mut conn = std::pin::pin!(conn);
        // Only the connection's owner can read the backend's SETTINGS_MAX_CONCURRENT_STREAMS;
        // publish it after every poll for the pool's saturation check.
        let ended = std::future::poll_fn(|cx| {
            let r = conn.as_mut().poll(cx);
            published.store(conn.current_max_send_streams(), Relaxed);
            r
        })
        .await;
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream h2 connection ended");
        }
    });
    Ok(H2Conn::new(tx, dial.transport, max_streams, draining))
}

/// A standalone connection for the health checker: never pooled, never shared with clients.
pub async fn probe_connect(
    backend: &Backend,
    tls: Option<&UpstreamTlsConnector>,
    limit: Duration,
) -> Result<http1::SendRequest<http_body_util::Empty<bytes::Bytes>>, BoxError> {
    let fut = async {
        let tcp = TcpStream::connect(backend.addr).await?;
        let _ = tcp.set_nodelay(true);
        let builder = http1::Builder::new();
        let tx = match tls {
            None => {
                let (tx, conn) = builder.handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                tx
            }
            Some(tls) => {
                let stream = tls.connect(&backend.address, tcp).await?;
                let (tx, conn) = builder.handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                tx
            }
        };
        Ok::<_, BoxError>(tx)
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| BoxError::from("connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener boxes every request's future and moves it: the h2 branch must fit inside
    /// the HTTP/1.1 one (its dial boxed), or every request, h1 ones included, pays for it.
    #[test]
    fn the_h2_path_does_not_grow_the_request_future() {
        let backend = Backend::new("p", "127.0.0.1:1", "127.0.0.1:1".parse().unwrap());
        let dial = Dial {
            timeouts: Timeouts::default(),
            tls: None,
            protocol: Protocol::H2c,
            transport: 1,
        };
        let h2 = send_h2(&backend, &dial, Request::new(UpBody::Empty));
        let all = send(&backend, &dial, Request::new(UpBody::Empty));
        let (h2, all) = (std::mem::size_of_val(&h2), std::mem::size_of_val(&all));
        assert!(h2 * 2 < all, "send_h2's future is {h2} bytes, send's {all}");
    }
}
