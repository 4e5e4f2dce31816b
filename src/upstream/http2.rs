//! The HTTP/2 side of `send` (`protocol = "h2c" | "h2"`): a stream on one of the backend's
//! shared connections (`h2pool.rs`), sent again within the attempt when the backend says it
//! did not process it, and the dial (TCP, TLS with ALPN `h2`, the h2 handshake) of a new
//! connection when all are saturated.

use std::error::Error as StdError;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::request;
use http_body::Body;
use hyper::{Request, Response};

use super::body::{H2Body, UpstreamBody};
use super::pipe::{self, ClientFault};
use super::{tcp_connect, BoxError, Cause, Dial, SendError, Sent};
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

/// The largest response header block accepted (hyper's client default).
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// Sends `req` as an HTTP/2 stream, on a connection shared with other requests.
///
/// Driven on the h2 crate directly rather than through hyper's client: hyper hands each
/// request to a connection task over a channel, spawns a task per stream to await its
/// response and answers through another channel. Here the request's own task opens the
/// stream and awaits its response; only a request body gets a task of its own (`pipe.rs`).
pub(super) async fn send_h2(
    backend: &Backend,
    dial: &Dial,
    req: Request<UpBody>,
) -> Result<Sent, SendError> {
    let (parts, mut body) = req.into_parts();
    // The h2 form goes on each stream's own copy of the head; `parts` stay as the client sent
    // them, so a request handed back for another try (not sent, or bodiless and failed before
    // its answer) reaches the next backend with its own Host, not this one's authority.
    let uri = h2_uri(&parts, dial.tls.is_some(), &backend.address);
    let mut resent = None;
    let mut resends = 0;
    loop {
        // The common case first, without a future: a connection with room. Waiting for a
        // dial (or making one) is boxed, so its state is not part of every request's future.
        let ready = backend.h2.reserve(dial.transport).map(Ok);
        let stream = match ready {
            Some(s) => s,
            None => Box::pin(acquire_h2(backend, dial)).await,
        };
        let stream = match stream {
            Ok(s) => s,
            Err((failure, source)) => {
                return Err(SendError::NotSent {
                    req: Box::new(Request::from_parts(parts, body)),
                    failure,
                    source,
                })
            }
        };
        let unsent = |stream: &Stream| {
            // Closed by a GOAWAY, or closed by the backend as it sat idle: the h2 form of
            // the stale keep-alive race. Nothing was sent: try another connection.
            if stream.conn().is_draining() {
                Note::GoawayRetried
            } else {
                Note::StaleConnectionRetried
            }
        };
        let mut tx = stream.sender();
        // Waits while the backend's concurrent-stream limit is reached on this connection.
        let opened = match poll_fn(|cx| tx.poll_ready(cx)).await {
            Ok(()) => {
                // What a resend needs: kept only while the request may come back.
                let mut head = Request::new(());
                *head.method_mut() = parts.method.clone();
                *head.uri_mut() = uri.clone();
                *head.headers_mut() = parts.headers.clone();
                if uri.authority().is_some() {
                    head.headers_mut().remove(HOST);
                }
                *head.version_mut() = http::Version::HTTP_2;
                set_content_length(&mut head, &body);
                let eos = body.is_end_stream();
                tx.send_request(head, eos)
                    .map(|(response, send)| (response, send, eos))
            }
            Err(e) => Err(e),
        };
        let (response, send, eos) = match opened {
            Ok(o) => o,
            Err(e) => {
                resent = Some(unsent(&stream));
                stream.conn().retire();
                drop(stream);
                resends += 1;
                if resends > MAX_RESENDS {
                    return Err(SendError::NotSent {
                        req: Box::new(Request::from_parts(parts, body)),
                        failure: Failure::UpstreamReset,
                        source: format!(
                            "h2 connections kept closing before the request was sent: {e}"
                        )
                        .into(),
                    });
                }
                continue;
            }
        };
        // Only a body can fail on the client's side (and only then is this allocated).
        let mut fault: Option<ClientFault> = None;
        let (pipe, rewind) = if eos {
            drop(send);
            (None, None)
        } else {
            let (replay, rewind) = ReplayBody::new(std::mem::replace(&mut body, UpBody::Empty));
            let pipe = pipe::spawn(replay, send, Arc::clone(fault.insert(Arc::default())));
            (Some(pipe), Some(rewind))
        };
        let limit = dial.timeouts.response;
        let err = match tokio::time::timeout(limit, response).await {
            Err(_) => {
                return Err(SendError::Failed {
                    cause: Cause::Backend(Failure::ResponseTimeout),
                    source: format!("no response within {limit:?}").into(),
                    stale: false,
                    head: eos.then(|| Box::new(parts)),
                })
            }
            Ok(Ok(response)) => {
                if let Some(r) = &rewind {
                    r.commit();
                }
                let (rparts, recv) = response.into_parts();
                let body = UpstreamBody::H2(H2Body::new(recv, &rparts.headers, pipe, stream));
                return Ok(Sent {
                    response: Response::from_parts(rparts, body),
                    stale_retried: false,
                    resent,
                });
            }
            Ok(Err(e)) => e,
        };
        // A stream refused on a connection the backend is leaving was refused because of the
        // GOAWAY (h2pool's `H2Io` refuses what h2 opened after it).
        let draining = stream.conn().is_draining();
        drop(stream);
        // The pipe stops, and the body it had comes back through `rewind`.
        drop(pipe);
        if let Some(note) = unprocessed(&err) {
            let note = if draining { Note::GoawayRetried } else { note };
            if resends < MAX_RESENDS {
                let back = match rewind {
                    None => Some(UpBody::Empty),
                    Some(r) => tokio::time::timeout(dial.timeouts.connect, r.take())
                        .await
                        .ok()
                        .flatten(),
                };
                if let Some(b) = back {
                    body = b;
                    resent = Some(note);
                    resends += 1;
                    tracing::debug!(backend = %backend.address, note = note.as_str(), error = %err, "h2 stream not processed; sending again");
                    continue;
                }
            }
        }
        let cause = match fault.as_ref().and_then(|f| f.get()) {
            Some(f) => Cause::Client(*f),
            None => Cause::Backend(Failure::UpstreamReset),
        };
        return Err(SendError::Failed {
            cause,
            source: err.into(),
            stale: false,
            head: eos.then(|| Box::new(parts)),
        });
    }
}

/// As hyper's client does: a body of known size gets its `Content-Length` when the request
/// has none, unless it is empty on a method whose requests carry no body by definition.
fn set_content_length(head: &mut Request<()>, body: &UpBody) {
    let Some(len) = body.size_hint().exact() else {
        return;
    };
    let payload_method = !matches!(
        *head.method(),
        http::Method::GET
            | http::Method::HEAD
            | http::Method::DELETE
            | http::Method::CONNECT
            | http::Method::OPTIONS
            | http::Method::TRACE
    );
    if (len != 0 || payload_method) && !head.headers().contains_key(http::header::CONTENT_LENGTH) {
        head.headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// The stream was not processed by the backend, by its own word: REFUSED_STREAM (RFC 9113
/// §8.7), or a GOAWAY whose last-stream-id is below it (§6.8; h2 fails exactly those streams
/// with the remote GOAWAY error, the others finish or fail on their own).
fn unprocessed(h: &h2::Error) -> Option<Note> {
    if h.is_go_away() && h.is_remote() {
        return Some(Note::GoawayRetried);
    }
    if h.is_reset() && h.is_remote() && h.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Some(Note::RefusedStreamRetried);
    }
    None
}

/// An HTTP/1.1-shaped request (origin-form target, `Host`) as an h2 stream: `:scheme` and
/// `:authority` from the pool's transport and the `Host` the client sent (RFC 9113 §8.3.1),
/// and no `Host` field beside it.
/// The request's URI in h2 form: scheme and authority (from Host, else the backend's
/// address) in front of the client's path. The path is shared with the client's request, not
/// parsed again. As given when no authority can be formed; Host then stays a header.
fn h2_uri(parts: &request::Parts, tls: bool, address: &str) -> http::Uri {
    use http::uri::{Authority, Parts, PathAndQuery, Scheme};
    let authority = parts
        .headers
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| Authority::try_from(address).ok());
    let mut uri = Parts::default();
    uri.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    uri.authority = authority;
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    http::Uri::from_parts(uri).unwrap_or_else(|_| parts.uri.clone())
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
        Acquired::Dial(turn) => match connect_h2(backend, dial).await {
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
    let io = H2Io::new(io, Arc::clone(&draining));
    let (tx, mut conn) = h2::client::Builder::new()
        .initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .initial_max_send_streams(H2_INITIAL_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .map_err(|e| (Failure::ConnectError, BoxError::from(e)))?;
    let max_streams = Arc::new(AtomicUsize::new(H2_INITIAL_MAX_STREAMS));
    let closed = Arc::new(AtomicBool::new(false));
    let (published, ended) = (Arc::clone(&max_streams), Arc::clone(&closed));
    let pings = conn.ping_pong();
    tokio::spawn(async move {
        use std::future::Future;
        // Only the connection's owner can read the backend's SETTINGS_MAX_CONCURRENT_STREAMS;
        // publish it after every poll for the pool's saturation check.
        let drive = poll_fn(|cx| {
            let r = std::pin::Pin::new(&mut conn).poll(cx);
            published.store(conn.max_concurrent_send_streams(), Relaxed);
            r
        });
        tokio::select! {
            r = drive => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            }
            () = keepalive(pings) => {
                tracing::debug!("upstream h2 connection answered no PING within {H2_KEEPALIVE_TIMEOUT:?}; closed");
            }
        }
        ended.store(true, Relaxed);
    });
    Ok(H2Conn::new(
        tx,
        dial.transport,
        max_streams,
        draining,
        closed,
    ))
}

/// A PING every `H2_KEEPALIVE_INTERVAL`, idle or not; returns when one goes unanswered for
/// `H2_KEEPALIVE_TIMEOUT` (the connection is then dropped, failing its streams).
async fn keepalive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(H2_KEEPALIVE_INTERVAL).await;
        let pong = tokio::time::timeout(H2_KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()));
        match pong.await {
            Ok(Ok(_)) => {}
            // The connection is gone already: its own future ends the task.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
