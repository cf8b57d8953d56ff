//! Fulfilment: the saga end to end, against a real `orderly serve` in a process of its own,
//! next to the single-event append rate of the same run.
//!
//! Each scenario gets a database of its own (an empty one, migrated by `orderly migrate`, dropped
//! after) and a fresh `orderly serve` on a free port: PostgreSQL event store, simulator gateway,
//! rate limiting off, and the HS256 secret this program signs its tokens with; everything else
//! at its default. With `--saga-processes N`, N `orderly saga run` processes run beside it.
//! The products are registered through GraphQL with a million units each, and every order pays
//! with `tok_ok`, so every order should end CONFIRMED. The PostgreSQL server is the one
//! `orderly-test-support` picks (`ORDERLY_TEST_DATABASE_URL`, else `ORDERLY_DATABASE_URL`'s
//! server, else postgres://postgres@127.0.0.1:5432). Each process writes its output to
//! `<database>-<n>.log` in the temporary directory; the logs are removed after a clean
//! scenario and kept when one fails. Every process is stopped (SIGTERM, then SIGKILL) on every
//! way out.
//!
//! - burst: `orders` placeOrder from `clients` customers flat out, each order one unit of one
//!   and two of another of `skus` products, both at random;
//! - hot: as many orders from as many customers, all of one unit of the same product (an order
//!   names a SKU at most once, so one line);
//! - paced: `paced_orders` orders of the burst's kind sent open loop at `--rate` per second
//!   (default: half the burst's placed/s), for latency under a load below the maximum;
//! - backlog (not run unless asked for): the burst's orders placed while no saga runs
//!   (`orderly command-api` and `orderly projections run` instead of `orderly serve`), then,
//!   longer than the payment deadline later, one `orderly saga run` started: how fast a saga
//!   back from an outage catches up, and whether every order still confirms. The deadlines are
//!   shortened for it ([`BACKLOG_PAYMENT_DEADLINE`], [`BACKLOG_STOCK_DEADLINE`]); its
//!   settled/s counts from the saga's start, its latencies from each placement (the outage
//!   included).
//!
//! Measured per scenario, from the moment the first placement is sent:
//! - placed/s: acknowledged placeOrder over the time to the last acknowledgement;
//! - settled/s: orders seen CONFIRMED or CANCELLED in the `orders` read model over the time to
//!   the last of them. A task polls the table every `poll_ms` for the acknowledged orders not
//!   yet seen settled; an order's latency runs from the sending of its placeOrder (paced: from
//!   when it was due, so a wait for a free request slot counts) to the sending of the poll
//!   whose snapshot first showed it settled, so it overstates by up to one interval;
//! - append conflicts per settled order: `orderly_append_conflicts_total` summed over every
//!   process's `/metrics`, after minus before;
//! - round trips per settled order: the database's `xact_commit + xact_rollback` in
//!   `pg_stat_database`, after minus before, less this program's polls. A proxy: it counts
//!   transactions, not statements, and holds the server's background work over the run (saga
//!   ticks, health sampling), whose idle rate is measured before the run and shown beside it;
//! - peak RSS: VmHWM of each server process at the end;
//! - CPU per settled order, from the first placement to the last settlement (`/proc`): of the
//!   `orderly` processes, of the PostgreSQL server when it runs on this machine (every process
//!   of its cluster, background work and this program's polls included), and of this program
//!   (its clients). The targets are rates on a shared machine; CPU per order is the cost behind
//!   them, and moves far less from one run to the next.
//!
//! The yardstick is the append benchmark's `orderly single` (one event to a fresh stream with
//! the expected-version check) at `clients` writers (at most 64), measured alone, on a database
//! of its own, before the scenarios and again after them. A shared machine's speed drifts
//! during a run (by a factor of two on some VMs); the ratios to it use the higher of the two,
//! so a machine that slowed down never flatters the placement rate.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use orderly_event_store::postgres::{migrate, migration_fingerprint};
use orderly_graphql::Role;
use orderly_test_support::TestDb;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::append::{self, Scenario};
use crate::cpu;
use crate::place_order::{self, PLACE, SECRET};
use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Orders of the burst and hot-SKU scenarios.
    #[arg(long, default_value_t = 2000)]
    orders: usize,
    /// Concurrent customers placing them (and the yardstick's writers, at most 64).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Products the burst and paced orders are drawn from (at least 2).
    #[arg(long, default_value_t = 50)]
    skus: usize,
    /// Orders of the paced scenario.
    #[arg(long, default_value_t = 1000)]
    paced_orders: usize,
    /// placeOrder per second in the paced scenario (default: half the burst's placed/s).
    #[arg(long)]
    rate: Option<f64>,
    /// Scenarios to run, comma-separated; paced needs burst or --rate.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "burst,hot,paced"
    )]
    scenarios: Vec<Kind>,
    /// Seconds a scenario may take from its first placement until every order is settled;
    /// past that it reports what it got and says it timed out.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Milliseconds between two polls of the read model.
    #[arg(long, default_value_t = 25)]
    poll_ms: u64,
    /// Seconds the single-event append yardstick is measured, after a fifth of that warm-up.
    #[arg(long, default_value_t = 5)]
    append_seconds: u64,
    /// The `orderly` binary (default: the one next to this program, as `cargo build
    /// --release --bin orderly` puts it).
    #[arg(long)]
    orderly_bin: Option<PathBuf>,
    /// `orderly saga run` processes to start beside `orderly serve` (whose own saga runner
    /// keeps running: no setting switches it off); the backlog scenario always starts one.
    #[arg(long, default_value_t = 0)]
    saga_processes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Burst,
    Hot,
    Paced,
    Backlog,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Burst => "burst",
            Self::Hot => "hot SKU",
            Self::Paced => "paced",
            Self::Backlog => "backlog",
        }
    }
}

/// The payment deadline of the backlog scenario: short, so that the outage can outlast it
/// in seconds, and long enough for a healthy charge under the catch-up's load.
const BACKLOG_PAYMENT_DEADLINE: Duration = Duration::from_secs(10);

/// The stock deadline of the backlog scenario, as short as the payment deadline's: it runs
/// from the sending of the reservations, and an order whose answers the catching-up saga
/// reaches later than this has them read from the products instead.
const BACKLOG_STOCK_DEADLINE: Duration = Duration::from_secs(5);

/// How long after the last placement of the backlog scenario the saga starts: past the
/// payment deadline of every order.
const BACKLOG_OUTAGE: Duration = Duration::from_secs(12);

/// Units of every product: no order is refused for stock.
const STOCK: i64 = 1_000_000;

/// How long after its last transaction an idle backend may still hold its statistics:
/// PostgreSQL 15 flushes them at most once a second, and a backend that goes idle within that
/// second waits up to 10 s (PGSTAT_IDLE_INTERVAL). Samples of `pg_stat_database` wait this
/// long after the work they are to include.
const STATS_FLUSH: Duration = Duration::from_secs(11);

/// Span over which the idle server's own transactions are counted, before the run.
const IDLE_SPAN: Duration = Duration::from_secs(4);

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a process has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Placements in flight at most in the paced scenario: an open-loop client keeps sending when
/// the server slows down, but not over an unbounded number of connections.
const MAX_IN_FLIGHT: usize = 256;

/// Most connections the append yardstick opens.
const MAX_WRITERS: usize = 64;

const TOKEN_TTL: Duration = Duration::from_secs(3600);

const REGISTER: &str =
    "mutation($input: RegisterProductInput!) { registerProduct(input: $input) { id } }";

/// Acknowledged orders among `$1` that the read model shows settled. A join, not `order_id =
/// any($1)`: with thousands pending the server tested each row against the whole list, and
/// the polls took a fifth of its CPU in a burst.
const SETTLED: &str = "select o.order_id, o.status from unnest($1::uuid[]) as p(order_id)
    join orders o using (order_id) where o.status in ('CONFIRMED', 'CANCELLED')";

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.skus >= 2,
        "--skus must be at least 2 (two lines per order)"
    );
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    let bin = orderly_bin(&args)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .timeout(REQUEST_TIMEOUT)
        .build()?;

    println!("# fulfilment benchmark\n");
    println!("- machine: {}", report::machine());
    let (append_before, server) = yardstick(&args).await?;
    println!("- server: {server}");
    println!("- orderly: {}", bin.display());
    println!(
        "- saga: {}",
        if args.saga_processes == 0 {
            "the runner inside `orderly serve`".to_owned()
        } else {
            format!(
                "the runner inside `orderly serve` (no setting switches it off) and {} `orderly \
                 saga run` process(es)",
                args.saga_processes
            )
        }
    );
    println!(
        "- orders: {} per scenario from {} customers (paced: {}); burst and paced: 1 + 2 units \
         of two of {} products; hot SKU: 1 unit of one product; all paid with tok_ok",
        args.orders, args.clients, args.paced_orders, args.skus
    );
    println!(
        "- settled: seen CONFIRMED or CANCELLED in `orders`, polled every {} ms; timeout {} s",
        args.poll_ms, args.timeout_secs
    );

    let mut reports: Vec<Report> = Vec::new();
    for kind in [Kind::Burst, Kind::Hot, Kind::Paced, Kind::Backlog] {
        if !args.scenarios.contains(&kind) {
            continue;
        }
        let plan = match kind {
            Kind::Burst | Kind::Backlog => Plan {
                kind,
                orders: args.orders,
                skus: args.skus,
                rate: None,
            },
            Kind::Hot => Plan {
                kind,
                orders: args.orders,
                skus: 1,
                rate: None,
            },
            Kind::Paced => {
                let burst = reports.iter().find(|r| r.kind == Kind::Burst);
                let Some(rate) = args.rate.or(burst.map(|b| b.placed_per_sec() / 2.0)) else {
                    bail!("the paced scenario needs --rate when burst does not run before it");
                };
                anyhow::ensure!(rate > 0.0, "the paced rate must be above zero");
                Plan {
                    kind,
                    orders: args.paced_orders,
                    skus: args.skus,
                    rate: Some(rate),
                }
            }
        };
        eprintln!("fulfil: {} ...", kind.name());
        let report = scenario(&args, &bin, &http, &plan).await?;
        eprintln!("fulfil: {} done", kind.name());
        reports.push(report);
    }
    let (append_after, _) = yardstick(&args).await?;
    let append_rate = append_before.max(append_after);
    println!(
        "- yardstick: single-event append (`orderly single` of the append benchmark), {} \
         writers, {} s: {append_before:.0} appends/s before the scenarios, {append_after:.0} \
         after; ratios use {append_rate:.0}",
        args.clients.min(MAX_WRITERS),
        args.append_seconds
    );
    print_reports(&reports, append_rate);
    Ok(())
}

/// The `orderly` binary: the flag's, else the one beside this program.
fn orderly_bin(args: &Args) -> anyhow::Result<PathBuf> {
    let bin = match &args.orderly_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's path has no directory")?
            .join("orderly"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "no orderly binary at {} (build it with `cargo build --release --bin orderly`, or pass \
         --orderly-bin)",
        bin.display()
    );
    Ok(bin)
}

/// The single-event append rate at the scenarios' concurrency, and the server's version.
async fn yardstick(args: &Args) -> anyhow::Result<(f64, String)> {
    let db = TestDb::create("bench-append", &migration_fingerprint(), |url| async move {
        migrate(&url.parse()?).await.map_err(Into::into)
    })
    .await
    .map_err(|e| anyhow!("cannot create the yardstick's database: {e}"))?;
    let version = report::server_version(&db).await?;
    let writers = args.clients.min(MAX_WRITERS);
    let append_args = append::Args {
        seconds: args.append_seconds,
        writers: vec![writers],
        rounds: 1,
    };
    let outcome = append::measure(&db, Scenario::OrderlySingle, writers, &append_args).await?;
    Ok((outcome.events_per_sec(), version))
}

/// One scenario's orders.
struct Plan {
    kind: Kind,
    orders: usize,
    /// Products the orders are drawn from; 1 is the hot-SKU scenario.
    skus: usize,
    /// Placements per second, sent open loop; `None`: `clients` customers flat out.
    rate: Option<f64>,
}

/// What one scenario measured.
struct Report {
    kind: Kind,
    orders: usize,
    /// The paced scenario's placements per second.
    rate: Option<f64>,
    placed: Placed,
    settled: Settled,
    /// Orders acknowledged but never seen settled (the scenario timed out).
    unsettled: usize,
    started: Instant,
    conflicts: f64,
    /// Transactions of the scenario's database over the run, this program's polls taken out.
    transactions: i64,
    /// Transactions per second of the idle server, counted before the run.
    idle_per_sec: f64,
    /// From the first sample of the transaction count to the last.
    counted_over: Duration,
    /// Process name and VmHWM in KiB.
    peak_rss_kib: Vec<(String, u64)>,
    /// From the first placement to the last settlement.
    cpu: Cpu,
    /// When the saga was started, in the backlog scenario.
    saga_started: Option<Instant>,
}

/// CPU time of the parts of a scenario; `None` where it could not be read (a process gone,
/// a server on another machine).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    orderly: Option<Duration>,
    postgres: Option<Duration>,
    this_program: Option<Duration>,
}

impl Cpu {
    fn now(service: &Service, postgres: Option<&cpu::Postgres>) -> Self {
        Self {
            orderly: service.cpu(),
            postgres: postgres.and_then(cpu::Postgres::cpu),
            this_program: cpu::of_this_program(),
        }
    }

    fn since(self, before: Cpu) -> Cpu {
        let spent = |after: Option<Duration>, before: Option<Duration>| after?.checked_sub(before?);
        Cpu {
            orderly: spent(self.orderly, before.orderly),
            postgres: spent(self.postgres, before.postgres),
            this_program: spent(self.this_program, before.this_program),
        }
    }

    /// Milliseconds per order of each part, as `orderly / PostgreSQL / this program`.
    fn per_order(&self, orders: u64) -> String {
        [self.orderly, self.postgres, self.this_program]
            .map(|spent| match spent {
                Some(spent) => {
                    format!("{:.2}", spent.as_secs_f64() * 1000.0 / orders.max(1) as f64)
                }
                None => "n/a".to_owned(),
            })
            .join(" / ")
    }
}

impl Report {
    fn placed_per_sec(&self) -> f64 {
        rate(self.placed.acknowledged, self.placed.last_ack, self.started)
    }

    /// Why this scenario's rates and latencies cannot judge a target: orders not placed, not
    /// seen settled, or none seen confirmed (an empty latency histogram reads 0).
    fn incomplete(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.placed.failed > 0 {
            why.push(format!("{} placements failed", self.placed.failed));
        }
        if self.unsettled > 0 || self.settled.timed_out {
            why.push(format!("{} unsettled at the timeout", self.unsettled));
        }
        if self.settled.confirmed == 0 {
            why.push("none confirmed".to_owned());
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    /// From the first placement, or in the backlog scenario from the saga's start.
    fn settled_per_sec(&self) -> f64 {
        let from = self.saga_started.unwrap_or(self.started);
        rate(self.settled.count(), self.settled.last, from)
    }

    /// The scenario, with its pace when it has one.
    fn name(&self) -> String {
        match self.rate {
            Some(rate) => format!("{} at {rate:.0}/s", self.kind.name()),
            None => self.kind.name().to_owned(),
        }
    }

    fn serve_rss_mb(&self) -> f64 {
        self.peak_rss_kib.first().map_or(0.0, |(_, kib)| mb(*kib))
    }
}

/// KiB, as /proc reports them, in MB (10^6 bytes), as the target is written.
fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// `count` over the time from `start` to `end`.
fn rate(count: u64, end: Option<Instant>, start: Instant) -> f64 {
    match end {
        Some(end) if end > start => count as f64 / (end - start).as_secs_f64(),
        _ => 0.0,
    }
}

/// Acknowledged orders not yet seen settled, with the moment their latency runs from (see
/// [`Placer::place`]); shared by the placing tasks and the poller.
type Pending = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// A fresh service, its products, the orders, and the figures.
async fn scenario(
    args: &Args,
    bin: &Path,
    http: &reqwest::Client,
    plan: &Plan,
) -> anyhow::Result<Report> {
    let backlog = plan.kind == Kind::Backlog;
    let topology = if backlog {
        Topology::SagaLater
    } else {
        Topology::Serve {
            saga_processes: args.saga_processes,
        }
    };
    let mut service = Service::start(bin, topology, http).await?;
    let graphql = format!("{}/graphql", service.base);
    let issuer = place_order::issuer()?;
    let admin = issuer.issue("bench-admin", &[Role::Admin], TOKEN_TTL)?;
    register_products(http, &graphql, &admin, plan.skus).await?;
    let tokens = (0..args.clients)
        .map(|client| {
            issuer.issue(
                &format!("bench-customer-{client}"),
                &[Role::Customer],
                TOKEN_TTL,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    // Connected and prepared before the first sample, so that only the polls count after it.
    let poller = service.db.connect().await.map_err(|e| anyhow!("{e}"))?;
    let settled_statement = poller.prepare(SETTLED).await?;
    let backend: i32 = poller
        .query_one("select pg_backend_pid()", &[])
        .await?
        .get(0);
    let postgres = cpu::Postgres::of_backend(backend);
    let stats = stats_client(&service.db).await?;
    let database = service.db.name().to_owned();
    tokio::time::sleep(STATS_FLUSH).await;
    let idle_from = (Instant::now(), transactions(&stats, &database).await?);
    tokio::time::sleep(IDLE_SPAN).await;
    let before = transactions(&stats, &database).await?;
    let counted_from = Instant::now();
    let idle_per_sec = (before - idle_from.1) as f64 / idle_from.0.elapsed().as_secs_f64();
    let conflicts_before = service.conflicts(http).await?;

    let pending: Pending = Arc::default();
    let placing_done = CancellationToken::new();
    // Ends the poller however this function returns.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let cpu_before = Cpu::now(&service, postgres.as_ref());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut follower = tokio::spawn(follow(
        poller,
        settled_statement,
        pending.clone(),
        placing_done.clone(),
        stop.clone(),
        deadline,
        Duration::from_millis(args.poll_ms.max(1)),
    ));
    let placer = Placer {
        http: http.clone(),
        url: Arc::from(graphql.as_str()),
        tokens: Arc::new(tokens),
        skus: plan.skus,
        pending: pending.clone(),
    };
    let mut placing = match plan.rate {
        None => tokio::spawn(closed_loop(placer, plan.orders, args.clients, deadline)),
        Some(rate) => tokio::spawn(paced(placer, plan.orders, rate, deadline)),
    };
    let placed = service.supervise(&mut placing).await??;
    placing_done.cancel();
    if placed.acknowledged == 0 {
        bail!(
            "no placeOrder was acknowledged; the first error: {}",
            placed.first_error.as_deref().unwrap_or("none")
        );
    }
    let mut saga_started = None;
    if backlog {
        tokio::time::sleep(BACKLOG_OUTAGE).await;
        saga_started = Some(Instant::now());
        service.start_saga(bin, http).await?;
    }
    let settled = service.supervise(&mut follower).await??;
    let cpu = Cpu::now(&service, postgres.as_ref()).since(cpu_before);
    let unsettled = pending.lock().map_err(|_| anyhow!("poisoned"))?.len();

    let peak_rss_kib = service.peak_rss_kib();
    let conflicts = service.conflicts(http).await? - conflicts_before;
    tokio::time::sleep(STATS_FLUSH).await;
    let after = transactions(&stats, &database).await?;
    let counted_over = counted_from.elapsed();
    service.finish().await?;
    Ok(Report {
        kind: plan.kind,
        orders: plan.orders,
        rate: plan.rate,
        transactions: after - before - settled.polls as i64,
        placed,
        settled,
        unsettled,
        started,
        conflicts,
        idle_per_sec,
        counted_over,
        peak_rss_kib,
        cpu,
        saga_started,
    })
}

/// A connection to the server's maintenance database, from where `pg_stat_database` is read
/// without adding transactions to the database measured.
async fn stats_client(db: &TestDb) -> anyhow::Result<Client> {
    let mut config = db.config().clone();
    config.dbname("postgres");
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Transactions committed and rolled back in `database` so far, as the statistics show them.
async fn transactions(stats: &Client, database: &str) -> anyhow::Result<i64> {
    let row = stats
        .query_one(
            "select xact_commit + xact_rollback from pg_stat_database where datname = $1",
            &[&database],
        )
        .await?;
    Ok(row.try_get(0)?)
}

async fn register_products(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    skus: usize,
) -> anyhow::Result<()> {
    for i in 0..skus {
        // The SKUs `place_order::place_variables` names.
        let input = json!({ "sku": format!("SKU-{i:05}"), "name": format!("Product {i}"),
            "priceMinor": 100 + i, "currency": "EUR", "initialStock": STOCK });
        let body = json!({ "query": REGISTER, "variables": { "input": input } });
        graphql(http, url, token, &body)
            .await
            .context("registering a product")?;
    }
    Ok(())
}

/// One GraphQL request; its answer, unless it carries errors.
async fn graphql(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let answer = report::post_graphql(http, url, token, body).await?;
    if answer.get("errors").is_some() {
        bail!("GraphQL errors: {answer}");
    }
    Ok(answer)
}

/// Places orders and notes each acknowledged one as pending. Cheap to clone.
#[derive(Clone)]
struct Placer {
    http: reqwest::Client,
    url: Arc<str>,
    tokens: Arc<Vec<String>>,
    skus: usize,
    pending: Pending,
}

impl Placer {
    /// One placeOrder as customer `client`, due at `due` (when it was sent, or when a paced
    /// run meant to send it): its place-to-settled latency runs from there.
    async fn place(&self, client: usize, due: Instant) -> Placement {
        let sent = Instant::now();
        let acknowledged = self.send(client).await.and_then(|id| {
            self.pending
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .insert(id, due);
            Ok(Instant::now())
        });
        Placement { sent, acknowledged }
    }

    async fn send(&self, client: usize) -> anyhow::Result<Uuid> {
        let variables = if self.skus == 1 {
            // place_variables' first line alone: one unit of SKU-00000.
            let mut variables = place_order::place_variables(0, 1);
            if let Some(lines) = variables["input"]["lines"].as_array_mut() {
                lines.truncate(1);
            }
            variables
        } else {
            let a = fastrand::usize(..self.skus);
            let b = (a + 1 + fastrand::usize(..self.skus - 1)) % self.skus;
            place_order::place_variables(a, b)
        };
        let body = json!({ "query": PLACE, "variables": variables });
        let token = &self.tokens[client % self.tokens.len()];
        let answer = graphql(&self.http, &self.url, token, &body).await?;
        let id = answer["data"]["placeOrder"]["id"]
            .as_str()
            .with_context(|| format!("placeOrder answered without an id: {answer}"))?;
        Ok(Uuid::parse_str(id)?)
    }
}

/// One placeOrder: when it was sent, and when it was acknowledged.
struct Placement {
    sent: Instant,
    acknowledged: anyhow::Result<Instant>,
}

/// The placements of a scenario, added up.
struct Placed {
    acknowledged: u64,
    failed: u64,
    first_error: Option<String>,
    last_ack: Option<Instant>,
    latency_us: Histogram<u64>,
}

impl Placed {
    fn new() -> Self {
        Self {
            acknowledged: 0,
            failed: 0,
            first_error: None,
            last_ack: None,
            latency_us: report::histogram(),
        }
    }

    fn add(&mut self, placement: Placement) {
        match placement.acknowledged {
            Ok(at) => {
                self.acknowledged += 1;
                self.last_ack = self.last_ack.max(Some(at));
                self.latency_us
                    .saturating_record((at - placement.sent).as_micros() as u64);
            }
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
}

/// `clients` customers each sending placeOrder after placeOrder until `orders` were sent or
/// the deadline passed.
async fn closed_loop(
    placer: Placer,
    orders: usize,
    clients: usize,
    deadline: Instant,
) -> anyhow::Result<Placed> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (placer, next) = (placer.clone(), next.clone());
            tokio::spawn(async move {
                let mut placements = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < orders && Instant::now() < deadline {
                    placements.push(placer.place(client, Instant::now()).await);
                }
                placements
            })
        })
        .collect();
    let mut placed = Placed::new();
    for task in futures::future::join_all(tasks).await {
        task?
            .into_iter()
            .for_each(|placement| placed.add(placement));
    }
    Ok(placed)
}

/// `orders` placeOrder sent at `rate` per second whatever the answers take (open loop), the
/// customers taking turns.
async fn paced(
    placer: Placer,
    orders: usize,
    rate: f64,
    deadline: Instant,
) -> anyhow::Result<Placed> {
    let start = tokio::time::Instant::now();
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = Vec::with_capacity(orders);
    for i in 0..orders {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
        if Instant::now() >= deadline {
            break;
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let placer = placer.clone();
        tasks.push(tokio::spawn(async move {
            let placement = placer.place(i, due.into_std()).await;
            drop(permit);
            placement
        }));
    }
    let mut placed = Placed::new();
    for task in futures::future::join_all(tasks).await {
        placed.add(task?);
    }
    Ok(placed)
}

/// What the poller saw.
struct Settled {
    confirmed: u64,
    cancelled: u64,
    /// When the last order was first seen settled.
    last: Option<Instant>,
    /// Placement (paced: when it was due) -> first seen settled, every settled order.
    to_settled_us: Histogram<u64>,
    /// The same, CONFIRMED orders only.
    to_confirmed_us: Histogram<u64>,
    /// Queries sent: transactions of this program in the measured database.
    polls: u64,
    /// Time the polls took, answer included, to show what they cost the server.
    polling: Duration,
    timed_out: bool,
}

impl Settled {
    fn count(&self) -> u64 {
        self.confirmed + self.cancelled
    }
}

/// Polls the read model for the pending orders until placing is done and none is pending, the
/// deadline passes, or `stop`.
async fn follow(
    client: Client,
    statement: Statement,
    pending: Pending,
    placing_done: CancellationToken,
    stop: CancellationToken,
    deadline: Instant,
    every: Duration,
) -> anyhow::Result<Settled> {
    let mut settled = Settled {
        confirmed: 0,
        cancelled: 0,
        last: None,
        // Up to the scenario's timeout: an order settling past a minute is recorded as such.
        to_settled_us: report::histogram_up_to(deadline - Instant::now()),
        to_confirmed_us: report::histogram_up_to(deadline - Instant::now()),
        polls: 0,
        polling: Duration::ZERO,
        timed_out: false,
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        // Read before the ids are taken: once placing is done, every acknowledged order is in.
        let done = placing_done.is_cancelled();
        let ids: Vec<Uuid> = pending
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .keys()
            .copied()
            .collect();
        if ids.is_empty() && done {
            break;
        }
        if Instant::now() >= deadline {
            settled.timed_out = true;
            break;
        }
        if ids.is_empty() {
            continue;
        }
        // The answer's snapshot is taken just after this: a row in it was settled by then.
        let asked = Instant::now();
        let rows = client.query(&statement, &[&ids]).await?;
        settled.polls += 1;
        settled.polling += asked.elapsed();
        let mut pending = pending.lock().map_err(|_| anyhow!("poisoned"))?;
        for row in rows {
            let id: Uuid = row.try_get(0)?;
            let status: &str = row.try_get(1)?;
            let Some(due) = pending.remove(&id) else {
                continue;
            };
            let us = asked.saturating_duration_since(due).as_micros() as u64;
            settled.to_settled_us.saturating_record(us);
            if status == "CONFIRMED" {
                settled.confirmed += 1;
                settled.to_confirmed_us.saturating_record(us);
            } else {
                settled.cancelled += 1;
            }
            settled.last = Some(asked);
        }
    }
    Ok(settled)
}

/// Which processes a scenario runs.
#[derive(Clone, Copy)]
enum Topology {
    /// `orderly serve`, and this many `orderly saga run` beside it.
    Serve { saga_processes: usize },
    /// `orderly command-api` and `orderly projections run`, and no saga until
    /// [`Service::start_saga`]; every process with [`BACKLOG_PAYMENT_DEADLINE`] and
    /// [`BACKLOG_STOCK_DEADLINE`].
    SagaLater,
}

/// `orderly serve` (or the command API and the projections), the saga processes beside it,
/// and their database. Dropping it stops the processes (SIGTERM, then SIGKILL) and then drops
/// the database.
struct Service {
    /// The process serving placeOrder first. Declared before `db`: fields drop in order, and
    /// the database is dropped only once nothing is connected to it.
    processes: Vec<Process>,
    db: TestDb,
    /// `http://127.0.0.1:<port>` of the process serving placeOrder.
    base: String,
    /// `/metrics` of every process: conflicts count wherever a command handler runs.
    metrics: Vec<String>,
    /// Settings of this scenario beyond [`orderly`]'s, for every process.
    settings: Vec<(&'static str, String)>,
}

impl Service {
    async fn start(bin: &Path, topology: Topology, http: &reqwest::Client) -> anyhow::Result<Self> {
        // An empty template: the database is migrated by `orderly migrate`, as an operator would.
        let db = TestDb::create("bench-fulfil-empty", "empty", |_| async { Ok(()) })
            .await
            .map_err(|e| anyhow!("cannot create the benchmark database: {e}"))?;
        let settings = match topology {
            Topology::Serve { .. } => Vec::new(),
            Topology::SagaLater => vec![
                (
                    "ORDERLY_PAYMENT_DEADLINE_SECS",
                    BACKLOG_PAYMENT_DEADLINE.as_secs().to_string(),
                ),
                (
                    "ORDERLY_SAGA_STOCK_DEADLINE_SECS",
                    BACKLOG_STOCK_DEADLINE.as_secs().to_string(),
                ),
            ],
        };
        let mut service = Self {
            processes: Vec::new(),
            db,
            base: String::new(),
            metrics: Vec::new(),
            settings,
        };
        let mut migrate = orderly(bin, service.db.url(), 0);
        migrate.arg("migrate");
        let output = tokio::task::spawn_blocking(move || migrate.output()).await??;
        anyhow::ensure!(
            output.status.success(),
            "orderly migrate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let parts: Vec<&[&str]> = match topology {
            Topology::Serve { saga_processes } => std::iter::once(&["serve"][..])
                .chain(std::iter::repeat_n(&["saga", "run"][..], saga_processes))
                .collect(),
            Topology::SagaLater => vec![&["command-api"], &["projections", "run"]],
        };
        for part in parts {
            service.spawn(bin, http, part).await?;
        }
        Ok(service)
    }

    /// One `orderly saga run` more.
    async fn start_saga(&mut self, bin: &Path, http: &reqwest::Client) -> anyhow::Result<()> {
        self.spawn(bin, http, &["saga", "run"]).await
    }

    /// `orderly <args>` on a free port, once it is ready; the first one serves placeOrder.
    async fn spawn(
        &mut self,
        bin: &Path,
        http: &reqwest::Client,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let i = self.processes.len();
        let port = free_port()?;
        let mut command = orderly(bin, self.db.url(), port);
        command.args(args);
        for (key, value) in &self.settings {
            command.env(key, value);
        }
        let mut name = format!("orderly {}", args.join(" "));
        if args == ["saga", "run"] {
            let sagas = self.processes.iter().filter(|p| p.name.starts_with(&name));
            name = format!("{name} #{}", sagas.count() + 1);
        }
        let log = std::env::temp_dir().join(format!("{}-{i}.log", self.db.name()));
        self.processes.push(Process::spawn(command, name, log)?);
        let base = format!("http://127.0.0.1:{port}");
        self.wait_ready(http, &base, i).await?;
        self.metrics.push(format!("{base}/metrics"));
        if i == 0 {
            self.base = base;
        }
        Ok(())
    }

    async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        base: &str,
        index: usize,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            if let Ok(answer) = http.get(format!("{base}/readyz")).send().await
                && answer.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= until {
                let process = &self.processes[index];
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; its output: {}",
                    process.name,
                    process.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error naming the first process that has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        for process in &mut self.processes {
            if let Some(status) = process.exited() {
                bail!(
                    "{} exited ({status}); its output: {}",
                    process.name,
                    process.log.display()
                );
            }
        }
        Ok(())
    }

    /// Awaits `task`, checking every second that the processes still run: if one exited,
    /// the task is aborted and the run ends with an error instead of waiting for a deadline.
    async fn supervise<T>(&mut self, task: &mut JoinHandle<T>) -> anyhow::Result<T> {
        let mut checks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                done = &mut *task => return Ok(done?),
                _ = checks.tick() => {
                    if let Err(error) = self.check_running() {
                        task.abort();
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Stops the processes and drops the database, then removes the processes' logs: nothing
    /// went wrong that they would explain. (Dropping a `Service` keeps them.)
    async fn finish(self) -> anyhow::Result<()> {
        let logs: Vec<PathBuf> = self.processes.iter().map(|p| p.log.clone()).collect();
        // Stopping waits for the processes, and dropping the database for the server: blocking.
        tokio::task::spawn_blocking(move || drop(self)).await?;
        for log in logs {
            let _ = std::fs::remove_file(log);
        }
        Ok(())
    }

    /// `orderly_append_conflicts_total` over every label and every process.
    async fn conflicts(&self, http: &reqwest::Client) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for url in &self.metrics {
            let text = http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            for line in text.lines() {
                // `name{labels} value`; a counter never incremented is not listed at all.
                if line.starts_with("orderly_append_conflicts_total")
                    && let Some(value) = line.split_whitespace().last()
                {
                    total += value.parse::<f64>().unwrap_or(0.0);
                }
            }
        }
        Ok(total)
    }

    /// CPU time of every process so far; `None` when one is gone.
    fn cpu(&self) -> Option<Duration> {
        self.processes
            .iter()
            .map(|process| cpu::of_process(process.child.id()))
            .sum()
    }

    fn peak_rss_kib(&self) -> Vec<(String, u64)> {
        self.processes
            .iter()
            .map(|process| (process.name.clone(), process.peak_rss_kib().unwrap_or(0)))
            .collect()
    }
}

/// `orderly` with the settings of this benchmark and none from this program's environment.
fn orderly(bin: &Path, database_url: &str, port: u16) -> Command {
    let mut command = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ORDERLY_") {
            command.env_remove(key);
        }
    }
    command
        .env("ORDERLY_DATABASE_URL", database_url)
        .env("ORDERLY_EVENT_STORE", "postgres")
        .env("ORDERLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("ORDERLY_JWT_SECRET", SECRET)
        .env("ORDERLY_PAYMENT_GATEWAY", "simulator")
        // Each customer would otherwise be held to 50 requests a second.
        .env("ORDERLY_RATE_LIMIT_PER_SECOND", "0")
        .env("ORDERLY_LOG_FORMAT", "text");
    command
}

/// A port free at this instant. A subprocess cannot be handed a bound listener, so another
/// program could take the port before the server binds it; the server then exits, and says
/// why in its log.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process that is stopped when dropped, on every path out of the benchmark.
struct Process {
    name: String,
    child: Child,
    /// Where its stdout and stderr go.
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, name: String, log: PathBuf) -> anyhow::Result<Self> {
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name, child, log })
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// VmHWM: the most resident memory the process has held, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_GRACE`]. Blocks.
    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // std sends no signal but SIGKILL, and the workspace has no libc binding: kill(1)
        // sends SIGTERM. The child has not been reaped (it was running just now), so its pid
        // is still its own.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + STOP_GRACE;
        while Instant::now() < until {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {STOP_GRACE:?} of SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn print_reports(reports: &[Report], append_rate: f64) {
    let ms = |histogram: &Histogram<u64>, q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "\n| scenario | orders | placed | failed | placed/s | placed/s ÷ append/s | settled | \
         CONFIRMED | CANCELLED | settled/s | settled/s ÷ placed/s | timed out |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {} | {} | {} | {:.1} | {:.3} | {} |",
            r.name(),
            r.orders,
            r.placed.acknowledged,
            r.placed.failed,
            r.placed_per_sec(),
            r.placed_per_sec() / append_rate,
            r.settled.count(),
            r.settled.confirmed,
            r.settled.cancelled,
            r.settled_per_sec(),
            r.settled_per_sec() / r.placed_per_sec(),
            if r.settled.timed_out {
                format!("yes, {} unsettled", r.unsettled)
            } else {
                "no".to_owned()
            }
        );
    }
    for r in reports {
        if let Some(error) = &r.placed.first_error {
            println!(
                "\n{}: {} placeOrder failed; the first: {error}",
                r.name(),
                r.placed.failed
            );
        }
    }

    println!(
        "\n| scenario | placeOrder p50 / p99 ms | place→settled p50 / p99 ms | \
         place→CONFIRMED p50 / p99 ms | conflicts / settled | round trips / settled | \
         CPU ms / settled: orderly / PostgreSQL / this program | peak RSS MB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in reports {
        let settled = r.settled.count().max(1) as f64;
        let rss = r
            .peak_rss_kib
            .iter()
            .map(|(name, kib)| format!("{name}: {:.0}", mb(*kib)))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.1} | {} | {rss} |",
            r.name(),
            ms(&r.placed.latency_us, 0.5),
            ms(&r.placed.latency_us, 0.99),
            ms(&r.settled.to_settled_us, 0.5),
            ms(&r.settled.to_settled_us, 0.99),
            ms(&r.settled.to_confirmed_us, 0.5),
            ms(&r.settled.to_confirmed_us, 0.99),
            r.conflicts / settled,
            r.transactions as f64 / settled,
            r.cpu.per_order(r.settled.count()),
        );
    }

    println!(
        "\nRound trips are a proxy: transactions (`xact_commit + xact_rollback` of \
         `pg_stat_database`) of the scenario's database from before the first placement to {} s \
         after the last settlement, less this program's polls, per settled order. They count \
         transactions, not statements, and include the server's background work:",
        STATS_FLUSH.as_secs()
    );
    for r in reports {
        println!(
            "- {}: {} transactions over {:.0} s; idle, the server ran {:.1} transactions/s ({:.2} \
             per settled order over that span); {} polls of the read model took {:.2} ms each \
             on average",
            r.name(),
            r.transactions,
            r.counted_over.as_secs_f64(),
            r.idle_per_sec,
            r.idle_per_sec * r.counted_over.as_secs_f64() / r.settled.count().max(1) as f64,
            r.settled.polls,
            r.settled.polling.as_secs_f64() * 1000.0 / r.settled.polls.max(1) as f64,
        );
    }

    println!("\n| target | measured | met |\n|---|---|---|");
    let find = |kind| reports.iter().find(|r| r.kind == kind);
    let row = |target: &str, measured: Option<f64>, met: fn(f64) -> bool, unit: &str| match measured
    {
        Some(value) => println!(
            "| {target} | {value:.2}{unit} | {} |",
            if met(value) { "yes" } else { "no" }
        ),
        None => println!("| {target} | not run | |"),
    };
    // A scenario that did not place and settle every order meets no target, whatever its
    // rates: they count only what was seen.
    let verdict = |target: &str,
                   report: Option<&Report>,
                   measure: &dyn Fn(&Report) -> f64,
                   met: fn(f64) -> bool,
                   unit: &str| match report.and_then(Report::incomplete) {
        Some(why) => println!("| {target} | {why} | no |"),
        None => row(target, report.map(measure), met, unit),
    };
    let burst = find(Kind::Burst);
    verdict(
        "burst: settled/s ≥ 0.5 × placed/s",
        burst,
        &|r| r.settled_per_sec() / r.placed_per_sec(),
        |v| v >= 0.5,
        "×",
    );
    verdict(
        "burst: placed/s ≥ 0.2 × single-event append/s",
        burst,
        &|r| r.placed_per_sec() / append_rate,
        |v| v >= 0.2,
        "×",
    );
    verdict(
        "hot SKU: settled/s ≥ 0.3 × placed/s",
        find(Kind::Hot),
        &|r| r.settled_per_sec() / r.placed_per_sec(),
        |v| v >= 0.3,
        "×",
    );
    verdict(
        "paced: p99 place→CONFIRMED < 250 ms",
        find(Kind::Paced),
        &|r| ms(&r.settled.to_confirmed_us, 0.99),
        |v| v < 250.0,
        " ms",
    );
    row(
        "peak RSS of orderly serve < 300 MB (largest over the scenarios)",
        reports
            .iter()
            .filter(|r| r.kind != Kind::Backlog)
            .map(Report::serve_rss_mb)
            .reduce(f64::max),
        |v| v < 300.0,
        " MB",
    );
    if let Some(r) = find(Kind::Backlog) {
        row(
            "backlog: share of the orders CONFIRMED (not cancelled for the outage)",
            Some(r.settled.confirmed as f64 / r.orders.max(1) as f64),
            |v| v >= 1.0,
            "",
        );
        println!(
            "\nBacklog: the orders were placed while no saga ran; one `orderly saga run` started \
             {} s after the last placement, longer than the payment deadline ({} s; the stock \
             deadline: {} s). Its settled/s counts from that start (catch-up rate); its \
             latencies run from each order's placement, the outage included.",
            BACKLOG_OUTAGE.as_secs(),
            BACKLOG_PAYMENT_DEADLINE.as_secs(),
            BACKLOG_STOCK_DEADLINE.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(failed: u64, unsettled: usize, confirmed: u64) -> Report {
        let mut placed = Placed::new();
        placed.acknowledged = 10;
        placed.failed = failed;
        Report {
            kind: Kind::Burst,
            orders: 10,
            rate: None,
            placed,
            settled: Settled {
                confirmed,
                cancelled: 0,
                last: None,
                to_settled_us: report::histogram(),
                to_confirmed_us: report::histogram(),
                polls: 0,
                polling: Duration::ZERO,
                timed_out: unsettled > 0,
            },
            unsettled,
            started: Instant::now(),
            conflicts: 0.0,
            transactions: 0,
            idle_per_sec: 0.0,
            counted_over: Duration::ZERO,
            peak_rss_kib: Vec::new(),
            cpu: Cpu {
                orderly: None,
                postgres: None,
                this_program: None,
            },
            saga_started: None,
        }
    }

    #[test]
    fn a_scenario_that_did_not_place_and_settle_every_order_judges_no_target() {
        assert_eq!(report(0, 0, 10).incomplete(), None);
        let why = |r: Report| r.incomplete().unwrap_or_default();
        assert!(why(report(2, 0, 10)).contains("2 placements failed"));
        assert!(why(report(0, 3, 7)).contains("3 unsettled at the timeout"));
        // An empty latency histogram reads 0 ms, which would pass any latency target.
        assert!(why(report(0, 0, 0)).contains("none confirmed"));
    }
}
