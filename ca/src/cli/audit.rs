//! `audit`: the audit log, offline (no server needed; `accept-rollback` needs it
//! stopped).
//!
//! Each server keeps its own hash-chained log in its data directory, and its anchor
//! in the datastore it runs on, under its server id: `DATA_DIR/datastore` (sled, one
//! server), or the PostgreSQL database several servers share (`DATA_DIR/server-id`
//! names the anchor). `verify` and `accept-rollback` open the store the server is
//! configured with (`--config`, `--datastore`, `--datastore-url`, as `run` does) and
//! say which server they checked.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::Output;
use crate::audit::{NamedAnchor, VerifyError, VerifyReport};
use crate::config::{DatastoreKind, ServerConfig};
use crate::datastore::DataStore;

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
        /// The datastore holding this server's anchor (as `run` is given it).
        #[command(flatten)]
        store: StoreArgs,
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
    /// List the records that name an identity: token-exchange receipts where it is the
    /// subject, the client or an actor of the chain, and every other record that names
    /// it (SVIDs issued, revocations). Reads the log only; `audit verify` says whether
    /// the log is intact.
    Show {
        /// The SPIFFE ID (an instance, or an entry's ID: its instances match too).
        #[arg(long, value_name = "SPIFFE_ID")]
        subject: String,
        /// Only records of this type (`token_exchanged`, `token_refused`, …).
        #[arg(long = "type", value_name = "TYPE")]
        record_type: Option<String>,
        /// The server's data directory (default from --config, else /var/lib/ztid/server).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server config.
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// The datastore holding this server's anchor (as `run` is given it).
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The datastore flags of `verify` and `accept-rollback`: the server's own, as `run`
/// takes them (over `--config`'s `[datastore]`).
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// sled (DATA_DIR/datastore; the default) or postgres (the database several servers
    /// share, with --datastore-url).
    #[arg(long, value_enum, value_name = "KIND")]
    pub datastore: Option<DatastoreKind>,
    /// postgres://USER@HOST:PORT/DB[?...], without a password: the password comes from
    /// [datastore] password_file or ZTID_DATASTORE_PASSWORD.
    #[arg(long, value_name = "URL")]
    pub datastore_url: Option<String>,
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

/// [`audit_config`] with the datastore flags applied, as `run` applies them.
fn store_config(
    data_dir: &Option<PathBuf>,
    config: &Option<PathBuf>,
    store: &StoreArgs,
) -> Result<ServerConfig, String> {
    let mut c = audit_config(data_dir, config)?;
    if let Some(k) = store.datastore {
        c.datastore.kind = k;
    }
    if let Some(u) = &store.datastore_url {
        c.datastore.url = Some(u.clone());
    }
    c.datastore.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// The name of a datastore kind, as the flag spells it.
fn kind_name(kind: DatastoreKind) -> &'static str {
    match kind {
        DatastoreKind::Sled => "sled",
        DatastoreKind::Postgres => "postgres",
    }
}

/// This server's id on PostgreSQL, from `DATA_DIR/server-id`, which must exist: a
/// new id would name an anchor no log ever wrote (and the file would then claim the
/// directory for a server that never ran).
fn existing_server_id(data_dir: &Path) -> Result<String, String> {
    let file = data_dir.join(crate::core::store::SERVER_ID_FILE);
    if !file.is_file() {
        return Err(format!(
            "no {}: no server has run on PostgreSQL with this data directory (its server id \
             names its audit anchor in the database); give the server's --data-dir",
            file.display()
        ));
    }
    crate::core::store::server_id(data_dir).map_err(|e| e.to_string())
}

/// Opens the store the server is configured with (the data directory must be one a
/// server ran on), returning it with this server's id.
fn open_server_store(c: &ServerConfig) -> Result<std::sync::Arc<dyn DataStore>, String> {
    if c.datastore.kind == DatastoreKind::Postgres {
        existing_server_id(&c.data_dir)?;
    }
    crate::core::store::open_datastore(c).map_err(|e| e.to_string())
}

/// The datastore's anchor of this server, named after the server on PostgreSQL.
fn server_anchor(store: &dyn DataStore, kind: DatastoreKind) -> crate::Result<Option<NamedAnchor>> {
    let mut anchor = NamedAnchor::from_store(store)?;
    if let (Some(a), DatastoreKind::Postgres) = (&mut anchor, kind) {
        a.source = format!(
            "the datastore anchor of server {} (PostgreSQL)",
            store.server_id()
        );
    }
    Ok(anchor)
}

/// What `audit verify` checked of one server's log.
#[derive(Debug, Clone)]
pub struct ServerAudit {
    /// The server: `DATA_DIR/server-id` on PostgreSQL, the sled store's fixed id on sled.
    pub server_id: String,
    /// The datastore its anchor was read from.
    pub datastore: DatastoreKind,
    /// Its audit directory.
    pub dir: PathBuf,
    /// The datastore anchor the log was checked against (`None`: no anchor yet, or
    /// sled's datastore could not be opened: see `datastore_note`).
    pub anchor: Option<NamedAnchor>,
    /// Why the datastore anchor was not checked, if it was not.
    pub datastore_note: Option<String>,
    /// What the walk found.
    pub report: VerifyReport,
}

/// Why `audit verify` failed for a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditVerifyError {
    /// The config, the flags, the key manager or a checkpoint file.
    #[error("{0}")]
    Config(String),
    /// The PostgreSQL datastore holding this server's anchor could not be read: the log
    /// was not checked against it, so nothing is claimed.
    #[error("server {server_id}: the audit anchor in the PostgreSQL datastore could not be read: {detail}")]
    Datastore {
        /// The server.
        server_id: String,
        /// What failed.
        detail: String,
    },
    /// The log itself: its first bad record, or the anchor it does not reach.
    #[error("audit log {} of server {server_id}: {error}", dir.display())]
    Log {
        /// The server.
        server_id: String,
        /// Its audit directory.
        dir: PathBuf,
        /// What is wrong (boxed: it is large, and this error is returned by value).
        #[source]
        error: Box<VerifyError>,
    },
}

/// Verifies the audit log of the server `config` describes (its data directory, key
/// manager and datastore): the hash chain, signatures, signed head, `checkpoints`,
/// and its anchor in the datastore it runs on.
///
/// On sled a datastore held by the running server cannot be opened: the anchor is then
/// not checked and the report says so (the server checks it at every start). On
/// PostgreSQL the anchor can always be read while the database answers, and it must
/// be: a database that cannot be read fails the verification.
pub fn verify_server(
    config: &ServerConfig,
    allow_unsigned_tail: bool,
    checkpoints: &[PathBuf],
) -> Result<ServerAudit, AuditVerifyError> {
    config
        .datastore
        .validate()
        .map_err(|e| AuditVerifyError::Config(e.to_string()))?;
    let km =
        crate::keys::key_manager(config).map_err(|e| AuditVerifyError::Config(e.to_string()))?;
    let dir = config.data_dir.join("audit");
    let mut anchors = Vec::new();
    for f in checkpoints {
        anchors.push(
            crate::audit::read_checkpoint_file(f, &dir, km.as_ref())
                .map_err(|e| AuditVerifyError::Config(e.to_string()))?,
        );
    }
    let kind = config.datastore.kind;
    let (server_id, anchor, datastore_note) = match kind {
        DatastoreKind::Sled => {
            let id = crate::datastore::SledStore::DEFAULT_SERVER_ID.to_string();
            let path = config.data_dir.join("datastore");
            let read = if path.exists() {
                crate::datastore::SledStore::open(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|store| server_anchor(&store, kind).map_err(|e| e.to_string()))
            } else {
                Err(format!("no datastore at {}", path.display()))
            };
            match read {
                Ok(Some(a)) => (id, Some(a), None),
                Ok(None) => (
                    id,
                    None,
                    Some("the datastore holds no anchor yet".to_string()),
                ),
                Err(e) => (id, None, Some(format!("datastore anchor not checked: {e}"))),
            }
        }
        DatastoreKind::Postgres => {
            let id = existing_server_id(&config.data_dir).map_err(AuditVerifyError::Config)?;
            let datastore = |detail: String| AuditVerifyError::Datastore {
                server_id: id.clone(),
                detail,
            };
            let store =
                crate::core::store::open_datastore(config).map_err(|e| datastore(e.to_string()))?;
            match server_anchor(store.as_ref(), kind).map_err(|e| datastore(e.to_string()))? {
                Some(a) => (id, Some(a), None),
                None => (
                    id.clone(),
                    None,
                    Some(format!("the datastore holds no anchor of server {id} yet")),
                ),
            }
        }
    };
    anchors.extend(anchor.clone());
    let options = crate::audit::VerifyOptions {
        allow_unsigned_tail,
        anchors,
    };
    match crate::audit::verify_with(&dir, km.as_ref(), &options) {
        Ok(report) => Ok(ServerAudit {
            server_id,
            datastore: kind,
            dir,
            anchor,
            datastore_note,
            report,
        }),
        Err(error) => Err(AuditVerifyError::Log {
            server_id,
            dir,
            error: Box::new(error),
        }),
    }
}

/// Runs an `audit` verb (offline: no server needed; `accept-rollback` needs it stopped).
pub async fn audit_verb(cmd: &AuditCmd, out: Output) -> Result<(), String> {
    match cmd {
        AuditCmd::Verify {
            data_dir,
            config,
            allow_unsigned_tail,
            checkpoint,
            store,
        } => audit_verify(
            data_dir,
            config,
            store,
            *allow_unsigned_tail,
            checkpoint,
            out,
        ),
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
                    // A new file renamed into place: never through a symlink nor into
                    // a file someone else made (and may still write).
                    super::files::replace_file(f, format!("{text}\n").as_bytes(), 0o644)?;
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
        AuditCmd::Show {
            subject,
            record_type,
            data_dir,
            config,
        } => {
            let c = audit_config(data_dir, config)?;
            audit_show(
                &c.data_dir.join("audit"),
                subject,
                record_type.as_deref(),
                out,
            )
        }
        AuditCmd::AcceptRollback {
            data_dir,
            config,
            reason,
            store,
        } => {
            let reason = reason.trim();
            if reason.is_empty() || reason.len() > MAX_ROLLBACK_REASON {
                return Err(format!(
                    "--reason must say why, in 1 to {MAX_ROLLBACK_REASON} bytes"
                ));
            }
            let c = store_config(data_dir, config, store)?;
            let km = crate::keys::key_manager(&c).map_err(|e| e.to_string())?;
            if c.datastore.kind == DatastoreKind::Postgres {
                // sled's lock refuses a second opener; a shared database does not, so
                // look for the server itself: one answering on its admin socket is
                // writing the log and advancing the anchor.
                let socket = c.admin_socket_path();
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    return Err(format!(
                        "the server answers on its admin socket {}: stop it first \
                         (accept-rollback rewrites its audit anchor)",
                        socket.display()
                    ));
                }
            }
            let store = open_server_store(&c).map_err(|e| {
                format!("{e} (stop the server first: accept-rollback needs its datastore)")
            })?;
            let server_id = store.server_id().to_string();
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
                Output::Json => println!(
                    "{}",
                    json!({"server_id": server_id, "datastore": kind_name(c.datastore.kind),
                        "accepted": accepted})
                ),
                Output::Text if accepted.is_empty() => println!(
                    "server {server_id}: nothing to accept: the audit log reaches its anchors"
                ),
                Output::Text => {
                    println!(
                        "server {server_id}: accepted, and recorded in the audit log with the reason:"
                    );
                    for a in accepted {
                        println!("  {a}");
                    }
                }
            }
            Ok(())
        }
    }
}

/// Runs `audit verify`: [`verify_server`] on the server the flags describe, printed.
pub fn audit_verify(
    data_dir: &Option<PathBuf>,
    config: &Option<PathBuf>,
    store: &StoreArgs,
    allow_unsigned_tail: bool,
    checkpoints: &[PathBuf],
    out: Output,
) -> Result<(), String> {
    let c = store_config(data_dir, config, store)?;
    let v = verify_server(&c, allow_unsigned_tail, checkpoints).map_err(|e| e.to_string())?;
    let r = &v.report;
    let anchor = v
        .anchor
        .as_ref()
        .map(|a| json!({"source": a.source, "seq": a.anchor.seq, "hash": a.anchor.hash}));
    match out {
        Output::Json => println!(
            "{}",
            json!({"ok": true, "server_id": v.server_id, "datastore": kind_name(v.datastore),
                "audit_dir": v.dir.display().to_string(),
                "records": r.records, "checkpoints": r.checkpoints,
                "seals": r.seals, "signed_through": r.signed_through, "head_seq": r.head_seq,
                "unsigned_tail": r.unsigned_tail, "torn_tail": r.torn_tail,
                "anchors_reached": r.anchors_reached,
                "completed_from_journal": r.completed_from_journal,
                "anchor": anchor,
                "datastore_anchor": v.datastore_note})
        ),
        Output::Text => {
            println!(
                "server {} ({} datastore): audit log {}",
                ztid_human::shown(&v.server_id),
                kind_name(v.datastore),
                v.dir.display()
            );
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
                match &v.anchor {
                    Some(d) if &d.source == a => {
                        println!("extends {} (record {})", ztid_human::shown(a), d.anchor.seq)
                    }
                    _ => println!("extends {}", ztid_human::shown(a)),
                }
            }
            if let Some(n) = &v.datastore_note {
                // It may quote the database's error.
                println!("note: {}", ztid_human::shown(n));
            }
            if r.completed_from_journal > 0 {
                println!(
                    "note: {} bytes of it were read from audit.wal, not audit.log: the machine stopped before they reached the log (the next start writes them in), or the log was cut back and the journal was not",
                    r.completed_from_journal
                );
            }
        }
    }
    Ok(())
}

/// Whether `value` (a string, or strings in an array or object one level down) names
/// `id` or one of its instances.
fn names(value: &Value, id: &str) -> bool {
    let hit = |s: &str| crate::sts::chain::covers(id, s);
    match value {
        Value::String(s) => hit(s),
        Value::Array(items) => items.iter().any(|v| v.as_str().is_some_and(hit)),
        Value::Object(o) => o.values().any(|v| v.as_str().is_some_and(hit)),
        _ => false,
    }
}

/// The longest `--subject`.
const MAX_SUBJECT: usize = 2048;

/// Runs `audit show --subject ID`: every event record naming `id`, oldest first.
fn audit_show(dir: &Path, id: &str, record_type: Option<&str>, out: Output) -> Result<(), String> {
    if !id.starts_with("spiffe://") || id.len() > MAX_SUBJECT {
        return Err(format!(
            "--subject must be a SPIFFE ID of at most {MAX_SUBJECT} bytes"
        ));
    }
    let path = crate::audit::log_path(dir);
    let file =
        std::fs::File::open(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut shown = 0u64;
    for line in std::io::BufRead::lines(std::io::BufReader::new(file)) {
        let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue; // a torn last line; `audit verify` reports it
        };
        let Some(event) = record.get("event").and_then(Value::as_object) else {
            continue;
        };
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        if record_type.is_some_and(|t| t != kind) {
            continue;
        }
        if !event.values().any(|v| names(v, id)) {
            continue;
        }
        shown += 1;
        let seq = record.get("seq").and_then(Value::as_u64).unwrap_or(0);
        let time_ms = record.get("time_ms").and_then(Value::as_i64).unwrap_or(0);
        match out {
            Output::Json => println!(
                "{}",
                json!({"seq": seq, "time_ms": time_ms, "event": event})
            ),
            Output::Text => {
                // A log line: the time alone, no "ago" (records are read long after).
                let when = super::output::rfc3339(time_ms.div_euclid(1000));
                let field = |k: &str| match event.get(k) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" <- "),
                    _ => String::new(),
                };
                // Values quote what callers sent (audiences, reasons, peers' errors):
                // escaped, and quoted when they could pass for more fields.
                let mut parts = vec![format!("#{seq} {when} {}", ztid_human::shown(kind))];
                for (label, key) in [
                    ("subject", "subject"),
                    ("client", "client"),
                    ("via", "chain"),
                    ("audience", "audience"),
                    ("scope", "scope"),
                    ("grant", "grant"),
                    ("node", "node"),
                    ("error", "error"),
                    ("reason", "reason"),
                    ("spiffe_id", "spiffe_id"),
                    ("agent", "agent"),
                ] {
                    let v = field(key);
                    if !v.is_empty() {
                        let v = if v.contains([' ', '"', '=']) {
                            ztid_human::shown_quoted(&v)
                        } else {
                            ztid_human::shown_string(&v)
                        };
                        parts.push(format!("{label}={v}"));
                    }
                }
                println!("{}", parts.join(" "));
            }
        }
    }
    if shown == 0 && matches!(out, Output::Text) {
        println!("no record names {}", ztid_human::shown(id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Arc;

    /// A data directory whose audit log has a few signed records.
    fn data_dir_with_log() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let km: Arc<dyn ztid_hsm::KeyManager> =
            Arc::new(ztid_hsm::SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = crate::audit::AuditLog::open_with(
            &dir.path().join("audit"),
            km,
            crate::audit::AuditOptions {
                store: None,
                accept_rollback: None,
            },
        )
        .unwrap();
        let mut last = 0;
        for i in 0..3 {
            last = log
                .append(serde_json::json!({"type": "x509_svid_issued", "serial": format!("{i}")}))
                .unwrap();
        }
        rt.block_on(log.durable(last)).unwrap();
        rt.block_on(log.close()).unwrap();
        dir
    }

    fn checkpoint_to(data: &Path, out: &Path) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(audit_verb(
            &AuditCmd::Checkpoint {
                data_dir: Some(data.to_path_buf()),
                config: None,
                out: Some(out.to_path_buf()),
            },
            Output::Json,
        ))
    }

    #[test]
    fn checkpoint_out_replaces_a_symlink_or_foreign_file_instead_of_writing_through_it() {
        let data = data_dir_with_log();
        let elsewhere = tempfile::tempdir().unwrap();
        // A file the checkpoint must not clobber, reached through a planted symlink.
        let victim = elsewhere.path().join("victim.conf");
        std::fs::write(&victim, "precious").unwrap();
        let link = elsewhere.path().join("cp.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        checkpoint_to(data.path(), &link).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert!(std::fs::read_to_string(&link).unwrap().contains("\"sig\""));

        // A file made beforehand with a loose mode (someone else's, who would keep
        // write access to the checkpoint) is replaced, not rewritten in place.
        let planted = elsewhere.path().join("planted.json");
        std::fs::write(&planted, "").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        let ino = std::fs::metadata(&planted).unwrap().ino();
        checkpoint_to(data.path(), &planted).unwrap();
        let m = std::fs::metadata(&planted).unwrap();
        assert_ne!(m.ino(), ino, "a new file");
        assert_eq!(m.mode() & 0o777, 0o644);
    }
}
