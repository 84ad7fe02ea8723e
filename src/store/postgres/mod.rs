//! The PostgreSQL engine: several nodes sharing one database.
//!
//! - [`schema`]: ordertrail's tables, versioned and migrated at start under
//!   an advisory lock.
//! - [`batch`]: one batch as one transaction under the counter row's lock
//!   (dense sequences in commit order), its statements prepared once and
//!   sent together.
//! - [`rebuild`]: `ordertrail rebuild` into a schema beside the live
//!   tables, swapped in by one transaction.
//! - `engine`: the engine interface (reads on a pool; the writer's and the
//!   listener's connections are their own), LISTEN/NOTIFY as the
//!   followers' wake-up, the server settings that weaken durability.

pub(crate) mod batch;
mod engine;
pub(crate) mod rebuild;
pub(crate) mod schema;

pub(crate) use engine::PostgresEngine;

use tokio_postgres::{Client, NoTls};

use super::StoreError;
use crate::config::PostgresConfig;

/// Connects and brings the schema to this build's version (see
/// [`schema::migrate`]); returns the version the database was at.
pub async fn prepare(config: &PostgresConfig) -> Result<i32, StoreError> {
    let mut client = connect(config).await?;
    schema::migrate(&mut client).await
}

/// The connection settings of every session: the connect and statement
/// timeouts and ordertrail's application name on top of the configured URL.
pub(crate) fn session(config: &PostgresConfig) -> tokio_postgres::Config {
    let mut url = config.url.clone();
    url.connect_timeout(config.connect_timeout);
    // How a rebuild tells that nodes are still running.
    url.application_name(rebuild::APPLICATION);
    // Server notices (e.g. "relation already exists, skipping" from the
    // migrations' IF NOT EXISTS) are not worth a log line.
    let timeout =
        format!("-c statement_timeout={} -c client_min_messages=warning", config.statement_timeout.as_millis());
    let options = match url.get_options() {
        Some(options) => format!("{options} {timeout}"),
        None => timeout,
    };
    url.options(&options);
    url
}

/// Connects once, outside any pool (the writer's and the tailer's
/// connections are their own).
pub(crate) async fn connect(config: &PostgresConfig) -> Result<Client, StoreError> {
    let url = session(config);
    let (client, connection) =
        url.connect(NoTls).await.map_err(|e| StoreError::unavailable("cannot connect to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests;
