//! The webhook front door's unhappy paths and the gRPC query errors, against
//! the real server.

use crate::common::{TestServer, fixture};
use bytes::Bytes;
use ordertrail::proto::get_order_request::Reference;
use ordertrail::proto::{GetOrderRequest, ListOrdersRequest, OrderStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Sends raw bytes on a new connection and returns the status line.
async fn raw_status_line(server: &TestServer, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    while !buf[..read].windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf[read..]).await.unwrap();
        assert!(n > 0, "connection closed without an answer");
        read += n;
    }
    String::from_utf8_lossy(&buf[..read]).lines().next().unwrap().to_string()
}

#[tokio::test]
async fn unknown_source_and_path_are_404() {
    let server = TestServer::start().await;
    for path in ["/webhooks/nobody", "/webhooks/ordermesh/order", "/webhooks", "/elsewhere", "/webhooks/ordermesh/a/b"]
    {
        let answer = server.post_json(path, fixture("ordermesh/order-creation.json")).await;
        assert_eq!(answer.status, 404, "{path}");
    }
    assert!(server.all_events().await.is_empty());
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let server = TestServer::start().await;
    let answer = server.request("GET", "/webhooks/ordermesh", &[], Bytes::new()).await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.headers["allow"], "POST");
    let answer = server.request("POST", "/healthz", &[], Bytes::from_static(b"x")).await;
    assert_eq!(answer.status, 405);
}

#[tokio::test]
async fn oversized_body_is_413_before_it_is_read() {
    let server = TestServer::start_with("[http]\nbody_limit_bytes = 1024\n").await;
    // Only the headers are sent: the answer must not wait for the body.
    let line = raw_status_line(
        &server,
        b"POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n",
    )
    .await;
    assert!(line.contains("413"), "{line}");
    // Chunked, without a length: cut off at the limit.
    let big = vec![b' '; 4096];
    let answer = server.post_json("/webhooks/ordermesh", big).await;
    assert_eq!(answer.status, 413);
    assert!(server.quarantine().await.is_empty());
    // At the limit is fine.
    let mut fits = fixture("ordermesh/order-creation.json");
    fits.resize(1024, b' ');
    assert_eq!(server.post_json("/webhooks/ordermesh", fits).await.status, 200);
}

#[tokio::test]
async fn empty_body_is_400_and_stores_nothing() {
    let server = TestServer::start().await;
    let answer = server.post_json("/webhooks/ordermesh", Bytes::new()).await;
    assert_eq!(answer.status, 400);
    assert!(answer.json["error"].as_str().unwrap().contains("empty body"));
    assert!(server.quarantine().await.is_empty());
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let server = TestServer::start().await;
    let answers = [
        server.post_json("/webhooks/ordermesh", fixture("ordermesh/order-creation.json")).await,
        server.post_json("/webhooks/ordermesh", "broken").await,
        server.post_json("/webhooks/nobody", "x").await,
        server.request("GET", "/healthz", &[], Bytes::new()).await,
    ];
    let mut ids = std::collections::HashSet::new();
    for answer in &answers {
        let id = answer.headers["x-request-id"].to_str().unwrap().to_string();
        if answer.status != 200 || answer.json.get("request_id").is_some() {
            assert_eq!(answer.json["request_id"], id.as_str());
        }
        assert!(ids.insert(id), "request ids are unique");
    }
    // The id is also in the stored record, which the event's provenance names.
    let stored = &server.quarantine().await[0];
    assert_eq!(stored.request_id, answers[1].headers["x-request-id"].to_str().unwrap());
    let event = &server.all_events().await[0];
    let raw = server.delivery(event.provenance.as_ref().unwrap().raw_id).await.unwrap();
    assert_eq!(raw.request_id, answers[0].headers["x-request-id"].to_str().unwrap());
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::start().await;
    assert_eq!(server.request("GET", "/healthz", &[], Bytes::new()).await.status, 200);
    let ready = server.request("GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!((ready.status.as_u16(), ready.json["status"].as_str()), (200, Some("ready")));
}

#[tokio::test]
async fn header_secret_source_refuses_bad_credentials_and_stores_nothing() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"om\"\nprovider = \"ordermesh\"\nauth = { scheme = \"header\", header = \"x-webhook-secret\", secrets = [\"correct-horse\"] }\n",
    )
    .await;
    let body = Bytes::from(fixture("ordermesh/order-creation.json"));
    for secret in [None, Some(""), Some("correct-hors"), Some("correct-horsee"), Some("wrong")] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(secret) = secret {
            headers.push(("x-webhook-secret", secret));
        }
        let answer = server.request("POST", "/webhooks/om", &headers, body.clone()).await;
        assert_eq!(answer.status, 401, "{secret:?}");
    }
    assert!(server.all_events().await.is_empty());
    assert!(server.quarantine().await.is_empty());
    let headers = [("content-type", "application/json"), ("x-webhook-secret", "correct-horse")];
    let answer = server.request("POST", "/webhooks/om", &headers, body).await;
    assert_eq!(answer.status, 200);
    let event = &server.all_events().await[0];
    let raw_id = event.provenance.as_ref().unwrap().raw_id;
    assert_eq!(server.delivery(raw_id).await.unwrap().auth_method, "header");
    // The secret is never stored with the raw request.
    server.post("/webhooks/om", "text/plain", "x").await;
    let garbage = server.request("POST", "/webhooks/om", &headers, Bytes::from_static(b"garbage")).await;
    assert_eq!(garbage.status, 202);
    let stored = &server.quarantine().await[0];
    assert!(!stored.headers.contains_key("x-webhook-secret"), "{:?}", stored.headers);
}

#[tokio::test]
async fn get_order_errors() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let none = client.get_order(GetOrderRequest::default()).await.unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument);
    let empty = GetOrderRequest { reference: Some(Reference::ExternalOrderId(String::new())), source: String::new() };
    assert_eq!(client.get_order(empty).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = GetOrderRequest { reference: Some(Reference::ExternalOrderId("nope".into())), source: String::new() };
    assert_eq!(client.get_order(unknown).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn the_same_reference_in_two_sources_is_two_orders() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"shop-a\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"shop-b\"\nprovider = \"ordermesh\"\n",
    )
    .await;
    for source in ["shop-a", "shop-b"] {
        let answer = server.post_json(&format!("/webhooks/{source}"), fixture("ordermesh/order-creation.json")).await;
        assert_eq!(answer.json["outcome"], "applied", "dedup is per source");
    }
    let mut client = server.grpc().await;
    let reference = Some(Reference::ExternalOrderId("WBTEST22".into()));
    let both = client.get_order(GetOrderRequest { reference: reference.clone(), source: String::new() }).await;
    let status = both.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("shop-a") && status.message().contains("shop-b"), "{}", status.message());
    let one = client.get_order(GetOrderRequest { reference, source: "shop-b".into() }).await.unwrap().into_inner();
    assert_eq!(one.source, "shop-b");
}

#[tokio::test]
async fn list_orders_pages_and_filters() {
    let server = TestServer::start().await;
    let template = String::from_utf8(fixture("ordermesh/order-creation.json")).unwrap();
    for i in 0..5 {
        let body = template.replace("WBTEST22", &format!("EXT-{i}")).replace("7d20", &format!("7e{i:02}"));
        assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    let mut client = server.grpc().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orders(ListOrdersRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.orders.len() <= 2);
        seen.extend(page.orders.into_iter().map(|o| o.references.unwrap().merchant_reference));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["EXT-0", "EXT-1", "EXT-2", "EXT-3", "EXT-4"]);
    let filtered = ListOrdersRequest { status: OrderStatus::Cancelled as i32, ..Default::default() };
    assert!(client.list_orders(filtered).await.unwrap().into_inner().orders.is_empty());
    let bad_token = ListOrdersRequest { page_token: "garbage".into(), ..Default::default() };
    assert_eq!(client.list_orders(bad_token).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let server = TestServer::start_with("[http]\nheader_read_timeout_ms = 200\n").await;
    let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
    stream.write_all(b"POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // Generous bound so the test cannot hang; the server closes after 200 ms.
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut total = 0;
        loop {
            match stream.read(&mut buf[total..]).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the server must close a connection whose headers never complete");
    let answer = String::from_utf8_lossy(&buf[..read]);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Other clients are served meanwhile and afterwards.
    assert_eq!(server.request("GET", "/healthz", &[], Bytes::new()).await.status, 200);
}
