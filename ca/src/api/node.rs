//! The node API (gRPC over mutual TLS): thin glue from `ztid.node.v1.Node` to [`CaCore`].
//!
//! Every request is checked against [`crate::limits`] before anything else. Refusals
//! are audited through [`RefusalAudit`]: one by one up to its bounds, with the peer's
//! address (before authentication) or the agent's ID, and summarised beyond them, so
//! a flood of refused calls cannot become a flood of synced audit records.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztid_proto::node::{self as pb, node_server::Node};
use ztid_verifier::VerifierStep;

use crate::audit::{AuditLog, OwnRecords};
use crate::core::minting::EntryMemo;
use crate::core::sync::{
    AgentRevocations, ChangeFeed, FeedRegistration, FeedState, RevocationMemo, SyncRequest,
};
use crate::core::{AuthenticatedAgent, CaCore};
use crate::entries::to_proto;
use crate::limits::{self, RateLimiter, ATTEST_STEP_TIMEOUT, ATTEST_TOTAL_TIMEOUT};
use crate::refusal_audit::RefusalAudit;
use crate::{Error, RefusalKind};

/// The node API service.
pub struct NodeApi {
    core: Arc<CaCore>,
    refusals: Arc<RefusalAudit>,
    /// The bounds on the delegated call reports agents have audited (by their bytes).
    delegated_reports: Arc<RefusalAudit>,
    jwt_mints: RateLimiter,
    /// The revocations that concern agents, shared by the syncs between two changes.
    revocations: RevocationMemo,
    /// What the `WatchChanges` streams follow.
    feed: Arc<ChangeFeed>,
}

/// Who sent a request, for refusal records: the full address, and the key the refusal
/// bounds count by (the IP address: a client picks its ports freely).
struct Peer {
    addr: Option<String>,
    key: String,
}

impl Peer {
    fn of(addr: Option<SocketAddr>) -> Self {
        Self {
            addr: addr.map(|a| a.to_string()),
            key: addr.map_or_else(|| "unknown".into(), |a| a.ip().to_string()),
        }
    }
}

impl NodeApi {
    /// A service over `core`, with the refusal and mint-rate bounds of its config.
    /// Starts the change feed: call it within a Tokio runtime.
    pub fn new(core: Arc<CaCore>) -> Self {
        let refusals = Arc::new(RefusalAudit::from_config(&core.config.limits));
        refusals.spawn_flusher(&core);
        let delegated_reports = Arc::new(RefusalAudit::bounded(
            "delegated_reports_summarised",
            limits::DELEGATED_REPORT_KIB_PER_AGENT,
            limits::DELEGATED_REPORT_KIB_PER_INTERVAL,
            refusals.interval(),
        ));
        delegated_reports.spawn_flusher(&core);
        let jwt_mints = RateLimiter::new(core.config.limits.jwt_mints_per_agent_entry_per_minute);
        let feed = ChangeFeed::start(&core, core.config.limits.node_api_max_watch_streams);
        Self {
            core,
            refusals,
            delegated_reports,
            jwt_mints,
            revocations: RevocationMemo::default(),
            feed,
        }
    }

    fn agent<T>(&self, req: &Request<T>) -> Result<AuthenticatedAgent, Status> {
        let certs = req.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        self.core.authenticate_agent(leaf).map_err(|e| {
            let peer = Peer::of(req.remote_addr());
            tracing::warn!(event = "node_api_refused", peer = ?peer.addr, reason = %e, "node API call refused");
            crate::metrics::node_api_refused(&e);
            self.refusals.record(
                &self.core,
                &peer.key,
                peer.addr.as_deref(),
                crate::metrics::refusal_reason(&e),
                serde_json::json!({"type": "node_api_refused", "reason": e.to_string(),
                "peer_serial": leaf.and_then(|l| ztid_spiffe::svid::serial_hex(l).ok())}),
            );
            Status::from(e)
        })
    }

    /// Waits until this call's records (the last is `own`, from [`OwnRecords::finish`])
    /// are durable and sealed; only those, so a call is answered right after the sync
    /// of its own batch, not that of records other calls appended after it. A call
    /// that appended nothing waits for every record so far, as before.
    async fn own_records_durable(&self, own: Option<u64>) -> crate::Result<()> {
        match (&self.core.audit, own) {
            (Some(audit), Some(seq)) => audit.durable(seq).await,
            _ => self.core.audit_barrier().await,
        }
    }

    /// Audits the refusal of one request of an authenticated agent's batch, within the
    /// bounds counted per agent.
    fn refuse_for_agent(&self, agent: &AuthenticatedAgent, e: &Error, event: serde_json::Value) {
        crate::metrics::node_api_refused(e);
        self.refusals.record(
            &self.core,
            &agent.record.spiffe_id,
            None,
            crate::metrics::refusal_reason(e),
            event,
        );
    }
}

async fn next_message(
    inbound: &mut Streaming<pb::AttestRequest>,
) -> Result<pb::attest_request::Step, Status> {
    match tokio::time::timeout(ATTEST_STEP_TIMEOUT, inbound.message()).await {
        Err(_) => Err(Status::deadline_exceeded(
            "attestation timed out waiting for the agent",
        )),
        Ok(Err(s)) => Err(s),
        Ok(Ok(None)) => Err(Status::cancelled("agent closed the attestation stream")),
        Ok(Ok(Some(m))) => m
            .step
            .ok_or_else(|| Error::InvalidInput("attestation message without a step".into()).into()),
    }
}

async fn run_attestation(
    core: Arc<CaCore>,
    refusals: Arc<RefusalAudit>,
    peer: Peer,
    mut inbound: Streaming<pb::AttestRequest>,
    tx: &mpsc::Sender<Result<pb::AttestResponse, Status>>,
) -> Result<pb::AttestResponse, Status> {
    let pb::attest_request::Step::Init(init) = next_message(&mut inbound).await? else {
        return Err(Error::InvalidInput("attestation must start with AttestInit".into()).into());
    };
    // The method names a metric label and a log field: bounded before it is used.
    let method = if init.method.len() <= limits::MAX_KEYWORD_BYTES {
        init.method.clone()
    } else {
        "unknown".to_string()
    };
    // Unauthenticated: refusals are audited with the peer's address, within the bounds.
    let refuse = |e: Error| {
        tracing::warn!(event = "node_attestation_refused", peer = ?peer.addr, method = %method, reason = %e, "node attestation refused");
        crate::metrics::attestation_refused(&method, &e);
        refusals.record(
            &core,
            &peer.key,
            peer.addr.as_deref(),
            crate::metrics::attestation_reason(&method, &e),
            serde_json::json!({"type": "node_attestation_refused", "method": method, "reason": e.to_string()}),
        );
        Status::from(e)
    };
    limits::check_attest_init(&init).map_err(refuse)?;
    let agent_key = CaCore::csr_public_key(&init.csr).map_err(refuse)?;
    let verifier = core.verifier(&init.method).map_err(refuse)?;
    let mut step = verifier
        .start(&init.payload, &core.attestation_context(&agent_key))
        .map_err(|e| refuse(e.into()))?;
    let node = loop {
        match step {
            VerifierStep::Attested(node) => break node,
            VerifierStep::Challenge(challenge, session) => {
                let msg = pb::AttestResponse {
                    step: Some(pb::attest_response::Step::Challenge(challenge)),
                };
                tx.send(Ok(msg))
                    .await
                    .map_err(|_| Status::cancelled("agent went away"))?;
                let pb::attest_request::Step::ChallengeResponse(answer) =
                    next_message(&mut inbound).await?
                else {
                    return Err(refuse(Error::InvalidInput(
                        "expected a challenge response".into(),
                    )));
                };
                limits::check_challenge_response(&answer).map_err(refuse)?;
                step = session
                    .resume(&answer, &core.attestation_context(&agent_key))
                    .map_err(|e| refuse(e.into()))?;
            }
        }
    };
    let (record, leaf) = core
        .complete_attestation(&node, &init.csr)
        .map_err(refuse)?;
    crate::metrics::attestation_passed(&record.method);
    let bundle = core.bundle();
    Ok(pb::AttestResponse {
        step: Some(pb::attest_response::Step::Result(pb::AttestResult {
            spiffe_id: record.spiffe_id,
            svid_chain: leaf.chain,
            bundle: Some(bundle.as_ref().into()),
            selectors: record.selectors.iter().map(Into::into).collect(),
        })),
    })
}

#[tonic::async_trait]
impl Node for NodeApi {
    type AttestStream = ReceiverStream<Result<pb::AttestResponse, Status>>;

    async fn attest(
        &self,
        request: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let peer = Peer::of(request.remote_addr());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let core = self.core.clone();
        let refusals = self.refusals.clone();
        tokio::spawn(async move {
            // Whatever the number of challenges, one attestation has a bounded time.
            let attestation = run_attestation(core, refusals, peer, inbound, &tx);
            let result = match tokio::time::timeout(ATTEST_TOTAL_TIMEOUT, attestation).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "attestation took longer than {} s",
                    ATTEST_TOTAL_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(result).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent = self.agent(&request)?;
        limits::check_csr_size("agent CSR (bytes)", &request.get_ref().csr)?;
        let leaf = self.core.renew_agent(&agent, &request.get_ref().csr)?;
        self.core.audit_barrier().await?;
        Ok(Response::new(pb::RenewAgentResponse {
            svid_chain: leaf.chain,
        }))
    }

    async fn sign_x509_svids(
        &self,
        request: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let agent = self.agent(&request)?;
        let reqs = &request.get_ref().requests;
        limits::check_batch("CSRs in one batch", reqs.len())?;
        for r in reqs {
            limits::check_len("entry_id (bytes)", &r.entry_id, limits::MAX_OBJECT_ID_BYTES)?;
            limits::check_csr_size("workload CSR (bytes)", &r.csr)?;
        }
        let own = self.core.audit.as_deref().map(AuditLog::begin_records);
        let mut entries = EntryMemo::default();
        let results = reqs
            .iter()
            .map(|r| {
                let signed =
                    self.core
                        .sign_workload_svid_in(&mut entries, &agent, &r.entry_id, &r.csr);
                let result = match signed {
                    Ok((spiffe_id, leaf)) => pb::svid_result::Result::Svid(pb::X509Svid {
                        spiffe_id,
                        cert_chain: leaf.chain,
                        expires_at: leaf.not_after,
                    }),
                    Err(e) => {
                        tracing::warn!(event = "x509_svid_refused", agent = %agent.record.spiffe_id, entry = %r.entry_id, reason = %e, "CSR refused");
                        self.refuse_for_agent(&agent, &e, serde_json::json!({"type": "x509_svid_refused", "agent": agent.record.spiffe_id, "entry": r.entry_id, "reason": e.to_string()}));
                        pb::svid_result::Result::Error(e.to_string())
                    }
                };
                pb::SvidResult { result: Some(result) }
            })
            .collect();
        // No SVID leaves before its audit record is durable (one sync for the batch).
        self.own_records_durable(own.and_then(OwnRecords::finish))
            .await?;
        Ok(Response::new(pb::SignX509SvidsResponse { results }))
    }

    async fn mint_jwt_svids(
        &self,
        request: Request<pb::MintJwtSvidsRequest>,
    ) -> Result<Response<pb::MintJwtSvidsResponse>, Status> {
        let agent = self.agent(&request)?;
        let reqs = &request.get_ref().requests;
        limits::check_batch("JWT-SVID requests in one batch", reqs.len())?;
        let audiences = reqs
            .iter()
            .map(limits::check_jwt_request)
            .collect::<crate::Result<Vec<_>>>()?;
        // Each mint is a signature and an audit record: bounded per agent and entry.
        let mut per_entry = std::collections::BTreeMap::<&str, u32>::new();
        for r in reqs {
            *per_entry.entry(r.entry_id.as_str()).or_default() += 1;
        }
        for (entry, n) in per_entry {
            let key = format!("{} {entry}", agent.record.spiffe_id);
            if !self.jwt_mints.take(&key, n) {
                let e = Error::refused(
                    RefusalKind::RateExceeded,
                    format!(
                        "JWT-SVID mint rate exceeded for entry {entry}: at most {} per minute for one agent",
                        self.jwt_mints.per_minute()
                    ),
                );
                tracing::warn!(event = "jwt_svid_refused", agent = %agent.record.spiffe_id, entry, reason = %e, "JWT-SVID mint rate exceeded");
                self.refuse_for_agent(&agent, &e, serde_json::json!({"type": "jwt_svid_refused", "agent": agent.record.spiffe_id, "entry": entry, "reason": e.to_string()}));
                self.core.audit_barrier().await?;
                return Err(e.into());
            }
        }
        let own = self.core.audit.as_deref().map(AuditLog::begin_records);
        let results = reqs
            .iter()
            .zip(&audiences)
            .map(|(r, audience)| {
                let result = match self.core.mint_jwt_svid(&agent, &r.entry_id, &r.spiffe_id, audience) {
                    Ok((token, expires_at)) => pb::jwt_result::Result::Svid(pb::JwtSvid {
                        spiffe_id: r.spiffe_id.clone(),
                        token,
                        expires_at,
                    }),
                    Err(e) => {
                        tracing::warn!(event = "jwt_svid_refused", agent = %agent.record.spiffe_id, entry = %r.entry_id, reason = %e, "JWT-SVID refused");
                        self.refuse_for_agent(&agent, &e, serde_json::json!({"type": "jwt_svid_refused", "agent": agent.record.spiffe_id, "entry": r.entry_id, "reason": e.to_string()}));
                        pb::jwt_result::Result::Error(e.to_string())
                    }
                };
                pb::JwtResult { result: Some(result) }
            })
            .collect();
        self.own_records_durable(own.and_then(OwnRecords::finish))
            .await?;
        Ok(Response::new(pb::MintJwtSvidsResponse { results }))
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let agent = self.agent(&request)?;
        let req = request.get_ref();
        limits::check_sync(req)?;
        limits::check_len(
            "page_token (bytes)",
            &req.page_token,
            crate::core::sync::page_token::MAX_TOKEN_BYTES,
        )?;
        let next_page = !req.page_token.is_empty();
        // Delegated identity calls the agent served (its Delegated Identity API), as it
        // reports them: audited under its ID, within a budget of bytes per agent and
        // interval (an agent syncing in a loop cannot fill the audit disk); the rest
        // are counted into the interval's summary.
        let id = &agent.record.spiffe_id;
        let mut reports: Vec<(&'static str, serde_json::Value)> = req
            .delegated_subscriptions
            .iter()
            .map(|d| {
                let event = serde_json::json!({
                    "type": "delegated_subscription", "agent": id,
                    "method": d.method, "delegate": d.delegate, "caller_pid": d.caller_pid,
                    "caller_uid": d.caller_uid, "target": d.target, "spiffe_ids": d.spiffe_ids,
                    "at": d.at,
                });
                ("delegated_subscription", event)
            })
            .collect();
        if req.delegated_subscriptions_dropped > 0 {
            reports.push((
                "delegated_subscriptions_dropped",
                serde_json::json!({
                    "type": "delegated_subscriptions_dropped", "agent": id,
                    "count": req.delegated_subscriptions_dropped,
                }),
            ));
        }
        for (kind, event) in reports {
            let kib = u32::try_from(event.to_string().len().div_ceil(1024)).unwrap_or(u32::MAX);
            self.delegated_reports.record_weighing(
                self.core.as_ref(),
                id,
                None,
                kind,
                kib.max(1),
                event,
            );
        }
        let sync = self.core.sync_entries(
            &agent,
            SyncRequest {
                since: req.since_revision,
                authorities_in_use: req.authorities_in_use.clone(),
                page_size: req.page_size,
                page_token: req.page_token.clone(),
            },
        )?;
        // An agent from before paging gets its whole set in one message: if that
        // passes what gRPC clients decode by default, say so instead of sending it.
        if req.page_size == 0 && sync.wire_bytes() > limits::NODE_API_MAX_MESSAGE_BYTES {
            return Err(Error::Precondition(format!(
                "the agent's entry set ({} entries) is too large for one message: \
                 upgrade the agent (paged sync)",
                sync.upserted.len()
            ))
            .into());
        }
        // Bundles come with the first page only: the next pages are entries alone.
        let bundle = self.core.bundle();
        let federated = if next_page {
            None
        } else {
            self.core
                .federated_for_sync(req.federated_bundles_version)?
        };
        // Every answer carries the revocations in force that concern the agent (with the
        // first page only, as the bundles).
        let revoked = if next_page {
            AgentRevocations::default()
        } else {
            self.core
                .revocations_for_agent(&sync.parents, sync.revision, &self.revocations)?
        };
        let (federated_bundles, federated_bundles_version) = match federated {
            Some((all, v)) => (all.iter().map(Into::into).collect(), v),
            None => (Vec::new(), 0),
        };
        Ok(Response::new(pb::SyncEntriesResponse {
            federated_bundles,
            federated_bundles_version,
            full: sync.full,
            upserted: sync.upserted.iter().map(to_proto).collect(),
            deleted: sync.deleted,
            revision: sync.revision,
            bundle: (!next_page && req.bundle_sequence < bundle.sequence)
                .then(|| bundle.as_ref().into()),
            next_page_token: sync.next_page_token.unwrap_or_default(),
            revoked_instances: revoked.instances,
            revoked_entries: revoked
                .entries
                .into_iter()
                .map(|(entry_id, revoked_at)| pb::RevokedEntry {
                    entry_id,
                    revoked_at,
                })
                .collect(),
        }))
    }

    async fn fetch_bundle(
        &self,
        request: Request<pb::FetchBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        self.agent(&request)?;
        Ok(Response::new(self.core.bundle().as_ref().into()))
    }
    type WatchChangesStream = NoticeStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let agent = self.agent(&request)?;
        // Kept to check the credential again while the stream lasts.
        let leaf = request
            .peer_certs()
            .and_then(|c| c.first().map(|l| l.as_ref().to_vec()))
            .unwrap_or_default();
        let registration = self.feed.register(&agent.record.spiffe_id)?;
        let (outbox, stream) = notice_channel();
        let limits = &self.core.config.limits;
        let watch = WatchTask {
            core: self.core.clone(),
            state: self.feed.subscribe(),
            leaf,
            parents: parents_of(&agent),
            agent: agent.record.spiffe_id.clone(),
            // Ended cleanly before the listener's request timeout closes the connection.
            lifetime: limits.request_timeout() * 3 / 4,
            unread_cutoff: limits::WATCH_UNREAD_CUTOFF,
        };
        tokio::spawn(watch.run(registration, outbox));
        Ok(Response::new(stream))
    }
}

fn parents_of(agent: &AuthenticatedAgent) -> std::collections::BTreeSet<String> {
    agent.parents().into_iter().map(String::from).collect()
}

fn notice_of(s: &FeedState) -> pb::ChangeNotice {
    pb::ChangeNotice {
        entry_revision: s.entry_revision,
        bundle_sequence: s.bundle_sequence,
        revocations_version: s.revocations_version,
        federation_version: s.federation_version,
    }
}

/// What a `WatchChanges` stream holds between the feed and its reader: at most one
/// notice (a newer one replaces it: notices are coalesced), and how the stream ends.
#[derive(Debug, Default)]
struct NoticeSlot {
    notice: Option<pb::ChangeNotice>,
    /// Since when the notice waits (none when the reader has taken it).
    unread_since: Option<tokio::time::Instant>,
    /// `Some(None)`: end cleanly; `Some(Some(status))`: end with that error.
    end: Option<Option<Status>>,
    finished: bool,
}

#[derive(Debug, Default)]
struct NoticeShared {
    slot: std::sync::Mutex<NoticeSlot>,
    wake: tokio::sync::Notify,
}

impl NoticeShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, NoticeSlot> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The feed's side of a stream.
struct Outbox {
    shared: Arc<NoticeShared>,
    /// Completes (with an error) once the stream was dropped: the client went away.
    reader_gone: tokio::sync::oneshot::Receiver<()>,
}

impl Outbox {
    /// Replaces whatever notice waits with `notice`.
    fn publish(&self, notice: pb::ChangeNotice) {
        let mut slot = self.shared.lock();
        slot.notice = Some(notice);
        slot.unread_since
            .get_or_insert_with(tokio::time::Instant::now);
        drop(slot);
        self.shared.wake.notify_one();
    }

    /// Ends the stream: cleanly after the waiting notice, or with `error` at once.
    fn end(&self, error: Option<Status>) {
        let mut slot = self.shared.lock();
        if error.is_some() {
            slot.notice = None;
            slot.unread_since = None;
        }
        slot.end = Some(error);
        drop(slot);
        self.shared.wake.notify_one();
    }

    fn unread_since(&self) -> Option<tokio::time::Instant> {
        self.shared.lock().unread_since
    }
}

/// The response stream of `WatchChanges`: yields the waiting notice whenever the
/// client reads (HTTP/2 flow control holds a client that does not read).
pub struct NoticeStream {
    inner: std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::ChangeNotice, Status>> + Send>>,
}

impl futures::Stream for NoticeStream {
    type Item = Result<pb::ChangeNotice, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The reader's state: the shared slot, and what tells the feed it went away.
struct NoticeReader {
    shared: Arc<NoticeShared>,
    _gone: tokio::sync::oneshot::Sender<()>,
}

impl NoticeReader {
    async fn next(&mut self) -> Option<Result<pb::ChangeNotice, Status>> {
        loop {
            {
                let mut slot = self.shared.lock();
                if slot.finished {
                    return None;
                }
                if let Some(n) = slot.notice.take() {
                    slot.unread_since = None;
                    return Some(Ok(n));
                }
                if let Some(end) = slot.end.take() {
                    slot.finished = true;
                    return end.map(Err);
                }
            }
            // notify_one keeps a permit: a publish between the check and here is seen.
            self.shared.wake.notified().await;
        }
    }
}

fn notice_channel() -> (Outbox, NoticeStream) {
    let shared = Arc::new(NoticeShared::default());
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
    let reader = NoticeReader {
        shared: shared.clone(),
        _gone: gone_tx,
    };
    let stream = futures::stream::unfold(reader, |mut r| async move {
        r.next().await.map(|item| (item, r))
    });
    (
        Outbox {
            shared,
            reader_gone: gone_rx,
        },
        NoticeStream {
            inner: Box::pin(stream),
        },
    )
}

/// One `WatchChanges` stream's task: follows the feed and publishes the notices that
/// concern its agent.
struct WatchTask {
    core: Arc<CaCore>,
    state: tokio::sync::watch::Receiver<Arc<FeedState>>,
    leaf: Vec<u8>,
    parents: std::collections::BTreeSet<String>,
    agent: String,
    lifetime: std::time::Duration,
    unread_cutoff: std::time::Duration,
}

impl WatchTask {
    /// Checks the agent's credential again; its parents may have changed (aliases).
    /// Returns whether they did.
    fn recheck(&mut self) -> Result<bool, Status> {
        let agent = self.core.authenticate_agent(Some(&self.leaf)).map_err(|e| {
            tracing::info!(agent = %self.agent, reason = %e, "change stream ended: the agent's credential no longer holds");
            Status::from(e)
        })?;
        let parents = parents_of(&agent);
        let changed = parents != self.parents;
        self.parents = parents;
        Ok(changed)
    }

    async fn run(mut self, mut registration: FeedRegistration, mut outbox: Outbox) {
        let ends_at = tokio::time::Instant::now() + self.lifetime;
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + limits::WATCH_RECHECK_INTERVAL,
            limits::WATCH_RECHECK_INTERVAL,
        );
        let first = self.state.borrow_and_update().clone();
        let mut generation = first.generation;
        // A notice at once: the agent learns where the server stands.
        outbox.publish(notice_of(&first));
        loop {
            let cutoff = outbox.unread_since().map(|t| t + self.unread_cutoff);
            tokio::select! {
                _ = &mut outbox.reader_gone => return,
                _ = &mut registration.replaced => {
                    outbox.end(Some(Status::aborted(
                        "a newer WatchChanges stream of this agent replaced this one",
                    )));
                    return;
                }
                _ = tokio::time::sleep_until(ends_at) => {
                    outbox.end(None);
                    return;
                }
                _ = tokio::time::sleep_until(cutoff.unwrap_or(ends_at)), if cutoff.is_some() => {
                    let still = outbox
                        .unread_since()
                        .is_some_and(|t| t.elapsed() >= self.unread_cutoff);
                    if still {
                        tracing::info!(agent = %self.agent, "change stream ended: a notice stayed unread");
                        outbox.end(Some(Status::resource_exhausted(format!(
                            "a change notice stayed unread for {} s: sync, and watch again",
                            self.unread_cutoff.as_secs()
                        ))));
                        return;
                    }
                }
                _ = recheck.tick() => match self.recheck() {
                    Ok(true) => outbox.publish(notice_of(&self.state.borrow())),
                    Ok(false) => {}
                    Err(s) => {
                        outbox.end(Some(s));
                        return;
                    }
                },
                changed = self.state.changed() => {
                    if changed.is_err() {
                        outbox.end(Some(Status::unavailable("the server is stopping")));
                        return;
                    }
                    let state = self.state.borrow_and_update().clone();
                    let action = state.action_since(generation, &self.parents);
                    generation = state.generation;
                    let mut notify = action.notify;
                    if action.recheck {
                        match self.recheck() {
                            Ok(changed) => notify |= changed,
                            Err(s) => {
                                outbox.end(Some(s));
                                return;
                            }
                        }
                    }
                    if notify {
                        outbox.publish(notice_of(&state));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use futures::StreamExt;

    fn notice(revision: u64) -> pb::ChangeNotice {
        pb::ChangeNotice {
            entry_revision: revision,
            ..Default::default()
        }
    }

    /// A reader that does not keep up gets only the latest notice: nothing is queued.
    #[tokio::test]
    async fn notices_for_a_slow_reader_are_coalesced_to_the_latest() {
        let (outbox, mut stream) = notice_channel();
        for r in 1..=1000 {
            outbox.publish(notice(r));
        }
        let got = stream.next().await.unwrap().unwrap();
        assert_eq!(got.entry_revision, 1000);
        assert!(outbox.unread_since().is_none());
        outbox.publish(notice(1001));
        outbox.end(None);
        // A clean end comes after the notice that waits.
        assert_eq!(stream.next().await.unwrap().unwrap().entry_revision, 1001);
        assert!(stream.next().await.is_none());
    }

    /// An error end drops the waiting notice and ends the stream with that error.
    #[tokio::test]
    async fn an_error_end_is_delivered_and_ends_the_stream() {
        let (outbox, mut stream) = notice_channel();
        outbox.publish(notice(1));
        outbox.end(Some(Status::resource_exhausted("unread")));
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(stream.next().await.is_none());
    }

    fn task(
        core: &Arc<CaCore>,
        feed: &ChangeFeed,
        leaf: Vec<u8>,
        agent: &AuthenticatedAgent,
    ) -> WatchTask {
        WatchTask {
            core: core.clone(),
            state: feed.subscribe(),
            leaf,
            parents: parents_of(agent),
            agent: agent.record.spiffe_id.clone(),
            lifetime: std::time::Duration::from_secs(3600),
            unread_cutoff: std::time::Duration::from_millis(100),
        }
    }

    /// A client that leaves its notice unread past the cutoff is cut off: the stream
    /// ends with ResourceExhausted, and the server lets go of its place in the bounds.
    #[tokio::test]
    async fn a_reader_that_leaves_a_notice_unread_is_cut_off() {
        let (_dir, core, leaf, agent) = crate::core::testing::core_with_agent();
        let feed = ChangeFeed::start(&core, 1);
        let registration = feed.register(&agent.record.spiffe_id).unwrap();
        assert_eq!(feed.streams(), 1);
        let (outbox, mut stream) = notice_channel();
        // The first notice goes out at once and is never read.
        task(&core, &feed, leaf, &agent)
            .run(registration, outbox)
            .await;
        assert_eq!(feed.streams(), 0, "the cut-off stream left the bounds");
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(stream.next().await.is_none());
    }

    /// A server at its bound of streams refuses another agent's, and a second stream of
    /// the same agent ends the first (Aborted).
    #[tokio::test]
    async fn streams_are_bounded_in_total_and_one_per_agent() {
        let (_dir, core, leaf, agent) = crate::core::testing::core_with_agent();
        let feed = ChangeFeed::start(&core, 1);
        let first = feed.register(&agent.record.spiffe_id).unwrap();
        match feed.register("spiffe://example.org/ztid/agent/other") {
            Err(crate::Error::Refused(_)) => {}
            other => panic!("{other:?}"),
        }
        let (outbox, mut stream) = notice_channel();
        let running = tokio::spawn(task(&core, &feed, leaf, &agent).run(first, outbox));
        assert!(stream.next().await.unwrap().is_ok(), "the first notice");
        let _second = feed.register(&agent.record.spiffe_id).unwrap();
        running.await.unwrap();
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
        assert_eq!(feed.streams(), 1);
    }

    /// The feed's side learns that the client went away (its task then ends).
    #[tokio::test]
    async fn a_dropped_stream_is_seen_by_the_feed() {
        let (mut outbox, stream) = notice_channel();
        drop(stream);
        assert!((&mut outbox.reader_gone).await.is_err());
    }
}
