//! The SPIFFE Workload API, served on the agent's Unix socket.
//!
//! Callers are identified out of band, never by anything they send: each connection is
//! bound at accept to the process that made it ([`super::workload_listener`]), and every
//! request first checks that this process still runs unchanged; if it has exited or
//! exec'd, the request gets nothing but the reason. Every request must carry
//! `workload.spiffe.io: true`. Streams send the full state at once and again on every
//! rotation or bundle change, and end when the connection's process exits or execs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost_types::{value::Kind, ListValue, Struct, Value as PValue};
use serde_json::Value;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use ztid_proto::node as npb;
use ztid_proto::workload::{self as pb, spiffe_workload_api_server::SpiffeWorkloadApi};

use super::workload_listener::ConnectionPeer;
use super::workloads::{
    revoked_message, IdentitySet, Instance, ProcessBinding, RevocationNotice, Workloads,
};
use crate::bundle::TrustBundle;
use crate::unix_seconds;
use crate::workload_attestation::PeerRefusal;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Refuses any request without `workload.spiffe.io: true`, as the spec requires.
pub fn require_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(ztid_proto::WORKLOAD_API_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The Workload API service.
pub struct WorkloadApi {
    pub(crate) workloads: Arc<Workloads>,
    pub(crate) bundle: watch::Receiver<Arc<TrustBundle>>,
}

impl WorkloadApi {
    /// A service over the agent's workloads and bundle.
    pub fn new(workloads: Arc<Workloads>, bundle: watch::Receiver<Arc<TrustBundle>>) -> Self {
        Self { workloads, bundle }
    }

    /// The caller's connection, checked now to still be served by the process that
    /// opened it.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Arc<ConnectionPeer>, Status> {
        let peer = connection_peer(req)?;
        still_the_connecting_process(&peer).await?;
        Ok(peer)
    }

    /// Attests the caller, checks it is entitled, and makes sure it holds current SVIDs.
    pub(crate) async fn entitled_instance<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Arc<ConnectionPeer>, Arc<Instance>), Status> {
        let peer = self.caller(req).await?;
        self.entitle(peer, false).await
    }

    /// [`WorkloadApi::entitled_instance`] for a stream made by [`watch_stream`], which
    /// checks the caller's process before every message, the first included. For a
    /// process that already has its instance, checking it here too would read /proc
    /// twice per call for nothing: what is looked up here comes from the accept-time
    /// attestation, and the first message is checked after it, closer to the answer. A
    /// new instance is made (minted, or taken from the pool) only for the process that
    /// connected, so that one is checked first. A connection already known refused gets
    /// the refusal at once, and every refusal below first checks the process, so a gone
    /// or changed process is told so rather than why it has no entry.
    async fn entitled_instance_for_stream<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Arc<ConnectionPeer>, Arc<Instance>), Status> {
        let peer = connection_peer(req)?;
        if let Some(r) = peer.known_refusal() {
            return Err(refusal_status(&r));
        }
        match self.entitle(peer.clone(), true).await {
            Ok(found) => Ok(found),
            Err(refused) => {
                still_the_connecting_process(&peer).await?;
                Err(refused)
            }
        }
    }

    /// Checks that the caller of a connection bound to `peer` is entitled, and makes sure
    /// it holds current SVIDs. A new instance is made only for the process that connected:
    /// `check_before_new` when the caller has not just checked that.
    async fn entitle(
        &self,
        peer: Arc<ConnectionPeer>,
        check_before_new: bool,
    ) -> Result<(Arc<ConnectionPeer>, Arc<Instance>), Status> {
        let attested = peer
            .attested()
            .ok_or_else(|| Status::internal("verified connection without attestation"))?;
        // Entitlement first: callers with no entry never get an instance.
        let entitlement = self
            .workloads
            .entitled(ProcessBinding::of(attested), &attested.selectors)
            .map_err(|_| Status::internal("lock"))?;
        if entitlement.entries.is_empty() {
            let pid = attested.process.instance.pid;
            if let Some(id) = &entitlement.revoked {
                if let Some(suppressed) = crate::refusal_log::admit(peer.uid, "workload_refused") {
                    tracing::info!(event = "workload_refused", pid, uid = peer.uid, spiffe_id = %id, suppressed, "identity revoked by an operator");
                }
                return Err(Status::permission_denied(revoked_message(id)));
            }
            let selectors: Vec<String> =
                attested.selectors.iter().map(ToString::to_string).collect();
            if let Some(suppressed) = crate::refusal_log::admit(peer.uid, "workload_refused") {
                let (shown, more) = shown_selectors(&selectors);
                tracing::info!(event = "workload_refused", pid, uid = peer.uid, selectors = ?shown, more_selectors = more, suppressed, "no identity issued");
            }
            return Err(Status::permission_denied(no_entry_message(&selectors)));
        }
        let inst = match self.workloads.existing_instance(attested) {
            Some(inst) => inst,
            None => {
                // Cheaply (the first answer is checked whole): nothing is made for a
                // process that has exited or exec'd since it connected.
                if check_before_new {
                    if let Err(r) = attested.process.still_runs() {
                        if let Some(suppressed) =
                            crate::refusal_log::admit(peer.uid, "workload_refused")
                        {
                            tracing::warn!(event = "workload_refused", pid = ?peer.pid, uid = peer.uid, reason = %r, suppressed, "request on a connection whose process is gone or changed");
                        }
                        return Err(refusal_status(&r));
                    }
                }
                self.workloads
                    .instance_for(attested)
                    .map_err(|e| e.status())?
            }
        };
        if let Err(e) = self.workloads.reconcile(&inst).await {
            tracing::warn!(pid = inst.process.pid, error = %e, "could not obtain SVIDs for workload");
            return Err(Status::unavailable(format!(
                "could not obtain an SVID: {e}"
            )));
        }
        if inst.state.borrow().svids.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok((peer, inst))
    }
}

/// Selectors named in a "no entry" refusal, at most; the rest are counted.
const REFUSAL_SELECTORS: usize = 8;
/// Characters of one selector shown in a refusal, at most (a container label can be long).
const REFUSAL_SELECTOR_CHARS: usize = 96;

/// The refusal of a process that no entry selects, in one line: the cause (with the
/// process's own selectors, which it may know anyway) and the next step. Starts with
/// "no identity issued", the reason clients and tests match.
fn no_entry_message(selectors: &[String]) -> String {
    let (shown, more) = shown_selectors(selectors);
    let more = match more {
        0 => String::new(),
        n => format!(", and {n} more"),
    };
    // The uid is what a first entry most often selects; else whatever comes first.
    let example = selectors
        .iter()
        .find(|s| s.starts_with("unix:uid:"))
        .or(selectors.first())
        .filter(|s| s.chars().count() <= REFUSAL_SELECTOR_CHARS)
        .map_or("TYPE:VALUE", String::as_str);
    format!(
        "no identity issued: no registration entry matches this process's selectors ({}{more}); \
         create one with `ztid-server entry create --parent-id AGENT_ID --spiffe-id ID --selector {example}` \
         (AGENT_ID: this agent's ID, `ztid-server agent list`); a new entry reaches this agent at its next sync",
        shown.join(", ")
    )
}

/// The selectors a refusal names (at most [`REFUSAL_SELECTORS`], each cut to
/// [`REFUSAL_SELECTOR_CHARS`]), and how many more there are.
fn shown_selectors(selectors: &[String]) -> (Vec<String>, usize) {
    let shown = selectors
        .iter()
        .take(REFUSAL_SELECTORS)
        .map(|s| {
            if s.chars().count() > REFUSAL_SELECTOR_CHARS {
                format!(
                    "{}…",
                    s.chars().take(REFUSAL_SELECTOR_CHARS).collect::<String>()
                )
            } else {
                s.clone()
            }
        })
        .collect();
    (shown, selectors.len().saturating_sub(REFUSAL_SELECTORS))
}

/// Ok while the connection's process still is the one that connected; else the refusal
/// (logged, within the uid's share of refusal lines).
pub(crate) async fn still_the_connecting_process(peer: &Arc<ConnectionPeer>) -> Result<(), Status> {
    peer.verify().await.map_err(|r| {
        if let Some(suppressed) = crate::refusal_log::admit(peer.uid, "workload_refused") {
            tracing::warn!(
                event = "workload_refused",
                pid = ?peer.pid,
                uid = peer.uid,
                reason = %r,
                suppressed,
                "request on a connection whose process is gone or changed"
            );
        }
        refusal_status(&r)
    })
}

/// The answer to a request on a connection whose process is not the one that opened it.
pub(crate) fn refusal_status(r: &PeerRefusal) -> Status {
    match r {
        PeerRefusal::Exited | PeerRefusal::Execd | PeerRefusal::CredentialsChanged => {
            Status::permission_denied(r.to_string())
        }
        PeerRefusal::Unattestable(_) => Status::unavailable(r.to_string()),
    }
}

/// Federated bundles as a Workload API bundle map (`spiffe://TD` → value).
fn federated_map(
    federated: &std::collections::BTreeMap<String, Arc<TrustBundle>>,
    value: impl Fn(&TrustBundle) -> Result<Vec<u8>, Status>,
) -> Result<HashMap<String, Vec<u8>>, Status> {
    federated
        .values()
        .map(|b| Ok((b.trust_domain_id(), value(b)?)))
        .collect()
}

fn x509_response(
    set: &IdentitySet,
    bundle: &TrustBundle,
    federated: &std::collections::BTreeMap<String, Arc<TrustBundle>>,
) -> pb::X509svidResponse {
    let bundle_der = bundle.x509_der();
    pb::X509svidResponse {
        svids: set
            .svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: crate::svid::concat_der(s.chain.iter().map(Vec::as_slice)),
                x509_svid_key: s.key.to_vec(),
                bundle: bundle_der.clone(),
                hint: s.hint.clone(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: federated_map(federated, |b| Ok(b.x509_der())).unwrap_or_default(),
    }
}

fn json_to_proto(v: &Value) -> PValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_proto).collect(),
        }),
        Value::Object(o) => Kind::StructValue(Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_proto(v)))
                .collect(),
        }),
    };
    PValue { kind: Some(kind) }
}

/// Why a stream must end before its next message, if it must: an identity of its instance
/// revoked since the stream opened (a notice count above `seen`; `PermissionDenied`
/// naming it), or the connection's process no longer the one that connected.
pub(crate) async fn stream_refusal(
    notices: &watch::Receiver<RevocationNotice>,
    seen: u64,
    peer: &Arc<ConnectionPeer>,
) -> Option<Status> {
    let notice = {
        let n = notices.borrow();
        (n.count > seen).then(|| n.clone())
    };
    match (notice, peer.verify().await) {
        (Some(RevocationNotice { identity, .. }), _) => Some(Status::permission_denied(
            revoked_message(identity.as_deref().unwrap_or("of this workload")),
        )),
        (None, Err(r)) => Some(refusal_status(&r)),
        (None, Ok(())) => None,
    }
}

/// Streams `make(state)` now and on every change of either watch, until the client leaves,
/// `make` returns an error, the connection's process exits or execs (then the stream
/// ends with the reason; nothing is sent once the process is not the one that connected),
/// or an operator revokes an identity of the instance (then it ends with
/// `PermissionDenied` naming it).
///
/// The stream is polled by the connection's own task: no task of its own and no channel,
/// so a message costs no hop between tasks, and a client that leaves drops it with
/// everything it waits on.
fn watch_stream<T: Send + 'static>(
    peer: Arc<ConnectionPeer>,
    mut notices: watch::Receiver<RevocationNotice>,
    state: Option<watch::Receiver<Arc<IdentitySet>>>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    make: impl Fn(Option<&IdentitySet>, &TrustBundle) -> Result<T, Status> + Send + 'static,
) -> ResponseStream<T> {
    struct Watched<F> {
        peer: Arc<ConnectionPeer>,
        notices: watch::Receiver<RevocationNotice>,
        seen: u64,
        state: Option<watch::Receiver<Arc<IdentitySet>>>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        revoked: watch::Receiver<Option<PeerRefusal>>,
        make: F,
        /// Nothing sent yet: the first message goes out without waiting for a change.
        first: bool,
    }
    let revoked = peer.revocation();
    // Only revocations made after the stream opened end it.
    let seen = notices.borrow_and_update().count;
    let watched = Watched {
        peer,
        notices,
        seen,
        state,
        bundle,
        revoked,
        make,
        first: true,
    };
    Box::pin(futures::stream::unfold(Some(watched), |w| async move {
        // `None` once an error has ended the stream.
        let mut w = w?;
        if !std::mem::take(&mut w.first) {
            let seen = w.seen;
            let changed = match w.state.as_mut() {
                Some(s) => tokio::select! {
                    r = s.changed() => r.is_ok(),
                    r = w.bundle.changed() => r.is_ok(),
                    _ = w.revoked.wait_for(Option::is_some) => true,
                    _ = w.notices.wait_for(|n| n.count > seen) => true,
                },
                None => tokio::select! {
                    r = w.bundle.changed() => r.is_ok(),
                    _ = w.revoked.wait_for(Option::is_some) => true,
                    _ = w.notices.wait_for(|n| n.count > seen) => true,
                },
            };
            if !changed {
                return None;
            }
        }
        // Checked before every message, not only when the connection notices.
        let msg = match stream_refusal(&w.notices, w.seen, &w.peer).await {
            Some(refused) => Err(refused),
            None => {
                let s = w.state.as_mut().map(|s| s.borrow_and_update().clone());
                let b = w.bundle.borrow_and_update().clone();
                (w.make)(s.as_deref(), &b)
            }
        };
        let next = msg.is_ok().then_some(w);
        Some((msg, next))
    }))
}

/// The JWT-SVID the server minted for `id` and `audience` (normalised) in answer `r`,
/// with its key ID, noted as in use; a refusal, an answer for another SPIFFE ID, or a
/// token whose own `sub`, `aud` or `exp` is not what was asked and answered, is an
/// unavailable error. The server is trusted to sign; its answer is still checked, so a
/// mix-up on its side never hands a workload another identity's token (the signature is
/// the relying party's to check: a key just activated may not be in our bundle yet).
pub(crate) fn minted_jwt(
    workloads: &Workloads,
    r: npb::JwtResult,
    id: &str,
    audience: &[String],
) -> Result<(npb::JwtSvid, Option<String>), Status> {
    match r.result {
        Some(npb::jwt_result::Result::Svid(s)) if s.spiffe_id == id => {
            if !token_says(&s.token, id, audience, s.expires_at) {
                tracing::error!(
                    event = "jwt_svid_mismatch",
                    spiffe_id = id,
                    "the server's JWT-SVID does not name the identity, audience or expiry asked for; not served"
                );
                return Err(Status::unavailable(
                    "could not obtain a JWT-SVID: the server's token does not say what it was asked for (sub, aud or exp)",
                ));
            }
            let kid = crate::jwt::kid_of(&s.token);
            workloads.note_jwt(kid.as_deref(), s.expires_at);
            Ok((s, kid))
        }
        Some(npb::jwt_result::Result::Error(err)) => Err(Status::unavailable(format!(
            "could not obtain a JWT-SVID: {err}"
        ))),
        _ => Err(Status::unavailable("could not obtain a JWT-SVID")),
    }
}

/// Whether `token` names `id` as `sub`, exactly `audience` (sorted, deduplicated) as
/// `aud`, and `expires_at` as `exp`.
fn token_says(token: &str, id: &str, audience: &[String], expires_at: i64) -> bool {
    let Some(claims) = crate::jwt::unverified_claims(token) else {
        return false;
    };
    let mut aud: Vec<&str> = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => vec![a.as_str()],
        Some(serde_json::Value::Array(list)) => {
            match list.iter().map(serde_json::Value::as_str).collect() {
                Some(l) => l,
                None => return false,
            }
        }
        _ => return false,
    };
    aud.sort_unstable();
    aud.dedup();
    claims.get("sub").and_then(serde_json::Value::as_str) == Some(id)
        && aud.iter().copied().eq(audience.iter().map(String::as_str))
        && claims.get("exp").and_then(serde_json::Value::as_i64) == Some(expires_at)
}

/// Asks the server for a JWT-SVID of each `(entry, SPIFFE ID)` of `to_mint` for `audience`
/// (one call; the Workload and Delegated Identity APIs each map its error their own way).
pub(crate) async fn mint_jwt_svids(
    workloads: &Workloads,
    to_mint: &[(npb::Entry, String)],
    audience: &[String],
) -> Result<npb::MintJwtSvidsResponse, Status> {
    let mint = npb::MintJwtSvidsRequest {
        requests: to_mint
            .iter()
            .map(|(e, id)| npb::JwtRequest {
                entry_id: e.id.clone(),
                spiffe_id: id.clone(),
                audience: audience.to_vec(),
            })
            .collect(),
    };
    workloads
        .node()
        .call("MintJWTSVIDs", crate::servers::CALL_TIMEOUT, |mut c| {
            let mint = mint.clone();
            async move {
                c.mint_jwt_svids(mint)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (peer, inst) = self.entitled_instance_for_stream(&request).await?;
        let workloads = self.workloads.clone();
        let stream = watch_stream(
            peer,
            inst.revocations.subscribe(),
            Some(inst.state.subscribe()),
            self.bundle.clone(),
            move |set, bundle| {
                match set {
                    Some(set) if !set.svids.is_empty() => Ok(x509_response(
                        set,
                        bundle,
                        &workloads.federated_bundles_for(&inst.selectors),
                    )),
                    // The process lost its last entry (or exited): tell the client.
                    _ => Err(Status::permission_denied("no identity issued")),
                }
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (peer, inst) = self.entitled_instance_for_stream(&request).await?;
        let workloads = self.workloads.clone();
        let stream = watch_stream(
            peer,
            inst.revocations.subscribe(),
            None,
            self.bundle.clone(),
            move |_, bundle| {
                let mut bundles =
                    federated_map(&workloads.federated_bundles_for(&inst.selectors), |b| {
                        Ok(b.x509_der())
                    })?;
                bundles.insert(bundle.trust_domain_id(), bundle.x509_der());
                Ok(pb::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles,
                })
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        // Bounded before anything else: each mint is a signature and an audit record.
        let audience = crate::limits::normalize_audiences(&request.get_ref().audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (peer, inst) = self.entitled_instance(&request).await?;
        let req = request.into_inner();
        let entries: Vec<npb::Entry> = self
            .workloads
            .entitled(inst.key.binding(), &inst.selectors)
            .map_err(|_| Status::internal("lock"))?
            .entries;
        let mut wanted: Vec<(npb::Entry, String)> = entries
            .into_iter()
            .map(|e| {
                let id = Workloads::identity_for(&inst, &e);
                (e, id)
            })
            .collect();
        if !req.spiffe_id.is_empty() {
            wanted.retain(|(_, id)| *id == req.spiffe_id);
            if wanted.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued for {}",
                    req.spiffe_id
                )));
            }
        }
        let now = unix_seconds(std::time::SystemTime::now());
        let mut out = Vec::new();
        let mut to_mint = Vec::new();
        {
            let mut cache = inst
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("lock"))?;
            for (e, id) in &wanted {
                match cache.reusable(&(id.clone(), audience.clone()), now) {
                    Some(j) => out.push(pb::Jwtsvid {
                        spiffe_id: id.clone(),
                        svid: j.token.clone(),
                        hint: e.hint.clone(),
                    }),
                    None => to_mint.push((e.clone(), id.clone())),
                }
            }
            // A workload may not mint distinct tokens without bound; the mints are
            // recorded now, under the same lock, so calls at once cannot all pass.
            if !to_mint.is_empty() {
                if let Err(exceeded) = cache.allow_mints(to_mint.len(), now) {
                    let (recent, limit) = (
                        exceeded.recent,
                        crate::limits::MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE,
                    );
                    tracing::warn!(
                        event = "jwt_rate_limited",
                        pid = inst.process.pid,
                        recent,
                        limit,
                        "JWT-SVID mint rate exceeded"
                    );
                    return Err(Status::resource_exhausted(format!(
                        "JWT-SVID mint rate exceeded: {recent} minted for this workload in the last minute, at most {limit}; reuse a token or retry later"
                    )));
                }
            }
        }
        if !to_mint.is_empty() {
            let resp = mint_jwt_svids(&self.workloads, &to_mint, &audience)
                .await
                .map_err(|s| {
                    let why = format!("could not obtain a JWT-SVID: {}", s.message());
                    // The server's bounds keep their kind; anything else is the server
                    // being unavailable.
                    match s.code() {
                        tonic::Code::ResourceExhausted => Status::resource_exhausted(why),
                        tonic::Code::InvalidArgument => Status::invalid_argument(why),
                        _ => Status::unavailable(why),
                    }
                })?;
            super::metrics::svids_minted(
                "jwt",
                resp.results
                    .iter()
                    .filter(|r| matches!(r.result, Some(npb::jwt_result::Result::Svid(_))))
                    .count(),
            );
            let mut cache = inst
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("lock"))?;
            for ((e, id), r) in to_mint.into_iter().zip(resp.results) {
                let (s, kid) = minted_jwt(&self.workloads, r, &id, &audience)?;
                cache.remember(
                    (id.clone(), audience.clone()),
                    super::workloads::CachedJwt {
                        token: s.token.clone(),
                        expires_at: s.expires_at,
                        issued_at: now,
                        kid,
                    },
                    now,
                );
                out.push(pb::Jwtsvid {
                    spiffe_id: id,
                    svid: s.token,
                    hint: e.hint.clone(),
                });
            }
        }
        // Checked again right before the answer: getting the SVIDs and the tokens may have
        // waited on the server, and the process may have exec'd or exited meanwhile.
        still_the_connecting_process(&peer).await?;
        out.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        Ok(Response::new(pb::JwtsvidResponse { svids: out }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (peer, inst) = self.entitled_instance_for_stream(&request).await?;
        let workloads = self.workloads.clone();
        let stream = watch_stream(
            peer,
            inst.revocations.subscribe(),
            None,
            self.bundle.clone(),
            move |_, bundle| {
                let jwks = |b: &TrustBundle| {
                    b.jwks_json()
                        .map(String::into_bytes)
                        .map_err(|e| Status::internal(e.to_string()))
                };
                let mut bundles =
                    federated_map(&workloads.federated_bundles_for(&inst.selectors), jwks)?;
                bundles.insert(bundle.trust_domain_id(), jwks(bundle)?);
                Ok(pb::JwtBundlesResponse { bundles })
            },
        );
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let req = request.get_ref();
        crate::limits::check_validation_audience(&req.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Validation is open to every local process, but only to a real one.
        let peer = self.caller(&request).await?;
        let selectors = peer
            .attested()
            .map(|a| a.selectors.as_slice())
            .unwrap_or_default();
        // Tokens of a federated trust domain validate only for callers federating with it.
        let federated = self.workloads.federated_bundles_for(selectors);
        let bundle = self.bundle.borrow().clone();
        let now = unix_seconds(std::time::SystemTime::now());
        let validated = crate::jwt::validate(&req.svid, &req.audience, now, |td| {
            if td.as_str() == bundle.trust_domain {
                Some(bundle.jwt_authorities.clone())
            } else {
                federated
                    .get(td.as_str())
                    .map(|b| b.jwt_authorities.clone())
            }
        })
        .map_err(|e: ztid_spiffe::Error| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(Struct {
                fields: validated
                    .claims
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_proto(v)))
                    .collect(),
            }),
        }))
    }

    async fn fetch_witsvid(
        &self,
        _request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        _request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

/// The connection's peer as the listener attested it at accept.
fn connection_peer<T>(req: &Request<T>) -> Result<Arc<ConnectionPeer>, Status> {
    req.extensions()
        .get::<Arc<ConnectionPeer>>()
        .cloned()
        .ok_or_else(|| Status::unavailable("workload attestation failed: no peer credentials"))
}

#[cfg(test)]
mod tests {
    //! The kill switch end to end inside the agent: a fake node API signs every CSR, the
    //! Workload API is served on a temporary socket, and this test process is the
    //! workload.

    use std::time::Duration;

    use tonic::transport::{Identity, Server, ServerTlsConfig};
    use ztid_proto::node::node_server::{Node, NodeServer};
    use ztid_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    use super::*;
    use crate::servers::{parse_server_list, NodeConnections, Servers};
    use crate::workload_attestation::{AttestedPeer, PeerProcess, ProcessInstance};

    const ENTRY_ID: &str = "e1";
    const ENTRY_SPIFFE_ID: &str = "spiffe://example.org/w";
    /// An entry ID whose instances the fake node API refuses to sign.
    const REFUSED_SPIFFE_ID: &str = "spiffe://example.org/refused";

    /// Signs every CSR with a made-up chain: the agent only checks the SPIFFE ID.
    struct FakeNode;

    /// Lifetime of the fake node's JWT-SVIDs: one second, so that none is ever reused
    /// (half its life is gone at once) and every fetch is a mint, as with an entry's
    /// `--jwt-ttl 1`.
    const FAKE_JWT_TTL: i64 = 1;
    const FAKE_JWT_DELAY: Duration = Duration::from_millis(50);

    fn spiffe_id_of_csr(der: &[u8]) -> String {
        use x509_parser::prelude::*;
        let (_, csr) = X509CertificationRequest::from_der(der).unwrap();
        let id = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .find_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(san) => {
                    san.general_names.iter().find_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                }
                _ => None,
            })
            .unwrap();
        id
    }

    #[tonic::async_trait]
    impl Node for FakeNode {
        type AttestStream = ResponseStream<npb::AttestResponse>;
        async fn attest(
            &self,
            _: Request<tonic::Streaming<npb::AttestRequest>>,
        ) -> Result<Response<Self::AttestStream>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn renew_agent(
            &self,
            _: Request<npb::RenewAgentRequest>,
        ) -> Result<Response<npb::RenewAgentResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn sign_x509_svids(
            &self,
            request: Request<npb::SignX509SvidsRequest>,
        ) -> Result<Response<npb::SignX509SvidsResponse>, Status> {
            let expires_at = unix_seconds(std::time::SystemTime::now()) + 3600;
            let results = request
                .into_inner()
                .requests
                .iter()
                .map(|r| {
                    let spiffe_id = spiffe_id_of_csr(&r.csr);
                    npb::SvidResult {
                        result: Some(if spiffe_id.starts_with(REFUSED_SPIFFE_ID) {
                            npb::svid_result::Result::Error("refused by the fake server".into())
                        } else {
                            npb::svid_result::Result::Svid(npb::X509Svid {
                                spiffe_id,
                                cert_chain: vec![b"not a certificate".to_vec()],
                                expires_at,
                            })
                        }),
                    }
                })
                .collect();
            Ok(Response::new(npb::SignX509SvidsResponse { results }))
        }
        /// Mints a made-up token per request, valid for [`FAKE_JWT_TTL`] seconds, after
        /// [`FAKE_JWT_DELAY`] (a server's signature and audit write take a moment).
        async fn mint_jwt_svids(
            &self,
            request: Request<npb::MintJwtSvidsRequest>,
        ) -> Result<Response<npb::MintJwtSvidsResponse>, Status> {
            tokio::time::sleep(FAKE_JWT_DELAY).await;
            let expires_at = unix_seconds(std::time::SystemTime::now()) + FAKE_JWT_TTL;
            let results = request
                .into_inner()
                .requests
                .into_iter()
                .map(|r| {
                    // A faulty server, on request: the token names another subject,
                    // audience or expiry than asked or than the answer says.
                    let lie = r.audience.first().map(String::as_str);
                    let claims = serde_json::json!({
                        "sub": if lie == Some("lie-sub") { "spiffe://example.org/other" } else { r.spiffe_id.as_str() },
                        "aud": if lie == Some("lie-aud") { vec!["other".to_string()] } else { r.audience.clone() },
                        "exp": if lie == Some("lie-exp") { expires_at + 3600 } else { expires_at },
                    });
                    let b64 = |v: &[u8]| {
                        base64::Engine::encode(
                            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                            v,
                        )
                    };
                    npb::JwtResult {
                        result: Some(npb::jwt_result::Result::Svid(npb::JwtSvid {
                            token: format!(
                                "{}.{}.c2ln",
                                b64(br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#),
                                b64(claims.to_string().as_bytes())
                            ),
                            spiffe_id: r.spiffe_id,
                            expires_at,
                        })),
                    }
                })
                .collect();
            Ok(Response::new(npb::MintJwtSvidsResponse { results }))
        }
        async fn sync_entries(
            &self,
            _: Request<npb::SyncEntriesRequest>,
        ) -> Result<Response<npb::SyncEntriesResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn fetch_bundle(
            &self,
            _: Request<npb::FetchBundleRequest>,
        ) -> Result<Response<npb::Bundle>, Status> {
            Err(Status::unimplemented("fake"))
        }
        type WatchChangesStream = ResponseStream<npb::ChangeNotice>;
        async fn watch_changes(
            &self,
            _: Request<npb::WatchChangesRequest>,
        ) -> Result<Response<Self::WatchChangesStream>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    #[test]
    fn a_process_with_no_entry_is_told_its_selectors_and_the_next_step() {
        let m = no_entry_message(&["unix:gid:1000".into(), "unix:uid:1000".into()]);
        assert!(m.starts_with("no identity issued: "), "{m}");
        assert!(m.contains("(unix:gid:1000, unix:uid:1000)"), "{m}");
        assert!(m.contains("ztid-server entry create") && m.contains("--selector unix:uid:1000"));
        assert!(m.contains("next sync") && !m.contains('\n'));
        // Bounded: many or long selectors are cut.
        let many: Vec<String> = (0..50)
            .map(|i| format!("k8s:pod-label:{i}:{}", "x".repeat(500)))
            .collect();
        let m = no_entry_message(&many);
        assert!(m.contains("and 42 more") && m.len() < 2048, "{}", m.len());
        assert!(m.contains("--selector TYPE:VALUE"));
        assert!(no_entry_message(&[]).contains("selectors ()"));
    }

    /// The fake node API over TLS on a local port.
    async fn fake_node() -> std::net::SocketAddr {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let identity = Identity::from_pem(cert.pem(), key.serialize_pem());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .tls_config(ServerTlsConfig::new().identity(identity))
                .unwrap()
                .add_service(NodeServer::new(FakeNode))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    /// Workloads minting through the fake node API, holding one per-instance entry for
    /// this process's uid.
    async fn workloads() -> (Arc<Workloads>, watch::Sender<Arc<TrustBundle>>) {
        workloads_built(|w| w).await
    }

    /// [`workloads`], with `build` applied (a pool, an instance cap).
    async fn workloads_built(
        build: impl FnOnce(Workloads) -> Workloads,
    ) -> (Arc<Workloads>, watch::Sender<Arc<TrustBundle>>) {
        let addr = fake_node().await;
        let servers = Servers::new(parse_server_list(&addr.to_string()).unwrap()).await;
        let node = NodeConnections::new(
            servers,
            Arc::new(crate::tls::ServerSvidVerifier::insecure_bootstrap()),
            None,
        );
        let bundle = watch::Sender::new(Arc::new(TrustBundle {
            trust_domain: "example.org".into(),
            ..Default::default()
        }));
        let w = Arc::new(build(Workloads::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(node)),
            bundle.subscribe(),
        )));
        let uid = nix::unistd::geteuid().as_raw();
        w.entries.write().unwrap().apply(&npb::SyncEntriesResponse {
            full: true,
            revision: 1,
            upserted: vec![npb::Entry {
                id: ENTRY_ID.into(),
                spiffe_id: ENTRY_SPIFFE_ID.into(),
                parent_id: "spiffe://example.org/ztid/agent/join_token/n1".into(),
                selectors: vec![npb::Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        (w, bundle)
    }

    /// Serves the Workload API over `workloads` on a socket in `dir`; returns a client.
    async fn serve(
        workloads: Arc<Workloads>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        dir: &std::path::Path,
    ) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        let path = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let api = tonic::service::interceptor::InterceptedService::new(
            crate::zeroizing_x509_answers::WorkloadApiService::serving(
                WorkloadApi::new(workloads, bundle),
                crate::workload_listener::MAX_REQUEST_MESSAGE_BYTES,
            ),
            require_security_header,
        );
        let routes = tonic::service::Routes::new(api);
        tokio::spawn(crate::workload_listener::serve(
            listener,
            routes,
            Default::default(),
            std::future::pending(),
        ));
        let channel = ztid_proto::transport::unix_channel(&path).await.unwrap();
        SpiffeWorkloadApiClient::new(channel)
    }

    fn with_header<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            ztid_proto::WORKLOAD_API_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        r
    }

    /// The first answer on `stream` holds an SVID of the test entry's instance.
    async fn assert_served(mut stream: tonic::Streaming<pb::X509svidResponse>) {
        let answer = stream.message().await.unwrap().unwrap();
        assert!(answer.svids[0]
            .spiffe_id
            .starts_with(&format!("{ENTRY_SPIFFE_ID}/")));
    }

    /// Another running process (a child), attested with this process's selectors.
    fn other_process() -> (std::process::Child, AttestedPeer) {
        other_process_as(0)
    }

    /// A uid other than this process's (whose instances count against another share).
    fn another_uid() -> u32 {
        match nix::unistd::geteuid().as_raw() {
            65534 => 65533,
            _ => 65534,
        }
    }

    /// [`other_process`], as if it had connected as `uid` (its instance counts against
    /// that uid's share of the instance cap; no root needed).
    fn other_process_as(uid: u32) -> (std::process::Child, AttestedPeer) {
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Attested once it runs sleep, not this test binary forked (an instance of a
        // process that execs since is forgotten as exited).
        let mine = crate::workload_attestation::exe_identity(std::process::id() as i32).ok();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::workload_attestation::exe_identity(pid).ok() == mine
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let start_time = crate::workload_attestation::process_start_time(pid).unwrap();
        let me = AttestedPeer {
            process: PeerProcess::for_tests(
                ProcessInstance { pid, start_time },
                crate::workload_attestation::exe_identity(pid).ok(),
                (uid, uid),
            ),
            selectors: vec![crate::Selector::parse(&format!(
                "unix:uid:{}",
                nix::unistd::geteuid().as_raw()
            ))
            .unwrap()],
        };
        (child, me)
    }

    #[tokio::test]
    async fn an_entry_changed_on_the_server_is_minted_afresh_at_the_next_reconcile() {
        let (workloads, _bundle) = workloads().await;
        let (mut child, other) = other_process();
        let inst = workloads.instance_for(&other).unwrap();
        workloads.reconcile(&inst).await.unwrap();
        let before = inst.state.borrow().svids[0].spiffe_id.clone();
        assert!(before.starts_with(&format!("{ENTRY_SPIFFE_ID}/")));
        let uid = nix::unistd::geteuid().as_raw();
        assert!(workloads
            .entries
            .write()
            .unwrap()
            .apply(&npb::SyncEntriesResponse {
                full: false,
                revision: 2,
                upserted: vec![npb::Entry {
                    id: ENTRY_ID.into(),
                    spiffe_id: "spiffe://example.org/renamed".into(),
                    parent_id: "spiffe://example.org/ztid/agent/join_token/n1".into(),
                    selectors: vec![npb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    revision: 2,
                    ..Default::default()
                }],
                ..Default::default()
            }));
        // Long before the old SVID's half-life: the process gets the entry as it is now.
        workloads.reconcile(&inst).await.unwrap();
        let after = inst.state.borrow().svids[0].spiffe_id.clone();
        assert_eq!(
            after,
            format!("spiffe://example.org/renamed/{}", inst.segment)
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// An entry moved to another SPIFFE ID whose mint the server refuses (an issuance
    /// policy, say): the instance went on serving its SVID of the old ID, which the entry
    /// no longer names, until it expired.
    #[tokio::test]
    async fn an_entry_moved_to_an_id_the_server_refuses_stops_serving_the_old_one() {
        let (workloads, _bundle) = workloads().await;
        let (mut child, other) = other_process();
        let inst = workloads.instance_for(&other).unwrap();
        workloads.reconcile(&inst).await.unwrap();
        assert!(inst.state.borrow().svids[0]
            .spiffe_id
            .starts_with(&format!("{ENTRY_SPIFFE_ID}/")));
        let uid = nix::unistd::geteuid().as_raw();
        workloads
            .entries
            .write()
            .unwrap()
            .apply(&npb::SyncEntriesResponse {
                full: false,
                revision: 2,
                upserted: vec![npb::Entry {
                    id: ENTRY_ID.into(),
                    spiffe_id: REFUSED_SPIFFE_ID.into(),
                    parent_id: "spiffe://example.org/ztid/agent/join_token/n1".into(),
                    selectors: vec![npb::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    revision: 2,
                    ..Default::default()
                }],
                ..Default::default()
            });
        let refused = workloads.reconcile(&inst).await;
        let served: Vec<String> = inst
            .state
            .borrow()
            .svids
            .iter()
            .map(|s| s.spiffe_id.clone())
            .collect();
        assert!(served.is_empty(), "still served: {served:?}");
        assert!(
            matches!(&refused, Err(crate::Error::Server(m)) if m.contains("refused by the fake server")),
            "{:?}",
            refused.err()
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[tokio::test]
    async fn a_revoked_instance_is_dropped_its_stream_ends_and_its_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (workloads, bundle) = workloads().await;
        let mut client = serve(workloads.clone(), bundle.subscribe(), dir.path()).await;
        let mut stream = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let held = first.svids[0].spiffe_id.clone();
        assert!(
            held.starts_with(&format!("{ENTRY_SPIFFE_ID}/")),
            "per-instance: {held}"
        );
        // The server says this process's instance is revoked (and something unknown).
        let dropped = workloads
            .apply_revocations(
                &[
                    held.clone(),
                    format!("{ENTRY_SPIFFE_ID}/{}", "f".repeat(32)),
                ],
                &[],
            )
            .await;
        assert_eq!(dropped, 1);
        let want = format!("identity {held} was revoked by an operator");
        // The open stream ends with the reason.
        let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends")
            .unwrap_err();
        assert_eq!(end.code(), tonic::Code::PermissionDenied);
        assert_eq!(end.message(), want);
        // A new fetch by the same process is refused, for X.509 and JWT alike.
        let again = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::PermissionDenied);
        assert_eq!(again.message(), want);
        let jwt = client
            .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(jwt.code(), tonic::Code::PermissionDenied);
        assert_eq!(jwt.message(), want);
        // Another process of the same entry still gets a new identity of it.
        let (mut child, other) = other_process();
        let other_inst = workloads.instance_for(&other).unwrap();
        workloads.reconcile(&other_inst).await.unwrap();
        let other_id = other_inst.state.borrow().svids[0].spiffe_id.clone();
        assert!(other_id.starts_with(&format!("{ENTRY_SPIFFE_ID}/")) && other_id != held);
        // Renewal does not bring it back.
        let mine = workloads
            .live_instances()
            .into_iter()
            .find(|i| i.process.pid == std::process::id() as i32)
            .unwrap();
        workloads.reconcile(&mine).await.unwrap();
        assert!(mine.state.borrow().svids.is_empty());
        // The other process keeps its identity, and the same answer again drops nothing
        // more (each drop is logged once).
        assert_eq!(
            workloads
                .apply_revocations(std::slice::from_ref(&held), &[])
                .await,
            0
        );
        assert_eq!(other_inst.state.borrow().svids[0].spiffe_id, other_id);
        workloads.reconcile(&other_inst).await.unwrap();
        assert_eq!(other_inst.state.borrow().svids[0].spiffe_id, other_id);

        // An entry revocation made before the other instance was created spares it;
        // one made after covers it.
        let created = other_inst.created_at;
        let before = npb::RevokedEntry {
            entry_id: ENTRY_ID.into(),
            revoked_at: created - crate::workloads::REVOCATION_CLOCK_TOLERANCE_SECONDS - 1,
        };
        assert_eq!(workloads.apply_revocations(&[], &[before]).await, 0);
        assert_eq!(other_inst.state.borrow().svids.len(), 1);
        let after = npb::RevokedEntry {
            entry_id: ENTRY_ID.into(),
            revoked_at: created + 1,
        };
        assert_eq!(workloads.apply_revocations(&[], &[after]).await, 1);
        assert!(other_inst.state.borrow().svids.is_empty());
        assert_eq!(
            workloads
                .entitled(other_inst.key.binding(), &other_inst.selectors)
                .unwrap()
                .revoked,
            Some(other_id)
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[tokio::test]
    async fn a_new_process_beyond_the_instance_cap_is_refused_and_nothing_is_minted() {
        use crate::workloads::pool::{PoolConfig, PoolView};
        use crate::workloads::InstanceError;
        let dir = tempfile::tempdir().unwrap();
        let pool = PoolConfig {
            size: 2,
            max_sets: 4,
            max_age_seconds: 60,
            idle_seconds: 300,
        };
        let (workloads, bundle) =
            workloads_built(|w| w.with_pool(pool).with_max_instances(1)).await;
        // Another uid's process holds the one instance the cap allows (made without the
        // pool, so that only the refused process could have made its entry set wanted);
        // this process's uid holds none of its share (1), so it meets the cap.
        let (mut child, other) = other_process_as(another_uid());
        workloads
            .instance_for_key(crate::workloads::InstanceKey::of(&other), false)
            .unwrap();
        let mut client = serve(workloads.clone(), bundle.subscribe(), dir.path()).await;
        let refused = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            InstanceError::CapReached { cap: 1 }.to_string()
        );
        assert!(
            refused.message().contains("holds 1 live process instances")
                && refused.message().contains("raise workload_max_instances"),
            "{}",
            refused.message()
        );
        // Nothing made or minted for it: no instance, and its entry set never reached
        // the pool (which would pre-mint for it).
        assert_eq!(workloads.instance_count(), 1);
        let view = PoolView {
            now: unix_seconds(std::time::SystemTime::now()),
            monotonic_now: crate::workloads::boot_clock::BootInstant::now(),
            bundle_sequence: 0,
            tainted: &[],
        };
        assert!(workloads.pool().deficits(&view).is_empty());
        // Instances made on another's behalf (the Delegated Identity API's) count too.
        let mine = crate::delegated_identity::attest_pid(std::process::id() as i32).unwrap();
        assert!(matches!(
            workloads.instance_for_key(crate::workloads::InstanceKey::of(&mine), false),
            Err(InstanceError::CapReached { cap: 1 })
        ));
        // Once the other process exits its instance is forgotten and the cap frees up
        // (the full map is searched for exited processes at most once a second).
        child.kill().unwrap();
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match client
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
            {
                Ok(answer) => {
                    assert_served(answer.into_inner()).await;
                    break;
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                    assert!(std::time::Instant::now() < deadline, "never freed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        assert_eq!(workloads.instance_count(), 1);
    }

    #[tokio::test]
    async fn a_uid_at_its_share_of_the_instance_cap_is_refused_while_other_uids_are_served() {
        use crate::workloads::InstanceError;
        let dir = tempfile::tempdir().unwrap();
        // A cap of 4: each uid's share is 2.
        let (workloads, bundle) = workloads_built(|w| w.with_max_instances(4)).await;
        assert_eq!(workloads.instance_share(), 2);
        let (uid, root) = (another_uid(), nix::unistd::geteuid().as_raw());
        // The review's scenario: three processes of one uid each call the Workload API
        // once; the third is refused for that uid's share, not for the agent's cap.
        let mut hers: Vec<std::process::Child> = Vec::new();
        for _ in 0..2 {
            let (child, peer) = other_process_as(uid);
            workloads.instance_for(&peer).unwrap();
            hers.push(child);
        }
        let (third_child, third) = other_process_as(uid);
        hers.push(third_child);
        let refused = workloads.instance_for(&third).err().unwrap();
        assert!(
            matches!(refused, InstanceError::UserShareReached { uid: u, share: 2 } if u == uid),
            "{refused:?}"
        );
        let status = refused.status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            format!(
                "workload instance share reached for uid {uid}: it holds 2 live process instances, the most one user may (half of workload_max_instances); a new process of this uid is served once some of its processes exit, or raise workload_max_instances in the agent's config (--workload-max-instances)"
            )
        );
        assert_eq!(workloads.instance_count(), 2, "nothing made for it");
        // Another uid is still served, over the socket.
        let mut client = serve(workloads.clone(), bundle.subscribe(), dir.path()).await;
        assert_served(
            client
                .fetch_x509svid(with_header(pb::X509svidRequest {}))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        // The global cap stays: that uid takes its share too, and a third uid (under
        // its share) meets the cap.
        let (mut mine, peer) = other_process_as(root);
        workloads.instance_for(&peer).unwrap();
        assert_eq!(workloads.instance_count(), 4);
        let (mut third_uid, peer) = other_process_as(uid.wrapping_sub(1));
        assert!(matches!(
            workloads.instance_for(&peer),
            Err(InstanceError::CapReached { cap: 4 })
        ));
        let _ = third_uid.kill();
        let _ = third_uid.wait();
        // Once the first uid's processes exit, it is served again (the map is searched
        // for exited processes on demand at most once a second).
        for mut c in hers {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        let (mut again_child, again) = other_process_as(uid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = workloads.instance_for(&again) {
            assert!(
                matches!(e, InstanceError::UserShareReached { .. })
                    && std::time::Instant::now() < deadline,
                "{e}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(workloads.instance_count(), 3);
        for c in [&mut again_child, &mut mine] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn jwt_request(audience: &str) -> Request<pb::JwtsvidRequest> {
        with_header(pb::JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        })
    }

    /// A token fetched again once past half its life is a mint like any other and counts
    /// against the instance's 60 a minute, also when it replaces the cached one (same
    /// audience): each fetch here mints (the fake node's tokens live one second).
    #[tokio::test]
    async fn re_minting_one_audience_counts_against_the_jwt_rate() {
        let dir = tempfile::tempdir().unwrap();
        let (workloads, bundle) = workloads().await;
        let mut client = serve(workloads, bundle.subscribe(), dir.path()).await;
        let limit = crate::limits::MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE;
        for i in 0..limit {
            client
                .fetch_jwtsvid(jwt_request("db"))
                .await
                .unwrap_or_else(|e| panic!("mint {i} of {limit} refused: {e}"));
        }
        let refused = client.fetch_jwtsvid(jwt_request("db")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
        assert!(
            refused
                .message()
                .starts_with("JWT-SVID mint rate exceeded: 60 minted for this workload in the last minute, at most 60"),
            "{}",
            refused.message()
        );
    }

    /// The agent hands out a minted token only if it says what was asked: the subject
    /// and audiences asked for, and the expiry the answer gives (the cache trusts it).
    #[tokio::test]
    async fn a_token_that_names_another_subject_audience_or_expiry_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (workloads, bundle) = workloads().await;
        let mut client = serve(workloads, bundle.subscribe(), dir.path()).await;
        let honest = client.fetch_jwtsvid(jwt_request("db")).await.unwrap();
        assert_eq!(honest.get_ref().svids.len(), 1);
        for lie in ["lie-sub", "lie-aud", "lie-exp"] {
            let refused = client.fetch_jwtsvid(jwt_request(lie)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable, "{lie}: {refused}");
            assert!(
                refused.message().starts_with(
                    "could not obtain a JWT-SVID: the server's token does not say what it was asked for"
                ),
                "{lie}: {}",
                refused.message()
            );
        }
    }

    /// Fetches that arrive together (here 70, over 5 connections of one process) cannot
    /// all pass the rate check before any of them is recorded: the 61st and later are
    /// refused while the first 60 are still at the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_cannot_overrun_the_jwt_rate() {
        let dir = tempfile::tempdir().unwrap();
        let (workloads, bundle) = workloads().await;
        let mut clients = Vec::new();
        for i in 0..5 {
            let sub = dir.path().join(i.to_string());
            std::fs::create_dir(&sub).unwrap();
            clients.push(serve(workloads.clone(), bundle.subscribe(), &sub).await);
        }
        let calls = (0..70).map(|i| {
            let mut c = clients[i % 5].clone();
            async move { c.fetch_jwtsvid(jwt_request(&format!("svc-{i}"))).await }
        });
        let answers = futures::future::join_all(calls).await;
        let minted = answers.iter().filter(|a| a.is_ok()).count();
        assert_eq!(minted, 60, "minted past the bound");
        for refused in answers.iter().filter_map(|a| a.as_ref().err()) {
            assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
            assert!(
                refused.message().starts_with("JWT-SVID mint rate exceeded"),
                "{}",
                refused.message()
            );
        }
    }
}
