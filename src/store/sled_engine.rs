//! The sled engine: the only file that names sled.
//!
//! One sled tree holds everything under one-byte keyspaces (see [`keys`]).
//! Batch reads are point reads (a local B-tree page each); a write set is
//! one atomic `apply_batch`; durability is sled's flush, plus fsync of its
//! files, blobs and directory in `fsync` mode.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;

use super::engine::RawRecords;
use super::keys;
use super::plan::{
    self, Counters, DedupEntry, Found, Planned, Reader, RefKind, Wants, WithHistory, Work, WriteSet, decode_raw,
};
use super::{StoreError, layout};
use crate::config::Durability;
use crate::proto::{DeliveryOutcome, Event, Order, RawDelivery, StoredOrder};

/// One opened sled database.
pub(crate) struct SledEngine {
    db: sled::Db,
    tree: sled::Tree,
    /// sled's directory.
    dir: PathBuf,
    /// Blob files already fsynced.
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => Self::Corrupt(e.to_string()),
            other => Self::unavailable("storage failed", other),
        }
    }
}

const COUNTER_NAMES: [&str; 3] = ["last_sequence", "last_raw", "last_order"];
const FORMAT_KEY: &str = "format";

impl SledEngine {
    /// Opens (or creates) the sled database of `data_dir`; sled recovers
    /// its log.
    pub fn open(data_dir: &Path, cache_capacity: Option<u64>) -> Result<Self, StoreError> {
        let dir = layout::engine_dir(data_dir);
        let db = open_sled(&dir, cache_capacity)?;
        let tree: sled::Tree = (*db).clone();
        Ok(Self { db, tree, dir, synced_blobs: Mutex::default() })
    }

    /// Opens an existing database only (never creates one).
    pub fn open_existing(data_dir: &Path) -> Result<Self, StoreError> {
        if !layout::engine_dir(data_dir).join("db").exists() {
            return Err(StoreError::unavailable_because(format!("no database in {}", data_dir.display())));
        }
        Self::open(data_dir, None)
    }

    /// The last ids handed out, derived from the newest key of each
    /// keyspace: raw records and orders are never removed, and pruning
    /// keeps the newest events. Nothing is rewritten per batch for them.
    /// Storage formats up to 4 also kept them in meta keys, which are read
    /// too (the larger count wins).
    pub fn counters(&self) -> Result<Counters, StoreError> {
        let recorded = |name: &str| -> Result<u64, StoreError> {
            Ok(self.tree.get(keys::meta(name))?.map(|v| keys::trailing_u64(&v)).unwrap_or(0))
        };
        let newest = |space: u8| -> Result<u64, StoreError> {
            Ok(self.tree.scan_prefix([space]).keys().next_back().transpose()?.map_or(0, |k| keys::trailing_u64(&k)))
        };
        Ok(Counters {
            last_sequence: newest(keys::EVENT)?.max(recorded(COUNTER_NAMES[0])?),
            last_raw: newest(keys::RAW)?.max(recorded(COUNTER_NAMES[1])?),
            last_order: newest(keys::ORDER)?.max(recorded(COUNTER_NAMES[2])?),
        })
    }

    /// The storage format recorded in the database; a new database gets
    /// `current`, one written before formats were recorded is format 1.
    pub fn format(&self, current: u64, empty: bool) -> Result<u64, StoreError> {
        match self.tree.get(keys::meta(FORMAT_KEY))? {
            Some(value) => Ok(keys::trailing_u64(&value)),
            None if empty => {
                self.tree.insert(keys::meta(FORMAT_KEY), &current.to_be_bytes())?;
                Ok(current)
            }
            None => Ok(1),
        }
    }

    /// Records an older storage format (tests of the format check).
    #[cfg(any(test, feature = "test-util"))]
    pub fn set_format(&self, format: u64) -> Result<(), StoreError> {
        self.tree.insert(keys::meta(FORMAT_KEY), &format.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Writes (or removes) a raw record's bytes as they are, durably: for
    /// tests of what reads do with damaged records.
    #[cfg(any(test, feature = "test-util"))]
    pub fn put_raw_record(&self, id: u64, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        let key = keys::numbered(keys::RAW, id);
        match bytes {
            Some(bytes) => drop(self.tree.insert(key, bytes)?),
            None => drop(self.tree.remove(key)?),
        }
        self.flush()
    }

    /// Plans a batch with this engine's reads and commits its write set
    /// (not yet durable: the flusher makes it so).
    pub fn commit_batch(
        &self,
        work: &[Work],
        counters: Counters,
        retain_events: u64,
        before_commit: &mut (dyn FnMut(&Planned) + Send),
    ) -> Result<Planned, StoreError> {
        let planned = plan::plan_with(self, work, counters, retain_events)?;
        before_commit(&planned);
        if planned.outcomes.iter().any(Result::is_ok) {
            self.apply(&planned.writes)?;
        }
        Ok(planned)
    }

    /// Commits a write set as one atomic batch (not yet durable).
    pub fn apply(&self, writes: &WriteSet) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for raw in &writes.raws {
            batch.insert(&keys::numbered(keys::RAW, raw.id), raw.encode_to_vec());
        }
        for (sequence, encoded) in &writes.events {
            batch.insert(&keys::numbered(keys::EVENT, *sequence), encoded.as_ref());
        }
        for sequence in &writes.pruned_events {
            batch.remove(&keys::numbered(keys::EVENT, *sequence));
        }
        for (id, (order, history)) in &writes.orders {
            batch.insert(&keys::numbered(keys::ORDER, *id), encode_order(order, history));
        }
        for (key, add) in &writes.index {
            let key = keys::index(key.kind, &key.value, &key.source);
            let mut value = match &add.present {
                // Nothing else writes between the batch's read and this.
                Some(present) => present.iter().flat_map(|id| id.to_be_bytes()).collect(),
                None => self.tree.get(&key)?.map(|v| v.to_vec()).unwrap_or_default(),
            };
            for id in &add.ids {
                if let Some(with) = keys::with_id(&value, *id) {
                    value = with;
                }
            }
            batch.insert(key, value);
        }
        for (key, entry) in &writes.dedup {
            let mut value = entry.raw_id.to_be_bytes().to_vec();
            value.push(entry.outcome as u8);
            batch.insert(keys::dedup(&key.source, &key.key), value);
        }
        for (raw_id, quarantined) in &writes.quarantine {
            let key = keys::numbered(keys::QUARANTINE, *raw_id);
            match quarantined {
                true => batch.insert(&key, &[]),
                false => batch.remove(&key),
            }
        }
        for (key, count) in &writes.unmapped {
            batch.insert(keys::unmapped(&key.provider, &key.applies_to, &key.value), &count.to_be_bytes());
        }
        // The counters are the newest keys written here (see `counters`).
        Ok(self.tree.apply_batch(batch)?)
    }

    /// sled's flush writes its log and waits for it (sync_file_range); in
    /// `fsync` mode the files, blobs and directories are then fsynced too,
    /// so metadata and the disk cache are covered as well.
    pub fn make_durable(&self, durability: Durability) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        if durability == Durability::Flush {
            return Ok(());
        }
        File::open(self.dir.join("db"))?.sync_all()?;
        self.sync_blobs()?;
        File::open(&self.dir)?.sync_all()
    }

    /// sled writes large values as files under `blobs/` without fsync.
    fn sync_blobs(&self) -> std::io::Result<()> {
        let blobs = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else { return Ok(()) };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                // A blob can be removed by sled between listing and opening.
                if let Ok(file) = File::open(blobs.join(&name)) {
                    file.sync_all()?;
                }
                new_files = true;
            }
            present.insert(name);
        }
        *synced = present;
        if new_files {
            File::open(&blobs)?.sync_all()?;
        }
        Ok(())
    }

    /// Writes everything out (a clean close).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Everything remembered: (name, value).
    pub fn remembered(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut all = Vec::new();
        for entry in self.tree.scan_prefix([keys::REMEMBERED]) {
            let (key, value) = entry?;
            all.push((String::from_utf8_lossy(&key[1..]).into_owned(), value.to_vec()));
        }
        Ok(all)
    }

    /// Remembers `value` under `name`, durably.
    pub fn remember(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::remembered(name), value)?;
        self.db.flush()?;
        Ok(())
    }

    // === point reads ===

    pub fn order(&self, id: u64) -> Result<Option<Order>, StoreError> {
        Ok(self.order_and_history(id)?.map(|(order, _)| order))
    }

    pub fn order_and_history(&self, id: u64) -> Result<Option<WithHistory>, StoreError> {
        self.tree.get(keys::numbered(keys::ORDER, id))?.map(|v| decode_order(&v)).transpose()
    }

    pub fn event(&self, sequence: u64) -> Result<Option<Event>, StoreError> {
        let value = self.tree.get(keys::numbered(keys::EVENT, sequence))?;
        Ok(value.map(|v| Event::decode(&*v)).transpose()?)
    }

    pub fn raw(&self, id: u64) -> Result<Option<RawDelivery>, StoreError> {
        let value = self.tree.get(keys::numbered(keys::RAW, id))?;
        value.map(|v| decode_raw(&v)).transpose()
    }

    /// Ids of the orders indexed under `value`, in `source` or in any source.
    pub fn indexed(&self, kind: RefKind, value: &str, source: Option<&str>) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        match source {
            Some(source) => {
                if let Some(entry) = self.tree.get(keys::index(kind, value, source))? {
                    ids.extend(keys::ids(&entry));
                }
            }
            None => {
                for entry in self.tree.scan_prefix(keys::index_prefix(kind, value)).values() {
                    ids.extend(keys::ids(&entry?));
                }
            }
        }
        Ok(ids)
    }

    // === ranges ===

    /// Orders with ids above `after`, ascending.
    pub fn orders_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<Order, StoreError>> + Send + '_> {
        let range = self.tree.range(keys::numbered(keys::ORDER, after.saturating_add(1))..);
        Box::new(range.take_while(|e| e.as_ref().map_or(true, |(k, _)| k[0] == keys::ORDER)).map(|entry| {
            let (_, value) = entry?;
            Ok(decode_order(&value)?.0)
        }))
    }

    /// Events in `(after, upto]`, as stored: (sequence, encoding).
    pub fn events_encoded(
        &self,
        after: u64,
        upto: u64,
    ) -> Box<dyn Iterator<Item = Result<(u64, bytes::Bytes), StoreError>> + Send + '_> {
        let start = keys::numbered(keys::EVENT, after.saturating_add(1));
        let end = keys::numbered(keys::EVENT, upto);
        let range = (after < upto).then(|| self.tree.range(start..=end)).into_iter().flatten();
        // sled's buffer is shared, not copied.
        Box::new(range.map(|entry| {
            let (key, value) = entry?;
            Ok((keys::trailing_u64(&key), bytes::Bytes::from_owner(value)))
        }))
    }

    /// Raw deliveries with ids in `(after, upto]`, ascending.
    pub fn raws(&self, after: u64, upto: u64) -> Box<dyn Iterator<Item = Result<RawDelivery, StoreError>> + Send + '_> {
        let start = keys::numbered(keys::RAW, after.saturating_add(1));
        let end = keys::numbered(keys::RAW, upto.max(after.saturating_add(1)));
        let range = (after < upto).then(|| self.tree.range(start..=end)).into_iter().flatten();
        Box::new(range.map(|entry| {
            let (_, value) = entry?;
            decode_raw(&value)
        }))
    }

    /// Every raw delivery from `from` on, by id; an unreadable record is
    /// `Err` with the id it was read at (export goes on after it).
    pub fn raw_records_from(&self, from: u64) -> RawRecords<'_> {
        let range = self.tree.range(keys::numbered(keys::RAW, from)..=keys::numbered(keys::RAW, u64::MAX));
        Box::new(range.map(|entry| {
            let (key, value) = entry.map_err(drop)?;
            Ok((keys::trailing_u64(&key), decode_raw(&value).map_err(|e| e.to_string())))
        }))
    }

    /// Quarantined raw ids above `after`, ascending.
    pub fn quarantined_after(&self, after: u64) -> Box<dyn Iterator<Item = Result<u64, StoreError>> + Send + '_> {
        let start = keys::numbered(keys::QUARANTINE, after.saturating_add(1));
        let end = keys::numbered(keys::QUARANTINE, u64::MAX);
        Box::new(self.tree.range(start..=end).keys().map(|key| Ok(keys::trailing_u64(&key?))))
    }

    /// (provider, applies to, value, count) of every unmapped status value.
    pub fn unmapped(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        self.tree
            .scan_prefix([keys::UNMAPPED])
            .map(|entry| {
                let (key, value) = entry?;
                let (provider, applies_to, status) =
                    keys::parse_unmapped(&key).ok_or_else(|| StoreError::Corrupt("bad unmapped key".into()))?;
                Ok((provider, applies_to, status, keys::trailing_u64(&value)))
            })
            .collect()
    }

    /// Nothing about sled's settings weakens the promise.
    pub fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    pub fn quarantined_count(&self) -> u64 {
        self.tree.scan_prefix([keys::QUARANTINE]).keys().count() as u64
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Reads up to `step` records after `after` (every keyspace) and checks
    /// each decodes; returns the last key read and the bytes read, or what
    /// is damaged.
    pub fn verify_step(&self, after: &[u8], step: usize) -> Result<(Vec<u8>, usize, usize), String> {
        let from = std::ops::Bound::Excluded(after.to_vec());
        let range =
            if after.is_empty() { self.tree.iter() } else { self.tree.range((from, std::ops::Bound::Unbounded)) };
        let (mut last, mut read, mut bytes) = (after.to_vec(), 0, 0);
        for entry in range.take(step) {
            let (key, value) = entry.map_err(|e| format!("a record after key {last:?} cannot be read: {e}"))?;
            read += 1;
            bytes += key.len() + value.len();
            check(&key, &value)?;
            last = key.to_vec();
        }
        Ok((last, read, bytes))
    }
}

/// Whether a record decodes as what its keyspace holds.
fn check(key: &[u8], value: &[u8]) -> Result<(), String> {
    let decoded = match key.first() {
        Some(&keys::RAW) => RawDelivery::decode(value).map(drop),
        Some(&keys::EVENT) => Event::decode(value).map(drop),
        Some(&keys::ORDER) => StoredOrder::decode(value).map(drop),
        _ => Ok(()),
    };
    decoded.map_err(|e| format!("record {:?} {} is damaged: {e}", key[0] as char, keys::trailing_u64(key)))
}

impl Reader for SledEngine {
    fn read(&self, wants: &Wants) -> Result<Found, StoreError> {
        let mut found = Found::default();
        for key in &wants.dedup {
            let value = self.tree.get(keys::dedup(&key.source, &key.key))?;
            found.dedup.insert(key.clone(), value.map(|v| dedup_entry(&v)));
        }
        for key in &wants.refs {
            found.refs.insert(key.clone(), self.indexed(key.kind, &key.value, Some(&key.source))?);
        }
        for id in &wants.orders {
            let value = self.tree.get(keys::numbered(keys::ORDER, *id))?;
            found.orders.insert(*id, value.map(|v| decode_order(&v)).transpose());
        }
        for id in &wants.raws {
            let quarantined = self.tree.contains_key(keys::numbered(keys::QUARANTINE, *id))?;
            let raw = self.tree.get(keys::numbered(keys::RAW, *id))?;
            let raw = raw.map(|v| decode_raw(&v)).transpose();
            found.raws.insert(*id, raw.map(|r| r.map(|r| (r, quarantined))));
        }
        for key in &wants.unmapped {
            let value = self.tree.get(keys::unmapped(&key.provider, &key.applies_to, &key.value))?;
            found.unmapped.insert(key.clone(), value.map_or(0, |v| keys::trailing_u64(&v)));
        }
        Ok(found)
    }
}

fn dedup_entry(value: &[u8]) -> DedupEntry {
    let outcome = match value.get(8) {
        Some(&b) if b == DeliveryOutcome::Quarantined as u8 => DeliveryOutcome::Quarantined,
        _ => DeliveryOutcome::Applied,
    };
    DedupEntry { raw_id: keys::trailing_u64(&value[..8.min(value.len())]), outcome }
}

/// An order's stored value: the order and its event sequences.
pub(crate) fn encode_order(order: &Order, history: &[u64]) -> Vec<u8> {
    // Encoded by reference: the order is not copied into the message.
    let mut value = Vec::with_capacity(order.encoded_len() + history.len() * 5 + 8);
    prost::encoding::message::encode(1, order, &mut value);
    prost::encoding::uint64::encode_packed(2, history, &mut value);
    value
}

fn decode_order(value: &[u8]) -> Result<WithHistory, StoreError> {
    let stored = StoredOrder::decode(value)?;
    Ok((stored.order.unwrap_or_default(), stored.event_sequences))
}

/// How often opening a locked database is tried again, 50 ms apart: sled's
/// own I/O threads can hold its lock for a while after the last handle is
/// dropped, longer on a busy machine.
const LOCK_RETRIES: usize = 100;

thread_local! {
    /// Set while sled opens a database: a panic there is reported as damage.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Opens the sled database in `dir`. sled panics on some damaged logs (a
/// truncated one, for instance); that is reported as damage in one line,
/// like every other damage, not as a crash.
fn open_sled(dir: &Path, cache_capacity: Option<u64>) -> Result<sled::Db, StoreError> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let open = || {
        QUIET_PANICS.with(|quiet| quiet.set(true));
        let opened = std::panic::catch_unwind(|| {
            let config = sled::Config::new().path(dir);
            match cache_capacity {
                Some(bytes) => config.cache_capacity(bytes).open(),
                None => config.open(),
            }
        });
        QUIET_PANICS.with(|quiet| quiet.set(false));
        opened
    };
    // A database closed a moment ago (in this process or another) may
    // still be locked while sled's own threads wind down (up to 5 s here).
    let mut opened = open();
    for _ in 0..LOCK_RETRIES {
        match &opened {
            // sled reports its lock as an `Other` error with this text.
            Ok(Err(sled::Error::Io(e))) if e.to_string().starts_with("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                opened = open();
            }
            _ => break,
        }
    }
    match opened {
        Ok(result) => result.map_err(|e| open_error(dir, e)),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(StoreError::Corrupt(format!(
                "the database in {} is damaged: sled cannot recover it ({why}); refusing to start. Restore a \
                 backup, or salvage what is readable with `ordertrail export`",
                dir.display()
            )))
        }
    }
}

fn open_error(dir: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => {
            StoreError::Corrupt(format!("the database in {} is corrupt ({e}); refusing to start", dir.display()))
        }
        other => StoreError::unavailable(format!("cannot open the database in {}", dir.display()), other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_order_reads_back_with_its_history() {
        let order = Order { id: 7, source: "shop".into(), ..Order::default() };
        let (decoded, history) = decode_order(&encode_order(&order, &[3, 9, 42])).unwrap();
        assert_eq!((decoded, history), (order, vec![3, 9, 42]));
    }

    #[test]
    fn the_counters_are_the_newest_keys_or_the_recorded_ones_of_older_formats() {
        let dir = tempfile::tempdir().unwrap();
        let engine = SledEngine::open(dir.path(), None).unwrap();
        assert_eq!(engine.counters().unwrap(), Counters::default(), "a new database");
        for raw in [1u64, 2, 3] {
            engine.tree.insert(keys::numbered(keys::RAW, raw), b"r".as_slice()).unwrap();
        }
        // Events 1 and 2 pruned, 3 to 5 kept; orders 1 and 2.
        for (space, ids) in [(keys::EVENT, &[3u64, 4, 5][..]), (keys::ORDER, &[1, 2][..])] {
            for id in ids {
                engine.tree.insert(keys::numbered(space, *id), b"x".as_slice()).unwrap();
            }
        }
        engine.tree.insert(keys::meta("format"), &5u64.to_be_bytes()).unwrap();
        let expected = Counters { last_sequence: 5, last_raw: 3, last_order: 2 };
        assert_eq!(engine.counters().unwrap(), expected, "from the newest keys");
        drop(engine);
        let engine = SledEngine::open(dir.path(), None).unwrap();
        assert_eq!(engine.counters().unwrap(), expected, "after a reopen");
        // A format-4 database recorded them; a larger recorded count wins.
        engine.tree.insert(keys::meta("last_raw"), &9u64.to_be_bytes()).unwrap();
        assert_eq!(engine.counters().unwrap().last_raw, 9);
    }
}
