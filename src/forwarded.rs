//! The `X-Forwarded-*` fields the balancer adds to a request for its backend. They travel
//! beside the request's head, not in its header map (see [`Forwarded`]); `request` builds
//! them, `upstream` writes them.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub(crate) static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `X-Forwarded-*` fields a backend gets, kept beside the head rather than in its header
/// map: the HTTP/1.1 encoder writes them after the map's fields, and only an HTTP/2 backend's
/// request has them inserted (`apply`). Inserting three custom names into every request's map
/// hashed each, and on a connection's first request grew the map hyper had sized to the
/// fields it parsed (~1,000 instructions per keep-alive request, ~1,900 with
/// `Connection: close`, callgrind).
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The client's chain, then the peer we saw.
    pub xff: HeaderValue,
    pub proto: &'static str,
    /// The authority the client asked for.
    pub host: Option<HeaderValue>,
}

impl Forwarded {
    /// The fields as HTTP/1.1 header lines.
    pub fn put(&self, b: &mut BytesMut) {
        b.extend_from_slice(b"x-forwarded-for: ");
        b.extend_from_slice(self.xff.as_bytes());
        b.extend_from_slice(b"\r\nx-forwarded-proto: ");
        b.extend_from_slice(self.proto.as_bytes());
        b.extend_from_slice(b"\r\n");
        if let Some(h) = &self.host {
            b.extend_from_slice(b"x-forwarded-host: ");
            b.extend_from_slice(h.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
    }

    /// Bytes `put` writes.
    pub fn encoded_len(&self) -> usize {
        const FIXED: usize = "x-forwarded-for: \r\nx-forwarded-proto: \r\n".len();
        FIXED
            + self.xff.len()
            + self.proto.len()
            + self
                .host
                .as_ref()
                .map_or(0, |h| "x-forwarded-host: \r\n".len() + h.len())
    }

    /// Into a header map (HTTP/2 backends). Replaces, so applying twice changes nothing.
    pub fn apply(&self, h: &mut HeaderMap) {
        h.insert(XFF.clone(), self.xff.clone());
        h.insert(XFP.clone(), HeaderValue::from_static(self.proto));
        if let Some(a) = &self.host {
            h.insert(XFH.clone(), a.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_as_counted_and_apply_replaces() {
        let f = Forwarded {
            xff: HeaderValue::from_static("1.2.3.4, 127.0.0.1"),
            proto: "https",
            host: Some(HeaderValue::from_static("a.example:8443")),
        };
        let mut b = BytesMut::new();
        f.put(&mut b);
        assert_eq!(
            &b[..],
            b"x-forwarded-for: 1.2.3.4, 127.0.0.1\r\nx-forwarded-proto: https\r\n\
              x-forwarded-host: a.example:8443\r\n"
        );
        assert_eq!(b.len(), f.encoded_len());
        let bare = Forwarded {
            host: None,
            ..f.clone()
        };
        let mut b = BytesMut::new();
        bare.put(&mut b);
        assert_eq!(b.len(), bare.encoded_len());
        assert!(!b.windows(6).any(|w| w == b"-host:"));

        let mut h = HeaderMap::new();
        h.insert(&XFP, HeaderValue::from_static("http"));
        f.apply(&mut h);
        f.apply(&mut h);
        assert_eq!(h.len(), 3);
        assert_eq!(h[&XFP], "https");
        assert_eq!(h[&XFF], "1.2.3.4, 127.0.0.1");
    }
}
