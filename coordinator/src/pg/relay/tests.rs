//! Tests of the relay core.
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
    let bind = |r: &mut Relay, statement: &str, portal: &str| {
        r.client(&bind(portal, statement, &[])).unwrap().refused
    };
    // One Bind; its portal's Execute is the one execution, after which
    // the statement is closed at the server.
    assert_eq!(bind(&mut r, "held", ""), None);
    let again = bind(&mut r, "held", "p2").expect("a second Bind is refused");
    assert!(again.contains("approval request 7"), "{again}");
    let step = r.client(&execute("")).unwrap();
    assert_eq!(
        (step.refused, step.close_statement.as_deref()),
        (None, Some("held"))
    );
    assert_eq!(r.close_statement("held"), b"Sheld\0");
    assert!(!r.statements.contains_key("held"));
    let after = bind(&mut r, "held", "").expect("refused after it ran");
    assert!(after.contains("approval request 7"), "{after}");
    // Other statements are not limited.
    assert_eq!(bind(&mut r, "other", ""), None);
    assert_eq!(bind(&mut r, "other", ""), None);
    // Parsed again (checked again by the gateway), it starts over.
    r.client(&parse("held", "delete from t")).unwrap();
    r.runs_once("held", 9);
    assert_eq!(bind(&mut r, "held", ""), None);
    assert!(bind(&mut r, "held", "").is_some_and(|m| m.contains("request 9")));
    // Re-parsing a name that exists is refused (the server would refuse
    // it too), and an approval for it renews nothing.
    let step = r.client(&parse("other", "delete from t")).unwrap();
    assert!(step.refused.is_some_and(|m| m.contains("already exists")));
    r.runs_once("other", 10);
    assert!(!r
        .approved_once
        .contains_key(&r.statements["other"].generation));
}

#[test]
fn an_approved_statement_replaced_by_the_client_is_not_closed_again() {
    let mut r = Relay::default();
    r.client(&parse("", "delete from t")).unwrap();
    r.runs_once("", 7);
    r.client(&bind("p", "", &[])).unwrap();
    // The client parses another unnamed statement before executing p.
    r.client(&parse("", "select 1")).unwrap();
    let step = r.client(&execute("p")).unwrap();
    assert_eq!(step.close_statement, None);
    assert!(r.client(&bind("", "", &[])).unwrap().refused.is_none());
}

#[test]
fn deallocate_through_the_extended_protocol_is_followed() {
    let mut r = Relay::default();
    r.client(&parse("s", "select 'x' as c")).unwrap();
    r.client(&parse("", "DEALLOCATE s")).unwrap();
    r.client(&bind("", "", &[])).unwrap();
    assert!(r.statements.contains_key("s"));
    r.client(&execute("")).unwrap();
    assert!(!r.statements.contains_key("s"));
    assert!(r.client(&bind("", "s", &[])).unwrap().refused.is_some());
}

#[test]
fn a_skipped_close_leaves_the_approved_statement_refused() {
    let mut r = Relay::new(Caps::default());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&parse("held", "delete from t")).unwrap();
    r.runs_once("held", 7);
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&bind("", "held", &[])).unwrap();
    let step = r.client(&execute("")).unwrap();
    r.close_statement(step.close_statement.as_deref().unwrap());
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    // The Execute fails: the server skips the gateway's Close, so the
    // statement is still there, and still refused.
    assert!(!r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap());
    r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    assert!(r.statements.contains_key("held"));
    assert!(r.client(&bind("", "held", &[])).unwrap().refused.is_some());
    // When the Close is applied, its answer is the gateway's own.
    let mut r = Relay::new(Caps::default());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&parse("held", "delete from t")).unwrap();
    r.runs_once("held", 8);
    r.client(&bind("", "held", &[])).unwrap();
    let step = r.client(&execute("")).unwrap();
    r.close_statement(step.close_statement.as_deref().unwrap());
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    assert!(!r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap());
    assert!(!r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap());
    r.track(&tag_only(btag::COMMAND_COMPLETE, b"DELETE 1\0"))
        .unwrap();
    assert!(r.track(&tag_only(btag::CLOSE_COMPLETE, b"")).unwrap());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    assert!(r.owed.is_empty());
}

#[test]
fn names_follow_what_the_server_applied() {
    let mut r = Relay::new(Caps::default());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&parse("s", "select card from customers")).unwrap();
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    let g = r.statements["s"].generation;
    // A sequence that fails before its Close and Parse: the server keeps
    // "s" as it was, and so does the gateway.
    r.client(&parse("", "select 1/0")).unwrap();
    r.client(&bind("", "", &[])).unwrap();
    r.client(&execute("")).unwrap();
    r.client(&target(ftag::CLOSE, b'S', "s")).unwrap();
    r.client(&parse("s", "select 1")).unwrap();
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    assert!(!r.statements.contains_key("s") || r.statements["s"].generation != g);
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    assert_eq!(r.statements["s"].generation, g);
    assert_eq!(&*r.statements["s"].text, "select card from customers");
    // Parse of a name that exists changes nothing (the server refuses it).
    r.client(&parse("s", "select 2")).unwrap();
    assert_eq!(r.statements["s"].generation, g);
    // Names the gateway does not know (SQL PREPARE, DEALLOCATE) are
    // refused at Bind and Execute.
    r.client(&tag_only(ftag::QUERY, b"DEALLOCATE s\0")).unwrap();
    assert!(!r.statements.contains_key("s"));
    assert!(r.client(&bind("", "s", &[])).unwrap().refused.is_some());
    assert!(r.client(&execute("cursor1")).unwrap().refused.is_some());
    // A sequence already sent after the failed one keeps its own change.
    let mut r = Relay::new(Caps::default());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&parse("a", "select 1/0")).unwrap();
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    r.client(&target(ftag::CLOSE, b'S', "a")).unwrap();
    r.client(&parse("a", "select 2")).unwrap();
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    let second = r.statements["a"].generation;
    r.track(&tag_only(btag::ERROR_RESPONSE, b"\0")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    assert_eq!(r.statements["a"].generation, second);
    r.track(&tag_only(btag::CLOSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    assert_eq!(&*r.statements["a"].text, "select 2");
}

#[test]
fn the_gateways_own_describe_gives_the_rows_columns() {
    let mut r = Relay::new(Caps::default());
    r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    r.client(&parse("s", "select x")).unwrap();
    r.client(&bind("", "s", &[])).unwrap();
    let e = execute("");
    r.client(&e).unwrap();
    let body = r.describe_before_execute(&e).unwrap();
    assert_eq!(body, b"P\0");
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    assert!(!r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap());
    assert!(!r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap());
    assert!(r.track(&row_description(&[("card", 25, 1)])).unwrap());
    r.track(&data_row()).unwrap();
    assert_eq!(names(&r), Some(vec![("card".into(), 1)]));
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
            continued: false,
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
        r.client(&parse("", sql)).unwrap();
        r.client(&target(ftag::DESCRIBE, b'S', "")).unwrap();
        r.client(&bind("", "", &[])).unwrap();
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
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
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
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&row_description(&[("note", 25, 0)])).unwrap();
    r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
    r.track(&row_description(&[("secret", 25, 0)])).unwrap();
    r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
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
        r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
        r.track(&row_description(&[(col, 25, 0)])).unwrap();
        r.track(&tag_only(btag::READY_FOR_QUERY, b"I")).unwrap();
    }
    r.client(&bind("", "a", &[1])).unwrap();
    r.client(&execute("")).unwrap();
    r.client(&bind("", "b", &[0])).unwrap();
    r.client(&execute("")).unwrap();
    r.client(&tag_only(ftag::SYNC, b"")).unwrap();
    r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
    r.track(&data_row()).unwrap();
    assert_eq!(names(&r), Some(vec![("secret".into(), 1)]));
    r.track(&tag_only(btag::COMMAND_COMPLETE, b"SELECT 1\0"))
        .unwrap();
    r.track(&tag_only(btag::BIND_COMPLETE, b"")).unwrap();
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
        r.track(&tag_only(btag::PARSE_COMPLETE, b"")).unwrap();
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
    let c = Caps::from_labels(&l(&[("evidence_rows", "10"), ("evidence_bytes", "4MiB")])).unwrap();
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
