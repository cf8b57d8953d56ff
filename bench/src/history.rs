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
//!   PostgreSQL; next to it, the yardstick: the same rows read with a bare `select`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use orderly_command_api::{Envelope, Handler};
use orderly_domain::product::{ProductAggregate, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::{Currency, Money, OrderId, ProductName, Quantity, Sku};
use orderly_event_schemas::products::{ProductRegistered, ReservedStockShipped, StockReserved};
use orderly_event_schemas::{Event, ProductEvent};
use orderly_event_store::memory::MemoryEventStore;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions, migrate, migration_fingerprint};
use orderly_event_store::{EventStore, MAX_EVENTS_PER_APPEND, StreamName};
use orderly_test_support::TestDb;
use orderly_testdata::workload::Append;
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
    /// Also fold each history from PostgreSQL (ORDERLY_TEST_DATABASE_URL, see README).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    postgres: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    println!("# product history benchmark\n");
    println!("- machine: {}", report::machine());
    println!(
        "- {} decisions timed per measure, one task; medians and p99 in microseconds\n",
        args.decisions
    );
    println!(
        "| orders in history | events | placement load p50 / p99 | reservation p50 / p99 | cold load, memory | cold load, PostgreSQL | bare select of the rows |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let db = if args.postgres {
        Some(
            TestDb::create(
                "bench-history",
                &migration_fingerprint(),
                |url| async move { migrate(&url.parse()?).await.map_err(Into::into) },
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the benchmark database: {e}"))?,
        )
    } else {
        None
    };
    for (round, &orders) in args.histories.iter().enumerate() {
        let sku = Sku::parse(format!("HIST-{round}"))?;
        let stream = StreamName::parse(streams::product(&sku))?;
        let history = history(&sku, orders)?;
        let events = history.len();

        let memory: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
        write(memory.as_ref(), &stream, &history).await?;
        let handler = Handler::optimistic(memory);
        let started = Instant::now();
        handler.load::<ProductAggregate>(&stream).await?;
        let cold_memory = started.elapsed();
        let placement = placement_loads(&handler, &stream, args.decisions).await?;
        let reservation = reservations(&handler, &stream, args.decisions).await?;

        let (cold_pg, bare) = match &db {
            Some(db) => {
                let store: Arc<dyn EventStore> =
                    Arc::new(PgEventStore::connect(db.url(), PgStoreOptions::default())?);
                write(store.as_ref(), &stream, &history).await?;
                let client = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                client.batch_execute("analyze events").await?;
                let started = Instant::now();
                Handler::new(store)
                    .load::<ProductAggregate>(&stream)
                    .await?;
                let cold = started.elapsed();
                let select = client
                    .prepare(
                        "select version, event_type, data, metadata from events
                         where stream = $1 order by version",
                    )
                    .await?;
                let started = Instant::now();
                let rows = client.query(&select, &[&stream.as_str()]).await?;
                anyhow::ensure!(rows.len() == events, "the bare select read every event");
                (format_ms(cold), format_ms(started.elapsed()))
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "| {orders} | {events} | {} | {} | {} | {cold_pg} | {bare} |",
            percentiles(placement),
            percentiles(reservation),
            format_ms(cold_memory),
        );
    }
    Ok(())
}

/// The product's registration, then `orders` orders reserved and shipped.
fn history(sku: &Sku, orders: usize) -> anyhow::Result<Vec<Event>> {
    let at = Utc::now();
    let quantity = Quantity::new(1)?;
    let price = Money::new(1999, Currency::parse("EUR")?)?;
    let stock = u32::try_from(orders)?.saturating_add(1_000_000);
    let mut events = vec![ProductEvent::from(ProductRegistered {
        sku: sku.clone(),
        name: ProductName::parse("History mug")?,
        description: None,
        price,
        initial_stock: stock,
        registered_at: at,
    })];
    for _ in 0..orders {
        let order_id = OrderId(Uuid::now_v7());
        events.push(
            StockReserved {
                sku: sku.clone(),
                order_id,
                quantity,
                reserved_at: at,
            }
            .into(),
        );
        events.push(
            ReservedStockShipped {
                sku: sku.clone(),
                order_id,
                quantity,
                shipped_at: at,
            }
            .into(),
        );
    }
    Ok(events.into_iter().map(Event::from).collect())
}

/// Appends `events` to the new stream `stream`, as many per append as the store takes.
async fn write(
    store: &dyn EventStore,
    stream: &StreamName,
    events: &[Event],
) -> anyhow::Result<()> {
    let mut expected = None;
    for chunk in events.chunks(MAX_EVENTS_PER_APPEND) {
        let append = Append {
            stream: stream.as_str().to_owned(),
            expected,
            events: chunk.to_vec(),
        };
        let written = append.append_to(store).await?;
        expected = Some(written.next_expected_version);
    }
    Ok(())
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

fn envelope() -> Envelope {
    Envelope::request(Uuid::now_v7(), "system:bench")
}

fn percentiles(mut timings: Vec<Duration>) -> String {
    timings.sort_unstable();
    let at = |q: f64| {
        let index = ((timings.len() as f64 * q) as usize).min(timings.len().saturating_sub(1));
        timings.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    format!("{:.1} / {:.1}", at(0.5), at(0.99))
}

fn format_ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}
