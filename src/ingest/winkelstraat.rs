//! Winkelstraat.nl Stock Hub webhooks. JSON; the kind is known only from the
//! URL (`order`, `shipment`, `invoice`, `rma`, `creditmemo`,
//! `order-payment-request`). Never retried by the sender.
//!
//! Parsing is lenient where the documentation disagrees with itself:
//! `house_number`/`houseNumber`, `qty`/`qty_ordered`, zone-less and offset
//! timestamps, strings or numbers for ids, nulls anywhere. Money keeps the
//! decimal digits as sent.

use serde_json::Value;

use super::mapping::{content_key, is_json, lookup, parse_time};
use super::{DeliveryMeta, Normalized, Observation, ReportedStatus, Unrecognized};
use crate::proto::{
    Address, EventKind, Invoice, Item, Money, Order, OrderReferences, OrderStatus, PaymentRequest, Refund, Return,
    ReturnItem, Shipment, ShipmentStatus,
};

/// Order (Magento) statuses and their canonical status.
const ORDER_STATUS: &[(&str, OrderStatus)] = &[
    ("pending", OrderStatus::Pending),
    ("pending_payment", OrderStatus::Pending),
    ("processing", OrderStatus::Processing),
    ("holded", OrderStatus::OnHold),
    ("complete", OrderStatus::Completed),
    ("closed", OrderStatus::Completed),
    ("canceled", OrderStatus::Cancelled),
];

/// Shipment statuses and their canonical status.
const SHIPMENT_STATUS: &[(&str, ShipmentStatus)] = &[
    ("UNKNOWN", ShipmentStatus::Unknown),
    ("READY_FOR_PICKUP", ShipmentStatus::ReadyForPickup),
    ("IN_TRANSIT", ShipmentStatus::InTransit),
    ("DELIVERED", ShipmentStatus::Delivered),
    ("EXCEPTION", ShipmentStatus::Exception),
];

/// The kinds, by the last segment of the URL they are posted to.
use crate::provider::WINKELSTRAAT_KINDS as KINDS;

pub(super) fn normalize(meta: DeliveryMeta<'_>, body: &[u8]) -> Result<Normalized, Unrecognized> {
    let kind = match meta.kind {
        Some(kind) if KINDS.contains(&kind) => kind,
        Some(other) => return Err(Unrecognized(format!("unknown Winkelstraat kind `{other}`"))),
        None => return Err(Unrecognized("no Winkelstraat kind in the URL (/webhooks/{source}/{kind})".into())),
    };
    if !is_json(meta.content_type) {
        return Err(Unrecognized(format!(
            "unexpected content type `{}`; expected application/json",
            meta.content_type
        )));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| Unrecognized(format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(Unrecognized("expected a JSON object".into()));
    }
    let observation = match kind {
        "order" => order(&value)?,
        "shipment" => shipment(&value)?,
        "invoice" => invoice(&value)?,
        "rma" => rma(&value)?,
        "creditmemo" => creditmemo(&value)?,
        _ => payment_request(&value)?,
    };
    Ok(Normalized { dedup_key: content_key(&format!("winkelstraat:{kind}"), &value), observations: vec![observation] })
}

// === The kinds ===

fn order(v: &Value) -> Result<Observation, Unrecognized> {
    let references = OrderReferences {
        merchant_reference: text(v, "po_number"),
        provider_order_id: text(v, "increment_id"),
        safe_id: String::new(),
    };
    require_reference(&references, "increment_id or po_number")?;
    let currency = text(v, "currency");
    let status = text(v, "status");
    let reported =
        (!status.is_empty()).then(|| ReportedStatus { canonical: lookup(ORDER_STATUS, &status), verbatim: status });
    Ok(Observation {
        kind: if reported.is_some() { EventKind::OrderStatusChanged } else { EventKind::OrderUpdated },
        references,
        status: reported,
        order: Order {
            items: items(v, &currency),
            shipping_address: address(v, "shipping_address"),
            billing_address: address(v, "billing_address"),
            grand_total: money(v, "grand_total", &currency),
            subtotal: money(v, "subtotal", &currency),
            shipping: money(v, "shipping_price", &currency),
            provider_created_at: time(v, "created_at"),
            ..Order::default()
        },
        provider_time: time(v, "updated_at"),
        ..Observation::default()
    })
}

fn shipment(v: &Value) -> Result<Observation, Unrecognized> {
    let id = text(v, "increment_id");
    if id.is_empty() {
        return Err(Unrecognized("shipment without increment_id".into()));
    }
    let currency = text(v, "currency");
    let status = text(v, "status");
    let track = track(v);
    let shipment = Shipment {
        id,
        status: lookup(SHIPMENT_STATUS, &status).unwrap_or(ShipmentStatus::Unspecified) as i32,
        provider_status: status,
        carrier: text(&track, "carrier"),
        carrier_service: text(&track, "method"),
        tracking_number: text(&track, "tracking_number"),
        tracking_url: text(&track, "tracking_url"),
        collected_at: time(v, "collected_at"),
        delivered_at: time(v, "delivered_at"),
        items: items(v, &currency),
        provider_updated_at: time(v, "updated_at").or_else(|| time(v, "created_at")),
        ..Shipment::default()
    };
    Ok(Observation {
        kind: EventKind::ShipmentUpdated,
        references: linked_order(v)?,
        shipment: Some(shipment),
        ..Observation::default()
    })
}

fn invoice(v: &Value) -> Result<Observation, Unrecognized> {
    let currency = text(v, "currency");
    let invoice = Invoice {
        id: text(v, "increment_id"),
        created_at: time(v, "created_at"),
        grand_total: money(v, "grand_total", &currency),
        subtotal: money(v, "subtotal", &currency),
        shipping: money(v, "shipping_price", &currency),
        items: items(v, &currency),
    };
    Ok(Observation {
        kind: EventKind::InvoiceIssued,
        references: linked_order(v)?,
        invoice: Some(invoice),
        ..Observation::default()
    })
}

fn rma(v: &Value) -> Result<Observation, Unrecognized> {
    let id = text(v, "increment_id");
    if id.is_empty() {
        return Err(Unrecognized("rma without increment_id".into()));
    }
    let currency = text(v, "currency");
    let track = track(v);
    let items = list(v, "items")
        .map(|i| ReturnItem {
            item: Some(item(i, &currency)),
            quantity_requested: text(i, "qty_requested"),
            quantity_approved: text(i, "qty_approved"),
            quantity_returned: text(i, "qty_returned"),
            reason: text(i, "reason"),
            resolution: text(i, "resolution"),
            merchant_resolution: text(i, "merchant_resolution"),
            status: text(i, "status"),
            return_fee: money(i, "item_return_fee", &currency),
        })
        .collect();
    let returned = Return {
        id,
        provider_status: text(v, "status"),
        requested_at: time(v, "date_requested"),
        received_at: time(v, "date_received"),
        processed_at: time(v, "date_processed"),
        carrier: text(&track, "carrier"),
        tracking_number: text(&track, "tracking_number"),
        tracking_url: text(&track, "tracking_url"),
        items,
        last_sequence: 0,
    };
    Ok(Observation {
        kind: EventKind::ReturnUpdated,
        references: linked_order(v)?,
        return_: Some(returned),
        ..Observation::default()
    })
}

fn creditmemo(v: &Value) -> Result<Observation, Unrecognized> {
    let id = text(v, "increment_id");
    if id.is_empty() {
        return Err(Unrecognized("creditmemo without increment_id".into()));
    }
    let currency = text(v, "currency");
    let refund = Refund {
        id,
        created_at: time(v, "created_at"),
        grand_total: money(v, "grand_total", &currency),
        subtotal: money(v, "subtotal", &currency),
        shipping: money(v, "shipping_price", &currency),
        adjustment: money(v, "adjustment", &currency),
        fee: money(v, "fee_amount", &currency),
        return_fee: money(v, "return_fee_amount", &currency),
        items: items(v, &currency),
    };
    Ok(Observation {
        kind: EventKind::RefundIssued,
        references: linked_order(v)?,
        refund: Some(refund),
        ..Observation::default()
    })
}

fn payment_request(v: &Value) -> Result<Observation, Unrecognized> {
    let currency = text(v, "currency");
    let payment = field(v, "payment");
    let mut references = linked_order(v).unwrap_or_default();
    if references.merchant_reference.is_empty() {
        references.merchant_reference = text(&payment, "po_number");
    }
    require_reference(&references, "order_increment_id or po_number")?;
    let request = PaymentRequest {
        purchase_order_id: text(v, "purchase_order_increment_id"),
        pay_by_link: text(v, "pay_by_link"),
        method: text(&payment, "method"),
        created_at: time(v, "created_at"),
        grand_total: money(v, "grand_total", &currency),
        subtotal: money(v, "subtotal", &currency),
        shipping: money(v, "shipping_price", &currency),
        tax: money(v, "tax_amount", &currency),
        discount: money(v, "discount_amount", &currency),
        items: items(v, &currency),
    };
    Ok(Observation {
        kind: EventKind::PaymentRequested,
        references,
        payment_request: Some(request),
        ..Observation::default()
    })
}

/// The order a shipment, invoice, RMA or credit memo belongs to.
fn linked_order(v: &Value) -> Result<OrderReferences, Unrecognized> {
    let references = OrderReferences {
        merchant_reference: text(v, "po_number"),
        provider_order_id: text(v, "order_increment_id"),
        safe_id: String::new(),
    };
    require_reference(&references, "order_increment_id or po_number")?;
    Ok(references)
}

fn require_reference(references: &OrderReferences, names: &str) -> Result<(), Unrecognized> {
    if references.merchant_reference.is_empty() && references.provider_order_id.is_empty() {
        return Err(Unrecognized(format!("no order reference ({names})")));
    }
    Ok(())
}

// === Lenient field access ===

/// A field, or `null` when absent.
fn field(v: &Value, key: &str) -> Value {
    v.get(key).cloned().unwrap_or(Value::Null)
}

/// A string or number as text; empty for null, absent or anything else.
fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// The first of several spellings that is present.
fn text_any(v: &Value, keys: &[&str]) -> String {
    keys.iter().map(|k| text(v, k)).find(|t| !t.is_empty()).unwrap_or_default()
}

fn time(v: &Value, key: &str) -> Option<prost_types::Timestamp> {
    v.get(key).and_then(Value::as_str).and_then(parse_time)
}

/// An amount as the decimal text that was sent: JSON numbers keep their
/// shortest exact decimal form (540 stays "540", 545.95 stays "545.95").
fn money(v: &Value, key: &str, currency: &str) -> Option<Money> {
    let amount = text(v, key);
    (!amount.is_empty()).then(|| Money { amount, currency: currency.to_string() })
}

fn list<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn items(v: &Value, currency: &str) -> Vec<Item> {
    list(v, "items").map(|i| item(i, currency)).collect()
}

fn item(i: &Value, currency: &str) -> Item {
    Item {
        id: text(i, "id"),
        sku: text(i, "sku"),
        parent_sku: text(i, "parent_sku"),
        mpn: text(i, "mpn"),
        manufacturer: text(i, "manufacturer"),
        size: text(i, "size"),
        color: text(i, "color"),
        quantity: text_any(i, &["qty", "qty_ordered"]),
        unit_price: money(i, "item_price_inc_tax", currency),
        row_total: money(i, "row_total_inc_tax", currency),
    }
}

/// The track object; some senders may wrap it in a list.
fn track(v: &Value) -> Value {
    match field(v, "track") {
        Value::Array(tracks) => tracks.into_iter().next().unwrap_or(Value::Null),
        other => other,
    }
}

fn address(v: &Value, key: &str) -> Option<Address> {
    let a = v.get(key).filter(|a| a.is_object())?;
    Some(Address {
        first_name: text(a, "first_name"),
        last_name: text(a, "last_name"),
        company: text(a, "company_name"),
        street: text(a, "street"),
        house_number: text_any(a, &["house_number", "houseNumber"]),
        postcode: text(a, "postcode"),
        city: text(a, "city"),
        region_code: text(a, "region_code"),
        country_code: text_any(a, &["country_id", "country_code"]),
        email: text(a, "email"),
        telephone: text(a, "telephone"),
    })
}
