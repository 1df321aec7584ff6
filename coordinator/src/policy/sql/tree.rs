//! Reading PostgreSQL's parse tree (pg_query's, as JSON): the statement
//! classes, what expressions read, what statements store and how they
//! reshape the schema. Every node is visited, wherever it sits, so a
//! statement or column cannot hide in a clause this module does not name.
//!
//! In the JSON form, a tree node is `{"node": {"SelectStmt": {…}}}`. A few
//! fields hold a node of a fixed type without that tag (an INSERT's target
//! table, a set operation's sides, an alias); they are known by shape.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::{Reads, SqlClass, Writes, RUNS_SQL, STORING, WRITING};

/// Calls `f` with every node under `v` (its type and its fields), parents
/// before children.
pub(super) fn visit<'a>(v: &'a Value, f: &mut dyn FnMut(&'a str, &'a Map<String, Value>)) {
    match v {
        Value::Object(m) => {
            if let Some((kind, body)) = tagged(m) {
                f(kind, body);
                for c in body.values() {
                    visit(c, f);
                }
                return;
            }
            if let Some(kind) = untagged_kind(m) {
                f(kind, m);
            }
            for c in m.values() {
                visit(c, f);
            }
        }
        Value::Array(a) => {
            for c in a {
                visit(c, f);
            }
        }
        _ => {}
    }
}

/// `{"node": {"Kind": {…}}}`.
fn tagged(m: &Map<String, Value>) -> Option<(&str, &Map<String, Value>)> {
    if m.len() != 1 {
        return None;
    }
    let Value::Object(inner) = m.get("node")? else {
        return None;
    };
    let (kind, body) = inner.iter().next().filter(|_| inner.len() == 1)?;
    match body {
        Value::Object(b) if kind.starts_with(|c: char| c.is_ascii_uppercase()) => {
            Some((kind.as_str(), b))
        }
        _ => None,
    }
}

/// The type of a node held without its tag, known by its fields.
fn untagged_kind(m: &Map<String, Value>) -> Option<&'static str> {
    if m.contains_key("relname") && m.contains_key("inh") {
        Some("RangeVar")
    } else if m.contains_key("aliasname") && m.contains_key("colnames") {
        Some("Alias")
    } else if m.contains_key("larg") && m.contains_key("target_list") && m.contains_key("op") {
        Some("SelectStmt")
    } else {
        None
    }
}

/// The node inside a `{"node": …}` value, if any.
pub(super) fn node(v: &Value) -> Option<(&str, &Map<String, Value>)> {
    match v {
        Value::Object(m) => tagged(m),
        _ => None,
    }
}

pub(super) fn is_null(m: &Map<String, Value>, field: &str) -> bool {
    m.get(field).is_none_or(Value::is_null)
}

fn list<'a>(m: &'a Map<String, Value>, field: &str) -> &'a [Value] {
    match m.get(field) {
        Some(Value::Array(a)) => a,
        _ => &[],
    }
}

fn text<'a>(m: &'a Map<String, Value>, field: &str) -> &'a str {
    m.get(field).and_then(Value::as_str).unwrap_or("")
}

fn int(m: &Map<String, Value>, field: &str) -> i64 {
    m.get(field).and_then(Value::as_i64).unwrap_or(0)
}

fn boolean(m: &Map<String, Value>, field: &str) -> bool {
    m.get(field).and_then(Value::as_bool).unwrap_or(false)
}

/// The string values of a list of `String` nodes (a qualified name).
fn names(v: &[Value]) -> impl Iterator<Item = &str> {
    v.iter().filter_map(|n| match node(n) {
        Some(("String", s)) => Some(text(s, "sval")),
        _ => None,
    })
}

/// The last part of a qualified function name, lowercase.
fn func_name(body: &Map<String, Value>) -> String {
    names(list(body, "funcname"))
        .last()
        .unwrap_or("")
        .to_lowercase()
}

const SETOP_NONE: i64 = 1;
const DISCARD_ALL: i64 = 1;
const OBJECT_MATVIEW: i64 = 24;

/// The classes of the statement node `kind` itself, not of the statements
/// inside it.
pub(super) fn classify_one(kind: &str, b: &Map<String, Value>, out: &mut BTreeSet<SqlClass>) {
    use SqlClass::*;
    let mut add = |cs: &[SqlClass]| out.extend(cs.iter().copied());
    match kind {
        "SelectStmt" if is_null(b, "into_clause") => add(&[Read]),
        // `SELECT … INTO` creates and fills a table.
        "SelectStmt" => add(&[Read, Write, Ddl]),
        "InsertStmt" | "MergeStmt" => add(&[Write]),
        "CopyStmt" if boolean(b, "is_from") => add(&[Write]),
        "CopyStmt" | "ExplainStmt" | "VariableShowStmt" => add(&[Read]),
        "UpdateStmt" if is_null(b, "where_clause") => add(&[Write, UpdateWithoutWhere]),
        "UpdateStmt" => add(&[Write]),
        "DeleteStmt" if is_null(b, "where_clause") => add(&[Write, DeleteWithoutWhere]),
        "DeleteStmt" => add(&[Write]),
        "TruncateStmt" => add(&[Write, Truncate]),
        "CallStmt" | "RefreshMatViewStmt" => add(&[Write]),
        // An anonymous code block can do anything.
        "DoStmt" => add(&[Write, Ddl]),
        "GrantStmt"
        | "GrantRoleStmt"
        | "AlterDefaultPrivilegesStmt"
        | "CreateRoleStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "ReassignOwnedStmt" => add(&[Dcl]),
        "DropRoleStmt" | "DropOwnedStmt" => add(&[Dcl, Drop]),
        _ if kind.starts_with("Drop") && kind.ends_with("Stmt") => add(&[Ddl, Drop]),
        // Session, transaction and cursor control; prepared statements
        // (what they run is classified where they are prepared).
        "TransactionStmt" | "VariableSetStmt" | "DeclareCursorStmt" | "FetchStmt"
        | "ClosePortalStmt" | "ListenStmt" | "UnlistenStmt" | "NotifyStmt" | "ExecuteStmt"
        | "PrepareStmt" | "DeallocateStmt" | "DiscardStmt" | "LockStmt" | "ConstraintsSetStmt"
        | "CheckPointStmt" | "LoadStmt" => {}
        // Every other statement changes the schema or the server.
        _ if kind.ends_with("Stmt") => add(&[Ddl]),
        _ => {}
    }
}

/// Whether an `EXPLAIN`'s options make it run the statement (`ANALYZE`,
/// unless given as false).
fn explain_runs(b: &Map<String, Value>) -> bool {
    list(b, "options").iter().any(|o| match node(o) {
        Some(("DefElem", d)) if text(d, "defname") == "analyze" => {
            match d.get("arg").and_then(node) {
                None => true,
                Some(("String", s)) => !matches!(
                    text(s, "sval").to_ascii_lowercase().as_str(),
                    "false" | "off" | "0" | "no"
                ),
                Some(("Integer", i)) => int(i, "ival") != 0,
                Some(("Boolean", x)) => boolean(x, "boolval"),
                Some(_) => true,
            }
        }
        _ => false,
    })
}

/// Classes of a statement and of every statement it runs: the DML of a
/// `WITH` clause, `COPY (DELETE … RETURNING …) TO`, what `EXPLAIN
/// ANALYZE` runs, what `PREPARE` prepares (what a later `EXECUTE` runs),
/// `SELECT … INTO` anywhere.
pub(super) fn classify_statement(kind: &str, b: &Map<String, Value>, out: &mut BTreeSet<SqlClass>) {
    match kind {
        "ExplainStmt" => {
            out.insert(SqlClass::Read);
            // Plain EXPLAIN only plans; with ANALYZE it runs the statement.
            if explain_runs(b) {
                if let Some((k, q)) = b.get("query").and_then(node) {
                    classify_statement(k, q, out);
                }
            }
        }
        "PrepareStmt" => {
            if let Some((k, q)) = b.get("query").and_then(node) {
                classify_statement(k, q, out);
            }
        }
        _ => {
            classify_one(kind, b, out);
            // A data-modifying statement with a WITH reads it.
            if matches!(
                kind,
                "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt"
            ) && !is_null(b, "with_clause")
            {
                out.insert(SqlClass::Read);
            }
            for c in b.values() {
                visit(c, &mut |k, n| match k {
                    "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                        classify_one(k, n, out)
                    }
                    "SelectStmt" if !is_null(n, "into_clause") => classify_one(k, n, out),
                    // `SELECT lo_unlink(…)`, `SELECT setval(…)`.
                    "FuncCall" if WRITING.contains(&func_name(n).as_str()) => {
                        out.insert(SqlClass::Write);
                    }
                    _ => {}
                });
            }
        }
    }
}

/// Whether `target` (a `ResTarget`) is `*` or `t.*`, and its `ColumnRef`.
fn star_target(target: &Map<String, Value>) -> Option<&Map<String, Value>> {
    match target.get("val").and_then(node) {
        Some(("ColumnRef", c)) if ends_in_star(c) => Some(c),
        _ => None,
    }
}

fn ends_in_star(c: &Map<String, Value>) -> bool {
    list(c, "fields")
        .last()
        .and_then(node)
        .is_some_and(|(k, _)| k == "AStar")
}

/// Collects [`Reads`] over trees.
#[derive(Default)]
pub(super) struct ReadsCollector {
    pub(super) reads: Reads,
    /// Single names used as values (columns, or whole rows of a relation).
    values: BTreeSet<String>,
    /// Relation names and aliases of every FROM item.
    pub(super) relations: BTreeSet<String>,
}

impl ReadsCollector {
    /// A collector that already knows the relation names and aliases of the
    /// statement around what it visits.
    pub(super) fn within(relations: &BTreeSet<String>) -> Self {
        Self {
            relations: relations.clone(),
            ..Self::default()
        }
    }

    pub(super) fn finish(mut self) -> Reads {
        self.reads.whole_rows |= self.values.intersection(&self.relations).next().is_some();
        self.reads
    }

    pub(super) fn collect(&mut self, v: &Value) {
        // `*` as a select target is a star, not a whole row used as a value.
        let mut targets: Vec<*const Map<String, Value>> = Vec::new();
        visit(v, &mut |kind, b| self.node(kind, b, &mut targets));
    }

    /// Collects a statement: the node itself, then everything under it.
    pub(super) fn collect_stmt(&mut self, kind: &str, b: &Map<String, Value>) {
        let mut targets: Vec<*const Map<String, Value>> = Vec::new();
        self.node(kind, b, &mut targets);
        for c in b.values() {
            visit(c, &mut |k, n| self.node(k, n, &mut targets));
        }
    }

    fn node(
        &mut self,
        kind: &str,
        b: &Map<String, Value>,
        targets: &mut Vec<*const Map<String, Value>>,
    ) {
        let r = &mut self.reads;
        match kind {
            "ResTarget" => {
                if let Some(c) = star_target(b) {
                    r.star = true;
                    targets.push(c as *const _);
                }
            }
            "ColumnRef" => {
                if ends_in_star(b) {
                    if !targets.contains(&(b as *const _)) {
                        r.whole_rows = true;
                    }
                } else if let Some(last) = names(list(b, "fields")).last() {
                    let last = last.to_lowercase();
                    r.columns.insert(last.clone());
                    self.values.insert(last);
                }
            }
            "RangeVar" => {
                let t = text(b, "relname").to_lowercase();
                self.relations.insert(t.clone());
                r.tables.insert(t);
            }
            // `t AS a(x, y)` renames columns: names no longer tell what is
            // read, so the rows count as read whole.
            "Alias" => {
                self.relations.insert(text(b, "aliasname").to_lowercase());
                if !list(b, "colnames").is_empty() {
                    r.whole_rows = true;
                }
            }
            // `WITH s(a, b) AS (…)` renames columns like an alias list does.
            "CommonTableExpr" if !list(b, "aliascolnames").is_empty() => {
                r.whole_rows = true;
            }
            "FuncCall" => {
                r.opaque |= RUNS_SQL.contains(&func_name(b).as_str());
            }
            "ExecuteStmt" | "FetchStmt" | "CallStmt" => r.opaque = true,
            _ => {}
        }
    }
}

/// Whether a FROM item reads a plain table under its own column names.
fn plain_from(v: &Value) -> bool {
    match node(v) {
        Some(("RangeVar", rv)) => rv
            .get("alias")
            .and_then(Value::as_object)
            .is_none_or(|a| list(a, "colnames").is_empty()),
        Some(("JoinExpr", j)) => {
            j.get("larg").is_some_and(plain_from)
                && j.get("rarg").is_some_and(plain_from)
                && is_null(j, "alias")
        }
        _ => false,
    }
}

/// The select list's expressions, when they are exactly the result columns
/// of `stmts` (see [`Reads::items`]).
pub(super) fn select_items(stmts: &[(String, Map<String, Value>)]) -> Option<Vec<&Value>> {
    let [(kind, s)] = stmts else {
        return None;
    };
    if kind != "SelectStmt"
        || !is_null(s, "with_clause")
        || !is_null(s, "into_clause")
        || int(s, "op") != SETOP_NONE
        || !list(s, "values_lists").is_empty()
        || !list(s, "from_clause").iter().all(plain_from)
    {
        return None;
    }
    list(s, "target_list")
        .iter()
        .map(|t| match node(t) {
            Some(("ResTarget", rt)) if star_target(rt).is_none() => rt.get("val"),
            _ => None,
        })
        .collect()
}

/// Collects [`Writes`]: what statements store, nested ones too (a data-
/// modifying `WITH`).
pub(super) fn writes_of(stmts: &[(String, Map<String, Value>)]) -> Writes {
    let mut all = ReadsCollector::default();
    for (kind, s) in stmts {
        all.collect_stmt(kind, s);
    }
    let mut values = ReadsCollector::within(&all.relations);
    let mut altered = BTreeSet::new();
    let mut stores = false;
    for (kind, s) in stmts {
        let mut each = |k: &str, b: &Map<String, Value>| {
            let feed = |values: &mut ReadsCollector, fields: &[&str]| {
                for f in fields {
                    if let Some(v) = b.get(*f) {
                        values.collect(v);
                    }
                }
            };
            match k {
                "CreateTableAsStmt" => {
                    stores = true;
                    feed(&mut values, &["query"]);
                }
                // `SELECT … INTO`: the whole query (its WITH feeds what is
                // stored).
                "SelectStmt" if !is_null(b, "into_clause") => {
                    stores = true;
                    collect_fields(&mut values, b);
                }
                "InsertStmt" => {
                    stores = true;
                    feed(
                        &mut values,
                        &["select_stmt", "on_conflict_clause", "with_clause"],
                    );
                }
                // The values stored and what they may come from (WHERE
                // feeds none by itself).
                "UpdateStmt" => {
                    stores = true;
                    for t in list(b, "target_list") {
                        if let Some(("ResTarget", rt)) = node(t) {
                            if let Some(v) = rt.get("val") {
                                values.collect(v);
                            }
                        }
                    }
                    feed(&mut values, &["from_clause", "with_clause"]);
                }
                "MergeStmt" => {
                    stores = true;
                    collect_fields(&mut values, b);
                }
                "AlterTableStmt" | "RenameStmt" => {
                    if let Some(rel) = b.get("relation").and_then(Value::as_object) {
                        altered.insert(text(rel, "relname").to_lowercase());
                    }
                    // A renamed column's old name.
                    if k == "RenameStmt" && !text(b, "subname").is_empty() {
                        values
                            .reads
                            .columns
                            .insert(text(b, "subname").to_lowercase());
                    }
                }
                "FuncCall" if STORING.contains(&func_name(b).as_str()) => {
                    stores = true;
                    feed(&mut values, &["args"]);
                }
                _ => {}
            }
        };
        each(kind, s);
        for c in s.values() {
            visit(c, &mut each);
        }
    }
    let mut values = values.finish();
    values.tables = all.reads.tables;
    Writes {
        values,
        altered,
        stores,
    }
}

/// Collects what every field of `b` reads.
fn collect_fields(c: &mut ReadsCollector, b: &Map<String, Value>) {
    for v in b.values() {
        c.collect(v);
    }
}

/// Whether the statements change the schema beyond what column masking can
/// follow: any DDL but creating tables (without `INHERITS`), indexes,
/// schemas and sequences, dropping anything, `COMMENT` and maintenance
/// (`VACUUM`, `ANALYZE`, `REINDEX`, `CLUSTER`). Views, functions, triggers,
/// rules, renames and `ALTER` can route masked values to names no rule
/// covers.
pub(super) fn reshapes_of(stmts: &[(String, Map<String, Value>)]) -> bool {
    let mut reshapes = false;
    for (kind, s) in stmts {
        let mut each = |k: &str, b: &Map<String, Value>| {
            reshapes |= match k {
                "CreateStmt" => !list(b, "inh_relations").is_empty(),
                // A materialized view, or a table filled by EXECUTE (from a
                // statement the text does not show).
                "CreateTableAsStmt" => {
                    int(b, "objtype") == OBJECT_MATVIEW
                        || b.get("query")
                            .and_then(node)
                            .is_some_and(|(q, _)| q == "ExecuteStmt")
                }
                "CommentStmt" | "VacuumStmt" | "ReindexStmt" | "ClusterStmt" | "IndexStmt"
                | "CreateSchemaStmt" | "CreateSeqStmt" => false,
                _ if k.starts_with("Drop") => false,
                _ => {
                    let mut classes = BTreeSet::new();
                    classify_one(k, b, &mut classes);
                    classes.contains(&SqlClass::Ddl) && k != "SelectStmt"
                }
            };
        };
        each(kind, s);
        for c in s.values() {
            visit(c, &mut each);
        }
    }
    reshapes
}

/// Whether every statement is a plain read or session and transaction
/// control (cursors included), and none stores anything.
pub(super) fn plain_read_of(stmts: &[(String, Map<String, Value>)], stores: bool) -> bool {
    !stores
        && stmts.iter().all(|(k, b)| match k.as_str() {
            "SelectStmt" => is_null(b, "into_clause"),
            "VariableShowStmt" | "FetchStmt" | "ClosePortalStmt" | "TransactionStmt"
            | "ListenStmt" | "UnlistenStmt" | "VariableSetStmt" => true,
            "DeclareCursorStmt" => true,
            _ => false,
        })
}

/// SQL `DEALLOCATE` and `DISCARD ALL` (see [`super::Facts::deallocations`]).
pub(super) fn deallocation(kind: &str, b: &Map<String, Value>) -> Option<(Option<String>, bool)> {
    match kind {
        "DeallocateStmt" if boolean(b, "isall") => Some((None, false)),
        "DeallocateStmt" => Some((Some(text(b, "name").to_owned()), false)),
        "DiscardStmt" if int(b, "target") == DISCARD_ALL => Some((None, true)),
        _ => None,
    }
}

/// The name an `EXECUTE` runs, and its parameters' tree.
pub(super) fn executed(kind: &str, b: &Map<String, Value>) -> Option<(String, String)> {
    (kind == "ExecuteStmt").then(|| {
        (
            text(b, "name").to_owned(),
            serde_json::to_string(&b.get("params")).unwrap_or_default(),
        )
    })
}
