//! `orderly`: the command line. Parses arguments and settings, then hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orderly::app::{self, App};
use orderly::settings::Settings;
use orderly::telemetry;

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
    /// SIGTERM: /healthz (alive) and /readyz (event store reachable).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
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
