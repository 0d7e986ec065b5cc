//! `run`: its flags, and the effective config they make with the config file.

use std::path::PathBuf;

use clap::Args;

use crate::config::ServerConfig;

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
    /// Datastore: sled (embedded, DATA_DIR/datastore; the default) or postgres (several
    /// servers on one database, with --datastore-url).
    #[arg(long, value_enum, value_name = "KIND")]
    pub datastore: Option<crate::config::DatastoreKind>,
    /// PostgreSQL URL, postgres://USER@HOST:PORT/DB[?sslmode=verify-full&sslrootcert=FILE],
    /// without a password: the password comes from [datastore] password_file or
    /// ZTID_DATASTORE_PASSWORD, never from the command line.
    #[arg(long, value_name = "URL")]
    pub datastore_url: Option<String>,
    /// Serve the OAuth 2.0 token endpoint (token exchange) over HTTPS on ADDR:PORT (off
    /// by default; `[sts] listen`, other `[sts]` keys keep their values or defaults).
    #[arg(long, value_name = "ADDR:PORT")]
    pub sts: Option<std::net::SocketAddr>,
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
    if let Some(k) = args.datastore {
        c.datastore.kind = k;
    }
    if let Some(u) = &args.datastore_url {
        c.datastore.url = Some(u.clone());
    }
    if let Some(listen) = args.sts {
        match &mut c.sts {
            Some(sts) => sts.listen = listen,
            None => c.sts = Some(crate::config::StsConfig::on(listen)),
        }
    }
    Ok(c)
}
