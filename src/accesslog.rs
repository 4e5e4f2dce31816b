//! The access log: one JSON line per request on stdout.
//!
//! The request path only moves a `LogEntry` into a bounded channel; a dedicated thread formats
//! and writes, flushing when the channel runs dry. A stdout that blocks (a full pipe) therefore
//! never stalls a request: when the channel is full the line is dropped and counted in
//! `balancer_access_log_dropped_total` instead.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use http::{Method, Version};

use crate::backend::{Backend, Reason};

/// Lines in flight to the writer: a few naps' worth at 100k requests/s.
const QUEUE: usize = 64 * 1024;

static SENDER: OnceLock<SyncSender<Box<LogEntry>>> = OnceLock::new();
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How the request ended, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Proxied; the backend's answer went to the client in full.
    Ok,
    /// Proxied after at least one failed attempt or a stale pooled connection.
    Retried,
    /// The balancer answered itself (404, 503, 413, ...).
    Local,
    /// Every attempt failed; the balancer answered 502 or 504.
    Failed,
    /// The client went away before the response was complete.
    ClientClosed,
    /// The backend broke the response in the middle of the body.
    UpstreamAborted,
    /// Switched protocols (WebSocket); logged when the tunnel closes.
    Upgraded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::Local => "local",
            Outcome::Failed => "failed",
            Outcome::ClientClosed => "client_closed",
            Outcome::UpstreamAborted => "upstream_aborted",
            Outcome::Upgraded => "upgraded",
        }
    }
}

pub struct LogEntry {
    pub time: SystemTime,
    pub start: Instant,
    pub client: SocketAddr,
    pub method: Method,
    pub target: String,
    pub version: Version,
    pub status: u16,
    pub bytes: u64,
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<Backend>>,
    pub attempts: u32,
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    /// Set when the entry is handed to the writer, so the duration covers the whole body.
    pub duration_us: u64,
}

impl LogEntry {
    pub fn new(
        client: SocketAddr,
        method: &Method,
        target: &str,
        version: Version,
        start: Instant,
    ) -> LogEntry {
        LogEntry {
            time: SystemTime::now(),
            start,
            client,
            method: method.clone(),
            target: target.to_owned(),
            version,
            status: 0,
            bytes: 0,
            pool: None,
            backend: None,
            attempts: 0,
            outcome: Outcome::Ok,
            reason: None,
            duration_us: 0,
        }
    }
}

/// Starts the writer thread; later calls do nothing.
pub fn init() {
    SENDER.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer; access lines will be dropped");
        }
        tx
    });
}

pub fn write(mut entry: Box<LogEntry>) {
    entry.duration_us = entry.start.elapsed().as_micros() as u64;
    match SENDER.get() {
        Some(tx) => match tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Relaxed);
            }
        },
        None => {
            DROPPED.fetch_add(1, Relaxed);
        }
    }
}

/// After draining the queue the writer naps this long before looking again. Under load,
/// requests then hand lines to a thread that is not parked in `recv`, so a line costs a queue
/// push and no futex wake-up; when idle, a line waits at most this long to be written.
const NAP: std::time::Duration = std::time::Duration::from_millis(5);

fn writer(rx: Receiver<Box<LogEntry>>) {
    // Not `stdout().lock()`: holding the lock forever would block every other writer to stdout.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut line = String::with_capacity(512);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(e) = next {
            line.clear();
            format_line(&e, &mut line);
            if out.write_all(line.as_bytes()).is_err() {
                DROPPED.fetch_add(1, Relaxed);
            }
            drop(e);
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
        std::thread::sleep(NAP);
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// Formats one JSON object and a newline. Field order is fixed and documented in the README.
pub fn format_line(e: &LogEntry, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "{{\"ts\":\"{}\",\"client\":\"{}\",\"method\":",
        humantime::format_rfc3339_millis(e.time),
        e.client
    );
    json_str(e.method.as_str(), out);
    out.push_str(",\"path\":");
    json_str(&e.target, out);
    let _ = write!(
        out,
        ",\"proto\":\"{}\",\"status\":{},\"bytes\":{},\"duration_ms\":{}.{:03},\"pool\":",
        version_str(e.version),
        e.status,
        e.bytes,
        e.duration_us / 1000,
        e.duration_us % 1000
    );
    match &e.pool {
        Some(p) => json_str(p, out),
        None => out.push_str("null"),
    }
    out.push_str(",\"backend\":");
    match &e.backend {
        Some(b) => json_str(&b.address, out),
        None => out.push_str("null"),
    }
    let _ = write!(
        out,
        ",\"attempts\":{},\"outcome\":\"{}\",\"reason\":",
        e.attempts,
        e.outcome.as_str()
    );
    match e.reason {
        Some(r) => {
            let _ = write!(out, "\"{}\"", r.as_str());
        }
        None => out.push_str("null"),
    }
    out.push_str("}\n");
}

fn json_str(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_one_json_object() {
        let mut e = LogEntry::new(
            "127.0.0.1:5000".parse().unwrap(),
            &Method::GET,
            "/a\"b\n",
            Version::HTTP_11,
            Instant::now(),
        );
        e.status = 200;
        e.duration_us = 1234;
        let mut s = String::new();
        format_line(&e, &mut s);
        assert!(s.ends_with("}\n"));
        assert!(s.contains("\"path\":\"/a\\\"b\\u000a\""), "{s}");
        assert!(s.contains("\"duration_ms\":1.234"), "{s}");
        assert!(s.contains("\"reason\":null"), "{s}");
    }
}
