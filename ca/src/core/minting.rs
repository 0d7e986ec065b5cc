//! Issuing SVIDs: workload X509-SVIDs and JWT-SVIDs under an entry the agent is
//! entitled to, and admin X509-SVIDs for the admin socket.

use serde_json::json;

use super::{now, AuthenticatedAgent, CaCore};
use crate::authority::{LeafTemplate, SignedLeaf};
use crate::csr_policy::{check_csr, check_identity, IdentityRule};
use crate::datastore::EntryRecord;
use crate::{Error, RefusalKind, Result};

/// What a workload CSR or JWT request under `entry` may name: the entry's ID
/// (shared) or the entry's ID plus one per-instance segment; never a reserved ID.
fn workload_rule(entry: &EntryRecord) -> IdentityRule<'_> {
    if entry.shared {
        IdentityRule::Shared(&entry.spiffe_id)
    } else {
        IdentityRule::Instance(&entry.spiffe_id)
    }
}

/// The audit record of an issued workload X509-SVID, one per SVID (the hot path: written
/// straight into the log's line; the fields in the order operators' tools read them).
#[derive(serde::Serialize)]
struct X509SvidIssued<'a> {
    r#type: &'static str,
    spiffe_id: &'a str,
    entry: &'a str,
    agent: &'a str,
    serial: &'a str,
    ttl: i64,
    not_after: i64,
    authority: &'a str,
}

/// The entries one call has loaded and found its agent entitled to: a batch of CSRs
/// for one entry reads, decodes and checks it once (a batch of 100 did it 100 times),
/// and the whole call sees one state of it. Lives for one call of one agent; holds at
/// most one record per distinct entry the call names (bounded by the batch limit).
#[derive(Default)]
pub struct EntryMemo {
    loaded: std::collections::HashMap<String, EntryRecord>,
}

impl CaCore {
    /// Issues an admin X509-SVID, `spiffe://TD/ztid/admin/NAME`, for a CSR made by the
    /// caller. Only the admin socket serves this (see `api::admin::authz`): admin identities
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
            .map_err(|e| Error::InvalidInput(crate::csr_policy::reason(e)))?
            .to_string();
        let ttl = if ttl_seconds == 0 {
            self.config.x509_svid_ttl_seconds
        } else {
            ttl_seconds
        };
        if !(1..=self.config.ca_ttl_seconds).contains(&ttl) {
            return Err(Error::InvalidInput(format!(
                "admin SVID TTL must be between 1 and {} seconds",
                self.config.ca_ttl_seconds
            )));
        }
        let checked = check_csr(csr, &IdentityRule::Assigned(&id), &[])?;
        // Dated past any revocation of this admin in force: a credential issued right
        // after one is not taken for a revoked one.
        let issued = self.admin_issue_time(&id)?;
        let authority = self.authorities.x509();
        let leaf = authority.sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: id.clone(),
                dns_names: vec![],
                ip_addresses: vec![],
                node: None,
                ttl_seconds: ttl,
            },
            issued,
        )?;
        self.record(json!({"type": "admin_svid_issued", "spiffe_id": id, "caller": caller,
            "serial": leaf.serial, "not_after": leaf.not_after, "authority": authority.record().id}))?;
        tracing::warn!(event = "admin_svid_issued", spiffe_id = %id, caller, serial = %leaf.serial, not_after = leaf.not_after, "admin SVID issued");
        Ok((id, leaf))
    }

    /// Refuses a mint for an instance an operator revoked: a revoked instance stays dead
    /// even if its agent (compromised, or from before the revocation) asks again.
    fn refuse_revoked_instance(&self, agent: &AuthenticatedAgent, spiffe_id: &str) -> Result<()> {
        // Issued now: only an instance revocation matches (an entry or node revocation
        // covers what was issued before it).
        if let Some(r) = self.revocation_of(spiffe_id, Some(&agent.record.spiffe_id), now())? {
            return Err(Error::refused(
                RefusalKind::Revoked,
                format!(
                    "identity {spiffe_id} was revoked by an operator ({} revocation of {})",
                    r.kind, r.target
                ),
            ));
        }
        Ok(())
    }

    /// Whether `parent`, one of the agent's stored parents, is still its parent now: its
    /// own ID, an alias its evidence granted, or a node alias whose selectors its
    /// attestation proved, read now. The stored list is refreshed only when the agent
    /// syncs or attests, so an agent that stops syncing would otherwise keep minting
    /// under an alias the operator took it out of (deleted, or its selectors changed).
    fn alias_still_holds(&self, agent: &AuthenticatedAgent, parent: &str) -> Result<bool> {
        if parent == agent.record.spiffe_id
            || agent.record.granted_aliases.iter().any(|a| a == parent)
        {
            return Ok(true);
        }
        Ok(self.store.node_entries()?.iter().any(|n| {
            n.spiffe_id == parent
                && ztid_spiffe::selector::satisfies(&agent.record.selectors, &n.selectors)
        }))
    }

    /// Loads an entry the agent is entitled to mint for.
    fn entitled_entry(&self, agent: &AuthenticatedAgent, entry_id: &str) -> Result<EntryRecord> {
        if agent.tainted_issuer {
            return Err(Error::refused(
                RefusalKind::StaleCredential,
                format!(
                    "agent {}'s SVID was signed by a tainted X.509 authority, whose key may be \
                     in other hands: it mints nothing until renewed (the agent renews on its \
                     own once it sees the taint)",
                    agent.record.spiffe_id
                ),
            ));
        }
        let entry = self
            .store
            .get_entry(entry_id)?
            .ok_or_else(|| Error::NotFound(format!("entry {entry_id} does not exist")))?;
        if entry.node
            || !agent.parents().contains(entry.parent_id.as_str())
            || !self.alias_still_holds(agent, &entry.parent_id)?
        {
            return Err(Error::refused(
                RefusalKind::NotEntitled,
                format!(
                    "agent {} is not entitled to entry {entry_id}",
                    agent.record.spiffe_id
                ),
            ));
        }
        // A stored entry the rules refuse (stored before them, or naming a DNS name the
        // server's config has since given the server) mints nothing.
        if let Some(why) =
            crate::entries::unusable_reason(&self.trust_domain, &entry, &self.server_dns_names)
        {
            return Err(Error::refused(
                RefusalKind::UnusableEntry,
                format!(
                    "entry {entry_id} breaks the entry rules as stored and mints nothing: {why}"
                ),
            ));
        }
        Ok(entry)
    }

    /// [`Self::entitled_entry`], loaded once per call: see [`EntryMemo`]. A refusal is
    /// not kept (the next CSR naming the entry is refused afresh).
    fn entitled_entry_in<'m>(
        &self,
        memo: &'m mut EntryMemo,
        agent: &AuthenticatedAgent,
        entry_id: &str,
    ) -> Result<&'m EntryRecord> {
        if !memo.loaded.contains_key(entry_id) {
            let entry = self.entitled_entry(agent, entry_id)?;
            memo.loaded.insert(entry_id.to_string(), entry);
        }
        memo.loaded
            .get(entry_id)
            .ok_or_else(|| Error::NotFound(format!("entry {entry_id} does not exist")))
    }

    /// Signs one workload CSR for an entry.
    pub fn sign_workload_svid(
        &self,
        agent: &AuthenticatedAgent,
        entry_id: &str,
        csr: &[u8],
    ) -> Result<(String, SignedLeaf)> {
        self.sign_workload_svid_in(&mut EntryMemo::default(), agent, entry_id, csr)
    }

    /// Signs one workload CSR of a call for an entry, the entries the call loaded
    /// before kept in `memo` (one per call and agent).
    pub fn sign_workload_svid_in(
        &self,
        memo: &mut EntryMemo,
        agent: &AuthenticatedAgent,
        entry_id: &str,
        csr: &[u8],
    ) -> Result<(String, SignedLeaf)> {
        let entry = self.entitled_entry_in(memo, agent, entry_id)?;
        let checked = check_csr(csr, &workload_rule(entry), &entry.dns_names)?;
        self.refuse_revoked_instance(agent, &checked.spiffe_id)?;
        // Bounded now, not only when the entry was stored: an entry stored under a larger
        // ca_ttl_seconds (lowered since) gets the bound in force.
        let ttl = if entry.x509_ttl > 0 {
            entry.x509_ttl
        } else {
            self.config.x509_svid_ttl_seconds
        }
        .min(self.config.ca_ttl_seconds);
        self.check_policy(
            crate::policy::Action::MintX509,
            agent,
            entry,
            &checked.spiffe_id,
            ttl,
            None,
        )?;
        let authority = self.authorities.x509();
        let leaf = authority.sign_leaf(
            &checked.public_key,
            &LeafTemplate {
                spiffe_id: checked.spiffe_id.clone(),
                dns_names: entry.dns_names.clone(),
                ip_addresses: vec![],
                node: Some(agent.record.spiffe_id.clone()),
                ttl_seconds: ttl,
            },
            now(),
        )?;
        self.record_event(&X509SvidIssued {
            r#type: "x509_svid_issued",
            spiffe_id: &checked.spiffe_id,
            entry: &entry.id,
            agent: &agent.record.spiffe_id,
            serial: &leaf.serial,
            ttl,
            not_after: leaf.not_after,
            authority: &authority.record().id,
        })?;
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
            return Err(Error::InvalidInput("audience must be specified".into()));
        }
        check_identity(&workload_rule(&entry), spiffe_id)?;
        self.refuse_revoked_instance(agent, spiffe_id)?;
        // As for X509-SVIDs: the bound in force now. A JWT-SVID is a bearer token, and
        // the JWT authority's own life (jwt_key_ttl_seconds) is no bound an entry set.
        let ttl = if entry.jwt_ttl > 0 {
            entry.jwt_ttl
        } else {
            self.config.jwt_svid_ttl_seconds
        }
        .min(self.config.ca_ttl_seconds);
        self.check_policy(
            crate::policy::Action::MintJwt,
            agent,
            &entry,
            spiffe_id,
            ttl,
            Some(audience),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed record is byte for byte the object the log held before it was typed
    /// (tools and `audit show` read these fields by name, in this order).
    #[test]
    fn the_typed_issuance_record_serialises_as_the_json_object_it_replaced() {
        let typed = X509SvidIssued {
            r#type: "x509_svid_issued",
            spiffe_id: "spiffe://td/w/1",
            entry: "e1",
            agent: "spiffe://td/ztid/agent/x",
            serial: "0a",
            ttl: 3600,
            not_after: 1_900_000_000,
            authority: "auth-1",
        };
        let untyped = json!({"type": "x509_svid_issued", "spiffe_id": "spiffe://td/w/1", "entry": "e1",
            "agent": "spiffe://td/ztid/agent/x", "serial": "0a", "ttl": 3600_i64, "not_after": 1_900_000_000_i64,
            "authority": "auth-1"});
        assert_eq!(
            serde_json::to_string(&typed).unwrap(),
            serde_json::to_string(&untyped).unwrap()
        );
    }

    fn csr_for(spiffe_id: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            spiffe_id.to_string().try_into().unwrap(),
        )];
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn per_instance_entry(core: &CaCore, agent: &AuthenticatedAgent, path: &str) -> String {
        core.create_entry(&ztid_proto::node::Entry {
            spiffe_id: format!("spiffe://example.org/{path}"),
            parent_id: agent.record.spiffe_id.clone(),
            selectors: vec![ztid_proto::node::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            ..Default::default()
        })
        .unwrap()
        .id
    }

    /// An agent SVID signed by a tainted authority mints nothing (whoever holds that key
    /// could sign any agent's ID and serial); a new SVID from the active one mints again.
    #[test]
    fn an_agent_svid_of_a_tainted_authority_mints_nothing() {
        let (_dir, core, leaf, agent) = crate::core::testing::core_with_agent();
        let entry = per_instance_entry(&core, &agent, "w");
        let id = "spiffe://example.org/w/0123456789abcdef0123456789abcdef";
        assert!(!agent.tainted_issuer);
        core.sign_workload_svid(&agent, &entry, &csr_for(id))
            .unwrap();
        let old = core.authorities.x509().record().id.clone();
        core.prepare_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        core.activate_authority(crate::authority::Kind::X509, "test")
            .unwrap();
        // Rotated, not tainted: the old authority's SVIDs still mint.
        let agent = core.authenticate_agent(Some(&leaf)).unwrap();
        assert!(!agent.tainted_issuer);
        core.sign_workload_svid(&agent, &entry, &csr_for(id))
            .unwrap();
        core.taint_authority(crate::authority::Kind::X509, &old, "test")
            .unwrap();
        let agent = core.authenticate_agent(Some(&leaf)).unwrap();
        assert!(agent.tainted_issuer, "it may still sync and renew");
        let x509 = core
            .sign_workload_svid(&agent, &entry, &csr_for(id))
            .map(|_| ());
        let jwt = core
            .mint_jwt_svid(&agent, &entry, id, &["https://x".to_string()])
            .map(|_| ());
        for refused in [x509, jwt] {
            let e = refused.expect_err("minted under a tainted agent SVID");
            assert_eq!(e.refusal_kind(), Some(RefusalKind::StaleCredential), "{e}");
            assert!(e.to_string().contains("tainted"), "{e}");
        }
        // Attested again: an SVID of the active authority.
        let (_, renewed) = core
            .complete_attestation(
                &crate::core::testing::test_node(),
                &crate::core::testing::fresh_csr(),
            )
            .unwrap();
        let agent = core
            .authenticate_agent(Some(renewed.chain.first().unwrap()))
            .unwrap();
        assert!(!agent.tainted_issuer);
        core.sign_workload_svid(&agent, &entry, &csr_for(id))
            .unwrap();
    }

    /// An agent's stored node aliases are recomputed only when it syncs (or attests
    /// again): an operator removes the alias (deletes the node entry), and an agent that
    /// never syncs again is refused its entries' SVIDs all the same.
    #[test]
    fn a_removed_alias_no_longer_entitles_an_agent_that_does_not_sync() {
        let (_dir, core, leaf, agent) = crate::core::testing::core_with_agent();
        let alias = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: "spiffe://example.org/nodes/payments".into(),
                node: true,
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "join-token".into(),
                    value: "id:n1".into(),
                }],
                ..Default::default()
            })
            .unwrap();
        // One sync: the agent joins the alias.
        core.sync_entries(
            &agent,
            crate::core::sync::SyncRequest {
                since: 0,
                authorities_in_use: vec![],
                page_size: 0,
                page_token: String::new(),
            },
        )
        .unwrap();
        let agent = core.authenticate_agent(Some(&leaf)).unwrap();
        assert!(agent.record.aliases.contains(&alias.spiffe_id));
        let db = core
            .create_entry(&ztid_proto::node::Entry {
                spiffe_id: "spiffe://example.org/payments-db".into(),
                parent_id: alias.spiffe_id.clone(),
                selectors: vec![ztid_proto::node::Selector {
                    r#type: "unix".into(),
                    value: "uid:1000".into(),
                }],
                ..Default::default()
            })
            .unwrap();
        // The operator takes the node out of the alias (deletes the alias).
        core.delete_entry(&alias.id).unwrap();
        // The (compromised) agent never syncs again; it asks for an SVID of the
        // alias's entry. The node API authenticates it afresh from the store.
        let agent = core.authenticate_agent(Some(&leaf)).unwrap();
        let id = "spiffe://example.org/payments-db/0123456789abcdef0123456789abcdef";
        let signed = core.sign_workload_svid(&agent, &db.id, &csr_for(id));
        let jwt = core.mint_jwt_svid(&agent, &db.id, id, &["https://x".to_string()]);
        for refused in [signed.map(|_| ()), jwt.map(|_| ())] {
            let e = refused.expect_err("an agent no longer in the alias minted");
            assert_eq!(e.refusal_kind(), Some(RefusalKind::NotEntitled), "{e}");
        }
    }

    /// An entry's DNS names are SANs of every SVID it yields, and HTTPS clients that
    /// trust the bundle check a URL's host against them: the token endpoint's own clients
    /// reach it as `localhost`, an `[sts] dns_names` name or the issuer's host. An entry
    /// naming one of those (made by an operator with only the entry role, or imported)
    /// gave its workloads a certificate those clients took for the server's. Refused at
    /// creation and update; one stored anyway (from before the rule, or named before the
    /// config gave the server that name) mints nothing.
    #[test]
    fn no_entry_names_the_servers_own_dns_names() {
        let (_dir, core, _, agent) = crate::core::testing::core_with_agent_configured(|c| {
            c.sts = Some(crate::config::StsConfig {
                issuer: Some("https://sts.example.org".into()),
                dns_names: vec!["tokens.example.org".into()],
                ..crate::config::StsConfig::on("127.0.0.1:8443".parse().unwrap())
            });
        });
        let req = |dns: &str| ztid_proto::node::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: agent.record.spiffe_id.clone(),
            selectors: vec![ztid_proto::node::Selector {
                r#type: "unix".into(),
                value: "uid:1000".into(),
            }],
            dns_names: vec![dns.into()],
            ..Default::default()
        };
        for (name, why) in [
            ("localhost", "the server's own certificate"),
            ("api.localhost", "the server's own certificate"),
            ("sts.example.org", "the server's own certificate"),
            ("tokens.example.org", "the server's own certificate"),
            ("LOCALHOST", "lowercase"),
            ("Tokens.Example.org", "lowercase"),
            ("127.0.0.1", "an IP address"),
            ("0x7f.1", "an IP address"),
            ("*.example.org", "not a valid DNS name"),
        ] {
            let refused = core.create_entry(&req(name));
            let Err(Error::InvalidInput(m)) = &refused else {
                panic!("{name}: expected InvalidInput, got {refused:?}")
            };
            assert!(m.contains(why), "{name}: {m}");
        }
        let ok = core.create_entry(&req("db.example.org")).unwrap();
        let update = ztid_proto::node::Entry {
            id: ok.id.clone(),
            ..req("localhost")
        };
        let refused = core.update_entry(&update);
        let Err(Error::InvalidInput(m)) = &refused else {
            panic!("update: expected InvalidInput, got {refused:?}")
        };
        assert!(m.contains("the server's own certificate"), "{m}");
        assert_eq!(core.store.get_entry(&ok.id).unwrap().unwrap(), ok);

        let mut stored = ok.clone();
        stored.id = "legacy".into();
        stored.spiffe_id = "spiffe://example.org/legacy-web".into();
        stored.dns_names = vec!["tokens.example.org".into()];
        core.store.create_entry(stored).unwrap();
        let legacy_id = "spiffe://example.org/legacy-web/0123456789abcdef0123456789abcdef";
        let x509 = core.sign_workload_svid(&agent, "legacy", &csr_for(legacy_id));
        let jwt = core.mint_jwt_svid(&agent, "legacy", legacy_id, &["https://x".to_string()]);
        for refused in [x509.map(|_| ()), jwt.map(|_| ())] {
            let e = refused.expect_err("minted under an entry naming the server's DNS name");
            assert_eq!(e.refusal_kind(), Some(RefusalKind::UnusableEntry), "{e}");
            assert!(
                e.to_string().contains("the server's own certificate"),
                "{e}"
            );
        }
        let id = "spiffe://example.org/web/0123456789abcdef0123456789abcdef";
        assert!(core
            .sign_workload_svid(&agent, &ok.id, &csr_for(id))
            .is_ok());
    }

    /// Entry TTLs are bounded by ca_ttl_seconds when stored; an entry stored before the
    /// operator lowered that bound kept its TTL at every mint: a JWT-SVID (a bearer
    /// token) lived as long as the entry said, up to the JWT authority's own life.
    #[test]
    fn mints_keep_the_ttl_bound_in_force_now() {
        const DAY: i64 = 86_400;
        let (_dir, core, _, agent) =
            crate::core::testing::core_with_agent_configured(|c| c.ca_ttl_seconds = DAY);
        let id = per_instance_entry(&core, &agent, "w");
        // As stored under a bound of 30 days.
        let mut stored = core.store.get_entry(&id).unwrap().unwrap();
        stored.x509_ttl = 20 * DAY;
        stored.jwt_ttl = 20 * DAY;
        core.store.update_entry(stored).unwrap();
        let svid = "spiffe://example.org/w/0123456789abcdef0123456789abcdef";
        let t = now();
        let (_, exp) = core
            .mint_jwt_svid(&agent, &id, svid, &["https://x".to_string()])
            .unwrap();
        assert!(exp <= t + DAY + 5, "JWT-SVID for {}s", exp - t);
        let (_, leaf) = core
            .sign_workload_svid(&agent, &id, &csr_for(svid))
            .unwrap();
        assert!(
            leaf.not_after <= t + DAY + 5,
            "X509-SVID for {}s",
            leaf.not_after - t
        );
    }

    /// The issuance policy sees a JWT-SVID's audiences (`context.audience`), so an
    /// operator can say which workloads may get tokens for which audiences (the token
    /// endpoint's, say): without them, every entitled workload could get any audience.
    #[test]
    fn the_issuance_policy_decides_on_jwt_audiences() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.cedar");
        std::fs::write(
            &policy,
            r#"permit (principal, action in [Action::"attest", Action::"mint_x509"], resource);
               @id("db-audience-only") permit (principal, action == Action::"mint_jwt", resource)
               when { context.audience == ["db"] };"#,
        )
        .unwrap();
        let core = CaCore::open(crate::config::ServerConfig {
            trust_domain: "example.org".into(),
            data_dir: dir.path().join("data"),
            issuance_policy: Some(policy),
            ..Default::default()
        })
        .unwrap();
        let (_, leaf) = core
            .complete_attestation(
                &crate::core::testing::test_node(),
                &crate::core::testing::fresh_csr(),
            )
            .unwrap();
        let agent = core
            .authenticate_agent(Some(leaf.chain.first().unwrap()))
            .unwrap();
        let entry = per_instance_entry(&core, &agent, "w");
        let id = "spiffe://example.org/w/0123456789abcdef0123456789abcdef";
        let (token, _) = core
            .mint_jwt_svid(&agent, &entry, id, &["db".to_string()])
            .expect("the audience the policy permits");
        let claims = token.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], json!(["db"]));
        for audience in [vec!["web".to_string()], vec!["db".into(), "web".into()]] {
            let e = core
                .mint_jwt_svid(&agent, &entry, id, &audience)
                .expect_err("an audience the policy does not permit");
            assert_eq!(e.refusal_kind(), Some(RefusalKind::IssuancePolicy), "{e}");
            assert!(e.to_string().contains("no permit policy matches"), "{e}");
        }
    }

    /// One call's CSRs for one entry share its load; an entry the call could not load
    /// is looked up afresh by its next CSR, not refused from memory.
    #[test]
    fn a_call_loads_each_entry_once_and_keeps_no_refusal() {
        let (_dir, core, _, agent) = crate::core::testing::core_with_agent();
        let app = per_instance_entry(&core, &agent, "app");
        let mut memo = EntryMemo::default();
        for segment in [
            "0123456789abcdef0123456789abcdef",
            "fedcba9876543210fedcba9876543210",
        ] {
            let id = format!("spiffe://example.org/app/{segment}");
            let (minted, _) = core
                .sign_workload_svid_in(&mut memo, &agent, &app, &csr_for(&id))
                .unwrap();
            assert_eq!(minted, id);
        }
        assert_eq!(memo.loaded.len(), 1);

        let later_csr = csr_for("spiffe://example.org/later/00000000000000000000000000000001");
        let refused = core.sign_workload_svid_in(&mut memo, &agent, "not-yet", &later_csr);
        assert!(matches!(refused, Err(Error::NotFound(_))), "{refused:?}");
        assert_eq!(memo.loaded.len(), 1);
        // The entry exists by the next CSR of the same call: it is found.
        let later = per_instance_entry(&core, &agent, "later");
        let refused = core.sign_workload_svid_in(
            &mut memo,
            &agent,
            &later,
            &csr_for("spiffe://example.org/app/00000000000000000000000000000002"),
        );
        let Err(e) = refused else {
            panic!("a CSR for another entry's ID was signed")
        };
        assert_eq!(e.refusal_kind(), Some(RefusalKind::CsrNotGranted), "{e}");
        assert!(core
            .sign_workload_svid_in(&mut memo, &agent, &later, &later_csr)
            .is_ok());
        assert_eq!(memo.loaded.len(), 2);
    }
}
