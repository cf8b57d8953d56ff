//! What the subcommands of `orderly` do once `main.rs` has parsed them, one function each. Those
//! that serve until SIGINT or SIGTERM check the database's connections, apply the migrations
//! (all but `projections run`), build their part of the service ([`App::build_part`]) and run
//! it, in that order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use orderly_command_api::saga::SagaRunner;
use orderly_event_store::EventStore;
use orderly_event_store::postgres::PgConfig;
use orderly_graphql::{Role, TokenIssuer};
use orderly_projections::{ProjectionHub, ProjectionName, RebuildOptions, RunnerOptions};
use tokio_util::sync::CancellationToken;

use crate::app::{self, App, ConnectionBudget, Part};
use crate::read_side::{self, Projections};
use crate::seed::{self, SeedOptions};
use crate::settings::Settings;

/// `orderly migrate`: applies the migrations, after moving the log's clock past its newest
/// event when `rebase_log`.
pub async fn migrate(settings: &Settings, rebase_log: bool) -> anyhow::Result<()> {
    if rebase_log {
        let offset = app::rebase_log(settings).await?;
        println!("the log's clock is now {offset} ahead of this cluster's transaction ids");
    }
    app::migrate(settings).await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// `orderly serve`: everything in one process, the saga runner included.
pub async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let budget = ConnectionBudget::of(settings, Part::Everything, true);
    app::check_connections(settings, &budget).await?;
    app::migrate(settings).await?;
    let app = App::build(settings).await?;
    // One reader of the log for the saga and the projections.
    let saga = app::saga_runner(settings, app::payment_gateway(settings)?)?.following(app.log());
    serve_with_saga(app, saga, shutdown_signal()).await
}

/// `orderly command-api` (`Part::Commands`), `orderly read-api` (`Part::Reads`): `part` alone,
/// with the saga and projection runners in other processes.
pub async fn serve_part(settings: &Settings, part: Part) -> anyhow::Result<()> {
    app::check_connections(settings, &ConnectionBudget::of(settings, part, false)).await?;
    app::migrate(settings).await?;
    let app = App::build_part(settings, part).await?;
    app.run_until_stopped(shutdown_signal()).await
}

/// `orderly saga run`: the saga runner, with only the probes served beside it.
pub async fn run_saga(settings: &Settings) -> anyhow::Result<()> {
    let budget = ConnectionBudget::of(settings, Part::Probes, true);
    app::check_connections(settings, &budget).await?;
    app::migrate(settings).await?;
    // First: it installs the metrics recorder, which the gateway's breaker gauge needs.
    let probes = App::build_part(settings, Part::Probes).await?;
    let saga = app::saga_runner(settings, app::payment_gateway(settings)?)?;
    serve_with_saga(probes, saga, shutdown_signal()).await
}

/// `orderly projections run`: runners for the projections `names` (all when empty) over
/// `store`, with only the probes served beside them.
pub async fn run_projections(
    settings: &Settings,
    pg_config: PgConfig,
    store: Arc<dyn EventStore>,
    names: &[String],
    options: RunnerOptions,
) -> anyhow::Result<()> {
    let names = projection_names(names)?;
    // The runners read the log through a store of their own, beside the one the probes check.
    let budget = ConnectionBudget::of(settings, Part::ProjectionProbes, false)
        .with_pool("projections", 2 * names.len())
        .with_log_pool(
            settings,
            "projections' event store",
            settings.store.pool_size.max(1) + 2,
        );
    app::check_connections(settings, &budget).await?;
    let probes = App::build_part(settings, Part::ProjectionProbes).await?;
    // The runners share one reader of the log.
    let log = app::shared_reader(store);
    let running = Projections::start(log, pg_config, &names, options, ProjectionHub::new());
    probes.run_until_stopped(shutdown_signal()).await?;
    running.stop().await;
    Ok(())
}

/// `orderly projections rebuild`: the projections `names` (all when empty), with a progress
/// bar.
pub async fn rebuild_projections(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    names: &[String],
    options: &RebuildOptions,
) -> anyhow::Result<()> {
    let names = projection_names(names)?;
    read_side::rebuild_with_progress(pg_config, store, &names, options).await
}

/// The projections `names` names, or all of them when it is empty.
fn projection_names(names: &[String]) -> anyhow::Result<Vec<ProjectionName>> {
    if names.is_empty() {
        return Ok(ProjectionName::ALL.to_vec());
    }
    Ok(names
        .iter()
        .map(|n| n.parse())
        .collect::<Result<Vec<ProjectionName>, _>>()?)
}

/// `orderly token`: prints a bearer token for `sub` with `roles`, valid for `ttl`.
pub fn print_token(
    settings: &Settings,
    sub: &str,
    roles: &[Role],
    ttl: Duration,
) -> anyhow::Result<()> {
    let issuer = TokenIssuer::new(&app::jwt_config(settings))?;
    println!("{}", issuer.issue(sub, roles, ttl)?);
    Ok(())
}

/// `orderly console-link`: prints a link to the operator console at `base` (by default the
/// HTTP address) that signs `sub` in as an admin for `ttl`.
pub fn print_console_link(
    settings: &Settings,
    sub: &str,
    ttl: Duration,
    base: Option<String>,
) -> anyhow::Result<()> {
    let issuer = TokenIssuer::new(&app::jwt_config(settings))?;
    let token = issuer.issue(sub, &[Role::Admin], ttl)?;
    let base = base.unwrap_or_else(|| format!("http://{}", settings.http.addr));
    println!("{}/console#token={token}", base.trim_end_matches('/'));
    Ok(())
}

/// `orderly seed`: applies the migrations, writes the workload and prints what it wrote.
pub async fn seed(settings: &Settings, options: &SeedOptions) -> anyhow::Result<()> {
    app::migrate(settings).await?;
    println!("seed {}", options.seed);
    let report = seed::run(settings, options).await?;
    println!(
        "{} products registered; {} orders placed ({} already there), {} cancelled by \
         their customer; after the saga {} confirmed, {} cancelled, {} unsettled; \
         {} shipped, {} delivered",
        report.products,
        report.orders,
        report.replayed,
        report.cancelled_by_customers,
        report.confirmed,
        report.cancelled,
        report.unsettled,
        report.shipped,
        report.delivered
    );
    Ok(())
}

/// `orderly events tail`: prints the log as [`read_side::tail_events`] does until SIGINT or
/// SIGTERM.
pub async fn tail_events(
    settings: &Settings,
    stream: Option<String>,
    category: Option<String>,
    from: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let store = app::event_store(settings)?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    read_side::tail_events(store.as_ref(), stream, category, from, json, stop).await
}

/// Serves `app` and runs `saga` until `shutdown` completes (SIGINT or SIGTERM): see
/// [`serve_beside`].
async fn serve_with_saga(
    app: App,
    saga: SagaRunner,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    serve_beside(app, shutdown, |stop| saga.run_until_stopped(stop)).await
}

/// Serves `app` and runs `worker` (the saga runner; it gets the future that tells it to stop)
/// until `shutdown` completes. They stop in the order the data flows: the HTTP side first (no
/// new commands; the requests in flight are answered), then the worker (no new events), then
/// the projections once they have applied the log to its head. A worker that ends by itself
/// stops the whole process with an error, so an orchestrator restarts it instead of keeping a
/// process that looks alive and settles nothing.
pub async fn serve_beside<W, F>(
    app: App,
    shutdown: impl Future<Output = ()> + Send,
    worker: W,
) -> anyhow::Result<()>
where
    W: FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let (worker_stopped, worker_done) = tokio::sync::oneshot::channel::<()>();
    // The worker stops once the HTTP side has answered its last request: a placement still in
    // flight at the signal is then settled now, not at the next start.
    let (http_stopped, http_done) = tokio::sync::oneshot::channel::<()>();
    let signal = {
        let stopped = stopped.clone();
        async {
            tokio::select! {
                () = shutdown => {}
                () = wait(stopped) => {}
            }
            let _ = stop.send(true);
        }
    };
    let working = async {
        let ran = worker(Box::pin(async {
            let _ = http_done.await;
        }))
        .await;
        if !*stopped.borrow() {
            tracing::error!("saga runner ended unasked; stopping the process");
            let _ = stop.send(true);
        }
        let _ = worker_stopped.send(());
        ran.and_then(|()| {
            if *stopped.borrow() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("saga runner ended unasked"))
            }
        })
    };
    let (served, worked, ()) = tokio::join!(
        app.run_until_stopped_after(wait(stopped.clone()), || async {
            let _ = http_stopped.send(());
            let _ = worker_done.await;
        }),
        working,
        signal
    );
    served?;
    worked
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what orchestrators send).
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
