//! The CA-side settings of the method: `[attestors.tpm]` read into a [`TpmPolicy`]
//! (trusted EK CAs, allowed EKs, the PCRs to quote, PCR policies, uncertified EKs), and
//! the PCR policy check on quoted values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ztid_attestation::tpm::refused;
use ztid_attestation::Error;
use ztid_attestation::RefusalKind::PolicyMismatch;

use super::ekcert::EkCaStore;
use super::DEFAULT_PCRS;

/// Expected PCR values for some nodes.
#[derive(Debug, Clone)]
pub struct PcrPolicy {
    /// Its name (an EK hash or an alias).
    pub name: String,
    /// Node ids it applies to; `None` = every node.
    pub nodes: Option<BTreeSet<String>>,
    /// Allowed values per PCR.
    pub expected: BTreeMap<u8, Vec<Vec<u8>>>,
}

/// The CA-side settings of the method.
#[derive(Debug, Clone)]
pub struct TpmPolicy {
    /// Trusted manufacturer CAs.
    pub ek_cas: EkCaStore,
    /// If set, only these node ids.
    pub allowed_ek_hashes: Option<BTreeSet<String>>,
    /// PCRs to quote.
    pub pcrs: BTreeSet<u8>,
    /// PCR policies.
    pub pcr_policies: Vec<PcrPolicy>,
    /// Accept an EK without a certificate (`uncertified_ek = "svsm-bound"`): such a node
    /// is marked `tpm:ek-cert:none` and only ever attested inside a multi-factor attempt
    /// whose SEV-SNP report names this EK as its SVSM vTPM's.
    pub uncertified_ek: bool,
}

fn is_ek_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn pcr_value(v: &toml::Value, what: &str) -> Result<Vec<u8>, Error> {
    let s = v
        .as_str()
        .ok_or_else(|| Error::Config(format!("{what}: expected a hex string")))?;
    let b = hex::decode(s.trim()).map_err(|e| Error::Config(format!("{what}: {e}")))?;
    if b.len() != 32 {
        return Err(Error::Config(format!(
            "{what}: a sha256 PCR value is 32 bytes (64 hex digits)"
        )));
    }
    Ok(b)
}

impl TpmPolicy {
    /// Reads `[attestors.tpm]`; `ek_ca_override` replaces `ek_ca_dir`.
    pub fn from_table(config: &toml::Table, ek_ca_override: Option<&Path>) -> Result<Self, Error> {
        const T: &str = "[attestors.tpm]";
        for k in config.keys() {
            if !matches!(
                k.as_str(),
                "ek_ca_dir" | "allowed_ek_hashes" | "pcrs" | "pcr_policy" | "uncertified_ek"
            ) {
                return Err(Error::Config(format!(
                    "unknown key {k:?} in {T} (known: ek_ca_dir, allowed_ek_hashes, pcrs, pcr_policy, uncertified_ek)"
                )));
            }
        }
        let uncertified_ek = match config.get("uncertified_ek") {
            None => false,
            Some(toml::Value::String(v)) if v == "svsm-bound" => true,
            Some(_) => {
                return Err(Error::Config(format!(
                    "{T} uncertified_ek takes only \"svsm-bound\" (an EK without certificate is accepted only when an SEV-SNP report binds it)"
                )))
            }
        };
        let dir: Option<PathBuf> = match ek_ca_override {
            Some(d) => Some(d.to_path_buf()),
            None => config
                .get("ek_ca_dir")
                .map(|v| {
                    v.as_str()
                        .map(PathBuf::from)
                        .ok_or_else(|| Error::Config(format!("{T} ek_ca_dir must be a string")))
                })
                .transpose()?,
        };
        // An all-SVSM fleet has no manufacturer CA to trust: its EKs are vouched for by
        // SEV-SNP reports only.
        let ek_cas = match dir {
            Some(d) => EkCaStore::load_dir(&d)?,
            None if uncertified_ek => EkCaStore::default(),
            None => {
                return Err(Error::Config(format!(
                    "{T} needs ek_ca_dir, the directory of the TPM manufacturers' CA certificates that EK certificates must chain to: pass --tpm-ek-ca DIR to `ztid-server run` (or set ek_ca_dir in {T}; uncertified_ek = \"svsm-bound\" where SEV-SNP reports vouch for every EK)"
                )))
            }
        };
        let allowed_ek_hashes = match config.get("allowed_ek_hashes") {
            None => None,
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    Error::Config(format!("{T} allowed_ek_hashes must be an array of strings"))
                })?;
                let mut set = BTreeSet::new();
                for h in arr {
                    let h = h.as_str().filter(|h| is_ek_hash(h)).ok_or_else(|| {
                        Error::Config(format!(
                            "{T} allowed_ek_hashes: each entry is 64 hex digits (SHA-256 of the EK public key)"
                        ))
                    })?;
                    set.insert(h.to_ascii_lowercase());
                }
                Some(set)
            }
        };
        let pcrs: BTreeSet<u8> = match config.get("pcrs") {
            None => DEFAULT_PCRS.into_iter().collect(),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| Error::Config(format!("{T} pcrs must be an array")))?;
                let mut set = BTreeSet::new();
                for p in arr {
                    let p = p
                        .as_integer()
                        .filter(|p| (0..24).contains(p))
                        .ok_or_else(|| Error::Config(format!("{T} pcrs: indices are 0-23")))?;
                    set.insert(p as u8);
                }
                if set.is_empty() {
                    return Err(Error::Config(format!("{T} pcrs must not be empty")));
                }
                set
            }
        };
        let mut pcr_policies = Vec::new();
        if let Some(v) = config.get("pcr_policy") {
            let t = v
                .as_table()
                .ok_or_else(|| Error::Config(format!("{T} pcr_policy must be a table")))?;
            for (name, p) in t {
                let what = format!("{T} pcr_policy.{name}");
                let p = p
                    .as_table()
                    .ok_or_else(|| Error::Config(format!("{what} must be a table")))?;
                for k in p.keys() {
                    if !matches!(k.as_str(), "ek_hashes" | "pcrs") {
                        return Err(Error::Config(format!(
                            "unknown key {k:?} in {what} (known: ek_hashes, pcrs)"
                        )));
                    }
                }
                let nodes = match p.get("ek_hashes") {
                    None if is_ek_hash(name) => Some([name.to_ascii_lowercase()].into()),
                    None => {
                        return Err(Error::Config(format!(
                            "{what} needs ek_hashes (or name the policy by an EK hash)"
                        )))
                    }
                    Some(v) => {
                        let arr = v.as_array().ok_or_else(|| {
                            Error::Config(format!("{what}.ek_hashes must be an array"))
                        })?;
                        let mut set = BTreeSet::new();
                        let mut all = false;
                        for h in arr {
                            match h.as_str() {
                                Some("*") => all = true,
                                Some(h) if is_ek_hash(h) => {
                                    set.insert(h.to_ascii_lowercase());
                                }
                                _ => {
                                    return Err(Error::Config(format!(
                                        "{what}.ek_hashes: each entry is \"*\" or 64 hex digits"
                                    )))
                                }
                            }
                        }
                        (!all).then_some(set)
                    }
                };
                let pt = p
                    .get("pcrs")
                    .and_then(|v| v.as_table())
                    .ok_or_else(|| Error::Config(format!("{what} needs a pcrs table")))?;
                let mut expected = BTreeMap::new();
                for (idx, vals) in pt {
                    let i: u8 = idx.parse().ok().filter(|i| *i < 24).ok_or_else(|| {
                        Error::Config(format!("{what}.pcrs: {idx:?} is not a PCR index 0-23"))
                    })?;
                    if !pcrs.contains(&i) {
                        return Err(Error::Config(format!(
                            "{what} names PCR {i}, which is not in {T} pcrs (it would never be quoted)"
                        )));
                    }
                    let w = format!("{what}.pcrs.{i}");
                    let list = match vals {
                        toml::Value::Array(a) => a
                            .iter()
                            .map(|v| pcr_value(v, &w))
                            .collect::<Result<Vec<_>, _>>()?,
                        v => vec![pcr_value(v, &w)?],
                    };
                    if list.is_empty() {
                        return Err(Error::Config(format!("{w} allows no value")));
                    }
                    expected.insert(i, list);
                }
                pcr_policies.push(PcrPolicy {
                    name: name.clone(),
                    nodes,
                    expected,
                });
            }
        }
        Ok(Self {
            ek_cas,
            allowed_ek_hashes,
            pcrs,
            pcr_policies,
            uncertified_ek,
        })
    }

    /// Checks the PCR policies that apply to `node_id`; returns their names, or a refusal
    /// naming every PCR that failed.
    pub fn check_pcrs(
        &self,
        node_id: &str,
        values: &BTreeMap<u8, Vec<u8>>,
    ) -> Result<Vec<String>, Error> {
        let mut applied = Vec::new();
        let mut failures = Vec::new();
        for p in &self.pcr_policies {
            if let Some(nodes) = &p.nodes {
                if !nodes.contains(node_id) {
                    continue;
                }
            }
            applied.push(p.name.clone());
            for (i, allowed) in &p.expected {
                match values.get(i) {
                    None => failures.push(format!("PCR {i} was not quoted (policy {})", p.name)),
                    Some(v) if allowed.iter().any(|a| a == v) => {}
                    Some(v) => failures.push(format!(
                        "PCR {i} is {} but policy {} allows {}",
                        hex::encode(v),
                        p.name,
                        allowed
                            .iter()
                            .map(hex::encode)
                            .collect::<Vec<_>>()
                            .join(" or ")
                    )),
                }
            }
        }
        if failures.is_empty() {
            Ok(applied)
        } else {
            Err(refused(
                PolicyMismatch,
                format!("PCR policy not met: {}", failures.join("; ")),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Test TPM CA");
        std::fs::write(d.path().join("ca.pem"), p.self_signed(&key).unwrap().pem()).unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        d
    }

    fn table(dir: &Path, extra: &str) -> toml::Table {
        toml::from_str(&format!(
            "ek_ca_dir = {:?}\n{extra}",
            dir.display().to_string()
        ))
        .unwrap()
    }

    fn config_err(dir: &Path, extra: &str) -> String {
        match TpmPolicy::from_table(&table(dir, extra), None) {
            Err(Error::Config(s)) => s,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("config accepted: {extra}"),
        }
    }

    #[test]
    fn config_is_checked() {
        let d = ca_dir();
        let p = TpmPolicy::from_table(&table(d.path(), ""), None).unwrap();
        assert_eq!(p.ek_cas.len(), 1);
        assert_eq!(p.pcrs, DEFAULT_PCRS.into_iter().collect());
        assert!(p.allowed_ek_hashes.is_none());
        let h = "ab".repeat(32);
        let z = "00".repeat(32);
        assert!(config_err(d.path(), "pcr = [1]").contains("unknown key \"pcr\""));
        assert!(config_err(d.path(), "pcrs = [24]").contains("indices are 0-23"));
        assert!(config_err(d.path(), "pcrs = []").contains("must not be empty"));
        assert!(config_err(d.path(), "allowed_ek_hashes = [\"xyz\"]").contains("64 hex digits"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.web]\npcrs = {{ 7 = \"{z}\" }}")
        )
        .contains("pcr_policy.web needs ek_hashes"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.{h}]\npcrs = {{ 9 = \"{z}\" }}")
        )
        .contains("names PCR 9, which is not in [attestors.tpm] pcrs"));
        assert!(config_err(
            d.path(),
            &format!("[pcr_policy.{h}]\npcrs = {{ 7 = \"00\" }}")
        )
        .contains("32 bytes"));
        let empty = tempfile::tempdir().unwrap();
        assert!(config_err(empty.path(), "").contains("holds no certificate"));
        assert!(matches!(
            TpmPolicy::from_table(&toml::Table::new(), None),
            Err(Error::Config(s)) if s.contains("needs ek_ca_dir")
        ));
        // An all-SVSM fleet: no manufacturer CA, EKs only bound by SEV-SNP reports.
        let svsm: toml::Table = toml::from_str("uncertified_ek = \"svsm-bound\"").unwrap();
        let p = TpmPolicy::from_table(&svsm, None).unwrap();
        assert!(p.uncertified_ek && p.ek_cas.is_empty());
        assert!(config_err(d.path(), "uncertified_ek = true").contains("takes only \"svsm-bound\""));
        // The override (evidence verify --collateral) replaces the configured directory.
        assert!(TpmPolicy::from_table(&table(empty.path(), ""), Some(d.path())).is_ok());
    }

    #[test]
    fn pcr_policies_apply_by_node_and_name_every_failure() {
        let d = ca_dir();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let (z, o) = ("00".repeat(32), "11".repeat(32));
        let p = TpmPolicy::from_table(
            &table(
                d.path(),
                &format!(
                    "[pcr_policy.{a}]\npcrs = {{ 7 = \"{z}\" }}\n\
                     [pcr_policy.fleet]\nek_hashes = [\"*\"]\npcrs = {{ 0 = [\"{o}\", \"{z}\"], 1 = \"{z}\" }}\n"
                ),
            ),
            None,
        )
        .unwrap();
        let vals = |v0: &str, v1: &str, v7: &str| -> BTreeMap<u8, Vec<u8>> {
            [(0u8, v0), (1, v1), (7, v7)]
                .into_iter()
                .map(|(i, h)| (i, hex::decode(h).unwrap()))
                .collect()
        };
        assert_eq!(
            p.check_pcrs(&a, &vals(&o, &z, &z)).unwrap(),
            vec![a.clone(), "fleet".to_string()]
        );
        // Node b is only under the fleet policy.
        assert_eq!(
            p.check_pcrs(&b, &vals(&z, &z, &o)).unwrap(),
            vec!["fleet".to_string()]
        );
        match p.check_pcrs(&a, &vals(&z, &o, &o)) {
            Err(Error::Refused(r)) => assert_eq!(
                (r.kind, r.detail),
                (
                    PolicyMismatch,
                    format!(
                        "PCR policy not met: PCR 7 is {o} but policy {a} allows {z}; \
                         PCR 1 is {o} but policy fleet allows {z}"
                    )
                )
            ),
            other => panic!("{other:?}"),
        }
    }
}
