//! gRPC and HTTP/2 test backends, without a .proto build: a raw-bytes `tonic` codec, four
//! hand-written services (one per call kind) served over h2c by hyper, and an `h2`-crate
//! backend that misbehaves on demand (GOAWAY, REFUSED_STREAM) the way real servers do under
//! shutdown and overload.
//!
//! Use it from a test file with `#[path = "common/grpc_backend.rs"] mod grpc_backend;` next to
//! `mod common;`.
//!
//! Services (paths under `/test.Echo/`):
//! - `Unary`: answers the request bytes; request metadata `x-meta` comes back as response
//!   metadata `x-meta-echo`.
//! - `Sum` (client streaming): each message is a decimal number; answers their sum.
//! - `Count` (server streaming): the request is `"N"` or `"N:SIZE"`; answers N messages
//!   (`"0"`, `"1"`, ... or SIZE bytes each). With request metadata `x-fail`, the stream ends
//!   with `ABORTED` and trailer metadata `x-trailer: present` instead of OK.
//! - `Chat` (bidi): echoes each message as it arrives, prefixed with `"echo:"`.
//!
//! Any other path gets a plain (non-gRPC) `200` whose body says what the backend saw:
//! `version`, `path`, `authority`, `te`, `body-bytes`, one per line.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

// ------------------------------------------------------------------------------------------
// The codec: messages are raw bytes.

#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

// ------------------------------------------------------------------------------------------
// The services.

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;
pub type MsgStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct Unary;
struct Sum;
struct Count;
struct Chat;

impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFut<Bytes>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let meta = req.metadata().get("x-meta").cloned();
            let mut resp = Response::new(req.into_inner());
            if let Some(m) = meta {
                resp.metadata_mut().insert("x-meta-echo", m);
            }
            Ok(resp)
        })
    }
}

impl tonic::server::ClientStreamingService<Bytes> for Sum {
    type Response = Bytes;
    type Future = BoxFut<Bytes>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let mut s = req.into_inner();
            let mut total: u64 = 0;
            while let Some(m) = s.next().await {
                let m = m?;
                let n: u64 = std::str::from_utf8(&m)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| Status::invalid_argument("not a number"))?;
                total += n;
            }
            Ok(Response::new(Bytes::from(total.to_string())))
        })
    }
}

impl tonic::server::ServerStreamingService<Bytes> for Count {
    type Response = Bytes;
    type ResponseStream = MsgStream;
    type Future = BoxFut<MsgStream>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        Box::pin(async move {
            let fail = req.metadata().contains_key("x-fail");
            let text = String::from_utf8_lossy(req.get_ref()).into_owned();
            let (n, size) = match text.split_once(':') {
                Some((n, s)) => (n.parse::<u64>(), s.parse::<usize>().ok()),
                None => (text.parse::<u64>(), None),
            };
            let n = n.map_err(|_| Status::invalid_argument("not a count"))?;
            let items = tokio_stream::iter(0..n).map(move |i| {
                Ok(match size {
                    Some(s) => Bytes::from(vec![b'x'; s]),
                    None => Bytes::from(i.to_string()),
                })
            });
            let tail = tokio_stream::iter(fail.then(|| {
                let mut md = MetadataMap::new();
                md.insert("x-trailer", MetadataValue::from_static("present"));
                Err(Status::with_metadata(
                    Code::Aborted,
                    "stopped on request",
                    md,
                ))
            }));
            let s: MsgStream = Box::pin(items.chain(tail));
            Ok(Response::new(s))
        })
    }
}

impl tonic::server::StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = MsgStream;
    type Future = BoxFut<MsgStream>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let s = req.into_inner().map(|m| {
                m.map(|b| {
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&b);
                    Bytes::from(out)
                })
            });
            let s: MsgStream = Box::pin(s);
            Ok(Response::new(s))
        })
    }
}

type Resp = http::Response<tonic::body::Body>;

/// Routes one request: a gRPC method by path, anything else a plain answer describing it.
async fn route(req: http::Request<Incoming>) -> Result<Resp, std::convert::Infallible> {
    let mut grpc = tonic::server::Grpc::new(RawCodec);
    Ok(match req.uri().path() {
        "/test.Echo/Unary" => grpc.unary(Unary, req).await,
        "/test.Echo/Sum" => grpc.client_streaming(Sum, req).await,
        "/test.Echo/Count" => grpc.server_streaming(Count, req).await,
        "/test.Echo/Chat" => grpc.streaming(Chat, req).await,
        _ => {
            let text = describe(req).await;
            http::Response::new(tonic::body::Body::new(Full::new(Bytes::from(text))))
        }
    })
}

/// What a plain request looked like on arrival, one `key: value` a line.
pub async fn describe(req: http::Request<Incoming>) -> String {
    let (parts, body) = req.into_parts();
    let n = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let h = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    format!(
        "version: {:?}\npath: {}\nauthority: {}\nhost: {}\nte: {}\nconnection: {}\nx-forwarded-for: {}\nbody-bytes: {n}\n",
        parts.version,
        parts.uri.path(),
        parts.uri.authority().map_or("-", |a| a.as_str()),
        h("host"),
        h("te"),
        h("connection"),
        h("x-forwarded-for"),
    )
}

// ------------------------------------------------------------------------------------------
// The well-behaved h2c gRPC backend (hyper).

pub struct GrpcBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicU64>,
    /// Requests (streams) received so far.
    pub streams: Arc<AtomicU64>,
    /// Connections open now.
    pub open: Arc<AtomicU64>,
    /// Bumped to make every open connection shut down gracefully (GOAWAY, finish streams).
    goaway: watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl GrpcBackend {
    pub fn connections(&self) -> u64 {
        self.connections.load(SeqCst)
    }
    pub fn streams(&self) -> u64 {
        self.streams.load(SeqCst)
    }
    pub fn open(&self) -> u64 {
        self.open.load(SeqCst)
    }
    /// Every connection open now sends GOAWAY and closes once its streams are done, as hyper
    /// (and Go, and nginx) do on graceful shutdown; the backend keeps accepting new ones.
    pub fn goaway_all(&self) {
        self.goaway.send_modify(|g| *g += 1);
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An h2c (prior knowledge) backend serving the four test services, allowing at most
/// `max_streams` concurrent streams per connection (its SETTINGS_MAX_CONCURRENT_STREAMS).
pub async fn start_grpc_backend(max_streams: u32) -> GrpcBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_grpc(listener, max_streams)
}

/// As `start_grpc_backend`, but speaking HTTP/1.1 too (and h2c with prior knowledge) on the
/// same port, with upgrades: a backend a pool can switch protocols against.
pub async fn start_grpc_backend_auto() -> GrpcBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(listener, 100, true)
}

/// As `start_grpc_backend`, on a listener the caller bound.
pub fn serve_grpc(listener: TcpListener, max_streams: u32) -> GrpcBackend {
    serve(listener, max_streams, false)
}

fn serve(listener: TcpListener, max_streams: u32, auto: bool) -> GrpcBackend {
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let streams = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let (goaway, goaway_rx) = watch::channel(0u64);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (conns, strs, opened) = (
        Arc::clone(&connections),
        Arc::clone(&streams),
        Arc::clone(&open),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = &mut stop_rx => return,
            };
            conns.fetch_add(1, SeqCst);
            opened.fetch_add(1, SeqCst);
            let (strs, opened) = (Arc::clone(&strs), Arc::clone(&opened));
            let mut goaway_rx = goaway_rx.clone();
            goaway_rx.mark_unchanged();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    strs.fetch_add(1, SeqCst);
                    route(req)
                });
                if auto {
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    b.http2().max_concurrent_streams(max_streams);
                    let conn = b.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = goaway_rx.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                } else {
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = goaway_rx.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                }
                opened.fetch_sub(1, SeqCst);
            });
        }
    });
    GrpcBackend {
        addr,
        connections,
        streams,
        open,
        goaway,
        stop: Some(stop_tx),
    }
}

/// Serves the test services as HTTP/2 on an already accepted (and, say, TLS-wrapped) stream.
pub async fn serve_h2_io<I>(io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(route);
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

// ------------------------------------------------------------------------------------------
// The misbehaving h2c backend (the `h2` crate, for frames hyper does not let a server send).

/// What the faulty backend does to streams and connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers every stream.
    None,
    /// Resets every `n`th stream (counted over all connections) with REFUSED_STREAM before
    /// reading it: the request was not processed (RFC 9113 §8.7).
    RefuseEvery(u64),
    /// The first `n` connections send GOAWAY with last-stream-id 0 right after the
    /// handshake: no stream on them is processed (RFC 9113 §6.8), every one may be retried.
    GoawayFirstConnections(u64),
    /// Resets every stream with INTERNAL_ERROR once its head is in: maybe processed, so only
    /// an idempotent request may be tried elsewhere.
    ResetAll,
}

pub struct FaultyBackend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    /// Streams answered (processed), not counting refused ones.
    pub answered: Arc<AtomicU64>,
    /// Streams reset with REFUSED_STREAM.
    pub refused: Arc<AtomicU64>,
    /// Bodies of the answered POST requests, in arrival order.
    pub bodies: Arc<Mutex<Vec<Bytes>>>,
    /// `:authority` of the answered requests, in arrival order.
    pub authorities: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for FaultyBackend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An h2c backend that answers `200 ok:<method>` (after reading the whole request body), and
/// applies `fault`.
pub async fn start_faulty_backend(fault: Fault) -> FaultyBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let authorities = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicU64::new(0));
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (c, a, r, b, au) = (
        Arc::clone(&connections),
        Arc::clone(&answered),
        Arc::clone(&refused),
        Arc::clone(&bodies),
        Arc::clone(&authorities),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                _ = &mut stop_rx => return,
            };
            let nth = c.fetch_add(1, SeqCst) + 1;
            let (a, r, b, au, seen) = (
                Arc::clone(&a),
                Arc::clone(&r),
                Arc::clone(&b),
                Arc::clone(&au),
                Arc::clone(&seen),
            );
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(lingering(tcp)).await else {
                    return;
                };
                if let Fault::GoawayFirstConnections(n) = fault {
                    if nth <= n {
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    }
                }
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let k = seen.fetch_add(1, SeqCst) + 1;
                    if let Fault::RefuseEvery(n) = fault {
                        if k % n == 0 {
                            r.fetch_add(1, SeqCst);
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                    }
                    if fault == Fault::ResetAll {
                        respond.send_reset(h2::Reason::INTERNAL_ERROR);
                        continue;
                    }
                    let authority = req.uri().authority().map(|a| a.to_string());
                    au.lock().unwrap().extend(authority);
                    let (a, b) = (Arc::clone(&a), Arc::clone(&b));
                    tokio::spawn(async move {
                        let method = req.method().clone();
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(chunk) = body.data().await {
                            let Ok(chunk) = chunk else { return };
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        a.fetch_add(1, SeqCst);
                        if method == http::Method::POST {
                            b.lock().unwrap().push(Bytes::from(got));
                        }
                        let resp = http::Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut send) = respond.send_response(resp, false) {
                            let _ = send.send_data(Bytes::from(format!("ok:{method}")), true);
                        }
                    });
                }
            });
        }
    });
    FaultyBackend {
        addr,
        connections,
        answered,
        refused,
        bodies,
        authorities,
        stop: Some(stop_tx),
    }
}

/// The server's end of `tcp` as an in-memory pipe that, once the server is done, sends FIN
/// and keeps reading (and discarding) for a while before closing: a server that closed the
/// socket with the client's frames unread would make the kernel send RST, and the client
/// would lose the GOAWAY still in its receive buffer.
fn lingering(tcp: tokio::net::TcpStream) -> tokio::io::DuplexStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, relay) = tokio::io::duplex(256 * 1024);
    let (mut relay_r, mut relay_w) = tokio::io::split(relay);
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut relay_r, &mut tcp_w).await;
        let _ = tcp_w.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut forward = true;
        loop {
            let n = match tokio::time::timeout_at(deadline, tcp_r.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => break,
            };
            if forward && relay_w.write_all(&buf[..n]).await.is_err() {
                forward = false;
            }
        }
    });
    server
}

// ------------------------------------------------------------------------------------------
// The client side: tonic over a plain h2c channel (to the balancer, typically).

pub type GrpcClient = tonic::client::Grpc<tonic::transport::Channel>;

pub async fn grpc_client(addr: SocketAddr) -> GrpcClient {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("gRPC channel connects");
    tonic::client::Grpc::new(ch)
}

pub fn path(method: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::try_from(format!("/test.Echo/{method}")).unwrap()
}

pub async fn unary(c: &mut GrpcClient, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.unary(req, path("Unary"), RawCodec).await
}

pub async fn sum(c: &mut GrpcClient, numbers: Vec<u64>) -> Result<Response<Bytes>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let s = tokio_stream::iter(numbers.into_iter().map(|n| Bytes::from(n.to_string())));
    c.client_streaming(Request::new(s), path("Sum"), RawCodec)
        .await
}

pub async fn count(
    c: &mut GrpcClient,
    req: Request<Bytes>,
) -> Result<Response<Streaming<Bytes>>, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.server_streaming(req, path("Count"), RawCodec).await
}

pub async fn chat<S>(c: &mut GrpcClient, messages: S) -> Result<Response<Streaming<Bytes>>, Status>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    c.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    c.streaming(Request::new(messages), path("Chat"), RawCodec)
        .await
}
