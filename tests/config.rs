//! `balancer::Config::parse` against the contract: defaults, units, the full example's values,
//! and errors that carry the file, the line and column, and the dotted key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use balancer::config::{HostMatch, StatusSet, StrategyKind};
use balancer::{Config, ConfigError};

const SMALLEST: &str = r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "f.toml", None)
}

fn ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("should parse: {e}\n{text}"))
}

fn err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(_) => panic!("should be rejected:\n{text}"),
        Err(e) => e,
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} must be on exactly one line");
    hits[0]
}

fn statuses(set: StatusSet) -> Vec<u16> {
    set.iter().collect()
}

fn with_limits(limits: &str) -> Config {
    ok(&format!("{SMALLEST}\n[limits]\n{limits}\n"))
}

// ---------------------------------------------------------------------------------------------
// Defaults.

#[test]
fn smallest_file_gets_the_contract_defaults() {
    let c = ok(SMALLEST);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert!(c.watch);
    assert!(
        c.admin.is_none(),
        "no admin listener when [admin] is absent"
    );
    assert!(c.log.access);
    assert_eq!(c.log.level, "info");

    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert!(c.listeners[0].tls.is_none());

    assert_eq!(c.limits.max_header_bytes, 65536);
    assert_eq!(c.limits.max_body_bytes, 0);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert!(!c.limits.allow_underscores_in_headers);

    assert!(c.routes.is_empty());
    assert_eq!(c.pools.len(), 1);
    let p = &c.pools[0];
    assert_eq!(p.name, "web");
    assert_eq!(p.strategy, StrategyKind::RoundRobin);
    let addrs: Vec<&str> = p.backends.iter().map(|b| b.address.as_str()).collect();
    assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
    assert!(p.backends.iter().all(|b| b.weight == 1));
    assert_eq!(p.backends[1].addr, "127.0.0.1:9002".parse().unwrap());
    assert!(p.tls.is_none());
    assert!(
        p.health_check.is_none(),
        "no active checks when the table is absent"
    );

    assert_eq!(p.breaker.consecutive_failures, 5);
    assert_eq!(p.breaker.open_duration, Duration::from_secs(10));
    assert_eq!(p.breaker.half_open_requests, 1);
    assert_eq!(statuses(p.breaker.failure_statuses), [502, 503, 504]);
    assert_eq!(p.breaker.max_ejected_percent, 50);

    assert_eq!(p.timeouts.connect, Duration::from_secs(2));
    assert_eq!(p.timeouts.response, Duration::from_secs(30));
    assert_eq!(p.timeouts.idle, Duration::from_secs(60));
    assert_eq!(p.attempts, 2);
}

#[test]
fn empty_subtables_get_the_same_defaults() {
    let c = ok(&format!(
        "{SMALLEST}\n[log]\n[limits]\n[pools.web.health_check]\n[pools.web.circuit_breaker]\n[pools.web.timeouts]\n[pools.web.retries]\n"
    ));
    assert!(c.log.access);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.limits.max_header_bytes, 65536);
    assert_eq!(c.limits.max_body_bytes, 0);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert!(!c.limits.allow_underscores_in_headers);
    let p = &c.pools[0];
    let hc = p
        .health_check
        .as_ref()
        .expect("the table is present: checks are on");
    assert_eq!(hc.path, "/healthz");
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!(hc.healthy_threshold, 2);
    assert_eq!(hc.unhealthy_threshold, 3);
    assert_eq!(p.breaker.consecutive_failures, 5);
    assert_eq!(p.breaker.open_duration, Duration::from_secs(10));
    assert_eq!(p.breaker.half_open_requests, 1);
    assert_eq!(statuses(p.breaker.failure_statuses), [502, 503, 504]);
    assert_eq!(p.breaker.max_ejected_percent, 50);
    assert_eq!(p.timeouts.connect, Duration::from_secs(2));
    assert_eq!(p.timeouts.response, Duration::from_secs(30));
    assert_eq!(p.timeouts.idle, Duration::from_secs(60));
    assert_eq!(p.attempts, 2);
}

#[test]
fn partial_subtables_keep_the_other_defaults() {
    let c = ok(&format!(
        "{SMALLEST}\n[pools.web.health_check]\npath = \"/up\"\n[pools.web.timeouts]\nconnect = \"250ms\"\n"
    ));
    let p = &c.pools[0];
    let hc = p.health_check.as_ref().unwrap();
    assert_eq!(hc.path, "/up");
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!(p.timeouts.connect, Duration::from_millis(250));
    assert_eq!(p.timeouts.response, Duration::from_secs(30));
    assert_eq!(p.timeouts.idle, Duration::from_secs(60));
}

// ---------------------------------------------------------------------------------------------
// Units.

#[test]
fn sizes_accept_integers_and_binary_units() {
    let c = with_limits("max_header_bytes = \"64KiB\"\nmax_body_bytes = \"10MiB\"");
    assert_eq!(c.limits.max_header_bytes, 64 * 1024);
    assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);

    let c = with_limits("max_header_bytes = 32768\nmax_body_bytes = 1048576");
    assert_eq!(c.limits.max_header_bytes, 32768);
    assert_eq!(c.limits.max_body_bytes, 1_048_576);

    let c = with_limits("max_body_bytes = 0");
    assert_eq!(c.limits.max_body_bytes, 0, "0 = unlimited is allowed");

    let c = with_limits("max_body_bytes = \"1GiB\"");
    assert_eq!(c.limits.max_body_bytes, 1 << 30);
}

#[test]
fn sizes_reject_bad_units_with_key_and_position() {
    let text = format!("{SMALLEST}\n[limits]\nmax_body_bytes = \"10XB\"\n");
    let e = err(&text);
    assert_eq!(e.file, "f.toml");
    assert_eq!(e.key.as_deref(), Some("limits.max_body_bytes"), "{e}");
    assert_eq!(e.line, Some((line_of(&text, "10XB"), 18)), "{e}");
    assert!(
        e.to_string().starts_with(&format!(
            "f.toml:{}:18: limits.max_body_bytes: ",
            line_of(&text, "10XB")
        )),
        "{e}"
    );

    for bad in [
        "\"KiB\"",
        "\"-5\"",
        "-5",
        "\"ten\"",
        "\"99999999999999999999\"",
    ] {
        let text = format!("{SMALLEST}\n[limits]\nmax_body_bytes = {bad}\n");
        let e = err(&text);
        assert_eq!(
            e.key.as_deref(),
            Some("limits.max_body_bytes"),
            "{bad}: {e}"
        );
        assert_eq!(
            e.line.map(|l| l.0),
            Some(line_of(&text, "max_body_bytes")),
            "{bad}: {e}"
        );
    }
}

#[test]
fn durations_need_a_unit() {
    let c = ok(&format!(
        "shutdown_grace = \"1m\"\n{SMALLEST}\n[pools.web.timeouts]\nconnect = \"250ms\"\nresponse = \"2s\"\nidle = \"1m30s\"\n"
    ));
    assert_eq!(c.shutdown_grace, Duration::from_secs(60));
    let t = c.pools[0].timeouts;
    assert_eq!(t.connect, Duration::from_millis(250));
    assert_eq!(t.response, Duration::from_secs(2));
    assert_eq!(t.idle, Duration::from_secs(90));

    let text = format!("{SMALLEST}\n[pools.web.timeouts]\nconnect = \"10\"\n");
    let e = err(&text);
    assert_eq!(e.key.as_deref(), Some("pools.web.timeouts.connect"), "{e}");
    assert_eq!(e.line, Some((line_of(&text, "connect"), 11)), "{e}");

    let text =
        format!("{SMALLEST}\n[pools.web.circuit_breaker]\nopen_duration = \"ten seconds\"\n");
    let e = err(&text);
    assert_eq!(
        e.key.as_deref(),
        Some("pools.web.circuit_breaker.open_duration"),
        "{e}"
    );
    assert_eq!(
        e.line.map(|l| l.0),
        Some(line_of(&text, "open_duration")),
        "{e}"
    );
}

#[test]
fn shutdown_grace_zero_is_allowed_but_timeouts_zero_are_not() {
    let c = ok(&format!("shutdown_grace = \"0s\"\n{SMALLEST}"));
    assert_eq!(c.shutdown_grace, Duration::ZERO);
    let text = format!("{SMALLEST}\n[pools.web.timeouts]\nresponse = \"0s\"\n");
    let e = err(&text);
    assert_eq!(e.key.as_deref(), Some("pools.web.timeouts.response"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The full example.

const EVERYTHING: &str = r#"shutdown_grace = "30s"
watch = true

[admin]
bind = "127.0.0.1:9900"

[log]
access = true
level = "info"

[[listeners]]
bind = "0.0.0.0:8443"
tls = { cert = "certs/site.pem", key = "certs/site.key" }

[limits]
max_header_bytes = 65536
max_body_bytes = 0
header_timeout = "10s"
max_connections = 10000
idle_timeout = "60s"
allow_underscores_in_headers = false

[[routes]]
host = "api.example.com"
path_prefix = "/v1"
pool = "api"

[pools.api]
strategy = "round_robin"
backends = [
  "127.0.0.1:9001",
  { address = "127.0.0.1:9002", weight = 3 }
]
tls = false

[pools.api.health_check]
kind = "http"
service = ""
path = "/healthz"
interval = "2s"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 3

[pools.api.circuit_breaker]
consecutive_failures = 5
open_duration = "10s"
half_open_requests = 1
failure_statuses = [502, 503, 504]
max_ejected_percent = 50

[pools.api.timeouts]
connect = "2s"
response = "30s"
idle = "60s"

[pools.api.retries]
attempts = 2
"#;

#[test]
fn full_example_parses_to_its_values() {
    let base = Path::new("/etc/balancer");
    let c = Config::parse(EVERYTHING, "/etc/balancer/balancer.toml", Some(base))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert!(c.watch);
    assert_eq!(
        c.admin.as_ref().unwrap().bind,
        "127.0.0.1:9900".parse().unwrap()
    );
    assert!(c.log.access);
    assert_eq!(c.log.level, "info");

    assert_eq!(c.listeners.len(), 1);
    let l = &c.listeners[0];
    assert_eq!(l.bind, "0.0.0.0:8443".parse().unwrap());
    let tls = l.tls.as_ref().expect("listener TLS");
    assert_eq!(tls.certificates.len(), 1);
    // Relative certificate paths are resolved against the config file's directory.
    assert_eq!(
        tls.certificates[0].cert,
        PathBuf::from("/etc/balancer/certs/site.pem")
    );
    assert_eq!(
        tls.certificates[0].key,
        PathBuf::from("/etc/balancer/certs/site.key")
    );

    assert_eq!(c.limits.max_header_bytes, 65536);
    assert_eq!(c.limits.max_body_bytes, 0);
    assert_eq!(c.limits.header_timeout, Duration::from_secs(10));
    assert_eq!(c.limits.max_connections, 10000);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(60));
    assert!(!c.limits.allow_underscores_in_headers);

    assert_eq!(c.routes.len(), 1);
    let r = &c.routes[0];
    assert_eq!(r.host, Some(HostMatch::Exact("api.example.com".into())));
    assert_eq!(r.path_prefix, "/v1");
    assert_eq!(r.pool, "api");

    let p = &c.pools[0];
    assert_eq!(p.name, "api");
    assert_eq!(p.strategy, StrategyKind::RoundRobin);
    let b: Vec<(&str, u32)> = p
        .backends
        .iter()
        .map(|b| (b.address.as_str(), b.weight))
        .collect();
    assert_eq!(b, [("127.0.0.1:9001", 1), ("127.0.0.1:9002", 3)]);
    assert!(p.tls.is_none(), "tls = false");
    let hc = p.health_check.as_ref().unwrap();
    assert_eq!(
        (
            hc.path.as_str(),
            hc.interval,
            hc.timeout,
            hc.healthy_threshold,
            hc.unhealthy_threshold
        ),
        (
            "/healthz",
            Duration::from_secs(2),
            Duration::from_secs(1),
            2,
            3
        )
    );
    assert_eq!(p.breaker.consecutive_failures, 5);
    assert_eq!(p.breaker.open_duration, Duration::from_secs(10));
    assert_eq!(p.breaker.half_open_requests, 1);
    assert_eq!(statuses(p.breaker.failure_statuses), [502, 503, 504]);
    assert_eq!(p.breaker.max_ejected_percent, 50);
    assert_eq!(p.timeouts.connect, Duration::from_secs(2));
    assert_eq!(p.timeouts.response, Duration::from_secs(30));
    assert_eq!(p.timeouts.idle, Duration::from_secs(60));
    assert_eq!(p.attempts, 2);
}

#[test]
fn full_example_equals_smallest_plus_defaults() {
    // Writing every default explicitly must give the same pool settings as leaving them out.
    let explicit = ok(EVERYTHING);
    let implicit = ok(
        "[admin]\nbind = \"127.0.0.1:9900\"\n[[listeners]]\nbind = \"0.0.0.0:8443\"\ntls = { cert = \"certs/site.pem\", key = \"certs/site.key\" }\n[[routes]]\nhost = \"api.example.com\"\npath_prefix = \"/v1\"\npool = \"api\"\n[pools.api]\nbackends = [\"127.0.0.1:9001\", { address = \"127.0.0.1:9002\", weight = 3 }]\n[pools.api.health_check]\n",
    );
    assert_eq!(explicit, implicit);
}

#[test]
fn commented_out_alternatives_of_the_full_example_parse() {
    // Several certificates chosen by SNI; pool TLS with a private CA and a server name.
    let text = r#"
[[listeners]]
bind = "0.0.0.0:8443"

[[listeners.tls.certificates]]
cert = "certs/a.pem"
key  = "certs/a.key"

[[listeners.tls.certificates]]
cert = "/abs/b.pem"
key  = "/abs/b.key"

[pools.api]
strategy = "least_connections"
backends = ["127.0.0.1:9001"]
tls = { ca = "certs/internal-ca.pem", server_name = "api.internal" }

[pools.other]
backends = ["127.0.0.1:9002"]
tls = true
"#;
    let c =
        Config::parse(text, "b.toml", Some(Path::new("/cfg"))).unwrap_or_else(|e| panic!("{e}"));
    let certs = &c.listeners[0].tls.as_ref().unwrap().certificates;
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0].cert, PathBuf::from("/cfg/certs/a.pem"));
    assert_eq!(certs[0].key, PathBuf::from("/cfg/certs/a.key"));
    assert_eq!(certs[1].cert, PathBuf::from("/abs/b.pem"));
    let api = &c.pools[0];
    assert_eq!(api.strategy, StrategyKind::LeastConnections);
    let tls = api.tls.as_ref().unwrap();
    assert_eq!(
        tls.ca.as_deref(),
        Some(Path::new("/cfg/certs/internal-ca.pem"))
    );
    assert_eq!(tls.server_name.as_deref(), Some("api.internal"));
    let other = c.pools[1].tls.as_ref().expect("tls = true");
    assert!(other.ca.is_none() && other.server_name.is_none());
}

#[test]
fn pools_keep_file_order() {
    let c = ok("[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.zeta]\nbackends = [\"127.0.0.1:1\"]\n[pools.alpha]\nbackends = [\"127.0.0.1:2\"]\n[pools.mid]\nbackends = [\"127.0.0.1:3\"]\n");
    let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha", "mid"]);
}

#[test]
fn routes_keep_file_order_and_host_patterns() {
    let c = ok(&format!(
        "{SMALLEST}\n[[routes]]\nhost = \"*.Example.com\"\npool = \"web\"\n[[routes]]\npath_prefix = \"/v2\"\npool = \"web\"\n"
    ));
    assert_eq!(c.routes.len(), 2);
    assert_eq!(
        c.routes[0].host,
        Some(HostMatch::Suffix(".example.com".into()))
    );
    assert_eq!(c.routes[0].path_prefix, "/");
    assert_eq!(c.routes[1].host, None);
    assert_eq!(c.routes[1].path_prefix, "/v2");
}

// ---------------------------------------------------------------------------------------------
// Errors carry the key and the position.

/// `(line, key-or-message fragment)` checks for one rejected text.
fn assert_err_at(text: &str, at: &str, key: &str) -> ConfigError {
    let e = err(text);
    assert_eq!(e.file, "f.toml");
    let (line, col) = e.line.unwrap_or_else(|| panic!("no position: {e}"));
    assert_eq!(line, line_of(text, at), "line of {at:?}: {e}\n{text}");
    assert!(col >= 1);
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("f.toml:{line}:{col}:")),
        "{shown}"
    );
    assert!(shown.contains(key), "{shown} should name {key:?}");
    e
}

#[test]
fn unknown_keys_are_errors_at_every_depth() {
    assert_err_at(&format!("colour = 1\n{SMALLEST}"), "colour", "colour");
    assert_err_at(
        &format!("{SMALLEST}\n[admin]\nbind = \"127.0.0.1:9900\"\nport = 1\n"),
        "port",
        "port",
    );
    assert_err_at(
        &format!("{SMALLEST}\n[log]\nformat = \"json\"\n"),
        "format",
        "format",
    );
    assert_err_at(
        &format!("{SMALLEST}\n[pools.web.health_check]\nexpect = 200\n"),
        "expect",
        "expect",
    );
    assert_err_at(
        &format!("{SMALLEST}\n[pools.web.timeouts]\nread = \"1s\"\n"),
        "read",
        "read",
    );
    assert_err_at(
        &format!("{SMALLEST}\n[pools.web.retries]\nretry_on = \"5xx\"\n"),
        "retry_on",
        "retry_on",
    );
    assert_err_at(
        &format!("{SMALLEST}\n[[routes]]\npool = \"web\"\nmethod = \"GET\"\n"),
        "method",
        "method",
    );
    assert_err_at(
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\n  { address = \"127.0.0.1:9001\", wieght = 2 },\n]\n",
        "wieght",
        "wieght",
    );
    assert_err_at(
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\ntls = { ca = \"x.pem\", sni = \"a\" }\n",
        "sni",
        "sni",
    );
}

#[test]
fn semantic_errors_name_the_dotted_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\npool = \"api\"\n",
            "\"api\"",
            "routes[0].pool",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n",
            "bind",
            "listeners[0].bind",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:\"]\n",
            "backends",
            "pools.web.backends[1]",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9001\", weight = -1 }]\n",
            "weight",
            "pools.web.backends[0].weight",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9001\", weight = 1001 }]\n",
            "weight",
            "pools.web.backends[0].weight",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = []\n",
            "backends",
            "pools.web.backends",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[[listeners]]\nbind = \"127.0.0.1:8080\" # dup\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n",
            "# dup",
            "listeners[1].bind",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nstrategy = \"random\"\nbackends = [\"127.0.0.1:9001\"]\n",
            "random",
            "pools.web.strategy",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9001\"]\n",
            "backends",
            "pools.web.backends[1]",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n[pools.web.retries]\nattempts = 0\n",
            "attempts",
            "pools.web.retries.attempts",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n[pools.web.health_check]\nhealthy_threshold = 0\n",
            "healthy_threshold",
            "pools.web.health_check.healthy_threshold",
        ),
        (
            "[log]\nlevel = \"loud\"\n[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n",
            "loud",
            "log.level",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\npath_prefix = \"v1\"\npool = \"web\"\n",
            "v1",
            "routes[0].path_prefix",
        ),
    ];
    for (text, at, key) in cases {
        let e = assert_err_at(text, at, key);
        assert_eq!(e.key.as_deref(), Some(*key), "{e}");
    }
}

#[test]
fn parser_errors_name_table_and_key() {
    // Unknown field under a header with a trailing comment: the key is the bare table name.
    let text = format!("{SMALLEST}\n[pools.web.timeouts]   # comment [x]\nconect = \"1s\"\n");
    let e = err(&text);
    assert_eq!(e.key.as_deref(), Some("pools.web.timeouts"), "{e}");
    assert_eq!(e.line, Some((line_of(&text, "conect"), 1)), "{e}");
    assert!(e.msg.contains("conect"), "{e}");

    // A type error points at the value and names the key in full.
    let text = format!("{SMALLEST}\n[[listeners]]  # second\nbind = 8081\n");
    let e = err(&text);
    assert_eq!(e.key.as_deref(), Some("listeners[1].bind"), "{e}");
    assert_eq!(e.line, Some((line_of(&text, "8081"), 8)), "{e}");

    let e = err(&format!("shutdown_grace = 30\n{SMALLEST}"));
    assert_eq!(e.key.as_deref(), Some("shutdown_grace"), "{e}");
    assert_eq!(e.line, Some((1, 18)), "{e}");

    let e = err(&format!(
        "{SMALLEST}\n[pools.web.health_check]\npath = \"/x\"\nhealthy_threshold = \"2\"\n"
    ));
    assert_eq!(
        e.key.as_deref(),
        Some("pools.web.health_check.healthy_threshold"),
        "{e}"
    );

    // Inside an inline table: the key runs down to the field.
    let e = err("[[listeners]]\nbind = \"127.0.0.1:8080\"\ntls = { cert = 1, key = \"k\" }\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n");
    assert_eq!(e.key.as_deref(), Some("listeners[0].tls.cert"), "{e}");
    assert!(e.msg.starts_with("must be a string"), "{e}");
    assert_eq!(e.line, Some((3, 16)), "{e}");
}

#[test]
fn weight_out_of_range_points_at_the_value() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", weight = 1001 },\n]\n";
    let e = err(text);
    assert_eq!(e.line, Some((6, 42)), "{e}");
    assert_eq!(e.key.as_deref(), Some("pools.web.backends[1].weight"));
}

#[test]
fn weight_zero_and_backup_are_accepted() {
    let c = ok("[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [\"127.0.0.1:9001\", { address = \"127.0.0.1:9002\", weight = 0 }, { address = \"127.0.0.1:9003\", backup = true }]\n");
    let b: Vec<(u32, bool)> = c.pools[0]
        .backends
        .iter()
        .map(|b| (b.weight, b.backup))
        .collect();
    assert_eq!(b, [(1, false), (0, false), (1, true)]);
    let e = err("[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9003\", backup = \"yes\" }]\n");
    assert!(e.to_string().contains("backup"), "{e}");
}

#[test]
fn pool_without_backends_points_at_the_pool() {
    let text = format!("{SMALLEST}\n[pools.api]\nstrategy = \"least_connections\"\n");
    let e = err(&text);
    assert_eq!(e.key.as_deref(), Some("pools.api.backends"), "{e}");
    let (line, _) = e.line.unwrap_or_else(|| panic!("no position: {e}"));
    let header = line_of(&text, "[pools.api]");
    assert!(
        line == header || line == header + 1,
        "should point at [pools.api] (line {header}): {e}"
    );
}

#[test]
fn missing_listeners_or_pools_are_errors() {
    let e = err("[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n");
    assert_eq!(e.key.as_deref(), Some("listeners"), "{e}");
    let e = err("[[listeners]]\nbind = \"127.0.0.1:8080\"\n");
    assert_eq!(e.key.as_deref(), Some("pools"), "{e}");
}

#[test]
fn errors_count_lines_with_crlf_and_unicode() {
    // Columns count characters, not bytes; CRLF line endings do not shift the line number.
    let text = "# café ünïcödé\r\n[[listeners]]\r\nbind = \"127.0.0.1:8080\"\r\n[pools.web]\r\nbackends = [\"127.0.0.1:9001\"]\r\nstrategy = \"random\" # é\r\n";
    let e = err(text);
    assert_eq!(e.line, Some((6, 12)), "{e}");
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9001\", weight = 2 }, { address = \"é:1\", weight = 1001 }]\n";
    // "é:1" does not resolve either (an error at column 69); the weight's is the one wanted.
    let all = Config::check(text, "f.toml", None).unwrap_err().errors;
    let Some(e) = all
        .iter()
        .find(|e| e.key.as_deref() == Some("pools.web.backends[1].weight"))
    else {
        panic!("no weight error in {all:?}");
    };
    assert_eq!(
        e.key.as_deref(),
        Some("pools.web.backends[1].weight"),
        "{e}"
    );
    assert_eq!(e.line, Some((4, 85)), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Routes carry the index of their pool.

#[test]
fn routes_carry_the_index_of_their_pool_in_file_order() {
    // File order differs from name order, and the first pool is never the answer by accident.
    let c = ok(r#"[[listeners]]
bind = "127.0.0.1:8080"

[[routes]]
path_prefix = "/m"
pool = "mid"

[[routes]]
pool = "alpha"

[[routes]]
path_prefix = "/z"
pool = "zeta"

[pools.zeta]
backends = ["127.0.0.1:1"]
[pools.alpha]
backends = ["127.0.0.1:2"]
[pools.mid]
backends = ["127.0.0.1:3"]
"#);
    let idx: Vec<(usize, &str)> = c
        .routes
        .iter()
        .map(|r| (r.pool_index, r.pool.as_str()))
        .collect();
    assert_eq!(idx, [(2, "mid"), (1, "alpha"), (0, "zeta")]);
    for r in &c.routes {
        assert_eq!(c.pools[r.pool_index].name, r.pool);
    }
}

// ---------------------------------------------------------------------------------------------
// [limits] idle_timeout and allow_underscores_in_headers.

#[test]
fn limits_idle_timeout_and_underscores_take_values() {
    let c = with_limits("idle_timeout = \"5m\"\nallow_underscores_in_headers = true");
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert!(c.limits.allow_underscores_in_headers);
    // Independent of the pool's upstream idle timeout.
    assert_eq!(c.pools[0].timeouts.idle, Duration::from_secs(60));

    let c = with_limits("idle_timeout = \"250ms\"\nallow_underscores_in_headers = false");
    assert_eq!(c.limits.idle_timeout, Duration::from_millis(250));
    assert!(!c.limits.allow_underscores_in_headers);
}

#[test]
fn limits_idle_timeout_and_underscores_reject_bad_values() {
    for (bad, col) in [("\"0s\"", 16), ("\"60\"", 16), ("\"soon\"", 16), ("60", 16)] {
        let text = format!("{SMALLEST}\n[limits]\nidle_timeout = {bad}\n");
        let e = assert_err_at(&text, "idle_timeout", "limits.idle_timeout");
        assert_eq!(e.key.as_deref(), Some("limits.idle_timeout"), "{bad}: {e}");
        assert_eq!(e.line.map(|l| l.1), Some(col), "{bad}: {e}");
    }
    for bad in ["\"yes\"", "1"] {
        let text = format!("{SMALLEST}\n[limits]\nallow_underscores_in_headers = {bad}\n");
        let e = assert_err_at(
            &text,
            "allow_underscores",
            "limits.allow_underscores_in_headers",
        );
        assert_eq!(
            e.key.as_deref(),
            Some("limits.allow_underscores_in_headers"),
            "{bad}: {e}"
        );
        assert_eq!(e.line.map(|l| l.1), Some(32), "{bad}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// [pools.NAME.circuit_breaker] failure_statuses and max_ejected_percent.

fn with_breaker(lines: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        "{SMALLEST}\n[pools.web.circuit_breaker]\n{lines}\n"
    ))
}

#[test]
fn failure_statuses_take_a_list_of_codes() {
    let c = with_breaker("failure_statuses = [500, 429, 502, 599, 100]").unwrap();
    let set = c.pools[0].breaker.failure_statuses;
    assert_eq!(statuses(set), [100, 429, 500, 502, 599]);
    assert!(set.contains(429) && !set.contains(503) && !set.contains(504));

    let c = with_breaker("failure_statuses = []").unwrap();
    let set = c.pools[0].breaker.failure_statuses;
    assert!(set.is_empty(), "[] means no status counts as a failure");
    assert!((100..=599).all(|s| !set.contains(s)));

    // Repeats are harmless; other breaker values keep their defaults.
    let c = with_breaker("failure_statuses = [503, 503]").unwrap();
    assert_eq!(statuses(c.pools[0].breaker.failure_statuses), [503]);
    assert_eq!(c.pools[0].breaker.consecutive_failures, 5);
    assert_eq!(c.pools[0].breaker.max_ejected_percent, 50);
}

#[test]
fn failure_statuses_reject_bad_elements_with_index_and_position() {
    // (element list, index of the bad element, the bad element as written)
    let cases: &[(&str, usize, &str)] = &[
        ("[502, 99]", 1, "99"),
        ("[600]", 0, "600"),
        ("[502, 503, 0]", 2, "0"),
        ("[-502]", 0, "-502"),
        ("[502, 70000]", 1, "70000"),
        ("[\"502\"]", 0, "\"502\""),
        ("[502, 503.0]", 1, "503.0"),
        ("[true]", 0, "true"),
    ];
    for (list, index, element) in cases {
        let line = format!("failure_statuses = {list}");
        let text = format!("{SMALLEST}\n[pools.web.circuit_breaker]\n{line}\n");
        let e = err(&text);
        let key = format!("pools.web.circuit_breaker.failure_statuses[{index}]");
        assert_eq!(e.key.as_deref(), Some(key.as_str()), "{list}: {e}");
        let col = line.rfind(element).map(|c| c + 1);
        assert_eq!(
            e.line,
            Some((line_of(&text, "failure_statuses"), col.unwrap_or(0))),
            "{list}: {e}"
        );
        assert!(
            e.msg.contains(element),
            "{list}: should show the element: {e}"
        );
        assert!(
            e.to_string().starts_with(&format!(
                "f.toml:{}:{}: {key}: ",
                line_of(&text, "failure_statuses"),
                col.unwrap_or(0)
            )),
            "{e}"
        );
    }
    // Not a list at all.
    let text = format!("{SMALLEST}\n[pools.web.circuit_breaker]\nfailure_statuses = 502\n");
    let e = assert_err_at(&text, "failure_statuses", "failure_statuses");
    assert_eq!(
        e.key.as_deref(),
        Some("pools.web.circuit_breaker.failure_statuses"),
        "{e}"
    );
}

#[test]
fn max_ejected_percent_is_a_percentage() {
    for n in [0u8, 1, 50, 100] {
        let c = with_breaker(&format!("max_ejected_percent = {n}")).unwrap();
        assert_eq!(c.pools[0].breaker.max_ejected_percent, n);
    }
    for bad in ["101", "-1", "256", "9223372036854775807", "\"50\"", "50.0"] {
        let text =
            format!("{SMALLEST}\n[pools.web.circuit_breaker]\nmax_ejected_percent = {bad}\n");
        let e = assert_err_at(&text, "max_ejected_percent", "max_ejected_percent");
        assert_eq!(
            e.key.as_deref(),
            Some("pools.web.circuit_breaker.max_ejected_percent"),
            "{bad}: {e}"
        );
        assert_eq!(e.line.map(|l| l.1), Some(23), "{bad}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Upper bounds: no value in a file can panic the process or overflow later arithmetic.

/// Every duration key, as `(table header or "" for top level, key, dotted key)`.
const DURATION_KEYS: &[(&str, &str, &str)] = &[
    ("", "shutdown_grace", "shutdown_grace"),
    ("[limits]", "header_timeout", "limits.header_timeout"),
    ("[limits]", "idle_timeout", "limits.idle_timeout"),
    (
        "[pools.web.health_check]",
        "interval",
        "pools.web.health_check.interval",
    ),
    (
        "[pools.web.health_check]",
        "timeout",
        "pools.web.health_check.timeout",
    ),
    (
        "[pools.web.circuit_breaker]",
        "open_duration",
        "pools.web.circuit_breaker.open_duration",
    ),
    (
        "[pools.web.timeouts]",
        "connect",
        "pools.web.timeouts.connect",
    ),
    (
        "[pools.web.timeouts]",
        "response",
        "pools.web.timeouts.response",
    ),
    ("[pools.web.timeouts]", "idle", "pools.web.timeouts.idle"),
];

/// `key = value` placed in `table` of the smallest file (top-level keys go first).
fn with_value(table: &str, key: &str, value: &str) -> String {
    if table.is_empty() {
        format!("{key} = {value}\n{SMALLEST}")
    } else {
        format!("{SMALLEST}\n{table}\n{key} = {value}\n")
    }
}

/// Parses in a guard so that a panic is reported as the input that caused it.
fn rejected_cleanly(text: &str, dotted: &str) -> ConfigError {
    let parsed = std::panic::catch_unwind(|| Config::parse(text, "f.toml", None));
    let e = match parsed {
        Err(_) => panic!("parsing panicked:\n{text}"),
        Ok(Ok(_)) => panic!("should be rejected:\n{text}"),
        Ok(Err(e)) => e,
    };
    let leaf = dotted.rsplit('.').next().unwrap_or(dotted);
    let (line, col) = e.line.unwrap_or_else(|| panic!("no position: {e}"));
    assert_eq!(line, line_of(text, &format!("{leaf} =")), "{e}\n{text}");
    assert!(col > leaf.len(), "should point at the value: {e}");
    assert!(e.to_string().contains(dotted), "{e} should name {dotted}");
    e
}

#[test]
fn every_duration_key_is_capped_at_a_day() {
    for (table, key, dotted) in DURATION_KEYS {
        let c = ok(&with_value(table, key, "\"24h\""));
        let text = format!("{c:?}");
        assert!(text.contains("86400s"), "{dotted} = 24h is allowed");

        for bad in [
            "\"24h 1ms\"",
            "\"25h\"",
            "\"2days\"",
            "\"1y\"",
            "\"99999999999999h\"",
            "\"18446744073709551615s\"",
            "\"99999999999999999999999999h\"",
        ] {
            let e = rejected_cleanly(&with_value(table, key, bad), dotted);
            assert_eq!(e.key.as_deref(), Some(*dotted), "{bad}: {e}");
            if bad.len() < 12 {
                assert!(
                    e.msg.contains("maximum of 24h"),
                    "{bad}: names the cap: {e}"
                );
            }
        }
        for bad in [
            "\"-5s\"",
            "-5",
            "99999999999999999999",
            "\"\"",
            "\"1.5.3s\"",
        ] {
            rejected_cleanly(&with_value(table, key, bad), dotted);
        }
    }
}

#[test]
fn a_zero_duration_is_refused_except_for_shutdown_grace() {
    for (table, key, dotted) in DURATION_KEYS {
        let text = with_value(table, key, "\"0s\"");
        if *key == "shutdown_grace" {
            assert_eq!(ok(&text).shutdown_grace, Duration::ZERO);
        } else {
            let e = rejected_cleanly(&text, dotted);
            assert!(e.msg.contains("greater than zero"), "{e}");
        }
    }
}

#[test]
fn every_integer_key_has_bounds() {
    // (table, key, dotted key, smallest valid, largest valid)
    let keys: &[(&str, &str, &str, i64, i64)] = &[
        (
            "[limits]",
            "max_header_bytes",
            "limits.max_header_bytes",
            1024,
            1 << 20,
        ),
        (
            "[limits]",
            "max_connections",
            "limits.max_connections",
            1,
            10_000_000,
        ),
        (
            "[pools.web.health_check]",
            "healthy_threshold",
            "pools.web.health_check.healthy_threshold",
            1,
            10_000,
        ),
        (
            "[pools.web.health_check]",
            "unhealthy_threshold",
            "pools.web.health_check.unhealthy_threshold",
            1,
            10_000,
        ),
        (
            "[pools.web.circuit_breaker]",
            "consecutive_failures",
            "pools.web.circuit_breaker.consecutive_failures",
            0,
            10_000,
        ),
        (
            "[pools.web.circuit_breaker]",
            "half_open_requests",
            "pools.web.circuit_breaker.half_open_requests",
            1,
            10_000,
        ),
        (
            "[pools.web.circuit_breaker]",
            "max_ejected_percent",
            "pools.web.circuit_breaker.max_ejected_percent",
            0,
            100,
        ),
        (
            "[pools.web.retries]",
            "attempts",
            "pools.web.retries.attempts",
            1,
            10,
        ),
    ];
    for (table, key, dotted, min, max) in keys {
        ok(&with_value(table, key, &min.to_string()));
        ok(&with_value(table, key, &max.to_string()));
        let mut bad = vec![
            (max + 1).to_string(),
            (-1i64).to_string(),
            i64::MIN.to_string(),
            i64::MAX.to_string(),
            u32::MAX.to_string(),
            (u64::from(u32::MAX) + 1).to_string(),
            "99999999999999999999".to_string(),
            "1e9".to_string(),
            "\"5\"".to_string(),
        ];
        if *min > 0 {
            bad.push((min - 1).to_string());
        }
        for v in &bad {
            let e = rejected_cleanly(&with_value(table, key, v), dotted);
            if v.parse::<i64>().is_ok() {
                // Out of range but a valid integer: validation names the key and the range.
                assert_eq!(e.key.as_deref(), Some(*dotted), "{v}: {e}");
                let negative_size = v.starts_with('-') && e.msg.contains("negative");
                assert!(
                    e.msg.contains(&max.to_string()) || negative_size,
                    "{v}: names the range: {e}"
                );
            }
        }
    }
    // Sizes as strings are bounded the same way.
    for v in [
        "\"2MiB\"",
        "\"1023B\"",
        "\"18446744073709551615\"",
        "\"99999999999GiB\"",
    ] {
        rejected_cleanly(
            &with_value("[limits]", "max_header_bytes", v),
            "limits.max_header_bytes",
        );
    }
    let c = ok(&with_value("[limits]", "max_header_bytes", "\"1MiB\""));
    assert_eq!(c.limits.max_header_bytes, 1 << 20);
    // max_body_bytes is a byte count compared against what was read, never multiplied: any u64.
    let c = ok(&with_value(
        "[limits]",
        "max_body_bytes",
        &i64::MAX.to_string(),
    ));
    assert_eq!(c.limits.max_body_bytes, i64::MAX as u64);
    // Weights keep their own range.
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[pools.web]\nbackends = [{ address = \"127.0.0.1:1\", weight = 9223372036854775807 }]\n";
    rejected_cleanly(text, "pools.web.backends[0].weight");
}

// ---------------------------------------------------------------------------------------------
// `Config::check`: every error at once, and warnings.

#[test]
fn check_reports_every_shape_mistake_with_the_index_the_operator_sees() {
    let text = r#"[[limits]]
max_body_bytes = 1

[[listeners]]
bind = 8080

[[listeners]]
bind = "127.0.0.1:8081"
tls = { cert = "a.pem", kee = "a.key" }

[pools.web]
backends = "127.0.0.1:9001"
tls = "yes"

[pools.api]
backends = [1, { weight = 2 }]
[pools.api.circuit_breaker]
failure_statuses = 502
"#;
    let all = Config::check(text, "f.toml", None).unwrap_err();
    let shown: Vec<String> = all.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        [
            "f.toml:1:1: limits: `[[limits]]` must be written `[limits]` (it is one table)",
            "f.toml:5:8: listeners[0].bind: must be a string (in quotes), not a number (8080)",
            "f.toml:9:7: listeners[1].tls: `cert` and `key` go together",
            "f.toml:9:25: listeners[1].tls: unknown key `kee` (did you mean `key`?)",
            "f.toml:12:12: pools.web.backends: must be a list, such as [ ... ], not a string (\"127.0.0.1:9001\")",
            "f.toml:13:7: pools.web.tls: must be true, false or a table { ca, server_name }, not a string (\"yes\")",
            "f.toml:16:13: pools.api.backends[0]: must be an address string or a table { address, weight, backup }, not a number (1)",
            "f.toml:16:16: pools.api.backends[1]: missing key `address`",
            "f.toml:18:20: pools.api.circuit_breaker.failure_statuses: must be a list, such as [ ... ], not a number (502)",
        ]
    );
    // One error per line, the first exactly as `Config::parse` reports it alone.
    assert_eq!(all.to_string(), shown.join("\n"));
    assert_eq!(err(text).to_string(), shown[0]);
}

#[test]
fn check_keeps_validating_after_a_semantic_error() {
    let text = format!(
        "shutdown_grace = \"5\"\n{SMALLEST}\n[pools.api]\nstrategy = \"random\"\nbackends = [\"127.0.0.1:\", {{ address = \"127.0.0.1:9\", weight = 1001 }}]\n[pools.api.retries]\nattempts = 99\n[[routes]]\npath_prefix = \"v1\"\npool = \"nope\"\n"
    );
    let keys: Vec<String> = Config::check(&text, "f.toml", None)
        .unwrap_err()
        .errors
        .iter()
        .map(|e| e.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "shutdown_grace",
            "pools.api.strategy",
            "pools.api.backends[0]",
            "pools.api.backends[1].weight",
            "pools.api.retries.attempts",
            "routes[0].path_prefix",
            "routes[0].pool",
        ]
    );
}

#[test]
fn check_returns_warnings_with_a_valid_config() {
    let text =
        format!("{SMALLEST}\n[pools.web.health_check]\ninterval = \"1s\"\ntimeout = \"2s\"\n");
    let checked = Config::check(&text, "f.toml", None).unwrap_or_else(|e| panic!("{e}"));
    let shown: Vec<String> = checked.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        shown,
        ["f.toml:9:11: pools.web.health_check.timeout: timeout 2s is longer than the interval 1s: a slow check delays the next one"]
    );
    assert_eq!(checked.config, ok(&text));
    // The contract's full example is clean.
    let c = Config::check(EVERYTHING, "f.toml", None).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}
