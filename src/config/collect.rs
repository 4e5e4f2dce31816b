//! Text -> raw structs, reporting every shape error at once, in the operator's words.
//!
//! serde stops at the first error, and its messages speak Rust ("invalid type: map, expected a
//! sequence", "i64"). So the text is parsed into a spanned TOML tree first, and deserialised
//! from that tree again and again: each failure is located in the tree by its span, reported
//! with the dotted key and a plain message, and the offending key or value is taken out (or, for
//! `[listeners]` written for `[[listeners]]`, repaired) before the next try. The raw structs stay
//! the one description of which keys exist, so a key added there needs nothing here.

use std::ops::Range;

use serde::Deserialize;
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::raw::RawConfig;
use super::span::{ConfigError, Source};

/// More mistakes than this in one file are reported up to here; the rest wait for the next run.
const MAX_ERRORS: usize = 100;

/// Keys whose values are durations: a bare number there gets the hint to add a unit.
const DURATION_KEYS: &[&str] = &[
    "shutdown_grace",
    "header_timeout",
    "idle_timeout",
    "interval",
    "timeout",
    "open_duration",
    "connect",
    "response",
    "idle",
    "ewma_decay",
    "slow_start",
    "refresh",
    "stale_if_error",
];

/// The range of an integer key, for the message when it is not an integer at all; validation
/// checks the same bounds (the constants in `mod.rs`) once it is one.
fn integer_range(leaf: &str) -> Option<(u64, u64)> {
    use super::*;
    Some(match leaf {
        "weight" => (0, u64::from(MAX_WEIGHT)),
        "max_connections" => (1, MAX_CONNECTIONS),
        "healthy_threshold" | "unhealthy_threshold" | "half_open_requests" => {
            (1, u64::from(MAX_THRESHOLD))
        }
        "consecutive_failures" => (0, u64::from(MAX_THRESHOLD)),
        "attempts" => (1, u64::from(MAX_ATTEMPTS)),
        "max_ejected_percent" => (0, 100),
        _ => return None,
    })
}

/// Keys that are arrays of tables: `[listeners]` for `[[listeners]]` is a classic slip.
const TABLE_ARRAYS: &[&str] = &["listeners", "routes", "certificates"];

/// What came out of the text: the raw config when the shape allowed building one, every error
/// found, and the values taken out of the tree (validation does not report them, or the
/// table they were in, again).
pub(super) struct Collected {
    pub raw: Option<RawConfig>,
    pub errors: Vec<ConfigError>,
    pub removed: Vec<String>,
}

enum Seg {
    Key(String),
    Index(usize),
}

fn dotted(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// Where a span from serde is in the tree: the path to the entry, and whether the span is the
/// entry's key (an unknown key) or its value (a wrong type, a missing key inside it).
struct Hit {
    path: Vec<Seg>,
    on_key: bool,
}

fn find_in_table(t: &DeTable, span: &Range<usize>, path: &mut Vec<Seg>) -> Option<Hit> {
    for (k, v) in t.iter() {
        path.push(Seg::Key(k.get_ref().to_string()));
        if k.span() == *span {
            return Some(Hit {
                path: std::mem::take(path),
                on_key: true,
            });
        }
        if let Some(h) = find_in_value(v, span, path) {
            return Some(h);
        }
        path.pop();
    }
    None
}

fn find_in_value(v: &Spanned<DeValue>, span: &Range<usize>, path: &mut Vec<Seg>) -> Option<Hit> {
    // Children first: an inline table's span can start where its first key does.
    let inner = match v.get_ref() {
        DeValue::Table(t) => find_in_table(t, span, path),
        DeValue::Array(a) => a.iter().enumerate().find_map(|(i, e)| {
            path.push(Seg::Index(i));
            let h = find_in_value(e, span, path);
            if h.is_none() {
                path.pop();
            }
            h
        }),
        _ => None,
    };
    if inner.is_some() {
        return inner;
    }
    (v.span() == *span).then(|| Hit {
        path: std::mem::take(path),
        on_key: false,
    })
}

fn value_at<'a, 'i>(root: &'a DeTable<'i>, path: &[Seg]) -> Option<&'a Spanned<DeValue<'i>>> {
    let (first, rest) = path.split_first()?;
    let Seg::Key(k) = first else { return None };
    let mut v = root.get(k.as_str())?;
    for seg in rest {
        v = match (seg, v.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get(k.as_str())?,
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// The table or array holding the last segment of `path`.
enum Parent<'a, 'i> {
    Table(&'a mut DeTable<'i>),
    Array(&'a mut DeArray<'i>),
}

fn parent_of<'a, 'i>(root: &'a mut DeTable<'i>, path: &[Seg]) -> Option<Parent<'a, 'i>> {
    let (_, up) = path.split_last()?;
    let mut cur = Parent::Table(root);
    for seg in up {
        let next = match (cur, seg) {
            (Parent::Table(t), Seg::Key(k)) => t.get_mut(k.as_str())?,
            (Parent::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
        cur = match next.get_mut() {
            DeValue::Table(t) => Parent::Table(t),
            DeValue::Array(a) => Parent::Array(a),
            _ => return None,
        };
    }
    Some(cur)
}

/// Takes the entry at `path` out of the tree; `false` when it is not there.
fn remove(root: &mut DeTable, path: &[Seg]) -> bool {
    match (parent_of(root, path), path.last()) {
        (Some(Parent::Table(t)), Some(Seg::Key(k))) => t.remove(k.as_str()).is_some(),
        (Some(Parent::Array(a)), Some(Seg::Index(i))) if *i < a.len() => {
            let kept: DeArray = std::mem::replace(a, DeArray::new())
                .into_iter()
                .enumerate()
                .filter(|(j, _)| j != i)
                .map(|(_, v)| v)
                .collect();
            *a = kept;
            true
        }
        _ => false,
    }
}

/// `[listeners]` -> a list holding that one table, so its contents are still validated.
fn wrap_in_array(root: &mut DeTable, path: &[Seg]) -> bool {
    let (Some(Parent::Table(t)), Some(Seg::Key(k))) = (parent_of(root, path), path.last()) else {
        return false;
    };
    let Some(v) = t.get_mut(k.as_str()) else {
        return false;
    };
    let span = v.span();
    let table = std::mem::replace(v.get_mut(), DeValue::Array(DeArray::new()));
    let mut arr = DeArray::new();
    arr.push(Spanned::new(span.clone(), table));
    *v = Spanned::new(span, DeValue::Array(arr));
    true
}

/// A TOML value as an operator would name it.
fn describe(v: &DeValue) -> String {
    match v {
        DeValue::String(s) => format!("a string ({:?})", s.as_ref()),
        DeValue::Integer(i) => format!("a number ({i})"),
        DeValue::Float(f) => format!("a number with a fraction ({f})"),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("a date ({d})"),
        DeValue::Array(_) => "a list".to_owned(),
        DeValue::Table(_) => "a table".to_owned(),
    }
}

/// serde's "expected ..." -> what the key takes, in TOML words; `None` when unrecognised.
fn wanted(expected: &str, leaf: &str) -> Option<String> {
    let e = expected.trim();
    Some(match e {
        "a boolean" => "must be a boolean (true or false)".to_owned(),
        "a string" | "a borrowed string" if DURATION_KEYS.contains(&leaf) => {
            "must be a string with a unit, such as \"10s\" or \"250ms\"".to_owned()
        }
        "a string" | "a borrowed string" => "must be a string (in quotes)".to_owned(),
        "a sequence" => "must be a list, such as [ ... ]".to_owned(),
        _ if e.starts_with("struct ") || e == "a map" => "must be a table".to_owned(),
        _ if [
            "i8", "i16", "i32", "i64", "i128", "u8", "u16", "u32", "u64", "u128", "usize",
        ]
        .contains(&e) =>
        {
            match integer_range(leaf) {
                Some((lo, hi)) => format!("must be an integer from {lo} to {hi}"),
                None => "must be an integer".to_owned(),
            }
        }
        _ if e.starts_with("f32") || e.starts_with("f64") => "must be a number".to_owned(),
        // Our own visitors already say it in TOML words ("an address string or a table ...").
        _ if !e.contains("struct") && !e.contains("map") && !e.contains("sequence") => {
            format!("must be {e}")
        }
        _ => return None,
    })
}

/// Backquoted names in serde's "expected one of `a`, `b`" after the first (the unknown key).
fn valid_keys(msg: &str) -> Vec<&str> {
    msg.split('`').skip(3).step_by(2).collect()
}

/// Levenshtein distance, for "did you mean". Keys are short, so the quadratic table is fine.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid key an unknown one was most likely meant to be: a small edit away, or the same
/// word cut short or run on (`max_body` for `max_body_bytes`).
pub(super) fn closest<'a>(unknown: &str, valid: &[&'a str]) -> Option<&'a str> {
    let u = unknown.to_ascii_lowercase();
    valid
        .iter()
        .map(|v| (distance(&u, v), *v))
        .filter(|(d, v)| {
            *d <= (v.chars().count() / 3).max(1)
                || (u.len() >= 3 && (v.starts_with(u.as_str()) || u.starts_with(v)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

impl Source<'_> {
    pub(super) fn collect(&self) -> Collected {
        let mut out = Collected {
            raw: None,
            errors: Vec::new(),
            removed: Vec::new(),
        };
        let (root, syntax) = DeTable::parse_recoverable(self.text);
        if !syntax.is_empty() {
            // The tree of a broken file is a guess: report only what the parser is sure of.
            out.errors = syntax.iter().map(|e| self.toml_error(e)).collect();
            return out;
        }
        let span = root.span();
        let mut root = root.into_inner();
        // Paths given a blank placeholder: a second error there removes the entry instead.
        let mut patched = std::collections::HashSet::new();
        while out.errors.len() < MAX_ERRORS {
            let de = toml::de::Deserializer::from(Spanned::new(span.clone(), root.clone()));
            let e = match RawConfig::deserialize(de) {
                Ok(raw) => {
                    out.raw = Some(raw);
                    return out;
                }
                Err(e) => e,
            };
            let hit = e
                .span()
                .and_then(|s| find_in_table(&root, &s, &mut Vec::new()));
            let Some(hit) = hit else {
                // Nowhere to point and nothing to take out: report it as the parser said.
                out.errors.push(self.toml_error(&e));
                return out;
            };
            let (err, fix) = self.explain(&e, &hit, &root);
            // A required key whose bad value was blanked is reported once, not as missing too.
            let missing_after_removal = e
                .message()
                .strip_prefix("missing field `")
                .and_then(|f| f.split('`').next())
                .is_some_and(|f| out.removed.contains(&format!("{}.{f}", dotted(&hit.path))));
            if !missing_after_removal {
                out.errors.push(err);
            }
            let path = hit.path;
            let done = match fix {
                Fix::Wrap => wrap_in_array(&mut root, &path),
                Fix::Unwrap(depth) => {
                    let at = &path[..depth];
                    unwrap_array(&mut root, at) || {
                        out.removed.push(dotted(at));
                        remove(&mut root, at)
                    }
                }
                Fix::Remove => {
                    // An unknown key was never read, so taking it out changes nothing else; a
                    // bad value leaves its key missing, which validation must not report again.
                    if !hit.on_key {
                        out.removed.push(dotted(&path));
                    }
                    remove(&mut root, &path)
                }
                // A blank string keeps a required key present and list indices unchanged, so
                // later errors name the element the operator sees; validation skips it.
                Fix::Blank if patched.insert(dotted(&path)) => {
                    out.removed.push(dotted(&path));
                    set_blank(&mut root, &path, None)
                }
                Fix::AddBlank(field) if patched.insert(format!("{}.{field}", dotted(&path))) => {
                    out.removed.push(format!("{}.{field}", dotted(&path)));
                    set_blank(&mut root, &path, Some(&field))
                }
                Fix::Blank | Fix::AddBlank(_) => {
                    out.removed.push(dotted(&path));
                    remove(&mut root, &path)
                }
            };
            if !done {
                return out;
            }
        }
        out
    }

    /// The operator's message for serde's error `e` at `hit`, and how to take the mistake out
    /// of the tree before the next try.
    fn explain(&self, e: &toml::de::Error, hit: &Hit, root: &DeTable) -> (ConfigError, Fix) {
        let msg = e.message().trim();
        let span = e.span().unwrap_or(0..0);
        let key = dotted(&hit.path);
        let leaf = match hit.path.last() {
            Some(Seg::Key(k)) => k.as_str(),
            _ => "",
        };
        if hit.on_key {
            // The key is unknown in its table: name the table, the key, and the likely fix.
            let table = dotted(&hit.path[..hit.path.len() - 1]);
            let valid = valid_keys(msg);
            let m = match closest(leaf, &valid) {
                Some(c) => format!("unknown key `{leaf}` (did you mean `{c}`?)"),
                None if valid.is_empty() => format!("unknown key `{leaf}`"),
                None => format!(
                    "unknown key `{leaf}`; valid keys here: {}",
                    valid.join(", ")
                ),
            };
            let key = if table.is_empty() {
                leaf.to_owned()
            } else {
                table
            };
            return (self.err(span, key, m), Fix::Remove);
        }
        // `[[limits]]` for `[limits]`: serde reads a list into a struct field by field, with
        // errors that make no sense to the operator; say what was meant instead.
        for depth in 1..=hit.path.len() {
            let at = &hit.path[..depth];
            let Some(Seg::Key(name)) = at.last() else {
                continue;
            };
            if TABLE_ARRAYS.contains(&name.as_str()) {
                continue;
            }
            let Some(v) = value_at(root, at) else {
                continue;
            };
            let DeValue::Array(a) = v.get_ref() else {
                continue;
            };
            let written_as_header = self
                .text
                .get(v.span().start..)
                .is_some_and(|t| t.starts_with("[["));
            if !a.is_empty()
                && written_as_header
                && a.iter().all(|x| matches!(x.get_ref(), DeValue::Table(_)))
            {
                let k = dotted(at);
                let m = format!("`[[{k}]]` must be written `[{k}]` (it is one table)");
                return (self.err(v.span(), k, m), Fix::Unwrap(depth));
            }
        }
        let value = value_at(root, &hit.path);
        if let Some(field) = msg.strip_prefix("missing field `") {
            let field = field.split('`').next().unwrap_or(field);
            return (
                self.err(span, key, format!("missing key `{field}`")),
                Fix::AddBlank(field.to_owned()),
            );
        }
        if let (Some(rest), Some(v)) = (msg.strip_prefix("invalid type: "), value) {
            let expected = rest.split_once(", expected ").map_or("", |(_, x)| x);
            if expected == "a sequence"
                && TABLE_ARRAYS.contains(&leaf)
                && matches!(v.get_ref(), DeValue::Table(_))
            {
                let m = format!("`[{key}]` must be written `[[{key}]]` (one table per entry)");
                return (self.err(span, key.clone(), m), Fix::Wrap);
            }
            let got = describe(v.get_ref());
            let m = match wanted(expected, leaf) {
                Some(w) => format!("{w}, not {got}"),
                None => format!("{got} is not allowed here"),
            };
            let fix = if expected.contains("string") {
                Fix::Blank
            } else {
                Fix::Remove
            };
            return (self.err(span, key, m), fix);
        }
        if let (Some(_), Some(v)) = (msg.strip_prefix("invalid value: "), value) {
            let m = format!("{} is out of range", describe(v.get_ref()));
            return (self.err(span, key, m), Fix::Remove);
        }
        // A message of our own visitors or a future serde wording: keep it, placed and keyed.
        (self.err(span, key, msg.to_owned()), Fix::Remove)
    }
}

/// How a mistake is taken out of the tree so that deserialising can go on.
enum Fix {
    /// Drop the entry (an unknown key, or an optional value of the wrong type).
    Remove,
    /// `[listeners]` -> `[[listeners]]`.
    Wrap,
    /// `[[limits]]` -> `[limits]`, for the prefix of the path this long.
    Unwrap(usize),
    /// Replace a value that should have been a string with `""`.
    Blank,
    /// Add a missing required key to the table, as `""`.
    AddBlank(String),
}

/// `[[limits]]` written once -> that one table; `false` when there were several.
fn unwrap_array(root: &mut DeTable, path: &[Seg]) -> bool {
    let (Some(Parent::Table(t)), Some(Seg::Key(k))) = (parent_of(root, path), path.last()) else {
        return false;
    };
    let Some(v) = t.get_mut(k.as_str()) else {
        return false;
    };
    let DeValue::Array(a) = v.get_mut() else {
        return false;
    };
    if a.len() != 1 {
        return false;
    }
    let Some(first) = std::mem::replace(a, DeArray::new()).into_iter().next() else {
        return false;
    };
    *v = first;
    true
}

/// Puts `""` at `path`, or, with `field`, under that key of the table at `path`.
fn set_blank(root: &mut DeTable, path: &[Seg], field: Option<&str>) -> bool {
    let blank = |span: Range<usize>| Spanned::new(span, DeValue::String(String::new().into()));
    if let Some(field) = field {
        let mut full: Vec<Seg> = path
            .iter()
            .map(|s| match s {
                Seg::Key(k) => Seg::Key(k.clone()),
                Seg::Index(i) => Seg::Index(*i),
            })
            .collect();
        full.push(Seg::Key(field.to_owned()));
        let Some(target) = parent_of(root, &full) else {
            return false;
        };
        let Parent::Table(t) = target else {
            return false;
        };
        // The table's own span is not at hand here; the error already pointed at it.
        t.insert(Spanned::new(0..0, field.to_owned().into()), blank(0..0));
        return true;
    }
    let slot = match (parent_of(root, path), path.last()) {
        (Some(Parent::Table(t)), Some(Seg::Key(k))) => t.get_mut(k.as_str()),
        (Some(Parent::Array(a)), Some(Seg::Index(i))) => a.get_mut(*i),
        _ => None,
    };
    match slot {
        Some(v) => {
            let span = v.span();
            *v = blank(span);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &str) -> Collected {
        Source {
            text,
            file: "t.toml",
        }
        .collect()
    }

    #[test]
    fn a_table_written_as_a_list_of_tables_is_still_checked_inside() {
        let c = collect("[[limits]]\nmax_body_bytes = true\n");
        let shown: Vec<String> = c.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "t.toml:1:1: limits: `[[limits]]` must be written `[limits]` (it is one table)",
                "t.toml:2:18: limits.max_body_bytes: must be a number of bytes or a string such as \"64KiB\", not true",
            ]
        );
        assert!(c.raw.is_some() && c.removed == ["limits.max_body_bytes"]);
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(distance("wieght", "weight"), 2);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(closest("wieght", &["address", "weight"]), Some("weight"));
        assert_eq!(
            closest("max_body", &["max_body_bytes", "max_header_bytes"]),
            Some("max_body_bytes")
        );
        assert_eq!(closest("colour", &["watch", "log"]), None);
        assert_eq!(
            closest("listener", &["listeners", "limits"]),
            Some("listeners")
        );
    }

    #[test]
    fn every_shape_error_in_one_pass() {
        let text = "colour = 1\nwatch = \"yes\"\n[listeners]\nbind = \"127.0.0.1:1\"\nprot = 2\n\
                    [pools.web]\nbackends = [{ address = \"127.0.0.1:2\", wieght = 2 }]\n\
                    [pools.web.timeouts]\nconnect = 10\n";
        let c = collect(text);
        let shown: Vec<String> = c.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(c.errors.len(), 6, "{shown:#?}");
        assert!(c.raw.is_some(), "{shown:#?}");
        let all = shown.join("\n");
        for want in [
            "t.toml:1:1: colour: unknown key `colour`",
            "t.toml:2:9: watch: must be a boolean (true or false), not a string (\"yes\")",
            "t.toml:3:1: listeners: `[listeners]` must be written `[[listeners]]`",
            "t.toml:5:1: listeners[0]: unknown key `prot`",
            "pools.web.backends[0]: unknown key `wieght` (did you mean `weight`?)",
            "t.toml:9:11: pools.web.timeouts.connect: must be a string with a unit",
        ] {
            assert!(all.contains(want), "{want:?} not in\n{all}");
        }
        assert!(
            !all.contains("i64") && !all.contains("invalid type"),
            "{all}"
        );
    }
}
