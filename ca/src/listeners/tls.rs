//! [`tls_incoming`]: the accept loop of the TLS gRPC listeners, with each handshake in
//! its own task under the handshake timeout.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::accept::accept_admitted;
use super::guarded_io::Guarded;
use super::listener::Listener;

/// Accepts TLS connections for a gRPC listener (node API, remote admin): each
/// handshake runs in its own task within the handshake timeout, so one slow or hostile
/// client cannot hold up the others.
pub fn tls_incoming(
    tcp: TcpListener,
    config: Arc<rustls::ServerConfig>,
    listener: Arc<Listener>,
) -> ReceiverStream<io::Result<TlsStream<Guarded<TcpStream>>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (stream, peer, conn) = accept_admitted(&tcp, &listener).await;
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = conn_tx.clone();
            let what = listener.name;
            let handshake = listener.timeouts.handshake;
            let listener = listener.clone();
            tokio::spawn(async move {
                let guarded = Guarded::new(stream, conn);
                match tokio::time::timeout(handshake, acceptor.accept(guarded)).await {
                    Ok(Ok(tls)) => {
                        let (io, session) = tls.get_ref();
                        if let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) {
                            listener.authenticate(io.state(), leaf.as_ref());
                        }
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::debug!(event = "tls_refused", listener = what, %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(conn_rx)
}
