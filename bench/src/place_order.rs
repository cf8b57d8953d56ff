//! placeOrder through GraphQL over HTTP, next to the raw single-event append rate measured in
//! the same run on the same database.
//!
//! The command API is served in-process on 127.0.0.1:0 exactly as `orderly command-api` wires
//! it (the GraphQL edge's handler: auth, rate limit off, body limit, timeout; the command service on
//! the PostgreSQL event store, order ids keyed with a secret as `ORDERLY_JWT_SECRET` or
//! `ORDERLY_ORDER_ID_SECRET` makes them, and the order-id scheme in the same database). `clients` tasks each send placeOrder flat out, every
//! order with two lines priced from two of 100 products, a fresh idempotency key and its own
//! customer token. The saga runner is not running: this measures the command path (auth,
//! validation, the products' new events in one read unless the service read them less than
//! the default price max age ago (100 ms), the order decision, one append, whose order id and
//! event ids follow from the key). On a log that held orders before ids were keyed, a keyed
//! placement also reads whether the order exists under the id its key named publicly; this
//! log begins keyed, so the served placement skips that read, and a second placeOrder row
//! measures the same service as on such a log, with the read. Without the saga no product stream changes, so the reads
//! there find nothing new; with it they would find the reservations, which placement
//! does not need.
//! The yardstick is the append benchmark's `orderly single` scenario at the same concurrency
//! (at most 64 writers, one connection each, for the server's connection limit).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use orderly_command_api::{CommandService, OrderIdScheme, OrderIds, RegisterProduct};
use orderly_domain::values::{Currency, Money, ProductName, Sku};
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_graphql::{
    Actor, Authenticator, GraphqlLimits, JwtConfig, RateLimit, RateLimiter, Role, TokenIssuer,
};
use orderly_test_support::TestDb;
use serde_json::json;

use crate::append::{self, Scenario};
use crate::report::{self, HEADER, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds each scenario is measured, after a warm-up of a fifth of that.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,32,128")]
    clients: Vec<usize>,
    /// Rounds of the yardstick and placeOrder, interleaved, per client count; each rate is
    /// the median over rounds, so a slow spell of the machine does not decide the ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub(crate) const PRODUCTS: usize = 100;

/// Most connections the append yardstick opens.
const MAX_WRITERS: usize = 64;

pub(crate) const SECRET: &str = "bench-secret";

pub(crate) const PLACE: &str =
    "mutation($input: PlaceOrderInput!) { placeOrder(input: $input) { id version token } }";

fn fingerprint() -> String {
    format!(
        "{}/{}",
        orderly_event_store::postgres::migration_fingerprint(),
        orderly_command_api::migration_fingerprint()
    )
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let db = TestDb::create("bench-command", &fingerprint(), |url| async move {
        let config: tokio_postgres::Config = url.parse()?;
        orderly_event_store::postgres::migrate(&config).await?;
        orderly_command_api::migrate(&config).await?;
        Ok(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the benchmark database: {e}"))?;
    let admin = db.connect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("# placeOrder benchmark\n");
    println!("- machine: {}", report::machine());
    println!(
        "- window: {} s measured after {} s warm-up, per scenario; {} rounds with the \
         yardstick and placeOrder interleaved; median rate, latency over all rounds; no saga \
         runner",
        args.seconds,
        args.seconds as f64 / 5.0,
        args.rounds.max(1)
    );
    println!(
        "- placeOrder: 2 lines from {PRODUCTS} products, fresh idempotency key, HTTP/1.1 keep-alive\n"
    );
    println!("{HEADER}");
    let mut ratios = Vec::new();
    for &clients in &args.clients {
        // One connection per writer: past MAX_WRITERS the server (max_connections = 100 here)
        // would refuse them, so the yardstick runs at most that many.
        let writers = clients.min(MAX_WRITERS);
        let append_args = append::Args {
            seconds: args.seconds,
            writers: vec![writers],
            rounds: 1,
        };
        let (mut raws, mut placements, mut looking) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            admin
                .batch_execute("truncate events; checkpoint")
                .await
                .context("reset (needs a superuser)")?;
            raws.push(append::measure(&db, Scenario::OrderlySingle, writers, &append_args).await?);
            admin.batch_execute("truncate events; checkpoint").await?;
            placements.push(place_orders(&db, clients, args.seconds, Ids::Served).await?);
            admin.batch_execute("truncate events; checkpoint").await?;
            looking.push(place_orders(&db, clients, args.seconds, Ids::LookForPublic).await?);
        }
        let raw = Outcome::median(raws)?;
        let (placed, looking) = (Outcome::median(placements)?, Outcome::median(looking)?);
        println!("{}", raw.row());
        println!("{}", placed.row());
        println!("{}", looking.row());
        let ratio = |outcome: &Outcome| outcome.events_per_sec() / raw.events_per_sec();
        ratios.push((clients, ratio(&placed), ratio(&looking)));
    }
    println!(
        "\n| clients | placeOrder / single-event append | the same, looking for public ids |\n|---|---|---|"
    );
    for (clients, served, looking) in ratios {
        println!(
            "| {clients} | {:.0}% | {:.0}% |",
            served * 100.0,
            looking * 100.0
        );
    }
    Ok(())
}

/// How the served command API treats orders placed with an idempotency key.
#[derive(Clone, Copy)]
enum Ids {
    /// As served: keyed ids, and the order-id scheme, which on this log (begun keyed) says
    /// no publicly named order can exist.
    Served,
    /// Keyed ids without the scheme: every placement also looks for the publicly named
    /// order, as on a log that held orders before ids were keyed.
    LookForPublic,
}

impl Ids {
    fn service(self, store: Arc<PgEventStore>, db: &TestDb) -> anyhow::Result<CommandService> {
        let service = CommandService::new(store).with_order_ids(OrderIds::keyed(SECRET.as_bytes()));
        Ok(match self {
            Self::Served => {
                let pool = orderly_graphql::pg_pool(db.config(), 2)?;
                service.with_order_id_scheme(OrderIdScheme::new(pool))
            }
            Self::LookForPublic => service,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Served => "placeOrder (GraphQL)",
            Self::LookForPublic => "placeOrder (GraphQL, looking for public ids)",
        }
    }
}

/// Serves the command API on a free port; returns its base URL, the service, and the server
/// task (abort it, and drop the service, to close the connections).
async fn serve(
    db: &TestDb,
    ids: Ids,
) -> anyhow::Result<(String, CommandService, tokio::task::JoinHandle<()>)> {
    // The store's default pool, as `orderly command-api` opens it (`ORDERLY_DB_POOL_SIZE`).
    let store = Arc::new(PgEventStore::new(
        db.config().clone(),
        PgStoreOptions::default(),
    )?);
    let service = ids.service(store, db)?;
    let schema = orderly_command_api::schema(service.clone());
    let sdl = schema.sdl();
    let jwt = JwtConfig {
        secret: Some(SECRET.into()),
        ..Default::default()
    };
    let limiter = RateLimiter::new(RateLimit {
        per_second: 0,
        burst: 0,
    })?;
    let router = orderly_graphql::graphql_router(
        schema,
        None,
        sdl,
        Arc::new(Authenticator::new(&jwt)?),
        Arc::new(limiter),
        GraphqlLimits::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let _ = axum::serve(listener, service).await;
    });
    Ok((base, service, server))
}

pub(crate) async fn register_products(service: &CommandService) -> anyhow::Result<()> {
    let admin = Actor {
        sub: "bench-admin".into(),
        roles: vec![Role::Admin],
    };
    let eur = Currency::parse("EUR")?;
    for i in 0..PRODUCTS {
        let command = RegisterProduct {
            sku: Sku::parse(format!("SKU-{i:05}"))?,
            name: ProductName::parse(format!("Product {i}"))?,
            description: None,
            price: Money::new(100 + i as i64, eur)?,
            initial_stock: 1_000_000,
        };
        service
            .register_product(Some(&admin), command)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// The token issuer of the served APIs' test secret, for callers of any role.
pub(crate) fn issuer() -> anyhow::Result<TokenIssuer> {
    Ok(TokenIssuer::new(&JwtConfig {
        secret: Some(SECRET.into()),
        ..Default::default()
    })?)
}

/// placeOrder's variables: one of product `a` and two of product `b` (of the [`PRODUCTS`]
/// that [`register_products`] registers), a fresh idempotency key.
pub(crate) fn place_variables(a: usize, b: usize) -> serde_json::Value {
    json!({ "input": {
        "idempotencyKey": uuid::Uuid::new_v4().to_string(),
        "lines": [ { "sku": format!("SKU-{a:05}"), "quantity": 1 },
                   { "sku": format!("SKU-{b:05}"), "quantity": 2 } ],
        "paymentToken": "tok_ok",
        "shippingAddress": { "name": "A. Customer", "line1": "1 Long Road",
            "city": "Lyon", "postalCode": "69001", "country": "FR" } } })
}

/// Two different products at random.
pub(crate) fn two_products() -> (usize, usize) {
    let a = fastrand::usize(..PRODUCTS);
    (a, (a + 1 + fastrand::usize(..PRODUCTS - 1)) % PRODUCTS)
}

async fn place_orders(
    db: &TestDb,
    clients: usize,
    seconds: u64,
    ids: Ids,
) -> anyhow::Result<Outcome> {
    let (base, service, server) = serve(db, ids).await?;
    register_products(&service).await?;
    let issuer = issuer()?;
    let tokens = (0..clients)
        .map(|client| {
            issuer.issue(
                &format!("bench-customer-{client}"),
                &[Role::Customer],
                Duration::from_secs(3600),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = Arc::new(tokens);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let url = format!("{base}/graphql");
    let (operations, latency_us) = report::closed_loop(clients, seconds, move |client, _| {
        let (a, b) = two_products();
        let body = json!({ "query": PLACE, "variables": place_variables(a, b) });
        let request = http.post(&url).bearer_auth(&tokens[client]).json(&body);
        async move {
            let answer: serde_json::Value = request.send().await?.json().await?;
            if answer.get("errors").is_some() {
                anyhow::bail!("placeOrder failed: {answer}");
            }
            Ok(())
        }
    })
    .await?;
    server.abort();
    drop(service);
    Ok(Outcome {
        name: ids.name().to_owned(),
        writers: clients,
        operations,
        events: operations,
        elapsed: Duration::from_secs(seconds),
        latency_us,
    })
}
