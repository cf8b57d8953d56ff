//! Live lag: how long from an append's commit until the `orders` projection has applied it,
//! at half the maximum append rate, with the runners in this process (as `orderly serve`).
//!
//! 0. Prefill: the writers below run flat out for `prefill_seconds`, unmeasured, then
//!    `analyze`, so the phases measure a log with a history and plans made for it.
//! 1. Maximum rate: `writers` tasks append workload decisions (through the domain's deciders,
//!    each writer its own SKUs and customers) flat out for `seconds`, runners running; then
//!    `analyze` again, as autovacuum would after such growth.
//! 2. Lag: the same writers paced to half that rate for `seconds`. Each append's position and
//!    return time are noted; when the `orders` checkpoint (which passes every event of the log)
//!    reaches a position, the lag of every append at or below it is recorded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{EventStore, Position, SubscriptionOptions};
use orderly_projections::workload::{Workload, WorkloadOptions};
use orderly_projections::{ProjectionHub, ProjectionName, Runner, RunnerOptions};
use tokio_util::sync::CancellationToken;

use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of each phase (maximum rate, then paced).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of writing before the first phase, not measured: the log and read models then
    /// hold a history, with planner statistics, as on a server that has been running.
    #[arg(long, default_value_t = 5)]
    prefill_seconds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Longest pause of the runners' subscription while newer events wait behind a
    /// transaction in flight (the store's default is 50).
    #[arg(long, default_value_t = 50)]
    held_back_max_ms: u64,
}

/// Appends not yet seen applied: position and the moment the append returned.
type Pending = Arc<Mutex<Vec<(Position, Instant)>>>;

/// Appends one workload decision; returns its position.
async fn append_next(store: &dyn EventStore, workload: &mut Workload) -> anyhow::Result<Position> {
    Ok(workload.next_append().append_to(store).await?.position)
}

/// Runs the writers for `seconds`, each appending at most one decision per `pace` (zero: flat
/// out); returns how many appends were made.
async fn write(
    store: Arc<PgEventStore>,
    workloads: Vec<Workload>,
    seconds: u64,
    pace: Duration,
    pending: Option<Pending>,
) -> anyhow::Result<(u64, Vec<Workload>)> {
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks = workloads.into_iter().map(|mut workload| {
        let store = store.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut next = Instant::now();
            while Instant::now() < end {
                let position = append_next(store.as_ref(), &mut workload).await?;
                if let Some(pending) = &pending {
                    pending
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .push((position, Instant::now()));
                }
                n += 1;
                next += pace;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            anyhow::Ok((n, workload))
        })
    });
    let mut total = 0;
    let mut back = Vec::new();
    for task in futures::future::join_all(tasks).await {
        let (n, workload) = task??;
        total += n;
        back.push(workload);
    }
    Ok((total, back))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = report::read_side_database("bench-lag").await?;
    println!("# live lag benchmark\n");
    println!("- machine: {}", report::machine());
    let options = PgStoreOptions {
        pool_size: args.writers + 4,
        subscription: SubscriptionOptions {
            held_back_max: Duration::from_millis(args.held_back_max_ms),
            ..SubscriptionOptions::default()
        },
        ..Default::default()
    };
    let store = Arc::new(PgEventStore::new(db.config().clone(), options)?);
    let hub = ProjectionHub::new();
    let stop = CancellationToken::new();
    let runners: Vec<_> = ProjectionName::ALL
        .into_iter()
        .map(|name| {
            let runner = Runner::new(
                name,
                store.clone(),
                db.config().clone(),
                RunnerOptions::default(),
                hub.clone(),
            );
            tokio::spawn(runner.run_until_stopped(stop.clone()))
        })
        .collect();
    let workloads: Vec<Workload> = (0..args.writers)
        .map(|i| {
            Workload::new(WorkloadOptions {
                seed: 100 + i as u64,
                prefix: format!("W{i}-"),
                ..WorkloadOptions::default()
            })
        })
        .collect();

    let (_, workloads) = write(
        store.clone(),
        workloads,
        args.prefill_seconds,
        Duration::ZERO,
        None,
    )
    .await?;
    report::analyze(&db).await?;
    let (appends, workloads) =
        write(store.clone(), workloads, args.seconds, Duration::ZERO, None).await?;
    report::analyze(&db).await?;
    let max_rate = appends as f64 / args.seconds as f64;
    println!(
        "- maximum append rate with runners on: {max_rate:.0} appends/s ({} writers)",
        args.writers
    );

    let target = max_rate / 2.0;
    let pace = Duration::from_secs_f64(args.writers as f64 / target.max(1.0));
    let pending: Pending = Arc::new(Mutex::new(Vec::new()));
    let mut histogram = report::histogram();
    let mut updates = hub.updates();
    let watcher_pending = pending.clone();
    let watcher = tokio::spawn(async move {
        let mut histogram = report::histogram();
        while let Ok(update) = updates.recv().await {
            if update.projection != ProjectionName::Orders.as_str() {
                continue;
            }
            let now = Instant::now();
            let Ok(mut pending) = watcher_pending.lock() else {
                break;
            };
            pending.retain(|(position, at)| {
                if *position <= update.position {
                    histogram.saturating_record(now.duration_since(*at).as_micros() as u64);
                    false
                } else {
                    true
                }
            });
        }
        histogram
    });
    let (paced, _) = write(
        store.clone(),
        workloads,
        args.seconds,
        pace,
        Some(pending.clone()),
    )
    .await?;
    // Let the projection drain what the paced phase wrote.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for runner in runners {
        runner.await??;
    }
    // With the runners gone and this handle dropped, the update channel closes and the
    // watcher returns what it measured.
    drop(hub);
    if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(5), watcher).await {
        histogram = h;
    }
    let unmeasured = pending.lock().map(|p| p.len()).unwrap_or(0);
    println!(
        "- paced: {:.0} appends/s for {} s; lag commit -> orders read model over {} appends: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({unmeasured} not seen applied)",
        paced as f64 / args.seconds as f64,
        args.seconds,
        histogram.len(),
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
    );
    Ok(())
}
