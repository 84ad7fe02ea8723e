//! Smoke test of the benchmark command: every scenario runs for a second on
//! a small data set and prints its table. No timing is judged here; speed is
//! measured by `cargo run --release --bin ordertrail-bench`.

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_ordertrail-bench");

/// Runs one scenario briefly; returns its table rows (cells trimmed).
fn rows(scenario: &str, extra: &[&str]) -> Vec<Vec<String>> {
    let output = Command::new(BENCH)
        .args([scenario, "--seconds", "1", "--rounds", "1"])
        .args(extra)
        .output()
        .expect("run ordertrail-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{scenario}: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("|---"))
        .skip(1)
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert!(!rows.is_empty(), "{scenario}: no table:\n{stdout}");
    for row in &rows {
        assert!(!row.iter().any(|c| c.contains("errors") || c == "NO"), "{scenario}: failures:\n{stdout}");
    }
    rows
}

/// The first number in a cell.
fn number(cell: &str) -> f64 {
    cell.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a number: {cell}"))
}

#[test]
fn ingest_scenarios_report_rates_and_ratios() {
    for (scenario, expected_rows) in [("ingest", 2), ("durability", 4), ("ingest-latency", 6)] {
        let rows = rows(scenario, &["--connections", "4"]);
        assert_eq!(rows.len(), expected_rows, "{scenario}: {rows:?}");
        for row in &rows {
            assert!(number(&row[3]) > 0.0 && number(&row[7]) > 0.0, "{scenario}: nothing acknowledged: {row:?}");
        }
    }
}

#[test]
fn lookup_scale_and_catch_up_run_on_a_small_store() {
    let lookups = rows("lookup", &["--connections", "4", "--orders", "300"]);
    assert_eq!(lookups.len(), 6, "the baseline, the health reference and four reference kinds: {lookups:?}");
    assert!(lookups.iter().all(|row| number(&row[3]) > 0.0), "{lookups:?}");
    let scale = rows("scale", &["--orders", "300", "--small-orders", "30"]);
    assert_eq!(scale.len(), 2, "{scale:?}");
    assert!(
        scale.iter().all(|row| number(&row[2]) > 0.0 && number(&row[6]) > 0.0 && number(&row[9]) > 0.0),
        "GetOrder answered in both loops, RSS measured: {scale:?}"
    );
    let catch_up = rows("catch-up", &["--orders", "300"]);
    assert_eq!(catch_up.len(), 2, "{catch_up:?}");
    assert!(catch_up.iter().all(|row| number(&row[2]) == 300.0), "every stored event replayed: {catch_up:?}");
    let grown = rows("grown", &["--orders", "300", "--connections", "4"]);
    assert_eq!(grown.len(), 2, "the empty store and the grown one: {grown:?}");
    assert!(grown.iter().all(|row| number(&row[3]) > 0.0), "{grown:?}");
    let console = rows("console", &["--orders", "300"]);
    assert_eq!(console.len(), 11, "the baseline and ten pages: {console:?}");
    assert!(console.iter().all(|row| number(&row[3]) > 0.0), "every page answered what it must show: {console:?}");
}

#[test]
fn fan_out_delivers_every_event_to_every_subscriber() {
    let rows = rows("fan-out", &["--subscribers", "0,3", "--rate", "100"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][5], "yes", "{rows:?}");
}

#[test]
fn cluster_compares_nodes_on_postgres_with_the_ceiling_and_a_hand_written_receiver() {
    let rows = rows("cluster", &["--connections", "4"]);
    assert_eq!(rows.len(), 5, "ceiling, hand-written, 1 node, 3 nodes, sled: {rows:?}");
    assert!(rows.iter().all(|row| number(&row[3]) > 0.0), "each subject acknowledged webhooks: {rows:?}");
}
