//! What one measurement is: rates, latency percentiles, and the servers' CPU
//! and memory, told apart from the load generator's.

use std::path::Path;
use std::time::Duration;

/// One measurement.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) errors: u64,
    /// Requests answered successfully.
    pub(crate) acknowledged: u64,
    /// Server CPU milliseconds per 1000 acknowledged requests.
    pub(crate) cpu_per_1000_ms: f64,
}

/// The `p` quantile of sorted latencies, in milliseconds (0 if none).
pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

pub(crate) fn sample(mut latencies: Vec<Duration>, errors: u64, elapsed: Duration, cpu: Duration) -> Sample {
    latencies.sort();
    let percentile = |p: f64| percentile_ms(&latencies, p);
    let done = latencies.len().max(1) as f64;
    Sample {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        errors,
        acknowledged: latencies.len() as u64,
        cpu_per_1000_ms: cpu.as_secs_f64() * 1000.0 * 1000.0 / done,
    }
}

/// Server CPU over an interval: the process's CPU time minus that of the
/// load generator's threads (the servers run on their own threads, and
/// sled's short-lived I/O threads are counted by the process total).
pub(crate) struct ServerCpu {
    pub(crate) process: Duration,
    pub(crate) client: Duration,
}

impl ServerCpu {
    pub(crate) fn start() -> Self {
        Self { process: process_cpu(), client: client_cpu() }
    }

    pub(crate) fn used(&self) -> Duration {
        (process_cpu().saturating_sub(self.process)).saturating_sub(client_cpu().saturating_sub(self.client))
    }
}

pub(crate) fn process_cpu() -> Duration {
    std::fs::read_to_string("/proc/self/stat").map(|s| stat_cpu(&s)).unwrap_or_default()
}

/// CPU of the threads that are not the servers': the load generator's
/// runtime and the main thread.
pub(crate) fn client_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Duration::ZERO };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .filter(|stat| stat.contains("(bench-client)") || stat.contains("(ordertrail-benc)"))
        .map(|stat| stat_cpu(&stat))
        .sum()
}

/// utime + stime of a `/proc/.../stat` line.
pub(crate) fn stat_cpu(stat: &str) -> Duration {
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

pub(crate) fn rss_mib(status_file: &str) -> f64 {
    let status = std::fs::read_to_string(status_file).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
