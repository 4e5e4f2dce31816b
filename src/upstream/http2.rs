//! The HTTP/2 side of `send` (`protocol = "h2c" | "h2"`): a stream on one of the backend's
//! shared connections (`h2pool.rs`), sent again within the attempt when the backend says it
//! did not process it, and the dial (TCP, TLS with ALPN `h2`, the h2 handshake) of a new
//! connection when all are saturated.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{cause_of, tcp_connect, BoxError, Cause, Dial, Lease, SendError, Sent};
use crate::backend::Backend;
use crate::h2io::H2Io;
use crate::h2pool::{Acquired, H2Conn, Stream};
use crate::reason::{Failure, Note};
use crate::replay::ReplayBody;
use crate::request_body::UpBody;

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
pub(super) async fn send_h2(
    backend: &Backend,
    dial: &Dial,
    req: Request<UpBody>,
) -> Result<Sent, SendError> {
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
