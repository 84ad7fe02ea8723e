//! OrderMesh end to end: the documented examples POSTed to the real server
//! and read back over gRPC.

use crate::common::{TestServer, fixture};
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::{
    EventKind, FindOrdersRequest, GetOrderRequest, ListEventsRequest, Order, OrderStatus, ShipmentStatus,
    find_orders_request,
};
use tonic::Code;

const URL: &str = "/webhooks/ordermesh";

async fn get(server: &TestServer, reference: Reference) -> Result<Order, tonic::Status> {
    let request = GetOrderRequest { reference: Some(reference), source: String::new() };
    server.grpc().await.get_order(request).await.map(|r| r.into_inner())
}

async fn post_fixture(server: &TestServer, name: &str) -> serde_json::Value {
    let answer = server.post_json(URL, fixture(&format!("ordermesh/{name}.json"))).await;
    assert_eq!(answer.status, 200, "{name}: {}", answer.json);
    answer.json
}

#[tokio::test]
async fn created_order_is_found_by_every_reference() {
    let server = TestServer::start().await;
    post_fixture(&server, "order-creation").await;
    for reference in [
        Reference::ExternalOrderId("WBTEST22".into()),
        Reference::SafeId("WebhooksTest22".into()),
        Reference::ProviderOrderId("670e58fe7741035996cf7d20".into()),
        Reference::MerchantReference("WBTEST22".into()),
    ] {
        let order = get(&server, reference.clone()).await.unwrap_or_else(|e| panic!("{reference:?}: {e}"));
        assert_eq!(order.status(), OrderStatus::Accepted);
        assert_eq!(order.source, "ordermesh");
        let refs = order.references.unwrap();
        assert_eq!(refs.merchant_reference, "WBTEST22");
        assert_eq!(refs.provider_order_id, "670e58fe7741035996cf7d20");
        assert_eq!(refs.safe_id, "WebhooksTest22");
    }
    // Provider-specific reference names only match that provider's orders.
    let wrong_provider = get(&server, Reference::CustomerRef("WBTEST22".into())).await.unwrap_err();
    assert_eq!(wrong_provider.code(), Code::NotFound);
}

#[tokio::test]
async fn order_update_changes_status_and_records_the_previous_one() {
    let server = TestServer::start().await;
    post_fixture(&server, "order-creation").await;
    post_fixture(&server, "order-update").await;
    let order = get(&server, Reference::ExternalOrderId("WBTEST22".into())).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Processing);
    assert_eq!(order.provider_status, "ReadyForFulfillment");
    let events = server.all_events().await;
    assert_eq!(events.len(), 2);
    let update = &events[1];
    assert_eq!(update.kind(), EventKind::OrderStatusChanged);
    assert_eq!(update.status(), OrderStatus::Processing);
    assert_eq!(update.previous_status(), OrderStatus::Accepted);
    assert_eq!(update.provider_previous_status, "Open");
    assert!(update.applied);
    // The event names its raw delivery, which holds the rest of its provenance.
    let provenance = update.provenance.as_ref().unwrap();
    let raw = server.delivery(provenance.raw_id).await.unwrap();
    assert_eq!(raw.event_sequences, [update.sequence]);
    assert_eq!(raw.auth_method, "none");
    assert_eq!(raw.body_sha256, ordertrail::ingest::sha256_hex(&fixture("ordermesh/order-update.json")));
    assert!(raw.dedup_key.starts_with("ordermesh:"));
}

#[tokio::test]
async fn failed_then_successful_creation_is_one_accepted_order() {
    let server = TestServer::start().await;
    let failed = String::from_utf8(fixture("ordermesh/order-creation-failed.json")).unwrap();
    post_fixture(&server, "order-creation-failed").await;
    let rejected = get(&server, Reference::ExternalOrderId("WBTEST23".into())).await.unwrap();
    assert_eq!(rejected.status(), OrderStatus::Rejected);
    // The same merchant order is created successfully later.
    let success = failed
        .replace("\"IsSuccessful\": false", "\"IsSuccessful\": true, \"OrderId\": \"670e58fe7741035996cf7d99\"")
        .replace("\"ResponseCode\": 400,", "");
    assert_eq!(server.post_json(URL, success).await.status, 200);
    let request = FindOrdersRequest {
        reference: Some(find_orders_request::Reference::ExternalOrderId("WBTEST23".into())),
        source: String::new(),
    };
    let orders = server.grpc().await.find_orders(request).await.unwrap().into_inner().orders;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0].status(), OrderStatus::Accepted);
    assert_eq!(orders[0].id, rejected.id);
    assert_eq!(orders[0].references.as_ref().unwrap().provider_order_id, "670e58fe7741035996cf7d99");
}

#[tokio::test]
async fn shipment_update_carries_tracking_and_finds_the_order() {
    let server = TestServer::start().await;
    post_fixture(&server, "order-creation").await;
    post_fixture(&server, "shipment-created").await;
    let order = get(&server, Reference::SafeId("WebhooksTest22".into())).await.unwrap();
    assert_eq!(order.shipments.len(), 1);
    assert_eq!(order.shipments[0].status(), ShipmentStatus::LabelCreated);
    post_fixture(&server, "shipment-update").await;
    let order = get(&server, Reference::TrackingNumber("9400136208551280752547".into())).await.unwrap();
    assert_eq!(order.shipments.len(), 1);
    let shipment = &order.shipments[0];
    assert_eq!(shipment.id, "3ed09cf5-80c4-4450-8c64-245f2e2061bc");
    assert_eq!(shipment.status(), ShipmentStatus::InTransit);
    assert_eq!(shipment.carrier, "USPS");
    assert_eq!(shipment.carrier_service, "USPS Ground Advantage");
    assert_eq!(
        shipment.tracking_url,
        "https://tools.usps.com/go/TrackConfirmAction.action?tLabels=9400136208551280752547"
    );
    assert_eq!(shipment.shipped_at.unwrap().seconds, 1_649_604_000, "2022-04-10T15:20:00 taken as UTC");
    assert_eq!(shipment.order_item_ids, ["670e58fe7741035996cf7d21"]);
    assert_eq!(order.status(), OrderStatus::Shipped, "a shipment in transit ships the order");
}

#[tokio::test]
async fn late_open_after_ready_for_fulfillment_is_stale() {
    let server = TestServer::start().await;
    post_fixture(&server, "order-creation").await;
    post_fixture(&server, "order-update").await;
    let late = String::from_utf8(fixture("ordermesh/order-update.json"))
        .unwrap()
        .replace("\"NewStatus\": \"ReadyForFulfillment\"", "\"NewStatus\": \"Open\"")
        .replace("\"OldStatus\": \"Open\"", "\"OldStatus\": \"Created\"");
    assert_eq!(server.post_json(URL, late).await.status, 200);
    let order = get(&server, Reference::ExternalOrderId("WBTEST22".into())).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Processing);
    assert_eq!(order.provider_status, "ReadyForFulfillment");
    let history = server
        .grpc()
        .await
        .list_events(ListEventsRequest { order_id: order.id, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(history.len(), 3);
    assert!(!history[2].applied, "late Open must be recorded as stale");
    assert!(history[2].note.contains("stale"), "{}", history[2].note);
    assert_eq!(history[2].provider_status, "Open");
    assert_eq!(order.last_sequence, history[1].sequence);
}

#[tokio::test]
async fn the_same_delivery_twice_gives_one_event() {
    let server = TestServer::start().await;
    let first = post_fixture(&server, "order-creation").await;
    let again = post_fixture(&server, "order-creation").await;
    assert_eq!(first["outcome"], "applied");
    assert_eq!(again["outcome"], "duplicate");
    assert_eq!(again["raw_id"], first["raw_id"]);
    // Re-serialized with other whitespace and key order: the same content.
    let value: serde_json::Value = serde_json::from_slice(&fixture("ordermesh/order-creation.json")).unwrap();
    let compact = serde_json::to_vec(&value).unwrap();
    assert_eq!(server.post_json(URL, compact).await.json["outcome"], "duplicate");
    assert_eq!(server.all_events().await.len(), 1);
}

#[tokio::test]
async fn concurrent_duplicates_give_one_event() {
    let server = std::sync::Arc::new(TestServer::start().await);
    let body = fixture("ordermesh/order-update.json");
    let posts: Vec<_> = (0..24)
        .map(|_| {
            let server = server.clone();
            let body = body.clone();
            tokio::spawn(async move { server.post_json(URL, body).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for post in posts {
        let answer = post.await.unwrap();
        assert_eq!(answer.status, 200);
        outcomes.push(answer.json["outcome"].as_str().unwrap().to_string());
    }
    assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "duplicate").count(), 23);
    assert_eq!(server.all_events().await.len(), 1);
}

#[tokio::test]
async fn invalid_json_and_unknown_event_type_are_quarantined_with_their_bytes() {
    let server = TestServer::start().await;
    let broken: &[u8] = b"{\"EventType\": \"OrderUpdate\", \"OrderId\": ";
    let unknown: &[u8] = b"{\"EventType\": \"OrderTeleported\", \"OrderId\": \"670e58fe7741035996cf7d20\"}";
    for body in [broken, unknown] {
        let answer = server.post_json(URL, body.to_vec()).await;
        assert_eq!(answer.status, 202, "{}", answer.json);
        assert_eq!(answer.json["outcome"], "quarantined");
    }
    // A retry of a quarantined delivery is not stored twice.
    let retry = server.post_json(URL, unknown.to_vec()).await;
    assert_eq!((retry.status.as_u16(), retry.json["outcome"].as_str()), (202, Some("duplicate")));
    let quarantine = server.quarantine().await;
    assert_eq!(quarantine.len(), 2);
    assert_eq!(quarantine[0].body, broken);
    assert!(quarantine[0].quarantine_reason.starts_with("invalid JSON"), "{}", quarantine[0].quarantine_reason);
    assert_eq!(quarantine[1].body, unknown);
    assert_eq!(quarantine[1].quarantine_reason, "unknown EventType `OrderTeleported`");
    assert_eq!(quarantine[1].source, "ordermesh");
    assert!(!quarantine[1].request_id.is_empty());
    assert!(server.all_events().await.is_empty());
}

#[tokio::test]
async fn delivery_without_any_order_reference_is_quarantined() {
    let server = TestServer::start().await;
    let answer = server.post_json(URL, r#"{"EventType":"OrderUpdate","NewStatus":"Open"}"#).await;
    assert_eq!(answer.status, 202);
    assert!(answer.json["reason"].as_str().unwrap().contains("no order reference"));
}

#[tokio::test]
async fn restart_keeps_everything_and_sequences_continue() {
    let server = TestServer::start().await;
    post_fixture(&server, "order-creation").await;
    post_fixture(&server, "order-update").await;
    server.post_json(URL, "not json").await;
    let before = server.all_events().await;
    let server = server.restart().await;
    assert_eq!(server.all_events().await, before);
    assert_eq!(server.quarantine().await.len(), 1);
    let order = get(&server, Reference::ExternalOrderId("WBTEST22".into())).await.unwrap();
    assert_eq!(order.status(), OrderStatus::Processing);
    // Dedup is permanent: it survives the restart.
    let again = server.post_json(URL, fixture("ordermesh/order-update.json")).await;
    assert_eq!(again.json["outcome"], "duplicate");
    let next = post_fixture(&server, "shipment-created").await;
    assert_eq!(next["sequences"], serde_json::json!([3]));
    let sequences: Vec<u64> = server.all_events().await.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    server.stop().await;
}

#[tokio::test]
async fn list_events_pages_filters_and_shows_one_orders_history() {
    let server = TestServer::start().await;
    let template = String::from_utf8(fixture("ordermesh/order-creation.json")).unwrap();
    for i in 0..4 {
        let body = template.replace("WBTEST22", &format!("EXT-{i}")).replace("7d20", &format!("7e{i:02}"));
        assert_eq!(server.post_json(URL, body).await.status, 200);
    }
    post_fixture(&server, "order-creation").await;
    post_fixture(&server, "order-update").await;
    post_fixture(&server, "shipment-created").await;
    let mut client = server.grpc().await;
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListEventsRequest { page_size: 3, page_token: token.clone(), ..Default::default() };
        let page = client.list_events(request).await.unwrap().into_inner();
        assert_eq!(page.head_sequence, 7);
        pages.push(page.events.iter().map(|e| e.sequence).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, [vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    let after = ListEventsRequest { after_sequence: 5, ..Default::default() };
    let tail: Vec<u64> =
        client.list_events(after).await.unwrap().into_inner().events.iter().map(|e| e.sequence).collect();
    assert_eq!(tail, [6, 7]);
    let kinds = ListEventsRequest { kinds: vec![EventKind::ShipmentCreated as i32], ..Default::default() };
    let shipments = client.list_events(kinds).await.unwrap().into_inner().events;
    assert_eq!(shipments.iter().map(|e| e.sequence).collect::<Vec<_>>(), [7]);
    let order = get(&server, Reference::ExternalOrderId("WBTEST22".into())).await.unwrap();
    let history = ListEventsRequest { order_id: order.id, page_size: 2, ..Default::default() };
    let page = client.list_events(history).await.unwrap().into_inner();
    assert_eq!(page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(), [5, 6]);
    let rest = ListEventsRequest { order_id: order.id, page_token: page.next_page_token, ..Default::default() };
    let rest = client.list_events(rest).await.unwrap().into_inner();
    assert_eq!(rest.events.iter().map(|e| e.sequence).collect::<Vec<_>>(), [7]);
    assert!(rest.next_page_token.is_empty());
    let other_source = ListEventsRequest { sources: vec!["withings".into()], ..Default::default() };
    assert!(client.list_events(other_source).await.unwrap().into_inner().events.is_empty());
}

#[tokio::test]
async fn large_and_non_utf8_deliveries_are_kept_byte_for_byte_across_restart() {
    let server = TestServer::start().await;
    // Close to the 1 MiB limit: stored by sled as a separate blob file.
    let mut large =
        Vec::from(&b"{\"EventType\":\"OrderUpdate\",\"OrderId\":\"big\",\"NewStatus\":\"Open\",\"Description\":\""[..]);
    large.extend((0..1_000_000).map(|i| b'a' + (i % 26) as u8));
    large.extend_from_slice(b"\"}");
    let not_utf8: Vec<u8> = vec![0xff, 0xfe, b'{', 0x80, 0x00, b'}'];
    assert_eq!(server.post_json(URL, large.clone()).await.status, 200);
    assert_eq!(server.post("/webhooks/ordermesh", "application/json", not_utf8.clone()).await.status, 202);
    let server = server.restart().await;
    let quarantined = server.quarantine().await;
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].body, not_utf8);
    let event = &server.all_events().await[0];
    let raw_id = event.provenance.as_ref().unwrap().raw_id;
    assert_eq!(raw_id, 1);
    assert_eq!(server.delivery(raw_id).await.unwrap().body_sha256, ordertrail::ingest::sha256_hex(&large));
    let order = get(&server, Reference::ProviderOrderId("big".into())).await.unwrap();
    assert_eq!(order.description.len(), 1_000_000);
    server.stop().await;
}
