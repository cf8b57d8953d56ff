//! The projections' handlers. Each applies a batch in three steps: load the rows the batch
//! touches (one query per table), fold the events over them in memory (pure; an event that
//! cannot be applied is parked here), then write back what changed with one set-based statement
//! per table. That keeps a batch of thousands of events to a handful of round trips.
//!
//! Idempotence: every row keyed by a stream carries the stream version it reflects; the fold
//! ignores an event at or below it, and updates repeat the guard in SQL
//! (`where t.version < u.version`; the few product rows are upserted under the same guard).
//! Orders the load did not find are inserted: under the batch lock nobody else writes these
//! tables, so what the load found is what exists. Rows written only once (lines, history,
//! search documents) come from events the guard admitted. Aggregates (customers, daily sales)
//! change only through an order event the guard admitted, so they never count an event twice
//! either.

pub(crate) mod orders;
pub(crate) mod products;

use std::collections::HashSet;
use std::convert::Infallible;

use deadpool_postgres::Transaction;
use orderly_event_schemas::{Event, SchemaError};
use orderly_event_store::{Position, RawRecordedEvent, RecordedEvent};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::model::{DeadLetterPolicy, Outcome, Parked, ProjectionName};

/// Applies a decoded batch (see [`decode`]) to `name`'s tables inside `tx`; `skipped` holds
/// ids an operator resolved as "skip" under the `Stop` policy.
pub(crate) async fn apply(
    name: ProjectionName,
    tx: &Transaction<'_>,
    batch: Decoded,
    policy: DeadLetterPolicy,
    skipped: &HashSet<Uuid>,
) -> Result<Outcome, ProjectionError> {
    match name {
        ProjectionName::Orders => orders::apply(tx, batch, policy, skipped).await,
        ProjectionName::Products => products::apply(tx, batch, policy, skipped).await,
    }
}

/// Why a handler cannot apply an event: the event is parked with this as its reason. None of
/// these comes from a stream the deciders write; each means a corrupt or foreign stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParkReason {
    #[error("cannot decode: {0}")]
    Undecodable(String),
    #[error("{event_type} does not belong in {streams} streams")]
    Foreign {
        event_type: &'static str,
        streams: &'static str,
    },
    #[error("order {0} was already placed")]
    PlacedTwice(Uuid),
    #[error("product {0} was already registered")]
    RegisteredTwice(String),
    #[error("no order {order_id} to apply {event_type} to")]
    NoOrder {
        order_id: Uuid,
        event_type: &'static str,
    },
    #[error("no payment for order {order_id} to apply {event_type} to")]
    NoPayment {
        order_id: Uuid,
        event_type: &'static str,
    },
    #[error("no product {sku} to apply {event_type} to")]
    NoProduct {
        sku: String,
        event_type: &'static str,
    },
    #[error("{what} {value} does not fit the read model")]
    TooLarge { what: &'static str, value: u64 },
    #[error("{event_type} would leave {sku} with on hand {on_hand}, reserved {reserved}")]
    StockOutOfBounds {
        event_type: &'static str,
        sku: String,
        on_hand: i64,
        reserved: i64,
    },
}

/// A batch of the log as one projection sees it: the events it wants, in log order, each with
/// its decoded payload or the reason it cannot be decoded.
pub(crate) struct Decoded {
    pub events: Vec<(RecordedEvent, Result<Event, ParkReason>)>,
    /// The last event of the log the batch covers, those passed over included: where the
    /// checkpoint goes once the batch is applied.
    pub last: Option<Position>,
}

/// One statement's parameters, owned, for [`execute_all`].
pub(crate) type Params<'a> = Vec<Box<dyn ToSql + Send + Sync + 'a>>;

/// [`Params`] from expressions, each moved into a box.
macro_rules! params {
    ($($param:expr),* $(,)?) => {
        vec![$(Box::new($param) as Box<dyn tokio_postgres::types::ToSql + Send + Sync>),*]
    };
}
pub(crate) use params;

/// Runs a batch's write-back statements, prepared once per connection and sent together:
/// tokio-postgres pipelines the queries of one connection that are polled at the same time, so
/// the batch waits for about one round trip instead of one per statement. The write-back is
/// where the batch's transaction holds an id, and with it back every reader of the log (see
/// `batch::lock_checkpoint`), so its length counts twice. The server runs them in the order
/// given.
pub(crate) async fn execute_all(
    tx: &Transaction<'_>,
    statements: &[(&str, Params<'_>)],
) -> Result<(), ProjectionError> {
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = statements
        .iter()
        .map(|(_, params)| params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect())
        .collect();
    let prepared =
        futures::future::try_join_all(statements.iter().map(|(sql, _)| tx.prepare_cached(sql)))
            .await?;
    futures::future::try_join_all(
        prepared
            .iter()
            .zip(&params)
            .map(|(statement, params)| tx.execute(statement, params)),
    )
    .await?;
    Ok(())
}

/// Whether `name` reads events of `category`.
pub(crate) fn wants(name: ProjectionName, category: &str) -> bool {
    name.categories().contains(&category)
}

/// An event as read from the log, before the projections decode it: parsed JSON trees (the
/// live runner's subscription) or the stored text (a rebuild, which skips the trees).
pub(crate) trait Undecoded {
    fn position(&self) -> Position;
    fn category(&self) -> &str;
    /// The envelope the handlers use, without its JSON, and the payload decoded.
    fn decode(self) -> (RecordedEvent, Result<Event, ParkReason>);
}

fn cannot_decode(error: SchemaError) -> ParkReason {
    ParkReason::Undecodable(error.to_string())
}

impl Undecoded for RecordedEvent {
    fn position(&self) -> Position {
        self.position
    }

    fn category(&self) -> &str {
        self.stream.category()
    }

    fn decode(mut self) -> (RecordedEvent, Result<Event, ParkReason>) {
        let data = std::mem::take(&mut self.data);
        let metadata = std::mem::take(&mut self.metadata);
        let decoded = orderly_event_schemas::decode_payload(&self.event_type, data, &metadata)
            .map_err(cannot_decode);
        (self, decoded)
    }
}

impl Undecoded for RawRecordedEvent {
    fn position(&self) -> Position {
        self.position
    }

    fn category(&self) -> &str {
        self.stream.category()
    }

    fn decode(self) -> (RecordedEvent, Result<Event, ParkReason>) {
        let decoded = orderly_event_schemas::decode_payload_text(
            &self.event_type,
            self.data.get(),
            self.metadata.get(),
        )
        .map_err(cannot_decode);
        let Ok(envelope) = self.try_map_json(|_| Ok::<_, Infallible>(serde_json::Value::Null));
        (envelope, decoded)
    }
}

/// Decodes the events of `events` (a stretch of the log, in order) that `name` wants; events of
/// other streams are left out. The JSON goes once decoded: the read models use no envelope
/// field, and a batch held in memory keeps only the typed events.
pub(crate) fn decode<E: Undecoded>(name: ProjectionName, events: Vec<E>) -> Decoded {
    let last = events.last().map(Undecoded::position);
    let events = events
        .into_iter()
        .filter(|e| wants(name, e.category()))
        .map(Undecoded::decode)
        .collect();
    Decoded { events, last }
}

/// Runs `handle` over the decoded events in order, applying the dead-letter policy. Returns the
/// outcome with everything but `order_ids` filled in.
pub(crate) fn fold<F>(
    batch: &Decoded,
    policy: DeadLetterPolicy,
    skipped: &HashSet<Uuid>,
    mut handle: F,
) -> Outcome
where
    F: FnMut(&RecordedEvent, &Event) -> Result<(), ParkReason>,
{
    let events = &batch.events;
    let mut outcome = Outcome {
        checkpoint: batch.last,
        ..Outcome::default()
    };
    for (index, (event, decoded)) in events.iter().enumerate() {
        if skipped.contains(&event.id) {
            continue;
        }
        let result = match decoded {
            Ok(payload) => handle(event, payload),
            Err(error) => Err(error.clone()),
        };
        if let Err(error) = result {
            let parked = Parked::new(event, error);
            match policy {
                DeadLetterPolicy::SkipAndPark => outcome.parked.push(parked),
                DeadLetterPolicy::Stop => {
                    // Checkpoint just before the poisoned event, so a restart meets it again.
                    outcome.checkpoint = index.checked_sub(1).map(|i| events[i].0.position);
                    outcome.stopped = Some(parked);
                    break;
                }
            }
        }
    }
    outcome
}
