//! Client connections: `[limits] idle_timeout` (idle HTTP/1.1 keep-alive and idle h2
//! connections are closed, busy ones never; header_timeout times a head from its first byte,
//! not the idle wait before it), idle connections making room at `max_connections`, and
//! reloads resizing `max_connections`.
//!
//! Real sockets and short configured timeouts; assertions are on what the client sees
//! (answers, GOAWAY, EOF), with generous upper bounds for a loaded machine.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::reload::Trigger;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[limits]` with a short idle_timeout.
fn idle(ms: u64) -> String {
    format!("[limits]\nidle_timeout = \"{ms}ms\"\n")
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1 over a raw socket

async fn raw_get(s: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
}

/// Reads one response with a Content-Length body; its status.
async fn read_status(s: &mut TcpStream, limit: Duration) -> Result<u16, String> {
    tokio::time::timeout(limit, async {
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut b).await {
                Ok(0) => return Err(format!("closed before a response ({} bytes)", buf.len())),
                Ok(n) => buf.extend_from_slice(&b[..n]),
                Err(e) => return Err(e.to_string()),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or("no status")?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        while buf.len() < head_end + len {
            match s.read(&mut b).await {
                Ok(0) => return Err("closed mid-body".into()),
                Ok(n) => buf.extend_from_slice(&b[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(status)
    })
    .await
    .map_err(|_| "no response in time".to_string())?
}

/// How long until the peer closes (EOF or reset), reading and discarding; `None` if it is
/// still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut b = [0u8; 1024];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/2 with raw frames, so the test sees GOAWAY and its error code

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, PartialEq)]
enum Ev {
    Headers {
        stream: u32,
        end: bool,
        status_200: bool,
    },
    Data {
        stream: u32,
        end: bool,
    },
    GoAway {
        code: u32,
    },
    Reset {
        stream: u32,
    },
    Eof,
}

struct H2 {
    s: TcpStream,
    buf: Vec<u8>,
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

impl H2 {
    async fn connect(addr: SocketAddr) -> H2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(4, 0, 0, &[]));
        s.write_all(&hello).await.unwrap();
        H2 { s, buf: Vec::new() }
    }

    /// GET `path` on `stream` (odd, increasing), headers only.
    async fn get(&mut self, stream: u32, path: &str) {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        block.push(0x04); // :path, literal without indexing
        block.push(path.len() as u8);
        block.extend_from_slice(path.as_bytes());
        block.push(0x01); // :authority, literal without indexing
        block.push(6);
        block.extend_from_slice(b"a.test");
        // END_STREAM | END_HEADERS
        let f = frame(1, 0x1 | 0x4, stream, &block);
        self.s.write_all(&f).await.unwrap();
    }

    /// The next event worth reporting; SETTINGS and PINGs are acknowledged on the way, as a
    /// real client does.
    async fn next(&mut self) -> Ev {
        loop {
            while self.buf.len() < 9 || self.buf.len() < 9 + frame_len(&self.buf) {
                let mut b = [0u8; 16384];
                match self.s.read(&mut b).await {
                    Ok(0) | Err(_) => return Ev::Eof,
                    Ok(n) => self.buf.extend_from_slice(&b[..n]),
                }
            }
            let len = frame_len(&self.buf);
            let (ty, flags) = (self.buf[3], self.buf[4]);
            let stream = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                & 0x7fff_ffff;
            let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
            self.buf.drain(..9 + len);
            match ty {
                0 => {
                    return Ev::Data {
                        stream,
                        end: flags & 0x1 != 0,
                    }
                }
                1 => {
                    return Ev::Headers {
                        stream,
                        end: flags & 0x1 != 0,
                        // :status 200 is static table entry 8, sent indexed.
                        status_200: payload.first() == Some(&0x88),
                    };
                }
                3 => return Ev::Reset { stream },
                4 if flags & 0x1 == 0 => {
                    let _ = self.s.write_all(&frame(4, 0x1, 0, &[])).await;
                }
                6 if flags & 0x1 == 0 => {
                    let _ = self.s.write_all(&frame(6, 0x1, 0, &payload)).await;
                }
                7 => {
                    return Ev::GoAway {
                        code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                    }
                }
                _ => {}
            }
        }
    }

    /// Reads until stream `id`'s response ended; panics on anything else but GOAWAYs, which
    /// are returned (in order) for the caller to judge.
    async fn response(&mut self, id: u32, limit: Duration) -> Vec<Ev> {
        let mut goaways = Vec::new();
        let mut got_200 = false;
        let r = tokio::time::timeout(limit, async {
            loop {
                match self.next().await {
                    Ev::Headers {
                        stream,
                        end,
                        status_200,
                    } if stream == id => {
                        got_200 = status_200;
                        if end {
                            return;
                        }
                    }
                    Ev::Data { stream, end: true } if stream == id => return,
                    Ev::Data { .. } => {}
                    g @ Ev::GoAway { .. } => goaways.push(g),
                    other => panic!("stream {id}: unexpected {other:?}"),
                }
            }
        })
        .await;
        assert!(r.is_ok(), "stream {id}: no complete response in {limit:?}");
        assert!(got_200, "stream {id}: not a 200");
        goaways
    }

    /// Reads until EOF; the GOAWAY codes seen on the way, and how long it took (`None`: still
    /// open after `limit`).
    async fn until_closed(&mut self, limit: Duration) -> (Vec<u32>, Option<Duration>) {
        let start = Instant::now();
        let mut codes = Vec::new();
        let r = tokio::time::timeout(limit, async {
            loop {
                match self.next().await {
                    Ev::GoAway { code } => codes.push(code),
                    Ev::Eof => return,
                    _ => {}
                }
            }
        })
        .await;
        (codes, r.ok().map(|_| start.elapsed()))
    }
}

fn frame_len(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

// ------------------------------------------------------------------------------------------
// idle_timeout

#[tokio::test]
async fn idle_http1_keepalive_connection_is_closed_after_idle_timeout() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", &idle(300))).await;
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, Ok(200));
    // header_timeout is 10 s: only idle_timeout can close it this soon.
    let t = closed_within(&mut s, Duration::from_secs(4))
        .await
        .expect("an idle keep-alive connection outlived idle_timeout");
    assert!(
        t >= Duration::from_millis(250),
        "closed before idle_timeout: {t:?}"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn http1_request_in_flight_is_not_cut_by_idle_timeout() {
    let a = start_backend("a").await;
    a.set_delay(Duration::from_millis(1200));
    let bal = start_balancer(&config(&[a.addr], "round_robin", &idle(300))).await;
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, Ok(200));
    // Idle from here on: closed after idle_timeout.
    assert!(
        closed_within(&mut s, Duration::from_secs(4))
            .await
            .is_some(),
        "not closed once idle"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn header_timeout_runs_from_a_heads_first_byte_not_from_the_idle_wait() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"1s\"\nidle_timeout = \"5s\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    raw_get(&mut s, "/").await;
    assert_eq!(read_status(&mut s, Duration::from_secs(5)).await, Ok(200));
    // Idle for longer than header_timeout: still open, and the next request is served.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    raw_get(&mut s, "/").await;
    assert_eq!(
        read_status(&mut s, Duration::from_secs(5)).await,
        Ok(200),
        "an idle keep-alive connection was cut at header_timeout"
    );
    // A head that starts and trickles is still cut at header_timeout, long before idle_timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let mut closed = None;
    let mut b = [0u8; 256];
    while start.elapsed() < Duration::from_secs(4) {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            Err(_) => {
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    closed = Some(start.elapsed());
                    break;
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = Some(start.elapsed());
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    let t = closed.expect("a trickling head on a keep-alive connection was never cut off");
    assert!(
        t >= Duration::from_millis(800),
        "cut before header_timeout: {t:?}"
    );
    assert!(t < Duration::from_secs(3), "cut too late: {t:?}");
    assert_eq!(a.requests(), 2);
    bal.shutdown().await;
}

#[tokio::test]
async fn idle_h2_connection_gets_goaway_no_error_then_close() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", &idle(300))).await;
    let mut c = H2::connect(bal.addr).await;
    c.get(1, "/").await;
    let early = c.response(1, Duration::from_secs(5)).await;
    assert!(
        early.is_empty(),
        "GOAWAY while a stream was open: {early:?}"
    );
    let (codes, closed) = c.until_closed(Duration::from_secs(4)).await;
    assert!(
        closed.is_some(),
        "an idle h2 connection outlived idle_timeout"
    );
    assert!(!codes.is_empty(), "closed without a GOAWAY");
    assert!(
        codes.iter().all(|&c| c == 0),
        "GOAWAY codes {codes:?}, expected NO_ERROR"
    );
    bal.shutdown().await;
}

#[tokio::test]
async fn h2_stream_in_flight_is_not_cut_by_idle_timeout() {
    let a = start_backend("a").await;
    // Four idle timeouts' worth of waiting on the backend, with the client silent.
    a.set_delay(Duration::from_millis(1200));
    let bal = start_balancer(&config(&[a.addr], "round_robin", &idle(300))).await;
    let mut c = H2::connect(bal.addr).await;
    c.get(1, "/").await;
    let early = c.response(1, Duration::from_secs(5)).await;
    assert!(
        early.is_empty(),
        "GOAWAY while a stream was in flight: {early:?}"
    );
    // Idle now: closed.
    let (codes, closed) = c.until_closed(Duration::from_secs(4)).await;
    assert!(closed.is_some(), "not closed once idle");
    assert_eq!(codes.first(), Some(&0));
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// max_connections

#[tokio::test]
async fn full_listener_closes_an_idle_h2_connection_to_admit_a_new_client() {
    let a = start_backend("a").await;
    // idle_timeout stays at its 60 s default: only making room can close one.
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nmax_connections = 5\n",
    ))
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..5 {
        let mut c = H2::connect(bal.addr).await;
        c.get(1, "/").await;
        let early = c.response(1, Duration::from_secs(5)).await;
        assert!(early.is_empty());
        // Idle from now on, answering PINGs for as long as the connection lives.
        let tx = tx.clone();
        tokio::spawn(async move {
            let (codes, closed) = c.until_closed(Duration::from_secs(30)).await;
            let _ = tx.send((codes, closed.is_some()));
        });
    }
    let start = Instant::now();
    let g = tokio::time::timeout(Duration::from_secs(5), get(&client(), &bal.url("/")))
        .await
        .expect("a sixth client was locked out by five idle ones");
    assert_eq!(g.status, 200);
    println!("sixth client served after {:?}", start.elapsed());
    let (codes, closed) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no idle connection was closed")
        .unwrap();
    assert!(closed);
    assert_eq!(codes.first(), Some(&0), "GOAWAY codes {codes:?}");
    // Exactly one made room.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.try_recv().is_err(),
        "more than one idle connection was closed"
    );
    bal.shutdown().await;
}

/// A client whose request the backend holds: a connection that is never idle.
async fn busy_client(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    raw_get(&mut s, "/").await;
    s
}

/// Whether a client connecting now is answered within `wait`.
async fn served_within(addr: SocketAddr, wait: Duration) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    raw_get(&mut s, "/").await;
    let mut b = [0u8; 1];
    let served = tokio::time::timeout(wait, s.peek(&mut b)).await.is_ok();
    (s, served)
}

fn limits(max: u64) -> String {
    format!("[limits]\nmax_connections = {max}\n")
}

#[tokio::test]
async fn reload_raising_max_connections_admits_waiting_clients() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Hang);
    let cfg = |max| config(&[a.addr], "round_robin", &limits(max));
    let bal = start_balancer(&cfg(1)).await;
    let busy = busy_client(bal.addr).await;
    assert!(
        eventually(Duration::from_secs(5), || a.requests() == 1).await,
        "the first request never reached the backend"
    );
    a.set_mode(Mode::Ok);
    let (mut waiting, served) = served_within(bal.addr, Duration::from_millis(600)).await;
    assert!(!served, "served beyond max_connections = 1");
    bal.write_config(&cfg(3));
    bal.handle.reload(Trigger::Admin).await.unwrap();
    assert_eq!(
        read_status(&mut waiting, Duration::from_secs(3)).await,
        Ok(200),
        "a waiting client was not admitted after max_connections went up"
    );
    let (_third, served) = served_within(bal.addr, Duration::from_secs(3)).await;
    assert!(
        served,
        "a third connection was not admitted at max_connections = 3"
    );
    drop(busy);
    bal.shutdown().await;
}

#[tokio::test]
async fn reload_lowering_max_connections_holds_new_clients_until_enough_close() {
    let a = start_backend("a").await;
    a.set_mode(Mode::Hang);
    let cfg = |max| config(&[a.addr], "round_robin", &limits(max));
    let bal = start_balancer(&cfg(3)).await;
    let busy1 = busy_client(bal.addr).await;
    let busy2 = busy_client(bal.addr).await;
    assert!(
        eventually(Duration::from_secs(5), || a.requests() == 2).await,
        "the requests never reached the backend"
    );
    a.set_mode(Mode::Ok);
    bal.write_config(&cfg(1));
    bal.handle.reload(Trigger::Admin).await.unwrap();
    // Two open, limit 1: the place that was free is gone.
    let (mut waiting, served) = served_within(bal.addr, Duration::from_millis(600)).await;
    assert!(!served, "served with 2 open at max_connections = 1");
    // One closes: still at the limit.
    drop(busy1);
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(600), waiting.peek(&mut b)).await;
    assert!(early.is_err(), "served with 1 open at max_connections = 1");
    // The other closes: now there is room.
    drop(busy2);
    assert_eq!(
        read_status(&mut waiting, Duration::from_secs(3)).await,
        Ok(200),
        "not admitted once the open connections fell under the new max_connections"
    );
    bal.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// Parking idle HTTP/1.1 connections

/// An HTTP/1.1 keep-alive connection idle between requests (for 100 ms) is parked (its hyper
/// connection and buffers freed, only the socket waiting) and woken by its next bytes: a plain
/// request, a head split across two writes, and two pipelined requests in one write all get
/// their answers, and the connections park again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_parked_and_woken_by_their_next_request() {
    use std::sync::atomic::Ordering::Relaxed;
    const CONNS: usize = 60;
    let be = start_backend("a").await;
    let b = start_balancer(&config(&[be.addr], "round_robin", "")).await;
    let shared = b.shared();
    let parked = || {
        let shared = std::sync::Arc::clone(&shared);
        move |n: usize| {
            let shared = std::sync::Arc::clone(&shared);
            async move { shared.parked_connections.load(Relaxed) >= n }
        }
    };
    let limit = Duration::from_secs(10);
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        raw_get(&mut s, "/").await;
        assert_eq!(read_status(&mut s, limit).await, Ok(200));
        conns.push(s);
    }
    let p = parked();
    assert!(
        wait_until(limit, || p(CONNS)).await,
        "idle connections were not parked: {}",
        shared.parked_connections.load(Relaxed)
    );
    for (i, s) in conns.iter_mut().enumerate() {
        match i % 3 {
            0 => {
                raw_get(s, "/").await;
                assert_eq!(read_status(s, limit).await, Ok(200), "conn {i}");
            }
            1 => {
                s.write_all(b"GET / HT").await.unwrap();
                if i < 30 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                s.write_all(b"TP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
                assert_eq!(read_status(s, limit).await, Ok(200), "conn {i}");
            }
            _ => {
                s.write_all(
                    b"GET /a HTTP/1.1\r\nHost: test\r\n\r\nGET /b HTTP/1.1\r\nHost: test\r\n\r\n",
                )
                .await
                .unwrap();
                // Both answers may come in one read: count them in the bytes.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let two = tokio::time::timeout(limit, async {
                    while got.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < 2 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                })
                .await;
                assert_eq!(two, Ok(true), "conn {i}: {}", String::from_utf8_lossy(&got));
            }
        }
    }
    assert!(
        wait_until(limit, || p(CONNS)).await,
        "idle connections were not parked again: {}",
        shared.parked_connections.load(Relaxed)
    );
    assert_eq!(be.requests(), (CONNS + CONNS + CONNS / 3) as u64);
    drop(conns);
    assert!(
        eventually(limit, || shared.parked_connections.load(Relaxed) == 0).await,
        "closed connections still counted as parked"
    );
}

/// Listeners accept a connection once its first bytes have arrived (TCP_DEFER_ACCEPT): a
/// client that connects and says nothing costs the balancer nothing at first, is handed over
/// after about a second all the same, and is then timed by header_timeout like any other.
#[tokio::test]
async fn a_connection_is_accepted_with_its_first_bytes_or_after_a_second_of_silence() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"1s\"\n",
    ))
    .await;
    let open = || {
        bal.shared()
            .open_connections
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let start = Instant::now();
    let mut silent = TcpStream::connect(bal.addr).await.unwrap();
    let mut speaks = TcpStream::connect(bal.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(open(), 0, "a connection was accepted before its first byte");
    raw_get(&mut speaks, "/").await;
    assert_eq!(
        read_status(&mut speaks, Duration::from_secs(5)).await,
        Ok(200)
    );
    drop(speaks);
    // The silent one is handed over after the kernel's wait, then cut at header_timeout.
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut b)).await;
    let t = start.elapsed();
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was never closed: {r:?}"
    );
    assert!(
        t >= Duration::from_millis(1800),
        "a silent connection was closed before the accept wait and header_timeout: {t:?}"
    );
    assert_eq!(a.requests(), 1);
    bal.shutdown().await;
}
