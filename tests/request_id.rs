//! Request IDs, trace context and the operator's access log, against the real binary where the
//! logs are involved: `[log] request_id_header` (kept if sane, else generated; to the backend,
//! back to the client, in the log; configurable; off), `traceparent` passed untouched with its
//! trace id logged, the fields `host`, `user_agent`, `upstream_ms`, `bytes_received` and `tls`,
//! `[log] access_file` with logrotate's rename + SIGUSR1 and a reload that moves it, and the
//! `RUST_LOG=debug` lines for route, pick and retry.

mod common;
use common::*;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The access log on, `log_extra` in `[log]`; `/app` and `/echo` go to `web`, `/dead` to a pool
/// whose backend refuses connections, anything else is a 404.
fn logged(backend: SocketAddr, log_extra: &str) -> String {
    format!(
        "watch = false\nshutdown_grace = \"2s\"\n[admin]\nbind = \"{{admin}}\"\n\
         [log]\naccess = true\nlevel = \"warn\"\n{log_extra}\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/app\"\npool = \"web\"\n\
         [[routes]]\npath_prefix = \"/echo\"\npool = \"web\"\n\
         [[routes]]\npath_prefix = \"/dead\"\npool = \"dead\"\n\
         [pools.web]\nbackends = [\"{backend}\"]\n\
         [pools.dead]\nbackends = [\"{}\"]\n",
        free_port()
    )
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

fn get_with(url: &str, headers: &[(&str, &[u8])]) -> Request<TestBody> {
    let mut r = Request::get(url);
    for (k, v) in headers {
        r = r.header(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    r.body(full(Bytes::new())).unwrap()
}

fn backend_saw(b: &TestBackend, name: &str) -> Vec<Vec<u8>> {
    let h = b.state.last_headers.lock().unwrap();
    h.as_ref()
        .expect("the backend got a request")
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect()
}

fn response_id(g: &Got, name: &str) -> String {
    let all: Vec<_> = g.headers.get_all(name).iter().collect();
    assert_eq!(all.len(), 1, "one {name} on the response: {:?}", g.headers);
    all[0].to_str().unwrap().to_owned()
}

/// A sane incoming ID reaches the backend, comes back to the client and is logged, over
/// HTTP/1.1 and h2; an ID the backend sets on its response gives way to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sane_incoming_id_is_kept_end_to_end() {
    let web = start_backend("web").await;
    let mut bin = start_binary(&logged(web.addr, ""), Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let base = format!("http://{}", bin.addr);
    for (i, (proto, c)) in [("HTTP/1.1", client()), ("HTTP/2", h2_client())]
        .into_iter()
        .enumerate()
    {
        let id = format!("req-{i}_Ab.9:~!{{}}");
        let path = format!("/app/kept{i}");
        let g = send(
            &c,
            get_with(&format!("{base}{path}"), &[("x-request-id", id.as_bytes())]),
        )
        .await;
        assert_eq!(g.status, 200, "{proto}");
        assert_eq!(response_id(&g, "x-request-id"), id, "{proto}");
        assert_eq!(
            backend_saw(&web, "x-request-id"),
            [id.as_bytes()],
            "{proto}"
        );
        let l = log.line_for(&path);
        assert_eq!(l["request_id"], id.as_str(), "{proto}: {l}");
        assert_eq!(l["proto"], proto);
    }
}

/// Too long, with a tab, with a space, with non-ASCII bytes, or sent twice: replaced by a
/// generated UUID v4, the same one at the backend, on the response and in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insane_ids_are_replaced_by_generated_ones() {
    let web = start_backend("web").await;
    let mut bin = start_binary(&logged(web.addr, ""), Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let c = client();
    let long = "a".repeat(129);
    let cases: [&[(&str, &[u8])]; 5] = [
        &[("x-request-id", long.as_bytes())],
        &[("x-request-id", b"a\tb")],
        &[("x-request-id", b"a b")],
        &[("x-request-id", "caf\u{e9}".as_bytes())],
        &[("x-request-id", b"one"), ("x-request-id", b"two")],
    ];
    for (i, headers) in cases.iter().enumerate() {
        let path = format!("/app/insane{i}");
        let g = send(&c, get_with(&format!("http://{}{path}", bin.addr), headers)).await;
        assert_eq!(g.status, 200, "case {i}");
        let id = response_id(&g, "x-request-id");
        assert!(is_uuid_v4(&id), "case {i}: {id:?}");
        assert_eq!(
            backend_saw(&web, "x-request-id"),
            [id.as_bytes()],
            "case {i}"
        );
        assert_eq!(log.line_for(&path)["request_id"], id.as_str(), "case {i}");
    }
    // The longest sane one is kept.
    let max = "b".repeat(128);
    let g = send(
        &c,
        get_with(
            &format!("http://{}/app/max", bin.addr),
            &[("x-request-id", max.as_bytes())],
        ),
    )
    .await;
    assert_eq!(response_id(&g, "x-request-id"), max);
}

/// Without an incoming ID, each request gets its own: 1000 requests over a few connections,
/// 1000 distinct UUIDs, each the one its backend saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_ids_are_unique_across_1000_requests() {
    let web = start_backend("web").await;
    let bal = start_balancer(&config(&[web.addr], "round_robin", "")).await;
    let mut seen = HashSet::new();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let url = bal.url(&format!("/t{t}"));
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut ids = Vec::new();
            for _ in 0..250 {
                let g = get(&c, &url).await;
                assert_eq!(g.status, 200);
                ids.push(response_id(&g, "x-request-id"));
            }
            ids
        }));
    }
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(is_uuid_v4(&id), "{id:?}");
            assert!(seen.insert(id.clone()), "{id} handed out twice");
        }
    }
    assert_eq!(seen.len(), 1000);
    let g = get(&client(), &bal.url("/last")).await;
    let id = response_id(&g, "x-request-id");
    assert_eq!(backend_saw(&web, "x-request-id"), [id.as_bytes()]);
    bal.shutdown().await;
}

/// The balancer's own answers carry the ID too: 404 (no route), 502 (backend refused), and a
/// 400 for a malformed request that still got as far as the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_answers_carry_the_id() {
    let web = start_backend("web").await;
    let mut bin = start_binary(&logged(web.addr, ""), Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let c = client();
    for (path, status) in [("/nowhere", 404), ("/dead", 502)] {
        let g = send(
            &c,
            get_with(
                &format!("http://{}{path}", bin.addr),
                &[("x-request-id", b"mine-1")],
            ),
        )
        .await;
        assert_eq!(g.status, status, "{path}");
        assert_eq!(response_id(&g, "x-request-id"), "mine-1", "{path}");
        let l = log.line_for(path);
        assert_eq!(l["request_id"], "mine-1", "{l}");
        assert!(l["upstream_ms"].is_null(), "no backend answered: {l}");
        let g = get(&c, &format!("http://{}{path}", bin.addr)).await;
        assert!(is_uuid_v4(&response_id(&g, "x-request-id")), "{path}");
        log.line_for(path);
    }
    let raw = raw(
        bin.addr,
        b"GET /app/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nx-request-id: bad-host\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("x-request-id: bad-host\r\n"), "{raw}");
}

/// `request_id_header = ""`: nothing generated, an incoming header passes untouched like any
/// other, nothing added to the response, `request_id` null in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_request_id_header_turns_ids_off() {
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &logged(web.addr, "request_id_header = \"\""),
        Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    let c = client();
    let g = get(&c, &format!("http://{}/app/off", bin.addr)).await;
    assert_eq!(g.status, 200);
    assert!(g.headers.get("x-request-id").is_none(), "{:?}", g.headers);
    assert!(backend_saw(&web, "x-request-id").is_empty());
    assert!(log.line_for("/app/off")["request_id"].is_null());
    let g = send(
        &c,
        get_with(
            &format!("http://{}/app/off2", bin.addr),
            &[("x-request-id", b"a b")],
        ),
    )
    .await;
    assert!(g.headers.get("x-request-id").is_none());
    assert_eq!(backend_saw(&web, "x-request-id"), [b"a b"]);
    assert!(log.line_for("/app/off2")["request_id"].is_null());
}

/// Another header name (any case in the file): used instead of x-request-id, which then
/// passes through as an ordinary header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_header_name_is_configurable() {
    let web = start_backend("web").await;
    let mut bin = start_binary(
        &logged(web.addr, "request_id_header = \"X-Correlation-ID\""),
        Stdio::piped(),
    );
    let log = AccessLog::of(&mut bin);
    let c = client();
    let g = send(
        &c,
        get_with(
            &format!("http://{}/app/named", bin.addr),
            &[
                ("x-request-id", b"untouched"),
                ("x-correlation-id", b"corr-7"),
            ],
        ),
    )
    .await;
    assert_eq!(response_id(&g, "x-correlation-id"), "corr-7");
    assert!(g.headers.get("x-request-id").is_none());
    assert_eq!(backend_saw(&web, "x-correlation-id"), [b"corr-7"]);
    assert_eq!(backend_saw(&web, "x-request-id"), [b"untouched"]);
    assert_eq!(log.line_for("/app/named")["request_id"], "corr-7");
    let g = get(&c, &format!("http://{}/app/named2", bin.addr)).await;
    let id = response_id(&g, "x-correlation-id");
    assert!(is_uuid_v4(&id));
    assert_eq!(log.line_for("/app/named2")["request_id"], id.as_str());
}

/// A header the balancer owns or strips cannot be the request ID header.
#[test]
fn request_id_header_must_be_a_header_the_balancer_leaves_alone() {
    let base =
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    for bad in [
        "connection",
        "Host",
        "x-forwarded-for",
        "bad header",
        "traceparent",
    ] {
        let text = format!("[log]\nrequest_id_header = \"{bad}\"\n{base}");
        let e = balancer::Config::parse(&text, "f.toml", None)
            .expect_err(bad)
            .to_string();
        assert!(
            e.contains("log.request_id_header") && e.contains("f.toml:2:"),
            "{bad}: {e}"
        );
    }
    let c = balancer::Config::parse(base, "f.toml", None).unwrap();
    assert_eq!(
        c.log.request_id_header.as_ref().map(|h| h.as_str()),
        Some("x-request-id")
    );
    assert_eq!(c.log.access_file, None);
    let text = format!("[log]\nrequest_id_header = \"\"\naccess_file = \"logs/a.log\"\n{base}");
    let c = balancer::Config::parse(&text, "f.toml", Some(Path::new("/etc/b"))).unwrap();
    assert_eq!(c.log.request_id_header, None);
    assert_eq!(c.log.access_file, Some(PathBuf::from("/etc/b/logs/a.log")));
    let text = format!("[log]\naccess_file = \"\"\n{base}");
    let c = balancer::Config::parse(&text, "f.toml", None).unwrap();
    assert_eq!(c.log.access_file, None, "\"\" is stdout");
}

/// A valid traceparent reaches the backend byte for byte and its trace id is logged; an
/// invalid one is forwarded just the same and logged as null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_passes_untouched_and_its_trace_id_is_logged() {
    let web = start_backend("web").await;
    let mut bin = start_binary(&logged(web.addr, ""), Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let c = client();
    let g = send(
        &c,
        get_with(
            &format!("http://{}/app/traced", bin.addr),
            &[
                ("traceparent", TRACEPARENT.as_bytes()),
                ("tracestate", b"k=v"),
            ],
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(backend_saw(&web, "traceparent"), [TRACEPARENT.as_bytes()]);
    assert_eq!(backend_saw(&web, "tracestate"), [b"k=v"]);
    let l = log.line_for("/app/traced");
    assert_eq!(l["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{l}");
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    send(
        &c,
        get_with(
            &format!("http://{}/app/badtrace", bin.addr),
            &[("traceparent", bad.as_bytes())],
        ),
    )
    .await;
    assert_eq!(backend_saw(&web, "traceparent"), [bad.as_bytes()]);
    assert!(log.line_for("/app/badtrace")["trace_id"].is_null());
    get(&c, &format!("http://{}/app/untraced", bin.addr)).await;
    assert!(log.line_for("/app/untraced")["trace_id"].is_null());
}

/// host, user_agent, upstream_ms (the backend's time to headers; null for a 404),
/// bytes_received (a POST's body), tls null on plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_fields_have_the_right_values() {
    let web = start_backend("web").await;
    let mut bin = start_binary(&logged(web.addr, ""), Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let c = client();
    web.set_delay(Duration::from_millis(150));
    let g = send(
        &c,
        get_with(
            &format!("http://{}/app/slow", bin.addr),
            &[
                ("user-agent", b"probe/1.0 \"quoted\""),
                ("host", b"shop.example:8080"),
            ],
        ),
    )
    .await;
    assert_eq!(g.status, 200);
    let l = log.line_for("/app/slow");
    assert_eq!(l["host"], "shop.example:8080", "{l}");
    assert_eq!(l["user_agent"], "probe/1.0 \"quoted\"", "{l}");
    let up = l["upstream_ms"]
        .as_f64()
        .expect("upstream_ms for a proxied request");
    assert!(up >= 150.0, "{l}");
    assert!(up <= l["duration_ms"].as_f64().unwrap(), "{l}");
    assert!(l["tls"].is_null(), "{l}");
    assert_eq!(l["bytes_received"], 0);
    web.set_delay(Duration::ZERO);

    let body = vec![b'z'; 100_000];
    let g = post(&c, &format!("http://{}/echo/up", bin.addr), body.clone()).await;
    assert_eq!(g.body.len(), body.len());
    let l = log.line_for("/echo/up");
    assert_eq!(l["bytes_received"], 100_000, "{l}");
    assert!(l["user_agent"].is_null(), "no User-Agent sent: {l}");

    get(&c, &format!("http://{}/nothing/here", bin.addr)).await;
    let l = log.line_for("/nothing/here");
    assert_eq!(l["status"], 404);
    assert!(l["upstream_ms"].is_null(), "{l}");
    assert_eq!(l["host"], bin.addr.to_string());
}

// ------------------------------------------------------------------------------------------
// TLS

/// A CA and a leaf for `a.test` and 127.0.0.1: (CA PEM, cert path, key path).
fn tls_files(dir: &Path) -> (String, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let leaf = CertificateParams::new(vec!["a.test".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let (c, k) = (dir.join("a.pem"), dir.join("a.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (ca_pem, c, k)
}

async fn tls_get(addr: SocketAddr, ca_pem: &str, name: &str, path: &str, tls13: bool) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let version = if tls13 {
        &rustls::version::TLS13
    } else {
        &rustls::version::TLS12
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", name)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// On a TLS listener, `tls` is the negotiated version and the SNI the client sent (null when
/// it sent none: a connection by IP address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_field_has_version_and_sni() {
    let web = start_backend("web").await;
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(certs.path());
    let tmpl = format!(
        "watch = false\nshutdown_grace = \"2s\"\n[admin]\nbind = \"{{admin}}\"\n\
         [log]\naccess = true\nlevel = \"warn\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
         [pools.web]\nbackends = [\"{}\"]\n",
        cert.display(),
        key.display(),
        web.addr
    );
    let mut bin = start_binary(&tmpl, Stdio::piped());
    let log = AccessLog::of(&mut bin);
    assert_eq!(tls_get(bin.addr, &ca, "a.test", "/sni13", true).await, 200);
    let l = log.line_for("/sni13");
    assert_eq!(l["tls"]["version"], "TLSv1.3", "{l}");
    assert_eq!(l["tls"]["sni"], "a.test", "{l}");
    assert_eq!(l["host"], "a.test");
    assert_eq!(tls_get(bin.addr, &ca, "a.test", "/sni12", false).await, 200);
    assert_eq!(log.line_for("/sni12")["tls"]["version"], "TLSv1.2");
    assert_eq!(
        tls_get(bin.addr, &ca, "127.0.0.1", "/nosni", true).await,
        200
    );
    let l = log.line_for("/nosni");
    assert!(l["tls"].is_object() && l["tls"]["sni"].is_null(), "{l}");
}

// ------------------------------------------------------------------------------------------
// access_file

/// The JSON lines of `path` (none if it does not exist).
fn file_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

async fn wait_for_line(path: &Path, req_path: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = file_lines(path).into_iter().find(|l| l["path"] == req_path) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no line for {req_path} in {}: {:?}",
            path.display(),
            std::fs::read_to_string(path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `access_file` (relative to the config file) gets the lines, stdout none; logrotate's
/// rename + SIGUSR1 makes the balancer write a new file at the path while the renamed one gets
/// nothing more; a reload that changes access_file moves the lines to the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_file_is_written_reopened_on_sigusr1_and_moved_by_reload() {
    let web = start_backend("web").await;
    let tmpl = logged(web.addr, "access_file = \"access.log\"");
    let mut bin = start_binary(&tmpl, Stdio::piped());
    let stdout = AccessLog::of(&mut bin);
    let dir = bin.dir.path().to_path_buf();
    let current = dir.join("access.log");
    assert!(current.exists(), "opened (created) at start");
    let c = client();
    get(&c, &format!("http://{}/app/before", bin.addr)).await;
    wait_for_line(&current, "/app/before").await;

    let rotated = dir.join("access.log.1");
    std::fs::rename(&current, &rotated).unwrap();
    bin.signal("USR1");
    assert!(
        eventually(Duration::from_secs(10), || current.exists()).await,
        "SIGUSR1 did not reopen the path"
    );
    get(&c, &format!("http://{}/app/after", bin.addr)).await;
    wait_for_line(&current, "/app/after").await;
    let old: Vec<_> = file_lines(&rotated);
    assert_eq!(old.len(), 1, "the renamed file got more lines: {old:?}");
    assert_eq!(old[0]["path"], "/app/before");
    assert_eq!(
        bin.wait_exit(Duration::from_millis(10)),
        None,
        "SIGUSR1 never kills"
    );

    write_binary_config(&bin, &logged(web.addr, "access_file = \"other.log\""));
    bin.signal("HUP");
    let other = dir.join("other.log");
    assert!(
        eventually(Duration::from_secs(10), || other.exists()).await,
        "the reload did not open other.log"
    );
    get(&c, &format!("http://{}/app/moved", bin.addr)).await;
    wait_for_line(&other, "/app/moved").await;
    assert!(file_lines(&current)
        .iter()
        .all(|l| l["path"] != "/app/moved"));

    // Back to stdout.
    write_binary_config(&bin, &logged(web.addr, "access_file = \"\""));
    bin.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    // A new path per try: a request answered before the reload took effect lands in
    // other.log, and must not make every later try look the same.
    for n in 0u32.. {
        let path = format!("/app/stdout{n}");
        get(&c, &format!("http://{}{path}", bin.addr)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if file_lines(&other)
            .iter()
            .all(|l| l["path"] != path.as_str())
        {
            assert_eq!(stdout.line_for(&path)["path"], path.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "lines never went back to stdout");
    }
}

/// An access_file in a directory that does not exist stops the start with the key named.
#[test]
fn unwritable_access_file_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.toml");
    std::fs::write(
        &cfg,
        format!(
            "[log]\naccess_file = \"no/such/dir/a.log\"\n[[listeners]]\nbind = \"{}\"\n\
             [pools.web]\nbackends = [\"127.0.0.1:9\"]\n",
            free_port()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log.access_file"), "{err}");
}

// ------------------------------------------------------------------------------------------
// RUST_LOG=debug

/// With RUST_LOG=debug, every request's decisions are on stderr with its request ID: the
/// route (and pool), the backend picked, and a retry with the reason; health lines about a
/// backend name its pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_log_shows_route_pick_and_retry() {
    let web = start_backend("web").await;
    let dead = free_port();
    let tmpl = format!(
        "watch = false\nshutdown_grace = \"2s\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n\
         [pools.web]\nbackends = [\"{dead}\", \"{}\"]\n\
         [pools.web.retries]\nattempts = 2\n\
         [pools.checked]\nbackends = [\"{dead}\"]\n\
         [pools.checked.health_check]\ninterval = \"100ms\"\nunhealthy_threshold = 1\n",
        web.addr
    );
    let (bin, err) = start_binary_with(&tmpl, |c| {
        c.env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
    });
    let c = client();
    // Round robin over [dead, live]: two requests, one of them tries the dead one first.
    for i in 0..2 {
        let id = format!("dbg-{i}");
        let g = send(
            &c,
            get_with(
                &format!("http://{}/x{i}", bin.addr),
                &[("x-request-id", id.as_bytes())],
            ),
        )
        .await;
        assert_eq!(g.status, 200, "{}", err.text());
    }
    let ok = eventually(Duration::from_secs(10), || {
        (0..2).all(|i| {
            let id = format!("dbg-{i}");
            !err.lines_with(&["route matched", &id, "pool=web"])
                .is_empty()
                && !err.lines_with(&["backend picked", &id]).is_empty()
        }) && !err
            .lines_with(&["retry", "connect_refused", &dead.to_string(), "pool=web"])
            .is_empty()
            && !err
                .lines_with(&["backend is unhealthy", "pool=checked"])
                .is_empty()
    })
    .await;
    assert!(ok, "missing debug lines:\n{}", err.text());
    let retry = err.lines_with(&["retry", "connect_refused"]);
    assert!(
        retry
            .iter()
            .any(|l| l.contains("dbg-0") || l.contains("dbg-1")),
        "{retry:?}"
    );
}
