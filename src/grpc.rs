//! gRPC as the balancer sees it: which requests and responses are gRPC, the `grpc-timeout`
//! header (read, and rewritten for the backend with what is left of it), and `grpc-status`
//! codes (read from a backend, bounded for metric labels, written in the balancer's own
//! answers).
//!
//! Pure functions over headers, read on the request path (`proxy`, `answer`,
//! `response_body`) and by the gRPC health check; what a status means for a backend is
//! decided in `classify`, not here. The wire rules are the gRPC HTTP/2 protocol's
//! (`doc/PROTOCOL-HTTP2.md` in grpc/grpc).

use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};

pub const GRPC_STATUS: &str = "grpc-status";
pub const GRPC_MESSAGE: &str = "grpc-message";
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The status codes the balancer itself answers with (the full list of 17 is the gRPC
/// spec's; only these are ever made here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// Slots for per-code counters: codes 0 to 16, then one for anything else (missing,
/// unparsable, out of range), so that a backend cannot grow the metric's label set.
pub const CODE_SLOTS: usize = 18;

/// The counter slot for a backend's `grpc-status` (`None`: it sent none, or an unparsable one).
pub fn code_slot(code: Option<u32>) -> usize {
    match code {
        Some(c) if c <= 16 => c as usize,
        _ => CODE_SLOTS - 1,
    }
}

/// The `code` label of a slot: the number, as in the access log, or `unknown`.
pub fn slot_label(slot: usize) -> &'static str {
    const LABELS: [&str; CODE_SLOTS] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "unknown",
    ];
    LABELS.get(slot).copied().unwrap_or("unknown")
}

/// `application/grpc`, or `application/grpc+proto`, `application/grpc;...`: a gRPC message
/// stream (gRPC-Web's `application/grpc-web` is not).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(v) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let v = v.as_bytes();
    let prefix = b"application/grpc";
    v.len() >= prefix.len()
        && v[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(v.get(prefix.len()), None | Some(b'+') | Some(b';'))
}

/// A `grpc-status` value: ASCII digits only, as the spec writes it.
pub fn parse_status(v: &HeaderValue) -> Option<u32> {
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 10 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The `grpc-status` in `headers`, if present (present but unparsable: `Some(None)`).
pub fn status_in(headers: &HeaderMap) -> Option<Option<u32>> {
    headers.get(GRPC_STATUS).map(parse_status)
}

/// A `grpc-timeout` value: 1 to 8 ASCII digits and a unit, `H` `M` `S` `m` `u` `n`.
/// Anything else is `None`.
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let b = v.as_bytes();
    let (&unit, digits) = b.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value: the finest unit whose count fits the spec's 8 digits,
/// rounded up to it as grpc-go does (off by less than one unit: nanoseconds below 100 ms).
pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        for (ct, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC+json", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpcx", false),
            ("application/json", false),
            ("application/grp", false),
        ] {
            h.insert(CONTENT_TYPE, hv(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
    }

    #[test]
    fn timeouts_parse_per_spec() {
        assert_eq!(parse_timeout(&hv("100m")), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(&hv("5S")), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout(&hv("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(&hv("2M")), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(&hv("7u")), Some(Duration::from_micros(7)));
        assert_eq!(parse_timeout(&hv("9n")), Some(Duration::from_nanos(9)));
        assert_eq!(
            parse_timeout(&hv("99999999H")),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "",
            "m",
            "100",
            "100x",
            "100 m",
            "-1S",
            "+1S",
            "123456789S",
            "1.5S",
            "1s",
            "1h",
        ] {
            assert_eq!(parse_timeout(&hv(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn timeouts_format_within_eight_digits_and_round_up() {
        assert_eq!(format_timeout(Duration::from_millis(100)), "100000u");
        assert_eq!(
            format_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(
            format_timeout(Duration::from_nanos(1_000_000_001)),
            "1000001u"
        );
        assert_eq!(format_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(format_timeout(Duration::ZERO), "0n");
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(1234),
            Duration::from_secs(86_400),
            Duration::from_secs(99_999_999 * 3600),
        ] {
            let v = format_timeout(d);
            let back = parse_timeout(&v).unwrap();
            assert!(back >= d, "{d:?} -> {v:?}");
        }
    }

    #[test]
    fn status_slots_are_bounded() {
        assert_eq!(parse_status(&hv("0")), Some(0));
        assert_eq!(parse_status(&hv("14")), Some(14));
        assert_eq!(parse_status(&hv("x")), None);
        assert_eq!(parse_status(&hv(" 1")), None);
        assert_eq!(code_slot(Some(16)), 16);
        assert_eq!(code_slot(Some(17)), 17);
        assert_eq!(code_slot(None), 17);
        assert_eq!(slot_label(code_slot(Some(99))), "unknown");
        assert_eq!(slot_label(14), "14");
        assert_eq!(Code::Unavailable.header_value(), "14");
    }
}
