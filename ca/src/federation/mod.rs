//! Federation with other trust domains (SPIFFE Federation spec) and OIDC discovery.
//!
//! - Federated bundles ([`bundles`]): one per trust domain, stored apart from this
//!   domain's own bundle and never merged with it or with each other. A bundle whose
//!   `spiffe_sequence` is lower than the stored one is ignored.
//! - Relationships ([`relationships`]): (trust domain, bundle endpoint URL, profile)
//!   polled ([`poller`]) per the fetched bundle's `spiffe_refresh_hint`, bounded by
//!   config.
//! - The bundle endpoint server ([`endpoint`]: `https_spiffe` with the server's own
//!   SVID, or `https_web` with a configured certificate), no client authentication.
//! - The OIDC discovery document and its JWKS on their own listener ([`oidc`]).
//!
//! The types (config, stored relationship, what a store did) are in [`records`],
//! which depends on nothing else of the server. Every change and every refusal is
//! logged and audited with its reason.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::{Error, Result};

pub mod bundles;
pub mod endpoint;
mod http;
pub mod oidc;
pub mod poller;
pub mod records;
pub mod relationships;

pub use bundles::parse_bundle;
pub use endpoint::spawn_bundle_endpoint;
pub use oidc::{oidc_document, oidc_jwks, spawn_oidc};
pub use poller::spawn_poller;
pub use records::{FederationRecord, Source, Stored};
pub use relationships::parse_endpoint_url;

pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(super) fn load_pem_certs(data: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    Ok(pem::parse_many(data)
        .map_err(|e| Error::Config(format!("PEM: {e}")))?
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}
