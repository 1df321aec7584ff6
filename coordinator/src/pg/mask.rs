//! Masking of what the server sends (rows, notices, notifications) and of
//! what the client sent, as recorded.

use super::*;

/// PostgreSQL types whose text (or binary) form is the text itself.
pub(super) fn text_like(type_oid: i32) -> bool {
    matches!(type_oid, 18 | 19 | 25 | 114 | 705 | 1042 | 1043 | 3802)
}

/// Binary types that cannot carry text (their values pass unmasked).
pub(super) fn binary_safe(type_oid: i32) -> bool {
    matches!(
        type_oid,
        16 | 26 | 700 | 701 | 1082 | 1083 | 1114 | 1184 | 1186 | 2950
    )
}

/// The columns of the current result, and which are masked whole (decided
/// once per RowDescription, not per value).
#[derive(Debug, Default)]
pub(super) struct Shape {
    pub(super) fields: Vec<pg::Field>,
    pub(super) whole: Vec<bool>,
    /// The columns are not known (rows nobody described): every value is
    /// refused (NULL) rather than guessed at.
    pub(super) unknown: bool,
}

impl Shape {
    pub(super) fn unknown() -> Self {
        Self {
            unknown: true,
            ..Self::default()
        }
    }

    /// Which columns column rules mask whole. A column is masked whole when
    /// its name or alias matches a column-name rule; a table column, when
    /// its source column (by name or as `schema.table.column`) matches a
    /// rule, or its relation is a view reading masked columns; a computed
    /// column (no table column behind it), when `tainted` (its statement
    /// reads masked columns, or a view it reads does: see
    /// [`Relay::with_lineage`]).
    ///
    /// `tables`: the names behind the fields' table OIDs; `None` when they
    /// could not be resolved. Column rules fail closed: a table column whose
    /// names are unknown is masked whole. `computed[i]`: whether field `i`,
    /// if computed, may hold masked values (missing: no).
    pub(super) fn new(
        fields: Vec<pg::Field>,
        m: &crate::policy::mask::Masker,
        tables: Option<&catalog::Resolved>,
        computed: Vec<bool>,
    ) -> Self {
        let mut views: HashMap<u32, bool> = HashMap::new();
        let whole = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if m.masks_column(&f.name) {
                    return true;
                }
                if f.table_oid == 0 {
                    return computed.get(i).copied().unwrap_or(false);
                }
                if !m.has_column_rules() {
                    return false;
                }
                let oid = f.table_oid as u32;
                let Some(t) = tables.and_then(|t| t.get(&oid)) else {
                    return true;
                };
                let Some(c) = t.columns.get(&f.column) else {
                    return true;
                };
                m.masks_column(c)
                    || m.masks_table_column(&t.schema, &t.table, c)
                    || *views
                        .entry(oid)
                        .or_insert_with(|| t.views.iter().any(|d| m.definition_reads_masked(d)))
            })
            .collect();
        Self {
            fields,
            whole,
            unknown: false,
        }
    }
}

/// Masks what detectors and patterns find in what the client sent, as
/// recorded: statement text, parameters and COPY FROM data (the evidence
/// holds only what the session may see). COPY data that is not text cannot
/// be inspected and is recorded as withheld.
pub(super) fn mask_client_event(m: &crate::policy::mask::Masker, e: &mut ev::event::Kind) {
    if !m.masks_text() {
        return;
    }
    match e {
        ev::event::Kind::Command(c) => {
            // Masked only where that cannot change how it reads (a match
            // must not hide SQL from whoever reads the evidence); otherwise
            // the text is withheld.
            c.text = m.mask_statement(&c.text).unwrap_or_else(|| {
                "[statement withheld: masking would change how it reads]".into()
            });
            for p in &mut c.params {
                if let Some(t) = m.mask_text(p) {
                    *p = t;
                }
            }
        }
        ev::event::Kind::Output(o) => match std::str::from_utf8(&o.data) {
            Ok(text) => {
                if let Some(t) = m.mask_text(text) {
                    o.data = t.into_bytes().into();
                }
            }
            Err(_) => {
                o.data = bytes::Bytes::from_static(b"[non-text COPY data withheld by masking]")
            }
        },
        _ => {}
    }
}

/// What masking does to one value.
#[derive(Debug, PartialEq)]
pub(super) enum Change {
    Keep,
    /// Replaced by SQL NULL (a value that cannot carry the replacement, or
    /// cannot be inspected).
    Null,
    /// The whole value becomes the mask marker.
    Marker,
    /// These bytes of the row's rewritten values.
    To(std::ops::Range<usize>),
}

/// Masks one value of column `field` (`whole`: the column is masked
/// entirely).
///
/// A rewritten value is appended to `out` (`Change::To` gives where).
pub(super) fn mask_value(
    m: &crate::policy::mask::Masker,
    field: Option<&pg::Field>,
    whole: bool,
    v: &[u8],
    out: &mut String,
) -> Change {
    use std::borrow::Cow;
    let (oid, format) = field.map_or((25, 0), |f| (f.type_oid, f.format));
    let text_type = text_like(oid);
    if whole {
        // The whole value goes; types that cannot hold the marker become NULL
        // (a text type's binary form is its text; jsonb's is not).
        return if text_type && (format == 0 || oid != 3802) {
            Change::Marker
        } else {
            Change::Null
        };
    }
    // bool, int2, int4, oid: no built-in detector can match their values
    // (at most ten digits, no separators); custom patterns still might.
    if matches!(oid, 16 | 21 | 23 | 26) && !m.has_patterns() {
        return Change::Keep;
    }
    if format == 1 {
        if binary_safe(oid) {
            return Change::Keep;
        }
        let as_text: Cow<'_, str> = match (oid, v.len()) {
            (20, 8) => i64::from_be_bytes(v.try_into().unwrap_or([0; 8]))
                .to_string()
                .into(),
            (23, 4) => i32::from_be_bytes(v.try_into().unwrap_or([0; 4]))
                .to_string()
                .into(),
            (21, 2) => i16::from_be_bytes(v.try_into().unwrap_or([0; 2]))
                .to_string()
                .into(),
            // jsonb's binary form is a version byte and the text.
            (3802, _) if v.first() == Some(&1) => String::from_utf8_lossy(&v[1..]),
            _ if text_type => String::from_utf8_lossy(v),
            // Cannot be inspected: refused (NULL), never passed through.
            _ => return Change::Null,
        };
        let start = out.len();
        if oid == 3802 {
            out.push('\u{1}');
        }
        if !m.mask_bytes_into(as_text.as_bytes(), out) {
            out.truncate(start);
            return Change::Keep;
        }
        return if text_type {
            Change::To(start..out.len())
        } else {
            out.truncate(start);
            Change::Null
        };
    }
    let start = out.len();
    if !m.mask_bytes_into(v, out) {
        return Change::Keep;
    }
    if text_type {
        Change::To(start..out.len())
    } else {
        // A number that looks like a card or phone number: NULL.
        out.truncate(start);
        Change::Null
    }
}

/// Where a DataRow value sits in the row's body (`None`: NULL).
pub(super) type Span = Option<(usize, usize)>;

/// Rewritten rows are carved out of shared blocks of this size (one
/// allocation for many rows; a block is freed with the last row in it).
pub(super) const ROW_BLOCK: usize = 64 << 10;

thread_local! {
    /// Per-thread buffers for masking rows (value positions, changes, and
    /// the block rewritten rows are carved from), so that masking a row
    /// allocates only for the values it rewrites.
    static ROW_SCRATCH: std::cell::RefCell<RowScratch> = std::cell::RefCell::default();
}

/// See [`ROW_SCRATCH`].
#[derive(Default)]
pub(super) struct RowScratch {
    /// Where each value of the row sits.
    spans: Vec<Span>,
    /// What masking does to each value (empty: nothing changed).
    changes: Vec<Change>,
    /// The row's rewritten values, which `Change::To` points into.
    rewritten: String,
    /// The block rewritten rows are carved from.
    block: BytesMut,
}

/// Applies masking to a server message: DataRow values and COPY data.
pub(super) fn mask_frame(
    m: &crate::policy::mask::Masker,
    f: Frame,
    shape: &Shape,
) -> Result<Frame, pg::PgError> {
    match f.tag {
        btag::DATA_ROW => ROW_SCRATCH.with(|scratch| {
            let RowScratch {
                spans,
                changes,
                rewritten,
                block,
            } = &mut *scratch.borrow_mut();
            pg::data_row_spans(&f.body, spans)?;
            let value = |span: Option<(usize, usize)>| span.map(|(at, len)| &f.body[at..at + len]);
            if shape.unknown {
                return Ok(Frame {
                    tag: f.tag,
                    body: pg::data_row_body::<&[u8]>(&vec![None; spans.len()]),
                });
            }
            // Rows are rebuilt only when a value changed.
            changes.clear();
            rewritten.clear();
            // A rare huge value does not keep its buffer for the thread's life.
            if rewritten.capacity() > ROW_BLOCK {
                *rewritten = String::new();
            }
            for (i, span) in spans.iter().enumerate() {
                let Some(v) = value(*span) else { continue };
                let whole = shape.whole.get(i).copied().unwrap_or(false);
                let c = mask_value(m, shape.fields.get(i), whole, v, rewritten);
                if c != Change::Keep {
                    if changes.is_empty() {
                        changes.resize_with(spans.len(), || Change::Keep);
                    }
                    changes[i] = c;
                }
            }
            if changes.is_empty() {
                return Ok(f);
            }
            let rewritten = rewritten.as_bytes();
            let new = |span: &Option<(usize, usize)>, c: &Change| -> Option<&[u8]> {
                match c {
                    Change::Keep => span.map(|(at, len)| &f.body[at..at + len]),
                    Change::Null => None,
                    Change::Marker => Some(crate::policy::mask::MASKED.as_bytes()),
                    Change::To(r) => Some(&rewritten[r.clone()]),
                }
            };
            let len = 2 + spans
                .iter()
                .zip(changes.iter())
                .map(|(v, c)| 4 + new(v, c).map_or(0, <[u8]>::len))
                .sum::<usize>();
            if block.capacity() < len {
                *block = BytesMut::with_capacity(len.max(ROW_BLOCK));
            }
            block.put_i16(spans.len() as i16);
            for (v, c) in spans.iter().zip(changes.iter()) {
                match new(v, c) {
                    None => block.put_i32(-1),
                    Some(b) => {
                        block.put_i32(b.len() as i32);
                        block.put_slice(b);
                    }
                }
            }
            Ok(Frame {
                tag: f.tag,
                body: block.split().freeze(),
            })
        }),
        // Binary COPY cannot be inspected, and COPY rows carry no column
        // names for column rules: refused (the connection ends). The
        // statement check refuses COPY ... TO first; this is the backstop.
        btag::COPY_OUT | btag::COPY_BOTH if f.body.first() == Some(&1) => {
            Err(pg::PgError::Malformed {
                what: "binary COPY under masking is refused; CopyOut",
            })
        }
        btag::COPY_OUT | btag::COPY_BOTH if m.has_column_rules() => Err(pg::PgError::Malformed {
            what: "COPY out under column masking is refused; CopyOut",
        }),
        // Errors, notices and notifications can carry values too
        // (`SELECT secret::int`, `RAISE NOTICE`, `pg_notify`).
        btag::ERROR_RESPONSE | btag::NOTICE_RESPONSE => Ok(match mask_notice(m, &f.body)? {
            Some(body) => Frame { tag: f.tag, body },
            None => f,
        }),
        btag::NOTIFICATION => Ok(match mask_notification(m, &f.body)? {
            Some(body) => Frame { tag: f.tag, body },
            None => f,
        }),
        btag::COPY_DATA => {
            let text = String::from_utf8_lossy(&f.body);
            Ok(match m.mask_text(&text) {
                Some(masked) => Frame {
                    tag: f.tag,
                    body: masked.into(),
                },
                None => f,
            })
        }
        _ => Ok(f),
    }
}

/// What replaces the texts of errors, notices and notifications that
/// answer a statement reading masked columns.
pub(super) const WITHHELD: &str =
    "(text withheld under column masking: the statement reads masked columns)";

/// Under column rules: an ErrorResponse or NoticeResponse loses the free-text
/// fields that can quote rows (detail, hint, context, internal query and
/// positions), and with `message` its message becomes [`WITHHELD`]; a
/// NotificationResponse's payload is withheld. Severity, SQLSTATE and object
/// names stay.
pub(super) fn withhold_text(f: Frame, message: bool) -> Result<Frame, pg::PgError> {
    if f.tag == btag::NOTIFICATION {
        let bad = pg::PgError::Malformed {
            what: "NotificationResponse",
        };
        let rest = f.body.get(4..).ok_or(bad.clone())?;
        let c_end = rest.iter().position(|b| *b == 0).ok_or(bad)?;
        let mut body = BytesMut::with_capacity(f.body.len());
        body.extend_from_slice(&f.body[..4 + c_end + 1]);
        body.extend_from_slice(WITHHELD.as_bytes());
        body.extend_from_slice(&[0]);
        return Ok(Frame {
            tag: f.tag,
            body: body.freeze(),
        });
    }
    let n = pg::decode_notice(&f.body)?;
    let mut body = BytesMut::new();
    for (code, value) in &n.fields {
        let value = match code {
            b'M' if message => WITHHELD,
            b'M' => value.as_str(),
            b'S' | b'V' | b'C' | b's' | b't' | b'c' | b'd' | b'n' => value.as_str(),
            _ => continue,
        };
        body.extend_from_slice(&[*code]);
        body.extend_from_slice(value.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(&[0]);
    Ok(Frame {
        tag: f.tag,
        body: body.freeze(),
    })
}

/// Masks the text fields of an ErrorResponse or NoticeResponse (message,
/// detail, hint, context, internal query); `None` when nothing matched.
pub(super) fn mask_notice(
    m: &crate::policy::mask::Masker,
    body: &[u8],
) -> Result<Option<bytes::Bytes>, pg::PgError> {
    let bad = pg::PgError::Malformed {
        what: "ErrorResponse/NoticeResponse",
    };
    let mut out = BytesMut::with_capacity(body.len());
    let mut changed = false;
    let mut rest = body;
    loop {
        let (&code, tail) = rest.split_first().ok_or(bad.clone())?;
        out.extend_from_slice(&[code]);
        if code == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).ok_or(bad.clone())?;
        let value = &tail[..end];
        let masked = if matches!(code, b'M' | b'D' | b'H' | b'W' | b'q') {
            m.mask_text(&String::from_utf8_lossy(value))
        } else {
            None
        };
        match masked {
            Some(t) => {
                changed = true;
                out.extend_from_slice(t.as_bytes());
            }
            None => out.extend_from_slice(value),
        }
        out.extend_from_slice(&[0]);
        rest = &tail[end + 1..];
    }
    Ok(changed.then(|| out.freeze()))
}

/// Masks a NotificationResponse's payload; `None` when nothing matched.
pub(super) fn mask_notification(
    m: &crate::policy::mask::Masker,
    body: &[u8],
) -> Result<Option<bytes::Bytes>, pg::PgError> {
    let bad = pg::PgError::Malformed {
        what: "NotificationResponse",
    };
    let pid = body.get(..4).ok_or(bad.clone())?;
    let rest = &body[4..];
    let c_end = rest.iter().position(|b| *b == 0).ok_or(bad.clone())?;
    let payload = &rest[c_end + 1..];
    let p_end = payload.iter().position(|b| *b == 0).ok_or(bad)?;
    let Some(masked) = m.mask_text(&String::from_utf8_lossy(&payload[..p_end])) else {
        return Ok(None);
    };
    let mut out = BytesMut::with_capacity(body.len());
    out.extend_from_slice(pid);
    out.extend_from_slice(&rest[..=c_end]);
    out.extend_from_slice(masked.as_bytes());
    out.extend_from_slice(&[0]);
    Ok(Some(out.freeze()))
}
