//! Reads through GraphQL over HTTP next to a bare axum + tokio-postgres handler running the same
//! SQL, and the visibility lag from an acknowledged placeOrder to the query that sees it.
//!
//! 1. Seed: a workload history (through the domain's deciders, orders of 1-5 lines that move
//!    through the saga's statuses) written straight into `events`, then `rebuild --all`, so the
//!    read models hold what the log says and the checkpoints stand at its head.
//! 2. Throughput: the read API served in-process as `orderly read-api` serves it (auth, rate
//!    limit off, request limits, consistency extension), and beside it a bare axum handler (no
//!    authentication) with a deadpool of the same size sending the very statements `ReadStore`
//!    sends (`orderly_read_api::statements`), prepared and cached per connection, answering
//!    the same JSON (checked once before measuring). `connections` tasks, each with its
//!    keep-alive connection, send one read after the other: `order(id)` of a random existing
//!    order, or the newest 20 orders with what a list shows (id, status, total, lines' SKU and
//!    quantity). The four scenarios run one after the other.
//! 3. Visibility lag: the whole service as `orderly serve` runs it (projection runners in
//!    this process). A few customers each place orders one after the other; right after each
//!    acknowledged placeOrder, `order(id)` with the mutation's token, STRICT, waits on the
//!    projection hub. Timed: acknowledgement -> query answer (each customer's first placement
//!    is a warm-up, not timed). Every answer must show the order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deadpool_postgres::Pool;
use orderly_command_api::CommandService;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_graphql::Role;
use orderly_projections::tables::{ORDER_LINES, ORDERS};
use orderly_projections::{ProjectionName, RebuildOptions, rebuild_many};
use orderly_read_api::statements;
use orderly_service::app::{App, Part};
use orderly_service::settings::Settings;
use orderly_test_support::TestDb;
use orderly_testdata::workload::WorkloadOptions;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::place_order::{self, PLACE, SECRET};
use crate::rebuild::write_events;
use crate::report::{self, Outcome, REQUEST_HEADER};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each throughput scenario is measured, after a warm-up of a fifth of that.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections of the throughput scenarios.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Database connections of each server: the read API's `db_pool_size` and the bare
    /// handler's pool.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// Events of the seeded history (one order in eight or nine events).
    #[arg(long, default_value_t = 150_000)]
    events: usize,
    /// placeOrder mutations of the visibility-lag phase.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Concurrent customers placing them.
    #[arg(long, default_value_t = 4)]
    lag_clients: usize,
}

/// What a frontend asks for one order and for a list of them.
const ORDER_QUERY: &str = "query($id: UUID!) { order(id: $id) { id status total { amountMinor currency } lines { sku quantity } } }";
const PAGE_QUERY: &str = "{ orders(first: 20) { nodes { id status total { amountMinor currency } lines { sku quantity } } pageInfo { hasNextPage } } }";
const PAGE: i64 = 20;

const LAG_QUERY: &str =
    "query($id: UUID!, $c: ConsistencyInput) { order(id: $id, consistency: $c) { id status } }";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = report::service_database("bench-read").await?;
    println!("# read benchmark\n");
    println!("- machine: {}", report::machine());
    let version = report::server_version(&db).await?;
    println!("- server: {version}");
    let ids = seed(&db, args.events).await?;
    let mut settings = Settings::with_database(db.url());
    settings.http.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.auth.jwt_secret = Some(SECRET.into());
    settings.http.rate_limit_per_second = 0;
    settings.store.pool_size = args.pool_size;
    println!(
        "- throughput: {} connections (HTTP/1.1 keep-alive), {} s measured after {} s warm-up per scenario, pool of {} connections per server",
        args.connections,
        args.seconds,
        args.seconds as f64 / 5.0,
        args.pool_size
    );
    println!(
        "- visibility lag: {} placeOrder from {} customers, each followed by a STRICT order(id) with its token\n",
        args.orders, args.lag_clients
    );
    throughput(&args, &settings, &db, ids).await?;
    visibility_lag(&args, &settings, &db).await
}

/// Writes the history and builds the read models from it; returns the ids of the orders.
async fn seed(db: &TestDb, events: usize) -> anyhow::Result<Arc<Vec<Uuid>>> {
    let client = db.connect().await.map_err(|e| anyhow!("{e}"))?;
    let started = Instant::now();
    // The prefix keeps the workload's SKUs apart from the products the lag phase registers.
    let options = WorkloadOptions {
        seed: 6,
        products: 500,
        customers: 5000,
        open_orders: 2000,
        prefix: "W-".to_owned(),
    };
    let written = write_events(&client, events, options).await?;
    let store = Arc::new(PgEventStore::new(
        db.config().clone(),
        PgStoreOptions::default(),
    )?);
    rebuild_many(
        db.config(),
        store,
        &ProjectionName::ALL,
        &RebuildOptions::default(),
        |_| {},
    )
    .await?;
    client.batch_execute("vacuum analyze").await?;
    let ids: Vec<Uuid> = client
        .query("select order_id from orders", &[])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let lines: i64 = client
        .query_one("select count(*) from order_lines", &[])
        .await?
        .try_get(0)?;
    anyhow::ensure!(!ids.is_empty(), "the seeded history holds no orders");
    println!(
        "- read model: {} orders with {lines} lines, from {written} events (seeded and rebuilt in {:.1} s)",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(Arc::new(ids))
}

/// A server running in this process until `stop` is cancelled.
struct Served {
    base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Served {
    fn app(app: App) -> Self {
        let base = format!("http://{}", app.local_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        Self { base, stop, task }
    }

    async fn bare(pool: Pool) -> anyhow::Result<Self> {
        let router = axum::Router::new()
            .route("/orders/{id}", get(bare_order))
            .route("/orders", get(bare_page))
            .with_state(pool);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(Into::into)
        });
        Ok(Self { base, stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// The four scenarios, then GraphQL / bare for each read.
async fn throughput(
    args: &Args,
    settings: &Settings,
    db: &TestDb,
    ids: Arc<Vec<Uuid>>,
) -> anyhow::Result<()> {
    let graphql = Served::app(App::build_part(settings, Part::Reads).await?);
    let bare = Served::bare(orderly_graphql::pg_pool(db.config(), args.pool_size)?).await?;
    let admin =
        place_order::issuer()?.issue("bench-admin", &[Role::Admin], Duration::from_secs(3600))?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let reads = Reads {
        http,
        graphql: format!("{}/graphql", graphql.base),
        bare: bare.base.clone(),
        admin: Arc::new(admin),
        ids,
    };
    reads.check_equivalent().await?;

    println!("{REQUEST_HEADER}");
    let mut outcomes = Vec::new();
    for (name, read) in [
        ("order(id), GraphQL", Read::GraphqlOrder),
        ("order(id), bare", Read::BareOrder),
        ("20-order page, GraphQL", Read::GraphqlPage),
        ("20-order page, bare", Read::BarePage),
    ] {
        let reads = reads.clone();
        let (operations, latency_us) =
            report::closed_loop(args.connections, args.seconds, move |_, _| {
                reads.clone().send(read)
            })
            .await?;
        let outcome = Outcome {
            name: name.to_owned(),
            writers: args.connections,
            operations,
            events: operations,
            elapsed: Duration::from_secs(args.seconds),
            latency_us,
        };
        println!("{}", outcome.request_row());
        outcomes.push(outcome);
    }
    println!("\n| read | GraphQL / bare, req/s |\n|---|---|");
    for (what, pair) in ["order(id)", "20-order page"]
        .iter()
        .zip(outcomes.chunks(2))
    {
        let rate = |o: &Outcome| o.operations as f64 / o.elapsed.as_secs_f64();
        println!(
            "| {what} | {:.0}% (target: at least 60%) |",
            100.0 * rate(&pair[0]) / rate(&pair[1])
        );
    }
    graphql.stop().await?;
    bare.stop().await
}

#[derive(Clone, Copy)]
enum Read {
    GraphqlOrder,
    BareOrder,
    GraphqlPage,
    BarePage,
}

/// What the load tasks share. Cheap to clone.
#[derive(Clone)]
struct Reads {
    http: reqwest::Client,
    graphql: String,
    bare: String,
    admin: Arc<String>,
    ids: Arc<Vec<Uuid>>,
}

impl Reads {
    fn random_id(&self) -> Uuid {
        self.ids[fastrand::usize(..self.ids.len())]
    }

    /// One read; its answer must hold what was asked for.
    async fn send(self, read: Read) -> anyhow::Result<()> {
        let answer = self.fetch(read, self.random_id()).await?;
        let data = &answer["data"];
        let found = match read {
            Read::GraphqlOrder | Read::BareOrder => data["order"].is_object(),
            Read::GraphqlPage | Read::BarePage => {
                data["orders"]["nodes"].as_array().map(Vec::len) == Some(PAGE as usize)
            }
        };
        anyhow::ensure!(
            found && answer.get("errors").is_none(),
            "unexpected answer: {answer}"
        );
        Ok(())
    }

    async fn fetch(&self, read: Read, id: Uuid) -> anyhow::Result<Value> {
        let graphql = |query: &str, variables: Value| {
            self.http
                .post(&self.graphql)
                .bearer_auth(self.admin.as_str())
                .json(&json!({ "query": query, "variables": variables }))
        };
        let request = match read {
            Read::GraphqlOrder => graphql(ORDER_QUERY, json!({ "id": id })),
            Read::GraphqlPage => graphql(PAGE_QUERY, json!({})),
            Read::BareOrder => self.http.get(format!("{}/orders/{id}", self.bare)),
            Read::BarePage => self.http.get(format!("{}/orders", self.bare)),
        };
        let response = request.send().await?;
        let status = response.status();
        let answer: Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "status {status}: {answer}");
        Ok(answer)
    }

    /// Both servers answer the same data for the same order and page, so both do the same
    /// work.
    async fn check_equivalent(&self) -> anyhow::Result<()> {
        let id = self.random_id();
        for (graphql, bare) in [
            (Read::GraphqlOrder, Read::BareOrder),
            (Read::GraphqlPage, Read::BarePage),
        ] {
            let (graphql, bare) = (self.fetch(graphql, id).await?, self.fetch(bare, id).await?);
            anyhow::ensure!(
                graphql["data"] == bare["data"],
                "the bare handler answers differently:\n{graphql}\n{bare}"
            );
        }
        Ok(())
    }
}

/// A bare handler's failure: logged nowhere, answered as a 500 the load task stops on.
struct Failed(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failed {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": self.0.to_string() })),
        )
            .into_response()
    }
}

async fn bare_order(State(pool): State<Pool>, Path(id): Path<Uuid>) -> Result<Json<Value>, Failed> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(statements::order()).await?;
    let Some(row) = client.query_opt(&statement, &[&id]).await? else {
        return Ok(Json(json!({ "data": { "order": null } })));
    };
    let mut orders = vec![order_json(&row)?];
    add_lines(&client, &[id], &mut orders).await?;
    Ok(Json(json!({ "data": { "order": orders.pop() } })))
}

async fn bare_page(State(pool): State<Pool>) -> Result<Json<Value>, Failed> {
    let client = pool.get().await?;
    // The read API's page statement without filters: its one parameter is the page size.
    let statement = client
        .prepare_cached(&statements::orders_page("", "", 1))
        .await?;
    // One more than the page, as the read API asks, to know whether another page follows.
    let rows = client.query(&statement, &[&(PAGE + 1)]).await?;
    let has_next_page = rows.len() > PAGE as usize;
    let rows = &rows[..rows.len().min(PAGE as usize)];
    let ids = rows
        .iter()
        .map(|row| row.try_get(const { ORDERS.index("order_id") }))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let mut orders = rows.iter().map(order_json).collect::<Result<Vec<_>, _>>()?;
    add_lines(&client, &ids, &mut orders).await?;
    Ok(Json(json!({ "data": { "orders": {
        "nodes": orders,
        "pageInfo": { "hasNextPage": has_next_page } } } })))
}

fn order_json(row: &tokio_postgres::Row) -> anyhow::Result<Value> {
    let id: Uuid = row.try_get(const { ORDERS.index("order_id") })?;
    let status: &str = row.try_get(const { ORDERS.index("status") })?;
    let total: i64 = row.try_get(const { ORDERS.index("total_minor") })?;
    let currency: &str = row.try_get(const { ORDERS.index("currency") })?;
    Ok(json!({ "id": id, "status": status,
        "total": { "amountMinor": total, "currency": currency }, "lines": [] }))
}

/// Fills the `lines` of `orders`, whose ids are `ids` in the same order, in one statement.
async fn add_lines(
    client: &deadpool_postgres::Client,
    ids: &[Uuid],
    orders: &mut [Value],
) -> anyhow::Result<()> {
    let statement = client.prepare_cached(statements::lines()).await?;
    for row in client.query(&statement, &[&ids]).await? {
        let id: Uuid = row.try_get(const { ORDER_LINES.index("order_id") })?;
        let sku: &str = row.try_get(const { ORDER_LINES.index("sku") })?;
        let quantity: i32 = row.try_get(const { ORDER_LINES.index("quantity") })?;
        let order = ids
            .iter()
            .position(|asked| *asked == id)
            .context("a line of an order not asked for")?;
        if let Some(lines) = orders
            .get_mut(order)
            .and_then(|order| order["lines"].as_array_mut())
        {
            lines.push(json!({ "sku": sku, "quantity": quantity }));
        }
    }
    Ok(())
}

/// Placements, each followed by the STRICT read of its order; prints the lag table.
async fn visibility_lag(args: &Args, settings: &Settings, db: &TestDb) -> anyhow::Result<()> {
    let service = CommandService::new(Arc::new(PgEventStore::new(
        db.config().clone(),
        PgStoreOptions::default(),
    )?));
    place_order::register_products(&service).await?;
    drop(service);
    let served = Served::app(App::build(settings).await?);
    let url = format!("{}/graphql", served.base);
    let http = reqwest::Client::new();
    let issuer = place_order::issuer()?;
    let clients = args.lag_clients.max(1);
    let tasks = (0..clients).map(|client| {
        let token = issuer.issue(
            &format!("bench-customer-{client}"),
            &[Role::Customer],
            Duration::from_secs(3600),
        );
        let (http, url) = (http.clone(), url.clone());
        let count = (client..args.orders).step_by(clients).count();
        tokio::spawn(async move {
            let token = token?;
            let mut lag_us = report::histogram();
            let mut missed = 0u64;
            // One more placement than timed: the first opens this customer's connection and
            // finds the server's statements unprepared, which says nothing about the lag.
            for placement in 0..=count {
                let (a, b) = place_order::two_products();
                let body =
                    json!({ "query": PLACE, "variables": place_order::place_variables(a, b) });
                let placed = report::post_graphql(&http, &url, &token, &body).await?;
                let acknowledged = Instant::now();
                let result = &placed["data"]["placeOrder"];
                let (Some(id), Some(at_least)) = (result["id"].as_str(), result["token"].as_str())
                else {
                    anyhow::bail!("placeOrder failed: {placed}");
                };
                let consistency =
                    json!({ "atLeast": at_least, "mode": "STRICT", "timeoutMs": 5000 });
                let body =
                    json!({ "query": LAG_QUERY, "variables": { "id": id, "c": consistency } });
                let seen = report::post_graphql(&http, &url, &token, &body).await?;
                if placement > 0 {
                    lag_us.saturating_record(acknowledged.elapsed().as_micros() as u64);
                }
                if seen["data"]["order"]["id"].as_str() != Some(id) {
                    missed += 1;
                }
            }
            anyhow::Ok((missed, lag_us))
        })
    });
    // `gather` adds up its first number: here the reads that did not see their order.
    let (missed, lag_us) = report::gather(tasks).await?;
    served.stop().await?;
    let ms = |us: u64| us as f64 / 1000.0;
    println!("\n| visibility lag | placements | p50 ms | p99 ms | max ms | stale or failed |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| placeOrder ack -> order(id) STRICT answer | {} | {:.2} | {:.2} | {:.2} | {missed} |",
        lag_us.len(),
        ms(lag_us.value_at_quantile(0.50)),
        ms(lag_us.value_at_quantile(0.99)),
        ms(lag_us.max()),
    );
    anyhow::ensure!(missed == 0, "{missed} reads did not see their order");
    Ok(())
}
