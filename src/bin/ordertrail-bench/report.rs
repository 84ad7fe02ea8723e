//! The Markdown tables: one row per subject, medians over the A/B rounds.

use crate::measure::Sample;

/// The median, minimum and maximum of `value` over the samples.
pub(crate) fn median(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    median_of(samples.iter().map(value).collect())
}

/// The median, minimum and maximum of `values` (0 for none).
pub(crate) fn median_of(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let min = values.first().copied().unwrap_or(0.0);
    let max = values.last().copied().unwrap_or(0.0);
    (values.get(values.len() / 2).copied().unwrap_or(0.0), min, max)
}

pub(crate) fn header(what: &str) {
    println!(
        "| subject | {what} | per second (median, min–max) | p50 ms | p99 ms | p99.9 ms | ratio to baseline | server CPU ms per 1000 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
}

/// One table row: medians over the rounds (latencies too), min–max of the rate.
pub(crate) fn row(name: &str, point: &str, samples: &[Sample], baseline: f64) {
    let (rate, min, max) = median(samples, |s| s.per_second);
    let errors: u64 = samples.iter().map(|s| s.errors).sum();
    let note = if errors > 0 { format!(" ({errors} errors)") } else { String::new() };
    println!(
        "| {name}{note} | {point} | {rate:.0} ({min:.0}–{max:.0}) | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
        median(samples, |s| s.p50_ms).0,
        median(samples, |s| s.p99_ms).0,
        median(samples, |s| s.p999_ms).0,
        if baseline > 0.0 { rate / baseline } else { 0.0 },
        median(samples, |s| s.cpu_per_1000_ms).0,
    );
}
