//! Connections to backends: connect (TCP, optionally TLS) with a timeout, keep-alive reuse, and
//! sending one request with a response timeout.
//!
//! HTTP/1.1 pools (`http1.rs`): `send` pops one of the backend's idle connections (`idle.rs`)
//! or dials a new one and runs the exchange on it in the request's own task; the response
//! body is the exchange, and puts the connection back when both messages completed cleanly.
//! A connection that timed out, was aborted mid-body or was upgraded is simply dropped,
//! never pooled.
//!
//! HTTP/2 pools (`protocol = "h2c" | "h2"`, in `http2.rs`): `send` reserves a stream on one of
//! the backend's multiplexed connections (`h2pool.rs`), dialling one when all are saturated;
//! the response body holds the stream until it ends. A stream the backend did not process
//! (REFUSED_STREAM, or above a GOAWAY's last-stream-id) is sent again on another connection
//! within the same attempt, whatever the method, with its body as `replay.rs` kept it.
//! WebSocket upgrades of an h2 pool go over HTTP/1.1 to the same address.
//!
//! Failures come back as a `Failure` reason for `classify`; a failure of the client's own
//! request body is told apart, since it is not the backend's.

use std::error::Error as StdError;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::request;
use hyper::client::conn::http1 as hyper_h1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::backend_io::BackendIo;
use crate::config::{Protocol, Timeouts};
use crate::forwarded::Forwarded;
use crate::idle::Conn;
use crate::reason::{Failure, Note};
use crate::request_body::{BodyFault, UpBody};
use crate::tls::UpstreamTlsConnector;

mod body;
mod http1;
mod http2;
mod pipe;

pub use body::{UpstreamBody, UpstreamBodyError};
use http2::send_h2;

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
        /// A bodiless request's head, as it was before this attempt, when it failed before
        /// its response: what a retry sends again (`proxy.rs` retries only idempotent ones).
        /// Handed back rather than copied beforehand, which cost every GET two allocations.
        head: Option<Box<request::Parts>>,
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
    /// Its body holds the connection (or h2 stream) until it ends.
    pub response: Response<UpstreamBody>,
    /// A pooled connection was found dead before the request left, and a fresh one was used.
    pub stale_retried: bool,
    /// An h2 backend did not process the request the first time (GOAWAY or REFUSED_STREAM)
    /// and it was sent again: which of the two, last.
    pub resent: Option<Note>,
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
    fwd: Option<&Forwarded>,
) -> Result<Sent, SendError> {
    // WebSocket has no HTTP/2 form our backends are known to speak (RFC 8441 is rare): an
    // h2 pool tunnels it over HTTP/1.1 to the same address.
    if dial.protocol.is_h2() && !req.headers().contains_key(hyper::header::UPGRADE) {
        // Into the map, which every stream copies: a retry goes to the same pool, so to h2
        // again, and applying twice replaces.
        if let Some(f) = fwd {
            f.apply(req.headers_mut());
        }
        return send_h2(backend, dial, req).await;
    }
    let limit = dial.timeouts.response;
    let mut stale_retried = false;
    if let Some(conn) = backend.idle.pop(dial.transport, dial.timeouts.idle) {
        match exchange(conn, req, fwd, &backend.address, limit, true).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
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
    // Boxed: with keep-alive, dialling is the rare path, and its future (TCP, TLS) would
    // otherwise be part of every request's future.
    let io = match Box::pin(connect(backend, dial)).await {
        Ok(io) => io,
        Err((failure, source)) => {
            return Err(SendError::NotSent {
                req: Box::new(req),
                failure,
                source,
            })
        }
    };
    let conn = Conn {
        io,
        transport: dial.transport,
    };
    match exchange(conn, req, fwd, &backend.address, limit, false).await {
        Ok(response) => Ok(Sent {
            response,
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
    conn: Conn,
    req: Request<UpBody>,
    fwd: Option<&Forwarded>,
    default_host: &str,
    limit: Duration,
    reused: bool,
) -> Result<Response<UpstreamBody>, Exchange> {
    let (head, body) = req.into_parts();
    let bodiless = matches!(body, UpBody::Empty);
    let (cause, source, stale) = match tokio::time::timeout(
        limit,
        http1::exchange(conn, &head, fwd, default_host, body, reused),
    )
    .await
    {
        Ok(Ok(resp)) => return Ok(resp.map(UpstreamBody::H1)),
        Ok(Err(http1::ExchangeError::NotSent(body))) => {
            return Err(Exchange::NotSent(Box::new(Request::from_parts(head, body))))
        }
        Err(_) => (
            Cause::Backend(Failure::ResponseTimeout),
            format!("no response within {limit:?}").into(),
            false,
        ),
        Ok(Err(http1::ExchangeError::Failed { error, stale })) => {
            let cause = match &error {
                http1::H1Error::Body(b) => Cause::Client(b.fault()),
                e => Cause::Backend(e.failure()),
            };
            (cause, error.into(), stale)
        }
    };
    Err(Exchange::Failed(SendError::Failed {
        cause,
        source,
        stale,
        head: bodiless.then(|| Box::new(head)),
    }))
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

async fn connect(backend: &Backend, dial: &Dial) -> Result<BackendIo, (Failure, BoxError)> {
    backend.counters.connections_opened.fetch_add(1, Relaxed);
    let limit = dial.timeouts.connect;
    let fut = async {
        let tcp = tcp_connect(backend).await?;
        match &dial.tls {
            None => Ok(BackendIo::Plain(tcp)),
            Some(tls) => match tls.connect(&backend.address, tcp).await {
                Ok(stream) => Ok(BackendIo::Tls(Box::new(stream))),
                Err(e) => Err((Failure::TlsError, e)),
            },
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

/// A standalone connection for the health checker: never pooled, never shared with clients.
pub async fn probe_connect(
    backend: &Backend,
    tls: Option<&UpstreamTlsConnector>,
    limit: Duration,
) -> Result<hyper_h1::SendRequest<http_body_util::Empty<bytes::Bytes>>, BoxError> {
    let fut = async {
        let tcp = TcpStream::connect(backend.addr).await?;
        let _ = tcp.set_nodelay(true);
        let builder = hyper_h1::Builder::new();
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

    /// The listener boxes every request's future and moves it, so what `send` holds across
    /// its awaits is paid by every request: the dials (HTTP/1.1 and h2) are boxed, and the
    /// h2 branch stays well within the budget rather than setting it.
    #[test]
    fn the_request_future_stays_small() {
        let backend = Backend::new("p", "127.0.0.1:1", "127.0.0.1:1".parse().unwrap());
        let dial = Dial {
            timeouts: Timeouts::default(),
            tls: None,
            protocol: Protocol::H2c,
            transport: 1,
        };
        let h2 = send_h2(&backend, &dial, Request::new(UpBody::Empty));
        let all = send(&backend, &dial, Request::new(UpBody::Empty), None);
        let (h2, all) = (std::mem::size_of_val(&h2), std::mem::size_of_val(&all));
        // 1,840 bytes in a debug build with Rust 1.95 (2,024 while the request head was copied
        // for a retry in advance; 3,080 before the HTTP/1.1 dial was boxed).
        assert!(all <= 2048, "send's future is {all} bytes");
        assert!(
            h2 * 4 <= all * 3,
            "send_h2's future is {h2} bytes, send's {all}"
        );
    }
}
