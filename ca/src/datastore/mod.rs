//! Persistent state behind one narrow trait: registration entries, attested agents,
//! join tokens, federation records and each server's authorities. Two stores implement
//! it: [`SledStore`] (embedded, one server, the default) and [`PgStore`] (PostgreSQL,
//! several servers on one database).
//!
//! Every lookup the hot path makes (entry by id, agent by SPIFFE ID, token by hash,
//! entries by parent, one parent's changes since a revision) is a keyed read, so
//! minting and an agent's incremental sync cost the same with 100 entries or 1,000,000.
//!
//! The trait is synchronous: its callers are synchronous code (often on a tokio worker
//! thread). [`PgStore`] runs each call on a small runtime of its own; see
//! `postgres::bridge` for why that is safe from every kind of caller.
//!
//! Cluster-wide rules both stores keep:
//! - entry revisions are drawn so that a reader that has seen revision N has seen every
//!   change below N (no sync ever misses a change committed later with a lower revision);
//! - a join token is taken at most once, whichever server takes it;
//! - each server has its own CA state and audit anchor ([`DataStore::server_id`]);
//!   [`DataStore::cluster_ca_states`] reads every server's authorities for the bundle.

pub mod migrate;
mod postgres;
mod sled_store;

pub use postgres::{PgOptions, PgStore};
pub use sled_store::SledStore;

use ring::digest;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use ztid_spiffe::Selector;

use crate::Result;

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// Random id (32 hex characters).
    pub id: String,
    /// The SPIFFE ID; for per-instance entries, the prefix of every instance's ID.
    pub spiffe_id: String,
    /// The agent or node alias whose workloads this entry is for.
    pub parent_id: String,
    /// What a caller must have to match.
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime in seconds; 0 means the server default.
    pub x509_ttl: i64,
    /// JWT-SVID lifetime in seconds; 0 means the server default.
    pub jwt_ttl: i64,
    /// One SVID for every matching process on a node, instead of one per instance.
    pub shared: bool,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles this entry's workloads receive.
    pub federates_with: Vec<String>,
    /// A node alias rather than a workload entry.
    pub node: bool,
    /// Operator-chosen hint passed through the Workload API.
    #[serde(default)]
    pub hint: String,
    /// Datastore revision of the last change.
    pub revision: u64,
    /// Unix seconds.
    pub created_at: i64,
}

/// One change in the entry log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryChange {
    /// The revision of the change.
    pub revision: u64,
    /// The entry changed.
    pub entry_id: String,
    /// Its parent, so that agents can filter without reading the entry.
    pub parent_id: String,
    /// Whether the entry is a node alias.
    pub node: bool,
    /// True for a deletion.
    pub deleted: bool,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// `spiffe://TD/ztid/agent/<method>/<node id>`.
    pub spiffe_id: String,
    /// The attestation method.
    pub method: String,
    /// Selectors proved at attestation.
    pub selectors: Vec<Selector>,
    /// Aliases granted by the evidence itself (a join token's alias).
    pub granted_aliases: Vec<String>,
    /// Node aliases the agent belongs to (granted plus matching node entries).
    pub aliases: Vec<String>,
    /// Serial (hex) of the agent's current SVID.
    pub serial: String,
    /// Serial of the SVID it replaced at the last renewal, still accepted until it expires,
    /// so calls already in flight on an old connection do not fail.
    pub previous_serial: Option<String>,
    /// `notAfter` of the previous SVID.
    pub previous_expires_at: i64,
    /// `notAfter` of the current SVID.
    pub expires_at: i64,
    /// Banned agents cannot attest again.
    pub banned: bool,
    /// Unix seconds of the last attestation.
    pub attested_at: i64,
    /// Hex SHA-256 of the last evidence.
    pub evidence_digest: String,
    /// Authorities the agent reported as still in use at its last sync.
    #[serde(default)]
    pub authorities_in_use: Vec<String>,
    /// Unix seconds of its last sync.
    #[serde(default)]
    pub last_sync_at: i64,
    /// The entry revision when the server last saw this agent's aliases change. A sync
    /// since a lower revision is answered in full: the answer that carried the new
    /// aliases' entries may never have reached the agent. (Not written while 0, so
    /// records stored before this field compare equal in a compare-and-swap.)
    #[serde(default, skip_serializing_if = "is_zero")]
    pub aliases_revision: u64,
    /// Hex SHA-256 of the current SVID's SubjectPublicKeyInfo. A call must present a
    /// certificate for this key (its TLS handshake proved the caller holds it), so a
    /// certificate made with a stolen authority key for the agent's ID and serial is
    /// refused unless the agent's own key was stolen too. Empty in records written
    /// before this field (not written while empty, as `aliases_revision`): such an
    /// agent is bound at its next renewal or attestation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_sha256: String,
    /// The same for the previous SVID (`previous_serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_sha256: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A join token, by hash only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// Random id, used as the node id of the agent that redeems it.
    pub id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Node alias the redeeming agent becomes a child of.
    pub alias: Option<String>,
}

/// A token-exchange grant (issue 14, docs/token-exchange.md): what one identity may
/// obtain at the token endpoint. Deny by default: no grant, no token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Random id (32 hex characters).
    pub id: String,
    /// An entry's SPIFFE ID: covers it and every instance of it (one more path segment).
    pub spiffe_id: String,
    /// The one audience (a resource URI or a logical name) tokens may name.
    pub audience: String,
    /// The scopes tokens may carry (at least one).
    pub scopes: Vec<String>,
    /// Token lifetime in seconds; 0 means the `[sts]` default.
    pub ttl_seconds: i64,
    /// Tokens per caller instance per minute, per server; 0 means no cap.
    pub max_per_minute: u32,
    /// Selectors (`type:value`) the caller's node must have proved.
    pub node_selectors: Vec<String>,
    /// Whether this identity may act for another (delegation, as the actor).
    pub may_delegate: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// What a revocation kills (the kill switch, docs/token-exchange.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationKind {
    /// One instance: its SPIFFE ID, whenever its credentials were issued.
    Instance,
    /// Every instance of an entry whose credentials were issued before `revoked_at`.
    Entry,
    /// Every credential issued through an agent before `revoked_at` (the agent is also
    /// banned).
    Node,
    /// Every admin credential of one admin identity (`spiffe://TD/ztid/admin/NAME`)
    /// issued before `revoked_at`: a stolen one stops counting, a new one can be issued.
    Admin,
}

impl RevocationKind {
    /// Every kind.
    pub const ALL: [RevocationKind; 4] = [
        RevocationKind::Instance,
        RevocationKind::Entry,
        RevocationKind::Node,
        RevocationKind::Admin,
    ];

    /// The kind's name on the wire (`instance`, `entry`, `node`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::Instance => "instance",
            RevocationKind::Entry => "entry",
            RevocationKind::Node => "node",
            RevocationKind::Admin => "admin",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for RevocationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A revocation, kept until every credential issued before it has expired. Stored
/// under (`kind`, `target`): revoking the same target again replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// What it kills.
    pub kind: RevocationKind,
    /// Instance: the instance's SPIFFE ID; entry: the entry ID; node: the agent's SPIFFE
    /// ID; admin: the admin's SPIFFE ID.
    pub target: String,
    /// Instance and admin: the target; entry: the entry's SPIFFE ID (its instances are
    /// revoked); node: empty.
    pub spiffe_id: String,
    /// Unix seconds. Entry, node and admin revocations kill credentials issued before it.
    pub revoked_at: i64,
    /// Unix seconds: when the record is dropped (nothing issued before `revoked_at` is
    /// alive any more).
    pub expires_at: i64,
    /// The operator's reason (may be empty).
    #[serde(default)]
    pub reason: String,
}

impl RevocationRecord {
    /// The key the record is stored under: its kind and target.
    pub fn key(&self) -> String {
        revocation_key(self.kind, &self.target)
    }
}

/// The store key of the revocation of `kind` for `target`.
pub(crate) fn revocation_key(kind: RevocationKind, target: &str) -> String {
    format!("{}\n{}", kind.as_str(), target)
}

/// The refusal of a grant beyond [`crate::limits::MAX_GRANTS`].
pub(crate) fn too_many_grants() -> crate::Error {
    crate::Error::Precondition(format!(
        "at most {} grants may exist: delete one (grant delete) before creating another",
        crate::limits::MAX_GRANTS
    ))
}

/// The refusal of an admin revocation beyond [`crate::limits::MAX_ADMIN_REVOCATIONS`].
pub(crate) fn too_many_admin_revocations() -> crate::Error {
    crate::Error::Precondition(format!(
        "at most {} admin credential revocations may be in force: wait for older ones to \
         expire, or withdraw the admin's roles in [remote_admin.roles]",
        crate::limits::MAX_ADMIN_REVOCATIONS
    ))
}

/// The refusal of a revocation beyond [`crate::limits::MAX_REVOCATIONS`].
pub(crate) fn too_many_revocations() -> crate::Error {
    crate::Error::Precondition(format!(
        "at most {} revocations may be in force: revoke the entry or node instead of \
         its instances one by one, or wait for older revocations to expire",
        crate::limits::MAX_REVOCATIONS
    ))
}

/// A hardware identifier recorded with an agent's ban: a selector the banned agent's
/// attestation proved that names a TPM (discrete, or an SEV-SNP guest's vTPM) rather
/// than one launch or one agent ID (see `crate::core::attestation::hardware_identifiers`). Any node whose
/// attestation proves it again, under whatever agent ID or method (`multi` included), is
/// refused as banned.
/// Stored under (`identifier`, `agent`): the same TPM seen by two banned agents is
/// recorded twice, and lifting one ban (`agent evict`) leaves the other's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareBanRecord {
    /// The selector, `type:value` (`tpm:ek-hash:<hex>`).
    pub identifier: String,
    /// The SPIFFE ID of the banned agent it was recorded with.
    pub agent: String,
    /// Unix seconds of the ban.
    pub banned_at: i64,
}

impl HardwareBanRecord {
    /// The key the record is stored under: its identifier and agent.
    pub(crate) fn key(&self) -> String {
        format!("{}\n{}", self.identifier, self.agent)
    }
}

/// The refusal of hardware bans beyond [`crate::limits::MAX_HARDWARE_BANS`].
pub(crate) fn too_many_hardware_bans() -> crate::Error {
    crate::Error::Precondition(format!(
        "at most {} banned hardware identifiers may be recorded: lift bans no longer needed \
         (agent evict of a banned agent) before banning more",
        crate::limits::MAX_HARDWARE_BANS
    ))
}

/// The lifecycle state of an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityState {
    /// Created, published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Replaced; still in the bundle while SVIDs it signed live.
    Old,
}

/// An X.509 or JWT authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityRecord {
    /// Authority id (for X.509, the hex serial of its certificate; for JWT, the kid).
    pub id: String,
    /// The key manager's id of its private key.
    pub key_id: String,
    /// The CA certificate (X.509 authorities only).
    #[serde(default, with = "hex_bytes")]
    pub cert_der: Vec<u8>,
    /// DER SubjectPublicKeyInfo of its key.
    #[serde(with = "hex_bytes")]
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub not_after: i64,
    /// Lifecycle state.
    pub state: AuthorityState,
    /// Unix seconds.
    #[serde(default)]
    pub not_before: i64,
    /// Tainted authorities stay in the bundle, but every SVID they signed is replaced.
    #[serde(default)]
    pub tainted: bool,
    /// Unix seconds of the taint (0 if not tainted).
    #[serde(default)]
    pub tainted_at: i64,
    /// Certificates between this intermediate and the upstream root (X.509 under an
    /// upstream authority only), DER.
    #[serde(default, with = "hex_list")]
    pub upstream_chain: Vec<Vec<u8>>,
}

mod hex_list {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(hex::encode))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| hex::decode(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The CA's persistent state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CaState {
    /// X.509 authorities, newest last.
    pub x509: Vec<AuthorityRecord>,
    /// JWT authorities, newest last.
    pub jwt: Vec<AuthorityRecord>,
    /// `spiffe_sequence` of the bundle.
    pub bundle_sequence: u64,
    /// Unix seconds when an operator retired this server (`server retire`): its
    /// authorities were tainted then, the state is written by no one but a revoke of
    /// one of them, and the server refuses to start again. Not written while unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Filters for listing entries; each set field must match.
#[derive(Debug, Clone, Default)]
pub struct EntryFilter {
    /// Exact SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Exact parent ID.
    pub parent_id: Option<String>,
}

/// What kind of record changed, for [`DataStore::subscribe_changes`]: a server that keeps
/// something in memory (its bundle, the federation poller's relationships) reloads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeTopic {
    /// Registration entries (create, update, delete, import).
    Entries,
    /// Agents: a new agent, an eviction, a ban or unban, a new SVID serial (not the
    /// bookkeeping of every sync, which changes nothing another server acts on).
    Agents,
    /// Some server's CA state (its authorities and their lifecycle).
    Authorities,
    /// Federation relationships and federated bundles.
    Federation,
}

impl ChangeTopic {
    /// Every topic: what a subscriber reloads after it may have missed changes.
    pub const ALL: [ChangeTopic; 4] = [
        ChangeTopic::Entries,
        ChangeTopic::Agents,
        ChangeTopic::Authorities,
        ChangeTopic::Federation,
    ];

    /// The topic's name (the PostgreSQL notification payload).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeTopic::Entries => "entries",
            ChangeTopic::Agents => "agents",
            ChangeTopic::Authorities => "authorities",
            ChangeTopic::Federation => "federation",
        }
    }

    /// The topic named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Proof that this server holds a cluster-wide role (see [`DataStore::try_leader`]).
/// Dropping it gives the role up. With PostgreSQL the role can also be lost without a
/// drop, when the connection holding it dies: check [`LeaderGuard::is_held`] before each
/// round of the work, or wait on [`LeaderGuard::lost`].
pub struct LeaderGuard {
    held: watch::Receiver<bool>,
    /// What keeps the role (PostgreSQL: the session holding the advisory lock).
    _holder: Box<dyn std::any::Any + Send + Sync>,
}

impl LeaderGuard {
    /// A role held by `holder` for as long as `held` says true and its sender lives.
    pub(crate) fn new(
        held: watch::Receiver<bool>,
        holder: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        Self {
            held,
            _holder: holder,
        }
    }

    /// A role that is never lost (one server: there is nobody to share it with).
    pub(crate) fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        Self::new(rx, Box::new(tx))
    }

    /// Whether the role is still held.
    pub fn is_held(&self) -> bool {
        self.held.has_changed().is_ok() && *self.held.borrow()
    }

    /// Completes when the role is lost (never, while it is held).
    pub async fn lost(&mut self) {
        let _ = self.held.wait_for(|held| !*held).await;
    }
}

impl std::fmt::Debug for LeaderGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderGuard")
            .field("held", &self.is_held())
            .finish()
    }
}

/// Identity of an entry for duplicate detection: SHA-256 over its SPIFFE ID, parent,
/// kind and sorted selectors. Both stores refuse a second entry with the same one.
pub(crate) fn identity_key(e: &EntryRecord) -> Vec<u8> {
    let mut sels: Vec<String> = e.selectors.iter().map(|s| s.to_string()).collect();
    sels.sort();
    let text = format!(
        "{}\n{}\n{}\n{}",
        e.spiffe_id,
        e.parent_id,
        e.node,
        sels.join("\n")
    );
    digest::digest(&digest::SHA256, text.as_bytes())
        .as_ref()
        .to_vec()
}

/// The refusal of an entry whose identity another entry (`existing`) has.
pub(crate) fn duplicate_entry(existing: &str) -> crate::Error {
    crate::Error::AlreadyExists(format!(
        "an entry with the same SPIFFE ID, parent and selectors exists: {existing}"
    ))
}

/// A sender of change topics with no receiver yet.
pub(crate) fn change_channel() -> broadcast::Sender<ChangeTopic> {
    broadcast::channel(256).0
}

/// The server's persistent state.
pub trait DataStore: Send + Sync + 'static {
    /// The id of the server this store was opened for: the owner of the CA state and
    /// audit anchor this handle reads and writes.
    fn server_id(&self) -> &str;

    /// Stores a new entry, assigning its revision; fails if one with the same
    /// SPIFFE ID, parent and selectors exists.
    fn create_entry(&self, entry: EntryRecord) -> Result<EntryRecord>;
    /// An entry by id.
    fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>>;
    /// Deletes an entry, returning it.
    fn delete_entry(&self, id: &str) -> Result<Option<EntryRecord>>;
    /// Entries matching a filter (indexed when a field is set).
    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<EntryRecord>>;
    /// Node alias entries.
    fn node_entries(&self) -> Result<Vec<EntryRecord>>;
    /// How many entries there are (without reading them).
    fn count_entries(&self) -> Result<usize>;
    /// Entry changes after `revision`, oldest first.
    fn entry_changes_since(&self, revision: u64) -> Result<Vec<EntryChange>>;
    /// Changes to entries under `parent_id` after `revision`, oldest first (what one
    /// agent's incremental sync needs, without reading other agents' changes).
    fn entry_changes_for_parent_since(
        &self,
        parent_id: &str,
        revision: u64,
    ) -> Result<Vec<EntryChange>>;
    /// The newest entry revision (0 when none).
    fn current_revision(&self) -> Result<u64>;
    /// The highest revision compacted out of the change log (0: none). Every change
    /// after it is still in the log, so a sync since a revision below it cannot be
    /// answered incrementally (it is answered in full). Read it after the changes:
    /// compaction raises it before, or atomically with, removing them.
    fn change_log_floor(&self) -> Result<u64>;
    /// Removes the changes at revisions below `below` from the change log (never the
    /// newest change, which carries the current revision) and raises the floor to
    /// match; returns how many changes were removed.
    fn compact_change_log(&self, below: u64) -> Result<u64>;
    /// Deletes the join tokens that expired before `before` (Unix seconds); returns how
    /// many.
    fn prune_join_tokens(&self, before: i64) -> Result<u64>;
    /// Replaces the entry with `entry.id` by `entry`, with a new revision and a change in
    /// the log (its `created_at` stays the stored one). The same uniqueness rule as
    /// [`create_entry`](Self::create_entry) holds against every other entry. When the
    /// parent changes, the old parent's log gets a deletion (one revision) before the new
    /// parent's log gets the entry (the next one), so both agents see it. `NotFound` if
    /// there is no such entry.
    fn update_entry(&self, entry: EntryRecord) -> Result<EntryRecord>;
    /// Stores an entry as it is, keeping its id and revision (for `datastore migrate`,
    /// into a store whose revisions are all below it): the change log gets it at that
    /// revision, and later revisions are drawn above it. Same uniqueness rule.
    fn import_entry(&self, entry: EntryRecord) -> Result<()>;
    /// At most `limit` entries matching `filter` with an id after `after_id`, ordered by
    /// id (byte order): a page, and the id of its last entry is the next page's cursor.
    fn list_entries_page(
        &self,
        filter: &EntryFilter,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>>;

    /// Creates or replaces an agent.
    fn put_agent(&self, agent: &AgentRecord) -> Result<()>;
    /// An agent by SPIFFE ID.
    fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>>;
    /// Every agent.
    fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Removes an agent, returning it.
    fn delete_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>>;
    /// Writes `new` (`None`: deletes the agent) only if the stored agent equals
    /// `expected` (`None`: there is none), atomically; true if it was written. Every
    /// read-modify-write of an agent goes through this, so a change made in between (an
    /// eviction, a ban, a renewal, on any server) is never overwritten by a record read
    /// before it. Notifies [`ChangeTopic::Agents`] as `put_agent` and `delete_agent` do.
    /// `InvalidInput` if `new` is for another SPIFFE ID.
    fn compare_and_swap_agent(
        &self,
        spiffe_id: &str,
        expected: Option<&AgentRecord>,
        new: Option<&AgentRecord>,
    ) -> Result<bool>;
    /// At most `limit` agents with a SPIFFE ID after `after`, ordered by SPIFFE ID (byte
    /// order).
    fn list_agents_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<AgentRecord>>;
    /// How many agents there are.
    fn count_agents(&self) -> Result<usize>;

    /// Stores a join token under its hash.
    fn put_join_token(&self, hash: &[u8; 32], token: &JoinTokenRecord) -> Result<()>;
    /// Removes and returns the token with this hash, atomically: of several servers
    /// taking the same token at once, exactly one gets it.
    fn take_join_token(&self, hash: &[u8; 32]) -> Result<Option<JoinTokenRecord>>;
    /// Every join token with its hash, ordered by hash (for `datastore migrate`).
    fn list_join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRecord)>>;

    /// This server's CA state, if its CA was initialised.
    fn load_ca_state(&self) -> Result<Option<CaState>>;
    /// Replaces this server's CA state; refused (`Precondition`) once an operator
    /// retired this server.
    fn store_ca_state(&self, state: &CaState) -> Result<()>;
    /// Replaces the CA state of another server, `server_id`, if it still is `expected`
    /// (false otherwise): only to retire a server that is gone, or to revoke a retired
    /// server's authority. A sled store holds one server and refuses.
    fn compare_and_swap_peer_ca_state(
        &self,
        server_id: &str,
        expected: &CaState,
        new: &CaState,
    ) -> Result<bool>;
    /// Every server's CA state with its server id, ordered by server id (one store: just
    /// its own, if initialised). The trust bundle is the union of their authorities.
    fn cluster_ca_states(&self) -> Result<Vec<(String, CaState)>>;
    /// The next bundle sequence number, cluster-wide: above every number it returned
    /// before and above every stored CA state's `bundle_sequence`.
    fn next_bundle_sequence(&self) -> Result<u64>;

    /// Tries to take the cluster-wide role `name` (once-per-cluster work, such as
    /// polling federated bundle endpoints): `None` if another server holds it. With one
    /// server the role is always granted. With PostgreSQL it is a session advisory lock
    /// on a connection of its own, released when the guard is dropped or the connection
    /// dies.
    fn try_leader(&self, name: &str) -> Result<Option<LeaderGuard>>;
    /// Change notifications from every server (PostgreSQL: `LISTEN`/`NOTIFY`, sent in
    /// the writing transaction; one store: sent after each write). A receiver that lags
    /// (`RecvError::Lagged`) or a store that reconnected (it sends every topic) means
    /// changes may have been missed: reload what the topic covers.
    fn subscribe_changes(&self) -> broadcast::Receiver<ChangeTopic>;

    /// Stores a federated trust domain's bundle (an opaque record, see
    /// `crate::federation`), replacing any. Never merged with another domain's.
    fn put_federated_bundle(&self, trust_domain: &str, record: &[u8]) -> Result<()>;
    /// A federated trust domain's bundle record.
    fn get_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>>;
    /// Every federated bundle record, ordered by trust domain.
    fn list_federated_bundles(&self) -> Result<Vec<Vec<u8>>>;
    /// Removes a federated bundle record, returning it.
    fn delete_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>>;
    /// Stores `record` as `trust_domain`'s federated bundle only while the stored
    /// bundle record is `expected` (`None`: there is none) and, with `while_federation`,
    /// the domain's relationship record is those bytes; one atomic step, and a
    /// relationship changed or deleted meanwhile waits for it or is seen changed.
    /// False (nothing written) if either moved. Every read-check-write of a federated
    /// bundle goes through this, so one written in between, on any server (a poll, a
    /// `bundle set`, a relationship moved to another endpoint), is never overwritten by
    /// a decision made before it. Notifies [`ChangeTopic::Federation`].
    fn compare_and_put_federated_bundle(
        &self,
        trust_domain: &str,
        expected: Option<&[u8]>,
        while_federation: Option<&[u8]>,
        record: &[u8],
    ) -> Result<bool>;
    /// Stores a federation relationship record, replacing any.
    fn put_federation(&self, trust_domain: &str, record: &[u8]) -> Result<()>;
    /// Replaces a relationship record only if it still is `expected` (false, nothing
    /// written, if it changed or is gone): a poll's status written back never restores
    /// a relationship an operator changed or deleted on another server meanwhile.
    fn compare_and_swap_federation(
        &self,
        trust_domain: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool>;
    /// Every federation relationship record, ordered by trust domain.
    fn list_federations(&self) -> Result<Vec<Vec<u8>>>;
    /// Removes a federation relationship record, returning it.
    fn delete_federation(&self, trust_domain: &str) -> Result<Option<Vec<u8>>>;

    /// Stores a grant under its id, replacing any; a new one beyond
    /// [`crate::limits::MAX_GRANTS`] is refused (`Precondition`).
    fn put_grant(&self, grant: &GrantRecord) -> Result<()>;
    /// A grant by id.
    fn get_grant(&self, id: &str) -> Result<Option<GrantRecord>>;
    /// Every grant, ordered by id (byte order).
    fn list_grants(&self) -> Result<Vec<GrantRecord>>;
    /// Removes a grant, returning it.
    fn delete_grant(&self, id: &str) -> Result<Option<GrantRecord>>;
    /// Stores a revocation under its kind and target, replacing any; a new one beyond
    /// [`crate::limits::MAX_REVOCATIONS`] is refused (`Precondition`). Admin revocations
    /// are kept apart, in a tree (table) of their own bounded by
    /// [`crate::limits::MAX_ADMIN_REVOCATIONS`]: the kill switch's records cannot crowd
    /// them out, and a server of an earlier version, which reads only the kill switch's,
    /// never meets a kind it does not know.
    fn put_revocation(&self, revocation: &RevocationRecord) -> Result<()>;
    /// Every stored revocation (expired ones too, until pruned), ordered by kind and
    /// target.
    fn list_revocations(&self) -> Result<Vec<RevocationRecord>>;
    /// Deletes the revocations that expired before `before` (Unix seconds); returns how
    /// many.
    fn prune_revocations(&self, before: i64) -> Result<u64>;

    /// Records hardware identifiers with an agent's ban, all or none, replacing those
    /// stored under the same identifier and agent; refused (`Precondition`) when the new
    /// ones would take the table beyond [`crate::limits::MAX_HARDWARE_BANS`].
    fn put_hardware_bans(&self, bans: &[HardwareBanRecord]) -> Result<()>;
    /// The hardware bans recorded for any of `identifiers` (a keyed read per
    /// identifier), ordered by identifier and agent.
    fn hardware_bans_of(&self, identifiers: &[String]) -> Result<Vec<HardwareBanRecord>>;
    /// Removes every hardware ban recorded with the ban of `agent` (its ban lifted);
    /// returns how many.
    fn delete_hardware_bans(&self, agent: &str) -> Result<u64>;
    /// The hardware bans recorded with the bans of any of `agents` (what `agent show`
    /// lists), ordered by agent and identifier. One read for a page of agents.
    fn hardware_bans_of_agents(&self, agents: &[String]) -> Result<Vec<HardwareBanRecord>>;
    /// Every hardware ban, ordered by identifier and agent.
    fn list_hardware_bans(&self) -> Result<Vec<HardwareBanRecord>>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;

    /// This server's audit log anchor outside the audit directory (an opaque record, see
    /// `crate::audit::anchor`): the last sealed record its audit writer reached. Each
    /// server has its own (its own hash-chained log).
    fn audit_anchor(&self) -> Result<Option<Vec<u8>>>;
    /// Stores the audit anchor for record `seq` unless the one stored is for a later
    /// record: the anchor only moves forward. Returns whether it was stored.
    fn advance_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<bool>;
    /// Replaces the audit anchor even with an earlier one: only for an operator's
    /// explicit `audit accept-rollback`, which records that it did so.
    fn replace_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<()>;
}

/// Refuses a compare-and-swap whose new record is for another agent than the key.
/// The refusal to write the CA state of a server retired at `at`.
pub(crate) fn retired_refusal(server_id: &str, at: i64) -> crate::Error {
    crate::Error::Precondition(format!(
        "server {server_id} was retired (server retire) at {at} (Unix seconds): it may not \
         sign again; start a new server with a new data directory instead"
    ))
}

pub(crate) fn check_cas_agent_id(spiffe_id: &str, new: Option<&AgentRecord>) -> Result<()> {
    match new {
        Some(n) if n.spiffe_id != spiffe_id => Err(crate::Error::InvalidInput(format!(
            "agent record for {} written under {spiffe_id}",
            n.spiffe_id
        ))),
        _ => Ok(()),
    }
}

/// Whether another server must hear of an agent write: a new or removed agent, a ban or
/// unban, a new SVID serial; not the bookkeeping of every sync.
pub(crate) fn agent_change_notable(old: Option<&AgentRecord>, new: Option<&AgentRecord>) -> bool {
    match (old, new) {
        (Some(o), Some(n)) => o.banned != n.banned || o.serial != n.serial,
        (None, None) => false,
        _ => true,
    }
}
