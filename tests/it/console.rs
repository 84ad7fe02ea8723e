//! The operator console over HTTP, without a browser (the browser test is
//! `browser.rs`): pages read without JavaScript, hostile values render as
//! text, the admin tokens guard it, and re-drive needs POST, the CSRF
//! token and the same origin. Run on both engines.

use crate::common::{TestServer, fixture};

/// An OrderMesh update whose status and description are hostile HTML.
pub const HOSTILE: &str = r#"{"EventType":"OrderUpdate","OrderId":"evil-1","ExternalOrderId":"EVIL-1",
  "NewStatus":"<script>window.hacked=1</script>","OldStatus":"Open",
  "Description":"<img src=x onerror=\"window.hacked=2\"><script>window.hacked=3</script>"}"#;

/// The CSRF token in a console page's forms.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    page[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn the_read_only_pages_work_without_javascript() {
    let server = TestServer::start().await;
    for name in ["order-creation", "order-update", "shipment-created", "shipment-update"] {
        let answer = server.post_json("/webhooks/ordermesh", fixture(&format!("ordermesh/{name}.json"))).await;
        assert_eq!(answer.status, 200);
    }
    let (status, headers, live) = server.console("GET", "/", &[], "").await;
    assert_eq!(status, 200);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert!(live.contains("WBTEST22") && live.contains("shipment updated"), "the events are in the HTML");
    assert!(live.find("/events/4").unwrap() < live.find("/events/1").unwrap(), "newest first");
    let (_, _, filtered) = server.console("GET", "/?kind=shipment+created", &[], "").await;
    assert!(filtered.contains("/events/3") && !filtered.contains("/events/4\""), "filtered by kind");

    let (status, _, found) =
        server.console("GET", "/orders?q=9400136208551280752547&kind=tracking_number", &[], "").await;
    assert_eq!(status, 200);
    assert!(found.contains("Order WBTEST22") && found.contains("USPS"), "found by tracking number");
    assert!(
        found.contains("href=\"https://tools.usps.com/go/TrackConfirmAction.action?tLabels=9400136208551280752547\"")
    );
    let (_, _, delivery) = server.console("GET", "/deliveries/4", &[], "").await;
    let sha = ordertrail::ingest::sha256_hex(&fixture("ordermesh/shipment-update.json"));
    assert!(delivery.contains(&sha) && delivery.contains("&quot;EventType&quot;: &quot;ShipmentUpdate&quot;"));
    for path in ["/events/2", "/quarantine", "/unmapped", "/stats", "/orders/1"] {
        let (status, _, _) = server.console("GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, _, _) = server.console("GET", "/orders/999", &[], "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_hostile_body_renders_as_text() {
    let server = TestServer::start().await;
    assert_eq!(server.post_json("/webhooks/ordermesh", HOSTILE).await.status, 200);
    for path in ["/", "/events/1", "/orders/1", "/deliveries/1", "/unmapped"] {
        let (_, _, page) = server.console("GET", path, &[], "").await;
        assert!(!page.contains("<script>window") && !page.contains("<img src=x"), "{path} carries live markup");
        assert!(page.contains("&lt;script&gt;window.hacked="), "{path} shows the value as text");
    }
}

#[tokio::test]
async fn the_admin_tokens_guard_the_console_and_redrive_needs_csrf_and_the_same_origin() {
    let token = "console-admin-token-0123456789";
    let server = TestServer::start_with(&format!("[grpc]\nadmin_tokens = [\"{token}\"]\n")).await;
    assert_eq!(
        server.post_json("/webhooks/winkelstraat/stock-order", fixture("winkelstraat/order.json")).await.status,
        202
    );
    let (status, headers, _) = server.console("GET", "/", &[], "").await;
    assert_eq!(status, 401, "no token");
    assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Basic"), "the browser asks for it");
    let wrong = format!("Bearer {token}x");
    assert_eq!(server.console("GET", "/", &[("authorization", &wrong)], "").await.0, 401);
    use base64::Engine;
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("ops:{token}")));
    let bearer = format!("Bearer {token}");
    assert_eq!(server.console("GET", "/", &[("authorization", &basic)], "").await.0, 200, "Basic, any user");
    let (status, _, quarantine) = server.console("GET", "/quarantine", &[("authorization", &bearer)], "").await;
    assert_eq!(status, 200);
    let csrf = csrf(&quarantine);
    let form = |csrf: &str| format!("csrf={csrf}&raw_id=1&confirm=yes");
    let host = server.admin_addr.to_string();
    let origin = format!("http://{host}");
    let content = ("content-type", "application/x-www-form-urlencoded");

    let unauthenticated = server.console("POST", "/quarantine/redrive", &[content], &form(&csrf)).await;
    assert_eq!(unauthenticated.0, 401, "re-drive without the token");
    let no_csrf = server
        .console("POST", "/quarantine/redrive", &[content, ("authorization", &bearer)], "raw_id=1&confirm=yes")
        .await;
    assert_eq!(no_csrf.0, 403, "re-drive without the CSRF token");
    let stale =
        server.console("POST", "/quarantine/redrive", &[content, ("authorization", &bearer)], &form("0123")).await;
    assert_eq!(stale.0, 403, "a wrong CSRF token");
    let elsewhere = [content, ("authorization", bearer.as_str()), ("origin", "http://evil.example")];
    assert_eq!(server.console("POST", "/quarantine/redrive", &elsewhere, &form(&csrf)).await.0, 403, "another origin");
    let cross_site = [content, ("authorization", bearer.as_str()), ("sec-fetch-site", "cross-site")];
    assert_eq!(server.console("POST", "/quarantine/redrive", &cross_site, &form(&csrf)).await.0, 403, "cross-site");
    let by_get =
        server.console("GET", &format!("/quarantine/redrive?{}", form(&csrf)), &[("authorization", &bearer)], "").await;
    assert_eq!(by_get.0, 404, "no re-drive by GET");
    let (_, _, still) = server.console("GET", "/quarantine", &[("authorization", &bearer)], "").await;
    assert!(still.contains("href=\"/deliveries/1\""), "nothing was re-driven");
    assert_eq!(server.head().await, 0, "nothing was re-driven");

    let same =
        [content, ("authorization", bearer.as_str()), ("origin", origin.as_str()), ("sec-fetch-site", "same-origin")];
    let (status, _, result) = server.console("POST", "/quarantine/redrive", &same, &form(&csrf)).await;
    assert_eq!(status, 200, "{result}");
    assert!(result.contains("still quarantined"), "the kind is still unknown: {result}");
}

#[tokio::test]
async fn a_dry_run_changes_nothing_and_the_confirmed_redrive_applies() {
    let server = TestServer::start().await;
    let order = fixture("winkelstraat/order.json");
    assert_eq!(server.post_json("/webhooks/winkelstraat/stock-order", order).await.status, 202);
    let taught = "[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\nkind_aliases = { stock-order = \"order\" }\n";
    let server = server.restart_with(taught).await;
    let (_, _, quarantine) = server.console("GET", "/quarantine", &[], "").await;
    assert!(quarantine.contains("unknown Winkelstraat kind"), "{quarantine}");
    let csrf = csrf(&quarantine);
    let content = ("content-type", "application/x-www-form-urlencoded");
    let (status, _, dry) =
        server.console("POST", "/quarantine/redrive", &[content], &format!("csrf={csrf}&raw_id=1")).await;
    assert_eq!(status, 200);
    assert!(dry.contains("id=\"dry-run\"") && dry.contains("would be applied"), "{dry}");
    assert!(dry.contains("name=\"confirm\" value=\"yes\""), "a confirmation form");
    assert_eq!(server.quarantine().await.len(), 1, "a dry run changes nothing");
    assert_eq!(server.head().await, 0);
    let confirmed = format!("csrf={csrf}&raw_id=1&confirm=yes");
    let (status, _, done) = server.console("POST", "/quarantine/redrive", &[content], &confirmed).await;
    assert_eq!(status, 200);
    assert!(done.contains("id=\"result\"") && done.contains("1 applied"), "{done}");
    assert!(server.quarantine().await.is_empty());
    assert_eq!(server.head().await, 1, "the delivery's event is in the log");
}

#[tokio::test]
async fn an_order_history_pages_on() {
    let server = TestServer::start().await;
    assert_eq!(server.post_json("/webhooks/ordermesh", fixture("ordermesh/order-creation.json")).await.status, 200);
    for n in 0..205 {
        let update = format!(
            r#"{{"EventType":"OrderUpdate","OrderId":"670e58fe7741035996cf7d20","ExternalOrderId":"WBTEST22","NewStatus":"Processing","OldStatus":"Open","RequestId":"r-{n}"}}"#
        );
        assert_eq!(server.post_json("/webhooks/ordermesh", update).await.status, 200);
    }
    let (_, _, first) = server.console("GET", "/orders/1", &[], "").await;
    assert_eq!(first.matches("<li class=").count(), 200, "one page of the history");
    assert!(first.contains("href=\"/orders/1?after=200\""), "a link to the rest");
    let (_, _, rest) = server.console("GET", "/orders/1?after=200", &[], "").await;
    assert_eq!(rest.matches("<li class=").count(), 6);
    assert!(rest.contains("href=\"/events/206\"") && !rest.contains("Later events"));
}
