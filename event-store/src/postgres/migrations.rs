//! Schema migrations for the event log, embedded in the binary (see `migrations/README.md`).

use tokio_postgres::NoTls;

use super::{NEXT_TX_ID, PgConfig, pg_error};
use crate::error::StoreError;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Where refinery records which event-store migrations ran; other crates keep their own table.
pub const MIGRATION_TABLE: &str = "orderly_event_store_migrations";

/// Brings the event-store schema of the database `pg_config` names up to date, then checks
/// that the log's clock is not ahead of the cluster's (see [`LogAheadOfCluster`]).
pub async fn migrate(pg_config: &PgConfig) -> Result<(), StoreError> {
    run_migrations(pg_config, embedded::migrations::runner(), MIGRATION_TABLE).await?;
    check_log_clock(pg_config).await
}

/// The log holds events written with transaction ids at or above the ones this cluster will
/// hand out next: it was copied in logically (pg_dump/pg_restore, logical replication) from a
/// cluster that had used more transaction ids. New events would sort before the copied ones,
/// and every reader, whose checkpoint is past them, would skip them for good.
///
/// Handling: fatal at start-up. Stop every process writing or reading the log, then run
/// `orderly migrate --rebase-log` once ([`rebase_log`]), which moves the log's clock past its
/// newest event; stored positions stay valid.
#[derive(Debug, thiserror::Error)]
#[error(
    "the event log's newest event has transaction id {newest}, but this PostgreSQL cluster \
     hands out {next} next: the log was copied in from another cluster (pg_dump/pg_restore \
     or logical replication), and new events would sort before it and be skipped by every \
     reader. Stop every orderly process, then run `orderly migrate --rebase-log` once."
)]
pub struct LogAheadOfCluster {
    pub newest: i64,
    pub next: i64,
}

/// Reads the newest event's transaction id and the cluster's next one (both on the log's
/// clock) on a connection of its own.
async fn log_clock(pg_config: &PgConfig) -> Result<(Option<i64>, i64), StoreError> {
    let (client, connection) = pg_config.connect(NoTls).await.map_err(pg_error)?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            &format!("select (select max(tx_id) from events), {NEXT_TX_ID}"),
            &[],
        )
        .await
        .map_err(pg_error);
    drop(client);
    let _ = driver.await;
    let row = row?;
    Ok((
        row.try_get(0).map_err(pg_error)?,
        row.try_get(1).map_err(pg_error)?,
    ))
}

/// `Err` with [`LogAheadOfCluster`] when new events would sort before the log's newest.
pub async fn check_log_clock(pg_config: &PgConfig) -> Result<(), StoreError> {
    match log_clock(pg_config).await? {
        (Some(newest), next) if newest >= next => {
            Err(StoreError::Internal(Box::new(LogAheadOfCluster {
                newest,
                next,
            })))
        }
        _ => Ok(()),
    }
}

/// Applies the migrations, then moves the log's clock so that the next transaction's events sort after the newest stored
/// one; returns the offset now in force. Nothing happens when the clock is already ahead.
/// Run it with no other process on the log: each reads the offset once, at its first append,
/// and would go on appending on the old clock.
pub async fn rebase_log(pg_config: &PgConfig) -> Result<i64, StoreError> {
    // A log copied from before the clock existed gets it first.
    run_migrations(pg_config, embedded::migrations::runner(), MIGRATION_TABLE).await?;
    let (mut client, connection) = pg_config.connect(NoTls).await.map_err(pg_error)?;
    let driver = tokio::spawn(connection);
    let rebased = async {
        let tx = client.transaction().await?;
        tx.batch_execute("lock table events in share row exclusive mode")
            .await?;
        // The next id handed out is at least xmax, so an offset of newest - xmax + 1 puts the
        // next event after the newest; the clock only moves forward.
        let row = tx
            .query_one(
                "update event_log_clock set tx_offset = greatest(tx_offset,
                     coalesce((select max(tx_id) from events), 0) + 1
                     - pg_snapshot_xmax(pg_current_snapshot())::text::bigint)
                 returning tx_offset",
                &[],
            )
            .await?;
        let offset: i64 = row.try_get(0)?;
        tx.commit().await?;
        Ok::<_, tokio_postgres::Error>(offset)
    }
    .await
    .map_err(pg_error);
    drop(client);
    let _ = driver.await;
    rebased
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
