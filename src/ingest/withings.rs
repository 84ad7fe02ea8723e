//! Withings Dropshipment order update notifications.
//!
//! The documentation contradicts itself on the body: form parameters on the
//! older page, JSON on the newer ones. All three encodings are accepted,
//! chosen by `Content-Type`: urlencoded form, multipart form and JSON. There
//! is no event id, so the dedup key is the content: the same notification
//! gives the same key whatever its encoding.

use std::collections::BTreeMap;

use super::mapping::{content_key, lookup, media_type};
use super::{DeliveryMeta, Normalized, Observation, ReportedStatus, Unrecognized};
use crate::proto::{EventKind, Order, OrderReferences, OrderStatus, Shipment, ShipmentStatus};

/// Withings sends one parcel per order; its shipment gets this id.
pub const PARCEL_ID: &str = "parcel";

/// Largest multipart field accepted (the whole body is already limited).
const MAX_FIELD_BYTES: u64 = 64 * 1024;

/// Order `status` values (note the spaces) and their canonical status.
const ORDER_STATUS: &[(&str, OrderStatus)] = &[
    ("CREATED", OrderStatus::Pending),
    ("ADDRESS VERIFICATION", OrderStatus::Pending),
    ("VERIFIED", OrderStatus::Accepted),
    ("ADDRESS ERROR", OrderStatus::Rejected),
    ("PROCESSING", OrderStatus::Processing),
    ("OPEN", OrderStatus::Processing),
    ("BACKHOLD", OrderStatus::OnHold),
    ("SHIPPED", OrderStatus::Shipped),
    ("TRASHED", OrderStatus::Cancelled),
    ("FAILED", OrderStatus::Failed),
];

/// `parcel_status` values and their canonical shipment status.
const PARCEL_STATUS: &[(&str, ShipmentStatus)] = &[
    ("pending", ShipmentStatus::LabelCreated),
    ("info_received", ShipmentStatus::LabelCreated),
    ("in_transit", ShipmentStatus::InTransit),
    ("delayed", ShipmentStatus::Delayed),
    ("failed_attempt", ShipmentStatus::DeliveryAttemptFailed),
    ("pickup", ShipmentStatus::AvailableForPickup),
    ("delivered", ShipmentStatus::Delivered),
    ("exception", ShipmentStatus::Exception),
    ("return", ShipmentStatus::ReturningToSender),
    ("expired", ShipmentStatus::Expired),
];

type Fields = BTreeMap<String, String>;

pub(super) fn normalize(meta: DeliveryMeta<'_>, body: &[u8]) -> Result<Normalized, Unrecognized> {
    let fields = parse(meta.content_type, body)?;
    let key = content_key("withings", &serde_json::to_value(&fields).unwrap_or_default());
    Ok(Normalized { dedup_key: key, observations: observe(&fields)? })
}

// === Parsing the three encodings ===

fn parse(content_type: &str, body: &[u8]) -> Result<Fields, Unrecognized> {
    let essence = media_type(content_type);
    match essence.as_str() {
        "application/x-www-form-urlencoded" => parse_form(body),
        "multipart/form-data" => parse_multipart(content_type, body),
        "application/json" | "text/json" => parse_json(body),
        _ if essence.ends_with("+json") => parse_json(body),
        // No content type: the body decides.
        "" if body.trim_ascii_start().starts_with(b"{") => parse_json(body),
        "" => parse_form(body),
        other => Err(Unrecognized(format!(
            "unexpected content type `{other}`; expected a form (urlencoded or multipart) or JSON"
        ))),
    }
}

fn parse_form(body: &[u8]) -> Result<Fields, Unrecognized> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|e| Unrecognized(format!("invalid form body: {e}")))?;
    non_empty(pairs)
}

fn parse_json(body: &[u8]) -> Result<Fields, Unrecognized> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Unrecognized(format!("invalid JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| Unrecognized("expected a JSON object".into()))?;
    let pairs = object.iter().filter_map(|(key, value)| {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return None,
        };
        Some((key.clone(), text))
    });
    non_empty(pairs)
}

/// Parses a multipart body that is already entirely in memory.
fn parse_multipart(content_type: &str, body: &[u8]) -> Result<Fields, Unrecognized> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| Unrecognized(format!("invalid multipart content type: {e}")))?;
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(body.len() as u64).per_field(MAX_FIELD_BYTES));
    let chunk = bytes::Bytes::copy_from_slice(body);
    let stream = tokio_stream::once(Ok::<_, std::convert::Infallible>(chunk));
    let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
    let collect = async move {
        let mut pairs = Vec::new();
        while let Some(field) = multipart.next_field().await? {
            let name = field.name().unwrap_or_default().to_string();
            pairs.push((name, field.text().await?));
        }
        Ok::<_, multer::Error>(pairs)
    };
    match poll_in_memory(collect) {
        Some(Ok(pairs)) => non_empty(pairs),
        Some(Err(e)) => Err(Unrecognized(format!("invalid multipart body: {e}"))),
        None => Err(Unrecognized("invalid multipart body: incomplete".into())),
    }
}

/// Drives a future whose only input is already in memory, so it never
/// waits: it completes on the first poll, or the input was incomplete.
fn poll_in_memory<F: Future>(future: F) -> Option<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// A missing or empty field means "not sent". Form decoders replace bytes
/// that are not UTF-8 with U+FFFD; such a value is not stored as if it were
/// what was sent: the delivery is quarantined instead.
fn non_empty(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Fields, Unrecognized> {
    let mut fields = Fields::new();
    for (key, value) in pairs {
        if key.contains('\u{FFFD}') || value.contains('\u{FFFD}') {
            return Err(Unrecognized(format!("field `{key}` is not valid UTF-8")));
        }
        let value = value.trim();
        if !key.is_empty() && !value.is_empty() {
            fields.insert(key, value.to_string());
        }
    }
    Ok(fields)
}

/// `true`/`false`/`1`/`0` (any case); anything else is "not sent".
fn boolean(value: Option<&String>) -> Option<bool> {
    match value?.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

// === Mapping ===

fn observe(fields: &Fields) -> Result<Vec<Observation>, Unrecognized> {
    let get = |key: &str| fields.get(key).cloned().unwrap_or_default();
    let references = OrderReferences {
        merchant_reference: get("customer_ref"),
        provider_order_id: get("order_id"),
        safe_id: String::new(),
    };
    if references.merchant_reference.is_empty() && references.provider_order_id.is_empty() {
        return Err(Unrecognized("no order reference (customer_ref or order_id)".into()));
    }
    let order = Order {
        customer_id: get("customer_id"),
        is_replacement: boolean(fields.get("is_replacement")).unwrap_or(false),
        original_merchant_reference: get("original_customer_ref"),
        original_serial_number: get("original_serial_number"),
        ..Order::default()
    };
    let base = Observation { references, ..Observation::default() };
    let mut observations = Vec::new();
    if let Some(status) = fields.get("status") {
        let canonical = lookup(ORDER_STATUS, status);
        let kind = match canonical {
            Some(OrderStatus::Rejected) => EventKind::OrderRejected,
            _ if super::match_key(status) == "created" => EventKind::OrderCreated,
            _ => EventKind::OrderStatusChanged,
        };
        let reported = ReportedStatus { verbatim: status.clone(), canonical };
        observations.push(Observation { kind, status: Some(reported), ..base.clone() });
    }
    if let Some(shipment) = parcel(fields) {
        observations.push(Observation { kind: EventKind::ShipmentUpdated, shipment: Some(shipment), ..base.clone() });
    }
    if observations.is_empty() {
        observations.push(Observation { kind: EventKind::OrderUpdated, ..base });
    }
    // Order data travels with the first observation.
    observations[0].order = order;
    Ok(observations)
}

/// The parcel, when any of its fields was sent (only after shipping).
fn parcel(fields: &Fields) -> Option<Shipment> {
    let keys = ["parcel_status", "carrier", "carrier_service", "tracking_number"];
    if !keys.iter().any(|k| fields.contains_key(*k)) {
        return None;
    }
    let get = |key: &str| fields.get(key).cloned().unwrap_or_default();
    let status = fields.get("parcel_status").and_then(|s| lookup(PARCEL_STATUS, s));
    Some(Shipment {
        id: PARCEL_ID.to_string(),
        status: status.unwrap_or(ShipmentStatus::Unspecified) as i32,
        provider_status: get("parcel_status"),
        carrier: get("carrier"),
        carrier_service: get("carrier_service"),
        tracking_number: get("tracking_number"),
        ..Shipment::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Provider;

    fn dedup_key(content_type: &str, body: &str) -> String {
        let meta = DeliveryMeta { provider: Provider::Withings, kind: None, content_type };
        normalize(meta, body.as_bytes()).unwrap().dedup_key
    }

    #[test]
    fn the_same_notification_in_any_encoding_has_one_dedup_key() {
        let form = dedup_key("application/x-www-form-urlencoded", "customer_ref=M-1&status=OPEN&is_replacement=0");
        let json = dedup_key("application/json", r#"{"status":"OPEN","customer_ref":"M-1","is_replacement":"0"}"#);
        let multipart = dedup_key(
            "multipart/form-data; boundary=b",
            "--b\r\nContent-Disposition: form-data; name=\"customer_ref\"\r\n\r\nM-1\r\n\
             --b\r\nContent-Disposition: form-data; name=\"status\"\r\n\r\nOPEN\r\n\
             --b\r\nContent-Disposition: form-data; name=\"is_replacement\"\r\n\r\n0\r\n--b--\r\n",
        );
        assert_eq!(form, json);
        assert_eq!(form, multipart);
        assert_ne!(form, dedup_key("application/json", r#"{"status":"SHIPPED","customer_ref":"M-1"}"#));
    }

    #[test]
    fn booleans_as_strings_or_json() {
        for (value, expected) in
            [("true", Some(true)), ("1", Some(true)), ("FALSE", Some(false)), ("0", Some(false)), ("maybe", None)]
        {
            assert_eq!(boolean(Some(&value.to_string())), expected, "{value}");
        }
    }

    #[test]
    fn oversized_multipart_field_is_refused() {
        let big = "x".repeat(MAX_FIELD_BYTES as usize + 1);
        let body = format!("--b\r\nContent-Disposition: form-data; name=\"customer_ref\"\r\n\r\n{big}\r\n--b--\r\n");
        let meta =
            DeliveryMeta { provider: Provider::Withings, kind: None, content_type: "multipart/form-data; boundary=b" };
        let err = normalize(meta, body.as_bytes()).unwrap_err();
        assert!(err.0.contains("invalid multipart body"), "{err}");
    }
}
