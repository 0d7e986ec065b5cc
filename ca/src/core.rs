//! The server's state and every operation the node and admin APIs expose, free of
//! gRPC types where it can be, so each rule lives in one place.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rcgen::{KeyPair, PublicKeyData};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value};
use spiffe::TrustDomain;
use ztid_spiffe::bundle::TrustBundle;
use ztid_verifier::join_token::{
    self, JoinTokenGrant, JoinTokenStore, JoinTokenVerifier,
};
use ztid_verifier::multi::MultiVerifier;
use ztid_verifier::{AttestationContext, AttestedNode, NodeVerifier};
use ztid_spiffe::selector::satisfies;
use ztid_spiffe::tls::SharedRoots;
use ztid_spiffe::unix_seconds;
use ztid_hsm::KeyManager;

use crate::audit::AuditLog;
use crate::authorities::{AuthoritySet, Kind, Lifetimes};
use crate::authority::{random_hex, LeafTemplate, SignedLeaf, X509Authority};
use crate::config::ServerConfig;
use crate::csr_policy::{check_csr, check_identity, IdentityRule};
use crate::datastore::{
    AgentRecord, AuthorityRecord, DataStore, EntryRecord, JoinTokenRecord, SledStore,
};
use crate::entries::{server_id, validate_new_entry};
use crate::{Error, Result};

/// Now, in Unix seconds.
pub fn now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// Join-token redemption backed by the datastore.
struct StoreTokens(Arc<dyn DataStore>);

impl JoinTokenStore for StoreTokens {
    fn take_join_token(
        &self,
        hash: &[u8; 32],
    ) -> std::result::Result<Option<JoinTokenGrant>, ztid_attestation::Error> {
        let rec = self
            .0
            .take_join_token(hash)
            .map_err(|e| ztid_attestation::Error::Store(e.to_string()))?;
        // Redeeming must survive a crash: a token that was used must stay used. An
        // unknown token changed nothing, so a flood of them costs no sync.
        if rec.is_some() {
            self.0
                .flush()
                .map_err(|e| ztid_attestation::Error::Store(e.to_string()))?;
        }
        Ok(rec.map(|r| JoinTokenGrant {
            hash: *hash,
            id: r.id,
            expires_at: r.expires_at,
            alias: r.alias,
        }))
    }
}

/// An agent that presented a current SVID.
#[derive(Debug, Clone)]
pub struct AuthenticatedAgent {
    /// Its record.
    pub record: AgentRecord,
}

impl AuthenticatedAgent {
    /// The parents whose entries this agent may mint: itself and its aliases.
    pub fn parents(&self) -> BTreeSet<&str> {
        let mut p: BTreeSet<&str> = self.record.aliases.iter().map(String::as_str).collect();
        p.insert(&self.record.spiffe_id);
        p
    }
}

/// What a workload CSR or JWT request under `entry` may name: the entry's ID
/// (shared) or the entry's ID plus one per-instance segment; never a reserved ID.
fn workload_rule(entry: &EntryRecord) -> IdentityRule<'_> {
    if entry.shared {
        IdentityRule::Shared(&entry.spiffe_id)
    } else {
        IdentityRule::Instance(&entry.spiffe_id)
    }
}

/// The server core.
pub struct CaCore {
    /// The configuration in effect.
    pub config: ServerConfig,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Persistent state.
    pub store: Arc<dyn DataStore>,
    /// Where the authorities' keys live.
    pub key_manager: Arc<dyn KeyManager>,
    /// The X.509 and JWT authorities and the bundle.
    pub authorities: AuthoritySet,
    /// The issuance policy, if configured.
    pub policy: Option<crate::policy::IssuancePolicy>,
    /// The tamper-evident audit log (absent only when disabled in config).
    pub audit: Option<Arc<AuditLog>>,
    verifiers: Vec<Arc<dyn NodeVerifier>>,
    multi: Option<Arc<MultiVerifier>>,
    server_svid: ArcSwap<CertifiedKey>,
    server_svid_expiry: std::sync::atomic::AtomicI64,
    /// Agent certificates already found signed by one of our authorities.
    own_issued: OwnIssuedCache,
}

/// SHA-256s of agent certificates one of this server's X.509 authorities signed, valid
/// for one bundle: a chain check per node API call would cost a signature verification
/// on the mint path, and an agent presents the same certificate on every call. Any
/// authority change (prepare, activate, taint, revoke) publishes a new bundle, which
/// empties the cache, so a revoked authority's certificates are checked again.
#[derive(Default)]
struct OwnIssuedCache(
    std::sync::Mutex<Option<(Arc<TrustBundle>, std::collections::HashSet<[u8; 32]>)>>,
);

/// Most certificates remembered before the cache starts over (a few per live agent).
const OWN_ISSUED_CACHE_MAX: usize = 16_384;

impl OwnIssuedCache {
    fn contains(&self, bundle: &Arc<TrustBundle>, digest: &[u8; 32]) -> bool {
        self.0.lock().is_ok_and(|g| {
            g.as_ref()
                .is_some_and(|(b, set)| Arc::ptr_eq(b, bundle) && set.contains(digest))
        })
    }

    fn insert(&self, bundle: Arc<TrustBundle>, digest: [u8; 32]) {
        if let Ok(mut g) = self.0.lock() {
            match g.as_mut() {
                Some((b, set)) if Arc::ptr_eq(b, &bundle) && set.len() < OWN_ISSUED_CACHE_MAX => {
                    set.insert(digest);
                }
                _ => *g = Some((bundle, std::iter::once(digest).collect())),
            }
        }
    }
}

impl CaCore {
    /// Opens the data directory, creating the CA on first start.
    pub fn open(config: ServerConfig) -> Result<Arc<Self>> {
        let trust_domain = config.validate()?;
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(Error::io(format!("restricting {}", dir.display())))?;
        }
        // The key manager first: a wrong PIN or a missing token must leave nothing behind.
        let key_manager = crate::keys::key_manager(&config)?;
        let store: Arc<dyn DataStore> = Arc::new(SledStore::open(&dir.join("datastore"))?);
        let t = now();
        let upstream = match &config.upstream {
            Some(u) => Some(Arc::new(crate::upstream::Upstream::load(u, &key_manager)?)),
            None => None,
        };
        let authorities = AuthoritySet::open(
            trust_domain.clone(),
            key_manager.clone(),
            store.clone(),
            Lifetimes {
                x509: config.ca_ttl_seconds,
                jwt: config.jwt_key_ttl_seconds,
                refresh_hint: config.bundle_refresh_hint_seconds,
            },
            upstream,
            t,
        )?;
        let audit = if config.audit_enabled {
            // The datastore anchors the log outside its directory (rollback detection).
            Some(AuditLog::open_with(
                &dir.join("audit"),
                key_manager.clone(),
                crate::audit::AuditOptions {
                    store: Some(store.clone()),
                    accept_rollback: None,
                },
            )?)
        } else {
            tracing::warn!("the audit log is disabled by configuration");
            None
        };
        let policy = match &config.issuance_policy {
            Some(p) => Some(crate::policy::IssuancePolicy::load(p)?),
            None => None,
        };
        let mut verifiers: Vec<Arc<dyn NodeVerifier>> =
            vec![Arc::new(JoinTokenVerifier::new(StoreTokens(store.clone())))];
        let crate::attestors::Verifiers {
            single: hardware,
            multi,
        } = crate::attestors::configured_verifiers(&config)?;
        verifiers.extend(hardware);
        if let Some(m) = &multi {
            verifiers.push(m.clone());
        }
        // Entries stored before IDs had one spelling and the reserved names were closed
        // can mint nothing now: name them once, at start.
        for e in store.list_entries(&crate::datastore::EntryFilter::default())? {
            if let Some(why) = crate::entries::unusable_reason(&trust_domain, &e) {
                tracing::warn!(event = "entry_unusable", entry = %e.id, spiffe_id = %e.spiffe_id, reason = %why,
                    "stored entry is refused at every mint; delete it and create it again in canonical form");
            }
        }
        let (svid, expiry) =
            Self::issue_server_svid(&authorities.x509(), &trust_domain, &config, t)?;
        Ok(Arc::new(Self {
            config,
            trust_domain,
            store,
            key_manager,
            authorities,
            policy,
            audit,
            verifiers,
            multi,
            server_svid: ArcSwap::from_pointee(svid),
            server_svid_expiry: expiry.into(),
            own_issued: OwnIssuedCache::default(),
        }))
    }

    fn issue_server_svid(
        x509: &X509Authority,
        td: &TrustDomain,
        config: &ServerConfig,
        now: i64,
    ) -> Result<(CertifiedKey, i64)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = x509.sign_leaf(
            &key,
            &LeafTemplate {
                spiffe_id: server_id(td),
                dns_names: vec![],
                ttl_seconds: config.agent_svid_ttl_seconds,
            },
            now,
        )?;
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|e| Error::Certificate(format!("server key: {e}")))?;
        let chain = leaf
            .chain
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        Ok((CertifiedKey::new(chain, signer), leaf.not_after))
    }

    /// The current bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.authorities.bundle()
    }

    /// The X.509 authorities as shared roots for TLS verification.
    pub fn roots(&self) -> SharedRoots {
        self.authorities.roots()
    }

    /// The server's current TLS identity.
    pub fn server_svid(&self) -> Arc<CertifiedKey> {
        self.server_svid.load_full()
    }

    /// Renews the server's own SVID when half its lifetime has passed.
    pub fn maybe_renew_server_svid(&self) -> Result<()> {
        let t = now();
        let expiry = self
            .server_svid_expiry
            .load(std::sync::atomic::Ordering::Relaxed);
        if t < expiry - self.config.agent_svid_ttl_seconds / 2 {
            return Ok(());
        }
        let (svid, expiry) = Self::issue_server_svid(
            &self.authorities.x509(),
            &self.trust_domain,
            &self.config,
            t,
        )?;
        self.server_svid.store(Arc::new(svid));
        self.server_svid_expiry
            .store(expiry, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("renewed the server's own SVID");
        Ok(())
    }

    /// True if one of this server's X.509 authorities (prepared, active or old) signed
    /// `leaf`; a revoked authority is no longer listed.
    fn issued_by_own_authority(&self, leaf: &[u8]) -> bool {
        // The bundle is read before the authorities: if they change in between, the
        // result is filed under the older bundle, which is no longer current.
        let bundle = self.authorities.bundle();
        let digest: [u8; 32] = match ring::digest::digest(&ring::digest::SHA256, leaf)
            .as_ref()
            .try_into()
        {
            Ok(d) => d,
            Err(_) => return false,
        };
        if self.own_issued.contains(&bundle, &digest) {
            return true;
        }
        let signed = self.chain_to_own_authority(leaf);
        if signed {
            self.own_issued.insert(bundle, digest);
        }
        signed
    }

    fn chain_to_own_authority(&self, leaf: &[u8]) -> bool {
        let Ok(own) = self.authorities.list(Kind::X509) else {
            return false;
        };
        let own: Vec<rustls_pki_types::CertificateDer<'static>> =
            own.into_iter().map(|a| a.cert_der.into()).collect();
        ztid_spiffe::svid::verify_chain(
            &[rustls_pki_types::CertificateDer::from(leaf)],
            &own,
            rustls_pki_types::UnixTime::now(),
            ztid_spiffe::svid::Usage::Client,
        )
        .is_ok()
    }

    /// Checks the peer certificate of a node API call and returns the agent.
    /// The TLS layer has already validated the chain against the bundle.
    pub fn authenticate_agent(&self, leaf_der: Option<&[u8]>) -> Result<AuthenticatedAgent> {
        let leaf = leaf_der
            .ok_or_else(|| Error::Unauthenticated("node API call without an agent SVID".into()))?;
        let id = ztid_spiffe::svid::spiffe_id_of_leaf(leaf)
            .map_err(|e| Error::Unauthenticated(format!("peer certificate: {e}")))?
            .to_string();
        let serial = ztid_spiffe::svid::serial_hex(leaf)
            .map_err(|e| Error::Unauthenticated(e.to_string()))?;
        // TLS accepted any chain to the bundle: under an upstream root, any CA under the
        // organisation's root. An agent's ID and serial are no secret, so only a
        // certificate this server's own X.509 authorities signed can be the agent's.
        if !self.issued_by_own_authority(leaf) {
            return Err(Error::Unauthenticated(format!(
                "{id} is not in a certificate this server's X.509 authorities signed"
            )));
        }
        let record = self.store.get_agent(&id)?.ok_or_else(|| {
            Error::Unauthenticated(format!("agent {id} is not attested (evicted or unknown)"))
        })?;
        if record.banned {
            return Err(Error::PermissionDenied(format!("agent {id} is banned")));
        }
        let t = now();
        // TLS checked validity at the handshake only; a connection can outlive the
        // certificate, so check it on every call.
        let not_after = ztid_spiffe::svid::not_after(leaf)
            .map_err(|e| Error::Unauthenticated(e.to_string()))?;
        if t >= not_after {
            return Err(Error::Unauthenticated(format!(
                "agent {id} presented an expired SVID"
            )));
        }
        let current = serial == record.serial;
        let previous = record.previous_serial.as_deref() == Some(serial.as_str())
            && t < record.previous_expires_at;
        if !current && !previous {
            return Err(Error::Unauthenticated(format!(
                "agent {id} presented an SVID that is no longer current"
            )));
        }
        Ok(AuthenticatedAgent { record })
    }

    /// The verifier for a method; refuses a single method the server requires to be
    /// combined with others (`[attestors.multi] required`).
    pub fn verifier(&self, method: &str) -> Result<&dyn NodeVerifier> {
        if let Some(m) = &self.multi {
            m.check_single(method).map_err(Error::from)?;
        }
        self.verifiers
            .iter()
            .find(|v| v.method() == method)
            .map(|v| v.as_ref())
            .ok_or_else(|| Error::InvalidArgument(format!("unknown attestation method {method:?}")))
    }

    /// Context for a verifier, binding the attempt to the agent's CSR key.
    pub fn attestation_context<'a>(&self, agent_public_key: &'a [u8]) -> AttestationContext<'a> {
        AttestationContext {
            agent_public_key,
            now: SystemTime::now(),
        }
    }

    /// The public key (DER SubjectPublicKeyInfo) of a CSR whose signature verifies, so
    /// attestation methods can bind evidence to it; the identity it asks for is
    /// checked once attestation has decided what the agent is.
    pub fn csr_public_key(csr: &[u8]) -> Result<Vec<u8>> {
        let parsed = rcgen::CertificateSigningRequestParams::from_der(
            &rustls_pki_types::CertificateSigningRequestDer::from(csr),
        )
        .map_err(|e| Error::InvalidArgument(format!("malformed agent CSR: {e}")))?;
        Ok(parsed.public_key.subject_public_key_info())
    }

    /// Completes an attestation: checks bans, computes aliases, signs the agent SVID
    /// and stores the agent.
    pub fn complete_attestation(
        &self,
        node: &AttestedNode,
        csr: &[u8],
    ) -> Result<(AgentRecord, SignedLeaf)> {
        let agent_id = ztid_spiffe::spiffe_id::agent_id(
            &self.trust_domain,
            node.method,
            &node.node_id,
        )
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "attestor returned an unusable node id: {}",
                crate::csr_policy::reason(e)
            ))
        })?
        .to_string();
        let existing = self.store.get_agent(&agent_id)?;
        if existing.as_ref().is_some_and(|e| e.banned) {
            return Err(Error::PermissionDenied(format!(
                "agent {agent_id} is banned"
            )));
        }
        let checked = check_csr(csr, &IdentityRule::Assigned(&agent_id), &[])?;
        let t = now();
        if let Some(p) = &self.policy {
            p.authorize(
                crate::policy::Action::Attest,
                &crate::policy::Facts {
                    agent: &agent_id,
                    method: node.method,
                    node_selectors: node.selectors.iter().map(|s| s.to_string()).collect(),
                    spiffe_id: &agent_id,
                    ttl: self.config.agent_svid_ttl_seconds,
                    entry: None,
                    now: t,
                },
            )?;
        }
        let leaf = self.authorities.x509().sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: agent_id.clone(),
                dns_names: vec![],
                ttl_seconds: self.config.agent_svid_ttl_seconds,
            },
            t,
        )?;
        let mut record = AgentRecord {
            spiffe_id: agent_id,
            method: node.method.to_string(),
            selectors: node.selectors.clone(),
            granted_aliases: node.aliases.clone(),
            aliases: Vec::new(),
            serial: leaf.serial.clone(),
            previous_serial: None,
            previous_expires_at: 0,
            expires_at: leaf.not_after,
            banned: false,
            attested_at: t,
            evidence_digest: hex::encode(node.evidence_digest),
            authorities_in_use: Vec::new(),
            last_sync_at: t,
        };
        // A re-attestation (continuous attestation) replaces the SVID; the one it
        // replaces stays valid until it expires, so calls in flight do not fail.
        if let Some(e) = &existing {
            if e.expires_at > t {
                record.previous_serial = Some(e.serial.clone());
                record.previous_expires_at = e.expires_at;
            }
        }
        record.aliases = self.aliases_of(&record)?;
        self.store.put_agent(&record)?;
        self.store.flush()?;
        self.record(json!({"type": "node_attested", "agent": record.spiffe_id, "method": record.method,
            "node_id": node.node_id, "evidence_sha256": record.evidence_digest, "serial": leaf.serial,
            "not_after": leaf.not_after, "selectors": record.selectors, "aliases": record.aliases,
            "authority": self.authorities.x509().record().id}))?;
        crate::metrics::agent_svid_issued();
        tracing::info!(
            event = "node_attested",
            agent = %record.spiffe_id,
            method = %record.method,
            evidence_sha256 = %record.evidence_digest,
            serial = %leaf.serial,
            aliases = ?record.aliases,
            "node attestation passed; agent SVID issued"
        );
        Ok((record, leaf))
    }

    /// Node aliases an agent belongs to: those its evidence granted, plus every node
    /// entry whose selectors its attestation proved.
    pub fn aliases_of(&self, agent: &AgentRecord) -> Result<Vec<String>> {
        let mut aliases: BTreeSet<String> = agent.granted_aliases.iter().cloned().collect();
        for n in self.store.node_entries()? {
            if satisfies(&agent.selectors, &n.selectors) {
                aliases.insert(n.spiffe_id);
            }
        }
        Ok(aliases.into_iter().collect())
    }

    /// Renews an agent's SVID for a new CSR.
    pub fn renew_agent(&self, agent: &AuthenticatedAgent, csr: &[u8]) -> Result<SignedLeaf> {
        let id = &agent.record.spiffe_id;
        // Hardware-attested nodes renew only by proving their state again (a fresh quote
        // or report): a stolen SVID must not be able to extend itself.
        if agent.record.method != "join-token" {
            return Err(Error::FailedPrecondition(format!(
                "agents attested by {} renew by attesting again",
                agent.record.method
            )));
        }
        let checked = check_csr(csr, &IdentityRule::Assigned(id), &[])?;
        let leaf = self.authorities.x509().sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: id.clone(),
                dns_names: vec![],
                ttl_seconds: self.config.agent_svid_ttl_seconds,
            },
            now(),
        )?;
        let mut record = agent.record.clone();
        record.previous_serial = Some(std::mem::take(&mut record.serial));
        record.previous_expires_at = record.expires_at;
        record.serial = leaf.serial.clone();
        record.expires_at = leaf.not_after;
        self.store.put_agent(&record)?;
        self.store.flush()?;
        self.record(json!({"type": "agent_svid_issued", "agent": id, "serial": leaf.serial, "not_after": leaf.not_after,
            "authority": self.authorities.x509().record().id}))?;
        crate::metrics::agent_svid_issued();
        tracing::info!(event = "agent_renewed", agent = %id, serial = %leaf.serial, "agent SVID renewed");
        Ok(leaf)
    }

    /// Issues an admin X509-SVID, `spiffe://TD/ztid/admin/NAME`, for a CSR made by the
    /// caller. Only the admin socket serves this (see `admin_authz`): admin identities
    /// live under the reserved prefix no entry can claim, so no remote role, and no
    /// agent, can obtain one.
    pub fn issue_admin_svid(
        &self,
        name: &str,
        csr: &[u8],
        ttl_seconds: i64,
        caller: &str,
    ) -> Result<(String, SignedLeaf)> {
        let id = ztid_spiffe::spiffe_id::admin_id(&self.trust_domain, name)
            .map_err(|e| Error::InvalidArgument(crate::csr_policy::reason(e)))?
            .to_string();
        let ttl = if ttl_seconds == 0 {
            self.config.x509_svid_ttl_seconds
        } else {
            ttl_seconds
        };
        if !(1..=self.config.ca_ttl_seconds).contains(&ttl) {
            return Err(Error::InvalidArgument(format!(
                "admin SVID TTL must be between 1 and {} seconds",
                self.config.ca_ttl_seconds
            )));
        }
        let checked = check_csr(csr, &IdentityRule::Assigned(&id), &[])?;
        let authority = self.authorities.x509();
        let leaf = authority.sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: id.clone(),
                dns_names: vec![],
                ttl_seconds: ttl,
            },
            now(),
        )?;
        self.record(json!({"type": "admin_svid_issued", "spiffe_id": id, "caller": caller,
            "serial": leaf.serial, "not_after": leaf.not_after, "authority": authority.record().id}))?;
        tracing::warn!(event = "admin_svid_issued", spiffe_id = %id, caller, serial = %leaf.serial, not_after = leaf.not_after, "admin SVID issued");
        Ok((id, leaf))
    }

    /// Loads an entry the agent is entitled to mint for.
    fn entitled_entry(&self, agent: &AuthenticatedAgent, entry_id: &str) -> Result<EntryRecord> {
        let entry = self
            .store
            .get_entry(entry_id)?
            .ok_or_else(|| Error::NotFound(format!("entry {entry_id} does not exist")))?;
        if entry.node || !agent.parents().contains(entry.parent_id.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "agent {} is not entitled to entry {entry_id}",
                agent.record.spiffe_id
            )));
        }
        // A stored entry the ID rule refuses (from before it) mints nothing.
        if let Some(why) = crate::entries::unusable_reason(&self.trust_domain, &entry) {
            return Err(Error::PermissionDenied(format!(
                "entry {entry_id} was stored before the SPIFFE ID rule and mints nothing: {why}"
            )));
        }
        Ok(entry)
    }

    /// Signs one workload CSR for an entry.
    pub fn sign_workload_svid(
        &self,
        agent: &AuthenticatedAgent,
        entry_id: &str,
        csr: &[u8],
    ) -> Result<(String, SignedLeaf)> {
        let entry = self.entitled_entry(agent, entry_id)?;
        let checked = check_csr(csr, &workload_rule(&entry), &entry.dns_names)?;
        let ttl = if entry.x509_ttl > 0 {
            entry.x509_ttl
        } else {
            self.config.x509_svid_ttl_seconds
        };
        self.check_policy(
            crate::policy::Action::MintX509,
            agent,
            &entry,
            &checked.spiffe_id,
            ttl,
        )?;
        let authority = self.authorities.x509();
        let leaf = authority.sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: checked.spiffe_id.clone(),
                dns_names: entry.dns_names.clone(),
                ttl_seconds: ttl,
            },
            now(),
        )?;
        self.record(json!({"type": "x509_svid_issued", "spiffe_id": checked.spiffe_id, "entry": entry.id,
            "agent": agent.record.spiffe_id, "serial": leaf.serial, "ttl": ttl, "not_after": leaf.not_after,
            "authority": authority.record().id}))?;
        crate::metrics::svid_issued("x509", &agent.record.spiffe_id);
        tracing::info!(
            event = "x509_svid_issued",
            spiffe_id = %checked.spiffe_id,
            entry = %entry.id,
            agent = %agent.record.spiffe_id,
            serial = %leaf.serial,
            ttl,
            authority = %authority.record().id,
            "X509-SVID issued"
        );
        Ok((checked.spiffe_id, leaf))
    }

    /// Mints a JWT-SVID for an entry's identity.
    pub fn mint_jwt_svid(
        &self,
        agent: &AuthenticatedAgent,
        entry_id: &str,
        spiffe_id: &str,
        audience: &[String],
    ) -> Result<(String, i64)> {
        let entry = self.entitled_entry(agent, entry_id)?;
        if audience.is_empty() || audience.iter().any(|a| a.is_empty() || a.len() > 512) {
            return Err(Error::InvalidArgument("audience must be specified".into()));
        }
        check_identity(&workload_rule(&entry), spiffe_id)?;
        let ttl = if entry.jwt_ttl > 0 {
            entry.jwt_ttl
        } else {
            self.config.jwt_svid_ttl_seconds
        };
        self.check_policy(
            crate::policy::Action::MintJwt,
            agent,
            &entry,
            spiffe_id,
            ttl,
        )?;
        let jwt = self.authorities.jwt();
        let issuer = self.config.oidc.as_ref().map(|o| o.issuer.as_str());
        let (token, exp) = jwt.mint_with_issuer(spiffe_id, audience, ttl, now(), issuer)?;
        self.record(
            json!({"type": "jwt_svid_issued", "spiffe_id": spiffe_id, "entry": entry.id,
            "agent": agent.record.spiffe_id, "audience": audience, "ttl": ttl, "exp": exp,
            "authority": jwt.record().id}),
        )?;
        crate::metrics::svid_issued("jwt", &agent.record.spiffe_id);
        tracing::info!(
            event = "jwt_svid_issued",
            spiffe_id,
            entry = %entry.id,
            agent = %agent.record.spiffe_id,
            audience = ?audience,
            ttl,
            authority = %jwt.record().id,
            "JWT-SVID issued"
        );
        Ok((token, exp))
    }

    /// Creates a join token; returns the token and its expiry. Only its hash is stored.
    pub fn create_join_token(
        &self,
        ttl_seconds: i64,
        alias: Option<String>,
    ) -> Result<(String, i64)> {
        let ttl = if ttl_seconds == 0 {
            self.config.join_token_ttl_seconds
        } else {
            ttl_seconds
        };
        if !(0..=30 * 24 * 3600).contains(&ttl) {
            return Err(Error::InvalidArgument(
                "token TTL must be between 1 second and 30 days".into(),
            ));
        }
        if let Some(a) = &alias {
            // The same rule as entries' IDs: canonical, in this trust domain, not reserved.
            crate::entries::parse_claimable_id(&self.trust_domain, "alias", a)?;
        }
        let token = random_hex(32)?;
        let id = random_hex(8)?;
        let expires_at = now() + ttl;
        self.store.put_join_token(
            &join_token::token_hash(&token),
            &JoinTokenRecord {
                id: id.clone(),
                expires_at,
                alias: alias.clone(),
            },
        )?;
        self.store.flush()?;
        self.record(json!({"type": "join_token_created", "token_id": id, "expires_at": expires_at, "alias": alias}))?;
        tracing::info!(event = "join_token_created", token_id = %id, expires_at, alias = ?alias, "join token created");
        Ok((token, expires_at))
    }

    /// Validates and stores a new entry.
    pub fn create_entry(&self, req: &ztid_proto::node::Entry) -> Result<EntryRecord> {
        let record =
            validate_new_entry(&self.trust_domain, req, self.config.ca_ttl_seconds, now())?;
        let record = self.store.create_entry(record)?;
        crate::metrics::entries_changed(1);
        self.store.flush()?;
        self.record(json!({"type": "entry_created", "entry": record.id, "spiffe_id": record.spiffe_id,
            "parent_id": record.parent_id, "selectors": record.selectors, "revision": record.revision}))?;
        tracing::info!(event = "entry_created", entry = %record.id, spiffe_id = %record.spiffe_id, parent = %record.parent_id, "registration entry created");
        Ok(record)
    }

    /// Deletes an entry.
    pub fn delete_entry(&self, id: &str) -> Result<EntryRecord> {
        let e = self
            .store
            .delete_entry(id)?
            .ok_or_else(|| Error::NotFound(format!("entry {id} does not exist")))?;
        crate::metrics::entries_changed(-1);
        self.store.flush()?;
        self.record(json!({"type": "entry_deleted", "entry": id, "spiffe_id": e.spiffe_id}))?;
        tracing::info!(event = "entry_deleted", entry = %id, spiffe_id = %e.spiffe_id, "registration entry deleted");
        Ok(e)
    }

    /// Evicts an agent: its next call fails; it must attest again.
    pub fn evict_agent(&self, id: &str) -> Result<AgentRecord> {
        crate::entries::parse_id(&self.trust_domain, "agent", id)?;
        let a = self
            .store
            .delete_agent(id)?
            .ok_or_else(|| Error::NotFound(format!("agent {id} does not exist")))?;
        self.store.flush()?;
        self.record(json!({"type": "agent_evicted", "agent": id}))?;
        tracing::warn!(event = "agent_evicted", agent = %id, "agent evicted");
        Ok(a)
    }

    /// Bans an agent: its next call fails and it cannot attest again.
    pub fn ban_agent(&self, id: &str) -> Result<AgentRecord> {
        crate::entries::parse_id(&self.trust_domain, "agent", id)?;
        let mut a = self
            .store
            .get_agent(id)?
            .ok_or_else(|| Error::NotFound(format!("agent {id} does not exist")))?;
        a.banned = true;
        self.store.put_agent(&a)?;
        self.store.flush()?;
        self.record(json!({"type": "agent_banned", "agent": id}))?;
        tracing::warn!(event = "agent_banned", agent = %id, "agent banned");
        Ok(a)
    }

    /// Entries an agent should hold: all of them (`full`) on first sync or when its
    /// aliases changed, else only what changed after `since`.
    pub fn sync_entries(
        &self,
        agent: &AuthenticatedAgent,
        since: u64,
        authorities_in_use: Vec<String>,
    ) -> Result<SyncResult> {
        let revision = self.store.current_revision()?;
        let aliases = self.aliases_of(&agent.record)?;
        let mut agent = agent.clone();
        let aliases_changed = aliases != agent.record.aliases;
        agent.record.aliases = aliases;
        agent.record.authorities_in_use = authorities_in_use;
        agent.record.last_sync_at = now();
        // Not flushed: a lost sync record only delays a revoke until the next sync.
        self.store.put_agent(&agent.record)?;
        let parents = agent.parents();
        let mut result = SyncResult {
            full: since == 0 || aliases_changed,
            upserted: Vec::new(),
            deleted: Vec::new(),
            revision,
        };
        if result.full {
            for p in &parents {
                let filter = crate::datastore::EntryFilter {
                    parent_id: Some(p.to_string()),
                    spiffe_id: None,
                };
                result.upserted.extend(
                    self.store
                        .list_entries(&filter)?
                        .into_iter()
                        .filter(|e| !e.node),
                );
            }
            return Ok(result);
        }
        // Only this agent's parents' changes are read, merged in revision order.
        let mut changes = Vec::new();
        for p in &parents {
            changes.extend(self.store.entry_changes_for_parent_since(p, since)?);
        }
        changes.sort_by_key(|c| c.revision);
        let mut latest = std::collections::BTreeMap::new();
        for change in changes {
            if change.revision > revision {
                break;
            }
            if !change.node {
                latest.insert(change.entry_id.clone(), change.deleted);
            }
        }
        for (id, deleted) in latest {
            match (deleted, self.store.get_entry(&id)?) {
                (false, Some(e)) => result.upserted.push(e),
                _ => result.deleted.push(id),
            }
        }
        Ok(result)
    }
}

/// What an agent's entry sync returns.
#[derive(Debug, Clone)]
pub struct SyncResult {
    /// Replace rather than merge.
    pub full: bool,
    /// New or changed entries.
    pub upserted: Vec<EntryRecord>,
    /// Ids of removed entries.
    pub deleted: Vec<String>,
    /// The revision the agent holds after applying this.
    pub revision: u64,
}

impl CaCore {
    /// Every authority of a kind.
    pub fn list_authorities(&self, kind: Kind) -> Result<Vec<AuthorityRecord>> {
        self.authorities.list(kind)
    }

    fn log_authority_change(&self, caller: &str, kind: Kind, action: &str, r: &AuthorityRecord) {
        if let Err(e) = self.record(
            json!({"type": "authority_changed", "caller": caller, "kind": kind.as_str(),
            "action": action, "authority": r.id, "tainted": r.tainted, "not_after": r.not_after,
            "bundle_sequence": self.bundle().sequence}),
        ) {
            tracing::error!(error = %e, "could not audit an authority change");
        }
        tracing::warn!(
            event = "authority_changed",
            caller,
            kind = kind.as_str(),
            action,
            authority = %r.id,
            state = ?r.state,
            tainted = r.tainted,
            not_after = r.not_after,
            bundle_sequence = self.bundle().sequence,
            "authority {action}"
        );
    }

    /// Prepares a new authority of `kind`.
    pub fn prepare_authority(&self, kind: Kind, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.prepare(kind, now())?;
        self.log_authority_change(caller, kind, "prepared", &r);
        Ok(r)
    }

    /// Activates the prepared authority of `kind`; the server's own SVID moves to it at once.
    pub fn activate_authority(&self, kind: Kind, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.activate(kind, now())?;
        self.log_authority_change(caller, kind, "activated", &r);
        if kind == Kind::X509 {
            self.force_renew_server_svid()?;
        }
        Ok(r)
    }

    /// Taints an old authority of `kind`.
    pub fn taint_authority(&self, kind: Kind, id: &str, caller: &str) -> Result<AuthorityRecord> {
        let r = self.authorities.taint(kind, id, now())?;
        self.log_authority_change(caller, kind, "tainted", &r);
        if kind == Kind::X509 {
            self.force_renew_server_svid()?;
        }
        Ok(r)
    }

    /// Revokes a tainted authority once no agent depends on it.
    pub fn revoke_authority(&self, kind: Kind, id: &str, caller: &str) -> Result<AuthorityRecord> {
        let agents = self.store.list_agents()?;
        let t = now();
        let r = self.authorities.revoke(kind, id, t, |a| {
            agents
                .iter()
                .filter(|g| !g.banned && g.expires_at > t)
                .find_map(|g| {
                    if g.last_sync_at < a.tainted_at {
                        Some(format!(
                            "agent {} has not synced since the taint",
                            g.spiffe_id
                        ))
                    } else if g.authorities_in_use.iter().any(|u| u == &a.id) {
                        Some(format!(
                            "agent {} still holds credentials it signed",
                            g.spiffe_id
                        ))
                    } else {
                        None
                    }
                })
        })?;
        self.log_authority_change(caller, kind, "revoked", &r);
        Ok(r)
    }

    fn force_renew_server_svid(&self) -> Result<()> {
        let (svid, expiry) = Self::issue_server_svid(
            &self.authorities.x509(),
            &self.trust_domain,
            &self.config,
            now(),
        )?;
        self.server_svid.store(Arc::new(svid));
        self.server_svid_expiry
            .store(expiry, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Periodic work: automatic rotation, pruning of expired authorities, server SVID renewal.
    pub fn housekeeping(&self) -> Result<()> {
        for c in self.authorities.tick(now())? {
            self.record(json!({"type": "authority_changed", "caller": "automatic rotation", "kind": c.kind.as_str(),
                "action": c.action, "authority": c.id}))?;
            tracing::warn!(event = "authority_changed", caller = "automatic rotation", kind = c.kind.as_str(), action = c.action, authority = %c.id, "authority {}", c.action);
            if c.kind == Kind::X509 && c.action == "activated" {
                self.force_renew_server_svid()?;
            }
        }
        self.maybe_renew_server_svid()
    }

    /// Appends a security event to the audit log.
    pub fn record(&self, event: Value) -> Result<()> {
        if let Some(a) = &self.audit {
            a.append(event)?;
            crate::metrics::audit_appended();
        }
        Ok(())
    }

    /// Waits until every event recorded so far is durable: call before answering.
    pub async fn audit_barrier(&self) -> Result<()> {
        match &self.audit {
            Some(a) => a.durable(a.last_seq()).await,
            None => Ok(()),
        }
    }

    /// Asks the issuance policy, if there is one.
    fn check_policy(
        &self,
        action: crate::policy::Action,
        agent: &AuthenticatedAgent,
        entry: &EntryRecord,
        spiffe_id: &str,
        ttl: i64,
    ) -> Result<()> {
        let Some(p) = &self.policy else { return Ok(()) };
        p.authorize(
            action,
            &crate::policy::Facts {
                agent: &agent.record.spiffe_id,
                method: &agent.record.method,
                node_selectors: agent
                    .record
                    .selectors
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                spiffe_id,
                ttl,
                entry: Some(json!({"id": entry.id, "spiffe_id": entry.spiffe_id,
                    "parent_id": entry.parent_id, "shared": entry.shared})),
                now: now(),
            },
        )
    }

    /// Re-reads the issuance policy if its file changed; a broken file is refused
    /// (logged and audited with the parse error) and the old policy stays.
    pub fn reload_policy(&self) {
        let Some(p) = &self.policy else { return };
        match p.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(event = "policy_reloaded", "issuance policy reloaded");
                let _ = self.record(json!({"type": "policy_reloaded"}));
            }
            Err(e) => {
                tracing::error!(event = "policy_reload_refused", error = %e, "issuance policy refused; the previous policy stays in force");
                let _ =
                    self.record(json!({"type": "policy_reload_refused", "error": e.to_string()}));
            }
        }
    }
}
