//! The writes of one writer turn, before they are applied to sled.
//!
//! sled pays a fixed price per applied batch (it seals and writes an I/O
//! buffer), so the writer applies the deliveries it finds queued as one
//! atomic batch. Until then their writes live here, and every read of the
//! writer goes through this overlay, so each delivery sees the ones before
//! it exactly as if they had been applied.
//!
//! Two layers: the delivery being processed, and the deliveries of this
//! turn already kept. A delivery's writes are kept only once it is
//! complete; should processing fail half-way (an error, a bug that
//! panics), [`Overlay::discard`] drops its writes and nothing else.

use std::collections::BTreeMap;

use sled::IVec;

/// Pending writes: `None` is a removal.
type Layer = BTreeMap<Vec<u8>, Option<IVec>>;

pub(super) struct Overlay {
    tree: sled::Tree,
    turn: Layer,
    delivery: Layer,
    /// Raw bytes kept in this turn (to bound a turn's memory).
    bytes: usize,
}

impl Overlay {
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree, turn: Layer::new(), delivery: Layer::new(), bytes: 0 }
    }

    fn pending(&self, key: &[u8]) -> Option<&Option<IVec>> {
        self.delivery.get(key).or_else(|| self.turn.get(key))
    }

    pub fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        match self.pending(key) {
            Some(value) => Ok(value.clone()),
            None => self.tree.get(key),
        }
    }

    pub fn contains_key(&self, key: &[u8]) -> sled::Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<IVec>) {
        let value = value.into();
        self.bytes += value.len();
        self.delivery.insert(key.into(), Some(value));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.delivery.insert(key.into(), None);
    }

    /// The delivery is complete: its writes join the turn.
    pub fn keep(&mut self) {
        let delivery = std::mem::take(&mut self.delivery);
        self.turn.extend(delivery);
    }

    /// The delivery failed: its writes are dropped.
    pub fn discard(&mut self) {
        self.delivery.clear();
    }

    /// Bytes written in this turn so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the kept writes as one atomic batch and starts a new turn.
    pub fn take_batch(&mut self) -> sled::Batch {
        self.delivery.clear();
        self.bytes = 0;
        let mut batch = sled::Batch::default();
        for (key, value) in std::mem::take(&mut self.turn) {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }

    /// Drops everything of this turn (its batch could not be applied).
    pub fn clear(&mut self) {
        self.turn.clear();
        self.delivery.clear();
        self.bytes = 0;
    }
}

impl super::Read for Overlay {
    fn read(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        self.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).temporary(true).open().unwrap();
        (dir, Overlay::new((*db).clone()))
    }

    #[test]
    fn reads_see_pending_writes_over_the_tree() {
        let (_dir, mut overlay) = overlay();
        overlay.tree.insert(b"a1", b"tree".as_slice()).unwrap();
        overlay.tree.insert(b"a2", b"tree".as_slice()).unwrap();
        overlay.insert(b"a3".to_vec(), b"mine".as_slice());
        overlay.keep();
        overlay.remove(b"a1".to_vec());
        overlay.insert(b"b1".to_vec(), b"other".as_slice());
        assert_eq!(overlay.get(b"a1").unwrap(), None);
        assert_eq!(overlay.get(b"a2").unwrap().as_deref(), Some(b"tree".as_slice()));
        assert_eq!(overlay.get(b"a3").unwrap().as_deref(), Some(b"mine".as_slice()));
    }

    #[test]
    fn a_discarded_delivery_leaves_the_turn_as_it_was() {
        let (_dir, mut overlay) = overlay();
        overlay.insert(b"k".to_vec(), b"kept".as_slice());
        overlay.keep();
        overlay.insert(b"k".to_vec(), b"half-done".as_slice());
        overlay.insert(b"x".to_vec(), b"half-done".as_slice());
        overlay.discard();
        assert_eq!(overlay.get(b"k").unwrap().as_deref(), Some(b"kept".as_slice()));
        assert!(!overlay.contains_key(b"x").unwrap());
        let batch = overlay.take_batch();
        overlay.tree.apply_batch(batch).unwrap();
        assert_eq!(overlay.tree.get(b"k").unwrap().as_deref(), Some(b"kept".as_slice()));
        assert_eq!(overlay.tree.len(), 1);
    }
}
