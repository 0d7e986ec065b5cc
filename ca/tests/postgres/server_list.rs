//! `ztid-server server list` (issue 13): the servers sharing the database, each with
//! its authorities and their newest expiry, from the answer of one server's admin API
//! (served here in-process on a Unix socket, the CLI run as the binary against it).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ztid_ca::authority::Kind;
use ztid_ca::core::CaCore;

use crate::{Cluster, DEADLINE};

/// Serves `core`'s admin API on `socket` (no authorization layer: the test is the
/// socket's only user).
fn serve_admin(core: &Arc<CaCore>, socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let service = ztid_proto::admin::admin_server::AdminServer::new(
        ztid_ca::api::admin::AdminApi::new(core.clone()),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
}

async fn server_list(socket: &Path, json: bool) -> String {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ztid-server"));
        cmd.arg("--admin-socket").arg(&socket);
        if json {
            cmd.args(["--output", "json"]);
        }
        let out = cmd.args(["server", "list"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

fn ids(core: &CaCore, kind: Kind) -> Vec<String> {
    core.list_authorities(kind)
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect()
}

fn newest_expiry(core: &CaCore) -> i64 {
    [Kind::X509, Kind::Jwt]
        .into_iter()
        .flat_map(|k| core.list_authorities(k).unwrap())
        .map(|a| a.not_after)
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_list_names_every_server_of_the_database() {
    let cluster = Cluster::new();
    let a = cluster.open("a");
    let b = cluster.open("b");
    let socket = cluster.dir.path().join("b-admin.sock");
    serve_admin(&b, &socket);

    let text = server_list(&socket, false).await;
    assert!(text.starts_with("Found 2 servers\n"), "{text}");
    assert!(
        text.contains(&format!(
            "Server ID          : {} (this server)\n",
            b.server_id()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("Server ID          : {}\n", a.server_id())),
        "{text}"
    );

    // A prepares a second X.509 authority: the list through B shows it once B has
    // read A's new state (ListAuthorities reads the cluster afresh).
    a.prepare_authority(Kind::X509, "test").unwrap();
    let end = Instant::now() + DEADLINE;
    let servers = loop {
        let v: Value = serde_json::from_str(&server_list(&socket, true).await).unwrap();
        let servers = v.as_array().unwrap().clone();
        let a_x509 = servers
            .iter()
            .find(|s| s["server_id"] == a.server_id())
            .map(|s| s["x509_authorities"].as_array().unwrap().len());
        if a_x509 == Some(2) {
            break servers;
        }
        assert!(Instant::now() < end, "A's prepared authority never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(servers.len(), 2, "{servers:?}");
    let mut expected = [(&a, false), (&b, true)];
    expected.sort_by_key(|(c, _)| c.server_id().to_string());
    for (s, (core, this)) in servers.iter().zip(expected) {
        assert_eq!(s["server_id"], core.server_id());
        assert_eq!(s["this_server"], this);
        let strings = |k: &str| -> Vec<String> {
            s[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(strings("x509_authorities"), ids(core, Kind::X509));
        assert_eq!(strings("jwt_authorities"), ids(core, Kind::Jwt));
        assert_eq!(
            s["active_x509"],
            core.authorities.x509().record().id.as_str()
        );
        assert_eq!(s["active_jwt"], core.authorities.jwt().record().id.as_str());
        assert_eq!(s["newest_expiry"], newest_expiry(core));
    }
}
