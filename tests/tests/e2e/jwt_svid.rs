//! JWT-SVIDs across trust domains through the real agent's `ValidateJWTSVID` (the rev-jwt
//! review): a federated domain whose JWT key reuses this domain's `kid` vouches only for
//! its own subjects, and only to callers whose entries federate with it; tokens with
//! forbidden header parameters and oversize tokens are refused with their reasons; a
//! federated bundle with keys that can never verify is refused by `bundle set`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use ztid_proto::workload::{self as wpb, spiffe_workload_api_client::SpiffeWorkloadApiClient};
use ztid_tests::*;

const TD: &str = "example.org";

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert(ztid_proto::WORKLOAD_API_HEADER, "true".parse().unwrap());
    r
}

fn sign(kp: &EcdsaKeyPair, header: Value, claims: Value) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = kp.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "aud": ["db"], "exp": now() + 300, "iat": now()})
}

/// `ValidateJWTSVID`'s answer: the SPIFFE ID, or the refusal's code and message.
async fn validate(
    c: &mut SpiffeWorkloadApiClient<tonic::transport::Channel>,
    token: &str,
) -> Result<String, (tonic::Code, String)> {
    c.validate_jwtsvid(req(wpb::ValidateJwtsvidRequest {
        audience: "db".into(),
        svid: token.into(),
    }))
    .await
    .map(|r| r.into_inner().spiffe_id)
    .map_err(|s| (s.code(), s.message().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_key_vouches_only_for_its_own_domain_and_only_to_federating_callers() {
    let server = Server::start(TD);
    let agent = Agent::start(&server);
    let dir = tempfile::tempdir().unwrap();
    let local_kid = serde_json::from_str::<Value>(&server.cli_ok(&[
        "authority",
        "jwt",
        "show",
        "--output",
        "json",
    ]))
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .find(|a| a["state"] == "active")
    .map(|a| a["id"].as_str().unwrap().to_string())
    .expect("an active JWT authority");

    // evil.test's JWT key: ours, published under this domain's own kid.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let evil =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = evil.public_key().as_ref();
    let jwk = json!({"kty": "EC", "use": "jwt-svid", "kid": local_kid, "crv": "P-256",
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])});
    let set_bundle = |name: &str, keys: Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        server.cli(&[
            "bundle",
            "set",
            "--trust-domain",
            "evil.test",
            "--format",
            "spiffe",
            "--path",
            path.to_str().unwrap(),
        ])
    };
    // Keys that can never verify are refused (the point off its curve), or ignored
    // (RSA, with exponent 1; another curve).
    let mut off_curve = jwk.clone();
    let mut y = point[33..65].to_vec();
    y[31] ^= 1;
    off_curve["y"] = json!(B64.encode(&y));
    let r = set_bundle("off-curve.json", json!([off_curve]));
    assert!(!r.ok, "an off-curve key was accepted");
    assert!(
        r.stderr.contains(&format!(
            "malformed jwt-svid key {local_kid}: the point is not on curve P-256"
        )),
        "{}",
        r.stderr
    );
    let rsa = json!({"kty": "RSA", "use": "jwt-svid", "kid": "rsa", "n": B64.encode([0xff; 512]), "e": "AQ"});
    let k1 = json!({"kty": "EC", "use": "jwt-svid", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA"});
    assert!(set_bundle("evil.json", json!([jwk, rsa, k1])).ok);

    let mut c = SpiffeWorkloadApiClient::new(
        ztid_proto::transport::unix_channel(agent.socket())
            .await
            .unwrap(),
    );
    // A subject of this domain, signed by evil.test's key under this domain's kid: the
    // kid names this domain's key, which did not sign it.
    let forged = sign(
        &evil,
        json!({"alg": "ES256", "kid": local_kid, "typ": "JWT"}),
        claims(&format!("spiffe://{TD}/payments")),
    );
    assert_eq!(
        validate(&mut c, &forged).await,
        Err((
            tonic::Code::InvalidArgument,
            "invalid JWT-SVID: signature does not verify".into()
        ))
    );
    // evil.test's own subject: not to a caller that does not federate with it.
    let theirs = sign(
        &evil,
        json!({"alg": "ES256", "kid": local_kid, "typ": "JWT"}),
        claims("spiffe://evil.test/w"),
    );
    assert_eq!(
        validate(&mut c, &theirs).await,
        Err((
            tonic::Code::InvalidArgument,
            "invalid JWT-SVID: no bundle for trust domain evil.test".into()
        ))
    );
    // Once this caller's entry federates with evil.test (and the agent has synced it),
    // evil.test's subjects validate, and still only its own.
    entry_for_my_uid(
        &server,
        &agent,
        &format!("spiffe://{TD}/fed"),
        &["--federates-with", "spiffe://evil.test"],
    );
    let started = std::time::Instant::now();
    let id = loop {
        match validate(&mut c, &theirs).await {
            Ok(id) => break id,
            Err(e) => assert!(
                started.elapsed() < READY_TIMEOUT,
                "the federating entry never reached the agent: {e:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(id, "spiffe://evil.test/w");
    assert_eq!(
        validate(&mut c, &forged).await,
        Err((
            tonic::Code::InvalidArgument,
            "invalid JWT-SVID: signature does not verify".into()
        ))
    );
    // A header parameter the JWT-SVID spec forbids, from a key that verifies.
    let crit = sign(
        &evil,
        json!({"alg": "ES256", "kid": local_kid, "typ": "JWT", "crit": ["exp"]}),
        claims("spiffe://evil.test/w"),
    );
    assert_eq!(
        validate(&mut c, &crit).await,
        Err((
            tonic::Code::InvalidArgument,
            r#"invalid JWT-SVID: header parameter "crit" is not allowed in a JWT-SVID"#.into()
        ))
    );
    // Oversize: 20 KiB is refused by the validator, 10 MiB by the socket's message cap
    // before anything reads it.
    assert_eq!(
        validate(&mut c, &"a".repeat(20 * 1024)).await,
        Err((
            tonic::Code::InvalidArgument,
            "invalid JWT-SVID: token too long (more than 16384 bytes)".into()
        ))
    );
    let (code, msg) = validate(&mut c, &"a".repeat(10 * 1024 * 1024))
        .await
        .expect_err("a 10 MiB token");
    assert_eq!(code, tonic::Code::OutOfRange, "{msg}");
    assert!(msg.contains("message length too large"), "{msg}");
    // The agent still answers.
    assert_eq!(
        validate(&mut c, &theirs).await.as_deref(),
        Ok("spiffe://evil.test/w")
    );
}
