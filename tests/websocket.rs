//! WebSocket tunnelling through the balancer, with a real tokio-tungstenite echo backend and
//! client: messages both ways, in-flight accounting while the socket is open, a reload that
//! keeps the backend does not close it, a refused upgrade (200/400 instead of 101) is relayed
//! and the connection closed after it, and `Upgrade: h2c` never reaches a backend.

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct WsBackend {
    addr: SocketAddr,
    /// Handshakes completed.
    upgrades: Arc<AtomicU64>,
    /// Sockets currently open (handshake done, not yet closed).
    open: Arc<AtomicU64>,
    /// Request headers of the last handshake.
    last_headers: Arc<Mutex<Option<http::HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes every text and binary message back, prefixed with nothing; answers pings itself.
async fn start_ws_backend() -> WsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upgrades = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicU64::new(0));
    let last_headers = Arc::new(Mutex::new(None));
    let (u, o, h) = (
        Arc::clone(&upgrades),
        Arc::clone(&open),
        Arc::clone(&last_headers),
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (u, o, h) = (Arc::clone(&u), Arc::clone(&o), Arc::clone(&h));
            tokio::spawn(async move {
                // tungstenite's callback signature fixes the large error type.
                #[allow(clippy::result_large_err)]
                let cb = move |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                               resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    *h.lock().unwrap() = Some(req.headers().clone());
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                u.fetch_add(1, SeqCst);
                o.fetch_add(1, SeqCst);
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                    let echo = matches!(m, Message::Text(_) | Message::Binary(_));
                    if echo && ws.send(m).await.is_err() {
                        break;
                    }
                }
                let _ = ws.close(None).await;
                o.fetch_sub(1, SeqCst);
            });
        }
    });
    WsBackend {
        addr,
        upgrades,
        open,
        last_headers,
        task,
    }
}

async fn ws_connect(bal: &Balancer, path: &str) -> WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(bal.addr).await.unwrap();
    let url = format!("ws://{}{}", bal.addr, path);
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake through the balancer");
    assert_eq!(resp.status(), 101);
    ws
}

async fn echo(ws: &mut WebSocketStream<TcpStream>, m: Message) {
    ws.send(m.clone()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("socket open")
        .expect("no error");
    assert_eq!(got, m);
}

async fn in_flight(bal: &Balancer, addr: SocketAddr) -> u64 {
    let st = status(bal).await;
    status_backend(&st, "web", addr).unwrap()["in_flight"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn messages_cross_the_tunnel_and_in_flight_follows_the_socket() {
    let backend = start_ws_backend().await;
    let bal = start_balancer(&config(&[backend.addr], "round_robin", "")).await;
    assert_eq!(in_flight(&bal, backend.addr).await, 0);

    let mut ws = ws_connect(&bal, "/chat?room=1").await;
    echo(&mut ws, Message::text("hello")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await;
    // A large message, both ways.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    echo(&mut ws, Message::binary(big)).await;
    for i in 0..50 {
        echo(&mut ws, Message::text(format!("msg {i}"))).await;
    }
    assert_eq!(backend.upgrades.load(SeqCst), 1);
    let h = backend.last_headers.lock().unwrap().clone().unwrap();
    assert!(h
        .get("upgrade")
        .unwrap()
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("websocket"));
    assert!(h.get("sec-websocket-key").is_some());
    assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
    assert!(h.get("x-forwarded-for").is_some());

    assert_eq!(
        in_flight(&bal, backend.addr).await,
        1,
        "an open WebSocket is in flight"
    );
    let st = status(&bal).await;
    assert_eq!(
        status_backend(&st, "web", backend.addr).unwrap()["requests"],
        1
    );

    // A second socket counts too.
    let mut ws2 = ws_connect(&bal, "/chat?room=2").await;
    echo(&mut ws2, Message::text("two")).await;
    assert_eq!(in_flight(&bal, backend.addr).await, 2);

    ws.close(None).await.unwrap();
    // Drain until the close handshake completes.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while ws.next().await.is_some() {}
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            in_flight(&bal, backend.addr).await == 1
        })
        .await,
        "in_flight must drop to 1 after the first socket closed"
    );
    echo(&mut ws2, Message::text("still here")).await;
    // A client that just drops the TCP connection also ends the tunnel.
    drop(ws2);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            in_flight(&bal, backend.addr).await == 0
        })
        .await,
        "in_flight must return to 0 after every socket closed"
    );
    assert!(eventually(Duration::from_secs(10), || backend.open.load(SeqCst) == 0).await);

    bal.shutdown().await;
}

#[tokio::test]
async fn reload_keeping_the_backend_does_not_close_the_socket() {
    let backend = start_ws_backend().await;
    let other = start_backend("other").await;
    let cfg = config(&[backend.addr], "round_robin", "");
    let bal = start_balancer(&cfg).await;
    let mut ws = ws_connect(&bal, "/live").await;
    echo(&mut ws, Message::text("before")).await;

    // 1: the same file, through the handle.
    let v1 = bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .unwrap();
    echo(&mut ws, Message::text("after reload 1")).await;
    assert_eq!(in_flight(&bal, backend.addr).await, 1);

    // 2: a different config that keeps the backend (new pool, route, limits), through POST.
    bal.write_config(&config(
        &[backend.addr],
        "least_connections",
        &format!(
            "[pools.other]\nbackends = [\"{}\"]\n[[routes]]\npath_prefix = \"/other\"\npool = \"other\"\n\
             [[routes]]\npath_prefix = \"/\"\npool = \"web\"\n[limits]\nheader_timeout = \"2s\"\n",
            other.addr
        ),
    ));
    let g = post(&client(), &bal.admin_url("/reload"), "").await;
    assert_eq!(g.status, 200, "{}", g.body);
    let st = status(&bal).await;
    assert!(st["config"]["version"].as_u64().unwrap() > v1);
    assert_eq!(st["pools"]["web"]["strategy"], "least_connections");
    echo(&mut ws, Message::text("after reload 2")).await;
    echo(&mut ws, Message::binary(vec![7u8; 70_000])).await;
    assert_eq!(
        in_flight(&bal, backend.addr).await,
        1,
        "the tunnel keeps its in-flight slot across reloads"
    );
    assert_eq!(get(&client(), &bal.url("/other")).await.body, "other");

    // 3: a rejected reload changes nothing either.
    std::fs::write(&bal.config_path, "this is not toml [[[").unwrap();
    assert!(bal
        .handle
        .reload(balancer::reload::Trigger::Admin)
        .await
        .is_err());
    echo(&mut ws, Message::text("after failed reload")).await;

    ws.close(None).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while ws.next().await.is_some() {}
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            in_flight(&bal, backend.addr).await == 0
        })
        .await
    );
    assert_eq!(
        backend.upgrades.load(SeqCst),
        1,
        "one handshake: the socket was never re-established"
    );
    bal.shutdown().await;
}

/// Sends `bytes`, then reads until the peer closes (true) or `limit` passes (false).
async fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + limit;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_lines(resp: &str) -> Vec<&str> {
    resp.split("\r\n")
        .filter(|l| l.starts_with("HTTP/1."))
        .collect()
}

const UPGRADE_THEN_PIPELINED: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
GET /second HTTP/1.1\r\nHost: app.test\r\n\r\n";

#[tokio::test]
async fn refused_upgrade_with_200_is_relayed_and_the_connection_closed() {
    // The harness backend answers every request 200 with its name: no 101.
    let backend = start_backend("plain").await;
    let bal = start_balancer(&config(&[backend.addr], "round_robin", "")).await;
    let (resp, closed) = exchange(bal.addr, UPGRADE_THEN_PIPELINED, Duration::from_secs(8)).await;
    assert!(
        closed,
        "connection must close after a refused upgrade: {resp:?}"
    );
    let lines = status_lines(&resp);
    assert_eq!(
        lines,
        ["HTTP/1.1 200 OK"],
        "exactly the backend's answer: {resp:?}"
    );
    assert!(resp.ends_with("plain"), "{resp:?}");
    assert_eq!(
        backend.requests(),
        1,
        "the pipelined request must not be forwarded"
    );
    assert_eq!(
        backend.state.last_uri.lock().unwrap().as_deref(),
        Some("/ws")
    );
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(
        h.get("upgrade").unwrap(),
        "websocket",
        "a WebSocket handshake keeps its Upgrade"
    );
    // The balancer still serves.
    assert_eq!(get(&client(), &bal.url("/")).await.status, 200);
    bal.shutdown().await;
}

#[tokio::test]
async fn refused_upgrade_with_400_is_relayed_and_the_connection_closed() {
    // A backend that answers 400 (keep-alive) to whatever it is sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicU64::new(0));
    let h2 = Arc::clone(&heads);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let h2 = Arc::clone(&h2);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        h2.fetch_add(1, SeqCst);
                        let body = "refused upgrade";
                        let r = format!(
                            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(r.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    let bal = start_balancer(&config(&[addr], "round_robin", "")).await;
    let (resp, closed) = exchange(bal.addr, UPGRADE_THEN_PIPELINED, Duration::from_secs(8)).await;
    assert!(
        closed,
        "connection must close after a refused upgrade: {resp:?}"
    );
    assert_eq!(
        status_lines(&resp),
        ["HTTP/1.1 400 Bad Request"],
        "{resp:?}"
    );
    assert!(resp.ends_with("refused upgrade"), "{resp:?}");
    assert_eq!(
        heads.load(SeqCst),
        1,
        "the pipelined request must not be forwarded"
    );
    // A 4xx is no backend failure.
    let st = status(&bal).await;
    assert_eq!(status_backend(&st, "web", addr).unwrap()["failures"], 0);
    assert_eq!(status_backend(&st, "web", addr).unwrap()["in_flight"], 0);
    bal.shutdown().await;
    task.abort();
}

#[tokio::test]
async fn h2c_upgrade_headers_are_stripped_before_the_backend() {
    let backend = start_backend("plain").await;
    let bal = start_balancer(&config(&[backend.addr], "round_robin", "")).await;
    let req = b"GET /h2c HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Kept: yes\r\n\r\n";
    let (resp, _closed) = exchange(bal.addr, req, Duration::from_secs(3)).await;
    let lines = status_lines(&resp);
    assert_eq!(
        lines.first().copied(),
        Some("HTTP/1.1 200 OK"),
        "no 101 for h2c: {resp:?}"
    );
    assert_eq!(backend.requests(), 1);
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert!(
        h.get("upgrade").is_none(),
        "Upgrade: h2c reached the backend: {h:?}"
    );
    assert!(
        h.get("http2-settings").is_none(),
        "HTTP2-Settings reached the backend: {h:?}"
    );
    let conn = h
        .get("connection")
        .map(|v| v.to_str().unwrap().to_ascii_lowercase());
    assert!(
        conn.as_deref()
            .is_none_or(|c| !c.contains("upgrade") && !c.contains("http2-settings")),
        "client's Connection reached the backend: {h:?}"
    );
    assert_eq!(h.get("x-kept").unwrap(), "yes");

    // An Upgrade to anything but websocket is not tunnelled either.
    let req =
        b"GET /other HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n";
    let (resp, _) = exchange(bal.addr, req, Duration::from_secs(3)).await;
    assert_eq!(
        status_lines(&resp).first().copied(),
        Some("HTTP/1.1 200 OK"),
        "{resp:?}"
    );
    let h = backend.state.last_headers.lock().unwrap().clone().unwrap();
    assert!(h.get("upgrade").is_none(), "{h:?}");
    bal.shutdown().await;
}
