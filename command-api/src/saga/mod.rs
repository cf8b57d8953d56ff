//! The fulfilment saga runner: follows the log, feeds each order's events to the domain's
//! saga, sends the commands it asks for, and delivers side effects (gateway calls,
//! notifications) through the outbox.
//!
//! # Layout
//!
//! - this file: [`SagaRunner`], its settings, the coordinator that keeps this process's share
//!   of the lanes, and how a saga step's commands are sent;
//! - `lanes`: lanes, members and fenced leases in PostgreSQL, shared by every process that runs
//!   the saga;
//! - `consumer`: the partitioned consumer: one log reader per process, a task per held lane,
//!   batches stored with their checkpoint, deadlines, parked events;
//! - `coalesce`: product commands of many orders combined into one append per product;
//! - `outbox`: the worker that calls the gateway and the notifier;
//! - `gateway`, `notify`: the ports with their adapters; `maintenance`: the operator's view.
//!
//! Exactly-once effects from at-least-once delivery:
//! - commands are sent before the saga state and checkpoint are stored (one transaction with
//!   the outbox rows), so a crash replays the event against the old state and the same commands
//!   go out again; their ids derive from the causing event (or deadline), so the store writes
//!   them once, and every saga command is idempotent at its aggregate anyway;
//! - gateway calls leave only through outbox rows whose ids derive from the saga step, and carry
//!   the order id as the provider's idempotency key, so a repeated call never charges twice;
//! - deadlines are data in the saga state; `saga_states.due_at` lets a lane find them after a
//!   restart;
//! - a lane is written only by the process holding its lease at the generation it claimed, so
//!   two processes never store states for one order (see `lanes`).

mod coalesce;
mod consumer;
pub mod gateway;
pub mod lanes;
pub mod maintenance;
pub mod notify;
mod outbox;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use orderly_domain::fulfilment::{Command, FulfilmentState, Notification, Phase, Timing};
use orderly_domain::order::{self, OrderAggregate};
use orderly_domain::payment::{self, PaymentAggregate, PaymentCommand};
use orderly_domain::product::ProductCommand;
use orderly_domain::streams;
use orderly_domain::values::OrderId;
use orderly_event_schemas::{Event, PaymentEvent};
use orderly_event_store::{EventStore, GroupCommit};
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::CommandError;
use crate::handling::{Envelope, Handler, Loaded, stream_name};
use crate::metering::{self, CommandName, metered};
use crate::snapshots::Snapshots;
use coalesce::Coalescer;
pub use gateway::{
    BreakerState, Charge, ChargeOutcome, HttpGateway, PaymentGateway, Resilience, Resilient,
    Simulator,
};
use lanes::{Lease, LeaseClock, Member};
pub use notify::{LogNotifier, Notice, Notifier, SmtpNotifier, SmtpSettings};
use outbox::Row;

/// The `actor` of every event the saga and its workers write.
pub const ACTOR: &str = "system:fulfilment";

/// Delivery attempts of an outbox message before it is dead-lettered, by default: with pauses
/// doubling from 0.4 s up to a minute, about 13 minutes of trying, so an outage of the payment
/// provider or the mail server shorter than that dead-letters nothing (refunds, resolutions
/// and notices go through once it ends), and well past the breaker's cool-down, which
/// short-circuits calls meanwhile.
pub const DEFAULT_OUTBOX_MAX_ATTEMPTS: u32 = 20;

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// Names the lanes, the states and the members.
    pub name: String,
    pub timing: Timing,
    /// How often each lane checks its due deadlines and parked retries, and the outbox its
    /// work (new outbox rows wake it at once).
    pub tick: Duration,
    /// Events a lane handles per batch at most (one transaction stores a batch).
    pub batch_size: usize,
    /// Orders of one batch handled at once.
    pub orders_in_flight: usize,
    /// Rounds of the saga's appends written at once (see [`GroupCommit`]); as many as its
    /// store has connections. Fewer left appends queueing behind busy rounds while the store
    /// had connections to spare: with 4 rounds against 8 connections, a sustained 650 orders/s
    /// settled 5-16 % slower with a quarter more round trips per order (BENCHMARKS.md).
    pub append_writers: usize,
    /// How long this process's membership and lane leases hold without renewal: after a crash
    /// its lanes wait this long for another process.
    pub lease: Duration,
    /// How often leases are renewed and the lanes shared out again (well below `lease`).
    pub heartbeat: Duration,
    /// Delivery attempts of an outbox message before it is dead-lettered; see
    /// [`DEFAULT_OUTBOX_MAX_ATTEMPTS`].
    pub outbox_max_attempts: u32,
    /// How long after a charge call with an unknown outcome the provider is asked about it
    /// (see the outbox's module docs): it may still be finishing the charge, and until it has,
    /// it answers that it holds none.
    pub charge_settle: Duration,
    /// How long a claimed outbox message stays invisible to other workers; longer than any
    /// delivery takes (gateway timeout times attempts). Also the longest a lane that starts
    /// waits for the outbox to claim what is due before it judges deadlines.
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
            batch_size: 512,
            orders_in_flight: 32,
            append_writers: 8,
            lease: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            outbox_max_attempts: DEFAULT_OUTBOX_MAX_ATTEMPTS,
            charge_settle: Duration::from_secs(120),
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
    /// Where the lanes' events come from: the store itself, or a reader shared with the
    /// process's other followers of the log (see [`SagaRunner::following`]).
    log: Arc<dyn EventStore>,
    /// Product commands of all lanes, combined per product.
    products: Coalescer,
    pool: Pool,
    gateway: Arc<dyn PaymentGateway>,
    /// Delivers customer notifications from the outbox.
    notifier: Arc<dyn Notifier>,
    /// Wakes the outbox worker when a lane stored new messages.
    outbox_ready: Notify,
    /// How often the outbox worker claimed every message due (a claim short of full, or one
    /// that failed); lanes judge no deadline until it did so after they started (see
    /// `consumer::DeadlineGate`).
    outbox_passes: watch::Sender<u64>,
    /// This process among the saga's members.
    member: Member,
    lag: Lag,
    /// The saga states this process's lanes stored last.
    states: consumer::StoredStates,
    /// Instances whose deadline fails for good, tried again after growing pauses.
    tick_failures: consumer::TickFailures,
    /// Orders whose outcome the database refused on its own, and whether it stored others'
    /// since: what tells an order's fault from the database's.
    refusals: consumer::Refusals,
    /// Whether this process's leases still hold, before its lanes send anything.
    leases: LeaseClock,
}

impl SagaRunner {
    pub fn new(
        config: SagaConfig,
        store: Arc<dyn EventStore>,
        pool: Pool,
        gateway: Arc<dyn PaymentGateway>,
    ) -> Self {
        // The lanes own their orders' streams: decide on the state left by the last append.
        // Many orders' steps append at once: written together, they share commits.
        let writers = config.append_writers;
        let log = store.clone();
        let handler = Handler::optimistic(Arc::new(GroupCommit::new(store, writers)))
            .with_snapshots(Snapshots::new(pool.clone()));
        let member = Member {
            saga: config.name.clone(),
            id: member_id(),
            lease: config.lease,
        };
        Self {
            products: Coalescer::new(handler.clone()),
            handler,
            log,
            pool,
            gateway,
            notifier: Arc::new(LogNotifier),
            outbox_ready: Notify::new(),
            outbox_passes: watch::Sender::new(0),
            member,
            lag: Lag::default(),
            states: consumer::StoredStates::default(),
            tick_failures: consumer::TickFailures::default(),
            refusals: consumer::Refusals::default(),
            leases: LeaseClock::default(),
            config,
        }
    }

    /// Delivers notifications through `notifier` instead of the log.
    pub fn with_notifier(self, notifier: Arc<dyn Notifier>) -> Self {
        Self { notifier, ..self }
    }

    /// Follows the log through `log` (the same log as the store's) instead of a reader of its
    /// own: in a process whose projections follow it too, one shared reader (a `Fanout`)
    /// reads each event once for all of them. Appends and stream reads still go to the store.
    pub fn following(self, log: Arc<dyn EventStore>) -> Self {
        Self { log, ..self }
    }

    /// This process's member id, as `orderly saga status` shows it.
    pub fn member_id(&self) -> &str {
        &self.member.id
    }

    /// Follows the log and delivers the outbox until `shutdown` completes; an `Err` when the
    /// runner could not go on (the caller should stop the process: nothing here is half-done).
    /// Dropping the returned future stops everything too (as a crash would, minus the process).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let runner = Arc::new(self);
        let follow = async {
            let followed = runner.clone().coordinate(stopped.clone()).await;
            // A runner that cannot follow the log stops its workers too, so the process
            // ends visibly instead of looking alive.
            let _ = stop.send(true);
            followed
        };
        let deliver = runner.clone().deliver(stopped.clone());
        let purge = runner.clone().purge_periodically(stopped.clone());
        let census = runner.clone().census_periodically(stopped.clone());
        let signal = async {
            let mut stopped = stopped.clone();
            tokio::select! {
                () = shutdown => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
            let _ = stop.send(true);
        };
        let (followed, delivered, (), (), ()) =
            tokio::join!(follow, deliver, purge, census, signal);
        runner.leave().await;
        tracing::info!(saga = %runner.config.name, "saga runner stopped");
        followed.and(delivered)
    }

    /// Hands this process's lanes and its outbox claims to the others at a stop, once the
    /// consumer and the outbox worker have both ended: a claim given back while its delivery
    /// was still under way would be delivered twice, and a member that left before its worker
    /// ended would leave that worker's claims to wait out their lease, since only the claims of
    /// members still listed are given back early (the outbox's `FREE_CLAIMS_OF_THE_DEAD`).
    /// What is not released here (the database is away) frees up when the leases end.
    async fn leave(&self) {
        let left = async {
            let client = self.pool.get().await?;
            self.give_back_claims(&client).await?;
            self.member.leave(&**client).await
        };
        if let Err(error) = left.await {
            tracing::warn!(%error, "saga lanes not released; they free up when their leases end");
        }
    }

    /// Takes the census every [`CENSUS_PERIOD`], on a task of its own: its queries must never
    /// hold up the heartbeat that renews this process's leases.
    async fn census_periodically(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(CENSUS_PERIOD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => {}
            }
            if let Err(error) = self.census().await {
                tracing::warn!(%error, "saga instances not counted this time");
            }
        }
    }

    /// Purges old rows every `purge_every` (first right after the start). Every runner
    /// process purges: the deletes are idempotent and cheap. Failures are logged and tried
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

    /// Keeps this process's share of the lanes and a consumer running over them: every
    /// heartbeat renews the leases, gives back lanes another member should have, claims free
    /// ones it should have, and restarts the consumer when its lanes changed. Outages are
    /// waited out (a lane whose lease ran out meanwhile is fenced at its next commit); at a stop
    /// the consumer finishes its batches and every lane is released for the others.
    async fn coordinate(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut held: BTreeMap<u32, Lease> = BTreeMap::new();
        let mut consumer: Option<Consumer> = None;
        let mut beat = tokio::time::interval(self.config.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lanes_ready = false;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                fenced = wait_for(&mut consumer) => {
                    consumer = None;
                    if let Some(consumer::Fenced(lane)) = fenced {
                        held.remove(&lane);
                    }
                }
                _ = beat.tick() => {}
            }
            if !lanes_ready {
                lanes_ready = self.ensure_lanes().await;
            }
            if lanes_ready && let Err(error) = self.rebalance(&mut held, &mut consumer).await {
                tracing::warn!(%error, "saga lanes not shared out this time; retrying");
            }
            metrics::gauge!("orderly_saga_lanes_held").set(held.len() as f64);
            // Between batches too: a lane stuck retrying one batch must show its lag growing.
            self.lag.publish();
            if consumer.is_none() && !held.is_empty() {
                match self.checkpoints(&mut held).await {
                    Ok(()) if !held.is_empty() => {
                        // Lanes may have been written by others since this process last held
                        // them.
                        self.states.clear();
                        let leases = held.values().copied().collect();
                        consumer = Some(Consumer::start(self.clone(), leases));
                    }
                    Ok(()) => {}
                    Err(error) => {
                        tracing::warn!(%error, "saga lanes' checkpoints not read; retrying");
                    }
                }
            }
        }
        if let Some(consumer) = consumer.take() {
            match self.pool.get().await {
                Ok(client) => self.stop_renewing(consumer, &client).await,
                Err(_) => consumer.stop().await,
            }
        }
        // The lanes are released by `leave`, once the outbox worker has ended too.
        metrics::gauge!("orderly_saga_lanes_held").set(0.0);
        Ok(())
    }

    /// Brings `held` up to where the lanes stand in the database before a consumer starts on
    /// them: the consumer before it moved their checkpoints on, so starting from the positions
    /// they were claimed at would hand every event since to the saga again (and, past the
    /// retention, put the outbox messages the purge removed back in line). A lane no longer
    /// this process's at the same generation is dropped.
    async fn checkpoints(&self, held: &mut BTreeMap<u32, Lease>) -> Result<(), CommandError> {
        let client = self.pool.get().await?;
        let now: HashMap<u32, Lease> = self
            .member
            .held(&**client)
            .await?
            .into_iter()
            .map(|lease| (lease.lane, lease))
            .collect();
        held.retain(|lane, lease| match now.get(lane) {
            Some(stored) if stored.generation == lease.generation => {
                *lease = *stored;
                true
            }
            _ => {
                tracing::warn!(lane, "saga lane lost its lease; another process took it");
                false
            }
        });
        Ok(())
    }

    async fn ensure_lanes(&self) -> bool {
        let ensured = match self.pool.get().await {
            Ok(client) => self.member.ensure_lanes(&**client).await,
            Err(error) => Err(error.into()),
        };
        match ensured {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "saga lanes not set up yet; retrying");
                false
            }
        }
    }

    /// One heartbeat: see [`SagaRunner::coordinate`].
    async fn rebalance(
        &self,
        held: &mut BTreeMap<u32, Lease>,
        consumer: &mut Option<Consumer>,
    ) -> Result<(), CommandError> {
        let client = self.pool.get().await?;
        let (members, renewed) = self.renew(&client).await?;
        self.free_claims_of_the_dead(&client).await;
        let wanted = self.member.share(&members);
        let mut changed = false;
        held.retain(|lane, lease| {
            let kept = renewed.get(lane) == Some(&lease.generation);
            if !kept {
                tracing::warn!(lane, "saga lane lost its lease; another process took it");
                changed = true;
            }
            kept
        });
        // At once, before anything below can fail: while the consumer acts for a lane it
        // lost, no renewal extends its sends' clock (see `LeaseClock`), so its other lanes
        // would send nothing either.
        if changed && let Some(running) = consumer.take() {
            self.stop_renewing(running, &client).await;
        }
        // Lanes to give back: held but another member's share, or ours in the table but not
        // in hand (a heartbeat that failed half-way).
        let surplus: Vec<u32> = renewed
            .keys()
            .copied()
            .filter(|lane| !wanted.contains(lane) || !held.contains_key(lane))
            .collect();
        if !surplus.is_empty() {
            if let Some(running) = consumer.take() {
                self.stop_renewing(running, &client).await;
            }
            self.member.release(&**client, &surplus).await?;
            for lane in &surplus {
                held.remove(lane);
            }
            changed = true;
        }
        let missing: BTreeSet<u32> = wanted
            .into_iter()
            .filter(|lane| !held.contains_key(lane))
            .collect();
        for lane in missing {
            if let Some(lease) = self.member.claim(&**client, lane).await? {
                tracing::info!(lane, generation = lease.generation, "saga lane claimed");
                held.insert(lane, lease);
                changed = true;
            }
        }
        if changed && let Some(running) = consumer.take() {
            self.stop_renewing(running, &client).await;
        }
        Ok(())
    }

    /// Stops `running` (each lane finishes the batch in hand), renewing this member's
    /// membership and leases at every heartbeat meanwhile, for [`STOP_PATIENCE`] at most. A
    /// lane slow to finish (a slow database, a hot product) held the heartbeat up: past the
    /// lease the other processes took this one for dead and put its outbox claims back in line
    /// while its worker was still delivering them, and its own sends stopped for want of a
    /// renewal. A lane that never finishes (a hung connection) still lets its leases run out
    /// after the patience, so that the others take its lanes over, as they would a dead
    /// process's.
    async fn stop_renewing(&self, running: Consumer, client: &tokio_postgres::Client) {
        let stopped = running.stop();
        tokio::pin!(stopped);
        let mut beat = tokio::time::interval(self.config.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The heartbeat that asked for the stop has just renewed.
        beat.reset();
        let patience = tokio::time::sleep(STOP_PATIENCE);
        tokio::pin!(patience);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                () = &mut patience => {
                    tracing::warn!(
                        "a saga lane has not finished its batch in {STOP_PATIENCE:?}; its leases \
                         are left to run out"
                    );
                    stopped.await;
                    return;
                }
                _ = beat.tick() => {
                    if let Err(error) = self.renew(client).await {
                        tracing::warn!(%error, "saga membership not renewed while its lanes stop");
                    }
                }
            }
        }
    }

    /// Renews this member's membership and the lease of every lane it holds, and the clock
    /// its sends check (from before the renewal was asked for, so it never runs ahead of the
    /// database's): the live members, and the lanes still held with their generations.
    async fn renew(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(Vec<String>, HashMap<u32, i64>), CommandError> {
        let asked = tokio::time::Instant::now();
        let members = self.member.heartbeat(client).await?;
        let renewed: HashMap<u32, i64> = self.member.renew(client).await?.into_iter().collect();
        self.leases.renewed(asked, self.config.lease, &renewed);
        Ok((members, renewed))
    }

    /// Sends every command of one saga step in order. Rejections are logged (the saga
    /// compensates when the event that caused them arrives); any other failure ends the step
    /// (transient ones are tried again, the others park the event), but for a release of
    /// reserved stock refused for good, or a shipment of it refused at all: the step's other
    /// releases or shipments still go, each product's stock being its own (and each written
    /// once, however often the step is tried), and the step fails after them, so that the
    /// stock left held is parked in sight of an operator.
    async fn send(
        &self,
        commands: Vec<Command>,
        step: &Step,
        rows: &mut Vec<Row>,
    ) -> Result<(), CommandError> {
        let envelope_of = |index: usize| Envelope {
            command_id: Uuid::new_v5(&step.causation, format!("saga/{index}").as_bytes()),
            correlation_id: step.correlation,
            causation_id: step.causation,
            actor: ACTOR.to_owned(),
            idempotency_key: None,
            traceparent: step.traceparent.clone(),
        };
        let mut commands = commands.into_iter().enumerate().peekable();
        let mut refused_stock = None;
        while let Some((index, command)) = commands.next() {
            let (release, shipment) = match &command {
                Command::Product { command, .. } => (
                    matches!(command, ProductCommand::ReleaseReservation { .. }),
                    matches!(command, ProductCommand::ShipReservedStock { .. }),
                ),
                _ => (false, false),
            };
            if refused_stock.is_some() && !release && !shipment {
                break;
            }
            // A process whose leases may have run out sends nothing: another may hold its lanes.
            self.leases.check()?;
            let envelope = envelope_of(index);
            let sent = match command {
                // Consecutive commands for one order (paid, then confirmed) go in one append.
                Command::Order { order_id, command } => {
                    let mut group = vec![(envelope, command)];
                    while let Some((index, Command::Order { command, .. })) =
                        commands.next_if(|(_, next)| {
                            matches!(next, Command::Order { order_id: next, .. } if *next == order_id)
                        })
                    {
                        group.push((envelope_of(index), command));
                    }
                    let stream = stream_name(streams::order(order_id))?;
                    self.send_to_order(&stream, group).await
                }
                // Products are shared by many orders: their commands meet in one append.
                Command::Product { sku, command } => {
                    let stream = stream_name(streams::product(&sku))?;
                    let name = command.command_name();
                    metered(name, self.products.send(&stream, envelope, command)).await
                }
                // Money goes back through the gateway first; the outbox worker records it.
                Command::Payment {
                    order_id,
                    command: PaymentCommand::Refund { reason, .. },
                } => {
                    rows.push(Row::refund(order_id, &reason, step.correlation));
                    Ok(())
                }
                // The charge goes into the outbox with this step's commit, not only once the
                // request comes back through the log: a hop less between order and charge.
                Command::Payment { order_id, command } => self
                    .send_to_payment(order_id, &envelope, command)
                    .await
                    .map(|appended| {
                        for event in appended {
                            let event = Event::Payment(event);
                            rows.extend(outbox::rows_for_event(&event, step.correlation));
                        }
                    }),
                Command::Notify(Notification::OrderConfirmed {
                    order_id,
                    customer_id,
                }) => {
                    rows.push(Row::order_confirmed(
                        order_id,
                        &customer_id,
                        step.correlation,
                    ));
                    Ok(())
                }
            };
            match sent {
                Ok(()) => {}
                // The saga saw the stock reserved, or it would not ship it: the product's
                // refusal leaves it held until an operator looks into it.
                Err(error @ CommandError::Rejected(_)) if shipment => {
                    tracing::error!(%error, causation = %step.causation, "reserved stock not shipped: the product refused; the step's other shipments go on");
                    refused_stock.get_or_insert(error);
                }
                Err(CommandError::Rejected(rejection)) => {
                    tracing::info!(%rejection, causation = %step.causation, "saga command rejected");
                }
                Err(error) if release && !error.is_transient() => {
                    tracing::warn!(%error, causation = %step.causation, "stock release failed; the step's other releases go on");
                    refused_stock.get_or_insert(error);
                }
                Err(error) => return Err(error),
            }
        }
        refused_stock.map_or(Ok(()), Err)
    }

    /// Decides a payment command on the payment's stream, and answers the events of the
    /// decision that was appended (none when the stream had them already). The first charge
    /// request starts the stream: no read to find it empty (should it exist after all, the
    /// append conflicts and reads).
    async fn send_to_payment(
        &self,
        order_id: OrderId,
        envelope: &Envelope,
        command: PaymentCommand,
    ) -> Result<Vec<PaymentEvent>, CommandError> {
        let stream = stream_name(streams::payment(order_id))?;
        // The last decision made: a lost race decides again on the state that won it.
        let decided = Mutex::new(Vec::new());
        let decide = |loaded: &Loaded<_>| {
            let events = payment::decide(&loaded.state, &command)?;
            *decided.lock().unwrap_or_else(|p| p.into_inner()) = events.clone();
            Ok(events)
        };
        let first = matches!(command, PaymentCommand::RequestCharge { attempt: 1, .. });
        let handled = async {
            if first {
                self.handler
                    .execute_new::<PaymentAggregate, _>(&stream, envelope, decide)
                    .await
            } else {
                self.handler
                    .execute::<PaymentAggregate, _>(&stream, None, envelope, decide)
                    .await
            }
        };
        metered(command.command_name(), handled).await?;
        Ok(decided.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sends commands for one order's stream: one alone as usual, several decided in turn and
    /// appended together. Each is counted by name with the time the whole group took.
    async fn send_to_order(
        &self,
        stream: &orderly_event_store::StreamName,
        mut group: Vec<(Envelope, order::OrderCommand)>,
    ) -> Result<(), CommandError> {
        if group.len() == 1
            && let Some((envelope, command)) = group.pop()
        {
            let handled =
                self.handler
                    .execute::<OrderAggregate, _>(stream, None, &envelope, |loaded| {
                        Ok(order::decide(&loaded.state, &command)?)
                    });
            return metered(command.command_name(), handled).await.map(drop);
        }
        let started = std::time::Instant::now();
        let outcomes = self
            .handler
            .execute_batch::<OrderAggregate>(stream, &group)
            .await;
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                for (_, command) in &group {
                    metering::record(command.command_name(), Some(&error), started);
                }
                return Err(error);
            }
        };
        let mut first_refusal = None;
        for ((_, command), outcome) in group.iter().zip(outcomes) {
            let refused = outcome.err().map(CommandError::Rejected);
            metering::record(command.command_name(), refused.as_ref(), started);
            if let Some(refused) = refused {
                first_refusal.get_or_insert(refused);
            }
        }
        first_refusal.map_or(Ok(()), Err)
    }
}

impl SagaRunner {
    /// `orderly_saga_instances` and `orderly_saga_oldest_open_seconds` for every open phase
    /// (0 when empty), counted in the database by the phase stored with each state (see
    /// [`open_instances`]), `orderly_saga_parked`, `orderly_saga_deadlines_overdue`, and the
    /// outbox's `orderly_outbox_dead_letters` and `orderly_outbox_oldest_pending_seconds`.
    async fn census(&self) -> Result<(), CommandError> {
        let (phases, parked, overdue, outbox) = {
            let client = self.pool.get().await?;
            let phases = open_instances(&client, &self.config.name, Utc::now()).await?;
            let parked: i64 = client
                .query_one(
                    "select count(*) from saga_parked where saga_name = $1 and skipped_at is null",
                    &[&self.config.name],
                )
                .await?
                .get(0);
            let overdue = maintenance::overdue(&client, &self.config.name).await?;
            let outbox = client.query_one(OUTBOX_CENSUS, &[]).await?;
            (phases, parked, overdue, outbox)
        };
        for phase in Phase::OPEN {
            let (count, oldest) = phases.get(&phase).copied().unwrap_or_default();
            metrics::gauge!("orderly_saga_instances", "state" => phase.as_str()).set(count as f64);
            metrics::gauge!("orderly_saga_oldest_open_seconds", "state" => phase.as_str())
                .set(oldest);
        }
        metrics::gauge!("orderly_saga_parked").set(parked as f64);
        metrics::gauge!("orderly_saga_deadlines_overdue").set(overdue.count as f64);
        metrics::gauge!("orderly_outbox_dead_letters").set(outbox.get::<_, i64>(0) as f64);
        metrics::gauge!("orderly_outbox_oldest_pending_seconds").set(outbox.get::<_, f64>(1));
        Ok(())
    }
}

/// The open instances of `saga` per phase: how many, and how many seconds before `now` the
/// longest-unchanged of them last changed (`updated_at`, at or after its last change of
/// phase). States stored before the phase column (null there) are read and derived here
/// until they are next written.
async fn open_instances(
    client: &tokio_postgres::Client,
    saga: &str,
    now: DateTime<Utc>,
) -> Result<HashMap<Phase, (u64, f64)>, CommandError> {
    let counted = client.query(CENSUS, &[&saga]).await?;
    let unphased = client.query(UNPHASED, &[&saga]).await?;
    let mut phases: HashMap<Phase, (u64, f64)> = HashMap::new();
    let mut count = |phase: Phase, instances: u64, since: DateTime<Utc>| {
        let entry = phases.entry(phase).or_default();
        entry.0 += instances;
        entry.1 = entry.1.max((now - since).as_seconds_f64().max(0.0));
    };
    for row in counted {
        let name: &str = row.get(0);
        if let Some(phase) = Phase::OPEN.into_iter().find(|open| open.as_str() == name) {
            count(
                phase,
                u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                row.get(2),
            );
        }
    }
    for row in unphased {
        if let Ok(state) = serde_json::from_value::<FulfilmentState>(row.get(0)) {
            count(state.phase(), 1, row.get(1));
        }
    }
    Ok(phases)
}

/// The outbox's dead letters waiting for an operator, and the age in seconds of its oldest
/// message still to deliver (0 when none is).
const OUTBOX_CENSUS: &str = "
select count(*) filter (where dead_lettered_at is not null and skipped_at is null),
       coalesce(extract(epoch from now() - min(created_at) filter (where dead_lettered_at is null)),
                0)::float8
from outbox where delivered_at is null";

/// Open instances per stored phase, with when the longest-unchanged of them last changed.
const CENSUS: &str = "
select phase, count(*), min(updated_at) from saga_states
where saga_name = $1 and not settled and phase is not null
group by phase";

/// Open instances stored before states carried their phase.
const UNPHASED: &str = "
select state, updated_at from saga_states
where saga_name = $1 and not settled and phase is null";

/// How long a process renews its leases while its lanes finish their batches in hand (see
/// `SagaRunner::stop_renewing`): several of a slow batch, and short enough that a lane that
/// never finishes hands its lanes to the others within a minute.
const STOP_PATIENCE: Duration = Duration::from_secs(30);

/// How often every runner counts the open instances by phase.
const CENSUS_PERIOD: Duration = Duration::from_secs(15);

/// `orderly_saga_settled_total`, once per instance: when a stored step settles it.
fn count_settled(before: Phase, after: &FulfilmentState) {
    let open = !matches!(before, Phase::Delivered | Phase::Cancelled);
    if open && after.is_settled() {
        metrics::counter!("orderly_saga_settled_total", "outcome" => after.phase().as_str())
            .increment(1);
    }
}

/// What a saga step's commands carry in their metadata.
#[derive(Debug, Clone)]
struct Step {
    causation: Uuid,
    correlation: Uuid,
    traceparent: Option<String>,
}

/// A consumer task over a set of lanes, with the means to stop it.
struct Consumer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<consumer::Fenced>>,
}

impl Consumer {
    fn start(runner: Arc<SagaRunner>, leases: Vec<Lease>) -> Self {
        let (stop, stopped) = watch::channel(false);
        Self {
            stop,
            task: tokio::spawn(runner.consume(leases, stopped)),
        }
    }

    /// Lets every lane finish the batch in hand, then waits for the consumer to end.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }
}

impl Drop for Consumer {
    /// A runner dropped mid-flight (a crash in tests) takes its consumer down with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Completes when the running consumer ends by itself, with the lane it lost, if any; never
/// while there is none.
async fn wait_for(consumer: &mut Option<Consumer>) -> Option<consumer::Fenced> {
    match consumer {
        Some(running) => (&mut running.task).await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// `orderly_saga_lag_seconds`: the age of the oldest event dealt to a lane of this process and
/// not yet stored, 0 when every lane is idle.
#[derive(Default)]
struct Lag {
    oldest: Mutex<BTreeMap<u32, DateTime<Utc>>>,
}

impl Lag {
    /// Counts `events` as dealt to `lane` until the guard returned is dropped: however the
    /// lane's work on them ends (stored, halted, fenced by another process taking the lane),
    /// this process stops reporting them then, or its gauge would grow for ever after a
    /// takeover.
    fn pending(&self, lane: u32, events: &[Arc<consumer::Input>]) -> Pending<'_> {
        self.pending_since(lane, events.first().map(|first| first.recorded_at()))
    }

    fn pending_since(&self, lane: u32, oldest_at: Option<DateTime<Utc>>) -> Pending<'_> {
        if let (Ok(mut oldest), Some(at)) = (self.oldest.lock(), oldest_at) {
            oldest.entry(lane).or_insert(at);
        }
        self.publish();
        Pending { lag: self, lane }
    }

    fn done(&self, lane: u32) {
        if let Ok(mut oldest) = self.oldest.lock() {
            oldest.remove(&lane);
        }
        self.publish();
    }

    /// The age of the oldest event not yet stored, if any.
    fn age(&self) -> Option<f64> {
        let oldest = self.oldest.lock().ok()?;
        let at = oldest.values().min()?;
        Some((Utc::now() - *at).as_seconds_f64().max(0.0))
    }

    fn publish(&self) {
        metrics::gauge!("orderly_saga_lag_seconds").set(self.age().unwrap_or(0.0));
    }
}

/// A lane's batch counted by [`Lag`] until dropped.
#[must_use = "the batch stops counting as pending when this is dropped"]
struct Pending<'l> {
    lag: &'l Lag,
    lane: u32,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.lag.done(self.lane);
    }
}

/// `first` doubled `doublings` times (at most 16), and no longer than `longest`: how every
/// backoff of the saga grows (gateway retries, outbox deliveries, failing deadlines), each
/// spreading it its own way.
fn doubled(first: Duration, doublings: u32, longest: Duration) -> Duration {
    first.saturating_mul(1 << doublings.min(16)).min(longest)
}

/// Unique per process start: the host name (when there is one) for operators, and a random
/// part so two processes on one host never share an id.
fn member_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "orderly".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &Uuid::new_v4().simple().to_string()[..8]
    )
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    #[test]
    fn a_lanes_lag_ends_however_its_batch_ends() {
        let lag = Lag::default();
        let an_hour_ago = Utc::now() - TimeDelta::hours(1);
        let a_minute_ago = Utc::now() - TimeDelta::minutes(1);
        let first = lag.pending_since(1, Some(an_hour_ago));
        let second = lag.pending_since(2, Some(a_minute_ago));
        assert!(lag.age().is_some_and(|age| age >= 3_600.0));
        // The batch's work gave up (fenced: the lane was taken over) without storing it: the
        // guard goes with the early return all the same.
        let fenced = || -> Result<(), ()> {
            let _pending = first;
            Err(())
        };
        assert!(fenced().is_err());
        let age = lag.age().expect("lane 2 still pending");
        assert!((60.0..3_600.0).contains(&age), "{age}");
        drop(second);
        assert_eq!(lag.age(), None);
    }

    #[tokio::test]
    async fn a_consumer_slow_to_stop_does_not_let_the_membership_run_out() {
        let db = crate::migrations::test_database().await;
        let config = SagaConfig {
            lease: Duration::from_secs(1),
            heartbeat: Duration::from_millis(200),
            ..SagaConfig::default()
        };
        let runner = SagaRunner::new(
            config,
            Arc::new(orderly_event_store::memory::MemoryEventStore::new()),
            orderly_graphql::pg_pool(db.config(), 2).unwrap(),
            Arc::new(Simulator::default()),
        );
        let client = db.connect().await.unwrap();
        runner.member.heartbeat(&client).await.unwrap();
        // A consumer whose batch in hand takes three leases to finish.
        let (stop, _stopped) = watch::channel(false);
        let slow = Consumer {
            stop,
            task: tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                None
            }),
        };
        runner.stop_renewing(slow, &client).await;
        let live: i64 = client
            .query_one(
                "select count(*) from saga_members where member_id = $1 and lease_until > now()",
                &[&runner.member.id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(live, 1, "still a member");
        assert!(runner.leases.check().is_ok(), "its lanes' sends go on");
    }

    #[tokio::test]
    async fn the_census_counts_stored_phases_and_derives_the_ones_stored_without() {
        let db = crate::migrations::test_database().await;
        let client = db.connect().await.unwrap();
        let now = Utc::now();
        let reserving = serde_json::to_value(FulfilmentState::default()).unwrap();
        assert_eq!(FulfilmentState::default().phase(), Phase::Reserving);
        // (saga, stored phase, settled, seconds since the state last changed)
        let rows: [(&str, Option<&str>, bool, i64); 6] = [
            ("fulfilment", Some("awaiting_shipment"), false, 60),
            ("fulfilment", Some("awaiting_shipment"), false, 10),
            ("fulfilment", Some("awaiting_payment"), false, 5),
            ("fulfilment", Some("delivered"), true, 3_600),
            ("fulfilment", None, false, 30),
            ("another", Some("awaiting_payment"), false, 5),
        ];
        for (saga, phase, settled, age) in rows {
            client
                .execute(
                    "insert into saga_states
                         (saga_name, order_id, state, correlation_id, settled, phase, updated_at)
                     values ($1, gen_random_uuid(), $2, gen_random_uuid(), $3, $4, $5)",
                    &[
                        &saga,
                        &reserving,
                        &settled,
                        &phase,
                        &(now - TimeDelta::seconds(age)),
                    ],
                )
                .await
                .unwrap();
        }
        let phases = open_instances(&client, "fulfilment", now).await.unwrap();
        let mut counted: Vec<(&str, u64, i64)> = phases
            .iter()
            .map(|(phase, (count, oldest))| (phase.as_str(), *count, oldest.round() as i64))
            .collect();
        counted.sort();
        assert_eq!(
            counted,
            [
                ("awaiting_payment", 1, 5),
                ("awaiting_shipment", 2, 60),
                ("reserving", 1, 30),
            ]
        );
    }
}
