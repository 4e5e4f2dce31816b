//! The admin API's bearer token: `[admin] token_file`.
//!
//! Read by config validation (at start and on every reload, so rotating the token is: write
//! the file, reload), held in the snapshot's `Config`, checked by `admin.rs` on each request.
//! The token never appears in `Debug` output, logs or `/status`, and is compared in time that
//! does not depend on where a guess first differs.

use std::fmt;
use std::path::Path;

/// A secret the admin API demands as `Authorization: Bearer <token>`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token file: trailing whitespace (the newline an editor or `echo` adds) is
    /// dropped; what remains must be non-empty and printable ASCII without spaces, since it
    /// travels in a header.
    pub fn read(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        AdminToken::new(text.trim_end()).map_err(|m| format!("token file {}: {m}", path.display()))
    }

    pub fn new(token: &str) -> Result<AdminToken, String> {
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(AdminToken(token.to_owned()))
    }

    /// The `Authorization` value that carries this token, for our own client
    /// (`balancer check --diff` asking the running balancer).
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `Authorization` header value carries this token (`Bearer`, any case).
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some((scheme, rest)) = split_scheme(value) else {
            return false;
        };
        scheme.eq_ignore_ascii_case(b"bearer") && constant_time_eq(self.0.as_bytes(), rest)
    }
}

fn split_scheme(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = v.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = v.split_at(sp);
    let start = rest.iter().position(|&b| b != b' ')?;
    let token = &rest[start..];
    let end = token
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    Some((scheme, &token[..end]))
}

/// Compares every byte of `given` whatever the first difference, so the time taken says
/// nothing about how much of a guess was right (only its length, which the guesser knows).
fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    if secret.is_empty() {
        return false;
    }
    let mut diff = u8::from(secret.len() != given.len());
    for (i, &g) in given.iter().enumerate() {
        diff |= g ^ secret[i % secret.len()];
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_matching() {
        let t = AdminToken::new("s3cret").unwrap();
        assert!(t.admits(Some(b"Bearer s3cret")));
        assert!(t.admits(Some(b"bearer  s3cret ")));
        assert!(!t.admits(None));
        assert!(!t.admits(Some(b"Bearer s3cre")));
        assert!(!t.admits(Some(b"Bearer s3cret2")));
        assert!(!t.admits(Some(b"Bearer s3creT")));
        assert!(!t.admits(Some(b"Basic s3cret")));
        assert!(!t.admits(Some(b"Bearer")));
        assert!(!t.admits(Some(b"Bearer ")));
        assert!(!t.admits(Some(b"s3cret")));
        assert_eq!(format!("{t:?}"), "AdminToken(..)");
    }

    #[test]
    fn token_text() {
        assert!(AdminToken::new("").is_err());
        assert!(AdminToken::new("a b").is_err());
        assert!(AdminToken::new("abc\u{e9}").is_err());
        assert!(AdminToken::new("abc-._~+/=").is_ok());
    }
}
