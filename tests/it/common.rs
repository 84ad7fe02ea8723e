//! Test harness: starts the real server on ephemeral loopback ports with a
//! temporary data dir, and talks to it with a real HTTP client and a real
//! gRPC client.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ordertrail::config::Config;
use ordertrail::proto::admin_client::AdminClient;
use ordertrail::proto::order_trail_client::OrderTrailClient;
use ordertrail::proto::{Event, ListEventsRequest, ListQuarantinedRequest, RawDelivery};
use ordertrail::server::{self, Listeners};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A documented example payload from `tests/fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("fixture {}: {e}", full.display()))
}

/// The engine a test binary runs the behaviour tests on: `it` on sled,
/// `on_postgres` the same modules on PostgreSQL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Engine {
    Sled,
    Postgres,
}

/// On [`Engine::Postgres`], each data dir gets its own database (kept for
/// restarts on the same dir) in one private cluster per test binary; the
/// database of a data dir that is gone is dropped, and the cluster keeps
/// little WAL, so a long run does not fill the disk.
/// Returns its URL; `None` on sled, or when the test chose its store itself.
fn engine_under_test(data_dir: &Path, extra_toml: &str) -> Option<String> {
    static CLUSTER: std::sync::OnceLock<ordertrail::testing::PostgresCluster> = std::sync::OnceLock::new();
    static DATABASES: std::sync::Mutex<Vec<(std::path::PathBuf, String, String)>> = std::sync::Mutex::new(Vec::new());
    static NAMES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if crate::ENGINE != Engine::Postgres || extra_toml.contains("backend") {
        return None;
    }
    let cluster = CLUSTER
        .get_or_init(|| ordertrail::testing::PostgresCluster::start_with(&["max_wal_size=64MB", "min_wal_size=32MB"]));
    // A test that panicked while holding the list must not fail the others.
    let lock = || DATABASES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let gone: Vec<String> = {
        let mut databases = lock();
        if let Some((_, _, url)) = databases.iter().find(|(dir, _, _)| dir == data_dir) {
            return Some(url.clone());
        }
        let (kept, gone) = std::mem::take(&mut *databases).into_iter().partition(|(dir, _, _)| dir.exists());
        *databases = kept;
        gone.into_iter().map(|(_, name, _)| name).collect()
    };
    for name in gone {
        cluster.drop_database(&name);
    }
    let name = format!("behaviour_{}", NAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let url = cluster.create_database(&name);
    lock().push((data_dir.to_path_buf(), name, url.clone()));
    Some(url)
}

/// A running server.
pub struct TestServer {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: TempDir,
    /// The server's store, for fault injection.
    pub store: ordertrail::store::Store,
    extra_toml: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), server::ServerError>>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A webhook answer.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
}

/// The value of one sample line of a metrics page.
pub fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines().find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

impl TestServer {
    /// Default config: one open source per provider.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// `extra_toml` is the config; the data dir is a new temp dir.
    pub async fn start_with(extra_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, extra_toml).await
    }

    /// Starts on an existing data dir.
    pub async fn start_in(dir: TempDir, extra_toml: &str) -> Self {
        // Below the ephemeral range, so a restart finds the ports free.
        let listener = || {
            let listener = ordertrail::testing::loopback_listener();
            listener.set_nonblocking(true).unwrap();
            TcpListener::from_std(listener).unwrap()
        };
        let (http, grpc, admin) = (listener(), listener(), listener());
        Self::start_on(dir, extra_toml, Listeners { http, grpc, admin }).await
    }

    async fn start_on(dir: TempDir, extra_toml: &str, listeners: Listeners) -> Self {
        let data_dir = dir.path().display().to_string();
        let postgres = engine_under_test(dir.path(), extra_toml);
        let env = |key: &str| match key {
            "ORDERTRAIL_DATA_DIR" => Some(data_dir.clone()),
            "ORDERTRAIL_STORE_BACKEND" => postgres.as_ref().map(|_| "postgres".to_string()),
            "ORDERTRAIL_POSTGRES_URL" => postgres.clone(),
            _ => None,
        };
        let config = Config::from_toml(extra_toml, &env).expect("test config is valid");
        let http_addr = listeners.http.local_addr().unwrap();
        let grpc_addr = listeners.grpc.local_addr().unwrap();
        let admin_addr = listeners.admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let store = server::open_store(&config).await.expect("open store");
        let task = tokio::spawn(server::run_with_store(config, store.clone(), listeners, shutdown.clone()));
        Self {
            http_addr,
            grpc_addr,
            admin_addr,
            dir,
            store,
            extra_toml: extra_toml.to_string(),
            shutdown,
            task,
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Stops the server and waits until it has released the data dir.
    pub async fn stop(self) -> TempDir {
        self.shutdown.cancel();
        self.task.await.expect("server task").expect("server stopped cleanly");
        // The database is released only when its last handle is gone.
        drop(self.store);
        self.dir
    }

    /// Stops and starts again on the same data dir and the same ports, so
    /// clients can reconnect.
    pub async fn restart(self) -> Self {
        let extra = self.extra_toml.clone();
        self.restart_with(&extra).await
    }

    /// [`TestServer::restart`] with another config (say, a mapper taught
    /// a kind alias).
    pub async fn restart_with(self, extra: &str) -> Self {
        let (extra, http_addr, grpc_addr, admin_addr) =
            (extra.to_string(), self.http_addr, self.grpc_addr, self.admin_addr);
        let dir = self.stop().await;
        let http = TcpListener::bind(http_addr).await.expect("rebind http");
        let grpc = TcpListener::bind(grpc_addr).await.expect("rebind grpc");
        let admin = TcpListener::bind(admin_addr).await.expect("rebind admin");
        Self::start_on(dir, &extra, Listeners { http, grpc, admin }).await
    }

    pub async fn post(&self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Answer {
        self.request("POST", path, &[("content-type", content_type)], body.into()).await
    }

    pub async fn post_json(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        self.post(path, "application/json", body).await
    }

    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
        let mut builder = Request::builder().method(method).uri(format!("http://{}{path}", self.http_addr));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = self.http.request(builder.body(Full::new(body)).unwrap()).await.expect("HTTP request");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("HTTP body").to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer { status, headers, json }
    }

    /// A request to the admin listener (the console): status, headers and
    /// body text.
    pub async fn console(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut builder = Request::builder().method(method).uri(format!("http://{}{path}", self.admin_addr));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let response = self.http.request(request).await.expect("console request");
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = response.into_body().collect().await.expect("console body").to_bytes();
        (status, headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The admin listener's metrics page.
    pub async fn metrics(&self) -> String {
        let request = Request::get(format!("http://{}/metrics", self.admin_addr)).body(Full::default()).unwrap();
        let response = self.http.request(request).await.expect("GET /metrics");
        assert_eq!(response.status(), StatusCode::OK);
        String::from_utf8(response.into_body().collect().await.expect("metrics").to_bytes().to_vec()).unwrap()
    }

    /// Waits until the metric `name` satisfies `reached`: how a test knows
    /// the server has seen what it did (a connection, a body in memory)
    /// before it goes on.
    pub async fn metric_becomes(&self, name: &str, reached: impl Fn(f64) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let page = self.metrics().await;
            if sample(&page, name).is_some_and(&reached) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never reached the expected value:\n{page}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn grpc(&self) -> OrderTrailClient<Channel> {
        OrderTrailClient::connect(format!("http://{}", self.grpc_addr)).await.expect("gRPC connect")
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(format!("http://{}", self.grpc_addr)).await.expect("gRPC connect")
    }

    /// Every order (one page; tests store few).
    pub async fn all_orders(&self) -> Vec<ordertrail::proto::Order> {
        let request = ordertrail::proto::ListOrdersRequest { page_size: 1000, ..Default::default() };
        self.grpc().await.list_orders(request).await.expect("ListOrders").into_inner().orders
    }

    /// The newest durable sequence.
    pub async fn head(&self) -> u64 {
        let request = ListEventsRequest { page_size: 1, ..Default::default() };
        self.grpc().await.list_events(request).await.expect("ListEvents").into_inner().head_sequence
    }

    /// The whole global event log, through the paged API.
    pub async fn all_events(&self) -> Vec<Event> {
        let mut client = self.grpc().await;
        let mut events = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_events(ListEventsRequest { page_size: 7, page_token: token.clone(), ..Default::default() })
                .await
                .expect("ListEvents")
                .into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() {
                return events;
            }
            token = page.next_page_token;
        }
    }

    /// One stored delivery, if there is one with that id.
    pub async fn delivery(&self, raw_id: u64) -> Option<RawDelivery> {
        let request = ordertrail::proto::GetDeliveryRequest { raw_id };
        match self.admin().await.get_delivery(request).await {
            Ok(raw) => Some(raw.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => panic!("GetDelivery: {status}"),
        }
    }

    /// (events held for live subscribers, times a subscriber lagged).
    pub async fn feed_stats(&self) -> (u64, u64) {
        let stats = self.admin().await.get_stats(ordertrail::proto::GetStatsRequest {}).await.expect("GetStats");
        let stats = stats.into_inner();
        let internals = stats.internals.unwrap_or_default();
        (internals.feed_backlog, internals.subscriber_store_reads)
    }

    /// Every quarantined delivery.
    pub async fn quarantine(&self) -> Vec<RawDelivery> {
        let request = ListQuarantinedRequest { page_size: 1000, ..Default::default() };
        self.admin().await.list_quarantined(request).await.expect("ListQuarantined").into_inner().deliveries
    }
}
