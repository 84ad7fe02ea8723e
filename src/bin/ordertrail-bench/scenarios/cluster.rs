//! `cluster`: ordertrail on PostgreSQL, one node and three, against what
//! the database itself can take and against what most teams write by hand,
//! all on one private PostgreSQL cluster started for the run (fsync and
//! synchronous commit on), each measurement on a fresh database.
//!
//! - *PostgreSQL ceiling*: one connection inserting exactly the rows a new
//!   order costs ordertrail (raw record, event, order, three index entries,
//!   a dedup entry; the value sizes of a real store), with the same reads
//!   under the same counter-row lock, the same notification and the same
//!   driver, `connections` deliveries per transaction: the most a node's
//!   batches could ever reach. No HTTP, no mapping.
//! - *hand-written receiver*: a hyper server that INSERTs each request
//!   (path, headers, body) into one table and COMMITs, on a pool of 16
//!   connections: durable too, but no dedup, no sequence, no state.
//! - ordertrail with 1 and with 3 nodes (the load spread over the nodes),
//!   and ordertrail on sled in the same run for comparison.
//!
//! Server CPU counts the bench process (ordertrail, or the receiver), not
//! PostgreSQL's processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use ordertrail::testing::PostgresCluster;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::Args;
use crate::load::closed_loop_over;
use crate::measure::{Sample, sample};
use crate::report::{header, median, row};
use crate::servers::{Mode, Subject, fresh_dir, loopback, serve_http, server_runtime, start_ordertrail};

/// Connections of the hand-written receiver's pool.
const RECEIVER_POOL: usize = 16;

pub(crate) async fn cluster(args: &Args) {
    let seconds = Duration::from_secs(args.seconds.max(1));
    let postgres = tokio::task::spawn_blocking(PostgresCluster::start).await.expect("start PostgreSQL");
    let mut databases = 0;
    let mut fresh_database = || {
        databases += 1;
        let cluster = &postgres;
        cluster.create_database(&format!("bench_{databases}"))
    };
    println!("One private PostgreSQL 15 cluster on loopback (fsync on, synchronous_commit on).\n");
    header("connections");
    for &connections in &args.connections {
        let mut measured: [Vec<Sample>; 5] = Default::default();
        for _ in 0..args.rounds.max(1) {
            measured[0].push(ceiling(&fresh_database(), connections, seconds).await);
            measured[1].push(hand_written(&fresh_database(), connections, seconds).await);
            for (slot, nodes) in [(2, 1), (3, 3)] {
                measured[slot].push(ordertrail_nodes(&fresh_database(), nodes, connections, seconds, args).await);
            }
            let dir = fresh_dir();
            let (sled, _) = start_ordertrail(&dir, Mode::Fsync, "", &args.settings()).await;
            measured[4].push(closed_loop_over(&[sled.http], connections, seconds).await);
            sled.stop().await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        let base = median(&measured[0], |s| s.per_second).0;
        let point = connections.to_string();
        let names = [
            "PostgreSQL ceiling (baseline)",
            "hand-written receiver (INSERT + COMMIT per request)",
            "ordertrail, 1 node on PostgreSQL",
            "ordertrail, 3 nodes on PostgreSQL",
            "ordertrail on sled (fsync), for comparison",
        ];
        for (name, samples) in names.iter().zip(&measured) {
            row(name, &point, samples, base);
        }
        let rate = |i: usize| median(&measured[i], |s| s.per_second).0;
        println!(
            "\nAt {connections} connections: 1 node ÷ ceiling {:.2}, 1 node ÷ hand-written {:.2}, 3 nodes ÷ 1 node {:.2}, \
             PostgreSQL 1 node ÷ sled {:.2}\n",
            rate(2) / base,
            rate(2) / rate(1),
            rate(3) / rate(2),
            rate(2) / rate(4)
        );
    }
}

/// `nodes` ordertrail nodes on the database at `url`, loaded together.
async fn ordertrail_nodes(url: &str, nodes: usize, connections: usize, seconds: Duration, args: &Args) -> Sample {
    let store = format!("backend = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n");
    let mut running: Vec<(Subject, std::path::PathBuf)> = Vec::new();
    for _ in 0..nodes {
        let dir = fresh_dir();
        let (node, _) = start_ordertrail(&dir, Mode::Fsync, &store, &args.settings()).await;
        running.push((node, dir));
    }
    let addresses: Vec<SocketAddr> = running.iter().map(|(node, _)| node.http).collect();
    let sample = closed_loop_over(&addresses, connections, seconds).await;
    for (node, dir) in running {
        node.stop().await;
        let _ = std::fs::remove_dir_all(dir);
    }
    sample
}

/// The rows of one new order, with the value sizes of a real store.
struct Rows {
    raw: Vec<u8>,
    event: Vec<u8>,
    order: Vec<u8>,
}

/// The PostgreSQL ceiling: ordertrail's statements for a batch of
/// `batch` new orders, from one connection, back to back.
async fn ceiling(url: &str, batch: usize, seconds: Duration) -> Sample {
    let config: ordertrail::config::PostgresConfig = postgres_config(url);
    ordertrail::store::postgres::prepare(&config).await.expect("create the schema");
    let (mut client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    let rows = Rows { raw: vec![7; 947], event: vec![8; 365], order: vec![9; 263] };
    let (mut latencies, mut n) = (Vec::new(), 0_i64);
    let started = Instant::now();
    while started.elapsed() < seconds {
        let begun = Instant::now();
        ceiling_batch(&mut client, &rows, n, batch as i64).await;
        n += batch as i64;
        latencies.extend(std::iter::repeat_n(begun.elapsed(), batch));
    }
    sample(latencies, 0, started.elapsed(), Duration::ZERO)
}

/// One batch of the ceiling: deliveries `from + 1 ..= from + count`.
async fn ceiling_batch(client: &mut tokio_postgres::Client, rows: &Rows, from: i64, count: i64) {
    let ids: Vec<i64> = (from + 1..=from + count).collect();
    let text = |prefix: &str| ids.iter().map(|id| format!("{prefix}{id:020}")).collect::<Vec<String>>();
    let (keys, sources) = (text("ordermesh:"), vec!["ordermesh"; ids.len()]);
    let references: Vec<String> = ["O", "S", "E"].iter().flat_map(|p| text(p)).collect();
    let (kinds, ref_sources): (Vec<i16>, Vec<&str>) =
        (1..=3).flat_map(|kind| std::iter::repeat_n((kind, "ordermesh"), ids.len())).unzip();
    let ref_ids: Vec<i64> = (0..3).flat_map(|_| ids.iter().copied()).collect();
    let tx = client.transaction().await.expect("begin");
    tx.query_one("SELECT last_sequence, last_raw, last_order FROM ot_counters WHERE id = 1 FOR UPDATE", &[])
        .await
        .expect("counters");
    tx.query(
        "SELECT d.raw_id FROM ot_dedup d JOIN unnest($1::text[], $2::text[]) AS w(source, key) USING (source, key)",
        &[&sources, &keys],
    )
    .await
    .expect("dedup read");
    tx.query(
        "SELECT i.order_id FROM ot_index i
         JOIN unnest($1::int2[], $2::text[], $3::text[]) AS w(kind, value, source) USING (kind, value, source)",
        &[&kinds, &references, &ref_sources],
    )
    .await
    .expect("index read");
    let n = ids.len();
    for (sql, body) in [
        ("INSERT INTO ot_raw (id, record) SELECT * FROM unnest($1::int8[], $2::bytea[])", vec![&rows.raw[..]; n]),
        ("INSERT INTO ot_events SELECT * FROM unnest($1::int8[], $2::bytea[])", vec![&rows.event[..]; n]),
        ("INSERT INTO ot_orders SELECT * FROM unnest($1::int8[], $2::bytea[])", vec![&rows.order[..]; n]),
    ] {
        tx.execute(sql, &[&ids, &body]).await.expect("insert");
    }
    tx.execute(
        "INSERT INTO ot_index SELECT * FROM unnest($1::int2[], $2::text[], $3::text[], $4::int8[])",
        &[&kinds, &references, &ref_sources, &ref_ids],
    )
    .await
    .expect("index");
    let outcomes = vec![1_i16; ids.len()];
    tx.execute(
        "INSERT INTO ot_dedup SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int2[])",
        &[&sources, &keys, &ids, &outcomes],
    )
    .await
    .expect("dedup");
    let last = from + count;
    tx.execute("UPDATE ot_counters SET last_sequence = $1, last_raw = $1, last_order = $1 WHERE id = 1", &[&last])
        .await
        .expect("counters");
    tx.execute("SELECT pg_notify('ordertrail_events', '')", &[]).await.expect("notify");
    tx.commit().await.expect("commit");
}

fn postgres_config(url: &str) -> ordertrail::config::PostgresConfig {
    let text = format!("[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"{url}\"\n");
    let config = ordertrail::config::Config::from_toml(&text, &|_| None).expect("config");
    config.store.postgres.expect("postgres config")
}

/// What most teams write: each request INSERTed and COMMITted on its own.
async fn hand_written(url: &str, connections: usize, seconds: Duration) -> Sample {
    let receiver = start_receiver(url).await;
    let sample = closed_loop_over(&[receiver.http], connections, seconds).await;
    receiver.stop().await;
    sample
}

async fn start_receiver(url: &str) -> Subject {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE webhooks (id bigserial PRIMARY KEY, received_at timestamptz NOT NULL DEFAULT now(),
                 path text NOT NULL, headers jsonb NOT NULL, body bytea NOT NULL)",
        )
        .await
        .expect("create the receiver's table");
    let listener = loopback();
    let http = listener.local_addr().expect("address");
    let stop = CancellationToken::new();
    let (token, url) = (stop.clone(), url.to_string());
    let thread = std::thread::spawn(move || {
        server_runtime().block_on(async move {
            let manager = deadpool_postgres::Manager::new(url.parse().expect("url"), NoTls);
            let pool = deadpool_postgres::Pool::builder(manager).max_size(RECEIVER_POOL).build().expect("pool");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let pool = Arc::new(pool);
            serve_http(listener, token, move |request| {
                let pool = pool.clone();
                async move {
                    let status = match receive(&pool, request).await {
                        Ok(()) => hyper::StatusCode::OK,
                        Err(()) => hyper::StatusCode::SERVICE_UNAVAILABLE,
                    };
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                    *response.status_mut() = status;
                    response
                }
            })
            .await;
        });
    });
    Subject { http, grpc: http, admin: http, stop, thread }
}

/// One request stored: path, headers as JSON, body; one INSERT, committed.
async fn receive(pool: &deadpool_postgres::Pool, request: hyper::Request<hyper::body::Incoming>) -> Result<(), ()> {
    let path = request.uri().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into()))
        .collect();
    let body = request.into_body().collect().await.map_err(drop)?.to_bytes();
    let client = pool.get().await.map_err(drop)?;
    client
        .execute(
            "INSERT INTO webhooks (path, headers, body) VALUES ($1, $2::text::jsonb, $3)",
            &[&path, &serde_json::Value::Object(headers).to_string(), &body.as_ref()],
        )
        .await
        .map_err(drop)?;
    Ok(())
}
