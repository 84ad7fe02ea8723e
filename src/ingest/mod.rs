//! Turning an authenticated raw delivery into provider-neutral observations.
//!
//! Everything here is pure: no I/O, no clock, no ids. The front door calls
//! [`auth::verify`] and [`normalize`]; the store applies the result. The same
//! functions re-run stored deliveries later, so they must only depend on
//! their arguments.

pub mod auth;
mod mapping;
mod ordermesh;
mod winkelstraat;
mod withings;

use crate::proto;
use crate::provider::Provider;

pub use mapping::match_key;

/// Version of the mappers. Recorded on every event; bump it whenever a mapper
/// changes what it produces.
pub const MAPPER_VERSION: u32 = 2;

/// What the mapper needs to know about a delivery besides its body.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryMeta<'a> {
    pub provider: Provider,
    /// The kind from the URL, if any.
    pub kind: Option<&'a str>,
    pub content_type: &'a str,
}

/// A delivery the mapper understood.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalized {
    /// Permanent dedup key, scoped to the source by the store.
    pub dedup_key: String,
    /// What the delivery says, in order. Each becomes one event.
    pub observations: Vec<Observation>,
}

/// Why an authentic delivery could not be mapped; it is quarantined.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unrecognized(pub String);

/// A status value as the provider sent it, and its canonical meaning if the
/// mapping table knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportedStatus<S> {
    pub verbatim: String,
    pub canonical: Option<S>,
}

/// One provider-neutral fact about one order.
///
/// Empty strings and `None` mean "not sent": they never clear stored data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    pub kind: proto::EventKind,
    /// The references the delivery names. The store finds the order by
    /// provider order id, then safe id, then merchant reference.
    pub references: proto::OrderReferences,
    /// The order status the delivery reports, if any.
    pub status: Option<ReportedStatus<proto::OrderStatus>>,
    /// The provider's previous status value, when it sends one.
    pub provider_previous_status: Option<String>,
    /// Shipment data; `status`/`provider_status` inside are the report.
    pub shipment: Option<proto::Shipment>,
    /// A return (RMA) to insert or update on the order, by id.
    pub return_: Option<proto::Return>,
    /// A refund (credit memo) to insert or update on the order, by id.
    pub refund: Option<proto::Refund>,
    /// An invoice, recorded on the event.
    pub invoice: Option<proto::Invoice>,
    /// A payment request, recorded on the event.
    pub payment_request: Option<proto::PaymentRequest>,
    /// Order data to merge (items, addresses, totals, description, ...).
    /// Only non-empty fields are merged.
    pub order: proto::Order,
    /// The provider's own update time of the order, for ordering, when it
    /// sends one. (A shipment's own time is in `shipment.provider_updated_at`.)
    pub provider_time: Option<prost_types::Timestamp>,
    /// The provider's message, if any.
    pub description: String,
}

impl Observation {
    /// The provider status values this observation carries that the mapping
    /// tables do not know: (`"order"` or `"shipment"`, verbatim value).
    pub fn unmapped(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        if let Some(status) = self.status.as_ref().filter(|s| s.canonical.is_none() && !s.verbatim.is_empty()) {
            out.push(("order", status.verbatim.as_str()));
        }
        if let Some(shipment) = self
            .shipment
            .as_ref()
            .filter(|s| s.status() == proto::ShipmentStatus::Unspecified && !s.provider_status.is_empty())
        {
            out.push(("shipment", shipment.provider_status.as_str()));
        }
        out
    }
}

/// Maps one authentic delivery. Never panics on any input.
pub fn normalize(meta: DeliveryMeta<'_>, body: &[u8]) -> Result<Normalized, Unrecognized> {
    match meta.provider {
        Provider::Ordermesh => ordermesh::normalize(meta, body),
        Provider::Withings => withings::normalize(meta, body),
        Provider::Winkelstraat => winkelstraat::normalize(meta, body),
    }
}

/// Maps a stored (or about to be stored) raw delivery with the current
/// mappers. A mapper that panics (a bug) quarantines the delivery instead of
/// losing it.
/// `kind_aliases` maps URL kinds to the kind whose payload they carry.
pub fn map_raw(
    raw: &proto::RawDelivery,
    kind_aliases: &std::collections::BTreeMap<String, String>,
) -> Result<Normalized, Unrecognized> {
    let Some(provider) = Provider::from_proto(raw.provider()) else {
        return Err(Unrecognized("delivery of an unknown provider".into()));
    };
    let kind = (!raw.kind.is_empty()).then(|| kind_aliases.get(&raw.kind).unwrap_or(&raw.kind).as_str());
    let meta = DeliveryMeta { provider, kind, content_type: &raw.content_type };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| normalize(meta, &raw.body)))
        .unwrap_or_else(|_| Err(Unrecognized("the mapper failed on this delivery".into())))
}

/// The current mappers with each source's kind aliases: what a stored or
/// arriving raw delivery means. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Mapper {
    /// Kind aliases by source name.
    aliases: std::sync::Arc<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
}

impl Mapper {
    /// The mappers with the kind aliases of `config`'s sources.
    pub fn new(config: &crate::config::Config) -> Self {
        let aliases = config.sources.iter().map(|s| (s.name.clone(), s.kind_aliases.clone())).collect();
        Self { aliases: std::sync::Arc::new(aliases) }
    }

    /// What the current mappers make of `raw`.
    pub fn map(&self, raw: &proto::RawDelivery) -> Result<Normalized, Unrecognized> {
        static NONE: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
        map_raw(raw, self.aliases.get(&raw.source).unwrap_or(&NONE))
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
