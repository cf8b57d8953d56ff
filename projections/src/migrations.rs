//! Schema migrations for the read side, embedded in the binary (see `migrations/README.md`).

use orderly_event_store::postgres::{PgConfig, fingerprint, run_migrations};

use crate::error::ProjectionError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which read-side migrations ran, apart from the event store's table.
pub const MIGRATION_TABLE: &str = "orderly_projections_migrations";

/// Brings the read-model schema of the database `pg_config` names up to date.
pub async fn migrate(pg_config: &PgConfig) -> Result<(), ProjectionError> {
    run_migrations(pg_config, embedded::migrations::runner(), MIGRATION_TABLE)
        .await
        .map_err(|e| ProjectionError::Migration(Box::new(e)))
}

/// Changes whenever a migration is added or edited; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    fingerprint(&embedded::migrations::runner())
}

/// The event store's migrations, then these: one database holding the log and the read models,
/// as `orderly migrate` makes it. For test templates and benchmarks.
pub async fn migrate_with_event_store(pg_config: &PgConfig) -> Result<(), ProjectionError> {
    orderly_event_store::postgres::migrate(pg_config).await?;
    migrate(pg_config).await
}

/// Changes whenever either set of migrations does; the key of templates made with
/// [`migrate_with_event_store`].
pub fn fingerprint_with_event_store() -> String {
    format!(
        "{}|{}",
        orderly_event_store::postgres::migration_fingerprint(),
        migration_fingerprint()
    )
}
