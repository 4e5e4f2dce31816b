//! Cache keys: which stored response a request may be answered with.
//!
//! A key is the method-independent target (RFC 9111 §2: a stored GET answers a HEAD): the
//! host, lower-cased, then the normalised path and query as the backend saw them. A response
//! with `Vary` is stored under the key plus the values the request had for each named header;
//! the plain key then holds a small index naming those headers (see `store::Stored::Vary`),
//! as Squid's and Varnish's vary objects do. The index carries a generation, part of every
//! variant's key, so that dropping the index (invalidation) makes every variant unreachable at
//! once without a scan.

use http::header::{HeaderMap, HeaderName};

/// Between the host and the target: a byte no host or target contains.
const HOST_END: char = '\t';
/// Between the target and the variant part.
const VARIANT: char = '\n';

/// `host` as received (any port kept: two ports may be two sites) and the target.
pub fn primary(host: &[u8], target: &str) -> String {
    let mut k = String::with_capacity(host.len() + target.len() + 1);
    for &b in host {
        k.push(b.to_ascii_lowercase() as char);
    }
    k.push(HOST_END);
    k.push_str(target);
    k
}

/// The key of the variant that `req` selects among responses varying on `names`.
pub fn variant(primary: &str, generation: u64, names: &[HeaderName], req: &HeaderMap) -> String {
    use std::fmt::Write as _;
    let mut k = String::with_capacity(primary.len() + 32);
    k.push_str(primary);
    k.push(VARIANT);
    let _ = write!(k, "{generation}");
    for n in names {
        k.push(VARIANT);
        k.push_str(n.as_str());
        k.push(':');
        // Every field line, in order, as the origin would see them; bytes that are not text
        // are kept as their hex so two different values never collide.
        for (i, v) in req.get_all(n).iter().enumerate() {
            if i > 0 {
                k.push(',');
            }
            match v.to_str() {
                Ok(s) => k.push_str(s.trim()),
                Err(_) => {
                    for b in v.as_bytes() {
                        let _ = write!(k, "%{b:02x}");
                    }
                }
            }
        }
    }
    k
}

/// The keys that `Location` or `Content-Location` value `v` of a response to a request on
/// `primary` names on the same host (RFC 9111 §4.4): an absolute path, or an absolute URI
/// whose authority is the request's host; `None` for anything else.
pub fn same_host(primary: &str, v: &[u8]) -> Option<String> {
    let (host, _) = primary.split_once(HOST_END)?;
    let uri = http::Uri::try_from(v).ok()?;
    let target = uri.path_and_query()?.as_str();
    if !target.starts_with('/') {
        return None;
    }
    match uri.authority() {
        None if uri.scheme().is_none() => Some(primary_of(host, target)),
        Some(a) if a.as_str().eq_ignore_ascii_case(host) => Some(primary_of(host, target)),
        _ => None,
    }
}

fn primary_of(lower_host: &str, target: &str) -> String {
    let mut k = String::with_capacity(lower_host.len() + target.len() + 1);
    k.push_str(lower_host);
    k.push(HOST_END);
    k.push_str(target);
    k
}

/// Whether the stored `key` falls under a purge of `prefix` (a target prefix) on `host`
/// (`None`: every host; a port in either is ignored).
pub fn purged_by(key: &str, host: Option<&str>, prefix: &str) -> bool {
    let Some((h, rest)) = key.split_once(HOST_END) else {
        return false;
    };
    let target = rest.split(VARIANT).next().unwrap_or(rest);
    let host_ok = match host {
        None => true,
        Some(want) => strip_port(h).eq_ignore_ascii_case(strip_port(want)),
    };
    host_ok && target.starts_with(prefix)
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h
            .split_once(']')
            .map_or(h, |(a, _)| a)
            .trim_start_matches('[');
    }
    h.rsplit_once(':').map_or(h, |(a, _)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_hosts_targets_and_variants() {
        let a = primary(b"Example.COM:8080", "/a?x=1");
        assert_eq!(a, "example.com:8080\t/a?x=1");
        assert_ne!(a, primary(b"example.com:8080", "/a?x=2"));
        let mut h = HeaderMap::new();
        h.insert("accept-encoding", "gzip".parse().unwrap());
        let names = [HeaderName::from_static("accept-encoding")];
        let g = variant(&a, 1, &names, &h);
        h.insert("accept-encoding", "br".parse().unwrap());
        assert_ne!(g, variant(&a, 1, &names, &h));
        assert_ne!(variant(&a, 1, &names, &h), variant(&a, 2, &names, &h));
        assert!(!a.contains(VARIANT) && g.starts_with(&a));
    }

    #[test]
    fn locations_on_the_same_host_only() {
        let k = primary(b"Example.com", "/items");
        assert_eq!(
            same_host(&k, b"/items/7"),
            Some(primary(b"example.com", "/items/7"))
        );
        assert_eq!(
            same_host(&k, b"http://EXAMPLE.com/items/7?x"),
            Some(primary(b"example.com", "/items/7?x"))
        );
        assert_eq!(same_host(&k, b"http://other.com/items/7"), None);
        assert_eq!(same_host(&k, b"items/7"), None);
    }

    #[test]
    fn purge_matches_host_and_target_prefix() {
        let k = primary(b"example.com:8080", "/static/app.js");
        assert!(purged_by(&k, None, "/static/"));
        assert!(purged_by(&k, Some("EXAMPLE.com"), "/static/"));
        assert!(!purged_by(&k, Some("other.com"), "/static/"));
        assert!(!purged_by(&k, None, "/api/"));
        let v = variant(
            &k,
            3,
            &[HeaderName::from_static("accept")],
            &HeaderMap::new(),
        );
        assert!(purged_by(&v, None, "/static/app"));
    }
}
