//! Allowlists that follow a DNS TXT record (Withings publishes its range
//! in one), against a real DNS server on loopback whose answers the tests
//! change: a changed record is followed without a restart, failing, empty
//! and absurd answers keep the last good list, a restart without DNS starts
//! with the remembered list, and refused senders are counted by network.
//! Senders are told apart by `X-Forwarded-For` through a trusted proxy on
//! loopback.

use bytes::Bytes;
use ordertrail::testing::DnsServer;
use ordertrail::testing::dns::Answer as Says;

use crate::common::{TestServer, sample};

const RECORD: &str = "ipblock-notify.example";

/// One Withings source allowing `allow` (TOML strings) and following
/// [`RECORD`] on `dns`, looked up every 100 ms.
fn config(dns: std::net::SocketAddr, allow: &str) -> String {
    format!(
        "[http]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [[sources]]\nname = \"withings\"\nprovider = \"withings\"\n\
         auth = {{ scheme = \"ip_allowlist\", allow = [{allow}], dns_txt = [\"{RECORD}\"], dns_server = \"{dns}\", refresh_ms = 100 }}\n"
    )
}

/// A Withings notification from `sender`: the status code.
async fn from(server: &TestServer, sender: &str) -> u16 {
    let body = Bytes::from(format!("customer_ref=MREF-{sender}&status=OPEN"));
    let headers = [("content-type", "application/x-www-form-urlencoded"), ("x-forwarded-for", sender)];
    server.request("POST", "/webhooks/withings", &headers, body).await.status.as_u16()
}

fn txt(text: &str) -> Says {
    Says::Txt(vec![text.to_string()], 300)
}

const CHANGES: &str = "ordertrail_allowlist_changes_total{source=\"withings\",record=\"ipblock-notify.example\"}";
const ENTRIES: &str = "ordertrail_allowlist_entries{source=\"withings\",record=\"ipblock-notify.example\"}";
const AGE: &str = "ordertrail_allowlist_last_refresh_seconds{source=\"withings\",record=\"ipblock-notify.example\"}";

fn failures(reason: &str) -> String {
    format!(
        "ordertrail_allowlist_refresh_failures_total{{source=\"withings\",record=\"ipblock-notify.example\",reason=\"{reason}\"}}"
    )
}

fn refused(network: &str) -> String {
    format!("ordertrail_allowlist_refused_total{{source=\"withings\",network=\"{network}\"}}")
}

#[tokio::test]
async fn a_changed_record_is_followed_without_a_restart() {
    let dns = DnsServer::start();
    dns.set(RECORD, txt("198.51.100.0/24"));
    let server = TestServer::start_with(&config(dns.addr, "\"192.0.2.10\"")).await;
    server.metric_becomes(CHANGES, |n| n == 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "the record's range");
    assert_eq!(from(&server, "192.0.2.10").await, 200, "the static entry");
    assert_eq!(from(&server, "203.0.113.9").await, 403, "neither");

    dns.set(RECORD, txt("203.0.113.0/24"));
    server.metric_becomes(CHANGES, |n| n == 2.0).await;
    assert_eq!(from(&server, "203.0.113.9").await, 200, "the new range, without a restart");
    assert_eq!(from(&server, "198.51.100.7").await, 403, "the removed range");
    assert_eq!(from(&server, "192.0.2.10").await, 200, "the static entry stays");

    let page = server.metrics().await;
    assert_eq!(sample(&page, ENTRIES), Some(1.0), "{page}");
    assert!(sample(&page, AGE).is_some_and(|age| age < 60.0), "{page}");
    assert_eq!(sample(&page, &refused("203.0.113.0/24")), Some(1.0), "{page}");
    assert_eq!(sample(&page, &refused("198.51.100.0/24")), Some(1.0), "{page}");
    assert_eq!(server.all_orders().await.len(), 3, "one order per accepted sender, none for a refused one");
    let (_, _, stats) = server.console("GET", "/stats", &[], "").await;
    assert!(
        stats.contains("<code>ipblock-notify.example</code>") && stats.contains("<code>203.0.113.0/24</code>"),
        "{stats}"
    );
}

#[tokio::test]
async fn failing_empty_and_absurd_answers_keep_the_last_good_list() {
    let dns = DnsServer::start();
    dns.set(RECORD, txt("198.51.100.0/24"));
    let server = TestServer::start_with(&config(dns.addr, "")).await;
    server.metric_becomes(CHANGES, |n| n == 1.0).await;

    dns.set(RECORD, Says::Failure);
    server.metric_becomes(&failures("lookup"), |n| n >= 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "a failed lookup keeps the last good list");

    dns.set(RECORD, Says::Txt(vec![String::new()], 300));
    server.metric_becomes(&failures("empty"), |n| n >= 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "an empty answer keeps the last good list");

    dns.set(RECORD, txt("include:_spf.example v=ipblock1"));
    server.metric_becomes(&failures("empty"), |n| n >= 2.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "an answer of unknown tokens keeps the last good list");

    dns.set(RECORD, txt("198.51.100.0/24 0.0.0.0/0"));
    server.metric_becomes(&failures("too_broad"), |n| n >= 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200);
    assert_eq!(from(&server, "192.0.2.99").await, 403, "an absurd answer never opens the door");

    let timeouts = sample(&server.metrics().await, &failures("lookup")).unwrap();
    dns.set(RECORD, Says::Silence);
    server.metric_becomes(&failures("lookup"), |n| n > timeouts).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "a lookup that times out keeps the last good list");

    let page = server.metrics().await;
    assert_eq!(sample(&page, CHANGES), Some(1.0), "none of these was a change: {page}");
    assert_eq!(sample(&page, ENTRIES), Some(1.0), "{page}");
}

#[tokio::test]
async fn a_restart_without_dns_starts_with_the_remembered_list() {
    let dns = DnsServer::start();
    dns.set(RECORD, txt("198.51.100.0/24 2001:db8:5::/48"));
    let server = TestServer::start_with(&config(dns.addr, "\"192.0.2.10\"")).await;
    server.metric_becomes(CHANGES, |n| n == 1.0).await;
    drop(dns);

    // Nothing answers at the DNS server's address any more.
    let server = server.restart().await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "remembered, before any lookup could succeed");
    assert_eq!(from(&server, "2001:db8:5::1").await, 200);
    assert_eq!(from(&server, "203.0.113.9").await, 403);
    server.metric_becomes(&failures("lookup"), |n| n >= 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "failed lookups keep the remembered list");
    let page = server.metrics().await;
    assert_eq!(sample(&page, CHANGES), None, "remembering is not a change: {page}");
    assert_eq!(sample(&page, ENTRIES), Some(2.0), "{page}");
    assert!(sample(&page, AGE).is_some(), "the age of the remembered answer: {page}");
    let ready = server.request("GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json["allowlists"][0]["networks"], serde_json::json!(["198.51.100.0/24", "2001:db8:5::/48"]));
}

/// The negative control of the remembered list: without a good answer
/// ever, only the static entries apply, and `/readyz` says so.
#[tokio::test]
async fn without_any_good_answer_the_static_entries_alone_apply() {
    let dns = DnsServer::start();
    dns.set(RECORD, Says::Failure);
    let server = TestServer::start_with(&config(dns.addr, "\"192.0.2.10\"")).await;
    server.metric_becomes(&failures("lookup"), |n| n >= 1.0).await;
    assert_eq!(from(&server, "192.0.2.10").await, 200);
    assert_eq!(from(&server, "198.51.100.7").await, 403);
    let ready = server.request("GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!(ready.status, 200, "static entries still work: ready");
    let detail = &ready.json["allowlists"][0];
    assert_eq!(detail["record"], RECORD);
    assert_eq!(detail["networks"], serde_json::json!([]));
    assert!(detail["note"].as_str().unwrap().contains("no DNS-derived entries yet"), "{detail}");
    let page = server.metrics().await;
    assert_eq!(sample(&page, ENTRIES), Some(0.0), "{page}");
    assert_eq!(sample(&page, AGE), None, "no age without an answer: {page}");

    dns.set(RECORD, txt("198.51.100.0/24"));
    server.metric_becomes(CHANGES, |n| n == 1.0).await;
    assert_eq!(from(&server, "198.51.100.7").await, 200, "the first good answer applies");
}

#[tokio::test]
async fn ipv4_ipv6_cidrs_separators_and_garbage_in_a_record() {
    let dns = DnsServer::start();
    let strings = ["\"198.51.100.0/24, 2001:db8:7::/48; 203.0.113.7\"", "include:_spf.example\t192.0.2.128/25"];
    dns.set(RECORD, Says::Txt(strings.iter().map(|s| s.to_string()).collect(), 300));
    let server = TestServer::start_with(&config(dns.addr, "")).await;
    server.metric_becomes(CHANGES, |n| n == 1.0).await;
    for allowed in ["198.51.100.9", "2001:db8:7::1", "203.0.113.7", "192.0.2.200"] {
        assert_eq!(from(&server, allowed).await, 200, "{allowed}");
    }
    for refused in ["203.0.113.8", "2001:db8:8::1", "192.0.2.1"] {
        assert_eq!(from(&server, refused).await, 403, "{refused}");
    }
    let page = server.metrics().await;
    assert_eq!(sample(&page, ENTRIES), Some(4.0), "the garbage token was skipped: {page}");
}
