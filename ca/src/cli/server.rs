//! `server list`: the servers sharing this server's database, as its authorities show
//! them. Every server keeps its own CA state (its X.509 and JWT authorities) in the
//! database under its server id, and `ListAuthorities` answers every server's from a
//! fresh read, each with its owner: grouped by owner, that is the list of servers,
//! including one that has stopped (its authorities stay in every bundle until they
//! expire or are revoked, so the newest expiry says how long it still matters).
//! On sled there is one server.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Serialize;
use serde_json::json;
use ztid_proto::admin as pb;

use super::output::{expiry, shown, shown_string, when};
use super::{status, Client, Output};

/// `server` verbs.
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// The servers sharing the database: id, authorities, newest authority expiry.
    List,
    /// Retire a server that is gone for good (refused while it runs): its authorities
    /// are tainted, so agents and workloads move off what it signed, and it may never
    /// sign again; revoke them (`authority revoke`) through any server once unused.
    Retire {
        /// Its id, as `server list` shows it.
        server_id: String,
    },
}

/// One server, as its authorities show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerSummary {
    /// Its id (`DATA_DIR/server-id`; `local` on sled).
    pub server_id: String,
    /// Whether it is the server that answered (the only one whose key backend the
    /// answer names).
    pub this_server: bool,
    /// Its X.509 authorities (prepared, active, old), by id.
    pub x509_authorities: Vec<String>,
    /// Its JWT authorities, by kid.
    pub jwt_authorities: Vec<String>,
    /// Its active X.509 authority, if any.
    pub active_x509: Option<String>,
    /// Its active JWT authority, if any.
    pub active_jwt: Option<String>,
    /// The latest `not_after` of its authorities (Unix seconds).
    pub newest_expiry: i64,
    /// When it was retired (Unix seconds), if it was.
    pub retired_at: Option<i64>,
}

/// Groups `authorities` (both kinds, as `ListAuthorities` answers them) by server,
/// ordered by server id.
pub fn summarize_servers(authorities: &[pb::Authority]) -> Vec<ServerSummary> {
    let mut by_server: BTreeMap<&str, ServerSummary> = BTreeMap::new();
    for a in authorities {
        let s = by_server
            .entry(&a.server_id)
            .or_insert_with(|| ServerSummary {
                server_id: a.server_id.clone(),
                this_server: false,
                x509_authorities: Vec::new(),
                jwt_authorities: Vec::new(),
                active_x509: None,
                active_jwt: None,
                newest_expiry: i64::MIN,
                retired_at: None,
            });
        if a.server_retired_at != 0 {
            s.retired_at = Some(a.server_retired_at);
        }
        // Only this server's own key backend is known to it.
        s.this_server |= !a.key_backend.is_empty();
        s.newest_expiry = s.newest_expiry.max(a.not_after);
        let active = a.state == "active";
        let (list, slot) = if a.kind == "jwt" {
            (&mut s.jwt_authorities, &mut s.active_jwt)
        } else {
            (&mut s.x509_authorities, &mut s.active_x509)
        };
        list.push(a.id.clone());
        if active {
            *slot = Some(a.id.clone());
        }
    }
    by_server.into_values().collect()
}

/// Every server's authorities of both kinds, through `client`.
pub(super) async fn list_servers(client: &mut Client) -> Result<Vec<ServerSummary>, String> {
    let mut all = Vec::new();
    for kind in ["x509", "jwt"] {
        let list = client
            .list_authorities(pb::AuthorityKind { kind: kind.into() })
            .await
            .map_err(status)?
            .into_inner();
        all.extend(list.authorities);
    }
    Ok(summarize_servers(&all))
}

fn print_server(s: &ServerSummary) {
    let none = || "none".to_string();
    println!(
        "Server ID          : {}{}",
        shown(&s.server_id),
        if s.this_server { " (this server)" } else { "" }
    );
    if let Some(at) = s.retired_at {
        println!("Retired at         : {}", when(at));
    }
    println!(
        "X.509 authorities  : {} (active {})",
        s.x509_authorities.len(),
        s.active_x509.as_deref().map_or_else(none, shown_string)
    );
    println!(
        "JWT authorities    : {} (active {})",
        s.jwt_authorities.len(),
        s.active_jwt.as_deref().map_or_else(none, shown_string)
    );
    if s.newest_expiry == i64::MIN {
        println!("Newest expiry      : none");
    } else {
        println!("Newest expiry      : {}", expiry(s.newest_expiry));
    }
    println!();
}

/// Runs a `server` verb.
pub(super) async fn run(client: &mut Client, cmd: &ServerCmd, out: Output) -> Result<(), String> {
    match cmd {
        ServerCmd::List => {
            let servers = list_servers(client).await?;
            match out {
                Output::Json => println!("{}", json!(servers)),
                Output::Text => {
                    println!("Found {} servers", servers.len());
                    servers.iter().for_each(print_server);
                }
            }
            Ok(())
        }
        ServerCmd::Retire { server_id } => {
            let list = client
                .retire_server(pb::ServerRef {
                    server_id: server_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .authorities;
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"server_id": server_id, "tainted":
                    list.iter().map(|a| json!({"kind": a.kind, "id": a.id})).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    println!(
                        "Retired server {}; its authorities are tainted:",
                        shown(server_id)
                    );
                    for a in &list {
                        println!(
                            "  {} {} (until {})",
                            shown(&a.kind),
                            shown(&a.id),
                            expiry(a.not_after)
                        );
                    }
                    println!("Revoke each with `authority revoke` once no agent uses it.");
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(server: &str, kind: &str, id: &str, state: &str, not_after: i64) -> pb::Authority {
        pb::Authority {
            kind: kind.into(),
            id: id.into(),
            state: state.into(),
            not_after,
            server_id: server.into(),
            key_backend: if server == "b" {
                "software".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    #[test]
    fn authorities_are_grouped_by_server_with_the_newest_expiry() {
        let list = [
            authority("b", "x509", "b1", "active", 300),
            authority("a", "x509", "a1", "old", 100),
            authority("a", "x509", "a2", "active", 400),
            authority("a", "jwt", "ka", "active", 200),
            authority("b", "jwt", "kb", "prepared", 500),
        ];
        let s = summarize_servers(&list);
        assert_eq!(
            s,
            vec![
                ServerSummary {
                    server_id: "a".into(),
                    this_server: false,
                    x509_authorities: vec!["a1".into(), "a2".into()],
                    jwt_authorities: vec!["ka".into()],
                    active_x509: Some("a2".into()),
                    active_jwt: Some("ka".into()),
                    newest_expiry: 400,
                    retired_at: None,
                },
                ServerSummary {
                    server_id: "b".into(),
                    this_server: true,
                    x509_authorities: vec!["b1".into()],
                    jwt_authorities: vec!["kb".into()],
                    active_x509: Some("b1".into()),
                    active_jwt: None,
                    newest_expiry: 500,
                    retired_at: None,
                },
            ]
        );
        assert!(summarize_servers(&[]).is_empty());
    }
}
