//! Graceful shutdown of the real binary (SIGTERM: stop accepting, finish in-flight responses,
//! close idle connections, exit 0; a second signal exits at once) and `max_connections`.
mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK: usize = 64 * 1024;

/// `common::config` with another `shutdown_grace`.
fn config_grace(backends: &[SocketAddr], grace: &str, extra: &str) -> String {
    config(backends, "round_robin", extra).replace(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"{grace}\""),
    )
}

/// Waits (without blocking the runtime) up to `limit` for the binary to exit: its exit code,
/// `Some(None)` for death by a signal, `None` if still running.
async fn wait_exit(b: &mut BinaryBalancer, limit: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = b.child.try_wait() {
            return Some(st.code());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A backend that streams `chunks` chunks of 64 KiB, one every `every`, with a
/// `content-length`; chunk `i` is filled with byte `i % 251` so that any loss or reordering
/// shows.
async fn start_slow_stream_backend(chunks: usize, every: Duration) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    let (mut tx, body) =
                        http_body_util::channel::Channel::<Bytes, Infallible>::new(2);
                    tokio::spawn(async move {
                        for i in 0..chunks {
                            tokio::time::sleep(every).await;
                            let data = Bytes::from(vec![(i % 251) as u8; CHUNK]);
                            if tx.send_data(data).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut r = Response::new(body);
                    r.headers_mut().insert(
                        "content-length",
                        (chunks * CHUNK).to_string().parse().unwrap(),
                    );
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Reads one HTTP/1.1 response (content-length or chunked) from `s`: status and body.
async fn read_response(s: &mut TcpStream, limit: Duration) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(limit, async {
        let mut buf = Vec::new();
        let mut b = [0u8; 16384];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut b).await {
                Ok(0) => {
                    return Err(format!(
                        "closed before a response head ({} bytes)",
                        buf.len()
                    ))
                }
                Ok(n) => buf.extend_from_slice(&b[..n]),
                Err(e) => return Err(e.to_string()),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let mut body = buf[head_end..].to_vec();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().unwrap());
        match length {
            Some(n) => {
                while body.len() < n {
                    match s.read(&mut b).await {
                        Ok(0) => {
                            return Err(format!("closed after {} of {n} body bytes", body.len()))
                        }
                        Ok(k) => body.extend_from_slice(&b[..k]),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                body.truncate(n);
                Ok((status, body))
            }
            None => {
                // chunked: read until the terminating chunk, then decode.
                while !body.ends_with(b"0\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) => return Err("closed inside a chunked body".into()),
                        Ok(k) => body.extend_from_slice(&b[..k]),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                let mut out = Vec::new();
                let mut rest = &body[..];
                loop {
                    let p = rest
                        .windows(2)
                        .position(|w| w == b"\r\n")
                        .ok_or("bad chunk")?;
                    let size =
                        usize::from_str_radix(std::str::from_utf8(&rest[..p]).unwrap().trim(), 16)
                            .map_err(|e| e.to_string())?;
                    rest = &rest[p + 2..];
                    if size == 0 {
                        break;
                    }
                    out.extend_from_slice(&rest[..size]);
                    rest = &rest[size + 2..];
                }
                Ok((status, out))
            }
        }
    })
    .await
    .map_err(|_| format!("no complete response within {limit:?}"))?
}

async fn raw_get(s: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
}

/// Polls connects to `addr` until one is refused; how long that took after `since`.
async fn wait_refused(addr: SocketAddr, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Err(_)) => return Some(since.elapsed()),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_streaming_response_finish() {
    // 48 chunks of 64 KiB, one every 50 ms: about 2.4 s of streaming.
    let chunks = 48;
    let backend = start_slow_stream_backend(chunks, Duration::from_millis(50)).await;
    let mut bal = start_binary(&config_grace(&[backend], "15s", ""), Stdio::null());
    let url = format!("http://{}/stream", bal.addr);

    let c = client();
    let req = Request::get(&url).body(full("")).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("no response head")
        .expect("request failed");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got: Vec<u8> = Vec::with_capacity(chunks * CHUNK);
    // Read a few chunks, then ask the balancer to stop.
    while got.len() < 3 * CHUNK {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("stream stalled")
            .expect("stream ended early")
            .expect("stream failed");
        if let Ok(d) = f.into_data() {
            got.extend_from_slice(&d);
        }
    }
    let t_term = Instant::now();
    bal.signal("TERM");

    // New connections are refused at once...
    let refused = wait_refused(bal.addr, t_term, Duration::from_secs(3)).await;
    assert!(
        refused.is_some(),
        "still accepting connections 3 s after SIGTERM"
    );
    // ...while the process keeps serving the stream in flight.
    assert!(
        bal.child.try_wait().unwrap().is_none(),
        "exited with a response in flight"
    );

    // The stream completes, intact.
    loop {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("stream stalled after SIGTERM");
        match f {
            None => break,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    got.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => panic!("stream broken after SIGTERM at {} bytes: {e}", got.len()),
        }
    }
    assert_eq!(got.len(), chunks * CHUNK, "response truncated");
    for (i, chunk) in got.chunks(CHUNK).enumerate() {
        assert!(
            chunk.iter().all(|&x| x == (i % 251) as u8),
            "chunk {i} corrupted"
        );
    }
    // The stream was still going when SIGTERM came, not done before it.
    assert!(
        t_term.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t_term.elapsed()
    );

    // Then it exits 0, well within shutdown_grace.
    drop(body);
    drop(c);
    let code = wait_exit(&mut bal, Duration::from_secs(12)).await;
    assert_eq!(code, Some(Some(0)), "exit after draining");
    assert!(
        t_term.elapsed() < Duration::from_secs(14),
        "{:?}",
        t_term.elapsed()
    );
}

/// A frame header: payload length, type, flags, stream id.
async fn h2_frame(s: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await?;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Ok((h[3], h[4], stream, payload))
}

const H2_SETTINGS: u8 = 4;
const H2_PING: u8 = 6;
const H2_GOAWAY: u8 = 7;

/// Opens an h2c (prior knowledge) connection with no stream, and reads up to the server's
/// SETTINGS.
async fn h2_idle_connection(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, H2_SETTINGS, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let (ty, _, _, _) = tokio::time::timeout(Duration::from_secs(5), h2_frame(&mut s))
        .await
        .expect("no h2 SETTINGS from the balancer")
        .unwrap();
    assert_eq!(ty, H2_SETTINGS);
    s.write_all(&[0, 0, 0, H2_SETTINGS, 1, 0, 0, 0, 0])
        .await
        .unwrap();
    s
}

/// Reads frames (answering PINGs, as a live client does) until the server closes: whether a
/// GOAWAY came first. Err if still open after `limit`.
async fn h2_until_closed(s: &mut TcpStream, limit: Duration) -> Result<bool, String> {
    let mut goaway = false;
    tokio::time::timeout(limit, async {
        loop {
            match h2_frame(s).await {
                Err(_) => return goaway,
                Ok((H2_GOAWAY, ..)) => goaway = true,
                Ok((H2_PING, flags, _, payload)) if flags & 1 == 0 => {
                    let mut ack = vec![0, 0, 8, H2_PING, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(&payload);
                    if s.write_all(&ack).await.is_err() {
                        return goaway;
                    }
                }
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("h2 connection still open after {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keepalive_connections() {
    let a = start_backend("a").await;
    let mut bal = start_binary(&config_grace(&[a.addr], "30s", ""), Stdio::null());
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(bal.addr).await.unwrap();
        raw_get(&mut s, "/").await;
        let (st, body) = read_response(&mut s, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(st, 200);
        assert_eq!(body, b"a");
        conns.push(s);
    }
    let mut h2 = h2_idle_connection(bal.addr).await;
    let t_term = Instant::now();
    bal.signal("TERM");
    // An idle HTTP/2 connection is told (GOAWAY) and closed.
    let goaway = h2_until_closed(&mut h2, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(goaway, "h2 connection closed without a GOAWAY");
    // Each idle keep-alive connection is closed by the balancer (EOF), promptly.
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("connection {i}: {n} unexpected bytes"),
            Err(_) => panic!("idle connection {i} still open 3 s after SIGTERM"),
        }
    }
    // Nothing in flight: the 30 s grace is not waited for.
    let code = wait_exit(&mut bal, Duration::from_secs(5)).await;
    assert_eq!(code, Some(Some(0)), "exit with only idle connections");
    assert!(t_term.elapsed() < Duration::from_secs(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_wait() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Hang);
    let mut bal = start_binary(&config_grace(&[a.addr], "1s", ""), Stdio::null());
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    assert!(eventually(Duration::from_secs(5), || a.requests() == 1).await);
    let t_term = Instant::now();
    bal.signal("TERM");
    let code = wait_exit(&mut bal, Duration::from_secs(8)).await;
    let took = t_term.elapsed();
    assert_eq!(code, Some(Some(0)), "exit when shutdown_grace expires");
    assert!(
        took >= Duration::from_millis(800),
        "did not wait for the request in flight ({took:?})"
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    // The unfinished request's connection is cut.
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "connection left open: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Hang);
    let mut bal = start_binary(&config_grace(&[a.addr], "60s", ""), Stdio::null());
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    assert!(eventually(Duration::from_secs(5), || a.requests() == 1).await);
    bal.signal("TERM");
    // Draining: the request in flight holds the process up.
    assert_eq!(
        wait_exit(&mut bal, Duration::from_millis(800)).await,
        None,
        "exited at the first SIGTERM with a request in flight and 60 s of grace"
    );
    let t = Instant::now();
    bal.signal("TERM");
    let code = wait_exit(&mut bal, Duration::from_secs(3)).await;
    assert!(code.is_some(), "a second SIGTERM did not end the process");
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_shuts_down_gracefully_too() {
    let a = start_backend("a").await;
    let mut bal = start_binary(&config_grace(&[a.addr], "30s", ""), Stdio::null());
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    let (st, _) = read_response(&mut s, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(st, 200);
    bal.signal("INT");
    assert_eq!(
        wait_exit(&mut bal, Duration::from_secs(5)).await,
        Some(Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_back_the_third() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nmax_connections = 2\n",
    ))
    .await;
    // Two connections with a request in flight (idle ones would make room: tests/conns.rs).
    a.set_mode(Mode::Hang);
    let mut c1 = TcpStream::connect(bal.addr).await.unwrap();
    let mut c2 = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut c1, "/").await;
    raw_get(&mut c2, "/").await;
    assert!(
        eventually(Duration::from_secs(5), || a.requests() == 2).await,
        "the two requests never reached the backend"
    );
    a.set_mode(Mode::Ok);
    // The third connection completes its TCP handshake but is not served.
    let mut c3 = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut c3, "/").await;
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(800), c3.peek(&mut b)).await;
    assert!(
        early.is_err(),
        "a third connection was served beyond max_connections = 2: {early:?}"
    );
    assert_eq!(a.requests(), 2);
    // One closes: the third is served.
    drop(c1);
    let (st, body) = read_response(&mut c3, Duration::from_secs(5))
        .await
        .expect("third connection not served after one closed");
    assert_eq!(st, 200);
    assert_eq!(body, b"a");
    drop(c2);
    drop(c3);
    bal.shutdown().await;
}
