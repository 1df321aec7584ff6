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

/// Definitions of the views reached from the views `seed` selects (a
/// condition on `pg_class c`), through the views' rewrite rules'
/// dependencies: one row per (starting view, view reached), the first value
/// being `first` (an expression of the starting view, `t`), the second the
/// definition.
fn view_closure(seed: &str, first: &str) -> String {
    format!(
        "WITH RECURSIVE reach(top, rel) AS ( \
           SELECT c.oid, c.oid FROM pg_catalog.pg_class c \
           WHERE c.relkind IN ('v', 'm') AND {seed} \
           UNION \
           SELECT reach.top, d.refobjid FROM reach \
           JOIN pg_catalog.pg_rewrite r ON r.ev_class = reach.rel \
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
             AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass) \
         SELECT {first}, pg_catalog.pg_get_viewdef(reach.rel) FROM reach \
         JOIN pg_catalog.pg_class t ON t.oid = reach.top \
         JOIN pg_catalog.pg_class c ON c.oid = reach.rel WHERE c.relkind IN ('v', 'm')"
    )
}

/// The catalog queries for `oids` (numbers only: nothing from the client is
/// interpolated): the relations' columns (five values a row), then the
/// definitions of the views among them and of every view those read (two
/// values a row).
pub fn query(oids: &[u32]) -> String {
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    let list = list.join(",");
    format!(
        "SELECT c.oid::int8, n.nspname, c.relname, a.attnum, a.attname \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
         WHERE c.oid IN ({list}) AND a.attnum > 0 AND NOT a.attisdropped; {}",
        view_closure(&format!("c.oid IN ({list})"), "t.oid::int8")
    )
}

/// Relation names (lowercase) that are not looked up: a name the catalog
/// query cannot carry. Callers treat them as unknown (fail closed).
pub fn unsearchable(name: &str) -> bool {
    name.contains('\u{1}') || name.contains('\0')
}

/// The catalog query for the views (or materialized views) named `names`
/// (lowercase; in any schema): each one's lowercase name and the definitions
/// of it and of every view it reads (two values a row). The names travel
/// hex-encoded, so nothing in them is SQL.
pub fn views_query(names: &[String]) -> String {
    let joined = names.join("\u{1}");
    let hex: String = joined.bytes().map(|b| format!("{b:02x}")).collect();
    view_closure(
        &format!(
            "pg_catalog.lower(c.relname) = ANY (pg_catalog.string_to_array(\
             pg_catalog.convert_from(pg_catalog.decode('{hex}', 'hex'), 'UTF8'), pg_catalog.chr(1)))"
        ),
        "pg_catalog.lower(t.relname)",
    )
}

/// View definitions by view name (`names` not among them are no view).
pub type Views = HashMap<String, Arc<Vec<String>>>;

/// Folds the views query's rows: every name in `names` gets an entry.
pub fn parse_views(names: &[String], rows: &[Vec<Option<String>>]) -> Views {
    let mut out: HashMap<String, Vec<String>> =
        names.iter().map(|n| (n.clone(), Vec::new())).collect();
    for r in rows {
        if let [Some(name), Some(def)] = &r[..] {
            out.entry(name.clone()).or_default().push(def.clone());
        }
    }
    out.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
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
    Ok(parse_rows(&run(ch, &query(oids)).await?))
}

/// Runs the views query for `names` like [`lookup`].
pub async fn lookup_views(ch: SessionChannel, names: &[String]) -> Result<Views, CatalogError> {
    Ok(parse_views(names, &run(ch, &views_query(names)).await?))
}

/// Looks up the qualified name of the function with `oid` (a number: nothing
/// from the client is interpolated); `None` when there is none.
pub async fn lookup_function(ch: SessionChannel, oid: u32) -> Result<Option<String>, CatalogError> {
    let sql = format!(
        "SELECT n.nspname || '.' || p.proname FROM pg_catalog.pg_proc p \
         JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = {oid}"
    );
    Ok(run(ch, &sql)
        .await?
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten()))
}

/// Runs `sql` (the gateway's own catalog queries) on a freshly opened
/// session channel and ends the session: every row's values as text.
async fn run(ch: SessionChannel, sql: &str) -> Result<Vec<Vec<Option<String>>>, CatalogError> {
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
    let mut body = sql.as_bytes().to_vec();
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
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }
}

/// Looked-up values per resource and key, trusted for [`TTL`].
#[derive(Debug)]
struct Expiring<K, V> {
    by_resource: HashMap<String, HashMap<K, (Instant, V)>>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Self {
            by_resource: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Expiring<K, V> {
    /// The fresh entries for `keys`, and the keys still to look up.
    fn get(&self, resource: &str, keys: &[K]) -> (HashMap<K, V>, Vec<K>) {
        let entries = self.by_resource.get(resource);
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for k in keys {
            match entries.and_then(|e| e.get(k)) {
                Some((at, v)) if at.elapsed() < TTL => {
                    found.insert(k.clone(), v.clone());
                }
                _ => missing.push(k.clone()),
            }
        }
        (found, missing)
    }

    fn put(&mut self, resource: &str, values: &HashMap<K, V>) {
        for entries in self.by_resource.values_mut() {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        self.by_resource.retain(|_, e| !e.is_empty());
        let now = Instant::now();
        let entries = self.by_resource.entry(resource.to_owned()).or_default();
        for (k, v) in values {
            entries.insert(k.clone(), (now, v.clone()));
        }
    }
}

#[derive(Debug, Default)]
struct Caches {
    tables: Expiring<u32, Arc<TableNames>>,
    views: Expiring<String, Arc<Vec<String>>>,
}

/// Resolved names and view definitions per resource, shared by the node's
/// sessions.
#[derive(Debug, Default, Clone)]
pub struct Cache {
    inner: Arc<Mutex<Caches>>,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fresh entries for `oids`, and the OIDs still to look up.
    pub fn get(&self, resource: &str, oids: &[u32]) -> (Resolved, Vec<u32>) {
        self.lock().tables.get(resource, oids)
    }

    pub fn put(&self, resource: &str, resolved: &Resolved) {
        self.lock().tables.put(resource, resolved)
    }

    /// The fresh view entries for `names`, and the names still to look up.
    pub fn get_views(&self, resource: &str, names: &[String]) -> (Views, Vec<String>) {
        self.lock().views.get(resource, names)
    }

    pub fn put_views(&self, resource: &str, views: &Views) {
        self.lock().views.put(resource, views)
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
    fn view_names_travel_hex_encoded() {
        let q = views_query(&["v".into(), "x'; drop table t; --".into()]);
        assert!(!q.contains("drop table") && !q.contains("x';"), "{q}");
        assert!(q.contains(&format!("decode('76{}", "01")), "{q}");
        let v = parse_views(
            &["v".into(), "t".into()],
            &[row(&["v", " SELECT 1;"]), row(&["v", " SELECT 2;"])],
        );
        assert_eq!(v["v"].len(), 2);
        assert!(v["t"].is_empty(), "a name with no view row is no view");
        assert!(unsearchable("a\u{1}b") && !unsearchable("ab"));
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
        let mut v = Views::new();
        v.insert("v".into(), Arc::new(vec![]));
        c.put_views("db", &v);
        let (found, missing) = c.get_views("db", &["v".into(), "w".into()]);
        assert!(found.contains_key("v"));
        assert_eq!(missing, vec!["w".to_string()]);
    }
}
