//! `datastore migrate`: moves a server's state from its sled data directory into an
//! empty PostgreSQL database (offline: the sled server must be stopped, since sled
//! lets one process open a directory).

use std::path::PathBuf;

use super::Output;
use crate::config::{DatastoreKind, ServerConfig};
use crate::core::store::open_datastore;
use crate::datastore::{migrate, SledStore};
use clap::{Args, Subcommand};

/// `datastore` verbs.
#[derive(Debug, Subcommand)]
pub enum DatastoreCmd {
    /// Copy a stopped server's sled datastore (entries, agents, join tokens, federation,
    /// its authorities, its audit anchor) into an empty PostgreSQL database. Refuses a
    /// non-empty target and writes nothing to it then; never writes the source.
    Migrate(MigrateArgs),
}

/// Flags of `datastore migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The source: `sled:DIR`, DIR being the server's data directory (`run --data-dir`).
    #[arg(long, value_name = "sled:DIR")]
    pub from: String,
    /// The target kind: `postgres` (reached as `run --datastore postgres` would be,
    /// from `--datastore-url` or the config's `[datastore]`).
    #[arg(long, value_name = "postgres")]
    pub to: String,
    /// TOML config file of the server that will run on the target (its `[datastore]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `postgres://USER@HOST:PORT/DB?...`, without a password (the password comes from
    /// `[datastore] password_file` or `ZTID_DATASTORE_PASSWORD`).
    #[arg(long, value_name = "URL")]
    pub datastore_url: Option<String>,
}

/// Runs a `datastore` verb.
pub(super) fn run(cmd: &DatastoreCmd, out: Output) -> Result<(), String> {
    match cmd {
        DatastoreCmd::Migrate(args) => migrate_verb(args, out),
    }
}

fn migrate_verb(args: &MigrateArgs, out: Output) -> Result<(), String> {
    let data_dir = match args.from.split_once(':') {
        Some(("sled", dir)) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            return Err(format!(
                "--from {}: expected sled:DIR (the sled server's data directory)",
                args.from
            ))
        }
    };
    if args.to != "postgres" {
        return Err(format!(
            "--to {}: the only target is postgres (the database from --datastore-url or [datastore] url)",
            args.to
        ));
    }
    let sled_dir = data_dir.join("datastore");
    if !sled_dir.is_dir() {
        return Err(format!(
            "{} holds no sled datastore (no {}): --from sled:DIR names a server's data directory",
            data_dir.display(),
            sled_dir.display()
        ));
    }
    // The target as `run --datastore postgres --data-dir DIR` opens it: the same URL
    // and password rules, and the server id of DIR (`DIR/server-id`, created if the sled
    // server never had one), so the server started on DIR afterwards owns the
    // authorities and audit anchor copied here.
    let mut config = match &args.config {
        Some(p) => ServerConfig::from_file(p).map_err(|e| e.to_string())?,
        None => ServerConfig::default(),
    };
    config.data_dir = data_dir.clone();
    config.datastore.kind = DatastoreKind::Postgres;
    if let Some(u) = &args.datastore_url {
        config.datastore.url = Some(u.clone());
    }
    config.datastore.validate().map_err(|e| e.to_string())?;
    let source = SledStore::open(&sled_dir).map_err(|e| {
        format!("{e} (is the server on this data directory still running? stop it first)")
    })?;
    let target = open_datastore(&config).map_err(|e| e.to_string())?;
    let report = migrate::migrate(&source, target.as_ref()).map_err(|e| e.to_string())?;
    match out {
        Output::Json => println!(
            "{}",
            serde_json::to_value(&report).map_err(|e| e.to_string())?
        ),
        Output::Text => {
            println!(
                "Migrated {} to PostgreSQL as server {}",
                data_dir.display(),
                report.server_id
            );
            println!("entries:           {}", report.entries);
            println!("agents:            {}", report.agents);
            println!("join tokens:       {}", report.join_tokens);
            println!("federations:       {}", report.federations);
            println!("federated bundles: {}", report.federated_bundles);
            println!("hardware bans:     {}", report.hardware_bans);
            println!("x509 authorities:  {}", report.x509_authorities);
            println!("jwt authorities:   {}", report.jwt_authorities);
            println!(
                "audit anchor:      {}",
                if report.audit_anchor { "yes" } else { "no" }
            );
            println!("revision:          {}", report.revision);
        }
    }
    Ok(())
}
