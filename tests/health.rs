//! Active health checks against real backends: thresholds counted probe by probe, what a
//! probe looks like on the wire, and what the request path does with unhealthy backends.

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn hc_config(backends: &[SocketAddr], hc: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!("[pools.web.health_check]\n{hc}\n"),
    )
}

fn probes(b: &TestBackend) -> u64 {
    b.state.health_probes.load(SeqCst)
}

/// What the request path sees (the backend's own flag), read without a round trip.
fn healthy(bal: &Balancer, b: &TestBackend) -> bool {
    bal.shared()
        .snapshot
        .load()
        .backend("web", &b.addr.to_string())
        .expect("backend in the snapshot")
        .is_healthy()
}

/// `healthy` as `/status` shows it.
async fn status_healthy(bal: &Balancer, b: &TestBackend) -> bool {
    let s = status(bal).await;
    status_backend(&s, "web", b.addr).expect("backend in /status")["healthy"]
        .as_bool()
        .expect("healthy is a bool")
}

/// Waits (polling every 2 ms, at most 5 s) for the next probe to reach `b`; its count.
async fn next_probe(b: &TestBackend) -> u64 {
    let start = probes(b);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while probes(b) == start {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health probe reached {} within 5s",
            b.state.name
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    probes(b)
}

/// Sends `n` requests; the bodies (backend names). Every answer must be 200.
async fn spread(bal: &Balancer, n: usize) -> Vec<String> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 200, "{}", g.body);
        out.push(g.body);
    }
    out
}

fn count(bodies: &[String], name: &str) -> usize {
    bodies.iter().filter(|b| *b == name).count()
}

/// Flips after exactly `unhealthy_threshold` failed probes and exactly `healthy_threshold`
/// passing ones, counted on the backend. The interval (200 ms) is long against the 2 ms
/// polling, so a flip is always seen before the next probe arrives.
#[tokio::test]
async fn thresholds_are_counted_probe_by_probe() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&hc_config(
        &[a.addr, b.addr],
        "path = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 3\nhealthy_threshold = 2",
    ))
    .await;

    // Let the checker settle into its rhythm; a backend starts healthy.
    next_probe(&a).await;
    next_probe(&a).await;
    assert!(healthy(&bal, &a));
    assert!(status_healthy(&bal, &a).await);

    // Flip just after a probe, so every probe counted from here on fails.
    next_probe(&a).await;
    a.set_health(false);
    let p0 = probes(&a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Health first: a flip is written after the probe that caused it was counted.
        let h = healthy(&bal, &a);
        let n = probes(&a) - p0;
        if !h {
            assert_eq!(n, 3, "marked unhealthy after {n} failed probes, want 3");
            break;
        }
        assert!(
            n <= 3,
            "still healthy after {n} failed probes (threshold 3)"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked unhealthy"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(!status_healthy(&bal, &a).await, "/status disagrees");
    assert!(healthy(&bal, &b), "the other backend is untouched");

    next_probe(&a).await;
    a.set_health(true);
    let q0 = probes(&a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = healthy(&bal, &a);
        let n = probes(&a) - q0;
        if h {
            assert_eq!(n, 2, "healthy again after {n} passing probes, want 2");
            break;
        }
        assert!(
            n <= 2,
            "still unhealthy after {n} passing probes (threshold 2)"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "never healthy again"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(status_healthy(&bal, &a).await);
    bal.shutdown().await;
}

/// A backend that records the head of every request it gets and answers 200 "ok".
async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&heads);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        h.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, heads)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn probes_identify_themselves_and_carry_host() {
    let (addr, heads) = recording_backend().await;
    let bal = start_balancer(&hc_config(
        &[addr],
        "path = \"/custom/health?deep=1\"\ninterval = \"100ms\"\ntimeout = \"1s\"",
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(5), || heads.lock().unwrap().len() >= 2).await,
        "no probes arrived"
    );
    let heads = heads.lock().unwrap().clone();
    for head in &heads {
        let line = head.lines().next().unwrap_or_default();
        assert_eq!(line, "GET /custom/health?deep=1 HTTP/1.1", "{head}");
        let ua = header(head, "user-agent").unwrap_or_else(|| panic!("no User-Agent:\n{head}"));
        assert!(
            ua.contains("balancer"),
            "User-Agent {ua:?} does not name the balancer"
        );
        let host = header(head, "host").unwrap_or_else(|| panic!("no Host:\n{head}"));
        assert!(!host.is_empty(), "empty Host header");
        assert!(
            host.contains(&addr.port().to_string()),
            "Host {host:?} is not the backend's address {addr}"
        );
    }
    bal.shutdown().await;
}

#[tokio::test]
async fn unhealthy_backend_gets_no_traffic_and_returns_when_healthy() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let c = start_backend("c").await;
    let bal = start_balancer(&hc_config(
        &[a.addr, b.addr, c.addr],
        "interval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2",
    ))
    .await;
    let all = spread(&bal, 30).await;
    assert_eq!(count(&all, "a"), 10, "{all:?}");

    a.set_health(false);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !status_healthy(&bal, &a).await
        })
        .await,
        "a never marked unhealthy"
    );
    let before = a.requests();
    let shifted = spread(&bal, 30).await;
    assert_eq!(a.requests(), before, "an unhealthy backend got traffic");
    assert_eq!(count(&shifted, "a"), 0, "{shifted:?}");
    // Both remaining backends share the load (how evenly is the strategy's business).
    assert!(count(&shifted, "b") >= 5, "{shifted:?}");
    assert!(count(&shifted, "c") >= 5, "{shifted:?}");

    a.set_health(true);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            status_healthy(&bal, &a).await
        })
        .await,
        "a never healthy again"
    );
    let back = spread(&bal, 30).await;
    assert_eq!(count(&back, "a"), 10, "{back:?}");
    bal.shutdown().await;
}

#[tokio::test]
async fn all_unhealthy_answers_503() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&hc_config(
        &[a.addr, b.addr],
        "interval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 1",
    ))
    .await;
    a.set_health(false);
    b.set_health(false);
    assert!(
        eventually(Duration::from_secs(5), || !healthy(&bal, &a)
            && !healthy(&bal, &b))
        .await,
        "backends never marked unhealthy"
    );
    let (ra, rb) = (a.requests(), b.requests());
    let c = client();
    for _ in 0..5 {
        let g = get(&c, &bal.url("/x")).await;
        assert_eq!(g.status, 503, "{}", g.body);
        assert!(g.body.contains("503"), "{:?}", g.body);
    }
    assert_eq!(
        (a.requests(), b.requests()),
        (ra, rb),
        "a request reached an unhealthy backend"
    );

    b.set_health(true);
    assert!(eventually(Duration::from_secs(5), || healthy(&bal, &b)).await);
    let g = get(&c, &bal.url("/x")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "b"));
    bal.shutdown().await;
}

/// A health endpoint that never answers fails by timeout: the probe reaches the backend (it is
/// counted there) and no answer comes. `/hc` is not the harness's `/healthz`, so `Mode::Hang`
/// holds the probe open.
#[tokio::test]
async fn hanging_health_endpoint_fails_by_timeout() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&hc_config(
        &[a.addr, b.addr],
        "path = \"/hc\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2",
    ))
    .await;
    // Probes to /hc land in the backend's request counter.
    assert!(eventually(Duration::from_secs(5), || a.requests() >= 2).await);
    assert!(healthy(&bal, &a), "a passing /hc made it unhealthy");

    a.set_mode(Mode::Hang);
    let hung_from = a.requests();
    let started = tokio::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !status_healthy(&bal, &a).await
        })
        .await,
        "a hanging health endpoint never made the backend unhealthy"
    );
    // Two probes had to reach the backend and time out (200 ms each) first.
    assert!(
        a.requests() >= hung_from + 2,
        "probes did not reach the hanging backend"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "unhealthy after {:?}, faster than two probe timeouts",
        started.elapsed()
    );
    assert!(healthy(&bal, &b));
    // Traffic avoids the hanging backend entirely.
    let bodies = spread(&bal, 6).await;
    assert_eq!(count(&bodies, "b"), 6, "{bodies:?}");

    a.set_mode(Mode::Ok);
    assert!(
        eventually(Duration::from_secs(5), || healthy(&bal, &a)).await,
        "a never healthy again"
    );
    bal.shutdown().await;
}

/// A backend that refuses connections fails its probes; traffic goes elsewhere without a
/// single error, and comes back once it listens again.
#[tokio::test]
async fn refusing_backend_is_marked_unhealthy() {
    let mut a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&hc_config(
        &[a.addr, b.addr],
        "interval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2",
    ))
    .await;
    next_probe(&a).await;
    a.stop();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            !status_healthy(&bal, &a).await
        })
        .await,
        "a refusing backend never marked unhealthy"
    );
    let bodies = spread(&bal, 10).await;
    assert_eq!(count(&bodies, "b"), 10, "{bodies:?}");

    a.restart().await;
    assert!(
        eventually(Duration::from_secs(5), || healthy(&bal, &a)).await,
        "a never healthy again after restart"
    );
    let bodies = spread(&bal, 10).await;
    assert_eq!(count(&bodies, "a"), 5, "{bodies:?}");
    bal.shutdown().await;
}

/// A backend whose health endpoint answers with a status the test sets.
async fn status_backend_server(code: Arc<std::sync::atomic::AtomicU16>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let code = Arc::clone(&code);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let c = code.load(SeqCst);
                        let resp = format!(
                            "HTTP/1.1 {c} X\r\nlocation: /elsewhere\r\ncontent-length: 2\r\n\r\nok"
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// 2xx and 3xx pass; 4xx and 5xx fail.
#[tokio::test]
async fn redirects_pass_and_errors_fail() {
    let code = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let addr = status_backend_server(Arc::clone(&code)).await;
    let bal = start_balancer(&hc_config(
        &[addr],
        "interval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 1",
    ))
    .await;
    let is_healthy = || {
        bal.shared()
            .snapshot
            .load()
            .backend("web", &addr.to_string())
            .unwrap()
            .is_healthy()
    };
    for (c, want) in [
        (404, false),
        (302, true),
        (500, false),
        (204, true),
        (503, false),
        (301, true),
    ] {
        code.store(c, SeqCst);
        assert!(
            eventually(Duration::from_secs(5), || is_healthy() == want).await,
            "health answer {c}: want healthy={want}"
        );
        // And it stays that way.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(is_healthy(), want, "health answer {c} flapped");
    }
    bal.shutdown().await;
}

/// Health state follows the backend through reloads: kept when the check changes, dropped
/// when the check goes, and a removed backend is no longer probed.
#[tokio::test]
async fn health_state_across_reloads() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let hc =
        "interval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2";
    let bal = start_balancer(&hc_config(&[a.addr, b.addr], hc)).await;
    a.set_health(false);
    assert!(eventually(Duration::from_secs(5), || !healthy(&bal, &a)).await);

    // Other check settings: the task restarts, the verdict stays.
    bal.write_config(&hc_config(&[a.addr, b.addr], &hc.replace("100ms", "150ms")));
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(2)
    );
    assert!(
        !healthy(&bal, &a),
        "a reload made an unhealthy backend healthy"
    );
    assert!(!status_healthy(&bal, &a).await);
    let before = a.requests();
    let bodies = spread(&bal, 6).await;
    assert_eq!(count(&bodies, "b"), 6, "{bodies:?}");
    assert_eq!(a.requests(), before);

    // No check any more: healthy at once, and in service.
    bal.write_config(&config(&[a.addr, b.addr], "round_robin", ""));
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(3)
    );
    assert!(
        status_healthy(&bal, &a).await,
        "without a health check a backend is healthy"
    );
    let bodies = spread(&bal, 6).await;
    assert_eq!(count(&bodies, "a"), 3, "{bodies:?}");
    let probes_a = probes(&a);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        probes(&a),
        probes_a,
        "probes continue without a health check"
    );

    // The check is back (a still fails it), and b is removed: a goes unhealthy again, and b
    // is probed no more.
    bal.write_config(&hc_config(&[a.addr], hc));
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(4)
    );
    assert!(eventually(Duration::from_secs(5), || !healthy(&bal, &a)).await);
    let probes_b = probes(&b);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(probes(&b), probes_b, "a removed backend is still probed");
    let g = get(&client(), &bal.url("/")).await;
    assert_eq!(g.status, 503);
    bal.shutdown().await;
}
