//! A product's history: what deciding on a product costs as the orders it has served pile up.
//!
//! A product's stream gains two events per order it ever served (a reservation, then a
//! shipment or a release), and its state remembers what it did for each order (what makes a
//! redelivered reservation decide nothing). For each history size the program builds one
//! product with that many settled orders behind it and measures, on one task:
//!
//! - `placement load`: the state a placement copies prices from ([`Handler::load_many`] of a
//!   state this process holds and a read confirmed, as placeOrder does within its freshness
//!   window): no store call, only the cached state's copy.
//! - `reservation`: one order's reservation decided and appended through
//!   [`Handler::execute_batch`] (the saga's path), then its shipment, on the in-memory store so
//!   that the figure is the decision's own cost, not the database's.
//! - `cold load`: a new handler folds the whole stream, from the in-memory store and from
//!   PostgreSQL, and from PostgreSQL starting at a snapshot (`aggregate_snapshots`, which a
//!   first load with snapshots took); next to it, the yardstick: the same rows read with a
//!   bare `select`. Each the median of [`COLD_LOADS`] tries, every one by a new handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use orderly_command_api::{Envelope, Handler, Snapshots};
use orderly_domain::product::{ProductAggregate, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::{OrderId, Quantity, Sku};
use orderly_event_schemas::Event;
use orderly_event_store::memory::MemoryEventStore;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{EventStore, StreamName};
use orderly_test_support::TestDb;
use orderly_testdata::history::{append_all, product_history_over};
use uuid::Uuid;

use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Orders already served by the product (each reserved, then shipped), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000,100000")]
    histories: Vec<usize>,
    /// Decisions timed per history size and measure.
    #[arg(long, default_value_t = 1000)]
    decisions: usize,
    /// Days the orders of each history are spread over, up to now (0: all at one instant).
    /// A product forgets what it did for an order a week after it settled, so with more than
    /// a week its state holds only the last week's orders.
    #[arg(long, default_value_t = 0)]
    span_days: u32,
    /// Also fold each history from PostgreSQL (ORDERLY_TEST_DATABASE_URL, see README).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    postgres: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    println!("# product history benchmark\n");
    println!("- machine: {}", report::machine());
    println!(
        "- {} decisions timed per measure, one task; medians and p99 in microseconds; orders spread over {} days\n",
        args.decisions, args.span_days
    );
    println!(
        "| orders in history | events | placement load p50 / p99 | reservation p50 / p99 | cold load, memory | cold load, PostgreSQL | cold load, PostgreSQL from a snapshot | snapshot: JSON / stored | bare select of the rows |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let db = match args.postgres {
        true => Some(report::service_database("bench-history").await?),
        false => None,
    };
    for (round, &orders) in args.histories.iter().enumerate() {
        let sku = Sku::parse(format!("HIST-{round}"))?;
        let stream = StreamName::parse(streams::product(&sku))?;
        let span = chrono::TimeDelta::days(i64::from(args.span_days));
        let history = product_history_over(&sku, orders, span)?;
        let events = history.len();

        let memory: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        append_all(memory.as_ref(), &stream, None, &history).await?;
        let cold_memory = median_of_cold_loads(|| async {
            Handler::new(memory.clone())
                .load::<ProductAggregate>(&stream)
                .await
        })
        .await?;
        let handler = Handler::optimistic(memory);
        let placement = placement_loads(&handler, &stream, args.decisions).await?;
        let reservation = reservations(&handler, &stream, args.decisions).await?;

        let postgres = match &db {
            Some(db) => cold_loads(db, &stream, &history).await?,
            None => ["-", "-", "-", "-"].map(str::to_owned),
        };
        println!(
            "| {orders} | {events} | {} | {} | {} | {} |",
            percentiles(placement),
            percentiles(reservation),
            format_ms(cold_memory),
            postgres.join(" | "),
        );
    }
    Ok(())
}

/// Writes `history` to `stream` in PostgreSQL and times its cold loads: folded whole, and from
/// a snapshot (taken by a first load); then the snapshot's size and the bare select.
async fn cold_loads(
    db: &TestDb,
    stream: &StreamName,
    history: &[Event],
) -> anyhow::Result<[String; 4]> {
    let store: Arc<dyn EventStore> =
        Arc::new(PgEventStore::connect(db.url(), PgStoreOptions::default())?);
    append_all(store.as_ref(), stream, None, history).await?;
    let client = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    client.batch_execute("analyze events").await?;
    let whole = Handler::new(store.clone())
        .load::<ProductAggregate>(stream)
        .await?;
    let cold = median_of_cold_loads(|| async {
        Handler::new(store.clone())
            .load::<ProductAggregate>(stream)
            .await
    })
    .await?;

    // A first load with snapshots takes one (in the background) when the stream is long
    // enough; a second handler, as cold as the first, then starts from it.
    let pool = orderly_graphql::pg_pool(&db.url().parse()?, 2)?;
    let snapshots = || Snapshots::new(pool.clone());
    Handler::new(store.clone())
        .with_snapshots(snapshots())
        .load::<ProductAggregate>(stream)
        .await?;
    let (from_snapshot, size) = match wait_for_snapshot(&client, stream, whole.version).await? {
        Some(size) => {
            let restored = Handler::new(store.clone())
                .with_snapshots(snapshots())
                .load::<ProductAggregate>(stream)
                .await?;
            let took = median_of_cold_loads(|| async {
                Handler::new(store.clone())
                    .with_snapshots(snapshots())
                    .load::<ProductAggregate>(stream)
                    .await
            })
            .await?;
            anyhow::ensure!(
                restored.state == whole.state && restored.version == whole.version,
                "the state loaded from the snapshot is the state folded from the stream"
            );
            let mb = |bytes: i64| bytes as f64 / 1e6;
            (
                format_ms(took),
                format!("{:.1} / {:.1} MB", mb(size.0), mb(size.1)),
            )
        }
        None => ("-".to_owned(), "none".to_owned()),
    };

    let select = client
        .prepare(
            "select version, event_type, data, metadata from events
             where stream = $1 order by version",
        )
        .await?;
    let bare = median_of_cold_loads(|| async {
        let rows = client.query(&select, &[&stream.as_str()]).await?;
        anyhow::ensure!(
            rows.len() == history.len(),
            "the bare select read every event"
        );
        Ok(())
    })
    .await?;
    Ok([format_ms(cold), from_snapshot, size, format_ms(bare)])
}

/// The size in bytes of the snapshot of `stream` at `version` once it is stored, as JSON text
/// and as stored (compressed when large); `None` for a stream too short to be
/// snapshotted.
async fn wait_for_snapshot(
    client: &tokio_postgres::Client,
    stream: &StreamName,
    version: Option<u64>,
) -> anyhow::Result<Option<(i64, i64)>> {
    let version = version.map_or(Ok(-1), i64::try_from)?;
    let sql = "select octet_length(state)::bigint, pg_column_size(state)::bigint
               from aggregate_snapshots
               where stream = $1 and version = $2";
    // A stream too short for a snapshot gets none: a second is plenty for one that is due.
    let deadline = Instant::now() + Duration::from_secs(if version >= 999 { 60 } else { 1 });
    while Instant::now() < deadline {
        if let Some(row) = client.query_opt(sql, &[&stream.as_str(), &version]).await? {
            return Ok(Some((row.try_get(0)?, row.try_get(1)?)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// `n` placement-style loads of a cached state a read confirmed moments ago.
async fn placement_loads(
    handler: &Handler,
    stream: &StreamName,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let streams = [stream.clone()];
    handler.load::<ProductAggregate>(stream).await?;
    let mut timings = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let loaded = handler
            .load_many::<ProductAggregate>(&streams, Duration::from_secs(3600))
            .await?;
        timings.push(started.elapsed());
        anyhow::ensure!(loaded.len() == 1, "one state per stream");
    }
    Ok(timings)
}

/// `n` new orders, each reserved then shipped through the saga's path; the reservation is
/// timed.
async fn reservations(
    handler: &Handler,
    stream: &StreamName,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let quantity = Quantity::new(1)?;
    let mut timings = Vec::with_capacity(n);
    for _ in 0..n {
        let order_id = OrderId(Uuid::now_v7());
        let reserve = ProductCommand::ReserveStock {
            order_id,
            quantity,
            reserved_at: Utc::now(),
            placed_at: None,
        };
        let started = Instant::now();
        let outcomes = handler
            .execute_batch::<ProductAggregate>(stream, &[(envelope(), reserve)])
            .await?;
        timings.push(started.elapsed());
        anyhow::ensure!(
            outcomes.iter().all(Result::is_ok),
            "the reservation was decided"
        );
        let ship = ProductCommand::ShipReservedStock {
            order_id,
            shipped_at: Utc::now(),
        };
        handler
            .execute_batch::<ProductAggregate>(stream, &[(envelope(), ship)])
            .await?;
    }
    Ok(timings)
}

/// Cold loads (and their yardstick) timed per measure; the median is reported.
const COLD_LOADS: usize = 5;

/// The median time of [`COLD_LOADS`] runs of `load`.
async fn median_of_cold_loads<T, E, F, Fut>(load: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    anyhow::Error: From<E>,
{
    let mut timings = Vec::with_capacity(COLD_LOADS);
    for _ in 0..COLD_LOADS {
        let started = Instant::now();
        load().await?;
        timings.push(started.elapsed());
    }
    timings.sort_unstable();
    Ok(at_quantile(&timings, 0.5))
}

fn envelope() -> Envelope {
    Envelope::request(Uuid::now_v7(), "system:bench")
}

fn percentiles(mut timings: Vec<Duration>) -> String {
    timings.sort_unstable();
    let micros = |q: f64| at_quantile(&timings, q).as_secs_f64() * 1e6;
    format!("{:.1} / {:.1}", micros(0.5), micros(0.99))
}

/// The timing at quantile `q` of `sorted` (zero when there is none).
fn at_quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or_default()
}

fn format_ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}
