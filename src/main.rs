//! `orderly`: the command line. Parses arguments and settings, then hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orderly::app::{self, App};
use orderly::read_side::{self, Projections};
use orderly::settings::Settings;
use orderly::telemetry;
use orderly_projections::{
    DeadLetterPolicy, ProjectionHub, ProjectionName, RebuildOptions, RunnerOptions,
};
use tokio_util::sync::CancellationToken;

/// Orderly, an event-sourced order engine.
///
/// Settings come from built-in defaults, then the file given by --config, then ORDERLY_*
/// environment variables (ORDERLY_DATABASE_URL, ORDERLY_EVENT_STORE, ORDERLY_HTTP_ADDR,
/// ORDERLY_LOG_FORMAT, ORDERLY_DB_POOL_SIZE, ORDERLY_KURRENTDB_URL).
#[derive(Parser)]
#[command(name = "orderly", version)]
struct Cli {
    /// A TOML settings file; its keys are the settings' names in lowercase (database_url, ...).
    #[arg(long, global = true, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations, then serve HTTP on ORDERLY_HTTP_ADDR until SIGINT or
    /// SIGTERM: /healthz (alive) and /readyz (event store reachable); the projection runners
    /// run in the same process.
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Read models: status, rebuilds, runners on their own.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// Events that projections could not apply.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The event log itself.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand)]
enum ProjectionsCommand {
    /// State, checkpoint, lag and dead letters of each projection (orders, products).
    Status,
    /// Replay the log into shadow tables while the live ones keep serving, verify, and swap
    /// them in atomically. Resumes an interrupted rebuild of the same projection.
    Rebuild {
        /// The projection: orders or products.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every projection, one after the other.
        #[arg(long)]
        all: bool,
        /// Events read and applied per transaction.
        #[arg(long, default_value_t = 5000)]
        batch_size: usize,
    },
    /// Run projection runners until SIGINT or SIGTERM (without the HTTP server). Several
    /// processes may run the same projection: one is active, the others stand by.
    Run {
        /// Projections to run (default: all).
        names: Vec<String>,
        /// Most events applied per transaction.
        #[arg(long, default_value_t = 1000, env = "ORDERLY_PROJECTION_BATCH_SIZE")]
        batch_size: usize,
        /// Stop at an event a handler cannot apply, instead of parking it and going on.
        #[arg(long)]
        stop_on_error: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Dead letters waiting for an operator (with --all, resolved ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Apply one parked event again; resolved when it applies.
    Retry { id: i64 },
    /// Mark one parked event resolved without applying it.
    Skip { id: i64 },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print the log from the start (or --from), then follow new events until Ctrl-C.
    Tail {
        /// Only this stream, e.g. order-<uuid>.
        #[arg(long)]
        stream: Option<String>,
        /// Only streams of this category, e.g. order, product, payment.
        #[arg(long)]
        category: Option<String>,
        /// Start after this position token (32 hex digits, as in consistency tokens).
        #[arg(long)]
        from: Option<String>,
        /// One JSON object per line, shaped like the GraphQL EventRecord.
        #[arg(long)]
        json: bool,
    },
}

fn projection_names(names: &[String]) -> anyhow::Result<Vec<ProjectionName>> {
    if names.is_empty() {
        return Ok(ProjectionName::ALL.to_vec());
    }
    Ok(names
        .iter()
        .map(|n| n.parse())
        .collect::<Result<Vec<ProjectionName>, _>>()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref()).context("invalid settings")?;
    telemetry::init(settings.log_format);
    tracing::debug!(?settings, "settings");
    match cli.command {
        Command::Migrate => {
            app::migrate(&settings).await?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            app::migrate(&settings).await?;
            let app = App::build(&settings).await?;
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Projections { command } => {
            let pg_config = app::pg_config(&settings)?;
            let store = app::event_store(&settings)?;
            match command {
                ProjectionsCommand::Status => read_side::print_status(&pg_config).await?,
                ProjectionsCommand::Rebuild {
                    name,
                    all: _,
                    batch_size,
                } => {
                    let names = projection_names(&name.into_iter().collect::<Vec<_>>())?;
                    let options = RebuildOptions {
                        batch_size,
                        ..RebuildOptions::default()
                    };
                    read_side::rebuild_with_progress(&pg_config, store, &names, &options).await?;
                }
                ProjectionsCommand::Run {
                    names,
                    batch_size,
                    stop_on_error,
                } => {
                    let options = RunnerOptions {
                        batch_size,
                        policy: if stop_on_error {
                            DeadLetterPolicy::Stop
                        } else {
                            DeadLetterPolicy::SkipAndPark
                        },
                        ..RunnerOptions::default()
                    };
                    let running = Projections::start(
                        store,
                        pg_config,
                        &projection_names(&names)?,
                        options,
                        ProjectionHub::new(),
                    );
                    shutdown_signal().await;
                    running.stop().await;
                }
            }
        }
        Command::Dlq { command } => {
            let pg_config = app::pg_config(&settings)?;
            match command {
                DlqCommand::List { all } => read_side::print_dead_letters(&pg_config, all).await?,
                DlqCommand::Retry { id } => {
                    let store = app::event_store(&settings)?;
                    read_side::retry_dead_letter(&pg_config, store.as_ref(), id).await?;
                }
                DlqCommand::Skip { id } => read_side::skip_dead_letter(&pg_config, id).await?,
            }
        }
        Command::Events {
            command:
                EventsCommand::Tail {
                    stream,
                    category,
                    from,
                    json,
                },
        } => {
            let store = app::event_store(&settings)?;
            let stop = CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                on_signal.cancel();
            });
            read_side::tail_events(store.as_ref(), stream, category, from, json, stop).await?;
        }
    }
    Ok(())
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
