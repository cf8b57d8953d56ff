//! Rebuild: replay the log into a shadow copy while the live tables keep serving, check the
//! copy, and swap it in atomically.
//!
//! 1. Shadow: `orderly_shadow.<table>` for each of the projection's tables, made with
//!    `create table ... (like public.<table> including all)` less the secondary indexes (built
//!    once at the end, which is far cheaper than maintaining them row by row); its checkpoint
//!    is a row in `projection_rebuilds`. When both exist already, an interrupted rebuild
//!    resumes there, unless asked to start fresh (`RebuildOptions::fresh`, on its first
//!    attempt) or the copy failed its checks (which drops its checkpoint).
//! 2. Replay: the same handlers as the live runner, on a connection whose `search_path` puts
//!    `orderly_shadow` first, one transaction per batch with the shadow checkpoint. A reader
//!    task fetches the next page while the current one is applied (two pages in flight at
//!    most, so memory stays flat however long the log); it reads the events' JSON as the
//!    stored text (`EventStore::read_all_raw`) and decodes payloads from it, with no JSON tree
//!    in between. [`rebuild_many`] reads the log once for several projections and applies
//!    their shares side by side.
//! 3. Finish: build the secondary indexes and run the consistency checks (see `checks`), two
//!    at a time on two connections, then analyze the tables. When a check fails the live
//!    tables stay, and so does the shadow, for inspection.
//! 4. Swap, in one transaction: lock the live checkpoint row (which holds off the live runner's
//!    next batch, and the retry of a dead letter); apply to the shadow whatever the live runner
//!    applied beyond the shadow's checkpoint; move each live table to `orderly_retired` and the
//!    shadow table to `public`; drop the retired ones; set the live checkpoint to the later of
//!    the two. The live runner's next batch finds its checkpoint moved (or not, when it was
//!    ahead) and goes on from there: nothing is lost or applied twice across the swap.
//!
//! Index and constraint names survive the swap because the migrations let PostgreSQL choose
//! them, and `like ... including all` chooses the same names in the shadow schema.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orderly_event_store::postgres::PgConfig;
use orderly_event_store::{EventFilter, EventStore, Position, RawRecordedEvent, RecordedEvent};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::batch::{self, BatchResult, Connection, Target};
use crate::error::ProjectionError;
use crate::handlers;
use crate::model::{DeadLetterPolicy, ProjectionName, to_i64};
use crate::watch::{self, ProjectionUpdate};

pub const SHADOW_SCHEMA: &str = "orderly_shadow";
pub const RETIRED_SCHEMA: &str = "orderly_retired";

/// What a rebuild's own connections run with: no limit on a statement's time, whatever the
/// server sets for its live traffic (see `open_shadow`). The swap, which holds the live
/// tables, bounds its waits with `RebuildOptions::swap_lock_timeout` instead.
const NO_STATEMENT_TIMEOUT: &str = "set statement_timeout = 0";

/// How often the swap tries to take the live tables before the rebuild gives up (resumable).
const SWAP_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events read and applied per transaction.
    pub batch_size: usize,
    pub policy: DeadLetterPolicy,
    /// Longest wait for the table locks of the swap before giving up (and trying again).
    pub swap_lock_timeout: Duration,
    /// Start from the start of the log even where an interrupted rebuild left a copy: one
    /// made by an earlier build of the handlers (a fix since) or before a migration changed
    /// the live tables must not be resumed.
    pub fresh: bool,
}

impl RebuildOptions {
    /// Larger batches than the live runner's: an order's events spread over tens of thousands
    /// of events of the log, and each batch that meets an order again loads and updates it
    /// again. At 20,000 a rebuild of the benchmark's log ran about a fifth faster than at
    /// 5,000, and the CLI's peak memory stayed under 200 MiB (BENCHMARKS.md).
    pub const DEFAULT_BATCH_SIZE: usize = 20_000;
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            batch_size: Self::DEFAULT_BATCH_SIZE,
            policy: DeadLetterPolicy::SkipAndPark,
            swap_lock_timeout: Duration::from_secs(2),
            fresh: false,
        }
    }
}

/// Reported after each applied batch of the replay.
#[derive(Debug, Clone)]
pub struct RebuildProgress {
    pub projections: Vec<ProjectionName>,
    pub position: Position,
    /// Events of the log read so far in this run (a resumed run counts from where it resumed).
    pub events: u64,
    /// Events of the log after the shadow's checkpoint when this run started, when the log is
    /// in this database: the progress bar's length.
    pub total: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: ProjectionName,
    pub events: u64,
    /// From the start to the swap's commit.
    pub elapsed: Duration,
    /// Of `elapsed`, the replay into the shadow tables (all projections of the pass); the rest
    /// went to indexes, checks, statistics and the swap.
    pub replay: Duration,
    pub position: Position,
    pub resumed: bool,
    /// Row count per table after the swap.
    pub rows: Vec<(String, i64)>,
}

/// Rebuilds `name` and swaps it in; see the module docs.
pub async fn rebuild(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    name: ProjectionName,
    options: &RebuildOptions,
    progress: impl FnMut(&RebuildProgress),
) -> Result<RebuildReport, ProjectionError> {
    let mut reports = rebuild_many(pg_config, store, &[name], options, progress).await?;
    reports
        .pop()
        .ok_or_else(|| ProjectionError::UnknownProjection(name.as_str().to_owned()))
}

/// A page of the log as the rebuild's reader hands it on: one decoded share per shadow.
struct Page {
    /// Events of the log in the page, whoever wants them.
    read: u64,
    last: Position,
    shares: Vec<handlers::Decoded>,
}

/// One projection's share of a rebuild: its connection (search path: shadow first) and where
/// its shadow copy is.
struct Shadow {
    name: ProjectionName,
    client: Connection,
    position: Position,
    resumed: bool,
}

/// Rebuilds several projections in one pass over the log: each page is read and decoded once
/// and its events go to the projection that wants them, the projections applying side by side
/// on connections of their own. Each is then verified and swapped in on its own.
///
/// An attempt that fails on a database that may come back (a restart, a failover, a cut
/// connection, a deadlock: [`ProjectionError::is_transient`]) is followed by another after a
/// pause that doubles from a second to half a minute, which resumes from the shadow
/// checkpoints, up to [`REBUILD_ATTEMPTS`] in all: a long rebuild does not die on a blip.
/// Anything else ends it at once (it resumes when started again).
pub async fn rebuild_many(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    names: &[ProjectionName],
    options: &RebuildOptions,
    mut progress: impl FnMut(&RebuildProgress),
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let mut attempt = 1;
    let mut pause = Duration::from_secs(1);
    // Asked fresh, each projection starts over once: a later attempt resumes the copy an
    // earlier one began, and only that (a copy left from before is dropped first).
    let mut started_fresh = HashSet::new();
    loop {
        let outcome = rebuild_once(
            pg_config,
            store.clone(),
            names,
            options,
            &mut started_fresh,
            &mut progress,
        )
        .await;
        match outcome {
            Err(error) if error.is_transient() && attempt < REBUILD_ATTEMPTS => {
                tracing::warn!(%error, attempt, ?pause, "rebuild interrupted; resuming after a pause");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Attempts of a rebuild, the first included, while each fails on a database that may come
/// back (about a minute and a half of pauses in all).
const REBUILD_ATTEMPTS: u32 = 8;

/// `started_fresh`: the projections whose copy an earlier attempt of a fresh rebuild began.
async fn rebuild_once(
    pg_config: &PgConfig,
    store: Arc<dyn EventStore>,
    names: &[ProjectionName],
    options: &RebuildOptions,
    started_fresh: &mut HashSet<ProjectionName>,
    mut progress: impl FnMut(&RebuildProgress),
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let started = Instant::now();
    let mut shadows = Vec::with_capacity(names.len());
    for &name in names {
        let fresh = options.fresh && !started_fresh.contains(&name);
        shadows.push(open_shadow(pg_config, name, fresh).await?);
        if fresh {
            started_fresh.insert(name);
        }
    }
    let Some(start) = shadows.iter().map(|s| s.position).min() else {
        return Ok(Vec::new());
    };
    let filter = match names {
        [one] => one.filter(),
        _ => EventFilter::All,
    };
    let categories: Vec<&str> = names.iter().flat_map(|n| n.categories()).copied().collect();
    let total = remaining(&shadows[0].client, &categories, start).await;
    let page_size = options.batch_size.max(1);
    let mut events_read = 0u64;
    let since: Vec<(ProjectionName, Position)> =
        shadows.iter().map(|s| (s.name, s.position)).collect();
    let (reader, mut pages) = read_ahead(store.clone(), start, filter, page_size, since);
    while let Some(page) = pages.recv().await {
        let page = page?;
        events_read += page.read;
        if let Err(error) = apply_page(&mut shadows, page.shares, options).await {
            reader.abort();
            return Err(error);
        }
        progress(&RebuildProgress {
            projections: names.to_vec(),
            position: page.last,
            events: events_read,
            total,
        });
    }
    let replay = started.elapsed();
    let mut reports = Vec::with_capacity(shadows.len());
    for mut shadow in shadows {
        let finished = finish(
            &mut shadow,
            pg_config,
            store.as_ref(),
            options,
            events_read,
            (started, replay),
        )
        .await?;
        reports.push(finished);
    }
    Ok(reports)
}

/// Reads the log from `start` a page at a time on a task of its own, one page ahead of the
/// write-back, each event decoded into the share of the projection that wants it.
///
/// The reader takes the channel's one slot before it reads, which it gets once the page before
/// has been taken: so the page being applied and the next one are all that is in memory, and
/// the JSON work overlaps the write-back. Categories of different projections never overlap,
/// so each event goes to one share; `since` holds each projection's shadow checkpoint, at or
/// below which it already has the events.
fn read_ahead(
    store: Arc<dyn EventStore>,
    start: Position,
    filter: EventFilter,
    page_size: usize,
    since: Vec<(ProjectionName, Position)>,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::Receiver<Result<Page, ProjectionError>>,
) {
    let (tx, rx) = mpsc::channel::<Result<Page, ProjectionError>>(1);
    let reader = tokio::spawn(async move {
        let mut after = start;
        loop {
            let Ok(slot) = tx.reserve().await else {
                return;
            };
            let events = match store.read_all_raw(after, &filter, page_size).await {
                Ok(events) => events,
                Err(error) => {
                    slot.send(Err(error.into()));
                    return;
                }
            };
            let Some(last) = events.last().map(|e| e.position) else {
                return;
            };
            after = last;
            let read = events.len() as u64;
            let mut buckets: Vec<Vec<RawRecordedEvent>> =
                since.iter().map(|_| Vec::new()).collect();
            for event in events {
                let category = event.stream.category();
                if let Some(i) = since
                    .iter()
                    .position(|&(name, at)| event.position > at && handlers::wants(name, category))
                {
                    buckets[i].push(event);
                }
            }
            let shares = since
                .iter()
                .zip(buckets)
                .map(|(&(name, _), bucket)| handlers::decode(name, bucket))
                .collect();
            slot.send(Ok(Page { read, last, shares }));
        }
    });
    (reader, rx)
}

/// Applies one page's shares to their shadows, the projections' batches at the same time.
async fn apply_page(
    shadows: &mut [Shadow],
    shares: Vec<handlers::Decoded>,
    options: &RebuildOptions,
) -> Result<(), ProjectionError> {
    let applied = shadows
        .iter_mut()
        .zip(shares)
        .filter(|(_, share)| !share.events.is_empty())
        .map(|(shadow, share)| async move {
            let result = batch::apply_batch(
                &mut shadow.client,
                shadow.name,
                Target::Shadow,
                shadow.position,
                share,
                options.policy,
                false,
            )
            .await?;
            match result {
                BatchResult::Committed(done) => {
                    shadow.position = done.position;
                    Ok(())
                }
                BatchResult::Moved(_) => Err(ProjectionError::Busy(format!(
                    "the shadow checkpoint of {} moved under this rebuild",
                    shadow.name
                ))),
            }
        });
    futures::future::try_join_all(applied).await?;
    Ok(())
}

async fn open_shadow(
    pg_config: &PgConfig,
    name: ProjectionName,
    fresh: bool,
) -> Result<Shadow, ProjectionError> {
    let client = batch::connect(pg_config, "rebuild").await?;
    // `drop table if exists` and `create schema if not exists` chatter otherwise. A shadow
    // batch need not wait for its WAL flush: a server crash can only lose the last batches
    // together with their shadow checkpoint, and the rebuild resumes before them. The shadow
    // tables grow from nothing with no statistics, so the batches' prepared statements are
    // planned for each execution: a plan kept from the first batches would scan them whole.
    // Even so the statistics lag behind the growth (autovacuum analyzes now and then), and a
    // plan made on them scans a table whole, or hashes it, for a batch's few thousand keys,
    // which made a replay slower the longer the log. Every statement of a batch finds its rows
    // by key, so scans and hash joins are off until the replay is done (see `finish`).
    // A rebuild's statements take as long as the log makes them (an index build over every
    // order), so a `statement_timeout` set on the server for live traffic does not apply.
    client
        .batch_execute(&format!(
            "set client_min_messages = warning; set synchronous_commit = off;
             set plan_cache_mode = force_custom_plan;
             set enable_seqscan = off; set enable_hashjoin = off; {NO_STATEMENT_TIMEOUT}"
        ))
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
    let resumed = prepare_shadow(&client, name, fresh).await?;
    client
        .batch_execute(&format!("set search_path = {SHADOW_SCHEMA}, public"))
        .await?;
    let position = batch::checkpoint(&client, name, Target::Shadow).await?;
    Ok(Shadow {
        name,
        client,
        position,
        resumed,
    })
}

/// Indexes, checks and swaps in one caught-up shadow copy.
async fn finish(
    shadow: &mut Shadow,
    pg_config: &PgConfig,
    store: &dyn EventStore,
    options: &RebuildOptions,
    events: u64,
    (started, replay): (Instant, Duration),
) -> Result<RebuildReport, ProjectionError> {
    let name = shadow.name;
    // The checks read whole tables.
    shadow
        .client
        .batch_execute("reset enable_seqscan; reset enable_hashjoin")
        .await?;
    // The index builds and the checks do not depend on one another; a second connection runs
    // them two at a time, which the replay's two busy cores are free for by now.
    let helper = batch::connect(pg_config, "rebuild").await?;
    helper
        .batch_execute(&format!(
            "set client_min_messages = warning; set search_path = {SHADOW_SCHEMA}, public;
             {NO_STATEMENT_TIMEOUT}"
        ))
        .await?;
    let clients = [&*shadow.client, &*helper];
    let mut jobs = index_builds(&shadow.client, name).await?;
    jobs.extend(
        checks(name)
            .iter()
            .map(|&(what, sql)| Job::Check { what, sql }),
    );
    if let Err(error) = run_jobs(&clients, name, &jobs).await {
        // A copy that failed a check is kept for inspection, but never resumed: the next
        // rebuild would only fail the same check, or swap in a copy the fix did not rebuild.
        if matches!(error, ProjectionError::Verification { .. }) {
            shadow
                .client
                .execute(
                    "delete from projection_rebuilds where projection = $1",
                    &[&name.as_str()],
                )
                .await?;
        }
        return Err(error);
    }
    // Statistics once the indexes exist (an expression index gets its own), before the tables
    // go live: the read API's and the runner's plans need them, and autovacuum would only get
    // to it later.
    let analyze: Vec<Job> = name
        .tables()
        .iter()
        .map(|table| Job::Execute(format!("analyze {SHADOW_SCHEMA}.{table}")))
        .collect();
    run_jobs(&clients, name, &analyze).await?;
    drop(helper);
    // Readers hold the live tables for a moment at a time; a swap that cannot get them in
    // `swap_lock_timeout` rolls back (readers go on) and tries again a little later.
    let mut attempt = 1;
    let position = loop {
        match swap(&mut shadow.client, store, name, shadow.position, options).await {
            Err(error) if error.is_transient() && attempt < SWAP_ATTEMPTS => {
                tracing::warn!(projection = %name, %error, attempt, "swap did not get its locks, retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                attempt += 1;
            }
            outcome => break outcome?,
        }
    };
    let mut rows = Vec::new();
    for table in name.tables() {
        let count: i64 = shadow
            .client
            .query_one(&format!("select count(*) from public.{table}"), &[])
            .await?
            .try_get(0)?;
        rows.push(((*table).to_owned(), count));
    }
    watch::notify(
        &shadow.client,
        &ProjectionUpdate {
            projection: name.as_str().to_owned(),
            position,
            order_ids: Vec::new(),
            // Every order may have changed: listeners should reload what they watch.
            truncated: true,
            traceparent: None,
        },
    )
    .await;
    Ok(RebuildReport {
        projection: name,
        events,
        elapsed: started.elapsed(),
        replay,
        position,
        resumed: shadow.resumed,
        rows,
    })
}

/// Creates the shadow tables and checkpoint, or finds them from an interrupted run (`true`)
/// unless `fresh`.
async fn prepare_shadow(
    client: &Client,
    name: ProjectionName,
    fresh: bool,
) -> Result<bool, ProjectionError> {
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
    if has_checkpoint && shadow_tables == tables.len() as i64 && !fresh {
        return Ok(true);
    }
    let mut ddl = format!("create schema if not exists {SHADOW_SCHEMA};");
    for table in &tables {
        ddl.push_str(&format!(
            "drop table if exists {SHADOW_SCHEMA}.{table};
             create table {SHADOW_SCHEMA}.{table} (like public.{table} including all);"
        ));
    }
    // Secondary indexes are left out while replaying and built once at the end: one sort per
    // index instead of an index insert per row version, and updates can stay HOT.
    for (index, _) in secondary_indexes(client, &tables).await? {
        ddl.push_str(&format!("drop index if exists {SHADOW_SCHEMA}.{index};"));
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

/// The live tables' indexes that back no constraint, as (name, definition).
async fn secondary_indexes(
    client: &Client,
    tables: &[String],
) -> Result<Vec<(String, String)>, ProjectionError> {
    let rows = client
        .query(
            "select x.relname::text, pg_get_indexdef(i.indexrelid)
             from pg_index i
             join pg_class x on x.oid = i.indexrelid
             join pg_class t on t.oid = i.indrelid
             join pg_namespace n on n.oid = t.relnamespace
             where n.nspname = 'public' and t.relname = any($1)
               and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)
             order by x.relname",
            &[&tables],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

/// One step of [`finish`] that may run beside the others.
enum Job {
    Execute(String),
    /// A consistency check of [`checks`]: `sql` counts the rows that break it.
    Check {
        what: &'static str,
        sql: &'static str,
    },
}

/// Runs `jobs` over `clients`, each client taking the next job when it is done with one, so
/// jobs listed first start first.
async fn run_jobs(
    clients: &[&Client],
    name: ProjectionName,
    jobs: &[Job],
) -> Result<(), ProjectionError> {
    async fn work(
        client: &Client,
        name: ProjectionName,
        jobs: &[Job],
        next: &AtomicUsize,
    ) -> Result<(), ProjectionError> {
        while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
            match job {
                Job::Execute(sql) => client.batch_execute(sql).await?,
                Job::Check { what, sql } => {
                    let bad: i64 = client.query_one(*sql, &[]).await?.try_get(0)?;
                    if bad != 0 {
                        return Err(ProjectionError::Verification {
                            projection: name.as_str().to_owned(),
                            reason: format!("{what}: {bad}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }
    let next = AtomicUsize::new(0);
    futures::future::try_join_all(clients.iter().map(|client| work(client, name, jobs, &next)))
        .await?;
    Ok(())
}

/// The statements that build on the shadow tables the secondary indexes the live ones have,
/// with the same names; GIN indexes first, as they take longest to build.
async fn index_builds(client: &Client, name: ProjectionName) -> Result<Vec<Job>, ProjectionError> {
    let tables: Vec<String> = name.tables().iter().map(|t| (*t).to_owned()).collect();
    let mut builds: Vec<String> = secondary_indexes(client, &tables)
        .await?
        .into_iter()
        .map(|(index, definition)| {
            // pg_get_indexdef gives `CREATE INDEX <name> ON public.<table> USING ...`.
            definition
                .replacen(" ON public.", &format!(" ON {SHADOW_SCHEMA}."), 1)
                .replacen(
                    &format!("CREATE INDEX {index} "),
                    &format!("CREATE INDEX IF NOT EXISTS {index} "),
                    1,
                )
        })
        .collect();
    builds.sort_by_key(|sql| !sql.contains(" USING gin "));
    Ok(builds.into_iter().map(Job::Execute).collect())
}

/// Events after `position` in the PostgreSQL log, for the progress bar; `None` elsewhere.
async fn remaining(client: &Client, categories: &[&str], position: Position) -> Option<u64> {
    client
        .query_one(
            "select count(*) from events where (tx_id, seq) > ($1, $2) and category = any($3)",
            &[
                &to_i64(position.commit),
                &to_i64(position.prepare),
                &categories,
            ],
        )
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i64>(0).ok())
        .map(|n| n.max(0) as u64)
}

/// What "verifies" means: the shadow's tables agree with one another, each figure computed two
/// independent ways (by rows, and by the running aggregates the handlers kept).
///
/// - orders: every order has lines, a search document and a `PLACED` history entry; the number of orders equals
///   the sum of `customers.order_count` and of `daily_sales.orders`; cancelled orders equal the
///   sum of `daily_sales.cancelled`; per currency, the totals of orders not cancelled equal the
///   sum of lifetime values and the sum of daily revenue; every order's version is at least
///   its newest history entry's.
/// - products: `available = on_hand - reserved >= 0` for every row (also a table constraint).
fn checks(name: ProjectionName) -> &'static [(&'static str, &'static str)] {
    match name {
        ProjectionName::Orders => &[
            (
                "orders without lines",
                "select count(*) from orders o
                 where not exists (select 1 from order_lines l where l.order_id = o.order_id)",
            ),
            (
                "orders without a search document",
                "select count(*) from orders o
                 where not exists (select 1 from order_search s where s.order_id = o.order_id)",
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
    }
}

/// The atomic swap; returns the live checkpoint it set. Runs on the shadow connection (search
/// path: shadow first), so the catch-up inside it writes the shadow tables.
async fn swap(
    client: &mut Connection,
    store: &dyn EventStore,
    name: ProjectionName,
    shadow: Position,
    options: &RebuildOptions,
) -> Result<Position, ProjectionError> {
    // The live checkpoint row must exist to be locked.
    batch::checkpoint(client, name, Target::Live).await?;
    let tx = client.transaction().await?;
    // The swap moves the live checkpoint, which readers then wait on: unlike the shadow
    // batches before it, its commit must be durable (see `batch::connect`).
    tx.batch_execute(&format!(
        "set local lock_timeout = {}; set local synchronous_commit = on",
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
            .read_all(at, &name.filter(), options.batch_size.max(1))
            .await?
            .into_iter()
            .take_while(|e| e.position <= live)
            .collect();
        let Some(last) = events.last().map(|e| e.position) else {
            break;
        };
        let batch = handlers::decode(name, events);
        let outcome =
            handlers::apply(name, &tx, batch, options.policy, &Default::default()).await?;
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
