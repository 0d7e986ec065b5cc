//! `ztid-server datastore migrate`: one server's state copied from one store into
//! another that is empty, through the [`DataStore`] trait only (so any store to any
//! store; in practice sled to PostgreSQL).
//!
//! What is copied: registration entries (with their ids and revisions), agents, join
//! tokens (by hash), federation relationships and federated bundles, token-exchange
//! grants and revocations (issue 14), the hardware identifiers recorded with agent
//! bans, the server's CA
//! state (its authorities and bundle sequence, stored under the target's
//! [`DataStore::server_id`]: open the target as the server that will use the keys of
//! the source's data directory) and its audit anchor.
//!
//! Rules:
//! - The target must be empty: no entry, revision, agent, token, federation record,
//!   CA state of any server or audit anchor. Checked before anything is written; a
//!   non-empty target is refused and left as it is.
//! - The source is only read. Everything is read from it before the first write, so
//!   a source that cannot be read leaves the target empty.
//! - Entries are imported in revision order ([`DataStore::import_entry`]), so the
//!   target's change log holds every live entry at its own revision and an agent's
//!   incremental sync since the revision it holds keeps working.
//! - The target's revision ends at the source's: the newest entry is imported at the
//!   source's current revision when that is higher (the source's last changes were
//!   deletions). An agent holds the source's current revision after its last sync;
//!   were the target's counter below it, changes made after the migration with
//!   revisions between the two would be skipped by that agent's next sync. (With no
//!   entry left, a placeholder without selectors is imported at that revision and
//!   deleted.)
//! - Deletions are not copied (the target's log would hold live entries only), so the
//!   target's change log is compacted to its newest change: an agent that syncs since
//!   any older revision gets its whole set, deletions included by omission
//!   ([`DataStore::change_log_floor`]). Agents that had synced the source's last change
//!   keep syncing incrementally.
//!
//! A write that fails half way leaves a partly written target, which a second run
//! refuses as non-empty: empty it (drop and create the database) and run again.

use serde::{Deserialize, Serialize};

use super::{DataStore, EntryFilter};
use crate::{Error, Result};

/// What a migration copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The server id the CA state and audit anchor were stored under.
    pub server_id: String,
    /// Registration entries.
    pub entries: usize,
    /// Agents.
    pub agents: usize,
    /// Join tokens not yet redeemed.
    pub join_tokens: usize,
    /// Federation relationships.
    pub federations: usize,
    /// Federated bundles.
    pub federated_bundles: usize,
    /// Token-exchange grants.
    #[serde(default)]
    pub grants: usize,
    /// Revocations (the kill switch), expired ones included until pruned.
    #[serde(default)]
    pub revocations: usize,
    /// Hardware identifiers recorded with agent bans.
    #[serde(default)]
    pub hardware_bans: usize,
    /// X.509 authorities in the CA state.
    pub x509_authorities: usize,
    /// JWT authorities in the CA state.
    pub jwt_authorities: usize,
    /// Whether an audit anchor was copied.
    pub audit_anchor: bool,
    /// The target's entry revision afterwards (the source's).
    pub revision: u64,
}

/// What a non-empty store holds, as phrases (`"3 entries"`); empty for an empty store.
pub fn contents(store: &dyn DataStore) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut note = |n: usize, what: &str| {
        if n > 0 {
            found.push(format!("{n} {what}"));
        }
    };
    note(store.count_entries()?, "entries");
    note(store.count_agents()?, "agents");
    note(store.list_join_tokens()?.len(), "join tokens");
    note(store.list_federations()?.len(), "federation relationships");
    note(store.list_federated_bundles()?.len(), "federated bundles");
    note(store.list_grants()?.len(), "grants");
    note(store.list_revocations()?.len(), "revocations");
    note(
        store.list_hardware_bans()?.len(),
        "banned hardware identifiers",
    );
    note(store.cluster_ca_states()?.len(), "servers' CA states");
    if store.audit_anchor()?.is_some() {
        found.push("an audit anchor".into());
    }
    let revision = store.current_revision()?;
    if revision > 0 {
        found.push(format!("entry revision {revision}"));
    }
    Ok(found)
}

/// The trust domain a federation or federated bundle record is stored under (both
/// records are JSON objects with a `trust_domain`).
fn trust_domain_of(record: &[u8], what: &str) -> Result<String> {
    #[derive(Deserialize)]
    struct Named {
        trust_domain: String,
    }
    serde_json::from_slice::<Named>(record)
        .map(|n| n.trust_domain)
        .map_err(|e| Error::Internal(format!("a stored {what} record has no trust domain: {e}")))
}

/// The sequence number of an audit anchor record (a JSON object with `seq`).
fn anchor_seq(record: &[u8]) -> Result<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_slice::<Seq>(record)
        .map(|s| s.seq)
        .map_err(|e| Error::Internal(format!("the stored audit anchor has no sequence: {e}")))
}

/// Copies everything from `source` into `target` (see the module docs); refuses a
/// non-empty target before writing anything.
pub fn migrate(source: &dyn DataStore, target: &dyn DataStore) -> Result<MigrationReport> {
    let found = contents(target)?;
    if !found.is_empty() {
        return Err(Error::Precondition(format!(
            "the target datastore is not empty ({}); datastore migrate copies into an empty one only, nothing was written",
            found.join(", ")
        )));
    }

    // Everything read first: a source that cannot be read leaves the target empty.
    // Entries in revision order, found by pages of ids (the records are read one at
    // a time while importing, so a large store is never held in memory twice).
    const PAGE: usize = 1000;
    let mut order: Vec<(u64, String)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = source.list_entries_page(&EntryFilter::default(), after.as_deref(), PAGE)?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        let full = page.len() >= PAGE;
        order.extend(page.into_iter().map(|e| (e.revision, e.id)));
        if !full {
            break;
        }
    }
    order.sort();
    let source_revision = source.current_revision()?;
    let agents = source.list_agents()?;
    let tokens = source.list_join_tokens()?;
    let federations = source
        .list_federations()?
        .into_iter()
        .map(|r| Ok((trust_domain_of(&r, "federation")?, r)))
        .collect::<Result<Vec<_>>>()?;
    let bundles = source
        .list_federated_bundles()?
        .into_iter()
        .map(|r| Ok((trust_domain_of(&r, "federated bundle")?, r)))
        .collect::<Result<Vec<_>>>()?;
    let grants = source.list_grants()?;
    let revocations = source.list_revocations()?;
    let hardware_bans = source.list_hardware_bans()?;
    let ca_state = source.load_ca_state()?;
    let anchor = match source.audit_anchor()? {
        Some(r) => Some((anchor_seq(&r)?, r)),
        None => None,
    };

    let mut report = MigrationReport {
        server_id: target.server_id().to_string(),
        ..MigrationReport::default()
    };
    let last = order.len().saturating_sub(1);
    for (i, (_, id)) in order.iter().enumerate() {
        // An entry deleted since it was listed (a source still in use) is skipped.
        let Some(mut entry) = source.get_entry(id)? else {
            continue;
        };
        if i == last {
            entry.revision = entry.revision.max(source_revision);
        }
        target.import_entry(entry)?;
        report.entries += 1;
    }
    if report.entries == 0 && source_revision > 0 {
        // No entry to carry the source's revision (every one was deleted): a
        // placeholder, with no selector and a parent no agent has, is imported at it
        // and deleted, which leaves the counter at or above it.
        let placeholder = super::EntryRecord {
            id: "0".repeat(32),
            spiffe_id: "spiffe://ztid-migrate.invalid/placeholder".into(),
            parent_id: "spiffe://ztid-migrate.invalid/none".into(),
            selectors: Vec::new(),
            x509_ttl: 0,
            jwt_ttl: 0,
            shared: false,
            dns_names: Vec::new(),
            federates_with: Vec::new(),
            node: false,
            hint: String::new(),
            revision: source_revision,
            created_at: 0,
        };
        let id = placeholder.id.clone();
        target.import_entry(placeholder)?;
        target.delete_entry(&id)?;
    }
    target.compact_change_log(u64::MAX)?;
    for agent in &agents {
        target.put_agent(agent)?;
    }
    report.agents = agents.len();
    for (hash, token) in &tokens {
        target.put_join_token(hash, token)?;
    }
    report.join_tokens = tokens.len();
    for (td, record) in &federations {
        target.put_federation(td, record)?;
    }
    report.federations = federations.len();
    for (td, record) in &bundles {
        target.put_federated_bundle(td, record)?;
    }
    report.federated_bundles = bundles.len();
    for grant in &grants {
        target.put_grant(grant)?;
    }
    report.grants = grants.len();
    for revocation in &revocations {
        target.put_revocation(revocation)?;
    }
    report.revocations = revocations.len();
    target.put_hardware_bans(&hardware_bans)?;
    report.hardware_bans = hardware_bans.len();
    if let Some(state) = &ca_state {
        target.store_ca_state(state)?;
        report.x509_authorities = state.x509.len();
        report.jwt_authorities = state.jwt.len();
    }
    if let Some((seq, record)) = &anchor {
        report.audit_anchor = target.advance_audit_anchor(*seq, record)?;
    }
    target.flush()?;
    report.revision = target.current_revision()?;
    Ok(report)
}
