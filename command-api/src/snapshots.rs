//! Snapshots of long streams' states, kept in PostgreSQL (`aggregate_snapshots`, migrations V8
//! and V9) as the JSON text [`Stored::snapshot`] writes.
//!
//! A product's stream gains two events per order it serves, for as long as it sells, and a
//! command handler that starts cold (a restart, a new replica, a product its cache dropped)
//! would fold all of them before its first decision on it: about 1.7 s at 100,000 orders
//! (BENCHMARKS.md, "a product's history"). With a snapshot it reads the snapshot and the
//! events after it.
//!
//! A snapshot is a cache of the log, never the truth. It names the version it was folded up to
//! and the id of the event there; a handler restores it only when the log holds that event at
//! that version (it reads from there on anyway), only in the form it writes
//! ([`Stored::SNAPSHOT_FORMAT`]), and only if the state could have come from the log (a
//! product's invariants, [`Stored::restore`]); anything else is ignored and the stream folded
//! whole. Taking one never holds up a command: it is serialized and written by a task of its
//! own, from a state a read of the stream or an append at its expected version vouched for,
//! and a failure only means the stream waits for its next one.

use std::collections::HashSet;
use std::sync::Arc;

use deadpool_postgres::Pool;
use orderly_event_store::StreamName;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::CommandError;
use crate::handling::Stored;

/// A stream is snapshotted once this many events were folded since its last snapshot, and no
/// sooner than it has grown by a tenth since: a snapshot's size grows with the state (a
/// product's holds), so taking one after a fixed number of events would cost more per event
/// the older the stream.
const SNAPSHOT_EVERY: u64 = 1_000;
const SNAPSHOT_FRACTION: u64 = 10;

/// Whether a stream at `version`, last snapshotted at `snapshot` (`None`: never, as far as
/// this process knows), is due another snapshot.
pub(crate) fn due(version: u64, snapshot: Option<u64>) -> bool {
    match snapshot {
        None => version.saturating_add(1) >= SNAPSHOT_EVERY,
        Some(at) => version.saturating_sub(at) >= SNAPSHOT_EVERY.max(at / SNAPSHOT_FRACTION),
    }
}

const WHICH: &str = "select stream from aggregate_snapshots where stream = any($1)";

const LOAD: &str = "
select version, event_id, first_event_id, format, state
from aggregate_snapshots where stream = $1";

/// Replaces an older snapshot, one of another format, or one naming another event at the same
/// version (the log contradicts it); never a newer one of the same format (another process
/// may have taken it meanwhile).
const SAVE: &str = "
insert into aggregate_snapshots (stream, version, event_id, first_event_id, format, state)
values ($1, $2, $3, $4, $5, $6)
on conflict (stream) do update
set version = excluded.version, event_id = excluded.event_id,
    first_event_id = excluded.first_event_id, format = excluded.format,
    state = excluded.state, taken_at = now()
where aggregate_snapshots.version < excluded.version
   or aggregate_snapshots.format <> excluded.format
   or (aggregate_snapshots.version = excluded.version
       and aggregate_snapshots.event_id <> excluded.event_id)";

/// Only the snapshot found wrong: another process may have replaced it meanwhile.
const DISCARD: &str = "
delete from aggregate_snapshots where stream = $1 and version = $2 and event_id = $3";

/// A stored snapshot, not yet checked against the log.
pub(crate) struct Snapshot {
    pub version: u64,
    pub event_id: Uuid,
    pub first_event_id: Uuid,
    pub format: i32,
    /// Shared, so that parsing it off the runtime's threads copies nothing.
    pub state: Arc<str>,
}

/// What a snapshot stands for, to be written.
pub(crate) struct Taken {
    pub stream: StreamName,
    pub version: u64,
    pub event_id: Uuid,
    pub first_event_id: Uuid,
}

/// The snapshot table in the command side's database. Cheap to clone.
#[derive(Clone)]
pub struct Snapshots {
    pool: Pool,
}

impl Snapshots {
    /// Snapshots in the database behind `pool` (migrated by `orderly migrate`).
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The stored snapshot of `stream`, if any.
    pub(crate) async fn load(&self, stream: &StreamName) -> Result<Option<Snapshot>, CommandError> {
        let client = self.pool.get().await?;
        let Some(row) = client.query_opt(LOAD, &[&stream.as_str()]).await? else {
            return Ok(None);
        };
        let version: i64 = row.try_get(0)?;
        let Ok(version) = u64::try_from(version) else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            version,
            event_id: row.try_get(1)?,
            first_event_id: row.try_get(2)?,
            format: row.try_get(3)?,
            state: row.try_get::<_, String>(4)?.into(),
        }))
    }

    /// Which of `streams` have a snapshot stored (of any format).
    pub(crate) async fn which(&self, streams: &[&str]) -> Result<HashSet<String>, CommandError> {
        let client = self.pool.get().await?;
        let rows = client.query(WHICH, &[&streams]).await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// Writes `state` as the snapshot `taken` describes, in a task of its own.
    pub(crate) fn save_in_background<A: Stored>(&self, taken: Taken, state: A::State) {
        let (Some(format), Ok(version)) = (A::SNAPSHOT_FORMAT, i64::try_from(taken.version)) else {
            return;
        };
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let saved = async {
                // Some megabytes for an old product: off the threads that serve requests.
                let serialized = tokio::task::spawn_blocking(move || A::snapshot(&state)).await;
                let Some(state) = serialized.map_err(|e| CommandError::Internal(e.to_string()))?
                else {
                    return Ok(false);
                };
                metrics::histogram!("orderly_snapshot_size_bytes").record(state.len() as f64);
                let client = pool.get().await?;
                client
                    .execute(
                        SAVE,
                        &[
                            &taken.stream.as_str(),
                            &version,
                            &taken.event_id,
                            &taken.first_event_id,
                            &format,
                            &state,
                        ],
                    )
                    .await?;
                Ok::<bool, CommandError>(true)
            };
            match saved.await {
                Ok(true) => count("saved"),
                Ok(false) => {}
                Err(error) => {
                    count("failed");
                    tracing::warn!(
                        stream = %taken.stream, version = taken.version, %error,
                        "snapshot not saved; the next one is taken after as many events again"
                    );
                }
            }
        });
    }
}

impl Snapshots {
    /// Deletes `snapshot` of `stream`, found not to match the log. Before the stream's next
    /// snapshot is taken, so the two never race; a failure is logged (the snapshot is then
    /// ignored again at the next cold load).
    pub(crate) async fn discard(&self, stream: &StreamName, snapshot: &Snapshot) {
        let Ok(version) = i64::try_from(snapshot.version) else {
            return;
        };
        let discarded = async {
            let client = self.pool.get().await?;
            let params: [&(dyn ToSql + Sync); 3] = [&stream.as_str(), &version, &snapshot.event_id];
            client.execute(DISCARD, &params).await?;
            Ok::<(), CommandError>(())
        };
        if let Err(error) = discarded.await {
            tracing::warn!(%stream, %error, "snapshot not discarded; it is ignored again");
        }
    }
}

/// `orderly_snapshots_total{outcome}`: snapshots saved, failed to save, and ignored at a load
/// (not matching the log, or of another format).
pub(crate) fn count(outcome: &'static str) {
    metrics::counter!("orderly_snapshots_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_snapshotted_every_thousand_events_or_tenth_of_its_length() {
        // Never snapshotted: due once it holds a thousand events (versions 0 to 999).
        assert!(!due(998, None));
        assert!(due(999, None));
        // Snapshotted at 5,000: due again a thousand events later.
        assert!(!due(5_999, Some(5_000)));
        assert!(due(6_000, Some(5_000)));
        // A long stream waits until it has grown by a tenth.
        assert!(!due(105_000, Some(100_000)));
        assert!(due(110_000, Some(100_000)));
        // A snapshot ahead of the state (another process took it) is not due.
        assert!(!due(10, Some(2_000)));
    }
}
