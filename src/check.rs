//! `balancer check [--diff]`: validate a config file without running it, and say what a
//! reload to it would change.
//!
//! Output contract (docs/configuration.md, "Command line"): `ok` and diff lines on stdout;
//! errors (`error: FILE:LINE:COL: key: message`, every one found) and warnings
//! (`warning: ...`) on stderr. Exit 0 when the file is valid (warnings or not), 1 when it is
//! not or the comparison could not be made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Checked, Config};
use crate::diff;

/// What `--diff` compares the config with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Against {
    /// The running balancer at the config's own `[admin] bind`.
    OwnAdmin,
    /// The running balancer whose admin API is at this URL (`http://127.0.0.1:9900`).
    Admin(String),
    /// Another config file, compared completely.
    File(PathBuf),
}

/// The admin API answers quickly or not at all; a check must not hang a deploy script.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the subcommand; the value is the process exit code.
pub fn run(path: &Path, against: Option<Against>) -> u8 {
    let Some(checked) = load(path) else { return 1 };
    let Some(against) = against else {
        println!("ok");
        return 0;
    };
    let new = &checked.config;
    let (note, d) = match against {
        Against::File(other) => {
            let Some(old) = load_quiet(&other) else {
                return 1;
            };
            (None, diff::configs(&old, new))
        }
        Against::Admin(url) => match running(&url, new) {
            Ok(x) => x,
            Err(e) => return fail(&e),
        },
        Against::OwnAdmin => {
            let Some(admin) = &new.admin else {
                return fail(
                    "no [admin] in the config to ask; give --against ADMIN_URL or \
                     --against-file PATH",
                );
            };
            // A wildcard bind is reached on loopback from this host.
            let mut addr = admin.bind;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            match running(&format!("http://{addr}"), new) {
                Ok(x) => x,
                Err(e) => return fail(&e),
            }
        }
    };
    if let Some(n) = note {
        println!("{n}");
    }
    for line in d.lines() {
        println!("{line}");
    }
    0
}

fn fail(msg: &str) -> u8 {
    eprintln!("error: {msg}");
    1
}

/// Validates `path` as a reload would (certificates and CA files read too), printing every
/// error or warning; `None` when it does not validate.
fn load(path: &Path) -> Option<Checked> {
    let checked = match Config::check_file(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.errors {
                eprintln!("error: {e}");
            }
            for w in &errors.warnings {
                eprintln!("warning: {w}");
            }
            return None;
        }
    };
    for w in &checked.warnings {
        eprintln!("warning: {w}");
    }
    // Certificates and CA files are read when the snapshot is built: do it here too, so
    // that `check` catches a missing or unparsable file before a reload would.
    let config = Arc::new(checked.config.clone());
    if let Err(e) = crate::state::Snapshot::build(config, None, 1) {
        eprintln!("error: {}: {e}", path.display());
        return None;
    }
    Some(checked)
}

/// The file to compare against: its errors are printed, its warnings are not (they are about
/// the config being replaced).
fn load_quiet(path: &Path) -> Option<Config> {
    match Config::check_file(path) {
        Ok(c) => Some(c.config),
        Err(errors) => {
            eprintln!(
                "error: cannot compare with {}: it does not validate",
                path.display()
            );
            for e in &errors.errors {
                eprintln!("error: {e}");
            }
            None
        }
    }
}

/// The diff against the balancer whose admin API is at `url`, with the note saying what
/// `/status` cannot show.
fn running(url: &str, new: &Config) -> Result<(Option<String>, diff::Diff), String> {
    // The running balancer asks for its token; the one to reload is normally the same file,
    // and `BALANCER_ADMIN_TOKEN` covers a token that is changing with this reload.
    let authorization = match std::env::var("BALANCER_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Some(format!("Bearer {}", t.trim())),
        _ => new
            .admin
            .as_ref()
            .and_then(|a| a.token.as_ref())
            .map(|t| t.authorization()),
    };
    let status = fetch_status(url, authorization.as_deref())?;
    let version = status
        .get("config")
        .and_then(|c| c.get("version"))
        .and_then(|v| v.as_u64())
        .map_or_else(|| "?".to_owned(), |v| v.to_string());
    let old = diff::status_pools(&status).map_err(|e| format!("{url}/status: {e}"))?;
    let note = format!(
        "# against {url} (config version {version}): pools and backends only; /status does \
         not show listeners, routes or settings (use --against-file for those)"
    );
    Ok((Some(note), diff::pools(&old, &diff::pool_views(new))))
}

/// `GET {url}/status` over plain HTTP/1.1 with hyper's client, on a small runtime of its own.
fn fetch_status(url: &str, authorization: Option<&str>) -> Result<serde_json::Value, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--against {url:?}: not a URL: {e}"))?;
    match uri.scheme_str() {
        None | Some("http") => {}
        Some(other) => {
            return Err(format!(
                "--against {url:?}: the admin API speaks http, not {other}"
            ))
        }
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!(
            "--against {url:?}: no host (write http://HOST:PORT)"
        ));
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let path = format!("{}/status", uri.path().trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let fetch = async {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        tokio::spawn(conn);
        let mut req = http::Request::get(&path).header(http::header::HOST, authority.as_str());
        if let Some(a) = authorization {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {url}{path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {url}{path}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(format!(
                "GET {path} at {authority}: {status}: {}",
                text.trim()
            ));
        }
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("GET {path} at {authority}: not the status JSON: {e}"))
    };
    rt.block_on(async {
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| format!("{url}: no answer within {}s", FETCH_TIMEOUT.as_secs()))?
    })
}
