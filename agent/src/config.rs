//! Agent configuration: a TOML file overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/ztid/agent/api.sock";

/// Highest `workload_max_instances` accepted.
pub const MAX_WORKLOAD_INSTANCES: usize = 1_000_000;

/// Settings of `ztid-agent run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The servers' node API addresses, `HOST:PORT[,HOST:PORT...]` (at most 16; a name
    /// may resolve to several addresses, resolved again at each failover). The agent
    /// talks to one at a time and moves to the next when it does not answer.
    pub server: Option<String>,
    /// PEM file with the trust domain's X.509 authorities, to verify the server.
    pub trust_bundle: Option<PathBuf>,
    /// Skip server verification for the first attestation only (SPIRE's insecure bootstrap).
    pub insecure_bootstrap: bool,
    /// The trust domain; default: taken from the trust bundle or the attestation result.
    pub trust_domain: Option<String>,
    /// Attestation method.
    pub attestor: String,
    /// Join token (join-token method).
    pub join_token: Option<String>,
    /// TPM TCTI (tpm method).
    pub tpm_tcti: String,
    /// Which EK the tpm method attests with: auto, rsa, ecc, ecc-p256, ecc-p384.
    pub tpm_ek: String,
    /// Root of the configfs-tsm report tree (sev-snp and tdx methods).
    pub tsm_root: PathBuf,
    /// Ask for SEV-SNP reports through the SVSM's vTPM service (guests with an SVSM vTPM).
    pub sev_snp_svsm_vtpm: bool,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Where the agent keeps its own SVID and the bundle (owner-only).
    pub data_dir: PathBuf,
    /// How often to sync entries and the bundle with the server, seconds.
    pub sync_interval_seconds: u64,
    /// Log format: text or json.
    pub log_format: String,
    /// Telemetry listener (`/metrics`, `/live`, `/ready`), `ADDR:PORT`; off when unset.
    pub metrics: Option<SocketAddr>,
    /// Cap on open Workload API connections (the descriptor limit may lower it further).
    pub workload_max_connections: usize,
    /// Seconds a Workload API connection may stay without a request in progress.
    pub workload_idle_timeout_seconds: u64,
    /// Cap on the process instances the agent holds at once (each a key and SVIDs in
    /// memory, minted by the CA): beyond it a new process is refused with
    /// `ResourceExhausted` and nothing is minted for it, until instances of exited
    /// processes are forgotten. One uid holds at most half of it (at least 1; a
    /// delegate's instances count against the delegate's uid): a new process of a uid
    /// at its share is refused the same way while other uids are still served.
    pub workload_max_instances: usize,
    /// Container runtime sockets (`unix:///PATH`) asked about callers' containers, in
    /// order (see [`crate::container`]); empty: no container attestation.
    pub container_sockets: Vec<String>,
    /// `systemd:unit` selectors (on too whenever `container_sockets` is set).
    pub systemd_unit_selectors: bool,
    /// Per-instance SVIDs minted ahead per entry set, so a new process is answered from
    /// memory (0: off; at most 16).
    pub svid_pool_size: usize,
    /// Most entry sets pooled at once (the least recently used goes first).
    pub svid_pool_max_sets: usize,
    /// A pooled SVID not handed out within this many seconds is dropped unused (it is
    /// also dropped at half its lifetime, whichever comes first).
    pub svid_pool_max_age_seconds: i64,
    /// An entry set no new process had for this many seconds is no longer pooled.
    pub svid_pool_idle_seconds: i64,
    /// `[delegated_identity]`: SPIRE's Delegated Identity API on an admin socket (off
    /// unless `socket` is set; see [`crate::delegated_identity`]).
    pub delegated_identity: crate::delegated_identity::DelegatedConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server: None,
            trust_bundle: None,
            insecure_bootstrap: false,
            trust_domain: None,
            attestor: "join-token".into(),
            join_token: None,
            tpm_tcti: "device:/dev/tpmrm0".into(),
            tpm_ek: "auto".into(),
            tsm_root: PathBuf::from("/sys/kernel/config/tsm/report"),
            sev_snp_svsm_vtpm: false,
            socket: PathBuf::from(DEFAULT_SOCKET),
            data_dir: PathBuf::from("/var/lib/ztid/agent"),
            sync_interval_seconds: 5,
            log_format: "text".into(),
            metrics: None,
            workload_max_connections: super::workload_listener::DEFAULT_MAX_CONNECTIONS,
            workload_idle_timeout_seconds: super::workload_listener::DEFAULT_IDLE_TIMEOUT.as_secs(),
            workload_max_instances: crate::workloads::DEFAULT_MAX_INSTANCES,
            container_sockets: Vec::new(),
            systemd_unit_selectors: false,
            svid_pool_size: 2,
            svid_pool_max_sets: 64,
            svid_pool_max_age_seconds: 60,
            svid_pool_idle_seconds: 300,
            delegated_identity: Default::default(),
        }
    }
}

impl AgentConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The bounds of the Workload API socket.
    pub fn workload_limits(&self) -> super::workload_listener::Limits {
        super::workload_listener::Limits {
            max_connections: self.workload_max_connections,
            idle_timeout: std::time::Duration::from_secs(self.workload_idle_timeout_seconds),
            // The Delegated Identity socket's, when it is served: they share the descriptors.
            others_max_connections: if self.delegated_identity.socket.is_some() {
                self.delegated_identity.max_connections
            } else {
                0
            },
        }
    }

    /// The pool of SVIDs minted ahead.
    pub fn svid_pool(&self) -> crate::workloads::pool::PoolConfig {
        crate::workloads::pool::PoolConfig {
            size: self.svid_pool_size,
            max_sets: self.svid_pool_max_sets,
            max_age_seconds: self.svid_pool_max_age_seconds,
            idle_seconds: self.svid_pool_idle_seconds,
        }
    }

    /// The container and systemd attestors, if any is configured.
    pub fn container_attestor(
        &self,
    ) -> Result<Option<std::sync::Arc<crate::container::ContainerAttestor>>, Error> {
        if self.container_sockets.is_empty() && !self.systemd_unit_selectors {
            return Ok(None);
        }
        let sockets = self
            .container_sockets
            .iter()
            .map(|s| crate::container::parse_socket(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(std::sync::Arc::new(
            crate::container::ContainerAttestor::new(sockets)?,
        )))
    }

    /// The `--server` list, parsed (not resolved).
    pub fn servers(&self) -> Result<Vec<crate::servers::ServerSpec>, Error> {
        let s = self
            .server
            .as_deref()
            .ok_or_else(|| Error::Config("--server HOST:PORT[,HOST:PORT...] is required".into()))?;
        crate::servers::parse_server_list(s)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        self.servers()?;
        if self.trust_bundle.is_none() && !self.insecure_bootstrap {
            return Err(Error::Config(
                "either --trust-bundle FILE or --insecure-bootstrap is required".into(),
            ));
        }
        if self.attestor.contains(',') {
            ztid_attestation::multi::check_methods(self.attestor.split(',').map(str::trim))?;
        } else if !matches!(
            self.attestor.as_str(),
            "join-token" | "tpm" | "sev-snp" | "tdx"
        ) {
            return Err(Error::Config(format!(
                "unknown attestor {:?}",
                self.attestor
            )));
        }
        self.tpm_ek.parse::<ztid_attestor::tpm::EkKind>()?;
        if self.sync_interval_seconds == 0 {
            return Err(Error::Config(
                "sync_interval_seconds must be positive".into(),
            ));
        }
        if !(1..=1_000_000).contains(&self.workload_max_connections) {
            return Err(Error::Config(
                "workload_max_connections must be between 1 and 1000000".into(),
            ));
        }
        if !(1..=MAX_WORKLOAD_INSTANCES).contains(&self.workload_max_instances) {
            return Err(Error::Config(format!(
                "workload_max_instances must be between 1 and {MAX_WORKLOAD_INSTANCES}"
            )));
        }
        if !(1..=86_400).contains(&self.workload_idle_timeout_seconds) {
            return Err(Error::Config(
                "workload_idle_timeout_seconds must be between 1 and 86400".into(),
            ));
        }
        if self.svid_pool_size > crate::workloads::pool::MAX_POOL_SIZE
            || !(1..=crate::workloads::pool::MAX_POOL_SETS).contains(&self.svid_pool_max_sets)
            || !(1..=3600).contains(&self.svid_pool_max_age_seconds)
            || !(1..=86_400).contains(&self.svid_pool_idle_seconds)
        {
            return Err(Error::Config(format!(
                "svid_pool_size must be at most {}, svid_pool_max_sets between 1 and {}, svid_pool_max_age_seconds between 1 and 3600, svid_pool_idle_seconds between 1 and 86400",
                crate::workloads::pool::MAX_POOL_SIZE,
                crate::workloads::pool::MAX_POOL_SETS
            )));
        }
        self.delegated_identity.validate_beside(&self.socket)?;
        self.container_attestor()?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::Config("log_format must be text or json".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> AgentConfig {
        AgentConfig {
            server: Some("127.0.0.1:8081".into()),
            insecure_bootstrap: true,
            ..Default::default()
        }
    }

    #[test]
    fn the_instance_cap_defaults_to_a_few_thousand_and_is_bounded() {
        assert_eq!(
            valid().workload_max_instances,
            crate::workloads::DEFAULT_MAX_INSTANCES
        );
        assert!(valid().validate().is_ok());
        let from_file: AgentConfig = toml::from_str("workload_max_instances = 10").unwrap();
        assert_eq!(from_file.workload_max_instances, 10);
        for refused in [0, MAX_WORKLOAD_INSTANCES + 1] {
            let c = AgentConfig {
                workload_max_instances: refused,
                ..valid()
            };
            match c.validate() {
                Err(Error::Config(why)) => assert_eq!(
                    why,
                    format!(
                        "workload_max_instances must be between 1 and {MAX_WORKLOAD_INSTANCES}"
                    )
                ),
                other => panic!("{refused}: {other:?}"),
            }
        }
    }
}
