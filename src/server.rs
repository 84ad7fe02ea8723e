//! `run(config, listeners, shutdown)`: the one place that knows every part.
//! It never binds ports or reads signals itself; the caller does.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::allowlist::Allowlists;
use crate::api::{AdminAuth, AdminService, BearerAuth, OrderTrailService, SubscribeRoute, Subscriptions};
use crate::config::{Config, GrpcConfig};
use crate::console::{Console, Rates};
use crate::gate;
use crate::handover::{HandedConnection, Offer, Predecessor, Role, Successor};
use crate::http::{self, FrontDoor};
use crate::ingest::Mapper;
use crate::metrics::{Gauges, Metrics};
use crate::proto::admin_server::AdminServer;
use crate::proto::order_trail_server::OrderTrailServer;
use crate::store::{Store, StoreError};

/// The bound sockets the server serves on.
pub struct Listeners {
    /// Public webhooks.
    pub http: TcpListener,
    /// Internal gRPC.
    pub grpc: TcpListener,
    /// Internal admin (metrics).
    pub admin: TcpListener,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC reflection could not be set up: {0}")]
    Reflection(String),
}

impl ServerError {
    /// The process exit code for a server that ended with this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Store(e) => e.exit_code(),
            Self::Grpc(_) | Self::Reflection(_) => crate::store::EXIT_FAILURE,
        }
    }
}

/// Opens the store and serves until `shutdown` is cancelled; then stops
/// accepting, lets in-flight work finish within the grace period, and
/// closes the store (which flushes it).
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), ServerError> {
    let opening = open_store(&config);
    serve(&config, opening, listeners, None, shutdown).await
}

/// Serves on sockets handed over by `predecessor` (see [`crate::handover`]):
/// accepts at once, and holds requests until the predecessor has released
/// the store and it is open here (at most `handover_timeout`).
pub async fn take_over(
    config: Config,
    listeners: Listeners,
    predecessor: Predecessor,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let deadline = tokio::time::Instant::now() + config.handover_timeout;
    let (handed, released) = predecessor.follow(config.handover_timeout);
    let opening = async {
        match released.await {
            Ok(Ok(())) => open_store_by(&config, deadline).await,
            Ok(Err(e)) => Err(StoreError::unavailable_because(format!("hand-over failed: {e}"))),
            Err(_) => Err(StoreError::unavailable_because("hand-over failed")),
        }
    };
    serve(&config, opening, listeners, Some(handed), shutdown).await
}

/// Opens the store, retrying while another process still holds it (it is
/// closing), until `deadline`.
async fn open_store_by(config: &Config, deadline: tokio::time::Instant) -> Result<Store, StoreError> {
    loop {
        match open_store(config).await {
            Err(StoreError::Unavailable(why, _)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%why, "the store is not free yet");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            result => return result,
        }
    }
}

/// Opens the store of `config` with the current mappers (see
/// [`Store::open`]).
pub async fn open_store(config: &Config) -> Result<Store, StoreError> {
    Store::open(&config.store, Mapper::new(config)).await
}

/// Serves an already opened store (see [`run`]); closes it at the end.
pub async fn run_with_store(
    config: Config,
    store: Store,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve(&config, async { Ok(store) }, listeners, None, shutdown).await
}

/// Accepts webhooks at once (requests wait for the store), serves
/// everything once `opening` gives the store, offers the sockets to a
/// successor, and at shutdown drains, closes the store and tells the
/// successor.
async fn serve(
    config: &Config,
    opening: impl Future<Output = Result<Store, StoreError>>,
    listeners: Listeners,
    handed: Option<mpsc::UnboundedReceiver<HandedConnection>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let config = Arc::new(config.clone());
    let grace = config.shutdown_grace;
    let offered = dup_sockets(&listeners);
    let successor = Arc::new(Successor::default());
    let http_addr = local(&listeners.http);
    let (door, open_door) = http::Door::new(config.handover_timeout);
    let connections = tokio_util::task::TaskTracker::new();
    let webhooks = tokio::spawn(http::serve(
        listeners.http,
        door,
        config.clone(),
        shutdown.clone(),
        handed,
        successor.clone(),
        connections.clone(),
    ));
    let store = match opening.await {
        Ok(store) => store,
        Err(e) => {
            shutdown.cancel();
            let _ = webhooks.await;
            return Err(e.into());
        }
    };
    tracing::info!(
        http = %http_addr,
        grpc = %local(&listeners.grpc),
        admin = %local(&listeners.admin),
        data_dir = %config.store.data_dir.display(),
        durability = ?config.store.durability,
        head_sequence = store.head_sequence(),
        "ordertrail serving"
    );
    if config.store.verify_on_start {
        store.verify_in_background()?;
    }
    let offer =
        offered.and_then(|sockets| Offer::start(&config.store.data_dir, sockets, successor.clone(), shutdown.clone()));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = reflection()?;
    let auth = BearerAuth::new(config.grpc.bearer_tokens.clone());
    let subscriptions = Subscriptions::new(store.clone(), shutdown.clone(), &config.grpc);
    let positions = subscriptions.clone();
    let rates = Rates::start(store.clone(), subscriptions.clone(), shutdown.clone());
    let bodies = http::Bodies::new(&config.http);
    let allowlists = Allowlists::new(&config);
    allowlists.recall(&store).await;
    let followed = allowlists.clone();
    let gauges = Gauges {
        positions: Box::new(move || positions.positions()),
        connections: Box::new(move || connections.len()),
        bodies: bodies.clone(),
        allowlists: Box::new(move || followed.statuses()),
    };
    let metrics = Metrics::new(store.clone(), gauges);
    allowlists.follow(store.clone(), metrics.clone(), shutdown.clone());
    let console = Arc::new(Console::new(
        &config,
        store.clone(),
        subscriptions.clone(),
        rates,
        allowlists.clone(),
        shutdown.clone(),
    ));
    let grpc = grpc_server(&config.grpc)?
        .add_service(health)
        .add_service(InterceptedService::new(reflection.0, auth.clone()))
        .add_service(InterceptedService::new(reflection.1, auth))
        .add_service(order_trail(&config.grpc, &store, subscriptions))
        .add_service(admin(&config, &store))
        .serve_with_incoming_shutdown(
            gate::gate(listeners.grpc, &config.grpc, shutdown.clone()),
            shutdown.clone().cancelled_owned(),
        );
    tokio::spawn(report_health(health_reporter, store.clone(), shutdown.clone()));
    let admin_task = tokio::spawn(http::serve_admin(listeners.admin, metrics.clone(), console, shutdown.clone()));
    let _ = open_door.send(Some(Arc::new(FrontDoor::new(
        config.clone(),
        store.clone(),
        shutdown.clone(),
        metrics,
        bodies,
        allowlists,
    ))));
    let grpc_result = serve_grpc(grpc, &shutdown, grace).await;
    shutdown.cancel();
    let _ = webhooks.await;
    successor.close();
    let _ = admin_task.await;
    let closed = store.close().await;
    if let Some(offer) = offer
        && closed.is_ok()
    {
        offer.finish().await;
    }
    closed?;
    tracing::info!("ordertrail stopped");
    grpc_result
}

/// Duplicates of the listening sockets, to hand over to a successor.
fn dup_sockets(listeners: &Listeners) -> Option<Vec<(Role, OwnedFd)>> {
    let dup = |role, listener: &TcpListener| Some((role, listener.as_fd().try_clone_to_owned().ok()?));
    Some(vec![
        dup(Role::Http, &listeners.http)?,
        dup(Role::Grpc, &listeners.grpc)?,
        dup(Role::Admin, &listeners.admin)?,
    ])
}

/// The services reported by `grpc.health.v1.Health` ("" is the server).
const HEALTH_NAMES: [&str; 3] = [
    "",
    <OrderTrailServer<OrderTrailService> as NamedService>::NAME,
    <AdminServer<AdminService> as NamedService>::NAME,
];

/// How often health follows the store.
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);

/// Keeps `grpc.health.v1.Health` in step with the store (NOT_SERVING while
/// storage fails) and with shutdown (NOT_SERVING, then watchers end).
async fn report_health(mut reporter: HealthReporter, store: Store, shutdown: CancellationToken) {
    let mut serving = None;
    loop {
        let healthy = store.is_healthy() && store.damage().is_none();
        if serving != Some(healthy) {
            let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
            for name in HEALTH_NAMES {
                reporter.set_service_status(name, status).await;
            }
            serving = Some(healthy);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
    }
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, ServingStatus::NotServing).await;
    }
    // Ends the Watch streams, so they do not hold the shutdown open.
    for name in HEALTH_NAMES {
        reporter.clear_service_status(name).await;
    }
}

/// gRPC server reflection (v1 and v1alpha), so grpcurl and other tools work
/// without the .proto files.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error = |e: tonic_reflection::server::Error| ServerError::Reflection(e.to_string());
    Ok((builder().build_v1().map_err(reflection_error)?, builder().build_v1alpha().map_err(reflection_error)?))
}

/// The gRPC transport with its limits, keepalive and TLS.
fn grpc_server(config: &GrpcConfig) -> Result<Server, ServerError> {
    let mut server = Server::builder()
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .timeout(config.request_timeout);
    if let Some(tls) = &config.tls {
        let mut settings = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, tls.key_pem.expose()));
        if let Some(ca) = &tls.client_ca_pem {
            settings = settings.client_ca_root(Certificate::from_pem(ca));
        }
        server = server.tls_config(settings)?;
    }
    Ok(server)
}

/// The `OrderTrail` service; `Subscribe` is served by [`SubscribeRoute`]
/// (events sent as encoded once), the rest by the generated server.
fn order_trail(
    config: &GrpcConfig,
    store: &Store,
    subscriptions: Subscriptions,
) -> InterceptedService<SubscribeRoute, BearerAuth> {
    let service = Arc::new(OrderTrailService::new(store.clone(), subscriptions, config.max_message_bytes));
    let generated = OrderTrailServer::from_arc(service.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let route = SubscribeRoute {
        generated,
        service,
        max_decoding: config.max_message_bytes,
        max_encoding: config.max_message_bytes,
    };
    InterceptedService::new(route, BearerAuth::new(config.bearer_tokens.clone()))
}

fn admin(config: &Arc<Config>, store: &Store) -> InterceptedService<AdminServer<AdminService>, AdminAuth> {
    let grpc = &config.grpc;
    let service = AdminServer::new(AdminService::new(store.clone(), grpc.max_message_bytes))
        .max_decoding_message_size(grpc.max_message_bytes)
        .max_encoding_message_size(grpc.max_message_bytes);
    InterceptedService::new(service, AdminAuth::new(grpc))
}

/// Runs the gRPC server; once shutdown starts, gives it `grace` to drain.
async fn serve_grpc(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<(), ServerError> {
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(ServerError::from),
        () = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result.map_err(ServerError::from),
        Err(_) => {
            tracing::warn!(?grace, "gRPC connections still open after the grace period");
            Ok(())
        }
    }
}

fn local(listener: &TcpListener) -> String {
    listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
}
