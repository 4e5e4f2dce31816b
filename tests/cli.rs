//! The `balancer` binary's command line, run for real: `check` accepts valid files with "ok" and
//! exit 0, and rejects invalid ones with exit 1 and `FILE:LINE:COL: key: message` on stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_balancer");

/// The smallest useful file, verbatim from the contract.
const SMALLEST: &str = r#"[[listeners]]
bind = "127.0.0.1:8080"

[pools.web]
backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
"#;

/// "Everything, with defaults", verbatim from the contract (comments included).
const EVERYTHING: &str = r#"shutdown_grace = "30s"          # drain time on SIGTERM
watch = true                    # reload when the file changes on disk

[admin]                         # optional; no admin listener when absent
bind = "127.0.0.1:9900"

[log]
access = true                   # one line per request on stdout (format in the README)
level = "info"                  # overridden by RUST_LOG

[[listeners]]                   # one or more
bind = "0.0.0.0:8443"
# TLS is optional; with it the listener speaks HTTPS with ALPN h2 and http/1.1.
# One certificate:
tls = { cert = "certs/site.pem", key = "certs/site.key" }
# or several, chosen by SNI (the first is the default):
# [[listeners.tls.certificates]]
# cert = "certs/a.pem"
# key  = "certs/a.key"

[limits]                        # for every listener; exceeded -> 4xx, never a crash
max_header_bytes = 65536        # -> 431
max_body_bytes = 0              # 0 = unlimited; else -> 413
header_timeout = "10s"          # client must finish sending headers within this
max_connections = 10000         # open client connections per listener; beyond it,
                                # new connections wait in the kernel's accept queue

[[routes]]                      # tried in file order; first match wins
host = "api.example.com"        # optional: exact, or "*.example.com"; port ignored
path_prefix = "/v1"             # optional; default "/"
pool = "api"                    # required

[pools.api]
strategy = "round_robin"        # "round_robin" | "least_connections"  (more may be added)
backends = [
  "127.0.0.1:9001",                          # plain address, weight 1
  { address = "127.0.0.1:9002", weight = 3 } # weight applies to every strategy
]
tls = false                     # true: connect to the backends over TLS, verified
                                # against the system's root certificates
# or, for a private CA and/or a name other than the backend address:
# tls = { ca = "certs/internal-ca.pem", server_name = "api.internal" }

[pools.api.health_check]        # optional; no active checks when absent
path = "/healthz"
interval = "2s"
timeout = "1s"
healthy_threshold = 2           # consecutive passes to become healthy again
unhealthy_threshold = 3         # consecutive failures to become unhealthy
# a pass is a 2xx or 3xx answer within the timeout

[pools.api.circuit_breaker]     # per backend; on by default with these values
consecutive_failures = 5        # failures in a row that open the breaker
open_duration = "10s"           # open this long, then half-open
half_open_requests = 1          # trial requests let through while half-open
# a failure is: connect error, timeout, reset, or a 5xx answer from the backend

[pools.api.timeouts]
connect = "2s"                  # -> try another backend, else 502
response = "30s"                # until the backend's response headers -> 504
idle = "60s"                    # idle pooled upstream connections are closed

[pools.api.retries]
attempts = 2                    # total tries; only for idempotent methods, or for
                                # any request that never reached a backend
"#;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

fn run(args: &[&str], cwd: Option<&Path>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().expect("run the balancer binary").into()
}

/// Writes `text` to a fresh temp dir and runs `balancer check --config FILE`.
fn check(text: &str) -> (Run, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    std::fs::write(&path, text).unwrap();
    let r = run(&["check", "--config", path.to_str().unwrap()], None);
    (r, path, dir)
}

/// 1-based number of the only line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{needle:?} must be on exactly one line of the test config"
    );
    hits[0]
}

/// Asserts that `check` rejects `text` with exit 1, that stderr contains `FILE:LINE:COL` with
/// the line of `at` (and, when given, exactly that column), and that it names every `names`.
fn assert_rejected(text: &str, at: &str, col: Option<usize>, names: &[&str]) -> String {
    let (r, path, _dir) = check(text);
    let err = r.stderr.trim().to_owned();
    assert_eq!(r.code, Some(1), "exit code; stderr: {err}\nconfig:\n{text}");
    assert!(
        !r.stdout.contains("ok"),
        "a rejected config must not print ok: {:?}",
        r.stdout
    );
    let line = line_of(text, at);
    let prefix = format!("{}:{line}:", path.display());
    let Some(pos) = err.find(&prefix) else {
        panic!("stderr must contain {prefix:?}COL (line of {at:?}); got: {err}\nconfig:\n{text}");
    };
    let rest = &err[pos + prefix.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let got_col: usize = digits
        .parse()
        .unwrap_or_else(|_| panic!("no column after {prefix:?}: {err}"));
    assert!(got_col >= 1, "columns are 1-based: {err}");
    if let Some(col) = col {
        assert_eq!(got_col, col, "column; stderr: {err}");
    }
    for n in names {
        assert!(err.contains(n), "stderr must name {n:?}; got: {err}");
    }
    // One error, not a dump of the whole config or a panic.
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The smallest file plus `extra`, with the pool renamed so that tests can add pool sub-tables.
fn base(extra: &str) -> String {
    format!(
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n{extra}"
    )
}

// ---------------------------------------------------------------------------------------------
// Valid files.

#[test]
fn check_smallest_example_prints_ok() {
    let (r, _p, _d) = check(SMALLEST);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");
}

/// Writes a self-signed certificate and its key where the full example expects them
/// (`certs/site.pem`, `certs/site.key`, relative to the config file).
fn write_site_cert(dir: &Path) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::write(dir.join("certs/site.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("certs/site.key"), ck.signing_key.serialize_pem()).unwrap();
}

#[test]
fn check_full_example_with_every_key_prints_ok() {
    // `check` also loads the certificates (as the snapshot would at run time), so give it real
    // ones; relative paths are taken from the config file's directory, not the cwd.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    std::fs::write(&path, EVERYTHING).unwrap();
    write_site_cert(dir.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let r = run(
        &["check", "--config", path.to_str().unwrap()],
        Some(elsewhere.path()),
    );
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");
}

#[test]
fn check_full_example_without_certificate_files_names_the_missing_file() {
    // Every key of the full example is accepted; only the missing certificate file is refused.
    let (r, path, _d) = check(EVERYTHING);
    assert_eq!(r.code, Some(1), "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("ok"));
    assert!(
        r.stderr.contains(&path.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("site.pem"),
        "should name the missing file: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("unknown field"), "{}", r.stderr);
}

#[test]
fn check_accepts_config_before_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    std::fs::write(&path, SMALLEST).unwrap();
    let r = run(&["--config", path.to_str().unwrap(), "check"], None);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");
    let r = run(&["check", "-c", path.to_str().unwrap()], None);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");
}

#[test]
fn check_defaults_to_balancer_toml_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("balancer.toml"), SMALLEST).unwrap();
    let r = run(&["check"], Some(dir.path()));
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");

    // And it really reads that file: a broken one there is rejected.
    std::fs::write(dir.path().join("balancer.toml"), "bogus = 1\n").unwrap();
    let r = run(&["check"], Some(dir.path()));
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("balancer.toml:1:"), "{}", r.stderr);
    assert!(r.stderr.contains("bogus"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// Version, help, missing file.

#[test]
fn version_prints_the_version() {
    let r = run(&["--version"], None);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout.contains(env!("CARGO_PKG_VERSION")),
        "stdout: {:?}",
        r.stdout
    );
    assert!(r.stdout.contains("balancer"), "stdout: {:?}", r.stdout);
}

#[test]
fn help_mentions_check_and_config() {
    let r = run(&["--help"], None);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout.contains("check"), "stdout: {}", r.stdout);
    assert!(r.stdout.contains("--config"), "stdout: {}", r.stdout);
}

#[test]
fn missing_config_file_exits_1_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("does-not-exist.toml");
    let p = path.to_str().unwrap();
    let r = run(&["check", "--config", p], None);
    assert_eq!(r.code, Some(1), "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains(p), "stderr must name {p}: {}", r.stderr);
    assert!(!r.stdout.contains("ok"));

    // Running (not just checking) with a missing file fails the same way, without binding.
    let r = run(&["--config", p], None);
    assert_eq!(r.code, Some(1), "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains(p), "stderr must name {p}: {}", r.stderr);
}

#[test]
fn run_with_invalid_config_exits_1_before_serving() {
    let text = base("strategy = \"random\"\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("balancer.toml");
    std::fs::write(&path, &text).unwrap();
    let r = run(&["--config", path.to_str().unwrap()], None);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    let line = line_of(&text, "random");
    assert!(
        r.stderr.contains(&format!("{}:{line}:", path.display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("strategy"), "{}", r.stderr);
}

// ---------------------------------------------------------------------------------------------
// Rejections: exit 1, the key, FILE:LINE:COL.

#[test]
fn rejects_unknown_top_level_key() {
    let text = format!("watch = false\nshutdwn_grace = \"5s\"\n{SMALLEST}");
    assert_rejected(&text, "shutdwn_grace", Some(1), &["shutdwn_grace"]);
}

#[test]
fn rejects_unknown_top_level_key_after_tables() {
    // A key after `[pools.web]` belongs to that pool: the error must say so, at its line.
    let text = base("retry = 3\n");
    assert_rejected(&text, "retry = 3", Some(1), &["retry", "pools.web"]);
}

#[test]
fn rejects_unknown_key_in_health_check() {
    let text = base("\n[pools.web.health_check]\npath = \"/up\"\nintervall = \"2s\"\n");
    assert_rejected(
        &text,
        "intervall",
        Some(1),
        &["intervall", "pools.web.health_check"],
    );
}

#[test]
fn rejects_unknown_key_in_timeouts() {
    let text = base("\n[pools.web.timeouts]\nconnect = \"1s\"\nresponce = \"5s\"\n");
    assert_rejected(
        &text,
        "responce",
        Some(1),
        &["responce", "pools.web.timeouts"],
    );
}

#[test]
fn rejects_unknown_key_in_circuit_breaker_and_limits() {
    let text = base("\n[pools.web.circuit_breaker]\nopen_for = \"5s\"\n");
    assert_rejected(&text, "open_for", Some(1), &["open_for"]);
    let text = format!("{SMALLEST}\n[limits]\nmax_body = 10\n");
    assert_rejected(&text, "max_body", Some(1), &["max_body", "limits"]);
}

#[test]
fn rejects_unknown_key_in_backend_inline_table() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", wieght = 2 },\n]\n";
    assert_rejected(text, "wieght", None, &["wieght"]);
}

#[test]
fn rejects_unknown_key_in_listener_and_listener_tls() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\nproto = \"h2\"\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_rejected(text, "proto", Some(1), &["proto", "listeners"]);
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\ntls = { cert = \"a.pem\", kee = \"a.key\" }\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_rejected(text, "kee", None, &["kee"]);
}

#[test]
fn rejects_route_to_missing_pool() {
    let text = format!(
        "{SMALLEST}\n[[routes]]\npath_prefix = \"/a\"\npool = \"web\"\n\n[[routes]]\nhost = \"x.example.com\"\npool = \"nope\"\n"
    );
    assert_rejected(&text, "\"nope\"", Some(8), &["routes[1].pool", "nope"]);
}

#[test]
fn rejects_unparsable_listener_address() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[[listeners]]\nbind = \"localhost\"\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_rejected(
        text,
        "\"localhost\"",
        Some(8),
        &["listeners[1].bind", "localhost"],
    );
    let text = "[[listeners]]\nbind = \"127.0.0.1:99999\"\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_rejected(text, "99999", Some(8), &["listeners[0].bind"]);
}

#[test]
fn rejects_unparsable_admin_address() {
    let text = format!("[admin]\nbind = \"127.0.0.1\"\n\n{SMALLEST}");
    assert_rejected(&text, "\"127.0.0.1\"", Some(8), &["admin.bind"]);
}

#[test]
fn rejects_unparsable_backend_address() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\n  \"127.0.0.1:9001\",\n  \"127.0.0.1:port\",\n]\n";
    assert_rejected(text, ":port", Some(3), &["pools.web.backends[1]"]);
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\n  { address = \"no-port-here\", weight = 2 },\n]\n";
    assert_rejected(
        text,
        "no-port-here",
        None,
        &["pools.web.backends[0]", "no-port-here"],
    );
}

#[test]
fn rejects_duration_without_unit() {
    let text = base("\n[pools.web.timeouts]\nconnect = \"10\"\n");
    let err = assert_rejected(
        &text,
        "connect = \"10\"",
        Some(11),
        &["pools.web.timeouts.connect"],
    );
    assert!(
        err.contains("unit"),
        "the message should say what is wrong: {err}"
    );
    let text = format!("shutdown_grace = \"30\"\n{SMALLEST}");
    assert_rejected(&text, "shutdown_grace", Some(18), &["shutdown_grace"]);
    let text = format!("{SMALLEST}\n[limits]\nheader_timeout = \"5\"\n");
    assert_rejected(
        &text,
        "header_timeout",
        Some(18),
        &["limits.header_timeout"],
    );
    let text = base("\n[pools.web.health_check]\ninterval = \"2\"\n");
    assert_rejected(
        &text,
        "interval",
        Some(12),
        &["pools.web.health_check.interval"],
    );
}

#[test]
fn rejects_duration_that_is_not_a_string() {
    // `connect = 10` (a bare integer) is as ambiguous as "10".
    // The parser's type error names the whole key; the column points at the value.
    let text = base("\n[pools.web.timeouts]\nconnect = 10\n");
    assert_rejected(
        &text,
        "connect = 10",
        Some(11),
        &["pools.web.timeouts.connect", "string"],
    );
}

#[test]
fn rejects_size_with_bad_unit() {
    let text =
        format!("{SMALLEST}\n[limits]\nmax_header_bytes = \"64KiB\"\nmax_body_bytes = \"10XB\"\n");
    let err = assert_rejected(&text, "10XB", Some(18), &["limits.max_body_bytes"]);
    assert!(err.contains("XB"), "{err}");
    let text = format!("{SMALLEST}\n[limits]\nmax_header_bytes = -1\n");
    assert_rejected(&text, "-1", Some(20), &["limits.max_header_bytes"]);
}

#[test]
fn rejects_weight_above_1000() {
    // Weight 0 is valid (configured, no new traffic); above 1000 is a typo.
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", weight = 1001 },\n]\n";
    // `  { address = "127.0.0.1:9002", weight = ` is 41 characters: the 1001 is in column 42.
    assert_rejected(
        text,
        "weight = 1001",
        Some(42),
        &["pools.web.backends[1].weight"],
    );
}

#[test]
fn rejects_negative_weight() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9002\", weight = -2 }]\n";
    assert_rejected(text, "weight = -2", None, &["pools.web.backends[0].weight"]);
}

#[test]
fn rejects_pool_with_empty_backends() {
    let text =
        format!("{SMALLEST}\n[pools.empty]\nstrategy = \"least_connections\"\nbackends = []\n");
    assert_rejected(&text, "backends = []", Some(12), &["pools.empty.backends"]);
}

#[test]
fn rejects_pool_without_backends() {
    let text = format!("{SMALLEST}\n[pools.empty]\nstrategy = \"least_connections\"\n");
    // The error can only point at the pool itself: its header or its first key.
    let (r, path, _d) = check(&text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("pools.empty.backends"), "{}", r.stderr);
    let header = line_of(&text, "[pools.empty]");
    let first_key = line_of(&text, "least_connections");
    let at_header = format!("{}:{header}:", path.display());
    let at_key = format!("{}:{first_key}:", path.display());
    assert!(
        r.stderr.contains(&at_header) || r.stderr.contains(&at_key),
        "stderr must point at [pools.empty] (line {header} or {first_key}): {}",
        r.stderr
    );
}

#[test]
fn rejects_pool_without_backends_defined_by_subtable_only() {
    // `[pools.web.timeouts]` alone implicitly creates the pool `web`, still without backends.
    let text =
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web.timeouts]\nconnect = \"1s\"\n";
    let (r, path, _d) = check(text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("pools.web.backends"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{}:", path.display())),
        "{}",
        r.stderr
    );
}

#[test]
fn rejects_two_listeners_on_the_same_address() {
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[[listeners]]\nbind = \"127.0.0.2:8080\"\n\n[[listeners]]\nbind = \"127.0.0.1:8080\" # again\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    let err = assert_rejected(text, "# again", Some(8), &["listeners[2].bind"]);
    assert!(err.contains("127.0.0.1:8080"), "{err}");
}

#[test]
fn rejects_listener_on_the_admin_address() {
    let text = format!("[admin]\nbind = \"127.0.0.1:8080\"\n\n{SMALLEST}");
    let line = line_of(&text, "[[listeners]]") + 1;
    let (r, path, _d) = check(&text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(&format!("{}:{line}:", path.display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("listeners[0].bind"), "{}", r.stderr);
}

#[test]
fn rejects_unknown_strategy() {
    let text = base("strategy = \"random\"\n");
    let err = assert_rejected(&text, "random", Some(12), &["pools.web.strategy", "random"]);
    assert!(
        err.contains("round_robin"),
        "should list the valid ones: {err}"
    );
}

#[test]
fn rejects_no_listeners_and_no_pools() {
    let (r, path, _d) = check("[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n");
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains(&path.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("listeners"), "{}", r.stderr);
    let (r, path, _d) = check("[[listeners]]\nbind = \"127.0.0.1:8080\"\n");
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains(&path.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("pools"), "{}", r.stderr);
}

#[test]
fn rejects_toml_syntax_error_with_position() {
    let text = format!("{SMALLEST}\n[limits\nmax_body_bytes = 1\n");
    assert_rejected(&text, "[limits", None, &[]);
}

#[test]
fn rejects_wrong_type_naming_the_key() {
    let text = format!("watch = \"yes\"\n{SMALLEST}");
    assert_rejected(&text, "watch", Some(9), &[": watch: ", "bool"]);
    let text = base("\n[pools.web.retries]\nattempts = \"3\"\n");
    assert_rejected(&text, "attempts", Some(12), &["pools.web.retries.attempts"]);
    // Inside an inline table the key names the element and the field.
    let text = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[pools.web]\nbackends = [\n  { address = \"127.0.0.1:9002\", weight = \"2\" },\n]\n";
    let err = assert_rejected(
        text,
        "weight",
        Some(42),
        &[
            "pools.web.backends[0].weight",
            "must be an integer from 0 to 1000, not a string (\"2\")",
        ],
    );
    assert!(
        !err.contains("i64") && !err.contains("invalid type"),
        "{err}"
    );
}

#[test]
fn table_headers_with_comments_are_named_cleanly() {
    // Headers as written in the contract's full example carry a trailing comment.
    let text = base("\n[pools.web.health_check]        # optional; no active checks when absent\nintervall = \"2s\"\n");
    let err = assert_rejected(&text, "intervall", Some(1), &["intervall"]);
    assert!(err.contains(": pools.web.health_check: "), "{err}");
    assert!(
        !err.contains('#'),
        "the comment is not part of the key: {err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The running binary: its log on stderr, its level across reloads, SIGUSR1/SIGUSR2.

mod common;

use std::time::Duration;

use common::Stderr;

/// Like `common::start_binary`, with stderr piped to the returned collector, and with
/// `RUST_LOG` and `NO_COLOR` removed so that only the config decides.
fn start_logged(template: &str) -> (common::BinaryBalancer, Stderr) {
    start_logged_env(template, &[])
}

/// `start_logged` with environment variables added.
fn start_logged_env(template: &str, env: &[(&str, &str)]) -> (common::BinaryBalancer, Stderr) {
    common::start_binary_with(template, |c| {
        c.env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
    })
}

/// `[log] level` set to `level`; `/` is routed nowhere (a 404 the balancer logs at debug),
/// `/app` to the backend.
fn logged_config(backend: std::net::SocketAddr, level: &str) -> String {
    format!(
        "watch = false\nshutdown_grace = \"2s\"\n[admin]\nbind = \"{{admin}}\"\n\
         [log]\naccess = false\nlevel = \"{level}\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[routes]]\npath_prefix = \"/app\"\npool = \"web\"\n\
         [pools.web]\nbackends = [\"{backend}\"]\n"
    )
}

/// With stderr not a terminal (a pipe here; a file or journald in production) the log has no
/// ANSI escape codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_has_no_colour_when_stderr_is_not_a_terminal() {
    let a = common::start_backend("a").await;
    let (mut bin, log) = start_logged(&logged_config(a.addr, "debug"));
    log.wait_for("listening", 2);
    let c = common::client();
    assert_eq!(
        common::get(&c, &format!("http://{}/", bin.addr))
            .await
            .status,
        404
    );
    log.wait_for("answering 404", 1);
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
    let text = log.text();
    assert!(text.contains("INFO") && text.contains("DEBUG"), "{text}");
    assert!(!text.contains("\x1b["), "escape codes on a pipe:\n{text:?}");
}

/// The one line that says what was started, after binding: version, the config file (absolute),
/// every listener with TLS or not, every pool with its backend count, and the admin address;
/// on a pipe, without escape codes.
#[test]
fn startup_line_says_what_runs() {
    let certs = tempfile::tempdir().unwrap();
    write_site_cert(certs.path());
    let tls = common::free_port();
    let template = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[log]\naccess = false\n\
         [[listeners]]\nbind = \"{{listen}}\"\n\
         [[listeners]]\nbind = \"{tls}\"\n\
         tls = {{ cert = \"{dir}/certs/site.pem\", key = \"{dir}/certs/site.key\" }}\n\
         [[routes]]\npath_prefix = \"/api\"\npool = \"api\"\n\
         [[routes]]\npool = \"web\"\n\
         [pools.web]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\
         [pools.api]\nbackends = [\"127.0.0.1:9003\"]\n",
        dir = certs.path().display()
    );
    let (mut bin, log) = start_logged(&template);
    log.wait_for("balancer started", 1);
    let text = log.text();
    let line = text
        .lines()
        .find(|l| l.contains("balancer started"))
        .unwrap();
    let version = format!("version={}", env!("CARGO_PKG_VERSION"));
    let config = format!("config={}", bin.config_path.display());
    let listeners = format!("listeners=\"{} (plain), {tls} (tls)\"", bin.addr);
    let admin = format!("admin=\"{}\"", bin.admin);
    for want in [
        "INFO",
        &version,
        &config,
        &listeners,
        "pools=\"web: 2 backends, api: 1 backend\"",
        &admin,
    ] {
        assert!(
            line.contains(want),
            "{want:?} not in the startup line:\n{line}"
        );
    }
    // After binding: every listener was up before it was written.
    let at = text.find("balancer started").unwrap();
    assert_eq!(text[..at].matches("listening").count(), 3, "{text}");
    assert!(!text.contains("\x1b["), "escape codes on a pipe:\n{text:?}");
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Without `[admin]` the startup line says so rather than leaving the field out.
#[test]
fn startup_line_says_when_there_is_no_admin_listener() {
    let (mut bin, log) = start_logged(
        "watch = false\n[[listeners]]\nbind = \"{listen}\"\n\
         [pools.web]\nbackends = [\"127.0.0.1:9001\"]\n",
    );
    log.wait_for("balancer started", 1);
    let text = log.text();
    assert!(
        text.lines().any(|l| l.contains("balancer started")
            && l.contains("admin=\"no admin listener\"")
            && l.contains("pools=\"web: 1 backend\"")),
        "{text}"
    );
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `[log] level` is applied on every reload: info -> debug shows debug lines, debug -> warn
/// hides info and debug ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_follows_reloads() {
    let a = common::start_backend("a").await;
    let (bin, log) = start_logged(&logged_config(a.addr, "info"));
    let c = common::client();
    let root = format!("http://{}/", bin.addr);
    let reload = format!("http://{}/reload", bin.admin);
    log.wait_for("listening", 2);

    // info: the 404 is not logged; the reload that follows is.
    assert_eq!(common::get(&c, &root).await.status, 404);
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    log.wait_for("config reloaded", 1);
    assert_eq!(log.count("answering 404"), 0, "{}", log.text());

    // debug
    common::write_binary_config(&bin, &logged_config(a.addr, "debug"));
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    log.wait_for("log level changed", 1);
    assert_eq!(common::get(&c, &root).await.status, 404);
    log.wait_for("answering 404", 1);
    log.wait_for("config reloaded", 2);

    // warn: neither this reload's info line nor the debug 404 shows; the error of a rejected
    // reload (written after both) does, so everything before it has been read.
    common::write_binary_config(&bin, &logged_config(a.addr, "warn"));
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    assert_eq!(common::get(&c, &root).await.status, 404);
    let ok = common::get(&c, &format!("http://{}/app", bin.addr)).await;
    assert_eq!((ok.status.as_u16(), ok.body.as_str()), (200, "a"));
    std::fs::write(&bin.config_path, "nonsense = 1\n").unwrap();
    assert_eq!(common::post(&c, &reload, "").await.status, 400);
    log.wait_for("reload rejected", 1);
    let text = log.text();
    assert_eq!(text.matches("answering 404").count(), 1, "{text}");
    assert_eq!(text.matches("config reloaded").count(), 2, "{text}");
}

/// `RUST_LOG` wins over `[log] level`, at start and across reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_wins_over_reloaded_level() {
    let a = common::start_backend("a").await;
    let (bin, log) = start_logged_env(&logged_config(a.addr, "debug"), &[("RUST_LOG", "warn")]);
    let c = common::client();
    let reload = format!("http://{}/reload", bin.admin);
    common::write_binary_config(&bin, &logged_config(a.addr, "info"));
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    assert_eq!(
        common::get(&c, &format!("http://{}/", bin.addr))
            .await
            .status,
        404
    );
    std::fs::write(&bin.config_path, "nonsense = 1\n").unwrap();
    assert_eq!(common::post(&c, &reload, "").await.status, 400);
    log.wait_for("reload rejected", 1);
    let text = log.text();
    for quiet in [
        "listening",
        "config reloaded",
        "log level changed",
        "answering 404",
    ] {
        assert!(
            !text.contains(quiet),
            "{quiet:?} logged under RUST_LOG=warn:\n{text}"
        );
    }
}

/// SIGUSR1 and SIGUSR2 are logged and survived, any number of times; the process still serves
/// and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_and_sigusr2_do_not_kill() {
    let a = common::start_backend("a").await;
    let (mut bin, log) = start_logged(&logged_config(a.addr, "info"));
    log.wait_for("listening", 2);
    for n in 1..=2 {
        bin.signal("USR1");
        log.wait_for("SIGUSR1", n);
        bin.signal("USR2");
        log.wait_for("SIGUSR2", n);
    }
    let text = log.text();
    assert!(
        text.contains("nothing") || text.contains("no log files"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("SIGUSR2")),
        "{text}"
    );
    assert_eq!(
        bin.child.try_wait().unwrap(),
        None,
        "died on a signal:\n{text}"
    );
    let g = common::get(&common::client(), &format!("http://{}/app", bin.addr)).await;
    assert_eq!((g.status.as_u16(), g.body.as_str()), (200, "a"));
    bin.signal("TERM");
    assert_eq!(
        bin.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        log.text()
    );
}

// ---------------------------------------------------------------------------------------------
// `check` reports every mistake at once, in TOML words, and warns about likely mistakes.

/// One of each kind of mistake, each on a line of its own.
const MANY_MISTAKES: &str = r#"shutdwn_grace = "5s"
watch = "yes"

[listeners]
bind = "127.0.0.1:8080"

[limits]
max_connections = "lots"
header_timeout = "10"

[[routes]]
host = "api.example.com"
path_prefix = "/v1"

[[routes]]
path_prefix = "/shop"
pool = "shop"

[pools.web]
backends = [
  "127.0.0.1:9001",
  { address = "127.0.0.1:9002", wieght = 2 },
  { address = "127.0.0.1:9003", weight = 5000 },
]

[pools.web.health_check]
interval = 2
"#;

/// stderr with the file's path taken out, so that assertions about words cannot be fooled
/// (or failed) by the random temp dir name.
fn without_path(stderr: &str, path: &Path) -> String {
    stderr.replace(&path.display().to_string(), "FILE")
}

#[test]
fn check_reports_every_mistake_in_one_run() {
    let (r, path, _d) = check(MANY_MISTAKES);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    assert!(!r.stdout.contains("ok"), "{}", r.stdout);
    let err = without_path(&r.stderr, &path);
    let expected = [
        "error: FILE:1:1: shutdwn_grace: unknown key `shutdwn_grace` (did you mean `shutdown_grace`?)",
        "error: FILE:2:9: watch: must be a boolean (true or false), not a string (\"yes\")",
        "error: FILE:4:1: listeners: `[listeners]` must be written `[[listeners]]` (one table per entry)",
        "error: FILE:8:19: limits.max_connections: must be an integer from 1 to 10000000, not a string (\"lots\")",
        "error: FILE:9:18: limits.header_timeout: duration \"10\" has no unit (write e.g. \"10s\" or \"10ms\")",
        "error: FILE:11:1: routes[0] (host = \"api.example.com\", path_prefix = \"/v1\"): missing key `pool`",
        "error: FILE:17:8: routes[1].pool: no pool named \"shop\" (define [pools.shop])",
        "error: FILE:22:33: pools.web.backends[1]: unknown key `wieght` (did you mean `weight`?)",
        "error: FILE:23:42: pools.web.backends[2].weight: weight must be an integer from 0 to 1000, not 5000",
        "error: FILE:27:12: pools.web.health_check.interval: must be a string with a unit, such as \"10s\" or \"250ms\", not a number (2)",
    ];
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines, expected, "\n{err}");
    for rust in [
        "i64",
        "i128",
        "u32",
        "invalid type",
        "expected a",
        "map",
        "sequence",
        "struct",
    ] {
        assert!(!err.contains(rust), "{rust:?} leaks Rust into:\n{err}");
    }
}

#[test]
fn check_unknown_keys_suggest_the_closest_or_list_the_valid_ones() {
    let text = base("\n[pools.web.health_check]\nintreval = \"2s\"\nhealthy = 2\nfrobnicate = 1\n");
    let (r, path, _d) = check(&text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    let err = without_path(&r.stderr, &path);
    assert!(
        err.contains(
            "FILE:8:1: pools.web.health_check: unknown key `intreval` (did you mean `interval`?)"
        ),
        "{err}"
    );
    assert!(
        err.contains("FILE:9:1: pools.web.health_check: unknown key `healthy` (did you mean `healthy_threshold`?)"),
        "{err}"
    );
    // Nothing close: the valid keys of that table are listed instead.
    assert!(
        err.contains("FILE:10:1: pools.web.health_check: unknown key `frobnicate`; valid keys here: kind, service, path, interval, timeout, healthy_threshold, unhealthy_threshold"),
        "{err}"
    );
}

#[test]
fn check_a_route_without_pool_is_named_by_what_it_matches() {
    let text = format!(
        "{SMALLEST}\n[[routes]]\npath_prefix = \"/a\"\npool = \"web\"\n\n[[routes]]\npath_prefix = \"/b\"\npool = \"web\"\n\n[[routes]]\nhost = \"api.example.com\"\n"
    );
    let (r, path, _d) = check(&text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    let line = line_of(&text, "api.example.com") - 1;
    assert_eq!(
        without_path(&r.stderr, &path).trim(),
        format!("error: FILE:{line}:1: routes[2] (host = \"api.example.com\"): missing key `pool`")
    );
}

/// Runs `check` on `text` and asserts: exit 0, "ok" on stdout, and exactly `warnings` (with
/// the file's path as FILE) on stderr.
fn assert_warns(text: &str, warnings: &[String]) {
    let (r, path, _d) = check(text);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout.trim(), "ok");
    let err = without_path(&r.stderr, &path);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines, warnings, "\n{err}");
}

#[test]
fn check_warns_when_a_health_check_timeout_exceeds_its_interval() {
    let text = base("\n[pools.web.health_check]\ninterval = \"1s\"\ntimeout = \"3s\"\n");
    assert_warns(
        &text,
        &["warning: FILE:9:11: pools.web.health_check.timeout: timeout 3s is longer than the interval 1s: a slow check delays the next one".to_owned()],
    );
    // Equal is fine.
    assert_warns(
        &base("\n[pools.web.health_check]\ninterval = \"2s\"\ntimeout = \"2s\"\n"),
        &[],
    );
}

#[test]
fn check_warns_about_routes_that_can_never_match() {
    let text = format!(
        "{SMALLEST}
[[routes]]
host = \"*.example.com\"
pool = \"web\"

[[routes]]
host = \"api.example.com\"
path_prefix = \"/v1\"
pool = \"web\"

[[routes]]
path_prefix = \"/v1\"
pool = \"web\"

[[routes]]
path_prefix = \"/v10\"
pool = \"web\"

[[routes]]
path_prefix = \"/v1/users\"
pool = \"web\"
"
    );
    let second = line_of(&text, "api.example.com") - 1;
    let fifth = line_of(&text, "/v1/users") - 1;
    assert_warns(
        &text,
        &[
            format!("warning: FILE:{second}:1: routes[1]: can never match: routes[0] (host = \"*.example.com\", path_prefix = \"/\") comes first and catches every request it would"),
            // `/v1` does not cover `/v10` (segments), but does cover `/v1/users`.
            format!("warning: FILE:{fifth}:1: routes[4]: can never match: routes[2] (path_prefix = \"/v1\") comes first and catches every request it would"),
        ],
    );
}

#[test]
fn check_warns_about_pools_no_route_names() {
    let text = format!(
        "{SMALLEST}\n[[routes]]\npath_prefix = \"/a\"\npool = \"web\"\n\n[pools.old]\nbackends = [\"127.0.0.1:9101\"]\n\n[pools.spare]\nbackends = [\"127.0.0.1:9102\"]\n"
    );
    let old = line_of(&text, "[pools.old]");
    let spare = line_of(&text, "[pools.spare]");
    assert_warns(
        &text,
        &[
            format!("warning: FILE:{old}:8: pools.old: no route names this pool, so it gets no traffic"),
            format!("warning: FILE:{spare}:8: pools.spare: no route names this pool, so it gets no traffic"),
        ],
    );
    // Without routes the one pool takes everything: nothing to warn about.
    assert_warns(SMALLEST, &[]);
}

#[test]
fn check_warns_about_listeners_that_collide_at_bind_time() {
    let text = "[[listeners]]\nbind = \"0.0.0.0:8080\"\n\n[[listeners]]\nbind = \"127.0.0.1:8080\"\n\n[[listeners]]\nbind = \"[::]:8080\"\n\n[[listeners]]\nbind = \"[::1]:8080\"\n\n[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_warns(
        text,
        &[
            "warning: FILE:5:8: listeners[1].bind: 127.0.0.1:8080 and 0.0.0.0:8080 (listeners[0].bind) share a port and one is a wildcard address: the second bind will fail".to_owned(),
            // IPv6 sockets are v6-only: [::] does not take the IPv4 port, only [::1]'s.
            "warning: FILE:11:8: listeners[3].bind: [::1]:8080 and [::]:8080 (listeners[2].bind) share a port and one is a wildcard address: the second bind will fail".to_owned(),
        ],
    );
}

#[test]
fn check_warnings_are_shown_with_errors_too() {
    let text = base(
        "strategy = \"random\"\n\n[pools.web.health_check]\ninterval = \"1s\"\ntimeout = \"3s\"\n",
    );
    let (r, path, _d) = check(&text);
    assert_eq!(r.code, Some(1), "stderr: {}", r.stderr);
    let err = without_path(&r.stderr, &path);
    assert!(
        err.contains("error: FILE:6:12: pools.web.strategy: unknown strategy"),
        "{err}"
    );
    assert!(
        err.contains("warning: FILE:10:11: pools.web.health_check.timeout"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// `check --diff`: what a reload would change.

const DIFF_OLD: &str = r#"watch = false

[[listeners]]
bind = "127.0.0.1:8080"

[[listeners]]
bind = "127.0.0.1:8081"

[[routes]]
path_prefix = "/api"
pool = "web"

[pools.web]
backends = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]

[pools.old]
backends = ["127.0.0.1:9201"]
"#;

const DIFF_NEW: &str = r#"watch = false

[[listeners]]
bind = "127.0.0.1:8080"

[[listeners]]
bind = "127.0.0.1:8443"

[limits]
max_body_bytes = "1MiB"

[[routes]]
path_prefix = "/v2"
pool = "web"

[[routes]]
path_prefix = "/img"
pool = "img"

[pools.web]
strategy = "least_connections"
backends = [
  { address = "127.0.0.1:9001", weight = 3 },
  "127.0.0.1:9002",
  "127.0.0.1:9004",
]

[pools.web.health_check]
path = "/up"

[pools.img]
backends = [{ address = "127.0.0.1:9301", weight = 2 }]
"#;

/// `balancer check --diff --config NEW --against-file OLD`.
fn diff_files(old: &str, new: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    std::fs::write(&o, old).unwrap();
    std::fs::write(&n, new).unwrap();
    run(
        &[
            "check",
            "--diff",
            "--config",
            n.to_str().unwrap(),
            "--against-file",
            o.to_str().unwrap(),
        ],
        None,
    )
}

#[test]
fn check_diff_against_a_file_lists_every_change() {
    let r = diff_files(DIFF_OLD, DIFF_NEW);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "- listener 127.0.0.1:8081",
            "+ listener 127.0.0.1:8443",
            "- pool old",
            "- backend old 127.0.0.1:9201",
            "~ pool web strategy round_robin -> least_connections",
            "- backend web 127.0.0.1:9003",
            "~ backend web 127.0.0.1:9001 weight 1 -> 3",
            "+ backend web 127.0.0.1:9004",
            "+ pool img (round_robin)",
            "+ backend img 127.0.0.1:9301 weight 2",
            "+ pool web health_check",
            "- route /api -> web",
            "+ route /v2 -> web",
            "+ route /img -> img",
            "~ limits.max_body_bytes 0 -> 1048576",
            "= 2 backends keep their state",
        ],
        "\n{}",
        r.stdout
    );
    // The other way round undoes it.
    let r = diff_files(DIFF_NEW, DIFF_OLD);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout.contains("+ listener 127.0.0.1:8081\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("~ backend web 127.0.0.1:9001 weight 3 -> 1\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("- pool web health_check\n"),
        "{}",
        r.stdout
    );
}

#[test]
fn check_diff_of_equal_files_says_no_changes() {
    let r = diff_files(DIFF_OLD, DIFF_OLD);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert_eq!(r.stdout, "no changes\n");
}

#[test]
fn check_diff_settings_and_route_order() {
    let old = format!("{SMALLEST}\n[[routes]]\npath_prefix = \"/a\"\npool = \"web\"\n[[routes]]\npath_prefix = \"/b\"\npool = \"web\"\n");
    let new = old
        .replace("\"/a\"", "\"/x\"")
        .replace("\"/b\"", "\"/a\"")
        .replace("\"/x\"", "\"/b\"")
        + "\n[pools.web.timeouts]\nconnect = \"500ms\"\n\n[log]\nlevel = \"debug\"\n";
    let new = format!("shutdown_grace = \"5s\"\n{new}");
    let r = diff_files(&old, &new);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "~ pool web timeouts.connect 2s -> 500ms",
            "~ routes reordered (first match wins)",
            "~ shutdown_grace 30s -> 5s",
            "~ log.level info -> debug",
            "= 2 backends keep their state",
        ],
        "\n{}",
        r.stdout
    );
}

#[test]
fn check_diff_refuses_an_invalid_config_with_its_errors() {
    let r = diff_files(DIFF_OLD, &format!("{DIFF_NEW}\nbogus = 1\n"));
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(r.stderr.contains("unknown key `bogus`"), "{}", r.stderr);
    let r = diff_files("nonsense = 1\n", DIFF_NEW);
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("old.toml"), "{}", r.stderr);
}

#[test]
fn check_diff_without_admin_or_file_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.toml");
    std::fs::write(&p, SMALLEST).unwrap();
    let r = run(&["check", "--diff", "--config", p.to_str().unwrap()], None);
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("--against"), "{}", r.stderr);
    // --against needs --diff.
    let r = run(
        &[
            "check",
            "--against",
            "http://127.0.0.1:1",
            "--config",
            p.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(r.code, Some(2), "stdout: {}", r.stdout);
}

/// Against a running balancer: its /status is the "before" (pools and backends only, said so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_diff_against_the_running_balancer() {
    let a = common::start_backend("a").await;
    let b = common::start_backend("b").await;
    let running = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\n[[listeners]]\nbind = \"{{listen}}\"\n\
         [pools.web]\nbackends = [\"{}\", \"{}\"]\n",
        a.addr, b.addr
    );
    let bin = common::start_binary(&running, std::process::Stdio::null());
    let admin_url = format!("http://{}", bin.admin);
    let dir = tempfile::tempdir().unwrap();
    let next = dir.path().join("next.toml");
    std::fs::write(
        &next,
        format!(
            "[admin]\nbind = \"{}\"\n[[listeners]]\nbind = \"{}\"\n\
             [pools.web]\nbackends = [{{ address = \"{}\", weight = 4 }}, \"127.0.0.1:9\"]\n",
            bin.admin, bin.addr, a.addr
        ),
    )
    .unwrap();
    let next_s = next.to_str().unwrap().to_owned();
    for args in [
        vec![
            "check",
            "--diff",
            "--config",
            &next_s,
            "--against",
            &admin_url,
        ],
        // Without --against: the config's own [admin] bind.
        vec!["check", "--diff", "--config", &next_s],
    ] {
        let r = tokio::task::spawn_blocking({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            move || {
                let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                run(&args, None)
            }
        })
        .await
        .unwrap();
        assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.len(), 5, "{}", r.stdout);
        assert!(
            lines[0].starts_with(&format!(
                "# against http://{} (config version 1): pools and backends only",
                bin.admin
            )),
            "{}",
            r.stdout
        );
        assert_eq!(
            &lines[1..],
            [
                format!("- backend web {}", b.addr),
                format!("~ backend web {} weight 1 -> 4", a.addr),
                "+ backend web 127.0.0.1:9".to_owned(),
                "= 1 backend keeps its state".to_owned(),
            ],
            "{}",
            r.stdout
        );
    }
    // Nobody listening: exit 1 and say where it tried.
    let r = run(
        &[
            "check",
            "--diff",
            "--config",
            &next_s,
            "--against",
            "http://127.0.0.1:1",
        ],
        None,
    );
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
}

/// A running balancer with `[admin] token_file` is asked with the token of the config being
/// checked (normally the same file), or with `BALANCER_ADMIN_TOKEN`; a wrong one is a clear
/// error, not a diff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_diff_sends_the_admin_token() {
    let a = common::start_backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "diff-token-42\n").unwrap();
    let running = format!(
        "watch = false\n[admin]\nbind = \"{{admin}}\"\ntoken_file = \"{}\"\n\
         [[listeners]]\nbind = \"{{listen}}\"\n[pools.web]\nbackends = [\"{}\"]\n",
        token.display(),
        a.addr
    );
    let bin = common::start_binary(&running, std::process::Stdio::null());
    let next = dir.path().join("next.toml");
    std::fs::write(
        &next,
        format!(
            "[admin]\nbind = \"{}\"\ntoken_file = \"{}\"\n[[listeners]]\nbind = \"{}\"\n\
             [pools.web]\nbackends = [{{ address = \"{}\", weight = 2 }}]\n",
            bin.admin,
            token.display(),
            bin.addr,
            a.addr
        ),
    )
    .unwrap();
    let next_s = next.to_str().unwrap().to_owned();
    let diff = move |env_token: Option<&'static str>| {
        let next_s = next_s.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(BIN);
            cmd.args(["check", "--diff", "--config", &next_s])
                .env_remove("RUST_LOG")
                .env_remove("BALANCER_ADMIN_TOKEN");
            if let Some(t) = env_token {
                cmd.env("BALANCER_ADMIN_TOKEN", t);
            }
            Run::from(cmd.output().expect("run the balancer binary"))
        })
    };
    let r = diff(None).await.unwrap();
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(
        r.stdout
            .contains(&format!("~ backend web {} weight 1 -> 2", a.addr)),
        "{}",
        r.stdout
    );
    let r = diff(Some("not-the-token")).await.unwrap();
    assert_eq!(r.code, Some(1), "stdout: {}", r.stdout);
    assert!(r.stderr.contains("401"), "{}", r.stderr);
}

/// The reload log line says what changed, as `check --diff` would, in one line; a rejected
/// reload reports every error, one per line, in `/status` and in the 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_log_line_summarises_the_change_and_rejections_list_every_error() {
    let a = common::start_backend("a").await;
    let b = common::start_backend("b").await;
    let (bin, log) = start_logged(&logged_config(a.addr, "info"));
    log.wait_for("listening", 2);
    let c = common::client();
    let reload = format!("http://{}/reload", bin.admin);
    let two = logged_config(a.addr, "info").replace(
        &format!("backends = [\"{}\"]", a.addr),
        &format!(
            "backends = [{{ address = \"{}\", weight = 2 }}, \"{}\"]",
            a.addr, b.addr
        ),
    );
    common::write_binary_config(&bin, &two);
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    log.wait_for("config reloaded", 1);
    let line = log
        .text()
        .lines()
        .find(|l| l.contains("config reloaded"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(line.contains("changes=+1 backend, ~1 weight"), "{line}");

    // Unchanged file: the line says so.
    assert_eq!(common::post(&c, &reload, "").await.status, 200);
    log.wait_for("config reloaded", 2);
    assert!(log.text().contains("changes=none"), "{}", log.text());

    // Two mistakes: both reported, one per line, the first as a single error shows it.
    let broken = two.replace(
        "[pools.web]",
        "bogus = 1\n[pools.web]\nstrategy = \"random\"",
    );
    common::write_binary_config(&bin, &broken);
    let got = common::post(&c, &reload, "").await;
    assert_eq!(got.status, 400);
    let path = bin.config_path.display().to_string();
    let body: serde_json::Value = serde_json::from_str(&got.body).unwrap_or_default();
    let text = body["error"].as_str().unwrap_or_default();
    let errors: Vec<&str> = text.lines().collect();
    assert_eq!(errors.len(), 2, "{}", got.body);
    assert!(
        errors[0].starts_with(&format!("{path}:")) && errors[0].contains("bogus"),
        "{}",
        got.body
    );
    assert!(
        errors[1].starts_with(&format!("{path}:")) && errors[1].contains("pools.web.strategy"),
        "{}",
        got.body
    );
    let status = common::status_at(bin.admin).await;
    let last = status["config"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(last.lines().count(), 2, "{status}");
    assert!(last.contains("bogus") && last.contains("random"), "{last}");
}
