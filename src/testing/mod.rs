//! Test support, only in builds with the `test-util` feature: private
//! PostgreSQL clusters (`initdb` into a temporary directory, a server on a
//! free loopback port, stopped immediately when dropped). The PostgreSQL 15
//! server binaries must be on the machine; without them a test fails with
//! one line naming the package, it is never skipped. `initdb` refuses to
//! run as root, so a root test run starts the server as the `postgres` user.
//! A watchdog process stops a cluster whose test process died without
//! dropping it (killed, or a cluster kept in a `static`).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test support fails loudly")]

use std::net::TcpListener;

pub mod dns;
pub use dns::DnsServer;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What to install when the server binaries are missing.
const PACKAGE: &str = "postgresql-15";

/// One running cluster with a database `ordertrail` owned by `ordertrail`.
pub struct PostgresCluster {
    /// Kept until the cluster is dropped.
    dir: tempfile::TempDir,
    pub port: u16,
    /// The server's command-line options.
    options: String,
    /// Stops the server and removes its files once this process is gone.
    watchdog: std::process::Child,
}

impl PostgresCluster {
    /// Starts a new cluster (fsync on, synchronous commit on).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a new cluster with server `settings` (`name=value`) on top of
    /// the defaults.
    pub fn start_with(settings: &[&str]) -> Self {
        require_binaries();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        as_owner(dir.path());
        run(&["initdb", "-D", path(&data), "-U", "ordertrail", "--auth=trust", "--no-instructions"]);
        let cluster = Self::serve(dir, settings);
        cluster.psql("postgres", "CREATE DATABASE ordertrail OWNER ordertrail");
        cluster
    }

    /// Starts a streaming standby of `primary` (a base backup of it, then
    /// following its WAL) that the primary knows as `name`: with
    /// `synchronous_standby_names = name` on the primary, a COMMIT there
    /// returns only once this standby has the commit.
    pub fn standby_of(primary: &Self, name: &str) -> Self {
        require_binaries();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        as_owner(dir.path());
        let source = format!("host=127.0.0.1 port={} user=ordertrail application_name={name}", primary.port);
        run(&["pg_basebackup", "-d", &source, "-D", path(&data), "-X", "stream", "-R", "-c", "fast"]);
        Self::serve(dir, &[])
    }

    /// Makes every COMMIT on this primary wait for the standby `name`
    /// (`synchronous_standby_names`), and waits until that standby is
    /// streaming as the synchronous one.
    pub fn make_synchronous(&self, name: &str) {
        self.psql("postgres", &format!("ALTER SYSTEM SET synchronous_standby_names = '{name}'"));
        self.psql("postgres", "SELECT pg_reload_conf()");
        let query = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{name}' AND sync_state = 'sync'"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.psql("postgres", &query) != "1" {
            assert!(std::time::Instant::now() < deadline, "the standby {name} never became synchronous");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Starts a server on `dir/data` on a free port.
    fn serve(dir: tempfile::TempDir, settings: &[&str]) -> Self {
        let port = free_port();
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on",
            dir.path().display()
        );
        for setting in settings {
            options.push_str(&format!(" -c {setting}"));
        }
        let watchdog = watchdog(dir.path());
        let cluster = Self { dir, port, options, watchdog };
        cluster.resume();
        cluster
    }

    /// Makes a standby the primary (`pg_ctl promote`), waiting until it is.
    pub fn promote(&self) {
        run(&["pg_ctl", "-D", path(&self.data()), "-w", "promote"]);
    }

    /// Kills the server and every process of it with SIGKILL, as the loss
    /// of its host would: nothing is shut down, flushed or sent.
    pub fn crash(&self) {
        self.signal_all(rustix::process::Signal::KILL);
    }

    /// Stops this primary's WAL senders (SIGSTOP): its standbys receive
    /// nothing more, while it goes on committing what does not wait for
    /// them. Undone only by [`Self::crash`].
    pub fn pause_replication(&self) {
        for pid in self.processes() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("walsender")
                && let Some(pid) = rustix::process::Pid::from_raw(pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::STOP);
            }
        }
    }

    /// Sends `signal` to the postmaster and its children.
    fn signal_all(&self, signal: rustix::process::Signal) {
        for pid in self.processes() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// The postmaster's process id, then its children's.
    fn processes(&self) -> Vec<i32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let children = Command::new("pgrep").args(["-P", &postmaster.to_string()]).output().unwrap();
        let children = String::from_utf8_lossy(&children.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect::<Vec<i32>>();
        std::iter::once(postmaster).chain(children).collect()
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn kill(&self) {
        run(&["pg_ctl", "-D", path(&self.data()), "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn resume(&self) {
        let (data, log) = (self.data(), self.dir.path().join("server.log"));
        run(&["pg_ctl", "-D", path(&data), "-l", path(&log), "-o", &self.options, "-w", "start"]);
    }

    /// The URL ordertrail connects with.
    pub fn url(&self) -> String {
        self.url_of("ordertrail")
    }

    /// Creates another empty database, owned by `ordertrail`; returns its URL.
    ///
    /// PostgreSQL refuses a `CREATE DATABASE` while another session is on
    /// its template (an autovacuum worker, say) or while every connection
    /// slot is taken; those refusals are tried again for up to 30 s.
    pub fn create_database(&self, name: &str) -> String {
        const TRANSIENT: [&str; 2] = ["is being accessed by other users", "too many clients"];
        let sql = format!("CREATE DATABASE {name} OWNER ordertrail");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let output = self.try_psql("postgres", &sql);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let transient = TRANSIENT.iter().any(|refusal| stderr.contains(refusal));
            match output.status.success() {
                true => return self.url_of(name),
                false if transient && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                false => panic!("psql {sql:?}: {stderr}"),
            }
        }
    }

    /// Drops a database created by [`Self::create_database`], closing any
    /// session still on it.
    pub fn drop_database(&self, name: &str) {
        self.psql("postgres", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgres://ordertrail@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` in `database` with psql; panics with its output on failure.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = self.try_psql(database, sql);
        assert!(output.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn try_psql(&self, database: &str, sql: &str) -> Output {
        let port = self.port.to_string();
        command(&["psql", "-h", "127.0.0.1", "-p", &port, "-U", "ordertrail", "-d", database, "-Atc", sql])
    }

    /// The cluster's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = command(&["pg_ctl", "-D", path(&data), "-m", "immediate", "-w", "stop"]);
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// A process, in its own process group (an interrupt of the tests does not
/// reach it), that waits for this process to end, then stops the cluster
/// in `dir` and removes it.
fn watchdog(dir: &Path) -> std::process::Child {
    const SCRIPT: &str = r#"owner=$1; dir=$2; shift 2
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
"$@" pg_ctl -D "$dir/data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$dir""#;
    let owner = std::process::id().to_string();
    let as_postgres: &[&str] = if is_root() { &["runuser", "-u", "postgres", "--"] } else { &[] };
    Command::new("sh")
        .args(["-c", SCRIPT, "sh", &owner, path(dir)])
        .args(as_postgres)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("cannot start the cluster's watchdog")
}

fn require_binaries() {
    for binary in ["initdb", "pg_ctl", "postgres", "psql", "pg_basebackup"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()));
        assert!(found, "the PostgreSQL tests need `{binary}` on the PATH: install the {PACKAGE} package");
    }
}

fn path(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
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

/// A loopback listener on a port below the kernel's ephemeral range: a
/// server restarted on it must find it free again, and an ephemeral port can
/// be taken meanwhile by any outgoing connection (seen: "Address already in
/// use" on a restart, in a run with many PostgreSQL connections). Ports are
/// handed out in turn from an offset of this process's id.
pub fn loopback_listener() -> TcpListener {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral: u16 = range.split_whitespace().next().and_then(|low| low.parse().ok()).unwrap_or(32768);
    let first = 10_000 + (std::process::id() % 1000) as u16 * 16;
    let span = ephemeral.saturating_sub(first).max(1000);
    for _ in 0..span {
        let port = first + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    panic!("no free loopback port between {first} and {}", first + span)
}

/// A free loopback address from [`loopback_listener`], for a server that
/// binds it itself.
pub fn free_addr() -> std::net::SocketAddr {
    loopback_listener().local_addr().unwrap()
}

fn free_port() -> u16 {
    free_addr().port()
}
