//! `GET /metrics`: what the balancer observed, in the format the scraper asked for.
//!
//! The families are read once per scrape into a small model ([`Family`]) from the current
//! snapshot and the live atomics of each backend, then written out either as
//!
//! - the Prometheus text exposition format 0.0.4 (the default, and what `promtool check
//!   metrics` checks): counters carry their `_total` in the family name, no `# EOF`; written
//!   here, since prometheus-client only speaks OpenMetrics;
//! - OpenMetrics 1.0 when the `Accept` header prefers `application/openmetrics-text`: written by
//!   prometheus-client from the same model, so the two formats never list different samples.
//!
//! Nothing is cached: `/metrics` and `/status` read the same atomics, and the breaker state
//! through the same function (`Breaker::effective_state`), so they never disagree.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::admin_state::AdminMode;
use crate::backend::LATENCY_BUCKETS;
use crate::grpc;
use crate::reason::{Failure, Reason};
use crate::state::Shared;

pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// Content negotiation on `Accept`: OpenMetrics only when it is acceptable and weighted at
    /// least as high as the text format (Prometheus sends `application/openmetrics-text;
    /// version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`). Anything else, a missing
    /// or unparsable header included, gets the text format every scraper understands.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut om, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map(|(_, v)| v.trim().parse::<f32>().unwrap_or(0.0))
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
    /// Non-cumulative counts per upper bound, the last bound `+Inf`, as the backends count
    /// them; each encoder accumulates.
    Histogram {
        sum: f64,
        buckets: Vec<(f64, u64)>,
    },
}

pub type Labels = Vec<(&'static str, String)>;

/// One metric family. `name` is the OpenMetrics family name: for counters without `_total`,
/// which the text format adds to the family and OpenMetrics to each sample.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }
}

/// The whole exposition in `format`.
pub fn render(shared: &Shared, format: Format) -> Result<String, std::fmt::Error> {
    let families = collect(shared);
    match format {
        Format::Text => encode_text(&families),
        Format::OpenMetrics => encode_openmetrics(families),
    }
}

/// Reads every family at this instant.
pub fn collect(shared: &Shared) -> Vec<Family> {
    let snap = shared.snapshot.load();
    let now = crate::clock::now_ms();
    let mut requests = Family::new(
        "balancer_requests",
        "Responses from backends, by pool, backend and status class.",
        Kind::Counter,
    );
    let mut failures = Family::new(
        "balancer_upstream_failures",
        "Failed upstream attempts, by reason.",
        Kind::Counter,
    );
    let mut attempts = Family::new(
        "balancer_upstream_attempts",
        "Requests sent to each backend (a retried request counts once per attempt).",
        Kind::Counter,
    );
    let mut opened = Family::new(
        "balancer_upstream_connections_opened",
        "TCP connections opened to each backend; with attempts, the reuse ratio.",
        Kind::Counter,
    );
    let mut overrides = Family::new(
        "balancer_breaker_overrides",
        "Attempts sent through an open breaker because open breakers already eject more than the pool's max_ejected_percent.",
        Kind::Counter,
    );
    let mut duration = Family::new(
        "balancer_request_duration_seconds",
        "Time from sending a request to a backend until its response headers.",
        Kind::Histogram,
    );
    let mut in_flight = Family::new(
        "balancer_backend_in_flight",
        "Requests in flight per backend.",
        Kind::Gauge,
    );
    let mut healthy = Family::new(
        "balancer_backend_healthy",
        "1 if the backend passes its health checks (or has none).",
        Kind::Gauge,
    );
    let mut breaker = Family::new(
        "balancer_backend_breaker_state",
        "Circuit breaker: 0 closed, 1 open, 2 half-open.",
        Kind::Gauge,
    );
    let mut admin_state = Family::new(
        "balancer_backend_admin_state",
        "Operator intent set through the admin API: 1 for the backend's current state (enabled, drain or disabled), 0 for the others.",
        Kind::Gauge,
    );
    let mut weight = Family::new(
        "balancer_backend_weight",
        "Weight picks use: the operator's override, else the config's (0 takes no new traffic).",
        Kind::Gauge,
    );
    let mut grpc_responses = Family::new(
        "balancer_grpc_responses",
        "gRPC statuses clients got: the backend's (by pool, backend and code) or the balancer's own (code only; their reasons are in balancer_local_responses_total).",
        Kind::Counter,
    );
    for p in &snap.pools {
        for m in &p.members {
            let b = &m.backend;
            let c = &b.counters;
            let id = || -> Labels {
                vec![
                    ("pool", p.name.to_string()),
                    ("backend", b.address.to_string()),
                ]
            };
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let mut l = id();
                l.push(("class", (*class).to_owned()));
                let v = c.status.get(i).map(|a| a.load(Relaxed)).unwrap_or(0);
                requests.samples.push((l, Value::Counter(v)));
            }
            for r in Failure::ALL {
                let v = c
                    .failure_reasons
                    .get(r.index())
                    .map(|a| a.load(Relaxed))
                    .unwrap_or(0);
                if v > 0 {
                    let mut l = id();
                    l.push(("reason", r.as_str().to_owned()));
                    failures.samples.push((l, Value::Counter(v)));
                }
            }
            for (slot, n) in c.grpc_codes.iter().enumerate() {
                let v = n.load(Relaxed);
                if v > 0 {
                    let mut l = id();
                    l.push(("code", grpc::slot_label(slot).to_owned()));
                    grpc_responses.samples.push((l, Value::Counter(v)));
                }
            }
            attempts
                .samples
                .push((id(), Value::Counter(c.requests.load(Relaxed))));
            opened
                .samples
                .push((id(), Value::Counter(c.connections_opened.load(Relaxed))));
            overrides
                .samples
                .push((id(), Value::Counter(c.ejection_overrides.load(Relaxed))));
            in_flight
                .samples
                .push((id(), Value::Gauge(b.in_flight.load(Relaxed) as i64)));
            healthy
                .samples
                .push((id(), Value::Gauge(i64::from(b.is_healthy()))));
            let mode = b.intent.mode();
            for st in AdminMode::ALL {
                let mut l = id();
                l.push(("state", st.as_str().to_owned()));
                admin_state
                    .samples
                    .push((l, Value::Gauge(i64::from(st == mode))));
            }
            weight.samples.push((
                id(),
                Value::Gauge(i64::from(b.intent.effective_weight(m.weight))),
            ));
            // The same reading as `/status`: an open breaker whose time is up is half-open.
            let state = b.breaker.effective_state(&p.breaker, now);
            breaker.samples.push((id(), Value::Gauge(state.as_gauge())));
            let bound = |i: usize| LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            let buckets = c
                .latency_buckets
                .iter()
                .enumerate()
                .take(LATENCY_BUCKETS.len() + 1)
                .map(|(i, n)| (bound(i), n.load(Relaxed)))
                .collect();
            let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
            duration
                .samples
                .push((id(), Value::Histogram { sum, buckets }));
        }
    }

    let mut local = Family::new(
        "balancer_local_responses",
        "Answers the balancer made itself (404, 413, 502, 503, 504, ...), by reason.",
        Kind::Counter,
    );
    for r in Reason::all() {
        let v = crate::answer::LOCAL_RESPONSES
            .get(r.index())
            .map(|a| a.load(Relaxed))
            .unwrap_or(0);
        if v > 0 {
            local
                .samples
                .push((vec![("reason", r.as_str().to_owned())], Value::Counter(v)));
        }
    }
    for (slot, n) in crate::answer::LOCAL_GRPC.iter().enumerate() {
        let v = n.load(Relaxed);
        if v > 0 {
            grpc_responses.samples.push((
                vec![("code", grpc::slot_label(slot).to_owned())],
                Value::Counter(v),
            ));
        }
    }
    let single = |name, help, kind, v| Family {
        name,
        help,
        kind,
        samples: vec![(Vec::new(), v)],
    };
    let mut all = vec![
        requests,
        failures,
        attempts,
        opened,
        overrides,
        duration,
        in_flight,
        healthy,
        breaker,
        admin_state,
        weight,
        local,
        single(
            "balancer_config_reloads",
            "Reloads applied.",
            Kind::Counter,
            Value::Counter(shared.reloads.load(Relaxed)),
        ),
        single(
            "balancer_config_reload_failures",
            "Reloads rejected (the old config kept serving).",
            Kind::Counter,
            Value::Counter(shared.reload_failures.load(Relaxed)),
        ),
        single(
            "balancer_config_version",
            "Version of the config in force.",
            Kind::Gauge,
            Value::Gauge(snap.generation as i64),
        ),
        single(
            "balancer_open_connections",
            "Client connections open.",
            Kind::Gauge,
            Value::Gauge(shared.open_connections.load(Relaxed) as i64),
        ),
        single(
            "balancer_parked_connections",
            "Idle HTTP/1 client connections holding no buffers (parked while over 256 are open).",
            Kind::Gauge,
            Value::Gauge(shared.parked_connections.load(Relaxed) as i64),
        ),
        single(
            "balancer_access_log_dropped",
            "Access-log lines dropped because stdout could not keep up.",
            Kind::Counter,
            Value::Counter(crate::accesslog::DROPPED.load(Relaxed)),
        ),
    ];
    if let Some(c) = &snap.cache {
        all.extend(cache_families(c));
    }
    // Only where gRPC is spoken: eighteen codes per backend would swamp every other scrape.
    if !grpc_responses.samples.is_empty() {
        all.push(grpc_responses);
    }
    all
}

/// The response cache's families; only with `[cache]`.
fn cache_families(c: &crate::cache::Cache) -> Vec<Family> {
    let s = &c.stats;
    let one = |name, help, kind, v| Family {
        name,
        help,
        kind,
        samples: vec![(Vec::new(), v)],
    };
    let counter = |n: &std::sync::atomic::AtomicU64| Value::Counter(n.load(Relaxed));
    let mut stale = Family::new(
        "balancer_cache_stale",
        "Stale stored responses served: while one background request refreshes them, or because the backends failed.",
        Kind::Counter,
    );
    stale.samples.push((
        vec![("reason", "while_revalidate".to_owned())],
        counter(&s.stale_while_revalidate),
    ));
    stale.samples.push((
        vec![("reason", "if_error".to_owned())],
        counter(&s.stale_if_error),
    ));
    vec![
        one(
            "balancer_cache_hits",
            "Requests answered from a fresh stored response (client 304s and collapsed waiters included).",
            Kind::Counter,
            counter(&s.hits),
        ),
        one(
            "balancer_cache_misses",
            "Cacheable requests that went to a backend (cold, Vary miss, stale, or forced by the client).",
            Kind::Counter,
            counter(&s.misses),
        ),
        stale,
        one(
            "balancer_cache_revalidated",
            "Stale stored responses a backend's 304 made fresh again.",
            Kind::Counter,
            counter(&s.revalidated),
        ),
        one(
            "balancer_cache_stores",
            "Responses stored.",
            Kind::Counter,
            counter(&s.stores),
        ),
        one(
            "balancer_cache_evictions",
            "Stored responses dropped to make room.",
            Kind::Counter,
            counter(&s.evictions),
        ),
        one(
            "balancer_cache_bypass",
            "Requests on caching routes the cache stepped aside for (other methods, no-store, bodies, upgrades).",
            Kind::Counter,
            counter(&s.bypass),
        ),
        one(
            "balancer_cache_bytes",
            "Bytes the stored responses take, headers and bodies (never above balancer_cache_max_bytes).",
            Kind::Gauge,
            Value::Gauge(c.bytes() as i64),
        ),
        one(
            "balancer_cache_max_bytes",
            "[cache] max_size.",
            Kind::Gauge,
            Value::Gauge(c.max_size() as i64),
        ),
        one(
            "balancer_cache_entries",
            "Stored responses, and one index per URL whose responses vary.",
            Kind::Gauge,
            Value::Gauge(c.entries() as i64),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format)

/// `\` and newline are escaped in HELP; label values also escape `"`.
fn escape(out: &mut String, s: &str, quote: bool) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

fn series(out: &mut String, name: &str, suffix: &str, labels: &Labels, le: Option<f64>) {
    out.push_str(name);
    out.push_str(suffix);
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape(out, v, true);
        out.push('"');
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        out.push_str("le=\"");
        out.push_str(&float(le));
        out.push('"');
    }
    out.push('}');
}

/// Go's `ParseFloat` syntax, which Prometheus parses values and `le` with.
fn float(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

pub fn encode_text(families: &[Family]) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    for f in families {
        // In 0.0.4 a sample belongs to the family of the same name (histograms aside), so a
        // counter family is named with its `_total`, as Prometheus' own clients write it.
        let (family, kind) = match f.kind {
            Kind::Counter => (format!("{}_total", f.name), "counter"),
            Kind::Gauge => (f.name.to_owned(), "gauge"),
            Kind::Histogram => (f.name.to_owned(), "histogram"),
        };
        out.push_str("# HELP ");
        out.push_str(&family);
        out.push(' ');
        escape(&mut out, f.help, false);
        out.push('\n');
        writeln!(out, "# TYPE {family} {kind}")?;
        for (labels, value) in &f.samples {
            match value {
                Value::Counter(v) => {
                    series(&mut out, &family, "", labels, None);
                    writeln!(out, " {v}")?;
                }
                Value::Gauge(v) => {
                    series(&mut out, &family, "", labels, None);
                    writeln!(out, " {v}")?;
                }
                Value::Histogram { sum, buckets } => {
                    let mut cumulative = 0u64;
                    let mut has_inf = false;
                    for (le, n) in buckets {
                        cumulative += n;
                        has_inf |= *le == f64::INFINITY;
                        series(&mut out, &family, "_bucket", labels, Some(*le));
                        writeln!(out, " {cumulative}")?;
                    }
                    if !has_inf {
                        series(&mut out, &family, "_bucket", labels, Some(f64::INFINITY));
                        writeln!(out, " {cumulative}")?;
                    }
                    series(&mut out, &family, "_sum", labels, None);
                    writeln!(out, " {}", float(*sum))?;
                    series(&mut out, &family, "_count", labels, None);
                    writeln!(out, " {cumulative}")?;
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// OpenMetrics 1.0, by prometheus-client

struct Families(Vec<Family>);

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Families")
    }
}

impl Collector for Families {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            // Verbatim too: escape HELP as both formats define it.
            let mut help = String::with_capacity(f.help.len());
            escape(&mut help, f.help, false);
            let mut family = enc.encode_descriptor(f.name, &help, None, kind)?;
            for (labels, value) in &f.samples {
                // prometheus-client writes label values verbatim; OpenMetrics escapes them as
                // the text format does (a pool name is any TOML key, quotes included).
                let labels: Labels = labels
                    .iter()
                    .map(|(k, v)| {
                        let mut e = String::with_capacity(v.len());
                        escape(&mut e, v, true);
                        (*k, e)
                    })
                    .collect();
                let mut sample = family.encode_family(&labels)?;
                match value {
                    Value::Counter(v) => ConstCounter::new(*v).encode(sample)?,
                    Value::Gauge(v) => ConstGauge::new(*v).encode(sample)?,
                    Value::Histogram { sum, buckets } => {
                        // prometheus-client writes `le="+Inf"` only for an upper bound of
                        // `f64::MAX`, and accumulates the per-bucket counts itself.
                        let buckets: Vec<(f64, u64)> = buckets
                            .iter()
                            .map(|(le, n)| (if le.is_infinite() { f64::MAX } else { *le }, *n))
                            .collect();
                        let count = buckets.iter().map(|(_, n)| n).sum();
                        sample.encode_histogram::<NoLabelSet>(*sum, count, &buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

pub fn encode_openmetrics(families: Vec<Family>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("text/plain;q=1, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }

    #[test]
    fn text_counters_histograms_and_escaping() {
        let fams = vec![
            Family {
                name: "x_requests",
                help: "a \\ b\nc",
                kind: Kind::Counter,
                samples: vec![(vec![("a", "q\"\\\n".into())], Value::Counter(3))],
            },
            Family {
                name: "x_seconds",
                help: "h",
                kind: Kind::Histogram,
                samples: vec![(
                    vec![("a", "b".into())],
                    Value::Histogram {
                        sum: 0.5,
                        buckets: vec![(0.1, 1), (1.0, 2), (f64::INFINITY, 1)],
                    },
                )],
            },
        ];
        let t = encode_text(&fams).unwrap();
        assert_eq!(
            t,
            "# HELP x_requests_total a \\\\ b\\nc\n# TYPE x_requests_total counter\n\
             x_requests_total{a=\"q\\\"\\\\\\n\"} 3\n\
             # HELP x_seconds h\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{a=\"b\",le=\"0.1\"} 1\nx_seconds_bucket{a=\"b\",le=\"1\"} 3\n\
             x_seconds_bucket{a=\"b\",le=\"+Inf\"} 4\nx_seconds_sum{a=\"b\"} 0.5\n\
             x_seconds_count{a=\"b\"} 4\n"
        );
        let om = encode_openmetrics(fams).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE x_requests counter\n"), "{om}");
        assert!(om.contains("# HELP x_requests a \\\\ b\\nc\n"), "{om}");
        assert!(om.contains(r#"x_requests_total{a="q\"\\\n"} 3"#), "{om}");
        assert!(
            om.contains("x_seconds_bucket{le=\"+Inf\",a=\"b\"} 4\n"),
            "{om}"
        );
    }
}
