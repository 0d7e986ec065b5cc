//! Connection limits of every server listener: timeouts and a connection cap, so that
//! clients that connect and then stall or trickle cannot hold descriptors, and so that
//! a flood on one listener leaves descriptors for the others, the admin socket and the
//! audit writer. The README's "Limits" section says which limit applies where.
//!
//! Every accepted connection is registered with its [`Listener`] and wrapped in a
//! [`Guarded`] stream, which fails (closing the connection) once the connection passes
//! its deadline:
//!
//! - no request yet: the request header timeout, from acceptance (TLS handshake, HTTP/2
//!   preface and the first request head all within it; the TLS handshake also within
//!   its own timeout);
//! - no request in flight: the idle timeout, from the end of the last request (HTTP/1
//!   listeners: the header timeout, which hyper also applies to every request head, so
//!   a header line every few seconds does not keep a connection);
//! - a request in flight longer than the request timeout (including a client that does
//!   not read its answer).
//!
//! At its cap a listener makes room for a new connection by closing the one that is
//! doing least: first one that has sent no request yet, then an idle one, then an
//! unauthenticated one with a request in flight (oldest first); connections of
//! authenticated clients with a request in flight are never closed for room. When
//! nothing can be closed the new connection is closed at once. The TCP listeners share
//! the process's descriptors, less
//! [`RESERVED_DESCRIPTORS`](crate::limits::RESERVED_DESCRIPTORS): their caps shrink in
//! proportion when the descriptor limit (read at every accept) is lower than their
//! sum, so `prlimit` on a running server takes effect at once.
//!
//! One file per part: `timeouts.rs` and `descriptors.rs` (the limits), `listener.rs`
//! (the cap and the registry of connections), `connection.rs` (one connection's
//! state), `guarded_io.rs` (the stream that enforces the deadlines), `accept.rs`,
//! `tls.rs` and `unix.rs` (the accept loops), `track_layer.rs` (gRPC requests in
//! flight), `http1.rs` (the HTTP/1.1 listeners) and `linger.rs` (closing a connection
//! without losing its last answer).

mod accept;
mod connection;
mod descriptors;
mod guarded_io;
mod http1;
pub mod immunity;
mod linger;
mod listener;
mod timeouts;
mod tls;
mod track_layer;
mod unix;

#[cfg(test)]
mod tests;

pub use connection::{ConnHandle, ConnState, RequestGuard};
pub use descriptors::{nofile_soft_limit, raise_nofile_limit, DescriptorBudget};
pub use guarded_io::{Guarded, Tracked};
pub use http1::{serve_http1, serve_http1_async};
pub use linger::{LINGER, LINGER_BYTES};
pub use listener::{Immunity, Listener, MAX_IMMUNE_PER_IDENTITY};
pub use timeouts::Timeouts;
pub use tls::tls_incoming;
pub use track_layer::TrackLayer;
pub use unix::{unix_incoming, UidGate};
