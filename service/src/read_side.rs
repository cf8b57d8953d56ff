//! The read side as the binary runs it: projection runners beside the HTTP server or on their
//! own, and the operator commands (status, rebuild with a progress bar, dead letters, log tail).

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use orderly_event_store::postgres::PgConfig;
use orderly_event_store::{EventFilter, EventStore, Position, StreamName};
use orderly_projections::tail::{TailOptions, tail};
use orderly_projections::{
    ProjectionHub, ProjectionName, RebuildOptions, Runner, RunnerOptions, dlq, rebuild_many, status,
};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// Running projection runners; [`Projections::stop`] finishes their batches in flight.
pub struct Projections {
    hub: ProjectionHub,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Projections {
    /// Starts one runner per projection in `names`, publishing to `hub`. A runner that fails
    /// for good logs why and ends; the others go on.
    pub fn start(
        store: Arc<dyn EventStore>,
        pg_config: PgConfig,
        names: &[ProjectionName],
        options: RunnerOptions,
        hub: ProjectionHub,
    ) -> Self {
        let stop = CancellationToken::new();
        let tasks = names
            .iter()
            .map(|&name| {
                let runner = Runner::new(
                    name,
                    store.clone(),
                    pg_config.clone(),
                    options.clone(),
                    hub.clone(),
                );
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(error) = runner.run_until_stopped(stop).await {
                        tracing::error!(projection = %name, %error, "projection runner ended");
                    }
                })
            })
            .collect();
        Self { hub, stop, tasks }
    }

    /// Where the read API waits for consistency tokens and order updates.
    pub fn hub(&self) -> &ProjectionHub {
        &self.hub
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One connection to the database `pg_config` names, for an operator command.
pub(crate) async fn connect(pg_config: &PgConfig) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = pg_config
        .connect(NoTls)
        .await
        .context("cannot connect to the database")?;
    tokio::spawn(connection);
    Ok(client)
}

/// `orderly projections status`: one line per projection.
pub async fn print_status(pg_config: &PgConfig) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    println!(
        "{:<10} {:<12} {:<34} {:>10} {:>10} {:>12}",
        "name", "state", "position", "lag events", "lag ms", "dead letters"
    );
    for s in status(&client).await? {
        let show = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<10} {:<12} {:<34} {:>10} {:>10} {:>12}",
            s.name.as_str(),
            s.state.as_str(),
            s.position.to_string(),
            show(s.lag_events),
            show(s.lag_ms),
            s.dead_letters
        );
        if let Some(error) = s.last_error {
            println!("  last error: {error}");
        }
        if let Some(at) = s.rebuild_position {
            println!("  shadow copy being rebuilt, at {at}");
        }
    }
    print_horizon(&client).await;
    Ok(())
}

/// A line on what holds the log's horizon back, when events wait behind an open transaction:
/// every projection, subscription and saga lane waits with them. Nothing where the log is not
/// in this database (the KurrentDB store).
async fn print_horizon(client: &tokio_postgres::Client) {
    let Ok(horizon) = orderly_event_store::postgres::horizon(client).await else {
        return;
    };
    if horizon.held_back_events == 0 {
        println!("log horizon: no committed event waits");
        return;
    }
    let by = horizon
        .oldest_transaction
        .map_or_else(|| "an open transaction".to_owned(), |t| t.to_string());
    println!(
        "log horizon: HELD for {:.1} s, {} committed events wait behind {by}; \
         every reader of the log waits until it ends",
        horizon.held_back_seconds, horizon.held_back_events
    );
}

/// `orderly projections rebuild`: one pass over the log for all `names`, with a progress bar,
/// then each verified and swapped in.
pub async fn rebuild_with_progress(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    names: &[ProjectionName],
    options: &RebuildOptions,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:40}] {pos}/{len} events, {per_sec}, ETA {eta}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let label: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    bar.set_prefix(label.join("+"));
    let reports = rebuild_many(pg_config, store, names, options, |p| {
        if let Some(total) = p.total {
            bar.set_length(total);
        }
        bar.set_position(p.events);
    })
    .await
    .context("rebuild failed; run it again to resume")?;
    bar.finish();
    for report in reports {
        let rows: Vec<String> = report
            .rows
            .iter()
            .map(|(table, n)| format!("{table} {n}"))
            .collect();
        println!(
            "{}: {} events in {:.1}s (replay {:.1}s, {:.0}/s overall){}, swapped in at {}; rows: {}",
            report.projection,
            report.events,
            report.elapsed.as_secs_f64(),
            report.replay.as_secs_f64(),
            report.events as f64 / report.elapsed.as_secs_f64().max(1e-9),
            if report.resumed { ", resumed" } else { "" },
            report.position,
            rows.join(", ")
        );
    }
    Ok(())
}

/// `orderly dlq list`.
pub async fn print_dead_letters(
    pg_config: &PgConfig,
    include_resolved: bool,
) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    let letters = dlq::list(&client, None, include_resolved).await?;
    if letters.is_empty() {
        println!("no dead letters");
    }
    for d in letters {
        println!(
            "{} {} {}@{} {} {} parked {}{}\n  {}",
            d.dead_letter_id,
            d.projection,
            d.stream,
            d.version,
            d.event_type,
            d.position,
            d.parked_at.to_rfc3339(),
            d.resolution.map(|r| format!(", {r}")).unwrap_or_default(),
            d.error
        );
    }
    Ok(())
}

/// `orderly dlq retry ID`.
pub async fn retry_dead_letter(
    pg_config: &PgConfig,
    store: &dyn EventStore,
    id: i64,
) -> anyhow::Result<()> {
    let mut client = orderly_projections::connect(pg_config, "dead-letter retry")
        .await
        .context("cannot connect to the database")?;
    match dlq::retry(&mut client, store, id).await? {
        dlq::RetryOutcome::Applied => println!("dead letter {id} applied and resolved"),
        dlq::RetryOutcome::FailedAgain(error) => {
            anyhow::bail!("dead letter {id} failed again: {error}")
        }
        dlq::RetryOutcome::Superseded(why) => {
            anyhow::bail!("dead letter {id} not applied: {why}")
        }
    }
    Ok(())
}

/// `orderly dlq skip ID`.
pub async fn skip_dead_letter(pg_config: &PgConfig, id: i64) -> anyhow::Result<()> {
    let client = connect(pg_config).await?;
    dlq::skip(&client, id).await?;
    println!("dead letter {id} skipped");
    Ok(())
}

/// `orderly events tail`: stdout until `shutdown`.
pub async fn tail_events(
    store: &dyn EventStore,
    stream: Option<String>,
    category: Option<String>,
    from: Option<String>,
    json: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let filter = match (stream, category) {
        (Some(_), Some(_)) => anyhow::bail!("give --stream or --category, not both"),
        (Some(s), None) => EventFilter::Stream(StreamName::parse(s)?),
        (None, Some(c)) => EventFilter::Category(c),
        (None, None) => EventFilter::All,
    };
    let from = match from {
        Some(token) => token.parse::<Position>()?,
        None => Position::START,
    };
    let options = TailOptions {
        filter,
        from,
        json,
        limit: None,
    };
    let mut out = std::io::stdout();
    tail(store, &options, &mut out, shutdown).await?;
    out.flush()?;
    Ok(())
}
