//! Following the other servers on one database (issue 13): what a server keeps in
//! memory that another server can change, and how it learns of the change.
//!
//! - Authorities: the bundle is the union of every server's authorities (see
//!   `crate::authority::AuthoritySet`). A thread waits on the store's change
//!   notifications ([`DataStore::subscribe_changes`]: PostgreSQL `LISTEN`/`NOTIFY`,
//!   sent in the writing transaction) and re-reads every server's CA state on an
//!   `Authorities` notification, on a lagged receiver (notifications were dropped) or
//!   after the store reconnected (it then sends every topic). Notifications can still
//!   be missed in ways no receiver sees (a `NOTIFY` lost with a connection that died
//!   before the listener noticed), so housekeeping also re-reads them every
//!   [`CLUSTER_RELOAD_FALLBACK_SECONDS`]: a change is served cluster-wide within that
//!   bound even then.
//! - Agents, entries, join tokens and federation records are not cached: every call
//!   reads them from the datastore (an agent's record on every node API call, see
//!   `agent_auth.rs`), so their notifications need no action here. That is what makes
//!   an eviction or a ban through any server refuse the agent's next call on every
//!   server.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;

use super::{now, CaCore};
use crate::datastore::ChangeTopic;
use crate::{Error, Result};

/// The name of the role ([`DataStore::try_leader`](crate::datastore::DataStore::try_leader))
/// a running server holds for its own id: what tells a peer that it runs (so it cannot
/// be retired) and what stops a second process under the same id (a copied data
/// directory) from starting.
pub(super) fn liveness_role(server_id: &str) -> String {
    format!("server {server_id}")
}

/// The slow fallback: housekeeping re-reads the other servers' authorities at least
/// this often, whatever notifications said.
pub const CLUSTER_RELOAD_FALLBACK_SECONDS: i64 = 30;

impl CaCore {
    /// Starts the thread that follows change notifications. It holds the core weakly
    /// and ends when the store closes its channel (the core and its store dropped).
    /// A thread, not a task: the core may be opened outside any runtime, and the
    /// store's calls are synchronous.
    pub(super) fn watch_cluster(self: &Arc<Self>) -> Result<()> {
        let mut rx = self.store.subscribe_changes();
        let core = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("ztid-cluster-watch".into())
            .spawn(move || loop {
                let topic = rx.blocking_recv();
                let Some(core) = core.upgrade() else { return };
                match topic {
                    Ok(ChangeTopic::Authorities) => core.reload_cluster_authorities("notification"),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "change notifications lagged: reloading");
                        core.reload_cluster_authorities("lagged notifications");
                    }
                    // Read through on every call: nothing held to reload.
                    Ok(ChangeTopic::Agents | ChangeTopic::Entries | ChangeTopic::Federation) => {}
                    Err(RecvError::Closed) => return,
                }
            })
            .map_err(|e| Error::Internal(format!("starting the cluster watch thread: {e}")))?;
        Ok(())
    }

    /// Re-reads every server's authorities; a failure (the database down) is logged
    /// and retried by the next notification or housekeeping round.
    pub fn reload_cluster_authorities(&self, why: &str) {
        match self.authorities.reload_cluster(now()) {
            Ok(true) => tracing::debug!(why, "cluster authorities changed"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(why, error = %e, "could not reload the cluster's authorities")
            }
        }
    }

    /// The housekeeping part: the fallback reload when the last one is old.
    /// Takes this server's liveness role, refusing to start if another process holds it.
    pub(super) fn take_liveness(
        store: &dyn crate::datastore::DataStore,
    ) -> Result<crate::datastore::LeaderGuard> {
        let id = store.server_id();
        store.try_leader(&liveness_role(id))?.ok_or_else(|| {
            Error::Precondition(format!(
                "another ztid-server runs with server id {id} on this datastore (it holds \
                 the id's lock): two servers may not share DATA_DIR/server-id"
            ))
        })
    }

    /// [`Self::take_liveness`], retried for a few seconds: the database session of this
    /// server's previous process (killed just before) may not have ended yet.
    pub(super) fn take_liveness_at_start(
        store: &dyn crate::datastore::DataStore,
    ) -> Result<crate::datastore::LeaderGuard> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Self::take_liveness(store) {
                Err(Error::Precondition(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// Takes the liveness role again if its database session ended (a database
    /// restart): until then a peer could take this server for stopped.
    pub(super) fn keep_liveness(&self) {
        let Ok(mut slot) = self.liveness.lock() else {
            return;
        };
        if slot
            .as_ref()
            .is_some_and(crate::datastore::LeaderGuard::is_held)
        {
            return;
        }
        match Self::take_liveness(self.store.as_ref()) {
            Ok(g) => {
                if slot.is_some() {
                    tracing::info!("took this server's liveness role again");
                }
                *slot = Some(g);
            }
            Err(e) => {
                tracing::error!(error = %e, "this server's liveness role is not held");
                *slot = None;
            }
        }
    }

    /// Retires server `server_id`, which must not be running: every authority of it
    /// is tainted (agents and workloads move to SVIDs of the other servers), and it
    /// may never write its state again. Its authorities then leave the bundle by
    /// `authority revoke` through any server, once no agent depends on them, or when
    /// they expire.
    pub fn retire_server(
        &self,
        server_id: &str,
        caller: &str,
    ) -> Result<Vec<(crate::authority::Kind, crate::datastore::AuthorityRecord)>> {
        if server_id == self.server_id() {
            return Err(Error::Precondition(format!(
                "server {server_id} is the server you are talking to: stop it and retire it \
                 through another server of the cluster"
            )));
        }
        // Held until the state is written: a server starting under that id meanwhile
        // waits for nothing and fails to start.
        let _stopped = self
            .store
            .try_leader(&liveness_role(server_id))?
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "server {server_id} is running (it holds its lock on the database): \
                     stop it before retiring it"
                ))
            })?;
        let t = now();
        let authorities = self.authorities.retire_peer(server_id, t)?;
        let ids: Vec<&str> = authorities.iter().map(|(_, a)| a.id.as_str()).collect();
        self.record(
            serde_json::json!({"type": "server_retired", "caller": caller,
            "server_id": server_id, "tainted": ids, "bundle_sequence": self.bundle().sequence}),
        )?;
        tracing::warn!(event = "server_retired", caller, server_id, tainted = ?ids,
            "server retired: its authorities are tainted");
        Ok(authorities)
    }

    pub(super) fn maybe_reload_cluster(&self) {
        if self.authorities.seconds_since_reload(now()) >= CLUSTER_RELOAD_FALLBACK_SECONDS {
            self.reload_cluster_authorities("timer");
        }
    }
}
