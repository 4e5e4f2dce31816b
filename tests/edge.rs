//! HTTP behaviour at the edge (spec: "HTTP behaviour at the edge"): forwarding headers,
//! hop-by-hop headers, routing, limits, framing, pipelining, h2c, error bodies, access log.
//! Real backends, the real balancer, real clients (hyper, or raw TCP where the bytes matter).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_http::{find, RawConn};
use common::*;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ------------------------------------------------------------------------------------------
// Local helpers

/// Writes `bytes` on a new connection and reads until the peer closes or `limit` passes (the
/// async twin of `common::raw`, which would block the in-process balancer's runtime).
async fn raw_async(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 16384];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend that reads the whole request body before answering with its length; it counts
/// request heads, body bytes and requests whose body arrived complete.
struct Sink {
    addr: SocketAddr,
    heads: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    complete: Arc<AtomicU64>,
}

async fn start_sink() -> Sink {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let complete = Arc::new(AtomicU64::new(0));
    let (h, b, c) = (heads.clone(), bytes.clone(), complete.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (h, b, c) = (h.clone(), b.clone(), c.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (h, b, c) = (h.clone(), b.clone(), c.clone());
                    async move {
                        h.fetch_add(1, SeqCst);
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(f) = body.frame().await {
                            let f = f?;
                            if let Some(d) = f.data_ref() {
                                n += d.len() as u64;
                                b.fetch_add(d.len() as u64, SeqCst);
                            }
                        }
                        c.fetch_add(1, SeqCst);
                        Ok::<_, hyper::Error>(Response::new(full(n.to_string())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Sink {
        addr,
        heads,
        bytes,
        complete,
    }
}

/// A request body of `chunks` chunks of `size` bytes, with no declared length.
fn chunked_body(chunks: usize, size: usize) -> TestBody {
    generated_body((chunks * size) as u64, size, b'z')
}

fn hget(url: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut b = Request::get(url);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(full(Bytes::new())).unwrap()
}

fn last_headers(b: &TestBackend) -> http::HeaderMap {
    b.state
        .last_headers
        .lock()
        .unwrap()
        .clone()
        .expect("backend saw no request")
}

fn hv<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

/// The balancer answered this itself: a short plain-text body.
fn assert_short_text(g: &Got, status: u16) {
    assert_eq!(g.status, status, "body: {}", g.body);
    let ct = g
        .headers
        .get("content-type")
        .unwrap_or_else(|| panic!("{status} without content-type"))
        .to_str()
        .unwrap();
    assert!(ct.starts_with("text/plain"), "{status} content-type {ct}");
    assert!(!g.body.trim().is_empty(), "{status} with an empty body");
    assert!(g.body.len() <= 128, "{status} body too long: {:?}", g.body);
    assert!(
        !g.body.contains('<'),
        "{status} body looks like markup: {:?}",
        g.body
    );
}

// ------------------------------------------------------------------------------------------
// Forwarding headers

#[tokio::test]
async fn forwarded_headers_are_added_and_host_is_kept() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();

    // An existing X-Forwarded-For gets the client address appended.
    let g = send(
        &c,
        hget(
            &bal.url("/xff"),
            &[
                ("host", "app.example.test:8080"),
                ("x-forwarded-for", "1.2.3.4"),
            ],
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    let h = last_headers(&a);
    assert_eq!(hv(&h, "x-forwarded-for"), Some("1.2.3.4, 127.0.0.1"));
    assert_eq!(hv(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hv(&h, "x-forwarded-host"), Some("app.example.test:8080"));
    assert_eq!(hv(&h, "host"), Some("app.example.test:8080"));
    assert_eq!(h.get_all("host").iter().count(), 1);

    // No X-Forwarded-For: it is created; a client-sent X-Forwarded-Proto/Host is replaced.
    let g = send(
        &c,
        hget(
            &bal.url("/fresh"),
            &[
                ("host", "other.test"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "spoofed.test"),
            ],
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    let h = last_headers(&a);
    assert_eq!(hv(&h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(),
        ["http"]
    );
    assert_eq!(
        h.get_all("x-forwarded-host").iter().collect::<Vec<_>>(),
        ["other.test"]
    );
    assert_eq!(hv(&h, "host"), Some("other.test"));

    // Several X-Forwarded-For lines keep their order, then the client address.
    let req = Request::get(bal.url("/multi"))
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-for", "5.6.7.8")
        .body(full(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 200);
    let h = last_headers(&a);
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(
        hv(&h, "x-forwarded-for"),
        Some("1.2.3.4, 5.6.7.8, 127.0.0.1")
    );

    // h2c: the :authority becomes Host (HTTP/1.1 to the backend) and X-Forwarded-Host.
    let g = get(&h2_client(), &bal.url("/h2")).await;
    assert_eq!(g.status, 200);
    let h = last_headers(&a);
    let authority = bal.addr.to_string();
    assert_eq!(hv(&h, "host"), Some(authority.as_str()));
    assert_eq!(hv(&h, "x-forwarded-host"), Some(authority.as_str()));
    assert_eq!(hv(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hv(&h, "x-forwarded-for"), Some("127.0.0.1"));
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Hop-by-hop headers

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_backend() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut conn = RawConn::connect(bal.addr).await;
    conn.send(
        b"GET /hop HTTP/1.1\r\n\
          Host: hop.test\r\n\
          Connection: keep-alive, x-foo\r\n\
          x-foo: 1\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Proxy-Connection: keep-alive\r\n\
          Upgrade: foo/2\r\n\
          X-Kept: yes\r\n\
          \r\n",
    )
    .await;
    let r = conn.read_response().await.expect("no response");
    assert_eq!(r.status, 200, "{}", r.body_str());
    let h = last_headers(&a);
    for gone in [
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {h:?}");
    }
    assert_eq!(hv(&h, "x-kept"), Some("yes"));
    assert_eq!(hv(&h, "host"), Some("hop.test"));

    // Connection naming the proxy's own headers (and Host) must not strip what the proxy sets.
    let before = a.requests();
    conn.send(
        b"GET /named HTTP/1.1\r\n\
          Host: named.test\r\n\
          Connection: x-forwarded-for, x-forwarded-proto, x-forwarded-host, host\r\n\
          X-Forwarded-For: 9.9.9.9\r\n\
          \r\n",
    )
    .await;
    let r = conn
        .read_response()
        .await
        .expect("no response on the kept-alive connection");
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(a.requests(), before + 1);
    let h = last_headers(&a);
    let xff = hv(&h, "x-forwarded-for").expect("X-Forwarded-For stripped");
    assert!(xff.ends_with("127.0.0.1"), "x-forwarded-for = {xff}");
    assert_eq!(hv(&h, "x-forwarded-proto"), Some("http"));
    assert_eq!(hv(&h, "x-forwarded-host"), Some("named.test"));
    assert_eq!(hv(&h, "host"), Some("named.test"));
    assert!(h.get("connection").is_none());
    bal.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    // hyper's client passes response headers through as received.
    let g = get(&client(), &bal.url("/")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "a");
    assert_eq!(hv(&g.headers, "x-backend"), Some("a"));
    assert!(
        g.headers.get("x-backend-private").is_none(),
        "{:?}",
        g.headers
    );
    assert!(g.headers.get("keep-alive").is_none(), "{:?}", g.headers);
    for v in g.headers.get_all("connection") {
        let v = v.to_str().unwrap().to_ascii_lowercase();
        assert!(!v.contains("x-backend-private"), "connection: {v}");
    }
    // The same over raw TCP, where nothing client-side can hide a header.
    let mut conn = RawConn::connect(bal.addr).await;
    conn.send(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n").await;
    let r = conn.read_response().await.expect("no response");
    assert_eq!(r.status, 200);
    assert!(r.header("x-backend-private").is_none(), "{:?}", r.headers);
    assert!(r.header("keep-alive").is_none(), "{:?}", r.headers);
    assert!(
        !r.header("connection")
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("x-backend-private"),
        "{:?}",
        r.headers
    );
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn routes_in_order_host_and_segment_aware_prefix() {
    let api = start_backend("api").await;
    let wild = start_backend("wild").await;
    let v1 = start_backend("v1").await;
    let admin = start_backend("admin").await;
    let first = start_backend("first").await;
    let second = start_backend("second").await;
    let tmpl = format!(
        r#"watch = false
[admin]
bind = "{{admin}}"
[log]
access = false
[[listeners]]
bind = "{{listen}}"

[[routes]]
host = "api.example.com"
path_prefix = "/v1"
pool = "api"

[[routes]]
host = "*.example.com"
pool = "wild"

[[routes]]
path_prefix = "/v1"
pool = "v1"

[[routes]]
path_prefix = "/admin"
pool = "admin"

[[routes]]
path_prefix = "/dup"
pool = "first"

[[routes]]
path_prefix = "/dup"
pool = "second"

[pools.api]
backends = ["{}"]
[pools.wild]
backends = ["{}"]
[pools.v1]
backends = ["{}"]
[pools.admin]
backends = ["{}"]
[pools.first]
backends = ["{}"]
[pools.second]
backends = ["{}"]
"#,
        api.addr, wild.addr, v1.addr, admin.addr, first.addr, second.addr
    );
    let bal = start_balancer(&tmpl).await;
    let c = client();
    let cases: &[(&str, &str, &str)] = &[
        // host, path, expected pool ("404" for none)
        ("api.example.com", "/v1", "api"),
        ("api.example.com", "/v1/users?x=1", "api"),
        ("API.Example.COM:8443", "/v1/x", "api"), // case and port ignored
        ("api.example.com", "/v10", "wild"),      // segment-aware; falls to the next route
        ("api.example.com", "/", "wild"),
        ("a.b.EXAMPLE.com:81", "/anything", "wild"),
        ("example.com", "/v1", "v1"), // "*.example.com" does not match the bare domain
        ("badexample.com", "/v1/", "v1"),
        ("other.test", "/v1", "v1"),
        ("other.test", "/v1/deep/path", "v1"),
        ("other.test", "/v10", "404"),
        ("other.test", "/v1x", "404"),
        ("other.test", "/admin", "admin"),
        ("other.test", "/dup/x", "first"), // first match wins
        ("other.test", "/", "404"),
    ];
    for (host, path, want) in cases {
        let g = send(&c, hget(&bal.url(path), &[("host", host)])).await;
        if *want == "404" {
            assert_short_text(&g, 404);
        } else {
            assert_eq!(g.status, 200, "{host}{path}: {}", g.body);
            assert_eq!(g.body, *want, "{host}{path}");
        }
    }
    assert_eq!(second.requests(), 0);

    // Dot segments are resolved before routing, and the backend sees the resolved path.
    let before = admin.requests();
    let mut conn = RawConn::connect(bal.addr).await;
    conn.send(b"GET /public/../admin?q=1 HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await;
    let r = conn.read_response().await.expect("no response");
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(r.body_str(), "admin");
    assert_eq!(admin.requests(), before + 1);
    assert_eq!(
        admin.state.last_uri.lock().unwrap().as_deref(),
        Some("/admin?q=1")
    );
    // ... and cannot be used to escape a prefix: /v1/../v10 is /v10 (no route).
    conn.send(b"GET /v1/../v10 HTTP/1.1\r\nHost: other.test\r\n\r\n")
        .await;
    let r = conn.read_response().await.expect("no response");
    assert_eq!(r.status, 404, "{}", r.body_str());
    bal.shutdown().await;
}

#[tokio::test]
async fn one_pool_without_routes_takes_everything() {
    let a = start_backend("only").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();
    for (host, path) in [
        ("whatever.test", "/"),
        ("x.y.z", "/some/deep/path?with=query"),
        ("127.0.0.1", "/v10"),
    ] {
        let g = send(&c, hget(&bal.url(path), &[("host", host)])).await;
        assert_eq!(g.status, 200, "{host}{path}");
        assert_eq!(g.body, "only");
        assert_eq!(a.state.last_uri.lock().unwrap().as_deref(), Some(path));
    }
    assert_eq!(a.requests(), 3);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn oversized_headers_get_431_and_are_not_forwarded() {
    let a = start_backend("a").await;
    // Below hyper's minimum read buffer (8 KiB) and above it: the limit is the head's own.
    for (limit, big) in [(4096usize, 6000usize), (16384, 20000)] {
        let bal = start_balancer(&config(
            &[a.addr],
            "round_robin",
            &format!("[limits]\nmax_header_bytes = {limit}\n"),
        ))
        .await;
        let before = a.requests();
        let filler = "v".repeat(big);
        let req = format!("GET / HTTP/1.1\r\nHost: big.test\r\nX-Big: {filler}\r\n\r\n");
        let out = raw_async(bal.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 431"), "limit {limit}: {out:?}");
        // Many small headers adding up over the limit count too.
        let mut many = String::from("GET / HTTP/1.1\r\nHost: big.test\r\n");
        for i in 0..(big / 100) {
            many.push_str(&format!("X-H{i}: {}\r\n", "w".repeat(90)));
        }
        many.push_str("\r\n");
        let mut conn = RawConn::connect(bal.addr).await;
        conn.send(many.as_bytes()).await;
        let r = conn
            .read_response()
            .await
            .expect("no answer to many headers");
        assert_eq!(r.status, 431, "limit {limit}, many headers");
        assert_eq!(
            a.requests(),
            before,
            "limit {limit}: an oversized head reached the backend"
        );
        // Just under the limit passes.
        let ok = "v".repeat(limit / 2);
        let g = send(&client(), hget(&bal.url("/"), &[("x-ok", &ok)])).await;
        assert_eq!(g.status, 200, "limit {limit}");
        bal.shutdown().await;
    }
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_the_backend_whole() {
    let sink = start_sink().await;
    let bal = start_balancer(&config(
        &[sink.addr],
        "round_robin",
        "[limits]\nmax_body_bytes = 1024\n",
    ))
    .await;
    let c = client();

    // Declared too large: refused before anything is forwarded.
    let g = post(&c, &bal.url("/upload"), vec![b'a'; 2048]).await;
    assert_short_text(&g, 413);
    assert_eq!(
        sink.heads.load(SeqCst),
        0,
        "a request declared too large was forwarded"
    );

    // Within the limit (declared): forwarded whole.
    let g = post(&c, &bal.url("/upload"), vec![b'a'; 1000]).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "1000");

    // Chunked without a length, within the limit: forwarded whole.
    let req = Request::post(bal.url("/upload"))
        .body(chunked_body(4, 256))
        .unwrap();
    let g = send(&c, req).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "1024");
    let complete_before = sink.complete.load(SeqCst);
    let bytes_before = sink.bytes.load(SeqCst);

    // Chunked without a length, over the limit: 413, and the backend never gets it whole.
    let req = Request::post(bal.url("/upload"))
        .body(chunked_body(8, 256))
        .unwrap();
    let g = send(&c, req).await;
    assert_short_text(&g, 413);
    assert_eq!(
        sink.complete.load(SeqCst),
        complete_before,
        "an oversized body reached the backend whole"
    );
    assert!(
        sink.bytes.load(SeqCst) - bytes_before <= 1024,
        "more than the limit was forwarded"
    );

    // The same over raw TCP, one write.
    let mut raw_req =
        b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        raw_req.extend_from_slice(b"100\r\n");
        raw_req.extend_from_slice(&[b'q'; 256]);
        raw_req.extend_from_slice(b"\r\n");
    }
    raw_req.extend_from_slice(b"0\r\n\r\n");
    let out = raw_async(bal.addr, &raw_req, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out:?}");
    assert_eq!(sink.complete.load(SeqCst), complete_before);

    // Still serving.
    let g = post(&c, &bal.url("/upload"), "small").await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "5");
    bal.shutdown().await;
}

#[tokio::test]
async fn header_timeout_cuts_off_a_client_trickling_headers() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"1s\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut closed_after = None;
    // Bounded: one header line every 200 ms, for at most 8 s.
    while start.elapsed() < Duration::from_secs(8) {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Err(_) => {
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    closed_after = Some(start.elapsed());
                    break;
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let t = closed_after.expect("a client trickling headers was never cut off");
    assert!(
        t >= Duration::from_millis(800),
        "cut off before the timeout: {t:?}"
    );
    assert!(t < Duration::from_secs(4), "cut off too late: {t:?}");
    let got = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got:?}");
    assert_eq!(a.requests(), 0);

    // A connection that sends nothing at all is closed too: handed over by the kernel after
    // its 1 s deferred-accept wait, then cut at header_timeout (tests/conns.rs times it).
    let mut idle = RawConn::connect(bal.addr).await;
    assert!(
        idle.closed_within(Duration::from_secs(4)).await,
        "a silent connection stayed open"
    );

    // A prompt client is unaffected.
    let g = get(&client(), &bal.url("/")).await;
    assert_eq!(g.status, 200);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Ambiguous framing

/// Sends each raw request on its own connection: `400`, the backend's counter does not move,
/// and a normal request works afterwards.
async fn assert_rejected_400(cases: &[(&str, &[u8])]) {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();
    for (what, bytes) in cases {
        let before = a.requests();
        let out = raw_async(bal.addr, bytes, Duration::from_secs(5)).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{what}: {out:?}");
        assert_eq!(a.requests(), before, "{what}: was forwarded to the backend");
        // The balancer still serves normal requests afterwards.
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 200, "{what}: normal request after");
        assert_eq!(a.requests(), before + 1);
    }
    bal.shutdown().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_gets_400() {
    assert_rejected_400(&[
        (
            "content-length then transfer-encoding",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding then content-length",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ])
    .await;
}

#[tokio::test]
async fn differing_lengths_and_invalid_header_bytes_get_400() {
    assert_rejected_400(&[
        (
            "two differing content-length",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "differing content-length in one line",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
        (
            "control byte in a header name",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad\x01Name: 1\r\n\r\n",
        ),
        (
            "space in a header name",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad Name: 1\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad : 1\r\n\r\n",
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Bad: a\x00b\r\n\r\n",
        ),
        (
            "transfer-encoding other than chunked",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "non-numeric content-length",
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\n\r\nhello",
        ),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        ),
        ("no Host header", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n"),
    ])
    .await;
}

// ------------------------------------------------------------------------------------------
// Connections: pipelining, keep-alive, h2c

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_a_kept_alive_connection() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut conn = RawConn::connect(bal.addr).await;
    // Two requests in one write.
    conn.send(
        b"GET /bytes/3 HTTP/1.1\r\nHost: p.test\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: p.test\r\nContent-Length: 5\r\n\r\nhello\
          GET /bytes/7 HTTP/1.1\r\nHost: p.test\r\n\r\n",
    )
    .await;
    let r1 = conn
        .read_response()
        .await
        .expect("first pipelined response");
    let r2 = conn
        .read_response()
        .await
        .expect("second pipelined response");
    let r3 = conn
        .read_response()
        .await
        .expect("third pipelined response");
    assert_eq!((r1.status, r1.body_str().as_str()), (200, "xxx"));
    assert_eq!((r2.status, r2.body_str().as_str()), (200, "hello"));
    assert_eq!((r3.status, r3.body_str().as_str()), (200, "xxxxxxx"));
    // Keep-alive: the same connection serves more requests, one at a time.
    for i in 1..=3u32 {
        let req = format!("GET /bytes/{i} HTTP/1.1\r\nHost: p.test\r\n\r\n");
        conn.send(req.as_bytes()).await;
        let r = conn
            .read_response()
            .await
            .expect("kept-alive connection closed");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), i as usize);
    }
    assert_eq!(a.requests(), 6);
    assert_eq!(bal.shared().open_connections.load(SeqCst), 1);
    // Connection: close is honoured.
    conn.send(b"GET / HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n")
        .await;
    let r = conn.read_response().await.expect("response before close");
    assert_eq!(r.status, 200);
    assert!(
        conn.closed_within(Duration::from_secs(5)).await,
        "not closed after Connection: close"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_multiplexes_streams_over_backends() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;

    // The pooled h2 client: prior knowledge on the plaintext port.
    let req = Request::get(bal.url("/")).body(full(Bytes::new())).unwrap();
    let resp = h2_client().request(req).await.expect("h2c request failed");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);

    // One connection, many concurrent streams.
    a.set_delay(Duration::from_millis(300));
    b.set_delay(Duration::from_millis(300));
    let tcp = TcpStream::connect(bal.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    const N: usize = 16;
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut s = sender.clone();
        let url = bal.url(&format!("/stream/{i}"));
        set.spawn(async move {
            let req = Request::get(url).body(full(Bytes::new())).unwrap();
            let resp = s.send_request(req).await.expect("h2 stream failed");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        });
    }
    let mut names = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(r) = set.join_next().await {
            names.push(r.unwrap());
        }
    })
    .await;
    assert!(all.is_ok(), "h2 streams timed out");
    let elapsed = start.elapsed();
    let on_a = names.iter().filter(|n| *n == "a").count();
    let on_b = names.iter().filter(|n| *n == "b").count();
    assert_eq!(on_a + on_b, N, "{names:?}");
    assert!(
        on_a >= N / 4 && on_b >= N / 4,
        "streams not spread: a={on_a} b={on_b}"
    );
    // 16 x 300 ms one after the other would be 4.8 s; concurrent streams take ~300 ms.
    assert!(
        elapsed < Duration::from_millis(2500),
        "streams were not concurrent: {elapsed:?}"
    );
    // The pooled h2 client's connection and ours.
    assert!(bal.shared().open_connections.load(SeqCst) <= 2);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Error bodies

#[tokio::test]
async fn local_error_answers_are_short_plain_text() {
    let ok = start_backend("ok").await;
    let hang = start_backend("hang").await;
    hang.set_mode(Mode::Hang);
    let broken = start_backend("broken").await;
    broken.set_mode(Mode::Fail503);
    let dead = free_port();
    let tmpl = format!(
        r#"watch = false
[admin]
bind = "{{admin}}"
[log]
access = false
[[listeners]]
bind = "{{listen}}"

[[routes]]
path_prefix = "/ok"
pool = "ok"
[[routes]]
path_prefix = "/dead"
pool = "dead"
[[routes]]
path_prefix = "/slow"
pool = "slow"
[[routes]]
path_prefix = "/broken"
pool = "broken"

[pools.ok]
backends = ["{ok}"]
[pools.dead]
backends = ["{dead}"]
[pools.dead.timeouts]
connect = "1s"
[pools.slow]
backends = ["{hang}"]
[pools.slow.timeouts]
response = "300ms"
[pools.slow.retries]
attempts = 1
[pools.broken]
backends = ["{broken}"]
[pools.broken.retries]
attempts = 1
[pools.broken.circuit_breaker]
consecutive_failures = 1
open_duration = "60s"
max_ejected_percent = 100
"#,
        ok = ok.addr,
        dead = dead,
        hang = hang.addr,
        broken = broken.addr
    );
    let bal = start_balancer(&tmpl).await;
    let c = client();
    assert_eq!(get(&c, &bal.url("/ok")).await.status, 200);
    assert_short_text(&get(&c, &bal.url("/nothing-here")).await, 404);
    assert_short_text(&get(&c, &bal.url("/dead")).await, 502);
    let t = Instant::now();
    assert_short_text(&get(&c, &bal.url("/slow")).await, 504);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "504 took {:?}",
        t.elapsed()
    );
    // The backend's own 503 is relayed as is (and opens the breaker) ...
    let g = get(&c, &bal.url("/broken")).await;
    assert_eq!(g.status, 503);
    assert_eq!(g.body, "boom");
    // ... then the balancer answers 503 itself without trying it.
    let before = broken.requests();
    assert_short_text(&get(&c, &bal.url("/broken")).await, 503);
    assert_eq!(broken.requests(), before);
    // h2 clients get the same bodies.
    assert_short_text(&get(&h2_client(), &bal.url("/nothing-here")).await, 404);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Access log (the real binary: it owns stdout)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request() {
    let a = start_backend("a").await;
    let tmpl = format!(
        r#"watch = false
[admin]
bind = "{{admin}}"
[log]
access = true
level = "warn"
[[listeners]]
bind = "{{listen}}"
[[routes]]
path_prefix = "/app"
pool = "web"
[[routes]]
path_prefix = "/echo"
pool = "web"
[pools.web]
backends = ["{}"]
"#,
        a.addr
    );
    let mut bin = start_binary(&tmpl, std::process::Stdio::piped());
    let stdout = bin.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let base = format!("http://{}", bin.addr);
    let c = client();

    let g1 = get(&c, &format!("{base}/app/one?x=1")).await;
    assert_eq!(g1.status, 200);
    let g2 = get(&c, &format!("{base}/nowhere")).await;
    assert_eq!(g2.status, 404);
    let g3 = post(&c, &format!("{base}/echo"), "hello world").await;
    assert_eq!(g3.status, 200);
    assert_eq!(g3.body, "hello world");
    let g4 = get(&h2_client(), &format!("{base}/app/h2")).await;
    assert_eq!(g4.status, 200);

    let mut lines = Vec::new();
    for i in 0..4 {
        let l = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(10)))
            .unwrap_or_else(|_| panic!("access log line {i} missing; got {lines:?}"));
        lines.push(l);
    }
    let keys = [
        "ts",
        "client",
        "method",
        "path",
        "proto",
        "status",
        "bytes",
        "duration_ms",
        "pool",
        "backend",
        "attempts",
        "outcome",
        "reason",
        "request_id",
        "trace_id",
        "host",
        "user_agent",
        "upstream_ms",
        "bytes_received",
        "tls",
        "cache",
        "grpc_status",
    ];
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {l:?}: {e}"))
        })
        .collect();
    for (l, v) in lines.iter().zip(&parsed) {
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {l}"));
        let mut got: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        got.sort_unstable();
        let mut want = keys.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "{l}");
        let ts = v["ts"].as_str().unwrap();
        assert!(
            ts.len() >= 20 && ts.contains('T') && ts.ends_with('Z'),
            "ts {ts}"
        );
        let client: SocketAddr = v["client"]
            .as_str()
            .unwrap()
            .parse()
            .expect("client is ip:port");
        assert!(client.ip().is_loopback());
        assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
    }
    let backend = a.addr.to_string();
    let (l1, l2, l3, l4) = (&parsed[0], &parsed[1], &parsed[2], &parsed[3]);
    assert_eq!(l1["method"], "GET");
    assert_eq!(l1["path"], "/app/one?x=1");
    assert_eq!(l1["proto"], "HTTP/1.1");
    assert_eq!(l1["status"], 200);
    assert_eq!(l1["bytes"], g1.body.len() as u64);
    assert_eq!(l1["pool"], "web");
    assert_eq!(l1["backend"], backend.as_str());
    assert_eq!(l1["attempts"], 1);
    assert_eq!(l1["outcome"], "ok");
    assert!(l1["reason"].is_null());
    assert_eq!(l1["host"], bin.addr.to_string());
    assert_eq!(
        l1["request_id"],
        g1.headers["x-request-id"].to_str().unwrap()
    );
    assert!(
        l1["upstream_ms"].as_f64().is_some_and(|d| d >= 0.0),
        "{}",
        l1
    );
    assert_eq!(l1["bytes_received"], 0);
    assert!(l1["tls"].is_null());

    assert_eq!(l2["path"], "/nowhere");
    assert_eq!(l2["status"], 404);
    assert_eq!(l2["bytes"], g2.body.len() as u64);
    assert!(l2["pool"].is_null());
    assert!(l2["backend"].is_null());
    assert_eq!(l2["attempts"], 0);
    assert_eq!(l2["outcome"], "local");
    assert_eq!(l2["reason"], "no_route");
    assert!(l2["upstream_ms"].is_null(), "{l2}");

    assert_eq!(l3["method"], "POST");
    assert_eq!(l3["path"], "/echo");
    assert_eq!(l3["status"], 200);
    assert_eq!(l3["bytes"], 11);
    assert_eq!(l3["bytes_received"], 11);
    assert_eq!(l3["outcome"], "ok");

    assert_eq!(l4["path"], "/app/h2");
    assert_eq!(l4["proto"], "HTTP/2");
    assert_eq!(l4["status"], 200);
    assert_eq!(l4["backend"], backend.as_str());

    // Exactly one line per request: nothing else arrived in between (a fifth request's line
    // is the next one).
    let g5 = get(&c, &format!("{base}/app/last")).await;
    assert_eq!(g5.status, 200);
    let l5 = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(10)))
        .expect("fifth line");
    let v5: serde_json::Value = serde_json::from_str(&l5).unwrap();
    assert_eq!(v5["path"], "/app/last", "an extra line was logged: {l5}");
}

/// `#` never belongs in a request target; the URI parser would drop the fragment silently,
/// so the balancer refuses the request instead of forwarding a different one.
#[tokio::test]
async fn fragment_in_the_target_is_refused() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let addr = bal.addr;
    let text = tokio::task::spawn_blocking(move || {
        raw(
            addr,
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(3),
        )
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(a.requests(), 0);
    let g = get(&client(), &bal.url("/ok")).await;
    assert_eq!(g.status, 200);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Transfer codings, path normalisation, header names, Host syntax

/// hyper accepts a Transfer-Encoding whose last coding is chunked and decodes only that one;
/// `gzip, chunked` would reach the backend still gzipped and unlabelled. 501 (RFC 9112 §6.1),
/// never forwarded, and the connection closes: its body was not read.
#[tokio::test]
async fn unknown_transfer_codings_get_501_and_close() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    for (what, te) in [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked"),
        ("x, chunked", "Transfer-Encoding: x, chunked"),
        (
            "two lines",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        ),
    ] {
        let mut conn = RawConn::connect(bal.addr).await;
        conn.send(
            format!(
                "POST /echo HTTP/1.1\r\nHost: t\r\n{te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
                 GET / HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let r = conn.read_response().await.expect(what);
        assert_eq!(r.status, 501, "{what}: {}", r.body_str());
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        assert!(
            conn.closed_within(Duration::from_secs(5)).await,
            "{what}: the connection went on after the 501"
        );
        assert_eq!(a.requests(), 0, "{what}: forwarded");
    }
    assert_eq!(get(&client(), &bal.url("/")).await.status, 200);
    bal.shutdown().await;
}

/// No spelling of `/admin` escapes the `/admin` route: unreserved escapes are decoded and
/// slashes merged before routing, and the backend gets the path the route matched.
#[tokio::test]
async fn every_spelling_of_a_prefix_is_routed_and_forwarded_normalised() {
    let web = start_backend("web").await;
    let admin = start_backend("admin").await;
    let tmpl = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/admin\"\npool = \"admin\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n\
         [pools.admin]\nbackends = [\"{}\"]\n[pools.web]\nbackends = [\"{}\"]\n",
        admin.addr, web.addr
    );
    let bal = start_balancer(&tmpl).await;
    for (target, pool, want) in [
        ("/%61dmin/x", "admin", "/admin/x"),
        ("/%61%64%6D%69%6e/x", "admin", "/admin/x"),
        ("//admin///x", "admin", "/admin/x"),
        ("/%2e%2e/admin/x", "admin", "/admin/x"),
        ("/public/..//%61dmin/x?q=%2f", "admin", "/admin/x?q=%2f"),
        ("/admin/%7euser", "admin", "/admin/~user"),
        // Reserved escapes keep their meaning: this is not /admin/x.
        ("/admin%2fx", "web", "/admin%2Fx"),
        ("/a%2Fb%3f", "web", "/a%2Fb%3F"),
    ] {
        let mut conn = RawConn::connect(bal.addr).await;
        conn.send(format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await;
        let r = conn.read_response().await.expect(target);
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(r.body_str(), pool, "{target} went to the wrong pool");
        let b = if pool == "admin" { &admin } else { &web };
        assert_eq!(
            b.state.last_uri.lock().unwrap().as_deref(),
            Some(want),
            "{target}"
        );
    }
    bal.shutdown().await;
}

/// CGI and WSGI backends see `X_Forwarded_For` and `X-Forwarded-For` as one variable: names
/// with `_` are dropped by default (nginx's `underscores_in_headers off`).
#[tokio::test]
async fn header_names_with_underscores_are_dropped_by_default() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    for c in [client(), h2_client()] {
        let g = send(
            &c,
            hget(
                &bal.url("/"),
                &[
                    ("x_forwarded_for", "6.6.6.6"),
                    ("x_user", "root"),
                    ("x-kept", "1"),
                ],
            ),
        )
        .await;
        assert_eq!(g.status, 200);
        let h = last_headers(&a);
        assert!(h.get("x_forwarded_for").is_none(), "{h:?}");
        assert!(h.get("x_user").is_none(), "{h:?}");
        assert_eq!(hv(&h, "x-kept"), Some("1"));
        assert_eq!(hv(&h, "x-forwarded-for"), Some("127.0.0.1"));
    }
    bal.shutdown().await;
}

#[tokio::test]
async fn header_names_with_underscores_are_kept_when_allowed() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nallow_underscores_in_headers = true\n",
    ))
    .await;
    let g = send(&client(), hget(&bal.url("/"), &[("x_user", "root")])).await;
    assert_eq!(g.status, 200);
    assert_eq!(hv(&last_headers(&a), "x_user"), Some("root"));
    bal.shutdown().await;
}

#[tokio::test]
async fn host_that_is_not_a_valid_host_gets_400() {
    assert_rejected_400(&[
        (
            "userinfo in Host",
            b"GET / HTTP/1.1\r\nHost: evil@a.example\r\n\r\n",
        ),
        (
            "empty label in Host",
            b"GET / HTTP/1.1\r\nHost: a..example\r\n\r\n",
        ),
        (
            "leading dot in Host",
            b"GET / HTTP/1.1\r\nHost: .a.example\r\n\r\n",
        ),
        (
            "port out of range",
            b"GET / HTTP/1.1\r\nHost: a.example:65536\r\n\r\n",
        ),
        (
            "port not a number",
            b"GET / HTTP/1.1\r\nHost: a.example:8o\r\n\r\n",
        ),
        ("empty port", b"GET / HTTP/1.1\r\nHost: a.example:\r\n\r\n"),
        (
            "userinfo in an absolute-form target",
            b"GET http://evil@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
    ])
    .await;
}

// ------------------------------------------------------------------------------------------
// Backends that break HTTP, and what the access log says about cut responses

/// A backend on raw TCP that answers by path: `/cl-te` with both Content-Length and
/// Transfer-Encoding, `/cut` with 10 of the 100 bytes it announced and a close, `/badchunk`
/// with a chunk size that is not hex after 5 bytes, anything else `200 ok`. Counts
/// connections opened and those the balancer closed.
struct BrokenBackend {
    addr: SocketAddr,
    opened: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
}

async fn start_broken_backend() -> BrokenBackend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let opened = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicU64::new(0));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            o.fetch_add(1, SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, SeqCst);
                                return;
                            }
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let answer: &[u8] = match path.as_str() {
                        "/raw/cl-te" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                        "/raw/cut" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                        "/raw/badchunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).await.is_err() {
                        c.fetch_add(1, SeqCst);
                        return;
                    }
                    if path == "/raw/cut" {
                        let _ = s.flush().await;
                        return;
                    }
                }
            });
        }
    });
    BrokenBackend {
        addr,
        opened,
        closed,
    }
}

fn broken_config(raw: SocketAddr, web: SocketAddr) -> String {
    format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = true\nlevel = \"warn\"\n\
         [limits]\nheader_timeout = \"1s\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/raw\"\npool = \"raw\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n\
         [pools.raw]\nbackends = [\"{raw}\"]\n[pools.web]\nbackends = [\"{web}\"]\n"
    )
}

/// A backend response with both Content-Length and Transfer-Encoding is a 502 with
/// `upstream_protocol_error`, for HTTP/1.1 and h2 clients alike; its connection is closed,
/// never pooled, and the next request works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_response_with_length_and_chunked_is_502_and_its_connection_dropped() {
    let raw = start_broken_backend().await;
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &broken_config(raw.addr, web.addr),
        std::process::Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    let base = format!("http://{}", bin.addr);
    for (proto, c) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())] {
        let g = get(&c, &format!("{base}/raw/cl-te")).await;
        assert_eq!(g.status, 502, "{proto}: {}", g.body);
        let l = log.line_for("/raw/cl-te");
        assert_eq!(l["proto"], proto);
        assert_eq!(l["status"], 502, "{l}");
        assert_eq!(l["reason"], "upstream_protocol_error", "{l}");
        assert!(
            eventually(Duration::from_secs(5), || raw.closed.load(SeqCst)
                == raw.opened.load(SeqCst))
            .await,
            "{proto}: the broken connection was kept ({} opened, {} closed)",
            raw.opened.load(SeqCst),
            raw.closed.load(SeqCst)
        );
        let g = get(&c, &format!("{base}/raw/ok")).await;
        assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "ok"), "{proto}");
        assert_eq!(log.line_for("/raw/ok")["status"], 200);
    }
    // Each broken response cost its connection; the /raw/ok one is pooled and reused.
    assert_eq!(raw.opened.load(SeqCst), 3);
}

/// A backend that breaks its body mid-way: the client's response is cut, and the log says
/// `upstream_aborted` with the backend's reason and the bytes that reached the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_cut_by_the_backend_is_logged_as_upstream_aborted() {
    let raw = start_broken_backend().await;
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &broken_config(raw.addr, web.addr),
        std::process::Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    for (path, reason, bytes) in [
        ("/raw/cut", "upstream_reset", 10),
        ("/raw/badchunk", "upstream_protocol_error", 5),
    ] {
        let text = raw_async(
            bin.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        let l = log.line_for(path);
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["outcome"], "upstream_aborted", "{l}");
        assert_eq!(l["reason"], reason, "{l}");
        assert_eq!(l["bytes"], bytes, "{l}");
    }
}

/// A client that stops reading a large response: the balancer gives up after the send
/// timeout, and the log says it reset the response (`reset`, `client_stalled`), not that the
/// client closed, with fewer bytes than the whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_logged_as_reset_by_the_balancer() {
    let raw = start_broken_backend().await;
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &broken_config(raw.addr, web.addr),
        std::process::Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    const TOTAL: u64 = 64 * 1024 * 1024;
    let mut s = TcpStream::connect(bin.addr).await.unwrap();
    s.write_all(format!("GET /bytes/{TOTAL} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let l = log.line_for(&format!("/bytes/{TOTAL}"));
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["outcome"], "reset", "{l}");
    assert_eq!(l["reason"], "client_stalled", "{l}");
    assert!(l["bytes"].as_u64().unwrap() < TOTAL, "{l}");
    drop(s);
}

/// `bytes` is the body that went out: none for HEAD, whether the balancer or a backend
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_log_no_body_bytes() {
    let raw = start_broken_backend().await;
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &broken_config(raw.addr, web.addr),
        std::process::Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    // A route that matches nothing: the balancer's own 404.
    let tmpl = broken_config(raw.addr, web.addr).replace(
        "[[routes]]\npath_prefix = \"/\"\npool = \"web\"\n",
        "[[routes]]\npath_prefix = \"/web\"\npool = \"web\"\n",
    );
    write_binary_config(&bin, &tmpl);
    bin.signal("HUP");
    let c = client();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            get(&c, &format!("http://{}/nowhere", bin.addr))
                .await
                .status
                == 404
        })
        .await
    );
    let g = send(
        &c,
        Request::head(format!("http://{}/nowhere", bin.addr))
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(g.status, 404);
    let g = send(
        &c,
        Request::head(format!("http://{}/web/x", bin.addr))
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(g.status, 200);
    let mut heads = 0;
    while heads < 2 {
        let l = log.line_for("/nowhere");
        if l["method"] == "GET" {
            // The GETs that waited for the reload: those answered before it are not 404s.
            if l["status"] == 404 {
                assert_eq!(l["bytes"], "404 Not Found\n".len(), "{l}");
            }
            continue;
        }
        assert_eq!(l["bytes"], 0, "{l}");
        heads += 1;
        let l = log.line_for("/web/x");
        assert_eq!(
            (l["status"].as_u64(), l["bytes"].as_u64()),
            (Some(200), Some(0)),
            "{l}"
        );
        heads += 1;
    }
}
