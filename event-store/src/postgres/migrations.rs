//! Schema migrations for the event log, embedded in the binary (see `migrations/README.md`).

use tokio_postgres::NoTls;

use super::{PgConfig, pg_error};
use crate::error::StoreError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which event-store migrations ran; other crates keep their own table.
pub const MIGRATION_TABLE: &str = "orderly_event_store_migrations";

/// Brings the event-store schema of the database `pg_config` names up to date.
pub async fn migrate(pg_config: &PgConfig) -> Result<(), StoreError> {
    run_migrations(pg_config, embedded::migrations::runner(), MIGRATION_TABLE).await
}

/// Changes whenever a migration is added or edited; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    fingerprint(&embedded::migrations::runner())
}

/// Applies one embedded refinery migration set (`embed_migrations!`), recording it in `table`.
/// Each crate with tables of its own keeps its own set and table and runs it through here, so
/// the sets can grow independently in one database.
pub async fn run_migrations(
    pg_config: &PgConfig,
    mut runner: refinery::Runner,
    table: &str,
) -> Result<(), StoreError> {
    let (mut client, connection) = pg_config.connect(NoTls).await.map_err(pg_error)?;
    let driver = tokio::spawn(connection);
    let outcome = runner
        .set_migration_table_name(table)
        .run_async(&mut client)
        .await;
    drop(client);
    let _ = driver.await;
    outcome
        .map(|_| ())
        .map_err(|e| StoreError::Internal(Box::new(e)))
}

/// A digest of a migration set's versions and checksums.
pub fn fingerprint(runner: &refinery::Runner) -> String {
    runner
        .get_migrations()
        .iter()
        .map(|m| format!("{}:{}", m.version(), m.checksum()))
        .collect::<Vec<_>>()
        .join(",")
}
