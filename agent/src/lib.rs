//! The node agent: attests its node, keeps its own SVID and the entries it serves
//! fresh, and serves the SPIFFE Workload API to local processes.

#![forbid(unsafe_code)]

pub mod attestors;
pub mod cli;
pub mod config;
pub mod container;
pub mod delegated_identity;
pub mod metrics;
pub mod node_client;
pub mod refusal_log;
pub mod sds;
pub mod servers;
pub mod token_exchange;
pub mod workload_api;
pub mod workload_attestation;
pub mod workload_listener;
pub mod workloads;
pub mod zeroizing_x509_answers;

// The shared SPIFFE primitives and attestation types, under the names the agent's
// modules use.
use ztid_attestation::{blocking, unix_seconds, Error};
use ztid_attestor::agent_key;
use ztid_spiffe::{bundle, jwt, limits, selector, spiffe_id, svid, tls, Selector};

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use ztid_proto::node::{self as pb, node_client::NodeClient};
use ztid_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;

use crate::agent_key::{AgentKey, SOFTWARE_KEY_FILE, TPM_KEY_FILE};
use crate::bundle::TrustBundle;
use crate::tls::{shared_roots, ServerSvidVerifier, SharedRoots};
use config::AgentConfig;
use node_client::AgentSvid;
use servers::{NodeConnections, Servers};
use workloads::Workloads;
use ztid_attestor::NodeAttestor;

const SVID_FILE: &str = "agent_svid.pem";
const BUNDLE_FILE: &str = "bundle.pb";
/// Entries per `SyncEntries` answer the agent asks for (the server's most): a large
/// entry set comes in pages, each far below gRPC's 4 MiB message limit.
const SYNC_PAGE_SIZE: u32 = 1000;
/// The most entries one full sync may bring, and so its pages: the server is
/// authenticated, but a bug (or a token that never ends) must not grow the agent
/// without bound. Far above what a node serves (the bench's million entries are a
/// whole cluster's).
const MAX_SYNC_ENTRIES: usize = 1_000_000;
const MAX_SYNC_PAGES: usize = MAX_SYNC_ENTRIES / SYNC_PAGE_SIZE as usize + 1;

fn now() -> i64 {
    unix_seconds(std::time::SystemTime::now())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::io::Write::write_all(&mut f, bytes)
        .map_err(Error::io(format!("writing {}", tmp.display())))?;
    f.sync_all()
        .map_err(Error::io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming {}", path.display())))
}

/// Saves the agent's SVID, key and bundle so a restart does not need a new attestation.
fn persist(dir: &Path, svid: &AgentSvid, bundle: &TrustBundle) -> Result<(), Error> {
    let (key_file, key) = svid.key.persisted()?;
    // One key file at a time: a software key must not shadow a newer TPM key or back.
    for f in [SOFTWARE_KEY_FILE, TPM_KEY_FILE] {
        if f != key_file {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    write_private(&dir.join(key_file), &key)?;
    write_private(
        &dir.join(SVID_FILE),
        crate::svid::certs_to_pem(svid.chain.iter().map(Vec::as_slice)).as_bytes(),
    )?;
    write_private(
        &dir.join(BUNDLE_FILE),
        &pb::Bundle::from(bundle).encode_to_vec(),
    )
}

/// Loads a persisted SVID if one is there and still valid.
fn load_persisted(dir: &Path, tpm_tcti: &str) -> Option<(AgentSvid, TrustBundle)> {
    let key = AgentKey::load(dir, tpm_tcti)?;
    let chain =
        crate::svid::certs_from_pem(&std::fs::read_to_string(dir.join(SVID_FILE)).ok()?).ok()?;
    let bundle = pb::Bundle::decode(std::fs::read(dir.join(BUNDLE_FILE)).ok()?.as_slice()).ok()?;
    let leaf = chain.first()?;
    let spiffe_id = crate::svid::spiffe_id_of_leaf(leaf).ok()?.to_string();
    let not_after = crate::svid::not_after(leaf).ok()?;
    if not_after <= now() + 30 {
        return None;
    }
    // The key file is written before the SVID file: after a crash between the two, the
    // key is not the one the SVID certifies, and every handshake would fail.
    if !certifies(leaf, &key) {
        tracing::warn!(
            "the persisted agent SVID does not certify the persisted agent key; attesting again"
        );
        return None;
    }
    Some((
        AgentSvid {
            chain,
            key,
            spiffe_id,
            not_after,
        },
        TrustBundle::from(&bundle),
    ))
}

/// Checks a renewed agent SVID before it is kept: it chains to the agent's roots, names
/// the agent's own ID and certifies the renewal's key. Anything else would be kept and
/// then fail every handshake (another key), or make the agent another identity.
fn check_renewed(
    chain: &[Vec<u8>],
    roots: &[rustls_pki_types::CertificateDer<'static>],
    id: &str,
    key: &AgentKey,
) -> Result<(), Error> {
    let certs: Vec<_> = chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
        .collect();
    let named = crate::svid::verify_chain(
        &certs,
        roots,
        rustls_pki_types::UnixTime::now(),
        crate::svid::Usage::Client,
    )?;
    if named.to_string() != id {
        return Err(Error::Protocol(format!(
            "the renewed SVID names {named}, not this agent's {id}"
        )));
    }
    match chain.first() {
        Some(leaf) if certifies(leaf, key) => Ok(()),
        _ => Err(Error::Protocol(
            "the renewed SVID certifies another key than the renewal's CSR".into(),
        )),
    }
}

/// Whether `leaf` certifies `key` (their SubjectPublicKeyInfo are the same).
fn certifies(leaf: &[u8], key: &AgentKey) -> bool {
    match (crate::svid::key_sha256(leaf), key.spki()) {
        (Ok(certified), Ok(spki)) => {
            certified == hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki))
        }
        _ => false,
    }
}

fn forget_persisted(dir: &Path) {
    for f in [SOFTWARE_KEY_FILE, TPM_KEY_FILE, SVID_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// A new software agent key and its CSR.
fn agent_key_and_csr() -> Result<(AgentKey, Vec<u8>), Error> {
    let key = AgentKey::generate_software()?;
    let csr = key.csr()?;
    Ok((key, csr))
}

fn status_err(s: tonic::Status) -> Error {
    Error::Server(format!("{:?}: {}", s.code(), s.message()))
}

/// Why one attestation attempt failed: the server's status (or the transport's), which
/// may send the attestation to the next server, or a local error, which does not.
enum AttestFailure {
    Call(tonic::Status),
    Local(Error),
}

impl From<Error> for AttestFailure {
    fn from(e: Error) -> Self {
        Self::Local(e)
    }
}

impl From<ztid_spiffe::Error> for AttestFailure {
    fn from(e: ztid_spiffe::Error) -> Self {
        Self::Local(e.into())
    }
}

/// Runs node attestation on the current server, and on the next ones while servers do
/// not answer ([`servers`]); a refusal ends it.
async fn attest(
    conns: &NodeConnections,
    attestor: &mut dyn NodeAttestor,
) -> Result<(AgentSvid, TrustBundle), Error> {
    let mut tries = conns.tries();
    loop {
        let (addr, mut client) = tries.next().await.map_err(status_err)?;
        let attempt =
            tokio::time::timeout(servers::ATTEST_TIMEOUT, attest_on(&mut client, attestor)).await;
        let status = match attempt {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(AttestFailure::Local(e))) => return Err(e),
            Ok(Err(AttestFailure::Call(s))) => s,
            Err(_) => tonic::Status::deadline_exceeded(format!(
                "no attestation result from {addr} within {:?}",
                servers::ATTEST_TIMEOUT
            )),
        };
        tries.failed(addr, status).await.map_err(status_err)?;
    }
}

/// The status that ended the attestation stream, once sending on it failed.
async fn stream_end(inbound: &mut tonic::Streaming<pb::AttestResponse>) -> AttestFailure {
    match inbound.next().await {
        Some(Err(s)) => AttestFailure::Call(s),
        _ => AttestFailure::Local(Error::Protocol("attestation stream closed".into())),
    }
}

/// Runs node attestation over one `Attest` stream.
async fn attest_on(
    client: &mut NodeClient<Channel>,
    attestor: &mut dyn NodeAttestor,
) -> Result<(AgentSvid, TrustBundle), AttestFailure> {
    // Attestors talk to hardware (TPM commands, configfs-tsm), which blocks.
    let (key, csr) = match crate::blocking(|| attestor.agent_key())? {
        Some(key) => {
            let csr = crate::blocking(|| key.csr())?;
            (key, csr)
        }
        None => agent_key_and_csr()?,
    };
    // The key the CA will certify, as the CA reads it from the CSR: evidence is made only
    // for challenges that bind it to this key (a relayed challenge names another).
    let agent_spki = ztid_attestor::agent_key::csr_spki(&csr)?;
    let payload = crate::blocking(|| attestor.initial_evidence())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AttestRequest {
        step: Some(pb::attest_request::Step::Init(pb::AttestInit {
            method: attestor.method().to_string(),
            payload,
            csr,
        })),
    })
    .await
    .map_err(|_| Error::Protocol("attestation stream closed".into()))?;
    let mut inbound = client
        .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(AttestFailure::Call)?
        .into_inner();
    while let Some(msg) = inbound.next().await {
        match msg.map_err(AttestFailure::Call)?.step {
            Some(pb::attest_response::Step::Challenge(c)) => {
                let answer = crate::blocking(|| attestor.answer(&c, &agent_spki))?;
                if tx
                    .send(pb::AttestRequest {
                        step: Some(pb::attest_request::Step::ChallengeResponse(answer)),
                    })
                    .await
                    .is_err()
                {
                    return Err(stream_end(&mut inbound).await);
                }
            }
            Some(pb::attest_response::Step::Result(r)) => {
                let bundle =
                    r.bundle.as_ref().map(TrustBundle::from).ok_or_else(|| {
                        Error::Protocol("attestation result without a bundle".into())
                    })?;
                let leaf = r
                    .svid_chain
                    .first()
                    .ok_or_else(|| Error::Protocol("attestation result without an SVID".into()))?;
                // The SVID must chain to the bundle we were given and carry the ID we were told.
                let chain: Vec<_> = r
                    .svid_chain
                    .iter()
                    .map(|c| rustls_pki_types::CertificateDer::from(c.as_slice()))
                    .collect();
                let roots: Vec<_> = bundle
                    .x509_authorities
                    .iter()
                    .cloned()
                    .map(rustls_pki_types::CertificateDer::from)
                    .collect();
                let id = crate::svid::verify_chain(
                    &chain,
                    &roots,
                    rustls_pki_types::UnixTime::now(),
                    crate::svid::Usage::Client,
                )?;
                if id.to_string() != r.spiffe_id {
                    return Err(Error::Protocol(
                        "attestation result SVID does not match its SPIFFE ID".into(),
                    )
                    .into());
                }
                if !certifies(leaf, &key) {
                    return Err(Error::Protocol(
                        "attestation result SVID certifies another key than the CSR's".into(),
                    )
                    .into());
                }
                let not_after = crate::svid::not_after(leaf)?;
                return Ok((
                    AgentSvid {
                        chain: r.svid_chain,
                        key,
                        spiffe_id: r.spiffe_id,
                        not_after,
                    },
                    bundle,
                ));
            }
            None => return Err(Error::Protocol("empty attestation message".into()).into()),
        }
    }
    Err(Error::Protocol("server closed the attestation stream without a result".into()).into())
}

/// Trust domain named by the URI SAN of a CA certificate (`spiffe://TD`).
fn trust_domain_of_ca(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u
            .strip_prefix("spiffe://")
            .map(|td| td.trim_end_matches('/').to_string()),
        _ => None,
    })
}

/// Whether a bundle the server sent replaces the held one (of trust domain `own`, at
/// `held_sequence`): a later one does, if it is of the same trust domain and holds X.509
/// authorities. Only the authenticated server sends it, but it pins the server from
/// then on, so anything else is refused (the reason) rather than taken.
fn replaces_held(own: &str, held_sequence: u64, sent: &TrustBundle) -> Result<bool, String> {
    if sent.sequence <= held_sequence {
        return Ok(false);
    }
    if sent.trust_domain != own {
        return Err(format!(
            "a bundle of trust domain {:?}, not this agent's {own:?}",
            sent.trust_domain
        ));
    }
    if sent.x509_authorities.is_empty() {
        return Err(format!(
            "a bundle without X.509 authorities (sequence {})",
            sent.sequence
        ));
    }
    Ok(true)
}

/// Refuses a full entry sync whose server asks for another page past the bounds.
fn sync_may_go_on(pages: usize, entries: usize) -> Result<(), tonic::Status> {
    if pages >= MAX_SYNC_PAGES || entries >= MAX_SYNC_ENTRIES {
        return Err(tonic::Status::resource_exhausted(format!(
            "a full entry sync went on past {pages} pages and {entries} entries; \
             the agent takes at most {MAX_SYNC_ENTRIES} entries in {MAX_SYNC_PAGES} pages"
        )));
    }
    Ok(())
}

/// The bundle kept in `dir` by an earlier attestation: `None` if there is none; an
/// error if it is there but does not decode or holds no X.509 authority (never skipped
/// for a weaker bootstrap).
fn persisted_bundle(dir: &Path) -> Result<Option<TrustBundle>, Error> {
    let path = dir.join(BUNDLE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    let fail = |why: String| {
        Error::Config(format!(
            "the kept trust bundle {} {why}; remove it (and the agent's other files there) to attest afresh",
            path.display()
        ))
    };
    let b =
        pb::Bundle::decode(bytes.as_slice()).map_err(|e| fail(format!("does not decode ({e})")))?;
    if b.x509_authorities.is_empty() {
        return Err(fail("holds no X.509 authority".into()));
    }
    Ok(Some(TrustBundle::from(&b)))
}

/// How the server is verified for an attestation made without a usable agent SVID, and
/// the trust domain its answer must be for. An agent that attested before (its SVID
/// expired, or was forgotten) verifies the server with the bundle it kept, as SPIRE's
/// agent does: `--insecure-bootstrap` is for the first attestation only, and a
/// `--trust-bundle` file may hold authorities the trust domain has rotated away from.
/// Otherwise the configured roots (`--trust-bundle`), or none (`--insecure-bootstrap`).
fn bootstrap_verifier(
    config: &AgentConfig,
    configured_roots: Option<&[Vec<u8>]>,
) -> Result<(Arc<ServerSvidVerifier>, Option<String>), Error> {
    if let Some(kept) = persisted_bundle(&config.data_dir)? {
        if let Some(td) = &config.trust_domain {
            if &kept.trust_domain != td {
                return Err(Error::Config(format!(
                    "the kept trust bundle in {} is for trust domain {}, expected {td}",
                    config.data_dir.display(),
                    kept.trust_domain
                )));
            }
        }
        tracing::info!(
            trust_domain = %kept.trust_domain,
            authorities = kept.x509_authorities.len(),
            "attesting again: the server is verified with the bundle kept from the last attestation"
        );
        let verifier = ServerSvidVerifier::new(
            shared_roots(kept.x509_authorities),
            crate::spiffe_id::server_id_of(&kept.trust_domain)?,
        );
        return Ok((Arc::new(verifier), Some(kept.trust_domain)));
    }
    Ok(match configured_roots {
        Some(roots) => {
            let td = config
                .trust_domain
                .clone()
                .or_else(|| roots.iter().find_map(|r| trust_domain_of_ca(r)))
                .ok_or_else(|| {
                    Error::Config(
                        "cannot tell the trust domain from the trust bundle; set --trust-domain"
                            .into(),
                    )
                })?;
            let verifier = ServerSvidVerifier::new(
                shared_roots(roots.to_vec()),
                crate::spiffe_id::server_id_of(&td)?,
            );
            (Arc::new(verifier), config.trust_domain.clone())
        }
        None => {
            tracing::warn!(
                "insecure bootstrap: the server is not verified for this first attestation"
            );
            (
                Arc::new(ServerSvidVerifier::insecure_bootstrap()),
                config.trust_domain.clone(),
            )
        }
    })
}

struct Runtime {
    config: AgentConfig,
    servers: Arc<Servers>,
    server_id: String,
    roots: SharedRoots,
    node: Arc<ArcSwap<NodeConnections>>,
    svid: ArcSwap<AgentSvid>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    workloads: Arc<Workloads>,
}

impl Runtime {
    fn connect(&self, svid: &AgentSvid) -> Result<NodeConnections, Error> {
        let verifier = Arc::new(ServerSvidVerifier::new(
            self.roots.clone(),
            self.server_id.clone(),
        ));
        Ok(NodeConnections::new(
            self.servers.clone(),
            verifier,
            Some(svid.certified_key()?),
        ))
    }

    fn set_bundle(&self, bundle: TrustBundle) -> Result<(), Error> {
        self.roots.store(Arc::new(
            bundle
                .x509_authorities
                .iter()
                .cloned()
                .map(rustls_pki_types::CertificateDer::from)
                .collect(),
        ));
        persist(&self.config.data_dir, &self.svid.load(), &bundle)?;
        tracing::info!(
            sequence = bundle.sequence,
            authorities = bundle.x509_authorities.len(),
            "trust bundle updated"
        );
        self.bundle.send_replace(Arc::new(bundle));
        Ok(())
    }

    /// One sync with the server: entries and bundle. A full answer that comes in pages
    /// is fetched to its last page and applied as one; entries may have changed while
    /// it paged, so an incremental sync since its revision follows at once.
    async fn sync(&self) -> Result<bool, tonic::Status> {
        let (changed, paged) = self.sync_once().await?;
        if paged {
            let (more, _) = self.sync_once().await?;
            return Ok(changed || more);
        }
        Ok(changed)
    }

    /// The pages after the first of a paged full answer, appended to `first`.
    async fn rest_of_pages(
        &self,
        first: &mut pb::SyncEntriesResponse,
    ) -> Result<(), tonic::Status> {
        let mut token = std::mem::take(&mut first.next_page_token);
        let mut pages = 1;
        while !token.is_empty() {
            let req = pb::SyncEntriesRequest {
                since_revision: first.revision,
                page_size: SYNC_PAGE_SIZE,
                page_token: token,
                ..Default::default()
            };
            let page = self
                .node
                .load_full()
                .call("SyncEntries", servers::SYNC_TIMEOUT, |mut c| {
                    let req = req.clone();
                    async move { c.sync_entries(req).await.map(tonic::Response::into_inner) }
                })
                .await?;
            if !page.full || page.revision != first.revision {
                return Err(tonic::Status::internal(
                    "a page of a full entry sync does not continue the first",
                ));
            }
            first.upserted.extend(page.upserted);
            token = page.next_page_token;
            pages += 1;
            if !token.is_empty() {
                sync_may_go_on(pages, first.upserted.len())?;
            }
        }
        tracing::info!(
            entries = first.upserted.len(),
            pages,
            revision = first.revision,
            "full entry set received in pages"
        );
        Ok(())
    }

    /// One `SyncEntries` exchange (every page of it) applied; returns whether anything
    /// changed and whether the answer came in pages.
    async fn sync_once(&self) -> Result<(bool, bool), tonic::Status> {
        let (since, seq) = {
            let e = self
                .workloads
                .entries
                .read()
                .map_err(|_| tonic::Status::internal("lock"))?;
            (e.revision, self.bundle.borrow().sequence)
        };
        let federated_version = self.workloads.federated.read().map(|f| f.0).unwrap_or(0);
        let mut authorities_in_use = self.workloads.authorities_in_use(now()).await;
        {
            let svid = self.svid.load();
            let b = self.bundle.borrow();
            if let Some(a) =
                crate::svid::issuing_authority_of_chain(&svid.chain, &b.x509_authorities)
            {
                authorities_in_use.push(a);
            }
        }
        // Delegated identity calls since the last sync, for the server's audit log.
        let (delegated_subscriptions, delegated_subscriptions_dropped) =
            delegated_identity::take_report();
        let req = pb::SyncEntriesRequest {
            since_revision: since,
            bundle_sequence: seq,
            authorities_in_use,
            federated_bundles_version: federated_version,
            page_size: SYNC_PAGE_SIZE,
            page_token: String::new(),
            delegated_subscriptions,
            delegated_subscriptions_dropped,
        };
        let mut resp = match self
            .node
            .load_full()
            .call("SyncEntries", servers::SYNC_TIMEOUT, |mut c| {
                let req = req.clone();
                async move { c.sync_entries(req).await.map(tonic::Response::into_inner) }
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Reported at the next sync instead.
                delegated_identity::restore_report(
                    req.delegated_subscriptions,
                    req.delegated_subscriptions_dropped,
                    e.code() == tonic::Code::InvalidArgument,
                );
                return Err(e);
            }
        };
        let paged = !resp.next_page_token.is_empty();
        if paged {
            if let Err(e) = self.rest_of_pages(&mut resp).await {
                // The held set stays; the next sync asks for everything again (the
                // server may have moved the agent to a full answer for new aliases).
                if let Ok(mut entries) = self.workloads.entries.write() {
                    entries.revision = 0;
                }
                return Err(e);
            }
        }
        let mut changed = self
            .workloads
            .entries
            .write()
            .map_err(|_| tonic::Status::internal("lock"))?
            .apply(&resp);
        // Every answer carries the revocations in force (the first page of a paged one).
        self.workloads
            .apply_revocations(&resp.revoked_instances, &resp.revoked_entries)
            .await;
        if resp.federated_bundles_version != 0
            && resp.federated_bundles_version != federated_version
        {
            let map: std::collections::BTreeMap<String, Arc<TrustBundle>> = resp
                .federated_bundles
                .iter()
                .map(|b| (b.trust_domain.clone(), Arc::new(TrustBundle::from(b))))
                .collect();
            tracing::info!(
                trust_domains = ?map.iter().map(|(td, b)| format!("{td}@{}", b.sequence)).collect::<Vec<_>>(),
                "federated bundles updated"
            );
            if let Ok(mut f) = self.workloads.federated.write() {
                *f = (resp.federated_bundles_version, map);
            }
            // Open Workload API streams re-send on a bundle watch change.
            self.bundle.send_modify(|_| {});
        }
        if let Some(b) = &resp.bundle {
            let b = TrustBundle::from(b);
            let own = self.bundle.borrow().trust_domain.clone();
            let replaces = replaces_held(&own, seq, &b);
            if let Err(why) = &replaces {
                tracing::error!(reason = %why, "the server sent a bundle the agent does not take; kept the one held");
            }
            if replaces == Ok(true) {
                if let Err(e) = self.set_bundle(b) {
                    tracing::error!(error = %e, "could not store the new bundle");
                }
                changed = true;
            }
        }
        Ok((changed, paged))
    }

    /// Renews the agent's SVID: join-token agents by asking for it; hardware-attested
    /// agents by attesting again (continuous attestation: every renewal is fresh evidence).
    async fn renew_agent_svid(&self) -> Result<(), Error> {
        let svid = if self.config.attestor == "join-token" {
            let (key, csr) = agent_key_and_csr()?;
            let resp = self
                .node
                .load_full()
                .call("RenewAgent", servers::CALL_TIMEOUT, |mut c| {
                    let req = pb::RenewAgentRequest { csr: csr.clone() };
                    async move { c.renew_agent(req).await.map(tonic::Response::into_inner) }
                })
                .await
                .map_err(status_err)?;
            let leaf = resp
                .svid_chain
                .first()
                .ok_or_else(|| Error::Protocol("renewal without an SVID".into()))?;
            check_renewed(
                &resp.svid_chain,
                &self.roots.load(),
                &self.svid.load().spiffe_id,
                &key,
            )?;
            AgentSvid {
                not_after: crate::svid::not_after(leaf)?,
                spiffe_id: crate::svid::spiffe_id_of_leaf(leaf)?.to_string(),
                chain: resp.svid_chain,
                key,
            }
        } else {
            let mut attestor = attestors::build(&self.config)?;
            let verifier = Arc::new(ServerSvidVerifier::new(
                self.roots.clone(),
                self.server_id.clone(),
            ));
            let conns = NodeConnections::new(self.servers.clone(), verifier, None);
            let (svid, _) = attest(&conns, attestor.as_mut()).await?;
            if svid.spiffe_id != self.svid.load().spiffe_id {
                return Err(Error::Protocol(format!(
                    "re-attestation returned another identity, {}",
                    svid.spiffe_id
                )));
            }
            svid
        };
        persist(&self.config.data_dir, &svid, &self.bundle.borrow())?;
        let client = self.connect(&svid)?;
        tracing::info!(agent = %svid.spiffe_id, not_after = svid.not_after, "agent SVID renewed");
        self.svid.store(Arc::new(svid));
        self.node.store(Arc::new(client));
        Ok(())
    }

    async fn rotate_workloads(&self) {
        let t = now();
        for inst in self.workloads.live_instances() {
            if self.workloads.due(&inst, t) {
                if let Err(e) = self.workloads.reconcile(&inst).await {
                    tracing::warn!(pid = inst.process.pid, error = %e, "workload SVID renewal failed");
                }
            }
        }
    }

    async fn reconcile_all(&self) {
        for inst in self.workloads.live_instances() {
            if let Err(e) = self.workloads.reconcile(&inst).await {
                tracing::warn!(pid = inst.process.pid, error = %e, "workload SVID update failed");
            }
        }
    }
}

/// A change stream that lasted this long before it ended was healthy: the backoff
/// starts over.
const WATCH_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How often an open change stream checks that it still goes to the server the agent
/// syncs with, with the agent's current SVID (after a failover or a renewal it moves).
const WATCH_FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// A server without `WatchChanges` (older) is asked again after this long.
const WATCH_UNIMPLEMENTED_RETRY: Duration = Duration::from_secs(300);

/// How one change stream ended.
enum WatchEnd {
    /// The server ended it cleanly (its lifetime bound), or the agent moved it to
    /// another server or SVID: open the next one.
    Reopen,
    /// The server does not implement `WatchChanges`: poll only.
    Unimplemented,
    /// An error: poll meanwhile, open again after a backoff.
    Failed(tonic::Status),
}

impl Runtime {
    /// Whether `notice` says the server holds something newer than this agent: a later
    /// entry revision or bundle, or revocations or federated bundles changed since
    /// `previous` (the last notice of the same stream).
    fn notice_is_news(
        &self,
        notice: &pb::ChangeNotice,
        previous: Option<&pb::ChangeNotice>,
    ) -> bool {
        let held = self
            .workloads
            .entries
            .read()
            .map(|e| e.revision)
            .unwrap_or(0);
        notice.entry_revision > held
            || notice.bundle_sequence > self.bundle.borrow().sequence
            || previous.is_some_and(|p| {
                p.revocations_version != notice.revocations_version
                    || p.federation_version != notice.federation_version
            })
    }

    /// Keeps one change stream open to the current server until it ends; each notice
    /// with news wakes the sync loop.
    async fn watch_once(&self, sync_now: &tokio::sync::Notify) -> WatchEnd {
        let conns = self.node.load_full();
        let (addr, mut client) = match conns.current_client().await {
            Ok(c) => c,
            Err(s) => return WatchEnd::Failed(s),
        };
        let opened = tokio::time::timeout(
            servers::CALL_TIMEOUT,
            client.watch_changes(pb::WatchChangesRequest {}),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => return WatchEnd::Unimplemented,
            Ok(Err(s)) => return WatchEnd::Failed(s),
            Err(_) => {
                return WatchEnd::Failed(tonic::Status::deadline_exceeded(format!(
                    "WatchChanges: no answer from {addr} within {:?}",
                    servers::CALL_TIMEOUT
                )))
            }
        };
        tracing::debug!(server = %addr, "change stream open");
        let mut previous: Option<pb::ChangeNotice> = None;
        let mut follow = tokio::time::interval(WATCH_FOLLOW_INTERVAL);
        follow.tick().await;
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(notice)) => {
                        // The first notice of a stream: what changed while none was open
                        // is unknown, so one sync.
                        if previous.is_none() || self.notice_is_news(&notice, previous.as_ref()) {
                            sync_now.notify_one();
                        }
                        previous = Some(notice);
                    }
                    Ok(None) => return WatchEnd::Reopen,
                    Err(s) => return WatchEnd::Failed(s),
                },
                _ = follow.tick() => {
                    let moved = !Arc::ptr_eq(&self.node.load_full(), &conns)
                        || conns.current_addr() != Some(addr);
                    if moved {
                        return WatchEnd::Reopen;
                    }
                }
            }
        }
    }
}

/// The change stream's loop (issue 17): keeps one `WatchChanges` stream open to the
/// server the agent syncs with; on an error the poll carries on alone until the stream
/// is open again (after a backoff with jitter); against a server without it, polls.
async fn watch_changes(
    rt: Arc<Runtime>,
    sync_now: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = tokio::time::Instant::now();
        let pause = match rt.watch_once(&sync_now).await {
            WatchEnd::Reopen if started.elapsed() >= WATCH_HEALTHY_AFTER => {
                failures = 0;
                None
            }
            // Ended early again and again: not a healthy stream, back off.
            WatchEnd::Reopen => {
                failures += 1;
                (failures > 1).then(|| servers::watch_backoff(failures))
            }
            WatchEnd::Unimplemented => {
                tracing::info!(
                    "the server does not push entry changes (an older ztid-server): polling every {} s",
                    rt.config.sync_interval_seconds
                );
                Some(WATCH_UNIMPLEMENTED_RETRY)
            }
            WatchEnd::Failed(s) => {
                if started.elapsed() >= WATCH_HEALTHY_AFTER {
                    failures = 0;
                }
                failures += 1;
                // Evicted or banned: the sync finds out and stops the agent.
                if is_auth_failure(&s) {
                    sync_now.notify_one();
                }
                tracing::debug!(code = ?s.code(), error = %s.message(), "change stream ended; polling meanwhile");
                Some(servers::watch_backoff(failures))
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

fn is_auth_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// Mode of the directories the agent creates for its socket: everyone may reach the
/// socket, only the agent's user may add, remove or replace names there.
const SOCKET_DIR_MODE: u32 = 0o755;
/// Mode of the Workload API socket: any local process may connect; who it is decides
/// what it gets.
const SOCKET_MODE: u32 = 0o777;
/// Mode of the data directory (the agent's key and SVID).
const DATA_DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents, each with an explicit mode (`mode` for `dir`,
/// [`SOCKET_DIR_MODE`] for parents) whatever the umask: under `umask 000` a plain
/// `create_dir_all` makes them world-writable, under `umask 077` unreachable.
/// Directories that already exist are left as they are.
fn create_dirs(dir: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let mut missing = Vec::new();
    let mut d = dir;
    loop {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(d);
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p,
                    _ => break,
                }
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", d.display()))(e)),
        }
    }
    for d in missing.into_iter().rev() {
        let m = if d == dir { mode } else { SOCKET_DIR_MODE };
        match std::fs::DirBuilder::new().mode(m).create(d) {
            // Ours: set the mode the umask may have cut (chmod ignores the umask).
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(m))
                .map_err(Error::io(format!("setting the mode of {}", d.display())))?,
            // Created meanwhile by someone else: not ours to chmod; checked below.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", d.display()))(e)),
        }
    }
    Ok(())
}

/// Refuses a socket directory where another user could replace the socket: it and every
/// directory above it must belong to root or to the agent's user and, unless sticky
/// (as /tmp), not be writable by group or others.
fn check_socket_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let real = dir
        .canonicalize()
        .map_err(Error::io(format!("resolving {}", dir.display())))?;
    for d in real.ancestors() {
        let m = std::fs::metadata(d).map_err(Error::io(format!("inspecting {}", d.display())))?;
        let mode = m.mode();
        let sticky = mode & 0o1000 != 0;
        if m.uid() != 0 && m.uid() != me {
            return Err(Error::Config(format!(
                "socket directory {} belongs to uid {}: that user could replace the Workload API socket",
                d.display(),
                m.uid()
            )));
        }
        if mode & 0o022 != 0 && !sticky {
            return Err(Error::Config(format!(
                "socket directory {} is writable by group or others (mode {:o}) without the sticky bit: \
                 another user could replace the Workload API socket; make it 0755",
                d.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Binds a Unix socket at `path`: its directory created (mode `dir_mode`) if missing and
/// checked, a stale socket replaced. The caller sets the socket's own mode.
pub(crate) fn bind_socket(path: &Path, dir_mode: u32) -> Result<tokio::net::UnixListener, Error> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dirs(dir, dir_mode)?;
    check_socket_dir(dir)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing stale {}", path.display()))(e)),
    }
    tokio::net::UnixListener::bind(path).map_err(Error::io(format!("binding {}", path.display())))
}

/// Creates the data directory if missing and makes it owner-only. It must belong to the
/// agent's user, and every directory on its path (as given and as resolved) to root or
/// to that user, not writable by group or others unless sticky (as /tmp): the bundle
/// there pins the server, so whoever could swap it could become the agent's server.
fn prepare_data_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    create_dirs(dir, DATA_DIR_MODE)?;
    let me = nix::unistd::geteuid().as_raw();
    let given =
        std::path::absolute(dir).map_err(Error::io(format!("resolving {}", dir.display())))?;
    let real = dir
        .canonicalize()
        .map_err(Error::io(format!("resolving {}", dir.display())))?;
    // The directory itself is checked for its owner below and then restricted.
    for d in given.ancestors().skip(1).chain(real.ancestors().skip(1)) {
        let m = std::fs::metadata(d).map_err(Error::io(format!("inspecting {}", d.display())))?;
        let mode = m.mode();
        if m.uid() != 0 && m.uid() != me {
            return Err(Error::Config(format!(
                "data directory {}: {} belongs to uid {}, who could replace the agent's key, SVID and trust bundle",
                dir.display(),
                d.display(),
                m.uid()
            )));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(Error::Config(format!(
                "data directory {}: {} is writable by group or others (mode {:o}) without the sticky bit, \
                 so another user could replace the agent's key, SVID and trust bundle",
                dir.display(),
                d.display(),
                mode & 0o7777
            )));
        }
    }
    let owner = std::fs::metadata(&real)
        .map_err(Error::io(format!("inspecting {}", real.display())))?
        .uid();
    if owner != me {
        return Err(Error::Config(format!(
            "data directory {} belongs to uid {owner}, not to the agent's uid {me}",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))
        .map_err(Error::io(format!("restricting {}", dir.display())))
}

fn bind_workload_socket(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let l = bind_socket(path, SOCKET_DIR_MODE)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(Error::io(format!("opening {}", path.display())))?;
    Ok(l)
}

/// Keeps the agent's memory to itself: it holds its own key and every workload's keys,
/// SVIDs and JWT-SVIDs. No core dump is written (not dumpable, `RLIMIT_CORE` 0), and no
/// process of the agent's uid without `CAP_SYS_PTRACE` may read it through ptrace or
/// `/proc/PID/mem`. The agent still reads its own `/proc/self`: the kernel lets a
/// process's own threads past that check.
pub fn keep_memory_private() -> Result<(), Error> {
    use nix::sys::resource::{setrlimit, Resource};
    nix::sys::prctl::set_dumpable(false).map_err(|e| {
        Error::Config(format!(
            "making the process non-dumpable (PR_SET_DUMPABLE): {e}"
        ))
    })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| Error::Config(format!("setting RLIMIT_CORE to 0: {e}")))
}

/// Runs the agent until SIGINT/SIGTERM, or until the server no longer recognises it.
pub async fn run(config: AgentConfig) -> Result<(), Error> {
    config.validate()?;
    metrics::listen_if(config.metrics).await?;
    // Container and systemd workload attestation, when configured (off by default).
    container::install(config.container_attestor()?);
    let servers = Servers::new(config.servers()?).await;
    prepare_data_dir(&config.data_dir)?;

    let configured_roots = match &config.trust_bundle {
        Some(p) => Some(crate::svid::certs_from_pem(
            &std::fs::read_to_string(p)
                .map_err(Error::io(format!("reading trust bundle {}", p.display())))?,
        )?),
        None => None,
    };

    let (svid, bundle) = match load_persisted(&config.data_dir, &config.tpm_tcti) {
        Some(x) => {
            tracing::info!(agent = %x.0.spiffe_id, "resuming with the persisted agent SVID");
            x
        }
        None => {
            let mut attestor = attestors::build(&config)?;
            let (verifier, expected_td) = bootstrap_verifier(&config, configured_roots.as_deref())?;
            let conns = NodeConnections::new(servers.clone(), verifier, None);
            let (svid, bundle) = attest(&conns, attestor.as_mut()).await?;
            if let Some(td) = &expected_td {
                if &bundle.trust_domain != td {
                    return Err(Error::Config(format!(
                        "server is for trust domain {}, expected {td}",
                        bundle.trust_domain
                    )));
                }
            }
            persist(&config.data_dir, &svid, &bundle)?;
            tracing::info!(agent = %svid.spiffe_id, "node attested");
            (svid, bundle)
        }
    };

    let server_id = crate::spiffe_id::server_id_of(&bundle.trust_domain)?;
    let roots = shared_roots(bundle.x509_authorities.clone());
    let verifier = Arc::new(ServerSvidVerifier::new(roots.clone(), server_id.clone()));
    let node = Arc::new(ArcSwap::from_pointee(NodeConnections::new(
        servers.clone(),
        verifier,
        Some(svid.certified_key()?),
    )));
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
    let workloads = Arc::new(
        Workloads::new(node.clone(), bundle_rx.clone())
            .with_pool(config.svid_pool())
            .with_max_instances(config.workload_max_instances),
    );
    let rt = Arc::new(Runtime {
        config: config.clone(),
        servers: servers.clone(),
        server_id,
        roots,
        node,
        svid: ArcSwap::from_pointee(svid),
        bundle: bundle_tx,
        workloads: workloads.clone(),
    });

    if let Err(s) = rt.sync().await {
        if is_auth_failure(&s) {
            forget_persisted(&config.data_dir);
        }
        return Err(Error::Server(format!(
            "initial sync failed: {}",
            s.message()
        )));
    }

    let listener = bind_workload_socket(&config.socket)?;
    // The generated server, but for `FetchX509SVID`, whose answers' key copies are
    // zeroized once encoded.
    let api = tonic::service::interceptor::InterceptedService::new(
        zeroizing_x509_answers::WorkloadApiService::serving(
            workload_api::WorkloadApi::new(workloads.clone(), bundle_rx),
            workload_listener::MAX_REQUEST_MESSAGE_BYTES,
        ),
        workload_api::require_security_header,
    );
    let (stop_tx, mut stop_rx) = watch::channel(false);

    // Change notices (issue 17): the server pokes, the sync loop syncs at once.
    let sync_now = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(watch_changes(rt.clone(), sync_now.clone(), stop_rx.clone()));
    // SVIDs minted ahead for new processes (issue 16).
    tokio::spawn(workloads.clone().run_pool());

    // Sync loop: entries and bundle, at every poll tick and at once on a notice; an
    // agent the server no longer knows stops. One sync at a time: notices during a sync
    // leave one permit, so exactly one more sync follows it.
    let sync_rt = rt.clone();
    let sync_stop = stop_tx.clone();
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_secs(sync_rt.config.sync_interval_seconds));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sync_now.notified() => {}
            }
            match metrics::observe_sync(sync_rt.sync()).await {
                Ok(true) => {
                    sync_rt.workloads.prune_pool();
                    sync_rt.workloads.forget_tainted_jwts();
                    sync_rt.reconcile_all().await
                }
                Ok(false) => {}
                Err(s) if is_auth_failure(&s) => {
                    tracing::error!(reason = %s.message(), "the server no longer recognises this agent (evicted or banned); stopping");
                    forget_persisted(&sync_rt.config.data_dir);
                    let _ = sync_stop.send(true);
                    return;
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "sync with the server failed; will retry")
                }
            }
        }
    });

    // Rotation loop: workload SVIDs at half-life, exited instances forgotten, own SVID renewed.
    let rot_rt = rt.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut retry_at = 0;
        let mut renewal = RenewalClock::default();
        loop {
            tick.tick().await;
            let svid = rot_rt.svid.load();
            let tainted = {
                let b = rot_rt.bundle.borrow();
                crate::svid::issuing_authority_of_chain(&svid.chain, &b.x509_authorities)
                    .is_some_and(|a| b.tainted.contains(&a))
            };
            let due = renewal.due_at(&svid, now());
            if (tainted || now() >= due) && now() >= retry_at {
                if let Err(e) = rot_rt.renew_agent_svid().await {
                    tracing::warn!(event = "agent_renewal_failed", error = %e, "agent SVID renewal failed; will retry");
                    retry_at = now() + 5;
                }
            }
            rot_rt.rotate_workloads().await;
        }
    });

    // SPIRE's Delegated Identity API on its own admin socket, when configured.
    if let Some(delegated) = delegated_identity::start(
        &config.delegated_identity,
        config.workload_max_connections,
        workloads.clone(),
        rt.bundle.subscribe(),
        {
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        },
    )? {
        tokio::spawn(delegated);
    }
    tracing::info!(socket = %config.socket.display(), servers = %servers.describe(), "ztid-agent ready");
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SpiffeWorkloadApiServer<workload_api::WorkloadApi>>()
        .await;
    metrics::attach(rt.clone());
    // Envoy's SDS on the same socket, attested alike (no security header: Envoy sends none).
    let sds = sds::SecretDiscovery::new(workloads.clone(), rt.bundle.subscribe()).into_server();
    let routes = tonic::service::Routes::new(health_service)
        .add_service(api)
        .add_service(sds);
    workload_listener::serve_on_own_thread(
        listener,
        tower::Layer::layer(
            &metrics::sds_layer(),
            tower::Layer::layer(&metrics::workload_api_layer(), routes),
        ),
        config.workload_limits(),
        async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = stop_rx.wait_for(|s| *s) => {}
            }
        },
    )
    .await
    .map_err(Error::io("serving the Workload API"))?;
    let _ = std::fs::remove_file(&config.socket);
    if *stop_tx.borrow() {
        return Err(Error::Server("agent is no longer attested".into()));
    }
    tracing::info!("ztid-agent stopped");
    Ok(())
}

/// When the agent's own SVID is due for renewal: half-way through the life it had
/// left when this agent first saw it.
///
/// Measured from when the SVID arrived, not from its `notBefore`: the server backdates
/// `notBefore` (clock skew), so half of the certificate's validity would be due at once
/// for an SVID shorter than twice the backdating, and the agent would renew every tick.
#[derive(Default)]
struct RenewalClock {
    /// The leaf certificate this clock was set for, and its renewal time.
    current: Option<(Vec<u8>, i64)>,
}

impl RenewalClock {
    fn due_at(&mut self, svid: &AgentSvid, now: i64) -> i64 {
        let leaf = svid.chain.first().map(Vec::as_slice).unwrap_or_default();
        match &self.current {
            Some((seen, due)) if seen.as_slice() == leaf => *due,
            _ => {
                let due = now + (svid.not_after - now).max(0) / 2;
                self.current = Some((leaf.to_vec(), due));
                due
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's memory is its own: not dumpable, no core file.
    #[test]
    fn the_agents_memory_is_kept_private() {
        super::keep_memory_private().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
        assert_eq!(
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap(),
            (0, 0)
        );
        // Its own /proc entries stay readable to it (the descriptor count in metrics).
        assert!(std::fs::read_dir("/proc/self/fd").unwrap().count() > 0);
    }

    fn svid(leaf: &[u8], not_after: i64) -> AgentSvid {
        AgentSvid {
            chain: vec![leaf.to_vec()],
            key: agent_key::AgentKey::from_pkcs8(Vec::new()),
            spiffe_id: "spiffe://example.org/agent".into(),
            not_after,
        }
    }

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::client::danger::ServerCertVerifier;

    /// A self-signed CA for `td` (URI SAN `spiffe://TD`).
    fn test_ca(td: &str) -> (Vec<u8>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{td}").as_str().try_into().unwrap(),
        )];
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let der = p.self_signed(&key).unwrap().der().to_vec();
        (der, Issuer::new(p, key))
    }

    /// A leaf with URI SAN `id` for `key`, signed by `issuer`.
    fn test_leaf(id: &str, key: &KeyPair, issuer: &Issuer<'_, KeyPair>) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.signed_by(key, issuer).unwrap().der().to_vec()
    }

    fn server_cert_accepted(
        verifier: &ServerSvidVerifier,
        leaf: &[u8],
    ) -> Result<(), rustls::Error> {
        verifier
            .verify_server_cert(
                &rustls_pki_types::CertificateDer::from(leaf.to_vec()),
                &[],
                &rustls_pki_types::ServerName::try_from("ztid-server").unwrap(),
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    fn write_bundle(dir: &Path, td: &str, roots: Vec<Vec<u8>>) {
        let b = TrustBundle {
            trust_domain: td.into(),
            x509_authorities: roots,
            jwt_authorities: Vec::new(),
            sequence: 3,
            refresh_hint_seconds: 0,
            tainted: Vec::new(),
        };
        write_private(
            &dir.join(BUNDLE_FILE),
            &pb::Bundle::from(&b).encode_to_vec(),
        )
        .unwrap();
    }

    /// An agent that attested before and restarts once its SVID has expired (the node was
    /// down longer than the SVID's life; or the SVID file is gone) attests again: it must
    /// verify the server with the bundle it kept, not fall back to `--insecure-bootstrap`
    /// (a man in the middle would then become its CA) nor to a `--trust-bundle` file
    /// the trust domain has rotated away from.
    #[test]
    fn attesting_again_verifies_the_server_with_the_persisted_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let (root, issuer) = test_ca("example.org");
        let (mitm_root, mitm) = test_ca("example.org");
        write_bundle(dir.path(), "example.org", vec![root.clone()]);
        let server_key = KeyPair::generate().unwrap();
        let real = test_leaf("spiffe://example.org/ztid/server", &server_key, &issuer);
        let forged = test_leaf("spiffe://example.org/ztid/server", &server_key, &mitm);

        let insecure = AgentConfig {
            insecure_bootstrap: true,
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (v, _) = bootstrap_verifier(&insecure, None).unwrap();
        server_cert_accepted(&v, &real).unwrap();
        // rustls carries a verifier's refusal as `General`: the kind, then its reason.
        match server_cert_accepted(&v, &forged) {
            Err(rustls::Error::General(why)) => assert!(
                why.contains("not signed by any authority in this agent's trust bundle"),
                "{why}"
            ),
            other => panic!("the forged server certificate: {other:?}"),
        }

        // A stale --trust-bundle (the old root) does not override the kept bundle.
        let pinned = AgentConfig {
            trust_bundle: Some(dir.path().join("old.pem")),
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (v, _) = bootstrap_verifier(&pinned, Some(&[mitm_root])).unwrap();
        server_cert_accepted(&v, &real).unwrap();
        assert!(server_cert_accepted(&v, &forged).is_err());

        // Without a kept bundle: the configured roots, as before.
        let fresh = tempfile::tempdir().unwrap();
        let first = AgentConfig {
            data_dir: fresh.path().to_path_buf(),
            ..pinned
        };
        let (v, _) = bootstrap_verifier(&first, Some(&[root])).unwrap();
        server_cert_accepted(&v, &real).unwrap();
    }

    /// A kept bundle of another trust domain than `--trust-domain`, or one that does not
    /// decode, stops the agent instead of being skipped for a weaker bootstrap.
    #[test]
    fn a_persisted_bundle_that_is_corrupt_or_of_another_trust_domain_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = test_ca("other.org");
        write_bundle(dir.path(), "other.org", vec![root]);
        let c = AgentConfig {
            insecure_bootstrap: true,
            trust_domain: Some("example.org".into()),
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        match bootstrap_verifier(&c, None) {
            Err(Error::Config(why)) => assert!(
                why.contains("is for trust domain other.org, expected example.org"),
                "{why}"
            ),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a bundle of another trust domain was used"),
        }
        std::fs::write(dir.path().join(BUNDLE_FILE), b"\xff\xff\xff").unwrap();
        match bootstrap_verifier(&c, None) {
            Err(Error::Config(why)) => assert!(why.contains("does not decode"), "{why}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a corrupt bundle was skipped"),
        }
    }

    /// Renewal writes the new key before the new SVID: a crash between the two leaves a
    /// key that the persisted SVID does not certify. Resuming with that pair would fail
    /// every handshake with the server, at every restart, forever; it is not resumed.
    #[test]
    fn a_persisted_svid_for_another_key_is_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (root, issuer) = test_ca("example.org");
        write_bundle(dir.path(), "example.org", vec![root]);
        let old = KeyPair::generate().unwrap();
        let leaf = test_leaf(
            "spiffe://example.org/ztid/agent/join-token/x",
            &old,
            &issuer,
        );
        write_private(
            &dir.path().join(SVID_FILE),
            crate::svid::certs_to_pem([leaf.as_slice()]).as_bytes(),
        )
        .unwrap();
        write_private(&dir.path().join(SOFTWARE_KEY_FILE), &old.serialize_der()).unwrap();
        assert!(
            load_persisted(dir.path(), "").is_some(),
            "the matching pair resumes"
        );
        let new = AgentKey::generate_software().unwrap();
        let (_, der) = new.persisted().unwrap();
        write_private(&dir.path().join(SOFTWARE_KEY_FILE), &der).unwrap();
        assert!(load_persisted(dir.path(), "").is_none());
    }

    /// The data directory holds the key, the SVID and the bundle that pins the server:
    /// another user who owns it, or a directory above it, could swap `bundle.pb` for
    /// their own CA's (the agent would then take them for its server) or remove the
    /// agent's files. Such a directory is refused, whatever its mode.
    #[test]
    fn a_data_dir_another_user_owns_or_could_replace_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a directory to another uid");
            return;
        }
        let stranger = 65534;
        let tmp = tempfile::tempdir().unwrap();
        // The data directory itself belongs to another user.
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(stranger), None).unwrap();
        match prepare_data_dir(&theirs) {
            Err(Error::Config(why)) => {
                assert!(why.contains("belongs to uid 65534"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // A directory above it belongs to another user (/tmp/ztid made by someone else).
        let parent = tmp.path().join("ztid");
        std::fs::create_dir(&parent).unwrap();
        std::os::unix::fs::chown(&parent, Some(stranger), None).unwrap();
        match prepare_data_dir(&parent.join("agent")) {
            Err(Error::Config(why)) => {
                assert!(why.contains("belongs to uid 65534"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // A group-writable directory above it, not sticky.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        match prepare_data_dir(&open.join("agent")) {
            Err(Error::Config(why)) => {
                assert!(why.contains("writable by group or others"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // A symlink to a stranger's directory.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&theirs, &link).unwrap();
        assert!(matches!(prepare_data_dir(&link), Err(Error::Config(_))));
        // Ours, under directories only root and we may change: made and restricted,
        // also when it was left open.
        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_data_dir(&loose).unwrap();
        let mode = std::fs::metadata(&loose).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, DATA_DIR_MODE);
        let ours = tmp.path().join("ours").join("agent");
        prepare_data_dir(&ours).unwrap();
        let mode = std::fs::metadata(&ours).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, DATA_DIR_MODE);
    }

    #[test]
    fn a_short_agent_svid_is_renewed_half_way_through_its_remaining_life_not_at_once() {
        let mut clock = RenewalClock::default();
        // A 30 s SVID whose notBefore the server backdated by 60 s: due at +15 s.
        let s = svid(b"leaf-1", 1_030);
        assert_eq!(clock.due_at(&s, 1_000), 1_015);
        // Later ticks keep the time set when this SVID arrived.
        assert_eq!(clock.due_at(&s, 1_010), 1_015);
        // A new SVID resets it.
        assert_eq!(clock.due_at(&svid(b"leaf-2", 1_046), 1_016), 1_031);
        // An already expired SVID is due now.
        assert_eq!(clock.due_at(&svid(b"leaf-3", 900), 1_020), 1_020);
    }

    #[test]
    fn a_bundle_update_of_another_trust_domain_or_without_roots_is_not_taken() {
        let bundle = |td: &str, sequence: u64, roots: usize| TrustBundle {
            trust_domain: td.into(),
            sequence,
            x509_authorities: vec![vec![1, 2, 3]; roots],
            ..Default::default()
        };
        assert_eq!(
            replaces_held("example.org", 3, &bundle("example.org", 4, 1)),
            Ok(true)
        );
        assert_eq!(
            replaces_held("example.org", 3, &bundle("example.org", 3, 1)),
            Ok(false)
        );
        assert_eq!(
            replaces_held("example.org", 3, &bundle("evil.test", 2, 1)),
            Ok(false)
        );
        let other = replaces_held("example.org", 3, &bundle("evil.test", 9, 1)).unwrap_err();
        assert!(other.contains("\"evil.test\", not this agent's"), "{other}");
        let empty = replaces_held("example.org", 3, &bundle("example.org", 9, 0)).unwrap_err();
        assert!(empty.contains("without X.509 authorities"), "{empty}");
    }

    #[test]
    fn a_full_sync_stops_at_its_bounds() {
        sync_may_go_on(1, 1000).unwrap();
        sync_may_go_on(MAX_SYNC_PAGES - 1, MAX_SYNC_ENTRIES - 1).unwrap();
        for (pages, entries) in [(MAX_SYNC_PAGES, 0), (2, MAX_SYNC_ENTRIES)] {
            let e = sync_may_go_on(pages, entries).unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted);
            assert!(
                e.message().contains("the agent takes at most"),
                "{}",
                e.message()
            );
        }
    }

    /// A renewal answer is kept only if it chains to the agent's roots, names the agent
    /// and certifies the renewal's key.
    #[test]
    fn a_renewed_svid_is_checked_before_it_is_kept() {
        let (root, issuer) = test_ca("example.org");
        let (_, other_issuer) = test_ca("example.org");
        let roots = vec![rustls_pki_types::CertificateDer::from(root)];
        let id = "spiffe://example.org/ztid/agent/join-token/x";
        let key = AgentKey::generate_software().unwrap();
        let (_, der) = key.persisted().unwrap();
        let pair = KeyPair::try_from(der.as_slice()).unwrap();
        let good = test_leaf(id, &pair, &issuer);
        check_renewed(&[good], &roots, id, &key).unwrap();
        // Another key, another ID, another CA: each refused, with why.
        let stranger = KeyPair::generate().unwrap();
        let cases = [
            (test_leaf(id, &stranger, &issuer), "certifies another key"),
            (
                test_leaf(
                    "spiffe://example.org/ztid/agent/join-token/y",
                    &pair,
                    &issuer,
                ),
                "not this agent's",
            ),
            (test_leaf(id, &pair, &other_issuer), "does not validate"),
        ];
        for (leaf, why) in cases {
            let e = check_renewed(&[leaf], &roots, id, &key)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }
}
