//! Judging a session's statements: guardrails and masking for each one,
//! SQL `EXECUTE` and Bind rechecked when the policy changed, statements held
//! for approval, and the catalog lookups column masking needs.

use super::*;
use crate::gateway::judge::{Ruling, Standing};
use crate::policy::sql::Dialect;

impl<E: Engine> PgGateway<E> {
    /// Applies the policy's guardrails to one statement: `Ok` to run it
    /// (with the id of the approval request it runs on, when one was
    /// required and granted), `Err` with why it must not run.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn check_statement<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        sql: &str,
        session: &str,
        strings_conform: bool,
        unsafe_encoding: Option<&str>,
        prepared_as: Option<&str>,
        a: &Authorized,
        evq: &mut Vec<ev::event::Kind>,
        client: &mut S,
        cbuf: &mut BytesMut,
    ) -> Result<Option<u64>, Refusal> {
        let node = &self.tunnels.node;
        let policy = self
            .guard
            .local_policy(node)
            .map_err(|e| format!("policy unavailable: {e}"))?;
        // Guardrails and masking read the statement with sqlparser; where it
        // would split the text differently from PostgreSQL they could judge
        // another statement than the one that runs.
        if let Some(enc) = unsafe_encoding.filter(|_| !sql.is_ascii()) {
            tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: the gateway cannot read it as PostgreSQL does");
            return Err(format!(
                "the statement is refused: client_encoding {enc} can make PostgreSQL read its non-ASCII text differently from the gateway (use UTF8)"
            )
            .into());
        }
        let dialect = Dialect {
            legacy_strings: !strings_conform,
        };
        if a.read_only {
            use crate::policy::sql::{self, SqlClass};
            let classes = sql::facts(sql, dialect).classes().clone();
            if classes.iter().any(|c| *c != SqlClass::Read) || classes.is_empty() {
                let named: Vec<&str> = classes.iter().map(|c| c.as_str()).collect();
                tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: not a read on a read-only session");
                return Err(format!(
                    "only reads run here (this statement is {}); writes go through the execute_sql tool, under the policy",
                    named.join(", ")
                )
                .into());
            }
        }
        if a.masker.has_column_rules() {
            use crate::policy::sql;
            let facts = sql::facts(sql, dialect);
            if facts.copies_out() {
                return Err(
                    "COPY ... TO is refused under column masking; use SELECT (results are masked)"
                        .into(),
                );
            }
            // A copy of a masked column under another name (or a renamed
            // one, or a view or function over it) would no longer be masked;
            // text the gateway cannot read reliably could hide either.
            let an = facts.analysis();
            let refused = if !strings_conform {
                Some("standard_conforming_strings is off, so statements cannot be read reliably; it must stay on under column masking")
            } else if !an.parsed && !an.plain_read {
                Some("the statement does not parse and is not a plain read, which is refused under column masking")
            } else if an.reshapes {
                Some("schema changes other than creating tables, indexes, schemas and sequences, and DROP (views, functions, triggers, ALTER, renames, DO) are refused under column masking")
            } else if a.masker.writes_masked(&an.writes) {
                Some("the statement stores data from masked columns elsewhere, which is refused under column masking")
            } else if an.writes.stores
                && self
                    .views_read_masked(
                        &an.writes.values.tables.iter().cloned().collect::<Vec<_>>(),
                        a,
                        session,
                    )
                    .await
            {
                Some("the statement stores data from a view over masked columns elsewhere, which is refused under column masking")
            } else {
                None
            };
            if let Some(why) = refused {
                tracing::warn!(target: "audit", event = "statement_denied", subject = %a.id.subject, resource = %a.resource.name, "statement refused: masked data would leave its columns");
                return Err(why.into());
            }
        }
        match self.judge(&policy, sql, a, dialect)? {
            Ruling::Runs => Ok(None),
            Ruling::Held(d) => {
                if crate::policy::sql::facts(sql, dialect).prepares() {
                    return Err("a statement that needs approval cannot be prepared with PREPARE (each EXECUTE would run it again on one approval); run it directly".into());
                }
                if let Some(name) = prepared_as.filter(|n| !n.is_empty()) {
                    return Err(format!(
                        "a statement that needs approval must be prepared as the unnamed statement, not as {name:?} (SQL EXECUTE could run a named one again); use the simple query protocol or an unnamed Parse"
                    )
                    .into());
                }
                let doc = d
                    .approval
                    .clone()
                    .ok_or("approval required without an approval block")?;
                self.hold_for_approval(sql, session, a, evq, client, cbuf, &d, doc)
                    .await
                    .map(Some)
            }
        }
    }

    /// Whether the session's statements go unjudged now: it has no
    /// guardrails, masking or grant, and the policy is the one it started
    /// with (a changed policy is applied to each statement again).
    pub(super) fn unjudged(&self, a: &Authorized) -> bool {
        !a.judged
            && self
                .guard
                .local_policy(&self.tunnels.node)
                .is_ok_and(|p| Arc::ptr_eq(&p, &a.policy))
    }

    /// One of the session's statements, judged by the gateway with the
    /// policy in force now.
    pub(super) fn judge(
        &self,
        policy: &Arc<crate::policy::Policy>,
        sql: &str,
        a: &Authorized,
        dialect: Dialect,
    ) -> Result<Ruling, Refusal> {
        let standing = Standing {
            identity: &a.id,
            resource: &a.resource,
            started: &a.policy,
            mask: &a.mask,
        };
        Ok(crate::gateway::judge::judge(
            self.tunnels.node.store(),
            policy,
            &standing,
            Action::Connect,
            Some(sql),
            dialect,
        )?)
    }

    /// SQL `EXECUTE` of statements prepared earlier, judged again (as a Bind
    /// is, [`Self::recheck_bound`]) once the policy changed: each by the text
    /// the gateway holds for it; one the gateway cannot tell is refused.
    pub(super) fn recheck_executed(
        &self,
        sql: &str,
        relay: &Relay,
        a: &Authorized,
    ) -> Option<Refusal> {
        let names = crate::policy::sql::executes_prepared(sql);
        if names.as_ref().is_some_and(Vec::is_empty) {
            return None;
        }
        let policy = match self.guard.local_policy(&self.tunnels.node) {
            Ok(p) => p,
            Err(e) => return Some(format!("policy unavailable: {e}").into()),
        };
        if Arc::ptr_eq(&policy, &a.policy) {
            return None;
        }
        let Some(names) = names else {
            return Some("the policy changed since this session started, and this statement may EXECUTE a prepared statement the gateway cannot tell; reconnect".into());
        };
        for n in names {
            match relay.prepared_text(&n) {
                Some(text) => {
                    if let Some(r) = self.recheck_bound(&text, a) {
                        return Some(r);
                    }
                }
                None => {
                    return Some(format!(
                        "the policy changed since this session started, and prepared statement {n:?} is not one the gateway saw prepared; reconnect"
                    )
                    .into())
                }
            }
        }
        None
    }

    /// A Bind of a statement prepared earlier, judged again when that could
    /// now go otherwise: the policy changed since the session started, or
    /// the session runs under an access grant (which may have been
    /// cancelled). A statement a guardrail would now hold must be prepared
    /// again (and approved) under the new policy.
    pub(super) fn recheck_bound(&self, sql: &str, a: &Authorized) -> Option<Refusal> {
        let policy = match self.guard.local_policy(&self.tunnels.node) {
            Ok(p) => p,
            Err(e) => return Some(format!("policy unavailable: {e}").into()),
        };
        if a.grant.is_none() && Arc::ptr_eq(&policy, &a.policy) {
            return None;
        }
        match self.judge(&policy, sql, a, Dialect::default()) {
            Ok(Ruling::Runs) => None,
            Ok(Ruling::Held(_)) if Arc::ptr_eq(&policy, &a.policy) => None,
            Ok(Ruling::Held(_)) => Some(
                "the policy changed since this statement was prepared and a guardrail now holds it; prepare it again"
                    .into(),
            ),
            Err(r) => Some(r),
        }
    }

    /// Creates an approval request for `sql`, tells the client (NOTICE) and
    /// waits for the decision; an approval is spent on this execution (its
    /// request id is returned).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn hold_for_approval<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        sql: &str,
        session: &str,
        a: &Authorized,
        evq: &mut Vec<ev::event::Kind>,
        client: &mut S,
        cbuf: &mut BytesMut,
        d: &crate::policy::Decision,
        doc: crate::policy::ApprovalDoc,
    ) -> Result<u64, Refusal> {
        use crate::state::approvals::{approval_get, effective_status, ApprovalCommand};
        let node = &self.tunnels.node;
        let digest = crate::gateway::session::command_digest(sql);
        // Approvers see the statement as the evidence holds it: masked, where
        // masking cannot change how it reads. The digest of the text as
        // sent binds the approval to that exact statement.
        let shown = a.masker.mask_statement(sql).ok_or(
            "the statement cannot be shown to approvers with its sensitive values masked: masking would take away a line end, quote, `$`, backslash, `;` or comment delimiter and change how it reads",
        )?;
        // The same statement asked again (a client that did not wait, or a
        // reconnect) finds its own request: approved and unused runs now,
        // pending is waited on, instead of a new request each time.
        let id = crate::gateway::session::command_request(
            node,
            &self.notifier,
            crate::gateway::session::HeldCommand {
                identity: &a.id,
                resource: &a.resource.name,
                action: Action::Connect,
                shown,
                digest,
                rule: d.by.name().unwrap_or_default(),
                doc: &doc,
                via: "postgres",
                justification: String::new(),
            },
        )
        .await?;
        let approved =
            |r: &pb::ApprovalRequest| effective_status(r, now_ms()) == approvals::APPROVED;
        let already = matches!(approval_get(node.store(), id), Ok(Some(r)) if approved(&r));
        if !already && a.no_wait {
            return Err(format!(
                "approval required: request {id} ({}); not waiting (custody.no_wait): run the statement again once it is approved (custody approvals approve {id})",
                d.reason
            )
            .into());
        }
        if !already {
            let mut notice = BytesMut::new();
            pg::encode_notice(
                true,
                "NOTICE",
                "01000",
                &format!("approval required: request {id} ({}); waiting for a decision (custody approvals approve {id})", d.reason),
                &mut notice,
            );
            let _ = client.write_all(&notice).await;
            let _ = client.flush().await;
            loop {
                // Meanwhile the client is watched: one that disconnects
                // abandons the statement (it never runs, even if approved
                // later; the request stays for a retry). What it sends is
                // kept, up to a bound, for after the decision.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    n = client.read_buf(cbuf), if cbuf.len() < HELD_INPUT_BYTES => match n {
                        Ok(0) | Err(_) => {
                            return Err(Refusal::ClientGone(format!(
                                "the client disconnected while the statement was held for approval (request {id}); the statement was not run"
                            )))
                        }
                        Ok(_) => {}
                    },
                }
                let Ok(Some(r)) = approval_get(node.store(), id) else {
                    continue;
                };
                approvals::covers(&r, Action::Connect)?;
                match effective_status(&r, now_ms()) {
                    approvals::PENDING => continue,
                    approvals::APPROVED => break,
                    other => {
                        return Err(format!(
                            "approval request {id} is {other}; the statement was not run"
                        )
                        .into())
                    }
                }
            }
        }
        let spent = node
            .propose_retrying(
                crate::state::Command::Approval(Box::new(ApprovalCommand::Use(pb::UseApproval {
                    id,
                    requester: a.id.principal(),
                    resource: a.resource.name.clone(),
                    command_sha256: digest.to_vec().into(),
                    session_id: session.to_owned(),
                }))),
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        if let Some(why) = spent.rejected {
            return Err(why.into());
        }
        if let Ok(Some(r)) = approval_get(node.store(), id) {
            evq.push(crate::gateway::session::approval_event(&r));
        }
        Ok(id)
    }

    /// The names of the tables behind `fields` (from the cache, or looked up
    /// through the edge); `None` when the lookup failed.
    pub(super) async fn tables_of(
        &self,
        fields: &[pg::Field],
        a: &Authorized,
        session: &str,
    ) -> Option<catalog::Resolved> {
        let mut oids: Vec<u32> = fields
            .iter()
            .filter(|f| f.table_oid != 0)
            .map(|f| f.table_oid as u32)
            .collect();
        oids.sort_unstable();
        oids.dedup();
        let (mut found, missing) = self.catalog.get(&a.resource.name, &oids);
        if missing.is_empty() {
            return Some(found);
        }
        let r = self
            .catalog_lookup(a, session, |ch| catalog::lookup(ch, &missing))
            .await?;
        self.catalog.put(&a.resource.name, &r);
        found.extend(r);
        Some(found)
    }

    /// The definitions of the views among `names` (from the cache, or looked
    /// up through the edge); `None` when the lookup failed.
    pub(super) async fn views_of(
        &self,
        names: &[String],
        a: &Authorized,
        session: &str,
    ) -> Option<catalog::Views> {
        if names.iter().any(|n| catalog::unsearchable(n)) {
            return None;
        }
        let (mut found, missing) = self.catalog.get_views(&a.resource.name, names);
        if missing.is_empty() {
            return Some(found);
        }
        let v = self
            .catalog_lookup(a, session, |ch| catalog::lookup_views(ch, &missing))
            .await?;
        self.catalog.put_views(&a.resource.name, &v);
        found.extend(v);
        Some(found)
    }

    /// Runs one of the gateway's own catalog queries over a short-lived
    /// session through the resource's edge (the edge's credentials, never
    /// the client's session); `None` (logged) when it fails or times out.
    pub(super) async fn catalog_lookup<T, F, Fut>(
        &self,
        a: &Authorized,
        session: &str,
        run: F,
    ) -> Option<T>
    where
        F: FnOnce(crate::tunnel::SessionChannel) -> Fut,
        Fut: std::future::Future<Output = Result<T, catalog::CatalogError>>,
    {
        let looked_up = async {
            let channel = crate::gateway::open::service_stream(
                &self.tunnels,
                &a.resource.name,
                &a.candidates,
                format!("{session}-catalog"),
                "catalog lookup",
            )
            .await
            .map_err(|e| e.to_string())?;
            run(channel).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(catalog::LOOKUP_TIMEOUT, looked_up).await {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::warn!(session, resource = %a.resource.name, error = %e, "catalog lookup failed: columns are masked whole");
                None
            }
            Err(_) => {
                tracing::warn!(session, resource = %a.resource.name, "catalog lookup timed out: columns are masked whole");
                None
            }
        }
    }

    /// Whether a view among the relations `names` reads masked columns
    /// (`true` too when that cannot be looked up).
    pub(super) async fn views_read_masked(
        &self,
        names: &[String],
        a: &Authorized,
        session: &str,
    ) -> bool {
        if names.is_empty() {
            return false;
        }
        match self.views_of(names, a, session).await {
            None => true,
            Some(views) => views
                .values()
                .flat_map(|defs| defs.iter())
                .any(|def| a.masker.definition_reads_masked(def)),
        }
    }

    /// Whether the statement being answered reads masked columns, itself
    /// or through a view, or is unknown (a deferred error at Sync): its
    /// errors and notices may quote their values (`select card::int`).
    pub(super) async fn answer_reads_masked(
        &self,
        lineage: Option<Arc<relay::Lineage>>,
        a: &Authorized,
        session: &str,
    ) -> bool {
        match lineage {
            None => true,
            Some(l) => l.reads_masked || self.views_read_masked(&l.relations, a, session).await,
        }
    }

    /// For each of `n` result columns, whether it may hold masked values if
    /// it is computed (no table column behind it): its expression (or, when
    /// the result columns are not known to be the select list, its
    /// statement) reads masked columns, or a view the statement reads does
    /// (or that cannot be known).
    pub(super) async fn computed_columns_masked(
        &self,
        lineage: Option<Arc<relay::Lineage>>,
        n: usize,
        a: &Authorized,
        session: &str,
    ) -> Vec<bool> {
        // Column rules are in force (the relay knows every statement's
        // lineage): a result of no known statement fails closed.
        let Some(l) = lineage else {
            return vec![true; n];
        };
        let per_column = match &l.items {
            Some(items) if items.len() == n => items.clone(),
            _ => vec![l.reads_masked; n],
        };
        if per_column.iter().all(|m| *m) {
            return per_column;
        }
        if self.views_read_masked(&l.relations, a, session).await {
            vec![true; n]
        } else {
            per_column
        }
    }
}

/// The statement text of the Parse that stands in for a refused one: it
/// cannot parse, so the server answers it with an error in protocol order.
pub(super) const REFUSED_STAND_IN: &str = "custody_refused_statement";

pub(super) fn refused_parse(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(name.len() + REFUSED_STAND_IN.len() + 4);
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(REFUSED_STAND_IN.as_bytes());
    b.push(0);
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

/// Whether a server error is the answer to a stand-in Parse.
pub(super) fn is_refusal_stand_in(f: &Frame) -> bool {
    pg::decode_notice(&f.body)
        .is_ok_and(|n| n.get(b'M').is_some_and(|m| m.contains(REFUSED_STAND_IN)))
}

/// Client bytes read and kept while a statement is held for approval.
pub(super) const HELD_INPUT_BYTES: usize = 1 << 20;

/// Why a statement does not run.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Policy, an approval's outcome, or an error: the client gets an
    /// ErrorResponse (42501) saying so, and the session goes on.
    Denied(String),
    /// The client disconnected while the statement was held for approval:
    /// the session ends there (nothing after the held statement is sent).
    ClientGone(String),
}

impl From<String> for Refusal {
    fn from(why: String) -> Self {
        Refusal::Denied(why)
    }
}

impl From<crate::gateway::GatewayError> for Refusal {
    fn from(e: crate::gateway::GatewayError) -> Self {
        Refusal::Denied(e.to_string())
    }
}

impl From<&str> for Refusal {
    fn from(why: &str) -> Self {
        Refusal::Denied(why.to_owned())
    }
}
