//! Postgres connections: every one names its replica and speaks UTC.
//!
//! `application_name` lets an operator (and the tests) tell replicas apart in
//! `pg_stat_activity`; `TimeZone = UTC` makes every timestamp come back with offset 0, so
//! `created_at` ends in `Z` exactly as a coderd on a UTC database writes it.

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::{Client, Config, NoTls};

/// The shared pool for request handlers, subscribers and the worker.
pub type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// Failures talking to Postgres. Whose fault it is shows in the source: the server or network
/// (`Postgres`), or an exhausted pool (`Pool`).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("connection pool: {0}")]
    Pool(#[from] bb8::RunError<tokio_postgres::Error>),
}

/// Parses the URL and adds the replica's connection settings.
pub fn config(database_url: &str, replica: &str) -> Result<Config, DbError> {
    let mut config: Config = database_url.parse().map_err(DbError::Url)?;
    config.application_name(format!("coderd-sim/{replica}"));
    config.options("-c TimeZone=UTC");
    Ok(config)
}

/// Opens the replica's pool and checks that Postgres answers.
pub async fn pool(database_url: &str, replica: &str, max_size: u32) -> Result<Pool, DbError> {
    let manager = PostgresConnectionManager::new(config(database_url, replica)?, NoTls);
    let pool = bb8::Pool::builder()
        .max_size(max_size)
        .build(manager)
        .await?;
    drop(pool.get().await?);
    Ok(pool)
}

/// Opens one dedicated connection (the LISTEN connection, the notify sender, migrate, seed)
/// and drives it on its own task. Notifications on it are discarded; the listener drives its
/// connection itself.
pub async fn connect(config: &Config) -> Result<Client, DbError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "dedicated postgres connection ended");
        }
    });
    Ok(client)
}
