//! HTTP/2 to backends (`protocol = "h2c" | "h2"`): the config key, h1 and h2 clients through
//! h2 pools, TLS with ALPN, multiplexing onto few connections, GOAWAY and REFUSED_STREAM
//! resent for free, idle connections closed, a reload switching protocols under load, and
//! gRPC (all four call kinds, trailers and metadata) end to end.

mod common;
#[path = "common/grpc_backend.rs"]
mod grpc_backend;

use bytes::Bytes;
use grpc_backend::*;

use balancer::config::Protocol;
use balancer::{Config, ConfigError};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "f.toml", None)
}

const POOL_HEAD: &str =
    "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

#[test]
fn protocol_key_defaults_parses_and_is_checked_against_tls() {
    let c = parse(POOL_HEAD).unwrap();
    assert_eq!(c.pools[0].protocol, Protocol::Http1);
    for (v, p) in [("http1", Protocol::Http1), ("h2c", Protocol::H2c)] {
        let c = parse(&format!("{POOL_HEAD}protocol = \"{v}\"\n")).unwrap();
        assert_eq!(c.pools[0].protocol, p, "{v}");
    }
    let c = parse(&format!("{POOL_HEAD}protocol = \"h2\"\ntls = true\n")).unwrap();
    assert_eq!(c.pools[0].protocol, Protocol::H2);

    // h2 without tls: the key and the line of the value.
    let e = parse(&format!("{POOL_HEAD}protocol = \"h2\"\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
    assert!(e.msg.contains("tls"), "{e}");

    let e = parse(&format!("{POOL_HEAD}protocol = \"http2\"\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(5), "{e}");
    assert!(e.msg.contains("http2"), "{e}");

    let e = parse(&format!("{POOL_HEAD}protocol = \"h2c\"\ntls = true\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("pools.web.protocol"), "{e}");
}

#[test]
fn diff_names_a_protocol_change() {
    let old = parse(POOL_HEAD).unwrap();
    let new = parse(&format!("{POOL_HEAD}protocol = \"h2c\"\n")).unwrap();
    let d = balancer::diff::configs(&old, &new);
    let text = d.lines().join("\n");
    assert!(text.contains("pool web protocol http1 -> h2c"), "{text}");
}

/// The test services themselves, without the balancer: what the proxied tests compare with.
#[tokio::test]
async fn grpc_backend_serves_the_four_call_kinds_directly() {
    let be = start_grpc_backend(100).await;
    let mut c = grpc_client(be.addr).await;
    let r = unary(&mut c, tonic::Request::new(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert_eq!(r.get_ref(), &Bytes::from_static(b"hi"));
    let r = sum(&mut c, vec![1, 2, 3]).await.unwrap();
    assert_eq!(r.get_ref(), &Bytes::from_static(b"6"));
    let mut s = count(&mut c, tonic::Request::new(Bytes::from_static(b"3")))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m);
    }
    assert_eq!(got, ["0", "1", "2"]);
    assert_eq!(be.connections(), 1);
}
