//! The sans-IO core of the PostgreSQL relay: follows the messages of one
//! session in both directions and says what to record.
//!
//! It tracks prepared statements and portals so that every execution is
//! recorded with its statement text and decoded bind parameters, results as
//! rows (up to a cap, with the cut recorded), and every statement's outcome
//! (CommandComplete tag and rows, or the error).

use std::collections::HashMap;

use bytes::Bytes;

use custody_proto::evidence::v1 as ev;
use custody_proto::export::hex;
use custody_proto::pg::{self, btag, ftag, Frame, PgError};

/// What the relay should do with one client message.
#[derive(Debug, Default, PartialEq)]
pub struct ClientStep {
    /// Events to record before the message is forwarded.
    pub events: Vec<ev::event::Kind>,
    /// The message makes the server execute something: in strict mode the
    /// events must be committed before it is forwarded.
    pub executes: bool,
    /// The client said goodbye.
    pub terminate: bool,
    /// SQL the message asks the server to prepare or run (Query, Parse),
    /// for guardrails.
    pub statement: Option<String>,
}

/// Per-session recording caps for results.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub rows: u64,
    pub bytes: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            rows: 100_000,
            bytes: 16 << 20,
        }
    }
}

/// Follows one session.
#[derive(Debug, Default)]
pub struct Relay {
    statements: HashMap<String, String>,
    /// Portal name to (statement text, rendered parameters).
    portals: HashMap<String, (String, Vec<String>)>,
    caps: Caps,
    rows: u64,
    bytes: u64,
    cut: bool,
}

/// A parameter as evidence text: text format as is, binary as `\x` hex.
fn render_param(v: &Option<Bytes>, format: i16) -> String {
    match v {
        None => "NULL".into(),
        Some(b) if format == 0 => String::from_utf8_lossy(b).into_owned(),
        Some(b) => format!("\\x{}", hex(b)),
    }
}

/// A row as evidence text: values tab-separated, NULL as `\N`, binary-format
/// values as `\x` hex.
pub fn render_row(values: &[Option<Bytes>], formats: &[i16]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let binary = formats.get(i).copied().unwrap_or(0) == 1;
        match v {
            None => out.extend_from_slice(b"\\N"),
            Some(b) if binary => out.extend_from_slice(format!("\\x{}", hex(b)).as_bytes()),
            Some(b) => out.extend_from_slice(b),
        }
    }
    out
}

fn command(text: String, params: Vec<String>, verb: &str) -> ev::event::Kind {
    ev::event::Kind::Command(ev::CommandEvent {
        text,
        argv: vec![],
        params,
        verb: verb.into(),
    })
}

impl Relay {
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            ..Self::default()
        }
    }

    /// Inspects one client message.
    pub fn client(&mut self, f: &Frame) -> Result<ClientStep, PgError> {
        let mut step = ClientStep::default();
        match f.tag {
            ftag::QUERY => {
                let q = pg::decode_cstring(&f.body, "Query")?;
                step.statement = Some(q.clone());
                step.events.push(command(q, vec![], "query"));
                step.executes = true;
            }
            ftag::PARSE => {
                let p = pg::decode_parse(&f.body)?;
                step.statement = Some(p.query.clone());
                self.statements.insert(p.name, p.query);
            }
            ftag::BIND => {
                let b = pg::decode_bind(&f.body)?;
                let text = self
                    .statements
                    .get(&b.statement)
                    .cloned()
                    .unwrap_or_default();
                let params = b
                    .params
                    .iter()
                    .enumerate()
                    .map(|(i, v)| render_param(v, b.param_format(i)))
                    .collect();
                self.portals.insert(b.portal, (text, params));
            }
            ftag::EXECUTE => {
                let (portal, _) = pg::decode_execute(&f.body)?;
                let (text, params) = self.portals.get(&portal).cloned().unwrap_or_default();
                step.events.push(command(text, params, "execute"));
                step.executes = true;
            }
            ftag::CLOSE => {
                let (kind, name) = pg::decode_target(&f.body, "Close")?;
                if kind == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            ftag::DESCRIBE => {
                pg::decode_target(&f.body, "Describe")?;
            }
            ftag::FUNCTION_CALL => {
                step.events
                    .push(command("(function call)".into(), vec![], "function_call"));
                step.executes = true;
            }
            ftag::COPY_DATA => {
                if let Some(e) = self.output("copy_in", f.body.clone()) {
                    step.events.push(e);
                }
            }
            ftag::COPY_FAIL => {
                let why = pg::decode_cstring(&f.body, "CopyFail")?;
                step.events.push(ev::event::Kind::Outcome(ev::Outcome {
                    exit_code: 1,
                    error: format!("client aborted COPY: {why}"),
                    ..Default::default()
                }));
            }
            ftag::TERMINATE => step.terminate = true,
            ftag::SYNC | ftag::FLUSH | ftag::COPY_DONE => {}
            _ => return Err(PgError::Malformed { what: "frontend" }),
        }
        Ok(step)
    }

    /// Records `data` as output unless the cap is reached (the cut is
    /// recorded once).
    fn output(&mut self, stream: &str, data: Bytes) -> Option<ev::event::Kind> {
        if self.cut {
            return None;
        }
        self.rows += 1;
        self.bytes += data.len() as u64;
        if self.rows > self.caps.rows || self.bytes > self.caps.bytes {
            self.cut = true;
            return Some(ev::event::Kind::Output(ev::Output {
                stream: stream.into(),
                data: Bytes::new(),
                truncated: true,
            }));
        }
        Some(ev::event::Kind::Output(ev::Output {
            stream: stream.into(),
            data,
            truncated: false,
        }))
    }

    /// Inspects one server message; returns the events to record before it
    /// reaches the client. `formats` are the current result column formats.
    pub fn server(
        &mut self,
        f: &Frame,
        formats: &[i16],
    ) -> Result<Option<ev::event::Kind>, PgError> {
        Ok(match f.tag {
            btag::DATA_ROW => {
                let values = pg::decode_data_row(&f.body)?;
                self.output("row", render_row(&values, formats).into())
            }
            btag::COPY_DATA => self.output("copy_out", f.body.clone()),
            btag::COMMAND_COMPLETE => {
                let tag = pg::decode_cstring(&f.body, "CommandComplete")?;
                Some(ev::event::Kind::Outcome(ev::Outcome {
                    rows: pg::rows_from_tag(&tag).unwrap_or(0),
                    tag,
                    ..Default::default()
                }))
            }
            btag::EMPTY_QUERY => Some(ev::event::Kind::Outcome(ev::Outcome {
                tag: "EMPTY".into(),
                ..Default::default()
            })),
            btag::ERROR_RESPONSE => {
                let n = pg::decode_notice(&f.body)?;
                Some(ev::event::Kind::Outcome(ev::Outcome {
                    exit_code: 1,
                    error: n.summary(),
                    ..Default::default()
                }))
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut as _, BytesMut};

    fn frame(tag: u8, body: BytesMut) -> Frame {
        Frame {
            tag,
            body: body.freeze(),
        }
    }

    fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    #[test]
    fn executions_carry_their_statement_and_parameters() {
        let mut r = Relay::default();
        let mut p = BytesMut::new();
        cstr(&mut p, "s1");
        cstr(&mut p, "select * from t where id = $1 and tag = $2");
        p.put_i16(0);
        assert!(r.client(&frame(ftag::PARSE, p)).unwrap().events.is_empty());
        let mut b = BytesMut::new();
        cstr(&mut b, "");
        cstr(&mut b, "s1");
        b.put_i16(2);
        b.put_i16(0);
        b.put_i16(1);
        b.put_i16(2);
        b.put_i32(2);
        b.put_slice(b"42");
        b.put_i32(2);
        b.put_slice(&[0xde, 0xad]);
        b.put_i16(0);
        r.client(&frame(ftag::BIND, b)).unwrap();
        let mut e = BytesMut::new();
        cstr(&mut e, "");
        e.put_i32(0);
        let step = r.client(&frame(ftag::EXECUTE, e)).unwrap();
        assert!(step.executes);
        assert_eq!(
            step.events,
            vec![command(
                "select * from t where id = $1 and tag = $2".into(),
                vec!["42".into(), "\\xdead".into()],
                "execute"
            )]
        );
    }

    #[test]
    fn rows_are_capped_and_the_cut_recorded_once() {
        let mut r = Relay::new(Caps {
            rows: 2,
            bytes: 1 << 20,
        });
        let mut out = BytesMut::new();
        pg::encode_data_row(&[Some(Bytes::from_static(b"a")), None], &mut out);
        let f = pg::split_frame(&mut out, pg::Limits::default())
            .unwrap()
            .unwrap();
        let got: Vec<_> = (0..4).map(|_| r.server(&f, &[0, 0]).unwrap()).collect();
        let row = |data: &'static [u8], truncated| {
            Some(ev::event::Kind::Output(ev::Output {
                stream: "row".into(),
                data: Bytes::from_static(data),
                truncated,
            }))
        };
        assert_eq!(
            got,
            vec![
                row(b"a\t\\N", false),
                row(b"a\t\\N", false),
                row(b"", true),
                None
            ]
        );
    }

    #[test]
    fn outcomes_and_garbage() {
        let mut r = Relay::default();
        let mut c = BytesMut::new();
        cstr(&mut c, "DELETE 3");
        let o = r.server(&frame(btag::COMMAND_COMPLETE, c), &[]).unwrap();
        assert!(matches!(
            o,
            Some(ev::event::Kind::Outcome(ev::Outcome { rows: 3, .. }))
        ));
        assert!(r.client(&frame(b'?', BytesMut::new())).is_err());
        assert!(r
            .client(&frame(ftag::QUERY, BytesMut::from(&b"no nul"[..])))
            .is_err());
    }
}
