//! The SEV-SNP ATTESTATION_REPORT (versions 2, 3 and 5): parsing with the `sev` crate, the
//! TCB byte layouts, and the report signature.
//!
//! The signature is checked over the report's raw bytes 0x000..0x2A0 as received. (The
//! `sev` crate's own check re-encodes the parsed report first; its parser refuses
//! non-zero reserved bytes between fields, but the re-encoding zeroes the reserved bytes
//! inside the TCB fields, so a flipped byte there would go unnoticed.) The TCB fields
//! are decoded from the raw bytes too, with the layout of the VEK's product, since a
//! version 2 report does not say which processor made it.

use ring::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;

use crate::Error;
use ztid_attestation::RefusalKind::{BadSignature, Malformed, Unsupported};

/// Length of every report version.
pub(crate) const REPORT_LEN: usize = ztid_attestation::sev_snp::REPORT_LEN;
/// The signed part.
pub(crate) const SIGNED_LEN: usize = 0x2A0;
const OFF_CURRENT_TCB: usize = 0x38;
const OFF_REPORTED_TCB: usize = 0x180;
const OFF_COMMITTED_TCB: usize = 0x1E0;
const OFF_LAUNCH_TCB: usize = 0x1F0;
const OFF_SIG_R: usize = 0x2A0;
const OFF_SIG_S: usize = 0x2E8;

/// Guest policy bit 19: debugging allowed.
pub(crate) const POLICY_DEBUG: u64 = 1 << 19;

/// A TCB version: security patch levels of each firmware component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Turin and later only.
    pub fmc: Option<u8>,
}

impl Tcb {
    /// Decodes 8 TCB bytes: `[bl, tee, 0, 0, 0, 0, snp, ucode]` (Milan, Genoa) or
    /// `[fmc, bl, tee, snp, 0, 0, 0, ucode]` (Turin and later).
    pub(crate) fn decode(b: &[u8; 8], turin_layout: bool) -> Self {
        if turin_layout {
            Tcb {
                fmc: Some(b[0]),
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
            }
        } else {
            Tcb {
                fmc: None,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
            }
        }
    }

    pub(crate) fn to_json(self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        });
        if let (Some(f), Some(obj)) = (self.fmc, v.as_object_mut()) {
            obj.insert("fmc".into(), f.into());
        }
        v
    }
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(fmc) = self.fmc {
            write!(f, "fmc={fmc} ")?;
        }
        write!(
            f,
            "bl={} tee={} snp={} ucode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// True for products whose TCB bytes use the Turin layout.
pub(crate) fn turin_layout(product: &str) -> bool {
    matches!(product, "Turin" | "Venice")
}

/// The product a report's CPUID family and model name, if known.
pub(crate) fn product_of_cpuid(family: u8, model: u8) -> Option<&'static str> {
    use sev::Generation;
    match Generation::identify_cpu(family, model).ok()? {
        Generation::Milan => Some("Milan"),
        Generation::Genoa => Some("Genoa"),
        Generation::Turin => Some("Turin"),
        Generation::Venice => Some("Venice"),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Which key signed the report (KEY_INFO.SIGNING_KEY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigningKey {
    Vcek,
    Vlek,
}

/// A parsed report over its raw bytes.
pub(crate) struct Report<'a> {
    /// Exactly one report: the constant offsets below index it without a length check.
    pub raw: &'a [u8; REPORT_LEN],
    pub parsed: AttestationReport,
}

impl<'a> Report<'a> {
    /// Parses a report; refuses versions other than 2 to 5 and malformed bytes.
    pub(crate) fn parse(raw: &'a [u8]) -> Result<Self, Error> {
        let raw: &'a [u8; REPORT_LEN] = raw.try_into().map_err(|_| {
            Error::refused(
                Malformed,
                format!(
                    "SEV-SNP report must be {REPORT_LEN} bytes, got {}",
                    raw.len()
                ),
            )
        })?;
        let version = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if !(2..=5).contains(&version) {
            return Err(Error::refused(
                Unsupported,
                format!("SEV-SNP report version {version} is not supported (2 to 5 are)"),
            ));
        }
        let parsed = AttestationReport::from_bytes(raw)
            .map_err(|e| Error::refused(Malformed, format!("malformed SEV-SNP report: {e}")))?;
        if parsed.sig_algo != 1 {
            return Err(Error::refused(
                Unsupported,
                format!(
                    "report signature algorithm {} is not ECDSA P-384 with SHA-384 (1)",
                    parsed.sig_algo
                ),
            ));
        }
        Ok(Self { raw, parsed })
    }

    pub(crate) fn signing_key(&self) -> Result<SigningKey, Error> {
        match self.parsed.key_info.signing_key() {
            0 => Ok(SigningKey::Vcek),
            1 => Ok(SigningKey::Vlek),
            7 => Err(Error::refused(
                BadSignature,
                "the report is not signed (KEY_INFO.SIGNING_KEY = none)",
            )),
            k => Err(Error::refused(
                Unsupported,
                format!("unknown report signing key {k} in KEY_INFO"),
            )),
        }
    }

    #[allow(
        clippy::indexing_slicing,
        reason = "off is one of the OFF_*_TCB constants, 8 bytes well inside the REPORT_LEN-byte raw array"
    )]
    fn tcb_at(&self, off: usize, turin: bool) -> Tcb {
        // Offsets are constants inside the report, whose length was checked on parsing.
        Tcb::decode(&std::array::from_fn(|i| self.raw[off + i]), turin)
    }

    pub(crate) fn reported_tcb(&self, turin: bool) -> Tcb {
        self.tcb_at(OFF_REPORTED_TCB, turin)
    }
    pub(crate) fn current_tcb(&self, turin: bool) -> Tcb {
        self.tcb_at(OFF_CURRENT_TCB, turin)
    }
    pub(crate) fn committed_tcb(&self, turin: bool) -> Tcb {
        self.tcb_at(OFF_COMMITTED_TCB, turin)
    }
    pub(crate) fn launch_tcb(&self, turin: bool) -> Tcb {
        self.tcb_at(OFF_LAUNCH_TCB, turin)
    }

    pub(crate) fn policy(&self) -> u64 {
        u64::from(self.parsed.policy)
    }

    /// Checks the ECDSA P-384 signature (little-endian r and s) over the raw signed bytes
    /// with the VEK's public key (an uncompressed SEC1 point).
    pub(crate) fn check_signature(&self, vek_public_key: &[u8], vek: &str) -> Result<(), Error> {
        let sig = p384_fixed_sig(
            &self.raw[OFF_SIG_R..OFF_SIG_R + 72],
            &self.raw[OFF_SIG_S..OFF_SIG_S + 72],
        )
        .ok_or_else(|| Error::refused(Malformed, "malformed report signature"))?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, vek_public_key)
            .verify(&self.raw[..SIGNED_LEN], &sig)
            .map_err(|_| {
                Error::refused(
                    BadSignature,
                    format!("report signature does not verify under the {vek} public key"),
                )
            })
    }
}

/// r and s (72 bytes each, little-endian, top 24 bytes zero) as big-endian r‖s.
fn p384_fixed_sig(r: &[u8], s: &[u8]) -> Option<Vec<u8>> {
    let (r, r_top) = r.split_at_checked(48)?;
    let (s, s_top) = s.split_at_checked(48)?;
    if r_top.iter().chain(s_top).any(|b| *b != 0) {
        return None;
    }
    let mut out = Vec::with_capacity(96);
    out.extend(r.iter().rev());
    out.extend(s.iter().rev());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcb_layouts() {
        let legacy = Tcb::decode(&[3, 0, 0, 0, 0, 0, 8, 115], false);
        assert_eq!(
            legacy,
            Tcb {
                bootloader: 3,
                tee: 0,
                snp: 8,
                microcode: 115,
                fmc: None
            }
        );
        let turin = Tcb::decode(&[1, 1, 1, 4, 0, 0, 0, 81], true);
        assert_eq!(turin.fmc, Some(1));
        assert_eq!(turin.snp, 4);
        assert_eq!(turin.microcode, 81);
        assert_eq!(turin.to_string(), "fmc=1 bl=1 tee=1 snp=4 ucode=81");
    }

    #[test]
    fn cpuid_products() {
        assert_eq!(product_of_cpuid(0x19, 0x01), Some("Milan"));
        assert_eq!(product_of_cpuid(0x19, 0x11), Some("Genoa"));
        assert_eq!(product_of_cpuid(0x1A, 0x02), Some("Turin"));
        assert_eq!(product_of_cpuid(0, 0), None);
    }
}
