//! gRPC semantics through the balancer, with a real gRPC client (tonic) and real backends:
//! the balancer's own answers as `grpc-status` codes, `grpc-timeout` as a deadline that is
//! forwarded reduced, a backend's `grpc-status` recorded (access log, metrics, breaker), and
//! the `grpc.health.v1` health check against tonic-health's server.

mod common;
#[path = "common/grpc_backend.rs"]
mod grpc_backend;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use grpc_backend::RawCodec;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tonic::{Code, Request, Status};

// ------------------------------------------------------------------------------------------
// A tonic client with raw-bytes messages (`grpc_backend::RawCodec`): no .proto build needed.

/// One unary call to `/test.Echo/{method}` at `addr` (the balancer), on a fresh channel.
async fn call(addr: SocketAddr, method: &str, timeout: Option<Duration>) -> Status {
    match call_ok(addr, method, timeout).await {
        Ok(b) => Status::ok(String::from_utf8_lossy(&b).into_owned()),
        Err(s) => s,
    }
}

async fn call_ok(
    addr: SocketAddr,
    method: &str,
    timeout: Option<Duration>,
) -> Result<Bytes, Status> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("the balancer accepts h2c");
    let mut c = tonic::client::Grpc::new(ch);
    c.ready().await.expect("channel ready");
    let mut req = Request::new(Bytes::from_static(b"ping"));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let path = http::uri::PathAndQuery::try_from(format!("/test.Echo/{method}")).unwrap();
    c.unary(req, path, RawCodec).await.map(|r| r.into_inner())
}

// ------------------------------------------------------------------------------------------
// Backends

/// What `start_status_backend` answers every gRPC call with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// HTTP 200 with `grpc-status` in the headers and no body (trailers-only); `grpc-message`
    /// is the `grpc-timeout` the backend received (or `none`).
    TrailersOnly(u32),
    /// A message, then `grpc-status` in the trailers (needs HTTP/2 end to end).
    InTrailers(u32),
    /// Never answers.
    Hang,
}

struct StatusBackend {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl StatusBackend {
    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
}

/// A gRPC-speaking backend (HTTP/1.1 or h2c, as the balancer's pool connects) that ends every
/// call with a status the test chooses.
async fn start_status_backend(answer: Answer) -> StatusBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(Mutex::new(answer));
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (a, n) = (Arc::clone(&answer), Arc::clone(&calls));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (a, n) = (Arc::clone(&a), Arc::clone(&n));
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let a = *a.lock().unwrap();
                    n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let timeout = req
                            .headers()
                            .get("grpc-timeout")
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                            .unwrap_or_else(|| "none".into());
                        let _ = req.into_body().collect().await;
                        if a == Answer::Hang {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, std::convert::Infallible>(grpc_answer(a, &timeout))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    StatusBackend {
        addr,
        answer,
        calls,
    }
}

type AnswerBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn grpc_answer(a: Answer, timeout: &str) -> http::Response<AnswerBody> {
    let b = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    match a {
        Answer::Hang => unreachable!("never answers"),
        Answer::TrailersOnly(code) => b
            .header("grpc-status", code.to_string())
            .header("grpc-message", timeout)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        Answer::InTrailers(code) => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", code.into());
            trailers.insert("grpc-message", timeout.parse().unwrap());
            let msg = Bytes::from_static(&[0, 0, 0, 0, 2, b'o', b'k']);
            let frames = futures_util::stream::iter([
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(msg)),
                Ok(http_body::Frame::trailers(trailers)),
            ]);
            b.body(http_body_util::StreamBody::new(frames).boxed())
                .unwrap()
        }
    }
}

/// A backend that accepts connections and never answers.
async fn start_hanging_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

/// The value of `name` in `/metrics` for the series with exactly these labels (0 if absent).
async fn metric(b: &Balancer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let g = get(&client(), &b.admin_url("/metrics")).await;
    assert_eq!(g.status, 200);
    parse_metrics(&g.body)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map_or(0.0, |(_, _, v)| v)
}

fn assert_status(s: &Status, code: Code, message: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert_eq!(s.message(), message, "{s:?}");
}

// ------------------------------------------------------------------------------------------
// The balancer's own answers

#[tokio::test(flavor = "multi_thread")]
async fn no_route_is_unimplemented_with_the_request_id() {
    let backend = start_status_backend(Answer::TrailersOnly(0)).await;
    let cfg = config(
        &[backend.addr],
        "round_robin",
        "[[routes]]\npath_prefix = \"/other.Service/\"\npool = \"web\"\n",
    );
    let b = start_balancer(&cfg).await;
    let ch = tonic::transport::Channel::from_shared(b.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = tonic::client::Grpc::new(ch);
    c.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
    let s = c
        .unary(Request::new(Bytes::from_static(b"x")), path, RawCodec)
        .await
        .unwrap_err();
    assert_status(&s, Code::Unimplemented, "no_route");
    assert!(
        s.metadata().get("x-request-id").is_some(),
        "the request id comes back on the balancer's own gRPC answers: {:?}",
        s.metadata()
    );
    assert_eq!(backend.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Process-wide counters: at least this test's answer.
    assert!(metric(&b, "balancer_grpc_responses_total", &[("code", "12")]).await >= 1.0);
    // A plain HTTP client on the same route still gets the plain 404.
    let g = get(&client(), &b.url("/test.Echo/Unary")).await;
    assert_eq!(g.status, 404);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_backend_is_unavailable() {
    let gone = free_port();
    let b = start_balancer(&config(&[gone], "round_robin", "")).await;
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::Unavailable, "connect_refused");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_without_a_usable_backend_is_unavailable() {
    // Unhealthy: the health check cannot connect.
    let gone = free_port();
    let hc = "[pools.web.health_check]\ninterval = \"50ms\"\ntimeout = \"50ms\"\nunhealthy_threshold = 1\n";
    let b = start_balancer(&config(&[gone], "round_robin", hc)).await;
    wait_status(&b, Duration::from_secs(10), "backend unhealthy", |s| {
        entry(s, gone)["healthy"] == false
    })
    .await;
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::Unavailable, "all_unhealthy");
    b.shutdown().await;

    // Breaker open: a backend answering 503 opens it after one failure.
    let backend = start_backend("a").await;
    backend.set_mode(Mode::Fail503);
    let cb = "[pools.web.circuit_breaker]\nconsecutive_failures = 1\nopen_duration = \"1h\"\nmax_ejected_percent = 100\n";
    let b = start_balancer(&config(&[backend.addr], "round_robin", cb)).await;
    // The backend's 503 is relayed as it is (what tonic makes of it is tonic's business)...
    let _ = call(b.addr, "Unary", None).await;
    assert_eq!(backend.requests(), 1);
    // ... and opens the breaker.
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::Unavailable, "all_breakers_open");
    // The balancer's own answers carry no pool or backend (and are counted process-wide, so
    // other tests' answers may be in there too).
    assert!(metric(&b, "balancer_grpc_responses_total", &[("code", "14")]).await >= 1.0);
    // Backends' and the balancer's samples in one family still make a valid exposition.
    let text = get(&client(), &b.admin_url("/metrics")).await.body;
    assert!(
        text.contains("# TYPE balancer_grpc_responses_total counter"),
        "{text}"
    );
    promtool_check(&text);
    b.shutdown().await;
}

fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian: apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gRPC call over plain h2 with `grpc-timeout` set by hand: tonic would enforce the
/// deadline itself and hide whether the balancer did.
async fn raw_call(b: &Balancer, grpc_timeout: Option<&str>) -> Got {
    raw_call_to(b.addr, "/test.Echo/Unary", grpc_timeout).await
}

async fn raw_call_to(addr: SocketAddr, path: &str, grpc_timeout: Option<&str>) -> Got {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = grpc_timeout {
        req = req.header("grpc-timeout", t);
    }
    let req = req.body(full(&[0u8, 0, 0, 0, 0][..])).unwrap();
    send(&h2_client(), req).await
}

fn assert_grpc_answer(g: &Got, code: &str, message: &str) {
    assert_eq!(g.status, 200, "{:?}", g.headers);
    assert_eq!(g.headers["content-type"], "application/grpc");
    assert_eq!(g.headers["grpc-status"], code, "{:?}", g.headers);
    assert_eq!(g.headers["grpc-message"], message, "{:?}", g.headers);
    assert_eq!(g.body, "", "trailers-only: no message");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_deadline_bounds_the_wait_and_is_not_the_backends_fault() {
    let hang = start_hanging_backend().await;
    // The pool would wait 30 s; the client's deadline is 300 ms.
    let b = start_balancer(&config(&[hang], "round_robin", "")).await;
    let t = Instant::now();
    let g = raw_call(&b, Some("300m")).await;
    let took = t.elapsed();
    assert_grpc_answer(&g, "4", "grpc_deadline_exceeded");
    assert!(
        took < Duration::from_secs(15),
        "answered at the client's deadline, not the pool's 30 s: {took:?}"
    );
    let st = status(&b).await;
    let e = entry(&st, hang);
    assert_eq!(e["breaker"], "closed", "{e}");
    assert_eq!(
        e["failures"], 0,
        "a client's short deadline is not a failure: {e}"
    );
    // Process-wide counters: at least this test's answer.
    assert!(metric(&b, "balancer_grpc_responses_total", &[("code", "4")]).await >= 1.0);
    let reason = [("reason", "grpc_deadline_exceeded")];
    assert!(metric(&b, "balancer_local_responses_total", &reason).await >= 1.0);
    b.shutdown().await;

    // The pool's own response timeout, shorter than the deadline, is the backend's failure.
    let cfg = config(
        &[hang],
        "round_robin",
        "[pools.web.timeouts]\nresponse = \"200ms\"\n[pools.web.retries]\nattempts = 1\n",
    );
    let b = start_balancer(&cfg).await;
    let g = raw_call(&b, Some("20S")).await;
    assert_grpc_answer(&g, "4", "response_timeout");
    assert_eq!(entry(&status(&b).await, hang)["failures"], 1);
    b.shutdown().await;
    // The same over an h2c pool, where the call is a stream on a shared connection: the
    // deadline resets the stream, and the connection serves the next call.
    let backend = start_status_backend(Answer::Hang).await;
    let b = start_balancer(&h2c(&[backend.addr], "")).await;
    let g = raw_call(&b, Some("200m")).await;
    assert_grpc_answer(&g, "4", "grpc_deadline_exceeded");
    backend.set(Answer::TrailersOnly(0));
    let g = raw_call(&b, Some("5S")).await;
    assert_eq!(g.headers["grpc-status"], "0", "{:?}", g.headers);
    assert_eq!(entry(&status(&b).await, backend.addr)["failures"], 0);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_timeout_is_forwarded_reduced() {
    let backend = start_status_backend(Answer::TrailersOnly(5)).await;
    let b = start_balancer(&config(&[backend.addr], "round_robin", "")).await;
    // Without a deadline nothing is invented.
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::NotFound, "none");
    let s = call(b.addr, "Unary", Some(Duration::from_secs(5))).await;
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let header = http::HeaderValue::from_str(s.message()).unwrap();
    let left = balancer::grpc::parse_timeout(&header)
        .unwrap_or_else(|| panic!("backend got an unparsable grpc-timeout {:?}", s.message()));
    assert!(
        left > Duration::ZERO && left < Duration::from_secs(5),
        "the backend is told what is left of 5 s: {:?}",
        s.message()
    );
    // The longest deadline the header can say is carried without overflow.
    let g = raw_call(&b, Some("99999999H")).await;
    assert_eq!(g.headers["grpc-status"], "5", "{:?}", g.headers);
    assert_eq!(g.headers["grpc-message"], "99999999H");
    // A call that arrives with no time left never reaches a backend.
    let before = backend.calls.load(std::sync::atomic::Ordering::SeqCst);
    let g = raw_call(&b, Some("0n")).await;
    assert_grpc_answer(&g, "4", "grpc_deadline_exceeded");
    assert_eq!(
        backend.calls.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_grpc_timeout_is_ignored_and_forwarded() {
    let backend = start_status_backend(Answer::TrailersOnly(5)).await;
    let b = start_balancer(&config(&[backend.addr], "round_robin", "")).await;
    for bad in ["soon", "123456789S", "5s", "-1m"] {
        let g = raw_call(&b, Some(bad)).await;
        assert_grpc_answer(&g, "5", bad);
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_stream_may_pause_longer_than_the_body_stall_limit() {
    let backend = start_status_backend(Answer::TrailersOnly(0)).await;
    let cfg = config(
        &[backend.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"200ms\"\n",
    );
    let b = start_balancer(&cfg).await;
    let paused_upload = |content_type: &'static str| {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(&[0, 0, 0, 0, 1])).await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            let _ = tx.send_data(Bytes::from_static(b"x")).await;
        });
        http::Request::post(b.url("/test.Echo/Sum"))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(body.boxed())
            .unwrap()
    };
    let g = send(&h2_client(), paused_upload("application/grpc")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["grpc-status"], "0", "{:?}", g.headers);
    // The same pause in anything else is a stalled upload.
    let g = send(&h2_client(), paused_upload("application/octet-stream")).await;
    assert_eq!(g.status, 408);
    b.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// A backend's grpc-status: relayed, counted, and judged by the breaker

#[tokio::test(flavor = "multi_thread")]
async fn backend_unavailable_opens_the_breaker_but_not_found_does_not() {
    let backend = start_status_backend(Answer::TrailersOnly(5)).await;
    let cb = "[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"1h\"\nmax_ejected_percent = 100\n";
    let b = start_balancer(&config(&[backend.addr], "round_robin", cb)).await;
    for _ in 0..5 {
        let s = call(b.addr, "Unary", None).await;
        assert_eq!(s.code(), Code::NotFound, "{s:?}");
    }
    let e = entry(&status(&b).await, backend.addr);
    assert_eq!(
        e["breaker"], "closed",
        "NOT_FOUND is an application answer: {e}"
    );
    assert_eq!(e["failures"], 0, "{e}");
    let a = backend.addr.to_string();
    let labels = |code| [("pool", "web"), ("backend", a.as_str()), ("code", code)];
    assert_eq!(
        metric(&b, "balancer_grpc_responses_total", &labels("5")).await,
        5.0
    );

    backend.set(Answer::TrailersOnly(14));
    for _ in 0..3 {
        let s = call(b.addr, "Unary", None).await;
        assert_eq!(
            s.code(),
            Code::Unavailable,
            "relayed as the backend said: {s:?}"
        );
        assert_eq!(s.message(), "none", "the backend's own message: {s:?}");
    }
    let e = entry(&status(&b).await, backend.addr);
    assert_eq!(e["breaker"], "open", "three UNAVAILABLE in a row: {e}");
    assert_eq!(e["last_error"]["reason"], "upstream_grpc_error", "{e}");
    assert_eq!(
        metric(&b, "balancer_grpc_responses_total", &labels("14")).await,
        3.0
    );
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::Unavailable, "all_breakers_open");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_has_the_grpc_status_and_the_real_reason() {
    let backend = start_status_backend(Answer::TrailersOnly(7)).await;
    let cfg = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[[listeners]]\nbind = \"{{listen}}\"\n[[routes]]\npath_prefix = \"/test.Echo/\"\npool = \"web\"\n[pools.web]\nprotocol = \"h2c\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let mut bin = start_binary(&cfg, std::process::Stdio::piped());
    let log = AccessLog::of(&mut bin);

    let g = raw_call_to(bin.addr, "/test.Echo/Unary", None).await;
    assert_eq!(g.headers["grpc-status"], "7");
    let l = log.line_for("/test.Echo/Unary");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["grpc_status"], 7, "the backend's own status: {l}");
    assert!(l["reason"].is_null(), "{l}");

    // In the trailers, at the end of the body: a failure status is the reason too.
    backend.set(Answer::InTrailers(13));
    let g = raw_call_to(bin.addr, "/test.Echo/Sum", None).await;
    assert_eq!(g.status, 200);
    let l = log.line_for("/test.Echo/Sum");
    assert_eq!(l["grpc_status"], 13, "{l}");
    assert_eq!(l["reason"], "upstream_grpc_error", "{l}");
    assert_eq!(l["outcome"], "ok", "{l}");

    let g = raw_call_to(bin.addr, "/other.Svc/Call", None).await;
    assert_grpc_answer(&g, "12", "no_route");
    let l = log.line_for("/other.Svc/Call");
    assert_eq!(l["status"], 200, "a gRPC answer is an HTTP 200: {l}");
    assert_eq!(l["grpc_status"], 12, "{l}");
    assert_eq!(l["reason"], "no_route", "{l}");
    assert_eq!(l["outcome"], "local", "{l}");

    // Not gRPC: no grpc_status.
    let g = get(&client(), &format!("http://{}/other", bin.addr)).await;
    assert_eq!(g.status, 404);
    let l = log.line_for("/other");
    assert!(l["grpc_status"].is_null(), "{l}");
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

/// An h2c pool: a gRPC status can come in the trailers.
fn h2c(backends: &[SocketAddr], extra: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!("protocol = \"h2c\"\n{extra}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_in_trailers_is_relayed_counted_and_judged_at_the_end_of_the_body() {
    let backend = start_status_backend(Answer::InTrailers(5)).await;
    let cb = "[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"1h\"\nmax_ejected_percent = 100\n";
    let b = start_balancer(&h2c(&[backend.addr], cb)).await;
    let a = backend.addr.to_string();
    let labels = |code| [("pool", "web"), ("backend", a.as_str()), ("code", code)];
    for _ in 0..4 {
        let s = call(b.addr, "Unary", None).await;
        assert_status(&s, Code::NotFound, "none");
    }
    let e = entry(&status(&b).await, backend.addr);
    assert_eq!(e["breaker"], "closed", "{e}");
    assert_eq!(e["failures"], 0, "{e}");
    assert_eq!(e["requests"], 4, "{e}");
    assert_eq!(
        metric(&b, "balancer_grpc_responses_total", &labels("5")).await,
        4.0
    );

    backend.set(Answer::InTrailers(14));
    for i in 1..=3 {
        let s = call(b.addr, "Unary", None).await;
        assert_eq!(
            s.code(),
            Code::Unavailable,
            "relayed as the backend said: {s:?}"
        );
        // The verdict arrives with the trailers, after the headers were relayed.
        let want = if i < 3 { "closed" } else { "open" };
        let e = wait_status(&b, Duration::from_secs(5), "breaker after trailers", |st| {
            entry(st, backend.addr)["breaker"] == want
        })
        .await;
        assert_eq!(entry(&e, backend.addr)["failures"], i, "{e}");
    }
    let e = entry(&status(&b).await, backend.addr);
    assert_eq!(e["last_error"]["reason"], "upstream_grpc_error", "{e}");
    assert_eq!(
        metric(&b, "balancer_grpc_responses_total", &labels("14")).await,
        3.0
    );
    let s = call(b.addr, "Unary", None).await;
    assert_status(&s, Code::Unavailable, "all_breakers_open");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tonic_servers_stream_status_is_relayed_and_counted() {
    use tokio_stream::StreamExt;
    let backend = grpc_backend::start_grpc_backend(100).await;
    let b = start_balancer(&h2c(&[backend.addr], "")).await;
    let mut c = grpc_backend::grpc_client(b.addr).await;
    // OK after three messages.
    let mut stream = grpc_backend::count(&mut c, Request::new(Bytes::from_static(b"3")))
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while let Some(m) = stream.next().await {
        m.unwrap();
        got += 1;
    }
    assert_eq!(got, 3);
    // ABORTED in the trailers after two messages, with the backend's trailer metadata.
    let mut req = Request::new(Bytes::from_static(b"2"));
    req.metadata_mut()
        .insert("x-fail", tonic::metadata::MetadataValue::from_static("1"));
    let mut stream = grpc_backend::count(&mut c, req).await.unwrap().into_inner();
    let mut msgs = 0;
    let end = loop {
        match stream.next().await {
            Some(Ok(_)) => msgs += 1,
            Some(Err(s)) => break s,
            None => panic!("the stream must end with ABORTED"),
        }
    };
    assert_eq!(msgs, 2);
    assert_status(&end, Code::Aborted, "stopped on request");
    assert_eq!(end.metadata().get("x-trailer").unwrap(), "present");
    let a = backend.addr.to_string();
    for (code, n) in [("0", 1.0), ("10", 1.0)] {
        let labels = [("pool", "web"), ("backend", a.as_str()), ("code", code)];
        let want = || async { metric(&b, "balancer_grpc_responses_total", &labels).await == n };
        assert!(
            wait_until(Duration::from_secs(5), want).await,
            "code {code}"
        );
    }
    // ABORTED is the application's answer: no failure.
    assert_eq!(entry(&status(&b).await, backend.addr)["failures"], 0);
    b.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// grpc.health.v1 health checks

/// tonic-health's server on 127.0.0.1:0.
async fn start_health_server() -> (SocketAddr, tonic_health::server::HealthReporter) {
    let (reporter, svc) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    (addr, reporter)
}

fn grpc_check(service: &str) -> String {
    format!(
        "[pools.web.health_check]\nkind = \"grpc\"\nservice = \"{service}\"\ninterval = \"50ms\"\ntimeout = \"500ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_check_follows_the_serving_status() {
    use tonic_health::ServingStatus;
    let (addr, reporter) = start_health_server().await;
    reporter
        .set_service_status("test.Echo", ServingStatus::NotServing)
        .await;
    let b = start_balancer(&config(&[addr], "round_robin", &grpc_check("test.Echo"))).await;
    let limit = Duration::from_secs(10);
    wait_status(&b, limit, "NOT_SERVING is unhealthy", |s| {
        entry(s, addr)["healthy"] == false
    })
    .await;
    reporter
        .set_service_status("test.Echo", ServingStatus::Serving)
        .await;
    wait_status(&b, limit, "SERVING is healthy", |s| {
        entry(s, addr)["healthy"] == true
    })
    .await;
    reporter
        .set_service_status("test.Echo", ServingStatus::NotServing)
        .await;
    wait_status(&b, limit, "NOT_SERVING again", |s| {
        entry(s, addr)["healthy"] == false
    })
    .await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_check_fails_for_an_unknown_service_and_passes_for_the_server() {
    let (addr, _reporter) = start_health_server().await;
    // tonic-health answers NOT_FOUND for a service it does not know.
    let b = start_balancer(&config(&[addr], "round_robin", &grpc_check("no.Such"))).await;
    wait_status(&b, Duration::from_secs(10), "unknown service", |s| {
        entry(s, addr)["healthy"] == false
    })
    .await;
    // The empty name is the server as a whole, which tonic-health reports SERVING. The
    // reload keeps the backend (unhealthy) and restarts its probes with the new settings.
    b.write_config(&config(&[addr], "round_robin", &grpc_check("")));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    wait_status(&b, Duration::from_secs(10), "server SERVING", |s| {
        entry(s, addr)["healthy"] == true
    })
    .await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_check_fails_against_a_backend_that_is_not_grpc() {
    // It answers the probe's path with a plain 200 and no grpc-status: never healthy by
    // mistake.
    let backend = start_backend("plain").await;
    let b = start_balancer(&config(&[backend.addr], "round_robin", &grpc_check(""))).await;
    wait_status(&b, Duration::from_secs(10), "plain backend fails", |s| {
        entry(s, backend.addr)["healthy"] == false
    })
    .await;
    b.shutdown().await;
}

/// A gRPC health server over TLS that only speaks h2 and only to a client that negotiated it
/// by ALPN (as grpc-go insists); answers SERVING while `serving` is set. Hand-written: the
/// test's tonic has no TLS.
async fn start_tls_health_server(
    cert_pem: String,
    key_pem: String,
    serving: Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serving) = (acceptor.clone(), Arc::clone(&serving));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return;
                }
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let status = if serving.load(std::sync::atomic::Ordering::SeqCst) {
                        1
                    } else {
                        2
                    };
                    async move {
                        assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", 0.into());
                        let msg = Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
                        let frames = futures_util::stream::iter([
                            Ok::<_, std::convert::Infallible>(http_body::Frame::data(msg)),
                            Ok(http_body::Frame::trailers(trailers)),
                        ]);
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(http_body_util::StreamBody::new(frames))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_check_speaks_h2_over_the_pools_tls() {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(vec!["grpc.internal".into()]).unwrap();
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let addr =
        start_tls_health_server(leaf.pem(), leaf_key.serialize_pem(), Arc::clone(&serving)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let extra = format!(
        "tls = {{ ca = \"{}\", server_name = \"grpc.internal\" }}\n{}",
        ca_path.display(),
        grpc_check("")
    );
    // `extra` follows `backends` in [pools.web]: `tls` is the pool's.
    let b = start_balancer(&config(&[addr], "round_robin", &extra)).await;
    serving.store(false, std::sync::atomic::Ordering::SeqCst);
    let limit = Duration::from_secs(10);
    wait_status(&b, limit, "NOT_SERVING over TLS", |s| {
        entry(s, addr)["healthy"] == false
    })
    .await;
    serving.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_status(&b, limit, "SERVING over TLS", |s| {
        entry(s, addr)["healthy"] == true
    })
    .await;
    b.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// The health check's config keys

const POOL: &str = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n[pools.web.health_check]\n";

#[test]
fn health_check_kind_and_service_are_validated_where_written() {
    use balancer::config::HealthKind;
    let c = balancer::Config::parse(
        &format!("{POOL}kind = \"grpc\"\nservice = \"pkg.Svc\"\n"),
        "f.toml",
        None,
    )
    .unwrap();
    let hc = c.pools[0].health_check.as_ref().unwrap();
    assert_eq!(hc.kind, HealthKind::Grpc);
    assert_eq!(hc.service, "pkg.Svc");
    let c = balancer::Config::parse(POOL, "f.toml", None).unwrap();
    assert_eq!(
        c.pools[0].health_check.as_ref().unwrap().kind,
        HealthKind::Http
    );

    let shown = |text: &str| -> Vec<String> {
        match balancer::Config::check(text, "f.toml", None) {
            Ok(c) => c.warnings.iter().map(|w| format!("warning: {w}")).collect(),
            Err(e) => e.errors.iter().map(|e| format!("error: {e}")).collect(),
        }
    };
    assert_eq!(
        shown(&format!("{POOL}kind = \"grcp\"\n")),
        ["error: f.toml:6:8: pools.web.health_check.kind: unknown kind \"grcp\" (http or grpc)"]
    );
    assert_eq!(
        shown(&format!("{POOL}service = \"pkg.Svc\"\n")),
        ["error: f.toml:6:11: pools.web.health_check.service: only used with kind = \"grpc\" (an HTTP check probes `path`)"]
    );
    // The contract's example writes `service = ""` next to `kind = "http"`: fine.
    assert!(shown(&format!("{POOL}kind = \"http\"\nservice = \"\"\n")).is_empty());
    assert_eq!(
        shown(&format!("{POOL}kind = \"grpc\"\npath = \"/healthz\"\n")),
        ["warning: f.toml:7:8: pools.web.health_check.path: ignored with kind = \"grpc\": the probe is grpc.health.v1.Health/Check (name the service with `service`)"]
    );
}

#[test]
fn check_diff_names_a_change_of_health_kind_and_service() {
    let parse = |t: &str| balancer::Config::parse(t, "f.toml", None).unwrap();
    let old = parse(POOL);
    let new = parse(&format!("{POOL}kind = \"grpc\"\nservice = \"pkg.Svc\"\n"));
    let text = balancer::diff::configs(&old, &new).lines().join("\n");
    assert!(text.contains("health_check.kind http -> grpc"), "{text}");
    assert!(
        text.contains("health_check.service \"\" -> \"pkg.Svc\""),
        "{text}"
    );
}
