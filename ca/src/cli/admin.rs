//! `admin credential`: admin identities for the remote admin API, issued only on the
//! admin socket ([`super::credential`]).

use std::path::PathBuf;

use clap::Subcommand;

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
}

/// Runs an `admin` verb.
pub(super) async fn run(client: &mut Client, cmd: &AdminCmd, out: Output) -> Result<(), String> {
    match cmd {
        AdminCmd::Credential(AdminCredentialCmd::Issue { name, write, ttl }) => {
            super::credential::issue(client, name, *ttl, write, out).await?;
        }
    }
    Ok(())
}
