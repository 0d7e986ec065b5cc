//! The access token (RFC 9068 `at+jwt`): its claims (docs/token-exchange.md, "The access
//! token"), its ES256 encoding with a signing callback (the key stays in the key
//! manager, as for JWT-SVIDs), and its verification against the JWT authorities.
//!
//! The header's `typ` is what tells an access token from a JWT-SVID (`JWT`): each
//! verifier refuses the other's, so neither can stand in for the other.
//!
//! Uses only `super::{error, scope, chain, token}` and external crates, never `crate::`:
//! fuzz/fuzz_targets/sts_request.rs includes these files by path.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SecureRandom;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED};
use serde_json::{Map, Value};
use ztid_spiffe::jwt::JwtKey;

use super::chain::{ActChain, MAX_ACTOR_ID_LEN};
use super::error::{OAuthError, OAuthErrorCode};
use super::scope::Scopes;

/// RFC 8693 token type of the tokens this endpoint issues.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The JWS `typ` of an access token (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Longest token [`verify`] looks at, in bytes.
pub const MAX_ACCESS_TOKEN_LEN: usize = 8 * 1024;
/// How far in the future `iat` may be (clock skew between servers), in seconds.
pub const MAX_IAT_SKEW_SECONDS: i64 = 60;

fn invalid_grant(description: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidGrant, description)
}

/// An access token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// `iss`: the issuer (the token endpoint's URL).
    pub iss: String,
    /// `sub`: the subject's SPIFFE ID (with delegation, the original subject's).
    pub sub: String,
    /// `aud`: the resource or audience.
    pub aud: String,
    /// `client_id`: the party that made the request (the newest actor, if any).
    pub client_id: String,
    /// `scope`: the granted scopes.
    pub scope: Scopes,
    /// `jti`: 128 random bits, base64url.
    pub jti: String,
    /// `iat`, Unix seconds.
    pub iat: i64,
    /// `exp`, Unix seconds.
    pub exp: i64,
    /// `cnf.x5t#S256` (RFC 8705 §3.1): the bound client certificate's hash, for mTLS callers.
    pub cnf_x5t_s256: Option<String>,
    /// `act`: the delegation chain, newest first.
    pub act: ActChain,
    /// `may_act.sub`: who may act for this subject.
    pub may_act: Option<String>,
    /// `ztid_grant`: the grant that allowed it.
    pub grant: String,
    /// `ztid_node`: the caller's verified node facts, when known and configured.
    pub node: Option<Value>,
    /// `ztid_nodes`: the node (agent SPIFFE ID) each party, the subject and every actor,
    /// was issued through, for those whose credential named one. Recorded whatever
    /// `node_claims` says, and carried through delegation: a node revocation reaches
    /// every token its workloads took part in.
    pub nodes: BTreeMap<String, String>,
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<String, OAuthError> {
    match claims.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid_grant(format!("token claim {name} is not a string"))),
        None => Err(invalid_grant(format!("token has no {name} claim"))),
    }
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<i64, OAuthError> {
    match claims.get(name) {
        Some(v) => v
            .as_i64()
            .ok_or_else(|| invalid_grant(format!("token claim {name} is not an integer"))),
        None => Err(invalid_grant(format!("token has no {name} claim"))),
    }
}

/// A `{"<member>": "<string>"}`-shaped claim (`cnf`): the member, if present.
fn member_claim(
    claims: &Map<String, Value>,
    name: &str,
    member: &str,
) -> Result<Option<String>, OAuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Object(object)) => match object.get(member) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid_grant(format!(
                "token claim {name} has no {member} string"
            ))),
        },
        Some(_) => Err(invalid_grant(format!(
            "token claim {name} is not an object"
        ))),
    }
}

impl AccessToken {
    /// The JWT claims set.
    pub fn to_claims(&self) -> Map<String, Value> {
        let mut claims = Map::new();
        let mut put = |name: &str, value: Value| {
            claims.insert(name.to_string(), value);
        };
        put("iss", self.iss.clone().into());
        put("sub", self.sub.clone().into());
        put("aud", self.aud.clone().into());
        put("client_id", self.client_id.clone().into());
        put("scope", self.scope.to_string().into());
        put("jti", self.jti.clone().into());
        put("iat", self.iat.into());
        put("exp", self.exp.into());
        if let Some(thumbprint) = &self.cnf_x5t_s256 {
            put("cnf", serde_json::json!({ "x5t#S256": thumbprint }));
        }
        if let Some(act) = self.act.to_claim() {
            put("act", act);
        }
        if let Some(may_act) = &self.may_act {
            put("may_act", serde_json::json!({ "sub": may_act }));
        }
        put("ztid_grant", self.grant.clone().into());
        if let Some(node) = &self.node {
            put("ztid_node", node.clone());
        }
        if !self.nodes.is_empty() {
            let nodes: Map<String, Value> = self
                .nodes
                .iter()
                .map(|(id, node)| (id.clone(), Value::String(node.clone())))
                .collect();
            put("ztid_nodes", Value::Object(nodes));
        }
        claims
    }

    /// The node `id` (the subject or an actor) was issued through, if known. A token
    /// without `ztid_nodes` names its client's node in `ztid_node` only.
    pub fn node_of(&self, id: &str) -> Option<&str> {
        self.nodes.get(id).map(String::as_str).or_else(|| {
            if id == self.client_id {
                self.node.as_ref()?.get("agent")?.as_str()
            } else {
                None
            }
        })
    }

    /// Reads a claims set; a missing or ill-typed claim, or an `act` chain deeper than
    /// `max_depth`, is `invalid_grant`.
    pub fn from_claims(
        claims: &Map<String, Value>,
        max_depth: usize,
    ) -> Result<AccessToken, OAuthError> {
        let scope = Scopes::parse(&string_claim(claims, "scope")?)
            .map_err(|e| invalid_grant(format!("token claim scope: {}", e.description)))?;
        let node = match claims.get("ztid_node") {
            None => None,
            Some(node @ Value::Object(_)) => Some(node.clone()),
            Some(_) => return Err(invalid_grant("token claim ztid_node is not an object")),
        };
        let may_act = claims
            .get("may_act")
            .map(|m| super::chain::may_act_id(m).map(str::to_string))
            .transpose()?;
        let sub = string_claim(claims, "sub")?;
        let act = ActChain::from_claim(claims.get("act"), max_depth)?;
        let nodes = nodes_claim(claims.get("ztid_nodes"), &sub, &act)?;
        Ok(AccessToken {
            iss: string_claim(claims, "iss")?,
            sub,
            aud: string_claim(claims, "aud")?,
            client_id: string_claim(claims, "client_id")?,
            scope,
            jti: string_claim(claims, "jti")?,
            iat: time_claim(claims, "iat")?,
            exp: time_claim(claims, "exp")?,
            cnf_x5t_s256: member_claim(claims, "cnf", "x5t#S256")?,
            act,
            may_act,
            grant: string_claim(claims, "ztid_grant")?,
            node,
            nodes,
        })
    }
}

/// Reads `ztid_nodes`: an object from parties of the token (its `sub` or an actor of
/// `act`) to SPIFFE IDs of nodes, each bounded. Anything else is `invalid_grant`.
fn nodes_claim(
    claim: Option<&Value>,
    sub: &str,
    act: &ActChain,
) -> Result<BTreeMap<String, String>, OAuthError> {
    let Some(claim) = claim else {
        return Ok(BTreeMap::new());
    };
    let Value::Object(object) = claim else {
        return Err(invalid_grant("token claim ztid_nodes is not an object"));
    };
    let mut nodes = BTreeMap::new();
    for (id, node) in object {
        if id != sub && !act.contains(id) {
            return Err(invalid_grant(
                "token claim ztid_nodes names an identity that is neither sub nor an actor",
            ));
        }
        let node = node
            .as_str()
            .filter(|n| n.len() <= MAX_ACTOR_ID_LEN && n.starts_with("spiffe://"))
            .ok_or_else(|| {
                invalid_grant("token claim ztid_nodes holds a node that is not a SPIFFE ID")
            })?;
        nodes.insert(id.clone(), node.to_string());
    }
    Ok(nodes)
}

/// Base64url length (no padding) of a fixed-width ES256 signature (64 bytes).
const ES256_SIGNATURE_B64_LEN: usize = 86;

fn too_long(len: usize) -> OAuthError {
    OAuthError::new(
        OAuthErrorCode::InvalidRequest,
        format!(
            "the access token would be {len} bytes, more than the {MAX_ACCESS_TOKEN_LEN} this server accepts back: request fewer scopes, or a shorter delegation chain"
        ),
    )
}

/// Encodes and signs `token`: header `{"alg":"ES256","kid":…,"typ":"at+jwt"}`. `sign`
/// must return the fixed-width (r‖s) ES256 signature of its input. A token longer than
/// [`MAX_ACCESS_TOKEN_LEN`] (which [`verify`] would refuse, so it could never be
/// presented back) is refused before it is signed, `invalid_request` saying so.
pub fn encode(
    kid: &str,
    token: &AccessToken,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, OAuthError>,
) -> Result<String, OAuthError> {
    // Written out rather than built from a map, so the header is exactly this.
    let header = format!(
        r#"{{"alg":"ES256","kid":{},"typ":"{ACCESS_TOKEN_TYP}"}}"#,
        Value::String(kid.to_string())
    );
    let mut out = String::with_capacity(1024);
    B64.encode_string(header, &mut out);
    out.push('.');
    B64.encode_string(Value::Object(token.to_claims()).to_string(), &mut out);
    let expected = out.len() + 1 + ES256_SIGNATURE_B64_LEN;
    if expected > MAX_ACCESS_TOKEN_LEN {
        return Err(too_long(expected));
    }
    let signature = sign(out.as_bytes())?;
    out.push('.');
    B64.encode_string(signature, &mut out);
    if out.len() > MAX_ACCESS_TOKEN_LEN {
        return Err(too_long(out.len()));
    }
    Ok(out)
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, OAuthError> {
    let bytes = B64
        .decode(part)
        .map_err(|_| invalid_grant(format!("token {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(invalid_grant(format!("token {what} is not a JSON object"))),
    }
}

/// Verifies an access token this server issued: at most [`MAX_ACCESS_TOKEN_LEN`] bytes,
/// header `typ` `at+jwt` (or `application/at+jwt`), `alg` ES256 or ES384, `kid` one of
/// `keys`, a signature that verifies, `iss` == `issuer`, not expired at `now`, not
/// issued more than a minute ahead, and well-formed claims (an `act` chain of at most
/// `max_depth`). Everything else is `invalid_grant` saying why. Revocation is the
/// caller's to check.
pub fn verify(
    token: &str,
    keys: &[JwtKey],
    issuer: &str,
    now: i64,
    max_depth: usize,
) -> Result<AccessToken, OAuthError> {
    if token.len() > MAX_ACCESS_TOKEN_LEN {
        return Err(invalid_grant(format!(
            "token too large (more than {MAX_ACCESS_TOKEN_LEN} bytes)"
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_grant(
            "token is not a compact JWS (three dot-separated parts)",
        ));
    };
    let header = decode_json(h, "header")?;
    let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
    if !(typ.eq_ignore_ascii_case(ACCESS_TOKEN_TYP)
        || typ.eq_ignore_ascii_case("application/at+jwt"))
    {
        return Err(invalid_grant(
            "token is not an access token (header typ must be at+jwt)",
        ));
    }
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    if !matches!(alg, "ES256" | "ES384") {
        let shown: String = alg.chars().take(32).collect();
        return Err(invalid_grant(format!(
            "token algorithm {shown:?} not accepted (ES256 or ES384 only)"
        )));
    }
    // No JWS extension is understood, so any critical one must be refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(invalid_grant("token header has crit extensions"));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_grant("token header has no kid"))?;
    let key = keys.iter().find(|k| k.kid == kid).ok_or_else(|| {
        let shown: String = kid.chars().take(64).collect();
        invalid_grant(format!(
            "token key {shown:?} is not a JWT authority of this server"
        ))
    })?;
    let (key_alg, point) = ztid_spiffe::jwt::es_point(&key.spki).ok_or_else(|| {
        invalid_grant(format!("JWT authority {kid:?} is not a P-256 or P-384 key"))
    })?;
    if key_alg != alg {
        return Err(invalid_grant(format!(
            "token says {alg}, its key {kid:?} is {key_alg}"
        )));
    }
    let signature = B64
        .decode(s)
        .map_err(|_| invalid_grant("token signature is not base64url"))?;
    let verify_alg = if alg == "ES256" {
        &ECDSA_P256_SHA256_FIXED
    } else {
        &ECDSA_P384_SHA384_FIXED
    };
    // `h.len() + 1 + c.len()` is the signing input's length: it is a prefix of `token`.
    let signed = token
        .get(..h.len() + 1 + c.len())
        .ok_or_else(|| invalid_grant("token is not a compact JWS"))?;
    UnparsedPublicKey::new(verify_alg, point)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| invalid_grant("token signature does not verify"))?;

    let claims = decode_json(c, "claims")?;
    let access = AccessToken::from_claims(&claims, max_depth)?;
    if access.iss != issuer {
        return Err(invalid_grant(
            "token was not issued by this server (iss differs)",
        ));
    }
    if now >= access.exp {
        return Err(invalid_grant("token has expired"));
    }
    if access.iat > now.saturating_add(MAX_IAT_SKEW_SECONDS) {
        return Err(invalid_grant("token is issued in the future (iat)"));
    }
    Ok(access)
}

/// The RFC 8705 `x5t#S256` of a certificate: base64url (no padding) SHA-256 of its DER.
pub fn x5t_s256(cert_der: &[u8]) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, cert_der))
}

/// A fresh `jti`: 16 random bytes, base64url.
pub fn new_jti() -> Result<String, OAuthError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| OAuthError::new(OAuthErrorCode::ServerError, "random source failed"))?;
    Ok(B64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    use serde_json::json;

    use super::*;

    const ISS: &str = "https://127.0.0.1:8443";
    const P256_SPKI_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    const P384_SPKI_PREFIX: [u8; 23] = [
        0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05,
        0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
    ];

    fn key(
        alg: &'static ring::signature::EcdsaSigningAlgorithm,
        prefix: &[u8],
        kid: &str,
    ) -> (EcdsaKeyPair, JwtKey) {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap();
        let mut spki = prefix.to_vec();
        spki.extend_from_slice(kp.public_key().as_ref());
        (
            kp,
            JwtKey {
                kid: kid.into(),
                spki,
            },
        )
    }

    fn p256() -> (EcdsaKeyPair, JwtKey) {
        key(&ECDSA_P256_SHA256_FIXED_SIGNING, &P256_SPKI_PREFIX, "k1")
    }

    fn sample() -> AccessToken {
        AccessToken {
            iss: ISS.into(),
            sub: "spiffe://example.org/user/i-1".into(),
            aud: "https://mcp.example/tools".into(),
            client_id: "spiffe://example.org/agent/i-2".into(),
            scope: Scopes::parse("tools.read tools.write").unwrap(),
            jti: new_jti().unwrap(),
            iat: 1000,
            exp: 1300,
            cnf_x5t_s256: Some(x5t_s256(b"cert")),
            act: ActChain::empty().with_newest("spiffe://example.org/agent/i-2"),
            may_act: Some("spiffe://example.org/agent".into()),
            grant: "g-1".into(),
            node: Some(
                json!({"agent": "spiffe://example.org/ztid/agent/x", "method": "tpm", "selectors": ["tpm:pcr0:aa"]}),
            ),
            nodes: BTreeMap::from([
                (
                    "spiffe://example.org/user/i-1".to_string(),
                    "spiffe://example.org/ztid/agent/u".to_string(),
                ),
                (
                    "spiffe://example.org/agent/i-2".to_string(),
                    "spiffe://example.org/ztid/agent/x".to_string(),
                ),
            ]),
        }
    }

    fn sign_with(kp: &EcdsaKeyPair) -> impl FnOnce(&[u8]) -> Result<Vec<u8>, OAuthError> + '_ {
        move |msg| {
            Ok(kp
                .sign(&SystemRandom::new(), msg)
                .unwrap()
                .as_ref()
                .to_vec())
        }
    }

    /// A token with an arbitrary header and claims, signed by `kp`.
    fn raw(kp: &EcdsaKeyPair, header: Value, claims: &Map<String, Value>) -> String {
        let mut out = B64.encode(header.to_string());
        out.push('.');
        B64.encode_string(Value::Object(claims.clone()).to_string(), &mut out);
        let sig = kp.sign(&SystemRandom::new(), out.as_bytes()).unwrap();
        out.push('.');
        B64.encode_string(sig.as_ref(), &mut out);
        out
    }

    fn refused(result: Result<AccessToken, OAuthError>, phrase: &str) {
        let e = result.unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidGrant, "{e}");
        assert!(e.description.contains(phrase), "{phrase:?} not in {e}");
    }

    #[test]
    fn round_trips_and_claims_follow_the_design() {
        let (kp, jk) = p256();
        let token = sample();
        let jwt = encode("k1", &token, sign_with(&kp)).unwrap();
        let header = B64.decode(jwt.split('.').next().unwrap()).unwrap();
        assert_eq!(header, br#"{"alg":"ES256","kid":"k1","typ":"at+jwt"}"#);
        assert_eq!(verify(&jwt, &[jk], ISS, 1299, 3).unwrap(), token);

        let claims = token.to_claims();
        assert_eq!(claims["aud"], "https://mcp.example/tools");
        assert_eq!(claims["scope"], "tools.read tools.write");
        assert_eq!(claims["cnf"], json!({"x5t#S256": x5t_s256(b"cert")}));
        assert_eq!(
            claims["act"],
            json!({"sub": "spiffe://example.org/agent/i-2"})
        );
        assert_eq!(
            claims["may_act"],
            json!({"sub": "spiffe://example.org/agent"})
        );
        assert_eq!(claims["ztid_grant"], "g-1");
        assert_eq!(claims["ztid_node"]["method"], "tpm");
        // Optional claims are absent, not null, when unset.
        assert_eq!(
            claims["ztid_nodes"],
            json!({"spiffe://example.org/user/i-1": "spiffe://example.org/ztid/agent/u",
                "spiffe://example.org/agent/i-2": "spiffe://example.org/ztid/agent/x"})
        );
        let bare = AccessToken {
            cnf_x5t_s256: None,
            act: ActChain::empty(),
            may_act: None,
            node: None,
            nodes: BTreeMap::new(),
            ..sample()
        };
        let claims = bare.to_claims();
        for absent in ["cnf", "act", "may_act", "ztid_node", "ztid_nodes"] {
            assert!(!claims.contains_key(absent), "{absent}");
        }
        assert_eq!(AccessToken::from_claims(&claims, 0).unwrap(), bare);
    }

    #[test]
    fn a_token_too_long_to_verify_is_refused_before_it_is_signed() {
        let long = AccessToken {
            aud: format!("https://mcp.example/{}", "x".repeat(MAX_ACCESS_TOKEN_LEN)),
            ..sample()
        };
        let e = encode("k1", &long, |_| -> Result<Vec<u8>, OAuthError> {
            panic!("signed a token too long to verify")
        })
        .unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidRequest);
        assert!(
            e.description.contains(&format!(
                "more than the {MAX_ACCESS_TOKEN_LEN} this server accepts back"
            )),
            "{e}"
        );
        // Just under the bound: issued, and it verifies.
        let (kp, jk) = p256();
        let fits = |extra: usize| AccessToken {
            aud: format!("https://mcp.example/{}", "x".repeat(extra)),
            ..sample()
        };
        let base = encode("k1", &fits(0), sign_with(&kp)).unwrap().len();
        // Base64url: 3 claim bytes become 4 characters.
        let room = (MAX_ACCESS_TOKEN_LEN - base) / 4 * 3;
        let jwt = encode("k1", &fits(room), sign_with(&kp)).unwrap();
        assert!(jwt.len() <= MAX_ACCESS_TOKEN_LEN);
        assert!(verify(&jwt, &[jk], ISS, 1100, 3).is_ok());
    }

    #[test]
    fn node_of_names_each_partys_own_node() {
        let token = sample();
        let user = "spiffe://example.org/user/i-1";
        let agent = "spiffe://example.org/agent/i-2";
        assert_eq!(
            token.node_of(user),
            Some("spiffe://example.org/ztid/agent/u")
        );
        assert_eq!(
            token.node_of(agent),
            Some("spiffe://example.org/ztid/agent/x")
        );
        assert_eq!(token.node_of("spiffe://example.org/other"), None);
        // Without ztid_nodes, only the client's node is known (from ztid_node).
        let older = AccessToken {
            nodes: BTreeMap::new(),
            ..sample()
        };
        assert_eq!(
            older.node_of(agent),
            Some("spiffe://example.org/ztid/agent/x")
        );
        assert_eq!(older.node_of(user), None);
    }

    #[test]
    fn verifies_es384_and_refuses_algorithm_key_mismatch() {
        let (kp, jk) = key(&ECDSA_P384_SHA384_FIXED_SIGNING, &P384_SPKI_PREFIX, "k384");
        let claims = sample().to_claims();
        let good = raw(
            &kp,
            json!({"alg": "ES384", "kid": "k384", "typ": "application/at+jwt"}),
            &claims,
        );
        assert!(verify(&good, std::slice::from_ref(&jk), ISS, 1100, 3).is_ok());
        let lying = raw(
            &kp,
            json!({"alg": "ES256", "kid": "k384", "typ": "at+jwt"}),
            &claims,
        );
        refused(
            verify(&lying, &[jk], ISS, 1100, 3),
            "its key \"k384\" is ES384",
        );
    }

    #[test]
    fn refuses_with_reasons() {
        let (kp, jk) = p256();
        let keys = [jk];
        let claims = sample().to_claims();
        let header = json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"});
        let good = raw(&kp, header.clone(), &claims);
        let check = |t: &str| verify(t, &keys, ISS, 1100, 3);
        assert!(check(&good).is_ok());

        refused(
            check(&"a".repeat(MAX_ACCESS_TOKEN_LEN + 1)),
            "token too large",
        );
        refused(check("a.b"), "three dot-separated parts");
        refused(check("a.b.c.d"), "three dot-separated parts");
        refused(check("!!.b.c"), "header is not base64url");
        // A JWT-SVID (typ JWT) is never an access token; nor is a token without typ.
        let svid = ztid_spiffe::jwt::encode_es256("k1", &claims, sign_with(&kp)).unwrap();
        refused(check(&svid), "typ must be at+jwt");
        refused(
            check(&raw(&kp, json!({"alg": "ES256", "kid": "k1"}), &claims)),
            "typ must be at+jwt",
        );
        // alg none and HMAC are refused before any key is looked at.
        let parts: Vec<&str> = good.split('.').collect();
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","kid":"k1","typ":"at+jwt"}"#),
            parts[1]
        );
        refused(check(&none), "algorithm \"none\" not accepted");
        let hs = raw(
            &kp,
            json!({"alg": "HS256", "kid": "k1", "typ": "at+jwt"}),
            &claims,
        );
        refused(check(&hs), "algorithm \"HS256\" not accepted");
        let crit = raw(
            &kp,
            json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt", "crit": ["x"]}),
            &claims,
        );
        refused(check(&crit), "crit");
        refused(
            check(&raw(&kp, json!({"alg": "ES256", "typ": "at+jwt"}), &claims)),
            "no kid",
        );
        let other_kid = raw(
            &kp,
            json!({"alg": "ES256", "kid": "k9", "typ": "at+jwt"}),
            &claims,
        );
        refused(check(&other_kid), "key \"k9\" is not a JWT authority");
        // Signed by another key under our kid; tampered claims.
        let (other, _) = p256();
        refused(
            check(&raw(&other, header.clone(), &claims)),
            "signature does not verify",
        );
        let mut forged_claims = claims.clone();
        forged_claims.insert("scope".into(), "admin".into());
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(Value::Object(forged_claims).to_string()),
            parts[2]
        );
        refused(check(&forged), "signature does not verify");
        refused(
            check(&format!("{}.{}.%%", parts[0], parts[1])),
            "signature is not base64url",
        );
        // Issuer, expiry, issue time.
        refused(
            verify(&good, &keys, "https://other", 1100, 3),
            "iss differs",
        );
        refused(verify(&good, &keys, ISS, 1300, 3), "expired");
        assert!(verify(&good, &keys, ISS, 940, 3).is_ok());
        refused(verify(&good, &keys, ISS, 939, 3), "issued in the future");
        // The act chain is bounded by the caller's depth.
        refused(verify(&good, &keys, ISS, 1100, 0), "deeper than 0");
    }

    #[test]
    fn from_claims_refuses_missing_and_ill_typed_claims() {
        let good = sample().to_claims();
        for name in [
            "iss",
            "sub",
            "aud",
            "client_id",
            "scope",
            "jti",
            "iat",
            "exp",
            "ztid_grant",
        ] {
            let mut claims = good.clone();
            claims.remove(name);
            refused(
                AccessToken::from_claims(&claims, 3),
                &format!("no {name} claim"),
            );
        }
        let cases = [
            ("aud", json!(["a"]), "aud is not a string"),
            ("iat", json!("1000"), "iat is not an integer"),
            ("exp", json!(1.5), "exp is not an integer"),
            ("scope", json!("a  b"), "token claim scope"),
            ("cnf", json!({"x5t": "x"}), "cnf has no x5t#S256"),
            ("cnf", json!("x"), "cnf is not an object"),
            ("may_act", json!({"sub": 1}), "may_act has no sub"),
            ("may_act", json!({"sub": "x"}), "not a SPIFFE ID"),
            ("act", json!({"sub": "x"}), "not a SPIFFE ID"),
            ("ztid_node", json!("n"), "ztid_node is not an object"),
            ("ztid_nodes", json!("n"), "ztid_nodes is not an object"),
            (
                "ztid_nodes",
                json!({"spiffe://example.org/other": "spiffe://example.org/ztid/agent/x"}),
                "neither sub nor an actor",
            ),
            (
                "ztid_nodes",
                json!({"spiffe://example.org/user/i-1": 7}),
                "not a SPIFFE ID",
            ),
            (
                "ztid_nodes",
                json!({"spiffe://example.org/user/i-1": "node-1"}),
                "not a SPIFFE ID",
            ),
        ];
        for (name, value, phrase) in cases {
            let mut claims = good.clone();
            claims.insert(name.into(), value);
            refused(AccessToken::from_claims(&claims, 3), phrase);
        }
    }

    #[test]
    fn thumbprint_and_jti() {
        // SHA-256 of the empty string, base64url without padding.
        assert_eq!(x5t_s256(b""), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
        let a = new_jti().unwrap();
        assert_eq!(a.len(), 22);
        assert_ne!(a, new_jti().unwrap());
    }
}
