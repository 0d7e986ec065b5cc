//! Node attestation: the verifier for a method (join tokens redeemed against the
//! datastore), binding evidence to the agent's CSR key, and completing an attestation
//! with the agent's SVID and record; aliases; join-token agents' renewal.

use std::collections::BTreeSet;
use std::time::SystemTime;

use rcgen::PublicKeyData;
use serde_json::json;
use ztid_spiffe::selector::satisfies;
use ztid_verifier::{AttestationContext, AttestedNode, NodeVerifier};

use super::{now, AuthenticatedAgent, CaCore};
use crate::authority::{LeafTemplate, SignedLeaf};
use crate::csr_policy::{check_csr, IdentityRule};
use crate::datastore::AgentRecord;
use crate::{Error, RefusalKind, Result};

impl CaCore {
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
            .ok_or_else(|| {
                Error::refused(
                    RefusalKind::UnknownMethod,
                    format!("unknown attestation method {method:?}"),
                )
            })
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
        .map_err(|e| Error::refused(RefusalKind::BadCsr, format!("malformed agent CSR: {e}")))?;
        Ok(parsed.public_key.subject_public_key_info())
    }

    /// Completes an attestation: checks bans, computes aliases, signs the agent SVID
    /// and stores the agent.
    pub fn complete_attestation(
        &self,
        node: &AttestedNode,
        csr: &[u8],
    ) -> Result<(AgentRecord, SignedLeaf)> {
        let agent_id =
            ztid_spiffe::spiffe_id::agent_id(&self.trust_domain, node.method, &node.node_id)
                .map_err(|e| {
                    Error::InvalidInput(format!(
                        "attestor returned an unusable node id: {}",
                        crate::csr_policy::reason(e)
                    ))
                })?
                .to_string();
        let mut existing = self.store.get_agent(&agent_id)?;
        if existing.as_ref().is_some_and(|e| e.banned) {
            return Err(super::agent_auth::banned_agent(&agent_id));
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
                    extra: None,
                },
            )?;
        }
        let leaf = self.authorities.x509().sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: agent_id.clone(),
                dns_names: vec![],
                ip_addresses: vec![],
                node: None,
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
            aliases_revision: 0,
        };
        record.aliases = self.aliases_of(&record)?;
        // New aliases (or a new agent) answer the agent's next sync in full, whatever
        // revision it asks since.
        if existing.as_ref().map(|e| &e.aliases) != Some(&record.aliases) {
            record.aliases_revision = self.store.current_revision()?;
        } else if let Some(e) = &existing {
            record.aliases_revision = e.aliases_revision;
        }
        // Written only over the very record whose ban flag was checked (or only if there
        // is still none): a ban landing in between refuses this attestation instead of
        // being overwritten; any other write in between is read again.
        let mut tries = 0;
        loop {
            // A re-attestation (continuous attestation) replaces the SVID; the one it
            // replaces stays valid until it expires, so calls in flight do not fail.
            record.previous_serial = None;
            record.previous_expires_at = 0;
            if let Some(e) = &existing {
                if e.expires_at > t {
                    record.previous_serial = Some(e.serial.clone());
                    record.previous_expires_at = e.expires_at;
                }
            }
            if self.store.compare_and_swap_agent(
                &record.spiffe_id,
                existing.as_ref(),
                Some(&record),
            )? {
                break;
            }
            tries += 1;
            if tries >= super::agent_auth::AGENT_UPDATE_TRIES {
                return Err(super::agent_auth::agent_update_contended(&record.spiffe_id));
            }
            existing = self.store.get_agent(&record.spiffe_id)?;
            if existing.as_ref().is_some_and(|e| e.banned) {
                return Err(super::agent_auth::banned_agent(&record.spiffe_id));
            }
        }
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
            return Err(Error::refused(
                RefusalKind::RenewByAttesting,
                format!(
                    "agents attested by {} renew by attesting again",
                    agent.record.method
                ),
            ));
        }
        let checked = check_csr(csr, &IdentityRule::Assigned(id), &[])?;
        let leaf = self.authorities.x509().sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: id.clone(),
                dns_names: vec![],
                ip_addresses: vec![],
                node: None,
                ttl_seconds: self.config.agent_svid_ttl_seconds,
            },
            now(),
        )?;
        // Only the serial fields change, on the record as stored now: an eviction or ban
        // since the call was authenticated refuses the renewal, a sync is kept.
        self.modify_agent(id, |current| {
            let mut record = current.clone();
            record.previous_serial = Some(record.serial.clone());
            record.previous_expires_at = record.expires_at;
            record.serial = leaf.serial.clone();
            record.expires_at = leaf.not_after;
            Ok(record)
        })?;
        self.store.flush()?;
        self.record(json!({"type": "agent_svid_issued", "agent": id, "serial": leaf.serial, "not_after": leaf.not_after,
            "authority": self.authorities.x509().record().id}))?;
        crate::metrics::agent_svid_issued();
        tracing::info!(event = "agent_renewed", agent = %id, serial = %leaf.serial, "agent SVID renewed");
        Ok(leaf)
    }
}
