//! The JWT authority: an ES256 key in the key manager, named by a random `kid`, that
//! mints JWT-SVIDs (with `iss` when OIDC discovery is on).

use std::sync::Arc;

use serde_json::{json, Map, Value};
use ztid_hsm::{KeyAlgorithm, KeyManager, SignatureFormat};

use super::key::random_hex;
use crate::datastore::{AuthorityRecord, AuthorityState};
use crate::{Error, Result};

/// A JWT signing authority.
pub struct JwtAuthority {
    record: AuthorityRecord,
    km: Arc<dyn KeyManager>,
}

impl JwtAuthority {
    /// Creates a new JWT key with a random `kid`.
    pub fn create(
        km: Arc<dyn KeyManager>,
        ttl_seconds: i64,
        now: i64,
        state: AuthorityState,
    ) -> Result<Self> {
        let kid = random_hex(16)?;
        let key_id = format!("jwt-{kid}");
        let public = km.generate(&key_id, KeyAlgorithm::EcdsaP256)?;
        Ok(Self {
            record: AuthorityRecord {
                id: kid,
                key_id,
                cert_der: Vec::new(),
                public_key: public.spki_der,
                not_after: now + ttl_seconds,
                state,
                not_before: now,
                tainted: false,
                tainted_at: 0,
                upstream_chain: Vec::new(),
            },
            km,
        })
    }

    /// Loads a JWT authority from its record.
    pub fn load(km: Arc<dyn KeyManager>, record: AuthorityRecord) -> Result<Self> {
        let public = km.public_key(&record.key_id)?;
        if public.spki_der != record.public_key {
            return Err(Error::Config(format!(
                "key {} does not match JWT authority {}",
                record.key_id, record.id
            )));
        }
        Ok(Self { record, km })
    }

    /// The stored record.
    pub fn record(&self) -> &AuthorityRecord {
        &self.record
    }

    /// Signs a JWS signing input (`header.claims`, base64url) with ES256 in fixed
    /// (r||s) form, for tokens other than JWT-SVIDs (the token endpoint's access tokens,
    /// which carry this authority's `kid`). Refused once the authority has expired.
    pub fn sign_jws(&self, signing_input: &[u8], now: i64) -> Result<Vec<u8>> {
        if now >= self.record.not_after {
            return Err(Error::Precondition("the JWT authority has expired".into()));
        }
        self.km
            .sign(&self.record.key_id, signing_input, SignatureFormat::Fixed)
            .map_err(Into::into)
    }

    /// Mints a JWT-SVID; returns the token and its `exp`.
    pub fn mint(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl_seconds: i64,
        now: i64,
    ) -> Result<(String, i64)> {
        self.mint_with_issuer(spiffe_id, audience, ttl_seconds, now, None)
    }

    /// Mints a JWT-SVID carrying `iss` when an issuer is given (OIDC discovery).
    pub fn mint_with_issuer(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl_seconds: i64,
        now: i64,
        issuer: Option<&str>,
    ) -> Result<(String, i64)> {
        if now >= self.record.not_after {
            return Err(Error::Precondition("the JWT authority has expired".into()));
        }
        let exp = (now + ttl_seconds).min(self.record.not_after);
        let mut claims = Map::new();
        claims.insert("sub".into(), json!(spiffe_id));
        claims.insert("aud".into(), Value::from(audience.to_vec()));
        claims.insert("exp".into(), json!(exp));
        claims.insert("iat".into(), json!(now));
        if let Some(iss) = issuer {
            claims.insert("iss".into(), json!(iss));
        }
        let token = ztid_spiffe::jwt::encode_es256(&self.record.id, &claims, |msg| {
            self.km
                .sign(&self.record.key_id, msg, SignatureFormat::Fixed)
        })?;
        Ok((token, exp))
    }
}
