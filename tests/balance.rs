//! Picking a backend, through the proxy: smooth weighted round-robin, least connections (load
//! and weights), tie-breaking, skipping unhealthy backends, and 503 when nothing is available.
mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

/// Like `common::config`, with backends written as inline tables carrying a weight.
fn weighted_config(backends: &[(SocketAddr, u32)], strategy: &str, extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nstrategy = \"{strategy}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Fast health checks: one probe decides.
const HEALTH: &str = "[pools.web.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";

/// One GET that must finish within `limit` (a request that lands on a held backend would not).
async fn get_within(c: &HttpClient, url: &str, limit: Duration) -> Got {
    tokio::time::timeout(limit, get(c, url))
        .await
        .unwrap_or_else(|_| panic!("GET {url} got no answer within {limit:?}"))
}

/// Starts a GET in the background (held open by a slow backend); the task is returned so the
/// test can abort it.
fn spawn_get(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        let req = hyper::Request::get(url).body(full("")).unwrap();
        let _ = c.request(req).await;
    })
}

#[tokio::test]
async fn smooth_weighted_round_robin_5_1_1() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let c = start_backend("c").await;
    let bal = start_balancer(&weighted_config(
        &[(a.addr, 5), (b.addr, 1), (c.addr, 1)],
        "round_robin",
        "",
    ))
    .await;
    let cl = client();
    let mut seq = String::new();
    for _ in 0..14 {
        let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
        assert_eq!(g.status, 200, "{}", g.body);
        seq.push_str(&g.body);
    }
    // nginx's smooth WRR: the heavy backend is interleaved, never sent five in a row.
    assert_eq!(seq, "aabacaaaabacaa");
    assert_eq!((a.requests(), b.requests(), c.requests()), (10, 2, 2));
    let s = status(&bal).await;
    assert_eq!(entry(&s, a.addr)["weight"], 5);
    assert_eq!(entry(&s, b.addr)["weight"], 1);
    assert_eq!(entry(&s, a.addr)["requests"], 10);
    bal.shutdown().await;
}

#[tokio::test]
async fn least_connections_avoids_the_busy_backend() {
    let slow = start_backend("slow").await;
    let fast = start_backend("fast").await;
    // Requests to `slow` stay in flight for the whole test.
    slow.set_delay(Duration::from_secs(60));
    let bal = start_balancer(&config(&[slow.addr, fast.addr], "least_connections", "")).await;

    // Launch requests one at a time until one is held by `slow` (a tie may first go to `fast`,
    // which answers at once).
    let mut held = Vec::new();
    for _ in 0..6 {
        if slow.requests() >= 1 {
            break;
        }
        let before = slow.requests() + fast.requests();
        held.push(spawn_get(bal.url("/")));
        assert!(
            eventually(Duration::from_secs(5), || slow.requests() + fast.requests()
                > before)
            .await,
            "background request never reached a backend"
        );
    }
    assert_eq!(
        slow.requests(),
        1,
        "no request got held by the slow backend"
    );
    wait_status(
        &bal,
        Duration::from_secs(5),
        "slow in flight 1, fast 0",
        |s| entry(s, slow.addr)["in_flight"] == 1 && entry(s, fast.addr)["in_flight"] == 0,
    )
    .await;

    // Every new request must go to the backend with nothing in flight.
    let cl = client();
    for i in 0..10 {
        let g = get_within(&cl, &bal.url("/"), Duration::from_secs(5)).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.body, "fast", "request {i} went to the busy backend");
    }
    assert_eq!(slow.requests(), 1);

    // A second held request on `slow` cannot happen while `fast` is idle; concurrently held
    // requests on both sides keep following the lower count.
    fast.set_delay(Duration::from_secs(60));
    for k in 0..3u64 {
        let before = slow.requests() + fast.requests();
        held.push(spawn_get(bal.url("/")));
        assert!(
            eventually(Duration::from_secs(5), || slow.requests() + fast.requests()
                > before)
            .await,
            "held request {k} never reached a backend"
        );
    }
    // in flight went 1:0 -> 1:1 -> (tie) 2:1 or 1:2 -> 2:2
    let s = wait_status(&bal, Duration::from_secs(5), "two in flight on each", |s| {
        entry(s, slow.addr)["in_flight"].as_u64().unwrap_or(0)
            + entry(s, fast.addr)["in_flight"].as_u64().unwrap_or(0)
            == 4
    })
    .await;
    assert_eq!(entry(&s, slow.addr)["in_flight"], 2, "{s}");
    assert_eq!(entry(&s, fast.addr)["in_flight"], 2, "{s}");
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn least_connections_honours_weights() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_delay(Duration::from_secs(60));
    b.set_delay(Duration::from_secs(60));
    let bal = start_balancer(&weighted_config(
        &[(a.addr, 3), (b.addr, 1)],
        "least_connections",
        "",
    ))
    .await;
    // Eight requests held open, launched one at a time so that each pick sees the previous
    // ones in flight. Load per weight keeps a:b at 3:1, so 6 and 2 whatever the tie-breaks.
    let mut held = Vec::new();
    for k in 1..=8u64 {
        held.push(spawn_get(bal.url("/")));
        assert!(
            eventually(Duration::from_secs(5), || a.requests() + b.requests() == k).await,
            "held request {k} never reached a backend"
        );
    }
    assert_eq!(
        (a.requests(), b.requests()),
        (6, 2),
        "least_connections ignored the weights"
    );
    let s = status(&bal).await;
    assert_eq!(entry(&s, a.addr)["in_flight"], 6, "{s}");
    assert_eq!(entry(&s, b.addr)["in_flight"], 2, "{s}");
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn least_connections_ties_are_spread() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let c = start_backend("c").await;
    let bal = start_balancer(&config(&[a.addr, b.addr, c.addr], "least_connections", "")).await;
    let cl = client();
    for _ in 0..30 {
        let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
        assert_eq!(g.status, 200);
    }
    // Nothing is ever in flight between sequential requests: every pick is a tie.
    let counts = (a.requests(), b.requests(), c.requests());
    assert_eq!(counts.0 + counts.1 + counts.2, 30);
    assert!(
        counts.0 >= 5 && counts.1 >= 5 && counts.2 >= 5,
        "ties are not spread: {counts:?}"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn unhealthy_backend_gets_no_traffic() {
    for strategy in ["round_robin", "least_connections"] {
        let a = start_backend("a").await;
        let b = start_backend("b").await;
        let c = start_backend("c").await;
        let bal = start_balancer(&config(&[a.addr, b.addr, c.addr], strategy, HEALTH)).await;
        // The health checker is running.
        assert!(
            eventually(Duration::from_secs(5), || b
                .state
                .health_probes
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0)
            .await,
            "{strategy}: b is never probed"
        );
        b.set_health(false);
        wait_status(&bal, Duration::from_secs(5), "b unhealthy", |s| {
            entry(s, b.addr)["healthy"] == false
                && entry(s, a.addr)["healthy"] == true
                && entry(s, c.addr)["healthy"] == true
        })
        .await;
        let before = b.requests();
        let cl = client();
        for _ in 0..20 {
            let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
            assert_eq!(g.status, 200, "{strategy}: {}", g.body);
            assert_ne!(
                g.body, "b",
                "{strategy}: traffic reached the unhealthy backend"
            );
        }
        assert_eq!(b.requests(), before, "{strategy}");
        assert!(
            a.requests() >= 5 && c.requests() >= 5,
            "{strategy}: a={} c={}",
            a.requests(),
            c.requests()
        );
        if strategy == "round_robin" {
            // The unhealthy backend's share is spread over the others, not all handed to its
            // neighbour in the rotation (which would double that one's load).
            let (ra, rc) = (a.requests() as i64, c.requests() as i64);
            assert!(
                (ra - rc).abs() <= 2,
                "round_robin skew with b down: a={ra} c={rc}"
            );
        }

        // Healthy again: traffic comes back.
        b.set_health(true);
        wait_status(&bal, Duration::from_secs(5), "b healthy again", |s| {
            entry(s, b.addr)["healthy"] == true
        })
        .await;
        for _ in 0..9 {
            let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
            assert_eq!(g.status, 200);
        }
        assert!(
            b.requests() > before,
            "{strategy}: b gets nothing after recovering"
        );
        bal.shutdown().await;
    }
}

#[tokio::test]
async fn all_unhealthy_is_503() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", HEALTH)).await;
    a.set_health(false);
    b.set_health(false);
    wait_status(&bal, Duration::from_secs(5), "both unhealthy", |s| {
        entry(s, a.addr)["healthy"] == false && entry(s, b.addr)["healthy"] == false
    })
    .await;
    let cl = client();
    for _ in 0..3 {
        let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
        assert_eq!(g.status, 503, "{}", g.body);
    }
    let post = tokio::time::timeout(Duration::from_secs(10), post(&cl, &bal.url("/echo"), "x"))
        .await
        .expect("POST timed out");
    assert_eq!(post.status, 503);
    assert_eq!(a.requests() + b.requests(), 0);
    bal.shutdown().await;
}

#[tokio::test]
async fn all_breakers_open_is_503() {
    // Nobody listens on these: every connect is refused.
    let x = free_port();
    let y = free_port();
    // No ejection cap: every breaker in the pool may be honoured.
    let extra = "[pools.web.circuit_breaker]\nconsecutive_failures = 1\nopen_duration = \"60s\"\nmax_ejected_percent = 100\n";
    let bal = start_balancer(&config(&[x, y], "round_robin", extra)).await;
    let cl = client();
    // The first request tries both (a connect failure is retried elsewhere) and opens both
    // breakers: the backends' own failure is a 502.
    let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
    assert_eq!(g.status, 502, "{}", g.body);
    let s = wait_status(&bal, Duration::from_secs(5), "both breakers open", |s| {
        entry(s, x)["breaker"] == "open" && entry(s, y)["breaker"] == "open"
    })
    .await;
    // Now nothing is available: 503, and no further attempt is made.
    let g = get_within(&cl, &bal.url("/"), Duration::from_secs(10)).await;
    assert_eq!(g.status, 503, "{}", g.body);
    let s2 = status(&bal).await;
    assert_eq!(entry(&s2, x)["requests"], entry(&s, x)["requests"]);
    assert_eq!(entry(&s2, y)["requests"], entry(&s, y)["requests"]);
    bal.shutdown().await;
}
