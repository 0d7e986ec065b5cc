//! `ztid-ca`: the server side of ztid.
//!
//! - [`authority`]: the X.509 CA and the JWT key, their private keys in `ztid-hsm`, their
//!   lifecycle and the upstream CA.
//! - [`csr_policy`]: what a CSR may ask for.
//! - [`entries`]: registration entry validation.
//! - [`datastore`]: persistent state behind one trait: sled embedded, or PostgreSQL
//!   shared by several servers.
//! - [`core`]: every server operation, independent of gRPC.
//! - [`api`]: the gRPC services (node and admin API, admin authorization) and how an
//!   [`Error`] becomes the status a caller sees; [`server`] runs them.
//! - [`config`] and [`cli`]: how operators drive it.
#![forbid(unsafe_code)]

pub mod api;
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
pub mod keys;
pub mod limits;
pub mod listeners;
pub mod maintenance;
pub mod metrics;
pub mod middleware;
pub mod policy;
pub mod probe;
pub mod refusal_audit;
pub mod roles;
pub mod server;
pub mod sts;

pub use error::{AuditError, Error, Refusal, RefusalKind, Result, StoreError};
