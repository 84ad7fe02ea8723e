//! Per-source authentication of a webhook request, before anything is
//! stored. Secrets and signatures are compared in constant time, against
//! every configured secret (no early exit), so timing tells nothing.

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, header};
use subtle::{Choice, ConstantTimeEq};

use crate::config::{AuthConfig, BasicCredential, Network, SecondFactor, Secret, SignatureEncoding};

/// Why a request was refused. Nothing of it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Credentials missing or wrong: 401.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// The sender is not allowed at all: 403.
    #[error("sender not allowed")]
    Forbidden,
}

/// Proof that a request passed its source's authentication, naming the
/// method that passed. Only [`verify`] makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    method: &'static str,
}

impl Verified {
    /// The authentication method that passed, recorded as provenance.
    pub fn method(&self) -> &'static str {
        self.method
    }
}

/// What authentication may look at.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub headers: &'a HeaderMap,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The URL query string, if any.
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: &'a [Network],
    /// What the source's followed DNS records allow now, beside its
    /// static `allow` entries.
    pub followed: &'a [Network],
}

/// Checks a request against its source's authentication settings.
pub fn verify(auth: &AuthConfig, facts: &RequestFacts<'_>) -> Result<Verified, AuthError> {
    let ok = |method| Ok(Verified { method });
    match auth {
        AuthConfig::None => ok("none"),
        AuthConfig::Header { header, secrets } => {
            let value = single_header(facts.headers, header).ok_or(AuthError::Unauthorized)?;
            if matches_any(value, secrets) { ok("header") } else { Err(AuthError::Unauthorized) }
        }
        AuthConfig::Basic { credentials } => {
            if basic_matches(facts.headers, credentials) {
                ok("basic")
            } else {
                Err(AuthError::Unauthorized)
            }
        }
        AuthConfig::Hmac { header, secrets, encoding, prefix } => {
            let value = single_header(facts.headers, header).ok_or(AuthError::Unauthorized)?;
            let signature = decode_signature(value, prefix, *encoding).ok_or(AuthError::Unauthorized)?;
            if hmac_matches(&signature, facts.body, secrets) { ok("hmac") } else { Err(AuthError::Unauthorized) }
        }
        AuthConfig::IpAllowlist { allow, second_factor, .. } => {
            let ip = sender(facts).ok_or(AuthError::Forbidden)?;
            if !allow.iter().chain(facts.followed).any(|net| net.contains(&ip)) {
                return Err(AuthError::Forbidden);
            }
            match second_factor {
                None => ok("ip_allowlist"),
                Some(factor) if second_factor_matches(factor, facts) => ok("ip_allowlist+secret"),
                Some(_) => Err(AuthError::Unauthorized),
            }
        }
    }
}

/// Checks what can be checked before the body is read: everything for
/// every scheme but HMAC, and for HMAC that the signature header is there
/// and well-formed. `Ok(true)` when the request is already authenticated
/// (the body cannot change that), `Ok(false)` when only the body can tell.
/// A stranger is thus refused without the body being read (and without
/// `100 Continue` being sent).
pub fn verify_headers(auth: &AuthConfig, facts: &RequestFacts<'_>) -> Result<bool, AuthError> {
    match auth {
        AuthConfig::Hmac { header, encoding, prefix, .. } => {
            let value = single_header(facts.headers, header).ok_or(AuthError::Unauthorized)?;
            decode_signature(value, prefix, *encoding).ok_or(AuthError::Unauthorized)?;
            Ok(false)
        }
        other => verify(other, facts).map(|_| true),
    }
}

/// The value of a header sent exactly once.
fn single_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value.as_bytes()),
        _ => None,
    }
}

/// Constant-time comparison against every configured secret.
fn matches_any(presented: &[u8], secrets: &[Secret]) -> bool {
    let mut matched = Choice::from(0u8);
    for secret in secrets {
        matched |= presented.ct_eq(secret.expose());
    }
    !presented.is_empty() && bool::from(matched)
}

fn basic_matches(headers: &HeaderMap, credentials: &[BasicCredential]) -> bool {
    let Some(value) = single_header(headers, header::AUTHORIZATION.as_str()) else { return false };
    let Some(encoded) = value.get(..6).filter(|p| p.eq_ignore_ascii_case(b"basic ")).map(|_| &value[6..]) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()) else { return false };
    let mut matched = Choice::from(0u8);
    for credential in credentials {
        let mut expected = credential.username.as_bytes().to_vec();
        expected.push(b':');
        expected.extend_from_slice(credential.password.expose());
        matched |= decoded.as_slice().ct_eq(&expected);
    }
    bool::from(matched)
}

fn decode_signature(value: &[u8], prefix: &str, encoding: SignatureEncoding) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let text = text.strip_prefix(prefix)?;
    match encoding {
        SignatureEncoding::Hex => hex::decode(text).ok(),
        SignatureEncoding::Base64 => {
            // Standard or URL-safe alphabet, padded or not.
            let standard: String = text.trim_end_matches('=').replace('-', "+").replace('_', "/");
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(standard).ok()
        }
    }
}

fn hmac_matches(signature: &[u8], body: &[u8], secrets: &[Secret]) -> bool {
    let mut matched = Choice::from(0u8);
    for secret in secrets {
        // HMAC accepts keys of any length, so this cannot fail.
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.expose()) else { continue };
        mac.update(body);
        matched |= mac.finalize().into_bytes().as_slice().ct_eq(signature);
    }
    bool::from(matched)
}

fn second_factor_matches(factor: &SecondFactor, facts: &RequestFacts<'_>) -> bool {
    if let Some(name) = &factor.header {
        return single_header(facts.headers, name).is_some_and(|v| matches_any(v, &factor.secrets));
    }
    let Some(name) = &factor.query else { return false };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(facts.query.unwrap_or("")).unwrap_or_default();
    let mut values = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    match (values.next(), values.next()) {
        (Some(value), None) => matches_any(value.as_bytes(), &factor.secrets),
        _ => false,
    }
}

/// The sender's address, as an allowlist checks it (see [`client_ip`]).
pub fn sender(facts: &RequestFacts<'_>) -> Option<IpAddr> {
    client_ip(facts.headers, facts.peer, facts.trusted_proxies)
}

/// The sender's address: the TCP peer, unless the peer is a trusted proxy;
/// then the rightmost `X-Forwarded-For` hop that is not a trusted proxy.
/// `None` when a hop that must be believed cannot be parsed.
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trusted: &[Network]) -> Option<IpAddr> {
    let peer_ip = peer.ip().to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer_ip) {
        return Some(peer_ip);
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let text = value.to_str().ok()?;
        hops.extend(text.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from));
    }
    let mut client = peer_ip;
    for hop in hops.iter().rev() {
        client = parse_hop(hop)?;
        if !is_trusted(&client) {
            return Some(client);
        }
    }
    Some(client)
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip())).ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(headers: &'a HeaderMap, body: &'a [u8], query: Option<&'a str>) -> RequestFacts<'a> {
        RequestFacts {
            headers,
            peer: "127.0.0.1:5000".parse().unwrap(),
            query,
            body,
            trusted_proxies: &[],
            followed: &[],
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn nets(list: &[&str]) -> Vec<Network> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn header_secret_matrix() {
        let auth = AuthConfig::Header {
            header: "x-secret".into(),
            secrets: vec![Secret::new("old-key"), Secret::new("new-key")],
        };
        let check = |values: &[&str]| {
            let h = headers(&values.iter().map(|v| ("x-secret", *v)).collect::<Vec<_>>());
            verify(&auth, &facts(&h, b"", None))
        };
        assert_eq!(check(&["new-key"]).unwrap().method(), "header");
        assert!(check(&["old-key"]).is_ok(), "rotated keys are all accepted");
        for bad in [&[][..], &[""], &["new-ke"], &["new-keyX"], &["wrong"], &["new-key", "new-key"]] {
            assert_eq!(check(bad), Err(AuthError::Unauthorized), "{bad:?}");
        }
    }

    #[test]
    fn basic_matrix() {
        let auth = AuthConfig::Basic {
            credentials: vec![BasicCredential { username: "shop".into(), password: Secret::new("pa:ss") }],
        };
        let encode = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        let check = |values: &[String]| {
            let h = headers(&values.iter().map(|v| ("authorization", v.as_str())).collect::<Vec<_>>());
            verify(&auth, &facts(&h, b"", None))
        };
        assert_eq!(check(&[encode("shop:pa:ss")]).unwrap().method(), "basic");
        assert!(check(&[encode("shop:pa:ss").replace("Basic", "basic")]).is_ok());
        for bad in [
            vec![],
            vec![encode("shop:pa:s")],
            vec![encode("shop:pa:ssX")],
            vec![encode("shop")],
            vec![encode("")],
            vec!["Basic !!!".into()],
            vec!["Bearer x".into()],
            vec![encode("shop:pa:ss"), encode("shop:pa:ss")],
        ] {
            assert_eq!(check(&bad), Err(AuthError::Unauthorized), "{bad:?}");
        }
    }

    #[test]
    fn hmac_hex_and_base64() {
        let key = "0123456789abcdef01234567";
        let body = b"{\"EventType\":\"OrderUpdate\"}";
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
        mac.update(body);
        let raw = mac.finalize().into_bytes().to_vec();
        let hex_auth = AuthConfig::Hmac {
            header: "x-signature".into(),
            secrets: vec![Secret::new(key)],
            encoding: SignatureEncoding::Hex,
            prefix: "sha256=".into(),
        };
        let b64_auth = AuthConfig::Hmac {
            header: "x-signature".into(),
            secrets: vec![Secret::new(key)],
            encoding: SignatureEncoding::Base64,
            prefix: String::new(),
        };
        let check = |auth: &AuthConfig, sig: &str, body: &[u8]| {
            let h = headers(&[("x-signature", sig)]);
            verify(auth, &facts(&h, body, None))
        };
        let hex_sig = format!("sha256={}", hex::encode(&raw));
        assert_eq!(check(&hex_auth, &hex_sig, body).unwrap().method(), "hmac");
        assert!(check(&hex_auth, &hex_sig.to_uppercase().replace("SHA256=", "sha256="), body).is_ok());
        assert!(check(&hex_auth, &hex::encode(&raw), body).is_err(), "prefix required");
        assert!(check(&hex_auth, &hex_sig, b"{\"EventType\":\"OrderUpdatf\"}").is_err(), "body changed");
        assert!(check(&hex_auth, &hex_sig[..hex_sig.len() - 2], body).is_err(), "truncated");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert!(check(&b64_auth, &b64, body).is_ok());
        assert!(check(&b64_auth, b64.trim_end_matches('='), body).is_ok());
        assert!(check(&b64_auth, &format!("{b64}x"), body).is_err());
    }

    /// A static allowlist (no DNS record followed).
    fn allowlist(allow: Vec<Network>, second_factor: Option<SecondFactor>) -> AuthConfig {
        AuthConfig::IpAllowlist {
            allow,
            dns_txt: Vec::new(),
            refresh_ms: None,
            dns_server: None,
            min_prefix: crate::config::MinPrefix::default(),
            second_factor,
        }
    }

    #[test]
    fn ip_allowlist_uses_the_peer_unless_it_is_a_trusted_proxy() {
        let allow = nets(&["203.0.113.0/24", "2001:db8::/32"]);
        let auth = allowlist(allow, None);
        let trusted = nets(&["127.0.0.1"]);
        let check = |peer: &str, xff: &[&str], trusted: &[Network]| {
            let h = headers(&xff.iter().map(|v| ("x-forwarded-for", *v)).collect::<Vec<_>>());
            let f = RequestFacts {
                headers: &h,
                peer: peer.parse().unwrap(),
                query: None,
                body: b"",
                trusted_proxies: trusted,
                followed: &[],
            };
            verify(&auth, &f)
        };
        assert!(check("203.0.113.7:1", &[], &[]).is_ok());
        assert!(check("[2001:db8::1]:1", &[], &[]).is_ok());
        assert!(check("[::ffff:203.0.113.7]:1", &[], &[]).is_ok(), "IPv4-mapped IPv6");
        assert_eq!(check("198.51.100.1:1", &[], &[]), Err(AuthError::Forbidden));
        // A forged header from an untrusted peer is ignored.
        assert_eq!(check("127.0.0.1:1", &["203.0.113.7"], &[]), Err(AuthError::Forbidden));
        // Through a trusted proxy, the rightmost untrusted hop counts.
        assert!(check("127.0.0.1:1", &["203.0.113.7"], &trusted).is_ok());
        assert!(check("127.0.0.1:1", &["198.51.100.9, 203.0.113.7, 127.0.0.1"], &trusted).is_ok());
        assert_eq!(check("127.0.0.1:1", &["203.0.113.7, 198.51.100.9"], &trusted), Err(AuthError::Forbidden));
        assert_eq!(check("127.0.0.1:1", &["203.0.113.7", "198.51.100.9"], &trusted), Err(AuthError::Forbidden));
        assert_eq!(check("127.0.0.1:1", &["garbage"], &trusted), Err(AuthError::Forbidden));
        assert!(check("127.0.0.1:1", &["203.0.113.7:4711"], &trusted).is_ok());
    }

    #[test]
    fn a_followed_record_allows_beside_the_static_entries() {
        let auth = allowlist(nets(&["203.0.113.0/24"]), None);
        let none = HeaderMap::new();
        let check = |peer: &str, followed: &[Network]| {
            let f = RequestFacts { peer: peer.parse().unwrap(), followed, ..facts(&none, b"", None) };
            verify(&auth, &f)
        };
        let followed = nets(&["198.51.100.0/24", "2001:db8::/48"]);
        assert!(check("203.0.113.7:1", &followed).is_ok(), "static");
        assert!(check("198.51.100.7:1", &followed).is_ok(), "followed");
        assert!(check("[2001:db8::9]:1", &followed).is_ok(), "followed IPv6");
        assert_eq!(check("198.51.100.7:1", &[]), Err(AuthError::Forbidden), "not followed any more");
        assert_eq!(check("192.0.2.1:1", &followed), Err(AuthError::Forbidden));
    }

    #[test]
    fn second_factor_in_query_or_header() {
        let allow = nets(&["127.0.0.0/8"]);
        let by_query = allowlist(
            allow.clone(),
            Some(SecondFactor { query: Some("token".into()), header: None, secrets: vec![Secret::new("s3cret")] }),
        );
        let none = HeaderMap::new();
        let check = |query: Option<&str>| verify(&by_query, &facts(&none, b"", query));
        assert_eq!(check(Some("token=s3cret")).unwrap().method(), "ip_allowlist+secret");
        assert!(check(Some("a=1&token=s3cret")).is_ok());
        for bad in [
            None,
            Some(""),
            Some("token="),
            Some("token=s3cre"),
            Some("token=s3cret&token=s3cret"),
            Some("tokens=s3cret"),
        ] {
            assert_eq!(check(bad), Err(AuthError::Unauthorized), "{bad:?}");
        }
        let by_header = allowlist(
            allow,
            Some(SecondFactor { query: None, header: Some("x-token".into()), secrets: vec![Secret::new("s3cret")] }),
        );
        let good = headers(&[("x-token", "s3cret")]);
        assert!(verify(&by_header, &facts(&good, b"", None)).is_ok());
        assert_eq!(verify(&by_header, &facts(&none, b"", Some("x-token=s3cret"))), Err(AuthError::Unauthorized));
    }

    #[test]
    fn open_source_passes() {
        assert_eq!(verify(&AuthConfig::None, &facts(&HeaderMap::new(), b"", None)).unwrap().method(), "none");
    }
}
