//! The admin API: `/status` has the contract's shape, `/metrics` the contract's families,
//! `POST /reload` answers with the version, anything else 404, and no admin listener at all
//! without `[admin]`.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `2026-11-24T12:00:00Z`, optionally with fractional seconds.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && s.ends_with('Z')
}

#[tokio::test]
async fn status_has_the_contract_shape() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let mut dead = start_backend("dead").await;
    dead.stop();
    let template = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/other\"\npool = \"other\"\n\
         [[routes]]\npool = \"web\"\n\
         [pools.web]\nstrategy = \"round_robin\"\nbackends = [\"{}\", {{ address = \"{}\", weight = 3 }}]\n\
         [pools.other]\nstrategy = \"least_connections\"\nbackends = [\"{}\"]\n\
         [pools.other.retries]\nattempts = 1\n",
        a.addr, b.addr, dead.addr
    );
    let bal = start_balancer(&template).await;
    let c = client();
    for _ in 0..8 {
        assert_eq!(get(&c, &bal.url("/")).await.status, 200);
    }
    assert_eq!(get(&c, &bal.url("/other")).await.status, 502);

    let g = get(&c, &bal.admin_url("/status")).await;
    assert_eq!(g.status, 200);
    let ct = g
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let s: Value = serde_json::from_str(&g.body).unwrap();

    // The contract's two, and what the dashboard reads beside them.
    assert_eq!(
        keys(&s),
        set(&[
            "config",
            "pools",
            "process",
            "listeners",
            "latency_bounds_s"
        ]),
        "{s:#}"
    );
    let cfg = &s["config"];
    assert_eq!(
        keys(cfg),
        set(&["version", "loaded_at", "last_error"]),
        "{s:#}"
    );
    assert_eq!(cfg["version"], 1);
    assert!(cfg["version"].is_u64());
    let loaded = cfg["loaded_at"].as_str().expect("loaded_at is a string");
    assert!(
        is_rfc3339_utc(loaded),
        "loaded_at {loaded:?} is not RFC 3339 UTC"
    );
    assert!(cfg["last_error"].is_null());

    assert_eq!(keys(&s["pools"]), set(&["web", "other"]));
    let contract = [
        "address",
        "weight",
        "healthy",
        "breaker",
        "in_flight",
        "requests",
        "failures",
    ];
    for (pool, strategy) in [("web", "round_robin"), ("other", "least_connections")] {
        let p = &s["pools"][pool];
        assert_eq!(keys(p), set(&["strategy", "protocol", "backends"]), "{p:#}");
        assert_eq!(p["strategy"], strategy);
        assert_eq!(p["protocol"], "http1");
        for be in p["backends"].as_array().expect("backends is an array") {
            let k = keys(be);
            for key in contract {
                assert!(k.contains(key), "backend entry lacks {key}: {be:#}");
            }
            assert!(be["address"].is_string());
            assert!(be["weight"].is_u64());
            assert!(be["healthy"].is_boolean());
            assert!(["closed", "open", "half_open"].contains(&be["breaker"].as_str().unwrap()));
            assert!(be["in_flight"].is_u64());
            assert!(be["requests"].is_u64());
            assert!(be["failures"].is_u64());
        }
    }

    // Values: in config order, weights as written, counts as sent.
    let web = s["pools"]["web"]["backends"].as_array().unwrap();
    assert_eq!(web.len(), 2);
    assert_eq!(web[0]["address"], a.addr.to_string());
    assert_eq!(web[1]["address"], b.addr.to_string());
    assert_eq!(
        (web[0]["weight"].as_u64(), web[1]["weight"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(
        (web[0]["requests"].as_u64(), web[1]["requests"].as_u64()),
        (Some(2), Some(6))
    );
    for be in web {
        assert_eq!(be["healthy"], true, "no health check: healthy");
        assert_eq!(be["breaker"], "closed");
        assert_eq!(be["in_flight"], 0);
        assert_eq!(be["failures"], 0);
    }
    let other = &s["pools"]["other"]["backends"][0];
    assert_eq!(other["address"], dead.addr.to_string());
    assert_eq!(other["requests"], 1);
    assert_eq!(other["failures"], 1);
    assert_eq!(other["breaker"], "closed", "one failure of five");
    bal.shutdown().await;
}

type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

fn find<'a>(
    m: &'a Samples,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a (String, BTreeMap<String, String>, f64)> {
    m.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let rows = find(m, name, labels);
    assert_eq!(
        rows.len(),
        1,
        "want one sample {name}{labels:?}, got {rows:?}"
    );
    rows[0].2
}

async fn metrics(bal: &Balancer) -> (String, Samples) {
    let g = get(&client(), &bal.admin_url("/metrics")).await;
    assert_eq!(g.status, 200, "{}", g.body);
    let ct = g
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "content-type {ct:?}"
    );
    let samples = parse_metrics(&g.body);
    (g.body, samples)
}

fn has_type(text: &str, family: &str, kind: &str) -> bool {
    text.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("#")
            && w.next() == Some("TYPE")
            && w.next()
                .is_some_and(|n| n == family || n == format!("{family}_total"))
            && w.next() == Some(kind)
    })
}

#[tokio::test]
async fn metrics_have_the_contract_families() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&config(
        &[a.addr, b.addr],
        "round_robin",
        "[pools.web.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"30s\"\n",
    ))
    .await;
    let (pa, pb) = (a.addr.to_string(), b.addr.to_string());
    let c = client();
    // a: 2 answers of 2xx. b: one 500, then a 500 that opens its breaker.
    b.set_mode(Mode::Fail503);
    for _ in 0..4 {
        get(&c, &bal.url("/")).await;
    }
    // Both go to a now: b's breaker is open.
    for _ in 0..2 {
        assert_eq!(get(&c, &bal.url("/")).await.status, 200);
    }
    // A reload, and a rejected one.
    let g = post(&c, &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    let good = std::fs::read_to_string(&bal.config_path).unwrap();
    std::fs::write(&bal.config_path, format!("{good}\nnonsense = 1\n")).unwrap();
    assert_eq!(post(&c, &bal.admin_url("/reload"), "").await.status, 400);
    std::fs::write(&bal.config_path, good).unwrap();

    let (text, m) = metrics(&bal).await;
    fn web(be: &str) -> Vec<(&'static str, &str)> {
        vec![("pool", "web"), ("backend", be)]
    }

    // Requests by pool, backend and status class.
    assert!(has_type(&text, "balancer_requests", "counter"), "{text}");
    let class = |be: &str, cl: &str| {
        value(
            &m,
            "balancer_requests_total",
            &[("pool", "web"), ("backend", be), ("class", cl)],
        )
    };
    assert_eq!(class(&pa, "2xx"), 4.0, "{text}");
    assert_eq!(class(&pb, "5xx"), 2.0, "{text}");
    assert_eq!(class(&pb, "2xx"), 0.0, "{text}");

    // Duration histogram: cumulative buckets ending in +Inf, _sum and _count.
    assert!(
        has_type(&text, "balancer_request_duration_seconds", "histogram"),
        "{text}"
    );
    let buckets = find(&m, "balancer_request_duration_seconds_bucket", &web(&pa));
    assert!(buckets.len() >= 2, "{text}");
    let mut last = 0.0;
    for (_, l, v) in &buckets {
        assert!(l.contains_key("le"), "bucket without le: {l:?}");
        assert!(*v >= last, "buckets are not cumulative: {text}");
        last = *v;
    }
    let inf = value(
        &m,
        "balancer_request_duration_seconds_bucket",
        &[("pool", "web"), ("backend", &pa), ("le", "+Inf")],
    );
    assert_eq!(inf, 4.0, "{text}");
    assert_eq!(
        value(&m, "balancer_request_duration_seconds_count", &web(&pa)),
        4.0,
        "{text}"
    );
    let sum = value(&m, "balancer_request_duration_seconds_sum", &web(&pa));
    assert!(sum > 0.0 && sum < 20.0, "sum {sum}");

    // Gauges per backend.
    assert!(
        has_type(&text, "balancer_backend_in_flight", "gauge"),
        "{text}"
    );
    assert_eq!(value(&m, "balancer_backend_in_flight", &web(&pa)), 0.0);
    assert!(
        has_type(&text, "balancer_backend_healthy", "gauge"),
        "{text}"
    );
    assert_eq!(value(&m, "balancer_backend_healthy", &web(&pa)), 1.0);
    assert!(
        has_type(&text, "balancer_backend_breaker_state", "gauge"),
        "{text}"
    );
    assert_eq!(
        value(&m, "balancer_backend_breaker_state", &web(&pa)),
        0.0,
        "a is closed"
    );
    assert_ne!(
        value(&m, "balancer_backend_breaker_state", &web(&pb)),
        0.0,
        "b is open"
    );

    // Reloads, applied and rejected.
    assert!(
        has_type(&text, "balancer_config_reloads", "counter"),
        "{text}"
    );
    assert_eq!(
        value(&m, "balancer_config_reloads_total", &[]),
        1.0,
        "{text}"
    );
    assert!(
        has_type(&text, "balancer_config_reload_failures", "counter"),
        "{text}"
    );
    assert_eq!(
        value(&m, "balancer_config_reload_failures_total", &[]),
        1.0,
        "{text}"
    );

    // Upstream failures carry a reason; connections opened are counted.
    let fails = find(&m, "balancer_upstream_failures_total", &web(&pb));
    assert!(!fails.is_empty(), "{text}");
    assert!(
        fails.iter().all(|(_, l, _)| l.contains_key("reason")),
        "{fails:?}"
    );
    assert_eq!(
        value(
            &m,
            "balancer_upstream_failures_total",
            &[("backend", &pb), ("reason", "upstream_5xx")]
        ),
        2.0
    );
    assert!(
        value(&m, "balancer_upstream_connections_opened_total", &web(&pa)) >= 1.0,
        "{text}"
    );
    assert!(
        value(&m, "balancer_upstream_connections_opened_total", &web(&pb)) >= 1.0,
        "{text}"
    );

    // A refused connection is a failure with its own reason.
    let mut dead = start_backend("dead").await;
    dead.stop();
    bal.write_config(&config(
        &[a.addr, b.addr, dead.addr],
        "round_robin",
        "[pools.web.retries]\nattempts = 1\n",
    ));
    assert_eq!(post(&c, &bal.admin_url("/reload"), "").await.status, 200);
    let mut saw_502 = false;
    for _ in 0..6 {
        saw_502 |= get(&c, &bal.url("/")).await.status == 502;
    }
    assert!(saw_502);
    let (text, m) = metrics(&bal).await;
    let pd = dead.addr.to_string();
    assert!(
        value(
            &m,
            "balancer_upstream_failures_total",
            &[("backend", &pd), ("reason", "connect_refused")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&m, "balancer_config_reloads_total", &[]),
        2.0,
        "{text}"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn reload_answers_version_and_unknown_paths_404() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();
    for want in 2..=4u64 {
        let g = post(&c, &bal.admin_url("/reload"), "").await;
        assert_eq!(g.status, 200, "{}", g.body);
        let ct = g
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("application/json"), "content-type {ct:?}");
        let v: Value = serde_json::from_str(&g.body).unwrap();
        assert_eq!(v, serde_json::json!({ "version": want }));
        assert_eq!(status(&bal).await["config"]["version"], want);
    }
    // (`GET /` is the dashboard: tests/dashboard.rs.)
    for path in [
        "/nope",
        "/status/x",
        "/metricsx",
        "/events/x",
        "/index.html",
    ] {
        let g = get(&c, &bal.admin_url(path)).await;
        assert_eq!(g.status, 404, "GET {path}: {}", g.body);
    }
    // The traffic listener does not serve the admin API.
    let g = get(&c, &bal.url("/status")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    // Reloading is a POST; a GET does not reload.
    let g = get(&c, &bal.admin_url("/reload")).await;
    assert_ne!(g.status, 200);
    assert_eq!(status(&bal).await["config"]["version"], 4);
    bal.shutdown().await;
}

/// What the dashboard reads beyond the contract: process start and uptime, listeners with
/// their TLS flag, seconds each breaker has been in its state, and latency bucket counts.
#[tokio::test]
async fn status_has_uptime_listeners_breaker_time_and_latency_buckets() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    b.set_mode(Mode::Fail503);
    let bal = start_balancer(&config(
        &[a.addr, b.addr],
        "round_robin",
        "[pools.web.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"30s\"\n",
    ))
    .await;
    let c = client();
    for _ in 0..6 {
        get(&c, &bal.url("/")).await;
    }
    let s = status(&bal).await;
    let started = s["process"]["started_at"].as_str().expect("started_at");
    assert!(is_rfc3339_utc(started), "{started:?}");
    let up = s["process"]["uptime_s"].as_f64().expect("uptime_s");
    assert!((0.0..60.0).contains(&up), "uptime {up}");
    assert_eq!(
        s["listeners"],
        serde_json::json!([{ "bind": bal.addr.to_string(), "tls": false }])
    );
    let bounds = s["latency_bounds_s"].as_array().expect("bounds");
    assert_eq!(bounds.len(), 11);
    assert_eq!(bounds[0], 0.005);

    let ea = entry(&s, a.addr);
    let eb = entry(&s, b.addr);
    assert_eq!(eb["breaker"], "open", "{eb}");
    let since = |e: &Value| e["breaker_since"].as_f64().expect("breaker_since");
    // a has been closed since the start; b opened a moment ago.
    assert!(
        since(&eb) < 5.0 && since(&eb) <= since(&ea) + 0.001,
        "{ea} {eb}"
    );
    // Every answered request in a bucket: 12 of them, the last +Inf.
    for e in [&ea, &eb] {
        let buckets = e["latency_buckets"].as_array().expect("latency_buckets");
        assert_eq!(buckets.len(), 12, "{e}");
        let n: u64 = buckets.iter().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(n, e["requests"].as_u64().unwrap(), "{e}");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = status(&bal).await;
    assert!(later["process"]["uptime_s"].as_f64().unwrap() >= up + 1.0);
    assert!(since(&entry(&later, b.addr)) >= since(&eb) + 1.0);
    bal.shutdown().await;
}

/// Without `[admin]` the binary opens no admin port (in-process tests always pre-bind one, so
/// this needs the real binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_listener_without_admin_table() {
    let a = start_backend("a").await;
    let template = format!(
        "watch = false\n[log]\naccess = false\nlevel = \"warn\"\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{}\"]\n",
        a.addr
    );
    let bin = start_binary(&template, Stdio::null());
    let g = get(&client(), &format!("http://{}/", bin.addr)).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    let err = std::net::TcpStream::connect_timeout(&bin.admin, Duration::from_secs(2))
        .expect_err("something listens on the admin port without [admin]");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // The admin paths are not served on the traffic listener either.
    let g = get(&client(), &format!("http://{}/metrics", bin.addr)).await;
    assert_eq!(g.body, "a");

    // With [admin] the same binary does listen there.
    let with_admin = template.replace("[log]", "[admin]\nbind = \"{admin}\"\n[log]");
    let bin2 = start_binary(&with_admin, Stdio::null());
    let s = status_at(bin2.admin).await;
    assert_eq!(s["config"]["version"], 1);
}

/// Concurrent `POST /reload`s are applied one at a time: every one succeeds with its own
/// version, and the versions are exactly the next N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_get_distinct_versions() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let url = bal.admin_url("/reload");
        tasks.push(tokio::spawn(async move { post(&client(), &url, "").await }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, 200, "{}", g.body);
        let v: Value = serde_json::from_str(&g.body).unwrap();
        versions.push(v["version"].as_u64().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, (2..=13).collect::<Vec<u64>>());
    assert_eq!(status(&bal).await["config"]["version"], 13);
    bal.shutdown().await;
}

/// `in_flight` counts a request until its response body has been relayed, in `/status` and in
/// `/metrics` alike.
#[tokio::test]
async fn in_flight_lasts_until_the_body_ends() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let c = client();
    // 64 MiB: far more than the socket buffers, so the body cannot be over while unread.
    let req = hyper::Request::get(bal.url("/bytes/67108864"))
        .body(full(""))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let s = status(&bal).await;
    assert_eq!(
        status_backend(&s, "web", a.addr).unwrap()["in_flight"],
        1,
        "{s}"
    );
    let (text, m) = metrics(&bal).await;
    let pa = a.addr.to_string();
    assert_eq!(
        value(&m, "balancer_backend_in_flight", &[("backend", &pa)]),
        1.0,
        "{text}"
    );
    drop(resp);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            status_backend(&status(&bal).await, "web", a.addr).unwrap()["in_flight"] == 0
        })
        .await,
        "in_flight stuck after the client dropped the body"
    );
    bal.shutdown().await;
}

/// Runs `promtool check metrics` on `text`: its verdict (success, and what it printed).
/// promtool is the reference checker of the text format; CI installs it (`.ci/run`), so a
/// missing promtool is a failure that says how to get it, never a silent pass.
fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install it (Debian: `apt-get install prometheus`; \
             .ci/run does) so that /metrics can be checked"
        ),
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

/// `# TYPE` lines: family name -> type, in order of appearance; panics on a family declared
/// twice.
fn declared_types(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                !out.iter().any(|(n, _)| n == name),
                "family {name} declared twice"
            );
            out.push((name.to_owned(), kind.to_owned()));
        }
    }
    out
}

/// A strict reading of OpenMetrics 1.0 text as prometheus-client writes it: every line is
/// `# HELP`, `# TYPE`, `# UNIT`, a sample of the family declared just before it (with the
/// suffixes its type allows), or the final `# EOF`; every family has HELP and TYPE before
/// its samples. Returns the samples.
fn parse_openmetrics(text: &str) -> Samples {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics must end with # EOF: {text}"
    );
    let body = &text[..text.len() - "# EOF\n".len()];
    assert!(!body.contains("# EOF"), "# EOF before the end: {text}");
    let mut family: Option<(String, String)> = None;
    let mut helped: BTreeSet<String> = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            helped.insert(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "info",
                    "stateset",
                    "gaugehistogram",
                    "unknown"
                ]
                .contains(&kind),
                "unknown type in {line:?}"
            );
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(
                !(kind == "counter" && name.ends_with("_total")),
                "OpenMetrics counter family names have no _total: {line:?}"
            );
            family = Some((name.to_owned(), kind.to_owned()));
        } else if line.starts_with("# UNIT ") {
        } else if line.starts_with('#') {
            panic!("unexpected comment {line:?}");
        } else {
            let (fam, kind) = family
                .as_ref()
                .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
            let name = line.split(['{', ' ']).next().unwrap();
            let suffix = name
                .strip_prefix(fam.as_str())
                .unwrap_or_else(|| panic!("sample {line:?} outside family {fam}"));
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            assert!(allowed.contains(&suffix), "{line:?} in {kind} {fam}");
        }
    }
    parse_metrics(body)
}

/// `/metrics` in the Prometheus text format passes `promtool check metrics`, and the same
/// families in OpenMetrics (on request) are well-formed, after traffic that gives every
/// family samples: successes, 5xx, a refused connection, an open breaker, local 502s, an
/// applied and a rejected reload.
#[tokio::test]
async fn metrics_pass_promtool_and_openmetrics_on_request() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let mut dead = start_backend("dead").await;
    dead.stop();
    let bal = start_balancer(&format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/dead\"\npool = \"dead\"\n\
         [[routes]]\npool = \"web\"\n\
         [pools.web]\nbackends = [\"{}\", \"{}\"]\n\
         [pools.web.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"60s\"\n\
         [pools.dead]\nbackends = [\"{}\"]\n[pools.dead.retries]\nattempts = 1\n",
        a.addr, b.addr, dead.addr
    ))
    .await;
    let c = client();
    b.set_mode(Mode::Fail503);
    for _ in 0..6 {
        get(&c, &bal.url("/")).await;
    }
    assert_eq!(get(&c, &bal.url("/dead")).await.status, 502);
    assert_eq!(post(&c, &bal.admin_url("/reload"), "").await.status, 200);
    let good = std::fs::read_to_string(&bal.config_path).unwrap();
    std::fs::write(&bal.config_path, format!("{good}\nnonsense = 1\n")).unwrap();
    assert_eq!(post(&c, &bal.admin_url("/reload"), "").await.status, 400);
    std::fs::write(&bal.config_path, good).unwrap();
    let s = status(&bal).await;
    assert_eq!(entry(&s, b.addr)["breaker"], "open", "{s}");

    // Default: the text format 0.0.4.
    let g = get(&c, &bal.admin_url("/metrics")).await;
    assert_eq!(g.status, 200);
    assert_eq!(
        g.headers.get("content-type").unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(g.headers.get("vary").unwrap(), "accept");
    let text = g.body;
    assert!(!text.contains("# EOF"), "{text}");
    let types = declared_types(&text);
    assert!(types.len() >= 14, "{text}");
    let samples = parse_metrics(&text);
    for (family, kind) in &types {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}: {text}"
        );
        // Counters carry `_total` in the family name, as Prometheus expects.
        assert_eq!(
            kind == "counter",
            family.ends_with("_total"),
            "{family} {kind}"
        );
        let n = samples
            .iter()
            .filter(|(n, _, _)| {
                n == family
                    || (kind == "histogram"
                        && n.strip_prefix(family.as_str())
                            .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s)))
            })
            .count();
        assert!(n > 0, "family {family} has no samples: {text}");
    }
    let (ok, said) = promtool_check(&text);
    assert!(
        ok,
        "promtool check metrics rejected /metrics:\n{said}\n---\n{text}"
    );
    eprintln!("promtool check metrics: ok {said:?}");

    // What Prometheus sends when it would rather have OpenMetrics.
    let req = hyper::Request::get(bal.admin_url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .body(full(""))
        .unwrap();
    let g = send(&c, req).await;
    assert_eq!(g.status, 200);
    assert_eq!(
        g.headers.get("content-type").unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let om = g.body;
    let om_samples = parse_openmetrics(&om);
    // The same families: counters without `_total` in OpenMetrics.
    let om_types = declared_types(&om);
    let text_names: Vec<(String, String)> = types
        .iter()
        .map(|(n, k)| (n.strip_suffix("_total").unwrap_or(n).to_owned(), k.clone()))
        .collect();
    assert_eq!(om_types, text_names);
    // The same per-backend samples (process-wide counters may move between the two scrapes,
    // since other tests in this binary run alongside).
    let norm = |m: &Samples| -> Vec<String> {
        let mut v: Vec<String> = m
            .iter()
            .filter(|(_, l, _)| l.contains_key("backend"))
            .map(|(n, l, v)| {
                let mut l = l.clone();
                if let Some(le) = l.get_mut("le") {
                    *le = le
                        .parse::<f64>()
                        .map(|f| f.to_string())
                        .unwrap_or(le.clone());
                }
                format!("{n}{l:?} {v}")
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        norm(&samples),
        norm(&om_samples),
        "text:\n{text}\nopenmetrics:\n{om}"
    );
    assert!(norm(&samples).len() > 20);
    bal.shutdown().await;
}

/// An open breaker whose `open_duration` has passed is half-open in `/status` and in
/// `/metrics` alike, before any request comes along to move it.
#[tokio::test]
async fn status_and_metrics_agree_on_an_expired_breaker() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Fail503);
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[pools.web.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"1s\"\n",
    ))
    .await;
    let c = client();
    let pa = a.addr.to_string();
    let breaker = |m: &Samples| value(m, "balancer_backend_breaker_state", &[("backend", &pa)]);
    for _ in 0..4 {
        get(&c, &bal.url("/")).await;
        if entry(&status(&bal).await, a.addr)["breaker"] == "open" {
            break;
        }
    }
    let opened = std::time::Instant::now();
    let s = status(&bal).await;
    let (text, m) = metrics(&bal).await;
    if opened.elapsed() < Duration::from_millis(800) {
        assert_eq!(entry(&s, a.addr)["breaker"], "open", "{s}");
        assert_eq!(breaker(&m), 1.0, "{text}");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = status(&bal).await;
    let (text, m) = metrics(&bal).await;
    assert_eq!(entry(&s, a.addr)["breaker"], "half_open", "{s}");
    assert_eq!(breaker(&m), 2.0, "{text}");
    bal.shutdown().await;
}
