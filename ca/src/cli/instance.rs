//! `instance`: the kill switch (issue 14, docs/token-exchange.md "Revocation: the kill
//! switch"). A revocation is stored (every server sees it) and kept until every
//! credential issued before it has expired.

use clap::{ArgGroup, Subcommand};
use serde_json::{json, Value};
use ztid_proto::admin as pb;

use super::output::{print_list, shown};
use super::{status, Client, Output};

/// `instance` verbs.
#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Revoke one instance (SPIFFE_ID), every instance of an entry issued before now
    /// (--entry), or everything issued through a node before now, banning the node
    /// (--node).
    #[command(group(ArgGroup::new("what").required(true).args(["spiffe_id", "entry", "node"])))]
    Revoke {
        /// The instance's SPIFFE ID.
        spiffe_id: Option<String>,
        /// An entry ID: every instance of it.
        #[arg(long)]
        entry: Option<String>,
        /// An agent's SPIFFE ID: everything issued through it; the agent is banned.
        #[arg(long)]
        node: Option<String>,
        /// Why (kept with the revocation and in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revocations stored (until they expire and are pruned).
    List,
}

fn revocation_json(r: &pb::Revocation) -> Value {
    json!({"kind": r.kind, "target": r.target, "spiffe_id": r.spiffe_id,
        "revoked_at": r.revoked_at, "expires_at": r.expires_at, "reason": r.reason})
}

pub(super) fn print_revocation(r: &pb::Revocation, out: Output) {
    match out {
        Output::Json => println!("{}", revocation_json(r)),
        Output::Text => {
            println!("Kind          : {}", shown(&r.kind));
            println!("Target        : {}", shown(&r.target));
            if !r.spiffe_id.is_empty() && r.spiffe_id != r.target {
                println!("SPIFFE ID     : {}", shown(&r.spiffe_id));
            }
            println!("Revoked at    : {}", super::output::when(r.revoked_at));
            println!("Kept until    : {}", super::output::expiry(r.expires_at));
            if !r.reason.is_empty() {
                println!("Reason        : {}", shown(&r.reason));
            }
            println!();
        }
    }
}

/// Runs an `instance` verb.
pub(super) async fn run(client: &mut Client, cmd: &InstanceCmd, out: Output) -> Result<(), String> {
    match cmd {
        InstanceCmd::Revoke {
            spiffe_id,
            entry,
            node,
            reason,
        } => {
            let (kind, target) = match (spiffe_id, entry, node) {
                (Some(id), None, None) => ("instance", id),
                (None, Some(id), None) => ("entry", id),
                (None, None, Some(id)) => ("node", id),
                _ => return Err("name exactly one of SPIFFE_ID, --entry, --node".into()),
            };
            let r = client
                .revoke_instance(pb::Revocation {
                    kind: kind.into(),
                    target: target.clone(),
                    reason: reason.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if out == Output::Text {
                match r.kind.as_str() {
                    "entry" => println!(
                        "Revoked every instance of entry {} ({}) issued before {}",
                        shown(&r.target),
                        shown(&r.spiffe_id),
                        super::output::rfc3339(r.revoked_at)
                    ),
                    "node" => println!(
                        "Revoked everything issued through {} before {}; the agent is banned",
                        shown(&r.target),
                        super::output::rfc3339(r.revoked_at)
                    ),
                    _ => println!("Revoked {}", shown(&r.target)),
                }
            }
            print_revocation(&r, out);
        }
        InstanceCmd::List => {
            let r = client
                .list_revocations(pb::ListRevocationsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print_list(
                &r.revocations,
                "revocations",
                revocation_json,
                print_revocation,
                out,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    use super::InstanceCmd;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ztid-server").chain(args.iter().copied()))
    }

    #[test]
    fn revoke_names_exactly_one_target() {
        let cli = parse(&["instance", "revoke", "spiffe://td/app/1", "--reason", "why"]).unwrap();
        let Command::Instance(InstanceCmd::Revoke {
            spiffe_id, reason, ..
        }) = cli.command
        else {
            panic!("not instance revoke");
        };
        assert_eq!(spiffe_id.as_deref(), Some("spiffe://td/app/1"));
        assert_eq!(reason, "why");
        parse(&["instance", "revoke", "--entry", "e1"]).unwrap();
        parse(&["instance", "revoke", "--node", "spiffe://td/ztid/agent/x/n"]).unwrap();
        assert!(parse(&["instance", "revoke"]).is_err());
        assert!(parse(&["instance", "revoke", "spiffe://td/a", "--entry", "e1"]).is_err());
        assert!(parse(&["instance", "revoke", "--entry", "e1", "--node", "n"]).is_err());
        parse(&["instance", "list"]).unwrap();
        let cli = parse(&["admin", "credential", "revoke", "--name", "alice"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(crate::cli::AdminCmd::Credential(
                crate::cli::AdminCredentialCmd::Revoke { .. }
            ))
        ));
        assert!(parse(&["admin", "credential", "revoke"]).is_err());
    }

    #[test]
    fn grant_create_takes_repeated_scopes_and_selectors() {
        let cli = parse(&[
            "grant",
            "create",
            "--spiffe-id",
            "spiffe://td/app",
            "--audience",
            "https://mcp",
            "--scope",
            "a",
            "--scope",
            "b",
            "--ttl",
            "60",
            "--max-per-minute",
            "5",
            "--node-selector",
            "tpm:x",
            "--node-selector",
            "k:v",
            "--may-delegate",
        ])
        .unwrap();
        let Command::Grant(crate::cli::GrantCmd::Create {
            scopes,
            node_selectors,
            ttl,
            max_per_minute,
            may_delegate,
            ..
        }) = cli.command
        else {
            panic!("not grant create");
        };
        assert_eq!(scopes, ["a", "b"]);
        assert_eq!(node_selectors, ["tpm:x", "k:v"]);
        assert_eq!((ttl, max_per_minute, may_delegate), (60, 5, true));
        // At least one scope.
        assert!(parse(&["grant", "create", "--spiffe-id", "x", "--audience", "y"]).is_err());
        parse(&["grant", "list", "--spiffe-id", "spiffe://td/app"]).unwrap();
        parse(&["grant", "show", "g1"]).unwrap();
        parse(&["grant", "delete", "g1"]).unwrap();
    }
}
