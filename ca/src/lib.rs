//! `ztid-ca`: the server side of ztid.
//!
//! - [`authority`]: the X.509 CA and the JWT key, their private keys in `ztid-hsm`, their
//!   lifecycle and the upstream CA.
//! - [`csr_policy`]: what a CSR may ask for.
//! - [`entries`]: registration entry validation.
//! - [`datastore`]: persistent state behind one trait (sled today).
//! - [`core`]: every server operation, independent of gRPC.
//! - [`node_api`] / [`admin_api`]: the gRPC services; [`server`] runs them;
//!   [`grpc_status`]: how an [`Error`] becomes the status a caller sees.
//! - [`config`] and [`cli`]: how operators drive it.
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod admin_authz;
pub mod admin_credential;
pub mod attestors;
pub mod audit;
pub mod authority;
pub mod cli;
pub mod config;
pub mod core;
pub mod csr_policy;
pub mod datastore;
pub mod entries;
mod error;
pub mod evidence;
pub mod federation;
pub mod grpc_middleware;
pub mod grpc_status;
pub mod keys;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod node_api;
pub mod policy;
pub mod refusal_audit;
pub mod roles;
pub mod server;

pub use error::{Error, Refusal, RefusalKind, Result, StoreError};
