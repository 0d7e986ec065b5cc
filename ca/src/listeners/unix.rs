//! [`unix_incoming`]: the accept loop of the admin Unix socket, and the [`UidGate`] that
//! keeps connections of uids it does not admit out of the admitted uids' slots.

use std::io;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;

use super::accept::accept_failed;
use super::guarded_io::Guarded;
use super::listener::Listener;

/// Which uids a Unix socket admits into its listener. Connections of any other uid go
/// to `others`, a small listener of their own: they are still answered (and told why
/// they are refused), but never take, or make room in, the admitted uids' slots, so a
/// local uid that may reach the socket but not use it cannot lock the operator out.
pub struct UidGate {
    /// Whether a uid is admitted.
    pub admits: Box<dyn Fn(u32) -> bool + Send + Sync>,
    /// Where everyone else's connections are counted.
    pub others: Arc<Listener>,
}

/// Accepts connections on a Unix socket (the admin API).
pub fn unix_incoming(
    unix: UnixListener,
    listener: Arc<Listener>,
    gate: UidGate,
) -> ReceiverStream<io::Result<Guarded<UnixStream>>> {
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let stream = match unix.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_failed(listener.name, &e).await;
                    continue;
                }
            };
            let (peer, admitted) = match stream.peer_cred() {
                Ok(c) => (
                    format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)),
                    (gate.admits)(c.uid()),
                ),
                Err(_) => ("unknown".into(), false),
            };
            // The kernel vouches for the uid, so an admitted one counts as authenticated.
            let conn = if admitted {
                listener.admit(peer, None, true).await
            } else {
                gate.others.admit_now(peer, None, false)
            };
            let Some(conn) = conn else {
                continue;
            };
            if conn_tx.send(Ok(Guarded::new(stream, conn))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(conn_rx)
}
