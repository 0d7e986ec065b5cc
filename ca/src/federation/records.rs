//! The federation types: a relationship as configured and as stored, where a
//! federated bundle came from, and what storing one did. Plain data: nothing here
//! depends on the rest of the server, so the config can name it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[[federation]]` in the server config, and the stored relationship.
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

/// A stored relationship.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRecord {
    /// The federated trust domain.
    pub trust_domain: String,
    /// Its bundle endpoint URL.
    pub bundle_endpoint_url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// `https_spiffe`: expected endpoint SPIFFE ID.
    pub endpoint_spiffe_id: String,
    /// Initial trust bundle text (SPIFFE JSON or PEM), may be empty.
    pub trust_bundle: String,
    /// Last poll attempt, Unix seconds.
    #[serde(default)]
    pub last_refresh_at: i64,
    /// Why the last poll failed (empty: it succeeded).
    #[serde(default)]
    pub last_error: String,
}

/// Where a federated bundle came from (for logs and audit).
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// `bundle set` by an operator.
    Operator(&'a str),
    /// A bundle endpoint poll.
    Endpoint(&'a str),
}

impl Source<'_> {
    pub(super) fn describe(&self) -> String {
        match self {
            Source::Operator(c) => format!("operator {c}"),
            Source::Endpoint(u) => format!("endpoint {u}"),
        }
    }
}

/// What storing a federated bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// The bundle is new or newer and now in force.
    Updated,
    /// Same sequence and content as the stored one: nothing to do.
    Unchanged,
}
