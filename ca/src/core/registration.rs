//! Operator changes to what may attest and mint: join tokens, registration entries,
//! evicting and banning agents.

use serde_json::json;
use ztid_verifier::join_token;

use super::{now, CaCore};
use crate::authority::random_hex;
use crate::datastore::{AgentRecord, EntryRecord, HardwareBanRecord, JoinTokenRecord};
use crate::entries::validate_new_entry;
use crate::{Error, Result};

impl CaCore {
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
            return Err(Error::InvalidInput(
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
        let record = validate_new_entry(
            &self.trust_domain,
            req,
            self.config.ca_ttl_seconds,
            &self.server_dns_names,
            now(),
        )?;
        let record = self.store.create_entry(record)?;
        crate::metrics::entries_changed(1);
        self.store.flush()?;
        self.record(json!({"type": "entry_created", "entry": record.id, "spiffe_id": record.spiffe_id,
            "parent_id": record.parent_id, "selectors": record.selectors, "revision": record.revision}))?;
        tracing::info!(event = "entry_created", entry = %record.id, spiffe_id = %record.spiffe_id, parent = %record.parent_id, "registration entry created");
        Ok(record)
    }

    /// Replaces the entry `req.id` by `req` (every other field checked as for a new
    /// entry); it keeps its id and creation time and gets a new revision.
    pub fn update_entry(&self, req: &ztid_proto::node::Entry) -> Result<EntryRecord> {
        crate::limits::check_len(
            "entry id (bytes)",
            &req.id,
            crate::limits::MAX_OBJECT_ID_BYTES,
        )?;
        if req.id.is_empty() {
            return Err(Error::InvalidInput(
                "an update names the entry it replaces (id)".into(),
            ));
        }
        let mut record = validate_new_entry(
            &self.trust_domain,
            req,
            self.config.ca_ttl_seconds,
            &self.server_dns_names,
            now(),
        )?;
        record.id = req.id.clone();
        let record = self.store.update_entry(record).map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(format!("entry {} does not exist", req.id)),
            other => other,
        })?;
        self.store.flush()?;
        self.record(json!({"type": "entry_updated", "entry": record.id, "spiffe_id": record.spiffe_id,
            "parent_id": record.parent_id, "selectors": record.selectors, "revision": record.revision}))?;
        tracing::info!(event = "entry_updated", entry = %record.id, spiffe_id = %record.spiffe_id, parent = %record.parent_id, "registration entry updated");
        Ok(record)
    }

    /// Validates and stores each entry of a batch on its own: one result per entry, in
    /// order; a refused entry stores nothing and does not stop the others. One flush
    /// for the batch, then one audit record per entry stored, as for single creates.
    pub fn create_entries(
        &self,
        reqs: &[ztid_proto::node::Entry],
    ) -> Result<Vec<Result<EntryRecord>>> {
        check_entry_batch(reqs.len())?;
        let server_dns_names = &self.server_dns_names;
        let results: Vec<Result<EntryRecord>> = reqs
            .iter()
            .map(|req| {
                let record = validate_new_entry(
                    &self.trust_domain,
                    req,
                    self.config.ca_ttl_seconds,
                    server_dns_names,
                    now(),
                )?;
                self.store.create_entry(record)
            })
            .collect();
        let created = results.iter().filter(|r| r.is_ok()).count();
        if created > 0 {
            crate::metrics::entries_changed(i64::try_from(created).unwrap_or(i64::MAX));
            self.store.flush()?;
        }
        for record in results.iter().flatten() {
            self.record(json!({"type": "entry_created", "entry": record.id, "spiffe_id": record.spiffe_id,
                "parent_id": record.parent_id, "selectors": record.selectors, "revision": record.revision,
                "batch": true}))?;
        }
        tracing::info!(
            event = "entries_created",
            created,
            refused = reqs.len() - created,
            "registration entries created in a batch"
        );
        Ok(results)
    }

    /// Deletes each entry of a batch on its own: one result per id, in order. One flush
    /// for the batch, then one audit record per entry deleted.
    pub fn delete_entries(&self, ids: &[String]) -> Result<Vec<Result<EntryRecord>>> {
        check_entry_batch(ids.len())?;
        let results: Vec<Result<EntryRecord>> = ids
            .iter()
            .map(|id| {
                crate::limits::check_len(
                    "entry id (bytes)",
                    id,
                    crate::limits::MAX_OBJECT_ID_BYTES,
                )?;
                self.store
                    .delete_entry(id)?
                    .ok_or_else(|| Error::NotFound(format!("entry {id} does not exist")))
            })
            .collect();
        let deleted = results.iter().filter(|r| r.is_ok()).count();
        if deleted > 0 {
            crate::metrics::entries_changed(-i64::try_from(deleted).unwrap_or(i64::MAX));
            self.store.flush()?;
        }
        for e in results.iter().flatten() {
            self.record(json!({"type": "entry_deleted", "entry": e.id, "spiffe_id": e.spiffe_id, "batch": true}))?;
        }
        tracing::info!(
            event = "entries_deleted",
            deleted,
            refused = ids.len() - deleted,
            "registration entries deleted in a batch"
        );
        Ok(results)
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

    /// Evicts an agent: its next call fails; it must attest again. Evicting a banned
    /// agent lifts its ban: its SPIFFE ID and the hardware identifiers recorded with
    /// the ban may attest again.
    pub fn evict_agent(&self, id: &str) -> Result<AgentRecord> {
        crate::entries::parse_id(&self.trust_domain, "agent", id)?;
        // The hardware identifiers first: were the record removed first and this failed,
        // the node would stay refused by its hardware with no ban left to evict.
        let lifted = self.store.delete_hardware_bans(id)?;
        let a = self
            .store
            .delete_agent(id)?
            .ok_or_else(|| Error::NotFound(format!("agent {id} does not exist")))?;
        self.store.flush()?;
        self.record(
            json!({"type": "agent_evicted", "agent": id, "was_banned": a.banned,
            "hardware_bans_lifted": lifted}),
        )?;
        tracing::warn!(event = "agent_evicted", agent = %id, was_banned = a.banned,
            hardware_bans_lifted = lifted, "agent evicted");
        Ok(a)
    }

    /// Records `identifiers` (hardware identifiers) with the ban of agent `id`.
    fn record_hardware_bans(&self, id: &str, identifiers: &[String], at: i64) -> Result<()> {
        if identifiers.is_empty() {
            return Ok(());
        }
        let bans: Vec<HardwareBanRecord> = identifiers
            .iter()
            .map(|identifier| HardwareBanRecord {
                identifier: identifier.clone(),
                agent: id.to_string(),
                banned_at: at,
            })
            .collect();
        self.store.put_hardware_bans(&bans)
    }

    /// Bans an agent: its next call fails and it cannot attest again, under its SPIFFE
    /// ID or under any other proving the same hardware: the hardware identifiers its
    /// attestation proved (a TPM's EK hashes, an SEV-SNP guest's vTPM EK hash as the
    /// same `tpm:ek-hash:`; see [`super::attestation::HARDWARE_IDENTIFIERS`]) are
    /// recorded with the ban, and a node proving one is refused whatever its method
    /// (`multi` included). Banning a banned agent records them again. `agent show`
    /// lists them (`Agent.banned_hardware`).
    pub fn ban_agent(&self, id: &str) -> Result<AgentRecord> {
        crate::entries::parse_id(&self.trust_domain, "agent", id)?;
        let t = now();
        // The hardware identifiers are recorded before the ban by ID (a node attesting
        // under another ID in between is refused already), and again when a write in
        // between changed the selectors. Should they not fit (the table's bound), the
        // agent is still banned by ID and the call says what was not recorded.
        let mut recorded: Option<Vec<ztid_spiffe::Selector>> = None;
        let mut identifiers = Vec::new();
        let mut hardware_error = None;
        // Compare-and-swap on the record read, so a write in between (a sync, a
        // renewal, an eviction) is neither undone nor undoes the ban: read again.
        let mut tries = 0;
        let a = loop {
            let Some(current) = self.store.get_agent(id)? else {
                if recorded.is_some() {
                    // Evicted meanwhile: nothing is banned, so nothing stays recorded.
                    self.store.delete_hardware_bans(id)?;
                }
                return Err(Error::NotFound(format!("agent {id} does not exist")));
            };
            if recorded.as_ref() != Some(&current.selectors) {
                identifiers = super::attestation::hardware_identifiers(&current.selectors);
                hardware_error = self.record_hardware_bans(id, &identifiers, t).err();
                recorded = Some(current.selectors.clone());
            }
            if current.banned {
                break current;
            }
            let mut a = current.clone();
            a.banned = true;
            if self
                .store
                .compare_and_swap_agent(id, Some(&current), Some(&a))?
            {
                break a;
            }
            tries += 1;
            if tries >= super::agent_auth::AGENT_UPDATE_TRIES {
                // Not banned: the identifiers recorded for this ban are lifted again.
                self.store.delete_hardware_bans(id)?;
                return Err(super::agent_auth::agent_update_contended(id));
            }
        };
        self.store.flush()?;
        self.record(json!({"type": "agent_banned", "agent": id,
            "hardware_identifiers": identifiers,
            "hardware_identifiers_recorded": hardware_error.is_none()}))?;
        tracing::warn!(event = "agent_banned", agent = %id, hardware_identifiers = ?identifiers,
            "agent banned");
        if let Some(e) = hardware_error {
            return Err(match e {
                Error::Precondition(why) => Error::Precondition(format!(
                    "agent {id} is banned by its SPIFFE ID, but the hardware identifiers its \
                     attestation proved were not recorded: {why}"
                )),
                other => other,
            });
        }
        Ok(a)
    }
}

/// Most entries in one `BatchCreateEntries` or `BatchDeleteEntries` call (the CLI sends
/// a large file in several).
pub const MAX_ENTRY_BATCH: usize = 1000;

fn check_entry_batch(count: usize) -> Result<()> {
    crate::limits::check_count("entries in one batch", count, MAX_ENTRY_BATCH)
}
