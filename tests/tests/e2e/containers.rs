//! Container workload attestation with real containers on a real runtime: podman (runc,
//! cgroupfs manager) and its docker-compatible API served by `podman system service` on
//! a Unix socket of the test's own, with its own storage. Images are made here from a
//! tiny root filesystem (the `ztid-agent` client and the libraries it links) with
//! `podman import`: no registry is reachable. Each container fetches its SVID over the
//! agent's Workload API socket, bind-mounted in.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ztid_tests::*;

const TD: &str = "example.org";

/// The Workload API client in the client image, fetching X.509-SVIDs from the agent's
/// socket mounted at `/ztid/api.sock`.
const CLIENT_FETCH: [&str; 8] = [
    "/ztid-agent",
    "--output",
    "json",
    "api",
    "fetch",
    "x509",
    "--socket",
    "/ztid/api.sock",
];

/// Every podman container's: no network, small limits.
const CONTAINER_LIMITS: [&str; 3] = [
    "--network=none",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
];

/// A podman with its own storage, run directory and API service, all in a temporary
/// directory (so tests and other podman users never share state).
struct Podman {
    dir: tempfile::TempDir,
    service: Option<std::process::Child>,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ztid-podman")
            .tempdir()
            .unwrap();
        let mut p = Self { dir, service: None };
        p.start_service();
        p
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("podman.sock")
    }

    fn base(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            format!("--root={}", d.join("root").display()),
            format!("--runroot={}", d.join("runroot").display()),
            format!("--tmpdir={}", d.join("tmp").display()),
            // vfs: no overlay mounts to depend on or leave behind; the images are tiny.
            "--storage-driver=vfs".into(),
            "--runtime=runc".into(),
            "--cgroup-manager=cgroupfs".into(),
            "--events-backend=file".into(),
        ]
    }

    fn cmd(&self, args: &[&str]) -> CliResult {
        let out = Command::new("podman")
            .args(self.base())
            .args(args)
            .output()
            .expect("podman runs (scripts/install-deps.sh installs it)");
        out.into()
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.cmd(args);
        assert!(r.ok, "podman {args:?} failed: {}\n{}", r.stderr, r.stdout);
        r.stdout
    }

    fn start_service(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = Command::new("podman");
        cmd.args(self.base()).args([
            "system",
            "service",
            "--time=0",
            &format!("unix://{}", self.socket().display()),
        ]);
        let log = std::fs::File::create(self.dir.path().join("service.log")).unwrap();
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("podman system service starts");
        self.service = Some(child);
        let socket = self.socket();
        wait_for("podman's API socket", READY_TIMEOUT, || {
            ping(&socket).then_some(())
        });
    }

    fn stop_service(&mut self) {
        if let Some(mut s) = self.service.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &s.id().to_string()])
                .status();
            let waited = std::time::Instant::now();
            while s.try_wait().ok().flatten().is_none()
                && waited.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Imports `rootfs` as image `name`; returns its ID (`sha256:<hex>`).
    fn import(&self, rootfs: &Path, name: &str) -> String {
        self.import_with(rootfs, name, &[])
    }

    /// Imports `rootfs` as image `name` with Dockerfile instructions (`LABEL k=v`).
    fn import_with(&self, rootfs: &Path, name: &str, changes: &[&str]) -> String {
        let tar = self
            .dir
            .path()
            .join(format!("{}.tar", name.replace([':', '/'], "_")));
        let st = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success(), "tar");
        let tar = tar.display().to_string();
        let mut args = vec!["import", "--quiet"];
        for c in changes {
            args.extend_from_slice(&["--change", c]);
        }
        args.extend_from_slice(&[&tar, name]);
        self.ok(&args);
        let id = self.ok(&["image", "inspect", "--format", "{{.Id}}", name]);
        format!("sha256:{}", id.trim())
    }

    /// Runs the Workload API client in a new container (removed after) and returns its
    /// result.
    fn fetch_in(&self, agent: &Agent, name: &str, image: &str, labels: &[&str]) -> CliResult {
        let mount = format!("{}:/ztid/api.sock", agent.socket().display());
        let mut args = vec!["run", "--rm", "--name", name];
        args.extend_from_slice(&CONTAINER_LIMITS);
        args.extend_from_slice(&["-v", &mount]);
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.push(image);
        args.extend_from_slice(&CLIENT_FETCH);
        self.cmd(&args)
    }

    /// Starts container `name` (with `extra` `podman run` options) from the client image,
    /// the agent's socket mounted; its first process waits on a socket that never comes.
    fn run_idle(&self, agent: &Agent, name: &str, extra: &[&str]) {
        let mount = format!("{}:/ztid/api.sock", agent.socket().display());
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.extend_from_slice(&CONTAINER_LIMITS);
        args.extend_from_slice(&[
            "-v",
            &mount,
            "localhost/ztid-client:a",
            "/ztid-agent",
            "healthcheck",
            "--socket",
            "/nowhere.sock",
            "--wait",
            "600",
        ]);
        self.ok(&args);
    }

    /// Runs the Workload API client in running container `name` (`podman exec`).
    fn exec_fetch(&self, name: &str) -> CliResult {
        let mut args = vec!["exec", name];
        args.extend_from_slice(&CLIENT_FETCH);
        self.cmd(&args)
    }
}

/// A podman holding the client image `localhost/ztid-client:a`, a server and an agent
/// that asks that podman about its callers' containers.
fn podman_and_agent() -> (Podman, Server, Agent) {
    let podman = Podman::new();
    let scratch = tempfile::tempdir().unwrap();
    podman.import(
        &client_rootfs(&scratch.path().join("a"), None),
        "localhost/ztid-client:a",
    );
    let server = Server::start(TD);
    let socket = format!("unix://{}", podman.socket().display());
    let agent = Agent::start_with_args(&server, &["--container-socket", &socket]);
    (podman, server, agent)
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--all", "--force"]);
        self.stop_service();
    }
}

/// Whether the docker-compatible API answers `GET /_ping`.
fn ping(socket: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.") && out.contains(" 200 ")
}

/// A root filesystem holding `ztid-agent` at `/ztid-agent` and every library it links,
/// at their own paths; `extra` adds a file (another image with the same binary).
fn client_rootfs(dir: &Path, extra: Option<(&str, &str)>) -> PathBuf {
    let root = dir.to_path_buf();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy(bin("ztid-agent"), root.join("ztid-agent")).unwrap();
    let ldd = Command::new("ldd").arg(bin("ztid-agent")).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
        let path = line
            .split("=>")
            .last()
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            let to = root.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(p, &to).unwrap();
        }
    }
    if let Some((name, content)) = extra {
        std::fs::write(root.join(name), content).unwrap();
    }
    root
}

/// The SPIFFE IDs in `api fetch x509 --output json` output.
fn ids(r: &CliResult) -> Vec<String> {
    assert!(r.ok, "fetch failed: {}\n{}", r.stderr, r.stdout);
    let line = r.stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{e}: {:?} / {:?}", r.stdout, r.stderr));
    v["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_string())
        .collect()
}

/// One SVID, of an instance of `entry_id`.
fn assert_one_of(r: &CliResult, entry_id: &str) {
    let got = ids(r);
    assert_eq!(got.len(), 1, "one SVID, got {got:?}");
    assert!(
        got[0].starts_with(&format!("{entry_id}/")),
        "{} is an instance of {entry_id}",
        got[0]
    );
}

fn entry(server: &Server, agent: &Agent, id: &str, selectors: &[&str]) {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        id,
        "--parent-id",
        &agent.spiffe_id,
    ];
    for s in selectors {
        args.push("--selector");
        args.push(s);
    }
    server.cli_ok(&args);
}

/// The entry of the host's own client, by uid and path (the containers run the same file
/// elsewhere), waited for: entries reach the agent in one sync, so once this last one
/// answers, all made before it do.
fn host_entry(server: &Server, agent: &Agent) {
    let uid0 = format!("unix:uid:{}", nix_uid());
    let host_path = format!("unix:path:{}", bin("ztid-agent").display());
    entry(
        server,
        agent,
        "spiffe://example.org/host",
        &[&uid0, &host_path],
    );
    wait_for("the host entry", READY_TIMEOUT, || {
        agent
            .cli(&["--output", "json", "api", "fetch", "x509"])
            .ok
            .then_some(())
    });
}

#[test]
fn containers_are_told_apart_by_their_runtime_facts() {
    let mut podman = Podman::new();
    let scratch = tempfile::tempdir().unwrap();
    let image_a = podman.import(
        &client_rootfs(&scratch.path().join("a"), None),
        "localhost/ztid-client:a",
    );
    podman.import_with(
        &scratch.path().join("a"),
        "localhost/ztid-client:claims-prod",
        &[
            "LABEL io.kubernetes.pod.namespace=prod",
            "LABEL io.kubernetes.pod.name=web-0",
            "LABEL io.kubernetes.pod.uid=2c48913c-b29f-11e7-9350-020968147796",
            "LABEL io.kubernetes.container.name=server",
        ],
    );
    let image_b = podman.import(
        &client_rootfs(&scratch.path().join("b"), Some(("variant", "b"))),
        "localhost/ztid-client:b",
    );
    assert_ne!(image_a, image_b, "two images of the same binary");

    let server = Server::start(TD);
    let socket = format!("unix://{}", podman.socket().display());
    let agent = Agent::start_with_args(&server, &["--container-socket", &socket]);

    let img_b = format!("container:image-id:{image_b}");
    let img_a = format!("container:image-id:{image_a}");
    entry(
        &server,
        &agent,
        "spiffe://example.org/by-name",
        &["container:name:ct-one"],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/by-label",
        &["container:label:app:two"],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/by-image",
        &[&img_b, "container:label:app:three"],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/upd-a",
        &["container:label:role:upd", &img_a],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/upd-b",
        &["container:label:role:upd", &img_b],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/k8s-web",
        &[
            "k8s:ns:prod",
            "k8s:pod-name:web-0",
            "k8s:container-name:server",
        ],
    );
    host_entry(&server, &agent);
    assert_one_of(
        &agent.cli(&["--output", "json", "api", "fetch", "x509"]),
        "spiffe://example.org/host",
    );

    // Same binary, same uid (0), same image: told apart by name and by label.
    let image_a_ref = "localhost/ztid-client:a";
    assert_one_of(
        &podman.fetch_in(&agent, "ct-one", image_a_ref, &["app=one"]),
        "spiffe://example.org/by-name",
    );
    assert_one_of(
        &podman.fetch_in(&agent, "ct-two", image_a_ref, &["app=two"]),
        "spiffe://example.org/by-label",
    );
    // By image.
    assert_one_of(
        &podman.fetch_in(
            &agent,
            "ct-three",
            "localhost/ztid-client:b",
            &["app=three"],
        ),
        "spiffe://example.org/by-image",
    );
    // An image that claims a Kubernetes pod in its own LABELs (podman, like docker,
    // copies them into the container's labels), and a runner that sets them: no k8s:
    // selectors, only the container:label ones (the entry for prod is not matched).
    for (name, image, labels) in [
        ("ct-k8s-image", "localhost/ztid-client:claims-prod", &[][..]),
        (
            "ct-k8s-run",
            image_a_ref,
            &[
                "io.kubernetes.pod.namespace=prod",
                "io.kubernetes.pod.name=web-0",
                "io.kubernetes.pod.uid=2c48913c-b29f-11e7-9350-020968147796",
                "io.kubernetes.container.name=server",
            ][..],
        ),
    ] {
        let claim = podman.fetch_in(&agent, name, image, labels);
        assert!(!claim.ok, "{name}: {}", claim.stdout);
        assert!(
            claim.stderr.contains("no identity issued")
                && claim
                    .stderr
                    .contains("container:label:io.kubernetes.pod.namespace:prod"),
            "{name}: {}",
            claim.stderr
        );
        assert!(!claim.stderr.contains("k8s:"), "{name}: {}", claim.stderr);
    }
    // The same container (name, labels) whose image changes gets the other identity.
    assert_one_of(
        &podman.fetch_in(&agent, "ct-upd", image_a_ref, &["role=upd"]),
        "spiffe://example.org/upd-a",
    );
    assert_one_of(
        &podman.fetch_in(&agent, "ct-upd", "localhost/ztid-client:b", &["role=upd"]),
        "spiffe://example.org/upd-b",
    );

    // A container no entry selects: the refusal names its container selectors.
    let none = podman.fetch_in(&agent, "ct-none", image_a_ref, &[]);
    assert!(!none.ok, "{}", none.stdout);
    for want in [
        "no identity issued",
        "container:name:ct-none",
        "container:runtime:podman",
        &img_a,
    ] {
        assert!(none.stderr.contains(want), "{want:?} in {}", none.stderr);
    }

    // A process outside any container: no container selectors at all.
    let elsewhere = scratch.path().join("ztid-agent-copy");
    std::fs::copy(bin("ztid-agent"), &elsewhere).unwrap();
    // A fresh copy can be ETXTBSY for a moment: another test thread forking while the
    // copy's write descriptor was open hands that descriptor to a child until it execs.
    let host = wait_for(
        "the copied binary to be executable",
        READY_TIMEOUT,
        || match Command::new(&elsewhere)
            .args(["api", "fetch", "x509", "--socket"])
            .arg(agent.socket())
            .output()
        {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
            r => Some(r.unwrap()),
        },
    );
    let host = CliResult::from(host);
    assert!(!host.ok);
    assert!(
        host.stderr.contains("no identity issued"),
        "{}",
        host.stderr
    );
    assert!(host.stderr.contains("unix:uid:"), "{}", host.stderr);
    assert!(
        !host.stderr.contains("container:") && !host.stderr.contains("k8s:"),
        "{}",
        host.stderr
    );

    // The runtime stops: container-only entries are refused (nothing guessed), logged;
    // unix: entries keep working.
    podman.stop_service();
    let down = podman.fetch_in(&agent, "ct-one", image_a_ref, &["app=one"]);
    assert!(!down.ok, "{}", down.stdout);
    assert!(
        down.stderr.contains("no identity issued"),
        "{}",
        down.stderr
    );
    assert!(!down.stderr.contains("container:"), "{}", down.stderr);
    let log = agent.proc.log_text();
    assert!(
        log.contains("container_attestation_failed") && log.contains("did not answer"),
        "{log}"
    );
    assert_one_of(
        &agent.cli(&["--output", "json", "api", "fetch", "x509"]),
        "spiffe://example.org/host",
    );
    // And back: the runtime answers again, the container is attested again.
    podman.start_service();
    assert_one_of(
        &podman.fetch_in(&agent, "ct-one", image_a_ref, &["app=one"]),
        "spiffe://example.org/by-name",
    );
}

/// A containerd of the test's own (root, state and socket in a temporary directory; no
/// CRI plugin), driven with its `ctr` client.
struct Containerd {
    dir: tempfile::TempDir,
    daemon: std::process::Child,
}

impl Containerd {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ztid-containerd")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n",
                d.join("root").display(),
                d.join("state").display(),
                d.join("containerd.sock").display(),
                d.join("containerd.ttrpc.sock").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd starts (scripts/install-deps.sh installs it)");
        let c = Self { dir, daemon };
        wait_for("containerd's socket", READY_TIMEOUT, || {
            c.ctr("default", &["version"]).ok.then_some(())
        });
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn ctr(&self, namespace: &str, args: &[&str]) -> CliResult {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", namespace])
            .args(args)
            .output()
            .expect("ctr runs")
            .into()
    }

    /// Runs the client in a new container with a 64-hex ID (the form the agent reads
    /// from cgroup paths), removed after.
    fn fetch_in(
        &self,
        agent: &Agent,
        ns: &str,
        image: &str,
        id: &str,
        labels: &[&str],
    ) -> CliResult {
        self.fetch_in_cgroup(agent, ns, image, id, labels, None)
    }

    /// The same, in cgroup `cgroup` (`ctr run --cgroup`) rather than `/<ns>/<id>`.
    fn fetch_in_cgroup(
        &self,
        agent: &Agent,
        ns: &str,
        image: &str,
        id: &str,
        labels: &[&str],
        cgroup: Option<&str>,
    ) -> CliResult {
        let mount = format!(
            "type=bind,src={},dst=/ztid/api.sock,options=rbind:rw",
            agent.socket().display()
        );
        let mut args = vec!["run", "--rm", "--snapshotter", "native", "--mount", &mount];
        if let Some(c) = cgroup {
            args.extend_from_slice(&["--cgroup", c]);
        }
        for l in labels {
            args.push("--label");
            args.push(l);
        }
        args.extend_from_slice(&[image, id]);
        args.extend_from_slice(&CLIENT_FETCH);
        self.ctr(ns, &args)
    }
}

impl Containerd {
    /// Imports an OCI archive into namespace `ns`, its names under `localhost/ztid-client`.
    fn import(&self, ns: &str, archive: &Path) {
        let r = self.ctr(
            ns,
            &[
                "images",
                "import",
                "--snapshotter",
                "native",
                "--base-name",
                "localhost/ztid-client",
                &archive.display().to_string(),
            ],
        );
        assert!(r.ok, "ctr import: {}", r.stderr);
    }

    /// The manifest digest image `name` of namespace `ns` names now.
    fn digest(&self, ns: &str, name: &str) -> String {
        let ls = self.ctr(ns, &["images", "ls"]).stdout;
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .unwrap_or_else(|| panic!("{name} in {ls}"))
            .to_string()
    }

    /// Starts container `id` from `image` in `ns`, the agent's socket mounted; its first
    /// process waits on a socket that never comes. Removed when the guard is dropped.
    fn run_idle(&self, agent: &Agent, ns: &str, image: &str, id: &str) -> CtrTask<'_> {
        let mount = format!(
            "type=bind,src={},dst=/ztid/api.sock,options=rbind:rw",
            agent.socket().display()
        );
        let r = self.ctr(
            ns,
            &[
                "run",
                "-d",
                "--snapshotter",
                "native",
                "--mount",
                &mount,
                image,
                id,
                "/ztid-agent",
                "healthcheck",
                "--socket",
                "/nowhere.sock",
                "--wait",
                "600",
            ],
        );
        assert!(r.ok, "ctr run: {}", r.stderr);
        CtrTask {
            ctd: self,
            ns: ns.to_string(),
            id: id.to_string(),
        }
    }
}

/// A container started with `ctr run -d`: its task killed and the container removed when
/// dropped (the shims outlive containerd).
struct CtrTask<'a> {
    ctd: &'a Containerd,
    ns: String,
    id: String,
}

impl CtrTask<'_> {
    /// Runs the Workload API client in the container (`ctr task exec`).
    fn exec_fetch(&self, exec_id: &str) -> CliResult {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, &self.id];
        args.extend_from_slice(&CLIENT_FETCH);
        self.ctd.ctr(&self.ns, &args)
    }
}

impl Drop for CtrTask<'_> {
    fn drop(&mut self) {
        let _ = self
            .ctd
            .ctr(&self.ns, &["task", "kill", "-s", "SIGKILL", &self.id]);
        for _ in 0..100 {
            if self.ctd.ctr(&self.ns, &["task", "rm", &self.id]).ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.ctd.ctr(&self.ns, &["containers", "rm", &self.id]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // The shims outlive containerd; each container was removed (--rm), so they exit.
    }
}

#[test]
fn containerd_containers_are_attested_through_its_own_api() {
    let podman = Podman::new();
    let scratch = tempfile::tempdir().unwrap();
    podman.import(
        &client_rootfs(&scratch.path().join("a"), None),
        "localhost/ztid-client:a",
    );
    let archive = scratch.path().join("client.tar");
    podman.ok(&[
        "save",
        "--format",
        "oci-archive",
        "-o",
        &archive.display().to_string(),
        "localhost/ztid-client:a",
    ]);
    let ctd = Containerd::start();
    for ns in ["default", "k8s.io"] {
        let r = ctd.ctr(
            ns,
            &[
                "images",
                "import",
                "--snapshotter",
                "native",
                "--base-name",
                "localhost/ztid-client",
                &archive.display().to_string(),
            ],
        );
        assert!(r.ok, "ctr import: {}", r.stderr);
    }
    let digest = ctd.ctr("default", &["images", "ls"]).stdout;
    let digest = digest
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .expect("the image's manifest digest")
        .to_string();
    // Run by digest: containerd gives an image-id only for a container made from a
    // reference that pins it (a tag may name another image by the time it is asked).
    let image = format!("localhost/ztid-client@{digest}");
    for ns in ["default", "k8s.io"] {
        let r = ctd.ctr(ns, &["images", "tag", "localhost/ztid-client:a", &image]);
        assert!(r.ok, "ctr images tag: {}", r.stderr);
    }

    let server = Server::start(TD);
    // A plain unix:// socket: the agent recognises containerd's gRPC from its answer.
    let socket = format!("unix://{}", ctd.socket().display());
    let agent = Agent::start_with_args(&server, &["--container-socket", &socket]);
    let by_image = format!("container:image-id:{digest}");
    entry(
        &server,
        &agent,
        "spiffe://example.org/ctd",
        &[
            "container:runtime:containerd",
            "container:label:app:ctd",
            &by_image,
        ],
    );
    entry(
        &server,
        &agent,
        "spiffe://example.org/ctd-k8s",
        &[
            "k8s:ns:prod",
            "k8s:pod-name:web-1",
            "k8s:container-name:server",
        ],
    );
    host_entry(&server, &agent);

    // ctr's own namespace (`/default/<id>`).
    let id1 = "c1".repeat(32);
    assert_one_of(
        &ctd.fetch_in(&agent, "default", &image, &id1, &["app=ctd"]),
        "spiffe://example.org/ctd",
    );
    // Kubernetes' namespace and pod labels, as the kubelet sets them through CRI, in a
    // pod's cgroup as the kubelet's cgroupfs driver makes it (`--cgroup`; this
    // containerd has no CRI plugin, so ctr stands in for the kubelet).
    let pod_labels = [
        "io.kubernetes.pod.namespace=prod",
        "io.kubernetes.pod.name=web-1",
        "io.kubernetes.pod.uid=5d2a8c4e-0c1f-4e7b-9a59-2f4f1e0b6c11",
        "io.kubernetes.container.name=server",
    ];
    let id2 = "c2".repeat(32);
    let pod = KubepodsCgroup::new();
    let in_pod = format!("{}/{id2}", pod.path);
    assert_one_of(
        &ctd.fetch_in_cgroup(&agent, "k8s.io", &image, &id2, &pod_labels, Some(&in_pod)),
        "spiffe://example.org/ctd-k8s",
    );
    // The same labels in the same namespace outside a pod's cgroup (ctr's own
    // `/k8s.io/<id>`): not the kubelet's, no k8s: selectors.
    let id4 = "c4".repeat(32);
    let outside = ctd.fetch_in(&agent, "k8s.io", &image, &id4, &pod_labels);
    assert!(!outside.ok, "{}", outside.stdout);
    assert!(
        outside.stderr.contains("no identity issued")
            && outside
                .stderr
                .contains("container:label:io.kubernetes.pod.namespace:prod"),
        "{}",
        outside.stderr
    );
    assert!(!outside.stderr.contains("k8s:"), "{}", outside.stderr);
    // No entry: the refusal names its containerd selectors.
    let id3 = "c3".repeat(32);
    let none = ctd.fetch_in(&agent, "default", &image, &id3, &["app=other"]);
    assert!(!none.ok, "{}", none.stdout);
    for want in [
        "no identity issued",
        "container:runtime:containerd",
        &format!("container:id:{id3}"),
    ] {
        assert!(none.stderr.contains(want), "{want:?} in {}", none.stderr);
    }
}

/// containerd keeps only the *name* of the image a container was made from: a tag names
/// whatever was last pulled or tagged under it (on a node, the next pull of that tag for
/// any pod), not what the container runs. A container made from tag `:a` that is then
/// moved to image B is not image B; one made from `name@sha256:<B>`, whose image of that
/// name is B, is.
#[test]
fn a_containerd_container_is_not_the_image_its_tag_names_later() {
    let podman = Podman::new();
    let scratch = tempfile::tempdir().unwrap();
    let ctd = Containerd::start();
    for (tag, extra) in [("a", None), ("b", Some(("b.txt", "image b")))] {
        let name = format!("localhost/ztid-client:{tag}");
        podman.import(&client_rootfs(&scratch.path().join(tag), extra), &name);
        let archive = scratch.path().join(format!("{tag}.tar"));
        podman.ok(&[
            "save",
            "--format",
            "oci-archive",
            "-o",
            &archive.display().to_string(),
            &name,
        ]);
        ctd.import("default", &archive);
    }
    let image_a = ctd.digest("default", "localhost/ztid-client:a");
    let image_b = ctd.digest("default", "localhost/ztid-client:b");
    assert_ne!(image_a, image_b);

    let server = Server::start(TD);
    let socket = format!("containerd://{}", ctd.socket().display());
    let agent = Agent::start_with_args(&server, &["--container-socket", &socket]);
    let by_image_b = format!("container:image-id:{image_b}");
    entry(
        &server,
        &agent,
        "spiffe://example.org/image-b",
        &["container:runtime:containerd", &by_image_b],
    );
    host_entry(&server, &agent);

    // Made from image A by its tag; the tag then moved to image B.
    let from_a = ctd.run_idle(
        &agent,
        "default",
        "localhost/ztid-client:a",
        &"c5".repeat(32),
    );
    let r = ctd.ctr(
        "default",
        &[
            "images",
            "tag",
            "--force",
            "localhost/ztid-client:b",
            "localhost/ztid-client:a",
        ],
    );
    assert!(r.ok, "ctr images tag: {}", r.stderr);
    assert_eq!(ctd.digest("default", "localhost/ztid-client:a"), image_b);
    let claim = from_a.exec_fetch("fetch-a");
    assert_no_identity(&claim, &by_image_b);
    assert!(
        claim.stderr.contains("container:runtime:containerd"),
        "{}",
        claim.stderr
    );
    drop(from_a);

    // Made from image B by its digest: it is image B.
    let pinned = format!("localhost/ztid-client@{image_b}");
    let r = ctd.ctr(
        "default",
        &["images", "tag", "localhost/ztid-client:b", &pinned],
    );
    assert!(r.ok, "ctr images tag: {}", r.stderr);
    let from_b = ctd.run_idle(&agent, "default", &pinned, &"c6".repeat(32));
    assert_one_of(
        &from_b.exec_fetch("fetch-b"),
        "spiffe://example.org/image-b",
    );
}

/// A pod cgroup parent shaped like the kubelet's cgroupfs driver's
/// (`/kubepods/besteffort/pod<uid>`), unique to this test process; its directories are
/// removed from every v1 hierarchy (or the unified one) afterwards.
struct KubepodsCgroup {
    path: String,
}

impl KubepodsCgroup {
    fn new() -> Self {
        Self {
            path: format!(
                "/kubepods/besteffort/pod5d2a8c4e-0c1f-4e7b-9a59-{:012x}",
                std::process::id()
            ),
        }
    }
}

impl Drop for KubepodsCgroup {
    fn drop(&mut self) {
        let roots: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        for root in roots.iter().chain([PathBuf::from("/sys/fs/cgroup")].iter()) {
            let pod = root.join(self.path.trim_start_matches('/'));
            // Leaves first (runc removes the container's own on delete); the shared
            // parents only if empty.
            if let Ok(d) = std::fs::read_dir(&pod) {
                for e in d.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&pod);
            let _ = std::fs::remove_dir(root.join("kubepods/besteffort"));
            let _ = std::fs::remove_dir(root.join("kubepods"));
        }
    }
}

/// Removes the directories (cgroups a test made) when dropped, in order.
struct RemoveDirs(Vec<PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Runs the host's Workload API client from a shell that first moves itself into
/// `cgroup`.
fn fetch_from_cgroup(cgroup: &Path, agent: &Agent) -> CliResult {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} --output json api fetch x509 --socket {}",
            cgroup.display(),
            bin("ztid-agent").display(),
            agent.socket().display()
        ))
        .output()
        .unwrap()
        .into()
}

/// Refused with no identity, and the refusal does not name `not_named`.
fn assert_no_identity(r: &CliResult, not_named: &str) {
    assert!(!r.ok, "{}", r.stdout);
    assert!(r.stderr.contains("no identity issued"), "{}", r.stderr);
    assert!(!r.stderr.contains(not_named), "{}", r.stderr);
}

/// The directory of systemd's cgroup hierarchy: its own v1 one (v1, hybrid), else the
/// unified one.
fn systemd_hierarchy() -> PathBuf {
    let v1 = PathBuf::from("/sys/fs/cgroup/systemd");
    if v1.join("cgroup.procs").exists() {
        v1
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

#[test]
fn a_process_in_a_systemd_unit_is_selected_by_it() {
    let server = Server::start(TD);
    let agent = Agent::start_with_args(&server, &["--systemd-unit-selectors"]);
    let unit = format!("ztid-e2e-{}.service", std::process::id());
    // A unit's cgroup as systemd makes it (this test is root; systemd need not run).
    let cgroup = systemd_hierarchy().join("system.slice").join(&unit);
    std::fs::create_dir_all(&cgroup).unwrap();
    let _remove = RemoveDirs(vec![cgroup.clone()]);
    let selector = format!("systemd:unit:{unit}");
    entry(&server, &agent, "spiffe://example.org/unit", &[&selector]);
    let got = wait_for("the unit's entry", READY_TIMEOUT, || {
        let r = fetch_from_cgroup(&cgroup, &agent);
        r.ok.then_some(r)
    });
    assert_one_of(&got, "spiffe://example.org/unit");
    // The same program outside the unit: refused, and no such selector.
    let outside = agent.cli(&["api", "fetch", "x509"]);
    assert_no_identity(&outside, &selector);
}

#[test]
fn processes_exec_d_into_a_container_and_a_restarted_container_are_attested() {
    let (podman, server, agent) = podman_and_agent();
    entry(
        &server,
        &agent,
        "spiffe://example.org/long",
        &["container:name:ct-long"],
    );
    // A long-lived container: its first process waits on a socket that never comes.
    podman.run_idle(&agent, "ct-long", &[]);
    let first = wait_for("the container's entry", READY_TIMEOUT, || {
        let r = podman.exec_fetch("ct-long");
        r.ok.then_some(r)
    });
    assert_one_of(&first, "spiffe://example.org/long");
    // Restarted: same ID, a new first process in a new pid namespace. The cached
    // answer no longer fits, so the runtime is asked again.
    podman.ok(&["restart", "--time", "0", "ct-long"]);
    assert_one_of(&podman.exec_fetch("ct-long"), "spiffe://example.org/long");
    podman.ok(&["rm", "--force", "--time", "0", "ct-long"]);
}

/// A container sharing the host's pid namespace is bound to its callers by its cgroup
/// path alone: a process that puts itself in a cgroup named after it elsewhere (as a
/// unit with `Delegate=yes` may, under its own cgroup) is not in it.
#[test]
fn a_cgroup_named_after_a_host_pid_container_elsewhere_is_not_that_container() {
    let (podman, server, agent) = podman_and_agent();
    entry(
        &server,
        &agent,
        "spiffe://example.org/hostpid",
        &["container:name:ct-hostpid"],
    );
    podman.run_idle(&agent, "ct-hostpid", &["--pid=host"]);
    let id = podman
        .ok(&["inspect", "--format", "{{.Id}}", "ct-hostpid"])
        .trim()
        .to_string();
    // The container's own processes are attested (the answer is cached now).
    let first = wait_for("the container's entry", READY_TIMEOUT, || {
        let r = podman.exec_fetch("ct-hostpid");
        r.ok.then_some(r)
    });
    assert_one_of(&first, "spiffe://example.org/hostpid");

    // A host process in `<unit>.service/libpod-<ID>`: same ID, same host pid
    // namespace, another place.
    let unit = systemd_hierarchy()
        .join("system.slice")
        .join(format!("ztid-e2e-deleg-{}.service", std::process::id()));
    let forged = unit.join(format!("libpod-{id}"));
    std::fs::create_dir_all(&forged).unwrap();
    let _remove = RemoveDirs(vec![forged.clone(), unit.clone()]);
    let claim = fetch_from_cgroup(&forged, &agent);
    assert_no_identity(&claim, "container:");
    let log = agent.proc.log_text();
    assert!(
        log.contains("container_attestation_failed")
            && log.contains("the caller's cgroup path is not the container's"),
        "{log}"
    );
    podman.ok(&["rm", "--force", "--time", "0", "ct-hostpid"]);
}
