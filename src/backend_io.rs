//! A connection to a backend, plain TCP or TLS, as one type: what the HTTP/1.1 exchange
//! reads and writes, what the idle pool keeps, and what a WebSocket tunnel splices.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::coalesce;

pub enum BackendIo {
    Plain(TcpStream),
    // Boxed: a TLS session is ~1 KiB, most pools are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            BackendIo::Plain(t) => t,
            BackendIo::Tls(t) => t.get_ref().0,
        }
    }

    /// Whether an idle connection can still carry a request: nothing to read on it. A backend
    /// that closed it (EOF), reset it, or sent bytes nobody asked for (a late `408`, a TLS
    /// alert) makes it unusable. One non-blocking peek, so a request never goes out on a
    /// connection already known to be dead.
    pub fn is_open(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        self.tcp().poll_peek(&mut cx, &mut buf).is_pending()
    }
}

impl AsyncRead for BackendIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_read(cx, buf),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_write(cx, b),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendIo::Plain(t) => coalesce::poll_write_vectored(Pin::new(t), cx, bufs),
            BackendIo::Tls(t) => coalesce::poll_write_vectored(Pin::new(t.as_mut()), cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendIo::Plain(t) => t.is_write_vectored(),
            BackendIo::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_flush(cx),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendIo::Plain(t) => Pin::new(t).poll_shutdown(cx),
            BackendIo::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A backend connection after a `101 Switching Protocols`: the bytes the backend sent right
/// behind the response head come first, then the socket.
pub struct Upgraded {
    pub io: BackendIo,
    pub early: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.has_remaining() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
