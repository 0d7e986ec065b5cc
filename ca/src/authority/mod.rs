//! The trust domain's signing authorities: an X.509 CA and a JWT key, each whose
//! private key stays in the key manager, and their lifecycle. Authorities only build
//! and sign; who may get what is decided by the node API before it calls them.
//!
//! - `key.rs`: [`ManagedKey`], a key-manager key rcgen signs with, and random serials
//!   and ids. Imports nothing from the other files here.
//! - `upstream.rs`: [`Upstream`], the organisation's CA that signs ztid's intermediates
//!   when one is configured (its key may be a [`ManagedKey`]).
//! - `x509.rs`: [`X509Authority`], a root or an intermediate under the [`Upstream`],
//!   and the leaves it signs.
//! - `jwt.rs`: [`JwtAuthority`], the key that mints JWT-SVIDs.
//! - `set.rs`: [`AuthoritySet`], the authorities of both kinds through prepared →
//!   active → old, taint and revoke, and the bundle built from them.
//!
//! Imports inside the folder go one way: `set` → `x509` → `upstream` → `key`, and
//! `set` → `jwt` → `key`.

mod jwt;
mod key;
mod set;
mod upstream;
mod x509;

#[cfg(test)]
mod tests;

pub use jwt::JwtAuthority;
pub use key::{random_hex, random_serial, ManagedKey};
pub use set::{AuthoritySet, Change, Kind, Lifetimes};
pub use upstream::{Upstream, UpstreamKey};
pub use x509::{
    leaf_issued_at, LeafTemplate, SignedLeaf, X509Authority, LEAF_BACKDATE_SECONDS, NODE_OU_PREFIX,
};
