//! HTTP/1.1 to a backend, driven by the request's own task.
//!
//! Why not hyper's client: it runs a task per backend connection and reaches it through a
//! channel. At 1000 connections that task, its channel blocks (~17 KB per connection) and its
//! two 8 KiB buffers were most of the memory every request walked through. Here the request's
//! task writes the head, reads the response head, and the response body (this same
//! `Exchange`) reads the rest as the client takes it. A pooled idle connection is its socket
//! alone: the read buffer is allocated when a request goes out and freed with its response.
//!
//! What goes out (RFC 9112), as hyper's client sent it: `METHOD target HTTP/1.1`, the headers
//! as the proxy left them (lower-case names), and the framing the body asks for (`framing`).
//! Client trailers are dropped: the proxy strips `Trailer`, so no backend was told to expect
//! them.
//!
//! What comes back: 1xx answers other than `101` are skipped. The body is framed by
//! `Transfer-Encoding: chunked` (trailers become a trailers frame), else `Content-Length`,
//! else the connection's end. None for HEAD, `204` and `304`. The connection goes back to the
//! pool only when both messages ended cleanly, no stray byte followed, and the backend kept
//! it alive (`Connection: close`, HTTP/1.0 without keep-alive, and close-delimited or
//! doubly-framed bodies end it).
//!
//! The request body keeps streaming while the response comes (a backend may answer first,
//! or echo); a backend that answers and stops reading is not an error: what is left of the
//! body is dropped and the connection is not reused.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::backend_io::{BackendIo, Upgraded};
use crate::forwarded::Forwarded;
use crate::idle::Conn;
use crate::reason::Failure;
use crate::request_body::{BodyError, Replayed, UpBody};

/// The largest response head accepted; a longer one is a protocol error (502).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Reads start this large and double while they fill the buffer, up to `MAX_READ`: a small
/// answer costs one small buffer, a large body is read in few system calls.
const FIRST_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// A request body frame this short is copied behind its chunk line (one small write); a
/// longer one is written from where it is, with `writev`.
const COPY_BELOW: usize = 1024;
/// The longest chunk-size line (extensions included) and trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 64;

/// How an exchange with a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("backend closed the connection before the response was complete")]
    Closed,
    #[error("backend connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("invalid response from backend: {0}")]
    Protocol(&'static str),
    /// The client's request body failed while it was being forwarded.
    #[error(transparent)]
    Body(BodyError),
}

impl H1Error {
    /// For the backend's record: bytes that are not HTTP are a protocol error, a message cut
    /// short (EOF, reset) is a reset.
    pub fn failure(&self) -> Failure {
        match self {
            H1Error::Protocol(_) => Failure::UpstreamProtocol,
            H1Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => Failure::UpstreamProtocol,
            H1Error::Closed | H1Error::Io(_) | H1Error::Body(_) => Failure::UpstreamReset,
        }
    }

    /// The backend closed or reset the connection: on a pooled connection before any byte of
    /// the answer, that is the keep-alive close race, not a sick backend.
    fn is_close(&self) -> bool {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        match self {
            H1Error::Closed => true,
            H1Error::Io(e) => matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted),
            _ => false,
        }
    }
}

/// Why `exchange` returned no response.
pub enum ExchangeError {
    /// Not one byte of the request was written: its body comes back, and the request can go
    /// anywhere else as it is.
    NotSent(UpBody),
    Failed {
        error: H1Error,
        /// A pooled connection that the backend closed as we reused it.
        stale: bool,
    },
}

/// Sends `req` on `conn` and reads the response head. The response's body is the exchange
/// itself, which reads the rest and gives the connection back (`into_idle`) if it can carry
/// another request.
///
/// The head is borrowed: the caller keeps it, so that a bodiless request that fails before
/// its answer can be sent again without a copy made in advance for every request.
///
/// HTTP/1.1 requires Host: a request that came without one (HTTP/1.0, or h2 without
/// `:authority`) is sent `default_host` (the backend's address, like nginx's `$proxy_host`),
/// on the wire only, so a head handed back for a retry is still the client's. `fwd` (the
/// X-Forwarded-* fields) is written after the head's own fields, likewise on the wire only.
pub async fn exchange(
    conn: Conn,
    head: &request::Parts,
    fwd: Option<&Forwarded>,
    default_host: &str,
    body: UpBody,
    reused: bool,
) -> Result<Response<Exchange>, ExchangeError> {
    let framing = framing(&head.method, &body);
    let host = (!head.headers.contains_key(header::HOST)).then_some(default_host);
    let Conn { io, transport } = conn;
    let mut x = Exchange {
        io,
        transport,
        rbuf: BytesMut::new(),
        read_size: FIRST_READ,
        out: Out {
            buf: encode_head(head, host, fwd, framing),
            ..Out::default()
        },
        body: None,
        flushed: false,
        write_error: None,
        decoder: Decoder::Done,
        head_only: head.method == Method::HEAD,
        reusable: true,
        answered: false,
        streaming: false,
        broken: None,
        options: ConnOptions::default(),
    };
    // A body that is not framed (GET of unknown length) is not sent, but a retry gets it back.
    let mut unframed = None;
    match framing {
        Some(f) => x.body = Some((body, f)),
        None => unframed = Some(body),
    }
    // A body frame that is already here (the client's head and body came in one read) goes
    // out in the head's write: one system call and one segment instead of two.
    let early = match poll_fn(|cx| Poll::Ready(x.take_ready(cx))).await {
        Ok(early) => early,
        Err(error) => {
            return Err(ExchangeError::Failed {
                error,
                stale: false,
            })
        }
    };
    // The first write shows a connection the backend already reset; the request is then
    // still whole and goes elsewhere.
    match poll_fn(|cx| x.out.poll_write_once(&mut x.io, cx)).await {
        Ok(n) if n > 0 => x.out.advance(n),
        _ => return Err(ExchangeError::NotSent(x.give_back(early, unframed))),
    }
    let head = poll_fn(|cx| x.poll_head(cx)).await;
    let head = match head.and_then(|h| x.start_body(&h).map(|()| h)) {
        Ok(h) => h,
        Err(error) => {
            let stale = reused && !x.answered && error.is_close();
            return Err(ExchangeError::Failed { error, stale });
        }
    };
    Ok(head.map(|()| x))
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy)]
enum Framing {
    /// `content-length`; the bytes still to send.
    Length(u64),
    Chunked,
}

/// As hyper's client framed it: the length when it is known, else chunked (not for GET,
/// HEAD and CONNECT, whose bodies of unknown length are dropped). An empty body is sent
/// without framing, except that POST, PUT and PATCH say `content-length: 0`, as RFC 9110
/// §8.6 asks of a method that defines a meaning for content (hyper's client sent nothing,
/// and some servers answer a POST without a length with `411`).
fn framing(method: &Method, body: &UpBody) -> Option<Framing> {
    if body.is_end_stream() {
        let payload = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
        return payload.then_some(Framing::Length(0));
    }
    if let Some(n) = body.size_hint().exact() {
        return Some(Framing::Length(n));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return None;
    }
    Some(Framing::Chunked)
}

fn encode_head(
    head: &request::Parts,
    host: Option<&str>,
    fwd: Option<&Forwarded>,
    framing: Option<Framing>,
) -> BytesMut {
    // A configured address, but never a byte that would end the field early.
    let host = host.filter(|h| h.bytes().all(|b| b >= 0x20 && b != 0x7f));
    let uri = &head.uri;
    let origin = match (uri.scheme(), uri.path_and_query()) {
        (None, Some(pq)) => Some(pq.as_str()),
        _ => None,
    };
    let method = head.method.as_str();
    let mut len = method.len()
        + origin.map_or(64, str::len)
        + host.map_or(0, str::len)
        + fwd.map_or(0, Forwarded::encoded_len)
        + 64;
    for (k, v) in &head.headers {
        len += k.as_str().len() + v.len() + 4;
    }
    let mut b = BytesMut::with_capacity(len);
    b.put_slice(method.as_bytes());
    b.put_u8(b' ');
    match origin {
        Some(t) => b.put_slice(t.as_bytes()),
        // Absolute or authority form, as given.
        None => b.put_slice(uri.to_string().as_bytes()),
    }
    b.put_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host {
        b.put_slice(b"host: ");
        b.put_slice(h.as_bytes());
        b.put_slice(b"\r\n");
    }
    for (k, v) in &head.headers {
        b.put_slice(k.as_str().as_bytes());
        b.put_slice(b": ");
        b.put_slice(v.as_bytes());
        b.put_slice(b"\r\n");
    }
    if let Some(f) = fwd {
        f.put(&mut b);
    }
    match framing {
        Some(Framing::Length(n)) => {
            b.put_slice(b"content-length: ");
            put_decimal(&mut b, n);
            b.put_slice(b"\r\n");
        }
        Some(Framing::Chunked) => b.put_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    b.put_slice(b"\r\n");
    b
}

fn put_decimal(b: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[i..]);
}

fn put_hex(b: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[i..]);
}

/// Request bytes waiting to be written, in order: `buf` (head, chunk line, small data),
/// `data` (a large frame, not copied), `tail` (its chunk's CRLF).
#[derive(Default)]
struct Out {
    buf: BytesMut,
    data: Bytes,
    tail: &'static [u8],
}

impl Out {
    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.data.is_empty() && self.tail.is_empty()
    }

    fn poll_write(&mut self, io: &mut BackendIo, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let n = ready!(self.poll_write_once(io, cx))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// One write of what is queued; the caller advances by what it took.
    fn poll_write_once(&self, io: &mut BackendIo, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let parts = [
            io::IoSlice::new(&self.buf),
            io::IoSlice::new(&self.data),
            io::IoSlice::new(self.tail),
        ];
        Pin::new(&mut *io).poll_write_vectored(cx, &parts)
    }

    /// Queues one data frame in its framing; false when it overruns the declared length.
    fn queue(&mut self, framing: &mut Framing, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        let tail: &'static [u8] = match framing {
            Framing::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return false;
                }
                *left -= n;
                b""
            }
            Framing::Chunked => {
                put_hex(&mut self.buf, data.len() as u64);
                self.buf.put_slice(b"\r\n");
                b"\r\n"
            }
        };
        if data.len() < COPY_BELOW {
            self.buf.put_slice(&data);
            self.buf.put_slice(tail);
        } else {
            self.data = data;
            self.tail = tail;
        }
        true
    }

    fn advance(&mut self, mut n: usize) {
        let k = n.min(self.buf.len());
        self.buf.advance(k);
        n -= k;
        let k = n.min(self.data.len());
        self.data.advance(k);
        n -= k;
        self.tail = &self.tail[n.min(self.tail.len())..];
    }
}

/// Where the response body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    /// `Content-Length`: bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Eof,
    Done,
    /// `101 Switching Protocols`: the connection is no longer HTTP (`into_upgraded`).
    Upgrade,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

enum Step {
    Frame(Frame<Bytes>),
    End,
    More,
}

/// One request and its response on one backend connection; after the head, the response
/// body.
pub struct Exchange {
    io: BackendIo,
    transport: u64,
    rbuf: BytesMut,
    read_size: usize,
    out: Out,
    /// The client's body still to send.
    body: Option<(UpBody, Framing)>,
    /// Everything written has been flushed (TLS buffers records).
    flushed: bool,
    /// Writing failed: the backend may still have answered (and closed), so this is only
    /// reported if no answer comes.
    write_error: Option<io::Error>,
    decoder: Decoder,
    head_only: bool,
    /// The connection may carry another request once both messages are complete.
    reusable: bool,
    /// A byte of the answer came.
    answered: bool,
    /// A body frame went out and the server has not been left to flush it yet.
    streaming: bool,
    /// The body broke right behind a frame: reported at the next poll.
    broken: Option<H1Error>,
    /// What the last head's `Connection` fields said.
    options: ConnOptions,
}

/// The connection options of a response head, read while it is parsed. Nearly every
/// backend answers with `Connection: keep-alive`: a field naming nothing but `close` and
/// `keep-alive`, and `Keep-Alive` itself, never go into the header map, so the hop-by-hop
/// strip on the way to the client has nothing to remove (~850 instructions per request,
/// callgrind). A field naming anything else stays, for that strip to act on.
#[derive(Debug, Default, Clone, Copy)]
struct ConnOptions {
    close: bool,
    keep_alive: bool,
}

impl ConnOptions {
    /// Notes a field's options; true if the field is to be left out of the map.
    fn take(&mut self, name: &[u8], value: &[u8]) -> bool {
        if name.eq_ignore_ascii_case(b"keep-alive") {
            return true;
        }
        if !name.eq_ignore_ascii_case(b"connection") {
            return false;
        }
        let mut only_options = true;
        for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                only_options = false;
            }
        }
        only_options
    }
}

impl Exchange {
    /// Writes what it can of the request: the bytes queued, then the body's frames. Only a
    /// failure of the client's body is returned; the backend's write errors are kept.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        loop {
            if !self.out.is_empty() {
                self.flushed = false;
                match self.out.poll_write(&mut self.io, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        self.write_failed(e);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(())) => {}
                }
            }
            let Some((body, _)) = self.body.as_mut() else {
                if !self.flushed {
                    if let Err(e) = ready!(Pin::new(&mut self.io).poll_flush(cx)) {
                        self.write_failed(e);
                    }
                    self.flushed = true;
                }
                return Poll::Ready(Ok(()));
            };
            let frame = ready!(Pin::new(body).poll_frame(cx));
            if let Err(e) = self.take(frame) {
                return Poll::Ready(Err(e));
            }
        }
    }

    /// Takes what the client's body gave into `out`: a data frame in its framing, or the end.
    fn take(&mut self, frame: Option<Result<Frame<Bytes>, BodyError>>) -> Result<(), H1Error> {
        let Some((_, framing)) = self.body.as_mut() else {
            return Ok(());
        };
        match frame {
            Some(Ok(frame)) => {
                // Trailers are dropped (see the module's comment).
                if let Ok(data) = frame.into_data() {
                    if !self.out.queue(framing, data) {
                        // More than the declared length: the request cannot be framed.
                        self.body = None;
                        self.reusable = false;
                        return Err(H1Error::Closed);
                    }
                }
            }
            None => {
                match framing {
                    Framing::Chunked => self.out.buf.put_slice(b"0\r\n\r\n"),
                    // Shorter than declared: hyper's own decoder reports a client that
                    // stopped early before this; never reuse a connection left mid-body.
                    Framing::Length(left) if *left != 0 => self.reusable = false,
                    Framing::Length(_) => {}
                }
                self.body = None;
            }
            Some(Err(e)) => {
                self.body = None;
                self.reusable = false;
                return Err(H1Error::Body(e));
            }
        }
        Ok(())
    }

    /// Takes a body frame that is ready now, without waiting; returns its data (a cheap
    /// copy of the handle) so that a request that was never sent can have it back.
    fn take_ready(&mut self, cx: &mut Context<'_>) -> Result<Option<Bytes>, H1Error> {
        let Some((body, _)) = self.body.as_mut() else {
            return Ok(None);
        };
        let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) else {
            return Ok(None);
        };
        let data = match &frame {
            Some(Ok(f)) => f.data_ref().cloned(),
            _ => None,
        };
        self.take(frame)?;
        Ok(data)
    }

    /// The client's body as it was before this exchange: what `take_ready` took, then the
    /// rest.
    fn give_back(mut self, early: Option<Bytes>, unframed: Option<UpBody>) -> UpBody {
        let rest = self.body.take().map(|(b, _)| b).or(unframed);
        match early {
            None => rest.unwrap_or(UpBody::Empty),
            Some(data) => UpBody::Replayed(Box::new(Replayed {
                sent: VecDeque::from([data]),
                rest,
                trailers: None,
            })),
        }
    }

    fn write_failed(&mut self, e: io::Error) {
        self.write_error = Some(e);
        self.body = None;
        self.out = Out::default();
        self.flushed = true;
        self.reusable = false;
    }

    /// Reads into the buffer; `Ok(0)` is the backend's EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.rbuf.capacity() - self.rbuf.len();
        if spare < self.read_size / 4 {
            self.rbuf.reserve(self.read_size);
        }
        let spare = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        if n > 0 {
            self.answered = true;
            if n >= spare && self.read_size < MAX_READ {
                self.read_size *= 2;
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Sends the request while waiting for the response head (1xx answers skipped, but `101`).
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, H1Error>> {
        loop {
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if let Some(head) = self.parse_head()? {
                if head.status().is_informational()
                    && head.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            if self.rbuf.len() >= MAX_HEAD {
                return Poll::Ready(Err(H1Error::Protocol("response head too large")));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(self
                    .write_error
                    .take()
                    .map_or(H1Error::Closed, H1Error::Io)));
            }
        }
    }

    fn parse_head(&mut self) -> Result<Option<Response<()>>, H1Error> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        // Offsets of each name and value in the head, taken while httparse borrows the
        // buffer, so the values can then share the head's bytes instead of being copied.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (len, code, minor, count) = {
            // Uninitialised: initialising 100 fields (3.2 KB) per response cost more than
            // parsing a typical head.
            let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut r,
                &self.rbuf,
                &mut fields,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(H1Error::Protocol("too many response headers"))
                }
                Err(_) => return Err(H1Error::Protocol("malformed response head")),
            };
            let base = self.rbuf.as_ptr() as usize;
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            for (span, f) in spans.iter_mut().zip(r.headers.iter()) {
                let (n, v) = (f.name.as_bytes(), f.value);
                *span = (at(n), at(n) + n.len() as u32, at(v), at(v) + v.len() as u32);
            }
            (
                len,
                r.code.unwrap_or(0),
                r.version.unwrap_or(1),
                r.headers.len(),
            )
        };
        let head = self.rbuf.split_to(len).freeze();
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Protocol("invalid status code"))?;
        let mut headers = HeaderMap::with_capacity(count);
        self.options = ConnOptions::default();
        for &(ns, ne, vs, ve) in &spans[..count] {
            let name = &head[ns as usize..ne as usize];
            if self.options.take(name, &head[vs as usize..ve as usize]) {
                continue;
            }
            let name = HeaderName::from_bytes(name)
                .map_err(|_| H1Error::Protocol("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
                .map_err(|_| H1Error::Protocol("invalid header value"))?;
            headers.append(name, value);
        }
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *resp.headers_mut() = headers;
        Ok(Some(resp))
    }

    /// How the body after this head is framed, and whether the connection may be kept.
    fn start_body(&mut self, head: &Response<()>) -> Result<(), H1Error> {
        let h = head.headers();
        self.reusable &= if head.version() == Version::HTTP_11 {
            !self.options.close
        } else {
            self.options.keep_alive
        };
        let status = head.status();
        self.decoder = if status == StatusCode::SWITCHING_PROTOCOLS {
            self.reusable = false;
            Decoder::Upgrade
        } else if self.head_only
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Decoder::Done
        } else if h.contains_key(header::TRANSFER_ENCODING) {
            // With a Content-Length too, the message is refused (`classify`) and the
            // connection not trusted again.
            if h.contains_key(header::CONTENT_LENGTH) {
                self.reusable = false;
            }
            if is_chunked(h) {
                Decoder::Chunked(Chunk::Size)
            } else {
                self.reusable = false;
                Decoder::Eof
            }
        } else {
            match content_length(h)? {
                Some(0) => Decoder::Done,
                Some(n) => Decoder::Length(n),
                None => {
                    self.reusable = false;
                    Decoder::Eof
                }
            }
        };
        Ok(())
    }

    /// The next piece of the body from what is buffered.
    fn decode(&mut self) -> Result<Step, H1Error> {
        loop {
            match self.decoder {
                Decoder::Done | Decoder::Upgrade => return Ok(Step::End),
                Decoder::Length(left) => {
                    if self.rbuf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = left.min(self.rbuf.len() as u64);
                    self.decoder = if n == left {
                        Decoder::Done
                    } else {
                        Decoder::Length(left - n)
                    };
                    let data = self.rbuf.split_to(n as usize).freeze();
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Decoder::Eof => {
                    if self.rbuf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Frame(Frame::data(self.rbuf.split().freeze())));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(size) = self.chunk_size()? else {
                        return Ok(Step::More);
                    };
                    self.decoder = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(left)) => {
                    if self.rbuf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = left.min(self.rbuf.len() as u64);
                    self.decoder = Decoder::Chunked(if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    });
                    let data = self.rbuf.split_to(n as usize).freeze();
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if self.rbuf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &self.rbuf[..2] != b"\r\n" {
                        return Err(H1Error::Protocol("chunk data not followed by CRLF"));
                    }
                    self.rbuf.advance(2);
                    self.decoder = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => return self.trailers(),
            }
        }
    }

    /// Parses a chunk-size line (`1a;ext=v\r\n`) once it is all buffered.
    fn chunk_size(&mut self) -> Result<Option<u64>, H1Error> {
        let window = &self.rbuf[..self.rbuf.len().min(MAX_CHUNK_LINE)];
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            if self.rbuf.len() >= MAX_CHUNK_LINE {
                return Err(H1Error::Protocol("chunk-size line too long"));
            }
            return Ok(None);
        };
        let bad = || H1Error::Protocol("invalid chunk size");
        if lf == 0 || window[lf - 1] != b'\r' {
            return Err(bad());
        }
        let line = &window[..lf - 1];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return Err(bad());
        }
        let mut size = 0u64;
        for &b in &line[..digits] {
            let d = (b as char).to_digit(16).ok_or_else(bad)?;
            size = (size << 4) | u64::from(d);
        }
        // Whitespace before an extension, as hyper accepts; nothing else but the extension.
        let rest = &line[digits..];
        let rest = &rest[rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count()..];
        if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
            return Err(bad());
        }
        self.rbuf.advance(lf + 1);
        Ok(Some(size))
    }

    /// The trailer section after the last chunk, ending the body.
    fn trailers(&mut self) -> Result<Step, H1Error> {
        if self.rbuf.len() < 2 {
            return Ok(Step::More);
        }
        if &self.rbuf[..2] == b"\r\n" {
            self.rbuf.advance(2);
            self.decoder = Decoder::Done;
            return Ok(Step::End);
        }
        let window = &self.rbuf[..self.rbuf.len().min(MAX_TRAILERS)];
        let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.rbuf.len() >= MAX_TRAILERS {
                return Err(H1Error::Protocol("trailers too large"));
            }
            return Ok(Step::More);
        };
        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
        let map = match httparse::parse_headers(&window[..end + 4], &mut fields) {
            Ok(httparse::Status::Complete((_, fields))) => {
                let mut map = HeaderMap::with_capacity(fields.len());
                for f in fields.iter() {
                    let name = HeaderName::from_bytes(f.name.as_bytes());
                    let value = HeaderValue::from_bytes(f.value);
                    if let (Ok(n), Ok(v)) = (name, value) {
                        map.append(n, v);
                    } else {
                        return Err(H1Error::Protocol("invalid trailer"));
                    }
                }
                map
            }
            _ => return Err(H1Error::Protocol("invalid trailers")),
        };
        self.rbuf.advance(end + 4);
        self.decoder = Decoder::Done;
        Ok(Step::Frame(Frame::trailers(map)))
    }

    /// The connection, if it can carry another request: both messages complete, nothing
    /// unread, and the backend did not ask to close.
    pub fn into_idle(self) -> Option<Conn> {
        let clean = self.decoder == Decoder::Done
            && self.reusable
            && self.body.is_none()
            && self.out.is_empty()
            && self.write_error.is_none()
            && self.rbuf.is_empty();
        clean.then_some(Conn {
            io: self.io,
            transport: self.transport,
        })
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            if self.body.is_some() || !self.out.is_empty() {
                if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match self.decode() {
                Ok(Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if self.decoder == Decoder::Eof => {
                    self.decoder = Decoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(H1Error::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(H1Error::Io(e)))),
            }
        }
    }

    /// The backend answered `101 Switching Protocols`.
    pub fn is_upgrade(&self) -> bool {
        self.decoder == Decoder::Upgrade
    }

    /// After a `101` (`is_upgrade`): the socket, with what the backend sent behind the head.
    pub fn into_upgraded(self) -> Upgraded {
        Upgraded {
            io: self.io,
            early: self.rbuf.freeze(),
        }
    }
}

impl Body for Exchange {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.broken.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let polled = this.poll_body(cx);
        match polled {
            Poll::Ready(Some(Err(e))) if this.streaming => {
                // The data before the break is still in the server's write buffer, and an
                // error now would abort the connection without flushing it: yield once so
                // the client gets the bytes that did arrive, then report the break.
                this.broken = Some(e);
                this.streaming = false;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Ok(_))) => {
                this.streaming = true;
                polled
            }
            Poll::Pending => {
                this.streaming = false;
                polled
            }
            _ => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done | Decoder::Upgrade)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done | Decoder::Upgrade => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// `Transfer-Encoding` whose last coding is `chunked`.
fn is_chunked(h: &HeaderMap) -> bool {
    h.get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// The response's length: every `Content-Length` value (lists included) must be the same
/// number, or the message cannot be framed.
fn content_length(h: &HeaderMap) -> Result<Option<u64>, H1Error> {
    let mut len = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(H1Error::Protocol("invalid content-length"));
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if len.is_some_and(|l| l != n) {
                return Err(H1Error::Protocol("conflicting content-length values"));
            }
            len = Some(n);
        }
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_full() {
        let mut b = BytesMut::new();
        put_decimal(&mut b, 0);
        b.put_u8(b' ');
        put_decimal(&mut b, u64::MAX);
        b.put_u8(b' ');
        put_hex(&mut b, 0);
        b.put_u8(b' ');
        put_hex(&mut b, 0x1a2b);
        assert_eq!(&b[..], b"0 18446744073709551615 0 1a2b");
    }

    #[test]
    fn content_length_lists_must_agree() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        assert_eq!(content_length(&h).ok().flatten(), Some(5));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(content_length(&h).is_err());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("+5"));
        assert!(content_length(&h).is_err());
    }

    #[test]
    fn connection_options_are_read_and_only_fields_that_name_nothing_else_are_left_out() {
        let mut o = ConnOptions::default();
        assert!(o.take(b"Connection", b"keep-alive"));
        assert!(o.keep_alive && !o.close);
        assert!(o.take(b"keep-alive", b"timeout=5"));
        let mut o = ConnOptions::default();
        assert!(o.take(b"connection", b" Close , "));
        assert!(o.close && !o.keep_alive);
        // A field naming another field stays, for the hop-by-hop strip; its options count.
        let mut o = ConnOptions::default();
        assert!(!o.take(b"connection", b"close, x-secret"));
        assert!(o.close);
        assert!(!o.take(b"connection", b"upgrade"));
        assert!(!o.take(b"content-type", b"close"));
        assert!(!o.keep_alive);
    }

    #[test]
    fn chunked_is_the_last_coding() {
        let mut h = HeaderMap::new();
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("gzip, chunked"),
        );
        assert!(is_chunked(&h));
        let mut h = HeaderMap::new();
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked, gzip"),
        );
        assert!(!is_chunked(&h));
    }

    fn replayed(frames: &[&'static [u8]]) -> UpBody {
        UpBody::Replayed(Box::new(Replayed {
            sent: frames.iter().map(|f| Bytes::from_static(f)).collect(),
            rest: None,
            trailers: None,
        }))
    }

    async fn collect(mut body: UpBody) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(f) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Some(d) = f.ok().and_then(|f| f.into_data().ok()) {
                all.extend_from_slice(&d);
            }
        }
        all
    }

    /// A connection the backend reset before the request: the first write fails, and the
    /// body, whose first frame went into that write, comes back whole for the next attempt.
    #[tokio::test]
    async fn a_request_never_sent_gets_its_whole_body_back() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        socket2::SockRef::from(&theirs)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(theirs);
        // The reset has arrived once the socket reads as ready.
        ours.readable().await.unwrap();
        let (head, ()) = http::Request::post("/upload")
            .body(())
            .unwrap()
            .into_parts();
        let conn = Conn {
            io: BackendIo::Plain(ours),
            transport: 0,
        };
        let body = replayed(&[b"first frame ", b"second frame"]);
        match exchange(conn, &head, None, "backend", body, true).await {
            Err(ExchangeError::NotSent(back)) => {
                assert_eq!(back.size_hint().exact(), Some(24));
                assert_eq!(collect(back).await, b"first frame second frame");
            }
            Err(ExchangeError::Failed { error, .. }) => panic!("sent part of it: {error}"),
            Ok(_) => panic!("a reset connection answered"),
        }
    }
}
