//! Helpers shared by ztid's tests and benchmarks, one module each (they used to be
//! `#[path]`-included across crates):
//!
//! - [`swtpm`]: one provisioned `swtpm` per test, killed on drop (std only);
//! - [`softhsm`]: SoftHSM2's module and a private token directory (std only);
//! - `tpm_attest` (feature `tpm-attest`): the TPM exchange between the node attestor
//!   and the CA verifier, and a fixture with a provisioned swtpm;
//! - `snp_signer` (feature `snp`): a test SEV-SNP chain, signed reports, CRLs and a
//!   fake configfs-tsm provider;
//! - `postgres` (feature `postgres`): a PostgreSQL server of the test's own (initdb into
//!   a temporary directory, its own port), optionally with TLS under a test CA.
//!
//! Test code: helpers panic with a message saying what is missing or what failed.
#![forbid(unsafe_code)]

pub mod softhsm;
pub mod swtpm;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "snp")]
pub mod snp_signer;
#[cfg(feature = "tpm-attest")]
pub mod tpm_attest;
