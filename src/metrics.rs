//! Prometheus metrics, served as text on the admin listener (`GET /metrics`).
//!
//! Counters and histograms are updated where things happen (the front door,
//! the group commit); gauges that describe stored state are read from the
//! store when scraped.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::{CommitMetrics, Store};

type Labels = Vec<(&'static str, String)>;

/// What the gauges read at a scrape, besides the store.
pub struct Gauges {
    /// The stream position of every open subscription: (id, sequence).
    pub positions: Box<dyn Fn() -> Vec<(u64, u64)> + Send + Sync>,
    /// Open webhook connections.
    pub connections: Box<dyn Fn() -> usize + Send + Sync>,
    /// The bounds webhook bodies are read within.
    pub bodies: crate::http::Bodies,
    /// The state of every followed DNS allowlist record.
    pub allowlists: Box<dyn Fn() -> Vec<crate::allowlist::Status> + Send + Sync>,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// Webhooks by source and outcome.
    webhooks: Family<Labels, Counter>,
    /// Receive to durable answer, for stored deliveries.
    ingest_latency: Histogram,
    unmapped: Family<Labels, Gauge>,
    quarantine_depth: Gauge,
    orders: Gauge,
    head_sequence: Gauge,
    store_size_bytes: Gauge,
    subscriptions: Gauge,
    subscriber_lag: Family<Labels, Gauge>,
    subscriber_store_reads: Gauge,
    http_connections: Gauge,
    body_memory_bytes: Gauge,
    unverified_bodies: Gauge,
    allowlist_changes: Family<Labels, Counter>,
    allowlist_refresh_failures: Family<Labels, Counter>,
    allowlist_last_refresh: Family<Labels, Gauge<f64, AtomicU64>>,
    allowlist_entries: Family<Labels, Gauge>,
    allowlist_refused: Family<Labels, Counter>,
    store: Store,
    gauges: Gauges,
}

impl Metrics {
    pub fn new(store: Store, gauges: Gauges) -> Arc<Self> {
        let mut registry = Registry::with_prefix("ordertrail");
        let commit: CommitMetrics = store.commit_metrics();
        let webhooks = Family::<Labels, Counter>::default();
        let ingest_latency = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let metrics = Self {
            webhooks: webhooks.clone(),
            ingest_latency: ingest_latency.clone(),
            unmapped: Family::default(),
            quarantine_depth: Gauge::default(),
            orders: Gauge::default(),
            head_sequence: Gauge::default(),
            store_size_bytes: Gauge::default(),
            subscriptions: Gauge::default(),
            subscriber_lag: Family::default(),
            subscriber_store_reads: Gauge::default(),
            http_connections: Gauge::default(),
            body_memory_bytes: Gauge::default(),
            unverified_bodies: Gauge::default(),
            allowlist_changes: Family::default(),
            allowlist_refresh_failures: Family::default(),
            allowlist_last_refresh: Family::default(),
            allowlist_entries: Family::default(),
            allowlist_refused: Family::default(),
            store,
            gauges,
            registry: Registry::default(),
        };
        registry.register("webhooks", "Webhooks received, by source and outcome", webhooks);
        registry.register("ingest_latency_seconds", "From receiving a webhook to its durable answer", ingest_latency);
        registry.register("group_commit_size", "Deliveries answered by one group commit", commit.group_size);
        registry.register("flush_seconds", "Time to make one group commit durable", commit.flush_seconds);
        registry.register("events", "Events committed, by kind", commit.events);
        registry.register(
            "storage_failures",
            "Storage failures; each stops acknowledgements until a reopen",
            commit.failures,
        );
        registry.register("store_reopens", "Times the store was reopened after a storage failure", commit.reopens);
        registry.register("unmapped_statuses", "Unknown provider status values seen", metrics.unmapped.clone());
        registry.register("quarantine_depth", "Deliveries in quarantine", metrics.quarantine_depth.clone());
        registry.register("orders", "Orders stored", metrics.orders.clone());
        registry.register("head_sequence", "Newest durable event sequence", metrics.head_sequence.clone());
        registry.register("store_size_bytes", "Database size on disk", metrics.store_size_bytes.clone());
        registry.register("subscriptions_active", "Open Subscribe streams", metrics.subscriptions.clone());
        registry.register("http_connections", "Open webhook connections", metrics.http_connections.clone());
        registry.register(
            "http_body_memory_bytes",
            "Bytes reserved for webhook bodies being read or stored (bounded by http.body_memory_bytes)",
            metrics.body_memory_bytes.clone(),
        );
        registry.register(
            "http_unverified_bodies",
            "Bodies being read whose sender only the body can authenticate (bounded by http.max_unverified_bodies)",
            metrics.unverified_bodies.clone(),
        );
        registry.register(
            "subscriber_lag_events",
            "Events a subscriber is behind the head",
            metrics.subscriber_lag.clone(),
        );
        registry.register(
            "subscriber_store_reads",
            "Times a subscriber fell behind and read from the store",
            metrics.subscriber_store_reads.clone(),
        );
        registry.register(
            "allowlist_changes",
            "Changes of a followed DNS allowlist record (the first good answer counts), by source and record",
            metrics.allowlist_changes.clone(),
        );
        registry.register(
            "allowlist_refresh_failures",
            "Lookups of a followed DNS allowlist record that failed (lookup) or whose answer was refused \
             (empty, too_broad, too_many); the last good list stays",
            metrics.allowlist_refresh_failures.clone(),
        );
        registry.register(
            "allowlist_last_refresh_seconds",
            "Age of a followed DNS allowlist record's last good answer",
            metrics.allowlist_last_refresh.clone(),
        );
        registry.register(
            "allowlist_entries",
            "Ranges a followed DNS allowlist record allows now (0: no good answer yet)",
            metrics.allowlist_entries.clone(),
        );
        registry.register(
            "allowlist_refused",
            "Webhooks an allowlist refused (403), by source and sender network (/24, /48; `other` past 256)",
            metrics.allowlist_refused.clone(),
        );
        Arc::new(Self { registry, ..metrics })
    }

    /// Counts one webhook answer.
    pub fn webhook(&self, source: &str, outcome: &'static str) {
        self.webhooks.get_or_create(&vec![("source", source.to_string()), ("outcome", outcome.to_string())]).inc();
    }

    /// Records how long a stored webhook took to be answered.
    pub fn ingest_latency(&self, seconds: f64) {
        self.ingest_latency.observe(seconds);
    }

    /// Counts a change of a followed allowlist record.
    pub fn allowlist_change(&self, source: &str, record: &str) {
        self.allowlist_changes
            .get_or_create(&vec![("source", source.to_string()), ("record", record.to_string())])
            .inc();
    }

    /// Counts a failed or refused lookup of a followed allowlist record.
    pub fn allowlist_failure(&self, source: &str, record: &str, reason: &'static str) {
        let labels = vec![("source", source.to_string()), ("record", record.to_string()), ("reason", reason.into())];
        self.allowlist_refresh_failures.get_or_create(&labels).inc();
    }

    /// Counts a sender an allowlist refused, by its network.
    pub fn allowlist_refused(&self, source: &str, network: &str) {
        self.allowlist_refused
            .get_or_create(&vec![("source", source.to_string()), ("network", network.to_string())])
            .inc();
    }

    /// The text exposition, with the stored-state gauges read now.
    pub async fn render(&self) -> String {
        self.refresh().await;
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Reads the gauges of stored state. While storage is unavailable they
    /// keep their last values (the failure has its own counter).
    async fn refresh(&self) {
        let store = &self.store;
        let head = store.head_sequence();
        self.head_sequence.set(as_gauge(head));
        if let Ok(state) = store.state_stats().await {
            self.quarantine_depth.set(as_gauge(state.quarantined));
            self.orders.set(as_gauge(state.orders));
            self.store_size_bytes.set(as_gauge(state.size_bytes));
        }
        self.subscriber_store_reads.set(as_gauge(store.feed_stats().1));
        if let Ok(unmapped) = store.unmapped_statuses().await {
            self.unmapped.clear();
            for (provider, applies_to, value, count) in unmapped {
                let labels = vec![("provider", provider), ("applies_to", applies_to), ("value", value)];
                self.unmapped.get_or_create(&labels).set(as_gauge(count));
            }
        }
        self.http_connections.set(as_gauge((self.gauges.connections)() as u64));
        self.body_memory_bytes.set(as_gauge(self.gauges.bodies.in_memory_bytes() as u64));
        self.unverified_bodies.set(as_gauge(self.gauges.bodies.unverified() as u64));
        for status in (self.gauges.allowlists)() {
            let labels = vec![("source", status.source.clone()), ("record", status.record.clone())];
            self.allowlist_entries.get_or_create(&labels).set(as_gauge(status.networks.len() as u64));
            if let Some(age) = status.age() {
                self.allowlist_last_refresh.get_or_create(&labels).set(age.as_secs_f64());
            }
        }
        let positions = (self.gauges.positions)();
        self.subscriptions.set(as_gauge(positions.len() as u64));
        self.subscriber_lag.clear();
        for (id, position) in positions {
            self.subscriber_lag
                .get_or_create(&vec![("subscriber", id.to_string())])
                .set(as_gauge(head.saturating_sub(position)));
        }
    }
}

fn as_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
