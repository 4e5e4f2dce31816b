//! HTTP/2 specifics with a raw h2 client: `host` against `:authority`, and streams whose
//! peer never opens its flow-control window.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use tokio::net::TcpStream;

async fn h2(addr: std::net::SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

#[tokio::test]
async fn h2_host_that_disagrees_with_authority_is_refused() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut send = h2(bal.addr, 65_535).await;

    let req = Request::get("http://a.example/x")
        .header("host", "b.example")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(a.requests(), 0, "the request must not reach a backend");

    // The same host in both places is fine.
    let mut send = send.ready().await.unwrap();
    let req = Request::get("http://a.example/x")
        .header("host", "a.example")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    bal.shutdown().await;
}

#[tokio::test]
async fn h2_stream_whose_window_never_opens_is_reset() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(
        &[a.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"1s\"\n",
    ))
    .await;
    // Stream windows of 0: the balancer may send headers but not one byte of body.
    let mut send = h2(bal.addr, 0).await;
    let req = Request::get(format!("http://{}/bytes/1000000", bal.addr))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response headers")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("the stalled stream was never reset");
    assert!(
        matches!(end, Some(Err(_))),
        "expected a reset, got {:?}",
        end.map(|r| r.map(|b| b.len()))
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    // The backend's slot is given back.
    assert!(
        wait_status(&bal, Duration::from_secs(5), "in_flight back to 0", |s| {
            entry(s, a.addr)["in_flight"] == 0
        })
        .await["pools"]["web"]["backends"][0]["in_flight"]
            == 0
    );
    // The connection itself still serves other streams.
    let mut send = send.ready().await.unwrap();
    let req = Request::get(format!("http://{}/", bal.addr))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    bal.shutdown().await;
}

/// RFC 9113 §8.2.3: an h2 client may send each cookie pair as its own field; an HTTP/1.1
/// backend must get them back as one `Cookie` line.
#[tokio::test]
async fn h2_cookie_crumbs_reach_an_http1_backend_as_one_header() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut send = h2(bal.addr, 65_535).await;
    let req = Request::get("http://a.example/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let h = a.state.last_headers.lock().unwrap().clone().unwrap();
    let cookies: Vec<&str> = h
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
    bal.shutdown().await;
}

#[tokio::test]
async fn h2_authority_that_is_not_a_valid_host_is_refused() {
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut send = h2(bal.addr, 65_535).await;
    for authority in ["evil@a.example", "a..example", "a.example:99999"] {
        let req = Request::get(format!("http://{authority}/x"))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 400, "{authority}");
        send = send.ready().await.unwrap();
    }
    assert_eq!(a.requests(), 0, "a refused request reached the backend");
    bal.shutdown().await;
}

/// The balancer resets an h2 stream whose window never opens: the access log says so
/// (`reset`, `client_stalled`), not that the client closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_stream_reset_for_a_stalled_window_is_logged_as_reset() {
    let a = start_backend("a").await;
    let tmpl = config(
        &[a.addr],
        "round_robin",
        "[limits]\nheader_timeout = \"1s\"\n",
    )
    .replace("access = false", "access = true\nlevel = \"warn\"");
    let mut bin = start_binary(&tmpl, std::process::Stdio::piped());
    let log = AccessLog::of(&mut bin);
    let mut send = h2(bin.addr, 0).await;
    let req = Request::get(format!("http://{}/bytes/1000000", bin.addr))
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("response headers")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let l = log.line_for("/bytes/1000000");
    assert_eq!(l["proto"], "HTTP/2");
    assert_eq!(l["outcome"], "reset", "{l}");
    assert_eq!(l["reason"], "client_stalled", "{l}");
    assert_eq!(l["bytes"], 0, "{l}");
    drop(resp);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads frames until every stream in `streams` has its response HEADERS; the `:status` of
/// each, from the first byte of its header block (h2 encodes 200 and 400 as static indices).
async fn statuses(s: &mut TcpStream, streams: &[u32]) -> Vec<(u32, u16)> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    while got.len() < streams.len() {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            if buf[3] == 0x1 && streams.contains(&stream) {
                let status = match buf[9] {
                    0x88 => 200,
                    0x8c => 400,
                    0x8d => 404,
                    b => panic!("stream {stream}: unexpected first header byte {b:#x}"),
                };
                got.push((stream, status));
            }
            if buf[3] == 0x3 && streams.contains(&stream) {
                panic!("stream {stream} was reset");
            }
            buf.drain(..9 + len);
        }
        if got.len() == streams.len() {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp))
            .await
            .expect("h2 response in time")
            .unwrap();
        assert!(n > 0, "connection closed; got {got:?}");
        buf.extend_from_slice(&tmp[..n]);
    }
    got.sort_unstable();
    got
}

/// A `#` in an h2 `:path` is refused with 400, as on HTTP/1.1: the URI parser would drop the
/// fragment and forward a different request. The paths are hand-encoded (the h2 client
/// cannot send a `#`): a literal entering the dynamic table, the same entry indexed again,
/// and a Huffman-coded literal.
#[tokio::test]
async fn h2_fragment_in_path_is_refused() {
    use tokio::io::AsyncWriteExt;
    let a = start_backend("a").await;
    let bal = start_balancer(&config(&[a.addr], "round_robin", "")).await;
    let mut s = TcpStream::connect(bal.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // GET, http, :authority a.example (into the table), :path "/a#b" (into the table).
    let mut b1 = vec![0x82, 0x86, 0x41, 9];
    b1.extend_from_slice(b"a.example");
    b1.extend_from_slice(&[0x44, 4, b'/', b'a', b'#', b'b']);
    out.extend(frame(0x1, 0x5, 1, &b1));
    // The same :path by index (62), :authority by index (63).
    out.extend(frame(0x1, 0x5, 3, &[0x82, 0x86, 0xbf, 0xbe]));
    // Huffman "/a#a": '/'=011000 'a'=00011 '#'=111111111010 'a'=00011, padded with ones.
    let huff =
        (u32::from_str_radix("0110000001111111111101000011", 2).unwrap() << 4 | 0xf).to_be_bytes();
    let mut b5 = vec![0x82, 0x86, 0xbf, 0x04, 0x84];
    b5.extend_from_slice(&huff);
    out.extend(frame(0x1, 0x5, 5, &b5));
    // And a fine one, padded, on the same connection.
    let mut b7 = vec![2, 0x82, 0x86, 0xbf, 0x04, 3, b'/', b'o', b'k'];
    b7.extend_from_slice(&[0, 0]);
    out.extend(frame(0x1, 0x5 | 0x8, 7, &b7));
    s.write_all(&out).await.unwrap();
    let got = statuses(&mut s, &[1, 3, 5, 7]).await;
    assert_eq!(got, [(1, 400), (3, 400), (5, 400), (7, 200)]);
    assert_eq!(a.requests(), 1);
    assert_eq!(a.state.last_uri.lock().unwrap().as_deref(), Some("/ok"));
    bal.shutdown().await;
}
