//! A minimal PostgreSQL simple-query client over any byte stream, for a
//! session the gateway has already let in: `custody exec --sql` over TLS, and
//! the coordinator's own MCP tools over an in-memory stream.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::pg::{self, btag, Frame, Limits};

/// Why a query could not be run.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway or the server refused the session.
    #[error("{0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The result of one simple query.
#[derive(Debug, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    /// Text values; `None` is NULL.
    pub rows: Vec<Vec<Option<String>>>,
    pub tags: Vec<String>,
    pub notices: Vec<String>,
    /// The error response's message and SQLSTATE.
    pub error: Option<String>,
    /// Rows beyond the caller's cap were read and dropped.
    pub truncated: bool,
    /// How many rows the server returned (kept or not).
    pub total_rows: u64,
}

/// How much of a result a caller keeps.
#[derive(Debug, Clone, Copy)]
pub struct Cap {
    pub rows: usize,
    pub bytes: usize,
}

impl Default for Cap {
    fn default() -> Self {
        Cap {
            rows: usize::MAX,
            bytes: usize::MAX,
        }
    }
}

/// Reads one frame, buffering in `buf`.
pub async fn read_frame<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<Frame, ClientError> {
    loop {
        if let Some(f) = pg::split_frame(buf, Limits::default())
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            return Ok(f);
        }
        if s.read_buf(buf)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            == 0
        {
            return Err(ClientError::Protocol(
                "the gateway closed the connection".into(),
            ));
        }
    }
}

/// An ErrorResponse as a refusal.
pub fn refusal(f: &Frame) -> ClientError {
    match pg::decode_notice(&f.body) {
        Ok(n) => ClientError::Refused(n.get(b'M').unwrap_or("").to_owned()),
        Err(e) => ClientError::Protocol(e.to_string()),
    }
}

/// Writes and flushes (TLS may hold the tail of a write until flushed).
pub async fn write_flush<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> Result<(), ClientError> {
    s.write_all(b)
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    s.flush()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Reads the authentication result and the server's greeting, up to the
/// first ReadyForQuery.
pub async fn greeting<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<(), ClientError> {
    loop {
        let f = read_frame(s, buf).await?;
        match f.tag {
            btag::ERROR_RESPONSE => return Err(refusal(&f)),
            btag::READY_FOR_QUERY => return Ok(()),
            _ => {}
        }
    }
}

/// Runs `sql` with the simple query protocol, keeping rows up to `cap`
/// (the rest is read and counted), then ends the session.
pub async fn simple_query<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    sql: &str,
    cap: Cap,
) -> Result<QueryResult, ClientError> {
    let mut out = BytesMut::new();
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    pg::encode_frame(pg::ftag::QUERY, &body, &mut out);
    write_flush(s, &out).await?;
    let mut r = QueryResult::default();
    let mut kept_bytes = 0usize;
    loop {
        let f = read_frame(s, buf).await?;
        match f.tag {
            btag::ROW_DESCRIPTION => {
                r.columns = pg::decode_row_description(&f.body)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?
                    .into_iter()
                    .map(|c| c.name)
                    .collect();
            }
            btag::DATA_ROW => {
                r.total_rows += 1;
                if r.truncated || r.rows.len() >= cap.rows || kept_bytes + f.body.len() > cap.bytes
                {
                    r.truncated = true;
                    continue;
                }
                kept_bytes += f.body.len();
                r.rows.push(
                    pg::decode_data_row(&f.body)
                        .map_err(|e| ClientError::Protocol(e.to_string()))?
                        .into_iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                        .collect(),
                )
            }
            btag::COMMAND_COMPLETE => r
                .tags
                .push(pg::decode_cstring(&f.body, "CommandComplete").unwrap_or_default()),
            btag::NOTICE_RESPONSE => {
                if let Ok(n) = pg::decode_notice(&f.body) {
                    r.notices.push(n.get(b'M').unwrap_or("").to_owned());
                }
            }
            btag::ERROR_RESPONSE => {
                let n =
                    pg::decode_notice(&f.body).map_err(|e| ClientError::Protocol(e.to_string()))?;
                r.error = Some(format!(
                    "{} ({})",
                    n.get(b'M').unwrap_or(""),
                    n.get(b'C').unwrap_or("")
                ));
            }
            btag::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    out.clear();
    pg::encode_frame(pg::ftag::TERMINATE, &[], &mut out);
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
    Ok(r)
}
