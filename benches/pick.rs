//! Micro-benchmarks of `Pool::pick`: round-robin and least-connections over 2 and 100
//! backends, on one thread and with two threads picking from the same pool at once.
//!
//! `cargo bench --bench pick`

use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use balancer::balance::Pool;
use balancer::state::Snapshot;
use balancer::Config;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn pool(strategy: &str, backends: usize) -> Arc<Pool> {
    let list: Vec<String> = (0..backends)
        .map(|i| {
            // Mixed weights, so round-robin walks a real smooth-weighted sequence.
            let w = 1 + i % 3;
            format!(
                "{{ address = \"127.0.0.{}:{}\", weight = {w} }}",
                1 + i / 200,
                9000 + i % 200
            )
        })
        .collect();
    let text = format!(
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nstrategy = \"{strategy}\"\nbackends = [{}]\n",
        list.join(", ")
    );
    let cfg = Config::parse(&text, "bench.toml", None).expect("generated config is valid");
    let snap = Snapshot::build(Arc::new(cfg), None, 1).expect("snapshot builds");
    let pool = Arc::clone(&snap.pools[0]);
    // Uneven in-flight counts, so least-connections compares real loads.
    for (i, m) in pool.members.iter().enumerate() {
        m.backend.in_flight.store((i * 7) % 13, Relaxed);
    }
    pool
}

const STRATEGIES: [&str; 2] = ["round_robin", "least_connections"];
const SIZES: [usize; 2] = [2, 100];

fn bench_single(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick/1_thread");
    for strategy in STRATEGIES {
        for n in SIZES {
            let p = pool(strategy, n);
            let now = balancer::clock::now_ms();
            g.bench_with_input(BenchmarkId::new(strategy, n), &p, |b, p| {
                b.iter(|| black_box(p.pick(black_box(now), &[])).ok())
            });
        }
    }
    g.finish();
}

/// Two threads each pick `iters` times from the same pool, started together; the time is the
/// wall time of the pair, so it reads as "time per pick while another thread picks too".
fn bench_contended(c: &mut Criterion) {
    const THREADS: usize = 2;
    let mut g = c.benchmark_group("pick/2_threads");
    for strategy in STRATEGIES {
        for n in SIZES {
            let p = pool(strategy, n);
            g.bench_with_input(BenchmarkId::new(strategy, n), &p, |b, p| {
                b.iter_custom(|iters| {
                    let now = balancer::clock::now_ms();
                    let start = Arc::new(Barrier::new(THREADS + 1));
                    let workers: Vec<_> = (0..THREADS)
                        .map(|_| {
                            let p = Arc::clone(p);
                            let start = Arc::clone(&start);
                            std::thread::spawn(move || {
                                start.wait();
                                let t = Instant::now();
                                for _ in 0..iters {
                                    black_box(p.pick(black_box(now), &[]).ok());
                                }
                                t.elapsed()
                            })
                        })
                        .collect();
                    start.wait();
                    workers
                        .into_iter()
                        .map(|w| w.join().expect("picker thread"))
                        .max()
                        .unwrap_or(Duration::ZERO)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_single, bench_contended);
criterion_main!(benches);
