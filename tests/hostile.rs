//! Hostile and broken HTTP clients against the real server: slow bodies,
//! slowloris, connection floods, pipelining, deeply nested and huge JSON.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound so that a broken protection fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut all)).await.expect("the server never closed").ok();
    String::from_utf8_lossy(&all).into_owned()
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_stores_nothing() {
    let server = TestServer::start_with("[http]\nbody_read_timeout_ms = 200\n").await;
    let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
    let head =
        "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"{\"EventType\":").await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(server.delivery(1).await.is_none(), "a partial body was stored");
    assert_eq!(server.request("GET", "/healthz", &[], Bytes::new()).await.status, 200);
}

#[tokio::test]
async fn slowloris_connections_are_closed_and_legitimate_traffic_still_served() {
    let server = TestServer::start_with("[http]\nmax_connections = 4\nheader_read_timeout_ms = 300\n").await;
    // Fill every connection slot with clients that never finish their headers.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
        stream.write_all(b"POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\nx-slow: ").await.unwrap();
        slow.push(stream);
    }
    // A legitimate request waits for a slot, which the header timeout frees.
    let body = common::fixture("ordermesh/order-creation.json");
    let answer = tokio::time::timeout(PATIENCE, server.post_json("/webhooks/ordermesh", body)).await.expect("starved");
    assert_eq!(answer.status, 200);
    for mut stream in slow {
        let answer = read_to_close(&mut stream).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start().await;
    let body = String::from_utf8(common::fixture("ordermesh/order-creation.json")).unwrap();
    let second = body.replace("WBTEST22", "WBTEST99").replace("7d20", "7d99");
    let mut pipeline = String::new();
    for body in [&body, &second] {
        pipeline.push_str(&format!(
            "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    pipeline.push_str("GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
    stream.write_all(pipeline.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    let statuses: Vec<&str> = answer.match_indices("HTTP/1.1 ").map(|(i, _)| &answer[i..i + 12]).collect();
    assert_eq!(statuses, ["HTTP/1.1 200"; 3], "{answer}");
    let first = answer.find(r#""sequences":[1]"#).expect("first answer");
    let second = answer.find(r#""sequences":[2]"#).expect("second answer");
    let health = answer.find(r#""status":"ok""#).expect("health answer");
    assert!(first < second && second < health, "answers out of order: {answer}");
}

#[tokio::test]
async fn json_nested_past_the_depth_limit_is_quarantined() {
    let server = TestServer::start().await;
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let answer = server.post_json("/webhooks/ordermesh", deep.clone()).await;
    assert_eq!(answer.status, 202, "{}", answer.json);
    assert!(answer.json["reason"].as_str().unwrap().contains("recursion limit"), "{}", answer.json);
    for path in ["/webhooks/winkelstraat/order", "/webhooks/withings"] {
        assert_eq!(server.post_json(path, deep.clone()).await.status, 202, "{path}");
    }
    assert_eq!(server.quarantine().await[0].body.len(), deep.len(), "kept byte for byte");
}

#[tokio::test]
async fn a_huge_array_within_the_size_limit_is_handled() {
    let server = TestServer::start().await;
    let item = r#"{"sku":"s","qty_ordered":1,"row_total_inc_tax":1.5,"item_price_inc_tax":1.5}"#;
    let items = vec![item; 12_000].join(",");
    let body = format!(
        r#"{{"increment_id":"000000777","po_number":"PO-777","status":"processing","currency":"EUR","items":[{items}]}}"#
    );
    assert!(body.len() < 1024 * 1024);
    let answer = server.post_json("/webhooks/winkelstraat/order", body).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    let request = ordertrail::proto::GetOrderRequest {
        reference: Some(ordertrail::proto::get_order_request::Reference::PoNumber("PO-777".into())),
        source: String::new(),
    };
    let order = server.grpc().await.max_decoding_message_size(16 << 20).get_order(request).await.unwrap().into_inner();
    assert_eq!(order.items.len(), 12_000);
    assert_eq!(order.items[11_999].row_total.as_ref().unwrap().amount, "1.5");
}

#[tokio::test]
async fn a_noisy_source_is_limited_without_starving_the_others() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"noisy\"\nprovider = \"ordermesh\"\nrate_limit = { per_second = 1, burst = 3 }\n\
         [[sources]]\nname = \"quiet\"\nprovider = \"ordermesh\"\n",
    )
    .await;
    let body = |i: usize| format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}"}}"#);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let answer = server.post_json("/webhooks/noisy", body(i)).await;
        if answer.status == 429 {
            let retry: u64 = answer.headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry >= 1);
            assert!(answer.json["error"].as_str().unwrap().contains("rate limit"));
        }
        statuses.push(answer.status.as_u16());
    }
    // The burst passes; then the bucket refills at one per second, so at
    // most one more of the quick follow-ups can pass.
    assert_eq!(&statuses[..3], [200, 200, 200]);
    assert!(statuses[3..].iter().filter(|s| **s == 429).count() >= 2, "{statuses:?}");
    let accepted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(server.all_events().await.len(), accepted, "a 429 stores nothing");
    for i in 10..20 {
        assert_eq!(server.post_json("/webhooks/quiet", body(i)).await.status, 200, "another source is unaffected");
    }
    // Unauthenticated requests do not spend a source's budget.
    let limited = TestServer::start_with(
        "[[sources]]\nname = \"k\"\nprovider = \"winkelstraat\"\nrate_limit = { per_second = 1, burst = 1 }\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"key\"] }\n",
    )
    .await;
    for _ in 0..5 {
        let answer = limited.post_json("/webhooks/k/order", "{}").await;
        assert_eq!(answer.status, 401);
    }
    let headers = [("content-type", "application/json"), ("x-api-key", "key")];
    let answer = limited.request("POST", "/webhooks/k/order", &headers, Bytes::from_static(b"{}")).await;
    assert_eq!(answer.status, 202, "{}", answer.json);
}
