//! The `ordertrail` binary itself: config errors, start-up from the
//! environment, graceful exit on SIGTERM, and `ordertrail tail`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ordertrail");

fn run_with(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("ORDERTRAIL_CONFIG").env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run ordertrail")
}

#[test]
fn bad_config_exits_64_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[http]\naddr = \"not an address\"\n").unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--config", file.to_str().unwrap()], vec![], "http.addr"),
        (vec!["--config", "/nonexistent/ordertrail.toml"], vec![], "cannot read config file"),
        (vec![], vec![("ORDERTRAIL_DURABILITY", "sometimes")], "ORDERTRAIL_DURABILITY"),
        (vec![], vec![("ORDERTRAIL_HTTP_ADDR", "0.0.0.0:8080")], "no authentication"),
        // The console on a public admin listener needs the admin tokens.
        (vec![], vec![("ORDERTRAIL_ADMIN_ADDR", "0.0.0.0:0")], "admin.allow_unauthenticated_public"),
        (vec![], vec![("ORDERTRAIL_CONFIG", file.to_str().unwrap())], "http.addr"),
    ];
    for (args, env, expected) in cases {
        let output = run_with(&args, &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// A malformed import is bad input, not a storage outage: exit 65 with the
/// line it stopped at, and nothing of it is stored.
#[test]
fn a_malformed_import_line_exits_65_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.ndjson");
    std::fs::write(&file, "{\"not\": \"an exported delivery\"}\n").unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let output = run_with(&["import", file.to_str().unwrap()], &[("ORDERTRAIL_DATA_DIR", data)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("import line 1"), "{stderr}");
    assert!(!stderr.contains("storage unavailable"), "{stderr}");
    let export = run_with(&["export", "--out", "/dev/null"], &[("ORDERTRAIL_DATA_DIR", data)]);
    assert!(String::from_utf8_lossy(&export.stderr).contains("exported 0 deliveries"), "nothing was stored");
}

/// Starts the binary on ephemeral loopback ports with `data_dir`, stderr
/// piped (the start-up line names the addresses).
fn spawn_server(args: &[&str], data_dir: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .args(args)
        .env_remove("ORDERTRAIL_CONFIG")
        .env("RUST_LOG", "info")
        .env("ORDERTRAIL_HTTP_ADDR", "127.0.0.1:0")
        .env("ORDERTRAIL_GRPC_ADDR", "127.0.0.1:0")
        .env("ORDERTRAIL_ADMIN_ADDR", "127.0.0.1:0")
        .env("ORDERTRAIL_DATA_DIR", data_dir)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ordertrail")
}

#[test]
fn starts_from_the_environment_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_server(&[], dir.path());
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving =
        lines.by_ref().map_while(Result::ok).find(|line| line.contains("ordertrail serving")).expect("a start-up line");
    let http = serving.split("http=").nth(1).and_then(|s| s.split_whitespace().next()).expect("http address");
    let body =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ordermesh/order-creation.json")).unwrap();
    let answer = post_std(http, "/webhooks/ordermesh", &body);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(dir.path().join("sled").exists(), "data lives in the configured data dir");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("ordertrail stopped")), "{rest:?}");
}

/// A minimal HTTP/1.1 POST over a std socket; returns the whole answer.
fn post_std(addr: &str, path: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

async fn post(server: &crate::common::TestServer, i: usize) {
    let body =
        format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","ExternalOrderId":"E-{i}"}}"#);
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_events_and_resumes_after_a_server_restart() {
    use tokio::io::AsyncBufReadExt;
    let server = crate::common::TestServer::start().await;
    post(&server, 1).await;
    let mut child = tokio::process::Command::new(BIN)
        .args(["tail", "--after", "0", "--json", "--grpc", &server.grpc_addr.to_string()])
        .env_remove("ORDERTRAIL_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start ordertrail tail");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_sequence = async || {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("tail printed nothing")
            .unwrap()
            .expect("tail ended");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(event["kind"], "EVENT_KIND_ORDER_CREATED", "{line}");
        event["sequence"].as_u64().unwrap()
    };
    post(&server, 2).await;
    assert_eq!(next_sequence().await, 1);
    assert_eq!(next_sequence().await, 2);
    let server = server.restart().await;
    post(&server, 3).await;
    post(&server, 4).await;
    // Resumed after 2: nothing repeated, nothing missed.
    assert_eq!(next_sequence().await, 3);
    assert_eq!(next_sequence().await, 4);
    child.kill().await.unwrap();
}

#[test]
fn a_damaged_database_is_refused_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| spawn_server(args, dir.path());
    // Store some deliveries, then stop cleanly.
    let mut child = run(&[]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.by_ref().map_while(Result::ok).find(|l| l.contains("ordertrail serving")).unwrap();
    let http = serving.split("http=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    for i in 0..50 {
        let body = format!(r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}"}}"#);
        assert!(post_std(&http, "/webhooks/ordermesh", body.as_bytes()).starts_with("HTTP/1.1 200"));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    // Destroy the log: sled would open it as an empty database.
    let db = dir.path().join("sled/db");
    let size = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0x55u8; size]).unwrap();
    let output = run(&[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("damaged") && stderr.contains("refusing to start"), "{stderr}");
    // Still refused on a second try: nothing was silently recreated.
    let again = run(&[]).wait_with_output().unwrap();
    assert_eq!(again.status.code(), Some(65));
    assert!(dir.path().join("ordertrail-state.json").exists());
    // The operator can still get out whatever is readable.
    let export =
        run(&["export", "--out", dir.path().join("salvage.ndjson").to_str().unwrap()]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert_eq!(export.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("50 could not be read"), "the export says what it could not save: {stderr}");
}

/// A stopped sled data dir holding deliveries of every provider (one
/// quarantined), with the events and quarantine it served.
pub(crate) async fn sample_data_dir()
-> (Vec<ordertrail::proto::Event>, Vec<ordertrail::proto::RawDelivery>, tempfile::TempDir) {
    let server = crate::common::TestServer::start().await;
    for name in ["order-creation", "order-update", "shipment-created", "shipment-update"] {
        let body = crate::common::fixture(&format!("ordermesh/{name}.json"));
        assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    let form = "customer_ref=MREF-1001&status=OPEN&parcel_status=in_transit&tracking_number=1Z";
    assert_eq!(server.post("/webhooks/withings", "application/x-www-form-urlencoded", form).await.status, 200);
    for kind in ["order", "shipment", "rma"] {
        let body = crate::common::fixture(&format!("winkelstraat/{kind}.json"));
        assert_eq!(server.post_json(&format!("/webhooks/winkelstraat/{kind}"), body).await.status, 200);
    }
    assert_eq!(server.post_json("/webhooks/ordermesh", vec![0xffu8, 0x00, 0x7b]).await.status, 202);
    let events = server.all_events().await;
    let quarantine = server.quarantine().await;
    (events, quarantine, server.stop().await)
}

/// Runs an `ordertrail` command on `data_dir` with `env`; it must succeed.
/// Returns what it said on stderr.
pub(crate) fn cli(args: &[&str], data_dir: &std::path::Path, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("ORDERTRAIL_CONFIG").env("ORDERTRAIL_DATA_DIR", data_dir);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_rebuilds_identical_state() {
    let (events, quarantine, source) = sample_data_dir().await;
    let file = source.path().join("export.ndjson");
    let file = file.to_str().unwrap();
    let exported = cli(&["export", "--out", file], source.path(), &[]);
    assert!(exported.contains("exported 9 deliveries"), "{exported}");
    let target = tempfile::tempdir().unwrap();
    let imported = cli(&["import", file], target.path(), &[]);
    assert!(imported.contains("imported 8 applied, 1 quarantined, 0 already present"), "{imported}");
    let again = cli(&["import", file], target.path(), &[]);
    assert!(again.contains("imported 0 applied, 0 quarantined, 9 already present"), "{again}");

    let rebuilt = crate::common::TestServer::start_in(target, "").await;
    assert_eq!(rebuilt.all_events().await, events, "events identical, provenance included");
    assert_eq!(rebuilt.quarantine().await, quarantine);
    rebuilt.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_sends_a_bearer_token_and_stops_when_refused() {
    let token = "a-bearer-token-of-sufficient-length";
    let server = crate::common::TestServer::start_with(&format!("[grpc]\nbearer_tokens = [\"{token}\"]\n")).await;
    post(&server, 1).await;
    let grpc = server.grpc_addr.to_string();
    let refused = tokio::process::Command::new(BIN)
        .args(["tail", "--after", "0", "--grpc", &grpc])
        .env_remove("ORDERTRAIL_CONFIG")
        .env_remove("ORDERTRAIL_TOKEN")
        .output();
    let refused = tokio::time::timeout(Duration::from_secs(60), refused).await.expect("tail kept retrying").unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bearer token"), "{refused:?}");
    let mut child = tokio::process::Command::new(BIN)
        .args(["tail", "--after", "0", "--grpc", &grpc])
        .env_remove("ORDERTRAIL_CONFIG")
        .env("ORDERTRAIL_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line =
        tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.expect("no output").unwrap().unwrap();
    assert!(line.starts_with("1 ") && line.contains("ORDER_CREATED"), "{line}");
    child.kill().await.unwrap();
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ordertrail.toml");
    std::fs::write(
        &file,
        "[[sources]]\nname = \"k\"\nprovider = \"winkelstraat\"\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"very-secret-key\"] }\n",
    )
    .unwrap();
    let output =
        run_with(&["check-config", "--config", file.to_str().unwrap()], &[("ORDERTRAIL_GRPC_ADDR", "127.0.0.1:1234")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("127.0.0.1:1234"), "the environment override is shown: {stdout}");
    assert!(stdout.contains("x-api-key") && stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("very-secret-key"), "a secret was printed");
    let bad = run_with(&["check-config"], &[("ORDERTRAIL_BODY_LIMIT_BYTES", "lots")]);
    assert_eq!(bad.status.code(), Some(64));
    assert_eq!(String::from_utf8_lossy(&bad.stderr).trim().lines().count(), 1);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_server(&["--log-format", "json"], dir.path());
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let log: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first}: {e}"));
    assert_eq!(log["fields"]["message"], "ordertrail serving");
    assert_eq!(log["level"], "INFO");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_posts_a_captured_webhook() {
    let server = crate::common::TestServer::start_with(
        "[[sources]]\nname = \"k\"\nprovider = \"winkelstraat\"\nauth = { scheme = \"header\", header = \"x-api-key\", secrets = [\"key-1\"] }\n",
    )
    .await;
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/winkelstraat/shipment.json");
    let http = server.http_addr.to_string();
    let send = |extra: &[&str]| {
        let mut args = vec!["send", "k", file, "--kind", "shipment", "--http", &http];
        args.extend_from_slice(extra);
        tokio::process::Command::new(BIN).args(args).env_remove("ORDERTRAIL_CONFIG").output()
    };
    let refused = send(&[]).await.unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).starts_with("401"), "{refused:?}");
    let sent = send(&["--header", "x-api-key: key-1"]).await.unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert!(String::from_utf8_lossy(&sent.stdout).contains(r#""outcome":"applied""#));
    assert_eq!(server.all_events().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_raw_deliveries_gives_identical_state() {
    let server = crate::common::TestServer::start().await;
    for name in ["order-creation", "order-update", "shipment-created", "shipment-update"] {
        assert_eq!(
            server
                .post_json("/webhooks/ordermesh", crate::common::fixture(&format!("ordermesh/{name}.json")))
                .await
                .status,
            200
        );
    }
    for kind in ["order", "shipment", "rma"] {
        let body = crate::common::fixture(&format!("winkelstraat/{kind}.json"));
        assert_eq!(server.post_json(&format!("/webhooks/winkelstraat/{kind}"), body).await.status, 200);
    }
    assert_eq!(server.post_json("/webhooks/ordermesh", "oops").await.status, 202);
    let events = server.all_events().await;
    let quarantine = server.quarantine().await;
    let orders = server.all_orders().await;
    server.store.remember("allowlist/ipblock.example", b"remembered".to_vec()).await.unwrap();
    let dir = server.stop().await;
    let output = tokio::process::Command::new(BIN)
        .arg("rebuild")
        .env_remove("ORDERTRAIL_CONFIG")
        .env("ORDERTRAIL_DATA_DIR", dir.path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("rebuilt from 8 deliveries (7 applied, 1 quarantined, 0 duplicates)"), "{stderr}");
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("sled.before-rebuild-"));
    assert!(kept, "the old database is kept");
    let rebuilt = crate::common::TestServer::start_in(dir, "").await;
    assert_eq!(rebuilt.all_events().await, events, "byte-identical events");
    assert_eq!(rebuilt.quarantine().await, quarantine);
    let again = rebuilt.all_orders().await;
    assert_eq!(again, orders, "identical orders");
    let remembered = rebuilt.store.remembered().await.unwrap();
    assert_eq!(remembered, [("allowlist/ipblock.example".into(), b"remembered".to_vec())], "carried over");
    rebuilt.stop().await;
}

/// A data dir whose derived state is in an older storage format is refused
/// with one line naming the fix; `ordertrail rebuild` converts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_storage_format_is_refused_until_rebuilt() {
    use ordertrail::proto::GetOrderRequest;
    use ordertrail::proto::get_order_request::Reference;
    let server = crate::common::TestServer::start().await;
    let body = crate::common::fixture("ordermesh/order-creation.json");
    assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    let dir = server.stop().await;
    // What an older build leaves: the same raw deliveries, derived state in
    // format 1.
    ordertrail::store::Store::downgrade_format(dir.path(), 1).unwrap();
    let refused = spawn_server(&[], dir.path()).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("storage format 1") && stderr.contains("ordertrail rebuild"), "{stderr}");
    let rebuilt = run_with(&["rebuild"], &[("ORDERTRAIL_DATA_DIR", dir.path().to_str().unwrap())]);
    assert!(rebuilt.status.success(), "{}", String::from_utf8_lossy(&rebuilt.stderr));
    let server = crate::common::TestServer::start_in(dir, "").await;
    let request =
        GetOrderRequest { reference: Some(Reference::ExternalOrderId("WBTEST22".into())), source: String::new() };
    let order = server.grpc().await.get_order(request).await.unwrap().into_inner();
    assert_eq!(order.references.unwrap().provider_order_id, "670e58fe7741035996cf7d20");
    server.stop().await;
}

/// A data dir of storage format 4 — raw records that carry their body's
/// SHA-256 and dedup key, as format 4 wrote them — is exported by this
/// build and imported into a new data dir in the current format, with the
/// same events (the events' provenance now names the raw delivery only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_format_4_imports_into_the_current_format() {
    use prost::Message;
    let server = crate::common::TestServer::start().await;
    for name in ["order-creation", "order-update", "shipment-created", "shipment-update"] {
        let body = crate::common::fixture(&format!("ordermesh/{name}.json"));
        assert_eq!(server.post_json("/webhooks/ordermesh", body).await.status, 200);
    }
    assert_eq!(server.post_json("/webhooks/ordermesh", "not json").await.status, 202);
    let events = server.all_events().await;
    let mut raws = Vec::new();
    for id in 1..=5 {
        raws.push(server.delivery(id).await.unwrap());
    }
    let old = server.stop().await;
    for raw in &raws {
        assert!(!raw.body_sha256.is_empty() && !raw.dedup_key.is_empty(), "read back whole: {raw:?}");
        ordertrail::store::Store::tamper_raw_record(old.path(), raw.id, Some(&raw.encode_to_vec())).unwrap();
    }
    ordertrail::store::Store::downgrade_format(old.path(), 4).unwrap();
    let export = old.path().join("export.ndjson");
    let exported = run_with(
        &["export", "--out", export.to_str().unwrap()],
        &[("ORDERTRAIL_DATA_DIR", old.path().to_str().unwrap())],
    );
    assert!(exported.status.success(), "{}", String::from_utf8_lossy(&exported.stderr));
    let fresh = tempfile::tempdir().unwrap();
    let imported =
        run_with(&["import", export.to_str().unwrap()], &[("ORDERTRAIL_DATA_DIR", fresh.path().to_str().unwrap())]);
    let stderr = String::from_utf8_lossy(&imported.stderr);
    assert!(imported.status.success() && stderr.contains("4 applied, 1 quarantined"), "{stderr}");
    let server = crate::common::TestServer::start_in(fresh, "").await;
    assert_eq!(server.all_events().await, events, "the same events");
    for raw in &raws {
        let again = server.delivery(raw.id).await.unwrap();
        assert_eq!(again.body_sha256, raw.body_sha256);
        assert_eq!(again.body, raw.body);
    }
    server.stop().await;
}

#[test]
fn a_half_truncated_database_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_server(&[], dir.path());
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = lines.by_ref().map_while(Result::ok).find(|l| l.contains("ordertrail serving")).unwrap();
    let http = serving.split("http=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    for i in 0..300 {
        let body = format!(
            r#"{{"EventType":"OrderCreation","IsSuccessful":true,"OrderId":"o-{i}","Pad":"{}"}}"#,
            "x".repeat(3000)
        );
        assert!(post_std(&http, "/webhooks/ordermesh", body.as_bytes()).starts_with("HTTP/1.1 200"));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let db = dir.path().join("sled/db");
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(file.metadata().unwrap().len() / 2).unwrap();
    let output = spawn_server(&[], dir.path()).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line, no panic: {stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");
    // Export salvages what sled can still read, or says in one line that it
    // cannot: never a crash.
    let output = spawn_server(&["export", "--out", "/dev/null"], dir.path()).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(matches!(output.status.code(), Some(0 | 65)), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_open_file_limit_is_raised_or_the_start_refused() {
    let dir = tempfile::tempdir().unwrap();
    let under_limit = |ulimit: &str, args: &[&str]| {
        Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit {ulimit} 512 && exec \"$0\" \"$@\""))
            .arg(BIN)
            .args(args)
            .env_remove("ORDERTRAIL_CONFIG")
            .env("ORDERTRAIL_HTTP_ADDR", "127.0.0.1:0")
            .env("ORDERTRAIL_GRPC_ADDR", "127.0.0.1:0")
            .env("ORDERTRAIL_ADMIN_ADDR", "127.0.0.1:0")
            .env("ORDERTRAIL_DATA_DIR", dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A hard limit of 512 cannot carry 4096 + 1024 connections.
    let output = under_limit("-n", &[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("open files"), "{stderr}");
    // Only the soft limit is low: it is raised to the hard one.
    let mut child = under_limit("-Sn", &[]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    lines.by_ref().map_while(Result::ok).find(|l| l.contains("ordertrail serving")).expect("a start-up line");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(open_files[3], open_files[4], "soft limit raised to the hard one: {limits}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// A minimal HTTP/1.1 GET over a std socket; returns the body.
fn get_std(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// A followed allowlist record: `check-config` looks it up once and prints
/// the effective list; while serving, each change is logged once, with the
/// ranges added and removed and the tokens skipped, and counted.
#[test]
fn allowlist_changes_are_logged_once_and_counted_and_check_config_resolves_them() {
    use ordertrail::testing::{DnsServer, dns::Answer as Says};
    let dns = DnsServer::start();
    let record = "ipblock-notify.example";
    dns.set(record, Says::Txt(vec!["198.51.100.0/24 include:_spf.example".into()], 300));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ordertrail.toml");
    std::fs::write(
        &file,
        format!(
            "[[sources]]\nname = \"withings\"\nprovider = \"withings\"\n\
             auth = {{ scheme = \"ip_allowlist\", allow = [\"192.0.2.10\"], dns_txt = [\"{record}\"], \
             dns_server = \"{}\", refresh_ms = 100 }}\n",
            dns.addr
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();

    let check = run_with(&["check-config", "--config", config], &[]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let expected = "allowlist of source `withings`:\n  static: 192.0.2.10/32\n  \
                    dns_txt ipblock-notify.example: 198.51.100.0/24 (skipped: include:_spf.example)\n  \
                    effective: 192.0.2.10/32 198.51.100.0/24\n";
    assert!(stdout.contains(expected), "{stdout}");

    let mut child = spawn_server(&["--log-format", "json", "--config", config], &dir.path().join("data"));
    let mut logs = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .map(|line| serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{line}: {e}")));
    let is = |message: &'static str| move |log: &serde_json::Value| log["fields"]["message"] == message;
    let serving = logs.find(is("ordertrail serving")).expect("a start-up line");
    let admin = serving["fields"]["admin"].as_str().unwrap().to_string();
    let http = serving["fields"]["http"].as_str().unwrap().to_string();
    let first = logs.find(is("allowlist changed")).expect("the first answer");
    let fields = |log: &serde_json::Value, name: &str| log["fields"][name].as_str().unwrap_or_default().to_string();
    assert_eq!(
        ["source", "record", "added", "removed", "skipped"].map(|name| fields(&first, name)),
        ["withings", record, "198.51.100.0/24", "", "include:_spf.example"],
        "{first}"
    );
    dns.set(record, Says::Txt(vec!["203.0.113.0/24".into(), "2001:db8::/48".into()], 300));
    let second = logs.find(is("allowlist changed")).expect("the change");
    assert_eq!(
        ["added", "removed", "skipped"].map(|name| fields(&second, name)),
        ["203.0.113.0/24 2001:db8::/48", "198.51.100.0/24", ""],
        "{second}"
    );
    // More lookups find the same record: no more changes.
    let asked = dns.questions();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dns.questions() < asked + 3 {
        assert!(std::time::Instant::now() < deadline, "the record is not looked up again");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A sender outside the list (this test, on loopback), refused twice:
    // logged once, counted twice, by its /24.
    for _ in 0..2 {
        assert!(post_std(&http, "/webhooks/withings", b"customer_ref=M-1").starts_with("HTTP/1.1 403"));
    }
    let metrics = get_std(&admin, "/metrics");
    let changes = "ordertrail_allowlist_changes_total{source=\"withings\",record=\"ipblock-notify.example\"} 2\n";
    assert!(metrics.contains(changes), "{metrics}");
    let refused = "ordertrail_allowlist_refused_total{source=\"withings\",network=\"127.0.0.0/24\"} 2\n";
    assert!(metrics.contains(refused), "{metrics}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let rest: Vec<serde_json::Value> = logs.collect();
    assert_eq!(rest.iter().filter(|log| is("allowlist changed")(log)).count(), 0, "a change is logged once");
    let refusals: Vec<_> = rest
        .iter()
        .filter(|log| log["fields"]["message"].as_str().is_some_and(|m| m.starts_with("webhook refused (403)")))
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        ["source", "network", "sender"].map(|name| fields(refusals[0], name)),
        ["withings", "127.0.0.0/24", "127.0.0.1"]
    );
}
