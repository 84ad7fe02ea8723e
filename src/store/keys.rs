//! The key layout of the one sled tree. Every key starts with a one-byte
//! keyspace tag; numbers are big-endian so byte order is numeric order;
//! strings inside composite keys are length-prefixed so no value can forge a
//! boundary.

use super::plan::RefKind;

/// Raw deliveries: `r` + raw id -> `RawDelivery`.
pub const RAW: u8 = b'r';
/// Events: `e` + sequence -> `Event`.
pub const EVENT: u8 = b'e';
/// Orders: `o` + order id -> `StoredOrder` (the order and its event
/// sequences).
pub const ORDER: u8 = b'o';
// `h` (one key per event of an order) was used up to storage format 2.
/// Reference indexes: `i` + ref kind + ref + source -> the ids of the
/// orders with that reference (ascending u64s), so a lookup is one read.
pub const INDEX: u8 = b'i';
/// Permanent dedup: `d` + source + SHA-256 of the dedup key (32 bytes,
/// whatever the key's length; no two keys share one) -> raw id + outcome.
pub const DEDUP: u8 = b'd';
/// Quarantine: `q` + raw id -> ().
pub const QUARANTINE: u8 = b'q';
/// Counters: `m` + name -> u64.
pub const META: u8 = b'm';
/// Unmapped status values: `u` + provider + what + value -> count (u64).
pub const UNMAPPED: u8 = b'u';
/// What the process remembers across restarts besides deliveries (a
/// followed allowlist's last good answer): `n` + name -> bytes.
pub const REMEMBERED: u8 = b'n';

/// The one-byte tag of a reference kind in index keys.
impl RefKind {
    fn tag(self) -> u8 {
        match self {
            Self::Merchant => b'm',
            Self::ProviderOrder => b'p',
            Self::Safe => b's',
            Self::Tracking => b't',
        }
    }
}

pub fn numbered(space: u8, n: u64) -> [u8; 9] {
    let mut key = [space; 9];
    key[1..].copy_from_slice(&n.to_be_bytes());
    key
}

/// The number at the end of a key.
pub fn trailing_u64(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    if key.len() >= 8 {
        bytes.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(bytes)
}

fn push_str(key: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(s.as_bytes());
}

/// Every index entry of `reference`, in any source.
pub fn index_prefix(kind: RefKind, reference: &str) -> Vec<u8> {
    let mut key = vec![INDEX, kind.tag()];
    push_str(&mut key, reference);
    key
}

/// Every index entry of `reference` in `source`.
pub fn index_source_prefix(kind: RefKind, reference: &str, source: &str) -> Vec<u8> {
    let mut key = index_prefix(kind, reference);
    push_str(&mut key, source);
    key
}

/// The index entry of `reference` in `source`.
pub fn index(kind: RefKind, reference: &str, source: &str) -> Vec<u8> {
    index_source_prefix(kind, reference, source)
}

/// The order ids in an index entry's value.
pub fn ids(value: &[u8]) -> impl Iterator<Item = u64> + '_ {
    value.chunks_exact(8).map(trailing_u64)
}

/// An index entry's value with `id` added in order; `None` if it is there.
pub fn with_id(value: &[u8], id: u64) -> Option<Vec<u8>> {
    let position = ids(value).position(|present| present >= id).unwrap_or(value.len() / 8);
    if ids(value).nth(position) == Some(id) {
        return None;
    }
    let mut out = Vec::with_capacity(value.len() + 8);
    out.extend_from_slice(&value[..position * 8]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&value[position * 8..]);
    Some(out)
}

pub fn dedup(source: &str, dedup_key: &str) -> Vec<u8> {
    use sha2::Digest;
    let mut key = vec![DEDUP];
    push_str(&mut key, source);
    key.extend_from_slice(&sha2::Sha256::digest(dedup_key.as_bytes()));
    key
}

pub fn unmapped(provider: &str, applies_to: &str, value: &str) -> Vec<u8> {
    let mut key = vec![UNMAPPED];
    push_str(&mut key, provider);
    push_str(&mut key, applies_to);
    key.extend_from_slice(value.as_bytes());
    key
}

/// Splits an [`unmapped`] key into (provider, what, value).
pub fn parse_unmapped(key: &[u8]) -> Option<(String, String, String)> {
    let mut rest = key.strip_prefix(&[UNMAPPED])?;
    let mut next = || -> Option<String> {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let text = String::from_utf8_lossy(rest.get(4..4 + len)?).into_owned();
        rest = &rest[4 + len..];
        Some(text)
    };
    let provider = next()?;
    let applies_to = next()?;
    Some((provider, applies_to, String::from_utf8_lossy(rest).into_owned()))
}

pub fn remembered(name: &str) -> Vec<u8> {
    let mut key = vec![REMEMBERED];
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn meta(name: &str) -> Vec<u8> {
    let mut key = vec![META];
    key.extend_from_slice(name.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_keys_sort_numerically() {
        assert!(numbered(EVENT, 255) < numbered(EVENT, 256));
        assert_eq!(trailing_u64(&numbered(EVENT, 42)), 42);
    }

    #[test]
    fn unmapped_keys_round_trip() {
        let key = unmapped("withings", "order", "TELE PORTED");
        assert_eq!(parse_unmapped(&key), Some(("withings".into(), "order".into(), "TELE PORTED".into())));
    }

    #[test]
    fn a_reference_cannot_reach_into_another() {
        // "ab" in source "c" must not share a prefix with "a" in source "bc".
        let a = index(RefKind::Merchant, "ab", "c");
        let b = index_source_prefix(RefKind::Merchant, "a", "bc");
        assert!(!a.starts_with(&b));
        assert!(!a.starts_with(&index_prefix(RefKind::Merchant, "a")));
    }
}
