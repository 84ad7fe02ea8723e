//! Smoke test of the benchmark command: every scenario runs for a second
//! and prints its table. No timing is judged here; speed is measured by
//! `cargo run --release --bin ordertrail-bench`.

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_ordertrail-bench");

#[test]
fn every_scenario_runs_and_reports_ratios() {
    for scenario in ["ingest", "durability"] {
        let output = Command::new(BENCH)
            .args([scenario, "--seconds", "1", "--connections", "4", "--rounds", "1"])
            .output()
            .expect("run ordertrail-bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{scenario}: {}", String::from_utf8_lossy(&output.stderr));
        let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| subject")).collect();
        let expected_rows = if scenario == "ingest" { 2 } else { 3 };
        assert_eq!(rows.len(), expected_rows, "{scenario}:\n{stdout}");
        for row in &rows {
            assert!(!row.contains("errors"), "{scenario}: failed requests:\n{stdout}");
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let rate: f64 = cells[3].split_whitespace().next().unwrap().parse().unwrap();
            let ratio: f64 = cells[7].parse().unwrap();
            assert!(rate > 0.0 && ratio > 0.0, "{scenario}: nothing was acknowledged:\n{stdout}");
        }
    }
}
