//! What may be stored and for how long: RFC 9111 as a shared cache.
//!
//! The rules themselves are `http-cache-semantics`' (`CachePolicy` with `shared: true`);
//! this file adds where we are stricter than the crate, each a documented choice:
//!
//! - freshness must be explicit (`s-maxage`, `max-age` or `Expires`): the crate stores a
//!   response that merely has a cacheable status, and we turn its heuristic off
//!   (`cache_heuristic: 0.0`), so such a response would be stored already stale;
//! - the status must be cacheable by default (RFC 9110 §15.1) and not 206 (no ranges here);
//!   the crate also accepts 302/303/307 with explicit freshness;
//! - a response with `Set-Cookie` is never stored (the crate stores it with `public`);
//! - `Vary: *` is never stored (the crate stores it and then never matches it);
//! - `immutable` gives no freshness of its own (the crate assumes a day);
//! - an `Age` above 2^31 is clamped to it (RFC 9111 §1.2.2) before the crate sees it: it adds
//!   durations to it unchecked, which a backend could make overflow.
//!
//! The crate does not know `stale-while-revalidate` and `stale-if-error` (RFC 5861); they
//! are read here.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_cache_semantics::{CacheOptions, CachePolicy, RequestLike};

/// Why a response was not stored: the `detail` of its `Cache-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    SetCookie,
    Authorization,
    NoFreshness,
    VaryStar,
    TooLarge,
}

impl NotStored {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStored::Method => "method",
            NotStored::Status => "status",
            NotStored::NoStore => "no-store",
            NotStored::Private => "private",
            NotStored::SetCookie => "set-cookie",
            NotStored::Authorization => "authorization",
            NotStored::NoFreshness => "no-explicit-freshness",
            NotStored::VaryStar => "vary-star",
            NotStored::TooLarge => "too-large",
        }
    }
}

pub fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        immutable_min_time_to_live: Duration::ZERO,
        ignore_cargo_cult: false,
    }
}

/// The request as the policy sees it; the key already matched the target, so the URI
/// comparison the crate asks for is always true.
pub struct Asked<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl RequestLike for Asked<'_> {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, _other: &Uri) -> bool {
        true
    }
    fn method(&self) -> &Method {
        self.method
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// Statuses cacheable by default (RFC 9110 §15.1), less 206.
const CACHEABLE: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Whether the response to `req` may be stored, and if not, why. `length` is the declared
/// body length, when there is one.
pub fn storable(
    req: &Asked<'_>,
    status: StatusCode,
    res: &HeaderMap,
    policy: &CachePolicy,
    length: Option<u64>,
    max_object: u64,
) -> Result<(), NotStored> {
    if *req.method != Method::GET {
        return Err(NotStored::Method);
    }
    if !CACHEABLE.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    let cc = Directives::of(res);
    if cc.no_store || directive(req.headers, "no-store") {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if res.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if res.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .map_or(true, |s| s.split(',').any(|n| n.trim() == "*"))
    }) {
        return Err(NotStored::VaryStar);
    }
    if !(cc.explicit_freshness || res.contains_key(header::EXPIRES)) {
        return Err(NotStored::NoFreshness);
    }
    if !policy.is_storable() {
        // What is left of the crate's rules: Authorization without public, s-maxage or
        // must-revalidate.
        return Err(if req.headers.contains_key(header::AUTHORIZATION) {
            NotStored::Authorization
        } else {
            NotStored::NoStore
        });
    }
    if length.is_some_and(|n| n > max_object) {
        return Err(NotStored::TooLarge);
    }
    Ok(())
}

/// The response directives this cache acts on beyond the crate's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub private: bool,
    /// `max-age` or `s-maxage`.
    pub explicit_freshness: bool,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
    /// `must-revalidate`, `proxy-revalidate`, `s-maxage` (RFC 9111 §5.2.2.10) or `no-cache`:
    /// never served stale unless the response itself says `stale-if-error`.
    pub revalidate: bool,
}

impl Directives {
    pub fn of(h: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for (name, value) in directives(h) {
            let secs = || {
                value
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
            };
            match name.as_str() {
                "no-store" => d.no_store = true,
                "private" => d.private = true,
                "max-age" => d.explicit_freshness = true,
                "s-maxage" => {
                    d.explicit_freshness = true;
                    d.revalidate = true;
                }
                "must-revalidate" | "proxy-revalidate" | "no-cache" => d.revalidate = true,
                "stale-while-revalidate" => d.stale_while_revalidate = secs(),
                "stale-if-error" => d.stale_if_error = secs(),
                _ => {}
            }
        }
        d
    }
}

/// `Cache-Control` directives, names lower-cased, values unquoted.
fn directives(h: &HeaderMap) -> impl Iterator<Item = (String, Option<&str>)> {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((n, v)) => (
                    n.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"')),
                ),
                None => (d.to_ascii_lowercase(), None),
            })
        })
}

fn directive(h: &HeaderMap, name: &str) -> bool {
    directives(h).any(|(n, _)| n == name)
}

/// What the client's request says about using the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    /// No `Cache-Control` nor `Pragma`: freshness alone decides (the fast path).
    pub plain: bool,
    /// `no-store`: the cache is bypassed both ways.
    pub no_store: bool,
}

impl Wants {
    pub fn of(h: &HeaderMap) -> Wants {
        let plain = !h.contains_key(header::CACHE_CONTROL) && !h.contains_key(header::PRAGMA);
        Wants {
            plain,
            no_store: !plain && directive(h, "no-store"),
        }
    }
}

/// Whether the client's conditional request (`If-None-Match`, else `If-Modified-Since`) is
/// satisfied by a stored response with headers `res`: then it gets a 304.
pub fn not_modified(req: &HeaderMap, res: &HeaderMap) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH) {
        let Some(etag) = res.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = etag.trim().trim_start_matches("W/");
        // Weak comparison (RFC 9110 §13.1.2).
        return inm.to_str().is_ok_and(|s| {
            s.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
        });
    }
    // The stored date is parsed only when the client sent one to compare it with: on every
    // hit otherwise (~900 instructions, callgrind).
    let Some(ims) = req.get(header::IF_MODIFIED_SINCE).and_then(date) else {
        return false;
    };
    res.get(header::LAST_MODIFIED)
        .and_then(date)
        .is_some_and(|lm| lm <= ims)
}

fn date(v: &HeaderValue) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// RFC 9111 §1.2.2: an `Age` beyond what can be represented counts as 2^31 seconds. Done
/// before the policy sees a response: the crate adds durations to it unchecked, and a
/// backend's `Age: 18446744073709551615` would otherwise overflow there.
pub fn clamp_age(h: &mut HeaderMap) {
    const CAP: u64 = 1 << 31;
    let Some(v) = h.get(header::AGE) else { return };
    let ok = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n <= CAP);
    if !ok {
        h.insert(header::AGE, HeaderValue::from(CAP));
    }
}

/// The conditional headers that revalidate a stored response with `res` headers, if it has
/// a validator.
pub fn validators(res: &HeaderMap) -> Option<(Option<HeaderValue>, Option<HeaderValue>)> {
    let etag = res.get(header::ETAG).cloned();
    let lm = res.get(header::LAST_MODIFIED).cloned();
    (etag.is_some() || lm.is_some()).then_some((etag, lm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn check(req: &[(&str, &str)], status: u16, res: &[(&str, &str)]) -> Result<(), NotStored> {
        let mut rq = HeaderMap::new();
        for (n, v) in req {
            rq.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut rs = HeaderMap::new();
        for (n, v) in res {
            rs.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let uri: Uri = "/x".parse().unwrap();
        let asked = Asked {
            method: &Method::GET,
            uri: &uri,
            headers: &rq,
        };
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = StatusCode::from_u16(status).unwrap();
        parts.headers = rs.clone();
        let policy = CachePolicy::new_options(&asked, &parts, SystemTime::now(), options());
        storable(&asked, parts.status, &rs, &policy, None, 1 << 20)
    }

    #[test]
    fn only_explicitly_fresh_shareable_responses_are_stored() {
        assert_eq!(check(&[], 200, &[("cache-control", "max-age=60")]), Ok(()));
        assert_eq!(check(&[], 200, &[("cache-control", "s-maxage=60")]), Ok(()));
        assert_eq!(
            check(&[], 200, &[("expires", "Wed, 21 Oct 2099 07:28:00 GMT")]),
            Ok(())
        );
        let no = |req: &[(&str, &str)], status, res: &[(&str, &str)]| {
            check(req, status, res).unwrap_err()
        };
        assert_eq!(no(&[], 200, &[]), NotStored::NoFreshness);
        assert_eq!(
            no(&[], 200, &[("cache-control", "public")]),
            NotStored::NoFreshness
        );
        assert_eq!(
            no(&[], 200, &[("cache-control", "max-age=60, no-store")]),
            NotStored::NoStore
        );
        assert_eq!(
            no(&[], 200, &[("cache-control", "private, max-age=60")]),
            NotStored::Private
        );
        assert_eq!(
            no(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
            ),
            NotStored::SetCookie
        );
        assert_eq!(
            no(&[], 200, &[("cache-control", "max-age=60"), ("vary", "*")]),
            NotStored::VaryStar
        );
        assert_eq!(
            no(&[], 302, &[("cache-control", "max-age=60")]),
            NotStored::Status
        );
        assert_eq!(
            no(&[], 206, &[("cache-control", "max-age=60")]),
            NotStored::Status
        );
        assert_eq!(
            no(
                &[("cache-control", "no-store")],
                200,
                &[("cache-control", "max-age=60")]
            ),
            NotStored::NoStore
        );
        assert_eq!(
            no(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "max-age=60")]
            ),
            NotStored::Authorization
        );
        assert_eq!(
            check(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "public, max-age=60")]
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "s-maxage=60")]
            ),
            Ok(())
        );
    }

    #[test]
    fn huge_ages_and_lifetimes_do_not_overflow() {
        let mut rs = HeaderMap::new();
        rs.insert(
            header::CACHE_CONTROL,
            "max-age=18446744073709551615".parse().unwrap(),
        );
        rs.insert(header::AGE, "18446744073709551615".parse().unwrap());
        clamp_age(&mut rs);
        assert_eq!(rs[header::AGE], "2147483648");
        let uri: Uri = "/x".parse().unwrap();
        let rq = HeaderMap::new();
        let asked = Asked {
            method: &Method::GET,
            uri: &uri,
            headers: &rq,
        };
        let mut parts = http::Response::new(()).into_parts().0;
        parts.headers = rs;
        let now = SystemTime::now();
        let policy = CachePolicy::new_options(&asked, &parts, now, options());
        let e = super::super::store::Entry::new(
            StatusCode::OK,
            parts.headers.clone(),
            bytes::Bytes::new(),
            policy,
            &rq,
            now,
        );
        assert!(e.stale_by(now).is_none());
        let _ = e.policy.age(now + std::time::Duration::from_secs(3600));
    }

    #[test]
    fn stale_directives_and_conditionals() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            "max-age=1, stale-while-revalidate=30, stale-if-error=\"60\""
                .parse()
                .unwrap(),
        );
        let d = Directives::of(&h);
        assert_eq!(d.stale_while_revalidate, Some(Duration::from_secs(30)));
        assert_eq!(d.stale_if_error, Some(Duration::from_secs(60)));
        assert!(!d.revalidate);
        h.insert(header::ETAG, "\"v1\"".parse().unwrap());
        h.insert(
            header::LAST_MODIFIED,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        let mut rq = HeaderMap::new();
        rq.insert(header::IF_NONE_MATCH, "W/\"v1\"".parse().unwrap());
        assert!(not_modified(&rq, &h));
        rq.insert(header::IF_NONE_MATCH, "\"v2\"".parse().unwrap());
        assert!(!not_modified(&rq, &h));
        let mut rq = HeaderMap::new();
        rq.insert(
            header::IF_MODIFIED_SINCE,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert!(not_modified(&rq, &h));
        rq.insert(
            header::IF_MODIFIED_SINCE,
            "Tue, 20 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert!(!not_modified(&rq, &h));
    }
}
