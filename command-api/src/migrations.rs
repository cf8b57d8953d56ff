//! Schema migrations for the command side, embedded in the binary (see `migrations/README.md`).

use orderly_event_store::postgres::{fingerprint, run_migrations};
use tokio_postgres::Config;

use crate::CommandError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which command-side migrations ran.
pub const MIGRATION_TABLE: &str = "orderly_command_api_migrations";

/// Brings the command-side schema of the database `config` names up to date.
pub async fn migrate(config: &Config) -> Result<(), CommandError> {
    run_migrations(config, embedded::migrations::runner(), MIGRATION_TABLE)
        .await
        .map_err(|e| CommandError::Internal(format!("command-side migrations failed: {e}")))
}

/// Changes whenever a migration is added or edited; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    fingerprint(&embedded::migrations::runner())
}

/// A database of its own with the command side's tables (and not the event store's), for the
/// crate's unit tests.
#[cfg(test)]
pub(crate) async fn test_database() -> orderly_test_support::TestDb {
    orderly_test_support::TestDb::create(
        "command-api",
        &migration_fingerprint(),
        |url| async move { migrate(&url.parse()?).await.map_err(Into::into) },
    )
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)")
}
