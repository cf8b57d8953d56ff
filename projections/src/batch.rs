//! One batch, one transaction: lock the checkpoint, check it is where the caller believes,
//! apply the events, park what failed, move the checkpoint, commit.
//!
//! The compare on the checkpoint is what makes double application impossible whatever runs
//! where: a runner whose checkpoint was moved by someone else (another process that took over,
//! or a rebuild that swapped in its shadow copy) gets [`BatchResult::Moved`] and re-reads from
//! there. Taking the projection's batch lock first (an advisory lock standing for the checkpoint
//! row, see [`lock_checkpoint`]) also fixes one lock order for every writer of a projection
//! (runner, dead-letter retry, swap), so they cannot deadlock one another.

use std::collections::HashSet;

use deadpool_postgres::{ClientWrapper, Transaction};
use orderly_event_store::Position;
use orderly_event_store::postgres::{DURABLE_COMMITS, PgConfig};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::handlers::{self, Decoded};
use crate::model::{DeadLetterPolicy, Parked, ProjectionName, to_i64, to_u64};

/// A connection of the projections' own (runners, rebuilds, dead-letter retries), with a cache
/// of prepared statements: a batch sends the same dozen statements every time, and parsing and
/// planning them again was a good part of a small live batch's time on the server.
pub type Connection = ClientWrapper;

/// Opens a [`Connection`]; `what` names it in the log when it closes with an error. The
/// server probes it for a vanished peer ([`SERVER_DEAD_PEER_CHECKS`]).
///
/// Its commits wait for their WAL flush even where the server's default is not to: a runner
/// publishes each checkpoint to readers waiting for a consistency token right after the
/// commit, and a token must never vouch for a batch that a server crash takes back. The cost
/// is the flush (about 0.2 ms on the benchmark machine's disk) added to each batch's
/// transaction, measured in BENCHMARKS.md. A rebuild's shadow batches, which nobody waits
/// for, turn it off again.
pub async fn connect(
    pg_config: &PgConfig,
    what: &'static str,
) -> Result<Connection, ProjectionError> {
    let (client, connection) = pg_config.connect(NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(error) = connection.await {
            let error = orderly_event_store::postgres::describe(&error);
            tracing::debug!(%error, "{what} connection closed");
        }
    });
    client
        .batch_execute(&format!("{DURABLE_COMMITS}; {SERVER_DEAD_PEER_CHECKS}"))
        .await?;
    Ok(ClientWrapper::new(client, task))
}

/// The server's side of the checks for a vanished peer that the connection makes itself (TCP
/// keepalives and a user timeout): a runner's session holds its projection's advisory lock,
/// which the standbys wait for, and a rebuild's its own. Were this process's host to vanish (a
/// crash, a partition), the server would keep the session, and the lock, until its own
/// keepalives gave up, after the system's two hours by default; with these, after about a
/// minute and a half. Ignored on a Unix socket, where the server learns at once.
const SERVER_DEAD_PEER_CHECKS: &str = "set tcp_keepalives_idle = 30; \
     set tcp_keepalives_interval = 10; set tcp_keepalives_count = 3; \
     set tcp_user_timeout = 60000";

/// Which checkpoint a batch moves: the live tables' or a shadow copy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Live,
    Shadow,
}

impl Target {
    fn table(self) -> &'static str {
        match self {
            Self::Live => "projection_checkpoints",
            Self::Shadow => "projection_rebuilds",
        }
    }
}

pub(crate) enum BatchResult {
    Committed(Committed),
    /// The checkpoint is not where the caller thought: read again from this position.
    Moved(Position),
}

#[derive(Debug)]
pub(crate) struct Committed {
    pub position: Position,
    pub order_ids: Vec<Uuid>,
    pub parked: usize,
    pub stopped: Option<Parked>,
}

/// Reads the checkpoint of `name` in `target`, creating it at the start when missing.
pub(crate) async fn checkpoint(
    client: &Client,
    name: ProjectionName,
    target: Target,
) -> Result<Position, ProjectionError> {
    let table = target.table();
    client
        .execute(
            &format!("insert into {table} (projection) values ($1) on conflict do nothing"),
            &[&name.as_str()],
        )
        .await?;
    let row = client
        .query_one(
            &format!("select position_commit, position_prepare from {table} where projection = $1"),
            &[&name.as_str()],
        )
        .await?;
    Ok(Position::new(
        to_u64(row.try_get(0)?),
        to_u64(row.try_get(1)?),
    ))
}

/// Takes the projection's batch lock for the rest of the open transaction and returns where
/// the checkpoint is.
///
/// A transaction-level advisory lock rather than `for update` on the checkpoint row: a row
/// lock gives the transaction an id at once, and the log's readers (this projection's own
/// among them) read only below the oldest transaction id in flight, so a batch holding one
/// through its loads and fold would hold back every reader of the log. With the advisory lock
/// a batch gets its id at its first write, and only its write-back counts.
pub(crate) async fn lock_checkpoint(
    tx: &Transaction<'_>,
    name: ProjectionName,
    target: Target,
) -> Result<Option<Position>, ProjectionError> {
    // Two statements, sent together: under read committed a statement reads as of its start,
    // and the server starts the read only after the lock is granted, so it cannot miss the
    // previous holder's commit.
    let key = name.batch_lock(target == Target::Shadow);
    let projection = name.as_str();
    let lock: [&(dyn ToSql + Sync); 1] = [&key];
    let which: [&(dyn ToSql + Sync); 1] = [&projection];
    let read = format!(
        "select position_commit, position_prepare from {} where projection = $1",
        target.table()
    );
    let (lock_statement, read_statement) = futures::try_join!(
        tx.prepare_cached("select pg_advisory_xact_lock($1)"),
        tx.prepare_cached(&read),
    )?;
    let (_, row) = futures::try_join!(
        tx.execute(&lock_statement, &lock),
        tx.query_opt(&read_statement, &which),
    )?;
    row.map(|row| -> Result<Position, ProjectionError> {
        Ok(Position::new(
            to_u64(row.try_get(0)?),
            to_u64(row.try_get(1)?),
        ))
    })
    .transpose()
}

pub(crate) async fn set_checkpoint(
    tx: &Transaction<'_>,
    name: ProjectionName,
    target: Target,
    position: Position,
) -> Result<(), ProjectionError> {
    let statement = tx
        .prepare_cached(&format!(
            "update {} set position_commit = $2, position_prepare = $3, updated_at = now()
             where projection = $1",
            target.table()
        ))
        .await?;
    tx.execute(
        &statement,
        &[
            &name.as_str(),
            &to_i64(position.commit),
            &to_i64(position.prepare),
        ],
    )
    .await?;
    Ok(())
}

/// Parks events in `dead_letters`; an event parked before (by an earlier attempt or a rebuild)
/// keeps its first row, unless a retry resolved it: failing again (in a rebuild, say), it
/// waits for an operator again rather than being lost quietly. Skipped events never come here
/// (the batch leaves them out).
pub(crate) async fn park(
    tx: &Transaction<'_>,
    name: ProjectionName,
    parked: &[&Parked],
) -> Result<(), ProjectionError> {
    for p in parked {
        tx.execute(
            "insert into dead_letters (projection, event_id, stream, version, position_commit,
                 position_prepare, event_type, error)
             values ($1, $2, $3, $4, $5, $6, $7, $8)
             on conflict (projection, event_id) do update
                 set error = excluded.error, parked_at = now(), resolution = null,
                     resolved_at = null
                 where dead_letters.resolution = 'retried'",
            &[
                &name.as_str(),
                &p.event_id,
                &p.stream,
                &to_i64(p.version),
                &to_i64(p.position.commit),
                &to_i64(p.position.prepare),
                &p.event_type,
                &p.error,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Applies `batch` (all after `expected`) and moves the checkpoint, in one transaction.
/// `fail_before_commit` rolls everything back at the last moment, as a crash would.
pub(crate) async fn apply_batch(
    client: &mut Connection,
    name: ProjectionName,
    target: Target,
    expected: Position,
    batch: Decoded,
    policy: DeadLetterPolicy,
    fail_before_commit: bool,
) -> Result<BatchResult, ProjectionError> {
    let tx = client.transaction().await?;
    let current = lock_checkpoint(&tx, name, target).await?;
    if current != Some(expected) {
        return Ok(BatchResult::Moved(current.unwrap_or(Position::START)));
    }
    let skipped = if policy == DeadLetterPolicy::Stop {
        let ids: Vec<Uuid> = batch.events.iter().map(|(e, _)| e.id).collect();
        tx.query(
            "select event_id from dead_letters
             where projection = $1 and event_id = any($2) and resolution = 'skipped'",
            &[&name.as_str(), &ids],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<HashSet<Uuid>, _>>()?
    } else {
        HashSet::new()
    };
    let outcome = handlers::apply(name, &tx, batch, policy, &skipped).await?;
    let to_park: Vec<&Parked> = outcome.parked.iter().chain(&outcome.stopped).collect();
    park(&tx, name, &to_park).await?;
    let position = outcome.checkpoint.unwrap_or(expected);
    set_checkpoint(&tx, name, target, position).await?;
    if fail_before_commit {
        // Dropping the transaction rolls it back, exactly what a crash before COMMIT leaves.
        drop(tx);
        return Err(ProjectionError::Injected);
    }
    tx.commit().await?;
    Ok(BatchResult::Committed(Committed {
        position,
        order_ids: outcome.order_ids,
        parked: outcome.parked.len(),
        stopped: outcome.stopped,
    }))
}
