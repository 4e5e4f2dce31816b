//! Reloads: under load through all three triggers without losing a request, rejected configs
//! that leave the old one serving, state that survives with its backend, and listeners that
//! come and go with the config.

mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;

// ------------------------------------------------------------------------------------------
// (1) Reload under load

const STREAM_BYTES: u64 = 256 << 20;
const SURVIVORS: usize = 2;
const ROTATING: usize = 6;

/// The config of reload `i`: the survivors always, plus three of the rotating backends, so
/// every reload removes some backends and adds others. Weights and strategy change too.
fn load_config(addrs: &[SocketAddr], i: usize, watch: bool) -> (String, BTreeSet<SocketAddr>) {
    let mut set: BTreeSet<usize> = (0..SURVIVORS).collect();
    for k in 0..3 {
        set.insert(SURVIVORS + (i + 2 * k) % ROTATING);
    }
    let list: Vec<String> = set
        .iter()
        .map(|&j| {
            let w = if j == 1 { 1 + i % 3 } else { 1 };
            format!("{{ address = \"{}\", weight = {w} }}", addrs[j])
        })
        .collect();
    let strategy = if i % 4 == 3 {
        "least_connections"
    } else {
        "round_robin"
    };
    let text = format!(
        "watch = {watch}\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\nlevel = \"warn\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nstrategy = \"{strategy}\"\nbackends = [{}]\n",
        list.join(", ")
    );
    (text, set.iter().map(|&j| addrs[j]).collect())
}

fn listed(status: &serde_json::Value) -> BTreeSet<SocketAddr> {
    status["pools"]["web"]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["address"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn requests_by_backend(status: &serde_json::Value) -> HashMap<SocketAddr, u64> {
    status["pools"]["web"]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().parse().unwrap(),
                b["requests"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Polls `/status` every 20 ms, for up to 5 s, until `cond` holds; that document.
async fn wait_status(
    admin: SocketAddr,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let last = std::sync::Mutex::new(None);
    let reached = wait_until(Duration::from_secs(5), || async {
        let s = status_at(admin).await;
        let ok = cond(&s);
        if let Ok(mut l) = last.lock() {
            *l = Some(s);
        }
        ok
    })
    .await;
    last.into_inner().ok().flatten().filter(|_| reached)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, SeqCst);
        let mut v = self.errors.lock().unwrap();
        if v.len() < 10 {
            v.push(e);
        }
    }
}

/// One client on its own keep-alive connection(s): GETs, or POSTs whose body must come back.
async fn load_client(
    url: String,
    echo: bool,
    names: Arc<Vec<String>>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let c = client();
    let mut n = 0u64;
    while !stop.load(SeqCst) {
        n += 1;
        let req = if echo {
            let body = format!("payload-{n}");
            Request::post(format!("{url}/echo/{n}"))
                .body(full(body))
                .unwrap()
        } else {
            Request::get(format!("{url}/load/{n}"))
                .body(full(Bytes::new()))
                .unwrap()
        };
        let resp = match tokio::time::timeout(Duration::from_secs(10), c.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tally.fail(format!("request {n}: {e:?}"));
                continue;
            }
            Err(_) => {
                tally.fail(format!("request {n}: timed out"));
                continue;
            }
        };
        let status = resp.status();
        let backend = resp
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tally.fail(format!("request {n}: body: {e:?}"));
                continue;
            }
        };
        let good = status == 200
            && backend.as_ref().is_some_and(|b| names.contains(b))
            && if echo {
                body == format!("payload-{n}").as_bytes()
            } else {
                backend.as_deref().map(str::as_bytes) == Some(&body[..])
            };
        if good {
            tally.ok.fetch_add(1, SeqCst);
        } else {
            tally.fail(format!(
                "request {n}: {status} from {backend:?}: {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
    }
}

/// Watches `/status` while reloads happen: the version never goes back, and a survivor's
/// request counter never decreases. The number of observations.
async fn observer(admin: SocketAddr, survivors: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> u64 {
    let mut last_version = 0u64;
    let mut last: HashMap<SocketAddr, u64> = HashMap::new();
    let mut seen = 0;
    while !stop.load(SeqCst) {
        let s = status_at(admin).await;
        let v = s["config"]["version"].as_u64().unwrap();
        assert!(
            v >= last_version,
            "version went back from {last_version} to {v}"
        );
        last_version = v;
        let now = requests_by_backend(&s);
        for a in &survivors {
            let n = *now
                .get(a)
                .unwrap_or_else(|| panic!("survivor {a} missing from /status"));
            let before = last.get(a).copied().unwrap_or(0);
            assert!(
                n >= before,
                "requests of survivor {a} went from {before} to {n}"
            );
            last.insert(*a, n);
        }
        seen += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// A long download opened before the first reload: read slowly, and not finished (it holds
/// back its last 16 MiB) until every reload is done; then it must arrive whole. Bytes read.
async fn slow_stream(url: String, started: Arc<AtomicBool>, reloads_done: Arc<AtomicBool>) -> u64 {
    let c = client();
    let req = Request::get(url).body(full(Bytes::new())).unwrap();
    let resp = c.request(req).await.expect("stream request failed");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let xs = vec![b'x'; 64 << 10];
    let mut got = 0u64;
    let mut paced = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("stream broke");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for piece in data.chunks(xs.len()) {
            assert!(
                piece == &xs[..piece.len()],
                "stream corrupted at byte {got}"
            );
        }
        got += data.len() as u64;
        started.store(true, SeqCst);
        if !reloads_done.load(SeqCst) {
            // About 10 MiB/s, and never past the last 16 MiB while reloads go on.
            paced += data.len() as u64;
            if paced >= 1 << 20 {
                paced = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            while got >= STREAM_BYTES - (16 << 20) && !reloads_done.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_loses_no_request() {
    let mut backends = Vec::new();
    for i in 0..SURVIVORS + ROTATING {
        backends.push(start_backend(&format!("b{i}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let names = Arc::new(
        backends
            .iter()
            .map(|b| b.state.name.clone())
            .collect::<Vec<_>>(),
    );
    let (first, mut expected) = load_config(&addrs, 0, false);
    let bin = start_binary(&first, Stdio::null());
    let url = format!("http://{}", bin.addr);
    let admin = bin.admin;
    let ac = client();

    // The long stream first, on a survivor or not, wherever round-robin puts it.
    let started = Arc::new(AtomicBool::new(false));
    let reloads_done = Arc::new(AtomicBool::new(false));
    let stream = tokio::spawn(slow_stream(
        format!("{url}/bytes/{STREAM_BYTES}"),
        Arc::clone(&started),
        Arc::clone(&reloads_done),
    ));
    assert!(
        eventually(Duration::from_secs(10), || started.load(SeqCst)).await,
        "stream never started"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for k in 0..4 {
        clients.push(tokio::spawn(load_client(
            url.clone(),
            k == 3,
            Arc::clone(&names),
            Arc::clone(&tally),
            Arc::clone(&stop),
        )));
    }
    let watcher = tokio::spawn(observer(
        admin,
        addrs[..SURVIVORS].to_vec(),
        Arc::clone(&stop),
    ));

    let began = Instant::now();
    let mut version = 1u64;
    let mut counts = requests_by_backend(&status_at(admin).await);
    let mut by_trigger = [0u32; 3];
    let mut reload = 0usize;
    // After each reload: the version went up, the backends are the new ones, and a backend
    // present before and after kept its counter.
    let mut check =
        |s: &serde_json::Value, expected: &BTreeSet<SocketAddr>, prev: &BTreeSet<SocketAddr>| {
            assert_eq!(&listed(s), expected, "backends after a reload");
            assert!(
                s["config"]["last_error"].is_null(),
                "{}",
                s["config"]["last_error"]
            );
            let now = requests_by_backend(s);
            for a in expected.intersection(prev) {
                assert!(
                    now[a] >= counts[a],
                    "{a}: requests went from {} to {}",
                    counts[a],
                    now[a]
                );
            }
            counts = now;
        };

    // Phase 1: POST /reload.
    for _ in 0..20 {
        reload += 1;
        let (text, next) = load_config(&addrs, reload, false);
        write_binary_config(&bin, &text);
        let g = post(&ac, &format!("http://{admin}/reload"), "").await;
        assert_eq!(g.status, 200, "{}", g.body);
        let v: serde_json::Value = serde_json::from_str(&g.body).unwrap();
        let v = v["version"].as_u64().unwrap();
        assert_eq!(v, version + 1, "versions must grow by one per reload");
        version = v;
        let s = status_at(admin).await;
        assert_eq!(s["config"]["version"], version);
        check(&s, &next, &expected);
        expected = next;
        by_trigger[0] += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Phase 2: SIGHUP (watch is off, so nothing else reloads).
    for _ in 0..20 {
        reload += 1;
        let (text, next) = load_config(&addrs, reload, false);
        write_binary_config(&bin, &text);
        bin.signal("HUP");
        let s = wait_status(admin, |s| s["config"]["version"].as_u64() > Some(version))
            .await
            .unwrap_or_else(|| panic!("SIGHUP #{reload} never reloaded"));
        assert_eq!(s["config"]["version"], version + 1);
        version += 1;
        check(&s, &next, &expected);
        expected = next;
        by_trigger[1] += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Phase 3: turn watching on (one more POST /reload), then edit the file only.
    reload += 1;
    let (text, next) = load_config(&addrs, reload, true);
    write_binary_config(&bin, &text);
    let g = post(&ac, &format!("http://{admin}/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    let v: serde_json::Value = serde_json::from_str(&g.body).unwrap();
    assert_eq!(v["version"].as_u64(), Some(version + 1));
    version += 1;
    check(&status_at(admin).await, &next, &expected);
    expected = next;
    by_trigger[0] += 1;
    // The watcher starts right after the reload that turned it on; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        reload += 1;
        let (text, next) = load_config(&addrs, reload, true);
        if reload.is_multiple_of(2) {
            write_binary_config(&bin, &text);
        } else {
            // Save the way many editors do: a new file renamed over the old one.
            let tmp = bin.dir.path().join("balancer.toml.tmp");
            let text = text
                .replace("{listen}", &bin.addr.to_string())
                .replace("{admin}", &admin.to_string());
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &bin.config_path).unwrap();
        }
        let s = wait_status(admin, |s| {
            s["config"]["version"].as_u64() > Some(version) && listed(s) == next
        })
        .await
        .unwrap_or_else(|| panic!("file change #{reload} never reloaded"));
        let v = s["config"]["version"].as_u64().unwrap();
        assert!(v > version, "version {v} after {version}");
        version = v;
        check(&s, &next, &expected);
        expected = next;
        by_trigger[2] += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reload_time = began.elapsed();
    assert!(
        !stream.is_finished(),
        "the stream ended before the last reload"
    );
    reloads_done.store(true, SeqCst);

    // A little more traffic on the last config, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let observations = watcher.await.unwrap();
    let streamed = tokio::time::timeout(Duration::from_secs(120), stream)
        .await
        .expect("stream did not finish")
        .unwrap();

    let metrics = get(&ac, &format!("http://{admin}/metrics")).await.body;
    let m = parse_metrics(&metrics);
    let metric = |name: &str| {
        m.iter()
            .find(|(n, _, _)| n == name)
            .map(|r| r.2)
            .unwrap_or(-1.0)
    };
    let applied = metric("balancer_config_reloads_total");
    let rejected = metric("balancer_config_reload_failures_total");

    let ok = tally.ok.load(SeqCst);
    let failed = tally.failed.load(SeqCst);
    eprintln!(
        "reload under load: {reload} reloads written (admin {}, SIGHUP {}, file {}), {applied} applied, \
         {rejected} rejected, final version {version}, in {reload_time:?}; {ok} requests ok, {failed} failed; \
         {observations} /status observations; stream {streamed} bytes",
        by_trigger[0], by_trigger[1], by_trigger[2]
    );
    assert_eq!(
        failed,
        0,
        "failed requests: {:?}",
        tally.errors.lock().unwrap()
    );
    assert!(ok > 1000, "too little load: {ok} requests");
    assert!(
        reload >= 60 && by_trigger.iter().all(|&n| n >= 20),
        "{by_trigger:?}"
    );
    assert_eq!(rejected, 0.0, "a reload was rejected");
    assert_eq!(applied, (version - 1) as f64, "applied reloads vs versions");
    assert_eq!(streamed, STREAM_BYTES, "the stream was cut short");
    // Every backend that was in some config got traffic: the rotation really happened.
    for b in &backends {
        assert!(b.requests() > 0, "{} never got a request", b.state.name);
    }
}

// ------------------------------------------------------------------------------------------
// (2) A config that does not validate

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in config")
        + 1
}

#[tokio::test]
async fn invalid_config_keeps_the_old_one_serving() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let good = config(&[a.addr], "round_robin", "");
    let bal = start_balancer(&good).await;
    let c = client();
    assert_eq!(get(&c, &bal.url("/")).await.body, "a");
    let path = bal.config_path.display().to_string();

    let bad: [(String, &str); 3] = [
        // Unknown key.
        (
            config(
                &[a.addr, b.addr],
                "round_robin",
                "[pools.web.health_check]\nintervall = \"1s\"\n",
            ),
            "intervall",
        ),
        // A weight out of range (0 is valid: configured, no traffic).
        (
            config(&[a.addr], "round_robin", "").replace(
                &format!("backends = [\"{}\"]", a.addr),
                &format!(
                    "backends = [\"{}\", {{ address = \"{}\", weight = 1001 }}]",
                    a.addr, b.addr
                ),
            ),
            "weight = 1001",
        ),
        // A duration without a unit.
        (
            config(
                &[a.addr, b.addr],
                "round_robin",
                "[pools.web.timeouts]\nconnect = \"2\"\n",
            ),
            "connect = \"2\"",
        ),
    ];
    for (n, (template, needle)) in bad.iter().enumerate() {
        bal.write_config(template);
        let text = std::fs::read_to_string(&bal.config_path).unwrap();
        let line = line_of(&text, needle);
        let g = post(&c, &bal.admin_url("/reload"), "").await;
        assert_eq!(g.status, 400, "bad config #{n} accepted: {}", g.body);
        let where_ = format!("{path}:{line}");
        assert!(
            g.body.contains(&where_),
            "POST /reload error {:?} does not name {where_}",
            g.body
        );

        let s = status(&bal).await;
        assert_eq!(
            s["config"]["version"], 1,
            "a rejected reload changed the version"
        );
        let last = s["config"]["last_error"]
            .as_str()
            .unwrap_or_else(|| panic!("no last_error: {s}"));
        assert!(
            last.contains(&where_),
            "last_error {last:?} does not name {where_}"
        );
        let body: serde_json::Value =
            serde_json::from_str(&g.body).unwrap_or(serde_json::Value::Null);
        if let Some(e) = body["error"].as_str() {
            assert_eq!(e, last, "POST /reload and /status disagree");
        }
        // The in-process trigger reports the same.
        let e = bal
            .handle
            .reload(balancer::reload::Trigger::Admin)
            .await
            .unwrap_err();
        assert!(e.contains(&where_), "{e}");

        // The old config keeps serving: only a, never b.
        for _ in 0..4 {
            let g = get(&c, &bal.url("/")).await;
            assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
        }
        assert_eq!(listed(&s), [a.addr].into_iter().collect());
    }
    assert_eq!(b.requests(), 0);

    // Fixed: applied, last_error cleared, b in service.
    bal.write_config(&config(&[a.addr, b.addr], "round_robin", ""));
    let g = post(&c, &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&g.body).unwrap()["version"],
        2
    );
    let s = status(&bal).await;
    assert_eq!(s["config"]["version"], 2);
    assert!(s["config"]["last_error"].is_null(), "{s}");
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(get(&c, &bal.url("/")).await.body);
    }
    assert!(names.contains(&"b".to_owned()), "{names:?}");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (3) What survives a reload

fn carry_config(web: &[(SocketAddr, u32)], hc: &[SocketAddr]) -> String {
    let web: Vec<String> = web
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    let hc: Vec<String> = hc.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n[[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/hc\"\npool = \"hc\"\n[[routes]]\npool = \"web\"\n\
         [pools.web]\nbackends = [{}]\n[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"30s\"\n\
         [pools.hc]\nbackends = [{}]\n[pools.hc.health_check]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
        web.join(", "),
        hc.join(", ")
    )
}

#[tokio::test]
async fn surviving_backends_keep_their_state_and_removed_ones_get_nothing() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let c = start_backend("c").await;
    let d = start_backend("d").await;
    let e = start_backend("e").await;
    let f = start_backend("f").await;
    let bal = start_balancer(&carry_config(
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        &[e.addr, f.addr],
    ))
    .await;
    let cl = client();

    // b's breaker opens; a and c serve.
    b.set_mode(Mode::Fail503);
    for _ in 0..9 {
        get(&cl, &bal.url("/")).await;
    }
    // e turns unhealthy.
    e.set_health(false);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            status_backend(&status(&bal).await, "hc", e.addr).unwrap()["healthy"] == false
        })
        .await
    );

    // A request in flight on c, the backend about to be removed.
    c.set_delay(Duration::from_millis(800));
    let (cr, cu) = (cl.clone(), bal.url("/"));
    let c_before = c.requests();
    let mut in_flight = None;
    for _ in 0..3 {
        let (cr, cu) = (cr.clone(), cu.clone());
        let h = tokio::spawn(async move { get(&cr, &cu).await });
        if eventually(Duration::from_millis(300), || c.requests() > c_before).await {
            in_flight = Some(h);
            break;
        }
        let g = h.await.unwrap();
        assert_eq!(g.body, "a");
    }
    let in_flight = in_flight.expect("no request reached c");

    let before = status(&bal).await;
    let ba = status_backend(&before, "web", a.addr).unwrap();
    let bb = status_backend(&before, "web", b.addr).unwrap();
    assert_eq!(bb["breaker"], "open", "{bb}");
    assert_eq!(bb["failures"], 3);
    assert_eq!(ba["requests"], 4);
    let a_conns = a.connections();

    // Reload: c goes, d comes, a's weight changes, b and the hc pool stay.
    bal.write_config(&carry_config(
        &[(a.addr, 2), (b.addr, 1), (d.addr, 1)],
        &[e.addr, f.addr],
    ));
    let v = bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    assert_eq!(v, 2);
    let after = status(&bal).await;
    let aa = status_backend(&after, "web", a.addr).unwrap();
    let ab = status_backend(&after, "web", b.addr).unwrap();
    assert_eq!(
        aa["requests"], ba["requests"],
        "a's counter reset by the reload"
    );
    assert_eq!(aa["weight"], 2);
    assert_eq!(ab["breaker"], "open", "b's breaker reset by the reload");
    assert_eq!(
        ab["failures"], bb["failures"],
        "b's failures reset by the reload"
    );
    assert_eq!(
        status_backend(&after, "hc", e.addr).unwrap()["healthy"],
        false,
        "e's health reset by the reload"
    );
    assert!(
        status_backend(&after, "web", c.addr).is_none(),
        "removed backend still listed"
    );
    assert_eq!(
        status_backend(&after, "web", d.addr).unwrap()["requests"],
        0
    );

    // The request on c finishes on the config it started with.
    let g = in_flight.await.unwrap();
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "c"));

    // New traffic: a and d only (b is open, c is gone), a over its pooled connection.
    let c_after = c.requests();
    let b_after = b.requests();
    let mut names = Vec::new();
    for _ in 0..15 {
        let g = get(&cl, &bal.url("/")).await;
        assert_eq!(g.status, 200);
        names.push(g.body);
    }
    assert_eq!(c.requests(), c_after, "a removed backend got a new request");
    assert_eq!(b.requests(), b_after, "b's open breaker was forgotten");
    let to_a = names.iter().filter(|n| *n == "a").count() as u64;
    let to_d = names.iter().filter(|n| *n == "d").count() as u64;
    assert_eq!(to_a + to_d, 15, "{names:?}");
    assert!(to_a >= 5 && to_d >= 3, "{names:?}");
    assert_eq!(
        a.connections(),
        a_conns,
        "a's pooled connection was dropped by the reload"
    );
    let s = status(&bal).await;
    let a_now = status_backend(&s, "web", a.addr).unwrap()["requests"]
        .as_u64()
        .unwrap();
    assert_eq!(a_now, 4 + to_a, "a's counter after the reload");
    // The hc pool: only f serves.
    for _ in 0..4 {
        assert_eq!(get(&cl, &bal.url("/hc")).await.body, "f");
    }
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (4) Listeners follow the config

#[tokio::test]
async fn listeners_are_bound_and_released_on_reload() {
    let a = start_backend("a").await;
    let base = config(&[a.addr], "round_robin", "");
    let bal = start_balancer(&base).await;
    let extra = free_port();
    let with_extra = base.replace(
        "[pools.web]",
        &format!("[[listeners]]\nbind = \"{extra}\"\n[pools.web]"),
    );
    let c = client();
    assert!(
        std::net::TcpStream::connect(extra).is_err(),
        "port {extra} taken already"
    );

    bal.write_config(&with_extra);
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(2)
    );
    let g = get(&c, &format!("http://{extra}/")).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    assert_eq!(get(&c, &bal.url("/")).await.body, "a");

    // A slow request on the extra listener, in flight when it is removed, still finishes.
    a.set_delay(Duration::from_millis(800));
    let before = a.requests();
    let (c2, u2) = (client(), format!("http://{extra}/slow"));
    let slow = tokio::spawn(async move { get(&c2, &u2).await });
    assert!(eventually(Duration::from_secs(5), || a.requests() > before).await);

    bal.write_config(&base);
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(3)
    );
    let refused = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect(extra).is_err()
    })
    .await;
    assert!(refused, "the removed listener still accepts connections");
    let g = slow.await.unwrap();
    assert_eq!(
        (g.status.as_u16(), g.body.as_str()),
        (200, "a"),
        "in-flight request on a removed listener"
    );
    a.set_delay(Duration::ZERO);
    assert_eq!(
        get(&c, &bal.url("/")).await.body,
        "a",
        "the remaining listener stopped"
    );

    // And it can come back.
    bal.write_config(&with_extra);
    assert_eq!(
        bal.handle.reload(balancer::reload::Trigger::Admin).await,
        Ok(4)
    );
    let g = get(&client(), &format!("http://{extra}/")).await;
    assert_eq!(g.body, "a");
    bal.shutdown().await;
}

/// A listener that cannot be bound rejects the reload whole: nothing of it is applied.
#[tokio::test]
async fn a_busy_port_rejects_the_whole_reload() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let base = config(&[a.addr], "round_robin", "");
    let bal = start_balancer(&base).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let free = free_port();
    let text = config(&[a.addr, b.addr], "round_robin", "").replace(
        "[pools.web]",
        &format!(
            "[[listeners]]\nbind = \"{free}\"\n[[listeners]]\nbind = \"{busy_addr}\"\n[pools.web]"
        ),
    );
    bal.write_config(&text);
    let c = client();
    let g = post(&c, &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 400, "{}", g.body);
    assert!(g.body.contains(&busy_addr.to_string()), "{}", g.body);
    let s = status(&bal).await;
    assert_eq!(s["config"]["version"], 1);
    assert!(
        s["config"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&busy_addr.to_string())),
        "{s}"
    );
    assert_eq!(
        listed(&s),
        [a.addr].into_iter().collect(),
        "half of a rejected reload applied"
    );
    assert!(
        std::net::TcpStream::connect(free).is_err(),
        "a listener of a rejected reload was bound"
    );
    for _ in 0..4 {
        assert_eq!(get(&c, &bal.url("/")).await.body, "a");
    }

    drop(busy);
    let g = post(&c, &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(get(&c, &format!("http://{busy_addr}/")).await.status, 200);
    assert_eq!(get(&c, &format!("http://{free}/")).await.status, 200);
    assert!(status(&bal).await["config"]["last_error"].is_null());
    bal.shutdown().await;
}

/// `[admin].bind` moves on reload: the answer to the reload still arrives, the new address
/// serves the API and the old one is released.
#[tokio::test]
async fn the_admin_listener_moves_with_its_config() {
    let a = start_backend("a").await;
    let base = config(&[a.addr], "round_robin", "");
    let bal = start_balancer(&base).await;
    let moved = free_port();
    bal.write_config(&base.replace("{admin}", &moved.to_string()));
    let c = client();
    let g = post(&c, &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    let s = status_at(moved).await;
    assert_eq!(s["config"]["version"], 2);
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
            bal.admin
        )
        .is_err())
        .await,
        "the old admin address still accepts"
    );
    assert_eq!(get(&c, &bal.url("/")).await.body, "a");
    bal.shutdown().await;
}
