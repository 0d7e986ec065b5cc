//! The server's own X509-SVID (its TLS identity on the node API, the bundle endpoint and
//! the token endpoint): issued at start, renewed at half-life, and reissued at once when
//! the X.509 authority changes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use rcgen::KeyPair;
use rustls::sign::CertifiedKey;
use spiffe::TrustDomain;

use super::{now, CaCore};
use crate::authority::{LeafTemplate, X509Authority};
use crate::config::{IssuerHost, ServerConfig};
use crate::entries::server_id;
use crate::{Error, Result};

/// With `[sts]`, the listen IP (for an unspecified address, `0.0.0.0` or `::`, which no
/// client connects to by that name: the loopback addresses), and an issuer's IP host.
fn token_endpoint_ip_addresses(config: &ServerConfig) -> Vec<IpAddr> {
    let Some(sts) = &config.sts else {
        return Vec::new();
    };
    let ip = sts.listen.ip();
    let mut ips = if ip.is_unspecified() {
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
    } else {
        vec![ip]
    };
    if let Some(IssuerHost::Ip(ip)) = sts.issuer_host() {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

impl CaCore {
    pub(super) fn issue_server_svid(
        x509: &X509Authority,
        td: &TrustDomain,
        config: &ServerConfig,
        now: i64,
    ) -> Result<(CertifiedKey, i64)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = x509.sign_leaf(
            &key,
            &LeafTemplate {
                spiffe_id: server_id(td),
                dns_names: config.server_dns_names(),
                ip_addresses: token_endpoint_ip_addresses(config),
                node: None,
                ttl_seconds: config.agent_svid_ttl_seconds,
            },
            now,
        )?;
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&der)
            .map_err(|e| Error::Certificate(format!("server key: {e}")))?;
        let chain = leaf
            .chain
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect();
        Ok((CertifiedKey::new(chain, signer), leaf.not_after))
    }

    /// The server's current TLS identity.
    pub fn server_svid(&self) -> Arc<CertifiedKey> {
        self.server_svid.load_full()
    }

    /// Renews the server's own SVID when half its lifetime has passed.
    pub fn maybe_renew_server_svid(&self) -> Result<()> {
        let t = now();
        let expiry = self
            .server_svid_expiry
            .load(std::sync::atomic::Ordering::Relaxed);
        if t < expiry - self.config.agent_svid_ttl_seconds / 2 {
            return Ok(());
        }
        let (svid, expiry) = Self::issue_server_svid(
            &self.authorities.x509(),
            &self.trust_domain,
            &self.config,
            t,
        )?;
        self.server_svid.store(Arc::new(svid));
        self.server_svid_expiry
            .store(expiry, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("renewed the server's own SVID");
        Ok(())
    }

    pub(super) fn force_renew_server_svid(&self) -> Result<()> {
        let (svid, expiry) = Self::issue_server_svid(
            &self.authorities.x509(),
            &self.trust_domain,
            &self.config,
            now(),
        )?;
        self.server_svid.store(Arc::new(svid));
        self.server_svid_expiry
            .store(expiry, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
