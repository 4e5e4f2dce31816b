//! The access log: one JSON line per request on stdout.
//!
//! The request path only moves a `LogEntry` into a bounded channel; a dedicated thread formats
//! and writes, flushing when the channel runs dry. A stdout that blocks (a full pipe) therefore
//! never stalls a request: when the queue is full (in entries or in bytes) the line is dropped
//! and counted in `balancer_access_log_dropped_total` instead. An entry holds names, not
//! backends, so a queue backed up behind stdout never keeps a removed backend (and its idle
//! connections) alive.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use http::{Method, Version};

use crate::reason::Reason;

/// Lines in flight to the writer: a few naps' worth at 100k requests/s.
const QUEUE: usize = 64 * 1024;

/// Bytes in flight to the writer. Targets can be 64 KiB each; without this, a stuck stdout
/// could pin `QUEUE` of them (gigabytes).
const QUEUE_BYTES: usize = 16 * 1024 * 1024;

/// What the queued entries hold, by `LogEntry::cost`.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);

static SENDER: OnceLock<SyncSender<Box<LogEntry>>> = OnceLock::new();
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How the request ended, in one word: the access log's `outcome` field. (Per attempt, the
/// backend's side is `backend::Outcome`; this is the request as the client lived it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
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
    /// The balancer cut the response: the client stopped reading (send timeout, an h2 window
    /// that never opened).
    Reset,
    /// Switched protocols (WebSocket); logged when the tunnel closes.
    Upgraded,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Ok => "ok",
            Ending::Retried => "retried",
            Ending::Local => "local",
            Ending::Failed => "failed",
            Ending::ClientClosed => "client_closed",
            Ending::UpstreamAborted => "upstream_aborted",
            Ending::Reset => "reset",
            Ending::Upgraded => "upgraded",
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
    pub backend: Option<Arc<str>>,
    pub attempts: u32,
    pub outcome: Ending,
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
            outcome: Ending::Ok,
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

impl LogEntry {
    /// What the entry holds in memory while queued.
    fn cost(&self) -> usize {
        std::mem::size_of::<LogEntry>() + self.target.len()
    }
}

pub fn write(mut entry: Box<LogEntry>) {
    entry.duration_us = entry.start.elapsed().as_micros() as u64;
    let Some(tx) = SENDER.get() else {
        DROPPED.fetch_add(1, Relaxed);
        return;
    };
    let cost = entry.cost();
    if QUEUED_BYTES.fetch_add(cost, Relaxed) + cost > QUEUE_BYTES {
        QUEUED_BYTES.fetch_sub(cost, Relaxed);
        DROPPED.fetch_add(1, Relaxed);
        return;
    }
    match tx.try_send(entry) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            QUEUED_BYTES.fetch_sub(cost, Relaxed);
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
            QUEUED_BYTES.fetch_sub(e.cost(), Relaxed);
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
        Some(b) => json_str(b, out),
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
