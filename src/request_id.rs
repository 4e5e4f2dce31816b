//! Request IDs (`[log] request_id_header`) and W3C trace context, as the access log sees them.
//!
//! A client's (or an outer proxy's) ID is kept when it is sane, so one ID follows the request
//! through every hop; otherwise the balancer makes one. Making one is on the hot path: 128 bits
//! from a per-thread wyrand generator (seeded once per thread, no syscall per request),
//! formatted as a UUID v4 into a stack buffer, and one `Bytes` for the header value. The IDs
//! only have to be unique, not unpredictable: nobody should authorise anything with them.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// Longer incoming IDs are replaced: an ID is copied into every log line and sent on, and no
/// ID scheme in use (UUIDs, ULIDs, AWS/GCP trace headers) needs more.
pub const MAX_LEN: usize = 128;

/// The W3C Trace Context header (<https://www.w3.org/TR/trace-context/>).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The request's ID: its own under `name` when that is a single sane value (a cheap clone of
/// the parsed header), else a new one. Several values are ambiguous (which one would the
/// backend log?), so they are replaced too.
pub fn pick(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    let mut all = headers.get_all(name).iter();
    if let (Some(v), None) = (all.next(), all.next()) {
        if is_sane(v.as_bytes()) {
            return v.clone();
        }
    }
    generate()
}

/// Visible ASCII only (no spaces, no control bytes, nothing that needs escaping in a log
/// line's consumers beyond JSON's own), 1 to `MAX_LEN` bytes.
pub fn is_sane(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_LEN && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

thread_local! {
    /// wyrand state. Seeded from std's per-thread random hash keys (read from the OS once per
    /// thread) and the clock, so threads and restarts start far apart in the sequence.
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    h.write_u64(nanos);
    h.finish()
}

/// wyrand (Wang Yi): one add and one 64x64->128 multiply per output, period 2^64.
fn next_u64() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    })
}

/// A new ID shaped like a random UUID (RFC 9562 version 4): `xxxxxxxx-xxxx-4xxx-Yxxx-xxxxxxxxxxxx`
/// in lower-case hex, Y one of 8, 9, a, b.
///
/// Marked sensitive, which HTTP/2 encodes as a never-indexed literal (RFC 7541 §7.1.3): a
/// value seen once would only push reusable headers out of the HPACK tables of the balancer
/// and of every peer downstream and upstream.
pub fn generate() -> HeaderValue {
    let mut buf = [0u8; 36];
    format_uuid(next_u64(), next_u64(), &mut buf);
    // Only hex digits and dashes: always a valid header value; the fallback is unreachable
    // and still not a panic.
    let mut v = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&buf))
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"));
    v.set_sensitive(true);
    v
}

fn format_uuid(hi: u64, lo: u64, out: &mut [u8; 36]) {
    let hi = (hi & !0xf000) | 0x4000; // version 4, in the third group's first digit
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // variant 10xx, in the fourth group
    let bytes = {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(&lo.to_be_bytes());
        b
    };
    // Two hex digits per byte, with the dashes after bytes 4, 6, 8 and 10.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut j = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[usize::from(byte >> 4)];
        out[j + 1] = HEX[usize::from(byte & 0xf)];
        j += 2;
    }
}

/// The trace id (the 32-hex second field) of a valid `traceparent`
/// (`version-traceid-parentid-flags`), for the log. The header itself is forwarded untouched,
/// whatever its shape: tracing is the backend's business; the log only records what is valid.
pub fn trace_id(headers: &HeaderMap) -> Option<[u8; 32]> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let v = all.next()?;
    if all.next().is_some() {
        // Trace Context §3.2: several traceparent headers make it invalid.
        return None;
    }
    parse_traceparent(v.as_bytes())
}

fn parse_traceparent(b: &[u8]) -> Option<[u8; 32]> {
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (version, trace, parent, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..55]);
    if !lower_hex(version) || version == b"ff" || !lower_hex(flags) {
        return None;
    }
    // Version 00 is exactly 55 bytes; a later version may append fields after a dash.
    if (version == b"00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let zero = |s: &[u8]| s.iter().all(|c| *c == b'0');
    if !lower_hex(trace) || !lower_hex(parent) || zero(trace) || zero(parent) {
        return None;
    }
    trace.try_into().ok()
}

/// The ID as text for diagnostic log fields.
pub fn as_str(v: Option<&HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_uuid_v4(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
            })
            && b[14] == b'4'
            && matches!(b[19], b'8' | b'9' | b'a' | b'b')
    }

    #[test]
    fn generated_ids_are_uuid_v4_shaped_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let v = generate();
            let s = v.to_str().unwrap().to_owned();
            assert!(is_uuid_v4(&s), "{s}");
            assert!(seen.insert(s));
        }
        let other = std::thread::spawn(|| generate().to_str().unwrap().to_owned())
            .join()
            .unwrap();
        assert!(!seen.contains(&other));
    }

    #[test]
    fn format_places_every_bit() {
        let mut b = [0u8; 36];
        format_uuid(u64::MAX, u64::MAX, &mut b);
        assert_eq!(&b, b"ffffffff-ffff-4fff-bfff-ffffffffffff");
        format_uuid(0, 0, &mut b);
        assert_eq!(&b, b"00000000-0000-4000-8000-000000000000");
        format_uuid(0x0123_4567_89ab_cdef, 0x0123_4567_89ab_cdef, &mut b);
        assert_eq!(&b, b"01234567-89ab-4def-8123-456789abcdef");
    }

    #[test]
    fn sane_ids_are_kept_others_replaced() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("abc-123"));
        assert_eq!(pick(&h, &name), "abc-123");
        for bad in ["", "a b", "a\tb", "é"] {
            let mut h = HeaderMap::new();
            h.insert(&name, HeaderValue::from_bytes(bad.as_bytes()).unwrap());
            assert!(is_uuid_v4(pick(&h, &name).to_str().unwrap()), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_str(&"a".repeat(MAX_LEN)).unwrap());
        assert_eq!(pick(&h, &name).len(), MAX_LEN);
        h.insert(
            &name,
            HeaderValue::from_str(&"a".repeat(MAX_LEN + 1)).unwrap(),
        );
        assert!(is_uuid_v4(pick(&h, &name).to_str().unwrap()));
        let mut h = HeaderMap::new();
        h.append(&name, HeaderValue::from_static("one"));
        h.append(&name, HeaderValue::from_static("two"));
        assert!(is_uuid_v4(pick(&h, &name).to_str().unwrap()));
        assert!(is_uuid_v4(pick(&HeaderMap::new(), &name).to_str().unwrap()));
    }

    #[test]
    fn traceparent() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(ok.as_bytes()).as_ref().map(|t| &t[..]),
            Some(&b"4bf92f3577b34da6a3ce929d0e0e4736"[..])
        );
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent(later.as_bytes()).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, HeaderValue::from_static(ok));
        assert!(trace_id(&h).is_some());
        h.append(&TRACEPARENT, HeaderValue::from_static(ok));
        assert!(trace_id(&h).is_none());
    }
}
