//! The sans-IO core of the PostgreSQL relay: follows the messages of one
//! session in both directions and says what to record.
//!
//! It tracks prepared statements and portals so that every execution is
//! recorded with its statement text and decoded bind parameters, results as
//! rows (up to a cap, with the cut recorded), and every statement's outcome
//! (CommandComplete tag and rows, or the error).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
    /// The message must not run: an Execute of a statement prepared on an
    /// approval that an earlier execution spent.
    pub refused: Option<String>,
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

impl Caps {
    /// The caps of a resource: the labels `evidence_rows` (a count) and
    /// `evidence_bytes` (bytes, or with a `k`, `m` or `g` suffix for KiB,
    /// MiB, GiB) override the defaults.
    pub fn from_labels(
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut caps = Caps::default();
        if let Some(v) = labels.get("evidence_rows") {
            caps.rows = v
                .trim()
                .parse()
                .map_err(|_| format!("label evidence_rows={v:?} is not a row count"))?;
        }
        if let Some(v) = labels.get("evidence_bytes") {
            let t = v.trim().to_ascii_lowercase();
            let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
                Some((i, _)) => t.split_at(i),
                None => (t.as_str(), ""),
            };
            let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 0,
                "k" => 10,
                "m" => 20,
                "g" => 30,
                _ => return Err(format!("label evidence_bytes={v:?}: unknown unit")),
            };
            caps.bytes = num
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(1 << shift))
                .ok_or_else(|| format!("label evidence_bytes={v:?} is not a size"))?;
        }
        Ok(caps)
    }
}

/// What the server owes, in order, for the client messages forwarded so far
/// (only what tells which columns the next DataRows have). Statements and
/// portals are named by generation (every Parse and Bind makes a new one), so
/// an answer is matched to the message it answers even when the client
/// reuses a name in a pipeline.
#[derive(Debug, Clone, PartialEq)]
enum Owed {
    /// RowDescription or NoData for a prepared statement.
    DescribeStatement(u64),
    /// RowDescription or NoData for a portal.
    DescribePortal(u64),
    /// A portal's rows, ended by CommandComplete, PortalSuspended,
    /// EmptyQueryResponse or an error.
    Execute(Binding),
    /// A simple query (or function call): results, each after its
    /// RowDescription, up to ReadyForQuery; with its text when lineage is
    /// followed (see [`Relay::with_lineage`]).
    Query(Option<Arc<str>>),
    /// ReadyForQuery.
    Sync,
}

/// A portal as bound: its generation, its statement's, and the result
/// formats Bind asked for.
#[derive(Debug, Clone, PartialEq, Default)]
struct Binding {
    portal: u64,
    statement: u64,
    formats: Vec<i16>,
    /// The statement's text, when lineage is followed.
    source: Option<Arc<str>>,
}

/// Described columns kept before the ones nobody refers to are forgotten.
const PRUNE_ABOVE: usize = 64;

/// What a statement's expressions read, as column masking needs to know it
/// (RowDescription does not say where a computed column came from).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Lineage {
    /// It names a masked column, or reads whole rows of a table with masked
    /// columns.
    pub reads_masked: bool,
    /// The relations it reads (lowercase names); views among them may read
    /// masked columns themselves.
    pub relations: Vec<String>,
    /// `reads_masked` for each result column, when those are known to be
    /// exactly the select list's expressions (`None`: use `reads_masked`
    /// for all).
    pub items: Option<Vec<bool>>,
}

/// Works out a statement text's [`Lineage`].
#[derive(Clone)]
struct LineageOf(Arc<dyn Fn(&str) -> Lineage + Send + Sync>);

impl std::fmt::Debug for LineageOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineageOf(..)")
    }
}

/// Statement texts whose lineage is remembered per session (then forgotten
/// all at once).
const LINEAGE_CACHE: usize = 256;

/// Follows one session.
#[derive(Debug, Default)]
pub struct Relay {
    lineage_of: Option<LineageOf>,
    /// Statement text to its lineage (a session repeats its statements).
    lineage_cache: HashMap<String, Arc<Lineage>>,
    /// Text of prepared statements, by generation, when lineage is followed.
    statement_source: HashMap<u64, Arc<str>>,
    /// Text of the statement whose DataRows arrive now.
    current_source: Option<Arc<str>>,
    statements: HashMap<String, String>,
    /// Portal name to (statement text, rendered parameters).
    portals: HashMap<String, (String, Vec<String>)>,
    caps: Caps,
    rows: u64,
    bytes: u64,
    cut: bool,
    owed: VecDeque<Owed>,
    /// The last generation handed out.
    generations: u64,
    /// Statement name to its current generation.
    statement_gen: HashMap<String, u64>,
    /// Portal name to its current binding.
    bound: HashMap<String, Binding>,
    /// Result columns of described statements, by generation.
    statement_columns: HashMap<u64, Vec<pg::Field>>,
    /// Result columns of described portals (formats as the server says), by
    /// generation.
    portal_columns: HashMap<u64, Vec<pg::Field>>,
    /// Statements prepared on an approval (by generation): the approval's
    /// request id, and whether an execution spent it.
    approved_once: HashMap<u64, (u64, bool)>,
    /// Columns of the DataRows arriving now; `None` when unknown.
    current: Option<Vec<pg::Field>>,
    /// Bumped whenever `current` changes.
    generation: u64,
    /// `current` was set for the Execute at the front of `owed`.
    executing: bool,
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
pub fn render_row<T: AsRef<[u8]>>(values: &[Option<T>], formats: &[i16]) -> Vec<u8> {
    let len: usize = values
        .iter()
        .map(|v| 3 + v.as_ref().map_or(0, |b| 2 * b.as_ref().len()))
        .sum();
    let mut out = Vec::with_capacity(len);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        let binary = formats.get(i).copied().unwrap_or(0) == 1;
        match v {
            None => out.extend_from_slice(b"\\N"),
            Some(b) if binary => {
                out.extend_from_slice(format!("\\x{}", hex(b.as_ref())).as_bytes())
            }
            Some(b) => out.extend_from_slice(b.as_ref()),
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
    /// A relay for a session whose server greeting (ending with
    /// ReadyForQuery) is still to come.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            owed: VecDeque::from([Owed::Sync]),
            ..Self::default()
        }
    }

    /// Keeps each statement's text with its results, so what it reads can
    /// be worked out with `lineage_of` when asked ([`Relay::columns_lineage`]:
    /// only results with computed columns need it).
    pub fn with_lineage(
        mut self,
        lineage_of: impl Fn(&str) -> Lineage + Send + Sync + 'static,
    ) -> Self {
        self.lineage_of = Some(LineageOf(Arc::new(lineage_of)));
        self
    }

    /// `sql` kept for [`Relay::columns_lineage`], when lineage is followed.
    fn source(&self, sql: &str) -> Option<Arc<str>> {
        self.lineage_of.as_ref().map(|_| Arc::from(sql))
    }

    fn lineage(&mut self, sql: &str) -> Option<Arc<Lineage>> {
        let f = self.lineage_of.as_ref()?;
        if let Some(known) = self.lineage_cache.get(sql) {
            return Some(known.clone());
        }
        let l = Arc::new((f.0)(sql));
        if self.lineage_cache.len() >= LINEAGE_CACHE {
            self.lineage_cache.clear();
        }
        self.lineage_cache.insert(sql.to_owned(), l.clone());
        Some(l)
    }

    /// The statement `name` (as last parsed) was allowed on approval
    /// `request`, which covers one execution: the first Execute of a portal
    /// bound from it runs, later ones are refused.
    pub fn runs_once(&mut self, name: &str, request: u64) {
        if let Some(g) = self.statement_gen.get(name) {
            self.approved_once.insert(*g, (request, false));
        }
    }

    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    /// Inspects one client message.
    pub fn client(&mut self, f: &Frame) -> Result<ClientStep, PgError> {
        let mut step = ClientStep::default();
        match f.tag {
            ftag::QUERY => {
                let q = pg::decode_cstring(&f.body, "Query")?;
                let source = self.source(&q);
                self.owed.push_back(Owed::Query(source));
                step.statement = Some(q.clone());
                step.events.push(command(q, vec![], "query"));
                step.executes = true;
            }
            ftag::PARSE => {
                let p = pg::decode_parse(&f.body)?;
                step.statement = Some(p.query.clone());
                let g = self.next_generation();
                if let Some(src) = self.source(&p.query) {
                    self.statement_source.insert(g, src);
                }
                self.statement_gen.insert(p.name.clone(), g);
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
                let statement = self.statement_gen.get(&b.statement).copied().unwrap_or(0);
                let binding = Binding {
                    portal: self.next_generation(),
                    statement,
                    formats: b.result_formats,
                    source: self.statement_source.get(&statement).cloned(),
                };
                self.bound.insert(b.portal.clone(), binding);
                self.portals.insert(b.portal, (text, params));
            }
            ftag::EXECUTE => {
                let (portal, _) = pg::decode_execute(&f.body)?;
                let (text, params) = self.portals.get(&portal).cloned().unwrap_or_default();
                let binding = self.bound.get(&portal).cloned().unwrap_or_default();
                if let Some((request, spent)) = self.approved_once.get_mut(&binding.statement) {
                    if *spent {
                        step.refused = Some(format!(
                            "approval request {request} covered one execution of this prepared statement, which has run; prepare it again to ask for another approval"
                        ));
                    }
                    *spent = true;
                }
                self.owed.push_back(Owed::Execute(binding));
                step.events.push(command(text, params, "execute"));
                step.executes = true;
            }
            ftag::CLOSE => {
                let (kind, name) = pg::decode_target(&f.body, "Close")?;
                if kind == b'S' {
                    self.statements.remove(&name);
                    self.statement_gen.remove(&name);
                } else {
                    self.portals.remove(&name);
                    self.bound.remove(&name);
                }
            }
            ftag::DESCRIBE => {
                let (kind, name) = pg::decode_target(&f.body, "Describe")?;
                self.owed.push_back(if kind == b'S' {
                    Owed::DescribeStatement(self.statement_gen.get(&name).copied().unwrap_or(0))
                } else {
                    Owed::DescribePortal(self.bound.get(&name).map_or(0, |b| b.portal))
                });
            }
            ftag::FUNCTION_CALL => {
                // Answered like a simple query: a result, then ReadyForQuery.
                self.owed.push_back(Owed::Query(None));
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
            ftag::SYNC => self.owed.push_back(Owed::Sync),
            ftag::FLUSH | ftag::COPY_DONE => {}
            _ => return Err(PgError::Malformed { what: "frontend" }),
        }
        Ok(step)
    }

    /// Columns of the DataRows arriving now (`None`: unknown), and a number
    /// that changes whenever they do.
    pub fn columns(&self) -> (Option<&[pg::Field]>, u64) {
        (self.current.as_deref(), self.generation)
    }

    /// What the statement behind the current columns reads (`None` without
    /// [`Relay::with_lineage`]); changes only with [`Relay::columns`]' number.
    pub fn columns_lineage(&mut self) -> Option<Arc<Lineage>> {
        let src = self.current_source.clone()?;
        self.lineage(&src)
    }

    /// What the statement the server is answering now reads (`None`
    /// without [`Relay::with_lineage`], or between statements): errors,
    /// notices and notifications arriving now belong to it.
    pub fn answering_lineage(&mut self) -> Option<Arc<Lineage>> {
        let src = match self.owed.front()? {
            Owed::Query(src) => src.clone(),
            Owed::Execute(b) => b.source.clone(),
            Owed::DescribeStatement(g) => self.statement_source.get(g).cloned(),
            Owed::DescribePortal(_) | Owed::Sync => None,
        }?;
        self.lineage(&src)
    }

    fn set_current(&mut self, c: Option<Vec<pg::Field>>, source: Option<Arc<str>>) {
        self.current = c;
        self.current_source = source;
        self.generation += 1;
    }

    /// The result columns of an execution under `b`.
    fn portal_result(&self, b: &Binding) -> Option<Vec<pg::Field>> {
        if let Some(c) = self.portal_columns.get(&b.portal) {
            return Some(c.clone());
        }
        let mut cols = self.statement_columns.get(&b.statement)?.clone();
        for (i, c) in cols.iter_mut().enumerate() {
            c.format = match b.formats.len() {
                0 => 0,
                1 => b.formats[0],
                _ => b.formats.get(i).copied().unwrap_or(0),
            };
        }
        Some(cols)
    }

    /// Forgets the columns of statements and portals that no name and no
    /// pending answer refers to any more.
    fn prune(&mut self) {
        let mut live: std::collections::HashSet<u64> =
            self.statement_gen.values().copied().collect();
        for b in self.bound.values() {
            live.insert(b.portal);
            live.insert(b.statement);
        }
        for o in &self.owed {
            match o {
                Owed::DescribeStatement(g) | Owed::DescribePortal(g) => {
                    live.insert(*g);
                }
                Owed::Execute(b) => {
                    live.insert(b.portal);
                    live.insert(b.statement);
                }
                Owed::Query(_) | Owed::Sync => {}
            }
        }
        self.statement_source.retain(|g, _| live.contains(g));
        self.statement_columns.retain(|g, _| live.contains(g));
        self.portal_columns.retain(|g, _| live.contains(g));
        self.approved_once.retain(|g, _| live.contains(g));
    }

    /// Follows one server message (before it is masked or recorded): keeps
    /// track of which columns the DataRows that follow have.
    ///
    /// A message that does not fit what the server owes is an error: the
    /// gateway would no longer know which columns rows have.
    pub fn track(&mut self, f: &Frame) -> Result<(), PgError> {
        let unexpected = PgError::Malformed {
            what: "server message out of order",
        };
        match f.tag {
            btag::ROW_DESCRIPTION => {
                let fields = pg::decode_row_description(&f.body)?;
                match self.owed.front().cloned() {
                    Some(Owed::DescribeStatement(g)) => {
                        self.statement_columns.insert(g, fields);
                        self.owed.pop_front();
                    }
                    Some(Owed::DescribePortal(g)) => {
                        self.portal_columns.insert(g, fields);
                        self.owed.pop_front();
                    }
                    Some(Owed::Query(source)) => self.set_current(Some(fields), source),
                    _ => return Err(unexpected),
                }
            }
            btag::NO_DATA => match self.owed.front().cloned() {
                Some(Owed::DescribeStatement(g)) => {
                    self.statement_columns.insert(g, Vec::new());
                    self.owed.pop_front();
                }
                Some(Owed::DescribePortal(g)) => {
                    self.portal_columns.insert(g, Vec::new());
                    self.owed.pop_front();
                }
                _ => return Err(unexpected),
            },
            btag::DATA_ROW => match self.owed.front().cloned() {
                Some(Owed::Execute(b)) => {
                    if !self.executing {
                        self.executing = true;
                        let cols = self.portal_result(&b);
                        self.set_current(cols, b.source.clone());
                    }
                }
                Some(Owed::Query(_)) => {}
                _ => return Err(unexpected),
            },
            btag::COPY_IN | btag::COPY_OUT | btag::COPY_BOTH
                if !matches!(self.owed.front(), Some(Owed::Execute(_) | Owed::Query(_))) =>
            {
                return Err(unexpected)
            }
            btag::COMMAND_COMPLETE | btag::PORTAL_SUSPENDED | btag::EMPTY_QUERY => {
                match self.owed.front() {
                    Some(Owed::Execute(_)) => {
                        self.owed.pop_front();
                    }
                    Some(Owed::Query(_)) => {}
                    _ => return Err(unexpected),
                }
                self.executing = false;
                self.set_current(None, None);
            }
            btag::ERROR_RESPONSE => {
                self.executing = false;
                self.set_current(None, None);
                // After an error in an extended sequence the server skips
                // everything up to Sync (simple queries never sit inside one:
                // the gateway refuses that).
                while let Some(o) = self.owed.front() {
                    if matches!(o, Owed::Sync | Owed::Query(_)) {
                        break;
                    }
                    self.owed.pop_front();
                }
            }
            btag::READY_FOR_QUERY => {
                match self.owed.pop_front() {
                    Some(Owed::Sync | Owed::Query(_)) => {}
                    _ => return Err(unexpected),
                }
                self.executing = false;
                self.set_current(None, None);
                if self.statement_columns.len()
                    + self.portal_columns.len()
                    + self.statement_source.len()
                    > PRUNE_ABOVE
                {
                    self.prune();
                }
            }
            _ => {}
        }
        Ok(())
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
    pub fn server(&mut self, f: &Frame) -> Result<Option<ev::event::Kind>, PgError> {
        Ok(match f.tag {
            btag::DATA_ROW if self.cut => None,
            btag::DATA_ROW => {
                let values = pg::data_row_slices(&f.body)?;
                let formats: Vec<i16> = self
                    .current
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.format)
                    .collect();
                self.output("row", render_row(&values, &formats).into())
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
    fn a_statement_prepared_on_an_approval_runs_once() {
        let mut r = Relay::default();
        r.client(&parse("held", "delete from t")).unwrap();
        r.runs_once("held", 7);
        r.client(&parse("other", "select 1")).unwrap();
        let run = |r: &mut Relay, statement: &str, portal: &str| {
            r.client(&bind(portal, statement, &[])).unwrap();
            r.client(&execute(portal)).unwrap().refused
        };
        assert_eq!(run(&mut r, "held", ""), None);
        // Again, through another portal too: refused, with the request named.
        let again = run(&mut r, "held", "p2").expect("a second execution is refused");
        assert!(again.contains("approval request 7"), "{again}");
        assert!(run(&mut r, "held", "").is_some());
        // Other statements are not limited.
        assert_eq!(run(&mut r, "other", ""), None);
        assert_eq!(run(&mut r, "other", ""), None);
        // Parsed again (checked again by the gateway), the name starts over.
        r.client(&parse("held", "delete from t")).unwrap();
        assert_eq!(run(&mut r, "held", ""), None);
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
        let got: Vec<_> = (0..4).map(|_| r.server(&f).unwrap()).collect();
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

    /// A RowDescription of `(name, type oid, format)` columns.
    fn row_description(cols: &[(&str, i32, i16)]) -> Frame {
        let mut b = BytesMut::new();
        b.put_i16(cols.len() as i16);
        for (name, oid, format) in cols {
            cstr(&mut b, name);
            b.put_i32(16384);
            b.put_i16(1);
            b.put_i32(*oid);
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(*format);
        }
        frame(btag::ROW_DESCRIPTION, b)
    }

    fn target(tag: u8, kind: u8, name: &str) -> Frame {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        cstr(&mut b, name);
        frame(tag, b)
    }

    fn bind(portal: &str, statement: &str, result_formats: &[i16]) -> Frame {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(result_formats.len() as i16);
        for f in result_formats {
            b.put_i16(*f);
        }
        frame(ftag::BIND, b)
    }

    fn execute(portal: &str) -> Frame {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        b.put_i32(0);
        frame(ftag::EXECUTE, b)
    }

    fn parse(name: &str, sql: &str) -> Frame {
        let mut b = BytesMut::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.put_i16(0);
        frame(ftag::PARSE, b)
    }

    fn data_row() -> Frame {
        let mut out = BytesMut::new();
        pg::encode_data_row(&[Some(Bytes::from_static(b"x"))], &mut out);
        pg::split_frame(&mut out, pg::Limits::default())
            .unwrap()
            .unwrap()
    }

    fn tag_only(tag: u8, body: &[u8]) -> Frame {
        frame(tag, BytesMut::from(body))
    }

    fn names(r: &Relay) -> Option<Vec<(String, i16)>> {
        r.columns()
            .0
            .map(|c| c.iter().map(|f| (f.name.clone(), f.format)).collect())
    }

    #[test]
    fn rows_of_a_prepared_statement_get_its_columns_and_the_bind_formats() {
        let mut r = Relay::default();
        // tokio-postgres style: prepare two statements (Parse, Describe S,
        // Sync), then execute the first without describing it again.
        for name in ["s1", "s2"] {
            r.client(&parse(name, "select")).unwrap();
            r.client(&target(ftag::DESCRIBE, b'S', name)).unwrap();
            r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        }
        for col in ["card", "other"] {
            r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
            r.track(&tag_only(btag::PARAMETER_DESCRIPTION, b"\0\0"))
                .unwrap();
            r.track(&row_description(&[(col, 25, 0)])).unwrap();
            r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        }
        r.client(&bind("", "s1", &[1])).unwrap();
        r.client(&execute("")).unwrap();
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
        assert_eq!(names(&r), None, "no rows yet");
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("card".into(), 1)]));
        r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
            .unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        assert_eq!(names(&r), None);
        // A simple query's own RowDescription.
        r.client(&tag_only(ftag::QUERY, b"select 1\0")).unwrap();
        r.track(&row_description(&[("n", 23, 0)])).unwrap();
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("n".into(), 0)]));
    }

    #[test]
    fn rows_of_statements_reading_masked_columns_are_marked() {
        let mut r = Relay::default().with_lineage(|sql| Lineage {
            reads_masked: sql.contains("card"),
            ..Default::default()
        });
        let rows = |r: &mut Relay| {
            r.track(&data_row()).unwrap();
            let tainted = r.columns_lineage().unwrap().reads_masked;
            r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
                .unwrap();
            tainted
        };
        // Simple queries.
        for (sql, want) in [("select upper(card)\0", true), ("select 1\0", false)] {
            r.client(&tag_only(ftag::QUERY, sql.as_bytes())).unwrap();
            r.track(&row_description(&[("x", 25, 0)])).unwrap();
            assert_eq!(rows(&mut r), want, "{sql}");
            r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        }
        // A name reused in a pipeline: each execution keeps its statement's
        // mark.
        for sql in ["select md5(card)", "select 2"] {
            r.client(&parse("s", sql)).unwrap();
            r.client(&target(ftag::DESCRIBE, b'S', "s")).unwrap();
            r.client(&bind("", "s", &[])).unwrap();
            r.client(&execute("")).unwrap();
        }
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        for want in [true, false] {
            r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
            r.track(&row_description(&[("x", 25, 0)])).unwrap();
            r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
            assert_eq!(rows(&mut r), want);
        }
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        assert!(r.columns_lineage().is_none());
        // Errors belong to the statement being answered.
        r.client(&tag_only(ftag::QUERY, b"select card::int\0"))
            .unwrap();
        assert!(r.answering_lineage().is_some_and(|l| l.reads_masked));
        r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        assert!(r.answering_lineage().is_none());
        // Without a lineage check nothing is known.
        let mut plain = Relay::default();
        plain
            .client(&tag_only(ftag::QUERY, b"select card\0"))
            .unwrap();
        plain.track(&row_description(&[("x", 25, 0)])).unwrap();
        plain.track(&data_row()).unwrap();
        assert!(plain.columns_lineage().is_none());
    }

    #[test]
    fn an_error_skips_to_sync_and_a_refused_query_is_owed_nothing() {
        let mut r = Relay::default();
        r.client(&parse("", "select")).unwrap();
        r.client(&bind("", "", &[])).unwrap();
        r.client(&target(ftag::DESCRIBE, b'P', "")).unwrap();
        r.client(&execute("")).unwrap();
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        r.client(&parse("", "select")).unwrap();
        r.client(&bind("", "", &[])).unwrap();
        r.client(&target(ftag::DESCRIBE, b'P', "")).unwrap();
        r.client(&execute("")).unwrap();
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        // The first sequence fails at Parse: its Describe and Execute are
        // skipped by the server.
        r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        r.track(&row_description(&[("second", 25, 0)])).unwrap();
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("second".into(), 0)]));
        r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
            .unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        // A refused query goes to the server as a stand-in that fails.
        r.client(&tag_only(ftag::QUERY, b"delete from t\0"))
            .unwrap();
        r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        r.client(&tag_only(ftag::QUERY, b"select 1\0")).unwrap();
        r.track(&row_description(&[("n", 23, 0)])).unwrap();
        r.track(&data_row()).unwrap();
        r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
            .unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        assert!(r.owed.is_empty(), "{:?}", r.owed);
        r.prune();
        assert!(
            r.statement_columns.is_empty() && r.portal_columns.len() <= 1,
            "columns nobody refers to are forgotten"
        );
    }

    #[test]
    fn a_reused_name_in_a_pipeline_keeps_each_answer_with_its_message() {
        let mut r = Relay::default();
        // Parse A and describe it, then re-parse the same (unnamed) name as B
        // and execute B, all before the server answers anything.
        r.client(&parse("", "select 'x' as note")).unwrap();
        r.client(&target(ftag::DESCRIBE, b'S', "")).unwrap();
        r.client(&parse("", "select secret from t")).unwrap();
        r.client(&target(ftag::DESCRIBE, b'S', "")).unwrap();
        r.client(&bind("", "", &[])).unwrap();
        r.client(&execute("")).unwrap();
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        r.track(&row_description(&[("note", 25, 0)])).unwrap();
        r.track(&row_description(&[("secret", 25, 0)])).unwrap();
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("secret".into(), 0)]));
        r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
            .unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        // Two executions of the same portal name bound to different
        // statements, pipelined: each gets its own binding's columns.
        for (name, col) in [("a", "secret"), ("b", "harmless")] {
            r.client(&parse(name, "select")).unwrap();
            r.client(&target(ftag::DESCRIBE, b'S', name)).unwrap();
            r.client(&tag_only(ftag::SYNC, b"")).unwrap();
            r.track(&row_description(&[(col, 25, 0)])).unwrap();
            r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        }
        r.client(&bind("p", "a", &[1])).unwrap();
        r.client(&execute("p")).unwrap();
        r.client(&bind("p", "b", &[0])).unwrap();
        r.client(&execute("p")).unwrap();
        r.client(&tag_only(ftag::SYNC, b"")).unwrap();
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("secret".into(), 1)]));
        r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
            .unwrap();
        r.track(&data_row()).unwrap();
        assert_eq!(names(&r), Some(vec![("harmless".into(), 0)]));
    }

    #[test]
    fn statement_texts_do_not_pile_up() {
        let mut r = Relay::default().with_lineage(|_| Lineage::default());
        for i in 0..1000 {
            // Parse/Bind/Execute/Sync with no Describe, a new name each time.
            let name = format!("s{i}");
            r.client(&parse(&name, "select 1")).unwrap();
            r.client(&tag_only(ftag::CLOSE, format!("S{name}\0").as_bytes()))
                .unwrap();
            r.client(&tag_only(ftag::SYNC, b"")).unwrap();
            r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
            r.track(&tag_only(btag::CLOSE_COMPLETE, b"")).unwrap();
            r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        }
        assert!(r.statement_source.len() <= PRUNE_ABOVE + 1);
    }

    #[test]
    fn described_columns_do_not_pile_up() {
        let mut r = Relay::default();
        for _ in 0..500 {
            r.client(&parse("", "select")).unwrap();
            r.client(&target(ftag::DESCRIBE, b'S', "")).unwrap();
            r.client(&tag_only(ftag::SYNC, b"")).unwrap();
            r.track(&row_description(&[("x", 25, 0)])).unwrap();
            r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        }
        assert!(r.statement_columns.len() <= PRUNE_ABOVE + 1);
    }

    #[test]
    fn server_messages_out_of_order_are_refused() {
        let mut r = Relay::new(Caps::default());
        // The greeting's ReadyForQuery is expected; a second one is not.
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
        assert!(r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).is_err());
        for f in [
            data_row(),
            row_description(&[("x", 25, 0)]),
            tag_only(btag::NO_DATA, b""),
            tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"),
        ] {
            assert!(Relay::default().track(&f).is_err(), "{f:?}");
        }
        // Errors may come at any time (a FATAL one, for instance).
        assert!(Relay::default()
            .track(&tag_only(btag::ERROR_RESPONSE, b"\0"))
            .is_ok());
    }

    #[test]
    fn caps_come_from_the_resource_labels() {
        let l = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let c = Caps::from_labels(&l(&[])).unwrap();
        assert_eq!((c.rows, c.bytes), (100_000, 16 << 20));
        let c =
            Caps::from_labels(&l(&[("evidence_rows", "10"), ("evidence_bytes", "4MiB")])).unwrap();
        assert_eq!((c.rows, c.bytes), (10, 4 << 20));
        assert_eq!(
            Caps::from_labels(&l(&[("evidence_bytes", "512")]))
                .unwrap()
                .bytes,
            512
        );
        for bad in [
            ("evidence_rows", "many"),
            ("evidence_bytes", "3 parsecs"),
            ("evidence_bytes", "k"),
        ] {
            assert!(Caps::from_labels(&l(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn outcomes_and_garbage() {
        let mut r = Relay::default();
        let mut c = BytesMut::new();
        cstr(&mut c, "DELETE 3");
        let o = r.server(&frame(btag::COMMAND_COMPLETE, c)).unwrap();
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
