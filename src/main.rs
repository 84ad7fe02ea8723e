//! The `ordertrail` binary: parse the command line and config, set up
//! logging, bind the listeners, run the server, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ordertrail::config::Config;
use ordertrail::server::{self, Listeners};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration that cannot be used (EX_CONFIG).
const EXIT_CONFIG: u8 = 64;
/// Exit code when the service cannot run (EX_SOFTWARE).
const EXIT_FAILURE: u8 = 70;

/// Receives fulfilment webhooks, stores them durably and serves orders over gRPC.
#[derive(Parser)]
#[command(name = "ordertrail", version)]
struct Cli {
    /// TOML config file (also ORDERTRAIL_CONFIG); without one, defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let config = match Config::load(cli.config.as_deref(), &|key| std::env::var(key).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ordertrail: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run_async(serve(config)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordertrail: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run_async(future: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(future)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let bind = |addr| async move {
        TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
    };
    let listeners = Listeners { http: bind(config.http.addr).await?, grpc: bind(config.grpc.addr).await? };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server::run(config, listeners, shutdown).await?;
    Ok(())
}

/// SIGTERM or SIGINT starts a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}
