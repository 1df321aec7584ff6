//! SQL statement classes for guardrails, from the parsed AST (sqlparser,
//! PostgreSQL dialect), with a keyword fallback when a statement does not
//! parse. Pure: no I/O.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sqlparser::ast::Statement;
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

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn classify_statement(s: &Statement, out: &mut BTreeSet<SqlClass>) {
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

/// Whether the SQL contains a `COPY ... TO` (results leave as COPY data).
pub fn is_copy_out(sql: &str) -> bool {
    // Every COPY statement spells the keyword; most statements need no parse.
    if !sql
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"))
    {
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
                by_keyword(&words(p), &mut out);
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
        assert!(!is_copy_out("copy t from stdin"));
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
