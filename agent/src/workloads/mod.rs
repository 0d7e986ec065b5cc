//! What the agent holds for workloads: the entries it may serve, the process
//! instances it has seen, and their SVIDs.
//!
//! Every process instance that matches a per-instance entry gets its own key pair,
//! generated here, and its own SPIFFE ID: the entry's ID plus a random segment that is
//! never reused. An instance is keyed by everything its identity was derived from (pid,
//! start time, pidfs id, executable, selectors), and is only ever looked up for a
//! connection whose process was just checked to be that very process: a stale connection
//! can neither read another process's instance nor create one in its name. Keys live only
//! in memory (zeroized on drop). When the process exits or execs, its instance and keys
//! are forgotten. `--shared` entries get one SVID per node, held here and handed to every
//! matching process.
//!
//! # Revocation (the kill switch)
//!
//! Every sync answer lists the per-instance identities and the entries an operator
//! revoked under this agent's entries. A held instance named there loses that identity
//! at once: its SVID and cached JWT-SVIDs are dropped (so nothing renews them), its open
//! streams end with `PermissionDenied` naming the revocation, and its process (pid, start
//! time, pidfs id: an exec does not escape it) is never served an identity of that entry
//! again, until it exits. Other processes of the same entry are not affected.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::sync::watch;
use zeroize::Zeroizing;
use ztid_proto::node as pb;

pub mod boot_clock;
pub mod jwt_cache;
pub mod pool;

pub use self::jwt_cache::{CachedJwt, JwtCache};
use self::pool::{PoolConfig, PoolView, PooledInstance, SvidPool};
use crate::selector::satisfies;
use crate::servers::NodeConnections;
use crate::workload_attestation::{
    exe_identity, process_start_time, AttestedPeer, ExeIdentity, ProcessInstance,
};
/// Most revoked instances, and most revoked entries, taken from one sync answer (the
/// server sends at most this many).
pub const MAX_REVOCATIONS: usize = 10_000;
/// An entry revocation covers the instances created before its `revoked_at` (the
/// server's clock) or up to this many seconds after it on the agent's clock: the skew the
/// server allows for when it backdates certificates. A kill switch errs on revoking.
pub const REVOCATION_CLOCK_TOLERANCE_SECONDS: i64 = 10;
/// Default cap on the process instances the agent holds at once
/// (`workload_max_instances`): each is a key and SVIDs in memory and mints at the CA, so
/// a local user forking processes that call the Workload API must not grow them without
/// bound.
pub const DEFAULT_MAX_INSTANCES: usize = 4096;
/// One uid's share of the instance cap, like its share of Workload API connections: half of
/// `workload_max_instances` (at least 1), so that no one local user can hold them all and
/// refuse everyone else's new processes.
pub fn instance_share(max_instances: usize) -> usize {
    (max_instances / 2).max(1)
}
/// Most often the instance map is searched for exited processes because it is full: each
/// search reads `/proc` for every instance held, so a caller refused at the cap cannot
/// make the agent do it on every request.
const FULL_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Counts one more refusal in `refusals` (when one was last logged, and how many since);
/// returns how many to log now, at most once per [`CAP_LOG_INTERVAL`].
fn refusals_to_log(refusals: &Mutex<(Option<std::time::Instant>, u64)>) -> Option<u64> {
    let mut r = refusals.lock().ok()?;
    r.1 += 1;
    let due = r.0.is_none_or(|t| t.elapsed() >= CAP_LOG_INTERVAL);
    due.then(|| {
        r.0 = Some(std::time::Instant::now());
        std::mem::take(&mut r.1)
    })
}

/// Most often a refusal at the instance cap is logged (with the count since the last).
const CAP_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
use crate::{unix_seconds, Error, Selector};

/// Why a process got no instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceError {
    /// The agent already holds its most live process instances; nothing was minted.
    #[error("workload instance cap reached: this agent holds {cap} live process instances, the most it may (workload_max_instances); a new process is served once others exit, or raise workload_max_instances in the agent's config (--workload-max-instances)")]
    CapReached {
        /// The cap in force.
        cap: usize,
    },
    /// The uid that would hold the new instance already holds its share of the cap (half
    /// of it); other uids' processes are still served. Nothing was minted.
    #[error("workload instance share reached for uid {uid}: it holds {share} live process instances, the most one user may (half of workload_max_instances); a new process of this uid is served once some of its processes exit, or raise workload_max_instances in the agent's config (--workload-max-instances)")]
    UserShareReached {
        /// The uid refused: the connecting process's (a delegate's, for the instances it
        /// holds on another process's behalf).
        uid: u32,
        /// Its share in force.
        share: usize,
    },
    /// Anything else (a poisoned lock, no randomness for the segment).
    #[error(transparent)]
    Failed(#[from] Error),
}

impl InstanceError {
    /// The Workload API's answer: the cap and a uid's share of it are `ResourceExhausted`
    /// with their message, the rest `Unavailable`.
    pub fn status(&self) -> tonic::Status {
        match self {
            Self::CapReached { .. } | Self::UserShareReached { .. } => {
                tonic::Status::resource_exhausted(self.to_string())
            }
            Self::Failed(e) => {
                tonic::Status::unavailable(format!("workload attestation failed: {e}"))
            }
        }
    }
}

/// How many of `instances` count against `uid`'s share (one pass over at most the cap).
fn held_by(instances: &HashMap<InstanceKey, Arc<Instance>>, uid: u32) -> usize {
    instances.keys().filter(|k| k.uid == uid).count()
}

/// One X509-SVID held for a workload.
pub struct HeldSvid {
    /// The entry it was minted for.
    pub entry_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key, zeroized when dropped.
    pub key: Zeroizing<Vec<u8>>,
    /// Unix seconds.
    pub not_after: i64,
    /// When to replace it: half its lifetime.
    pub renew_at: i64,
    /// The entry's hint.
    pub hint: String,
    /// The authority that signed it (hex serial of its CA certificate), if known.
    pub authority: Option<String>,
    /// The revision of the entry it was minted for: an entry changed since (its SPIFFE
    /// ID, DNS names, TTL, hint) is minted afresh at the next reconcile, not at half-life.
    pub entry_revision: u64,
}

/// What one instance is entitled to right now (empty: nothing).
#[derive(Default)]
pub struct IdentitySet {
    /// X509-SVIDs, ordered by SPIFFE ID.
    pub svids: Vec<Arc<HeldSvid>>,
}

/// What an instance is keyed by: the process and everything its selectors came from.
/// Two connections share an instance only if all of it is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceKey {
    /// pid + start time.
    pub process: ProcessInstance,
    /// The pidfd's inode on kernels with pidfs: unique per process for the boot.
    pub pidfs_id: Option<u64>,
    /// The executable it ran when attested.
    pub exe: Option<ExeIdentity>,
    /// Its selectors (connect-time uid and gid, executable path and hash). Shared with
    /// [`Instance::selectors`] and the instance map's key: one copy per instance.
    pub selectors: Arc<[Selector]>,
    /// For a delegate's instance of another process (named by pid): that process, whose
    /// revocations apply and whose exit also ends the instance. `None` otherwise.
    pub on_behalf_of: Option<ProcessBinding>,
    /// The uid whose share of the instance cap it counts against: the connect-time uid
    /// (SO_PEERCRED) of the process holding it, [`InstanceKey::process`]. For a
    /// delegate's instance that is the delegate's, not the target's nor one its
    /// selectors name: the delegate asked for it and holds it, and counting it against
    /// the target's uid would let a delegate use up other users' shares.
    pub uid: u32,
}

impl InstanceKey {
    /// The key of an attested connection peer.
    pub fn of(peer: &AttestedPeer) -> Self {
        Self {
            process: peer.process.instance,
            pidfs_id: peer.process.pidfs_id,
            exe: peer.process.exe,
            selectors: Arc::from(peer.selectors.as_slice()),
            on_behalf_of: None,
            uid: peer.process.uid,
        }
    }

    /// The process this instance belongs to, for revocations.
    pub fn binding(&self) -> ProcessBinding {
        self.on_behalf_of.unwrap_or(ProcessBinding {
            process: self.process,
            pidfs_id: self.pidfs_id,
        })
    }

    /// True while the process still runs the executable it was attested with. Used to
    /// forget instances; requests are checked against their own connection's pidfd.
    fn still_running(&self) -> bool {
        process_start_time(self.process.pid).is_ok_and(|t| t == self.process.start_time)
            && exe_identity(self.process.pid).ok() == self.exe
            && self.on_behalf_of.is_none_or(|b| b.still_running())
    }
}

/// A process, whatever it runs: what a revocation sticks to. An exec makes a new
/// [`Instance`] of the same process; only the process's exit ends the binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessBinding {
    /// pid + start time.
    pub process: ProcessInstance,
    /// The pidfd's inode on kernels with pidfs.
    pub pidfs_id: Option<u64>,
}

impl ProcessBinding {
    /// The process of an attested connection peer.
    pub fn of(peer: &AttestedPeer) -> Self {
        Self {
            process: peer.process.instance,
            pidfs_id: peer.process.pidfs_id,
        }
    }

    fn still_running(&self) -> bool {
        process_start_time(self.process.pid).is_ok_and(|t| t == self.process.start_time)
    }
}

/// What an operator revoked for one process: entries it is never served again, each with
/// the identity whose revocation caused it (for the refusal's message).
#[derive(Debug, Default)]
struct RevokedForProcess {
    /// By entry id (`instance revoke --entry`).
    entries: HashMap<String, String>,
    /// By entry SPIFFE ID, the per-instance ID without its segment (`instance revoke
    /// ID`): every entry of that SPIFFE ID would give the process the revoked ID again.
    bases: HashMap<String, String>,
}

impl RevokedForProcess {
    /// The revoked identity that bars `entry`, if any.
    fn bars(&self, entry: &pb::Entry) -> Option<&String> {
        self.entries
            .get(&entry.id)
            .or_else(|| self.bases.get(&entry.spiffe_id))
    }
}

/// The entries a process may be served now.
#[derive(Debug, Default)]
pub struct Entitlement {
    /// Entries its selectors match and no revocation bars.
    pub entries: Vec<pb::Entry>,
    /// A revoked identity among the entries its selectors match, if any.
    pub revoked: Option<String>,
}

/// Tells an instance's open streams that an identity of it was revoked: `count` grows by
/// one with each revocation, `identity` names the last. A stream remembers the count it
/// started with, so it ends only on a revocation made after it opened.
#[derive(Debug, Clone, Default)]
pub struct RevocationNotice {
    /// Revocations of this instance so far.
    pub count: u64,
    /// The identity last revoked.
    pub identity: Option<Arc<str>>,
}

/// The message of every refusal caused by a revocation.
pub fn revoked_message(identity: &str) -> String {
    format!("identity {identity} was revoked by an operator")
}

/// A process instance the agent has attested.
pub struct Instance {
    /// pid + start time.
    pub process: ProcessInstance,
    /// Everything the instance was derived from.
    pub key: InstanceKey,
    /// The random segment that ends its per-instance SPIFFE IDs.
    pub segment: String,
    /// Its selectors (the same allocation as `key.selectors`).
    pub selectors: Arc<[Selector]>,
    /// Its per-instance SVIDs by entry id.
    svids: tokio::sync::Mutex<HashMap<String, Arc<HeldSvid>>>,
    /// The current identity set, watched by its open streams.
    pub state: watch::Sender<Arc<IdentitySet>>,
    /// Its JWT-SVIDs by (SPIFFE ID, audience), and its recent mints.
    pub jwt_cache: Mutex<JwtCache>,
    /// When the agent created it (Unix seconds, the agent's clock): an entry revocation
    /// covers the instances created before it.
    pub created_at: i64,
    /// Revocations of its identities, watched by its open streams.
    pub revocations: watch::Sender<RevocationNotice>,
}

/// The entries this agent may serve, from the server's sync.
#[derive(Default)]
pub struct EntryCache {
    /// Entries by id.
    pub entries: BTreeMap<String, pb::Entry>,
    /// Parsed selectors by entry id.
    pub selectors: HashMap<String, Vec<Selector>>,
    /// The revision synced to.
    pub revision: u64,
    /// How many sync answers were applied: a pool take made from an entitlement read
    /// before the pool's last prune is out of date (see [`SvidPool::take`]).
    pub generation: u64,
}

impl EntryCache {
    /// Applies a sync answer; returns true if anything changed.
    pub fn apply(&mut self, sync: &pb::SyncEntriesResponse) -> bool {
        let before = self.revision;
        let mut changed = false;
        self.generation += 1;
        if sync.full {
            changed = !self.entries.is_empty() || !sync.upserted.is_empty();
            self.entries.clear();
            self.selectors.clear();
        }
        for e in &sync.upserted {
            let sels: Result<Vec<_>, _> = e.selectors.iter().map(Selector::try_from).collect();
            match sels {
                Ok(s) => {
                    self.selectors.insert(e.id.clone(), s);
                    self.entries.insert(e.id.clone(), e.clone());
                    changed = true;
                }
                Err(err) => {
                    // Its last version must not be served on: the new one may narrow it
                    // (a selector kind only a newer server knows), so it is dropped.
                    tracing::warn!(entry = %e.id, error = %err, "entry with selectors this agent cannot read: not served");
                    changed |= self.entries.remove(&e.id).is_some();
                    self.selectors.remove(&e.id);
                }
            }
        }
        for id in &sync.deleted {
            changed |= self.entries.remove(id).is_some();
            self.selectors.remove(id);
        }
        self.revision = sync.revision.max(if sync.full { 0 } else { before });
        changed
    }

    /// Entries whose selectors a caller has.
    pub fn matching(&self, selectors: &[Selector]) -> Vec<pb::Entry> {
        self.entries
            .values()
            .filter(|e| {
                self.selectors
                    .get(&e.id)
                    .is_some_and(|need| satisfies(selectors, need))
            })
            .cloned()
            .collect()
    }
}

/// One SVID to have signed: the entry, the SPIFFE ID, the private key (PKCS#8 DER) and
/// the CSR (DER).
type SignJob = (pb::Entry, String, Zeroizing<Vec<u8>>, Vec<u8>);

/// A fresh key pair and a CSR for `spiffe_id`.
fn key_and_csr(spiffe_id: &str) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), Error> {
    let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Config(format!("key generation: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(spiffe_id.to_string().try_into().map_err(
            |e: rcgen::Error| Error::InvalidSpiffeId(e.to_string()),
        )?)];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Config(format!("CSR: {e}")))?;
    let der = Zeroizing::new(key.serialize_der());
    // rcgen keeps its own PKCS#8 copy (ring's parsed key it cannot reach).
    zeroize::Zeroize::zeroize(&mut key);
    Ok((der, csr.der().to_vec()))
}

/// A per-instance segment in the one form the server accepts (32 lowercase hex, 128
/// random bits): the agent cannot choose a meaningful path, and the server checks it.
fn random_segment() -> Result<String, Error> {
    Ok(crate::spiffe_id::new_instance_segment()?)
}

/// Why a batch of CSRs got no answer.
enum SignFailure {
    /// No server answered (each candidate tried): what is held stays served while valid.
    Unreachable(Error),
    /// A refusal or a bad answer.
    Failed(Error),
}

impl From<SignFailure> for Error {
    fn from(f: SignFailure) -> Self {
        match f {
            SignFailure::Unreachable(e) | SignFailure::Failed(e) => e,
        }
    }
}

/// The workload side of the agent.
pub struct Workloads {
    node: Arc<arc_swap::ArcSwap<NodeConnections>>,
    bundle: watch::Receiver<Arc<crate::bundle::TrustBundle>>,
    /// Latest `exp` of the JWT-SVIDs handed out, by signing key, so the server
    /// can tell when a tainted JWT key no longer vouches for anything live.
    jwt_issued: Mutex<HashMap<String, i64>>,
    /// Entries from the server.
    pub entries: RwLock<EntryCache>,
    instances: Mutex<HashMap<InstanceKey, Arc<Instance>>>,
    /// Most instances held at once; a new process beyond it gets none.
    max_instances: usize,
    /// When the full instance map was last searched for exited processes.
    last_full_prune: Mutex<Option<std::time::Instant>>,
    /// When a refusal at the cap was last logged, and the refusals since.
    cap_refusals: Mutex<(Option<std::time::Instant>, u64)>,
    /// When a refusal at a uid's share of the cap was last logged, and the refusals since.
    share_refusals: Mutex<(Option<std::time::Instant>, u64)>,
    /// What was revoked for each process, kept until it exits.
    revoked: Mutex<HashMap<ProcessBinding, RevokedForProcess>>,
    shared: tokio::sync::Mutex<HashMap<String, Arc<HeldSvid>>>,
    /// Per-instance SVIDs minted ahead for new processes (see [`pool`]).
    pool: SvidPool,
    /// Other trust domains' bundles from the server (by trust domain name) and their
    /// version; each workload sees only those its entries federate with.
    pub federated: RwLock<(
        u64,
        std::collections::BTreeMap<String, Arc<crate::bundle::TrustBundle>>,
    )>,
}

impl Workloads {
    /// Workloads minting through `node`.
    pub fn new(
        node: Arc<arc_swap::ArcSwap<NodeConnections>>,
        bundle: watch::Receiver<Arc<crate::bundle::TrustBundle>>,
    ) -> Self {
        Self {
            node,
            bundle,
            jwt_issued: Mutex::new(HashMap::new()),
            entries: RwLock::new(EntryCache::default()),
            instances: Mutex::new(HashMap::new()),
            max_instances: DEFAULT_MAX_INSTANCES,
            last_full_prune: Mutex::new(None),
            cap_refusals: Mutex::new((None, 0)),
            share_refusals: Mutex::new((None, 0)),
            revoked: Mutex::new(HashMap::new()),
            shared: tokio::sync::Mutex::new(HashMap::new()),
            pool: SvidPool::new(PoolConfig::OFF),
            federated: RwLock::new((0, Default::default())),
        }
    }

    /// The same, keeping a pool of per-instance SVIDs minted ahead (see [`pool`]);
    /// [`Workloads::run_pool`] must then run in the background to fill it.
    pub fn with_pool(mut self, config: PoolConfig) -> Self {
        self.pool = SvidPool::new(config);
        self
    }

    /// The same, holding at most `max_instances` process instances at once (at least 1).
    pub fn with_max_instances(mut self, max_instances: usize) -> Self {
        self.max_instances = max_instances.max(1);
        self
    }

    /// The most process instances held at once.
    pub fn max_instances(&self) -> usize {
        self.max_instances
    }

    /// The most process instances held at once for one uid: [`instance_share`].
    pub fn instance_share(&self) -> usize {
        instance_share(self.max_instances)
    }

    /// The pool of SVIDs minted ahead.
    pub fn pool(&self) -> &SvidPool {
        &self.pool
    }

    /// The bundle sequence and tainted authorities in force, for checking pooled SVIDs.
    fn pool_state(&self) -> (u64, Vec<String>) {
        let b = self.bundle.borrow();
        (b.sequence, b.tainted.clone())
    }

    /// Fills the pool: mints, in one `SignX509Svids` call, fresh instances for the entry
    /// sets that lack them; returns how many were added.
    pub async fn refill_pool(&self) -> Result<usize, Error> {
        let minted_at = unix_seconds(std::time::SystemTime::now());
        let minted_monotonic = boot_clock::BootInstant::now();
        let (sequence, tainted) = self.pool_state();
        let deficits = self.pool.deficits(&PoolView {
            now: minted_at,
            monotonic_now: minted_monotonic,
            bundle_sequence: sequence,
            tainted: &tainted,
        });
        if deficits.is_empty() {
            return Ok(0);
        }
        let mut plans: Vec<(Vec<pb::Entry>, String)> = Vec::new();
        for d in deficits {
            for _ in 0..d.count {
                plans.push((d.entries.clone(), random_segment()?));
            }
        }
        // Key generation off the async threads: up to a hundred keys.
        let (jobs, plans) = tokio::task::spawn_blocking(move || {
            let mut jobs: Vec<SignJob> = Vec::new();
            for (entries, segment) in &plans {
                for e in entries {
                    let id = format!("{}/{segment}", e.spiffe_id);
                    let (key, csr) = key_and_csr(&id)?;
                    jobs.push((e.clone(), id, key, csr));
                }
            }
            Ok::<_, Error>((jobs, plans))
        })
        .await
        .map_err(|e| Error::Config(format!("key generation task: {e}")))??;
        let mut results = self.sign(jobs).await.map_err(Error::from)?.into_iter();
        let (sequence_now, tainted) = self.pool_state();
        let view = PoolView {
            now: unix_seconds(std::time::SystemTime::now()),
            monotonic_now: boot_clock::BootInstant::now(),
            bundle_sequence: sequence_now,
            tainted: &tainted,
        };
        let mut added = 0;
        for (entries, segment) in plans {
            let mut svids = Vec::with_capacity(entries.len());
            for _ in &entries {
                match results.next() {
                    Some(Ok(s)) => svids.push(s),
                    Some(Err(e)) => {
                        tracing::warn!(instance = %segment, error = %e, "server refused a pre-minted workload CSR")
                    }
                    None => {}
                }
            }
            // Only a whole instance is pooled; the SVIDs of a partial one expire unused.
            if svids.len() == entries.len() {
                let slot = PooledInstance {
                    segment,
                    minted_at,
                    minted_monotonic,
                    bundle_sequence: sequence,
                    entries,
                    svids,
                };
                added += usize::from(self.pool.insert(slot, &view));
            }
        }
        Ok(added)
    }

    /// Keeps the pool filled: at once after a pooled instance was taken (or a new entry
    /// set seen), and every second (which also drops stale pooled instances). Returns at
    /// once when pooling is off.
    pub async fn run_pool(self: Arc<Self>) {
        if !self.pool.config().enabled() {
            return;
        }
        loop {
            tokio::select! {
                _ = self.pool.wake.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.refill_pool().await {
                tracing::warn!(error = %e, "could not pre-mint workload SVIDs; new processes wait for their mint until this works");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    }

    /// After a sync that changed entries or the bundle: drops pooled instances of deleted
    /// or changed entries, of a tainted authority, or from before a bundle change.
    pub fn prune_pool(&self) {
        if !self.pool.config().enabled() {
            return;
        }
        let (sequence, tainted) = self.pool_state();
        let view = PoolView {
            now: unix_seconds(std::time::SystemTime::now()),
            monotonic_now: boot_clock::BootInstant::now(),
            bundle_sequence: sequence,
            tainted: &tainted,
        };
        if let Ok(cache) = self.entries.read() {
            self.pool.prune(&cache, &view);
        }
        self.pool.wake.notify_one();
    }

    /// The federated bundles a caller with `selectors` is entitled to: those of the trust
    /// domains its matching entries list in `federates_with`, keyed by trust domain name.
    pub fn federated_bundles_for(
        &self,
        selectors: &[Selector],
    ) -> std::collections::BTreeMap<String, Arc<crate::bundle::TrustBundle>> {
        let wanted: std::collections::BTreeSet<String> = match self.entries.read() {
            Ok(e) => e
                .matching(selectors)
                .iter()
                .flat_map(|e| e.federates_with.iter())
                .map(|td| td.strip_prefix("spiffe://").unwrap_or(td).to_string())
                .collect(),
            Err(_) => return Default::default(),
        };
        match self.federated.read() {
            Ok(f) => {
                f.1.iter()
                    .filter(|(td, _)| wanted.contains(*td))
                    .map(|(td, b)| (td.clone(), b.clone()))
                    .collect()
            }
            Err(_) => Default::default(),
        }
    }

    /// The connections to the servers, over the current agent SVID.
    pub fn node(&self) -> Arc<NodeConnections> {
        self.node.load_full()
    }

    /// Number of live instances held.
    pub fn instance_count(&self) -> usize {
        self.instances.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Number of live instances held, and of those counted against `uid`'s share.
    fn instance_counts(&self, uid: u32) -> Result<(usize, usize), InstanceError> {
        let instances = self
            .instances
            .lock()
            .map_err(|_| Error::Config("lock".into()))?;
        Ok((instances.len(), held_by(&instances, uid)))
    }

    /// Ok when a new instance for `uid` fits: under `uid`'s share, else
    /// [`InstanceError::UserShareReached`], and under the cap, else
    /// [`InstanceError::CapReached`] (the share first: a uid at its share is refused
    /// until its own instances go, whatever others hold).
    fn fits(&self, uid: u32, (total, mine): (usize, usize)) -> Result<(), InstanceError> {
        if mine >= self.instance_share() {
            return Err(self.share_reached(uid));
        }
        if total >= self.max_instances {
            return Err(self.cap_reached());
        }
        Ok(())
    }

    /// The instance of a connection's peer, created on first sight. The caller must have
    /// just checked that the peer is still the process that connected
    /// ([`crate::workload_attestation::PeerProcess::check`]).
    ///
    /// A new instance takes a pooled instance minted ahead for exactly its per-instance
    /// entries, if one is fresh: its segment and SVIDs become this process's, under the
    /// instance map's lock, and are never handed to another (see [`pool`]).
    ///
    /// At most [`Workloads::max_instances`] are held, and at most
    /// [`Workloads::instance_share`] for one uid: beyond that a new process gets
    /// [`InstanceError::CapReached`] or [`InstanceError::UserShareReached`], and nothing
    /// is taken from the pool or minted for it.
    pub fn instance_for(&self, peer: &AttestedPeer) -> Result<Arc<Instance>, InstanceError> {
        self.instance_for_key(InstanceKey::of(peer), true)
    }

    /// The connection's peer's instance, if it has one already (then
    /// [`Workloads::instance_for`] would neither mint nor take from the pool for it).
    pub fn existing_instance(&self, peer: &AttestedPeer) -> Option<Arc<Instance>> {
        self.instances
            .lock()
            .ok()?
            .get(&InstanceKey::of(peer))
            .cloned()
    }

    /// Ok when a new instance for `uid` fits under the cap and under `uid`'s share,
    /// after forgetting exited processes if the map is full or `uid` at its share (at
    /// most once per [`FULL_PRUNE_INTERVAL`]).
    fn room_for_new_instance(&self, uid: u32) -> Result<(), InstanceError> {
        let counts = self.instance_counts(uid)?;
        if counts.0 < self.max_instances && counts.1 < self.instance_share() {
            return Ok(());
        }
        let prune_now = {
            let mut last = self
                .last_full_prune
                .lock()
                .map_err(|_| Error::Config("lock".into()))?;
            let due = last.is_none_or(|t| t.elapsed() >= FULL_PRUNE_INTERVAL);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if prune_now {
            // Forgets the instances of exited processes (as the rotation loop does).
            self.live_instances();
        }
        self.fits(uid, self.instance_counts(uid)?)
    }

    /// The refusal at the cap, logged at most once per [`CAP_LOG_INTERVAL`] with how
    /// many were refused since (a local user forking in a loop must not flood the log).
    fn cap_reached(&self) -> InstanceError {
        if let Some(refused) = refusals_to_log(&self.cap_refusals) {
            tracing::warn!(
                event = "workload_refused",
                cap = self.max_instances,
                refused,
                "new workload processes refused: the agent holds as many live process instances as workload_max_instances allows"
            );
        }
        InstanceError::CapReached {
            cap: self.max_instances,
        }
    }

    /// The refusal at `uid`'s share of the cap, logged as [`Workloads::cap_reached`] is
    /// (at most once per [`CAP_LOG_INTERVAL`], naming the last uid refused).
    fn share_reached(&self, uid: u32) -> InstanceError {
        let share = self.instance_share();
        if let Some(refused) = refusals_to_log(&self.share_refusals) {
            tracing::warn!(
                event = "workload_refused",
                uid,
                share,
                cap = self.max_instances,
                refused,
                "new workload processes of a uid refused: it holds its share (half of workload_max_instances) of live process instances"
            );
        }
        InstanceError::UserShareReached { uid, share }
    }

    /// [`Workloads::instance_for`] by key: also for instances that are not a connection's
    /// own, as a delegated identity subscription's ([`crate::delegated_identity`]), which
    /// pass `pooled = false`: a new process's pre-minted SVIDs are not theirs to take.
    pub fn instance_for_key(
        &self,
        key: InstanceKey,
        pooled: bool,
    ) -> Result<Arc<Instance>, InstanceError> {
        {
            let instances = self
                .instances
                .lock()
                .map_err(|_| Error::Config("lock".into()))?;
            if let Some(inst) = instances.get(&key) {
                return Ok(inst.clone());
            }
        }
        // Before the pool is touched: a refused process takes nothing and wakes no mint.
        self.room_for_new_instance(key.uid)?;
        // What a pooled instance must have been minted for: the per-instance entries
        // this process is entitled to now, and which sync they come from (at least).
        let seen_generation = self
            .entries
            .read()
            .map_err(|_| Error::Config("lock".into()))?
            .generation;
        let per_instance: Vec<pb::Entry> = if pooled && self.pool.config().enabled() {
            self.entitled(key.binding(), &key.selectors)?
                .entries
                .into_iter()
                .filter(|e| !e.shared)
                .collect()
        } else {
            Vec::new()
        };
        let now = unix_seconds(std::time::SystemTime::now());
        let mut instances = self
            .instances
            .lock()
            .map_err(|_| Error::Config("lock".into()))?;
        if let Some(inst) = instances.get(&key) {
            return Ok(inst.clone());
        }
        // Checked again under the lock the instance is inserted under: concurrent new
        // processes may have filled the map, or the uid's share, since.
        self.fits(key.uid, (instances.len(), held_by(&instances, key.uid)))?;
        let (sequence, tainted) = self.pool_state();
        let pooled = if pooled {
            self.pool.take(
                &per_instance,
                &PoolView {
                    now,
                    monotonic_now: boot_clock::BootInstant::now(),
                    bundle_sequence: sequence,
                    tainted: &tainted,
                },
                seen_generation,
            )
        } else {
            None
        };
        let (segment, svids, created_at) = match pooled {
            Some(p) => {
                tracing::info!(
                    event = "pooled_svid_assigned",
                    pid = key.process.pid,
                    instance = %p.segment,
                    spiffe_ids = ?p.svids.iter().map(|s| s.spiffe_id.as_str()).collect::<Vec<_>>(),
                    "pre-minted workload SVIDs assigned to a new process"
                );
                let svids = p
                    .svids
                    .into_iter()
                    .map(|s| (s.entry_id.clone(), Arc::new(s)))
                    .collect();
                // The segment existed since its mint: an entry revocation covers it
                // from then, erring on revoking.
                (p.segment, svids, p.minted_at.min(now))
            }
            None => (random_segment()?, HashMap::new(), now),
        };
        let inst = Arc::new(Instance {
            process: key.process,
            key: key.clone(),
            segment,
            selectors: key.selectors.clone(),
            svids: tokio::sync::Mutex::new(svids),
            state: watch::Sender::new(Arc::new(IdentitySet::default())),
            jwt_cache: Mutex::new(JwtCache::default()),
            created_at,
            revocations: watch::Sender::new(RevocationNotice::default()),
        });
        instances.insert(key, inst.clone());
        tracing::info!(pid = inst.process.pid, instance = %inst.segment, "attested new workload instance");
        Ok(inst)
    }

    /// Forgets `inst` now (keys dropped once no stream holds it) if it still is the
    /// instance held for its key: for instances that outlive no subscription, as a
    /// delegated identity subscription's ([`crate::delegated_identity`]).
    pub fn forget(&self, inst: &Arc<Instance>) {
        if let Ok(mut map) = self.instances.lock() {
            if map
                .get(&inst.key)
                .is_some_and(|held| Arc::ptr_eq(held, inst))
            {
                map.remove(&inst.key);
                inst.state.send_replace(Arc::new(IdentitySet::default()));
            }
        }
    }

    /// The SPIFFE ID an instance gets for an entry.
    pub fn identity_for(inst: &Instance, entry: &pb::Entry) -> String {
        if entry.shared {
            entry.spiffe_id.clone()
        } else {
            format!("{}/{}", entry.spiffe_id, inst.segment)
        }
    }

    /// Whether `id` is [`Workloads::identity_for`] `inst` and `entry`, without building
    /// it (every fetch reconciles, and this runs for every SVID held).
    fn is_identity_for(id: &str, inst: &Instance, entry: &pb::Entry) -> bool {
        if entry.shared {
            return id == entry.spiffe_id;
        }
        id.strip_prefix(entry.spiffe_id.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|segment| segment == inst.segment)
    }

    /// The entries a process with `selectors` may be served now: those its selectors
    /// match, minus those a revocation bars for this process.
    pub fn entitled(
        &self,
        process: ProcessBinding,
        selectors: &[Selector],
    ) -> Result<Entitlement, Error> {
        let matching = self
            .entries
            .read()
            .map_err(|_| Error::Config("lock".into()))?
            .matching(selectors);
        let revoked = self
            .revoked
            .lock()
            .map_err(|_| Error::Config("lock".into()))?;
        let Some(barred) = revoked.get(&process) else {
            return Ok(Entitlement {
                entries: matching,
                revoked: None,
            });
        };
        let mut out = Entitlement::default();
        for e in matching {
            match barred.bars(&e) {
                Some(id) => {
                    out.revoked.get_or_insert_with(|| id.clone());
                }
                None => out.entries.push(e),
            }
        }
        Ok(out)
    }

    /// Applies the revocations of a sync answer to the instances held (see the module
    /// documentation); returns how many identities were dropped now. Revocations already
    /// applied are skipped, so each drop is logged once.
    pub async fn apply_revocations(
        &self,
        revoked_instances: &[String],
        revoked_entries: &[pb::RevokedEntry],
    ) -> usize {
        if self.pool.config().enabled() {
            // Before the instances: one that takes a pooled instance meanwhile is among
            // them (it is inserted under the same lock it is taken under).
            let segments: std::collections::HashSet<&str> = revoked_instances
                .iter()
                .take(MAX_REVOCATIONS)
                .filter_map(|id| id.rsplit_once('/').map(|(_, s)| s))
                .collect();
            self.pool.revoke(&segments, revoked_entries);
        }
        if revoked_instances.is_empty() && revoked_entries.is_empty() {
            return 0;
        }
        if revoked_instances.len() > MAX_REVOCATIONS || revoked_entries.len() > MAX_REVOCATIONS {
            tracing::warn!(
                instances = revoked_instances.len(),
                entries = revoked_entries.len(),
                kept = MAX_REVOCATIONS,
                "the server sent more revocations than an answer may hold; applying the first ones"
            );
        }
        // Per-instance IDs by their last segment: one look-up per instance held.
        let mut by_segment: HashMap<&str, Vec<&str>> = HashMap::new();
        for id in revoked_instances.iter().take(MAX_REVOCATIONS) {
            if let Some((base, segment)) = id.rsplit_once('/') {
                by_segment.entry(segment).or_default().push(base);
            }
        }
        let entry_revocations: Vec<&pb::RevokedEntry> =
            revoked_entries.iter().take(MAX_REVOCATIONS).collect();
        let mut dropped = 0;
        for inst in self.live_instances() {
            let bases = by_segment.get(inst.segment.as_str());
            let entries: Vec<&pb::RevokedEntry> = entry_revocations
                .iter()
                .copied()
                .filter(|r| {
                    inst.created_at
                        < r.revoked_at
                            .saturating_add(REVOCATION_CLOCK_TOLERANCE_SECONDS)
                })
                .collect();
            if bases.is_none() && entries.is_empty() {
                continue;
            }
            dropped += self
                .revoke_in_instance(
                    &inst,
                    bases.map(Vec::as_slice).unwrap_or_default(),
                    &entries,
                )
                .await;
        }
        dropped
    }

    /// Bars `bases` (entry SPIFFE IDs whose per-instance ID under this instance was
    /// revoked) and `entries` for the instance's process, then drops what it holds of
    /// them and ends its streams; returns how many identities were newly barred.
    async fn revoke_in_instance(
        &self,
        inst: &Instance,
        bases: &[&str],
        entries: &[&pb::RevokedEntry],
    ) -> usize {
        let binding = inst.key.binding();
        // Entries of a revoked entry id that concern this instance: those it matches.
        let matching: Vec<pb::Entry> = match self.entries.read() {
            Ok(cache) => entries
                .iter()
                .filter_map(|r| cache.entries.get(&r.entry_id))
                .filter(|e| {
                    cache
                        .selectors
                        .get(&e.id)
                        .is_some_and(|need| satisfies(&inst.selectors, need))
                })
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        // Recorded before the instance's lock is taken (see `reconcile`).
        let mut newly: Vec<(String, String)> = Vec::new();
        {
            let Ok(mut revoked) = self.revoked.lock() else {
                return 0;
            };
            let barred = revoked.entry(binding).or_default();
            for base in bases {
                if !barred.bases.contains_key(*base) {
                    let id = format!("{base}/{}", inst.segment);
                    barred.bases.insert((*base).to_string(), id.clone());
                    newly.push((format!("spiffe_id {base}"), id));
                }
            }
            for e in matching.iter().filter(|e| !e.shared) {
                // Barred already (by its SPIFFE ID or its id): dropped and logged then.
                if barred.bars(e).is_none() {
                    let id = Self::identity_for(inst, e);
                    barred.entries.insert(e.id.clone(), id.clone());
                    newly.push((format!("entry {}", e.id), id));
                }
            }
        }
        if newly.is_empty() {
            return 0;
        }
        let revoked_ids: std::collections::HashSet<&str> =
            newly.iter().map(|(_, id)| id.as_str()).collect();
        for (what, id) in &newly {
            tracing::warn!(
                event = "instance_revoked",
                spiffe_id = %id,
                pid = inst.process.pid,
                revoked = %what,
                "an operator revoked this workload identity: its SVIDs are dropped and its process is not served it again"
            );
        }
        let mut held = inst.svids.lock().await;
        held.retain(|_, h| !revoked_ids.contains(h.spiffe_id.as_str()));
        if let Ok(mut cache) = inst.jwt_cache.lock() {
            cache.retain(|(id, _), _| !revoked_ids.contains(id.as_str()));
        }
        // The streams first, so they end with the reason rather than with what is left.
        if let Some((_, id)) = newly.first() {
            let id: Arc<str> = Arc::from(id.as_str());
            inst.revocations.send_modify(|n| {
                n.count += 1;
                n.identity = Some(id);
            });
        }
        let svids: Vec<Arc<HeldSvid>> = inst
            .state
            .borrow()
            .svids
            .iter()
            .filter(|s| !revoked_ids.contains(s.spiffe_id.as_str()))
            .cloned()
            .collect();
        inst.state.send_replace(Arc::new(IdentitySet { svids }));
        newly.len()
    }

    async fn sign(&self, jobs: Vec<SignJob>) -> Result<Vec<Result<HeldSvid, String>>, SignFailure> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let req = pb::SignX509SvidsRequest {
            requests: jobs
                .iter()
                .map(|(e, _, _, csr)| pb::SvidRequest {
                    entry_id: e.id.clone(),
                    csr: csr.clone(),
                })
                .collect(),
        };
        let resp = self
            .node()
            .call("SignX509SVIDs", crate::servers::CALL_TIMEOUT, |mut c| {
                let req = req.clone();
                async move {
                    c.sign_x509_svids(req)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await
            .map_err(|s| {
                let e = Error::Server(format!("{}: {}", s.code(), s.message()));
                if crate::servers::fails_over(&s) {
                    SignFailure::Unreachable(e)
                } else {
                    SignFailure::Failed(e)
                }
            })?;
        super::metrics::svids_minted(
            "x509",
            resp.results
                .iter()
                .filter(|r| matches!(r.result, Some(pb::svid_result::Result::Svid(_))))
                .count(),
        );
        if resp.results.len() != jobs.len() {
            return Err(SignFailure::Failed(Error::Protocol(
                "server answered a different number of CSRs".into(),
            )));
        }
        let now = unix_seconds(std::time::SystemTime::now());
        let roots = self.bundle.borrow().x509_authorities.clone();
        Ok(jobs
            .into_iter()
            .zip(resp.results)
            .map(|((entry, spiffe_id, key, _), r)| match r.result {
                Some(pb::svid_result::Result::Svid(s))
                    if s.spiffe_id == spiffe_id && !s.cert_chain.is_empty() =>
                {
                    Ok(HeldSvid {
                        entry_id: entry.id.clone(),
                        spiffe_id,
                        authority: crate::svid::issuing_authority_of_chain(&s.cert_chain, &roots),
                        chain: s.cert_chain,
                        key,
                        not_after: s.expires_at,
                        // Server-supplied: saturating, so an absurd expiry cannot wrap
                        // into a renewal time in the past or far future.
                        renew_at: now.saturating_add(s.expires_at.saturating_sub(now) / 2),
                        hint: entry.hint.clone(),
                        entry_revision: entry.revision,
                    })
                }
                Some(pb::svid_result::Result::Svid(_)) => {
                    Err("server returned an SVID for another identity".into())
                }
                Some(pb::svid_result::Result::Error(e)) => Err(e),
                None => Err("empty result".into()),
            })
            .collect())
    }

    async fn shared_svid(&self, entry: &pb::Entry, now: i64) -> Result<Arc<HeldSvid>, Error> {
        let mut shared = self.shared.lock().await;
        if let Some(h) = shared.get(&entry.id) {
            if h.entry_revision == entry.revision && !self.needs_renewal(h, now) {
                return Ok(h.clone());
            }
        }
        let (key, csr) = key_and_csr(&entry.spiffe_id)?;
        let mut out = match self
            .sign(vec![(entry.clone(), entry.spiffe_id.clone(), key, csr)])
            .await
        {
            Ok(out) => out,
            Err(SignFailure::Unreachable(e)) => match shared.get(&entry.id) {
                // No server answers: the SVID held stays served while it is valid, if it
                // is of the identity the entry names now.
                Some(h) if h.not_after > now && h.spiffe_id == entry.spiffe_id => {
                    tracing::warn!(entry = %entry.id, error = %e, not_after = h.not_after, "no server answers; serving the shared SVID held until it is renewed");
                    return Ok(h.clone());
                }
                _ => return Err(e),
            },
            Err(f) => return Err(f.into()),
        };
        let held = Arc::new(
            out.pop()
                .ok_or_else(|| Error::Protocol("no result".into()))?
                .map_err(Error::Server)?,
        );
        shared.insert(entry.id.clone(), held.clone());
        Ok(held)
    }

    /// Brings an instance's SVIDs in line with its entries: mints what is missing or
    /// due for renewal (one batch), drops what it is no longer entitled to, and
    /// publishes the new set to its streams if it changed.
    pub async fn reconcile(&self, inst: &Instance) -> Result<(), Error> {
        let now = unix_seconds(std::time::SystemTime::now());
        // Read under the instance's lock: a revocation records its bar before it takes
        // this lock, so no reconcile can mint again what a revocation just dropped.
        let mut held = inst.svids.lock().await;
        let wanted = self.entitled(inst.key.binding(), &inst.selectors)?.entries;
        // An SVID of an identity its entry no longer names (the entry's SPIFFE ID changed)
        // goes now, whatever the new mint brings: kept until that mint succeeded, it was
        // served on while the server refused the new one, or while none answered.
        held.retain(|id, h| {
            wanted
                .iter()
                .any(|e| &e.id == id && !e.shared && Self::is_identity_for(&h.spiffe_id, inst, e))
        });
        let mut jobs = Vec::new();
        let mut shared_svids = Vec::new();
        for e in &wanted {
            if e.shared {
                match self.shared_svid(e, now).await {
                    Ok(s) => shared_svids.push(s),
                    Err(err) => {
                        tracing::warn!(entry = %e.id, error = %err, "could not mint shared SVID")
                    }
                }
                continue;
            }
            if held
                .get(&e.id)
                .is_some_and(|h| h.entry_revision == e.revision && !self.needs_renewal(h, now))
            {
                continue;
            }
            let id = Self::identity_for(inst, e);
            let (key, csr) = key_and_csr(&id)?;
            jobs.push((e.clone(), id, key, csr));
        }
        let mut first_error = None;
        let signed = match self.sign(jobs).await {
            Ok(signed) => signed,
            // No server answers: what the instance holds stays served while it is valid,
            // and is renewed at the next try.
            Err(SignFailure::Unreachable(e)) if held.values().any(|h| h.not_after > now) => {
                tracing::warn!(pid = inst.process.pid, error = %e, "no server answers; serving the workload SVIDs held until they are renewed");
                Vec::new()
            }
            Err(f) => {
                // What is held (less what was dropped above) stays served; the rest goes.
                Self::publish(inst, held.values().cloned().chain(shared_svids).collect());
                return Err(f.into());
            }
        };
        for r in signed {
            match r {
                Ok(svid) => {
                    tracing::info!(spiffe_id = %svid.spiffe_id, pid = inst.process.pid, not_after = svid.not_after, "workload SVID minted");
                    held.insert(svid.entry_id.clone(), Arc::new(svid));
                }
                Err(e) => {
                    tracing::warn!(pid = inst.process.pid, error = %e, "server refused a workload CSR");
                    first_error.get_or_insert(e);
                }
            }
        }
        Self::publish(inst, held.values().cloned().chain(shared_svids).collect());
        match first_error {
            Some(e) if inst.state.borrow().svids.is_empty() => Err(Error::Server(e)),
            _ => Ok(()),
        }
    }

    /// Publishes `svids` as the instance's identity set to its streams, if it changed.
    fn publish(inst: &Instance, mut svids: Vec<Arc<HeldSvid>>) {
        svids.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        let changed = {
            let cur = inst.state.borrow();
            cur.svids.len() != svids.len()
                || cur
                    .svids
                    .iter()
                    .zip(&svids)
                    .any(|(a, b)| !Arc::ptr_eq(a, b))
        };
        if changed {
            inst.state.send_replace(Arc::new(IdentitySet { svids }));
        }
    }

    /// Due at half-life, or at once when its authority is tainted.
    pub fn needs_renewal(&self, h: &HeldSvid, now: i64) -> bool {
        h.renew_at <= now
            || h.authority
                .as_ref()
                .is_some_and(|a| self.bundle.borrow().tainted.contains(a))
    }

    /// Records a JWT-SVID handed out.
    pub fn note_jwt(&self, kid: Option<&str>, expires_at: i64) {
        if let (Some(kid), Ok(mut m)) = (kid, self.jwt_issued.lock()) {
            let e = m.entry(kid.to_string()).or_insert(0);
            *e = (*e).max(expires_at);
        }
    }

    /// Drops cached JWT-SVIDs signed by a tainted key, so the next fetch mints anew.
    pub fn forget_tainted_jwts(&self) {
        let tainted = self.bundle.borrow().tainted.clone();
        if tainted.is_empty() {
            return;
        }
        for inst in self.live_instances() {
            if let Ok(mut c) = inst.jwt_cache.lock() {
                c.retain(|_, j| !j.kid.as_ref().is_some_and(|k| tainted.contains(k)));
            }
        }
    }

    /// Authorities that signed something still live that this agent holds or handed out.
    pub async fn authorities_in_use(&self, now: i64) -> Vec<String> {
        let mut out = std::collections::BTreeSet::new();
        for inst in self.live_instances() {
            for s in inst.state.borrow().svids.iter() {
                if s.not_after > now {
                    out.extend(s.authority.clone());
                }
            }
        }
        for s in self.shared.lock().await.values() {
            if s.not_after > now {
                out.extend(s.authority.clone());
            }
        }
        if let Ok(mut m) = self.jwt_issued.lock() {
            m.retain(|_, exp| *exp > now);
            out.extend(m.keys().cloned());
        }
        out.into_iter().collect()
    }

    /// Every live instance; forgets (and drops the keys of) exited ones.
    pub fn live_instances(&self) -> Vec<Arc<Instance>> {
        // Looked up in /proc without the instance map's lock, which the Workload API takes
        // on every call: with many processes the reads take a while.
        let held: Vec<(InstanceKey, Arc<Instance>)> = match self.instances.lock() {
            Ok(map) => map.iter().map(|(k, i)| (k.clone(), i.clone())).collect(),
            Err(_) => return Vec::new(),
        };
        let (live, gone): (Vec<_>, Vec<_>) = held.into_iter().partition(|(k, _)| k.still_running());
        if !gone.is_empty() {
            if let Ok(mut map) = self.instances.lock() {
                for (k, inst) in gone {
                    // Only the instance looked at: the key's process may be new since.
                    if map.get(&k).is_some_and(|held| Arc::ptr_eq(held, &inst)) {
                        map.remove(&k);
                        tracing::info!(pid = k.process.pid, instance = %inst.segment, "workload instance exited or exec'd; forgetting its identity");
                        inst.state.send_replace(Arc::new(IdentitySet::default()));
                    }
                }
            }
        }
        // What was revoked for a process is kept until it exits (not when it execs).
        let barred: Vec<ProcessBinding> = match self.revoked.lock() {
            Ok(r) => r.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let exited: Vec<ProcessBinding> =
            barred.into_iter().filter(|p| !p.still_running()).collect();
        if !exited.is_empty() {
            if let Ok(mut revoked) = self.revoked.lock() {
                for p in &exited {
                    revoked.remove(p);
                }
            }
        }
        live.into_iter().map(|(_, inst)| inst).collect()
    }

    /// True when one of the instance's SVIDs is due for renewal.
    pub fn due(&self, inst: &Instance, now: i64) -> bool {
        inst.state
            .borrow()
            .svids
            .iter()
            .any(|s| self.needs_renewal(s, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(kind: &str, value: &str) -> pb::Selector {
        pb::Selector {
            r#type: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn an_update_with_selectors_the_agent_cannot_read_drops_the_entry() {
        let mut cache = EntryCache::default();
        let v1 = pb::Entry {
            id: "a".into(),
            spiffe_id: "spiffe://td/a".into(),
            revision: 1,
            selectors: vec![selector("unix", "uid:1000")],
            ..Default::default()
        };
        cache.apply(&pb::SyncEntriesResponse {
            full: true,
            revision: 1,
            upserted: vec![v1],
            ..Default::default()
        });
        let me = vec![Selector::try_from(&selector("unix", "uid:1000")).unwrap()];
        assert_eq!(cache.matching(&me).len(), 1);
        // Narrowed with a selector kind only a newer server knows: its old, broader
        // version must not be served on.
        let v2 = pb::Entry {
            id: "a".into(),
            spiffe_id: "spiffe://td/a".into(),
            revision: 2,
            selectors: vec![selector("unix", "uid:1000"), selector("k8s", "sa:payments")],
            ..Default::default()
        };
        assert!(cache.apply(&pb::SyncEntriesResponse {
            full: false,
            revision: 2,
            upserted: vec![v2],
            ..Default::default()
        }));
        assert!(cache.matching(&me).is_empty());
        assert_eq!(cache.generation, 2);
    }
}
