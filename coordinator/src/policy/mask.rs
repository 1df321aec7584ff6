//! In-process data masking: detectors for common sensitive values, column
//! rules and custom patterns. Pure: the PostgreSQL gateway applies a
//! [`Masker`] to every result value before it reaches the client or the
//! evidence.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Built-in detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Card numbers (13-19 digits, spaces or dashes allowed) passing Luhn.
    CreditCard,
    Email,
    /// Phone numbers: `+` and 8-15 digits, or common national formats.
    Phone,
    /// US social security numbers (`123-45-6789`).
    UsSsn,
    /// IBANs passing the mod-97 check.
    Iban,
    /// IPv4 and IPv6 addresses.
    Ip,
    /// AWS access key ids (`AKIA…`, `ASIA…`).
    AwsAccessKey,
    /// JSON Web Tokens.
    Jwt,
    /// PEM private key blocks.
    PrivateKey,
}

impl Detector {
    pub const ALL: [Detector; 9] = [
        Detector::PrivateKey,
        Detector::Jwt,
        Detector::AwsAccessKey,
        Detector::Iban,
        Detector::CreditCard,
        Detector::UsSsn,
        Detector::Email,
        Detector::Ip,
        Detector::Phone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Detector::CreditCard => "credit_card",
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::UsSsn => "us_ssn",
            Detector::Iban => "iban",
            Detector::Ip => "ip",
            Detector::AwsAccessKey => "aws_access_key",
            Detector::Jwt => "jwt",
            Detector::PrivateKey => "private_key",
        }
    }

    fn index(self) -> usize {
        Detector::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }

    /// Runs `f` with this thread's copy of the detector's regex. A `Regex`
    /// shared by threads hands its search cache out through a lock for every
    /// thread but the first; a copy per thread keeps every search lock-free.
    fn with_regex<T>(self, f: impl FnOnce(&Regex) -> T) -> T {
        thread_local! {
            static LOCAL: Vec<Regex> = compiled().clone();
        }
        LOCAL.with(|res| f(&res[self.index()]))
    }

    /// Extra validation beyond the pattern (checksums).
    fn confirms(self, m: &str) -> bool {
        match self {
            Detector::CreditCard => luhn(m),
            Detector::Iban => iban_ok(m),
            _ => true,
        }
    }
}

impl Detector {
    /// A hand-written scanner equivalent to the detector's pattern on this
    /// text: it finds the next match at or after a byte offset, as
    /// `Regex::find_at` does. The two detectors that hit most values in real
    /// results (emails, card numbers) have one for ASCII text, several times
    /// faster than a regex search on short values; other text, and the other
    /// detectors, use the regex.
    fn scanner(self, h: &Hints) -> Option<Scanner> {
        if !h.ascii {
            return None;
        }
        match self {
            Detector::Email => Some(scan::email),
            Detector::CreditCard => Some(scan::card),
            _ => None,
        }
    }
}

/// Finds the next match at or after a byte offset: (start, end).
type Scanner = fn(&[u8], usize) -> Option<(usize, usize)>;

/// Appends `cur`, with every confirmed match of `d` (found by `find`, from
/// a byte offset) replaced by the detector's marker, to `out`; false (and
/// `out` unchanged) when nothing matched.
fn replace_matches(
    d: Detector,
    cur: &str,
    mut find: impl FnMut(usize) -> Option<(usize, usize)>,
    out: &mut String,
) -> bool {
    let mut any = false;
    let mut last = 0;
    let mut at = 0;
    while let Some((start, end)) = find(at) {
        if d.confirms(&cur[start..end]) {
            if !any {
                out.reserve(cur.len());
                any = true;
            }
            out.push_str(&cur[last..start]);
            out.push('[');
            out.push_str(d.as_str());
            out.push(']');
            last = end;
        }
        at = end;
    }
    if any {
        out.push_str(&cur[last..]);
    }
    any
}

/// Hand-written equivalents of two detector patterns, for ASCII text only
/// (where `\b` and case folding are ASCII). Each follows the regex's
/// leftmost-first, greedy-with-backtracking semantics; property tests check
/// them against the regex.
mod scan {
    fn word(b: Option<&u8>) -> bool {
        b.is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
    }

    /// `\b` between bytes `i - 1` and `i`.
    fn boundary(t: &[u8], i: usize) -> bool {
        let before = i.checked_sub(1).and_then(|j| t.get(j));
        word(before) != word(t.get(i))
    }

    /// `(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b`
    pub(super) fn email(t: &[u8], at: usize) -> Option<(usize, usize)> {
        let local = |c: u8| c.is_ascii_alphanumeric() || b"._%+-".contains(&c);
        let domain = |c: u8| c.is_ascii_alphanumeric() || c == b'.' || c == b'-';
        let mut from = at;
        while let Some(off) = t.get(from..)?.iter().position(|&c| c == b'@') {
            let p = from + off;
            from = p + 1;
            // The domain: the longest run, then the last `.letters\b` in it.
            let run_end = p + 1 + t[p + 1..].iter().take_while(|&&c| domain(c)).count();
            let end = (p + 2..run_end).rev().find_map(|q| {
                if t[q] != b'.' {
                    return None;
                }
                let letters = t[q + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .count();
                let e = q + 1 + letters;
                (letters >= 2 && boundary(t, e)).then_some(e)
            });
            let Some(end) = end else { continue };
            // The local part: the leftmost start at a word boundary in the
            // run of local characters before the `@` (not before `at`).
            let mut l = p;
            while l > at && local(t[l - 1]) {
                l -= 1;
            }
            if let Some(start) = (l..p).find(|&s| boundary(t, s)) {
                return Some((start, end));
            }
        }
        None
    }

    /// `\b[0-9](?:[ -]?[0-9]){12,18}\b`
    pub(super) fn card(t: &[u8], at: usize) -> Option<(usize, usize)> {
        let digit = |i: usize| t.get(i).is_some_and(u8::is_ascii_digit);
        let mut s = at;
        while s < t.len() {
            if !(digit(s) && boundary(t, s)) {
                s += 1;
                continue;
            }
            // Greedy: up to 18 more digits, each after an optional space or
            // dash; remember where each repetition ends.
            let mut ends = [0usize; 18];
            let (mut n, mut i) = (0, s + 1);
            while n < 18 {
                if matches!(t.get(i), Some(b' ' | b'-')) && digit(i + 1) {
                    i += 2;
                } else if digit(i) {
                    i += 1;
                } else {
                    break;
                }
                ends[n] = i;
                n += 1;
            }
            // Backtrack to the longest repetition (at least 12) ending at a
            // word boundary.
            if let Some(e) = (12..=n)
                .rev()
                .map(|k| ends[k - 1])
                .find(|&e| boundary(t, e))
            {
                return Some((s, e));
            }
            s += 1;
        }
        None
    }
}

/// The detectors' patterns, in [`Detector::ALL`] order.
const PATTERNS: [&str; 9] = [
    r"(?s)-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
    r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
    r"\b(AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b",
    r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
    r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
    r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
    r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b",
    r"(?i)\b(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\b|\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{0,4}(?::[0-9a-f]{1,4})*\b|::1\b",
    r"(?:\+[0-9][0-9 ().-]{7,18}[0-9])|\b\(?[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}\b",
];

fn compiled() -> &'static Vec<Regex> {
    static RES: OnceLock<Vec<Regex>> = OnceLock::new();
    RES.get_or_init(|| {
        PATTERNS
            .iter()
            .map(|p| Regex::new(p).expect("built-in detector pattern"))
            .collect()
    })
}

/// What one pass over a value's bytes tells about it: enough to rule out
/// every detector that cannot match, so that most values cost no regex.
#[derive(Debug, Default, Clone, Copy)]
struct Hints {
    len: usize,
    digits: usize,
    upper: usize,
    dots: usize,
    colons: usize,
    at: bool,
    dash: bool,
    plus: bool,
    ascii: bool,
}

/// Per byte value, one count in each byte lane of a `u64`: lane 0 ASCII
/// digits, 1 ASCII upper case, 2 `.`, 3 `:`, 4 `@`, 5 `-`, 6 `+`, 7 bytes
/// outside ASCII.
const CLASS: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if !c.is_ascii() {
            1 << 56
        } else if c.is_ascii_digit() {
            1
        } else if c.is_ascii_uppercase() {
            1 << 8
        } else {
            match c {
                b'.' => 1 << 16,
                b':' => 1 << 24,
                b'@' => 1 << 32,
                b'-' => 1 << 40,
                b'+' => 1 << 48,
                _ => 0,
            }
        };
        b += 1;
    }
    t
};

impl Hints {
    /// One pass with a table lookup and one add per byte: the counts sit
    /// in byte lanes of a `u64`, summed over runs of at most 255 bytes so
    /// that no lane overflows into the next.
    #[inline]
    fn of(text: &(impl AsRef<[u8]> + ?Sized)) -> Self {
        let b = text.as_ref();
        let mut lanes = [0usize; 8];
        for run in b.chunks(255) {
            let sum = run.iter().fold(0u64, |n, &c| n + CLASS[usize::from(c)]);
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane += ((sum >> (8 * i)) & 0xff) as usize;
            }
        }
        Hints {
            len: b.len(),
            digits: lanes[0],
            upper: lanes[1],
            dots: lanes[2],
            colons: lanes[3],
            at: lanes[4] > 0,
            dash: lanes[5] > 0,
            plus: lanes[6] > 0,
            ascii: lanes[7] == 0,
        }
    }
}

impl Detector {
    /// Whether the detector's pattern could match a value with these hints
    /// (never false when it could: each test follows from the pattern).
    #[inline]
    fn may_match(self, h: &Hints, text: &[u8]) -> bool {
        let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
        match self {
            Detector::PrivateKey => h.dash && has(b"-----BEGIN "),
            Detector::Jwt => h.dots >= 2 && has(b"eyJ"),
            Detector::AwsAccessKey => {
                h.len >= 20
                    && h.upper >= 4
                    && [b"AKIA", b"ASIA", b"AIDA", b"AROA"].iter().any(|p| has(*p))
            }
            Detector::Iban => h.len >= 12 && h.upper >= 2 && h.digits >= 2,
            Detector::CreditCard => h.digits >= 13,
            Detector::UsSsn => h.digits >= 9 && h.dash,
            Detector::Email => h.at && h.dots >= 1,
            Detector::Ip => (h.dots >= 3 && h.digits >= 4) || h.colons >= 2,
            Detector::Phone => h.digits >= 10 || (h.plus && h.digits >= 2),
        }
    }
}

fn luhn(s: &str) -> bool {
    let (mut n, mut sum) = (0u32, 0u32);
    for d in s
        .bytes()
        .rev()
        .filter(u8::is_ascii_digit)
        .map(|b| u32::from(b - b'0'))
    {
        sum += if n % 2 == 1 {
            let x = d * 2;
            if x > 9 {
                x - 9
            } else {
                x
            }
        } else {
            d
        };
        n += 1;
    }
    (13..=19).contains(&n) && sum.is_multiple_of(10)
}

fn iban_ok(s: &str) -> bool {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        for d in v.to_string().chars() {
            rem = (rem * 10 + d.to_digit(10).unwrap_or(0)) % 97;
        }
    }
    rem == 1
}

/// A masking profile as written in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingDoc {
    pub name: String,
    /// Built-in detectors; values matching them are replaced in place.
    #[serde(default)]
    pub detectors: Vec<Detector>,
    /// Columns whose values are replaced entirely: a column-name pattern
    /// (`*ssn*`, matching any result column of that name or alias), or a
    /// table column as `table.column` or `schema.table.column` (matched
    /// through RowDescription's table OIDs, so aliases do not escape it).
    /// `*` wildcards, case-insensitive.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Custom regular expressions; matches are replaced.
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// The masking in force for one session: the union of its profiles.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    detectors: Vec<Detector>,
    columns: Vec<String>,
    /// `schema.table.column` rules (`*` for the schema of `table.column`).
    qualified: Vec<[String; 3]>,
    patterns: Vec<Regex>,
    /// View definitions already judged by [`Masker::definition_reads_masked`]
    /// (shared by the session's clones; forgotten all at once when full).
    definitions: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
}

/// View definitions remembered per session.
const DEFINITIONS_KEPT: usize = 256;

/// What replaces a whole masked column value.
pub const MASKED: &str = "****";

impl Masker {
    pub fn new(profiles: &[&MaskingDoc]) -> Result<Self, String> {
        let mut m = Masker::default();
        for p in profiles {
            for d in &p.detectors {
                if !m.detectors.contains(d) {
                    m.detectors.push(*d);
                }
            }
            for c in &p.columns {
                let c = c.to_lowercase();
                let parts: Vec<&str> = c.split('.').collect();
                match parts[..] {
                    [_] => m.columns.push(c.clone()),
                    [t, col] => m.qualified.push(["*".into(), t.into(), col.into()]),
                    [s, t, col] => m.qualified.push([s.into(), t.into(), col.into()]),
                    _ => {
                        return Err(format!(
                            "masking {:?}: bad column rule {c:?} (use column, table.column or schema.table.column)",
                            p.name
                        ))
                    }
                }
                if parts.iter().any(|x| x.is_empty()) {
                    return Err(format!(
                        "masking {:?}: bad column rule {c:?} (an empty part)",
                        p.name
                    ));
                }
            }
            for pat in &p.patterns {
                m.patterns.push(
                    Regex::new(pat)
                        .map_err(|e| format!("masking {:?}: bad pattern {pat:?}: {e}", p.name))?,
                );
            }
        }
        // Longest, most specific detectors first.
        m.detectors
            .sort_by_key(|d| Detector::ALL.iter().position(|x| x == d));
        Ok(m)
    }

    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
            && self.columns.is_empty()
            && self.qualified.is_empty()
            && self.patterns.is_empty()
    }

    /// Whether detectors or custom patterns are configured ([`Masker::mask_text`]
    /// can change something).
    pub fn masks_text(&self) -> bool {
        !self.detectors.is_empty() || !self.patterns.is_empty()
    }

    /// Whether custom patterns are configured (they may match any value).
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }

    pub fn has_column_rules(&self) -> bool {
        !self.columns.is_empty() || !self.qualified.is_empty()
    }

    /// Whether some rule names a table column (results need their tables'
    /// names resolved).
    pub fn has_table_rules(&self) -> bool {
        !self.qualified.is_empty()
    }

    /// Whether the table column `schema.table.column` is masked entirely.
    pub fn masks_table_column(&self, schema: &str, table: &str, column: &str) -> bool {
        let (schema, table, column) = (
            schema.to_lowercase(),
            table.to_lowercase(),
            column.to_lowercase(),
        );
        self.qualified.iter().any(|[s, t, c]| {
            crate::policy::wildcard(s, &schema)
                && crate::policy::wildcard(t, &table)
                && crate::policy::wildcard(c, &column)
        })
    }

    /// Whether a column (by name) is masked entirely.
    pub fn masks_column(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.columns
            .iter()
            .any(|p| crate::policy::wildcard(p, &name))
    }

    /// Whether a statement that reads `r` may compute values from masked
    /// columns: it names a masked column anywhere, reads whole rows of a
    /// table with masked columns (any table, under column-name rules), or
    /// its rows come from somewhere its text does not show. Its
    /// computed result columns (no table column behind them) are then masked
    /// whole, since RowDescription cannot say where they came from.
    pub fn reads_masked(&self, r: &crate::policy::sql::Reads) -> bool {
        use crate::policy::wildcard;
        if !self.has_column_rules() {
            return false;
        }
        if r.opaque {
            return true;
        }
        let named = r.columns.iter().any(|c| {
            self.columns.iter().any(|p| wildcard(p, c))
                || self.qualified.iter().any(|[_, _, q]| wildcard(q, c))
        });
        // A `*` or `TABLE t` also reads every column, under whatever names a
        // set operation or column list gives them.
        named
            || ((r.whole_rows || r.star)
                && (!self.columns.is_empty()
                    || r.tables
                        .iter()
                        .any(|t| self.qualified.iter().any(|[_, q, _]| wildcard(q, t)))))
    }

    /// Whether a statement that stores or reshapes `w` would put masked
    /// values where no rule covers them: the values it stores read masked
    /// columns (or whole rows, or `*`, of a table with masked columns), or it
    /// alters a table with masked columns or renames a masked column.
    pub fn writes_masked(&self, w: &crate::policy::sql::Writes) -> bool {
        use crate::policy::wildcard;
        if !self.has_column_rules() {
            return false;
        }
        let protected = |t: &String| self.qualified.iter().any(|[_, q, _]| wildcard(q, t));
        self.reads_masked(&w.values)
            || (w.values.star
                && (!self.columns.is_empty() || w.values.tables.iter().any(protected)))
            || w.altered.iter().any(protected)
    }

    /// [`Masker::reads_masked`] for a view definition, parsed once per
    /// session (views are read again and again; their definitions rarely
    /// change).
    pub fn definition_reads_masked(&self, def: &str) -> bool {
        let mut memo = self.definitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&known) = memo.get(def) {
            return known;
        }
        let masked = self.reads_masked(&crate::policy::sql::reads(def));
        if memo.len() >= DEFINITIONS_KEPT {
            memo.clear();
        }
        memo.insert(def.to_owned(), masked);
        masked
    }

    /// Masks sensitive parts of `text`; `None` when nothing matched.
    pub fn mask_text(&self, text: &str) -> Option<String> {
        let mut out = String::new();
        self.mask_with(text, Hints::of(text), &mut out)
            .then_some(out)
    }

    /// A statement's text masked, for approvers and the evidence; `None`
    /// when a match would take away a character that decides how SQL reads
    /// (a line end, quote, `$`, backslash, `;` or comment delimiter): the
    /// masked text could then show code as a comment or a string, or hide
    /// it. (The markers hold none of these, so equal counts mean no match
    /// took one.)
    pub fn mask_statement(&self, sql: &str) -> Option<String> {
        const KEPT: [&str; 9] = ["\n", "\r", "'", "\"", "$", "\\", ";", "/*", "*/"];
        // Token by token first (PostgreSQL's scanner): a literal, comment
        // or name is masked inside itself; then what spans tokens.
        let by_tokens = crate::policy::sql::token_spans(sql).and_then(|spans| {
            let mut out = String::with_capacity(sql.len());
            let mut at = 0;
            let mut any = false;
            for (start, end, valued) in spans {
                let (Some(gap), Some(tok)) = (sql.get(at..start), sql.get(start..end)) else {
                    return None;
                };
                out.push_str(gap);
                match valued.then(|| self.mask_text(tok)).flatten() {
                    Some(m) => {
                        any = true;
                        out.push_str(&m);
                    }
                    None => out.push_str(tok),
                }
                at = end;
            }
            out.push_str(sql.get(at..)?);
            Some((out, any))
        });
        let (text, any) = by_tokens.unwrap_or_else(|| (sql.to_owned(), false));
        let masked = match self.mask_text(&text) {
            Some(m) => m,
            None if any => text,
            None => return Some(sql.to_owned()),
        };
        KEPT.iter()
            .all(|k| masked.matches(k).count() == sql.matches(k).count())
            .then_some(masked)
    }

    /// Appends a value given as bytes, masked, to `out` (UTF-8; other bytes
    /// are read as U+FFFD and the lossy text is what is masked); false, and
    /// `out` unchanged, when nothing matched. A value no detector can match
    /// costs one pass over its bytes and no UTF-8 validation; a masked one
    /// allocates only when `out` must grow.
    pub fn mask_bytes_into(&self, v: &[u8], out: &mut String) -> bool {
        let hints = Hints::of(v);
        if self.patterns.is_empty() && !self.detectors.iter().any(|d| d.may_match(&hints, v)) {
            return false;
        }
        match std::str::from_utf8(v) {
            Ok(text) => self.mask_with(text, hints, out),
            Err(_) => {
                let text = String::from_utf8_lossy(v);
                self.mask_with(&text, Hints::of(text.as_ref()), out)
            }
        }
    }

    /// Appends `text` masked to `out`, given its hints; false (and `out`
    /// unchanged) when nothing matched.
    fn mask_with(&self, text: &str, mut hints: Hints, out: &mut String) -> bool {
        // The hints rule out the detectors that cannot match; most values
        // then cost no regex and no allocation. Once a detector matched,
        // `out[base..]` holds the text so far.
        let base = out.len();
        let mut masked = false;
        let mut next = String::new();
        for d in &self.detectors {
            let replaced = if masked {
                let cur = &out[base..];
                if !d.may_match(&hints, cur.as_bytes()) {
                    continue;
                }
                next.clear();
                let hit = replace_once(*d, cur, &hints, &mut next);
                if hit {
                    out.truncate(base);
                    out.push_str(&next);
                }
                hit
            } else {
                if !d.may_match(&hints, text.as_bytes()) {
                    continue;
                }
                replace_once(*d, text, &hints, out)
            };
            if replaced {
                masked = true;
                // What the next detectors may match is that of the new text.
                hints = Hints::of(&out[base..]);
            }
        }
        for re in &self.patterns {
            let cur = if masked { &out[base..] } else { text };
            if re.is_match(cur) {
                let r = re.replace_all(cur, "[masked]").into_owned();
                out.truncate(base);
                out.push_str(&r);
                masked = true;
            }
        }
        masked
    }
}

/// [`replace_matches`] with the detector's scanner for ASCII text, or its
/// regex.
fn replace_once(d: Detector, cur: &str, hints: &Hints, out: &mut String) -> bool {
    if let Some(scan) = d.scanner(hints) {
        replace_matches(d, cur, |at| scan(cur.as_bytes(), at), out)
    } else {
        d.with_regex(|re| {
            replace_matches(
                d,
                cur,
                |at| re.find_at(cur, at).map(|m| (m.start(), m.end())),
                out,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Masker {
        let doc = MaskingDoc {
            name: "pii".into(),
            detectors: Detector::ALL.to_vec(),
            columns: vec!["*ssn*".into(), "secret".into()],
            patterns: vec![r"\bACCT-[0-9]{6}\b".into()],
        };
        Masker::new(&[&doc]).unwrap()
    }

    #[test]
    fn detectors_find_what_they_should_and_only_that() {
        let m = all();
        let cases = [
            ("card 4111 1111 1111 1111 ok", "card [credit_card] ok"),
            ("4111-1111-1111-1111", "[credit_card]"),
            ("mail alice@example.com now", "mail [email] now"),
            ("ssn 123-45-6789", "ssn [us_ssn]"),
            ("iban DE89 3704 0044 0532 0130 00", "iban [iban]"),
            ("GB82WEST12345698765432", "[iban]"),
            ("from 10.1.2.3", "from [ip]"),
            ("key AKIAIOSFODNN7EXAMPLE", "key [aws_access_key]"),
            ("call +1 415 555 0100", "call [phone]"),
            ("acct ACCT-123456", "acct [masked]"),
        ];
        for (input, want) in cases {
            assert_eq!(m.mask_text(input).as_deref(), Some(want), "{input}");
        }
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        assert_eq!(m.mask_text(jwt).as_deref(), Some("[jwt]"));
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----";
        assert_eq!(m.mask_text(pem).as_deref(), Some("[private_key]"));
        // Not Luhn-valid, not an IBAN checksum: left alone.
        for clean in [
            "4111 1111 1111 1112",
            "DE00 3704 0044 0532 0130 00",
            "order 12345",
            "hello",
        ] {
            assert_eq!(m.mask_text(clean), None, "{clean}");
        }
    }

    proptest::proptest! {
        /// The hand-written scanners find exactly the regex's matches, in
        /// the same order, over text made of the characters that matter.
        #[test]
        fn scanners_match_the_regex(
            text in "[0-9a-zA-Z._%+@ _-]{0,48}|([a-z0-9._+-]{0,6}@[a-z0-9.-]{0,10}\\.[a-zA-Z0-9_.-]{0,5} ?){1,3}|([0-9]{1,5}[ -]?){1,6}[0-9a-z_ -]{0,3}",
            at in 0usize..8,
        ) {
            for d in [Detector::Email, Detector::CreditCard] {
                let at = at.min(text.len());
                let (mut a, mut b) = (at, at);
                loop {
                    let want = d.with_regex(|re| re.find_at(&text, a).map(|m| (m.start(), m.end())));
                    let scan = d.scanner(&Hints::of(&text)).expect("ASCII text has a scanner");
                    let got = scan(text.as_bytes(), b);
                    proptest::prop_assert_eq!(got, want, "{:?} on {:?} from {}", d, text, a);
                    match want {
                        Some((_, e)) => { a = e; b = e; }
                        None => break,
                    }
                }
            }
        }

        /// The one-pass counts equal counting each property on its own,
        /// also past the 255-byte runs the lanes are summed over.
        #[test]
        fn hints_count_what_they_say(text in "[0-9A-Za-z .:@+\u{e9}-]{0,700}") {
            let h = Hints::of(&text);
            let b = text.as_bytes();
            let n = |p: fn(&u8) -> bool| b.iter().filter(|c| p(c)).count();
            proptest::prop_assert_eq!(h.len, b.len());
            proptest::prop_assert_eq!(h.digits, n(u8::is_ascii_digit));
            proptest::prop_assert_eq!(h.upper, n(u8::is_ascii_uppercase));
            proptest::prop_assert_eq!(h.dots, n(|c| *c == b'.'));
            proptest::prop_assert_eq!(h.colons, n(|c| *c == b':'));
            proptest::prop_assert_eq!(h.at, b.contains(&b'@'));
            proptest::prop_assert_eq!(h.dash, b.contains(&b'-'));
            proptest::prop_assert_eq!(h.plus, b.contains(&b'+'));
            proptest::prop_assert_eq!(h.ascii, text.is_ascii());
        }

        /// Masking a value's bytes is masking its (lossy) text.
        #[test]
        fn bytes_mask_as_their_text(
            v in proptest::collection::vec(proptest::prop_oneof![
                proptest::sample::select(b"0123456789 .-@+:ABCxyz".to_vec()),
                proptest::sample::select(vec![0xc3u8, 0xa9, 0xff]),
            ], 0..60),
            s in "(card 4111 1111 1111 1111|bob@example.com|123-45-6789|10.1.2.3| )*"
        ) {
            let m = all();
            let mut with = s.into_bytes();
            with.extend_from_slice(&v);
            let text = String::from_utf8_lossy(&with);
            // Appended after what the buffer holds, or nothing appended.
            let mut out = String::from("kept|");
            let hit = m.mask_bytes_into(&with, &mut out);
            let want = m.mask_text(&text);
            proptest::prop_assert_eq!(hit, want.is_some());
            proptest::prop_assert_eq!(out, format!("kept|{}", want.unwrap_or_default()));
        }

        /// The byte-level prefilter never rules out a detector whose pattern
        /// matches (values built from the characters the patterns care about).
        #[test]
        fn the_prefilter_never_hides_a_match(
            text in "[0-9A-Fa-z .:@+()-]{0,40}|(AKIA|eyJ|-----BEGIN |[0-9]{3}-|\\+|[A-Z]{2}[0-9]{2} )[0-9A-Za-z .:@+()-]{0,40}"
        ) {
            let h = Hints::of(&text);
            for d in Detector::ALL {
                if d.with_regex(|re| re.is_match(&text)) {
                    proptest::prop_assert!(d.may_match(&h, text.as_bytes()), "{:?} on {:?}", d, text);
                }
            }
        }
    }

    #[test]
    fn the_prefilter_passes_every_detector_example() {
        for text in [
            "4111 1111 1111 1111",
            "123-45-6789",
            "a@b.co",
            "10.1.2.3",
            "fe80::1",
            "::1",
            "+1 415 555 0100",
            "(415) 555-0100",
            "GB82WEST12345698765432",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
            "-----BEGIN PRIVATE KEY-----",
        ] {
            let h = Hints::of(text);
            let hit: Vec<_> = Detector::ALL
                .iter()
                .filter(|d| d.with_regex(|re| re.is_match(text)))
                .collect();
            assert!(!hit.is_empty(), "{text}");
            for d in hit {
                assert!(d.may_match(&h, text.as_bytes()), "{d:?} on {text}");
            }
        }
    }

    #[test]
    fn table_columns_match_by_schema_table_and_column() {
        let doc = MaskingDoc {
            name: "t".into(),
            detectors: vec![],
            columns: vec!["customers.email".into(), "billing.*.number".into()],
            patterns: vec![],
        };
        let m = Masker::new(&[&doc]).unwrap();
        assert!(m.has_table_rules() && m.has_column_rules());
        assert!(m.masks_table_column("public", "Customers", "EMAIL"));
        assert!(m.masks_table_column("sales", "customers", "email"));
        assert!(!m.masks_table_column("public", "customers", "name"));
        assert!(m.masks_table_column("billing", "cards", "number"));
        assert!(!m.masks_table_column("public", "cards", "number"));
        // A qualified rule is not a bare column-name rule.
        assert!(!m.masks_column("email"));
        for bad in ["a.b.c.d", "a..b", ".x"] {
            let doc = MaskingDoc {
                name: "bad".into(),
                detectors: vec![],
                columns: vec![bad.into()],
                patterns: vec![],
            };
            assert!(Masker::new(&[&doc]).is_err(), "{bad}");
        }
    }

    #[test]
    fn statements_reading_masked_columns_are_recognised() {
        use crate::policy::sql::reads;
        let masker = |columns: &[&str]| {
            Masker::new(&[&MaskingDoc {
                name: "m".into(),
                detectors: vec![],
                columns: columns.iter().map(|c| c.to_string()).collect(),
                patterns: vec![],
            }])
            .unwrap()
        };
        let m = masker(&["customers.card", "*ssn*"]);
        for sql in [
            "SELECT upper(card) FROM customers",
            "SELECT name FROM customers WHERE card LIKE '4%'",
            "SELECT md5(tax_ssn) FROM people",
            "SELECT row_to_json(c) FROM customers c",
            // Whole rows of any table may hold a column named like *ssn*.
            "SELECT p FROM people p",
            "SELECT card FROM customers WHERE (",
            // Every column, renamed by a set operation.
            "SELECT 'a', 'b' UNION ALL TABLE customers",
            // Rows from where the text does not show.
            "EXECUTE p",
            "FETCH ALL FROM c",
            // Functions that run SQL text or read relations named by value.
            "SELECT query_to_xml('select card from customers', true, false, '')",
            "SELECT pg_catalog.table_to_xml('customers', true, false, '')",
            "SELECT * FROM ts_stat('select to_tsvector(card) from customers')",
            "SELECT * FROM dblink('db', 'select card from customers') AS t(c text)",
            "SELECT query_to_xml FROM LATERAL query_to_xml('select ssn from p', true, false, '')",
            "SELECT word FROM LATERAL ts_stat('select to_tsvector(card) from customers')",
        ] {
            assert!(m.reads_masked(&reads(sql)), "{sql}");
        }
        // Per result column too.
        let r = reads("SELECT name, TABLE_TO_XML('customers', true, false, '') FROM customers");
        let items: Vec<bool> = r.items.unwrap().iter().map(|i| m.reads_masked(i)).collect();
        assert_eq!(items, [false, true]);
        for sql in [
            "SELECT upper(name) FROM customers",
            "SELECT count(*) FROM customers",
            "SELECT 'card'",
        ] {
            assert!(!m.reads_masked(&reads(sql)), "{sql}");
        }
        let only_table = masker(&["customers.card"]);
        // View definitions: judged like statements, and remembered.
        for _ in 0..2 {
            assert!(m.definition_reads_masked(" SELECT card AS x FROM customers;"));
            assert!(!m.definition_reads_masked(" SELECT name FROM customers;"));
        }
        assert!(!only_table.reads_masked(&reads("SELECT p FROM people p")));
        assert!(!Masker::default().reads_masked(&reads("SELECT card FROM customers")));
    }

    #[test]
    fn statements_copying_masked_columns_elsewhere_are_recognised() {
        use crate::policy::sql::writes;
        let m = Masker::new(&[&MaskingDoc {
            name: "m".into(),
            detectors: vec![],
            columns: vec!["customers.card".into(), "*ssn*".into()],
            patterns: vec![],
        }])
        .unwrap();
        for sql in [
            "INSERT INTO c2 SELECT upper(card) FROM customers",
            "CREATE TABLE c2 AS SELECT * FROM customers",
            "SELECT * INTO c2 FROM customers",
            "UPDATE people SET note = tax_ssn",
            "ALTER TABLE customers RENAME COLUMN card TO c",
            "ALTER TABLE people RENAME COLUMN tax_ssn TO t",
            "ALTER TABLE customers ADD COLUMN x int",
            "CREATE TABLE c AS TABLE customers",
            "INSERT INTO mine SELECT * FROM people",
            // Functions that keep their arguments for a later read.
            "SELECT set_config('my.x', card, false) FROM customers",
            "SELECT pg_catalog.SET_CONFIG('my.x', c::text, false) FROM customers c",
            "SELECT lo_from_bytea(0, convert_to(tax_ssn, 'UTF8')) FROM people",
            "SELECT pg_notify('c', card) FROM customers",
            "SELECT 1 FROM customers WHERE set_config('my.x', card, false) IS NOT NULL",
            "SELECT 1 FROM customers c, set_config('my.x', c.card, false)",
            "SELECT 1 FROM customers c, LATERAL pg_notify('c', c.card)",
            "SELECT pg_try_advisory_lock(card::bigint) FROM customers",
        ] {
            assert!(m.writes_masked(&writes(sql).unwrap()), "{sql}");
        }
        for sql in [
            "INSERT INTO c2 SELECT name FROM customers",
            "UPDATE customers SET name = 'x' WHERE card = '1'",
            "DELETE FROM customers WHERE card = '1'",
            "ALTER TABLE people RENAME COLUMN name TO n",
            "SELECT card FROM customers",
            "SELECT set_config('search_path', 'public', false)",
            "SELECT set_config('my.x', name, false), card FROM customers",
        ] {
            assert!(!m.writes_masked(&writes(sql).unwrap()), "{sql}");
        }
    }

    #[test]
    fn statements_are_masked_only_where_that_cannot_change_how_they_read() {
        let m = all();
        assert_eq!(
            m.mask_statement(
                "delete from t where email = 'bob@example.com' -- for alice@example.com"
            )
            .as_deref(),
            Some("delete from t where email = '[email]' -- for [email]")
        );
        assert_eq!(m.mask_statement("select 1").as_deref(), Some("select 1"));
        // The private-key detector runs to the end of the text; masked
        // token by token, it stays inside the comment, whose line end (and
        // the `or true` after it) stays.
        assert_eq!(
            m.mask_statement("delete from t where id = 1 -- -----BEGIN PRIVATE KEY-----\n or true")
                .as_deref(),
            Some("delete from t where id = 1 -- [private_key]\n or true")
        );
        // Text the scanner refuses is masked whole, and not shown where that
        // would take a line end.
        assert_eq!(
            m.mask_statement("select 'x -- -----BEGIN PRIVATE KEY-----\n or true"),
            None
        );
        // A custom pattern that would take a quote, `;` or a comment end.
        let broad = |p: &str| {
            Masker::new(&[&MaskingDoc {
                name: "b".into(),
                detectors: vec![],
                columns: vec![],
                patterns: vec![p.into()],
            }])
            .unwrap()
        };
        for (pattern, sql) in [
            ("x'+", "select 'ax''' or true"),
            ("secret.*", "select 1; /* secret */ delete from t"),
            ("secret.*", "select $$secret$$, 1"),
            ("1;.*", "select 1; delete from t"),
        ] {
            assert_eq!(
                broad(pattern).mask_statement(sql),
                None,
                "{pattern} on {sql}"
            );
        }
        assert_eq!(
            broad("secret[a-z]*")
                .mask_statement("select 'secretive' -- secrets\n, 1")
                .as_deref(),
            Some("select '[masked]' -- [masked]\n, 1")
        );
    }

    #[test]
    fn columns_match_by_pattern() {
        let m = all();
        assert!(m.masks_column("customer_ssn"));
        assert!(m.masks_column("SECRET"));
        assert!(!m.masks_column("name"));
        assert!(Masker::new(&[&MaskingDoc {
            name: "bad".into(),
            detectors: vec![],
            columns: vec![],
            patterns: vec!["(".into()],
        }])
        .is_err());
    }
}
