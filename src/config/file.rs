//! The TOML file format: every key optional, unknown keys refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{AuthConfig, Backend, ConfigError, Durability, GrpcTls, Network, RateLimit, Secret};
use crate::provider::Provider;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) http: FileHttp,
    #[serde(default)]
    pub(super) grpc: FileGrpc,
    #[serde(default)]
    pub(super) admin: FileAdmin,
    #[serde(default)]
    pub(super) store: FileStore,
    pub(super) sources: Option<Vec<FileSource>>,
    pub(super) shutdown_grace_ms: Option<u64>,
    pub(super) handover_timeout_ms: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHttp {
    pub(super) addr: Option<String>,
    pub(super) body_limit_bytes: Option<usize>,
    pub(super) header_read_timeout_ms: Option<u64>,
    pub(super) body_read_timeout_ms: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) body_memory_bytes: Option<usize>,
    pub(super) max_unverified_bodies: Option<usize>,
    pub(super) unverified_body_timeout_ms: Option<u64>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Network>,
    #[serde(default)]
    pub(super) allow_unauthenticated_public: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGrpc {
    pub(super) addr: Option<String>,
    #[serde(default)]
    pub(super) allow_unauthenticated_public: bool,
    pub(super) max_subscriptions: Option<usize>,
    pub(super) max_subscriptions_per_peer: Option<usize>,
    pub(super) subscription_buffer: Option<usize>,
    pub(super) progress_interval_ms: Option<u64>,
    #[serde(default)]
    pub(super) bearer_tokens: Vec<Secret>,
    #[serde(default)]
    pub(super) admin_tokens: Vec<Secret>,
    pub(super) tls: Option<FileTls>,
    pub(super) max_message_bytes: Option<usize>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) keepalive_interval_ms: Option<u64>,
    pub(super) keepalive_timeout_ms: Option<u64>,
    pub(super) request_timeout_ms: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) preface_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
    pub(super) client_ca_file: Option<PathBuf>,
}

impl FileTls {
    pub(super) fn load(self) -> Result<GrpcTls, ConfigError> {
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
            key_pem: Secret::new(String::from_utf8_lossy(&key).into_owned()),
            client_ca_pem: self.client_ca_file.map(|p| read("client_ca_file", &p)).transpose()?,
        })
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) addr: Option<String>,
    #[serde(default)]
    pub(super) allow_unauthenticated_public: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileStore {
    pub(super) backend: Option<Backend>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) durability: Option<Durability>,
    #[serde(default)]
    pub(super) retain_events: u64,
    pub(super) feed_buffer_events: Option<usize>,
    #[cfg(any(test, feature = "test-util"))]
    #[serde(default)]
    pub(super) unsafe_ack_before_durable: bool,
    pub(super) verify_on_start: Option<bool>,
    #[serde(default)]
    pub(super) sled: FileSled,
    #[serde(default)]
    pub(super) postgres: FilePostgres,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePostgres {
    pub(super) url: Option<String>,
    pub(super) pool_size: Option<usize>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) statement_timeout_ms: Option<u64>,
    pub(super) follow_poll_ms: Option<u64>,
    #[cfg(any(test, feature = "test-util"))]
    #[serde(default)]
    pub(super) unsafe_sequence_outside_lock: bool,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSled {
    pub(super) cache_capacity_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSource {
    pub(super) name: String,
    pub(super) provider: Provider,
    #[serde(default = "open_auth")]
    pub(super) auth: AuthConfig,
    pub(super) rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub(super) kind_aliases: std::collections::BTreeMap<String, String>,
}

fn open_auth() -> AuthConfig {
    AuthConfig::None
}
