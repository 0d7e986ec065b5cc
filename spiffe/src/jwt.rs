//! JWT-SVIDs: compact JWS with ES256, as the JWT-SVID spec requires. Minting takes a
//! signing callback (the CA's key stays in its key manager); validation checks the
//! token against the JWT authorities of the subject's own trust domain.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED};
use serde_json::{json, Map, Value};
use spiffe::{SpiffeId, TrustDomain};

use crate::Error;

/// Longest token we will look at: JWT-SVIDs are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A JWT authority's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key id (`kid`).
    pub kid: String,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

/// Mints a compact JWS with header `{"alg":"ES256","kid":…,"typ":"JWT"}`.
/// `sign` must return the fixed-width (r||s) ES256 signature of its input.
pub fn encode_es256<E>(
    kid: &str,
    claims: &Map<String, Value>,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    let mut out = String::with_capacity(512);
    B64.encode_string(header.to_string(), &mut out);
    out.push('.');
    B64.encode_string(Value::Object(claims.clone()).to_string(), &mut out);
    let sig = sign(out.as_bytes())?;
    out.push('.');
    B64.encode_string(sig, &mut out);
    Ok(out)
}

/// The `kid` in a token's header, without validating anything (for bookkeeping only).
pub fn kid_of(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    decode_json(header, "header")
        .ok()?
        .get("kid")?
        .as_str()
        .map(str::to_string)
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, Error> {
    let bytes = B64
        .decode(part)
        .map_err(|_| Error::InvalidJwt(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Error::InvalidJwt(format!("{what} is not a JSON object"))),
    }
}

/// The public point inside a P-256 or P-384 SubjectPublicKeyInfo.
fn ec_point(spki: &[u8]) -> Result<(&'static str, &[u8]), Error> {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| Error::InvalidJwt("bundle key does not parse".into()))?;
    let point = info.subject_public_key.data;
    let alg = match point.len() {
        65 => "ES256",
        97 => "ES384",
        _ => return Err(Error::InvalidJwt("bundle key is not P-256 or P-384".into())),
    };
    // Return a slice into `spki`: the BIT STRING contents are its tail.
    let tail = spki
        .len()
        .checked_sub(point.len())
        .and_then(|start| spki.get(start..))
        .ok_or_else(|| Error::InvalidJwt("bundle key does not parse".into()))?;
    Ok((alg, tail))
}

/// Validates a JWT-SVID for `audience` at `now` (Unix seconds). `keys_for` returns
/// the JWT authorities of a trust domain, `None` when no bundle is known for it.
pub fn validate(
    token: &str,
    audience: &str,
    now: i64,
    keys_for: impl Fn(&TrustDomain) -> Option<Vec<JwtKey>>,
) -> Result<ValidatedJwt, Error> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::InvalidJwt("token too long".into()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::InvalidJwt(
            "not a compact JWS (three dot-separated parts)".into(),
        ));
    };
    let header = decode_json(h, "header")?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !matches!(alg, "ES256" | "ES384") {
        return Err(Error::InvalidJwt(format!("unsupported algorithm {alg:?}")));
    }
    if let Some(typ) = header.get("typ") {
        if !matches!(typ.as_str(), Some("JWT") | Some("JOSE")) {
            return Err(Error::InvalidJwt("typ must be JWT or JOSE".into()));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidJwt("header has no kid".into()))?;
    let claims = decode_json(c, "claims")?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::InvalidJwt("token has no sub claim".into()))?;
    let spiffe_id = crate::spiffe_id::parse(sub)
        .map_err(|e| Error::InvalidJwt(format!("sub is not a SPIFFE ID: {e}")))?;
    let td = spiffe_id.trust_domain();
    let keys = keys_for(td)
        .ok_or_else(|| Error::InvalidJwt(format!("no bundle for trust domain {td}")))?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| Error::InvalidJwt(format!("key {kid:?} is not in the bundle of {td}")))?;
    let (key_alg, point) = ec_point(&key.spki)?;
    if key_alg != alg {
        return Err(Error::InvalidJwt(format!(
            "key {kid:?} is {key_alg}, token says {alg}"
        )));
    }
    let sig = B64
        .decode(s)
        .map_err(|_| Error::InvalidJwt("signature is not base64url".into()))?;
    let verify_alg = if alg == "ES256" {
        &ECDSA_P256_SHA256_FIXED
    } else {
        &ECDSA_P384_SHA384_FIXED
    };
    let signed = &token[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(verify_alg, point)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| Error::InvalidJwt("signature does not verify".into()))?;

    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::InvalidJwt("token has no exp claim".into()))?;
    if now >= exp {
        return Err(Error::InvalidJwt("token has expired".into()));
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64) {
        if now < nbf {
            return Err(Error::InvalidJwt("token is not yet valid".into()));
        }
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        _ => return Err(Error::InvalidJwt("token has no aud claim".into())),
    };
    if !audience_ok {
        return Err(Error::InvalidJwt(format!(
            "audience {audience:?} is not in the token's aud"
        )));
    }
    Ok(ValidatedJwt { spiffe_id, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair};

    fn key() -> (EcdsaKeyPair, JwtKey) {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            doc.as_ref(),
            &rng,
        )
        .unwrap();
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(kp.public_key().as_ref());
        (
            kp,
            JwtKey {
                kid: "k1".into(),
                spki,
            },
        )
    }

    fn mint(kp: &EcdsaKeyPair, claims: Value) -> String {
        let Value::Object(m) = claims else { panic!() };
        encode_es256::<()>("k1", &m, |msg| {
            Ok(kp
                .sign(&SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec())
        })
        .unwrap()
    }

    #[test]
    fn validates_and_refuses_with_reasons() {
        let (kp, jk) = key();
        let keys = |td: &TrustDomain| (td.as_str() == "example.org").then(|| vec![jk.clone()]);
        let good = mint(
            &kp,
            json!({"sub": "spiffe://example.org/w", "aud": ["db"], "exp": 2000, "iat": 1000}),
        );
        let v = validate(&good, "db", 1500, keys).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/w");
        assert_eq!(v.claims["iat"], 1000);

        let err =
            |t: &str, aud: &str, now: i64| validate(t, aud, now, keys).unwrap_err().to_string();
        assert!(err(&good, "web", 1500).contains("audience \"web\" is not in"));
        assert!(err(&good, "db", 2000).contains("expired"));
        let other_td = mint(
            &kp,
            json!({"sub": "spiffe://other.org/w", "aud": "db", "exp": 2000}),
        );
        assert!(err(&other_td, "db", 1500).contains("no bundle for trust domain other.org"));
        let no_exp = mint(&kp, json!({"sub": "spiffe://example.org/w", "aud": "db"}));
        assert!(err(&no_exp, "db", 1500).contains("no exp"));
        // Tampered claims: signature no longer verifies.
        let parts: Vec<_> = good.split('.').collect();
        let forged_claims = B64.encode(
            json!({"sub": "spiffe://example.org/admin", "aud": ["db"], "exp": 2000}).to_string(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(err(&forged, "db", 1500).contains("signature does not verify"));
        // alg none / HS256 are refused before any key is looked at.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","kid":"k1"}"#),
            parts[1]
        );
        assert!(err(&none, "db", 1500).contains("unsupported algorithm \"none\""));
        assert!(err("a.b", "db", 1500).contains("three dot-separated parts"));
    }
}
