//! Test harness: real backends the test controls, the real balancer (in-process or as the
//! binary), real clients. Everything binds 127.0.0.1:0; nothing sleeps waiting for a port.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub mod raw_http;

pub type TestBody = BoxBody<Bytes, hyper::Error>;

pub fn full(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

// ------------------------------------------------------------------------------------------
// Backends

/// What a test backend does with each request (switchable at runtime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// 200 with the backend's name as body and `x-backend: NAME`.
    Ok = 0,
    /// 500 for every request (health endpoint included).
    Fail500 = 1,
    /// Never answers (holds the request open).
    Hang = 2,
    /// Closes the connection as soon as a request arrives, without answering.
    Close = 3,
    /// 503 for every request (health endpoint included): a backend saying it is down, which
    /// the breaker counts by default (a 500 it does not).
    Fail503 = 4,
}

pub struct BackendState {
    pub name: String,
    mode: AtomicU8,
    /// Health endpoint (`/healthz`) answer, separately switchable: true = 200, false = 503.
    health_ok: std::sync::atomic::AtomicBool,
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    pub health_probes: AtomicU64,
    /// Headers of the last non-health request, for header assertions.
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    pub last_uri: Mutex<Option<String>>,
    /// Delay before answering, in ms.
    pub delay_ms: AtomicU64,
}

pub struct TestBackend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    stop: Option<oneshot::Sender<()>>,
}

impl TestBackend {
    pub fn set_mode(&self, m: Mode) {
        self.state.mode.store(m as u8, SeqCst);
    }
    pub fn set_health(&self, ok: bool) {
        self.state.health_ok.store(ok, SeqCst);
    }
    pub fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, SeqCst);
    }
    pub fn requests(&self) -> u64 {
        self.state.requests.load(SeqCst)
    }
    pub fn connections(&self) -> u64 {
        self.state.connections.load(SeqCst)
    }
    /// Stops listening (new connections are refused); existing connections are closed.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
    /// Listens again on the same address after `stop`.
    pub async fn restart(&mut self) {
        let listener = bind_reuse(self.addr);
        self.stop = Some(serve_backend(listener, Arc::clone(&self.state)));
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind_reuse(addr: SocketAddr) -> TcpListener {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.set_nonblocking(true).unwrap();
    sock.bind(&addr.into()).unwrap();
    sock.listen(1024).unwrap();
    TcpListener::from_std(sock.into()).unwrap()
}

pub async fn start_backend(name: &str) -> TestBackend {
    let listener = bind_reuse("127.0.0.1:0".parse().unwrap());
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(BackendState {
        name: name.to_owned(),
        mode: AtomicU8::new(Mode::Ok as u8),
        health_ok: std::sync::atomic::AtomicBool::new(true),
        requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        health_probes: AtomicU64::new(0),
        last_headers: Mutex::new(None),
        last_uri: Mutex::new(None),
        delay_ms: AtomicU64::new(0),
    });
    let stop = serve_backend(listener, Arc::clone(&state));
    TestBackend {
        addr,
        state,
        stop: Some(stop),
    }
}

fn serve_backend(listener: TcpListener, state: Arc<BackendState>) -> oneshot::Sender<()> {
    let (tx, mut rx) = oneshot::channel::<()>();
    let (conn_stop_tx, conn_stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => { let _ = conn_stop_tx.send(true); return; }
                a = listener.accept() => {
                    let Ok((stream, _)) = a else { continue };
                    state.connections.fetch_add(1, SeqCst);
                    let state = Arc::clone(&state);
                    let mut stop = conn_stop_rx.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| backend_handle(Arc::clone(&state), req));
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        tokio::select! {
                            _ = conn => {}
                            _ = stop.wait_for(|s| *s) => {}
                        }
                    });
                }
            }
        }
    });
    tx
}

async fn backend_handle(
    state: Arc<BackendState>,
    req: Request<Incoming>,
) -> Result<Response<TestBody>, std::io::Error> {
    let mode = state.mode.load(SeqCst);
    if req.uri().path() == "/healthz" {
        state.health_probes.fetch_add(1, SeqCst);
        let ok = state.health_ok.load(SeqCst) && mode == Mode::Ok as u8;
        let mut r = Response::new(full(if ok { "ok" } else { "sick" }));
        if !ok {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(r);
    }
    state.requests.fetch_add(1, SeqCst);
    *state.last_headers.lock().unwrap() = Some(req.headers().clone());
    *state.last_uri.lock().unwrap() = Some(req.uri().to_string());
    let delay = state.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    match mode {
        m if m == Mode::Hang as u8 => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        m if m == Mode::Close as u8 => Err(std::io::Error::other("closing on purpose")),
        m if m == Mode::Fail500 as u8 || m == Mode::Fail503 as u8 => {
            let mut r = Response::new(full("boom"));
            *r.status_mut() = if m == Mode::Fail500 as u8 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            r.headers_mut()
                .insert("x-backend", state.name.parse().unwrap());
            Ok(r)
        }
        _ => {
            let path = req.uri().path().to_owned();
            if path.starts_with("/echo") {
                // Echo the request body back, streaming.
                let mut r = Response::new(req.into_body().boxed());
                r.headers_mut()
                    .insert("x-backend", state.name.parse().unwrap());
                return Ok(r);
            }
            if let Some(n) = path.strip_prefix("/bytes/") {
                // /bytes/N: N bytes of 'x', streamed in 64 KiB chunks.
                let n: u64 = n.parse().unwrap_or(0);
                let chunks = futures_chunks(n);
                let mut r = Response::new(chunks);
                r.headers_mut()
                    .insert("x-backend", state.name.parse().unwrap());
                return Ok(r);
            }
            let mut r = Response::new(full(state.name.clone()));
            r.headers_mut()
                .insert("x-backend", state.name.parse().unwrap());
            // Hop-by-hop headers that must not reach the client.
            r.headers_mut()
                .insert("connection", "x-backend-private".parse().unwrap());
            r.headers_mut()
                .insert("x-backend-private", "secret".parse().unwrap());
            r.headers_mut()
                .insert("keep-alive", "timeout=30".parse().unwrap());
            Ok(r)
        }
    }
}

fn futures_chunks(n: u64) -> TestBody {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            if tx.send_data(chunk.slice(..k)).await.is_err() {
                return;
            }
            left -= k as u64;
        }
    });
    body.boxed()
}

// ------------------------------------------------------------------------------------------
// The balancer, in-process

pub struct Balancer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub handle: balancer::ReloadHandle,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

impl Balancer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    /// Rewrites the config file (same `{listen}`/`{admin}` substitution as at start).
    pub fn write_config(&self, template: &str) {
        let text = template
            .replace("{listen}", &self.addr.to_string())
            .replace("{admin}", &self.admin.to_string());
        std::fs::write(&self.config_path, text).unwrap();
    }
    pub fn shared(&self) -> Arc<balancer::state::Shared> {
        self.handle.shared()
    }
    /// Triggers a graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

/// Starts the balancer in-process on the config `template`, where `{listen}` and `{admin}`
/// are replaced with addresses the harness bound on 127.0.0.1:0.
pub async fn start_balancer(template: &str) -> Balancer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("balancer.toml");
    let text = template
        .replace("{listen}", &addr.to_string())
        .replace("{admin}", &admin_addr.to_string());
    std::fs::write(&config_path, &text).unwrap();
    let config = balancer::Config::load(&config_path)
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    let opts = balancer::Options {
        config_path: config_path.clone(),
        config,
        prebound: vec![listener, admin],
        sighup: false,
    };
    let (tx, rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let done = tokio::spawn(async move {
        let r = balancer::run(
            opts,
            async move {
                let _ = rx.await;
            },
            move |h| {
                let _ = ready_tx.send(h);
            },
        )
        .await;
        if let Err(e) = r {
            panic!("balancer failed: {e}");
        }
    });
    let handle = ready_rx.await.expect("balancer did not start");
    Balancer {
        addr,
        admin: admin_addr,
        handle,
        config_path,
        dir,
        shutdown: Some(tx),
        done: Some(done),
    }
}

// ------------------------------------------------------------------------------------------
// The balancer, as the real binary (for signals, exit codes and RSS)

pub struct BinaryBalancer {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl BinaryBalancer {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for BinaryBalancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound then released; the binary binds it right after).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_balancer"))
}

/// Starts `target/.../balancer --config FILE` and waits until it accepts connections.
pub fn start_binary(template: &str, stdout: Stdio) -> BinaryBalancer {
    let mut stdout = Some(stdout);
    start_binary_with(template, |c| {
        c.stdout(stdout.take().unwrap_or_else(Stdio::piped))
            .stderr(Stdio::inherit());
    })
    .0
}

/// Starts the binary on `template` (`{listen}` and `{admin}` filled with free ports), `set`
/// choosing its stdio and environment, and waits until it listens. A piped stderr is collected
/// into the returned `Stderr`.
///
/// The binary binds ports picked by `free_port`, which another test may take in between; a
/// connection to the port would then reach that test's server. So readiness is the child
/// itself listening there (read from /proc), and a child that exited at start (its port was
/// taken) is started again on other ports.
pub fn start_binary_with(
    template: &str,
    mut set: impl FnMut(&mut Command),
) -> (BinaryBalancer, Stderr) {
    for _ in 0..5 {
        let addr = free_port();
        let admin = free_port();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("balancer.toml");
        let text = template
            .replace("{listen}", &addr.to_string())
            .replace("{admin}", &admin.to_string());
        std::fs::write(&config_path, text).unwrap();
        let mut command = Command::new(binary());
        command.arg("--config").arg(&config_path);
        set(&mut command);
        let mut child = command.spawn().unwrap();
        let log = Stderr::collect(&mut child);
        let mut b = BinaryBalancer {
            child,
            addr,
            admin,
            dir,
            config_path,
        };
        for _ in 0..500 {
            if let Ok(Some(_)) = b.child.try_wait() {
                break;
            }
            if child_listens(b.child.id(), addr) {
                return (b, log);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if b.child.try_wait().ok().flatten().is_none() {
            panic!("balancer did not listen on {addr}:\n{}", log.text());
        }
        // Exited at start: most likely a port another test took first. Try other ports.
    }
    panic!("balancer binary kept exiting at start");
}

/// A child's stderr, collected line by line on a thread (empty if it was not piped).
#[derive(Clone, Default)]
pub struct Stderr(Arc<Mutex<String>>);

impl Stderr {
    pub fn collect(child: &mut Child) -> Stderr {
        let log = Stderr::default();
        if let Some(pipe) = child.stderr.take() {
            let sink = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    let mut s = sink.0.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        log
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `needle` has appeared `n` times; panics with the log after 10 s.
    pub fn wait_for(&self, needle: &str, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.count(needle) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} did not appear {n} time(s) on stderr:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether process `pid` holds a listening TCP socket on `addr` (Linux /proc; elsewhere, or
/// for IPv6, whether `addr` accepts a connection).
pub fn child_listens(pid: u32, addr: SocketAddr) -> bool {
    let (SocketAddr::V4(v4), Ok(table)) = (addr, std::fs::read_to_string("/proc/net/tcp")) else {
        return StdTcpStream::connect(addr).is_ok();
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

// ------------------------------------------------------------------------------------------
// Clients

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

pub async fn send(c: &HttpClient, req: Request<TestBody>) -> Got {
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn get(c: &HttpClient, url: &str) -> Got {
    let req = Request::get(url).body(full(Bytes::new())).unwrap();
    send(c, req).await
}

pub async fn post(c: &HttpClient, url: &str, body: impl Into<Bytes>) -> Got {
    let req = Request::post(url).body(full(body.into())).unwrap();
    send(c, req).await
}

/// Writes raw bytes to `addr` and reads until the peer closes or `limit` passes.
pub fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = StdTcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON of `GET /status`.
pub async fn status(b: &Balancer) -> serde_json::Value {
    let g = get(&client(), &b.admin_url("/status")).await;
    assert_eq!(g.status, 200, "{}", g.body);
    serde_json::from_str(&g.body).unwrap()
}

/// `wait_until` for a plain condition.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut cond: F) -> bool {
    wait_until(limit, || std::future::ready(cond())).await
}

/// A minimal config: one listener, the admin API, one pool of `backends`, extra TOML appended.
pub fn config(backends: &[SocketAddr], strategy: &str, extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nstrategy = \"{strategy}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

#[allow(unused)]
fn _unused(_: Infallible) {}

// ------------------------------------------------------------------------------------------
// Helpers for the health, breaker, reload and admin tests

/// The one polling loop of the tests: checks the async `cond` every 20 ms for up to `limit`
/// and says whether it held. `eventually` and `wait_status` are its two shapes.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond().await
}

/// `GET /status` on any admin address (the in-process balancer's or the binary's).
pub async fn status_at(admin: SocketAddr) -> serde_json::Value {
    let g = get(&client(), &format!("http://{admin}/status")).await;
    assert_eq!(g.status, 200, "{}", g.body);
    serde_json::from_str(&g.body).unwrap()
}

/// The `/status` entry of the backend listening on `addr` in `pool`, if it is listed.
pub fn status_backend(
    status: &serde_json::Value,
    pool: &str,
    addr: SocketAddr,
) -> Option<serde_json::Value> {
    status["pools"][pool]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
}

/// Rewrites the binary's config file with the same `{listen}`/`{admin}` substitution.
pub fn write_binary_config(b: &BinaryBalancer, template: &str) {
    let text = template
        .replace("{listen}", &b.addr.to_string())
        .replace("{admin}", &b.admin.to_string());
    std::fs::write(&b.config_path, text).unwrap();
}

/// Metric samples of a Prometheus text exposition: (name, labels, value), comments skipped.
pub fn parse_metrics(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metric line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let mut labels = std::collections::BTreeMap::new();
        let name = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    labels.insert(
                        k.trim_start_matches(',').to_owned(),
                        v.trim_end_matches('"').to_owned(),
                    );
                }
                name.to_owned()
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The `/status` entry of the backend at `addr` in pool `web`.
pub fn entry(s: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    s["pools"]["web"]["backends"]
        .as_array()
        .expect("pools.web.backends")
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("{addr} not in /status: {s}"))
        .clone()
}

/// Polls `/status` every 50 ms until `cond` holds; panics with the last document after `limit`.
pub async fn wait_status(
    bal: &Balancer,
    limit: Duration,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let last = std::sync::Mutex::new(serde_json::Value::Null);
    let reached = wait_until(limit, || async {
        let s = status(bal).await;
        let ok = cond(&s);
        if let Ok(mut l) = last.lock() {
            *l = s;
        }
        ok
    })
    .await;
    let s = last.into_inner().unwrap_or_default();
    assert!(
        reached,
        "{what}: not reached within {limit:?}; /status = {s}"
    );
    s
}

/// `total` bytes of `byte` in `chunk`-sized frames, generated as they are sent, with no
/// declared length (so hyper sends them chunked).
struct Generated {
    left: u64,
    chunk: Bytes,
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let k = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= k as u64;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.slice(..k)))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

pub fn generated_body(total: u64, chunk: usize, byte: u8) -> TestBody {
    Generated {
        left: total,
        chunk: Bytes::from(vec![byte; chunk]),
    }
    .map_err(|never| match never {})
    .boxed()
}

// ------------------------------------------------------------------------------------------
// The access log of the binary

/// The binary's stdout, line by line, on a thread (the pipe must never fill up).
pub struct AccessLog {
    rx: std::sync::mpsc::Receiver<String>,
}

impl AccessLog {
    pub fn of(bin: &mut BinaryBalancer) -> AccessLog {
        let stdout = bin
            .child
            .stdout
            .take()
            .expect("start_binary with Stdio::piped()");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AccessLog { rx }
    }

    /// The next line whose `path` is `path` (lines of other requests are skipped); panics
    /// after 15 s without one. Needs a multi-threaded test runtime.
    pub fn line_for(&self, path: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = tokio::task::block_in_place(|| self.rx.recv_timeout(left))
                .unwrap_or_else(|_| panic!("no access log line for {path}"));
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
            if v["path"] == path {
                return v;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Helpers for the runtime-control tests (admin token, backend control)

/// A request to `url` with `Authorization: Bearer <token>` when `token` is given.
pub async fn request_with_token(
    c: &HttpClient,
    method: http::Method,
    url: &str,
    body: &str,
    token: Option<&str>,
) -> Got {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(c, req.body(full(body.to_owned())).unwrap()).await
}

/// `POST /pools/{pool}/backends/{address}` with the JSON `body`, no token.
pub async fn control_backend(b: &Balancer, pool: &str, address: SocketAddr, body: &str) -> Got {
    post(
        &client(),
        &b.admin_url(&format!("/pools/{pool}/backends/{address}")),
        body.to_owned(),
    )
    .await
}
