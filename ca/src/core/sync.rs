//! An agent's entry sync: everything on first sync or when its aliases changed,
//! else only the changes of its parents' entries since the revision it holds.
//!
//! # Pages
//!
//! An agent that asks for pages (a page size in its request) never gets more than that
//! many entries, nor about [`PAGE_BYTES`] of them, in one answer, whatever its entry set:
//! SPIRE agents with some 17,000 entries hit gRPC's 4 MiB message limit on their first
//! sync (spiffe/spire#2675). The pages of a full answer are consistent:
//!
//! - the first page reads the revision `R` below which every change is visible (the
//!   datastore's [`current_revision`](crate::datastore::DataStore::current_revision)
//!   rule), then lists the agent's parents' entries ordered by parent, then entry id;
//!   each next page continues after the last (parent, entry id) of the one before, from
//!   its page token. Every page answers revision `R`.
//! - Every entry that exists through the whole paging is listed exactly once (ids are
//!   ordered and never reused). An entry created, changed or deleted while the agent
//!   pages has a change above `R`, so whether a page saw it or not, the agent's next
//!   incremental sync since `R`, which it makes right after the last page, brings it to
//!   the current state. The agent replaces its set only with all pages together: it
//!   never serves a half-listed set.
//! - The parents are fixed for the whole paging: the token carries a digest of them,
//!   and if the agent's node aliases change in between, the page is refused and the
//!   agent starts again.
//!
//! An incremental answer with more changed entries than one page holds becomes a paged
//! full answer (the change log is not re-read page by page; listing by id is).

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;
use std::sync::Arc;

use super::grants::covering_ids;
use super::{now, AuthenticatedAgent, CaCore};
use crate::datastore::{EntryFilter, EntryRecord, RevocationKind, RevocationRecord};
use crate::{Error, Result};

/// Most entries in one page (sync or `ListEntries`), whatever the caller asks.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Entries per page when the caller names no size (`ListEntries`, `ListAgents`).
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// A page ends once its entries reach about this many bytes on the wire (one entry may
/// pass it: an entry is at most about 300 KiB, see [`crate::limits`]), far below the
/// 4 MiB gRPC clients accept by default.
pub const PAGE_BYTES: usize = 1 << 20;

/// The page size to use for a request's `page_size`: 0 gives `default`, anything above
/// [`MAX_PAGE_SIZE`] is cut to it.
pub fn page_limit(requested: u32, default: usize) -> usize {
    match usize::try_from(requested) {
        Ok(0) => default,
        Ok(n) => n.min(MAX_PAGE_SIZE),
        Err(_) => MAX_PAGE_SIZE,
    }
}

/// An upper bound of an entry's size in a protobuf message (its strings, with a tag and
/// a length for each, and its fixed fields).
pub fn entry_wire_bytes(e: &EntryRecord) -> usize {
    const FIELD: usize = 6;
    let strings = [&e.id, &e.spiffe_id, &e.parent_id, &e.hint]
        .iter()
        .map(|s| s.len() + FIELD)
        .sum::<usize>();
    let selectors = e
        .selectors
        .iter()
        .map(|s| s.kind().len() + s.value().len() + 3 * FIELD)
        .sum::<usize>();
    let lists = e
        .dns_names
        .iter()
        .chain(&e.federates_with)
        .map(|s| s.len() + FIELD)
        .sum::<usize>();
    strings + selectors + lists + 64
}

/// Page tokens: opaque to callers, checked when they come back.
///
/// A token is `base64url(version | tag | JSON cursor)`, where the tag is the first 16
/// bytes of SHA-256 over the token's kind, its context (the filters of a list, the
/// agent of a sync) and the cursor. A token that was cut or altered, or comes back with
/// other filters or from another agent, is refused (`InvalidArgument`). A token is a
/// cursor, not a credential: every page is authorized and filtered on its own, so even
/// a token forged with a matching tag only moves the caller within what it may read.
/// It holds no server secret, so any server of a cluster continues any server's paging.
pub mod page_token {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde::{de::DeserializeOwned, Serialize};

    use crate::{Error, Result};

    const VERSION: u8 = 1;
    const TAG_BYTES: usize = 16;
    /// Longest token accepted (a cursor holds at most a SPIFFE ID of 2048 bytes).
    pub const MAX_TOKEN_BYTES: usize = 4096;

    fn tag(kind: &str, context: &str, cursor: &[u8]) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            b"ztid page token v1".as_slice(),
            kind.as_bytes(),
            context.as_bytes(),
        ] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.update(cursor);
        ctx.finish()
            .as_ref()
            .iter()
            .take(TAG_BYTES)
            .copied()
            .collect()
    }

    /// The token for `cursor`, valid only for `kind` and `context`.
    pub fn encode<T: Serialize>(kind: &str, context: &str, cursor: &T) -> Result<String> {
        let json = serde_json::to_vec(cursor)?;
        let mut bytes = Vec::with_capacity(1 + TAG_BYTES + json.len());
        bytes.push(VERSION);
        bytes.extend(tag(kind, context, &json));
        bytes.extend(json);
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The cursor in `token`, if it is one this server made for `kind` and `context`.
    pub fn decode<T: DeserializeOwned>(kind: &str, context: &str, token: &str) -> Result<T> {
        let invalid = |why: &str| {
            Error::InvalidInput(format!(
                "invalid page_token ({why}): pass the next_page_token of the previous \
                 page unchanged, with the same filters"
            ))
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("too long"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid("not base64url"))?;
        let (version, rest) = bytes.split_first().ok_or_else(|| invalid("empty"))?;
        if *version != VERSION || rest.len() < TAG_BYTES {
            return Err(invalid("unknown format"));
        }
        let (got, json) = rest.split_at(TAG_BYTES);
        if got != tag(kind, context, json).as_slice() {
            return Err(invalid("altered, or made for another listing"));
        }
        serde_json::from_slice(json).map_err(|_| invalid("unreadable cursor"))
    }
}

/// The token kind of a sync page.
const SYNC_TOKEN: &str = "sync";

/// Where the next page of a paged full sync starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SyncCursor {
    /// The revision every page answers.
    r: u64,
    /// Index of the parent being listed, in the ordered parents.
    p: usize,
    /// The last entry id listed under that parent.
    a: Option<String>,
    /// Digest of the ordered parents the paging started with.
    d: String,
}

/// What an agent asks in one sync.
#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    /// The revision the agent holds (0: none, everything).
    pub since: u64,
    /// Authorities the agent still uses (recorded on the agent, see the node API).
    pub authorities_in_use: Vec<String>,
    /// Most entries per answer; 0: one answer whatever its size (an agent from before
    /// paging).
    pub page_size: u32,
    /// The token of the next page of a paged full answer (empty: a new sync).
    pub page_token: String,
}

fn parents_digest(parents: &[String]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, parents.join("\n").as_bytes());
    hex::encode(digest.as_ref().get(..12).unwrap_or_default())
}

impl CaCore {
    /// Entries an agent should hold: all of them (`full`) on first sync or when its
    /// aliases changed, else only what changed after `req.since`; in pages when the
    /// request names a page size (see the module documentation).
    pub fn sync_entries(&self, agent: &AuthenticatedAgent, req: SyncRequest) -> Result<SyncResult> {
        let limit = page_limit(req.page_size, MAX_PAGE_SIZE);
        if !req.page_token.is_empty() {
            return self.next_sync_page(agent, &req.page_token, limit);
        }
        let since = req.since;
        let revision = self.store.current_revision()?;
        let mut agent = agent.clone();
        // Only the sync's own fields change, on the record as stored now: an eviction,
        // ban or renewal since the call was authenticated is kept (and refuses this
        // sync when it is an eviction or a ban).
        // Not flushed: a lost sync record only delays a revoke until the next sync.
        let t = now();
        let stored = self.modify_agent(&agent.record.spiffe_id, |current| {
            let mut r = current.clone();
            r.aliases = self.aliases_of(current)?;
            if r.aliases != current.aliases {
                r.aliases_revision = revision;
            }
            r.authorities_in_use = req.authorities_in_use.clone();
            r.last_sync_at = t;
            Ok(r)
        })?;
        // `since < aliases_revision`: the aliases changed at an earlier sync whose
        // answer may have been lost on its way; only a full answer is sure to carry
        // the new aliases' entries.
        let aliases_changed =
            stored.aliases != agent.record.aliases || since < stored.aliases_revision;
        agent.record = stored;
        let parents: Vec<String> = agent.parents().into_iter().map(String::from).collect();
        let paged = req.page_size != 0;
        let mut result = SyncResult {
            full: since == 0 || aliases_changed,
            upserted: Vec::new(),
            deleted: Vec::new(),
            revision,
            next_page_token: None,
            parents: parents.clone(),
        };
        if !result.full {
            // Only this agent's parents' changes are read, merged in revision order.
            let mut changes = Vec::new();
            for p in &parents {
                changes.extend(self.store.entry_changes_for_parent_since(p, since)?);
            }
            changes.sort_by_key(|c| c.revision);
            // Read after the changes (see DataStore::change_log_floor): changes the agent
            // has not seen were compacted away, so only its whole set is sure.
            let compacted = since < self.store.change_log_floor()?;
            if compacted {
                tracing::info!(agent = %agent.record.spiffe_id, since,
                    "the agent's revision is older than the change log: sending its whole set");
                changes.clear();
            }
            let mut latest = std::collections::BTreeMap::new();
            for change in changes {
                if change.revision > revision {
                    break;
                }
                if !change.node {
                    latest.insert(change.entry_id.clone(), change.deleted);
                }
            }
            if !compacted && (!paged || latest.len() <= limit) {
                let mut bytes = 0;
                for (id, deleted) in latest {
                    match (deleted, self.store.get_entry(&id)?) {
                        (false, Some(e)) => {
                            bytes += entry_wire_bytes(&e);
                            result.upserted.push(e);
                        }
                        _ => {
                            bytes += id.len() + 6;
                            result.deleted.push(id);
                        }
                    }
                }
                if !paged || bytes <= PAGE_BYTES {
                    return Ok(result);
                }
            }
            // Too many changes for one page (or some compacted): a full answer instead.
            if !compacted {
                tracing::info!(agent = %agent.record.spiffe_id, since, revision,
                    "entry changes exceed one page: sending the agent's whole set in pages");
            }
            result = SyncResult {
                full: true,
                upserted: Vec::new(),
                deleted: Vec::new(),
                revision,
                next_page_token: None,
                parents: parents.clone(),
            };
        }
        if !paged {
            for p in &parents {
                let filter = EntryFilter {
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
        let cursor = SyncCursor {
            r: revision,
            p: 0,
            a: None,
            d: parents_digest(&parents),
        };
        self.full_sync_page(&agent.record.spiffe_id, &parents, cursor, limit)
    }

    /// The page of a paged full sync that `token` points at.
    fn next_sync_page(
        &self,
        agent: &AuthenticatedAgent,
        token: &str,
        limit: usize,
    ) -> Result<SyncResult> {
        let cursor: SyncCursor = page_token::decode(SYNC_TOKEN, &agent.record.spiffe_id, token)?;
        let parents: Vec<String> = agent.parents().into_iter().map(String::from).collect();
        if cursor.d != parents_digest(&parents) {
            return Err(Error::Precondition(
                "the agent's node aliases changed during a paged sync: start the sync again".into(),
            ));
        }
        if cursor.p >= parents.len() {
            return Err(Error::InvalidInput(
                "invalid page_token (past the last page)".into(),
            ));
        }
        self.full_sync_page(&agent.record.spiffe_id, &parents, cursor, limit)
    }

    /// One page of a full sync from `cursor`: up to `limit` entries and about
    /// [`PAGE_BYTES`], and the token of the next page if any is left.
    fn full_sync_page(
        &self,
        agent_id: &str,
        parents: &[String],
        mut cursor: SyncCursor,
        limit: usize,
    ) -> Result<SyncResult> {
        let mut upserted = Vec::new();
        let mut bytes = 0;
        while let Some(parent) = parents.get(cursor.p) {
            if upserted.len() >= limit || bytes >= PAGE_BYTES {
                break;
            }
            let want = limit - upserted.len();
            let filter = EntryFilter {
                parent_id: Some(parent.clone()),
                spiffe_id: None,
            };
            let batch = self
                .store
                .list_entries_page(&filter, cursor.a.as_deref(), want)?;
            let exhausted = batch.len() < want;
            let mut cut = false;
            for e in batch {
                cursor.a = Some(e.id.clone());
                if !e.node {
                    bytes += entry_wire_bytes(&e);
                    upserted.push(e);
                }
                if bytes >= PAGE_BYTES {
                    cut = true;
                    break;
                }
            }
            if exhausted && !cut {
                cursor.p += 1;
                cursor.a = None;
            }
        }
        let next_page_token = if cursor.p < parents.len() {
            Some(page_token::encode(SYNC_TOKEN, agent_id, &cursor)?)
        } else {
            None
        };
        Ok(SyncResult {
            full: true,
            upserted,
            deleted: Vec::new(),
            revision: cursor.r,
            next_page_token,
            parents: parents.to_vec(),
        })
    }
}

/// Most revoked instances, and most revoked entries, in one sync answer.
pub const MAX_SYNC_REVOCATIONS: usize = 10_000;

/// One revocation in force and the parents of the entries it concerns: an agent is
/// told of it when one of its parents is among them.
#[derive(Debug)]
struct ConcernedRevocation {
    record: RevocationRecord,
    parents: BTreeSet<String>,
}

/// The revocations in force with the parents they concern, for one state of the
/// revocations and of the entries.
#[derive(Debug)]
struct RevocationIndex {
    /// The entry revision it was built at.
    revision: u64,
    /// A digest of the revocations it was built from.
    digest: u64,
    revocations: Vec<ConcernedRevocation>,
}

/// The revocations that concern agents, built once per change of the revocations or
/// of the entries and shared by every sync in between: a sync then costs one pass over
/// the revocations in force, never a listing of entries.
#[derive(Debug, Default)]
pub struct RevocationMemo {
    index: std::sync::Mutex<Option<Arc<RevocationIndex>>>,
}

/// The revocations an agent is told of in a sync answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRevocations {
    /// Revoked per-instance SPIFFE IDs under the agent's entries.
    pub instances: Vec<String>,
    /// Revoked entries of the agent: (entry id, `revoked_at`).
    pub entries: Vec<(String, i64)>,
}

fn revocations_digest(revocations: &[RevocationRecord]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in revocations {
        (r.kind, &r.target, &r.spiffe_id, r.revoked_at).hash(&mut h);
    }
    h.finish()
}

impl CaCore {
    /// The parents of the entries a revocation concerns: for an instance, those of the
    /// entries whose SPIFFE ID covers it (the ID itself, or the ID less its last
    /// segment), looked up by SPIFFE ID; for an entry, its own parent. Node
    /// revocations concern no agent's sync (the node is banned), nor do admin ones.
    fn revocation_parents(&self, r: &RevocationRecord) -> Result<BTreeSet<String>> {
        let mut parents = BTreeSet::new();
        match r.kind {
            RevocationKind::Instance => {
                for candidate in covering_ids(&r.spiffe_id) {
                    let filter = EntryFilter {
                        spiffe_id: Some(candidate.to_string()),
                        parent_id: None,
                    };
                    parents.extend(
                        self.store
                            .list_entries(&filter)?
                            .into_iter()
                            .filter(|e| !e.node)
                            .map(|e| e.parent_id),
                    );
                }
            }
            RevocationKind::Entry => {
                if let Some(e) = self.store.get_entry(&r.target)? {
                    if !e.node {
                        parents.insert(e.parent_id);
                    }
                }
            }
            // Admin credentials are no agent's business.
            RevocationKind::Node | RevocationKind::Admin => {}
        }
        Ok(parents)
    }

    /// The revocations in force that concern an agent whose parents are `parents`, with
    /// the entries as of `revision`: instance revocations under the SPIFFE ID of one of
    /// its entries, and revocations of its entries; at most [`MAX_SYNC_REVOCATIONS`] of
    /// each.
    pub fn revocations_for_agent(
        &self,
        parents: &[String],
        revision: u64,
        memo: &RevocationMemo,
    ) -> Result<AgentRevocations> {
        let in_force = self.revocations_in_force()?;
        if in_force.is_empty() {
            return Ok(AgentRevocations::default());
        }
        let digest = revocations_digest(&in_force);
        let cached = memo
            .index
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .filter(|i| i.revision == revision && i.digest == digest);
        let index = match cached {
            Some(i) => i,
            None => {
                let mut revocations = Vec::with_capacity(in_force.len());
                for record in in_force {
                    let parents = self.revocation_parents(&record)?;
                    if !parents.is_empty() {
                        revocations.push(ConcernedRevocation { record, parents });
                    }
                }
                let index = Arc::new(RevocationIndex {
                    revision,
                    digest,
                    revocations,
                });
                if let Ok(mut m) = memo.index.lock() {
                    *m = Some(index.clone());
                }
                index
            }
        };
        let mut out = AgentRevocations::default();
        for c in &index.revocations {
            if !parents.iter().any(|p| c.parents.contains(p)) {
                continue;
            }
            match c.record.kind {
                RevocationKind::Instance if out.instances.len() < MAX_SYNC_REVOCATIONS => {
                    out.instances.push(c.record.spiffe_id.clone())
                }
                RevocationKind::Entry if out.entries.len() < MAX_SYNC_REVOCATIONS => out
                    .entries
                    .push((c.record.target.clone(), c.record.revoked_at)),
                _ => {}
            }
        }
        Ok(out)
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
    /// More pages of this full answer follow: the token of the next one.
    pub next_page_token: Option<String>,
    /// The agent's parents the answer was made for (its SPIFFE ID and aliases).
    pub parents: Vec<String>,
}

impl SyncResult {
    /// An upper bound of the answer's entries' size on the wire.
    pub fn wire_bytes(&self) -> usize {
        self.upserted.iter().map(entry_wire_bytes).sum::<usize>()
            + self.deleted.iter().map(|d| d.len() + 6).sum::<usize>()
    }
}

// ---------------------------------------------------------------------------------
// The change feed (issue 17): what the node API's WatchChanges streams follow.
// ---------------------------------------------------------------------------------

/// Generations of changes the feed keeps: a stream that falls further behind (it was
/// busy) is told at once, whatever changed.
const FEED_HISTORY: usize = 64;
/// More parents than this in one read of the change log: every agent is told (a bulk
/// import concerns about everyone anyway).
const FEED_MAX_PARENTS: usize = 1000;
/// How often the feed compares the bundle and the revocations in force (both served
/// from memory) with what it last published: they have no change topic of their own
/// on every path (a revocation written through another server shows up at the access
/// refresh; another server's authority change after the reload of this one).
pub const FEED_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Whom one generation of changes concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedConcern {
    /// Every agent: the bundle, revocations, federation, node aliases, or more
    /// changes than the feed tells apart.
    All,
    /// The agents that are one of these parents (or have one as an alias).
    Parents(BTreeSet<String>),
    /// Some agent record changed (eviction, ban, renewal): each stream checks its
    /// agent's credential again.
    Agents,
}

/// The feed's state: the latest values and the recent generations of changes.
#[derive(Debug, Clone, Default)]
pub struct FeedState {
    /// Counts published changes.
    pub generation: u64,
    /// The entry revision (`current_revision`) as of the last entry change read.
    pub entry_revision: u64,
    /// The bundle's sequence.
    pub bundle_sequence: u64,
    /// Counts changes of the revocations in force.
    pub revocations_version: u64,
    /// Counts federation changes.
    pub federation_version: u64,
    /// (generation, whom it concerns), oldest first, at most [`FEED_HISTORY`].
    recent: std::collections::VecDeque<(u64, Arc<FeedConcern>)>,
}

/// What a stream does after the feed moved on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedAction {
    /// Send a notice.
    pub notify: bool,
    /// Check the agent's credential (and aliases) again.
    pub recheck: bool,
}

impl FeedState {
    /// What an agent whose parents are `parents` must do about the changes after
    /// generation `since`.
    pub fn action_since(&self, since: u64, parents: &BTreeSet<String>) -> FeedAction {
        let mut action = FeedAction::default();
        if since >= self.generation {
            return action;
        }
        // Generations older than the history were dropped: assume they concern it.
        let kept_from = self.recent.front().map_or(u64::MAX, |(g, _)| *g);
        if kept_from > since.saturating_add(1) {
            return FeedAction {
                notify: true,
                recheck: true,
            };
        }
        for (g, concern) in &self.recent {
            if *g <= since {
                continue;
            }
            match concern.as_ref() {
                FeedConcern::All => action.notify = true,
                FeedConcern::Parents(p) => {
                    if p.iter().any(|x| parents.contains(x)) {
                        action.notify = true
                    }
                }
                FeedConcern::Agents => action.recheck = true,
            }
        }
        action
    }

    /// This state with one more generation, concerning `concern`.
    fn with(&self, concern: FeedConcern, change: impl FnOnce(&mut FeedState)) -> FeedState {
        let mut next = self.clone();
        change(&mut next);
        next.generation += 1;
        next.recent.push_back((next.generation, Arc::new(concern)));
        while next.recent.len() > FEED_HISTORY {
            next.recent.pop_front();
        }
        next
    }
}

/// Streams registered with the feed: at most one per agent, and a total bound.
#[derive(Debug, Default)]
struct FeedStreams {
    next_id: u64,
    /// Agent SPIFFE ID -> (stream id, what ends that stream when a newer one comes).
    by_agent: std::collections::HashMap<String, (u64, tokio::sync::oneshot::Sender<()>)>,
}

/// The change feed: follows the datastore's change notifications (every server's
/// writes, on PostgreSQL), the bundle and the revocations, and publishes one
/// [`FeedState`] that every watch stream reads. Nothing is queued per stream: a
/// stream reads the latest state whenever it gets to it.
#[derive(Debug)]
pub struct ChangeFeed {
    state: tokio::sync::watch::Receiver<Arc<FeedState>>,
    streams: std::sync::Mutex<FeedStreams>,
    max_streams: usize,
}

/// One registered watch stream: holds its place in the bounds until dropped.
#[derive(Debug)]
pub struct FeedRegistration {
    feed: Arc<ChangeFeed>,
    agent: String,
    id: u64,
    /// Completes when a newer stream of the same agent replaced this one.
    pub replaced: tokio::sync::oneshot::Receiver<()>,
}

impl Drop for FeedRegistration {
    fn drop(&mut self) {
        let mut streams = self.feed.lock_streams();
        if streams
            .by_agent
            .get(&self.agent)
            .is_some_and(|(id, _)| *id == self.id)
        {
            streams.by_agent.remove(&self.agent);
        }
    }
}

impl ChangeFeed {
    /// Starts the feed's task on the current Tokio runtime; it ends when the core is
    /// gone, the store's channel closes, or nobody holds the feed any more.
    pub fn start(core: &Arc<CaCore>, max_streams: usize) -> Arc<Self> {
        let initial = FeedState {
            entry_revision: core.store.current_revision().unwrap_or(0),
            bundle_sequence: core.bundle().sequence,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(initial));
        let changes = core.store.subscribe_changes();
        tokio::spawn(run_feed(Arc::downgrade(core), changes, tx));
        Arc::new(Self {
            state: rx,
            streams: std::sync::Mutex::new(FeedStreams::default()),
            max_streams,
        })
    }

    /// A receiver of the feed's state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<FeedState>> {
        self.state.clone()
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, FeedStreams> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Streams registered now.
    pub fn streams(&self) -> usize {
        self.lock_streams().by_agent.len()
    }

    /// Registers a stream of `agent`: a stream it already has is told to end (one per
    /// agent); refused (`ResourceExhausted`) when the server holds its bound of streams.
    pub fn register(self: &Arc<Self>, agent: &str) -> Result<FeedRegistration> {
        let mut streams = self.lock_streams();
        let replacing = streams.by_agent.contains_key(agent);
        if !replacing && streams.by_agent.len() >= self.max_streams {
            return Err(Error::refused(
                crate::RefusalKind::RateExceeded,
                format!(
                    "this server holds its bound of {} change streams \
                     ([limits] node_api_max_watch_streams): poll with SyncEntries",
                    self.max_streams
                ),
            ));
        }
        streams.next_id += 1;
        let id = streams.next_id;
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        if let Some((_, old)) = streams.by_agent.insert(agent.to_string(), (id, end_tx)) {
            let _ = old.send(());
        }
        Ok(FeedRegistration {
            feed: self.clone(),
            agent: agent.to_string(),
            id,
            replaced: end_rx,
        })
    }
}

/// What the feed last saw of the values it compares by polling.
struct FeedPolled {
    bundle_sequence: u64,
    revocations_digest: Option<u64>,
    /// The federated bundles' version (`None`: could not be read).
    federated_version: Option<u64>,
}

impl FeedPolled {
    /// Whether the federated bundles changed since last seen (or cannot be read: then
    /// agents are told, to be safe). Relationships change at every poll (its time and
    /// outcome) and agents hold none of them, only the bundles.
    fn federated_bundles_moved(&mut self, core: &CaCore) -> bool {
        let now = core.federated_version().ok();
        let moved = now.is_none() || now != self.federated_version;
        self.federated_version = now;
        moved
    }
}

/// The feed's loop: one generation per change notification or polled change.
async fn run_feed(
    core: std::sync::Weak<CaCore>,
    mut changes: tokio::sync::broadcast::Receiver<crate::datastore::ChangeTopic>,
    tx: tokio::sync::watch::Sender<Arc<FeedState>>,
) {
    use crate::datastore::ChangeTopic;
    use tokio::sync::broadcast::error::RecvError;
    let mut polled = match core.upgrade() {
        Some(c) => FeedPolled {
            bundle_sequence: c.bundle().sequence,
            revocations_digest: c
                .revocations_in_force()
                .ok()
                .map(|r| revocations_digest(&r)),
            federated_version: c.federated_version().ok(),
        },
        None => return,
    };
    // The revision up to which the change log was read.
    let mut read_to = tx.borrow().entry_revision;
    // Changes above the revision read were seen: read again at the next poll (a
    // transaction below them may not have been visible yet).
    let mut reread = false;
    let mut tick = tokio::time::interval(FEED_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let topic = tokio::select! {
            _ = tx.closed() => return,
            t = changes.recv() => Some(t),
            _ = tick.tick() => None,
        };
        let Some(core) = core.upgrade() else { return };
        let mut entries = reread;
        let mut all = false;
        match topic {
            Some(Ok(ChangeTopic::Entries)) => entries = true,
            Some(Ok(ChangeTopic::Agents)) => {
                tx.send_modify(|s| *s = Arc::new(s.with(FeedConcern::Agents, |_| {})));
            }
            Some(Ok(ChangeTopic::Federation)) => {
                if polled.federated_bundles_moved(&core) {
                    tx.send_modify(|s| {
                        *s = Arc::new(s.with(FeedConcern::All, |n| n.federation_version += 1))
                    });
                }
            }
            // The bundle is compared below (after this server's reload).
            Some(Ok(ChangeTopic::Authorities)) | None => {}
            Some(Err(RecvError::Lagged(missed))) => {
                tracing::debug!(missed, "change feed lagged: telling every agent");
                entries = true;
                all = true;
                // A federation change may be among those missed.
                if polled.federated_bundles_moved(&core) {
                    tx.send_modify(|s| {
                        *s = Arc::new(s.with(FeedConcern::All, |n| n.federation_version += 1))
                    });
                }
            }
            Some(Err(RecvError::Closed)) => return,
        }
        if entries {
            match entry_concern(&core, read_to) {
                Ok((revision, concern, again)) => {
                    reread = again;
                    read_to = read_to.max(revision);
                    let concern = if all { FeedConcern::All } else { concern };
                    let moved = revision > tx.borrow().entry_revision;
                    if moved || all {
                        tx.send_modify(|s| {
                            *s = Arc::new(s.with(concern, |n| {
                                n.entry_revision = n.entry_revision.max(revision)
                            }))
                        });
                    }
                }
                Err(e) => {
                    reread = true;
                    tracing::warn!(error = %e, "change feed: could not read the entry changes");
                }
            }
        }
        let sequence = core.bundle().sequence;
        if sequence != polled.bundle_sequence {
            polled.bundle_sequence = sequence;
            tx.send_modify(|s| {
                *s = Arc::new(s.with(FeedConcern::All, |n| n.bundle_sequence = sequence))
            });
        }
        if let Ok(r) = core.revocations_in_force() {
            let digest = Some(revocations_digest(&r));
            if digest != polled.revocations_digest {
                polled.revocations_digest = digest;
                tx.send_modify(|s| {
                    *s = Arc::new(s.with(FeedConcern::All, |n| n.revocations_version += 1))
                });
            }
        }
    }
}

/// The current revision, whom the entry changes after `since` concern, and whether
/// some changes were above that revision (to read again).
fn entry_concern(core: &CaCore, since: u64) -> Result<(u64, FeedConcern, bool)> {
    let revision = core.store.current_revision()?;
    if revision <= since {
        return Ok((revision, FeedConcern::Parents(BTreeSet::new()), false));
    }
    let changes = core.store.entry_changes_since(since)?;
    let mut parents = BTreeSet::new();
    let mut above = false;
    // Read after the changes: some were compacted away, so whom they concern is unknown.
    let mut all = since < core.store.change_log_floor()?;
    for c in changes {
        if c.revision > revision {
            above = true;
            continue;
        }
        // A node entry changes agents' aliases: any agent may be concerned.
        if c.node || parents.len() >= FEED_MAX_PARENTS {
            all = true;
        } else {
            parents.insert(c.parent_id);
        }
    }
    let concern = if all {
        FeedConcern::All
    } else {
        FeedConcern::Parents(parents)
    };
    Ok((revision, concern, above))
}

#[cfg(test)]
mod tests {
    use super::page_token;
    use super::*;

    /// A stream is told of changes under its parents and of changes for everyone, not
    /// of other agents' entries; one that fell behind the history is told at once.
    #[test]
    fn the_feed_tells_a_stream_what_concerns_its_agent() {
        let mine: BTreeSet<String> = ["spiffe://td/agent/a".to_string()].into();
        let only = |p: &str| FeedConcern::Parents([p.to_string()].into());
        let s0 = FeedState::default();
        let s1 = s0.with(only("spiffe://td/agent/b"), |_| {});
        assert_eq!(s1.action_since(0, &mine), FeedAction::default());
        let s2 = s1.with(only("spiffe://td/agent/a"), |_| {});
        assert!(s2.action_since(1, &mine).notify);
        assert!(s2.action_since(0, &mine).notify);
        assert_eq!(s2.action_since(2, &mine), FeedAction::default());
        let s3 = s2.with(FeedConcern::Agents, |_| {});
        assert_eq!(
            s3.action_since(2, &mine),
            FeedAction {
                notify: false,
                recheck: true
            }
        );
        let s4 = s3.with(FeedConcern::All, |n| n.revocations_version += 1);
        assert!(s4.action_since(3, &mine).notify);
        // Past the history: everything is assumed to concern it.
        let mut s = s4;
        for _ in 0..FEED_HISTORY {
            s = s.with(only("spiffe://td/agent/b"), |_| {});
        }
        assert_eq!(s.recent.len(), FEED_HISTORY);
        assert_eq!(
            s.action_since(1, &mine),
            FeedAction {
                notify: true,
                recheck: true
            }
        );
        assert_eq!(
            s.action_since(s.generation - 1, &mine),
            FeedAction::default()
        );
    }

    /// `t` with its middle character changed.
    fn tampered(t: &str) -> String {
        let mut chars: Vec<char> = t.chars().collect();
        let mid = chars.len() / 2;
        chars[mid] = if chars[mid] == 'x' { 'y' } else { 'x' };
        chars.into_iter().collect()
    }

    #[test]
    fn page_tokens_come_back_only_unchanged_and_for_their_listing() {
        let t = page_token::encode("entries", "filter-a", &"abc").unwrap();
        let back: String = page_token::decode("entries", "filter-a", &t).unwrap();
        assert_eq!(back, "abc");
        for (kind, ctx, token) in [
            ("entries", "filter-b", t.clone()),
            ("agents", "filter-a", t.clone()),
            ("entries", "filter-a", format!("{t}A")),
            ("entries", "filter-a", tampered(&t)),
            ("entries", "filter-a", "not a token!".into()),
            ("entries", "filter-a", "A".repeat(5000)),
        ] {
            match page_token::decode::<String>(kind, ctx, &token) {
                Err(Error::InvalidInput(m)) => assert!(m.contains("invalid page_token"), "{m}"),
                other => panic!("{kind} {ctx} {token}: {other:?}"),
            }
        }
    }

    fn create(
        core: &CaCore,
        spiffe_id: &str,
        parent_id: &str,
        selector: &str,
        node: bool,
    ) -> EntryRecord {
        let (kind, value) = selector.split_once(':').unwrap();
        core.create_entry(&ztid_proto::node::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            selectors: vec![ztid_proto::node::Selector {
                r#type: kind.into(),
                value: value.into(),
            }],
            node,
            ..Default::default()
        })
        .unwrap()
    }

    /// A sync answer that carried a new alias's entries and never reached the agent
    /// (the connection dropped, the server died) does not make the agent's next sync,
    /// since its old revision, an incremental one that would skip those entries.
    #[test]
    fn a_lost_answer_after_new_aliases_is_followed_by_a_full_one() {
        let (_dir, core, leaf, _) = crate::core::testing::core_with_agent();
        // Every call authenticates again, as every node API call does.
        let agent = || core.authenticate_agent(Some(&leaf)).unwrap();
        let entry = |spiffe_id: &str, parent_id: &str, selector: &str, node: bool| {
            create(&core, spiffe_id, parent_id, selector, node)
        };
        // A workload under an alias the agent does not belong to yet.
        let under_alias = entry(
            "spiffe://example.org/w",
            "spiffe://example.org/group",
            "unix:uid:7",
            false,
        );
        let first = core.sync_entries(&agent(), SyncRequest::default()).unwrap();
        assert!(
            first.full && first.upserted.is_empty(),
            "{:?}",
            first.upserted
        );
        // Now the agent joins the alias; the answer that says so is lost.
        entry("spiffe://example.org/group", "", "join-token:id:n1", true);
        let since = first.revision;
        let lost = core
            .sync_entries(
                &agent(),
                SyncRequest {
                    since,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(lost.full, "the aliases changed");
        let again = core
            .sync_entries(
                &agent(),
                SyncRequest {
                    since,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(
            again.full,
            "asked since a revision before the aliases changed"
        );
        assert_eq!(
            again
                .upserted
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            vec![under_alias.id.as_str()]
        );
        // Once the agent holds that answer, it syncs incrementally again.
        let caught_up = core
            .sync_entries(
                &agent(),
                SyncRequest {
                    since: again.revision,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(!caught_up.full && caught_up.upserted.is_empty());
    }

    /// An agent whose revision is older than the compacted change log gets its whole
    /// set, deletions included by omission; one at or past the floor syncs
    /// incrementally.
    #[test]
    fn a_sync_since_a_compacted_revision_is_answered_in_full() {
        let (_dir, core, leaf, _) = crate::core::testing::core_with_agent();
        let agent = || core.authenticate_agent(Some(&leaf)).unwrap();
        let parent = agent().record.spiffe_id;
        let kept = create(
            &core,
            "spiffe://example.org/kept",
            &parent,
            "unix:uid:1",
            false,
        );
        let gone = create(
            &core,
            "spiffe://example.org/gone",
            &parent,
            "unix:uid:2",
            false,
        );
        let old = core.sync_entries(&agent(), SyncRequest::default()).unwrap();
        core.delete_entry(&gone.id).unwrap();
        let new = create(
            &core,
            "spiffe://example.org/new",
            &parent,
            "unix:uid:3",
            false,
        );
        let since = |since| {
            core.sync_entries(
                &agent(),
                SyncRequest {
                    since,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let before = since(old.revision);
        assert!(!before.full && before.deleted == [gone.id.clone()]);
        core.store.compact_change_log(new.revision).unwrap();
        let after = since(old.revision);
        assert!(after.full && after.deleted.is_empty());
        let mut ids: Vec<&str> = after.upserted.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        let mut want = vec![kept.id.as_str(), new.id.as_str()];
        want.sort_unstable();
        assert_eq!(ids, want);
        let floor = core.store.change_log_floor().unwrap();
        assert!(
            !since(floor).full,
            "at the floor every later change is still there"
        );
    }

    /// A sync tells an agent of the revocations under its own entries only, and follows
    /// entry changes (the memo is rebuilt at a new revision).
    #[test]
    fn revocations_are_sent_to_the_agents_they_concern() {
        let (_dir, core, leaf, _) = crate::core::testing::core_with_agent();
        let agent = || core.authenticate_agent(Some(&leaf)).unwrap();
        let parent = agent().record.spiffe_id;
        let other = "spiffe://example.org/ztid/agent/join_token/elsewhere";
        let mine = create(
            &core,
            "spiffe://example.org/w",
            &parent,
            "unix:uid:1",
            false,
        );
        let theirs = create(&core, "spiffe://example.org/x", other, "unix:uid:1", false);
        let seg = "0123456789abcdef0123456789abcdef";
        let revoke = |kind, target: &str| core.revoke(kind, target, "test", "tester").unwrap();
        revoke(
            RevocationKind::Instance,
            &format!("spiffe://example.org/w/{seg}"),
        );
        revoke(
            RevocationKind::Instance,
            &format!("spiffe://example.org/x/{seg}"),
        );
        // Two segments under an entry's ID: no instance of it.
        revoke(
            RevocationKind::Instance,
            &format!("spiffe://example.org/w/a/{seg}"),
        );
        let mine_revoked = revoke(RevocationKind::Entry, &mine.id);
        revoke(RevocationKind::Entry, &theirs.id);
        let memo = RevocationMemo::default();
        let sync = core.sync_entries(&agent(), SyncRequest::default()).unwrap();
        let got = core
            .revocations_for_agent(&sync.parents, sync.revision, &memo)
            .unwrap();
        assert_eq!(
            got,
            AgentRevocations {
                instances: vec![format!("spiffe://example.org/w/{seg}")],
                entries: vec![(mine.id.clone(), mine_revoked.revoked_at)],
            }
        );
        // Another agent's parents see only theirs.
        let got = core
            .revocations_for_agent(&[other.to_string()], sync.revision, &memo)
            .unwrap();
        assert_eq!(got.instances, vec![format!("spiffe://example.org/x/{seg}")]);
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.entries[0].0, theirs.id);
        // An entry of the agent's with the other SPIFFE ID: the other instance concerns
        // it too, from the next revision on.
        create(
            &core,
            "spiffe://example.org/x",
            &parent,
            "unix:uid:2",
            false,
        );
        let sync = core
            .sync_entries(
                &agent(),
                SyncRequest {
                    since: sync.revision,
                    ..Default::default()
                },
            )
            .unwrap();
        let got = core
            .revocations_for_agent(&sync.parents, sync.revision, &memo)
            .unwrap();
        assert_eq!(
            got.instances,
            vec![
                format!("spiffe://example.org/w/{seg}"),
                format!("spiffe://example.org/x/{seg}")
            ]
        );
        // Nothing revoked: nothing sent.
        let (_dir2, core2, leaf2, _) = crate::core::testing::core_with_agent();
        let a2 = core2.authenticate_agent(Some(&leaf2)).unwrap();
        let s2 = core2.sync_entries(&a2, SyncRequest::default()).unwrap();
        assert_eq!(
            core2
                .revocations_for_agent(&s2.parents, s2.revision, &RevocationMemo::default())
                .unwrap(),
            AgentRevocations::default()
        );
    }

    /// A federation poll that changes no federated bundle (a failed fetch, or the same
    /// bundle again) tells no agent anything: agents hold federated bundles, not the
    /// relationships' poll times. A peer whose endpoint is down (or that asks for a
    /// 0 s refresh hint) is polled every `federation_min_refresh_seconds` (1 s by
    /// default); each poll used to wake every agent of the trust domain into a sync.
    #[tokio::test]
    async fn a_federation_poll_that_changes_no_bundle_wakes_no_agent() {
        let (_dir, core, _, _) = crate::core::testing::core_with_agent();
        let feed = ChangeFeed::start(&core, 1);
        let mut state = feed.subscribe();
        let before = state.borrow().federation_version;
        core.create_federation(
            crate::federation::FederationRecord {
                trust_domain: "b.test".into(),
                // Nothing listens there: every poll fails at once.
                bundle_endpoint_url: "https://127.0.0.1:9/".into(),
                profile: "https_web".into(),
                ..Default::default()
            },
            "test",
        )
        .unwrap();
        for _ in 0..3 {
            assert!(core.refresh_federation("b.test").await.is_err());
        }
        // Then a federated bundle that changes: the feed handles changes in order, so
        // once this one has reached the agents, so has anything the polls announced.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = ca.self_signed(&key).unwrap().pem();
        core.set_federated_bundle_from("b.test", "pem", pem.as_bytes(), "test")
            .unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            state.wait_for(|s| s.federation_version > before),
        )
        .await
        .expect("the bundle change reached the agents")
        .unwrap();
        assert_eq!(
            state.borrow().federation_version,
            before + 1,
            "the relationship's creation and its failed polls told every agent that \
             federation changed"
        );
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_limit(0, DEFAULT_PAGE_SIZE), DEFAULT_PAGE_SIZE);
        assert_eq!(page_limit(7, DEFAULT_PAGE_SIZE), 7);
        assert_eq!(page_limit(u32::MAX, DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE);
    }
}
