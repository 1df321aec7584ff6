//! A sans-IO codec for the PostgreSQL frontend/backend protocol (3.0).
//!
//! Framing: startup-phase messages are `len:i32 | body` (no tag); every other
//! message is `tag:u8 | len:i32 | body`, where `len` counts itself. Lengths
//! are checked before anything is buffered beyond the header, so a hostile
//! length never grows memory past [`Limits::max_message`].
//!
//! [`split_frame`] and [`split_startup`] only cut frames; the `decode_*`
//! functions give typed views of the messages the gateway inspects, and the
//! `encode_*` functions build the messages it writes itself. Everything else
//! is relayed as raw frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol version 3.0.
pub const PROTOCOL_3_0: i32 = 196_608;
/// Protocol version 3.2 (PostgreSQL 18): cancel keys of up to 256 bytes.
pub const PROTOCOL_3_2: i32 = 196_610;
/// The newest minor version of protocol 3 this codec speaks.
pub const NEWEST_MINOR: u16 = 2;
/// Longest cancel key protocol 3.2 allows.
pub const MAX_CANCEL_KEY: usize = 256;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// Largest startup packet accepted (PostgreSQL itself uses 10000).
pub const MAX_STARTUP: usize = 10_000;

/// Why bytes could not be decoded. Every variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    #[error("message length {0} is invalid")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unsupported protocol version {major}.{minor}")]
    Version { major: u16, minor: u16 },
}

/// Size limits for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message: 64 << 20,
        }
    }
}

/// One tagged message: its tag and body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// The frame as it goes on the wire.
    pub fn encode(&self, out: &mut BytesMut) {
        encode_frame(self.tag, &self.body, out);
    }
}

/// Cuts one tagged frame off the front of `buf`, if it is complete.
pub fn split_frame(buf: &mut BytesMut, limits: Limits) -> Result<Option<Frame>, PgError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(PgError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > limits.max_message {
        return Err(PgError::TooLarge {
            len,
            max: limits.max_message,
        });
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let tag = buf[0];
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

pub fn encode_frame(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.reserve(5 + body.len());
    out.put_u8(tag);
    out.put_i32((body.len() + 4) as i32);
    out.put_slice(body);
}

/// The first message of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    /// A CancelRequest: the key is 4 bytes in protocol 3.0, up to 256 in 3.2.
    Cancel {
        pid: i32,
        key: Vec<u8>,
    },
    /// A StartupMessage for protocol 3.`minor` (any minor: the server
    /// answers a newer one with NegotiateProtocolVersion).
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Cuts a startup-phase message off `buf`, if it is complete.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Startup>, PgError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(PgError::BadLength(len.into()));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut m = buf.split_to(len).freeze();
    m.advance(4);
    let code = m.get_i32();
    match code {
        SSL_REQUEST if m.is_empty() => Ok(Some(Startup::Ssl)),
        GSSENC_REQUEST if m.is_empty() => Ok(Some(Startup::GssEnc)),
        CANCEL_REQUEST if (8..=4 + MAX_CANCEL_KEY).contains(&m.len()) => {
            let pid = m.get_i32();
            Ok(Some(Startup::Cancel {
                pid,
                key: m.to_vec(),
            }))
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let k = cstr(&mut m, "startup")?;
                if k.is_empty() {
                    break;
                }
                let v = cstr(&mut m, "startup")?;
                params.push((k, v));
            }
            if !m.is_empty() {
                return Err(PgError::Malformed { what: "startup" });
            }
            Ok(Some(Startup::Startup {
                minor: (v & 0xffff) as u16,
                params,
            }))
        }
        v => Err(PgError::Version {
            major: (v >> 16) as u16,
            minor: (v & 0xffff) as u16,
        }),
    }
}

/// What a server speaking up to 3.[`NEWEST_MINOR`] answers a StartupMessage
/// for 3.`requested` with `params`: the minor version the session uses and
/// the `_pq_.` protocol options it does not know (none are supported). When
/// the minor differs or options are unknown, NegotiateProtocolVersion must
/// be sent ([`encode_negotiate_version`]). 3.1 was never defined: it gets 3.0.
pub fn negotiate(requested: u16, params: &[(String, String)]) -> (u16, Vec<String>) {
    let minor = if requested >= NEWEST_MINOR {
        NEWEST_MINOR
    } else {
        0
    };
    let unknown = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    (minor, unknown)
}

pub fn encode_negotiate_version(minor: u16, unknown: &[String], out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_i32(i32::from(minor));
    body.put_i32(unknown.len() as i32);
    for o in unknown {
        body.put_slice(o.as_bytes());
        body.put_u8(0);
    }
    encode_frame(btag::NEGOTIATE_VERSION, &body, out);
}

fn cstr(b: &mut Bytes, what: &'static str) -> Result<String, PgError> {
    let end = b
        .iter()
        .position(|c| *c == 0)
        .ok_or(PgError::Malformed { what })?;
    let s = String::from_utf8(b[..end].to_vec()).map_err(|_| PgError::Malformed { what })?;
    b.advance(end + 1);
    Ok(s)
}

fn i16_of(b: &mut Bytes, what: &'static str) -> Result<i16, PgError> {
    if b.remaining() < 2 {
        return Err(PgError::Malformed { what });
    }
    Ok(b.get_i16())
}

fn i32_of(b: &mut Bytes, what: &'static str) -> Result<i32, PgError> {
    if b.remaining() < 4 {
        return Err(PgError::Malformed { what });
    }
    Ok(b.get_i32())
}

/// A count field: non-negative and plausible for the bytes left.
fn count_of(b: &mut Bytes, what: &'static str, min_each: usize) -> Result<usize, PgError> {
    let n = i16_of(b, what)?;
    if n < 0 || (n as usize) * min_each > b.remaining() {
        return Err(PgError::Malformed { what });
    }
    Ok(n as usize)
}

/// Length-prefixed values (`-1` = NULL), as in Bind and DataRow.
fn values_of(b: &mut Bytes, what: &'static str) -> Result<Vec<Option<Bytes>>, PgError> {
    let n = count_of(b, what, 4)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32_of(b, what)?;
        if len == -1 {
            out.push(None);
        } else if len < 0 || len as usize > b.remaining() {
            return Err(PgError::Malformed { what });
        } else {
            out.push(Some(b.split_to(len as usize)));
        }
    }
    Ok(out)
}

fn i16s_of(b: &mut Bytes, what: &'static str) -> Result<Vec<i16>, PgError> {
    let n = count_of(b, what, 2)?;
    (0..n).map(|_| i16_of(b, what)).collect()
}

fn done(b: &Bytes, what: &'static str) -> Result<(), PgError> {
    if b.is_empty() {
        Ok(())
    } else {
        Err(PgError::Malformed { what })
    }
}

/// Frontend (client) message tags.
pub mod ftag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const DESCRIBE: u8 = b'D';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
}

/// Backend (server) message tags.
pub mod btag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION: u8 = b'A';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const COPY_IN: u8 = b'G';
    pub const COPY_OUT: u8 = b'H';
    pub const COPY_BOTH: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const NEGOTIATE_VERSION: u8 = b'v';
}

/// `Parse`: a named (or unnamed) prepared statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: String,
    pub query: String,
    pub param_types: Vec<i32>,
}

pub fn decode_parse(body: &Bytes) -> Result<Parse, PgError> {
    const W: &str = "Parse";
    let mut b = body.clone();
    let name = cstr(&mut b, W)?;
    let query = cstr(&mut b, W)?;
    let n = count_of(&mut b, W, 4)?;
    let param_types = (0..n)
        .map(|_| i32_of(&mut b, W))
        .collect::<Result<_, _>>()?;
    done(&b, W)?;
    Ok(Parse {
        name,
        query,
        param_types,
    })
}

/// `Bind`: parameters for a statement, into a portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: String,
    pub statement: String,
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

impl Bind {
    /// The format of parameter `i` (0 text, 1 binary).
    pub fn param_format(&self, i: usize) -> i16 {
        match self.param_formats.len() {
            0 => 0,
            1 => self.param_formats[0],
            _ => self.param_formats.get(i).copied().unwrap_or(0),
        }
    }
}

pub fn decode_bind(body: &Bytes) -> Result<Bind, PgError> {
    const W: &str = "Bind";
    let mut b = body.clone();
    let portal = cstr(&mut b, W)?;
    let statement = cstr(&mut b, W)?;
    let param_formats = i16s_of(&mut b, W)?;
    let params = values_of(&mut b, W)?;
    let result_formats = i16s_of(&mut b, W)?;
    done(&b, W)?;
    Ok(Bind {
        portal,
        statement,
        param_formats,
        params,
        result_formats,
    })
}

/// `Execute`: run a portal.
pub fn decode_execute(body: &Bytes) -> Result<(String, i32), PgError> {
    const W: &str = "Execute";
    let mut b = body.clone();
    let portal = cstr(&mut b, W)?;
    let max_rows = i32_of(&mut b, W)?;
    done(&b, W)?;
    Ok((portal, max_rows))
}

/// `Close` / `Describe`: a kind byte (`S` statement, `P` portal) and a name.
pub fn decode_target(body: &Bytes, what: &'static str) -> Result<(u8, String), PgError> {
    let mut b = body.clone();
    if b.is_empty() {
        return Err(PgError::Malformed { what });
    }
    let kind = b.get_u8();
    if kind != b'S' && kind != b'P' {
        return Err(PgError::Malformed { what });
    }
    let name = cstr(&mut b, what)?;
    done(&b, what)?;
    Ok((kind, name))
}

/// A body that is one C string (`Query`, `PasswordMessage`, `CommandComplete`,
/// `CopyFail`).
pub fn decode_cstring(body: &Bytes, what: &'static str) -> Result<String, PgError> {
    let mut b = body.clone();
    let s = cstr(&mut b, what)?;
    done(&b, what)?;
    Ok(s)
}

/// One column of a `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: i32,
    pub column: i16,
    pub type_oid: i32,
    pub type_size: i16,
    pub type_modifier: i32,
    pub format: i16,
}

pub fn decode_row_description(body: &Bytes) -> Result<Vec<Field>, PgError> {
    const W: &str = "RowDescription";
    let mut b = body.clone();
    let n = count_of(&mut b, W, 19)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Field {
            name: cstr(&mut b, W)?,
            table_oid: i32_of(&mut b, W)?,
            column: i16_of(&mut b, W)?,
            type_oid: i32_of(&mut b, W)?,
            type_size: i16_of(&mut b, W)?,
            type_modifier: i32_of(&mut b, W)?,
            format: i16_of(&mut b, W)?,
        });
    }
    done(&b, W)?;
    Ok(out)
}

pub fn decode_data_row(body: &Bytes) -> Result<Vec<Option<Bytes>>, PgError> {
    const W: &str = "DataRow";
    let mut b = body.clone();
    let v = values_of(&mut b, W)?;
    done(&b, W)?;
    Ok(v)
}

pub fn encode_data_row(values: &[Option<Bytes>], out: &mut BytesMut) {
    encode_frame(btag::DATA_ROW, &data_row_body(values), out);
}

/// The body of a DataRow holding `values` (one allocation).
pub fn data_row_body<T: AsRef<[u8]>>(values: &[Option<T>]) -> Bytes {
    let len = 2 + values
        .iter()
        .map(|v| 4 + v.as_ref().map_or(0, |b| b.as_ref().len()))
        .sum::<usize>();
    let mut body = BytesMut::with_capacity(len);
    body.put_i16(values.len() as i16);
    for v in values {
        match v {
            None => body.put_i32(-1),
            Some(b) => {
                let b = b.as_ref();
                body.put_i32(b.len() as i32);
                body.put_slice(b);
            }
        }
    }
    body.freeze()
}

/// A DataRow's values as (offset, length) in its body, into a reusable
/// buffer (`None` for NULL); a malformed row is an error.
pub fn data_row_spans(body: &[u8], out: &mut Vec<Option<(usize, usize)>>) -> Result<(), PgError> {
    out.clear();
    let bad = || PgError::Malformed { what: "DataRow" };
    let n = body.get(..2).ok_or_else(bad)?;
    let n = i16::from_be_bytes([n[0], n[1]]);
    if n < 0 {
        return Err(bad());
    }
    let mut at = 2;
    for _ in 0..n {
        let len = body.get(at..at + 4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4;
        if len == -1 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| bad())?;
        if body.len() - at < len {
            return Err(bad());
        }
        out.push(Some((at, len)));
        at += len;
    }
    if at != body.len() {
        return Err(bad());
    }
    Ok(())
}

/// A DataRow's values as slices of its body (no copies, no reference
/// counting: the hot path of masking and recording).
pub fn data_row_slices(body: &[u8]) -> Result<Vec<Option<&[u8]>>, PgError> {
    let mut spans = Vec::new();
    data_row_spans(body, &mut spans)?;
    Ok(spans
        .into_iter()
        .map(|s| s.map(|(at, len)| &body[at..at + len]))
        .collect())
}

/// `ErrorResponse` / `NoticeResponse` fields by their code byte.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice {
    pub fields: Vec<(u8, String)>,
}

impl Notice {
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// `SQLSTATE: message`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {}",
            self.get(b'C').unwrap_or("?????"),
            self.get(b'M').unwrap_or("")
        )
    }
}

pub fn decode_notice(body: &Bytes) -> Result<Notice, PgError> {
    const W: &str = "ErrorResponse";
    let mut b = body.clone();
    let mut fields = Vec::new();
    loop {
        if b.is_empty() {
            return Err(PgError::Malformed { what: W });
        }
        let code = b.get_u8();
        if code == 0 {
            break;
        }
        fields.push((code, cstr(&mut b, W)?));
    }
    done(&b, W)?;
    Ok(Notice { fields })
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // C strings cannot carry NUL; drop any rather than truncate silently.
    out.extend(s.bytes().filter(|b| *b != 0));
    out.put_u8(0);
}

/// An `ErrorResponse` (`notice = false`) or `NoticeResponse`.
pub fn encode_notice(
    notice: bool,
    severity: &str,
    sqlstate: &str,
    message: &str,
    out: &mut BytesMut,
) {
    let mut body = BytesMut::new();
    for (code, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.put_u8(code);
        put_cstr(&mut body, v);
    }
    body.put_u8(0);
    let tag = if notice {
        btag::NOTICE_RESPONSE
    } else {
        btag::ERROR_RESPONSE
    };
    encode_frame(tag, &body, out);
}

/// A protocol 3.0 StartupMessage with `params`.
pub fn encode_startup(params: &[(&str, &str)], out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut body, k);
        put_cstr(&mut body, v);
    }
    body.put_u8(0);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
}

/// A CancelRequest.
pub fn encode_cancel(pid: i32, key: &[u8], out: &mut BytesMut) {
    out.put_i32(12 + key.len() as i32);
    out.put_i32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_slice(key);
}

/// `FATAL` error: the gateway closes the connection after it.
pub fn encode_fatal(sqlstate: &str, message: &str, out: &mut BytesMut) {
    encode_notice(false, "FATAL", sqlstate, message, out);
}

/// `Authentication` with a sub-code and optional payload.
pub fn encode_auth(code: i32, payload: &[u8], out: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(4 + payload.len());
    body.put_i32(code);
    body.put_slice(payload);
    encode_frame(btag::AUTHENTICATION, &body, out);
}

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;

/// BackendKeyData: a 4-byte key for protocol 3.0, longer ones for 3.2.
pub fn encode_backend_key_data(pid: i32, key: &[u8], out: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(4 + key.len());
    body.put_i32(pid);
    body.put_slice(key);
    encode_frame(btag::BACKEND_KEY_DATA, &body, out);
}

pub fn decode_backend_key_data(body: &Bytes) -> Result<(i32, i32), PgError> {
    const W: &str = "BackendKeyData";
    let mut b = body.clone();
    let pid = i32_of(&mut b, W)?;
    let key = i32_of(&mut b, W)?;
    done(&b, W)?;
    Ok((pid, key))
}

pub fn encode_ready(status: u8, out: &mut BytesMut) {
    encode_frame(btag::READY_FOR_QUERY, &[status], out);
}

/// Rows affected, from a `CommandComplete` tag (`INSERT 0 5`, `UPDATE 3`, `SELECT 2`).
pub fn rows_from_tag(tag: &str) -> Option<u64> {
    let mut words = tag.split_whitespace();
    let verb = words.next()?;
    let last = tag.split_whitespace().last()?;
    match verb {
        "INSERT" | "UPDATE" | "DELETE" | "SELECT" | "MERGE" | "MOVE" | "FETCH" | "COPY" => {
            last.parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(tag, body, &mut out);
        out
    }

    #[test]
    fn frames_split_only_when_complete_and_lengths_are_checked() {
        let mut buf = frame(b'Q', b"select 1\0");
        let whole = buf.clone();
        let mut part = BytesMut::from(&whole[..7]);
        assert_eq!(split_frame(&mut part, Limits::default()), Ok(None));
        let f = split_frame(&mut buf, Limits::default()).unwrap().unwrap();
        assert_eq!(
            (f.tag, decode_cstring(&f.body, "Query").unwrap().as_str()),
            (b'Q', "select 1")
        );
        assert!(buf.is_empty());
        // A 1 GB length is refused from the header alone.
        let mut huge = BytesMut::from(&[b'Q', 0x40, 0, 0, 0][..]);
        assert!(matches!(
            split_frame(&mut huge, Limits::default()),
            Err(PgError::TooLarge { .. })
        ));
        let mut neg = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            split_frame(&mut neg, Limits::default()),
            Err(PgError::BadLength(-1))
        );
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            split_frame(&mut short, Limits::default()),
            Err(PgError::BadLength(3))
        );
    }

    #[test]
    fn startup_messages() {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(SSL_REQUEST);
        assert_eq!(split_startup(&mut b), Ok(Some(Startup::Ssl)));
        let mut b = BytesMut::new();
        b.put_i32(16);
        b.put_i32(CANCEL_REQUEST);
        b.put_i32(7);
        b.put_i32(9);
        assert_eq!(
            split_startup(&mut b),
            Ok(Some(Startup::Cancel {
                pid: 7,
                key: vec![0, 0, 0, 9]
            }))
        );
        // Protocol 3.2: a 32-byte key; longer than 256 bytes is refused.
        let mut b = BytesMut::new();
        encode_cancel(7, &[5u8; 32], &mut b);
        assert_eq!(
            split_startup(&mut b),
            Ok(Some(Startup::Cancel {
                pid: 7,
                key: vec![5u8; 32]
            }))
        );
        let mut b = BytesMut::new();
        encode_cancel(7, &[5u8; 257], &mut b);
        assert!(split_startup(&mut b).is_err());
        // A 3.2 startup, and what a newer one is answered with.
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(PROTOCOL_3_2);
        b.put_slice(b"user\0alice\0_pq_.future\0x\0\0");
        let len = b.len() as i32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        let Ok(Some(Startup::Startup { minor, params })) = split_startup(&mut b) else {
            panic!("a 3.2 startup")
        };
        assert_eq!(minor, 2);
        assert_eq!(negotiate(minor, &params), (2, vec!["_pq_.future".into()]));
        assert_eq!(negotiate(9, &[]), (2, vec![]));
        assert_eq!(negotiate(1, &[]), (0, vec![]));
        assert_eq!(negotiate(0, &[]), (0, vec![]));
        let mut b = BytesMut::new();
        encode_startup(&[("user", "alice"), ("database", "pg")], &mut b);
        let s = split_startup(&mut b).unwrap().unwrap();
        assert_eq!(s.param("database"), Some("pg"));
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(0x0002_0000);
        assert_eq!(
            split_startup(&mut b),
            Err(PgError::Version { major: 2, minor: 0 })
        );
        let mut b = BytesMut::new();
        b.put_i32(1 << 30);
        assert!(split_startup(&mut b).is_err());
    }

    #[test]
    fn bind_and_rows_round_trip() {
        let mut body = BytesMut::new();
        put_cstr(&mut body, "p1");
        put_cstr(&mut body, "s1");
        body.put_i16(1);
        body.put_i16(0);
        body.put_i16(2);
        body.put_i32(2);
        body.put_slice(b"42");
        body.put_i32(-1);
        body.put_i16(0);
        let b = decode_bind(&body.freeze()).unwrap();
        assert_eq!(b.params, vec![Some(Bytes::from_static(b"42")), None]);
        assert_eq!(b.param_format(1), 0);
        let mut out = BytesMut::new();
        let row = vec![Some(Bytes::from_static(b"x")), None];
        encode_data_row(&row, &mut out);
        let f = split_frame(&mut out, Limits::default()).unwrap().unwrap();
        assert_eq!(decode_data_row(&f.body).unwrap(), row);
        // A value length past the end is malformed, not a panic.
        let mut bad = BytesMut::new();
        bad.put_i16(1);
        bad.put_i32(1000);
        assert!(decode_data_row(&bad.freeze()).is_err());
        // Slices agree with the owned decoder, and bad rows are refused.
        let mut out = BytesMut::new();
        let vals = [Some(Bytes::from_static(b"a")), None, Some(Bytes::new())];
        encode_data_row(&vals, &mut out);
        let f = split_frame(&mut out, Limits::default()).unwrap().unwrap();
        let sl = data_row_slices(&f.body).unwrap();
        assert_eq!(sl, vec![Some(&b"a"[..]), None, Some(&b""[..])]);
        assert_eq!(data_row_body(&sl), f.body);
        for bad in [
            &b""[..],
            b"\x00\x01",
            b"\x00\x01\x00\x00\x00\x05ab",
            b"\xff\xff",
            b"\x00\x00x",
            b"\x00\x01\xff\xff\xff\xfe",
        ] {
            assert!(data_row_slices(bad).is_err(), "{bad:?}");
            assert!(data_row_spans(bad, &mut Vec::new()).is_err(), "{bad:?}");
        }
        // Spans point at the same values as the slices (the buffer is reused).
        let mut spans = vec![Some((9, 9))];
        data_row_spans(&f.body, &mut spans).unwrap();
        let from_spans: Vec<Option<&[u8]>> = spans
            .iter()
            .map(|s| s.map(|(at, len)| &f.body[at..at + len]))
            .collect();
        assert_eq!(from_spans, sl);
    }

    #[test]
    fn command_tags() {
        assert_eq!(rows_from_tag("INSERT 0 5"), Some(5));
        assert_eq!(rows_from_tag("UPDATE 3"), Some(3));
        assert_eq!(rows_from_tag("CREATE TABLE"), None);
    }

    proptest::proptest! {
        /// No input makes the decoders panic, and split frames never exceed the limit.
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let limits = Limits { max_message: 256 };
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(f)) = split_frame(&mut buf, limits) {
                proptest::prop_assert!(f.body.len() <= 256);
                let _ = decode_parse(&f.body);
                let _ = decode_bind(&f.body);
                let _ = decode_execute(&f.body);
                let _ = decode_target(&f.body, "Describe");
                let _ = decode_row_description(&f.body);
                let _ = decode_data_row(&f.body);
                let _ = decode_notice(&f.body);
                let _ = decode_backend_key_data(&f.body);
                let _ = decode_cstring(&f.body, "Query");
            }
            let mut buf = BytesMut::from(&data[..]);
            let _ = split_startup(&mut buf);
        }
    }
}
