//! Container and systemd workload attestation: from a caller's pid, its cgroup names the
//! container (and the systemd unit) it runs in; the container's runtime, asked over its
//! own socket, gives the facts that become `container:*` and `k8s:*` selectors.
//!
//! - [`cgroup`]: `/proc/<pid>/cgroup` → container ID and systemd unit (pure parsing).
//! - [`docker_api`]: the docker-compatible API (docker, `podman system service`).
//! - [`containerd`]: containerd's own gRPC API (CRI containers in `k8s.io`, `ctr`'s).
//! - [`cache`]: answers per container ID, bounded.
//!
//! Off unless `--container-socket` is given: a host without containers pays nothing.
//!
//! A caller's container is believed only if
//! 1. its cgroup path names it (not under a user's own systemd manager),
//! 2. a configured runtime, serving its socket as root (or as the agent's own uid on a
//!    socket file of that uid), knows that ID and says it runs,
//! 3. the container's first process is in a cgroup naming the same ID at the same place
//!    as when the runtime answered, and the caller's cgroup path up to and including the
//!    container's component is that same path (an ID copied into a cgroup name elsewhere,
//!    e.g. under a unit with `Delegate=yes`, is another place; a reused first pid too),
//! 4. the caller is in that container's pid namespace (the namespace of the container's
//!    first process, which only the runtime and root can enter), unless the container
//!    shares the host's, and
//! 5. its cgroup still names the same container after the runtime answered.
//!
//! `k8s:*` selectors come from the `io.kubernetes.*` labels only for a container in a
//! kubelet pod's cgroup (`kubepods`) whose answer came from containerd's `k8s.io`
//! namespace (the CRI's, where the kubelet sets them): docker and podman copy an image's
//! own labels into its containers', so there an image could name any namespace.
//!
//! Any failure gives no container selectors (logged and counted), never a guess; the
//! caller keeps its `unix:` selectors. The final check of the peer binding
//! ([`crate::workload_attestation`]) then refuses a caller that exited meanwhile.

pub mod cache;
pub mod cgroup;
pub mod containerd;
pub mod docker_api;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ztid_spiffe::Selector;

use crate::Error;
use docker_api::{ContainerFacts, RuntimeError};

/// Longest time one runtime is given for one answer.
pub const RUNTIME_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest time all runtimes together are given for one caller (within the 5 s of an
/// accept-time attestation).
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(3);
/// Runtime sockets configured at most.
pub const MAX_SOCKETS: usize = 8;
/// Container labels turned into selectors at most (the rest are logged as dropped).
pub const MAX_LABEL_SELECTORS: usize = 128;

/// Kubernetes pod labels the kubelet puts on every container, and their selectors.
/// Believed only from containerd's CRI namespace, for a container in a pod's cgroup.
const K8S_LABELS: &[(&str, &str)] = &[
    ("io.kubernetes.pod.namespace", "ns"),
    ("io.kubernetes.pod.name", "pod-name"),
    ("io.kubernetes.pod.uid", "pod-uid"),
    ("io.kubernetes.container.name", "container-name"),
];

/// Lookups that gave no container selectors though the caller's cgroup named a
/// container (runtime down, unknown container, namespace mismatch).
static FAILED_LOOKUPS: AtomicU64 = AtomicU64::new(0);

/// Lookups answered from the runtime (not the cache).
static RUNTIME_CALLS: AtomicU64 = AtomicU64::new(0);

/// Container lookups that gave no selectors so far.
pub fn failed_lookups() -> u64 {
    FAILED_LOOKUPS.load(Ordering::Relaxed)
}

/// Runtime calls made so far (cache misses).
pub fn runtime_calls() -> u64 {
    RUNTIME_CALLS.load(Ordering::Relaxed)
}

/// Which API a runtime socket serves.
const API_UNKNOWN: u8 = 0;
const API_DOCKER: u8 = 1;
const API_CONTAINERD: u8 = 2;

/// One configured runtime socket.
pub struct RuntimeSocket {
    path: PathBuf,
    /// `API_*`: given by the scheme, or learnt from the first answer.
    api: AtomicU8,
}

impl RuntimeSocket {
    /// The socket's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Parses a `--container-socket` value: `unix:///abs/path` (the API is recognised from
/// the first answer: docker-compatible HTTP or containerd's gRPC), `containerd:///abs/path`
/// or `docker:///abs/path` to say which.
pub fn parse_socket(value: &str) -> Result<RuntimeSocket, Error> {
    let (api, path) = if let Some(p) = value.strip_prefix("containerd://") {
        (API_CONTAINERD, p)
    } else if let Some(p) = value.strip_prefix("docker://") {
        (API_DOCKER, p)
    } else {
        (API_UNKNOWN, value.strip_prefix("unix://").unwrap_or(value))
    };
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(Error::Config(format!(
            "--container-socket {value:?}: expected unix:///ABSOLUTE/PATH (or containerd:///PATH, docker:///PATH)"
        )));
    }
    Ok(RuntimeSocket {
        path: PathBuf::from(path),
        api: AtomicU8::new(api),
    })
}

/// A runtime's answer about a container, with where its first process was right after
/// the runtime answered (the place every later caller must share).
#[derive(Debug)]
pub struct Known {
    /// The runtime's answer.
    pub facts: ContainerFacts,
    /// The first process's cgroups as read just after the answer.
    pub init: cgroup::ContainerRef,
}

/// The CRI plugin's containerd namespace.
const CRI_NAMESPACE: &str = "k8s.io";

/// The cgroup-based attestors as configured.
pub struct ContainerAttestor {
    sockets: Vec<RuntimeSocket>,
    cache: cache::Cache,
}

impl ContainerAttestor {
    /// An attestor asking these runtime sockets, in order (at most [`MAX_SOCKETS`]).
    pub fn new(sockets: Vec<RuntimeSocket>) -> Result<Self, Error> {
        if sockets.len() > MAX_SOCKETS {
            return Err(Error::Config(format!(
                "at most {MAX_SOCKETS} container runtime sockets"
            )));
        }
        Ok(Self {
            sockets,
            cache: cache::Cache::default(),
        })
    }

    /// The `container:*`, `k8s:*` and `systemd:unit` selectors of `pid`. Blocking (reads
    /// `/proc`, may wait on a runtime up to [`LOOKUP_DEADLINE`]): call it off the async
    /// workers. Nothing on any failure.
    pub fn selectors(&self, pid: i32) -> Vec<Selector> {
        let Ok(content) = read_cgroup_file(pid) else {
            // Gone: the caller's final check refuses it.
            return Vec::new();
        };
        let facts = match cgroup::parse(&content) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(pid, error = %e, "no container or systemd selectors");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        if let Some(unit) = &facts.systemd_unit {
            if let Ok(s) = Selector::new("systemd", &format!("unit:{unit}")) {
                out.push(s);
            }
        }
        let container = match facts.container {
            Ok(Some(c)) => c,
            Ok(None) => return out,
            Err(e) => {
                fail(pid, None, &e.to_string());
                return out;
            }
        };
        if self.sockets.is_empty() {
            return out;
        }
        match self.verified_facts(pid, &container) {
            Ok(k) => out.extend(container_selectors(&k.facts, container.kind)),
            Err(why) => fail(pid, Some(&container), &why),
        }
        out
    }

    /// The runtime's facts about the caller's container, checked against the caller.
    fn verified_facts(
        &self,
        pid: i32,
        container: &cgroup::ContainerRef,
    ) -> Result<Arc<Known>, String> {
        let mut facts = self.lookup(container, false)?;
        if let Err(first) = in_container(pid, container, &facts) {
            // A restarted container keeps its ID and gets a new first process: ask again.
            self.cache.remove(&container.id);
            facts = self.lookup(container, true)?;
            in_container(pid, container, &facts).map_err(|again| {
                self.cache.remove(&container.id);
                format!("{again} (before asking again: {first})")
            })?;
        }
        // Still the same container now that the runtime has answered.
        let now = read_cgroup_file(pid)
            .map_err(|e| format!("the caller's cgroup became unreadable: {e}"))?;
        match cgroup::parse(&now).map(|f| f.container) {
            Ok(Ok(Some(c))) if c.same_place(container) => Ok(facts),
            _ => Err("the caller's cgroup changed during attestation".into()),
        }
    }

    /// The facts about a container: from the cache unless `fresh`, else from the first
    /// runtime that knows it.
    fn lookup(&self, container: &cgroup::ContainerRef, fresh: bool) -> Result<Arc<Known>, String> {
        let id = container.id.as_str();
        if !fresh {
            if let Some(f) = self.cache.get(id) {
                return Ok(f);
            }
        }
        RUNTIME_CALLS.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + LOOKUP_DEADLINE;
        let mut errors: Vec<String> = Vec::new();
        for socket in &self.sockets {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                errors.push(format!("{}: no time left", socket.path.display()));
                break;
            }
            match block_on(ask(socket, container, left.min(RUNTIME_TIMEOUT))) {
                Ok(Ok(Some(f))) => {
                    // Pinned now, while the first pid is surely the runtime's: a cached
                    // pid taken later by another process is then seen.
                    let known = Arc::new(pin(f).inspect_err(|_| self.cache.remove(id))?);
                    self.cache.insert(known.clone());
                    return Ok(known);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e),
            }
        }
        self.cache.remove(id);
        if errors.is_empty() {
            Err("no configured runtime knows this container".into())
        } else {
            Err(format!(
                "the container runtime did not answer: {}",
                errors.join("; ")
            ))
        }
    }
}

/// Asks one runtime socket, in the API it serves (learnt from the first answer when the
/// configuration did not say).
async fn ask(
    socket: &RuntimeSocket,
    container: &cgroup::ContainerRef,
    timeout: Duration,
) -> Result<Option<ContainerFacts>, RuntimeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let api = socket.api.load(Ordering::Relaxed);
    if api != API_CONTAINERD {
        match docker_api::inspect(&socket.path, &container.id, left()).await {
            // Connected but no HTTP answer: maybe containerd's gRPC, tried below.
            Err(RuntimeError::Http { .. }) if api == API_UNKNOWN => {}
            r => {
                if matches!(r, Ok(_) | Err(RuntimeError::Status { .. })) {
                    socket.api.store(API_DOCKER, Ordering::Relaxed);
                }
                return r;
            }
        }
    }
    // CRI containers are in `k8s.io`; `ctr`'s in the namespace their path names.
    let namespaces: &[&str] = match container.namespace.as_deref() {
        Some(ns) => &[ns][..],
        None => &[CRI_NAMESPACE, "default"][..],
    };
    for ns in namespaces {
        match containerd::inspect(&socket.path, ns, &container.id, left()).await {
            Ok(found) => {
                socket.api.store(API_CONTAINERD, Ordering::Relaxed);
                if found.is_some() {
                    return Ok(found);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Logs and counts a caller whose cgroup names a container it gets no selectors for.
fn fail(pid: i32, container: Option<&cgroup::ContainerRef>, why: &str) {
    let n = FAILED_LOOKUPS.fetch_add(1, Ordering::Relaxed) + 1;
    crate::metrics::container_attestation_failed();
    tracing::warn!(
        event = "container_attestation_failed",
        pid,
        container = container.map(|c| c.to_string()),
        reason = why,
        failures_so_far = n,
        "no container selectors for this workload"
    );
}

/// Reads `/proc/<pid>/cgroup`, at most [`cgroup::MAX_CGROUP_FILE_BYTES`] + 1 bytes.
fn read_cgroup_file(pid: i32) -> std::io::Result<String> {
    let f = std::fs::File::open(format!("/proc/{pid}/cgroup"))?;
    let mut s = String::with_capacity(1024);
    f.take(cgroup::MAX_CGROUP_FILE_BYTES as u64 + 1)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// The pid namespace of a process, as the kernel names it.
fn pid_namespace(pid: &str) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/pid"))?;
    Ok((m.dev(), m.ino()))
}

/// A runtime's answer with its first process's place, read now.
fn pin(facts: ContainerFacts) -> Result<Known, String> {
    if !facts.running || facts.init_pid <= 0 {
        return Err("the runtime says the container is not running".into());
    }
    let init = init_place(facts.init_pid, &facts.id)?;
    Ok(Known { facts, init })
}

/// Where the container's first process `init_pid` is: its cgroups must name container
/// `id`.
fn init_place(init_pid: i32, id: &str) -> Result<cgroup::ContainerRef, String> {
    let content = read_cgroup_file(init_pid)
        .map_err(|e| format!("the container's first process (pid {init_pid}) is gone: {e}"))?;
    match cgroup::parse(&content).map(|f| f.container) {
        Ok(Ok(Some(c))) if c.id == id => Ok(c),
        Ok(Ok(Some(c))) => Err(format!(
            "the container's first process (pid {init_pid}) is in another container's cgroup ({c})"
        )),
        Ok(Ok(None)) => Err(format!(
            "the container's first process (pid {init_pid}) is in no container's cgroup"
        )),
        Ok(Err(e)) | Err(e) => Err(format!(
            "the container's first process (pid {init_pid}): {e}"
        )),
    }
}

/// Whether `pid`, whose cgroups name `caller`, runs in the container `known` describes:
/// the container runs; its first process is still where it was when the runtime answered
/// (not a reused pid); the caller's cgroup path up to the container's component is that
/// same path (not the ID copied into a cgroup name elsewhere); and the caller shares the
/// first process's pid namespace (unless that is the host's).
fn in_container(pid: i32, caller: &cgroup::ContainerRef, known: &Known) -> Result<(), String> {
    let facts = &known.facts;
    if !facts.running || facts.init_pid <= 0 {
        return Err("the runtime says the container is not running".into());
    }
    // The namespace first, the cgroup after: a pid reused in between is then seen by
    // the cgroup check.
    let init = pid_namespace(&facts.init_pid.to_string())
        .map_err(|e| format!("the container's first process is gone: {e}"))?;
    let now = init_place(facts.init_pid, &facts.id)?;
    if !now.same_place(&known.init) {
        return Err(format!(
            "the container's first process (pid {}) is not where it was when the runtime answered ({:?}, then {:?}): its pid was reused",
            facts.init_pid, now.places, known.init.places
        ));
    }
    if !caller.same_place(&now) {
        return Err(format!(
            "the caller's cgroup path is not the container's ({:?}, the container's {:?})",
            caller.places, now.places
        ));
    }
    let ours = pid_namespace("self").map_err(|e| format!("own pid namespace: {e}"))?;
    if init == ours {
        // `--pid=host`: the cgroup path, at the container's own place, binds the caller.
        return Ok(());
    }
    let theirs = pid_namespace(&pid.to_string())
        .map_err(|e| format!("the caller's pid namespace is unreadable: {e}"))?;
    if theirs != init {
        return Err("the caller is not in the container's pid namespace".into());
    }
    Ok(())
}

/// Runs a runtime call from a blocking thread: on the agent's runtime when there is one,
/// else (unit tests, tools) on a small one of its own.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Ok(h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(f))
            .map_err(|e| format!("no runtime for the lookup: {e}")),
    }
}

/// The selectors of a container's facts, for a container found at a `kind` of cgroup path.
pub fn container_selectors(f: &ContainerFacts, kind: cgroup::PathKind) -> Vec<Selector> {
    let mut out = Vec::new();
    let mut push = |kind: &str, value: String| match Selector::new(kind, &value) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(error = %e, "container fact not usable as a selector"),
    };
    push("container", format!("id:{}", f.id));
    push("container", format!("name:{}", f.name));
    push("container", format!("image-id:{}", f.image_id));
    if let Some(image) = &f.image {
        push("container", format!("image:{image}"));
    }
    push("container", format!("runtime:{}", f.runtime));
    let mut labels = 0usize;
    for (k, v) in &f.labels {
        // A ':' in the key would make `label:a:b:c` mean two things.
        if k.is_empty() || k.contains(':') {
            continue;
        }
        if labels == MAX_LABEL_SELECTORS {
            tracing::debug!(
                container = %f.id,
                "labels past the first {MAX_LABEL_SELECTORS} give no selectors"
            );
            break;
        }
        labels += 1;
        push("container", format!("label:{k}:{v}"));
    }
    if !kubelet_made(f, kind) {
        if K8S_LABELS.iter().any(|(l, _)| f.labels.contains_key(*l)) {
            tracing::debug!(
                container = %f.id,
                runtime = f.runtime,
                path = kind.as_str(),
                "io.kubernetes.* labels outside a kubelet pod under containerd's CRI give no k8s: selectors"
            );
        }
        return out;
    }
    for (label, key) in K8S_LABELS {
        if let Some(v) = f.labels.get(*label) {
            push("k8s", format!("{key}:{v}"));
        }
    }
    out
}

/// Whether the `io.kubernetes.*` labels are the kubelet's: the container is in a pod's
/// cgroup and containerd's CRI namespace answered for it. Elsewhere (docker, podman,
/// `ctr` in another namespace) they may be an image's own labels, copied.
fn kubelet_made(f: &ContainerFacts, kind: cgroup::PathKind) -> bool {
    kind.is_kubelet_pod()
        && f.runtime == "containerd"
        && f.namespace.as_deref() == Some(CRI_NAMESPACE)
}

static INSTALLED: RwLock<Option<Arc<ContainerAttestor>>> = RwLock::new(None);

/// Turns the attestors on (`Some`) or off for this process's Workload API.
pub fn install(attestor: Option<Arc<ContainerAttestor>>) {
    if let Ok(mut g) = INSTALLED.write() {
        *g = attestor;
    }
}

/// The attestors, if on.
pub fn installed() -> Option<Arc<ContainerAttestor>> {
    INSTALLED.read().ok().and_then(|g| g.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn facts() -> ContainerFacts {
        ContainerFacts {
            id: "ab".repeat(32),
            name: "web".into(),
            image_id: format!("sha256:{}", "cd".repeat(32)),
            image: Some("localhost/app:1".into()),
            labels: [
                ("app", "one"),
                ("io.kubernetes.pod.namespace", "prod"),
                ("io.kubernetes.pod.name", "web-7d9f"),
                (
                    "io.kubernetes.pod.uid",
                    "2c48913c-b29f-11e7-9350-020968147796",
                ),
                ("io.kubernetes.container.name", "server"),
                ("odd:key", "x"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            running: true,
            init_pid: 1,
            runtime: "containerd",
            namespace: Some("k8s.io".into()),
        }
    }

    fn any_container() -> cgroup::ContainerRef {
        cgroup::ContainerRef {
            id: "ab".repeat(32),
            kind: cgroup::PathKind::Docker,
            namespace: None,
            places: vec![format!("0::/docker/{}", "ab".repeat(32))],
        }
    }

    fn strings(s: Vec<Selector>) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// The container a recorded `/proc/<pid>/cgroup` content names.
    fn named(content: &str) -> cgroup::ContainerRef {
        cgroup::parse(content).unwrap().container.unwrap().unwrap()
    }

    #[test]
    fn selectors_of_a_kubernetes_container() {
        // containerd's CRI answered for a container in a pod's cgroup (kubelet, systemd
        // driver, cgroup v2; recorded shape).
        let pod = named(&format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{}.scope\n",
            "ab".repeat(32)
        ));
        let s = strings(container_selectors(&facts(), pod.kind));
        for want in [
            format!("container:id:{}", "ab".repeat(32)),
            "container:name:web".into(),
            format!("container:image-id:sha256:{}", "cd".repeat(32)),
            "container:image:localhost/app:1".into(),
            "container:runtime:containerd".into(),
            "container:label:app:one".into(),
            "container:label:io.kubernetes.pod.namespace:prod".into(),
            "k8s:ns:prod".into(),
            "k8s:pod-name:web-7d9f".into(),
            "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796".into(),
            "k8s:container-name:server".into(),
        ] {
            assert!(s.contains(&want), "{want} missing from {s:?}");
        }
        assert!(!s.iter().any(|s| s.contains("odd")), "{s:?}");
        for sel in &s {
            Selector::parse(sel).unwrap();
        }
    }

    #[test]
    fn labels_are_bounded() {
        let mut f = facts();
        f.labels = (0..1000)
            .map(|i| (format!("k{i:04}"), "v".into()))
            .collect();
        let n = container_selectors(&f, cgroup::PathKind::Docker)
            .iter()
            .filter(|s| s.value().starts_with("label:"))
            .count();
        assert_eq!(n, MAX_LABEL_SELECTORS);
    }

    #[test]
    fn socket_values() {
        let s = parse_socket("unix:///run/podman/podman.sock").unwrap();
        assert_eq!(s.path(), Path::new("/run/podman/podman.sock"));
        assert_eq!(s.api.load(Ordering::Relaxed), API_UNKNOWN);
        let s = parse_socket("containerd:///run/containerd/containerd.sock").unwrap();
        assert_eq!(s.api.load(Ordering::Relaxed), API_CONTAINERD);
        assert!(parse_socket("unix://relative").is_err());
        assert!(parse_socket("tcp://127.0.0.1:2375").is_err());
    }

    #[test]
    fn a_process_outside_containers_gets_no_container_selectors() {
        // This test process is in no container; the runtime socket does not exist, and
        // is never asked.
        let own = cgroup::parse(&read_cgroup_file(std::process::id() as i32).unwrap()).unwrap();
        if !matches!(own.container, Ok(None)) {
            // The tests themselves run in a container: nothing to show here.
            return;
        }
        let a = ContainerAttestor::new(vec![parse_socket("/nonexistent.sock").unwrap()]).unwrap();
        let before = failed_lookups();
        let s = a.selectors(std::process::id() as i32);
        assert!(
            !s.iter()
                .any(|s| s.kind() == "container" || s.kind() == "k8s"),
            "{s:?}"
        );
        assert_eq!(failed_lookups(), before);
    }

    #[test]
    fn a_stopped_runtime_gives_nothing() {
        let a = ContainerAttestor::new(vec![parse_socket("/nonexistent.sock").unwrap()]).unwrap();
        let err = a.lookup(&any_container(), false).unwrap_err();
        assert!(err.contains("did not answer"), "{err}");
        assert!(err.contains("cannot connect"), "{err}");
        let none = ContainerAttestor::new(vec![]).unwrap();
        assert_eq!(
            none.lookup(&any_container(), false).unwrap_err(),
            "no configured runtime knows this container"
        );
    }

    #[test]
    fn a_container_that_does_not_run_is_refused() {
        let mut known = Known {
            facts: facts(),
            init: any_container(),
        };
        let me = std::process::id() as i32;
        known.facts.running = false;
        assert!(in_container(me, &any_container(), &known).is_err());
        assert!(pin(known.facts.clone()).is_err());
        known.facts.running = true;
        known.facts.init_pid = 0;
        assert!(in_container(me, &any_container(), &known).is_err());
    }

    /// The io.kubernetes.* labels of an image run by docker or podman (which copy an
    /// image's LABELs into the container's), or of a container made outside the CRI,
    /// give no k8s: selectors: an untrusted image could name any namespace.
    #[test]
    fn k8s_selectors_only_from_the_cri_for_a_container_in_a_pod_cgroup() {
        let id = "ab".repeat(32);
        // Recorded cgroup paths: podman (cgroupfs, v1 line), docker (systemd), ctr in
        // the k8s.io namespace (`/k8s.io/<id>`), and the kubelet's three pod shapes.
        let podman = named(&format!("9:name=systemd:/libpod_parent/libpod-{id}\n"));
        let docker = named(&format!("0::/system.slice/docker-{id}.scope\n"));
        let ctr_k8s_ns = named(&format!("0::/k8s.io/{id}\n"));
        let kubepods_cgroupfs = named(&format!(
            "9:name=systemd:/kubepods/besteffort/pod5d2a8c4e-0c1f-4e7b-9a59-2f4f1e0b6c11/{id}\n"
        ));
        let kubepods_systemd = named(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9a8b.slice/cri-containerd-{id}.scope\n"
        ));
        let crio = named(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9a8b.slice/crio-{id}.scope\n"
        ));
        let k8s = |f: &ContainerFacts, c: &cgroup::ContainerRef| -> Vec<String> {
            strings(container_selectors(f, c.kind))
                .into_iter()
                .filter(|s| s.starts_with("k8s:"))
                .collect()
        };
        let as_runtime = |runtime: &'static str, ns: Option<&str>| ContainerFacts {
            runtime,
            namespace: ns.map(str::to_string),
            ..facts()
        };
        let podman_answer = as_runtime("podman", None);
        let docker_answer = as_runtime("docker", None);
        let cri_answer = as_runtime("containerd", Some("k8s.io"));
        let default_ns_answer = as_runtime("containerd", Some("default"));
        // The attack: an image's labels under docker/podman, whatever the path.
        for c in [&podman, &docker, &kubepods_cgroupfs, &kubepods_systemd] {
            assert_eq!(k8s(&podman_answer, c), Vec::<String>::new(), "{c:?}");
            assert_eq!(k8s(&docker_answer, c), Vec::<String>::new(), "{c:?}");
        }
        // containerd outside the CRI namespace, or the CRI's namespace outside a pod.
        assert!(k8s(&default_ns_answer, &kubepods_cgroupfs).is_empty());
        assert!(k8s(&cri_answer, &ctr_k8s_ns).is_empty());
        assert!(k8s(&cri_answer, &podman).is_empty());
        // The labels are still container:label selectors (they are what the image or
        // its runner wrote).
        assert!(strings(container_selectors(&podman_answer, podman.kind))
            .contains(&"container:label:io.kubernetes.pod.namespace:prod".to_string()));
        // The kubelet's pods under containerd's CRI.
        for c in [&kubepods_cgroupfs, &kubepods_systemd] {
            assert_eq!(
                k8s(&cri_answer, c),
                vec![
                    "k8s:ns:prod",
                    "k8s:pod-name:web-7d9f",
                    "k8s:pod-uid:2c48913c-b29f-11e7-9350-020968147796",
                    "k8s:container-name:server"
                ],
                "{c:?}"
            );
        }
        // A CRI-O path is a pod path, but no CRI-O answer is ever containerd's.
        assert!(crio.kind.is_kubelet_pod());
        assert!(k8s(&podman_answer, &crio).is_empty());
    }

    /// A process in a cgroup named after a container, made elsewhere (a unit with
    /// `Delegate=yes` may make `docker-<ID>.scope` under its own cgroup), is not in that
    /// container; nor is a container whose first pid was reused.
    #[test]
    fn the_callers_place_must_be_the_containers() {
        let id = "ab".repeat(32);
        let real = named(&format!("0::/system.slice/docker-{id}.scope\n"));
        let forged = named(&format!(
            "0::/system.slice/evil.service/docker-{id}.scope\n"
        ));
        // Same ID, same kind: only the place tells them apart.
        assert_eq!(
            (real.id.as_str(), real.kind),
            (forged.id.as_str(), forged.kind)
        );
        assert!(!forged.same_place(&real));
        // A process of the container in a sub-cgroup it made is at the container's place.
        let inner = named(&format!(
            "0::/system.slice/docker-{id}.scope/init.scope/worker\n"
        ));
        assert!(inner.same_place(&real));
        // v1: every hierarchy naming the container must agree; one moved elsewhere is not
        // the same place.
        let v1 = |systemd: &str| named(&format!("8:pids:/docker/{id}\n1:name=systemd:{systemd}\n"));
        assert!(v1(&format!("/docker/{id}")).same_place(&v1(&format!("/docker/{id}/sub"))));
        assert!(!v1(&format!("/docker/{id}")).same_place(&v1(&format!("/x/docker/{id}"))));

        // Through in_container, with this test's own process as the "first process"
        // (it is in no container): refused for its cgroup, before any namespace is
        // trusted.
        let me = std::process::id() as i32;
        let own = cgroup::parse(&read_cgroup_file(me).unwrap()).unwrap();
        if matches!(own.container, Ok(None)) {
            let known = Known {
                facts: ContainerFacts {
                    init_pid: me,
                    ..facts()
                },
                init: real.clone(),
            };
            let err = in_container(me, &real, &known).unwrap_err();
            assert!(err.contains("in no container's cgroup"), "{err}");
            assert!(pin(known.facts.clone()).is_err());
        }
    }

    /// A serving process that is neither root nor the agent's uid on its own socket file
    /// is not believed, before anything it says is read.
    #[test]
    fn runtime_socket_peers() {
        use docker_api::peer_trusted;
        assert!(peer_trusted(0, 0, 10001).is_ok());
        assert!(peer_trusted(0, 1000, 0).is_ok());
        assert!(peer_trusted(10001, 10001, 10001).is_ok());
        // Another user's listener, even on a socket file it owns.
        let err = peer_trusted(1000, 1000, 10001).unwrap_err();
        assert!(err.contains("uid 1000"), "{err}");
        // The agent's uid serving a root-owned path: someone replaced root's socket.
        assert!(peer_trusted(10001, 0, 10001).is_err());
        assert!(peer_trusted(65534, 0, 0).is_err());
    }

    /// The same, with a real listener run as `nobody` (root only: the test must be able
    /// to run a process as another uid).
    #[test]
    fn a_runtime_socket_served_by_another_uid_is_refused() {
        use std::io::BufRead;
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let python = Path::new("/usr/bin/python3");
        if !nix::unistd::geteuid().is_root() || !python.exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let sock = dir.path().join("fake-runtime.sock");
        let mut child = std::process::Command::new(python)
            .args([
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(8)\nprint('ready',flush=True)\nheld=[]\nwhile True:\n  held.append(s.accept())\n",
            ])
            .arg(&sock)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let id = "ab".repeat(32);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let docker = rt.block_on(docker_api::inspect(&sock, &id, Duration::from_secs(2)));
        let ctd = rt.block_on(containerd::inspect(
            &sock,
            "k8s.io",
            &id,
            Duration::from_secs(2),
        ));
        // Through the attestor: counted as a failure, with the reason.
        let a = ContainerAttestor::new(vec![
            parse_socket(&format!("unix://{}", sock.display())).unwrap()
        ])
        .unwrap();
        let err = a.lookup(&any_container(), true).unwrap_err();
        let _ = child.kill();
        let _ = child.wait();
        for r in [docker, ctd] {
            let e = r.unwrap_err();
            assert!(matches!(e, RuntimeError::Untrusted { .. }), "{e}");
            assert!(e.to_string().contains("uid 65534"), "{e}");
        }
        assert!(err.contains("untrusted process"), "{err}");
    }
}
