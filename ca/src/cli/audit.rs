//! `audit`: the audit log, offline (no server needed; `accept-rollback` needs it
//! stopped).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::Output;
use crate::config::ServerConfig;

/// `audit` verbs.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Walk the hash chain, checkpoint and seal signatures, the signed head and the
    /// anchors; name the first bad record. Records after the last seal fail it.
    Verify {
        /// The server's data directory (default from --config, else /var/lib/ztid/server).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server config (for the key manager holding the audit key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Accept records after the last seal (the batch a live server is writing);
        /// a stopped server's log has none.
        #[arg(long)]
        allow_unsigned_tail: bool,
        /// A checkpoint exported earlier (`audit checkpoint`): the log must still
        /// contain its record, unchanged. Repeatable.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<PathBuf>,
    },
    /// Verify the log, then write a checkpoint signed by the audit key (last signed
    /// record: sequence number, hash, time, key id) for an off-host witness. Works on a
    /// live server's log: the batch being written is not covered.
    Checkpoint {
        /// The server's data directory (default from --config, else /var/lib/ztid/server).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server config (for the key manager holding the audit key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write it here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// With the server stopped: continue from a log that no longer reaches its anchors
    /// (restored from a backup, say). The log records the reason and what was not
    /// reached; the anchors restart from the log as it is.
    AcceptRollback {
        /// The server's data directory (default from --config, else /var/lib/ztid/server).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server config (for the key manager holding the audit key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Why (recorded in the log).
        #[arg(long)]
        reason: String,
    },
}

/// The longest `accept-rollback --reason`.
const MAX_ROLLBACK_REASON: usize = 1024;

fn audit_config(
    data_dir: &Option<PathBuf>,
    config: &Option<PathBuf>,
) -> Result<ServerConfig, String> {
    let mut c = match config {
        Some(p) => ServerConfig::from_file(p).map_err(|e| e.to_string())?,
        None => ServerConfig::default(),
    };
    if let Some(d) = data_dir {
        c.data_dir = d.clone();
    }
    Ok(c)
}

/// The datastore's audit anchor, or why it could not be read (a running server holds
/// the datastore; it checks the anchor itself at every start).
fn datastore_anchor(c: &ServerConfig) -> Result<Option<crate::audit::NamedAnchor>, String> {
    let path = c.data_dir.join("datastore");
    if !path.exists() {
        return Err(format!("no datastore at {}", path.display()));
    }
    let store = crate::datastore::SledStore::open(&path).map_err(|e| e.to_string())?;
    crate::audit::NamedAnchor::from_store(&store).map_err(|e| e.to_string())
}

/// Runs an `audit` verb (offline: no server needed; `accept-rollback` needs it stopped).
pub async fn audit_verb(cmd: &AuditCmd, out: Output) -> Result<(), String> {
    match cmd {
        AuditCmd::Verify {
            data_dir,
            config,
            allow_unsigned_tail,
            checkpoint,
        } => audit_verify(data_dir, config, *allow_unsigned_tail, checkpoint, out),
        AuditCmd::Checkpoint {
            data_dir,
            config,
            out: file,
        } => {
            let c = audit_config(data_dir, config)?;
            let km = crate::keys::key_manager(&c).map_err(|e| e.to_string())?;
            let dir = c.data_dir.join("audit");
            let cp = crate::audit::export_checkpoint(&dir, km.as_ref())
                .map_err(|e| format!("audit log {}: {e}", dir.display()))?;
            let text = cp.to_json().to_string();
            match file {
                Some(f) => {
                    std::fs::write(f, format!("{text}\n"))
                        .map_err(|e| format!("writing {}: {e}", f.display()))?;
                    match out {
                        Output::Json => println!("{text}"),
                        Output::Text => println!(
                            "audit checkpoint at record {} written to {}",
                            cp.seq,
                            f.display()
                        ),
                    }
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        AuditCmd::AcceptRollback {
            data_dir,
            config,
            reason,
        } => {
            let reason = reason.trim();
            if reason.is_empty() || reason.len() > MAX_ROLLBACK_REASON {
                return Err(format!(
                    "--reason must say why, in 1 to {MAX_ROLLBACK_REASON} bytes"
                ));
            }
            let c = audit_config(data_dir, config)?;
            let km = crate::keys::key_manager(&c).map_err(|e| e.to_string())?;
            let path = c.data_dir.join("datastore");
            let store: std::sync::Arc<dyn crate::datastore::DataStore> =
                std::sync::Arc::new(crate::datastore::SledStore::open(&path).map_err(|e| {
                    format!("{e} (stop the server first: accept-rollback needs its datastore)")
                })?);
            let log = crate::audit::AuditLog::open_with(
                &c.data_dir.join("audit"),
                km,
                crate::audit::AuditOptions {
                    store: Some(store),
                    accept_rollback: Some(reason.to_string()),
                },
            )
            .map_err(|e| e.to_string())?;
            log.close().await.map_err(|e| e.to_string())?;
            let accepted = log.accepted_rollback();
            match out {
                Output::Json => println!("{}", json!({"accepted": accepted})),
                Output::Text if accepted.is_empty() => {
                    println!("nothing to accept: the audit log reaches its anchors")
                }
                Output::Text => {
                    println!("accepted, and recorded in the audit log with the reason:");
                    for a in accepted {
                        println!("  {a}");
                    }
                }
            }
            Ok(())
        }
    }
}

/// Runs `audit verify`.
pub fn audit_verify(
    data_dir: &Option<PathBuf>,
    config: &Option<PathBuf>,
    allow_unsigned_tail: bool,
    checkpoints: &[PathBuf],
    out: Output,
) -> Result<(), String> {
    let c = audit_config(data_dir, config)?;
    let km = crate::keys::key_manager(&c).map_err(|e| e.to_string())?;
    let dir = c.data_dir.join("audit");
    let mut anchors = Vec::new();
    for f in checkpoints {
        anchors.push(
            crate::audit::read_checkpoint_file(f, &dir, km.as_ref()).map_err(|e| e.to_string())?,
        );
    }
    let datastore_note = match datastore_anchor(&c) {
        Ok(Some(a)) => {
            anchors.push(a);
            None
        }
        Ok(None) => Some("the datastore holds no anchor yet".to_string()),
        Err(e) => Some(format!("datastore anchor not checked: {e}")),
    };
    let options = crate::audit::VerifyOptions {
        allow_unsigned_tail,
        anchors,
    };
    let r = crate::audit::verify_with(&dir, km.as_ref(), &options)
        .map_err(|e| format!("audit log {}: {e}", dir.display()))?;
    match out {
        Output::Json => println!(
            "{}",
            json!({"ok": true, "records": r.records, "checkpoints": r.checkpoints,
                "seals": r.seals, "signed_through": r.signed_through, "head_seq": r.head_seq,
                "unsigned_tail": r.unsigned_tail, "torn_tail": r.torn_tail,
                "anchors_reached": r.anchors_reached,
                "datastore_anchor": datastore_note})
        ),
        Output::Text => {
            println!(
                "audit log OK: {} records, {} signed checkpoints, {} seals, signed through record {}{}",
                r.records,
                r.checkpoints,
                r.seals,
                r.signed_through,
                match (r.unsigned_tail, r.torn_tail) {
                    (0, false) => String::new(),
                    (n, torn) => format!(
                        " ({n} later records{} signed by no one, accepted by --allow-unsigned-tail)",
                        if torn { " and a line being written" } else { "" }
                    ),
                }
            );
            for a in &r.anchors_reached {
                println!("extends {a}");
            }
            if let Some(n) = datastore_note {
                println!("note: {n}");
            }
        }
    }
    Ok(())
}
