//! `token`: join tokens.

use clap::Subcommand;
use serde_json::json;
use ztid_proto::admin as pb;

use super::output::expiry;
use super::{status, Client, Output};

/// `token` verbs.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a single-use join token; prints the token alone.
    Generate {
        /// Lifetime in seconds (default from config, 600).
        #[arg(long, default_value_t = 0)]
        ttl: i64,
        /// Node alias the redeeming agent becomes a child of.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

/// Runs a `token` verb.
pub(super) async fn run(client: &mut Client, cmd: &TokenCmd, out: Output) -> Result<(), String> {
    match cmd {
        TokenCmd::Generate { ttl, spiffe_id } => {
            let r = client
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: *ttl,
                    alias_spiffe_id: spiffe_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => {
                    println!("{}", json!({"token": r.token, "expires_at": r.expires_at}))
                }
                Output::Text => {
                    // stdout stays the token alone, for scripts
                    // (`TOKEN=$(ztid-server token generate)`); people read the rest on
                    // stderr, which never repeats the secret.
                    println!("{}", r.token);
                    eprintln!("Created a single-use join token:");
                    eprintln!("Expires at    : {}", expiry(r.expires_at));
                    if let Some(alias) = spiffe_id {
                        eprintln!(
                            "Node alias    : {alias} (the redeeming agent becomes its child)"
                        );
                    }
                    eprintln!("Redeem it with `ztid-agent run --attestor join-token --join-token TOKEN` (or ZTID_JOIN_TOKEN).");
                }
            }
        }
    }
    Ok(())
}
