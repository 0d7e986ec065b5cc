//! SEV-SNP collateral: certificates and CRLs from an offline directory or from the host's
//! certificate table (the configfs-tsm `auxblob`, the extended report's cert table).

use std::path::Path;

use crate::Error;
use ztid_attestation::RefusalKind::Malformed;

use super::certs::{AmdCert, AmdCrl};

/// Most bytes read from one collateral file.
const MAX_FILE: u64 = 1 << 20;
/// Most entries in a certificate table.
const MAX_TABLE_ENTRIES: usize = 64;
/// Largest certificate table accepted from a node. A host's table holds a VCEK or VLEK,
/// the ASK or ASVK, the ARK and maybe a CRL (a few KiB); the Linux guest driver caps
/// the certificate buffer at 16 KiB.
pub(crate) const MAX_TABLE_BYTES: usize = 64 * 1024;
/// Most certificates and CRLs taken from one certificate table (each one a node sends
/// may cost the CA a signature check, so their number is bounded before any is used).
pub(crate) const MAX_TABLE_ITEMS: usize = 16;

/// Certificates and CRLs gathered for one verification.
#[derive(Default, Clone)]
pub(crate) struct Collateral {
    pub certs: Vec<AmdCert>,
    pub crls: Vec<AmdCrl>,
}

impl Collateral {
    /// Adds every certificate and CRL in `bytes` (PEM, possibly several blocks, or DER).
    /// With `strict`, bytes that are neither are an error; otherwise they are skipped
    /// (a collateral directory may also hold the evidence itself, notes, ...).
    pub(crate) fn add_blob(&mut self, name: &str, bytes: &[u8], strict: bool) -> Result<(), Error> {
        let bad = |what: String| Error::Config(format!("collateral {name}: {what}"));
        if contains(bytes, b"-----BEGIN ") {
            let blocks = pem::parse_many(bytes).map_err(|e| bad(format!("bad PEM: {e}")))?;
            for b in blocks {
                match b.tag() {
                    "CERTIFICATE" => self
                        .certs
                        .push(AmdCert::from_der(b.contents()).map_err(bad)?),
                    "X509 CRL" => self
                        .crls
                        .push(AmdCrl::from_der(name, b.contents()).map_err(bad)?),
                    _ => {}
                }
            }
            return Ok(());
        }
        if bytes.first() == Some(&0x30) {
            match AmdCert::from_der(bytes) {
                Ok(c) => {
                    self.certs.push(c);
                    return Ok(());
                }
                Err(cert_err) => match AmdCrl::from_der(name, bytes) {
                    Ok(c) => {
                        self.crls.push(c);
                        return Ok(());
                    }
                    Err(_) if strict => {
                        return Err(bad(format!("not a certificate or CRL ({cert_err})")))
                    }
                    Err(_) => return Ok(()),
                },
            }
        }
        if strict {
            return Err(bad("not a certificate or CRL".into()));
        }
        Ok(())
    }

    pub(crate) fn extend(&mut self, other: Collateral) {
        self.certs.extend(other.certs);
        self.crls.extend(other.crls);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every certificate and CRL in the files of `dir` (not recursive). Files named
/// `*.der`, `*.pem`, `*.crt`, `*.cer` or `*.crl` must parse; others are used when they
/// parse as a certificate or CRL and skipped otherwise.
pub(crate) fn load_dir(dir: &Path) -> Result<Collateral, Error> {
    let rd = std::fs::read_dir(dir).map_err(Error::io(format!(
        "reading collateral directory {}",
        dir.display()
    )))?;
    let mut paths: Vec<_> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut out = Collateral::default();
    for p in paths {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let strict = matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("der" | "pem" | "crt" | "cer" | "crl")
        );
        let len = std::fs::metadata(&p)
            .map_err(Error::io(format!("reading {}", p.display())))?
            .len();
        if len > MAX_FILE {
            if strict {
                return Err(Error::Config(format!(
                    "collateral {name} is larger than {MAX_FILE} bytes"
                )));
            }
            continue;
        }
        let bytes = std::fs::read(&p).map_err(Error::io(format!("reading {}", p.display())))?;
        out.add_blob(&name, &bytes, strict)?;
    }
    // The operator's directory: its CRLs are the CA's own (unlike a certificate table's).
    out.crls = out.crls.into_iter().map(AmdCrl::trusted_by_ca).collect();
    Ok(out)
}

const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";
const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
const GUID_VLEK: &str = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
const GUID_CRL: &str = "92f81bc3-5811-4d3d-97ff-d19f88dc67ea";

fn guid_string(g: &[u8]) -> String {
    let h = hex::encode(g);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Encodes a certificate table (GHCB layout: 24-byte entries of GUID, offset and
/// length, ending with an all-zero entry, then the blobs); `kind` is one of `ark`,
/// `ask`, `vcek`, `vlek`, `crl`.
#[allow(
    clippy::expect_used,
    reason = "decodes only the constant GUID_* strings, which are valid hex"
)]
pub fn encode_cert_table(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let header = (entries.len() + 1) * 24;
    let mut table = Vec::new();
    let mut blobs = Vec::new();
    for (kind, data) in entries {
        let guid = match *kind {
            "ark" => GUID_ARK,
            "ask" => GUID_ASK,
            "vcek" => GUID_VCEK,
            "vlek" => GUID_VLEK,
            _ => GUID_CRL,
        };
        table.extend_from_slice(&hex::decode(guid.replace('-', "")).expect("constant GUID"));
        table.extend_from_slice(&((header + blobs.len()) as u32).to_le_bytes());
        table.extend_from_slice(&(data.len() as u32).to_le_bytes());
        blobs.extend_from_slice(data);
    }
    table.extend_from_slice(&[0u8; 24]);
    table.extend_from_slice(&blobs);
    table
}

/// The certificates and CRLs in a certificate table. Entries of unknown GUIDs are
/// skipped; out-of-range entries are an error.
///
/// The table comes from the node: it is refused when larger than [`MAX_TABLE_BYTES`], or
/// when its entries hold more than [`MAX_TABLE_ITEMS`] certificates and CRLs in all.
pub(crate) fn parse_cert_table(table: &[u8]) -> Result<Collateral, Error> {
    let bad = |m: String| Error::refused(Malformed, format!("malformed certificate table: {m}"));
    if table.len() > MAX_TABLE_BYTES {
        return Err(bad(format!(
            "{} bytes, more than {MAX_TABLE_BYTES}",
            table.len()
        )));
    }
    let mut out = Collateral::default();
    // Entries may point at the same bytes: what is parsed in all stays within the bound.
    let mut parsed = 0usize;
    for i in 0.. {
        if i >= MAX_TABLE_ENTRIES {
            return Err(bad(format!("more than {MAX_TABLE_ENTRIES} entries")));
        }
        let e: &[u8; 24] = table
            .get(i * 24..)
            .and_then(|rest| rest.first_chunk())
            .ok_or_else(|| bad("no terminating entry".into()))?;
        let guid = &e[..16];
        if guid.iter().all(|b| *b == 0) {
            break;
        }
        let off = u32::from_le_bytes([e[16], e[17], e[18], e[19]]) as usize;
        let len = u32::from_le_bytes([e[20], e[21], e[22], e[23]]) as usize;
        let data = off
            .checked_add(len)
            .and_then(|end| table.get(off..end))
            .ok_or_else(|| bad(format!("entry {i} points outside the table")))?;
        let g = guid_string(guid);
        let name = match g.as_str() {
            GUID_ARK => "ARK",
            GUID_ASK => "ASK",
            GUID_VCEK => "VCEK",
            GUID_VLEK => "VLEK",
            GUID_CRL => "CRL",
            _ => continue,
        };
        parsed = parsed.saturating_add(data.len());
        if parsed > MAX_TABLE_BYTES {
            return Err(bad(format!(
                "its entries hold more than {MAX_TABLE_BYTES} bytes in all"
            )));
        }
        out.add_blob(&format!("cert table {name} entry"), data, true)
            .map_err(|e| bad(e.to_string()))?;
        if out.certs.len() + out.crls.len() > MAX_TABLE_ITEMS {
            return Err(bad(format!(
                "more than {MAX_TABLE_ITEMS} certificates and CRLs"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trip_and_bounds() {
        let s = super::super::certs::TrustStore::builtin().unwrap();
        let ark = &s.anchors[0].ark.der;
        let ask = &s.intermediates[0].cert.der;
        let t = encode_cert_table(&[("ask", ask), ("ark", ark), ("other", b"")]);
        // The unknown kind is encoded as CRL: an empty CRL is an error.
        assert!(parse_cert_table(&t).is_err());
        let t = encode_cert_table(&[("ask", ask), ("ark", ark)]);
        let c = parse_cert_table(&t).unwrap();
        assert_eq!(c.certs.len(), 2);
        assert_eq!(c.certs[0].der, *ask);
        // Truncated: the second blob runs past the end.
        assert!(parse_cert_table(&t[..t.len() - 1]).is_err());
        // No terminator.
        assert!(parse_cert_table(&t[..30]).is_err());
    }

    /// The detail of a `Malformed` refusal.
    fn malformed(r: Result<Collateral, Error>) -> String {
        match r {
            Err(Error::Refused(m)) if m.kind == Malformed => m.detail,
            Err(e) => panic!("expected a malformed refusal, got {e}"),
            Ok(_) => panic!("expected a malformed refusal, the table was accepted"),
        }
    }

    /// A table whose entries all point at the same blob (`n` entries of `guid`).
    fn overlapping(guid: &str, n: usize, blob: &[u8]) -> Vec<u8> {
        let header = (n + 1) * 24;
        let mut t = Vec::new();
        for _ in 0..n {
            t.extend(hex::decode(guid.replace('-', "")).unwrap());
            t.extend((header as u32).to_le_bytes());
            t.extend((blob.len() as u32).to_le_bytes());
        }
        t.extend([0u8; 24]);
        t.extend_from_slice(blob);
        t
    }

    #[test]
    fn tables_are_bounded_before_their_certificates_are_used() {
        // Real AMD certificates (the built-in Milan ASK), repeated: each certificate a node
        // sends can cost the CA an RSA-4096 signature check, so a table holds few.
        let s = super::super::certs::TrustStore::builtin().unwrap();
        let ask = s.intermediates[0].cert.der.clone();
        let fine = encode_cert_table(&vec![("ask", ask.as_slice()); MAX_TABLE_ITEMS]);
        assert_eq!(
            parse_cert_table(&fine).unwrap().certs.len(),
            MAX_TABLE_ITEMS
        );
        let many = encode_cert_table(&vec![("ask", ask.as_slice()); MAX_TABLE_ITEMS + 1]);
        assert_eq!(
            malformed(parse_cert_table(&many)),
            "malformed certificate table: more than 16 certificates and CRLs"
        );
        // The same certificate behind every entry counts once per entry.
        assert_eq!(
            malformed(parse_cert_table(&overlapping(GUID_ASK, 40, &ask))),
            "malformed certificate table: more than 16 certificates and CRLs"
        );
        // A large table is refused before any entry is parsed.
        let mut big = encode_cert_table(&[("ask", ask.as_slice())]);
        big.resize(MAX_TABLE_BYTES + 1, 0);
        assert_eq!(
            malformed(parse_cert_table(&big)),
            "malformed certificate table: 65537 bytes, more than 65536"
        );
        // Overlapping entries that add nothing still count their bytes: a 10 KiB PEM block
        // of another type behind 7 entries is 70 KiB of parsing.
        let pem = ::pem::encode(&::pem::Pem::new("OTHER", vec![0x42u8; 7 * 1024]));
        assert!(pem.len() > 9 * 1024 && pem.len() < MAX_TABLE_BYTES / 6);
        assert!(parse_cert_table(&overlapping(GUID_CRL, 6, pem.as_bytes()))
            .unwrap()
            .certs
            .is_empty());
        assert_eq!(
            malformed(parse_cert_table(&overlapping(GUID_CRL, 7, pem.as_bytes()))),
            "malformed certificate table: its entries hold more than 65536 bytes in all"
        );
    }
}
