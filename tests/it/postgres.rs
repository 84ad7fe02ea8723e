//! The PostgreSQL engine on private clusters
//! (`ordertrail::testing::PostgresCluster`): configuration, schema
//! migrations, nodes sharing one database (dedup, read-your-writes, live
//! streams), the database crashing, stuck or losing its synchronous
//! standby, and the migration from sled. The kill -9, failover and
//! sequencing harnesses are in `crash.rs`.

use ordertrail::testing::PostgresCluster;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The config of a node storing at `url`, plus `extra` `[store.postgres]` keys.
fn node_config(url: &str, extra: &str) -> String {
    format!("[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n{extra}\n")
}

fn postgres_config(cluster: &PostgresCluster) -> ordertrail::config::PostgresConfig {
    let env = |key: &str| match key {
        "ORDERTRAIL_STORE_BACKEND" => Some("postgres".to_string()),
        "ORDERTRAIL_POSTGRES_URL" => Some(cluster.url()),
        _ => None,
    };
    let config = ordertrail::config::Config::from_toml("", &env).unwrap();
    config.store.postgres.expect("a postgres backend has its settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_the_schema_once() {
    let cluster = PostgresCluster::start();
    let config = postgres_config(&cluster);
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { ordertrail::store::postgres::prepare(&config).await })
        })
        .collect();
    let mut found = Vec::new();
    for start in starts {
        found.push(start.await.unwrap().expect("every node starts"));
    }
    found.sort_unstable();
    assert_eq!(found, [0, 2, 2], "one node migrated, the others found it done");
    assert_eq!(cluster.psql("ordertrail", "SELECT version FROM ordertrail_schema"), "2");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ordertrail_schema"), "1");
    assert_eq!(cluster.psql("ordertrail", "SELECT last_sequence FROM ot_counters"), "0");
    assert_eq!(ordertrail::store::postgres::prepare(&config).await.unwrap(), 2, "a restart changes nothing");
}

/// A database at an older schema version is brought up to date at start,
/// keeping what it holds.
#[tokio::test]
async fn an_older_schema_is_migrated_forward() {
    let cluster = PostgresCluster::start();
    let config = postgres_config(&cluster);
    ordertrail::store::postgres::prepare(&config).await.unwrap();
    // As a database of version 1 was: no remembered answers yet.
    cluster.psql("ordertrail", "DROP TABLE ot_remembered; UPDATE ordertrail_schema SET version = 1");
    cluster.psql("ordertrail", "UPDATE ot_counters SET last_raw = 7");
    assert_eq!(ordertrail::store::postgres::prepare(&config).await.unwrap(), 1, "found at version 1");
    assert_eq!(cluster.psql("ordertrail", "SELECT version FROM ordertrail_schema"), "2");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ot_remembered"), "0", "migration 2 ran");
    assert_eq!(cluster.psql("ordertrail", "SELECT last_raw FROM ot_counters"), "7", "nothing else changed");
}

#[tokio::test]
async fn a_schema_newer_than_the_build_is_refused() {
    let cluster = PostgresCluster::start();
    let config = postgres_config(&cluster);
    ordertrail::store::postgres::prepare(&config).await.unwrap();
    cluster.psql("ordertrail", "UPDATE ordertrail_schema SET version = 99");
    let refused = ordertrail::store::postgres::prepare(&config).await.unwrap_err();
    assert!(matches!(refused, ordertrail::store::StoreError::Corrupt(_)), "{refused}");
    assert!(refused.to_string().contains("schema version 99, newer than this build"), "{refused}");
}

#[test]
fn a_postgres_backend_needs_a_url_and_never_shows_its_password() {
    let env = |key: &str| (key == "ORDERTRAIL_STORE_BACKEND").then(|| "postgres".to_string());
    let err = ordertrail::config::Config::from_toml("", &env).unwrap_err().to_string();
    assert!(err.contains("ORDERTRAIL_POSTGRES_URL"), "{err}");
    let text = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ot:s3cret-pw@db1,db2/ot?target_session_attrs=read-write\"\n";
    let config = ordertrail::config::Config::from_toml(text, &|_| None).unwrap();
    let shown = format!("{config:?}");
    assert!(shown.contains("db2") && !shown.contains("s3cret-pw"), "{shown}");
    let bad = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ot:s3cret-pw@db/ot?sslmode=sometimes\"\n";
    let err = ordertrail::config::Config::from_toml(bad, &|_| None).unwrap_err().to_string();
    assert!(err.contains("store.postgres.url") && !err.contains("s3cret-pw"), "{err}");
}

#[test]
fn a_private_cluster_starts_with_durable_commits_and_stops() {
    let cluster = PostgresCluster::start();
    assert_eq!(cluster.psql("ordertrail", "SHOW synchronous_commit"), "on");
    assert_eq!(cluster.psql("ordertrail", "SHOW fsync"), "on");
    assert_eq!(cluster.psql("ordertrail", "SELECT current_user"), "ordertrail");
    let data = cluster.data();
    drop(cluster);
    assert!(!data.join("postmaster.pid").exists(), "the server was stopped");
}

/// The whole path on PostgreSQL: a webhook answered 200 is stored, found by
/// GetOrder, listed by ListEvents and its resend is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_postgres_stores_serves_and_dedups() {
    use ordertrail::proto::get_order_request::Reference;
    use ordertrail::proto::{GetOrderRequest, ListEventsRequest};
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let server = crate::common::TestServer::start_with(&config).await;
    let body = crate::common::fixture("ordermesh/order-creation.json");
    let first = server.post_json("/webhooks/ordermesh", body.clone()).await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["outcome"], "applied");
    let again = server.post_json("/webhooks/ordermesh", body).await;
    assert_eq!(again.json["outcome"], "duplicate");
    let request =
        GetOrderRequest { reference: Some(Reference::ExternalOrderId("WBTEST22".into())), source: String::new() };
    let order = server.grpc().await.get_order(request).await.unwrap().into_inner();
    assert_eq!(order.references.unwrap().provider_order_id, "670e58fe7741035996cf7d20");
    let events = server.grpc().await.list_events(ListEventsRequest::default()).await.unwrap().into_inner();
    assert_eq!(events.events.len(), 1);
    assert_eq!(events.head_sequence, 1);
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ot_raw"), "1", "stored in PostgreSQL");
    server.stop().await;
}

/// Two nodes on one database: what one acknowledges, the other serves at
/// once, and a subscriber on the other receives it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_on_one_node_receives_what_another_node_ingests() {
    use ordertrail::proto::get_order_request::Reference;
    use ordertrail::proto::subscribe_response::Message;
    use ordertrail::proto::{GetOrderRequest, SubscribeRequest};
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let a = crate::common::TestServer::start_with(&config).await;
    let b = crate::common::TestServer::start_with(&config).await;
    let mut stream = b
        .grpc()
        .await
        .subscribe(SubscribeRequest { after_sequence: Some(0), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    for n in 0..5 {
        let body =
            format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o{n}","ExternalOrderId":"E{n}"}}"#);
        let node = if n % 2 == 0 { &a } else { &b };
        assert_eq!(node.post_json("/webhooks/ordermesh", body).await.status, 200);
        // Read-your-writes on the other node.
        let other = if n % 2 == 0 { &b } else { &a };
        let request =
            GetOrderRequest { reference: Some(Reference::ExternalOrderId(format!("E{n}"))), source: String::new() };
        assert!(other.grpc().await.get_order(request).await.is_ok(), "order {n} on the other node");
    }
    let mut sequences = Vec::new();
    while sequences.len() < 5 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message()).await;
        if let Some(Message::Event(event)) = next.expect("the stream stalled").unwrap().unwrap().message {
            sequences.push(event.sequence);
        }
    }
    assert_eq!(sequences, [1, 2, 3, 4, 5], "every node's events, in order, once");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_server_setting_that_weakens_durability_is_said_at_readyz() {
    let cluster = PostgresCluster::start_with(&["synchronous_commit=off"]);
    let config = node_config(&cluster.url(), "");
    let server = crate::common::TestServer::start_with(&config).await;
    let ready = server.request("GET", "/readyz", &[], bytes::Bytes::new()).await;
    assert_eq!(ready.status, 200);
    let warnings = ready.json["warnings"].to_string();
    assert!(warnings.contains("synchronous_commit = off"), "{}", ready.json);
    server.stop().await;
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let server = crate::common::TestServer::start_with(&config).await;
    let ready = server.request("GET", "/readyz", &[], bytes::Bytes::new()).await;
    assert!(ready.json.get("warnings").is_none(), "{}", ready.json);
    server.stop().await;
}

/// PostgreSQL crashes and comes back under load: every answer while it is
/// gone is a 503, ingest resumes by itself, and every acknowledged webhook
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_crash_under_load_loses_nothing_acknowledged_and_ingest_resumes() {
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let server = std::sync::Arc::new(crate::common::TestServer::start_with(&config).await);
    let stop = tokio_util::sync::CancellationToken::new();
    let poster = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut refused, mut n) = (Vec::new(), 0, 0);
            while !stop.is_cancelled() {
                n += 1;
                let body = format!(
                    r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o{n}","ExternalOrderId":"E{n}"}}"#
                );
                match server.post_json("/webhooks/ordermesh", body).await.status.as_u16() {
                    200 => acked.push(n),
                    503 => refused += 1,
                    other => panic!("webhook {n} answered {other}"),
                }
            }
            (acked, refused)
        })
    };
    server.metric_becomes("ordertrail_head_sequence", |n| n >= 20.0).await;
    cluster.kill();
    server.metric_becomes("ordertrail_storage_failures_total", |n| n >= 1.0).await;
    // Down: not ready, and gRPC health says so, while the process lives.
    readiness_becomes(&server, (503, ServingStatus::NotServing)).await;
    cluster.resume();
    server.metric_becomes("ordertrail_store_reopens_total", |n| n >= 1.0).await;
    readiness_becomes(&server, (200, ServingStatus::Serving)).await;
    let head = server.head().await;
    server.metric_becomes("ordertrail_head_sequence", |n| n >= (head + 20) as f64).await;
    stop.cancel();
    let (acked, refused) = poster.await.unwrap();
    assert!(refused > 0, "nothing was refused while the database was down");
    let stored: std::collections::HashSet<String> =
        server.all_events().await.into_iter().map(|e| e.references.unwrap().merchant_reference).collect();
    for n in acked {
        assert!(stored.contains(&format!("E{n}")), "webhook {n} was acknowledged and lost");
    }
}

/// Waits (bounded) until `/readyz` and the gRPC health say `expected`
/// (health follows the store within its watch interval).
async fn readiness_becomes(server: &crate::common::TestServer, expected: (u16, ServingStatus)) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = readiness(server).await;
        if now == expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "readiness stayed {now:?}, expected {expected:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `/readyz`'s status and the gRPC health of the whole server.
async fn readiness(server: &crate::common::TestServer) -> (u16, ServingStatus) {
    let ready = server.request("GET", "/readyz", &[], bytes::Bytes::new()).await.status.as_u16();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr)).unwrap();
    let mut health = HealthClient::new(channel.connect().await.unwrap());
    let request = HealthCheckRequest { service: String::new() };
    let status = health.check(request).await.unwrap().into_inner().status;
    (ready, ServingStatus::try_from(status).unwrap())
}

/// The same webhook arriving on two nodes at the same moment, many times:
/// every copy is answered 200, one raw record and one event are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_deliveries_on_two_nodes_at_once_are_stored_once() {
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let a = std::sync::Arc::new(crate::common::TestServer::start_with(&config).await);
    let b = std::sync::Arc::new(crate::common::TestServer::start_with(&config).await);
    let body = crate::common::fixture("ordermesh/order-creation.json");
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..24 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let body = body.clone();
        posts.spawn(async move { node.post_json("/webhooks/ordermesh", body).await });
    }
    let mut outcomes = Vec::new();
    while let Some(answer) = posts.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.json);
        outcomes.push(answer.json["outcome"].as_str().unwrap().to_string());
    }
    assert_eq!(outcomes.iter().filter(|o| *o == "applied").count(), 1, "{outcomes:?}");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ot_raw"), "1");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ot_events"), "1");
}

/// The migration path from one node to several: export from sled, import
/// into PostgreSQL, and the same events and quarantine are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_export_imported_into_postgres_serves_identical_events() {
    let (events, quarantine, source) = crate::binary::sample_data_dir().await;
    let file = source.path().join("export.ndjson");
    let file = file.to_str().unwrap();
    crate::binary::cli(&["export", "--out", file], source.path(), &[]);
    let cluster = PostgresCluster::start();
    let url = cluster.url();
    let postgres = [("ORDERTRAIL_STORE_BACKEND", "postgres"), ("ORDERTRAIL_POSTGRES_URL", url.as_str())];
    let node_dir = tempfile::tempdir().unwrap();
    let imported = crate::binary::cli(&["import", file], node_dir.path(), &postgres);
    assert!(imported.contains("imported 8 applied, 1 quarantined, 0 already present"), "{imported}");
    let config = node_config(&url, "");
    let node = crate::common::TestServer::start_in(node_dir, &config).await;
    assert_eq!(node.all_events().await, events, "events identical, provenance included");
    assert_eq!(node.quarantine().await, quarantine);
    node.stop().await;
}

#[test]
fn sessions_carry_the_statement_timeout() {
    let text = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ot@db/ot\"\nstatement_timeout_ms = 1234\n";
    let config = ordertrail::config::Config::from_toml(text, &|_| None).unwrap();
    assert_eq!(config.store.postgres.unwrap().statement_timeout, std::time::Duration::from_millis(1234));
}

#[tokio::test]
async fn a_stuck_database_fails_the_batch_instead_of_holding_the_writer() {
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "statement_timeout_ms = 500");
    let server = crate::common::TestServer::start_with(&config).await;
    // Another session holds the counter row: every batch waits for it.
    let holder = std::thread::spawn({
        let port = cluster.port;
        move || {
            std::process::Command::new("psql")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "ordertrail", "-d", "ordertrail", "-c"])
                .arg("BEGIN; SELECT * FROM ot_counters FOR UPDATE; SELECT pg_sleep(3); COMMIT;")
                .output()
        }
    });
    let holding = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3)%' AND state = 'active' AND pid <> pg_backend_pid()";
    while cluster.psql("ordertrail", holding) == "0" {
        std::thread::yield_now();
    }
    let body = r#"{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"s1","ExternalOrderId":"S1"}"#;
    let answer = server.post_json("/webhooks/ordermesh", body).await;
    assert_eq!(answer.status, 503, "{}", answer.json);
    let _ = holder.join();
    server.metric_becomes("ordertrail_store_reopens_total", |n| n >= 1.0).await;
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200, "ingest resumed by itself");
}

/// A node follows the others by notification: with the fallback poll an
/// hour apart, a subscriber still gets another node's events at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_nodes_commits_wake_the_follower_by_notification() {
    use ordertrail::proto::SubscribeRequest;
    use ordertrail::proto::subscribe_response::Message;
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "follow_poll_ms = 3600000");
    let a = crate::common::TestServer::start_with(&config).await;
    let b = crate::common::TestServer::start_with(&config).await;
    let request = SubscribeRequest { after_sequence: Some(0), ..Default::default() };
    let mut stream = b.grpc().await.subscribe(request).await.unwrap().into_inner();
    for n in 0..3 {
        let body =
            format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"n{n}","ExternalOrderId":"N{n}"}}"#);
        assert_eq!(a.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    let mut received = 0;
    while received < 3 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message()).await;
        if let Some(Message::Event(_)) = next.expect("no notification woke the follower").unwrap().unwrap().message {
            received += 1;
        }
    }
    a.stop().await;
    b.stop().await;
}

/// PostgreSQL does not time out a COMMIT waiting for a synchronous standby
/// (`statement_timeout` ends before it). With replication stalled, a
/// webhook is neither acknowledged nor held for ever: the node gives up on
/// the COMMIT after `statement_timeout_ms` and answers 503.
#[tokio::test]
async fn a_commit_the_synchronous_standby_does_not_confirm_is_never_acknowledged() {
    let primary = PostgresCluster::start();
    let standby = PostgresCluster::standby_of(&primary, "standby");
    primary.make_synchronous("standby");
    let config = node_config(&primary.url(), "statement_timeout_ms = 300");
    let server = crate::common::TestServer::start_with(&config).await;
    let body = |n: u32| {
        format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"r{n}","ExternalOrderId":"R{n}"}}"#)
    };
    assert_eq!(server.post_json("/webhooks/ordermesh", body(0)).await.status, 200);
    primary.pause_replication();
    let answer =
        tokio::time::timeout(std::time::Duration::from_secs(60), server.post_json("/webhooks/ordermesh", body(1)))
            .await
            .expect("the webhook was held by a COMMIT the standby never confirmed");
    assert_eq!(answer.status, 503, "acknowledged without the standby: {}", answer.json);
    drop(standby);
}

/// `ordertrail rebuild` on PostgreSQL: refused while a node runs (and
/// online), then, with every node stopped, everything is derived again
/// with what the mappers learned, the old tables kept in a schema of their
/// own; the nodes serve the rebuilt state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_on_postgres_derives_everything_again_with_every_node_stopped() {
    let cluster = PostgresCluster::start();
    let url = cluster.url();
    let store = node_config(&url, "");
    let server = crate::common::TestServer::start_with(&store).await;
    let order = crate::common::fixture("winkelstraat/order.json");
    assert_eq!(server.post_json("/webhooks/winkelstraat/stock-order", order).await.status, 202, "quarantined");
    let creation = crate::common::fixture("ordermesh/order-creation.json");
    assert_eq!(server.post_json("/webhooks/ordermesh", creation).await.status, 200);
    let online = server.admin().await.rebuild(ordertrail::proto::RebuildRequest {}).await.unwrap_err();
    assert!(online.message().contains("stop every node and run `ordertrail rebuild`"), "{online:?}");
    // The mapper learns that stock-order carries an order.
    let taught = format!(
        "{store}[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\n\
         kind_aliases = {{ stock-order = \"order\" }}\n[[sources]]\nname = \"ordermesh\"\nprovider = \"ordermesh\"\n"
    );
    let file = server.dir.path().join("taught.toml");
    std::fs::write(&file, &taught).unwrap();
    let rebuild = |data_dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ordertrail"))
            .args(["rebuild", "--config", file.to_str().unwrap()])
            .env_remove("ORDERTRAIL_CONFIG")
            .env("ORDERTRAIL_DATA_DIR", data_dir)
            .output()
            .unwrap()
    };
    let elsewhere = tempfile::tempdir().unwrap();
    let refused = rebuild(elsewhere.path());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("stop every node"), "{stderr}");
    server.store.remember("allowlist/ipblock.example", b"remembered".to_vec()).await.unwrap();
    let dir = server.stop().await;
    let rebuilt = rebuild(dir.path());
    let stderr = String::from_utf8_lossy(&rebuilt.stderr);
    assert!(rebuilt.status.success(), "{stderr}");
    assert!(stderr.contains("2 applied, 0 quarantined") && stderr.contains("ordertrail_before_rebuild_"), "{stderr}");
    let kept = "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'ordertrail_before_rebuild_%'";
    assert_eq!(cluster.psql("ordertrail", kept), "1", "the old tables are kept");
    let server = crate::common::TestServer::start_in(dir, &taught).await;
    assert!(server.quarantine().await.is_empty(), "the stock-order delivery is applied now");
    assert_eq!(server.all_events().await.len(), 2);
    let remembered = server.store.remembered().await.unwrap();
    assert_eq!(remembered, [("allowlist/ipblock.example".into(), b"remembered".to_vec())], "carried over");
    server.stop().await;
}

/// Three nodes, one order: its documented lifecycle posted to the nodes in
/// turn. After each 2xx the next node already serves the new state, and at
/// the end every node shows the same order and the same log, which a
/// subscriber on the third node received gap-free, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lifecycle_posted_across_three_nodes_reads_the_same_from_each() {
    use ordertrail::proto::get_order_request::Reference;
    use ordertrail::proto::subscribe_response::Message;
    use ordertrail::proto::{GetOrderRequest, SubscribeRequest};
    let cluster = PostgresCluster::start();
    let config = node_config(&cluster.url(), "");
    let nodes = [
        crate::common::TestServer::start_with(&config).await,
        crate::common::TestServer::start_with(&config).await,
        crate::common::TestServer::start_with(&config).await,
    ];
    let request = SubscribeRequest { after_sequence: Some(0), ..Default::default() };
    let mut stream = nodes[2].grpc().await.subscribe(request).await.unwrap().into_inner();
    let order =
        || GetOrderRequest { reference: Some(Reference::ExternalOrderId("WBTEST22".into())), source: String::new() };
    let steps = ["order-creation", "order-update", "shipment-created", "shipment-update"];
    for (i, step) in steps.iter().enumerate() {
        let body = crate::common::fixture(&format!("ordermesh/{step}.json"));
        let answer = nodes[i % 3].post_json("/webhooks/ordermesh", body).await;
        assert_eq!(answer.status, 200, "{step}: {}", answer.json);
        let head = answer.json["sequences"].as_array().unwrap().last().unwrap().as_u64().unwrap();
        let next = &nodes[(i + 1) % 3];
        let served = next.grpc().await.get_order(order()).await.unwrap().into_inner();
        let history =
            next.grpc().await.list_events(ordertrail::proto::ListEventsRequest::default()).await.unwrap().into_inner();
        assert_eq!(history.head_sequence, head, "{step}: the next node's log reaches what was answered");
        assert_eq!(served.shipments.is_empty(), i < 2, "{step}: the next node serves the new state: {served:?}");
    }
    let expected = nodes[0].grpc().await.get_order(order()).await.unwrap().into_inner();
    let log = nodes[0].all_events().await;
    for node in &nodes[1..] {
        assert_eq!(node.grpc().await.get_order(order()).await.unwrap().into_inner(), expected);
        assert_eq!(node.all_events().await, log);
    }
    assert!(!expected.shipments.is_empty(), "the shipment arrived: {expected:?}");
    let mut received = Vec::new();
    while received.len() < log.len() {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message()).await;
        if let Some(Message::Event(event)) = next.expect("the stream stalled").unwrap().unwrap().message {
            received.push(event);
        }
    }
    assert_eq!(received, log, "the third node's subscriber got every node's events, in order");
    for node in nodes {
        node.stop().await;
    }
}

/// A node's data dir (hand-over socket, durability mark) is its own on
/// PostgreSQL too, as sled's lock makes it on sled: a second process on it
/// is refused with one line naming it. `export` reads from PostgreSQL.
#[tokio::test]
async fn a_second_process_on_a_nodes_data_dir_is_refused() {
    let cluster = PostgresCluster::start();
    let url = cluster.url();
    let config = node_config(&url, "");
    let server = crate::common::TestServer::start_with(&config).await;
    let body = crate::common::fixture("ordermesh/order-creation.json");
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    let out = server.dir.path().join("export.ndjson");
    let export = |data_dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ordertrail"))
            .args(["export", "--out", out.to_str().unwrap()])
            .env_remove("ORDERTRAIL_CONFIG")
            .env("ORDERTRAIL_DATA_DIR", data_dir)
            .env("ORDERTRAIL_STORE_BACKEND", "postgres")
            .env("ORDERTRAIL_POSTGRES_URL", &url)
            .output()
            .unwrap()
    };
    let output = export(server.dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a second process used the data dir: {stderr}");
    assert!(stderr.contains("in use by another ordertrail process"), "{stderr}");
    let dir = server.stop().await;
    // Once the node is gone, the data dir is free, and the export reads
    // what PostgreSQL holds.
    let output = export(dir.path());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1, "the one delivery exported");
}
