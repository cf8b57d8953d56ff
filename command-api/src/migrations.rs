//! Schema migrations for the command side, embedded in the binary (see `migrations/README.md`).

use tokio_postgres::{Config, NoTls};

use crate::CommandError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which command-side migrations ran.
pub const MIGRATION_TABLE: &str = "orderly_command_api_migrations";

/// Brings the command-side schema of the database `config` names up to date.
pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    let (mut client, connection) = config.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let outcome = embedded::migrations::runner()
        .set_migration_table_name(MIGRATION_TABLE)
        .run_async(&mut client)
        .await;
    drop(client);
    let _ = driver.await;
    outcome
        .map(|_| ())
        .map_err(|e| CommandError::Internal(format!("command-side migrations failed: {e}")))
}

/// Changes whenever a migration is added or edited; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| format!("{}:{}", m.version(), m.checksum()))
        .collect::<Vec<_>>()
        .join(",")
}
