//! Getting every raw delivery out of a data dir as NDJSON, and back in.
//!
//! Export opens the engine directly, without the durability-mark check,
//! so an operator can salvage what is readable even from a damaged store.
//! Import stores each delivery again through the normal ingest path (current
//! mappers, dedup, group commit), keeping its bytes and provenance.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::engine::Engine;
use super::{IngestOutcome, Store, StoreError, layout};
use crate::config::StoreConfig;
use crate::ingest::{self, Mapper};
use crate::proto::RawDelivery;
use crate::provider::Provider;

/// Deliveries imported concurrently, so they share group commits.
const IMPORT_IN_FLIGHT: usize = 64;

/// One line of an export: a raw delivery, its body in base64.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportedDelivery {
    pub id: u64,
    pub request_id: String,
    /// RFC 3339 with nanoseconds.
    pub received_at: String,
    pub source: String,
    pub provider: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub content_type: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub peer_addr: String,
    #[serde(default)]
    pub auth_method: String,
    pub body_base64: String,
    pub body_sha256: String,
    /// "applied" or "quarantined" when exported.
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub quarantine_reason: String,
}

/// What an import did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub applied: u64,
    pub quarantined: u64,
    pub duplicates: u64,
}

/// What an export saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Deliveries written.
    pub exported: u64,
    /// Deliveries that are stored (their ids were handed out) but could not
    /// be read: damaged, or lost by sled's recovery.
    pub unreadable: u64,
}

/// Writes every readable stored raw delivery, oldest first, skipping what
/// cannot be read (damage in the middle of the database does not end the
/// export). On sled the instance must be stopped; on PostgreSQL the nodes
/// may run (the export reads, in pages), but not on this data dir.
pub fn export(config: &StoreConfig, out: &mut impl Write) -> Result<ExportSummary, StoreError> {
    let data_dir = &config.data_dir;
    let (engine, _held) = match config.backend {
        crate::config::Backend::Sled => (Engine::open_existing(data_dir)?, None),
        crate::config::Backend::Postgres => {
            super::create_data_dir(data_dir)?;
            let held = super::lock_data_dir(data_dir)?;
            (Engine::open(config)?, Some(held))
        }
    };
    // Ids are handed out without gaps, so every id up to the highest known
    // one was stored.
    let counted = engine.counters().map_or(0, |c| c.last_raw);
    let marked = super::mark::read(data_dir).ok().flatten().map_or(0, |m| m.durable_raw);
    let mut summary = ExportSummary::default();
    let mut next = 1;
    // A read error ends a scan; the next one starts after the damaged id.
    'scans: loop {
        for entry in engine.raw_records_from(next) {
            let Ok((id, decoded)) = entry else {
                summary.unreadable += 1;
                next += 1;
                if next > counted.max(marked) {
                    break 'scans;
                }
                continue 'scans;
            };
            summary.unreadable += id.saturating_sub(next);
            next = id + 1;
            match decoded {
                Ok(raw) => {
                    let line = serde_json::to_string(&exported(&raw))
                        .map_err(|e| StoreError::Invalid(format!("delivery {id} cannot be exported: {e}")))?;
                    writeln!(out, "{line}").map_err(|e| StoreError::unavailable("cannot write the export", e))?;
                    summary.exported += 1;
                }
                Err(_) => summary.unreadable += 1,
            }
        }
        break;
    }
    summary.unreadable += counted.max(marked).saturating_sub(next - 1);
    Ok(summary)
}

fn exported(raw: &RawDelivery) -> ExportedDelivery {
    let received_at = raw
        .received_at
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        .unwrap_or_default();
    ExportedDelivery {
        id: raw.id,
        request_id: raw.request_id.clone(),
        received_at,
        source: raw.source.clone(),
        provider: Provider::from_proto(raw.provider()).map(|p| p.name().to_string()).unwrap_or_default(),
        kind: raw.kind.clone(),
        content_type: raw.content_type.clone(),
        headers: raw.headers.clone(),
        peer_addr: raw.peer_addr.clone(),
        auth_method: raw.auth_method.clone(),
        body_base64: base64::engine::general_purpose::STANDARD.encode(&raw.body),
        body_sha256: raw.body_sha256.clone(),
        outcome: match raw.outcome() {
            crate::proto::DeliveryOutcome::Applied => "applied".into(),
            crate::proto::DeliveryOutcome::Quarantined => "quarantined".into(),
            crate::proto::DeliveryOutcome::Unspecified => String::new(),
        },
        quarantine_reason: raw.quarantine_reason.clone(),
    }
}

/// Reads one export line back into a raw delivery, checking its hash.
fn imported(line: &str, number: usize) -> Result<RawDelivery, StoreError> {
    let bad = |why: String| StoreError::Invalid(format!("import line {number}: {why}"));
    let e: ExportedDelivery = serde_json::from_str(line).map_err(|err| bad(err.to_string()))?;
    let body = base64::engine::general_purpose::STANDARD.decode(&e.body_base64).map_err(|err| bad(err.to_string()))?;
    if ingest::sha256_hex(&body) != e.body_sha256 {
        return Err(bad("the body does not match its sha256".into()));
    }
    let provider = Provider::from_name(&e.provider).ok_or_else(|| bad(format!("unknown provider `{}`", e.provider)))?;
    let received_at = chrono::DateTime::parse_from_rfc3339(&e.received_at)
        .map(|t| prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
        .map_err(|err| bad(format!("received_at: {err}")))?;
    Ok(RawDelivery {
        request_id: e.request_id,
        received_at: Some(received_at),
        source: e.source,
        provider: provider.to_proto() as i32,
        kind: e.kind,
        content_type: e.content_type,
        headers: e.headers,
        peer_addr: e.peer_addr,
        auth_method: e.auth_method,
        body: body.into(),
        body_sha256: e.body_sha256,
        ..RawDelivery::default()
    })
}

/// Stores every delivery of an export through the current mappers, in the
/// order of the file, sharing group commits. Identical deliveries are stored
/// once, so importing the same file twice changes nothing.
pub async fn import(store: &Store, input: impl BufRead) -> Result<ImportSummary, StoreError> {
    let deliveries = input.lines().enumerate().filter_map(|(index, line)| match line {
        Ok(line) if line.trim().is_empty() => None,
        Ok(line) => Some(imported(&line, index + 1)),
        Err(e) => Some(Err(StoreError::Invalid(format!("cannot read the import: {e}")))),
    });
    store_all(store, deliveries).await
}

/// Rebuilds all derived state of a stopped instance from its raw
/// deliveries with the current mappers: a new database is built beside the
/// old one, then swapped in; the old one is kept beside it. Returns the
/// summary and where the old database went. On PostgreSQL every node must
/// be stopped (see [`super::postgres::rebuild`]).
pub async fn rebuild(config: &StoreConfig, mapper: Mapper) -> Result<(ImportSummary, String), StoreError> {
    if let Some(postgres) = config.postgres.as_ref().filter(|_| config.backend == crate::config::Backend::Postgres) {
        return rebuild_postgres(config, postgres, mapper).await;
    }
    drop(Engine::open_existing(&config.data_dir)?);
    let work = layout::rebuild_dir(&config.data_dir);
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io_error)?;
    }
    let old = Store::open_unchecked(config, mapper).await?;
    let summary = build_into(&old, 0, u64::MAX).await;
    old.close().await?;
    let summary = summary?;
    Ok((summary, swap_in(&config.data_dir)?.display().to_string()))
}

/// [`rebuild`] on PostgreSQL: built in a schema of its own through a
/// second store (with its own data dir beside this one), then swapped in
/// by one transaction that first checks nothing arrived meanwhile.
async fn rebuild_postgres(
    config: &StoreConfig,
    postgres: &crate::config::PostgresConfig,
    mapper: Mapper,
) -> Result<(ImportSummary, String), StoreError> {
    use super::postgres::{connect, rebuild as pg};
    let mut client = connect(postgres).await?;
    super::postgres::schema::migrate(&mut client).await?;
    let live_schema = pg::begin(&client).await?;
    let live = Store::open_unchecked(config, mapper.clone()).await?;
    let work = layout::rebuild_dir(&config.data_dir);
    let fresh_config =
        StoreConfig { data_dir: work.clone(), postgres: Some(pg::in_rebuild_schema(postgres)), ..config.clone() };
    let built = async {
        let fresh = Store::open_unchecked(&fresh_config, mapper).await?;
        let summary = copy_raws(&live, &fresh, 0, u64::MAX).await;
        let summary = carry_remembered(&live, &fresh, summary).await;
        fresh.close().await?;
        summary
    }
    .await;
    live.close().await?;
    let summary = built?;
    // Raw ids are dense from 1: as many were read as the live tables hold
    // unless one arrived meanwhile, which the swap checks under the lock.
    let copied = summary.applied + summary.quarantined + summary.duplicates;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string().to_lowercase();
    let kept = pg::swap_in(&mut client, &live_schema, copied, &stamp).await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok((summary, format!("the PostgreSQL schema {kept}")))
}

impl Store {
    /// Rebuilds, beside the running database, everything derived from the
    /// raw deliveries durable now (while ingest goes on); the next start
    /// adds the deliveries that arrived meanwhile and swaps it in. Returns
    /// the summary and the last raw delivery it covers.
    pub async fn prepare_rebuild(&self) -> Result<(ImportSummary, u64), StoreError> {
        let data_dir = &self.inner.config.data_dir;
        let work = layout::rebuild_dir(data_dir);
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io_error)?;
        }
        let upto = self.inner.shared.durable_mark().durable_raw;
        let summary = build_into(self, 0, upto).await?;
        std::fs::write(layout::ready_file(data_dir), upto.to_string()).map_err(io_error)?;
        Ok((summary, upto))
    }
}

/// Completes a rebuild prepared by [`Store::prepare_rebuild`], if there is
/// one: adds what arrived after it, then swaps it in. Call before opening the
/// store. Returns where the old database went.
pub(super) async fn finish_pending_rebuild(
    config: &StoreConfig,
    mapper: &Mapper,
) -> Result<Option<PathBuf>, StoreError> {
    let work = layout::rebuild_dir(&config.data_dir);
    let ready_file = layout::ready_file(&config.data_dir);
    let ready = match std::fs::read_to_string(&ready_file) {
        Ok(text) => {
            text.trim().parse::<u64>().map_err(|e| StoreError::Corrupt(format!("{}: {e}", ready_file.display())))?
        }
        Err(_) => {
            // An interrupted preparation: start over next time.
            if work.exists() {
                std::fs::remove_dir_all(&work).map_err(io_error)?;
            }
            return Ok(None);
        }
    };
    let live = Store::open_unchecked(config, mapper.clone()).await?;
    let summary = build_into(&live, ready, u64::MAX).await;
    live.close().await?;
    let summary = summary?;
    tracing::info!(after = ready, added = summary.applied + summary.quarantined, "prepared rebuild completed");
    std::fs::remove_file(&ready_file).map_err(io_error)?;
    swap_in(&config.data_dir).map(Some)
}

/// Stores the raw deliveries of `source` with ids in `(after, upto]` into
/// the rebuild database (created if needed), through the current mappers.
async fn build_into(source: &Store, after: u64, upto: u64) -> Result<ImportSummary, StoreError> {
    let config = &source.inner.config;
    if config.backend != crate::config::Backend::Sled {
        return Err(StoreError::Invalid(
            "an online rebuild works on sled only; on PostgreSQL, stop every node and run `ordertrail rebuild`".into(),
        ));
    }
    let fresh_config = StoreConfig { data_dir: layout::rebuild_dir(&config.data_dir), ..config.clone() };
    let fresh = Store::open_unchecked(&fresh_config, source.inner.mapper.clone()).await?;
    let summary = copy_raws(source, &fresh, after, upto).await;
    let summary = carry_remembered(source, &fresh, summary).await;
    fresh.close().await?;
    summary
}

/// Carries what `source` remembers into `into` once the copy succeeded:
/// a rebuild derives deliveries again, but a remembered DNS answer cannot
/// be derived.
async fn carry_remembered(
    source: &Store,
    into: &Store,
    copied: Result<ImportSummary, StoreError>,
) -> Result<ImportSummary, StoreError> {
    let summary = copied?;
    for (name, value) in source.remembered().await? {
        into.remember(&name, value).await?;
    }
    Ok(summary)
}

/// Stores the raw deliveries of `source` with ids in `(after, upto]` into
/// `into` through the current mappers, reading a page at a time off the
/// runtime.
async fn copy_raws(source: &Store, into: &Store, after: u64, upto: u64) -> Result<ImportSummary, StoreError> {
    const PAGE: usize = 1000;
    let mut summary = ImportSummary::default();
    let mut position = after;
    loop {
        let page = source
            .read_off_runtime(move |engine| engine.raws(position, upto).take(PAGE).collect::<Result<Vec<_>, _>>())
            .await?;
        let Some(last) = page.last() else { return Ok(summary) };
        position = last.id;
        let full = page.len() == PAGE;
        let deliveries = page.into_iter().map(|mut raw| {
            // Only what arrived is kept; what was made of it is made again.
            raw.id = 0;
            raw.outcome = 0;
            raw.quarantine_reason.clear();
            raw.dedup_key.clear();
            raw.event_sequences.clear();
            raw.mapper_version = 0;
            Ok(raw)
        });
        let stored = store_all(into, deliveries).await?;
        summary.applied += stored.applied;
        summary.quarantined += stored.quarantined;
        summary.duplicates += stored.duplicates;
        if !full {
            return Ok(summary);
        }
    }
}

/// Moves the rebuilt database into place, keeping the old one.
fn swap_in(data_dir: &Path) -> Result<PathBuf, StoreError> {
    let (current, work) = (layout::engine_dir(data_dir), layout::rebuild_dir(data_dir));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let kept = layout::replaced_dir(data_dir, &stamp);
    std::fs::rename(&current, &kept).map_err(io_error)?;
    std::fs::rename(layout::engine_dir(&work), &current).map_err(io_error)?;
    std::fs::rename(layout::mark_file(&work), layout::mark_file(data_dir)).map_err(io_error)?;
    std::fs::remove_dir_all(&work).map_err(io_error)?;
    Ok(kept)
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::unavailable("rebuild failed", e)
}

/// Stores deliveries in order through the current mappers, sharing group
/// commits.
async fn store_all(
    store: &Store,
    deliveries: impl Iterator<Item = Result<RawDelivery, StoreError>>,
) -> Result<ImportSummary, StoreError> {
    let mut summary = ImportSummary::default();
    let mut in_flight = tokio::task::JoinSet::new();
    for raw in deliveries {
        // Submitted in file order; only the waits for durability overlap.
        let durable = store.submit_raw(raw?).await?;
        in_flight.spawn(durable);
        if in_flight.len() >= IMPORT_IN_FLIGHT {
            count(&mut summary, in_flight.join_next().await)?;
        }
    }
    while let Some(done) = in_flight.join_next().await {
        count(&mut summary, Some(done))?;
    }
    Ok(summary)
}

fn count(
    summary: &mut ImportSummary,
    done: Option<Result<Result<IngestOutcome, StoreError>, tokio::task::JoinError>>,
) -> Result<(), StoreError> {
    let Some(done) = done else { return Ok(()) };
    match done.map_err(|e| StoreError::unavailable("an import task failed", e))?? {
        IngestOutcome::Applied { .. } => summary.applied += 1,
        IngestOutcome::Quarantined { .. } => summary.quarantined += 1,
        IngestOutcome::Duplicate { .. } => summary.duplicates += 1,
    }
    Ok(())
}
