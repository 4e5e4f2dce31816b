//! The control path's defects of issue 9, each against real servers: pooled connections and
//! a reload that turns TLS on (12), health probes that follow a changed CA or server name (13),
//! a round-robin pick when nothing is usable (15), the access log behind a stdout nobody reads
//! (16), idle connections of removed backends (17), the file watcher at start (21) and with a
//! Kubernetes ConfigMap mount (25), which statuses count against a backend and the ejection
//! cap (23).

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use balancer::reload::Trigger;

// ------------------------------------------------------------------------------------------
// Certificates (a private CA and a leaf for `a.test`)

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn make_ca(cn: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        params,
        key,
        pem: cert.pem(),
    }
}

/// A rustls server config for `name`, signed by `ca`.
fn server_tls(ca: &Ca, name: &str) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    let certs = vec![CertificateDer::from(cert.der().to_vec())];
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn q(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

// ------------------------------------------------------------------------------------------
// A backend that speaks cleartext HTTP/1.1 and, on the same port, HTTP/1.1 over TLS (it looks
// at the first byte: 0x16 opens a TLS handshake). It records, for every request, whether it
// came over TLS, and counts the connections open of each kind. `.../slow` is held until the
// test releases it; `/healthz` answers 200.

#[derive(Default)]
struct DualState {
    open_plain: AtomicU64,
    open_tls: AtomicU64,
    accepted: AtomicU64,
    handshakes_failed: AtomicU64,
    slow_arrived: AtomicU64,
    /// Health probes answered over TLS.
    tls_probes: AtomicU64,
    /// (path, over TLS) of every request but health probes, in arrival order.
    seen: Mutex<Vec<(String, bool)>>,
}

struct Dual {
    addr: SocketAddr,
    st: Arc<DualState>,
    release: watch::Sender<bool>,
    /// Set on drop: every connection closes, as when a real server stops.
    kill: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dual {
    fn drop(&mut self) {
        let _ = self.kill.send(true);
        self.task.abort();
    }
}

impl Dual {
    fn open(&self) -> u64 {
        self.st.open_plain.load(SeqCst) + self.st.open_tls.load(SeqCst)
    }
    fn seen(&self) -> Vec<(String, bool)> {
        self.st.seen.lock().unwrap().clone()
    }
    /// Lets every held `/slow` answer.
    fn release_slow(&self) {
        let _ = self.release.send(true);
    }
}

/// Decrements the open count of its kind when the connection ends, however it ends.
struct OpenConn(Arc<DualState>, bool);

impl Drop for OpenConn {
    fn drop(&mut self) {
        let c = if self.1 {
            &self.0.open_tls
        } else {
            &self.0.open_plain
        };
        c.fetch_sub(1, SeqCst);
    }
}

async fn start_dual(tls: Option<Arc<rustls::ServerConfig>>) -> Dual {
    start_dual_at("127.0.0.1:0".parse().unwrap(), tls).unwrap()
}

/// A dual backend on `addr` (SO_REUSEADDR, so a stopped one's address can be taken again).
fn start_dual_at(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<Dual> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    let listener = TcpListener::from_std(sock.into())?;
    let addr = listener.local_addr().unwrap();
    let st = Arc::new(DualState::default());
    let (release, release_rx) = watch::channel(false);
    let (kill, kill_rx) = watch::channel(false);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let state = Arc::clone(&st);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            state.accepted.fetch_add(1, SeqCst);
            let (st, rx, acceptor) = (Arc::clone(&state), release_rx.clone(), acceptor.clone());
            let mut kill = kill_rx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = dual_conn(tcp, st, rx, acceptor) => {}
                    _ = kill.wait_for(|k| *k) => {}
                }
            });
        }
    });
    Ok(Dual {
        addr,
        st,
        release,
        kill,
        task,
    })
}

async fn dual_conn(
    tcp: tokio::net::TcpStream,
    st: Arc<DualState>,
    rx: watch::Receiver<bool>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut first = [0u8; 1];
    let is_tls = matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    match (is_tls, acceptor) {
        (true, Some(acceptor)) => {
            st.open_tls.fetch_add(1, SeqCst);
            let _open = OpenConn(Arc::clone(&st), true);
            let Ok(stream) = acceptor.accept(tcp).await else {
                st.handshakes_failed.fetch_add(1, SeqCst);
                return;
            };
            serve_dual(TokioIo::new(stream), st, rx, true).await;
        }
        (true, None) => {}
        (false, _) => {
            st.open_plain.fetch_add(1, SeqCst);
            let _open = OpenConn(Arc::clone(&st), false);
            serve_dual(TokioIo::new(tcp), st, rx, false).await;
        }
    }
}

async fn serve_dual<T>(io: T, st: Arc<DualState>, rx: watch::Receiver<bool>, tls: bool)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (st, mut rx) = (Arc::clone(&st), rx.clone());
        async move {
            let path = req.uri().path().to_owned();
            if path == "/healthz" {
                if tls {
                    st.tls_probes.fetch_add(1, SeqCst);
                }
            } else {
                st.seen.lock().unwrap().push((path.clone(), tls));
            }
            let slow = path.ends_with("/slow");
            if slow {
                st.slow_arrived.fetch_add(1, SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|r| *r)).await;
            }
            let mut r = Response::new(full(if slow { "slow" } else { "dual" }));
            r.headers_mut()
                .insert("x-tls", if tls { "yes" } else { "no" }.parse().unwrap());
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await;
}

/// One GET that must be answered within `limit`.
async fn get_within(c: &HttpClient, url: &str, limit: Duration) -> Got {
    tokio::time::timeout(limit, get(c, url))
        .await
        .unwrap_or_else(|_| panic!("GET {url} got no answer within {limit:?}"))
}

/// Idle pooled connections of the backend at `addr` in `pool`, as the balancer holds them.
fn idle_of(bal: &Balancer, pool: &str, addr: SocketAddr) -> usize {
    bal.shared()
        .snapshot
        .load()
        .backend(pool, &addr.to_string())
        .map_or(0, |b| b.idle.len())
}

/// One pool `web` of `backend` with `pool_extra` lines in `[pools.web]` (before any sub-table).
fn one_pool(backend: SocketAddr, pool_extra: &str, tables: &str) -> String {
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [pools.web]\nbackends = [\"{backend}\"]\n{pool_extra}\n\
         [pools.web.circuit_breaker]\nconsecutive_failures = 1000\n{tables}"
    )
}

// ------------------------------------------------------------------------------------------
// (12) A reload that turns a pool's TLS on never hands out a cleartext connection

/// Plain pool, `/slow` in flight on a cleartext connection, reload to TLS, release: returns
/// the balancer once the cleartext connection is back in the pool (or already closed).
async fn cleartext_in_flight_across_tls_reload(dual: &Dual, ca_path: &Path) -> Balancer {
    let bal = start_balancer(&one_pool(dual.addr, "", "")).await;
    let slow_url = bal.url("/slow");
    let slow = tokio::spawn(async move { get(&client(), &slow_url).await });
    assert!(
        eventually(Duration::from_secs(5), || dual.st.slow_arrived.load(SeqCst)
            == 1)
        .await,
        "/slow never reached the backend"
    );
    assert_eq!(dual.seen(), vec![("/slow".to_owned(), false)]);
    assert_eq!(dual.st.open_plain.load(SeqCst), 1);

    bal.write_config(&one_pool(
        dual.addr,
        &format!("tls = {{ ca = {}, server_name = \"a.test\" }}", q(ca_path)),
        "",
    ));
    let v = bal.handle.reload(Trigger::Admin).await.expect("reload");
    assert_eq!(v, 2);

    // The exchange that started before the reload completes on its cleartext connection...
    dual.release_slow();
    let g = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("/slow answered")
        .unwrap();
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body, "slow");
    assert_eq!(g.headers["x-tls"], "no");
    // ... and the connection goes back to the backend's idle queue (a fixed balancer may
    // close it right away instead: either way it is settled before the next request).
    assert!(
        eventually(Duration::from_secs(5), || {
            idle_of(&bal, "web", dual.addr) >= 1 || dual.st.open_plain.load(SeqCst) == 0
        })
        .await,
        "the cleartext connection neither came back to the pool nor closed"
    );
    bal
}

#[tokio::test]
async fn tls_turned_on_by_reload_never_reuses_a_cleartext_connection_that_was_in_flight() {
    let ca = make_ca("Internal CA");
    let dual = start_dual(Some(server_tls(&ca, "a.test"))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let bal = cleartext_in_flight_across_tls_reload(&dual, &ca_path).await;

    let c = client();
    for i in 0..3 {
        let g = get_within(
            &c,
            &bal.url(&format!("/after/{i}")),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.headers["x-tls"], "yes", "request {i} after the reload");
    }
    let seen = dual.seen();
    let cleartext: Vec<_> = seen.iter().filter(|(_, tls)| !tls).collect();
    assert_eq!(
        cleartext,
        vec![&("/slow".to_owned(), false)],
        "after the reload every request must arrive over TLS: {seen:?}"
    );
    assert_eq!(dual.st.handshakes_failed.load(SeqCst), 0);
    bal.shutdown().await;
}

#[tokio::test]
async fn a_cleartext_connection_back_after_a_tls_reload_is_reaped_without_traffic() {
    let ca = make_ca("Internal CA");
    let dual = start_dual(Some(server_tls(&ca, "a.test"))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let bal = cleartext_in_flight_across_tls_reload(&dual, &ca_path).await;
    // No request follows: the reaper (every second) must close the connection of the old
    // transport, well before the 60 s idle timeout.
    assert!(
        eventually(Duration::from_secs(5), || dual.st.open_plain.load(SeqCst)
            == 0)
        .await,
        "the cleartext connection is still open ({} idle in the pool)",
        idle_of(&bal, "web", dual.addr)
    );
    assert_eq!(idle_of(&bal, "web", dual.addr), 0);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (13) Health probes follow the pool's TLS settings

const FAST_HEALTH: &str = "[pools.web.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n";

async fn healthy(bal: &Balancer, addr: SocketAddr) -> bool {
    let s = status(bal).await;
    status_backend(&s, "web", addr).expect("listed")["healthy"] == true
}

async fn reload_tls(bal: &Balancer, backend: SocketAddr, ca: &Path, name: &str) {
    bal.write_config(&one_pool(
        backend,
        &format!("tls = {{ ca = {}, server_name = \"{name}\" }}", q(ca)),
        FAST_HEALTH,
    ));
    bal.handle.reload(Trigger::Admin).await.expect("reload");
}

#[tokio::test]
async fn health_probes_restart_when_the_pools_ca_or_server_name_changes() {
    let ca = make_ca("Internal CA");
    let dual = start_dual(Some(server_tls(&ca, "a.test"))).await;
    let dir = tempfile::tempdir().unwrap();
    let right = dir.path().join("ca.pem");
    std::fs::write(&right, &ca.pem).unwrap();
    let wrong = dir.path().join("other-ca.pem");
    std::fs::write(&wrong, make_ca("Some Other CA").pem).unwrap();

    // Wrong CA: every probe's handshake fails.
    let bal = start_balancer(&one_pool(
        dual.addr,
        &format!("tls = {{ ca = {}, server_name = \"a.test\" }}", q(&wrong)),
        FAST_HEALTH,
    ))
    .await;
    let limit = Duration::from_secs(5);
    assert!(
        wait_until(limit, || async { !healthy(&bal, dual.addr).await }).await,
        "a backend whose certificate the pool cannot verify must turn unhealthy"
    );

    // The right CA: probes must use it, not keep failing with the old one.
    reload_tls(&bal, dual.addr, &right, "a.test").await;
    assert!(
        wait_until(limit, || async { healthy(&bal, dual.addr).await }).await,
        "after the reload with the right CA the backend must turn healthy again"
    );
    let g = get_within(&client(), &bal.url("/x"), limit).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.headers["x-tls"], "yes");

    // And back: a wrong server name must be noticed too (probes must not keep using the
    // connection they verified under the old settings).
    reload_tls(&bal, dual.addr, &right, "b.test").await;
    assert!(
        wait_until(limit, || async { !healthy(&bal, dual.addr).await }).await,
        "after the reload with a wrong server name the backend must turn unhealthy"
    );
    reload_tls(&bal, dual.addr, &wrong, "a.test").await;
    reload_tls(&bal, dual.addr, &right, "a.test").await;
    assert!(
        wait_until(limit, || async { healthy(&bal, dual.addr).await }).await,
        "healthy again with the right settings"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn health_probes_follow_a_ca_file_rotated_in_place() {
    // The CA file keeps its path and gets new content (a Kubernetes secret, a renewed
    // internal CA): the config text does not change, yet the trust does.
    let old_ca = make_ca("Internal CA 2025");
    let new_ca = make_ca("Internal CA 2026");
    let old = start_dual(Some(server_tls(&old_ca, "a.test"))).await;
    let addr = old.addr;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &old_ca.pem).unwrap();
    let cfg = one_pool(
        addr,
        &format!("tls = {{ ca = {}, server_name = \"a.test\" }}", q(&ca_path)),
        FAST_HEALTH,
    );
    let bal = start_balancer(&cfg).await;
    let limit = Duration::from_secs(5);
    assert!(
        eventually(limit, || old.st.tls_probes.load(SeqCst) >= 2).await,
        "probes never reached the backend"
    );
    assert!(healthy(&bal, addr).await);
    assert_eq!(
        get_within(&client(), &bal.url("/x"), limit).await.status,
        200
    );

    // The backend restarts with a certificate of the new CA; the CA file is rewritten and
    // the config reloaded.
    drop(old);
    let new_tls = server_tls(&new_ca, "a.test");
    let mut tries = 0;
    let new = loop {
        // The old listener closes when its aborted task is dropped, a moment later.
        match start_dual_at(addr, Some(Arc::clone(&new_tls))) {
            Ok(d) => break d,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot listen on {addr} again: {e}"),
        }
    };
    std::fs::write(&ca_path, &new_ca.pem).unwrap();
    bal.write_config(&cfg);
    bal.handle.reload(Trigger::Admin).await.expect("reload");

    // Probes must verify with the new CA, as requests do.
    assert!(
        eventually(limit, || new.st.tls_probes.load(SeqCst) >= 3).await,
        "no probe got through to the re-certified backend ({} handshakes failed)",
        new.st.handshakes_failed.load(SeqCst)
    );
    assert!(
        wait_until(limit, || async { healthy(&bal, addr).await }).await,
        "the backend must be healthy under the new CA"
    );
    let g = get_within(&client(), &bal.url("/y"), limit).await;
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.headers["x-tls"], "yes");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (15) Round-robin with every member unusable

/// A pool built directly (as benches/pick.rs does, but with members of our own), so its
/// weights can make the smooth sequence long: weights 1000, 999, ... have gcd 1, so the
/// sequence is as long as their sum.
fn long_sequence_pool(n: usize, max_ejected_percent: u8) -> balancer::balance::Pool {
    use balancer::backend::Backend;
    use balancer::balance::{Member, Pool};
    let text =
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9\"]\n\
                [pools.web.circuit_breaker]\nconsecutive_failures = 1\nopen_duration = \"60s\"\n";
    let cfg = balancer::Config::parse(text, "pick.toml", None).expect("valid");
    let mut pc = cfg.pools[0].clone();
    pc.breaker.max_ejected_percent = max_ejected_percent;
    let members = (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("127.0.0.{}:{}", 1 + i / 200, 9000 + i % 200)
                .parse()
                .unwrap();
            Member {
                backend: Arc::new(Backend::new("web", &addr.to_string(), addr)),
                weight: 1000 - i as u32,
                backup: false,
            }
        })
        .collect();
    let dial = balancer::upstream::Dial {
        timeouts: pc.timeouts,
        tls: None,
        protocol: balancer::config::Protocol::Http1,
        transport: 1,
    };
    Pool::new(&pc, members, dial)
}

#[test]
fn pick_with_every_member_unusable_refuses_at_once_with_the_right_reason() {
    use balancer::breaker::Admission;
    use balancer::reason::Refusal;
    let n = 100;
    let pool = long_sequence_pool(n, 100);
    let now = balancer::clock::now_ms();
    // All healthy: picks follow the weights.
    assert!(pool.pick(now, &[]).is_ok());

    for m in &pool.members {
        m.backend.healthy.store(false, SeqCst);
    }
    // Without the check first, each of these walked the whole sequence (95,050 entries):
    // seconds in all in a debug build, instead of milliseconds.
    let picks = 500;
    let t = Instant::now();
    for _ in 0..picks {
        assert_eq!(pool.pick(now, &[]), Err(Refusal::AllUnhealthy));
    }
    let took = t.elapsed();
    println!("{picks} refused picks: {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "{picks} refused picks took {took:?}: the walk is not bounded"
    );

    // Healthy again, every breaker open (and no ejection cap): all breakers open.
    for m in &pool.members {
        m.backend.healthy.store(true, SeqCst);
        m.backend
            .breaker
            .on_failure(Admission::Normal, &pool.breaker, now);
    }
    let t = Instant::now();
    for _ in 0..picks {
        assert_eq!(pool.pick(now, &[]), Err(Refusal::AllBreakersOpen));
    }
    let took = t.elapsed();
    println!("{picks} refused picks: {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "{picks} refused picks took {took:?}: the walk is not bounded"
    );
}

#[test]
fn pick_after_an_outage_still_follows_the_weights() {
    let pool = long_sequence_pool(3, 100);
    let now = balancer::clock::now_ms();
    for m in &pool.members {
        m.backend.healthy.store(false, SeqCst);
    }
    for _ in 0..1000 {
        assert!(pool.pick(now, &[]).is_err());
    }
    for m in &pool.members {
        m.backend.healthy.store(true, SeqCst);
    }
    // Weights 1000, 999, 998: one full cycle of 2997 picks gives exactly those counts.
    let mut counts = [0u32; 3];
    for _ in 0..2997 {
        counts[pool.pick(now, &[]).expect("usable").index] += 1;
    }
    assert_eq!(counts, [1000, 999, 998]);
}

fn local_responses(metrics: &str, reason: &str) -> f64 {
    parse_metrics(metrics)
        .into_iter()
        .filter(|(n, l, _)| {
            n.starts_with("balancer_local_responses")
                && l.get("reason").map(String::as_str) == Some(reason)
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test]
async fn all_unhealthy_weighted_pool_answers_503_then_splits_by_weight_when_back() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    // 1000:333 (gcd 1): a smooth sequence of 1333 entries, about 3:1.
    let tmpl = format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nstrategy = \"round_robin\"\n\
         backends = [{{ address = \"{}\", weight = 1000 }}, {{ address = \"{}\", weight = 333 }}]\n{FAST_HEALTH}",
        a.addr, b.addr
    );
    let bal = start_balancer(&tmpl).await;
    a.set_health(false);
    b.set_health(false);
    wait_status(&bal, Duration::from_secs(5), "both unhealthy", |s| {
        entry(s, a.addr)["healthy"] == false && entry(s, b.addr)["healthy"] == false
    })
    .await;
    let c = client();
    let metrics = |bal: &Balancer| {
        let url = bal.admin_url("/metrics");
        async move { get(&client(), &url).await.body }
    };
    let before = local_responses(&metrics(&bal).await, "all_unhealthy");
    let t = Instant::now();
    for _ in 0..100 {
        let g = get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
        assert_eq!(g.status, 503, "{}", g.body);
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "100 refusals took {:?}",
        t.elapsed()
    );
    let after = local_responses(&metrics(&bal).await, "all_unhealthy");
    assert!(after - before >= 100.0, "all_unhealthy {before} -> {after}");
    assert_eq!(a.requests() + b.requests(), 0);

    a.set_health(true);
    b.set_health(true);
    wait_status(&bal, Duration::from_secs(5), "both healthy", |s| {
        entry(s, a.addr)["healthy"] == true && entry(s, b.addr)["healthy"] == true
    })
    .await;
    let mut to_a = 0;
    for _ in 0..400 {
        let g = get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
        assert_eq!(g.status, 200, "{}", g.body);
        if g.body == "a" {
            to_a += 1;
        }
    }
    // 400 consecutive entries of the smooth 1000:333 sequence hold 300 (+-1) of a.
    assert!(
        (298..=302).contains(&to_a),
        "a got {to_a} of 400 (weights 1000:333)"
    );
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (16) The access log behind a stdout nobody reads

fn dropped(metrics: &str) -> f64 {
    parse_metrics(metrics)
        .into_iter()
        .filter(|(n, _, _)| n.starts_with("balancer_access_log_dropped"))
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_queue_is_bounded_in_bytes_behind_a_stuck_stdout() {
    let a = start_backend("a").await;
    let tmpl = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = true\nlevel = \"warn\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{}\"]\n",
        a.addr
    );
    // stdout is a pipe that is never read: once its buffer is full the writer blocks for good.
    let bin = start_binary(&tmpl, std::process::Stdio::piped());
    let base_url = format!("http://{}", bin.addr);
    let metrics_url = format!("http://{}/metrics", bin.admin);
    let c = client();
    // Fill the pipe and warm up.
    let long = format!("/{}", "t".repeat(60 * 1024 - 1));
    for _ in 0..8 {
        assert_eq!(get(&c, &format!("{base_url}{long}")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = bin.rss_kib();
    let dropped_before = dropped(&get(&c, &metrics_url).await.body);

    // 4,000 requests with 60 KiB targets: queued whole, 240 MB.
    let tasks = 8;
    let per_task = 500;
    let mut joins = Vec::new();
    for t in 0..tasks {
        let url = format!("{base_url}{long}");
        joins.push(tokio::spawn(async move {
            let c = client();
            let mut ok = 0u32;
            for i in 0..per_task {
                let g = get(&c, &url).await;
                assert_eq!(g.status, 200, "task {t} request {i}: {}", g.body);
                ok += 1;
            }
            ok
        }));
    }
    let mut ok = 0;
    for j in joins {
        ok += j.await.unwrap();
    }
    assert_eq!(ok, tasks * per_task);
    let rss_after = bin.rss_kib();
    let dropped_after = dropped(&get(&c, &metrics_url).await.body);
    println!(
        "RSS {rss_before} KiB -> {rss_after} KiB; access lines dropped {dropped_before} -> {dropped_after}"
    );
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB behind a stuck stdout"
    );
    assert!(
        dropped_after - dropped_before >= 3000.0,
        "the queue must drop lines past 16 MiB: dropped {dropped_before} -> {dropped_after}"
    );
    // Still serving.
    assert_eq!(get(&c, &format!("{base_url}/still")).await.status, 200);
    assert!(bin_alive(&bin), "the balancer died");
}

fn bin_alive(bin: &BinaryBalancer) -> bool {
    std::path::Path::new(&format!("/proc/{}", bin.pid())).exists()
}

// ------------------------------------------------------------------------------------------
// (17) Idle connections of a removed backend are closed

fn two_pools(keep: SocketAddr, removable: Option<SocketAddr>) -> String {
    let rb = removable.unwrap_or(keep);
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/b\"\npool = \"bp\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n\
         [pools.web]\nbackends = [\"{keep}\"]\n\
         [pools.bp]\nbackends = [\"{rb}\"]\n"
    )
}

#[tokio::test]
async fn idle_connections_of_a_removed_backend_close_at_the_reload() {
    let keep = start_backend("keep").await;
    let gone = start_dual(None).await;
    let bal = start_balancer(&two_pools(keep.addr, Some(gone.addr))).await;
    // The backend also has a request in flight across the reload: that keeps the removed
    // backend's record alive, so only an explicit close gets its idle connection closed.
    let slow_url = bal.url("/b/slow");
    let slow = tokio::spawn(async move { get(&client(), &slow_url).await });
    assert!(
        eventually(Duration::from_secs(5), || gone.st.slow_arrived.load(SeqCst)
            == 1)
        .await,
        "/b/slow never arrived"
    );
    // A second connection, idle in the pool.
    let g = get_within(&client(), &bal.url("/b/quick"), Duration::from_secs(5)).await;
    assert_eq!(g.status, 200);
    assert!(
        eventually(Duration::from_secs(5), || idle_of(&bal, "bp", gone.addr)
            == 1)
        .await,
        "the quick exchange's connection never became idle"
    );
    assert_eq!(gone.open(), 2);

    bal.write_config(&two_pools(keep.addr, None));
    bal.handle.reload(Trigger::Admin).await.expect("reload");
    assert!(
        eventually(Duration::from_secs(3), || gone.open() == 1).await,
        "the removed backend's idle connection must close at the reload ({} open)",
        gone.open()
    );
    assert_eq!(gone.st.slow_arrived.load(SeqCst), 1);

    // The request in flight finishes normally; then nothing is left open.
    gone.release_slow();
    let g = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("/b/slow answered")
        .unwrap();
    assert_eq!(g.status, 200);
    assert_eq!(g.body, "slow");
    assert!(
        eventually(Duration::from_secs(5), || gone.open() == 0).await,
        "{} connections still open to the removed backend",
        gone.open()
    );
    // New traffic for /b goes to the pool's new backend.
    let g = get_within(&client(), &bal.url("/b/next"), Duration::from_secs(5)).await;
    assert_eq!(g.body, "keep");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// The balancer in-process on a config path of the test's choosing, with a ready callback of
// its own (for the file watcher tests).

struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    handle: balancer::ReloadHandle,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn version(&self) -> u64 {
        self.handle.shared().snapshot.load().generation
    }
    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

struct Bound {
    listener: TcpListener,
    admin: TcpListener,
    addr: SocketAddr,
    admin_addr: SocketAddr,
}

async fn bind_two() -> Bound {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Bound {
        addr: listener.local_addr().unwrap(),
        admin_addr: admin.local_addr().unwrap(),
        listener,
        admin,
    }
}

impl Bound {
    fn render(&self, template: &str) -> String {
        template
            .replace("{listen}", &self.addr.to_string())
            .replace("{admin}", &self.admin_addr.to_string())
    }
}

/// Runs the balancer on the config at `path` (already written); `on_ready` runs inside the
/// balancer's own ready callback, before it returns.
async fn launch(path: &Path, bound: Bound, on_ready: impl FnOnce() + Send + 'static) -> Running {
    let config = balancer::Config::load(path).expect("test config valid");
    launch_loaded(path, config, bound, on_ready).await
}

/// `launch` with a config the caller already read from `path` (as `main` does).
async fn launch_loaded(
    path: &Path,
    config: balancer::Config,
    bound: Bound,
    on_ready: impl FnOnce() + Send + 'static,
) -> Running {
    let opts = balancer::Options {
        config_path: path.to_path_buf(),
        config,
        prebound: vec![bound.listener, bound.admin],
        sighup: false,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let done = tokio::spawn(async move {
        balancer::run(
            opts,
            async move {
                let _ = stop_rx.await;
            },
            move |h| {
                on_ready();
                let _ = ready_tx.send(h);
            },
        )
        .await
        .expect("balancer runs");
    });
    let handle = ready_rx.await.expect("balancer did not start");
    Running {
        addr: bound.addr,
        admin: bound.admin_addr,
        handle,
        stop: Some(stop_tx),
        done: Some(done),
    }
}

fn watched(backend: SocketAddr, extra: &str) -> String {
    format!(
        "watch = true\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n{extra}\
         [pools.web]\nbackends = [\"{backend}\"]\n"
    )
}

/// The body of `GET path`, within 5 s.
async fn body_of(addr: SocketAddr, path: &str) -> (u16, String) {
    let g = get_within(
        &client(),
        &format!("http://{addr}{path}"),
        Duration::from_secs(5),
    )
    .await;
    (g.status.as_u16(), g.body)
}

// ------------------------------------------------------------------------------------------
// (21) The watcher exists before the balancer reports ready

#[tokio::test]
async fn an_edit_made_as_soon_as_the_balancer_is_ready_is_applied() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    let bound = bind_two().await;
    std::fs::write(&path, bound.render(&watched(a.addr, ""))).unwrap();
    let route = format!(
        "[[routes]]\npath_prefix = \"/new\"\npool = \"other\"\n[[routes]]\npath_prefix = \"/\"\npool = \"web\"\n\
         [pools.other]\nbackends = [\"{}\"]\n",
        b.addr
    );
    let edited = bound.render(&watched(a.addr, &route));
    let p = path.clone();
    // The edit happens the moment the balancer says it is ready, before the ready callback
    // even returns.
    let bal = launch(&path, bound, move || std::fs::write(&p, edited).unwrap()).await;
    assert!(
        eventually(Duration::from_secs(5), || bal.version() >= 2).await,
        "the edit made right after start was never applied (version {})",
        bal.version()
    );
    assert_eq!(bal.version(), 2, "one edit, one reload");
    assert_eq!(body_of(bal.addr, "/new/x").await, (200, "b".to_owned()));
    assert_eq!(body_of(bal.addr, "/x").await, (200, "a".to_owned()));
    bal.shutdown().await;
}

#[tokio::test]
async fn an_edit_made_while_the_balancer_starts_is_applied() {
    // `main` reads the config, then starts the balancer: an edit in between must not be
    // taken for what was loaded.
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    let bound = bind_two().await;
    std::fs::write(&path, bound.render(&watched(a.addr, ""))).unwrap();
    let loaded = balancer::Config::load(&path).unwrap();
    std::fs::write(&path, bound.render(&watched(b.addr, ""))).unwrap();
    let bal = launch_loaded(&path, loaded, bound, || {}).await;
    assert!(
        eventually(Duration::from_secs(5), || bal.version() >= 2).await,
        "the edit made during start-up was never applied (version {})",
        bal.version()
    );
    assert_eq!(body_of(bal.addr, "/").await, (200, "b".to_owned()));
    assert_eq!(bal.version(), 2);
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (25) A Kubernetes ConfigMap mount

/// `dir/balancer.toml -> ..data/balancer.toml`, `..data -> ..{version}` (relative links, as
/// the kubelet makes them).
fn k8s_mount(dir: &Path, version: &str, text: &str) -> PathBuf {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("balancer.toml"), text).unwrap();
    std::os::unix::fs::symlink(format!("..{version}"), dir.join("..data")).unwrap();
    let path = dir.join("balancer.toml");
    std::os::unix::fs::symlink("..data/balancer.toml", &path).unwrap();
    path
}

/// The kubelet's atomic update: a new versioned directory, a temporary link to it renamed
/// over `..data` (`mv -T`), then the old directory removed.
fn k8s_update(dir: &Path, old: &str, new: &str, text: &str) {
    let data = dir.join(format!("..{new}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("balancer.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{new}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(format!("..{old}"))).unwrap();
}

async fn wait_version(bal: &Running, want: u64, what: &str) {
    assert!(
        eventually(Duration::from_secs(5), || bal.version() >= want).await,
        "{what}: version {} never reached {want}",
        bal.version()
    );
    assert_eq!(bal.version(), want, "{what}: one change, one reload");
}

#[tokio::test]
async fn a_configmap_update_is_followed_and_a_touch_is_not_a_reload() {
    let backends = [
        start_backend("v1").await,
        start_backend("v2").await,
        start_backend("v3").await,
        start_backend("v4").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let bound = bind_two().await;
    let text = |i: usize| bound.render(&watched(backends[i].addr, ""));
    let texts: Vec<String> = (0..4).map(text).collect();
    let path = k8s_mount(dir.path(), "2026_v1", &texts[0]);
    let bal = launch(&path, bound, || {}).await;
    assert_eq!(body_of(bal.addr, "/").await, (200, "v1".to_owned()));

    // Two updates in a row: the second only works if the watch moved with the first.
    k8s_update(dir.path(), "2026_v1", "2026_v2", &texts[1]);
    wait_version(&bal, 2, "first ConfigMap update").await;
    assert_eq!(body_of(bal.addr, "/").await, (200, "v2".to_owned()));
    k8s_update(dir.path(), "2026_v2", "2026_v3", &texts[2]);
    wait_version(&bal, 3, "second ConfigMap update").await;
    assert_eq!(body_of(bal.addr, "/").await, (200, "v3".to_owned()));

    // A touch (the same bytes written again, a new mtime) is no change.
    let real = dir.path().join("..2026_v3").join("balancer.toml");
    std::fs::write(&real, &texts[2]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&real)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    // Well past the watcher's 200 ms debounce.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(bal.version(), 3, "touching the file must not reload");

    // A real change after it is one reload, not two.
    k8s_update(dir.path(), "2026_v3", "2026_v4", &texts[3]);
    wait_version(&bal, 4, "third ConfigMap update").await;
    assert_eq!(body_of(bal.addr, "/").await, (200, "v4".to_owned()));
    let s = status_at(bal.admin).await;
    assert_eq!(s["config"]["version"], 4);
    assert!(s["config"]["last_error"].is_null(), "{s}");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// (23) Which statuses count against a backend; the ejection cap

fn breaker_pool(backends: &[SocketAddr], breaker: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!("[pools.web.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"60s\"\n{breaker}"),
    )
}

#[tokio::test]
async fn by_default_a_500_opens_no_breaker() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Fail500);
    b.set_mode(Mode::Fail500);
    let bal = start_balancer(&breaker_pool(&[a.addr, b.addr], "")).await;
    let c = client();
    for i in 0..20 {
        let g = get_within(
            &c,
            &bal.url(&format!("/broken/{i}")),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(g.status, 500, "the backend's own 500 is relayed");
    }
    assert_eq!(a.requests(), 10);
    assert_eq!(b.requests(), 10);
    let s = status(&bal).await;
    for x in [a.addr, b.addr] {
        let e = entry(&s, x);
        assert_eq!(e["breaker"], "closed", "{e}");
        assert_eq!(e["failures"], 0, "a 500 is an answer, not a failure: {e}");
    }
    let overrides: u64 = bal.shared().snapshot.load().pools[0]
        .members
        .iter()
        .map(|m| m.backend.counters.ejection_overrides.load(SeqCst))
        .sum();
    assert_eq!(overrides, 0);
    bal.shutdown().await;
}

#[tokio::test]
async fn failure_statuses_with_500_makes_a_500_open_the_breaker() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Fail500);
    let bal = start_balancer(&breaker_pool(
        &[a.addr, b.addr],
        "failure_statuses = [500, 502, 503, 504]\n",
    ))
    .await;
    let c = client();
    for _ in 0..4 {
        get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
    }
    wait_status(&bal, Duration::from_secs(5), "a's breaker open", |s| {
        entry(s, a.addr)["breaker"] == "open"
    })
    .await;
    let ra = a.requests();
    for _ in 0..10 {
        let g = get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.body, "b");
    }
    assert_eq!(a.requests(), ra, "an open breaker takes a out");
    let e = entry(&status(&bal).await, a.addr);
    assert_eq!(e["failures"], 2, "{e}");
    bal.shutdown().await;
}

fn overrides_of(bal: &Balancer, addr: SocketAddr) -> u64 {
    bal.shared()
        .snapshot
        .load()
        .backend("web", &addr.to_string())
        .map_or(0, |b| b.counters.ejection_overrides.load(SeqCst))
}

#[tokio::test]
async fn the_ejection_cap_keeps_breakers_from_taking_out_more_than_half_the_pool() {
    let bs = [
        start_backend("a").await,
        start_backend("b").await,
        start_backend("c").await,
        start_backend("d").await,
    ];
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    let bal = start_balancer(&config(
        &addrs,
        "round_robin",
        "[pools.web.circuit_breaker]\nconsecutive_failures = 1\nopen_duration = \"60s\"\nmax_ejected_percent = 50\n",
    ))
    .await;
    let c = client();
    let open = |s: &serde_json::Value| {
        addrs
            .iter()
            .filter(|a| entry(s, **a)["breaker"] == "open")
            .count()
    };

    // Two of four failing: both ejected (50% is within the cap), nothing overridden.
    bs[0].set_mode(Mode::Fail503);
    bs[1].set_mode(Mode::Fail503);
    for _ in 0..4 {
        get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
    }
    wait_status(&bal, Duration::from_secs(5), "a and b open", |s| {
        entry(s, addrs[0])["breaker"] == "open" && entry(s, addrs[1])["breaker"] == "open"
    })
    .await;
    let (ra, rb) = (bs[0].requests(), bs[1].requests());
    for _ in 0..12 {
        let g = get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
        assert_eq!(g.status, 200, "{}", g.body);
    }
    assert_eq!((bs[0].requests(), bs[1].requests()), (ra, rb));
    assert_eq!(
        overrides_of(&bal, addrs[0]) + overrides_of(&bal, addrs[1]),
        0
    );

    // A third fails: its breaker opens too, which would take out 75% of the pool. At most
    // two may be honoured: requests reach the failing backends again.
    bs[2].set_mode(Mode::Fail503);
    for _ in 0..4 {
        get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
    }
    let s = wait_status(&bal, Duration::from_secs(5), "c open", |s| {
        entry(s, addrs[2])["breaker"] == "open"
    })
    .await;
    assert_eq!(open(&s), 3, "{s}");
    let before: Vec<u64> = bs.iter().map(|b| b.requests()).collect();
    let mut statuses = Vec::new();
    for _ in 0..24 {
        let g = get_within(&c, &bal.url("/"), Duration::from_secs(5)).await;
        statuses.push(g.status.as_u16());
    }
    let got: Vec<u64> = bs
        .iter()
        .zip(&before)
        .map(|(b, n)| b.requests() - n)
        .collect();
    let skipped = (0..3).filter(|&i| got[i] == 0).count();
    assert!(
        skipped <= 2,
        "three open breakers all honoured: requests per backend {got:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    assert!(
        !statuses.contains(&503) || got[..3].iter().sum::<u64>() > 0,
        "503s come from the failing backends, not from the balancer: {statuses:?} {got:?}"
    );
    let overridden: u64 = addrs[..3].iter().map(|a| overrides_of(&bal, *a)).sum();
    assert!(
        overridden >= got[..3].iter().sum::<u64>() && overridden > 0,
        "attempts through an open breaker are counted: {overridden} for {got:?}"
    );
    bal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_let_through_by_the_ejection_cap_is_logged_as_ejection_capped() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_mode(Mode::Fail503);
    b.set_mode(Mode::Fail503);
    let tmpl = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = true\nlevel = \"warn\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{}\", \"{}\"]\n\
         [pools.web.circuit_breaker]\nconsecutive_failures = 1\nopen_duration = \"60s\"\n",
        a.addr, b.addr
    );
    let mut bin = start_binary(&tmpl, std::process::Stdio::piped());
    let stdout = bin.child.stdout.take().unwrap();
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
    let next_line = |i: usize| {
        let l = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(10)))
            .unwrap_or_else(|_| panic!("access log line {i} missing"));
        serde_json::from_str::<serde_json::Value>(&l).unwrap()
    };
    let url = format!("http://{}/", bin.addr);
    let c = client();
    // Each backend's 503 opens its breaker: then both are open, more than the default 50%.
    for i in 0..2 {
        assert_eq!(get(&c, &url).await.status, 503);
        let l = next_line(i);
        assert_eq!(l["reason"], "upstream_5xx", "{l}");
    }
    // Both recover. Their breakers are still open, but the cap lets requests through.
    a.set_mode(Mode::Ok);
    b.set_mode(Mode::Ok);
    for i in 2..6 {
        let g = get(&c, &url).await;
        assert_eq!(g.status, 200, "{}", g.body);
        let l = next_line(i);
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["reason"], "ejection_capped", "{l}");
        assert_eq!(l["attempts"], 1, "{l}");
        assert_eq!(
            l["outcome"], "ok",
            "one attempt, answered: nothing was retried: {l}"
        );
    }
}
