//! Operability against the real server: gRPC server reflection (what
//! grpcurl uses) and the standard health service following store health and
//! shutdown.

use std::time::Duration;

use crate::common::{TestServer, sample};
use ordertrail::store::FaultPoint;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr)).unwrap().connect().await.unwrap()
}

/// One reflection request and its answer.
async fn reflect(server: &TestServer, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel(server).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut stream = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap().message_response.unwrap()
}

#[tokio::test]
async fn reflection_lists_and_describes_the_services() {
    let server = TestServer::start().await;
    let MessageResponse::ListServicesResponse(list) =
        reflect(&server, MessageRequest::ListServices(String::new())).await
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in ["grpc.health.v1.Health", "ordertrail.v1.Admin", "ordertrail.v1.OrderTrail"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let symbol = MessageRequest::FileContainingSymbol("ordertrail.v1.OrderTrail".into());
    let MessageResponse::FileDescriptorResponse(files) = reflect(&server, symbol).await else {
        panic!("expected file descriptors");
    };
    use prost::Message;
    let described: Vec<prost_types::FileDescriptorProto> =
        files.file_descriptor_proto.iter().map(|b| prost_types::FileDescriptorProto::decode(&b[..]).unwrap()).collect();
    let service = described.iter().flat_map(|f| &f.service).find(|s| s.name() == "OrderTrail").expect("OrderTrail");
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["GetOrder", "FindOrders", "ListOrders", "ListEvents", "Subscribe"]);
}

async fn health(server: &TestServer) -> ServingStatus {
    let mut client = HealthClient::new(channel(server).await);
    let response = client.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

async fn health_becomes(server: &TestServer, expected: ServingStatus) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while health(server).await != expected {
        assert!(tokio::time::Instant::now() < deadline, "health never became {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn health_follows_storage_failures_and_shutdown() {
    let server = TestServer::start().await;
    health_becomes(&server, ServingStatus::Serving).await;
    server.store.inject_fault(Some(FaultPoint::Write));
    let answer = server.post_json("/webhooks/ordermesh", r#"{"EventType":"OrderCreation","OrderId":"o"}"#).await;
    assert_eq!(answer.status, 503);
    health_becomes(&server, ServingStatus::NotServing).await;
    server.store.inject_fault(None);
    health_becomes(&server, ServingStatus::Serving).await;

    let mut client = HealthClient::new(channel(&server).await);
    let mut watch =
        client.watch(HealthCheckRequest { service: "ordertrail.v1.OrderTrail".into() }).await.unwrap().into_inner();
    assert_eq!(watch.next().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.stop());
    let mut seen = Vec::new();
    while let Ok(Some(Ok(update))) = tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
        seen.push(update.status);
    }
    assert_eq!(seen.last(), Some(&(ServingStatus::NotServing as i32)), "{seen:?}");
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("a health watcher held shutdown open")
        .unwrap();
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let server = TestServer::start_with(
        "[http]\nbody_limit_bytes = 2048\n[[sources]]\nname = \"om\"\nprovider = \"ordermesh\"\n\
         [[sources]]\nname = \"k\"\nprovider = \"winkelstraat\"\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"key\"] }\n",
    )
    .await;
    let creation = crate::common::fixture("ordermesh/order-creation.json");
    for (body, status) in [
        (creation.clone(), 200),
        (crate::common::fixture("ordermesh/order-update.json"), 200),
        (creation, 200),
        (b"garbage".to_vec(), 202),
        (vec![b' '; 4096], 413),
    ] {
        assert_eq!(server.post_json("/webhooks/om", body).await.status, status);
    }
    assert_eq!(server.post_json("/webhooks/k/order", "{}").await.status, 401);
    assert_eq!(server.post_json("/webhooks/k/order", "{}").await.status, 401);
    let _stream = server.grpc().await.subscribe(ordertrail::proto::SubscribeRequest::default()).await.unwrap();

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let response = client.get(format!("http://{}/metrics", server.admin_addr).parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    use http_body_util::BodyExt;
    let page = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let expect = [
        (r#"ordertrail_webhooks_total{source="om",outcome="applied"}"#, 2.0),
        (r#"ordertrail_webhooks_total{source="om",outcome="duplicate"}"#, 1.0),
        (r#"ordertrail_webhooks_total{source="om",outcome="quarantined"}"#, 1.0),
        (r#"ordertrail_webhooks_total{source="om",outcome="too_large"}"#, 1.0),
        (r#"ordertrail_webhooks_total{source="k",outcome="rejected_auth"}"#, 2.0),
        (r#"ordertrail_events_total{kind="order_created"}"#, 1.0),
        (r#"ordertrail_events_total{kind="order_status_changed"}"#, 1.0),
        ("ordertrail_ingest_latency_seconds_count", 4.0),
        ("ordertrail_quarantine_depth", 1.0),
        ("ordertrail_orders", 1.0),
        ("ordertrail_head_sequence", 2.0),
        ("ordertrail_subscriptions_active", 1.0),
    ];
    for (name, value) in expect {
        assert_eq!(sample(&page, name), Some(value), "{name} in:\n{page}");
    }
    assert!(sample(&page, "ordertrail_group_commit_size_count").is_some_and(|n| n >= 1.0), "{page}");
    assert!(sample(&page, "ordertrail_flush_seconds_count").is_some_and(|n| n >= 1.0), "{page}");
    // The test client keeps its connection open; no body is being read.
    assert!(sample(&page, "ordertrail_http_connections").is_some_and(|n| n >= 1.0), "{page}");
    assert_eq!(sample(&page, "ordertrail_http_body_memory_bytes"), Some(0.0), "{page}");
    assert_eq!(sample(&page, "ordertrail_http_unverified_bodies"), Some(0.0), "{page}");
    assert!(sample(&page, "ordertrail_store_size_bytes").is_some_and(|n| n > 0.0), "{page}");
    assert!(page.contains("ordertrail_subscriber_lag_events{subscriber="), "{page}");
}

#[tokio::test]
async fn redrive_applies_what_the_mappers_learned_once() {
    use ordertrail::proto::{DeliveryOutcome, GetOrderRequest, RedriveRequest, get_order_request::Reference};
    let server = TestServer::start().await;
    let order = crate::common::fixture("winkelstraat/order.json");
    // Winkelstraat starts posting orders to a URL name nobody configured.
    let answer = server.post_json("/webhooks/winkelstraat/stock-order", order.clone()).await;
    assert_eq!(answer.status, 202);
    assert_eq!(answer.json["reason"], "unknown Winkelstraat kind `stock-order`");
    let garbage = server.post_json("/webhooks/winkelstraat/order", "not json").await;
    assert_eq!(garbage.status, 202);
    let dir = server.stop().await;
    // The operator teaches the mapper: stock-order carries an order.
    let config = "[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\nkind_aliases = { stock-order = \"order\" }\n";
    let server = TestServer::start_in(dir, config).await;
    let mut admin = server.admin().await;
    let all = |dry_run| RedriveRequest { raw_id: 0, received_after: None, dry_run };
    let dry = admin.redrive(all(true)).await.unwrap().into_inner();
    assert_eq!((dry.applied, dry.still_quarantined), (1, 1), "{dry:?}");
    assert!(server.all_events().await.is_empty(), "a dry run changes nothing");
    assert_eq!(server.quarantine().await.len(), 2);

    let done = admin.redrive(all(false)).await.unwrap().into_inner();
    assert_eq!((done.applied, done.still_quarantined), (1, 1), "{done:?}");
    assert_eq!(done.results[0].sequences, [1]);
    let outcomes: Vec<_> = done.results.iter().map(|r| (r.raw_id, r.outcome(), r.duplicate_of)).collect();
    assert_eq!(outcomes, [(1, DeliveryOutcome::Applied, 0), (2, DeliveryOutcome::Quarantined, 0)]);
    assert!(!done.results[1].reason.is_empty(), "a result still quarantined says why: {done:?}");
    let request =
        GetOrderRequest { reference: Some(Reference::PoNumber("YOUR_ORDER_REFERENCE".into())), source: String::new() };
    let stored = server.grpc().await.get_order(request).await.unwrap().into_inner();
    assert_eq!(stored.items.len(), 1);
    let quarantine = server.quarantine().await;
    assert_eq!(quarantine.len(), 1, "the garbage stays");
    assert_eq!(&quarantine[0].body[..], b"not json");
    let event = &server.all_events().await[0];
    assert_eq!(event.provenance.as_ref().unwrap().raw_id, 1, "the event points at the original delivery");
    assert_eq!(event.provenance.as_ref().unwrap().mapper_version, ordertrail::ingest::MAPPER_VERSION);

    let again = admin.redrive(all(false)).await.unwrap().into_inner();
    assert_eq!((again.applied, again.still_quarantined), (0, 1), "a second re-drive is a no-op");
    assert_eq!(server.all_events().await.len(), 1);
    // The original bytes resent are now a duplicate of an applied delivery.
    let resent = server.post_json("/webhooks/winkelstraat/stock-order", order).await;
    assert_eq!((resent.status.as_u16(), resent.json["outcome"].as_str()), (200, Some("duplicate")));
}
