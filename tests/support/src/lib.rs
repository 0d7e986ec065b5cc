//! Helpers shared by ztid's tests and benchmarks, one module each (they used to be
//! `#[path]`-included across crates):
//!
//! - [`swtpm`]: one provisioned `swtpm` per test, killed on drop (std only);
//! - [`softhsm`]: SoftHSM2's module and a private token directory (std only);
//! - `tpm_attest` (feature `tpm-attest`): the TPM exchange between the node attestor
//!   and the CA verifier, and a fixture with a provisioned swtpm;
//! - `snp_signer` (feature `snp`): a test SEV-SNP chain, signed reports, CRLs and a
//!   fake configfs-tsm provider.
//!
//! Test code: helpers panic with a message saying what is missing or what failed.
#![forbid(unsafe_code)]

pub mod softhsm;
pub mod swtpm;

#[cfg(feature = "snp")]
pub mod snp_signer;
#[cfg(feature = "tpm-attest")]
pub mod tpm_attest;
