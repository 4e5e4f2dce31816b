//! The dashboard (`GET /`) in a real browser: headless Chromium driven over the DevTools
//! protocol (chromiumoxide) against an in-process balancer and real backends. It checks that
//! the page lists the backends, follows one going down within seconds, drains one from its
//! button, logs no console error or exception, and leaves a screenshot under load:
//!
//! ```text
//! cargo test --test dashboard screenshot -- --nocapture   # writes target/dashboard.png
//! ```
//!
//! Also the `/events` stream itself, without a browser: its framing, and that it ends when
//! the balancer shuts down. Needs Debian's `chromium` (.ci/run installs it).

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::emulation::{
    MediaFeature, SetDeviceMetricsOverrideParams,
};
use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::{Page, ScreenshotParams};
use futures_util::StreamExt;
use http_body_util::BodyExt;

/// One browser at a time: the machine has two cores, and the timing checks ("down within a few
/// seconds") should measure the page, not three Chromiums fighting for them.
static BROWSER_SLOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chromium() -> PathBuf {
    // The binary itself rather than Debian's /usr/bin/chromium wrapper script, which only adds
    // flags from /etc/chromium.d meant for desktop use.
    for p in [
        "/usr/lib/chromium/chromium",
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
    ] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("tests/dashboard.rs needs Chromium: apt-get install -y chromium (as .ci/run does)");
}

/// A headless Chromium, its page, and every console error, warning and uncaught exception
/// the page produced.
struct Chrome {
    browser: Browser,
    page: Page,
    problems: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
    _slot: tokio::sync::MutexGuard<'static, ()>,
}

impl Chrome {
    async fn open(url: &str, width: u32, height: u32) -> Chrome {
        let slot = BROWSER_SLOT.lock().await;
        // A profile of its own: Chromium refuses a profile directory another instance holds.
        let profile = tempfile::tempdir().unwrap();
        let config = BrowserConfig::builder()
            .chrome_executable(chromium())
            // Tests run as root here (and in CI), and Chromium's sandbox refuses to start as
            // root; the page under test is our own, served from loopback.
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(width, height)
            .viewport(Viewport {
                width,
                height,
                device_scale_factor: Some(1.0),
                ..Viewport::default()
            })
            // No GPU in a container; /dev/shm may be small.
            .args(["--disable-gpu", "--disable-dev-shm-usage"])
            .launch_timeout(Duration::from_secs(60))
            .build()
            .expect("browser config");
        let (browser, mut handler) = Browser::launch(config).await.expect("Chromium starts");
        tokio::spawn(async move { while handler.next().await.is_some() {} });
        let page = browser.new_page("about:blank").await.expect("a blank page");
        let problems = Arc::new(Mutex::new(Vec::new()));
        // Listen before navigating, so that nothing the page says while loading is missed.
        page.enable_log().await.expect("Log.enable");
        let mut console = page
            .event_listener::<EventConsoleApiCalled>()
            .await
            .unwrap();
        let mut thrown = page.event_listener::<EventExceptionThrown>().await.unwrap();
        let mut log = page.event_listener::<EventEntryAdded>().await.unwrap();
        let p = Arc::clone(&problems);
        tokio::spawn(async move {
            while let Some(e) = console.next().await {
                if matches!(
                    e.r#type,
                    ConsoleApiCalledType::Error
                        | ConsoleApiCalledType::Warning
                        | ConsoleApiCalledType::Assert
                ) {
                    let args: Vec<String> = e
                        .args
                        .iter()
                        .map(|a| {
                            a.value
                                .as_ref()
                                .map(|v| v.to_string())
                                .or_else(|| a.description.clone())
                                .unwrap_or_default()
                        })
                        .collect();
                    p.lock()
                        .unwrap()
                        .push(format!("console.{:?}: {}", e.r#type, args.join(" ")));
                }
            }
        });
        let p = Arc::clone(&problems);
        tokio::spawn(async move {
            while let Some(e) = thrown.next().await {
                let d = &e.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|x| x.description.clone())
                    .unwrap_or_else(|| d.text.clone());
                p.lock().unwrap().push(format!(
                    "exception: {what} at {}:{}",
                    d.line_number, d.column_number
                ));
            }
        });
        let p = Arc::clone(&problems);
        tokio::spawn(async move {
            while let Some(e) = log.next().await {
                // Network failures, CSP violations, 404s of the page's own requests.
                if matches!(e.entry.level, LogEntryLevel::Error | LogEntryLevel::Warning) {
                    p.lock().unwrap().push(format!(
                        "log {:?} {:?}: {} {}",
                        e.entry.level,
                        e.entry.source,
                        e.entry.text,
                        e.entry.url.clone().unwrap_or_default()
                    ));
                }
            }
        });
        page.goto(url).await.expect("the dashboard loads");
        // In front, as a tab someone looks at: a background tab gets throttled timers.
        page.bring_to_front().await.expect("bring to front");
        Chrome {
            browser,
            page,
            problems,
            _profile: profile,
            _slot: slot,
        }
    }

    /// Evaluates `js` in the page; its value as JSON.
    async fn eval(&self, js: &str) -> serde_json::Value {
        self.page
            .evaluate(js)
            .await
            .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
            .into_value()
            .unwrap_or(serde_json::Value::Null)
    }

    /// Polls `js` every 100 ms until it is `true`; panics with `what` and the page's text.
    async fn wait_for(&self, limit: Duration, what: &str, js: &str) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.eval(js).await == serde_json::Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let text = self.eval("document.body.innerText").await;
                panic!(
                    "{what}: not within {limit:?}\npage text:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of `field` in the row of backend `addr`.
    async fn cell(&self, addr: SocketAddr, field: &str) -> String {
        let js = format!(
            "(() => {{ const c = document.querySelector('tr[data-address=\"{addr}\"] [data-field=\"{field}\"]'); return c ? c.innerText : null; }})()"
        );
        self.eval(&js).await.as_str().unwrap_or("").to_owned()
    }

    fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }

    async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
    }
}

fn assert_no_problems(c: &Chrome, allowed: impl Fn(&str) -> bool) {
    let problems: Vec<String> = c.problems().into_iter().filter(|p| !allowed(p)).collect();
    assert!(
        problems.is_empty(),
        "the page logged problems:\n{}",
        problems.join("\n")
    );
}

fn template(backends: &[SocketAddr], extra: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!(
            "[pools.web.health_check]\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\n\
             unhealthy_threshold = 2\nhealthy_threshold = 1\n{extra}"
        ),
    )
}

/// `n` requests through the balancer, `conc` at a time; bounded, and over in seconds.
async fn traffic(url: String, n: usize, conc: usize) {
    let c = client();
    let per = n / conc.max(1);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let req = hyper::Request::get(&url).body(full("")).unwrap();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_backends_and_shows_one_going_down() {
    let a = start_backend("a").await;
    let mut b = start_backend("b").await;
    let bal = start_balancer(&template(&[a.addr, b.addr], "")).await;
    let chrome = Chrome::open(&bal.admin_url("/"), 1280, 900).await;

    chrome
        .wait_for(
            Duration::from_secs(10),
            "both backends listed",
            &format!(
                "document.querySelectorAll('tr[data-address=\"{}\"], tr[data-address=\"{}\"]').length === 2",
                a.addr, b.addr
            ),
        )
        .await;
    assert_eq!(chrome.cell(b.addr, "health").await, "healthy");
    assert!(chrome.cell(a.addr, "breaker").await.starts_with("closed"));
    let facts = chrome
        .eval("document.getElementById('facts').innerText")
        .await;
    let facts = facts.as_str().unwrap_or("");
    assert!(facts.contains("v1"), "config version shown: {facts}");
    assert!(
        facts.contains(&bal.addr.to_string()),
        "listener shown: {facts}"
    );

    // Traffic moves the request rate off "–".
    traffic(bal.url("/"), 40, 4).await;
    chrome
        .wait_for(
            Duration::from_secs(5),
            "a request rate shown",
            &format!("document.querySelector('tr[data-address=\"{}\"] [data-field=rps]').innerText !== '–'", a.addr),
        )
        .await;

    // Stop b: health probes fail from now on, and the row must say so within seconds.
    b.stop();
    let stopped = tokio::time::Instant::now();
    traffic(bal.url("/"), 10, 2).await;
    chrome
        .wait_for(
            Duration::from_secs(4),
            "the stopped backend's row shows it down",
            &format!(
                "(() => {{ const r = document.querySelector('tr[data-address=\"{}\"]'); return !!r && r.classList.contains('bad') && r.querySelector('[data-field=health]').innerText === 'down'; }})()",
                b.addr
            ),
        )
        .await;
    println!(
        "row showed the backend down {:?} after it stopped",
        stopped.elapsed()
    );
    let up = chrome
        .eval("document.getElementById('f-up').innerText")
        .await;
    assert_eq!(up.as_str(), Some("1 / 2"), "backends up in the summary");
    assert_eq!(chrome.cell(a.addr, "health").await, "healthy");
    assert_no_problems(&chrome, |_| false);
    chrome.close().await;
    bal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_button_drains_the_backend() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let bal = start_balancer(&template(&[a.addr, b.addr], "")).await;
    let chrome = Chrome::open(&bal.admin_url("/"), 1280, 900).await;
    let button = format!("tr[data-address=\"{}\"] button[data-action=drain]", a.addr);
    chrome
        .wait_for(
            Duration::from_secs(10),
            "the drain button",
            &format!("!!document.querySelector('{button}')"),
        )
        .await;

    chrome
        .page
        .find_element(button.as_str())
        .await
        .expect("drain button")
        .click()
        .await
        .expect("click");
    wait_status(
        &bal,
        Duration::from_secs(5),
        "admin_state drain after the click",
        |s| entry(s, a.addr)["admin_state"] == "drain",
    )
    .await;
    chrome
        .wait_for(
            Duration::from_secs(4),
            "the row shows drain",
            &format!("document.querySelector('tr[data-address=\"{}\"] [data-field=admin]').innerText.startsWith('drain')", a.addr),
        )
        .await;
    assert_eq!(entry(&status(&bal).await, b.addr)["admin_state"], "enabled");
    assert_no_problems(&chrome, |_| false);
    chrome.close().await;
    bal.shutdown().await;
}

/// With `[admin] token_file` the stream answers 401: the page asks for the token, keeps it in
/// sessionStorage, and sends it with the stream and with its buttons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_asks_for_the_admin_token_and_keeps_it() {
    const TOKEN: &str = "dash-test-token-0123456789";
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let text = template(&[a.addr, b.addr], "").replace(
        "bind = \"{admin}\"\n",
        &format!(
            "bind = \"{{admin}}\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let bal = start_balancer(&text).await;
    let chrome = Chrome::open(&bal.admin_url("/"), 1280, 900).await;
    chrome
        .wait_for(
            Duration::from_secs(10),
            "the token dialog",
            "!document.getElementById('token-overlay').hidden",
        )
        .await;
    let input = chrome
        .page
        .find_element("#token-input")
        .await
        .expect("token input");
    input.click().await.expect("focus");
    input.type_str(TOKEN).await.expect("typing");
    input.press_key("Enter").await.expect("enter");
    chrome
        .wait_for(
            Duration::from_secs(10),
            "backends listed once the token is given",
            "document.querySelectorAll('tr[data-address]').length === 2",
        )
        .await;
    let kept = chrome
        .eval("sessionStorage.getItem('balancer.adminToken')")
        .await;
    assert_eq!(kept.as_str(), Some(TOKEN));

    chrome
        .page
        .find_element(format!(
            "tr[data-address=\"{}\"] button[data-action=drain]",
            a.addr
        ))
        .await
        .expect("drain button")
        .click()
        .await
        .expect("click");
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let req = hyper::Request::get(bal.admin_url("/status"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(""))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(g.status, 200, "{}", g.body);
        let s: serde_json::Value = serde_json::from_str(&g.body).unwrap();
        if entry(&s, a.addr)["admin_state"] == "drain" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not drained: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first, token-less request for the stream was refused: the one error Chrome logs.
    assert_no_problems(&chrome, |p| p.contains("401"));
    chrome.close().await;
    bal.shutdown().await;
}

/// The screenshot in the README: two pools under load, one backend slow, one failing part of
/// its requests, one stopped. Writes `target/dashboard.png` (laptop), `target/dashboard-dark.png`
/// (the dark scheme) and `target/dashboard-phone.png` (the whole page at phone width).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshot_under_load() {
    let a = start_backend("a").await;
    let slow = start_backend("slow").await;
    slow.set_delay(Duration::from_millis(40));
    let flaky = start_backend("flaky").await;
    let mut gone = start_backend("gone").await;
    let api1 = start_backend("api1").await;
    let api2 = start_backend("api2").await;
    let extra = format!(
        "[pools.web.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"30s\"\n\
         [[routes]]\npath_prefix = \"/api\"\npool = \"api\"\n[[routes]]\npool = \"web\"\n\
         [pools.api]\nstrategy = \"least_connections\"\nbackends = [\"{}\", {{ address = \"{}\", weight = 3 }}]\n",
        api1.addr, api2.addr
    );
    let bal = start_balancer(&template(
        &[a.addr, slow.addr, flaky.addr, gone.addr],
        &extra,
    ))
    .await;
    let chrome = Chrome::open(&bal.admin_url("/"), 1440, 900).await;
    chrome
        .wait_for(
            Duration::from_secs(10),
            "rows listed",
            "document.querySelectorAll('tr[data-address]').length === 6",
        )
        .await;
    // Operator actions, where this build has them: one backend draining, one re-weighted.
    for (addr, body) in [
        (api1.addr, r#"{"state": "drain"}"#),
        (a.addr, r#"{"weight": 2}"#),
    ] {
        let url = bal.admin_url(&format!(
            "/pools/{}/backends/{addr}",
            if addr == a.addr { "web" } else { "api" }
        ));
        let g = post(&client(), &url, body).await;
        assert_eq!(g.status, 200, "{}", g.body);
    }
    // Steady load (bounded: it stops when told, or after 60 s) so that the charts have some
    // history and the screenshots show rates; `flaky` fails now and then, `gone` stops
    // halfway.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (url, pace) in [
        (bal.url("/"), 15),
        (bal.url("/"), 25),
        (bal.url("/api/x"), 30),
    ] {
        let stop = Arc::clone(&stop);
        load.push(tokio::spawn(async move {
            let c = client();
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && tokio::time::Instant::now() < until
            {
                let req = hyper::Request::get(&url).body(full("")).unwrap();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await;
                tokio::time::sleep(Duration::from_millis(pace)).await;
            }
        }));
    }
    for round in 0..12 {
        // Failing twice: the second time late enough that its breaker is still open in the
        // screenshot.
        flaky.set_mode(if round == 2 || round == 9 {
            Mode::Fail503
        } else {
            Mode::Ok
        });
        if round == 6 {
            gone.stop();
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    flaky.set_mode(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("dashboard.png");
    chrome
        .page
        .save_screenshot(
            ScreenshotParams::builder()
                .format(CaptureScreenshotFormat::Png)
                .full_page(true)
                .build(),
            &png,
        )
        .await
        .expect("screenshot");
    println!("wrote {}", png.display());

    // The same in the browser's dark scheme, which the page follows.
    chrome
        .page
        .emulate_media_features(vec![MediaFeature {
            name: "prefers-color-scheme".into(),
            value: "dark".into(),
        }])
        .await
        .expect("dark scheme");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let dark = dir.join("dashboard-dark.png");
    chrome
        .page
        .save_screenshot(
            ScreenshotParams::builder()
                .format(CaptureScreenshotFormat::Png)
                .build(),
            &dark,
        )
        .await
        .expect("dark screenshot");
    println!("wrote {}", dark.display());
    chrome
        .page
        .emulate_media_features(Vec::new())
        .await
        .expect("light scheme");

    // A phone: 390 px wide, as a phone lays it out.
    chrome
        .page
        .execute(
            SetDeviceMetricsOverrideParams::builder()
                .width(390)
                .height(844)
                .device_scale_factor(2.0)
                .mobile(true)
                .build()
                .unwrap(),
        )
        .await
        .expect("phone metrics");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wide = chrome
        .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(
        wide,
        serde_json::Value::Bool(true),
        "no sideways scrolling on a phone"
    );
    // The whole page at phone width: as tall as its content, still laid out as a phone.
    let tall = chrome
        .eval("document.documentElement.scrollHeight")
        .await
        .as_i64()
        .unwrap_or(844);
    chrome
        .page
        .execute(
            SetDeviceMetricsOverrideParams::builder()
                .width(390)
                .height(tall.clamp(844, 8000))
                .device_scale_factor(2.0)
                .mobile(true)
                .build()
                .unwrap(),
        )
        .await
        .expect("phone metrics, full height");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let phone = dir.join("dashboard-phone.png");
    chrome
        .page
        .save_screenshot(
            ScreenshotParams::builder()
                .format(CaptureScreenshotFormat::Png)
                .build(),
            &phone,
        )
        .await
        .expect("phone screenshot");
    println!("wrote {}", phone.display());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    assert_no_problems(&chrome, |_| false);
    chrome.close().await;
    bal.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Without a browser

/// Reads `/events` until `n` status events arrived (or 10 s passed); their JSON.
async fn read_events(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    n: usize,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            if block.starts_with("event: status\n") {
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("a data line");
                out.push(serde_json::from_str(data).expect("status JSON"));
            }
        }
        if out.len() >= n {
            break;
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("events within 10 s")
            .expect("stream open")
            .expect("frame");
        if let Ok(d) = frame.into_data() {
            buf.push_str(std::str::from_utf8(&d).expect("utf-8"));
        }
    }
    out
}

#[tokio::test]
async fn events_stream_status_at_once_then_every_second_and_end_at_shutdown() {
    let a = start_backend("a").await;
    let bal = start_balancer(&template(&[a.addr], "")).await;
    let c = client();
    let req = hyper::Request::get(bal.admin_url("/events"))
        .body(full(""))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let mut body = resp.into_body();
    let mut buf = String::new();
    let started = tokio::time::Instant::now();
    let first = read_events(&mut body, &mut buf, 1).await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "first event at once"
    );
    assert_eq!(entry(&first[0], a.addr)["healthy"], true);
    // Nothing changes: the next ones come about a second apart.
    let t = tokio::time::Instant::now();
    let next = read_events(&mut body, &mut buf, 2).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "two periodic events took {took:?}"
    );
    assert!(next[1]["process"]["uptime_s"].as_f64() > first[0]["process"]["uptime_s"].as_f64());

    // A change goes out at once, not at the next second.
    let _ = read_events(&mut body, &mut buf, 1).await;
    a.set_health(false);
    let t = tokio::time::Instant::now();
    loop {
        let e = read_events(&mut body, &mut buf, 1).await;
        if entry(&e[0], a.addr)["healthy"] == false {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "unhealthy never streamed"
        );
    }
    println!(
        "unhealthy streamed {:?} after the health endpoint failed",
        t.elapsed()
    );

    // Shutdown ends the stream (and so the connection) instead of leaving it hanging.
    let done = tokio::spawn(bal.shutdown());
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.frame().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the events stream outlived shutdown");
    done.await.unwrap();
}

#[tokio::test]
async fn dashboard_page_is_self_contained() {
    let a = start_backend("a").await;
    let bal = start_balancer(&template(&[a.addr], "")).await;
    let g = get(&client(), &bal.admin_url("/")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.headers["content-type"], "text/html; charset=utf-8");
    let csp = g.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(g.body.contains("<title>balancer"));
    // Nothing from elsewhere: no scheme-qualified URL but the SVG namespace, which names and
    // does not fetch.
    const SVG_NS: &str = "http://www.w3.org/2000/svg";
    for (i, _) in g.body.match_indices("://") {
        let at = g.body.get(i.saturating_sub(4)..).unwrap_or("");
        assert!(
            at.starts_with(SVG_NS),
            "external reference at {:?}",
            at.get(..40)
        );
    }
    assert!(!g.body.contains("src=\"http") && !g.body.contains("href=\"http"));
    // Only GET.
    let p = post(&client(), &bal.admin_url("/"), "").await;
    assert_eq!(p.status, 405);
    let p = post(&client(), &bal.admin_url("/events"), "").await;
    assert_eq!(p.status, 405);
    bal.shutdown().await;
}
