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
    /// The text of the statement a Bind binds (when the gateway knows it).
    pub bound: Option<Arc<str>>,
    /// The statement name a Parse prepares.
    pub prepared_as: Option<String>,
    /// The message must not run (why): a name the gateway does not know or
    /// that already exists, or a second Bind of a statement prepared on an
    /// approval.
    pub refused: Option<String>,
    /// After this Execute the statement prepared on an approval must be
    /// closed at the server ([`Relay::close_statement`]): its one execution
    /// has run.
    pub close_statement: Option<String>,
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
    /// The same, for a Describe the gateway sent itself before an Execute
    /// (the rows' true columns, for masking): the answer is not the
    /// client's.
    Shape(u64),
    /// A portal's rows, ended by CommandComplete, PortalSuspended,
    /// EmptyQueryResponse or an error.
    Execute(Binding),
    /// A simple query (or function call): results, each after its
    /// RowDescription, up to ReadyForQuery; with its text when lineage is
    /// followed (see [`Relay::with_lineage`]).
    Query(Option<Arc<str>>),
    /// ReadyForQuery.
    Sync,
    /// ParseComplete, BindComplete or CloseComplete (the tag): the server
    /// applied the message. Skipped after an error, it did not, and `Undo`
    /// puts the name back as it was. Set: the message was the gateway's own
    /// (its answer is not the client's).
    Done(u8, Undo, bool),
}

/// A name as it was before a Parse, Bind or Close changed it.
#[derive(Debug, Clone, PartialEq)]
enum Undo {
    Statement(Change<Prepared>),
    Portal(Change<Portal>),
}

/// One name's change: what was there before, and what the message put
/// there (a generation; `None`: nothing).
#[derive(Debug, Clone, PartialEq)]
struct Change<T> {
    name: String,
    before: Option<T>,
    installed: Option<u64>,
}

/// A prepared statement as the server has it: its generation and text.
#[derive(Debug, Clone, PartialEq)]
struct Prepared {
    generation: u64,
    text: Arc<str>,
    /// The text holds SQL `DEALLOCATE` or `DISCARD ALL`.
    deallocates: bool,
}

/// A portal: its binding, its statement's text and its rendered parameters.
#[derive(Debug, Clone, PartialEq)]
struct Portal {
    binding: Binding,
    text: Arc<str>,
    params: Vec<String>,
    deallocates: bool,
}

/// Prepared statements, and portals, a session may hold at once through the
/// gateway (each is kept with its text; PostgreSQL itself sets no limit).
pub const MAX_NAMES: usize = 10_000;

/// Evidence text of an execution whose statement the gateway did not see
/// prepared (SQL `PREPARE`, or a name the server does not have).
const UNSEEN: &str = "(a statement the gateway did not see prepared)";

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
    /// Prepared statements by name, as the server has them once what it
    /// owes is answered.
    statements: HashMap<String, Prepared>,
    /// Portals by name.
    portals: HashMap<String, Portal>,
    caps: Caps,
    rows: u64,
    bytes: u64,
    cut: bool,
    owed: VecDeque<Owed>,
    /// The last generation handed out.
    generations: u64,
    /// Result columns of described statements, by generation.
    statement_columns: HashMap<u64, Vec<pg::Field>>,
    /// Result columns of described portals (formats as the server says), by
    /// generation.
    portal_columns: HashMap<u64, Vec<pg::Field>>,
    /// Statements prepared on an approval (by generation): the approval's
    /// request id, and whether an execution spent it.
    approved_once: HashMap<u64, (u64, bool)>,
    /// The generation the last Parse gave its name (`None`: it changes
    /// nothing, the server refuses it).
    last_parsed: Option<u64>,
    /// Portals bound from a statement prepared on an approval (by
    /// generation): the statement's name and generation, closed after the
    /// portal's Execute (unless the client replaced it meanwhile).
    closing: HashMap<u64, (String, u64)>,
    /// Statements closed after their one approved execution: name to the
    /// approval request (for the refusal of a later Bind).
    closed_on_approval: HashMap<String, u64>,
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

/// Puts `c.before` back under its name if what `c` installed is still
/// there; otherwise returns `c` (a later change replaced it).
fn put_back<T>(
    names: &mut HashMap<String, T>,
    c: Change<T>,
    id: impl Fn(&T) -> u64,
) -> Option<Change<T>> {
    if names.get(&c.name).map(id) != c.installed {
        return Some(c);
    }
    match c.before {
        Some(v) => names.insert(c.name, v),
        None => names.remove(&c.name),
    };
    None
}

/// Hands what `c` found under its name to the next change of that name
/// still owed (of a sequence already sent): that one found it too, since
/// `c` never happened.
fn pass_on<T>(
    owed: &mut VecDeque<Owed>,
    c: Change<T>,
    pick: impl Fn(&mut Owed) -> Option<&mut Change<T>>,
) {
    if let Some(later) = owed.iter_mut().filter_map(pick).find(|l| l.name == c.name) {
        later.before = c.before;
    }
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

    /// Forgets prepared statements SQL removed (`DEALLOCATE`, `DISCARD`):
    /// `None` forgets them all, with every portal when `portals` is set.
    /// Binding a forgotten name is refused until it is parsed again.
    pub fn forget(&mut self, name: Option<&str>, portals: bool) {
        match name {
            Some(n) => {
                self.statements.remove(n);
            }
            None => self.statements.clear(),
        }
        if portals {
            self.portals.clear();
        }
    }

    /// Sends the gateway's own Describe of the portal the last Execute runs,
    /// just before it: its answer (not forwarded) gives the rows' columns.
    /// Returns the Describe's body.
    pub fn describe_before_execute(&mut self, execute: &Frame) -> Result<Vec<u8>, PgError> {
        let (portal, _) = pg::decode_execute(&execute.body)?;
        let g = match self.owed.back() {
            Some(Owed::Execute(b)) => b.portal,
            _ => {
                return Err(PgError::Malformed {
                    what: "Describe before an Execute not tracked",
                })
            }
        };
        // It goes before the Execute it describes.
        let at = self.owed.len() - 1;
        self.owed.insert(at, Owed::Shape(g));
        let mut body = Vec::with_capacity(portal.len() + 2);
        body.push(b'P');
        body.extend_from_slice(portal.as_bytes());
        body.push(0);
        Ok(body)
    }

    /// The statement `name` (as last parsed) was allowed on approval
    /// `request`, which covers one execution: the first Execute of a portal
    /// bound from it runs, later ones are refused.
    pub fn runs_once(&mut self, name: &str, request: u64) {
        if let Some(p) = self.statements.get(name) {
            if Some(p.generation) == self.last_parsed {
                self.approved_once.insert(p.generation, (request, false));
            }
        }
    }

    /// Closes the statement `name` at the server (the gateway's own Close,
    /// sent after the Execute that ran it on its approval); returns the
    /// Close's body. Its answer is not the client's.
    pub fn close_statement(&mut self, name: &str) -> Vec<u8> {
        let before = self.statements.remove(name);
        if let Some(request) = before
            .as_ref()
            .and_then(|p| self.approved_once.get(&p.generation))
        {
            self.closed_on_approval.insert(name.to_owned(), request.0);
        }
        self.owed.push_back(Owed::Done(
            btag::CLOSE_COMPLETE,
            Undo::Statement(Change {
                name: name.to_owned(),
                before,
                installed: None,
            }),
            true,
        ));
        let mut body = Vec::with_capacity(name.len() + 2);
        body.push(b'S');
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body
    }

    /// The text of the prepared statement `name`, as the gateway holds it.
    pub fn prepared_text(&self, name: &str) -> Option<Arc<str>> {
        self.statements.get(name).map(|p| p.text.clone())
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
                for (name, portals) in crate::policy::sql::deallocations(&q) {
                    self.forget(name.as_deref(), portals);
                }
                let source = self.source(&q);
                self.owed.push_back(Owed::Query(source));
                step.statement = Some(q.clone());
                step.events.push(command(q, vec![], "query"));
                step.executes = true;
            }
            ftag::PARSE => {
                let p = pg::decode_parse(&f.body)?;
                if self.statements.len() >= MAX_NAMES && !self.statements.contains_key(&p.name) {
                    return Err(PgError::Malformed {
                        what: "Parse beyond the gateway's limit of prepared statements per session",
                    });
                }
                step.statement = Some(p.query.clone());
                step.prepared_as = Some(p.name.clone());
                let g = self.next_generation();
                if let Some(src) = self.source(&p.query) {
                    self.statement_source.insert(g, src);
                }
                let text: Arc<str> = Arc::from(p.query);
                let undo = if !p.name.is_empty() && self.statements.contains_key(&p.name) {
                    // The server refuses to redefine a named statement; if
                    // the gateway is wrong that it exists (SQL DEALLOCATE
                    // sent through Parse), it must not guess either.
                    step.refused = Some(format!(
                        "prepared statement {:?} already exists; close it first",
                        p.name
                    ));
                    self.last_parsed = None;
                    Undo::Statement(Change {
                        installed: self.statements.get(&p.name).map(|s| s.generation),
                        before: self.statements.get(&p.name).cloned(),
                        name: p.name,
                    })
                } else {
                    let before = self.statements.insert(
                        p.name.clone(),
                        Prepared {
                            generation: g,
                            deallocates: !crate::policy::sql::deallocations(&text).is_empty(),
                            text,
                        },
                    );
                    self.last_parsed = Some(g);
                    self.closed_on_approval.remove(&p.name);
                    // A failed Parse of the unnamed statement has already
                    // dropped the old one at the server.
                    Undo::Statement(Change {
                        before: before.filter(|_| !p.name.is_empty()),
                        installed: Some(g),
                        name: p.name,
                    })
                };
                self.owed
                    .push_back(Owed::Done(btag::PARSE_COMPLETE, undo, false));
            }
            ftag::BIND => {
                let b = pg::decode_bind(&f.body)?;
                if self.portals.len() >= MAX_NAMES && !self.portals.contains_key(&b.portal) {
                    return Err(PgError::Malformed {
                        what: "Bind beyond the gateway's limit of open portals per session",
                    });
                }
                let (text, statement, deallocates) = match self.statements.get(&b.statement) {
                    Some(p) => {
                        step.bound = Some(p.text.clone());
                        (p.text.clone(), p.generation, p.deallocates)
                    }
                    None => {
                        // SQL PREPARE, or a name the gateway saw removed:
                        // what it runs and returns cannot be told.
                        step.refused = Some(match self.closed_on_approval.get(&b.statement) {
                            Some(request) => format!(
                                "approval request {request} covered one execution of prepared statement {:?}, which has run; prepare it again to ask for another approval",
                                b.statement
                            ),
                            None => format!(
                                "prepared statement {:?} is unknown to the gateway (statements prepared with SQL PREPARE cannot be bound through it); prepare it with the protocol",
                                b.statement
                            ),
                        });
                        (Arc::from(UNSEEN), self.next_generation(), false)
                    }
                };
                let params = b
                    .params
                    .iter()
                    .enumerate()
                    .map(|(i, v)| render_param(v, b.param_format(i)))
                    .collect();
                let binding = Binding {
                    portal: self.next_generation(),
                    statement,
                    formats: b.result_formats,
                    source: self.statement_source.get(&statement).cloned(),
                };
                let installed = Some(binding.portal);
                let exists = !b.portal.is_empty() && self.portals.contains_key(&b.portal);
                if exists {
                    step.refused = Some(format!(
                        "portal {:?} already exists; close it first",
                        b.portal
                    ));
                }
                // A statement prepared on an approval is bound once; its
                // portal's Execute is its one execution.
                if step.refused.is_none() {
                    if let Some((request, spent)) = self.approved_once.get_mut(&statement) {
                        if *spent {
                            step.refused = Some(format!(
                                "approval request {request} covered one execution of this prepared statement, which is bound already; prepare it again to ask for another approval"
                            ));
                        } else {
                            *spent = true;
                            self.closing
                                .insert(binding.portal, (b.statement.clone(), statement));
                        }
                    }
                }
                let undo = if exists {
                    // The server refuses to redefine a named portal.
                    Undo::Portal(Change {
                        installed: self.portals.get(&b.portal).map(|p| p.binding.portal),
                        before: self.portals.get(&b.portal).cloned(),
                        name: b.portal,
                    })
                } else {
                    let before = self.portals.insert(
                        b.portal.clone(),
                        Portal {
                            binding,
                            text,
                            params,
                            deallocates,
                        },
                    );
                    Undo::Portal(Change {
                        before: before.filter(|_| !b.portal.is_empty()),
                        installed,
                        name: b.portal,
                    })
                };
                self.owed
                    .push_back(Owed::Done(btag::BIND_COMPLETE, undo, false));
            }
            ftag::EXECUTE => {
                let (portal, _) = pg::decode_execute(&f.body)?;
                let found = self.portals.get(&portal).map(|p| {
                    (
                        p.binding.clone(),
                        p.text.clone(),
                        p.params.clone(),
                        p.deallocates,
                    )
                });
                let (binding, text, params) = match found {
                    Some((binding, text, params, deallocates)) => {
                        if deallocates {
                            // DEALLOCATE or DISCARD ALL sent through the
                            // extended protocol: followed as for a Query.
                            for (name, portals) in crate::policy::sql::deallocations(&text) {
                                self.forget(name.as_deref(), portals);
                            }
                        }
                        (binding, text.to_string(), params)
                    }
                    None => {
                        // A cursor declared in SQL, or a name the gateway
                        // saw closed.
                        step.refused = Some(format!(
                            "portal {portal:?} is unknown to the gateway (cursors declared in SQL are read with FETCH); bind it with the protocol"
                        ));
                        let portal = self.next_generation();
                        let statement = self.next_generation();
                        let b = Binding {
                            portal,
                            statement,
                            ..Binding::default()
                        };
                        (b, UNSEEN.to_owned(), Vec::new())
                    }
                };
                if step.refused.is_none() {
                    if let Some((name, g)) = self.closing.remove(&binding.portal) {
                        // Closed by the client meanwhile (and maybe parsed
                        // anew): the server has already forgotten it.
                        if self.statements.get(&name).map(|p| p.generation) == Some(g) {
                            step.close_statement = Some(name);
                        }
                    }
                }
                self.owed.push_back(Owed::Execute(binding));
                step.events.push(command(text, params, "execute"));
                step.executes = true;
            }
            ftag::CLOSE => {
                let (kind, name) = pg::decode_target(&f.body, "Close")?;
                let undo = if kind == b'S' {
                    let before = self.statements.remove(&name);
                    Undo::Statement(Change {
                        name,
                        before,
                        installed: None,
                    })
                } else {
                    let before = self.portals.remove(&name);
                    Undo::Portal(Change {
                        name,
                        before,
                        installed: None,
                    })
                };
                self.owed
                    .push_back(Owed::Done(btag::CLOSE_COMPLETE, undo, false));
            }
            ftag::DESCRIBE => {
                let (kind, name) = pg::decode_target(&f.body, "Describe")?;
                // A name the gateway does not know gets a generation of its
                // own: its answer can describe nothing else.
                let owed = if kind == b'S' {
                    match self.statements.get(&name) {
                        Some(p) => Owed::DescribeStatement(p.generation),
                        None => Owed::DescribeStatement(self.next_generation()),
                    }
                } else {
                    match self.portals.get(&name) {
                        Some(p) => Owed::DescribePortal(p.binding.portal),
                        None => Owed::DescribePortal(self.next_generation()),
                    }
                };
                self.owed.push_back(owed);
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
            Owed::DescribePortal(_) | Owed::Shape(_) | Owed::Sync | Owed::Done(..) => None,
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

    /// Puts back a name a skipped message changed.
    fn undo(&mut self, u: Undo) {
        match u {
            Undo::Statement(c) => {
                if let Some(c) = put_back(&mut self.statements, c, |p| p.generation) {
                    pass_on(&mut self.owed, c, |o| match o {
                        Owed::Done(_, Undo::Statement(later), _) => Some(later),
                        _ => None,
                    });
                }
            }
            Undo::Portal(c) => {
                if let Some(c) = put_back(&mut self.portals, c, |p| p.binding.portal) {
                    pass_on(&mut self.owed, c, |o| match o {
                        Owed::Done(_, Undo::Portal(later), _) => Some(later),
                        _ => None,
                    });
                }
            }
        }
    }

    /// Forgets the columns of statements and portals that no name and no
    /// pending answer refers to any more.
    fn prune(&mut self) {
        let mut live: std::collections::HashSet<u64> =
            self.statements.values().map(|p| p.generation).collect();
        for p in self.portals.values() {
            live.insert(p.binding.portal);
            live.insert(p.binding.statement);
        }
        for o in &self.owed {
            match o {
                Owed::DescribeStatement(g) | Owed::DescribePortal(g) | Owed::Shape(g) => {
                    live.insert(*g);
                }
                Owed::Execute(b) => {
                    live.insert(b.portal);
                    live.insert(b.statement);
                }
                Owed::Query(_) | Owed::Sync | Owed::Done(..) => {}
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
    /// gateway would no longer know which columns rows have. `Ok(true)`: the
    /// message answers the gateway's own Describe
    /// ([`Relay::describe_before_execute`]) and is not the client's.
    pub fn track(&mut self, f: &Frame) -> Result<bool, PgError> {
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
                    Some(Owed::Shape(g)) => {
                        self.portal_columns.insert(g, fields);
                        self.owed.pop_front();
                        return Ok(true);
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
                Some(Owed::Shape(g)) => {
                    self.portal_columns.insert(g, Vec::new());
                    self.owed.pop_front();
                    return Ok(true);
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
            btag::PARSE_COMPLETE | btag::BIND_COMPLETE | btag::CLOSE_COMPLETE => {
                match self.owed.front() {
                    Some(Owed::Done(tag, _, own)) if *tag == f.tag => {
                        let own = *own;
                        self.owed.pop_front();
                        return Ok(own);
                    }
                    _ => return Err(unexpected),
                }
            }
            btag::ERROR_RESPONSE => {
                self.executing = false;
                self.set_current(None, None);
                // After an error in an extended sequence the server skips
                // everything up to Sync (simple queries never sit inside one:
                // the gateway refuses that). The names that skipped Parse,
                // Bind and Close messages changed go back, latest first.
                let mut undo = Vec::new();
                while let Some(o) = self.owed.front() {
                    if matches!(o, Owed::Sync | Owed::Query(_)) {
                        break;
                    }
                    if let Some(Owed::Done(_, u, _)) = self.owed.pop_front() {
                        undo.push(u);
                    }
                }
                for u in undo.into_iter().rev() {
                    self.undo(u);
                }
            }
            btag::READY_FOR_QUERY => {
                match self.owed.pop_front() {
                    Some(Owed::Sync | Owed::Query(_)) => {}
                    _ => return Err(unexpected),
                }
                self.executing = false;
                self.set_current(None, None);
                // Outside a transaction block no portal exists any more
                // (except those of later sequences, already sent).
                if f.body.first() == Some(&b'I') {
                    let pending: std::collections::HashSet<&str> = self
                        .owed
                        .iter()
                        .filter_map(|o| match o {
                            Owed::Done(_, Undo::Portal(c), _) => Some(c.name.as_str()),
                            _ => None,
                        })
                        .collect();
                    self.portals.retain(|n, _| pending.contains(n.as_str()));
                    let live: std::collections::HashSet<u64> =
                        self.portals.values().map(|p| p.binding.portal).collect();
                    self.closing.retain(|g, _| live.contains(g));
                }
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
        Ok(false)
    }

    /// Records `data` as output unless the cap is reached (the cut is
    /// recorded once).
    fn output(&mut self, stream: &str, data: Bytes) -> Option<ev::event::Kind> {
        if self.cut {
            return None;
        }
        self.rows += 1;
        let before = self.bytes;
        self.bytes += data.len() as u64;
        if self.rows > self.caps.rows || self.bytes > self.caps.bytes {
            self.cut = true;
            // What fits under the byte cap is kept; the cut is recorded.
            let keep = if self.rows > self.caps.rows {
                0
            } else {
                self.caps.bytes.saturating_sub(before) as usize
            };
            return Some(ev::event::Kind::Output(ev::Output {
                stream: stream.into(),
                data: data.slice(..keep.min(data.len())),
                truncated: true,
                continued: false,
            }));
        }
        Some(ev::event::Kind::Output(ev::Output {
            stream: stream.into(),
            data,
            truncated: false,
            continued: false,
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
mod tests;
