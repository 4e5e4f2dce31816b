//! Connections to backends: connect (TCP, optionally TLS) with a timeout, keep-alive reuse, and
//! sending one request with a response timeout.
//!
//! Each `Backend` owns its idle connections (`IdleConns`, a lock-free queue), so they survive a
//! reload with the backend. The request path pops one, sends on it, and the response body puts
//! it back when the exchange completed cleanly (see `body::ResponseBody`). A connection that
//! timed out, was aborted mid-body or was upgraded is simply dropped, never pooled. The reload
//! and reaper tasks call `reap` to close connections idle longer than `timeouts.idle`.

use std::error::Error as StdError;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::backend::{now_ms, Backend, Reason};
use crate::balance::Pool;
use crate::body::{BodyError, UpBody};
use crate::config::UpstreamTls;

pub type BoxError = Box<dyn StdError + Send + Sync>;
pub type Sender = http1::SendRequest<UpBody>;

const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// Idle keep-alive connections kept per backend; beyond it a finished connection is closed.
const MAX_IDLE_PER_BACKEND: usize = 512;

struct Idle {
    tx: Sender,
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
    fn pop(&self, now: u64, idle: Duration) -> Option<Sender> {
        let idle_ms = idle.as_millis() as u64;
        while let Some(c) = self.q.pop() {
            if now.saturating_sub(c.since_ms) < idle_ms && c.tx.is_ready() {
                return Some(c.tx);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed. One that is not ready yet (its
    /// request body is still being written) is dropped: waiting for it would cost a task per
    /// request, and a fresh connection is cheaper than a stuck one.
    pub fn put(&self, tx: Sender) {
        if tx.is_ready() {
            let _ = self.q.push(Idle {
                tx,
                since_ms: now_ms(),
            });
        }
    }

    /// Closes connections idle for `idle` or more, and those the backend closed.
    pub fn reap(&self, idle: Duration) {
        let now = now_ms();
        let idle_ms = idle.as_millis() as u64;
        for _ in 0..self.q.len() {
            let Some(c) = self.q.pop() else { break };
            if now.saturating_sub(c.since_ms) < idle_ms && !c.tx.is_closed() {
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

    pub fn clear(&self) {
        while self.q.pop().is_some() {}
    }
}

/// TLS towards a pool's backends, built once per snapshot.
#[derive(Clone)]
pub struct UpstreamTlsConnector {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
}

impl UpstreamTlsConnector {
    pub fn new(cfg: &UpstreamTls) -> Result<UpstreamTlsConnector, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca {
            Some(path) => {
                let certs = crate::listener::read_certs(path)?;
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err("no system root certificates found (install ca-certificates, or set tls.ca)".into());
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: cfg.server_name.clone(),
        })
    }

    fn server_name(&self, backend: &Backend) -> Result<ServerName<'static>, BoxError> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => host_part(&backend.address).to_owned(),
        };
        ServerName::try_from(name).map_err(|e| e.into())
    }
}

fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Why a send failed, and whether the request can be tried elsewhere.
pub enum SendError {
    /// The request never left: it comes back for another try, with any method.
    NotSent {
        req: Request<UpBody>,
        reason: Reason,
        source: BoxError,
    },
    /// The request was (at least partly) written and then failed.
    Failed {
        reason: Reason,
        source: BoxError,
        /// On a pooled connection with no response byte: the backend's keep-alive close race.
        stale: bool,
    },
}

pub struct Sent {
    pub response: Response<Incoming>,
    /// The connection, for the response body to return to the pool when it ends.
    pub conn: Sender,
    /// A pooled connection was found dead before the request left, and a fresh one was used.
    pub stale_retried: bool,
}

/// Sends `req` to `backend`, on a pooled connection if one is idle, else on a new one.
pub async fn send(
    backend: &Backend,
    pool: &Pool,
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
    if let Some(mut tx) = backend.idle.pop(now_ms(), pool.timeouts.idle) {
        match exchange(&mut tx, req, pool.timeouts.response, true).await {
            Ok(response) => {
                return Ok(Sent {
                    response,
                    conn: tx,
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
    let mut tx = match connect(backend, pool).await {
        Ok(tx) => tx,
        Err((reason, source)) => {
            return Err(SendError::NotSent {
                req,
                reason,
                source,
            })
        }
    };
    match exchange(&mut tx, req, pool.timeouts.response, false).await {
        Ok(response) => Ok(Sent {
            response,
            conn: tx,
            stale_retried,
        }),
        Err(Exchange::NotSent(req)) => Err(SendError::NotSent {
            req,
            reason: Reason::UpstreamReset,
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
            reason: Reason::ResponseTimeout,
            source: format!("no response within {limit:?}").into(),
            stale: false,
        })),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(mut e)) => match e.take_message() {
            Some(req) => Err(Exchange::NotSent(req)),
            None => {
                let err = e.into_error();
                let reason = classify_error(&err);
                // The backend closed the pooled connection as we reused it: EOF (FIN) or a
                // reset, before any response. Not the backend's sickness: replayable once.
                let stale = reused
                    && reason == Reason::UpstreamReset
                    && (err.is_incomplete_message() || is_reset(&err));
                Err(Exchange::Failed(SendError::Failed {
                    reason,
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

/// Maps a hyper error from an exchange to a reason; a failure of the client's own request
/// body is told apart, because it is not the backend's fault.
fn classify_error(err: &hyper::Error) -> Reason {
    let mut src: Option<&(dyn StdError + 'static)> = StdError::source(err);
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            if let BodyError::Client(e) = b {
                if is_malformed_body(e) {
                    return Reason::BadRequest;
                }
            }
            return b.reason();
        }
        src = s.source();
    }
    Reason::UpstreamReset
}

/// A client body hyper's decoder refused (a bad or overflowing chunk size, say): a malformed
/// request (400), not a client that went away (an early EOF or a reset).
fn is_malformed_body(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, InvalidInput};
    let mut src: Option<&(dyn StdError + 'static)> = StdError::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.kind(), InvalidData | InvalidInput);
        }
        src = s.source();
    }
    false
}

async fn connect(backend: &Backend, pool: &Pool) -> Result<Sender, (Reason, BoxError)> {
    backend.counters.connections_opened.fetch_add(1, Relaxed);
    let limit = pool.timeouts.connect;
    let fut = async {
        let tcp = TcpStream::connect(backend.addr).await.map_err(|e| {
            let reason = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Reason::ConnectRefused
            } else {
                Reason::ConnectError
            };
            (reason, BoxError::from(e))
        })?;
        let _ = tcp.set_nodelay(true);
        match &pool.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some(tls) => {
                let name = tls
                    .server_name(backend)
                    .map_err(|e| (Reason::TlsError, e))?;
                let stream = tls
                    .connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| (Reason::TlsError, BoxError::from(e)))?;
                handshake(TokioIo::new(stream)).await
            }
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err((
            Reason::ConnectTimeout,
            format!("connect to {} took over {limit:?}", backend.address).into(),
        )),
    }
}

async fn handshake<T>(io: T) -> Result<Sender, (Reason, BoxError)>
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
        .map_err(|e| (Reason::ConnectError, BoxError::from(e)))?;
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
                let name = tls.server_name(backend)?;
                let stream = tls.connector.connect(name, tcp).await?;
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
