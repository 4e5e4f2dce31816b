//! The access log: one JSON line per request, on stdout or in `[log] access_file`.
//!
//! The request path only moves a `LogEntry` into a bounded channel; a dedicated thread formats
//! and writes, flushing when the channel runs dry. A stdout or disk that blocks (a full pipe)
//! therefore never stalls a request: when the queue is full (in entries or in bytes) the line is
//! dropped and counted in `balancer_access_log_dropped_total` instead. An entry holds names and
//! copies, not backends or header buffers, so a queue backed up behind a slow output never keeps
//! a removed backend (and its idle connections) or a request's header block alive.
//!
//! The file is opened by the writer thread, which is also the only one to write it: `reopen`
//! (SIGUSR1, logrotate's `create` mode) and `set_file` (start, reload) only move a generation
//! counter and nudge the thread, so no lock is ever taken on the request path.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
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

static SENDER: OnceLock<SyncSender<Msg>> = OnceLock::new();
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// What the writer thread receives: a line, or a nudge to look at `TARGET` now rather than at
/// the next line (so that a rotated file is reopened, and errors reported, at once).
enum Msg {
    Line(Box<LogEntry>),
    Reopen,
}

/// Where lines go (`None`: stdout) and a generation bumped by every `set_file` and `reopen`.
/// Taken by the control path and by the writer thread between lines, never by a request.
static TARGET: Mutex<(Option<PathBuf>, u64)> = Mutex::new((None, 0));
/// The generation in `TARGET`, readable without the lock: the writer compares it per line.
static GENERATION: AtomicU64 = AtomicU64::new(0);

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

/// Texts the entry copies from the request and the connection, in `LogEntry::text`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Texts<'a> {
    /// The request target as received (path and query).
    pub target: &'a [u8],
    pub host: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub request_id: Option<&'a [u8]>,
    /// The connection's TLS description, already a JSON value (`conn::tls_json`).
    pub tls: Option<&'a str>,
}

const TARGET_AT: usize = 0;
const HOST_AT: usize = 1;
const USER_AGENT_AT: usize = 2;
const REQUEST_ID_AT: usize = 3;
const TLS_AT: usize = 4;
const TEXTS: usize = 5;

pub struct LogEntry {
    pub time: SystemTime,
    pub start: Instant,
    pub client: SocketAddr,
    pub method: Method,
    /// Every `Texts` field back to back: one allocation per request, however many fields.
    text: Vec<u8>,
    /// End of each field in `text`, in `*_AT` order.
    ends: [u32; TEXTS],
    /// Bit `1 << *_AT` set: the field was present (absent ones are logged as null).
    present: u8,
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
    /// The valid `traceparent`'s trace id (lower-case hex).
    pub trace_id: Option<[u8; 32]>,
    /// From sending the request upstream until the answering backend's response headers.
    pub upstream_us: Option<u64>,
    /// Request body bytes read from the client: the body's counter until the entry is written
    /// (the body may still be streaming when the response ends), then its final value.
    pub received: Option<Arc<AtomicU64>>,
    pub bytes_received: u64,
    /// On a route with `cache = true`: what the cache did (`hit`, `miss`, `stale`,
    /// `revalidated`, `bypass`).
    pub cache: Option<&'static str>,
    /// The gRPC status the client got: the backend's (in its headers or trailers) or the
    /// balancer's own. `None` for anything but gRPC, or a gRPC response without one.
    pub grpc_status: Option<u32>,
}

impl LogEntry {
    pub fn new(
        client: SocketAddr,
        method: &Method,
        version: Version,
        start: Instant,
        texts: Texts<'_>,
    ) -> LogEntry {
        let fields: [Option<&[u8]>; TEXTS] = [
            Some(texts.target),
            texts.host,
            texts.user_agent,
            texts.request_id,
            texts.tls.map(str::as_bytes),
        ];
        let mut text = Vec::with_capacity(fields.iter().flatten().map(|f| f.len()).sum());
        let mut ends = [0u32; TEXTS];
        let mut present = 0u8;
        for (i, f) in fields.iter().enumerate() {
            if let Some(f) = f {
                text.extend_from_slice(f);
                present |= 1 << i;
            }
            // Header blocks are capped far below 4 GiB (limits.max_header_bytes).
            ends[i] = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        LogEntry {
            time: SystemTime::now(),
            start,
            client,
            method: method.clone(),
            text,
            ends,
            present,
            version,
            status: 0,
            bytes: 0,
            pool: None,
            backend: None,
            attempts: 0,
            outcome: Ending::Ok,
            reason: None,
            duration_us: 0,
            trace_id: None,
            upstream_us: None,
            received: None,
            bytes_received: 0,
            cache: None,
            grpc_status: None,
        }
    }

    /// Field `i` of `Texts`, if it was present.
    fn text(&self, i: usize) -> Option<&[u8]> {
        if self.present & (1 << i) == 0 {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..self.ends[i] as usize)
    }
}

/// Sends lines to `path` (`None`: stdout) from the next line on. At start the file is opened
/// here first, so that a path that cannot be written is an error before anything is served;
/// after a reload the writer thread opens it and, if it cannot, logs why and keeps the
/// current output.
pub fn set_file(path: Option<&Path>, check_now: bool) -> std::io::Result<()> {
    if let (Some(p), true) = (path, check_now) {
        open(p)?;
    }
    let Ok(mut t) = TARGET.lock() else {
        return Ok(());
    };
    if t.0.as_deref() != path {
        t.0 = path.map(Path::to_path_buf);
        t.1 += 1;
        GENERATION.store(t.1, Relaxed);
        drop(t);
        nudge();
    }
    Ok(())
}

/// SIGUSR1: reopen the file at the configured path (after logrotate renamed the old one).
/// Returns that path; `None` when the log is on stdout, with nothing to reopen.
pub fn reopen() -> Option<PathBuf> {
    let mut t = TARGET.lock().ok()?;
    let path = t.0.clone()?;
    t.1 += 1;
    GENERATION.store(t.1, Relaxed);
    drop(t);
    nudge();
    Some(path)
}

fn nudge() {
    // A full queue means a busy writer, which looks at the generation before its next line.
    if let Some(tx) = SENDER.get() {
        let _ = tx.try_send(Msg::Reopen);
    }
}

fn open(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
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
        std::mem::size_of::<LogEntry>() + self.text.len()
    }
}

pub fn write(mut entry: Box<LogEntry>) {
    entry.duration_us = entry.start.elapsed().as_micros() as u64;
    if let Some(n) = entry.received.take() {
        entry.bytes_received = n.load(Relaxed);
    }
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
    match tx.try_send(Msg::Line(entry)) {
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

/// The writer's output: stdout, or the access file.
enum Out {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Stdout(o) => o.write(b),
            Out::File(f) => f.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Stdout(o) => o.flush(),
            Out::File(f) => f.flush(),
        }
    }
}

/// Switches `out` to the current `TARGET` if its generation moved past `seen`. Lines already
/// buffered go to the old output first; an output that cannot be opened leaves the old one.
fn follow_target(out: &mut std::io::BufWriter<Out>, seen: &mut u64) {
    if GENERATION.load(Relaxed) == *seen {
        return;
    }
    let Ok(t) = TARGET.lock() else { return };
    let (path, generation) = (t.0.clone(), t.1);
    drop(t);
    *seen = generation;
    let _ = out.flush();
    let next = match &path {
        None => Out::Stdout(std::io::stdout()),
        Some(p) => match open(p) {
            Ok(f) => Out::File(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open the access log file; lines keep going to the previous output");
                return;
            }
        },
    };
    // Dropping the old file closes it: logrotate may compress it now.
    *out.get_mut() = next;
    if let Some(p) = &path {
        tracing::info!(path = %p.display(), "access log file opened");
    }
}

fn writer(rx: Receiver<Msg>) {
    // Not `stdout().lock()`: holding the lock forever would block every other writer to stdout.
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, Out::Stdout(std::io::stdout()));
    let mut seen = 0u64;
    let mut line = String::with_capacity(512);
    follow_target(&mut out, &mut seen);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            // Per line, so that no line written after a SIGUSR1 lands in the renamed file.
            follow_target(&mut out, &mut seen);
            if let Msg::Line(e) = msg {
                line.clear();
                format_line(&e, &mut line);
                if out.write_all(line.as_bytes()).is_err() {
                    DROPPED.fetch_add(1, Relaxed);
                }
                QUEUED_BYTES.fetch_sub(e.cost(), Relaxed);
                drop(e);
            }
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
    json_bytes(e.text(TARGET_AT), out);
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
    out.push_str(",\"request_id\":");
    json_bytes(e.text(REQUEST_ID_AT), out);
    out.push_str(",\"trace_id\":");
    match e
        .trace_id
        .as_ref()
        .and_then(|t| std::str::from_utf8(t).ok())
    {
        Some(t) => json_str(t, out),
        None => out.push_str("null"),
    }
    out.push_str(",\"host\":");
    json_bytes(e.text(HOST_AT), out);
    out.push_str(",\"user_agent\":");
    json_bytes(e.text(USER_AGENT_AT), out);
    out.push_str(",\"upstream_ms\":");
    match e.upstream_us {
        Some(us) => {
            let _ = write!(out, "{}.{:03}", us / 1000, us % 1000);
        }
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\"bytes_received\":{},\"tls\":", e.bytes_received);
    // Built by the balancer as JSON (conn::tls_json), not by the client.
    match e.text(TLS_AT).and_then(|t| std::str::from_utf8(t).ok()) {
        Some(t) => out.push_str(t),
        None => out.push_str("null"),
    }
    out.push_str(",\"cache\":");
    match e.cache {
        Some(c) => json_str(c, out),
        None => out.push_str("null"),
    }
    out.push_str(",\"grpc_status\":");
    match e.grpc_status {
        Some(c) => {
            let _ = write!(out, "{c}");
        }
        None => out.push_str("null"),
    }
    out.push_str("}\n");
}

/// A JSON string of header bytes, or null. Bytes that are not UTF-8 (obs-text) become U+FFFD.
fn json_bytes(b: Option<&[u8]>, out: &mut String) {
    match b {
        Some(b) => json_str(&String::from_utf8_lossy(b), out),
        None => out.push_str("null"),
    }
}

pub(crate) fn json_str(s: &str, out: &mut String) {
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

    fn entry(texts: Texts<'_>) -> LogEntry {
        let mut e = LogEntry::new(
            "127.0.0.1:5000".parse().unwrap(),
            &Method::GET,
            Version::HTTP_11,
            Instant::now(),
            texts,
        );
        e.status = 200;
        e.duration_us = 1234;
        e
    }

    fn line(e: &LogEntry) -> serde_json::Value {
        let mut s = String::new();
        format_line(e, &mut s);
        assert!(s.ends_with("}\n"));
        assert_eq!(s.matches('\n').count(), 1, "{s}");
        serde_json::from_str(&s).unwrap_or_else(|err| panic!("{s}: {err}"))
    }

    #[test]
    fn line_is_one_json_object() {
        let e = entry(Texts {
            target: b"/a\"b\n",
            ..Texts::default()
        });
        let mut s = String::new();
        format_line(&e, &mut s);
        assert!(s.contains("\"path\":\"/a\\\"b\\u000a\""), "{s}");
        assert!(s.contains("\"duration_ms\":1.234"), "{s}");
        assert!(s.contains("\"reason\":null"), "{s}");
        let v = line(&e);
        for k in [
            "request_id",
            "trace_id",
            "host",
            "user_agent",
            "upstream_ms",
            "tls",
            "grpc_status",
        ] {
            assert!(v[k].is_null(), "{k}: {v}");
        }
        assert_eq!(v["bytes_received"], 0);
    }

    #[test]
    fn new_fields_in_documented_order() {
        let mut e = entry(Texts {
            target: b"/x?y=1",
            host: Some(b"a.example"),
            user_agent: Some(b"curl/8 \"q\" \xff"),
            request_id: Some(b"abc"),
            tls: Some(r#"{"version":"TLSv1.3","sni":"a.example"}"#),
        });
        e.trace_id = Some(*b"4bf92f3577b34da6a3ce929d0e0e4736");
        e.upstream_us = Some(2_005);
        e.bytes_received = 7;
        e.grpc_status = Some(14);
        let mut s = String::new();
        format_line(&e, &mut s);
        let keys = [
            "ts",
            "client",
            "method",
            "path",
            "proto",
            "status",
            "bytes",
            "duration_ms",
            "pool",
            "backend",
            "attempts",
            "outcome",
            "reason",
            "request_id",
            "trace_id",
            "host",
            "user_agent",
            "upstream_ms",
            "bytes_received",
            "tls",
            "cache",
            "grpc_status",
        ];
        let at: Vec<usize> = keys
            .iter()
            .map(|k| {
                s.find(&format!("\"{k}\":"))
                    .unwrap_or_else(|| panic!("{k}: {s}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{s}");
        let v = line(&e);
        assert_eq!(v["path"], "/x?y=1");
        assert_eq!(v["host"], "a.example");
        assert_eq!(v["user_agent"], "curl/8 \"q\" \u{fffd}");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["upstream_ms"], 2.005);
        assert_eq!(v["bytes_received"], 7);
        assert_eq!(v["tls"]["version"], "TLSv1.3");
        assert_eq!(v["tls"]["sni"], "a.example");
        assert_eq!(v["grpc_status"], 14);
    }

    #[test]
    fn absent_texts_in_between_keep_the_others_in_place() {
        let e = entry(Texts {
            target: b"/t",
            host: None,
            user_agent: Some(b"ua"),
            request_id: None,
            tls: None,
        });
        let v = line(&e);
        assert_eq!(v["path"], "/t");
        assert!(v["host"].is_null());
        assert_eq!(v["user_agent"], "ua");
        assert!(v["request_id"].is_null());
    }
}
