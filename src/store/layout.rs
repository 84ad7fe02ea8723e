//! The names of everything the store keeps in the data directory.

use std::path::{Path, PathBuf};

/// The sled engine's database directory.
const ENGINE_DIR: &str = "sled";
/// The durability mark (see [`super::mark`]).
pub(super) const MARK_FILE: &str = "ordertrail-state.json";
/// Where a rebuild is prepared, beside the live database.
const REBUILD_DIR: &str = "rebuild.partial";
/// Written into the rebuild directory once a rebuild is complete up to a
/// raw id.
const READY_FILE: &str = "READY";
/// Locked by the process that holds the data dir, when its engine has no
/// lock of its own (PostgreSQL).
const LOCK_FILE: &str = "ordertrail.lock";
/// Written and fsynced to see whether storage works again.
const PROBE_FILE: &str = "ordertrail-probe";

pub(super) fn engine_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(ENGINE_DIR)
}

pub(super) fn mark_file(data_dir: &Path) -> PathBuf {
    data_dir.join(MARK_FILE)
}

/// The data dir a rebuild is built in.
pub(super) fn rebuild_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(REBUILD_DIR)
}

pub(super) fn ready_file(data_dir: &Path) -> PathBuf {
    rebuild_dir(data_dir).join(READY_FILE)
}

pub(super) fn lock_file(data_dir: &Path) -> PathBuf {
    data_dir.join(LOCK_FILE)
}

pub(super) fn probe_file(data_dir: &Path) -> PathBuf {
    data_dir.join(PROBE_FILE)
}

/// Where the database a rebuild replaced is kept.
pub(super) fn replaced_dir(data_dir: &Path, stamp: &str) -> PathBuf {
    data_dir.join(format!("{ENGINE_DIR}.before-rebuild-{stamp}"))
}
