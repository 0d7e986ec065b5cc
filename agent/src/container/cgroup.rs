//! Which container and which systemd unit a process is in, from its `/proc/<pid>/cgroup`.
//!
//! Pure parsing: the file's content in, facts out. The formats covered (each line is
//! `HIERARCHY:CONTROLLERS:PATH`; cgroup v2 has the single line `0::PATH`, v1 one line per
//! hierarchy, hybrid both):
//!
//! | runtime | cgroupfs driver | systemd driver |
//! | --- | --- | --- |
//! | docker (moby) | `/docker/<id>` | `/system.slice/docker-<id>.scope` |
//! | podman | `/libpod_parent/libpod-<id>` | `/machine.slice/libpod-<id>.scope` |
//! | containerd, CRI | `/kubepods/<qos>/pod<uid>/<id>` | `/kubepods.slice/…/cri-containerd-<id>.scope` |
//! | CRI-O | `/kubepods/<qos>/pod<uid>/crio-<id>` | `/kubepods.slice/…/crio-<id>.scope` |
//! | containerd, no CRI (`ctr`) | `/<namespace>/<id>` (an ID of 64 hex digits) | |
//!
//! The *outermost* container in the path is the one taken: a container with write access
//! to its own cgroup (privileged, or delegated) may make sub-cgroups with any name under
//! it, never above it. A path under a user's systemd manager (`user@<uid>.service`) gets
//! no container at all: the user names those cgroups (rootless containers, or a forgery).
//! `conmon` monitors (`libpod-conmon-<id>`, `crio-conmon-<id>`) are not the container.

use std::fmt;

/// Longest `/proc/<pid>/cgroup` content parsed (v1 has ~13 lines of at most a few
/// hundred bytes).
pub const MAX_CGROUP_FILE_BYTES: usize = 64 * 1024;

/// Length of a container ID in every runtime's cgroup paths: 32 bytes in hex.
const ID_LEN: usize = 64;

/// The path shape a container ID was found in (not the runtime that will answer for it:
/// CRI paths under `kubepods` look the same for containerd and docker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathKind {
    /// `/docker/<id>` or `docker-<id>.scope`.
    Docker,
    /// `libpod-<id>` or `libpod-<id>.scope`.
    Podman,
    /// `cri-containerd-<id>.scope`, or `…:cri-containerd:<id>`.
    CriContainerd,
    /// `crio-<id>` or `crio-<id>.scope`.
    CriO,
    /// A bare ID under a Kubernetes pod (`pod<uid>/<id>`): containerd or docker.
    Kubernetes,
    /// A bare ID elsewhere, as containerd without CRI makes (`/<namespace>/<id>`).
    Containerd,
}

impl PathKind {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
            Self::CriContainerd => "cri-containerd",
            Self::CriO => "cri-o",
            Self::Kubernetes => "kubernetes",
            Self::Containerd => "containerd",
        }
    }

    /// Whether the path is one the kubelet makes for a pod's container (under
    /// `kubepods`): only there may `k8s:` selectors come from the runtime's labels.
    pub fn is_kubelet_pod(self) -> bool {
        matches!(self, Self::Kubernetes | Self::CriContainerd | Self::CriO)
    }
}

/// A container a process is in, as its cgroup path names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    /// The full container ID, 64 lowercase hex digits.
    pub id: String,
    /// The path shape it was found in.
    pub kind: PathKind,
    /// The containerd namespace the path implies: `k8s.io` under a Kubernetes pod, the
    /// first component of `/<namespace>/<id>`; `None` when the path does not say.
    pub namespace: Option<String>,
    /// Where the container is, per hierarchy that names it, in file order:
    /// `HIERARCHY:CONTROLLERS:PATH` with the path cut after the container's component
    /// (what a process made below it is its own). Two processes are in the same
    /// container only if these are equal: the ID alone can be copied into a cgroup name
    /// by whoever may make cgroups (a unit with `Delegate=yes`).
    pub places: Vec<String>,
}

impl ContainerRef {
    /// Whether `other` names the same container at the same place.
    pub fn same_place(&self, other: &ContainerRef) -> bool {
        self.id == other.id && self.places == other.places
    }
}

/// Why a process's cgroups name no container that can be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// The file is not `/proc/<pid>/cgroup` content.
    #[error("malformed cgroup file: {0}")]
    Malformed(String),
    /// Two hierarchies name different containers (only root can do that).
    #[error("the cgroup hierarchies name different containers ({0} and {1})")]
    Ambiguous(String, String),
    /// The container cgroup is under a user's own systemd manager, which the user names.
    #[error("the container cgroup {0:?} is under a user's systemd manager (rootless or user-made); not attested")]
    UserDelegated(String),
}

/// What a `/proc/<pid>/cgroup` file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFacts {
    /// The container (`Ok(None)`: none; `Err`: one that cannot be attested).
    pub container: Result<Option<ContainerRef>, CgroupError>,
    /// The systemd unit (service or scope) the process is in, if any.
    pub systemd_unit: Option<String>,
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, self.kind.as_str())
    }
}

/// Parses `/proc/<pid>/cgroup` content.
pub fn parse(content: &str) -> Result<CgroupFacts, CgroupError> {
    if content.len() > MAX_CGROUP_FILE_BYTES {
        return Err(CgroupError::Malformed(format!(
            "longer than {MAX_CGROUP_FILE_BYTES} bytes"
        )));
    }
    let mut container: Result<Option<ContainerRef>, CgroupError> = Ok(None);
    let mut v2_path = None;
    let mut systemd_v1_path = None;
    let mut lines = 0usize;
    for line in content.lines().filter(|l| !l.is_empty()) {
        lines += 1;
        // The path may itself hold ':' (`…slice:cri-containerd:<id>`): split twice only.
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(CgroupError::Malformed(format!("line {line:?}")));
        };
        if hierarchy.parse::<u32>().is_err() || !path.starts_with('/') {
            return Err(CgroupError::Malformed(format!("line {line:?}")));
        }
        if hierarchy == "0" && controllers.is_empty() {
            v2_path = Some(path);
        } else if controllers.split(',').any(|c| c == "name=systemd") {
            systemd_v1_path = Some(path);
        }
        let found = container_in_path(path).map(|found| {
            found.map(|(mut c, prefix)| {
                c.places = vec![format!("{hierarchy}:{controllers}:{prefix}")];
                c
            })
        });
        container = match (container, found) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok(None), Ok(f)) => Ok(f),
            (Ok(Some(a)), Ok(None)) => Ok(Some(a)),
            (Ok(Some(mut a)), Ok(Some(b))) if a.id == b.id => {
                a.places.extend(b.places);
                Ok(Some(a))
            }
            (Ok(Some(a)), Ok(Some(b))) => Err(CgroupError::Ambiguous(a.id, b.id)),
        };
    }
    if lines == 0 {
        return Err(CgroupError::Malformed("no lines".into()));
    }
    // systemd tracks units in its own v1 hierarchy where there is one (v1 and hybrid),
    // otherwise in the unified one.
    let systemd_unit = systemd_v1_path.or(v2_path).and_then(systemd_unit);
    Ok(CgroupFacts {
        container,
        systemd_unit,
    })
}

/// The outermost container named by one cgroup path, and the path up to and including
/// its component.
fn container_in_path(path: &str) -> Result<Option<(ContainerRef, String)>, CgroupError> {
    let mut parent: Option<&str> = None;
    let mut user_manager = false;
    let mut prefix = String::with_capacity(path.len());
    for component in path.split('/').filter(|c| !c.is_empty()) {
        prefix.push('/');
        prefix.push_str(component);
        if let Some(kind_id) = container_component(component, parent) {
            if user_manager {
                return Err(CgroupError::UserDelegated(path.to_string()));
            }
            let (kind, id) = kind_id;
            let namespace = match kind {
                PathKind::Kubernetes | PathKind::CriContainerd => Some("k8s.io".to_string()),
                PathKind::Containerd => parent.map(str::to_string),
                _ => None,
            };
            return Ok(Some((
                ContainerRef {
                    id: id.to_string(),
                    kind,
                    namespace,
                    places: Vec::new(),
                },
                prefix,
            )));
        }
        if component.starts_with("user@") && component.ends_with(".service") {
            user_manager = true;
        }
        parent = Some(component);
    }
    Ok(None)
}

/// The container one path component names, given the component above it.
fn container_component<'a>(c: &'a str, parent: Option<&str>) -> Option<(PathKind, &'a str)> {
    let scope = c.strip_suffix(".scope");
    let prefixed = |prefix: &str| -> Option<&'a str> {
        let rest = scope.unwrap_or(c).strip_prefix(prefix)?;
        is_id(rest).then_some(rest)
    };
    if let Some(id) = prefixed("docker-") {
        return Some((PathKind::Docker, id));
    }
    // `libpod-conmon-<id>` and `crio-conmon-<id>` fail `is_id`: the monitor is not the
    // container.
    if let Some(id) = prefixed("libpod-") {
        return Some((PathKind::Podman, id));
    }
    if let Some(id) = prefixed("crio-") {
        return Some((PathKind::CriO, id));
    }
    if let Some(id) = scope.and_then(|s| s.strip_prefix("cri-containerd-")) {
        return is_id(id).then_some((PathKind::CriContainerd, id));
    }
    // The kubelet's systemd driver with a containerd that uses cgroupfs names the
    // cgroup `<pod slice>:cri-containerd:<id>`.
    if let Some((_, id)) = c.rsplit_once(":cri-containerd:") {
        return is_id(id).then_some((PathKind::CriContainerd, id));
    }
    if is_id(c) {
        let kind = match parent {
            Some("docker") => PathKind::Docker,
            Some(p) if p.starts_with("pod") || p.contains("-pod") => PathKind::Kubernetes,
            _ => PathKind::Containerd,
        };
        return Some((kind, c));
    }
    None
}

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The systemd unit of a path in systemd's hierarchy: the first component that is not a
/// slice, if it is a service or a scope. What lies below it is the unit's own (a unit
/// with `Delegate=yes` names its sub-cgroups as it likes, so they are never taken).
fn systemd_unit(path: &str) -> Option<String> {
    let unit = path
        .split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))?;
    let named = unit.len() <= 256
        && unit.bytes().all(|b| b.is_ascii_graphic())
        && (unit.ends_with(".service") || unit.ends_with(".scope"))
        && !unit.starts_with('.');
    named.then(|| unit.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9ea7895b4d8ff2dd4175e940485e83ecd5ae7c92d928bb9c86b2938bdb0b2ce0";
    const ID2: &str = "3f1d6c1e5bd2f6e4a9a0b0d9e3c7c1a2b4f5e6d7c8b9a0f1e2d3c4b5a6978812";

    fn container(content: &str) -> Option<(PathKind, String)> {
        parse(content)
            .unwrap()
            .container
            .unwrap()
            .map(|c| (c.kind, c.id))
    }

    fn v1(path: &str) -> String {
        // Recorded shape of a v1 host (this is podman's, from this machine).
        [
            "9:name=systemd",
            "8:pids",
            "7:blkio",
            "6:freezer",
            "5:devices",
            "4:memory",
            "3:cpuset",
            "2:cpuacct",
            "1:cpu",
            "0:",
        ]
        .iter()
        .map(|h| format!("{h}:{path}\n"))
        .collect()
    }

    #[test]
    fn podman_cgroupfs_v1_recorded() {
        let f = v1(&format!("/libpod_parent/libpod-{ID}"));
        assert_eq!(container(&f), Some((PathKind::Podman, ID.into())));
        assert_eq!(parse(&f).unwrap().systemd_unit, None);
    }

    #[test]
    fn podman_systemd_v2_and_pod_and_conmon() {
        let f = format!("0::/machine.slice/libpod-{ID}.scope\n");
        assert_eq!(container(&f), Some((PathKind::Podman, ID.into())));
        assert_eq!(
            parse(&f).unwrap().systemd_unit,
            Some(format!("libpod-{ID}.scope"))
        );
        // A container in a pod, with systemd as its init (sub-cgroup `container`).
        let f = format!(
            "0::/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope/container\n"
        );
        assert_eq!(container(&f), Some((PathKind::Podman, ID.into())));
        // conmon, the monitor, is not the container.
        assert_eq!(
            container(&format!("0::/machine.slice/libpod-conmon-{ID}.scope\n")),
            None
        );
        assert_eq!(
            container(&v1(&format!("/libpod_parent/libpod-conmon-{ID}"))),
            None
        );
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(
            container(&v1(&format!("/docker/{ID}"))),
            Some((PathKind::Docker, ID.into()))
        );
        let f = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(container(&f), Some((PathKind::Docker, ID.into())));
        assert_eq!(
            parse(&f).unwrap().systemd_unit,
            Some(format!("docker-{ID}.scope"))
        );
        // Docker in docker: the outer container is the one the host's runtime knows.
        assert_eq!(
            container(&format!("0::/docker/{ID}/docker/{ID2}\n")),
            Some((PathKind::Docker, ID.into()))
        );
    }

    #[test]
    fn containerd_cri() {
        // cgroupfs driver, v1 (kubelet + containerd or dockershim).
        let f = v1(&format!(
            "/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/{ID}"
        ));
        assert_eq!(container(&f), Some((PathKind::Kubernetes, ID.into())));
        let f = v1(&format!(
            "/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/{ID}"
        ));
        assert_eq!(container(&f), Some((PathKind::Kubernetes, ID.into())));
        // systemd driver, v2.
        let f = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(container(&f), Some((PathKind::CriContainerd, ID.into())));
        assert_eq!(
            parse(&f).unwrap().systemd_unit,
            Some(format!("cri-containerd-{ID}.scope"))
        );
        // kubelet systemd driver, containerd cgroupfs.
        let f = format!(
            "0::/system.slice/containerd.service/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice:cri-containerd:{ID}\n"
        );
        assert_eq!(container(&f), Some((PathKind::CriContainerd, ID.into())));
        assert_eq!(
            parse(&f).unwrap().systemd_unit,
            Some("containerd.service".into())
        );
        // The kubelet in a systemd slice of its own (kind, k3s-like layouts).
        let f = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1a2b.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(container(&f), Some((PathKind::CriContainerd, ID.into())));
    }

    #[test]
    fn containerd_without_cri() {
        // Recorded from `ctr run` (containerd 1.6) on this machine.
        assert_eq!(
            container(&v1(&format!("/default/{ID}"))),
            Some((PathKind::Containerd, ID.into()))
        );
        let c = parse(&format!("0::/default/{ID}\n"))
            .unwrap()
            .container
            .unwrap()
            .unwrap();
        assert_eq!(c.namespace.as_deref(), Some("default"));
        // Names that are not 64-hex IDs are not containers.
        assert_eq!(container(&v1("/default/my-container")), None);
    }

    #[test]
    fn paths_relative_to_the_readers_cgroup_namespace() {
        // An agent in a pod of its own (cgroup v2, private cgroup namespace) sees other
        // pods' paths relative to its own cgroup.
        let f = format!(
            "0::/../../kubepods-besteffort.slice/kubepods-besteffort-pod9a8b.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(container(&f), Some((PathKind::CriContainerd, ID.into())));
        assert_eq!(parse(&f).unwrap().systemd_unit, None);
        let f = format!("0::/../../pod9a8b/{ID}\n");
        assert_eq!(container(&f), Some((PathKind::Kubernetes, ID.into())));
    }

    #[test]
    fn crio() {
        let f = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9a8b.slice/crio-{ID}.scope\n"
        );
        assert_eq!(container(&f), Some((PathKind::CriO, ID.into())));
        let f = v1(&format!("/kubepods/besteffort/pod9a8b/crio-{ID}"));
        assert_eq!(container(&f), Some((PathKind::CriO, ID.into())));
        assert_eq!(
            container(&format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9a8b.slice/crio-conmon-{ID}.scope\n"
            )),
            None
        );
    }

    #[test]
    fn hybrid_v1_with_unified_root() {
        // A hybrid host where the container is in the v1 hierarchies and `0::` is `/`.
        let f = format!("12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n");
        assert_eq!(container(&f), Some((PathKind::Docker, ID.into())));
        // Controllers that show another (sandbox) path do not hide the container.
        let f = format!("4:memory:/process_api/f5db\n1:name=systemd:/docker/{ID}\n0::/\n");
        assert_eq!(container(&f), Some((PathKind::Docker, ID.into())));
    }

    #[test]
    fn systemd_units_scopes_and_slices() {
        let unit = |f: &str| parse(f).unwrap().systemd_unit;
        assert_eq!(
            unit("0::/system.slice/nginx.service\n"),
            Some("nginx.service".into())
        );
        assert_eq!(
            unit(&v1("/system.slice/system-getty.slice/getty@tty1.service")),
            Some("getty@tty1.service".into())
        );
        // A delegated service's own sub-cgroups are not units.
        assert_eq!(
            unit("0::/system.slice/app.service/worker.service\n"),
            Some("app.service".into())
        );
        // A user's units are the user's manager's business: the unit is the manager.
        assert_eq!(
            unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/evil.service\n"),
            Some("user@1000.service".into())
        );
        assert_eq!(
            unit("0::/user.slice/user-1000.slice/session-3.scope\n"),
            Some("session-3.scope".into())
        );
        assert_eq!(unit("0::/init.scope\n"), Some("init.scope".into()));
        // Not in any unit.
        assert_eq!(unit("0::/\n"), None);
        assert_eq!(unit("0::/system.slice\n"), None);
        assert_eq!(unit("0::/libpod_parent/libpod-x\n"), None);
        // v1: the name=systemd hierarchy wins over the unified one.
        assert_eq!(
            unit("1:name=systemd:/system.slice/a.service\n0::/\n"),
            Some("a.service".into())
        );
        // No container selectors for an ordinary unit.
        assert_eq!(container("0::/system.slice/nginx.service\n"), None);
    }

    #[test]
    fn user_delegated_paths_are_not_containers() {
        // A rootless container, or a user's forgery of a root container's ID.
        for f in [
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
            ),
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{ID}.scope\n"
            ),
        ] {
            let err = parse(&f).unwrap().container.unwrap_err();
            assert!(matches!(err, CgroupError::UserDelegated(_)), "{err}");
        }
    }

    #[test]
    fn conflicting_hierarchies_and_malformed() {
        let f = format!("2:memory:/docker/{ID}\n1:name=systemd:/docker/{ID2}\n");
        assert_eq!(
            parse(&f).unwrap().container,
            Err(CgroupError::Ambiguous(ID.into(), ID2.into()))
        );
        for bad in ["", "garbage", "x:y:/z", "1:cpu:relative", "1:cpu"] {
            assert!(
                matches!(parse(bad), Err(CgroupError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse(&"0::/\n".repeat(20_000)),
            Err(CgroupError::Malformed(_))
        ));
        // Upper-case or short IDs are not runtime IDs.
        assert_eq!(
            container(&format!("0::/docker/{}\n", ID.to_uppercase())),
            None
        );
        assert_eq!(container("0::/docker/abc123\n"), None);
    }
}
