//! Hostile and broken HTTP clients against the real server: slow bodies,
//! slowloris, connection floods, pipelining, deeply nested and huge JSON.

use std::time::Duration;

use crate::common::TestServer;
use bytes::Bytes;
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
    let body = crate::common::fixture("ordermesh/order-creation.json");
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
    let body = String::from_utf8(crate::common::fixture("ordermesh/order-creation.json")).unwrap();
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

const API_KEY_SOURCE: &str = "[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\n\
    auth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"the-right-key\"] }\n";

fn hmac_source(key: &str) -> String {
    format!(
        "[[sources]]\nname = \"ordermesh\"\nprovider = \"ordermesh\"\n\
         auth = {{ scheme = \"hmac\", header = \"x-signature\", secrets = [\"{key}\"] }}\n"
    )
}

#[tokio::test]
async fn a_stranger_is_refused_before_its_body_is_read_and_never_told_to_continue() {
    let server = TestServer::start_with(API_KEY_SOURCE).await;
    let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
    let head = "POST /webhooks/winkelstraat/order HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 100000\r\nexpect: 100-continue\r\nx-api-key: a-wrong-key\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    // No body is sent: the answer must come anyway, and it is not 100.
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
}

#[tokio::test]
async fn a_413_reaches_a_client_still_sending_its_body() {
    let server = TestServer::start_with("[http]\nbody_limit_bytes = 1024\n").await;
    let address = server.http_addr;
    // Like Python's urllib: write the whole body, then read the answer.
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        let body = vec![b'x'; 32 << 20];
        let head = format!(
            "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body).map_err(|e| format!("writing the body: {e}"))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).map_err(|e| format!("reading the answer: {e}"))?;
        Ok::<_, String>(answer)
    })
    .await
    .unwrap();
    let answer = answer.expect("the client could not read the 413");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[tokio::test]
async fn a_sender_only_its_body_can_authenticate_has_a_short_deadline_and_a_small_share() {
    let key = "an-hmac-key-of-at-least-24-bytes";
    let config = format!("[http]\nmax_unverified_bodies = 1\nunverified_body_timeout_ms = 300\n{}", hmac_source(key));
    let server = TestServer::start_with(&config).await;
    // A well-formed signature header, then a body that never comes: it
    // takes the one unverified slot until its short deadline.
    let mut stalled = TcpStream::connect(server.http_addr).await.unwrap();
    let head = format!(
        "POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\
         x-signature: {}\r\n\r\n{{",
        "ab".repeat(32)
    );
    let started = tokio::time::Instant::now();
    stalled.write_all(head.as_bytes()).await.unwrap();
    server.metric_becomes("ordertrail_http_unverified_bodies", |n| n == 1.0).await;
    // A real webhook waits for the slot, then goes through.
    let body = r#"{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"h-1"}"#;
    let signature = signed(key, body);
    let answer = server
        .request(
            "POST",
            "/webhooks/ordermesh",
            &[("content-type", "application/json"), ("x-signature", &signature)],
            Bytes::from(body),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert!(started.elapsed() >= Duration::from_millis(250), "it did not wait for the only slot");
    let stalled_answer = read_to_close(&mut stalled).await;
    assert!(stalled_answer.starts_with("HTTP/1.1 408"), "{stalled_answer}");
    // The short deadline, not body_read_timeout_ms (30 s).
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

fn signed(key: &str, body: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn bodies_in_memory_are_bounded_by_a_budget() {
    let key = "an-hmac-key-of-at-least-24-bytes";
    let config = format!(
        "[http]\nbody_limit_bytes = 600000\nbody_memory_bytes = 1000000\nbody_read_timeout_ms = 3000\n\
         unverified_body_timeout_ms = 300\n{API_KEY_SOURCE}{}",
        hmac_source(key)
    );
    let server = TestServer::start_with(&config).await;
    // Declares 600 kB, sends a little, stalls: holds 600 kB of the 1 MB
    // budget until its deadline (3 s).
    let mut holder = TcpStream::connect(server.http_addr).await.unwrap();
    let head = "POST /webhooks/winkelstraat/order HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                x-api-key: the-right-key\r\ncontent-length: 600000\r\n\r\n{\"Pad\":\"";
    holder.write_all(head.as_bytes()).await.unwrap();
    server.metric_becomes("ordertrail_http_body_memory_bytes", |n| n >= 600_000.0).await;
    // Another 590 kB body does not fit beside it: it waits, and is answered
    // 503 (retry) when its deadline (300 ms) passes, not read into memory.
    let big = format!(
        r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"b-1","Pad":"{}"}}"#,
        "y".repeat(590_000)
    );
    let headers = [("content-type", "application/json"), ("x-signature", &*signed(key, &big))];
    let answer = server.request("POST", "/webhooks/ordermesh", &headers, Bytes::from(big.clone())).await;
    assert_eq!(answer.status, 503, "{}", answer.json);
    assert_eq!(answer.headers["retry-after"], "1");
    let held = read_to_close(&mut holder).await;
    assert!(held.starts_with("HTTP/1.1 408"), "{held}");
    // Once the memory is back, the same body goes through.
    let answer = server.request("POST", "/webhooks/ordermesh", &headers, Bytes::from(big)).await;
    assert_eq!(answer.status, 200, "{}", answer.json);
}

#[tokio::test]
async fn probes_never_queue_behind_webhooks_at_the_connection_limit() {
    let server = TestServer::start_with("[http]\nmax_connections = 2\nheader_read_timeout_ms = 5000\n").await;
    // Both connection slots held by clients that never finish their headers.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.http_addr).await.unwrap();
        stream.write_all(b"POST /webhooks/ordermesh HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        holders.push(stream);
    }
    server.metric_becomes("ordertrail_http_connections", |n| n >= 2.0).await;
    let started = tokio::time::Instant::now();
    for path in ["/healthz", "/readyz"] {
        let answer = server.request("GET", path, &[], Bytes::new()).await;
        assert_eq!(answer.status, 200, "{path}");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "the probes waited for a slot: {:?}", started.elapsed());
    // A webhook beyond the limit waits for a slot, then is served.
    let body = r#"{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"p-1"}"#;
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    drop(holders);
}
