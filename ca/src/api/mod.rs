//! The gRPC edge of the server: thin services over [`crate::core::CaCore`], the checks in
//! front of them, and how an [`crate::Error`] becomes the status a caller sees.
//!
//! - [`node`]: the node API agents call over mutual TLS (`ztid.node.v1.Node`).
//! - [`admin`]: the admin API (`ztid.admin.v1.Admin`) and who may call it
//!   ([`admin::authz`]).
//! - [`status`]: the one `From<Error> for Status`, the only place that knows gRPC codes.

pub mod admin;
pub mod node;
pub mod status;
