//! The authentication matrix per scheme, against the real server: correct,
//! wrong, missing, empty, a prefix of the secret, the secret plus a byte,
//! the header twice; allowlisted and other peers; forged X-Forwarded-For.
//! Every rejection stores nothing.

use crate::common::{TestServer, fixture};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};

const HMAC_KEY: &str = "an-hmac-key-of-at-least-24-bytes";

fn order_body() -> Bytes {
    Bytes::from(fixture("ordermesh/order-creation.json"))
}

fn sign(body: &[u8], key: &str) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Posts `body` to `path` with extra headers; returns the status code.
async fn post(server: &TestServer, path: &str, headers: &[(&str, String)], body: Bytes) -> u16 {
    let mut all = vec![("content-type", "application/json")];
    all.extend(headers.iter().map(|(n, v)| (*n, v.as_str())));
    server.request("POST", path, &all, body).await.status.as_u16()
}

/// Checks that nothing at all was stored by the rejected requests: the first
/// accepted delivery gets raw id 1.
async fn assert_nothing_stored_then_accept(server: &TestServer, path: &str, headers: &[(&str, String)], body: Bytes) {
    assert!(server.delivery(1).await.is_none(), "a rejected request was stored");
    assert!(server.all_events().await.is_empty());
    let answer = {
        let mut all = vec![("content-type", "application/json")];
        all.extend(headers.iter().map(|(n, v)| (*n, v.as_str())));
        server.request("POST", path, &all, body).await
    };
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["raw_id"], 1);
}

/// The secret variants every header-based scheme must refuse.
fn wrong_values(good: &str) -> Vec<Vec<String>> {
    vec![
        vec![],
        vec![String::new()],
        vec![good[..good.len() - 1].to_string()],
        vec![format!("{good}x")],
        vec![good.replace(|c: char| c.is_ascii_alphabetic(), "z")],
        vec![good.to_string(), good.to_string()],
    ]
}

#[tokio::test]
async fn winkelstraat_api_key_with_rotation() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"old-key-123\", \"new-key-456\"] }\n",
    )
    .await;
    let path = "/webhooks/winkelstraat/invoice";
    let body = Bytes::from(fixture("winkelstraat/invoice.json"));
    for values in wrong_values("new-key-456") {
        let headers: Vec<(&str, String)> = values.into_iter().map(|v| ("x-api-key", v)).collect();
        assert_eq!(post(&server, path, &headers, body.clone()).await, 401, "{headers:?}");
    }
    assert_nothing_stored_then_accept(&server, path, &[("x-api-key", "new-key-456".into())], body.clone()).await;
    let old = post(&server, path, &[("x-api-key", "old-key-123".into())], Bytes::from_static(b"{\"x\":1}")).await;
    assert_eq!(old, 202, "the old key still works during rotation (body is authentic, not understood)");
    let stored = server.delivery(1).await.unwrap();
    assert!(!stored.headers.contains_key("x-api-key"), "the key is never stored");
}

#[tokio::test]
async fn ordermesh_http_basic() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"om\"\nprovider = \"ordermesh\"\nauth = { scheme = \"basic\", credentials = [{ username = \"ordermesh\", password = \"s3cret-pass\" }] }\n",
    )
    .await;
    let encode = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
    let good = "ordermesh:s3cret-pass";
    for values in wrong_values(good) {
        let headers: Vec<(&str, String)> =
            values.into_iter().map(|v| ("authorization", if v.is_empty() { v } else { encode(&v) })).collect();
        assert_eq!(post(&server, "/webhooks/om", &headers, order_body()).await, 401, "{headers:?}");
    }
    assert_eq!(post(&server, "/webhooks/om", &[("authorization", "Bearer x".into())], order_body()).await, 401);
    assert_nothing_stored_then_accept(&server, "/webhooks/om", &[("authorization", encode(good))], order_body()).await;
    let stored = server.delivery(1).await.unwrap();
    assert_eq!(stored.auth_method, "basic");
    assert!(!stored.headers.contains_key("authorization"), "credentials are never stored");
}

#[tokio::test]
async fn ordermesh_hmac_hex_and_base64() {
    let server = TestServer::start_with(&format!(
        "[[sources]]\nname = \"hex\"\nprovider = \"ordermesh\"\nauth = {{ scheme = \"hmac\", header = \"x-signature\", secrets = [\"{HMAC_KEY}\"], prefix = \"sha256=\" }}\n\
         [[sources]]\nname = \"b64\"\nprovider = \"ordermesh\"\nauth = {{ scheme = \"hmac\", header = \"x-signature\", secrets = [\"{HMAC_KEY}\"], encoding = \"base64\" }}\n"
    ))
    .await;
    let body = order_body();
    let good = format!("sha256={}", hex::encode(sign(&body, HMAC_KEY)));
    for values in wrong_values(&good) {
        let headers: Vec<(&str, String)> = values.into_iter().map(|v| ("x-signature", v)).collect();
        assert_eq!(post(&server, "/webhooks/hex", &headers, body.clone()).await, 401, "{headers:?}");
    }
    let other_key = format!("sha256={}", hex::encode(sign(&body, "another-key-of-24-bytes-or-more")));
    assert_eq!(post(&server, "/webhooks/hex", &[("x-signature", other_key)], body.clone()).await, 401);
    let tampered = Bytes::from(body.iter().copied().map(|b| if b == b'2' { b'3' } else { b }).collect::<Vec<_>>());
    assert_eq!(post(&server, "/webhooks/hex", &[("x-signature", good.clone())], tampered).await, 401);
    assert_nothing_stored_then_accept(&server, "/webhooks/hex", &[("x-signature", good)], body.clone()).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(sign(&body, HMAC_KEY));
    assert_eq!(
        post(&server, "/webhooks/b64", &[("x-signature", hex::encode(sign(&body, HMAC_KEY)))], body.clone()).await,
        401
    );
    assert_eq!(post(&server, "/webhooks/b64", &[("x-signature", b64)], body).await, 200);
}

/// Posts a Withings form notification; returns the status code.
async fn form(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
    all.extend_from_slice(headers);
    let body = Bytes::from_static(b"customer_ref=MREF-1001&status=OPEN");
    server.request("POST", path, &all, body).await.status.as_u16()
}

#[tokio::test]
async fn withings_ip_allowlist_and_second_factor() {
    let server = TestServer::start_with(
        "[[sources]]\nname = \"elsewhere\"\nprovider = \"withings\"\nauth = { scheme = \"ip_allowlist\", allow = [\"203.0.113.0/24\", \"2001:db8::/32\"] }\n\
         [[sources]]\nname = \"local\"\nprovider = \"withings\"\nauth = { scheme = \"ip_allowlist\", allow = [\"127.0.0.0/8\"], second_factor = { query = \"token\", secrets = [\"tok-123\"] } }\n",
    )
    .await;
    // The test client is 127.0.0.1: not in the allowlist. A forged
    // X-Forwarded-For from an untrusted peer changes nothing.
    assert_eq!(form(&server, "/webhooks/elsewhere", &[]).await, 403);
    assert_eq!(form(&server, "/webhooks/elsewhere", &[("x-forwarded-for", "203.0.113.5")]).await, 403);
    // Allowlisted, but the second factor is missing or wrong.
    for path in
        ["/webhooks/local", "/webhooks/local?token=", "/webhooks/local?token=tok-12", "/webhooks/local?token=tok-1234"]
    {
        assert_eq!(form(&server, path, &[]).await, 401, "{path}");
    }
    assert_eq!(form(&server, "/webhooks/local?token=tok-123&token=tok-123", &[]).await, 401);
    assert!(server.delivery(1).await.is_none(), "a rejected request was stored");
    assert_eq!(form(&server, "/webhooks/local?token=tok-123", &[]).await, 200);
    let stored = server.delivery(1).await.unwrap();
    assert_eq!(stored.auth_method, "ip_allowlist+secret");
    assert_eq!(stored.peer_addr.split(':').next(), Some("127.0.0.1"));
}

#[tokio::test]
async fn x_forwarded_for_counts_only_through_a_trusted_proxy() {
    let server = TestServer::start_with(
        "[http]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [[sources]]\nname = \"withings\"\nprovider = \"withings\"\nauth = { scheme = \"ip_allowlist\", allow = [\"203.0.113.0/24\"] }\n",
    )
    .await;
    let post_from = |xff: Vec<&'static str>| {
        let headers: Vec<(&str, &str)> = xff.into_iter().map(|v| ("x-forwarded-for", v)).collect();
        let server = &server;
        async move { form(server, "/webhooks/withings", &headers).await }
    };
    assert_eq!(post_from(vec![]).await, 403, "the proxy itself is not allowlisted");
    assert_eq!(post_from(vec!["198.51.100.7"]).await, 403);
    // The client put a forged allowlisted address first; the proxy appended
    // the real one, which is what counts.
    assert_eq!(post_from(vec!["203.0.113.5, 198.51.100.7"]).await, 403);
    assert_eq!(post_from(vec!["not-an-ip"]).await, 403);
    assert!(server.delivery(1).await.is_none());
    assert_eq!(post_from(vec!["198.51.100.7, 203.0.113.5"]).await, 200);
    assert_eq!(post_from(vec!["203.0.113.5, 127.0.0.1"]).await, 200, "trusted hops are skipped");
}
