//! `entry`: registration entries: create, update, list (every page), show, delete,
//! count, and bulk create and delete from a SPIRE `-data` JSON file (`data.rs`).

mod data;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use ztid_proto::admin as pb;
use ztid_proto::node as npb;

use super::output::{duration, print_list, shown, when};
use super::{status, Client, Output};

/// The flags of an entry, for `create` and `update`.
#[derive(Debug, Args)]
pub struct EntryArgs {
    /// SPIFFE ID (per-instance entries: the prefix of every instance's ID).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Agent or node alias ID (optional with --node).
    #[arg(long, default_value = "")]
    parent_id: String,
    /// TYPE:KEY:VALUE, repeatable.
    #[arg(long = "selector")]
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
    /// DNS SAN, repeatable: a lowercase host name; not localhost, an IP address, a
    /// wildcard, nor a name of the server's own certificate.
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Federated trust domain, repeatable.
    #[arg(long = "federates-with")]
    federates_with: Vec<String>,
    /// A node alias.
    #[arg(long)]
    node: bool,
    /// Hint passed to workloads (no control characters).
    #[arg(long, default_value = "")]
    hint: String,
}

impl EntryArgs {
    /// Whether no flag was given.
    fn is_empty(&self) -> bool {
        self.spiffe_id.is_none()
            && self.parent_id.is_empty()
            && self.selectors.is_empty()
            && self.x509_ttl == 0
            && self.jwt_ttl == 0
            && !self.shared
            && self.dns_names.is_empty()
            && self.federates_with.is_empty()
            && !self.node
            && self.hint.is_empty()
    }

    /// The entry these flags describe (`--spiffe-id` and one `--selector` at least).
    fn to_entry(&self, id: &str) -> Result<npb::Entry, String> {
        let spiffe_id = self
            .spiffe_id
            .clone()
            .ok_or("--spiffe-id is required (or --data FILE to create many)")?;
        if self.selectors.is_empty() {
            return Err("at least one --selector TYPE:VALUE is required".into());
        }
        let mut sels = Vec::new();
        for s in &self.selectors {
            let (t, v) = s
                .split_once(':')
                .ok_or_else(|| format!("selector {s:?} is not TYPE:VALUE"))?;
            sels.push(npb::Selector {
                r#type: t.into(),
                value: v.into(),
            });
        }
        Ok(npb::Entry {
            id: id.to_string(),
            spiffe_id,
            parent_id: self.parent_id.clone(),
            selectors: sels,
            x509_ttl_seconds: self.x509_ttl,
            jwt_ttl_seconds: self.jwt_ttl,
            shared: self.shared,
            dns_names: self.dns_names.clone(),
            federates_with: self.federates_with.clone(),
            node: self.node,
            hint: self.hint.clone(),
            ..Default::default()
        })
    }
}

/// `entry` verbs.
#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry; prints its id. With --data FILE, create every entry of a SPIRE
    /// `-data` JSON file ({"entries": [...]}), each answered on its own.
    Create {
        /// The entry.
        #[command(flatten)]
        entry: EntryArgs,
        /// SPIRE-shaped JSON file of entries to create (instead of the flags).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Replace an entry: the same flags as create, every one of them (a flag left out
    /// takes its default). The entry keeps its id.
    Update {
        /// Entry id.
        entry_id: String,
        /// The entry's new content.
        #[command(flatten)]
        entry: EntryArgs,
    },
    /// List entries (every page).
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
    /// Delete one entry, or with --data FILE every id of a JSON file ({"ids": [...]}).
    Delete {
        /// Entry id.
        #[arg(required_unless_present = "data", conflicts_with = "data")]
        entry_id: Option<String>,
        /// JSON file of entry ids to delete.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// How many entries there are.
    Count,
}

/// Entries asked for per `ListEntries` page (the server's most).
const LIST_PAGE_SIZE: u32 = 1000;

fn entry_json(e: &npb::Entry) -> Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_ttl": e.x509_ttl_seconds, "jwt_ttl": e.jwt_ttl_seconds, "shared": e.shared,
        "dns_names": e.dns_names, "federates_with": e.federates_with, "node": e.node,
        "hint": e.hint, "revision": e.revision, "created_at": e.created_at,
    })
}

/// An entry for people, one `Field : value` line each, SPIRE's layout.
fn entry_text(e: &npb::Entry) -> String {
    use std::fmt::Write;
    let ttl = |seconds: i64| {
        if seconds == 0 {
            "default".to_string()
        } else {
            duration(seconds)
        }
    };
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(t, "Entry ID      : {}", shown(&e.id));
    let _ = writeln!(
        t,
        "SPIFFE ID     : {}{}",
        shown(&e.spiffe_id),
        if e.shared || e.node {
            ""
        } else {
            "/<instance>"
        }
    );
    let _ = writeln!(t, "Parent ID     : {}", shown(&e.parent_id));
    let _ = writeln!(t, "Revision      : {}", e.revision);
    let _ = writeln!(t, "X509-SVID TTL : {}", ttl(e.x509_ttl_seconds));
    let _ = writeln!(t, "JWT-SVID TTL  : {}", ttl(e.jwt_ttl_seconds));
    for s in &e.selectors {
        let _ = writeln!(
            t,
            "Selector      : {}:{}",
            shown(&s.r#type),
            shown(&s.value)
        );
    }
    let kind = if e.node {
        "node alias"
    } else if e.shared {
        "shared"
    } else {
        "per-instance"
    };
    let _ = writeln!(t, "Kind          : {kind}");
    for d in &e.dns_names {
        let _ = writeln!(t, "DNS name      : {}", shown(d));
    }
    for f in &e.federates_with {
        let _ = writeln!(t, "Federates with: {}", shown(f));
    }
    if !e.hint.is_empty() {
        let _ = writeln!(t, "Hint          : {}", shown(&e.hint));
    }
    if e.created_at != 0 {
        let _ = writeln!(t, "Created at    : {}", when(e.created_at));
    }
    t
}

fn print_entry(e: &npb::Entry, out: Output) {
    match out {
        Output::Json => println!("{}", entry_json(e)),
        Output::Text => println!("{}", entry_text(e)),
    }
}

/// Runs an `entry` verb.
pub(super) async fn run(client: &mut Client, cmd: &EntryCmd, out: Output) -> Result<(), String> {
    match cmd {
        EntryCmd::Create {
            entry,
            data: Some(path),
        } => {
            if !entry.is_empty() {
                return Err("--data FILE cannot be combined with entry flags".into());
            }
            return data::create(client, path, out).await;
        }
        EntryCmd::Create { entry, data: None } => {
            let e = client
                .create_entry(entry.to_entry("")?)
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => {
                    // stdout stays the id alone, for scripts (`ID=$(ztid-server entry
                    // create ...)`); people read what was created on stderr.
                    println!("{}", shown(&e.id));
                    eprint!("Created entry:\n{}", entry_text(&e));
                }
            }
        }
        EntryCmd::Update { entry_id, entry } => {
            let e = client
                .update_entry(entry.to_entry(entry_id)?)
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => println!("Updated entry {}", shown(&e.id)),
            }
        }
        EntryCmd::List {
            spiffe_id,
            parent_id,
        } => {
            let mut entries = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = client
                    .list_entries(pb::ListEntriesRequest {
                        spiffe_id: spiffe_id.clone().unwrap_or_default(),
                        parent_id: parent_id.clone().unwrap_or_default(),
                        page_size: LIST_PAGE_SIZE,
                        page_token,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                entries.extend(r.entries);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            print_list(&entries, "entries", entry_json, print_entry, out);
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
        EntryCmd::Delete {
            data: Some(path), ..
        } => return data::delete(client, path, out).await,
        EntryCmd::Delete {
            entry_id,
            data: None,
        } => {
            let e = client
                .delete_entry(pb::EntryId {
                    id: entry_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", entry_json(&e)),
                Output::Text => println!("Deleted entry {}", shown(&e.id)),
            }
        }
        EntryCmd::Count => {
            let r = client
                .count_entries(pb::CountEntriesRequest::default())
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", json!({"count": r.count})),
                Output::Text => println!("{}", r.count),
            }
        }
    }
    Ok(())
}
