//! SQL as PostgreSQL reads it, for guardrails and column masking:
//! statements are parsed by PostgreSQL's own scanner and grammar (pg_query
//! embeds libpg_query), with the session's `standard_conforming_strings`,
//! so the gateway judges the statements the server will run. Text the
//! grammar refuses (the server refuses it too) falls back to its words, and
//! callers fail closed on it. Pure: no I/O.
//!
//! A statement string is parsed once: [`facts`] keeps what it found for the
//! most recent distinct texts (bounded), and works out classes, reads and
//! writes from the tree only when asked.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use pg_query::protobuf::Token;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[cfg(test)]
mod tests;
mod tree;

/// What a SQL string does, as guardrails see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SqlClass {
    Read,
    Write,
    Ddl,
    Dcl,
    DeleteWithoutWhere,
    UpdateWithoutWhere,
    Truncate,
    Drop,
    MultiStatement,
    /// The text did not parse; the keyword fallback classified it.
    Unparsed,
}

impl SqlClass {
    pub fn as_str(self) -> &'static str {
        match self {
            SqlClass::Read => "read",
            SqlClass::Write => "write",
            SqlClass::Ddl => "ddl",
            SqlClass::Dcl => "dcl",
            SqlClass::DeleteWithoutWhere => "delete_without_where",
            SqlClass::UpdateWithoutWhere => "update_without_where",
            SqlClass::Truncate => "truncate",
            SqlClass::Drop => "drop",
            SqlClass::MultiStatement => "multi_statement",
            SqlClass::Unparsed => "unparsed",
        }
    }
}

/// How the server reads statement text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Dialect {
    /// `standard_conforming_strings` is off: a backslash in `'…'` escapes.
    pub legacy_strings: bool,
}

fn by_keyword(words: &[String], out: &mut BTreeSet<SqlClass>) {
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let role = matches!(w(1), "role" | "user" | "group");
    match w(0) {
        "select" | "with" | "values" | "table" | "show" | "explain" => {
            out.insert(SqlClass::Read);
        }
        "insert" | "merge" | "copy" | "call" => {
            out.insert(SqlClass::Write);
        }
        "grant" | "revoke" => {
            out.insert(SqlClass::Dcl);
        }
        "create" | "alter" if role => {
            out.insert(SqlClass::Dcl);
        }
        "drop" if role => {
            out.insert(SqlClass::Dcl);
            out.insert(SqlClass::Drop);
        }
        "drop" => {
            out.insert(SqlClass::Ddl);
            out.insert(SqlClass::Drop);
        }
        "create" | "alter" | "comment" | "reindex" | "cluster" | "vacuum" => {
            out.insert(SqlClass::Ddl);
        }
        "truncate" => {
            out.insert(SqlClass::Truncate);
            out.insert(SqlClass::Write);
        }
        // An anonymous code block can do anything.
        "do" => {
            out.insert(SqlClass::Write);
            out.insert(SqlClass::Ddl);
        }
        "delete" => {
            out.insert(SqlClass::Write);
            if !words.iter().any(|x| x == "where") {
                out.insert(SqlClass::DeleteWithoutWhere);
            }
        }
        "update" => {
            out.insert(SqlClass::Write);
            if !words.iter().any(|x| x == "where") {
                out.insert(SqlClass::UpdateWithoutWhere);
            }
        }
        _ => {}
    }
}

/// Keyword classes of an unparsed statement, and of the statements it may
/// run: after `WITH`, `EXPLAIN`, `PREPARE` or `COPY (`, each DML keyword
/// starts one (`WITH x AS (…) DELETE FROM t`).
fn by_keywords(words: &[String], out: &mut BTreeSet<SqlClass>) {
    by_keyword(words, out);
    if matches!(
        words.first().map(String::as_str),
        Some("with" | "explain" | "prepare" | "copy")
    ) {
        for (i, w) in words.iter().enumerate().skip(1) {
            if matches!(
                w.as_str(),
                "insert" | "update" | "delete" | "merge" | "truncate"
            ) {
                by_keyword(&words[i..], out);
            }
        }
    }
}

/// The words of `text` (keywords and identifiers, lowercase) and where each
/// statement starts, from PostgreSQL's scanner; a plain split when even the
/// scanner refuses the text. Comments and literals are not words.
fn words(text: &str) -> Vec<String> {
    scan_words(text).unwrap_or_else(|| {
        text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    })
}

/// Words as [`words`], with `;` kept as a word; `None` when the scanner
/// refuses the text.
fn scan_words(text: &str) -> Option<Vec<String>> {
    let scanned = pg_query::scan(text).ok()?;
    Some(
        scanned
            .tokens
            .iter()
            .filter(|t| {
                t.token == Token::Ident as i32
                    || t.keyword_kind != 0
                    || t.token == Token::Ascii59 as i32
            })
            .filter_map(|t| text.get(t.start as usize..t.end as usize))
            .map(|w| w.trim_matches('"').to_lowercase())
            .collect(),
    )
}

/// The spans of `sql`'s tokens, each with whether it holds a value a person
/// wrote (a literal, a comment, an identifier); `None` when the scanner
/// refuses the text.
pub fn token_spans(sql: &str) -> Option<Vec<(usize, usize, bool)>> {
    let scanned = pg_query::scan(sql).ok()?;
    Some(
        scanned
            .tokens
            .iter()
            .map(|t| {
                let valued = [
                    Token::Sconst,
                    Token::Usconst,
                    Token::Bconst,
                    Token::Xconst,
                    Token::Iconst,
                    Token::Fconst,
                    Token::Ident,
                    Token::Uident,
                    Token::SqlComment,
                    Token::CComment,
                ]
                .iter()
                .any(|k| *k as i32 == t.token);
                (t.start as usize, t.end as usize, valued)
            })
            .collect(),
    )
}

/// Whether `text` holds `word`, ASCII case-insensitively, anywhere (a cheap
/// test before parsing).
fn spells(text: &[u8], word: &[u8]) -> bool {
    text.windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// Whether a `client_encoding` has multibyte characters that may hold
/// ASCII bytes (PostgreSQL's client-only encodings: a backslash or a letter
/// can be the second byte of a character there).
pub fn hides_ascii(encoding: &str) -> bool {
    let e: String = encoding
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        e.as_str(),
        "SJIS"
            | "SHIFTJIS"
            | "SHIFTJIS2004"
            | "MSKANJI"
            | "WIN932"
            | "BIG5"
            | "WIN950"
            | "GBK"
            | "WIN936"
            | "CP936"
            | "UHC"
            | "WIN949"
            | "GB18030"
            | "JOHAB"
    )
}

/// What a SQL string's expressions can read, as column masking needs to
/// know it. Names are folded to lowercase (rules are case-insensitive).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reads {
    /// Names some expression may read as a column (the last part of every
    /// identifier, wherever it appears: select list, WHERE, subqueries).
    pub columns: BTreeSet<String>,
    /// Relations read (the last part of each name).
    pub tables: BTreeSet<String>,
    /// Some expression reads whole rows: a table or alias used as a value
    /// (`row_to_json(c)`, `SELECT c FROM t c`) or `c.*` inside an
    /// expression.
    pub whole_rows: bool,
    /// The text did not parse: `columns` and `tables` hold every word in it
    /// and `whole_rows` is set (callers fail closed).
    pub unparsed: bool,
    /// What each result column's expression reads, when the result columns
    /// are exactly the select list: one plain `SELECT` (no `WITH`, set
    /// operation or `*`) over plain tables. `tables` is the statement's in
    /// each.
    pub items: Option<Vec<Reads>>,
    /// Some select list has `*` or `t.*`, or a query is `TABLE t` (columns
    /// that keep no name a rule could see once copied elsewhere).
    pub star: bool,
    /// Rows come from somewhere the text does not show (`EXECUTE` of a
    /// prepared statement, `FETCH` from a cursor, `CALL`, a function that
    /// runs SQL text or reads a relation named by a value: `query_to_xml`,
    /// `table_to_xml`, `ts_stat`, `dblink`, …), or the text did not parse:
    /// nothing can be said about what they read.
    pub opaque: bool,
}

/// What a statement stores elsewhere or reshapes, as column masking needs to
/// know it (a copy of a masked column under another name is no longer
/// masked).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Writes {
    /// What the written values read: INSERT's source and `ON CONFLICT`
    /// assignments, UPDATE's `SET` values, `CREATE TABLE … AS` and
    /// `SELECT … INTO` queries, MERGE (all of it), the arguments of a
    /// function that keeps them. `columns` also holds the old name of every
    /// column renamed.
    pub values: Reads,
    /// Tables whose definition changes (`ALTER TABLE`), lowercase.
    pub altered: BTreeSet<String>,
    /// It stores rows or values (INSERT, UPDATE, MERGE, `CREATE TABLE … AS`,
    /// `SELECT … INTO`, or a call of a function that keeps its arguments:
    /// `set_config`, large objects, `pg_notify`, `setval`, `dblink`, …);
    /// `values.tables` are then every relation it reads.
    pub stores: bool,
}

/// What column masking needs to know about a statement before it runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// PostgreSQL's grammar parsed it.
    pub parsed: bool,
    /// It is a plain read or session control (see [`plain_read_words`] for
    /// text that does not parse): it stores and reshapes nothing.
    pub plain_read: bool,
    /// It changes the schema beyond what column masking can follow.
    pub reshapes: bool,
    /// What it stores elsewhere (default when it did not parse).
    pub writes: Writes,
}

/// Built-in (and common extension) functions that run SQL given as text,
/// or read whole relations or cursors named by a value: what their results
/// hold cannot be told from the statement.
pub(super) const RUNS_SQL: [&str; 25] = [
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_fetch",
    "dblink_get_result",
    "dblink_exec",
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
];

/// Functions that keep their arguments somewhere a later statement, another
/// session or another server can read them back: settings, advisory locks
/// (`pg_locks`), large objects, notifications, sequences, logical decoding
/// messages, remote servers.
pub(super) const STORING: [&str; 22] = [
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "dblink_connect",
    "dblink_connect_u",
    "lo_from_bytea",
    "lo_put",
    "lowrite",
    "lo_import",
    "pg_notify",
    "setval",
    "pg_logical_emit_message",
    "dblink",
    "dblink_exec",
    "dblink_send_query",
    "dblink_open",
];

/// Functions that change stored data: a statement calling one writes.
pub(super) const WRITING: [&str; 11] = [
    "lowrite",
    "lo_put",
    "lo_from_bytea",
    "lo_import",
    "lo_export",
    "lo_creat",
    "lo_create",
    "lo_unlink",
    "lo_truncate",
    "lo_truncate64",
    "setval",
];

/// One statement of a parsed string: its node type and fields, and where
/// its text lies.
struct Stmt {
    kind: String,
    body: Map<String, Value>,
    span: (usize, usize),
}

/// What a statement string holds, parsed once; each view of it is worked
/// out when first asked.
pub struct Facts {
    text: Box<str>,
    /// `None`: the grammar refused the text.
    stmts: Option<Vec<Stmt>>,
    classes: OnceLock<BTreeSet<SqlClass>>,
    reads: OnceLock<Reads>,
    analysis: OnceLock<Analysis>,
}

impl Facts {
    fn parse(sql: &str, d: Dialect) -> Self {
        Self {
            text: sql.into(),
            stmts: parse(sql, d),
            classes: OnceLock::new(),
            reads: OnceLock::new(),
            analysis: OnceLock::new(),
        }
    }

    pub fn parsed(&self) -> bool {
        self.stmts.is_some()
    }

    fn trees(&self) -> Vec<(String, Map<String, Value>)> {
        self.stmts
            .iter()
            .flatten()
            .map(|s| (s.kind.clone(), s.body.clone()))
            .collect()
    }

    /// The classes of the string (possibly several statements).
    pub fn classes(&self) -> &BTreeSet<SqlClass> {
        self.classes.get_or_init(|| {
            let mut out = BTreeSet::new();
            match &self.stmts {
                Some(stmts) => {
                    if stmts.len() > 1 {
                        out.insert(SqlClass::MultiStatement);
                    }
                    for s in stmts {
                        tree::classify_statement(&s.kind, &s.body, &mut out);
                    }
                }
                None => {
                    out.insert(SqlClass::Unparsed);
                    let parts: Vec<&str> = self
                        .text
                        .split(';')
                        .filter(|p| !p.trim().is_empty())
                        .collect();
                    if parts.len() > 1 {
                        out.insert(SqlClass::MultiStatement);
                    }
                    for p in parts {
                        by_keywords(&words(p), &mut out);
                    }
                }
            }
            out
        })
    }

    /// What the string's expressions can read (see [`Reads`]).
    pub fn reads(&self) -> &Reads {
        self.reads.get_or_init(|| match &self.stmts {
            Some(stmts) => {
                let mut c = tree::ReadsCollector::default();
                for s in stmts {
                    c.collect_stmt(&s.kind, &s.body);
                }
                let trees = self.trees();
                let items = tree::select_items(&trees).map(|exprs| {
                    exprs
                        .into_iter()
                        .map(|e| {
                            let mut item = tree::ReadsCollector::within(&c.relations);
                            item.collect(e);
                            let mut item = item.finish();
                            item.tables = c.reads.tables.clone();
                            item
                        })
                        .collect()
                });
                let mut r = c.finish();
                r.items = items;
                r
            }
            None => {
                let all: BTreeSet<String> =
                    words(&self.text).into_iter().filter(|w| w != ";").collect();
                Reads {
                    columns: all.clone(),
                    tables: all,
                    whole_rows: true,
                    unparsed: true,
                    items: None,
                    star: true,
                    opaque: true,
                }
            }
        })
    }

    /// What column masking needs to know before the string runs.
    pub fn analysis(&self) -> &Analysis {
        self.analysis.get_or_init(|| match &self.stmts {
            Some(_) => {
                let trees = self.trees();
                let writes = tree::writes_of(&trees);
                let reshapes = tree::reshapes_of(&trees);
                Analysis {
                    parsed: true,
                    plain_read: !reshapes && tree::plain_read_of(&trees, writes.stores),
                    reshapes,
                    writes,
                }
            }
            None => Analysis {
                plain_read: plain_read_words(&self.text),
                ..Analysis::default()
            },
        })
    }

    /// Whether it holds a `COPY … TO` (results leave as COPY data).
    pub fn copies_out(&self) -> bool {
        match &self.stmts {
            Some(stmts) => stmts.iter().any(|s| {
                s.kind == "CopyStmt"
                    && !s
                        .body
                        .get("is_from")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
            }),
            None => {
                let w = words(&self.text);
                w.first().map(String::as_str) == Some("copy") && w.iter().any(|x| x == "to")
            }
        }
    }

    /// Whether it holds an SQL-level `PREPARE` (whose statement each later
    /// `EXECUTE` runs again).
    pub fn prepares(&self) -> bool {
        match &self.stmts {
            Some(stmts) => stmts.iter().any(|s| s.kind == "PrepareStmt"),
            None => self
                .text
                .split(';')
                .any(|p| words(p).first().map(String::as_str) == Some("prepare")),
        }
    }

    /// What its `DEALLOCATE` and `DISCARD ALL` remove: a prepared statement
    /// by name, or all of them (`None`), and whether portals go too. Text
    /// that does not parse forgets everything when one of its parts starts
    /// with either word.
    pub fn deallocations(&self) -> Vec<(Option<String>, bool)> {
        match &self.stmts {
            Some(stmts) => stmts
                .iter()
                .filter_map(|s| tree::deallocation(&s.kind, &s.body))
                .collect(),
            None => self
                .text
                .split(';')
                .filter(|p| {
                    matches!(
                        words(p).first().map(String::as_str),
                        Some("deallocate" | "discard")
                    )
                })
                .map(|_| (None, true))
                .take(1)
                .collect(),
        }
    }

    /// The prepared statements its SQL `EXECUTE`s run (names as PostgreSQL
    /// folds them). `None` when it may run some that cannot be told: the
    /// text spells `execute` anywhere but in plain top-level `EXECUTE`
    /// statements (`EXPLAIN ANALYZE EXECUTE`, a `DO` block, a function
    /// body), or does not parse.
    pub fn executes_prepared(&self) -> Option<Vec<String>> {
        let spells_it = |t: &str| spells(t.as_bytes(), b"execute");
        let stmts = self.stmts.as_ref()?;
        let mut names = Vec::new();
        for s in stmts {
            match tree::executed(&s.kind, &s.body) {
                Some((name, params)) if !spells_it(&params) => names.push(name),
                _ => {
                    let text = self.text.get(s.span.0..s.span.1).unwrap_or(&self.text);
                    if spells_it(text) {
                        return None;
                    }
                }
            }
        }
        Some(names)
    }
}

/// Parses `sql` with PostgreSQL's grammar into its statements' trees.
fn parse(sql: &str, d: Dialect) -> Option<Vec<Stmt>> {
    let options = if d.legacy_strings {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    } else {
        pg_query::ParserOptions::DEFAULT
    };
    let parsed = pg_query::parse(sql, options).ok()?;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).ok()?;
        let end = match usize::try_from(raw.stmt_len).ok()? {
            0 => sql.len(),
            n => start + n,
        };
        let Value::Object(mut m) = serde_json::to_value(raw.stmt.as_deref()?).ok()? else {
            return None;
        };
        let Some(Value::Object(inner)) = m.remove("node") else {
            return None;
        };
        let (kind, body) = inner.into_iter().next()?;
        let Value::Object(body) = body else {
            return None;
        };
        out.push(Stmt {
            kind,
            body,
            span: (start, end),
        });
    }
    Some(out)
}

/// Whether every statement in text that does not parse starts with a
/// keyword of a plain read or of session and transaction control (cursors
/// included), and no word is `INTO` or a function that stores its
/// arguments. Text the scanner refuses is no plain read.
fn plain_read_words(sql: &str) -> bool {
    const FIRST: [&str; 19] = [
        "select",
        "table",
        "values",
        "show",
        "fetch",
        "move",
        "declare",
        "close",
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "listen",
        "unlisten",
        "set",
    ];
    let Some(words) = scan_words(sql) else {
        return false;
    };
    let mut first = true;
    for w in words {
        if w == ";" {
            first = true;
            continue;
        }
        if w == "into" || (first && !FIRST.contains(&w.as_str())) || STORING.contains(&w.as_str()) {
            return false;
        }
        first = false;
    }
    true
}

/// Distinct texts whose facts are kept, and the longest text kept.
const CACHE_ENTRIES: usize = 4096;
const CACHE_TEXT_BYTES: usize = 16 << 10;

#[derive(Default)]
struct Cache {
    entries: HashMap<(bool, Box<str>), (Arc<Facts>, u64)>,
    tick: u64,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);

/// The facts of `sql` as a server with dialect `d` reads it: parsed once
/// per distinct text while it stays among the most recent ones.
pub fn facts(sql: &str, d: Dialect) -> Arc<Facts> {
    if sql.len() > CACHE_TEXT_BYTES {
        return Arc::new(Facts::parse(sql, d));
    }
    let lock = || CACHE.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut c = lock();
        c.tick += 1;
        let tick = c.tick;
        if let Some(e) = c.entries.get_mut(&(d.legacy_strings, sql.into())) {
            e.1 = tick;
            return e.0.clone();
        }
    }
    let f = Arc::new(Facts::parse(sql, d));
    let mut c = lock();
    if c.entries.len() >= CACHE_ENTRIES {
        // Keep the more recently used half.
        let mut ticks: Vec<u64> = c.entries.values().map(|e| e.1).collect();
        let mid = ticks.len() / 2;
        let (_, median, _) = ticks.select_nth_unstable(mid);
        let median = *median;
        c.entries.retain(|_, e| e.1 > median);
    }
    let tick = c.tick;
    c.entries
        .insert((d.legacy_strings, sql.into()), (f.clone(), tick));
    f
}

/// The classes of a SQL string (possibly several statements).
pub fn classify(sql: &str) -> BTreeSet<SqlClass> {
    facts(sql, Dialect::default()).classes().clone()
}

/// What `sql`'s expressions can read (see [`Reads`]).
pub fn reads(sql: &str) -> Reads {
    facts(sql, Dialect::default()).reads().clone()
}

/// [`Analysis`] of `sql`.
pub fn analyze(sql: &str) -> Analysis {
    facts(sql, Dialect::default()).analysis().clone()
}

/// What `sql` stores elsewhere or reshapes (see [`Writes`]); `None` when it
/// does not parse.
#[cfg(test)]
pub fn writes(sql: &str) -> Option<Writes> {
    let a = analyze(sql);
    a.parsed.then_some(a.writes)
}

/// Whether the SQL holds an SQL-level `PREPARE`.
pub fn prepares(sql: &str) -> bool {
    spells(sql.as_bytes(), b"prepare") && facts(sql, Dialect::default()).prepares()
}

/// See [`Facts::deallocations`].
pub fn deallocations(sql: &str) -> Vec<(Option<String>, bool)> {
    if !spells(sql.as_bytes(), b"dealloc") && !spells(sql.as_bytes(), b"discard") {
        return Vec::new();
    }
    facts(sql, Dialect::default()).deallocations()
}

/// See [`Facts::executes_prepared`].
pub fn executes_prepared(sql: &str) -> Option<Vec<String>> {
    if !spells(sql.as_bytes(), b"execute") {
        return Some(Vec::new());
    }
    facts(sql, Dialect::default()).executes_prepared()
}

/// Whether the SQL contains a `COPY ... TO` (results leave as COPY data).
pub fn is_copy_out(sql: &str) -> bool {
    // Every COPY statement spells the keyword; most statements need no parse.
    spells(sql.as_bytes(), b"copy") && facts(sql, Dialect::default()).copies_out()
}
