//! Senders an allowlist refused, by network (/24 for IPv4, /48 for IPv6),
//! so a provider that starts sending from a new range shows up as "403s
//! from 198.51.100.0/24" rather than as silence.
//!
//! Bounded: at most [`MAX_NETWORKS`] networks are told apart (the rest
//! count as `other`, so a scan from many addresses cannot grow the metrics
//! without end), and each network is logged at its first refusal, then at
//! most once per [`LOG_EVERY`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// The most networks told apart.
pub const MAX_NETWORKS: usize = 256;
/// The shortest time between two log lines about one network.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The label of refusals beyond [`MAX_NETWORKS`].
const OTHER: &str = "other";

/// What to do about one refused sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Noted {
    /// Its network, or `other`.
    pub network: String,
    /// `Some(refusals not logged before)` when this one is to be logged.
    pub log: Option<u64>,
}

/// The refused networks seen, per source.
#[derive(Default)]
pub struct Senders {
    seen: Mutex<HashMap<(String, String), Seen>>,
}

struct Seen {
    logged: Instant,
    unlogged: u64,
}

impl Senders {
    pub fn note(&self, source: &str, sender: IpAddr) -> Noted {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut network = network_of(sender).to_string();
        if seen.len() >= MAX_NETWORKS && !seen.contains_key(&(source.to_string(), network.clone())) {
            network = OTHER.to_string();
        }
        let now = Instant::now();
        let log = match seen.get_mut(&(source.to_string(), network.clone())) {
            None => {
                seen.insert((source.to_string(), network.clone()), Seen { logged: now, unlogged: 0 });
                Some(0)
            }
            Some(entry) if now.duration_since(entry.logged) >= LOG_EVERY => {
                entry.logged = now;
                Some(std::mem::take(&mut entry.unlogged))
            }
            Some(entry) => {
                entry.unlogged += 1;
                None
            }
        };
        Noted { network, log }
    }
}

/// The /24 (IPv4) or /48 (IPv6) an address is in.
fn network_of(ip: IpAddr) -> IpNet {
    let prefix = match ip.to_canonical() {
        IpAddr::V4(_) => 24,
        IpAddr::V6(_) => 48,
    };
    IpNet::new(ip.to_canonical(), prefix).map(|net| net.trunc()).unwrap_or_else(|_| IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn senders_are_grouped_by_24_or_48_and_logged_once_per_network() {
        let senders = Senders::default();
        assert_eq!(
            senders.note("withings", ip("198.51.100.7")),
            Noted { network: "198.51.100.0/24".into(), log: Some(0) }
        );
        assert_eq!(senders.note("withings", ip("198.51.100.200")).log, None, "the same network again: not logged");
        assert_eq!(senders.note("other-source", ip("198.51.100.7")).log, Some(0), "per source");
        assert_eq!(senders.note("withings", ip("2001:db8:1:2::9")).network, "2001:db8:1::/48");
        assert_eq!(senders.note("withings", ip("::ffff:203.0.113.9")).network, "203.0.113.0/24", "mapped IPv4");
    }

    #[test]
    fn beyond_the_bound_refusals_count_as_other() {
        let senders = Senders::default();
        for n in 0..MAX_NETWORKS {
            let address = IpAddr::from([10, (n / 256) as u8, (n % 256) as u8, 1]);
            assert_ne!(senders.note("withings", address).network, OTHER);
        }
        assert_eq!(senders.note("withings", ip("192.0.2.1")).network, OTHER);
        assert_eq!(senders.note("withings", ip("10.0.5.9")).network, "10.0.5.0/24", "a known network stays itself");
        assert_eq!(senders.seen.lock().unwrap().len(), MAX_NETWORKS + 1, "bounded");
    }
}
