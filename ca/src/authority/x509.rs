//! The X.509 authority: a CA certificate whose key stays in the key manager (a
//! self-signed root, or an intermediate under an [`Upstream`] CA), and the leaf
//! X509-SVIDs it signs ([`LeafTemplate`] in, [`SignedLeaf`] out). It only builds and
//! signs; who may get what is decided before it is called.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;
use ztid_hsm::{KeyAlgorithm, KeyManager};

use super::key::{random_serial, ManagedKey};
use super::upstream::Upstream;
use crate::datastore::{AuthorityRecord, AuthorityState};
use crate::{Error, Result};

fn to_time(unix: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| Error::Certificate(e.to_string()))
}

/// What a leaf certificate must say; everything else is fixed by policy.
#[derive(Debug, Clone)]
pub struct LeafTemplate {
    /// The one URI SAN.
    pub spiffe_id: String,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// IP address SANs (the token endpoint's certificate names its listen address).
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// The SPIFFE ID of the agent (node) a workload SVID is issued through, written in
    /// the subject as `OU=node=<ID>` ([`NODE_OU_PREFIX`]) so the token endpoint can tell an
    /// mTLS caller's node (docs/token-exchange.md). Signed by the CA like the rest.
    pub node: Option<String>,
    /// Requested lifetime in seconds (capped at the CA's own expiry).
    pub ttl_seconds: i64,
}

/// A workload SVID's subject names its node as `OU=node=<agent SPIFFE ID>`. A subject
/// attribute, not a private extension: an extension needs an OID of its own, and the
/// one arc that needs no registry (UUID OIDs, `2.25.<128-bit>`) does not fit rcgen's
/// 64-bit arcs. Verifiers ignore the subject of an X509-SVID (the URI SAN is the ID).
pub const NODE_OU_PREFIX: &str = "node=";

/// How far a leaf's `notBefore` is set before its signing, for clock skew between nodes.
pub const LEAF_BACKDATE_SECONDS: i64 = 10;

/// When a leaf this server signed was issued (Unix seconds): its `notBefore` plus the
/// backdate. What revocations "of everything issued before" compare with.
pub fn leaf_issued_at(leaf: &[u8]) -> Option<i64> {
    ztid_spiffe::svid::not_before(leaf)
        .ok()
        .map(|nb| nb.saturating_add(LEAF_BACKDATE_SECONDS))
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    /// Leaf first, then intermediates up to (not including) the root.
    pub chain: Vec<Vec<u8>>,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl SignedLeaf {
    /// Hex SHA-256 of the leaf's SubjectPublicKeyInfo (what an agent's record binds).
    pub fn key_sha256(&self) -> crate::Result<String> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| crate::Error::Internal("a signed leaf without a certificate".into()))?;
        ztid_spiffe::svid::key_sha256(leaf)
            .map_err(|e| crate::Error::Internal(format!("a leaf this server signed: {e}")))
    }
}

/// An X.509 signing authority.
pub struct X509Authority {
    record: AuthorityRecord,
    issuer: Issuer<'static, ManagedKey>,
    /// What follows a leaf in the chain: nothing for a self-signed root; this
    /// intermediate and the upstream chain under an upstream authority.
    chain_tail: Vec<Vec<u8>>,
}

impl X509Authority {
    /// Creates a new CA for `trust_domain`, its key in `km`: a self-signed root, or an
    /// intermediate signed by `upstream`.
    pub fn create(
        km: Arc<dyn KeyManager>,
        trust_domain: &str,
        ttl_seconds: i64,
        now: i64,
        state: AuthorityState,
        upstream: Option<&Upstream>,
    ) -> Result<Self> {
        let serial = random_serial()?;
        let serial_hex = hex::encode(&serial);
        let key_id = format!("x509-ca-{}", &serial_hex[..16]);
        km.generate(&key_id, KeyAlgorithm::EcdsaP256)?;
        let key = ManagedKey::load(km, &key_id)?;

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ztid");
        dn.push(
            DnType::CommonName,
            format!("ztid {trust_domain} X.509 authority"),
        );
        // A unique subject per CA: Go verifiers break on many CAs sharing one subject.
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial_hex.clone());
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(Error::CertificateBuild)?,
        )];
        let not_after = match upstream {
            Some(u) => (now + ttl_seconds).min(u.not_after),
            None => now + ttl_seconds,
        };
        if not_after <= now {
            return Err(Error::Precondition("the upstream CA has expired".into()));
        }
        params.not_before = to_time(now - 60)?;
        params.not_after = to_time(not_after)?;
        let (cert, upstream_chain) = match upstream {
            Some(u) => {
                // An intermediate signs only leaves.
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.use_authority_key_identifier_extension = true;
                (params.signed_by(&key, &u.issuer)?, u.chain.clone())
            }
            None => (params.self_signed(&key)?, Vec::new()),
        };
        let record = AuthorityRecord {
            id: serial_hex,
            key_id,
            cert_der: cert.der().to_vec(),
            public_key: key.subject_public_key_info(),
            not_after,
            state,
            not_before: now - 60,
            tainted: false,
            tainted_at: 0,
            upstream_chain,
        };
        let chain_tail = Self::chain_tail_of(&record);
        let issuer = Issuer::new(params, key);
        Ok(Self {
            record,
            issuer,
            chain_tail,
        })
    }

    /// A self-signed root sends nothing after the leaf; an intermediate sends itself
    /// and the upstream chain.
    fn chain_tail_of(record: &AuthorityRecord) -> Vec<Vec<u8>> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let self_signed = X509Certificate::from_der(&record.cert_der)
            .map(|(_, c)| c.subject() == c.issuer())
            .unwrap_or(true);
        if self_signed {
            Vec::new()
        } else {
            std::iter::once(record.cert_der.clone())
                .chain(record.upstream_chain.iter().cloned())
                .collect()
        }
    }

    /// Loads an authority from its record.
    pub fn load(km: Arc<dyn KeyManager>, record: AuthorityRecord) -> Result<Self> {
        let key = ManagedKey::load(km, &record.key_id)?;
        if key.subject_public_key_info() != record.public_key {
            return Err(Error::Config(format!(
                "key {} does not match authority {}",
                record.key_id, record.id
            )));
        }
        // The certificate must carry that key too, or every leaf it signs fails to verify.
        let cert_spki = {
            use x509_parser::prelude::{FromDer, X509Certificate};
            X509Certificate::from_der(&record.cert_der)
                .map(|(_, c)| c.public_key().raw.to_vec())
                .map_err(|e| {
                    Error::Config(format!("certificate of authority {}: {e}", record.id))
                })?
        };
        if cert_spki != record.public_key {
            return Err(Error::Config(format!(
                "the certificate of authority {} does not carry its key {}",
                record.id, record.key_id
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&record.cert_der.clone().into(), key)?;
        let chain_tail = Self::chain_tail_of(&record);
        Ok(Self {
            record,
            issuer,
            chain_tail,
        })
    }

    /// The stored record.
    pub fn record(&self) -> &AuthorityRecord {
        &self.record
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.record.cert_der
    }

    /// Signs a leaf X509-SVID for `public_key` as `template` says, at `now`.
    pub fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        template: &LeafTemplate,
        now: i64,
    ) -> Result<SignedLeaf> {
        self.sign_leaf_numbered(public_key, template, now, &random_serial()?)
    }

    /// A leaf with a serial of the caller's choice: what a thief of this authority's key
    /// could make (tests of the agent's key binding).
    #[cfg(test)]
    pub(crate) fn forge_leaf(
        &self,
        public_key: &impl PublicKeyData,
        template: &LeafTemplate,
        now: i64,
        serial: &[u8],
    ) -> Result<SignedLeaf> {
        self.sign_leaf_numbered(public_key, template, now, serial)
    }

    fn sign_leaf_numbered(
        &self,
        public_key: &impl PublicKeyData,
        template: &LeafTemplate,
        now: i64,
        serial: &[u8],
    ) -> Result<SignedLeaf> {
        if now >= self.record.not_after {
            return Err(Error::Precondition(
                "the X.509 authority has expired".into(),
            ));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ztid");
        if let Some(node) = &template.node {
            dn.push(
                DnType::OrganizationalUnitName,
                format!("{NODE_OU_PREFIX}{node}"),
            );
        }
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut sans = vec![SanType::URI(
            template
                .spiffe_id
                .clone()
                .try_into()
                .map_err(Error::CertificateBuild)?,
        )];
        for dns in &template.dns_names {
            sans.push(SanType::DnsName(
                dns.clone().try_into().map_err(Error::CertificateBuild)?,
            ));
        }
        for ip in &template.ip_addresses {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        // Backdate a little for clock skew between nodes.
        params.not_before = to_time(now - LEAF_BACKDATE_SECONDS)?;
        let not_after = (now + template.ttl_seconds).min(self.record.not_after);
        params.not_after = to_time(not_after)?;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(cert.der().to_vec());
        chain.extend(self.chain_tail.iter().cloned());
        Ok(SignedLeaf {
            chain,
            serial: hex::encode(serial),
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztid_hsm::SoftwareKeyManager;

    #[test]
    fn an_authority_whose_certificate_carries_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let km: Arc<dyn KeyManager> =
            Arc::new(SoftwareKeyManager::open(dir.path().join("keys")).unwrap());
        let create = || {
            X509Authority::create(
                km.clone(),
                "example.org",
                600,
                1000,
                AuthorityState::Active,
                None,
            )
            .unwrap()
        };
        let (a, b) = (create(), create());
        X509Authority::load(km.clone(), a.record().clone()).unwrap();
        // A's key and key id, B's certificate.
        let mut mixed = a.record().clone();
        mixed.cert_der = b.cert_der().to_vec();
        match X509Authority::load(km.clone(), mixed) {
            Err(e @ Error::Config(_)) => {
                assert!(e.to_string().contains("does not carry its key"), "{e}")
            }
            Err(e) => panic!("expected a config error, got {e}"),
            Ok(_) => panic!("an authority whose certificate has another key loaded"),
        }
    }
}
