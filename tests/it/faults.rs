//! Storage faults against the real server: every affected request gets 503,
//! never 2xx; readiness fails while the process stays up and keeps serving
//! reads; ingest resumes when the fault clears; nothing acknowledged is lost.

use std::time::Duration;

use crate::common::TestServer;
use bytes::Bytes;
use ordertrail::store::FaultPoint;

fn creation(i: usize) -> String {
    format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","ExternalOrderId":"E-{i}"}}"#)
}

async fn status(server: &TestServer, path: &str) -> u16 {
    server.request("GET", path, &[], Bytes::new()).await.status.as_u16()
}

/// Waits (bounded) until /readyz answers `expected`.
async fn ready_becomes(server: &TestServer, expected: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while status(server, "/readyz").await != expected {
        assert!(tokio::time::Instant::now() < deadline, "/readyz never answered {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn storage_failures_answer_503_and_ingest_resumes_when_they_clear() {
    for point in [FaultPoint::Write, FaultPoint::Flush] {
        let server = TestServer::start().await;
        assert_eq!(server.post_json("/webhooks/ordermesh", creation(0)).await.status, 200);
        server.store.inject_fault(Some(point));
        for i in 1..4 {
            let answer = server.post_json("/webhooks/ordermesh", creation(i)).await;
            assert_eq!(answer.status, 503, "{point:?}: {}", answer.json);
            assert!(answer.json["error"].as_str().unwrap().contains("retry later"));
        }
        ready_becomes(&server, 503).await;
        assert_eq!(status(&server, "/healthz").await, 200, "the process stays up");
        assert_eq!(server.all_events().await.len(), 1, "{point:?}: reads still work, only durable events");
        server.store.inject_fault(None);
        ready_becomes(&server, 200).await;
        // The provider retries what got 503: nothing is lost either way.
        for i in 1..4 {
            let answer = server.post_json("/webhooks/ordermesh", creation(i)).await;
            assert_eq!(answer.status, 200, "{point:?}: {}", answer.json);
        }
        let server = server.restart().await;
        let mut references: Vec<String> =
            server.all_events().await.iter().map(|e| e.references.clone().unwrap().merchant_reference).collect();
        references.sort();
        references.dedup();
        assert_eq!(references, ["E-0", "E-1", "E-2", "E-3"], "{point:?}");
        let sequences: Vec<u64> = server.all_events().await.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>(), "gap-free");
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_under_load_loses_nothing_acknowledged() {
    let server = TestServer::start_with("shutdown_grace_ms = 20000\n").await;
    let address = server.http_addr;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut posters = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (acked, stop) = (acked.clone(), stop.clone());
        posters.spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let reference = format!("E-{worker}-{i}");
                let body = format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"{reference}","ExternalOrderId":"{reference}"}}"#);
                let request = hyper::Request::post(format!("http://{address}/webhooks/ordermesh"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == 200 => acked.lock().unwrap().push(reference),
                    Ok(_) => {}
                    // The listener is gone: stop hammering it.
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
    }
    // Shut down while 16 clients keep posting (once some answers came
    // back), well inside the grace period.
    while acked.lock().unwrap().len() <= 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dir = tokio::time::timeout(Duration::from_secs(15), server.stop()).await.expect("shutdown hung");
    stop.cancel();
    posters.join_all().await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20, "too little load: {}", acked.len());
    let server = TestServer::start_in(dir, "").await;
    let stored: std::collections::HashSet<String> =
        server.all_events().await.into_iter().map(|e| e.references.unwrap().merchant_reference).collect();
    let missing: Vec<&String> = acked.iter().filter(|r| !stored.contains(*r)).collect();
    assert!(missing.is_empty(), "{} acknowledged deliveries lost: {missing:?}", missing.len());
    server.stop().await;
}

/// A data dir of three deliveries whose second stored record is damaged.
async fn damaged_data_dir() -> tempfile::TempDir {
    let server = TestServer::start().await;
    for i in 0..3 {
        assert_eq!(server.post_json("/webhooks/ordermesh", creation(i)).await.status, 200);
    }
    let dir = server.stop().await;
    // Overwrite delivery 2's stored record with bytes that are no record.
    ordertrail::store::Store::tamper_raw_record(dir.path(), 2, Some(b"\xff\xff\xff\xff damaged")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_by_a_read_makes_the_server_not_ready() {
    let server = TestServer::start_in(damaged_data_dir().await, "").await;
    let status = server.admin().await.get_delivery(ordertrail::proto::GetDeliveryRequest { raw_id: 2 }).await;
    assert_eq!(status.unwrap_err().code(), tonic::Code::DataLoss);
    let answer = server.request("GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!(answer.status, 503, "{}", answer.json);
    assert!(answer.json["status"].as_str().unwrap().contains("damaged"), "{}", answer.json);
    // Webhooks are still taken: refusing them would lose them.
    assert_eq!(server.post_json("/webhooks/ordermesh", creation(9)).await.status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_found_after_start_without_any_read() {
    let server = TestServer::start_in(damaged_data_dir().await, "").await;
    // The background verification reads everything once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let answer = server.request("GET", "/readyz", &[], Bytes::new()).await;
        if answer.json.get("damage").is_some() || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(answer.status, 503, "{}", answer.json);
    assert!(answer.json["damage"].as_str().is_some_and(|d| d.contains("is damaged")), "{}", answer.json);
    server.stop().await;
}
