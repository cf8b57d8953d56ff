//! The service as one value: built from settings, bound to its address, run until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_graphql::{Executor, ValidationMode};
use axum::Router;
use orderly_command_api::saga::{
    HttpGateway, LogNotifier, Notifier, PaymentGateway, Resilience, Resilient, SagaConfig,
    SagaRunner, Simulator, SmtpNotifier, SmtpSettings,
};
use orderly_command_api::{
    CommandService, MutationRoot, OrderIdScheme, OrderIds, SagaMutation, SagaOperations, SagaQuery,
    Snapshots,
};
use orderly_domain::fulfilment::Timing;
use orderly_event_store::postgres::{PgConfig, PgEventStore, PgStoreOptions};
use orderly_event_store::{EventStore, Fanout, SubscriptionOptions};
use orderly_graphql::{Authenticator, GraphqlLimits, JwtConfig, RateLimit, RateLimiter};
use orderly_observability::MeteredStore;
use orderly_projections::{ProjectionHub, ProjectionName, RebuildOptions, RunnerOptions};
use orderly_read_api::{
    AdminMutation, AdminQuery, QueryRoot, ReadApi, ReadLimits, ReadStore, Rebuilds,
    SubscriptionRoot,
};
use tokio::net::TcpListener;

use crate::health::Health;
use crate::read_side::Projections;
use crate::settings::{EventStoreKind, ExposeSecret, PaymentGatewayKind, SecretString, Settings};

/// The contract's queries and the operator's (the read side's and the saga's), as `orderly
/// serve` serves them.
#[derive(async_graphql::MergedObject, Default)]
#[graphql(name = "Query")]
pub struct Query(QueryRoot, AdminQuery, SagaQuery);

/// The contract's mutations and the operator's, as `orderly serve` serves them.
#[derive(async_graphql::MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct Mutation(MutationRoot, AdminMutation, SagaMutation);

/// The schema `orderly serve` serves: the read API's with the command side's additions.
fn served_builder() -> async_graphql::SchemaBuilder<Query, Mutation, SubscriptionRoot> {
    async_graphql::Schema::build(Query::default(), Mutation::default(), SubscriptionRoot)
}

/// Which part of the service a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `orderly serve`: one schema with the queries, mutations and subscriptions, and the
    /// projection runners in the same process.
    Everything,
    /// `orderly command-api`: the mutations only.
    Commands,
    /// `orderly read-api`: the queries and subscriptions only, following projection runners
    /// that work in other processes.
    Reads,
    /// `orderly saga run`: only `/healthz`, `/readyz` and `/metrics`, which orchestrators and
    /// Prometheus probe as they probe the APIs.
    Probes,
    /// `orderly projections run`: the probes as [`Part::Probes`], its readiness including the
    /// projections' states.
    ProjectionProbes,
}

pub struct App {
    listener: TcpListener,
    router: Router,
    part: Part,
    /// Asked for the log's head when a stop drains the projections.
    store: Arc<dyn EventStore>,
    /// The store again, its subscriptions sharing one reader of the log (a [`Fanout`]): the
    /// `events` subscriptions, the projection runners `run_until_stopped` starts and, in
    /// `orderly serve`, the saga follow the log through it, so the process reads each event
    /// once instead of once per follower.
    log: Arc<dyn EventStore>,
    pg_config: PgConfig,
    hub: ProjectionHub,
    /// False when the runners work in their own processes (`orderly projections run`); a
    /// process serving reads then follows them through PostgreSQL notifications.
    run_projections: bool,
    /// Refreshes the readiness gauges while the app runs.
    health: Health,
}

impl App {
    /// Everything in one process; see [`App::build_part`].
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        Self::build_part(settings, Part::Everything).await
    }

    /// Connects to the stores (lazily: an unreachable database shows on `/readyz`, it does not
    /// stop the start) and binds the HTTP address (port 0 picks a free one).
    pub async fn build_part(settings: &Settings, part: Part) -> anyhow::Result<Self> {
        let metrics = orderly_observability::metrics::install()?;
        // The shared reader follows the log for the saga too (see `log`).
        let (store, store_pool) = event_store_and_pool(settings, saga_reader())?;
        let log = shared_reader(store.clone());
        orderly_observability::metrics::record_build_info(
            env!("CARGO_PKG_VERSION"),
            store_label(settings.store.kind),
        );
        let health = Health {
            store: store.clone(),
            read_db: orderly_graphql::pg_pool(&pg_config(settings)?, HEALTH_POOL_SIZE)?,
            log_in_read_db: store_pool.is_some(),
            projections_gate_readiness: matches!(part, Part::Everything | Part::ProjectionProbes),
        };
        if let Some(pool) = store_pool {
            orderly_observability::metrics::watch_pool("event_store", pool);
        }
        let hub = ProjectionHub::new();
        let mut router = health
            .clone()
            .router()
            .merge(orderly_graphql::metrics::router(&metrics));
        if !matches!(part, Part::Probes | Part::ProjectionProbes) {
            let graphql = graphql_router(settings, store.clone(), log.clone(), hub.clone(), part)?;
            router = router.merge(graphql);
            // GraphiQL's files wherever /graphql is; the console where the reads are.
            let console = matches!(part, Part::Everything | Part::Reads);
            router = router.merge(orderly_web::router(console));
        }
        // Answers of a few dozen bytes and WebSocket upgrades go as they are; GraphQL
        // answers, pages and scrapes shrink several times for clients that accept gzip.
        let router = router.layer(tower_http::compression::CompressionLayer::new());
        // Outermost, so every response counts, the refusals of inner layers included.
        let router = router.layer(axum::middleware::from_fn(
            orderly_graphql::metrics::count_responses,
        ));
        let listener = TcpListener::bind(settings.http.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.http.addr))?;
        Ok(Self {
            listener,
            router,
            part,
            store,
            log,
            pg_config: pg_config(settings)?,
            hub,
            run_projections: part == Part::Everything,
            health,
        })
    }

    /// Serve without running the projections here: they run elsewhere (or, in tests, not at
    /// all, which keeps the read models where they are).
    pub fn without_projections(mut self) -> Self {
        self.run_projections = false;
        self
    }

    /// The process's shared reader of the log, for a saga runner that runs beside the app (see
    /// [`SagaRunner::following`]).
    pub fn log(&self) -> Arc<dyn EventStore> {
        self.log.clone()
    }

    /// Where the projections say how far they are and which orders they touched: what the
    /// read API waits on for consistency tokens and `orderUpdated`.
    pub fn projection_hub(&self) -> ProjectionHub {
        self.hub.clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown` completes, then finishes the requests in flight and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.run_until_stopped_after(shutdown, || async {}).await
    }

    /// [`App::run_until_stopped`] for a process whose other writers (the saga) stop after the
    /// HTTP side: once the requests in flight are answered, `stop_upstream` runs (it stops
    /// them and waits until they have), then the projection runners keep applying until they
    /// reach the log's head (at most [`DRAIN_TIMEOUT`]), so the read models end where the log
    /// ends instead of behind it until the next start.
    pub async fn run_until_stopped_after<F>(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        stop_upstream: impl FnOnce() -> F,
    ) -> anyhow::Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        tracing::info!(addr = %self.local_addr(), part = ?self.part, "serving");
        // Both end with the server: they only feed /metrics.
        let probe = AbortOnDrop(tokio::spawn(orderly_observability::metrics::probe_runtime()));
        let sampler = AbortOnDrop(tokio::spawn(self.health.sample_forever()));
        let projections = self.run_projections.then(|| {
            Projections::start(
                self.log.clone(),
                self.pg_config.clone(),
                &ProjectionName::ALL,
                RunnerOptions::default(),
                self.hub.clone(),
            )
        });
        // Also beside in-process runners: one of them may stand by while another process's
        // is active, and then only the database knows where the projection is.
        let follower = (!matches!(
            self.part,
            Part::Commands | Part::Probes | Part::ProjectionProbes
        ))
        .then(|| self.hub.follow(self.pg_config));
        // Connect info gives the rate limiter the client's address for anonymous callers.
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let served = axum::serve(self.listener, service)
            .with_graceful_shutdown(shutdown)
            .await;
        // Also when serving failed: the process is stopping either way.
        stop_upstream().await;
        if let Some(projections) = projections {
            drain(&*self.store, &self.hub).await;
            projections.stop().await;
        }
        if let Some(follower) = follower {
            follower.abort();
        }
        drop((probe, sampler));
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Longest a stopping process waits for its projections to reach the log's head.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until every projection has applied the log up to its head as of now.
async fn drain(store: &dyn EventStore, hub: &ProjectionHub) {
    let head = match store.head().await {
        Ok(head) => head,
        Err(error) => {
            tracing::warn!(%error, "projections not drained: the log's head is unknown");
            return;
        }
    };
    for projection in ProjectionName::ALL {
        if !hub.wait_for(projection, head, DRAIN_TIMEOUT).await {
            tracing::warn!(
                projection = projection.as_str(),
                "projection did not reach the log's head before the stop"
            );
        }
    }
}

/// `store`, its subscriptions sharing one reader of the log: make one per process, for
/// everything in it that follows the log.
pub fn shared_reader(store: Arc<dyn EventStore>) -> Arc<dyn EventStore> {
    Arc::new(Fanout::new(
        store,
        FANOUT_CAPACITY,
        SubscriptionOptions::default(),
    ))
}

/// Events the shared log reader keeps for followers that have not taken them yet: a burst
/// this long passes without any follower going back to the store.
const FANOUT_CAPACITY: usize = 4096;

/// `/graphql` for `part`: the merged schema, the mutations alone or the queries and
/// subscriptions alone, behind authentication, rate limits and request limits; `events`
/// subscriptions follow `log`.
pub fn graphql_router(
    settings: &Settings,
    store: Arc<dyn EventStore>,
    log: Arc<dyn EventStore>,
    hub: ProjectionHub,
    part: Part,
) -> anyhow::Result<Router> {
    let pg_config = pg_config(settings)?;
    let pool = orderly_graphql::pg_pool(&pg_config, settings.store.pool_size)?;
    orderly_observability::metrics::watch_pool("read_models", pool.clone());
    // Rebuilds an admin starts over the API run here, whichever schema they came through.
    let rebuilds = Rebuilds::new(pg_config, store.clone(), RebuildOptions::default());
    let order_ids = order_ids(settings);
    let scheme = OrderIdScheme::new(pool.clone());
    let commands = || {
        CommandService::new(store.clone())
            .with_snapshots(Snapshots::new(pool.clone()))
            .with_price_max_age(settings.orders.price_max_age)
            .with_order_ids(order_ids.clone())
            .with_order_id_scheme(scheme.clone())
    };
    let reads = || {
        let limits = ReadLimits {
            max_consistency_wait: settings.http.consistency_max_wait,
            subscription_buffer: settings.http.subscription_buffer.max(1),
            subscription_patience: settings.http.subscription_patience,
        };
        ReadApi::new(
            ReadStore::new(pool.clone()),
            log.clone(),
            hub.clone(),
            limits,
        )
        .with_rebuilds(rebuilds.clone())
    };
    match part {
        // Schemas that answer queries come twice: fully validating, and with fast validation
        // for queries already validated once (see `orderly_graphql::graphql_router`).
        Part::Everything => {
            let reads = reads();
            // One command service (and its cache of aggregate states) behind both schemas.
            let commands = commands();
            // The saga's tables are beside the read models (as `orderly saga status` reads them).
            let saga = SagaOperations::new(pool.clone(), SagaConfig::default().name);
            let build = |mode| {
                let builder = served_builder()
                    .data(commands.clone())
                    .data(saga.clone())
                    .validation_mode(mode);
                orderly_read_api::install(builder, reads.clone()).finish()
            };
            let schema = build(ValidationMode::Strict);
            let sdl = schema.sdl();
            let fast = reads.consistent(build(ValidationMode::Fast));
            serve_schema(settings, reads.consistent(schema), Some(fast), sdl)
        }
        Part::Commands => {
            let schema = orderly_command_api::schema(commands());
            let sdl = schema.sdl();
            serve_schema(settings, schema, None, sdl)
        }
        Part::Reads => {
            let reads = reads();
            let schema = orderly_read_api::schema(reads.clone(), ValidationMode::Strict);
            let sdl = schema.sdl();
            let fast = orderly_read_api::schema(reads.clone(), ValidationMode::Fast);
            serve_schema(
                settings,
                reads.consistent(schema),
                Some(reads.consistent(fast)),
                sdl,
            )
        }
        Part::Probes | Part::ProjectionProbes => Ok(Router::new()),
    }
}

/// The schema of the contract `orderly serve` serves, for printing and comparing; needs no
/// database until a request runs.
pub fn served_sdl(settings: &Settings) -> anyhow::Result<String> {
    let store = event_store(settings)?;
    let pool = orderly_graphql::pg_pool(&pg_config(settings)?, 1)?;
    let reads = ReadApi::new(
        ReadStore::new(pool.clone()),
        store.clone(),
        ProjectionHub::new(),
        ReadLimits::default(),
    );
    let builder = served_builder().data(CommandService::new(store));
    Ok(orderly_read_api::install(builder, reads).finish().sdl())
}

fn serve_schema<E: Executor>(
    settings: &Settings,
    schema: E,
    fast_queries: Option<E>,
    sdl: String,
) -> anyhow::Result<Router> {
    let auth = Authenticator::new(&jwt_config(settings)).context("invalid JWT settings")?;
    if !auth.is_configured() {
        tracing::warn!("no JWT key configured: only anonymous reads (products) will be answered");
    }
    let limiter = RateLimiter::new(RateLimit {
        per_second: settings.http.rate_limit_per_second,
        burst: settings.http.rate_limit_burst,
    })?;
    let limits = GraphqlLimits {
        body_limit: settings.http.body_limit,
        timeout: settings.http.timeout,
        subscriptions_per_socket: settings.http.subscriptions_per_socket,
        subscriptions_per_subject: settings.http.subscriptions_per_subject,
        ..GraphqlLimits::default()
    };
    Ok(orderly_graphql::graphql_router(
        schema,
        fast_queries,
        sdl,
        Arc::new(auth),
        Arc::new(limiter),
        limits,
    ))
}

/// The payment gateway the settings choose, behind timeout, retries, breaker and limit. Keep
/// the `Arc` to read the breaker's state.
pub fn payment_gateway(settings: &Settings) -> anyhow::Result<Arc<Resilient>> {
    let inner: Arc<dyn PaymentGateway> = match settings.payment.gateway {
        PaymentGatewayKind::Simulator => Arc::new(Simulator::default()),
        PaymentGatewayKind::Http => {
            let url = settings
                .payment
                .gateway_url
                .as_ref()
                .map(|url| url.expose())
                .context("payment_gateway = http needs ORDERLY_PAYMENT_GATEWAY_URL")?;
            Arc::new(HttpGateway::new(url))
        }
    };
    let policy = Resilience {
        timeout: settings.payment.timeout,
        concurrency: settings.payment.concurrency,
        ..Resilience::default()
    };
    Ok(Resilient::new(inner, policy).with_metrics())
}

/// The fulfilment saga runner with its outbox worker, calling `gateway`.
pub fn saga_runner(
    settings: &Settings,
    gateway: Arc<dyn PaymentGateway>,
) -> anyhow::Result<SagaRunner> {
    // Pools of their own, sized apart from the APIs': see `SagaSettings::pool_size`.
    let pool_size = settings.saga.pool_size.max(2);
    let mut own = settings.clone();
    own.store.pool_size = pool_size;
    let (store, _) = event_store_and_pool(&own, saga_reader())?;
    let config = pg_config(settings)?;
    let pool = orderly_graphql::pg_pool(&config, pool_size)?;
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let s = &settings.saga;
    let saga = SagaConfig {
        timing: Timing {
            payment_deadline_ms: millis(settings.payment.deadline),
            retry_after_ms: millis(settings.payment.retry_after),
            stock_deadline_ms: millis(s.stock_deadline),
        },
        tick: s.tick.max(Duration::from_millis(1)),
        lease: s.lease.max(Duration::from_millis(100)),
        // Renewed five times per lease: a missed heartbeat or two never loses a lane.
        heartbeat: (s.lease / 5).max(Duration::from_millis(20)),
        orders_in_flight: s.orders_in_flight.max(1),
        append_writers: pool_size,
        outbox_max_attempts: s.outbox_max_attempts,
        charge_settle: settings.payment.settle,
        retention: s.retention,
        ..SagaConfig::default()
    };
    Ok(SagaRunner::new(saga, store, pool, gateway).with_notifier(notifier(settings)?))
}

/// Longest one SMTP exchange may take before the delivery counts as failed.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Customer notifications by SMTP when `smtp_url` is set, else into the log.
pub fn notifier(settings: &Settings) -> anyhow::Result<Arc<dyn Notifier>> {
    let Some(url) = &settings.mail.smtp_url else {
        return Ok(Arc::new(LogNotifier));
    };
    let smtp = SmtpNotifier::new(&SmtpSettings {
        url: url.expose().to_owned(),
        from: settings.mail.from.clone(),
        recipient: settings.mail.recipient.clone(),
        timeout: SMTP_TIMEOUT,
    })
    .context("invalid SMTP settings")?;
    Ok(Arc::new(smtp))
}

/// How placeOrder names keyed orders: an HMAC under `ORDERLY_ORDER_ID_SECRET`, else under a
/// key derived from `ORDERLY_JWT_SECRET` (a secret every API process already shares; the
/// derivation keeps the JWT secret itself out of the ids). With neither, ids stay computable
/// from (customer, key), which a warning says.
pub fn order_ids(settings: &Settings) -> OrderIds {
    if let Some(secret) = &settings.orders.order_id_secret {
        return OrderIds::keyed(secret.expose_secret().as_bytes());
    }
    if let Some(jwt) = &settings.auth.jwt_secret {
        tracing::info!(
            "order ids are keyed from ORDERLY_JWT_SECRET: rotating it changes them, and a retry \
             of an idempotency key used before would place a second order; set \
             ORDERLY_ORDER_ID_SECRET (a change of ids too, once) to rotate it freely"
        );
        let jwt = jwt.expose_secret();
        return OrderIds::keyed(format!("orderly order ids\0{jwt}").as_bytes());
    }
    tracing::warn!(
        "neither ORDERLY_ORDER_ID_SECRET nor ORDERLY_JWT_SECRET is set: the ids of orders \
         placed with an idempotency key can be computed from the customer and the key"
    );
    OrderIds::Public
}

pub fn jwt_config(settings: &Settings) -> JwtConfig {
    let auth = &settings.auth;
    let exposed = |secret: &SecretString| secret.expose_secret().to_owned();
    JwtConfig {
        secret: auth.jwt_secret.as_ref().map(exposed),
        public_key: auth.jwt_public_key.clone(),
        private_key: auth.jwt_private_key.as_ref().map(exposed),
        issuer: auth.jwt_issuer.clone(),
        audience: auth.jwt_audience.clone(),
    }
}

/// The event store the settings choose, its appends metered.
pub fn event_store(settings: &Settings) -> anyhow::Result<Arc<dyn EventStore>> {
    Ok(event_store_and_pool(settings, SubscriptionOptions::default())?.0)
}

/// How a log reader that feeds the saga follows the log: every saga step is one hop through
/// it, so the reader waits less behind a transaction in flight than the store's default (a
/// few more polls while held back).
fn saga_reader() -> SubscriptionOptions {
    SubscriptionOptions {
        held_back_max: SAGA_HELD_BACK_MAX,
        ..SubscriptionOptions::default()
    }
}

/// Longest pause of a log reader that feeds the saga (its own, or the process's shared one in
/// `orderly serve`) while newer events wait behind a transaction in flight (the store's
/// default is 50 ms).
const SAGA_HELD_BACK_MAX: Duration = Duration::from_millis(5);

/// As [`event_store`], with subscriptions tuned by `subscription` (PostgreSQL only), and the
/// PostgreSQL store's pool (for its gauges) when that is the store.
fn event_store_and_pool(
    settings: &Settings,
    subscription: SubscriptionOptions,
) -> anyhow::Result<(Arc<dyn EventStore>, Option<deadpool_postgres::Pool>)> {
    let (store, pool): (Arc<dyn EventStore>, _) = match settings.store.kind {
        EventStoreKind::Postgres => {
            let options = PgStoreOptions {
                pool_size: settings.store.pool_size,
                subscription,
                ..Default::default()
            };
            let store = PgEventStore::new(pg_config(settings)?, options)?;
            let pool = store.pool().clone();
            (Arc::new(store), Some(pool))
        }
        EventStoreKind::Kurrentdb => (kurrentdb_store(settings)?, None),
    };
    let label = store_label(settings.store.kind);
    Ok((Arc::new(MeteredStore::new(store, label)), pool))
}

#[cfg(feature = "kurrentdb")]
fn kurrentdb_store(settings: &Settings) -> anyhow::Result<Arc<dyn EventStore>> {
    use orderly_event_store::kurrentdb::KurrentDbEventStore;
    let Some(url) = &settings.store.kurrentdb_url else {
        bail!("event_store = kurrentdb needs ORDERLY_KURRENTDB_URL");
    };
    Ok(Arc::new(KurrentDbEventStore::connect(url.expose())?))
}

#[cfg(not(feature = "kurrentdb"))]
fn kurrentdb_store(_: &Settings) -> anyhow::Result<Arc<dyn EventStore>> {
    bail!(
        "event_store = kurrentdb, but this orderly was built without its `kurrentdb` feature \
         (cargo build --features kurrentdb, the default)"
    )
}

/// The `store` label of the append metrics.
fn store_label(kind: EventStoreKind) -> &'static str {
    match kind {
        EventStoreKind::Postgres => "postgres",
        EventStoreKind::Kurrentdb => "kurrentdb",
    }
}

/// The most connections one process opens to PostgreSQL, pool by pool, from the settings
/// that size them (`ORDERLY_DB_POOL_SIZE`, `ORDERLY_SAGA_POOL_SIZE`; the rest are fixed).
/// Pools connect lazily, so a process holds fewer until it is busy; every process on one
/// server must fit in its `max_connections` at their busiest. README, "Connections".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionBudget {
    pub pools: Vec<(&'static str, usize)>,
}

impl ConnectionBudget {
    /// For a process serving `part`, with the saga runner beside it when `saga` (as
    /// `orderly serve` and `orderly saga run` run it).
    pub fn of(settings: &Settings, part: Part, saga: bool) -> Self {
        // The pool, one connection that sends NOTIFY, one that LISTENs.
        let mut budget = Self { pools: Vec::new() }.with_log_pool(
            settings,
            "event store",
            settings.store.pool_size.max(1) + 2,
        );
        let pools = &mut budget.pools;
        pools.push(("health checks", HEALTH_POOL_SIZE));
        // The mutations read it too: snapshots and the order-id scheme.
        if matches!(part, Part::Everything | Part::Reads | Part::Commands) {
            pools.push(("read models", settings.store.pool_size.max(1)));
        }
        if matches!(part, Part::Everything | Part::Reads) {
            // The hub's follower, also beside in-process runners (see `run_until_stopped_after`).
            pools.push(("projection notifications", 1));
        }
        if part == Part::Everything {
            // Each projection's runner and its lag sampler.
            budget = budget.with_pool("projections", 2 * ProjectionName::ALL.len());
        }
        if saga {
            let size = settings.saga.pool_size.max(2);
            budget = budget
                .with_log_pool(settings, "saga event store", size + 2)
                .with_pool("saga", size);
        }
        budget
    }

    /// With one more pool of `size` connections to the log, when the log is in PostgreSQL
    /// (KurrentDB's client connects to its own server).
    pub fn with_log_pool(self, settings: &Settings, pool: &'static str, size: usize) -> Self {
        if settings.store.kind == EventStoreKind::Postgres {
            self.with_pool(pool, size)
        } else {
            self
        }
    }

    /// With one more pool of `size` connections.
    pub fn with_pool(mut self, pool: &'static str, size: usize) -> Self {
        self.pools.push((pool, size));
        self
    }

    pub fn total(&self) -> usize {
        self.pools.iter().map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for ConnectionBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (", self.total())?;
        for (i, (pool, n)) in self.pools.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{pool} {n}")?;
        }
        f.write_str(")")
    }
}

/// Connections of the pool `/readyz` checks the read database with.
const HEALTH_POOL_SIZE: usize = 2;

/// Connects once before a process starts serving. A server that refuses connections (too
/// many clients, a role's connection limit, a failed login) stops the start with the
/// server's own words and this process's budget, rather than failing requests one by one
/// later; an unreachable server does not (it may come up, and `/readyz` says so meanwhile).
/// With a connection, a budget larger than the server's free slots is warned about.
pub async fn check_connections(
    settings: &Settings,
    budget: &ConnectionBudget,
) -> anyhow::Result<()> {
    let config = pg_config(settings)?;
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        config.connect(tokio_postgres::NoTls),
    )
    .await;
    let (client, connection) = match connected {
        Ok(Ok(connected)) => connected,
        Ok(Err(error)) => {
            let class = |prefix: &str| error.code().is_some_and(|c| c.code().starts_with(prefix));
            let described = orderly_event_store::postgres::describe(&error);
            // Class 28: the login itself (a wrong password, no such role, no pg_hba entry).
            if class("28") {
                bail!(
                    "PostgreSQL refused the login: {described}. Check the user and password in \
                     ORDERLY_DATABASE_URL and the server's pg_hba.conf"
                );
            }
            if class("53") {
                bail!(
                    "PostgreSQL refused a connection: {described}. This process opens up to \
                     {budget} connections; lower ORDERLY_DB_POOL_SIZE or ORDERLY_SAGA_POOL_SIZE, \
                     or raise the server's max_connections (README, \"Connections\")"
                );
            }
            tracing::warn!(error = %described, "database not reachable yet; starting anyway");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("database did not answer in 5 s; starting anyway");
            return Ok(());
        }
    };
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let free = client
        .query_one(
            "select current_setting('max_connections')::int
                    - current_setting('superuser_reserved_connections')::int
                    - (select count(*) from pg_stat_activity where backend_type = 'client backend')::int",
            &[],
        )
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i32>(0).ok());
    drop((client, driver));
    match free {
        Some(free) if usize::try_from(free).unwrap_or(0) < budget.total() => tracing::warn!(
            free,
            budget = %budget,
            "the database has fewer free connections than this process may open"
        ),
        _ => tracing::info!(budget = %budget, "database connections this process may open"),
    }
    Ok(())
}

/// Ends a background task with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection settings of `ORDERLY_DATABASE_URL`, with TCP keepalives and a user timeout
/// where the URL names none of its own ([`DEAD_PEER_CHECKS`]).
pub fn pg_config(settings: &Settings) -> anyhow::Result<PgConfig> {
    let url = settings.store.database_url.expose();
    let mut config: PgConfig = url
        .parse()
        .context("ORDERLY_DATABASE_URL is not a valid PostgreSQL connection string")?;
    // Every connection is made without TLS (`prefer` falls back to plain text): said at the
    // start, not as a database that seems never to answer.
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        bail!(
            "ORDERLY_DATABASE_URL asks for sslmode=require, but Orderly connects to PostgreSQL \
             without TLS; use a private network, or a local TLS-terminating proxy, and \
             sslmode=disable"
        );
    }
    for (name, set) in DEAD_PEER_CHECKS {
        if !url.contains(name) {
            set(&mut config);
        }
    }
    Ok(config)
}

/// A connection setting of [`DEAD_PEER_CHECKS`], by the URL parameter that overrides it.
type DeadPeerCheck = fn(&mut PgConfig);

/// How a connection learns that the server's host is gone when nothing says so (a host that
/// crashed, a network partition, a NAT or proxy that dropped the connection): each setting is
/// applied unless the URL names it. Without them an idle connection (a LISTEN, a waiting
/// reader) would notice after the system's two hours of silence and one with a request in
/// flight after about fifteen minutes of retransmissions, and every loop on it would stall
/// that long instead of reconnecting. With them: probes after 30 s of silence, every 10 s,
/// three unanswered close it (about a minute); data unacknowledged for a minute closes it.
const DEAD_PEER_CHECKS: [(&str, DeadPeerCheck); 4] = [
    ("keepalives_idle", |c| {
        c.keepalives_idle(Duration::from_secs(30));
    }),
    ("keepalives_interval", |c| {
        c.keepalives_interval(Duration::from_secs(10));
    }),
    ("keepalives_retries", |c| {
        c.keepalives_retries(3);
    }),
    ("tcp_user_timeout", |c| {
        c.tcp_user_timeout(Duration::from_secs(60));
    }),
];

/// Applies every migration the product needs.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let config = pg_config(settings)?;
    // The log lives in PostgreSQL only with the default store; KurrentDB keeps its own.
    if settings.store.kind == EventStoreKind::Postgres {
        orderly_event_store::postgres::migrate(&config)
            .await
            .context("event store migrations failed")?;
    }
    orderly_projections::migrate(&config)
        .await
        .context("read-model migrations failed")?;
    orderly_command_api::migrate(&config)
        .await
        .context("command-side migrations failed")?;
    Ok(())
}

/// `orderly migrate --rebase-log`: see `orderly_event_store::postgres::rebase_log`.
pub async fn rebase_log(settings: &Settings) -> anyhow::Result<i64> {
    anyhow::ensure!(
        settings.store.kind == EventStoreKind::Postgres,
        "--rebase-log is for the PostgreSQL event store; KurrentDB keeps its own log"
    );
    orderly_event_store::postgres::rebase_log(&pg_config(settings)?)
        .await
        .context("rebasing the event log's clock failed")
}

/// Changes whenever any migration `migrate` applies changes; test templates are keyed by it.
pub fn migration_fingerprint() -> String {
    format!(
        "event-store[{}] projections[{}] command-api[{}]",
        orderly_event_store::postgres::migration_fingerprint(),
        orderly_projections::migration_fingerprint(),
        orderly_command_api::migration_fingerprint()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "kurrentdb")]
    #[test]
    fn choosing_kurrentdb_without_its_url_is_a_clear_error() {
        let mut settings = Settings::default();
        settings.store.kind = EventStoreKind::Kurrentdb;
        let error = event_store(&settings)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("ORDERLY_KURRENTDB_URL"), "{error}");
    }

    #[test]
    fn connections_check_for_a_dead_server_unless_the_url_says_otherwise() {
        let mut settings = Settings::default();
        let config = pg_config(&settings).unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(60))
        );
        settings.store.database_url = crate::settings::MaskedUrl::from(
            "postgres://postgres@127.0.0.1:5432/orderly?keepalives_idle=600&tcp_user_timeout=5",
        );
        let config = pg_config(&settings).unwrap();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(config.get_keepalives_retries(), Some(3));
        // Connections are unencrypted: asking for TLS is refused at the start.
        settings.store.database_url =
            crate::settings::MaskedUrl::from("postgres://db/orderly?sslmode=require");
        let refused = pg_config(&settings).err().map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("without TLS")),
            "{refused:?}"
        );
    }

    #[test]
    fn the_connection_budget_follows_the_pool_settings() {
        let mut settings = Settings::default();
        settings.store.pool_size = 10;
        settings.saga.pool_size = 4;
        // Store 10 + 2, health 2, read models 10, notifications 1, two projections 2 each,
        // saga 4 + 2 and 4.
        assert_eq!(
            ConnectionBudget::of(&settings, Part::Everything, true).total(),
            39
        );
        assert_eq!(
            ConnectionBudget::of(&settings, Part::Commands, false).total(),
            24
        );
        assert_eq!(
            ConnectionBudget::of(&settings, Part::Reads, false).total(),
            25
        );
        assert_eq!(
            ConnectionBudget::of(&settings, Part::Probes, true).total(),
            24
        );
        let shown = ConnectionBudget::of(&settings, Part::Commands, false).to_string();
        assert_eq!(
            shown,
            "24 (event store 12, health checks 2, read models 10)"
        );
        // With the log in KurrentDB, no pool of the log's is PostgreSQL's.
        settings.store.kind = EventStoreKind::Kurrentdb;
        assert_eq!(
            ConnectionBudget::of(&settings, Part::Everything, true).total(),
            39 - 12 - 6
        );
    }

    #[cfg(not(feature = "kurrentdb"))]
    #[test]
    fn without_its_feature_choosing_kurrentdb_says_how_to_build_it() {
        let mut settings = Settings::default();
        settings.store.kind = EventStoreKind::Kurrentdb;
        settings.store.kurrentdb_url = Some("kurrentdb://127.0.0.1:2113?tls=false".into());
        let error = event_store(&settings).err().map(|e| e.to_string());
        assert!(error.unwrap_or_default().contains("--features kurrentdb"));
    }

    #[cfg(feature = "kurrentdb")]
    #[tokio::test]
    async fn choosing_kurrentdb_with_a_url_builds_that_store() {
        let mut settings = Settings::default();
        settings.store.kind = EventStoreKind::Kurrentdb;
        settings.store.kurrentdb_url = Some("kurrentdb://127.0.0.1:2113?tls=false".into());
        assert!(event_store(&settings).is_ok());
    }
}
