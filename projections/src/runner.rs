//! The projection runner: catch up from the checkpoint, then follow the log live, one batch per
//! transaction.
//!
//! One runner per projection is active at a time: it holds a session-level PostgreSQL advisory
//! lock for as long as it runs, on the connection it applies batches with. Others wait as
//! standbys, trying the lock every `standby_poll`, and take over when the active one's
//! connection ends (the server then releases the lock). The lock is only for efficiency; the
//! checkpoint compare in every batch (see `batch`) is what guarantees no double application.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use orderly_event_store::postgres::PgConfig;
use orderly_event_store::{EventFilter, EventStore, Position, RecordedEvent, Subscription};
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::batch::{self, BatchResult, Committed, Target};
use crate::error::ProjectionError;
use crate::handlers;
use crate::metrics::{self, RunnerState};
use crate::model::{DeadLetterPolicy, ProjectionName};
use crate::status::ProjectionState;
use crate::watch::{self, ProjectionHub, ProjectionUpdate};

/// How long a catching-up runner waits with nothing to read before it reports itself running:
/// longer than a page read of the log takes, so that catching up does not flap.
const QUIET_AT_HEAD: Duration = Duration::from_millis(50);

/// First pause after a transient failure; each failure in a row doubles it up to
/// `RunnerOptions::retry_max`.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// Attempts to record a runner's failure for good (see `Runner::record_failure`): about half
/// a minute of pauses in all.
const FAILURE_RECORDS: u32 = 5;

#[derive(Debug, Clone)]
pub struct RunnerOptions {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Longest wait for a batch to fill once its first event arrived: bounds the added latency
    /// when live, while catching up fills batches at once.
    pub batch_wait: Duration,
    pub policy: DeadLetterPolicy,
    /// How often a standby tries to become the active runner.
    pub standby_poll: Duration,
    /// Longest pause between retries after a transient failure.
    pub retry_max: Duration,
    /// For tests: set to make the next batch fail after applying and before its commit.
    pub fail_before_commit: Option<Arc<AtomicBool>>,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            batch_wait: Duration::from_millis(2),
            policy: DeadLetterPolicy::SkipAndPark,
            standby_poll: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
            fail_before_commit: None,
        }
    }
}

pub struct Runner {
    name: ProjectionName,
    store: Arc<dyn EventStore>,
    pg_config: PgConfig,
    options: RunnerOptions,
    hub: ProjectionHub,
    /// Most events in the next batch: `options.batch_size`, halved after a batch ran into the
    /// server's `statement_timeout` (retrying the same batch would time out the same way),
    /// and grown back a quarter per batch committed.
    batch_limit: AtomicUsize,
}

impl Runner {
    pub fn new(
        name: ProjectionName,
        store: Arc<dyn EventStore>,
        pg_config: PgConfig,
        options: RunnerOptions,
        hub: ProjectionHub,
    ) -> Self {
        let batch_limit = AtomicUsize::new(options.batch_size.max(1));
        Self {
            name,
            store,
            pg_config,
            options,
            hub,
            batch_limit,
        }
    }

    /// Runs until `shutdown` is cancelled (then finishes the batch in flight and returns `Ok`),
    /// or until the `Stop` policy meets a poisoned event (`Err(Stopped)`). Transient failures
    /// are retried with backoff; other failures are returned.
    pub async fn run_until_stopped(
        self,
        shutdown: CancellationToken,
    ) -> Result<(), ProjectionError> {
        let mut pause = RETRY_FIRST;
        loop {
            let started = Instant::now();
            match self.run_once(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(error)
                    if error.is_transient() || matches!(error, ProjectionError::Injected) =>
                {
                    if error.is_statement_timeout() {
                        let limit = self.batch_limit.load(Ordering::Relaxed);
                        self.batch_limit
                            .store((limit / 2).max(1), Ordering::Relaxed);
                    }
                    // A runner that worked for a while before this failure starts its backoff
                    // over; one that keeps failing at once backs off further.
                    if started.elapsed() > self.options.retry_max * 4 {
                        pause = RETRY_FIRST;
                    }
                    tracing::warn!(projection = %self.name, %error, "projection batch failed, retrying");
                    // Jittered, so that runners cut off together do not come back together.
                    let jittered = pause.mul_f64(0.75 + fastrand::f64() / 2.0);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(jittered) => {}
                    }
                    pause = (pause * 2).min(self.options.retry_max);
                }
                Err(error) => {
                    metrics::set_state(self.name, RunnerState::Failed);
                    tracing::error!(projection = %self.name, %error, "projection stopped");
                    self.record_failure(&error).await;
                    return Err(error);
                }
            }
        }
    }

    /// Records `FAILED` and why for `orderly projections status` and every process's `/readyz`
    /// (the `Stop` policy has done so in its batch already), trying [`FAILURE_RECORDS`] times
    /// a second, then two, four... apart: a runner that stopped where nothing says so would
    /// leave its read model behind while every process reads as ready. Past that it gives up
    /// with an error in the log (the database itself may be what failed).
    async fn record_failure(&self, error: &ProjectionError) {
        if matches!(error, ProjectionError::Stopped { .. }) {
            return;
        }
        let mut pause = Duration::from_secs(1);
        for attempt in 1..=FAILURE_RECORDS {
            let recorded = async {
                let client = batch::connect(&self.pg_config, "projection").await?;
                set_state(
                    &client,
                    self.name,
                    ProjectionState::Failed,
                    Some(&error.to_string()),
                )
                .await
            };
            match recorded.await {
                Ok(()) => return,
                Err(not_recorded) if attempt < FAILURE_RECORDS => {
                    tracing::warn!(projection = %self.name, error = %not_recorded, attempt, "could not record the projection's failure; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(not_recorded) => {
                    tracing::error!(projection = %self.name, error = %not_recorded, "could not record the projection's failure; its status and /readyz do not show it");
                }
            }
        }
    }

    /// Waits to become the active runner. `false` when shut down first.
    async fn acquire(
        &self,
        client: &Client,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProjectionError> {
        loop {
            let row = client
                .query_one(
                    "select pg_try_advisory_lock($1)",
                    &[&self.name.runner_lock()],
                )
                .await?;
            if row.try_get::<_, bool>(0)? {
                return Ok(true);
            }
            // Another process applies it: what this one measured while it did is stale.
            metrics::unmeasured(self.name);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.options.standby_poll) => {}
            }
        }
    }

    async fn run_once(&self, shutdown: &CancellationToken) -> Result<(), ProjectionError> {
        let mut client = match batch::connect(&self.pg_config, "projection").await {
            Ok(client) => client,
            Err(error) => {
                // Cut off from the database (a partition, say) this process applies nothing,
                // and another may take the lock meanwhile: what it measured is stale.
                metrics::set_state(self.name, RunnerState::Standby);
                metrics::unmeasured(self.name);
                return Err(error);
            }
        };
        metrics::set_state(self.name, RunnerState::Standby);
        if !self.acquire(&client, shutdown).await? {
            metrics::set_state(self.name, RunnerState::Stopped);
            return Ok(());
        }
        tracing::info!(projection = %self.name, "projection runner active");
        metrics::set_state(self.name, RunnerState::Running);
        let sampler =
            metrics::sample_while_active(self.name, self.pg_config.clone(), self.store.clone());
        let mut position = batch::checkpoint(&client, self.name, Target::Live).await?;
        // What the database says, even if behind what this process published before: a
        // failover to a replica that had not received the last batches takes them back.
        self.hub.reset(self.name, position);
        let mut state = ProjectionState::CatchingUp;
        set_state(&client, self.name, state, None).await?;
        // The whole log, even for `products`: the checkpoint then passes every position, which
        // is what a consistency token names. Read only by category, it would stop at the last
        // product event, and a reader waiting for a later token would wait in vain.
        let filter = EventFilter::All;
        let mut subscription = self.store.subscribe(position, filter.clone()).await?;
        loop {
            let limit = self.batch_limit.load(Ordering::Relaxed);
            // After a full batch the runner counts as catching up; after a quiet spell with
            // nothing new it is at the head, even if its last batch happened to be full.
            let idle = async {
                if state == ProjectionState::CatchingUp {
                    tokio::time::sleep(QUIET_AT_HEAD).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = subscription.next() => next,
                () = idle => {
                    state = ProjectionState::Running;
                    set_state(&client, self.name, state, None).await?;
                    continue;
                }
            };
            let Some(first) = first else {
                // Subscriptions end only after an error they yielded; treat the end as an outage.
                return Err(ProjectionError::Store(
                    orderly_event_store::StoreError::Unavailable(
                        "the event subscription ended".into(),
                    ),
                ));
            };
            let events =
                fill_batch(&mut subscription, first?, limit, self.options.batch_wait).await?;
            let (result, applied) = self.apply(&mut client, position, events, limit).await?;
            match result {
                BatchResult::Moved(moved) => {
                    tracing::info!(projection = %self.name, from = %position, to = %moved, "checkpoint moved elsewhere, re-reading");
                    position = moved;
                    subscription = self.store.subscribe(position, filter.clone()).await?;
                }
                BatchResult::Committed(done) => {
                    position = done.position;
                    self.committed(&client, &mut state, done, applied).await?;
                }
            }
        }
        // The sampler first, so that no sample lands after the gauges say "not measured".
        drop(sampler);
        metrics::set_state(self.name, RunnerState::Stopped);
        set_state(&client, self.name, ProjectionState::Stopped, None).await?;
        tracing::info!(projection = %self.name, %position, "projection runner stopped");
        Ok(())
    }

    /// Applies a batch gathered under `limit` at `position`: one transaction with the
    /// checkpoint, as a span in the trace of its first event.
    async fn apply(
        &self,
        client: &mut batch::Connection,
        position: Position,
        events: Vec<RecordedEvent>,
        limit: usize,
    ) -> Result<(BatchResult, Applied), ProjectionError> {
        let (size, started) = (events.len(), std::time::Instant::now());
        let fail = self
            .options
            .fail_before_commit
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::SeqCst));
        let span = tracing::info_span!("projection.batch", projection = %self.name, size);
        // A batch mixes events of many requests; it joins the trace of its first.
        if let Some(first) = events.first() {
            orderly_observability::trace_context::follow_event(&span, &first.metadata);
        }
        let traceparent = orderly_observability::trace_context::traceparent(&span);
        let result = batch::apply_batch(
            client,
            self.name,
            Target::Live,
            position,
            handlers::decode(self.name, events),
            self.options.policy,
            fail,
        )
        .instrument(span)
        .await?;
        let applied = Applied {
            limit,
            size,
            full: size >= limit,
            started,
            traceparent,
        };
        Ok((result, applied))
    }

    /// A batch committed: the batch limit grows back, the state and the batch metrics follow,
    /// waiting readers hear of the new checkpoint, and a batch that stopped on a poisoned
    /// event (under the `Stop` policy) ends the run.
    async fn committed(
        &self,
        client: &Client,
        state: &mut ProjectionState,
        done: Committed,
        applied: Applied,
    ) -> Result<(), ProjectionError> {
        let limit = applied.limit;
        let grown = (limit + limit.div_ceil(4)).min(self.options.batch_size.max(1));
        self.batch_limit.store(grown, Ordering::Relaxed);
        let update = ProjectionUpdate {
            projection: self.name.as_str().to_owned(),
            position: done.position,
            order_ids: done.order_ids,
            truncated: false,
            traceparent: applied.traceparent,
        };
        // The state first: whoever sees the new checkpoint also sees the state.
        let now = if applied.full {
            ProjectionState::CatchingUp
        } else {
            ProjectionState::Running
        };
        if now != *state && done.stopped.is_none() {
            *state = now;
            if let Err(error) = set_state(client, self.name, now, None).await {
                // The batch is committed all the same: this process's listeners hear of it
                // (the run starts over from the checkpoint after the error, and never hands
                // them this batch's orders again); other processes' followers find the
                // checkpoint moved without a notice and tell theirs to look again.
                self.hub.publish(update);
                return Err(error);
            }
        }
        let size = applied.size;
        let elapsed = applied.started.elapsed();
        metrics::record_batch(self.name, size, size.saturating_sub(done.parked), elapsed);
        if done.parked > 0 {
            tracing::warn!(projection = %self.name, parked = done.parked, "events parked as dead letters");
        }
        // This process's listeners first: the notification to other processes is a round
        // trip they need not wait for.
        self.hub.publish(update.clone());
        watch::notify(client, &update).await;
        let Some(stopped) = done.stopped else {
            return Ok(());
        };
        metrics::set_state(self.name, RunnerState::Failed);
        let failed = ProjectionState::Failed;
        set_state(client, self.name, failed, Some(&stopped.error)).await?;
        Err(ProjectionError::Stopped {
            projection: self.name.as_str().to_owned(),
            event_id: stopped.event_id,
            error: stopped.error,
        })
    }
}

/// The events after `first` that arrive within `wait`, up to `limit` in all: a batch.
async fn fill_batch(
    subscription: &mut Subscription,
    first: RecordedEvent,
    limit: usize,
    wait: Duration,
) -> Result<Vec<RecordedEvent>, ProjectionError> {
    let mut events = vec![first];
    let deadline = Instant::now() + wait;
    while events.len() < limit {
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(event)) => events.push(event?),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(events)
}

/// What the runner knew of a batch it applied, for what follows its commit.
struct Applied {
    /// The batch limit it was gathered under, and how many events it held.
    limit: usize,
    size: usize,
    full: bool,
    started: std::time::Instant,
    /// The batch's span, for the readers it wakes.
    traceparent: Option<String>,
}

/// Records the runner's state for `orderly projections status` in other processes.
async fn set_state(
    client: &Client,
    name: ProjectionName,
    state: ProjectionState,
    error: Option<&str>,
) -> Result<(), ProjectionError> {
    client
        .execute(
            "update projection_checkpoints set state = $2, last_error = $3, updated_at = now()
             where projection = $1",
            &[&name.as_str(), &state.as_str(), &error],
        )
        .await?;
    Ok(())
}

/// Where a projection's live checkpoint is, as stored.
pub async fn checkpoint(
    client: &Client,
    name: ProjectionName,
) -> Result<Position, ProjectionError> {
    batch::checkpoint(client, name, Target::Live).await
}
