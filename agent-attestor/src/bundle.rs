//! A trust domain's bundle: its X.509 authorities and JWT authorities, with the
//! SPIFFE bundle JSON (a JWK Set with `spiffe_sequence` and `spiffe_refresh_hint`).

use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::jwt::JwtKey;
use crate::Error;

/// A trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustBundle {
    /// The trust domain name (`example.org`).
    pub trust_domain: String,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT authorities.
    pub jwt_authorities: Vec<JwtKey>,
    /// `spiffe_sequence`: grows on every change.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds.
    pub refresh_hint_seconds: i64,
    /// Ids of tainted authorities (X.509: hex serial; JWT: kid), still trusted but to be
    /// replaced. Not part of the SPIFFE bundle JSON.
    pub tainted: Vec<String>,
}

/// JWK members `kty`, `crv`, `x`, `y` of an EC public key given as SPKI.
fn ec_jwk_members(spki: &[u8]) -> Result<serde_json::Map<String, Value>, Error> {
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| Error::InvalidSvid("public key does not parse".into()))?;
    let point = info.subject_public_key.data.as_ref();
    let (crv, n) = match point.len() {
        65 => ("P-256", 32),
        97 => ("P-384", 48),
        _ => return Err(Error::InvalidSvid("not a P-256 or P-384 key".into())),
    };
    let mut m = serde_json::Map::new();
    m.insert("kty".into(), json!("EC"));
    m.insert("crv".into(), json!(crv));
    m.insert("x".into(), json!(B64URL.encode(&point[1..1 + n])));
    m.insert("y".into(), json!(B64URL.encode(&point[1 + n..])));
    Ok(m)
}

impl TrustBundle {
    /// The `spiffe://TD` form used as the key of bundle maps.
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }

    /// Concatenated DER of the X.509 authorities (the Workload API's bundle encoding).
    pub fn x509_der(&self) -> Vec<u8> {
        crate::svid::concat_der(self.x509_authorities.iter().map(Vec::as_slice))
    }

    fn jwt_keys_json(&self) -> Result<Vec<Value>, Error> {
        self.jwt_authorities
            .iter()
            .map(|k| {
                let mut m = ec_jwk_members(&k.spki)?;
                m.insert("kid".into(), json!(k.kid));
                m.insert("use".into(), json!("jwt-svid"));
                Ok(Value::Object(m))
            })
            .collect()
    }

    /// The JWT authorities as a JWK Set (what FetchJWTBundles carries).
    pub fn jwks_json(&self) -> Result<String, Error> {
        Ok(json!({"keys": self.jwt_keys_json()?}).to_string())
    }

    /// The whole bundle as SPIFFE bundle JSON.
    pub fn to_spiffe_json(&self) -> Result<String, Error> {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|_| Error::InvalidSvid("authority certificate does not parse".into()))?;
            let mut m = ec_jwk_members(cert.public_key().raw)?;
            m.insert("use".into(), json!("x509-svid"));
            m.insert("x5c".into(), json!([B64STD.encode(der)]));
            keys.push(Value::Object(m));
        }
        keys.extend(self.jwt_keys_json()?);
        let doc = json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_seconds,
        });
        serde_json::to_string_pretty(&doc).map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl From<&ztid_proto::node::Bundle> for TrustBundle {
    fn from(b: &ztid_proto::node::Bundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| JwtKey {
                    kid: k.kid.clone(),
                    spki: k.public_key.clone(),
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            tainted: b.tainted_authorities.clone(),
        }
    }
}

impl From<&TrustBundle> for ztid_proto::node::Bundle {
    fn from(b: &TrustBundle) -> Self {
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.clone(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| ztid_proto::node::JwtAuthority {
                    kid: k.kid.clone(),
                    public_key: k.spki.clone(),
                    expires_at: 0,
                })
                .collect(),
            sequence: b.sequence,
            refresh_hint_seconds: b.refresh_hint_seconds,
            tainted_authorities: b.tainted.clone(),
        }
    }
}
