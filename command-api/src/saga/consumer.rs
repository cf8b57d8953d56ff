//! The partitioned consumer: one reader of the log per process deals each order's events to
//! the lane of that order (see `lanes`), and each lane the process holds handles its events in
//! batches, strictly in log order per order, many orders of a batch at once.
//!
//! A batch is handled, then stored, in this order:
//! 1. the saga states of the batch's orders are loaded in one query;
//! 2. each order's events are fed to the domain's saga one after the other, and the commands
//!    of each step sent before the next step (orders of the batch run concurrently; product
//!    commands of all lanes meet in the [`Coalescer`]);
//! 3. one transaction stores every state, the outbox rows and the lane's checkpoint (the last
//!    position dealt to the lane), after checking the lane's fencing generation.
//!
//! A failure that may pass (the database restarting, a lock or statement timeout, an
//! unreachable store) makes the lane try the *same* batch again with backoff: the checkpoint
//! never moves past a step whose state was not stored, and re-sent commands are written once
//! (their ids derive from the causing event). A step that fails for good (corrupt data, a
//! bug) is *parked*: its event is set aside in `saga_parked` with the error, the order's state
//! stays as it was before that event, and the lane goes on; the saga state tolerates facts
//! that arrive late, so an operator may feed the event again later. A batch whose commit the
//! database refuses for good is stored order by order, and the events of an order whose own
//! outcome is refused are parked the same way (see [`SagaRunner::commit_or_park`]; an order
//! refused alone, once the database stored another's since, see [`Refusals`]).
//!
//! Deadlines are handled by each lane for its own orders between batches, on the wall clock,
//! after reading the order's payment stream first: the log's horizon can hide a payment that
//! is already recorded (any open transaction in the cluster holds it back), the stream itself
//! cannot, so a recorded payment is never overtaken by its deadline. Past the stock deadline
//! the products' streams are read the same way, for reservations the saga has not seen, and
//! so is what an order that ended still waits for (answers from products, the payment), a stock
//! deadline later and then less and less often, until its saga settles. What
//! a tick fails to do (deadlines, parked retries, a quiet lane's checkpoint) stays in the
//! database and is tried again at the next tick (an instance that fails for good, after a
//! growing pause): a failing tick never holds up the lane's events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use orderly_domain::fulfilment::{self, Command, FulfilmentState, Phase, SagaInput};
use orderly_domain::streams;
use orderly_domain::values::{OrderId, Sku};
use orderly_event_schemas::{Event, EventMetadata, OrderEvent, decode_recorded};
use orderly_event_store::{Direction, EventFilter, Position, RecordedEvent, StreamName};
use orderly_observability::trace_context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_postgres::types::{ToSql, Type};
use tracing::Instrument;
use uuid::Uuid;

use super::lanes::{FENCE, LANE_OF_SQL, Lease, lane_of, position_columns};
use super::outbox::{self, Row};
use super::{SagaRunner, Step, count_settled};
use crate::CommandError;
use crate::handling::{Handler, Observed, stream_name};
use orderly_domain::order::OrderAggregate;
use orderly_domain::payment::PaymentAggregate;
use orderly_domain::product::{Hold, ProductAggregate};

/// Items buffered between the reader and one lane; a full lane slows the reader down. Bounds
/// the memory of a process catching up: 16 lanes of decoded events of about a kilobyte.
const LANE_BUFFER: usize = 1024;

/// How often the reader tells every lane how far it has read, so lanes whose orders are quiet
/// still move their checkpoints (a restart then replays less).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Saga states whose deadline passed, handled per lane and tick: one page of a sweep over the
/// lane's due states, which goes on from where a full page ended at the next tick.
const DUE_BATCH: i64 = 100;

/// Holds a lane's deadlines until the outbox worker has claimed every message due, in a
/// claim made after the lane started, and so after the heartbeat that put the claims of a
/// process that died back in line: after an outage, the charges that waited in line are
/// tried (and a quick provider's outcomes recorded) before a payment deadline that ran out
/// meanwhile is judged (a tick reads the payment's stream first). The saga's own downtime must
/// not cancel an order whose charge was never tried. A claim under way when the lane started
/// may have been made before those claims were freed, so the one after it counts. At most one
/// outbox lease (longer than any delivery takes): an outbox that cannot claim, or never
/// catches up with its line, must not hold every deadline.
struct DeadlineGate {
    passes_at_start: u64,
    started: tokio::time::Instant,
    patience: Duration,
    open: bool,
}

impl DeadlineGate {
    fn new(passes: &watch::Sender<u64>, patience: Duration) -> Self {
        Self {
            passes_at_start: *passes.borrow(),
            started: tokio::time::Instant::now(),
            patience,
            open: false,
        }
    }

    fn open(&mut self, passes: &watch::Sender<u64>) -> bool {
        self.open = self.open
            || *passes.borrow() >= self.passes_at_start + 2
            || self.started.elapsed() >= self.patience;
        self.open
    }
}

/// How often a lane looks for parked events an operator asked to retry.
const PARKED_EVERY: Duration = Duration::from_secs(5);

/// Pauses between tries of work that failed: from the first, doubling, up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// One event of the log, decoded once by the reader.
pub(super) struct Input {
    id: Uuid,
    stream: StreamName,
    version: u64,
    position: Position,
    event_type: String,
    recorded_at: DateTime<Utc>,
    /// The event, or why it does not decode (it is then parked).
    decoded: Result<(Event, EventMetadata), String>,
}

impl Input {
    fn new(recorded: RecordedEvent) -> Self {
        let decoded = decode_recorded(&recorded.event_type, recorded.data, recorded.metadata)
            .map(|decoded| (decoded.event, decoded.metadata))
            .map_err(|error| format!("event does not decode: {error}"));
        Self {
            id: recorded.id,
            stream: recorded.stream,
            version: recorded.version,
            position: recorded.position,
            event_type: recorded.event_type,
            recorded_at: recorded.recorded_at,
            decoded,
        }
    }

    /// Tells `handler` the state of this event's stream moved on, so the saga's next command
    /// on it needs no read (see [`Handler::observe`]). Products are left out: a lane meets
    /// only its own orders' events of a product's stream.
    fn observe(&self, handler: &Handler) {
        let read = Observed {
            id: self.id,
            version: self.version,
            position: self.position,
        };
        match &self.decoded {
            Ok((Event::Order(event), _)) => {
                handler.observe::<OrderAggregate>(&self.stream, read, event);
            }
            Ok((Event::Payment(event), _)) => {
                handler.observe::<PaymentAggregate>(&self.stream, read, event);
            }
            _ => {}
        }
    }

    pub(super) fn recorded_at(&self) -> DateTime<Utc> {
        self.recorded_at
    }

    /// Whether it is the placement that starts its order's saga instance.
    fn is_placement(&self) -> bool {
        matches!(
            &self.decoded,
            Ok((Event::Order(OrderEvent::OrderPlaced(_)), _))
        )
    }

    fn order(&self) -> Option<OrderId> {
        self.decoded
            .as_ref()
            .ok()
            .and_then(|(event, _)| fulfilment::order_of(event))
    }

    /// The lane this event belongs to; `None` for events that are not the saga's business.
    /// Events that do not decode cannot be routed: lane 0 parks them.
    fn lane(&self) -> Option<u32> {
        match &self.decoded {
            Ok(_) => self.order().map(lane_of),
            Err(_) => Some(0),
        }
    }
}

/// What the reader hands a lane.
enum Item {
    Event(Arc<Input>),
    /// Everything of this lane up to here has been dealt.
    Progress(Position),
}

/// Why a lane (and so its consumer) stopped before it was asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fenced(pub u32);

/// What went wrong in one try of a lane's work.
enum LaneError {
    /// The lane was taken over: stop it, never write for it again.
    Fenced,
    /// Anything else: try the same work again later.
    Failed(CommandError),
}

impl From<CommandError> for LaneError {
    fn from(error: CommandError) -> Self {
        Self::Failed(error)
    }
}

impl From<tokio_postgres::Error> for LaneError {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Failed(error.into())
    }
}

impl From<deadpool_postgres::PoolError> for LaneError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Self::Failed(error.into())
    }
}

/// One order's part of a batch, once handled: what to store.
struct Handled {
    order_id: Option<OrderId>,
    /// The new state, when a step changed more than its clock (see `same_apart_from_clock`).
    state: Option<FulfilmentState>,
    /// The phase before the batch, to count instances that settle in it.
    before: Phase,
    correlation: Uuid,
    rows: Vec<Row>,
    /// The outbox row of a charge to withdraw: the order was cancelled while its last
    /// attempt had no answer (see `Row::withdraw_charges`).
    withdraw: Option<Uuid>,
    parked: Vec<Parked>,
    /// Ids of parked events that handled fine this time (a retry).
    resolved: Vec<Uuid>,
}

impl Handled {
    /// Nothing handled yet for `order_id`, whose state is in `before`.
    fn new(order_id: OrderId, before: Phase, correlation: Uuid) -> Self {
        Self {
            order_id: Some(order_id),
            state: None,
            before,
            correlation,
            rows: Vec::new(),
            withdraw: None,
            parked: Vec::new(),
            resolved: Vec::new(),
        }
    }
}

/// An event set aside with the reason.
struct Parked {
    input: Arc<Input>,
    reason: ParkReason,
}

/// The span a saga step on `input` runs in (in the trace of the request behind the event), and
/// the ids its commands carry.
fn step_of(input: &Input, metadata: &EventMetadata) -> (tracing::Span, Step) {
    let span = tracing::info_span!(
        "saga.step",
        event_id = %input.id,
        event_type = %input.event_type,
        stream = %input.stream,
    );
    if let Some(traceparent) = &metadata.traceparent {
        trace_context::set_parent(&span, traceparent);
    }
    let step = Step {
        causation: input.id,
        correlation: metadata.correlation_id,
        traceparent: metadata.traceparent.clone(),
    };
    (span, step)
}

/// Why an event was set aside for an operator (`orderly saga parked list` shows it as text).
/// The order's deadlines still settle an instance left waiting by it, unless an operator
/// retries the event first: at the stock deadline (from the reservations' sending) the saga
/// reads the answers to its reservations from the products, at the payment deadline (from the
/// first charge request) the payment from its stream, and goes on or cancels; once the order
/// ended (cancelled or shipped), a stock deadline later and then less and less often until it
/// settles, the saga reads both again for the answers it still waits for. Facts no deadline
/// reads are kept with the state (`fulfilment::parked`): a parked `OrderPlaced` keeps its
/// order with the reservations counted as sent, so the stock deadline settles it too (a
/// retry sends the unanswered ones again), and a parked cancel or shipment is acted on by the
/// lane's tick after a pause.
#[derive(Debug, Clone, thiserror::Error)]
enum ParkReason {
    /// Its payload does not decode.
    #[error("{0}")]
    Undecodable(String),
    /// It decodes, but names no order the saga follows.
    #[error("event belongs to no order")]
    NoOrder,
    /// The order's stored saga state does not decode: nothing can be decided without it, so
    /// every event of the order waits.
    #[error("stored saga state does not decode: {0}")]
    StateUnreadable(String),
    /// Its step failed for a reason retrying does not change (a rejection, a bug).
    #[error("{0}")]
    StepFailed(String),
    /// Its step ran, but the database refuses for good to store the outcome (the state, the
    /// outbox rows): the state stays as it was before the event.
    #[error("the step's outcome could not be stored: {0}")]
    NotStored(String),
    /// No saga instance holds its order, and the event does not place it: the order settled
    /// and its state was purged (a charge found long after, say), or its placement was never
    /// fed to the saga (parked).
    #[error(
        "the saga holds no instance of this order: its state was purged after it settled, or \
         its placement is parked"
    )]
    NoInstance,
}

const LOAD_STATES: &str = "
select order_id, state, correlation_id from saga_states
where saga_name = $1 and order_id = any($2)";

const SAVE_STATES: &str = "
insert into saga_states (saga_name, order_id, state, correlation_id, due_at, settled, phase)
select $1, t.order_id, t.state, t.correlation_id, t.due_at, t.settled, t.phase
from unnest($2::uuid[], $3::jsonb[], $4::uuid[], $5::timestamptz[], $6::bool[], $7::text[])
    as t(order_id, state, correlation_id, due_at, settled, phase)
on conflict (saga_name, order_id) do update
set state = excluded.state, due_at = excluded.due_at, settled = excluded.settled,
    phase = excluded.phase, updated_at = now()";

const PARK: &str = "
insert into saga_parked (saga_name, event_id, order_id, position_commit, position_prepare,
                         stream, version, event_type, error)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (saga_name, event_id) do update
set error = excluded.error, attempts = saga_parked.attempts + 1, parked_at = now(),
    retry_requested_at = null";

/// Names the orders of parked events that decode now (see `retry_parked`).
const REROUTE: &str = "
update saga_parked p set order_id = r.order_id
from unnest($2::uuid[], $3::uuid[]) as r(event_id, order_id)
where p.saga_name = $1 and p.event_id = r.event_id";

const UNPARK: &str = "delete from saga_parked where saga_name = $1 and event_id = any($2)";

/// One page of a lane's due states, in (deadline, order) order, after the cursor `$5, $6` when
/// one is given.
fn due_query() -> String {
    format!(
        "select order_id, state, due_at, correlation_id from saga_states
         where saga_name = $1 and not settled and due_at <= $2 and {LANE_OF_SQL} = $3
           and ($5::timestamptz is null or (due_at, order_id) > ($5, $6::uuid))
         order by due_at, order_id limit $4"
    )
}

/// Where a lane's sweep over its due states goes on at the next tick: after this deadline and
/// order. `None` starts from the earliest.
type DueCursor = Option<(DateTime<Utc>, Uuid)>;

fn next_due_query() -> String {
    format!(
        "select min(due_at) from saga_states
         where saga_name = $1 and not settled and due_at is not null and {LANE_OF_SQL} = $2"
    )
}

fn retries_query() -> String {
    format!(
        "select stream, version from saga_parked
         where saga_name = $1 and retry_requested_at is not null and skipped_at is null
           and (case when order_id is null then 0 else {LANE_OF_SQL} end) = $2
         order by position_commit, position_prepare limit 100"
    )
}

impl SagaRunner {
    /// Reads the log from the lowest checkpoint of `leases` and runs one task per lane until
    /// `stop` says so or a lane is taken over (then every lane stops, and the answer names it).
    pub(super) async fn consume(
        self: Arc<Self>,
        leases: Vec<Lease>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<Fenced> {
        // Renewals extend the sends' clock only while they hold every one of these.
        self.leases.serving(&leases);
        let (halt, halted) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut lanes = HashMap::new();
        for lease in &leases {
            let (items, received) = mpsc::channel(LANE_BUFFER);
            lanes.insert(lease.lane, (items, lease.checkpoint));
            tasks.spawn(self.clone().run_lane(*lease, received, halted.clone()));
        }
        let mut read = leases
            .iter()
            .map(|lease| lease.checkpoint)
            .min()
            .unwrap_or(Position::START);
        let mut fenced = None;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        let mut marked = read;
        // Failures of the subscription in a row: the pause before the next try doubles with
        // each, so a store that keeps failing (an event it cannot hand over) is not hammered.
        let mut failures = 0;
        'subscribe: while fenced.is_none() && !*stop.borrow() {
            let mut events = match self.log.subscribe(read, EventFilter::All).await {
                Ok(events) => events,
                Err(error) => {
                    tracing::warn!(%error, "saga cannot read the log; retrying");
                    tokio::select! {
                        _ = stop.changed() => break 'subscribe,
                        () = tokio::time::sleep(RETRY_LAST) => continue 'subscribe,
                    }
                }
            };
            loop {
                tokio::select! {
                    _ = stop.changed() => break 'subscribe,
                    Some(ended) = tasks.join_next() => {
                        if let Ok(Err(lane)) = ended {
                            fenced = Some(lane);
                        }
                        break 'subscribe;
                    }
                    next = events.next() => match next {
                        Some(Ok(recorded)) => {
                            failures = 0;
                            read = recorded.position;
                            if !deal(&lanes, Input::new(recorded), &mut stop).await {
                                break 'subscribe;
                            }
                        }
                        Some(Err(error)) => {
                            let pause = super::doubled(RETRY_FIRST, failures, RETRY_LAST);
                            failures += 1;
                            tracing::warn!(%error, failures, ?pause, "saga subscription failed; resubscribing");
                            tokio::select! {
                                _ = stop.changed() => break 'subscribe,
                                () = tokio::time::sleep(pause) => continue 'subscribe,
                            }
                        }
                        None => continue 'subscribe,
                    },
                    _ = progress.tick() => {
                        if read > marked {
                            marked = read;
                            for (items, _) in lanes.values() {
                                // A full lane gets the next one; progress is only a hint.
                                let _ = items.try_send(Item::Progress(read));
                            }
                        }
                    }
                }
            }
        }
        let _ = halt.send(true);
        drop(lanes);
        while let Some(ended) = tasks.join_next().await {
            if let Ok(Err(lane)) = ended {
                fenced = fenced.or(Some(lane));
            }
        }
        self.leases.serving(&[]);
        fenced
    }

    /// One lane: batches from the reader, deadlines and parked retries between them.
    async fn run_lane(
        self: Arc<Self>,
        lease: Lease,
        mut items: mpsc::Receiver<Item>,
        mut halted: watch::Receiver<bool>,
    ) -> Result<(), Fenced> {
        let fenced = |_| Fenced(lease.lane);
        // Everything of this lane up to `seen` is handled; up to `stored`, durably so.
        let (mut seen, mut stored) = (lease.checkpoint, lease.checkpoint);
        // When the lane's next deadline comes due; unknown (so: now) until the first look, and
        // lowered by every state the lane stores, so an idle lane asks nothing until then.
        let mut next_due = Some(DateTime::<Utc>::MIN_UTC);
        let mut due_after: DueCursor = None;
        let mut parked_checked: Option<tokio::time::Instant> = None;
        let mut deadlines = DeadlineGate::new(&self.outbox_passes, self.config.outbox_lease);
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buffer = Vec::with_capacity(self.config.batch_size);
        loop {
            // Ticks before batches: under a steady stream of events deadlines still come due.
            tokio::select! {
                biased;
                _ = halted.changed() => return Ok(()),
                // A tick's work is tried once: what it failed to do is still in the database
                // (the checkpoint not moved, the deadlines still due, the retries still asked
                // for) and the next tick tries again, so a failing tick never holds the events.
                _ = tick.tick() => {
                    if seen > stored
                        && self
                            .once(|| self.commit(&lease, &[], Some(seen)))
                            .await
                            .map_err(fenced)?
                            .is_some()
                    {
                        stored = seen;
                    }
                    if next_due.is_some_and(|due| due <= Utc::now())
                        && deadlines.open(&self.outbox_passes)
                        && let Some((next, cursor)) = self
                            .once(|| self.tick_due(&lease, due_after))
                            .await
                            .map_err(fenced)?
                    {
                        (next_due, due_after) = (next, cursor);
                    }
                    if parked_checked.is_none_or(|at| at.elapsed() >= PARKED_EVERY)
                        && let Some(due) = self
                            .once(|| self.retry_parked(&lease))
                            .await
                            .map_err(fenced)?
                    {
                        parked_checked = Some(tokio::time::Instant::now());
                        // A retried step may have set a deadline (a charge's retry) before the
                        // lane's next one.
                        next_due = earliest(next_due, due);
                    }
                    // The next tick a whole period after this one's work: work that takes longer
                    // than the period (a slow database) must not keep the events waiting.
                    tick.reset();
                }
                received = items.recv_many(&mut buffer, self.config.batch_size) => {
                    if received == 0 {
                        return Ok(());
                    }
                    let (events, last) = split(std::mem::take(&mut buffer), seen);
                    if events.is_empty() {
                        seen = last;
                        continue;
                    }
                    let pending = self.lag.pending(lease.lane, &events);
                    let handled = self
                        .until_done(&mut halted, || self.handle_batch(&lease, &events, last))
                        .await
                        .map_err(fenced)?;
                    drop(pending);
                    let Some(due) = handled else {
                        return Ok(());
                    };
                    next_due = earliest(next_due, due);
                    (seen, stored) = (last, last);
                }
            }
        }
    }

    /// Runs `work` until it succeeds (`Some`), the lane is halted (`None`) or fenced (`Err`).
    /// Never gives up on other failures: the checkpoint must not move past work not stored.
    async fn until_done<T, F, Fut>(
        &self,
        halted: &mut watch::Receiver<bool>,
        work: F,
    ) -> Result<Option<T>, ()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, LaneError>>,
    {
        let mut pause = RETRY_FIRST;
        loop {
            if let Some(done) = self.once(&work).await? {
                return Ok(Some(done));
            }
            let jittered = pause.mul_f64(0.75 + fastrand::f64() / 2.0);
            tokio::select! {
                _ = halted.changed() => return Ok(None),
                () = tokio::time::sleep(jittered) => {}
            }
            pause = (pause * 2).min(RETRY_LAST);
        }
    }

    /// Runs `work` once: its answer (`Some`), `None` when it failed (counted and logged), or
    /// `Err` when the lane was taken over.
    async fn once<T, F, Fut>(&self, work: F) -> Result<Option<T>, ()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, LaneError>>,
    {
        match work().await {
            Ok(done) => Ok(Some(done)),
            Err(LaneError::Fenced) => {
                tracing::warn!("saga lane taken over by another process; stopping it here");
                Err(())
            }
            Err(LaneError::Failed(error)) => {
                if counted_retry(&error) {
                    tracing::warn!(%error, "saga lane work failed; retrying");
                } else {
                    tracing::error!(%error, "saga lane work failed on an error that may not pass; retrying");
                }
                Ok(None)
            }
        }
    }

    /// Handles one batch of a lane and stores it with the checkpoint `last`.
    async fn handle_batch(
        &self,
        lease: &Lease,
        events: &[Arc<Input>],
        last: Position,
    ) -> Result<Option<DateTime<Utc>>, LaneError> {
        let handled = self.handle(events, false).await?;
        self.commit_or_park(lease, events, handled, Some(last))
            .await
    }

    /// [`Self::commit`], but when the database refuses the commit for good, one order whose
    /// outcome it refuses (a value out of its range, a bug) must not hold the lane: the others
    /// are stored on their own ([`Self::commit_apart`]), and that order's events of `inputs`
    /// are parked, its state left as before them (their commands went out; a retry sends the
    /// same ones again). The checkpoint moves with the parked rows.
    async fn commit_or_park(
        &self,
        lease: &Lease,
        inputs: &[Arc<Input>],
        handled: Vec<Handled>,
        checkpoint: Option<Position>,
    ) -> Result<Option<DateTime<Utc>>, LaneError> {
        let error = match self.commit(lease, &handled, checkpoint).await {
            Err(LaneError::Failed(error)) if !error.is_transient() => error,
            committed => return committed,
        };
        let (due, refused) = self.commit_apart(lease, handled, error).await?;
        let parked: Vec<Handled> = refused
            .into_iter()
            .map(|(entry, error)| {
                tracing::error!(%error, order_id = ?entry.order_id, "saga events parked: the database refuses to store their outcome");
                let reason = ParkReason::NotStored(error.to_string());
                let parked = inputs
                    .iter()
                    .filter(|input| match entry.order_id {
                        Some(order_id) => input.order() == Some(order_id),
                        None => entry.parked.iter().any(|parked| parked.input.id == input.id),
                    })
                    .map(|input| Parked {
                        input: input.clone(),
                        reason: reason.clone(),
                    })
                    .collect();
                // A retried event whose outcome is refused stays parked, not resolved; nothing
                // the step decided is stored, a charge's withdrawal included.
                Handled {
                    state: None,
                    rows: Vec::new(),
                    withdraw: None,
                    parked,
                    resolved: Vec::new(),
                    ..entry
                }
            })
            .collect();
        let next = self.commit(lease, &parked, checkpoint).await?;
        Ok(earliest(due, next))
    }

    /// Stores `handled`, whose commit as a whole failed for good with `error`, one order at a
    /// time; answers when the stored orders' next deadline is, and the entries the database
    /// refuses on their own, with why. When it refuses every one and blames no value (SQLSTATE
    /// class 22, [`CommandError::InvalidInput`]), the fault may be the database's rather than
    /// an order's (a table it lacks, a permission): the answer is `error`, and the caller
    /// tries the same work again later, as for any failure, instead of setting every order
    /// aside. Unless the database has stored other orders' states since it first refused each
    /// of these ([`Refusals`]): it then refuses these for themselves, and they are set aside.
    async fn commit_apart(
        &self,
        lease: &Lease,
        handled: Vec<Handled>,
        error: CommandError,
    ) -> Result<(Option<DateTime<Utc>>, Vec<(Handled, CommandError)>), LaneError> {
        let (mut due, mut stored, mut refused) = (None, 0, Vec::new());
        for entry in handled {
            match self.commit(lease, std::slice::from_ref(&entry), None).await {
                Ok(next) => {
                    stored += 1;
                    due = earliest(due, next);
                }
                Err(LaneError::Failed(error)) if !error.is_transient() => {
                    refused.push((entry, error));
                }
                Err(other) => return Err(other),
            }
        }
        let blamed = |(_, error): &(Handled, CommandError)| {
            matches!(error, CommandError::InvalidInput { .. })
        };
        let orders: Vec<Option<OrderId>> =
            refused.iter().map(|(entry, _)| entry.order_id).collect();
        if stored == 0 && !refused.iter().all(blamed) && !self.refusals.others_stored_since(&orders)
        {
            return Err(error.into());
        }
        self.refusals.set_aside(&orders);
        Ok((due, refused))
    }

    /// Feeds `inputs` to their orders' sagas: orders concurrently, each order's in order.
    /// Answers what to store; fails (storing nothing) if any step failed transiently.
    async fn handle(
        &self,
        inputs: &[Arc<Input>],
        retrying: bool,
    ) -> Result<Vec<Handled>, CommandError> {
        let mut orders: Vec<(OrderId, Vec<Arc<Input>>)> = Vec::new();
        let mut index: HashMap<OrderId, usize> = HashMap::new();
        let mut handled = Vec::new();
        for input in inputs {
            match input.order() {
                Some(order_id) => {
                    let at = *index.entry(order_id).or_insert_with(|| {
                        orders.push((order_id, Vec::new()));
                        orders.len() - 1
                    });
                    orders[at].1.push(input.clone());
                }
                None => handled.push(undecodable(input)),
            }
        }
        let mut states = self.load_states(&index).await?;
        let runs = orders.into_iter().map(|(order_id, inputs)| {
            let stored = states.remove(&order_id);
            self.handle_order(order_id, stored, inputs, retrying)
        });
        let mut runs = futures::stream::iter(runs).buffer_unordered(self.config.orders_in_flight);
        while let Some(order) = runs.next().await {
            handled.push(order?);
        }
        Ok(handled)
    }

    async fn load_states(
        &self,
        orders: &HashMap<OrderId, usize>,
    ) -> Result<HashMap<OrderId, (Result<FulfilmentState, ParkReason>, Uuid)>, CommandError> {
        let mut states = HashMap::with_capacity(orders.len());
        let mut missing: Vec<Uuid> = Vec::new();
        for order_id in orders.keys() {
            match self.states.get(*order_id) {
                Some((state, correlation)) => {
                    states.insert(*order_id, (Ok(state), correlation));
                }
                None => missing.push(order_id.0),
            }
        }
        if missing.is_empty() {
            return Ok(states);
        }
        let client = self.pool.get().await?;
        // Planned for each call, not prepared once: a plan cached while `saga_states` was
        // nearly empty looks the orders up by the saga's name alone and filters the ids, a
        // scan of every state of the saga, until the table is first analysed.
        let params: [(&(dyn ToSql + Sync), Type); 2] = [
            (&self.config.name, Type::TEXT),
            (&missing, Type::UUID_ARRAY),
        ];
        let rows = client.query_typed(LOAD_STATES, &params).await?;
        states.extend(rows.into_iter().map(|row| {
            let order_id = OrderId(row.get(0));
            let state = serde_json::from_value(row.get(1))
                .map_err(|e| ParkReason::StateUnreadable(e.to_string()));
            (order_id, (state, row.get(2)))
        }));
        Ok(states)
    }

    async fn handle_order(
        &self,
        order_id: OrderId,
        stored: Option<(Result<FulfilmentState, ParkReason>, Uuid)>,
        inputs: Vec<Arc<Input>>,
        retrying: bool,
    ) -> Result<Handled, CommandError> {
        let first_correlation = inputs
            .iter()
            .find_map(|input| input.decoded.as_ref().ok())
            .map_or(order_id.0, |(_, metadata)| metadata.correlation_id);
        if stored.is_none() && !inputs.iter().any(|input| input.is_placement()) {
            return Ok(without_instance(
                order_id,
                first_correlation,
                inputs,
                retrying,
            ));
        }
        let (state, correlation) = match stored {
            Some((state, correlation)) => (state, correlation),
            None => (
                Ok(FulfilmentState::with_timing(self.config.timing)),
                first_correlation,
            ),
        };
        let mut state = match state {
            Ok(state) => state,
            // Nothing can be decided without the state: every event waits for an operator.
            Err(error) => {
                let mut handled = Handled::new(order_id, Phase::Reserving, correlation);
                handled.parked = inputs
                    .into_iter()
                    .map(|input| Parked {
                        input,
                        reason: error.clone(),
                    })
                    .collect();
                return Ok(handled);
            }
        };
        let mut handled = Handled::new(order_id, state.phase(), correlation);
        let before = state.clone();
        for input in inputs {
            let Ok((event, metadata)) = &input.decoded else {
                continue;
            };
            input.observe(&self.handler);
            let (span, step) = step_of(&input, metadata);
            let mut rows = outbox::rows_for_event(event, metadata.correlation_id);
            let saga_input = SagaInput::Event(event);
            let cancel = matches!(event, Event::Order(OrderEvent::OrderCancelled(_)));
            let decide = |state, at| {
                if retrying {
                    fulfilment::step_retried(state, &saga_input, at)
                } else {
                    fulfilment::step_at(state, &saga_input, at)
                }
            };
            match self
                .step_as(decide, &mut state, &step, &mut rows)
                .instrument(span)
                .await
            {
                Ok(()) => {
                    handled.rows.extend(rows);
                    if retrying {
                        handled.resolved.push(input.id);
                    }
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::error!(%error, event_id = %input.id, %order_id, "saga event parked: its step cannot succeed");
                    // Kept all the same: what the event asks for by itself (a cancellation's
                    // notice), and the messages of the commands sent before the one that failed
                    // (a refund), like their appends. Row ids make a later retry add nothing.
                    handled.rows.extend(rows);
                    state = fulfilment::parked(state, &saga_input, Utc::now());
                    handled.parked.push(Parked {
                        input,
                        reason: ParkReason::StepFailed(error.to_string()),
                    });
                }
            }
            // The order is cancelled, whether or not its step's own commands went (a parked
            // cancel cancelled it all the same): a charge it never tried is withdrawn.
            if cancel {
                handled.withdraw = state
                    .unanswered_charge()
                    .map(|attempt| Row::charge_id(order_id, attempt));
            }
        }
        // A failed step leaves the state as it was, but for facts no deadline reads (a
        // placement, a cancel, a shipment: `fulfilment::parked`).
        // Echoes of the saga's own commands move only the clock: the stored state decides the
        // same, so it is not written again (one write fewer per settled order).
        if !state.same_apart_from_clock(&before) {
            handled.state = Some(state);
        }
        Ok(handled)
    }

    /// One saga step: the commands `input` calls for are sent, then `state` moves on. On an
    /// error `state` is left as it was, so the step can run again.
    async fn step(
        &self,
        state: &mut FulfilmentState,
        input: &SagaInput<'_>,
        step: &Step,
        rows: &mut Vec<Row>,
    ) -> Result<(), CommandError> {
        let decide = |state, at| fulfilment::step_at(state, input, at);
        self.step_as(decide, state, step, rows).await
    }

    /// [`Self::step`], decided by `decide` from the state and the time it is handled at
    /// ([`fulfilment::step_at`], or another of the domain's ways to step).
    async fn step_as(
        &self,
        decide: impl FnOnce(FulfilmentState, DateTime<Utc>) -> (FulfilmentState, Vec<Command>),
        state: &mut FulfilmentState,
        step: &Step,
        rows: &mut Vec<Row>,
    ) -> Result<(), CommandError> {
        // Stamped on this process's clock as well as the log's: a backlog's old events must not
        // start a deadline in the past (see `fulfilment::step_at`).
        let (next, commands) = decide(state.clone(), Utc::now());
        // The commands continue this step's trace, itself a child of the event's.
        let step = Step {
            traceparent: trace_context::traceparent(&tracing::Span::current())
                .or_else(|| step.traceparent.clone()),
            ..step.clone()
        };
        self.send(commands, &step, rows).await?;
        *state = next;
        Ok(())
    }

    /// Feeds the wall clock to one page of this lane's sagas whose deadline has passed, from
    /// `after` on; answers when the lane's next deadline is, and where the next page starts
    /// when this one was full. An instance whose tick fails for good (a state that does not
    /// decode, a command refused as corrupt) is logged and tried again after a pause that grows
    /// ([`TickFailures`]): it has no event to park, and it must not hold up the others, which
    /// the cursor sees to: a page full of such instances moves the sweep on instead of being
    /// read again. One whose tick fails in a way that may pass stays due and is tried again
    /// when the sweep comes back to it; the page's other instances are stored all the same.
    /// Only a page on which every instance tried failed so fails as a whole (the database or
    /// the store is away, most likely) and is read again at the next tick.
    async fn tick_due(
        &self,
        lease: &Lease,
        after: DueCursor,
    ) -> Result<(Option<DateTime<Utc>>, DueCursor), LaneError> {
        let now = Utc::now();
        let lane = i64::from(lease.lane);
        let (after_due, after_order) = (after.map(|(due, _)| due), after.map(|(_, id)| id));
        // Never hold a connection while the work below takes others: lanes would starve the
        // pool between them.
        let due = {
            let client = self.pool.get().await?;
            client
                .query(
                    &due_query(),
                    &[
                        &self.config.name,
                        &now,
                        &lane,
                        &DUE_BATCH,
                        &after_due,
                        &after_order,
                    ],
                )
                .await?
        };
        let full = due.len() >= usize::try_from(DUE_BATCH).unwrap_or(usize::MAX);
        let cursor = due
            .last()
            .filter(|_| full)
            .map(|row| (row.get::<_, DateTime<Utc>>(2), row.get::<_, Uuid>(0)));
        if !due.is_empty() {
            let due = due
                .into_iter()
                .filter(|row| !self.tick_failures.pausing(OrderId(row.get(0))));
            let runs = due.map(|row| async move {
                let order_id = OrderId(row.get(0));
                let state = serde_json::from_value::<FulfilmentState>(row.get(1))
                    .map_err(|e| CommandError::Internal(format!("saga state of {order_id}: {e}")));
                let ticked = match state {
                    Ok(state) => {
                        self.tick_order(order_id, state, row.get(2), row.get(3), now)
                            .await
                    }
                    Err(error) => Err(error),
                };
                match ticked {
                    Ok(handled) => {
                        self.tick_failures.passed(order_id);
                        Ok(Some(handled))
                    }
                    Err(error) if error.is_transient() => Err((order_id, error)),
                    Err(error) => {
                        self.tick_failed(order_id, &error, "saga deadline not handled");
                        Ok(None)
                    }
                }
            });
            let mut runs =
                futures::stream::iter(runs).buffer_unordered(self.config.orders_in_flight);
            let (mut handled, mut tried, mut passing) = (Vec::new(), 0, Vec::new());
            while let Some(order) = runs.next().await {
                tried += 1;
                match order {
                    Ok(order) => handled.extend(order),
                    Err(failed) => passing.push(failed),
                }
            }
            if passing.len() == tried
                && let Some((_, error)) = passing.pop()
            {
                return Err(error.into());
            }
            for (order_id, error) in passing {
                counted_retry(&error);
                tracing::warn!(%error, %order_id, "saga deadline not handled; tried again when the lane's sweep comes back to it");
            }
            // An instance whose outcome the database refuses for good is handled as one whose
            // tick fails so: the others are stored, it is tried again after a pause.
            match self.commit(lease, &handled, None).await {
                Err(LaneError::Failed(error)) if !error.is_transient() => {
                    let (_, refused) = self.commit_apart(lease, handled, error).await?;
                    for (entry, error) in refused {
                        if let Some(order_id) = entry.order_id {
                            let what = "saga deadline handled but not stored";
                            self.tick_failed(order_id, &error, what);
                        }
                    }
                }
                committed => {
                    committed?;
                }
            }
        }
        if cursor.is_some() {
            // More are due behind this page: the next tick goes on with them.
            return Ok((Some(now), cursor));
        }
        let client = self.pool.get().await?;
        let next = client
            .query_one(&next_due_query(), &[&self.config.name, &lane])
            .await?;
        Ok((next.get(0), None))
    }

    /// Counts and logs a deadline of `order_id` that failed for good (`what` went wrong), and
    /// pauses it before its next try ([`TickFailures`]).
    fn tick_failed(&self, order_id: OrderId, error: &CommandError, what: &str) {
        counted_retry(error);
        let (tries, pause) = self.tick_failures.failed(order_id, self.config.tick);
        tracing::error!(%error, %order_id, tries, retry_in = ?pause, "{what}; tried again after a pause");
    }

    async fn tick_order(
        &self,
        order_id: OrderId,
        mut state: FulfilmentState,
        due_at: DateTime<Utc>,
        correlation: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Handled, CommandError> {
        let before = state.phase();
        let mut rows = Vec::new();
        // The tick's own steps are named (with the order id, their commands are): the same
        // name seen again after a crash sends the same command ids.
        let named = |name: String| Step {
            causation: Uuid::new_v5(&order_id.0, name.as_bytes()),
            correlation,
            traceparent: None,
        };
        // A fact kept from a parked step goes out first, under a name of its own: the payment
        // events fed again below must decide what they decided the first time, under their ids.
        if let Some(name) = state.parked_name() {
            let decide = fulfilment::act_on_parked;
            match self
                .step_as(decide, &mut state, &named(name), &mut rows)
                .await
            {
                Ok(()) => {}
                // A product's refusal (to ship stock it no longer holds for the order) is its
                // last word: sent again, the command would be refused again, for ever. The
                // rest of what the fact called for went; the fact counts as acted on, and its
                // parked event waits for an operator.
                Err(CommandError::Rejected(rejection)) => {
                    tracing::error!(%order_id, %rejection, "a parked step's command refused again; not sent any more, its event stays parked");
                    state = fulfilment::act_on_parked(state, now).0;
                }
                Err(error) => return Err(error),
            }
        }
        // Whatever the payment stream holds counts before the clock does (see the module doc).
        // Events fed here go out again when the lane meets them: the saga ignores repeats.
        let payment = stream_name(streams::payment(order_id))?;
        let recorded = self
            .handler
            .store()
            .read_stream(&payment, Direction::Forwards, None, 1000)
            .await?;
        for recorded in recorded {
            let input = Input::new(recorded);
            // A payment event that does not decode may be the charge: judging the deadline
            // without it could cancel a paid order and refund nothing. The tick fails for good
            // instead (tried again after a pause, counted overdue) until the event is readable.
            let (event, metadata) = match &input.decoded {
                Ok(decoded) => decoded,
                Err(error) => {
                    return Err(CommandError::Internal(format!(
                        "payment event {} of order {order_id}: {error}",
                        input.id
                    )));
                }
            };
            let step = Step {
                causation: input.id,
                correlation: metadata.correlation_id,
                traceparent: metadata.traceparent.clone(),
            };
            self.step(&mut state, &SagaInput::Event(event), &step, &mut rows)
                .await?;
        }
        // A state that has sent more since the last tick at this deadline decides other
        // commands, under other names.
        let tick_step = |state: &FulfilmentState, what: &str| named(state.tick_name(due_at) + what);
        // Answers that the saga has not seen by the stock deadline (to its reservations, or to
        // anything an order that ended still holds or sends back: a parked or skipped step) are
        // asked of the products themselves.
        let unanswered = state.stock_to_check(now);
        if !unanswered.is_empty() {
            let holds = self.holds(order_id, &unanswered).await?;
            // Normally every answer arrives within milliseconds: this is a step that was
            // parked (logged then) or skipped, or a saga catching up far behind the log.
            tracing::info!(%order_id, asked = unanswered.len(), answered = holds.len(), "stock deadline passed; answers read from the products");
            let input = SagaInput::StockChecked { now, holds: &holds };
            // Named by what was read too: what it calls for follows the holds, read afresh
            // on every try. A try that failed after its first release (written) reads that
            // hold released and sends only the rest, which would take the ids of the first
            // try's commands, place by place, and be refused as theirs for good.
            let step = tick_step(&state, &format!("/stock/{}", holds_name(&holds)));
            self.step(&mut state, &input, &step, &mut rows).await?;
        }
        let step = tick_step(&state, "");
        self.step(&mut state, &SagaInput::Tick { now }, &step, &mut rows)
            .await?;
        Ok(Handled {
            state: Some(state),
            rows,
            ..Handled::new(order_id, before, correlation)
        })
    }

    /// What each of `skus` holds for the order now: its stream read to the end (a cached
    /// state alone may predate the reservation); a product with no answer for the order is
    /// left out.
    async fn holds(
        &self,
        order_id: OrderId,
        skus: &[Sku],
    ) -> Result<Vec<(Sku, Hold)>, CommandError> {
        let streams = skus
            .iter()
            .map(|sku| stream_name(streams::product(sku)))
            .collect::<Result<Vec<_>, _>>()?;
        let products = self
            .handler
            .load_many::<ProductAggregate>(&streams, Duration::ZERO)
            .await?;
        Ok(skus
            .iter()
            .zip(products)
            .filter_map(|(sku, loaded)| {
                let hold = loaded.state?.hold(order_id)?;
                Some((sku.clone(), hold))
            })
            .collect())
    }

    /// Feeds again the parked events of this lane that an operator asked to retry; answers
    /// when the deadlines of the states it stored come due.
    async fn retry_parked(&self, lease: &Lease) -> Result<Option<DateTime<Utc>>, LaneError> {
        let wanted = {
            let client = self.pool.get().await?;
            let lane = i64::from(lease.lane);
            client
                .query(&retries_query(), &[&self.config.name, &lane])
                .await?
        };
        if wanted.is_empty() {
            return Ok(None);
        }
        let mut inputs = Vec::with_capacity(wanted.len());
        for row in wanted {
            let stream: String = row.get(0);
            let version: i64 = row.get(1);
            let stream = stream_name(stream)?;
            let found = self
                .handler
                .store()
                .read_stream(
                    &stream,
                    Direction::Forwards,
                    Some(version.unsigned_abs()),
                    1,
                )
                .await
                .map_err(CommandError::from)?;
            inputs.extend(found.into_iter().map(|event| Arc::new(Input::new(event))));
        }
        // An event parked because it did not decode was parked here, in lane 0, with no order.
        // If it decodes now, its order may be another lane's, which alone may step that order:
        // it is handed over (its row names the order now) and that lane retries it.
        let (inputs, elsewhere): (Vec<_>, Vec<_>) = inputs
            .into_iter()
            .partition(|input| input.lane().is_none_or(|lane| lane == lease.lane));
        if !elsewhere.is_empty() {
            let (events, orders): (Vec<Uuid>, Vec<Uuid>) = elsewhere
                .iter()
                .filter_map(|input| Some((input.id, input.order()?.0)))
                .unzip();
            let client = self.pool.get().await?;
            client
                .execute(REROUTE, &[&self.config.name, &events, &orders])
                .await?;
        }
        if inputs.is_empty() {
            return Ok(None);
        }
        let mut handled = self.handle(&inputs, true).await?;
        // An event that does not decode yet stays parked, with its attempt counted.
        for entry in &mut handled {
            entry
                .resolved
                .retain(|id| !entry.parked.iter().any(|p| p.input.id == *id));
        }
        self.commit_or_park(lease, &inputs, handled, None).await
    }

    /// Stores what a batch or tick handled and the lane's checkpoint, in one transaction that
    /// first checks the lane is still this process's.
    async fn commit(
        &self,
        lease: &Lease,
        handled: &[Handled],
        checkpoint: Option<Position>,
    ) -> Result<Option<DateTime<Utc>>, LaneError> {
        let (commit, prepare) = match checkpoint {
            Some(position) => {
                let (commit, prepare) = position_columns(position)?;
                (Some(commit), Some(prepare))
            }
            None => (None, None),
        };
        let lane = i32::try_from(lease.lane).unwrap_or(i32::MAX);
        let began = std::time::Instant::now();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let fence = tx.prepare_cached(FENCE).await?;
        let held = tx
            .execute(
                &fence,
                &[
                    &self.config.name,
                    &lane,
                    &lease.generation,
                    &commit,
                    &prepare,
                    &self.member.id,
                ],
            )
            .await?;
        if held == 0 {
            return Err(LaneError::Fenced);
        }
        let saved = save_states(&tx, &self.config.name, handled);
        let rows = Row::insert_all(
            &tx,
            handled.iter().flat_map(|entry| &entry.rows),
            self.config.charge_settle,
        );
        let parked = park(&tx, &self.config.name, handled);
        futures::try_join!(saved, rows, parked)?;
        // After the inserts: a charge stored by this batch may be the one to withdraw.
        let withdraw: Vec<Uuid> = handled.iter().filter_map(|entry| entry.withdraw).collect();
        let withdrawn = Row::withdraw_charges(&tx, &withdraw).await?;
        tx.commit().await?;
        if withdrawn > 0 {
            tracing::info!(
                charges = withdrawn,
                "charges of cancelled orders withdrawn before they were sent"
            );
        }
        let mut stored = Vec::new();
        for entry in handled {
            if let (Some(order_id), Some(state)) = (entry.order_id, &entry.state) {
                count_settled(entry.before, state);
                self.states.put(order_id, state, entry.correlation);
                stored.push(order_id);
            }
        }
        self.refusals.stored(&stored, began);
        if handled.iter().any(|entry| !entry.rows.is_empty()) {
            self.outbox_ready.notify_one();
        }
        Ok(handled
            .iter()
            .filter_map(|entry| entry.state.as_ref()?.next_due_at())
            .min())
    }
}

/// The saga states this process stored last, by order, so a lane's next batch for the same
/// orders needs no query. Sound because a lane's states are written only by the process that
/// holds it (the fencing generation is checked in every commit), and the cache starts empty
/// whenever this process's lanes change (see `SagaRunner::coordinate`).
pub(super) struct StoredStates {
    states: std::sync::Mutex<lru::LruCache<OrderId, (FulfilmentState, Uuid)>>,
}

/// Orders whose state is kept (a state is about a kilobyte); past it the one used least
/// recently goes, usually an order long settled.
const STORED_STATES: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(65_536).expect("a nonzero capacity");

impl Default for StoredStates {
    fn default() -> Self {
        Self {
            states: std::sync::Mutex::new(lru::LruCache::new(STORED_STATES)),
        }
    }
}

impl StoredStates {
    fn get(&self, order_id: OrderId) -> Option<(FulfilmentState, Uuid)> {
        self.states.lock().ok()?.get(&order_id).cloned()
    }

    fn put(&self, order_id: OrderId, state: &FulfilmentState, correlation: Uuid) {
        if let Ok(mut states) = self.states.lock() {
            states.put(order_id, (state.clone(), correlation));
        }
    }

    pub(super) fn clear(&self) {
        if let Ok(mut states) = self.states.lock() {
            states.clear();
        }
    }
}

/// Instances whose deadline failed for good (a state that does not decode, a command refused as
/// corrupt), by order. Each is tried again after a pause that doubles per failure, from the
/// tick up to [`LONGEST_TICK_PAUSE`], and logged once per try, instead of at every tick: one
/// broken instance used to log an error a second. Kept in memory: a restart tries it at once
/// again, which is what an operator who repaired it wants. The deadline stays counted as
/// overdue meanwhile (`orderly saga status`, the metric, the alert).
#[derive(Default)]
pub(super) struct TickFailures {
    failing: std::sync::Mutex<HashMap<OrderId, (u32, tokio::time::Instant)>>,
}

/// The longest pause between two tries of a failing instance's deadline.
const LONGEST_TICK_PAUSE: Duration = Duration::from_secs(300);

impl TickFailures {
    fn failing(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, (u32, tokio::time::Instant)>> {
        // Inserts and removals only: a panic while it was held left it whole.
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the order's last try failed and its pause has not passed.
    fn pausing(&self, order_id: OrderId) -> bool {
        self.failing()
            .get(&order_id)
            .is_some_and(|(_, retry_at)| *retry_at > tokio::time::Instant::now())
    }

    /// Counts a failed try; how many in a row, and the pause before the next.
    fn failed(&self, order_id: OrderId, tick: Duration) -> (u32, Duration) {
        let mut failing = self.failing();
        let tries = failing.get(&order_id).map_or(1, |(tries, _)| tries + 1);
        let pause = super::doubled(tick, tries - 1, LONGEST_TICK_PAUSE);
        failing.insert(order_id, (tries, tokio::time::Instant::now() + pause));
        (tries, pause)
    }

    fn passed(&self, order_id: OrderId) {
        self.failing().remove(&order_id);
    }
}

/// What tells an order whose outcome the database refuses from a database that refuses every
/// outcome, when an order's outcome is refused alone (the only order of its batch) and blames
/// no value: when each such order was first refused, and when the last commit that stored an
/// order's state began. A commit that began after an order's refusal and stored another
/// order's state shows that the database stores states, so the refusal is that order's own;
/// before any such commit the lane waits (a table dropped at any moment refuses every commit
/// that begins after it). Kept in memory: a restart waits for new evidence.
#[derive(Default)]
pub(super) struct Refusals {
    inner: std::sync::Mutex<RefusalsInner>,
}

#[derive(Default)]
struct RefusalsInner {
    /// When the last commit that stored an order's state began.
    last_stored: Option<std::time::Instant>,
    /// When each order refused alone was first refused.
    first_refused: HashMap<OrderId, std::time::Instant>,
}

/// Orders remembered as refused; past it the memory starts over (they are refused again).
const REMEMBERED_REFUSALS: usize = 4096;

impl Refusals {
    fn inner(&self) -> std::sync::MutexGuard<'_, RefusalsInner> {
        // Plain assignments only: a panic while it was held left it whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A commit that began at `began` stored the states of `orders` (none: nothing to learn).
    fn stored(&self, orders: &[OrderId], began: std::time::Instant) {
        if orders.is_empty() {
            return;
        }
        let mut inner = self.inner();
        inner.last_stored = inner.last_stored.max(Some(began));
        if !inner.first_refused.is_empty() {
            for order_id in orders {
                inner.first_refused.remove(order_id);
            }
        }
    }

    /// Counts `orders` as refused now (from their first refusal on), and answers whether the
    /// database stored another order's state in a commit begun since each of them was first
    /// refused. An entry of no order (events that name none) never counts as its own.
    fn others_stored_since(&self, orders: &[Option<OrderId>]) -> bool {
        let now = std::time::Instant::now();
        let mut inner = self.inner();
        if inner.first_refused.len() >= REMEMBERED_REFUSALS {
            inner.first_refused.clear();
        }
        let mut all = true;
        for order_id in orders {
            let Some(order_id) = order_id else {
                all = false;
                continue;
            };
            let first = *inner.first_refused.entry(*order_id).or_insert(now);
            all &= inner.last_stored.is_some_and(|stored| stored > first);
        }
        all
    }

    /// `orders` are parked: a retry that is refused again starts from a new refusal.
    fn set_aside(&self, orders: &[Option<OrderId>]) {
        let mut inner = self.inner();
        for order_id in orders.iter().flatten() {
            inner.first_refused.remove(order_id);
        }
    }
}

/// Counts a failure of lane work that is tried again later, by kind
/// (`orderly_saga_retries_total`); whether it may pass by itself.
fn counted_retry(error: &CommandError) -> bool {
    let transient = error.is_transient();
    metrics::counter!(
        "orderly_saga_retries_total",
        "failure" => if transient { "transient" } else { "permanent" }
    )
    .increment(1);
    transient
}

/// What the products were found to hold, as a part of a step's name: the same reads give the
/// same name, other reads another.
fn holds_name(holds: &[(Sku, Hold)]) -> String {
    let named: Vec<String> = holds
        .iter()
        .map(|(sku, hold)| match hold {
            Hold::Reserved { quantity } => format!("{sku}=reserved:{}", quantity.get()),
            Hold::Rejected => format!("{sku}=rejected"),
            Hold::Released => format!("{sku}=released"),
            Hold::Shipped => format!("{sku}=shipped"),
        })
        .collect();
    named.join(",")
}

/// The earlier of two deadlines, where `None` is "no deadline".
fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Hands one event to its lane; `false` when stopped while the lane was full.
async fn deal(
    lanes: &HashMap<u32, (mpsc::Sender<Item>, Position)>,
    input: Input,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let Some((items, checkpoint)) = input.lane().and_then(|lane| lanes.get(&lane)) else {
        return true;
    };
    // Handled and stored before this lane's last checkpoint.
    if input.position <= *checkpoint {
        return true;
    }
    tokio::select! {
        sent = items.send(Item::Event(Arc::new(input))) => sent.is_ok(),
        _ = stop.changed() => false,
    }
}

/// The events of a lane's items not handled yet, and the last position they vouch for.
fn split(items: Vec<Item>, seen: Position) -> (Vec<Arc<Input>>, Position) {
    let mut last = seen;
    let mut events = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Item::Event(input) => {
                last = last.max(input.position);
                if input.position > seen {
                    events.push(input);
                }
            }
            Item::Progress(position) => last = last.max(position),
        }
    }
    (events, last)
}

/// What events of an order the saga holds no instance of come to, placed by none of them (see
/// [`ParkReason::NoInstance`]). Stepped, they used to start an instance from themselves alone,
/// one with no placement that never settles: open for good, in the census and its "stuck"
/// alert, after every order delivered more than the retention after it shipped. A delivery
/// asks nothing of the saga and is passed over; anything else (money taken, above all) is
/// parked for an operator. No command is sent.
fn without_instance(
    order_id: OrderId,
    correlation: Uuid,
    inputs: Vec<Arc<Input>>,
    retrying: bool,
) -> Handled {
    let mut handled = Handled::new(order_id, Phase::Reserving, correlation);
    for input in inputs {
        let delivered = matches!(
            &input.decoded,
            Ok((Event::Order(OrderEvent::OrderDelivered(_)), _))
        );
        if delivered {
            if retrying {
                handled.resolved.push(input.id);
            }
            continue;
        }
        tracing::warn!(event_id = %input.id, %order_id, "saga event parked: no instance holds its order");
        handled.parked.push(Parked {
            input,
            reason: ParkReason::NoInstance,
        });
    }
    handled
}

fn undecodable(input: &Arc<Input>) -> Handled {
    let error = match &input.decoded {
        Err(error) => ParkReason::Undecodable(error.clone()),
        Ok(_) => ParkReason::NoOrder,
    };
    tracing::error!(event_id = %input.id, %error, "saga cannot read an event; event parked");
    Handled {
        order_id: None,
        state: None,
        before: Phase::Reserving,
        correlation: input.id,
        rows: Vec::new(),
        withdraw: None,
        parked: vec![Parked {
            input: input.clone(),
            reason: error,
        }],
        resolved: Vec::new(),
    }
}

async fn save_states(
    tx: &deadpool_postgres::Transaction<'_>,
    saga: &str,
    handled: &[Handled],
) -> Result<(), CommandError> {
    let mut ids = Vec::new();
    let mut states = Vec::new();
    let mut correlations = Vec::new();
    let mut due = Vec::new();
    let mut settled = Vec::new();
    let mut phases = Vec::new();
    for entry in handled {
        let (Some(order_id), Some(state)) = (entry.order_id, &entry.state) else {
            continue;
        };
        ids.push(order_id.0);
        states
            .push(serde_json::to_value(state).map_err(|e| CommandError::Internal(e.to_string()))?);
        correlations.push(entry.correlation);
        due.push(state.next_due_at());
        settled.push(state.is_settled());
        phases.push(state.phase().as_str());
    }
    if ids.is_empty() {
        return Ok(());
    }
    let save = tx.prepare_cached(SAVE_STATES).await?;
    tx.execute(
        &save,
        &[&saga, &ids, &states, &correlations, &due, &settled, &phases],
    )
    .await?;
    Ok(())
}

async fn park(
    tx: &deadpool_postgres::Transaction<'_>,
    saga: &str,
    handled: &[Handled],
) -> Result<(), CommandError> {
    let resolved: Vec<Uuid> = handled
        .iter()
        .flat_map(|entry| entry.resolved.iter().copied())
        .collect();
    if !resolved.is_empty() {
        tx.execute(UNPARK, &[&saga, &resolved]).await?;
    }
    for entry in handled {
        for parked in &entry.parked {
            let input = &parked.input;
            let (commit, prepare) = position_columns(input.position)?;
            let version = i64::try_from(input.version).unwrap_or(i64::MAX);
            tx.execute(
                PARK,
                &[
                    &saga,
                    &input.id,
                    &entry.order_id.map(|id| id.0),
                    &commit,
                    &prepare,
                    &input.stream.as_str(),
                    &version,
                    &input.event_type,
                    &parked.reason.to_string(),
                ],
            )
            .await?;
            metrics::counter!("orderly_saga_parked_total").increment(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_refused_alone_is_its_own_fault_only_once_a_later_commit_stored_another() {
        let refusals = Refusals::default();
        let (refused, other) = (OrderId(Uuid::from_u128(1)), OrderId(Uuid::from_u128(2)));
        let alone = [Some(refused)];
        let before = std::time::Instant::now();
        // A commit that began before the refusal proves nothing: the database may have broken
        // in between.
        refusals.stored(&[other], before);
        assert!(!refusals.others_stored_since(&alone));
        assert!(
            !refusals.others_stored_since(&alone),
            "nothing stored since"
        );
        std::thread::sleep(Duration::from_millis(1));
        refusals.stored(&[other], std::time::Instant::now());
        assert!(refusals.others_stored_since(&alone));
        // Events that name no order are never set aside this way.
        assert!(!refusals.others_stored_since(&[Some(refused), None]));

        // Parked: refused again later, it needs new evidence.
        refusals.set_aside(&alone);
        assert!(!refusals.others_stored_since(&alone));
        // Stored after all (the database repaired): forgotten.
        refusals.stored(&[refused], std::time::Instant::now());
        assert!(!refusals.others_stored_since(&alone));
    }

    #[test]
    fn a_failing_deadline_waits_twice_as_long_after_each_try_up_to_five_minutes() {
        let failures = TickFailures::default();
        let order = OrderId(Uuid::from_u128(1));
        let tick = Duration::from_secs(1);
        let pauses: Vec<_> = (0..11).map(|_| failures.failed(order, tick)).collect();
        assert_eq!(pauses[0], (1, tick));
        assert_eq!(pauses[1], (2, 2 * tick));
        assert_eq!(pauses[4], (5, 16 * tick));
        assert_eq!(pauses[10], (11, LONGEST_TICK_PAUSE));
        assert!(failures.pausing(order));
        assert!(
            !failures.pausing(OrderId(Uuid::from_u128(2))),
            "others go on"
        );
    }

    #[test]
    fn a_deadline_handled_again_starts_over() {
        let failures = TickFailures::default();
        let order = OrderId(Uuid::from_u128(1));
        failures.failed(order, Duration::from_secs(60));
        failures.failed(order, Duration::from_secs(60));
        failures.passed(order);
        assert!(!failures.pausing(order));
        assert_eq!(
            failures.failed(order, Duration::from_secs(60)),
            (1, Duration::from_secs(60))
        );
        // A pause of nothing (a tick of zero) holds nothing up.
        let quick = OrderId(Uuid::from_u128(3));
        failures.failed(quick, Duration::ZERO);
        assert!(!failures.pausing(quick));
    }
}
