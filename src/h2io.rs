//! The bytes of an upstream HTTP/2 connection, watched at frame level for what the h2 crate does not
//! tell: a GOAWAY from the backend (to stop using the connection at once), and streams h2
//! opens after it, which the backend will ignore (to refuse them on the spot). Written by the
//! connection's own task only (the h2 codec owns the I/O), so its state needs no sync;
//! the draining flag is the one thing shared, with `h2pool`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The I/O of an h2 connection, watched at frame level in both directions (only the 9-byte
/// frame headers and a GOAWAY's last-stream-id are read; payloads are skipped).
///
/// A GOAWAY from the backend flags the connection draining at once. And because h2 goes on
/// opening streams that were queued before it saw the GOAWAY, with ids above the
/// last-stream-id, which the backend ignores (RFC 9113 §6.8), every such stream written after
/// the GOAWAY is answered here with a RST_STREAM(REFUSED_STREAM) from the backend's side of
/// the stream: the truth (the backend will not process it), told at once instead of as a
/// connection error when the backend closes, so the request is sent again on another
/// connection instead of failing.
pub struct H2Io<T> {
    inner: T,
    read: Frames,
    write: Frames,
    /// Client connection preface bytes still to be written (they are not a frame).
    preface_left: usize,
    /// The lowest last-stream-id of the GOAWAYs received.
    goaway_last: Option<u32>,
    /// Streams written above `goaway_last` after it arrived, to refuse; and the highest one
    /// queued (trailers are HEADERS too, and a stream is refused once).
    refuse: VecDeque<u32>,
    refused_up_to: u32,
    draining: Arc<AtomicBool>,
    /// A write failed (reset, broken pipe) after a GOAWAY: the backend has closed. Writes
    /// are dropped from then on (see `poll_write`).
    gone: bool,
}

const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_GOAWAY: u8 = 0x7;
const REFUSED_STREAM: u32 = 0x7;
const PREFACE_LEN: usize = 24;
const RST_LEN: usize = 13;

/// What `Frames::feed` found.
enum Seen {
    Headers(u32),
    Goaway(u32),
}

/// Frame boundaries over one direction of an h2 byte stream.
#[derive(Default)]
struct Frames {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// A GOAWAY's last-stream-id being collected: bytes and how many.
    goaway: Option<([u8; 4], usize)>,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    fn feed(&mut self, mut bytes: &[u8], seen: &mut impl FnMut(Seen)) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                if let Some((buf, got)) = &mut self.goaway {
                    let take = (4 - *got).min(n);
                    buf[*got..*got + take].copy_from_slice(&bytes[..take]);
                    *got += take;
                    if *got == 4 {
                        seen(Seen::Goaway(u32::from_be_bytes(*buf) & 0x7fff_ffff));
                        self.goaway = None;
                    }
                }
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let h = self.head;
            self.left = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            match h[3] {
                FRAME_HEADERS => seen(Seen::Headers(id)),
                FRAME_GOAWAY if self.left >= 8 => self.goaway = Some(([0; 4], 0)),
                _ => {}
            }
        }
    }
}

impl<T> H2Io<T> {
    pub fn new(inner: T, draining: Arc<AtomicBool>) -> H2Io<T> {
        H2Io {
            inner,
            read: Frames::default(),
            write: Frames::default(),
            preface_left: PREFACE_LEN,
            goaway_last: None,
            refuse: VecDeque::new(),
            refused_up_to: 0,
            draining,
            gone: false,
        }
    }

    fn wrote(&mut self, mut bytes: &[u8], cx: &Context<'_>) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(bytes.len());
            self.preface_left -= n;
            bytes = &bytes[n..];
        }
        let (last, refuse, up_to) = (self.goaway_last, &mut self.refuse, &mut self.refused_up_to);
        self.write.feed(bytes, &mut |seen| {
            if let (Seen::Headers(id), Some(last)) = (seen, last) {
                if id > last && id > *up_to {
                    refuse.push_back(id);
                    *up_to = id;
                }
            }
        });
        if !self.refuse.is_empty() {
            // h2 reads after it writes, but make sure the refusal is read soon.
            cx.waker().wake_by_ref();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H2Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.at_boundary() && !this.refuse.is_empty() && buf.remaining() >= RST_LEN {
            while buf.remaining() >= RST_LEN {
                let Some(id) = this.refuse.pop_front() else {
                    break;
                };
                let mut frame = [0u8; RST_LEN];
                frame[2] = 4;
                frame[3] = FRAME_RST_STREAM;
                frame[5..9].copy_from_slice(&id.to_be_bytes());
                frame[9..13].copy_from_slice(&REFUSED_STREAM.to_be_bytes());
                buf.put_slice(&frame);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let (last, draining) = (&mut this.goaway_last, &this.draining);
            this.read.feed(&buf.filled()[before..], &mut |seen| {
                if let Seen::Goaway(id) = seen {
                    draining.store(true, Relaxed);
                    *last = Some(last.map_or(id, |l| l.min(id)));
                }
            });
        }
        r
    }
}

/// The backend closed after its GOAWAY, with our bytes unread: its kernel answers the next
/// write with a reset. h2 would take that write error as the connection's end and fail every
/// stream with it, before reading the GOAWAY still waiting in the receive buffer, which tells
/// which streams were never processed and may be sent again. So once a GOAWAY has come, such a
/// write error is swallowed: the bytes are counted as written (nobody will read them; streams
/// they open are refused like any others after the GOAWAY), and the read side goes on to hand
/// h2 the GOAWAY, then the end of the connection.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted)
}

impl<T> H2Io<T> {
    /// Whether a write that ended in `e` is to be taken as done (see `closed_by_peer`).
    fn swallow(&mut self, e: &std::io::Error) -> bool {
        if self.goaway_last.is_some() && closed_by_peer(e) {
            self.gone = true;
        }
        self.gone
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = if this.gone {
            Poll::Ready(Ok(buf.len()))
        } else {
            match Pin::new(&mut this.inner).poll_write(cx, buf) {
                Poll::Ready(Err(e)) if this.swallow(&e) => Poll::Ready(Ok(buf.len())),
                r => r,
            }
        };
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(&buf[..n], cx);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let all = || bufs.iter().map(|b| b.len()).sum();
        let r = if this.gone {
            Poll::Ready(Ok(all()))
        } else {
            match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
                Poll::Ready(Err(e)) if this.swallow(&e) => Poll::Ready(Ok(all())),
                r => r,
            }
        };
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let k = n.min(b.len());
                this.wrote(&b[..k], cx);
                n -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.gone {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) if this.swallow(&e) => Poll::Ready(Ok(())),
            r => r,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.gone {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 0, payload.len() as u8, kind, 0];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_are_found_across_arbitrary_splits() {
        let mut bytes = frame(0x4, 0, &[0; 6]);
        let mut goaway = 5u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&[0; 4]);
        bytes.extend(frame(FRAME_GOAWAY, 0, &goaway));
        bytes.extend(frame(FRAME_HEADERS, 7, &[1, 2, 3]));
        for split in 1..bytes.len() {
            let mut f = Frames::default();
            let mut found = Vec::new();
            for chunk in bytes.chunks(split) {
                f.feed(chunk, &mut |s| {
                    found.push(match s {
                        Seen::Headers(id) => ("headers", id),
                        Seen::Goaway(id) => ("goaway", id),
                    })
                });
            }
            assert_eq!(found, [("goaway", 5), ("headers", 7)], "split {split}");
            assert!(f.at_boundary());
        }
    }

    /// A backend that sends GOAWAY(last = 1) and closes with a reset while our bytes are
    /// unread: writes after that are taken as done, and the streams they open (3, 5) come
    /// back refused, so h2 sends them again rather than failing them with the reset.
    #[tokio::test]
    async fn writes_after_the_backend_left_its_goaway_refuse_their_streams() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut server, _) = accepted.unwrap();
        let mut goaway = 1u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&[0; 4]);
        server
            .write_all(&frame(FRAME_GOAWAY, 0, &goaway))
            .await
            .unwrap();
        let mut io = H2Io::new(client.unwrap(), Arc::new(AtomicBool::new(false)));
        io.preface_left = 0;
        let mut got = [0u8; 17];
        io.read_exact(&mut got).await.unwrap();
        assert!(io.draining.load(Relaxed));
        // Unread bytes in the backend's buffer make its close a reset.
        io.inner.write_all(&[0; 9]).await.unwrap();
        tokio::task::yield_now().await;
        server.set_zero_linger().unwrap();
        drop(server);
        for id in [3u32, 5] {
            tokio::task::yield_now().await;
            io.write_all(&frame(FRAME_HEADERS, id, &[0x82]))
                .await
                .expect("a write after the GOAWAY and the reset is taken as done");
            io.flush().await.unwrap();
        }
        let mut rst = [0u8; 2 * RST_LEN];
        io.read_exact(&mut rst).await.unwrap();
        for (k, id) in [3u32, 5].into_iter().enumerate() {
            let f = &rst[k * RST_LEN..(k + 1) * RST_LEN];
            assert_eq!(f[3], FRAME_RST_STREAM);
            assert_eq!(u32::from_be_bytes([f[5], f[6], f[7], f[8]]), id);
            assert_eq!(
                u32::from_be_bytes([f[9], f[10], f[11], f[12]]),
                REFUSED_STREAM
            );
        }
    }
}
