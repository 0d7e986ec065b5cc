//! Accept-loop helpers shared by the TCP, TLS and Unix listeners: admission of each new
//! TCP connection, and a pause after a failed accept.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::connection::ConnHandle;
use super::listener::Listener;

/// The next TCP connection `listener` admits (the ones it refuses are closed).
pub(super) async fn accept_admitted(
    tcp: &TcpListener,
    listener: &Arc<Listener>,
) -> (TcpStream, SocketAddr, ConnHandle) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                accept_failed(listener.name, &e).await;
                continue;
            }
        };
        if let Some(conn) = listener.admit(peer.to_string(), Some(peer), false).await {
            return (stream, peer, conn);
        }
    }
}

/// Accept errors (out of descriptors, most often) are retried after a pause instead of
/// spinning.
pub(super) async fn accept_failed(what: &str, e: &io::Error) {
    tracing::warn!(listener = what, error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
