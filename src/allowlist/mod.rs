//! Sender allowlists that follow DNS TXT records, as Withings asks its
//! receivers to do ("refer to the TXT record from
//! ipblock-notify.withings.net … make sure you monitor it"), and the
//! senders allowlists refuse.
//!
//! [`record`] reads what a record says, [`lookup`] asks DNS for it,
//! [`followed`] keeps one record's last good answer and says what each new
//! one changes. [`Allowlists`] holds every followed record of the config:
//! the front door asks it what a source's records allow now (the static
//! `allow` entries are checked beside it), [`Allowlists::follow`] refreshes
//! the records on a timer and remembers each good answer with the store, so
//! a restart without DNS starts with it. [`refused`] keeps refused senders
//! visible, by network.

mod followed;
mod lookup;
mod record;
mod refused;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, Config, MinPrefix, Network};
use crate::metrics::Metrics;
use crate::store::Store;
use followed::{Followed, Good, Outcome};
pub use refused::Noted;

/// How long one DNS question may take (it is asked twice).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait between two lookups of a record without `refresh_ms`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// Every followed record of the config, and what each source's records
/// allow now.
pub struct Allowlists {
    records: Vec<Record>,
    /// Per source with records: the union of their last good answers.
    allowed: HashMap<String, RwLock<Arc<[Network]>>>,
    refused: refused::Senders,
}

/// One record followed for one source.
struct Record {
    source: String,
    refresh: Duration,
    server: Option<SocketAddr>,
    followed: Mutex<Followed>,
}

/// What one followed record contributes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub source: String,
    /// The DNS name followed.
    pub record: String,
    /// The ranges of its last good answer; empty before the first.
    pub networks: Vec<Network>,
    /// When the last good answer came (from DNS, in this run or an
    /// earlier one).
    pub at: Option<SystemTime>,
}

impl Status {
    /// The age of the last good answer.
    pub fn age(&self) -> Option<Duration> {
        self.at.map(|at| SystemTime::now().duration_since(at).unwrap_or_default())
    }
}

/// A last good answer as remembered with the store.
#[derive(serde::Serialize, serde::Deserialize)]
struct Remembered {
    networks: Vec<String>,
    at_unix_ms: u64,
}

/// The name a record's last good answer is remembered under.
fn remembered_name(record: &str) -> String {
    format!("allowlist/{}", record.trim_end_matches('.').to_ascii_lowercase())
}

impl Allowlists {
    pub fn new(config: &Config) -> Arc<Self> {
        let mut records = Vec::new();
        let mut allowed = HashMap::new();
        for source in &config.sources {
            let AuthConfig::IpAllowlist { dns_txt, refresh_ms, dns_server, min_prefix, .. } = &source.auth else {
                continue;
            };
            if dns_txt.is_empty() {
                continue;
            }
            allowed.insert(source.name.clone(), RwLock::new(Arc::from(Vec::new())));
            records.extend(dns_txt.iter().map(|name| Record {
                source: source.name.clone(),
                refresh: refresh_ms.map_or(DEFAULT_REFRESH, Duration::from_millis),
                server: *dns_server,
                followed: Mutex::new(Followed::new(name, *min_prefix, None)),
            }));
        }
        Arc::new(Self { records, allowed, refused: refused::Senders::default() })
    }

    /// What the followed records of `source` allow now, beside its static
    /// entries (`None` for a source that follows none).
    pub fn allowed(&self, source: &str) -> Option<Arc<[Network]>> {
        Some(read(self.allowed.get(source)?).clone())
    }

    /// Every followed record's state, in config order.
    pub fn statuses(&self) -> Vec<Status> {
        self.records
            .iter()
            .map(|record| {
                let followed = lock(&record.followed);
                let good = followed.good();
                Status {
                    source: record.source.clone(),
                    record: followed.name.clone(),
                    networks: good.map(|good| good.networks.clone()).unwrap_or_default(),
                    at: good.map(|good| good.at),
                }
            })
            .collect()
    }

    /// Counts a sender an allowlist refused; see [`refused`].
    pub fn note_refused(&self, source: &str, sender: IpAddr) -> Noted {
        self.refused.note(source, sender)
    }

    /// Starts with the answers remembered with the store (an earlier run's,
    /// or another node's). One that no longer passes the record's minimum
    /// prefix is not used.
    pub async fn recall(&self, store: &Store) {
        if self.records.is_empty() {
            return;
        }
        let remembered: HashMap<String, Vec<u8>> = match store.remembered().await {
            Ok(all) => all.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "the remembered allowlists cannot be read; DNS and static entries apply");
                return;
            }
        };
        for record in &self.records {
            let mut followed = lock(&record.followed);
            let Some(value) = remembered.get(&remembered_name(&followed.name)) else { continue };
            match parse_remembered(value, followed.min()) {
                Ok(good) => *followed = Followed::new(&followed.name.clone(), followed.min(), Some(good)),
                Err(why) => {
                    tracing::warn!(source = %record.source, record = %followed.name, %why, "remembered allowlist not used");
                    continue;
                }
            }
            drop(followed);
            self.publish(&record.source);
        }
    }

    /// Follows every record until `shutdown`: one task per record, each
    /// looking up, taking the answer, and waiting as its TTL says.
    pub fn follow(self: &Arc<Self>, store: Store, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        for index in 0..self.records.len() {
            let (this, store, metrics, shutdown) = (self.clone(), store.clone(), metrics.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = this.follow_record(index, &store, &metrics) => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
    }

    /// Looks every followed record up once and describes each allowlist
    /// source's effective list (`check-config`): its static entries, what
    /// each record answered, and the union.
    pub async fn describe(config: &Config) -> String {
        let this = Self::new(config);
        let mut said = Vec::new();
        for record in &this.records {
            said.push(match this.refresh(record).await.0 {
                Outcome::Changed { skipped, .. } | Outcome::Unchanged { skipped } if skipped.is_empty() => {
                    String::new()
                }
                Outcome::Changed { skipped, .. } | Outcome::Unchanged { skipped } => {
                    format!(" (skipped: {})", skipped.join(" "))
                }
                Outcome::Refused(why) => format!("none: answer refused: {why}"),
                Outcome::Failed(why) => format!("none: lookup failed: {why}"),
            });
        }
        let statuses = this.statuses();
        let mut out = String::new();
        for source in &config.sources {
            let AuthConfig::IpAllowlist { allow, .. } = &source.auth else { continue };
            out.push_str(&format!("allowlist of source `{}`:\n  static: {}\n", source.name, joined(allow)));
            for (status, said) in statuses.iter().zip(&said).filter(|(status, _)| status.source == source.name) {
                out.push_str(&format!("  dns_txt {}: {}{said}\n", status.record, joined(&status.networks)));
            }
            let mut effective = allow.clone();
            effective.extend(this.allowed(&source.name).iter().flat_map(|followed| followed.iter().copied()));
            effective.sort_by_key(|network| network.0);
            effective.dedup();
            out.push_str(&format!("  effective: {}\n", joined(&effective)));
        }
        out
    }

    async fn follow_record(&self, index: usize, store: &Store, metrics: &Metrics) {
        let record = &self.records[index];
        loop {
            let (outcome, ttl) = self.refresh(record).await;
            self.report(record, &outcome, store, metrics).await;
            let wait = match outcome {
                Outcome::Changed { .. } | Outcome::Unchanged { .. } => followed::next_lookup(ttl, record.refresh),
                Outcome::Refused(_) | Outcome::Failed(_) => followed::next_lookup(None, record.refresh),
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One lookup of `record`, taken into its state; the answer's TTL.
    async fn refresh(&self, record: &Record) -> (Outcome, Option<Duration>) {
        let name = lock(&record.followed).name.clone();
        let answer = match lookup::Lookup::new(record.server, LOOKUP_TIMEOUT) {
            Ok(lookup) => lookup.txt(&name).await,
            Err(e) => Err(e),
        };
        let outcome = lock(&record.followed).absorb(answer.as_ref().map_err(Clone::clone), SystemTime::now());
        if matches!(outcome, Outcome::Changed { .. }) {
            self.publish(&record.source);
        }
        (outcome, answer.ok().map(|answer| answer.ttl))
    }

    /// Logs, counts and remembers what one refresh did.
    async fn report(&self, record: &Record, outcome: &Outcome, store: &Store, metrics: &Metrics) {
        let name = lock(&record.followed).name.clone();
        let source = record.source.as_str();
        match outcome {
            Outcome::Changed { added, removed, skipped } => {
                tracing::warn!(
                    source,
                    record = %name,
                    added = %joined(added),
                    removed = %joined(removed),
                    skipped = %skipped.join(" "),
                    "allowlist changed"
                );
                metrics.allowlist_change(source, &name);
            }
            Outcome::Unchanged { .. } => {}
            Outcome::Refused(why) => {
                tracing::warn!(source, record = %name, %why, "allowlist answer refused; the last good list stays");
                metrics.allowlist_failure(source, &name, why.reason());
                return;
            }
            Outcome::Failed(why) => {
                tracing::warn!(source, record = %name, %why, "allowlist lookup failed; the last good list stays");
                metrics.allowlist_failure(source, &name, "lookup");
                return;
            }
        }
        let Some(good) = lock(&record.followed).good().cloned() else { return };
        if let Err(e) = store.remember(&remembered_name(&name), remembered_value(&good)).await {
            tracing::warn!(source, record = %name, error = %e, "the allowlist answer could not be remembered");
        }
    }

    /// Makes the union of `source`'s records' last good answers the one
    /// the front door sees.
    fn publish(&self, source: &str) {
        let Some(slot) = self.allowed.get(source) else { return };
        let mut union: Vec<Network> = Vec::new();
        for record in self.records.iter().filter(|record| record.source == source) {
            if let Some(good) = lock(&record.followed).good() {
                union.extend(good.networks.iter().filter(|n| !union.contains(n)).copied().collect::<Vec<_>>());
            }
        }
        *slot.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(union);
    }
}

fn remembered_value(good: &Good) -> Vec<u8> {
    let at_unix_ms = good.at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let networks = good.networks.iter().map(|n| n.0.to_string()).collect();
    serde_json::to_vec(&Remembered { networks, at_unix_ms }).unwrap_or_default()
}

fn parse_remembered(value: &[u8], min: MinPrefix) -> Result<Good, String> {
    let remembered: Remembered = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    let ranges = record::parse(remembered.networks.iter().map(String::as_str), min).map_err(|e| e.to_string())?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(remembered.at_unix_ms);
    Ok(Good { networks: ranges.networks, at })
}

/// Networks as one space-separated string, for a log line.
fn joined(networks: &[Network]) -> String {
    networks.iter().map(|n| n.0.to_string()).collect::<Vec<_>>().join(" ")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}
