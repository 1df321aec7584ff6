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

    fn regex(self) -> &'static Regex {
        static RES: OnceLock<Vec<Regex>> = OnceLock::new();
        let all = RES.get_or_init(|| {
            [
                r"(?s)-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
                r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
                r"\b(AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}\b",
                r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
                r"\b[0-9](?:[ -]?[0-9]){12,18}\b",
                r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
                r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b",
                r"(?i)\b(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\b|\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{0,4}(?::[0-9a-f]{1,4})*\b|::1\b",
                r"(?:\+[0-9][0-9 ().-]{7,18}[0-9])|\b\(?[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}\b",
            ]
            .iter()
            .map(|p| Regex::new(p).expect("built-in detector pattern"))
            .collect()
        });
        let i = Detector::ALL.iter().position(|d| *d == self).unwrap_or(0);
        &all[i]
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

fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
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
    /// Column names (`*` wildcards, case-insensitive) whose values are
    /// replaced entirely.
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
    patterns: Vec<Regex>,
}

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
            m.columns.extend(p.columns.iter().map(|c| c.to_lowercase()));
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
        self.detectors.is_empty() && self.columns.is_empty() && self.patterns.is_empty()
    }

    pub fn has_column_rules(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Whether a column (by name) is masked entirely.
    pub fn masks_column(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.columns
            .iter()
            .any(|p| crate::policy::wildcard(p, &name))
    }

    /// Masks sensitive parts of `text`; `None` when nothing matched.
    pub fn mask_text(&self, text: &str) -> Option<String> {
        let mut out = text.to_owned();
        let mut changed = false;
        for d in &self.detectors {
            let re = d.regex();
            if !re.is_match(&out) {
                continue;
            }
            let replaced = re.replace_all(&out, |c: &regex::Captures<'_>| {
                let m = &c[0];
                if d.confirms(m) {
                    changed = true;
                    format!("[{}]", d.as_str())
                } else {
                    m.to_owned()
                }
            });
            out = replaced.into_owned();
        }
        for re in &self.patterns {
            if re.is_match(&out) {
                changed = true;
                out = re.replace_all(&out, "[masked]").into_owned();
            }
        }
        changed.then_some(out)
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
