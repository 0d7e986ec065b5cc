//! The agent's pool of per-instance SVIDs minted ahead (issue 16 item 3), with real
//! processes: `ztid-agent api fetch x509` runs as a new process each time, so each is a
//! new workload instance. What is checked comes from the processes' own answers and the
//! agent's log events (`svid_pooled`, `pooled_svid_assigned`, `pooled_svid_dropped`).

use std::collections::{BTreeMap, BTreeSet};
use ztid_tests::*;

const TD: &str = "example.org";

/// Pool settings of these tests: two per entry set (the default), a lifetime long enough
/// that nothing expires during a test on a loaded machine.
const POOL_CONFIG: &str = "svid_pool_size = 2\nsvid_pool_max_age_seconds = 600\n";

fn start_pooled(server: &Server) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, POOL_CONFIG).unwrap();
    let agent = Agent::start_with_args(server, &["--config", cfg.to_str().unwrap()]);
    (agent, dir)
}

/// The per-instance SPIFFE ID a new process (one `api fetch x509` run) was given under
/// `base`, or the refusal's stderr.
fn fetch_new_process(agent: &Agent, base: &str) -> Result<String, String> {
    let r = agent.cli(&["api", "fetch", "x509", "--output", "json"]);
    if !r.ok {
        return Err(r.stderr);
    }
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json output");
    v["svids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["spiffe_id"].as_str())
        .find(|id| id.starts_with(&format!("{base}/")))
        .map(str::to_string)
        .ok_or_else(|| format!("no per-instance SVID under {base}: {}", r.stdout))
}

fn segment_of(id: &str) -> String {
    id.rsplit('/').next().unwrap().to_string()
}

/// The agent's log without terminal colour codes.
fn plain_log(agent: &Agent) -> String {
    strip_ansi(&agent.proc.log_text())
}

/// The instance segments named by the agent's `event` log lines, in order.
fn segments_logged(agent: &Agent, event: &str) -> Vec<String> {
    plain_log(agent)
        .lines()
        .filter(|l| {
            l.contains(&format!("event=\"{event}\"")) || l.contains(&format!("event={event}"))
        })
        .filter_map(|l| {
            let i = l.find("instance=")? + "instance=".len();
            let seg: String = l[i..]
                .chars()
                .take_while(|c| c.is_ascii_hexdigit())
                .collect();
            (seg.len() == 32).then_some(seg)
        })
        .collect()
}

/// `svid_pooled` events of `base`.
fn pooled_lines(agent: &Agent, base: &str) -> usize {
    plain_log(agent)
        .lines()
        .filter(|l| l.contains("svid_pooled") && l.contains(&format!("{base}/")))
        .count()
}

fn wait_pool_filled(agent: &Agent, base: &str, at_least: usize) {
    wait_for(
        &format!("{at_least} instances of {base} pre-minted"),
        READY_TIMEOUT,
        || (pooled_lines(agent, base) >= at_least).then_some(()),
    );
}

#[test]
fn pooled_svids_go_to_one_process_each_and_never_again() {
    let server = Server::start(TD);
    let (agent, _cfg) = start_pooled(&server);
    let base = "spiffe://example.org/pooled";
    entry_for_my_uid(&server, &agent, base, &[]);
    // The first process of the entry set waits for its mint and makes the set pooled.
    let first = wait_for("the entry at the agent", READY_TIMEOUT, || {
        fetch_new_process(&agent, base).ok()
    });
    wait_pool_filled(&agent, base, 2);

    // Pooled, less taken, less dropped (a drop at insert was never pooled: counted
    // only if it was).
    let level = || {
        let pooled: BTreeSet<String> = segments_logged(&agent, "svid_pooled").into_iter().collect();
        let gone = segments_logged(&agent, "pooled_svid_assigned")
            .into_iter()
            .chain(segments_logged(&agent, "pooled_svid_dropped"))
            .filter(|s| pooled.contains(s))
            .collect::<BTreeSet<_>>()
            .len();
        pooled.len() - gone
    };
    // Bursts of concurrent new processes, racing for the pool and its refill.
    let mut served: Vec<String> = vec![first];
    for _round in 0..3 {
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| fetch_new_process(&agent, base)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().expect("a new process is served"))
                .collect()
        });
        served.extend(ids);
        wait_pool_filled(&agent, base, 2);
    }
    // Bursts of 8 outran a pool of 2: the set's pool grew (up to 4 times its size).
    wait_for("the pool grown by the bursts", READY_TIMEOUT, || {
        (level() > 2).then_some(())
    });
    // And one at a time, each once the pool holds at least its configured size again:
    // each is served from it.
    for _ in 0..4 {
        wait_for("the pool refilled", READY_TIMEOUT, || {
            (level() >= 2).then_some(())
        });
        let id = fetch_new_process(&agent, base).unwrap();
        let assigned = segments_logged(&agent, "pooled_svid_assigned");
        assert!(
            assigned.contains(&segment_of(&id)),
            "a new process after a refill gets a pre-minted SVID: {id}\n{}",
            plain_log(&agent)
        );
        served.push(id);
    }

    // No two processes got the same identity.
    let distinct: BTreeSet<&String> = served.iter().collect();
    assert_eq!(distinct.len(), served.len(), "{served:?}");

    // Every pre-minted instance given out went to exactly one process, and that process
    // is the one that was served it.
    let assigned = segments_logged(&agent, "pooled_svid_assigned");
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for s in &assigned {
        *counts.entry(s).or_default() += 1;
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "a pooled instance assigned twice: {counts:?}"
    );
    let served_segments: BTreeSet<String> = served.iter().map(|i| segment_of(i)).collect();
    for s in &assigned {
        assert!(served_segments.contains(s), "assigned {s} was not served");
    }
    assert!(
        assigned.len() >= 4,
        "processes were served from the pool: {assigned:?}"
    );
    // Every served identity was pre-minted for the pool or minted for its process;
    // none that the pool dropped unused was ever served.
    let pooled = segments_logged(&agent, "svid_pooled");
    let dropped: BTreeSet<String> = segments_logged(&agent, "pooled_svid_dropped")
        .into_iter()
        .collect();
    for s in &served_segments {
        assert!(!dropped.contains(s), "{s} was served after it was dropped");
        if pooled.contains(s) {
            assert!(assigned.contains(s), "{s} served from the pool unlogged");
        }
    }
    // A process that holds a pooled identity keeps it; the next new process gets another.
    let again = fetch_new_process(&agent, base).unwrap();
    assert!(!served.contains(&again));
}

#[test]
fn pooled_svids_of_a_deleted_or_tainted_entry_are_dropped_at_the_next_sync() {
    let server = Server::start(TD);
    let (agent, _cfg) = start_pooled(&server);

    // Deleted entry: its pooled instances go at the next sync, and none is ever served.
    let gone = "spiffe://example.org/soon-gone";
    let id = entry_for_my_uid(&server, &agent, gone, &[]);
    wait_for("the entry at the agent", READY_TIMEOUT, || {
        fetch_new_process(&agent, gone).ok()
    });
    wait_pool_filled(&agent, gone, 2);
    let pooled: Vec<String> = segments_logged(&agent, "svid_pooled");
    assert!(pooled.len() >= 2, "{pooled:?}");
    server.cli_ok(&["entry", "delete", &id]);
    wait_for(
        "the deleted entry's pooled SVIDs dropped",
        READY_TIMEOUT,
        || {
            let log = plain_log(&agent);
            let dropped: BTreeSet<String> = segments_logged(&agent, "pooled_svid_dropped")
                .into_iter()
                .collect();
            (pooled.iter().all(|s| dropped.contains(s)) && log.contains("entry changed or deleted"))
                .then_some(())
        },
    );
    let r = fetch_new_process(&agent, gone).expect_err("no identity once deleted");
    assert!(r.contains("no identity issued"), "{r}");

    // Tainted authority: the pooled instances minted under it go at the next sync; the
    // next new process is served by the new authority.
    let base = "spiffe://example.org/through-rotation";
    entry_for_my_uid(&server, &agent, base, &[]);
    wait_for("the entry at the agent", READY_TIMEOUT, || {
        fetch_new_process(&agent, base).ok()
    });
    wait_pool_filled(&agent, base, 2);
    let authority = |state: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
            "authority",
            "x509",
            "show",
            "--output",
            "json",
        ]))
        .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|a| a["state"] == state)
            .and_then(|a| a["id"].as_str())
            .unwrap_or_else(|| panic!("no {state} authority: {v}"))
            .to_string()
    };
    let old = authority("active");
    server.cli_ok(&["authority", "x509", "prepare"]);
    server.cli_ok(&["authority", "x509", "activate"]);
    // Pooled under the old authority with the bundle of now (prepare and activate each
    // change the bundle; the pool refills after each).
    wait_for(
        "the pool refilled under the new bundle",
        READY_TIMEOUT,
        || {
            let n = pooled_lines(&agent, base);
            (n >= 2 && plain_log(&agent).contains("trust bundle changed")).then_some(())
        },
    );
    let pooled_before_taint: BTreeSet<String> =
        segments_logged(&agent, "svid_pooled").into_iter().collect();
    assert!(!pooled_before_taint.is_empty());
    // The taint changes the bundle; the agent must have taken it in before the new
    // process below asks. (A refill under the old authority in flight when the list
    // above was taken is pooled after it: until the agent knows of the taint, that
    // instance is as good as any it holds.)
    let bundle_updates = || plain_log(&agent).matches("trust bundle updated").count();
    let updates_before_taint = bundle_updates();
    server.cli_ok(&["authority", "x509", "taint", &old]);
    wait_for("the agent took in the taint", READY_TIMEOUT, || {
        (bundle_updates() > updates_before_taint).then_some(())
    });
    wait_for(
        "pooled SVIDs of the tainted authority dropped",
        READY_TIMEOUT,
        || {
            let dropped: BTreeSet<String> = segments_logged(&agent, "pooled_svid_dropped")
                .into_iter()
                .collect();
            // Every instance pooled before the taint is gone (signed by the old authority
            // or minted under an older bundle).
            pooled_before_taint
                .iter()
                .filter(|s| !segments_logged(&agent, "pooled_svid_assigned").contains(s))
                .all(|s| dropped.contains(s))
                .then_some(())
        },
    );
    // The next new process gets an SVID chaining to the new authority, not a pooled one
    // from before the taint.
    let dir = tempfile::tempdir().unwrap();
    let v = fetch_x509_as_process(&agent, "a new process served", dir.path());
    let svids = v["svids"].as_array().unwrap();
    let i = svids
        .iter()
        .position(|s| s["spiffe_id"].as_str().unwrap().starts_with(base))
        .unwrap();
    let id = svids[i]["spiffe_id"].as_str().unwrap();
    assert!(
        !pooled_before_taint.contains(&segment_of(id)),
        "served a pooled SVID from before the taint"
    );
    let pem = std::fs::read(dir.path().join(format!("svid.{i}.pem"))).unwrap();
    let leaf = pem::parse_many(pem).unwrap()[0].contents().to_vec();
    let signer = ztid_spiffe::svid::issuing_authority(&leaf, &bundle_roots(&server));
    assert!(
        signer.is_some(),
        "the new process's SVID chains to the bundle"
    );
    assert_ne!(
        signer.as_deref(),
        Some(old.as_str()),
        "the new process's SVID is signed by the tainted authority"
    );
}
