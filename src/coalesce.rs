//! Small vectored writes leave as one plain write.
//!
//! hyper queues a response's head and its body as separate buffers and hands them over in
//! one `poll_write_vectored`; on a socket that is a `writev`. For a small response the kernel
//! spends more on `writev`'s own path (copying the iovec array in, the VFS checks around
//! it) than on the bytes: measured under `perf`, about 0.5 µs a request more than a `send`
//! of the same bytes, ~2% of a small keep-alive request. So writes whose buffers add up to at
//! most `SMALL` bytes are copied into one per-thread buffer and written with `poll_write`
//! (a `send`, as HAProxy does from its own buffer). Larger ones stay vectored: copying them
//! would cost more than it saves, and they are rare per request.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// The most bytes copied to avoid a `writev`: a small response's head and body. A copy of
/// this size costs well under the ~0.5 µs it saves.
const SMALL: usize = 4096;

thread_local! {
    /// Reused by every write on this thread: no allocation per write.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// `poll_write_vectored` for `w`, written as one plain write when it is a single buffer or
/// small enough to copy. Returns what the write took, in order across `bufs`, like
/// `poll_write_vectored`.
pub fn poll_write_vectored<W: AsyncWrite + ?Sized>(
    w: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut filled = bufs.iter().filter(|b| !b.is_empty());
    let (Some(_), Some(_)) = (filled.next(), filled.next()) else {
        // Zero or one buffer with bytes in it: nothing to gather.
        let one = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        return w.poll_write(cx, one);
    };
    let total = bufs.iter().map(|b| b.len()).sum::<usize>();
    if total > SMALL {
        return w.poll_write_vectored(cx, bufs);
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            s.clear();
            s.reserve(SMALL);
            for b in bufs {
                s.extend_from_slice(b);
            }
            w.poll_write(cx, &s)
        }
        // Not reachable through a socket's write, which never writes back through here;
        // vectored is still correct.
        Err(_) => w.poll_write_vectored(cx, bufs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Calls = Vec<(&'static str, Vec<u8>)>;

    /// Records each write as plain or vectored, taking at most `cap` bytes per call.
    struct Recorder {
        calls: Calls,
        cap: usize,
    }

    impl Recorder {
        fn take(&mut self, kind: &'static str, bytes: Vec<u8>) -> Poll<io::Result<usize>> {
            let n = bytes.len().min(self.cap);
            self.calls.push((kind, bytes[..n].to_vec()));
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().take("plain", buf.to_vec())
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.get_mut().take("vectored", all)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(bufs: &[&[u8]], cap: usize) -> (usize, Calls) {
        let mut w = Recorder {
            calls: Vec::new(),
            cap,
        };
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(n)) = poll_write_vectored(Pin::new(&mut w), &mut cx, &slices) else {
            panic!("the recorder is always ready");
        };
        (n, w.calls)
    }

    #[test]
    fn a_small_head_and_body_leave_as_one_plain_write() {
        let (n, calls) = write(&[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"hello"], usize::MAX);
        assert_eq!(n, 24);
        assert_eq!(
            calls,
            vec![("plain", b"HTTP/1.1 200 OK\r\n\r\nhello".to_vec())]
        );
    }

    #[test]
    fn one_buffer_among_empty_ones_is_written_as_it_is() {
        let big = vec![7u8; SMALL * 4];
        let (n, calls) = write(&[b"", &big, b""], usize::MAX);
        assert_eq!(n, big.len());
        assert_eq!(calls, vec![("plain", big)]);
    }

    #[test]
    fn large_writes_stay_vectored() {
        let body = vec![1u8; SMALL];
        let (n, calls) = write(&[b"head", &body], usize::MAX);
        assert_eq!(n, SMALL + 4);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "vectored");
    }

    #[test]
    fn a_short_write_reports_what_was_taken_in_order() {
        let (n, calls) = write(&[b"abc", b"defg"], 5);
        assert_eq!(n, 5);
        assert_eq!(calls, vec![("plain", b"abcde".to_vec())]);
    }

    /// Write calls that went through the VFS on this thread: `writev` and `write` count,
    /// `send` does not (it goes straight to the socket layer).
    fn vfs_writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        let line = io.lines().find(|l| l.starts_with("syscw:")).unwrap();
        line["syscw:".len()..].trim().parse().unwrap()
    }

    /// Against a real socket: a small head and body leave with no `writev`, while a large
    /// write still does one (which also shows the counter sees the difference).
    #[tokio::test(flavor = "current_thread")]
    async fn on_a_real_socket_a_small_response_is_a_send_and_a_large_one_a_writev() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut write = |bufs: &[&[u8]]| {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let before = vfs_writes();
            let Poll::Ready(Ok(n)) = poll_write_vectored(Pin::new(&mut client), &mut cx, &slices)
            else {
                panic!("an empty socket buffer takes a write at once");
            };
            (n, vfs_writes() - before)
        };

        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(write(&[head, b"hello"]), (head.len() + 5, 0));
        let body = vec![b'x'; SMALL];
        assert_eq!(write(&[head, &body]), (head.len() + SMALL, 1));

        let mut got = vec![0u8; 2 * head.len() + 5 + SMALL];
        server.read_exact(&mut got).await.unwrap();
        let want = [&head[..], b"hello", &head[..], &body].concat();
        assert!(got == want, "the bytes arrive whole and in order");
    }
}
