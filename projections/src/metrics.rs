//! The projection series of `deploy/METRICS.md`. Every runner exports its state; only the one
//! holding a projection's lock exports its lag, batches and dead letters, so that series from
//! several processes never disagree.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use orderly_event_store::{EventStore, Position, StoreError};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::batch::{self, Target};
use crate::dlq;
use crate::model::ProjectionName;
use crate::status;

/// How often the active runner refreshes lag and dead letters.
const SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// The runner's state in this process, as `orderly_projection_state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunnerState {
    Running,
    Standby,
    Stopped,
    Failed,
}

const STATES: [(&str, Option<RunnerState>); 5] = [
    ("running", Some(RunnerState::Running)),
    ("standby", Some(RunnerState::Standby)),
    // Always 0: a rebuild (from the CLI or the console) fills shadow tables beside the runner,
    // which stays `running` meanwhile.
    ("rebuilding", None),
    ("stopped", Some(RunnerState::Stopped)),
    ("failed", Some(RunnerState::Failed)),
];

/// One gauge per state, 1 for `now` and 0 for the others, so a change never leaves two at 1.
/// A runner that stopped or failed measures nothing any more ([`unmeasured`]).
pub(crate) fn set_state(name: ProjectionName, now: RunnerState) {
    if matches!(now, RunnerState::Stopped | RunnerState::Failed) {
        unmeasured(name);
    }
    for (label, state) in STATES {
        let value = if state == Some(now) { 1.0 } else { 0.0 };
        metrics::gauge!("orderly_projection_state", "projection" => name.as_str(), "state" => label)
            .set(value);
    }
}

/// One committed batch of `size` events, `applied` of them applied (the rest parked).
pub(crate) fn record_batch(name: ProjectionName, size: usize, applied: usize, took: Duration) {
    let projection = name.as_str();
    metrics::histogram!("orderly_projection_batch_size", "projection" => projection)
        .record(size as f64);
    metrics::histogram!("orderly_projection_batch_duration_seconds", "projection" => projection)
        .record(took.as_secs_f64());
    metrics::counter!("orderly_projection_events_applied_total", "projection" => projection)
        .increment(applied as u64);
}

/// Samples lag and dead letters of `name` every 5 s on a connection of its own, until the
/// returned guard is dropped (the runner lost or gave up the lock). `store` is the log the
/// runner follows, asked for the lag where the log is not in the read models' database.
pub(crate) fn sample_while_active(
    name: ProjectionName,
    pg_config: tokio_postgres::Config,
    store: Arc<dyn EventStore>,
) -> SamplerGuard {
    SamplerGuard(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
        // One connection while it works; a new one after a failure.
        let mut connected: Option<(tokio_postgres::Client, JoinHandle<()>)> = None;
        loop {
            ticks.tick().await;
            if connected.is_none() {
                match pg_config.connect(NoTls).await {
                    Ok((client, connection)) => {
                        let driver = tokio::spawn(async move {
                            let _ = connection.await;
                        });
                        connected = Some((client, driver));
                    }
                    Err(error) => {
                        tracing::debug!(projection = %name, %error, "projection lag not sampled");
                        continue;
                    }
                }
            }
            if let Some((client, _)) = &connected
                && let Err(error) = sample(name, client, store.as_ref()).await
            {
                tracing::debug!(projection = %name, %error, "projection lag not sampled");
                if let Some((_, driver)) = connected.take() {
                    driver.abort();
                }
            }
        }
    }))
}

async fn sample(
    name: ProjectionName,
    client: &tokio_postgres::Client,
    store: &dyn EventStore,
) -> Result<(), crate::ProjectionError> {
    let position = batch::checkpoint(client, name, Target::Live).await?;
    let projection = name.as_str();
    if let (Some(events), Some(ms)) = status::lag(client, name, position).await {
        metrics::gauge!("orderly_projection_lag_events", "projection" => projection)
            .set(events as f64);
        metrics::gauge!("orderly_projection_lag_seconds", "projection" => projection)
            .set(ms as f64 / 1000.0);
    } else {
        // The log is not in this database (KurrentDB): its store tells the age of the oldest
        // event not yet applied in one read. Counting them would read every one, so the count
        // is left out there.
        let age = oldest_unapplied_age(store, name, position).await?;
        metrics::gauge!("orderly_projection_lag_seconds", "projection" => projection).set(age);
    }
    let parked = dlq::count(client, Some(name)).await?;
    metrics::gauge!("orderly_dead_letters", "projection" => projection).set(parked as f64);
    Ok(())
}

/// Seconds since the first event after `position` that projection `name` reads was recorded
/// (now minus its `recorded_at`); 0 when there is none, so an idle log is not lag.
async fn oldest_unapplied_age(
    store: &dyn EventStore,
    name: ProjectionName,
    position: Position,
) -> Result<f64, StoreError> {
    let next = store.read_all(position, &name.filter(), 1).await?;
    Ok(next.first().map_or(0.0, |event| {
        (Utc::now() - event.recorded_at).as_seconds_f64().max(0.0)
    }))
}

/// Stops the sampler with the runner's leadership.
pub(crate) struct SamplerGuard(JoinHandle<()>);

impl Drop for SamplerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks `name`'s lag and dead-letter gauges as not measured in this process (NaN), once its
/// runner is not applying the projection: a standby that could not take the lock, a runner
/// that stopped or failed. A process that lost the lock and lives on would otherwise export
/// the values it last measured for good, and queries and alerts take the highest value across
/// processes (`max` passes over NaN where another process has a value). Not after a transient
/// failure the runner recovers from by taking the lock back: a gap there would only reset the
/// lag alerts' `for`.
pub(crate) fn unmeasured(name: ProjectionName) {
    let projection = name.as_str();
    for gauge in [
        "orderly_projection_lag_events",
        "orderly_projection_lag_seconds",
        "orderly_dead_letters",
    ] {
        metrics::gauge!(gauge, "projection" => projection).set(f64::NAN);
    }
}

#[cfg(test)]
mod tests {
    use orderly_event_store::memory::MemoryEventStore;
    use orderly_event_store::{ExpectedVersion, NewEvent, StreamName};
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn the_age_read_from_the_store_is_that_of_the_first_event_not_yet_applied() {
        let store = MemoryEventStore::new();
        let at_start = oldest_unapplied_age(&store, ProjectionName::Products, Position::START);
        assert_eq!(at_start.await.unwrap(), 0.0, "an empty log is no lag");
        let append = async |stream: &str| {
            let stream = StreamName::parse(stream).unwrap();
            let event = NewEvent::new("Registered", json!({}));
            let appended = store.append(&stream, ExpectedVersion::Any, vec![event]);
            appended.await.unwrap()
        };
        // An order event first, which the products projection does not read.
        append("order-1").await;
        let product = append("product-TEA").await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let behind = oldest_unapplied_age(&store, ProjectionName::Products, Position::START)
            .await
            .unwrap();
        assert!((0.05..60.0).contains(&behind), "{behind}");
        let caught_up = oldest_unapplied_age(&store, ProjectionName::Products, product.position);
        assert_eq!(caught_up.await.unwrap(), 0.0);
    }
}
