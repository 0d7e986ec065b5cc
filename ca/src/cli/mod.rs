//! The `ztid-server` command line: `run`, and the operator verbs that talk to a
//! running server over its admin socket.
//!
//! This file holds the top-level parser and the dispatcher; each verb group's flags
//! and handler live in the file named after it, printing shared by all in [`output`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;
use ztid_proto::admin::admin_client::AdminClient;

use crate::config::ServerConfig;

mod admin;
mod agent;
mod audit;
mod authority;
mod bundle;
mod credential;
mod datastore;
mod docs;
mod entry;
mod evidence;
mod federation;
mod files;
mod grant;
mod health;
mod instance;
mod output;
mod run;
mod server;
mod token;

pub use admin::{AdminCmd, AdminCredentialCmd};
pub use agent::AgentCmd;
pub use audit::{
    audit_verb, audit_verify, verify_server, AuditCmd, AuditVerifyError, ServerAudit, StoreArgs,
};
pub use authority::{AuthorityAction, AuthorityCmd};
pub use bundle::{BundleCmd, BundleFormat};
pub use datastore::{DatastoreCmd, MigrateArgs};
pub use entry::{EntryArgs, EntryCmd};
pub use evidence::{EvidenceCmd, EvidenceVerifyArgs};
pub use federation::FederationCmd;
pub use grant::GrantCmd;
pub use health::HealthArgs;
pub use instance::InstanceCmd;
pub use output::Output;
pub use run::{run_config, RunArgs};
pub use server::{summarize_servers, ServerCmd, ServerSummary};
pub use token::TokenCmd;

/// ztid-server: the ztid workload identity authority.
#[derive(Debug, Parser)]
#[command(name = "ztid-server", version, about)]
pub struct Cli {
    /// Admin socket of the running server (admin verbs).
    #[arg(long, global = true, env = "ZTID_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    // Boxed: its flags make it far larger than the other verbs.
    Run(Box<RunArgs>),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// Attested agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Trust bundles.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Federation relationships with other trust domains.
    #[command(subcommand)]
    Federation(FederationCmd),
    /// Token-exchange grants: what an identity may obtain at the token endpoint.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// The kill switch: revoke an instance, an entry's instances or a node's.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Exit 0 if the server answers on its admin socket (`--wait S`: once it does).
    Healthcheck(HealthArgs),
    /// X.509 and JWT authorities: show, prepare, activate, taint, revoke.
    #[command(subcommand)]
    Authority(AuthorityCmd),
    /// The tamper-evident audit log (offline; no server needed).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Offline evidence checks (no server needed).
    #[command(subcommand)]
    Evidence(EvidenceCmd),
    /// Admin identities for the remote admin API (issued only on the admin socket).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Datastore maintenance (offline; no server needed): `migrate` from sled to
    /// PostgreSQL.
    #[command(subcommand)]
    Datastore(DatastoreCmd),
    /// The servers sharing the database (several servers on PostgreSQL).
    #[command(subcommand)]
    Server(ServerCmd),
    /// Print the shell completion script for SHELL (no server needed), e.g.
    /// `ztid-server completions bash > /usr/share/bash-completion/completions/ztid-server`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ztid-server.1 and one per verb) into DIR (no server needed).
    Man {
        /// Directory to write into (created if missing), e.g. /usr/share/man/man1.
        dir: PathBuf,
    },
}

/// The admin API client every admin verb uses.
type Client = AdminClient<Channel>;

/// A refusal from the server, as the operator sees it.
fn status(s: tonic::Status) -> String {
    s.message().to_string()
}

/// Runs an admin verb against the server.
pub async fn admin_verb(cli: &Cli) -> Result<(), String> {
    // Not an admin verb: it opens the datastores itself, with no server running.
    match &cli.command {
        Command::Datastore(cmd) => return datastore::run(cmd, cli.output),
        // Generated from the definitions above; no server either.
        Command::Completions { shell } => return docs::completions(*shell),
        Command::Man { dir } => return docs::man(dir),
        _ => {}
    }
    let path = cli
        .admin_socket
        .clone()
        .unwrap_or_else(|| ServerConfig::default().admin_socket_path());
    // It connects itself: with --wait, again and again.
    if let Command::Healthcheck(args) = &cli.command {
        return health::run(&path, args, cli.output).await;
    }
    let channel = ztid_proto::transport::unix_channel(&path)
        .await
        .map_err(|e| admin::unreachable_socket(&path, &e))?;
    let mut client = AdminClient::new(channel);
    let out = cli.output;
    match &cli.command {
        Command::Run(_)
        | Command::Evidence(_)
        | Command::Audit(_)
        | Command::Datastore(_)
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Healthcheck(_) => {
            unreachable!("not an admin verb, or handled above")
        }
        Command::Admin(cmd) => admin::run(&mut client, cmd, out).await,
        Command::Token(cmd) => token::run(&mut client, cmd, out).await,
        Command::Entry(cmd) => entry::run(&mut client, cmd, out).await,
        Command::Agent(cmd) => agent::run(&mut client, cmd, out).await,
        Command::Authority(cmd) => authority::run(&mut client, cmd, out).await,
        Command::Bundle(cmd) => bundle::run(&mut client, cmd, out).await,
        Command::Federation(cmd) => federation::run(&mut client, cmd, out).await,
        Command::Grant(cmd) => grant::run(&mut client, cmd, out).await,
        Command::Instance(cmd) => instance::run(&mut client, cmd, out).await,
        Command::Server(cmd) => server::run(&mut client, cmd, out).await,
    }
}
