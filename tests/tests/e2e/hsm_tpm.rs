//! The CA's keys in a TPM, end to end: `ztid-server run --key-manager tpm
//! --tpm-tcti swtpm:…` on a swtpm (installed by `scripts/install-deps.sh`), a real
//! agent attesting with a join token, and the bundle's CA key checked against the
//! TPM key blobs the server left in `DATA_DIR/tpm-keys`.
#![forbid(unsafe_code)]

use ztid_test_support::swtpm;

use base64::Engine;
use swtpm::Swtpm;
use x509_parser::prelude::{FromDer, X509Certificate};
use ztid_hsm::{KeyManager, SignatureFormat, TpmKeyManager};
use ztid_tests::*;

const TD: &str = "example.org";

fn ca_cert(server: &Server) -> (serde_json::Value, Vec<u8>) {
    let bundle: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let x509: Vec<&serde_json::Value> = bundle["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .collect();
    assert_eq!(x509.len(), 1, "one X.509 authority");
    let ca_der = base64::engine::general_purpose::STANDARD
        .decode(x509[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    (bundle, ca_der)
}

fn assert_signed_by(leaf_der: &[u8], ca_der: &[u8], what: &str) {
    let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
    let (_, ca) = X509Certificate::from_der(ca_der).unwrap();
    leaf.verify_signature(Some(ca.public_key()))
        .unwrap_or_else(|e| panic!("{what} is not signed by the CA: {e}"));
}

fn agent_svid_der(agent: &Agent) -> Vec<u8> {
    let pem = std::fs::read_to_string(agent.data_dir().join("agent_svid.pem")).unwrap();
    pem::parse(pem).unwrap().into_contents()
}

#[test]
fn server_signs_with_keys_that_live_in_the_tpm() {
    let scratch = tempfile::tempdir().unwrap();
    let state = scratch.path().join("tpm");
    std::fs::create_dir_all(&state).unwrap();
    let tpm = Swtpm::start(&state);
    let tcti = tpm.tcti();
    let mut server = Server::start_with(TD, &["--key-manager", "tpm", "--tpm-tcti", &tcti]);

    let (bundle, ca_der) = ca_cert(&server);
    let agent = Agent::start(&server);
    assert_signed_by(&agent_svid_der(&agent), &ca_der, "agent SVID");

    // A restart loads the same TPM keys: same authorities, and agents still attest.
    server.restart();
    let (after, _) = ca_cert(&server);
    assert_eq!(after, bundle, "same authorities after a restart");
    let agent2 = Agent::start(&server);
    assert_signed_by(
        &agent_svid_der(&agent2),
        &ca_der,
        "agent SVID after restart",
    );
    drop(agent);
    drop(agent2);

    // swtpm serves one connection at a time: stop the server before looking ourselves.
    let keys_dir = server.data_dir().join("tpm-keys");
    if let Some(mut p) = server.proc.take() {
        p.stop();
    }
    assert_eq!(
        tpm.leftovers(),
        "",
        "the server left transient objects or sessions"
    );
    let km = TpmKeyManager::open(&tcti, &keys_dir).unwrap();
    let ids = km.list().unwrap();
    assert!(!ids.is_empty(), "no TPM keys in {}", keys_dir.display());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    let ca_spki = ca.public_key().raw.to_vec();
    let ca_id = ids
        .iter()
        .find(|id| km.public_key(id).unwrap().spki_der == ca_spki)
        .unwrap_or_else(|| panic!("the CA certificate's key is none of the TPM keys {ids:?}"));
    // And that TPM key really is the CA's: it signs what the CA key verifies.
    let sig = km.sign(ca_id, b"probe", SignatureFormat::Der).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &km.public_key(ca_id).unwrap().raw,
    )
    .verify(b"probe", &sig)
    .expect("the TPM's CA key signs");
    // No software key store was used.
    assert!(
        !server.data_dir().join("keys").exists()
            || std::fs::read_dir(server.data_dir().join("keys"))
                .unwrap()
                .next()
                .is_none(),
        "software keys were written"
    );
}
