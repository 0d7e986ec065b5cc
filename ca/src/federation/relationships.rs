//! Federation relationships: create (checked), list, delete, and those named in
//! `[[federation]]` at start; the endpoint URL rule.

use serde_json::json;

use super::bundles::{check_trust_domain, sniff_format};
use super::parse_bundle;
use super::records::FederationRecord;
use crate::core::CaCore;
use crate::{Error, Result};

impl CaCore {
    /// Every federation relationship.
    pub fn federations(&self) -> Result<Vec<FederationRecord>> {
        self.store
            .list_federations()?
            .iter()
            .map(|v| Ok(serde_json::from_slice(v)?))
            .collect()
    }

    /// One relationship.
    pub fn federation(&self, td: &str) -> Result<FederationRecord> {
        let td = check_trust_domain(self, td)?;
        self.federations()?
            .into_iter()
            .find(|f| f.trust_domain == td)
            .ok_or_else(|| Error::NotFound(format!("no federation with {td}")))
    }

    /// One relationship with its stored bytes, for a write that must not outlive a
    /// change of it ([`crate::datastore::DataStore::compare_and_swap_federation`]).
    pub(crate) fn federation_with_bytes(&self, td: &str) -> Result<(Vec<u8>, FederationRecord)> {
        let td = check_trust_domain(self, td)?;
        for raw in self.store.list_federations()? {
            let f: FederationRecord = serde_json::from_slice(&raw)?;
            if f.trust_domain == td {
                return Ok((raw, f));
            }
        }
        Err(Error::NotFound(format!("no federation with {td}")))
    }

    /// Creates or replaces a relationship after checking it.
    pub fn create_federation(
        &self,
        mut f: FederationRecord,
        caller: &str,
    ) -> Result<FederationRecord> {
        f.trust_domain = check_trust_domain(self, &f.trust_domain)?;
        parse_endpoint_url(&f.bundle_endpoint_url)?;
        match f.profile.as_str() {
            "https_spiffe" => {
                let id = ztid_spiffe::spiffe_id::parse(&f.endpoint_spiffe_id).map_err(|e| {
                    Error::InvalidInput(format!(
                        "https_spiffe needs --endpoint-spiffe-id: {}",
                        crate::csr_policy::reason(e)
                    ))
                })?;
                if id.trust_domain().to_string() != f.trust_domain {
                    return Err(Error::InvalidInput(format!(
                        "endpoint SPIFFE ID {} is not in {}",
                        f.endpoint_spiffe_id, f.trust_domain
                    )));
                }
                if f.trust_bundle.is_empty() && self.federated_bundle(&f.trust_domain)?.is_none() {
                    return Err(Error::InvalidInput(format!(
                        "https_spiffe needs --trust-bundle: no bundle of {} is stored",
                        f.trust_domain
                    )));
                }
                if !f.trust_bundle.is_empty() {
                    parse_bundle(
                        &f.trust_domain,
                        sniff_format(f.trust_bundle.as_bytes()),
                        f.trust_bundle.as_bytes(),
                        0,
                    )?;
                }
            }
            "https_web" => {
                if !f.endpoint_spiffe_id.is_empty() {
                    return Err(Error::InvalidInput(
                        "--endpoint-spiffe-id is for the https_spiffe profile".into(),
                    ));
                }
            }
            other => {
                return Err(Error::InvalidInput(format!(
                    "unknown profile {other:?} (https_web, https_spiffe)"
                )))
            }
        }
        f.last_refresh_at = 0;
        f.last_error.clear();
        let _writes = self.federation_writes();
        self.store
            .put_federation(&f.trust_domain, &serde_json::to_vec(&f)?)?;
        self.store.flush()?;
        self.record(
            json!({"type": "federation_created", "trust_domain": f.trust_domain,
            "url": f.bundle_endpoint_url, "profile": f.profile,
            "endpoint_spiffe_id": f.endpoint_spiffe_id, "caller": caller}),
        )?;
        tracing::warn!(event = "federation_created", trust_domain = %f.trust_domain, url = %f.bundle_endpoint_url, profile = %f.profile, caller, "federation relationship created");
        Ok(f)
    }

    /// Deletes a relationship (the stored bundle stays until `bundle delete`).
    pub fn delete_federation(&self, td: &str, caller: &str) -> Result<FederationRecord> {
        let td = check_trust_domain(self, td)?;
        let _writes = self.federation_writes();
        let v = self
            .store
            .delete_federation(&td)?
            .ok_or_else(|| Error::NotFound(format!("no federation with {td}")))?;
        self.store.flush()?;
        self.record(json!({"type": "federation_deleted", "trust_domain": td, "caller": caller}))?;
        tracing::warn!(event = "federation_deleted", trust_domain = %td, caller, "federation relationship deleted");
        Ok(serde_json::from_slice(&v)?)
    }

    /// Applies `[[federation]]` from config (at start).
    pub fn apply_configured_federations(&self) -> Result<()> {
        for c in self.config.federation.clone() {
            let trust_bundle = match &c.trust_bundle {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(Error::io(format!("reading {}", p.display())))?,
                None => String::new(),
            };
            let rec = FederationRecord {
                trust_domain: c.trust_domain.clone(),
                bundle_endpoint_url: c.bundle_endpoint_url.clone(),
                profile: c.profile.clone(),
                endpoint_spiffe_id: c.endpoint_spiffe_id.clone().unwrap_or_default(),
                trust_bundle,
                ..Default::default()
            };
            let existing = self.federation(&c.trust_domain).ok();
            let same = existing.as_ref().is_some_and(|e| {
                e.same_relationship(&FederationRecord {
                    trust_domain: e.trust_domain.clone(),
                    ..rec.clone()
                })
            });
            if !same {
                self.create_federation(rec, "config")?;
            }
        }
        Ok(())
    }
}

/// Splits an endpoint URL; it must be `https` without userinfo (Federation spec).
pub fn parse_endpoint_url(url: &str) -> Result<(String, u16, String)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Error::InvalidInput(format!("bundle endpoint URL {url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::InvalidInput(format!(
            "bundle endpoint URL {url:?} must use https"
        )));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| Error::InvalidInput(format!("bundle endpoint URL {url:?} has no host")))?;
    if auth.as_str().contains('@') {
        return Err(Error::InvalidInput(format!(
            "bundle endpoint URL {url:?} must not carry userinfo"
        )));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    Ok((host, auth.port_u16().unwrap_or(443), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            parse_endpoint_url("https://127.0.0.1:8443/").unwrap(),
            ("127.0.0.1".into(), 8443, "/".into())
        );
        assert!(parse_endpoint_url("http://a.test/").is_err());
        assert!(parse_endpoint_url("https://u:p@a.test/").is_err());
    }
}
