//! `authority`: the X.509 and JWT authorities (show, prepare, activate, taint, revoke).
//!
//! With several servers on one database, `show` lists every server's authorities and
//! which server owns each; `prepare` and `activate` act on the authorities of the
//! server the admin socket belongs to, and `taint` and `revoke` must go through the
//! owning server (another server refuses, naming the owner).

use clap::Subcommand;
use serde_json::{json, Value};
use ztid_proto::admin as pb;

use super::output::{expiry, shown, when};
use super::{status, Client, Output};

/// `authority` kinds.
#[derive(Debug, Subcommand)]
pub enum AuthorityCmd {
    /// X.509 CAs.
    #[command(subcommand)]
    X509(AuthorityAction),
    /// JWT signing keys.
    #[command(subcommand)]
    Jwt(AuthorityAction),
}

/// What to do with an authority.
#[derive(Debug, Subcommand)]
pub enum AuthorityAction {
    /// List every authority (of every server on a shared database), its state and its server.
    Show,
    /// Create a new authority and publish it in the bundle (it signs nothing yet).
    Prepare,
    /// Make the prepared authority the signer; the active one becomes old.
    Activate,
    /// Mark an old authority tainted: everything it signed is replaced within one sync.
    Taint {
        /// Authority id (X.509: hex serial; JWT: kid).
        authority_id: String,
    },
    /// Remove a tainted authority from every bundle and destroy its key, once nothing depends on it.
    Revoke {
        /// Authority id.
        authority_id: String,
    },
}

fn authority_json(a: &pb::Authority) -> Value {
    json!({
        "kind": a.kind, "id": a.id, "state": a.state, "tainted": a.tainted,
        "tainted_at": a.tainted_at, "not_before": a.not_before, "not_after": a.not_after,
        "key_id": a.key_id, "key_backend": a.key_backend, "public_key_sha256": a.public_key_sha256,
        "server_id": a.server_id,
    })
}

fn print_authority(a: &pb::Authority, out: Output) {
    match out {
        Output::Json => println!("{}", authority_json(a)),
        Output::Text => {
            println!("Authority ID  : {}", shown(&a.id));
            println!("Kind          : {}", shown(&a.kind));
            println!("Server        : {}", shown(&a.server_id));
            println!(
                "State         : {}{}",
                shown(&a.state),
                if a.tainted { " (tainted)" } else { "" }
            );
            if a.tainted && a.tainted_at != 0 {
                println!("Tainted at    : {}", when(a.tainted_at));
            }
            println!("Not before    : {}", when(a.not_before));
            println!("Not after     : {}", expiry(a.not_after));
            if a.key_backend.is_empty() {
                // Another server's authority: its key is in that server's key manager.
                println!("Key           : {}", shown(&a.key_id));
            } else {
                println!(
                    "Key           : {} ({})",
                    shown(&a.key_id),
                    shown(&a.key_backend)
                );
            }
            println!("Key SHA-256   : {}", shown(&a.public_key_sha256));
            println!();
        }
    }
}

/// Runs an `authority` verb.
pub(super) async fn run(
    client: &mut Client,
    cmd: &AuthorityCmd,
    out: Output,
) -> Result<(), String> {
    let (kind, action) = match cmd {
        AuthorityCmd::X509(a) => ("x509", a),
        AuthorityCmd::Jwt(a) => ("jwt", a),
    };
    let k = || pb::AuthorityKind { kind: kind.into() };
    let r = |id: &String| pb::AuthorityRef {
        kind: kind.into(),
        id: id.clone(),
    };
    let one = match action {
        AuthorityAction::Show => {
            let list = client
                .list_authorities(k())
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    Value::from(
                        list.authorities
                            .iter()
                            .map(authority_json)
                            .collect::<Vec<_>>()
                    )
                ),
                Output::Text => list
                    .authorities
                    .iter()
                    .for_each(|a| print_authority(a, out)),
            }
            return Ok(());
        }
        AuthorityAction::Prepare => client.prepare_authority(k()).await,
        AuthorityAction::Activate => client.activate_authority(k()).await,
        AuthorityAction::Taint { authority_id } => client.taint_authority(r(authority_id)).await,
        AuthorityAction::Revoke { authority_id } => client.revoke_authority(r(authority_id)).await,
    }
    .map_err(status)?
    .into_inner();
    print_authority(&one, out);
    Ok(())
}
