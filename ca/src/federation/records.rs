//! The federation types: a relationship as stored, where a federated bundle came
//! from, and what storing one did. Plain data. A relationship as configured
//! (`[[federation]]`) is [`crate::config::FederationConfig`].

use serde::{Deserialize, Serialize};

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

impl FederationRecord {
    /// Whether `other` is the same relationship: the same trust domain, endpoint,
    /// profile, endpoint ID and initial bundle (the poll status aside).
    pub fn same_relationship(&self, other: &FederationRecord) -> bool {
        self.trust_domain == other.trust_domain
            && self.bundle_endpoint_url == other.bundle_endpoint_url
            && self.profile == other.profile
            && self.endpoint_spiffe_id == other.endpoint_spiffe_id
            && self.trust_bundle == other.trust_bundle
    }
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
