//! One followed record's state: the last good answer and what each new
//! answer changes. Pure: the refresher feeds it answers and the time.
//!
//! Never fail open, never fail empty: a failed lookup, an empty answer or
//! one broader than the minimum prefix keeps the last good list. Until a
//! first good answer the record contributes nothing (the static entries
//! alone apply).

use std::time::{Duration, SystemTime};

use super::lookup::Answer;
use super::record::{self, Refused};
use crate::config::{MinPrefix, Network};

/// The shortest wait between two lookups, whatever the TTL says (unless
/// `refresh_ms` asks for a shorter one).
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// The last good answer of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Good {
    pub networks: Vec<Network>,
    pub at: SystemTime,
}

/// What one answer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The first good answer, or a changed one: what it added and removed.
    Changed { added: Vec<Network>, removed: Vec<Network>, skipped: Vec<String> },
    /// The same ranges again (the answer's time is still recorded).
    Unchanged { skipped: Vec<String> },
    /// The answer was not used; the last good list stays.
    Refused(Refused),
    /// The lookup failed; the last good list stays.
    Failed(String),
}

/// A followed record.
#[derive(Clone, Debug)]
pub struct Followed {
    pub name: String,
    min: MinPrefix,
    good: Option<Good>,
}

impl Followed {
    /// `remembered`: the last good answer kept from an earlier run.
    pub fn new(name: &str, min: MinPrefix, remembered: Option<Good>) -> Self {
        Self { name: name.to_string(), min, good: remembered }
    }

    pub fn good(&self) -> Option<&Good> {
        self.good.as_ref()
    }

    /// The broadest ranges an answer may hold.
    pub fn min(&self) -> MinPrefix {
        self.min
    }

    /// Takes the result of a lookup made at `now`.
    pub fn absorb(&mut self, looked_up: Result<&Answer, String>, now: SystemTime) -> Outcome {
        let answer = match looked_up {
            Ok(answer) => answer,
            Err(e) => return Outcome::Failed(e),
        };
        let ranges = match record::parse(answer.strings.iter().map(String::as_str), self.min) {
            Ok(ranges) => ranges,
            Err(refused) => return Outcome::Refused(refused),
        };
        let before = self.good.as_ref().map(|good| good.networks.clone()).unwrap_or_default();
        let changed = self.good.is_none() || before != ranges.networks;
        let added = ranges.networks.iter().filter(|n| !before.contains(n)).copied().collect();
        let removed = before.iter().filter(|n| !ranges.networks.contains(n)).copied().collect();
        self.good = Some(Good { networks: ranges.networks, at: now });
        match changed {
            true => Outcome::Changed { added, removed, skipped: ranges.skipped },
            false => Outcome::Unchanged { skipped: ranges.skipped },
        }
    }
}

/// When to look again after an answer with `ttl`: the TTL, but at least
/// [`MIN_REFRESH`] and at most `refresh` (after a failure: soon). A
/// `refresh` below [`MIN_REFRESH`] is obeyed: the operator asked for it.
pub fn next_lookup(ttl: Option<Duration>, refresh: Duration) -> Duration {
    let floor = MIN_REFRESH.min(refresh);
    ttl.unwrap_or(floor).clamp(floor, refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Answer {
        Answer { strings: vec![text.to_string()], ttl: Duration::from_secs(300) }
    }

    fn nets(list: &[&str]) -> Vec<Network> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn a_change_is_reported_once_with_what_was_added_and_removed() {
        let mut followed = Followed::new("ipblock.example", MinPrefix::default(), None);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let first = followed.absorb(Ok(&answer("198.51.100.0/24 203.0.113.0/24")), t0);
        assert_eq!(
            first,
            Outcome::Changed { added: nets(&["198.51.100.0/24", "203.0.113.0/24"]), removed: vec![], skipped: vec![] }
        );
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            followed.absorb(Ok(&answer("203.0.113.0/24, 198.51.100.0/24")), t1),
            Outcome::Unchanged { skipped: vec![] }
        );
        assert_eq!(followed.good().unwrap().at, t1, "the age counts from the last good answer");
        let moved = followed.absorb(Ok(&answer("203.0.113.0/24 192.0.2.0/24")), t1);
        assert_eq!(
            moved,
            Outcome::Changed { added: nets(&["192.0.2.0/24"]), removed: nets(&["198.51.100.0/24"]), skipped: vec![] }
        );
    }

    #[test]
    fn failures_empty_and_absurd_answers_keep_the_last_good_list() {
        let t0 = SystemTime::UNIX_EPOCH;
        let remembered = Good { networks: nets(&["198.51.100.0/24"]), at: t0 };
        let mut followed = Followed::new("ipblock.example", MinPrefix::default(), Some(remembered.clone()));
        assert!(matches!(followed.absorb(Err("timed out".into()), t0), Outcome::Failed(_)));
        assert!(matches!(followed.absorb(Ok(&answer("")), t0), Outcome::Refused(Refused::Empty { .. })));
        assert!(matches!(followed.absorb(Ok(&answer("0.0.0.0/0")), t0), Outcome::Refused(Refused::TooBroad(_))));
        assert!(matches!(followed.absorb(Ok(&answer("::/0")), t0), Outcome::Refused(Refused::TooBroad(_))));
        assert_eq!(followed.good(), Some(&remembered));
    }

    #[test]
    fn without_a_good_answer_the_record_contributes_nothing() {
        let mut followed = Followed::new("ipblock.example", MinPrefix::default(), None);
        assert!(matches!(followed.absorb(Err("no network".into()), SystemTime::UNIX_EPOCH), Outcome::Failed(_)));
        assert_eq!(followed.good(), None);
    }

    #[test]
    fn the_ttl_decides_when_to_look_again_within_bounds() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next_lookup(Some(Duration::from_secs(300)), hour), Duration::from_secs(300));
        assert_eq!(next_lookup(Some(Duration::from_secs(1)), hour), MIN_REFRESH, "a tiny TTL is not obeyed");
        assert_eq!(next_lookup(Some(Duration::from_secs(86_400)), hour), hour, "refresh_ms caps a long TTL");
        assert_eq!(next_lookup(None, hour), MIN_REFRESH, "after a failure, soon");
        let asked = Duration::from_millis(200);
        assert_eq!(next_lookup(Some(Duration::from_secs(300)), asked), asked, "a short refresh_ms is obeyed");
        assert_eq!(next_lookup(None, asked), asked);
    }
}
