//! The pump: client and server messages relayed in both directions, each
//! checked against what the other side owes, judged, masked and recorded.

use super::*;

impl<E: Engine> PgGateway<E> {
    /// Relays until either side ends. `out` holds bytes for the client
    /// (the gateway's own greeting).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pump<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        s: &mut S,
        cbuf: &mut BytesMut,
        out: BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        rec: &SessionRecorder,
        strict: bool,
        a: &Authorized,
        live: &mut crate::gateway::live::LiveSession,
    ) -> Result<&'static str, Fatal> {
        // Events are handed to the recorder in batches: one message per read
        // from either side (or with the commit before a statement runs).
        let mut evq = Vec::new();
        let r = self
            .relay_frames(s, cbuf, out, tx, rx, rec, &mut evq, strict, a, live)
            .await;
        // Whatever ended the session, what it did so far is recorded.
        let _ = rec.record_all(evq).await;
        r
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn relay_frames<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        s: &mut S,
        cbuf: &mut BytesMut,
        out: BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        strict: bool,
        a: &Authorized,
        live: &mut crate::gateway::live::LiveSession,
    ) -> Result<&'static str, Fatal> {
        let mut st = ServerSide {
            relay: if a.masker.has_column_rules() {
                let m = a.masker.clone();
                Relay::new(a.caps).with_lineage(move |sql| {
                    let reads = crate::policy::sql::reads(sql);
                    relay::Lineage {
                        reads_masked: m.reads_masked(&reads),
                        items: reads
                            .items
                            .as_ref()
                            .map(|items| items.iter().map(|r| m.reads_masked(r)).collect()),
                        relations: reads.tables.into_iter().collect(),
                    }
                })
            } else {
                Relay::new(a.caps)
            },
            sbuf: BytesMut::new(),
            shape_gen: u64::MAX,
            shape: Shape::default(),
            substituted: Default::default(),
            rfq_seen: 0,
            strings_conform: true,
            unsafe_encoding: None,
            functions: Default::default(),
            out,
        };
        let mut unsynced = false; // extended-protocol messages forwarded since Sync
                                  // ReadyForQuery messages owed so far: the server's greeting ends with one.
        let mut rfq_expected: u64 = 1;
        let mut doomed = false; // the rest of this sequence fails at the server
        let mut executed_unsynced = false; // an Execute went out since Sync
                                           // A session opened under an access grant ends when the grant does.
        let grant_end = async {
            match &a.grant {
                Some(g) => {
                    tokio::time::sleep(Duration::from_millis(
                        g.access_until_ms.saturating_sub(now_ms()),
                    ))
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(grant_end);
        loop {
            if !st.out.is_empty() {
                write_flush(s, &st.out).await?;
                st.out.clear();
            }
            tokio::select! {
                n = s.read_buf(cbuf) => {
                    match n {
                        Ok(0) | Err(_) => return Ok("client disconnected"),
                        Ok(_) => {}
                    }
                    let mut to_edge = BytesMut::new();
                    let mut terminate = false;
                    loop {
                        let f = match pg::split_frame(cbuf, self.limits) {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(e) => return Err(fatal("08P01", e.to_string())),
                        };
                        if doomed {
                            // The server discards everything up to Sync after the
                            // stand-in's error; nothing of it is sent (so nothing
                            // can run unchecked) or recorded, except Flush.
                            match f.tag {
                                pg::ftag::SYNC => doomed = false,
                                pg::ftag::FLUSH => {
                                    f.encode(&mut to_edge);
                                    continue;
                                }
                                _ => continue,
                            }
                        }
                        if f.tag == pg::ftag::QUERY && unsynced {
                            // The server would skip it after an error in the
                            // sequence, and answers could no longer be matched.
                            return Err(fatal("08P01", "a simple Query inside an unfinished extended-protocol sequence (send Sync first)"));
                        }
                        // How a statement with a backslash or non-ASCII text
                        // reads depends on settings (standard_conforming_strings,
                        // client_encoding) that statements still running may
                        // change: it is checked once they have finished.
                        // Without rules (and the policy unchanged) statements
                        // are recorded, not judged: the server answers them.
                        let unjudged = matches!(f.tag, pg::ftag::QUERY | pg::ftag::PARSE | pg::ftag::BIND | pg::ftag::FUNCTION_CALL)
                            && self.unjudged(a);
                        let mut out_of_order = false;
                        if !unjudged && statement_bytes(&f).iter().any(|b| *b == b'\\' || !b.is_ascii()) {
                            if executed_unsynced {
                                out_of_order = true;
                            } else if st.rfq_seen < rfq_expected {
                                rec.record_all(std::mem::take(evq)).await.map_err(commit_err)?;
                                if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                                    return Ok(end);
                                }
                                while st.rfq_seen < rfq_expected {
                                    if !st.out.is_empty() {
                                        write_flush(s, &st.out).await?;
                                        st.out.clear();
                                    }
                                    if let Some(end) = self.on_edge_frame(&mut st, rx.recv().await, s, rec, evq, a).await? {
                                        return Ok(end);
                                    }
                                }
                            }
                        }
                        let mut step = st.relay.client(&f).map_err(|e| fatal("08P01", e.to_string()))?;
                        for e in &mut step.events {
                            mask_client_event(&a.masker, e);
                        }
                        let call = if f.tag == pg::ftag::FUNCTION_CALL {
                            let call = fastpath::decode(&f.body).map_err(|e| fatal("08P01", e.to_string()))?;
                            let name = self.function_name(call.oid, &mut st.functions, a, rec.session_id()).await;
                            // The evidence names the function and its arguments.
                            let shown = format!("{}({})", name.as_deref().unwrap_or(&format!("function {}", call.oid)), call.args.join(", "));
                            for e in &mut step.events {
                                if let ev::event::Kind::Command(c) = e {
                                    c.text = shown.clone();
                                }
                            }
                            Some((call, name))
                        } else {
                            None
                        };
                        evq.extend(step.events);
                        let refusal = if let Some((call, name)) = call.as_ref().filter(|_| !unjudged) {
                            self.check_function_call(name.as_deref(), call, rec.session_id(), a, evq, s, cbuf).await.err()
                        } else if call.is_some() {
                            None
                        } else if out_of_order {
                            Some(Refusal::from("a statement with a backslash or non-ASCII text must not follow an Execute in the same sequence: the gateway reads it with settings that Execute may change (send Sync before it)"))
                        } else if let Some(why) = step.refused {
                            Some(Refusal::from(why))
                        } else if unjudged {
                            None
                        } else if let Some(r) = step.bound.as_deref().and_then(|sql| self.recheck_bound(sql, a)) {
                            Some(r)
                        } else if let Some(r) = step.statement.as_deref().and_then(|sql| self.recheck_executed(sql, &st.relay, a)) {
                            Some(r)
                        } else if let Some(sql) = step.statement {
                            match self.check_statement(&sql, rec.session_id(), st.strings_conform, st.unsafe_encoding.as_deref(), step.prepared_as.as_deref(), a, evq, s, cbuf).await {
                                Ok(Some(request)) => {
                                    // One approval, one execution of a
                                    // statement prepared on it.
                                    if let Some(name) = &step.prepared_as {
                                        st.relay.runs_once(name, request);
                                    }
                                    None
                                }
                                Ok(_) => None,
                                Err(r) => Some(r),
                            }
                        } else {
                            None
                        };
                        let refusal = match refusal {
                            Some(Refusal::ClientGone(gone)) => {
                                evq.push(ev::event::Kind::Outcome(ev::Outcome {
                                    exit_code: 1,
                                    error: gone,
                                    ..Default::default()
                                }));
                                // What came before the held statement was
                                // recorded as sent: it goes; nothing after it
                                // does.
                                self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await?;
                                return Ok("the client disconnected while a statement was held for approval");
                            }
                            Some(Refusal::Denied(why)) => Some(why),
                            None => None,
                        };
                        if let Some(refusal) = refusal {
                            let mut err = BytesMut::new();
                            pg::encode_notice(false, "ERROR", "42501", &refusal, &mut err);
                            evq.push(ev::event::Kind::Outcome(ev::Outcome {
                                exit_code: 1,
                                error: format!("42501: {refusal}"),
                                ..Default::default()
                            }));
                            if matches!(f.tag, pg::ftag::PARSE | pg::ftag::BIND | pg::ftag::EXECUTE) {
                                // A Parse that fails at the server stands in
                                // (for a Bind or Execute, under a name of its
                                // own); the server skips the rest of the
                                // sequence.
                                let name = step.prepared_as.as_deref().unwrap_or(REFUSED_STAND_IN);
                                pg::encode_frame(pg::ftag::PARSE, &refused_parse(name), &mut to_edge);
                                unsynced = true;
                                doomed = true;
                                st.substituted.push_back((rfq_expected + 1, err));
                            } else {
                                // A Query or a function call: answered with an
                                // error and ReadyForQuery of its own.
                                let mut q = REFUSED_STAND_IN.as_bytes().to_vec();
                                q.push(0);
                                pg::encode_frame(pg::ftag::QUERY, &q, &mut to_edge);
                                rfq_expected += 1;
                                st.substituted.push_back((rfq_expected, err));
                            }
                            continue;
                        }
                        match f.tag {
                            pg::ftag::QUERY | pg::ftag::FUNCTION_CALL => rfq_expected += 1,
                            pg::ftag::SYNC => {
                                rfq_expected += 1;
                                unsynced = false;
                                executed_unsynced = false;
                            }
                            pg::ftag::EXECUTE => {
                                unsynced = true;
                                executed_unsynced = true;
                            }
                            pg::ftag::PARSE | pg::ftag::BIND | pg::ftag::DESCRIBE
                            | pg::ftag::CLOSE => unsynced = true,
                            _ => {}
                        }
                        if step.executes && strict {
                            // Everything before this message goes first; then
                            // its evidence is committed; then it runs.
                            if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                                return Ok(end);
                            }
                            rec.commit_with(std::mem::take(evq)).await.map_err(commit_err)?;
                        }
                        if step.terminate {
                            terminate = true;
                            break;
                        }
                        if f.tag == pg::ftag::EXECUTE && !a.masker.is_empty() {
                            // Rows are masked by the columns the server says
                            // this portal returns, not by what the gateway
                            // followed of names (SQL can change those).
                            let body = st.relay.describe_before_execute(&f).map_err(|e| fatal("08P01", e.to_string()))?;
                            pg::encode_frame(pg::ftag::DESCRIBE, &body, &mut to_edge);
                        }
                        f.encode(&mut to_edge);
                        if let Some(name) = &step.close_statement {
                            // Its one approved execution has gone out: the
                            // server forgets the statement, so nothing (SQL
                            // EXECUTE, another Bind) can run it again.
                            let body = st.relay.close_statement(name);
                            pg::encode_frame(pg::ftag::CLOSE, &body, &mut to_edge);
                        }
                    }
                    rec.record_all(std::mem::take(evq)).await.map_err(commit_err)?;
                    if let Some(end) = self.send_to_edge(&mut st, &mut to_edge, tx, rx, s, rec, evq, a).await? {
                        return Ok(end);
                    }
                    if terminate {
                        return Ok("client terminated");
                    }
                }
                f = rx.recv() => {
                    if let Some(end) = self.on_edge_frame(&mut st, f, s, rec, evq, a).await? {
                        return Ok(end);
                    }
                }
                _ = &mut grant_end => {
                    return Err(fatal("57P01", format!(
                        "access grant {} expired; the session was ended",
                        a.grant.as_ref().map_or(0, |g| g.id)
                    )));
                }
                // Recorded or ended: the session stops once its evidence
                // cannot be committed, even while it is idle.
                e = rec.failed() => return Err(fatal("57P03", format!("{e}; the session was ended"))),
                // Killed, or its authority ended.
                why = live.ended() => return Err(fatal("57P01", why.to_string())),
            }
        }
    }

    /// Handles one frame from the edge: the server's bytes are checked
    /// against what it owes, masked, recorded and queued for the client.
    /// `Ok(Some(reason))` ends the session.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_edge_frame<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        st: &mut ServerSide,
        f: Option<t::SessionFrame>,
        s: &mut S,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        a: &Authorized,
    ) -> Result<Option<&'static str>, Fatal> {
        let Some(f) = f else {
            return Err(fatal("08006", "the tunnel to the edge was lost"));
        };
        match f.kind {
            Some(t::session_frame::Kind::Data(d)) => {
                st.sbuf.extend_from_slice(&d.data);
                loop {
                    let f = match pg::split_frame(&mut st.sbuf, self.limits) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => return Err(fatal("08P01", format!("from the server: {e}"))),
                    };
                    if f.tag == btag::PARAMETER_STATUS {
                        let mut fields = f.body.split(|b| *b == 0);
                        match fields.next() {
                            Some(b"standard_conforming_strings") => {
                                st.strings_conform = fields.next() == Some(b"on");
                            }
                            Some(b"client_encoding") => {
                                let name =
                                    String::from_utf8_lossy(fields.next().unwrap_or_default());
                                st.unsafe_encoding = crate::policy::sql::hides_ascii(&name)
                                    .then(|| name.into_owned());
                            }
                            _ => {}
                        }
                    }
                    // Under column rules: texts that may quote masked values
                    // are withheld (see `withhold_text`).
                    let withhold = if !a.masker.has_column_rules() {
                        None
                    } else if f.tag == btag::NOTIFICATION {
                        // Payloads arrive at commits, or from other sessions:
                        // no statement tells what they hold.
                        Some(true)
                    } else if matches!(f.tag, btag::ERROR_RESPONSE | btag::NOTICE_RESPONSE) {
                        Some(
                            self.answer_reads_masked(
                                st.relay.answering_lineage(),
                                a,
                                rec.session_id(),
                            )
                            .await,
                        )
                    } else {
                        None
                    };
                    if st
                        .relay
                        .track(&f)
                        .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    {
                        // The answer to the gateway's own Describe.
                        continue;
                    }
                    if f.tag == btag::ERROR_RESPONSE
                        && st
                            .substituted
                            .front()
                            .is_some_and(|(n, _)| *n == st.rfq_seen + 1)
                        && is_refusal_stand_in(&f)
                    {
                        if let Some((_, err)) = st.substituted.pop_front() {
                            st.out.extend_from_slice(&err);
                        }
                        continue;
                    }
                    // (After the stand-ins: the gateway's own refusals go as
                    // they are.)
                    let f = match withhold {
                        Some(message) => withhold_text(f, message)
                            .map_err(|e| fatal("08P01", format!("from the server: {e}")))?,
                        None => f,
                    };
                    if f.tag == btag::READY_FOR_QUERY {
                        st.rfq_seen += 1;
                        // Stand-ins the server skipped (an earlier error
                        // in their sequence) are answered by that error.
                        while st
                            .substituted
                            .front()
                            .is_some_and(|(n, _)| *n <= st.rfq_seen)
                        {
                            st.substituted.pop_front();
                        }
                        f.encode(&mut st.out);
                        continue;
                    }
                    if !a.masker.is_empty() && st.relay.columns().1 != st.shape_gen {
                        let (cols, generation) = st.relay.columns();
                        st.shape_gen = generation;
                        let cols = cols.map(<[pg::Field]>::to_vec);
                        st.shape = match cols {
                            None => Shape::unknown(),
                            Some(fields) => {
                                let (tables, computed) = if a.masker.has_column_rules() {
                                    let tables = self.tables_of(&fields, a, rec.session_id()).await;
                                    let computed = if fields.iter().any(|f| f.table_oid == 0) {
                                        self.computed_columns_masked(
                                            st.relay.columns_lineage(),
                                            fields.len(),
                                            a,
                                            rec.session_id(),
                                        )
                                        .await
                                    } else {
                                        Vec::new()
                                    };
                                    (tables, computed)
                                } else {
                                    (Some(catalog::Resolved::new()), Vec::new())
                                };
                                Shape::new(fields, &a.masker, tables.as_ref(), computed)
                            }
                        };
                    }
                    let f = if a.masker.is_empty() {
                        f
                    } else {
                        mask_frame(&a.masker, f, &st.shape)
                            .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    };
                    if let Some(e) = st
                        .relay
                        .server(&f)
                        .map_err(|e| fatal("08P01", format!("from the server: {e}")))?
                    {
                        evq.push(e);
                    }
                    f.encode(&mut st.out);
                    if st.out.len() >= 256 << 10 {
                        s.write_all(&st.out)
                            .await
                            .map_err(|e| fatal("08006", e.to_string()))?;
                        st.out.clear();
                    }
                }
                rec.record_all(std::mem::take(evq))
                    .await
                    .map_err(commit_err)?;
            }
            Some(t::session_frame::Kind::Exit(_)) => {
                write_flush(s, &st.out).await?;
                return Ok(Some("the server closed the connection"));
            }
            Some(t::session_frame::Kind::Error(e)) => {
                return Err(fatal("08006", format!("the edge ended the session: {e}")));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Sends client bytes to the edge. While the tunnel is full, the
    /// server's answers keep flowing to the client: a client that pipelines
    /// more than the buffers hold (and reads as it writes) must not wait on
    /// a gateway that waits on it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_to_edge<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        st: &mut ServerSide,
        buf: &mut BytesMut,
        tx: &mpsc::Sender<t::SessionFrame>,
        rx: &mut mpsc::Receiver<t::SessionFrame>,
        s: &mut S,
        rec: &SessionRecorder,
        evq: &mut Vec<ev::event::Kind>,
        a: &Authorized,
    ) -> Result<Option<&'static str>, Fatal> {
        let lost = || fatal("08006", "the tunnel to the edge was lost");
        while !buf.is_empty() {
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Closed(())) => return Err(lost()),
                Err(mpsc::error::TrySendError::Full(())) => {
                    tokio::select! {
                        p = tx.reserve() => p.map_err(|_| lost())?,
                        f = rx.recv() => {
                            if let Some(end) = self.on_edge_frame(st, f, s, rec, evq, a).await? {
                                return Ok(Some(end));
                            }
                            if !st.out.is_empty() {
                                write_flush(s, &st.out).await?;
                                st.out.clear();
                            }
                            continue;
                        }
                    }
                }
            };
            let n = buf.len().min(custody_proto::frame::MAX_DATA_CHUNK);
            permit.send(frame(t::session_frame::Kind::Data(t::Data {
                channel: t::Channel::Stdin as i32,
                data: buf.split_to(n).freeze(),
            })));
        }
        Ok(None)
    }
}

/// The server-facing half of a relayed session.
pub(super) struct ServerSide {
    relay: Relay,
    /// Server bytes not yet a whole message.
    sbuf: BytesMut,
    /// The columns the current rows are masked by, and their generation.
    shape_gen: u64,
    shape: Shape,
    /// Refused statements: each goes to the server as a stand-in that fails
    /// in protocol order, and the client gets the refusal in place of that
    /// error (the ReadyForQuery that ends the stand-in's sequence, counted
    /// from the session's start; the refusal).
    substituted: std::collections::VecDeque<(u64, BytesMut)>,
    /// ReadyForQuery messages received so far.
    rfq_seen: u64,
    /// The server's `standard_conforming_strings` is on (from its
    /// ParameterStatus): backslashes in string literals are plain characters,
    /// as the gateway's SQL parser reads them.
    strings_conform: bool,
    /// The server's `client_encoding` (from its ParameterStatus), when it is
    /// one whose multibyte characters may hold ASCII bytes (SJIS, BIG5, GBK,
    /// …): PostgreSQL then reads such bytes as part of a character, while the
    /// gateway reads the statement as UTF-8.
    unsafe_encoding: Option<String>,
    /// Function names by OID, for function calls.
    functions: std::collections::HashMap<u32, String>,
    /// Bytes for the client.
    out: BytesMut,
}

/// The SQL text a Query or Parse carries (for Parse, not its name or its
/// parameter type OIDs); empty for other messages.
pub(super) fn statement_bytes(f: &Frame) -> &[u8] {
    let text = match f.tag {
        pg::ftag::QUERY => &f.body[..],
        pg::ftag::PARSE => match f.body.iter().position(|b| *b == 0) {
            Some(end) => &f.body[end + 1..],
            None => return &[],
        },
        _ => return &[],
    };
    match text.iter().position(|b| *b == 0) {
        Some(end) => &text[..end],
        None => text,
    }
}
