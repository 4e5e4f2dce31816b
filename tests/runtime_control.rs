//! Runtime control of backends (`POST /pools/{pool}/backends/{address}`: drain, disabled,
//! enabled, weight), backup backends, weight 0, and the admin API's bearer token, against real
//! backends and the in-process balancer.

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use http::Method;
use serde_json::Value;

/// Backends as inline tables: (address, weight, backup).
fn pool_config(backends: &[(SocketAddr, u32, bool)], strategy: &str, extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w, backup)| format!("{{ address = \"{a}\", weight = {w}, backup = {backup} }}"))
        .collect();
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nstrategy = \"{strategy}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Health checks fast enough for a test to watch them run.
const FAST_CHECKS: &str = "[pools.web.health_check]\ninterval = \"100ms\"\ntimeout = \"1s\"\n\
                           healthy_threshold = 1\nunhealthy_threshold = 1\n";

fn json(g: &Got) -> Value {
    serde_json::from_str(&g.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", g.body))
}

/// Sends `n` requests one after another; every one must succeed.
async fn send_n(bal: &Balancer, n: usize) {
    let c = client();
    for i in 0..n {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 200, "request {i}: {}", g.body);
    }
}

/// The value of the `/metrics` sample `name` with exactly these labels (beyond pool="web").
async fn metric(bal: &Balancer, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let g = get(&client(), &bal.admin_url("/metrics")).await;
    assert_eq!(g.status, 200);
    parse_metrics(&g.body)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
}

#[tokio::test]
async fn drain_lets_in_flight_finish_stops_new_requests_and_shows_drained() {
    let slow = start_backend("slow").await;
    let other = start_backend("other").await;
    slow.set_delay(Duration::from_millis(1500));
    let bal = start_balancer(&pool_config(
        &[(slow.addr, 1, false), (other.addr, 1, false)],
        "round_robin",
        FAST_CHECKS,
    ))
    .await;

    // Two requests at once: round-robin gives one to each, so one is held by the slow backend.
    let url = bal.url("/");
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || slow.requests() == 1).await,
        "the slow backend never got its request"
    );

    let g = control_backend(&bal, "web", slow.addr, r#"{"state": "drain"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let view = json(&g);
    assert_eq!(view["address"], slow.addr.to_string());
    assert_eq!(view["admin_state"], "drain");
    assert_eq!(view["in_flight"], 1);
    assert_eq!(
        view["drained"], false,
        "a request is still in flight: {view}"
    );

    // New requests all go elsewhere; the slow backend sees none.
    let probes_at_drain = slow.state.health_probes.load(SeqCst);
    send_n(&bal, 20).await;
    assert_eq!(slow.requests(), 1, "a drained backend got new requests");
    assert_eq!(other.requests(), 21);

    // The in-flight request finishes normally, on the drained backend.
    let mut bodies = Vec::new();
    for h in in_flight {
        let g = h.await.unwrap();
        assert_eq!(g.status, 200, "{}", g.body);
        bodies.push(g.body);
    }
    bodies.sort();
    assert_eq!(bodies, ["other", "slow"]);

    let s = wait_status(&bal, Duration::from_secs(5), "drained", |s| {
        entry(s, slow.addr)["drained"] == true
    })
    .await;
    let e = entry(&s, slow.addr);
    assert_eq!(e["admin_state"], "drain");
    assert_eq!(e["in_flight"], 0);
    assert_eq!(entry(&s, other.addr)["drained"], false);
    assert_eq!(entry(&s, other.addr)["admin_state"], "enabled");

    // Health checks go on while drained, so /status tells whether it may come back.
    assert!(
        eventually(Duration::from_secs(3), || {
            slow.state.health_probes.load(SeqCst) >= probes_at_drain + 3
        })
        .await,
        "health checks stopped on a drained backend"
    );
    assert_eq!(
        metric(
            &bal,
            "balancer_backend_admin_state",
            &[("backend", &slow.addr.to_string()), ("state", "drain")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &bal,
            "balancer_backend_admin_state",
            &[("backend", &slow.addr.to_string()), ("state", "enabled")]
        )
        .await,
        Some(0.0)
    );

    // `enabled` puts it back in rotation.
    let g = control_backend(&bal, "web", slow.addr, r#"{"state": "enabled"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(json(&g)["admin_state"], "enabled");
    assert_eq!(json(&g)["drained"], false);
    slow.set_delay(Duration::ZERO);
    send_n(&bal, 10).await;
    assert_eq!(slow.requests(), 6, "enabled backend gets its share again");
    bal.shutdown().await;
}

#[tokio::test]
async fn disabled_stops_health_probes_and_traffic_until_enabled() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&pool_config(
        &[(a.addr, 1, false), (b.addr, 1, false)],
        "round_robin",
        FAST_CHECKS,
    ))
    .await;
    assert!(
        eventually(Duration::from_secs(3), || a
            .state
            .health_probes
            .load(SeqCst)
            >= 2)
        .await,
        "no health probes before the test"
    );

    let g = control_backend(&bal, "web", a.addr, r#"{"state": "disabled"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let view = json(&g);
    assert_eq!(view["admin_state"], "disabled");
    assert_eq!(view["drained"], true);
    // A probe that was under way when the request came may still land: let it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probes = a.state.health_probes.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        a.state.health_probes.load(SeqCst),
        probes,
        "a disabled backend was still probed"
    );
    send_n(&bal, 10).await;
    assert_eq!(a.requests(), 0, "a disabled backend got requests");
    // No probes: the last known health stays.
    assert_eq!(entry(&status(&bal).await, a.addr)["healthy"], true);

    let g = control_backend(&bal, "web", a.addr, r#"{"state": "enabled"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert!(
        eventually(Duration::from_secs(3), || {
            a.state.health_probes.load(SeqCst) >= probes + 2
        })
        .await,
        "probes did not resume after enabled"
    );
    send_n(&bal, 10).await;
    assert_eq!(a.requests(), 5);
    bal.shutdown().await;
}

#[tokio::test]
async fn weight_override_changes_the_split_and_weight_zero_takes_nothing() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&pool_config(
        &[(a.addr, 1, false), (b.addr, 1, false)],
        "round_robin",
        "",
    ))
    .await;

    let g = control_backend(&bal, "web", a.addr, r#"{"weight": 3}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let view = json(&g);
    assert_eq!(view["weight"], 3);
    assert_eq!(view["configured_weight"], 1);
    assert_eq!(
        view["admin_state"], "enabled",
        "a weight alone keeps the state"
    );
    send_n(&bal, 400).await;
    assert_eq!((a.requests(), b.requests()), (300, 100), "3:1 over 400");
    // A reload builds new pools from the file's weights; the override still applies.
    let g = post(&client(), &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    send_n(&bal, 400).await;
    assert_eq!(
        (a.requests(), b.requests()),
        (600, 200),
        "3:1 after a reload"
    );
    assert_eq!(
        metric(
            &bal,
            "balancer_backend_weight",
            &[("backend", &a.addr.to_string())]
        )
        .await,
        Some(3.0)
    );

    // Weight 0: configured, healthy, takes no new traffic.
    let g = control_backend(&bal, "web", b.addr, r#"{"weight": 0}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(json(&g)["weight"], 0);
    send_n(&bal, 40).await;
    assert_eq!(
        (a.requests(), b.requests()),
        (640, 200),
        "weight 0 got traffic"
    );

    // `enabled` clears overrides: back to the file's 1:1.
    for addr in [a.addr, b.addr] {
        let g = control_backend(&bal, "web", addr, r#"{"state": "enabled"}"#).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(json(&g)["weight"], 1);
    }
    send_n(&bal, 100).await;
    assert_eq!((a.requests(), b.requests()), (690, 250));
    bal.shutdown().await;
}

#[tokio::test]
async fn weight_override_applies_to_least_connections() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Hang);
    b.set_mode(Mode::Hang);
    let bal = start_balancer(&pool_config(
        &[(a.addr, 1, false), (b.addr, 1, false)],
        "least_connections",
        "[pools.web.timeouts]\nresponse = \"3s\"\n[pools.web.retries]\nattempts = 1\n",
    ))
    .await;
    let g = control_backend(&bal, "web", a.addr, r#"{"weight": 3}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    // Eight requests held open: load per weight keeps a:b at 3:1, so 6 and 2.
    let url = bal.url("/");
    let held: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || a.requests() + b.requests() == 8).await,
        "requests did not arrive"
    );
    assert_eq!((a.requests(), b.requests()), (6, 2));
    for h in held {
        h.abort();
    }
    bal.shutdown().await;
}

#[tokio::test]
async fn weight_zero_in_the_file_takes_no_traffic() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&pool_config(
        &[(a.addr, 0, false), (b.addr, 2, false)],
        "round_robin",
        "",
    ))
    .await;
    send_n(&bal, 20).await;
    assert_eq!((a.requests(), b.requests()), (0, 20));
    let s = status(&bal).await;
    assert_eq!(entry(&s, a.addr)["weight"], 0);
    assert_eq!(entry(&s, a.addr)["configured_weight"], 0);
    assert_eq!(entry(&s, a.addr)["admin_state"], "enabled");
    // An override can put it in rotation without touching the file.
    let g = control_backend(&bal, "web", a.addr, r#"{"weight": 2}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    send_n(&bal, 20).await;
    assert_eq!((a.requests(), b.requests()), (10, 30));
    bal.shutdown().await;
}

#[tokio::test]
async fn nothing_in_rotation_answers_503_all_drained() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&pool_config(
        &[(a.addr, 1, false), (b.addr, 0, false)],
        "round_robin",
        "",
    ))
    .await;
    let g = control_backend(&bal, "web", a.addr, r#"{"state": "drain"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let g = get(&client(), &bal.url("/")).await;
    assert_eq!(g.status, 503, "{}", g.body);
    assert_eq!(a.requests() + b.requests(), 0);
    assert_eq!(
        metric(
            &bal,
            "balancer_local_responses_total",
            &[("reason", "all_drained")]
        )
        .await,
        Some(1.0)
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn backups_serve_only_when_every_primary_is_unusable() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let spare = start_backend("spare").await;
    let bal = start_balancer(&pool_config(
        &[
            (a.addr, 1, false),
            (b.addr, 1, false),
            (spare.addr, 1, true),
        ],
        "round_robin",
        FAST_CHECKS,
    ))
    .await;
    send_n(&bal, 20).await;
    assert_eq!(
        spare.requests(),
        0,
        "a backup got traffic with primaries up"
    );
    assert_eq!(entry(&status(&bal).await, spare.addr)["backup"], true);

    // One primary drained, one down: the backup takes over.
    let g = control_backend(&bal, "web", a.addr, r#"{"state": "drain"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    send_n(&bal, 4).await;
    assert_eq!(spare.requests(), 0, "one primary left: no backup yet");
    b.set_health(false);
    wait_status(&bal, Duration::from_secs(5), "b unhealthy", |s| {
        entry(s, b.addr)["healthy"] == false
    })
    .await;
    let before = (a.requests(), b.requests());
    send_n(&bal, 10).await;
    assert_eq!(spare.requests(), 10);
    assert_eq!((a.requests(), b.requests()), before);

    // A primary back in rotation takes over again.
    let g = control_backend(&bal, "web", a.addr, r#"{"state": "enabled"}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    send_n(&bal, 10).await;
    assert_eq!(
        spare.requests(),
        10,
        "the backup kept traffic after a primary came back"
    );
    assert_eq!(a.requests(), before.0 + 10);
    bal.shutdown().await;
}

#[tokio::test]
async fn intent_survives_reload_and_is_cleared_when_the_backend_leaves() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let both = pool_config(&[(a.addr, 1, false), (b.addr, 1, false)], "round_robin", "");
    let only_b = pool_config(&[(b.addr, 1, false)], "round_robin", "");
    let bal = start_balancer(&both).await;
    let c = client();
    let reload = || async { post(&client(), &bal.admin_url("/reload"), "").await };

    let g = control_backend(&bal, "web", a.addr, r#"{"state": "drain", "weight": 5}"#).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let g = reload().await;
    assert_eq!(g.status, 200, "{}", g.body);
    let e = entry(&status(&bal).await, a.addr);
    assert_eq!(e["admin_state"], "drain", "drain lost on reload: {e}");
    assert_eq!(e["weight"], 5);
    assert_eq!(e["configured_weight"], 1);
    for _ in 0..6 {
        assert_eq!(get(&c, &bal.url("/")).await.body, "b");
    }

    // Out of the config and back: as the file says.
    bal.write_config(&only_b);
    assert_eq!(reload().await.status, 200);
    assert!(status_backend(&status(&bal).await, "web", a.addr).is_none());
    bal.write_config(&both);
    assert_eq!(reload().await.status, 200);
    let e = entry(&status(&bal).await, a.addr);
    assert_eq!(e["admin_state"], "enabled", "{e}");
    assert_eq!(e["weight"], 1);
    let before = a.requests();
    send_n(&bal, 10).await;
    assert_eq!(a.requests(), before + 5);
    bal.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_are_400_and_unknown_backends_404() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    for body in [
        "",
        "drain",
        "{}",
        r#"{"state": "off"}"#,
        r#"{"state": "drain", "colour": "red"}"#,
        r#"{"weight": 1001}"#,
        r#"{"weight": -1}"#,
        r#"{"weight": "3"}"#,
    ] {
        let g = control_backend(&bal, "web", a.addr, body).await;
        assert_eq!(g.status, 400, "body {body:?}: {}", g.body);
        let msg = json(&g)["error"].as_str().unwrap_or_default().to_owned();
        assert!(!msg.is_empty(), "body {body:?}: no error message");
    }
    let g = control_backend(&bal, "web", a.addr, r#"{"state": "off"}"#).await;
    assert!(
        json(&g)["error"].as_str().unwrap().contains("drain"),
        "{}",
        g.body
    );
    // Nothing changed by the rejected requests.
    assert_eq!(entry(&status(&bal).await, a.addr)["admin_state"], "enabled");

    let g = control_backend(&bal, "nope", a.addr, r#"{"state": "drain"}"#).await;
    assert_eq!(g.status, 404, "{}", g.body);
    let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let g = control_backend(&bal, "web", other, r#"{"state": "drain"}"#).await;
    assert_eq!(g.status, 404, "{}", g.body);
    let g = post(
        &client(),
        &bal.admin_url("/pools/web/servers/x"),
        r#"{"state": "drain"}"#,
    )
    .await;
    assert_eq!(g.status, 404);
    bal.shutdown().await;
}

/// Writes `token` into a file of its own and returns the directory (kept alive) and path.
fn token_file(token: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.token");
    std::fs::write(&path, token).unwrap();
    (dir, path)
}

#[tokio::test]
async fn token_guards_every_admin_endpoint() {
    let a = start_backend("a").await;
    let (_dir, path) = token_file("s3cret-token\n");
    let template = config(&[a.addr], "round_robin", "").replace(
        "[admin]\nbind = \"{admin}\"\n",
        &format!(
            "[admin]\nbind = \"{{admin}}\"\ntoken_file = \"{}\"\n",
            path.display()
        ),
    );
    assert!(template.contains("token_file"), "{template}");
    let bal = start_balancer(&template).await;
    let c = client();
    let control = format!("/pools/web/backends/{}", a.addr);
    let endpoints = [
        (Method::GET, "/status", ""),
        (Method::GET, "/metrics", ""),
        (Method::POST, "/reload", ""),
        (Method::POST, control.as_str(), r#"{"weight": 1}"#),
    ];
    for (method, path, body) in &endpoints {
        for token in [
            None,
            Some("wrong"),
            Some("s3cret-toke"),
            Some("s3cret-token2"),
        ] {
            let g = request_with_token(&c, method.clone(), &bal.admin_url(path), body, token).await;
            assert_eq!(g.status, 401, "{method} {path} with {token:?}: {}", g.body);
            let challenge = g
                .headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            assert!(challenge.starts_with("Bearer"), "{challenge:?}");
        }
        let g = request_with_token(
            &c,
            method.clone(),
            &bal.admin_url(path),
            body,
            Some("s3cret-token"),
        )
        .await;
        assert_eq!(g.status, 200, "{method} {path} with the token: {}", g.body);
    }
    // Nothing was changed by the refused control requests... and 401 comes before routing.
    let g = request_with_token(&c, Method::GET, &bal.admin_url("/nope"), "", None).await;
    assert_eq!(g.status, 401);
    // The dashboard page asks for the token in the browser: it is not behind it.
    let g = request_with_token(&c, Method::GET, &bal.admin_url("/"), "", None).await;
    assert_ne!(g.status, 401);
    let g = request_with_token(&c, Method::POST, &bal.admin_url("/"), "", None).await;
    assert_eq!(g.status, 401, "POST / needs the token");

    // The token is read at reload: rotate it.
    std::fs::write(&path, "next-token").unwrap();
    let g = request_with_token(
        &c,
        Method::POST,
        &bal.admin_url("/reload"),
        "",
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    let old = request_with_token(
        &c,
        Method::GET,
        &bal.admin_url("/status"),
        "",
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(old.status, 401, "the old token still works after rotation");
    let new = request_with_token(
        &c,
        Method::GET,
        &bal.admin_url("/status"),
        "",
        Some("next-token"),
    )
    .await;
    assert_eq!(new.status, 200);
    assert!(
        !new.body.contains("next-token"),
        "the token leaks in /status"
    );

    // An empty token file is refused at reload; the old token keeps working.
    std::fs::write(&path, "\n").unwrap();
    let g = request_with_token(
        &c,
        Method::POST,
        &bal.admin_url("/reload"),
        "",
        Some("next-token"),
    )
    .await;
    assert_eq!(g.status, 400, "{}", g.body);
    assert!(g.body.contains("token_file"), "{}", g.body);
    bal.shutdown().await;
}

const LISTENER_AND_POOL: &str =
    "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

#[test]
fn non_loopback_admin_without_token_is_a_config_error_at_the_bind() {
    let text = format!("[admin]\nbind = \"0.0.0.0:9900\"\n{LISTENER_AND_POOL}");
    let e = balancer::Config::parse(&text, "t.toml", None).unwrap_err();
    // `bind = ` is 7 characters: the value starts in column 8 of line 2.
    assert_eq!(e.line, Some((2, 8)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("t.toml:2:8"), "{msg}");
    assert!(msg.contains("admin.bind"), "{msg}");
    assert!(msg.contains("loopback"), "{msg}");
    assert!(msg.contains("token_file"), "{msg}");

    for bind in ["127.0.0.1:9900", "127.1.2.3:9900", "[::1]:9900"] {
        let text = format!("[admin]\nbind = \"{bind}\"\n{LISTENER_AND_POOL}");
        assert!(
            balancer::Config::parse(&text, "t.toml", None).is_ok(),
            "{bind} is loopback"
        );
    }
    let (_dir, path) = token_file("t0ken\n");
    let text = format!(
        "[admin]\nbind = \"0.0.0.0:9900\"\ntoken_file = \"{}\"\n{LISTENER_AND_POOL}",
        path.display()
    );
    let cfg = balancer::Config::parse(&text, "t.toml", None).expect("a token makes it valid");
    assert!(cfg.admin.and_then(|a| a.token).is_some());

    let (_dir, empty) = token_file("\n");
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:9900\"\ntoken_file = \"{}\"\n{LISTENER_AND_POOL}",
        empty.display()
    );
    let e = balancer::Config::parse(&text, "t.toml", None).unwrap_err();
    assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");
}

/// The same operations a deploy script makes, against the real binary: token enforced,
/// drain with a long request in flight (it finishes; `drained` turns true only then), the
/// intent surviving a SIGHUP reload, `enabled` clearing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_script_drain_against_the_binary() {
    const TOKEN: &str = "deploy-token-7";
    let slow = start_backend("slow").await;
    let other = start_backend("other").await;
    slow.set_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let text = format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\ntoken_file = \"{}\"\n\
         [log]\naccess = false\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\n\
         backends = [\"{}\", \"{}\"]\n",
        token.display(),
        slow.addr,
        other.addr
    );
    let bin = start_binary(&text, std::process::Stdio::null());
    let c = client();
    let admin = |path: &str| format!("http://{}{path}", bin.admin);
    let authed = |method: Method, url: String, body: &'static str| {
        http::Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(body))
            .unwrap()
    };
    let control = |addr: SocketAddr| admin(&format!("/pools/web/backends/{addr}"));
    let backend_status = |s: &Value, addr: SocketAddr| -> Value {
        s["pools"]["web"]["backends"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|b| b["address"] == addr.to_string().as_str())
                    .cloned()
            })
            .unwrap_or(Value::Null)
    };

    // No token, no control (and no status).
    assert_eq!(
        post(&c, &control(slow.addr), r#"{"state":"drain"}"#)
            .await
            .status,
        401
    );
    assert_eq!(get(&c, &admin("/status")).await.status, 401);

    // Every new request to `slow` for now: `other` takes no traffic.
    let g = send(
        &c,
        authed(Method::POST, control(other.addr), r#"{"weight":0}"#),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    let url = format!("http://{}/long", bin.addr);
    let long = tokio::spawn(async move { get(&client(), &url).await });
    assert!(
        eventually(Duration::from_secs(5), || slow.requests() >= 1).await,
        "the long request never reached the slow backend"
    );
    let g = send(
        &c,
        authed(Method::POST, control(other.addr), r#"{"state":"enabled"}"#),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    let g = send(
        &c,
        authed(Method::POST, control(slow.addr), r#"{"state":"drain"}"#),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);

    let status =
        || async { json(&send(&client(), authed(Method::GET, admin("/status"), "")).await) };
    let s = status().await;
    assert_eq!(backend_status(&s, slow.addr)["admin_state"], "drain");
    assert_eq!(backend_status(&s, slow.addr)["drained"], false, "{s}");
    // New requests avoid the draining backend while its request finishes.
    let before = slow.requests();
    for _ in 0..6 {
        assert_eq!(get(&c, &format!("http://{}/", bin.addr)).await.status, 200);
    }
    assert_eq!(slow.requests(), before);
    let done = long.await.unwrap();
    assert_eq!(
        done.status, 200,
        "the in-flight request finished: {}",
        done.body
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            backend_status(&status().await, slow.addr)["drained"] == true
        })
        .await,
        "drained never turned true"
    );

    // A reload keeps the intent.
    bin.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            status().await["config"]["version"] == 2
        })
        .await,
        "the reload was not applied"
    );
    assert_eq!(
        backend_status(&status().await, slow.addr)["admin_state"],
        "drain"
    );

    // `enabled` puts it back in rotation.
    let g = send(
        &c,
        authed(Method::POST, control(slow.addr), r#"{"state":"enabled"}"#),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    slow.set_delay(Duration::ZERO);
    let before = slow.requests();
    for _ in 0..4 {
        assert_eq!(get(&c, &format!("http://{}/", bin.addr)).await.status, 200);
    }
    assert!(slow.requests() > before, "enabled backend got no traffic");
}
