//! Scrape time: the probe behind `/metrics`, `/live` and `/ready` (the instruments
//! are [`crate::metrics`]'s), which reads the CA core
//! (authorities, agents, the audit log), the entry count, the audit self-check, and
//! [`spawn`], which starts it all.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use ztid_telemetry::{encode, listen, Probe};

use crate::authority::Kind;
use crate::core::CaCore;
use crate::datastore::AuthorityState;
use crate::metrics::instruments::{AGENTS_DIRTY, ENTRIES_DELTA, METRICS, SERVING};
use crate::metrics::rates::{RATES, START};
use crate::{Error, Result};

/// How often the agent list may be re-read.
const AGENT_SAMPLE_EVERY: Duration = Duration::from_secs(30);
/// How often the audit log verifies itself (the first run is at start).
const AUDIT_VERIFY_EVERY: Duration = Duration::from_secs(30 * 60);

struct ServerProbe {
    core: Arc<CaCore>,
    agents_sampled: Mutex<Option<Instant>>,
    /// One scrape at a time, so concurrent scrapes never see a half-refreshed gauge.
    scrape: tokio::sync::Mutex<()>,
}

fn now() -> i64 {
    crate::core::now()
}

impl ServerProbe {
    fn refresh_authorities(&self) {
        let m = &*METRICS;
        m.authority_expiry.reset();
        m.authority_lifetime.reset();
        let t = now();
        for kind in [Kind::X509, Kind::Jwt] {
            let Ok(list) = self.core.authorities.list(kind) else {
                continue;
            };
            let mut prepared = 0;
            for a in &list {
                let state = match a.state {
                    AuthorityState::Prepared => "prepared",
                    AuthorityState::Active => "active",
                    AuthorityState::Old if a.tainted => "tainted",
                    AuthorityState::Old => "old",
                };
                if a.state == AuthorityState::Prepared {
                    prepared = 1;
                }
                let labels = [kind.as_str(), a.id.as_str(), state];
                m.authority_expiry
                    .with_label_values(&labels)
                    .set(a.not_after - t);
                if a.not_before > 0 {
                    m.authority_lifetime
                        .with_label_values(&labels)
                        .set(a.not_after - a.not_before);
                }
            }
            m.authority_prepared
                .with_label_values(&[kind.as_str()])
                .set(prepared);
        }
    }

    async fn refresh_agents(&self) {
        let due = {
            let Ok(last) = self.agents_sampled.lock() else {
                return;
            };
            AGENTS_DIRTY.load(Ordering::Relaxed)
                || last.is_none_or(|t| t.elapsed() >= AGENT_SAMPLE_EVERY)
        };
        if !due {
            return;
        }
        AGENTS_DIRTY.store(false, Ordering::Relaxed);
        if let Ok(mut last) = self.agents_sampled.lock() {
            *last = Some(Instant::now());
        }
        let store = self.core.store.clone();
        let Ok(Ok(agents)) = tokio::task::spawn_blocking(move || store.list_agents()).await else {
            tracing::warn!("metrics: could not list agents");
            return;
        };
        let t = now();
        let (mut active, mut expired, mut banned) = (0, 0, 0);
        for a in &agents {
            if a.banned {
                banned += 1;
            } else if a.expires_at > t {
                active += 1;
            } else {
                expired += 1;
            }
        }
        for (state, n) in [("active", active), ("expired", expired), ("banned", banned)] {
            METRICS.agents.with_label_values(&[state]).set(n);
        }
    }

    async fn refresh_audit(&self) {
        let Some(audit) = &self.core.audit else {
            return;
        };
        let ok = tokio::time::timeout(Duration::from_secs(1), audit.durable(audit.last_seq()))
            .await
            .is_ok_and(|r| r.is_ok());
        METRICS.audit_writable.set(ok as i64);
    }
}

impl Probe for ServerProbe {
    async fn metrics(&self) -> String {
        let _one = self.scrape.lock().await;
        self.refresh_authorities();
        self.refresh_agents().await;
        self.refresh_audit().await;
        METRICS.mint_rate_max.set(RATES.max_last_minute());
        encode(&METRICS.registry)
    }

    async fn ready(&self) -> std::result::Result<(), String> {
        if !SERVING.load(Ordering::SeqCst) {
            return Err("the node API and admin socket are not serving yet".into());
        }
        let store = self.core.store.clone();
        match tokio::task::spawn_blocking(move || store.current_revision()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("datastore: {e}")),
            Err(e) => return Err(format!("datastore check: {e}")),
        }
        if let Some(audit) = &self.core.audit {
            audit
                .durable(audit.last_seq())
                .await
                .map_err(|e| format!("audit log: {e}"))?;
        }
        Ok(())
    }
}

/// Counts the entries once (in the background); the hooks keep the count current.
fn count_entries(core: &Arc<CaCore>) {
    let store = core.store.clone();
    tokio::task::spawn_blocking(move || {
        let before = ENTRIES_DELTA.load(Ordering::Relaxed);
        match store.count_entries() {
            Ok(n) => {
                // From now on the gauge is this count plus the changes since it began (a
                // change racing the count may be counted twice: close enough, and rare).
                BASE_ENTRIES.store(n as i64 - before, Ordering::Relaxed);
                ENTRIES_COUNTED.store(true, Ordering::Relaxed);
                refresh_entries();
                let _ = METRICS.registry.register(Box::new(METRICS.entries.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: could not count entries"),
        }
    });
}

static BASE_ENTRIES: AtomicI64 = AtomicI64::new(0);
static ENTRIES_COUNTED: AtomicBool = AtomicBool::new(false);

fn refresh_entries() {
    if ENTRIES_COUNTED.load(Ordering::Relaxed) {
        METRICS
            .entries
            .set(BASE_ENTRIES.load(Ordering::Relaxed) + ENTRIES_DELTA.load(Ordering::Relaxed));
    }
}

/// Runs `audit verify` on the live log now and then. A torn last line being written
/// while it reads is not a failure: it is retried.
fn spawn_audit_self_check(core: &Arc<CaCore>) {
    let Some(audit) = core.audit.clone() else {
        return;
    };
    let dir = core.config.data_dir.join("audit");
    let km = core.key_manager.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(AUDIT_VERIFY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if audit.last_seq() == 0 {
                // A new, empty log: nothing is signed yet, so there is nothing to walk.
                METRICS.audit_verify_ok.set(1);
                METRICS.audit_verify_records.set(0);
                METRICS.audit_verify_last_success.set(now());
                continue;
            }
            let (dir, km) = (dir.clone(), km.clone());
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                let mut last = crate::audit::verify(&dir, km.as_ref());
                for _ in 1..3 {
                    match &last {
                        // A batch still being appended (no line end yet, or not yet
                        // followed by its seal): read again.
                        Err(e) if e.is_live_tail() => {
                            std::thread::sleep(Duration::from_secs(1));
                            last = crate::audit::verify(&dir, km.as_ref());
                        }
                        _ => break,
                    }
                }
                last.map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("self-check task: {e}")));
            METRICS
                .audit_verify_seconds
                .set(started.elapsed().as_secs_f64());
            match result {
                Ok(r) => {
                    METRICS.audit_verify_ok.set(1);
                    METRICS.audit_verify_last_success.set(now());
                    METRICS.audit_verify_records.set(r.records as i64);
                    tracing::info!(
                        event = "audit_verified",
                        records = r.records,
                        checkpoints = r.checkpoints,
                        "audit log self-check passed"
                    );
                }
                Err(e) => {
                    METRICS.audit_verify_ok.set(0);
                    METRICS.audit_verify_failures.inc();
                    tracing::error!(event = "audit_verify_failed", error = %e, "audit log self-check FAILED");
                }
            }
        }
    });
}

/// Starts telemetry when `--metrics` is set: binds the listener, counts the entries,
/// starts the audit self-check. Returns the bound address.
pub async fn spawn(core: &Arc<CaCore>) -> Result<Option<SocketAddr>> {
    let Some(addr) = core.config.metrics else {
        return Ok(None);
    };
    LazyLock::force(&METRICS);
    LazyLock::force(&START);
    count_entries(core);
    spawn_audit_self_check(core);
    let probe = Arc::new(ServerProbe {
        core: core.clone(),
        agents_sampled: Mutex::new(None),
        scrape: tokio::sync::Mutex::new(()),
    });
    let local = listen(addr, Arc::new(EntriesRefresh(probe)))
        .await
        .map_err(Error::io(format!("binding the metrics listener on {addr}")))?;
    Ok(Some(local))
}

/// Refreshes the entry gauge before delegating (kept apart so the probe stays testable).
struct EntriesRefresh(Arc<ServerProbe>);

impl Probe for EntriesRefresh {
    async fn metrics(&self) -> String {
        refresh_entries();
        self.0.metrics().await
    }
    async fn ready(&self) -> std::result::Result<(), String> {
        self.0.ready().await
    }
}
