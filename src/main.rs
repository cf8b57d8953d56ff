//! `orderly`: the command line. Parses arguments and settings, then hands over to the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use orderly::app::{self, App};
use orderly::settings::Settings;
use orderly::telemetry;
use orderly_platform::{Role, TokenIssuer};

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
    /// The fulfilment saga runner and its outbox worker.
    Saga {
        #[command(subcommand)]
        command: SagaCommand,
    },
    /// Apply the migrations, then serve only the command API (POST /graphql with the
    /// mutations, /healthz, /readyz); the saga runner runs elsewhere (`orderly saga run`).
    #[command(name = "command-api")]
    WriteApi,
    /// Print a bearer token signed with the configured key (ORDERLY_JWT_SECRET for HS256,
    /// ORDERLY_JWT_PRIVATE_KEY for RS256), with ORDERLY_JWT_ISSUER/AUDIENCE when set.
    Token {
        /// The subject: a customer id or user id.
        #[arg(long)]
        sub: String,
        /// A role: customer, warehouse or admin; repeat for several.
        #[arg(long = "role", required = true, value_parser = parse_role)]
        roles: Vec<Role>,
        /// How long the token is valid: 90s, 30m, 12h, 7d (a bare number is seconds).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum SagaCommand {
    /// Apply the migrations, then follow the log and drive orders to confirmation or
    /// cancellation until SIGINT or SIGTERM. Several processes may run: one leads, the others
    /// wait to take over.
    Run,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("{text:?} is not one of customer, warehouse, admin"))
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30m"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?}; use s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
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
            let saga = app::saga_runner(&settings, app::payment_gateway(&settings)?)?;
            // One signal stops both: the HTTP side drains its requests, the saga its step.
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let signal = async move {
                shutdown_signal().await;
                let _ = stop.send(true);
            };
            let (served, sagas, ()) = tokio::join!(
                app.run_until_stopped(wait(stopped.clone())),
                saga.run_until_stopped(wait(stopped)),
                signal
            );
            served?;
            sagas?;
        }
        Command::WriteApi => {
            app::migrate(&settings).await?;
            let app = App::build(&settings).await?;
            app.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Saga {
            command: SagaCommand::Run,
        } => {
            app::migrate(&settings).await?;
            let saga = app::saga_runner(&settings, app::payment_gateway(&settings)?)?;
            saga.run_until_stopped(shutdown_signal()).await?;
        }
        Command::Token { sub, roles, ttl } => {
            let issuer = TokenIssuer::new(&app::jwt_config(&settings))?;
            println!("{}", issuer.issue(&sub, &roles, ttl)?);
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
