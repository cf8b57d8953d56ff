//! Keeping the saga's tables in hand: the operator's view of outbox dead letters (list, retry,
//! skip), of parked saga events (list, retry, skip) and of the lanes, and the retention purge
//! the runner runs periodically.
//!
//! A retry only puts the message back in line: the outbox worker of a running saga runner
//! delivers it with the transports it was configured with (the gateway, SMTP), so the CLI
//! needs none of them and a message is never delivered by two paths at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use orderly_domain::fulfilment::fixed_reason;
use orderly_domain::payment::{self, Payment, PaymentAggregate, PaymentCommand, PaymentStatus};
use orderly_domain::streams;
use orderly_domain::values::OrderId;
use orderly_event_store::Position;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::outbox::NOT_CHARGED_AS_AN_OPERATOR_FOUND;
use crate::CommandError;
use crate::handling::{Envelope, Handler, stream_name};

/// Where an outbox message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxState {
    /// Waiting for its first or next attempt.
    Pending,
    /// Failed its last attempt; waits for an operator.
    DeadLettered,
    /// Dead-lettered, and an operator chose not to deliver it.
    Skipped,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::DeadLettered => "dead-lettered",
            Self::Skipped => "skipped",
        }
    }
}

/// One undelivered outbox message.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub outbox_id: Uuid,
    pub order_id: Uuid,
    /// `charge`, `refund` or `notification`.
    pub kind: String,
    pub state: OutboxState,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered (`None` while pending).
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

const LIST: &str = "
select outbox_id, order_id, kind, attempts, last_error, created_at, dead_lettered_at, skipped_at
from outbox
where delivered_at is null and ($1 or (dead_lettered_at is not null and skipped_at is null))
order by created_at, outbox_id";

/// Dead letters waiting for an operator, oldest first; with `all`, pending and skipped
/// messages too. Delivered messages are never listed (there are many; the log has their
/// effects).
pub async fn list(client: &Client, all: bool) -> Result<Vec<OutboxEntry>, CommandError> {
    let rows = client.query(LIST, &[&all]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let dead_lettered_at: Option<DateTime<Utc>> = row.get(6);
            let skipped_at: Option<DateTime<Utc>> = row.get(7);
            OutboxEntry {
                outbox_id: row.get(0),
                order_id: row.get(1),
                kind: row.get(2),
                attempts: row.get(3),
                last_error: row.get(4),
                created_at: row.get(5),
                state: match (dead_lettered_at, skipped_at) {
                    (_, Some(_)) => OutboxState::Skipped,
                    (Some(_), None) => OutboxState::DeadLettered,
                    (None, None) => OutboxState::Pending,
                },
                dead_lettered_at,
            }
        })
        .collect())
}

/// Puts a dead-lettered (or skipped) message back in line with a fresh set of attempts; the
/// running outbox worker delivers it at its next round. The last error stays until then.
pub async fn retry(client: &Client, outbox_id: Uuid) -> Result<(), CommandError> {
    update_dead_letter(
        client,
        "update outbox set dead_lettered_at = null, skipped_at = null, attempts = 0,
             next_attempt_at = now()
         where outbox_id = $1 and delivered_at is null and dead_lettered_at is not null",
        outbox_id,
    )
    .await
}

/// Marks a dead-lettered message as not to be delivered; it is kept until the purge.
///
/// A refund or a resolution is refused (BAD_USER_INPUT), nothing skipped. Without the refund
/// the customer's money stays taken; without the resolution nobody learns whether a charge
/// whose outcome is unknown took money. Either way the order's saga waits for good (open in
/// the gauges, and in the "stuck" alert). Retry it, or record what was found outside Orderly
/// with [`skip_settled_elsewhere`].
pub async fn skip(client: &Client, outbox_id: Uuid) -> Result<(), CommandError> {
    let row = client
        .query_one(
            "with target as (
                 select outbox_id, kind from outbox
                 where outbox_id = $1 and dead_lettered_at is not null and skipped_at is null
                 for update),
             skipped as (
                 update outbox o set skipped_at = now() from target t
                 where o.outbox_id = t.outbox_id and t.kind not in ('refund', 'resolve')
                 returning 1)
             select (select kind from target), (select count(*) from skipped)",
            &[&outbox_id],
        )
        .await?;
    match row.get::<_, Option<&str>>(0) {
        None => Err(CommandError::NotFound("dead-lettered outbox message")),
        Some("refund") => Err(CommandError::invalid(
            "outboxId",
            "a refund cannot be skipped: the customer's money would stay taken and the \
             order's saga open. Retry it, or, if the money went back another way, record that \
             with `orderly saga outbox skip ID --refunded-elsewhere`",
        )),
        Some("resolve") => Err(CommandError::invalid(
            "outboxId",
            "a resolution cannot be skipped: whether the provider took money for the order's \
             last charge would stay unknown and the order's saga open. Retry it, or, if the \
             provider holds no such charge, record that with `orderly saga outbox skip ID \
             --not-charged`",
        )),
        Some(_) => Ok(()),
    }
}

/// What an operator found settled outside Orderly, to skip a dead-lettered message that is
/// about money (see [`skip`] and [`skip_settled_elsewhere`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettledElsewhere {
    /// A refund: the money went back another way (by hand at the provider).
    Refunded,
    /// A resolution: the provider holds no charge for the order (checked there).
    NotCharged,
}

impl SettledElsewhere {
    /// The kind of outbox message it settles.
    fn kind(self) -> &'static str {
        match self {
            Self::Refunded => "refund",
            Self::NotCharged => "resolve",
        }
    }

    /// The payment's command that records it, given the payment as it stands; `None` when
    /// there is nothing to record (no charge attempt waits for an outcome).
    fn command(self, payment: Option<&Payment>) -> Option<PaymentCommand> {
        match self {
            Self::Refunded => Some(PaymentCommand::Refund {
                reason: fixed_reason("refunded outside Orderly, as recorded by an operator"),
                refunded_at: Utc::now(),
            }),
            Self::NotCharged => payment
                .filter(|payment| payment.status == PaymentStatus::Pending)
                .map(|payment| PaymentCommand::RecordFailure {
                    reason: fixed_reason(NOT_CHARGED_AS_AN_OPERATOR_FOUND),
                    attempt: payment.attempts,
                    failed_at: Utc::now(),
                }),
        }
    }
}

/// Skips the dead-lettered message `outbox_id` (a refund or a resolution, as `settled` says)
/// after recording in the payment's stream what the operator found, so that the order's saga
/// settles:
/// - [`SettledElsewhere::Refunded`]: `PaymentRefunded` (nothing more when refunded already;
///   refused when the payment holds no charge);
/// - [`SettledElsewhere::NotCharged`]: the last charge attempt failed, when it has no outcome
///   at all (its cancelled saga waits for one); nothing when it has.
///
/// `actor` names who recorded it. NOT_FOUND unless `outbox_id` is such a message waiting for
/// an operator.
pub async fn skip_settled_elsewhere(
    client: &Client,
    handler: &Handler,
    outbox_id: Uuid,
    settled: SettledElsewhere,
    actor: &str,
) -> Result<(), CommandError> {
    let row = client
        .query_opt(
            "select order_id, (payload ->> 'correlation_id')::uuid from outbox
             where outbox_id = $1 and kind = $2 and dead_lettered_at is not null
               and skipped_at is null",
            &[&outbox_id, &settled.kind()],
        )
        .await?
        .ok_or(CommandError::NotFound(
            "dead-lettered outbox message of that kind",
        ))?;
    let order_id = OrderId(row.get(0));
    let envelope = Envelope {
        command_id: Uuid::new_v5(&outbox_id, b"outcome/settled-elsewhere"),
        correlation_id: row.get::<_, Option<Uuid>>(1).unwrap_or(outbox_id),
        causation_id: outbox_id,
        actor: actor.to_owned(),
        idempotency_key: None,
        traceparent: None,
    };
    let stream = stream_name(streams::payment(order_id))?;
    handler
        .execute::<PaymentAggregate, _>(&stream, None, &envelope, |loaded| {
            match settled.command(loaded.state.as_ref()) {
                Some(command) => Ok(payment::decide(&loaded.state, &command)?),
                None => Ok(Vec::new()),
            }
        })
        .await?;
    update_dead_letter(
        client,
        "update outbox set skipped_at = now()
         where outbox_id = $1 and dead_lettered_at is not null and skipped_at is null",
        outbox_id,
    )
    .await
}

/// Runs `update` on one message; NOT_FOUND when its conditions matched no row.
async fn update_dead_letter(
    client: &Client,
    update: &str,
    outbox_id: Uuid,
) -> Result<(), CommandError> {
    if client.execute(update, &[&outbox_id]).await? == 0 {
        return Err(CommandError::NotFound("dead-lettered outbox message"));
    }
    Ok(())
}

/// The log position below which saga `saga_name` has handled everything: the lowest of its
/// lanes' checkpoints ([`Position::START`] before its first run), for tools that wait for it
/// to catch up.
pub async fn checkpoint(client: &Client, saga_name: &str) -> Result<Position, CommandError> {
    let row = client
        .query_opt(
            "select position_commit, position_prepare from saga_lanes where saga_name = $1
             order by position_commit, position_prepare limit 1",
            &[&saga_name],
        )
        .await?;
    Ok(row.map_or(Position::START, |row| {
        super::lanes::position(row.get(0), row.get(1))
    }))
}

/// One lane of a saga, as `orderly saga status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneStatus {
    pub lane: i32,
    /// The member holding it, if its lease is current.
    pub owner: Option<String>,
    pub generation: i64,
    pub checkpoint: Position,
    /// Age of the oldest event of the log after this lane's checkpoint (any lane's: the log is
    /// not indexed by order): `Some(None)` when the lane has read everything, `None` when
    /// unknown (the log is not in this database).
    pub behind_seconds: Option<Option<f64>>,
}

/// Every lane of saga `saga_name` with its owner and how far behind the log it is. How far
/// behind is read from the PostgreSQL event store's table beside the saga's; with another
/// event store it is left unknown.
pub async fn lanes(client: &Client, saga_name: &str) -> Result<Vec<LaneStatus>, CommandError> {
    let rows = client
        .query(
            "select lane, case when lease_until > now() then owner end, generation,
                    position_commit, position_prepare
             from saga_lanes where saga_name = $1 order by lane",
            &[&saga_name],
        )
        .await?;
    let mut lanes: Vec<LaneStatus> = rows
        .iter()
        .map(|row| LaneStatus {
            lane: row.get(0),
            owner: row.get(1),
            generation: row.get(2),
            checkpoint: super::lanes::position(row.get(3), row.get(4)),
            behind_seconds: None,
        })
        .collect();
    let behind = client
        .query(
            "select l.lane, extract(epoch from now() - (
                 select e.recorded_at from events e
                 where (e.tx_id, e.seq) > (l.position_commit, l.position_prepare)
                   and e.category in ('order', 'product', 'payment')
                 order by e.tx_id, e.seq limit 1))::float8
             from saga_lanes l where l.saga_name = $1",
            &[&saga_name],
        )
        .await;
    let behind = match behind {
        Ok(behind) => behind,
        // No log in this database (another event store): how far behind stays unknown. Any
        // other failure (a timeout, a lost connection) is the status's, not an unknown lag.
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(lanes);
        }
        Err(error) => return Err(error.into()),
    };
    for row in behind {
        let lane: i32 = row.get(0);
        if let Some(status) = lanes.iter_mut().find(|status| status.lane == lane) {
            status.behind_seconds = Some(row.get(1));
        }
    }
    Ok(lanes)
}

/// The processes of saga `saga_name` whose membership is current: they share its lanes.
pub async fn members(client: &Client, saga_name: &str) -> Result<Vec<String>, CommandError> {
    let rows = client
        .query(super::lanes::LIVE_MEMBERS, &[&saga_name])
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// How many instances of saga `saga_name` are not settled yet. Counts every stored state
/// (settled ones are purged after the retention, so they stay few where one is set).
pub async fn in_flight(client: &Client, saga_name: &str) -> Result<i64, CommandError> {
    let row = client
        .query_one(
            "select count(*) from saga_states where saga_name = $1 and not settled",
            &[&saga_name],
        )
        .await?;
    Ok(row.get(0))
}

/// How long past its deadline a saga instance counts as overdue: a lane handles its due
/// deadlines within a tick (a second by default), so this long means its tick keeps failing
/// (a state that does not decode, a command refused for good) or no process serves its lane.
pub const OVERDUE_AFTER: Duration = Duration::from_secs(60);

/// The deadlines of a saga that are overdue (see [`OVERDUE_AFTER`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Overdue {
    pub count: i64,
    /// The order longest overdue, and its deadline: the runner's log names its cause.
    pub oldest: Option<(Uuid, DateTime<Utc>)>,
}

/// The deadlines of saga `saga_name` more than [`OVERDUE_AFTER`] past.
pub async fn overdue(client: &Client, saga_name: &str) -> Result<Overdue, CommandError> {
    let rows = client
        .query(
            "select count(*) over (), order_id, due_at from saga_states
             where saga_name = $1 and due_at < now() - make_interval(secs => $2)
             order by due_at limit 1",
            &[&saga_name, &OVERDUE_AFTER.as_secs_f64()],
        )
        .await?;
    Ok(rows.first().map_or(
        Overdue {
            count: 0,
            oldest: None,
        },
        |row| Overdue {
            count: row.get(0),
            oldest: Some((row.get(1), row.get(2))),
        },
    ))
}

/// One event a saga step failed on for good, waiting for an operator.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedEvent {
    pub event_id: Uuid,
    /// `None` for an event that did not decode.
    pub order_id: Option<Uuid>,
    pub stream: String,
    pub event_type: String,
    pub error: String,
    pub attempts: i32,
    pub parked_at: DateTime<Utc>,
    /// Set by `retry` until the lane has fed the event again.
    pub retry_requested_at: Option<DateTime<Utc>>,
}

/// The parked events of saga `saga_name`, oldest first (skipped ones are not listed).
pub async fn parked(client: &Client, saga_name: &str) -> Result<Vec<ParkedEvent>, CommandError> {
    let rows = client
        .query(
            "select event_id, order_id, stream, event_type, error, attempts, parked_at,
                    retry_requested_at
             from saga_parked where saga_name = $1 and skipped_at is null
             order by position_commit, position_prepare",
            &[&saga_name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| ParkedEvent {
            event_id: row.get(0),
            order_id: row.get(1),
            stream: row.get(2),
            event_type: row.get(3),
            error: row.get(4),
            attempts: row.get(5),
            parked_at: row.get(6),
            retry_requested_at: row.get(7),
        })
        .collect())
}

/// The parked events an operator's retry or skip acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedOf {
    /// One event, by its id.
    Event(Uuid),
    /// Every parked event of one order (its saga instance): a repair usually concerns them
    /// all, and a retry feeds them in log order.
    Order(Uuid),
}

impl ParkedOf {
    /// The column that picks the events, and its value.
    fn key(self) -> (&'static str, Uuid) {
        match self {
            Self::Event(id) => ("event_id", id),
            Self::Order(id) => ("order_id", id),
        }
    }

    /// The argument that names them at the API.
    fn field(self) -> &'static str {
        match self {
            Self::Event(_) => "eventId",
            Self::Order(_) => "orderId",
        }
    }
}

/// Asks the lane that owns the parked events `which` to feed them to its saga again (within
/// seconds, in log order); each is unparked if its step succeeds, and parked again with the
/// new error if not. How many were asked for; NOT_FOUND when none is parked.
pub async fn retry_parked(
    client: &Client,
    saga_name: &str,
    which: ParkedOf,
) -> Result<u64, CommandError> {
    let (key, id) = which.key();
    let update = format!(
        "update saga_parked set retry_requested_at = now()
         where saga_name = $1 and {key} = $2 and skipped_at is null"
    );
    match client.execute(&update, &[&saga_name, &id]).await? {
        0 => Err(CommandError::NotFound("parked saga event")),
        asked => Ok(asked),
    }
}

/// Drops the parked events `which` for good: the saga never feeds them again. The rows stay,
/// marked, for the record. The order's deadlines still read what the saga would have learnt
/// from a reservation (from the products, at the stock deadline) or a payment (from its
/// stream, at the payment deadline); once the order is cancelled or shipped, the products'
/// answers it has not seen (to reservations, releases, shipments) and its payment (a refund, a
/// charge's outcome) are read again (a stock deadline later, then less and less often) until
/// its saga settles. What the saga kept when it parked a placement, a cancel or a shipment is
/// still acted on (see `fulfilment::parked`). How many were skipped; NOT_FOUND when none is
/// parked.
///
/// A charge the order's saga has not seen is refused (BAD_USER_INPUT), nothing skipped. Once
/// the order is cancelled (now, or by its customer later), its saga settles when the releases
/// are answered and no attempt it knows of is outstanding (one recorded failed counts as
/// answered, though the provider may have charged it after all), without reading the payment
/// again: nothing else would refund that money. Retry it once its cause is fixed; its step
/// confirms the order, or refunds a cancelled one.
///
/// An event that did not decode names no order, and nothing of it is kept: skipping an
/// order's placement, cancel or shipment that did not decode leaves that order as the saga
/// last saw it.
///
/// Refused with [`CommandError::InProgress`] (UNAVAILABLE at the API), nothing skipped, while
/// a retry of any of them is asked for and not yet ended and a saga process is running: its
/// lane may be sending the step's commands already, and the retry's success would delete the
/// skipped row. A running runner ends a retry within seconds; skip what it parks again then.
/// With no saga process alive nothing can be feeding them, and the skip goes ahead (a runner
/// started later reads only events not skipped).
pub async fn skip_parked(
    client: &Client,
    saga_name: &str,
    which: ParkedOf,
) -> Result<u64, CommandError> {
    let (key, id) = which.key();
    // The rows are locked first, so a retry asked for meanwhile is seen (or waits for this).
    let skip = format!(
        "with target as (
             select event_id,
                    retry_requested_at is not null
                    and exists (select 1 from saga_members m
                                where m.saga_name = $1 and m.lease_until > now()) as retrying,
                    event_type = 'PaymentCharged'
                    and not exists (select 1 from saga_states s
                                    where s.saga_name = $1 and s.order_id = p.order_id
                                      and s.state->'payment'->>'charged' is not null)
                    as unseen_charge
             from saga_parked p
             where saga_name = $1 and {key} = $2 and skipped_at is null
             for update),
         skipped as (
             update saga_parked p set skipped_at = now()
             from target t
             where p.saga_name = $1 and p.event_id = t.event_id
               and not exists (select 1 from target where retrying or unseen_charge)
             returning 1)
         select (select count(*) from target), (select count(*) from target where retrying),
                (select count(*) from target where unseen_charge),
                (select count(*) from skipped)"
    );
    let row = client.query_one(&skip, &[&saga_name, &id]).await?;
    let [parked, retrying, unseen_charges, skipped]: [i64; 4] = std::array::from_fn(|i| row.get(i));
    if parked == 0 {
        return Err(CommandError::NotFound("parked saga event"));
    }
    if retrying > 0 {
        return Err(CommandError::InProgress(format!(
            "a retry of {retrying} of these parked events is under way (a running saga runner \
             ends it within seconds); skip what is parked again once it has"
        )));
    }
    if unseen_charges > 0 {
        return Err(CommandError::invalid(
            which.field(),
            "a charge the order's saga has not seen cannot be skipped: if the order is or gets \
             cancelled, nothing else would refund it. Retry it once the cause of its failure is \
             fixed; its step confirms the order, or refunds a cancelled one",
        ));
    }
    Ok(skipped.unsigned_abs())
}

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub outbox_rows: u64,
    pub saga_states: u64,
}

/// Rows deleted per statement, so a purge never holds long locks or one huge transaction.
const PURGE_BATCH: i64 = 1000;

const PURGE_OUTBOX: &str = "
delete from outbox where outbox_id in (
    select outbox_id from outbox
    where delivered_at < now() - make_interval(secs => $1)
       or skipped_at < now() - make_interval(secs => $1)
    limit $2)";

/// Only settled sagas: the domain guarantees nothing more will be sent for them (delivered,
/// or cancelled with stock released and money refunded), so their state is history. Events of
/// theirs an operator skipped go with them.
///
/// Not a saga with an event still parked: that is an answer it did not take, after it had
/// settled (a charge the provider was found to hold for a cancelled order, whose step would
/// refund it). Purged, the event would be gone from `orderly saga parked list` and the gauge
/// with the money, and a retry without the state could not refund it. It waits for an
/// operator, as every parked event does.
const PURGE_SAGAS: &str = "
with purged as (
    select saga_name, order_id from saga_states s
    where saga_name = $1 and settled and updated_at < now() - make_interval(secs => $2)
      and not exists (select 1 from saga_parked p
                      where p.saga_name = s.saga_name and p.order_id = s.order_id
                        and p.skipped_at is null)
    limit $3),
unparked as (
    delete from saga_parked p using purged
    where p.saga_name = purged.saga_name and p.order_id = purged.order_id)
delete from saga_states s using purged
where s.saga_name = purged.saga_name and s.order_id = purged.order_id";

/// Deletes delivered and skipped outbox messages, and the settled states of saga `saga_name`
/// (with their skipped parked events), last touched more than `retention` ago. Dead letters
/// waiting for an operator, pending messages, sagas still in flight and settled ones with an
/// event still parked are never touched.
pub async fn purge(
    client: &Client,
    saga_name: &str,
    retention: Duration,
) -> Result<Purged, CommandError> {
    let secs = retention.as_secs_f64();
    Ok(Purged {
        outbox_rows: delete_in_batches(client, PURGE_OUTBOX, &[&secs, &PURGE_BATCH]).await?,
        saga_states: delete_in_batches(client, PURGE_SAGAS, &[&saga_name, &secs, &PURGE_BATCH])
            .await?,
    })
}

/// Runs `delete` (whose last parameter is [`PURGE_BATCH`]) until it deletes a short batch.
async fn delete_in_batches(
    client: &Client,
    delete: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, CommandError> {
    let statement = client.prepare(delete).await?;
    let mut deleted = 0;
    loop {
        let n = client.execute(&statement, params).await?;
        deleted += n;
        if n < PURGE_BATCH.unsigned_abs() {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with the command side's tables and one lane of saga "fulfilment"; the event
    /// store's `events` table is not among them.
    async fn one_lane() -> orderly_test_support::TestDb {
        let db = crate::migrations::test_database().await;
        db.connect()
            .await
            .unwrap()
            .execute(
                "insert into saga_lanes (saga_name, lane, position_commit, position_prepare)
                 values ('fulfilment', 0, 0, 0)",
                &[],
            )
            .await
            .unwrap();
        db
    }

    /// A skip that meets a retry of the same message committing meanwhile skips nothing: it
    /// used to read the message unlocked and mark it skipped all the same, so a message back
    /// in line was listed as skipped while the worker delivered it.
    #[tokio::test]
    async fn a_skip_that_waits_for_a_retry_of_the_same_message_skips_nothing() {
        let db = crate::migrations::test_database().await;
        let client = db.connect().await.unwrap();
        let id = Uuid::new_v4();
        client
            .execute(
                "insert into outbox (outbox_id, order_id, kind, payload, attempts, last_error,
                     dead_lettered_at)
                 values ($1, gen_random_uuid(), 'notification', '{}', 5, 'smtp: refused', now())",
                &[&id],
            )
            .await
            .unwrap();
        // An operator's retry of it, not committed yet.
        let mut retrier = db.connect().await.unwrap();
        let retrying = retrier.transaction().await.unwrap();
        retrying
            .execute(
                "update outbox set dead_lettered_at = null, attempts = 0 where outbox_id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let skipper = db.connect().await.unwrap();
        let skipping = tokio::spawn(async move { skip(&skipper, id).await });
        let waiting = "select count(*) from pg_stat_activity
                       where datname = current_database() and wait_event_type = 'Lock'";
        while client
            .query_one(waiting, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        retrying.commit().await.unwrap();

        let skipped = skipping.await.unwrap();
        assert!(
            matches!(skipped, Err(CommandError::NotFound(_))),
            "{skipped:?}"
        );
        let marked: i64 = client
            .query_one(
                "select count(*) from outbox where skipped_at is not null",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(marked, 0);
    }

    #[tokio::test]
    async fn how_far_a_lane_is_behind_is_unknown_without_the_log_in_the_database() {
        let db = one_lane().await;
        let client = db.connect().await.unwrap();
        let lanes = lanes(&client, "fulfilment").await.unwrap();
        assert_eq!(lanes.len(), 1);
        assert_eq!(lanes[0].behind_seconds, None);
    }

    /// A saga of a new order with the saga state `state` (JSON), `settled` or not, last
    /// changed `days` ago, and one `PaymentCharged` of it parked, `skipped` or not; the order.
    async fn with_a_parked_charge(
        client: &Client,
        state: &str,
        settled: bool,
        days: i32,
        skipped: bool,
    ) -> Uuid {
        client
            .query_one(
                "with o as (select gen_random_uuid() as order_id),
                 s as (insert into saga_states
                           (saga_name, order_id, state, correlation_id, settled, updated_at)
                       select 'fulfilment', order_id, $1::text::jsonb, gen_random_uuid(), $2,
                              now() - make_interval(days => $3)
                       from o),
                 p as (insert into saga_parked (saga_name, event_id, order_id, position_commit,
                                                position_prepare, stream, version, event_type,
                                                error, skipped_at)
                       select 'fulfilment', gen_random_uuid(), order_id, 1, 1,
                              'payment-' || order_id, 3, 'PaymentCharged', 'refused',
                              case when $4 then now() end
                       from o)
                 select order_id from o",
                &[&state, &settled, &days, &skipped],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// A parked event of a settled saga used to be purged with it, gone from the operator's
    /// sight: a late charge of a cancelled order parked that way was never refunded.
    #[tokio::test]
    async fn the_purge_keeps_a_settled_saga_whose_parked_event_waits_for_an_operator() {
        let db = one_lane().await;
        let client = db.connect().await.unwrap();
        // (settled, days since the state last changed, its parked event skipped): only the
        // first is purged, with its parked event.
        let orders = [
            (true, 30, true),
            (true, 30, false),
            (false, 30, true),
            (true, 1, true),
        ];
        for (settled, days, skipped) in orders {
            with_a_parked_charge(&client, "{}", settled, days, skipped).await;
        }

        let purged = purge(&client, "fulfilment", Duration::from_secs(7 * 24 * 3600))
            .await
            .unwrap();
        assert_eq!(purged.saga_states, 1);
        let left: i64 = client
            .query_one(
                "select count(*) from saga_parked p join saga_states s using (saga_name, order_id)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let all: i64 = client
            .query_one("select count(*) from saga_parked", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            (left, all),
            (3, 3),
            "the other three stay, each with its state"
        );
    }

    /// A charge the saga had not seen, skipped, was refunded by nothing once its order was
    /// cancelled: the saga settled on the releases' answers without reading the payment again.
    #[tokio::test]
    async fn a_parked_charge_the_saga_has_not_seen_is_not_skipped() {
        let db = one_lane().await;
        let client = db.connect().await.unwrap();
        let cancelled = r#"{"order": {"cancelled": true}, "payment": {"charged": null}}"#;
        let unseen = with_a_parked_charge(&client, cancelled, true, 0, false).await;
        let placed = with_a_parked_charge(&client, "{}", false, 0, false).await;
        let charged = r#"{"order": {"cancelled": false}, "payment": {"charged": "ch_1"}}"#;
        let seen = with_a_parked_charge(&client, charged, false, 0, false).await;
        let listed = parked(&client, "fulfilment").await.unwrap();
        let placed_event = listed
            .iter()
            .find(|event| event.order_id == Some(placed))
            .map(|event| event.event_id)
            .unwrap();

        for (which, name) in [
            (ParkedOf::Order(unseen), "orderId"),
            (ParkedOf::Event(placed_event), "eventId"),
        ] {
            let refused = skip_parked(&client, "fulfilment", which).await;
            assert!(
                matches!(&refused, Err(CommandError::InvalidInput { field, .. }) if field == name),
                "{refused:?}"
            );
        }
        let skipped = skip_parked(&client, "fulfilment", ParkedOf::Order(seen)).await;
        assert_eq!(
            skipped.unwrap(),
            1,
            "a charge seen already (its event again)"
        );
        let left = parked(&client, "fulfilment").await.unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    /// A log that does not answer in time fails the status: it used to read as a log kept
    /// elsewhere ("lag unknown"), hiding the failure.
    #[tokio::test]
    async fn a_log_that_does_not_answer_fails_the_status_instead_of_reading_as_unknown() {
        let db = one_lane().await;
        let client = db.connect().await.unwrap();
        client
            .batch_execute(
                "create table events (tx_id bigint, seq bigint, category text,
                                      recorded_at timestamptz)",
            )
            .await
            .unwrap();
        let locker = db.connect().await.unwrap();
        locker
            .batch_execute("begin; lock table events in access exclusive mode")
            .await
            .unwrap();
        client
            .batch_execute("set lock_timeout = '100ms'")
            .await
            .unwrap();

        let failed = lanes(&client, "fulfilment").await;
        assert!(failed.is_err(), "{failed:?}");
        locker.batch_execute("commit").await.unwrap();
        let lanes = lanes(&client, "fulfilment").await.unwrap();
        assert_eq!(
            lanes[0].behind_seconds,
            Some(None),
            "read everything there is"
        );
    }
}
