//! `ordertrail rebuild` on PostgreSQL: everything derived from the raw
//! deliveries is built again, with the current mappers, into a schema of
//! its own beside the live tables; then, in one transaction, the live
//! tables move to a kept schema and the rebuilt ones take their place.
//!
//! Every node must be stopped: a node writing meanwhile would write into
//! tables that are then moved aside. So the rebuild refuses to start while
//! another ordertrail session is connected (every session names itself
//! [`APPLICATION`]), and the swap refuses if a delivery arrived after the
//! copy (it checks under the live counter row's lock); the live tables are
//! then left as they were.

use tokio_postgres::Client;

use crate::config::PostgresConfig;
use crate::store::StoreError;

/// The `application_name` of every ordertrail session.
pub(crate) const APPLICATION: &str = "ordertrail";
/// Where a rebuild is built.
const REBUILD_SCHEMA: &str = "ordertrail_rebuild";
/// ordertrail's tables, moved together.
const TABLES: &[&str] = &[
    "ordertrail_schema",
    "ot_counters",
    "ot_raw",
    "ot_events",
    "ot_orders",
    "ot_index",
    "ot_dedup",
    "ot_unmapped",
    "ot_remembered",
];

fn failed(e: tokio_postgres::Error) -> StoreError {
    StoreError::unavailable("the rebuild failed", e)
}

/// Refuses while another ordertrail session is connected to the database,
/// then makes an empty schema to build in; returns the live schema's name.
pub(crate) async fn begin(client: &Client) -> Result<String, StoreError> {
    let others: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1 AND pid <> pg_backend_pid()",
            &[&APPLICATION],
        )
        .await
        .map_err(failed)?
        .get(0);
    if others > 0 {
        return Err(StoreError::Invalid(format!(
            "{others} other ordertrail sessions are connected to this database: stop every node before a rebuild"
        )));
    }
    let live: String = client.query_one("SELECT current_schema()", &[]).await.map_err(failed)?.get(0);
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {REBUILD_SCHEMA} CASCADE; CREATE SCHEMA {REBUILD_SCHEMA}"))
        .await
        .map_err(failed)?;
    Ok(live)
}

/// The settings of the stores that build in the rebuild schema.
pub(crate) fn in_rebuild_schema(config: &PostgresConfig) -> PostgresConfig {
    let mut config = config.clone();
    let search_path = format!("-c search_path={REBUILD_SCHEMA}");
    let options = match config.url.get_options() {
        Some(options) => format!("{options} {search_path}"),
        None => search_path,
    };
    config.url.options(&options);
    config
}

/// Moves the live tables of schema `live` to a kept schema and the
/// rebuilt ones into `live`, in one transaction, provided the live tables
/// still hold exactly `copied` raw deliveries; returns the kept schema.
pub(crate) async fn swap_in(client: &mut Client, live: &str, copied: u64, stamp: &str) -> Result<String, StoreError> {
    let kept = format!("ordertrail_before_rebuild_{stamp}");
    let tx = client.transaction().await.map_err(failed)?;
    let row = tx
        .query_one(&format!("SELECT last_raw FROM {live}.ot_counters WHERE id = 1 FOR UPDATE"), &[])
        .await
        .map_err(failed)?;
    let last_raw = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
    if last_raw != copied {
        return Err(StoreError::Invalid(format!(
            "deliveries arrived during the rebuild ({last_raw} stored, {copied} rebuilt): a node is running; \
             nothing was swapped"
        )));
    }
    let mut statements = vec![format!("CREATE SCHEMA {kept}")];
    for table in TABLES {
        statements.push(format!("ALTER TABLE {live}.{table} SET SCHEMA {kept}"));
        statements.push(format!("ALTER TABLE {REBUILD_SCHEMA}.{table} SET SCHEMA {live}"));
    }
    statements.push(format!("DROP SCHEMA {REBUILD_SCHEMA}"));
    tx.batch_execute(&statements.join(";\n")).await.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(kept)
}
