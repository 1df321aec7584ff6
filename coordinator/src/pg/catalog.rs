//! Table and column names behind a result's RowDescription, for
//! `schema.table.column` masking rules.
//!
//! RowDescription carries each column's table OID and attribute number, not
//! names (the column name may be an alias). When a session's masking has
//! table-qualified rules, the gateway resolves unknown OIDs over a separate,
//! short-lived connection through the same edge (the edge's credentials, never
//! the client's session) and caches the names per resource for a minute. The
//! query building and result parsing here are sans-IO; [`lookup`] drives them
//! over a tunnel channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use custody_proto::pg::{self, btag, Limits};
use custody_proto::tunnel::v1 as t;

use crate::tunnel::session::frame;
use crate::tunnel::SessionChannel;

/// How long resolved names are trusted (a dropped and recreated table gets
/// a new OID; a renamed column shows up within this time).
pub const TTL: Duration = Duration::from_secs(60);
/// How long one lookup may take before the columns are treated as unknown.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One table's qualified name and its columns by attribute number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableNames {
    pub schema: String,
    pub table: String,
    pub columns: HashMap<i16, String>,
    /// For a view (or materialized view): its definition and those of the
    /// views it reads, transitively (PostgreSQL reports a view's columns
    /// under the view's OID, not the base table's).
    pub views: Vec<String>,
}

/// Resolved tables by OID.
pub type Resolved = HashMap<u32, Arc<TableNames>>;

/// The catalog queries for `oids` (numbers only: nothing from the client is
/// interpolated): the relations' columns (five values a row), then the
/// definitions of the views among them and of every view those read, found
/// through the views' rewrite rules' dependencies (two values a row).
pub fn query(oids: &[u32]) -> String {
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    let list = list.join(",");
    format!(
        "SELECT c.oid::int8, n.nspname, c.relname, a.attnum, a.attname \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
         WHERE c.oid IN ({list}) AND a.attnum > 0 AND NOT a.attisdropped; \
         WITH RECURSIVE reach(top, rel) AS ( \
           SELECT c.oid, c.oid FROM pg_catalog.pg_class c \
           WHERE c.oid IN ({list}) AND c.relkind IN ('v', 'm') \
           UNION \
           SELECT reach.top, d.refobjid FROM reach \
           JOIN pg_catalog.pg_rewrite r ON r.ev_class = reach.rel \
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass) \
         SELECT reach.top::int8, pg_catalog.pg_get_viewdef(reach.rel) FROM reach \
         JOIN pg_catalog.pg_class c ON c.oid = reach.rel WHERE c.relkind IN ('v', 'm')"
    )
}

/// Folds the catalog query's text rows into tables.
pub fn parse_rows(rows: &[Vec<Option<String>>]) -> Resolved {
    let mut out: HashMap<u32, TableNames> = HashMap::new();
    let mut views: Vec<(u32, String)> = Vec::new();
    for r in rows {
        if let [Some(oid), Some(def)] = &r[..] {
            if let Ok(oid) = oid.parse::<u32>() {
                views.push((oid, def.clone()));
            }
            continue;
        }
        let [Some(oid), Some(schema), Some(table), Some(attnum), Some(name)] = &r[..] else {
            continue;
        };
        let (Ok(oid), Ok(attnum)) = (oid.parse::<u32>(), attnum.parse::<i16>()) else {
            continue;
        };
        let t = out.entry(oid).or_insert_with(|| TableNames {
            schema: schema.clone(),
            table: table.clone(),
            columns: HashMap::new(),
            views: Vec::new(),
        });
        t.columns.insert(attnum, name.clone());
    }
    for (oid, def) in views {
        if let Some(t) = out.get_mut(&oid) {
            t.views.push(def);
        }
    }
    out.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the edge stream closed")]
    Closed,
    #[error("the edge could not connect: {0}")]
    Edge(String),
    #[error("catalog query failed: {0}")]
    Query(String),
    #[error("bad message from the server: {0}")]
    Protocol(#[from] pg::PgError),
}

/// Runs the catalog query for `oids` on a freshly opened session channel
/// (nothing sent yet) and ends the session.
pub async fn lookup(ch: SessionChannel, oids: &[u32]) -> Result<Resolved, CatalogError> {
    let SessionChannel { tx, mut rx } = ch;
    let send = |k| {
        let tx = tx.clone();
        async move { tx.send(frame(k)).await.map_err(|_| CatalogError::Closed) }
    };
    send(t::session_frame::Kind::PgStartup(t::PgStartup {
        params: Default::default(),
    }))
    .await?;
    match rx.recv().await.and_then(|f| f.kind) {
        Some(t::session_frame::Kind::Started(_)) => {}
        Some(t::session_frame::Kind::Error(e)) => return Err(CatalogError::Edge(e)),
        _ => return Err(CatalogError::Closed),
    }
    let mut out = BytesMut::new();
    let mut body = query(oids).into_bytes();
    body.push(0);
    pg::encode_frame(pg::ftag::QUERY, &body, &mut out);
    pg::encode_frame(pg::ftag::TERMINATE, &[], &mut out);
    send(t::session_frame::Kind::Data(t::Data {
        channel: t::Channel::Stdin as i32,
        data: out.freeze(),
    }))
    .await?;
    let limits = Limits {
        max_message: 1 << 20,
    };
    let mut buf = BytesMut::new();
    let mut rows = Vec::new();
    let mut error = None;
    let mut queried = false; // the greeting's ReadyForQuery comes first
    loop {
        let Some(f) = rx.recv().await.and_then(|f| f.kind) else {
            return Err(CatalogError::Closed);
        };
        let t::session_frame::Kind::Data(d) = f else {
            match f {
                t::session_frame::Kind::Error(e) => return Err(CatalogError::Edge(e)),
                t::session_frame::Kind::Exit(_) => return Err(CatalogError::Closed),
                _ => continue,
            }
        };
        buf.extend_from_slice(&d.data);
        while let Some(m) = pg::split_frame(&mut buf, limits)? {
            match m.tag {
                btag::DATA_ROW => rows.push(
                    pg::decode_data_row(&m.body)?
                        .into_iter()
                        .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                        .collect(),
                ),
                btag::ERROR_RESPONSE => error = Some(pg::decode_notice(&m.body)?.summary()),
                btag::COMMAND_COMPLETE => queried = true,
                btag::READY_FOR_QUERY if queried || error.is_some() => {
                    let _ = tx.send(frame(t::session_frame::Kind::Eof(t::Eof {}))).await;
                    return match error {
                        Some(e) => Err(CatalogError::Query(e)),
                        None => Ok(parse_rows(&rows)),
                    };
                }
                _ => {}
            }
        }
    }
}

/// A cached table: when it was resolved, and its names.
type Entry = (Instant, Arc<TableNames>);

/// Resolved names per resource, shared by the node's sessions.
#[derive(Debug, Default, Clone)]
pub struct Cache {
    inner: Arc<Mutex<HashMap<String, HashMap<u32, Entry>>>>,
}

impl Cache {
    /// The fresh entries for `oids`, and the OIDs still to look up.
    pub fn get(&self, resource: &str, oids: &[u32]) -> (Resolved, Vec<u32>) {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let tables = m.get(resource);
        let mut found = Resolved::new();
        let mut missing = Vec::new();
        for &oid in oids {
            match tables.and_then(|t| t.get(&oid)) {
                Some((at, t)) if at.elapsed() < TTL => {
                    found.insert(oid, t.clone());
                }
                _ => missing.push(oid),
            }
        }
        (found, missing)
    }

    pub fn put(&self, resource: &str, resolved: &Resolved) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for tables in m.values_mut() {
            tables.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        m.retain(|_, tables| !tables.is_empty());
        let now = Instant::now();
        let tables = m.entry(resource.to_owned()).or_default();
        for (oid, t) in resolved {
            tables.insert(*oid, (now, t.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some(s.to_string())).collect()
    }

    #[test]
    fn rows_fold_into_tables_and_bad_rows_are_skipped() {
        let r = parse_rows(&[
            row(&["16384", "public", "customers", "1", "id"]),
            row(&["16384", "public", "customers", "3", "email"]),
            row(&["16390", "billing", "cards", "2", "number"]),
            row(&["x", "public", "t", "1", "c"]),
            vec![Some("1".into()), None, None, None, None],
        ]);
        assert_eq!(r.len(), 2);
        let c = &r[&16384];
        assert_eq!(
            (c.schema.as_str(), c.table.as_str()),
            ("public", "customers")
        );
        assert_eq!(c.columns[&3], "email");
        assert_eq!(r[&16390].columns[&2], "number");
        assert!(c.views.is_empty());
    }

    #[test]
    fn view_definitions_join_their_view() {
        let r = parse_rows(&[
            row(&["16400", "public", "v", "1", "n"]),
            row(&["16400", " SELECT upper(card) AS n FROM w;"]),
            row(&["16400", " SELECT card FROM customers;"]),
            row(&["99", "no such relation"]),
        ]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[&16400].views.len(), 2);
    }

    #[test]
    fn the_query_holds_only_numbers() {
        let q = query(&[16384, 4_000_000_000]);
        assert!(q.contains("IN (16384,4000000000)"), "{q}");
    }

    #[test]
    fn the_cache_expires_nothing_fresh_and_reports_what_is_missing() {
        let c = Cache::default();
        let mut r = Resolved::new();
        r.insert(1, Arc::new(TableNames::default()));
        c.put("db", &r);
        let (found, missing) = c.get("db", &[1, 2]);
        assert!(found.contains_key(&1));
        assert_eq!(missing, vec![2]);
        let (found, missing) = c.get("other", &[1]);
        assert!(found.is_empty());
        assert_eq!(missing, vec![1]);
    }
}
