//! Configuration: plain data read from a TOML file plus `ORDERTRAIL_*`
//! overrides, validated completely before any port is bound.
//!
//! Environment variables are read through a lookup function so tests never
//! touch the process environment.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ingest::Provider;

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
/// Default most concurrent webhook connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default sled page cache size.
pub const DEFAULT_CACHE_CAPACITY_BYTES: u64 = 128 * 1024 * 1024;
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
/// Default messages buffered per subscriber.
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 256;
/// Default interval of `progress` messages.
pub const DEFAULT_PROGRESS_INTERVAL_MS: u64 = 5_000;
/// Default time in-flight work gets to finish on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

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
    /// Messages buffered per subscriber before it is read from the store.
    pub subscription_buffer: usize,
    /// How often a stream reports its position.
    pub progress_interval: Duration,
    /// Accepted bearer tokens (`authorization: Bearer …`); empty: none asked.
    pub bearer_tokens: Vec<Secret>,
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

/// The internal admin listener (metrics).
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub addr: SocketAddr,
}

/// When a write counts as durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// sled's flush plus an fsync of its files and directories: survives
    /// power loss. The default.
    Fsync,
    /// sled's flush only: survives a crash of the process.
    Flush,
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

/// The embedded database.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub cache_capacity_bytes: u64,
    /// Keep only this many newest events (0: keep all). Raw deliveries are
    /// always kept.
    pub retain_events: u64,
    /// Newest events kept in memory for live subscribers; one that falls
    /// further behind reads from the store until it catches up.
    pub feed_buffer_events: usize,
    /// UNSAFE, for the crash harness's negative control only: answer before
    /// the delivery is durable, so a crash can lose acknowledged webhooks.
    pub unsafe_ack_before_durable: bool,
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
}

/// A token bucket: `per_second` tokens refill each second, up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    /// Largest burst; defaults to `per_second`.
    pub burst: Option<u32>,
}

/// How a source proves a request is authentic.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// No authentication. Only allowed while the webhook listener is on
    /// loopback.
    None,
    /// A static shared secret in a request header (e.g. Winkelstraat's
    /// `x-api-key`), compared in constant time.
    Header {
        /// Header name, e.g. `x-api-key`.
        header: String,
        /// Accepted secrets; more than one allows rotation.
        secrets: Vec<Secret>,
    },
    /// HTTP Basic authentication.
    Basic {
        /// Accepted username/password pairs.
        credentials: Vec<BasicCredential>,
    },
    /// HMAC-SHA256 of the raw body, sent in a header.
    Hmac {
        /// Header carrying the signature, e.g. `x-signature`.
        header: String,
        /// Accepted keys (at least 24 bytes each); more than one allows
        /// rotation.
        secrets: Vec<Secret>,
        /// How the signature is written.
        #[serde(default)]
        encoding: SignatureEncoding,
        /// Text before the signature in the header, e.g. `sha256=`.
        #[serde(default)]
        prefix: String,
    },
    /// The sender's IP address must be in one of these networks (Withings
    /// publishes its range). `X-Forwarded-For` counts only from
    /// `http.trusted_proxies`.
    IpAllowlist {
        /// Allowed networks, IPv4 or IPv6 CIDRs (a bare address is a /32 or
        /// /128). Each entry may hold several, separated by whitespace or
        /// commas, so a DNS TXT record can be pasted as it is.
        #[serde(deserialize_with = "networks")]
        allow: Vec<Network>,
        /// An optional shared secret as a second factor.
        #[serde(default)]
        second_factor: Option<SecondFactor>,
    },
}

/// One username/password pair for HTTP Basic.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicCredential {
    pub username: String,
    pub password: Secret,
}

/// How an HMAC signature is written in its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    /// Lowercase or uppercase hex (the default).
    #[default]
    Hex,
    /// Standard or URL-safe base64, padded or not.
    Base64,
}

/// A shared secret in the URL query or in a header, checked after the IP.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondFactor {
    /// Name of the query parameter carrying the secret (`?token=...`).
    pub query: Option<String>,
    /// Name of the header carrying the secret.
    pub header: Option<String>,
    /// Accepted secrets.
    pub secrets: Vec<Secret>,
}

/// An IP network, written as a CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a
/// bare address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(pub ipnet::IpNet);

impl Network {
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(Self)
            .map_err(|_| format!("`{s}` is not an IP network like 10.0.0.0/8 or 2001:db8::/32"))
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Reads a list of strings, each holding one or more networks separated by
/// whitespace or commas (quotes, as `dig` prints them, are ignored).
fn networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Network>, D::Error> {
    let entries = Vec::<String>::deserialize(deserializer)?;
    entries
        .iter()
        .flat_map(|entry| entry.split(|c: char| c.is_whitespace() || c == ',' || c == '"'))
        .filter(|part| !part.is_empty())
        .map(|part| part.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl AuthConfig {
    /// True when the scheme lets anyone in.
    pub fn is_open(&self) -> bool {
        match self {
            Self::None => true,
            Self::IpAllowlist { allow, second_factor } => {
                second_factor.is_none() && allow.iter().any(|n| n.0.prefix_len() == 0)
            }
            _ => false,
        }
    }
}

/// A secret string: never printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

// === The file format ===

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    grpc: FileGrpc,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    store: FileStore,
    sources: Option<Vec<FileSource>>,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    addr: Option<String>,
    body_limit_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<Network>,
    #[serde(default)]
    allow_unauthenticated_public: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGrpc {
    addr: Option<String>,
    #[serde(default)]
    allow_unauthenticated_public: bool,
    max_subscriptions: Option<usize>,
    subscription_buffer: Option<usize>,
    progress_interval_ms: Option<u64>,
    #[serde(default)]
    bearer_tokens: Vec<Secret>,
    tls: Option<FileTls>,
    max_message_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    keepalive_interval_ms: Option<u64>,
    keepalive_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

impl FileTls {
    fn load(self) -> Result<GrpcTls, ConfigError> {
        let read = |key: &str, path: &Path| -> Result<Vec<u8>, ConfigError> {
            let bytes = std::fs::read(path)
                .map_err(|e| ConfigError::new(format!("grpc.tls.{key}: cannot read {}: {e}", path.display())))?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(ConfigError::new(format!("grpc.tls.{key}: {} is not PEM", path.display())));
            }
            Ok(bytes)
        };
        let cert_pem = read("cert_file", &self.cert_file)?;
        let key = read("key_file", &self.key_file)?;
        Ok(GrpcTls {
            cert_pem,
            key_pem: Secret(String::from_utf8_lossy(&key).into_owned()),
            client_ca_pem: self.client_ca_file.map(|p| read("client_ca_file", &p)).transpose()?,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    addr: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    data_dir: Option<PathBuf>,
    durability: Option<Durability>,
    cache_capacity_bytes: Option<u64>,
    #[serde(default)]
    retain_events: u64,
    feed_buffer_events: Option<usize>,
    #[serde(default)]
    unsafe_ack_before_durable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    provider: Provider,
    #[serde(default = "open_auth")]
    auth: AuthConfig,
    rate_limit: Option<RateLimit>,
}

fn open_auth() -> AuthConfig {
    AuthConfig::None
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
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError::new(format!("invalid config: {}", one_line(&e.to_string()))))?;
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
        let data_dir = env("ORDERTRAIL_DATA_DIR")
            .map(PathBuf::from)
            .or(file.store.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let sources = match file.sources {
            Some(list) => list
                .into_iter()
                .map(|s| SourceConfig { name: s.name, provider: s.provider, auth: s.auth, rate_limit: s.rate_limit })
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
                trusted_proxies: file.http.trusted_proxies,
                allow_unauthenticated_public: file.http.allow_unauthenticated_public,
            },
            grpc: GrpcConfig {
                addr: addr("ORDERTRAIL_GRPC_ADDR", "grpc.addr", file.grpc.addr, DEFAULT_GRPC_ADDR)?,
                allow_unauthenticated_public: file.grpc.allow_unauthenticated_public,
                max_subscriptions: file.grpc.max_subscriptions.unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS),
                subscription_buffer: file.grpc.subscription_buffer.unwrap_or(DEFAULT_SUBSCRIPTION_BUFFER),
                progress_interval: Duration::from_millis(
                    file.grpc.progress_interval_ms.unwrap_or(DEFAULT_PROGRESS_INTERVAL_MS),
                ),
                bearer_tokens: file.grpc.bearer_tokens,
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
            },
            admin: AdminConfig {
                addr: addr("ORDERTRAIL_ADMIN_ADDR", "admin.addr", file.admin.addr, DEFAULT_ADMIN_ADDR)?,
            },
            store: StoreConfig {
                data_dir,
                durability,
                cache_capacity_bytes: file.store.cache_capacity_bytes.unwrap_or(DEFAULT_CACHE_CAPACITY_BYTES),
                retain_events: file.store.retain_events,
                feed_buffer_events: file.store.feed_buffer_events.unwrap_or(DEFAULT_FEED_BUFFER_EVENTS),
                unsafe_ack_before_durable: file.store.unsafe_ack_before_durable,
            },
            sources,
            shutdown_grace: Duration::from_millis(file.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS)),
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
        if self.http.max_connections == 0 {
            return Err(ConfigError::new("http.max_connections must be greater than 0"));
        }
        if self.grpc.subscription_buffer == 0 || self.grpc.progress_interval.is_zero() {
            return Err(ConfigError::new(
                "grpc.subscription_buffer and grpc.progress_interval_ms must be greater than 0",
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
        if self.grpc.bearer_tokens.iter().any(|t| t.expose().len() < MIN_BEARER_TOKEN_BYTES) {
            return Err(ConfigError::new(format!(
                "grpc.bearer_tokens: every token must be at least {MIN_BEARER_TOKEN_BYTES} bytes"
            )));
        }
        let g = &self.grpc;
        if g.max_message_bytes == 0
            || g.max_concurrent_streams == 0
            || g.keepalive_interval.is_zero()
            || g.keepalive_timeout.is_zero()
            || g.request_timeout.is_zero()
        {
            return Err(ConfigError::new(
                "grpc: max_message_bytes, max_concurrent_streams and the keepalive and request timeouts must be greater than 0",
            ));
        }
        Ok(())
    }

    /// The configured source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// Shortest gRPC bearer token accepted.
pub const MIN_BEARER_TOKEN_BYTES: usize = 16;

/// Shortest HMAC key accepted.
pub const MIN_HMAC_SECRET_BYTES: usize = 24;

fn validate_source(source: &SourceConfig) -> Result<(), ConfigError> {
    let name = &source.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(ConfigError::new(format!(
            "sources: name `{name}` must be 1 to 64 characters of a-z, 0-9, `-` and `_`"
        )));
    }
    if let Some(limit) = source.rate_limit
        && (limit.per_second == 0 || limit.burst == Some(0))
    {
        return Err(ConfigError::new(format!(
            "sources.{name}.rate_limit: per_second and burst must be greater than 0"
        )));
    }
    let fail = |key: &str, why: &str| Err(ConfigError::new(format!("sources.{name}.auth.{key}: {why}")));
    let header_ok = |h: &str| http::HeaderName::from_bytes(h.as_bytes()).is_ok();
    let secrets_ok =
        |secrets: &[Secret], min: usize| !secrets.is_empty() && secrets.iter().all(|s| s.expose().len() >= min.max(1));
    match &source.auth {
        AuthConfig::None => Ok(()),
        AuthConfig::Header { header, secrets } => {
            if !header_ok(header) {
                return fail("header", &format!("`{header}` is not a header name"));
            }
            if !secrets_ok(secrets, 1) {
                return fail("secrets", "must be one or more non-empty secrets");
            }
            Ok(())
        }
        AuthConfig::Basic { credentials } => {
            let valid = !credentials.is_empty()
                && credentials
                    .iter()
                    .all(|c| !c.username.is_empty() && !c.username.contains(':') && !c.password.expose().is_empty());
            if !valid {
                return fail(
                    "credentials",
                    "must be one or more pairs of a username (without `:`) and a non-empty password",
                );
            }
            Ok(())
        }
        AuthConfig::Hmac { header, secrets, .. } => {
            if !header_ok(header) {
                return fail("header", &format!("`{header}` is not a header name"));
            }
            if !secrets_ok(secrets, MIN_HMAC_SECRET_BYTES) {
                return fail(
                    "secrets",
                    &format!("must be one or more secrets of at least {MIN_HMAC_SECRET_BYTES} bytes"),
                );
            }
            Ok(())
        }
        AuthConfig::IpAllowlist { allow, second_factor } => {
            if allow.is_empty() {
                return fail("allow", "must list at least one network");
            }
            let Some(factor) = second_factor else { return Ok(()) };
            match (&factor.query, &factor.header) {
                (Some(q), None) if !q.is_empty() => {}
                (None, Some(h)) if header_ok(h) => {}
                _ => {
                    return fail(
                        "second_factor",
                        "set exactly one of `query` (a parameter name) or `header` (a header name)",
                    );
                }
            }
            if !secrets_ok(&factor.secrets, 1) {
                return fail("second_factor.secrets", "must be one or more non-empty secrets");
            }
            Ok(())
        }
    }
}

/// One unauthenticated source per provider, named after it.
fn default_sources() -> Vec<SourceConfig> {
    Provider::ALL
        .iter()
        .map(|p| SourceConfig { name: p.name().to_string(), provider: *p, auth: AuthConfig::None, rate_limit: None })
        .collect()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn source(auth: &str) -> String {
        format!("[[sources]]\nname = \"a\"\nprovider = \"ordermesh\"\nauth = {{ {auth} }}")
    }

    #[test]
    fn empty_config_gives_documented_defaults() {
        let c = Config::from_toml("", &no_env).unwrap();
        assert_eq!(c.http.addr.to_string(), DEFAULT_HTTP_ADDR);
        assert_eq!(c.grpc.addr.to_string(), DEFAULT_GRPC_ADDR);
        assert_eq!(c.admin.addr.to_string(), DEFAULT_ADMIN_ADDR);
        assert_eq!(c.store.data_dir, PathBuf::from("./data"));
        assert_eq!(c.store.durability, Durability::Fsync);
        let names: Vec<_> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["withings", "winkelstraat", "ordermesh"]);
    }

    #[test]
    fn environment_overrides_file() {
        let env = |k: &str| match k {
            "ORDERTRAIL_HTTP_ADDR" => Some("127.0.0.1:1".to_string()),
            "ORDERTRAIL_DATA_DIR" => Some("/tmp/x".to_string()),
            "ORDERTRAIL_DURABILITY" => Some("flush".to_string()),
            _ => None,
        };
        let c = Config::from_toml("[http]\naddr = \"127.0.0.1:2\"\n", &env).unwrap();
        assert_eq!(c.http.addr.port(), 1);
        assert_eq!(c.store.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.store.durability, Durability::Flush);
    }

    #[test]
    fn bad_configs_are_refused_with_one_line() {
        let cases = [
            ("[http]\naddr = \"nope\"", "http.addr"),
            ("[htp]\naddr = \"127.0.0.1:1\"", "unknown field"),
            ("[store]\ndurability = \"sometimes\"", "invalid config"),
            ("[[sources]]\nname = \"A B\"\nprovider = \"ordermesh\"", "must be 1 to 64"),
            ("[[sources]]\nname = \"a\"\nprovider = \"nobody\"", "invalid config"),
            (
                "[[sources]]\nname = \"a\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"a\"\nprovider = \"withings\"",
                "used twice",
            ),
            ("[http]\naddr = \"0.0.0.0:8080\"", "no authentication"),
            ("[grpc]\naddr = \"0.0.0.0:50051\"", "allow_unauthenticated_public"),
            (
                "[[sources]]\nname = \"a\"\nprovider = \"ordermesh\"\nauth = { scheme = \"header\", header = \"x-s\", secrets = [\"\"] }",
                "non-empty",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(text, &no_env).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?} gave {err:?}");
            assert!(!err.contains('\n'), "{err:?} is more than one line");
        }
    }

    #[test]
    fn example_config_is_valid_and_shows_the_defaults() {
        let example = include_str!("../ordertrail.example.toml");
        let c = Config::from_toml(example, &no_env).unwrap();
        let defaults = Config::from_toml("", &no_env).unwrap();
        assert_eq!(c.http.addr, defaults.http.addr);
        assert_eq!(c.http.body_limit_bytes, defaults.http.body_limit_bytes);
        assert_eq!(c.http.header_read_timeout, defaults.http.header_read_timeout);
        assert_eq!(c.http.body_read_timeout, defaults.http.body_read_timeout);
        assert_eq!(c.http.max_connections, defaults.http.max_connections);
        assert_eq!(c.grpc.addr, defaults.grpc.addr);
        assert_eq!(c.admin.addr, defaults.admin.addr);
        assert_eq!(c.store.data_dir, defaults.store.data_dir);
        assert_eq!(c.store.durability, defaults.store.durability);
        assert_eq!(c.store.cache_capacity_bytes, defaults.store.cache_capacity_bytes);
        assert_eq!(c.shutdown_grace, defaults.shutdown_grace);
        assert_eq!(c.store.retain_events, defaults.store.retain_events);
        assert_eq!(c.store.feed_buffer_events, defaults.store.feed_buffer_events);
        assert_eq!(c.grpc.max_subscriptions, defaults.grpc.max_subscriptions);
        assert_eq!(c.grpc.subscription_buffer, defaults.grpc.subscription_buffer);
        assert_eq!(c.grpc.progress_interval, defaults.grpc.progress_interval);
        assert_eq!(c.grpc.max_message_bytes, defaults.grpc.max_message_bytes);
        assert_eq!(c.grpc.max_concurrent_streams, defaults.grpc.max_concurrent_streams);
        assert_eq!(c.grpc.keepalive_interval, defaults.grpc.keepalive_interval);
        assert_eq!(c.grpc.keepalive_timeout, defaults.grpc.keepalive_timeout);
        assert_eq!(c.grpc.request_timeout, defaults.grpc.request_timeout);
        assert_eq!(c.sources.len(), 3);
    }

    #[test]
    fn every_auth_scheme_parses() {
        let text = format!(
            "[http]\naddr = \"0.0.0.0:8080\"\ntrusted_proxies = [\"10.0.0.1\", \"fd00::/8\"]\n{}\n{}\n{}\n{}",
            source("scheme = \"hmac\", header = \"x-sig\", secrets = [\"a-key-of-at-least-24-bytes\"], encoding = \"base64\", prefix = \"sha256=\"").replace("\"a\"", "\"h\""),
            source("scheme = \"basic\", credentials = [{ username = \"u\", password = \"p\" }]").replace("\"a\"", "\"b\""),
            source("scheme = \"ip_allowlist\", allow = [\"203.0.113.0/24\", \"2001:db8::1\"], second_factor = { query = \"token\", secrets = [\"t\"] }").replace("\"a\"", "\"w\""),
            source("scheme = \"header\", header = \"x-api-key\", secrets = [\"k1\", \"k2\"]").replace("\"a\"", "\"k\""),
        );
        let c = Config::from_toml(&text, &no_env).unwrap();
        assert_eq!(c.sources.len(), 4);
        assert_eq!(c.http.trusted_proxies.len(), 2);
        let debug = format!("{c:?}");
        for secret in ["a-key-of-at-least-24-bytes", "\"p\"", "k1", "k2"] {
            assert!(!debug.contains(secret), "{secret} leaked into Debug");
        }
    }

    #[test]
    fn public_listeners_without_authentication_need_an_explicit_opt_in() {
        let open = "[http]\naddr = \"0.0.0.0:8080\"\nallow_unauthenticated_public = true\n[grpc]\naddr = \"0.0.0.0:50051\"\nallow_unauthenticated_public = true\n";
        assert!(Config::from_toml(open, &no_env).is_ok());
        let token = "[grpc]\naddr = \"0.0.0.0:50051\"\nbearer_tokens = [\"0123456789abcdef\"]\n";
        assert!(Config::from_toml(token, &no_env).is_ok(), "a bearer token is authentication");
        let short = "[grpc]\nbearer_tokens = [\"short\"]\n";
        assert!(Config::from_toml(short, &no_env).unwrap_err().to_string().contains("at least 16 bytes"));
        let no_pem = "[grpc]\ntls = { cert_file = \"/nonexistent.pem\", key_file = \"/nonexistent.key\" }\n";
        assert!(Config::from_toml(no_pem, &no_env).unwrap_err().to_string().contains("grpc.tls.cert_file"));
    }

    #[test]
    fn an_allowlist_takes_a_pasted_txt_record() {
        let text =
            source("scheme = \"ip_allowlist\", allow = [\"\\\"203.0.113.0/24 198.51.100.7, 2001:db8::/32\\\"\"]");
        let c = Config::from_toml(&text, &no_env).unwrap();
        let AuthConfig::IpAllowlist { allow, .. } = &c.sources[0].auth else { panic!("not an allowlist") };
        let shown: Vec<String> = allow.iter().map(|n| n.0.to_string()).collect();
        assert_eq!(shown, ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"]);
    }

    #[test]
    fn an_allowlist_of_everyone_counts_as_open() {
        let text = format!(
            "[http]\naddr = \"0.0.0.0:8080\"\n{}",
            source("scheme = \"ip_allowlist\", allow = [\"0.0.0.0/0\"]")
        );
        assert!(Config::from_toml(&text, &no_env).unwrap_err().to_string().contains("no authentication"));
    }

    #[test]
    fn authenticated_source_may_listen_publicly() {
        let text = "[http]\naddr = \"0.0.0.0:8080\"\n[[sources]]\nname = \"om\"\nprovider = \"ordermesh\"\nauth = { scheme = \"header\", header = \"x-s\", secrets = [\"s3cret\"] }";
        let c = Config::from_toml(text, &no_env).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"), "secrets must be redacted in Debug");
    }
}
