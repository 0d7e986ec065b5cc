//! The `ztid-server` command line: `run`, and the operator verbs that talk to a
//! running server over its admin socket.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use ztid_spiffe::svid::certs_to_pem;
use ztid_proto::admin::{self as pb, admin_client::AdminClient};
use ztid_proto::node as npb;

use crate::config::ServerConfig;

/// Output format of every verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

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
    #[command(subcommand)]
    pub command: Command,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Run(RunArgs),
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
    /// Exit 0 if the server answers on its admin socket.
    Healthcheck,
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
}

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

/// Flags of `run`; each overrides the config file key of the same name.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trust domain name, e.g. example.org.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Data directory (datastore and key files).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Node API listen address.
    #[arg(long)]
    pub bind: Option<std::net::SocketAddr>,
    /// Key manager backend.
    #[arg(long)]
    pub key_manager: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve /metrics, /live and /ready on ADDR:PORT (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Cedar issuance policy file (reloaded when it changes).
    #[arg(long)]
    pub issuance_policy: Option<PathBuf>,
    /// PKCS#11 module path (with --key-manager pkcs11).
    #[arg(long)]
    pub pkcs11_module: Option<PathBuf>,
    /// PKCS#11 token label.
    #[arg(long)]
    pub pkcs11_token: Option<String>,
    /// File with the PKCS#11 user PIN (else ZTID_PKCS11_PIN).
    #[arg(long)]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// TPM TCTI (with --key-manager tpm; default device:/dev/tpmrm0).
    #[arg(long, value_name = "TCTI")]
    pub tpm_tcti: Option<String>,
    /// Directory of manufacturer CA certificates EK certificates must chain to (enables tpm).
    #[arg(long)]
    pub tpm_ek_ca: Option<PathBuf>,
    /// Offline SEV-SNP collateral: VCEK/VLEK certificates, CRLs (enables sev-snp).
    #[arg(long)]
    pub sev_snp_collateral: Option<PathBuf>,
    /// Offline TDX collateral: `collateral.json` in dcap-qvl's QuoteCollateralV3 form (enables tdx).
    #[arg(long)]
    pub tdx_collateral: Option<PathBuf>,
    /// Serve the SPIFFE bundle endpoint on ADDR:PORT (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    pub bundle_endpoint: Option<std::net::SocketAddr>,
    /// https_web profile of the bundle endpoint: PEM certificate chain (with --bundle-endpoint-key).
    #[arg(long)]
    pub bundle_endpoint_cert: Option<PathBuf>,
    /// https_web profile of the bundle endpoint: PEM PKCS#8 key.
    #[arg(long)]
    pub bundle_endpoint_key: Option<PathBuf>,
    /// PEM roots for https_web federation endpoints (default: the system's).
    #[arg(long)]
    pub federation_web_roots: Option<PathBuf>,
    /// OIDC discovery listener ADDR:PORT (with --oidc-issuer).
    #[arg(long, value_name = "ADDR:PORT", requires = "oidc_issuer")]
    pub oidc_bind: Option<std::net::SocketAddr>,
    /// OIDC issuer URL, also the `iss` of JWT-SVIDs.
    #[arg(long, requires = "oidc_bind")]
    pub oidc_issuer: Option<String>,
}

/// Flags of `evidence verify`.
#[derive(Debug, Args)]
pub struct EvidenceVerifyArgs {
    /// Evidence kind.
    #[arg(long, value_parser = ["tpm", "sev-snp", "tdx"])]
    pub kind: String,
    /// The evidence file (raw SNP report, raw TDX quote, TPM evidence).
    #[arg(long)]
    pub evidence: PathBuf,
    /// Collateral directory.
    #[arg(long)]
    pub collateral: Option<PathBuf>,
    /// Expected report_data, hex.
    #[arg(long)]
    pub report_data: Option<String>,
    /// Verification time, RFC 3339 (default: now).
    #[arg(long)]
    pub at: Option<String>,
    /// Server config whose `[attestors.*]` policy applies.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

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
        anchors.push(crate::audit::read_checkpoint_file(f, &dir, km.as_ref())?);
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

/// `evidence` verbs.
#[derive(Debug, Subcommand)]
pub enum EvidenceCmd {
    /// Verify captured evidence offline and print the verified claims.
    Verify(EvidenceVerifyArgs),
}

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

/// `entry` verbs.
#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Create an entry; prints its id.
    Create {
        /// SPIFFE ID (per-instance entries: the prefix of every instance's ID).
        #[arg(long)]
        spiffe_id: String,
        /// Agent or node alias ID (optional with --node).
        #[arg(long, default_value = "")]
        parent_id: String,
        /// TYPE:KEY:VALUE, repeatable.
        #[arg(long = "selector", required = true)]
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
        /// DNS SAN, repeatable.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Federated trust domain, repeatable.
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
        /// A node alias.
        #[arg(long)]
        node: bool,
        /// Hint passed to workloads.
        #[arg(long, default_value = "")]
        hint: String,
    },
    /// List entries.
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
    /// Delete one entry.
    Delete {
        /// Entry id.
        entry_id: String,
    },
}

/// `agent` verbs.
#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// List agents.
    List,
    /// Show one agent.
    Show {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
    /// Evict: the agent's next call fails; it must attest again.
    Evict {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
    /// Ban: the agent's next call fails and it can never attest again.
    Ban {
        /// Agent SPIFFE ID.
        agent_id: String,
    },
}

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
    /// List every authority and its state.
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
    })
}

fn print_authority(a: &pb::Authority, out: Output) {
    match out {
        Output::Json => println!("{}", authority_json(a)),
        Output::Text => {
            println!("Authority ID  : {}", a.id);
            println!("Kind          : {}", a.kind);
            println!(
                "State         : {}{}",
                a.state,
                if a.tainted { " (tainted)" } else { "" }
            );
            println!("Not before    : {}", a.not_before);
            println!("Not after     : {}", a.not_after);
            println!("Key           : {} ({})", a.key_id, a.key_backend);
            println!("Key SHA-256   : {}", a.public_key_sha256);
            println!();
        }
    }
}

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// PEM X.509 authorities.
    Pem,
    /// SPIFFE bundle JSON.
    Spiffe,
}

/// `bundle` verbs.
#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Show this trust domain's bundle.
    Show {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Store another trust domain's bundle exchanged out of band (never merged with
    /// this domain's); a lower spiffe_sequence than the stored one is refused.
    Set {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Bundle file.
        #[arg(long)]
        path: PathBuf,
        /// Format of the file.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// List the federated bundles.
    List {
        /// Format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Remove a federated bundle.
    Delete {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
    },
}

/// `federation` verbs.
#[derive(Debug, Subcommand)]
pub enum FederationCmd {
    /// Create (or replace) a relationship; it is polled at once and then per its refresh hint.
    Create {
        /// The federated trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Its bundle endpoint (https).
        #[arg(long)]
        bundle_endpoint_url: String,
        /// Endpoint profile.
        #[arg(long, value_parser = ["https_web", "https_spiffe"])]
        profile: String,
        /// https_spiffe: the SPIFFE ID the endpoint must present.
        #[arg(long)]
        endpoint_spiffe_id: Option<String>,
        /// https_spiffe: the domain's bundle (SPIFFE JSON or PEM) for the first fetch.
        #[arg(long)]
        trust_bundle: Option<PathBuf>,
    },
    /// List relationships.
    List,
    /// Show one relationship.
    Show {
        /// The federated trust domain.
        trust_domain: String,
    },
    /// Delete a relationship.
    Delete {
        /// The federated trust domain.
        trust_domain: String,
    },
    /// Fetch the endpoint now.
    Refresh {
        /// The federated trust domain.
        trust_domain: String,
    },
}

/// Builds the effective config for `run`.
pub fn run_config(args: &RunArgs, admin_socket: Option<PathBuf>) -> crate::Result<ServerConfig> {
    let mut c = match &args.config {
        Some(p) => ServerConfig::from_file(p)?,
        None => ServerConfig::default(),
    };
    if let Some(v) = &args.trust_domain {
        c.trust_domain = v.clone();
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = args.bind {
        c.bind = v;
    }
    if let Some(v) = &args.key_manager {
        c.key_manager = v.clone();
    }
    if let Some(v) = &args.tpm_tcti {
        c.tpm_tcti = Some(v.clone());
    }
    if let Some(v) = &args.log_format {
        c.log_format = v.clone();
    }
    if let Some(v) = args.metrics {
        c.metrics = Some(v);
    }
    if let Some(p) = &args.issuance_policy {
        c.issuance_policy = Some(p.clone());
    }
    if args.pkcs11_module.is_some() || args.pkcs11_token.is_some() || args.pkcs11_pin_file.is_some()
    {
        let p = c.pkcs11.get_or_insert_with(Default::default);
        if let Some(m) = &args.pkcs11_module {
            p.module = m.clone();
        }
        if let Some(t) = &args.pkcs11_token {
            p.token_label = t.clone();
        }
        if let Some(f) = &args.pkcs11_pin_file {
            p.pin_file = Some(f.clone());
        }
    }
    if admin_socket.is_some() {
        c.admin_socket = admin_socket;
    }
    let set = |t: &mut Option<toml::Table>, key: &str, v: &Option<PathBuf>| {
        if let Some(p) = v {
            t.get_or_insert_with(Default::default)
                .insert(key.into(), toml::Value::String(p.display().to_string()));
        }
    };
    set(&mut c.attestors.tpm, "ek_ca_dir", &args.tpm_ek_ca);
    set(
        &mut c.attestors.sev_snp,
        "collateral_dir",
        &args.sev_snp_collateral,
    );
    set(&mut c.attestors.tdx, "collateral_dir", &args.tdx_collateral);
    if args.bundle_endpoint.is_some() {
        c.bundle_endpoint = args.bundle_endpoint;
    }
    if args.bundle_endpoint_cert.is_some() {
        c.bundle_endpoint_cert = args.bundle_endpoint_cert.clone();
        c.bundle_endpoint_key = args.bundle_endpoint_key.clone();
    }
    if args.federation_web_roots.is_some() {
        c.federation_web_roots = args.federation_web_roots.clone();
    }
    if let (Some(bind), Some(issuer)) = (args.oidc_bind, &args.oidc_issuer) {
        c.oidc = Some(crate::config::OidcConfig {
            bind,
            issuer: issuer.clone(),
        });
    }
    Ok(c)
}

fn entry_json(e: &npb::Entry) -> Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
        "selectors": e.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_ttl": e.x509_ttl_seconds, "jwt_ttl": e.jwt_ttl_seconds, "shared": e.shared,
        "dns_names": e.dns_names, "federates_with": e.federates_with, "node": e.node,
        "hint": e.hint, "revision": e.revision, "created_at": e.created_at,
    })
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "spiffe_id": a.spiffe_id, "attestation_method": a.attestation_method,
        "selectors": a.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "serial": a.serial, "expires_at": a.expires_at, "banned": a.banned,
        "attested_at": a.attested_at, "aliases": a.aliases,
    })
}

fn print_entry(e: &npb::Entry, out: Output) {
    match out {
        Output::Json => println!("{}", entry_json(e)),
        Output::Text => {
            println!("Entry ID      : {}", e.id);
            println!(
                "SPIFFE ID     : {}{}",
                e.spiffe_id,
                if e.shared || e.node {
                    ""
                } else {
                    "/<instance>"
                }
            );
            println!("Parent ID     : {}", e.parent_id);
            for s in &e.selectors {
                println!("Selector      : {}:{}", s.r#type, s.value);
            }
            println!(
                "X509-SVID TTL : {}",
                if e.x509_ttl_seconds == 0 {
                    "default".to_string()
                } else {
                    e.x509_ttl_seconds.to_string()
                }
            );
            println!(
                "JWT-SVID TTL  : {}",
                if e.jwt_ttl_seconds == 0 {
                    "default".to_string()
                } else {
                    e.jwt_ttl_seconds.to_string()
                }
            );
            println!(
                "Kind          : {}",
                if e.node {
                    "node alias"
                } else if e.shared {
                    "shared"
                } else {
                    "per-instance"
                }
            );
            for d in &e.dns_names {
                println!("DNS name      : {d}");
            }
            for f in &e.federates_with {
                println!("Federates with: {f}");
            }
            println!("Revision      : {}", e.revision);
            println!();
        }
    }
}

fn print_agent(a: &pb::Agent, out: Output) {
    match out {
        Output::Json => println!("{}", agent_json(a)),
        Output::Text => {
            println!("Agent ID      : {}", a.spiffe_id);
            println!("Attestation   : {}", a.attestation_method);
            for s in &a.selectors {
                println!("Selector      : {}:{}", s.r#type, s.value);
            }
            for al in &a.aliases {
                println!("Alias         : {al}");
            }
            println!("SVID serial   : {}", a.serial);
            println!("SVID expires  : {}", a.expires_at);
            println!("Banned        : {}", a.banned);
            println!();
        }
    }
}

/// Prints a list: a JSON array, or a count and each item.
fn print_list<T>(
    items: &[T],
    noun: &str,
    to_json: fn(&T) -> Value,
    print: fn(&T, Output),
    out: Output,
) {
    match out {
        Output::Json => println!(
            "{}",
            Value::from(items.iter().map(to_json).collect::<Vec<_>>())
        ),
        Output::Text => {
            println!("Found {} {noun}", items.len());
            for i in items {
                print(i, out);
            }
        }
    }
}

/// Runs an admin verb against the server.
pub async fn admin_verb(cli: &Cli) -> Result<(), String> {
    let path = cli
        .admin_socket
        .clone()
        .unwrap_or_else(|| ServerConfig::default().admin_socket_path());
    let channel = ztid_proto::transport::unix_channel(&path)
        .await
        .map_err(|e| {
            format!(
                "cannot reach the server's admin socket {}: {e}",
                path.display()
            )
        })?;
    let mut client = AdminClient::new(channel);
    let out = cli.output;
    let status = |s: tonic::Status| s.message().to_string();
    match &cli.command {
        Command::Run(_) | Command::Evidence(_) | Command::Audit(_) => {
            unreachable!("not an admin verb")
        }
        Command::Admin(AdminCmd::Credential(AdminCredentialCmd::Issue { name, write, ttl })) => {
            crate::admin_credential::issue(&mut client, name, *ttl, write, out).await?;
        }
        Command::Healthcheck => {
            let h = client
                .health(pb::HealthRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"status": h.status, "trust_domain": h.trust_domain})
                ),
                Output::Text => println!(
                    "Server is healthy ({}, trust domain {})",
                    h.status, h.trust_domain
                ),
            }
        }
        Command::Token(TokenCmd::Generate { ttl, spiffe_id }) => {
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
                Output::Text => println!("{}", r.token),
            }
        }
        Command::Entry(cmd) => match cmd {
            EntryCmd::Create {
                spiffe_id,
                parent_id,
                selectors,
                x509_ttl,
                jwt_ttl,
                shared,
                dns_names,
                federates_with,
                node,
                hint,
            } => {
                let mut sels = Vec::new();
                for s in selectors {
                    let (t, v) = s
                        .split_once(':')
                        .ok_or_else(|| format!("selector {s:?} is not TYPE:VALUE"))?;
                    sels.push(npb::Selector {
                        r#type: t.into(),
                        value: v.into(),
                    });
                }
                let e = client
                    .create_entry(npb::Entry {
                        spiffe_id: spiffe_id.clone(),
                        parent_id: parent_id.clone(),
                        selectors: sels,
                        x509_ttl_seconds: *x509_ttl,
                        jwt_ttl_seconds: *jwt_ttl,
                        shared: *shared,
                        dns_names: dns_names.clone(),
                        federates_with: federates_with.clone(),
                        node: *node,
                        hint: hint.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                match out {
                    Output::Json => println!("{}", entry_json(&e)),
                    Output::Text => println!("{}", e.id),
                }
            }
            EntryCmd::List {
                spiffe_id,
                parent_id,
            } => {
                let r = client
                    .list_entries(pb::ListEntriesRequest {
                        spiffe_id: spiffe_id.clone().unwrap_or_default(),
                        parent_id: parent_id.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_list(&r.entries, "entries", entry_json, print_entry, out);
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
            EntryCmd::Delete { entry_id } => {
                let e = client
                    .delete_entry(pb::EntryId {
                        id: entry_id.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                match out {
                    Output::Json => println!("{}", entry_json(&e)),
                    Output::Text => println!("Deleted entry {}", e.id),
                }
            }
        },
        Command::Agent(cmd) => match cmd {
            AgentCmd::List => {
                let r = client
                    .list_agents(pb::ListAgentsRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                print_list(&r.agents, "agents", agent_json, print_agent, out);
            }
            AgentCmd::Show { agent_id } => {
                let a = client
                    .get_agent(pb::AgentId {
                        id: agent_id.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                print_agent(&a, out);
            }
            AgentCmd::Evict { agent_id } => {
                let a = client
                    .evict_agent(pb::AgentId {
                        id: agent_id.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                match out {
                    Output::Json => println!("{}", agent_json(&a)),
                    Output::Text => println!("Evicted agent {}", a.spiffe_id),
                }
            }
            AgentCmd::Ban { agent_id } => {
                let a = client
                    .ban_agent(pb::AgentId {
                        id: agent_id.clone(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                match out {
                    Output::Json => println!("{}", agent_json(&a)),
                    Output::Text => println!("Banned agent {}", a.spiffe_id),
                }
            }
        },
        Command::Authority(cmd) => {
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
                AuthorityAction::Taint { authority_id } => {
                    client.taint_authority(r(authority_id)).await
                }
                AuthorityAction::Revoke { authority_id } => {
                    client.revoke_authority(r(authority_id)).await
                }
            }
            .map_err(status)?
            .into_inner();
            print_authority(&one, out);
        }
        Command::Bundle(BundleCmd::Show { format }) => {
            let r = client
                .get_bundle(pb::GetBundleRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let b = r.bundle.unwrap_or_default();
            let pem = certs_to_pem(b.x509_authorities.iter().map(Vec::as_slice));
            match (out, format) {
                (Output::Json, BundleFormat::Pem) => println!(
                    "{}",
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence, "pem": pem})
                ),
                (_, BundleFormat::Spiffe) => println!("{}", r.spiffe_json),
                (Output::Text, BundleFormat::Pem) => print!("{pem}"),
            }
        }
        Command::Bundle(BundleCmd::Set {
            trust_domain,
            path,
            format,
        }) => {
            let data =
                std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let r = client
                .set_federated_bundle(pb::SetFederatedBundleRequest {
                    trust_domain: trust_domain.clone(),
                    format: match format {
                        BundleFormat::Pem => "pem",
                        BundleFormat::Spiffe => "spiffe",
                    }
                    .into(),
                    data,
                })
                .await
                .map_err(status)?
                .into_inner();
            let b = r.bundle.unwrap_or_default();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence,
                        "x509_authorities": b.x509_authorities.len(),
                        "jwt_authorities": b.jwt_authorities.iter().map(|k| &k.kid).collect::<Vec<_>>()})
                ),
                Output::Text => println!(
                    "Bundle of {} stored (sequence {})",
                    b.trust_domain, b.sequence
                ),
            }
        }
        Command::Bundle(BundleCmd::List { format }) => {
            let r = client
                .list_federated_bundles(pb::ListFederatedBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let items: Vec<Value> = r
                .bundles
                .iter()
                .map(|f| {
                    let b = f.bundle.clone().unwrap_or_default();
                    json!({"trust_domain": b.trust_domain, "sequence": b.sequence,
                        "refresh_hint": b.refresh_hint_seconds,
                        "pem": certs_to_pem(b.x509_authorities.iter().map(Vec::as_slice)),
                        "spiffe": serde_json::from_str::<Value>(&f.spiffe_json).unwrap_or(Value::Null)})
                })
                .collect();
            match (out, format) {
                (Output::Json, _) => println!("{}", json!({ "bundles": items })),
                (Output::Text, fmt) => {
                    for i in items {
                        println!(
                            "# spiffe://{} (sequence {})",
                            i["trust_domain"].as_str().unwrap_or_default(),
                            i["sequence"]
                        );
                        match fmt {
                            BundleFormat::Pem => {
                                print!("{}", i["pem"].as_str().unwrap_or_default())
                            }
                            BundleFormat::Spiffe => println!("{}", i["spiffe"]),
                        }
                    }
                }
            }
        }
        Command::Bundle(BundleCmd::Delete { trust_domain }) => {
            client
                .delete_federated_bundle(pb::TrustDomainRef {
                    trust_domain: trust_domain.clone(),
                })
                .await
                .map_err(status)?;
            println!("Deleted the bundle of {trust_domain}");
        }
        Command::Federation(cmd) => {
            let fed_json = |f: &pb::Federation| {
                json!({"trust_domain": f.trust_domain, "bundle_endpoint_url": f.bundle_endpoint_url,
                    "profile": f.profile, "endpoint_spiffe_id": f.endpoint_spiffe_id,
                    "last_refresh_at": f.last_refresh_at, "last_error": f.last_error,
                    "bundle_sequence": f.bundle_sequence})
            };
            let print_fed = |f: &pb::Federation| match out {
                Output::Json => println!("{}", fed_json(f)),
                Output::Text => println!(
                    "{}\t{}\t{}\t{}\tsequence {}\t{}",
                    f.trust_domain,
                    f.profile,
                    f.bundle_endpoint_url,
                    f.endpoint_spiffe_id,
                    f.bundle_sequence,
                    if f.last_error.is_empty() {
                        "ok"
                    } else {
                        f.last_error.as_str()
                    }
                ),
            };
            let td_ref = |td: &String| pb::TrustDomainRef {
                trust_domain: td.clone(),
            };
            match cmd {
                FederationCmd::Create {
                    trust_domain,
                    bundle_endpoint_url,
                    profile,
                    endpoint_spiffe_id,
                    trust_bundle,
                } => {
                    let trust_bundle = match trust_bundle {
                        Some(p) => {
                            std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?
                        }
                        None => Vec::new(),
                    };
                    let f = client
                        .create_federation(pb::Federation {
                            trust_domain: trust_domain.clone(),
                            bundle_endpoint_url: bundle_endpoint_url.clone(),
                            profile: profile.clone(),
                            endpoint_spiffe_id: endpoint_spiffe_id.clone().unwrap_or_default(),
                            trust_bundle,
                            ..Default::default()
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_fed(&f);
                }
                FederationCmd::List => {
                    let r = client
                        .list_federations(pb::ListFederationsRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    match out {
                        Output::Json => println!(
                            "{}",
                            json!({"federations": r.federations.iter().map(fed_json).collect::<Vec<_>>()})
                        ),
                        Output::Text => r.federations.iter().for_each(print_fed),
                    }
                }
                FederationCmd::Show { trust_domain } => {
                    let f = client
                        .get_federation(td_ref(trust_domain))
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_fed(&f);
                }
                FederationCmd::Delete { trust_domain } => {
                    let f = client
                        .delete_federation(td_ref(trust_domain))
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_fed(&f);
                }
                FederationCmd::Refresh { trust_domain } => {
                    let r = client
                        .refresh_federation(td_ref(trust_domain))
                        .await
                        .map_err(status)?
                        .into_inner();
                    let b = r.bundle.unwrap_or_default();
                    match out {
                        Output::Json => println!(
                            "{}",
                            json!({"trust_domain": b.trust_domain, "sequence": b.sequence})
                        ),
                        Output::Text => {
                            println!("Bundle of {} at sequence {}", b.trust_domain, b.sequence)
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
