//! Source authentication settings, secrets and networks, and their
//! validation.

use std::fmt;

use serde::Deserialize;

use super::{ConfigError, SourceConfig};

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
        #[serde(default, deserialize_with = "networks")]
        allow: Vec<Network>,
        /// DNS TXT records whose ranges are allowed too, followed while
        /// running (Withings: `ipblock-notify.withings.net`).
        #[serde(default)]
        dns_txt: Vec<String>,
        /// The longest wait between two lookups of the records, in ms (a
        /// record's TTL, within bounds, makes it sooner).
        #[serde(default)]
        refresh_ms: Option<u64>,
        /// The DNS server to ask (`host:port`) instead of the system's.
        #[serde(default)]
        dns_server: Option<std::net::SocketAddr>,
        /// The broadest ranges a record's answer may hold.
        #[serde(default)]
        min_prefix: MinPrefix,
        /// An optional shared secret as a second factor.
        #[serde(default)]
        second_factor: Option<SecondFactor>,
    },
}

/// The shortest prefixes a DNS-published range may have: a broader one is
/// taken for a mistake (or an attack), not for a sender's range, and the
/// answer holding it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinPrefix {
    pub v4: u8,
    pub v6: u8,
}

impl Default for MinPrefix {
    fn default() -> Self {
        Self { v4: 8, v6: 32 }
    }
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
            .map(|net| Self(unmapped(net)))
            .map_err(|_| format!("`{s}` is not an IP network like 10.0.0.0/8 or 2001:db8::/32"))
    }
}

/// An IPv4-mapped IPv6 network (`::ffff:203.0.113.7`, `::ffff:10.0.0.0/104`)
/// as the IPv4 network it means: peers are compared in their canonical
/// form, so the mapped form would never match.
fn unmapped(net: ipnet::IpNet) -> ipnet::IpNet {
    if let ipnet::IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return ipnet::IpNet::V4(v4);
    }
    net
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

/// A host name as DNS writes it: dot-separated labels of letters, digits,
/// `-` and `_` (as in `_spf`), each 1–63 bytes, 253 in all.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl AuthConfig {
    /// True when the scheme lets anyone in.
    pub fn is_open(&self) -> bool {
        match self {
            Self::None => true,
            Self::IpAllowlist { allow, second_factor, .. } => {
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

/// Shortest gRPC bearer token accepted.
pub const MIN_BEARER_TOKEN_BYTES: usize = 16;

/// Shortest HMAC key accepted.
pub const MIN_HMAC_SECRET_BYTES: usize = 24;

pub(super) fn validate_source(source: &SourceConfig) -> Result<(), ConfigError> {
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
    if !source.kind_aliases.is_empty() && source.provider != crate::provider::Provider::Winkelstraat {
        return Err(ConfigError::new(format!("sources.{name}.kind_aliases: only Winkelstraat sources have kinds")));
    }
    if let Some((alias, kind)) =
        source.kind_aliases.iter().find(|(_, kind)| !crate::provider::WINKELSTRAAT_KINDS.contains(&kind.as_str()))
    {
        return Err(ConfigError::new(format!(
            "sources.{name}.kind_aliases: `{alias}` maps to `{kind}`, which is not one of {}",
            crate::provider::WINKELSTRAAT_KINDS.join(", ")
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
        AuthConfig::IpAllowlist { allow, second_factor, dns_txt, refresh_ms, min_prefix, .. } => {
            if allow.is_empty() && dns_txt.is_empty() {
                return fail("allow", "must list at least one network, or name dns_txt records to follow");
            }
            if let Some(name) = dns_txt.iter().find(|name| !is_dns_name(name)) {
                return fail("dns_txt", &format!("`{name}` is not a DNS name"));
            }
            if *refresh_ms == Some(0) {
                return fail("refresh_ms", "must be greater than 0");
            }
            if !(1..=32).contains(&min_prefix.v4) || !(1..=128).contains(&min_prefix.v6) {
                return fail("min_prefix", "v4 must be 1 to 32 and v6 1 to 128");
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
