//! `tdx` node attestation: the quote framing both sides check (a TDX quote, version 4
//! or 5, nothing but zero padding after its signature data). The node side is
//! `ztid_attestor::tdx`, the CA side `ztid_verifier::tdx`.

use crate::Error;
use crate::RefusalKind::{Malformed, Unsupported};

/// The method name on the wire.
pub const METHOD: &str = "tdx";
/// The configfs-tsm provider of TDX guests.
pub const TSM_PROVIDER: &str = "tdx_guest";

/// The quote header's TEE type of an SGX enclave quote.
pub const TEE_TYPE_SGX: u32 = 0x00;
/// The quote header's TEE type of a TDX quote.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Largest quote accepted (real ones are about 5 KiB).
pub const MAX_QUOTE: usize = 64 * 1024;

/// Checks the header: a TDX quote, version 4 or 5.
pub fn check_header(quote: &[u8]) -> Result<(), Error> {
    let Some(header) = quote.first_chunk::<48>() else {
        return Err(Error::refused(
            Malformed,
            format!(
                "TDX quote is {} bytes, shorter than its 48-byte header",
                quote.len()
            ),
        ));
    };
    if quote.len() > MAX_QUOTE {
        return Err(Error::refused(
            Malformed,
            format!("TDX quote is {} bytes, more than {MAX_QUOTE}", quote.len()),
        ));
    }
    let version = u16::from_le_bytes([header[0], header[1]]);
    let tee = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    match tee {
        TEE_TYPE_TDX => {}
        TEE_TYPE_SGX => {
            return Err(Error::refused(
                Unsupported,
                format!(
                "the quote is an SGX enclave quote (version {version}, TEE type 0), not a TDX quote"
            ),
            ))
        }
        other => {
            return Err(Error::refused(
                Unsupported,
                format!("the quote's TEE type {other:#x} is not TDX (0x81)"),
            ))
        }
    }
    if version != 4 && version != 5 {
        return Err(Error::refused(
            Unsupported,
            format!("TDX quote version {version} is not supported (4 and 5 are)"),
        ));
    }
    // Quote buffers often come zero-padded; anything else after the signature data is
    // unsigned and has no meaning, so it is refused rather than ignored.
    if let Some(end) = declared_len(quote, version) {
        if let Some(extra) = quote.get(end..) {
            if extra.iter().any(|b| *b != 0) {
                return Err(Error::refused(Malformed, format!(
                    "TDX quote has non-zero bytes after its signature data ({} bytes past offset {end})",
                    extra.len()
                )));
            }
        }
    }
    Ok(())
}

/// Where a quote's signature data ends, by its own length fields (`None` when the quote
/// is too short to say; the parser then refuses it).
pub fn declared_len(quote: &[u8], version: u16) -> Option<usize> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(quote.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    // v4: header, TD 1.0 report body (584 bytes); v5: header, body type (2), body size
    // (4), body.
    let sig_len_at = match version {
        4 => 48 + 584,
        _ => u32_at(48 + 2)?.checked_add(48 + 2 + 4)?,
    };
    sig_len_at.checked_add(4)?.checked_add(u32_at(sig_len_at)?)
}
