//! `Pkcs11KeyManager` against a real PKCS#11 module: SoftHSM2 (Debian's `softhsm2`,
//! installed by `scripts/install-deps.sh`), with its tokens in a temporary directory.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, and a module is initialised
//! once per process; so this test binary sets up one token directory for the whole
//! process before any test touches the module, with one token per test so that the
//! tests, which run in parallel, cannot see each other's keys.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "integration test: a panic is a failed test"
)]

use ztid_test_support::softhsm as support;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED};
use support::{init_tokens, module};
use zeroize::Zeroizing;
use ztid_hsm::{Error, KeyAlgorithm, KeyManager, Pkcs11KeyManager, SignatureFormat};

const PIN: &str = "1234";
const SO_PIN: &str = "5678";
/// Every token this binary uses, created before the module is first loaded.
const TOKENS: &[&str] = &[
    "ztid-sign",
    "ztid-list",
    "ztid-persist",
    "ztid-attrs",
    "ztid-wrongpin",
    "ztid-threads",
    "ztid-planted",
    "ztid-planted-pub",
];

/// The process's SoftHSM2 setup: config file, token directory, initialised tokens.
fn softhsm() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        init_tokens(dir.path(), TOKENS, PIN, SO_PIN);
        dir
    })
    .path()
}

fn open(token: &str) -> Pkcs11KeyManager {
    softhsm();
    Pkcs11KeyManager::open(&module(), token, Zeroizing::new(PIN.to_string()))
        .unwrap_or_else(|e| panic!("open {token}: {e}"))
}

/// A raw cryptoki session on `token` (logged in), to look at the objects directly.
fn raw_session(token: &str) -> Session {
    softhsm();
    let ctx = Pkcs11::new(module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
        .expect("token present");
    let s = ctx.open_rw_session(slot).unwrap();
    match s.login(UserType::User, Some(&AuthPin::new(PIN.into()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    s
}

/// A session on `token` that never logs in: what anyone who can reach the token but
/// does not know the PIN gets (run in a process of its own: login state is shared by
/// every session of a process, whose `SOFTHSM2_CONF` must already name the tokens).
fn public_session(token: &str) -> Session {
    let ctx = Pkcs11::new(module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
        .expect("token present");
    ctx.open_rw_session(slot).unwrap()
}

/// DER prime256v1, as CKA_EC_PARAMS carries it.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A public (CKA_PRIVATE false) EC key pair with `label`, its private value readable.
fn plant_pair(s: &Session, label: &str) -> (ObjectHandle, ObjectHandle) {
    let l = label.as_bytes().to_vec();
    s.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256.to_vec()),
            Attribute::Label(l.clone()),
            Attribute::Id(l.clone()),
        ],
        &[
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Sign(true),
            Attribute::Label(l.clone()),
            Attribute::Id(l),
        ],
    )
    .unwrap()
}

fn objects(s: &Session, class: ObjectClass, label: &str) -> Vec<ObjectHandle> {
    s.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .unwrap()
}

fn verify_both_formats(km: &dyn KeyManager, key_id: &str, raw: &[u8], msg: &[u8]) {
    let der = km.sign(key_id, msg, SignatureFormat::Der).unwrap();
    assert_eq!(der[0], 0x30, "DER SEQUENCE");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, raw)
        .verify(msg, &der)
        .expect("DER signature verifies with ring");
    let fixed = km.sign(key_id, msg, SignatureFormat::Fixed).unwrap();
    assert_eq!(fixed.len(), 64);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, raw)
        .verify(msg, &fixed)
        .expect("fixed signature verifies with ring");
    // A different message does not verify: the token really signed this one.
    assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, raw)
        .verify(b"another message", &fixed)
        .is_err());
}

#[test]
fn generate_sign_verify_both_formats() {
    let km = open("ztid-sign");
    assert_eq!(km.backend_name(), "pkcs11");
    let public = km.generate("x509-ca-1", KeyAlgorithm::EcdsaP256).unwrap();
    assert_eq!(public.raw.len(), 65);
    assert_eq!(public.raw[0], 0x04);
    assert_eq!(
        ztid_hsm::p256_point_from_spki(&public.spki_der).unwrap(),
        &public.raw[..]
    );
    assert_eq!(km.public_key("x509-ca-1").unwrap(), public);

    // Many signatures, so high-bit and short r/s (the DER edge cases) both occur.
    for i in 0..200u32 {
        verify_both_formats(&km, "x509-ca-1", &public.raw, &i.to_be_bytes());
    }
    verify_both_formats(&km, "x509-ca-1", &public.raw, &[]);
    verify_both_formats(&km, "x509-ca-1", &public.raw, &vec![7u8; 100_000]);

    assert!(matches!(
        km.generate("x509-ca-1", KeyAlgorithm::EcdsaP256),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        km.sign("nope", b"m", SignatureFormat::Der),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        km.generate("../x", KeyAlgorithm::EcdsaP256),
        Err(Error::InvalidKeyId(_))
    ));

    // CKA_LABEL and CKA_ID carry the key id, on both halves.
    let s = raw_session("ztid-sign");
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
        let h = objects(&s, class, "x509-ca-1");
        assert_eq!(h.len(), 1, "{class:?}");
        let attrs = s.get_attributes(h[0], &[AttributeType::Id]).unwrap();
        assert!(matches!(&attrs[..], [Attribute::Id(id)] if id == b"x509-ca-1"));
    }
}

#[test]
fn list_and_destroy_remove_both_halves() {
    let km = open("ztid-list");
    assert!(km.list().unwrap().is_empty());
    let a = km.generate("jwt-a", KeyAlgorithm::EcdsaP256).unwrap();
    let b = km.generate("jwt-b", KeyAlgorithm::EcdsaP256).unwrap();
    assert_ne!(a, b);
    assert_eq!(km.list().unwrap(), vec!["jwt-a", "jwt-b"]);

    // Something in the token with a label that is not a key id is not ours to list.
    let s = raw_session("ztid-list");
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Label(b"not a key".to_vec()),
        Attribute::Value(b"x".to_vec()),
    ])
    .unwrap();
    assert_eq!(km.list().unwrap(), vec!["jwt-a", "jwt-b"]);

    km.destroy("jwt-a").unwrap();
    assert_eq!(km.list().unwrap(), vec!["jwt-b"]);
    assert!(objects(&s, ObjectClass::PRIVATE_KEY, "jwt-a").is_empty());
    assert!(objects(&s, ObjectClass::PUBLIC_KEY, "jwt-a").is_empty());
    assert!(matches!(km.public_key("jwt-a"), Err(Error::NotFound(_))));
    assert!(matches!(
        km.sign("jwt-a", b"m", SignatureFormat::Fixed),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(km.destroy("jwt-a"), Err(Error::NotFound(_))));
    // The other key is untouched and still signs.
    verify_both_formats(&km, "jwt-b", &b.raw, b"still here");
    // The id can be used again after a destroy, for a new key.
    let a2 = km.generate("jwt-a", KeyAlgorithm::EcdsaP256).unwrap();
    assert_ne!(a2, a);
    verify_both_formats(&km, "jwt-a", &a2.raw, b"new key");
}

#[test]
fn keys_persist_across_reopen_and_other_processes_see_them() {
    let public = {
        let km = open("ztid-persist");
        let p = km.generate("ca-persist", KeyAlgorithm::EcdsaP256).unwrap();
        verify_both_formats(&km, "ca-persist", &p.raw, b"before");
        p
    }; // every session closed: the manager's login is gone with it
    let km = open("ztid-persist");
    assert_eq!(km.list().unwrap(), vec!["ca-persist"]);
    assert_eq!(km.public_key("ca-persist").unwrap(), public);
    verify_both_formats(&km, "ca-persist", &public.raw, b"after reopen");

    // Another process (OpenSC's pkcs11-tool) reads the same key from the token
    // files: the public key it exports is the one the manager reports.
    let out_file = softhsm().join("ca-persist.pub.der");
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(module())
        .args(["--token-label", "ztid-persist", "--login", "--pin", PIN])
        .args(["--read-object", "--type", "pubkey", "--label", "ca-persist"])
        .arg("--output-file")
        .arg(&out_file)
        .output()
        .expect(
            "pkcs11-tool must be installed: run scripts/install-deps.sh (Debian package opensc)",
        );
    assert!(
        out.status.success(),
        "pkcs11-tool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&out_file).unwrap(), public.spki_der);
}

#[test]
fn private_key_is_not_extractable() {
    let km = open("ztid-attrs");
    km.generate("ca-locked", KeyAlgorithm::EcdsaP256).unwrap();
    let s = raw_session("ztid-attrs");
    let h = objects(&s, ObjectClass::PRIVATE_KEY, "ca-locked");
    assert_eq!(h.len(), 1);
    let h = h[0];
    let attrs = s
        .get_attributes(
            h,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Sign,
            ],
        )
        .unwrap();
    let want = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::AlwaysSensitive(true),
        Attribute::NeverExtractable(true),
        Attribute::Sign(true),
    ];
    assert_eq!(attrs, want);

    // The private value cannot be read: the token says it is sensitive, and a read
    // returns nothing.
    let info = s.get_attribute_info(h, &[AttributeType::Value]).unwrap();
    assert!(
        matches!(&info[..], [AttributeInfo::Sensitive]),
        "CKA_VALUE must be sensitive: {info:?}"
    );
    assert!(s
        .get_attributes(h, &[AttributeType::Value])
        .unwrap()
        .is_empty());
    // Nor can it be made extractable or non-sensitive after the fact.
    assert!(s
        .update_attributes(h, &[Attribute::Extractable(true)])
        .is_err());
    assert!(s
        .update_attributes(h, &[Attribute::Sensitive(false)])
        .is_err());
    // Nor can it leave the token wrapped under a key the caller holds.
    let wrapping = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::ValueLen(32.into()),
            ],
        )
        .unwrap();
    match s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, h) {
        Err(CkError::Pkcs11(RvError::KeyUnextractable, _)) => {}
        other => panic!("wrapping the private key must fail as unextractable: {other:?}"),
    }
}

#[test]
fn wrong_pin_and_missing_token_are_clear_errors() {
    softhsm();
    let e = Pkcs11KeyManager::open(
        &module(),
        "ztid-wrongpin",
        Zeroizing::new("98761".to_string()),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Login {
                reason: "the PIN is incorrect",
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("ztid-wrongpin") && msg.contains("PIN is incorrect"),
        "{msg}"
    );
    assert!(!msg.contains("98761"), "no PIN in the error: {msg}");
    // The right PIN works afterwards.
    let km = Pkcs11KeyManager::open(&module(), "ztid-wrongpin", Zeroizing::new(PIN.to_string()))
        .unwrap();
    assert!(km.list().unwrap().is_empty());

    let e = Pkcs11KeyManager::open(&module(), "no-such-token", Zeroizing::new(PIN.to_string()))
        .unwrap_err();
    assert!(matches!(e, Error::TokenNotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("no token labelled \"no-such-token\""), "{msg}");
    assert!(
        msg.contains("\"ztid-sign\""),
        "names the tokens present: {msg}"
    );

    let e = Pkcs11KeyManager::open(
        Path::new("/nonexistent/libpkcs11.so"),
        "ztid-sign",
        Zeroizing::new(PIN.to_string()),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Pkcs11Module { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
}

#[test]
fn concurrent_signing_from_many_threads() {
    let km = std::sync::Arc::new(open("ztid-threads"));
    let k1 = km.generate("k1", KeyAlgorithm::EcdsaP256).unwrap();
    let k2 = km.generate("k2", KeyAlgorithm::EcdsaP256).unwrap();
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let km = km.clone();
            let (k1, k2) = (k1.raw.clone(), k2.raw.clone());
            std::thread::spawn(move || {
                for i in 0..40u32 {
                    let msg = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    let (id, raw) = if i % 2 == 0 { ("k1", &k1) } else { ("k2", &k2) };
                    verify_both_formats(&*km, id, raw, &msg);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("signing thread");
    }
}

/// The planter: another process on this machine that reaches the token but lacks the
/// PIN. Run by `a_key_pair_planted_without_the_pin_is_not_a_ztid_key` as a child.
#[test]
#[ignore = "run as a child process by a_key_pair_planted_without_the_pin_is_not_a_ztid_key"]
fn plant_a_key_pair_without_the_pin() {
    let Ok(conf) = std::env::var("ZTID_TEST_PLANT_CONF") else {
        return;
    };
    std::env::set_var("SOFTHSM2_CONF", conf);
    let s = public_session("ztid-planted");
    let (_, private) = plant_pair(&s, "audit-planted");
    // The planter knows the private key: the object is public and extractable.
    let value = s.get_attributes(private, &[AttributeType::Value]).unwrap();
    assert!(matches!(&value[..], [Attribute::Value(v)] if v.len() == 32));
}

#[test]
fn a_key_pair_planted_without_the_pin_is_not_a_ztid_key() {
    let dir = softhsm();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "plant_a_key_pair_without_the_pin", "--ignored"])
        .env("ZTID_TEST_PLANT_CONF", dir.join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the planter: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let km = open("ztid-planted");
    assert!(
        matches!(km.public_key("audit-planted"), Err(Error::NotFound(_))),
        "a key anyone could have made must not be taken for one of ours"
    );
    assert!(matches!(
        km.sign("audit-planted", b"audit head", SignatureFormat::Der),
        Err(Error::NotFound(_))
    ));
    assert!(!km.list().unwrap().contains(&"audit-planted".to_string()));
    // Its label stays taken: no genuine key is made beside it under the same id.
    let public = km.generate("audit-planted", KeyAlgorithm::EcdsaP256);
    assert!(
        matches!(public, Err(Error::AlreadyExists(_))),
        "generate keeps refusing a taken label: {public:?}"
    );
}

#[test]
fn public_keys_planted_beside_a_genuine_key_are_not_reported() {
    let km = open("ztid-planted-pub");
    let genuine = km
        .generate("x509-ca-planted", KeyAlgorithm::EcdsaP256)
        .unwrap();
    // Public objects need no PIN: plant several public keys under the same label.
    let s = raw_session("ztid-planted-pub");
    let rng = ring::rand::SystemRandom::new();
    for _ in 0..8 {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let k =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng).unwrap();
        let mut point = vec![0x04, 0x41];
        point.extend_from_slice(k.public_key().as_ref());
        s.create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(cryptoki::object::KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(P256.to_vec()),
            Attribute::EcPoint(point),
            Attribute::Label(b"x509-ca-planted".to_vec()),
            Attribute::Id(b"x509-ca-planted".to_vec()),
        ])
        .unwrap();
    }
    // A restarted server looks the key up again.
    for _ in 0..4 {
        let km = open("ztid-planted-pub");
        assert_eq!(
            km.public_key("x509-ca-planted").unwrap(),
            genuine,
            "the public key reported must be the private key's own"
        );
        verify_both_formats(&km, "x509-ca-planted", &genuine.raw, b"tbs");
    }
}
