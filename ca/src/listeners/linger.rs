//! [`close_gracefully`]: the end of a connection the server closes. Dropping a socket
//! whose receive buffer still holds input makes the kernel answer with RST instead of
//! FIN, and a peer that gets RST discards what it had not read yet: the server's last
//! answer (a 413, an HTTP/2 GOAWAY). So the server first shuts its write side down (for
//! TLS: `close_notify`, then FIN), then reads and discards what the peer still sends,
//! briefly and boundedly, before the socket is dropped.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long a closing connection keeps discarding its peer's input, at most.
pub const LINGER: Duration = Duration::from_secs(1);
/// How much of its peer's input a closing connection discards, at most.
pub const LINGER_BYTES: usize = 64 * 1024;

/// Shuts the write side of `io` down and discards its input until the peer closes its
/// side, an error, [`LINGER`] or [`LINGER_BYTES`], whichever comes first. The
/// connection's deadlines still apply ([`super::Guarded`] fails reads past them, and at
/// once for a connection closed for room).
pub async fn close_gracefully<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) {
    let drain = async {
        // Errors here mean the peer is already gone: nothing left to protect.
        if io.shutdown().await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded = discarded.saturating_add(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
