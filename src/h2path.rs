//! The raw `:path` of h2 requests, which hyper never shows: the `http` URI parser drops a
//! `#fragment` silently, so `GET /a#b` over h2 would reach the backend as `/a`. HTTP/1.1
//! refuses a `#` in the target (see `framing.rs`); to do the same for h2, this follows the
//! frames a client sends (inside `framing::Sniffer`, before hyper reads them), decodes each
//! header block with its own HPACK decoder (RFC 7541; its dynamic table must track the
//! client's exactly) and reports every `:path` with a `#` to the connection, where
//! `proxy::forward` finds the request it became and answers `400`.
//!
//! Only `:path` values are materialised; other strings are decoded just far enough to know
//! their length, which the dynamic table's accounting needs.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;

use crate::conn::ConnInfo;

/// A header block larger than this (hyper refuses far smaller header lists) is not followed:
/// the connection's requests are then refused, since their paths can no longer be checked.
const MAX_BLOCK: usize = 1024 * 1024;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Follows the client side of one h2 connection, from just after the `PRI * HTTP/2.0` line.
pub struct Follower {
    /// Bytes of `SM\r\n\r\n` still to skip.
    magic: usize,
    head: [u8; 9],
    head_len: usize,
    /// The frame whose payload is being read: type, flags, bytes left.
    frame: Option<(u8, u8, usize)>,
    payload: Vec<u8>,
    block: Vec<u8>,
    decoder: Decoder,
    lost: bool,
}

impl Default for Follower {
    fn default() -> Self {
        Follower {
            magic: 6,
            head: [0; 9],
            head_len: 0,
            frame: None,
            payload: Vec::new(),
            block: Vec::new(),
            decoder: Decoder::new(),
            lost: false,
        }
    }
}

impl Follower {
    pub fn feed(&mut self, mut buf: &[u8], info: &ConnInfo) {
        while !buf.is_empty() && !self.lost {
            if self.magic > 0 {
                let k = self.magic.min(buf.len());
                self.magic -= k;
                buf = &buf[k..];
                continue;
            }
            match &mut self.frame {
                None => {
                    let k = (9 - self.head_len).min(buf.len());
                    self.head[self.head_len..self.head_len + k].copy_from_slice(&buf[..k]);
                    self.head_len += k;
                    buf = &buf[k..];
                    if self.head_len == 9 {
                        self.head_len = 0;
                        let h = self.head;
                        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                        self.frame = Some((h[3], h[4], len));
                        if len == 0 {
                            self.frame_done(info);
                        }
                    }
                }
                Some((kind, _, left)) => {
                    let k = (*left).min(buf.len());
                    if matches!(*kind, HEADERS | CONTINUATION) {
                        if self.payload.len() + self.block.len() + k > MAX_BLOCK {
                            self.lose(info);
                            return;
                        }
                        self.payload.extend_from_slice(&buf[..k]);
                    }
                    *left -= k;
                    buf = &buf[k..];
                    if *left == 0 {
                        self.frame_done(info);
                    }
                }
            }
        }
    }

    fn frame_done(&mut self, info: &ConnInfo) {
        let Some((kind, flags, _)) = self.frame.take() else {
            return;
        };
        if !matches!(kind, HEADERS | CONTINUATION) {
            return;
        }
        let mut p = &self.payload[..];
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let pad = p.first().copied().unwrap_or(0) as usize;
                p = p.get(1..p.len().saturating_sub(pad)).unwrap_or(&[]);
            }
            if flags & PRIORITY != 0 {
                p = p.get(5..).unwrap_or(&[]);
            }
        }
        self.block.extend_from_slice(p);
        self.payload.clear();
        if flags & END_HEADERS != 0 {
            let mut fragments = Vec::new();
            if self.decoder.decode(&self.block, &mut fragments).is_err() {
                // h2 fails the connection on the same bytes (COMPRESSION_ERROR).
                self.lose(info);
                return;
            }
            self.block.clear();
            for f in fragments {
                info.report_h2_fragment(f);
            }
        }
    }

    fn lose(&mut self, info: &ConnInfo) {
        self.lost = true;
        self.payload = Vec::new();
        self.block = Vec::new();
        info.h2_unchecked.store(true, Relaxed);
    }
}

struct Entry {
    /// RFC 7541 §4.1: name and value lengths plus 32.
    size: usize,
    /// A literal that names this entry's name makes a new entry of that name's length.
    name_len: usize,
    /// The value, kept only when the name is `:path`.
    path: Option<Box<[u8]>>,
}

struct Decoder {
    table: VecDeque<Entry>,
    size: usize,
    max: usize,
}

#[derive(Debug)]
pub struct Invalid;

/// The static table's name lengths (RFC 7541 Appendix A), index 1..=61; `:path` is 4 and 5.
const STATIC_NAME_LEN: [usize; 61] = [
    10, 7, 7, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7, 7, 14, 15, 15, 14, 6, 13, 27, 3, 5, 13, 19, 13, 16, 16,
    16, 14, 12, 6, 4, 4, 6, 7, 4, 8, 4, 17, 13, 13, 19, 17, 13, 4, 8, 12, 18, 19, 5, 7, 7, 11, 6,
    10, 25, 2, 17, 4, 16,
];

impl Decoder {
    fn new() -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            // SETTINGS_HEADER_TABLE_SIZE's default, which hyper's server keeps.
            max: 4096,
        }
    }

    /// Decodes one header block; `:path` values with a `#` go to `out`, cut where the URI
    /// parser cuts them.
    fn decode(&mut self, mut b: &[u8], out: &mut Vec<Box<str>>) -> Result<(), Invalid> {
        let mut value = Vec::new();
        while let Some(&first) = b.first() {
            if first & 0x80 != 0 {
                let i = int(&mut b, 7)?;
                if let Some(v) = self.indexed_path(i)? {
                    report(v, out);
                }
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update, bounded by our (default) setting.
                let max = int(&mut b, 5)?;
                if max > 4096 {
                    return Err(Invalid);
                }
                self.max = max;
                self.evict();
            } else {
                // Literal: with incremental indexing (01), without (0000) or never (0001).
                let add = first & 0xc0 == 0x40;
                let i = int(&mut b, if add { 6 } else { 4 })?;
                let (name_len, is_path) = if i == 0 {
                    let mut name = Vec::new();
                    let n = string(&mut b, Some(&mut name))?;
                    (n, name == b":path")
                } else {
                    self.name(i)?
                };
                value.clear();
                let value_len = string(&mut b, is_path.then_some(&mut value))?;
                if is_path {
                    report(&value, out);
                }
                if add {
                    self.insert(Entry {
                        size: name_len + value_len + 32,
                        name_len,
                        path: is_path.then(|| value.clone().into_boxed_slice()),
                    });
                }
            }
        }
        Ok(())
    }

    /// The `:path` value behind index `i`, if that entry is a `:path` of the dynamic table.
    fn indexed_path(&self, i: usize) -> Result<Option<&[u8]>, Invalid> {
        match i {
            0 => Err(Invalid),
            1..=61 => Ok(None),
            _ => Ok(self.table.get(i - 62).ok_or(Invalid)?.path.as_deref()),
        }
    }

    /// Name length and whether it is `:path`, for index `i`.
    fn name(&self, i: usize) -> Result<(usize, bool), Invalid> {
        match i {
            0 => Err(Invalid),
            1..=61 => Ok((STATIC_NAME_LEN[i - 1], i == 4 || i == 5)),
            _ => {
                let e = self.table.get(i - 62).ok_or(Invalid)?;
                Ok((e.name_len, e.path.is_some()))
            }
        }
    }

    fn insert(&mut self, e: Entry) {
        self.size += e.size;
        self.table.push_front(e);
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

fn report(v: &[u8], out: &mut Vec<Box<str>>) {
    if let Some(i) = v.iter().position(|b| *b == b'#') {
        out.push(String::from_utf8_lossy(&v[..i]).into());
    }
}

/// RFC 7541 §5.1.
fn int(b: &mut &[u8], prefix: u8) -> Result<usize, Invalid> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let (&first, rest) = b.split_first().ok_or(Invalid)?;
    *b = rest;
    let mut v = (first & mask) as usize;
    if v < mask as usize {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first().ok_or(Invalid)?;
        *b = rest;
        if shift > 28 {
            return Err(Invalid);
        }
        v += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// RFC 7541 §5.2: the decoded length, and the decoded bytes into `out` when asked for.
fn string(b: &mut &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, Invalid> {
    let huffman = b.first().ok_or(Invalid)? & 0x80 != 0;
    let len = int(b, 7)?;
    let raw = b.get(..len).ok_or(Invalid)?;
    *b = &b[len..];
    if !huffman {
        if let Some(out) = out {
            out.extend_from_slice(raw);
        }
        return Ok(len);
    }
    huffman_decode(raw, out)
}

/// Huffman code lengths by symbol, EOS last (RFC 7541 Appendix B; copied from the h2
/// crate's table). The code is canonical, so the lengths define it.
const CODE_LEN: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30, // EOS
];

struct Canonical {
    /// By length: the first code, how many codes, and where their symbols start in `symbols`.
    first: [u32; 31],
    count: [u32; 31],
    offset: [u16; 31],
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut c = Canonical {
        first: [0; 31],
        count: [0; 31],
        offset: [0; 31],
        symbols: [0; 257],
    };
    let mut s = 0;
    while s < 257 {
        c.count[CODE_LEN[s] as usize] += 1;
        s += 1;
    }
    let mut code = 0u32;
    let mut at = 0u16;
    let mut len = 1;
    while len <= 30 {
        code = (code + c.count[len - 1]) << 1;
        c.first[len] = code;
        c.offset[len] = at;
        let mut s = 0;
        while s < 257 {
            if CODE_LEN[s] as usize == len {
                c.symbols[at as usize] = s as u16;
                at += 1;
            }
            s += 1;
        }
        len += 1;
    }
    c
}

static CANONICAL: Canonical = canonical();

fn huffman_decode(raw: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, Invalid> {
    let c = &CANONICAL;
    let mut n = 0;
    let mut code = 0u32;
    let mut len = 0usize;
    for byte in raw {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len > 30 {
                return Err(Invalid);
            }
            let k = code.wrapping_sub(c.first[len]);
            if code >= c.first[len] && k < c.count[len] {
                let sym = c.symbols[(u32::from(c.offset[len]) + k) as usize];
                if sym == 256 {
                    return Err(Invalid);
                }
                if let Some(out) = out.as_deref_mut() {
                    out.push(sym as u8);
                }
                n += 1;
                code = 0;
                len = 0;
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(Invalid);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huffman_codes_are_the_rfc_ones() {
        let c = &CANONICAL;
        let code_of = |sym: u16| {
            let len = CODE_LEN[sym as usize] as usize;
            let at = (c.offset[len]..c.offset[len] + c.count[len] as u16)
                .position(|i| c.symbols[i as usize] == sym)
                .unwrap();
            (c.first[len] + at as u32, len)
        };
        assert_eq!(code_of(b'0' as u16), (0x0, 5));
        assert_eq!(code_of(b'a' as u16), (0x3, 5));
        assert_eq!(code_of(b'/' as u16), (0x18, 6));
        assert_eq!(code_of(b'#' as u16), (0xffa, 12));
        assert_eq!(code_of(b'~' as u16), (0x1ffd, 13));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(256), (0x3fffffff, 30));
    }

    #[test]
    fn rfc_7541_c_4_requests_with_huffman() {
        // C.4.1 .. C.4.3: three requests on one connection, the dynamic table carried over.
        let mut d = Decoder::new();
        let mut out = Vec::new();
        let r1 = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        d.decode(&r1, &mut out).unwrap();
        assert_eq!(d.size, 57);
        let r2 = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ];
        d.decode(&r2, &mut out).unwrap();
        assert_eq!(d.size, 110);
        let r3 = [
            0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
            0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
        ];
        d.decode(&r3, &mut out).unwrap();
        assert_eq!(d.size, 164);
        assert!(out.is_empty());
    }

    #[test]
    fn paths_with_a_fragment_are_reported_however_encoded() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        // Literal with incremental indexing, name :path (static 4), raw "/a#b".
        d.decode(&[0x44, 4, b'/', b'a', b'#', b'b'], &mut out)
            .unwrap();
        // The same entry again, indexed (62), then Huffman "/a#a" without indexing:
        // '/'=011000 'a'=00011 '#'=111111111010 'a'=00011, padded with ones.
        let bits = u32::from_str_radix("0110000001111111111101000011", 2).unwrap() << 4 | 0xf;
        let mut block = vec![0xbe, 0x04, 0x84];
        block.extend_from_slice(&bits.to_be_bytes());
        d.decode(&block, &mut out).unwrap();
        // A literal name ":path", never indexed.
        let mut block = vec![0x10, 5];
        block.extend_from_slice(b":path");
        block.extend_from_slice(&[3, b'/', b'#', b'x', 0x84]);
        d.decode(&block, &mut out).unwrap();
        let got: Vec<&str> = out.iter().map(|s| &**s).collect();
        assert_eq!(got, ["/a", "/a", "/a", "/"]);
    }
}
