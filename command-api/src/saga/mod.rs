//! The fulfilment saga runner: follows the log from a durable checkpoint, feeds each order's
//! events to the domain's saga, sends the commands it asks for, and delivers side effects
//! (gateway calls, notifications) through the outbox.
//!
//! Exactly-once effects from at-least-once delivery:
//! - commands are sent before the saga state and checkpoint are stored (one transaction with
//!   the outbox rows), so a crash replays the event against the old state and the same commands
//!   go out again; their ids derive from the causing event (or deadline), so the store writes
//!   them once, and every saga command is idempotent at its aggregate anyway;
//! - gateway calls leave only through outbox rows whose ids derive from the saga step, and carry
//!   the order id as the provider's idempotency key, so a repeated call never charges twice;
//! - deadlines are data in the saga state; `saga_states.due_at` lets a ticker find them after
//!   a restart. They are judged in log time while the runner is behind (the time of the last
//!   event it handled), so catching up never cancels an order whose payment is in the log.
//!
//! One runner per saga name is active at a time (a PostgreSQL advisory lock on a connection of
//! its own); others wait and take over when it stops or dies.

pub mod gateway;
pub mod maintenance;
pub mod notify;
mod outbox;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use orderly_domain::fulfilment::{
    self, Command, FulfilmentState, Notification, Phase, SagaInput, Timing,
};
use orderly_domain::order::{self, OrderAggregate};
use orderly_domain::payment::{self, PaymentAggregate, PaymentCommand};
use orderly_domain::product::{self, ProductAggregate};
use orderly_domain::streams;
use orderly_domain::values::OrderId;
use orderly_event_schemas::{Event, OrderEvent, PaymentEvent, decode_recorded};
use orderly_event_store::{EventFilter, EventStore, Position, RecordedEvent};
use orderly_platform::trace_context;
use tokio::sync::{Notify, watch};
use tokio_postgres::NoTls;
use tracing::Instrument;
use uuid::Uuid;

use crate::CommandError;
use crate::handling::{Envelope, Handler, stream_name};
use crate::metering::{CommandName, metered};
pub use gateway::{
    BreakerState, Charge, ChargeOutcome, HttpGateway, PaymentGateway, Resilience, Resilient,
    Simulator,
};
pub use notify::{LogNotifier, Notice, Notifier, SmtpNotifier, SmtpSettings};
use outbox::{Message, Row};

/// The `actor` of every event the saga and its workers write.
pub const ACTOR: &str = "system:fulfilment";

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Names the checkpoint, the states and the leadership lock.
    pub name: String,
    pub timing: Timing,
    /// How often due deadlines and the outbox are checked (new outbox rows wake it at once).
    pub tick: Duration,
    /// Delivery attempts of an outbox message before it is dead-lettered.
    pub outbox_max_attempts: u32,
    /// How long a claimed outbox message stays invisible to other workers; longer than any
    /// delivery takes (gateway timeout times attempts).
    pub outbox_lease: Duration,
    /// Delivered or skipped outbox messages and settled sagas older than this are purged;
    /// `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How often the purge runs.
    pub purge_every: Duration,
}

impl Default for SagaConfig {
    fn default() -> Self {
        Self {
            name: "fulfilment".into(),
            timing: Timing::default(),
            tick: Duration::from_secs(1),
            outbox_max_attempts: 5,
            outbox_lease: Duration::from_secs(60),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            purge_every: Duration::from_secs(3600),
        }
    }
}

/// Runs the fulfilment saga and its outbox worker until stopped.
pub struct SagaRunner {
    config: SagaConfig,
    handler: Handler,
    pool: Pool,
    pg_config: tokio_postgres::Config,
    gateway: Arc<dyn PaymentGateway>,
    /// Delivers customer notifications from the outbox.
    notifier: Arc<dyn Notifier>,
    /// Wakes the outbox worker when the runner stored new messages.
    outbox_ready: Notify,
}

/// Pause after a transient failure before the same event is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

const LOAD_STATE: &str = "select state from saga_states where saga_name = $1 and order_id = $2";

const SAVE_STATE: &str = "
insert into saga_states (saga_name, order_id, state, correlation_id, due_at, settled)
values ($1, $2, $3, $4, $5, $6)
on conflict (saga_name, order_id) do update
set state = $3, due_at = $5, settled = $6, updated_at = now()";

const SAVE_CHECKPOINT: &str = "
insert into saga_checkpoints (saga_name, position_commit, position_prepare)
values ($1, $2, $3)
on conflict (saga_name) do update
set position_commit = $2, position_prepare = $3, updated_at = now()";

/// Saga states whose deadline passed, handled per tick.
const DUE_BATCH: i64 = 100;

impl SagaRunner {
    pub fn new(
        config: SagaConfig,
        store: Arc<dyn EventStore>,
        pool: Pool,
        pg_config: tokio_postgres::Config,
        gateway: Arc<dyn PaymentGateway>,
    ) -> Self {
        Self {
            config,
            handler: Handler::new(store),
            pool,
            pg_config,
            gateway,
            notifier: Arc::new(LogNotifier),
            outbox_ready: Notify::new(),
        }
    }

    /// Delivers notifications through `notifier` instead of the log.
    pub fn with_notifier(self, notifier: Arc<dyn Notifier>) -> Self {
        Self { notifier, ..self }
    }

    /// Follows the log and delivers the outbox until `shutdown` completes. Dropping the
    /// returned future stops everything too (as a crash would, minus the process).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let runner = Arc::new(self);
        let follow = runner.clone().follow(stopped.clone());
        let deliver = runner.clone().deliver(stopped.clone());
        let purge = runner.clone().purge_periodically(stopped);
        let signal = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let (followed, delivered, (), ()) = tokio::join!(follow, deliver, purge, signal);
        tracing::info!(saga = %runner.config.name, "saga runner stopped");
        followed.and(delivered)
    }

    /// Purges old rows every `purge_every` (first right after the start). Every runner
    /// process purges, leader or not: the deletes are idempotent and cheap, and a standby's
    /// purge keeps the tables in hand while the leader is busy. Failures are logged and tried
    /// again next time.
    async fn purge_periodically(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(retention) = self.config.retention else {
            return;
        };
        let mut every = tokio::time::interval(self.config.purge_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => {}
            }
            let purged = match self.pool.get().await {
                Ok(client) => maintenance::purge(&client, &self.config.name, retention).await,
                Err(error) => Err(error.into()),
            };
            match purged {
                Ok(purged) => tracing::info!(
                    outbox_rows = purged.outbox_rows,
                    saga_states = purged.saga_states,
                    "saga tables purged"
                ),
                Err(error) => tracing::warn!(%error, "saga tables not purged this time"),
            }
        }
    }

    async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (lock, connection) = self.pg_config.connect(NoTls).await?;
        let _driver = AbortOnDrop(tokio::spawn(connection));
        let key = lock_key(&self.config.name);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            locked = lock.execute("select pg_advisory_lock($1)", &params) => { locked?; }
        }
        tracing::info!(saga = %self.config.name, "saga runner leading");
        loop {
            let after = self.checkpoint().await?;
            let mut events = self
                .handler
                .store()
                .subscribe(after, EventFilter::All)
                .await?;
            let mut ticker = tokio::time::interval(self.config.tick);
            let mut census = tokio::time::interval(CENSUS_PERIOD);
            // The last event handled, with its time: deadlines are judged in log time.
            let mut seen: Option<(Position, DateTime<Utc>)> = None;
            loop {
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    next = events.next() => match next {
                        Some(Ok(event)) => {
                            if !self.handle_until_done(&event, &mut stop).await {
                                return Ok(());
                            }
                            seen = Some((event.position, event.recorded_at));
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "saga subscription failed; resubscribing");
                            tokio::time::sleep(RETRY_PAUSE).await;
                            break;
                        }
                        None => break,
                    },
                    _ = census.tick() => {
                        if let Err(error) = self.census().await {
                            tracing::warn!(%error, "saga instances not counted this time");
                        }
                    }
                    _ = ticker.tick() => {
                        let ticked = match self.now(after, seen).await {
                            Ok(now) => self.tick_due(now).await,
                            Err(error) => Err(error),
                        };
                        if let Err(error) = ticked {
                            tracing::warn!(%error, "saga deadlines not handled this tick");
                        }
                    }
                }
            }
        }
    }

    /// Handles one event, retrying transient failures until it succeeds; `false` when stopped
    /// meanwhile. A permanent failure is logged and the event skipped (never silently).
    async fn handle_until_done(
        &self,
        event: &RecordedEvent,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        loop {
            let span = tracing::info_span!(
                "saga.step",
                event_id = %event.id,
                event_type = %event.event_type,
                stream = %event.stream,
            );
            trace_context::follow_event(&span, &event.metadata);
            match self.on_event(event).instrument(span).await {
                Ok(()) => return true,
                Err(error) if error.is_transient() => {
                    tracing::warn!(%error, event_id = %event.id, "saga step failed; retrying");
                    tokio::select! {
                        _ = stop.changed() => return false,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, event_id = %event.id, stream = %event.stream, "saga step failed for good; event skipped");
                    return true;
                }
            }
        }
    }

    async fn on_event(&self, recorded: &RecordedEvent) -> Result<(), CommandError> {
        let decoded = match decode_recorded(
            &recorded.event_type,
            recorded.data.clone(),
            recorded.metadata.clone(),
        ) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::error!(%error, event_id = %recorded.id, "undecodable event skipped by the saga");
                return self.save(None, Vec::new(), Some(recorded.position)).await;
            }
        };
        let (event, metadata) = (decoded.event, decoded.metadata);
        let correlation = metadata.correlation_id;
        let mut rows = Vec::new();
        match &event {
            // The gateway is called for the request, not for the saga's command: a request
            // appended once is charged once, however often the command was sent.
            Event::Payment(PaymentEvent::PaymentChargeRequested(requested)) => {
                rows.push(Row::new(
                    requested.order_id,
                    &format!("charge/{}", requested.attempt),
                    Message::Charge {
                        order_id: requested.order_id,
                        attempt: requested.attempt,
                        amount_minor: requested.amount.amount_minor(),
                        currency: requested.amount.currency().to_string(),
                        payment_token: requested.payment_token.to_string(),
                        correlation_id: correlation,
                    },
                ));
            }
            Event::Order(OrderEvent::OrderCancelled(cancelled)) => {
                rows.push(Row::new(
                    cancelled.order_id,
                    "notify/order-cancelled",
                    Message::Notification {
                        order_id: cancelled.order_id,
                        template: "order-cancelled".into(),
                        customer_id: None,
                        detail: Some(cancelled.cancellation_reason.to_string()),
                        correlation_id: correlation,
                    },
                ));
            }
            _ => {}
        }
        let saga = match fulfilment::order_of(&event) {
            None => None,
            Some(order_id) => {
                let state = self
                    .state(order_id)
                    .await?
                    .unwrap_or_else(|| FulfilmentState::with_timing(self.config.timing));
                let before = state.phase();
                let (next, commands) = fulfilment::step(state, &SagaInput::Event(&event));
                count_settled(before, &next);
                let step = Step {
                    causation: recorded.id,
                    correlation,
                    // The commands continue this step's trace, itself a child of the event's.
                    traceparent: trace_context::traceparent(&tracing::Span::current())
                        .or_else(|| metadata.traceparent.clone()),
                };
                self.send(commands, &step, &mut rows).await?;
                Some((order_id, next, correlation))
            }
        };
        self.save(saga, rows, Some(recorded.position)).await
    }

    /// Sends every command of one saga step in order; rejections are logged (the saga
    /// compensates when the event that caused them arrives), transient failures abort the step.
    async fn send(
        &self,
        commands: Vec<Command>,
        step: &Step,
        rows: &mut Vec<Row>,
    ) -> Result<(), CommandError> {
        for (index, command) in commands.into_iter().enumerate() {
            let envelope = Envelope {
                command_id: Uuid::new_v5(&step.causation, format!("saga/{index}").as_bytes()),
                correlation_id: step.correlation,
                causation_id: step.causation,
                actor: ACTOR.to_owned(),
                idempotency_key: None,
                traceparent: step.traceparent.clone(),
            };
            let sent = match command {
                Command::Order { order_id, command } => {
                    let stream = stream_name(streams::order(order_id))?;
                    let handled = self.handler.execute::<OrderAggregate, _>(
                        &stream,
                        None,
                        &envelope,
                        |loaded| Ok(order::decide(&loaded.state, &command)?),
                    );
                    metered(command.command_name(), handled).await.map(drop)
                }
                Command::Product { sku, command } => {
                    let stream = stream_name(streams::product(&sku))?;
                    let handled = self.handler.execute::<ProductAggregate, _>(
                        &stream,
                        None,
                        &envelope,
                        |loaded| Ok(product::decide(&loaded.state, &command)?),
                    );
                    metered(command.command_name(), handled).await.map(drop)
                }
                // Money goes back through the gateway first; the outbox worker records it.
                Command::Payment {
                    order_id,
                    command: PaymentCommand::Refund { reason, .. },
                } => {
                    rows.push(Row::new(
                        order_id,
                        "refund",
                        Message::Refund {
                            order_id,
                            reason: reason.to_string(),
                            correlation_id: step.correlation,
                        },
                    ));
                    Ok(())
                }
                Command::Payment { order_id, command } => {
                    let stream = stream_name(streams::payment(order_id))?;
                    let handled = self.handler.execute::<PaymentAggregate, _>(
                        &stream,
                        None,
                        &envelope,
                        |loaded| Ok(payment::decide(&loaded.state, &command)?),
                    );
                    metered(command.command_name(), handled).await.map(drop)
                }
                Command::Notify(Notification::OrderConfirmed {
                    order_id,
                    customer_id,
                }) => {
                    rows.push(Row::new(
                        order_id,
                        "notify/order-confirmed",
                        Message::Notification {
                            order_id,
                            template: "order-confirmed".into(),
                            customer_id: Some(customer_id.to_string()),
                            detail: None,
                            correlation_id: step.correlation,
                        },
                    ));
                    Ok(())
                }
            };
            match sent {
                Ok(()) => {}
                Err(CommandError::Rejected(rejection)) => {
                    tracing::info!(%rejection, causation = %step.causation, "saga command rejected");
                }
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    tracing::error!(%error, causation = %step.causation, "saga command failed");
                }
            }
        }
        Ok(())
    }

    /// The time deadlines are judged by: the wall clock when the runner has handled every
    /// event in the log, else the time of the last event it handled. A runner that is behind
    /// (after a restart, under a burst) must not cancel an order for a payment deadline while
    /// the payment's outcome is still waiting in the log.
    async fn now(
        &self,
        checkpoint: Position,
        seen: Option<(Position, DateTime<Utc>)>,
    ) -> Result<DateTime<Utc>, CommandError> {
        let head = self.handler.store().head().await?;
        let at = seen.map_or(checkpoint, |(position, _)| position);
        match seen {
            _ if head <= at => Ok(Utc::now()),
            Some((_, recorded_at)) => Ok(recorded_at),
            // Behind, and nothing handled yet since the start: no log time to go by.
            None => Ok(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// Feeds `now` to every saga whose deadline has passed by then.
    async fn tick_due(&self, now: DateTime<Utc>) -> Result<(), CommandError> {
        let due = {
            let client = self.pool.get().await?;
            client
                .query(
                    "select order_id, state, due_at, correlation_id from saga_states
                     where saga_name = $1 and not settled and due_at <= $3
                     order by due_at limit $2",
                    &[&self.config.name, &DUE_BATCH, &now],
                )
                .await?
        };
        for row in due {
            let order_id = OrderId(row.get(0));
            let state: FulfilmentState = serde_json::from_value(row.get(1))
                .map_err(|e| CommandError::Internal(format!("saga state of {order_id}: {e}")))?;
            let due_at: DateTime<Utc> = row.get(2);
            let correlation: Uuid = row.get(3);
            let before = state.phase();
            let (next, commands) = fulfilment::step(state, &SagaInput::Tick { now });
            count_settled(before, &next);
            let step = Step {
                // The same deadline seen again after a crash sends the same command ids.
                causation: Uuid::new_v5(
                    &order_id.0,
                    format!("tick/{}", due_at.timestamp_millis()).as_bytes(),
                ),
                correlation,
                traceparent: None,
            };
            let mut rows = Vec::new();
            self.send(commands, &step, &mut rows).await?;
            self.save(Some((order_id, next, correlation)), rows, None)
                .await?;
        }
        Ok(())
    }

    /// `orderly_saga_instances` and `orderly_saga_oldest_open_seconds` for every open phase,
    /// 0 when empty. The phase is derived from each stored state, and "oldest" goes by when the
    /// state last changed (`updated_at`), which is at or after its last change of phase. Reads
    /// every open instance: fine while they number in the thousands; a phase column would be
    /// needed beyond.
    async fn census(&self) -> Result<(), CommandError> {
        let rows = {
            let client = self.pool.get().await?;
            client
                .query(
                    "select state, updated_at from saga_states
                     where saga_name = $1 and not settled",
                    &[&self.config.name],
                )
                .await?
        };
        let now = Utc::now();
        let mut phases: HashMap<Phase, (u64, f64)> = HashMap::new();
        for row in rows {
            let Ok(state) = serde_json::from_value::<FulfilmentState>(row.get(0)) else {
                continue;
            };
            let updated_at: DateTime<Utc> = row.get(1);
            let age = (now - updated_at).as_seconds_f64().max(0.0);
            let entry = phases.entry(state.phase()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(age);
        }
        for phase in Phase::OPEN {
            let (count, oldest) = phases.get(&phase).copied().unwrap_or_default();
            metrics::gauge!("orderly_saga_instances", "state" => phase.as_str()).set(count as f64);
            metrics::gauge!("orderly_saga_oldest_open_seconds", "state" => phase.as_str())
                .set(oldest);
        }
        Ok(())
    }

    async fn state(&self, order_id: OrderId) -> Result<Option<FulfilmentState>, CommandError> {
        let client = self.pool.get().await?;
        // The saga's hot statements are prepared once per connection (one round trip less).
        let load = client.prepare_cached(LOAD_STATE).await?;
        let row = client
            .query_opt(&load, &[&self.config.name, &order_id.0])
            .await?;
        row.map(|row| {
            serde_json::from_value(row.get(0))
                .map_err(|e| CommandError::Internal(format!("saga state of {order_id}: {e}")))
        })
        .transpose()
    }

    async fn checkpoint(&self) -> Result<Position, CommandError> {
        let client = self.pool.get().await?;
        maintenance::checkpoint(&client, &self.config.name).await
    }

    /// Stores a saga's state, the outbox rows of the step and the checkpoint atomically.
    async fn save(
        &self,
        saga: Option<(OrderId, FulfilmentState, Uuid)>,
        rows: Vec<Row>,
        checkpoint: Option<Position>,
    ) -> Result<(), CommandError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if let Some((order_id, state, correlation)) = saga {
            let due_at = state.next_due_at();
            let settled = state.is_settled();
            let value =
                serde_json::to_value(&state).map_err(|e| CommandError::Internal(e.to_string()))?;
            let save = tx.prepare_cached(SAVE_STATE).await?;
            tx.execute(
                &save,
                &[
                    &self.config.name,
                    &order_id.0,
                    &value,
                    &correlation,
                    &due_at,
                    &settled,
                ],
            )
            .await?;
        }
        let new_rows = !rows.is_empty();
        for row in rows {
            row.insert(&tx).await?;
        }
        if let Some(position) = checkpoint {
            let (commit, prepare) = position_columns(position)?;
            let save = tx.prepare_cached(SAVE_CHECKPOINT).await?;
            tx.execute(&save, &[&self.config.name, &commit, &prepare])
                .await?;
        }
        tx.commit().await?;
        if new_rows {
            self.outbox_ready.notify_one();
        }
        Ok(())
    }
}

/// How often the leading runner counts the open instances by phase.
const CENSUS_PERIOD: Duration = Duration::from_secs(15);

/// `orderly_saga_settled_total`, once per instance: when a step settles it.
fn count_settled(before: Phase, after: &FulfilmentState) {
    let open = !matches!(before, Phase::Delivered | Phase::Cancelled);
    if open && after.is_settled() {
        metrics::counter!("orderly_saga_settled_total", "outcome" => after.phase().as_str())
            .increment(1);
    }
}

/// What a saga step's commands carry in their metadata.
struct Step {
    causation: Uuid,
    correlation: Uuid,
    traceparent: Option<String>,
}

fn position_columns(position: Position) -> Result<(i64, i64), CommandError> {
    let column = |n: u64| {
        i64::try_from(n)
            .map_err(|_| CommandError::Internal(format!("position {position} out of range")))
    };
    Ok((column(position.commit)?, column(position.prepare)?))
}

/// The advisory-lock key of a saga name: stable across processes and builds.
fn lock_key(name: &str) -> i64 {
    let id = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("orderly-saga/{name}").as_bytes(),
    );
    let bytes = id.as_bytes();
    i64::from_be_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// Stops the lock connection's driver with the runner, which releases the lock.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
