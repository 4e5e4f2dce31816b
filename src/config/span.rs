//! Where in the file an error is: byte spans from `toml::Spanned` and from the TOML parser
//! become `file:line:col` and a dotted key, and [`ConfigError`] carries them to the operator.
//!
//! Used by validation (every semantic error) and by `Config::parse` (syntax and type errors);
//! nothing here knows which keys exist.

use std::fmt;
use std::ops::Range;

/// A rejected configuration. Displayed as `file:line:col: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the error can be tied to a place in the file.
    pub line: Option<(usize, usize)>,
    /// The dotted key the error is about (`pools.api.backends[1].weight`), when known.
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.line {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in one config, in file order (never empty), and the warnings found
/// alongside. Displayed as the errors, one per line, so the first line is exactly what the
/// first [`ConfigError`] alone displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
    /// Shown with the errors (`balancer check`), never instead of them.
    pub warnings: Vec<ConfigError>,
}

impl ConfigErrors {
    /// The first error, for callers that report one.
    pub fn into_first(self) -> ConfigError {
        self.errors
            .into_iter()
            .next()
            .unwrap_or_else(|| ConfigError {
                file: String::new(),
                line: None,
                key: None,
                msg: "invalid configuration".to_owned(),
            })
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The text being parsed and the name to report it under.
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub text: &'a str,
    pub file: &'a str,
}

/// A key found in the text before a value, for parser errors that only carry the value's span.
struct ValueKey {
    name: String,
    /// Inside an inline table (`{ address = "...", weight = "x" }`): not a key of the table.
    inline: bool,
}

impl Source<'_> {
    /// Columns count characters, not bytes, because that is what an editor shows.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before
            .get(line_start..)
            .map(|l| l.chars().count())
            .unwrap_or(0)
            + 1;
        (line, col)
    }

    pub fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line_col(span.start)),
            key: Some(key.into()),
            msg: msg.into(),
        }
    }

    /// For what is missing from the file and so has no place in it.
    pub fn err_nowhere(&self, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: None,
            key: Some(key.into()),
            msg: msg.into(),
        }
    }

    /// A syntax or type error from the TOML parser. Its span points at the offending key or
    /// value; we name the enclosing `[table]` so "unknown field `wieght`" says where.
    pub fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let mut msg = e.message().trim().to_owned();
        let (line, key) = match e.span() {
            Some(span) => {
                let mut key = self.enclosing_table(span.start);
                // A type error points at the value: name the key written before its `=`.
                if let Some(k) = self.key_before_value(span.start) {
                    if k.inline {
                        msg = format!("`{}`: {msg}", k.name);
                    } else {
                        key = Some(match key {
                            Some(t) => format!("{t}.{}", k.name),
                            None => k.name,
                        });
                    }
                }
                (Some(self.line_col(span.start)), key)
            }
            None => (None, None),
        };
        ConfigError {
            file: self.file.to_owned(),
            line,
            key,
            msg,
        }
    }

    fn enclosing_table(&self, offset: usize) -> Option<String> {
        let before = self.text.get(..offset.min(self.text.len()))?;
        before.lines().rev().find_map(|l| {
            let l = l.trim();
            if l.starts_with('[') {
                // `[pools.api.health_check]   # comment` -> `pools.api.health_check`
                let inner = l.trim_start_matches('[');
                let end = inner.find(']').unwrap_or(inner.len());
                inner.get(..end).map(|s| s.trim().to_owned())
            } else {
                None
            }
        })
    }

    /// The key of `key = <offset>` when `offset` is the start of a value on that line.
    fn key_before_value(&self, offset: usize) -> Option<ValueKey> {
        let before = self.text.get(..offset.min(self.text.len()))?;
        let line = before.get(before.rfind('\n').map_or(0, |i| i + 1)..)?;
        let lhs = line.trim_end().strip_suffix('=')?.trim_end();
        let start = lhs
            .char_indices()
            .rev()
            .find(|&(_, c)| c == '{' || c == ',' || c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
        let name = lhs.get(start..)?;
        if name.is_empty() || name.starts_with('[') || name.starts_with('#') {
            return None;
        }
        Some(ValueKey {
            name: name.to_owned(),
            inline: lhs.get(..start).is_some_and(|s| s.contains('{')),
        })
    }
}
