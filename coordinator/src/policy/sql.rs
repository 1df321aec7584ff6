//! SQL statement classes for guardrails, from the parsed AST (sqlparser,
//! PostgreSQL dialect), with a keyword fallback when a statement does not
//! parse. Pure: no I/O.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterTableOperation, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, ObjectName,
    Query, SelectItem, SetExpr, Statement, TableAlias, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

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

/// The words of `text`, lowercase, outside comments and string literals
/// (sqlparser's tokenizer; a plain split when even that fails), so a comment
/// cannot pose as the first keyword.
fn words(text: &str) -> Vec<String> {
    use sqlparser::tokenizer::{Token, Tokenizer};
    match Tokenizer::new(&PostgreSqlDialect {}, text).tokenize() {
        Ok(tokens) => tokens
            .into_iter()
            .filter_map(|t| match t {
                Token::Word(w) => Some(w.value.to_lowercase()),
                _ => None,
            })
            .collect(),
        Err(_) => text
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect(),
    }
}

/// Classes of `s` and of every statement it runs: the DML of a `WITH`
/// clause or of `WITH … DELETE`, `COPY (DELETE … RETURNING …) TO`, what
/// `EXPLAIN ANALYZE` runs, and what `PREPARE` prepares (what a later
/// `EXECUTE` runs).
fn classify_statement(s: &Statement, out: &mut BTreeSet<SqlClass>) {
    match s {
        Statement::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            out.insert(SqlClass::Read);
            // Plain EXPLAIN only plans; with ANALYZE it runs the statement.
            let runs = *analyze
                || options.iter().flatten().any(|o| {
                    o.name.value.eq_ignore_ascii_case("analyze")
                        && !o.arg.as_ref().is_some_and(|a| {
                            let v = a.to_string().to_ascii_lowercase();
                            matches!(v.as_str(), "false" | "off" | "0" | "'false'" | "'off'")
                        })
                });
            if runs {
                classify_statement(statement, out);
            }
        }
        Statement::Prepare { statement, .. } => classify_statement(statement, out),
        _ => {
            classify_one(s, out);
            let _ = s.visit(&mut NestedStatements { out });
        }
    }
}

/// Finds the statements a query runs besides reading: `SetExpr` DML
/// (`WITH x AS (DELETE …) SELECT …`, `WITH … UPDATE …`, `COPY (DELETE …
/// RETURNING …) TO`) and `SELECT … INTO` (creates and fills a table).
struct NestedStatements<'a> {
    out: &'a mut BTreeSet<SqlClass>,
}

impl NestedStatements<'_> {
    fn set_expr(&mut self, e: &SetExpr) {
        match e {
            SetExpr::Select(s) if s.into.is_some() => {
                self.out.insert(SqlClass::Write);
                self.out.insert(SqlClass::Ddl);
            }
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                classify_one(s, self.out)
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            _ => {}
        }
    }
}

impl Visitor for NestedStatements<'_> {
    type Break = ();

    // Every query, however deeply nested (CTEs, subqueries, COPY sources),
    // comes through here; statements inside them are visited too.
    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        self.set_expr(&q.body);
        ControlFlow::Continue(())
    }
}

/// The classes of `s` itself, not of the statements inside it.
fn classify_one(s: &Statement, out: &mut BTreeSet<SqlClass>) {
    match s {
        Statement::Query(_) => {
            out.insert(SqlClass::Read);
        }
        Statement::Insert(_) | Statement::Merge { .. } => {
            out.insert(SqlClass::Write);
        }
        Statement::Copy { to, .. } => {
            out.insert(if *to { SqlClass::Read } else { SqlClass::Write });
        }
        Statement::Update { selection, .. } => {
            out.insert(SqlClass::Write);
            if selection.is_none() {
                out.insert(SqlClass::UpdateWithoutWhere);
            }
        }
        Statement::Delete(d) => {
            out.insert(SqlClass::Write);
            if d.selection.is_none() {
                out.insert(SqlClass::DeleteWithoutWhere);
            }
        }
        Statement::Truncate { .. } => {
            out.insert(SqlClass::Truncate);
            out.insert(SqlClass::Write);
        }
        other => by_keyword(&words(&other.to_string()), out),
    }
}

/// Where PostgreSQL's lexer and sqlparser's tokenizer split `sql`
/// differently, so that guardrails and masking could read another statement
/// than the one PostgreSQL runs: `--` or `/*` right after an operator
/// character (PostgreSQL ends the operator there and starts a comment;
/// sqlparser reads one operator), a dollar quote whose tag starts with a
/// character sqlparser does not take, and, when `standard_conforming_strings`
/// is off (`strings_conform` false), any backslash (an escape to PostgreSQL,
/// not to sqlparser). `None` when they agree, as far as these rules see.
pub fn lexer_divergence(sql: &str, strings_conform: bool) -> Option<&'static str> {
    const OPERATOR: &[u8] = b"+*/<>=~!@#%^&|`?";
    // (`//*` is a comment start either way.)
    if sql
        .as_bytes()
        .windows(3)
        .any(|w| (&w[1..] == b"--" || &w[1..] == b"/*") && OPERATOR.contains(&w[0]) && w[0] != w[1])
    {
        return Some("an operator directly followed by `--` or `/*`");
    }
    if sql.contains('$')
        && sql
            .chars()
            .zip(sql.chars().skip(1))
            .any(|(d, c)| d == '$' && !c.is_ascii() && !c.is_alphanumeric())
    {
        return Some("a dollar quote whose tag starts with a non-ASCII symbol");
    }
    if !strings_conform && sql.contains('\\') {
        return Some("a backslash while standard_conforming_strings is off");
    }
    None
}

/// Whether the SQL holds an SQL-level `PREPARE` (whose statement each later
/// `EXECUTE` runs again).
pub fn prepares(sql: &str) -> bool {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => stmts.iter().any(|s| matches!(s, Statement::Prepare { .. })),
        Err(_) => sql
            .split(';')
            .any(|p| words(p).first().map(String::as_str) == Some("prepare")),
    }
}

/// Whether `text` holds `word`, ASCII case-insensitively, anywhere (a cheap
/// test before parsing).
fn spells(text: &[u8], word: &[u8]) -> bool {
    text.windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// What SQL `DEALLOCATE` and `DISCARD ALL` in `sql` remove: a prepared
/// statement by name, or all of them (`None`), and whether portals go too.
/// Text that does not parse forgets everything when one of its parts
/// starts with either word.
pub fn deallocations(sql: &str) -> Vec<(Option<String>, bool)> {
    if !spells(sql.as_bytes(), b"dealloc") && !spells(sql.as_bytes(), b"discard") {
        return Vec::new();
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => stmts
            .iter()
            .filter_map(|s| match s {
                Statement::Deallocate { name, .. } => Some(match name.quote_style {
                    None if name.value.eq_ignore_ascii_case("all") => (None, false),
                    None => (Some(name.value.to_lowercase()), false),
                    Some(_) => (Some(name.value.clone()), false),
                }),
                Statement::Discard {
                    object_type: sqlparser::ast::DiscardObject::ALL,
                } => Some((None, true)),
                _ => None,
            })
            .collect(),
        // Unparsed: a part that starts with either word forgets everything.
        Err(_) => sql
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

/// The prepared statements SQL `EXECUTE` in `sql` runs (names as
/// PostgreSQL folds them). `None` when it may run some that cannot be told:
/// the text spells `execute` anywhere but in plain top-level `EXECUTE`
/// statements (`EXPLAIN ANALYZE EXECUTE`, a `DO` block, a function body), or
/// does not parse.
pub fn executes_prepared(sql: &str) -> Option<Vec<String>> {
    let spells = |t: &str| spells(t.as_bytes(), b"execute");
    if !spells(sql) {
        return Some(Vec::new());
    }
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let mut names = Vec::new();
    for s in &stmts {
        match s {
            Statement::Execute {
                name: Some(n),
                parameters,
                using,
                ..
            } if !parameters.iter().any(|p| spells(&p.to_string())) && using.is_empty() => {
                let i = n.0.last().and_then(|p| p.as_ident())?;
                names.push(if i.quote_style.is_none() {
                    i.value.to_lowercase()
                } else {
                    i.value.clone()
                });
            }
            other if spells(&other.to_string()) => return None,
            _ => {}
        }
    }
    Some(names)
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

/// Whether the SQL contains a `COPY ... TO` (results leave as COPY data).
pub fn is_copy_out(sql: &str) -> bool {
    // Every COPY statement spells the keyword; most statements need no parse.
    if !spells(sql.as_bytes(), b"copy") {
        return false;
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => stmts
            .iter()
            .any(|s| matches!(s, Statement::Copy { to: true, .. })),
        Err(_) => {
            let w = words(sql);
            w.first().map(String::as_str) == Some("copy") && w.iter().any(|x| x == "to")
        }
    }
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

/// Collects [`Reads`] over an AST.
#[derive(Default)]
struct ReadsCollector {
    reads: Reads,
    /// Single names used as values (columns, or whole rows of a relation).
    values: BTreeSet<String>,
    /// Relation names and aliases of every FROM item.
    relations: BTreeSet<String>,
}

fn fold(i: &Ident) -> String {
    i.value.to_lowercase()
}

fn last_part(n: &ObjectName) -> Option<String> {
    n.0.last().and_then(|p| p.as_ident()).map(fold)
}

/// Built-in (and common extension) functions that run SQL given as text,
/// or read whole relations or cursors named by a value: what their results
/// hold cannot be told from the statement.
const RUNS_SQL: [&str; 25] = [
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
const STORING: [&str; 22] = [
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

fn table_factor_alias_full(t: &TableFactor) -> Option<&TableAlias> {
    match t {
        TableFactor::Table { alias, .. }
        | TableFactor::Derived { alias, .. }
        | TableFactor::TableFunction { alias, .. }
        | TableFactor::Function { alias, .. }
        | TableFactor::UNNEST { alias, .. }
        | TableFactor::JsonTable { alias, .. }
        | TableFactor::OpenJsonTable { alias, .. }
        | TableFactor::NestedJoin { alias, .. }
        | TableFactor::Pivot { alias, .. }
        | TableFactor::Unpivot { alias, .. }
        | TableFactor::MatchRecognize { alias, .. }
        | TableFactor::XmlTable { alias, .. } => alias.as_ref(),
        _ => None,
    }
}

/// Whether a select list in `body` (through set operations) has a `*`, or
/// a part is `TABLE t` (whose name, lowercase, goes to `tables`).
fn has_star(body: &SetExpr, tables: &mut Vec<String>) -> bool {
    match body {
        SetExpr::Select(sel) => sel.projection.iter().any(|i| {
            matches!(
                i,
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)
            )
        }),
        SetExpr::SetOperation { left, right, .. } => {
            // Both sides: each may name a table.
            let l = has_star(left, tables);
            has_star(right, tables) || l
        }
        SetExpr::Table(t) => {
            tables.extend(t.table_name.as_deref().map(str::to_lowercase));
            true
        }
        _ => false,
    }
}

impl ReadsCollector {
    /// A collector that already knows the relation names and aliases of the
    /// statement around what it visits.
    fn within(relations: &BTreeSet<String>) -> Self {
        Self {
            relations: relations.clone(),
            ..Self::default()
        }
    }

    fn finish(mut self) -> Reads {
        self.reads.whole_rows |= self.values.intersection(&self.relations).next().is_some();
        self.reads
    }
}

impl Visitor for ReadsCollector {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        // `WITH s(a, b) AS (…)` renames columns like an alias list does.
        if q.with
            .as_ref()
            .is_some_and(|w| w.cte_tables.iter().any(|c| !c.alias.columns.is_empty()))
        {
            self.reads.whole_rows = true;
        }
        let mut tables = Vec::new();
        self.reads.star |= has_star(&q.body, &mut tables);
        for t in tables {
            self.relations.insert(t.clone());
            self.reads.tables.insert(t);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        if matches!(
            s,
            Statement::Execute { .. } | Statement::Fetch { .. } | Statement::Call(_)
        ) {
            self.reads.opaque = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, r: &ObjectName) -> ControlFlow<()> {
        if let Some(t) = last_part(r) {
            // `FROM dblink(…)`, `FROM ts_stat(…)`: a function in FROM.
            self.reads.opaque |= RUNS_SQL.contains(&t.as_str());
            self.relations.insert(t.clone());
            self.reads.tables.insert(t);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        // `FROM LATERAL f(…)` (its name is not visited as a relation).
        if let TableFactor::Function { name, .. } = t {
            self.reads.opaque |= last_part(name).is_some_and(|n| RUNS_SQL.contains(&n.as_str()));
        }
        if let Some(a) = table_factor_alias_full(t) {
            self.relations.insert(fold(&a.name));
            // `t AS a(x, y)` renames columns: names no longer tell what is
            // read, so the rows count as read whole.
            if !a.columns.is_empty() {
                self.reads.whole_rows = true;
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(i) => {
                self.reads.columns.insert(fold(i));
                self.values.insert(fold(i));
            }
            // `t.c`, `s.t.c`, or `s.t` as a whole row.
            Expr::CompoundIdentifier(parts) => {
                if let Some(i) = parts.last() {
                    self.reads.columns.insert(fold(i));
                    self.values.insert(fold(i));
                }
            }
            Expr::QualifiedWildcard(..) | Expr::Wildcard(..) => self.reads.whole_rows = true,
            Expr::Function(f) => {
                self.reads.opaque |=
                    last_part(&f.name).is_some_and(|n| RUNS_SQL.contains(&n.as_str()));
                if let FunctionArguments::List(l) = &f.args {
                    let whole = l.args.iter().any(|a| {
                        let arg = match a {
                            FunctionArg::Unnamed(x) => x,
                            FunctionArg::Named { arg, .. } | FunctionArg::ExprNamed { arg, .. } => {
                                arg
                            }
                        };
                        matches!(arg, FunctionArgExpr::QualifiedWildcard(_))
                    });
                    self.reads.whole_rows |= whole;
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The select list's expressions, when they are exactly the result
/// columns of `stmts` (see [`Reads::items`]).
fn select_items(stmts: &[Statement]) -> Option<Vec<&Expr>> {
    let [Statement::Query(q)] = stmts else {
        return None;
    };
    let Query {
        with: None, body, ..
    } = q.as_ref()
    else {
        return None;
    };
    let SetExpr::Select(sel) = body.as_ref() else {
        return None;
    };
    let plain = |t: &TableFactor| {
        matches!(t, TableFactor::Table { args: None, alias, .. }
            if alias.as_ref().is_none_or(|a| a.columns.is_empty()))
    };
    if !sel
        .from
        .iter()
        .all(|f| plain(&f.relation) && f.joins.iter().all(|j| plain(&j.relation)))
    {
        return None;
    }
    sel.projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
            _ => None,
        })
        .collect()
}

/// What `sql`'s expressions can read (see [`Reads`]).
pub fn reads(sql: &str) -> Reads {
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => {
            let mut c = ReadsCollector::default();
            let _ = stmts.visit(&mut c);
            let items = select_items(&stmts).map(|exprs| {
                exprs
                    .into_iter()
                    .map(|e| {
                        let mut item = ReadsCollector::within(&c.relations);
                        let _ = e.visit(&mut item);
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
        Err(_) => {
            let all: BTreeSet<String> = words(sql).into_iter().collect();
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
    }
}

/// Collects [`Writes`] from every statement, nested ones too (a data-
/// modifying `WITH`).
struct WritesCollector {
    values: ReadsCollector,
    altered: BTreeSet<String>,
    stores: bool,
}

impl Visitor for WritesCollector {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        let v = &mut self.values;
        self.stores |= match s {
            Statement::CreateTable(ct) => ct.query.is_some(),
            Statement::Query(q) => stores(&q.body),
            Statement::Insert(_) | Statement::Update { .. } | Statement::Merge { .. } => true,
            _ => false,
        };
        match s {
            Statement::Insert(i) => {
                let _ = i.source.visit(v);
                let _ = i.assignments.visit(v);
                let _ = i.on.visit(v);
            }
            Statement::Update {
                assignments, from, ..
            } => {
                // The values stored and what they may come from (WHERE feeds
                // none by itself).
                for a in assignments {
                    let _ = a.value.visit(v);
                }
                let _ = from.visit(v);
            }
            Statement::CreateTable(ct) => {
                let _ = ct.query.visit(v);
            }
            // `SELECT … INTO`, or `WITH … INSERT/UPDATE/MERGE`: the whole
            // query (its WITH feeds what is stored).
            Statement::Query(q) if stores(&q.body) => {
                let _ = q.visit(v);
            }
            Statement::Merge { .. } => {
                let _ = s.visit(v);
            }
            Statement::AlterTable {
                name, operations, ..
            } => {
                if let Some(t) = last_part(name) {
                    self.altered.insert(t);
                }
                for op in operations {
                    if let AlterTableOperation::RenameColumn {
                        old_column_name, ..
                    } = op
                    {
                        v.reads.columns.insert(fold(old_column_name));
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            if storing(&f.name) {
                self.stores = true;
                let _ = f.args.visit(&mut self.values);
            }
        }
        ControlFlow::Continue(())
    }

    /// The same functions called in FROM (`FROM set_config(…)`, `FROM
    /// LATERAL pg_notify(…)`).
    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } if storing(name) => {
                self.stores = true;
                let _ = args.visit(&mut self.values);
            }
            TableFactor::Function { name, args, .. } if storing(name) => {
                self.stores = true;
                let _ = args.visit(&mut self.values);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Whether `name` is one of the [`STORING`] functions.
fn storing(name: &ObjectName) -> bool {
    last_part(name).is_some_and(|n| STORING.contains(&n.as_str()))
}

/// What column masking needs to know about a statement before it runs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// sqlparser parsed it (not tried for a plain read: nothing else here
    /// needs the parse).
    pub parsed: bool,
    /// It spells a Unicode-escaped identifier (`U&"…"`), which sqlparser
    /// reads as an `&` operator: a name hidden from every check.
    pub escaped_names: bool,
    /// Its words say a plain read or session control (see [`plain_read`]):
    /// it stores and reshapes nothing.
    pub plain_read: bool,
    /// It changes the schema beyond what column masking can follow (see
    /// `reshapes_of`).
    pub reshapes: bool,
    /// What it stores elsewhere (default when it did not parse).
    pub writes: Writes,
}

/// Whether `sql` spells a Unicode-escaped identifier (`U&"…"`).
fn unicode_escaped_identifier(sql: &str) -> bool {
    let b = sql.as_bytes();
    b.windows(3).enumerate().any(|(i, w)| {
        w[0].eq_ignore_ascii_case(&b'u')
            && w[1] == b'&'
            && w[2] == b'"'
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
    })
}

/// Whether every statement in `sql` starts with a keyword of a plain read
/// or of session and transaction control (cursors included), and no word is
/// `INTO`: text that stores and reshapes nothing, parsed or not. Tokens come
/// from sqlparser's tokenizer (comments and literals are not words); text it
/// cannot tokenize is no plain read.
fn plain_read(sql: &str) -> bool {
    use sqlparser::tokenizer::{Token, Tokenizer};
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
    // The common case without the tokenizer: one statement that starts
    // with SELECT and spells no INTO anywhere, and no function that stores
    // its arguments.
    let b = sql.trim_start().as_bytes();
    let spells = |word: &[u8]| spells(b, word);
    if b.len() > 6
        && b[..6].eq_ignore_ascii_case(b"select")
        && !(b[6].is_ascii_alphanumeric() || b[6] == b'_')
        && !b.contains(&b';')
        && !spells(b"into")
        && !(b.contains(&b'(') && STORING.iter().any(|f| spells(f.as_bytes())))
    {
        return true;
    }
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return false;
    };
    let mut first = true;
    for t in tokens {
        match t {
            Token::SemiColon => first = true,
            Token::Word(w) => {
                let w = w.value.to_lowercase();
                if w == "into"
                    || (first && !FIRST.contains(&w.as_str()))
                    || STORING.contains(&w.as_str())
                {
                    return false;
                }
                first = false;
            }
            _ => {}
        }
    }
    true
}

/// Parses `sql` once for [`Analysis`].
pub fn analyze(sql: &str) -> Analysis {
    let escaped_names = unicode_escaped_identifier(sql);
    if plain_read(sql) {
        // Most statements: one pass of the tokenizer, no parse.
        return Analysis {
            escaped_names,
            plain_read: true,
            ..Analysis::default()
        };
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => Analysis {
            parsed: true,
            escaped_names,
            plain_read: false,
            reshapes: reshapes_of(&stmts),
            writes: writes_of(&stmts),
        },
        Err(_) => Analysis {
            escaped_names,
            ..Analysis::default()
        },
    }
}

/// What `sql` stores elsewhere or reshapes (see [`Writes`]); `None` when it
/// does not parse. (The gateway uses [`analyze`].)
#[cfg(test)]
pub fn writes(sql: &str) -> Option<Writes> {
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    Some(writes_of(&stmts))
}

fn writes_of(stmts: &[Statement]) -> Writes {
    let mut all = ReadsCollector::default();
    for st in stmts {
        let _ = st.visit(&mut all);
    }
    let mut w = WritesCollector {
        values: ReadsCollector::within(&all.relations),
        altered: BTreeSet::new(),
        stores: false,
    };
    for st in stmts {
        let _ = st.visit(&mut w);
    }
    let mut values = w.values.finish();
    values.tables = all.reads.tables;
    Writes {
        values,
        altered: w.altered,
        stores: w.stores,
    }
}

/// Whether `body` stores rows: `SELECT … INTO`, or a data-modifying
/// statement as the body of a `WITH`.
fn stores(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(sel) => sel.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => stores(left) || stores(right),
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Merge(_) => true,
        _ => false,
    }
}

/// Whether `sql` changes the schema beyond what column masking can follow:
/// any DDL but creating tables (without `INHERITS`), indexes, schemas and
/// sequences, dropping anything, `COMMENT` and maintenance (`VACUUM`,
/// `ANALYZE`, `REINDEX`, `CLUSTER`). Views, functions, triggers, rules,
/// renames and `ALTER` can route masked values to names no rule covers.
fn reshapes_of(stmts: &[Statement]) -> bool {
    struct Ddl(bool);
    impl Visitor for Ddl {
        type Break = ();
        fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
            if let Statement::CreateTable(ct) = s {
                self.0 |= ct.inherits.is_some();
                return ControlFlow::Continue(());
            }
            let mut classes = BTreeSet::new();
            classify_statement(s, &mut classes);
            if classes.contains(&SqlClass::Ddl) {
                let w = words(&s.to_string());
                let w = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
                let harmless = match w(0) {
                    "drop" | "comment" | "vacuum" | "analyze" | "reindex" | "cluster" => true,
                    "create" => {
                        matches!(
                            w(1),
                            "index" | "unique" | "schema" | "sequence" | "temp" | "temporary"
                        ) && w(2) != "view"
                    }
                    _ => false,
                };
                self.0 |= !harmless;
            }
            ControlFlow::Continue(())
        }
    }
    let mut d = Ddl(false);
    for st in stmts {
        let _ = st.visit(&mut d);
    }
    d.0
}

/// The classes of a SQL string (possibly several statements).
pub fn classify(sql: &str) -> BTreeSet<SqlClass> {
    let mut out = BTreeSet::new();
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(stmts) => {
            if stmts.len() > 1 {
                out.insert(SqlClass::MultiStatement);
            }
            for s in &stmts {
                classify_statement(s, &mut out);
            }
        }
        Err(_) => {
            out.insert(SqlClass::Unparsed);
            let parts: Vec<&str> = sql.split(';').filter(|p| !p.trim().is_empty()).collect();
            if parts.len() > 1 {
                out.insert(SqlClass::MultiStatement);
            }
            for p in parts {
                by_keywords(&words(p), &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use SqlClass::*;

    fn c(sql: &str) -> Vec<SqlClass> {
        classify(sql).into_iter().collect()
    }

    #[test]
    fn statements_are_classified_from_the_ast() {
        assert_eq!(c("select * from t"), [Read]);
        assert_eq!(c("DELETE FROM t"), [Write, DeleteWithoutWhere]);
        assert_eq!(c("delete from t where id = 1"), [Write]);
        assert_eq!(c("update t set a = 1"), [Write, UpdateWithoutWhere]);
        assert_eq!(c("update t set a = 1 where b = 2"), [Write]);
        assert_eq!(c("truncate t"), [Write, Truncate]);
        assert_eq!(c("drop table t"), [Ddl, Drop]);
        assert_eq!(c("create table t (a int)"), [Ddl]);
        assert_eq!(c("grant select on t to bob"), [Dcl]);
        assert_eq!(
            c("select 1; delete from t"),
            [Read, Write, DeleteWithoutWhere, MultiStatement]
        );
        // A WHERE in a comment is not a WHERE clause.
        assert_eq!(
            c("delete from t -- where id = 1"),
            [Write, DeleteWithoutWhere]
        );
        assert_eq!(c("begin"), Vec::<SqlClass>::new());
        assert!(is_copy_out("COPY (select 1) TO STDOUT"));
    }

    #[test]
    fn statements_run_by_other_statements_are_classified_too() {
        // Data-modifying WITH, in either place PostgreSQL takes it.
        assert_eq!(
            c("WITH x AS (SELECT 1) DELETE FROM orders"),
            [Read, Write, DeleteWithoutWhere]
        );
        assert_eq!(
            c("with d as (delete from orders returning *) select * from d"),
            [Read, Write, DeleteWithoutWhere]
        );
        assert_eq!(
            c("WITH u AS (UPDATE t SET a = 0 RETURNING a) SELECT 1 UNION SELECT a FROM u"),
            [Read, Write, UpdateWithoutWhere]
        );
        assert_eq!(
            c("with d as (delete from t where id = 1 returning *) select * from d"),
            [Read, Write]
        );
        // EXPLAIN ANALYZE runs the statement; plain EXPLAIN does not.
        assert_eq!(
            c("EXPLAIN ANALYZE DELETE FROM orders"),
            [Read, Write, DeleteWithoutWhere]
        );
        assert_eq!(
            c("explain (analyze, buffers) update t set a = 1"),
            [Read, Write, UpdateWithoutWhere]
        );
        assert_eq!(c("explain (analyze false) delete from orders"), [Read]);
        assert_eq!(c("EXPLAIN DELETE FROM orders"), [Read]);
        // What PREPARE prepares is what EXECUTE runs.
        assert_eq!(
            c("PREPARE p AS UPDATE t SET a = 0"),
            [Write, UpdateWithoutWhere]
        );
        assert_eq!(c("prepare p (int) as drop table t"), [Ddl, Drop]);
        // COPY of a data-modifying query, and SELECT INTO (a new table).
        assert_eq!(
            c("COPY (DELETE FROM t RETURNING *) TO STDOUT"),
            [Read, Write, DeleteWithoutWhere]
        );
        assert_eq!(c("SELECT * INTO t2 FROM t"), [Read, Write, Ddl]);
        // Text that does not parse still shows its DML after WITH.
        let odd = c("WITH x AS (SELECT xmlelement(name foo)) DELETE FROM t");
        assert!(odd.contains(&Unparsed) && odd.contains(&DeleteWithoutWhere));
        assert!(hides_ascii("SJIS") && hides_ascii("Shift_JIS_2004") && hides_ascii("gb18030"));
        assert!(!hides_ascii("UTF8") && !hides_ascii("SQL_ASCII") && !hides_ascii("LATIN1"));
        assert_eq!(
            deallocations(
                "DEALLOCATE S1; deallocate \"Q\"; DEALLOCATE ALL; discard all; discard plans"
            ),
            [
                (Some("s1".into()), false),
                (Some("Q".into()), false),
                (None, false),
                (None, true)
            ]
        );
        assert!(deallocations("select 1").is_empty());
        assert!(deallocations("select xmlelement(name a) where s = 'discarded'").is_empty());
        assert_eq!(
            deallocations("deallocate xmlelement(name a)"),
            [(None, true)]
        );
        assert_eq!(
            executes_prepared("EXECUTE Held(1)"),
            Some(vec!["held".into()])
        );
        assert_eq!(executes_prepared("select 2"), Some(vec![]));
        assert_eq!(executes_prepared("EXPLAIN ANALYZE EXECUTE held"), None);
        assert_eq!(
            executes_prepared("DO $$ BEGIN EXECUTE 'EXECUTE held'; END $$"),
            None
        );
        assert!(prepares("select 1; PREPARE p AS DELETE FROM t"));
        assert!(prepares("prepare p as select xmlelement(name foo)"));
        assert!(!prepares("execute p"));
        assert!(!prepares("select 'prepare'"));
        assert!(!is_copy_out("copy t from stdin"));
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_name_every_column_and_table_an_expression_can_see() {
        let r = reads("SELECT upper(c.Card) AS x, \"Name\" FROM public.customers c WHERE ssn = $1");
        assert_eq!(r.columns, set(&["card", "name", "ssn"]));
        assert_eq!(r.tables, set(&["customers"]));
        assert!(!r.whole_rows && !r.unparsed);
        // Subqueries, CTEs and set operations are walked too.
        let r = reads(
            "WITH k AS (SELECT card FROM customers) SELECT (SELECT max(email) FROM people) FROM k UNION SELECT 'x'",
        );
        assert_eq!(r.columns, set(&["card", "email"]));
        assert_eq!(r.tables, set(&["customers", "k", "people"]));
        // Literals and comments are not columns; a plain `*` reads no whole
        // row as a value (its columns come back described).
        let r = reads("SELECT *, 'card' FROM customers -- card");
        assert!(r.columns.is_empty() && !r.whole_rows);
        assert!(!reads("SELECT count(*) FROM customers").whole_rows);
    }

    #[test]
    fn result_columns_map_to_select_items_only_when_they_are_the_select_list() {
        let r = reads("SELECT count(*), upper(c.card) AS u, (SELECT max(ssn) FROM p), row_to_json(c) FROM customers c JOIN t ON t.id = c.id WHERE name = 'x'");
        let items = r.items.expect("a plain select");
        assert_eq!(items.len(), 4);
        assert!(items[0].columns.is_empty() && !items[0].whole_rows);
        assert_eq!(items[1].columns, set(&["card"]));
        assert_eq!(items[2].columns, set(&["ssn"]));
        assert!(items[3].whole_rows && !items[1].whole_rows);
        assert_eq!(items[0].tables, set(&["customers", "p", "t"]));
        for sql in [
            "SELECT *, upper(name) FROM customers",
            "SELECT c.*, 1 FROM customers c",
            "SELECT u FROM (SELECT upper(card) AS u FROM customers) s",
            "WITH k AS (SELECT card FROM customers) SELECT card FROM k",
            "SELECT name FROM customers UNION SELECT card FROM customers",
            "SELECT g FROM generate_series(1, 3) g",
            "SELECT 1; SELECT 2",
            "INSERT INTO t SELECT 1 RETURNING *",
        ] {
            assert!(reads(sql).items.is_none(), "{sql}");
        }
    }

    #[test]
    fn writes_name_what_the_stored_values_read() {
        let w = writes("INSERT INTO copy SELECT id, upper(card) FROM customers WHERE ssn = '1'")
            .unwrap();
        assert_eq!(w.values.columns, set(&["card", "id", "ssn"]));
        assert!(!w.values.star && w.altered.is_empty());
        let w = writes("CREATE TABLE c2 AS SELECT * FROM customers").unwrap();
        assert!(w.values.star && w.values.tables.contains("customers"));
        let w = writes("SELECT * INTO c3 FROM customers").unwrap();
        assert!(w.values.star);
        let w = writes("UPDATE t SET a = c.card FROM customers c WHERE t.id = c.id").unwrap();
        assert_eq!(w.values.columns, set(&["card"]), "WHERE feeds no value");
        let w = writes("UPDATE t SET a = c FROM customers c").unwrap();
        assert!(w.values.whole_rows);
        let w = writes("ALTER TABLE public.customers RENAME COLUMN card TO c").unwrap();
        assert_eq!(w.altered, set(&["customers"]));
        assert!(w.values.columns.contains("card"));
        // Reads and deletes store nothing.
        for sql in [
            "SELECT card FROM customers",
            "DELETE FROM customers WHERE card = '1'",
            "CREATE VIEW v AS SELECT card FROM customers",
        ] {
            let w = writes(sql).unwrap();
            assert!(w.values.columns.is_empty() && !w.values.star, "{sql}");
        }
        // Data-modifying WITHs, and WITH or FROM feeding what is stored.
        for sql in [
            "WITH m AS (INSERT INTO copy SELECT card FROM customers RETURNING 1) SELECT count(*) FROM m",
            "WITH s AS (SELECT card x FROM customers) INSERT INTO t SELECT x FROM s",
            "UPDATE t SET a = s.x FROM (SELECT id, card x FROM customers) s WHERE t.id = s.id",
        ] {
            let w = writes(sql).unwrap();
            assert!(w.stores && w.values.columns.contains("card"), "{sql}: {w:?}");
        }
        // `TABLE t` stores every column of t.
        let w = writes("CREATE TABLE c AS TABLE customers").unwrap();
        assert!(w.stores && w.values.star && w.values.tables.contains("customers"));
        assert!(!writes("DELETE FROM customers").unwrap().stores);
        assert!(writes("DO $$ insert nonsense").is_none());
    }

    #[test]
    fn renamed_columns_table_queries_and_hidden_sources_are_seen() {
        let r = reads("SELECT upper(x) FROM accounts a(o, x)");
        assert!(r.whole_rows && r.items.is_none());
        let r = reads("SELECT row_to_json(t) FROM (TABLE customers) t");
        assert!(r.whole_rows && r.star && r.tables.contains("customers"));
        let r = reads("WITH s(o, x) AS (SELECT 1, 2) SELECT upper(x) FROM s");
        assert!(r.whole_rows);
        for sql in ["EXECUTE p", "FETCH ALL FROM c", "FETCH ALL c", "CALL p()"] {
            assert!(reads(sql).opaque, "{sql}");
        }
        assert!(!reads("SELECT 1").opaque);
    }

    /// What the gateway refuses as a schema change: DDL it parsed, or text
    /// that neither parses nor is a plain read.
    fn reshapes_schema(sql: &str) -> bool {
        let a = analyze(sql);
        a.reshapes || (!a.parsed && !a.plain_read)
    }

    #[test]
    fn schema_changes_masking_cannot_follow_are_recognised() {
        for sql in [
            "CREATE VIEW v AS SELECT card FROM customers",
            "CREATE OR REPLACE VIEW v AS SELECT 1",
            "CREATE MATERIALIZED VIEW v AS SELECT 1",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            "ALTER TABLE customers ADD COLUMN x text",
            "ALTER SCHEMA vault RENAME TO v2",
            "DO $$ BEGIN END $$",
            "CREATE TABLE c AS EXECUTE p",
            "CREATE TABLE c (a int) INHERITS (customers)",
            "SELECT 1; CREATE VIEW v AS SELECT 1",
            "CREATE TEMP VIEW v AS SELECT 1",
            "/* x */ DO $$ BEGIN END $$",
        ] {
            assert!(reshapes_schema(sql), "{sql}");
        }
        for sql in [
            "CREATE TABLE t (a int)",
            "CREATE TABLE c AS SELECT 1",
            "CREATE INDEX i ON t (a)",
            "DROP TABLE t",
            "COMMENT ON TABLE t IS 'x'",
            "VACUUM t",
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
            "DROP FUNCTION f",
            "DROP TRIGGER tr ON t",
            "CREATE SCHEMA s",
            "CREATE SEQUENCE q",
            "CREATE TEMP TABLE t (a int)",
            "BEGIN",
            "SET search_path = s",
            "GRANT SELECT ON t TO bob",
        ] {
            assert!(!reshapes_schema(sql), "{sql}");
        }
        // Names sqlparser cannot see.
        assert!(analyze("SELECT U&\"p\\0069n\" FROM t").escaped_names);
        assert!(!analyze("SELECT u FROM t WHERE a & 1 = 0").escaped_names);
        // What does not parse: a plain read, or not.
        let a = analyze("SELECT a OPERATOR(pg_catalog.~) 'x' FROM t (");
        assert!(!a.parsed && a.plain_read);
        assert!(analyze("begin; declare c cursor for select 1; fetch all c; commit").plain_read);
        assert!(analyze("  SELECT a FROM t WHERE b = 1").plain_read);
        assert!(!analyze("selectx()").plain_read);
        for sql in [
            "SELECT * INTO c FROM t (",
            "/* select */ DO $$ BEGIN END $$",
            "WITH x AS (",
            "select 1; do $$ begin end $$",
            // A call that keeps its arguments is parsed and judged.
            "SELECT set_config('a', card, false) FROM t",
            "select 1; SELECT PG_NOTIFY('c', card) FROM t",
        ] {
            assert!(!analyze(sql).plain_read, "{sql}");
        }
        let a = analyze("SELECT set_config('a', card, false) FROM t");
        assert!(a.parsed && a.writes.stores);
        assert!(a.writes.values.columns.contains("card"));
        assert!(!analyze("SELECT lower(card) FROM t").writes.stores);
    }

    #[test]
    fn where_postgres_and_sqlparser_split_text_differently_is_seen() {
        for (sql, conform) in [
            ("select 1 >-- '\n0; delete from t --'", true),
            ("select 1 %/* */ 2", true),
            ("select $\u{20ac}$'$\u{20ac}$ x", true),
            ("select '\\'' ; delete from t; select '\\''", false),
        ] {
            assert!(lexer_divergence(sql, conform).is_some(), "{sql}");
        }
        for (sql, conform) in [
            ("select 1 -- note\n, 2 /* c */ -- ---- \n", true),
            (
                "select 1 > -1, $$x$$, $tag$y$tag$, $\u{e9}t\u{e9}$z$\u{e9}t\u{e9}$",
                true,
            ),
            ("select 'a\\b'", true),
            ("select 'ab'", false),
        ] {
            assert_eq!(lexer_divergence(sql, conform), None, "{sql}");
        }
    }

    #[test]
    fn whole_row_values_are_seen() {
        for sql in [
            "SELECT c FROM customers c",
            "SELECT row_to_json(c) FROM customers AS c",
            "SELECT to_jsonb(customers) FROM customers",
            "SELECT to_jsonb(c.*) FROM customers c",
            "SELECT json_agg(x) FROM (SELECT * FROM customers) x",
            "SELECT (c).card FROM customers c",
            "SELECT array_agg(public.customers) FROM public.customers",
        ] {
            assert!(reads(sql).whole_rows, "{sql}");
        }
        // A column that merely shares no name with a relation is not a row.
        assert!(!reads("SELECT name FROM customers c").whole_rows);
    }

    #[test]
    fn unparsable_text_reads_every_word() {
        let r = reads("SELECT card FROM customers WHERE (");
        assert!(r.unparsed && r.whole_rows);
        assert!(r.columns.contains("card") && r.tables.contains("customers"));
    }

    #[test]
    fn unparsable_text_falls_back_to_keywords() {
        assert_eq!(
            c("DELETE FROM t USING ("),
            [Write, DeleteWithoutWhere, Unparsed]
        );
        assert_eq!(
            c("drop tabel x; select"),
            [Read, Ddl, Drop, MultiStatement, Unparsed]
        );
    }
}
