//! Versioned schema migrations, applied when a store connects.
//!
//! Each migration is a SQL file embedded in the binary (`migrations/NNNN_name.sql`),
//! applied once, in order, and recorded in `ztid_schema_migrations`. All pending ones
//! run in one transaction under a transaction-scoped advisory lock, so two servers
//! starting at the same moment do not both apply them: the second waits for the
//! first's commit, then finds nothing left to do. A database whose schema is newer
//! than this binary knows (a newer server migrated it) is refused: this binary would
//! write rows the newer schema no longer means the same way.

use tokio_postgres::Client;

use crate::{Error, Result, StoreError};

/// One embedded migration.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration this binary knows, oldest first.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "grants and revocations",
        sql: include_str!("migrations/0002_grants_revocations.sql"),
    },
    Migration {
        version: 3,
        name: "admin revocations",
        sql: include_str!("migrations/0003_admin_revocations.sql"),
    },
    Migration {
        version: 4,
        name: "hardware bans",
        sql: include_str!("migrations/0004_hardware_bans.sql"),
    },
];

/// The advisory lock key the migrations run under (`ztid` `mig`).
const MIGRATION_LOCK: i64 = 0x7a74_6964_006d_6967;

/// The newest schema version this binary knows.
pub(super) fn known_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

fn db(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::Store(StoreError::Database(format!("PostgreSQL: {what}: {e}")))
}

/// Brings the schema up to [`known_version`]; returns the version found before.
pub(super) async fn migrate(client: &mut Client) -> Result<i32> {
    let tx = client.transaction().await.map_err(db("schema migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db("schema migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ztid_schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db("schema migration table"))?;
    let found: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM ztid_schema_migrations",
            &[],
        )
        .await
        .map_err(db("schema version"))?
        .try_get(0)
        .map_err(db("schema version"))?;
    // A table of ours that another role owns (one that could create tables in this
    // schema before the first server ran: every role can in PostgreSQL 14's `public`)
    // stays readable and writable by that role, grants or not: refuse it.
    let foreign: Vec<String> = tx
        .query(
            "SELECT c.relname::text FROM pg_catalog.pg_class c \
             WHERE c.relname LIKE 'ztid\\_%' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
             AND pg_catalog.pg_table_is_visible(c.oid) \
             AND NOT pg_catalog.pg_has_role(current_user, c.relowner, 'MEMBER') \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(db("schema ownership"))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(db("schema ownership"))?;
    if !foreign.is_empty() {
        return Err(Error::Store(StoreError::Database(format!(
            "PostgreSQL: the tables {} are owned by another role than this server's: \
             refusing them (whoever owns them can read and rewrite everything in them); \
             drop them, or give the server a database where only its role may create \
             tables (REVOKE CREATE ON SCHEMA public FROM PUBLIC)",
            foreign.join(", ")
        ))));
    }
    let known = known_version();
    if found > known {
        return Err(Error::Store(StoreError::Database(format!(
            "PostgreSQL: the database schema is at version {found}, newer than this ztid-server knows \
             ({known}): run a ztid-server at least as new as the one that migrated it"
        ))));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        tx.batch_execute(m.sql)
            .await
            .map_err(db(&format!("schema migration {} ({})", m.version, m.name)))?;
        tx.execute(
            "INSERT INTO ztid_schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(db("recording a schema migration"))?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied datastore schema migration"
        );
    }
    tx.commit().await.map_err(db("schema migration commit"))?;
    Ok(found)
}
