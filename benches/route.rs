//! Micro-benchmarks of the request path's lookups: `Snapshot::route` over 10 and 1000 routes,
//! and the request-header rewrite (`proxy::strip_hop_by_hop`).
//!
//! `cargo bench --bench route`

use std::hint::black_box;
use std::sync::Arc;

use balancer::state::Snapshot;
use balancer::Config;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue};

const POOLS: usize = 4;

/// `n` routes, each with a host (every fourth a `*.` wildcard) and a path prefix, over four
/// pools, then a catch-all.
fn config_with_routes(n: usize) -> Config {
    let mut t = String::from("[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n");
    for i in 0..n {
        let host = if i % 4 == 3 {
            format!("*.wild{i}.example.com")
        } else {
            format!("svc{i}.example.com")
        };
        t += &format!(
            "[[routes]]\nhost = \"{host}\"\npath_prefix = \"/api/v{i}\"\npool = \"p{}\"\n\n",
            i % POOLS
        );
    }
    t += "[[routes]]\npool = \"p0\"\n\n";
    for p in 0..POOLS {
        t += &format!("[pools.p{p}]\nbackends = [\"127.0.0.1:{}\"]\n\n", 9001 + p);
    }
    Config::parse(&t, "bench.toml", None).expect("generated config is valid")
}

fn snapshot(n: usize) -> Snapshot {
    Snapshot::build(Arc::new(config_with_routes(n)), None, 1).expect("snapshot builds")
}

fn bench_route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [10usize, 1000] {
        let snap = snapshot(n);
        let last = n - 2; // a plain-host route near the end of the list
        let wild = (0..n).rev().find(|i| i % 4 == 3).expect("n >= 4"); // the last wildcard
        let cases: Vec<(&str, String, String)> = vec![
            (
                "first",
                "svc0.example.com:8080".into(),
                "/api/v0/users/42".into(),
            ),
            (
                "last",
                format!("SVC{last}.example.com"),
                format!("/api/v{last}/x"),
            ),
            (
                "wildcard_last",
                format!("a.b.wild{wild}.example.com"),
                format!("/api/v{wild}"),
            ),
            (
                "catch_all",
                "unknown.example.org".into(),
                "/index.html".into(),
            ),
        ];
        for (name, host, path) in &cases {
            assert!(snap.route(Some(host), path).is_some(), "{name} must match");
            g.bench_with_input(
                BenchmarkId::new(*name, n),
                &(host, path),
                |b, (host, path)| {
                    b.iter(|| {
                        black_box(
                            snap.route(Some(black_box(host.as_str())), black_box(path.as_str())),
                        )
                        .is_some()
                    })
                },
            );
        }
    }
    g.finish();
}

fn typical_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "www.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "session=0123456789abcdef; theme=dark"),
        ("x-request-id", "6f1c0b5e-8d1a-4b8e-9a55-3c2f1d7e9b10"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn bench_headers(c: &mut Criterion) {
    let mut g = c.benchmark_group("strip_hop_by_hop");
    let plain = typical_request_headers();
    let mut hop = typical_request_headers();
    for (k, v) in [
        ("connection", "keep-alive, x-trace, upgrade"),
        ("keep-alive", "timeout=5"),
        ("x-trace", "abc"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("proxy-connection", "keep-alive"),
    ] {
        hop.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    for (name, headers) in [("no_hop_headers", &plain), ("with_connection_tokens", &hop)] {
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || headers.clone(),
                |h| {
                    balancer::headers::strip_hop_by_hop(h);
                    black_box(h.len())
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_route, bench_headers);
criterion_main!(benches);
