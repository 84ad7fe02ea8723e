//! Private PostgreSQL clusters for the tests: `initdb` into a temporary
//! directory, a server on a free loopback port, stopped (immediately) when
//! dropped. The PostgreSQL 15 server binaries must be on the machine; a
//! test that needs them and does not find them fails with one line naming
//! the package, it is never skipped. `initdb` refuses to run as root, so a
//! root test run starts the server as the `postgres` user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What to install when the server binaries are missing.
const PACKAGE: &str = "postgresql-15";

/// One running cluster with a database `ordertrail` owned by `ordertrail`.
pub struct Cluster {
    /// Kept until the cluster is dropped.
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Cluster {
    /// Starts a new cluster (fsync on, synchronous commit on).
    pub fn start() -> Self {
        require_binaries();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        as_owner(dir.path());
        run(&["initdb", "-D", path(&data), "-U", "ordertrail", "--auth=trust", "--no-instructions"]);
        let port = free_port();
        let socket_dir = dir.path().to_path_buf();
        let log = dir.path().join("server.log");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on",
            socket_dir.display()
        );
        run(&["pg_ctl", "-D", path(&data), "-l", path(&log), "-o", &options, "-w", "start"]);
        let cluster = Self { dir, port };
        cluster.psql("postgres", "CREATE DATABASE ordertrail OWNER ordertrail");
        cluster
    }

    /// The URL ordertrail connects with.
    pub fn url(&self) -> String {
        format!("postgres://ordertrail@127.0.0.1:{}/ordertrail", self.port)
    }

    /// Runs `sql` in `database` with psql; panics with its output on failure.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let output =
            command(&["psql", "-h", "127.0.0.1", "-p", &port, "-U", "ordertrail", "-d", database, "-Atc", sql]);
        assert!(output.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = command(&["pg_ctl", "-D", path(&data), "-m", "immediate", "-w", "stop"]);
    }
}

fn require_binaries() {
    for binary in ["initdb", "pg_ctl", "postgres", "psql"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()));
        assert!(found, "the PostgreSQL tests need `{binary}` on the PATH: install the {PACKAGE} package");
    }
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Lets the `postgres` user own `dir` when the tests run as root.
fn as_owner(dir: &Path) {
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres", path(dir)]).status().unwrap();
        assert!(status.success(), "chown {dir:?} to postgres");
    }
}

/// Runs a PostgreSQL program (as `postgres` when root) and returns its output.
fn command(args: &[&str]) -> Output {
    let mut command = match is_root() {
        true => {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).args(args);
            command
        }
        false => {
            let mut command = Command::new(args[0]);
            command.args(&args[1..]);
            command
        }
    };
    command.env("LC_ALL", "C").output().unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]))
}

fn run(args: &[&str]) {
    let output = command(args);
    assert!(
        output.status.success(),
        "{} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn postgres_config(cluster: &Cluster) -> ordertrail::config::PostgresConfig {
    let env = |key: &str| match key {
        "ORDERTRAIL_STORE_BACKEND" => Some("postgres".to_string()),
        "ORDERTRAIL_POSTGRES_URL" => Some(cluster.url()),
        _ => None,
    };
    let config = ordertrail::config::Config::from_toml("", &env).unwrap();
    config.store.postgres.expect("a postgres backend has its settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_the_schema_once() {
    let cluster = Cluster::start();
    let config = postgres_config(&cluster);
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { ordertrail::store::postgres::prepare(&config).await })
        })
        .collect();
    let mut found = Vec::new();
    for start in starts {
        found.push(start.await.unwrap().expect("every node starts"));
    }
    found.sort_unstable();
    assert_eq!(found, [0, 1, 1], "one node migrated, the others found it done");
    assert_eq!(cluster.psql("ordertrail", "SELECT version FROM ordertrail_schema"), "1");
    assert_eq!(cluster.psql("ordertrail", "SELECT count(*) FROM ordertrail_schema"), "1");
    assert_eq!(cluster.psql("ordertrail", "SELECT last_sequence FROM ot_counters"), "0");
    assert_eq!(ordertrail::store::postgres::prepare(&config).await.unwrap(), 1, "a restart changes nothing");
}

#[tokio::test]
async fn a_schema_newer_than_the_build_is_refused() {
    let cluster = Cluster::start();
    let config = postgres_config(&cluster);
    ordertrail::store::postgres::prepare(&config).await.unwrap();
    cluster.psql("ordertrail", "UPDATE ordertrail_schema SET version = 99");
    let refused = ordertrail::store::postgres::prepare(&config).await.unwrap_err();
    assert!(matches!(refused, ordertrail::store::StoreError::Corrupt(_)), "{refused}");
    assert!(refused.to_string().contains("schema version 99, newer than this build"), "{refused}");
}

#[test]
fn a_postgres_backend_needs_a_url_and_never_shows_its_password() {
    let env = |key: &str| (key == "ORDERTRAIL_STORE_BACKEND").then(|| "postgres".to_string());
    let err = ordertrail::config::Config::from_toml("", &env).unwrap_err().to_string();
    assert!(err.contains("ORDERTRAIL_POSTGRES_URL"), "{err}");
    let text = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ot:s3cret-pw@db1,db2/ot?target_session_attrs=read-write\"\n";
    let config = ordertrail::config::Config::from_toml(text, &|_| None).unwrap();
    let shown = format!("{config:?}");
    assert!(shown.contains("db2") && !shown.contains("s3cret-pw"), "{shown}");
    let bad = "[store]\nbackend = \"postgres\"\n[store.postgres]\nurl = \"postgres://ot:s3cret-pw@db/ot?sslmode=sometimes\"\n";
    let err = ordertrail::config::Config::from_toml(bad, &|_| None).unwrap_err().to_string();
    assert!(err.contains("store.postgres.url") && !err.contains("s3cret-pw"), "{err}");
}

#[test]
fn a_private_cluster_starts_with_durable_commits_and_stops() {
    let cluster = Cluster::start();
    assert_eq!(cluster.psql("ordertrail", "SHOW synchronous_commit"), "on");
    assert_eq!(cluster.psql("ordertrail", "SHOW fsync"), "on");
    assert_eq!(cluster.psql("ordertrail", "SELECT current_user"), "ordertrail");
    let data = cluster.data();
    drop(cluster);
    assert!(!data.join("postmaster.pid").exists(), "the server was stopped");
}
