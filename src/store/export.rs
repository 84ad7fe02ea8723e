//! Getting every raw delivery out of a data dir as NDJSON, and back in.
//!
//! Export opens the database directly, without the durability-mark check,
//! so an operator can salvage what is readable even from a damaged store.
//! Import stores each delivery again through the normal ingest path (current
//! mappers, dedup, group commit), keeping its bytes and provenance.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use base64::Engine;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::{Incoming, IngestOutcome, Store, StoreError, keys};
use crate::config::StoreConfig;
use crate::ingest::{self, Provider};
use crate::proto::RawDelivery;

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
/// export).
pub fn export(config: &StoreConfig, out: &mut impl Write) -> Result<ExportSummary, StoreError> {
    let dir = config.data_dir.join("sled");
    if !dir.join("db").exists() {
        return Err(StoreError::Unavailable(format!("no database in {}", dir.display())));
    }
    let db = super::open_sled(&dir, None)?;
    // Ids are handed out without gaps, so every id up to the highest known
    // one was stored.
    let counted = db.get(keys::meta("last_raw")).ok().flatten().map_or(0, |v| keys::trailing_u64(&v));
    let marked = super::mark::read(&config.data_dir).ok().flatten().map_or(0, |m| m.durable_raw);
    let mut summary = ExportSummary::default();
    let mut next = 1;
    // A read error ends a scan; the next one starts after the damaged id.
    'scans: loop {
        for entry in db.range(keys::numbered(keys::RAW, next)..=keys::numbered(keys::RAW, u64::MAX)) {
            let Ok((key, value)) = entry else {
                summary.unreadable += 1;
                next += 1;
                if next > counted.max(marked) {
                    break 'scans;
                }
                continue 'scans;
            };
            let id = keys::trailing_u64(&key);
            summary.unreadable += id.saturating_sub(next);
            next = id + 1;
            match RawDelivery::decode(&*value) {
                Ok(raw) => {
                    let line =
                        serde_json::to_string(&exported(&raw)).map_err(|e| StoreError::Unavailable(e.to_string()))?;
                    writeln!(out, "{line}")
                        .map_err(|e| StoreError::Unavailable(format!("cannot write the export: {e}")))?;
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
    let bad = |why: String| StoreError::Unavailable(format!("import line {number}: {why}"));
    let e: ExportedDelivery = serde_json::from_str(line).map_err(|err| bad(err.to_string()))?;
    let body = base64::engine::general_purpose::STANDARD.decode(&e.body_base64).map_err(|err| bad(err.to_string()))?;
    if ingest::sha256_hex(&body) != e.body_sha256 {
        return Err(bad("the body does not match its sha256".into()));
    }
    let provider = match e.provider.as_str() {
        "withings" => Provider::Withings,
        "winkelstraat" => Provider::Winkelstraat,
        "ordermesh" => Provider::OrderMesh,
        other => return Err(bad(format!("unknown provider `{other}`"))),
    };
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
pub async fn import(
    store: &Store,
    input: impl BufRead,
    kind_aliases: &Aliases<'_>,
) -> Result<ImportSummary, StoreError> {
    let deliveries = input.lines().enumerate().filter_map(|(index, line)| match line {
        Ok(line) if line.trim().is_empty() => None,
        Ok(line) => Some(imported(&line, index + 1)),
        Err(e) => Some(Err(StoreError::Unavailable(format!("cannot read the import: {e}")))),
    });
    store_all(store, deliveries, kind_aliases).await
}

/// The kind aliases of a source, by name.
pub type Aliases<'a> = dyn Fn(&str) -> std::collections::BTreeMap<String, String> + Send + Sync + 'a;

/// Rebuilds all derived state of a (stopped) data dir from its raw
/// deliveries with the current mappers: a new database is built beside the
/// old one, then swapped in; the old one is kept as `sled.before-rebuild-*`.
/// Returns the summary and where the old database went.
pub async fn rebuild(config: &StoreConfig, kind_aliases: &Aliases<'_>) -> Result<(ImportSummary, PathBuf), StoreError> {
    if !config.data_dir.join("sled").join("db").exists() {
        return Err(StoreError::Unavailable(format!("no database in {}", config.data_dir.display())));
    }
    let work = config.data_dir.join(REBUILD_DIR);
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io_error)?;
    }
    let old = Store::open(config)?;
    let summary = build_into(&old, 0, u64::MAX, config, kind_aliases).await;
    close(old).await?;
    let summary = summary?;
    Ok((summary, swap_in(config)?))
}

/// Where a rebuild is prepared, beside the live database.
const REBUILD_DIR: &str = "rebuild.partial";
/// Written into [`REBUILD_DIR`] once a rebuild is complete up to a raw id.
const READY_FILE: &str = "READY";

impl Store {
    /// Rebuilds, beside the running database, everything derived from the
    /// raw deliveries durable now (while ingest goes on); the next start
    /// adds the deliveries that arrived meanwhile and swaps it in. Returns
    /// the summary and the last raw delivery it covers.
    pub async fn prepare_rebuild(
        &self,
        config: &StoreConfig,
        kind_aliases: &Aliases<'_>,
    ) -> Result<(ImportSummary, u64), StoreError> {
        let work = config.data_dir.join(REBUILD_DIR);
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io_error)?;
        }
        let upto = self.inner.shared.durable_mark().durable_raw;
        let summary = build_into(self, 0, upto, config, kind_aliases).await?;
        std::fs::write(work.join(READY_FILE), upto.to_string()).map_err(io_error)?;
        Ok((summary, upto))
    }
}

/// Completes a rebuild prepared by [`Store::prepare_rebuild`], if there is
/// one: adds what arrived after it, then swaps it in. Call before opening the
/// store. Returns where the old database went.
pub async fn finish_pending_rebuild(
    config: &StoreConfig,
    kind_aliases: &Aliases<'_>,
) -> Result<Option<PathBuf>, StoreError> {
    let work = config.data_dir.join(REBUILD_DIR);
    let ready = match std::fs::read_to_string(work.join(READY_FILE)) {
        Ok(text) => {
            text.trim().parse::<u64>().map_err(|e| StoreError::Corrupt(format!("{REBUILD_DIR}/{READY_FILE}: {e}")))?
        }
        Err(_) => {
            // An interrupted preparation: start over next time.
            if work.exists() {
                std::fs::remove_dir_all(&work).map_err(io_error)?;
            }
            return Ok(None);
        }
    };
    let live = Store::open(config)?;
    let summary = build_into(&live, ready, u64::MAX, config, kind_aliases).await;
    close(live).await?;
    let summary = summary?;
    tracing::info!(after = ready, added = summary.applied + summary.quarantined, "prepared rebuild completed");
    std::fs::remove_file(work.join(READY_FILE)).map_err(io_error)?;
    swap_in(config).map(Some)
}

/// Stores the raw deliveries of `source` with ids in `(after, upto]` into
/// the rebuild database (created if needed), through the current mappers.
async fn build_into(
    source: &Store,
    after: u64,
    upto: u64,
    config: &StoreConfig,
    kind_aliases: &Aliases<'_>,
) -> Result<ImportSummary, StoreError> {
    let fresh = Store::open(&StoreConfig { data_dir: config.data_dir.join(REBUILD_DIR), ..config.clone() })?;
    let start = keys::numbered(keys::RAW, after.saturating_add(1));
    let end = keys::numbered(keys::RAW, upto.max(after.saturating_add(1)));
    let engine = source.engine()?;
    let range = (after < upto).then(|| engine.tree.range(start..=end)).into_iter().flatten();
    let deliveries = range.map(|entry| {
        let (_, value) = entry?;
        let mut raw = RawDelivery::decode(&*value)?;
        // Only what arrived is kept; what was made of it is made again.
        raw.id = 0;
        raw.outcome = 0;
        raw.quarantine_reason.clear();
        raw.dedup_key.clear();
        raw.event_sequences.clear();
        raw.mapper_version = 0;
        Ok(raw)
    });
    let summary = store_all(&fresh, deliveries, kind_aliases).await;
    close(fresh).await?;
    summary
}

async fn close(store: Store) -> Result<(), StoreError> {
    tokio::task::spawn_blocking(move || store.close()).await.map_err(|e| StoreError::Unavailable(e.to_string()))?
}

/// Moves the rebuilt database into place, keeping the old one.
fn swap_in(config: &StoreConfig) -> Result<PathBuf, StoreError> {
    let (current, work) = (config.data_dir.join("sled"), config.data_dir.join(REBUILD_DIR));
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let kept = config.data_dir.join(format!("sled.before-rebuild-{stamp}"));
    std::fs::rename(&current, &kept).map_err(io_error)?;
    std::fs::rename(work.join("sled"), &current).map_err(io_error)?;
    std::fs::rename(work.join("ordertrail-state.json"), config.data_dir.join("ordertrail-state.json"))
        .map_err(io_error)?;
    std::fs::remove_dir_all(&work).map_err(io_error)?;
    Ok(kept)
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Stores deliveries in order through the current mappers, sharing group
/// commits.
async fn store_all(
    store: &Store,
    deliveries: impl Iterator<Item = Result<RawDelivery, StoreError>>,
    kind_aliases: &Aliases<'_>,
) -> Result<ImportSummary, StoreError> {
    let mut summary = ImportSummary::default();
    let mut in_flight = tokio::task::JoinSet::new();
    for raw in deliveries {
        let raw = raw?;
        let mapped = ingest::map_raw(&raw, &kind_aliases(&raw.source));
        // Submitted in file order; only the waits for durability overlap.
        let durable = store.submit(Incoming { raw, mapped }).await?;
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
    match done.map_err(|e| StoreError::Unavailable(e.to_string()))?? {
        IngestOutcome::Applied { .. } => summary.applied += 1,
        IngestOutcome::Quarantined { .. } => summary.quarantined += 1,
        IngestOutcome::Duplicate { .. } => summary.duplicates += 1,
    }
    Ok(())
}
