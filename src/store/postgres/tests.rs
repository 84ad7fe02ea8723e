//! The PostgreSQL batch transaction on a private cluster: dense sequences,
//! reads under the counter row's lock, dedup across concurrent nodes.

use super::batch::{Prepared, commit_batch};
use super::{connect, schema};
use crate::config::Config;
use crate::store::IngestOutcome;
use crate::store::plan::Work;
use crate::testing::PostgresCluster;

/// Long enough never to be reached here.
const COMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn config(cluster: &PostgresCluster) -> crate::config::PostgresConfig {
    let env = |key: &str| match key {
        "ORDERTRAIL_STORE_BACKEND" => Some("postgres".to_string()),
        "ORDERTRAIL_POSTGRES_URL" => Some(cluster.url()),
        _ => None,
    };
    Config::from_toml("", &env).unwrap().store.postgres.unwrap()
}

fn creation(node: &str, n: usize) -> Work {
    let body = format!(
        r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"{node}{n}","ExternalOrderId":"E{node}{n}"}}"#
    );
    Work::Ingest(Box::new(crate::store::tests::ordermesh(body)))
}

fn update(node: &str, n: usize) -> Work {
    let body = format!(
        r#"{{"EventType":"OrderUpdate","OrderId":"{node}{n}","ExternalOrderId":"E{node}{n}","OldStatus":"Open","NewStatus":"Shipped"}}"#
    );
    Work::Ingest(Box::new(crate::store::tests::ordermesh(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_with_dense_sequences_and_later_batches_find_its_orders() {
    let cluster = PostgresCluster::start();
    let config = config(&cluster);
    let mut client = connect(&config).await.unwrap();
    schema::migrate(&mut client).await.unwrap();
    let prepared = Prepared::on(&client).await.unwrap();
    let created = commit_batch(
        &mut client,
        &prepared,
        &(0..100).map(|n| creation("a", n)).collect::<Vec<_>>(),
        0,
        COMMIT_TIMEOUT,
        None,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(created.outcomes.iter().all(|o| matches!(o, Ok((IngestOutcome::Applied { .. }, _)))));
    let updated = commit_batch(
        &mut client,
        &prepared,
        &(0..100).map(|n| update("a", n)).collect::<Vec<_>>(),
        0,
        COMMIT_TIMEOUT,
        None,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(updated.outcomes.iter().all(|o| matches!(o, Ok((IngestOutcome::Applied { .. }, _)))));
    assert_eq!(updated.writes.counters.last_order, 100, "every update found its order");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) || ' ' || max(sequence) FROM ot_events"), "200 200");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ot_orders"), "100");
    assert_eq!(cluster.psql("ordertrail", "SELECT last_sequence || ' ' || last_raw FROM ot_counters"), "200 200");
}

/// Two nodes committing at once, both also receiving the same deliveries:
/// every delivery is stored once, and the events are numbered densely, each
/// batch's block after the one committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_nodes_number_densely_and_store_a_shared_delivery_once() {
    let cluster = PostgresCluster::start();
    let config = config(&cluster);
    schema::migrate(&mut connect(&config).await.unwrap()).await.unwrap();
    let nodes: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|node| {
            let config = config.clone();
            tokio::spawn(async move {
                let mut client = connect(&config).await.unwrap();
                let prepared = Prepared::on(&client).await.unwrap();
                let mut applied_shared = 0;
                let mut blocks = Vec::new();
                for round in 0..20 {
                    let mut batch: Vec<Work> = (0..10).map(|n| creation(node, round * 10 + n)).collect();
                    batch.push(creation("shared", round));
                    let planned = commit_batch(&mut client, &prepared, &batch, 0, COMMIT_TIMEOUT, None, &mut |_| {})
                        .await
                        .unwrap();
                    let sequences: Vec<u64> = planned.writes.events.iter().map(|(s, _)| *s).collect();
                    blocks.push(sequences);
                    if matches!(planned.outcomes[10], Ok((IngestOutcome::Applied { .. }, _))) {
                        applied_shared += 1;
                    }
                }
                (applied_shared, blocks)
            })
        })
        .collect();
    let mut applied_shared = 0;
    let mut blocks = Vec::new();
    for node in nodes {
        let (applied, node_blocks) = node.await.unwrap();
        applied_shared += applied;
        blocks.extend(node_blocks);
    }
    assert_eq!(applied_shared, 20, "each shared delivery was applied on exactly one node");
    let raws = cluster.psql("ordertrail", "SELECT count(*) FROM ot_raw");
    assert_eq!(raws, (2 * 20 * 10 + 20).to_string(), "one raw record per distinct delivery");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) || ' ' || max(sequence) FROM ot_events"), "420 420");
    for block in &blocks {
        assert!(block.windows(2).all(|w| w[1] == w[0] + 1), "a batch's sequences are one block: {block:?}");
    }
    blocks.sort();
    let all: Vec<u64> = blocks.into_iter().flatten().collect();
    assert_eq!(all, (1..=420).collect::<Vec<u64>>(), "the blocks tile the log without gap or overlap");
}

/// The rebuild's swap checks, under the live counter row's lock, that no
/// delivery arrived after the copy; if one did, nothing moves.
#[tokio::test]
async fn a_rebuild_swap_refuses_when_a_delivery_arrived_after_the_copy() {
    let cluster = PostgresCluster::start();
    let config = config(&cluster);
    let mut client = connect(&config).await.unwrap();
    schema::migrate(&mut client).await.unwrap();
    let live = super::rebuild::begin(&client).await.unwrap();
    client.batch_execute("UPDATE ot_counters SET last_raw = 5").await.unwrap();
    let swapped = super::rebuild::swap_in(&mut client, &live, 4, "test").await;
    assert!(
        matches!(&swapped, Err(crate::store::StoreError::Invalid(why)) if why.contains("arrived during the rebuild")),
        "{swapped:?}"
    );
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'ot_%'";
    assert_eq!(cluster.psql("ordertrail", tables), "8", "the live tables stay where they were");
}
