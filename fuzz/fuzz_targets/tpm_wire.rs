//! TPM 2.0 wire structures (`ztid_attestation::tpm::wire`): `TPMT_PUBLIC`
//! (`Public::parse`, then its name and SubjectPublicKeyInfo, as the CA computes the node
//! id with `ztid_verifier::tpm::ek_hash`), `TPMS_ATTEST` (`Attest::parse`) and
//! `TPMT_SIGNATURE` (`Signature::parse`), each over the same bytes. They must never
//! panic, and what parses must be exactly the input (no trailing bytes accepted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztid_attestation::tpm::wire::{Attest, Public, Signature};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Public::parse(data) {
        assert_eq!(p.raw, data);
        let _ = p.name();
        let _ = p.spki_der();
        let _ = ztid_verifier::tpm::ek_hash(data);
    }
    let _ = Attest::parse(data);
    let _ = Signature::parse(data);
});
