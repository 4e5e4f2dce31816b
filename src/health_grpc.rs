//! The gRPC health probe: `grpc.health.v1.Health/Check` (the standard health service that
//! grpc-go, grpc-java, tonic-health and Envoy's checker speak), for `kind = "grpc"`.
//!
//! Run by the health task of each backend (`health.rs`), over a connection of its own: HTTP/2
//! with prior knowledge, or h2 by ALPN when the pool has `tls`, whatever protocol the pool's
//! requests use. The two protobuf messages are a single field each, so they are encoded and
//! read here by hand rather than with a code generator: the binary carries no gRPC stack.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::grpc;
use crate::tls::UpstreamTlsConnector;

pub type Sender = http2::SendRequest<Full<Bytes>>;

const PATH: &str = "/grpc.health.v1.Health/Check";

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

/// A health answer is a few bytes; anything past this is not one.
const MAX_ANSWER: usize = 16 * 1024;

/// The probe's HTTP/2 connection: `conn` while it still takes requests, else a new one in its
/// place. Kept between probes (HTTP/2 carries them all on one connection); also what
/// `kind = "http"` probes use on pools that speak HTTP/2 to their backends.
pub async fn ready<'a>(
    backend: &Backend,
    tls: Option<&UpstreamTlsConnector>,
    limit: Duration,
    conn: &'a mut Option<Sender>,
) -> Result<&'a mut Sender, String> {
    if !conn.as_ref().is_some_and(|c| c.is_ready()) {
        *conn = None;
    }
    match conn {
        Some(tx) => Ok(tx),
        None => {
            let tx = connect(backend, tls, limit)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(conn.insert(tx))
        }
    }
}

/// One probe; `Ok` when the backend says SERVING for `service`.
pub async fn probe(
    backend: &Backend,
    service: &str,
    tls: Option<&UpstreamTlsConnector>,
    limit: Duration,
    user_agent: &'static str,
    conn: &mut Option<Sender>,
) -> Result<(), String> {
    let tx = ready(backend, tls, limit, conn).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri: Uri = format!("{scheme}://{}{PATH}", backend.address)
        .parse()
        .map_err(|e| format!("bad address for a URI: {e}"))?;
    let mut req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, HeaderValue::from_static(user_agent))
        .body(Full::new(request(service)))
        .map_err(|e| e.to_string())?;
    *req.version_mut() = http::Version::HTTP_2;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::OK {
        return Err(format!("status {}", resp.status().as_u16()));
    }
    // Trailers-only: the verdict is in the headers and there is no message.
    if let Some(code) = grpc::status_in(resp.headers()) {
        return Err(grpc_error(code, resp.headers()));
    }
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    let trailers = body.trailers().cloned().unwrap_or_default();
    match grpc::status_in(&trailers) {
        Some(Some(0)) => {}
        Some(code) => return Err(grpc_error(code, &trailers)),
        None => return Err("no grpc-status in the answer".into()),
    }
    let status = serving_status(&body.to_bytes())?;
    if status == SERVING {
        Ok(())
    } else {
        Err(format!("status {} ({status})", status_name(status)))
    }
}

fn grpc_error(code: Option<u32>, h: &http::HeaderMap) -> String {
    let msg = h
        .get(grpc::GRPC_MESSAGE)
        .and_then(|m| m.to_str().ok())
        .unwrap_or("");
    match code {
        Some(c) => format!("grpc-status {c} {msg}"),
        None => "unparsable grpc-status".into(),
    }
}

async fn connect(
    backend: &Backend,
    tls: Option<&UpstreamTlsConnector>,
    limit: Duration,
) -> Result<Sender, crate::upstream::BoxError> {
    let fut = async {
        let tcp = TcpStream::connect(backend.addr).await?;
        let _ = tcp.set_nodelay(true);
        let builder = http2::Builder::new(TokioExecutor::new());
        let tx = match tls {
            None => {
                let (tx, conn) = builder.handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(conn);
                tx
            }
            Some(tls) => {
                let stream = tls.connect_h2(&backend.address, tcp).await?;
                let (tx, conn) = builder.handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                tx
            }
        };
        Ok::<_, crate::upstream::BoxError>(tx)
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| crate::upstream::BoxError::from("connect timed out"))?
}

/// A gRPC message frame (uncompressed, length-prefixed) holding `HealthCheckRequest`:
/// `string service = 1`, left out when empty as proto3 does.
fn request(service: &str) -> Bytes {
    let mut msg = BytesMut::new();
    if !service.is_empty() {
        msg.put_u8(0x0a); // field 1, wire type 2 (length-delimited)
        put_varint(&mut msg, service.len() as u64);
        msg.put_slice(service.as_bytes());
    }
    let mut frame = BytesMut::with_capacity(5 + msg.len());
    frame.put_u8(0); // not compressed
    frame.put_u32(msg.len() as u32);
    frame.put_slice(&msg);
    frame.freeze()
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `HealthCheckResponse.status` (field 1, an enum) from the answer's one message frame;
/// absent is proto3's default, UNKNOWN (0). Other fields are skipped as protobuf says.
fn serving_status(body: &[u8]) -> Result<u64, String> {
    let bad = |what: &str| format!("malformed answer: {what}");
    let (head, rest) = body.split_at_checked(5).ok_or_else(|| bad("no message"))?;
    if head[0] != 0 {
        return Err(bad("compressed message"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut msg = rest
        .get(..len)
        .ok_or_else(|| bad("message shorter than its length"))?;
    let mut status = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg).ok_or_else(|| bad("field key"))?;
        let skip = match key & 7 {
            0 => {
                let v = varint(&mut msg).ok_or_else(|| bad("varint"))?;
                if key >> 3 == 1 {
                    status = v;
                }
                0
            }
            1 => 8,
            2 => varint(&mut msg).ok_or_else(|| bad("length"))? as usize,
            5 => 4,
            _ => return Err(bad("wire type")),
        };
        msg = msg.get(skip..).ok_or_else(|| bad("field past the end"))?;
    }
    Ok(status)
}

fn status_name(s: u64) -> &'static str {
    match s {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "unrecognised",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frames_the_service_name() {
        assert_eq!(&request("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &request("a.B")[..],
            &[0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
        let long = "x".repeat(200);
        let r = request(&long);
        // A length of 200 takes two varint bytes.
        assert_eq!(&r[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
    }

    #[test]
    fn answers_are_read_field_by_field() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Ok(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Ok(2));
        // proto3 leaves out a default value: UNKNOWN.
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Ok(0));
        // An unknown string field before the status is skipped.
        assert_eq!(
            serving_status(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 0x08, 1]),
            Ok(1)
        );
        for bad in [
            &[][..],
            &[0, 0, 0, 0],
            &[1, 0, 0, 0, 2, 0x08, 1],
            &[0, 0, 0, 0, 9, 0x08, 1],
            &[0, 0, 0, 0, 2, 0x08, 0x80],
            &[0, 0, 0, 0, 2, 0x12, 5],
            &[0, 0, 0, 0, 1, 0x0b],
        ] {
            assert!(serving_status(bad).is_err(), "{bad:?}");
        }
    }
}
