//! `sev-snp` node attestation: the evidence framing both sides use
//! (`[ZTIDSVSM ‖ u32 LE length ‖ manifest] ‖ report ‖ [certificate table]`). The node side
//! is `ztid_attestor::sev_snp`, the CA side `ztid_verifier::sev_snp`.

use ring::digest;

use crate::Error;
use crate::RefusalKind::Malformed;

/// The method name on the wire.
pub const METHOD: &str = "sev-snp";
/// The configfs-tsm provider of SEV-SNP guests.
pub const TSM_PROVIDER: &str = "sev_guest";
/// Length of a report.
pub const REPORT_LEN: usize = 0x4A0;

/// The SVSM vTPM service (SVSM specification, 58019, attest single service).
pub const SVSM_VTPM_GUID: &str = "c476f1eb-0123-45a5-9641-b4e7dde5bfe3";
/// Marks evidence that starts with an SVSM service manifest.
pub const MANIFEST_MAGIC: &[u8; 8] = b"ZTIDSVSM";
/// Largest service manifest accepted (a vTPM's is its EK `TPMT_PUBLIC`, < 1 KiB).
pub const MAX_MANIFEST: usize = 4096;

/// Wire evidence, split: an SVSM service manifest (when the SVSM made the report),
/// the report, and the certificate table after it.
pub struct Evidence<'a> {
    /// The SVSM service manifest, when the SVSM made the report.
    pub manifest: Option<&'a [u8]>,
    /// The report.
    pub report: &'a [u8],
    /// The host's certificate table after the report.
    pub table: Option<&'a [u8]>,
}

/// Splits wire evidence: `[ZTIDSVSM ‖ u32 LE length ‖ manifest] ‖ report ‖ [table]`.
pub fn split_evidence(e: &[u8]) -> Result<Evidence<'_>, Error> {
    let (manifest, e) = match e.strip_prefix(&MANIFEST_MAGIC[..]) {
        Some(rest) => {
            let len = rest
                .first_chunk::<4>()
                .map(|b| u32::from_le_bytes(*b) as usize)
                .filter(|l| *l > 0 && *l <= MAX_MANIFEST)
                .ok_or_else(|| {
                    Error::refused(Malformed, format!(
                        "SEV-SNP evidence has a malformed service manifest (1 to {MAX_MANIFEST} bytes)"
                    ))
                })?;
            let (m, after) = rest
                .get(4..)
                .and_then(|r| r.split_at_checked(len))
                .ok_or_else(|| {
                    Error::refused(
                        Malformed,
                        "SEV-SNP evidence ends inside its service manifest",
                    )
                })?;
            (Some(m), after)
        }
        None => (None, e),
    };
    if e.len() < REPORT_LEN {
        return Err(Error::refused(
            Malformed,
            format!(
                "SEV-SNP evidence is {} bytes; a report alone is {REPORT_LEN}",
                e.len()
            ),
        ));
    }
    let (report, t) = e.split_at(REPORT_LEN);
    Ok(Evidence {
        manifest,
        report,
        table: (!t.is_empty()).then_some(t),
    })
}

/// What the SVSM puts in report_data for a service: SHA-512(nonce ‖ manifest).
pub fn svsm_report_data(nonce: &[u8; 64], manifest: &[u8]) -> [u8; 64] {
    let mut h = digest::Context::new(&digest::SHA512);
    h.update(nonce);
    h.update(manifest);
    let mut out = [0u8; 64];
    out.copy_from_slice(h.finish().as_ref());
    out
}
