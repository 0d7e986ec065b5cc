//! What less-trusted parties can put in front of an operator: values a narrower admin
//! (or anything that writes entries) stored, shown by `ztid-server entry list`. A control
//! character is refused where it has no use (an entry's hint and selectors), changing
//! nothing; what may be stored (bidi and zero-width characters, part of real labels in
//! other scripts) is shown escaped in text output, while `--output json` keeps it exact.

use tonic::transport::Channel;
use tonic::Code;
use ztid_proto::admin::admin_client::AdminClient;
use ztid_proto::node as pb;
use ztid_tests::*;

const TD: &str = "example.org";
/// A parent that is a node alias named before any agent joins it (accepted as a parent).
const PARENT: &str = "spiffe://example.org/nodes/edge";

async fn admin_socket(server: &Server) -> AdminClient<Channel> {
    AdminClient::new(
        ztid_proto::transport::unix_channel(server.admin_socket())
            .await
            .expect("admin socket"),
    )
}

fn entry(hint: &str, kind: &str, value: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: "spiffe://example.org/w".into(),
        parent_id: PARENT.into(),
        selectors: vec![pb::Selector {
            r#type: kind.into(),
            value: value.into(),
        }],
        hint: hint.into(),
        ..Default::default()
    }
}

/// Terminal controls, line forgery and bidi characters that must never reach a
/// terminal raw.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| {
            (c.is_control() && *c != '\n') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200b}'..='\u{200f}')
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entry_values_are_refused_or_listed_escaped() {
    let server = Server::start(TD);
    let mut admin = admin_socket(&server).await;

    // OSC 52 (write the reader's clipboard), CR overwriting, a forged line, C1 CSI.
    let osc52 = "ok\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07";
    for (hint, kind, value, what) in [
        (osc52, "unix", "uid:1", "hint"),
        (
            "",
            "unix",
            "path:/usr/bin/app\rSelector      : unix:uid:0",
            "selector",
        ),
        (
            "",
            "container",
            "label:app:x\nSelector      : unix:uid:0",
            "selector",
        ),
        ("", "container", "image:repo\u{9b}2J", "selector"),
    ] {
        let r = admin.create_entry(entry(hint, kind, value)).await;
        match r {
            Err(s) => {
                assert_eq!(
                    s.code(),
                    Code::InvalidArgument,
                    "{what} {value:?}: {}",
                    s.message()
                );
                assert!(
                    s.message()
                        .starts_with(&format!("{what} holds a control character (")),
                    "{what} {value:?}: {}",
                    s.message()
                );
                assert!(raw_controls(s.message()).is_empty(), "{:?}", s.message());
            }
            Ok(e) => panic!("{what} {value:?} was stored: {e:?}"),
        }
    }
    // The CLI says the same in one escaped line, and nothing was stored.
    let r = server.cli(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        PARENT,
        "--selector",
        "unix:uid:1",
        "--hint",
        osc52,
    ]);
    assert!(!r.ok, "stored: {}", r.stdout);
    assert!(
        r.stderr.contains(r"hint holds a control character (\x1b)"),
        "{:?}",
        r.stderr
    );
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{:?}", r.stderr);
    assert!(raw_controls(&r.stderr).is_empty(), "{:?}", r.stderr);
    assert_eq!(server.cli_ok(&["entry", "list", "--output", "json"]), "[]");

    // Bidi and zero-width characters may be part of a real label: stored as given.
    let hint = "invoice\u{202e}fdp.exe";
    let label = "label:owner:\u{2066}admin\u{2069}\u{200b}";
    let id = server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/w",
        "--parent-id",
        PARENT,
        "--selector",
        &format!("container:{label}"),
        "--hint",
        hint,
    ]);
    let text = server.cli_ok(&["entry", "list"]);
    assert!(
        raw_controls(&text).is_empty(),
        "raw in the listing: {text:?}"
    );
    assert!(
        text.contains(r"Hint          : invoice\u{202e}fdp.exe"),
        "{text}"
    );
    assert!(
        text.contains(r"Selector      : container:label:owner:\u{2066}admin\u{2069}\u{200b}"),
        "{text}"
    );
    let shown = server.cli_ok(&["entry", "show", &id]);
    assert!(raw_controls(&shown).is_empty(), "{shown:?}");
    // JSON stays JSON, and exact.
    let json: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "list", "--output", "json"]))
            .expect("entry list JSON");
    assert_eq!(json[0]["hint"], hint);
    assert_eq!(json[0]["selectors"][0], format!("container:{label}"));
}
