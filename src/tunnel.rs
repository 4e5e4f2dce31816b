//! WebSocket: recognising an HTTP/1.1 upgrade request and a backend's matching answer, and
//! the byte tunnel that replaces both connections' HTTP once the backend said `101`.

use std::sync::atomic::Ordering::Relaxed;

use http::header::{self, HeaderValue};
use http::{Method, Response, Version};

use crate::accesslog::{self, Ending, LogEntry};
use crate::backend::InFlight;
use crate::backend_io::Upgraded;
use crate::conn::ConnInfo;
use crate::headers::{has_token, strip_hop_by_hop};
use crate::response_body::ResponseBody;

/// The `Upgrade` value to forward when this is an HTTP/1.1 WebSocket handshake.
pub fn websocket_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.method != Method::GET {
        return None;
    }
    // `Upgrade` first: nearly every request lacks it (one missed lookup), while many carry a
    // `Connection` (`close`, `keep-alive`) whose tokens would be scanned for nothing.
    if !has_token(&parts.headers, header::UPGRADE, "websocket")
        || !has_token(&parts.headers, header::CONNECTION, "upgrade")
    {
        return None;
    }
    Some(HeaderValue::from_static("websocket"))
}

/// Completes a WebSocket handshake: answers the client's 101 and copies bytes both ways until
/// either side closes. The tunnel keeps the in-flight guard (least-connections sees it) and a
/// drain guard (graceful shutdown waits for it); it belongs to no config generation, so a
/// reload never touches it.
pub fn tunnel(
    mut parts: http::response::Parts,
    upstream: Upgraded,
    on_client: hyper::upgrade::OnUpgrade,
    guard: InFlight,
    log: Option<Box<LogEntry>>,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let upgrade = parts.headers.remove(header::UPGRADE);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    conn.upgraded.store(true, Relaxed);
    let drain = conn.drain.clone();
    let peer = conn.peer;
    tokio::spawn(async move {
        let _drain = drain;
        let _guard = guard;
        let mut log = log;
        match on_client.await {
            Ok(client) => {
                let client = hyper_util::rt::TokioIo::new(client);
                let (to_client, err) = splice(client, upstream).await;
                if let Some(e) = err {
                    tracing::debug!(%peer, error = %e, "tunnel ended with an error");
                }
                if let Some(l) = log.as_deref_mut() {
                    l.bytes = to_client;
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade did not complete"),
        }
        if let Some(mut l) = log {
            l.outcome = Ending::Upgraded;
            accesslog::write(l);
        }
    });
    Response::from_parts(parts, ResponseBody::empty())
}

/// How long the other direction of a tunnel may go on once one side has closed (a WebSocket
/// close handshake finishing), before both sockets are closed.
const TUNNEL_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Copies both ways until one side closes or fails, then gives the other direction
/// `TUNNEL_LINGER` to finish. Unlike `copy_bidirectional`, a peer that never closes its half
/// cannot keep the tunnel (and the backend's in-flight slot) once the other side is gone.
/// Returns the bytes sent to the client and the first error.
async fn splice<C, U>(client: C, upstream: U) -> (u64, Option<std::io::Error>)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    async fn pump<R, W>(mut r: R, mut w: W, n: &mut u64) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let k = r.read(&mut buf).await?;
            if k == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..k]).await?;
            w.flush().await?;
            *n += k as u64;
        }
    }
    let (cr, cw) = tokio::io::split(client);
    let (ur, uw) = tokio::io::split(upstream);
    let (mut to_client, mut to_upstream) = (0u64, 0u64);
    let err = {
        let down = pump(ur, cw, &mut to_client);
        let up = pump(cr, uw, &mut to_upstream);
        tokio::pin!(down, up);
        let (first, rest) = tokio::select! {
            r = &mut down => (r, tokio::time::timeout(TUNNEL_LINGER, &mut up).await),
            r = &mut up => (r, tokio::time::timeout(TUNNEL_LINGER, &mut down).await),
        };
        first.err().or(rest.ok().and_then(|r| r.err()))
    };
    (to_client, err)
}
