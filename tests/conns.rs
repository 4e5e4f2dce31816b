//! Client connections: header_timeout times a head from its first byte, not the idle wait
//! before it.
//!
//! Real sockets and short configured timeouts; assertions are on what the client sees
//! (answers, GOAWAY, EOF), with generous upper bounds for a loaded machine.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn with_idle(ms: u64) -> impl FnOnce(&mut balancer::Config) {
    move |c| c.limits.idle_timeout = Duration::from_millis(ms)
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

#[allow(dead_code)]
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
// header_timeout

#[tokio::test]
async fn header_timeout_runs_from_a_heads_first_byte_not_from_the_idle_wait() {
    let a = start_backend("a").await;
    let bal = start_balancer_with(
        &config(
            &[a.addr],
            "round_robin",
            "[limits]\nheader_timeout = \"1s\"\n",
        ),
        with_idle(5000),
    )
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
