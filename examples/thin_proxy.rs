//! The thinnest reverse proxy hyper makes: the floor under the balancer's own cost, measured
//! beside it by `benches/compare.sh` (`PROXIES="balancer nginx haproxy hyper"`).
//!
//! `thin_proxy LISTEN BACKEND...`: every connection is served by hyper-util's auto builder
//! (HTTP/1.1, and h2c by prior knowledge), every request goes round-robin to a backend through
//! hyper-util's pooled client (HTTP/1.1, keep-alive), and the answer streams back. It strips
//! the hop-by-hop fields and does nothing else: no routing, limits, timeouts, health, logging,
//! metrics or cache. Whatever the balancer costs above it is the balancer's own; what it costs
//! above nginx is what hyper and tokio cost.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, CONNECTION};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Proxy {
    client: Client<HttpConnector, Incoming>,
    backends: Vec<String>,
    next: AtomicUsize,
}

/// The fields RFC 9110 §7.6.1 says a proxy must not forward, and the ones `Connection` names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // `close` and `keep-alive` name no field: nothing is allocated for nearly every request.
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("keep-alive")
        })
        .map(str::to_ascii_lowercase)
        .collect();
    for name in named {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

type Answer = Response<Either<Incoming, Empty<Bytes>>>;

impl Proxy {
    /// The backend's response, or a bodiless 502 when it cannot be had.
    async fn forward(&self, req: Request<Incoming>) -> Result<Answer, Infallible> {
        let i = self.next.fetch_add(1, Relaxed) % self.backends.len();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = Uri::try_from(format!("http://{}{}", self.backends[i], path)) else {
            return Ok(bad_gateway());
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp.map(Either::Left))
            }
            Err(_) => Ok(bad_gateway()),
        }
    }
}

fn bad_gateway() -> Answer {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), backends) = (args.next(), args.collect::<Vec<_>>()) else {
        return Err("usage: thin_proxy LISTEN BACKEND...".into());
    };
    if backends.is_empty() {
        return Err("usage: thin_proxy LISTEN BACKEND...".into());
    }
    let listen: SocketAddr = listen.parse()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let proxy = Arc::new(Proxy {
        client: Client::builder(TokioExecutor::new()).build(connector),
        backends,
        next: AtomicUsize::new(0),
    });
    let listener = TcpListener::bind(listen).await?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { proxy.forward(req).await }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
