//! Tests of config parsing, defaults, overrides and validation.
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
        "ORDERTRAIL_STORE_BACKEND" => Some("sled".to_string()),
        _ => None,
    };
    let c = Config::from_toml("[http]\naddr = \"127.0.0.1:2\"\n", &env).unwrap();
    assert_eq!(c.http.addr.port(), 1);
    assert_eq!(c.store.backend, Backend::Sled);
    assert_eq!(c.store.data_dir, PathBuf::from("/tmp/x"));
    assert_eq!(c.store.durability, Durability::Flush);
}

#[test]
fn the_sled_settings_have_their_own_table_and_an_unknown_backend_is_named() {
    let c = Config::from_toml("[store]\nbackend = \"sled\"\n[store.sled]\ncache_capacity_bytes = 1048576\n", &no_env)
        .unwrap();
    assert_eq!(c.store.sled.cache_capacity_bytes, 1 << 20);
    let env = |k: &str| (k == "ORDERTRAIL_STORE_BACKEND").then(|| "mysql".to_string());
    let err = Config::from_toml("", &env).unwrap_err().to_string();
    assert!(err.contains("ORDERTRAIL_STORE_BACKEND") && err.contains("sled, postgres"), "{err}");
}

#[test]
fn bad_configs_are_refused_with_one_line() {
    let cases = [
        ("[http]\naddr = \"nope\"", "http.addr"),
        ("[htp]\naddr = \"127.0.0.1:1\"", "unknown field"),
        ("[store]\ndurability = \"sometimes\"", "invalid config"),
        ("[store]\nbackend = \"mysql\"", "invalid config"),
        // sled's settings live in their own table.
        ("[store]\ncache_capacity_bytes = 1", "unknown field"),
        ("[[sources]]\nname = \"A B\"\nprovider = \"ordermesh\"", "must be 1 to 64"),
        ("[[sources]]\nname = \"a\"\nprovider = \"nobody\"", "invalid config"),
        (
            "[[sources]]\nname = \"a\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"a\"\nprovider = \"withings\"",
            "used twice",
        ),
        ("[http]\naddr = \"0.0.0.0:8080\"", "no authentication"),
        ("[grpc]\naddr = \"0.0.0.0:50051\"", "allow_unauthenticated_public"),
        ("[admin]\naddr = \"0.0.0.0:9090\"", "admin.allow_unauthenticated_public"),
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
    let example = include_str!("../../ordertrail.example.toml");
    let c = Config::from_toml(example, &no_env).unwrap();
    let defaults = Config::from_toml("", &no_env).unwrap();
    assert_eq!(c.http.addr, defaults.http.addr);
    assert_eq!(c.http.body_limit_bytes, defaults.http.body_limit_bytes);
    assert_eq!(c.http.header_read_timeout, defaults.http.header_read_timeout);
    assert_eq!(c.http.body_read_timeout, defaults.http.body_read_timeout);
    assert_eq!(c.http.max_connections, defaults.http.max_connections);
    assert_eq!(c.http.body_memory_bytes, defaults.http.body_memory_bytes);
    assert_eq!(c.http.max_unverified_bodies, defaults.http.max_unverified_bodies);
    assert_eq!(c.http.unverified_body_timeout, defaults.http.unverified_body_timeout);
    assert_eq!(c.grpc.addr, defaults.grpc.addr);
    assert_eq!(c.admin.addr, defaults.admin.addr);
    assert_eq!(c.store.data_dir, defaults.store.data_dir);
    assert_eq!(c.store.durability, defaults.store.durability);
    assert_eq!(c.store.sled.cache_capacity_bytes, defaults.store.sled.cache_capacity_bytes);
    assert_eq!(c.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(c.store.retain_events, defaults.store.retain_events);
    assert_eq!(c.store.feed_buffer_events, defaults.store.feed_buffer_events);
    assert_eq!(c.store.verify_on_start, defaults.store.verify_on_start);
    assert_eq!(c.grpc.max_subscriptions, defaults.grpc.max_subscriptions);
    assert_eq!(c.grpc.max_subscriptions_per_peer, defaults.grpc.max_subscriptions_per_peer);
    assert_eq!(c.grpc.subscription_buffer, defaults.grpc.subscription_buffer);
    assert_eq!(c.grpc.progress_interval, defaults.grpc.progress_interval);
    assert_eq!(c.grpc.max_message_bytes, defaults.grpc.max_message_bytes);
    assert_eq!(c.grpc.max_concurrent_streams, defaults.grpc.max_concurrent_streams);
    assert_eq!(c.grpc.keepalive_interval, defaults.grpc.keepalive_interval);
    assert_eq!(c.grpc.keepalive_timeout, defaults.grpc.keepalive_timeout);
    assert_eq!(c.grpc.request_timeout, defaults.grpc.request_timeout);
    assert_eq!(c.grpc.max_connections, defaults.grpc.max_connections);
    assert_eq!(c.grpc.preface_timeout, defaults.grpc.preface_timeout);
    assert_eq!(c.handover_timeout, defaults.handover_timeout);
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
    let text = source("scheme = \"ip_allowlist\", allow = [\"\\\"203.0.113.0/24 198.51.100.7, 2001:db8::/32\\\"\"]");
    let c = Config::from_toml(&text, &no_env).unwrap();
    let AuthConfig::IpAllowlist { allow, .. } = &c.sources[0].auth else { panic!("not an allowlist") };
    let shown: Vec<String> = allow.iter().map(|n| n.0.to_string()).collect();
    assert_eq!(shown, ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"]);
}

#[test]
fn an_allowlist_can_follow_dns_txt_records() {
    let text = source(
        "scheme = \"ip_allowlist\", dns_txt = [\"ipblock-notify.withings.net\"], refresh_ms = 60000, \
         dns_server = \"127.0.0.1:5353\", min_prefix = { v4 = 16, v6 = 48 }",
    );
    let c = Config::from_toml(&text, &no_env).unwrap();
    let AuthConfig::IpAllowlist { allow, dns_txt, refresh_ms, dns_server, min_prefix, .. } = &c.sources[0].auth else {
        panic!("not an allowlist")
    };
    assert!(allow.is_empty(), "static entries are optional beside a record");
    assert_eq!(dns_txt, &["ipblock-notify.withings.net"]);
    assert_eq!((*refresh_ms, dns_server.map(|a| a.to_string())), (Some(60000), Some("127.0.0.1:5353".into())));
    assert_eq!(*min_prefix, MinPrefix { v4: 16, v6: 48 });
    let defaults = Config::from_toml(&source("scheme = \"ip_allowlist\", dns_txt = [\"a.example\"]"), &no_env).unwrap();
    let AuthConfig::IpAllowlist { min_prefix, .. } = &defaults.sources[0].auth else { panic!("not an allowlist") };
    assert_eq!(*min_prefix, MinPrefix { v4: 8, v6: 32 });
    for (bad, says) in [
        ("scheme = \"ip_allowlist\"", "dns_txt records"),
        ("scheme = \"ip_allowlist\", dns_txt = [\"not a name\"]", "is not a DNS name"),
        ("scheme = \"ip_allowlist\", dns_txt = [\"a.example\"], refresh_ms = 0", "refresh_ms"),
        ("scheme = \"ip_allowlist\", dns_txt = [\"a.example\"], min_prefix = { v4 = 0, v6 = 32 }", "min_prefix"),
        ("scheme = \"ip_allowlist\", dns_txt = [\"a.example\"], dns_server = \"nowhere\"", "invalid socket address"),
    ] {
        let err = Config::from_toml(&source(bad), &no_env).unwrap_err().to_string();
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn an_allowlist_of_everyone_counts_as_open() {
    let text =
        format!("[http]\naddr = \"0.0.0.0:8080\"\n{}", source("scheme = \"ip_allowlist\", allow = [\"0.0.0.0/0\"]"));
    assert!(Config::from_toml(&text, &no_env).unwrap_err().to_string().contains("no authentication"));
}

#[test]
fn authenticated_source_may_listen_publicly() {
    let text = "[http]\naddr = \"0.0.0.0:8080\"\n[[sources]]\nname = \"om\"\nprovider = \"ordermesh\"\nauth = { scheme = \"header\", header = \"x-s\", secrets = [\"s3cret\"] }";
    let c = Config::from_toml(text, &no_env).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"), "secrets must be redacted in Debug");
}

#[test]
fn ipv4_mapped_networks_match_the_ipv4_peers_they_name() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let single: Network = "::ffff:203.0.113.7".parse().unwrap();
    assert!(single.contains(&ip("203.0.113.7")));
    assert!(single.contains(&ip("::ffff:203.0.113.7")), "a peer seen through a dual-stack socket");
    assert!(!single.contains(&ip("203.0.113.8")));
    let range: Network = "::ffff:10.0.0.0/104".parse().unwrap();
    assert_eq!(range, "10.0.0.0/8".parse().unwrap());
    let plain: Network = "2001:db8::/32".parse().unwrap();
    assert!(plain.contains(&ip("2001:db8::1")));
}

#[test]
fn config_errors_never_quote_a_secret() {
    let cases = [
        "[grpc]\nbearer_tokens = [\"s3cret-token-value-0123456789\" oops]",
        "[grpc]\nbearer_tokens = \"s3cret-token-value-0123456789\"",
        "[[sources]]\nname = \"o\"\nprovider = \"ordermesh\"\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = \"s3cret-token-value-0123456789\" }",
    ];
    for text in cases {
        let err = Config::from_toml(text, &no_env).unwrap_err().to_string();
        assert!(err.starts_with("invalid config"), "{err}");
        assert!(!err.contains("s3cret"), "{text:?} gave {err:?}");
        assert!(!err.contains('\n'), "{err:?}");
    }
    let err = Config::from_toml("[http]\naddr = 12", &no_env).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn cluster_example_config_is_valid_in_its_containers() {
    let example = include_str!("../../examples/cluster/ordertrail.toml");
    // What the Dockerfile and the compose file put in the environment.
    let env = |key: &str| {
        let value = match key {
            "ORDERTRAIL_HTTP_ADDR" => "0.0.0.0:8080",
            "ORDERTRAIL_GRPC_ADDR" => "0.0.0.0:50051",
            "ORDERTRAIL_ADMIN_ADDR" => "0.0.0.0:9090",
            "ORDERTRAIL_STORE_BACKEND" => "postgres",
            "ORDERTRAIL_POSTGRES_URL" => "postgres://ordertrail:ordertrail@postgres:5432/ordertrail",
            _ => return None,
        };
        Some(value.to_string())
    };
    let c = Config::from_toml(example, &env).unwrap();
    assert_eq!(c.store.backend, Backend::Postgres);
    assert_eq!(c.sources.len(), 2);
}
