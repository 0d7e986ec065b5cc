//! The `ztid-agent` command line: `run`, the `api` verbs (a small Workload API
//! client), and `healthcheck`.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;
use ztid_proto::workload::{self as pb, spiffe_workload_api_client::SpiffeWorkloadApiClient};

use super::config::{AgentConfig, DEFAULT_SOCKET};
use super::token_exchange;
// Times and durations for people, spelled as `ztid-server` spells them.
use ztid_human as human;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// ztid-agent: attests this node and serves the SPIFFE Workload API.
#[derive(Debug, Parser)]
#[command(name = "ztid-agent", version, about)]
pub struct Cli {
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
    /// Run the agent.
    // Boxed: its flags make it far larger than the other verbs.
    Run(Box<RunArgs>),
    /// Talk to a running agent's Workload API.
    #[command(subcommand)]
    Api(ApiCmd),
    /// Exit 0 if the agent serves its Workload API socket (it does once attested and
    /// synced).
    Healthcheck {
        /// Workload API socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Keep trying for up to SECONDS (at most 600) while the agent is not serving
        /// yet, e.g. right after `ztid-agent run ... &`; 0, the default, tries once.
        #[arg(long, value_name = "SECONDS", default_value_t = 0, value_parser = wait_seconds())]
        wait: u64,
    },
    /// Print the shell completion script for SHELL, e.g.
    /// `ztid-agent completions bash > /usr/share/bash-completion/completions/ztid-agent`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ztid-agent.1 and one per verb) into DIR.
    Man {
        /// Directory to write into (created if missing), e.g. /usr/share/man/man1.
        dir: PathBuf,
    },
}

/// Flags of `run`; each overrides the config key of the same name.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Server node API address(es), HOST:PORT[,HOST:PORT...] (at most 16; IPv6 as
    /// [ADDR]:PORT; a name may resolve to several servers). Calls go to one server and
    /// move to the next when it does not answer; refusals are never retried elsewhere.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub server: Option<String>,
    /// PEM file with the trust domain's X.509 authorities.
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Do not verify the server for the first attestation.
    #[arg(long)]
    pub insecure_bootstrap: bool,
    /// Trust domain to expect.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Attestation method: join-token, tpm, sev-snp, tdx; or several hardware methods
    /// attesting together, comma-separated (tpm,sev-snp).
    #[arg(long)]
    pub attestor: Option<String>,
    /// Join token.
    #[arg(long, env = "ZTID_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// TPM TCTI.
    #[arg(long)]
    pub tpm_tcti: Option<String>,
    /// Which EK to attest with: auto (RSA-2048 if certified, else ECC), rsa, ecc,
    /// ecc-p256, ecc-p384.
    #[arg(long)]
    pub tpm_ek: Option<String>,
    /// Root of the configfs-tsm report tree (sev-snp, tdx).
    #[arg(long)]
    pub tsm_root: Option<PathBuf>,
    /// SEV-SNP reports through the SVSM's vTPM service, binding the vTPM's EK into the
    /// report (for `--attestor tpm,sev-snp` on a guest with an SVSM vTPM).
    #[arg(long)]
    pub sev_snp_svsm_vtpm: bool,
    /// Workload API socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Sync interval in seconds.
    #[arg(long)]
    pub sync_interval: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve /metrics, /live and /ready on ADDR:PORT (off by default).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Cap on open Workload API connections (default 1024; the descriptor limit may
    /// lower it).
    #[arg(long, value_name = "N")]
    pub workload_max_connections: Option<usize>,
    /// Seconds a Workload API connection may stay without a request in progress
    /// (default 30).
    #[arg(long, value_name = "SECONDS")]
    pub workload_idle_timeout: Option<u64>,
    /// Cap on the process instances the agent holds identities for at once (default
    /// 4096; one uid holds at most half of it): beyond it a new process is refused and
    /// nothing is minted for it.
    #[arg(long, value_name = "N")]
    pub workload_max_instances: Option<usize>,
    /// Per-instance identities minted ahead per entry set for new processes (default 2,
    /// at most 16; 0 turns it off).
    #[arg(long, value_name = "N")]
    pub svid_pool_size: Option<usize>,
    /// Container runtime to attest workloads through, unix:///PATH (repeatable): its
    /// docker-compatible API (podman, docker). Gives container:* and k8s:* selectors,
    /// and systemd:unit. Off unless given.
    #[arg(long = "container-socket", value_name = "unix:///PATH")]
    pub container_socket: Vec<String>,
    /// Give systemd:unit selectors (the unit a workload runs in), also without
    /// --container-socket.
    #[arg(long)]
    pub systemd_unit_selectors: bool,
}

/// `api` verbs.
#[derive(Debug, Subcommand)]
pub enum ApiCmd {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCmd),
    /// Validate.
    #[command(subcommand)]
    Validate(ValidateCmd),
}

/// `api fetch` verbs.
#[derive(Debug, Subcommand)]
pub enum FetchCmd {
    /// Fetch this process's X509-SVIDs.
    X509 {
        /// Workload API socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        /// Keep trying for up to SECONDS (at most 600) while the agent is unreachable or
        /// has no identity for this process yet (an entry just created takes a moment to
        /// reach the agent); 0, the default, tries once.
        #[arg(long, value_name = "SECONDS", default_value_t = 0, value_parser = wait_seconds())]
        wait: u64,
    },
    /// Exchange this process's X509-SVID for an OAuth access token at the server's token
    /// endpoint (RFC 8693 token exchange over mutual TLS; the token is bound to the SVID).
    /// Prints the token, then its life, scope and type (`--output json`: the endpoint's
    /// answer as it is).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["resource", "audience"])))]
    Token {
        /// The resource the token is for: an absolute URI (RFC 8707).
        #[arg(long, value_name = "URL")]
        resource: Option<String>,
        /// The audience the token is for, a logical name (instead of --resource).
        #[arg(long, value_name = "NAME")]
        audience: Option<String>,
        /// A scope to ask for, repeatable (none: every scope the grant allows).
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
        /// Only this SPIFFE ID may act for this process with the token (`may_act`).
        #[arg(long, value_name = "SPIFFE_ID")]
        may_act: Option<String>,
        /// The token endpoint, https://SERVER:PORT/token (default: $ZTID_TOKEN_ENDPOINT).
        #[arg(long, value_name = "URL")]
        token_endpoint: Option<String>,
        /// Workload API socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Fetch this process's JWT-SVIDs.
    Jwt {
        /// Audience, repeatable.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Workload API socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// `api validate` verbs.
#[derive(Debug, Subcommand)]
pub enum ValidateCmd {
    /// Validate a JWT-SVID.
    Jwt {
        /// Audience.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        token: String,
        /// Workload API socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

/// Builds the effective config for `run`.
pub fn run_config(a: &RunArgs) -> Result<AgentConfig, crate::Error> {
    let mut c = match &a.config {
        Some(p) => AgentConfig::from_file(p)?,
        None => AgentConfig::default(),
    };
    if let Some(s) = &a.server {
        c.server = Some(s.clone());
    }
    if let Some(v) = &a.trust_bundle {
        c.trust_bundle = Some(v.clone());
    }
    c.insecure_bootstrap |= a.insecure_bootstrap;
    if let Some(v) = &a.trust_domain {
        c.trust_domain = Some(v.clone());
    }
    if let Some(v) = &a.attestor {
        c.attestor = v.clone();
    }
    if let Some(v) = &a.join_token {
        c.join_token = Some(v.clone());
    }
    if let Some(v) = &a.tpm_tcti {
        c.tpm_tcti = v.clone();
    }
    if let Some(v) = &a.tpm_ek {
        c.tpm_ek = v.clone();
    }
    if let Some(v) = &a.tsm_root {
        c.tsm_root = v.clone();
    }
    if a.sev_snp_svsm_vtpm {
        c.sev_snp_svsm_vtpm = true;
    }
    if let Some(v) = &a.socket {
        c.socket = v.clone();
    }
    if let Some(v) = &a.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = a.sync_interval {
        c.sync_interval_seconds = v;
    }
    if let Some(v) = &a.log_format {
        c.log_format = v.clone();
    }
    if let Some(v) = a.metrics {
        c.metrics = Some(v);
    }
    if let Some(v) = a.workload_max_connections {
        c.workload_max_connections = v;
    }
    if let Some(v) = a.workload_idle_timeout {
        c.workload_idle_timeout_seconds = v;
    }
    if let Some(v) = a.workload_max_instances {
        c.workload_max_instances = v;
    }
    if let Some(v) = a.svid_pool_size {
        c.svid_pool_size = v;
    }
    if !a.container_socket.is_empty() {
        c.container_sockets = a.container_socket.clone();
    }
    c.systemd_unit_selectors |= a.systemd_unit_selectors;
    Ok(c)
}

/// The socket an `api` verb talks to: the flag, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
pub fn socket_path(flag: &Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.clone());
    }
    if let Ok(addr) = std::env::var("SPIFFE_ENDPOINT_SOCKET") {
        return ztid_proto::transport::parse_unix_endpoint(&addr).ok_or_else(|| {
            format!("SPIFFE_ENDPOINT_SOCKET {addr:?} is not a unix:///path address")
        });
    }
    Ok(PathBuf::from(DEFAULT_SOCKET))
}

async fn client(socket: &Option<PathBuf>) -> Result<SpiffeWorkloadApiClient<Channel>, String> {
    Ok(SpiffeWorkloadApiClient::new(
        channel(socket).await.map_err(|f| f.message)?,
    ))
}

/// A channel to the agent's socket; a missing socket or one nobody listens on yet is
/// transient (the agent may be starting).
async fn channel(socket: &Option<PathBuf>) -> Result<Channel, Failure> {
    let path = socket_path(socket).map_err(Failure::fatal)?;
    ztid_proto::transport::unix_channel(&path)
        .await
        .map_err(|e| Failure {
            transient: matches!(
                io_kind(&e),
                Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
            ),
            message: unreachable_socket(&path, &e),
        })
}

/// The upper bound of `--wait`: a readiness wait is seconds, not hours.
const MAX_WAIT_SECONDS: u64 = 600;

fn wait_seconds() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(0..=MAX_WAIT_SECONDS)
}

/// Why one try of a `--wait` verb failed, and whether trying again may succeed.
struct Failure {
    transient: bool,
    message: String,
}

impl Failure {
    fn fatal(message: String) -> Self {
        Self {
            transient: false,
            message,
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `wait_s` seconds pass (retrying
/// every 100 ms); with `wait_s` 0 it runs once, unbounded as before.
async fn retrying<T, F, Fut>(wait_s: u64, what: &str, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    if wait_s == 0 {
        return attempt().await.map_err(|f| f.message);
    }
    let wait = std::time::Duration::from_secs(wait_s);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let last = match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(f)) if !f.transient => return Err(f.message),
            Ok(Err(f)) => f.message,
            Err(_) => "no answer".to_string(),
        };
        if tokio::time::Instant::now() + std::time::Duration::from_millis(100) >= deadline {
            return Err(format!("{what} within {wait_s} s (--wait): {last}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The first I/O error kind in `err`'s chain.
fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

/// Why the Workload API socket at `path` cannot be reached, and what to do, in one line.
fn unreachable_socket(path: &std::path::Path, err: &(dyn std::error::Error + 'static)) -> String {
    let head = format!("cannot reach the Workload API at {}", path.display());
    let elsewhere =
        "or name the agent's socket with --socket PATH or SPIFFE_ENDPOINT_SOCKET=unix:///PATH";
    let mut kind = None;
    let mut causes = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kind = kind.or(Some(io.kind()));
        }
        causes.push_str(&format!(": {e}"));
        cur = e.source();
    }
    match kind {
        Some(std::io::ErrorKind::NotFound) => {
            format!("{head}: no such socket: start the agent (`ztid-agent run`), {elsewhere}")
        }
        Some(std::io::ErrorKind::ConnectionRefused) => format!(
            "{head}: nothing listens on it (the agent is not running): start it, {elsewhere}"
        ),
        Some(std::io::ErrorKind::PermissionDenied) => format!(
            "{head}: permission denied: the socket or its directory is closed to uid {}; the agent's socket directory must let workloads in (see --socket), {elsewhere}",
            nix::unistd::getuid()
        ),
        _ => format!("{head}: {causes}"),
    }
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        ztid_proto::WORKLOAD_API_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn split_der_chain(mut der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use x509_parser::prelude::*;
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = X509Certificate::from_der(der)
            .map_err(|e| format!("bad certificate in response: {e}"))?;
        // The parser hands back the bytes after the certificate, a suffix of `der`.
        let cert = der
            .strip_suffix(rest)
            .ok_or("certificate parser returned bytes that are not the rest of its input")?;
        out.push(cert.to_vec());
        der = rest;
    }
    Ok(out)
}

/// Writes `bytes` to `path` with `mode`: into a new file of a random name beside it
/// (created exclusively, with `mode`, never through a symlink), then renamed over `path`.
/// So an existing file's mode, owner or open descriptors never see the new bytes (a
/// reader holding the old file open keeps the old content), and a symlink planted at
/// `path` is replaced, not followed.
fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| format!("writing {}: no randomness for a file name", path.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            // The umask may have narrowed `mode`; it is never wider than asked.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

/// This process's X509-SVIDs: the first answer of a FetchX509SVID stream.
async fn fetch_x509(socket: &Option<PathBuf>) -> Result<pb::X509svidResponse, String> {
    fetch_x509_once(socket).await.map_err(|f| f.message)
}

/// [`fetch_x509`], saying whether a retry may succeed: "no identity issued"
/// (PermissionDenied) is transient while an entry is on its way to the agent.
async fn fetch_x509_once(socket: &Option<PathBuf>) -> Result<pb::X509svidResponse, Failure> {
    let status = |s: tonic::Status| Failure {
        transient: matches!(
            s.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unavailable
        ),
        message: format!("{:?}: {}", s.code(), s.message()),
    };
    let mut c = SpiffeWorkloadApiClient::new(channel(socket).await?);
    let mut stream = c
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .map_err(status)?
        .into_inner();
    stream
        .message()
        .await
        .map_err(status)?
        .ok_or_else(|| Failure::fatal("the agent closed the stream without an answer".to_string()))
}

/// `api fetch token`: the exchange with this process's first (default) X509-SVID.
async fn fetch_token(
    out: Output,
    socket: &Option<PathBuf>,
    endpoint: Option<&str>,
    request: token_exchange::ExchangeRequest,
) -> Result<(), String> {
    // The endpoint first: a missing one is reported without touching the agent.
    let endpoint = token_exchange::Endpoint::parse(
        &token_exchange::endpoint_url(endpoint).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    request.form().map_err(|e| e.to_string())?;
    let mut resp = fetch_x509(socket).await?;
    let svid = resp
        .svids
        .first_mut()
        .ok_or("the agent answered without an X509-SVID")?;
    // The endpoint must be the server of the caller's own trust domain.
    let server_id = ztid_spiffe::spiffe_id::parse(&svid.spiffe_id)
        .map(|id| ztid_spiffe::spiffe_id::server_id(id.trust_domain()).to_string())
        .map_err(|e| format!("the agent answered with an unusable SPIFFE ID: {e}"))?;
    let identity = token_exchange::ClientIdentity {
        server_id,
        chain: split_der_chain(&svid.x509_svid)?,
        // Moved out of the answer, not copied: the one copy left is zeroized on drop.
        key: zeroize::Zeroizing::new(std::mem::take(&mut svid.x509_svid_key)),
        roots: split_der_chain(&svid.bundle)?,
    };
    let (token, body) = token_exchange::exchange(&endpoint, &identity, &request)
        .await
        .map_err(|e| e.to_string())?;
    match out {
        Output::Json => println!("{}", answer_json(&body)?),
        Output::Text => {
            // What the token endpoint sent, escaped for the terminal (a real token and
            // scope hold nothing to escape).
            println!("{}", human::shown(&token.access_token));
            match token.expires_in {
                Some(s) => {
                    let at = human::now_unix().saturating_add(i64::try_from(s).unwrap_or(i64::MAX));
                    println!(
                        "expires in        : {} (at {})",
                        human::duration(i64::try_from(s).unwrap_or(i64::MAX)),
                        human::rfc3339(at)
                    );
                }
                None => println!("expires in        : (not said)"),
            }
            println!(
                "scope             : {}",
                human::shown(token.scope.as_deref().unwrap_or(""))
            );
            println!(
                "issued_token_type : {}",
                human::shown(&token.issued_token_type)
            );
        }
    }
    Ok(())
}

/// The token endpoint's JSON answer as `api fetch token --output json` prints it:
/// rewritten, not echoed, so it is one line whatever whitespace the endpoint put between
/// its tokens (JSON allows a CR there, which would overwrite the line on a terminal).
fn answer_json(body: &[u8]) -> Result<String, String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| v.to_string())
        .map_err(|e| format!("the token endpoint's answer is not JSON: {e}"))
}

/// Runs an `api` or `healthcheck` verb.
pub async fn client_verb(cli: &Cli) -> Result<(), String> {
    let out = cli.output;
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match &cli.command {
        Command::Run(_) => unreachable!("run is not a client verb"),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "ztid-agent", &mut std::io::stdout());
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            // Every page's header names the version, not only the top one's.
            clap_mangen::generate_to(Cli::command().propagate_version(true), dir)
                .map_err(|e| format!("writing man pages into {}: {e}", dir.display()))?;
            println!("Wrote the man pages to {}", dir.display());
        }
        Command::Healthcheck { socket, wait } => {
            retrying(*wait, "the agent did not serve", || async {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel(socket).await?);
                let r = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|s| Failure {
                        transient: s.code() == tonic::Code::Unavailable,
                        message: status(s),
                    })?
                    .into_inner();
                let serving = r.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                if !serving {
                    return Err(Failure {
                        transient: true,
                        message: "agent is not serving".into(),
                    });
                }
                Ok(())
            })
            .await?;
            match out {
                Output::Json => println!("{}", json!({"status": "SERVING"})),
                Output::Text => println!("Agent is healthy."),
            }
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::Token {
            resource,
            audience,
            scopes,
            may_act,
            token_endpoint,
            socket,
        })) => {
            let target = match (resource, audience) {
                (Some(r), _) => token_exchange::Target::Resource(r.clone()),
                (None, Some(a)) => token_exchange::Target::Audience(a.clone()),
                (None, None) => return Err("pass --resource URL or --audience NAME".into()),
            };
            let request = token_exchange::ExchangeRequest {
                target,
                scopes: scopes.clone(),
                may_act: may_act.clone(),
            };
            fetch_token(out, socket, token_endpoint.as_deref(), request).await?;
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::X509 {
            socket,
            write,
            wait,
        })) => {
            let started = std::time::Instant::now();
            let resp = retrying(*wait, "no X509-SVID came", || fetch_x509_once(socket)).await?;
            let elapsed = started.elapsed();
            let mut listed = Vec::new();
            for (i, s) in resp.svids.iter().enumerate() {
                let chain = split_der_chain(&s.x509_svid)?;
                let bundle = split_der_chain(&s.bundle)?;
                let leaf = chain.first().ok_or("empty SVID chain")?;
                let not_after = crate::svid::not_after(leaf).map_err(|e| e.to_string())?;
                if let Some(dir) = write {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    let pem_chain = crate::svid::certs_to_pem(chain.iter().map(Vec::as_slice));
                    write_file(
                        &dir.join(format!("svid.{i}.pem")),
                        pem_chain.as_bytes(),
                        0o644,
                    )?;
                    let key_pem =
                        crate::svid::pem_lf(&pem::Pem::new("PRIVATE KEY", s.x509_svid_key.clone()));
                    write_file(
                        &dir.join(format!("svid.{i}.key")),
                        key_pem.as_bytes(),
                        0o600,
                    )?;
                    let pem_bundle = crate::svid::certs_to_pem(bundle.iter().map(Vec::as_slice));
                    write_file(
                        &dir.join(format!("bundle.{i}.pem")),
                        pem_bundle.as_bytes(),
                        0o644,
                    )?;
                }
                listed.push(
                    json!({"spiffe_id": s.spiffe_id, "expires_at": not_after, "hint": s.hint,
                    "chain_length": chain.len(), "bundle_authorities": bundle.len()}),
                );
            }
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"svids": listed, "federated_bundles": resp.federated_bundles.keys().collect::<Vec<_>>()})
                ),
                Output::Text => {
                    println!(
                        "Received {} svid after {}",
                        resp.svids.len(),
                        human::elapsed(elapsed)
                    );
                    for l in &listed {
                        println!();
                        println!(
                            "SPIFFE ID         : {}",
                            human::shown(l["spiffe_id"].as_str().unwrap_or_default())
                        );
                        match l["expires_at"].as_i64() {
                            Some(at) => println!("SVID valid until  : {}", human::expiry(at)),
                            None => println!("SVID valid until  : {}", l["expires_at"]),
                        }
                        println!("Chain length      : {}", l["chain_length"]);
                        println!("Bundle authorities: {}", l["bundle_authorities"]);
                    }
                    if let Some(dir) = write {
                        println!();
                        println!("Written to {}", dir.display());
                    }
                }
            }
        }
        Command::Api(ApiCmd::Fetch(FetchCmd::Jwt {
            audience,
            spiffe_id,
            socket,
        })) => {
            let mut c = client(socket).await?;
            let resp = c
                .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
                    audience: audience.clone(),
                    spiffe_id: spiffe_id.clone().unwrap_or_default(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!(
                    "{}",
                    json!({"svids": resp.svids.iter().map(|s| json!({"spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint})).collect::<Vec<_>>()})
                ),
                Output::Text => {
                    for s in &resp.svids {
                        println!(
                            "token({}):\n\t{}",
                            human::shown(&s.spiffe_id),
                            human::shown(&s.svid)
                        );
                    }
                }
            }
        }
        Command::Api(ApiCmd::Validate(ValidateCmd::Jwt {
            audience,
            token,
            socket,
        })) => {
            let mut c = client(socket).await?;
            let resp = c
                .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
                    audience: audience.clone(),
                    svid: token.clone(),
                }))
                .await
                .map_err(status)?
                .into_inner();
            match out {
                Output::Json => println!("{}", json!({"spiffe_id": resp.spiffe_id, "valid": true})),
                Output::Text => println!(
                    "SVID is valid.\nSPIFFE ID : {}",
                    human::shown(&resp.spiffe_id)
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_come_from_the_clap_definitions() {
        let dir = tempfile::tempdir().unwrap();
        clap_mangen::generate_to(Cli::command().propagate_version(true), dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("ztid-agent-api-fetch-x509.1")).unwrap();
        assert!(page.contains(".TH") && page.contains(env!("CARGO_PKG_VERSION")));
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "ztid-agent",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("fetch") && script.contains("--trust-bundle"));
    }

    /// The endpoint's answer is printed as one line of JSON, with nothing raw of what it
    /// sent between tokens (a CR that would overwrite the line, a forged second line).
    #[test]
    fn the_token_answer_is_rewritten_not_echoed() {
        let body = b"{\"access_token\":\"a.b.c\",\r\"issued_token_type\":\"urn:x\\u001b\"}\n\r\n";
        let printed = answer_json(body).unwrap();
        assert!(!printed.contains(['\r', '\n', '\x1b']), "{printed:?}");
        let v: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(v["issued_token_type"], "urn:x\u{1b}");
        assert!(answer_json(b"not json").unwrap_err().contains("not JSON"));
    }

    /// `api fetch x509 --write DIR` writes `svid.N.key` through `write_file(.., 0o600)`:
    /// an existing key file with a loose mode (held open by a reader) is replaced by a new
    /// 0600 file, and a symlink planted at that name is replaced, not followed.
    #[test]
    fn write_file_replaces_an_existing_file_and_follows_no_symlink() {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("svid.0.key");
        std::fs::write(&key, b"old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut reader = std::fs::File::open(&key).unwrap();
        write_file(&key, b"-----BEGIN PRIVATE KEY-----", 0o600).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"-----BEGIN PRIVATE KEY-----");
        let mut seen = Vec::new();
        reader.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, b"old", "a reader of the old file never sees the key");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)).unwrap();
        let link = dir.path().join("svid.1.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_file(&link, b"-----BEGIN PRIVATE KEY-----", 0o600).unwrap();
        assert!(
            std::fs::read(&target).unwrap().is_empty(),
            "nothing written through the link"
        );
        assert!(!std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            std::fs::read(&link).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
    }
}
