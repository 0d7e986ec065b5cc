//! TPM attestation at the library level against real swtpm instances: the agent half
//! (`TpmAttestor`, tss-esapi) talking to the CA half (`TpmVerifier`, pure software), the
//! negative cases each asserting its refusal reason, and cross-checks with tpm2-tools.
#![forbid(unsafe_code)]

use ztid_test_support::tpm_attest as attest;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use attest::*;
use ztid_attestor::tpm::{EkKind, EkTemplate, TpmAttestor};
use ztid_attestor::tpm_device::Tpm;
use ztid_attestor::NodeAttestor;
use ztid_verifier::tpm::{
    self, credential, quote, wire, Answer, Challenge, InitialEvidence, TpmVerifier,
};
use ztid_verifier::NodeVerifier;
use ztid_verifier::RefusalKind::{
    self, BadSignature, Expired, KeyMismatch, Malformed, PolicyMismatch, Replay, UntrustedChain,
};

#[test]
fn tpm_enrolment_round_trip_and_identity() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let t = std::time::Instant::now();
    let (node, ev, _, _, _) = attest(&v, &mut a);
    eprintln!("enrolment (agent+CA, swtpm): {:?}", t.elapsed());

    // node id = SHA-256 of the EK certificate's SubjectPublicKeyInfo, as openssl sees it.
    let ev: InitialEvidence = serde_json::from_slice(&ev).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&ev.ek_cert).unwrap();
    assert_eq!(node.node_id, sha256_hex(cert.public_key().raw));
    assert_eq!(node.node_id.len(), 64);
    assert_eq!(node.method, "tpm");
    let sels: Vec<String> = node.selectors.iter().map(|s| s.to_string()).collect();
    assert!(
        sels.contains(&format!("tpm:ek-hash:{}", node.node_id)),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"tpm:manufacturer:id:00001014".to_string()),
        "{sels:?}"
    );
    assert!(
        sels.contains(&"tpm:ek-issuer:CN=swtpm-localca".to_string()),
        "{sels:?}"
    );
    let zero = "0".repeat(64);
    for i in 0..8 {
        assert!(sels.contains(&format!("tpm:pcr:{i}:{zero}")), "{sels:?}");
    }
    // Nothing left loaded in the TPM (no resource manager on swtpm's TCTI).
    assert_eq!(
        f.tpm.leftovers(),
        "",
        "transient objects or sessions leaked"
    );
}

#[test]
fn tpm_ek_cert_from_another_local_ca_is_refused() {
    let f = fixture();
    let (other, other_ca) = f.second_tpm(false);
    // Trusting the first CA only: the second TPM's EK certificate has an issuer of the same
    // name (CN=swtpm-localca) but another key.
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&other.tcti());
    let (ev, k) = evidence(&mut a);
    let reason = refusal(UntrustedChain, v.start(&ev, &ctx(&k)));
    assert_eq!(
        reason,
        "EK certificate signature does not verify with the key of CA CN=swtpm-localca"
    );
    // Trusting the other CA, the same TPM passes.
    let v2 = TpmVerifier::new(policy(&other_ca, ""));
    attest(&v2, &mut TpmAttestor::with_tcti(&other.tcti()));
    // A CA directory with an unrelated issuer name: no issuer at all.
    let unrelated = f.dir.path().join("unrelated");
    std::fs::create_dir_all(&unrelated).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Some Other TPM Vendor CA");
    std::fs::write(
        unrelated.join("ca.pem"),
        params.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let table: toml::Table = toml::from_str(&format!(
        "ek_ca_dir = {:?}",
        unrelated.display().to_string()
    ))
    .unwrap();
    let v3 = TpmVerifier::from_config(&table).unwrap();
    assert_eq!(
        refusal(UntrustedChain, v3.start(&ev, &ctx(&k))),
        "EK certificate is not issued by any CA in ek_ca_dir (its issuer is CN=swtpm-localca)"
    );
}

#[test]
fn tpm_ak_from_a_second_tpm_is_refused() {
    ak_from_a_second_tpm_is_refused(EkKind::Rsa, EkTemplate::Rsa2048, 256);
}

/// TPM A's genuine EK of `kind` presented with an AK that lives in TPM B.
fn ak_from_a_second_tpm_is_refused(kind: EkKind, template: EkTemplate, secret_len: usize) {
    let f = fixture();
    let (tpm_b, _) = f.second_tpm(true);
    let v = TpmVerifier::new(policy(&f.ca, ""));

    let mut a = Tpm::open_with_ek(&f.tpm.tcti(), kind).unwrap();
    let ek_cert = a.ek_cert().unwrap();
    let ek_pub = a.ek_public().unwrap();
    let agent_key = a.create_agent_key().unwrap();
    let k = agent_key.public_key("agent key").unwrap().spki_der;
    drop(a);
    let mut b = Tpm::open_with_ek(&tpm_b.tcti(), kind).unwrap();
    let ak_b = b.create_ak().unwrap();
    assert_eq!(ak_b.ek(), template);
    let ev = serde_json::to_vec(&InitialEvidence {
        ek_cert,
        ek_pub,
        ak_pub: ak_b.public_bytes().unwrap(),
        agent_key_pub: agent_key.public_area().unwrap(),
    })
    .unwrap();
    let (c, session) = challenge(v.start(&ev, &ctx(&k)).expect("static checks pass"));
    let c: Challenge = serde_json::from_slice(&c).unwrap();
    // RSA: an OAEP block; ECC: an ephemeral point (TPMS_ECC_POINT).
    assert_eq!(c.encrypted_secret.len(), secret_len);
    // TPM B cannot open a credential sealed to TPM A's EK ...
    let err = b
        .activate_credential(&ak_b, &c.credential_blob, &c.encrypted_secret)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ActivateCredential"), "{err}");
    drop(b);
    // ... and TPM A cannot even load TPM B's AK.
    let mut a = Tpm::open_with_ek(&f.tpm.tcti(), kind).unwrap();
    let err = a
        .activate_credential(&ak_b, &c.credential_blob, &c.encrypted_secret)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loading the AK"), "{err}");
    drop(a);
    // So the best the attacker can send is a guess with a good quote from TPM B.
    let mut b = Tpm::open(&tpm_b.tcti()).unwrap();
    let pcrs: BTreeSet<u8> = c.pcrs.iter().copied().collect();
    let (quote, signature, values) = b.quote(&ak_b, &c.nonce, &pcrs).unwrap();
    drop(b);
    let ans = serde_json::to_vec(&Answer {
        secret: vec![0u8; 32],
        quote,
        signature,
        pcrs: values,
        certify: Vec::new(),
        certify_signature: Vec::new(),
    })
    .unwrap();
    assert!(refusal(Replay, session.resume(&ans, &ctx(&k))).starts_with(
        "credential activation failed: the secret returned is not the one sealed to the EK for this AK"
    ));
    assert_eq!(f.tpm.leftovers(), "");
    assert_eq!(tpm_b.leftovers(), "");
}

#[test]
fn tpm_replayed_activation_and_quote_are_refused() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let (_, ev, _, old_answer, k) = attest(&v, &mut a);

    // A whole earlier answer replayed into a new attempt: the secret is new.
    let (_, s2) = challenge(v.start(&ev, &ctx(&k)).unwrap());
    assert!(refusal(Replay, s2.resume(&old_answer, &ctx(&k))).starts_with(
        "credential activation failed: the secret returned is not the one sealed to the EK for this AK"
    ));

    // A fresh activation with an earlier quote: the nonce is new.
    let (c3, s3) = challenge(v.start(&ev, &ctx(&k)).unwrap());
    let fresh: Answer = serde_json::from_slice(&a.answer(&c3, &k).unwrap()).unwrap();
    let old: Answer = serde_json::from_slice(&old_answer).unwrap();
    let spliced = Answer {
        secret: fresh.secret,
        ..old
    };
    assert_eq!(
        refusal(
            Replay,
            s3.resume(&serde_json::to_vec(&spliced).unwrap(), &ctx(&k))
        ),
        "quote extraData does not match this attempt's nonce (stale or replayed quote)"
    );

    // A challenge answered after 60 s has expired.
    let t0 = SystemTime::now();
    let (c4, s4) = challenge(v.start(&ev, &ctx_at(&k, t0)).unwrap());
    let ans4 = a.answer(&c4, &k).unwrap();
    assert_eq!(
        refusal(
            Replay,
            s4.resume(&ans4, &ctx_at(&k, t0 + Duration::from_secs(61)))
        ),
        "TPM challenge expired (answered after 61 s, limit 60 s)"
    );
    // (A session cannot be resumed twice: `resume` consumes it.)
    assert_eq!(f.tpm.leftovers(), "");
}

#[test]
fn tpm_tampered_quote_and_pcr_values_are_refused() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let (ev, k) = evidence(&mut a);
    // Each tamper gets an attempt of its own (a session answers once).
    type Tamper = Box<dyn Fn(&mut Answer)>;
    let cases: Vec<(RefusalKind, &str, Tamper)> = vec![
        (
            BadSignature,
            "quote signature check failed: signature does not verify",
            Box::new(|ans: &mut Answer| {
                // A byte inside clockInfo of the signed TPMS_ATTEST.
                let i = ans.quote.len() - 40;
                ans.quote[i] ^= 0x01;
            }),
        ),
        (
            BadSignature,
            "quote signature check failed: signature does not verify",
            Box::new(|ans: &mut Answer| ans.quote.push(0)),
        ),
        (
            BadSignature,
            "quote signature check failed: signature does not verify",
            Box::new(|ans: &mut Answer| {
                let n = ans.signature.len();
                ans.signature[n - 1] ^= 0x80;
            }),
        ),
        (
            BadSignature,
            "PCR values sent do not match the quote's PCR digest",
            Box::new(|ans: &mut Answer| {
                ans.pcrs.insert(7, vec![0x11; 32]);
            }),
        ),
        (
            Malformed,
            "PCR values sent are for PCRs 0,1,2,3,4,5,6, not the quoted 0,1,2,3,4,5,6,7",
            Box::new(|ans: &mut Answer| {
                ans.pcrs.remove(&7);
            }),
        ),
    ];
    for (kind, want, tamper) in cases {
        let (c, session) = challenge(v.start(&ev, &ctx(&k)).unwrap());
        let mut ans: Answer = serde_json::from_slice(&a.answer(&c, &k).unwrap()).unwrap();
        tamper(&mut ans);
        assert_eq!(
            refusal(
                kind,
                session.resume(&serde_json::to_vec(&ans).unwrap(), &ctx(&k))
            ),
            want
        );
    }
}

/// A `TPMT_PUBLIC` given a 32-byte authPolicy (a TPM2B at byte 8, empty in ours).
fn with_auth_policy(tpmt: &[u8]) -> Vec<u8> {
    assert_eq!(&tpmt[8..10], &[0, 0], "no authPolicy yet");
    let mut t = tpmt[..8].to_vec();
    t.extend_from_slice(&[0, 32]);
    t.extend_from_slice(&[0x5a; 32]);
    t.extend_from_slice(&tpmt[10..]);
    t
}

/// A `TPMT_PUBLIC` with its objectAttributes (bytes 4..8) changed by `f`.
fn edit_attributes(tpmt: &[u8], f: &dyn Fn(u32) -> u32) -> Vec<u8> {
    let mut t = tpmt.to_vec();
    let cur = u32::from_be_bytes(t[4..8].try_into().unwrap());
    t[4..8].copy_from_slice(&f(cur).to_be_bytes());
    t
}

#[test]
fn tpm_ak_attributes_are_checked_and_bound_by_name() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let (ev_raw, k) = evidence(&mut a);
    let ev: InitialEvidence = serde_json::from_slice(&ev_raw).unwrap();
    let with_attrs = |f: &dyn Fn(u32) -> u32| {
        let mut e = ev.clone();
        e.ak_pub = edit_attributes(&e.ak_pub, f);
        serde_json::to_vec(&e).unwrap()
    };
    for (bit, name) in [
        (wire::attr::FIXED_TPM, "fixedTPM"),
        (wire::attr::FIXED_PARENT, "fixedParent"),
        (wire::attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
        (wire::attr::RESTRICTED, "restricted"),
        (wire::attr::SIGN_ENCRYPT, "sign"),
    ] {
        assert_eq!(
            refusal(
                PolicyMismatch,
                v.start(&with_attrs(&|a| a & !bit), &ctx(&k))
            ),
            format!("AK is not {name}")
        );
    }
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.start(&with_attrs(&|a| a | wire::attr::DECRYPT), &ctx(&k))
        ),
        "AK is a decryption key (decrypt is set)"
    );
    let mut e = ev.clone();
    e.ak_pub = with_auth_policy(&e.ak_pub);
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.start(&serde_json::to_vec(&e).unwrap(), &ctx(&k))
        ),
        "AK has an authPolicy (a public-only copy of an outside key could then be activated)"
    );
    // The EK itself offered as AK: a decryption key, not a signing one.
    let mut e = ev.clone();
    e.ak_pub = e.ek_pub.clone();
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.start(&serde_json::to_vec(&e).unwrap(), &ctx(&k))
        ),
        "AK is not sign"
    );
    // An AK public that claims one more attribute (noDA) passes the static checks, but the
    // credential is then bound to a name no object in the TPM has: activation fails.
    let (c, _) = challenge(v.start(&with_attrs(&|a| a | (1 << 10)), &ctx(&k)).unwrap());
    let err = a.answer(&c, &k).unwrap_err().to_string();
    assert!(err.contains("ActivateCredential"), "{err}");
    assert_eq!(f.tpm.leftovers(), "");
}

#[test]
fn tpm_allow_list_and_pcr_policy() {
    let f = fixture();
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let (ev_raw, k) = evidence(&mut a);
    let ev: InitialEvidence = serde_json::from_slice(&ev_raw).unwrap();
    let hash = tpm::ek_hash(&ev.ek_pub).unwrap();
    let other = "ab".repeat(32);

    let v = TpmVerifier::new(policy(&f.ca, &format!("allowed_ek_hashes = [\"{other}\"]")));
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.start(&serde_json::to_vec(&ev).unwrap(), &ctx(&k))
        ),
        format!("EK {hash} is not in allowed_ek_hashes")
    );
    let v = TpmVerifier::new(policy(
        &f.ca,
        &format!("allowed_ek_hashes = [\"{other}\", \"{hash}\"]"),
    ));
    attest(&v, &mut a);

    // PCR policy by EK hash and by alias ("*" = every node), enforced on each attestation.
    let zero = "0".repeat(64);
    let v = TpmVerifier::new(policy(
        &f.ca,
        &format!(
            "pcrs = [0, 7, 16]\n\
             [pcr_policy.{hash}]\npcrs = {{ 7 = \"{zero}\" }}\n\
             [pcr_policy.fleet]\nek_hashes = [\"*\"]\npcrs = {{ 0 = [\"{other}\", \"{zero}\"] }}\n"
        ),
    ));
    let (node, ..) = attest(&v, &mut a);
    assert!(node
        .selectors
        .iter()
        .any(|s| s.to_string() == format!("tpm:pcr:16:{zero}")));
    assert!(!node
        .selectors
        .iter()
        .any(|s| s.to_string().starts_with("tpm:pcr:1:")));

    let ext = "01".repeat(32);
    f.tpm.pcr_extend(7, &ext);
    // sha256(zero || ext)
    let mut both = vec![0u8; 32];
    both.extend(hex::decode(&ext).unwrap());
    let new7 = sha256_hex(&both);
    let (ev_bytes, k) = evidence(&mut a);
    let (c, session) = challenge(v.start(&ev_bytes, &ctx(&k)).unwrap());
    let ans = a.answer(&c, &k).unwrap();
    assert_eq!(
        refusal(PolicyMismatch, session.resume(&ans, &ctx(&k))),
        format!("PCR policy not met: PCR 7 is {new7} but policy {hash} allows {zero}")
    );

    // Config errors are precise too.
    let bad: toml::Table = toml::from_str(&format!(
        "ek_ca_dir = {:?}\npcrs = [0]\n[pcr_policy.{hash}]\npcrs = {{ 7 = \"{zero}\" }}",
        f.ca.trust_dir().display().to_string()
    ))
    .unwrap();
    let err = TpmVerifier::from_config(&bad).err().unwrap().to_string();
    assert!(
        err.contains("names PCR 7, which is not in [attestors.tpm] pcrs"),
        "{err}"
    );
    let err = TpmVerifier::from_config(&toml::Table::new())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs ek_ca_dir"), "{err}");
}

// ----- cross-checks with tpm2-tools ------------------------------------------------------

/// `TPM2B_PUBLIC` (tpm2-tools' default format) → `TPMT_PUBLIC`.
fn tpmt(tpm2b: &[u8]) -> Vec<u8> {
    let n = u16::from_be_bytes([tpm2b[0], tpm2b[1]]) as usize;
    assert_eq!(n + 2, tpm2b.len());
    tpm2b[2..].to_vec()
}

fn pem_spki(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("PUBLIC KEY", der.to_vec()))
}

#[test]
fn tpm_ztid_quote_verifies_with_tpm2_checkquote() {
    let f = fixture();
    let work = f.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    f.tpm.pcr_extend(0, &"aa".repeat(32));
    f.tpm.pcr_extend(6, &"bb".repeat(32));
    let nonce = hex::decode("0123456789abcdef0123456789abcdef").unwrap();
    let pcrs: BTreeSet<u8> = (0..7).collect(); // tpm2-tools 5.4 fails above 7 PCRs
    let ev: tpm::EvidenceFile = serde_json::from_slice(
        &ztid_attestor::tpm::capture_evidence_with(&f.tpm.tcti(), &nonce, &pcrs).unwrap(),
    )
    .unwrap();
    let ak = wire::Public::parse(&ev.ak_pub).unwrap();
    std::fs::write(work.join("ak.pem"), pem_spki(&ak.spki_der().unwrap())).unwrap();
    std::fs::write(work.join("quote.msg"), &ev.quote).unwrap();
    std::fs::write(work.join("quote.sig"), &ev.signature).unwrap();
    f.tpm.tpm2_ok(
        &work,
        "tpm2_pcrread",
        &["sha256:0,1,2,3,4,5,6", "-o", "pcrs.bin"],
    );
    let check = |nonce_hex: &str| {
        f.tpm.tpm2(
            &work,
            "tpm2_checkquote",
            &[
                "-u",
                "ak.pem",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-f",
                "pcrs.bin",
                "-l",
                "sha256:0,1,2,3,4,5,6",
                "-g",
                "sha256",
                "-q",
                nonce_hex,
            ],
        )
    };
    let ok = check(&ev.nonce);
    assert!(
        ok.status.success(),
        "tpm2_checkquote: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        !check("00").status.success(),
        "tpm2_checkquote accepted a wrong nonce"
    );
}

#[test]
fn tpm_tpm2_quote_verifies_with_ztid() {
    let f = fixture();
    let work = f.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    f.tpm.pcr_extend(3, &"cc".repeat(32));
    let t = |tool: &str, args: &[&str]| f.tpm.tpm2_ok(&work, tool, args);
    t(
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    // tpm2-tools leaves its objects loaded (no resource manager): clear them after each.
    t("tpm2_flushcontext", &["-t"]);
    t("tpm2_nvread", &["0x01c00002", "-o", "ek.der"]);
    let pol = policy(&f.ca, "");
    let nonce = "feedface00112233445566778899aabb";
    for (alg, scheme) in [("ecc", "ecdsa"), ("rsa", "rsassa")] {
        let akpub = format!("ak-{alg}.pub");
        let akctx = format!("ak-{alg}.ctx");
        t(
            "tpm2_createak",
            &[
                "-C", "ek.ctx", "-c", &akctx, "-G", alg, "-g", "sha256", "-s", scheme, "-u",
                &akpub, "-n", "ak.name",
            ],
        );
        t("tpm2_flushcontext", &["-t"]);
        t(
            "tpm2_quote",
            &[
                "-c",
                &akctx,
                "-l",
                "sha256:0,1,2,3,4,5,6,7",
                "-q",
                nonce,
                "-m",
                "q.msg",
                "-s",
                "q.sig",
                "-g",
                "sha256",
            ],
        );
        t("tpm2_flushcontext", &["-t"]);
        let read = |n: &str| std::fs::read(work.join(n)).unwrap();
        let ek_pub = tpmt(&read("ek.pub"));
        let ak_pub = tpmt(&read(&akpub));
        // The CA's static checks accept tpm2-tools' AK, and agree on its name.
        let keys = tpm::check_keys(&pol, &read("ek.der"), &ek_pub, &ak_pub, SystemTime::now())
            .expect("tpm2_createak's AK passes");
        assert_eq!(keys.ak_name, read("ak.name"));
        let pcrs: BTreeSet<u8> = (0..8).collect();
        let values = Tpm::open(&f.tpm.tcti()).unwrap().read_pcrs(&pcrs).unwrap();
        let q = quote::verify_quote(
            &keys.ak,
            &read("q.msg"),
            &read("q.sig"),
            &hex::decode(nonce).unwrap(),
            &pcrs,
            &values,
        )
        .unwrap_or_else(|e| panic!("{alg} quote from tpm2_quote: {e}"));
        assert_eq!(q.pcrs[&3], {
            let mut b = vec![0u8; 32];
            b.extend(hex::decode("cc".repeat(32)).unwrap());
            ring::digest::digest(&ring::digest::SHA256, &b)
                .as_ref()
                .to_vec()
        });
        // And the wrong nonce is refused.
        assert_eq!(
            refusal(
                Replay,
                quote::verify_quote(
                    &keys.ak,
                    &read("q.msg"),
                    &read("q.sig"),
                    &[0u8; 16],
                    &pcrs,
                    &values
                )
            ),
            "quote extraData does not match this attempt's nonce (stale or replayed quote)"
        );
    }
}

/// tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
fn tools_cred_file(c: &credential::Credential) -> Vec<u8> {
    let mut out = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
    for part in [&c.blob, &c.encrypted_secret] {
        out.extend((part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn parse_tools_cred_file(b: &[u8]) -> credential::Credential {
    assert_eq!(&b[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let n1 = u16::from_be_bytes([b[8], b[9]]) as usize;
    let blob = b[10..10 + n1].to_vec();
    let rest = &b[10 + n1..];
    let n2 = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    assert_eq!(rest.len(), n2 + 2);
    credential::Credential {
        blob,
        encrypted_secret: rest[2..].to_vec(),
    }
}

#[test]
fn tpm_make_credential_interoperates_with_tpm2_tools() {
    let f = fixture();
    let work = f.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let t = |tool: &str, args: &[&str]| f.tpm.tpm2_ok(&work, tool, args);
    let read = |n: &str| std::fs::read(work.join(n)).unwrap();

    // 1. ztid's software MakeCredential → tpm2_activatecredential.
    t(
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    t(
        "tpm2_createak",
        &[
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u",
            "ak.pub", "-n", "ak.name",
        ],
    );
    let ek = wire::Public::parse(&tpmt(&read("ek.pub"))).unwrap();
    let ak = wire::Public::parse(&tpmt(&read("ak.pub"))).unwrap();
    assert_eq!(ak.name().unwrap(), read("ak.name"));
    let secret: Vec<u8> = (1..=32).collect();
    let cred = credential::make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
    std::fs::write(work.join("ztid.cred"), tools_cred_file(&cred)).unwrap();
    t("tpm2_flushcontext", &["-t"]);
    t(
        "tpm2_startauthsession",
        &["--policy-session", "-S", "session.ctx"],
    );
    t("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"]);
    t(
        "tpm2_activatecredential",
        &[
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            "ztid.cred",
            "-o",
            "out.bin",
            "-P",
            "session:session.ctx",
        ],
    );
    t("tpm2_flushcontext", &["session.ctx"]);
    t("tpm2_flushcontext", &["-t"]);
    assert_eq!(
        read("out.bin"),
        secret,
        "tpm2_activatecredential recovered another secret"
    );

    // 2. tpm2_makecredential (software, -T none) → ztid's ActivateCredential.
    let mut tpm = Tpm::open(&f.tpm.tcti()).unwrap();
    let our_ak = tpm.create_ak().unwrap();
    drop(tpm);
    let our_name = wire::Public::parse(&our_ak.public_bytes().unwrap())
        .unwrap()
        .name()
        .unwrap();
    std::fs::write(
        work.join("secret2.bin"),
        b"a secret from tpm2_makecredential",
    )
    .unwrap();
    let o = std::process::Command::new("tpm2_makecredential")
        .current_dir(&work)
        .args([
            "-T",
            "none",
            "-e",
            "ek.pub",
            "-s",
            "secret2.bin",
            "-n",
            &hex::encode(&our_name),
            "-o",
            "tools.cred",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = parse_tools_cred_file(&read("tools.cred"));
    let mut tpm = Tpm::open(&f.tpm.tcti()).unwrap();
    let got = tpm
        .activate_credential(&our_ak, &c.blob, &c.encrypted_secret)
        .unwrap();
    drop(tpm);
    assert_eq!(got, b"a secret from tpm2_makecredential");

    // 3. ztid's credential through ztid's own activation, bound to another name: refused
    //    by the TPM (integrity check of the outer HMAC).
    let wrong = credential::make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
    let mut tpm = Tpm::open(&f.tpm.tcti()).unwrap();
    assert!(tpm
        .activate_credential(&our_ak, &wrong.blob, &wrong.encrypted_secret)
        .is_err());
    drop(tpm);
    assert_eq!(f.tpm.leftovers(), "");
}

#[test]
fn tpm_offline_evidence_round_trip() {
    let f = fixture();
    let nonce = b"offline-nonce-0123456789abcdef01";
    let file = ztid_attestor::tpm::capture_evidence(&f.tpm.tcti(), nonce).unwrap();
    let empty = toml::Table::new();
    let trust = f.ca.trust_dir();
    let claims = tpm::verify_offline(&file, Some(&trust), Some(nonce), SystemTime::now(), &empty)
        .expect("offline verification");
    let ev: tpm::EvidenceFile = serde_json::from_slice(&file).unwrap();
    assert_eq!(claims["node_id"], tpm::ek_hash(&ev.ek_pub).unwrap());
    assert_eq!(claims["nonce_checked"], true);
    assert_eq!(claims["manufacturer"], "id:00001014");
    assert!(claims["ak_residency"]
        .as_str()
        .unwrap()
        .starts_with("not proven offline"));
    // Without --report-data the nonce is reported but not checked.
    let claims = tpm::verify_offline(&file, Some(&trust), None, SystemTime::now(), &empty).unwrap();
    assert_eq!(claims["nonce_checked"], false);
    // Evidence without an EK certificate: nothing offline can vouch for that EK.
    let mut bare: tpm::EvidenceFile = serde_json::from_slice(&file).unwrap();
    bare.ek_cert.clear();
    let svsm: toml::Table = toml::from_str("uncertified_ek = \"svsm-bound\"").unwrap();
    assert!(refusal(
        PolicyMismatch,
        tpm::verify_offline(
            &serde_json::to_vec(&bare).unwrap(),
            Some(&trust),
            None,
            SystemTime::now(),
            &svsm
        )
    )
    .starts_with("the evidence has no EK certificate"));
    // Wrong expected nonce, tampered quote, expired EK certificate time, other CA.
    assert_eq!(
        refusal(
            Replay,
            tpm::verify_offline(
                &file,
                Some(&trust),
                Some(b"other"),
                SystemTime::now(),
                &empty
            )
        ),
        "evidence nonce differs from the expected --report-data"
    );
    let mut t: tpm::EvidenceFile = serde_json::from_slice(&file).unwrap();
    let i = t.quote.len() - 1;
    t.quote[i] ^= 1;
    assert_eq!(
        refusal(
            BadSignature,
            tpm::verify_offline(
                &serde_json::to_vec(&t).unwrap(),
                Some(&trust),
                None,
                SystemTime::now(),
                &empty
            )
        ),
        "quote signature check failed: signature does not verify"
    );
    let before_ca = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    assert!(refusal(
        Expired,
        tpm::verify_offline(&file, Some(&trust), None, before_ca, &empty)
    )
    .starts_with("EK certificate is not valid yet"));
}

/// Sets the last 64 bytes of an ECC `TPMT_PUBLIC` (x and y, 32 bytes each after their
/// sizes) to `point` (uncompressed SEC1, 65 bytes).
fn with_point(tpmt: &[u8], point: &[u8]) -> Vec<u8> {
    let mut t = tpmt.to_vec();
    let n = t.len();
    assert_eq!(&t[n - 68..n - 66], &[0, 32], "x is 32 bytes");
    t[n - 66..n - 34].copy_from_slice(&point[1..33]);
    t[n - 32..].copy_from_slice(&point[33..65]);
    t
}

#[test]
fn tpm_agent_svid_only_for_a_key_the_ak_certified() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let (ev, tpm_key) = evidence(&mut a);

    // 1. A CSR for a software key, with evidence about the TPM key: refused at once.
    let soft = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let soft_spki = rcgen::PublicKeyData::subject_public_key_info(&soft);
    assert_eq!(
        refusal(KeyMismatch, v.start(&ev, &ctx(&soft_spki))),
        "the agent CSR's key is not the TPM agent key in the evidence \
         (an agent SVID is only issued for a key made in the attested TPM)"
    );

    // 2. The software key dressed up as a TPM key (its point in the TPM key's public
    //    area, attributes and all): the static checks pass, but the AK can only certify
    //    what is loaded in its TPM, so the certified name is another key's.
    let parsed: InitialEvidence = serde_json::from_slice(&ev).unwrap();
    let mut forged = parsed.clone();
    forged.agent_key_pub = with_point(
        &parsed.agent_key_pub,
        rcgen::PublicKeyData::der_bytes(&soft),
    );
    let (c, session) = challenge(
        v.start(&serde_json::to_vec(&forged).unwrap(), &ctx(&soft_spki))
            .expect("static checks pass"),
    );
    let ans = a.answer(&c, &soft_spki).unwrap();
    assert!(refusal(KeyMismatch, session.resume(&ans, &ctx(&soft_spki)))
        .starts_with("the AK certified another key (name "));

    // 3. A key that could leave the TPM (fixedTPM or fixedParent clear), a decryption key.
    let attrs = |f: &dyn Fn(u32) -> u32| {
        let mut e = parsed.clone();
        e.agent_key_pub = edit_attributes(&e.agent_key_pub, f);
        serde_json::to_vec(&e).unwrap()
    };
    for (bit, name) in [
        (wire::attr::FIXED_TPM, "fixedTPM"),
        (wire::attr::FIXED_PARENT, "fixedParent"),
        (wire::attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    ] {
        assert_eq!(
            refusal(
                PolicyMismatch,
                v.start(&attrs(&|a| a & !bit), &ctx(&tpm_key))
            ),
            format!("agent key is not {name}: it could exist outside the TPM")
        );
    }
    assert_eq!(
        refusal(
            PolicyMismatch,
            v.start(&attrs(&|a| a | wire::attr::DECRYPT), &ctx(&tpm_key))
        ),
        "agent key is a decryption key (decrypt is set)"
    );
    let mut e = parsed.clone();
    e.agent_key_pub = with_auth_policy(&e.agent_key_pub);
    assert_eq!(
        refusal(PolicyMismatch, v.start(&serde_json::to_vec(&e).unwrap(), &ctx(&tpm_key))),
        "agent key has an authPolicy (a public-only copy of an outside key could then be certified)"
    );

    // 4. Answers whose certification is tampered with, missing, from another attempt,
    //    made by another AK of the same TPM, or a quote in its place.
    let (c0, s0) = challenge(v.start(&ev, &ctx(&tpm_key)).unwrap());
    let good: Answer = serde_json::from_slice(&a.answer(&c0, &tpm_key).unwrap()).unwrap();
    attested(s0.resume(&serde_json::to_vec(&good).unwrap(), &ctx(&tpm_key)));
    let other_ak = Tpm::open(&f.tpm.tcti()).unwrap().create_ak().unwrap();
    let old_certify = (good.certify.clone(), good.certify_signature.clone());
    type Tamper = Box<dyn Fn(&mut Answer, &Challenge)>;
    let key_blob = a_key_blob(&mut a);
    let tcti = f.tpm.tcti();
    let cases: Vec<(RefusalKind, &str, Tamper)> = vec![
        (
            BadSignature,
            "agent key certification signature check failed (not certified by the attested AK): signature does not verify",
            Box::new(|ans, _| {
                let i = ans.certify.len() - 40;
                ans.certify[i] ^= 0x01;
            }),
        ),
        (
            Malformed,
            "agent key certification signature check failed (not certified by the attested AK): ",
            Box::new(|ans, _| {
                ans.certify.clear();
                ans.certify_signature.clear();
            }),
        ),
        (
            Replay,
            "agent key certification extraData does not match this attempt's nonce (stale or replayed)",
            Box::new(move |ans, _| {
                ans.certify = old_certify.0.clone();
                ans.certify_signature = old_certify.1.clone();
            }),
        ),
        (
            BadSignature,
            "agent key certification signature check failed (not certified by the attested AK): signature does not verify",
            Box::new(move |ans, c| {
                let (att, sig) = Tpm::open(&tcti)
                    .unwrap()
                    .certify_with(&other_ak, &key_blob, &c.nonce)
                    .unwrap();
                ans.certify = att;
                ans.certify_signature = sig;
            }),
        ),
        (
            Malformed,
            "agent key certification is not a TPM2_Certify (type is not TPM_ST_ATTEST_CERTIFY)",
            Box::new(|ans, _| {
                ans.certify = ans.quote.clone();
                ans.certify_signature = ans.signature.clone();
            }),
        ),
    ];
    for (kind, want, tamper) in cases {
        let (c, session) = challenge(v.start(&ev, &ctx(&tpm_key)).unwrap());
        let mut ans: Answer = serde_json::from_slice(&a.answer(&c, &tpm_key).unwrap()).unwrap();
        tamper(&mut ans, &serde_json::from_slice(&c).unwrap());
        let got = refusal(
            kind,
            session.resume(&serde_json::to_vec(&ans).unwrap(), &ctx(&tpm_key)),
        );
        assert!(got.starts_with(want), "{got}\nwanted: {want}");
    }
    assert_eq!(f.tpm.leftovers(), "");
}

#[test]
fn tpm_agent_key_signs_only_in_its_own_tpm() {
    let f = fixture();
    let (tpm_b, _) = f.second_tpm(true);
    let mut a = TpmAttestor::with_tcti(&f.tpm.tcti());
    let key = a.agent_key().unwrap().unwrap();
    // It signs CSRs and TLS handshakes: the CSR verifies with the key's public half.
    let csr = key.csr().unwrap();
    let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into())
        .expect("the TPM-signed CSR verifies");
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&parsed.public_key),
        key.spki().unwrap()
    );
    let ztid_attestor::agent_key::AgentKey::Tpm(k) = &key else {
        panic!("a TPM key")
    };
    let sig = k.sign(b"handshake transcript").unwrap();
    let point = &key.spki().unwrap()[26..];
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(b"handshake transcript", &sig)
        .expect("TPM signature verifies");
    // Its data-directory form is useless on another machine's TPM.
    let (file, bytes) = key.persisted().unwrap();
    assert_eq!(file, "agent_key.tpmkey");
    let copied =
        ztid_attestor::agent_key::TpmAgentKey::new(&tpm_b.tcti(), k.blob().clone()).unwrap();
    let err = copied
        .sign(b"handshake transcript")
        .unwrap_err()
        .to_string();
    assert!(err.contains("this TPM cannot load the key"), "{err}");
    // The persisted form names no private key material a software stack could use.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), &bytes).unwrap();
    let reloaded = ztid_attestor::agent_key::AgentKey::load(dir.path(), &f.tpm.tcti()).unwrap();
    assert!(reloaded.pkcs8().is_none());
    assert_eq!(reloaded.spki().unwrap(), key.spki().unwrap());
    assert_eq!(f.tpm.leftovers(), "");
    assert_eq!(tpm_b.leftovers(), "");
}

// ----- ECC EKs -----------------------------------------------------------------------------
//
// swtpm_setup (0.7) provisions an RSA-2048 EK (certificate at NV 0x01c00002) and an ECC
// NIST P-384 EK from the high-range template (certificate at NV 0x01c00016); there is no
// P-256 EK certificate (0x01c0000a), but the P-256 EK itself can be created from its template.

/// The curve, nameAlg and symmetric key size of an ECC EK `TPMT_PUBLIC`.
fn ecc_ek_params(ek_pub: &[u8]) -> (u16, u16, Option<(u16, u16, u16)>) {
    let ek = wire::Public::parse(ek_pub).unwrap();
    match ek.key {
        wire::PublicKey::Ecc { curve, .. } => (curve, ek.name_alg, ek.symmetric),
        other => panic!("not an ECC EK: {other:?}"),
    }
}

#[test]
fn tpm_ecc_ek_enrolment_round_trip_and_identity() {
    let f = fixture();
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti_and_ek(&f.tpm.tcti(), EkKind::Ecc);
    let t = std::time::Instant::now();
    let (node, ev, _, _, _) = attest(&v, &mut a);
    eprintln!(
        "enrolment with the ECC EK (agent+CA, swtpm): {:?}",
        t.elapsed()
    );

    let ev: InitialEvidence = serde_json::from_slice(&ev).unwrap();
    // The P-384 high-range EK: SHA-384 names, AES-256-CFB.
    assert_eq!(
        ecc_ek_params(&ev.ek_pub),
        (
            wire::curve::NIST_P384,
            wire::alg::SHA384,
            Some((wire::alg::AES, 256, wire::alg::CFB))
        )
    );
    // node id = SHA-256 of the ECC EK certificate's SubjectPublicKeyInfo.
    let (_, cert) = x509_parser::parse_x509_certificate(&ev.ek_cert).unwrap();
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "the EK certificate sent is the ECC one"
    );
    assert_eq!(node.node_id, sha256_hex(cert.public_key().raw));
    assert_eq!(node.node_id, tpm::ek_hash(&ev.ek_pub).unwrap());
    let sels: Vec<String> = node.selectors.iter().map(|s| s.to_string()).collect();
    for want in [
        format!("tpm:ek-hash:{}", node.node_id),
        "tpm:manufacturer:id:00001014".to_string(),
        "tpm:ek-issuer:CN=swtpm-localca".to_string(),
        format!("tpm:pcr:7:{}", "0".repeat(64)),
    ] {
        assert!(sels.contains(&want), "{want} not in {sels:?}");
    }

    // The default choice on this TPM is the RSA EK: the same TPM, another node id.
    let mut r = TpmAttestor::with_tcti(&f.tpm.tcti());
    assert_eq!(r.ek_kind(), EkKind::Auto);
    let (rsa_node, rsa_ev, _, _, _) = attest(&v, &mut r);
    let rsa_ev: InitialEvidence = serde_json::from_slice(&rsa_ev).unwrap();
    assert!(matches!(
        wire::Public::parse(&rsa_ev.ek_pub).unwrap().key,
        wire::PublicKey::Rsa { key_bits: 2048, .. }
    ));
    assert_ne!(rsa_node.node_id, node.node_id);
    // Naming the curve gives the same EK as "ecc"; a P-256 EK has no certificate here:
    // the agent sends none (as an SVSM vTPM would), and alone that is refused.
    let mut p384 = TpmAttestor::with_tcti_and_ek(&f.tpm.tcti(), "ecc-p384".parse().unwrap());
    assert_eq!(attest(&v, &mut p384).0.node_id, node.node_id);
    let mut p256 = TpmAttestor::with_tcti_and_ek(&f.tpm.tcti(), EkKind::EccP256);
    let k256 = p256.agent_key().unwrap().unwrap().spki().unwrap();
    let ev256 = p256.initial_evidence().unwrap();
    let parsed256: InitialEvidence = serde_json::from_slice(&ev256).unwrap();
    assert!(parsed256.ek_cert.is_empty());
    assert_eq!(
        refusal(PolicyMismatch, v.start(&ev256, &ctx(&k256))),
        "a TPM whose EK has no certificate attests only together with an SEV-SNP report that binds it (--attestor tpm,sev-snp)"
    );
    assert!("ecc-p521".parse::<EkKind>().is_err());
    // Nothing left loaded in the TPM.
    assert_eq!(
        f.tpm.leftovers(),
        "",
        "transient objects or sessions leaked"
    );
}

#[test]
fn tpm_ecc_ek_cert_from_another_local_ca_is_refused() {
    let f = fixture();
    let (other, other_ca) = f.second_tpm(false);
    let v = TpmVerifier::new(policy(&f.ca, ""));
    let mut a = TpmAttestor::with_tcti_and_ek(&other.tcti(), EkKind::Ecc);
    let (ev, k) = evidence(&mut a);
    let parsed: InitialEvidence = serde_json::from_slice(&ev).unwrap();
    assert_eq!(ecc_ek_params(&parsed.ek_pub).0, wire::curve::NIST_P384);
    assert_eq!(
        refusal(UntrustedChain, v.start(&ev, &ctx(&k))),
        "EK certificate signature does not verify with the key of CA CN=swtpm-localca"
    );
    // Trusting the other CA, the same TPM passes with its ECC EK.
    let v2 = TpmVerifier::new(policy(&other_ca, ""));
    let (node, ..) = attest(
        &v2,
        &mut TpmAttestor::with_tcti_and_ek(&other.tcti(), EkKind::Ecc),
    );
    assert_eq!(node.node_id, tpm::ek_hash(&parsed.ek_pub).unwrap());
    // The ECC EK certificate with the RSA EK (and the other way round): the certified key
    // must be the EK sent.
    let rsa_ev: InitialEvidence =
        serde_json::from_slice(&evidence(&mut TpmAttestor::with_tcti(&other.tcti())).0).unwrap();
    for (cert, ek_pub) in [
        (&parsed.ek_cert, &rsa_ev.ek_pub),
        (&rsa_ev.ek_cert, &parsed.ek_pub),
    ] {
        let swapped = InitialEvidence {
            ek_cert: cert.clone(),
            ek_pub: ek_pub.clone(),
            ..parsed.clone()
        };
        assert_eq!(
            refusal(
                KeyMismatch,
                v2.start(&serde_json::to_vec(&swapped).unwrap(), &ctx(&k))
            ),
            "EK certificate public key is not the EK public key sent"
        );
    }
    assert_eq!(other.leftovers(), "");
}

#[test]
fn tpm_ecc_ak_from_a_second_tpm_is_refused() {
    // swtpm certifies a P-384 EK: the secret is an ephemeral P-384 point, not RSA-OAEP.
    ak_from_a_second_tpm_is_refused(EkKind::Ecc, EkTemplate::EccP384, 2 + 48 + 2 + 48);
}

#[test]
fn tpm_ecc_make_credential_interoperates_with_tpm2_tools() {
    let f = fixture();
    let work = f.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let t = |tool: &str, args: &[&str]| f.tpm.tpm2_ok(&work, tool, args);
    let read = |n: &str| std::fs::read(work.join(n)).unwrap();

    // tpm2-tools' names for the two ECC EK templates; the low-range P-256 EK has no
    // userWithAuth, so tpm2_activatecredential needs PolicySecret(endorsement) for it.
    for (tools_alg, kind, template, policy_session) in [
        ("ecc", EkKind::EccP256, EkTemplate::EccP256, true),
        ("ecc384", EkKind::EccP384, EkTemplate::EccP384, false),
    ] {
        let ekpub = format!("ek-{tools_alg}.pub");
        t(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", tools_alg, "-u", &ekpub],
        );
        t(
            "tpm2_createak",
            &[
                "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u",
                "ak.pub", "-n", "ak.name",
            ],
        );
        t("tpm2_flushcontext", &["-t"]);
        // ztid recreates exactly the EK tpm2-tools made from the same TCG template.
        let ek_tpmt = tpmt(&read(&ekpub));
        let mut ours = Tpm::open_with_ek(&f.tpm.tcti(), kind).unwrap();
        assert_eq!(ours.ek_template().unwrap(), template);
        assert_eq!(ours.ek_public().unwrap(), ek_tpmt, "{tools_alg} EK differs");
        drop(ours);
        let ek = wire::Public::parse(&ek_tpmt).unwrap();
        let ak = wire::Public::parse(&tpmt(&read("ak.pub"))).unwrap();
        assert_eq!(ak.name().unwrap(), read("ak.name"));

        // 1. ztid's software MakeCredential (ECDH + KDFe) → tpm2_activatecredential.
        let secret: Vec<u8> = (1..=32).collect();
        let cred = credential::make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
        std::fs::write(work.join("ztid.cred"), tools_cred_file(&cred)).unwrap();
        let mut args = vec![
            "-c",
            "ak.ctx",
            "-C",
            "ek.ctx",
            "-i",
            "ztid.cred",
            "-o",
            "out.bin",
        ];
        if policy_session {
            t(
                "tpm2_startauthsession",
                &["--policy-session", "-S", "session.ctx"],
            );
            t("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"]);
            args.extend(["-P", "session:session.ctx"]);
        }
        t("tpm2_activatecredential", &args);
        if policy_session {
            t("tpm2_flushcontext", &["session.ctx"]);
        }
        t("tpm2_flushcontext", &["-t"]);
        assert_eq!(
            read("out.bin"),
            secret,
            "tpm2_activatecredential recovered another secret ({tools_alg} EK)"
        );

        // 2. tpm2_makecredential (software, -T none) → ztid's ActivateCredential, with an
        //    AK ztid made under its own recreation of the EK.
        let mut tpm = Tpm::open_with_ek(&f.tpm.tcti(), kind).unwrap();
        let our_ak = tpm.create_ak().unwrap();
        drop(tpm);
        assert_eq!(our_ak.ek(), template);
        let our_name = wire::Public::parse(&our_ak.public_bytes().unwrap())
            .unwrap()
            .name()
            .unwrap();
        std::fs::write(work.join("secret2.bin"), b"from tpm2_makecredential").unwrap();
        let o = std::process::Command::new("tpm2_makecredential")
            .current_dir(&work)
            .args([
                "-T",
                "none",
                "-e",
                &ekpub,
                "-s",
                "secret2.bin",
                "-n",
                &hex::encode(&our_name),
                "-o",
                "tools.cred",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let c = parse_tools_cred_file(&read("tools.cred"));
        let len = if template == EkTemplate::EccP256 {
            32
        } else {
            48
        };
        // A TPMS_ECC_POINT: two TPM2B coordinates, each at most the curve's size (a
        // coordinate with leading zero bytes is shorter, about 1 run in 128).
        let es = &c.encrypted_secret;
        let x = usize::from(u16::from_be_bytes([es[0], es[1]]));
        assert!(
            x <= len && es.len() > 2 + x + 2,
            "a TPMS_ECC_POINT: {es:02x?}"
        );
        let y = usize::from(u16::from_be_bytes([es[2 + x], es[3 + x]]));
        assert!(
            y <= len && es.len() == 4 + x + y,
            "a TPMS_ECC_POINT: {es:02x?}"
        );
        // Any Tpm connection activates with the AK's own EK, whatever its EK choice.
        let mut tpm = Tpm::open(&f.tpm.tcti()).unwrap();
        let got = tpm
            .activate_credential(&our_ak, &c.blob, &c.encrypted_secret)
            .unwrap();
        assert_eq!(got, b"from tpm2_makecredential");

        // 3. ztid's credential through ztid's activation: the right name passes, another
        //    name (tpm2-tools' AK) fails the TPM's integrity check.
        let good = credential::make_credential(&ek, &our_name, &secret).unwrap();
        assert_eq!(
            tpm.activate_credential(&our_ak, &good.blob, &good.encrypted_secret)
                .unwrap(),
            secret
        );
        let wrong = credential::make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
        assert!(tpm
            .activate_credential(&our_ak, &wrong.blob, &wrong.encrypted_secret)
            .is_err());
        drop(tpm);
        assert_eq!(f.tpm.leftovers(), "", "after the {tools_alg} EK");
    }
}

#[test]
fn tpm_ecc_offline_evidence_round_trip() {
    let f = fixture();
    let nonce = b"offline-nonce-ecc-0123456789abcd";
    let pcrs: BTreeSet<u8> = (0..8).collect();
    let file =
        ztid_attestor::tpm::capture_evidence_with_ek(&f.tpm.tcti(), EkKind::Ecc, nonce, &pcrs)
            .unwrap();
    let ev: tpm::EvidenceFile = serde_json::from_slice(&file).unwrap();
    assert_eq!(ecc_ek_params(&ev.ek_pub).0, wire::curve::NIST_P384);
    let trust = f.ca.trust_dir();
    let claims = tpm::verify_offline(
        &file,
        Some(&trust),
        Some(nonce),
        SystemTime::now(),
        &toml::Table::new(),
    )
    .expect("offline verification");
    assert_eq!(claims["node_id"], tpm::ek_hash(&ev.ek_pub).unwrap());
    assert_eq!(claims["manufacturer"], "id:00001014");
    assert_eq!(f.tpm.leftovers(), "");
}
