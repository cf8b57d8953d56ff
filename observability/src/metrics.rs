//! Prometheus metrics with the names, labels and buckets of `deploy/METRICS.md`, the one list
//! operators, alert rules and dashboards rely on.
//!
//! Crates record through the `metrics` facade (`metrics::counter!` and friends); this module
//! installs the process-wide recorder, gives every histogram its documented buckets (without
//! them the exporter would publish summaries), describes every name (promtool insists on help
//! texts), and renders the text a scrape gets. It also samples what no crate records by
//! itself: the runtime, the process, the PostgreSQL pools, and the gauges the binary's health
//! checks set. The GraphQL edge records its requests and subscriptions through
//! `orderly_graphql::metrics`, which also serves `GET /metrics`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ObservabilityError;

/// Buckets of the GraphQL request and consistency-wait histograms, in seconds.
pub const REQUEST_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of command, append and projection-batch durations, in seconds.
pub const STORE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Events per projection batch.
pub const BATCH_SIZE_BUCKETS: [f64; 10] =
    [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];
/// Payment gateway calls, in seconds.
pub const PAYMENT_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Scheduling delay of the runtime probe, in seconds.
pub const PROBE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Sizes of product snapshots as written, in bytes of JSON: 16 KiB to 256 MiB by fours (the
/// largest a product's state should grow long before a snapshot's 1 GB limit).
pub const SNAPSHOT_SIZE_BUCKETS: [f64; 8] = [
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
];

/// How often the runtime probe asks to run.
const PROBE_PERIOD: Duration = Duration::from_millis(100);

/// The recorder can be installed once per process, and tests start several apps in one.
static INSTALLED: Mutex<Option<Metrics>> = Mutex::new(None);

/// The installed recorder: renders what was recorded.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
}

/// Installs the process-wide recorder on first call; later calls return the same one.
pub fn install() -> Result<Metrics, ObservabilityError> {
    let mut installed = INSTALLED.lock().map_err(|_| {
        ObservabilityError::Recorder("a thread panicked while installing it".to_owned())
    })?;
    if let Some(metrics) = installed.as_ref() {
        return Ok(metrics.clone());
    }
    let histograms: [(&str, &[f64]); 9] = [
        ("orderly_http_request_duration_seconds", &REQUEST_BUCKETS),
        ("orderly_consistency_wait_seconds", &REQUEST_BUCKETS),
        ("orderly_command_duration_seconds", &STORE_BUCKETS),
        (
            "orderly_event_store_append_duration_seconds",
            &STORE_BUCKETS,
        ),
        ("orderly_projection_batch_size", &BATCH_SIZE_BUCKETS),
        ("orderly_projection_batch_duration_seconds", &STORE_BUCKETS),
        ("orderly_payment_request_duration_seconds", &PAYMENT_BUCKETS),
        ("orderly_tokio_probe_delay_seconds", &PROBE_BUCKETS),
        ("orderly_snapshot_size_bytes", &SNAPSHOT_SIZE_BUCKETS),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .map_err(|e| ObservabilityError::Recorder(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| ObservabilityError::Recorder(e.to_string()))?;
    describe();
    let process = metrics_process::Collector::default();
    process.describe();
    let metrics = Metrics {
        handle,
        process: Arc::new(process),
    };
    *installed = Some(metrics.clone());
    Ok(metrics)
}

impl Metrics {
    /// The Prometheus text exposition of everything recorded, with the runtime and process
    /// figures sampled now.
    pub fn render(&self) -> String {
        self.process.collect();
        record_pools();
        // Keeps histogram storage bounded between scrapes.
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        text.push_str(&runtime_metrics());
        text
    }
}

/// The tokio runtime's stable counters, written out by hand: the facade's counters are
/// integers, and busy time is a fraction of seconds. Sampled at scrape time, so always fresh.
fn runtime_metrics() -> String {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return String::new();
    };
    let m = runtime.metrics();
    let workers = m.num_workers();
    let busy: f64 = (0..workers)
        .map(|w| m.worker_total_busy_duration(w).as_secs_f64())
        .sum();
    let parks: u64 = (0..workers).map(|w| m.worker_park_count(w)).sum();
    let lines: [(&str, &str, &str, String); 5] = [
        (
            "orderly_tokio_workers",
            "gauge",
            "Worker threads of the multi-threaded runtime.",
            workers.to_string(),
        ),
        (
            "orderly_tokio_alive_tasks",
            "gauge",
            "Tasks spawned and not yet finished.",
            m.num_alive_tasks().to_string(),
        ),
        (
            "orderly_tokio_global_queue_depth",
            "gauge",
            "Tasks waiting in the runtime's global (injection) queue.",
            m.global_queue_depth().to_string(),
        ),
        (
            "orderly_tokio_worker_busy_seconds_total",
            "counter",
            "Time all workers spent running tasks, summed.",
            busy.to_string(),
        ),
        (
            "orderly_tokio_worker_park_total",
            "counter",
            "Times workers parked (ran out of work), summed.",
            parks.to_string(),
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in lines {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        ));
    }
    text
}

/// Runs until dropped: a task due every 100 ms records how late it actually ran, the delay
/// any ready task sees on this runtime.
pub async fn probe_runtime() {
    let mut due = Instant::now() + PROBE_PERIOD;
    loop {
        tokio::time::sleep_until(due.into()).await;
        let late = Instant::now().saturating_duration_since(due);
        metrics::histogram!("orderly_tokio_probe_delay_seconds").record(late.as_secs_f64());
        due = Instant::now() + PROBE_PERIOD;
    }
}

/// Help texts of every `orderly_*` name recorded through the facade.
fn describe() {
    use Unit::{Bytes, Count, Seconds};
    let histograms: [(&str, Unit, &str); 9] = [
        (
            "orderly_http_request_duration_seconds",
            Seconds,
            "GraphQL requests on /graphql, from receipt to response (subscriptions: until set up).",
        ),
        (
            "orderly_consistency_wait_seconds",
            Seconds,
            "How long a query with consistency.atLeast waited for its projections to pass the token.",
        ),
        (
            "orderly_command_duration_seconds",
            Seconds,
            "Time to handle one command: load, decide, append, including retries.",
        ),
        (
            "orderly_event_store_append_duration_seconds",
            Seconds,
            "One append call to the event store port.",
        ),
        (
            "orderly_projection_batch_size",
            Count,
            "Events applied per projection batch.",
        ),
        (
            "orderly_projection_batch_duration_seconds",
            Seconds,
            "Time to apply one projection batch and commit it.",
        ),
        (
            "orderly_payment_request_duration_seconds",
            Seconds,
            "One call to the payment gateway, including the timeout.",
        ),
        (
            "orderly_tokio_probe_delay_seconds",
            Seconds,
            "How late a probe task due every 100 ms actually ran.",
        ),
        (
            "orderly_snapshot_size_bytes",
            Bytes,
            "Size of each product snapshot written, in bytes of JSON.",
        ),
    ];
    for (name, unit, help) in histograms {
        describe_histogram!(name, unit, help);
    }
    let counters: [(&str, &str); 11] = [
        (
            "orderly_http_responses_total",
            "HTTP responses sent, by status class.",
        ),
        (
            "orderly_commands_total",
            "Commands handled, once each however many conflict retries they took.",
        ),
        (
            "orderly_append_conflicts_total",
            "Version conflicts the store returned to command handlers, retried ones included.",
        ),
        (
            "orderly_snapshots_total",
            "Snapshots of long streams' states, by outcome: saved, failed, ignored at a load.",
        ),
        (
            "orderly_event_store_appended_events_total",
            "Events written (deduplicated retries not counted).",
        ),
        (
            "orderly_projection_events_applied_total",
            "Events applied by projections (parked events not counted).",
        ),
        (
            "orderly_saga_settled_total",
            "Fulfilment saga instances that settled.",
        ),
        (
            "orderly_saga_parked_total",
            "Saga events set aside because their step failed for good.",
        ),
        (
            "orderly_saga_retries_total",
            "Saga lane work tried again after a failure, by kind of failure.",
        ),
        (
            "orderly_payment_requests_total",
            "Calls to the payment gateway port.",
        ),
        (
            "orderly_notifications_total",
            "Customer notifications handed to the notifier port.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
    }
    let gauges: [(&str, &str); 20] = [
        (
            "orderly_graphql_subscriptions_active",
            "GraphQL subscriptions open now.",
        ),
        (
            "orderly_projection_state",
            "1 for the state this process is in for the projection, 0 for the others.",
        ),
        (
            "orderly_projection_lag_events",
            "Events after the projection's checkpoint that it subscribes to.",
        ),
        (
            "orderly_projection_lag_seconds",
            "Age of the oldest event the projection has not applied; 0 when caught up.",
        ),
        ("orderly_dead_letters", "Dead letters parked now."),
        (
            "orderly_saga_instances",
            "Fulfilment saga instances not yet settled, by phase.",
        ),
        (
            "orderly_saga_oldest_open_seconds",
            "Time since the oldest instance in this phase last changed.",
        ),
        (
            "orderly_saga_lanes_held",
            "Saga lanes this process holds the lease of.",
        ),
        (
            "orderly_saga_lag_seconds",
            "Age of the oldest event dealt to this process's saga lanes and not yet stored.",
        ),
        (
            "orderly_saga_parked",
            "Saga events parked and waiting for an operator.",
        ),
        (
            "orderly_saga_deadlines_overdue",
            "Saga instances whose deadline passed more than a minute ago without being handled.",
        ),
        (
            "orderly_outbox_dead_letters",
            "Outbox messages that failed every delivery attempt and wait for an operator.",
        ),
        (
            "orderly_outbox_oldest_pending_seconds",
            "Age of the oldest outbox message still to deliver; 0 when none is.",
        ),
        (
            "orderly_payment_breaker_state",
            "The payment gateway's circuit breaker: 0 closed, 1 half-open, 2 open.",
        ),
        (
            "orderly_log_horizon_age_seconds",
            "How long the oldest committed event that readers of the log cannot see yet has waited \
             behind an open transaction; 0 when none waits.",
        ),
        (
            "orderly_db_oldest_transaction_seconds",
            "Age of the oldest transaction holding a transaction id anywhere in the cluster.",
        ),
        (
            "orderly_build_info",
            "Always 1; the binary's version and the configured event store.",
        ),
        (
            "orderly_readiness_check",
            "1 when the readiness check passes, 0 when it fails.",
        ),
        (
            "orderly_db_pool_connections",
            "Connections of a PostgreSQL pool, by state.",
        ),
        (
            "orderly_db_pool_max_connections",
            "A PostgreSQL pool's configured size.",
        ),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, help);
    }
}

/// `orderly_build_info`: the binary's version and the configured store.
pub fn record_build_info(version: &'static str, event_store: &'static str) {
    gauge!("orderly_build_info", "version" => version, "event_store" => event_store).set(1.0);
}

/// `orderly_readiness_check{check}`: one of `event_store`, `read_database`, `projections`.
pub fn record_readiness(check: &'static str, passed: bool) {
    gauge!("orderly_readiness_check", "check" => check).set(if passed { 1.0 } else { 0.0 });
}

/// What holds the log's horizon back (see `orderly_event_store::postgres::horizon`): how long
/// the oldest held-back event has waited, and the age of the oldest open transaction.
pub fn record_horizon(held_back_seconds: f64, oldest_transaction_seconds: f64) {
    gauge!("orderly_log_horizon_age_seconds").set(held_back_seconds);
    gauge!("orderly_db_oldest_transaction_seconds").set(oldest_transaction_seconds);
}

/// Pools whose connections every scrape reports; a later pool of the same name replaces the
/// earlier (tests build several apps in one process).
static POOLS: Mutex<Vec<(&'static str, deadpool_postgres::Pool)>> = Mutex::new(Vec::new());

/// Reports `pool`'s connections as `pool="<name>"` (`event_store` or `read_models`) in
/// `orderly_db_pool_connections` and `orderly_db_pool_max_connections` from now on.
pub fn watch_pool(name: &'static str, pool: deadpool_postgres::Pool) {
    if let Ok(mut pools) = POOLS.lock() {
        pools.retain(|(watched, _)| *watched != name);
        pools.push((name, pool));
    }
}

fn record_pools() {
    if let Ok(pools) = POOLS.lock() {
        for (name, pool) in pools.iter() {
            record_pool(name, pool);
        }
    }
}

/// The connections of `pool`, named `name`, as they are now.
fn record_pool(name: &'static str, pool: &deadpool_postgres::Pool) {
    let status = pool.status();
    let idle = status.available;
    let in_use = status.size.saturating_sub(idle);
    gauge!("orderly_db_pool_connections", "pool" => name, "state" => "idle").set(idle as f64);
    gauge!("orderly_db_pool_connections", "pool" => name, "state" => "in_use").set(in_use as f64);
    gauge!("orderly_db_pool_max_connections", "pool" => name).set(status.max_size as f64);
}
