//! The embedded datastore: sled 0.34 trees with secondary indexes, updated together
//! in one transaction so an index never points at a missing entry.

use std::ops::Bound;
use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::broadcast;

use super::{
    change_channel, duplicate_entry, identity_key, AgentRecord, CaState, ChangeTopic, DataStore,
    EntryChange, EntryFilter, EntryRecord, JoinTokenRecord, LeaderGuard,
};
use super::{
    too_many_admin_revocations, too_many_grants, too_many_hardware_bans, too_many_revocations,
    GrantRecord, HardwareBanRecord, RevocationKind, RevocationRecord,
};
use crate::limits::{MAX_GRANTS, MAX_HARDWARE_BANS, MAX_REVOCATIONS};
use crate::{Error, Result, StoreError};

/// Sled-backed [`DataStore`].
pub struct SledStore {
    db: sled::Db,
    entries: Tree,
    by_parent: Tree,
    by_spiffe_id: Tree,
    by_identity: Tree,
    node_entries: Tree,
    entry_log: Tree,
    entry_log_by_parent: Tree,
    agents: Tree,
    tokens: Tree,
    meta: Tree,
    /// Token-exchange grants (by id) and revocations (by kind and target), with their
    /// counts: each bounded, and counting a sled tree reads all of it.
    grants: CountedTree,
    revocations: CountedTree,
    /// Admin credential revocations, apart (see `DataStore::put_revocation`).
    admin_revocations: CountedTree,
    /// Hardware identifiers recorded with agent bans, by identifier and agent.
    hardware_bans: CountedTree,
    /// Entry writes one at a time, so revisions commit in the order they are drawn: a
    /// sync that has seen revision N must never later meet an N-1 committed after it.
    entry_writes: std::sync::Mutex<()>,
    /// The server this store belongs to (one store, one server).
    server_id: String,
    /// Change notifications, sent after each write.
    changes: broadcast::Sender<ChangeTopic>,
}

/// A tree whose writers go one at a time and keep its length (counted once, on the
/// first write after opening).
struct CountedTree {
    tree: Tree,
    len: std::sync::Mutex<Option<usize>>,
}

impl CountedTree {
    fn new(tree: Tree) -> Self {
        Self {
            tree,
            len: std::sync::Mutex::new(None),
        }
    }

    /// Runs `write` with the tree and its length, one writer at a time; `write`
    /// returns the length after it.
    fn write<T>(&self, write: impl FnOnce(&Tree, usize) -> Result<(T, usize)>) -> Result<T> {
        let mut len = self
            .len
            .lock()
            .map_err(|_| Error::Internal("datastore count lock poisoned".into()))?;
        let current = match *len {
            Some(n) => n,
            None => self.tree.len(),
        };
        // Unknown again if the write fails half way: recounted by the next one.
        *len = None;
        let (out, after) = write(&self.tree, current)?;
        *len = Some(after);
        Ok(out)
    }

    /// Inserts `value` under `key`, refused by `full()` when the key is new and
    /// `max` records exist.
    fn put(&self, key: &[u8], value: Vec<u8>, max: usize, full: fn() -> Error) -> Result<()> {
        self.write(|tree, n| {
            let new = !tree.contains_key(key)?;
            if new && n >= max {
                return Err(full());
            }
            tree.insert(key, value)?;
            Ok(((), if new { n + 1 } else { n }))
        })
    }

    fn remove(&self, key: &[u8]) -> Result<Option<sled::IVec>> {
        self.write(|tree, n| {
            let removed = tree.remove(key)?;
            let after = if removed.is_some() {
                n.saturating_sub(1)
            } else {
                n
            };
            Ok((removed, after))
        })
    }

    fn values<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<T>> {
        self.tree
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }
}

/// Meta key: the entry-log revision through which the by-parent log is complete.
const BY_PARENT_THROUGH_KEY: &[u8] = b"entry_log_by_parent_through";

const CA_STATE_KEY: &[u8] = b"ca_state";

/// Meta key: the last bundle sequence number handed out (big-endian).
const BUNDLE_SEQUENCE_KEY: &[u8] = b"bundle_sequence";

/// Meta key: the audit anchor, stored as the record's sequence number (big-endian)
/// followed by the record, so that "only forward" is one compare-and-swap.
const AUDIT_ANCHOR_KEY: &[u8] = b"audit_anchor";

fn anchor_value(seq: u64, record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + record.len());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(record);
    v
}

fn anchor_seq(value: &[u8]) -> Result<u64> {
    split_anchor(value).map(|(seq, _)| seq)
}

/// A stored anchor: its sequence number (8 bytes, big-endian) and the record after it.
fn split_anchor(value: &[u8]) -> Result<(u64, &[u8])> {
    value
        .split_first_chunk::<8>()
        .map(|(seq, record)| (u64::from_be_bytes(*seq), record))
        .ok_or_else(|| Error::Store(StoreError::Corrupt("corrupt audit anchor".into())))
}

fn index_key(a: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + id.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn prefix(a: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k
}

/// Meta key of [`DataStore::change_log_floor`].
const CHANGE_LOG_FLOOR: &[u8] = b"change_log_floor";

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

/// Key of a change in the by-parent log: the parent, NUL, the revision (big-endian), so
/// one parent's changes after a revision are one range scan.
fn parent_log_key(parent: &str, revision: u64) -> Vec<u8> {
    let mut k = prefix(parent);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

fn log_change(
    log: &TransactionalTree,
    by_parent: &TransactionalTree,
    change: &EntryChange,
) -> std::result::Result<(), ConflictableTransactionError<Error>> {
    let bytes = serde_json::to_vec(change).map_err(|e| abort(e.into()))?;
    log.insert(&change.revision.to_be_bytes(), bytes.clone())?;
    by_parent.insert(parent_log_key(&change.parent_id, change.revision), bytes)?;
    Ok(())
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Store(StoreError::Corrupt(format!("corrupt {what}"))))?;
    Ok(u64::from_be_bytes(b))
}

impl SledStore {
    /// The server id of a store opened with [`SledStore::open`].
    pub const DEFAULT_SERVER_ID: &'static str = "local";

    /// Opens (creating) the store in `dir`, for the server [`Self::DEFAULT_SERVER_ID`].
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_as(dir, Self::DEFAULT_SERVER_ID)
    }

    /// Opens (creating) the store in `dir` for the server `server_id` (what
    /// [`DataStore::server_id`] and [`DataStore::cluster_ca_states`] name it).
    pub fn open_as(dir: &Path, server_id: &str) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|source| {
                Error::Store(StoreError::Open {
                    path: dir.display().to_string(),
                    source,
                })
            })?;
        let store = Self {
            entries: db.open_tree("entries")?,
            by_parent: db.open_tree("entries_by_parent")?,
            by_spiffe_id: db.open_tree("entries_by_spiffe_id")?,
            by_identity: db.open_tree("entries_by_identity")?,
            node_entries: db.open_tree("node_entries")?,
            entry_log: db.open_tree("entry_log")?,
            entry_log_by_parent: db.open_tree("entry_log_by_parent")?,
            agents: db.open_tree("agents")?,
            tokens: db.open_tree("join_tokens")?,
            meta: db.open_tree("meta")?,
            grants: CountedTree::new(db.open_tree("grants")?),
            revocations: CountedTree::new(db.open_tree("revocations")?),
            admin_revocations: CountedTree::new(db.open_tree("admin_revocations")?),
            hardware_bans: CountedTree::new(db.open_tree("hardware_bans")?),
            entry_writes: std::sync::Mutex::new(()),
            server_id: server_id.to_string(),
            changes: change_channel(),
            db,
        };
        store.index_old_change_log()?;
        Ok(store)
    }

    /// Indexes by parent every change-log record the by-parent log may lack: all of them
    /// for data written before it existed, and those an older binary wrote after a
    /// downgrade. Both logs are written in one transaction from then on, so on each open
    /// the meta record is brought up to the log's last revision.
    fn index_old_change_log(&self) -> Result<()> {
        let through = match self.meta.get(BY_PARENT_THROUGH_KEY)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                Error::Store(StoreError::Corrupt("corrupt by-parent log marker".into()))
            })?),
            None => 0,
        };
        let mut batch = sled::Batch::default();
        let mut last = through;
        let mut indexed = 0usize;
        for kv in self
            .entry_log
            .range(through.saturating_add(1).to_be_bytes()..)
        {
            let (_, v) = kv?;
            let change: EntryChange = serde_json::from_slice(&v)?;
            batch.insert(parent_log_key(&change.parent_id, change.revision), v);
            last = last.max(change.revision);
            indexed += 1;
        }
        if indexed > 0 {
            self.entry_log_by_parent.apply_batch(batch)?;
            tracing::info!(
                records = indexed,
                "indexed entry change-log records by parent"
            );
        }
        if last != through || self.meta.get(BY_PARENT_THROUGH_KEY)?.is_none() {
            self.meta
                .insert(BY_PARENT_THROUGH_KEY, &last.to_be_bytes())?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn write_lock(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.entry_writes
            .lock()
            .map_err(|_| Error::Internal("entry write lock poisoned".into()))
    }
    /// The next entry revision; the caller holds the entry write lock.
    fn next_revision(&self) -> Result<u64> {
        // generate_id is monotonic across restarts; +1 keeps 0 meaning "nothing yet".
        // Above the log's last revision too: an imported entry keeps its own revision,
        // which generate_id knows nothing about.
        Ok((self.db.generate_id()? + 1).max(self.current_revision()? + 1))
    }

    fn notify(&self, topic: ChangeTopic) {
        // No receiver is not an error: nobody is listening.
        let _ = self.changes.send(topic);
    }

    /// Entries of one index (`tree`, keyed `value NUL id`) for `key`, with an id after
    /// `after`, in id order, at most `limit` of those `keep` accepts.
    fn entries_page_by_index(
        &self,
        tree: &Tree,
        key: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&EntryRecord) -> bool,
    ) -> Result<Vec<EntryRecord>> {
        let p = prefix(key);
        let start = match after {
            Some(a) => Bound::Excluded(index_key(key, a)),
            None => Bound::Included(p.clone()),
        };
        let mut end = key.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for kv in tree.range((start, Bound::Excluded(end))) {
            if out.len() >= limit {
                break;
            }
            let (k, _) = kv?;
            let Some(id) = k.strip_prefix(p.as_slice()) else {
                continue;
            };
            if let Some(v) = self.entries.get(id)? {
                let e: EntryRecord = serde_json::from_slice(&v)?;
                if keep(&e) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Writes `entry` with its indexes and `changes` in one transaction, replacing
    /// `old` (its indexes removed) if given. Refuses a duplicate identity.
    fn write_entry(
        &self,
        entry: &EntryRecord,
        old: Option<&EntryRecord>,
        changes: &[EntryChange],
    ) -> Result<()> {
        let value = serde_json::to_vec(entry)?;
        let ident = identity_key(entry);
        let old_ident = old.map(identity_key);
        (
            &self.entries,
            &self.by_parent,
            &self.by_spiffe_id,
            &self.by_identity,
            &self.node_entries,
            &self.entry_log,
            &self.entry_log_by_parent,
        )
            .transaction(
                |(entries, by_parent, by_spiffe, by_ident, nodes, log, log_by_parent)| {
                    if let Some(existing) = by_ident.get(&ident)? {
                        if existing.as_ref() != entry.id.as_bytes() {
                            return Err(abort(duplicate_entry(&String::from_utf8_lossy(
                                &existing,
                            ))));
                        }
                    }
                    if old.is_none() && entries.get(entry.id.as_bytes())?.is_some() {
                        return Err(abort(Error::AlreadyExists(format!(
                            "an entry with id {} exists",
                            entry.id
                        ))));
                    }
                    if let (Some(old), Some(old_ident)) = (old, &old_ident) {
                        by_parent.remove(index_key(&old.parent_id, &old.id))?;
                        by_spiffe.remove(index_key(&old.spiffe_id, &old.id))?;
                        by_ident.remove(old_ident.as_slice())?;
                        nodes.remove(old.id.as_bytes())?;
                    }
                    entries.insert(entry.id.as_bytes(), value.clone())?;
                    by_parent.insert(index_key(&entry.parent_id, &entry.id), &[])?;
                    by_spiffe.insert(index_key(&entry.spiffe_id, &entry.id), &[])?;
                    by_ident.insert(ident.clone(), entry.id.as_bytes())?;
                    if entry.node {
                        nodes.insert(entry.id.as_bytes(), &[])?;
                    }
                    for change in changes {
                        log_change(log, log_by_parent, change)?;
                    }
                    Ok(())
                },
            )?;
        Ok(())
    }

    fn entries_by_index(&self, tree: &Tree, key: &str) -> Result<Vec<EntryRecord>> {
        let mut out = Vec::new();
        let p = prefix(key);
        for kv in tree.scan_prefix(&p) {
            let (k, _) = kv?;
            // scan_prefix yields only keys that start with p.
            let Some(id) = k.strip_prefix(p.as_slice()) else {
                continue;
            };
            if let Some(v) = self.entries.get(id)? {
                out.push(serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }
}

impl DataStore for SledStore {
    fn server_id(&self) -> &str {
        &self.server_id
    }

    fn create_entry(&self, mut entry: EntryRecord) -> Result<EntryRecord> {
        let _ordered = self.write_lock()?;
        entry.revision = self.next_revision()?;
        let change = EntryChange {
            revision: entry.revision,
            entry_id: entry.id.clone(),
            parent_id: entry.parent_id.clone(),
            node: entry.node,
            deleted: false,
        };
        self.write_entry(&entry, None, &[change])?;
        self.notify(ChangeTopic::Entries);
        Ok(entry)
    }

    fn update_entry(&self, mut entry: EntryRecord) -> Result<EntryRecord> {
        let _ordered = self.write_lock()?;
        // Entry writes hold the lock: the entry read here is the one replaced.
        let old = self
            .get_entry(&entry.id)?
            .ok_or_else(|| Error::NotFound(format!("no entry {}", entry.id)))?;
        let mut changes = Vec::with_capacity(2);
        if old.parent_id != entry.parent_id {
            changes.push(EntryChange {
                revision: self.next_revision()?,
                entry_id: old.id.clone(),
                parent_id: old.parent_id.clone(),
                node: old.node,
                deleted: true,
            });
        }
        // generate_id only grows: above the deletion's revision.
        entry.revision = self.next_revision()?;
        entry.created_at = old.created_at;
        changes.push(EntryChange {
            revision: entry.revision,
            entry_id: entry.id.clone(),
            parent_id: entry.parent_id.clone(),
            node: entry.node,
            deleted: false,
        });
        self.write_entry(&entry, Some(&old), &changes)?;
        self.notify(ChangeTopic::Entries);
        Ok(entry)
    }

    fn import_entry(&self, entry: EntryRecord) -> Result<()> {
        let _ordered = self.write_lock()?;
        let current = self.current_revision()?;
        if entry.revision <= current {
            return Err(Error::Precondition(format!(
                "cannot import entry {} at revision {}: the store is at revision {current}",
                entry.id, entry.revision
            )));
        }
        let change = EntryChange {
            revision: entry.revision,
            entry_id: entry.id.clone(),
            parent_id: entry.parent_id.clone(),
            node: entry.node,
            deleted: false,
        };
        self.write_entry(&entry, None, &[change])?;
        self.notify(ChangeTopic::Entries);
        Ok(())
    }

    fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        match self.entries.get(id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn delete_entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let _ordered = self.write_lock()?;
        let revision = self.next_revision()?;
        let removed = (
            &self.entries,
            &self.by_parent,
            &self.by_spiffe_id,
            &self.by_identity,
            &self.node_entries,
            &self.entry_log,
            &self.entry_log_by_parent,
        )
            .transaction(
                |(entries, by_parent, by_spiffe, by_ident, nodes, log, log_by_parent)| {
                    let Some(v) = entries.remove(id.as_bytes())? else {
                        return Ok(None);
                    };
                    let entry: EntryRecord =
                        serde_json::from_slice(&v).map_err(|e| abort(e.into()))?;
                    by_parent.remove(index_key(&entry.parent_id, &entry.id))?;
                    by_spiffe.remove(index_key(&entry.spiffe_id, &entry.id))?;
                    by_ident.remove(identity_key(&entry))?;
                    nodes.remove(entry.id.as_bytes())?;
                    log_change(
                        log,
                        log_by_parent,
                        &EntryChange {
                            revision,
                            entry_id: entry.id.clone(),
                            parent_id: entry.parent_id.clone(),
                            node: entry.node,
                            deleted: true,
                        },
                    )?;
                    Ok(Some(entry))
                },
            )?;
        if removed.is_some() {
            self.notify(ChangeTopic::Entries);
        }
        Ok(removed)
    }

    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<EntryRecord>> {
        let mut out = match (&filter.parent_id, &filter.spiffe_id) {
            (Some(p), _) => self.entries_by_index(&self.by_parent, p)?,
            (None, Some(s)) => self.entries_by_index(&self.by_spiffe_id, s)?,
            (None, None) => self
                .entries
                .iter()
                .values()
                .map(|v| Ok(serde_json::from_slice(&v?)?))
                .collect::<Result<Vec<_>>>()?,
        };
        if let Some(s) = &filter.spiffe_id {
            out.retain(|e| &e.spiffe_id == s);
        }
        out.sort_by(|a, b| (&a.spiffe_id, a.revision).cmp(&(&b.spiffe_id, b.revision)));
        Ok(out)
    }

    fn list_entries_page(
        &self,
        filter: &EntryFilter,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>> {
        match (&filter.parent_id, &filter.spiffe_id) {
            (Some(p), spiffe) => {
                self.entries_page_by_index(&self.by_parent, p, after_id, limit, |e| {
                    spiffe.as_ref().is_none_or(|s| &e.spiffe_id == s)
                })
            }
            (None, Some(s)) => {
                self.entries_page_by_index(&self.by_spiffe_id, s, after_id, limit, |_| true)
            }
            (None, None) => {
                let start = match after_id {
                    Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
                    None => Bound::Unbounded,
                };
                self.entries
                    .range((start, Bound::Unbounded))
                    .values()
                    .take(limit)
                    .map(|v| Ok(serde_json::from_slice(&v?)?))
                    .collect()
            }
        }
    }

    fn node_entries(&self) -> Result<Vec<EntryRecord>> {
        let mut out = Vec::new();
        for k in self.node_entries.iter().keys() {
            if let Some(v) = self.entries.get(k?)? {
                out.push(serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }

    fn count_entries(&self) -> Result<usize> {
        Ok(self.entries.len())
    }

    fn entry_changes_since(&self, revision: u64) -> Result<Vec<EntryChange>> {
        let start = revision.saturating_add(1).to_be_bytes();
        self.entry_log
            .range(start..)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn entry_changes_for_parent_since(
        &self,
        parent_id: &str,
        revision: u64,
    ) -> Result<Vec<EntryChange>> {
        let start = parent_log_key(parent_id, revision.saturating_add(1));
        let mut end = parent_id.as_bytes().to_vec();
        end.push(1);
        self.entry_log_by_parent
            .range(start..end)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn change_log_floor(&self) -> Result<u64> {
        match self.meta.get(CHANGE_LOG_FLOOR)? {
            Some(v) => be_u64(&v, "change log floor"),
            None => Ok(0),
        }
    }

    fn compact_change_log(&self, below: u64) -> Result<u64> {
        // The newest change stays: its key is the current revision.
        let below = below.min(self.current_revision()?);
        if below <= self.change_log_floor()?.saturating_add(1) {
            return Ok(0);
        }
        // The floor first: a reader that misses a change removed below has read the
        // changes before reading the floor, so it sees the raised floor (sled orders
        // the two writes for readers in this process) and answers in full.
        let floor = below - 1;
        self.meta.update_and_fetch(CHANGE_LOG_FLOOR, |old| {
            let old = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            Some(old.unwrap_or(0).max(floor).to_be_bytes().to_vec())
        })?;
        let mut removed = 0;
        loop {
            let batch: Vec<(sled::IVec, sled::IVec)> = self
                .entry_log
                .range(..below.to_be_bytes())
                .take(1000)
                .collect::<std::result::Result<_, _>>()?;
            if batch.is_empty() {
                return Ok(removed);
            }
            let mut log = sled::Batch::default();
            let mut by_parent = sled::Batch::default();
            for (key, value) in &batch {
                let change: EntryChange = serde_json::from_slice(value)?;
                log.remove(key);
                by_parent.remove(parent_log_key(&change.parent_id, change.revision));
            }
            // By-parent first: a change is never in that index without its log record.
            self.entry_log_by_parent.apply_batch(by_parent)?;
            self.entry_log.apply_batch(log)?;
            removed += batch.len() as u64;
        }
    }

    fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        let mut removed = 0;
        for (hash, token) in self.list_join_tokens()? {
            if token.expires_at < before && self.tokens.remove(hash)?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn current_revision(&self) -> Result<u64> {
        match self.entry_log.last()? {
            Some((k, _)) => {
                let bytes: [u8; 8] = k.as_ref().try_into().map_err(|_| {
                    Error::Store(StoreError::Corrupt("corrupt entry log key".into()))
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
            None => Ok(0),
        }
    }

    fn put_agent(&self, agent: &AgentRecord) -> Result<()> {
        let old = self
            .agents
            .insert(agent.spiffe_id.as_bytes(), serde_json::to_vec(agent)?)?;
        // What another server acts on: a new agent, a ban or unban, a new SVID.
        let notable = match old {
            None => true,
            Some(v) => {
                let old: AgentRecord = serde_json::from_slice(&v)?;
                old.banned != agent.banned || old.serial != agent.serial
            }
        };
        if notable {
            self.notify(ChangeTopic::Agents);
        }
        Ok(())
    }

    fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        match self.agents.get(spiffe_id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn delete_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        match self.agents.remove(spiffe_id.as_bytes())? {
            Some(v) => {
                self.notify(ChangeTopic::Agents);
                Ok(Some(serde_json::from_slice(&v)?))
            }
            None => Ok(None),
        }
    }

    fn compare_and_swap_agent(
        &self,
        spiffe_id: &str,
        expected: Option<&AgentRecord>,
        new: Option<&AgentRecord>,
    ) -> Result<bool> {
        super::check_cas_agent_id(spiffe_id, new)?;
        let key = spiffe_id.as_bytes();
        let new_bytes = new.map(serde_json::to_vec).transpose()?;
        loop {
            // Compared as records, swapped on the exact bytes read: a record written by
            // an older version (fields defaulted on reading) still compares equal, and
            // any write in between makes the swap fail.
            let raw = self.agents.get(key)?;
            let current: Option<AgentRecord> = raw
                .as_ref()
                .map(|v| serde_json::from_slice(v))
                .transpose()?;
            if current.as_ref() != expected {
                return Ok(false);
            }
            if self
                .agents
                .compare_and_swap(key, raw.as_ref(), new_bytes.clone())?
                .is_ok()
            {
                break;
            }
            // Changed between the read and the swap: compare again.
        }
        if super::agent_change_notable(expected, new) {
            self.notify(ChangeTopic::Agents);
        }
        Ok(true)
    }

    fn list_agents_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<AgentRecord>> {
        let start = match after {
            Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.agents
            .range((start, Bound::Unbounded))
            .values()
            .take(limit)
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn count_agents(&self) -> Result<usize> {
        Ok(self.agents.len())
    }

    fn put_join_token(&self, hash: &[u8; 32], token: &JoinTokenRecord) -> Result<()> {
        self.tokens.insert(hash, serde_json::to_vec(token)?)?;
        Ok(())
    }

    fn take_join_token(&self, hash: &[u8; 32]) -> Result<Option<JoinTokenRecord>> {
        match self.tokens.remove(hash)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn list_join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRecord)>> {
        self.tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let hash: [u8; 32] = k.as_ref().try_into().map_err(|_| {
                    Error::Store(StoreError::Corrupt("corrupt join token key".into()))
                })?;
                Ok((hash, serde_json::from_slice(&v)?))
            })
            .collect()
    }

    fn load_ca_state(&self) -> Result<Option<CaState>> {
        match self.meta.get(CA_STATE_KEY)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn store_ca_state(&self, state: &CaState) -> Result<()> {
        if let Some(at) = self.load_ca_state()?.and_then(|s| s.retired_at) {
            return Err(super::retired_refusal(&self.server_id, at));
        }
        self.meta.insert(CA_STATE_KEY, serde_json::to_vec(state)?)?;
        self.db.flush()?;
        self.notify(ChangeTopic::Authorities);
        Ok(())
    }

    fn compare_and_swap_peer_ca_state(
        &self,
        server_id: &str,
        _expected: &CaState,
        _new: &CaState,
    ) -> Result<bool> {
        Err(Error::Precondition(format!(
            "a sled datastore holds one server ({}): there is no server {server_id} to change",
            self.server_id
        )))
    }

    fn cluster_ca_states(&self) -> Result<Vec<(String, CaState)>> {
        Ok(self
            .load_ca_state()?
            .map(|s| (self.server_id.clone(), s))
            .into_iter()
            .collect())
    }

    fn next_bundle_sequence(&self) -> Result<u64> {
        let floor = self.load_ca_state()?.map_or(0, |s| s.bundle_sequence);
        loop {
            let current = self.meta.get(BUNDLE_SEQUENCE_KEY)?;
            let last = match &current {
                Some(v) => be_u64(v, "bundle sequence")?,
                None => 0,
            };
            let next = last.max(floor) + 1;
            let swapped = self.meta.compare_and_swap(
                BUNDLE_SEQUENCE_KEY,
                current,
                Some(&next.to_be_bytes()[..]),
            )?;
            if swapped.is_ok() {
                // Durable before anyone publishes it: never handed out twice.
                self.db.flush()?;
                return Ok(next);
            }
        }
    }

    fn try_leader(&self, _name: &str) -> Result<Option<LeaderGuard>> {
        // One server: nobody to share the role with.
        Ok(Some(LeaderGuard::always()))
    }

    fn subscribe_changes(&self) -> broadcast::Receiver<ChangeTopic> {
        self.changes.subscribe()
    }

    fn audit_anchor(&self) -> Result<Option<Vec<u8>>> {
        match self.meta.get(AUDIT_ANCHOR_KEY)? {
            Some(v) => {
                let (_, record) = split_anchor(&v)?;
                Ok(Some(record.to_vec()))
            }
            None => Ok(None),
        }
    }

    fn advance_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<bool> {
        loop {
            let current = self.meta.get(AUDIT_ANCHOR_KEY)?;
            if let Some(c) = &current {
                if anchor_seq(c)? > seq {
                    return Ok(false);
                }
            }
            let swapped = self.meta.compare_and_swap(
                AUDIT_ANCHOR_KEY,
                current,
                Some(anchor_value(seq, record)),
            )?;
            if swapped.is_ok() {
                return Ok(true);
            }
        }
    }

    fn replace_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<()> {
        self.meta
            .insert(AUDIT_ANCHOR_KEY, anchor_value(seq, record))?;
        self.db.flush()?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn put_federated_bundle(&self, trust_domain: &str, record: &[u8]) -> Result<()> {
        self.db
            .open_tree("federated_bundles")?
            .insert(trust_domain.as_bytes(), record)?;
        self.notify(ChangeTopic::Federation);
        Ok(())
    }

    fn get_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .open_tree("federated_bundles")?
            .get(trust_domain.as_bytes())?
            .map(|v| v.to_vec()))
    }

    fn list_federated_bundles(&self) -> Result<Vec<Vec<u8>>> {
        self.db
            .open_tree("federated_bundles")?
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    fn delete_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        let removed = self
            .db
            .open_tree("federated_bundles")?
            .remove(trust_domain.as_bytes())?
            .map(|v| v.to_vec());
        if removed.is_some() {
            self.notify(ChangeTopic::Federation);
        }
        Ok(removed)
    }

    fn compare_and_put_federated_bundle(
        &self,
        trust_domain: &str,
        expected: Option<&[u8]>,
        while_federation: Option<&[u8]>,
        record: &[u8],
    ) -> Result<bool> {
        let key = trust_domain.as_bytes();
        let bundles = self.db.open_tree("federated_bundles")?;
        let federations = self.db.open_tree("federations")?;
        let written: bool = (&bundles, &federations).transaction(|(bundles, federations)| {
            if let Some(want) = while_federation {
                if federations.get(key)?.as_deref() != Some(want) {
                    return Ok(false);
                }
            }
            if bundles.get(key)?.as_deref() != expected {
                return Ok(false);
            }
            bundles.insert(key, record)?;
            Ok::<_, ConflictableTransactionError<Error>>(true)
        })?;
        if written {
            self.notify(ChangeTopic::Federation);
        }
        Ok(written)
    }

    fn compare_and_swap_federation(
        &self,
        trust_domain: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool> {
        let swapped = self
            .db
            .open_tree("federations")?
            .compare_and_swap(trust_domain.as_bytes(), Some(expected), Some(new))?
            .is_ok();
        if swapped {
            self.notify(ChangeTopic::Federation);
        }
        Ok(swapped)
    }

    fn put_federation(&self, trust_domain: &str, record: &[u8]) -> Result<()> {
        self.db
            .open_tree("federations")?
            .insert(trust_domain.as_bytes(), record)?;
        self.notify(ChangeTopic::Federation);
        Ok(())
    }

    fn list_federations(&self) -> Result<Vec<Vec<u8>>> {
        self.db
            .open_tree("federations")?
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    fn delete_federation(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        let removed = self
            .db
            .open_tree("federations")?
            .remove(trust_domain.as_bytes())?
            .map(|v| v.to_vec());
        if removed.is_some() {
            self.notify(ChangeTopic::Federation);
        }
        Ok(removed)
    }

    fn put_grant(&self, grant: &GrantRecord) -> Result<()> {
        self.grants.put(
            grant.id.as_bytes(),
            serde_json::to_vec(grant)?,
            MAX_GRANTS,
            too_many_grants,
        )
    }

    fn get_grant(&self, id: &str) -> Result<Option<GrantRecord>> {
        self.grants
            .tree
            .get(id.as_bytes())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    fn list_grants(&self) -> Result<Vec<GrantRecord>> {
        self.grants.values()
    }

    fn delete_grant(&self, id: &str) -> Result<Option<GrantRecord>> {
        self.grants
            .remove(id.as_bytes())?
            .map(|v| Ok(serde_json::from_slice(&v)?))
            .transpose()
    }

    fn put_revocation(&self, revocation: &RevocationRecord) -> Result<()> {
        let (tree, max, too_many): (_, _, fn() -> crate::Error) = match revocation.kind {
            RevocationKind::Admin => (
                &self.admin_revocations,
                crate::limits::MAX_ADMIN_REVOCATIONS,
                too_many_admin_revocations,
            ),
            _ => (&self.revocations, MAX_REVOCATIONS, too_many_revocations),
        };
        tree.put(
            revocation.key().as_bytes(),
            serde_json::to_vec(revocation)?,
            max,
            too_many,
        )
    }

    fn list_revocations(&self) -> Result<Vec<RevocationRecord>> {
        // `admin\n…` keys sort before every other kind's.
        let mut all: Vec<RevocationRecord> = self.admin_revocations.values()?;
        all.extend(self.revocations.values::<RevocationRecord>()?);
        Ok(all)
    }

    fn prune_revocations(&self, before: i64) -> Result<u64> {
        let mut removed = 0;
        for counted in [&self.revocations, &self.admin_revocations] {
            // One writer: a revocation replaced meanwhile is not removed.
            removed += counted.write(|tree, n| {
                let mut removed = 0;
                for v in tree.iter().values() {
                    let r: RevocationRecord = serde_json::from_slice(&v?)?;
                    if r.expires_at < before && tree.remove(r.key().as_bytes())?.is_some() {
                        removed += 1;
                    }
                }
                Ok((removed as u64, n.saturating_sub(removed)))
            })?;
        }
        Ok(removed)
    }

    fn put_hardware_bans(&self, bans: &[HardwareBanRecord]) -> Result<()> {
        self.hardware_bans.write(|tree, n| {
            let mut batch = sled::Batch::default();
            let mut keys = std::collections::BTreeSet::new();
            for ban in bans {
                let key = ban.key();
                batch.insert(key.as_bytes(), serde_json::to_vec(ban)?);
                keys.insert(key);
            }
            let mut new = 0;
            for key in &keys {
                if !tree.contains_key(key.as_bytes())? {
                    new += 1;
                }
            }
            let after = n.saturating_add(new);
            if new > 0 && after > MAX_HARDWARE_BANS {
                return Err(too_many_hardware_bans());
            }
            // All or none.
            tree.apply_batch(batch)?;
            Ok(((), after))
        })
    }

    fn hardware_bans_of(&self, identifiers: &[String]) -> Result<Vec<HardwareBanRecord>> {
        let wanted: std::collections::BTreeSet<&String> = identifiers.iter().collect();
        let mut out = Vec::new();
        for identifier in wanted {
            for v in self
                .hardware_bans
                .tree
                .scan_prefix(format!("{identifier}\n").as_bytes())
                .values()
            {
                out.push(serde_json::from_slice(&v?)?);
            }
        }
        Ok(out)
    }

    fn delete_hardware_bans(&self, agent: &str) -> Result<u64> {
        // Rare (an operator lifting a ban) and the table is bounded: a scan, one writer.
        self.hardware_bans.write(|tree, n| {
            let mut removed = 0usize;
            for v in tree.iter().values() {
                let ban: HardwareBanRecord = serde_json::from_slice(&v?)?;
                if ban.agent == agent && tree.remove(ban.key().as_bytes())?.is_some() {
                    removed += 1;
                }
            }
            Ok((removed as u64, n.saturating_sub(removed)))
        })
    }

    fn hardware_bans_of_agents(&self, agents: &[String]) -> Result<Vec<HardwareBanRecord>> {
        let wanted: std::collections::BTreeSet<&[u8]> =
            agents.iter().map(|a| a.as_bytes()).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        // Keyed by identifier, so a scan: the table is bounded (MAX_HARDWARE_BANS), only
        // the keys of other agents' bans are looked at (an agent ID holds no newline),
        // and it is read for a banned agent shown, one scan a page. Rare enough not to
        // keep a second tree by agent.
        let mut out: Vec<HardwareBanRecord> = Vec::new();
        for kv in self.hardware_bans.tree.iter() {
            let (k, v) = kv?;
            let agent = k.rsplit(|b| *b == b'\n').next().unwrap_or_default();
            if wanted.contains(agent) {
                out.push(serde_json::from_slice(&v)?);
            }
        }
        out.sort_by(|a, b| (&a.agent, &a.identifier).cmp(&(&b.agent, &b.identifier)));
        Ok(out)
    }

    fn list_hardware_bans(&self) -> Result<Vec<HardwareBanRecord>> {
        self.hardware_bans.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_spiffe::Selector;

    /// Opens the store again after this process dropped it. sled's flusher thread may
    /// still hold the lock on the directory's `db` file for a moment after the drop (a
    /// restarted server has no such wait: the kernel frees the lock with the old
    /// process), so this first waits, until a deadline, for that lock to be free: it
    /// takes it itself (`flock`, as sled does), a refusal being `EWOULDBLOCK`, and lets
    /// it go. Any other error fails at once.
    fn reopen(dir: &Path) -> SledStore {
        use nix::errno::Errno;
        use nix::fcntl::{Flock, FlockArg};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = dir.join("db");
        loop {
            let file = std::fs::File::open(&db)
                .unwrap_or_else(|e| panic!("opening {}: {e}", db.display()));
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(free) => {
                    drop(free);
                    break;
                }
                Err((_, Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                    std::thread::yield_now()
                }
                Err((_, e)) => panic!("the lock on {} is still held: {e}", db.display()),
            }
        }
        SledStore::open(dir).unwrap_or_else(|e| panic!("reopening {}: {e}", dir.display()))
    }

    fn entry(id: &str, spiffe: &str, parent: &str, sel: &str) -> EntryRecord {
        EntryRecord {
            id: id.into(),
            spiffe_id: spiffe.into(),
            parent_id: parent.into(),
            selectors: vec![Selector::parse(sel).unwrap()],
            x509_ttl: 0,
            jwt_ttl: 0,
            shared: false,
            dns_names: vec![],
            federates_with: vec![],
            node: false,
            hint: String::new(),
            revision: 0,
            created_at: 0,
        }
    }

    #[test]
    fn entries_indexes_log_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            assert_eq!(s.current_revision().unwrap(), 0);
            let a = s
                .create_entry(entry("a", "spiffe://td/w1", "spiffe://td/p1", "unix:uid:1"))
                .unwrap();
            let b = s
                .create_entry(entry("b", "spiffe://td/w2", "spiffe://td/p2", "unix:uid:1"))
                .unwrap();
            assert!(b.revision > a.revision);
            let dup = s.create_entry(entry("c", "spiffe://td/w1", "spiffe://td/p1", "unix:uid:1"));
            assert!(matches!(dup, Err(Error::AlreadyExists(_))));
            assert!(
                s.get_entry("c").unwrap().is_none(),
                "a refused create changes nothing"
            );

            let by_parent = s
                .list_entries(&EntryFilter {
                    parent_id: Some("spiffe://td/p1".into()),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(
                by_parent.iter().map(|e| &e.id[..]).collect::<Vec<_>>(),
                ["a"]
            );
            let by_id = s
                .list_entries(&EntryFilter {
                    spiffe_id: Some("spiffe://td/w2".into()),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(by_id.len(), 1);

            let changes = s.entry_changes_since(a.revision).unwrap();
            assert_eq!(changes.len(), 1);
            assert_eq!(changes[0].entry_id, "b");
            assert!(s.delete_entry("a").unwrap().is_some());
            assert!(s.delete_entry("a").unwrap().is_none());
            let changes = s.entry_changes_since(b.revision).unwrap();
            assert!(changes[0].deleted && changes[0].entry_id == "a");
            // The same identity can be created again after deletion.
            s.create_entry(entry("d", "spiffe://td/w1", "spiffe://td/p1", "unix:uid:1"))
                .unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert!(s.get_entry("b").unwrap().is_some());
        assert!(s.get_entry("d").unwrap().is_some());
        assert_eq!(s.list_entries(&EntryFilter::default()).unwrap().len(), 2);
        assert!(s.current_revision().unwrap() >= 4);
    }

    #[test]
    fn changes_by_parent_skip_other_parents_and_survive_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = ("spiffe://td/agent/a", "spiffe://td/agent/b");
        let (a1, b1, a2);
        {
            let s = SledStore::open(dir.path()).unwrap();
            a1 = s
                .create_entry(entry("a1", "spiffe://td/w1", pa, "unix:uid:1"))
                .unwrap();
            b1 = s
                .create_entry(entry("b1", "spiffe://td/w2", pb, "unix:uid:2"))
                .unwrap();
            a2 = s
                .create_entry(entry("a2", "spiffe://td/w3", pa, "unix:uid:3"))
                .unwrap();
            s.delete_entry("a1").unwrap();
            let ids = |v: Vec<EntryChange>| -> Vec<(String, bool)> {
                v.into_iter().map(|c| (c.entry_id, c.deleted)).collect()
            };
            assert_eq!(
                ids(s.entry_changes_for_parent_since(pa, 0).unwrap()),
                vec![
                    ("a1".into(), false),
                    ("a2".into(), false),
                    ("a1".into(), true)
                ]
            );
            assert_eq!(
                ids(s.entry_changes_for_parent_since(pa, a1.revision).unwrap()),
                vec![("a2".into(), false), ("a1".into(), true)]
            );
            assert_eq!(
                ids(s.entry_changes_for_parent_since(pb, 0).unwrap()),
                vec![("b1".into(), false)]
            );
            assert!(s
                .entry_changes_for_parent_since(pb, b1.revision)
                .unwrap()
                .is_empty());
            // A parent that is a prefix of another is not mixed up with it.
            assert!(s
                .entry_changes_for_parent_since("spiffe://td/agent/", 0)
                .unwrap()
                .is_empty());
            // A store written before the by-parent log existed.
            s.entry_log_by_parent.clear().unwrap();
            s.db.flush().unwrap();
        }
        let s = reopen(dir.path());
        let got = s
            .entry_changes_for_parent_since(pa, a2.revision - 1)
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].entry_id, "a2");
        assert!(got[1].deleted);
    }

    #[test]
    fn tokens_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let h = [7u8; 32];
        s.put_join_token(
            &h,
            &JoinTokenRecord {
                id: "x".into(),
                expires_at: 5,
                alias: None,
            },
        )
        .unwrap();
        assert_eq!(s.take_join_token(&h).unwrap().unwrap().id, "x");
        assert!(s.take_join_token(&h).unwrap().is_none());
    }

    #[test]
    fn the_audit_anchor_only_moves_forward_unless_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            assert_eq!(s.audit_anchor().unwrap(), None);
            assert!(s.advance_audit_anchor(5, b"five").unwrap());
            assert!(s.advance_audit_anchor(9, b"nine").unwrap());
            assert!(!s.advance_audit_anchor(7, b"seven").unwrap());
            assert_eq!(s.audit_anchor().unwrap().as_deref(), Some(&b"nine"[..]));
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.audit_anchor().unwrap().as_deref(), Some(&b"nine"[..]));
        s.replace_audit_anchor(3, b"three").unwrap();
        assert_eq!(s.audit_anchor().unwrap().as_deref(), Some(&b"three"[..]));
        assert!(s.advance_audit_anchor(4, b"four").unwrap());
    }

    /// One agent's hardware bans, read back by agent: none of another agent's (the
    /// same identifier banned with two agents included), ordered by agent and
    /// identifier; none for no agent or an unbanned one; gone once lifted.
    #[test]
    fn hardware_bans_are_read_by_agent() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let a = "spiffe://example.org/ztid/agent/tpm/aa".to_string();
        let b = "spiffe://example.org/ztid/agent/multi/bb".to_string();
        let ban = |identifier: &str, agent: &str| HardwareBanRecord {
            identifier: identifier.into(),
            agent: agent.into(),
            banned_at: 7,
        };
        s.put_hardware_bans(&[ban("tpm:ek-hash:02", &a), ban("tpm:ek-hash:01", &a)])
            .unwrap();
        s.put_hardware_bans(&[ban("tpm:ek-hash:01", &b), ban("tpm:ek-hash:03", &b)])
            .unwrap();

        assert_eq!(
            s.hardware_bans_of_agents(std::slice::from_ref(&a)).unwrap(),
            vec![ban("tpm:ek-hash:01", &a), ban("tpm:ek-hash:02", &a)]
        );
        assert_eq!(
            s.hardware_bans_of_agents(&[b.clone(), a.clone()]).unwrap(),
            vec![
                // By agent: `…/multi/bb` before `…/tpm/aa`.
                ban("tpm:ek-hash:01", &b),
                ban("tpm:ek-hash:03", &b),
                ban("tpm:ek-hash:01", &a),
                ban("tpm:ek-hash:02", &a),
            ]
        );
        // An agent ID that only starts or ends like a banned one matches nothing.
        let near = format!("{a}a");
        assert!(s.hardware_bans_of_agents(&[near]).unwrap().is_empty());
        assert!(s.hardware_bans_of_agents(&[]).unwrap().is_empty());

        s.delete_hardware_bans(&a).unwrap();
        assert!(s
            .hardware_bans_of_agents(std::slice::from_ref(&a))
            .unwrap()
            .is_empty());
        assert_eq!(
            s.hardware_bans_of_agents(std::slice::from_ref(&b))
                .unwrap()
                .len(),
            2
        );
    }
}
