//! A raw HTTP/1.1 client connection for tests where the bytes matter: it sends what it is
//! given and reads responses one at a time (Content-Length, chunked with trailers, or until
//! close; none for HEAD, 1xx, 204 and 304).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read waits for the balancer's next bytes before the test fails.
pub const LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RawResp {
    pub status_line: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailer fields after the last chunk.
    pub trailers: Vec<(String, String)>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn parse_fields(text: &str) -> Vec<(String, String)> {
    text.split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("field line without a colon");
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// One response at the start of `buf` (any status, 1xx included): the response and the bytes
/// it took, or None while incomplete. `head_request`: the response has no body.
pub fn parse_response(buf: &[u8], eof: bool, head_request: bool) -> Option<(RawResp, usize)> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).expect("non-UTF-8 response head");
    let (status_line, fields) = head.split_once("\r\n").unwrap();
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = parse_fields(fields);
    let resp = |body: Vec<u8>, trailers| RawResp {
        status_line: status_line.to_owned(),
        status,
        headers: headers.clone(),
        body,
        trailers,
    };
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let rest = &buf[head_end..];
    if head_request || status < 200 || status == 204 || status == 304 {
        return Some((resp(Vec::new(), Vec::new()), head_end));
    }
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let line_end = pos + find(&rest[pos..], b"\r\n")?;
            let line = std::str::from_utf8(&rest[pos..line_end]).expect("chunk size line");
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line from the balancer: {line:?}"));
            pos = line_end + 2;
            if size == 0 {
                let end = if rest[pos..].starts_with(b"\r\n") {
                    pos
                } else {
                    pos + find(&rest[pos..], b"\r\n\r\n")? + 2
                };
                let trailers = parse_fields(std::str::from_utf8(&rest[pos..end]).unwrap());
                return Some((resp(body, trailers), head_end + end + 2));
            }
            if rest.len() < pos + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    }
    if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().ok()?;
        if rest.len() < n {
            return None;
        }
        return Some((resp(rest[..n].to_vec(), Vec::new()), head_end + n));
    }
    if eof {
        return Some((resp(rest.to_vec(), Vec::new()), buf.len()));
    }
    None
}

pub struct RawConn {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    pub eof: bool,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        RawConn {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
            eof: false,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    pub async fn fill(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut tmp = [0u8; 16384];
        match tokio::time::timeout(LIMIT, self.s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                false
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(_) => panic!(
                "no bytes from the balancer within {LIMIT:?}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// The next response (1xx ones included), or None when the connection ended first (what
    /// did arrive stays in `buf`).
    pub async fn response(&mut self, head_request: bool) -> Option<RawResp> {
        loop {
            if let Some((r, used)) = parse_response(&self.buf, self.eof, head_request) {
                self.buf.drain(..used);
                return Some(r);
            }
            if !self.fill().await {
                let r = parse_response(&self.buf, true, head_request);
                return r.map(|(r, used)| {
                    self.buf.drain(..used);
                    r
                });
            }
        }
    }

    /// Sends `req` and reads its response, which must come.
    pub async fn exchange(&mut self, req: &[u8]) -> RawResp {
        self.send(req).await;
        let head = req.starts_with(b"HEAD ");
        self.response(head).await.unwrap_or_else(|| {
            panic!(
                "no complete response to {:?}; got {:?}",
                String::from_utf8_lossy(req),
                String::from_utf8_lossy(&self.buf)
            )
        })
    }

    /// True when the peer closes within `limit` without sending anything more.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        if self.eof {
            return self.buf.is_empty();
        }
        let mut tmp = [0u8; 1024];
        match tokio::time::timeout(limit, self.s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }
}

impl RawConn {
    /// The next final response (1xx skipped), or None when the peer closed before one.
    pub async fn read_response(&mut self) -> Option<RawResp> {
        loop {
            let r = self.response(false).await?;
            if !(100..200).contains(&r.status) {
                return Some(r);
            }
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
