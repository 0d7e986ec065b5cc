//! An agent's entry sync: everything on first sync or when its aliases changed,
//! else only the changes of its parents' entries since the revision it holds.

use super::{now, AuthenticatedAgent, CaCore};
use crate::datastore::EntryRecord;
use crate::Result;

impl CaCore {
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
