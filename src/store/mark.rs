//! The durability mark: a small file beside the database recording how far
//! it was known to be durable. sled recovers whatever prefix of its log it
//! can read, so a damaged database can open "successfully" with data missing
//! (even empty). Comparing what it recovered with the mark turns that into a
//! refusal to start instead of silently reassigning sequences.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// How far the database was durable when the mark was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub durable_sequence: u64,
    pub durable_raw: u64,
}

fn path(data_dir: &Path) -> PathBuf {
    super::layout::mark_file(data_dir)
}

/// The mark, if one was ever written.
pub fn read(data_dir: &Path) -> Result<Option<Mark>, StoreError> {
    let path = path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("{} is unreadable ({e}); refusing to start", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::unavailable_because(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Replaces the mark atomically (write, sync, rename, sync the directory).
/// `sync` is false in `flush` durability mode, where the database itself is
/// not fsynced either: a mark must never be more durable than the data.
pub fn write(data_dir: &Path, mark: Mark, sync: bool) -> std::io::Result<()> {
    let target = path(data_dir);
    let temporary = data_dir.join(format!("{}.tmp", super::layout::MARK_FILE));
    let mut file = File::create(&temporary)?;
    file.write_all(&serde_json::to_vec(&mark).unwrap_or_default())?;
    if sync {
        file.sync_all()?;
    }
    std::fs::rename(&temporary, &target)?;
    if sync {
        File::open(data_dir)?.sync_all()?;
    }
    Ok(())
}

/// Refuses a database that recovered less than the mark says was durable.
pub fn check(data_dir: &Path, mark: Option<Mark>, recovered: Mark) -> Result<(), StoreError> {
    let Some(mark) = mark else { return Ok(()) };
    if recovered.durable_sequence < mark.durable_sequence || recovered.durable_raw < mark.durable_raw {
        return Err(StoreError::Corrupt(format!(
            "the database in {} is damaged: it recovered up to sequence {} and delivery {}, but sequence {} and \
             delivery {} were durable; refusing to start. Restore a backup, or salvage what is readable with \
             `ordertrail export`",
            data_dir.display(),
            recovered.durable_sequence,
            recovered.durable_raw,
            mark.durable_sequence,
            mark.durable_raw
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_behind_its_mark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let mark = Mark { durable_sequence: 10, durable_raw: 12 };
        write(dir.path(), mark, true).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(mark));
        assert!(check(dir.path(), Some(mark), Mark { durable_sequence: 10, durable_raw: 12 }).is_ok());
        assert!(check(dir.path(), Some(mark), Mark { durable_sequence: 11, durable_raw: 15 }).is_ok());
        let err = check(dir.path(), Some(mark), Mark { durable_sequence: 0, durable_raw: 0 }).unwrap_err();
        assert!(err.to_string().contains("refusing to start"), "{err}");
        std::fs::write(path(dir.path()), "garbage").unwrap();
        assert!(read(dir.path()).is_err());
    }
}
