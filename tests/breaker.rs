//! Circuit breakers against real backends: 503s open a backend's breaker, traffic avoids it
//! while open, a trial after `open_duration` closes or reopens it, and a client that goes
//! away is never held against the backend.

mod common;
use common::*;

use std::io::Write;
use std::net::TcpStream as StdTcpStream;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

const OPEN: Duration = Duration::from_millis(500);

fn breaker_config(backends: &[std::net::SocketAddr], extra: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!(
            "[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"500ms\"\n{extra}"
        ),
    )
}

async fn breaker_of(bal: &Balancer, b: &TestBackend) -> serde_json::Value {
    let s = status(bal).await;
    status_backend(&s, "web", b.addr).expect("backend in /status")
}

async fn breaker_state(bal: &Balancer, b: &TestBackend) -> String {
    breaker_of(bal, b).await["breaker"]
        .as_str()
        .expect("breaker is a string")
        .to_owned()
}

/// Sends requests one by one until `target` has received `n` more; the answers it gave.
async fn hit(bal: &Balancer, target: &TestBackend, n: u64) -> Vec<Got> {
    let c = client();
    let goal = target.requests() + n;
    let mut got = Vec::new();
    for _ in 0..(4 * n + 8) {
        if target.requests() >= goal {
            break;
        }
        let before = target.requests();
        let g = get(&c, &bal.url("/")).await;
        if target.requests() > before {
            got.push(g);
        }
    }
    assert_eq!(
        target.requests(),
        goal,
        "could not reach {}",
        target.state.name
    );
    got
}

/// Opens `target`'s breaker with three 503s (it must be in `Mode::Fail503`).
async fn open_breaker(bal: &Balancer, target: &TestBackend) -> Instant {
    let got = hit(bal, target, 3).await;
    let opened = Instant::now();
    for g in &got {
        assert_eq!(g.status, 503, "the backend's own 503 is relayed");
    }
    assert_eq!(breaker_state(bal, target).await, "open");
    opened
}

/// Starts requests one at a time until one reaches `target` (which must answer slowly or not
/// at all); that request, still in flight. Requests served elsewhere must come from `other`.
async fn trial(bal: &Balancer, target: &TestBackend, other: &str) -> JoinHandle<Got> {
    let c = client();
    let before = target.requests();
    for _ in 0..8 {
        let url = bal.url("/");
        let c = c.clone();
        let h = tokio::spawn(async move { get(&c, &url).await });
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if target.requests() > before {
                return h;
            }
            if h.is_finished() {
                let g = h.await.unwrap();
                assert_eq!((g.status.as_u16(), g.body.as_str()), (200, other));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "request neither finished nor reached the target"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    panic!("no trial request reached {}", target.state.name);
}

/// Sends `n` requests that must all be served by `name`; only those sent before `until`
/// count (the breaker's open period may end under a slow machine).
async fn all_go_to(bal: &Balancer, name: &str, n: usize, until: Instant) -> usize {
    let c = client();
    let mut checked = 0;
    for _ in 0..n {
        let sent = Instant::now();
        let g = get(&c, &bal.url("/")).await;
        if sent < until {
            assert_eq!((g.status.as_u16(), g.body.as_str()), (200, name));
            checked += 1;
        }
    }
    checked
}

#[tokio::test]
async fn open_then_half_open_then_closed_by_a_trial_success() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&breaker_config(&[a.addr, b.addr], "")).await;
    a.set_mode(Mode::Fail503);

    let opened = open_breaker(&bal, &a).await;
    let entry = breaker_of(&bal, &a).await;
    assert_eq!(entry["failures"], 3, "{entry}");
    assert_eq!(breaker_state(&bal, &b).await, "closed");

    // Open: everything goes to b, nothing to a.
    let ra = a.requests();
    let checked = all_go_to(&bal, "b", 6, opened + Duration::from_millis(400)).await;
    assert!(checked >= 3, "machine too slow to observe the open period");
    assert_eq!(
        a.requests(),
        ra,
        "a request reached a backend whose breaker is open"
    );

    // After open_duration a trial goes through; while it is out the breaker is half-open and
    // other requests still avoid a.
    tokio::time::sleep_until((opened + OPEN + Duration::from_millis(100)).into()).await;
    a.set_mode(Mode::Ok);
    a.set_delay(Duration::from_millis(800));
    let t = trial(&bal, &a, "b").await;
    assert_eq!(breaker_state(&bal, &a).await, "half_open");
    assert_eq!(breaker_of(&bal, &a).await["in_flight"], 1);
    let ra = a.requests();
    let c = client();
    for _ in 0..4 {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(
            (g.status.as_u16(), g.body.as_str()),
            (200, "b"),
            "only one trial at a time"
        );
    }
    assert_eq!(a.requests(), ra);

    // The trial succeeds: closed, and a is back in the rotation.
    let g = t.await.unwrap();
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    assert_eq!(breaker_state(&bal, &a).await, "closed");
    a.set_delay(Duration::ZERO);
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(get(&c, &bal.url("/")).await.body);
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 2, "{names:?}");
    bal.shutdown().await;
}

#[tokio::test]
async fn a_failed_trial_reopens_the_breaker() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&breaker_config(&[a.addr, b.addr], "")).await;
    a.set_mode(Mode::Fail503);
    let opened = open_breaker(&bal, &a).await;

    tokio::time::sleep_until((opened + OPEN + Duration::from_millis(100)).into()).await;
    // The trial fails: open again, for a whole open_duration from now.
    let got = hit(&bal, &a, 1).await;
    let reopened = Instant::now();
    assert_eq!(got[0].status, 503);
    assert_eq!(breaker_state(&bal, &a).await, "open");
    let ra = a.requests();
    let checked = all_go_to(&bal, "b", 6, reopened + Duration::from_millis(400)).await;
    assert!(checked >= 3, "machine too slow to observe the open period");
    assert_eq!(a.requests(), ra, "a request reached a reopened breaker");
    assert_eq!(breaker_of(&bal, &a).await["failures"], 4);

    // Next trial succeeds and closes it.
    tokio::time::sleep_until((reopened + OPEN + Duration::from_millis(100)).into()).await;
    a.set_mode(Mode::Ok);
    let got = hit(&bal, &a, 1).await;
    assert_eq!((got[0].status.as_u16(), got[0].body.as_str()), (200, "a"));
    assert_eq!(breaker_state(&bal, &a).await, "closed");
    bal.shutdown().await;
}

#[tokio::test]
async fn all_breakers_open_answers_503() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    // No ejection cap: every breaker in the pool may be honoured.
    let bal = start_balancer(&breaker_config(
        &[a.addr, b.addr],
        "max_ejected_percent = 100\n",
    ))
    .await;
    a.set_mode(Mode::Fail503);
    b.set_mode(Mode::Fail503);
    let c = client();
    for _ in 0..6 {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 503);
    }
    let opened = Instant::now();
    assert_eq!(breaker_state(&bal, &a).await, "open");
    assert_eq!(breaker_state(&bal, &b).await, "open");
    let (ra, rb) = (a.requests(), b.requests());
    let mut checked = 0;
    for _ in 0..4 {
        let sent = Instant::now();
        let g = get(&c, &bal.url("/")).await;
        if sent < opened + Duration::from_millis(400) {
            assert_eq!(g.status, 503, "{}", g.body);
            assert!(g.body.contains("503"), "{:?}", g.body);
            checked += 1;
        }
    }
    assert!(checked >= 2, "machine too slow to observe the open period");
    assert_eq!(
        (a.requests(), b.requests()),
        (ra, rb),
        "a request reached an open breaker"
    );
    bal.shutdown().await;
}

/// Clients that go away in the middle of a request (while the backend is still working on it,
/// or in the middle of sending their body) are not the backend's fault: more of them than
/// `consecutive_failures` leave its failure count at 0 and its breaker closed.
#[tokio::test]
async fn client_disconnect_is_not_a_backend_failure() {
    let a = start_backend("a").await;
    // One backend, a long open period: an opened breaker could not go unnoticed. The response
    // timeout is short so that a request left running after its client went would fail here.
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"30s\"\n[pools.web.timeouts]\nresponse = \"1s\"\n",
    ))
    .await;

    // 1. The backend never answers; the client hangs up while waiting.
    a.set_mode(Mode::Hang);
    for _ in 0..4 {
        let before = a.requests();
        let mut s = StdTcpStream::connect(bal.addr).unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || a.requests() > before).await,
            "request never reached the backend"
        );
        drop(s);
    }
    // 2. The client dies halfway through its request body.
    a.set_mode(Mode::Ok);
    a.set_delay(Duration::from_secs(3));
    for _ in 0..4 {
        let before = a.requests();
        let mut s = StdTcpStream::connect(bal.addr).unwrap();
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 100000\r\n\r\n",
        )
        .unwrap();
        s.write_all(&[b'y'; 1000]).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || a.requests() > before).await,
            "request never reached the backend"
        );
        drop(s);
    }

    // Every abandoned attempt ends (the balancer noticed), and none counted as a failure, even
    // once the response timeout has passed.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            breaker_of(&bal, &a).await["in_flight"] == 0
        })
        .await,
        "abandoned requests still in flight: {}",
        breaker_of(&bal, &a).await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let entry = breaker_of(&bal, &a).await;
    assert_eq!(entry["failures"], 0, "{entry}");
    assert_eq!(entry["breaker"], "closed", "{entry}");
    assert_eq!(entry["in_flight"], 0, "{entry}");

    a.set_delay(Duration::ZERO);
    let g = get(&client(), &bal.url("/")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    bal.shutdown().await;
}

/// Connect errors, response timeouts and resets are failures too. The client never sees them
/// (a GET is retried on the other backend), but the breaker counts them and opens.
#[tokio::test]
async fn refused_timed_out_and_reset_attempts_open_the_breaker() {
    for kind in ["refused", "timeout", "reset"] {
        let mut a = start_backend("a").await;
        let b = start_backend("b").await;
        let bal = start_balancer(&breaker_config(
            &[a.addr, b.addr],
            "[pools.web.timeouts]\nresponse = \"300ms\"\n",
        ))
        .await;
        match kind {
            "refused" => a.stop(),
            "timeout" => a.set_mode(Mode::Hang),
            _ => a.set_mode(Mode::Close),
        }
        let c = client();
        let mut n = 0;
        while breaker_state(&bal, &a).await != "open" {
            n += 1;
            assert!(
                n <= 20,
                "{kind}: breaker still closed after {n} requests: {}",
                breaker_of(&bal, &a).await
            );
            let g = get(&c, &bal.url("/")).await;
            assert_eq!(
                (g.status.as_u16(), g.body.as_str()),
                (200, "b"),
                "{kind}: retried on b"
            );
        }
        let entry = breaker_of(&bal, &a).await;
        assert_eq!(entry["failures"], 3, "{kind}: {entry}");
        // Open: a is not even tried (its attempt counter stays put).
        let attempts = entry["requests"].clone();
        for _ in 0..3 {
            let g = get(&c, &bal.url("/")).await;
            assert_eq!(g.body, "b");
        }
        let now = breaker_of(&bal, &a).await;
        if now["breaker"] == "open" {
            assert_eq!(
                now["requests"], attempts,
                "{kind}: attempts on an open breaker"
            );
        }

        // Back to normal: after open_duration a trial closes it.
        match kind {
            "refused" => a.restart().await,
            _ => a.set_mode(Mode::Ok),
        }
        tokio::time::sleep(OPEN + Duration::from_millis(100)).await;
        let got = hit(&bal, &a, 1).await;
        assert_eq!(
            (got[0].status.as_u16(), got[0].body.as_str()),
            (200, "a"),
            "{kind}"
        );
        assert_eq!(breaker_state(&bal, &a).await, "closed", "{kind}");
        bal.shutdown().await;
    }
}
