//! The function-call protocol (libpq's fastpath: `FunctionCall` by OID,
//! which psql's `\lo_import`, `\lo_export` and `\lo_unlink` use). Each call
//! is recorded by the function's name (from the catalog) and arguments.
//! Sessions without guardrails or masking run it as the server would;
//! under rules, the large-object functions are judged as the SQL call of the
//! same function would be (read or write), and any other call is refused,
//! as is every call under column masking.

use std::collections::HashMap;

use super::*;

/// Large-object functions judged like their SQL calls under rules.
const LARGE_OBJECT: [&str; 17] = [
    "lo_open",
    "lo_close",
    "loread",
    "lowrite",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
    "lo_truncate",
    "lo_truncate64",
    "lo_creat",
    "lo_create",
    "lo_unlink",
    "lo_get",
    "lo_put",
    "lo_from_bytea",
    "lo_export",
];

/// The most argument bytes the evidence shows as a value.
const SHOWN_ARG_BYTES: usize = 64;

/// A decoded `FunctionCall`: the function's OID and its arguments as the
/// evidence shows them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Call {
    pub oid: u32,
    pub args: Vec<String>,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], pg::PgError> {
    if b.len() < n {
        return Err(pg::PgError::Malformed {
            what: "FunctionCall",
        });
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn int16(b: &mut &[u8]) -> Result<i16, pg::PgError> {
    Ok(i16::from_be_bytes(
        take(b, 2)?.try_into().unwrap_or_default(),
    ))
}

fn int32(b: &mut &[u8]) -> Result<i32, pg::PgError> {
    Ok(i32::from_be_bytes(
        take(b, 4)?.try_into().unwrap_or_default(),
    ))
}

/// Decodes a `FunctionCall` body.
pub(super) fn decode(body: &[u8]) -> Result<Call, pg::PgError> {
    let mut b = body;
    let oid = int32(&mut b)? as u32;
    let nformats = int16(&mut b)?.max(0) as usize;
    let formats = (0..nformats)
        .map(|_| int16(&mut b))
        .collect::<Result<Vec<_>, _>>()?;
    let nargs = int16(&mut b)?.max(0) as usize;
    let mut args = Vec::with_capacity(nargs);
    for i in 0..nargs {
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(i).copied() == Some(1),
        };
        let len = int32(&mut b)?;
        if len < 0 {
            args.push("NULL".to_owned());
            continue;
        }
        let v = take(&mut b, len as usize)?;
        args.push(show_arg(v, binary));
    }
    Ok(Call { oid, args })
}

fn show_arg(v: &[u8], binary: bool) -> String {
    match (binary, v.len()) {
        (true, 4) => i32::from_be_bytes(v.try_into().unwrap_or_default()).to_string(),
        (true, 8) => i64::from_be_bytes(v.try_into().unwrap_or_default()).to_string(),
        (false, n) if n <= SHOWN_ARG_BYTES => match std::str::from_utf8(v) {
            Ok(s) => format!("'{}'", s.replace('\'', "''")),
            Err(_) => format!("<{n} bytes>"),
        },
        (_, n) => format!("<{n} bytes>"),
    }
}

impl<E: Engine> PgGateway<E> {
    /// The name (`schema.name`) of the function with `oid`, from the
    /// session's cache or the catalog; `None` when it cannot be told.
    pub(super) async fn function_name(
        &self,
        oid: u32,
        known: &mut HashMap<u32, String>,
        a: &Authorized,
        session: &str,
    ) -> Option<String> {
        if let Some(n) = known.get(&oid) {
            return Some(n.clone());
        }
        let name = self
            .catalog_lookup(a, session, |ch| catalog::lookup_function(ch, oid))
            .await
            .flatten()?;
        known.insert(oid, name.clone());
        Some(name)
    }

    /// Judges a function call in a session with rules: `Ok` to run it (with
    /// the approval it runs on), `Err` why not.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn check_function_call<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        name: Option<&str>,
        call: &Call,
        session: &str,
        a: &Authorized,
        evq: &mut Vec<ev::event::Kind>,
        client: &mut S,
        cbuf: &mut BytesMut,
    ) -> Result<Option<u64>, Refusal> {
        if a.masker.has_column_rules() {
            return Err("the function-call protocol is refused under column masking; use SELECT (results are masked)".into());
        }
        let bare = name.map(|n| n.rsplit('.').next().unwrap_or(n));
        match bare.filter(|n| LARGE_OBJECT.contains(n)) {
            // Judged as `SELECT pg_catalog.lowrite($1, $2)` would be.
            Some(f) => {
                let params: Vec<String> = (1..=call.args.len()).map(|i| format!("${i}")).collect();
                let sql = format!("SELECT pg_catalog.{f}({})", params.join(", "));
                self.check_statement(&sql, session, true, None, None, a, evq, client, cbuf)
                    .await
            }
            None => Err(format!(
                "the function-call protocol is available through the gateway only for large objects under rules, not for {}; use SELECT",
                name.unwrap_or("a function the gateway could not look up")
            )
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_decode_with_their_arguments() {
        let mut body = 955i32.to_be_bytes().to_vec(); // lowrite
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes()); // all binary
        body.extend_from_slice(&3i16.to_be_bytes());
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&7i32.to_be_bytes());
        body.extend_from_slice(&100i32.to_be_bytes());
        body.extend_from_slice(&[0u8; 100]);
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        let c = decode(&body).unwrap();
        assert_eq!(c.oid, 955);
        assert_eq!(c.args, ["7", "<100 bytes>", "NULL"]);
        assert!(decode(&body[..20]).is_err());
        assert_eq!(show_arg(b"it's", false), "'it''s'");
    }
}
