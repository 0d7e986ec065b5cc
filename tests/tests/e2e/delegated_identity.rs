//! The Delegated Identity API end to end: a real server and agent, and a Python delegate
//! whose stubs grpcio-tools generates at test time from the SPIRE protos vendored under
//! proto/proto/spire (SPIRE's package, messages and field numbers), so it is what a
//! SPIRE delegate sends. Shown: an unlisted caller is refused with the reason; a delegate
//! authorised by SPIFFE ID gets the X.509-SVIDs of a workload it names by selectors (a
//! per-instance identity that chains to the bundle, with its key), the rotation pushed on
//! its stream, the bundles and JWT-SVIDs; a delegate authorised by uid gets a process's
//! own identity by pid, until that process exits; every call is in the agent's audit log;
//! the bundle streams push each authority the server prepares, on the open stream.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use ztid_tests::*;

const TD: &str = "example.org";
/// The workload the delegate names: no process needs to exist for selectors.
const WORKLOAD_UID: u32 = 4242;
const WEB: &str = "spiffe://example.org/web";
const DELEGATE_ID: &str = "spiffe://example.org/delegate";
/// Long enough for a stream to see one rotation (at half-life).
const ROTATION_TIMEOUT: Duration = Duration::from_secs(60);

fn workload_selector() -> String {
    format!("unix:uid:{WORKLOAD_UID}")
}

fn delegate_cmd(socket: &Path, args: &[&str]) -> Command {
    delegate_cmd_in(&[], socket, args)
}

/// The delegate run under `wrapper` (`unshare ...`), if not empty.
fn delegate_cmd_in(wrapper: &[&str], socket: &Path, args: &[&str]) -> Command {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(python());
            c
        }
        None => Command::new(python()),
    };
    c.arg(here.join("python/spire_delegate.py"))
        .arg(here.join("../proto/proto"))
        .arg(socket)
        .args(args)
        .stdin(Stdio::null());
    // Generated stubs go in the test's directory, removed with it.
    if let Some(dir) = socket.parent() {
        c.env("SPIRE_STUBS_DIR", dir);
    }
    c
}

/// One delegate call to its end: its JSON lines.
fn run(socket: &Path, args: &[&str]) -> Vec<Value> {
    run_in(&[], socket, args)
}

/// [`run`] under `wrapper`.
fn run_in(wrapper: &[&str], socket: &Path, args: &[&str]) -> Vec<Value> {
    let out = delegate_cmd_in(wrapper, socket, args)
        .output()
        .expect("run the delegate");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        !lines.is_empty(),
        "the delegate printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

/// A delegate holding a stream open; its lines are collected as they come.
struct Streaming {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Streaming {
    fn spawn(socket: &Path, args: &[&str]) -> Self {
        let mut child = delegate_cmd(socket, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the delegate");
        let out = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for a line `f` accepts.
    fn wait(&self, what: &str, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, timeout, || {
            self.lines.lock().unwrap().iter().find(|v| f(v)).cloned()
        })
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent with `[delegated_identity]` on a socket in `dir`, for `delegates`.
fn agent_with_delegates(server: &Server, dir: &Path, delegates: &[&str]) -> (Agent, PathBuf) {
    let socket = dir.join("admin.sock");
    let config = dir.join("agent.toml");
    let list: Vec<String> = delegates.iter().map(|d| format!("{d:?}")).collect();
    std::fs::write(
        &config,
        format!(
            "[delegated_identity]\nsocket = {:?}\nauthorized_delegates = [{}]\n",
            socket.display().to_string(),
            list.join(", ")
        ),
    )
    .unwrap();
    let agent = Agent::start_with_args(server, &["--config", &config.display().to_string()]);
    wait_for("the delegated identity socket", READY_TIMEOUT, || {
        socket.exists().then_some(())
    });
    (agent, socket)
}

fn ids(v: &Value) -> Vec<String> {
    v["ids"]
        .as_array()
        .map(|a| a.iter().map(|i| i.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The stream's first answer, which must carry SVIDs (not an error).
fn first_svids(stream: &Streaming, what: &str) -> Value {
    let first = stream.wait(what, READY_TIMEOUT, |v| {
        !ids(v).is_empty() || v.get("error").is_some()
    });
    assert!(first.get("error").is_none(), "{first:?}");
    first
}

/// Creates the workload's entry, `WEB` for `sel`, with `extra` `entry create` options.
fn web_entry(server: &Server, agent: &Agent, sel: &str, extra: &[&str]) {
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        WEB,
        "--parent-id",
        &agent.spiffe_id,
        "--selector",
        sel,
    ];
    args.extend_from_slice(extra);
    server.cli_ok(&args);
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap())
        .unwrap()
}

fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// The leaf chains to the server's bundle with openssl, and the key is the leaf's.
fn check_with_openssl(server: &Server, dir: &Path, line: &Value) {
    let leaf = b64(&line["leaves"][0]);
    let key = b64(&line["keys"][0]);
    let leaf_pem = dir.join("leaf.pem");
    let key_der = dir.join("key.der");
    std::fs::write(&leaf_pem, pem_of("CERTIFICATE", &leaf)).unwrap();
    std::fs::write(&key_der, &key).unwrap();
    let bundle = server.bundle_file().display().to_string();
    let leaf_s = leaf_pem.display().to_string();
    let v = openssl(&["verify", "-CAfile", &bundle, &leaf_s]);
    assert!(v.ok, "openssl verify: {} {}", v.stdout, v.stderr);
    let cert_pub = openssl(&["x509", "-pubkey", "-noout", "-in", &leaf_s]);
    let key_pub = openssl(&[
        "pkey",
        "-pubout",
        "-inform",
        "DER",
        "-in",
        &key_der.display().to_string(),
    ]);
    assert!(
        cert_pub.ok && key_pub.ok,
        "{} {}",
        cert_pub.stderr,
        key_pub.stderr
    );
    assert_eq!(cert_pub.stdout, key_pub.stdout, "the key is the leaf's");
}

#[test]
fn a_delegate_authorised_by_spiffe_id_gets_a_named_workloads_svids_rotations_bundles_and_jwts() {
    let server = Server::start(TD);
    let dir = tempfile::tempdir().unwrap();
    let (agent, socket) = agent_with_delegates(&server, dir.path(), &[DELEGATE_ID]);
    let sel = workload_selector();

    // Not listed (its uid is not, and it holds no listed identity yet): refused, with why.
    let refused = run(&socket, &["x509", "--selector", &sel, "--count", "1"]);
    assert_eq!(refused[0]["error"], "PERMISSION_DENIED", "{refused:?}");
    assert_eq!(
        refused[0]["message"],
        format!(
            "not an authorized delegate: uid {} is not listed in [delegated_identity] authorized_delegates, \
             and this process holds none of the SPIFFE IDs listed there",
            nix_uid()
        )
    );
    for action in ["x509-bundles", "jwt-bundles"] {
        assert_eq!(run(&socket, &[action])[0]["error"], "PERMISSION_DENIED");
    }

    // The workload's entry (short-lived, to see a rotation), and the delegate's own.
    web_entry(&server, &agent, &sel, &["--x509-ttl", "20"]);
    let delegate_entry = entry_for_my_uid(&server, &agent, DELEGATE_ID, &[]);

    // Now authorised by its SPIFFE ID; it gets the named workload's identity.
    let stream = Streaming::spawn(&socket, &["x509", "--selector", &sel]);
    let first = first_svids(&stream, "the workload's X.509-SVID");
    let id = ids(&first).remove(0);
    let prefix = format!("{WEB}/");
    assert!(
        id.starts_with(&prefix) && id.len() == prefix.len() + 32,
        "per-instance: {id}"
    );
    assert_eq!(
        ids(&first).len(),
        1,
        "only the named workload's entry: {first:?}"
    );
    assert_eq!(spiffe_id_of(&b64(&first["leaves"][0])), id);
    check_with_openssl(&server, dir.path(), &first);

    // The rotation is pushed on the open stream: same instance, new certificate and key.
    let rotated = stream.wait(
        "a rotation on the delegate's stream",
        ROTATION_TIMEOUT,
        |v| {
            v.get("error").is_some() || (!ids(v).is_empty() && v["leaves"][0] != first["leaves"][0])
        },
    );
    assert!(rotated.get("error").is_none(), "{rotated:?}");
    assert_eq!(
        ids(&rotated),
        vec![id.clone()],
        "the same instance identity"
    );
    assert_ne!(rotated["keys"][0], first["keys"][0], "a new key");
    assert!(rotated["expires_at"][0].as_i64() > first["expires_at"][0].as_i64());
    check_with_openssl(&server, dir.path(), &rotated);

    // Bundles: the local one, keyed by the trust domain's ID.
    let x509 = run(&socket, &["x509-bundles"]);
    let roots: Vec<u8> = bundle_roots(&server).concat();
    assert_eq!(b64(&x509[0]["bundles"]["spiffe://example.org"]), roots);
    let jwks = run(&socket, &["jwt-bundles"]);
    assert!(!jwks[0]["bundles"]["spiffe://example.org"]["keys"]
        .as_array()
        .expect("a JWKS")
        .is_empty());

    // JWT-SVIDs for the named workload and the audience asked for.
    let jwt = run(&socket, &["jwt", "--audience", "db", "--selector", &sel]);
    let svid = &jwt[0]["svids"][0];
    let jwt_id = svid["id"].as_str().unwrap_or_else(|| panic!("{jwt:?}"));
    assert!(jwt_id.starts_with(&prefix), "{jwt_id}");
    let payload = svid["token"].as_str().unwrap().split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], jwt_id);
    assert!(
        claims["aud"] == "db" || claims["aud"][0] == "db",
        "{claims}"
    );
    // A bad request is refused as such.
    let both = run(
        &socket,
        &["jwt", "--audience", "db", "--selector", &sel, "--pid", "1"],
    );
    assert_eq!(both[0]["error"], "INVALID_ARGUMENT");
    assert!(both[0]["message"]
        .as_str()
        .unwrap()
        .contains("mutually exclusive"));
    let no_aud = run(&socket, &["jwt", "--selector", &sel]);
    assert_eq!(no_aud[0]["error"], "INVALID_ARGUMENT");

    // Audited in the agent's log: who, for what, which identities; and the refusals.
    drop(stream);
    wait_for(
        "the end of the stream in the audit log",
        READY_TIMEOUT,
        || {
            agent
                .proc
                .log_text()
                .contains("delegated_subscription_ended")
                .then_some(())
        },
    );
    let log = agent.proc.log_text();
    let sub = log
        .lines()
        .find(|l| {
            l.contains("delegated_subscription")
                && l.contains("SubscribeToX509SVIDs")
                && l.contains(&id)
        })
        .unwrap_or_else(|| panic!("no audit record of the subscription:\n{log}"));
    assert!(sub.contains(DELEGATE_ID) && sub.contains(&sel), "{sub}");
    assert!(log
        .lines()
        .any(|l| l.contains("delegated_refused") && l.contains("not an authorized delegate")));
    assert!(log.lines().any(|l| l.contains("delegated_subscription")
        && l.contains("FetchJWTSVIDs")
        && l.contains(jwt_id)));
    // Delegated instances are minted for the delegate: they never take (nor ask the pool
    // to mint) the SVIDs pre-minted for new processes.
    assert!(
        !log.lines().any(
            |l| (l.contains("svid_pooled") || l.contains("pooled_svid_assigned"))
                && l.contains(WEB)
        ),
        "{log}"
    );

    // And on the server: the agent reports each call at its next sync.
    let audit = server.data_dir().join("audit/audit.log");
    wait_for(
        "the server's audit record of the subscription",
        READY_TIMEOUT,
        || {
            let text = std::fs::read_to_string(&audit).ok()?;
            text.lines()
                .any(|l| {
                    l.contains("delegated_subscription")
                        && l.contains("SubscribeToX509SVIDs")
                        && l.contains(DELEGATE_ID)
                        && l.contains(&id)
                        && l.contains(&agent.spiffe_id)
                })
                .then_some(())
        },
    );

    // Authorisation is checked again while a stream is open: once the delegate's own
    // entry is gone, its stream ends with the reason.
    let stream = Streaming::spawn(&socket, &["x509", "--selector", &sel]);
    stream.wait("a new subscription", READY_TIMEOUT, |v| !ids(v).is_empty());
    server.cli_ok(&["entry", "delete", delegate_entry.trim()]);
    let end = stream.wait("the stream to end", READY_TIMEOUT, |v| {
        v.get("error").is_some()
    });
    assert_eq!(end["error"], "PERMISSION_DENIED", "{end:?}");
    assert!(
        end["message"]
            .as_str()
            .unwrap()
            .starts_with("not an authorized delegate: "),
        "{end:?}"
    );
}

/// `sleep` running as [`WORKLOAD_UID`], once it has exec'd with that uid.
fn workload_process() -> Child {
    let child = Command::new("setpriv")
        .args([
            "--reuid",
            &WORKLOAD_UID.to_string(),
            "--regid",
            &WORKLOAD_UID.to_string(),
            "--clear-groups",
            "sleep",
            "300",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("setpriv");
    let pid = child.id();
    wait_for(
        "the workload process to run as its uid",
        READY_TIMEOUT,
        || {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            (exe.ends_with("sleep")
                && status
                    .lines()
                    .any(|l| l.starts_with("Uid:") && l.contains(&WORKLOAD_UID.to_string())))
            .then_some(())
        },
    );
    child
}

#[test]
fn a_delegate_authorised_by_uid_gets_a_process_identity_by_pid_until_it_exits() {
    if !other_uid::can_switch_uid() {
        eprintln!("skipped: needs root to run a workload as another uid");
        return;
    }
    let server = Server::start(TD);
    let dir = tempfile::tempdir().unwrap();
    let me = format!("uid:{}", nix_uid());
    let (agent, socket) = agent_with_delegates(&server, dir.path(), &[&me]);
    let sel = workload_selector();
    web_entry(&server, &agent, &sel, &[]);
    let mut workload = workload_process();
    let pid = workload.id().to_string();

    let stream = Streaming::spawn(&socket, &["x509", "--pid", &pid]);
    let first = first_svids(&stream, "the process's X.509-SVID");
    let id = ids(&first).remove(0);
    assert!(id.starts_with(&format!("{WEB}/")), "{id}");
    // Each delegate process gets its own instance of that process (its own segment and
    // key): never the process's own, nor another delegate's.
    let again = run(&socket, &["x509", "--pid", &pid, "--count", "1"]);
    let other = ids(&again[0]);
    assert_eq!(other.len(), 1, "{again:?}");
    assert!(other[0].starts_with(&format!("{WEB}/")), "{other:?}");
    assert_ne!(other[0], id, "a delegate's own instance");
    assert_ne!(again[0]["keys"][0], first["keys"][0], "its own key");

    // The process exits: the stream ends, saying so.
    let _ = workload.kill();
    let _ = workload.wait();
    let end = stream.wait("the stream to end", READY_TIMEOUT, |v| {
        v.get("error").is_some()
    });
    assert_eq!(end["error"], "NOT_FOUND", "{end:?}");
    assert_eq!(
        end["message"],
        format!("workload pid {pid}: the process has exited")
    );
    // A pid that is no process is refused.
    let none = run(&socket, &["x509", "--pid", &pid, "--count", "1"]);
    assert_eq!(none[0]["error"], "NOT_FOUND", "{none:?}");
    let log = agent.proc.log_text();
    assert!(
        log.lines().any(|l| l.contains("delegated_subscription")
            && l.contains(&me)
            && l.contains(&format!("pid:{pid}"))
            && l.contains(&id)),
        "{log}"
    );
}

/// The trust domain's roots in an X.509 bundle line: DER certificates, concatenated as sent.
fn x509_roots(line: &Value) -> Vec<u8> {
    b64(&line["bundles"][format!("spiffe://{TD}").as_str()])
}

/// The key IDs of a JWT bundle line.
fn jwt_kids(line: &Value) -> Vec<String> {
    line["bundles"][format!("spiffe://{TD}").as_str()]["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["kid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_delegates_bundle_streams_push_each_authority_the_server_prepares() {
    let server = Server::start(TD);
    let dir = tempfile::tempdir().unwrap();
    let me = format!("uid:{}", nix_uid());
    let (_agent, socket) = agent_with_delegates(&server, dir.path(), &[&me]);

    // Each stream gets a bundle at every change of it (the other kind's included), so
    // the count leaves room for more lines than the two changes below make.
    let x509 = Streaming::spawn(&socket, &["x509-bundles", "--count", "10"]);
    let jwt = Streaming::spawn(&socket, &["jwt-bundles", "--count", "10"]);
    let first_x509 = x509.wait("the first X.509 bundle", READY_TIMEOUT, |v| {
        v.get("bundles").is_some() || v.get("error").is_some()
    });
    assert!(first_x509.get("error").is_none(), "{first_x509:?}");
    let roots_before = bundle_roots(&server);
    assert_eq!(roots_before.len(), 1, "one authority at first");
    assert_eq!(x509_roots(&first_x509), roots_before.concat());
    let first_jwt = jwt.wait("the first JWT bundle", READY_TIMEOUT, |v| {
        v.get("bundles").is_some() || v.get("error").is_some()
    });
    assert!(first_jwt.get("error").is_none(), "{first_jwt:?}");
    let kids_before = jwt_kids(&first_jwt);
    assert!(!kids_before.is_empty(), "{first_jwt:?}");

    // New authorities, prepared (published before they sign anything): each open stream
    // gets the bundle that carries them, without asking again.
    server.cli_ok(&["authority", "x509", "prepare"]);
    server.cli_ok(&["authority", "jwt", "prepare"]);
    let roots_after = bundle_roots(&server);
    assert_eq!(roots_after.len(), 2, "the prepared root is published");
    let pushed = x509.wait(
        "the X.509 bundle with the prepared root",
        READY_TIMEOUT,
        |v| {
            v.get("error").is_some()
                || (v.get("bundles").is_some() && x509_roots(v) != roots_before.concat())
        },
    );
    assert!(pushed.get("error").is_none(), "{pushed:?}");
    let got = x509_roots(&pushed);
    for root in &roots_after {
        assert!(
            got.windows(root.len()).any(|w| w == root.as_slice()),
            "every root of the server's bundle is on the stream"
        );
    }
    let pushed = jwt.wait("the JWT bundle with the prepared key", READY_TIMEOUT, |v| {
        v.get("error").is_some()
            || (v.get("bundles").is_some() && jwt_kids(v).len() > kids_before.len())
    });
    assert!(pushed.get("error").is_none(), "{pushed:?}");
    let kids_after = jwt_kids(&pushed);
    assert_eq!(kids_after.len(), kids_before.len() + 1, "{pushed:?}");
    assert!(
        kids_before.iter().all(|k| kids_after.contains(k)),
        "the keys in force stay: {kids_before:?} in {kids_after:?}"
    );
}

/// A root process in a user namespace of its own (as a container's root may be) is uid 0
/// to SO_PEERCRED; listed as `uid:0` it is still refused, saying why.
#[test]
fn a_uid_delegate_in_another_user_namespace_is_refused() {
    let userns = ["unshare", "--user", "--map-root-user"];
    let works = Command::new(userns[0])
        .args(&userns[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        eprintln!("skipped: unshare --user is not allowed here");
        return;
    }
    let server = Server::start(TD);
    let dir = tempfile::tempdir().unwrap();
    let me = format!("uid:{}", nix_uid());
    let (agent, socket) = agent_with_delegates(&server, dir.path(), &[&me]);
    // Outside any namespace of its own it is served (the bundles, needing no entry).
    let served = run(&socket, &["x509-bundles"]);
    assert!(served[0].get("error").is_none(), "{served:?}");
    let refused = run_in(&userns, &socket, &["x509-bundles"]);
    assert_eq!(refused[0]["error"], "PERMISSION_DENIED", "{refused:?}");
    assert_eq!(
        refused[0]["message"],
        format!(
            "not an authorized delegate: uid {} is listed in [delegated_identity] \
             authorized_delegates, but it runs in a user namespace other than the agent's \
             (a container?): a uid delegate must share the agent's user and pid namespaces \
             (list a delegate in a container by its SPIFFE ID)",
            nix_uid()
        )
    );
    assert!(agent
        .proc
        .log_text()
        .lines()
        .any(|l| l.contains("delegated_refused") && l.contains("user namespace other than")));
}
