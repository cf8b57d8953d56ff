//! `orderly seed`: a realistic workload for demos and benchmarks, written through the command
//! path ([`CommandService`], so the same validation, idempotency and events as the API):
//! products with stock, orders of 1 to 5 lines from a few hundred customers paying mostly with
//! `tok_ok` and sometimes `tok_declined`, some cancelled by their customer, and, once the saga
//! has confirmed them, some shipped and delivered.
//!
//! What to write is drawn from one seeded generator (`orderly_testdata::shop`), and order
//! idempotency keys derive from the seed: running again with the same `--seed` places no order
//! twice.
//!
//! A command that fails transiently (the database restarting, a statement timed out) is sent
//! again with jittered exponential backoff (`send`), for up to a minute of waiting
//! (`TRANSIENT_PATIENCE`); only then does the seed give up. Placements are keyed, so a resend
//! places nothing twice; cancellations, shipments and deliveries are not, so a resend refused
//! because the attempt that failed did land counts as done once the order's status shows it
//! (`send_unkeyed`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backon::{ExponentialBuilder, Retryable};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use orderly_command_api::saga::SagaConfig;
use orderly_command_api::{
    CommandError, CommandService, OrderIdScheme, PlaceOrder, RegisterProduct,
};
use orderly_domain::Rejection;
use orderly_domain::order::{OrderAggregate, OrderStatus};
use orderly_domain::streams;
use orderly_domain::values::{Currency, CustomerId, OrderId, PaymentToken, Reason};
use orderly_event_store::{Position, StreamName};
use orderly_graphql::{Actor, Role};
use orderly_testdata::shop::{OrderDraw, ShipmentDraw, Shop, ShopDraws};
use uuid::Uuid;

use crate::settings::Settings;
use crate::{app, read_side};

/// What to write.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub orders: usize,
    pub products: usize,
    pub customers: usize,
    /// Seeds the generator; the same seed writes the same workload (and places nothing twice).
    pub seed: u64,
    /// Commands in flight at once.
    pub concurrency: usize,
    /// Share of orders paid with `tok_declined`.
    pub declined_share: f64,
    /// Share of orders their customer cancels right after placing them.
    pub cancel_share: f64,
    /// Share of confirmed orders shipped, and of shipped orders delivered.
    pub ship_share: f64,
    pub deliver_share: f64,
    /// How long to wait for the saga without seeing any order settle before going on.
    pub patience: Duration,
}

impl Default for SeedOptions {
    fn default() -> Self {
        Self {
            orders: 1000,
            products: 40,
            customers: 300,
            seed: 1,
            concurrency: 16,
            declined_share: 0.08,
            cancel_share: 0.1,
            ship_share: 0.7,
            deliver_share: 0.6,
            patience: Duration::from_secs(30),
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub products: usize,
    pub orders: usize,
    /// Orders that were already placed by an earlier run with the same seed.
    pub replayed: usize,
    pub cancelled_by_customers: usize,
    /// As the saga left them before shipping.
    pub confirmed: usize,
    pub cancelled: usize,
    /// Neither confirmed nor cancelled when the saga stopped making progress.
    pub unsettled: usize,
    pub shipped: usize,
    pub delivered: usize,
    /// Where the last shipment or delivery was written: the saga must pass it before the stock
    /// movements that follow the shipments are in. Taken from the commands' own answers, not
    /// from the log's head, which lags behind any transaction in flight on the server.
    pub shipped_through: Position,
}

/// Namespace of the request fingerprints of seeded orders (a fixed random UUID).
const FINGERPRINT_NAMESPACE: Uuid = Uuid::from_u128(0x3c6e_0f4b_9d2a_4b17_8e55_c1a0_7f3d_92b6);

fn actor(sub: &str, role: Role) -> Actor {
    Actor {
        sub: sub.to_owned(),
        roles: vec![role],
    }
}

/// The shop these options ask for.
fn shop(options: &SeedOptions) -> Shop {
    Shop {
        products: options.products,
        customers: options.customers,
        orders: options.orders,
        declined_share: options.declined_share,
        cancel_share: options.cancel_share,
        ship_share: options.ship_share,
        deliver_share: options.deliver_share,
    }
}

/// A refusal the workload expects (a product registered by an earlier run, a cancellation
/// that lost the race to the saga): counted as nothing done, never as a failure.
fn expected_refusal(error: &CommandError) -> bool {
    matches!(error, CommandError::Rejected(_))
}

/// How long a command may keep failing transiently before the seed gives up: the waits
/// between its attempts add up to at most this. Long enough for PostgreSQL to restart or
/// recover from a crash, short enough that a database that is gone ends the seed.
const TRANSIENT_PATIENCE: Duration = Duration::from_secs(60);

/// Waits from 50 ms doubling up to 2 s, each with up to as much again of random jitter (so
/// that the commands cut by one outage do not all come back at once), until the waits add up
/// to `patience`.
fn backoff(patience: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(patience))
}

/// Sends `command` again while it fails transiently ([`CommandError::is_transient`]), for up
/// to `patience` of waiting ([`backoff`]); whether it was sent more than once (an attempt that
/// failed may have landed all the same), and the last attempt's result.
async fn send<T, Fut>(
    patience: Duration,
    mut command: impl FnMut() -> Fut,
) -> (bool, Result<T, CommandError>)
where
    Fut: Future<Output = Result<T, CommandError>>,
{
    let attempts = Cell::new(0_u32);
    let result = (|| {
        attempts.set(attempts.get() + 1);
        command()
    })
    .retry(backoff(patience))
    .when(CommandError::is_transient)
    .notify(|error, pause| {
        tracing::warn!(%error, ?pause, "a command failed transiently; sending it again");
    })
    .await;
    (attempts.get() > 1, result)
}

/// [`send`] with the seed's patience, for a command keyed or harmless to repeat.
async fn send_keyed<T, Fut>(command: impl FnMut() -> Fut) -> (bool, Result<T, CommandError>)
where
    Fut: Future<Output = Result<T, CommandError>>,
{
    send(TRANSIENT_PATIENCE, command).await
}

/// The error that ends the seed, saying when it is a transient one that outlasted
/// [`TRANSIENT_PATIENCE`].
fn failed(error: CommandError, doing: &str) -> anyhow::Error {
    if error.is_transient() {
        anyhow::Error::new(error).context(format!(
            "{doing}: still failing after {} s of retries",
            TRANSIENT_PATIENCE.as_secs()
        ))
    } else {
        anyhow::Error::new(error).context(doing.to_owned())
    }
}

/// What a command without an idempotency key does to an order, as its status shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Cancelled,
    Shipped,
    Delivered,
}

impl Effect {
    /// Whether an order with `status` has had this effect (a delivered order was shipped).
    fn shown_by(self, status: OrderStatus) -> bool {
        match self {
            Self::Cancelled => status == OrderStatus::Cancelled,
            Self::Shipped => matches!(status, OrderStatus::Shipped | OrderStatus::Delivered),
            Self::Delivered => status == OrderStatus::Delivered,
        }
    }
}

/// [`send_keyed`] for a command to order `id` that carries no idempotency key. A resend may be
/// refused because the attempt that failed landed all the same: when the order's status then
/// shows `effect`, the command is done, and `Ok(None)` says so (what it wrote is not known).
/// A cancellation counted so may, rarely, be the saga's own that came first.
async fn send_unkeyed<T, Fut>(
    service: &CommandService,
    id: OrderId,
    effect: Effect,
    command: impl FnMut() -> Fut,
) -> Result<Option<T>, CommandError>
where
    Fut: Future<Output = Result<T, CommandError>>,
{
    match send_keyed(command).await {
        (true, Err(CommandError::Rejected(rejection))) => {
            if effect.shown_by(status(service, id).await?) {
                Ok(None)
            } else {
                Err(CommandError::Rejected(rejection))
            }
        }
        (_, result) => result.map(Some),
    }
}

/// Writes the workload through `service`. The fulfilment saga must run meanwhile (in this
/// process or another) for orders to be confirmed and then shipped; without it the orders stay
/// placed and the report says so. `bar` shows each phase.
pub async fn seed(
    service: &CommandService,
    options: &SeedOptions,
    bar: &ProgressBar,
) -> anyhow::Result<SeedReport> {
    if options.products == 0 || options.customers == 0 {
        bail!("seeding needs at least one product and one customer");
    }
    let mut report = SeedReport::default();
    let mut draws = ShopDraws::new(shop(options), options.seed);
    let admin = actor("seed-admin", Role::Admin);
    let warehouse = actor("seed-warehouse", Role::Warehouse);
    let eur = Currency::parse("EUR")?;

    phase(bar, "products", options.products);
    for index in 0..options.products {
        let product = draws.product(index, eur)?;
        let command = RegisterProduct {
            sku: product.sku,
            name: product.name,
            description: None,
            price: product.price,
            initial_stock: product.initial_stock,
        };
        // A resend refused as already registered is counted as an earlier run's product.
        match send_keyed(|| service.register_product(Some(&admin), command.clone()))
            .await
            .1
        {
            Ok(_) => report.products += 1,
            Err(CommandError::Rejected(Rejection::ProductAlreadyRegistered { .. })) => {}
            Err(error) => return Err(failed(error, "registering a product")),
        }
        bar.inc(1);
    }

    let plans = (0..options.orders)
        .map(|index| draws.order(index))
        .collect::<Result<Vec<_>, _>>()?;
    phase(bar, "orders", plans.len());
    let placed: Vec<(OrderId, bool, bool)> = futures::stream::iter(plans)
        .map(|plan| place(service, options.seed, plan, bar))
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;
    report.orders = placed.len();
    report.replayed = placed.iter().filter(|(_, replayed, _)| *replayed).count();
    report.cancelled_by_customers = placed.iter().filter(|(_, _, c)| *c).count();

    let ids: Vec<OrderId> = placed.iter().map(|(id, _, _)| *id).collect();
    let statuses = settle(service, &ids, options, bar).await?;
    let confirmed: Vec<OrderId> = statuses
        .iter()
        .filter(|(_, status)| *status == OrderStatus::Confirmed)
        .map(|(id, _)| *id)
        .collect();
    report.confirmed = confirmed.len();
    report.cancelled = statuses
        .iter()
        .filter(|(_, status)| *status == OrderStatus::Cancelled)
        .count();
    report.unsettled = statuses.len() - report.confirmed - report.cancelled;

    let mut shipments: Vec<(OrderId, ShipmentDraw)> = Vec::new();
    for id in &confirmed {
        if let Some(shipment) = draws.shipment()? {
            shipments.push((*id, shipment));
        }
    }
    phase(bar, "shipments", shipments.len());
    let shipped: Vec<(bool, bool, Position)> = futures::stream::iter(shipments)
        .map(|(id, shipment)| ship(service, &warehouse, id, shipment, bar))
        .buffer_unordered(options.concurrency.max(1))
        .try_collect()
        .await?;
    report.shipped = shipped.iter().filter(|(s, _, _)| *s).count();
    report.delivered = shipped.iter().filter(|(_, d, _)| *d).count();
    report.shipped_through = shipped
        .iter()
        .map(|(_, _, at)| *at)
        .max()
        .unwrap_or_default();
    bar.finish_and_clear();
    Ok(report)
}

fn phase(bar: &ProgressBar, name: &'static str, length: usize) {
    bar.set_prefix(name);
    bar.set_length(length as u64);
    bar.set_position(0);
}

/// Places one order as its customer, and cancels it when the plan says so; (id, replayed,
/// cancelled by the customer).
async fn place(
    service: &CommandService,
    seed: u64,
    plan: OrderDraw,
    bar: &ProgressBar,
) -> anyhow::Result<(OrderId, bool, bool)> {
    let customer = actor(&plan.customer, Role::Customer);
    let key = format!("seed-{seed:x}-{}", plan.index);
    let command = PlaceOrder {
        fingerprint: Uuid::new_v5(&FINGERPRINT_NAMESPACE, key.as_bytes()),
        idempotency_key: Some(key),
        customer_id: Some(CustomerId::parse(plan.customer.clone())?),
        lines: plan.lines,
        payment_token: PaymentToken::parse(plan.token)?,
        shipping_address: plan.address,
        earlier_fingerprint: None,
    };
    let (resent, placed) =
        send_keyed(|| service.place_order(Some(&customer), command.clone())).await;
    let placed = placed.map_err(|error| failed(error, "placing an order"))?;
    let id = OrderId(placed.id.parse().context("an order id")?);
    let mut cancelled = false;
    if plan.cancel {
        let reason = Reason::parse("changed my mind")?;
        let cancel = || service.cancel_order(Some(&customer), id, reason.clone(), None);
        match send_unkeyed(service, id, Effect::Cancelled, cancel).await {
            Ok(Some(result)) => cancelled = !result.events.is_empty(),
            Ok(None) => cancelled = true,
            Err(error) if expected_refusal(&error) => {}
            Err(error) => return Err(failed(error, "cancelling an order")),
        }
    }
    bar.inc(1);
    // A resend of a placement that landed is answered as a replay of this run's own.
    Ok((id, placed.replayed && !resent, cancelled))
}

/// Waits until every order is confirmed or cancelled (or further along, after an earlier run),
/// or until no order has settled for `options.patience`; the status of each.
async fn settle(
    service: &CommandService,
    ids: &[OrderId],
    options: &SeedOptions,
    bar: &ProgressBar,
) -> anyhow::Result<Vec<(OrderId, OrderStatus)>> {
    phase(bar, "saga", ids.len());
    let mut statuses: Vec<(OrderId, OrderStatus)> =
        ids.iter().map(|id| (*id, OrderStatus::Placed)).collect();
    let mut progress_at = Instant::now();
    loop {
        let open: Vec<usize> = (0..statuses.len())
            .filter(|&i| !settled(statuses[i].1))
            .collect();
        let loaded: Vec<(usize, OrderStatus)> = futures::stream::iter(open.iter().copied())
            .map(|i| async move {
                let status = status(service, ids[i])
                    .await
                    .map_err(|error| failed(error, "reading an order's status"))?;
                Ok::<_, anyhow::Error>((i, status))
            })
            .buffer_unordered(options.concurrency.max(1))
            .try_collect()
            .await?;
        let mut newly: usize = 0;
        for (i, status) in loaded {
            if settled(status) {
                newly += 1;
            }
            statuses[i].1 = status;
        }
        bar.inc(newly as u64);
        if newly > 0 {
            progress_at = Instant::now();
        }
        if newly == open.len() {
            return Ok(statuses);
        }
        if progress_at.elapsed() >= options.patience {
            tracing::warn!(
                unsettled = open.len() - newly,
                "orders not settled by the saga in time; is a saga runner running?"
            );
            return Ok(statuses);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn settled(status: OrderStatus) -> bool {
    !matches!(
        status,
        OrderStatus::Placed | OrderStatus::StockReserved | OrderStatus::Paid
    )
}

/// The order's status as its stream says, read again while the store fails transiently.
async fn status(service: &CommandService, id: OrderId) -> Result<OrderStatus, CommandError> {
    let stream = StreamName::parse(streams::order(id))
        .map_err(|error| CommandError::Internal(error.to_string()))?;
    let loaded = send_keyed(|| service.handler().load::<OrderAggregate>(&stream))
        .await
        .1?;
    Ok(loaded
        .state
        .map_or(OrderStatus::Placed, |order| order.status))
}

/// Ships one confirmed order and, when `deliver`, marks it delivered; (shipped, delivered,
/// position of the last write).
async fn ship(
    service: &CommandService,
    warehouse: &Actor,
    id: OrderId,
    shipment: ShipmentDraw,
    bar: &ProgressBar,
) -> anyhow::Result<(bool, bool, Position)> {
    // A shipment or delivery that landed on an attempt whose answer was lost leaves
    // `written` where it was: the saga may then be waited for a little short of it.
    let mut written = Position::START;
    let ShipmentDraw {
        carrier,
        tracking,
        deliver,
    } = shipment;
    let send_shipment =
        || service.ship_order(Some(warehouse), id, carrier.clone(), tracking.clone(), None);
    let shipped = match send_unkeyed(service, id, Effect::Shipped, send_shipment).await {
        Ok(result) => {
            written = result.map_or(written, |r| r.token);
            true
        }
        Err(error) if expected_refusal(&error) => false,
        Err(error) => return Err(failed(error, "shipping an order")),
    };
    let mut delivered = false;
    if shipped && deliver {
        let mark = || service.mark_delivered(Some(warehouse), id, None);
        written = send_unkeyed(service, id, Effect::Delivered, mark)
            .await
            .map_err(|error| failed(error, "marking an order delivered"))?
            .map_or(written, |r| r.token);
        delivered = true;
    }
    bar.inc(1);
    Ok((shipped, delivered, written))
}

/// Waits until the saga named `saga_name` has handled the log up to `head` (so the stock
/// shipments that follow the seeded shipments are in), or `patience` has passed.
pub async fn wait_for_saga(
    client: &tokio_postgres::Client,
    saga_name: &str,
    head: Position,
    patience: Duration,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    loop {
        let at = orderly_command_api::saga::maintenance::checkpoint(client, saga_name).await?;
        if at >= head {
            return Ok(true);
        }
        if started.elapsed() >= patience {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `orderly seed`: the workload through a command service of its own, with a saga runner in
/// this process so orders get confirmed even when no `orderly serve` runs (when one does, its
/// runner leads and this one stands by; either way the orders are driven).
pub async fn run(settings: &Settings, options: &SeedOptions) -> anyhow::Result<SeedReport> {
    let store = app::event_store(settings)?;
    // Its own small pool for the order-id scheme: a seed placing public ids must say so
    // where keyed placements of other processes look.
    let scheme = OrderIdScheme::new(orderly_graphql::pg_pool(&app::pg_config(settings)?, 2)?);
    let service = CommandService::new(store)
        .with_order_ids(app::order_ids(settings))
        .with_order_id_scheme(scheme);
    let saga = app::saga_runner(settings, app::payment_gateway(settings)?)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(saga.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len}, {per_sec}, ETA {eta}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    let seeded = seed(&service, options, &bar).await;
    if let Ok(report) = &seeded {
        // The saga follows the shipments with stock movements; let it finish them. What is
        // written is written: a database that fails this wait only earns a warning.
        let name = SagaConfig::default().name;
        let waited = async {
            let client = read_side::connect(&app::pg_config(settings)?).await?;
            wait_for_saga(&client, &name, report.shipped_through, options.patience).await
        };
        match waited.await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("the saga has not caught up with the seeded events yet"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "could not see whether the saga caught up with the seeded events"
            ),
        }
    }
    let _ = stop.send(());
    runner.await.context("saga runner task")??;
    seeded
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use orderly_domain::Rejection;

    use super::*;

    /// A command that fails with `errors` in turn, then succeeds; counts its attempts.
    fn flaky(
        attempts: &AtomicU32,
        errors: impl Fn(u32) -> Option<CommandError>,
    ) -> impl FnMut() -> std::future::Ready<Result<u32, CommandError>> {
        move || {
            let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            std::future::ready(errors(attempt).map_or(Ok(attempt), Err))
        }
    }

    fn unavailable() -> CommandError {
        CommandError::Unavailable("the database restarts".into())
    }

    #[tokio::test]
    async fn a_command_that_fails_transiently_is_sent_again_until_it_goes_through() {
        let attempts = AtomicU32::new(0);
        let command = flaky(&attempts, |n| (n < 3).then(unavailable));
        let (resent, result) = send(Duration::from_secs(5), command).await;
        assert!(resent);
        assert_eq!(result.ok(), Some(3));
    }

    #[tokio::test]
    async fn a_refused_command_is_not_sent_again() {
        let attempts = AtomicU32::new(0);
        let command = flaky(&attempts, |_| Some(Rejection::OrderNotFound.into()));
        let (resent, result) = send(Duration::from_secs(5), command).await;
        assert!(!resent);
        assert!(matches!(result, Err(CommandError::Rejected(_))));
        assert_eq!(attempts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_command_that_keeps_failing_transiently_is_given_up_after_the_patience() {
        let attempts = AtomicU32::new(0);
        let command = flaky(&attempts, |_| Some(unavailable()));
        // Every attempt fails: only the patience can end the retries, so returning shows it did.
        let (resent, result) = send(Duration::from_millis(400), command).await;
        let error = result.expect_err("still failing");
        assert!(resent && error.is_transient());
        assert!(attempts.load(Ordering::Relaxed) > 2);
        let said = format!("{:#}", failed(error, "placing an order"));
        assert!(
            said.contains("still failing after 60 s of retries"),
            "{said}"
        );
    }

    #[test]
    fn a_refused_resend_is_done_only_when_the_status_shows_its_effect() {
        use OrderStatus::{Cancelled, Confirmed, Delivered, Placed, Shipped};
        for (effect, status, shown) in [
            (Effect::Cancelled, Cancelled, true),
            (Effect::Cancelled, Placed, false),
            (Effect::Cancelled, Confirmed, false),
            (Effect::Shipped, Shipped, true),
            // A delivered order was shipped first.
            (Effect::Shipped, Delivered, true),
            (Effect::Shipped, Confirmed, false),
            (Effect::Shipped, Cancelled, false),
            (Effect::Delivered, Delivered, true),
            (Effect::Delivered, Shipped, false),
        ] {
            assert_eq!(effect.shown_by(status), shown, "{effect:?} by {status:?}");
        }
    }
}
