//! `PostgresEngine`: the engine interface over PostgreSQL.
//!
//! The store calls engines from its writer and flusher threads and from
//! the blocking pool; this engine owns a small runtime and blocks on it
//! there. The writer's batch transaction runs on its own connection, outside
//! the pool; reads use the pool. A committed batch is durable (COMMIT with
//! `synchronous_commit` on), so making it durable again is nothing.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use prost::Message;
use tokio_postgres::{Client, NoTls, Row};

use super::{batch, connect, schema};
use crate::config::PostgresConfig;
use crate::proto::{Event, Order, RawDelivery, StoredOrder};
use crate::store::StoreError;
use crate::store::engine::RawRecords;
use crate::store::plan::{Counters, Planned, RefKind, WithHistory, Work, decode_raw};

/// Rows fetched per round trip when a range is read.
const RANGE_PAGE: i64 = 1000;

pub(crate) struct PostgresEngine {
    runtime: Option<tokio::runtime::Runtime>,
    /// The batch transactions (one writer per node), and its statements.
    writer: Mutex<(Client, batch::Prepared)>,
    pool: Pool,
    /// Server settings weaker than the no-loss promise needs.
    warnings: Vec<String>,
    /// Notifications of commits by any node (see [`listen`]).
    commits: Arc<Commits>,
    /// `store.postgres.follow_poll_ms`.
    follow_poll: Duration,
    /// How long a COMMIT may take (`store.postgres.statement_timeout_ms`).
    commit_timeout: Duration,
    /// The negative control's second connection, which hands out numbers
    /// outside the counter row's lock (test builds only; see
    /// [`batch::commit_batch`]).
    outside_the_lock: Option<Box<Client>>,
}

/// A count of commit notifications, and a condvar to wait for the next.
#[derive(Default)]
struct Commits {
    seen: Mutex<u64>,
    arrived: Condvar,
}

/// The channel every batch notifies on commit.
pub(super) const CHANNEL: &str = "ordertrail_events";

impl Drop for PostgresEngine {
    fn drop(&mut self) {
        // Dropped wherever the last handle goes, maybe on an async thread.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn failed(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable("PostgreSQL failed", e)
}

fn as_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PostgresEngine {
    /// Connects the writer, migrates the schema and opens the read pool.
    pub fn open(config: &PostgresConfig) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ordertrail-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::unavailable("cannot start the PostgreSQL runtime", e))?;
        let (writer, pool, warnings, outside_the_lock) = runtime.block_on(async {
            let mut writer = connect(config).await?;
            let outside_the_lock = match sequence_outside_the_lock(config) {
                true => Some(Box::new(connect(config).await?)),
                false => None,
            };
            schema::migrate(&mut writer).await?;
            let warnings = weak_settings(&writer).await?;
            let prepared = batch::Prepared::on(&writer).await?;
            let manager = Manager::from_config(
                super::session(config),
                NoTls,
                ManagerConfig { recycling_method: RecyclingMethod::Fast },
            );
            let pool = Pool::builder(manager)
                .max_size(config.pool_size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(failed)?;
            Ok::<_, StoreError>(((writer, prepared), pool, warnings, outside_the_lock))
        })?;
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        let commits = Arc::new(Commits::default());
        runtime.spawn(listen(super::session(config), commits.clone()));
        let (follow_poll, commit_timeout) = (config.follow_poll, config.statement_timeout);
        Ok(Self {
            runtime: Some(runtime),
            writer: Mutex::new(writer),
            pool,
            warnings,
            commits,
            follow_poll,
            commit_timeout,
            outside_the_lock,
        })
    }

    fn block_on<T>(&self, work: impl Future<Output = T>) -> T {
        match &self.runtime {
            Some(runtime) => runtime.block_on(work),
            None => unreachable!("the runtime lives until the engine is dropped"),
        }
    }

    /// Runs one query on a pooled connection.
    fn query(&self, sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        self.block_on(async {
            let client = self.pool.get().await.map_err(failed)?;
            client.query(sql, params).await.map_err(failed)
        })
    }

    /// Waits until some node committed (a notification arrived) or
    /// `timeout` passed. Only a wake-up: notifications are lost while the
    /// listening connection is down, so readers read `sequence > position`.
    pub fn wait_for_commit(&self, after: u64) {
        let seen = self.commits.seen.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.commits.arrived.wait_timeout_while(seen, self.follow_poll, |seen| *seen == after);
    }

    /// Wakes whoever waits for a commit (the store is closing).
    pub fn wake(&self) {
        *self.commits.seen.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.commits.arrived.notify_all();
    }

    /// How many commit notifications arrived so far (taken before a read,
    /// so that one arriving during it is not waited for).
    pub fn commits_seen(&self) -> u64 {
        *self.commits.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Server settings that weaken the promise (empty when there are none).
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// Plans and commits a batch in one transaction (see [`batch`]).
    pub fn commit_batch(
        &self,
        work: &[Work],
        retain_events: u64,
        before_commit: &mut (dyn FnMut(&Planned) + Send),
    ) -> Result<Planned, StoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (client, prepared) = &mut *writer;
        let outside_the_lock = self.outside_the_lock.as_deref();
        self.block_on(batch::commit_batch(
            client,
            prepared,
            work,
            retain_events,
            self.commit_timeout,
            outside_the_lock,
            before_commit,
        ))
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        let rows = self.query("SELECT last_sequence, last_raw, last_order FROM ot_counters WHERE id = 1", &[])?;
        let row = rows.first().ok_or_else(|| StoreError::Corrupt("the counter row is missing".into()))?;
        Ok(Counters { last_sequence: as_u64(row.get(0)), last_raw: as_u64(row.get(1)), last_order: as_u64(row.get(2)) })
    }

    /// The schema is versioned (see [`schema`]); the storage format is this
    /// build's.
    pub fn format(&self, current: u64, _empty: bool) -> Result<u64, StoreError> {
        Ok(current)
    }

    /// A committed batch is durable already.
    pub fn make_durable(&self, _durability: crate::config::Durability) -> std::io::Result<()> {
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    pub fn order(&self, id: u64) -> Result<Option<Order>, StoreError> {
        Ok(self.order_and_history(id)?.map(|(order, _)| order))
    }

    pub fn order_and_history(&self, id: u64) -> Result<Option<WithHistory>, StoreError> {
        let rows = self.query("SELECT stored FROM ot_orders WHERE id = $1", &[&as_i64(id)])?;
        rows.first().map(|row| decode_order(row.get(0))).transpose()
    }

    pub fn event(&self, sequence: u64) -> Result<Option<Event>, StoreError> {
        let rows = self.query("SELECT event FROM ot_events WHERE sequence = $1", &[&as_i64(sequence)])?;
        Ok(rows.first().map(|row| Event::decode(row.get::<_, &[u8]>(0))).transpose()?)
    }

    pub fn raw(&self, id: u64) -> Result<Option<RawDelivery>, StoreError> {
        let rows = self.query("SELECT record FROM ot_raw WHERE id = $1", &[&as_i64(id)])?;
        rows.first().map(|row| decode_raw(row.get::<_, &[u8]>(0))).transpose()
    }

    pub fn indexed(&self, kind: RefKind, value: &str, source: Option<&str>) -> Result<Vec<u64>, StoreError> {
        let kind = batch::kind_code(kind);
        let rows = match source {
            Some(source) => self.query(
                "SELECT order_id FROM ot_index WHERE kind = $1 AND value = $2 AND source = $3 ORDER BY order_id",
                &[&kind, &value, &source],
            )?,
            None => self.query(
                "SELECT order_id FROM ot_index WHERE kind = $1 AND value = $2 ORDER BY order_id",
                &[&kind, &value],
            )?,
        };
        Ok(rows.iter().map(|row| as_u64(row.get(0))).collect())
    }

    /// Rows of `sql` (which takes `$1` = after, `$2` = up to, `$3` = limit and
    /// returns the position first) page by page, decoded by `decode`.
    fn paged<T: Send + 'static>(
        &self,
        sql: &'static str,
        after: u64,
        upto: u64,
        decode: fn(&Row) -> Result<T, StoreError>,
    ) -> Box<dyn Iterator<Item = Result<T, StoreError>> + Send + '_> {
        let mut position = after;
        let mut page = std::vec::IntoIter::default();
        let mut done = after >= upto;
        Box::new(std::iter::from_fn(move || {
            loop {
                if let Some(row) = page.next() {
                    return Some(decode(&row));
                }
                if done {
                    return None;
                }
                let rows = match self.query(sql, &[&as_i64(position), &as_i64(upto), &RANGE_PAGE]) {
                    Ok(rows) => rows,
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                };
                done = (rows.len() as i64) < RANGE_PAGE;
                if let Some(last) = rows.last() {
                    position = as_u64(last.get(0));
                }
                page = rows.into_iter();
            }
        }))
    }

    pub fn orders_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<Order, StoreError>> + Send + '_> {
        self.paged(
            "SELECT id, stored FROM ot_orders WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            after,
            u64::MAX >> 1,
            |row| Ok(decode_order(row.get(1))?.0),
        )
    }

    pub fn events_encoded(
        &self,
        after: u64,
        upto: u64,
    ) -> Box<dyn Iterator<Item = Result<(u64, bytes::Bytes), StoreError>> + Send + '_> {
        self.paged(
            "SELECT sequence, event FROM ot_events WHERE sequence > $1 AND sequence <= $2 ORDER BY sequence LIMIT $3",
            after,
            upto,
            |row| Ok((as_u64(row.get(0)), bytes::Bytes::copy_from_slice(row.get(1)))),
        )
    }

    pub fn raws(&self, after: u64, upto: u64) -> Box<dyn Iterator<Item = Result<RawDelivery, StoreError>> + Send + '_> {
        self.paged(
            "SELECT id, record FROM ot_raw WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            after,
            upto.min(u64::MAX >> 1),
            |row| decode_raw(row.get::<_, &[u8]>(1)),
        )
    }

    pub fn raw_records_from(&self, from: u64) -> RawRecords<'_> {
        let records = self.paged(
            "SELECT id, record FROM ot_raw WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            from.saturating_sub(1),
            u64::MAX >> 1,
            |row| {
                let decoded = decode_raw(row.get::<_, &[u8]>(1)).map_err(|e| e.to_string());
                Ok((as_u64(row.get(0)), decoded))
            },
        );
        Box::new(records.map(|record| record.map_err(drop)))
    }

    pub fn quarantined_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<u64, StoreError>> + Send + '_> {
        self.paged(
            "SELECT id FROM ot_raw WHERE quarantined AND id > $1 AND id <= $2 ORDER BY id LIMIT $3",
            after,
            u64::MAX >> 1,
            |row| Ok(as_u64(row.get(0))),
        )
    }

    pub fn unmapped(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        let rows = self.query("SELECT provider, applies_to, value, count FROM ot_unmapped ORDER BY 1, 2, 3", &[])?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1), row.get(2), as_u64(row.get(3)))).collect())
    }

    pub fn remembered(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self.query("SELECT name, value FROM ot_remembered ORDER BY name", &[])?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    pub fn remember(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO ot_remembered (name, value) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &value],
        )
        .map(drop)
    }

    pub fn quarantined_count(&self) -> u64 {
        self.query("SELECT count(*) FROM ot_raw WHERE quarantined", &[])
            .ok()
            .and_then(|rows| rows.first().map(|row| as_u64(row.get(0))))
            .unwrap_or(0)
    }

    pub fn size_on_disk(&self) -> u64 {
        self.query("SELECT pg_database_size(current_database())", &[])
            .ok()
            .and_then(|rows| rows.first().map(|row| as_u64(row.get(0))))
            .unwrap_or(0)
    }

    /// PostgreSQL checks its own pages; there is nothing to read through.
    pub fn verify_step(&self, after: &[u8], _step: usize) -> Result<(Vec<u8>, usize, usize), String> {
        Ok((after.to_vec(), 0, 0))
    }

    #[cfg(any(test, feature = "test-util"))]
    pub fn set_format(&self, _format: u64) -> Result<(), StoreError> {
        Err(StoreError::Invalid("a PostgreSQL schema is versioned, not formatted".into()))
    }

    #[cfg(any(test, feature = "test-util"))]
    pub fn put_raw_record(&self, id: u64, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        match bytes {
            Some(bytes) => self.query("UPDATE ot_raw SET record = $2 WHERE id = $1", &[&as_i64(id), &bytes])?,
            None => self.query("DELETE FROM ot_raw WHERE id = $1", &[&as_i64(id)])?,
        };
        Ok(())
    }
}

/// Keeps a connection listening on [`CHANNEL`], reconnecting after a
/// second when it is lost, and counts the notifications.
async fn listen(session: tokio_postgres::Config, commits: Arc<Commits>) {
    loop {
        if let Ok((client, mut connection)) = session.connect(NoTls).await {
            let notified = async {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            *commits.seen.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                            commits.arrived.notify_all();
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
            };
            let statement = format!("LISTEN {CHANNEL}");
            let subscribe = client.batch_execute(&statement);
            // The connection is driven by `notified` while LISTEN runs.
            tokio::pin!(notified);
            tokio::select! {
                () = &mut notified => {}
                listening = subscribe => {
                    if listening.is_ok() {
                        notified.await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(any(test, feature = "test-util"))]
fn sequence_outside_the_lock(config: &PostgresConfig) -> bool {
    if config.unsafe_sequence_outside_lock {
        tracing::warn!("store.postgres.unsafe_sequence_outside_lock is set: readers can skip events");
    }
    config.unsafe_sequence_outside_lock
}

#[cfg(not(any(test, feature = "test-util")))]
fn sequence_outside_the_lock(_config: &PostgresConfig) -> bool {
    false
}

/// What the server's settings take from "acknowledged means durable".
async fn weak_settings(client: &Client) -> Result<Vec<String>, StoreError> {
    let mut warnings = Vec::new();
    for (setting, weak) in [("synchronous_commit", "off"), ("fsync", "off"), ("full_page_writes", "off")] {
        let row = client.query_one(&format!("SHOW {setting}"), &[]).await.map_err(failed)?;
        let value: String = row.get(0);
        if value == weak {
            warnings.push(format!(
                "PostgreSQL runs with {setting} = {value}: an acknowledged webhook can be lost when the database \
                 server crashes; set it to its default"
            ));
        }
    }
    Ok(warnings)
}

fn decode_order(stored: &[u8]) -> Result<WithHistory, StoreError> {
    let stored = StoredOrder::decode(stored)?;
    Ok((stored.order.unwrap_or_default(), stored.event_sequences))
}
