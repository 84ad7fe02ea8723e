//! Property tests: any bytes, for every provider, kind and content type,
//! never panic and always end in observations or a quarantine reason; over
//! the real server, in an event, a quarantine entry, or a clear 4xx.

use crate::common::TestServer;
use ordertrail::ingest::{self, DeliveryMeta};
use ordertrail::provider::{Provider, WINKELSTRAAT_KINDS};
use proptest::prelude::*;
use serde_json::Value;

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=XyZ",
    "multipart/form-data",
    "text/plain",
    "",
];

/// Field names the mappers look at, so generated objects reach deep paths.
const KEYS: &[&str] = &[
    "EventType",
    "OrderId",
    "ExternalOrderId",
    "SafeId",
    "IsSuccessful",
    "NewStatus",
    "OldStatus",
    "ShipmentId",
    "Package",
    "ShippedDate",
    "FulfilledDate",
    "customer_ref",
    "order_id",
    "status",
    "parcel_status",
    "is_replacement",
    "tracking_number",
    "increment_id",
    "order_increment_id",
    "po_number",
    "items",
    "track",
    "updated_at",
    "qty",
    "grand_total",
    "shipping_address",
    "house_number",
    "payment",
];

fn provider() -> impl Strategy<Value = Provider> {
    prop::sample::select(Provider::ALL.to_vec())
}

fn kind() -> impl Strategy<Value = Option<String>> {
    let mut kinds: Vec<Option<String>> = WINKELSTRAAT_KINDS.iter().map(|k| Some(k.to_string())).collect();
    kinds.push(None);
    kinds.push(Some("unheard-of".into()));
    prop::sample::select(kinds)
}

/// JSON built from the mappers' own vocabulary, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
        Just(Value::String("2024-02-20 15:28:51".into())),
        Just(Value::String("OrderUpdate".into())),
        Just(Value::String("IN_TRANSIT".into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

fn check_mapping(provider: Provider, kind: Option<&str>, content_type: &str, body: &[u8]) -> Result<(), TestCaseError> {
    let meta = DeliveryMeta { provider, kind, content_type };
    match ingest::normalize(meta, body) {
        Ok(normalized) => {
            prop_assert!(!normalized.observations.is_empty(), "understood but no observation");
            prop_assert!(normalized.dedup_key.starts_with(provider.name()));
            for obs in &normalized.observations {
                let r = &obs.references;
                prop_assert!(
                    !(r.merchant_reference.is_empty() && r.provider_order_id.is_empty() && r.safe_id.is_empty()),
                    "an observation without any order reference"
                );
            }
        }
        Err(reason) => prop_assert!(!reason.0.is_empty(), "a quarantine needs a reason"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        provider in provider(),
        kind in kind(),
        content_type in prop::sample::select(CONTENT_TYPES),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        check_mapping(provider, kind.as_deref(), content_type, &body)?;
    }

    #[test]
    fn arbitrary_json_in_the_providers_vocabulary_never_panics(
        provider in provider(),
        kind in kind(),
        value in json_value(),
    ) {
        let body = serde_json::to_vec(&value).unwrap();
        check_mapping(provider, kind.as_deref(), "application/json", &body)?;
    }

    #[test]
    fn arbitrary_forms_never_panic(
        pairs in prop::collection::vec((prop::sample::select(KEYS), "[ -~]{0,16}"), 0..10),
    ) {
        let body = serde_urlencoded::to_string(&pairs).unwrap();
        check_mapping(Provider::Withings, None, "application/x-www-form-urlencoded", body.as_bytes())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Over the real server: every authentic POST ends applied (with events),
    /// quarantined (with the exact bytes kept), a duplicate, or a clear 400.
    #[test]
    fn the_server_keeps_or_clearly_refuses_arbitrary_posts(
        provider in provider(),
        kind in kind(),
        content_type in prop::sample::select(CONTENT_TYPES),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let server = TestServer::start().await;
            let path = match (provider, &kind) {
                (Provider::Winkelstraat, Some(kind)) => format!("/webhooks/winkelstraat/{kind}"),
                _ => format!("/webhooks/{}", provider.name()),
            };
            let answer = server.request("POST", &path, &[("content-type", content_type)], body.clone().into()).await;
            match answer.status.as_u16() {
                400 => prop_assert!(body.is_empty(), "400 for a non-empty body: {}", answer.json),
                200 => {
                    prop_assert_eq!(answer.json["outcome"].as_str(), Some("applied"));
                    prop_assert!(!answer.json["sequences"].as_array().unwrap().is_empty());
                    prop_assert!(!server.all_events().await.is_empty());
                }
                202 => {
                    let raw_id = answer.json["raw_id"].as_u64().unwrap();
                    let stored = server.delivery(raw_id).await.expect("quarantined delivery is stored");
                    prop_assert_eq!(&stored.body[..], &body[..]);
                    prop_assert!(!stored.quarantine_reason.is_empty());
                }
                other => prop_assert!(false, "unexpected status {}: {}", other, answer.json),
            }
            server.stop().await;
            Ok(())
        })?;
    }
}
