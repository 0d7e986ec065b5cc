//! The store's dedicated sessions, outside the pool: the `LISTEN` session that turns
//! other servers' (and this one's) notifications into [`ChangeTopic`]s, and the
//! sessions that hold a leader role's advisory lock.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
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

/// How many notifications of one topic are passed on at once within [`COALESCE_WINDOW`]
/// (then the rest are held). Any role that may connect to the database may `NOTIFY
/// ztid_changes` (PostgreSQL has no privilege on notification channels), and every
/// notification makes every server do work (an `agents` one makes each agent stream
/// check its agent again, an `authorities` one reloads them); a flood of them would
/// also overrun the subscribers' queue, which subscribers take as "anything may have
/// changed" (every agent told to sync). A topic over its rate is held and passed on
/// once a slot frees: never dropped, whoever sends them.
///
/// Entries: operators' scripts change many a second and agents on other servers must
/// see each at once (the pushed-entry latency), and a notification costs each server
/// one read of the change log. The others are rare, cost more, and nothing waits on
/// them within a second (every call reads its agent from the database anyway).
pub(super) fn coalesce_burst(topic: ChangeTopic) -> usize {
    match topic {
        ChangeTopic::Entries => 128,
        ChangeTopic::Agents | ChangeTopic::Authorities | ChangeTopic::Federation => 8,
    }
}
/// See [`coalesce_burst`].
pub(super) const COALESCE_WINDOW: Duration = Duration::from_secs(1);

/// One topic's state: when it was passed on within the last window (at most its
/// [`coalesce_burst`], oldest first), and whether one is held until a slot frees.
#[derive(Default)]
struct Gate {
    sent: std::collections::VecDeque<Instant>,
    held: bool,
}

impl Gate {
    /// Forgets what was passed on a window or more before `now`.
    fn expire(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|at| *at + COALESCE_WINDOW <= now)
        {
            self.sent.pop_front();
        }
    }

    /// When the next slot frees (`None` while one is free).
    fn free_at(&self, burst: usize) -> Option<Instant> {
        if self.sent.len() < burst {
            return None;
        }
        self.sent.front().map(|at| *at + COALESCE_WINDOW)
    }

    /// Passes one on now if a slot is free.
    fn take(&mut self, now: Instant, burst: usize) -> bool {
        self.expire(now);
        if self.sent.len() < burst {
            self.sent.push_back(now);
            true
        } else {
            false
        }
    }
}

/// Every topic's [`Gate`], in [`ChangeTopic::ALL`]'s order.
#[derive(Default)]
struct Coalescer {
    gates: [Gate; ChangeTopic::ALL.len()],
}

impl Coalescer {
    /// Whether to pass `t` on now; if not, it is held for [`Self::due`].
    fn offer(&mut self, t: ChangeTopic, now: Instant) -> bool {
        let Some((_, gate)) = ChangeTopic::ALL
            .iter()
            .zip(self.gates.iter_mut())
            .find(|(a, _)| **a == t)
        else {
            return true;
        };
        if gate.held {
            // Already held: this one is covered by the held one's passing.
            return false;
        }
        let passed = gate.take(now, coalesce_burst(t));
        gate.held = !passed;
        passed
    }

    /// When the earliest held topic may be passed on.
    fn next_due(&self) -> Option<Instant> {
        ChangeTopic::ALL
            .iter()
            .zip(self.gates.iter())
            .filter(|(_, g)| g.held)
            .map(|(t, g)| g.free_at(coalesce_burst(*t)).unwrap_or_else(Instant::now))
            .min()
    }

    /// The held topics that may be passed on at `now`, marked sent.
    fn due(&mut self, now: Instant) -> Vec<ChangeTopic> {
        let mut out = Vec::new();
        for (t, gate) in ChangeTopic::ALL.iter().zip(self.gates.iter_mut()) {
            if gate.held && gate.take(now, coalesce_burst(*t)) {
                gate.held = false;
                out.push(*t);
            }
        }
        out
    }
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
                let mut gate = Coalescer::default();
                loop {
                    let received = match gate.next_due() {
                        Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                            Ok(received) => received,
                            Err(_) => {
                                for t in gate.due(Instant::now()) {
                                    let _ = changes.send(t);
                                }
                                continue;
                            }
                        },
                        None => rx.recv().await,
                    };
                    // None: the session ended; every topic is sent after reconnecting,
                    // held ones included.
                    let Some(n) = received else { break };
                    if let Some(t) = ChangeTopic::parse(n.payload()) {
                        if gate.offer(t, Instant::now()) {
                            let _ = changes.send(t);
                        }
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
    fn a_topic_passes_in_bursts_then_at_the_rate_and_is_never_dropped() {
        let t0 = Instant::now();
        let mut g = Coalescer::default();
        // Changes, a burst of them: all at once.
        for i in 0..coalesce_burst(ChangeTopic::Agents) {
            let at = t0 + Duration::from_millis(i as u64);
            assert!(g.offer(ChangeTopic::Agents, at), "change {i} goes at once");
        }
        assert!(g.offer(ChangeTopic::Entries, t0), "topics are apart");
        // A flood past the burst: held, once.
        for _ in 0..1000 {
            assert!(!g.offer(ChangeTopic::Agents, t0 + Duration::from_millis(10)));
        }
        assert_eq!(g.next_due(), Some(t0 + COALESCE_WINDOW));
        assert!(g.due(t0 + Duration::from_millis(100)).is_empty());
        assert_eq!(
            g.due(t0 + COALESCE_WINDOW),
            vec![ChangeTopic::Agents],
            "held, passed on once a slot frees"
        );
        assert_eq!(g.next_due(), None);
        // A window after the burst, the topic goes at once again.
        let later = t0 + COALESCE_WINDOW * 3;
        assert!(
            g.offer(ChangeTopic::Agents, later),
            "a quiet topic goes at once"
        );
    }

    #[test]
    fn leader_keys_differ_by_name() {
        assert_ne!(leader_key("federation"), leader_key("pruning"));
        assert_eq!(leader_key("federation"), leader_key("federation"));
    }
}
