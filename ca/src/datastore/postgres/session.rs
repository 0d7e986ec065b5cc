//! The store's dedicated sessions, outside the pool: the `LISTEN` session that turns
//! other servers' (and this one's) notifications into [`ChangeTopic`]s, and the
//! sessions that hold a leader role's advisory lock.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;

use super::url::Target;
use super::CHANNEL;
use crate::datastore::{ChangeTopic, LeaderGuard};
use crate::{Error, Result, StoreError};

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |e| Error::Store(StoreError::Database(format!("PostgreSQL: {what}: {e}")))
}

/// Opens a session of its own; its connection task sets nothing and ends with it.
/// Returns the client and a receiver of its notifications (closed when the session
/// ends).
async fn session(
    target: &Target,
) -> Result<(
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<tokio_postgres::Notification>,
)> {
    let (client, mut connection) = target
        .pg
        .connect(target.tls.clone())
        .await
        .map_err(db("connecting"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Listens for change notifications for as long as the store's runtime runs,
/// reconnecting after the database went away. After every (re)connection it sends every
/// topic: whatever happened while it was not listening is unknown. `ready` learns how
/// the first `LISTEN` went.
pub(super) async fn listen(
    target: std::sync::Arc<Target>,
    changes: broadcast::Sender<ChangeTopic>,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let (client, rx) = session(&target).await?;
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(db("LISTEN"))?;
            Ok::<_, Error>((client, rx))
        }
        .await;
        match attempt {
            Ok((client, mut rx)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Ok(()));
                }
                backoff = Duration::from_millis(100);
                for t in ChangeTopic::ALL {
                    let _ = changes.send(t);
                }
                while let Some(n) = rx.recv().await {
                    if let Some(t) = ChangeTopic::parse(n.payload()) {
                        let _ = changes.send(t);
                    }
                }
                // The session ended (the database restarted or the network failed).
                drop(client);
                tracing::warn!("datastore change notifications lost their session; reconnecting");
            }
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "datastore change notifications: reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The advisory lock key of the leader role `name`: the first 8 bytes of SHA-256 over
/// a prefix and the name, so roles do not collide with each other or with the
/// migration lock.
fn leader_key(name: &str) -> i64 {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("ztid leader\0{name}").as_bytes(),
    );
    let mut k = [0u8; 8];
    for (dst, src) in k.iter_mut().zip(d.as_ref()) {
        *dst = *src;
    }
    i64::from_be_bytes(k)
}

/// Tries to take the leader role `name` on a session of its own. The guard keeps the
/// session (dropping it closes the session, and PostgreSQL releases the lock); the
/// role is lost when the session ends for any reason.
pub(super) async fn try_leader(target: &Target, name: &str) -> Result<Option<LeaderGuard>> {
    let (client, connection) = target
        .pg
        .connect(target.tls.clone())
        .await
        .map_err(db("connecting for a leader role"))?;
    let (held_tx, held_rx) = watch::channel(true);
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = held_tx.send(false);
    });
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&leader_key(name)])
        .await
        .map_err(db("taking a leader role"))?
        .try_get(0)
        .map_err(db("taking a leader role"))?;
    if !got {
        return Ok(None);
    }
    Ok(Some(LeaderGuard::new(held_rx, Box::new(client))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_keys_differ_by_name() {
        assert_ne!(leader_key("federation"), leader_key("pruning"));
        assert_eq!(leader_key("federation"), leader_key("federation"));
    }
}
