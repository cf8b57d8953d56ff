//! `/healthz` (the process answers) and `/readyz` (its dependencies answer and, in a process
//! that runs projections, none of them has failed), and the same checks as `orderly_readiness_check` gauges, refreshed in the
//! background so that a process nobody probes still shows why it would not be ready. The
//! background sampler also reports what holds the log's horizon back.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use orderly_event_store::EventStore;
use orderly_observability::metrics::{record_horizon, record_readiness};
use orderly_projections::ProjectionState;
use serde_json::{Map, Value, json};

/// How long a readiness check may wait on a dependency before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the gauges are refreshed without a probe (METRICS.md promises at least every 10 s).
const SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// What the checks need; cheap to clone.
#[derive(Clone)]
pub struct Health {
    pub store: Arc<dyn EventStore>,
    /// Connections to the read models' database, for the checks only (two at most).
    pub read_db: Pool,
    /// Whether the log is in that database too (the PostgreSQL store): then the sampler also
    /// reports what holds the log's horizon back.
    pub log_in_read_db: bool,
    /// Whether a failed projection makes this process unready: only where projections run
    /// (`serve`, `projections run`). An API or a saga process serves as well with a read
    /// model stopped (reads say how stale they are); unready, every replica would leave its
    /// load balancer over one read model's bad event. The check is shown either way.
    pub projections_gate_readiness: bool,
}

/// One check's verdict: `Err` says why it failed, fit for an operator.
type Verdict = Result<(), String>;

pub struct Readiness {
    pub event_store: Verdict,
    pub read_database: Verdict,
    pub projections: Verdict,
    /// See [`Health::projections_gate_readiness`].
    pub projections_gate: bool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.gating().all(|(_, verdict)| verdict.is_ok())
    }

    /// The checks this process's readiness depends on.
    fn gating(&self) -> impl Iterator<Item = (&'static str, &Verdict)> {
        self.checks()
            .into_iter()
            .filter(|(name, _)| self.projections_gate || *name != "projections")
    }

    fn checks(&self) -> [(&'static str, &Verdict); 3] {
        [
            ("event_store", &self.event_store),
            ("read_database", &self.read_database),
            ("projections", &self.projections),
        ]
    }

    /// `{"status": "ready" | "unavailable", "reason": ..., "checks": {name: "ok" | why}}`.
    pub fn body(&self) -> Value {
        let mut checks = Map::new();
        for (name, verdict) in self.checks() {
            let shown = match verdict {
                Ok(()) => "ok".to_owned(),
                Err(why) => why.clone(),
            };
            checks.insert(name.to_owned(), Value::String(shown));
        }
        let reasons: Vec<&str> = self
            .gating()
            .filter_map(|(_, verdict)| verdict.as_ref().err().map(String::as_str))
            .collect();
        if reasons.is_empty() {
            json!({ "status": "ready", "checks": checks })
        } else {
            json!({ "status": "unavailable", "reason": reasons.join("; "), "checks": checks })
        }
    }
}

impl Health {
    /// Runs every check (at most `READY_TIMEOUT` each, in parallel) and publishes the verdicts
    /// as gauges.
    pub async fn check(&self) -> Readiness {
        let (event_store, read_side) = tokio::join!(self.check_store(), self.check_read_side());
        let (read_database, projections) = read_side;
        let readiness = Readiness {
            event_store,
            read_database,
            projections,
            projections_gate: self.projections_gate_readiness,
        };
        for (name, verdict) in readiness.checks() {
            record_readiness(name, verdict.is_ok());
        }
        readiness
    }

    async fn check_store(&self) -> Verdict {
        match tokio::time::timeout(READY_TIMEOUT, self.store.head()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                tracing::warn!(%error, "not ready: event store");
                Err("event store unreachable".to_owned())
            }
            Err(_) => Err("event store did not answer in time".to_owned()),
        }
    }

    /// The read database, then the projections' states in it; without the database the
    /// states are unknown, which fails that check too.
    async fn check_read_side(&self) -> (Verdict, Verdict) {
        let unknown = || Err("projection states unknown (read database unreachable)".to_owned());
        let statuses = tokio::time::timeout(READY_TIMEOUT, async {
            let client = self
                .read_db
                .get()
                .await
                .map_err(|e| orderly_event_store::postgres::describe_pool(&e))?;
            orderly_projections::status(&client)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let statuses = match statuses {
            Ok(Ok(statuses)) => statuses,
            Ok(Err(error)) => {
                tracing::warn!(%error, "not ready: read database");
                return (Err("read database unreachable".to_owned()), unknown());
            }
            Err(_) => {
                return (
                    Err("read database did not answer in time".to_owned()),
                    unknown(),
                );
            }
        };
        let failed: Vec<String> = statuses
            .iter()
            .filter(|status| status.state == ProjectionState::Failed)
            .map(|status| match &status.last_error {
                Some(error) => format!("projection {} failed: {error}", status.name.as_str()),
                None => format!("projection {} failed", status.name.as_str()),
            })
            .collect();
        let projections = if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        };
        (Ok(()), projections)
    }

    /// Refreshes the readiness gauges until the task is dropped.
    pub async fn sample_forever(self) {
        let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
        loop {
            ticks.tick().await;
            self.check().await;
            if self.log_in_read_db {
                self.sample_horizon().await;
            }
        }
    }

    /// `orderly_log_horizon_age_seconds` and `orderly_db_oldest_transaction_seconds`; the
    /// gauges keep their last values while the database does not answer.
    async fn sample_horizon(&self) {
        let sampled = tokio::time::timeout(READY_TIMEOUT, async {
            let client = self
                .read_db
                .get()
                .await
                .map_err(|e| orderly_event_store::postgres::describe_pool(&e))?;
            orderly_event_store::postgres::horizon(&client)
                .await
                .map_err(|e| orderly_event_store::postgres::describe(&e))
        })
        .await;
        match sampled {
            Ok(Ok(horizon)) => record_horizon(
                horizon.held_back_seconds,
                horizon.oldest_transaction.map_or(0.0, |t| t.age_seconds),
            ),
            Ok(Err(error)) => tracing::debug!(%error, "log horizon not sampled"),
            Err(_) => tracing::debug!("log horizon not sampled in time"),
        }
    }

    /// `GET /healthz` and `GET /readyz`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(self)
    }
}

/// Alive: the process answers. Says nothing about dependencies.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: the dependencies answer and, where projections run, none has failed, so traffic may
/// come.
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let readiness = health.check().await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness.body()))
}
