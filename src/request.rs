//! The client's request, checked and rewritten for a backend: refusals before routing
//! (CONNECT, header limits, a bad `Host`), the authority and the normalised path that routing
//! and the backend both see, and the forwarded headers (`X-Forwarded-*`, hop-by-hop removed).

use bytes::BytesMut;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::answer::ProxyError;
use crate::conn::ConnInfo;
use crate::headers::{strip_hop_by_hop, NOT_FORWARDED};
use crate::request_body::UpBody;
use crate::state::Snapshot;

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
pub fn check_request(snap: &Snapshot, parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed("CONNECT is not proxied"));
    }
    // hyper caps h1 at 100 fields itself; h2 has only a byte limit, and cookie crumbs arrive
    // as separate fields, so count here for every version.
    if parts.headers.len() > MAX_HEADER_FIELDS {
        return Err(ProxyError::HeadersTooLarge);
    }
    let max = snap.limits.max_header_bytes;
    // hyper enforces the limit itself from MIN_HEADER_BUFFER up; below that, count here.
    if max < crate::config::MIN_HEADER_BUFFER {
        let total: usize = parts
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + parts.uri.to_string().len();
        if total as u64 > max {
            return Err(ProxyError::HeadersTooLarge);
        }
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
        return HeaderValue::from_str(a.as_str())
            .map(Some)
            .map_err(|_| ProxyError::BadRequest("invalid authority"));
    }
    match host {
        Some(h) if !h.is_empty() && h.as_bytes().iter().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(h.clone()))
        }
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        None if parts.version == Version::HTTP_11 => {
            Err(ProxyError::BadRequest("missing Host header"))
        }
        None => Ok(None),
    }
}

pub fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Removes dot segments (RFC 3986 §5.2.4) so that routing and the backend see the same path,
/// and `/public/../admin` is routed as `/admin`. Paths without dot segments are borrowed.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    let has_dots = path.split('/').any(|s| {
        s == "."
            || s == ".."
            || s.eq_ignore_ascii_case("%2e")
            || s.eq_ignore_ascii_case("%2e%2e")
            || s.eq_ignore_ascii_case(".%2e")
            || s.eq_ignore_ascii_case("%2e.")
    });
    if !has_dots || !path.starts_with('/') {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        let dot = *seg == "." || seg.eq_ignore_ascii_case("%2e");
        let dotdot = *seg == ".."
            || seg.eq_ignore_ascii_case("%2e%2e")
            || seg.eq_ignore_ascii_case(".%2e")
            || seg.eq_ignore_ascii_case("%2e.");
        if dot || dotdot {
            if dotdot {
                out.pop();
            }
            if i == last {
                out.push("");
            }
        } else {
            out.push(seg);
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() {
        s.push('/');
    }
    std::borrow::Cow::Owned(s)
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

static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

pub fn rewrite_request_headers(h: &mut HeaderMap, authority: Option<HeaderValue>, conn: &ConnInfo) {
    strip_hop_by_hop(h);
    if h.keys().any(|k| NOT_FORWARDED.contains(k)) {
        for n in &NOT_FORWARDED {
            h.remove(n);
        }
    }
    // X-Forwarded-For: the client's chain, then the peer we saw.
    let forwarded = match h.entry(&XFF) {
        Entry::Vacant(_) => conn.peer_ip.clone(),
        Entry::Occupied(e) => {
            let mut xff = BytesMut::with_capacity(64);
            for v in e.iter() {
                xff.extend_from_slice(v.as_bytes());
                xff.extend_from_slice(b", ");
            }
            xff.extend_from_slice(conn.peer_ip.as_bytes());
            HeaderValue::from_maybe_shared(xff.freeze()).unwrap_or_else(|_| conn.peer_ip.clone())
        }
    };
    h.insert(XFF.clone(), forwarded);
    h.insert(
        XFP.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(a) = authority {
        h.insert(XFH.clone(), a.clone());
        // The client's Host is kept; for h2 and absolute-form it is the authority.
        h.insert(header::HOST, a);
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
}
