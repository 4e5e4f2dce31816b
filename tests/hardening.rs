//! Hostile clients against the real balancer: request smuggling and malformed framing over raw
//! TCP, header/target abuse, slow and stalled clients, many idle connections, a bounded
//! randomized (seeded) mutation test, and HTTP/2 stream floods.
//!
//! Every raw case must be answered with a 4xx or a closed connection, and must never reach a
//! backend as anything but one well-formed request; a normal request works after each. The
//! recording backend below checks what it receives (method, target, header bytes, framing) and
//! counts every request, so a smuggled or malformed request cannot pass unnoticed.

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ------------------------------------------------------------------------------------------
// A backend that records and checks every request it receives

#[derive(Clone, Debug)]
struct Rec {
    method: String,
    uri: String,
    host: String,
    body_len: usize,
    body_ok: bool,
}

#[derive(Default)]
struct RecState {
    requests: AtomicU64,
    /// Up to the first 10,000 requests.
    log: Mutex<Vec<Rec>>,
    /// Requests that were not well-formed, with why.
    violations: Mutex<Vec<String>>,
    /// Connections that ended with a parse error on the backend side: malformed bytes sent.
    parse_errors: AtomicU64,
    /// Handlers running now (a request whose body is still being read counts).
    active: AtomicU64,
}

struct RecBackend {
    addr: SocketAddr,
    st: Arc<RecState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecBackend {
    fn requests(&self) -> u64 {
        self.st.requests.load(SeqCst)
    }
    fn log(&self) -> Vec<Rec> {
        self.st.log.lock().unwrap().clone()
    }
    fn assert_clean(&self) {
        let v = self.st.violations.lock().unwrap();
        assert!(
            v.is_empty(),
            "the backend received malformed requests: {v:#?}"
        );
        assert_eq!(
            self.st.parse_errors.load(SeqCst),
            0,
            "the backend failed to parse what it was sent"
        );
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a backend may receive from a correct proxy: one HTTP/1.1 request, in origin form (or
/// `*`), with token method, clean header bytes, exactly one Host, unambiguous framing.
fn check_well_formed(req: &Request<hyper::body::Incoming>) -> Result<(), String> {
    let m = req.method().as_str();
    if m.is_empty() || !m.bytes().all(is_tchar) {
        return Err(format!("method {m:?} is not a token"));
    }
    let uri = req.uri().to_string();
    if !(uri.starts_with('/') || uri == "*") {
        return Err(format!("target {uri:?} is not origin-form"));
    }
    if uri.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("target {uri:?} holds control bytes or spaces"));
    }
    if req.version() != http::Version::HTTP_11 {
        return Err(format!("version {:?}", req.version()));
    }
    let h = req.headers();
    for (n, v) in h {
        if v.as_bytes()
            .iter()
            .any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
        {
            return Err(format!("header {n}: {v:?} holds control bytes"));
        }
    }
    if h.get_all(http::header::HOST).iter().count() != 1 {
        return Err(format!(
            "{} Host headers",
            h.get_all(http::header::HOST).iter().count()
        ));
    }
    let cl = h.get_all(http::header::CONTENT_LENGTH).iter().count();
    let te = h.get_all(http::header::TRANSFER_ENCODING).iter().count();
    if cl > 1 || (cl > 0 && te > 0) {
        return Err(format!(
            "ambiguous framing: {cl} Content-Length, {te} Transfer-Encoding"
        ));
    }
    if let Some(te) = h.get(http::header::TRANSFER_ENCODING) {
        if te != "chunked" {
            return Err(format!("Transfer-Encoding {te:?}"));
        }
    }
    for hop in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "http2-settings",
        "proxy-authorization",
    ] {
        if h.contains_key(hop) {
            return Err(format!("hop-by-hop header {hop} forwarded"));
        }
    }
    if !h.contains_key("x-forwarded-for") {
        return Err("no X-Forwarded-For".into());
    }
    Ok(())
}

async fn start_rec_backend() -> RecBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let st = Arc::new(RecState::default());
    let st2 = Arc::clone(&st);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let st = Arc::clone(&st2);
            tokio::spawn(async move {
                let st3 = Arc::clone(&st);
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let st = Arc::clone(&st3);
                    async move {
                        st.active.fetch_add(1, SeqCst);
                        struct Done(Arc<RecState>);
                        impl Drop for Done {
                            fn drop(&mut self) {
                                self.0.active.fetch_sub(1, SeqCst);
                            }
                        }
                        let _done = Done(Arc::clone(&st));
                        st.requests.fetch_add(1, SeqCst);
                        if let Err(why) = check_well_formed(&req) {
                            st.violations.lock().unwrap().push(format!(
                                "{why} in {} {}",
                                req.method(),
                                req.uri()
                            ));
                        }
                        let method = req.method().to_string();
                        let uri = req.uri().to_string();
                        let host = req
                            .headers()
                            .get("host")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .unwrap_or_default();
                        let declared: Option<usize> = req
                            .headers()
                            .get("content-length")
                            .and_then(|v| v.to_str().ok()?.parse().ok());
                        let body = tokio::time::timeout(
                            Duration::from_secs(30),
                            req.into_body().collect(),
                        )
                        .await;
                        let (body_len, body_ok) = match body {
                            Ok(Ok(b)) => (b.to_bytes().len(), true),
                            _ => (0, false),
                        };
                        if body_ok {
                            if let Some(d) = declared {
                                if d != body_len {
                                    st.violations.lock().unwrap().push(format!("Content-Length {d} but {body_len} body bytes in {method} {uri}"));
                                }
                            }
                        }
                        {
                            let mut log = st.log.lock().unwrap();
                            if log.len() < 10_000 {
                                log.push(Rec {
                                    method,
                                    uri: uri.clone(),
                                    host,
                                    body_len,
                                    body_ok,
                                });
                            }
                        }
                        let mut r = Response::new(full("ok"));
                        r.headers_mut().insert(
                            "x-uri",
                            http::HeaderValue::from_str(&uri)
                                .unwrap_or(http::HeaderValue::from_static("?")),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let r = hyper::server::conn::http1::Builder::new()
                    .max_headers(300)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                if let Err(e) = r {
                    if e.is_parse() || e.is_parse_status() {
                        st.parse_errors.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    RecBackend { addr, st, task }
}

// ------------------------------------------------------------------------------------------
// Raw exchanges

struct Raw {
    text: String,
    closed: bool,
    elapsed: Duration,
}

impl Raw {
    fn statuses(&self) -> Vec<u16> {
        self.text
            .split("\r\n")
            .filter(|l| l.starts_with("HTTP/1.1 ") || l.starts_with("HTTP/1.0 "))
            .filter_map(|l| l.get(9..12)?.parse().ok())
            .collect()
    }
    fn summary(&self) -> String {
        let s = self.statuses();
        format!(
            "{} {} in {:?}",
            if s.is_empty() {
                "no response".to_owned()
            } else {
                format!("{s:?}")
            },
            if self.closed {
                "then closed"
            } else {
                "still open"
            },
            self.elapsed
        )
    }
}

/// Sends `bytes` (then half-closes if `fin`), reads until the peer closes or `limit` passes.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], fin: bool, limit: Duration) -> Raw {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let _ = s.write_all(bytes).await;
    if fin {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + limit;
    let closed = loop {
        // Once every byte received belongs to complete responses, wait only a moment more
        // for a close (or another response).
        let until = if complete_responses(&out) {
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(500))
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > 1 << 20 {
                    break false;
                }
            }
        }
    };
    Raw {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
        elapsed: start.elapsed(),
    }
}

/// Whether `buf` is one or more complete HTTP/1.x responses and nothing else.
fn complete_responses(mut buf: &[u8]) -> bool {
    let mut any = false;
    while !buf.is_empty() {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut rest = &buf[end + 4..];
        let cl = head.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        if (100..200).contains(&status) || status == 204 || status == 304 {
        } else if let Some(cl) = cl {
            if rest.len() < cl {
                return false;
            }
            rest = &rest[cl..];
        } else if head.contains("transfer-encoding: chunked") {
            let Some(e) = rest.windows(5).position(|w| w == b"0\r\n\r\n") else {
                return false;
            };
            rest = &rest[e + 5..];
        } else {
            return false;
        }
        any = true;
        buf = rest;
    }
    any
}

fn hard_config(backends: &[SocketAddr], extra: &str) -> String {
    config(
        backends,
        "round_robin",
        &format!("[limits]\nheader_timeout = \"1s\"\n{extra}"),
    )
}

async fn assert_normal_request_works(bal: &Balancer, why: &str) {
    let g = tokio::time::timeout(Duration::from_secs(10), get(&client(), &bal.url("/normal")))
        .await
        .unwrap_or_else(|_| panic!("normal request after {why} timed out"));
    assert_eq!(g.status, 200, "normal request after {why}: {}", g.body);
}

// ------------------------------------------------------------------------------------------
// Framing, headers, targets

/// What a case may lead to, besides a 4xx answer or a closed connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum May {
    /// Only a 4xx (or a close); the backend sees nothing.
    Reject,
    /// Exactly this status; the backend sees nothing.
    Exactly(u16),
    /// Also acceptable: forwarded once (a lenient but unambiguous parse).
    ForwardOnce,
    /// A malformed body behind a valid head: 400 (or a close), and if the streamed head reached
    /// the backend, its body never completed.
    BodyRejected,
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: h.test\r\n\r\n";

fn smuggle_body() -> String {
    format!("0\r\n\r\n{SMUGGLED}")
}

/// CL and TE together, with `te_line` the (possibly obfuscated) Transfer-Encoding line.
fn cl_te(te_line: &str) -> Vec<u8> {
    let body = smuggle_body();
    format!(
        "POST /cl-te HTTP/1.1\r\nHost: h.test\r\nContent-Length: {}\r\n{te_line}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn cases() -> Vec<(&'static str, Vec<u8>, May)> {
    use May::*;
    let mut v: Vec<(&'static str, Vec<u8>, May)> = vec![
        ("CL then TE (smuggling probe)", cl_te("Transfer-Encoding: chunked"), Exactly(400)),
        ("TE then CL (smuggling probe)", {
            let body = smuggle_body();
            format!("POST /te-cl HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
        }, Exactly(400)),
        ("CL + TE with a tab before chunked", cl_te("Transfer-Encoding:\tchunked"), Exactly(400)),
        ("CL + TE in odd case", cl_te("tRANSFER-eNCODING: ChUnKeD"), Exactly(400)),
        ("CL + TE with a vertical tab", cl_te("Transfer-Encoding: \x0bchunked"), Reject),
        ("CL + TE: xchunked", cl_te("Transfer-Encoding: xchunked"), Reject),
        ("CL + TE: chunked, identity", cl_te("Transfer-Encoding: chunked, identity"), Reject),
        ("TE: chunked, identity", b"POST / HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec(), Reject),
        ("TE: identity", b"POST / HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: identity\r\n\r\n".to_vec(), Reject),
        ("TE twice: chunked then identity", b"POST / HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n".to_vec(), Reject),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), Reject),
        ("space before colon: Transfer-Encoding : chunked", {
            let body = smuggle_body();
            format!("POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: {}\r\nTransfer-Encoding : chunked\r\n\r\n{body}", body.len()).into_bytes()
        }, Reject),
        ("differing duplicate Content-Length", b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(), Exactly(400)),
        ("Content-Length list with differing values", b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(), Exactly(400)),
        ("Content-Length with a sign", b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: +5\r\n\r\nhello".to_vec(), Exactly(400)),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: -1\r\n\r\n".to_vec(), Exactly(400)),
        ("Content-Length overflow", b"POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(), Exactly(400)),
        ("obs-fold continuation line", b"GET / HTTP/1.1\r\nHost: h.test\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(), Exactly(400)),
        ("obs-fold of Transfer-Encoding", {
            let body = smuggle_body();
            format!("POST / HTTP/1.1\r\nHost: h.test\r\nContent-Length: {}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n{body}", body.len()).into_bytes()
        }, Reject),
        ("bare LF line endings", b"GET /bare-lf HTTP/1.1\nHost: h.test\n\n".to_vec(), ForwardOnce),
        ("bare CR line endings", b"GET /bare-cr HTTP/1.1\rHost: h.test\r\r".to_vec(), Reject),
        ("oversized chunk size", b"POST /chunk HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n".to_vec(), BodyRejected),
        ("chunk size with 0x prefix", b"POST /chunk HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".to_vec(), BodyRejected),
        ("negative chunk size", b"POST /chunk HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".to_vec(), BodyRejected),
        ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: h.test\r\nX-A: a\x00b\r\n\r\n".to_vec(), Exactly(400)),
        ("0x01 in a header value", b"GET / HTTP/1.1\r\nHost: h.test\r\nX-A: a\x01b\r\n\r\n".to_vec(), Exactly(400)),
        ("DEL in a header value", b"GET / HTTP/1.1\r\nHost: h.test\r\nX-A: a\x7fb\r\n\r\n".to_vec(), Exactly(400)),
        ("NUL in a header name", b"GET / HTTP/1.1\r\nHost: h.test\r\nX\x00A: b\r\n\r\n".to_vec(), Exactly(400)),
        ("0x01 in a header name", b"GET / HTTP/1.1\r\nHost: h.test\r\nX\x01A: b\r\n\r\n".to_vec(), Exactly(400)),
        ("space in a header name", b"GET / HTTP/1.1\r\nHost: h.test\r\nX A: b\r\n\r\n".to_vec(), Exactly(400)),
        ("empty header name", b"GET / HTTP/1.1\r\nHost: h.test\r\n: b\r\n\r\n".to_vec(), Exactly(400)),
        ("NUL in Host", b"GET / HTTP/1.1\r\nHost: h.te\x00st\r\n\r\n".to_vec(), Exactly(400)),
        ("two differing Host headers", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n".to_vec(), Exactly(400)),
        ("two equal Host headers", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n".to_vec(), Exactly(400)),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n".to_vec(), Exactly(400)),
        ("empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n".to_vec(), Exactly(400)),
        ("Host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(), Exactly(400)),
        ("CONNECT", b"CONNECT h.test:443 HTTP/1.1\r\nHost: h.test:443\r\n\r\n".to_vec(), Exactly(405)),
        ("CONNECT with a tunnelled request behind it", b"CONNECT h.test:443 HTTP/1.1\r\nHost: h.test:443\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Reject),
        ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Exactly(400)),
        ("0x01 in the target", b"GET /a\x01b HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Exactly(400)),
        ("DEL in the target", b"GET /a\x7fb HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Exactly(400)),
        ("tab in the target", b"GET /a\tb HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Exactly(400)),
        ("space in the target", b"GET /a b HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Reject),
        ("non-ASCII in the target", b"GET /\xff\xfe HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Reject),
        ("CR in the target", b"GET /a\rb HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Reject),
        ("invalid method token", b"G@T / HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(), Exactly(400)),
        ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: h.test\r\n\r\n".to_vec(), Reject),
        ("HTTP/0.9 request line", b"GET /\r\n\r\n".to_vec(), Reject),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(), Reject),
        ("h2 preface then garbage", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(), Reject),
    ];
    // Header count over 100 -> 431.
    let mut many = b"GET / HTTP/1.1\r\nHost: h.test\r\n".to_vec();
    for i in 0..120 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    v.push(("120 header fields", many, Exactly(431)));
    // Over max_header_bytes (64 KiB) -> 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    v.push(("a 70 KB header", big.into_bytes(), Exactly(431)));
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: h.test\r\n\r\n",
        "a".repeat(70_000)
    );
    v.push(("a 70 KB target", long_target.into_bytes(), Reject));
    v
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_never_reach_a_backend() {
    let backend = start_rec_backend().await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    assert_normal_request_works(&bal, "start").await;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (name, bytes, may) in cases() {
        let before = backend.requests();
        let r = raw_exchange(bal.addr, &bytes, false, Duration::from_secs(4)).await;
        // Let anything the balancer forwards arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let forwarded = backend.requests() - before;
        let new: Vec<Rec> = backend.log().into_iter().skip(before as usize).collect();
        let statuses = r.statuses();
        let line = format!(
            "{name}: {} ; forwarded {forwarded} {:?}",
            r.summary(),
            new.iter()
                .map(|x| format!(
                    "{} {} body={}{}",
                    x.method,
                    x.uri,
                    x.body_len,
                    if x.body_ok { "" } else { " (aborted)" }
                ))
                .collect::<Vec<_>>()
        );
        println!("{line}");
        report.push(line.clone());
        // Real 4xx codes only: nginx's 499 is for logs, never for a client still listening.
        let all_4xx = statuses.iter().all(|s| (400..=451).contains(s));
        let ok = if new.iter().any(|x| x.uri.contains("smuggled")) {
            false
        } else {
            match may {
                May::Exactly(code) => forwarded == 0 && statuses == [code],
                May::Reject => {
                    forwarded == 0
                        && all_4xx
                        && statuses.len() <= 1
                        && (r.closed || !statuses.is_empty())
                }
                May::BodyRejected => {
                    forwarded <= 1
                        && new.iter().all(|x| !x.body_ok)
                        && r.closed
                        && (statuses.is_empty() || statuses == [400])
                }
                May::ForwardOnce => {
                    (forwarded == 0 && all_4xx && statuses.len() <= 1)
                        || (forwarded == 1 && statuses.len() == 1)
                }
            }
        };
        if !ok {
            failures.push(format!(
                "{line}\n    expected {may:?}; response: {:?}",
                r.text.chars().take(300).collect::<String>()
            ));
        }
        assert_normal_request_works(&bal, name).await;
    }
    backend.assert_clean();
    assert!(
        failures.is_empty(),
        "cases with unexpected results:\n{}",
        failures.join("\n")
    );
    let st = status(&bal).await;
    let b = status_backend(&st, "web", backend.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let st = status(&bal).await;
            status_backend(&st, "web", backend.addr).unwrap()["in_flight"] == 0
        })
        .await,
        "{b}"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn request_without_host_still_reaches_the_backend_with_one() {
    // HTTP/1.0 allows a request without Host; upstream is HTTP/1.1, where it is mandatory.
    let backend = start_rec_backend().await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    let r = raw_exchange(
        bal.addr,
        b"GET /old HTTP/1.0\r\n\r\n",
        false,
        Duration::from_secs(4),
    )
    .await;
    println!("HTTP/1.0 without Host: {}", r.summary());
    assert_eq!(r.statuses(), [200], "{}", r.text);
    let rec = backend.log();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        rec[0].host,
        backend.addr.to_string(),
        "Host upstream must be the backend's address"
    );
    backend.assert_clean();
    bal.shutdown().await;
}

#[tokio::test]
async fn client_half_closing_mid_body_gets_a_standard_400() {
    let backend = start_rec_backend().await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    for req in [
        &b"POST /short HTTP/1.1\r\nHost: h.test\r\nContent-Length: 20\r\n\r\nonly ten!!"[..],
        b"POST /short HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ] {
        let r = raw_exchange(bal.addr, req, true, Duration::from_secs(4)).await;
        println!("half-closed mid-body: {}", r.summary());
        // nginx's 499 belongs in the access log, not on the wire.
        assert!(
            r.statuses().is_empty() || r.statuses() == [400],
            "{}",
            r.text
        );
        assert!(r.closed);
    }
    assert!(
        backend.log().iter().all(|x| !x.body_ok),
        "an incomplete body must not arrive complete"
    );
    let st = status(&bal).await;
    assert_eq!(
        status_backend(&st, "web", backend.addr).unwrap()["failures"],
        0
    );
    assert_normal_request_works(&bal, "half-closed bodies").await;
    backend.assert_clean();
    bal.shutdown().await;
}

#[tokio::test]
async fn absolute_form_authority_wins_over_host() {
    let a = start_rec_backend().await;
    let b = start_rec_backend().await;
    let cfg = format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [limits]\nheader_timeout = \"1s\"\n[[listeners]]\nbind = \"{{listen}}\"\n\
         [pools.a]\nbackends = [\"{}\"]\n[pools.b]\nbackends = [\"{}\"]\n\
         [[routes]]\nhost = \"a.example\"\npool = \"a\"\n[[routes]]\nhost = \"b.example\"\npool = \"b\"\n",
        a.addr, b.addr
    );
    let bal = start_balancer(&cfg).await;
    for (req, path) in [
        (
            "GET http://b.example/x?q=1 HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "/x?q=1",
        ),
        (
            "GET http://b.example:8080/y HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "/y",
        ),
        (
            "GET http://B.EXAMPLE/z HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "/z",
        ),
    ] {
        let before = b.requests();
        let r = raw_exchange(bal.addr, req.as_bytes(), false, Duration::from_secs(4)).await;
        println!("absolute-form {req:?}: {}", r.summary());
        assert_eq!(r.statuses(), [200], "{req:?}: {}", r.text);
        assert_eq!(
            b.requests(),
            before + 1,
            "{req:?} must go to the b.example route"
        );
        let last = b.log().last().cloned().unwrap();
        assert_eq!(last.uri, path, "the backend gets origin-form");
        assert!(
            last.host.to_ascii_lowercase().starts_with("b.example"),
            "forwarded Host must follow the target: {last:?}"
        );
    }
    assert_eq!(
        a.requests(),
        0,
        "the Host header must not win over the absolute-form authority"
    );
    // Userinfo in the authority must not route by its user part.
    let r = raw_exchange(
        bal.addr,
        b"GET http://a.example@b.example/u HTTP/1.1\r\nHost: a.example\r\n\r\n",
        false,
        Duration::from_secs(4),
    )
    .await;
    println!(
        "absolute-form with userinfo: {} ; a={} b={}",
        r.summary(),
        a.requests(),
        b.requests()
    );
    assert_eq!(
        a.requests(),
        0,
        "userinfo a.example@ must not route to a.example"
    );
    // Origin-form uses Host as usual.
    let r = raw_exchange(
        bal.addr,
        b"GET /o HTTP/1.1\r\nHost: a.example\r\n\r\n",
        false,
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(r.statuses(), [200]);
    assert_eq!(a.requests(), 1);
    a.assert_clean();
    b.assert_clean();
    bal.shutdown().await;
}

#[tokio::test]
async fn dot_segments_cannot_escape_a_path_prefix_route() {
    let public = start_rec_backend().await;
    let admin = start_rec_backend().await;
    let cfg = format!(
        "watch = false\nshutdown_grace = \"5s\"\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [pools.public]\nbackends = [\"{}\"]\n[pools.internal]\nbackends = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/public\"\npool = \"public\"\n[[routes]]\npath_prefix = \"/admin\"\npool = \"internal\"\n",
        public.addr, admin.addr
    );
    let bal = start_balancer(&cfg).await;
    for target in [
        "/public/../admin",
        "/public/../admin/secret",
        "/public/./../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/%2e./admin",
        "/public/x/../../admin",
        "/public/../admin?x=/public",
        "http://h.test/public/../admin",
    ] {
        let before_pub = public.requests();
        let req = format!("GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n");
        let r = raw_exchange(bal.addr, req.as_bytes(), false, Duration::from_secs(4)).await;
        println!(
            "{target}: {} ; public={} internal={}",
            r.summary(),
            public.requests(),
            admin.requests()
        );
        assert_eq!(
            public.requests(),
            before_pub,
            "{target} reached the /public route"
        );
        let st = r.statuses();
        assert_eq!(st.len(), 1, "{target}: {}", r.text);
        if st[0] == 200 {
            let last = admin.log().last().cloned().unwrap();
            assert!(
                last.uri.starts_with("/admin"),
                "{target}: routed as /admin but the backend got {:?}",
                last.uri
            );
        } else {
            assert!((400..500).contains(&st[0]), "{target}: {}", r.text);
        }
    }
    // What stays inside /public is still served by it, normalised.
    for (target, want) in [
        ("/public/a/../b", "/public/b"),
        ("/public/./c", "/public/c"),
        ("/public//../d", "/public/d"),
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n");
        let r = raw_exchange(bal.addr, req.as_bytes(), false, Duration::from_secs(4)).await;
        assert_eq!(r.statuses(), [200], "{target}");
        assert_eq!(public.log().last().unwrap().uri, want, "{target}");
    }
    // Encoded slashes and dots that are not a whole segment are not dot segments: observed only.
    for target in [
        "/public/..%2fadmin",
        "/public/%2e%2e%2fadmin",
        "/public/..;/admin",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n");
        let r = raw_exchange(bal.addr, req.as_bytes(), false, Duration::from_secs(4)).await;
        println!(
            "(observed) {target}: {} ; public got {:?}",
            r.summary(),
            public.log().last().map(|x| x.uri.clone())
        );
    }
    public.assert_clean();
    admin.assert_clean();
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Slow and stalled clients

#[tokio::test]
async fn slowloris_headers_are_cut_off_after_header_timeout() {
    let backend = start_rec_backend().await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    let head = b"GET /slow HTTP/1.1\r\nHost: h.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let addr = bal.addr;
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = s.into_split();
            let writer = tokio::spawn(async move {
                for &b in head.iter() {
                    if wr.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            let mut out = Vec::new();
            let mut buf = [0u8; 1024];
            let closed = loop {
                match tokio::time::timeout(Duration::from_secs(12), rd.read(&mut buf)).await {
                    Err(_) => break false,
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                }
            };
            writer.abort();
            (
                closed,
                start.elapsed(),
                String::from_utf8_lossy(&out).into_owned(),
            )
        }));
    }
    for t in tasks {
        let (closed, elapsed, text) = t.await.unwrap();
        println!(
            "slowloris: closed={closed} after {elapsed:?}, answer {:?}",
            text.lines().next()
        );
        assert!(closed, "a slowloris connection was not cut off");
        assert!(
            elapsed < Duration::from_secs(5),
            "cut off too late: {elapsed:?}"
        );
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text:?}"
        );
    }
    assert_eq!(backend.requests(), 0);
    assert_normal_request_works(&bal, "slowloris").await;
    bal.shutdown().await;
}

#[tokio::test]
async fn slow_body_gets_408_or_close_and_frees_the_backend() {
    let backend = start_rec_backend().await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    let start = Instant::now();
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: h.test\r\nContent-Length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    // The head and the first bytes are forwarded; the backend waits for the rest.
    assert!(
        eventually(Duration::from_secs(5), || backend.st.active.load(SeqCst)
            == 1)
        .await
    );
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&out).into_owned();
    println!(
        "slow body: closed={closed} after {elapsed:?}, answer {:?}",
        text.lines().next()
    );
    assert!(closed, "a stalled body must end the connection: {text:?}");
    assert!(elapsed < Duration::from_secs(6), "{elapsed:?}");
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text:?}"
    );
    // The backend's handler ends (its connection was dropped), and in_flight returns to 0.
    assert!(
        eventually(Duration::from_secs(5), || backend.st.active.load(SeqCst)
            == 0)
        .await,
        "backend still held"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let st = status(&bal).await;
            status_backend(&st, "web", backend.addr).unwrap()["in_flight"] == 0
        })
        .await
    );
    let rec = backend.log();
    assert_eq!(rec.len(), 1);
    assert!(
        !rec[0].body_ok,
        "the backend must not see a complete body: {rec:?}"
    );
    // A slow body is the client's fault, not the backend's.
    let st = status(&bal).await;
    assert_eq!(
        status_backend(&st, "web", backend.addr).unwrap()["failures"],
        0
    );
    assert_normal_request_works(&bal, "slow body").await;
    backend.assert_clean();
    bal.shutdown().await;
}

#[tokio::test]
async fn client_that_never_reads_is_disconnected_and_in_flight_returns_to_zero() {
    let backend = start_backend("big").await;
    let bal = start_balancer(&hard_config(&[backend.addr], "")).await;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&bal.addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(sock.into()).unwrap();
    s.write_all(b"GET /bytes/200000000 HTTP/1.1\r\nHost: h.test\r\n\r\n")
        .await
        .unwrap();
    let in_flight = || async {
        let st = status(&bal).await;
        status_backend(&st, "web", backend.addr).unwrap()["in_flight"]
            .as_u64()
            .unwrap()
    };
    assert!(wait_until(Duration::from_secs(5), || async { in_flight().await == 1 }).await);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || async { in_flight().await == 0 }).await,
        "a client that never reads must not hold its backend forever"
    );
    let held = started.elapsed();
    println!("never-reading client released after {held:?}");
    assert!(
        held >= Duration::from_millis(500),
        "released too early: {held:?}"
    );
    // Now read: whatever was buffered, then the end; far less than the 200 MB body.
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => total += n,
        }
    };
    println!("never-reading client then read {total} bytes before the close");
    assert!(ended, "the connection must have been closed");
    assert!(total < 100_000_000, "{total}");
    assert_normal_request_works(&bal, "never-reading client").await;
    bal.shutdown().await;
}

#[tokio::test]
async fn two_thousand_idle_connections_do_not_block_a_normal_request() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() {
        if soft < 8192 {
            let _ = rlimit::Resource::NOFILE.set(hard.min(65536), hard);
        }
    }
    let backend = start_rec_backend().await;
    let bal = start_balancer(&config(
        &[backend.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"60s\"\n",
    ))
    .await;
    let shared = bal.shared();
    let base = shared.open_connections.load(SeqCst);
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..20 {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.push(TcpStream::connect(bal.addr));
        }
        for c in batch {
            idle.push(c.await.unwrap());
        }
    }
    assert!(
        eventually(Duration::from_secs(20), || shared
            .open_connections
            .load(SeqCst)
            >= base + 2000)
        .await,
        "only {} connections accepted",
        shared.open_connections.load(SeqCst)
    );
    let start = Instant::now();
    assert_normal_request_works(&bal, "2000 idle connections").await;
    println!(
        "normal request with 2000 idle connections open took {:?}",
        start.elapsed()
    );
    // The oldest idle connection is still served.
    idle[0]
        .write_all(b"GET /first HTTP/1.1\r\nHost: h.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), idle[0].read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(idle);
    assert!(
        eventually(Duration::from_secs(20), || shared
            .open_connections
            .load(SeqCst)
            <= base + 1)
        .await
    );
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Randomized mutations

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

fn base_requests() -> Vec<Vec<u8>> {
    let body = "name=value&x=1";
    vec![
        b"GET / HTTP/1.1\r\nHost: h.test\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n".to_vec(),
        format!("POST /form HTTP/1.1\r\nHost: h.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes(),
        b"POST /chunked HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
        b"GET /a/b/../c?q=1&r=%20 HTTP/1.1\r\nHost: h.test:8080\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nCookie: a=b; c=d\r\n\r\n".to_vec(),
        b"GET /p1 HTTP/1.1\r\nHost: h.test\r\n\r\nGET /p2 HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(),
        b"HEAD /head HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(),
        b"DELETE /item/7 HTTP/1.1\r\nHost: h.test\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"GET http://h.test/abs HTTP/1.1\r\nHost: other.test\r\n\r\n".to_vec(),
        b"PUT /up HTTP/1.1\r\nHost: h.test\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: h.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec(),
        b"GET /h2c HTTP/1.1\r\nHost: h.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec(),
        b"GET / HTTP/1.0\r\nHost: h.test\r\n\r\n".to_vec(),
        b"OPTIONS * HTTP/1.1\r\nHost: h.test\r\n\r\n".to_vec(),
    ]
}

const INTERESTING: &[u8] = b"\x00\x01\x7f\xff\r\n \t:;,\"\\/.%?#@\x0b\x0c";

fn mutate(rng: &mut XorShift, mut v: Vec<u8>) -> Vec<u8> {
    let n = 1 + rng.below(4);
    for _ in 0..n {
        match rng.below(11) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(v.len() + 1);
                let b = if rng.chance(70) {
                    *rng.pick(INTERESTING)
                } else {
                    rng.next() as u8
                };
                v.insert(i, b);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            3 => {
                // Duplicate a header line.
                let text = v.clone();
                let lines: Vec<usize> = text
                    .windows(2)
                    .enumerate()
                    .filter(|(_, w)| w == b"\r\n")
                    .map(|(i, _)| i + 2)
                    .collect();
                if lines.len() >= 2 {
                    let k = rng.below(lines.len() - 1);
                    let (s, e) = (lines[k], lines[k + 1]);
                    let line = text[s..e].to_vec();
                    let at = lines[rng.below(lines.len())];
                    v.splice(at..at, line);
                }
            }
            4 => {
                let cl = *rng.pick(&[
                    "0",
                    "1",
                    "5",
                    "-1",
                    "+3",
                    "0x10",
                    "99999999999999999999",
                    "4, 4",
                    "4, 5",
                    " 7",
                    "1 1",
                    "",
                    "14",
                ]);
                insert_header(rng, &mut v, &format!("Content-Length: {cl}"));
            }
            5 => {
                let te = *rng.pick(&[
                    "chunked",
                    "identity",
                    "chunked, identity",
                    "gzip, chunked",
                    " chunked",
                    "CHUNKED",
                    "chunked\x0b",
                    "xchunked",
                    "chunked;q=1",
                    "",
                ]);
                let name = *rng.pick(&[
                    "Transfer-Encoding",
                    "transfer-encoding",
                    "Transfer-Encoding ",
                    "Transfer_Encoding",
                    " Transfer-Encoding",
                ]);
                insert_header(rng, &mut v, &format!("{name}: {te}"));
            }
            6 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            7 => {
                let i = rng.below(v.len() + 1);
                let k = 1 + rng.below(16);
                let junk: Vec<u8> = (0..k).map(|_| rng.next() as u8).collect();
                v.splice(i..i, junk);
            }
            8 => {
                let h = *rng.pick(&[
                    "Host: evil.test",
                    "Host: ",
                    "Connection: close",
                    "Connection: upgrade",
                    "Upgrade: websocket",
                    "Expect: 100-continue",
                    "X-Forwarded-For: 1.2.3.4",
                    "Content-Length: 3\r\nContent-Length: 4",
                ]);
                insert_header(rng, &mut v, h);
            }
            9 => {
                // Swap CRLF for bare LF or CR somewhere.
                if let Some(p) = v.windows(2).position(|w| w == b"\r\n") {
                    let mut positions = vec![p];
                    positions.extend(
                        v.windows(2)
                            .enumerate()
                            .filter(|(_, w)| w == b"\r\n")
                            .map(|(i, _)| i)
                            .take(8),
                    );
                    let at = *rng.pick(&positions);
                    if rng.chance(50) {
                        v.remove(at);
                    } else {
                        v.remove(at + 1);
                    }
                }
            }
            _ => {
                // Append a second request or a smuggled fragment.
                let tail = *rng.pick(&[
                    &b"GET /second HTTP/1.1\r\nHost: h.test\r\n\r\n"[..],
                    b"0\r\n\r\n",
                    b"\r\n",
                    b"GET /x HTTP/1.1\r\n",
                ]);
                v.extend_from_slice(tail);
            }
        }
    }
    v
}

fn insert_header(rng: &mut XorShift, v: &mut Vec<u8>, line: &str) {
    let ends: Vec<usize> = v
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w == b"\r\n")
        .map(|(i, _)| i + 2)
        .take(12)
        .collect();
    let at = if ends.is_empty() {
        v.len()
    } else {
        *rng.pick(&ends)
    };
    let mut l = line.as_bytes().to_vec();
    l.extend_from_slice(b"\r\n");
    v.splice(at..at, l);
}

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Panics on threads whose name starts with `fuzz-` are recorded (the fuzz runtime's workers,
/// where the balancer runs); the default hook still prints them.
fn install_panic_recorder() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name.starts_with("fuzz-") {
                PANICS.lock().unwrap().push(format!("{name}: {info}"));
            }
            prev(info);
        }));
    });
}

#[test]
fn randomized_mutations_never_crash_or_reach_a_backend_malformed() {
    install_panic_recorder();
    let seed: u64 = std::env::var("BALANCER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ba1a_0c3e_2026);
    let cases: usize = std::env::var("BALANCER_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!("fuzz seed {seed} (set BALANCER_FUZZ_SEED to replay), {cases} cases");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fuzz-worker")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let backend = start_rec_backend().await;
        let bal = start_balancer(&hard_config(&[backend.addr], "max_body_bytes = 100000\n")).await;
        let bases = base_requests();
        let mut rng = XorShift(seed | 1);
        let mut inputs = Vec::with_capacity(cases);
        for _ in 0..cases {
            let bytes = if rng.chance(8) {
                let k = 1 + rng.below(200);
                (0..k).map(|_| rng.next() as u8).collect()
            } else {
                let base = rng.pick(&bases).clone();
                mutate(&mut rng, base)
            };
            let fin = rng.chance(25);
            inputs.push((bytes, fin));
        }
        let start = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(48));
        let mut set = tokio::task::JoinSet::new();
        let mut statuses = std::collections::BTreeMap::<String, u64>::new();
        let mut seen = std::collections::BTreeSet::<u16>::new();
        for (i, (bytes, fin)) in inputs.into_iter().enumerate() {
            let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
            let addr = bal.addr;
            set.spawn(async move {
                let r = raw_exchange(addr, &bytes, fin, Duration::from_millis(2500)).await;
                drop(permit);
                if std::env::var("FUZZ_DEBUG").is_ok() && r.statuses().contains(&499) {
                    println!("499 for fin={fin} {:?}", String::from_utf8_lossy(&bytes));
                }
                let all = r.statuses();
                (
                    all.clone(),
                    r.statuses()
                        .first()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| {
                            if r.closed {
                                "closed".into()
                            } else {
                                "open".into()
                            }
                        }),
                )
            });
            while let Some(Ok((all, s))) = set.try_join_next() {
                *statuses.entry(s).or_default() += 1;
                seen.extend(all);
            }
            if i % 500 == 499 {
                assert_normal_request_works(&bal, &format!("{} fuzz cases", i + 1)).await;
            }
        }
        while let Some(r) = set.join_next().await {
            let (all, s) = r.expect("fuzz client task");
            *statuses.entry(s).or_default() += 1;
            seen.extend(all);
        }
        println!(
            "fuzz: {cases} cases in {:?}; first answers: {statuses:?}; backend got {} requests",
            start.elapsed(),
            backend.requests()
        );
        assert_normal_request_works(&bal, "the fuzz run").await;
        backend.assert_clean();
        // Only standard answers on the wire, and never a 5xx: the backend is healthy, so client
        // garbage must not turn into a gateway error (or count against the backend).
        let allowed = [
            100u16, 200, 400, 404, 405, 408, 413, 414, 417, 431, 501, 505,
        ];
        let odd: Vec<u16> = seen
            .iter()
            .copied()
            .filter(|s| !allowed.contains(s))
            .collect();
        assert!(
            odd.is_empty(),
            "unexpected statuses {odd:?} (all seen: {seen:?})"
        );
        let st = status(&bal).await;
        let b = status_backend(&st, "web", backend.addr).unwrap();
        assert_eq!(
            b["failures"], 0,
            "client garbage counted as backend failures: {b}"
        );
        assert_eq!(b["breaker"], "closed", "{b}");
        assert!(
            wait_until(Duration::from_secs(15), || async {
                let st = status(&bal).await;
                status_backend(&st, "web", backend.addr).unwrap()["in_flight"] == 0
            })
            .await,
            "in_flight did not return to 0 after the fuzz run"
        );
        bal.shutdown().await;
    });
    let p = PANICS.lock().unwrap();
    assert!(p.is_empty(), "the balancer panicked (seed {seed}): {p:#?}");
}

// ------------------------------------------------------------------------------------------
// HTTP/2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_h2c_streams_on_one_connection_spread_over_backends() {
    let a = start_backend("a").await;
    let b = start_backend("b").await;
    a.set_delay(Duration::from_millis(300));
    b.set_delay(Duration::from_millis(300));
    let bal = start_balancer(&config(&[a.addr, b.addr], "round_robin", "")).await;
    let tcp = TcpStream::connect(bal.addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let n = 200;
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut tx = tx.clone();
        let addr = bal.addr;
        set.spawn(async move {
            let req = Request::get(format!("http://{addr}/s/{i}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tx.send_request(req).await.unwrap();
            let st = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (st, String::from_utf8_lossy(&body).into_owned())
        });
    }
    let mut by = std::collections::HashMap::<String, u32>::new();
    while let Some(r) = set.join_next().await {
        let (st, body) = r.unwrap();
        assert_eq!(st, 200);
        *by.entry(body).or_default() += 1;
    }
    let took = start.elapsed();
    println!("{n} h2c streams on one connection in {took:?}: {by:?}");
    assert_eq!(by.values().sum::<u32>(), n);
    assert!(
        by.get("a").copied().unwrap_or(0) >= n / 4 && by.get("b").copied().unwrap_or(0) >= n / 4,
        "{by:?}"
    );
    // 200 x 300 ms one after the other would take a minute.
    assert!(
        took < Duration::from_secs(15),
        "streams were not concurrent: {took:?}"
    );
    assert_eq!(a.requests() + b.requests(), n as u64);
    bal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_flood_does_not_grow_memory_and_service_continues() {
    let backend = start_backend("web").await;
    let mut bin = start_binary(
        &config(&[backend.addr], "round_robin", ""),
        std::process::Stdio::null(),
    );
    let addr = bin.addr;

    async fn flood(addr: SocketAddr, resets: usize) -> (usize, usize) {
        let mut sent = 0usize;
        let mut conns = 0usize;
        while sent < resets && conns < 2000 {
            conns += 1;
            let Ok(tcp) = TcpStream::connect(addr).await else {
                continue;
            };
            let Ok(Ok((mut sender, conn))) =
                tokio::time::timeout(Duration::from_secs(5), h2::client::handshake(tcp)).await
            else {
                continue;
            };
            let conn_task = tokio::spawn(async move {
                let _ = conn.await;
            });
            while sent < resets {
                sender = match tokio::time::timeout(Duration::from_secs(2), sender.ready()).await {
                    Ok(Ok(h)) => h,
                    _ => break,
                };
                let req = Request::get(format!("http://{addr}/reset"))
                    .body(())
                    .unwrap();
                match sender.send_request(req, false) {
                    Ok((_resp, mut stream)) => {
                        stream.send_reset(h2::Reason::CANCEL);
                        sent += 1;
                    }
                    Err(_) => break,
                }
            }
            conn_task.abort();
        }
        (sent, conns)
    }

    // Warm up, then measure.
    // The balancer cuts a flooding connection off and then refuses its address for a while
    // (src/flood.rs), so a flood ends with its 2000 connection attempts, often short of its
    // target: it only has to have happened.
    let (w, _) = flood(addr, 1000).await;
    assert!(w >= 100, "the warm-up flood sent only {w} resets");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = bin.rss_kib();
    let start = Instant::now();
    let (sent, conns) = flood(addr, 10_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = bin.rss_kib();
    println!("rapid reset: {sent} streams reset over {conns} connections in {:?}; RSS {base} KiB -> {after} KiB; backend saw {} requests", start.elapsed(), backend.requests());
    assert!(sent >= 1_000, "the flood sent only {sent} resets");
    assert!(
        after < base + 64 * 1024,
        "RSS grew from {base} KiB to {after} KiB"
    );
    assert_eq!(bin.child.try_wait().unwrap(), None, "the balancer died");

    // Normal service, h2c and HTTP/1.1, from another loopback address: the flooder's own
    // (127.0.0.1) is refused at accept for a while now (src/flood.rs).
    let mut from = hyper_util::client::legacy::connect::HttpConnector::new();
    from.set_local_address(Some([127, 0, 0, 2].into()));
    let h2c: HttpClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(from.clone());
    let h1: HttpClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(from);
    let g = get(&h2c, &format!("http://{addr}/after")).await;
    assert_eq!(g.status, 200);
    let g = get(&h1, &format!("http://{addr}/after")).await;
    assert_eq!(g.status, 200);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            let st = status_at(bin.admin).await;
            status_backend(&st, "web", backend.addr).unwrap()["in_flight"] == 0
        })
        .await,
        "in_flight did not return to 0 after the flood"
    );
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(15)), Some(0));
}
