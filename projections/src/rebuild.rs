//! Rebuild: replay the log into a shadow copy while the live tables keep serving, check the
//! copy, and swap it in atomically.
//!
//! 1. Shadow: `orderly_shadow.<table>` for each of the projection's tables, made with
//!    `create table ... (like public.<table> including all)`; its checkpoint is a row in
//!    `projection_rebuilds`. When both exist already, an interrupted rebuild resumes there.
//! 2. Replay: the same handlers as the live runner, on a connection whose `search_path` puts
//!    `orderly_shadow` first, one transaction per batch with the shadow checkpoint. A reader
//!    task fetches the next page while the current one is applied (two pages in flight at most).
//! 3. Verify (see [`verify`]): internal consistency checks on the shadow tables; on failure the
//!    live tables stay, and so does the shadow, for inspection.
//! 4. Swap, in one transaction: lock the live checkpoint row (which holds off the live runner's
//!    next batch, and the retry of a dead letter); apply to the shadow whatever the live runner
//!    applied beyond the shadow's checkpoint; move each live table to `orderly_retired` and the
//!    shadow table to `public`; drop the retired ones; set the live checkpoint to the later of
//!    the two. The live runner's next batch finds its checkpoint moved (or not, when it was
//!    ahead) and goes on from there: nothing is lost or applied twice across the swap.
//!
//! Index and constraint names survive the swap because the migrations let PostgreSQL choose
//! them, and `like ... including all` chooses the same names in the shadow schema.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orderly_event_store::postgres::PgConfig;
use orderly_event_store::{EventFilter, EventStore, Position, RecordedEvent};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

use crate::batch::{self, BatchResult, Target};
use crate::error::ProjectionError;
use crate::handlers;
use crate::model::{DeadLetterPolicy, ProjectionName, to_i64};
use crate::watch::{self, ProjectionUpdate};

pub const SHADOW_SCHEMA: &str = "orderly_shadow";
pub const RETIRED_SCHEMA: &str = "orderly_retired";

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events read and applied per transaction.
    pub batch_size: usize,
    pub policy: DeadLetterPolicy,
    /// Longest wait for the table locks of the swap before giving up (and trying again).
    pub swap_lock_timeout: Duration,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: 5000,
            policy: DeadLetterPolicy::SkipAndPark,
            swap_lock_timeout: Duration::from_secs(10),
        }
    }
}

/// Reported after each applied batch of the replay.
#[derive(Debug, Clone)]
pub struct RebuildProgress {
    pub projection: ProjectionName,
    pub position: Position,
    /// Events read so far in this run (resumed runs count from where they resumed).
    pub events: u64,
    /// Events of the log after the shadow's checkpoint when this run started, when the log is
    /// in this database: the progress bar's length.
    pub total: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: ProjectionName,
    pub events: u64,
    pub elapsed: Duration,
    pub position: Position,
    pub resumed: bool,
    /// Row count per table after the swap.
    pub rows: Vec<(String, i64)>,
}

async fn connect(pg_config: &PgConfig) -> Result<Client, ProjectionError> {
    let (client, connection) = pg_config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "rebuild connection closed");
        }
    });
    Ok(client)
}

/// Rebuilds `name` and swaps it in; see the module docs.
pub async fn rebuild(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    name: ProjectionName,
    options: &RebuildOptions,
    mut progress: impl FnMut(&RebuildProgress),
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let mut client = connect(pg_config).await?;
    // `drop table if exists` and `create schema if not exists` chatter otherwise.
    client
        .batch_execute("set client_min_messages = warning")
        .await?;
    let locked: bool = client
        .query_one("select pg_try_advisory_lock($1)", &[&name.rebuild_lock()])
        .await?
        .try_get(0)?;
    if !locked {
        return Err(ProjectionError::Busy(format!(
            "another process is rebuilding {name}"
        )));
    }
    let resumed = prepare_shadow(&client, name).await?;
    client
        .batch_execute(&format!("set search_path = {SHADOW_SCHEMA}, public"))
        .await?;
    let mut position = batch::checkpoint(&client, name, Target::Shadow).await?;
    let total = remaining(&client, position).await;
    let filter = EventFilter::All;
    let page = options.batch_size.max(1);
    let mut events_read = 0u64;

    // The reader runs one page ahead; the channel bounds what waits in memory.
    let (tx, mut rx) = mpsc::channel::<Result<Vec<RecordedEvent>, ProjectionError>>(1);
    let reader_store = store.clone();
    let reader_filter = filter.clone();
    let reader = tokio::spawn(async move {
        let mut after = position;
        loop {
            match reader_store.read_all(after, &reader_filter, page).await {
                Ok(events) => {
                    let done = events.is_empty();
                    if let Some(last) = events.last() {
                        after = last.position;
                    }
                    if done || tx.send(Ok(events)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    let _ = tx.send(Err(error.into())).await;
                    return;
                }
            }
        }
    });
    while let Some(events) = rx.recv().await {
        let events = events?;
        events_read += events.len() as u64;
        match batch::apply_batch(
            &mut client,
            name,
            Target::Shadow,
            position,
            events,
            options.policy,
            false,
        )
        .await?
        {
            BatchResult::Committed(done) => position = done.position,
            BatchResult::Moved(_) => {
                reader.abort();
                return Err(ProjectionError::Busy(format!(
                    "the shadow checkpoint of {name} moved under this rebuild"
                )));
            }
        }
        progress(&RebuildProgress {
            projection: name,
            position,
            events: events_read,
            total,
        });
    }
    verify(&client, name).await?;
    let position = swap(&mut client, store.as_ref(), name, position, options).await?;
    let mut rows = Vec::new();
    for table in name.tables() {
        let count: i64 = client
            .query_one(&format!("select count(*) from public.{table}"), &[])
            .await?
            .try_get(0)?;
        rows.push(((*table).to_owned(), count));
    }
    watch::notify(
        &client,
        &ProjectionUpdate {
            projection: name.as_str().to_owned(),
            position,
            order_ids: Vec::new(),
            // Every order may have changed: listeners should reload what they watch.
            truncated: true,
        },
    )
    .await;
    Ok(RebuildReport {
        projection: name,
        events: events_read,
        elapsed: started.elapsed(),
        position,
        resumed,
        rows,
    })
}

/// Creates the shadow tables and checkpoint, or finds them from an interrupted run (`true`).
async fn prepare_shadow(client: &Client, name: ProjectionName) -> Result<bool, ProjectionError> {
    let tables: Vec<String> = name.tables().iter().map(|t| (*t).to_owned()).collect();
    let row = client
        .query_one(
            "select exists (select 1 from projection_rebuilds where projection = $1),
                    (select count(*) from information_schema.tables
                     where table_schema = $2 and table_name = any($3))",
            &[&name.as_str(), &SHADOW_SCHEMA, &tables],
        )
        .await?;
    let has_checkpoint: bool = row.try_get(0)?;
    let shadow_tables: i64 = row.try_get(1)?;
    if has_checkpoint && shadow_tables == tables.len() as i64 {
        return Ok(true);
    }
    let mut ddl = format!("create schema if not exists {SHADOW_SCHEMA};");
    for table in &tables {
        ddl.push_str(&format!(
            "drop table if exists {SHADOW_SCHEMA}.{table};
             create table {SHADOW_SCHEMA}.{table} (like public.{table} including all);"
        ));
    }
    ddl.push_str(&format!(
        "delete from projection_rebuilds where projection = '{}';
         insert into projection_rebuilds (projection) values ('{}');",
        name.as_str(),
        name.as_str()
    ));
    client
        .batch_execute(&format!("begin; {ddl} commit;"))
        .await?;
    Ok(false)
}

/// Events after `position` in the PostgreSQL log, for the progress bar; `None` elsewhere.
async fn remaining(client: &Client, position: Position) -> Option<u64> {
    client
        .query_one(
            "select count(*) from events where (tx_id, seq) > ($1, $2)",
            &[&to_i64(position.commit), &to_i64(position.prepare)],
        )
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i64>(0).ok())
        .map(|n| n.max(0) as u64)
}

/// What "verifies" means: the shadow's tables agree with one another, each figure computed two
/// independent ways (by rows, and by the running aggregates the handlers kept).
///
/// - orders: every order has lines and a `PLACED` history entry; the number of orders equals
///   the sum of `customers.order_count` and of `daily_sales.orders`; cancelled orders equal the
///   sum of `daily_sales.cancelled`; per currency, the totals of orders not cancelled equal the
///   sum of lifetime values and the sum of daily revenue; every order's version is at least
///   its newest history entry's.
/// - products: `available = on_hand - reserved >= 0` for every row (also a table constraint).
pub async fn verify(client: &Client, name: ProjectionName) -> Result<(), ProjectionError> {
    let checks: &[(&str, &str)] = match name {
        ProjectionName::Orders => &[
            (
                "orders without lines",
                "select count(*) from orders o
                 where not exists (select 1 from order_lines l where l.order_id = o.order_id)",
            ),
            (
                "orders without a PLACED history entry",
                "select count(*) from orders o where not exists (select 1 from order_status_history h
                 where h.order_id = o.order_id and h.status = 'PLACED')",
            ),
            (
                "order count differs from the customers' order counts",
                "select abs((select count(*) from orders)
                          - (select coalesce(sum(order_count), 0) from customers))",
            ),
            (
                "order count differs from daily sales",
                "select abs((select count(*) from orders)
                          - (select coalesce(sum(orders), 0) from daily_sales))",
            ),
            (
                "cancelled orders differ from daily sales",
                "select abs((select count(*) from orders where status = 'CANCELLED')
                          - (select coalesce(sum(cancelled), 0) from daily_sales))",
            ),
            (
                "currencies whose order totals differ from lifetime values or revenue",
                "select count(*) from (
                    select currency, sum(total_minor) as t from orders
                    where status <> 'CANCELLED' group by currency) o
                 full join (select currency, sum(amount_minor) as v
                    from customer_lifetime_values group by currency) l using (currency)
                 full join (select currency, sum(revenue_minor) as r
                    from daily_sales group by currency) d using (currency)
                 where coalesce(o.t, 0) <> coalesce(l.v, 0) or coalesce(o.t, 0) <> coalesce(d.r, 0)",
            ),
            (
                "orders whose version is behind their history",
                "select count(*) from orders o
                 where o.version < (select max(version) from order_status_history h
                                    where h.order_id = o.order_id)",
            ),
        ],
        ProjectionName::Products => &[(
            "products with inconsistent stock",
            "select count(*) from products
             where available <> on_hand - reserved or available < 0 or reserved < 0",
        )],
    };
    for (what, sql) in checks {
        let bad: i64 = client.query_one(*sql, &[]).await?.try_get(0)?;
        if bad != 0 {
            return Err(ProjectionError::Verification {
                projection: name.as_str().to_owned(),
                reason: format!("{what}: {bad}"),
            });
        }
    }
    Ok(())
}

/// The atomic swap; returns the live checkpoint it set. Runs on the shadow connection (search
/// path: shadow first), so the catch-up inside it writes the shadow tables.
async fn swap(
    client: &mut Client,
    store: &dyn EventStore,
    name: ProjectionName,
    shadow: Position,
    options: &RebuildOptions,
) -> Result<Position, ProjectionError> {
    // The live checkpoint row must exist to be locked.
    batch::checkpoint(client, name, Target::Live).await?;
    let tx = client.transaction().await?;
    tx.batch_execute(&format!(
        "set local lock_timeout = {}",
        options.swap_lock_timeout.as_millis()
    ))
    .await?;
    let live = batch::lock_checkpoint(&tx, name, Target::Live)
        .await?
        .unwrap_or(Position::START);
    // The live runner may be ahead of the shadow; it is held off now, so bring the shadow to
    // exactly where the live tables are before they trade places.
    let mut at = shadow;
    while at < live {
        let events: Vec<RecordedEvent> = store
            .read_all(at, &EventFilter::All, options.batch_size.max(1))
            .await?
            .into_iter()
            .take_while(|e| e.position <= live)
            .collect();
        let Some(last) = events.last().map(|e| e.position) else {
            break;
        };
        let outcome =
            handlers::apply(name, &tx, events, options.policy, &Default::default()).await?;
        let parked: Vec<_> = outcome.parked.iter().chain(&outcome.stopped).collect();
        batch::park(&tx, name, &parked).await?;
        at = last;
    }
    let mut ddl = format!("create schema if not exists {RETIRED_SCHEMA};");
    for table in name.tables() {
        ddl.push_str(&format!(
            "drop table if exists {RETIRED_SCHEMA}.{table};
             alter table public.{table} set schema {RETIRED_SCHEMA};
             alter table {SHADOW_SCHEMA}.{table} set schema public;
             drop table {RETIRED_SCHEMA}.{table};"
        ));
    }
    tx.batch_execute(&ddl).await?;
    let position = live.max(at);
    batch::set_checkpoint(&tx, name, Target::Live, position).await?;
    tx.execute(
        "delete from projection_rebuilds where projection = $1",
        &[&name.as_str()],
    )
    .await?;
    tx.commit().await?;
    Ok(position)
}
