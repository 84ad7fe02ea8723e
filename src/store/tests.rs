//! Tests of the store: group commit, durability across reopen, closing.
use super::*;
use crate::config::{Backend, Durability, SledConfig};
use crate::ingest::{self, DeliveryMeta, Mapper};
use crate::proto::{Order, OrderStatus};
use crate::provider::Provider;

fn open(dir: &std::path::Path) -> Store {
    let config = StoreConfig {
        backend: Backend::Sled,
        data_dir: dir.to_path_buf(),
        durability: Durability::Fsync,
        sled: SledConfig { cache_capacity_bytes: 16 * 1024 * 1024 },
        postgres: None,
        retain_events: 0,
        feed_buffer_events: 64,
        unsafe_ack_before_durable: false,
        verify_on_start: true,
    };
    Store::open_blocking(&config, Mapper::default()).unwrap()
}

fn delivery(n: usize) -> Delivery {
    ordermesh(format!(
        r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o{n}","ExternalOrderId":"E{n}"}}"#
    ))
}

/// An unauthenticated OrderMesh delivery of `body`, mapped.
pub(super) fn ordermesh(body: String) -> Delivery {
    let meta = DeliveryMeta { provider: Provider::Ordermesh, kind: None, content_type: "application/json" };
    let raw = RawDelivery {
        source: "ordermesh".into(),
        provider: Provider::Ordermesh.to_proto() as i32,
        body_sha256: ingest::sha256_hex(body.as_bytes()),
        body: body.clone().into_bytes().into(),
        ..RawDelivery::default()
    };
    Delivery { raw, mapped: ingest::normalize(meta, body.as_bytes()) }
}

/// The first ten orders.
async fn first_orders(store: &Store) -> Vec<Order> {
    store.list_orders(&OrderFilter::default(), 0, PageLimit { items: 10, bytes: usize::MAX }).await.unwrap().items
}

/// Submits `deliveries` while the writer waits at its gate, so they are
/// queued together and taken in one turn; returns their answers.
#[expect(clippy::await_holding_lock, reason = "the gate holds the writer thread, not this task's executor")]
async fn in_one_turn(store: &Store, deliveries: Vec<Delivery>) -> Vec<Result<IngestOutcome, StoreError>> {
    let gate = store.inner.shared.writer_gate.lock().unwrap();
    let mut answers = Vec::new();
    for incoming in deliveries {
        answers.push(store.submit(incoming).await.unwrap());
    }
    drop(gate);
    let mut outcomes = Vec::new();
    for answer in answers {
        outcomes.push(answer.await);
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_for_a_shared_flush() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.hold_commits(true);
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.commit(delivery(n)).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.inner.shared.queued() < 64 {
        assert!(std::time::Instant::now() < deadline, "writer never queued the deliveries");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(tasks.iter().all(|t| !t.is_finished()), "a reply was sent before its flush");
    assert_eq!(store.commit_stats(), (0, 0));
    store.hold_commits(false);
    let mut sequences = Vec::new();
    for task in tasks {
        match task.await.unwrap().unwrap() {
            IngestOutcome::Applied { sequences: s, .. } => sequences.extend(s),
            other => panic!("unexpected {other:?}"),
        }
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=64).collect::<Vec<u64>>(), "gap-free, each once");
    assert_eq!(store.commit_stats(), (1, 64), "one flush answered all 64");
    assert_eq!(store.head_sequence(), 64);
    store.close().await.unwrap();
}

/// A delivery that comes while a flush is in progress is not committed
/// alone: it waits for that flush, and what arrives meanwhile joins its
/// turn (one engine batch instead of one per delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(clippy::await_holding_lock, reason = "the gate holds the flusher thread, not this task's executor")]
async fn deliveries_that_come_during_a_flush_share_the_next_turn() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let turns = || store.inner.shared.stats.turns.load(Ordering::Relaxed);
    store.commit(delivery(1)).await.unwrap();
    let gate = store.inner.shared.flush_gate.lock().unwrap();
    let flushing = store.submit(delivery(2)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(turns() == 2 && store.inner.shared.queued() == 0) {
        assert!(std::time::Instant::now() < deadline, "the flusher never took the second delivery");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // The writer takes delivery 3 during the flush; 4 and 5 come after.
    let mut answers = vec![store.submit(delivery(3)).await.unwrap()];
    let commands = store.sender().unwrap();
    while commands.capacity() < commands.max_capacity() {
        assert!(std::time::Instant::now() < deadline, "the writer never took the third delivery");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    drop(commands);
    for n in 4..=5 {
        answers.push(store.submit(delivery(n)).await.unwrap());
    }
    drop(gate);
    assert!(matches!(flushing.await.unwrap(), IngestOutcome::Applied { raw_id: 2, .. }));
    for answer in answers {
        assert!(matches!(answer.await.unwrap(), IngestOutcome::Applied { .. }));
    }
    assert_eq!(turns(), 3, "deliveries 3, 4 and 5 were committed in one turn");
    assert_eq!(store.head_sequence(), 5);
    store.close().await.unwrap();
}

#[tokio::test]
async fn nothing_is_answered_before_it_is_durable_and_reopen_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let outcome = store.commit(delivery(1)).await.unwrap();
    assert!(matches!(outcome, IngestOutcome::Applied { raw_id: 1, .. }));
    assert_eq!(store.commit_stats(), (1, 1), "the reply came from a flush");
    store.close().await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.head_sequence(), 1);
    assert_eq!(store.delivery(1).await.unwrap().unwrap().body, delivery(1).raw.body);
    assert!(matches!(store.commit(delivery(1)).await.unwrap(), IngestOutcome::Duplicate { raw_id: 1, .. }));
    assert!(matches!(store.commit(delivery(2)).await.unwrap(), IngestOutcome::Applied { raw_id: 2, .. }));
    assert_eq!(store.head_sequence(), 2);
}

/// Deliveries applied in one writer turn (one sled batch) see each other:
/// a duplicate is caught, a second delivery for an order finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_one_turn_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let update = |n: usize, status: &str| {
        ordermesh(format!(
            r#"{{"EventType":"OrderUpdate","OrderId":"o{n}","ExternalOrderId":"E{n}","OldStatus":"Open","NewStatus":"{status}"}}"#
        ))
    };
    let deliveries =
        vec![delivery(1), delivery(1), update(1, "ReadyForFulfillment"), delivery(2), update(1, "Shipped")];
    let outcomes: Vec<IngestOutcome> = in_one_turn(&store, deliveries).await.into_iter().map(Result::unwrap).collect();
    assert!(store.inner.shared.stats.turns.load(Ordering::Relaxed) <= 2, "the deliveries shared a turn");
    assert!(matches!(outcomes[1], IngestOutcome::Duplicate { raw_id: 1, .. }), "{outcomes:?}");
    let sequences: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| match o {
            IngestOutcome::Applied { sequences, .. } => sequences.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4], "gap-free, in order");
    let orders = first_orders(&store).await;
    assert_eq!(orders.len(), 2, "o1's three deliveries made one order: {orders:?}");
    let o1 = orders.iter().find(|o| o.references.as_ref().unwrap().provider_order_id == "o1").unwrap();
    assert_eq!(o1.status(), OrderStatus::Shipped);
    store.close().await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(first_orders(&store).await.len(), 2);
    assert_eq!(store.head_sequence(), 4);
}

/// A turn whose batch cannot be written answers every delivery in it with
/// an error and leaves nothing behind: the next turn starts from the same
/// ids, so sequences stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_turn_answers_all_of_it_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.inject_fault(Some(FaultPoint::Write));
    for answer in in_one_turn(&store, (1..=3).map(delivery).collect()).await {
        assert!(matches!(answer, Err(StoreError::Unavailable(..))), "a failed write is never acknowledged");
    }
    store.inject_fault(None);
    // The failed instance is reopened before anything is acknowledged again.
    while !store.is_healthy() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for n in 1..=3 {
        match store.commit(delivery(n)).await.unwrap() {
            IngestOutcome::Applied { raw_id, sequences } => {
                assert_eq!((raw_id, sequences), (n as u64, vec![n as u64]), "ids start where they were");
            }
            other => panic!("delivery {n} was not applied anew: {other:?}"),
        }
    }
    assert_eq!(first_orders(&store).await.len(), 3);
}

#[tokio::test]
async fn closed_store_refuses_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.close().await.unwrap();
    assert!(matches!(store.commit(delivery(1)).await, Err(StoreError::Closed)));
}

/// Ingests deliveries `range` concurrently (so they share commits).
async fn ingest_all(store: &Store, range: std::ops::Range<usize>) {
    let tasks: Vec<_> = range
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.commit(delivery(n)).await })
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Ok(IngestOutcome::Applied { .. })));
    }
}

/// Replay reads the next page while the current one is sent; with the
/// head moving meanwhile, the feed still yields every event once, in
/// order, across pages and into live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_replays_many_pages_while_the_head_moves() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let stored = 2 * feed::PAGE + 300;
    ingest_all(&store, 0..stored).await;
    let mut feed = store.feed(0);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { ingest_all(&store, stored..stored + 1500).await })
    };
    let (mut next, mut caught_up) = (1u64, 0);
    while next <= (stored + 1500) as u64 {
        let item = tokio::time::timeout(std::time::Duration::from_secs(60), feed.next()).await;
        match item.expect("the feed stalled").unwrap() {
            FeedItem::Event(event) => {
                assert_eq!(event.sequence, next, "gap-free, each once");
                next += 1;
            }
            FeedItem::CaughtUp(sequence) => {
                assert_eq!(sequence, next - 1, "caught up where the feed is");
                caught_up += 1;
            }
        }
    }
    writer.await.unwrap();
    assert!(caught_up <= 1, "caught_up is sent once");
}

/// After a failed flush, a later successful one does not prove the earlier
/// pages reached the disk: nothing is acknowledged again until the store
/// was reopened, and what was acknowledged before stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_flush_nothing_is_acknowledged_until_the_store_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(matches!(store.commit(delivery(1)).await, Ok(IngestOutcome::Applied { .. })));
    store.inject_fault(Some(FaultPoint::Flush));
    assert!(matches!(store.commit(delivery(2)).await, Err(StoreError::Unavailable(..))));
    store.inject_fault(None);
    let reopens = || store.commit_metrics().reopens.get();
    let mut acknowledged = Vec::new();
    for n in 3..2000 {
        let before = reopens();
        match store.commit(delivery(n)).await {
            Ok(outcome) => {
                assert!(before > 0, "delivery {n} was acknowledged through the instance whose flush failed");
                acknowledged.push((n, outcome));
                if acknowledged.len() == 5 {
                    break;
                }
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
    assert!(!acknowledged.is_empty(), "ingest never resumed");
    assert_eq!(reopens(), 1);
    store.close().await.unwrap();
    drop(store);
    let store = open(dir.path());
    assert!(store.delivery(1).await.unwrap().is_some(), "acknowledged before the failure");
    for (n, outcome) in acknowledged {
        let IngestOutcome::Applied { raw_id, .. } = outcome else { panic!("{outcome:?}") };
        let raw = store.delivery(raw_id).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&raw.body).contains(&format!("\"o{n}\"")), "{n}");
    }
}

/// Export goes on past records it cannot read, counts them, and saves the
/// rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_skips_what_it_cannot_read_and_saves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for n in 1..=6 {
        store.commit(delivery(n)).await.unwrap();
    }
    let config = store.inner.config.clone();
    store.close().await.unwrap();
    drop(store);
    Store::tamper_raw_record(dir.path(), 3, Some(b"\xff\xff\xff not a delivery")).unwrap();
    Store::tamper_raw_record(dir.path(), 4, None).unwrap();
    Store::tamper_raw_record(dir.path(), 6, None).unwrap();
    let mut out = Vec::new();
    let summary = export(&config, &mut out).unwrap();
    assert_eq!(summary, ExportSummary { exported: 3, unreadable: 3 });
    let ids: Vec<u64> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<export::ExportedDelivery>(line).unwrap().id)
        .collect();
    assert_eq!(ids, [1, 2, 5]);
}
