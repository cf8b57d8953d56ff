//! Latency recording and the Markdown the runs print.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

/// What one scenario measured.
pub struct Outcome {
    pub name: String,
    pub writers: usize,
    pub operations: u64,
    pub events: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl Outcome {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// The round with the median rate, carrying the latencies of all rounds.
    pub fn median(mut rounds: Vec<Outcome>) -> anyhow::Result<Outcome> {
        anyhow::ensure!(!rounds.is_empty(), "no rounds measured");
        rounds.sort_by(|a, b| a.events_per_sec().total_cmp(&b.events_per_sec()));
        let mut latency_us = histogram();
        for round in &rounds {
            latency_us.add(&round.latency_us)?;
        }
        let mut median = rounds.swap_remove(rounds.len() / 2);
        median.latency_us = latency_us;
        Ok(median)
    }

    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
            self.name,
            self.writers,
            self.operations as f64 / self.elapsed.as_secs_f64(),
            self.events_per_sec(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
        )
    }

    /// The row for [`REQUEST_HEADER`]: one operation is one request.
    pub fn request_row(&self) -> String {
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |",
            self.name,
            self.writers,
            self.operations as f64 / self.elapsed.as_secs_f64(),
            self.latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            self.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
        )
    }
}

pub const HEADER: &str =
    "| scenario | writers | ops/s | events/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|";

pub const REQUEST_HEADER: &str =
    "| scenario | connections | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|";

/// Runs `clients` tasks that each await `request(client, i)` back to back (`i` counts that
/// task's calls), for a warm-up of a fifth of `seconds`, then `seconds`; returns how many calls
/// started after the warm-up and ended inside the window, and their latencies. A failed call
/// ends the run: a benchmark of errors measures nothing.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    seconds: u64,
    request: F,
) -> anyhow::Result<(u64, Histogram<u64>)>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let window_start = Instant::now() + Duration::from_secs(seconds) / 5;
    let end = window_start + Duration::from_secs(seconds);
    let tasks = (0..clients).map(|client| {
        let request = request.clone();
        tokio::spawn(async move {
            let mut histogram = histogram();
            let mut operations = 0u64;
            for i in 0u64.. {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                request(client, i).await?;
                if began >= window_start && Instant::now() <= end {
                    histogram.saturating_record(began.elapsed().as_micros() as u64);
                    operations += 1;
                }
            }
            anyhow::Ok((operations, histogram))
        })
    });
    gather(tasks).await
}

/// Waits for every worker and adds up their operation counts and latency histograms.
pub async fn gather(
    workers: impl IntoIterator<Item = JoinHandle<anyhow::Result<(u64, Histogram<u64>)>>>,
) -> anyhow::Result<(u64, Histogram<u64>)> {
    let mut latency_us = histogram();
    let mut operations = 0;
    for worker in futures::future::join_all(workers).await {
        let (ops, worker_histogram) = worker??;
        operations += ops;
        latency_us.add(worker_histogram)?;
    }
    Ok((operations, latency_us))
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at three significant digits: fixed bounds keep merging cheap.
    histogram_up_to(Duration::from_secs(60))
}

/// [`histogram`] for microseconds up to `longest` (60 s at least); longer values are recorded
/// as the longest.
pub fn histogram_up_to(longest: Duration) -> Histogram<u64> {
    let high = (longest.as_micros() as u64).max(60_000_000);
    Histogram::new_with_bounds(1, high, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// One line about the machine and server, for the record.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("?".to_owned(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    format!("{cores} cores ({cpu}), {mem} RAM")
}

/// The server's `version()`, for a report's header.
pub async fn server_version(db: &orderly_test_support::TestDb) -> anyhow::Result<String> {
    Ok(db
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .query_one("select version()", &[])
        .await?
        .try_get(0)?)
}

/// A fresh database holding the event log and the read models, as `orderly migrate` makes it.
/// Planner statistics for every table of `db`, as autovacuum would have them on a server that
/// has been running: a program that fills a fresh database and measures at once would
/// otherwise measure plans made for empty tables (sequential scans of the log, kept by the
/// prepared statements until the next analyze).
pub async fn analyze(db: &orderly_test_support::TestDb) -> anyhow::Result<()> {
    let client = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    client.batch_execute("analyze").await?;
    Ok(())
}

pub async fn read_side_database(key: &str) -> anyhow::Result<orderly_test_support::TestDb> {
    orderly_test_support::TestDb::create(
        key,
        &orderly_projections::fingerprint_with_event_store(),
        |url| async move {
            orderly_projections::migrate_with_event_store(&url.parse()?)
                .await
                .map_err(Into::into)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the benchmark database: {e}"))
}

/// A fresh database with every migration `orderly migrate` applies: log, read models and the
/// command side's tables, for programs that serve the whole application.
pub async fn service_database(key: &str) -> anyhow::Result<orderly_test_support::TestDb> {
    orderly_test_support::TestDb::create(
        key,
        &orderly_service::app::migration_fingerprint(),
        |url| async move {
            let settings = orderly_service::settings::Settings::with_database(url);
            orderly_service::app::migrate(&settings)
                .await
                .map_err(Into::into)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the benchmark database: {e}"))
}

/// One GraphQL request with `token` as bearer; the answer's JSON.
pub async fn post_graphql(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await?
        .json()
        .await?)
}
