//! `grant`: what an identity may obtain at the token endpoint (issue 14,
//! docs/token-exchange.md "Grants"). Deny by default: no grant, no token.

use clap::Subcommand;
use serde_json::{json, Value};
use ztid_proto::admin as pb;

use super::output::{print_list, shown};
use super::{status, Client, Output};

/// `grant` verbs.
#[derive(Debug, Subcommand)]
pub enum GrantCmd {
    /// Let an identity (an entry's SPIFFE ID and its instances) obtain tokens for one
    /// audience with at most these scopes.
    Create {
        /// An entry's SPIFFE ID: covers it and every instance of it.
        #[arg(long)]
        spiffe_id: String,
        /// The audience (a resource URI or a logical name) tokens may name.
        #[arg(long)]
        audience: String,
        /// A scope tokens may carry (repeat for more; at least one).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Token lifetime in seconds (default: the [sts] default_ttl_seconds).
        #[arg(long, default_value_t = 0)]
        ttl: i64,
        /// Tokens per caller instance per minute, per server (default: no cap).
        #[arg(long, default_value_t = 0)]
        max_per_minute: u32,
        /// A selector (TYPE:VALUE) the caller's node must have proved (repeat for more;
        /// any makes the grant usable only over mTLS).
        #[arg(long = "node-selector")]
        node_selectors: Vec<String>,
        /// This identity may act for another (delegation, as the actor).
        #[arg(long)]
        may_delegate: bool,
    },
    /// List grants, ordered by id.
    List {
        /// Only the grants for this SPIFFE ID (exactly).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Show one grant.
    Show {
        /// The grant's id.
        grant_id: String,
    },
    /// Delete a grant: tokens it allowed stay valid until they expire.
    Delete {
        /// The grant's id.
        grant_id: String,
    },
}

fn grant_json(g: &pb::Grant) -> Value {
    json!({"id": g.id, "spiffe_id": g.spiffe_id, "audience": g.audience,
        "scopes": g.scopes, "ttl_seconds": g.ttl_seconds, "max_per_minute": g.max_per_minute,
        "node_selectors": g.node_selectors, "may_delegate": g.may_delegate,
        "created_at": g.created_at})
}

fn print_grant(g: &pb::Grant, out: Output) {
    match out {
        Output::Json => println!("{}", grant_json(g)),
        Output::Text => {
            println!("Grant ID      : {}", shown(&g.id));
            println!(
                "SPIFFE ID     : {} (and its instances)",
                shown(&g.spiffe_id)
            );
            println!("Audience      : {}", shown(&g.audience));
            for s in &g.scopes {
                println!("Scope         : {}", shown(s));
            }
            if g.ttl_seconds == 0 {
                println!("Token TTL     : the [sts] default");
            } else {
                println!("Token TTL     : {}", super::output::duration(g.ttl_seconds));
            }
            if g.max_per_minute == 0 {
                println!("Max per minute: no cap");
            } else {
                println!("Max per minute: {}", g.max_per_minute);
            }
            for s in &g.node_selectors {
                println!("Node selector : {}", shown(s));
            }
            println!("May delegate  : {}", g.may_delegate);
            println!("Created at    : {}", super::output::when(g.created_at));
            println!();
        }
    }
}

/// Runs a `grant` verb.
pub(super) async fn run(client: &mut Client, cmd: &GrantCmd, out: Output) -> Result<(), String> {
    match cmd {
        GrantCmd::Create {
            spiffe_id,
            audience,
            scopes,
            ttl,
            max_per_minute,
            node_selectors,
            may_delegate,
        } => {
            let g = client
                .create_grant(pb::Grant {
                    spiffe_id: spiffe_id.clone(),
                    audience: audience.clone(),
                    scopes: scopes.clone(),
                    ttl_seconds: *ttl,
                    max_per_minute: *max_per_minute,
                    node_selectors: node_selectors.clone(),
                    may_delegate: *may_delegate,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            if out == Output::Text {
                println!("Created grant {}", shown(&g.id));
            }
            print_grant(&g, out);
        }
        GrantCmd::List { spiffe_id } => {
            let r = client
                .list_grants(pb::ListGrantsRequest {
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_list(&r.grants, "grants", grant_json, print_grant, out);
        }
        GrantCmd::Show { grant_id } => {
            let g = client
                .get_grant(pb::GrantRef {
                    id: grant_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_grant(&g, out);
        }
        GrantCmd::Delete { grant_id } => {
            let g = client
                .delete_grant(pb::GrantRef {
                    id: grant_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", grant_json(&g)),
                Output::Text => println!(
                    "Deleted grant {} ({} for {})",
                    shown(&g.id),
                    shown(&g.spiffe_id),
                    shown(&g.audience)
                ),
            }
        }
    }
    Ok(())
}
