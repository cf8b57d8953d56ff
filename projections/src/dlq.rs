//! Dead letters: events a projection's handler could not apply, parked with the error.
//!
//! `retry` re-applies one parked event in a transaction that first takes the projection's
//! batch lock, so it never interleaves with a runner's batch. Under the `SkipAndPark`
//! policy later events of the same stream may already be applied; the row's version then
//! admits nothing older, the retry changes nothing and says so ([`RetryOutcome::Superseded`]),
//! and the letter stays. Rebuilding the projection after the fix (`--fresh` if an interrupted
//! rebuild left a copy made before it) is the way to get such an event in; the letter is
//! skipped then. Rebuilds park into the same table, so a letter may name an event the live
//! runner has not reached, or one a rebuild's copy will replace: the retry refuses both,
//! saying why. An applied retry notifies the order's followers (the checkpoint stays).

use chrono::{DateTime, Utc};
use orderly_event_store::{Direction, EventStore, Position, StreamName};
use tokio_postgres::Client;

use crate::batch::{Connection, Target, lock_checkpoint};
use crate::error::ProjectionError;
use crate::handlers;
use crate::model::{DeadLetterPolicy, ProjectionName, to_u64};
use crate::watch::{self, ProjectionUpdate};

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub dead_letter_id: i64,
    pub projection: String,
    pub event_id: uuid::Uuid,
    pub stream: String,
    pub version: u64,
    pub position: Position,
    pub event_type: String,
    pub error: String,
    pub parked_at: DateTime<Utc>,
    /// `retried` or `skipped`; `None` while it waits.
    pub resolution: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "dead_letter_id, projection, event_id, stream, version, position_commit,
    position_prepare, event_type, error, parked_at, resolution, resolved_at";

fn dead_letter(row: &tokio_postgres::Row) -> Result<DeadLetter, ProjectionError> {
    Ok(DeadLetter {
        dead_letter_id: row.try_get(0)?,
        projection: row.try_get(1)?,
        event_id: row.try_get(2)?,
        stream: row.try_get(3)?,
        version: to_u64(row.try_get(4)?),
        position: Position::new(to_u64(row.try_get(5)?), to_u64(row.try_get(6)?)),
        event_type: row.try_get(7)?,
        error: row.try_get(8)?,
        parked_at: row.try_get(9)?,
        resolution: row.try_get(10)?,
        resolved_at: row.try_get(11)?,
    })
}

/// Dead letters in the order they were parked; resolved ones only when asked.
pub async fn list(
    client: &Client,
    projection: Option<ProjectionName>,
    include_resolved: bool,
) -> Result<Vec<DeadLetter>, ProjectionError> {
    let rows = client
        .query(
            &format!(
                "select {COLUMNS} from dead_letters
                 where ($1::text is null or projection = $1) and ($2 or resolved_at is null)
                 order by dead_letter_id"
            ),
            &[&projection.map(|p| p.as_str()), &include_resolved],
        )
        .await?;
    rows.iter().map(dead_letter).collect()
}

/// Unresolved dead letters, of one projection or all.
pub async fn count(
    client: &Client,
    projection: Option<ProjectionName>,
) -> Result<i64, ProjectionError> {
    let row = client
        .query_one(
            "select count(*) from dead_letters
             where ($1::text is null or projection = $1) and resolved_at is null",
            &[&projection.map(|p| p.as_str())],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Marks a dead letter resolved without applying it. Under the `Stop` policy the runner then
/// passes over the event when restarted.
pub async fn skip(client: &Client, dead_letter_id: i64) -> Result<(), ProjectionError> {
    let updated = client
        .execute(
            "update dead_letters set resolution = 'skipped', resolved_at = now()
             where dead_letter_id = $1 and resolved_at is null",
            &[&dead_letter_id],
        )
        .await?;
    if updated == 0 {
        return Err(ProjectionError::DeadLetterNotFound(dead_letter_id));
    }
    Ok(())
}

/// What a retry did.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    /// Applied and marked resolved.
    Applied,
    /// Failed again; the dead letter stays, with the new error.
    FailedAgain(String),
    /// Nothing applied: the read model holds later events of the letter's stream, so its
    /// rows admit nothing older; or the live projection has not reached the event yet; or a
    /// rebuild's copy, which would not hold it, is to be swapped in. The dead letter stays;
    /// the text says what to do.
    Superseded(String),
}

/// Re-applies one parked event, read again from the store.
pub async fn retry(
    client: &mut Connection,
    store: &dyn EventStore,
    dead_letter_id: i64,
) -> Result<RetryOutcome, ProjectionError> {
    let row = client
        .query_opt(
            &format!("select {COLUMNS} from dead_letters where dead_letter_id = $1 and resolved_at is null"),
            &[&dead_letter_id],
        )
        .await?
        .ok_or(ProjectionError::DeadLetterNotFound(dead_letter_id))?;
    let letter = dead_letter(&row)?;
    let name: ProjectionName = letter.projection.parse()?;
    let stream =
        StreamName::parse(letter.stream.clone()).map_err(|e| ProjectionError::Store(e.into()))?;
    let events = store
        .read_stream(&stream, Direction::Forwards, Some(letter.version), 1)
        .await?
        .into_iter()
        .filter(|e| e.id == letter.event_id)
        .collect::<Vec<_>>();
    if events.is_empty() {
        return Ok(RetryOutcome::FailedAgain(format!(
            "event {} is no longer at {}@{}",
            letter.event_id, letter.stream, letter.version
        )));
    }
    // The event before it in its stream, if any: applied ahead of that one, the letter would
    // make the runner skip it (the row's version admits nothing older).
    let before = match letter.version.checked_sub(1) {
        Some(version) => store
            .read_stream(&stream, Direction::Forwards, Some(version), 1)
            .await?
            .into_iter()
            .next()
            .map(|event| event.position),
        None => None,
    };
    let tx = client.transaction().await?;
    let checkpoint = lock_checkpoint(&tx, name, Target::Live).await?;
    // A rebuild parks into the same table: its letter may be for an event the live runner
    // has not reached, behind others of its stream the runner has not applied either. (A
    // letter the runner parked itself, or stopped at, never is.)
    if before.is_some_and(|before| checkpoint.is_none_or(|at| before > at)) {
        return Ok(RetryOutcome::Superseded(format!(
            "the live {name} projection has not reached this event yet (a rebuild parked it), \
             nor the event before it in {}: its runner applies or parks them when it gets \
             there. Retry then if it is still parked, or skip it if the runner applied it",
            letter.stream
        )));
    }
    // Nor while a rebuild's copy exists: its swap replaces the live tables, and the copy may
    // have parked this event before the retry.
    let rebuilding: bool = tx
        .query_one(
            "select exists (select 1 from projection_rebuilds where projection = $1)",
            &[&name.as_str()],
        )
        .await?
        .try_get(0)?;
    if rebuilding {
        return Ok(RetryOutcome::Superseded(format!(
            "a rebuild of {name} is under way, or was interrupted: the copy it swaps in would \
             not hold what a retry applies now. Let it finish (run it again to resume it), \
             then retry this letter if it is still parked"
        )));
    }
    let outcome = handlers::apply(
        name,
        &tx,
        handlers::decode(name, events),
        DeadLetterPolicy::Stop,
        &Default::default(),
    )
    .await?;
    if let Some(failed) = outcome.stopped {
        drop(tx);
        client
            .execute(
                "update dead_letters set error = $2 where dead_letter_id = $1",
                &[&dead_letter_id, &failed.error],
            )
            .await?;
        return Ok(RetryOutcome::FailedAgain(failed.error));
    }
    if !outcome.changed {
        return Ok(RetryOutcome::Superseded(format!(
            "the {name} read model already holds later events of {} than version {}, so \
             nothing older applies: rebuild the projection to get it in (then skip this \
             letter), or skip it if a rebuild since has",
            letter.stream, letter.version
        )));
    }
    tx.execute(
        "update dead_letters set resolution = 'retried', resolved_at = now() where dead_letter_id = $1",
        &[&dead_letter_id],
    )
    .await?;
    tx.commit().await?;
    // The checkpoint did not move, so only a notice tells `orderUpdated` followers (in every
    // process) that the order changed.
    let update = ProjectionUpdate {
        projection: name.as_str().to_owned(),
        position: checkpoint.unwrap_or(Position::START),
        order_ids: outcome.order_ids,
        truncated: false,
        traceparent: None,
    };
    watch::notify(client, &update).await;
    Ok(RetryOutcome::Applied)
}
