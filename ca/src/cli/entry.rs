//! `entry`: registration entries.

use clap::Subcommand;
use serde_json::{json, Value};
use ztid_proto::admin as pb;
use ztid_proto::node as npb;

use super::output::print_list;
use super::{status, Client, Output};

/// `entry` verbs.
#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry; prints its id.
    Create {
        /// SPIFFE ID (per-instance entries: the prefix of every instance's ID).
        #[arg(long)]
        spiffe_id: String,
        /// Agent or node alias ID (optional with --node).
        #[arg(long, default_value = "")]
        parent_id: String,
        /// TYPE:KEY:VALUE, repeatable.
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        /// X509-SVID TTL in seconds.
        #[arg(long, default_value_t = 0)]
        x509_ttl: i64,
        /// JWT-SVID TTL in seconds.
        #[arg(long, default_value_t = 0)]
        jwt_ttl: i64,
        /// One SVID per node for all matching processes.
        #[arg(long)]
        shared: bool,
        /// DNS SAN, repeatable.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Federated trust domain, repeatable.
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
        /// A node alias.
        #[arg(long)]
        node: bool,
        /// Hint passed to workloads.
        #[arg(long, default_value = "")]
        hint: String,
    },
    /// List entries.
    List {
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Only this parent.
        #[arg(long)]
        parent_id: Option<String>,
    },
    /// Show one entry.
    Show {
        /// Entry id.
        entry_id: String,
    },
    /// Delete one entry.
    Delete {
        /// Entry id.
        entry_id: String,
    },
}

fn entry_json(e: &npb::Entry) -> Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_ttl": e.x509_ttl_seconds, "jwt_ttl": e.jwt_ttl_seconds, "shared": e.shared,
        "dns_names": e.dns_names, "federates_with": e.federates_with, "node": e.node,
        "hint": e.hint, "revision": e.revision, "created_at": e.created_at,
    })
}

fn print_entry(e: &npb::Entry, out: Output) {
    match out {
        Output::Json => println!("{}", entry_json(e)),
        Output::Text => {
            println!("Entry ID      : {}", e.id);
            println!(
                "SPIFFE ID     : {}{}",
                e.spiffe_id,
                if e.shared || e.node {
                    ""
                } else {
                    "/<instance>"
                }
            );
            println!("Parent ID     : {}", e.parent_id);
            for s in &e.selectors {
                println!("Selector      : {}:{}", s.r#type, s.value);
            }
            println!(
                "X509-SVID TTL : {}",
                if e.x509_ttl_seconds == 0 {
                    "default".to_string()
                } else {
                    e.x509_ttl_seconds.to_string()
                }
            );
            println!(
                "JWT-SVID TTL  : {}",
                if e.jwt_ttl_seconds == 0 {
                    "default".to_string()
                } else {
                    e.jwt_ttl_seconds.to_string()
                }
            );
            println!(
                "Kind          : {}",
                if e.node {
                    "node alias"
                } else if e.shared {
                    "shared"
                } else {
                    "per-instance"
                }
            );
            for d in &e.dns_names {
                println!("DNS name      : {d}");
            }
            for f in &e.federates_with {
                println!("Federates with: {f}");
            }
            println!("Revision      : {}", e.revision);
            println!();
        }
    }
}

/// Runs an `entry` verb.
pub(super) async fn run(client: &mut Client, cmd: &EntryCmd, out: Output) -> Result<(), String> {
    match cmd {
        EntryCmd::Create {
            spiffe_id,
            parent_id,
            selectors,
            x509_ttl,
            jwt_ttl,
            shared,
            dns_names,
            federates_with,
            node,
            hint,
        } => {
            let mut sels = Vec::new();
            for s in selectors {
                let (t, v) = s
                    .split_once(':')
                    .ok_or_else(|| format!("selector {s:?} is not TYPE:VALUE"))?;
                sels.push(npb::Selector {
                    r#type: t.into(),
                    value: v.into(),
                });
            }
            let e = client
                .create_entry(npb::Entry {
                    spiffe_id: spiffe_id.clone(),
                    parent_id: parent_id.clone(),
                    selectors: sels,
                    x509_ttl_seconds: *x509_ttl,
                    jwt_ttl_seconds: *jwt_ttl,
                    shared: *shared,
                    dns_names: dns_names.clone(),
                    federates_with: federates_with.clone(),
                    node: *node,
                    hint: hint.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => println!("{}", e.id),
            }
        }
        EntryCmd::List {
            spiffe_id,
            parent_id,
        } => {
            let r = client
                .list_entries(pb::ListEntriesRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    parent_id: parent_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_list(&r.entries, "entries", entry_json, print_entry, out);
        }
        EntryCmd::Show { entry_id } => {
            let e = client
                .get_entry(pb::EntryId {
                    id: entry_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_entry(&e, out);
        }
        EntryCmd::Delete { entry_id } => {
            let e = client
                .delete_entry(pb::EntryId {
                    id: entry_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => println!("Deleted entry {}", e.id),
            }
        }
    }
    Ok(())
}
