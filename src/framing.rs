//! Spotting ambiguous HTTP/1.1 framing that hyper hides from us.
//!
//! A request carrying both `Content-Length` and `Transfer-Encoding` must be refused (the
//! contract, and the classic request-smuggling vector), but hyper's parser silently drops the
//! `Content-Length` and hands us a plain chunked request. `Sniffer` wraps the client side of an
//! HTTP/1 connection and follows the byte stream the client sends, head by head and body by
//! body, before hyper reads it; it records the index of the first request that had both
//! headers (or a `#` in its target, which the URI parser would drop just as silently) in
//! `ConnInfo::ambiguous_at`, and `proxy::handle` answers that request `400` and closes.
//!
//! The sniffer only needs to find head boundaries: at anything it does not understand (an h2
//! preface, an upgrade, a malformed head that hyper will refuse itself) it stops looking.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::coalesce;
use crate::conn::{ConnInfo, IO_MID_MESSAGE};
use crate::h2path::Follower;

/// Heads longer than this are hyper's to refuse (431); the sniffer gives up on them.
const MAX_HEAD: usize = 128 * 1024;

enum State {
    /// Collecting a request head in `head`.
    Head,
    /// Skipping a body of known length.
    Body(u64),
    /// Inside a chunk-size line: value so far, and whether an extension started.
    ChunkSize {
        value: u64,
        ext: bool,
    },
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    ChunkDataEnd,
    /// Trailer section after the last chunk: length of the current line.
    Trailers(usize),
    /// An h2 connection (prior knowledge, or ALPN): its header blocks are followed for
    /// `#` in `:path`.
    H2(Box<Follower>),
    /// Not HTTP/1 heads any more (upgrade, garbage): pass bytes through.
    Off,
}

pub struct Sniffer<I> {
    inner: I,
    state: State,
    head: Vec<u8>,
    index: u64,
    info: Arc<ConnInfo>,
    /// Plain TCP: hyper shuts the write side down just before dropping the socket, and the
    /// close that follows sends the same FIN. TLS keeps it (close_notify), and so does a
    /// WebSocket tunnel, whose half-close the peer must see.
    skip_shutdown: bool,
    /// Mirrors `IO_MID_MESSAGE` in `ConnInfo::io_state`.
    mid_message: bool,
}

impl<I> Sniffer<I> {
    pub fn new(inner: I, info: Arc<ConnInfo>) -> Self {
        Sniffer {
            inner,
            state: State::Head,
            head: Vec::new(),
            index: 0,
            info,
            skip_shutdown: false,
            mid_message: false,
        }
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// Between two HTTP/1 messages: nothing of the next head has arrived, no body is left.
    fn between_messages(&self) -> bool {
        matches!(self.state, State::Head) && self.head.is_empty()
    }

    pub fn close_without_shutdown(mut self) -> Self {
        self.skip_shutdown = true;
        self
    }

    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::H2(f) => {
                    f.feed(buf, &self.info);
                    return;
                }
                State::Head if self.head.is_empty() => match head_end(buf, 0) {
                    // The usual case: the whole head arrived in one read; parse it in place.
                    Some(end) => {
                        self.state = self.classify(&buf[..end]);
                        buf = &buf[end..];
                    }
                    None => {
                        self.head
                            .extend_from_slice(&buf[..buf.len().min(MAX_HEAD + 1)]);
                        return;
                    }
                },
                State::Head => {
                    let before = self.head.len();
                    let take = buf.len().min((MAX_HEAD + 1).saturating_sub(before));
                    self.head.extend_from_slice(&buf[..take]);
                    match head_end(&self.head, before) {
                        Some(end) => {
                            buf = &buf[end - before..];
                            let head = std::mem::take(&mut self.head);
                            self.state = self.classify(&head[..end]);
                        }
                        None if self.head.len() > MAX_HEAD => {
                            self.state = State::Off;
                            self.head = Vec::new();
                            return;
                        }
                        None => return,
                    }
                }
                State::Body(n) => {
                    let k = (*n).min(buf.len() as u64);
                    *n -= k;
                    buf = &buf[k as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize { value, ext } => {
                    let b = buf[0];
                    buf = &buf[1..];
                    match b {
                        b'\n' => {
                            self.state = if *value == 0 {
                                State::Trailers(0)
                            } else {
                                State::ChunkData(*value)
                            };
                        }
                        b'\r' => {}
                        _ if *ext => {}
                        b';' | b' ' | b'\t' => *ext = true,
                        _ => match (b as char).to_digit(16) {
                            Some(d) if *value >> 60 == 0 => *value = (*value << 4) | u64::from(d),
                            // Overlong or not hex: hyper refuses the body; stop following.
                            _ => self.state = State::Off,
                        },
                    }
                }
                State::ChunkData(n) => {
                    let k = (*n).min(buf.len() as u64);
                    *n -= k;
                    buf = &buf[k as usize..];
                    if *n == 0 {
                        self.state = State::ChunkDataEnd;
                    }
                }
                State::ChunkDataEnd => {
                    let b = buf[0];
                    buf = &buf[1..];
                    if b == b'\n' {
                        self.state = State::ChunkSize {
                            value: 0,
                            ext: false,
                        };
                    }
                }
                State::Trailers(len) => {
                    let b = buf[0];
                    buf = &buf[1..];
                    match b {
                        b'\n' if *len == 0 => self.state = State::Head,
                        b'\n' => *len = 0,
                        b'\r' => {}
                        _ => *len += 1,
                    }
                }
            }
        }
    }

    /// Reads one complete head: notes ambiguous framing, and says how its body is framed.
    fn classify(&mut self, head: &[u8]) -> State {
        if self.index == 0 && head == b"PRI * HTTP/2.0\r\n\r\n" {
            return State::H2(Box::default());
        }
        if let Some(body) = plain_head(head) {
            self.index += 1;
            return if body == 0 {
                State::Head
            } else {
                State::Body(body)
            };
        }
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
            return State::Off;
        };
        let mut cl = false;
        let mut te: Option<bool> = None;
        let mut length: Option<u64> = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = true;
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        // A `#` in the target: the URI parser would silently drop the fragment, so the request
        // that reaches the backend would not be the one the client sent.
        let fragment = req.path.is_some_and(|p| p.contains('#'));
        if (cl && te.is_some()) || fragment {
            let _ = self
                .info
                .ambiguous_at
                .compare_exchange(u64::MAX, self.index, Relaxed, Relaxed);
        }
        self.index += 1;
        let method = req.method.unwrap_or("");
        if upgrade || method == "CONNECT" || method == "PRI" {
            return State::Off;
        }
        match (te, length, cl) {
            (Some(true), _, _) => State::ChunkSize {
                value: 0,
                ext: false,
            },
            (None, Some(0), true) | (None, _, false) => State::Head,
            (None, Some(n), true) => State::Body(n),
            // Not chunked-last, or an unparsable length: hyper answers 400 and closes.
            _ => State::Off,
        }
    }
}

/// Where the head ends (index just past the blank line), looking at bytes from `from - 3` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// The body length of a head that can be passed without a parse (`None`: parse it). Such a
/// head has no header line naming `Transfer-Encoding` or `Upgrade`, at most one naming
/// `Content-Length` with a value of plain digits, and a request line without `#` that is not
/// CONNECT or PRI. The full parse would find nothing to flag in it, and the same body length;
/// most requests are like it, GETs and POSTs alike, and it costs a scan instead of httparse
/// and a header loop (~1,000 instructions per request). A head that is not valid HTTP passes
/// too: hyper refuses it.
fn plain_head(head: &[u8]) -> Option<u64> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = &head[..end];
    if line.contains(&b'#') || line.starts_with(b"CONNECT ") || line.starts_with(b"PRI ") {
        return None;
    }
    let mut length = None;
    let mut rest = &head[end + 1..];
    while !rest.is_empty() {
        let eol = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let field = &rest[..eol];
        let named = |name: &[u8]| {
            field.len() > name.len()
                && field[..name.len()].eq_ignore_ascii_case(name)
                && field[name.len()] == b':'
        };
        if named(b"transfer-encoding") || named(b"upgrade") {
            return None;
        }
        if named(b"content-length") {
            // A second one, or anything but digits: the parse decides (and hyper refuses
            // what it cannot agree with).
            if length.is_some() {
                return None;
            }
            length = Some(digits(&field[b"content-length:".len()..])?);
        }
        rest = rest.get(eol + 1..).unwrap_or(&[]);
    }
    Some(length.unwrap_or(0))
}

/// A `Content-Length` value of 1 to 18 digits between optional spaces and tabs (and the
/// line's `\r`).
fn digits(value: &[u8]) -> Option<u64> {
    let value = value.strip_suffix(b"\r").unwrap_or(value);
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b))?;
    let end = value.iter().rposition(|b| !is_ows(b))? + 1;
    let value = &value[start..end];
    if value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

impl<I: AsyncRead + Unpin> AsyncRead for Sniffer<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if !matches!(this.state, State::Off) {
                this.feed(buf.filled().get(before..).unwrap_or(&[]));
            }
            let mid = !this.between_messages();
            if mid != this.mid_message {
                this.mid_message = mid;
                this.info.set_io(IO_MID_MESSAGE, mid);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sniffer<I> {
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
        coalesce::poll_write_vectored(Pin::new(&mut self.get_mut().inner), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.skip_shutdown && !this.info.upgraded.load(Relaxed) {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff(chunks: &[&[u8]]) -> u64 {
        let info = ConnInfo::new(
            "127.0.0.1:1".parse().unwrap(),
            None,
            std::time::Duration::from_secs(1),
            None,
        );
        let mut s = Sniffer::new((), Arc::clone(&info));
        for c in chunks {
            s.feed(c);
        }
        info.ambiguous_at.load(Relaxed)
    }

    #[test]
    fn finds_the_ambiguous_request_after_bodies() {
        let first = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let second = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext\r\nabc\r\n0\r\nTrailer: 1\r\n\r\n";
        let third = b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let all = [&first[..], &second[..], &third[..]].concat();
        assert_eq!(sniff(&[&all]), 2);
        // The same bytes one at a time.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(sniff(&bytes), 2);
    }

    #[test]
    fn a_fragment_in_the_target_is_flagged() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /a#b HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(sniff(&[req]), 1);
    }

    #[test]
    fn plain_heads_skip_the_parse_and_others_do_not() {
        assert_eq!(
            plain_head(b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: y\r\n\r\n"),
            Some(0)
        );
        // One Content-Length of plain digits: its length, without the parse.
        assert_eq!(
            plain_head(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"),
            Some(3)
        );
        assert_eq!(
            plain_head(b"POST / HTTP/1.1\r\ncontent-length:\t 65536 \r\n\r\n"),
            Some(65536)
        );
        assert_eq!(
            plain_head(b"POST / HTTP/1.1\nContent-Length: 0\n\n"),
            Some(0)
        );
        for h in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nTRANSFER-ENCODING: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(plain_head(h), None, "{}", String::from_utf8_lossy(h));
        }
        // A body after a plain head is the next head: followed the same as with the parse.
        let two = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(sniff(&[two]), 1);
        // The body a plain Content-Length announces is skipped, not read as a head: the
        // ambiguous head after it is the one flagged, at any split of the bytes.
        let all = b"POST / HTTP/1.1\r\nContent-Length: 29\r\n\r\nPOST /x HTTP/1.1\r\nHost: y\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(sniff(&[all]), 1);
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(sniff(&bytes), 1);
    }

    #[test]
    fn plain_requests_are_not_flagged() {
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(sniff(&[get]), u64::MAX);
        let te_first =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(sniff(&[te_first]), 0);
    }
}
