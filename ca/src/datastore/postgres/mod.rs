//! The PostgreSQL datastore: several `ztid-server`s on one database.
//!
//! - Driver: tokio-postgres, pooled by deadpool-postgres (bounded, with connect, wait
//!   and statement timeouts), TLS through rustls with the server certificate verified
//!   (see [`url`] for what a datastore URL may say).
//! - Calls are synchronous, run on the store's own small runtime (see [`bridge`]).
//! - The schema is versioned and migrated at connect time (see [`schema`]).
//! - Every hot-path call is one keyed read: an entry by id, entries by parent or SPIFFE
//!   ID, node entries (a partial index), an agent by SPIFFE ID, a token by hash, one
//!   parent's changes after a revision, the revision counter.
//! - Entry revisions come from a one-row counter locked by each entry writer until it
//!   commits; see [`draw_revisions`] for why a reader never misses a change.
//! - Writers that change something another server keeps in memory `pg_notify` in the
//!   same transaction; one `LISTEN` session per store turns notifications into
//!   [`ChangeTopic`]s (see [`session`]).
//! - Each server keeps its own CA state and audit anchor, under its server id.
//!
//! A database restart fails the calls made while it is down with a
//! [`StoreError::Database`]; the pool drops closed connections and opens new ones, so
//! the next call after the database is back succeeds.

mod bridge;
mod schema;
mod session;
mod url;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{broadcast, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Row;
use zeroize::Zeroizing;

use self::bridge::Bridge;
use self::url::{Settings, Target};
use super::{
    change_channel, duplicate_entry, identity_key, AgentRecord, CaState, ChangeTopic, DataStore,
    EntryChange, EntryFilter, EntryRecord, JoinTokenRecord, LeaderGuard,
};
use super::{
    too_many_admin_revocations, too_many_grants, too_many_hardware_bans, too_many_revocations,
    GrantRecord, HardwareBanRecord, RevocationKind, RevocationRecord,
};
use crate::limits::{MAX_GRANTS, MAX_HARDWARE_BANS, MAX_REVOCATIONS};
use crate::{Error, Result, StoreError};

/// The notification channel every writer notifies on and every store listens to.
pub(super) const CHANNEL: &str = "ztid_changes";

/// The advisory lock grant writers take (`ztid` `grt`): the count bound holds
/// cluster-wide.
const GRANTS_LOCK: i64 = 0x7a74_6964_0067_7274;
/// The advisory lock revocation writers take (`ztid` `rev`).
const REVOCATIONS_LOCK: i64 = 0x7a74_6964_0072_6576;
/// The advisory lock hardware ban writers take (`ztid` `hwb`).
const HARDWARE_BANS_LOCK: i64 = 0x7a74_6964_0068_7762;

/// How to reach the database, and as which server.
pub struct PgOptions {
    /// `postgres://USER@HOST[:PORT]/DB[?sslmode=verify-full&sslrootcert=PATH]`, without
    /// a password.
    pub url: String,
    /// The role's password (from `password_file` or `ZTID_DATASTORE_PASSWORD`); none for
    /// a Unix socket with peer authentication.
    pub password: Option<Zeroizing<String>>,
    /// This server's id: owner of its CA state and audit anchor. Stable across restarts.
    pub server_id: String,
    /// Pool size: connections this server opens at most (besides one `LISTEN` session
    /// and one per leader role held).
    pub max_connections: usize,
    /// How long connecting (TCP, TLS, authentication) may take.
    pub connect_timeout: Duration,
    /// How long one statement may run, or wait for a lock, on the server.
    pub statement_timeout: Duration,
    /// How long one store call may take in all, waiting for a pooled connection
    /// included.
    pub call_timeout: Duration,
}

impl PgOptions {
    /// Options with the default bounds: 8 connections, 5 s to connect, 10 s a
    /// statement, 30 s a call.
    pub fn new(
        url: impl Into<String>,
        password: Option<String>,
        server_id: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            password: password.map(Zeroizing::new),
            server_id: server_id.into(),
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("server_id", &self.server_id)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

/// PostgreSQL-backed [`DataStore`].
pub struct PgStore {
    inner: Arc<Inner>,
    /// Declared last: dropped after `inner`, it shuts the runtime down.
    bridge: Bridge,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("server_id", &self.inner.server_id)
            .field("tls", &self.inner.target.tls_on)
            .finish()
    }
}

/// What a call's future needs, shared with it.
struct Inner {
    pool: Pool,
    target: Arc<Target>,
    server_id: String,
    changes: broadcast::Sender<ChangeTopic>,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

fn database(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Store(StoreError::Database(format!(
        "PostgreSQL: {what}: {detail}"
    )))
}

fn unreachable(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Store(StoreError::Unreachable(format!(
        "PostgreSQL: {what}: {detail}"
    )))
}

/// Whether `e` says the database is out of reach (not that it refused this request):
/// a connection that closed or failed on I/O, SQLSTATE class 08 (connection
/// exception) or 57 (operator intervention: shutting down, cannot connect now, a
/// statement cancelled by its timeout).
fn is_unreachable(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || e.code()
            .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57"))
}

fn db(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            Error::AlreadyExists(format!("{what}: it exists already"))
        } else if is_unreachable(&e) {
            unreachable(what, e)
        } else {
            database(what, e)
        }
    }
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::InvalidInput(format!("{what} {v} is out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| {
        Error::Store(StoreError::Corrupt(format!(
            "negative {what} {v} in the database"
        )))
    })
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

async fn query<C: GenericClient>(
    c: &C,
    what: &'static str,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db(what))?;
    c.query(&st, params).await.map_err(db(what))
}

async fn query_opt<C: GenericClient>(
    c: &C,
    what: &'static str,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db(what))?;
    c.query_opt(&st, params).await.map_err(db(what))
}

async fn query_one<C: GenericClient>(
    c: &C,
    what: &'static str,
    sql: &str,
    params: Params<'_>,
) -> Result<Row> {
    let st = c.prepare_cached(sql).await.map_err(db(what))?;
    c.query_one(&st, params).await.map_err(db(what))
}

async fn execute<C: GenericClient>(
    c: &C,
    what: &'static str,
    sql: &str,
    params: Params<'_>,
) -> Result<u64> {
    let st = c.prepare_cached(sql).await.map_err(db(what))?;
    c.execute(&st, params).await.map_err(db(what))
}

/// Column `i` of `row` as the JSON record `T`.
fn json<T: serde::de::DeserializeOwned>(row: &Row, i: usize, what: &'static str) -> Result<T> {
    Ok(row.try_get::<_, Json<T>>(i).map_err(db(what))?.0)
}

/// A `ztid_hardware_bans` row (`identifier, agent, banned_at`).
fn hardware_ban_of(row: &Row, what: &'static str) -> Result<HardwareBanRecord> {
    Ok(HardwareBanRecord {
        identifier: row.try_get(0).map_err(db(what))?,
        agent: row.try_get(1).map_err(db(what))?,
        banned_at: row.try_get(2).map_err(db(what))?,
    })
}

fn entries_of(rows: &[Row], what: &'static str) -> Result<Vec<EntryRecord>> {
    rows.iter().map(|r| json(r, 0, what)).collect()
}

fn change_of(row: &Row) -> Result<EntryChange> {
    const WHAT: &str = "reading entry changes";
    Ok(EntryChange {
        revision: to_u64(row.try_get(0).map_err(db(WHAT))?, "revision")?,
        entry_id: row.try_get(1).map_err(db(WHAT))?,
        parent_id: row.try_get(2).map_err(db(WHAT))?,
        node: row.try_get(3).map_err(db(WHAT))?,
        deleted: row.try_get(4).map_err(db(WHAT))?,
    })
}

/// Draws `n` consecutive entry revisions for the transaction `tx` and returns the last
/// (the others are the `n - 1` just below it). Every entry writer calls this first,
/// before it touches any entry row.
///
/// Why a reader never misses a change (issue 13, point 3: concurrent transactions
/// commit out of order, and an agent syncing "changes after R" must never skip a lower
/// revision that commits after a higher one):
///
/// 1. The counter is one row, and `UPDATE … SET value = value + n RETURNING value`
///    takes that row's lock, which is held until `tx` commits or rolls back. So entry
///    writers, on every server, hold the counter one at a time: the writer that draws
///    revision N first waited for the writer of N-1 to end. Under READ COMMITTED its
///    UPDATE then works on the row version that writer committed (or, had it rolled
///    back, the version before it, so an abandoned number is drawn again).
/// 2. PostgreSQL makes a committing transaction visible (it leaves the proc array)
///    before it releases its locks. So when the writer of N gets the lock, revision
///    N-1 and, by induction, every revision below N are visible to any new snapshot.
/// 3. A reader whose snapshot shows revision N took that snapshot after N committed,
///    which is after N got the lock, which is after every revision below N became
///    visible: the snapshot shows them all. Having seen R, `entry_changes_since(R)`
///    later can only meet revisions above R that it has not seen.
///
/// Because the counter is the first lock every entry writer takes, entry writers
/// cannot deadlock with each other. The price is that entry writes are serialized
/// cluster-wide for the length of one short transaction (a few round trips and the
/// commit's WAL flush). Entry writes are administration; minting and sync only read.
async fn draw_revisions<C: GenericClient>(tx: &C, n: i64) -> Result<u64> {
    let row = query_one(
        tx,
        "drawing an entry revision",
        "UPDATE ztid_revision SET value = value + $1 RETURNING value",
        &[&n],
    )
    .await?;
    to_u64(
        row.try_get(0).map_err(db("drawing an entry revision"))?,
        "revision",
    )
}

/// Appends `changes` to the entry log, moves the entry count by `count_delta` and
/// notifies [`ChangeTopic::Entries`], all in `tx`.
async fn log_changes<C: GenericClient>(
    tx: &C,
    changes: &[EntryChange],
    count_delta: i64,
) -> Result<()> {
    for c in changes {
        let revision = to_i64(c.revision, "revision")?;
        execute(
            tx,
            "logging an entry change",
            "INSERT INTO ztid_entry_changes (revision, entry_id, parent_id, node, deleted) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&revision, &c.entry_id, &c.parent_id, &c.node, &c.deleted],
        )
        .await?;
    }
    execute(
        tx,
        "counting entries",
        "WITH n AS (UPDATE ztid_counters SET value = value + $1 WHERE name = 'entries') \
         SELECT pg_notify('ztid_changes', 'entries')",
        &[&count_delta],
    )
    .await?;
    Ok(())
}

/// The id of the entry other than `except` with this identity, if any.
async fn same_identity<C: GenericClient>(
    tx: &C,
    identity: &[u8],
    except: Option<&str>,
) -> Result<Option<String>> {
    let row = query_opt(
        tx,
        "checking entry uniqueness",
        "SELECT id FROM ztid_entries WHERE identity = $1",
        &[&identity],
    )
    .await?;
    let Some(row) = row else { return Ok(None) };
    let id: String = row.try_get(0).map_err(db("checking entry uniqueness"))?;
    Ok((Some(id.as_str()) != except).then_some(id))
}

/// Inserts `entry` (its revision set) and its creation change, in `tx`.
async fn insert_entry<C: GenericClient>(tx: &C, entry: &EntryRecord) -> Result<()> {
    let identity = identity_key(entry);
    if let Some(existing) = same_identity(tx, &identity, None).await? {
        return Err(duplicate_entry(&existing));
    }
    let revision = to_i64(entry.revision, "revision")?;
    let inserted = execute(
        tx,
        "creating an entry",
        "INSERT INTO ztid_entries (id, spiffe_id, parent_id, node, identity, revision, record) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        &[
            &entry.id,
            &entry.spiffe_id,
            &entry.parent_id,
            &entry.node,
            &identity,
            &revision,
            &Json(entry),
        ],
    )
    .await?;
    if inserted == 0 {
        return Err(Error::AlreadyExists(format!(
            "an entry with id {} exists",
            entry.id
        )));
    }
    log_changes(
        tx,
        &[EntryChange {
            revision: entry.revision,
            entry_id: entry.id.clone(),
            parent_id: entry.parent_id.clone(),
            node: entry.node,
            deleted: false,
        }],
        1,
    )
    .await
}

impl Inner {
    async fn client(&self, what: &'static str) -> Result<deadpool_postgres::Client> {
        self.pool
            .get()
            .await
            .map_err(|e| unreachable(what, format_args!("no connection: {e}")))
    }
}

impl PgStore {
    /// Connects to the database, applies the schema migrations this binary has that it
    /// lacks (refusing a schema newer than it knows), and starts listening for changes.
    /// Fails if the URL is refused (a password in it, TLS off for a remote host, an
    /// unreadable CA file) or the database cannot be reached.
    pub fn connect(options: PgOptions) -> Result<Self> {
        if options.server_id.is_empty() {
            return Err(Error::Config("datastore: the server id is empty".into()));
        }
        let application_name = format!("ztid-server {}", options.server_id);
        let target = Arc::new(url::parse(
            &options.url,
            &Settings {
                password: options.password.as_ref().map(|p| p.as_str()),
                application_name: &application_name,
                connect_timeout: options.connect_timeout,
                statement_timeout: options.statement_timeout,
            },
        )?);
        let bridge = Bridge::new(options.call_timeout)?;
        let manager = Manager::from_config(
            target.pg.clone(),
            target.tls.clone(),
            ManagerConfig {
                // A connection the database closed is noticed by its task and dropped
                // at checkout; a statement on one that died unnoticed fails that call.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.call_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| Error::Internal(format!("datastore pool: {e}")))?;
        let inner = Arc::new(Inner {
            pool,
            target,
            server_id: options.server_id,
            changes: change_channel(),
        });
        let i = inner.clone();
        let found = bridge.run("schema migration", async move {
            let mut c = i.client("schema migration").await?;
            schema::migrate(&mut c).await
        })?;
        let (ready_tx, ready_rx) = oneshot::channel();
        bridge.handle().spawn(session::listen(
            inner.target.clone(),
            inner.changes.clone(),
            ready_tx,
        ));
        bridge.run("LISTEN", async move {
            ready_rx
                .await
                .map_err(|_| Error::Internal("datastore listener ended".into()))?
        })?;
        tracing::info!(
            server_id = %inner.server_id,
            tls = inner.target.tls_on,
            schema_found = found,
            schema = schema::known_version(),
            "PostgreSQL datastore connected"
        );
        Ok(Self { inner, bridge })
    }

    /// The schema version this binary migrates databases to.
    pub fn schema_version() -> i32 {
        schema::known_version()
    }

    /// Runs `f`'s future on the store's runtime and waits for it.
    fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        self.bridge.run(what, f(self.inner.clone()))
    }
}

impl DataStore for PgStore {
    fn server_id(&self) -> &str {
        &self.inner.server_id
    }

    fn create_entry(&self, mut entry: EntryRecord) -> Result<EntryRecord> {
        self.call("create_entry", move |inner| async move {
            let mut c = inner.client("create_entry").await?;
            let tx = c.transaction().await.map_err(db("create_entry"))?;
            entry.revision = draw_revisions(&tx, 1).await?;
            insert_entry(&tx, &entry).await?;
            tx.commit().await.map_err(db("create_entry"))?;
            Ok(entry)
        })
    }

    fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let id = id.to_string();
        self.call("get_entry", move |inner| async move {
            let c = inner.client("get_entry").await?;
            query_opt(
                &c,
                "get_entry",
                "SELECT record FROM ztid_entries WHERE id = $1",
                &[&id],
            )
            .await?
            .map(|r| json(&r, 0, "get_entry"))
            .transpose()
        })
    }

    fn delete_entry(&self, id: &str) -> Result<Option<EntryRecord>> {
        let id = id.to_string();
        self.call("delete_entry", move |inner| async move {
            let mut c = inner.client("delete_entry").await?;
            let tx = c.transaction().await.map_err(db("delete_entry"))?;
            let revision = draw_revisions(&tx, 1).await?;
            let row = query_opt(
                &tx,
                "delete_entry",
                "DELETE FROM ztid_entries WHERE id = $1 RETURNING record",
                &[&id],
            )
            .await?;
            // Nothing to delete: the rollback (on drop) returns the revision.
            let Some(row) = row else { return Ok(None) };
            let entry: EntryRecord = json(&row, 0, "delete_entry")?;
            log_changes(
                &tx,
                &[EntryChange {
                    revision,
                    entry_id: entry.id.clone(),
                    parent_id: entry.parent_id.clone(),
                    node: entry.node,
                    deleted: true,
                }],
                -1,
            )
            .await?;
            tx.commit().await.map_err(db("delete_entry"))?;
            Ok(Some(entry))
        })
    }

    fn update_entry(&self, mut entry: EntryRecord) -> Result<EntryRecord> {
        self.call("update_entry", move |inner| async move {
            let mut c = inner.client("update_entry").await?;
            let tx = c.transaction().await.map_err(db("update_entry"))?;
            let first = draw_revisions(&tx, 1).await?;
            let old: EntryRecord = match query_opt(
                &tx,
                "update_entry",
                "SELECT record FROM ztid_entries WHERE id = $1 FOR UPDATE",
                &[&entry.id],
            )
            .await?
            {
                Some(row) => json(&row, 0, "update_entry")?,
                None => return Err(Error::NotFound(format!("no entry {}", entry.id))),
            };
            let identity = identity_key(&entry);
            if let Some(existing) = same_identity(&tx, &identity, Some(&entry.id)).await? {
                return Err(duplicate_entry(&existing));
            }
            let mut changes = Vec::with_capacity(2);
            entry.revision = if old.parent_id != entry.parent_id {
                // The old parent's agents learn of a deletion, the new one's of the entry.
                changes.push(EntryChange {
                    revision: first,
                    entry_id: old.id.clone(),
                    parent_id: old.parent_id.clone(),
                    node: old.node,
                    deleted: true,
                });
                draw_revisions(&tx, 1).await?
            } else {
                first
            };
            entry.created_at = old.created_at;
            let revision = to_i64(entry.revision, "revision")?;
            execute(
                &tx,
                "update_entry",
                "UPDATE ztid_entries SET spiffe_id = $2, parent_id = $3, node = $4, identity = $5, \
                 revision = $6, record = $7 WHERE id = $1",
                &[
                    &entry.id,
                    &entry.spiffe_id,
                    &entry.parent_id,
                    &entry.node,
                    &identity,
                    &revision,
                    &Json(&entry),
                ],
            )
            .await?;
            changes.push(EntryChange {
                revision: entry.revision,
                entry_id: entry.id.clone(),
                parent_id: entry.parent_id.clone(),
                node: entry.node,
                deleted: false,
            });
            log_changes(&tx, &changes, 0).await?;
            tx.commit().await.map_err(db("update_entry"))?;
            Ok(entry)
        })
    }

    fn import_entry(&self, entry: EntryRecord) -> Result<()> {
        self.call("import_entry", move |inner| async move {
            let mut c = inner.client("import_entry").await?;
            let tx = c.transaction().await.map_err(db("import_entry"))?;
            let revision = to_i64(entry.revision, "revision")?;
            // The counter's lock first, as every entry writer takes it (see
            // draw_revisions); then the counter moves up to the imported revision.
            let row = query_one(
                &tx,
                "import_entry",
                "SELECT value FROM ztid_revision FOR UPDATE",
                &[],
            )
            .await?;
            let current: i64 = row.try_get(0).map_err(db("import_entry"))?;
            if revision <= current {
                return Err(Error::Precondition(format!(
                    "cannot import entry {} at revision {}: the store is at revision {current}",
                    entry.id, entry.revision
                )));
            }
            execute(
                &tx,
                "import_entry",
                "UPDATE ztid_revision SET value = $1",
                &[&revision],
            )
            .await?;
            insert_entry(&tx, &entry).await?;
            tx.commit().await.map_err(db("import_entry"))?;
            Ok(())
        })
    }

    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<EntryRecord>> {
        let filter = filter.clone();
        self.call("list_entries", move |inner| async move {
            const WHAT: &str = "list_entries";
            let c = inner.client(WHAT).await?;
            let rows =
                match (&filter.parent_id, &filter.spiffe_id) {
                    (Some(p), Some(s)) => query(
                        &c,
                        WHAT,
                        "SELECT record FROM ztid_entries WHERE parent_id = $1 AND spiffe_id = $2",
                        &[p, s],
                    )
                    .await?,
                    (Some(p), None) => {
                        query(
                            &c,
                            WHAT,
                            "SELECT record FROM ztid_entries WHERE parent_id = $1",
                            &[p],
                        )
                        .await?
                    }
                    (None, Some(s)) => {
                        query(
                            &c,
                            WHAT,
                            "SELECT record FROM ztid_entries WHERE spiffe_id = $1",
                            &[s],
                        )
                        .await?
                    }
                    (None, None) => query(&c, WHAT, "SELECT record FROM ztid_entries", &[]).await?,
                };
            let mut out = entries_of(&rows, WHAT)?;
            out.sort_by(|a, b| (&a.spiffe_id, a.revision).cmp(&(&b.spiffe_id, b.revision)));
            Ok(out)
        })
    }

    fn list_entries_page(
        &self,
        filter: &EntryFilter,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>> {
        let filter = filter.clone();
        // Ids are never empty, and "" sorts before every other string in "C".
        let after = after_id.unwrap_or_default().to_string();
        let limit = limit_param(limit);
        self.call("list_entries_page", move |inner| async move {
            const WHAT: &str = "list_entries_page";
            let c = inner.client(WHAT).await?;
            let rows =
                match (&filter.parent_id, &filter.spiffe_id) {
                    (Some(p), Some(s)) => query(
                        &c,
                        WHAT,
                        "SELECT record FROM ztid_entries WHERE parent_id = $1 AND spiffe_id = $2 \
                         AND id > $3 ORDER BY id LIMIT $4",
                        &[p, s, &after, &limit],
                    )
                    .await?,
                    (Some(p), None) => {
                        query(
                            &c,
                            WHAT,
                            "SELECT record FROM ztid_entries WHERE parent_id = $1 AND id > $2 \
                         ORDER BY id LIMIT $3",
                            &[p, &after, &limit],
                        )
                        .await?
                    }
                    (None, Some(s)) => {
                        query(
                            &c,
                            WHAT,
                            "SELECT record FROM ztid_entries WHERE spiffe_id = $1 AND id > $2 \
                         ORDER BY id LIMIT $3",
                            &[s, &after, &limit],
                        )
                        .await?
                    }
                    (None, None) => {
                        query(
                            &c,
                            WHAT,
                            "SELECT record FROM ztid_entries WHERE id > $1 ORDER BY id LIMIT $2",
                            &[&after, &limit],
                        )
                        .await?
                    }
                };
            entries_of(&rows, WHAT)
        })
    }

    fn node_entries(&self) -> Result<Vec<EntryRecord>> {
        self.call("node_entries", move |inner| async move {
            let c = inner.client("node_entries").await?;
            let rows = query(
                &c,
                "node_entries",
                "SELECT record FROM ztid_entries WHERE node ORDER BY id",
                &[],
            )
            .await?;
            entries_of(&rows, "node_entries")
        })
    }

    fn count_entries(&self) -> Result<usize> {
        self.call("count_entries", move |inner| async move {
            let c = inner.client("count_entries").await?;
            let row = query_one(
                &c,
                "count_entries",
                "SELECT value FROM ztid_counters WHERE name = 'entries'",
                &[],
            )
            .await?;
            let n: i64 = row.try_get(0).map_err(db("count_entries"))?;
            Ok(usize::try_from(n).unwrap_or_default())
        })
    }

    fn entry_changes_since(&self, revision: u64) -> Result<Vec<EntryChange>> {
        let revision = to_i64(revision, "revision")?;
        self.call("entry_changes_since", move |inner| async move {
            let c = inner.client("entry_changes_since").await?;
            query(
                &c,
                "entry_changes_since",
                "SELECT revision, entry_id, parent_id, node, deleted FROM ztid_entry_changes \
                 WHERE revision > $1 ORDER BY revision",
                &[&revision],
            )
            .await?
            .iter()
            .map(change_of)
            .collect()
        })
    }

    fn entry_changes_for_parent_since(
        &self,
        parent_id: &str,
        revision: u64,
    ) -> Result<Vec<EntryChange>> {
        let revision = to_i64(revision, "revision")?;
        let parent = parent_id.to_string();
        self.call("entry_changes_for_parent_since", move |inner| async move {
            let c = inner.client("entry_changes_for_parent_since").await?;
            query(
                &c,
                "entry_changes_for_parent_since",
                "SELECT revision, entry_id, parent_id, node, deleted FROM ztid_entry_changes \
                 WHERE parent_id = $1 AND revision > $2 ORDER BY revision",
                &[&parent, &revision],
            )
            .await?
            .iter()
            .map(change_of)
            .collect()
        })
    }

    fn current_revision(&self) -> Result<u64> {
        self.call("current_revision", move |inner| async move {
            let c = inner.client("current_revision").await?;
            let row = query_one(
                &c,
                "current_revision",
                "SELECT value FROM ztid_revision",
                &[],
            )
            .await?;
            to_u64(row.try_get(0).map_err(db("current_revision"))?, "revision")
        })
    }

    fn change_log_floor(&self) -> Result<u64> {
        const WHAT: &str = "change_log_floor";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            let row = query_one(
                &c,
                WHAT,
                "SELECT COALESCE((SELECT value FROM ztid_counters WHERE name = 'change_log_floor'), 0)",
                &[],
            )
            .await?;
            to_u64(row.try_get(0).map_err(db(WHAT))?, "change log floor")
        })
    }

    fn compact_change_log(&self, below: u64) -> Result<u64> {
        const WHAT: &str = "compact_change_log";
        // Clamped to the current revision below anyway.
        let below = i64::try_from(below).unwrap_or(i64::MAX);
        self.call(WHAT, move |inner| async move {
            let mut c = inner.client(WHAT).await?;
            let tx = c.transaction().await.map_err(db(WHAT))?;
            // The newest change stays: it carries the current revision. The floor and
            // the removal commit together, so a reader that read the changes before
            // this commit saw them all, and one that read them after sees the floor.
            let current = to_i64(
                to_u64(
                    query_one(&tx, WHAT, "SELECT value FROM ztid_revision", &[])
                        .await?
                        .try_get(0)
                        .map_err(db(WHAT))?,
                    "revision",
                )?,
                "revision",
            )?;
            let below = below.min(current);
            if below <= 1 {
                return Ok(0);
            }
            execute(
                &tx,
                WHAT,
                "INSERT INTO ztid_counters (name, value) VALUES ('change_log_floor', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = GREATEST(ztid_counters.value, EXCLUDED.value)",
                &[&(below - 1)],
            )
            .await?;
            let removed = execute(
                &tx,
                WHAT,
                "DELETE FROM ztid_entry_changes WHERE revision < $1",
                &[&below],
            )
            .await?;
            tx.commit().await.map_err(db(WHAT))?;
            Ok(removed)
        })
    }

    fn prune_join_tokens(&self, before: i64) -> Result<u64> {
        const WHAT: &str = "prune_join_tokens";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            execute(
                &c,
                WHAT,
                "DELETE FROM ztid_join_tokens WHERE expires_at < $1",
                &[&before],
            )
            .await
        })
    }

    fn put_agent(&self, agent: &AgentRecord) -> Result<()> {
        let agent = agent.clone();
        self.call("put_agent", move |inner| async move {
            let c = inner.client("put_agent").await?;
            // One statement. It notifies only what another server acts on: a new agent,
            // a ban or unban, a new SVID serial; not the bookkeeping of every sync.
            execute(
                &c,
                "put_agent",
                "WITH old AS (SELECT banned, serial FROM ztid_agents WHERE spiffe_id = $1), \
                 up AS (INSERT INTO ztid_agents (spiffe_id, banned, serial, record) \
                        VALUES ($1, $2, $3, $4) \
                        ON CONFLICT (spiffe_id) DO UPDATE SET banned = EXCLUDED.banned, \
                        serial = EXCLUDED.serial, record = EXCLUDED.record RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'agents') FROM up \
                 WHERE NOT EXISTS (SELECT 1 FROM old WHERE old.banned = $2 AND old.serial = $3)",
                &[
                    &agent.spiffe_id,
                    &agent.banned,
                    &agent.serial,
                    &Json(&agent),
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn get_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let id = spiffe_id.to_string();
        self.call("get_agent", move |inner| async move {
            let c = inner.client("get_agent").await?;
            query_opt(
                &c,
                "get_agent",
                "SELECT record FROM ztid_agents WHERE spiffe_id = $1",
                &[&id],
            )
            .await?
            .map(|r| json(&r, 0, "get_agent"))
            .transpose()
        })
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        self.call("list_agents", move |inner| async move {
            let c = inner.client("list_agents").await?;
            query(
                &c,
                "list_agents",
                "SELECT record FROM ztid_agents ORDER BY spiffe_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| json(r, 0, "list_agents"))
            .collect()
        })
    }

    fn delete_agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>> {
        let id = spiffe_id.to_string();
        self.call("delete_agent", move |inner| async move {
            let c = inner.client("delete_agent").await?;
            query_opt(
                &c,
                "delete_agent",
                "WITH d AS (DELETE FROM ztid_agents WHERE spiffe_id = $1 RETURNING record) \
                 SELECT d.record, pg_notify('ztid_changes', 'agents') FROM d",
                &[&id],
            )
            .await?
            .map(|r| json(&r, 0, "delete_agent"))
            .transpose()
        })
    }

    fn compare_and_swap_agent(
        &self,
        spiffe_id: &str,
        expected: Option<&AgentRecord>,
        new: Option<&AgentRecord>,
    ) -> Result<bool> {
        const WHAT: &str = "compare_and_swap_agent";
        super::check_cas_agent_id(spiffe_id, new)?;
        let id = spiffe_id.to_string();
        let expected = expected.cloned();
        let new = new.cloned();
        let notable = super::agent_change_notable(expected.as_ref(), new.as_ref());
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            // One statement each: the row is written only if it still holds `expected`
            // (jsonb equality: every record is this struct serialized, whoever wrote
            // it), and the notification goes out in the same transaction.
            let rows = match (&expected, &new) {
                (Some(old), Some(new)) => {
                    let sql = if notable {
                        "WITH up AS (UPDATE ztid_agents SET banned = $2, serial = $3, record = $4 \
                         WHERE spiffe_id = $1 AND record = $5 RETURNING 1) \
                         SELECT pg_notify('ztid_changes', 'agents') FROM up"
                    } else {
                        "WITH up AS (UPDATE ztid_agents SET banned = $2, serial = $3, record = $4 \
                         WHERE spiffe_id = $1 AND record = $5 RETURNING 1) \
                         SELECT 1 FROM up"
                    };
                    query(
                        &c,
                        WHAT,
                        sql,
                        &[&id, &new.banned, &new.serial, &Json(new), &Json(old)],
                    )
                    .await?
                }
                (None, Some(new)) => {
                    query(
                        &c,
                        WHAT,
                        "WITH up AS (INSERT INTO ztid_agents (spiffe_id, banned, serial, record) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (spiffe_id) DO NOTHING RETURNING 1) \
                         SELECT pg_notify('ztid_changes', 'agents') FROM up",
                        &[&id, &new.banned, &new.serial, &Json(new)],
                    )
                    .await?
                }
                (Some(old), None) => {
                    query(
                        &c,
                        WHAT,
                        "WITH d AS (DELETE FROM ztid_agents WHERE spiffe_id = $1 AND record = $2 \
                         RETURNING 1) SELECT pg_notify('ztid_changes', 'agents') FROM d",
                        &[&id, &Json(old)],
                    )
                    .await?
                }
                (None, None) => {
                    // Nothing to write: "swapped" if there is indeed none.
                    let present = query(
                        &c,
                        WHAT,
                        "SELECT 1 FROM ztid_agents WHERE spiffe_id = $1",
                        &[&id],
                    )
                    .await?;
                    return Ok(present.is_empty());
                }
            };
            Ok(!rows.is_empty())
        })
    }

    fn list_agents_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<AgentRecord>> {
        let after = after.unwrap_or_default().to_string();
        let limit = limit_param(limit);
        self.call("list_agents_page", move |inner| async move {
            let c = inner.client("list_agents_page").await?;
            query(
                &c,
                "list_agents_page",
                "SELECT record FROM ztid_agents WHERE spiffe_id > $1 ORDER BY spiffe_id LIMIT $2",
                &[&after, &limit],
            )
            .await?
            .iter()
            .map(|r| json(r, 0, "list_agents_page"))
            .collect()
        })
    }

    fn count_agents(&self) -> Result<usize> {
        self.call("count_agents", move |inner| async move {
            let c = inner.client("count_agents").await?;
            let row =
                query_one(&c, "count_agents", "SELECT count(*) FROM ztid_agents", &[]).await?;
            let n: i64 = row.try_get(0).map_err(db("count_agents"))?;
            Ok(usize::try_from(n).unwrap_or_default())
        })
    }

    fn put_join_token(&self, hash: &[u8; 32], token: &JoinTokenRecord) -> Result<()> {
        let (hash, token) = (*hash, token.clone());
        self.call("put_join_token", move |inner| async move {
            let c = inner.client("put_join_token").await?;
            execute(
                &c,
                "put_join_token",
                "INSERT INTO ztid_join_tokens (hash, expires_at, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (hash) DO UPDATE SET expires_at = EXCLUDED.expires_at, \
                 record = EXCLUDED.record",
                &[&hash.as_slice(), &token.expires_at, &Json(&token)],
            )
            .await?;
            Ok(())
        })
    }

    fn take_join_token(&self, hash: &[u8; 32]) -> Result<Option<JoinTokenRecord>> {
        let hash = *hash;
        self.call("take_join_token", move |inner| async move {
            let c = inner.client("take_join_token").await?;
            // One DELETE: of several servers taking the same token, only the one whose
            // DELETE removed the row gets it back.
            query_opt(
                &c,
                "take_join_token",
                "DELETE FROM ztid_join_tokens WHERE hash = $1 RETURNING record",
                &[&hash.as_slice()],
            )
            .await?
            .map(|r| json(&r, 0, "take_join_token"))
            .transpose()
        })
    }

    fn list_join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRecord)>> {
        self.call("list_join_tokens", move |inner| async move {
            const WHAT: &str = "list_join_tokens";
            let c = inner.client(WHAT).await?;
            query(
                &c,
                WHAT,
                "SELECT hash, record FROM ztid_join_tokens ORDER BY hash",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let hash: Vec<u8> = r.try_get(0).map_err(db(WHAT))?;
                let hash: [u8; 32] = hash.try_into().map_err(|_| {
                    Error::Store(StoreError::Corrupt(
                        "join token hash of the wrong length".into(),
                    ))
                })?;
                Ok((hash, json(r, 1, WHAT)?))
            })
            .collect()
        })
    }

    fn load_ca_state(&self) -> Result<Option<CaState>> {
        self.call("load_ca_state", move |inner| async move {
            let c = inner.client("load_ca_state").await?;
            query_opt(
                &c,
                "load_ca_state",
                "SELECT state FROM ztid_ca_states WHERE server_id = $1",
                &[&inner.server_id],
            )
            .await?
            .map(|r| json(&r, 0, "load_ca_state"))
            .transpose()
        })
    }

    fn store_ca_state(&self, state: &CaState) -> Result<()> {
        let state = state.clone();
        self.call("store_ca_state", move |inner| async move {
            const WHAT: &str = "store_ca_state";
            let c = inner.client(WHAT).await?;
            // Never over a retired row: a retired server may not sign again, even if it
            // was wrongly retired while running.
            let written = query(
                &c,
                WHAT,
                "WITH up AS (INSERT INTO ztid_ca_states (server_id, state, updated_at) \
                             VALUES ($1, $2, now()) ON CONFLICT (server_id) \
                             DO UPDATE SET state = EXCLUDED.state, updated_at = now() \
                             WHERE NOT (ztid_ca_states.state ? 'retired_at') RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'authorities') FROM up",
                &[&inner.server_id, &Json(&state)],
            )
            .await?;
            if written.is_empty() {
                let row = query_one(
                    &c,
                    WHAT,
                    "SELECT state FROM ztid_ca_states WHERE server_id = $1",
                    &[&inner.server_id],
                )
                .await?;
                let stored: CaState = json(&row, 0, WHAT)?;
                return Err(super::retired_refusal(
                    &inner.server_id,
                    stored.retired_at.unwrap_or_default(),
                ));
            }
            Ok(())
        })
    }

    fn compare_and_swap_peer_ca_state(
        &self,
        server_id: &str,
        expected: &CaState,
        new: &CaState,
    ) -> Result<bool> {
        const WHAT: &str = "compare_and_swap_peer_ca_state";
        let (server, expected, new) = (server_id.to_string(), expected.clone(), new.clone());
        self.call(WHAT, move |inner| async move {
            if server == inner.server_id {
                return Err(Error::Internal(
                    "compare_and_swap_peer_ca_state is for other servers' states".into(),
                ));
            }
            let c = inner.client(WHAT).await?;
            let rows = query(
                &c,
                WHAT,
                "WITH up AS (UPDATE ztid_ca_states SET state = $3, updated_at = now() \
                             WHERE server_id = $1 AND state = $2 RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'authorities') FROM up",
                &[&server, &Json(&expected), &Json(&new)],
            )
            .await?;
            Ok(!rows.is_empty())
        })
    }

    fn cluster_ca_states(&self) -> Result<Vec<(String, CaState)>> {
        self.call("cluster_ca_states", move |inner| async move {
            const WHAT: &str = "cluster_ca_states";
            let c = inner.client(WHAT).await?;
            query(
                &c,
                WHAT,
                "SELECT server_id, state FROM ztid_ca_states ORDER BY server_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0).map_err(db(WHAT))?, json(r, 1, WHAT)?)))
            .collect()
        })
    }

    fn next_bundle_sequence(&self) -> Result<u64> {
        self.call("next_bundle_sequence", move |inner| async move {
            let c = inner.client("next_bundle_sequence").await?;
            let row = query_one(
                &c,
                "next_bundle_sequence",
                "UPDATE ztid_counters SET value = GREATEST(value, \
                   (SELECT COALESCE(max((state->>'bundle_sequence')::bigint), 0) FROM ztid_ca_states)) + 1 \
                 WHERE name = 'bundle_sequence' RETURNING value",
                &[],
            )
            .await?;
            to_u64(
                row.try_get(0).map_err(db("next_bundle_sequence"))?,
                "bundle sequence",
            )
        })
    }

    fn try_leader(&self, name: &str) -> Result<Option<LeaderGuard>> {
        let name = name.to_string();
        self.call("try_leader", move |inner| async move {
            session::try_leader(&inner.target, &name).await
        })
    }

    fn subscribe_changes(&self) -> broadcast::Receiver<ChangeTopic> {
        self.inner.changes.subscribe()
    }

    fn put_federated_bundle(&self, trust_domain: &str, record: &[u8]) -> Result<()> {
        let (td, record) = (trust_domain.to_string(), record.to_vec());
        self.call("put_federated_bundle", move |inner| async move {
            let c = inner.client("put_federated_bundle").await?;
            execute(
                &c,
                "put_federated_bundle",
                "WITH up AS (INSERT INTO ztid_federated_bundles (trust_domain, record) VALUES ($1, $2) \
                             ON CONFLICT (trust_domain) DO UPDATE SET record = EXCLUDED.record RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'federation') FROM up",
                &[&td, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn get_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        let td = trust_domain.to_string();
        self.call("get_federated_bundle", move |inner| async move {
            let c = inner.client("get_federated_bundle").await?;
            query_opt(
                &c,
                "get_federated_bundle",
                "SELECT record FROM ztid_federated_bundles WHERE trust_domain = $1",
                &[&td],
            )
            .await?
            .map(|r| r.try_get(0).map_err(db("get_federated_bundle")))
            .transpose()
        })
    }

    fn list_federated_bundles(&self) -> Result<Vec<Vec<u8>>> {
        self.call("list_federated_bundles", move |inner| async move {
            let c = inner.client("list_federated_bundles").await?;
            query(
                &c,
                "list_federated_bundles",
                "SELECT record FROM ztid_federated_bundles ORDER BY trust_domain",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0).map_err(db("list_federated_bundles")))
            .collect()
        })
    }

    fn delete_federated_bundle(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        let td = trust_domain.to_string();
        self.call("delete_federated_bundle", move |inner| async move {
            let c = inner.client("delete_federated_bundle").await?;
            query_opt(
                &c,
                "delete_federated_bundle",
                "WITH d AS (DELETE FROM ztid_federated_bundles WHERE trust_domain = $1 RETURNING record) \
                 SELECT d.record, pg_notify('ztid_changes', 'federation') FROM d",
                &[&td],
            )
            .await?
            .map(|r| r.try_get(0).map_err(db("delete_federated_bundle")))
            .transpose()
        })
    }

    fn compare_and_put_federated_bundle(
        &self,
        trust_domain: &str,
        expected: Option<&[u8]>,
        while_federation: Option<&[u8]>,
        record: &[u8],
    ) -> Result<bool> {
        const WHAT: &str = "compare_and_put_federated_bundle";
        let td = trust_domain.to_string();
        let expected = expected.map(<[u8]>::to_vec);
        let federation = while_federation.map(<[u8]>::to_vec);
        let record = record.to_vec();
        self.call(WHAT, move |inner| async move {
            let mut c = inner.client(WHAT).await?;
            let tx = c.transaction().await.map_err(db(WHAT))?;
            // The relationship row is share-locked until the bundle is written and the
            // transaction ends: an operator's change or delete of it, on any server,
            // either came first (and the row no longer matches) or waits for this.
            if let Some(federation) = &federation {
                let holds = query_opt(
                    &tx,
                    WHAT,
                    "SELECT 1 FROM ztid_federations WHERE trust_domain = $1 AND record = $2 \
                     FOR SHARE",
                    &[&td, federation],
                )
                .await?
                .is_some();
                if !holds {
                    return Ok(false);
                }
            }
            let written = match &expected {
                Some(old) => {
                    execute(
                        &tx,
                        WHAT,
                        "UPDATE ztid_federated_bundles SET record = $2 \
                         WHERE trust_domain = $1 AND record = $3",
                        &[&td, &record, old],
                    )
                    .await?
                }
                None => execute(
                    &tx,
                    WHAT,
                    "INSERT INTO ztid_federated_bundles (trust_domain, record) VALUES ($1, $2) \
                         ON CONFLICT (trust_domain) DO NOTHING",
                    &[&td, &record],
                )
                .await?,
            };
            if written == 0 {
                return Ok(false);
            }
            execute(
                &tx,
                WHAT,
                "SELECT pg_notify('ztid_changes', 'federation')",
                &[],
            )
            .await?;
            tx.commit().await.map_err(db(WHAT))?;
            Ok(true)
        })
    }

    fn compare_and_swap_federation(
        &self,
        trust_domain: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool> {
        const WHAT: &str = "compare_and_swap_federation";
        let (td, expected, new) = (trust_domain.to_string(), expected.to_vec(), new.to_vec());
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            let rows = query(
                &c,
                WHAT,
                "WITH up AS (UPDATE ztid_federations SET record = $2 \
                             WHERE trust_domain = $1 AND record = $3 RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'federation') FROM up",
                &[&td, &new, &expected],
            )
            .await?;
            Ok(!rows.is_empty())
        })
    }

    fn put_federation(&self, trust_domain: &str, record: &[u8]) -> Result<()> {
        let (td, record) = (trust_domain.to_string(), record.to_vec());
        self.call("put_federation", move |inner| async move {
            let c = inner.client("put_federation").await?;
            execute(
                &c,
                "put_federation",
                "WITH up AS (INSERT INTO ztid_federations (trust_domain, record) VALUES ($1, $2) \
                             ON CONFLICT (trust_domain) DO UPDATE SET record = EXCLUDED.record RETURNING 1) \
                 SELECT pg_notify('ztid_changes', 'federation') FROM up",
                &[&td, &record],
            )
            .await?;
            Ok(())
        })
    }

    fn list_federations(&self) -> Result<Vec<Vec<u8>>> {
        self.call("list_federations", move |inner| async move {
            let c = inner.client("list_federations").await?;
            query(
                &c,
                "list_federations",
                "SELECT record FROM ztid_federations ORDER BY trust_domain",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0).map_err(db("list_federations")))
            .collect()
        })
    }

    fn delete_federation(&self, trust_domain: &str) -> Result<Option<Vec<u8>>> {
        let td = trust_domain.to_string();
        self.call("delete_federation", move |inner| async move {
            let c = inner.client("delete_federation").await?;
            query_opt(
                &c,
                "delete_federation",
                "WITH d AS (DELETE FROM ztid_federations WHERE trust_domain = $1 RETURNING record) \
                 SELECT d.record, pg_notify('ztid_changes', 'federation') FROM d",
                &[&td],
            )
            .await?
            .map(|r| r.try_get(0).map_err(db("delete_federation")))
            .transpose()
        })
    }

    fn put_grant(&self, grant: &GrantRecord) -> Result<()> {
        const WHAT: &str = "put_grant";
        let grant = grant.clone();
        self.call(WHAT, move |inner| async move {
            let mut c = inner.client(WHAT).await?;
            let tx = c.transaction().await.map_err(db(WHAT))?;
            // One writer at a time, cluster-wide: two servers cannot both see room
            // for the last grant.
            execute(
                &tx,
                WHAT,
                "SELECT pg_advisory_xact_lock($1)",
                &[&GRANTS_LOCK],
            )
            .await?;
            let exists = query_opt(
                &tx,
                WHAT,
                "SELECT 1 FROM ztid_grants WHERE id = $1",
                &[&grant.id],
            )
            .await?
            .is_some();
            if !exists {
                let n: i64 = query_one(&tx, WHAT, "SELECT count(*) FROM ztid_grants", &[])
                    .await?
                    .try_get(0)
                    .map_err(db(WHAT))?;
                if to_u64(n, "grant count")? >= MAX_GRANTS as u64 {
                    return Err(too_many_grants());
                }
            }
            execute(
                &tx,
                WHAT,
                "INSERT INTO ztid_grants (id, record) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&grant.id, &Json(&grant)],
            )
            .await?;
            tx.commit().await.map_err(db(WHAT))
        })
    }

    fn get_grant(&self, id: &str) -> Result<Option<GrantRecord>> {
        const WHAT: &str = "get_grant";
        let id = id.to_string();
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query_opt(
                &c,
                WHAT,
                "SELECT record FROM ztid_grants WHERE id = $1",
                &[&id],
            )
            .await?
            .map(|r| json(&r, 0, WHAT))
            .transpose()
        })
    }

    fn list_grants(&self) -> Result<Vec<GrantRecord>> {
        const WHAT: &str = "list_grants";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query(&c, WHAT, "SELECT record FROM ztid_grants ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| json(r, 0, WHAT))
                .collect()
        })
    }

    fn delete_grant(&self, id: &str) -> Result<Option<GrantRecord>> {
        const WHAT: &str = "delete_grant";
        let id = id.to_string();
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query_opt(
                &c,
                WHAT,
                "DELETE FROM ztid_grants WHERE id = $1 RETURNING record",
                &[&id],
            )
            .await?
            .map(|r| json(&r, 0, WHAT))
            .transpose()
        })
    }

    fn put_revocation(&self, revocation: &RevocationRecord) -> Result<()> {
        const WHAT: &str = "put_revocation";
        let revocation = revocation.clone();
        // Admin revocations in a table of their own (see `DataStore::put_revocation`).
        let (table, max, too_many): (&str, usize, fn() -> crate::Error) = match revocation.kind {
            RevocationKind::Admin => (
                "ztid_admin_revocations",
                crate::limits::MAX_ADMIN_REVOCATIONS,
                too_many_admin_revocations,
            ),
            _ => ("ztid_revocations", MAX_REVOCATIONS, too_many_revocations),
        };
        self.call(WHAT, move |inner| async move {
            let key = revocation.key();
            let mut c = inner.client(WHAT).await?;
            let tx = c.transaction().await.map_err(db(WHAT))?;
            execute(
                &tx,
                WHAT,
                "SELECT pg_advisory_xact_lock($1)",
                &[&REVOCATIONS_LOCK],
            )
            .await?;
            let exists = query_opt(
                &tx,
                WHAT,
                &format!("SELECT 1 FROM {table} WHERE key = $1"),
                &[&key],
            )
            .await?
            .is_some();
            if !exists {
                let n: i64 = query_one(&tx, WHAT, &format!("SELECT count(*) FROM {table}"), &[])
                    .await?
                    .try_get(0)
                    .map_err(db(WHAT))?;
                if to_u64(n, "revocation count")? >= max as u64 {
                    return Err(too_many());
                }
            }
            execute(
                &tx,
                WHAT,
                &format!(
                    "INSERT INTO {table} (key, expires_at, record) VALUES ($1, $2, $3) \
                     ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at, \
                     record = EXCLUDED.record"
                ),
                &[&key, &revocation.expires_at, &Json(&revocation)],
            )
            .await?;
            tx.commit().await.map_err(db(WHAT))
        })
    }

    fn list_revocations(&self) -> Result<Vec<RevocationRecord>> {
        const WHAT: &str = "list_revocations";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query(
                &c,
                WHAT,
                "SELECT key, record FROM ztid_admin_revocations \
                 UNION ALL SELECT key, record FROM ztid_revocations ORDER BY key",
                &[],
            )
            .await?
            .iter()
            .map(|r| json(r, 1, WHAT))
            .collect()
        })
    }

    fn prune_revocations(&self, before: i64) -> Result<u64> {
        const WHAT: &str = "prune_revocations";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            let mut removed = 0;
            for table in ["ztid_revocations", "ztid_admin_revocations"] {
                removed += execute(
                    &c,
                    WHAT,
                    &format!("DELETE FROM {table} WHERE expires_at < $1"),
                    &[&before],
                )
                .await?;
            }
            Ok(removed)
        })
    }

    fn put_hardware_bans(&self, bans: &[HardwareBanRecord]) -> Result<()> {
        const WHAT: &str = "put_hardware_bans";
        let bans = bans.to_vec();
        self.call(WHAT, move |inner| async move {
            let mut c = inner.client(WHAT).await?;
            let tx = c.transaction().await.map_err(db(WHAT))?;
            // One writer at a time, cluster-wide: the bound holds across servers.
            execute(
                &tx,
                WHAT,
                "SELECT pg_advisory_xact_lock($1)",
                &[&HARDWARE_BANS_LOCK],
            )
            .await?;
            let mut keys = std::collections::BTreeSet::new();
            let mut new: u64 = 0;
            for ban in &bans {
                if !keys.insert((ban.identifier.as_str(), ban.agent.as_str())) {
                    continue;
                }
                let exists = query_opt(
                    &tx,
                    WHAT,
                    "SELECT 1 FROM ztid_hardware_bans WHERE identifier = $1 AND agent = $2",
                    &[&ban.identifier, &ban.agent],
                )
                .await?
                .is_some();
                if !exists {
                    new += 1;
                }
            }
            if new > 0 {
                let n: i64 = query_one(&tx, WHAT, "SELECT count(*) FROM ztid_hardware_bans", &[])
                    .await?
                    .try_get(0)
                    .map_err(db(WHAT))?;
                if to_u64(n, "hardware ban count")?.saturating_add(new) > MAX_HARDWARE_BANS as u64 {
                    return Err(too_many_hardware_bans());
                }
            }
            for ban in &bans {
                execute(
                    &tx,
                    WHAT,
                    "INSERT INTO ztid_hardware_bans (identifier, agent, banned_at) \
                     VALUES ($1, $2, $3) \
                     ON CONFLICT (identifier, agent) DO UPDATE SET banned_at = EXCLUDED.banned_at",
                    &[&ban.identifier, &ban.agent, &ban.banned_at],
                )
                .await?;
            }
            tx.commit().await.map_err(db(WHAT))
        })
    }

    fn hardware_bans_of(&self, identifiers: &[String]) -> Result<Vec<HardwareBanRecord>> {
        const WHAT: &str = "hardware_bans_of";
        let identifiers = identifiers.to_vec();
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query(
                &c,
                WHAT,
                "SELECT identifier, agent, banned_at FROM ztid_hardware_bans \
                 WHERE identifier = ANY($1) ORDER BY identifier, agent",
                &[&identifiers],
            )
            .await?
            .iter()
            .map(|r| hardware_ban_of(r, WHAT))
            .collect()
        })
    }

    fn delete_hardware_bans(&self, agent: &str) -> Result<u64> {
        const WHAT: &str = "delete_hardware_bans";
        let agent = agent.to_string();
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            execute(
                &c,
                WHAT,
                "DELETE FROM ztid_hardware_bans WHERE agent = $1",
                &[&agent],
            )
            .await
        })
    }

    fn hardware_bans_of_agents(&self, agents: &[String]) -> Result<Vec<HardwareBanRecord>> {
        const WHAT: &str = "hardware_bans_of_agents";
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let agents = agents.to_vec();
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            // An index read (`ztid_hardware_bans_by_agent`, migration 0004).
            query(
                &c,
                WHAT,
                "SELECT identifier, agent, banned_at FROM ztid_hardware_bans \
                 WHERE agent = ANY($1) ORDER BY agent, identifier",
                &[&agents],
            )
            .await?
            .iter()
            .map(|r| hardware_ban_of(r, WHAT))
            .collect()
        })
    }

    fn list_hardware_bans(&self) -> Result<Vec<HardwareBanRecord>> {
        const WHAT: &str = "list_hardware_bans";
        self.call(WHAT, move |inner| async move {
            let c = inner.client(WHAT).await?;
            query(
                &c,
                WHAT,
                "SELECT identifier, agent, banned_at FROM ztid_hardware_bans \
                 ORDER BY identifier, agent",
                &[],
            )
            .await?
            .iter()
            .map(|r| hardware_ban_of(r, WHAT))
            .collect()
        })
    }

    fn flush(&self) -> Result<()> {
        // Every call commits before it returns: nothing is left to flush.
        Ok(())
    }

    fn audit_anchor(&self) -> Result<Option<Vec<u8>>> {
        self.call("audit_anchor", move |inner| async move {
            let c = inner.client("audit_anchor").await?;
            query_opt(
                &c,
                "audit_anchor",
                "SELECT record FROM ztid_audit_anchors WHERE server_id = $1",
                &[&inner.server_id],
            )
            .await?
            .map(|r| r.try_get(0).map_err(db("audit_anchor")))
            .transpose()
        })
    }

    fn advance_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<bool> {
        let seq = to_i64(seq, "audit sequence")?;
        let record = record.to_vec();
        self.call("advance_audit_anchor", move |inner| async move {
            let c = inner.client("advance_audit_anchor").await?;
            let n = execute(
                &c,
                "advance_audit_anchor",
                "INSERT INTO ztid_audit_anchors (server_id, seq, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (server_id) DO UPDATE SET seq = EXCLUDED.seq, record = EXCLUDED.record \
                 WHERE ztid_audit_anchors.seq <= EXCLUDED.seq",
                &[&inner.server_id, &seq, &record],
            )
            .await?;
            Ok(n == 1)
        })
    }

    fn replace_audit_anchor(&self, seq: u64, record: &[u8]) -> Result<()> {
        let seq = to_i64(seq, "audit sequence")?;
        let record = record.to_vec();
        self.call("replace_audit_anchor", move |inner| async move {
            let c = inner.client("replace_audit_anchor").await?;
            execute(
                &c,
                "replace_audit_anchor",
                "INSERT INTO ztid_audit_anchors (server_id, seq, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (server_id) DO UPDATE SET seq = EXCLUDED.seq, record = EXCLUDED.record",
                &[&inner.server_id, &seq, &record],
            )
            .await?;
            Ok(())
        })
    }
}
