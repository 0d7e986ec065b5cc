//! [`Timeouts`]: the four deadlines of one listener's connections (TLS handshake,
//! first request head, idle, request in flight), read from the limits configuration.

use std::time::Duration;

use crate::limits::LimitsConfig;

/// The timeouts of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TLS handshake.
    pub handshake: Duration,
    /// From acceptance to the first request head.
    pub header: Duration,
    /// No request in flight.
    pub idle: Duration,
    /// One request in flight.
    pub request: Duration,
}

impl Timeouts {
    /// gRPC listeners (HTTP/2: node API, admin socket, remote admin).
    pub fn grpc(l: &LimitsConfig) -> Self {
        Self {
            handshake: l.tls_handshake_timeout(),
            header: l.request_header_timeout(),
            idle: l.idle_timeout(),
            request: l.request_timeout(),
        }
    }

    /// HTTP/1 listeners (bundle endpoint, OIDC): idle connections get the header timeout.
    pub fn http1(l: &LimitsConfig) -> Self {
        Self {
            idle: l.request_header_timeout(),
            ..Self::grpc(l)
        }
    }
}
