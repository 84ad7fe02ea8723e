//! Storage faults against the real server: every affected request gets 503,
//! never 2xx; readiness fails while the process stays up and keeps serving
//! reads; ingest resumes when the fault clears; nothing acknowledged is lost.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::TestServer;
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
