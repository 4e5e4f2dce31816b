//! Upstream connections: keep-alive reuse, connect and response timeouts, retries (which
//! requests may be sent twice), stale pooled connections, and closing idle ones.
mod common;
use common::raw_http::RawConn;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ------------------------------------------------------------------------------------------
// Helpers

async fn within<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("no answer within {limit:?}"))
}

const T: Duration = Duration::from_secs(10);

/// A backend address whose connects hang: a listener with a backlog of 0 that never accepts,
/// its accept queue filled by us, so the kernel drops further SYNs.
struct Blackhole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<std::net::TcpStream>,
}

fn blackhole() -> Blackhole {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    sock.bind(&any.into()).unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fill.push(s),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: sock,
                    _fill: fill,
                }
            }
        }
    }
    panic!("could not fill the accept queue of {addr}");
}

/// How a `RawBackend` treats the connections it accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Raw {
    /// Answers every request, keeps the connection open.
    KeepAlive,
    /// Answers the first request on a connection (keep-alive), then closes the connection when
    /// the next one arrives, having read it (FIN): a keep-alive close that raced the request.
    SecondRequestFin,
    /// Same, but resets the connection without reading the request (RST), as a backend does
    /// whose idle timer fired as the request came in.
    SecondRequestRst,
}

/// A hand-written HTTP/1.1 backend that counts connections opened, open and requests served.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicI64>,
    served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
        if buf.len() > 1 << 20 {
            return false;
        }
    }
    true
}

async fn start_raw(mode: Raw) -> RawBackend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicI64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let (acc, op, sv) = (accepted.clone(), open.clone(), served.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            acc.fetch_add(1, SeqCst);
            op.fetch_add(1, SeqCst);
            let (op, sv) = (op.clone(), sv.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    if n >= 1 && mode == Raw::SecondRequestRst {
                        // Wait for the next request's bytes, then reset without reading them.
                        if s.readable().await.is_ok() {
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        }
                        break;
                    }
                    if !read_head(&mut s).await {
                        break;
                    }
                    if n >= 1 && mode == Raw::SecondRequestFin {
                        break;
                    }
                    n += 1;
                    sv.fetch_add(1, SeqCst);
                    let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
                    if s.write_all(resp).await.is_err() {
                        break;
                    }
                }
                drop(s);
                op.fetch_sub(1, SeqCst);
            });
        }
    });
    RawBackend {
        addr,
        accepted,
        open,
        served,
        task,
    }
}

// ------------------------------------------------------------------------------------------
// Keep-alive reuse

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();
    for i in 0..100 {
        let g = within(T, get(&c, &bal.url(&format!("/n/{i}")))).await;
        assert_eq!(g.status, 200, "request {i}: {}", g.body);
        assert_eq!(g.body, "a");
    }
    assert_eq!(a.requests(), 100);
    assert!(
        a.connections() <= 2,
        "100 sequential requests opened {} backend connections",
        a.connections()
    );
    let s = status(&bal).await;
    let e = entry(&s, a.addr);
    assert_eq!(e["connections_opened"], a.connections(), "{s}");
    assert_eq!(e["requests"], 100, "{s}");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Connect timeout / refused

#[tokio::test]
async fn connect_timeout_moves_on_to_the_next_backend() {
    let bh = blackhole();
    let b = start_backend("b").await;
    let extra = "[pools.web.timeouts]\nconnect = \"300ms\"\n";
    let bal = start_balancer(&config(&[bh.addr, b.addr], "round_robin", extra)).await;
    let c = client();
    // Round-robin starts with the black hole.
    let t0 = Instant::now();
    let g = within(T, get(&c, &bal.url("/"))).await;
    let took = t0.elapsed();
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body, "b");
    assert!(
        took >= Duration::from_millis(250),
        "the black hole was not tried ({took:?})"
    );
    assert!(
        took < Duration::from_secs(5),
        "connect timeout not applied ({took:?})"
    );
    let s = status(&bal).await;
    assert_eq!(entry(&s, bh.addr)["failures"], 1, "{s}");
    assert_eq!(
        entry(&s, bh.addr)["last_error"]["reason"],
        "connect_timeout",
        "{s}"
    );
    assert_eq!(b.requests(), 1);
    bal.shutdown().await;
}

#[tokio::test]
async fn connect_timeout_with_no_other_backend_is_502() {
    // The contract: `connect` -> try another backend, else 502.
    let bh = blackhole();
    let extra = "[pools.web.timeouts]\nconnect = \"300ms\"\n";
    let bal = start_balancer(&config(&[bh.addr], "round_robin", extra)).await;
    let t0 = Instant::now();
    let g = within(T, get(&client(), &bal.url("/"))).await;
    assert_eq!(g.status, 502, "{}", g.body);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    bal.shutdown().await;
}

#[tokio::test]
async fn refused_connect_moves_on_and_alone_is_502() {
    let dead = free_port();
    let b = start_backend("b").await;
    let bal = start_balancer(&config(&[dead, b.addr], "round_robin", "")).await;
    let c = client();
    for _ in 0..4 {
        let g = within(T, get(&c, &bal.url("/"))).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.body, "b");
    }
    bal.shutdown().await;

    let only = start_balancer(&config(&[dead], "round_robin", "")).await;
    let g = within(T, get(&client(), &only.url("/"))).await;
    assert_eq!(g.status, 502, "{}", g.body);
    only.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Response timeout

#[tokio::test]
async fn response_timeout_is_504_in_about_the_configured_time() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Hang);
    let extra = "[pools.web.timeouts]\nresponse = \"500ms\"\n[pools.web.retries]\nattempts = 1\n";
    let bal = start_balancer(&config(&[a.addr], "round_robin", extra)).await;
    let t0 = Instant::now();
    let g = within(T, get(&client(), &bal.url("/"))).await;
    let took = t0.elapsed();
    assert_eq!(g.status, 504, "{}", g.body);
    assert!(
        took >= Duration::from_millis(450),
        "504 before the timeout ({took:?})"
    );
    assert!(took < Duration::from_secs(3), "504 far too late ({took:?})");
    assert_eq!(a.requests(), 1);
    bal.shutdown().await;
}

#[tokio::test]
async fn response_timeout_of_a_get_is_retried_elsewhere() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Hang);
    let extra = "[pools.web.timeouts]\nresponse = \"300ms\"\n";
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", extra)).await;
    let g = within(T, get(&client(), &bal.url("/"))).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body, "b");
    assert_eq!((a.requests(), b.requests()), (1, 1));
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Retries

#[tokio::test]
async fn get_is_retried_after_the_backend_closed() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Close);
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;
    let c = client();
    for i in 0..4u64 {
        let g = within(T, get(&c, &bal.url("/"))).await;
        assert_eq!(g.status, 200, "request {i}: {}", g.body);
        assert_eq!(g.body, "b");
    }
    // Round-robin sent the first request to `a` (and a retry never goes back to it).
    assert!(a.requests() >= 1);
    assert_eq!(b.requests(), 4);
    bal.shutdown().await;
}

/// The last request `b` answered: its `Host` and `x-mine` headers.
fn seen(b: &TestBackend) -> (Option<String>, Option<String>) {
    let h = b
        .state
        .last_headers
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_default();
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    (get("host"), get("x-mine"))
}

/// A retried GET is sent again as the client sent it, without a copy kept beforehand: the
/// head comes back with the failure. The Host the first backend was given for a request that
/// had none must not follow it to the next one.
#[tokio::test]
async fn a_retried_get_carries_the_clients_head_to_the_next_backend() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Close);
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;
    // Round-robin starts with `a`, which closes: the GET goes on to `b`.
    let mut conn = RawConn::connect(bal.addr).await;
    let r = within(
        T,
        conn.exchange(b"GET /x HTTP/1.1\r\nhost: app.example\r\nx-mine: 1\r\n\r\n"),
    )
    .await;
    assert_eq!((r.status, r.body_str().as_str()), (200, "b"));
    assert_eq!(a.requests(), 1, "the first attempt did not go to `a`");
    assert_eq!(seen(&b), (Some("app.example".into()), Some("1".into())));
    // HTTP/1.0 without Host: whichever backend answers is sent its own address.
    let before = a.requests();
    for i in 0..4 {
        let mut conn = RawConn::connect(bal.addr).await;
        let r = within(T, conn.exchange(b"GET /y HTTP/1.0\r\nx-mine: 2\r\n\r\n")).await;
        assert_eq!((r.status, r.body_str().as_str()), (200, "b"), "request {i}");
        assert_eq!(seen(&b), (Some(b.addr.to_string()), Some("2".into())));
        if a.requests() > before {
            bal.shutdown().await;
            return;
        }
    }
    panic!("no HTTP/1.0 request was tried on `a` first");
}

#[tokio::test]
async fn post_that_reached_a_backend_is_not_resent() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Close);
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;
    let g = within(T, post(&client(), &bal.url("/echo"), "order #1")).await;
    assert_eq!(g.status, 502, "{}", g.body);
    assert_eq!(a.requests(), 1, "the POST reached a exactly once");
    assert_eq!(b.requests(), 0, "the POST was sent a second time");
    bal.shutdown().await;
}

#[tokio::test]
async fn post_that_never_reached_a_backend_is_retried() {
    let dead = free_port();
    let b = start_backend("b").await;
    let bal = start_balancer(&config(&[dead, b.addr], "round_robin", "")).await;
    let c = client();
    // Round-robin: the first POST goes to the refusing backend first.
    for i in 0..2 {
        let body = format!("payload {i} {}", "z".repeat(10_000));
        let g = within(T, post(&c, &bal.url("/echo"), body.clone())).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.headers["x-backend"], "b");
        assert_eq!(g.body, body, "the retried POST lost its body");
    }
    assert_eq!(b.requests(), 2);
    let s = status(&bal).await;
    assert!(entry(&s, dead)["failures"].as_u64().unwrap() >= 1, "{s}");
    bal.shutdown().await;
}

#[tokio::test]
async fn one_attempt_means_no_retry() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Close);
    let extra = "[pools.web.retries]\nattempts = 1\n";
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", extra)).await;
    let g = within(T, get(&client(), &bal.url("/"))).await;
    assert_eq!(g.status, 502, "{}", g.body);
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 0, "attempts = 1 still retried");

    // Not even a connect failure is tried elsewhere with one attempt.
    let dead = free_port();
    let bal2 = start_balancer(&config(&[dead, b.addr], "round_robin", extra)).await;
    let g = within(T, get(&client(), &bal2.url("/"))).await;
    assert_eq!(g.status, 502, "{}", g.body);
    assert_eq!(b.requests(), 0);
    bal.shutdown().await;
    bal2.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Stale pooled connections

/// A pooled connection that the backend closes just as the balancer reuses it must not fail
/// the request, nor count against the backend: it is replayed once on a fresh connection.
async fn stale_connection_case(mode: Raw, extra: &str) {
    let raw = start_raw(mode).await;
    let bal = start_balancer(&config(&[raw.addr], "round_robin", extra)).await;
    let c = client();
    let g = within(T, get(&c, &bal.url("/one"))).await;
    assert_eq!(g.status, 200, "{mode:?}: {}", g.body);
    // The connection is back in the balancer's pool before the next request.
    wait_status(
        &bal,
        Duration::from_secs(5),
        "one idle upstream connection",
        |s| entry(s, raw.addr)["idle_connections"] == 1,
    )
    .await;
    let g = within(T, get(&c, &bal.url("/two"))).await;
    assert_eq!(
        g.status, 200,
        "{mode:?}: a stale pooled connection failed the request: {}",
        g.body
    );
    assert_eq!(
        raw.accepted.load(SeqCst),
        2,
        "{mode:?}: the pooled connection was not reused"
    );
    assert_eq!(raw.served.load(SeqCst), 2);
    let s = status(&bal).await;
    let e = entry(&s, raw.addr);
    assert_eq!(
        e["failures"], 0,
        "{mode:?}: a keep-alive race counted against the backend: {s}"
    );
    assert_eq!(e["breaker"], "closed", "{s}");
    // And it keeps working.
    let g = within(T, get(&c, &bal.url("/three"))).await;
    assert_eq!(g.status, 200, "{mode:?}");
    bal.shutdown().await;
}

#[tokio::test]
async fn stale_pooled_connection_closed_is_replayed() {
    stale_connection_case(Raw::SecondRequestFin, "").await;
}

#[tokio::test]
async fn stale_pooled_connection_reset_is_replayed() {
    stale_connection_case(Raw::SecondRequestRst, "").await;
}

#[tokio::test]
async fn stale_pooled_connection_is_replayed_even_with_one_attempt() {
    // The stale-connection replay is not a retry: `attempts = 1` must not turn a keep-alive
    // race into a 502.
    let extra = "[pools.web.retries]\nattempts = 1\n";
    stale_connection_case(Raw::SecondRequestFin, extra).await;
    stale_connection_case(Raw::SecondRequestRst, extra).await;
}

#[tokio::test]
async fn backend_restart_does_not_fail_the_next_request() {
    let mut a = start_backend("a").await;
    let extra = "[pools.web.retries]\nattempts = 1\n";
    let bal = start_balancer(&config(&[a.addr], "round_robin", extra)).await;
    let c = client();
    let g = within(T, get(&c, &bal.url("/"))).await;
    assert_eq!(g.status, 200);
    wait_status(
        &bal,
        Duration::from_secs(5),
        "one idle upstream connection",
        |s| entry(s, a.addr)["idle_connections"] == 1,
    )
    .await;
    // Stop closes every connection the backend has (our pooled one included).
    a.stop();
    let mut refused = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(a.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the backend did not stop listening");
    a.restart().await;
    for i in 0..3 {
        let g = within(T, get(&c, &bal.url("/"))).await;
        assert_eq!(
            g.status, 200,
            "request {i} after the backend restarted: {}",
            g.body
        );
    }
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Idle timeout

#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let raw = start_raw(Raw::KeepAlive).await;
    let extra = "[pools.web.timeouts]\nidle = \"300ms\"\n";
    let bal = start_balancer(&config(&[raw.addr], "round_robin", extra)).await;
    let c = client();
    let g = within(T, get(&c, &bal.url("/"))).await;
    assert_eq!(g.status, 200);
    assert_eq!(raw.open.load(SeqCst), 1);
    // Pooled first...
    wait_status(&bal, Duration::from_secs(5), "pooled", |s| {
        entry(s, raw.addr)["idle_connections"] == 1
    })
    .await;
    // ...then closed once idle for longer than 300 ms (the backend sees the close).
    let t0 = Instant::now();
    assert!(
        eventually(Duration::from_secs(4), || raw.open.load(SeqCst) == 0).await,
        "the idle upstream connection is still open after {:?}",
        t0.elapsed()
    );
    let s = status(&bal).await;
    assert_eq!(entry(&s, raw.addr)["idle_connections"], 0, "{s}");
    // The next request simply opens a new one.
    let g = within(T, get(&c, &bal.url("/"))).await;
    assert_eq!(g.status, 200);
    assert_eq!(raw.accepted.load(SeqCst), 2);
    bal.shutdown().await;
}

#[tokio::test]
async fn pooled_connections_stay_open_within_the_idle_timeout() {
    // The counterpart: with the default idle timeout, a pooled connection outlives a pause.
    let raw = start_raw(Raw::KeepAlive).await;
    let bal = start_balancer(&config(&[raw.addr], "round_robin", "")).await;
    let c = client();
    let g = within(T, get(&c, &bal.url("/"))).await;
    assert_eq!(g.status, 200);
    wait_status(&bal, Duration::from_secs(5), "pooled", |s| {
        entry(s, raw.addr)["idle_connections"] == 1
    })
    .await;
    // Long enough for the reaper to have run at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(raw.open.load(SeqCst), 1);
    let g = within(T, get(&c, &bal.url("/"))).await;
    assert_eq!(g.status, 200);
    assert_eq!(
        raw.accepted.load(SeqCst),
        1,
        "the pooled connection was not reused"
    );
    bal.shutdown().await;
}
