//! The README's commands, run as written (issue 17), so that it cannot drift from the
//! product again.
//!
//! Every ```sh block of README.md runs verbatim, in the order it appears, as a script of
//! `bash -euo pipefail` (stricter than a person's shell: the first failing command fails
//! the block) from the checkout's root, unless a comment just above the block says why
//! not: `<!-- readme-test: skip: REASON -->`. A block with neither fails the test, so a
//! new block is run or visibly excused. `<!-- readme-test: expect: TEXT -->` (one or
//! more) names what the block's standard output must contain: that it did what it says.
//! `<!-- readme-test: after: SECTION -->` marks a block that goes on in the shell of an
//! earlier one (the quick start's server, agent and variables): the run blocks of that
//! section run first, in the same script (and not again on their own). The script
//! traces each command with its start time (`set -x`), shown when a block fails;
//! `ZTID_README_TRACE=1` shows it always.
//!
//! Each block runs alone in fresh namespaces (`unshare`): its own network namespace with
//! only loopback up, so the fixed ports the README names (8081, 18081) are free whatever
//! else runs (other e2e tests, a server of the person running the tests); its own mount
//! namespace where `/tmp/ztid`, the README's directory, is a fresh empty directory; its
//! own PID namespace, so what the block starts with `&` is killed with it (the kernel
//! kills every process of the namespace when its first one, the block's shell, exits,
//! and `--kill-child` takes that shell down when the test drops it). Blocks that write
//! into the checkout (`scripts/demo.sh`: `target/demo`) are serialised across test
//! processes by a lock file beside the binaries.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ztid_tests::{bin, bin_dir, nix_uid};

/// How long one block may run (it builds nothing in CI: the binaries are built first).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(240);

/// The languages of blocks a person pastes into a shell.
const SHELL_LANGS: [&str; 4] = ["sh", "bash", "shell", "console"];

/// The marker prefix.
const MARKER: &str = "<!-- readme-test:";

/// One fenced shell block of the README and what the comments above it say.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    /// The heading the block is under.
    section: String,
    /// The script, as written.
    text: String,
    /// `skip: REASON`.
    skip: Option<String>,
    /// `expect: TEXT`, each.
    expect: Vec<String>,
    /// `after: SECTION`.
    after: Option<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the checkout")
        .to_path_buf()
}

/// The README's fenced shell blocks, with their markers; a malformed marker is an error.
fn shell_blocks(readme: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(h) = trimmed.strip_prefix('#').filter(|_| !line.starts_with(' ')) {
            section = h.trim_start_matches('#').trim().to_string();
        }
        let Some(lang) = trimmed.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let lang = lang.trim();
        let start = i;
        let indent = line.len() - trimmed.len();
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            body.push(lines[i].get(indent..).unwrap_or(lines[i].trim_start()));
            i += 1;
        }
        if i == lines.len() {
            return Err(format!("README.md:{}: fence never closed", start + 1));
        }
        i += 1;
        if !SHELL_LANGS.contains(&lang) {
            continue;
        }
        // The markers: the comment lines right above the fence (blank lines between).
        let mut skip = None;
        let mut expect = Vec::new();
        let mut after = None;
        for above in lines[..start].iter().rev().map(|l| l.trim()) {
            if above.is_empty() {
                continue;
            }
            let Some(m) = above.strip_prefix(MARKER) else {
                break;
            };
            let m = m
                .strip_suffix("-->")
                .ok_or_else(|| format!("README.md:{}: marker without -->", start + 1))?
                .trim();
            match m.split_once(':') {
                Some(("skip", reason)) if !reason.trim().is_empty() => {
                    skip = Some(reason.trim().to_string())
                }
                Some(("expect", text)) if !text.trim().is_empty() => {
                    expect.push(text.trim().to_string())
                }
                Some(("after", section)) if !section.trim().is_empty() => {
                    after = Some(section.trim().to_string())
                }
                _ => {
                    return Err(format!(
                        "README.md:{}: marker {m:?} is not `skip: REASON`, `expect: TEXT` or `after: SECTION`",
                        start + 1
                    ))
                }
            }
        }
        blocks.push(Block {
            line: start + 1,
            section: section.clone(),
            text: body.join("\n") + "\n",
            skip,
            expect,
            after,
        });
    }
    Ok(blocks)
}

/// A block running in its namespaces; dropping it kills them all.
struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        // unshare's --kill-child turns this into SIGKILL for the block's shell, whose
        // exit ends every process of its PID namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a block printed.
struct Outcome {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// The environment of a fresh login shell: the harness's and cargo's variables dropped
/// (CARGO_*, ZTID_*, SPIFFE_ENDPOINT_SOCKET), what finds programs kept.
fn fresh_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME";
        if !keep
            && (k == "CARGO"
                || k.starts_with("CARGO_")
                || k.starts_with("ZTID_")
                || k == "SPIFFE_ENDPOINT_SOCKET"
                || k == "OUT_DIR"
                || k.starts_with("RUST_TEST"))
        {
            cmd.env_remove(&k);
        }
    }
}

/// Runs `script` verbatim under `bash -euo pipefail` from the
/// checkout's root, in fresh network, mount and PID namespaces.
fn run_block(script: &str, scratch: &Path) -> Outcome {
    let script_path = scratch.join("block.sh");
    std::fs::write(&script_path, script).expect("write the block");
    let private_tmp = scratch.join("tmp-ztid");
    std::fs::create_dir(&private_tmp).expect("the block's /tmp/ztid");
    let stdout_path = scratch.join("stdout");
    let stderr_path = scratch.join("stderr");
    // Inside the namespaces, before the block: loopback up, /tmp/ztid its own.
    let prelude = r#"set -euo pipefail
ip link set lo up
mkdir -p /tmp/ztid
mount --bind "$2" /tmp/ztid
cd "$3"
exec bash -euo pipefail "$1""#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
        "bash",
        "-c",
        prelude,
        "readme-block",
    ])
    .arg(&script_path)
    .arg(&private_tmp)
    .arg(repo_root())
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
    .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    fresh_env(&mut cmd);
    let started = Instant::now();
    let mut running = Running {
        child: cmd.spawn().expect(
            "start unshare (util-linux): the README test needs it, and root, for its namespaces",
        ),
    };
    let status = loop {
        if let Some(s) = running.child.try_wait().expect("wait for the block") {
            break Some(s);
        }
        if started.elapsed() > BLOCK_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    drop(running);
    let read = |p: &Path| {
        let mut s = String::new();
        let _ = std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut s));
        s
    };
    Outcome {
        ok: status.is_some_and(|s| s.success()),
        status: status.map_or_else(
            || format!("killed after {BLOCK_TIMEOUT:?}"),
            |s| s.to_string(),
        ),
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
        took,
    }
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Serialises README runs across test processes of this checkout (the demo writes
/// `target/demo`); released when the file is dropped.
fn checkout_lock() -> std::fs::File {
    let path = bin_dir().join("readme-test.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
    f
}

#[test]
fn every_shell_block_runs_as_written_or_says_why_not() {
    assert_eq!(
        nix_uid(),
        0,
        "the README test runs its blocks in namespaces of their own (unshare), which needs root"
    );
    // The binaries the blocks name must exist; the blocks build them too, but in CI
    // that build is a no-op.
    bin("ztid-server");
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let blocks = shell_blocks(&readme).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        blocks.len() >= 3,
        "README.md has {} shell blocks",
        blocks.len()
    );
    let _lock = checkout_lock();
    let mut report = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let at = format!("README.md:{} ({})", b.line, b.section);
        if let Some(reason) = &b.skip {
            report.push(format!("{at}: skipped: {reason}"));
            continue;
        }
        // A block a later one goes on from runs once, at the head of that one's script.
        if let Some(later) = blocks[i + 1..]
            .iter()
            .find(|l| l.skip.is_none() && l.after.as_deref() == Some(b.section.as_str()))
        {
            report.push(format!(
                "{at}: runs first in the script of README.md:{}",
                later.line
            ));
            continue;
        }
        let mut group: Vec<&Block> = match &b.after {
            None => Vec::new(),
            Some(section) => {
                let before: Vec<&Block> = blocks[..i]
                    .iter()
                    .filter(|o| &o.section == section && o.skip.is_none() && o.after.is_none())
                    .collect();
                assert!(
                    !before.is_empty(),
                    "{at}: `after: {section}` names no earlier block that runs"
                );
                before
            }
        };
        group.push(b);
        // Each command traced to stderr with the time it started (for a failure's story).
        let script = group.iter().fold(
            "PS4='+ ${EPOCHREALTIME} '\nset -x\n".to_string(),
            |acc, g| acc + &g.text,
        );
        let scratch = tempfile::tempdir().expect("scratch directory");
        let out = run_block(&script, scratch.path());
        let shown = || {
            format!(
                "--- script ---\n{}--- stdout (last 40 lines) ---\n{}\n--- stderr, traced (last 60 lines) ---\n{}",
                script,
                tail(&out.stdout, 40),
                tail(&out.stderr, 60)
            )
        };
        assert!(
            out.ok,
            "{at} failed ({}) after {:.1} s:\n{}",
            out.status,
            out.took.as_secs_f64(),
            shown()
        );
        for e in group.iter().flat_map(|g| &g.expect) {
            assert!(
                out.stdout.contains(e.as_str()),
                "{at}: the output lacks {e:?}:\n{}",
                shown()
            );
        }
        report.push(format!("{at}: ran in {:.1} s", out.took.as_secs_f64()));
        if std::env::var_os("ZTID_README_TRACE").is_some() {
            eprintln!("{at} trace:\n{}", out.stderr);
        }
    }
    eprintln!("README blocks:\n  {}", report.join("\n  "));
}

#[test]
fn markers_are_parsed_and_a_bad_one_is_refused() {
    let md = "# A\n<!-- readme-test: skip: it recurses -->\n```sh\nscripts/test.sh\n```\n\
              ## B\n<!-- readme-test: after: A -->\n<!-- readme-test: expect: hello -->\n\n```sh\necho hello\n```\n\
              ```toml\nx = 1\n```\n  ```bash\n  echo indented\n  ```\n";
    let blocks = shell_blocks(md).unwrap();
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0].skip.as_deref(), Some("it recurses"));
    assert_eq!(blocks[0].section, "A");
    assert_eq!(blocks[1].expect, ["hello"]);
    assert_eq!(blocks[1].after.as_deref(), Some("A"));
    assert_eq!(blocks[1].section, "B");
    assert!(blocks[1].skip.is_none());
    assert_eq!(blocks[2].text, "echo indented\n");
    for bad in [
        "<!-- readme-test: skip: -->\n```sh\nx\n```\n",
        "<!-- readme-test: skipp: typo -->\n```sh\nx\n```\n",
        "<!-- readme-test: skip: no end\n```sh\nx\n```\n",
        "```sh\nnever closed\n",
    ] {
        assert!(shell_blocks(bad).is_err(), "accepted {bad:?}");
    }
}

/// `--wait` (the readiness waits the README uses): bounded, with a clear error naming
/// what was not ready; a failure that waiting cannot cure is not waited out.
#[test]
fn wait_flags_are_bounded_and_say_what_was_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let m = missing.to_str().unwrap();
    let server = |args: &[&str]| -> ztid_tests::CliResult {
        Command::new(bin("ztid-server"))
            .args(args)
            .output()
            .unwrap()
            .into()
    };
    let agent = |args: &[&str]| ztid_tests::agent_cli(args);

    let t = Instant::now();
    let r = server(&["--admin-socket", m, "healthcheck", "--wait", "1"]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("the server did not answer within 1 s (--wait)")
            && r.stderr.contains("no such socket"),
        "{}",
        r.stderr
    );
    assert!(t.elapsed() >= Duration::from_millis(900), "gave up early");

    let r = agent(&["healthcheck", "--socket", m, "--wait", "1"]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("the agent did not serve within 1 s (--wait)")
            && r.stderr.contains("no such socket"),
        "{}",
        r.stderr
    );
    let r = agent(&["api", "fetch", "x509", "--socket", m, "--wait", "1"]);
    assert!(!r.ok);
    assert!(
        r.stderr.contains("no X509-SVID came within 1 s (--wait)"),
        "{}",
        r.stderr
    );

    // Above the bound: refused before anything runs.
    for r in [
        server(&["--admin-socket", m, "healthcheck", "--wait", "601"]),
        agent(&["healthcheck", "--socket", m, "--wait", "601"]),
        agent(&["api", "fetch", "x509", "--socket", m, "--wait", "601"]),
    ] {
        assert!(!r.ok);
        assert!(r.stderr.contains("601 is not in 0..=600"), "{}", r.stderr);
    }

    // Not curable by waiting (an endpoint that is not a Unix socket): at once.
    let t = Instant::now();
    let r: ztid_tests::CliResult = Command::new(bin("ztid-agent"))
        .args(["api", "fetch", "x509", "--wait", "60"])
        .env("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:1")
        .output()
        .unwrap()
        .into();
    assert!(!r.ok);
    assert!(
        r.stderr.contains("is not a unix:///path address"),
        "{}",
        r.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "waited out a fatal error"
    );

    // A server started in the background: healthcheck --wait returns once it answers.
    let data = dir.path().join("server");
    let port = ztid_tests::free_port().to_string();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(bin("ztid-server"))
        .args(["run", "--trust-domain", "wait.example.org", "--data-dir"])
        .arg(&data)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = data.join("admin.sock");
    let r = server(&[
        "--admin-socket",
        sock.to_str().unwrap(),
        "healthcheck",
        "--wait",
        "60",
    ]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("trust domain wait.example.org"),
        "{}",
        r.stdout
    );
}
