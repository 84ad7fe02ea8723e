//! Data-driven mapper tests: every file in `tests/fixtures/<provider>/` is a
//! delivery body; beside it, `<name>.expect.json` names the URL kind and
//! content type to deliver it with and the expected normalized result (a
//! summary of every observation, or the quarantine reason). All run through
//! one helper, [`check`].
//!
//! `ORDERTRAIL_BLESS=1 cargo test --test fixtures` rewrites the expected
//! results from what the mappers produce now; review the diff before
//! committing it.

use std::path::{Path, PathBuf};

use ordertrail::ingest::{self, DeliveryMeta, Observation};
use ordertrail::proto::{Address, Item, Money, ReturnItem, Shipment};
use ordertrail::provider::Provider;
use prost_types::Timestamp;
use serde_json::{Map, Value, json};

const EXPECT_SUFFIX: &str = ".expect.json";

#[test]
fn every_fixture_maps_as_expected() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut checked = 0;
    let mut failures = Vec::new();
    for provider in Provider::ALL {
        for body in bodies(&root.join(provider.name())) {
            checked += 1;
            if let Err(message) = check(provider, &body) {
                failures.push(format!("{}: {message}", body.display()));
            }
        }
    }
    assert!(checked >= 30, "only {checked} fixtures found");
    assert!(failures.is_empty(), "{} of {checked} fixtures failed:\n{}", failures.len(), failures.join("\n"));
}

/// The body files of one provider directory, sorted.
fn bodies(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(EXPECT_SUFFIX))
        .collect();
    files.sort();
    files
}

/// Maps one fixture and compares the result with its expectation file.
fn check(provider: Provider, body_path: &Path) -> Result<(), String> {
    let expect_path = PathBuf::from(format!("{}{EXPECT_SUFFIX}", body_path.with_extension("").display()));
    let text = std::fs::read_to_string(&expect_path).map_err(|e| format!("{}: {e}", expect_path.display()))?;
    let mut expect: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", expect_path.display()))?;
    let body = std::fs::read(body_path).map_err(|e| e.to_string())?;
    let content_type = expect["content_type"].as_str().unwrap_or_default().to_string();
    let kind = expect["kind"].as_str().map(str::to_string);
    let meta = DeliveryMeta { provider, kind: kind.as_deref(), content_type: &content_type };
    let actual = match ingest::normalize(meta, &body) {
        Ok(normalized) => {
            if normalized.observations.is_empty() {
                return Err("mapped to no observation at all".into());
            }
            let prefix = normalized.dedup_key.rsplit_once(':').map(|(p, _)| p).unwrap_or_default();
            json!({
                "dedup_prefix": prefix,
                "observations": normalized.observations.iter().map(summarize).collect::<Vec<_>>(),
            })
        }
        Err(reason) => json!({ "quarantine": reason.0 }),
    };
    if std::env::var_os("ORDERTRAIL_BLESS").is_some() {
        expect["result"] = actual;
        let pretty = serde_json::to_string_pretty(&expect).map_err(|e| e.to_string())?;
        std::fs::write(&expect_path, pretty + "\n").map_err(|e| e.to_string())?;
        return Ok(());
    }
    if expect["result"] != actual {
        return Err(format!(
            "expected\n{}\nbut got\n{}",
            serde_json::to_string_pretty(&expect["result"]).unwrap_or_default(),
            serde_json::to_string_pretty(&actual).unwrap_or_default()
        ));
    }
    Ok(())
}

// === Summaries: the fields that are set, in a stable JSON form ===

/// Collects `(key, value)` pairs, leaving out empty ones.
struct Summary(Map<String, Value>);

impl Summary {
    fn new() -> Self {
        Self(Map::new())
    }

    fn text(mut self, key: &str, value: &str) -> Self {
        if !value.is_empty() {
            self.0.insert(key.into(), value.into());
        }
        self
    }

    fn value(mut self, key: &str, value: Option<Value>) -> Self {
        match value {
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(v) => {
                self.0.insert(key.into(), v);
            }
            None => {}
        }
        self
    }

    fn time(self, key: &str, value: Option<Timestamp>) -> Self {
        self.value(key, value.map(|t| Value::String(time(t))))
    }

    fn money(self, key: &str, value: &Option<Money>) -> Self {
        self.value(key, value.as_ref().map(|m| Value::String(format!("{} {}", m.amount, m.currency).trim().into())))
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn time(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32).map(|d| d.to_rfc3339()).unwrap_or_default()
}

fn summarize(obs: &Observation) -> Value {
    let refs = &obs.references;
    let o = &obs.order;
    let order = Summary::new()
        .text("customer_id", &o.customer_id)
        .value("is_replacement", o.is_replacement.then_some(Value::Bool(true)))
        .text("original_merchant_reference", &o.original_merchant_reference)
        .text("original_serial_number", &o.original_serial_number)
        .text("description", &o.description)
        .value("items", Some(o.items.iter().map(item).collect()))
        .value("shipping_address", o.shipping_address.as_ref().map(address))
        .value("billing_address", o.billing_address.as_ref().map(address))
        .money("grand_total", &o.grand_total)
        .money("subtotal", &o.subtotal)
        .money("shipping", &o.shipping)
        .time("provider_created_at", o.provider_created_at)
        .done();
    Summary::new()
        .text("kind", obs.kind.as_str_name())
        .text("merchant_reference", &refs.merchant_reference)
        .text("provider_order_id", &refs.provider_order_id)
        .text("safe_id", &refs.safe_id)
        .value(
            "status",
            obs.status
                .as_ref()
                .map(|s| json!({"verbatim": s.verbatim, "canonical": s.canonical.map(|c| c.as_str_name())})),
        )
        .value("provider_previous_status", obs.provider_previous_status.clone().map(Value::String))
        .time("provider_time", obs.provider_time)
        .text("description", &obs.description)
        .value("order", Some(order))
        .value("shipment", obs.shipment.as_ref().map(shipment))
        .value(
            "return",
            obs.return_.as_ref().map(|r| {
                Summary::new()
                    .text("id", &r.id)
                    .text("provider_status", &r.provider_status)
                    .time("requested_at", r.requested_at)
                    .time("received_at", r.received_at)
                    .time("processed_at", r.processed_at)
                    .text("carrier", &r.carrier)
                    .text("tracking_number", &r.tracking_number)
                    .text("tracking_url", &r.tracking_url)
                    .value("items", Some(r.items.iter().map(return_item).collect()))
                    .done()
            }),
        )
        .value(
            "refund",
            obs.refund.as_ref().map(|r| {
                Summary::new()
                    .text("id", &r.id)
                    .time("created_at", r.created_at)
                    .money("grand_total", &r.grand_total)
                    .money("subtotal", &r.subtotal)
                    .money("shipping", &r.shipping)
                    .money("adjustment", &r.adjustment)
                    .money("fee", &r.fee)
                    .money("return_fee", &r.return_fee)
                    .value("items", Some(r.items.iter().map(item).collect()))
                    .done()
            }),
        )
        .value(
            "invoice",
            obs.invoice.as_ref().map(|i| {
                Summary::new()
                    .text("id", &i.id)
                    .time("created_at", i.created_at)
                    .money("grand_total", &i.grand_total)
                    .money("subtotal", &i.subtotal)
                    .money("shipping", &i.shipping)
                    .value("items", Some(i.items.iter().map(item).collect()))
                    .done()
            }),
        )
        .value(
            "payment_request",
            obs.payment_request.as_ref().map(|p| {
                Summary::new()
                    .text("purchase_order_id", &p.purchase_order_id)
                    .text("pay_by_link", &p.pay_by_link)
                    .text("method", &p.method)
                    .time("created_at", p.created_at)
                    .money("grand_total", &p.grand_total)
                    .money("subtotal", &p.subtotal)
                    .money("shipping", &p.shipping)
                    .money("tax", &p.tax)
                    .money("discount", &p.discount)
                    .value("items", Some(p.items.iter().map(item).collect()))
                    .done()
            }),
        )
        .done()
}

fn shipment(s: &Shipment) -> Value {
    Summary::new()
        .text("id", &s.id)
        .text("status", if s.status == 0 { "" } else { s.status().as_str_name() })
        .text("provider_status", &s.provider_status)
        .text("carrier", &s.carrier)
        .text("carrier_service", &s.carrier_service)
        .text("tracking_number", &s.tracking_number)
        .text("tracking_url", &s.tracking_url)
        .time("shipped_at", s.shipped_at)
        .time("collected_at", s.collected_at)
        .time("delivered_at", s.delivered_at)
        .time("fulfilled_at", s.fulfilled_at)
        .time("provider_updated_at", s.provider_updated_at)
        .text("package_id", &s.package_id)
        .value("order_item_ids", Some(s.order_item_ids.iter().map(|i| Value::String(i.clone())).collect()))
        .value("items", Some(s.items.iter().map(item).collect()))
        .done()
}

fn item(i: &Item) -> Value {
    Summary::new()
        .text("id", &i.id)
        .text("sku", &i.sku)
        .text("parent_sku", &i.parent_sku)
        .text("mpn", &i.mpn)
        .text("manufacturer", &i.manufacturer)
        .text("size", &i.size)
        .text("color", &i.color)
        .text("quantity", &i.quantity)
        .money("unit_price", &i.unit_price)
        .money("row_total", &i.row_total)
        .done()
}

fn return_item(r: &ReturnItem) -> Value {
    Summary::new()
        .value("item", r.item.as_ref().map(item))
        .text("quantity_requested", &r.quantity_requested)
        .text("quantity_approved", &r.quantity_approved)
        .text("quantity_returned", &r.quantity_returned)
        .text("reason", &r.reason)
        .text("resolution", &r.resolution)
        .text("merchant_resolution", &r.merchant_resolution)
        .text("status", &r.status)
        .money("return_fee", &r.return_fee)
        .done()
}

fn address(a: &Address) -> Value {
    Summary::new()
        .text("first_name", &a.first_name)
        .text("last_name", &a.last_name)
        .text("company", &a.company)
        .text("street", &a.street)
        .text("house_number", &a.house_number)
        .text("postcode", &a.postcode)
        .text("city", &a.city)
        .text("region_code", &a.region_code)
        .text("country_code", &a.country_code)
        .text("email", &a.email)
        .text("telephone", &a.telephone)
        .done()
}
