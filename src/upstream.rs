//! Connections to backends: connect (TCP, optionally TLS) with a timeout, keep-alive reuse, and
//! sending one request with a response timeout.
//!
//! `send` pops one of the backend's idle connections (`idle.rs`) or dials a new one, sends on
//! it, and hands the connection to the response body, which puts it back when the exchange
//! completed cleanly. A connection that timed out, was aborted mid-body or was upgraded is
//! simply dropped, never pooled. Failures come back as a `Failure` reason for `classify`;
//! a failure of the client's own request body is told apart, since it is not the backend's.

use std::error::Error as StdError;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::config::Timeouts;
use crate::idle::{Conn, Sender};
use crate::reason::Failure;
use crate::request_body::{BodyError, BodyFault, UpBody};
use crate::tls::UpstreamTlsConnector;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What `send` needs to know about a pool: how long to wait, how to dial, and which transport
/// its pooled connections must speak. Built with the snapshot.
pub struct Dial {
    pub timeouts: Timeouts,
    pub tls: Option<UpstreamTlsConnector>,
    /// Changes whenever the pool's TLS settings change (see `idle.rs`).
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
    /// The connection, for the response body to return to the pool when it ends.
    pub conn: Conn,
    /// A pooled connection was found dead before the request left, and a fresh one was used.
    pub stale_retried: bool,
}

/// Sends `req` to `backend`, on a pooled connection if one is idle, else on a new one.
pub async fn send(
    backend: &Backend,
    dial: &Dial,
    mut req: Request<UpBody>,
) -> Result<Sent, SendError> {
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
                    conn,
                    stale_retried,
                })
            }
            Err(Exchange::NotSent(r)) => {
                req = r;
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
            conn,
            stale_retried,
        }),
        Err(Exchange::NotSent(req)) => Err(SendError::NotSent {
            req: Box::new(req),
            failure: Failure::UpstreamReset,
            source: "new connection closed before the request was sent".into(),
        }),
        Err(Exchange::Failed(e)) => Err(e),
    }
}

enum Exchange {
    NotSent(Request<UpBody>),
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
            Some(req) => Err(Exchange::NotSent(req)),
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

async fn connect(backend: &Backend, dial: &Dial) -> Result<Sender, (Failure, BoxError)> {
    backend.counters.connections_opened.fetch_add(1, Relaxed);
    let limit = dial.timeouts.connect;
    let fut = async {
        let tcp = TcpStream::connect(backend.addr).await.map_err(|e| {
            let failure = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Failure::ConnectRefused
            } else {
                Failure::ConnectError
            };
            (failure, BoxError::from(e))
        })?;
        let _ = tcp.set_nodelay(true);
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
