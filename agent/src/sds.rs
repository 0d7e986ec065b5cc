//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket.
//!
//! A caller is attested exactly as a Workload API caller is (the connection's process,
//! its entitlement, its own per-instance SVIDs), so an Envoy gets its own instance's
//! identity. Envoy does not send `workload.spiffe.io`, and SPIRE's agent does not ask it
//! for SDS; neither does this service (the socket's caller is identified out of band
//! either way).
//!
//! Resource names are SPIRE's agent's defaults:
//! - `default`: the caller's first SVID (by SPIFFE ID), as a `tls_certificate`;
//! - a SPIFFE ID: that SVID. ztid's per-instance IDs end in a random segment, so the
//!   entry's own SPIFFE ID (without it) names the instance's SVID of that entry too;
//! - `ROOTCA`: this trust domain's bundle, as a `validation_context` with `trusted_ca`;
//! - `spiffe://TD`: the bundle of TD (this one, or a federated one the caller's entries
//!   federate with), likewise;
//! - `ALL`: every bundle the caller may see, as a `validation_context` whose
//!   `custom_validator_config` is Envoy's SPIFFE certificate validator (each peer checked
//!   against its own trust domain's bundle);
//! - no name at all: every SVID by SPIFFE ID and every bundle by trust domain.
//!
//! A name the caller may not be served ends the call with `InvalidArgument` naming it,
//! as from SPIRE. Streams follow xDS state-of-the-world: a request whose names differ
//! from the last (or the first request) is answered; an ACK or a NACK (`error_detail`)
//! with the same names is not (so a rejected answer is logged, never resent in a loop);
//! a request echoing an older nonce is stale and ignored; every rotation or bundle
//! change is pushed with a new version. Streams end, like the Workload API's, when the
//! process exits or execs or an identity of it is revoked. Delta xDS (`DeltaSecrets`)
//! is not served (UNIMPLEMENTED, as from SPIRE).
//!
//! A `tls_certificate` carries the SVID's key in PEM. The copies this module makes of it
//! (the PEM, the encoded `Secret`) are zeroized once the answer is encoded: the PEM is
//! written straight into the one buffer the secret holds, [`Secrets`] zeroizes it when
//! dropped, and the answers go through the zeroizing codec
//! (`zeroizing_x509_answers`), which wipes the encoded secrets.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use ztid_proto::envoy_sds::envoy::config::core::v3 as core;
use ztid_proto::envoy_sds::envoy::extensions::transport_sockets::tls::v3 as tls;
use ztid_proto::envoy_sds::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use ztid_proto::envoy_sds::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};

use super::workload_api::{
    refusal_status, still_the_connecting_process, stream_refusal, WorkloadApi,
};
use super::workloads::{HeldSvid, Workloads};
use crate::bundle::TrustBundle;
use crate::zeroizing_x509_answers::{BidiStreaming, KeyCopies, Unary, ZeroizingService};

/// The path of `StreamSecrets`, a bidirectional stream: the socket's listener counts
/// it as in progress from its first message (its body never ends), so the connection
/// does not idle out under an open stream.
pub const STREAM_SECRETS_PATH: &str =
    "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
/// The type URL of the resources SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// Envoy's name of its SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
/// The caller's first SVID (SPIRE's `default_svid_name`).
pub const DEFAULT_SVID_NAME: &str = "default";
/// This trust domain's bundle (SPIRE's `default_bundle_name`).
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
/// Every bundle, as a SPIFFE validator config (SPIRE's `default_all_bundles_name`).
pub const ALL_BUNDLES_NAME: &str = "ALL";

/// Resource names one request may carry, at most: an Envoy asks for a handful.
pub const MAX_RESOURCE_NAMES_PER_REQUEST: usize = 64;
/// Bytes of one resource name, at most (a SPIFFE ID's limit).
pub const MAX_RESOURCE_NAME_BYTES: usize = 2048;
/// Distinct resource names one stream may ask for over its life, at most: a client
/// cycling through names cannot make the stream hold or answer without bound.
pub const MAX_RESOURCE_NAMES_PER_STREAM: usize = 256;
/// Characters of a NACK's message logged, at most.
const NACK_MESSAGE_CHARS: usize = 256;

/// Why an SDS request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdsRefusal {
    /// The request asks for another resource type.
    #[error("SDS serves only {SECRET_TYPE_URL}, not {0:?}")]
    WrongType(String),
    /// Too many resource names in one request.
    #[error("{0} resource names in one request, at most {MAX_RESOURCE_NAMES_PER_REQUEST}")]
    TooManyNames(usize),
    /// A resource name is too long.
    #[error("a resource name of {0} bytes, at most {MAX_RESOURCE_NAME_BYTES}")]
    NameTooLong(usize),
    /// The stream asked for too many distinct names over its life.
    #[error("more than {MAX_RESOURCE_NAMES_PER_STREAM} distinct resource names on one stream; open a new one")]
    StreamNamesExhausted,
    /// Names the caller is not served (sorted).
    #[error("workload is not authorized for the requested identities {0:?}")]
    NotEntitled(Vec<String>),
}

impl From<SdsRefusal> for Status {
    fn from(r: SdsRefusal) -> Self {
        match r {
            SdsRefusal::StreamNamesExhausted => Status::resource_exhausted(r.to_string()),
            _ => Status::invalid_argument(r.to_string()),
        }
    }
}

/// What one caller may be served: its SVIDs, each with its entry's own SPIFFE ID, and
/// the bundles it sees.
pub(crate) struct Material<'a> {
    /// The caller's SVIDs ordered by SPIFFE ID, each with the SPIFFE ID of its entry.
    pub svids: Vec<(&'a HeldSvid, Option<String>)>,
    /// This trust domain's bundle.
    pub bundle: &'a TrustBundle,
    /// Federated bundles the caller's entries federate with, by trust domain name.
    pub federated: &'a BTreeMap<String, Arc<TrustBundle>>,
}

fn any_of(type_url: &str, msg: &impl Message) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url.to_string(),
        value: msg.encode_to_vec(),
    }
}

fn inline(bytes: Vec<u8>) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(bytes)),
    })
}

fn pem_certs(certs: &[Vec<u8>]) -> Vec<u8> {
    crate::svid::certs_to_pem(certs.iter().map(Vec::as_slice)).into_bytes()
}

/// A PKCS#8 key in PEM (LF line ends, 64 characters a line), written into one buffer
/// sized for it up front, so no copy of the key is left behind in a buffer that grew;
/// the one line on the stack is zeroized.
fn key_pem(pkcs8: &[u8]) -> Vec<u8> {
    use base64::Engine;
    use zeroize::Zeroize;
    const BEGIN: &[u8] = b"-----BEGIN PRIVATE KEY-----\n";
    const END: &[u8] = b"-----END PRIVATE KEY-----\n";
    let lines = pkcs8.len().div_ceil(48);
    let mut pem = Vec::with_capacity(BEGIN.len() + lines * 65 + END.len());
    pem.extend_from_slice(BEGIN);
    let mut line = [0u8; 64];
    for chunk in pkcs8.chunks(48) {
        // 48 bytes are 64 base64 characters: the line always fits.
        if let Ok(n) = base64::engine::general_purpose::STANDARD.encode_slice(chunk, &mut line) {
            pem.extend_from_slice(line.get(..n).unwrap_or_default());
            pem.push(b'\n');
        }
    }
    line.zeroize();
    pem.extend_from_slice(END);
    pem
}

fn tls_certificate(name: &str, svid: &HeldSvid) -> tls::Secret {
    tls::Secret {
        name: name.to_string(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(pem_certs(&svid.chain)),
            private_key: inline(key_pem(&svid.key)),
            ..Default::default()
        })),
    }
}

/// Zeroizes the private key a secret holds inline, if any.
fn zeroize_key(secret: &mut tls::Secret) {
    use zeroize::Zeroize;
    if let Some(tls::secret::Type::TlsCertificate(c)) = &mut secret.r#type {
        match c.private_key.as_mut().and_then(|k| k.specifier.as_mut()) {
            Some(core::data_source::Specifier::InlineBytes(b)) => b.zeroize(),
            Some(core::data_source::Specifier::InlineString(s)) => s.zeroize(),
            _ => {}
        }
    }
}

/// Secrets to send, whose private keys (PEM) are zeroized when they are dropped,
/// whichever way the call goes on.
#[derive(Default)]
pub(crate) struct Secrets(Vec<tls::Secret>);

impl Drop for Secrets {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(zeroize_key);
    }
}

/// Names only: never a key.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|s| &s.name))
            .finish()
    }
}

impl std::ops::Deref for Secrets {
    type Target = [tls::Secret];

    fn deref(&self) -> &[tls::Secret] {
        &self.0
    }
}

impl KeyCopies for DiscoveryResponse {
    /// Every resource is an encoded `Secret`; those of a `tls_certificate` hold its key.
    fn zeroize_keys(&mut self) {
        for r in &mut self.resources {
            zeroize::Zeroize::zeroize(&mut r.value);
        }
    }
}

fn trusted_ca(name: &str, bundle: &TrustBundle) -> tls::Secret {
    tls::Secret {
        name: name.to_string(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(pem_certs(&bundle.x509_authorities)),
                ..Default::default()
            },
        )),
    }
}

fn spiffe_validator(name: &str, bundles: &[&TrustBundle]) -> tls::Secret {
    let mut trust_domains: Vec<_> = bundles
        .iter()
        .map(|b| tls::spiffe_cert_validator_config::TrustDomain {
            name: b.trust_domain.clone(),
            trust_bundle: inline(pem_certs(&b.x509_authorities)),
        })
        .collect();
    trust_domains.sort_by(|a, b| a.name.cmp(&b.name));
    let config = tls::SpiffeCertValidatorConfig { trust_domains };
    tls::Secret {
        name: name.to_string(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                custom_validator_config: Some(core::TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_string(),
                    typed_config: Some(any_of(SPIFFE_VALIDATOR_TYPE_URL, &config)),
                }),
                ..Default::default()
            },
        )),
    }
}

/// The secrets `names` ask for (all SVIDs and bundles by their IDs if none), bundles
/// first; refused if any name is not the caller's.
pub(crate) fn resources(names: &[String], m: &Material<'_>) -> Result<Secrets, SdsRefusal> {
    let own_td = m.bundle.trust_domain_id();
    let by_td = |id: &str| -> Option<&TrustBundle> {
        if id == own_td {
            return Some(m.bundle);
        }
        let td = id.strip_prefix("spiffe://")?;
        m.federated.get(td).map(Arc::as_ref)
    };
    let mut out = Secrets::default();
    if names.is_empty() {
        out.0.push(trusted_ca(&own_td, m.bundle));
        for b in m.federated.values() {
            out.0.push(trusted_ca(&b.trust_domain_id(), b));
        }
        for (svid, _) in &m.svids {
            out.0.push(tls_certificate(&svid.spiffe_id, svid));
        }
        return Ok(out);
    }
    // Each name once, in a stable order.
    let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut missing = Vec::new();
    let mut certs = Secrets::default();
    for name in wanted {
        if name == DEFAULT_BUNDLE_NAME {
            out.0.push(trusted_ca(name, m.bundle));
        } else if name == ALL_BUNDLES_NAME {
            let all: Vec<&TrustBundle> = std::iter::once(m.bundle)
                .chain(m.federated.values().map(Arc::as_ref))
                .collect();
            out.0.push(spiffe_validator(name, &all));
        } else if let Some(b) = by_td(name) {
            out.0.push(trusted_ca(name, b));
        } else if name == DEFAULT_SVID_NAME {
            match m.svids.first() {
                Some((svid, _)) => certs.0.push(tls_certificate(name, svid)),
                None => missing.push(name.to_string()),
            }
        } else if let Some((svid, _)) = m
            .svids
            .iter()
            .find(|(s, base)| s.spiffe_id == name || base.as_deref() == Some(name))
        {
            certs.0.push(tls_certificate(name, svid));
        } else {
            missing.push(name.to_string());
        }
    }
    if !missing.is_empty() {
        return Err(SdsRefusal::NotEntitled(missing));
    }
    out.0.append(&mut certs.0);
    Ok(out)
}

/// Checks a request's type and names against the bounds.
pub(crate) fn check_request(req: &DiscoveryRequest) -> Result<(), SdsRefusal> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        let shown: String = req.type_url.chars().take(200).collect();
        return Err(SdsRefusal::WrongType(shown));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES_PER_REQUEST {
        return Err(SdsRefusal::TooManyNames(req.resource_names.len()));
    }
    if let Some(n) = req
        .resource_names
        .iter()
        .find(|n| n.len() > MAX_RESOURCE_NAME_BYTES)
    {
        return Err(SdsRefusal::NameTooLong(n.len()));
    }
    Ok(())
}

/// What a stream does after an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send the current state for the subscription.
    Send,
    /// Nothing to send: an ACK, a NACK (logged), a stale request, or a change before
    /// anything was asked.
    Wait,
}

/// One stream's xDS state-of-the-world bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Subscription {
    /// The names last asked for; `None` before the first request.
    names: Option<Vec<String>>,
    /// Every distinct name asked for on the stream (bounded).
    seen: HashSet<String>,
    /// The nonce of the last response sent.
    last_nonce: Option<String>,
    /// Responses sent (the next nonce).
    sent: u64,
    /// The state's version: grows on every change.
    version: u64,
    /// The caller's uid, whose share of refusal lines a NACK's log line takes.
    uid: u32,
}

impl Subscription {
    /// Takes a (checked) request.
    pub(crate) fn on_request(&mut self, req: &DiscoveryRequest) -> Result<Step, SdsRefusal> {
        check_request(req)?;
        if let Some(err) = &req.error_detail {
            if let Some(suppressed) = crate::refusal_log::admit(self.uid, "sds_nack") {
                let message: String = err.message.chars().take(NACK_MESSAGE_CHARS).collect();
                tracing::warn!(event = "sds_nack", uid = self.uid, version = %req.version_info, nonce = %req.response_nonce, code = err.code, error = %message, suppressed, "Envoy rejected the secrets sent");
            }
        }
        if let Some(last) = &self.last_nonce {
            if *last != req.response_nonce {
                // An answer to an older response: the newer one is on its way.
                return Ok(Step::Wait);
            }
        }
        let mut names = req.resource_names.clone();
        names.sort();
        names.dedup();
        for n in &names {
            if !self.seen.contains(n) {
                if self.seen.len() >= MAX_RESOURCE_NAMES_PER_STREAM {
                    return Err(SdsRefusal::StreamNamesExhausted);
                }
                self.seen.insert(n.clone());
            }
        }
        if self.names.as_ref() == Some(&names) {
            return Ok(Step::Wait);
        }
        self.names = Some(names);
        Ok(Step::Send)
    }

    /// Takes a change of the caller's SVIDs or bundles.
    pub(crate) fn on_change(&mut self) -> Step {
        self.version += 1;
        if self.names.is_some() {
            Step::Send
        } else {
            Step::Wait
        }
    }

    /// The names subscribed to.
    pub(crate) fn names(&self) -> &[String] {
        self.names.as_deref().unwrap_or_default()
    }

    /// A response carrying `resources`, with a new nonce remembered.
    pub(crate) fn response(&mut self, resources: &[tls::Secret]) -> DiscoveryResponse {
        self.sent += 1;
        let nonce = self.sent.to_string();
        self.last_nonce = Some(nonce.clone());
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources: resources
                .iter()
                .map(|s| any_of(SECRET_TYPE_URL, s))
                .collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            nonce,
            ..Default::default()
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The SDS service over the Workload API's attestation.
pub struct SecretDiscovery {
    api: WorkloadApi,
}

impl SecretDiscovery {
    /// A service over the agent's workloads and bundle.
    pub fn new(workloads: Arc<Workloads>, bundle: watch::Receiver<Arc<TrustBundle>>) -> Self {
        Self {
            api: WorkloadApi::new(workloads, bundle),
        }
    }

    /// The service, bounded as the Workload API is, its answers' key copies zeroized
    /// once encoded.
    pub fn into_server(self) -> SdsService {
        let max = super::workload_listener::MAX_REQUEST_MESSAGE_BYTES;
        let sds = Arc::new(self);
        let generated =
            SecretDiscoveryServiceServer::from_arc(sds.clone()).max_decoding_message_size(max);
        let streams = ZeroizingService::new(
            generated,
            STREAM_SECRETS_PATH,
            BidiStreaming(StreamSecrets(sds.clone())),
            max,
        );
        ZeroizingService::new(streams, FETCH_SECRETS_PATH, Unary(FetchSecrets(sds)), max)
    }
}

/// The path of `FetchSecrets`.
const FETCH_SECRETS_PATH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// The SDS service: the generated server, `StreamSecrets` and `FetchSecrets` answered
/// through the zeroizing codec.
pub type SdsService = ZeroizingService<
    ZeroizingService<
        SecretDiscoveryServiceServer<SecretDiscovery>,
        BidiStreaming<StreamSecrets>,
        DiscoveryRequest,
    >,
    Unary<FetchSecrets>,
    DiscoveryRequest,
>;

/// `StreamSecrets`, for the zeroizing route.
#[derive(Clone)]
pub struct StreamSecrets(Arc<SecretDiscovery>);

impl tonic::server::StreamingService<DiscoveryRequest> for StreamSecrets {
    type Response = DiscoveryResponse;
    type ResponseStream = ResponseStream<DiscoveryResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.stream_secrets(request).await })
    }
}

/// `FetchSecrets`, for the zeroizing route.
#[derive(Clone)]
pub struct FetchSecrets(Arc<SecretDiscovery>);

impl tonic::server::UnaryService<DiscoveryRequest> for FetchSecrets {
    type Response = DiscoveryResponse;
    type Future = tonic::codegen::BoxFuture<Response<DiscoveryResponse>, Status>;

    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.fetch_secrets(request).await })
    }
}

/// The secrets for `names` from an instance's current state.
fn current(
    workloads: &Workloads,
    selectors: &[crate::Selector],
    set: &super::workloads::IdentitySet,
    bundle: &TrustBundle,
    names: &[String],
) -> Result<Secrets, Status> {
    if set.svids.is_empty() {
        // The process lost its last entry: tell the client.
        return Err(Status::permission_denied("no identity issued"));
    }
    let federated = workloads.federated_bundles_for(selectors);
    let bases: Vec<Option<String>> = {
        let entries = workloads
            .entries
            .read()
            .map_err(|_| Status::internal("lock"))?;
        set.svids
            .iter()
            .map(|s| {
                entries
                    .entries
                    .get(&s.entry_id)
                    .map(|e| e.spiffe_id.clone())
            })
            .collect()
    };
    let m = Material {
        svids: set.svids.iter().map(Arc::as_ref).zip(bases).collect(),
        bundle,
        federated: &federated,
    };
    resources(names, &m).map_err(Status::from)
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (peer, inst) = self.api.entitled_instance(&request).await?;
        let mut inbound = request.into_inner();
        let workloads = self.api.workloads.clone();
        let mut bundle = self.api.bundle.clone();
        let mut state = inst.state.subscribe();
        let mut notices = inst.revocations.subscribe();
        let mut gone = peer.revocation();
        // Only revocations made after the stream opened end it.
        let seen = notices.borrow_and_update().count;
        state.borrow_and_update();
        bundle.borrow_and_update();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut sub = Subscription {
                uid: peer.uid,
                ..Default::default()
            };
            sub.on_change();
            loop {
                let event = tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => sub.on_request(&req),
                        // The client closed its side or the connection broke.
                        Ok(None) | Err(_) => return,
                    },
                    r = state.changed() => match r {
                        Ok(()) => Ok(sub.on_change()),
                        Err(_) => return,
                    },
                    r = bundle.changed() => match r {
                        Ok(()) => Ok(sub.on_change()),
                        Err(_) => return,
                    },
                    // Checked below: these end the stream.
                    _ = gone.wait_for(Option::is_some) => Ok(Step::Send),
                    _ = notices.wait_for(|n| n.count > seen) => Ok(Step::Send),
                    _ = tx.closed() => return,
                };
                let step = match event {
                    Ok(step) => step,
                    Err(r) => {
                        tracing::info!(event = "sds_refused", pid = inst.process.pid, reason = %r, "SDS request refused");
                        let _ = tx.send(Err(r.into())).await;
                        return;
                    }
                };
                if step == Step::Wait {
                    continue;
                }
                // Checked before every message, as the Workload API's streams are.
                let msg = match stream_refusal(&notices, seen, &peer).await {
                    Some(refused) => Err(refused),
                    None => match gone.borrow().clone() {
                        Some(r) => Err(refusal_status(&r)),
                        None => {
                            let set = state.borrow_and_update().clone();
                            let b = bundle.borrow_and_update().clone();
                            current(&workloads, &inst.selectors, &set, &b, sub.names())
                                .map(|secrets| sub.response(&secrets))
                        }
                    },
                };
                if let Err(s) = &msg {
                    tracing::info!(event = "sds_stream_ended", pid = inst.process.pid, reason = %s.message(), "SDS stream ended");
                }
                let stop = msg.is_err();
                if tx.send(msg).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        check_request(request.get_ref())?;
        let (peer, inst) = self.api.entitled_instance(&request).await?;
        let set = inst.state.borrow().clone();
        let bundle = self.api.bundle.borrow().clone();
        let secrets = current(
            &self.api.workloads,
            &inst.selectors,
            &set,
            &bundle,
            &request.get_ref().resource_names,
        )?;
        still_the_connecting_process(&peer).await?;
        // No version or nonce: a fetch is not a subscription (as from SPIRE).
        Ok(Response::new(DiscoveryResponse {
            resources: secrets.iter().map(|s| any_of(SECRET_TYPE_URL, s)).collect(),
            type_url: SECRET_TYPE_URL.to_string(),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_proto::envoy_sds::google::rpc;

    fn svid(id: &str, entry: &str) -> HeldSvid {
        HeldSvid {
            entry_id: entry.into(),
            spiffe_id: id.into(),
            chain: vec![format!("leaf of {id}").into_bytes()],
            key: zeroize::Zeroizing::new(b"key".to_vec()),
            not_after: 0,
            renew_at: 0,
            hint: String::new(),
            authority: None,
            entry_revision: 0,
        }
    }

    fn bundle(td: &str) -> TrustBundle {
        TrustBundle {
            trust_domain: td.into(),
            x509_authorities: vec![format!("root of {td}").into_bytes()],
            ..Default::default()
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn summary(secrets: &[tls::Secret]) -> Vec<(String, &'static str)> {
        secrets
            .iter()
            .map(|s| {
                let kind = match &s.r#type {
                    Some(tls::secret::Type::TlsCertificate(_)) => "cert",
                    Some(tls::secret::Type::ValidationContext(v))
                        if v.custom_validator_config.is_some() =>
                    {
                        "spiffe"
                    }
                    Some(tls::secret::Type::ValidationContext(_)) => "ca",
                    None => "none",
                };
                (s.name.clone(), kind)
            })
            .collect()
    }

    fn inline_text(d: &Option<core::DataSource>) -> String {
        match d.as_ref().and_then(|d| d.specifier.as_ref()) {
            Some(core::data_source::Specifier::InlineBytes(b)) => {
                String::from_utf8(b.clone()).unwrap()
            }
            other => panic!("not inline bytes: {other:?}"),
        }
    }

    #[test]
    fn the_key_pem_is_the_pem_crates_byte_for_byte() {
        for len in [0, 1, 47, 48, 49, 96, 121, 138, 185, 300] {
            let key: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let expected = crate::svid::pem_lf(&pem::Pem::new("PRIVATE KEY", key.clone()));
            assert_eq!(
                String::from_utf8(key_pem(&key)).unwrap(),
                expected,
                "{len} bytes"
            );
        }
    }

    #[test]
    fn secrets_and_encoded_answers_lose_their_key_copies() {
        let a = svid("spiffe://example.org/envoy/abc123", "e1");
        let own = bundle("example.org");
        let federated = BTreeMap::new();
        let m = Material {
            svids: vec![(&a, Some("spiffe://example.org/envoy".into()))],
            bundle: &own,
            federated: &federated,
        };
        let secrets = resources(&names(&["default", "ROOTCA"]), &m).unwrap();
        let cert = secrets.iter().find(|s| s.name == "default").unwrap();
        let Some(tls::secret::Type::TlsCertificate(c)) = &cert.r#type else {
            panic!("not a certificate: {cert:?}");
        };
        assert!(inline_text(&c.private_key).contains("BEGIN PRIVATE KEY"));
        // What `Secrets` does to each secret when dropped.
        let mut wiped = cert.clone();
        zeroize_key(&mut wiped);
        let Some(tls::secret::Type::TlsCertificate(w)) = &wiped.r#type else {
            panic!("not a certificate");
        };
        assert_eq!(inline_text(&w.private_key), "", "the key is gone");
        assert_eq!(w.certificate_chain, c.certificate_chain, "only the key");
        assert_eq!(
            format!("{secrets:?}"),
            r#"["ROOTCA", "default"]"#,
            "names only"
        );

        // The answer: encoded whole, then its encoded secrets wiped.
        let mut answer = Subscription::default().response(&secrets);
        let expected = answer.clone();
        let mut buf = Vec::new();
        crate::zeroizing_x509_answers::encode_then_zeroize_keys(&mut answer, &mut buf).unwrap();
        assert_eq!(DiscoveryResponse::decode(buf.as_slice()).unwrap(), expected);
        assert!(answer.resources.iter().all(|r| r.value.is_empty()));
        assert_eq!(answer.resources.len(), 2);
    }

    #[test]
    fn names_follow_spire_and_per_instance_ids_answer_to_their_entry_id() {
        let a = svid("spiffe://example.org/envoy/abc123", "e1");
        let b = svid("spiffe://example.org/shared", "e2");
        let own = bundle("example.org");
        let mut federated = BTreeMap::new();
        federated.insert("other.org".to_string(), Arc::new(bundle("other.org")));
        let m = Material {
            svids: vec![
                (&a, Some("spiffe://example.org/envoy".into())),
                (&b, Some("spiffe://example.org/shared".into())),
            ],
            bundle: &own,
            federated: &federated,
        };
        // No names: everything by its ID, bundles first.
        let all = resources(&[], &m).unwrap();
        assert_eq!(
            summary(&all),
            vec![
                ("spiffe://example.org".to_string(), "ca"),
                ("spiffe://other.org".to_string(), "ca"),
                ("spiffe://example.org/envoy/abc123".to_string(), "cert"),
                ("spiffe://example.org/shared".to_string(), "cert"),
            ]
        );
        let got = resources(
            &names(&[
                "default",
                "ROOTCA",
                "ALL",
                "spiffe://other.org",
                "spiffe://example.org/envoy",
                "spiffe://example.org/shared",
                "default",
            ]),
            &m,
        )
        .unwrap();
        assert_eq!(
            summary(&got),
            vec![
                ("ALL".to_string(), "spiffe"),
                ("ROOTCA".to_string(), "ca"),
                ("spiffe://other.org".to_string(), "ca"),
                ("default".to_string(), "cert"),
                ("spiffe://example.org/envoy".to_string(), "cert"),
                ("spiffe://example.org/shared".to_string(), "cert"),
            ]
        );
        // default is the first SVID, in PEM with its PKCS#8 key.
        let Some(tls::secret::Type::TlsCertificate(c)) = &got[3].r#type else {
            panic!()
        };
        let chain = inline_text(&c.certificate_chain);
        assert!(
            chain.starts_with("-----BEGIN CERTIFICATE-----\n"),
            "{chain}"
        );
        let leaf = crate::svid::certs_from_pem(&chain).unwrap();
        assert_eq!(
            leaf,
            vec![b"leaf of spiffe://example.org/envoy/abc123".to_vec()]
        );
        assert!(inline_text(&c.private_key).starts_with("-----BEGIN PRIVATE KEY-----\n"));
        // ROOTCA is this trust domain's roots.
        let Some(tls::secret::Type::ValidationContext(v)) = &got[1].r#type else {
            panic!()
        };
        let roots = crate::svid::certs_from_pem(&inline_text(&v.trusted_ca)).unwrap();
        assert_eq!(roots, vec![b"root of example.org".to_vec()]);
        // ALL: Envoy's SPIFFE validator, a trust domain each, sorted.
        let Some(tls::secret::Type::ValidationContext(v)) = &got[0].r#type else {
            panic!()
        };
        let ext = v.custom_validator_config.as_ref().unwrap();
        assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
        let any = ext.typed_config.as_ref().unwrap();
        assert_eq!(any.type_url, SPIFFE_VALIDATOR_TYPE_URL);
        let cfg = tls::SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
        let tds: Vec<_> = cfg.trust_domains.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tds, ["example.org", "other.org"]);
        assert_eq!(
            crate::svid::certs_from_pem(&inline_text(&cfg.trust_domains[1].trust_bundle)).unwrap(),
            vec![b"root of other.org".to_vec()]
        );
        assert!(v.trusted_ca.is_none());
    }

    #[test]
    fn names_not_the_callers_are_refused_by_name() {
        let a = svid("spiffe://example.org/envoy/abc123", "e1");
        let own = bundle("example.org");
        let federated = BTreeMap::new();
        let m = Material {
            svids: vec![(&a, Some("spiffe://example.org/envoy".into()))],
            bundle: &own,
            federated: &federated,
        };
        let err = resources(
            &names(&[
                "ROOTCA",
                "spiffe://example.org/db",
                "spiffe://unfederated.org",
                // Another instance's ID of the same entry.
                "spiffe://example.org/envoy/zzz",
            ]),
            &m,
        )
        .unwrap_err();
        assert_eq!(
            err,
            SdsRefusal::NotEntitled(names(&[
                "spiffe://example.org/db",
                "spiffe://example.org/envoy/zzz",
                "spiffe://unfederated.org",
            ]))
        );
        assert_eq!(Status::from(err).code(), tonic::Code::InvalidArgument);
        // No SVID: default is refused too.
        let none = Material {
            svids: vec![],
            bundle: &own,
            federated: &federated,
        };
        assert_eq!(
            resources(&names(&["default"]), &none).unwrap_err(),
            SdsRefusal::NotEntitled(names(&["default"]))
        );
    }

    fn req(names_: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names(names_),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    #[test]
    fn acks_and_nacks_do_not_resend_and_changes_push() {
        let mut sub = Subscription::default();
        // A change before anything is asked sends nothing.
        assert_eq!(sub.on_change(), Step::Wait);
        assert_eq!(
            sub.on_request(&req(&["default"], "", "")).unwrap(),
            Step::Send
        );
        let r1 = sub.response(&[]);
        assert_eq!((r1.version_info.as_str(), r1.nonce.as_str()), ("1", "1"));
        assert_eq!(r1.type_url, SECRET_TYPE_URL);
        // The ACK.
        assert_eq!(
            sub.on_request(&req(&["default"], "1", "1")).unwrap(),
            Step::Wait
        );
        // A rotation is pushed with a new version and nonce.
        assert_eq!(sub.on_change(), Step::Send);
        let r2 = sub.response(&[]);
        assert_eq!((r2.version_info.as_str(), r2.nonce.as_str()), ("2", "2"));
        // A NACK (old version, error detail) with the same names is logged, not resent:
        // no loop.
        let mut nack = req(&["default"], "1", "2");
        nack.error_detail = Some(rpc::Status {
            code: 13,
            message: "bad key".into(),
            details: vec![],
        });
        assert_eq!(sub.on_request(&nack).unwrap(), Step::Wait);
        assert_eq!(sub.on_request(&nack).unwrap(), Step::Wait);
        // New names are answered, in any order or with repeats.
        assert_eq!(
            sub.on_request(&req(&["default", "ROOTCA"], "1", "2"))
                .unwrap(),
            Step::Send
        );
        let r3 = sub.response(&[]);
        assert_eq!(sub.names(), names(&["ROOTCA", "default"]));
        assert_eq!(
            sub.on_request(&req(&["ROOTCA", "default", "ROOTCA"], "2", &r3.nonce))
                .unwrap(),
            Step::Wait
        );
        // A request echoing an older nonce is stale, even with new names.
        assert_eq!(
            sub.on_request(&req(&["ALL"], "2", "1")).unwrap(),
            Step::Wait
        );
        assert_eq!(sub.names(), names(&["ROOTCA", "default"]));
    }

    #[test]
    fn requests_are_bounded_and_of_the_secret_type() {
        let mut sub = Subscription::default();
        let mut wrong = req(&["default"], "", "");
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(matches!(
            sub.on_request(&wrong).unwrap_err(),
            SdsRefusal::WrongType(t) if t.contains("Cluster")
        ));
        // An empty type URL is accepted (a plain SDS call may leave it out).
        let mut untyped = req(&["default"], "", "");
        untyped.type_url.clear();
        assert_eq!(sub.on_request(&untyped).unwrap(), Step::Send);
        let many: Vec<String> = (0..=MAX_RESOURCE_NAMES_PER_REQUEST)
            .map(|i| format!("n{i}"))
            .collect();
        let mut r = req(&[], "", "");
        r.resource_names = many;
        assert_eq!(
            sub.on_request(&r).unwrap_err(),
            SdsRefusal::TooManyNames(MAX_RESOURCE_NAMES_PER_REQUEST + 1)
        );
        r.resource_names = vec!["x".repeat(MAX_RESOURCE_NAME_BYTES + 1)];
        assert_eq!(
            sub.on_request(&r).unwrap_err(),
            SdsRefusal::NameTooLong(MAX_RESOURCE_NAME_BYTES + 1)
        );
        // Distinct names over a stream's life are bounded too.
        let mut sub = Subscription::default();
        let mut nonce = String::new();
        let err = (0..MAX_RESOURCE_NAMES_PER_STREAM)
            .step_by(MAX_RESOURCE_NAMES_PER_REQUEST)
            .chain([MAX_RESOURCE_NAMES_PER_STREAM])
            .find_map(|start| {
                let mut r = req(&[], "", &nonce);
                r.resource_names = (start..start + MAX_RESOURCE_NAMES_PER_REQUEST)
                    .map(|i| format!("n{i}"))
                    .collect();
                match sub.on_request(&r) {
                    Ok(_) => {
                        nonce = sub.response(&[]).nonce;
                        None
                    }
                    Err(e) => Some(e),
                }
            })
            .unwrap();
        assert_eq!(err, SdsRefusal::StreamNamesExhausted);
        assert_eq!(Status::from(err).code(), tonic::Code::ResourceExhausted);
    }
}
