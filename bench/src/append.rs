//! Appends: Orderly's PostgreSQL event store next to raw INSERTs of the same rows.
//!
//! Every scenario starts from an empty `events` table (same indexes, same server settings),
//! runs `writers` tasks flat out for a warm-up and then a measured window, and records the
//! latency of each operation that started inside the window.
//!
//! - `raw single`: one INSERT of one row per transaction, no checks.
//! - `orderly single`: `append(new stream, NoStream, [one event])`: the expected-version check,
//!   idempotency by event id, and the log-order columns.
//! - `raw batch10` / `orderly batch10`: the same with 10 events per transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions, migrate, migration_fingerprint};
use orderly_event_store::{EventStore, ExpectedVersion, NewEvent, StreamName};
use orderly_test_support::TestDb;
use serde_json::{Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::report::{self, HEADER, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each scenario is measured, after a warm-up of a fifth of that.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Writer counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub(crate) writers: Vec<usize>,
    /// Rounds of all four scenarios per writer count; rates are the median over rounds, so a
    /// burst of outside load skews one round, not the result.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Scenario {
    RawSingle,
    OrderlySingle,
    RawBatch,
    OrderlyBatch,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::RawSingle => "raw single",
            Self::OrderlySingle => "orderly single",
            Self::RawBatch => "raw batch10",
            Self::OrderlyBatch => "orderly batch10",
        }
    }

    fn batch(self) -> usize {
        match self {
            Self::RawSingle | Self::OrderlySingle => 1,
            Self::RawBatch | Self::OrderlyBatch => 10,
        }
    }
}

const RAW_SINGLE: &str =
    "insert into events (event_id, stream, version, event_type, data, metadata)
    values ($1, $2, 0, $3, $4, $5)";
const RAW_BATCH: &str = "insert into events (event_id, stream, version, event_type, data, metadata)
    select e.event_id, $1, e.n - 1, e.event_type, e.data, e.metadata
    from unnest($2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[])
        with ordinality as e(event_id, event_type, data, metadata, n)";

/// A realistic event: an order placement and its metadata envelope, about 600 bytes of JSON.
fn event() -> NewEvent {
    let order_id = Uuid::now_v7();
    NewEvent::new(
        "OrderPlaced",
        json!({
            "order_id": order_id,
            "customer_id": "customer-0042",
            "lines": [
                { "sku": "SKU-00017", "name": "Espresso cups, set of 4", "quantity": 2,
                  "unit_price": { "amount_minor": 1999, "currency": "EUR" } },
                { "sku": "SKU-00211", "name": "Milk jug", "quantity": 1,
                  "unit_price": { "amount_minor": 1250, "currency": "EUR" } }
            ],
            "shipping_address": { "name": "A. Customer", "line1": "1 Long Road", "city": "Lyon",
                                  "postal_code": "69001", "country": "FR" },
            "placed_at": "2026-11-25T12:00:00Z"
        }),
    )
    .with_metadata(json!({
        "schema_version": 2,
        "correlation_id": order_id,
        "causation_id": order_id,
        "actor": "customer-0042",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "occurred_at": "2026-11-25T12:00:00Z"
    }))
}

fn fresh_stream() -> StreamName {
    // Valid by construction: ASCII letters, digits and '-'.
    StreamName::parse(format!("bench-{}", Uuid::now_v7().simple())).expect("stream name")
}

enum Writer {
    Raw(Client, tokio_postgres::Statement),
    Orderly(Arc<PgEventStore>),
}

impl Writer {
    async fn operate(&self, batch: usize) -> anyhow::Result<()> {
        let events: Vec<NewEvent> = (0..batch).map(|_| event()).collect();
        let stream = fresh_stream();
        match self {
            Writer::Orderly(store) => {
                store
                    .append(&stream, ExpectedVersion::NoStream, events)
                    .await?;
            }
            Writer::Raw(client, statement) if batch == 1 => {
                let e = &events[0];
                client
                    .execute(
                        statement,
                        &[&e.id, &stream.as_str(), &e.event_type, &e.data, &e.metadata],
                    )
                    .await?;
            }
            Writer::Raw(client, statement) => {
                let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
                let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
                let meta: Vec<&Value> = events.iter().map(|e| &e.metadata).collect();
                client
                    .execute(statement, &[&stream.as_str(), &ids, &types, &data, &meta])
                    .await?;
            }
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = TestDb::create("bench-append", &migration_fingerprint(), |url| async move {
        migrate(&url.parse()?).await.map_err(Into::into)
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the benchmark database: {e}"))?;
    let admin = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = admin
        .query_one(
            "select version(), current_setting('synchronous_commit'), current_setting('fsync'),
                    current_setting('shared_buffers'), current_setting('wal_sync_method')",
            &[],
        )
        .await?;
    println!("# append benchmark\n");
    println!("- machine: {}", report::machine());
    println!(
        "- server: {}; synchronous_commit={}, fsync={}, shared_buffers={}, wal_sync_method={}",
        server.get::<_, String>(0),
        server.get::<_, String>(1),
        server.get::<_, String>(2),
        server.get::<_, String>(3),
        server.get::<_, String>(4)
    );
    println!(
        "- window: {} s measured after {} s warm-up, per scenario; {} rounds with the scenarios interleaved; median rate, latency over all rounds\n",
        args.seconds,
        warmup(&args).as_secs_f64(),
        args.rounds
    );
    println!("{HEADER}");
    let scenarios = [
        Scenario::RawSingle,
        Scenario::OrderlySingle,
        Scenario::RawBatch,
        Scenario::OrderlyBatch,
    ];
    let mut ratios = Vec::new();
    for &writers in &args.writers {
        let mut rounds: Vec<Vec<Outcome>> = scenarios.iter().map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            for (i, &scenario) in scenarios.iter().enumerate() {
                admin.batch_execute("truncate events").await?;
                // A checkpoint between scenarios keeps one's dirty pages from taxing the next.
                admin
                    .batch_execute("checkpoint")
                    .await
                    .context("checkpoint (needs a superuser)")?;
                rounds[i].push(measure(&db, scenario, writers, &args).await?);
            }
        }
        let mut rates = Vec::new();
        for outcomes in rounds {
            let outcome = Outcome::median(outcomes)?;
            println!("{}", outcome.row());
            rates.push(outcome.events_per_sec());
        }
        ratios.push((writers, rates[1] / rates[0], rates[3] / rates[2]));
    }
    println!("\n| writers | orderly/raw single | orderly/raw batch10 |\n|---|---|---|");
    for (writers, single, batch) in ratios {
        println!(
            "| {writers} | {:.0}% | {:.0}% |",
            single * 100.0,
            batch * 100.0
        );
    }
    Ok(())
}

fn warmup(args: &Args) -> Duration {
    Duration::from_secs(args.seconds) / 5
}

pub(crate) async fn measure(
    db: &TestDb,
    scenario: Scenario,
    writers: usize,
    args: &Args,
) -> anyhow::Result<Outcome> {
    let store = match scenario {
        Scenario::OrderlySingle | Scenario::OrderlyBatch => {
            let options = PgStoreOptions {
                pool_size: writers,
                ..Default::default()
            };
            Some(Arc::new(PgEventStore::new(db.config().clone(), options)?))
        }
        _ => None,
    };
    let mut pool = Vec::with_capacity(writers);
    for _ in 0..writers {
        pool.push(match &store {
            Some(store) => Writer::Orderly(store.clone()),
            None => {
                let client = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let sql = if scenario.batch() == 1 {
                    RAW_SINGLE
                } else {
                    RAW_BATCH
                };
                let statement = client.prepare(sql).await?;
                Writer::Raw(client, statement)
            }
        });
    }
    let start = Instant::now();
    let window_start = start + warmup(args);
    let end = window_start + Duration::from_secs(args.seconds);
    let batch = scenario.batch();
    let tasks = pool.into_iter().map(|writer| {
        tokio::spawn(async move {
            let mut histogram = report::histogram();
            let mut operations = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                writer.operate(batch).await?;
                if began >= window_start && Instant::now() <= end {
                    histogram.saturating_record(began.elapsed().as_micros() as u64);
                    operations += 1;
                }
            }
            anyhow::Ok((operations, histogram))
        })
    });
    let (operations, latency_us) = report::gather(tasks).await?;
    Ok(Outcome {
        name: scenario.name().to_owned(),
        writers,
        operations,
        events: operations * batch as u64,
        elapsed: Duration::from_secs(args.seconds),
        latency_us,
    })
}
