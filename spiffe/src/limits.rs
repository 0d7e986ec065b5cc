//! Bounds on what a caller may ask for that both sides of the node API enforce: the
//! agent at its Workload API (so a workload is refused before anything is minted) and
//! the server at its node API (so a modified agent gets no further). The server's other
//! bounds live in `ztid_ca::limits`; the README's "Limits" section lists them all.
//!
//! Values: what a demanding SPIRE deployment needs, with room; every one is far below
//! what made a 2.7 MB JWT-SVID and a 2 MB audit record possible.

use std::fmt;

/// Most audiences in one JWT-SVID request (after empty ones are dropped and duplicates
/// merged). A JWT-SVID is meant for one relying party; SPIRE's tooling sends one.
pub const MAX_JWT_AUDIENCES: usize = 16;
/// Longest audience, bytes. Audiences are URLs or service names.
pub const MAX_JWT_AUDIENCE_BYTES: usize = 512;
/// Distinct JWT-SVIDs one workload instance may have minted per minute (cache misses:
/// a new audience set, or one whose token passed half its lifetime). Each mint is an
/// HSM signature and an audit record, so this bounds how fast one workload can grow the
/// audit log; reuse of a cached token costs nothing and is not counted.
pub const MAX_JWT_MINTS_PER_INSTANCE_PER_MINUTE: usize = 60;
/// Most JWT-SVIDs the agent keeps cached per workload instance; expired ones go first,
/// then the oldest.
pub const MAX_JWT_CACHE_PER_INSTANCE: usize = 256;

/// A bound that a request exceeds: what, the limit, and what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// What is bounded ("JWT audiences", "audience length").
    pub what: &'static str,
    /// The bound.
    pub limit: usize,
    /// What the request had.
    pub got: usize,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exceeds the limit: {} given, at most {} allowed",
            self.what, self.got, self.limit
        )
    }
}

impl std::error::Error for Exceeded {}

/// Fails when `got > limit`.
pub fn at_most(what: &'static str, got: usize, limit: usize) -> Result<(), Exceeded> {
    if got > limit {
        Err(Exceeded { what, limit, got })
    } else {
        Ok(())
    }
}

/// Why a JWT-SVID audience list is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudienceError {
    /// No non-empty audience.
    Missing,
    /// Too many, or one too long.
    TooLarge(Exceeded),
    /// An audience holds a control character (they would be escaped six-fold in the
    /// token and are never part of a URL or a service name).
    ControlCharacter,
}

impl fmt::Display for AudienceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AudienceError::Missing => f.write_str("audience must be specified"),
            AudienceError::TooLarge(e) => e.fmt(f),
            AudienceError::ControlCharacter => {
                f.write_str("an audience contains a control character")
            }
        }
    }
}

impl std::error::Error for AudienceError {}

/// Normalises a requested audience list (empty entries dropped, sorted, duplicates
/// merged) and checks it against the bounds. The raw list is bounded too, so a request
/// of 20,000 copies of one audience is refused rather than sorted.
pub fn normalize_audiences(raw: &[String]) -> Result<Vec<String>, AudienceError> {
    // Four times the bound leaves room for clients that repeat or pad the list.
    at_most("JWT audiences (raw)", raw.len(), 4 * MAX_JWT_AUDIENCES)
        .map_err(AudienceError::TooLarge)?;
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for a in raw.iter().filter(|a| !a.is_empty()) {
        at_most(
            "JWT audience length (bytes)",
            a.len(),
            MAX_JWT_AUDIENCE_BYTES,
        )
        .map_err(AudienceError::TooLarge)?;
        if a.chars().any(char::is_control) {
            return Err(AudienceError::ControlCharacter);
        }
        out.push(a.clone());
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(AudienceError::Missing);
    }
    at_most("JWT audiences", out.len(), MAX_JWT_AUDIENCES).map_err(AudienceError::TooLarge)?;
    Ok(out)
}

/// Checks one audience given to `ValidateJWTSVID`.
pub fn check_validation_audience(audience: &str) -> Result<(), AudienceError> {
    if audience.is_empty() {
        return Err(AudienceError::Missing);
    }
    at_most(
        "JWT audience length (bytes)",
        audience.len(),
        MAX_JWT_AUDIENCE_BYTES,
    )
    .map_err(AudienceError::TooLarge)?;
    if audience.chars().any(char::is_control) {
        return Err(AudienceError::ControlCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn audiences_are_normalised_and_bounded() {
        assert_eq!(
            normalize_audiences(&s(&["b", "", "a", "b"])).unwrap(),
            s(&["a", "b"])
        );
        assert_eq!(
            normalize_audiences(&s(&["", ""])),
            Err(AudienceError::Missing)
        );
        let many: Vec<String> = (0..17).map(|i| format!("aud{i}")).collect();
        assert!(matches!(
            normalize_audiences(&many),
            Err(AudienceError::TooLarge(Exceeded {
                limit: 16,
                got: 17,
                ..
            }))
        ));
        let long = vec!["x".repeat(MAX_JWT_AUDIENCE_BYTES + 1)];
        assert!(matches!(
            normalize_audiences(&long),
            Err(AudienceError::TooLarge(_))
        ));
        assert_eq!(
            normalize_audiences(&s(&["a\u{7}"])),
            Err(AudienceError::ControlCharacter)
        );
        // Duplicates within the raw bound are merged, beyond it refused unsorted.
        assert_eq!(
            normalize_audiences(&vec!["a".into(); 64]).unwrap(),
            s(&["a"])
        );
        assert!(normalize_audiences(&vec!["a".into(); 20_000]).is_err());
    }
}
