//! Withings and Winkelstraat end to end against the real server: full
//! lifecycles found by the merchant's reference, out-of-order arrival, and
//! late updates that must not move anything back.

use crate::common::{TestServer, fixture};
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::{EventKind, GetOrderRequest, ListEventsRequest, Order, OrderStatus, Provider, ShipmentStatus};

const FORM: &str = "application/x-www-form-urlencoded";

async fn get(server: &TestServer, reference: Reference) -> Order {
    let request = GetOrderRequest { reference: Some(reference.clone()), source: String::new() };
    match server.grpc().await.get_order(request).await {
        Ok(order) => order.into_inner(),
        Err(e) => panic!("GetOrder {reference:?}: {e}"),
    }
}

async fn history(server: &TestServer, order_id: u64) -> Vec<ordertrail::proto::Event> {
    let request = ListEventsRequest { order_id, ..Default::default() };
    server.grpc().await.list_events(request).await.unwrap().into_inner().events
}

async fn post_form(server: &TestServer, body: &str) {
    let answer = server.post("/webhooks/withings", FORM, body.to_string()).await;
    assert_eq!(answer.status, 200, "{body}: {}", answer.json);
}

#[tokio::test]
async fn withings_lifecycle_found_by_customer_ref() {
    let server = TestServer::start().await;
    let customer_ref = || Reference::CustomerRef("MREF-1001".into());
    post_form(&server, "customer_id=123456&customer_ref=MREF-1001&status=CREATED").await;
    assert_eq!(get(&server, customer_ref()).await.status(), OrderStatus::Pending);
    post_form(&server, "customer_id=123456&customer_ref=MREF-1001&status=VERIFIED").await;
    assert_eq!(get(&server, customer_ref()).await.status(), OrderStatus::Accepted);
    // The JSON variant of the same notification stream.
    let processing =
        r#"{"customer_id":"123456","customer_ref":"MREF-1001","order_id":"D12345678","status":"PROCESSING"}"#;
    assert_eq!(server.post_json("/webhooks/withings", processing).await.status, 200);
    assert_eq!(get(&server, customer_ref()).await.status(), OrderStatus::Processing);
    // Shipped, with tracking, as multipart.
    let shipped = fixture("withings/documented-example-multipart.multipart");
    let answer = server.post("/webhooks/withings", "multipart/form-data; boundary=XyZ", shipped).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let order = get(&server, customer_ref()).await;
    assert_eq!(order.status(), OrderStatus::Shipped);
    assert_eq!(order.customer_id, "123456");
    assert_eq!(order.references.as_ref().unwrap().provider_order_id, "D12345678");
    let parcel = &order.shipments[0];
    assert_eq!(
        (parcel.carrier.as_str(), parcel.carrier_service.as_str(), parcel.tracking_number.as_str()),
        ("UPS Parcel", "Next Day Air", "1ZY1111111")
    );
    assert_eq!(parcel.status(), ShipmentStatus::InTransit);
    assert_eq!(parcel.provider_status, "in_transit");
    // Delivered: the notification only names the parcel status.
    post_form(&server, "customer_ref=MREF-1001&parcel_status=delivered").await;
    let order = get(&server, Reference::TrackingNumber("1ZY1111111".into())).await;
    assert_eq!(order.status(), OrderStatus::Delivered);
    assert_eq!(order.shipments[0].status(), ShipmentStatus::Delivered);
    assert_eq!(order.shipments[0].tracking_number, "1ZY1111111", "a missing field never clears data");
    assert_eq!(get(&server, Reference::ProviderOrderId("D12345678".into())).await.id, order.id);
    let kinds: Vec<EventKind> = history(&server, order.id).await.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            EventKind::OrderCreated,
            EventKind::OrderStatusChanged,
            EventKind::OrderStatusChanged,
            EventKind::ShipmentUpdated,
            EventKind::ShipmentUpdated
        ]
    );
    // A retried notification is a duplicate, whatever its encoding.
    let again =
        server.post_json("/webhooks/withings", r#"{"customer_ref":"MREF-1001","parcel_status":"delivered"}"#).await;
    assert_eq!(again.json["outcome"], "duplicate");
}

#[tokio::test]
async fn withings_late_in_transit_after_delivered_is_not_applied() {
    let server = TestServer::start().await;
    post_form(&server, "customer_ref=MREF-7&parcel_status=delivered&tracking_number=1Z7").await;
    post_form(&server, "customer_ref=MREF-7&parcel_status=in_transit&tracking_number=1Z7&carrier=UPS").await;
    let order = get(&server, Reference::CustomerRef("MREF-7".into())).await;
    assert_eq!(order.shipments[0].status(), ShipmentStatus::Delivered);
    assert_eq!(order.shipments[0].carrier, "UPS", "a stale event may still fill in what was missing");
    let events = history(&server, order.id).await;
    assert!(!events[1].applied && events[1].note.starts_with("stale"), "{:?}", events[1]);
}

#[tokio::test]
async fn withings_replacement_links_to_the_original_order() {
    let server = TestServer::start().await;
    post_form(&server, "customer_ref=MREF-1001&status=SHIPPED").await;
    post_form(&server, fixture_text("withings/replacement.form").as_str()).await;
    let original = get(&server, Reference::CustomerRef("MREF-1001".into())).await;
    let replacement = get(&server, Reference::CustomerRef("MREF-2001".into())).await;
    assert!(replacement.is_replacement);
    assert_eq!(replacement.original_merchant_reference, "MREF-1001");
    assert_eq!(replacement.original_serial_number, "00:24:e4:12:34:56");
    assert_eq!(replacement.original_order_id, original.id);
}

fn fixture_text(path: &str) -> String {
    String::from_utf8(fixture(path)).unwrap()
}

async fn post_winkelstraat(server: &TestServer, kind: &str, body: impl Into<bytes::Bytes>) -> serde_json::Value {
    let answer = server.post_json(&format!("/webhooks/winkelstraat/{kind}"), body).await;
    assert_eq!(answer.status, 200, "{kind}: {}", answer.json);
    answer.json
}

#[tokio::test]
async fn winkelstraat_lifecycle_found_by_po_number() {
    let server = TestServer::start().await;
    let po = || Reference::PoNumber("YOUR_ORDER_REFERENCE".into());
    let order = fixture_text("winkelstraat/order.json").replace("\"complete\"", "\"processing\"");
    post_winkelstraat(&server, "order", order).await;
    let stored = get(&server, po()).await;
    assert_eq!(stored.status(), OrderStatus::Processing);
    assert_eq!(stored.references.as_ref().unwrap().provider_order_id, "000000549");
    assert_eq!(stored.grand_total.as_ref().unwrap().amount, "545.95", "no float rounding");
    assert_eq!(stored.shipping.as_ref().unwrap().amount, "5.95");
    assert_eq!(stored.items[0].quantity, "2");
    assert_eq!(stored.shipping_address.as_ref().unwrap().house_number, "12");

    post_winkelstraat(&server, "shipment", fixture("winkelstraat/shipment.json")).await;
    let stored = get(&server, po()).await;
    assert_eq!(stored.status(), OrderStatus::Shipped);
    assert_eq!(stored.shipments[0].status(), ShipmentStatus::InTransit);
    assert_eq!(stored.shipments[0].tracking_number, "1Z7E3V556825150AAP");

    post_winkelstraat(&server, "shipment", fixture("winkelstraat/shipment-delivered.json")).await;
    let stored = get(&server, Reference::TrackingNumber("1Z7E3V556825150AAP".into())).await;
    assert_eq!(stored.status(), OrderStatus::Delivered);
    assert_eq!(stored.shipments.len(), 1, "the same shipment, posted again as it moved");
    assert_eq!(stored.shipments[0].delivered_at.unwrap().seconds, 1_708_768_800);

    post_winkelstraat(&server, "rma", fixture("winkelstraat/rma.json")).await;
    let memo = fixture_text("winkelstraat/creditmemo.json").replace("000000568", "000000549");
    post_winkelstraat(&server, "creditmemo", memo).await;
    post_winkelstraat(&server, "invoice", fixture("winkelstraat/invoice.json")).await;
    let stored = get(&server, po()).await;
    assert_eq!(stored.returns.len(), 1);
    assert_eq!(stored.returns[0].provider_status, "authorized");
    assert_eq!(stored.returns[0].items[0].quantity_requested, "1");
    assert_eq!(stored.refunds.len(), 1);
    assert_eq!(stored.refunds[0].grand_total.as_ref().unwrap().amount, "267.05");
    assert_eq!(stored.status(), OrderStatus::Delivered, "returns and refunds do not change the status");
    let kinds: Vec<EventKind> = history(&server, stored.id).await.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            EventKind::OrderStatusChanged,
            EventKind::ShipmentUpdated,
            EventKind::ShipmentUpdated,
            EventKind::ReturnUpdated,
            EventKind::RefundIssued,
            EventKind::InvoiceIssued
        ]
    );
    let invoice = history(&server, stored.id).await.pop().unwrap().invoice.unwrap();
    assert_eq!(invoice.grand_total.unwrap().amount, "545.95");
    assert_eq!(get(&server, Reference::ProviderOrderId("000000549".into())).await.id, stored.id);
}

#[tokio::test]
async fn winkelstraat_shipment_before_its_order_creates_it_and_the_order_fills_it_in() {
    let server = TestServer::start().await;
    post_winkelstraat(&server, "shipment", fixture("winkelstraat/shipment.json")).await;
    let early = get(&server, Reference::PoNumber("YOUR_ORDER_REFERENCE".into())).await;
    assert_eq!(early.status(), OrderStatus::Shipped);
    assert!(early.items.is_empty());
    let order = fixture_text("winkelstraat/order.json").replace("\"complete\"", "\"processing\"");
    post_winkelstraat(&server, "order", order).await;
    let filled = get(&server, Reference::ProviderOrderId("000000549".into())).await;
    assert_eq!(filled.id, early.id, "one order");
    assert_eq!(filled.status(), OrderStatus::Shipped, "processing arrives late: no regression");
    assert_eq!(filled.items.len(), 1, "but the order's data fills it in");
    assert_eq!(filled.billing_address.as_ref().unwrap().city, "Zonnewijk");
}

#[tokio::test]
async fn winkelstraat_late_in_transit_after_delivered_is_not_applied() {
    let server = TestServer::start().await;
    post_winkelstraat(&server, "shipment", fixture("winkelstraat/shipment-delivered.json")).await;
    post_winkelstraat(&server, "shipment", fixture("winkelstraat/shipment.json")).await;
    let order = get(&server, Reference::PoNumber("YOUR_ORDER_REFERENCE".into())).await;
    assert_eq!(order.shipments[0].status(), ShipmentStatus::Delivered);
    assert_eq!(order.status(), OrderStatus::Delivered);
    let events = history(&server, order.id).await;
    assert_eq!(events.len(), 2);
    assert!(!events[1].applied, "late IN_TRANSIT must be stale");
    assert!(events[1].note.contains("older than the shipment's last provider update"), "{}", events[1].note);
}

#[tokio::test]
async fn winkelstraat_older_order_update_is_stale() {
    let server = TestServer::start().await;
    let newer = fixture_text("winkelstraat/order.json");
    let older = newer.replace("\"complete\"", "\"canceled\"").replace("11:03:21", "10:59:00");
    post_winkelstraat(&server, "order", newer).await;
    post_winkelstraat(&server, "order", older).await;
    let order = get(&server, Reference::PoNumber("YOUR_ORDER_REFERENCE".into())).await;
    assert_eq!(order.status(), OrderStatus::Completed, "an older updated_at is stale, even if it cancels");
    assert!(!history(&server, order.id).await[1].applied);
}

#[tokio::test]
async fn winkelstraat_unknown_kind_and_version_are_kept() {
    let server = TestServer::start().await;
    let answer = server.post_json("/webhooks/winkelstraat/stock", r#"{"sku":"x","qty":3}"#).await;
    assert_eq!(answer.status, 202);
    assert_eq!(answer.json["reason"], "unknown Winkelstraat kind `stock`");
    let headers = [("content-type", "application/json"), ("x-version", "V9")];
    let body = bytes::Bytes::from(fixture("winkelstraat/invoice.json"));
    let answer = server.request("POST", "/webhooks/winkelstraat/invoice", &headers, body).await;
    assert_eq!(answer.status, 200, "an unknown x-version still ingests");
    let quarantined = server.quarantine().await;
    assert_eq!(quarantined[0].kind, "stock");
    let event = &server.all_events().await[0];
    assert_eq!(event.kind(), EventKind::InvoiceIssued);
    let raw = server.delivery(event.provenance.as_ref().unwrap().raw_id).await.unwrap();
    assert_eq!(raw.headers["x-version"], "V9", "x-version is recorded");
    assert_eq!(raw.body, fixture("winkelstraat/invoice.json"));
    assert_eq!(raw.kind, "invoice");
    server.stop().await;
}

#[tokio::test]
async fn unknown_status_values_are_kept_verbatim_and_counted() {
    let server = TestServer::start().await;
    let body = r#"{"customer_ref":"MREF-1001","status":"TELEPORTED","parcel_status":"on_the_moon"}"#;
    assert_eq!(server.post_json("/webhooks/withings", body).await.status, 200);
    let again = body.replace("MREF-1001", "MREF-1002");
    assert_eq!(server.post_json("/webhooks/withings", again).await.status, 200);
    post_form(&server, "customer_ref=MREF-1003&status=OPEN").await;
    let order = get(&server, Reference::CustomerRef("MREF-1001".into())).await;
    assert_eq!(order.status(), OrderStatus::Unspecified, "canonical state unchanged");
    assert_eq!(order.provider_status, "TELEPORTED");
    assert_eq!(order.shipments[0].provider_status, "on_the_moon");
    let request = ordertrail::proto::ListUnmappedStatusesRequest {};
    let mut statuses = server.admin().await.list_unmapped_statuses(request).await.unwrap().into_inner().statuses;
    statuses.sort_by(|a, b| a.applies_to.cmp(&b.applies_to));
    let rows: Vec<(Provider, &str, &str, u64)> =
        statuses.iter().map(|s| (s.provider(), s.applies_to.as_str(), s.value.as_str(), s.count)).collect();
    assert_eq!(
        rows,
        [(Provider::Withings, "order", "TELEPORTED", 2), (Provider::Withings, "shipment", "on_the_moon", 2)]
    );
}

#[tokio::test]
async fn the_event_log_filters_by_provider() {
    let server = TestServer::start().await;
    post_form(&server, "customer_ref=MREF-7&status=OPEN").await;
    let ordermesh = r#"{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-7","ExternalOrderId":"E-7"}"#;
    assert_eq!(server.post_json("/webhooks/ordermesh", ordermesh).await.status, 200);
    for provider in [Provider::Withings, Provider::Ordermesh] {
        let request = ListEventsRequest { providers: vec![provider as i32], ..Default::default() };
        let events = server.grpc().await.list_events(request).await.unwrap().into_inner().events;
        let providers: Vec<Provider> = events.iter().map(|e| e.provider()).collect();
        assert_eq!(providers, [provider], "only {provider:?}'s events");
    }
}
