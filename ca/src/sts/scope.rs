//! Scope sets (RFC 6749 §3.3): space-delimited tokens of printable ASCII without `"`
//! and `\`, bounded in count and size, kept sorted so their text form is canonical.
//!
//! Uses only `super::{error, scope, chain, token}` and external crates, never `crate::`:
//! fuzz/fuzz_targets/sts_request.rs includes these files by path.

use std::collections::BTreeSet;
use std::fmt;

use super::error::{OAuthError, OAuthErrorCode};

/// Most scopes one request, grant or token may name.
pub const MAX_SCOPES: usize = 64;
/// Longest single scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Longest `scope` parameter, in bytes.
pub const MAX_SCOPE_TEXT_LEN: usize = 4096;

/// A set of scopes, each valid per RFC 6749 §3.3 (`1*NQCHAR`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scopes(BTreeSet<String>);

fn invalid_scope(description: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidScope, description)
}

/// `NQCHAR = %x21 / %x23-5B / %x5D-7E`.
fn is_nqchar(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E)
}

fn check_scope(scope: &str) -> Result<(), OAuthError> {
    if scope.is_empty() {
        return Err(invalid_scope("a scope is empty"));
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(invalid_scope(format!(
            "a scope is longer than {MAX_SCOPE_LEN} bytes"
        )));
    }
    if !scope.bytes().all(is_nqchar) {
        // The scope itself may hold anything; describe it, do not echo it.
        return Err(invalid_scope(
            "a scope holds a character RFC 6749 does not allow (printable ASCII except space, '\"' and '\\')",
        ));
    }
    Ok(())
}

impl Scopes {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a `scope` parameter: scopes separated by single spaces (RFC 6749 §3.3).
    /// The empty string is the empty set. Anything malformed is `invalid_scope`.
    pub fn parse(s: &str) -> Result<Scopes, OAuthError> {
        if s.len() > MAX_SCOPE_TEXT_LEN {
            return Err(invalid_scope(format!(
                "scope is longer than {MAX_SCOPE_TEXT_LEN} bytes"
            )));
        }
        if s.is_empty() {
            return Ok(Scopes::new());
        }
        // `split(' ')` keeps empty pieces, so doubled, leading or trailing spaces are
        // refused by check_scope: the RFC's grammar has exactly one space between scopes.
        Self::from_iter(s.split(' ').map(str::to_string))
    }

    /// A set from individual scopes, each validated; duplicates collapse.
    #[allow(
        clippy::should_implement_trait,
        reason = "fallible, unlike FromIterator"
    )]
    pub fn from_iter<I: IntoIterator<Item = String>>(scopes: I) -> Result<Scopes, OAuthError> {
        let mut set = BTreeSet::new();
        for scope in scopes {
            check_scope(&scope)?;
            set.insert(scope);
            if set.len() > MAX_SCOPES {
                return Err(invalid_scope(format!("more than {MAX_SCOPES} scopes")));
            }
        }
        Ok(Scopes(set))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(String::as_str)
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes in both sets.
    pub fn intersection(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.intersection(&other.0).cloned().collect())
    }

    /// The scopes, sorted.
    pub fn to_vec(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

impl fmt::Display for Scopes {
    /// Space-separated and sorted: the `scope` claim and response field.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_can_hold_no_more_scope_text_than_a_request_may_carry() {
        assert_eq!(
            MAX_SCOPE_TEXT_LEN,
            crate::core::grants::MAX_SCOPE_TEXT_BYTES
        );
    }

    fn refused(s: &str) -> OAuthError {
        Scopes::parse(s).unwrap_err()
    }

    #[test]
    fn parses_sorts_and_prints() {
        let s = Scopes::parse("tools.write tools.read tools.read").unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.contains("tools.read"));
        assert_eq!(s.to_string(), "tools.read tools.write");
        assert_eq!(s.to_vec(), vec!["tools.read", "tools.write"]);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec!["tools.read", "tools.write"]
        );
        assert!(Scopes::parse("").unwrap().is_empty());
        assert_eq!(Scopes::parse("").unwrap().to_string(), "");
        // Every NQCHAR edge is accepted.
        assert!(Scopes::parse("!#[]~ a:b/c").is_ok());
    }

    #[test]
    fn refuses_malformed_scopes() {
        for bad in ["a  b", " a", "a ", "a\"b", "a\\b", "a\tb", "é", "a\u{7f}"] {
            let e = refused(bad);
            assert_eq!(e.code, OAuthErrorCode::InvalidScope, "{bad:?}");
        }
        assert!(refused("a  b").description.contains("empty"));
        assert!(refused("a\"b").description.contains("character"));
        let long = "x".repeat(MAX_SCOPE_LEN + 1);
        assert!(refused(&long).description.contains("longer than 128"));
        assert!(Scopes::parse(&"x".repeat(MAX_SCOPE_LEN)).is_ok());
        let many: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        let e = refused(&many.join(" "));
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(e.description.contains("more than 64 scopes"));
        assert!(Scopes::parse(&many[..MAX_SCOPES].join(" ")).is_ok());
        let huge = vec!["y".repeat(100); 41].join(" ");
        assert!(refused(&huge).description.contains("longer than 4096"));
    }

    #[test]
    fn from_iter_validates_each() {
        assert!(Scopes::from_iter(["a".to_string(), "b".to_string()]).is_ok());
        let e = Scopes::from_iter(["a b".to_string()]).unwrap_err();
        assert_eq!(e.code, OAuthErrorCode::InvalidScope);
        assert!(Scopes::from_iter([String::new()]).is_err());
    }

    #[test]
    fn subset_and_intersection() {
        let ab = Scopes::parse("a b").unwrap();
        let bc = Scopes::parse("b c").unwrap();
        let b = Scopes::parse("b").unwrap();
        assert!(b.is_subset(&ab));
        assert!(!ab.is_subset(&bc));
        assert_eq!(ab.intersection(&bc), b);
        assert!(Scopes::new().is_subset(&b));
    }
}
