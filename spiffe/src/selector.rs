//! Selectors: the facts attestation proved about a node or a workload, as
//! `TYPE:KEY:VALUE` strings (`unix:uid:1000`, `tpm:ek-hash:ab12…`). Registration
//! entries name the selectors a caller must have; a [`Selector`] is valid once built.

use std::fmt;

use crate::Error;

/// What an entry may require, and what each key's value must look like.
/// Anything not listed here is refused at `entry create`, so a typo can never
/// produce an entry that silently matches nothing (or everything).
const KNOWN: &[(&str, &str, ValueKind)] = &[
    ("unix", "uid", ValueKind::Number),
    ("unix", "gid", ValueKind::Number),
    ("unix", "user", ValueKind::Name),
    ("unix", "group", ValueKind::Name),
    ("unix", "path", ValueKind::AbsolutePath),
    ("unix", "sha256", ValueKind::Sha256),
    ("join-token", "used", ValueKind::Empty),
    ("join-token", "id", ValueKind::Name),
    ("tpm", "ek-hash", ValueKind::Sha256),
    ("tpm", "pcr", ValueKind::Any),
    ("tpm", "manufacturer", ValueKind::Any),
    ("tpm", "ek-issuer", ValueKind::Any),
    ("tpm", "ek-cert", ValueKind::Name),
    ("sev-snp", "measurement", ValueKind::Hex),
    ("sev-snp", "policy", ValueKind::Any),
    ("sev-snp", "host-data", ValueKind::Hex),
    ("sev-snp", "chip-id", ValueKind::Hex),
    ("sev-snp", "vtpm-ek-hash", ValueKind::Sha256),
    ("tdx", "mrtd", ValueKind::Hex),
    ("tdx", "rtmr0", ValueKind::Hex),
    ("tdx", "rtmr1", ValueKind::Hex),
    ("tdx", "rtmr2", ValueKind::Hex),
    ("tdx", "rtmr3", ValueKind::Hex),
    ("tdx", "mrconfigid", ValueKind::Hex),
    ("multi", "method", ValueKind::Name),
    // Workload selectors from container and systemd attestation (agent/src/container).
    ("container", "id", ValueKind::Name),
    ("container", "name", ValueKind::Name),
    ("container", "image-id", ValueKind::Any),
    ("container", "image", ValueKind::Any),
    ("container", "label", ValueKind::Any),
    ("container", "runtime", ValueKind::Name),
    ("k8s", "ns", ValueKind::Name),
    ("k8s", "pod-name", ValueKind::Name),
    ("k8s", "pod-uid", ValueKind::Name),
    ("k8s", "container-name", ValueKind::Name),
    ("systemd", "unit", ValueKind::Any),
];

/// Selector types a workload's attestation gives (the rest come from node attestation).
const WORKLOAD_KINDS: &[&str] = &["unix", "container", "k8s", "systemd"];

#[derive(Clone, Copy)]
enum ValueKind {
    Number,
    Name,
    AbsolutePath,
    Sha256,
    Hex,
    Empty,
    Any,
}

impl ValueKind {
    fn accepts(self, v: &str) -> bool {
        match self {
            ValueKind::Number => {
                !v.is_empty()
                    && v.len() <= 10
                    && v.bytes().all(|b| b.is_ascii_digit())
                    && v.parse::<u32>().is_ok()
            }
            ValueKind::Name => {
                !v.is_empty()
                    && v.len() <= 256
                    && v.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            }
            ValueKind::AbsolutePath => v.starts_with('/') && v.len() <= 4096 && !v.contains('\0'),
            ValueKind::Sha256 => {
                v.len() == 64
                    && v.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            ValueKind::Hex => {
                !v.is_empty()
                    && v.len().is_multiple_of(2)
                    && v.len() <= 512
                    && v.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            }
            ValueKind::Empty => v.is_empty(),
            ValueKind::Any => !v.is_empty() && v.len() <= 1024 && !v.contains('\0'),
        }
    }
}

/// One selector, `TYPE:KEY[:VALUE]`; the type and key are checked against the known set.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type (`unix`) and value (`uid:1000`), checking both.
    pub fn new(kind: &str, value: &str) -> Result<Self, Error> {
        let (key, rest) = match value.split_once(':') {
            Some((k, r)) => (k, r),
            None => (value, ""),
        };
        let Some((_, _, vk)) = KNOWN.iter().find(|(t, k, _)| *t == kind && *k == key) else {
            if KNOWN.iter().any(|(t, _, _)| *t == kind) {
                return Err(Error::InvalidSelector(format!(
                    "unknown key {key:?} for selector type {kind:?}"
                )));
            }
            return Err(Error::InvalidSelector(format!(
                "unknown selector type {kind:?}"
            )));
        };
        if !vk.accepts(rest) {
            return Err(Error::InvalidSelector(format!(
                "bad value {rest:?} for selector {kind}:{key}"
            )));
        }
        Ok(Self {
            kind: kind.to_string(),
            value: value.to_string(),
        })
    }

    /// Parses `TYPE:KEY:VALUE` as written on the command line.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| Error::InvalidSelector(format!("{s:?} is not TYPE:VALUE")))?;
        Self::new(kind, value)
    }

    /// The selector type (`unix`, `tpm`, ...).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value after the type (`uid:1000`).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why this selector, valid in form, is spelled other than attestation spells it, so
    /// that an entry requiring it would match no caller: a number with a leading zero
    /// (`unix:uid:01000`, where the agent gives `unix:uid:1000`), or a path with an empty,
    /// `.` or `..` segment or a trailing slash (the kernel's `/proc/PID/exe` has none).
    /// `None` when it is canonical. Checked where entries are made, not when a selector
    /// is read (stored entries and synced ones keep loading, matching nothing as before).
    pub fn non_canonical(&self) -> Option<String> {
        let (key, rest) = self
            .value
            .split_once(':')
            .unwrap_or((self.value.as_str(), ""));
        let (_, _, kind) = KNOWN
            .iter()
            .find(|(t, k, _)| *t == self.kind && *k == key)?;
        match kind {
            ValueKind::Number if rest.len() > 1 && rest.starts_with('0') => {
                let n = rest.parse::<u32>().ok()?;
                Some(format!(
                    "{rest:?} has a leading zero, so no caller matches it: attestation gives {}:{key}:{n}",
                    self.kind
                ))
            }
            ValueKind::AbsolutePath if rest != "/" && rest.ends_with('/') => Some(format!(
                "{rest:?} has a trailing slash, so no caller matches it: attestation gives the path of the executable file"
            )),
            ValueKind::AbsolutePath
                if rest != "/"
                    && rest
                        .split('/')
                    .skip(1)
                    .any(|seg| seg.is_empty() || seg == "." || seg == "..") =>
            {
                Some(format!(
                    "{rest:?} has an empty, '.' or '..' segment, so no caller matches it: attestation gives the path as the kernel resolves it"
                ))
            }
            _ => None,
        }
    }

    /// True for selectors that describe nodes rather than workloads.
    pub fn is_node_selector(&self) -> bool {
        !WORKLOAD_KINDS.contains(&self.kind.as_str())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl TryFrom<String> for Selector {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::parse(&s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> String {
        s.to_string()
    }
}

impl From<&Selector> for ztid_proto::node::Selector {
    fn from(s: &Selector) -> Self {
        ztid_proto::node::Selector {
            r#type: s.kind.clone(),
            value: s.value.clone(),
        }
    }
}

impl TryFrom<&ztid_proto::node::Selector> for Selector {
    type Error = Error;
    fn try_from(s: &ztid_proto::node::Selector) -> Result<Self, Error> {
        Self::new(&s.r#type, &s.value)
    }
}

/// True when `have` contains every selector of `need` (an entry matches a caller).
pub fn satisfies(have: &[Selector], need: &[Selector]) -> bool {
    !need.is_empty() && need.iter().all(|n| have.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_selectors() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert!(Selector::parse("unix:path:/usr/bin/python3").is_ok());
        assert!(Selector::parse(&format!("unix:sha256:{}", "ab".repeat(32))).is_ok());
        assert!(Selector::parse("join-token:used").is_ok());
        assert!(!Selector::parse("unix:uid:0").unwrap().is_node_selector());
        assert!(Selector::parse("join-token:used")
            .unwrap()
            .is_node_selector());
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        let err = |s: &str| Selector::parse(s).unwrap_err().to_string();
        assert!(err("kube:ns:default").contains("unknown selector type \"kube\""));
        assert!(!Selector::parse("k8s:ns:default")
            .unwrap()
            .is_node_selector());
        assert!(!Selector::parse("container:label:app:one")
            .unwrap()
            .is_node_selector());
        assert!(err("unix:pid:5").contains("unknown key \"pid\""));
        assert!(err("unix:uid:abc").contains("bad value"));
        assert!(err("unix:uid:99999999999").contains("bad value"));
        assert!(err("unix:path:relative").contains("bad value"));
        assert!(err("unix:sha256:XYZ").contains("bad value"));
        assert!(err("nocolon").contains("not TYPE:VALUE"));
    }

    #[test]
    fn non_canonical_spellings_are_named() {
        let why = |s: &str| Selector::parse(s).unwrap().non_canonical();
        for ok in [
            "unix:uid:0",
            "unix:uid:1000",
            "unix:path:/",
            "unix:path:/usr/bin/python3",
            "unix:path:/opt/.hidden/x",
            "unix:user:root",
            "join-token:used",
        ] {
            assert_eq!(why(ok), None, "{ok}");
        }
        assert!(why("unix:uid:01000").unwrap().contains("unix:uid:1000"));
        assert!(why("unix:gid:000").unwrap().contains("unix:gid:0"));
        for bad in [
            "unix:path:/usr//bin/x",
            "unix:path:/usr/./bin/x",
            "unix:path:/usr/../bin/x",
            "unix:path:/usr/bin/",
        ] {
            assert!(why(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn subset_matching() {
        let have: Vec<_> = ["unix:uid:1", "unix:gid:2"]
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        assert!(satisfies(&have, &have[..1]));
        assert!(!satisfies(&have, &[Selector::parse("unix:uid:3").unwrap()]));
        assert!(
            !satisfies(&have, &[]),
            "an entry without selectors matches nobody"
        );
    }
}
