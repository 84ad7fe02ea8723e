//! ordertrail's tables in PostgreSQL, created and migrated at start.
//!
//! Versioned: `ordertrail_schema` holds the version a database is at, and
//! each migration moves it one step, in its own transaction. Nodes that
//! start at the same moment take a session advisory lock first, so one
//! migrates and the others find the work done. A database at a version this
//! build does not know is refused: a newer build wrote it.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock key of migrations (`hashtext('ordertrail schema')` is
/// not stable across PostgreSQL versions; a constant is).
const MIGRATION_LOCK: i64 = 0x6f72_6465_7274_7261;

/// The migrations, in order: migration `i` takes a database from version
/// `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the tables of storage format 4 (see `store::plan::WriteSet`).
    "CREATE TABLE ot_counters (
         id smallint PRIMARY KEY CHECK (id = 1),
         last_sequence bigint NOT NULL,
         last_raw bigint NOT NULL,
         last_order bigint NOT NULL
     );
     INSERT INTO ot_counters VALUES (1, 0, 0, 0);
     CREATE TABLE ot_raw (
         id bigint PRIMARY KEY,
         record bytea NOT NULL,
         quarantined boolean NOT NULL DEFAULT false
     );
     CREATE INDEX ot_raw_quarantined ON ot_raw (id) WHERE quarantined;
     CREATE TABLE ot_events (sequence bigint PRIMARY KEY, event bytea NOT NULL);
     CREATE TABLE ot_orders (id bigint PRIMARY KEY, stored bytea NOT NULL);
     CREATE TABLE ot_index (
         kind smallint NOT NULL,
         value text NOT NULL,
         source text NOT NULL,
         order_id bigint NOT NULL,
         PRIMARY KEY (kind, value, source, order_id)
     );
     CREATE TABLE ot_dedup (
         source text NOT NULL,
         key text NOT NULL,
         raw_id bigint NOT NULL,
         outcome smallint NOT NULL,
         PRIMARY KEY (source, key)
     );
     CREATE TABLE ot_unmapped (
         provider text NOT NULL,
         applies_to text NOT NULL,
         value text NOT NULL,
         count bigint NOT NULL,
         PRIMARY KEY (provider, applies_to, value)
     );",
    // 2: what a node remembers besides deliveries (a followed allowlist's
    // last good answer), shared by every node.
    "CREATE TABLE ot_remembered (name text PRIMARY KEY, value bytea NOT NULL);",
];

/// The schema version this build writes and reads.
pub(crate) const VERSION: i32 = MIGRATIONS.len() as i32;

/// Brings the database to [`VERSION`], or refuses one that is newer.
/// Returns the version it was at.
pub(crate) async fn migrate(client: &mut Client) -> Result<i32, StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(unavailable)?;
    let migrated = migrate_locked(client).await;
    // Also released when the session ends, should this fail.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
    migrated
}

async fn migrate_locked(client: &mut Client) -> Result<i32, StoreError> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS ordertrail_schema (version integer NOT NULL)")
        .await
        .map_err(unavailable)?;
    let row = client.query_opt("SELECT version FROM ordertrail_schema", &[]).await.map_err(unavailable)?;
    let found: i32 = row.map_or(0, |row| row.get(0));
    if found > VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database is at ordertrail schema version {found}, newer than this build understands ({VERSION}): \
             run the newer build, or restore a backup"
        )));
    }
    for (version, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let transaction = client.transaction().await.map_err(unavailable)?;
        transaction.batch_execute(migration).await.map_err(unavailable)?;
        transaction.execute("DELETE FROM ordertrail_schema", &[]).await.map_err(unavailable)?;
        let next = version as i32 + 1;
        transaction.execute("INSERT INTO ordertrail_schema VALUES ($1)", &[&next]).await.map_err(unavailable)?;
        transaction.commit().await.map_err(unavailable)?;
        tracing::info!(version = next, "database schema migrated");
    }
    Ok(found)
}

fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::unavailable("the database schema could not be checked", e)
}
