//! The service as one value: built from settings, bound to its address, run until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use orderly_event_store::EventStore;
use orderly_event_store::kurrentdb::KurrentDbEventStore;
use orderly_event_store::postgres::{PgConfig, PgEventStore, PgStoreOptions};
use serde_json::json;
use tokio::net::TcpListener;

use crate::read_side::Projections;
use crate::settings::{EventStoreKind, Settings};
use orderly_projections::{ProjectionHub, ProjectionName, RunnerOptions};

/// How long a readiness probe may wait on a dependency before calling it unreachable.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct App {
    listener: TcpListener,
    router: Router,
    /// For the projection runners `run_until_stopped` starts beside the server.
    store: Arc<dyn EventStore>,
    pg_config: PgConfig,
    hub: ProjectionHub,
}

#[derive(Clone)]
struct AppState {
    store: Arc<dyn EventStore>,
}

impl App {
    /// Connects to the stores (lazily: an unreachable database shows on `/readyz`, it does not
    /// stop the start) and binds the HTTP address (port 0 picks a free one).
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let store = event_store(settings)?;
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(AppState {
                store: store.clone(),
            });
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http_addr))?;
        Ok(Self {
            listener,
            router,
            store,
            pg_config: pg_config(settings)?,
            hub: ProjectionHub::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Where the in-process projection runners say how far they are and which orders they
    /// touched: what the read API waits on for consistency tokens and `orderUpdated`.
    pub fn projection_hub(&self) -> ProjectionHub {
        self.hub.clone()
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "serving");
        let projections = Projections::start(
            self.store,
            self.pg_config,
            &ProjectionName::ALL,
            RunnerOptions::default(),
            self.hub,
        );
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await?;
        projections.stop().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The event store the settings choose.
pub fn event_store(settings: &Settings) -> anyhow::Result<Arc<dyn EventStore>> {
    match settings.event_store {
        EventStoreKind::Postgres => {
            let options = PgStoreOptions {
                pool_size: settings.db_pool_size,
                ..Default::default()
            };
            Ok(Arc::new(PgEventStore::new(pg_config(settings)?, options)?))
        }
        EventStoreKind::Kurrentdb => {
            let Some(url) = settings.kurrentdb_url.as_deref() else {
                bail!("event_store = kurrentdb needs ORDERLY_KURRENTDB_URL");
            };
            Ok(Arc::new(KurrentDbEventStore::connect(url)?))
        }
    }
}

pub fn pg_config(settings: &Settings) -> anyhow::Result<PgConfig> {
    settings
        .database_url
        .parse()
        .context("ORDERLY_DATABASE_URL is not a valid PostgreSQL connection string")
}

/// Applies every migration the product needs.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let config = pg_config(settings)?;
    // The log lives in PostgreSQL only with the default store; KurrentDB keeps its own.
    if settings.event_store == EventStoreKind::Postgres {
        orderly_event_store::postgres::migrate(&config)
            .await
            .context("event store migrations failed")?;
    }
    orderly_projections::migrate(&config)
        .await
        .context("read-model migrations failed")?;
    Ok(())
}

/// Alive: the process answers. Says nothing about dependencies.
async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// Ready: the dependencies answer, so traffic may come.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(READY_TIMEOUT, state.store.head()).await {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({ "status": "ready" }))),
        Ok(Err(error)) => {
            tracing::warn!(%error, "not ready: event store");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable", "reason": "event store unreachable" })),
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({ "status": "unavailable", "reason": "event store did not answer in time" }),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choosing_kurrentdb_without_its_url_is_a_clear_error() {
        let settings = Settings {
            event_store: EventStoreKind::Kurrentdb,
            ..Default::default()
        };
        let error = event_store(&settings)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("ORDERLY_KURRENTDB_URL"), "{error}");
    }

    #[tokio::test]
    async fn choosing_kurrentdb_with_a_url_builds_that_store() {
        let settings = Settings {
            event_store: EventStoreKind::Kurrentdb,
            kurrentdb_url: Some("kurrentdb://127.0.0.1:2113?tls=false".into()),
            ..Default::default()
        };
        assert!(event_store(&settings).is_ok());
    }
}
