//! The client's request, checked and rewritten for a backend: refusals before routing
//! (CONNECT, header limits, a bad `Host`), the authority and the normalised path that routing
//! and the backend both see, and the forwarded headers (`X-Forwarded-*`, hop-by-hop removed).

use std::borrow::Cow;

use bytes::BytesMut;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::answer::ProxyError;
use crate::conn::ConnInfo;
use crate::forwarded::{Forwarded, XFF, XFH, XFP};
use crate::headers::{has_token, strip_hop_by_hop, NOT_FORWARDED};
use crate::request_body::UpBody;

pub fn build(method: &Method, uri: &Uri, headers: HeaderMap, body: UpBody) -> Request<UpBody> {
    let mut r = Request::new(body);
    *r.method_mut() = method.clone();
    *r.uri_mut() = uri.clone();
    *r.version_mut() = Version::HTTP_11;
    *r.headers_mut() = headers;
    r
}

/// The same cap as hyper's HTTP/1 parser, applied to h2 requests too.
const MAX_HEADER_FIELDS: usize = 100;

/// Requests the proxy refuses before routing.
pub fn check_request(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed("CONNECT is not proxied"));
    }
    // hyper caps h1 at 100 fields itself; h2 has only a byte limit, and cookie crumbs arrive
    // as separate fields, so count here for every version.
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(ProxyError::HeadersTooLarge);
    }
    check_transfer_codings(&parts.headers)?;
    Ok(())
}

/// hyper accepts any `Transfer-Encoding` whose last coding is `chunked` and decodes only
/// that one: the body of `gzip, chunked` would reach the backend still gzipped and no longer
/// labelled so. Codings we do not implement are a 501 (RFC 9112 §6.1), and chunked applied
/// twice (RFC 9112 §7: MUST NOT) a 400.
fn check_transfer_codings(h: &HeaderMap) -> Result<(), ProxyError> {
    let mut chunked = 0;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let v = v
            .to_str()
            .map_err(|_| ProxyError::BadRequest("invalid Transfer-Encoding"))?;
        for coding in v.split(',') {
            let name = coding.split(';').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else if !name.is_empty() {
                return Err(ProxyError::UnsupportedTransferCoding(
                    "only chunked is implemented",
                ));
            }
        }
    }
    if chunked > 1 {
        return Err(ProxyError::BadRequest("chunked applied more than once"));
    }
    Ok(())
}

/// The authority the request is for: an absolute-form target's wins over `Host` (RFC 9112
/// §3.2.2), h2's `:authority` likewise. Several `Host` headers are refused.
/// Returned as a `HeaderValue`: for the common `Host` case that is a reference-counted clone
/// of the parsed header, no copy.
pub fn authority(parts: &http::request::Parts) -> Result<Option<HeaderValue>, ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("several Host headers"));
    }
    if let Some(a) = parts.uri.authority() {
        if parts.version == Version::HTTP_2 {
            if let Some(h) = host {
                if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                    return Err(ProxyError::BadRequest("host disagrees with :authority"));
                }
            }
        }
        // `http`'s parser accepts userinfo (`evil@a.example`), which RFC 9113 §8.3.1 and
        // RFC 9110 §4.2.4 forbid here.
        if !valid_host(a.as_str().as_bytes()) {
            return Err(ProxyError::BadRequest("invalid authority"));
        }
        return HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid authority"));
    }
    match host {
        Some(h) if valid_host(h.as_bytes()) => Ok(Some(h.clone())),
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        None if parts.version == Version::HTTP_11 => {
            Err(ProxyError::BadRequest("missing Host header"))
        }
        None => Ok(None),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2) with a host routing can trust: a bracketed IP
/// literal, or a reg-name of non-empty labels (one trailing dot allowed) without userinfo, and
/// a decimal port up to 65535. Anything else could be matched differently by a route and by
/// the backend.
pub fn valid_host(h: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        {
            return false;
        }
        let after = &rest[end + 1..];
        match after.strip_prefix(b":") {
            Some(p) => (None, Some(p)),
            None if after.is_empty() => (None, None),
            None => return false,
        }
    } else {
        match h.iter().rposition(|b| *b == b':') {
            Some(i) => (Some(&h[..i]), Some(&h[i + 1..])),
            None => (Some(h), None),
        }
    };
    if let Some(p) = port {
        let n = p.iter().try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        });
        if p.is_empty() || p.len() > 5 || n.is_none_or(|n| n > 65535) {
            return false;
        }
    }
    let Some(host) = host else {
        return true;
    };
    // One pass with a table: this runs on every request.
    let host = host.strip_suffix(b".").unwrap_or(host);
    let mut label = 0usize;
    for &b in host {
        match b {
            b'.' if label == 0 => return false,
            b'.' => label = 0,
            _ if LABEL_BYTE[usize::from(b)] => label += 1,
            _ => return false,
        }
    }
    label > 0
}

/// Bytes a reg-name label may hold: RFC 3986's unreserved characters, sub-delims and `%`.
const LABEL_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    t
};

pub fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The path routing and the backend both see (RFC 3986 §6.2.2): escapes of unreserved
/// characters decoded and the hex of the others upper-cased (so `/%61dmin` is `/admin`), then
/// dot segments removed (§5.2.4; decoding first makes `/%2e%2e/` one), then empty segments
/// dropped (`//admin///x` is `/admin/x`). Reserved escapes (`%2F`, `%3F`) stay encoded: they
/// mean something else decoded. Paths already in that form, nearly all of them, are borrowed.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || is_normal(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            _ => out.push(seg),
        }
    }
    let keep = out.len().saturating_sub(1);
    let mut s = String::with_capacity(decoded.len());
    for (i, seg) in out.iter().enumerate() {
        // An empty segment only survives as the trailing slash.
        if seg.is_empty() && i != keep {
            continue;
        }
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    Cow::Owned(s)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One pass over the bytes: no escape to decode or upper-case, no empty, `.` or `..` segment.
fn is_normal(p: &[u8]) -> bool {
    let mut seg_start = 1;
    let mut i = 1;
    while i <= p.len() {
        match p.get(i) {
            None | Some(b'/') => {
                let seg = &p[seg_start..i];
                if seg == b"." || seg == b".." || (seg.is_empty() && i < p.len()) {
                    return false;
                }
                seg_start = i + 1;
            }
            Some(b'%') => {
                if let (Some(&h), Some(&l)) = (p.get(i + 1), p.get(i + 2)) {
                    if let (Some(hv), Some(lv)) = (hex(h), hex(l)) {
                        if is_unreserved(hv << 4 | lv)
                            || h.is_ascii_lowercase()
                            || l.is_ascii_lowercase()
                        {
                            return false;
                        }
                    }
                }
            }
            Some(_) => {}
        }
        i += 1;
    }
    true
}

/// Decodes escapes of unreserved characters and upper-cases the hex of the rest; a `%` not
/// followed by two hex digits is left as it is.
fn decode_unreserved(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) {
                if let (Some(hv), Some(lv)) = (hex(h), hex(l)) {
                    let c = hv << 4 | lv;
                    if is_unreserved(c) {
                        out.push(c as char);
                    } else {
                        out.push('%');
                        out.push(h.to_ascii_uppercase() as char);
                        out.push(l.to_ascii_uppercase() as char);
                    }
                    i += 3;
                    continue;
                }
            }
        }
        // Paths are ASCII (the URI parser refuses anything else), so bytes are chars.
        out.push(b[i] as char);
        i += 1;
    }
    out
}

pub fn upstream_uri(uri: &Uri, path: &str) -> Result<Uri, ProxyError> {
    if path == uri.path() {
        if uri.scheme().is_none() && uri.authority().is_none() {
            return Ok(uri.clone());
        }
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        return Uri::try_from(pq).map_err(|_| ProxyError::BadRequest("invalid target"));
    }
    let mut s = String::with_capacity(path.len() + 32);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    Uri::try_from(s).map_err(|_| ProxyError::BadRequest("invalid target"))
}

/// h2 clients may split `cookie` into one field per pair (RFC 9113 §8.2.3); an HTTP/1.1
/// backend expects a single `Cookie` line, so the crumbs are joined with "; " again.
pub fn join_cookie_crumbs(h: &mut HeaderMap) {
    let mut crumbs = h.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = BytesMut::with_capacity(256);
    for (i, v) in h.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        h.insert(header::COOKIE, v);
    }
}

/// Drops request headers whose name has a `_` (nginx's default): CGI-style backends map
/// `X_Forwarded_For` and `X-Forwarded-For` to the same variable, so a client could pass off
/// its own value as one the balancer set.
pub fn drop_underscored(h: &mut HeaderMap) {
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// gRPC needs `te: trailers` to reach the server (servers refuse a call without it, since it
/// is how a client says it reads trailers, where gRPC's status travels); for any other request
/// `TE` is hop-by-hop like the rest.
fn keeps_te_trailers(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        && has_token(h, header::TE, "trailers")
}

/// Turns the client's headers into the backend's: hop-by-hop fields and the ones that stop
/// here out, the client's own `X-Forwarded-*` folded into (or replaced by) what is returned.
pub fn rewrite_request_headers(
    h: &mut HeaderMap,
    authority: Option<HeaderValue>,
    conn: &ConnInfo,
) -> Forwarded {
    let te_trailers = keeps_te_trailers(h);
    strip_hop_by_hop(h);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // One pass over the names, no lookup, finds what is rarely there.
    let (mut stops, mut forwarded) = (false, false);
    for k in h.keys() {
        stops |= NOT_FORWARDED.contains(k);
        forwarded |= *k == XFF || *k == XFP || *k == XFH;
    }
    if stops {
        for n in &NOT_FORWARDED {
            h.remove(n);
        }
    }
    let mut xff = conn.peer_ip.clone();
    if forwarded {
        // The client's X-Forwarded-For lines go ahead of the peer, in one list; its
        // X-Forwarded-Proto and -Host are replaced.
        if let Entry::Occupied(e) = h.entry(&XFF) {
            let mut list = BytesMut::with_capacity(64);
            for v in e.iter() {
                list.extend_from_slice(v.as_bytes());
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(conn.peer_ip.as_bytes());
            xff = HeaderValue::from_maybe_shared(list.freeze())
                .unwrap_or_else(|_| conn.peer_ip.clone());
            drop(e.remove_entry_mult());
        }
        h.remove(&XFP);
        h.remove(&XFH);
    }
    if let Some(a) = &authority {
        // The client's Host is kept; for h2 and absolute-form it is the authority.
        h.insert(header::HOST, a.clone());
    }
    Forwarded {
        xff,
        proto: if conn.tls { "https" } else { "http" },
        host: authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_removed() {
        assert_eq!(normalize_path("/a/b"), "/a/b");
        assert_eq!(normalize_path("/public/../admin"), "/admin");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/../../x"), "/x");
        assert_eq!(normalize_path("/a/%2e%2e/b"), "/b");
        assert_eq!(normalize_path("/a/.."), "/");
    }

    #[test]
    fn unreserved_escapes_decoded_and_slashes_merged() {
        assert_eq!(normalize_path("/%61dmin"), "/admin");
        assert_eq!(normalize_path("/%61%44min/x"), "/aDmin/x");
        assert_eq!(normalize_path("/%7euser"), "/~user");
        assert_eq!(normalize_path("/a%2db%2E%5f"), "/a-b._");
        assert_eq!(normalize_path("//admin///x"), "/admin/x");
        assert_eq!(normalize_path("//"), "/");
        assert_eq!(normalize_path("/a//"), "/a/");
        assert_eq!(normalize_path("/%2e%2e/admin"), "/admin");
        assert_eq!(normalize_path("/public/%2E./admin"), "/admin");
        assert_eq!(normalize_path("/public//../d"), "/public/d");
        assert_eq!(normalize_path("/x/%2E%2E//%61dmin"), "/admin");
        // Reserved and non-ASCII escapes stay encoded, in upper case.
        assert_eq!(normalize_path("/a%2fb"), "/a%2Fb");
        assert_eq!(normalize_path("/a%3f%23"), "/a%3F%23");
        assert_eq!(normalize_path("/caf%c3%a9"), "/caf%C3%A9");
        // Not an escape: left alone.
        assert_eq!(normalize_path("/a%zz%4"), "/a%zz%4");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a/b",
            "/a/",
            "/a%2Fb",
            "/caf%C3%A9",
            "/a.b/.c/..d",
            "/a%zz",
            "*",
        ] {
            assert!(matches!(normalize_path(p), Cow::Borrowed(_)), "{p}");
        }
        for p in ["/a%2fb", "/%41", "//", "/a//b", "/.", "/a/..", "/a/./b"] {
            assert!(matches!(normalize_path(p), Cow::Owned(_)), "{p}");
        }
    }

    #[test]
    fn hosts() {
        for h in [
            "a.example",
            "a.example.",
            "a.example:8080",
            "localhost",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "under_score.example",
        ] {
            assert!(valid_host(h.as_bytes()), "{h}");
        }
        for h in [
            "",
            "evil@a.example",
            "a..example",
            ".a.example",
            "a.example..",
            "a.example:",
            "a.example:65536",
            "a.example:8o",
            "a.example:123456",
            "a:b:c",
            "[::1",
            "[::1]x",
            "[]",
            "a/b",
            "a b",
            "a\\b",
            ":80",
        ] {
            assert!(!valid_host(h.as_bytes()), "{h}");
        }
    }

    #[test]
    fn cookie_crumbs_joined_and_underscores_dropped() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append("x_forwarded_for", HeaderValue::from_static("1.2.3.4"));
        h.append("x-kept", HeaderValue::from_static("1"));
        join_cookie_crumbs(&mut h);
        drop_underscored(&mut h);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
        assert!(h.get("x_forwarded_for").is_none());
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn transfer_codings() {
        let te = |v: &[&str]| {
            let mut h = HeaderMap::new();
            for v in v {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            check_transfer_codings(&h)
        };
        assert!(te(&[]).is_ok());
        assert!(te(&["chunked"]).is_ok());
        assert!(te(&["Chunked"]).is_ok());
        assert!(matches!(
            te(&["gzip, chunked"]),
            Err(ProxyError::UnsupportedTransferCoding(_))
        ));
        assert!(matches!(
            te(&["x", "chunked"]),
            Err(ProxyError::UnsupportedTransferCoding(_))
        ));
        assert!(matches!(
            te(&["chunked", "chunked"]),
            Err(ProxyError::BadRequest(_))
        ));
    }
}
