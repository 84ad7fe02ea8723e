//! The kill -9 harness: the real binary under an open-loop load of unique,
//! authenticated webhooks of all three providers is SIGKILLed at random
//! moments (sometimes during start-up) and restarted on the same data dir.
//! Afterwards every acknowledged delivery must be there, byte for byte, with
//! its events once each and the sequence gap-free, and the database must
//! always reopen.
//!
//! The negative control runs the same harness with acknowledgements moved
//! before the write and the flush and must find losses: proof the harness
//! can see them. (Acknowledging after sled's write but before the flush is
//! not enough: sled hands each batch to the OS at once, and a killed
//! process, unlike a lost machine, leaves the OS's copy intact.)

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ordertrail::proto::admin_client::AdminClient;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::{GetDeliveryRequest, ListEventsRequest};
use ordertrail::testing::{PostgresCluster, free_addr};

const BIN: &str = env!("CARGO_BIN_EXE_ordertrail");
const HMAC_KEY: &str = "crash-harness-hmac-key-0123456789";
const API_KEY: &str = "crash-harness-api-key";
/// Most requests in flight at once.
const IN_FLIGHT: usize = 64;
/// The open-loop send rate: one new webhook per interval.
const SEND_INTERVAL: Duration = Duration::from_micros(500);

/// One delivery the harness sent and what became of it.
#[derive(Clone, Debug)]
struct Sent {
    body: Vec<u8>,
    /// `Some((raw_id, sequences))` when answered 2xx.
    acked: Option<(u64, Vec<u64>)>,
}

/// One `ordertrail` process of the harness: its addresses and data dir.
struct Node {
    http: SocketAddr,
    grpc: SocketAddr,
    data_dir: std::path::PathBuf,
}

struct Harness {
    dir: tempfile::TempDir,
    /// The first node's gRPC address (the only node on sled).
    grpc: SocketAddr,
    nodes: Vec<Node>,
    config: std::path::PathBuf,
    log: Arc<Mutex<Vec<Sent>>>,
    counter: Arc<Mutex<usize>>,
    seed: u64,
}

impl Harness {
    fn new(unsafe_ack: bool) -> Self {
        Self::with(unsafe_ack, 1, "")
    }

    /// `nodes` processes sharing the store that `store` configures (extra
    /// `[store]` keys; none: sled, where only one node makes sense).
    fn with(unsafe_ack: bool, nodes: usize, store: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ordertrail.toml");
        let mut file = std::fs::File::create(&config).unwrap();
        write!(
            file,
            "[store]\nunsafe_ack_before_durable = {unsafe_ack}\n{store}\n\
             [[sources]]\nname = \"ordermesh\"\nprovider = \"ordermesh\"\nauth = {{ scheme = \"hmac\", header = \"x-signature\", secrets = [\"{HMAC_KEY}\"] }}\n\
             [[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\nauth = {{ scheme = \"header\", header = \"x-api-key\", secrets = [\"{API_KEY}\"] }}\n\
             [[sources]]\nname = \"withings\"\nprovider = \"withings\"\nauth = {{ scheme = \"ip_allowlist\", allow = [\"127.0.0.0/8\"] }}\n",
        )
        .unwrap();
        let nodes: Vec<Node> = (0..nodes)
            .map(|i| Node { http: free_addr(), grpc: free_addr(), data_dir: dir.path().join(format!("data{i}")) })
            .collect();
        Self {
            grpc: nodes[0].grpc,
            nodes,
            dir,
            config,
            log: Arc::default(),
            counter: Arc::default(),
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn random(&mut self, below: u64) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed % below
    }

    fn spawn(&self) -> Child {
        self.spawn_node(0)
    }

    /// Where node `node` writes its log (the last start's).
    fn stderr_of(&self, node: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("node{node}.log"))
    }

    fn spawn_node(&self, node: usize) -> Child {
        let log = self.stderr_of(node);
        let node = &self.nodes[node];
        Command::new(BIN)
            .args(["--config", self.config.to_str().unwrap()])
            .env("ORDERTRAIL_DATA_DIR", &node.data_dir)
            .env("ORDERTRAIL_HTTP_ADDR", node.http.to_string())
            .env("ORDERTRAIL_GRPC_ADDR", node.grpc.to_string())
            .env("ORDERTRAIL_ADMIN_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start ordertrail")
    }

    /// Starts the server and waits until it is ready; the database must
    /// always reopen.
    async fn start(&self) -> Child {
        self.start_node(0).await
    }

    async fn start_node(&self, node: usize) -> Child {
        let mut child = self.spawn_node(node);
        let http = self.nodes[node].http;
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.stderr_of(node)).unwrap_or_default();
                panic!("the server exited on start-up ({status}): the database did not reopen:\n{log}");
            }
            let uri = format!("http://{http}/readyz");
            if let Ok(Ok(response)) =
                tokio::time::timeout(Duration::from_secs(1), client.get(uri.parse().unwrap())).await
                && response.status() == 200
            {
                return child;
            }
            assert!(tokio::time::Instant::now() < deadline, "the server never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Open loop: starts a new unique webhook every `SEND_INTERVAL`, whether
    /// or not earlier ones were answered (up to `IN_FLIGHT` outstanding),
    /// until `stop`; records every outcome.
    async fn load(&self, stop: tokio_util::sync::CancellationToken) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut in_flight = tokio::task::JoinSet::new();
        let mut ticker = tokio::time::interval(SEND_INTERVAL);
        while !stop.is_cancelled() {
            ticker.tick().await;
            while in_flight.try_join_next().is_some() {}
            if in_flight.len() >= IN_FLIGHT {
                continue;
            }
            let n = {
                let mut c = self.counter.lock().unwrap();
                *c += 1;
                *c
            };
            let (client, log) = (client.clone(), self.log.clone());
            let (request, body) = webhook(n, self.nodes[n % self.nodes.len()].http);
            in_flight.spawn(async move {
                let answer = tokio::time::timeout(Duration::from_secs(10), async {
                    let response = client.request(request).await.ok()?;
                    let status = response.status();
                    let bytes = response.into_body().collect().await.ok()?.to_bytes();
                    Some((status, bytes))
                })
                .await
                .ok()
                .flatten();
                let acked = answer.filter(|(status, _)| status.is_success()).map(|(_, bytes)| {
                    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    assert_ne!(json["outcome"], "duplicate", "unique deliveries cannot be duplicates");
                    let sequences = json["sequences"]
                        .as_array()
                        .map_or_else(Vec::new, |a| a.iter().map(|s| s.as_u64().unwrap()).collect());
                    (json["raw_id"].as_u64().unwrap(), sequences)
                });
                log.lock().unwrap().push(Sent { body, acked });
            });
        }
        in_flight.join_all().await;
    }

    /// Runs `cycles` kill cycles; returns the verification of the final state.
    async fn run(&mut self, cycles: usize) -> Verdict {
        for cycle in 0..cycles {
            if cycle % 5 == 4 {
                // Killed during start-up or recovery.
                let mut child = self.spawn();
                tokio::time::sleep(Duration::from_millis(self.random(60))).await;
                child.kill().unwrap();
                child.wait().unwrap();
            }
            let mut child = self.start().await;
            let stop = tokio_util::sync::CancellationToken::new();
            let load = {
                let stop = stop.clone();
                let this: &Self = self;
                async move { this.load(stop).await }
            };
            let killer = async {
                tokio::time::sleep(Duration::from_millis(150 + self.seed % 400)).await;
                child.kill().unwrap();
                child.wait().unwrap();
                stop.cancel();
            };
            tokio::join!(load, killer);
            self.random(1);
        }
        let mut child = self.start().await;
        let verdict = self.verify().await;
        child.kill().unwrap();
        child.wait().unwrap();
        verdict
    }

    /// Runs `cycles` kill cycles on a cluster: all nodes serve, and each
    /// cycle one node, chosen at random, is killed under load and started
    /// again while the others go on. Then every node must show the same
    /// dense event log, and nothing acknowledged may be missing.
    async fn run_cluster(&mut self, cycles: usize) -> Verdict {
        let mut children = Vec::new();
        for node in 0..self.nodes.len() {
            children.push(self.start_node(node).await);
        }
        for cycle in 0..cycles {
            let victim = self.random(self.nodes.len() as u64) as usize;
            let stop = tokio_util::sync::CancellationToken::new();
            let load = {
                let stop = stop.clone();
                let this: &Self = self;
                async move { this.load(stop).await }
            };
            let pause = 150 + self.seed % 400;
            let child = &mut children[victim];
            let killer = async {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                child.kill().unwrap();
                child.wait().unwrap();
                stop.cancel();
            };
            tokio::join!(load, killer);
            if cycle % 5 == 4 {
                // Killed during start-up.
                let mut starting = self.spawn_node(victim);
                tokio::time::sleep(Duration::from_millis(self.random(60))).await;
                starting.kill().unwrap();
                starting.wait().unwrap();
            }
            children[victim] = self.start_node(victim).await;
        }
        let mut verdict = self.verify().await;
        let first = events_on(self.nodes[0].grpc).await;
        for node in &self.nodes[1..] {
            if events_on(node.grpc).await != first {
                verdict.problems.push(format!("node {} shows another event log", node.grpc));
            }
        }
        for mut child in children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        verdict
    }

    /// Runs the nodes on `primary` and its `standby` (a multi-host URL in
    /// the config) under load: replication stalls for a moment (the
    /// primary's WAL senders are stopped), the primary's host is lost (every process of it SIGKILLed),
    /// the standby is promoted, and the load goes on until the nodes have
    /// acknowledged `after` more deliveries on it (or a minute passed).
    /// Returns how many were acknowledged after the promotion.
    async fn run_failover(&self, primary: &PostgresCluster, standby: &PostgresCluster, after: usize) -> usize {
        let mut children = Vec::new();
        for node in 0..self.nodes.len() {
            children.push(self.start_node(node).await);
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let acked = || self.log.lock().unwrap().iter().filter(|sent| sent.acked.is_some()).count();
        let failover = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            primary.pause_replication();
            tokio::time::sleep(Duration::from_millis(300)).await;
            primary.crash();
            tokio::task::block_in_place(|| standby.promote());
            let promoted = acked();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while acked() < promoted + after && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
            promoted
        };
        let (promoted, ()) = tokio::join!(failover, self.load(stop.clone()));
        for mut child in children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        acked() - promoted
    }

    /// Runs every node under load for `duration` while a reader tails the
    /// event table at `url` the naive way (`sequence > position`, moving
    /// to the highest it saw). Returns how many deliveries were
    /// acknowledged and the sequences that reader skipped: those that
    /// became visible only after a higher one.
    async fn run_with_tailer(&self, url: &str, duration: Duration) -> (usize, Vec<i64>) {
        let mut children = Vec::new();
        for node in 0..self.nodes.len() {
            children.push(self.start_node(node).await);
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let stopper = async {
            tokio::time::sleep(duration).await;
            stop.cancel();
        };
        let ((), skipped, ()) = tokio::join!(self.load(stop.clone()), tail_naively(url, stop.clone()), stopper);
        for mut child in children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let acked = self.log.lock().unwrap().iter().filter(|sent| sent.acked.is_some()).count();
        (acked, skipped)
    }

    /// Checks the final state through the gRPC API and the raw store.
    async fn verify(&self) -> Verdict {
        let mut admin = AdminClient::connect(format!("http://{}", self.grpc)).await.unwrap();
        let mut api = OrderTrailClient::connect(format!("http://{}", self.grpc)).await.unwrap();
        let log = self.log.lock().unwrap().clone();
        let mut verdict = Verdict { acked: 0, missing: 0, problems: Vec::new() };
        // Every event, through the paged API.
        let mut events = Vec::new();
        let mut token = String::new();
        loop {
            let request = ListEventsRequest { page_size: 1000, page_token: token.clone(), ..Default::default() };
            let page = api.list_events(request).await.unwrap().into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let sequences: Vec<u64> = events.iter().map(|e| e.sequence).collect();
        if sequences != (1..=sequences.len() as u64).collect::<Vec<_>>() {
            verdict.problems.push("the event sequence has a gap or a repeat".into());
        }
        let mut by_raw: HashMap<u64, Vec<u64>> = HashMap::new();
        for event in &events {
            by_raw.entry(event.provenance.as_ref().unwrap().raw_id).or_default().push(event.sequence);
        }
        let mut bodies = HashSet::new();
        for sent in log.iter() {
            let Some((raw_id, answered)) = &sent.acked else { continue };
            verdict.acked += 1;
            match admin.get_delivery(GetDeliveryRequest { raw_id: *raw_id }).await {
                Ok(raw) if raw.get_ref().body == sent.body => {
                    let stored = by_raw.get(raw_id).cloned().unwrap_or_default();
                    if &stored != answered {
                        verdict.problems.push(format!("raw {raw_id}: events {stored:?}, answered {answered:?}"));
                    }
                }
                Ok(_) => {
                    verdict.missing += 1;
                    verdict.problems.push(format!("raw {raw_id} holds other bytes than were acknowledged"));
                }
                Err(_) => verdict.missing += 1,
            }
            if !bodies.insert(&sent.body) {
                verdict.problems.push("the same delivery was acknowledged twice".into());
            }
        }
        verdict
    }
}

/// Reads the event table as a naive reader does until `stop`: everything
/// above its position, then the highest sequence it saw is its position.
/// Returns the sequences below its final position it never saw: the ones
/// it skipped.
async fn tail_naively(url: &str, stop: tokio_util::sync::CancellationToken) -> Vec<i64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let (mut position, mut seen) = (0_i64, HashSet::new());
    let above = "SELECT sequence FROM ot_events WHERE sequence > $1 ORDER BY sequence";
    loop {
        let last_look = stop.is_cancelled();
        for row in client.query(above, &[&position]).await.unwrap() {
            let sequence: i64 = row.get(0);
            seen.insert(sequence);
            position = position.max(sequence);
        }
        if last_look {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Below its final position, everything committed by now must have been
    // seen (above it, batches may still have committed after the last look).
    let below = "SELECT sequence FROM ot_events WHERE sequence <= $1 ORDER BY sequence";
    let all = client.query(below, &[&position]).await.unwrap();
    all.iter().map(|row| row.get::<_, i64>(0)).filter(|sequence| !seen.contains(sequence)).collect()
}

/// Every event a node lists: (sequence, raw id).
async fn events_on(grpc: SocketAddr) -> Vec<(u64, u64)> {
    let mut api = OrderTrailClient::connect(format!("http://{grpc}")).await.unwrap();
    let (mut events, mut token) = (Vec::new(), String::new());
    loop {
        let request = ListEventsRequest { page_size: 1000, page_token: token.clone(), ..Default::default() };
        let page = api.list_events(request).await.unwrap().into_inner();
        events.extend(page.events.iter().map(|e| (e.sequence, e.provenance.as_ref().map_or(0, |p| p.raw_id))));
        if page.next_page_token.is_empty() {
            return events;
        }
        token = page.next_page_token;
    }
}

#[derive(Debug)]
struct Verdict {
    acked: usize,
    missing: usize,
    problems: Vec<String>,
}

/// The `n`th unique webhook, rotating through the providers.
fn webhook(n: usize, http: SocketAddr) -> (hyper::Request<Full<Bytes>>, Vec<u8>) {
    let (path, content_type, body, auth): (&str, &str, String, Option<(&str, String)>) = match n % 3 {
        0 => {
            let body = format!(
                r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"om-{n}","ExternalOrderId":"EXT-{n}","SafeId":"S-{n}"}}"#
            );
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HMAC_KEY.as_bytes()).unwrap();
            mac.update(body.as_bytes());
            let signature = hex::encode(mac.finalize().into_bytes());
            ("/webhooks/ordermesh", "application/json", body, Some(("x-signature", signature)))
        }
        1 => {
            let body = format!(
                r#"{{"increment_id":"S{n:09}","order_increment_id":"O{n:09}","po_number":"PO-{n}","status":"IN_TRANSIT","updated_at":"2024-02-20 15:31:54","track":{{"tracking_number":"1Z{n}","carrier":"ups"}}}}"#
            );
            ("/webhooks/winkelstraat/shipment", "application/json", body, Some(("x-api-key", API_KEY.to_string())))
        }
        _ => {
            let body =
                format!("customer_id=1&customer_ref=W-{n}&status=OPEN&parcel_status=in_transit&tracking_number=T{n}");
            ("/webhooks/withings", "application/x-www-form-urlencoded", body, None)
        }
    };
    let mut builder = hyper::Request::post(format!("http://{http}{path}")).header("content-type", content_type);
    if let Some((name, value)) = auth {
        builder = builder.header(name, value);
    }
    (builder.body(Full::new(Bytes::from(body.clone()))).unwrap(), body.into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_an_acknowledged_webhook() {
    let mut harness = Harness::new(false);
    let verdict = harness.run(20).await;
    assert!(verdict.acked > 100, "too little load to mean anything: {verdict:?}");
    assert_eq!(verdict.missing, 0, "acknowledged deliveries lost: {verdict:?}");
    assert!(verdict.problems.is_empty(), "{:#?}", verdict.problems);
    drop(harness.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_the_harness_sees_losses_when_acks_precede_the_flush() {
    let mut harness = Harness::new(true);
    let mut total = 0;
    for round in 0..10 {
        let verdict = harness.run(5).await;
        total = verdict.missing;
        eprintln!("negative control round {round}: {verdict:?}");
        if total > 0 {
            break;
        }
    }
    assert!(total > 0, "acknowledging before the flush lost nothing the harness could see");
}

/// Three nodes on one PostgreSQL database, a random one killed each cycle
/// under load spread over all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_random_nodes_on_postgres_never_loses_an_acknowledged_webhook() {
    let cluster = ordertrail::testing::PostgresCluster::start();
    let store = format!("backend = \"postgres\"\n[store.postgres]\nurl = \"{}\"", cluster.url());
    let mut harness = Harness::with(false, 3, &store);
    let verdict = harness.run_cluster(20).await;
    assert!(verdict.acked > 100, "too little load to mean anything: {verdict:?}");
    assert_eq!(verdict.missing, 0, "acknowledged deliveries lost: {verdict:?}");
    assert!(verdict.problems.is_empty(), "{:#?}", verdict.problems);
}

/// The cluster harness sees losses when answers come before COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_the_cluster_harness_sees_losses_when_acks_precede_the_commit() {
    let cluster = ordertrail::testing::PostgresCluster::start();
    let store = format!("backend = \"postgres\"\n[store.postgres]\nurl = \"{}\"", cluster.url());
    let mut harness = Harness::with(true, 3, &store);
    let mut missing = 0;
    for round in 0..10 {
        let verdict = harness.run_cluster(5).await;
        eprintln!("cluster negative control round {round}: {verdict:?}");
        missing = verdict.missing;
        if missing > 0 {
            break;
        }
    }
    assert!(missing > 0, "acknowledging before COMMIT lost nothing the harness could see");
}

/// The config of nodes that follow a failover between `primary` and
/// `standby`.
fn failover_store(primary: &PostgresCluster, standby: &PostgresCluster) -> String {
    format!(
        "backend = \"postgres\"\n[store.postgres]\nconnect_timeout_ms = 1000\n\
         url = \"postgres://ordertrail@127.0.0.1:{},127.0.0.1:{}/ordertrail?target_session_attrs=read-write\"",
        primary.port, standby.port
    )
}

/// A primary with a synchronous standby is lost under load; the standby is
/// promoted and the nodes carry on against it without a restart. Every
/// acknowledged delivery is on the new primary and the sequence is dense:
/// a COMMIT returned only once the standby had it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let primary = PostgresCluster::start();
    let standby = PostgresCluster::standby_of(&primary, "standby");
    primary.make_synchronous("standby");
    let harness = Harness::with(false, 3, &failover_store(&primary, &standby));
    let after = harness.run_failover(&primary, &standby, 200).await;
    assert!(after >= 200, "the nodes did not carry on against the new primary: {after} acknowledged after it");
    let mut node = harness.start_node(0).await;
    let verdict = harness.verify().await;
    node.kill().unwrap();
    node.wait().unwrap();
    eprintln!("failover to a synchronous standby: {verdict:?}, {after} acknowledged after the promotion");
    assert!(verdict.acked > 400, "too little load to mean anything: {verdict:?}");
    assert_eq!(verdict.missing, 0, "acknowledged deliveries lost in the failover: {verdict:?}");
    assert!(verdict.problems.is_empty(), "{:#?}", verdict.problems);
}

/// What the README warns about, shown: the same failover to an
/// *asynchronous* standby loses what the primary acknowledged while the
/// standby was behind, and the new primary hands those sequences to other
/// deliveries: the harness finds the losses through a fresh node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_an_asynchronous_standby_loses_acknowledged_deliveries() {
    let primary = PostgresCluster::start();
    let standby = PostgresCluster::standby_of(&primary, "standby");
    let harness = Harness::with(false, 3, &failover_store(&primary, &standby));
    harness.run_failover(&primary, &standby, 0).await;
    // A node without the others' durability marks serves the new primary.
    std::fs::remove_dir_all(&harness.nodes[0].data_dir).unwrap();
    let mut node = harness.start_node(0).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    };
    tokio::join!(harness.load(stop.clone()), stopper);
    let verdict = harness.verify().await;
    node.kill().unwrap();
    node.wait().unwrap();
    eprintln!("failover to an asynchronous standby: {verdict:?}");
    assert!(verdict.missing > 0, "an asynchronous standby lost nothing the harness could see: {verdict:?}");
}

/// Sequences become visible in order across nodes: a reader that only
/// ever reads `sequence > position` misses nothing while three nodes
/// ingest at once (each batch holds the counter row to COMMIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_sequences_above_its_position_never_skips_an_event() {
    let cluster = PostgresCluster::start();
    let store = format!("backend = \"postgres\"\n[store.postgres]\nurl = \"{}\"", cluster.url());
    let harness = Harness::with(false, 3, &store);
    let (acked, skipped) = harness.run_with_tailer(&cluster.url(), Duration::from_secs(3)).await;
    assert!(acked > 500, "too little load to mean anything: {acked} acknowledged");
    assert!(skipped.is_empty(), "a reader skipped {} of {acked}: {skipped:?}", skipped.len());
}

/// The negative control: numbers handed out outside the counter row's
/// lock (as `bigserial` does) let batches commit out of order, and the
/// naive reader skips events; the harness sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_numbering_outside_the_lock_makes_a_reader_skip_events() {
    let cluster = PostgresCluster::start();
    let store = format!(
        "backend = \"postgres\"\n[store.postgres]\nurl = \"{}\"\nunsafe_sequence_outside_lock = true",
        cluster.url()
    );
    let harness = Harness::with(false, 3, &store);
    let mut skipped = Vec::new();
    for round in 0..5 {
        let (acked, missed) = harness.run_with_tailer(&cluster.url(), Duration::from_secs(3)).await;
        eprintln!("sequencing negative control round {round}: {acked} acknowledged, {} skipped", missed.len());
        skipped = missed;
        if !skipped.is_empty() {
            break;
        }
    }
    assert!(!skipped.is_empty(), "numbering outside the lock made no reader skip an event");
}
