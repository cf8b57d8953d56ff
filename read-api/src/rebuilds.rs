//! Projection rebuilds an admin starts over the API: each runs in a task of the serving
//! process, and its progress is kept here for `projectionRebuild` to read.
//!
//! Only this process's rebuilds are known: one started from the CLI or another server shows
//! nowhere here, and a restart forgets what ran (an interrupted rebuild resumes when started
//! again, see `orderly_projections::rebuild`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_graphql::{Enum, SimpleObject};
use chrono::{DateTime, Utc};
use orderly_event_store::EventStore;
use orderly_event_store::postgres::PgConfig;
use orderly_graphql::{ConsistencyToken, Long};
use orderly_projections::{ProjectionName, RebuildOptions, RebuildProgress, rebuild};

use crate::ReadError;

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildState {
    Running,
    /// Verified and swapped in.
    Done,
    /// The live tables stayed; starting again resumes from the shadow copy.
    Failed,
}

/// One rebuild of a projection started in this process, as far as it got.
#[derive(SimpleObject, Debug, Clone)]
pub struct ProjectionRebuild {
    pub projection: String,
    pub state: RebuildState,
    /// Events of the log read so far (a resumed rebuild counts from where it resumed).
    pub events: Long,
    /// Events of the log to read in all, when the log is in this database; with `events`, the
    /// share done.
    pub total: Option<Long>,
    /// Where the replay has reached in the log.
    pub position: Option<ConsistencyToken>,
    /// Events read per second since the start (to the end, once finished).
    pub events_per_second: f64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed. For admins only, like a dead letter's error, so it is shown as is.
    pub error: Option<String>,
}

/// A rebuild's record and the clock its rate is measured with.
struct Run {
    shown: ProjectionRebuild,
    started: Instant,
}

impl Run {
    fn record(&mut self, events: u64, total: Option<u64>) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        self.shown.events = Long(to_i64(events));
        self.shown.total = total.map(|t| Long(to_i64(t)));
        self.shown.events_per_second = events as f64 / seconds;
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Starts rebuilds in this process and remembers the last of each projection. Cheap to clone.
#[derive(Clone)]
pub struct Rebuilds {
    pg_config: PgConfig,
    /// The log itself, not the subscriptions' shared reader: a rebuild reads it page by page
    /// from its start.
    store: Arc<dyn EventStore>,
    options: RebuildOptions,
    runs: Arc<Mutex<HashMap<ProjectionName, Run>>>,
}

impl Rebuilds {
    pub fn new(pg_config: PgConfig, store: Arc<dyn EventStore>, options: RebuildOptions) -> Self {
        Self {
            pg_config,
            store,
            options,
            runs: Arc::default(),
        }
    }

    /// The last rebuild of `name` started here, if any.
    pub fn progress(&self, name: ProjectionName) -> Option<ProjectionRebuild> {
        self.lock().get(&name).map(|run| run.shown.clone())
    }

    /// Starts rebuilding `name` in a task of its own and answers with its first record;
    /// refused while one of `name` runs here.
    pub fn start(&self, name: ProjectionName) -> Result<ProjectionRebuild, ReadError> {
        let shown = {
            let mut runs = self.lock();
            if runs
                .get(&name)
                .is_some_and(|run| run.shown.state == RebuildState::Running)
            {
                return Err(ReadError::Conflict(format!(
                    "a rebuild of `{}` is already running",
                    name.as_str()
                )));
            }
            let run = Run {
                shown: ProjectionRebuild {
                    projection: name.as_str().to_owned(),
                    state: RebuildState::Running,
                    events: Long(0),
                    total: None,
                    position: None,
                    events_per_second: 0.0,
                    started_at: Utc::now(),
                    finished_at: None,
                    error: None,
                },
                started: Instant::now(),
            };
            let shown = run.shown.clone();
            runs.insert(name, run);
            shown
        };
        let this = self.clone();
        tokio::spawn(async move { this.run(name).await });
        Ok(shown)
    }

    async fn run(self, name: ProjectionName) {
        let on_progress = |p: &RebuildProgress| {
            self.update(name, |run| {
                run.record(p.events, p.total);
                run.shown.position = Some(ConsistencyToken(p.position));
            });
        };
        let outcome = rebuild(
            &self.pg_config,
            self.store.clone(),
            name,
            &self.options,
            on_progress,
        )
        .await;
        self.update(name, |run| {
            run.shown.finished_at = Some(Utc::now());
            match outcome {
                Ok(report) => {
                    tracing::info!(projection = %name, events = report.events, "rebuild swapped in");
                    run.record(report.events, Some(report.events));
                    run.shown.position = Some(ConsistencyToken(report.position));
                    run.shown.state = RebuildState::Done;
                }
                Err(error) => {
                    tracing::error!(projection = %name, %error, "rebuild failed");
                    run.shown.state = RebuildState::Failed;
                    run.shown.error = Some(error.to_string());
                }
            }
        });
    }

    fn update(&self, name: ProjectionName, change: impl FnOnce(&mut Run)) {
        if let Some(run) = self.lock().get_mut(&name) {
            change(run);
        }
    }

    /// The records stay readable after a panic elsewhere: each change leaves them whole.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProjectionName, Run>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
