//! ALPN is binding (RFC 9113 §3.3, RFC 7301): after a TLS client chose `h2` the connection
//! speaks only HTTP/2; after `http/1.1`, or without ALPN, only HTTP/1.1. hyper-util's auto
//! builder picks the protocol from the first bytes whatever ALPN said (and its
//! `http1_only`/`http2_only` are ignored by `serve_connection_with_upgrades`), so the first
//! bytes are read here and checked against ALPN before hyper sees them again.
//!
//! A bad preface after `h2` gets the GOAWAY(PROTOCOL_ERROR) RFC 9113 §3.4 allows (hyper's h2
//! server would just drop the connection; h2spec 3.5 looks for it), after the empty SETTINGS
//! frame that must open the server's side.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame, then GOAWAY(last stream 0, PROTOCOL_ERROR).
const SETTINGS_THEN_GOAWAY: [u8; 9 + 17] = [
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, no parameters
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes of payload, stream 0
    0, 0, 0, 0, // last stream id
    0, 0, 0, 1, // PROTOCOL_ERROR
];

/// What a client sent first.
pub enum Opening<I> {
    /// The HTTP/2 client preface.
    H2(Replay<I>),
    /// Anything else (an HTTP/1 request, garbage).
    Other(Replay<I>),
    /// Nothing within the limit, or the connection ended.
    Gone,
}

/// How much the first read takes: a whole small request head, so hyper's HTTP/1 server finds
/// it in the replayed bytes and does not read the socket again for it.
const OPENING_READ: usize = 2048;

/// Reads the first bytes and tells the h2 preface from anything else, deciding at the first
/// byte that differs rather than waiting for 24 that may never come (a short HTTP/1 request,
/// garbage). The bytes read come back in front of the stream. `limit` bounds the wait; a
/// plaintext socket passes `None`, its `StallTimeout` already bounds the first byte.
///
/// This is the only protocol sniff: hyper-util's auto builder would read the socket once more
/// for its own (one syscall per connection) and keep both protocols' state in every
/// connection.
pub async fn read_opening<I>(mut io: I, limit: Option<Duration>) -> Opening<I>
where
    I: AsyncRead + Unpin,
{
    // On the heap and never zeroed: a buffer inside this future would be copied with it into
    // every connection's task, and cleared, for the few hundred bytes a request head needs.
    let mut buf = BytesMut::with_capacity(OPENING_READ);
    let read = async {
        loop {
            let room = OPENING_READ - buf.len();
            let k = io.read_buf(&mut (&mut buf).limit(room)).await.ok()?;
            if k == 0 {
                return None;
            }
            let n = buf.len();
            let seen = n.min(PREFACE.len());
            if buf[..seen] != PREFACE[..seen] {
                return Some(false);
            }
            if seen == PREFACE.len() {
                return Some(true);
            }
        }
    };
    let read = match limit {
        Some(l) => tokio::time::timeout(l, read).await.ok().flatten(),
        None => read.await,
    };
    let replay = |io| Replay {
        inner: io,
        prefix: buf.freeze(),
    };
    match read {
        Some(true) => Opening::H2(replay(io)),
        Some(false) => Opening::Other(replay(io)),
        None => Opening::Gone,
    }
}

/// After ALPN `h2`, anything but the preface: GOAWAY(PROTOCOL_ERROR), then close.
pub async fn refuse_as_h2<I: AsyncWrite + Unpin>(mut io: I, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        io.write_all(&SETTINGS_THEN_GOAWAY).await?;
        io.shutdown().await
    })
    .await;
}

/// After ALPN `http/1.1` (or none), the h2 preface: what hyper's HTTP/1 server answers a
/// `PRI * HTTP/2.0` request line with.
pub async fn refuse_as_http1<I: AsyncWrite + Unpin>(mut io: I, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        io.write_all(
            b"HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await?;
        io.shutdown().await
    })
    .await;
}

/// A stream whose first bytes read are those `read_opening` took off it (or that an HTTP/1
/// connection had read ahead when it was parked).
pub struct Replay<I> {
    inner: I,
    prefix: Bytes,
}

impl<I> Replay<I> {
    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// Puts `bytes` back in front of what is still to be replayed.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            [bytes, std::mem::take(&mut self.prefix)].concat().into()
        };
    }

    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let k = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(k));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Replay<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
