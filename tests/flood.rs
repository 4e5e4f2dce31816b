//! HTTP/2 rapid reset (streams opened and cancelled at once) against the real balancer: the
//! offending connection gets GOAWAY and is closed, its address is refused for a while, and
//! clients on other connections and other addresses are still served. Behaviour only: how
//! fast is for `benches/flood.sh`.
//!
//! The flooder connects from 127.0.0.1 and the well-behaved clients from 127.0.0.2 (all of
//! 127.0.0.0/8 is loopback), so that a ban of the flooder's address cannot hit them.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpSocket, TcpStream};

const FLOODER: [u8; 4] = [127, 0, 0, 1];
const NORMAL: [u8; 4] = [127, 0, 0, 2];

async fn connect_from(source: [u8; 4], target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(IpAddr::from(source), 0))?;
    sock.connect(target).await
}

// ------------------------------------------------------------------------------------------
// A raw h2c client: frames written by hand, because the h2 crate will not reset this fast.

#[derive(Default)]
struct Seen {
    settings: AtomicU64,
    goaway: AtomicBool,
    closed: AtomicBool,
}

struct Raw {
    wr: OwnedWriteHalf,
    seen: Arc<Seen>,
    acked: u64,
    next_id: u32,
    authority: String,
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

impl Raw {
    async fn open(source: [u8; 4], target: SocketAddr) -> std::io::Result<Raw> {
        let s = connect_from(source, target).await?;
        let (mut rd, mut wr) = s.into_split();
        let seen = Arc::new(Seen::default());
        let watcher = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut pending = Vec::new();
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
                let mut at = 0;
                while pending.len() - at >= 9 {
                    let len = u32::from_be_bytes([0, pending[at], pending[at + 1], pending[at + 2]])
                        as usize;
                    if pending.len() - at < 9 + len {
                        break;
                    }
                    match (pending[at + 3], pending[at + 4] & 1) {
                        (0x4, 0) => {
                            watcher.settings.fetch_add(1, SeqCst);
                        }
                        (0x7, _) => watcher.goaway.store(true, SeqCst),
                        _ => {}
                    }
                    at += 9 + len;
                }
                pending.drain(..at);
            }
            watcher.closed.store(true, SeqCst);
        });
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, 0x4, 0, 0, &[]);
        wr.write_all(&out).await?;
        Ok(Raw {
            wr,
            seen,
            acked: 0,
            next_id: 1,
            authority: target.to_string(),
        })
    }

    fn ack_settings(&mut self, out: &mut Vec<u8>) {
        while self.acked < self.seen.settings.load(SeqCst) {
            frame(out, 0x4, 0x1, 0, &[]);
            self.acked += 1;
        }
    }

    /// HEADERS for `GET /`, END_STREAM; returns the stream id.
    fn headers(&mut self, out: &mut Vec<u8>) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        // :method GET, :scheme http, :path / (static table), :authority as a literal.
        let mut block = vec![0x82, 0x86, 0x84, 0x01, self.authority.len() as u8];
        block.extend_from_slice(self.authority.as_bytes());
        frame(out, 0x1, 0x5, id, &block);
        id
    }

    fn reset(out: &mut Vec<u8>, id: u32) {
        frame(out, 0x3, 0, id, &0x8u32.to_be_bytes()); // CANCEL
    }

    fn gone(&self) -> bool {
        self.seen.goaway.load(SeqCst) || self.seen.closed.load(SeqCst)
    }

    async fn send(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let r = self.wr.write_all(out).await;
        out.clear();
        r
    }
}

/// Waits until the peer sent GOAWAY or closed the connection, up to `limit`.
async fn gone_within(raw: &Raw, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !raw.gone() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    raw.gone()
}

/// Waits until the peer closed the connection (EOF or reset), up to `limit`.
async fn closed_within(raw: &Raw, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if raw.seen.closed.load(SeqCst) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

// ------------------------------------------------------------------------------------------
// A well-behaved HTTP/1.1 client on its own connection and address.

async fn normal_get(target: SocketAddr) -> Result<u16, String> {
    let once = async {
        let s = connect_from(NORMAL, target)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("/")
            .header("host", target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(10), once)
        .await
        .map_err(|_| "timed out".to_owned())?
}

// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_that_keeps_resetting_streams_gets_goaway_and_is_closed() {
    let a = start_backend("a").await;
    // Requests are still in flight at the backend when their reset arrives.
    a.set_delay(Duration::from_millis(300));
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;

    let mut raw = Raw::open(FLOODER, bal.addr).await.unwrap();
    let mut out = Vec::new();
    let mut streams = 0u32;
    let started = Instant::now();
    // HEADERS, a pause so that the balancer accepts the stream and starts on it, RST_STREAM.
    // h2's own guard only counts resets of streams not yet accepted, so this is ours to catch.
    while !raw.gone() && streams < 2_000 && started.elapsed() < Duration::from_secs(20) {
        raw.ack_settings(&mut out);
        let id = raw.headers(&mut out);
        if raw.send(&mut out).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        Raw::reset(&mut out, id);
        if raw.send(&mut out).await.is_err() {
            break;
        }
        streams += 1;
    }
    assert!(
        closed_within(&raw, Duration::from_secs(5)).await,
        "the connection was not closed after {streams} reset streams"
    );
    assert!(
        raw.seen.goaway.load(SeqCst),
        "closed without a GOAWAY after {streams} reset streams"
    );
    assert!(
        streams <= 1_000,
        "it took {streams} reset streams to close the connection"
    );

    // The flooder's address is refused for a while: closed before the server's SETTINGS.
    let again = Raw::open(FLOODER, bal.addr).await;
    if let Ok(again) = again {
        assert!(closed_within(&again, Duration::from_secs(2)).await);
        assert_eq!(again.seen.settings.load(SeqCst), 0, "not refused at accept");
    }

    // Another address is served as usual.
    a.set_delay(Duration::ZERO);
    assert_eq!(normal_get(bal.addr).await, Ok(200));
    bal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_flood_from_many_connections_leaves_other_clients_served() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let target = bal.addr;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cut_off = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    // 20 connections, HEADERS + RST_STREAM pairs 32 to a write, re-opened as soon as closed;
    // at most 1.5 s and 400,000 streams.
    let flooders: Vec<_> = (0..20)
        .map(|_| {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            let (cut_off, refused) = (Arc::clone(&cut_off), Arc::clone(&refused));
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_millis(1500);
                while !stop.load(SeqCst) && Instant::now() < deadline {
                    let Ok(mut raw) = Raw::open(FLOODER, target).await else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let mut out = Vec::new();
                    while !raw.gone() && !stop.load(SeqCst) && Instant::now() < deadline {
                        raw.ack_settings(&mut out);
                        for _ in 0..32 {
                            let id = raw.headers(&mut out);
                            Raw::reset(&mut out, id);
                        }
                        if raw.send(&mut out).await.is_err() {
                            break;
                        }
                        if sent.fetch_add(32, SeqCst) >= 400_000 {
                            stop.store(true, SeqCst);
                        }
                    }
                    // The server's verdict on this connection, waited for whatever the
                    // flooder saw so far: a write can fail on the closed socket before the
                    // reader task has seen the GOAWAY or the close (all 20 did that in a failed
                    // run under load), and the flood can be all written into the socket
                    // buffers before the balancer, sharing this runtime, has read any of it
                    // (CI runs on a loaded 2-core machine twice ended with none of the 20
                    // connections having seen the server's SETTINGS yet). Closed without a
                    // SETTINGS frame: refused at accept; SETTINGS, then GOAWAY: cut off (a
                    // close without GOAWAY is not the rapid-reset guard's answer). Anything
                    // else within 5 s counts as neither (the test fails below if no connection
                    // was cut off).
                    if gone_within(&raw, Duration::from_secs(5)).await {
                        if raw.seen.settings.load(SeqCst) == 0 {
                            refused.fetch_add(1, SeqCst);
                        } else if raw.seen.goaway.load(SeqCst) {
                            cut_off.fetch_add(1, SeqCst);
                        }
                    }
                    // A refused reconnect is cheap for both sides, but not free for the test.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();

    // Meanwhile, a normal client on its own connections: every request answered.
    let mut during = 0;
    let flood_end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < flood_end {
        assert_eq!(normal_get(target).await, Ok(200), "during the flood");
        during += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, SeqCst);
    for f in flooders {
        f.await.unwrap();
    }
    assert!(
        during >= 3,
        "only {during} requests went through during the flood"
    );
    let sent = sent.load(SeqCst);
    assert!(
        cut_off.load(SeqCst) > 0,
        "no flood connection was cut off ({sent} streams sent)"
    );
    // Once cut off, the flooder's address is refused at accept for a while.
    assert!(
        refused.load(SeqCst) > 0,
        "no reconnect of the flooder was refused ({} cut off)",
        cut_off.load(SeqCst)
    );
    // Streams reset before they were served never reach the backend: no amplification.
    let forwarded = a.requests() - during;
    assert!(
        forwarded * 10 < sent,
        "{forwarded} of {sent} reset streams reached the backend"
    );
    // And after it.
    for _ in 0..5 {
        assert_eq!(normal_get(target).await, Ok(200), "after the flood");
    }
    bal.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_client_that_cancels_some_of_its_streams_is_not_cut_off() {
    let a = start_backend("a").await;
    a.set_delay(Duration::from_millis(20));
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let tcp = connect_from(NORMAL, bal.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let url = format!("http://{}/", bal.addr);
    // 60 rounds of 5 requests, 2 of them cancelled while their backend is still working: 120
    // cancels, more than the minimum, but 40% of the streams.
    for round in 0..60 {
        let mut keep = Vec::new();
        for i in 0..5 {
            send = send.ready().await.unwrap();
            let req = http::Request::get(&url).body(()).unwrap();
            let (resp, _) = send.send_request(req, true).unwrap();
            if i < 3 {
                keep.push(resp);
            }
            // The other two are dropped here: h2 sends RST_STREAM(CANCEL).
        }
        for resp in keep {
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .unwrap_or_else(|_| panic!("round {round}: no answer"))
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(resp.status(), 200);
        }
    }
    let req = http::Request::get(&url).body(()).unwrap();
    let (resp, _) = send.ready().await.unwrap().send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    bal.shutdown().await;
}
