//! Strict parsers for the few TPM 2.0 structures the CA reads: `TPMT_PUBLIC`,
//! `TPMS_ATTEST` and `TPMT_SIGNATURE` (TPM 2.0 Part 2). Written by hand, so the CA needs
//! no TPM library, and strict: every size is checked, unknown algorithms are refused and
//! trailing bytes are an error. The parsers never panic on any input.

use std::collections::BTreeSet;

use crate::Error;
use crate::RefusalKind::{Malformed, Unsupported};

/// `TPM_ALG_*` identifiers used here.
pub mod alg {
    /// RSA.
    pub const RSA: u16 = 0x0001;
    /// SHA-1 (only recognised, to be refused by name).
    pub const SHA1: u16 = 0x0004;
    /// AES.
    pub const AES: u16 = 0x0006;
    /// SHA-256.
    pub const SHA256: u16 = 0x000B;
    /// SHA-384.
    pub const SHA384: u16 = 0x000C;
    /// SHA-512.
    pub const SHA512: u16 = 0x000D;
    /// The null algorithm.
    pub const NULL: u16 = 0x0010;
    /// RSASSA-PKCS1-v1_5.
    pub const RSASSA: u16 = 0x0014;
    /// RSAES-PKCS1-v1_5.
    pub const RSAES: u16 = 0x0015;
    /// RSASSA-PSS.
    pub const RSAPSS: u16 = 0x0016;
    /// RSAES-OAEP.
    pub const OAEP: u16 = 0x0017;
    /// ECDSA.
    pub const ECDSA: u16 = 0x0018;
    /// ECDH.
    pub const ECDH: u16 = 0x0019;
    /// ECDAA.
    pub const ECDAA: u16 = 0x001A;
    /// EC Schnorr.
    pub const ECSCHNORR: u16 = 0x001C;
    /// ECC.
    pub const ECC: u16 = 0x0023;
    /// CFB mode.
    pub const CFB: u16 = 0x0043;
}

/// `TPM_ECC_*` curve identifiers.
pub mod curve {
    /// NIST P-256.
    pub const NIST_P256: u16 = 0x0003;
    /// NIST P-384.
    pub const NIST_P384: u16 = 0x0004;
}

/// `TPMA_OBJECT` bits.
pub mod attr {
    /// fixedTPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// userWithAuth.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// adminWithPolicy.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// restricted.
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign / encrypt.
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// `TPM_GENERATED_VALUE`, the magic of every `TPMS_ATTEST`.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ST_ATTEST_CERTIFY`.
pub const ST_ATTEST_CERTIFY: u16 = 0x8017;

fn bad(what: &str) -> Error {
    Error::refused(Malformed, format!("malformed {what}"))
}

/// A bounds-checked big-endian reader over a byte slice.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming the structure `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let (a, b) = self
            .buf
            .split_at_checked(n)
            .ok_or_else(|| bad(&format!("{} (truncated)", self.what)))?;
        self.buf = b;
        Ok(a)
    }
    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (a, b) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or_else(|| bad(&format!("{} (truncated)", self.what)))?;
        self.buf = b;
        Ok(*a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Error> {
        let [b] = self.take_array()?;
        Ok(b)
    }
    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }
    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }
    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.take_array()?))
    }
    /// A `TPM2B_*`: a u16 size and that many bytes, at most `max`.
    pub fn tpm2b(&mut self, max: usize) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(bad(&format!("{} (a sized field is too large)", self.what)));
        }
        self.take(n)
    }
    /// Fails if any byte is left.
    pub fn finish(self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::refused(
                Malformed,
                format!(
                    "malformed {} ({} trailing bytes)",
                    self.what,
                    self.buf.len()
                ),
            ))
        }
    }
}

/// Digest size of a hash algorithm this module supports.
pub fn digest_len(hash: u16) -> Option<usize> {
    match hash {
        alg::SHA1 => Some(20),
        alg::SHA256 => Some(32),
        alg::SHA384 => Some(48),
        alg::SHA512 => Some(64),
        _ => None,
    }
}

/// ring's algorithm for a TPM hash algorithm (SHA-256/384/512), `None` for others.
pub fn ring_digest(hash: u16) -> Option<&'static ring::digest::Algorithm> {
    match hash {
        alg::SHA256 => Some(&ring::digest::SHA256),
        alg::SHA384 => Some(&ring::digest::SHA384),
        alg::SHA512 => Some(&ring::digest::SHA512),
        _ => None,
    }
}

/// Digest of `data` with a TPM hash algorithm (SHA-256/384/512).
pub fn hash(hash: u16, data: &[u8]) -> Result<Vec<u8>, Error> {
    let a = ring_digest(hash).ok_or_else(|| {
        Error::refused(
            Unsupported,
            format!("unsupported hash algorithm 0x{hash:04x}"),
        )
    })?;
    Ok(ring::digest::digest(a, data).as_ref().to_vec())
}

/// The algorithm-specific part of a `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA: modulus (big-endian, as the TPM gives it) and public exponent.
    Rsa {
        /// Modulus bytes.
        modulus: Vec<u8>,
        /// Exponent (the TPM's 0 already mapped to 65537).
        exponent: u32,
        /// Key size in bits from the parameters.
        key_bits: u16,
    },
    /// ECC: curve and point.
    Ecc {
        /// `TPM_ECC_CURVE`.
        curve: u16,
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
}

/// A parsed `TPMT_PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    /// The exact bytes parsed (what the name is computed over).
    pub raw: Vec<u8>,
    /// `nameAlg`.
    pub name_alg: u16,
    /// `objectAttributes`.
    pub attributes: u32,
    /// `authPolicy`.
    pub auth_policy: Vec<u8>,
    /// Symmetric algorithm for a storage/decrypt key: (alg, key bits, mode), `None` if null.
    pub symmetric: Option<(u16, u16, u16)>,
    /// Signing or decryption scheme: (scheme, hash), `None` if null.
    pub scheme: Option<(u16, u16)>,
    /// The public key itself.
    pub key: PublicKey,
}

fn sym_def(r: &mut Reader<'_>) -> Result<Option<(u16, u16, u16)>, Error> {
    let a = r.u16()?;
    if a == alg::NULL {
        return Ok(None);
    }
    let bits = r.u16()?;
    let mode = r.u16()?;
    Ok(Some((a, bits, mode)))
}

impl Public {
    /// Parses a `TPMT_PUBLIC` (as `Public::marshall()` in tss-esapi writes it).
    pub fn parse(raw: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(raw, "TPMT_PUBLIC");
        let typ = r.u16()?;
        let name_alg = r.u16()?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b(64)?.to_vec();
        let (symmetric, scheme, key) = match typ {
            alg::RSA => {
                let symmetric = sym_def(&mut r)?;
                let s = r.u16()?;
                let scheme = match s {
                    alg::NULL => None,
                    // RSAES has no details; the others carry a hash.
                    alg::RSAES => Some((s, alg::NULL)),
                    alg::RSASSA | alg::RSAPSS | alg::OAEP => Some((s, r.u16()?)),
                    other => {
                        return Err(Error::refused(
                            Unsupported,
                            format!("unsupported RSA scheme 0x{other:04x} in TPMT_PUBLIC"),
                        ))
                    }
                };
                let key_bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.tpm2b(512)?.to_vec();
                if modulus.len() * 8 != key_bits as usize {
                    return Err(bad("TPMT_PUBLIC (RSA modulus size differs from keyBits)"));
                }
                (
                    symmetric,
                    scheme,
                    PublicKey::Rsa {
                        modulus,
                        exponent,
                        key_bits,
                    },
                )
            }
            alg::ECC => {
                let symmetric = sym_def(&mut r)?;
                let s = r.u16()?;
                let scheme = match s {
                    alg::NULL => None,
                    alg::ECDSA | alg::ECDH | alg::ECSCHNORR => Some((s, r.u16()?)),
                    alg::ECDAA => {
                        let h = r.u16()?;
                        let _count = r.u16()?;
                        Some((s, h))
                    }
                    other => {
                        return Err(Error::refused(
                            Unsupported,
                            format!("unsupported ECC scheme 0x{other:04x} in TPMT_PUBLIC"),
                        ))
                    }
                };
                let curve = r.u16()?;
                let kdf = r.u16()?;
                if kdf != alg::NULL {
                    let _kdf_hash = r.u16()?;
                }
                let x = r.tpm2b(66)?.to_vec();
                let y = r.tpm2b(66)?.to_vec();
                (symmetric, scheme, PublicKey::Ecc { curve, x, y })
            }
            other => {
                return Err(Error::refused(
                    Unsupported,
                    format!("unsupported key type 0x{other:04x} in TPMT_PUBLIC"),
                ))
            }
        };
        r.finish()?;
        Ok(Self {
            raw: raw.to_vec(),
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key,
        })
    }

    /// The object's TPM name: `nameAlg || H_nameAlg(TPMT_PUBLIC)`.
    pub fn name(&self) -> Result<Vec<u8>, Error> {
        let mut out = self.name_alg.to_be_bytes().to_vec();
        out.extend(hash(self.name_alg, &self.raw)?);
        Ok(out)
    }

    /// True if every bit of `bits` is set.
    pub fn has(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }

    /// DER SubjectPublicKeyInfo of the key (RSA: rsaEncryption with NULL parameters;
    /// ECC: id-ecPublicKey with the named curve and an uncompressed point).
    pub fn spki_der(&self) -> Result<Vec<u8>, Error> {
        match &self.key {
            PublicKey::Rsa {
                modulus, exponent, ..
            } => {
                let rsa_key = der_seq(&[der_uint(modulus), der_uint(&exponent.to_be_bytes())]);
                Ok(der_seq(&[
                    der_seq(&[
                        // 1.2.840.113549.1.1.1 rsaEncryption, NULL parameters
                        vec![
                            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
                        ],
                        vec![0x05, 0x00],
                    ]),
                    der_bitstring(&rsa_key),
                ]))
            }
            PublicKey::Ecc { curve, x, y } => {
                let (curve_oid, len): (&[u8], usize) = match *curve {
                    // 1.2.840.10045.3.1.7 prime256v1
                    curve::NIST_P256 => (
                        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
                        32,
                    ),
                    // 1.3.132.0.34 secp384r1
                    curve::NIST_P384 => (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], 48),
                    other => {
                        return Err(Error::refused(
                            Unsupported,
                            format!("unsupported ECC curve 0x{other:04x}"),
                        ))
                    }
                };
                let point = ecc_point(x, y, len)?;
                Ok(der_seq(&[
                    der_seq(&[
                        // 1.2.840.10045.2.1 id-ecPublicKey
                        vec![0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01],
                        curve_oid.to_vec(),
                    ]),
                    der_bitstring(&point),
                ]))
            }
        }
    }
}

/// `04 || X || Y`, each coordinate left-padded to `len` bytes.
pub fn ecc_point(x: &[u8], y: &[u8], len: usize) -> Result<Vec<u8>, Error> {
    let mut out = vec![0x04];
    for c in [x, y] {
        let c = strip_zeros(c);
        if c.len() > len {
            return Err(bad("ECC point (coordinate too long)"));
        }
        out.extend(std::iter::repeat_n(0u8, len - c.len()));
        out.extend_from_slice(c);
    }
    Ok(out)
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|&b| b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

fn der_seq(items: &[Vec<u8>]) -> Vec<u8> {
    der_tlv(0x30, &items.concat())
}

fn der_uint(b: &[u8]) -> Vec<u8> {
    let b = strip_zeros(b);
    let mut c = Vec::with_capacity(b.len() + 1);
    if b.first().is_none_or(|&first| first & 0x80 != 0) {
        c.push(0);
    }
    c.extend_from_slice(b);
    der_tlv(0x02, &c)
}

fn der_bitstring(b: &[u8]) -> Vec<u8> {
    let mut c = vec![0u8];
    c.extend_from_slice(b);
    der_tlv(0x03, &c)
}

/// One bank of a `TPML_PCR_SELECTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBank {
    /// Hash algorithm of the bank.
    pub hash: u16,
    /// Selected PCR indices.
    pub pcrs: BTreeSet<u8>,
}

/// Marshals a `TPML_PCR_SELECTION` with one bank (sizeofSelect 3, PCRs 0-23).
pub fn marshal_pcr_selection(hash: u16, pcrs: &BTreeSet<u8>) -> Vec<u8> {
    let mut sel = [0u8; 3];
    for &p in pcrs {
        // PCRs 24 and up have no byte in a 3-byte selection and are left out.
        if let Some(byte) = sel.get_mut(usize::from(p / 8)) {
            *byte |= 1 << (p % 8);
        }
    }
    let mut out = 1u32.to_be_bytes().to_vec();
    out.extend(hash.to_be_bytes());
    out.push(3);
    out.extend(sel);
    out
}

fn pcr_selection(r: &mut Reader<'_>) -> Result<Vec<PcrBank>, Error> {
    let count = r.u32()?;
    if count > 16 {
        return Err(bad("TPML_PCR_SELECTION (too many banks)"));
    }
    let mut banks = Vec::new();
    for _ in 0..count {
        let hash = r.u16()?;
        let size = r.u8()? as usize;
        if size > 4 {
            return Err(bad("TPMS_PCR_SELECTION (sizeofSelect too large)"));
        }
        let mut pcrs = BTreeSet::new();
        for (i, b) in r.take(size)?.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pcrs.insert((i * 8 + bit) as u8);
                }
            }
        }
        banks.push(PcrBank { hash, pcrs });
    }
    Ok(banks)
}

/// `TPMS_CLOCK_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered (since its last clear).
    pub clock: u64,
    /// TPM resets (reboots) since the last clear.
    pub reset_count: u32,
    /// TPM restarts (resume from hibernate) since the last reset.
    pub restart_count: u32,
    /// Whether `clock` is known not to have gone backwards.
    pub safe: bool,
}

/// The type-specific part of a `TPMS_ATTEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    /// `TPMS_QUOTE_INFO`.
    Quote {
        /// `pcrSelect`.
        selection: Vec<PcrBank>,
        /// `pcrDigest`.
        digest: Vec<u8>,
    },
    /// `TPMS_CERTIFY_INFO`.
    Certify {
        /// Name of the certified object.
        name: Vec<u8>,
        /// Qualified name of the certified object.
        qualified_name: Vec<u8>,
    },
}

/// A parsed `TPMS_ATTEST`. Parse only bytes whose signature was already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// `qualifiedSigner`.
    pub qualified_signer: Vec<u8>,
    /// `extraData` (the verifier's nonce).
    pub extra_data: Vec<u8>,
    /// `clockInfo`.
    pub clock: ClockInfo,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `attested`.
    pub attested: Attested,
}

impl Attest {
    /// Parses a `TPMS_ATTEST` of type quote or certify; checks the magic, the type and
    /// that no byte follows.
    pub fn parse(raw: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(raw, "TPMS_ATTEST");
        let magic = r.u32()?;
        if magic != TPM_GENERATED {
            return Err(Error::refused(
                Malformed,
                format!("TPMS_ATTEST magic is 0x{magic:08x}, not TPM_GENERATED_VALUE (0xff544347)"),
            ));
        }
        let typ = r.u16()?;
        let qualified_signer = r.tpm2b(68)?.to_vec();
        let extra_data = r.tpm2b(64)?.to_vec();
        let clock = ClockInfo {
            clock: r.u64()?,
            reset_count: r.u32()?,
            restart_count: r.u32()?,
            safe: r.u8()? != 0,
        };
        let firmware_version = r.u64()?;
        let attested = match typ {
            ST_ATTEST_QUOTE => {
                let selection = pcr_selection(&mut r)?;
                let digest = r.tpm2b(64)?.to_vec();
                Attested::Quote { selection, digest }
            }
            ST_ATTEST_CERTIFY => Attested::Certify {
                name: r.tpm2b(68)?.to_vec(),
                qualified_name: r.tpm2b(68)?.to_vec(),
            },
            other => {
                return Err(Error::refused(
                    Malformed,
                    format!("TPMS_ATTEST type is 0x{other:04x}, not a quote or certify"),
                ))
            }
        };
        r.finish()?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock,
            firmware_version,
            attested,
        })
    }
}

/// A parsed `TPMT_SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// RSASSA-PKCS1-v1_5 or RSASSA-PSS.
    Rsa {
        /// `TPM_ALG_RSASSA` or `TPM_ALG_RSAPSS`.
        scheme: u16,
        /// Hash algorithm.
        hash: u16,
        /// Signature bytes.
        sig: Vec<u8>,
    },
    /// ECDSA.
    Ecdsa {
        /// Hash algorithm.
        hash: u16,
        /// r.
        r: Vec<u8>,
        /// s.
        s: Vec<u8>,
    },
}

impl Signature {
    /// Parses a `TPMT_SIGNATURE`; no byte may follow.
    pub fn parse(raw: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(raw, "TPMT_SIGNATURE");
        let scheme = r.u16()?;
        let sig = match scheme {
            alg::RSASSA | alg::RSAPSS => Signature::Rsa {
                scheme,
                hash: r.u16()?,
                sig: r.tpm2b(512)?.to_vec(),
            },
            alg::ECDSA => Signature::Ecdsa {
                hash: r.u16()?,
                r: r.tpm2b(66)?.to_vec(),
                s: r.tpm2b(66)?.to_vec(),
            },
            other => {
                return Err(Error::refused(
                    Unsupported,
                    format!("unsupported signature algorithm 0x{other:04x}"),
                ))
            }
        };
        r.finish()?;
        Ok(sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_truncation_and_trailing_bytes() {
        assert!(Public::parse(&[0x00, 0x01, 0x00]).is_err());
        let mut r = Reader::new(&[0, 1, 2], "x");
        assert_eq!(r.u16().unwrap(), 1);
        assert!(r.finish().is_err());
        let mut r = Reader::new(&[0, 5, 1], "x");
        assert!(r.tpm2b(64).is_err());
        let mut r = Reader::new(&[0, 5, 1, 2, 3, 4, 5], "x");
        assert!(r.tpm2b(4).is_err());
    }

    #[test]
    fn pcr_selection_round_trip() {
        let pcrs: BTreeSet<u8> = [0, 1, 7, 16, 23].into_iter().collect();
        let b = marshal_pcr_selection(alg::SHA256, &pcrs);
        let mut r = Reader::new(&b, "sel");
        let banks = pcr_selection(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(
            banks,
            vec![PcrBank {
                hash: alg::SHA256,
                pcrs
            }]
        );
    }

    #[test]
    fn der_integers() {
        assert_eq!(der_uint(&[0x00, 0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(
            der_uint(&[0x01, 0x00, 0x01]),
            vec![0x02, 0x03, 0x01, 0x00, 0x01]
        );
        assert_eq!(der_len(300), vec![0x82, 0x01, 0x2c]);
    }
}
