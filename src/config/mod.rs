//! Configuration: plain data read from a TOML file plus `ORDERTRAIL_*`
//! overrides, validated completely before any port is bound.
//!
//! Environment variables are read through a lookup function so tests never
//! touch the process environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::provider::Provider;

mod auth;
mod file;

use auth::validate_source;
pub use auth::{
    AuthConfig, BasicCredential, MIN_BEARER_TOKEN_BYTES, MIN_HMAC_SECRET_BYTES, MinPrefix, Network, SecondFactor,
    Secret, SignatureEncoding,
};
use file::{FileConfig, FileTls};

/// Default webhook listener (`ORDERTRAIL_HTTP_ADDR`).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
/// Default gRPC listener (`ORDERTRAIL_GRPC_ADDR`).
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Default admin listener (`ORDERTRAIL_ADMIN_ADDR`).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";
/// Default data directory (`ORDERTRAIL_DATA_DIR`).
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default largest accepted webhook body (`ORDERTRAIL_BODY_LIMIT_BYTES`).
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 1024 * 1024;
/// Default time a client has to send its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default time a client has to send its whole body.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// Default bytes of webhook bodies held in memory at once.
pub const DEFAULT_BODY_MEMORY_BYTES: usize = 256 * 1024 * 1024;
/// Default bodies of not yet authenticated senders (HMAC sources) read at once.
pub const DEFAULT_MAX_UNVERIFIED_BODIES: usize = 64;
/// Default time a not yet authenticated sender has to send its body.
pub const DEFAULT_UNVERIFIED_BODY_TIMEOUT_MS: u64 = 5_000;
/// Default most concurrent webhook connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default sled page cache size. Measured (BENCHMARKS.md): random
/// GetOrders with 10k or 1M orders and durable ingest were as fast with
/// 8 MiB as with 16 or 32 MiB (the OS page cache holds what sled's does
/// not), and each MiB of it cost 1–2 MiB of resident memory. Raise it when
/// lookups keep coming back to a hot set larger than this.
pub const DEFAULT_CACHE_CAPACITY_BYTES: u64 = 8 * 1024 * 1024;
/// Default largest gRPC message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default most concurrent HTTP/2 streams per gRPC connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Default HTTP/2 keepalive ping interval.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 30_000;
/// Default time to wait for a keepalive answer.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;
/// Default longest unary gRPC call.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Default newest events kept in memory for live subscribers.
pub const DEFAULT_FEED_BUFFER_EVENTS: usize = 4096;
/// Default most concurrent `Subscribe` streams.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1000;
/// Default most concurrent `Subscribe` streams of one client address.
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_PEER: usize = 250;
/// Default messages buffered per subscriber.
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 256;
/// Default interval of `progress` messages.
pub const DEFAULT_PROGRESS_INTERVAL_MS: u64 = 5_000;
/// Default time in-flight work gets to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Default longest time a starting process holds requests while it waits for
/// the store (a predecessor handing over releases it, or it is opened).
pub const DEFAULT_HANDOVER_TIMEOUT_MS: u64 = 30_000;
/// Default most gRPC connections open at once.
pub const DEFAULT_GRPC_MAX_CONNECTIONS: usize = 1024;
/// Default time a new gRPC connection has to send its first bytes (the
/// HTTP/2 preface, or a TLS hello).
pub const DEFAULT_PREFACE_TIMEOUT_MS: u64 = 10_000;

/// A configuration that cannot be used; the message is one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub http: HttpConfig,
    pub grpc: GrpcConfig,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub sources: Vec<SourceConfig>,
    /// How long in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// How long a starting process holds requests while it waits for the
    /// store; past it they are answered 503 and the start fails.
    pub handover_timeout: Duration,
}

/// The public webhook listener.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    pub body_limit_bytes: usize,
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this time.
    pub body_read_timeout: Duration,
    /// Most connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Bytes of bodies held in memory at once; more wait.
    pub body_memory_bytes: usize,
    /// Bodies read at once whose sender only the body can authenticate
    /// (HMAC); more wait, and get 503 past their deadline.
    pub max_unverified_bodies: usize,
    /// The body deadline of such a sender.
    pub unverified_body_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Network>,
    /// Allow unauthenticated sources on a non-loopback address.
    pub allow_unauthenticated_public: bool,
}

/// The internal gRPC listener.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    pub addr: SocketAddr,
    /// Allow a non-loopback gRPC address although gRPC has no authentication.
    pub allow_unauthenticated_public: bool,
    /// Most `Subscribe` streams open at once.
    pub max_subscriptions: usize,
    /// Most `Subscribe` streams one client address may hold.
    pub max_subscriptions_per_peer: usize,
    /// Messages buffered per subscriber before it is read from the store.
    pub subscription_buffer: usize,
    /// How often a stream reports its position.
    pub progress_interval: Duration,
    /// Accepted bearer tokens (`authorization: Bearer …`); empty: none asked.
    pub bearer_tokens: Vec<Secret>,
    /// The only bearer tokens the `Admin` service accepts.
    pub admin_tokens: Vec<Secret>,
    /// TLS for the gRPC listener; with a client CA, client certificates are
    /// required (mTLS).
    pub tls: Option<GrpcTls>,
    /// Largest request or response message.
    pub max_message_bytes: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive: ping interval, and how long to wait for the answer
    /// before closing the connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Longest time a unary call may take (streams are not limited).
    pub request_timeout: Duration,
    /// Most connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// A connection that has not sent its first bytes (the HTTP/2 preface,
    /// or a TLS hello) within this time is closed; until then it never holds
    /// a shutdown.
    pub preface_timeout: Duration,
}

impl GrpcConfig {
    /// True when callers must authenticate (bearer token or client certificate).
    pub fn is_authenticated(&self) -> bool {
        !self.bearer_tokens.is_empty() || self.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some())
    }
}

/// PEM material for gRPC TLS, read when the config is loaded.
#[derive(Clone)]
pub struct GrpcTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Secret,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTls")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &self.key_pem)
            .field("mtls", &self.client_ca_pem.is_some())
            .finish()
    }
}

/// The internal admin listener (metrics and the operator console).
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Serve the console on a non-loopback address without
    /// `grpc.admin_tokens` (behind an authenticating proxy).
    pub allow_unauthenticated_public: bool,
}

/// When a write counts as durable, by what it survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// An acknowledged webhook survives a power loss or a kernel crash:
    /// the data and the metadata that finds it reached the disk (fsync).
    /// The default.
    Fsync,
    /// An acknowledged webhook survives a crash of the process, but not a
    /// power loss: it is in the operating system's hands, not yet on disk.
    Flush,
}

/// The storage engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded sled database in `data_dir`: one process, no server.
    Sled,
    /// A PostgreSQL database shared by any number of nodes.
    Postgres,
}

impl Backend {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "sled" => Some(Self::Sled),
            "postgres" => Some(Self::Postgres),
            _ => None,
        }
    }
}

impl Durability {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "fsync" => Some(Self::Fsync),
            "flush" => Some(Self::Flush),
            _ => None,
        }
    }
}

/// Where and how deliveries are stored.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub backend: Backend,
    /// The data directory: the database (sled), the durability mark, the
    /// hand-over socket.
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Settings of the sled engine.
    pub sled: SledConfig,
    /// Settings of the PostgreSQL engine; `None` unless `backend` is
    /// `postgres`.
    pub postgres: Option<PostgresConfig>,
    /// Keep only this many newest events (0: keep all). Raw deliveries are
    /// always kept.
    pub retain_events: u64,
    /// Newest events kept in memory for live subscribers; one that falls
    /// further behind reads from the store until it catches up.
    pub feed_buffer_events: usize,
    /// Read the whole database once in the background after the server
    /// starts, to find damage early.
    pub verify_on_start: bool,
    /// UNSAFE, for the crash harness's negative control only: answer as soon
    /// as the delivery is processed, before it is written or durable, so a
    /// crash can lose acknowledged webhooks. Only in builds with the
    /// `test-util` feature.
    #[cfg(any(test, feature = "test-util"))]
    pub unsafe_ack_before_durable: bool,
}

/// Settings of the PostgreSQL engine (`[store.postgres]`).
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Where the database is (`url`, `ORDERTRAIL_POSTGRES_URL`); several
    /// hosts with `target_session_attrs=read-write` follow a failover. Its
    /// `Debug` hides the password.
    pub url: tokio_postgres::Config,
    /// Connections for queries (the writer and the event tailer have their
    /// own).
    pub pool_size: usize,
    /// How long connecting may take before the attempt counts as failed.
    pub connect_timeout: Duration,
    /// Longest a statement may run (a stuck database fails the batch, which
    /// is answered 503 and retried by recovery, instead of holding the
    /// writer).
    pub statement_timeout: Duration,
    /// How often a node looks for other nodes' events when no notification
    /// woke it (notifications are lost while a connection is down).
    pub follow_poll: Duration,
    /// UNSAFE, for the sequencing's negative control only: numbers are
    /// handed out outside the counter row's lock, as a plain sequence does,
    /// so batches commit in another order than their numbers and a reader
    /// of `sequence > position` can skip events. Only in builds with the
    /// `test-util` feature.
    #[cfg(any(test, feature = "test-util"))]
    pub unsafe_sequence_outside_lock: bool,
}

/// Default `store.postgres.pool_size`.
pub const DEFAULT_POSTGRES_POOL_SIZE: usize = 8;
/// Default `store.postgres.connect_timeout_ms`.
pub const DEFAULT_POSTGRES_CONNECT_TIMEOUT_MS: u64 = 5000;
/// Default `store.postgres.follow_poll_ms`.
pub const DEFAULT_POSTGRES_FOLLOW_POLL_MS: u64 = 250;
/// Default `store.postgres.statement_timeout_ms`.
pub const DEFAULT_POSTGRES_STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// Settings of the sled engine (`[store.sled]`).
#[derive(Clone, Debug)]
pub struct SledConfig {
    /// sled's page cache; the operating system's page cache serves the rest.
    pub cache_capacity_bytes: u64,
}

/// One configured webhook sender: `POST /webhooks/{name}[/{kind}]`.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub name: String,
    pub provider: Provider,
    pub auth: AuthConfig,
    /// Most authenticated deliveries accepted per second (token bucket);
    /// `None`: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Winkelstraat only: more URL kinds that carry a known kind's payload
    /// (`{ "stock-order" = "order" }`), e.g. when a new URL name appears.
    pub kind_aliases: BTreeMap<String, String>,
}

/// A token bucket: `per_second` tokens refill each second, up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    /// Largest burst; defaults to `per_second`.
    pub burst: Option<u32>,
}

// === impl Config ===

impl Config {
    /// Reads the file named by `path` or by `ORDERTRAIL_CONFIG` (none: all
    /// defaults), applies `ORDERTRAIL_*` overrides from `env`, and validates.
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let path = path.map(Path::to_path_buf).or_else(|| env("ORDERTRAIL_CONFIG").map(PathBuf::from));
        let text = match &path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError::new(format!("cannot read config file {}: {e}", p.display())))?,
            None => String::new(),
        };
        Self::from_toml(&text, env)
    }

    /// Parses TOML text (may be empty), applies overrides and validates.
    pub fn from_toml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::new(toml_error(text, &e)))?;
        let config = Self::build(file, env)?;
        config.validate()?;
        Ok(config)
    }

    fn build(file: FileConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let addr = |var: &str, key: &str, value: Option<String>, default: &str| {
            let (origin, raw) = match env(var) {
                Some(v) => (var.to_string(), v),
                None => (key.to_string(), value.unwrap_or_else(|| default.to_string())),
            };
            raw.parse::<SocketAddr>()
                .map_err(|_| ConfigError::new(format!("{origin}: `{raw}` is not an address like 127.0.0.1:8080")))
        };
        let body_limit_bytes = match env("ORDERTRAIL_BODY_LIMIT_BYTES") {
            Some(v) => v.parse().map_err(|_| {
                ConfigError::new(format!("ORDERTRAIL_BODY_LIMIT_BYTES: `{v}` is not a number of bytes"))
            })?,
            None => file.http.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT_BYTES),
        };
        let durability = match env("ORDERTRAIL_DURABILITY") {
            Some(v) => Durability::parse(&v)
                .ok_or_else(|| ConfigError::new(format!("ORDERTRAIL_DURABILITY: `{v}` is not one of fsync, flush")))?,
            None => file.store.durability.unwrap_or(Durability::Fsync),
        };
        let backend = match env("ORDERTRAIL_STORE_BACKEND") {
            Some(v) => Backend::parse(&v).ok_or_else(|| {
                ConfigError::new(format!("ORDERTRAIL_STORE_BACKEND: `{v}` is not one of sled, postgres"))
            })?,
            None => file.store.backend.unwrap_or(Backend::Sled),
        };
        let postgres = postgres_config(backend, &file.store.postgres, env)?;
        let data_dir = env("ORDERTRAIL_DATA_DIR")
            .map(PathBuf::from)
            .or(file.store.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let sources = match file.sources {
            Some(list) => list
                .into_iter()
                .map(|s| SourceConfig {
                    name: s.name,
                    provider: s.provider,
                    auth: s.auth,
                    rate_limit: s.rate_limit,
                    kind_aliases: s.kind_aliases,
                })
                .collect(),
            None => default_sources(),
        };
        Ok(Self {
            http: HttpConfig {
                addr: addr("ORDERTRAIL_HTTP_ADDR", "http.addr", file.http.addr, DEFAULT_HTTP_ADDR)?,
                body_limit_bytes,
                header_read_timeout: Duration::from_millis(
                    file.http.header_read_timeout_ms.unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_MS),
                ),
                body_read_timeout: Duration::from_millis(
                    file.http.body_read_timeout_ms.unwrap_or(DEFAULT_BODY_READ_TIMEOUT_MS),
                ),
                max_connections: file.http.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
                body_memory_bytes: file.http.body_memory_bytes.unwrap_or(DEFAULT_BODY_MEMORY_BYTES),
                max_unverified_bodies: file.http.max_unverified_bodies.unwrap_or(DEFAULT_MAX_UNVERIFIED_BODIES),
                unverified_body_timeout: Duration::from_millis(
                    file.http.unverified_body_timeout_ms.unwrap_or(DEFAULT_UNVERIFIED_BODY_TIMEOUT_MS),
                ),
                trusted_proxies: file.http.trusted_proxies,
                allow_unauthenticated_public: file.http.allow_unauthenticated_public,
            },
            grpc: GrpcConfig {
                addr: addr("ORDERTRAIL_GRPC_ADDR", "grpc.addr", file.grpc.addr, DEFAULT_GRPC_ADDR)?,
                allow_unauthenticated_public: file.grpc.allow_unauthenticated_public,
                max_subscriptions: file.grpc.max_subscriptions.unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS),
                max_subscriptions_per_peer: file
                    .grpc
                    .max_subscriptions_per_peer
                    .unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS_PER_PEER),
                subscription_buffer: file.grpc.subscription_buffer.unwrap_or(DEFAULT_SUBSCRIPTION_BUFFER),
                progress_interval: Duration::from_millis(
                    file.grpc.progress_interval_ms.unwrap_or(DEFAULT_PROGRESS_INTERVAL_MS),
                ),
                bearer_tokens: file.grpc.bearer_tokens,
                admin_tokens: file.grpc.admin_tokens,
                tls: file.grpc.tls.map(FileTls::load).transpose()?,
                max_message_bytes: file.grpc.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
                max_concurrent_streams: file.grpc.max_concurrent_streams.unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
                keepalive_interval: Duration::from_millis(
                    file.grpc.keepalive_interval_ms.unwrap_or(DEFAULT_KEEPALIVE_INTERVAL_MS),
                ),
                keepalive_timeout: Duration::from_millis(
                    file.grpc.keepalive_timeout_ms.unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT_MS),
                ),
                request_timeout: Duration::from_millis(
                    file.grpc.request_timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS),
                ),
                max_connections: file.grpc.max_connections.unwrap_or(DEFAULT_GRPC_MAX_CONNECTIONS),
                preface_timeout: Duration::from_millis(
                    file.grpc.preface_timeout_ms.unwrap_or(DEFAULT_PREFACE_TIMEOUT_MS),
                ),
            },
            admin: AdminConfig {
                addr: addr("ORDERTRAIL_ADMIN_ADDR", "admin.addr", file.admin.addr, DEFAULT_ADMIN_ADDR)?,
                allow_unauthenticated_public: file.admin.allow_unauthenticated_public,
            },
            store: StoreConfig {
                backend,
                data_dir,
                durability,
                sled: SledConfig {
                    cache_capacity_bytes: file.store.sled.cache_capacity_bytes.unwrap_or(DEFAULT_CACHE_CAPACITY_BYTES),
                },
                postgres,
                retain_events: file.store.retain_events,
                feed_buffer_events: file.store.feed_buffer_events.unwrap_or(DEFAULT_FEED_BUFFER_EVENTS),
                #[cfg(any(test, feature = "test-util"))]
                unsafe_ack_before_durable: file.store.unsafe_ack_before_durable,
                verify_on_start: file.store.verify_on_start.unwrap_or(true),
            },
            sources,
            shutdown_grace: Duration::from_millis(file.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS)),
            handover_timeout: Duration::from_millis(file.handover_timeout_ms.unwrap_or(DEFAULT_HANDOVER_TIMEOUT_MS)),
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.http.body_limit_bytes == 0 {
            return Err(ConfigError::new("http.body_limit_bytes must be greater than 0"));
        }
        if self.http.header_read_timeout.is_zero() || self.http.body_read_timeout.is_zero() {
            return Err(ConfigError::new(
                "http.header_read_timeout_ms and http.body_read_timeout_ms must be greater than 0",
            ));
        }
        let h = &self.http;
        if h.max_connections == 0
            || h.body_memory_bytes == 0
            || h.max_unverified_bodies == 0
            || h.unverified_body_timeout.is_zero()
        {
            return Err(ConfigError::new(
                "http: max_connections, body_memory_bytes, max_unverified_bodies and unverified_body_timeout_ms must be greater than 0",
            ));
        }
        if self.grpc.subscription_buffer == 0
            || self.grpc.progress_interval.is_zero()
            || self.grpc.max_subscriptions_per_peer == 0
        {
            return Err(ConfigError::new(
                "grpc.subscription_buffer, grpc.max_subscriptions_per_peer and grpc.progress_interval_ms must be greater than 0",
            ));
        }
        if self.store.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("store.data_dir must not be empty"));
        }
        let mut names = std::collections::HashSet::new();
        for source in &self.sources {
            validate_source(source)?;
            if !names.insert(source.name.as_str()) {
                return Err(ConfigError::new(format!("sources: the name `{}` is used twice", source.name)));
            }
            if source.auth.is_open() && !self.http.addr.ip().is_loopback() && !self.http.allow_unauthenticated_public {
                return Err(ConfigError::new(format!(
                    "sources: `{}` has no authentication, so http.addr {} must be a loopback address (or set http.allow_unauthenticated_public = true)",
                    source.name, self.http.addr
                )));
            }
        }
        if !self.grpc.addr.ip().is_loopback()
            && !self.grpc.is_authenticated()
            && !self.grpc.allow_unauthenticated_public
        {
            return Err(ConfigError::new(format!(
                "grpc.addr {} is not loopback and gRPC has no authentication (grpc.bearer_tokens or grpc.tls.client_ca_file); set grpc.allow_unauthenticated_public = true to allow it anyway",
                self.grpc.addr
            )));
        }
        if !self.admin.addr.ip().is_loopback()
            && self.grpc.admin_tokens.is_empty()
            && !self.admin.allow_unauthenticated_public
        {
            return Err(ConfigError::new(format!(
                "admin.addr {} is not loopback and the console there has no authentication (grpc.admin_tokens); set admin.allow_unauthenticated_public = true to allow it anyway",
                self.admin.addr
            )));
        }
        let tokens = self.grpc.bearer_tokens.iter().chain(&self.grpc.admin_tokens);
        if tokens.clone().any(|t| t.expose().len() < MIN_BEARER_TOKEN_BYTES) {
            return Err(ConfigError::new(format!(
                "grpc.bearer_tokens and grpc.admin_tokens: every token must be at least {MIN_BEARER_TOKEN_BYTES} bytes"
            )));
        }
        if self.grpc.admin_tokens.iter().any(|a| self.grpc.bearer_tokens.iter().any(|b| a.expose() == b.expose())) {
            return Err(ConfigError::new("grpc.admin_tokens must differ from grpc.bearer_tokens"));
        }
        let g = &self.grpc;
        if g.max_message_bytes == 0
            || g.max_concurrent_streams == 0
            || g.keepalive_interval.is_zero()
            || g.keepalive_timeout.is_zero()
            || g.request_timeout.is_zero()
            || g.max_connections == 0
            || g.preface_timeout.is_zero()
        {
            return Err(ConfigError::new(
                "grpc: max_message_bytes, max_concurrent_streams, max_connections and the keepalive, request and preface timeouts must be greater than 0",
            ));
        }
        if self.handover_timeout.is_zero() {
            return Err(ConfigError::new("handover_timeout_ms must be greater than 0"));
        }
        Ok(())
    }

    /// The kind aliases of the source called `name` (empty if none).
    pub fn kind_aliases(&self, name: &str) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        self.source(name).map_or(&NONE, |s| &s.kind_aliases)
    }

    /// The configured source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// One unauthenticated source per provider, named after it.
fn default_sources() -> Vec<SourceConfig> {
    Provider::ALL
        .iter()
        .map(|p| SourceConfig {
            name: p.name().to_string(),
            provider: *p,
            auth: AuthConfig::None,
            rate_limit: None,
            kind_aliases: BTreeMap::new(),
        })
        .collect()
}

/// A TOML error in one line, without quoting the file: the offending line
/// may hold a password or key, and so may a value the message repeats.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    let mut message = String::new();
    let mut quoted = false;
    for c in one_line(error.message()).chars() {
        match c {
            '"' if quoted => {
                message.push_str("…\"");
                quoted = false;
            }
            '"' => {
                message.push('"');
                quoted = true;
            }
            _ if quoted => {}
            c => message.push(c),
        }
    }
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("invalid config at line {line}, column {column}: {message}")
        }
        None => format!("invalid config: {message}"),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `[store.postgres]` with `ORDERTRAIL_POSTGRES_URL`, when the backend is
/// PostgreSQL (a URL is then required); `None` otherwise.
fn postgres_config(
    backend: Backend,
    file: &file::FilePostgres,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PostgresConfig>, ConfigError> {
    if backend != Backend::Postgres {
        return Ok(None);
    }
    let (origin, url) = match env("ORDERTRAIL_POSTGRES_URL") {
        Some(url) => ("ORDERTRAIL_POSTGRES_URL", url),
        None => ("store.postgres.url", file.url.clone().unwrap_or_default()),
    };
    if url.is_empty() {
        return Err(ConfigError::new(
            "store.backend = \"postgres\" needs store.postgres.url (or ORDERTRAIL_POSTGRES_URL)",
        ));
    }
    // The URL's own text is not repeated: it may hold a password.
    let url = url
        .parse::<tokio_postgres::Config>()
        .map_err(|e| ConfigError::new(format!("{origin} is not a PostgreSQL connection URL: {e}")))?;
    let pool_size = file.pool_size.unwrap_or(DEFAULT_POSTGRES_POOL_SIZE);
    let connect_timeout = Duration::from_millis(file.connect_timeout_ms.unwrap_or(DEFAULT_POSTGRES_CONNECT_TIMEOUT_MS));
    let statement_timeout =
        Duration::from_millis(file.statement_timeout_ms.unwrap_or(DEFAULT_POSTGRES_STATEMENT_TIMEOUT_MS));
    if pool_size == 0 || connect_timeout.is_zero() || statement_timeout.is_zero() {
        return Err(ConfigError::new(
            "store.postgres.pool_size, connect_timeout_ms and statement_timeout_ms must be greater than 0",
        ));
    }
    let follow_poll = Duration::from_millis(file.follow_poll_ms.unwrap_or(DEFAULT_POSTGRES_FOLLOW_POLL_MS).max(1));
    Ok(Some(PostgresConfig {
        url,
        pool_size,
        connect_timeout,
        statement_timeout,
        follow_poll,
        #[cfg(any(test, feature = "test-util"))]
        unsafe_sequence_outside_lock: file.unsafe_sequence_outside_lock,
    }))
}

#[cfg(test)]
mod tests;
