//! The Delegated Identity API: SPIRE's `spire.api.agent.delegatedidentity.v1`, served
//! wire-identically on a separate admin socket of the agent, so delegates written for
//! SPIRE (a node proxy terminating TLS for the workloads of its node, say) work unchanged.
//!
//! # Who may call
//!
//! Only the delegates listed in `[delegated_identity] authorized_delegates`:
//!
//! - `uid:N`: a process whose effective uid at `connect(2)` (SO_PEERCRED) is N, and still
//!   is at each request, running in the agent's user and pid namespaces (a container's
//!   root is uid 0 to SO_PEERCRED: it is refused as a uid delegate, saying why);
//! - `spiffe://TD/PATH`: a process this agent would serve that identity: its own selectors
//!   (attested like a Workload API caller's when it connected) match an entry with that
//!   SPIFFE ID, not revoked for it. ztid's identities are per instance, so the entry's ID
//!   is listed, not one instance's.
//!
//! Every request first checks that the connection's process still is the one that
//! connected (as on the Workload API socket); anyone else gets `PermissionDenied` with the
//! reason. The socket itself is mode 0600 by default (`socket_mode`), owned by the
//! agent's user, and may not be in the Workload API socket's directory or below it
//! (workloads are given that directory; a read-only mount still allows `connect()`).
//!
//! # What a delegate gets
//!
//! A subscription names its workload by `selectors` or by `pid` (not both):
//!
//! - by `pid` (read in the agent's pid namespace): the agent attests that process like a
//!   Workload API caller and the delegate gets the SVIDs of that process's entries as an
//!   instance of its own for that process (keyed by delegate process and the target's pid
//!   and start time): its own segment and keys, never the process's own instance, so each
//!   per-instance identity has one holder. The target's revocations apply to it (revoking
//!   it bars the target process from that entry, erring on revoking); it is forgotten
//!   when either process exits, and the stream ends when the target exits or execs. The
//!   pid is followed by start time (no pidfd): as in SPIRE, the delegate must make sure
//!   it is not recycled.
//! - by `selectors`: the delegate gets the SVIDs of the entries those selectors match, as a
//!   workload instance of its own: each (delegate process, selector set) is one instance,
//!   with its own random instance segment and its own keys, renewed and revocable like any
//!   other, shared by that delegate's open subscriptions for the same selectors, kept
//!   [`INSTANCE_LINGER`] after the last of them ends (asked again meanwhile, it is reused
//!   with its JWT cache and mint count) and then forgotten (keys dropped), or when the
//!   delegate exits. Delegated instances never take the pool's pre-minted SVIDs. An
//!   operator revoking such an identity bars the delegate process from that entry (the
//!   kill switch errs on revoking).
//!
//! A stream sends the full set at once and again on every rotation or entry change, also
//! when empty (no entry matches yet), as SPIRE does. `FetchJWTSVIDs` mints for the same
//! instance as an X.509 subscription of that delegate for the same target (open, or
//! ended less than [`INSTANCE_LINGER`] ago), or else for a new instance kept as long after
//! the call. Bundle streams carry the local and
//! every federated bundle, keyed `spiffe://TD`.
//!
//! # Audit
//!
//! On the server: every subscription and fetch is queued here and reported with the
//! agent's next sync (`SyncEntriesRequest.delegated_subscriptions`: method, delegate,
//! caller pid and uid, selectors or pid, the identities handed out), which the server
//! writes to its audit log as `delegated_subscription` records under this agent's ID; at
//! most [`MAX_QUEUED_REPORTS`] wait, more are counted and reported as dropped. In the
//! agent's own log too: `event = "delegated_subscription"` records, the end of each stream
//! as `delegated_subscription_ended`, every refusal as `delegated_refused`.
//!
//! # Bounds
//!
//! At most [`MAX_SELECTORS_PER_REQUEST`] selectors per request, [`MAX_SUBSCRIPTIONS_PER_DELEGATE`]
//! open streams per authorised delegate, [`MAX_NEW_INSTANCES_PER_DELEGATE_PER_MINUTE`] new
//! instances per delegate per minute (`ResourceExhausted` beyond, with the reason), the
//! agent's instance cap (`workload_max_instances`) and the delegate's uid's share of it
//! ([`crate::workloads::instance_share`]: a delegate's instances count against its own
//! uid, not the target's),
//! [`crate::limits::MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE`] JWT mints per instance per
//! minute, [`crate::limits::MAX_JWT_AUDIENCES`] audiences,
//! [`MAX_AUTHORIZED_DELEGATES`] delegates in the config, and the listener's bounds
//! ([`crate::workload_listener`]) with `max_connections` connections.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ztid_proto::node as npb;
use ztid_proto::spire::api::agent::delegatedidentity::v1 as dpb;
use ztid_proto::spire::api::types as tpb;

use crate::bundle::TrustBundle;
use crate::workload_attestation::{attest_peer, effective_ids, AttestedPeer, ConnectTimePeer};
use crate::workload_listener::ConnectionPeer;
use crate::workloads::{
    revoked_message, IdentitySet, Instance, InstanceKey, ProcessBinding, Workloads,
};
use crate::{unix_seconds, Error, Selector};

use dpb::delegated_identity_server::{DelegatedIdentity, DelegatedIdentityServer};

use crate::zeroizing_x509_answers::{KeyCopies, ServerStreaming, ZeroizingService};

/// Most delegates in `authorized_delegates`.
pub const MAX_AUTHORIZED_DELEGATES: usize = 64;
/// Most selectors one request may name.
pub const MAX_SELECTORS_PER_REQUEST: usize = 32;
/// Most streams one authorised delegate may hold open at once.
pub const MAX_SUBSCRIPTIONS_PER_DELEGATE: usize = 256;
/// Default cap on connections to the delegated identity socket.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default mode of the delegated identity socket: the agent's user only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// How often a stream for a pid checks that the process is still the one attested.
pub const PID_RECHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest attestation of a pid named by a delegate.
pub const PID_ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a delegated instance (its segment, keys, JWT cache and mint count) is kept
/// after its last subscription or fetch ends, so asking again reuses it.
pub const INSTANCE_LINGER: Duration = Duration::from_secs(60);
/// New delegated instances one delegate may make per minute (each is minted X.509-SVIDs
/// and up to [`crate::limits::MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE`] JWT-SVIDs a
/// minute): enough to open all its [`MAX_SUBSCRIPTIONS_PER_DELEGATE`] streams at once.
pub const MAX_NEW_INSTANCES_PER_DELEGATE_PER_MINUTE: usize = MAX_SUBSCRIPTIONS_PER_DELEGATE;
/// Characters of one selector echoed in a refusal, at most.
const ECHO_CHARS: usize = 96;

/// `[delegated_identity]` in the agent config; the API is off unless `socket` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelegatedConfig {
    /// The admin socket serving the API; off when unset.
    pub socket: Option<PathBuf>,
    /// Mode of the socket (TOML `0o600`); who may call is decided per request anyway.
    pub socket_mode: u32,
    /// Who may call: `uid:N` or `spiffe://TD/PATH` (see the module documentation).
    pub authorized_delegates: Vec<String>,
    /// Cap on open connections to the socket.
    pub max_connections: usize,
}

impl Default for DelegatedConfig {
    fn default() -> Self {
        Self {
            socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            authorized_delegates: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl DelegatedConfig {
    /// [`DelegatedConfig::validate`], and that the socket is neither the Workload API's
    /// (binding it would take that path from the Workload API) nor in its directory or
    /// below: workloads are given that directory (a Kubernetes pod mounts the node's
    /// `/run/ztid/agent`), and a read-only mount still lets them `connect()`, so a root
    /// container would reach the delegate socket as `uid:0`.
    pub fn validate_beside(&self, workload_socket: &Path) -> Result<Vec<Delegate>, Error> {
        if let Some(socket) = &self.socket {
            if socket == workload_socket {
                return Err(Error::Config(format!(
                    "[delegated_identity] socket {} is the Workload API socket: give it its own path",
                    workload_socket.display()
                )));
            }
            let workload_dir = canonical_parent(workload_socket)?;
            let delegated_dir = canonical_parent(socket)?;
            if delegated_dir.starts_with(&workload_dir) {
                return Err(Error::Config(format!(
                    "[delegated_identity] socket {} is in the Workload API socket's directory {} \
                     (or below it), which workloads are given: put it in a directory of its own \
                     that only delegates can reach, e.g. /run/ztid/delegated/api.sock",
                    socket.display(),
                    workload_dir.display()
                )));
            }
        }
        self.validate()
    }

    /// Checks the settings; returns the parsed delegates.
    pub fn validate(&self) -> Result<Vec<Delegate>, Error> {
        if self.socket.is_none() {
            if !self.authorized_delegates.is_empty() {
                return Err(Error::Config(
                    "[delegated_identity] authorized_delegates is set but socket is not".into(),
                ));
            }
            return Ok(Vec::new());
        }
        if self.authorized_delegates.is_empty() {
            return Err(Error::Config(
                "[delegated_identity] socket is set but authorized_delegates is empty: nobody could call it".into(),
            ));
        }
        if self.authorized_delegates.len() > MAX_AUTHORIZED_DELEGATES {
            return Err(Error::Config(format!(
                "[delegated_identity] authorized_delegates lists {} delegates, at most {MAX_AUTHORIZED_DELEGATES}",
                self.authorized_delegates.len()
            )));
        }
        if self.socket_mode & !0o777 != 0 {
            return Err(Error::Config(format!(
                "[delegated_identity] socket_mode {:o} has bits beyond 0o777",
                self.socket_mode
            )));
        }
        if !(1..=4096).contains(&self.max_connections) {
            return Err(Error::Config(
                "[delegated_identity] max_connections must be between 1 and 4096".into(),
            ));
        }
        self.authorized_delegates
            .iter()
            .map(|d| Delegate::parse(d))
            .collect()
    }
}

/// The directory of a socket path as the kernel resolves it: absolute, symlinks of its
/// existing part resolved, `.` and `..` of the rest applied (the agent creates it later).
fn canonical_parent(socket: &Path) -> Result<PathBuf, Error> {
    let abs = if socket.is_absolute() {
        socket.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(Error::io("reading the current directory".to_string()))?
            .join(socket)
    };
    let dir = abs.parent().unwrap_or(Path::new("/"));
    // Component by component as the kernel walks it: an existing prefix canonical
    // (symlinks resolved), `.` and `..` applied in order.
    let mut out = PathBuf::from("/");
    for c in dir.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => {
                out.push(n);
                if let Ok(real) = std::fs::canonicalize(&out) {
                    out = real;
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// One authorised delegate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Delegate {
    /// Any process running with this effective uid.
    Uid(u32),
    /// A process this agent serves an entry of this SPIFFE ID.
    SpiffeId(String),
}

impl Delegate {
    /// Parses `uid:N` or `spiffe://TD/PATH`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if let Some(n) = s.strip_prefix("uid:") {
            return n.parse().map(Self::Uid).map_err(|_| {
                Error::Config(format!(
                    "[delegated_identity] delegate {s:?}: uid:N needs a decimal uid"
                ))
            });
        }
        if s.starts_with("spiffe://") {
            let id = crate::spiffe_id::parse(s)
                .map_err(|e| Error::Config(format!("[delegated_identity] delegate {s:?}: {e}")))?;
            return Ok(Self::SpiffeId(id.to_string()));
        }
        Err(Error::Config(format!(
            "[delegated_identity] delegate {s:?} is neither uid:N nor spiffe://TD/PATH"
        )))
    }
}

impl std::fmt::Display for Delegate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(u) => write!(f, "uid:{u}"),
            Self::SpiffeId(id) => f.write_str(id),
        }
    }
}

/// Why a delegated identity request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The caller is not an authorised delegate.
    #[error("not an authorized delegate: {0}")]
    NotAuthorized(String),
    /// The caller's connection no longer belongs to the process that opened it.
    #[error("{0}")]
    CallerChanged(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The delegate holds too many open streams.
    #[error("{delegate} already holds {limit} delegated identity streams, the most one delegate may hold")]
    TooManySubscriptions {
        /// The delegate.
        delegate: String,
        /// [`MAX_SUBSCRIPTIONS_PER_DELEGATE`].
        limit: usize,
    },
    /// The delegate made too many new instances (keys and SVIDs) in the last minute.
    #[error("{delegate} made {limit} new delegated instances in the last minute, the most one delegate may: reuse a selector set or pid (an instance is kept {linger_seconds} s after its last subscription ends)")]
    TooManyInstances {
        /// The delegate.
        delegate: String,
        /// [`MAX_NEW_INSTANCES_PER_DELEGATE_PER_MINUTE`].
        limit: usize,
        /// [`INSTANCE_LINGER`] in seconds.
        linger_seconds: u64,
    },
    /// The workload named by pid cannot be attested (gone, or unreadable).
    #[error("workload pid {pid}: {why}")]
    Workload {
        /// The pid.
        pid: i32,
        /// Why.
        why: String,
    },
    /// An operator revoked the identity.
    #[error("{0}")]
    Revoked(String),
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Self {
        let msg = r.to_string();
        match r {
            Refusal::NotAuthorized(_) | Refusal::CallerChanged(_) | Refusal::Revoked(_) => {
                Status::permission_denied(msg)
            }
            Refusal::InvalidRequest(_) => Status::invalid_argument(msg),
            Refusal::TooManySubscriptions { .. } | Refusal::TooManyInstances { .. } => {
                Status::resource_exhausted(msg)
            }
            Refusal::Workload { .. } => Status::not_found(msg),
        }
    }
}

/// What a subscription names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The workload these selectors describe (sorted, without duplicates).
    Selectors(Vec<Selector>),
    /// The process with this pid.
    Pid(i32),
}

fn echo(s: &str) -> String {
    if s.chars().count() > ECHO_CHARS {
        format!("{}…", s.chars().take(ECHO_CHARS).collect::<String>())
    } else {
        s.to_string()
    }
}

impl Target {
    /// The target of a request: selectors or a pid, exactly one of them.
    pub fn of(selectors: &[tpb::Selector], pid: i32) -> Result<Self, Refusal> {
        match (selectors.is_empty(), pid) {
            (true, 0) => Err(Refusal::InvalidRequest(
                "name the workload by selectors or by pid".into(),
            )),
            (false, p) if p != 0 => Err(Refusal::InvalidRequest(
                "selectors and pid are mutually exclusive".into(),
            )),
            (true, p) if p < 0 => Err(Refusal::InvalidRequest(format!(
                "pid {p} is not a process id"
            ))),
            (true, p) => Ok(Self::Pid(p)),
            (false, _) => {
                if selectors.len() > MAX_SELECTORS_PER_REQUEST {
                    return Err(Refusal::InvalidRequest(format!(
                        "{} selectors, at most {MAX_SELECTORS_PER_REQUEST}",
                        selectors.len()
                    )));
                }
                let mut out = selectors
                    .iter()
                    .map(|s| {
                        Selector::new(&s.r#type, &s.value).map_err(|e| {
                            Refusal::InvalidRequest(format!(
                                "selector {}: {}",
                                echo(&format!("{}:{}", s.r#type, s.value)),
                                echo(&e.to_string())
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(node) = out.iter().find(|s| s.is_node_selector()) {
                    return Err(Refusal::InvalidRequest(format!(
                        "selector {} describes a node, not a workload",
                        echo(&node.to_string())
                    )));
                }
                out.sort();
                out.dedup();
                Ok(Self::Selectors(out))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Selectors(s) => s
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            Self::Pid(p) => format!("pid:{p}"),
        }
    }
}

/// Attests the process `pid` like a Workload API caller (by pid and start time: there is
/// no connection to take a pidfd from).
pub fn attest_pid(pid: i32) -> Result<AttestedPeer, Refusal> {
    let (uid, gid) = effective_ids(pid).map_err(|_| Refusal::Workload {
        pid,
        why: "no such process".into(),
    })?;
    attest_peer(
        ConnectTimePeer {
            pid: Some(pid),
            uid,
            gid,
            pidfd: Ok(None),
        },
        false,
    )
    .map_err(|r| Refusal::Workload {
        pid,
        why: r.to_string(),
    })
}

/// Delegated calls reported to the server at one sync, at most.
pub const MAX_REPORTED_PER_SYNC: usize = 256;
/// Delegated calls kept for the next syncs, at most; beyond, they are counted as dropped.
pub const MAX_QUEUED_REPORTS: usize = 4096;

/// Bytes of a reported target, at most (the server takes 8 KiB).
const MAX_REPORTED_TARGET_BYTES: usize = 4096;
/// Identities of one reported call, at most (the server takes 64).
const MAX_REPORTED_IDS: usize = 64;

/// Calls waiting for the next sync, and how many could not be kept.
#[derive(Default)]
struct ReportQueue {
    queued: std::collections::VecDeque<npb::DelegatedSubscription>,
    dropped: u32,
}

/// One queue per agent process: the sync loop drains it ([`take_report`]).
static REPORTS: Mutex<ReportQueue> = Mutex::new(ReportQueue {
    queued: std::collections::VecDeque::new(),
    dropped: 0,
});

/// Queues a delegated call for the server's audit log, reported at the next sync.
fn report(method: &str, caller: &Caller, target: Option<&Target>, spiffe_ids: Vec<String>) {
    if let Ok(mut q) = REPORTS.lock() {
        if q.queued.len() >= MAX_QUEUED_REPORTS {
            q.dropped = q.dropped.saturating_add(1);
            return;
        }
        q.queued.push_back(npb::DelegatedSubscription {
            method: method.into(),
            delegate: caller.delegate.clone(),
            caller_pid: caller.peer.pid.unwrap_or(0),
            caller_uid: caller.peer.uid,
            target: target
                .map(|t| {
                    let mut d = t.describe();
                    if d.len() > MAX_REPORTED_TARGET_BYTES {
                        let mut cut = MAX_REPORTED_TARGET_BYTES - 3;
                        while !d.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        d.truncate(cut);
                        d.push('…');
                    }
                    d
                })
                .unwrap_or_default(),
            spiffe_ids: spiffe_ids.into_iter().take(MAX_REPORTED_IDS).collect(),
            at: unix_seconds(std::time::SystemTime::now()),
        });
    }
}

/// The delegated calls to report at this sync ([`MAX_REPORTED_PER_SYNC`] at most, the
/// oldest first) and the count of those that could not be kept.
pub fn take_report() -> (Vec<npb::DelegatedSubscription>, u32) {
    match REPORTS.lock() {
        Ok(mut q) => {
            let n = q.queued.len().min(MAX_REPORTED_PER_SYNC);
            let taken = q.queued.drain(..n).collect();
            (taken, std::mem::take(&mut q.dropped))
        }
        Err(_) => (Vec::new(), 0),
    }
}

/// Puts back a report whose sync failed, ahead of what came since (what no longer fits
/// is counted as dropped); a report the server refused as malformed is only counted, so
/// it cannot block every later sync.
pub fn restore_report(calls: Vec<npb::DelegatedSubscription>, dropped: u32, refused: bool) {
    if let Ok(mut q) = REPORTS.lock() {
        q.dropped = q.dropped.saturating_add(dropped);
        if refused {
            let n = u32::try_from(calls.len()).unwrap_or(u32::MAX);
            q.dropped = q.dropped.saturating_add(n);
            return;
        }
        for c in calls.into_iter().rev() {
            if q.queued.len() >= MAX_QUEUED_REPORTS {
                q.dropped = q.dropped.saturating_add(1);
            } else {
                q.queued.push_front(c);
            }
        }
    }
}

/// Decides whether a verified connection's process is an authorised delegate, at a
/// request and again while its streams are open.
#[derive(Clone)]
struct Authorizer {
    workloads: Arc<Workloads>,
    delegates: Arc<[Delegate]>,
}

impl Authorizer {
    /// The delegate `peer` is authorised as now (its process was just verified).
    fn check(&self, peer: &ConnectionPeer) -> Result<String, Refusal> {
        let mut uid_refused = None;
        if self.delegates.contains(&Delegate::Uid(peer.uid)) {
            match peer
                .attested()
                .map(|a| uid_delegate_namespaces(a.process.instance.pid))
            {
                Some(Ok(())) => return Ok(Delegate::Uid(peer.uid).to_string()),
                Some(Err(why)) => uid_refused = Some(why),
                None => uid_refused = Some("it could not be attested".to_string()),
            }
        }
        let listed_ids = self
            .delegates
            .iter()
            .any(|d| matches!(d, Delegate::SpiffeId(_)));
        if listed_ids {
            if let Some(attested) = peer.attested() {
                let entitled = self
                    .workloads
                    .entitled(ProcessBinding::of(attested), &attested.selectors)
                    .map_err(|e| Refusal::NotAuthorized(e.to_string()))?;
                if let Some(e) = entitled.entries.iter().find(|e| {
                    self.delegates
                        .contains(&Delegate::SpiffeId(e.spiffe_id.clone()))
                }) {
                    return Ok(e.spiffe_id.clone());
                }
            }
        }
        if let Some(why) = uid_refused {
            return Err(Refusal::NotAuthorized(format!(
                "uid {} is listed in [delegated_identity] authorized_delegates, but {why}: \
                 a uid delegate must share the agent's user and pid namespaces (list a \
                 delegate in a container by its SPIFFE ID)",
                peer.uid
            )));
        }
        Err(Refusal::NotAuthorized(format!(
            "uid {} is not listed in [delegated_identity] authorized_delegates{}",
            peer.uid,
            if listed_ids {
                ", and this process holds none of the SPIFFE IDs listed there"
            } else {
                ""
            }
        )))
    }
}

/// Whether a caller may be authorised by its uid: only if it runs in the agent's user
/// and pid namespaces. A container's root without a user namespace of its own is uid 0 to
/// SO_PEERCRED, and one with its own user namespace maps to a host uid it does not hold
/// on the host: a uid says who a process is only on the agent's side of both. (A pid not
/// visible in the agent's pid namespace is refused earlier, at attestation.)
fn uid_delegate_namespaces(pid: i32) -> Result<(), String> {
    for (ns, what) in [("user", "user namespace"), ("pid", "pid namespace")] {
        let theirs = namespace_identity(&format!("/proc/{pid}/ns/{ns}"))
            .map_err(|e| format!("its {what} is unreadable ({e})"))?;
        let ours = namespace_identity(&format!("/proc/self/ns/{ns}"))
            .map_err(|e| format!("the agent's {what} is unreadable ({e})"))?;
        if theirs != ours {
            return Err(format!(
                "it runs in a {what} other than the agent's (a container?)"
            ));
        }
    }
    Ok(())
}

/// A namespace, as the kernel names it: the device and inode of its `/proc/*/ns/*` file.
fn namespace_identity(ns_file: &str) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ns_file)?;
    Ok((m.dev(), m.ino()))
}

/// Who the caller was authorised as.
#[derive(Clone)]
struct Caller {
    peer: Arc<ConnectionPeer>,
    delegate: String,
}

/// The SPIFFE ID of an SVID as SPIRE's message.
fn spiffe_id_pb(id: &str) -> tpb::Spiffeid {
    match crate::spiffe_id::parse(id) {
        Ok(parsed) => {
            let s = parsed.to_string();
            let rest = s.strip_prefix("spiffe://").unwrap_or(&s);
            let (td, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            tpb::Spiffeid {
                trust_domain: td.to_string(),
                path: path.to_string(),
            }
        }
        Err(_) => tpb::Spiffeid {
            trust_domain: String::new(),
            path: id.to_string(),
        },
    }
}

/// Open streams per delegate, the delegated instances held or kept, and the new
/// instances each delegate made in the last minute.
struct Book {
    streams: HashMap<String, usize>,
    /// Subscriptions and fetches holding each delegated instance.
    holders: HashMap<InstanceKey, usize>,
    /// Delegated instances nobody holds, kept until then ([`INSTANCE_LINGER`]).
    idle: HashMap<InstanceKey, (Arc<Instance>, Instant)>,
    /// When each delegate made its new instances of the last minute (at most `limit`).
    made: HashMap<String, VecDeque<Instant>>,
    linger: Duration,
    limit: usize,
}

impl Default for Book {
    fn default() -> Self {
        Self::new(INSTANCE_LINGER, MAX_NEW_INSTANCES_PER_DELEGATE_PER_MINUTE)
    }
}

impl Book {
    fn new(linger: Duration, limit: usize) -> Self {
        Self {
            streams: HashMap::new(),
            holders: HashMap::new(),
            idle: HashMap::new(),
            made: HashMap::new(),
            linger,
            limit,
        }
    }

    /// Forgets the kept instances whose time is up.
    fn sweep(&mut self, workloads: &Workloads, now: Instant) {
        self.idle.retain(|_, (inst, until)| {
            let keep = *until > now;
            if !keep {
                workloads.forget(inst);
                tracing::debug!(instance = %inst.segment, "delegated instance forgotten");
            }
            keep
        });
    }
}

/// Holds the delegated instance of `key` for `delegate`: the one held or kept for that
/// key, else a new one (never a pooled one: those are minted for new processes), unless
/// the delegate made [`Book::limit`] new instances in the last minute.
fn hold(
    book: &Arc<Mutex<Book>>,
    workloads: &Arc<Workloads>,
    delegate: &str,
    key: InstanceKey,
    own: bool,
) -> Result<Held, Status> {
    let now = Instant::now();
    let mut b = book.lock().map_err(|_| Status::internal("lock"))?;
    b.sweep(workloads, now);
    let known = b.holders.contains_key(&key) || b.idle.remove(&key).is_some();
    let counted = !known && !own;
    if counted {
        let (limit, linger) = (b.limit, b.linger);
        let made = b.made.entry(delegate.to_string()).or_default();
        while made
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            made.pop_front();
        }
        if made.len() >= limit {
            return Err(Refusal::TooManyInstances {
                delegate: delegate.to_string(),
                limit,
                linger_seconds: linger.as_secs(),
            }
            .into());
        }
        made.push_back(now);
    }
    let inst = match workloads.instance_for_key(key.clone(), false) {
        Ok(inst) => inst,
        Err(e) => {
            // No instance was made: the attempt does not count against the delegate's
            // new instances a minute.
            if counted {
                if let Some(made) = b.made.get_mut(delegate) {
                    made.pop_back();
                }
            }
            b.made.retain(|_, m| !m.is_empty());
            return Err(match e {
                crate::workloads::InstanceError::CapReached { .. }
                | crate::workloads::InstanceError::UserShareReached { .. } => {
                    Status::resource_exhausted(e.to_string())
                }
                _ => Status::unavailable(e.to_string()),
            });
        }
    };
    b.made.retain(|_, m| !m.is_empty());
    *b.holders.entry(key).or_insert(0) += 1;
    Ok(Held {
        inst,
        release: Some((book.clone(), workloads.clone(), own)),
    })
}

/// The key of a delegate's own instance of the process `target`: the delegate process
/// holds it, with the target's selectors, on the target's behalf (its revocations, its
/// life).
fn pid_key(delegate: &AttestedPeer, target: &AttestedPeer) -> InstanceKey {
    InstanceKey {
        process: delegate.process.instance,
        pidfs_id: delegate.process.pidfs_id,
        exe: delegate.process.exe,
        selectors: Arc::from(target.selectors.as_slice()),
        on_behalf_of: Some(ProcessBinding::of(target)),
        // The delegate holds it: its uid's share of the instance cap, not the target's.
        uid: delegate.process.uid,
    }
}

/// A place among a delegate's open streams; freed when dropped.
struct StreamSlot {
    book: Arc<Mutex<Book>>,
    delegate: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut b) = self.book.lock() {
            if let Some(n) = b.streams.get_mut(&self.delegate) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    b.streams.remove(&self.delegate);
                }
            }
        }
    }
}

/// A delegated instance held for a subscription or a fetch: when its last holder goes,
/// it is kept [`INSTANCE_LINGER`] (asked again meanwhile, it is the same instance, with
/// its JWT cache and mint count), then forgotten; unless it is the delegate's own
/// instance (the selectors named were its own), which its process keeps.
struct Held {
    inst: Arc<Instance>,
    release: Option<(Arc<Mutex<Book>>, Arc<Workloads>, bool)>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some((book, workloads, own)) = self.release.take() else {
            return;
        };
        let Ok(mut b) = book.lock() else {
            return;
        };
        let key = self.inst.key.clone();
        let last = match b.holders.get_mut(&key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => true,
        };
        if !last {
            return;
        }
        b.holders.remove(&key);
        if own {
            return;
        }
        let linger = b.linger;
        b.idle
            .insert(key, (self.inst.clone(), Instant::now() + linger));
        drop(b);
        // Forgotten when its time is up, even if no request comes to sweep it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(linger).await;
                if let Ok(mut b) = book.lock() {
                    b.sweep(&workloads, Instant::now());
                }
            });
        }
    }
}

/// The Delegated Identity service.
pub struct DelegatedIdentityApi {
    workloads: Arc<Workloads>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    delegates: Arc<[Delegate]>,
    book: Arc<Mutex<Book>>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl DelegatedIdentityApi {
    /// The service over the agent's workloads and bundle, for `delegates`.
    pub fn new(
        workloads: Arc<Workloads>,
        bundle: watch::Receiver<Arc<TrustBundle>>,
        delegates: Vec<Delegate>,
    ) -> Self {
        Self {
            workloads,
            bundle,
            delegates: delegates.into(),
            book: Arc::default(),
        }
    }

    /// Checks the caller is an authorised delegate, now.
    async fn authorize<T>(&self, req: &Request<T>, method: &str) -> Result<Caller, Status> {
        let r = self.authorize_inner(req).await;
        if let Err(refusal) = &r {
            let peer = req.extensions().get::<Arc<ConnectionPeer>>();
            tracing::warn!(
                event = "delegated_refused",
                method,
                pid = ?peer.and_then(|p| p.pid),
                uid = ?peer.map(|p| p.uid),
                reason = %refusal,
                "delegated identity request refused"
            );
        }
        r.map_err(Status::from)
    }

    async fn authorize_inner<T>(&self, req: &Request<T>) -> Result<Caller, Refusal> {
        let peer = req
            .extensions()
            .get::<Arc<ConnectionPeer>>()
            .cloned()
            .ok_or_else(|| Refusal::NotAuthorized("no peer credentials".into()))?;
        peer.verify()
            .await
            .map_err(|r| Refusal::CallerChanged(r.to_string()))?;
        let delegate = self.authorizer().check(&peer)?;
        Ok(Caller { peer, delegate })
    }

    fn authorizer(&self) -> Authorizer {
        Authorizer {
            workloads: self.workloads.clone(),
            delegates: self.delegates.clone(),
        }
    }

    /// Takes a place among the caller's open streams.
    fn slot(&self, caller: &Caller) -> Result<StreamSlot, Status> {
        let mut b = self.book.lock().map_err(|_| Status::internal("lock"))?;
        let n = b.streams.entry(caller.delegate.clone()).or_insert(0);
        if *n >= MAX_SUBSCRIPTIONS_PER_DELEGATE {
            return Err(Refusal::TooManySubscriptions {
                delegate: caller.delegate.clone(),
                limit: MAX_SUBSCRIPTIONS_PER_DELEGATE,
            }
            .into());
        }
        *n += 1;
        Ok(StreamSlot {
            book: self.book.clone(),
            delegate: caller.delegate.clone(),
        })
    }

    /// The instance a request's target gets, with its X.509-SVIDs current if `with_x509`;
    /// for a pid, also the attested process (to follow).
    async fn instance(
        &self,
        caller: &Caller,
        target: &Target,
        with_x509: bool,
    ) -> Result<(Held, Option<Arc<AttestedPeer>>), Status> {
        let holder = caller
            .peer
            .attested()
            .ok_or_else(|| Status::internal("verified connection without attestation"))?;
        let (held, process) = match target {
            Target::Pid(pid) => {
                let pid = *pid;
                let attested = tokio::time::timeout(
                    PID_ATTESTATION_TIMEOUT,
                    tokio::task::spawn_blocking(move || attest_pid(pid)),
                )
                .await
                .map_err(|_| {
                    Status::from(Refusal::Workload {
                        pid,
                        why: "attestation took too long".into(),
                    })
                })?
                .map_err(|e| Status::internal(format!("attestation failed to run: {e}")))??;
                let entitled = self
                    .workloads
                    .entitled(ProcessBinding::of(&attested), &attested.selectors)
                    .map_err(|_| Status::internal("lock"))?;
                if let (true, Some(id)) = (entitled.entries.is_empty(), &entitled.revoked) {
                    return Err(Refusal::Revoked(revoked_message(id)).into());
                }
                // The delegate's own instance for that process, never the process's:
                // its own segment and keys, so each identity names one holder and
                // revoking one leaves the other. Keyed by the delegate process and the
                // target's pid and start time; the target's revocations apply to it,
                // and it ends when either process exits.
                let key = pid_key(holder, &attested);
                let held = hold(&self.book, &self.workloads, &caller.delegate, key, false)?;
                (held, Some(Arc::new(attested)))
            }
            Target::Selectors(selectors) => {
                let key = InstanceKey {
                    process: holder.process.instance,
                    pidfs_id: holder.process.pidfs_id,
                    exe: holder.process.exe,
                    selectors: Arc::from(selectors.as_slice()),
                    on_behalf_of: None,
                    // The delegate's share, not that of a uid its selectors name.
                    uid: holder.process.uid,
                };
                let own = holder.selectors == *selectors;
                let held = hold(&self.book, &self.workloads, &caller.delegate, key, own)?;
                (held, None)
            }
        };
        // A JWT fetch needs only the instance's segment: no X.509-SVID is minted for it.
        if !with_x509 {
            return Ok((held, process));
        }
        if let Err(e) = self.workloads.reconcile(&held.inst).await {
            // Nothing matched is not an error here; a server refusal or outage is.
            if !held.inst.state.borrow().svids.is_empty()
                || !self
                    .workloads
                    .entitled(held.inst.key.binding(), &held.inst.selectors)
                    .map(|e| e.entries.is_empty())
                    .unwrap_or(false)
            {
                return Err(Status::unavailable(format!(
                    "could not obtain an SVID: {e}"
                )));
            }
        }
        Ok((held, process))
    }

    fn x509_response(
        &self,
        inst: &Instance,
        set: &IdentitySet,
    ) -> dpb::SubscribeToX509sviDsResponse {
        dpb::SubscribeToX509sviDsResponse {
            x509_svids: set
                .svids
                .iter()
                .map(|s| dpb::X509svidWithKey {
                    x509_svid: Some(tpb::X509svid {
                        cert_chain: s.chain.clone(),
                        id: Some(spiffe_id_pb(&s.spiffe_id)),
                        expires_at: s.not_after,
                        hint: s.hint.clone(),
                    }),
                    x509_svid_key: s.key.to_vec(),
                })
                .collect(),
            federates_with: self
                .workloads
                .federated_bundles_for(&inst.selectors)
                .into_keys()
                .collect(),
        }
    }

    /// A bundle subscription (X.509 or JWT): authorises the caller, takes a stream slot,
    /// logs and reports the subscription as `method`, then streams `make` of the agent's
    /// bundles (audited as `audit`) whenever they change.
    async fn bundle_stream<Req, T: Send + 'static>(
        &self,
        request: &Request<Req>,
        method: &str,
        audit: &str,
        make: impl Fn(&Workloads, &TrustBundle) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<ResponseStream<T>>, Status> {
        let caller = self.authorize(request, method).await?;
        let slot = self.slot(&caller)?;
        tracing::info!(
            event = "delegated_subscription",
            method,
            delegate = %caller.delegate,
            caller_pid = ?caller.peer.pid,
            caller_uid = caller.peer.uid,
            "delegated identity subscription"
        );
        report(method, &caller, None, Vec::new());
        let workloads = self.workloads.clone();
        let stream = watch_stream(
            caller,
            self.authorizer(),
            None,
            None,
            self.bundle.clone(),
            slot,
            audit.into(),
            move |_, local| make(&workloads, local),
        );
        Ok(Response::new(stream))
    }

    /// Every bundle the agent holds, keyed `spiffe://TD`.
    fn all_bundles(
        workloads: &Workloads,
        local: &TrustBundle,
        value: impl Fn(&TrustBundle) -> Result<Vec<u8>, Status>,
    ) -> Result<HashMap<String, Vec<u8>>, Status> {
        let mut out = HashMap::new();
        if let Ok(f) = workloads.federated.read() {
            for b in f.1.values() {
                out.insert(b.trust_domain_id(), value(b)?);
            }
        }
        out.insert(local.trust_domain_id(), value(local)?);
        Ok(out)
    }
}

/// Why an open stream must end now, if it must: an identity of its instance revoked,
/// the delegate's process gone or changed or no longer authorised, or the followed
/// workload process gone or changed.
async fn stream_failure(
    caller: &Caller,
    authorizer: &Authorizer,
    held: Option<&Held>,
    seen: u64,
    process: Option<&Arc<AttestedPeer>>,
) -> Option<Status> {
    if let Some(h) = held {
        let n = h.inst.revocations.borrow().clone();
        if n.count > seen {
            return Some(
                Refusal::Revoked(revoked_message(
                    n.identity.as_deref().unwrap_or("of this workload"),
                ))
                .into(),
            );
        }
    }
    if let Err(r) = caller.peer.verify().await {
        return Some(Refusal::CallerChanged(r.to_string()).into());
    }
    if let Err(r) = authorizer.check(&caller.peer) {
        return Some(r.into());
    }
    if let Some(p) = process {
        let p2 = p.clone();
        let gone = tokio::task::spawn_blocking(move || p2.process.check())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|r| r.to_string()))
            .err();
        if let Some(why) = gone {
            return Some(
                Refusal::Workload {
                    pid: p.process.instance.pid,
                    why: why.replace("the process that opened this connection", "the process"),
                }
                .into(),
            );
        }
    }
    None
}

/// Streams `make()` now and whenever the instance's SVIDs or the bundle change, until the
/// delegate leaves or [`stream_failure`] says it must end (checked before every message,
/// on every revocation notice and every [`PID_RECHECK_INTERVAL`]); then it ends with that
/// status.
#[allow(
    clippy::too_many_arguments,
    reason = "one private helper for the four methods"
)]
fn watch_stream<T: Send + 'static>(
    caller: Caller,
    authorizer: Authorizer,
    held: Option<Held>,
    process: Option<Arc<AttestedPeer>>,
    mut bundle: watch::Receiver<Arc<TrustBundle>>,
    slot: StreamSlot,
    audit: String,
    make: impl Fn(Option<&Instance>, &TrustBundle) -> Result<T, Status> + Send + 'static,
) -> ResponseStream<T> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let _slot = slot;
        let mut revoked = caller.peer.revocation();
        let mut notices = held.as_ref().map(|h| h.inst.revocations.subscribe());
        let seen = notices
            .as_mut()
            .map(|n| n.borrow_and_update().count)
            .unwrap_or(0);
        let mut state = held.as_ref().map(|h| h.inst.state.subscribe());
        let mut recheck = tokio::time::interval(PID_RECHECK_INTERVAL);
        recheck.tick().await;
        let mut dirty = true;
        let why_ended: String = loop {
            if let Some(status) =
                stream_failure(&caller, &authorizer, held.as_ref(), seen, process.as_ref()).await
            {
                let why = status.message().to_string();
                let _ = tx.send(Err(status)).await;
                break why;
            }
            if dirty {
                dirty = false;
                if let Some(s) = state.as_mut() {
                    s.borrow_and_update();
                }
                let b = bundle.borrow_and_update().clone();
                let msg = make(held.as_ref().map(|h| &*h.inst), &b);
                let failed = msg.as_ref().err().map(|s| s.message().to_string());
                if tx.send(msg).await.is_err() {
                    break "the delegate closed the stream".into();
                }
                if let Some(why) = failed {
                    break why;
                }
            }
            let open = tokio::select! {
                r = async {
                    match state.as_mut() {
                        Some(s) => s.changed().await,
                        None => std::future::pending().await,
                    }
                } => { dirty = true; r.is_ok() }
                r = bundle.changed() => { dirty = true; r.is_ok() }
                _ = revoked.wait_for(Option::is_some) => true,
                _ = async {
                    match notices.as_mut() {
                        Some(n) => n.wait_for(|n| n.count > seen).await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                } => true,
                _ = recheck.tick() => true,
                _ = tx.closed() => false,
            };
            if !open {
                break "the delegate closed the stream".into();
            }
        };
        tracing::info!(
            event = "delegated_subscription_ended",
            subscription = %audit,
            delegate = %caller.delegate,
            reason = %why_ended,
            "delegated identity stream ended"
        );
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The gRPC path of `SubscribeToX509SVIDs`.
const SUBSCRIBE_X509_SVIDS_PATH: &str =
    "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs";

impl KeyCopies for dpb::SubscribeToX509sviDsResponse {
    fn zeroize_keys(&mut self) {
        for svid in &mut self.x509_svids {
            zeroize::Zeroize::zeroize(&mut svid.x509_svid_key);
        }
    }
}

/// `SubscribeToX509SVIDs`, served through [`ZeroizingService`] so that each answer's key
/// copies are zeroized once encoded.
#[derive(Clone)]
struct SubscribeX509Svids(Arc<DelegatedIdentityApi>);

impl tonic::server::ServerStreamingService<dpb::SubscribeToX509sviDsRequest>
    for SubscribeX509Svids
{
    type Response = dpb::SubscribeToX509sviDsResponse;
    type ResponseStream = ResponseStream<dpb::SubscribeToX509sviDsResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<dpb::SubscribeToX509sviDsRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.subscribe_to_x509svi_ds(request).await })
    }
}

#[tonic::async_trait]
impl DelegatedIdentity for DelegatedIdentityApi {
    type SubscribeToX509SVIDsStream = ResponseStream<dpb::SubscribeToX509sviDsResponse>;
    type SubscribeToX509BundlesStream = ResponseStream<dpb::SubscribeToX509BundlesResponse>;
    type SubscribeToJWTBundlesStream = ResponseStream<dpb::SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<dpb::SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let caller = self.authorize(&request, "SubscribeToX509SVIDs").await?;
        let req = request.get_ref();
        let target = Target::of(&req.selectors, req.pid).map_err(Status::from)?;
        let slot = self.slot(&caller)?;
        let (held, process) = self.instance(&caller, &target, true).await?;
        let audit = format!(
            "x509-svids {} instance {}",
            target.describe(),
            held.inst.segment
        );
        let identities: Vec<String> = held
            .inst
            .state
            .borrow()
            .svids
            .iter()
            .map(|s| s.spiffe_id.clone())
            .collect();
        tracing::info!(
            event = "delegated_subscription",
            method = "SubscribeToX509SVIDs",
            delegate = %caller.delegate,
            caller_pid = ?caller.peer.pid,
            caller_uid = caller.peer.uid,
            target = %target.describe(),
            instance = %held.inst.segment,
            identities = ?identities,
            "delegated identity subscription"
        );
        report("SubscribeToX509SVIDs", &caller, Some(&target), identities);
        let workloads = self.workloads.clone();
        let me = Self {
            workloads,
            bundle: self.bundle.clone(),
            delegates: self.delegates.clone(),
            book: self.book.clone(),
        };
        let stream = watch_stream(
            caller,
            self.authorizer(),
            Some(held),
            process,
            self.bundle.clone(),
            slot,
            audit,
            move |inst, _| {
                let inst = inst.ok_or_else(|| Status::internal("no instance"))?;
                let set = inst.state.borrow().clone();
                Ok(me.x509_response(inst, &set))
            },
        );
        Ok(Response::new(stream))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        request: Request<dpb::SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        self.bundle_stream(
            &request,
            "SubscribeToX509Bundles",
            "x509-bundles",
            |workloads, local| {
                Ok(dpb::SubscribeToX509BundlesResponse {
                    ca_certificates: Self::all_bundles(workloads, local, |b| Ok(b.x509_der()))?,
                })
            },
        )
        .await
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        request: Request<dpb::SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        self.bundle_stream(
            &request,
            "SubscribeToJWTBundles",
            "jwt-bundles",
            |workloads, local| {
                Ok(dpb::SubscribeToJwtBundlesResponse {
                    bundles: Self::all_bundles(workloads, local, |b| {
                        b.jwks_json()
                            .map(String::into_bytes)
                            .map_err(|e| Status::internal(e.to_string()))
                    })?,
                })
            },
        )
        .await
    }

    async fn fetch_jwtsvi_ds(
        &self,
        request: Request<dpb::FetchJwtsviDsRequest>,
    ) -> Result<Response<dpb::FetchJwtsviDsResponse>, Status> {
        let caller = self.authorize(&request, "FetchJWTSVIDs").await?;
        let req = request.get_ref();
        if req.audience.is_empty() {
            return Err(Refusal::InvalidRequest("audience must be specified".into()).into());
        }
        let audience = crate::limits::normalize_audiences(&req.audience)
            .map_err(|e| Status::from(Refusal::InvalidRequest(e.to_string())))?;
        let target = Target::of(&req.selectors, req.pid).map_err(Status::from)?;
        let (held, _process) = self.instance(&caller, &target, false).await?;
        let svids = self.mint_jwts(&held.inst, &audience).await?;
        let identities: Vec<String> = svids
            .iter()
            .filter_map(|s| s.id.as_ref())
            .map(|i| format!("spiffe://{}{}", i.trust_domain, i.path))
            .collect();
        tracing::info!(
            event = "delegated_subscription",
            method = "FetchJWTSVIDs",
            delegate = %caller.delegate,
            caller_pid = ?caller.peer.pid,
            caller_uid = caller.peer.uid,
            target = %target.describe(),
            instance = %held.inst.segment,
            audience = ?audience,
            identities = ?identities,
            "delegated identity fetch"
        );
        report("FetchJWTSVIDs", &caller, Some(&target), identities);
        drop(held);
        Ok(Response::new(dpb::FetchJwtsviDsResponse { svids }))
    }
}

impl DelegatedIdentityApi {
    /// JWT-SVIDs of every entry of `inst` for `audience`: cached ones until half their
    /// life, else minted by the server (bounded per instance as on the Workload API).
    async fn mint_jwts(
        &self,
        inst: &Instance,
        audience: &[String],
    ) -> Result<Vec<tpb::Jwtsvid>, Status> {
        let entries: Vec<npb::Entry> = self
            .workloads
            .entitled(inst.key.binding(), &inst.selectors)
            .map_err(|_| Status::internal("lock"))?
            .entries;
        let now = unix_seconds(std::time::SystemTime::now());
        let mut out = Vec::new();
        let mut to_mint = Vec::new();
        {
            let mut cache = inst
                .jwt_cache
                .lock()
                .map_err(|_| Status::internal("lock"))?;
            for e in entries {
                let id = Workloads::identity_for(inst, &e);
                match cache.reusable(&(id.clone(), audience.to_vec()), now) {
                    Some(j) => out.push(tpb::Jwtsvid {
                        token: j.token.clone(),
                        id: Some(spiffe_id_pb(&id)),
                        expires_at: j.expires_at,
                        issued_at: j.issued_at,
                        hint: e.hint.clone(),
                    }),
                    None => to_mint.push((e, id)),
                }
            }
            // Recorded now, under the same lock: see `JwtCache`.
            if !to_mint.is_empty() {
                cache.allow_mints(to_mint.len(), now).map_err(|exceeded| {
                    Status::resource_exhausted(format!(
                        "JWT-SVID mint rate exceeded: {} minted for this workload in the last minute, at most {}",
                        exceeded.recent,
                        crate::limits::MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE
                    ))
                })?;
            }
        }
        if to_mint.is_empty() {
            return Ok(out);
        }
        let resp = crate::workload_api::mint_jwt_svids(&self.workloads, &to_mint, audience)
            .await
            .map_err(|s| {
                Status::unavailable(format!("could not obtain a JWT-SVID: {}", s.message()))
            })?;
        if resp.results.len() != to_mint.len() {
            return Err(Status::unavailable(
                "the server answered a different number of JWT requests",
            ));
        }
        let mut cache = inst
            .jwt_cache
            .lock()
            .map_err(|_| Status::internal("lock"))?;
        for ((e, id), r) in to_mint.into_iter().zip(resp.results) {
            let (s, kid) = crate::workload_api::minted_jwt(&self.workloads, r, &id, audience)?;
            cache.remember(
                (id.clone(), audience.to_vec()),
                crate::workloads::CachedJwt {
                    token: s.token.clone(),
                    expires_at: s.expires_at,
                    issued_at: now,
                    kid,
                },
                now,
            );
            out.push(tpb::Jwtsvid {
                token: s.token,
                id: Some(spiffe_id_pb(&id)),
                expires_at: s.expires_at,
                issued_at: now,
                hint: e.hint.clone(),
            });
        }
        out.sort_by(|a, b| {
            let k = |j: &tpb::Jwtsvid| j.id.as_ref().map(|i| i.path.clone());
            k(a).cmp(&k(b))
        });
        Ok(out)
    }
}

/// The mode of the socket's directory when the agent creates it: the agent's user only,
/// plus search (not listing) for the group or others when `socket_mode` lets them connect.
fn dir_mode(socket_mode: u32) -> u32 {
    let group = if socket_mode & 0o070 != 0 { 0o010 } else { 0 };
    let others = if socket_mode & 0o007 != 0 { 0o001 } else { 0 };
    0o700 | group | others
}

/// Binds the delegated identity socket: its directory checked like the Workload API's
/// (created 0700, see [`dir_mode`]),
/// a stale socket replaced, the mode set.
fn bind(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let l = crate::bind_socket(path, dir_mode(mode))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("restricting {}", path.display())))?;
    Ok(l)
}

/// Starts serving the API when `config` names a socket: binds it now (so a bad path
/// fails the agent's start) and returns the server to spawn; `None` when off. Its
/// connections share the descriptors with the Workload API socket's
/// (`workload_max_connections`).
pub fn start(
    config: &DelegatedConfig,
    workload_max_connections: usize,
    workloads: Arc<Workloads>,
    bundle: watch::Receiver<Arc<TrustBundle>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Option<impl std::future::Future<Output = ()> + Send + 'static>, Error> {
    let delegates = config.validate()?;
    let Some(path) = config.socket.clone() else {
        return Ok(None);
    };
    let listener = bind(&path, config.socket_mode)?;
    tracing::info!(
        socket = %path.display(),
        delegates = ?delegates.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "Delegated Identity API ready (spire.api.agent.delegatedidentity.v1)"
    );
    // SubscribeToX509SVIDs answers' key copies are zeroized once encoded.
    let api = Arc::new(DelegatedIdentityApi::new(workloads, bundle, delegates));
    let max = crate::workload_listener::MAX_REQUEST_MESSAGE_BYTES;
    let api = ZeroizingService::new(
        DelegatedIdentityServer::from_arc(api.clone()).max_decoding_message_size(max),
        SUBSCRIBE_X509_SVIDS_PATH,
        ServerStreaming(SubscribeX509Svids(api)),
        max,
    );
    let routes = tonic::service::Routes::new(api);
    let limits = crate::workload_listener::Limits {
        max_connections: config.max_connections,
        idle_timeout: crate::workload_listener::DEFAULT_IDLE_TIMEOUT,
        // The Workload API socket's: they share the descriptors.
        others_max_connections: workload_max_connections,
    };
    Ok(Some(async move {
        crate::workload_listener::serve(listener, routes, limits, shutdown).await;
        let _ = std::fs::remove_file(&path);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(t: &str, v: &str) -> tpb::Selector {
        tpb::Selector {
            r#type: t.into(),
            value: v.into(),
        }
    }

    /// The message of a refusal that must be a configuration error (its kind), for the
    /// reason checks.
    fn config_refusal<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
        match r {
            Err(Error::Config(m)) => m,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn delegates_parse_and_bad_ones_are_refused() {
        assert_eq!(Delegate::parse("uid:0").unwrap(), Delegate::Uid(0));
        assert_eq!(
            Delegate::parse("spiffe://example.org/proxy").unwrap(),
            Delegate::SpiffeId("spiffe://example.org/proxy".into())
        );
        for bad in ["uid:x", "uid:", "root", "spiffe://", "spiffe://EX AMPLE/x"] {
            let e = config_refusal(Delegate::parse(bad));
            assert!(e.contains("[delegated_identity]"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_is_checked() {
        let off = DelegatedConfig::default();
        assert!(off.validate().unwrap().is_empty());
        let mut c = DelegatedConfig {
            socket: Some("/run/ztid/agent/admin.sock".into()),
            ..Default::default()
        };
        assert!(config_refusal(c.validate()).contains("nobody could call"));
        c.authorized_delegates = vec!["uid:0".into(), "spiffe://example.org/p".into()];
        assert_eq!(c.validate().unwrap().len(), 2);
        assert!(
            config_refusal(c.validate_beside(Path::new("/run/ztid/agent/admin.sock")))
                .contains("is the Workload API socket")
        );
        // Not in the Workload API socket's directory (which workloads are given), nor
        // below it, however the path is spelt.
        for beside in [
            "/run/ztid/agent/admin.sock",
            "/run/ztid/agent/sub/admin.sock",
            "/run/ztid/agent/./x/../admin.sock",
            "/run/ztid/other/../agent/admin.sock",
        ] {
            c.socket = Some(beside.into());
            let e = config_refusal(c.validate_beside(Path::new("/run/ztid/agent/api.sock")));
            assert!(
                e.contains("is in the Workload API socket's directory /run/ztid/agent"),
                "{beside}: {e}"
            );
        }
        c.socket = Some("/run/ztid/delegated/api.sock".into());
        assert!(c
            .validate_beside(Path::new("/run/ztid/agent/api.sock"))
            .is_ok());
        // Through a symlink too.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("agent")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("agent"), dir.path().join("link")).unwrap();
        c.socket = Some(dir.path().join("link/admin.sock"));
        assert!(c
            .validate_beside(&dir.path().join("agent/api.sock"))
            .unwrap_err()
            .to_string()
            .contains("Workload API socket's directory"));
        c.socket_mode = 0o4777;
        assert!(c.validate().is_err());
        c.socket_mode = 0o600;
        c.authorized_delegates = (0..=MAX_AUTHORIZED_DELEGATES)
            .map(|i| format!("uid:{i}"))
            .collect();
        assert!(config_refusal(c.validate()).contains("at most"));
        let toml_text =
            "socket = \"/tmp/x.sock\"\nsocket_mode = 0o660\nauthorized_delegates = [\"uid:0\"]\n";
        let parsed: DelegatedConfig = toml::from_str(toml_text).unwrap();
        assert_eq!(parsed.socket_mode, 0o660);
        assert!(toml::from_str::<DelegatedConfig>("sockett = \"x\"").is_err());
    }

    #[test]
    fn a_target_is_selectors_or_a_pid_never_both_and_bounded() {
        let one = [sel("unix", "uid:1000")];
        assert_eq!(
            Target::of(&one, 0).unwrap(),
            Target::Selectors(vec![Selector::parse("unix:uid:1000").unwrap()])
        );
        assert_eq!(Target::of(&[], 42).unwrap(), Target::Pid(42));
        let both = Target::of(&one, 42).unwrap_err();
        assert!(matches!(both, Refusal::InvalidRequest(ref m) if m.contains("mutually exclusive")));
        assert!(matches!(
            Target::of(&[], 0),
            Err(Refusal::InvalidRequest(_))
        ));
        assert!(matches!(
            Target::of(&[], -1),
            Err(Refusal::InvalidRequest(_))
        ));
        let many: Vec<_> = (0..=MAX_SELECTORS_PER_REQUEST)
            .map(|i| sel("unix", &format!("uid:{i}")))
            .collect();
        assert!(
            matches!(Target::of(&many, 0), Err(Refusal::InvalidRequest(ref m)) if m.contains("at most"))
        );
        let bad = Target::of(&[sel("nope", &"x".repeat(1000))], 0).unwrap_err();
        assert!(bad.to_string().len() < 400, "echo bounded: {bad}");
        // Duplicates and order do not make another instance.
        let a = Target::of(
            &[
                sel("unix", "uid:1"),
                sel("unix", "gid:2"),
                sel("unix", "uid:1"),
            ],
            0,
        )
        .unwrap();
        let b = Target::of(&[sel("unix", "gid:2"), sel("unix", "uid:1")], 0).unwrap();
        assert_eq!(a, b);
        let status = Status::from(both);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let denied = Status::from(Refusal::NotAuthorized("uid 5 is not listed".into()));
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            "not an authorized delegate: uid 5 is not listed"
        );
    }

    #[test]
    fn reports_wait_for_the_sync_bounded_and_are_put_back_unless_refused() {
        // The only test of the process-wide queue.
        while !take_report().0.is_empty() {}
        let call = |i: usize| npb::DelegatedSubscription {
            method: "FetchJWTSVIDs".into(),
            delegate: "uid:0".into(),
            target: format!("pid:{i}"),
            ..Default::default()
        };
        restore_report((0..300).map(call).collect(), 2, false);
        let (first, dropped) = take_report();
        assert_eq!((first.len(), dropped), (MAX_REPORTED_PER_SYNC, 2));
        assert_eq!(first[0].target, "pid:0", "oldest first");
        // A failed sync puts them back ahead of the rest.
        restore_report(first, 0, false);
        let (again, _) = take_report();
        assert_eq!(again[0].target, "pid:0");
        let (rest, _) = take_report();
        assert_eq!(rest.len(), 300 - MAX_REPORTED_PER_SYNC);
        // One the server refused is only counted.
        restore_report(again, 0, true);
        assert_eq!(take_report(), (Vec::new(), MAX_REPORTED_PER_SYNC as u32));
        // The queue is bounded.
        restore_report((0..MAX_QUEUED_REPORTS + 5).map(call).collect(), 0, false);
        assert_eq!(REPORTS.lock().unwrap().queued.len(), MAX_QUEUED_REPORTS);
        while !take_report().0.is_empty() {}
        assert_eq!(take_report().1, 0);
    }

    /// Workloads that never reach a server (nothing here mints).
    async fn offline_workloads() -> Arc<Workloads> {
        offline_workloads_capped(crate::workloads::DEFAULT_MAX_INSTANCES).await
    }

    /// Offline workloads holding at most `max_instances` process instances.
    async fn offline_workloads_capped(max_instances: usize) -> Arc<Workloads> {
        use crate::servers::{parse_server_list, NodeConnections, Servers};
        let servers = Servers::new(parse_server_list("127.0.0.1:9").unwrap()).await;
        let node = NodeConnections::new(
            servers,
            Arc::new(crate::tls::ServerSvidVerifier::insecure_bootstrap()),
            None,
        );
        let bundle = watch::Sender::new(Arc::new(TrustBundle::default()));
        Arc::new(
            Workloads::new(
                Arc::new(arc_swap::ArcSwap::from_pointee(node)),
                bundle.subscribe(),
            )
            .with_max_instances(max_instances),
        )
    }

    fn book(linger: Duration, limit: usize) -> Arc<Mutex<Book>> {
        Arc::new(Mutex::new(Book::new(linger, limit)))
    }

    fn sel_key(me: &AttestedPeer, sel: &str) -> InstanceKey {
        InstanceKey {
            process: me.process.instance,
            pidfs_id: me.process.pidfs_id,
            exe: me.process.exe,
            selectors: Arc::from(vec![Selector::parse(sel).unwrap()]),
            on_behalf_of: None,
            uid: me.process.uid,
        }
    }

    #[tokio::test]
    async fn a_selector_instance_is_shared_kept_a_minute_after_the_last_and_then_forgotten() {
        let workloads = offline_workloads().await;
        let linger = Duration::from_millis(300);
        let book = book(linger, 100);
        let me = attest_pid(std::process::id() as i32).unwrap();
        let d = "uid:0";
        let a = hold(&book, &workloads, d, sel_key(&me, "unix:uid:4242"), false).unwrap();
        let b = hold(&book, &workloads, d, sel_key(&me, "unix:uid:4242"), false).unwrap();
        let other = hold(&book, &workloads, d, sel_key(&me, "unix:uid:4243"), false).unwrap();
        assert!(
            Arc::ptr_eq(&a.inst, &b.inst),
            "one instance per selector set"
        );
        assert_ne!(a.inst.segment, other.inst.segment, "its own segment");
        assert_eq!(workloads.instance_count(), 2);
        let first = a.inst.clone();
        drop((a, b));
        // Kept after its last holder: asked again (a new subscription, a new fetch), it is
        // the same instance with its segment, keys and JWT count.
        assert_eq!(workloads.instance_count(), 2, "kept for {linger:?}");
        let again = hold(&book, &workloads, d, sel_key(&me, "unix:uid:4242"), false).unwrap();
        assert!(
            Arc::ptr_eq(&again.inst, &first),
            "reused, not a new instance"
        );
        drop(again);
        // Forgotten once its time is up, with no request to sweep it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while workloads.instance_count() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(workloads.instance_count(), 1, "forgotten after {linger:?}");
        let new = hold(&book, &workloads, d, sel_key(&me, "unix:uid:4242"), false).unwrap();
        assert_ne!(new.inst.segment, first.segment, "then a new one");
        drop((new, other));
        // The delegate's own instance (it named its own selectors) is never forgotten.
        let own = hold(&book, &workloads, d, InstanceKey::of(&me), true).unwrap();
        drop(own);
        tokio::time::sleep(linger * 2).await;
        let map_has_own = workloads
            .live_instances()
            .iter()
            .any(|i| i.key == InstanceKey::of(&me));
        assert!(map_has_own);
        assert!(book.lock().unwrap().holders.is_empty());
    }

    #[test]
    fn a_delegated_answer_is_encoded_whole_and_its_key_copies_zeroized_after() {
        let svid = |key: &[u8]| dpb::X509svidWithKey {
            x509_svid: None,
            x509_svid_key: key.to_vec(),
        };
        let mut answer = dpb::SubscribeToX509sviDsResponse {
            x509_svids: vec![svid(b"first key"), svid(b"second key")],
            ..Default::default()
        };
        let expected = answer.clone();
        let mut buf = Vec::new();
        crate::zeroizing_x509_answers::encode_then_zeroize_keys(&mut answer, &mut buf).unwrap();
        assert_eq!(
            <dpb::SubscribeToX509sviDsResponse as prost::Message>::decode(buf.as_slice()).unwrap(),
            expected
        );
        assert!(answer.x509_svids.iter().all(|s| s.x509_svid_key.is_empty()));
    }

    #[test]
    fn the_zeroizing_path_is_the_generated_services_subscribe_to_x509_svids() {
        use tonic::server::NamedService;
        assert_eq!(
            SUBSCRIBE_X509_SVIDS_PATH,
            format!(
                "/{}/SubscribeToX509SVIDs",
                <DelegatedIdentityServer<DelegatedIdentityApi> as NamedService>::NAME
            )
        );
    }

    #[tokio::test]
    async fn a_delegate_making_too_many_new_instances_a_minute_is_refused() {
        let workloads = offline_workloads().await;
        let book = book(Duration::from_secs(60), 3);
        let me = attest_pid(std::process::id() as i32).unwrap();
        let mut held = Vec::new();
        for uid in 0..3 {
            let key = sel_key(&me, &format!("unix:uid:{}", 5000 + uid));
            held.push(hold(&book, &workloads, "uid:0", key, false).unwrap());
        }
        // Closing and reopening, or fetching again, reuses: not counted.
        held.clear();
        for uid in 0..3 {
            let key = sel_key(&me, &format!("unix:uid:{}", 5000 + uid));
            held.push(hold(&book, &workloads, "uid:0", key, false).unwrap());
        }
        // A fourth selector set (extra selectors make a new set) is refused.
        let err = hold(
            &book,
            &workloads,
            "uid:0",
            sel_key(&me, "unix:uid:5009"),
            false,
        )
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().starts_with(
                "uid:0 made 3 new delegated instances in the last minute, the most one delegate may"
            ),
            "{}",
            err.message()
        );
        assert_eq!(workloads.instance_count(), 3, "nothing made");
        // Another delegate has its own count.
        let key = sel_key(&me, "unix:uid:5009");
        assert!(hold(&book, &workloads, "spiffe://example.org/p", key, false).is_ok());
    }

    #[tokio::test]
    async fn an_instance_refused_at_the_agents_cap_does_not_count_against_the_delegate() {
        let workloads = offline_workloads_capped(1).await;
        let book = book(Duration::from_secs(60), 2);
        let me = attest_pid(std::process::id() as i32).unwrap();
        // Held by a delegate of another uid: this one is under its share (1) and meets
        // the cap.
        let mut other_uids = sel_key(&me, "unix:uid:5000");
        other_uids.uid = me.process.uid.wrapping_add(1);
        let _first = hold(&book, &workloads, "uid:1", other_uids, false).unwrap();
        // The agent is full: refused for the cap, again and again, and none of these
        // attempts spends the delegate's new instances a minute (2).
        for _ in 0..3 {
            let err = hold(
                &book,
                &workloads,
                "uid:0",
                sel_key(&me, "unix:uid:5001"),
                false,
            )
            .err()
            .unwrap();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted);
            assert!(
                err.message().starts_with("workload instance cap reached"),
                "{}",
                err.message()
            );
        }
        assert_eq!(book.lock().unwrap().made.get("uid:0"), None);
        assert_eq!(workloads.instance_count(), 1);
    }

    #[tokio::test]
    async fn a_delegates_instances_count_against_its_own_uids_share_not_the_targets() {
        use crate::workloads::InstanceError;
        // A cap of 4: each uid's share is 2.
        let workloads = offline_workloads_capped(4).await;
        let book = book(Duration::from_secs(60), 10);
        let me = attest_pid(std::process::id() as i32).unwrap();
        let uid = me.process.uid;
        // The selectors name other uids; the delegate holds the instances.
        let _held: Vec<Held> = ["unix:uid:5000", "unix:uid:5001"]
            .into_iter()
            .map(|sel| hold(&book, &workloads, "uid:0", sel_key(&me, sel), false).unwrap())
            .collect();
        let err = hold(
            &book,
            &workloads,
            "uid:0",
            sel_key(&me, "unix:uid:5002"),
            false,
        )
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            err.message(),
            InstanceError::UserShareReached { uid, share: 2 }.to_string()
        );
        assert!(err.message().contains(&format!("for uid {uid}:")));
        // Not made, so not counted against the delegate's new instances a minute.
        assert_eq!(
            book.lock().unwrap().made.get("uid:0").map(|m| m.len()),
            Some(2)
        );
        assert_eq!(workloads.instance_count(), 2);
        // Another uid (another delegate's, or a process's own) is still served.
        let mut other = sel_key(&me, "unix:uid:5002");
        other.uid = uid.wrapping_add(1);
        assert!(hold(&book, &workloads, "uid:1", other, false).is_ok());
        // A delegate's instance of a pid is the delegate's uid's, whatever the target's.
        let target = AttestedPeer {
            process: crate::workload_attestation::PeerProcess::for_tests(
                me.process.instance,
                me.process.exe,
                (uid.wrapping_add(7), 0),
            ),
            selectors: me.selectors.clone(),
        };
        assert_eq!(pid_key(&me, &target).uid, uid);
    }

    /// `sleep` as a child, attested.
    fn sleeper(cmd: &[&str]) -> Option<std::process::Child> {
        std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .stdin(std::process::Stdio::null())
            .spawn()
            .ok()
    }

    #[tokio::test]
    async fn a_delegate_gets_its_own_instance_of_a_pid_forgotten_when_the_process_exits() {
        let workloads = offline_workloads().await;
        let book = book(Duration::from_secs(60), 100);
        let me = attest_pid(std::process::id() as i32).unwrap();
        let mut child = sleeper(&["sleep", "30"]).unwrap();
        let pid = child.id() as i32;
        // Attested once it runs sleep (not this test binary, forked).
        let deadline = Instant::now() + Duration::from_secs(10);
        let target = loop {
            let t = attest_pid(pid).unwrap();
            if t.process.exe != me.process.exe || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let own = workloads.instance_for(&target).unwrap();
        let key = pid_key(&me, &target);
        assert_eq!(
            key.binding(),
            ProcessBinding::of(&target),
            "its revocations"
        );
        let delegated = hold(&book, &workloads, "uid:0", key.clone(), false).unwrap();
        assert!(
            !Arc::ptr_eq(&own, &delegated.inst),
            "not the process's own instance"
        );
        assert_ne!(own.segment, delegated.inst.segment, "nor its identity");
        let twice = hold(&book, &workloads, "uid:0", key, false).unwrap();
        assert!(
            Arc::ptr_eq(&twice.inst, &delegated.inst),
            "shared by the delegate's streams"
        );
        assert_eq!(workloads.instance_count(), 2);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            workloads.live_instances().is_empty(),
            "both forgotten when the process exits"
        );
        drop((delegated, twice));
    }

    #[test]
    fn a_uid_delegate_must_share_the_agents_user_and_pid_namespaces() {
        assert_eq!(uid_delegate_namespaces(std::process::id() as i32), Ok(()));
        // A process in a user namespace of its own (as a container's root may be).
        if let Some(mut c) = sleeper(&["unshare", "--user", "sleep", "30"]) {
            let pid = c.id() as i32;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut r = uid_delegate_namespaces(pid);
            while r.is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                r = uid_delegate_namespaces(pid);
            }
            let _ = c.kill();
            let _ = c.wait();
            match r {
                Err(why) => assert!(
                    why.contains("user namespace other than the agent's"),
                    "{why}"
                ),
                Ok(()) => eprintln!("skipped: unshare --user did not make a user namespace"),
            }
        }
        // A process in a pid namespace of its own, seen from the agent's.
        if let Some(mut c) = sleeper(&["unshare", "--pid", "--fork", "sleep", "30"]) {
            let pid = c.id();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut r = Ok(());
            while Instant::now() < deadline {
                let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                if let Some(k) = kids.split_whitespace().next() {
                    r = uid_delegate_namespaces(k.parse().unwrap());
                    if r.is_err() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            match r {
                Err(why) => assert!(
                    why.contains("pid namespace other than the agent's"),
                    "{why}"
                ),
                Ok(()) => eprintln!("skipped: unshare --pid needs privileges"),
            }
        }
    }

    #[test]
    fn the_socket_directory_is_the_agents_own_unless_the_socket_mode_shares_it() {
        assert_eq!(dir_mode(0o600), 0o700);
        assert_eq!(dir_mode(0o660), 0o710);
        assert_eq!(dir_mode(0o666), 0o711);
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delegated/api.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _l = rt.block_on(async { bind(&path, 0o600) }).unwrap();
        let mode = std::fs::metadata(dir.path().join("delegated"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
    }

    #[test]
    fn spiffe_ids_split_as_spire_does() {
        let id = spiffe_id_pb("spiffe://example.org/w/0123");
        assert_eq!(id.trust_domain, "example.org");
        assert_eq!(id.path, "/w/0123");
    }

    #[test]
    fn a_pid_is_attested_like_a_workload_api_caller() {
        let me = attest_pid(std::process::id() as i32).unwrap();
        assert!(me
            .selectors
            .iter()
            .any(|s| s.to_string().starts_with("unix:uid:")));
        let gone = attest_pid(i32::MAX).unwrap_err();
        assert!(matches!(gone, Refusal::Workload { pid, .. } if pid == i32::MAX));
    }
}
