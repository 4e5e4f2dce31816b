//! The response cache end to end: a real origin (hyper, in this file) that sets
//! Cache-Control, ETag and Vary per path, counts what it receives and can fail or die; the
//! real balancer in front; real clients.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

// ------------------------------------------------------------------------------------------
// The origin

/// How the origin answers one path.
#[derive(Clone, Default)]
struct Spec {
    headers: Vec<(&'static str, String)>,
    status: u16,
    /// The body is `body` and ` n=<count>`, so a test sees which response it got.
    body: &'static str,
    /// Instead: this many bytes, sent with Content-Length or (`chunked`) without.
    big: usize,
    chunked: bool,
    /// This request header's value goes into the body (Vary tests).
    echo: Option<&'static str>,
    /// Honour If-None-Match against the ETag header with a 304.
    conditional: bool,
    /// Send `first`, then the rest only once this is notified.
    gate: Option<Arc<tokio::sync::Notify>>,
}

fn spec(cc: &str) -> Spec {
    Spec {
        headers: vec![("cache-control", cc.to_owned())],
        status: 200,
        body: "hello",
        ..Spec::default()
    }
}

#[derive(Default)]
struct OriginState {
    specs: Mutex<HashMap<String, Spec>>,
    counts: Mutex<HashMap<String, u64>>,
    /// Method, target and headers of every request, in order.
    seen: Mutex<Vec<(Method, String, HeaderMap)>>,
    total: AtomicU64,
    failing: AtomicBool,
    delay_ms: AtomicU64,
}

struct Origin {
    addr: SocketAddr,
    state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState::default());
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            // Connections die with this task: `kill` aborts it, dropping the set.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                conns.spawn(async move {
                    let svc = service_fn(move |req| answer(Arc::clone(&st), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Origin { addr, state, task }
    }

    fn set(&self, path: &str, s: Spec) {
        self.state.specs.lock().unwrap().insert(path.to_owned(), s);
    }

    fn count(&self, path: &str) -> u64 {
        *self.state.counts.lock().unwrap().get(path).unwrap_or(&0)
    }

    fn last_seen(&self, path: &str) -> HeaderMap {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .rev()
            .find(|(_, t, _)| t == path)
            .map(|(_, _, h)| h.clone())
            .unwrap_or_else(|| panic!("the origin never saw {path}"))
    }

    fn kill(&self) {
        self.task.abort();
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    st: Arc<OriginState>,
    req: Request<Incoming>,
) -> Result<Response<OriginBody>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let path = req.uri().path().to_owned();
    st.total.fetch_add(1, SeqCst);
    st.seen
        .lock()
        .unwrap()
        .push((req.method().clone(), target.clone(), req.headers().clone()));
    let n = {
        let mut c = st.counts.lock().unwrap();
        let n = c.entry(target.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = st.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    if st.failing.load(SeqCst) {
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(resp);
    }
    let Some(s) = st.specs.lock().unwrap().get(&path).cloned() else {
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return Ok(resp);
    };
    *resp.status_mut() = StatusCode::from_u16(s.status).unwrap();
    for (k, v) in &s.headers {
        resp.headers_mut().append(*k, v.parse().unwrap());
    }
    let seen_headers = st
        .seen
        .lock()
        .unwrap()
        .last()
        .map(|(_, _, h)| h.clone())
        .unwrap_or_default();
    if s.conditional {
        let etag = resp.headers().get("etag").cloned();
        if let (Some(e), Some(inm)) = (etag, seen_headers.get("if-none-match")) {
            if inm.to_str().unwrap().contains(e.to_str().unwrap()) {
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                return Ok(resp);
            }
        }
    }
    if let Some(gate) = s.gate.clone() {
        let chunks = futures_util::stream::unfold(0u8, move |i| {
            let gate = Arc::clone(&gate);
            async move {
                match i {
                    0 => Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first "))),
                        1,
                    )),
                    1 => {
                        gate.notified().await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second"))), 2))
                    }
                    _ => None,
                }
            }
        });
        *resp.body_mut() = StreamBody::new(chunks).boxed();
        return Ok(resp);
    }
    if s.big > 0 {
        if s.chunked {
            let chunks = (0..s.big / 8192)
                .map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 8192]))));
            *resp.body_mut() = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
        } else {
            *resp.body_mut() = Full::new(Bytes::from(vec![b'x'; s.big])).boxed();
        }
        return Ok(resp);
    }
    let echo = s
        .echo
        .map(|h| {
            format!(
                " {h}={}",
                seen_headers.get(h).map_or("", |v| v.to_str().unwrap())
            )
        })
        .unwrap_or_default();
    *resp.body_mut() = Full::new(Bytes::from(format!("{} n={n}{echo}", s.body))).boxed();
    Ok(resp)
}

// ------------------------------------------------------------------------------------------
// The balancer

fn config(origin: SocketAddr, cache: &str) -> String {
    format!(
        r#"
watch = false
[[listeners]]
bind = "{{listen}}"
[admin]
bind = "{{admin}}"
[log]
access = false
{cache}
[[routes]]
path_prefix = "/"
pool = "web"
cache = true
[pools.web]
backends = ["{origin}"]
[pools.web.retries]
attempts = 1
[pools.web.timeouts]
response = "5s"
"#
    )
}

const SMALL: &str = "[cache]\nmax_size = \"4MiB\"\nmax_object_size = \"64KiB\"\n";

async fn setup(cache: &str) -> (Origin, Balancer, HttpClient) {
    let o = Origin::start().await;
    let b = start_balancer(&config(o.addr, cache)).await;
    (o, b, client())
}

fn cache_status(g: &Got) -> String {
    g.headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn get_with(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = Request::get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    send(c, r.body(full(Bytes::new())).unwrap()).await
}

async fn metric(b: &Balancer, name: &str) -> f64 {
    let text = get(&client(), &b.admin_url("/metrics")).await.body;
    parse_metrics(&text)
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| v)
        .sum()
}

// ------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_repeat_request_is_a_hit_and_never_reaches_the_backend() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/a", spec("max-age=60"));
    let first = get(&c, &b.url("/a")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, "hello n=1");
    assert_eq!(cache_status(&first), "balancer; fwd=uri-miss; stored");
    let second = get(&c, &b.url("/a")).await;
    assert_eq!(second.body, "hello n=1");
    assert_eq!(cache_status(&second), "balancer; hit");
    assert!(second.headers.contains_key("age"), "a hit carries Age");
    assert_eq!(o.count("/a"), 1);
    // The query is part of the key.
    let other = get(&c, &b.url("/a?v=2")).await;
    assert_eq!(cache_status(&other), "balancer; fwd=uri-miss; stored");
    assert_eq!(o.count("/a?v=2"), 1);
    assert_eq!(metric(&b, "balancer_cache_hits_total").await, 1.0);
    assert_eq!(metric(&b, "balancer_cache_misses_total").await, 2.0);
    assert_eq!(metric(&b, "balancer_cache_stores_total").await, 2.0);
    assert!(metric(&b, "balancer_cache_bytes").await > 0.0);
    let st = status(&b).await;
    assert_eq!(st["cache"]["entries"], 2, "{st}");
    b.shutdown().await;
}

#[tokio::test]
async fn responses_that_must_not_be_stored_never_are() {
    let (o, b, c) = setup(SMALL).await;
    let mut cookie = spec("max-age=60");
    cookie.headers.push(("set-cookie", "s=1".into()));
    let mut vary_star = spec("max-age=60");
    vary_star.headers.push(("vary", "*".into()));
    let mut redirect = spec("max-age=60");
    redirect.status = 302;
    redirect.headers.push(("location", "/x".into()));
    let mut none = spec("max-age=60");
    none.headers.clear();
    type Case<'a> = (&'a str, Spec, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case> = vec![
        ("/no-store", spec("no-store, max-age=60"), &[], "no-store"),
        ("/private", spec("private, max-age=60"), &[], "private"),
        ("/cookie", cookie, &[], "set-cookie"),
        ("/vary-star", vary_star, &[], "vary-star"),
        ("/redirect", redirect, &[], "status"),
        ("/heuristic", none, &[], "no-explicit-freshness"),
        ("/public-only", spec("public"), &[], "no-explicit-freshness"),
        (
            "/auth",
            spec("max-age=60"),
            &[("authorization", "Bearer t")],
            "authorization",
        ),
        (
            "/asked-no-store",
            spec("max-age=60"),
            &[("cache-control", "no-store")],
            "",
        ),
    ];
    for (path, s, req, detail) in cases {
        o.set(path, s);
        for _ in 0..2 {
            let g = get_with(&c, &b.url(path), req).await;
            let cs = cache_status(&g);
            if detail.is_empty() {
                assert_eq!(cs, "balancer; fwd=bypass", "{path}");
            } else {
                assert_eq!(
                    cs,
                    format!("balancer; fwd=uri-miss; detail={detail}"),
                    "{path}"
                );
            }
        }
        assert_eq!(o.count(path), 2, "{path} must reach the backend every time");
    }
    // Authorization is fine when the response says so.
    o.set("/auth-public", spec("public, max-age=60"));
    for _ in 0..2 {
        get_with(&c, &b.url("/auth-public"), &[("authorization", "Bearer t")]).await;
    }
    assert_eq!(o.count("/auth-public"), 1);
    // The balancer's own answers are never stored: a dead path is a 404 from the origin
    // (not cacheable without freshness), and a 503 of the balancer's stays uncached.
    o.state.failing.store(true, SeqCst);
    let g = get(&c, &b.url("/fails")).await;
    assert_eq!(g.status, 503);
    assert_eq!(metric(&b, "balancer_cache_stores_total").await, 1.0);
    b.shutdown().await;
}

#[tokio::test]
async fn vary_keeps_one_copy_per_accept_encoding() {
    let (o, b, c) = setup(SMALL).await;
    let mut s = spec("max-age=60");
    s.headers.push(("vary", "Accept-Encoding".into()));
    s.echo = Some("accept-encoding");
    o.set("/v", s);
    let gz = [("accept-encoding", "gzip")];
    let br = [("accept-encoding", "br")];
    assert_eq!(
        get_with(&c, &b.url("/v"), &gz).await.body,
        "hello n=1 accept-encoding=gzip"
    );
    let g = get_with(&c, &b.url("/v"), &gz).await;
    assert_eq!(
        (g.body.as_str(), cache_status(&g).as_str()),
        ("hello n=1 accept-encoding=gzip", "balancer; hit")
    );
    let g = get_with(&c, &b.url("/v"), &br).await;
    assert_eq!(g.body, "hello n=2 accept-encoding=br");
    assert_eq!(cache_status(&g), "balancer; fwd=vary-miss; stored");
    let g = get_with(&c, &b.url("/v"), &br).await;
    assert_eq!(
        (g.body.as_str(), cache_status(&g).as_str()),
        ("hello n=2 accept-encoding=br", "balancer; hit")
    );
    let g = get_with(&c, &b.url("/v"), &gz).await;
    assert_eq!(
        g.body, "hello n=1 accept-encoding=gzip",
        "both variants stay stored"
    );
    assert_eq!(o.count("/v"), 2);
    b.shutdown().await;
}

#[tokio::test]
async fn a_stale_copy_is_revalidated_and_a_304_sends_the_stored_body() {
    let (o, b, c) = setup(SMALL).await;
    let mut s = spec("max-age=0");
    s.headers.push(("etag", "\"v1\"".into()));
    s.conditional = true;
    o.set("/r", s);
    let first = get(&c, &b.url("/r")).await;
    assert_eq!(cache_status(&first), "balancer; fwd=uri-miss; stored");
    let again = get(&c, &b.url("/r")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, "hello n=1", "the stored body, not a new one");
    assert_eq!(cache_status(&again), "balancer; fwd=stale; fwd-status=304");
    assert_eq!(o.last_seen("/r")["if-none-match"], "\"v1\"");
    assert_eq!(o.count("/r"), 2);
    assert_eq!(metric(&b, "balancer_cache_revalidated_total").await, 1.0);
    b.shutdown().await;
}

#[tokio::test]
async fn client_conditionals_get_304_and_no_cache_forces_revalidation() {
    let (o, b, c) = setup(SMALL).await;
    let mut s = spec("max-age=60");
    s.headers.push(("etag", "\"v1\"".into()));
    s.headers
        .push(("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT".into()));
    s.conditional = true;
    o.set("/c", s);
    get(&c, &b.url("/c")).await;
    let g = get_with(&c, &b.url("/c"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(g.status, 304);
    assert_eq!(g.body, "");
    assert_eq!(g.headers["etag"], "\"v1\"");
    let g = get_with(
        &c,
        &b.url("/c"),
        &[("if-modified-since", "Wed, 21 Oct 2015 07:28:00 GMT")],
    )
    .await;
    assert_eq!(g.status, 304);
    let g = get_with(&c, &b.url("/c"), &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    assert_eq!(o.count("/c"), 1);
    // no-cache: the fresh copy is not used without asking the backend.
    let g = get_with(&c, &b.url("/c"), &[("cache-control", "no-cache")]).await;
    assert_eq!(o.count("/c"), 2);
    assert_eq!(o.last_seen("/c")["if-none-match"], "\"v1\"");
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    assert_eq!(cache_status(&g), "balancer; fwd=request; fwd-status=304");
    // Nothing stored yet: the client's own conditional reaches the origin, whose 304 passes
    // through (and is not stored).
    let mut s = spec("max-age=60");
    s.headers.push(("etag", "\"w1\"".into()));
    s.conditional = true;
    o.set("/cold-conditional", s);
    let g = get_with(
        &c,
        &b.url("/cold-conditional"),
        &[("if-none-match", "\"w1\"")],
    )
    .await;
    assert_eq!(g.status, 304);
    assert_eq!(cache_status(&g), "balancer; fwd=uri-miss; detail=status");
    let g = get(&c, &b.url("/cold-conditional")).await;
    assert_eq!(cache_status(&g), "balancer; fwd=uri-miss; stored");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_requests_send_one_to_the_backend() {
    let (o, b, _) = setup(SMALL).await;
    o.set("/cold", spec("max-age=60"));
    // Long enough that every request arrives while the first is still at the backend.
    o.state.delay_ms.store(500, SeqCst);
    let c = h2_client();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let c = c.clone();
        let url = b.url("/cold");
        tasks.push(tokio::spawn(async move { get(&c, &url).await }));
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    }
    assert_eq!(o.count("/cold"), 1, "one backend request for 1000 clients");
    b.shutdown().await;
}

#[tokio::test]
async fn an_uncacheable_leader_lets_its_waiters_go_to_the_backend() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/u", spec("no-store"));
    o.state.delay_ms.store(200, SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let c = c.clone();
        let url = b.url("/u");
        tasks.push(tokio::spawn(async move { get(&c, &url).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(o.count("/u"), 5);
    b.shutdown().await;
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/swr", spec("max-age=0, stale-while-revalidate=60"));
    assert_eq!(get(&c, &b.url("/swr")).await.body, "hello n=1");
    // The refresh takes a while (longer than the ten requests, however loaded the machine);
    // every request meanwhile gets the stale copy at once.
    o.state.delay_ms.store(2000, SeqCst);
    for _ in 0..10 {
        let g = get(&c, &b.url("/swr")).await;
        assert_eq!(g.body, "hello n=1");
        assert_eq!(
            cache_status(&g),
            "balancer; hit; detail=stale-while-revalidate"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || async { o.count("/swr") == 2 }).await,
        "one background refresh"
    );
    // The lookup runs before the upstream rewrite: the refresh applies it to its own copy,
    // so the backend sees what any forwarded request carries.
    let seen = o.last_seen("/swr");
    assert_eq!(seen.get("x-forwarded-for").unwrap(), "127.0.0.1");
    assert_eq!(seen.get("x-forwarded-proto").unwrap(), "http");
    assert!(seen.contains_key("x-request-id"), "{seen:?}");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            get(&c, &b.url("/swr")).await.body == "hello n=2"
        })
        .await,
        "the refreshed copy is served next"
    );
    assert!(metric(&b, "balancer_cache_stale_total").await >= 10.0);
    b.shutdown().await;
}

#[tokio::test]
async fn stale_if_error_answers_when_every_backend_is_gone() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/sie", spec("max-age=0, stale-if-error=600"));
    let mut strict = spec("max-age=0, must-revalidate");
    strict.headers.push(("etag", "\"s\"".into()));
    o.set("/strict", strict);
    assert_eq!(get(&c, &b.url("/sie")).await.body, "hello n=1");
    get(&c, &b.url("/strict")).await;
    // A 5xx from the backend.
    o.state.failing.store(true, SeqCst);
    let g = get(&c, &b.url("/sie")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    assert_eq!(cache_status(&g), "balancer; hit; detail=stale-if-error");
    // No backend at all: connection refused.
    o.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let g = get(&c, &b.url("/sie")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    assert_eq!(cache_status(&g), "balancer; hit; detail=stale-if-error");
    // must-revalidate forbids it.
    assert_eq!(get(&c, &b.url("/strict")).await.status, 502);
    assert!(metric(&b, "balancer_cache_stale_total").await >= 2.0);
    b.shutdown().await;
}

#[tokio::test]
async fn the_configured_stale_if_error_covers_responses_that_say_nothing() {
    let cache =
        "[cache]\nmax_size = \"4MiB\"\nmax_object_size = \"64KiB\"\nstale_if_error = \"10m\"\n";
    let (o, b, c) = setup(cache).await;
    o.set("/d", spec("max-age=0"));
    get(&c, &b.url("/d")).await;
    o.state.failing.store(true, SeqCst);
    let g = get(&c, &b.url("/d")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    b.shutdown().await;
    // Without the default, the failure shows.
    let (o, b, c) = setup(SMALL).await;
    o.set("/d", spec("max-age=0"));
    get(&c, &b.url("/d")).await;
    o.state.failing.store(true, SeqCst);
    assert_eq!(get(&c, &b.url("/d")).await.status, 503);
    b.shutdown().await;
}

#[tokio::test]
async fn purge_drops_a_prefix_through_the_admin_api() {
    let (o, b, c) = setup(SMALL).await;
    for p in ["/static/a.js", "/static/b.css", "/api/c"] {
        o.set(p, spec("max-age=60"));
        get(&c, &b.url(p)).await;
    }
    let r = post(
        &c,
        &b.admin_url("/cache/purge"),
        r#"{"prefix": "/static/"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap(),
        serde_json::json!({"purged": 2})
    );
    assert_eq!(
        cache_status(&get(&c, &b.url("/static/a.js")).await),
        "balancer; fwd=uri-miss; stored"
    );
    assert_eq!(
        cache_status(&get(&c, &b.url("/api/c")).await),
        "balancer; hit"
    );
    // Another host purges nothing; a bad body is a 400.
    let r = post(
        &c,
        &b.admin_url("/cache/purge"),
        r#"{"prefix": "/", "host": "elsewhere.example"}"#,
    )
    .await;
    assert_eq!(r.body, r#"{"purged":0}"#);
    let r = post(&c, &b.admin_url("/cache/purge"), r#"{"prefix": "static"}"#).await;
    assert_eq!(r.status, 400);
    let r = post(
        &c,
        &b.admin_url("/cache/purge"),
        r#"{"prefix": "/", "host": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(r.body, r#"{"purged":2}"#);
    b.shutdown().await;
}

#[tokio::test]
async fn purge_needs_the_admin_token() {
    let o = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token-for-tests-0123456789").unwrap();
    let cfg = config(o.addr, SMALL).replace(
        "[admin]\nbind = \"{admin}\"",
        &format!(
            "[admin]\nbind = \"{{admin}}\"\ntoken_file = \"{}\"",
            token.display()
        ),
    );
    let b = start_balancer(&cfg).await;
    let c = client();
    let body = r#"{"prefix": "/"}"#;
    let url = b.admin_url("/cache/purge");
    assert_eq!(
        request_with_token(&c, Method::POST, &url, body, None)
            .await
            .status,
        401
    );
    let ok = request_with_token(
        &c,
        Method::POST,
        &url,
        body,
        Some("s3cret-token-for-tests-0123456789"),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    b.shutdown().await;
}

#[tokio::test]
async fn a_successful_unsafe_request_invalidates_its_target() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/doc", spec("max-age=60"));
    get(&c, &b.url("/doc")).await;
    assert_eq!(
        cache_status(&get(&c, &b.url("/doc")).await),
        "balancer; hit"
    );
    let p = post(&c, &b.url("/doc"), "update").await;
    assert_eq!(cache_status(&p), "balancer; fwd=method");
    let g = get(&c, &b.url("/doc")).await;
    assert_eq!(cache_status(&g), "balancer; fwd=uri-miss; stored");
    assert_eq!(g.body, "hello n=3");
    b.shutdown().await;
}

#[tokio::test]
async fn an_unsafe_request_also_invalidates_its_same_host_location() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/items/7", spec("max-age=60"));
    let mut created = spec("no-store");
    created.headers.push(("location", "/items/7".into()));
    o.set("/items", created);
    get(&c, &b.url("/items/7")).await;
    assert_eq!(
        cache_status(&get(&c, &b.url("/items/7")).await),
        "balancer; hit"
    );
    post(&c, &b.url("/items"), "new").await;
    let g = get(&c, &b.url("/items/7")).await;
    assert_eq!(cache_status(&g), "balancer; fwd=uri-miss; stored");
    b.shutdown().await;
}

#[tokio::test]
async fn stale_if_error_covers_every_breaker_open() {
    let o = Origin::start().await;
    let cfg = config(o.addr, SMALL)
        + "[pools.web.circuit_breaker]\nconsecutive_failures = 1\nmax_ejected_percent = 100\n";
    let b = start_balancer(&cfg).await;
    let c = client();
    o.set("/open", spec("max-age=0, stale-if-error=60"));
    get(&c, &b.url("/open")).await;
    o.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..3 {
        let g = get(&c, &b.url("/open")).await;
        assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    }
    let st = status(&b).await;
    assert_eq!(st["pools"]["web"]["backends"][0]["breaker"], "open", "{st}");
    // Without a stored copy the pool's state shows.
    assert_eq!(get(&c, &b.url("/other")).await.status, 503);
    b.shutdown().await;
}

#[tokio::test]
async fn stale_if_error_covers_a_backend_that_times_out() {
    let o = Origin::start().await;
    let cfg = config(o.addr, SMALL).replace("response = \"5s\"", "response = \"300ms\"");
    let b = start_balancer(&cfg).await;
    let c = client();
    o.set("/slow", spec("max-age=0, stale-if-error=60"));
    get(&c, &b.url("/slow")).await;
    o.state.delay_ms.store(2000, SeqCst);
    let g = get(&c, &b.url("/slow")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "hello n=1"));
    assert_eq!(cache_status(&g), "balancer; hit; detail=stale-if-error");
    b.shutdown().await;
}

#[tokio::test]
async fn a_head_is_answered_from_a_stored_get() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/h", spec("max-age=60"));
    let g = get(&c, &b.url("/h")).await;
    let head = send(
        &c,
        Request::head(b.url("/h")).body(full(Bytes::new())).unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
    assert_eq!(cache_status(&head), "balancer; hit");
    assert_eq!(head.headers["content-length"], g.body.len().to_string());
    assert_eq!(o.count("/h"), 1);
    // Stored from a chunked body, the copy still has its length.
    let mut chunked = spec("max-age=60");
    chunked.big = 16384;
    chunked.chunked = true;
    o.set("/hc", chunked);
    assert_eq!(get(&c, &b.url("/hc")).await.body.len(), 16384);
    let head = send(
        &c,
        Request::head(b.url("/hc"))
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (cache_status(&head).as_str(), head.body.as_str()),
        ("balancer; hit", "")
    );
    assert_eq!(head.headers["content-length"], "16384");
    b.shutdown().await;
}

#[tokio::test]
async fn a_large_response_streams_through_and_is_not_stored() {
    let (o, b, c) = setup(SMALL).await;
    let big = 256 * 1024;
    let mut s = spec("max-age=60");
    s.big = big;
    o.set("/big", s.clone());
    s.chunked = true;
    o.set("/big-chunked", s);
    for path in ["/big", "/big-chunked"] {
        for _ in 0..2 {
            let g = get(&c, &b.url(path)).await;
            assert_eq!(g.body.len(), big, "{path}");
        }
        assert_eq!(o.count(path), 2, "{path} is never answered from the cache");
    }
    let g = get(&c, &b.url("/big")).await;
    assert_eq!(cache_status(&g), "balancer; fwd=uri-miss; detail=too-large");
    assert_eq!(metric(&b, "balancer_cache_stores_total").await, 0.0);
    b.shutdown().await;
}

#[tokio::test]
async fn a_miss_streams_to_the_client_while_it_is_stored() {
    let (o, b, c) = setup(SMALL).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let mut s = spec("max-age=60");
    s.gate = Some(Arc::clone(&gate));
    o.set("/stream", s);
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        c.request(
            Request::get(b.url("/stream"))
                .body(full(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        resp.headers()["cache-status"],
        "balancer; fwd=uri-miss; stored"
    );
    let mut body = resp.into_body();
    // The first chunk arrives while the backend still holds the rest: nothing waits for the
    // whole body to be stored.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first chunk is relayed at once")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first ");
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
    let g = get(&c, &b.url("/stream")).await;
    assert_eq!(
        (g.body.as_str(), cache_status(&g).as_str()),
        ("first second", "balancer; hit")
    );
    assert_eq!(o.count("/stream"), 1);
    b.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_the_cache_unless_its_size_changes() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/k", spec("max-age=60"));
    get(&c, &b.url("/k")).await;
    // Same sizes, another default: kept.
    b.write_config(&config(
        o.addr,
        &format!("{SMALL}stale_if_error = \"5s\"\n"),
    ));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    assert_eq!(cache_status(&get(&c, &b.url("/k")).await), "balancer; hit");
    // Another size: a new, empty cache.
    b.write_config(&config(
        o.addr,
        "[cache]\nmax_size = \"8MiB\"\nmax_object_size = \"64KiB\"\n",
    ));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    assert_eq!(
        cache_status(&get(&c, &b.url("/k")).await),
        "balancer; fwd=uri-miss; stored"
    );
    // No [cache]: nothing cached, no Cache-Status.
    b.write_config(&config(o.addr, "").replace("cache = true\n", ""));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    let g = get(&c, &b.url("/k")).await;
    assert!(!g.headers.contains_key("cache-status"));
    assert_eq!(o.count("/k"), 3);
    assert!(status(&b).await["cache"].is_null());
    b.shutdown().await;
}

#[tokio::test]
async fn metrics_pass_promtool() {
    let (o, b, c) = setup(SMALL).await;
    o.set("/m", spec("max-age=60"));
    get(&c, &b.url("/m")).await;
    get(&c, &b.url("/m")).await;
    let text = get(&c, &b.admin_url("/metrics")).await.body;
    for family in [
        "balancer_cache_hits_total",
        "balancer_cache_misses_total",
        "balancer_cache_stale_total",
        "balancer_cache_stores_total",
        "balancer_cache_evictions_total",
        "balancer_cache_bytes",
        "balancer_cache_entries",
    ] {
        assert!(
            text.contains(&format!("# HELP {family}")),
            "{family} missing:\n{text}"
        );
    }
    let (ok, said) = promtool_check(&text);
    assert!(ok, "promtool: {said}\n{text}");
    b.shutdown().await;
}

/// Ten times `max_size` of distinct cacheable responses through a small cache: the bytes in
/// use never pass `max_size`, and the process stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_by_max_size() {
    let o = Origin::start().await;
    let max = 4u64 << 20;
    let cache = "[cache]\nmax_size = \"4MiB\"\nmax_object_size = \"256KiB\"\n";
    let bin = start_binary(&config(o.addr, cache), std::process::Stdio::null());
    let c = client();
    let object = 100 * 1024;
    let total = 10 * max as usize;
    let count = total / object;
    let mut s = spec("max-age=600");
    s.big = object;
    let base_rss = bin.rss_kib();
    let mut peak_bytes = 0.0f64;
    let mut peak_rss = 0u64;
    for i in 0..count {
        let path = format!("/obj/{i}");
        o.set(&path, s.clone());
        let g = get(&c, &format!("http://{}{path}", bin.addr)).await;
        assert_eq!(g.body.len(), object);
        if i % 20 == 19 {
            let text = get(&c, &format!("http://{}/metrics", bin.admin)).await.body;
            let bytes = parse_metrics(&text)
                .into_iter()
                .find(|(n, _, _)| n == "balancer_cache_bytes")
                .map(|(_, _, v)| v)
                .unwrap();
            assert!(
                bytes <= max as f64,
                "cache bytes {bytes} above max_size {max}"
            );
            peak_bytes = peak_bytes.max(bytes);
            peak_rss = peak_rss.max(bin.rss_kib());
        }
    }
    let text = get(&c, &format!("http://{}/metrics", bin.admin)).await.body;
    let evictions: f64 = parse_metrics(&text)
        .into_iter()
        .find(|(n, _, _)| n == "balancer_cache_evictions_total")
        .map(|(_, _, v)| v)
        .unwrap();
    eprintln!(
        "memory: {count} responses of {object} B ({} MiB) through max_size 4 MiB: peak cache \
         bytes {peak_bytes}, evictions {evictions}, RSS {base_rss} KiB at start, peak {peak_rss} KiB",
        total >> 20
    );
    assert!(evictions > 0.0);
    // The cache may hold 4 MiB; allocator slack and hyper's buffers come on top. Far below
    // the 40 MiB that went through.
    assert!(
        peak_rss < base_rss + 24 * 1024,
        "RSS grew from {base_rss} KiB to {peak_rss} KiB"
    );
    drop(bin);
}

/// Runs `promtool check metrics` on `text` (as tests/admin.rs does).
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            panic!("cannot run promtool ({e}): install it (Debian: `apt-get install prometheus`)")
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_says_what_the_cache_did() {
    let o = Origin::start().await;
    o.set("/l", spec("max-age=60"));
    o.set("/s", spec("max-age=0, stale-if-error=60"));
    let cfg = config(o.addr, SMALL).replace("access = false", "access = true");
    let mut bin = start_binary(&cfg, std::process::Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let c = client();
    let url = |p: &str| format!("http://{}{p}", bin.addr);
    get(&c, &url("/l")).await;
    assert_eq!(log.line_for("/l")["cache"], "miss");
    get(&c, &url("/l")).await;
    assert_eq!(log.line_for("/l")["cache"], "hit");
    post(&c, &url("/l"), "x").await;
    assert_eq!(log.line_for("/l")["cache"], "bypass");
    get(&c, &url("/s")).await;
    assert_eq!(log.line_for("/s")["cache"], "miss");
    o.state.failing.store(true, SeqCst);
    let g = get(&c, &url("/s")).await;
    assert_eq!(g.status, 200);
    let line = log.line_for("/s");
    assert_eq!(
        (line["cache"].as_str(), line["status"].as_u64()),
        (Some("stale"), Some(200))
    );
}

#[test]
fn check_names_a_cached_route_without_a_cache_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    let text =
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[[routes]]\npool = \"web\"\ncache = true\n\n\
                [pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(":6:9: routes[0].cache: cache = true needs a [cache] table"),
        "{err}"
    );
    std::fs::write(&path, format!("{text}[cache]\nmax_size = \"16MiB\"\n")).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
