//! The operator console in a real browser: headless Chromium (Debian's
//! `chromium`, never a download), driven over the DevTools protocol. Webhooks
//! of all three providers arrive live without a reload, an order is found
//! by its tracking number, its history and a raw delivery open, a hostile
//! body stays text, and a quarantined delivery is dry-run and re-driven
//! after its source learns a kind alias. Each page is saved as a
//! screenshot under the test's temp dir (the path is printed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use futures::StreamExt;

use crate::common::{TestServer, fixture};

/// Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it).
const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with a fresh profile that talks to nothing but the
/// pages it is sent to.
async fn browser(profile: &Path) -> Browser {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: install Debian's `chromium` package");
    let config = BrowserConfig::builder()
        .chrome_executable(CHROMIUM)
        .no_sandbox()
        .new_headless_mode()
        .user_data_dir(profile)
        .window_size(1280, 900)
        .viewport(None)
        .args([
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .request_timeout(Duration::from_secs(30))
        .build()
        .expect("browser config");
    let (browser, mut handler) = Browser::launch(config).await.expect("start Chromium");
    tokio::spawn(async move { while handler.next().await.is_some() {} });
    browser
}

/// Waits until `condition` (a JavaScript expression) is true on `page`.
async fn until(page: &Page, condition: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = page.evaluate(condition).await.ok().and_then(|result| result.into_value::<bool>().ok());
        if value == Some(true) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let url = page.url().await.ok().flatten().unwrap_or_default();
            panic!("never true in the browser: {condition}\nat {url}:\n{}", text(page).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text(page: &Page) -> String {
    page.evaluate("document.body.innerText").await.unwrap().into_value().unwrap()
}

async fn shoot(page: &Page, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.png"));
    page.save_screenshot(ScreenshotParams::builder().full_page(true).build(), &path).await.expect("screenshot");
    path
}

/// Clicks what `selector` finds and waits for the next page to show
/// `condition`.
async fn click(page: &Page, selector: &str, condition: &str) {
    page.find_element(selector).await.unwrap_or_else(|e| panic!("{selector}: {e}")).click().await.unwrap();
    until(page, condition).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let server = TestServer::start().await;
    let shots = tempfile::Builder::new().prefix("console-screenshots-").tempdir().unwrap().keep();
    let profile = tempfile::tempdir().unwrap();
    let browser = browser(profile.path()).await;
    let console = format!("http://{}", server.admin_addr);

    // The live list is open before anything arrives.
    let page = browser.new_page(format!("{console}/")).await.unwrap();
    until(&page, "document.getElementById('pause') !== null").await;
    page.evaluate("window.notReloaded = true").await.unwrap();
    for name in ["order-creation", "order-update", "shipment-created", "shipment-update"] {
        let body = fixture(&format!("ordermesh/{name}.json"));
        assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    let withings = fixture("withings/created.form");
    assert_eq!(server.post("/webhooks/withings", "application/x-www-form-urlencoded", withings).await.status, 200);
    assert_eq!(server.post_json("/webhooks/winkelstraat/order", fixture("winkelstraat/order.json")).await.status, 200);
    assert_eq!(server.post_json("/webhooks/ordermesh", crate::console::HOSTILE).await.status, 200);
    let quarantined = fixture("winkelstraat/order-nulls-and-unknown-status.json");
    assert_eq!(server.post_json("/webhooks/winkelstraat/stock-order", quarantined).await.status, 202);
    let head = server.head().await;
    until(&page, &format!("document.querySelector('#events tr').dataset.sequence === '{head}'")).await;
    until(&page, &format!("document.querySelectorAll('#events tr').length === {head}")).await;
    let live: bool = page.evaluate("window.notReloaded === true").await.unwrap().into_value().unwrap();
    assert!(live, "the rows arrived without a reload");
    let shown = text(&page).await;
    for provider in ["withings", "winkelstraat", "ordermesh"] {
        assert!(shown.contains(provider), "{provider} is in the live list");
    }
    assert!(shown.contains("<script>window.hacked=1</script>"), "the hostile status is shown as text");
    let hacked: bool = page.evaluate("window.hacked !== undefined").await.unwrap().into_value().unwrap();
    assert!(!hacked, "no script of a webhook ran");
    // Reloaded, the counts above the list are current too.
    page.reload().await.unwrap();
    until(&page, "document.getElementById('pause') !== null").await;
    until(&page, &format!("document.querySelectorAll('#events tr').length === {head}")).await;
    assert_eq!(page.find_element("#quarantined").await.unwrap().inner_text().await.unwrap().as_deref(), Some("1"));
    let live_shot = shoot(&page, &shots, "1-live-events").await;

    // Pause holds new rows, resume shows them.
    page.find_element("#pause").await.unwrap().click().await.unwrap();
    let withings_again = fixture("withings/address-verification.form");
    assert_eq!(
        server.post("/webhooks/withings", "application/x-www-form-urlencoded", withings_again).await.status,
        200
    );
    until(&page, "document.getElementById('held').textContent.includes('1 new')").await;
    assert_eq!(
        page.evaluate("document.querySelectorAll('#events tr').length").await.unwrap().into_value::<u64>().unwrap(),
        head
    );
    page.find_element("#pause").await.unwrap().click().await.unwrap();
    until(&page, &format!("document.querySelectorAll('#events tr').length === {}", head + 1)).await;

    // An order by its tracking number, its history, a raw delivery.
    page.goto(format!("{console}/orders")).await.unwrap();
    until(&page, "document.querySelector('form.search') !== null").await;
    page.find_element("input[name=q]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap()
        .type_str("9400136208551280752547")
        .await
        .unwrap();
    page.evaluate("document.querySelector('select[name=kind]').value = 'tracking_number'").await.unwrap();
    click(&page, "form.search button", "document.title.startsWith('Order WBTEST22')").await;
    let order = text(&page).await;
    assert!(order.contains("USPS") && order.contains("9400136208551280752547"), "{order}");
    assert_eq!(
        page.evaluate("document.querySelectorAll('ol.timeline li').length").await.unwrap().into_value::<u64>().unwrap(),
        4
    );
    let order_shot = shoot(&page, &shots, "2-order").await;
    click(&page, "ol.timeline li:last-child a[href^='/deliveries/']", "document.title.startsWith('Delivery')").await;
    let delivery = text(&page).await;
    let sha = ordertrail::ingest::sha256_hex(&fixture("ordermesh/shipment-update.json"));
    assert!(delivery.contains(&sha) && delivery.contains("\"EventType\": \"ShipmentUpdate\""), "{delivery}");
    let delivery_shot = shoot(&page, &shots, "3-raw-delivery").await;

    // The hostile event's page shows its values as text.
    page.goto(format!("{console}/orders?q=EVIL-1")).await.unwrap();
    until(&page, "document.title.startsWith('Order EVIL-1')").await;
    click(&page, "ol.timeline li a[href^='/events/']", "document.title.startsWith('Event')").await;
    assert!(text(&page).await.contains("<img src=x onerror=\"window.hacked=2\"><script>window.hacked=3</script>"));
    let hacked: bool = page
        .evaluate("window.hacked !== undefined || document.querySelector('main img, main script') !== null")
        .await
        .unwrap()
        .into_value()
        .unwrap();
    assert!(!hacked, "the hostile description is text, not markup");
    let event_shot = shoot(&page, &shots, "4-event").await;

    // The source learns the kind; the quarantined delivery is dry-run,
    // then re-driven.
    let taught = "[[sources]]\nname = \"winkelstraat\"\nprovider = \"winkelstraat\"\nkind_aliases = { stock-order = \"order\" }\n\
                  [[sources]]\nname = \"ordermesh\"\nprovider = \"ordermesh\"\n[[sources]]\nname = \"withings\"\nprovider = \"withings\"\n";
    let server = server.restart_with(taught).await;
    page.goto(format!("{console}/quarantine")).await.unwrap();
    until(&page, "document.querySelector('table.quarantine') !== null").await;
    assert!(text(&page).await.contains("unknown Winkelstraat kind `stock-order`"));
    let quarantine_shot = shoot(&page, &shots, "5-quarantine").await;
    click(&page, "table.quarantine form button", "document.getElementById('dry-run') !== null").await;
    assert!(text(&page).await.contains("would be applied"));
    until(&page, "document.querySelectorAll('ul.observations li').length === 1").await;
    let dry_run_shot = shoot(&page, &shots, "6-redrive-dry-run").await;
    click(&page, "#confirm", "document.getElementById('result') !== null").await;
    let result = text(&page).await;
    assert!(result.contains("1 applied"), "{result}");
    let redriven_shot = shoot(&page, &shots, "7-redriven").await;
    click(&page, "table.redrive a[href^='/deliveries/']", "document.title.startsWith('Delivery')").await;
    assert!(text(&page).await.contains("applied"));
    assert!(server.quarantine().await.is_empty(), "the delivery left the quarantine");

    page.goto(format!("{console}/unmapped")).await.unwrap();
    until(&page, "document.title.startsWith('Unmapped')").await;
    assert!(text(&page).await.contains("<script>window.hacked=1</script>"));
    let unmapped_shot = shoot(&page, &shots, "8-unmapped").await;
    // Stats: a subscriber (a second live list) and some traffic, charted
    // once a few samples are taken (the page reloads itself).
    let _subscriber = browser.new_page(format!("{console}/")).await.unwrap();
    for i in 0..20 {
        let body = format!(
            r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","ExternalOrderId":"E-{i}"}}"#
        );
        assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    page.goto(format!("{console}/stats")).await.unwrap();
    until(&page, "document.querySelectorAll('figure.chart').length === 3").await;
    until(
        &page,
        "(document.querySelector('figure.chart polyline')?.getAttribute('points') || '').split(' ').length >= 3",
    )
    .await;
    assert!(text(&page).await.contains("behind the head"), "the subscriber is listed");
    let stats_shot = shoot(&page, &shots, "9-stats").await;

    println!("console screenshots in {}", shots.display());
    for shot in [
        live_shot,
        order_shot,
        delivery_shot,
        event_shot,
        quarantine_shot,
        dry_run_shot,
        redriven_shot,
        unmapped_shot,
        stats_shot,
    ] {
        assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "{} is a picture", shot.display());
    }
    drop(browser);
    server.stop().await;
}
