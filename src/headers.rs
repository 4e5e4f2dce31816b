//! Hop-by-hop headers (RFC 9110 §7.6.1): what stops at the balancer in either direction.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those the proxy re-frames or answers itself.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Request headers that are not hop-by-hop but still stop here: the encoder frames the body,
/// the balancer answers `Expect` itself, and proxy credentials are for the proxy.
pub(crate) const NOT_FORWARDED: [HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::EXPECT,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names.
///
/// It runs on every request and every response: one pass over the headers finds which
/// hop-by-hop names are there (an HTTP/1.1 backend's `Connection: keep-alive` never reaches
/// the map: `upstream::http1` reads it while parsing), only those are removed, and
/// `Connection`'s tokens are removed by `&str` (no `HeaderName` allocated), the hop-by-hop
/// ones among them being removed already. It was ~2,400 instructions per proxied
/// request (callgrind) with a removal per name and an allocation per token.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = 0u8;
    for k in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|n| n == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // CONNECTION is HOP_BY_HOP[0]. Its tokens are nearly always `close` or `keep-alive`,
    // which name no field: on bytes, nothing is collected or allocated for them.
    if present & 1 != 0 && connection_names(h).next().is_some() {
        let named: Vec<String> = connection_names(h)
            .filter_map(|t| std::str::from_utf8(t).ok())
            .map(str::to_owned)
            .collect();
        for n in &named {
            h.remove(n.as_str());
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
}

/// The fields `Connection` names, other than the hop-by-hop ones removed anyway (`close` is a
/// connection option, not a field anyone sends).
fn connection_names(h: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !is_hop_by_hop(t))
}

fn is_hop_by_hop(token: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|n| n.as_str().as_bytes().eq_ignore_ascii_case(token))
}

/// Whether a comma-separated header lists `token` (case-insensitive).
pub fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    // On bytes: checked on every backend response (`Connection`), where going through
    // `to_str` and `str::split` cost ~470 instructions (callgrind).
    let token = token.as_bytes();
    h.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn tokens_are_found_in_any_field_whatever_their_case_and_spacing() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!has_token(&h, header::CONNECTION, "close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade ,\tCLOSE"),
        );
        assert!(has_token(&h, header::CONNECTION, "close"));
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::CONNECTION, "clos"));
        assert!(!has_token(&h, header::UPGRADE, "upgrade"));
    }

    #[test]
    fn connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn tokens_match_names_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Secret , Upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        // Nothing hop-by-hop: untouched.
        let mut h = HeaderMap::new();
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn a_named_field_goes_even_beside_a_token_that_is_not_ascii() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xc3\xa9").unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
