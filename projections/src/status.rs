//! `ProjectionStatus`: where each projection is, how far behind, and what waits in its dead
//! letters.

use chrono::{DateTime, Utc};
use orderly_event_store::Position;
use tokio_postgres::Client;

use crate::dlq;
use crate::error::ProjectionError;
use crate::model::{ProjectionName, to_i64, to_u64};

/// The contract's `ProjectionState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionState {
    Running,
    CatchingUp,
    Rebuilding,
    Stopped,
    Failed,
}

impl ProjectionState {
    /// The contract's spelling, also what `projection_checkpoints.state` holds.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::CatchingUp => "CATCHING_UP",
            Self::Rebuilding => "REBUILDING",
            Self::Stopped => "STOPPED",
            Self::Failed => "FAILED",
        }
    }

    fn parse(stored: &str) -> Self {
        match stored {
            "RUNNING" => Self::Running,
            "CATCHING_UP" => Self::CatchingUp,
            "REBUILDING" => Self::Rebuilding,
            "FAILED" => Self::Failed,
            _ => Self::Stopped,
        }
    }
}

/// One projection, as `projections` (GraphQL) and `orderly projections status` show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    pub name: ProjectionName,
    pub state: ProjectionState,
    pub position: Position,
    /// Events of this projection's streams after its checkpoint; `None` when the event log is
    /// not in this database (another store), so it cannot be counted here.
    pub lag_events: Option<i64>,
    /// Age of the oldest event not yet applied, 0 when caught up; `None` as for `lag_events`.
    pub lag_ms: Option<i64>,
    /// Unresolved dead letters.
    pub dead_letters: i64,
    pub last_error: Option<String>,
    /// The shadow copy's checkpoint while a rebuild is under way (or was interrupted).
    pub rebuild_position: Option<Position>,
    /// When the runner last recorded its state or checkpoint; `None` before it first ran.
    pub updated_at: Option<DateTime<Utc>>,
}

/// The status of every projection. A runner recorded as running whose advisory lock nobody
/// holds has died without saying so, and shows as `STOPPED`.
pub async fn status(client: &Client) -> Result<Vec<ProjectionStatus>, ProjectionError> {
    let mut all = Vec::new();
    for name in ProjectionName::ALL {
        // Read only: a projection that never ran has no row yet and shows as stopped at START.
        let row = client
            .query_one(
                "select c.state, c.last_error, c.updated_at,
                        r.position_commit, r.position_prepare,
                        exists (select 1 from pg_locks
                                where locktype = 'advisory' and granted and objsubid = 1
                                  and database = (select oid from pg_database
                                                  where datname = current_database())
                                  and ((classid::bigint << 32) | objid::bigint) = $2),
                        c.position_commit, c.position_prepare
                 from (select $1::text as projection) p
                 left join projection_checkpoints c using (projection)
                 left join projection_rebuilds r using (projection)",
                &[&name.as_str(), &name.runner_lock()],
            )
            .await?;
        let stored: Option<String> = row.try_get(0)?;
        let held: bool = row.try_get(5)?;
        let commit: Option<i64> = row.try_get(6)?;
        let prepare: Option<i64> = row.try_get(7)?;
        let position = Position::new(to_u64(commit.unwrap_or(0)), to_u64(prepare.unwrap_or(0)));
        let rebuild_commit: Option<i64> = row.try_get(3)?;
        let rebuild_prepare: Option<i64> = row.try_get(4)?;
        let rebuild_position = rebuild_commit
            .zip(rebuild_prepare)
            .map(|(c, p)| Position::new(to_u64(c), to_u64(p)));
        let mut state = ProjectionState::parse(stored.as_deref().unwrap_or("STOPPED"));
        if matches!(
            state,
            ProjectionState::Running | ProjectionState::CatchingUp
        ) && !held
        {
            state = ProjectionState::Stopped;
        }
        if rebuild_position.is_some() && state != ProjectionState::Failed {
            state = ProjectionState::Rebuilding;
        }
        let (lag_events, lag_ms) = lag(client, name, position).await;
        all.push(ProjectionStatus {
            name,
            state,
            position,
            lag_events,
            lag_ms,
            dead_letters: dlq::count(client, Some(name)).await?,
            last_error: row.try_get(1)?,
            rebuild_position,
            updated_at: row.try_get(2)?,
        });
    }
    Ok(all)
}

/// Counts in the PostgreSQL event log; `(None, None)` when it is elsewhere.
pub(crate) async fn lag(
    client: &Client,
    name: ProjectionName,
    position: Position,
) -> (Option<i64>, Option<i64>) {
    let counted = client
        .query_one(
            "select count(*), coalesce((extract(epoch from now() - min(recorded_at)) * 1000)::bigint, 0)
             from events
             where (tx_id, seq) > ($1, $2) and category = any($3)",
            &[
                &to_i64(position.commit),
                &to_i64(position.prepare),
                &name.categories(),
            ],
        )
        .await;
    match counted {
        Ok(row) => (row.try_get(0).ok(), row.try_get(1).ok()),
        Err(error) => {
            tracing::debug!(%error, "cannot count projection lag in this database");
            (None, None)
        }
    }
}
