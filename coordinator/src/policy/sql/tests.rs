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
    assert_eq!(
        c("prepare p (int) as delete from t"),
        [Write, DeleteWithoutWhere]
    );
    // PostgreSQL prepares only SELECT, VALUES and DML.
    assert_eq!(c("prepare p (int) as drop table t"), [Unparsed]);
    // COPY of a data-modifying query, and SELECT INTO (a new table).
    assert_eq!(
        c("COPY (DELETE FROM t RETURNING *) TO STDOUT"),
        [Read, Write, DeleteWithoutWhere]
    );
    assert_eq!(c("SELECT * INTO t2 FROM t"), [Read, Write, Ddl]);
    // Text that does not parse still shows its DML after WITH.
    let odd = c("WITH x AS (SELECT 1 +) DELETE FROM t");
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
    let w =
        writes("INSERT INTO copy SELECT id, upper(card) FROM customers WHERE ssn = '1'").unwrap();
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
    // Unicode-escaped names are read as PostgreSQL reads them.
    assert_eq!(reads("SELECT U&\"p\\0069n\" FROM t").columns, set(&["pin"]));
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

/// Statements read as PostgreSQL's own scanner reads them: what an
/// approximate tokenizer would have read otherwise (comments right after an
/// operator, dollar quotes with non-ASCII tags, backslashes when
/// `standard_conforming_strings` is off, comment-like text in literals).
#[test]
fn text_is_read_the_way_postgres_reads_it() {
    // `>--` is `>` and a comment: the DELETE on the next line runs.
    let hidden = c("select 1 >-- '\n0; delete from t --'");
    assert!(
        hidden.contains(&DeleteWithoutWhere) && hidden.contains(&MultiStatement),
        "{hidden:?}"
    );
    assert_eq!(c("select 1 %/* */ 2"), [Read]);
    // A dollar quote whose tag is non-ASCII holds the quote character.
    assert_eq!(c("select $\u{20ac}$'$\u{20ac}$ x"), [Read]);
    // Comment-like text inside literals is text.
    assert_eq!(c("SELECT xml '<!-- hi--> <a/>'"), [Read]);
    assert_eq!(
        c("SELECT ts_headline('english', '<p>a<!-- b --></p>', to_tsquery('a'))"),
        [Read]
    );
    assert_eq!(c("SELECT 1 <-- comment\n 2"), [Read]);
    // With standard_conforming_strings off, `\'` escapes the quote: three
    // statements, one a DELETE. With it on, the same text does not parse.
    let sql = "select '\\'' ; delete from t; select '\\''";
    let legacy = facts(
        sql,
        Dialect {
            legacy_strings: true,
        },
    );
    assert!(legacy.parsed());
    assert!(
        legacy.classes().contains(&DeleteWithoutWhere),
        "{:?}",
        legacy.classes()
    );
    assert!(!facts(sql, Dialect::default()).parsed());
    // PL/pgSQL bodies are string constants; backslashes in them are text.
    assert_eq!(
        c("CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN E'a\\\\b'; END $$"),
        [Ddl]
    );
    // What functions that run SQL could run is not visible: opaque.
    assert!(
        reads("SELECT * FROM query_to_xml('select ssn from customers', true, false, '')").opaque
    );
    // Functions that change stored data make a statement a write.
    assert_eq!(c("SELECT lo_unlink(16400)"), [Read, Write]);
    assert_eq!(c("SELECT pg_catalog.lowrite($1, $2)"), [Read, Write]);
    assert_eq!(c("SELECT pg_catalog.loread($1, $2)"), [Read]);
    // Nested WITH and DML hidden in a subquery's CTE.
    assert_eq!(
        c("WITH a AS (WITH b AS (UPDATE t SET x = 1 RETURNING x) SELECT * FROM b) SELECT * FROM a"),
        [Read, Write, UpdateWithoutWhere]
    );
    assert_eq!(
        c("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s"),
        [Read, Write, DeleteWithoutWhere]
    );
    assert_eq!(
        c("WITH x AS (DELETE FROM t RETURNING *) SELECT 1"),
        [Read, Write, DeleteWithoutWhere]
    );
    // Statements in a CREATE SCHEMA reshape the schema.
    assert!(analyze("CREATE SCHEMA s CREATE VIEW v AS SELECT 1").reshapes);
    // The same text is parsed once while it is recent.
    let a = facts("select 42 /* cache */", Dialect::default());
    let b = facts("select 42 /* cache */", Dialect::default());
    assert!(Arc::ptr_eq(&a, &b));
    let other = facts(
        "select 42 /* cache */",
        Dialect {
            legacy_strings: true,
        },
    );
    assert!(!Arc::ptr_eq(&a, &other));
}

/// Token spans cover literals, comments and identifiers, not operators.
#[test]
fn tokens_say_which_hold_values() {
    let sql = "select 'a' -- x\n+ b";
    let spans = token_spans(sql).unwrap();
    let valued: Vec<&str> = spans
        .iter()
        .filter(|s| s.2)
        .map(|s| &sql[s.0..s.1])
        .collect();
    assert_eq!(valued, ["'a'", "-- x", "b"]);
    assert!(token_spans("select 'open").is_none());
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
