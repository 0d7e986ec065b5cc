//! Server configuration: a TOML file, overridden by command-line flags. Every key
//! has a default, so `--trust-domain` and `--data-dir` alone make a working server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use spiffe::TrustDomain;

use crate::{Error, Result};

/// Settings of `ztid-server run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The trust domain this server is the authority of.
    pub trust_domain: String,
    /// Where the datastore and key files live.
    pub data_dir: PathBuf,
    /// Node API listen address (TLS).
    pub bind: SocketAddr,
    /// Admin socket path; default `DATA_DIR/admin.sock`.
    pub admin_socket: Option<PathBuf>,
    /// Uids admitted on the admin socket; default: the server's own uid.
    pub admin_uids: Vec<u32>,
    /// Lifetime of the X.509 CA certificate, seconds.
    pub ca_ttl_seconds: i64,
    /// Lifetime of the JWT signing key, seconds.
    pub jwt_key_ttl_seconds: i64,
    /// Default X509-SVID lifetime, seconds.
    pub x509_svid_ttl_seconds: i64,
    /// Default JWT-SVID lifetime, seconds.
    pub jwt_svid_ttl_seconds: i64,
    /// Agent SVID lifetime, seconds.
    pub agent_svid_ttl_seconds: i64,
    /// Default join token lifetime, seconds.
    pub join_token_ttl_seconds: i64,
    /// `spiffe_refresh_hint` of the bundle, seconds.
    pub bundle_refresh_hint_seconds: i64,
    /// Key manager backend: `software`, `pkcs11` or `tpm`.
    pub key_manager: String,
    /// PKCS#11 settings (`key_manager = "pkcs11"`).
    pub pkcs11: Option<Pkcs11Config>,
    /// TPM TCTI for `key_manager = "tpm"` (e.g. `swtpm:host=127.0.0.1,port=2321`);
    /// unset: `device:/dev/tpmrm0`. Key blobs live in `DATA_DIR/tpm-keys`.
    pub tpm_tcti: Option<String>,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// Telemetry listener (`/metrics`, `/live`, `/ready`), `ADDR:PORT`; off when unset.
    pub metrics: Option<SocketAddr>,
    /// Cedar issuance policy every attestation and mint must satisfy; absent: none.
    pub issuance_policy: Option<PathBuf>,
    /// The remote admin API over mutual TLS; absent (the default): off.
    pub remote_admin: Option<RemoteAdminConfig>,
    /// Upstream authority; absent: ztid's X.509 authorities are self-signed roots.
    pub upstream: Option<UpstreamConfig>,
    /// Keep the tamper-evident audit log (`DATA_DIR/audit`). On by default; turning it
    /// off is for benchmarks.
    pub audit_enabled: bool,
    /// Node attestation methods beyond join tokens; a method is enabled by its table.
    pub attestors: AttestorsConfig,
    /// SPIFFE bundle endpoint listener, `ADDR:PORT`; off when unset. Profile
    /// `https_spiffe` (the server's own SVID) unless `bundle_endpoint_cert` is set.
    pub bundle_endpoint: Option<SocketAddr>,
    /// PEM certificate chain for the `https_web` profile of the bundle endpoint.
    pub bundle_endpoint_cert: Option<PathBuf>,
    /// PEM PKCS#8 key for `bundle_endpoint_cert` (owner-only file).
    pub bundle_endpoint_key: Option<PathBuf>,
    /// PEM roots for `https_web` federation endpoints; default: the system's
    /// `/etc/ssl/certs/ca-certificates.crt`.
    pub federation_web_roots: Option<PathBuf>,
    /// Lower and upper bounds on the federation poll interval, seconds.
    pub federation_min_refresh_seconds: i64,
    /// See `federation_min_refresh_seconds`.
    pub federation_max_refresh_seconds: i64,
    /// `[[federation]]` relationships from config (re-applied at every start).
    pub federation: Vec<FederationConfig>,
    /// `[oidc]` discovery listener; off when unset.
    pub oidc: Option<OidcConfig>,
    /// `[sts]` OAuth 2.0 token endpoint (token exchange, issue 14); off when unset.
    pub sts: Option<StsConfig>,
    /// `[limits]`: listener timeouts and connection caps, refusal audit and mint-rate
    /// bounds (see `crate::limits`).
    pub limits: crate::limits::LimitsConfig,
    /// `[datastore]`: sled in `DATA_DIR/datastore` (the default) or PostgreSQL.
    pub datastore: DatastoreConfig,
}

/// Which datastore (`--datastore`, `[datastore] kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// Embedded, in `DATA_DIR/datastore`: one server.
    #[default]
    Sled,
    /// PostgreSQL at `url`: several servers on one database.
    Postgres,
}

/// `[datastore]`. The password is never in this file nor in the URL: it is read from
/// `password_file` or the `ZTID_DATASTORE_PASSWORD` environment variable.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatastoreConfig {
    /// `sled` or `postgres`.
    pub kind: DatastoreKind,
    /// PostgreSQL only: `postgres://USER@HOST[:PORT]/DB[?sslmode=...&sslrootcert=PATH]`.
    pub url: Option<String>,
    /// PostgreSQL only: file holding the role's password (owner-only).
    pub password_file: Option<PathBuf>,
    /// How long entry changes stay in the change log (and expired join tokens in the
    /// store); default [`DEFAULT_CHANGE_LOG_RETENTION_SECONDS`]. An agent that has not
    /// synced for longer gets its whole entry set at its next sync.
    pub change_log_retention_seconds: Option<u64>,
}

/// The default of `[datastore] change_log_retention_seconds`: one day.
pub const DEFAULT_CHANGE_LOG_RETENTION_SECONDS: u64 = 86_400;

impl DatastoreConfig {
    /// How long entry changes and expired join tokens are kept.
    pub fn change_log_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.change_log_retention_seconds
                .unwrap_or(DEFAULT_CHANGE_LOG_RETENTION_SECONDS),
        )
    }

    /// Refuses settings that do not go together.
    pub fn validate(&self) -> Result<()> {
        if self
            .change_log_retention_seconds
            .is_some_and(|s| !(60..=31_536_000).contains(&s))
        {
            return Err(Error::Config(
                "[datastore] change_log_retention_seconds must be between 60 and 31536000 (a year)"
                    .into(),
            ));
        }
        match self.kind {
            DatastoreKind::Sled if self.url.is_some() => Err(Error::Config(
                "--datastore-url ([datastore] url) is for --datastore postgres; \
                 the sled datastore lives in DATA_DIR/datastore"
                    .into(),
            )),
            DatastoreKind::Sled if self.password_file.is_some() => Err(Error::Config(
                "[datastore] password_file is for the postgres datastore".into(),
            )),
            DatastoreKind::Postgres if self.url.as_deref().is_none_or(str::is_empty) => {
                Err(Error::Config(
                    "--datastore postgres needs --datastore-url postgres://USER@HOST:PORT/DB \
                     ([datastore] url)"
                        .into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// `[[federation]]`: a relationship as configured (the federation module stores it as
/// a `FederationRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The federated trust domain (`example.org`).
    pub trust_domain: String,
    /// Its bundle endpoint (`https://...`).
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// `https_spiffe`: the SPIFFE ID the endpoint must present.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_spiffe`: initial trust bundle (SPIFFE JSON or PEM), used while no bundle
    /// of the domain is stored. In config: a file path; stored: its contents.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
}

/// `[oidc]`: the OIDC discovery document and JWKS on their own listener (plain HTTP:
/// put TLS in front of it), and the `iss` claim of JWT-SVIDs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Issuer URL (`https://oidc.example.org`), also the JWT-SVIDs' `iss`.
    pub issuer: String,
}

/// `[sts]`: the OAuth 2.0 token endpoint (RFC 8693 token exchange, RFC 8414 metadata,
/// RFC 7662 introspection) on its own HTTPS listener; see docs/token-exchange.md.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsConfig {
    /// Listen address (`--sts ADDR:PORT`).
    pub listen: SocketAddr,
    /// The `iss` of every token and the base of the endpoint URLs in the metadata;
    /// default `https://<listen>` (see [`StsConfig::issuer`]).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Extra DNS names in the endpoint's certificate (besides `localhost`).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// A token's lifetime when its grant names none, seconds.
    #[serde(default = "StsConfig::default_ttl")]
    pub default_ttl_seconds: i64,
    /// The longest lifetime any grant may name, seconds.
    #[serde(default = "StsConfig::max_ttl")]
    pub max_ttl_seconds: i64,
    /// Actors in one `act` delegation chain, at most.
    #[serde(default = "StsConfig::max_depth")]
    pub max_delegation_depth: usize,
    /// Put the caller's verified node facts in the token.
    #[serde(default = "StsConfig::yes")]
    pub node_claims: bool,
    /// A larger request body is refused (413) without being read.
    #[serde(default = "StsConfig::max_request")]
    pub max_request_bytes: usize,
    /// Concurrent connections on the listener, at most.
    #[serde(default = "StsConfig::max_conns")]
    pub max_connections: usize,
}

impl StsConfig {
    /// Default of `default_ttl_seconds`.
    pub const DEFAULT_TTL_SECONDS: i64 = 300;
    /// Default of `max_ttl_seconds`.
    pub const DEFAULT_MAX_TTL_SECONDS: i64 = 3600;
    /// No token lives longer than a day, whatever the configuration says.
    pub const TTL_CEILING_SECONDS: i64 = 86_400;
    /// Default of `max_delegation_depth`.
    pub const DEFAULT_MAX_DELEGATION_DEPTH: usize = 3;
    /// Default of `max_request_bytes`.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024;
    /// Default of `max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

    fn default_ttl() -> i64 {
        Self::DEFAULT_TTL_SECONDS
    }
    fn max_ttl() -> i64 {
        Self::DEFAULT_MAX_TTL_SECONDS
    }
    fn max_depth() -> usize {
        Self::DEFAULT_MAX_DELEGATION_DEPTH
    }
    fn yes() -> bool {
        true
    }
    fn max_request() -> usize {
        Self::DEFAULT_MAX_REQUEST_BYTES
    }
    fn max_conns() -> usize {
        Self::DEFAULT_MAX_CONNECTIONS
    }

    /// The endpoint on `listen` with every other setting at its default (`--sts`).
    pub fn on(listen: SocketAddr) -> Self {
        Self {
            listen,
            issuer: None,
            dns_names: Vec::new(),
            default_ttl_seconds: Self::DEFAULT_TTL_SECONDS,
            max_ttl_seconds: Self::DEFAULT_MAX_TTL_SECONDS,
            max_delegation_depth: Self::DEFAULT_MAX_DELEGATION_DEPTH,
            node_claims: true,
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// The issuer in effect: the configured one, else `https://<listen>`
    /// (`https://[::1]:8443` for an IPv6 address; `SocketAddr`'s display brackets it).
    pub fn issuer(&self) -> String {
        match &self.issuer {
            Some(issuer) => issuer.clone(),
            None => format!("https://{}", self.listen),
        }
    }

    /// Refuses settings that do not go together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("[sts] {m}")));
        if self.default_ttl_seconds <= 0 {
            return bad("default_ttl_seconds must be positive".into());
        }
        if self.default_ttl_seconds > self.max_ttl_seconds {
            return bad(format!(
                "default_ttl_seconds ({}) must not exceed max_ttl_seconds ({})",
                self.default_ttl_seconds, self.max_ttl_seconds
            ));
        }
        if self.max_ttl_seconds > Self::TTL_CEILING_SECONDS {
            return bad(format!(
                "max_ttl_seconds ({}) must not exceed {} (a day)",
                self.max_ttl_seconds,
                Self::TTL_CEILING_SECONDS
            ));
        }
        if !(1..=16).contains(&self.max_delegation_depth) {
            return bad(format!(
                "max_delegation_depth ({}) must be between 1 and 16",
                self.max_delegation_depth
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.max_request_bytes) {
            return bad(format!(
                "max_request_bytes ({}) must be between 1024 and 1048576 (1 MiB)",
                self.max_request_bytes
            ));
        }
        if self.max_connections == 0 {
            return bad("max_connections must be positive".into());
        }
        if let Some(issuer) = &self.issuer {
            check_issuer(issuer).or_else(|why| {
                bad(format!(
                    "issuer {issuer:?} {why} (an https URL without query or fragment, \
                     e.g. https://sts.example.org)"
                ))
            })?;
        }
        for name in &self.dns_names {
            let valid = !name.is_empty()
                && name.len() <= 253
                && rustls_pki_types::DnsName::try_from(name.as_str()).is_ok()
                && name.parse::<std::net::IpAddr>().is_err();
            if !valid {
                return bad(format!("dns_names: {name:?} is not a DNS name"));
            }
        }
        Ok(())
    }
}

/// The host of a configured `[sts] issuer`, when it is one a certificate can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerHost {
    /// A DNS name, lowercase.
    Dns(String),
    /// An IP address.
    Ip(std::net::IpAddr),
}

impl StsConfig {
    /// The host of the configured issuer (validated by [`StsConfig::validate`]), when
    /// it is a name or address the endpoint's certificate can carry.
    pub fn issuer_host(&self) -> Option<IssuerHost> {
        let uri: http::Uri = self.issuer.as_deref()?.parse().ok()?;
        let host = uri.host()?;
        let unbracketed = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = unbracketed.parse::<std::net::IpAddr>() {
            return Some(IssuerHost::Ip(ip));
        }
        let name = host.to_ascii_lowercase();
        rustls_pki_types::DnsName::try_from(name.as_str()).ok()?;
        Some(IssuerHost::Dns(name))
    }
}

/// The DNS names every server's own certificate may carry whatever its config: names no
/// workload may hold (see [`ServerConfig::server_dns_names`]).
pub const ALWAYS_SERVER_DNS_NAMES: &[&str] = &["localhost"];

impl ServerConfig {
    /// The DNS names of this server's own TLS certificate: with `[sts]`, `localhost`,
    /// `[sts] dns_names` and the issuer's host, which HTTPS clients of the token endpoint
    /// check against the URL while trusting the bundle (SPIFFE peers ignore them and
    /// check the URI SAN). An entry naming one of them would give a workload a
    /// certificate those clients take for the server's, so entries may not.
    pub fn server_dns_names(&self) -> Vec<String> {
        let Some(sts) = &self.sts else {
            return Vec::new();
        };
        let mut names: Vec<String> = ALWAYS_SERVER_DNS_NAMES
            .iter()
            .map(|n| n.to_string())
            .collect();
        let issuer_host = match sts.issuer_host() {
            Some(IssuerHost::Dns(name)) => Some(name),
            _ => None,
        };
        for name in sts.dns_names.iter().cloned().chain(issuer_host) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// Why `issuer` is not an RFC 8414 issuer: https, a host, no query, no fragment, and no
/// trailing `/` (the endpoint URLs are the issuer followed by `/token` and so on).
fn check_issuer(issuer: &str) -> std::result::Result<(), &'static str> {
    let Some(rest) = issuer.strip_prefix("https://") else {
        return Err("is not an https URL");
    };
    if issuer.contains('?') || issuer.contains('#') {
        return Err("has a query or fragment");
    }
    if issuer.ends_with('/') {
        return Err("ends with '/'");
    }
    let uri: http::Uri = issuer.parse().map_err(|_| "is not a URL")?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() || rest.starts_with('/') || rest.contains('@') {
        return Err("has no host (or has user info)");
    }
    Ok(())
}

/// `[pkcs11]`: where the CA's keys live when `key_manager = "pkcs11"`. The PIN is
/// never in this file: it is read from `pin_file` or the `ZTID_PKCS11_PIN` environment variable.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token holding the keys.
    pub token_label: String,
    /// File holding the user PIN (owner-only).
    pub pin_file: Option<PathBuf>,
}

/// `[remote_admin]`: where the remote admin API listens and which SPIFFE IDs hold
/// which roles (`viewer`, `operator`, `authority-admin`). IDs not listed get nothing.
/// Every ID must be `spiffe://TD/ztid/admin/NAME` (see [`ServerConfig::remote_admin_roles`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteAdminConfig {
    /// Listen address (mutual TLS with X509-SVIDs of this trust domain).
    pub bind: SocketAddr,
    /// SPIFFE ID → roles.
    #[serde(default)]
    pub roles: std::collections::HashMap<String, Vec<String>>,
}

/// `[upstream]`: run as an intermediate under an existing root.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// PEM: the upstream CA certificate first, then any certificates up to the root.
    pub cert: PathBuf,
    /// PEM PKCS#8 key of the upstream CA (owner-only file)...
    pub key_file: Option<PathBuf>,
    /// ...or the id of the upstream key in the configured key manager (e.g. a PKCS#11 label).
    pub key_id: Option<String>,
    /// PEM roots for the bundle; default: the self-signed certificates in `cert`.
    pub bundle: Option<PathBuf>,
}

/// `[attestors.*]` tables: each method reads its own keys (see README).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestorsConfig {
    /// `[attestors.tpm]`.
    pub tpm: Option<toml::Table>,
    /// `[attestors.sev_snp]`.
    pub sev_snp: Option<toml::Table>,
    /// `[attestors.tdx]`.
    pub tdx: Option<toml::Table>,
    /// `[attestors.multi]`: methods every node must present together.
    pub multi: Option<toml::Table>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            trust_domain: String::new(),
            data_dir: PathBuf::from("/var/lib/ztid/server"),
            bind: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_socket: None,
            admin_uids: Vec::new(),
            ca_ttl_seconds: 30 * 24 * 3600,
            jwt_key_ttl_seconds: 30 * 24 * 3600,
            x509_svid_ttl_seconds: 3600,
            jwt_svid_ttl_seconds: 300,
            agent_svid_ttl_seconds: 3600,
            join_token_ttl_seconds: 600,
            bundle_refresh_hint_seconds: 300,
            key_manager: "software".into(),
            pkcs11: None,
            tpm_tcti: None,
            log_format: "text".into(),
            metrics: None,
            attestors: AttestorsConfig::default(),
            audit_enabled: true,
            upstream: None,
            remote_admin: None,
            issuance_policy: None,
            bundle_endpoint: None,
            bundle_endpoint_cert: None,
            bundle_endpoint_key: None,
            federation_web_roots: None,
            federation_min_refresh_seconds: 1,
            federation_max_refresh_seconds: 3600,
            federation: Vec::new(),
            oidc: None,
            sts: None,
            limits: Default::default(),
            datastore: DatastoreConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The remote admin roles, checked. Every ID must be an admin identity,
    /// `spiffe://TD/ztid/admin/NAME`: under the reserved prefix no entry can claim, and
    /// issued only by the server itself (`ztid-server admin credential issue`, on the
    /// owner-only admin socket), so no admin role can be obtained through the roles it
    /// outranks. Spelled canonically: the ID is compared as a string.
    pub fn remote_admin_roles(
        &self,
    ) -> Result<std::collections::HashMap<String, Vec<crate::roles::Role>>> {
        use ztid_spiffe::spiffe_id;
        let mut out = std::collections::HashMap::new();
        if let Some(r) = &self.remote_admin {
            let td = self.checked_trust_domain()?;
            for (id, roles) in &r.roles {
                let parsed = spiffe_id::parse(id).map_err(|e| {
                    Error::Config(format!(
                        "remote_admin role: {}",
                        crate::csr_policy::reason(e)
                    ))
                })?;
                if !spiffe_id::is_admin_id(&td, &parsed) {
                    return Err(Error::Config(format!(
                        "remote_admin role for {id}: admin identities must be spiffe://{td}/ztid/admin/NAME \
                         (issued only by `ztid-server admin credential issue` on the server's host), \
                         so that no entry can mint them"
                    )));
                }
                let parsed = roles
                    .iter()
                    .map(|name| {
                        crate::roles::Role::parse(name).ok_or_else(|| {
                            Error::Config(format!(
                                "unknown admin role {name:?} (viewer, operator, authority-admin)"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                out.insert(id.clone(), parsed);
            }
        }
        Ok(out)
    }

    /// The trust domain, canonical spelling only (`example.org`, not `Example.ORG`).
    fn checked_trust_domain(&self) -> Result<TrustDomain> {
        if self.trust_domain.is_empty() {
            return Err(Error::Config(
                "trust_domain is required (--trust-domain)".into(),
            ));
        }
        if self.trust_domain.contains("://") {
            return Err(Error::Config(format!(
                "trust_domain must be a name like example.org, not {:?}",
                self.trust_domain
            )));
        }
        ztid_spiffe::spiffe_id::parse_trust_domain(&self.trust_domain)
            .map_err(|e| Error::Config(format!("trust_domain: {}", crate::csr_policy::reason(e))))
    }

    /// The admin socket path in effect.
    pub fn admin_socket_path(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// Checks the settings and returns the parsed trust domain.
    pub fn validate(&self) -> Result<TrustDomain> {
        let td = self.checked_trust_domain()?;
        for (name, v) in [
            ("ca_ttl_seconds", self.ca_ttl_seconds),
            ("jwt_key_ttl_seconds", self.jwt_key_ttl_seconds),
            ("x509_svid_ttl_seconds", self.x509_svid_ttl_seconds),
            ("jwt_svid_ttl_seconds", self.jwt_svid_ttl_seconds),
            ("agent_svid_ttl_seconds", self.agent_svid_ttl_seconds),
            ("join_token_ttl_seconds", self.join_token_ttl_seconds),
            (
                "bundle_refresh_hint_seconds",
                self.bundle_refresh_hint_seconds,
            ),
        ] {
            if v <= 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        if self.x509_svid_ttl_seconds > self.ca_ttl_seconds
            || self.agent_svid_ttl_seconds > self.ca_ttl_seconds
        {
            return Err(Error::Config(
                "SVID lifetimes must not exceed ca_ttl_seconds".into(),
            ));
        }
        match self.key_manager.as_str() {
            "software" | "tpm" => {}
            "pkcs11" if self.pkcs11.is_some() => {}
            "pkcs11" => {
                return Err(Error::Config(
                    "key_manager pkcs11 needs --pkcs11-module and --pkcs11-token ([pkcs11] module, token_label)".into(),
                ))
            }
            other => return Err(Error::Config(format!("unknown key_manager {other:?}"))),
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::Config("log_format must be text or json".into()));
        }
        // Refuse a remote admin role that entries could reach, before anything starts.
        self.remote_admin_roles()?;
        self.datastore.validate()?;
        if let Some(sts) = &self.sts {
            sts.validate()?;
        }
        Ok(td)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_table_takes_defaults_and_issuer_follows_listen() {
        let c: ServerConfig = toml::from_str("[sts]\nlisten = \"127.0.0.1:8443\"\n").unwrap();
        let sts = c.sts.unwrap();
        assert_eq!(sts, StsConfig::on("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(sts.issuer(), "https://127.0.0.1:8443");
        sts.validate().unwrap();
        let v6 = StsConfig::on("[::1]:8443".parse().unwrap());
        assert_eq!(v6.issuer(), "https://[::1]:8443");
        let named = StsConfig {
            issuer: Some("https://sts.example.org/oauth".into()),
            ..v6
        };
        assert_eq!(named.issuer(), "https://sts.example.org/oauth");
        named.validate().unwrap();
    }

    #[test]
    fn sts_settings_out_of_bounds_are_refused_by_name() {
        let base = StsConfig::on("127.0.0.1:8443".parse().unwrap());
        let cases: Vec<(StsConfig, &str)> = vec![
            (
                StsConfig {
                    default_ttl_seconds: 0,
                    ..base.clone()
                },
                "default_ttl_seconds",
            ),
            (
                StsConfig {
                    default_ttl_seconds: 4000,
                    ..base.clone()
                },
                "default_ttl_seconds",
            ),
            (
                StsConfig {
                    max_ttl_seconds: 86_401,
                    ..base.clone()
                },
                "max_ttl_seconds",
            ),
            (
                StsConfig {
                    max_delegation_depth: 0,
                    ..base.clone()
                },
                "max_delegation_depth",
            ),
            (
                StsConfig {
                    max_delegation_depth: 17,
                    ..base.clone()
                },
                "max_delegation_depth",
            ),
            (
                StsConfig {
                    max_request_bytes: 1023,
                    ..base.clone()
                },
                "max_request_bytes",
            ),
            (
                StsConfig {
                    max_request_bytes: 1024 * 1024 + 1,
                    ..base.clone()
                },
                "max_request_bytes",
            ),
            (
                StsConfig {
                    max_connections: 0,
                    ..base.clone()
                },
                "max_connections",
            ),
            (
                StsConfig {
                    issuer: Some("http://sts.example.org".into()),
                    ..base.clone()
                },
                "issuer",
            ),
            (
                StsConfig {
                    issuer: Some("https://sts.example.org?a=b".into()),
                    ..base.clone()
                },
                "issuer",
            ),
            (
                StsConfig {
                    issuer: Some("https://sts.example.org#x".into()),
                    ..base.clone()
                },
                "issuer",
            ),
            (
                StsConfig {
                    issuer: Some("https://".into()),
                    ..base.clone()
                },
                "issuer",
            ),
            (
                StsConfig {
                    issuer: Some("https://sts.example.org/".into()),
                    ..base.clone()
                },
                "issuer",
            ),
            (
                StsConfig {
                    dns_names: vec!["not a name".into()],
                    ..base.clone()
                },
                "dns_names",
            ),
        ];
        for (c, key) in cases {
            match c.validate() {
                Err(Error::Config(m)) => assert!(m.contains(key), "{key}: {m}"),
                other => panic!("{key}: {other:?}"),
            }
        }
        StsConfig {
            default_ttl_seconds: 86_400,
            max_ttl_seconds: 86_400,
            ..base.clone()
        }
        .validate()
        .unwrap();
        StsConfig {
            max_delegation_depth: 16,
            max_request_bytes: 1024 * 1024,
            ..base
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn change_log_retention_defaults_to_a_day_and_is_bounded() {
        let mut d = DatastoreConfig::default();
        assert_eq!(d.change_log_retention().as_secs(), 86_400);
        d.validate().unwrap();
        for (secs, ok) in [
            (59, false),
            (60, true),
            (31_536_000, true),
            (31_536_001, false),
        ] {
            d.change_log_retention_seconds = Some(secs);
            match d.validate() {
                Ok(()) => assert!(ok, "{secs} accepted"),
                Err(Error::Config(m)) => {
                    assert!(
                        !ok && m.contains("change_log_retention_seconds"),
                        "{secs}: {m}"
                    )
                }
                Err(e) => panic!("{secs}: {e}"),
            }
        }
    }
}
