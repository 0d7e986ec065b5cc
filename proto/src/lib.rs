//! Wire types for ztid.
//!
//! - [`workload`]: the standard SPIFFE Workload API (no protobuf package, as in the spec).
//! - [`node`]: ztid's node API between `ztid-agent` and `ztid-server`.
//! - [`admin`]: ztid's admin API on the server's admin Unix socket.
//! - [`transport`]: a gRPC channel to a Unix socket.
//!
//! The server-side `:authority` adapter for grpc-core clients is its own crate,
//! `ztid-h2-authority`, since it parses untrusted bytes.
#![forbid(unsafe_code)]

/// The SPIFFE Workload API.
#[allow(missing_docs, reason = "generated from the .proto files")]
pub mod workload {
    tonic::include_proto!("_");
}

/// ztid's own protobuf packages, nested as their package names so that
/// cross-package references in the generated code resolve.
pub mod ztid {
    /// Package `ztid.node`.
    pub mod node {
        /// Package `ztid.node.v1`.
        #[allow(missing_docs, reason = "generated from the .proto files")]
        pub mod v1 {
            tonic::include_proto!("ztid.node.v1");
        }
    }
    /// Package `ztid.admin`.
    pub mod admin {
        /// Package `ztid.admin.v1`.
        #[allow(missing_docs, reason = "generated from the .proto files")]
        pub mod v1 {
            tonic::include_proto!("ztid.admin.v1");
        }
    }
}

/// SPIRE's protobuf packages that ztid serves wire-identically (`spire.api.*`).
#[allow(missing_docs, reason = "generated from the .proto files")]
pub mod spire {
    /// Package `spire.api`.
    pub mod api {
        /// Package `spire.api.types`.
        pub mod types {
            tonic::include_proto!("spire.api.types");
        }
        /// Package `spire.api.agent`.
        pub mod agent {
            /// Package `spire.api.agent.delegatedidentity`.
            pub mod delegatedidentity {
                /// Package `spire.api.agent.delegatedidentity.v1`: the Delegated Identity API.
                pub mod v1 {
                    tonic::include_proto!("spire.api.agent.delegatedidentity.v1");
                }
            }
        }
    }
}

/// Envoy's Secret Discovery Service (SDS) v3 and the messages it carries, wire-identical
/// to Envoy's data-plane API (see `proto/envoy/README.md`), under their package names
/// (`envoy.*`, and `google.rpc` for `error_detail`) so cross-package references resolve.
#[allow(missing_docs, reason = "generated from the .proto files")]
pub mod envoy_sds {
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        pub mod r#type {
            pub mod v3 {
                tonic::include_proto!("envoy.r#type.v3");
            }
        }
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
            pub mod secret {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.secret.v3");
                }
            }
        }
        pub mod extensions {
            pub mod transport_sockets {
                pub mod tls {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                    }
                }
            }
        }
    }
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
}

pub use ztid::admin::v1 as admin;
pub use ztid::node::v1 as node;

pub mod transport;

/// The metadata key every Workload API request must carry with the value `true`.
pub const WORKLOAD_API_HEADER: &str = "workload.spiffe.io";
