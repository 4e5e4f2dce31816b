//! TLS at both ends, for real: certificates made at test time with rcgen (a private CA and
//! leaves for `a.test` and `b.test`), a rustls client that trusts only that CA, and a TLS
//! backend for upstream TLS.
//!
//! Covered: HTTPS GET with `X-Forwarded-Proto: https`; SNI selection (known name, absent,
//! unknown); ALPN h2 and http/1.1; TLS 1.2 and 1.3; a stalled handshake cut off after
//! `limits.header_timeout`; a renewed certificate served after a reload; a missing certificate
//! rejected by `balancer check` and by a reload (the old one keeps serving); upstream TLS with
//! a private CA and `server_name`, and a backend that does not verify -> 502 + `failures`.

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

// ------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
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

fn make_leaf(ca: &Ca, name: &str) -> Leaf {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// Writes `leaf` as `DIR/NAME.pem` + `DIR/NAME.key`; the two paths.
fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (cert, key)
}

fn q(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// A TLS listener with one certificate (or several, by SNI) in front of `backends`.
fn tls_config(backends: &[SocketAddr], certs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    let mut tls = String::new();
    if certs.len() == 1 {
        tls.push_str(&format!(
            "tls = {{ cert = {}, key = {} }}\n",
            q(&certs[0].0),
            q(&certs[0].1)
        ));
    } else {
        for (c, k) in certs {
            tls.push_str(&format!(
                "[[listeners.tls.certificates]]\ncert = {}\nkey = {}\n",
                q(c),
                q(k)
            ));
        }
    }
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [limits]\nheader_timeout = \"1s\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n{tls}\
         [pools.web]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

// ------------------------------------------------------------------------------------------
// Clients

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn client_config(
    ca_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca_pem))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Offers http/1.1 only: ALPN is binding, and `h1_get` speaks HTTP/1.1.
fn default_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    client_config(
        ca_pem,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    )
}

/// Offers h2 first, like a browser.
fn h2_first_client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    client_config(
        ca_pem,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"h2", b"http/1.1"],
    )
}

/// Accepts any certificate: for looking at what the server sends to an unknown name.
#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn accept_any_client(sni: bool) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    cfg.enable_sni = sni;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .expect("server sent a certificate")[0]
        .to_vec()
}

/// One HTTP/1.1 GET over an established stream: (status, body).
async fn h1_get(stream: TlsStream<TcpStream>, host: &str, path: &str) -> (u16, String) {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ------------------------------------------------------------------------------------------
// Listener TLS

#[tokio::test]
async fn https_get_reaches_backend_with_forwarded_proto_https() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a], "")).await;

    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .expect("handshake");
    assert_eq!(peer_cert(&s), leaf.der);
    let (status, body) = h1_get(s, "a.test", "/hello").await;
    assert_eq!(status, 200);
    assert_eq!(body, "web1");
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(h.get("host").unwrap(), "a.test");
    assert_eq!(h.get("x-forwarded-host").unwrap(), "a.test");
    assert_eq!(backend.requests(), 1);

    // Plain HTTP on a TLS listener is not served as HTTP.
    let mut tcp = TcpStream::connect(bal.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("web1"));
    assert_eq!(backend.requests(), 1);
    bal.shutdown().await;
}

#[tokio::test]
async fn sni_selects_the_certificate_and_the_first_is_the_default() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf_a = make_leaf(&ca, "a.test");
    let leaf_b = make_leaf(&ca, "b.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf_a);
    let b = write_leaf(dir.path(), "b", &leaf_b);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a, b], "")).await;
    let verified = default_client(&ca.pem);

    // SNI b.test: the b certificate, which verifies for b.test against the CA.
    let s = tls_connect(bal.addr, "b.test", Arc::clone(&verified))
        .await
        .expect("b.test handshake");
    assert_eq!(
        peer_cert(&s),
        leaf_b.der,
        "SNI b.test must get the b certificate"
    );
    let (status, body) = h1_get(s, "b.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "web1"));

    // SNI a.test: the a certificate.
    let s = tls_connect(bal.addr, "a.test", Arc::clone(&verified))
        .await
        .expect("a.test handshake");
    assert_eq!(peer_cert(&s), leaf_a.der);

    // No SNI at all: the first certificate (a), which still verifies for a.test.
    let mut no_sni = (*verified).clone();
    no_sni.enable_sni = false;
    let s = tls_connect(bal.addr, "a.test", Arc::new(no_sni))
        .await
        .expect("handshake without SNI");
    assert_eq!(
        peer_cert(&s),
        leaf_a.der,
        "no SNI must get the first certificate"
    );
    let (status, _) = h1_get(s, "a.test", "/").await;
    assert_eq!(status, 200);

    // An unknown name: the first certificate, not a failed handshake.
    let s = tls_connect(bal.addr, "c.test", accept_any_client(true))
        .await
        .expect("handshake with unknown SNI");
    assert_eq!(
        peer_cert(&s),
        leaf_a.der,
        "unknown SNI must get the first certificate"
    );
    let s = tls_connect(bal.addr, "b.test", accept_any_client(false))
        .await
        .expect("handshake without SNI");
    assert_eq!(peer_cert(&s), leaf_a.der);

    // A client that verifies c.test refuses the default certificate (it is for a.test).
    assert!(tls_connect(bal.addr, "c.test", verified).await.is_err());
    bal.shutdown().await;
}

#[tokio::test]
async fn alpn_h2_and_http11_both_work() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a], "")).await;

    // h2 offered first: negotiated, and spoken.
    let s = tls_connect(bal.addr, "a.test", h2_first_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::get(format!("https://a.test/h2/{i}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"web1");
    }
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    assert_eq!(h.get("host").unwrap(), "a.test");
    assert_eq!(
        backend.state.last_uri.lock().unwrap().as_deref(),
        Some("/h2/2")
    );

    // http/1.1 only: negotiated, and spoken.
    let s = tls_connect(
        bal.addr,
        "a.test",
        client_config(&ca.pem, &[&rustls::version::TLS13], &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);

    // No ALPN at all: HTTP/1.1.
    let s = tls_connect(
        bal.addr,
        "a.test",
        client_config(&ca.pem, &[&rustls::version::TLS13], &[]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);
    bal.shutdown().await;
}

#[tokio::test]
async fn tls12_and_tls13_are_both_accepted() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a], "")).await;
    for (v, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let s = tls_connect(
            bal.addr,
            "a.test",
            client_config(&ca.pem, &[v], &[b"http/1.1"]),
        )
        .await
        .unwrap_or_else(|e| panic!("{want:?} handshake failed: {e}"));
        assert_eq!(s.get_ref().1.protocol_version(), Some(want));
        let (status, body) = h1_get(s, "a.test", "/").await;
        assert_eq!((status, body.as_str()), (200, "web1"), "{want:?}");
    }
    assert_eq!(backend.requests(), 2);
    bal.shutdown().await;
}

/// Reads until EOF or error; how long that took (None if it did not end within `limit`).
async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn stalled_handshake_is_cut_off_after_header_timeout() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a], "")).await;

    // Connect and send nothing.
    let mut idle = TcpStream::connect(bal.addr).await.unwrap();
    // Connect and send half a TLS record header, then nothing.
    let mut partial = TcpStream::connect(bal.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    let (t1, t2) = tokio::join!(
        time_to_close(&mut idle, Duration::from_secs(8)),
        time_to_close(&mut partial, Duration::from_secs(8))
    );
    for (what, t) in [("silent", t1), ("partial", t2)] {
        let t = t.unwrap_or_else(|| panic!("{what} handshake was not cut off within 8s"));
        assert!(
            t >= Duration::from_millis(800),
            "{what} handshake cut off too early: {t:?}"
        );
        assert!(
            t < Duration::from_secs(5),
            "{what} handshake cut off too late: {t:?}"
        );
    }

    // The listener still serves.
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);
    bal.shutdown().await;
}

#[tokio::test]
async fn renewed_certificate_is_served_after_reload_without_restart() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let v1 = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &v1);
    let cfg = tls_config(&[backend.addr], &[a], "");
    let bal = start_balancer(&cfg).await;

    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), v1.der);
    // A connection open across the renewal keeps working.
    let (mut old_tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);

    let v2 = make_leaf(&ca, "a.test");
    assert_ne!(v1.der, v2.der);
    write_leaf(dir.path(), "a", &v2);
    // Not re-read until a reload.
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(
        peer_cert(&s),
        v1.der,
        "certificate changed before any reload"
    );

    let v = bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .expect("reload accepted");
    assert!(v >= 2);
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(
        peer_cert(&s),
        v2.der,
        "renewed certificate not served after the reload"
    );
    let (status, body) = h1_get(s, "a.test", "/").await;
    assert_eq!((status, body.as_str()), (200, "web1"));

    let req = Request::get("/old")
        .header("host", "a.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), old_tx.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The renewal also works through POST /reload.
    let v3 = make_leaf(&ca, "a.test");
    write_leaf(dir.path(), "a", &v3);
    let g = post(&client(), &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), v3.der);
    bal.shutdown().await;
}

#[tokio::test]
async fn missing_certificate_fails_check_and_is_rejected_on_reload() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let missing_cert = dir.path().join("missing-cert.pem");
    let missing = (missing_cert.clone(), a.1.clone());

    // `balancer check` names the missing file and exits 1.
    let bad = tls_config(&[backend.addr], std::slice::from_ref(&missing), "")
        .replace("{listen}", "127.0.0.1:1")
        .replace("{admin}", "127.0.0.1:2");
    let bad_path = dir.path().join("bad.toml");
    std::fs::write(&bad_path, &bad).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&bad_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {} stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("missing-cert.pem"),
        "stderr must name the file: {stderr}"
    );
    // A missing key is caught the same way.
    let bad_key = tls_config(
        &[backend.addr],
        &[(a.0.clone(), dir.path().join("missing-key.key"))],
        "",
    )
    .replace("{listen}", "127.0.0.1:1")
    .replace("{admin}", "127.0.0.1:2");
    std::fs::write(&bad_path, &bad_key).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&bad_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing-key.key"),
        "stderr must name the file: {stderr}"
    );
    // And the good file passes.
    let good = tls_config(&[backend.addr], std::slice::from_ref(&a), "")
        .replace("{listen}", "127.0.0.1:1")
        .replace("{admin}", "127.0.0.1:2");
    std::fs::write(&bad_path, &good).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&bad_path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Running: a reload onto a missing certificate is rejected and the old one keeps serving.
    let bal = start_balancer(&tls_config(&[backend.addr], std::slice::from_ref(&a), "")).await;
    let before = status(&bal).await["config"]["version"].as_u64().unwrap();
    bal.write_config(&tls_config(&[backend.addr], &[missing], ""));
    let err = bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .expect_err("reload must be rejected");
    assert!(
        err.contains("missing-cert.pem"),
        "error must name the file: {err}"
    );
    let st = status(&bal).await;
    assert_eq!(st["config"]["version"].as_u64().unwrap(), before);
    assert!(
        st["config"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("missing-cert.pem"),
        "{st}"
    );
    let g = post(&client(), &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 400);
    assert!(g.body.contains("missing-cert.pem"), "{}", g.body);
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .expect("old certificate still served");
    assert_eq!(peer_cert(&s), leaf.der);
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);

    // The file the running config names disappears: a reload is rejected, serving goes on.
    bal.write_config(&tls_config(&[backend.addr], std::slice::from_ref(&a), ""));
    std::fs::remove_file(&a.0).unwrap();
    let err = bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .expect_err("reload must be rejected");
    assert!(err.contains("a.pem"), "error must name the file: {err}");
    let s = tls_connect(bal.addr, "a.test", default_client(&ca.pem))
        .await
        .expect("old certificate still served");
    assert_eq!(peer_cert(&s), leaf.der);
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);

    // A garbage certificate file is rejected too.
    std::fs::write(&a.0, "not a certificate\n").unwrap();
    assert!(bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .is_err());
    // Restored: the reload goes through.
    std::fs::write(&a.0, &leaf.cert_pem).unwrap();
    bal.handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .expect("valid again");
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Upstream TLS

struct TlsBackend {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    handshakes_failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that speaks HTTP/1.1 over TLS with `leaf`; answers `NAME` and echoes the
/// request's `Host` and `X-Forwarded-Proto` in response headers.
async fn start_tls_backend(name: &'static str, leaf: &Leaf) -> TlsBackend {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let handshakes_failed = Arc::new(AtomicU64::new(0));
    let (r, f) = (Arc::clone(&requests), Arc::clone(&handshakes_failed));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let (r, f) = (Arc::clone(&r), Arc::clone(&f));
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(_) => {
                        f.fetch_add(1, SeqCst);
                        return;
                    }
                };
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let r = Arc::clone(&r);
                    async move {
                        r.fetch_add(1, SeqCst);
                        let mut resp = Response::new(full(name));
                        for h in ["host", "x-forwarded-proto"] {
                            if let Some(v) = req.headers().get(h) {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(format!("x-saw-{h}").as_bytes())
                                        .unwrap(),
                                    v.clone(),
                                );
                            }
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsBackend {
        addr,
        requests,
        handshakes_failed,
        task,
    }
}

fn upstream_config(backend: SocketAddr, tls: &str) -> String {
    format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [pools.web]\nbackends = [\"{backend}\"]\ntls = {tls}\n\
         [pools.web.circuit_breaker]\nconsecutive_failures = 1000\n"
    )
}

#[tokio::test]
async fn upstream_tls_with_private_ca_and_server_name() {
    let ca = make_ca("Internal CA");
    let leaf = make_leaf(&ca, "a.test");
    let backend = start_tls_backend("secure", &leaf).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let bal = start_balancer(&upstream_config(
        backend.addr,
        &format!("{{ ca = {}, server_name = \"a.test\" }}", q(&ca_path)),
    ))
    .await;
    let c = client();
    for i in 0..5 {
        let g = get(&c, &bal.url(&format!("/x/{i}"))).await;
        assert_eq!(g.status, 200, "{}", g.body);
        assert_eq!(g.body, "secure");
        assert_eq!(g.headers.get("x-saw-x-forwarded-proto").unwrap(), "http");
        assert_eq!(g.headers.get("x-saw-host").unwrap(), &bal.addr.to_string());
    }
    assert_eq!(backend.requests.load(SeqCst), 5);
    assert_eq!(backend.handshakes_failed.load(SeqCst), 0);
    let st = status(&bal).await;
    let b = status_backend(&st, "web", backend.addr).unwrap();
    assert_eq!(b["failures"], 0, "{b}");
    assert_eq!(b["requests"], 5, "{b}");
    // Sequential requests reuse the one TLS connection: the pool's liveness peek must not
    // take the session's own records (tickets) for a backend that went away.
    assert_eq!(b["connections_opened"], 1, "{b}");
    bal.shutdown().await;
}

async fn assert_upstream_tls_fails(tls: impl Fn(&Path) -> String, why: &str) {
    let ca = make_ca("Internal CA");
    let leaf = make_leaf(&ca, "a.test");
    let backend = start_tls_backend("secure", &leaf).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let other_ca = make_ca("Some Other CA");
    let other_path = dir.path().join("other-ca.pem");
    std::fs::write(&other_path, &other_ca.pem).unwrap();
    let _ = &other_path;
    let bal = start_balancer(&upstream_config(backend.addr, &tls(dir.path()))).await;
    let c = client();
    let mut last = 0;
    for i in 1..=3u64 {
        let g = get(&c, &bal.url("/")).await;
        assert_eq!(g.status, 502, "{why}: {}", g.body);
        assert_ne!(g.body, "secure");
        let st = status(&bal).await;
        let b = status_backend(&st, "web", backend.addr).unwrap();
        let failures = b["failures"].as_u64().unwrap();
        assert!(
            failures > last && failures >= i,
            "{why}: failures must grow: {b}"
        );
        last = failures;
    }
    assert_eq!(
        backend.requests.load(SeqCst),
        0,
        "{why}: no request may reach an unverified backend"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn upstream_tls_with_wrong_server_name_gives_502_and_counts_failures() {
    assert_upstream_tls_fails(
        |d| {
            format!(
                "{{ ca = {}, server_name = \"b.test\" }}",
                q(&d.join("ca.pem"))
            )
        },
        "wrong server_name",
    )
    .await;
}

#[tokio::test]
async fn upstream_tls_with_wrong_ca_gives_502_and_counts_failures() {
    assert_upstream_tls_fails(
        |d| {
            format!(
                "{{ ca = {}, server_name = \"a.test\" }}",
                q(&d.join("other-ca.pem"))
            )
        },
        "wrong CA",
    )
    .await;
}

#[tokio::test]
async fn upstream_tls_default_name_is_the_backend_host() {
    // Without server_name the backend's address (an IP here) is the name: a.test's
    // certificate does not cover 127.0.0.1, so this fails verification.
    assert_upstream_tls_fails(
        |d| format!("{{ ca = {} }}", q(&d.join("ca.pem"))),
        "IP name",
    )
    .await;
}

/// Reads until the peer closes (or 5 s pass).
async fn read_to_close(s: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// The error code of the first GOAWAY among the h2 frames in `bytes`.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let kind = bytes[3];
        let payload = bytes.get(9..9 + len)?;
        if kind == 0x7 && len >= 8 {
            return Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
        bytes = &bytes[9 + len..];
    }
    None
}

/// ALPN is binding (h2spec 3.5 #2): after `h2` only HTTP/2 is spoken, and a bad preface
/// gets GOAWAY(PROTOCOL_ERROR), not an HTTP/1.1 answer; after `http/1.1`, or without ALPN,
/// an h2 preface is not taken up as HTTP/2.
#[tokio::test]
async fn alpn_is_binding() {
    let backend = start_backend("web1").await;
    let ca = make_ca("Test CA");
    let leaf = make_leaf(&ca, "a.test");
    let dir = tempfile::tempdir().unwrap();
    let a = write_leaf(dir.path(), "a", &leaf);
    let bal = start_balancer(&tls_config(&[backend.addr], &[a], "")).await;

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        &b"INVALID CONNECTION PREFACE\r\n\r\n"[..],
    ] {
        let mut s = tls_connect(bal.addr, "a.test", h2_first_client(&ca.pem))
            .await
            .unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        s.write_all(garbage).await.unwrap();
        let out = read_to_close(&mut s).await;
        assert!(
            !out.starts_with(b"HTTP/"),
            "answered as HTTP/1: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(
            goaway_code(&out),
            Some(1),
            "no GOAWAY(PROTOCOL_ERROR): {out:?}"
        );
    }
    assert_eq!(backend.requests(), 0);

    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
        let mut s = tls_connect(
            bal.addr,
            "a.test",
            client_config(&ca.pem, &[&rustls::version::TLS13], alpn),
        )
        .await
        .unwrap();
        s.write_all(preface).await.unwrap();
        let out = read_to_close(&mut s).await;
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 "),
            "ALPN {alpn:?}: an h2 preface was taken up: {out:?}"
        );
    }
    // Both still work when spoken as negotiated.
    let s = tls_connect(
        bal.addr,
        "a.test",
        client_config(&ca.pem, &[&rustls::version::TLS13], &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(h1_get(s, "a.test", "/").await.0, 200);
    let s = tls_connect(bal.addr, "a.test", h2_first_client(&ca.pem))
        .await
        .unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://a.test/h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
    bal.shutdown().await;
}
