//! OrderMesh merchant notifications: JSON, PascalCase keys, discriminated by
//! `EventType` (`OrderCreation`, `OrderUpdate`, `ShipmentCreated`,
//! `ShipmentUpdate`).
//!
//! `RequestId` is not an idempotency key and there is no event id, so the
//! dedup key is the SHA-256 of the canonical JSON content.

use serde::Deserialize;

use super::mapping::{content_key, is_json, lookup, parse_time};
use super::{DeliveryMeta, Normalized, Observation, ReportedStatus, Unrecognized};
use crate::proto::{EventKind, OrderReferences, OrderStatus, Shipment, ShipmentStatus};

/// `NewStatus` values and their canonical order status.
const ORDER_STATUS: &[(&str, OrderStatus)] = &[
    ("Open", OrderStatus::Accepted),
    ("ReadyForFulfillment", OrderStatus::Processing),
    ("InProduction", OrderStatus::Processing),
    ("Processing", OrderStatus::Processing),
    ("CustomerCareHold", OrderStatus::OnHold),
    ("OnHold", OrderStatus::OnHold),
    ("Shipped", OrderStatus::Shipped),
    ("Completed", OrderStatus::Completed),
    ("Complete", OrderStatus::Completed),
    ("Cancelled", OrderStatus::Cancelled),
    ("Canceled", OrderStatus::Cancelled),
];

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Notification {
    event_type: Option<String>,
    order_id: Option<String>,
    external_order_id: Option<String>,
    safe_id: Option<String>,
    description: Option<String>,
    is_successful: Option<bool>,
    response_code: Option<serde_json::Value>,
    old_status: Option<String>,
    new_status: Option<String>,
    shipment_id: Option<String>,
    package: Option<Package>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Package {
    package_id: Option<String>,
    carrier_name: Option<String>,
    carrier_method_name: Option<String>,
    shipped_date: Option<String>,
    fulfilled_date: Option<String>,
    carrier_tracking_number: Option<String>,
    carrier_link: Option<String>,
    #[serde(rename = "OrderItemIDs")]
    order_item_ids: Option<Vec<String>>,
}

pub(super) fn normalize(meta: DeliveryMeta<'_>, body: &[u8]) -> Result<Normalized, Unrecognized> {
    if !is_json(meta.content_type) {
        return Err(Unrecognized(format!(
            "unexpected content type `{}`; expected application/json",
            meta.content_type
        )));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Unrecognized(format!("invalid JSON: {e}")))?;
    let n = Notification::deserialize(&value).map_err(|e| Unrecognized(format!("unexpected JSON shape: {e}")))?;
    let observation = observe(n)?;
    Ok(Normalized { dedup_key: content_key("ordermesh", &value), observations: vec![observation] })
}

fn observe(n: Notification) -> Result<Observation, Unrecognized> {
    let references = OrderReferences {
        merchant_reference: n.external_order_id.clone().unwrap_or_default(),
        provider_order_id: n.order_id.clone().unwrap_or_default(),
        safe_id: n.safe_id.clone().unwrap_or_default(),
    };
    if references.merchant_reference.is_empty()
        && references.provider_order_id.is_empty()
        && references.safe_id.is_empty()
    {
        return Err(Unrecognized("no order reference (OrderId, ExternalOrderId or SafeId)".into()));
    }
    let mut obs = Observation {
        references,
        description: n.description.as_deref().map(str::trim).unwrap_or_default().to_string(),
        ..Observation::default()
    };
    let event_type = n.event_type.as_deref().unwrap_or("");
    match event_type {
        "OrderCreation" => creation(&mut obs, &n),
        "OrderUpdate" => update(&mut obs, &n),
        "ShipmentCreated" => {
            obs.kind = EventKind::ShipmentCreated;
            obs.shipment = Some(Shipment {
                id: shipment_id(&n)?,
                status: ShipmentStatus::LabelCreated as i32,
                ..Shipment::default()
            });
        }
        "ShipmentUpdate" => {
            obs.kind = EventKind::ShipmentUpdated;
            obs.shipment = Some(package_shipment(shipment_id(&n)?, n.package));
        }
        "" => return Err(Unrecognized("no EventType".into())),
        other => return Err(Unrecognized(format!("unknown EventType `{other}`"))),
    }
    Ok(obs)
}

fn creation(obs: &mut Observation, n: &Notification) {
    // IsSuccessful is always sent; should it be missing, an OrderId means
    // the order exists.
    let successful = n.is_successful.unwrap_or(n.order_id.is_some());
    if successful {
        obs.kind = EventKind::OrderCreated;
        obs.status = Some(ReportedStatus { verbatim: String::new(), canonical: Some(OrderStatus::Accepted) });
    } else {
        obs.kind = EventKind::OrderRejected;
        obs.status = Some(ReportedStatus { verbatim: String::new(), canonical: Some(OrderStatus::Rejected) });
        if let Some(code) = &n.response_code {
            obs.description = format!("{} (ResponseCode {code})", obs.description).trim().to_string();
        }
    }
    obs.order.description = obs.description.clone();
}

fn update(obs: &mut Observation, n: &Notification) {
    obs.order.description = obs.description.clone();
    obs.provider_previous_status = n.old_status.clone();
    match &n.new_status {
        Some(new) => {
            obs.kind = EventKind::OrderStatusChanged;
            obs.status = Some(ReportedStatus { verbatim: new.clone(), canonical: lookup(ORDER_STATUS, new) });
        }
        None => obs.kind = EventKind::OrderUpdated,
    }
}

fn shipment_id(n: &Notification) -> Result<String, Unrecognized> {
    match n.shipment_id.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() => Ok(id.to_string()),
        _ => Err(Unrecognized(format!("{} without ShipmentId", n.event_type.as_deref().unwrap_or("")))),
    }
}

/// A package with a `ShippedDate` is in transit; one with only a
/// `FulfilledDate` is ready for pickup; one without dates has a label.
fn package_shipment(id: String, package: Option<Package>) -> Shipment {
    let mut shipment = Shipment { id, ..Shipment::default() };
    let Some(p) = package else { return shipment };
    let shipped_at = p.shipped_date.as_deref().and_then(parse_time);
    let fulfilled_at = p.fulfilled_date.as_deref().and_then(parse_time);
    let status = match (&shipped_at, &fulfilled_at) {
        (Some(_), _) => ShipmentStatus::InTransit,
        (None, Some(_)) => ShipmentStatus::ReadyForPickup,
        (None, None) => ShipmentStatus::LabelCreated,
    };
    shipment.status = status as i32;
    shipment.shipped_at = shipped_at;
    shipment.fulfilled_at = fulfilled_at;
    shipment.package_id = p.package_id.unwrap_or_default();
    shipment.carrier = p.carrier_name.unwrap_or_default();
    shipment.carrier_service = p.carrier_method_name.unwrap_or_default();
    shipment.tracking_number = p.carrier_tracking_number.unwrap_or_default();
    shipment.tracking_url = p.carrier_link.unwrap_or_default();
    shipment.order_item_ids = p.order_item_ids.unwrap_or_default();
    shipment
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Provider;

    fn map(body: &[u8], content_type: &str) -> Result<Normalized, Unrecognized> {
        normalize(DeliveryMeta { provider: Provider::Ordermesh, kind: None, content_type }, body)
    }

    /// Maps a fixture and checks the one observation's kind and statuses.
    fn check(name: &str, kind: EventKind, order: Option<OrderStatus>, shipment: Option<ShipmentStatus>) -> Observation {
        let path = format!("{}/tests/fixtures/ordermesh/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read(&path).unwrap();
        let mut normalized = map(&body, "application/json; charset=utf-8").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(normalized.observations.len(), 1, "{name}");
        let obs = normalized.observations.remove(0);
        assert_eq!(obs.kind, kind, "{name}");
        assert_eq!(obs.status.as_ref().and_then(|s| s.canonical), order, "{name}");
        assert_eq!(obs.shipment.as_ref().map(|s| s.status()), shipment, "{name}");
        obs
    }

    #[test]
    fn documented_examples() {
        let created = check("order-creation", EventKind::OrderCreated, Some(OrderStatus::Accepted), None);
        assert_eq!(created.references.provider_order_id, "670e58fe7741035996cf7d20");
        let failed = check("order-creation-failed", EventKind::OrderRejected, Some(OrderStatus::Rejected), None);
        assert!(failed.references.provider_order_id.is_empty());
        assert_eq!(failed.description, "Order could not be created (ResponseCode 400)");
        let update = check("order-update", EventKind::OrderStatusChanged, Some(OrderStatus::Processing), None);
        assert_eq!(update.provider_previous_status.as_deref(), Some("Open"));
        check("shipment-created", EventKind::ShipmentCreated, None, Some(ShipmentStatus::LabelCreated));
        let shipped = check("shipment-update", EventKind::ShipmentUpdated, None, Some(ShipmentStatus::InTransit));
        assert_eq!(shipped.shipment.unwrap().tracking_number, "9400136208551280752547");
    }

    #[test]
    fn package_dates_decide_the_shipment_status() {
        let body = |package: &str| {
            format!(r#"{{"EventType":"ShipmentUpdate","OrderId":"o","ShipmentId":"s","Package":{package}}}"#)
        };
        let status = |package: &str| {
            map(body(package).as_bytes(), "application/json").unwrap().observations[0]
                .shipment
                .as_ref()
                .unwrap()
                .status()
        };
        assert_eq!(status(r#"{"FulfilledDate":"2022-04-10T13:05:00"}"#), ShipmentStatus::ReadyForPickup);
        assert_eq!(status(r#"{"ShippedDate":null,"FulfilledDate":null}"#), ShipmentStatus::LabelCreated);
        assert_eq!(status(r#"{"ShippedDate":"2022-04-10T15:20:00"}"#), ShipmentStatus::InTransit);
    }

    #[test]
    fn statuses_match_leniently_and_unknown_ones_stay_verbatim() {
        let update = |status: &str| {
            let body = format!(r#"{{"EventType":"OrderUpdate","OrderId":"o","NewStatus":"{status}"}}"#);
            map(body.as_bytes(), "application/json").unwrap().observations.remove(0).status.unwrap()
        };
        assert_eq!(update("ready_for_fulfillment").canonical, Some(OrderStatus::Processing));
        assert_eq!(update("Customer Care Hold").canonical, Some(OrderStatus::OnHold));
        let unknown = update("Teleported");
        assert_eq!((unknown.verbatim.as_str(), unknown.canonical), ("Teleported", None));
    }

    #[test]
    fn what_cannot_be_mapped_says_why() {
        let cases: [(&[u8], &str, &str); 6] = [
            (b"{", "application/json", "invalid JSON"),
            (b"[1,2]", "application/json", "unexpected JSON shape"),
            (br#"{"EventType":"Refund","OrderId":"o"}"#, "application/json", "unknown EventType `Refund`"),
            (br#"{"OrderId":"o"}"#, "application/json", "no EventType"),
            (br#"{"EventType":"ShipmentCreated","OrderId":"o"}"#, "application/json", "without ShipmentId"),
            (br#"{"EventType":"OrderUpdate","OrderId":"o"}"#, "text/plain", "unexpected content type"),
        ];
        for (body, content_type, reason) in cases {
            let err = map(body, content_type).unwrap_err();
            assert!(err.0.contains(reason), "{:?}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn deeply_nested_json_is_refused_without_overflow() {
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(map(body.as_bytes(), "application/json").unwrap_err().0.contains("invalid JSON"));
    }
}
