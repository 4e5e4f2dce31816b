//! Bodies stream both ways with bounded memory (spec: "Streams bodies both ways; never
//! buffers a whole body in memory"). The real binary, so its RSS is its own.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper::Request;

const MIB: u64 = 1024 * 1024;

/// `total` bytes in 64 KiB chunks, generated as they are sent; no declared length (chunked).
fn generated(total: u64) -> TestBody {
    generated_body(total, 64 * 1024, b'g')
}

/// Samples the balancer's RSS every 10 ms on its own thread until dropped; keeps the peak.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(bin: &Arc<BinaryBalancer>) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(bin.rss_kib()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, b) = (peak.clone(), stop.clone(), Arc::clone(bin));
        let thread = std::thread::spawn(move || {
            while !s.load(SeqCst) {
                p.fetch_max(b.rss_kib(), SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn peak_kib(&self) -> u64 {
        self.peak.load(SeqCst)
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak_kib()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

fn binary_config(backend: std::net::SocketAddr) -> String {
    // No access log (config() turns it off): the test is about the bodies.
    config(&[backend], "round_robin", "")
}

/// Counts a body's bytes without keeping them.
async fn count_body(mut body: hyper::body::Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_gib_echoes_through_with_bounded_memory() {
    const TOTAL: u64 = 512 * MIB;
    let a = start_backend("a").await;
    let bin = Arc::new(start_binary(
        &binary_config(a.addr),
        std::process::Stdio::null(),
    ));
    let baseline = bin.rss_kib();
    let sampler = RssSampler::start(&bin);
    let start = Instant::now();
    let url = format!("http://{}/echo", bin.addr);
    let transfer = async {
        let req = Request::post(url).body(generated(TOTAL)).unwrap();
        let resp = client().request(req).await.expect("echo request failed");
        assert_eq!(resp.status(), 200);
        count_body(resp.into_body()).await.expect("echo body broke")
    };
    let echoed = tokio::time::timeout(Duration::from_secs(150), transfer)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "512 MiB echo did not finish in 150 s; peak RSS {} KiB",
                sampler.peak_kib()
            )
        });
    let took = start.elapsed();
    let peak = sampler.finish();
    eprintln!(
        "echo: {} MiB in {took:?}; balancer RSS baseline {baseline} KiB, peak {peak} KiB",
        echoed / MIB
    );
    assert_eq!(echoed, TOTAL, "not all bytes came back");
    assert!(peak > 0, "could not read the balancer's RSS");
    assert!(
        peak < 100 * 1024,
        "balancer RSS peaked at {peak} KiB (limit 100 MiB)"
    );
    assert_eq!(a.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_with_bounded_memory_even_to_a_slow_reader() {
    const TOTAL: u64 = 64 * MIB;
    let a = start_backend("a").await;
    let bin = Arc::new(start_binary(
        &binary_config(a.addr),
        std::process::Stdio::null(),
    ));
    let baseline = bin.rss_kib();
    let url = format!("http://{}/bytes/{TOTAL}", bin.addr);
    let c = client();

    // A reader that keeps up.
    let sampler = RssSampler::start(&bin);
    let fast = async {
        let resp = c.get(url.parse().unwrap()).await.expect("download failed");
        assert_eq!(resp.status(), 200);
        count_body(resp.into_body())
            .await
            .expect("download body broke")
    };
    let got = tokio::time::timeout(Duration::from_secs(60), fast)
        .await
        .expect("64 MiB download timed out");
    let peak_fast = sampler.finish();
    assert_eq!(got, TOTAL);

    // A reader that stops for a while after the first MiB: the balancer must push back on the
    // backend instead of buffering the rest of the body.
    let sampler = RssSampler::start(&bin);
    let slow = async {
        let resp = c.get(url.parse().unwrap()).await.expect("download failed");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut n = 0u64;
        while n < MIB {
            let f = body
                .frame()
                .await
                .expect("body ended early")
                .expect("body broke");
            n += f.data_ref().map_or(0, |d| d.len() as u64);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        n + count_body(body).await.expect("download body broke")
    };
    let got = tokio::time::timeout(Duration::from_secs(60), slow)
        .await
        .expect("slow download timed out");
    let peak_slow = sampler.finish();
    assert_eq!(got, TOTAL);
    eprintln!("download: baseline {baseline} KiB, peak {peak_fast} KiB (fast reader), {peak_slow} KiB (slow reader)");
    // Buffering the body would add 64 MiB on top of the baseline.
    let bound = baseline + 32 * 1024;
    assert!(
        peak_fast < bound,
        "RSS {peak_fast} KiB with a fast reader (baseline {baseline} KiB)"
    );
    assert!(
        peak_slow < bound,
        "RSS {peak_slow} KiB with a slow reader (baseline {baseline} KiB)"
    );
    assert_eq!(a.requests(), 2);
}
