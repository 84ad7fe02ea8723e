//! The `ordertrail` binary: parse the command line and config, set up
//! logging, bind the listeners, run the server, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ordertrail::config::Config;
use ordertrail::handover::{self, Inherited};
use ordertrail::ingest::Mapper;
use ordertrail::server::{self, Listeners, ServerError};
use ordertrail::store::StoreError;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration or command line that cannot be used
/// (EX_USAGE, as linkerd uses it).
const EXIT_CONFIG: u8 = 64;

/// Receives fulfilment webhooks, stores them durably and serves orders over gRPC.
#[derive(Parser)]
#[command(name = "ordertrail", version)]
struct Cli {
    /// TOML config file (also ORDERTRAIL_CONFIG); without one, defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr: human-readable text or one JSON object per line.
    /// The level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value = "text", env = "ORDERTRAIL_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Validate the configuration and print it as it takes effect, secrets
    /// redacted; exit 64 with one line if it is invalid.
    CheckConfig,
    /// Print the live event stream of a running instance, one event per
    /// line; reconnects and resumes from the last sequence after a failure.
    Tail(TailArgs),
    /// Write every stored raw delivery as NDJSON (the instance must be
    /// stopped). Works on a damaged database too, to salvage what is readable.
    Export {
        /// Output file; default: standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Rebuild all orders, events and indexes of the (stopped) instance's data
    /// dir from its raw deliveries with the current mappers. The old database
    /// is kept beside the new one.
    Rebuild,
    /// POST a captured webhook body to a running instance, as the provider
    /// would: handy for local testing and replays.
    Send {
        /// The source to post to (`/webhooks/{source}`).
        source: String,
        /// The body to send.
        file: PathBuf,
        /// Winkelstraat kind (`/webhooks/{source}/{kind}`).
        #[arg(long)]
        kind: Option<String>,
        /// Content-Type; default: JSON if the body looks like JSON, else a form.
        #[arg(long)]
        content_type: Option<String>,
        /// Extra header `name: value` (repeatable), e.g. `x-api-key: …`.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Webhook address; default: http.addr from the config.
        #[arg(long, value_name = "HOST:PORT")]
        http: Option<String>,
    },
    /// Store the deliveries of an export through the current mappers into
    /// the configured data dir (the instance must be stopped). Identical
    /// deliveries are stored once.
    Import {
        /// An export written by `ordertrail export`.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct TailArgs {
    /// Start after this sequence (0: from the beginning); default: from now.
    #[arg(long, value_name = "SEQUENCE")]
    after: Option<u64>,
    /// Only events of this source (repeatable).
    #[arg(long = "source", value_name = "NAME")]
    sources: Vec<String>,
    /// Only events of the order with this merchant reference
    /// (ExternalOrderId, customer_ref or po_number).
    #[arg(long = "ref", value_name = "REFERENCE")]
    reference: Option<String>,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// gRPC address of the instance; default: grpc.addr from the config.
    #[arg(long, value_name = "HOST:PORT")]
    grpc: Option<String>,
    /// Bearer token for an instance with grpc.bearer_tokens.
    #[arg(long, env = "ORDERTRAIL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connect with TLS, trusting this CA certificate (PEM).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let config = match Config::load(cli.config.as_deref(), &|key| std::env::var(key).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ordertrail: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            if let Err(e) = raise_file_limit(&config) {
                eprintln!("ordertrail: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            match Inherited::from_systemd() {
                // Before any thread starts: it clears systemd's variables.
                Ok(inherited) => run_async(serve(config, inherited)),
                Err(e) => Err(anyhow::anyhow!("cannot use the sockets systemd passed: {e}")),
            }
        }
        Command::CheckConfig => {
            println!("{config:#?}");
            run_async(async {
                print!("{}", ordertrail::allowlist::Allowlists::describe(&config).await);
                Ok(())
            })
            .map(|()| eprintln!("ordertrail: the configuration is valid"))
        }
        Command::Tail(args) => run_async(tail(args, &config)),
        Command::Export { out } => export(&config, out),
        Command::Import { file } => run_async(import(&config, file)),
        Command::Rebuild => run_async(rebuild(&config)),
        Command::Send { source, file, kind, content_type, headers, http } => {
            let target = http.unwrap_or_else(|| config.http.addr.to_string());
            let path = match kind {
                Some(kind) => format!("/webhooks/{source}/{kind}"),
                None => format!("/webhooks/{source}"),
            };
            let url = format!("http://{target}{path}");
            run_async(async move { Ok(ordertrail::send::send(&url, &file, content_type, &headers).await?) })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ordertrail: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for an error that ended a command: 65 (EX_DATAERR) for
/// damaged data or bad input, 70 (EX_SOFTWARE) for anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    match (e.downcast_ref::<ServerError>(), e.downcast_ref::<StoreError>()) {
        (Some(e), _) => e.exit_code(),
        (None, Some(e)) => e.exit_code(),
        (None, None) => ordertrail::store::EXIT_FAILURE,
    }
}

/// File descriptors needed beside the connections: the store's files,
/// listeners, the hand-over socket, logs.
const FD_RESERVE: u64 = 256;

/// Raises the soft limit on open files to the hard limit (a webhook
/// connection is a file), and refuses connection limits the hard limit
/// cannot carry: past it, accepts fail and webhooks get refused.
fn raise_file_limit(config: &Config) -> Result<(), String> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let needed = (config.http.max_connections + config.grpc.max_connections) as u64 + FD_RESERVE;
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|soft| soft < limit.maximum.unwrap_or(u64::MAX)) {
        limit.current = limit.maximum.or(Some(needed.max(limit.current.unwrap_or(0))));
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
        limit = getrlimit(Resource::Nofile);
    }
    match limit.current {
        Some(soft) if soft < needed => Err(format!(
            "http.max_connections ({}) and grpc.max_connections ({}) need about {needed} open files, but the limit \
             is {soft} (ulimit -n; LimitNOFILE= under systemd): raise it or lower them",
            config.http.max_connections, config.grpc.max_connections
        )),
        _ => Ok(()),
    }
}

fn export(config: &Config, out: Option<PathBuf>) -> anyhow::Result<()> {
    let summary = match out {
        Some(path) => {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let summary = ordertrail::store::export(&config.store, &mut file)?;
            std::io::Write::flush(&mut file)?;
            summary
        }
        None => ordertrail::store::export(&config.store, &mut std::io::stdout().lock())?,
    };
    if summary.unreadable > 0 {
        // Exit 65 (damaged), with everything readable saved.
        return Err(StoreError::Corrupt(format!(
            "exported {} deliveries; {} could not be read (the database is damaged)",
            summary.exported, summary.unreadable
        ))
        .into());
    }
    eprintln!("ordertrail: exported {} deliveries", summary.exported);
    Ok(())
}

async fn rebuild(config: &Config) -> anyhow::Result<()> {
    let (summary, kept) = ordertrail::store::rebuild(&config.store, Mapper::new(config)).await?;
    eprintln!(
        "ordertrail: rebuilt from {} deliveries ({} applied, {} quarantined, {} duplicates); the old database is in {}",
        summary.applied + summary.quarantined + summary.duplicates,
        summary.applied,
        summary.quarantined,
        summary.duplicates,
        kept
    );
    Ok(())
}

async fn import(config: &Config, file: PathBuf) -> anyhow::Result<()> {
    let input = std::io::BufReader::new(
        std::fs::File::open(&file).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?,
    );
    let store = server::open_store(config).await?;
    let summary = ordertrail::store::import(&store, input).await;
    store.close().await?;
    let summary = summary?;
    eprintln!(
        "ordertrail: imported {} applied, {} quarantined, {} already present",
        summary.applied, summary.quarantined, summary.duplicates
    );
    Ok(())
}

fn run_async(future: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(future)
}

async fn serve(config: Config, inherited: Inherited) -> anyhow::Result<()> {
    let acquired = handover::acquire(&config, inherited).await?;
    let listeners = Listeners { http: acquired.http, grpc: acquired.grpc, admin: acquired.admin };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match acquired.predecessor {
        Some(predecessor) => server::take_over(config, listeners, predecessor, shutdown).await?,
        None => server::run(config, listeners, shutdown).await?,
    }
    Ok(())
}

async fn tail(args: TailArgs, config: &Config) -> anyhow::Result<()> {
    let address = args.grpc.unwrap_or_else(|| config.grpc.addr.to_string());
    let ca_pem = match &args.ca {
        Some(path) => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?),
        None => None,
    };
    let scheme = if ca_pem.is_some() { "https" } else { "http" };
    let options = ordertrail::tail::TailOptions {
        endpoint: format!("{scheme}://{address}"),
        token: args.token,
        ca_pem,
        after: args.after,
        sources: args.sources,
        reference: args.reference,
        json: args.json,
    };
    let stop = CancellationToken::new();
    tokio::spawn(cancel_on_signal(stop.clone()));
    ordertrail::tail::run(options, &mut std::io::stdout().lock(), stop).await?;
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().init(),
    }
}
