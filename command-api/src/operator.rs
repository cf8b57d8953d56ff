//! The saga's operator queries and mutations, for the console and scripts: what `orderly saga
//! status`, `saga parked` and `saga outbox` show and do, over `saga::maintenance`. All of them
//! are for admins, checked here before anything is read or changed.

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use orderly_graphql::{Caller, ConsistencyToken, ErrorCode, Long};
use uuid::Uuid;

use crate::CommandError;
use crate::saga::maintenance::{self, LaneStatus, OutboxEntry, ParkedEvent, ParkedOf};

/// What the saga's operator resolvers need: the database of the saga's tables and the saga's
/// name. A schema without it (the read API alone) does not serve these operations at all.
#[derive(Clone)]
pub struct SagaOperations {
    pool: Pool,
    saga_name: String,
}

impl SagaOperations {
    pub fn new(pool: Pool, saga_name: impl Into<String>) -> Self {
        Self {
            pool,
            saga_name: saga_name.into(),
        }
    }
}

#[derive(Default)]
pub struct SagaQuery;

#[derive(Default)]
pub struct SagaMutation;

/// One lane of the saga.
#[derive(SimpleObject, Debug, Clone)]
pub struct SagaLane {
    pub lane: i32,
    /// The member holding its lease; null when no lease is current.
    pub owner: Option<String>,
    /// Grows with every change of owner; fences the writes of a former owner.
    pub generation: Long,
    /// Everything of this lane at or below this position is handled.
    pub checkpoint: ConsistencyToken,
    /// True when the lane has read the whole log; null when unknown (the log is not in the
    /// saga's database).
    pub caught_up: Option<bool>,
    /// Age of the oldest event of the log after the checkpoint; null when caught up or unknown.
    pub behind_seconds: Option<f64>,
}

impl From<LaneStatus> for SagaLane {
    fn from(lane: LaneStatus) -> Self {
        Self {
            lane: lane.lane,
            owner: lane.owner,
            generation: Long(lane.generation),
            checkpoint: ConsistencyToken(lane.checkpoint),
            caught_up: lane.behind_seconds.map(|behind| behind.is_none()),
            behind_seconds: lane.behind_seconds.flatten(),
        }
    }
}

/// The saga as `orderly saga status` shows it.
#[derive(SimpleObject, Debug, Clone)]
pub struct SagaStatus {
    pub name: String,
    /// Empty until a saga runner has run against this database.
    pub lanes: Vec<SagaLane>,
    /// The processes whose membership is current; they share the lanes.
    pub members: Vec<String>,
    /// Events parked and waiting for an operator.
    pub parked: i32,
    /// Instances not settled yet (neither delivered nor cancelled and compensated).
    pub in_flight: Long,
    /// Instances whose deadline passed more than a minute ago without being handled: their
    /// lane's tick fails for them (the saga's log names the order and the error), or no
    /// process serves their lane.
    pub overdue: Long,
    /// The instance longest overdue, if any.
    pub oldest_overdue_order_id: Option<Uuid>,
}

/// An event a saga step failed on for good, set aside so its lane could go on.
#[derive(SimpleObject, Debug, Clone)]
pub struct ParkedSagaEvent {
    pub event_id: Uuid,
    /// Null for an event that did not decode.
    pub order_id: Option<Uuid>,
    pub stream: String,
    #[graphql(name = "type")]
    pub event_type: String,
    pub error: String,
    pub attempts: i32,
    pub parked_at: DateTime<Utc>,
    /// Set by a retry until the lane has fed the event again.
    pub retry_requested_at: Option<DateTime<Utc>>,
}

impl From<ParkedEvent> for ParkedSagaEvent {
    fn from(event: ParkedEvent) -> Self {
        Self {
            event_id: event.event_id,
            order_id: event.order_id,
            stream: event.stream,
            event_type: event.event_type,
            error: event.error,
            attempts: event.attempts,
            parked_at: event.parked_at,
            retry_requested_at: event.retry_requested_at,
        }
    }
}

/// An undelivered outbox message (a gateway call or a notification).
#[derive(SimpleObject, Debug, Clone)]
pub struct OutboxMessage {
    pub outbox_id: Uuid,
    pub order_id: Uuid,
    /// `charge`, `refund` or `notification`.
    pub kind: String,
    /// `pending`, `dead-lettered` or `skipped`.
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

impl From<OutboxEntry> for OutboxMessage {
    fn from(entry: OutboxEntry) -> Self {
        Self {
            outbox_id: entry.outbox_id,
            order_id: entry.order_id,
            kind: entry.kind,
            state: entry.state.as_str().to_owned(),
            attempts: entry.attempts,
            last_error: entry.last_error,
            created_at: entry.created_at,
            dead_lettered_at: entry.dead_lettered_at,
        }
    }
}

/// Runs one operator resolver: refuses anyone but an admin, then gives `body` a connection to
/// the saga's database and the saga's name, and maps the error.
async fn as_admin<T>(
    ctx: &Context<'_>,
    body: impl AsyncFnOnce(&tokio_postgres::Client, &str) -> Result<T, CommandError>,
) -> async_graphql::Result<T> {
    // Both are put there by the wiring; a schema built without them is a bug, not bad input.
    let wiring = |_| ErrorCode::Internal.error("internal error");
    let caller = ctx.data::<Caller>().map_err(wiring)?;
    let operations = ctx.data::<SagaOperations>().map_err(wiring)?;
    let run = async {
        let actor = caller.actor.as_ref().ok_or(CommandError::Unauthenticated)?;
        if !actor.is_admin() {
            return Err(CommandError::Forbidden("operator actions are for admins"));
        }
        let client = operations.pool.get().await?;
        body(&client, &operations.saga_name).await
    };
    run.await
        .map_err(|error| error.to_graphql(&caller.request_id))
}

#[Object(name = "SagaOperatorQueries")]
impl SagaQuery {
    /// Admin only. The saga's lanes with their owners, checkpoints and lag, its members and
    /// how many events are parked, instances in flight and deadlines overdue (`orderly saga
    /// status`).
    async fn saga_status(&self, ctx: &Context<'_>) -> async_graphql::Result<SagaStatus> {
        as_admin(ctx, async |client, saga| {
            let lanes = maintenance::lanes(client, saga).await?;
            let members = maintenance::members(client, saga).await?;
            let parked = maintenance::parked(client, saga).await?;
            let in_flight = maintenance::in_flight(client, saga).await?;
            let overdue = maintenance::overdue(client, saga).await?;
            Ok(SagaStatus {
                name: saga.to_owned(),
                lanes: lanes.into_iter().map(Into::into).collect(),
                members,
                parked: i32::try_from(parked.len()).unwrap_or(i32::MAX),
                in_flight: Long(in_flight),
                overdue: Long(overdue.count),
                oldest_overdue_order_id: overdue.oldest.map(|(order_id, _)| order_id),
            })
        })
        .await
    }

    /// Admin only. Parked saga events waiting for an operator, oldest first
    /// (`orderly saga parked list`).
    async fn saga_parked_events(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<Vec<ParkedSagaEvent>> {
        as_admin(ctx, async |client, saga| {
            let parked = maintenance::parked(client, saga).await?;
            Ok(parked.into_iter().map(Into::into).collect())
        })
        .await
    }

    /// Admin only. Outbox dead letters waiting for an operator, oldest first; with
    /// `includePending`, pending and skipped messages too (`orderly saga outbox list`).
    async fn outbox_dead_letters(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = false)] include_pending: bool,
    ) -> async_graphql::Result<Vec<OutboxMessage>> {
        as_admin(ctx, async |client, _| {
            let entries = maintenance::list(client, include_pending).await?;
            Ok(entries.into_iter().map(Into::into).collect())
        })
        .await
    }
}

#[Object(name = "SagaOperatorMutations")]
impl SagaMutation {
    /// Admin only. Asks the lane that owns a parked event to feed it to the saga again within
    /// seconds; it is unparked if the step succeeds, parked again with the new error if not.
    async fn retry_parked_saga_event(
        &self,
        ctx: &Context<'_>,
        event_id: Uuid,
    ) -> async_graphql::Result<bool> {
        as_admin(ctx, async |client, saga| {
            maintenance::retry_parked(client, saga, ParkedOf::Event(event_id)).await?;
            Ok(true)
        })
        .await
    }

    /// Admin only. Drops a parked event for good: the saga never feeds it again (the order's
    /// stock and payment deadlines still read the reservations and the payment, and a parked
    /// placement, cancel or shipment is still acted on: the saga kept it when it parked it).
    /// UNAVAILABLE while a retry of it is under way in a running saga process: skip it if the
    /// retry parks it again. BAD_USER_INPUT for a charge the saga has not seen, which nothing
    /// else would refund once its order is cancelled: retry it.
    async fn skip_parked_saga_event(
        &self,
        ctx: &Context<'_>,
        event_id: Uuid,
    ) -> async_graphql::Result<bool> {
        as_admin(ctx, async |client, saga| {
            maintenance::skip_parked(client, saga, ParkedOf::Event(event_id)).await?;
            Ok(true)
        })
        .await
    }

    /// Admin only. [`Self::retry_parked_saga_event`] for every parked event of one order (its
    /// saga instance), fed in log order; how many were asked for. NOT_FOUND when none is.
    async fn retry_parked_saga_events_of_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
    ) -> async_graphql::Result<i32> {
        as_admin(ctx, async |client, saga| {
            let asked = maintenance::retry_parked(client, saga, ParkedOf::Order(order_id)).await?;
            Ok(i32::try_from(asked).unwrap_or(i32::MAX))
        })
        .await
    }

    /// Admin only. [`Self::skip_parked_saga_event`] for every parked event of one order (its
    /// saga instance); how many were skipped. NOT_FOUND when none is parked.
    async fn skip_parked_saga_events_of_order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
    ) -> async_graphql::Result<i32> {
        as_admin(ctx, async |client, saga| {
            let skipped = maintenance::skip_parked(client, saga, ParkedOf::Order(order_id)).await?;
            Ok(i32::try_from(skipped).unwrap_or(i32::MAX))
        })
        .await
    }

    /// Admin only. Puts a dead-lettered outbox message back in line with fresh attempts; a
    /// running saga runner's outbox worker delivers it.
    async fn retry_outbox_message(
        &self,
        ctx: &Context<'_>,
        outbox_id: Uuid,
    ) -> async_graphql::Result<bool> {
        as_admin(ctx, async |client, _| {
            maintenance::retry(client, outbox_id).await?;
            Ok(true)
        })
        .await
    }

    /// Admin only. Marks a dead-lettered outbox message as not to be delivered. BAD_USER_INPUT
    /// for a refund or a resolution: money would stay taken, or unknown (`orderly saga outbox
    /// skip ID --refunded-elsewhere` or `--not-charged` records what was found elsewhere).
    async fn skip_outbox_message(
        &self,
        ctx: &Context<'_>,
        outbox_id: Uuid,
    ) -> async_graphql::Result<bool> {
        as_admin(ctx, async |client, _| {
            maintenance::skip(client, outbox_id).await?;
            Ok(true)
        })
        .await
    }
}
