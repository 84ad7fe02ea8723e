//! Rebuilding derived state from the raw deliveries on the sled engine:
//! prepared online, swapped in at the next start.

use crate::common::TestServer;

#[tokio::test]
async fn rebuild_online_is_swapped_in_at_the_next_start_with_what_arrived_meanwhile() {
    use ordertrail::proto::RebuildRequest;
    let server = TestServer::start().await;
    let post = |i: usize| {
        format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","ExternalOrderId":"E-{i}"}}"#)
    };
    for i in 0..5 {
        assert_eq!(server.post_json("/webhooks/ordermesh", post(i)).await.status, 200);
    }
    assert_eq!(server.post_json("/webhooks/ordermesh", "oops").await.status, 202);
    let rebuilt = server.admin().await.rebuild(RebuildRequest {}).await.unwrap().into_inner();
    assert_eq!((rebuilt.applied, rebuilt.quarantined, rebuilt.up_to_raw_id), (5, 1, 6), "{rebuilt:?}");
    // Ingest goes on meanwhile.
    for i in 5..8 {
        assert_eq!(server.post_json("/webhooks/ordermesh", post(i)).await.status, 200);
    }
    // Remembered after the rebuild was prepared: the swap carries it.
    server.store.remember("allowlist/ipblock.example", b"remembered".to_vec()).await.unwrap();
    let events = server.all_events().await;
    let quarantine = server.quarantine().await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, "").await;
    let remembered = server.store.remembered().await.unwrap();
    assert_eq!(remembered, [("allowlist/ipblock.example".into(), b"remembered".to_vec())], "carried over");
    assert_eq!(server.all_events().await, events, "rebuilt state plus what arrived meanwhile, identical");
    assert_eq!(server.quarantine().await, quarantine);
    let kept = std::fs::read_dir(server.dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("sled.before-rebuild-"));
    assert!(kept, "the old database is kept");
    assert!(!server.dir.path().join("rebuild.partial").exists());
    // Ingest continues on the rebuilt database.
    assert_eq!(server.post_json("/webhooks/ordermesh", post(8)).await.json["sequences"], serde_json::json!([9]));
}
