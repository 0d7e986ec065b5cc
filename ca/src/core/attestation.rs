//! Node attestation: the verifier for a method (join tokens redeemed against the
//! datastore), binding evidence to the agent's CSR key, and completing an attestation
//! with the agent's SVID and record; aliases; join-token agents' renewal.

use std::collections::BTreeSet;
use std::time::SystemTime;

use rcgen::PublicKeyData;
use serde_json::json;
use ztid_spiffe::selector::satisfies;
use ztid_spiffe::Selector;
use ztid_verifier::{AttestationContext, AttestedNode, NodeVerifier};

use super::{now, AuthenticatedAgent, CaCore};
use crate::authority::{LeafTemplate, SignedLeaf};
use crate::csr_policy::{check_csr, IdentityRule};
use crate::datastore::AgentRecord;
use crate::{Error, RefusalKind, Result};

/// The selectors (type and value key) that name the banned node's own hardware, rather
/// than one agent ID, each with the identifier (`type:key`) it is recorded and matched
/// as: what a ban records besides the agent's SPIFFE ID.
///
/// - `tpm:ek-hash:<hex>`: the TPM's endorsement key (its node ID). A TPM has an RSA
///   and an ECC EK, each with its own hash: a ban covers the EKs the node showed.
/// - `sev-snp:vtpm-ek-hash:<hex>`: the EK of the guest's SVSM vTPM, hashed as the `tpm`
///   method hashes it (a `multi` node binds the two). The same key, so the same
///   identifier, `tpm:ek-hash:<hex>`: a vTPM banned as a `tpm` node is refused as an
///   `sev-snp` one and the other way round. The vTPM is the guest's own, so its ban
///   refuses no other guest of the chip.
///
/// Not the SEV-SNP chip ID: a chip hosts every guest of its machine, and a ban of one
/// guest (isolated from the others by the very hardware it attests) must not refuse
/// them all. SEV-SNP and TDX 1.5 node IDs are per launch, and neither TEE names the
/// guest across launches (but for the vTPM above): their bans hold for the banned launch.
pub const HARDWARE_IDENTIFIERS: &[(&str, &str, &str)] = &[
    ("tpm", "ek-hash", "tpm:ek-hash"),
    ("sev-snp", "vtpm-ek-hash", "tpm:ek-hash"),
];

/// The hardware identifiers among `selectors`, each as recorded and matched (see
/// [`HARDWARE_IDENTIFIERS`]; each once, sorted): a `multi` node carries those of its
/// factors.
pub fn hardware_identifiers(selectors: &[Selector]) -> Vec<String> {
    let found: BTreeSet<String> = selectors
        .iter()
        .filter_map(|s| {
            HARDWARE_IDENTIFIERS
                .iter()
                .find_map(|(kind, key, canonical)| {
                    if s.kind() != *kind {
                        return None;
                    }
                    let rest = s.value().strip_prefix(key)?;
                    (rest.starts_with(':') && rest.len() > 1).then(|| format!("{canonical}{rest}"))
                })
        })
        .collect();
    found.into_iter().collect()
}

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

    /// Refuses, as banned, a node whose selectors prove a hardware identifier recorded
    /// with some agent's ban, whatever agent ID it attests as.
    fn check_hardware_bans(&self, agent_id: &str, selectors: &[Selector]) -> Result<()> {
        let identifiers = hardware_identifiers(selectors);
        if identifiers.is_empty() {
            return Ok(());
        }
        match self
            .store
            .hardware_bans_of(&identifiers)?
            .into_iter()
            .next()
        {
            Some(ban) => Err(Error::refused(
                RefusalKind::Banned,
                format!(
                    "{} is banned (recorded with the ban of agent {}): {agent_id} may not attest",
                    ban.identifier, ban.agent
                ),
            )),
            None => Ok(()),
        }
    }

    /// Completes an attestation: checks bans (the agent's ID and the hardware
    /// identifiers its selectors prove), computes aliases, signs the agent SVID and
    /// stores the agent.
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
        self.check_hardware_bans(&agent_id, &node.selectors)?;
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
            key_sha256: leaf.key_sha256()?,
            previous_key_sha256: None,
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
            record.previous_key_sha256 = None;
            if let Some(e) = &existing {
                if e.expires_at > t {
                    record.previous_serial = Some(e.serial.clone());
                    record.previous_expires_at = e.expires_at;
                    record.previous_key_sha256 =
                        (!e.key_sha256.is_empty()).then(|| e.key_sha256.clone());
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
            self.check_hardware_bans(&record.spiffe_id, &record.selectors)?;
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
        let key_sha256 = leaf.key_sha256()?;
        // Only the serial and key fields change, on the record as stored now: an
        // eviction or ban since the call was authenticated refuses the renewal, a sync
        // is kept.
        self.modify_agent(id, |current| {
            let mut record = current.clone();
            record.previous_serial = Some(record.serial.clone());
            record.previous_expires_at = record.expires_at;
            record.previous_key_sha256 =
                (!record.key_sha256.is_empty()).then(|| std::mem::take(&mut record.key_sha256));
            record.serial = leaf.serial.clone();
            record.expires_at = leaf.not_after;
            record.key_sha256 = key_sha256.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{core_with_agent, fresh_csr};

    const SERVER: &str = "spiffe://example.org/ztid/server";

    fn node(method: &'static str, node_id: &str, selectors: &[String]) -> AttestedNode {
        AttestedNode {
            method,
            node_id: node_id.into(),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            aliases: vec![],
            evidence_digest: [1; 32],
        }
    }

    /// A node alias selecting on `selector` (`type:value`), as the workloads of the
    /// banned node's kind hang off.
    fn alias(core: &CaCore, id: &str, selector: &str) {
        let (kind, value) = selector.split_once(':').unwrap();
        core.create_entry(&ztid_proto::node::Entry {
            spiffe_id: id.into(),
            parent_id: SERVER.into(),
            selectors: vec![ztid_proto::node::Selector {
                r#type: kind.into(),
                value: value.into(),
            }],
            node: true,
            ..Default::default()
        })
        .unwrap();
    }

    /// The refusal detail, asserting the refusal is `Banned`.
    /// Every hardware identifier recorded with a ban, and the banned agent.
    fn recorded_bans(core: &CaCore) -> Vec<(String, String)> {
        core.store
            .list_hardware_bans()
            .unwrap()
            .into_iter()
            .map(|b| (b.identifier, b.agent))
            .collect()
    }

    fn banned_reason(e: Error) -> String {
        assert_eq!(e.refusal_kind(), Some(RefusalKind::Banned), "{e}");
        e.to_string()
    }

    fn sev_snp_launch(report_id: u8, chip_id: &str) -> AttestedNode {
        node(
            "sev-snp",
            &format!("{report_id:02x}").repeat(16),
            &[
                format!("sev-snp:chip-id:{chip_id}"),
                format!("sev-snp:measurement:{}", "aa".repeat(48)),
                "sev-snp:policy:30000".into(),
            ],
        )
    }

    #[test]
    fn hardware_identifiers_are_the_tpm_and_vtpm_ek_hashes() {
        let ek = "ab".repeat(32);
        let other_ek = "cd".repeat(32);
        let chip = "ef".repeat(64);
        let n = node(
            "multi",
            &"01".repeat(32),
            &[
                format!("tpm:ek-hash:{ek}"),
                format!("tpm:ek-hash:{other_ek}"),
                format!("tpm:pcr:7:{}", "00".repeat(32)),
                "tpm:ek-cert:none".into(),
                format!("sev-snp:chip-id:{chip}"),
                format!("sev-snp:vtpm-ek-hash:{ek}"),
                format!("sev-snp:measurement:{}", "aa".repeat(48)),
                format!("tdx:mrtd:{}", "bb".repeat(48)),
                "multi:method:tpm".into(),
                "multi:method:sev-snp".into(),
            ],
        );
        // The vTPM's EK hash is the TPM factor's: one identifier for both.
        assert_eq!(
            hardware_identifiers(&n.selectors),
            vec![
                format!("tpm:ek-hash:{ek}"),
                format!("tpm:ek-hash:{other_ek}")
            ]
        );
        // An SEV-SNP node alone: its vTPM, as a TPM EK hash; not its chip.
        let vtpm_ek = "99".repeat(32);
        let snp = node(
            "sev-snp",
            &"02".repeat(16),
            &[
                format!("sev-snp:chip-id:{chip}"),
                format!("sev-snp:vtpm-ek-hash:{vtpm_ek}"),
            ],
        );
        assert_eq!(
            hardware_identifiers(&snp.selectors),
            vec![format!("tpm:ek-hash:{vtpm_ek}")]
        );
        let join = node("join-token", "t1", &["join-token:id:t1".into()]);
        assert!(hardware_identifiers(&join.selectors).is_empty());
    }

    /// The finding: a ban keyed to the agent ID only let the same TPM attest again as
    /// one factor of a `multi` attempt (another agent ID) and rejoin every node alias
    /// selecting on its hardware.
    #[test]
    fn banned_tpm_node_attesting_again_as_multi_with_the_same_ek_is_refused() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let pcr = format!("tpm:pcr:7:{}", "00".repeat(32));
        alias(&core, "spiffe://example.org/nodes/secure-boot", &pcr);
        let tpm = node("tpm", &ek, &[format!("tpm:ek-hash:{ek}"), pcr.clone()]);
        let (rec, _) = core.complete_attestation(&tpm, &fresh_csr()).unwrap();
        assert_eq!(rec.aliases, vec!["spiffe://example.org/nodes/secure-boot"]);
        core.ban_agent(&rec.spiffe_id).unwrap();
        assert_eq!(
            recorded_bans(&core),
            vec![(format!("tpm:ek-hash:{ek}"), rec.spiffe_id.clone())]
        );

        // The same method and EK: refused by its ID, as before.
        let e = core.complete_attestation(&tpm, &fresh_csr()).unwrap_err();
        assert!(banned_reason(e).contains(&rec.spiffe_id));

        // The same TPM inside a multi attempt: another agent ID, refused by its EK.
        let multi = node(
            "multi",
            &"cd".repeat(32),
            &[
                format!("tpm:ek-hash:{ek}"),
                pcr.clone(),
                format!("sev-snp:chip-id:{}", "12".repeat(64)),
                "multi:method:sev-snp".into(),
                "multi:method:tpm".into(),
            ],
        );
        let e = core.complete_attestation(&multi, &fresh_csr()).unwrap_err();
        let reason = banned_reason(e);
        assert!(reason.contains(&format!("tpm:ek-hash:{ek}")), "{reason}");
        assert!(reason.contains(&rec.spiffe_id), "{reason}");
        let multi_id =
            ztid_spiffe::spiffe_id::agent_id(&core.trust_domain, "multi", &"cd".repeat(32))
                .unwrap()
                .to_string();
        assert!(core.store.get_agent(&multi_id).unwrap().is_none());

        // Another TPM in the same alias is not touched by the ban.
        let other_ek = "ef".repeat(32);
        let other = node("tpm", &other_ek, &[format!("tpm:ek-hash:{other_ek}"), pcr]);
        let (rec2, _) = core.complete_attestation(&other, &fresh_csr()).unwrap();
        assert_eq!(rec2.aliases, vec!["spiffe://example.org/nodes/secure-boot"]);
    }

    /// A ban made on the `multi` agent covers its factors' hardware when it attests
    /// with one method alone.
    #[test]
    fn banned_multi_node_attesting_again_with_its_tpm_alone_is_refused() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let multi = node(
            "multi",
            &"cd".repeat(32),
            &[
                format!("tpm:ek-hash:{ek}"),
                "multi:method:sev-snp".into(),
                "multi:method:tpm".into(),
            ],
        );
        let (rec, _) = core.complete_attestation(&multi, &fresh_csr()).unwrap();
        core.ban_agent(&rec.spiffe_id).unwrap();
        let tpm = node("tpm", &ek, &[format!("tpm:ek-hash:{ek}")]);
        let reason = banned_reason(core.complete_attestation(&tpm, &fresh_csr()).unwrap_err());
        assert!(reason.contains(&format!("tpm:ek-hash:{ek}")), "{reason}");
    }

    /// SEV-SNP node IDs are per launch, and the chip hosts every guest of its machine:
    /// a ban holds for the banned launch, and refuses no other guest on the chip.
    #[test]
    fn a_sev_snp_ban_holds_for_its_launch_and_refuses_no_other_guest_on_the_chip() {
        let (_dir, core, _, _) = core_with_agent();
        let chip = "12".repeat(64);
        let first = sev_snp_launch(1, &chip);
        let (rec, _) = core.complete_attestation(&first, &fresh_csr()).unwrap();
        core.ban_agent(&rec.spiffe_id).unwrap();
        let reason = banned_reason(core.complete_attestation(&first, &fresh_csr()).unwrap_err());
        assert!(reason.contains(&rec.spiffe_id), "{reason}");
        assert!(core.store.list_hardware_bans().unwrap().is_empty());
        let (other, _) = core
            .complete_attestation(&sev_snp_launch(2, &chip), &fresh_csr())
            .unwrap();
        assert!(!other.banned);
    }

    fn tpm_node(ek: &str) -> AttestedNode {
        node("tpm", ek, &[format!("tpm:ek-hash:{ek}")])
    }

    fn multi_with_tpm(node_id: &str, ek: &str) -> AttestedNode {
        node(
            "multi",
            node_id,
            &[
                format!("tpm:ek-hash:{ek}"),
                "multi:method:sev-snp".into(),
                "multi:method:tpm".into(),
            ],
        )
    }

    /// Lifting the ban (`agent evict` of the banned agent) lifts the hardware
    /// identifiers recorded with it: the same TPM attests again, as itself or in a
    /// `multi` attempt.
    #[test]
    fn an_unbanned_tpm_is_admitted_again() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let (rec, _) = core
            .complete_attestation(&tpm_node(&ek), &fresh_csr())
            .unwrap();
        core.ban_agent(&rec.spiffe_id).unwrap();
        let multi = multi_with_tpm(&"cd".repeat(32), &ek);
        assert!(core.complete_attestation(&multi, &fresh_csr()).is_err());

        let evicted = core.evict_agent(&rec.spiffe_id).unwrap();
        assert!(evicted.banned);
        assert!(core.store.list_hardware_bans().unwrap().is_empty());
        let (rec2, _) = core.complete_attestation(&multi, &fresh_csr()).unwrap();
        assert!(!rec2.banned);
        let (rec1, _) = core
            .complete_attestation(&tpm_node(&ek), &fresh_csr())
            .unwrap();
        assert_eq!(rec1.spiffe_id, rec.spiffe_id);
    }

    /// The same TPM banned with two agents stays banned until both bans are lifted.
    #[test]
    fn lifting_one_ban_keeps_the_hardware_another_ban_recorded() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let (a, _) = core
            .complete_attestation(&tpm_node(&ek), &fresh_csr())
            .unwrap();
        let (b, _) = core
            .complete_attestation(&multi_with_tpm(&"01".repeat(32), &ek), &fresh_csr())
            .unwrap();
        core.ban_agent(&a.spiffe_id).unwrap();
        core.ban_agent(&b.spiffe_id).unwrap();
        core.evict_agent(&a.spiffe_id).unwrap();
        let third = multi_with_tpm(&"02".repeat(32), &ek);
        let reason = banned_reason(core.complete_attestation(&third, &fresh_csr()).unwrap_err());
        assert!(reason.contains(&b.spiffe_id), "{reason}");
        core.evict_agent(&b.spiffe_id).unwrap();
        core.complete_attestation(&third, &fresh_csr()).unwrap();
    }

    fn sev_snp_with_vtpm(report_id: u8, ek: &str) -> AttestedNode {
        let mut n = sev_snp_launch(report_id, &"12".repeat(64));
        n.selectors
            .push(Selector::parse(&format!("sev-snp:vtpm-ek-hash:{ek}")).unwrap());
        n
    }

    /// The finding: a TPM banned as a `tpm` node came back as the vTPM of an SEV-SNP
    /// guest attesting alone (another agent ID, the same EK) and was admitted.
    #[test]
    fn banned_tpm_node_attesting_again_as_sev_snp_with_the_same_vtpm_ek_is_refused() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let (rec, _) = core
            .complete_attestation(&tpm_node(&ek), &fresh_csr())
            .unwrap();
        core.ban_agent(&rec.spiffe_id).unwrap();

        let snp = sev_snp_with_vtpm(1, &ek);
        let reason = banned_reason(core.complete_attestation(&snp, &fresh_csr()).unwrap_err());
        assert!(reason.contains(&format!("tpm:ek-hash:{ek}")), "{reason}");
        assert!(reason.contains(&rec.spiffe_id), "{reason}");
        let snp_id = ztid_spiffe::spiffe_id::agent_id(&core.trust_domain, "sev-snp", &snp.node_id)
            .unwrap()
            .to_string();
        assert!(core.store.get_agent(&snp_id).unwrap().is_none());

        // A guest on the same chip with another vTPM is not touched by the ban.
        let (other, _) = core
            .complete_attestation(&sev_snp_with_vtpm(2, &"cd".repeat(32)), &fresh_csr())
            .unwrap();
        assert!(!other.banned);
    }

    /// The reverse: banning an SEV-SNP guest records its vTPM's EK, so the same vTPM
    /// attesting as a `tpm` node (another agent ID) is refused.
    #[test]
    fn banned_sev_snp_node_with_a_vtpm_refuses_the_vtpm_attesting_as_tpm() {
        let (_dir, core, _, _) = core_with_agent();
        let ek = "ab".repeat(32);
        let (rec, _) = core
            .complete_attestation(&sev_snp_with_vtpm(1, &ek), &fresh_csr())
            .unwrap();
        core.ban_agent(&rec.spiffe_id).unwrap();
        assert_eq!(
            recorded_bans(&core),
            vec![(format!("tpm:ek-hash:{ek}"), rec.spiffe_id.clone())]
        );

        let reason = banned_reason(
            core.complete_attestation(&tpm_node(&ek), &fresh_csr())
                .unwrap_err(),
        );
        assert!(reason.contains(&format!("tpm:ek-hash:{ek}")), "{reason}");
        assert!(reason.contains(&rec.spiffe_id), "{reason}");
        // Another guest on the same chip, without that vTPM, still attests.
        core.complete_attestation(&sev_snp_launch(2, &"12".repeat(64)), &fresh_csr())
            .unwrap();
    }

    /// A node proving no hardware identifier (a join token) is banned by its ID only;
    /// banning it records nothing.
    #[test]
    fn banning_a_join_token_agent_records_no_hardware_identifier() {
        let (_dir, core, _, agent) = core_with_agent();
        core.ban_agent(&agent.record.spiffe_id).unwrap();
        assert!(core.store.list_hardware_bans().unwrap().is_empty());
    }
}
