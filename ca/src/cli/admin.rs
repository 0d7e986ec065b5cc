//! `admin credential`: admin identities for the remote admin API, issued only on the
//! admin socket ([`super::credential`]).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use ztid_proto::admin as pb;

use super::{Client, Output};

/// `admin` verbs.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Admin credentials.
    #[command(subcommand)]
    Credential(AdminCredentialCmd),
}

/// `admin credential` verbs.
#[derive(Debug, Subcommand)]
pub enum AdminCredentialCmd {
    /// Issue an admin X509-SVID, spiffe://TD/ztid/admin/NAME, for the remote admin API:
    /// writes svid.pem, svid.key (owner-only) and bundle.pem into --write DIR. Bind it
    /// to roles in [remote_admin.roles]. Prints the SPIFFE ID.
    Issue {
        /// The admin's name (1 to 64 of a-z 0-9 . - _).
        #[arg(long)]
        name: String,
        /// Directory to write the files into (created owner-only).
        #[arg(long)]
        write: PathBuf,
        /// Lifetime in seconds (default: x509_svid_ttl_seconds).
        #[arg(long, default_value_t = 0)]
        ttl: i64,
    },
    /// Revoke every admin credential of spiffe://TD/ztid/admin/NAME issued so far (a
    /// stolen or lost one): the remote admin API refuses them on every server of the
    /// cluster within seconds. The admin keeps its roles; issue it a new credential.
    Revoke {
        /// The admin's name.
        #[arg(long)]
        name: String,
        /// Why (kept with the revocation and in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Runs an `admin` verb.
pub(super) async fn run(client: &mut Client, cmd: &AdminCmd, out: Output) -> Result<(), String> {
    match cmd {
        AdminCmd::Credential(AdminCredentialCmd::Issue { name, write, ttl }) => {
            super::credential::issue(client, name, *ttl, write, out).await?;
        }
        AdminCmd::Credential(AdminCredentialCmd::Revoke { name, reason }) => {
            let r = client
                .revoke_admin_credentials(pb::RevokeAdminCredentialsRequest {
                    name: name.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(super::status)?
                .into_inner();
            if out == Output::Text {
                println!(
                    "Revoked every admin credential of {} issued before {}; issue a new one with `ztid-server admin credential issue --name {name}`",
                    super::output::shown(&r.target),
                    super::output::rfc3339(r.revoked_at)
                );
            }
            super::instance::print_revocation(&r, out);
        }
    }
    Ok(())
}

/// Why the admin socket at `path` cannot be reached, and what to do, in one line:
/// `cannot reach the server's admin socket PATH: <cause>; <next step>`.
pub(super) fn unreachable_socket(path: &Path, err: &(dyn std::error::Error + 'static)) -> String {
    let shown = path.display();
    let head = format!("cannot reach the server's admin socket {shown}");
    let point_elsewhere =
        "or point ZTID_ADMIN_SOCKET (--admin-socket) at the socket of the server you run";
    let kind = io_kind(err);
    match kind {
        Some(std::io::ErrorKind::PermissionDenied) => {
            format!("{head}: permission denied: {}", not_yours(path))
        }
        Some(std::io::ErrorKind::NotFound) => format!(
            "{head}: no such socket: start the server (`ztid-server run --data-dir DIR` serves DIR/admin.sock) {point_elsewhere}"
        ),
        Some(std::io::ErrorKind::ConnectionRefused) => format!(
            "{head}: nothing listens on it (the server is not running): start it, {point_elsewhere}"
        ),
        _ => format!("{head}: {}", describe_chain(err)),
    }
}

/// The first I/O error kind in `err`'s chain.
pub(super) fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

/// `err` and its causes, `: `-joined (tonic's transport error alone says only
/// "transport error").
fn describe_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cur = e.source();
    }
    text
}

/// Who owns `path` (or the first directory above it this user may look into) and what
/// to do about it.
fn not_yours(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::getuid().as_raw();
    // The socket itself, else the nearest directory above it that can be examined: a
    // directory this user may not enter hides everything under it.
    let owned = std::iter::once(path)
        .chain(path.ancestors().skip(1))
        .find_map(|p| std::fs::metadata(p).ok().map(|m| (p, m)));
    let Some((what, meta)) = owned else {
        return format!("run as the user the server runs as, or point ZTID_ADMIN_SOCKET (--admin-socket) at a socket you may use (this is uid {me})");
    };
    let owner = meta.uid();
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {owner}"));
    let which = if what == path {
        "it".to_string()
    } else {
        format!("its directory {}", what.display())
    };
    format!(
        "{which} belongs to {name} (uid {owner}, mode {:04o}) and this is uid {me}: run as that user (`sudo -u {name} ztid-server ...`), or set ZTID_ADMIN_SOCKET (--admin-socket) to the socket of a server you run",
        meta.mode() & 0o7777
    )
}
