//! Live lag: how long from an append's commit until the `orders` projection has applied it,
//! at the maximum append rate and at half of it, with the runners in this process (as
//! `orderly serve`).
//!
//! 0. Prefill: the writers below run flat out for `prefill_seconds`, unmeasured; once the
//!    runners have caught up, `analyze`, so the phases measure a log with a history and plans
//!    made for it.
//! 1. Maximum rate: `writers` tasks append workload decisions (through the domain's deciders,
//!    each writer its own SKUs and customers) flat out for `seconds`, runners running, timed
//!    as in phase 2. Besides the lag: how many events each runner applied per second next to
//!    how many were appended, the backlog when the writers stop and how long the runners then
//!    take to catch up, and the lag of the first fifth of the phase next to the last: a runner
//!    that keeps up has a bounded lag, one that does not has a lag that grows with time. Then
//!    `analyze` again, as autovacuum would after such growth.
//! 2. Lag: the same writers paced to half that rate for `seconds`.
//!
//! Timing: each append's position and return time are noted; when the `orders` checkpoint
//! (which passes every event of the log) reaches a position, the lag of every append at or
//! below it is recorded.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use hdrhistogram::Histogram;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{EventStore, Position, SubscriptionOptions};
use orderly_projections::{ProjectionHub, ProjectionName, Runner, RunnerOptions};
use orderly_testdata::workload::{Workload, WorkloadOptions};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
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
    /// Longest wait for the runners to catch up after the prefill and after the maximum rate;
    /// a runner still behind then is reported as such and the run goes on.
    #[arg(long, default_value_t = 120)]
    catch_up_limit_seconds: u64,
}

/// How long the paced phase's last appends may take to be seen applied before they count as
/// not seen: the drain the half-rate figure has always been measured with.
const PACED_DRAIN: Duration = Duration::from_secs(2);

/// The timing of one phase's appends, shared by its writers and its watcher.
#[derive(Default)]
struct Timing {
    /// Appends not yet seen applied: position and the moment the append returned. A heap, as
    /// appends return out of log order and at the maximum rate thousands may wait: an update
    /// takes only those it covers, instead of scanning them all under the writers' lock.
    pending: BinaryHeap<Reverse<(Position, Instant)>>,
    /// Return time and lag of every append seen applied.
    applied: Vec<(Instant, Duration)>,
    /// Batches `orders` committed while the writers ran: the events it applied over this
    /// are its mean batch, which grows when it falls behind. (Updates a lagging watcher
    /// missed count as one; at 1024 updates of headroom that has not been seen.)
    batches: u64,
}

type SharedTiming = Arc<Mutex<Timing>>;

impl Timing {
    /// The checkpoint reached `position` at `now`: every append at or below it is applied.
    fn settle(&mut self, position: Position, now: Instant) {
        while let Some(&Reverse((at_or_below, at))) = self.pending.peek()
            && at_or_below <= position
        {
            self.pending.pop();
            self.applied.push((at, now.duration_since(at)));
        }
    }
}

/// What the writers of one phase did.
struct Written {
    appends: u64,
    /// The last position they wrote (the log's head: nothing else appends).
    head: Position,
    workloads: Vec<Workload>,
}

/// Appends one workload decision; returns its position.
async fn append_next(store: &dyn EventStore, workload: &mut Workload) -> anyhow::Result<Position> {
    Ok(workload.next_append().append_to(store).await?.position)
}

/// Runs the writers for `seconds`, each appending at most one decision per `pace` (zero: flat
/// out), noting each append in `timing` if given.
async fn write(
    store: Arc<PgEventStore>,
    workloads: Vec<Workload>,
    seconds: u64,
    pace: Duration,
    timing: Option<SharedTiming>,
) -> anyhow::Result<Written> {
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks = workloads.into_iter().map(|mut workload| {
        let store = store.clone();
        let timing = timing.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut head = Position::START;
            let mut next = Instant::now();
            while Instant::now() < end {
                let position = append_next(store.as_ref(), &mut workload).await?;
                if let Some(timing) = &timing {
                    timing
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .pending
                        .push(Reverse((position, Instant::now())));
                }
                n += 1;
                head = head.max(position);
                next += pace;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            anyhow::Ok((n, head, workload))
        })
    });
    let mut written = Written {
        appends: 0,
        head: Position::START,
        workloads: Vec::new(),
    };
    for task in futures::future::join_all(tasks).await {
        let (n, head, workload) = task??;
        written.appends += n;
        written.head = written.head.max(head);
        written.workloads.push(workload);
    }
    Ok(written)
}

/// Follows the `orders` checkpoint, settling the appends in `timing`, until `writers_done` is
/// cancelled and no append is left pending. Subscribes before it returns, so that no update
/// after the call is missed.
fn watch(
    hub: ProjectionHub,
    timing: SharedTiming,
    writers_done: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let mut updates = hub.updates();
    tokio::spawn(async move {
        let mut done = false;
        loop {
            let reached = tokio::select! {
                () = writers_done.cancelled(), if !done => {
                    done = true;
                    None
                }
                update = updates.recv() => match update {
                    Ok(update) if update.projection == ProjectionName::Orders.as_str() => {
                        Some(update.position)
                    }
                    Ok(_) => None,
                    // Missed updates only moved the checkpoint on, and the hub knows how far.
                    Err(RecvError::Lagged(_)) => Some(hub.position(ProjectionName::Orders)),
                    Err(RecvError::Closed) => break,
                },
            };
            let now = Instant::now();
            let mut timing = timing.lock().map_err(|_| anyhow!("poisoned"))?;
            if let Some(position) = reached {
                timing.settle(position, now);
                if !done {
                    timing.batches += 1;
                }
            }
            if done && timing.pending.is_empty() {
                break;
            }
        }
        Ok(())
    })
}

/// When each runner reached `head`, waiting at most `limit`; `None` for one still behind.
async fn caught_up(
    hub: &ProjectionHub,
    head: Position,
    limit: Duration,
) -> Vec<(ProjectionName, Option<Instant>)> {
    let waits = ProjectionName::ALL.into_iter().map(|name| async move {
        let reached = hub.wait_for(name, head, limit).await;
        (name, reached.then(Instant::now))
    });
    futures::future::join_all(waits).await
}

/// Events in the log after `after`, up to and including `up_to`.
async fn events_between(client: &Client, after: Position, up_to: Position) -> anyhow::Result<u64> {
    let bound = |p: Position| -> anyhow::Result<(i64, i64)> {
        Ok((i64::try_from(p.commit)?, i64::try_from(p.prepare)?))
    };
    let (after_tx, after_seq) = bound(after)?;
    let (up_to_tx, up_to_seq) = bound(up_to)?;
    let row = client
        .query_one(
            "select count(*) from events where (tx_id, seq) > ($1, $2) and (tx_id, seq) <= ($3, $4)",
            &[&after_tx, &after_seq, &up_to_tx, &up_to_seq],
        )
        .await?;
    Ok(u64::try_from(row.try_get::<_, i64>(0)?)?)
}

/// One runner's part in a timed phase.
struct RunnerFigures {
    name: ProjectionName,
    /// Events it applied while the writers ran.
    applied: u64,
    /// Events appended and not yet applied when the writers stopped.
    backlog: u64,
    /// From the writers' stop until it had applied their last event; `None`: not within the
    /// limit.
    catch_up: Option<Duration>,
}

/// What a timed phase measured.
struct Phase {
    written: Written,
    /// From the writers' start until the last of them returned.
    elapsed: Duration,
    /// Events the writers appended.
    events: u64,
    runners: Vec<RunnerFigures>,
    /// Appends not yet applied by `orders` when the writers stopped, and how long before
    /// the oldest of them had returned.
    pending_at_stop: usize,
    oldest_at_stop: Option<Duration>,
    /// Lag of each append seen applied, by the fifth of the phase it returned in.
    fifths: [Histogram<u64>; 5],
    lag: Histogram<u64>,
    /// Appends not seen applied within the phase's drain.
    unmeasured: usize,
    /// Batches `orders` committed while the writers ran.
    orders_batches: u64,
}

/// Runs the writers of the phase `before` for `seconds` at `pace`, timing every append, then
/// waits at most `drain` for the runners to apply what they wrote.
async fn timed_phase(
    store: &Arc<PgEventStore>,
    hub: &ProjectionHub,
    client: &Client,
    before: Written,
    seconds: u64,
    pace: Duration,
    drain: Duration,
) -> anyhow::Result<Phase> {
    let timing = SharedTiming::default();
    let writers_done = CancellationToken::new();
    let mut watcher = watch(hub.clone(), timing.clone(), writers_done.clone());
    let checkpoints = || ProjectionName::ALL.map(|name| hub.position(name));
    let at_start = checkpoints();
    let started = Instant::now();
    let timed = Some(timing.clone());
    let written = write(store.clone(), before.workloads, seconds, pace, timed).await?;
    let stopped = Instant::now();
    let at_stop = checkpoints();
    let orders_at_stop = ProjectionName::ALL
        .into_iter()
        .zip(at_stop)
        .find_map(|(name, position)| (name == ProjectionName::Orders).then_some(position))
        .unwrap_or(Position::START);
    let (pending_at_stop, oldest_at_stop) = {
        let timing = timing.lock().map_err(|_| anyhow!("poisoned"))?;
        let behind = timing
            .pending
            .iter()
            .filter(|Reverse((position, _))| *position > orders_at_stop);
        let (count, oldest) = behind.fold((0, None::<Instant>), |(n, oldest), Reverse((_, at))| {
            (n + 1, Some(oldest.map_or(*at, |o| o.min(*at))))
        });
        (count, oldest.map(|at| stopped.duration_since(at)))
    };
    writers_done.cancel();
    let reached = caught_up(hub, written.head, drain).await;
    // The watcher sees the last update just after the hub has it; if a runner is still
    // behind, what it has not seen by now counts as not seen applied.
    match tokio::time::timeout(Duration::from_secs(1), &mut watcher).await {
        Ok(result) => result??,
        Err(_) => watcher.abort(),
    }
    let timing = std::mem::take(&mut *timing.lock().map_err(|_| anyhow!("poisoned"))?);

    let mut runners = Vec::new();
    for (((name, reached_at), start), stop) in reached.into_iter().zip(at_start).zip(at_stop) {
        runners.push(RunnerFigures {
            name,
            applied: events_between(client, start, stop).await?,
            backlog: events_between(client, stop, written.head).await?,
            catch_up: reached_at.map(|at| at.saturating_duration_since(stopped)),
        });
    }
    let elapsed = stopped.duration_since(started);
    let mut fifths: [Histogram<u64>; 5] = std::array::from_fn(|_| report::histogram());
    let mut lag = report::histogram();
    for (at, waited) in &timing.applied {
        let share = at.duration_since(started).as_secs_f64() / elapsed.as_secs_f64();
        let fifth = ((share * 5.0) as usize).min(4);
        let micros = waited.as_micros() as u64;
        fifths[fifth].saturating_record(micros);
        lag.saturating_record(micros);
    }
    Ok(Phase {
        events: events_between(client, before.head, written.head).await?,
        written,
        elapsed,
        runners,
        pending_at_stop,
        oldest_at_stop,
        fifths,
        lag,
        unmeasured: timing.pending.len(),
        orders_batches: timing.batches,
    })
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The full-rate lines: lag, lag over time, apply versus append rate, backlog and catch-up.
fn print_full_rate(phase: &Phase) {
    let seconds = phase.elapsed.as_secs_f64();
    let applied: Vec<String> = phase
        .runners
        .iter()
        .map(|r| {
            let rate = r.applied as f64 / seconds;
            let share = 100.0 * r.applied as f64 / phase.events.max(1) as f64;
            let batches = if r.name == ProjectionName::Orders {
                let mean = r.applied as f64 / phase.orders_batches.max(1) as f64;
                format!(
                    " in {} batches of {mean:.0} on average",
                    phase.orders_batches
                )
            } else {
                String::new()
            };
            format!(
                "{} {rate:.0} events/s ({share:.0}%){batches}",
                r.name.as_str()
            )
        })
        .collect();
    println!(
        "- full rate: {:.0} appends/s, {:.0} events/s appended over {seconds:.1} s; applied: {}",
        phase.written.appends as f64 / seconds,
        phase.events as f64 / seconds,
        applied.join(", "),
    );
    println!(
        "- full rate: lag commit -> orders read model over {} appends: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} not seen applied)",
        phase.lag.len(),
        ms(phase.lag.value_at_quantile(0.5)),
        ms(phase.lag.value_at_quantile(0.99)),
        ms(phase.lag.max()),
        phase.unmeasured,
    );
    let by_fifth: Vec<String> = phase
        .fifths
        .iter()
        .map(|h| {
            format!(
                "{:.1}/{:.1}",
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99))
            )
        })
        .collect();
    let (first, last) = (&phase.fifths[0], &phase.fifths[4]);
    // Growing: a typical append of the last fifth waits longer than nearly every append of
    // the first, and at least twice as long as a typical one of it.
    let first_p50 = first.value_at_quantile(0.5);
    let last_p50 = last.value_at_quantile(0.5);
    let verdict = if last_p50 > (2 * first_p50).max(first.value_at_quantile(0.99)) {
        "grows: the last fifth's p50 is above the first fifth's p99 and twice its p50, orders falls behind"
    } else {
        "stays bounded: the last fifth's p50 is within the first fifth's p99 or twice its p50"
    };
    println!(
        "- full rate: lag by fifth of the phase, p50/p99 ms: {}; the lag {verdict}",
        by_fifth.join(", "),
    );
    let backlog: Vec<String> = phase
        .runners
        .iter()
        .map(|r| format!("{} {} events", r.name.as_str(), r.backlog))
        .collect();
    let oldest = phase.oldest_at_stop.map_or("none".to_owned(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    });
    let full_batch = RunnerOptions::default().batch_size as u64;
    let catch_up: Vec<String> = phase
        .runners
        .iter()
        .map(|r| match r.catch_up {
            // Below a full batch the time is one batch's latency, not a rate of catching up.
            Some(d) if r.backlog >= full_batch => format!(
                "{} {:.1} ms ({:.0} events/s)",
                r.name.as_str(),
                d.as_secs_f64() * 1000.0,
                r.backlog as f64 / d.as_secs_f64().max(1e-3),
            ),
            Some(d) => format!("{} {:.1} ms", r.name.as_str(), d.as_secs_f64() * 1000.0),
            None => format!("{} still behind", r.name.as_str()),
        })
        .collect();
    println!(
        "- full rate, when the writers stopped: backlog {} (orders: {} appends, oldest returned {oldest} before); caught up after {}",
        backlog.join(", "),
        phase.pending_at_stop,
        catch_up.join(", "),
    );
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = report::read_side_database("bench-lag").await?;
    println!("# live lag benchmark\n");
    println!("- machine: {}", report::machine());
    let client = db.connect().await.map_err(|e| anyhow!("{e}"))?;
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
    let catch_up_limit = Duration::from_secs(args.catch_up_limit_seconds);

    let prefill = write(
        store.clone(),
        workloads,
        args.prefill_seconds,
        Duration::ZERO,
        None,
    )
    .await?;
    // Phase 1 starts from runners at the head, so that what it measures is its own backlog.
    let prefill_stopped = Instant::now();
    let reached = caught_up(&hub, prefill.head, catch_up_limit).await;
    let prefill_catch_up: Vec<String> = reached
        .iter()
        .map(|(name, at)| match at {
            Some(at) => format!(
                "{} {:.0} ms",
                name.as_str(),
                at.duration_since(prefill_stopped).as_secs_f64() * 1000.0
            ),
            None => format!("{} still behind", name.as_str()),
        })
        .collect();
    println!(
        "- prefill: {} appends in {} s, unmeasured; runners caught up after {}",
        prefill.appends,
        args.prefill_seconds,
        prefill_catch_up.join(", "),
    );
    report::analyze(&db).await?;
    let full = timed_phase(
        &store,
        &hub,
        &client,
        prefill,
        args.seconds,
        Duration::ZERO,
        catch_up_limit,
    )
    .await?;
    report::analyze(&db).await?;
    let max_rate = full.written.appends as f64 / args.seconds as f64;
    println!(
        "- maximum append rate with runners on: {max_rate:.0} appends/s ({} writers)",
        args.writers
    );
    print_full_rate(&full);

    let target = max_rate / 2.0;
    let pace = Duration::from_secs_f64(args.writers as f64 / target.max(1.0));
    let paced = timed_phase(
        &store,
        &hub,
        &client,
        full.written,
        args.seconds,
        pace,
        PACED_DRAIN,
    )
    .await?;
    stop.cancel();
    for runner in runners {
        runner.await??;
    }
    println!(
        "- paced: {:.0} appends/s for {} s; lag commit -> orders read model over {} appends: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} not seen applied)",
        paced.written.appends as f64 / args.seconds as f64,
        args.seconds,
        paced.lag.len(),
        ms(paced.lag.value_at_quantile(0.5)),
        ms(paced.lag.value_at_quantile(0.99)),
        ms(paced.lag.max()),
        paced.unmeasured,
    );
    Ok(())
}
