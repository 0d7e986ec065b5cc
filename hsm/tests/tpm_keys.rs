//! `TpmKeyManager` against a real TPM 2.0: one `swtpm socket` per test (swtpm and
//! tpm2-tools are installed by `scripts/install-deps.sh`), each with its own state
//! directory and ports. The tests fail, never skip, when swtpm is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "integration test: a panic is a failed test"
)]

use ztid_test_support::swtpm;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P256_SHA256_FIXED,
};
use swtpm::Swtpm;
use ztid_hsm::{Error, KeyAlgorithm, KeyManager, SignatureFormat, TpmKeyManager};

fn verify_both(km: &dyn KeyManager, key_id: &str, raw: &[u8], msg: &[u8]) {
    let der = km.sign(key_id, msg, SignatureFormat::Der).unwrap();
    assert_eq!(der[0], 0x30, "DER signature is a SEQUENCE");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, raw)
        .verify(msg, &der)
        .expect("DER signature verifies");
    let fixed = km.sign(key_id, msg, SignatureFormat::Fixed).unwrap();
    assert_eq!(fixed.len(), 64);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, raw)
        .verify(msg, &fixed)
        .expect("fixed signature verifies");
    assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, raw)
        .verify(b"another message", &fixed)
        .is_err());
}

#[test]
fn generate_sign_verify_persist_list_destroy() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tpm = Swtpm::start(&tmp.path().join("tpm"));
    let keys = tmp.path().join("keys");

    let km = TpmKeyManager::open(&tpm.tcti(), &keys).unwrap();
    assert_eq!(km.backend_name(), "tpm");
    let public = km.generate("x509-ca-1", KeyAlgorithm::EcdsaP256).unwrap();
    assert_eq!(public.raw.len(), 65);
    assert_eq!(public.raw[0], 4);
    assert_eq!(km.public_key("x509-ca-1").unwrap(), public);
    for i in 0..5u8 {
        verify_both(&km, "x509-ca-1", &public.raw, &[i; 100]);
    }

    // The file is owner-only and is not a usable key: not PKCS#8, ring refuses it.
    let file = keys.join("x509-ca-1.tpmkey");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let blob = std::fs::read(&file).unwrap();
    assert_ne!(blob.first(), Some(&0x30), "not a DER structure");
    let rng = ring::rand::SystemRandom::new();
    assert!(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &blob, &rng).is_err());
    for skip in 0..blob.len().min(64) {
        assert!(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &blob[skip..], &rng).is_err()
        );
    }

    assert!(matches!(
        km.generate("x509-ca-1", KeyAlgorithm::EcdsaP256),
        Err(Error::AlreadyExists(_))
    ));
    let jwt = km.generate("jwt-1", KeyAlgorithm::EcdsaP256).unwrap();
    assert_ne!(jwt, public);
    assert_eq!(
        km.list().unwrap(),
        vec!["jwt-1".to_string(), "x509-ca-1".to_string()]
    );

    // Nothing left in the TPM's transient slots (swtpm has no resource manager).
    drop(km);
    assert_eq!(tpm.leftovers(), "", "transient objects or sessions left");

    // Restart the TPM (same state): the SRK is re-derived, the blobs load again.
    tpm.stop();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let km = TpmKeyManager::open(&tpm.tcti(), &keys).unwrap();
    assert_eq!(km.public_key("x509-ca-1").unwrap(), public);
    verify_both(&km, "x509-ca-1", &public.raw, b"after restart");
    verify_both(&km, "jwt-1", &jwt.raw, b"after restart");

    km.destroy("x509-ca-1").unwrap();
    assert!(!file.exists());
    assert_eq!(km.list().unwrap(), vec!["jwt-1".to_string()]);
    assert!(matches!(
        km.public_key("x509-ca-1"),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        km.sign("x509-ca-1", b"m", SignatureFormat::Der),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(km.destroy("x509-ca-1"), Err(Error::NotFound(_))));
    assert!(matches!(
        km.sign("../x", b"m", SignatureFormat::Der),
        Err(Error::InvalidKeyId(_))
    ));
    drop(km);
    assert_eq!(tpm.leftovers(), "");
}

#[test]
fn blob_is_useless_on_another_tpm() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm_a = Swtpm::start(&tmp.path().join("a"));
    let tpm_b = Swtpm::start(&tmp.path().join("b"));
    let keys = tmp.path().join("keys");
    let public = {
        let km = TpmKeyManager::open(&tpm_a.tcti(), &keys).unwrap();
        km.generate("ca", KeyAlgorithm::EcdsaP256).unwrap()
    };
    let km_b = TpmKeyManager::open(&tpm_b.tcti(), &keys).unwrap();
    // The public half is readable from the file, but TPM B cannot use the private half.
    assert_eq!(km_b.public_key("ca").unwrap(), public);
    let err = km_b.sign("ca", b"m", SignatureFormat::Der).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    drop(km_b);
    assert_eq!(tpm_b.leftovers(), "");
}

#[test]
fn concurrent_signing_is_serialised() {
    let tmp = tempfile::tempdir().unwrap();
    let tpm = Swtpm::start(&tmp.path().join("tpm"));
    let km = Arc::new(TpmKeyManager::open(&tpm.tcti(), tmp.path().join("keys")).unwrap());
    let public = km.generate("k", KeyAlgorithm::EcdsaP256).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let km = km.clone();
            let raw = public.raw.clone();
            std::thread::spawn(move || {
                for i in 0..3u8 {
                    verify_both(km.as_ref(), "k", &raw, &[t, i]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(km);
    assert_eq!(tpm.leftovers(), "");
}

#[test]
fn bad_tcti_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let err = TpmKeyManager::open("swtpm:host=127.0.0.1,port=1", tmp.path())
        .err()
        .expect("no TPM there");
    assert!(matches!(err, Error::Tpm { .. }), "{err}");
}
