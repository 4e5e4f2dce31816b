//! HTTP/2 to backends (`protocol = "h2c" | "h2"`): the config key, h1 and h2 clients through
//! h2 pools, TLS with ALPN, multiplexing onto few connections, GOAWAY and REFUSED_STREAM
//! resent for free, idle connections closed, a reload switching protocols under load, and
//! gRPC (all four call kinds, trailers and metadata) end to end.

mod common;
#[path = "common/grpc_backend.rs"]
mod grpc_backend;

use bytes::Bytes;
use grpc_backend::*;

use balancer::config::Protocol;
use balancer::{Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "f.toml", None)
}

const POOL_HEAD: &str =
    "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

#[test]
fn protocol_key_defaults_parses_and_is_checked_against_tls() {
    let c = parse(POOL_HEAD).unwrap();
    assert_eq!(c.pools[0].protocol, Protocol::Http1);
    for (v, p) in [("http1", Protocol::Http1), ("h2c", Protocol::H2c)] {
        let c = parse(&format!("{POOL_HEAD}protocol = \"{v}\"\n")).unwrap();
        assert_eq!(c.pools[0].protocol, p, "{v}");
    }
    let c = parse(&format!("{POOL_HEAD}protocol = \"h2\"\ntls = true\n")).unwrap();
    assert_eq!(c.pools[0].protocol, Protocol::H2);

    // h2 without tls: the key and the line of the value.
    let e = parse(&format!("{POOL_HEAD}protocol = \"h2\"\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
    assert!(e.msg.contains("tls"), "{e}");

    let e = parse(&format!("{POOL_HEAD}protocol = \"http2\"\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
    assert!(e.msg.contains("http2"), "{e}");

    let e = parse(&format!("{POOL_HEAD}protocol = \"h2c\"\ntls = true\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
}

#[test]
fn diff_names_a_protocol_change() {
    let old = parse(POOL_HEAD).unwrap();
    let new = parse(&format!("{POOL_HEAD}protocol = \"h2c\"\n")).unwrap();
    let d = balancer::diff::configs(&old, &new);
    let text = d.lines().join("\n");
    assert!(text.contains("pool web protocol http1 -> h2c"), "{text}");
}

/// The test services themselves, without the balancer: what the proxied tests compare with.
#[tokio::test]
async fn grpc_backend_serves_the_four_call_kinds_directly() {
    let be = start_grpc_backend(100).await;
    let mut c = grpc_client(be.addr).await;
    let r = unary(&mut c, tonic::Request::new(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert_eq!(r.get_ref(), &Bytes::from_static(b"hi"));
    let r = sum(&mut c, vec![1, 2, 3]).await.unwrap();
    assert_eq!(r.get_ref(), &Bytes::from_static(b"6"));
    let mut s = count(&mut c, tonic::Request::new(Bytes::from_static(b"3")))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m);
    }
    assert_eq!(got, ["0", "1", "2"]);
    assert_eq!(be.connections(), 1);
}

// ---------------------------------------------------------------------------------------------
// Helpers

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::Request as HttpRequest;

/// One pool `web` of `backends` speaking `protocol`, plus `extra` pool keys.
fn h2_config(backends: &[SocketAddr], protocol: &str, extra: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!("protocol = \"{protocol}\"\n{extra}"),
    )
}

fn line(body: &str, key: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {body:?}"))
        .to_owned()
}

fn backend_of(b: &Balancer) -> Arc<balancer::backend::Backend> {
    let snap = b.shared().snapshot.load_full();
    Arc::clone(&snap.pools[0].members[0].backend)
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP over an h2c pool

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_h2_clients_reach_an_h2c_backend_over_http2() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    for (name, c) in [("h1", client()), ("h2", h2_client())] {
        let g = get(&c, &b.url("/plain/get?x=1")).await;
        assert_eq!(g.status, 200, "{name}: {}", g.body);
        assert_eq!(line(&g.body, "version"), "HTTP/2.0", "{name}");
        assert_eq!(line(&g.body, "path"), "/plain/get", "{name}");
        // :authority is the Host the client sent; no Host field beside it.
        assert_eq!(line(&g.body, "authority"), b.addr.to_string(), "{name}");
        assert_eq!(line(&g.body, "host"), "-", "{name}");
        assert_eq!(line(&g.body, "x-forwarded-for"), "127.0.0.1", "{name}");

        let body = vec![b'z'; 300_000];
        let req = HttpRequest::post(b.url("/plain/post"))
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("te", "trailers")
            .body(full(body))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(g.status, 200, "{name}: {}", g.body);
        assert_eq!(line(&g.body, "body-bytes"), "300000", "{name}");
        // Not gRPC: TE stays hop-by-hop, like Connection.
        assert_eq!(line(&g.body, "te"), "-", "{name}");
        assert_eq!(line(&g.body, "connection"), "-", "{name}");

        // gRPC content: `te: trailers` reaches the backend (and nothing else of TE).
        let req = HttpRequest::post(b.url("/plain/grpc-shaped"))
            .header("content-type", "application/grpc+proto")
            .header("te", "trailers")
            .body(full(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(g.status, 200, "{name}: {}", g.body);
        assert_eq!(line(&g.body, "te"), "trailers", "{name}");
    }
    // Both clients' requests, sequential: one multiplexed connection served them all.
    assert_eq!(be.connections(), 1);
    b.shutdown().await;
}

/// An h2c-only backend (it answers nothing else) stays healthy under `kind = "http"` checks:
/// the probe speaks the pool's protocol, and each one reaches the backend as an h2 stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_on_an_h2c_pool_probe_over_http2() {
    let be = start_grpc_backend(100).await;
    let hc = "[pools.web.health_check]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"500ms\"\nunhealthy_threshold = 1\n";
    let b = start_balancer(&h2_config(&[be.addr], "h2c", hc)).await;
    let s = wait_status(
        &b,
        Duration::from_secs(10),
        "probes reached the backend",
        |s| s["pools"]["web"]["protocol"] == "h2c" && be.streams() >= 4,
    )
    .await;
    assert_eq!(entry(&s, be.addr)["healthy"], true, "{s}");
    let s = status(&b).await;
    assert_eq!(entry(&s, be.addr)["healthy"], true, "{s}");
    // The probes share one connection; no request has been proxied yet.
    assert_eq!(be.connections(), 1);
    b.shutdown().await;
}

/// A client that stalls its upload mid-body, through an h2c pool: the stream to the backend
/// is reset, the client gets the 408 of a stalled upload, and the backend is not blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_through_an_h2c_pool_is_the_clients_fault() {
    use http_body_util::BodyExt;
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(
        &[be.addr],
        "h2c",
        "[limits]\nheader_timeout = \"200ms\"\n",
    ))
    .await;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, hyper::Error>::new(1);
    tokio::spawn(async move {
        let _ = tx.send_data(Bytes::from_static(b"first part")).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _ = tx.send_data(Bytes::from_static(b"too late")).await;
    });
    let req = HttpRequest::post(b.url("/plain/upload"))
        .header("content-type", "application/octet-stream")
        .body(body.boxed())
        .unwrap();
    let g = send(&client(), req).await;
    assert_eq!(g.status, 408, "{}", g.body);
    let s = status(&b).await;
    let e = entry(&s, be.addr);
    assert_eq!(
        e["failures"], 0,
        "the client's stall is not the backend's failure: {e}"
    );
    assert_eq!(e["breaker"], "closed", "{e}");
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// gRPC end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_client_server_and_bidi_streaming_with_metadata_and_trailers() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    let mut c = grpc_client(b.addr).await;

    // Unary, with request and response metadata.
    let mut req = tonic::Request::new(Bytes::from_static(b"ping"));
    req.metadata_mut().insert("x-meta", "m1".parse().unwrap());
    let r = unary(&mut c, req).await.expect("unary call");
    assert_eq!(r.get_ref(), &Bytes::from_static(b"ping"));
    assert_eq!(r.metadata().get("x-meta-echo").unwrap(), "m1");

    // Client streaming.
    let r = sum(&mut c, (1..=100).collect()).await.expect("sum call");
    assert_eq!(r.get_ref(), &Bytes::from_static(b"5050"));

    // Server streaming, ending OK and ending with a status and trailer metadata.
    let mut s = count(&mut c, tonic::Request::new(Bytes::from_static(b"50")))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.expect("stream message") {
        assert_eq!(m, Bytes::from(n.to_string()));
        n += 1;
    }
    assert_eq!(n, 50);
    let mut req = tonic::Request::new(Bytes::from_static(b"2"));
    req.metadata_mut().insert("x-fail", "1".parse().unwrap());
    let mut s = count(&mut c, req).await.unwrap().into_inner();
    assert!(s.message().await.unwrap().is_some());
    assert!(s.message().await.unwrap().is_some());
    let st = s.message().await.expect_err("the status in the trailers");
    assert_eq!(st.code(), tonic::Code::Aborted, "{st:?}");
    assert_eq!(st.message(), "stopped on request");
    assert_eq!(st.metadata().get("x-trailer").unwrap(), "present");

    // Bidi: each reply arrives before the next message is sent (interleaved, not buffered).
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let mut replies = chat(&mut c, tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..20 {
        tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("reply before the next message")
            .unwrap()
            .unwrap();
        assert_eq!(got, Bytes::from(format!("echo:m{i}")));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_server_stream_passes_whole() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    let mut c = grpc_client(b.addr).await;
    // 2000 messages of 16 KiB: 32 MiB through windows of a few hundred KiB.
    let mut s = count(
        &mut c,
        tonic::Request::new(Bytes::from_static(b"2000:16384")),
    )
    .await
    .unwrap()
    .into_inner();
    let (mut n, mut bytes) = (0u64, 0usize);
    while let Some(m) = s.message().await.expect("stream message") {
        n += 1;
        bytes += m.len();
    }
    assert_eq!((n, bytes), (2000, 2000 * 16384));
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Multiplexing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_streams_use_at_most_two_upstream_connections() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    let c = grpc_client(b.addr).await;
    // 64 bidi calls held open at once: each has said hello and got its echo.
    let mut held = Vec::new();
    let mut calls = Vec::new();
    for i in 0..64 {
        let mut c = c.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        held.push(tx.clone());
        calls.push(tokio::spawn(async move {
            let mut replies = chat(&mut c, tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("chat opens")
                .into_inner();
            tx.send(Bytes::from(format!("hello{i}"))).await.unwrap();
            let got = replies.message().await.unwrap().unwrap();
            assert_eq!(got, Bytes::from(format!("echo:hello{i}")));
            drop(tx);
            replies
        }));
    }
    let mut open = Vec::new();
    for call in calls {
        open.push(
            tokio::time::timeout(Duration::from_secs(30), call)
                .await
                .expect("64 calls open in time")
                .unwrap(),
        );
    }
    // All 64 streams are open at the backend now.
    assert!(be.streams() >= 64);
    assert!(
        be.connections() <= 2,
        "{} upstream connections for 64 streams",
        be.connections()
    );
    drop(held);
    for mut r in open {
        assert!(r.message().await.unwrap().is_none());
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_connection_gets_a_second_one_only_then() {
    // The backend allows 4 streams per connection: 8 held streams need 2 connections, and
    // 4 would have needed 1.
    let be = start_grpc_backend(4).await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    let c = grpc_client(b.addr).await;
    // Learn the backend's SETTINGS first.
    let mut c0 = c.clone();
    unary(&mut c0, tonic::Request::new(Bytes::from_static(b"x")))
        .await
        .unwrap();
    let mut held = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let mut replies = chat(&mut c, tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(Bytes::from(format!("h{i}"))).await.unwrap();
        assert!(replies.message().await.unwrap().is_some());
        held.push((tx, replies));
        if i == 3 {
            assert_eq!(be.connections(), 1, "4 streams fit one connection");
        }
    }
    assert_eq!(be.connections(), 2, "8 streams at 4 per connection");
    drop(held);
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Idle connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_is_closed_after_timeouts_idle() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(
        &[be.addr],
        "h2c",
        "[pools.web.timeouts]\nidle = \"1s\"\n",
    ))
    .await;
    let g = get(&client(), &b.url("/plain")).await;
    assert_eq!(g.status, 200);
    assert_eq!(be.open(), 1);
    let backend = backend_of(&b);
    assert_eq!(backend.h2.len(), 1);
    // The reaper runs every second: closed within idle + a tick or two.
    assert!(
        eventually(Duration::from_secs(6), || be.open() == 0).await,
        "idle h2 connection still open at the backend"
    );
    assert_eq!(backend.h2.len(), 0);
    // And the next request dials a fresh one.
    let g = get(&client(), &b.url("/plain")).await;
    assert_eq!(g.status, 200);
    assert_eq!(be.connections(), 2);
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GOAWAY and REFUSED_STREAM

/// The binary with one h2c pool of `backend`, one attempt per request (so a resend that spent
/// an attempt would fail), and its access log.
fn binary_with_log(backend: SocketAddr) -> (BinaryBalancer, AccessLog) {
    let cfg = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = true\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{backend}\"]\nprotocol = \"h2c\"\n[pools.web.retries]\nattempts = 1\n"
    );
    let mut bin = start_binary(&cfg, std::process::Stdio::piped());
    let log = AccessLog::of(&mut bin);
    (bin, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_on_a_connection_the_backend_goes_away_from_are_resent_without_spending_an_attempt() {
    // The first connection gets GOAWAY(last-stream-id 0): none of its streams was processed.
    let be = start_faulty_backend(Fault::GoawayFirstConnections(1)).await;
    let (bin, log) = binary_with_log(be.addr);
    let url = format!("http://{}/goaway", bin.addr);
    let c = h2_client();
    let mut calls = Vec::new();
    for i in 0..16 {
        let (c, url) = (c.clone(), url.clone());
        calls.push(tokio::spawn(async move {
            let req = HttpRequest::post(url)
                .body(full(format!("body-{i}")))
                .unwrap();
            send(&c, req).await
        }));
    }
    for call in calls {
        let g = call.await.unwrap();
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.body, "ok:POST");
    }
    assert!(be.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    // Each body reached the backend exactly once, whole.
    let mut bodies: Vec<String> = be
        .bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    bodies.sort();
    let mut want: Vec<String> = (0..16).map(|i| format!("body-{i}")).collect();
    want.sort();
    assert_eq!(bodies, want);
    let lines: Vec<serde_json::Value> = (0..16).map(|_| log.line_for("/goaway")).collect();
    let resent: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["reason"] == "upstream_goaway_retried")
        .collect();
    assert!(!resent.is_empty(), "{lines:?}");
    for l in resent {
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["attempts"], 1, "{l}");
        assert_eq!(l["outcome"], "retried", "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_resent_for_any_method() {
    let be = start_faulty_backend(Fault::RefuseEvery(2)).await;
    let (bin, log) = binary_with_log(be.addr);
    let url = format!("http://{}/refused", bin.addr);
    let c = client();
    for i in 0..10 {
        let req = HttpRequest::post(url.clone())
            .body(full(format!("refused-{i}")))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.body, "ok:POST");
    }
    let g = get(&c, &url).await;
    assert_eq!(g.status, 200);
    let refused = be.refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(refused >= 5, "{refused}");
    assert_eq!(be.bodies.lock().unwrap().len(), 10);
    let lines: Vec<serde_json::Value> = (0..11).map(|_| log.line_for("/refused")).collect();
    let n = lines
        .iter()
        .filter(|l| l["reason"] == "refused_stream_retried" && l["attempts"] == 1)
        .count();
    assert_eq!(n as u64, refused, "{lines:?}");
}

/// A GET whose stream the first backend reset (maybe processed) is retried on the next one
/// as the client sent it: its own authority, not the one the first backend was given, and
/// not the next backend's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reset_by_one_h2_backend_is_retried_on_the_next_with_its_authority() {
    let bad = start_faulty_backend(Fault::ResetAll).await;
    let good = start_faulty_backend(Fault::None).await;
    let cfg = format!(
        "watch = false\n[[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{}\", \"{}\"]\nprotocol = \"h2c\"\n",
        bad.addr, good.addr
    );
    let bin = start_binary(&cfg, std::process::Stdio::null());
    let c = client();
    for i in 0..4 {
        let req = HttpRequest::get(format!("http://{}/again", bin.addr))
            .header("host", "app.example")
            .body(full(Bytes::new()))
            .unwrap();
        let g = send(&c, req).await;
        assert_eq!(
            (g.status.as_u16(), g.body.as_str()),
            (200, "ok:GET"),
            "request {i}"
        );
    }
    assert!(bad.connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let seen = good.authorities.lock().unwrap().clone();
    assert_eq!(seen, vec!["app.example"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_goaway_mid_load_fails_no_call() {
    let be = start_grpc_backend(100).await;
    let b = start_balancer(&h2_config(
        &[be.addr],
        "h2c",
        "[pools.web.retries]\nattempts = 1\n",
    ))
    .await;
    let c = grpc_client(b.addr).await;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (mut c, done) = (c.clone(), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            for i in 0..60 {
                let msg = Bytes::from(format!("w{w}-{i}"));
                let r = unary(&mut c, tonic::Request::new(msg.clone()))
                    .await
                    .unwrap_or_else(|s| panic!("call w{w}-{i} failed: {s:?}"));
                assert_eq!(r.get_ref(), &msg);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(20), || done
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 100)
        .await
    );
    be.goaway_all();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 480);
    assert!(be.connections() >= 2, "a new connection after the GOAWAY");
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// h2 over TLS

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A private CA and a leaf for `a.test` signed by it.
fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name.push(DnType::CommonName, "h2 test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A TLS backend offering only `alpn`; serves the test services over h2 when `h2` was
/// selected, else answers HTTP/1.1 `200 h1`.
async fn start_tls_h2_backend(
    p: &Pki,
    alpn: &[&[u8]],
) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(p.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = Arc::clone(&handshakes);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, h) = (acceptor.clone(), Arc::clone(&h));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    serve_h2_io(tls).await;
                } else {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(full("h1")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    (addr, handshakes)
}

fn tls_pool_extra(dir: &std::path::Path, p: &Pki) -> String {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    format!(
        "tls = {{ ca = \"{}\", server_name = \"a.test\" }}\n[pools.web.circuit_breaker]\nconsecutive_failures = 1000\n",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pool_speaks_http2_over_tls_with_alpn_and_carries_grpc() {
    let p = pki();
    let (addr, handshakes) = start_tls_h2_backend(&p, &[b"h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let b = start_balancer(&h2_config(&[addr], "h2", &tls_pool_extra(dir.path(), &p))).await;
    for c in [client(), h2_client()] {
        let g = get(&c, &b.url("/plain/tls")).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(line(&g.body, "version"), "HTTP/2.0");
        assert_eq!(line(&g.body, "authority"), b.addr.to_string());
    }
    let mut gc = grpc_client(b.addr).await;
    let r = sum(&mut gc, vec![20, 22]).await.expect("grpc over h2+tls");
    assert_eq!(r.get_ref(), &Bytes::from_static(b"42"));
    assert_eq!(handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_that_does_not_select_h2_is_a_502_with_its_own_reason() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    // One backend refuses the handshake (no protocol in common: RFC 7301's alert), the other
    // completes it without ALPN, as an HTTP/1.1-only server would.
    for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
        let (addr, _) = start_tls_h2_backend(&p, alpn).await;
        let b = start_balancer(&h2_config(&[addr], "h2", &tls_pool_extra(dir.path(), &p))).await;
        let g = get(&client(), &b.url("/plain/tls")).await;
        assert_eq!(g.status, 502, "{alpn:?}: {}", g.body);
        let st = status(&b).await;
        let be = status_backend(&st, "web", addr).unwrap();
        assert_eq!(
            be["last_error"]["reason"], "upstream_alpn_mismatch",
            "{alpn:?}: {be}"
        );
        // The same backend through an http1 pool is fine: only the h2 pool needs h2.
        b.write_config(&config(
            &[addr],
            "round_robin",
            &tls_pool_extra(dir.path(), &p),
        ));
        b.handle
            .reload(balancer::reload::Trigger::Admin)
            .await
            .unwrap();
        let g = get(&client(), &b.url("/plain/tls")).await;
        assert_eq!(g.status, 200, "{alpn:?}: {}", g.body);
        assert_eq!(g.body, "h1");
        b.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket and reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_on_an_h2c_pool_is_tunnelled_over_http1_to_the_same_address() {
    use futures_util::{SinkExt, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    // An echo WebSocket server (HTTP/1.1 only, as most are).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Text(_)) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let b = start_balancer(&h2_config(&[addr], "h2c", "")).await;
    let tcp = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/ws", b.addr), tcp)
        .await
        .expect("handshake through an h2c pool");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Text(format!("hello {i}").into()));
    }
    drop(ws);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_from_http1_to_h2c_under_load_fails_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let be = start_grpc_backend_auto().await;
    let b = start_balancer(&config(&[be.addr], "round_robin", "")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let after = Arc::new(AtomicBool::new(false));
    let (ok, h2_after) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, after, ok, h2_after) = (
            Arc::clone(&stop),
            Arc::clone(&after),
            Arc::clone(&ok),
            Arc::clone(&h2_after),
        );
        let url = b.url(&format!("/plain/w{w}"));
        workers.push(tokio::spawn(async move {
            let c = client();
            for i in 0..2000 {
                if stop.load(SeqCst) {
                    break;
                }
                // Read before the request: a request sent after the reload returned must
                // be on the new protocol.
                let reloaded = after.load(SeqCst);
                let req = HttpRequest::post(url.clone())
                    .body(full(format!("w{w}-{i}")))
                    .unwrap();
                let g = send(&c, req).await;
                assert_eq!(g.status, 200, "w{w} request {i}: {}", g.body);
                let version = line(&g.body, "version");
                if reloaded {
                    assert_eq!(version, "HTTP/2.0", "w{w} request {i} after the reload");
                    h2_after.fetch_add(1, SeqCst);
                }
                ok.fetch_add(1, SeqCst);
            }
        }));
    }
    assert!(eventually(Duration::from_secs(20), || ok.load(SeqCst) >= 100).await);
    let before = be.connections();
    b.write_config(&h2_config(&[be.addr], "h2c", ""));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    after.store(true, SeqCst);
    assert!(eventually(Duration::from_secs(20), || h2_after.load(SeqCst) >= 100).await);
    stop.store(true, SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    // The h1 connections of before were all given up; the h2c requests shared one or two.
    assert!(
        be.connections() <= before + 2,
        "{} then {}",
        before,
        be.connections()
    );
    b.shutdown().await;
}

/// 64 MiB of server stream to a client that reads slowly at first: the balancer holds no more
/// than its flow-control windows, so its memory does not grow with the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_server_stream_to_a_slow_reader_keeps_balancer_memory_flat() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let be = start_grpc_backend(100).await;
    let bin = Arc::new(start_binary(
        &h2_config(&[be.addr], "h2c", ""),
        std::process::Stdio::null(),
    ));
    let mut c = grpc_client(bin.addr).await;
    // Warm up (first connections, buffers) before taking the baseline.
    unary(&mut c, tonic::Request::new(Bytes::from_static(b"warm")))
        .await
        .unwrap();
    let base = bin.rss_kib();
    let (peak, stop) = (
        Arc::new(AtomicU64::new(base)),
        Arc::new(AtomicBool::new(false)),
    );
    let sampler = {
        let (peak, stop, bin) = (Arc::clone(&peak), Arc::clone(&stop), Arc::clone(&bin));
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                peak.fetch_max(bin.rss_kib(), SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut s = count(
        &mut c,
        tonic::Request::new(Bytes::from_static(b"4096:16384")),
    )
    .await
    .unwrap()
    .into_inner();
    let mut total = 0usize;
    let mut n = 0;
    while let Some(m) = s.message().await.expect("stream message") {
        total += m.len();
        n += 1;
        if n < 300 {
            // A slow start: the backend could send far ahead if nothing held it back.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    stop.store(true, SeqCst);
    sampler.join().unwrap();
    assert_eq!(total, 4096 * 16384);
    let grew = peak.load(SeqCst).saturating_sub(base);
    assert!(
        grew < 24 * 1024,
        "balancer RSS grew by {grew} KiB while relaying a 64 MiB stream"
    );
}

/// Clients that stop reading their streams hold those streams' windows on the shared upstream
/// connection, not the connection's: another client's call on the same connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_stall_other_streams_on_the_shared_connection() {
    let be = start_grpc_backend(100).await;
    // The stall watchdog (limits.header_timeout) would reset the stalled streams and free
    // their windows: keep it out of the test's time.
    let b = start_balancer(&format!(
        "{}[limits]\nheader_timeout = \"60s\"\n",
        h2_config(&[be.addr], "h2c", "")
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..12 {
        // One client connection each: a client's own connection window is not what is tested.
        let mut c = grpc_client(b.addr).await;
        let mut s = count(
            &mut c,
            tonic::Request::new(Bytes::from_static(b"1024:16384")),
        )
        .await
        .unwrap()
        .into_inner();
        assert!(s.message().await.unwrap().is_some());
        held.push(s); // never read again
    }
    // Let the backend fill every window it may.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut other = grpc_client(b.addr).await;
    for i in 0..5 {
        let msg = Bytes::from(format!("still-flowing-{i}"));
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            unary(&mut other, tonic::Request::new(msg.clone())),
        )
        .await
        .expect("a call on the shared connection is not held up by stalled streams")
        .unwrap();
        assert_eq!(r.get_ref(), &msg);
    }
    assert_eq!(be.connections(), 1, "all on one upstream connection");
    drop(held);
    b.shutdown().await;
}

/// A reload from h2c back to http1 while a gRPC stream is open: the stream finishes on its old
/// connection, new requests go over HTTP/1.1, and the old connection is closed once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_across_a_protocol_reload_finishes_on_its_connection() {
    let be = start_grpc_backend_auto().await;
    let b = start_balancer(&h2_config(&[be.addr], "h2c", "")).await;
    let mut c = grpc_client(b.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let mut replies = chat(&mut c, tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(Bytes::from_static(b"before")).await.unwrap();
    assert_eq!(
        replies.message().await.unwrap().unwrap(),
        Bytes::from_static(b"echo:before")
    );
    let backend = backend_of(&b);
    assert_eq!(backend.h2.len(), 1);

    b.write_config(&config(&[be.addr], "round_robin", ""));
    b.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    let g = get(&client(), &b.url("/plain/after")).await;
    assert_eq!(g.status, 200);
    assert_eq!(line(&g.body, "version"), "HTTP/1.1");

    // The stream carries on over the old h2 connection; the reaper leaves it alone meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.send(Bytes::from_static(b"after")).await.unwrap();
    assert_eq!(
        replies.message().await.unwrap().unwrap(),
        Bytes::from_static(b"echo:after")
    );
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    drop(replies);
    // Done with it: the h2 connection of the old protocol is closed, never handed out again.
    assert!(
        eventually(Duration::from_secs(5), || backend.h2.is_empty()).await,
        "old h2 connection kept"
    );
    b.shutdown().await;
}
