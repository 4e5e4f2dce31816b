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
