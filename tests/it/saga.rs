//! The fulfilment saga runner end to end: orders placed over HTTP, driven by the runner with
//! the simulated gateway, checked against the event log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use futures::StreamExt;
use orderly_command_api::CommandError;
use orderly_command_api::saga::{
    BreakerState, Charge, ChargeOutcome, PaymentGateway, Resilience, Resilient, SagaConfig,
    Simulator, maintenance, maintenance::ParkedOf,
};
use orderly_command_api::{Envelope, Handler};
use orderly_domain::fulfilment::Timing;
use orderly_domain::order::{Order, OrderAggregate, OrderStatus};
use orderly_domain::product::{self, Product, ProductAggregate, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::{OrderId, Sku};
use orderly_event_store::{
    Append, AppendResult, Direction, EventFilter, EventStore, ExpectedVersion, NewEvent, Position,
    RecordedEvent, StoreError, StoreLayer, StreamName, Subscription,
};
use orderly_service::settings::Settings;
use orderly_test_support::TestDb;
use serde_json::json;
use tokio::task::JoinHandle;

fn fast_timing() -> Timing {
    Timing {
        payment_deadline_ms: 2_500,
        retry_after_ms: 500,
        ..Timing::default()
    }
}

fn fast_resilience() -> Resilience {
    Resilience {
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        breaker_threshold: 5,
        breaker_cool_down: Duration::from_secs(30),
        concurrency: 16,
        ..Resilience::default()
    }
}

/// Runs a saga runner in the background; abort the handle to "kill" it.
/// A runner whose payment deadline no healthy charge misses, even on a loaded machine.
fn start_saga(settings: &Settings, gateway: Arc<dyn PaymentGateway>) -> JoinHandle<()> {
    start_saga_with(settings, gateway, patient_timing())
}

/// The timing of [`start_saga`]: fast retries, a deadline no healthy charge misses.
fn patient_timing() -> Timing {
    Timing {
        payment_deadline_ms: 20_000,
        ..fast_timing()
    }
}

/// The saga on the simulator gateway behind fast resilience settings: the simulator, to count
/// and steer charges, and the runner.
fn simulated_saga(settings: &Settings) -> (Arc<Simulator>, JoinHandle<()>) {
    let simulator = Arc::new(Simulator::default());
    let gateway = Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    (simulator, start_saga(settings, gateway))
}

fn start_saga_with(
    settings: &Settings,
    gateway: Arc<dyn PaymentGateway>,
    timing: Timing,
) -> JoinHandle<()> {
    start_saga_config(settings, gateway, quick_config(timing))
}

/// A runner's settings with short ticks, leases and heartbeats, so tests see it act quickly.
fn quick_config(timing: Timing) -> SagaConfig {
    SagaConfig {
        timing,
        tick: Duration::from_millis(100),
        outbox_lease: Duration::from_secs(3),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(200),
        ..SagaConfig::default()
    }
}

fn start_saga_config(
    settings: &Settings,
    gateway: Arc<dyn PaymentGateway>,
    config: SagaConfig,
) -> JoinHandle<()> {
    let runner = configured_runner(settings, config, gateway);
    tokio::spawn(async move {
        runner
            .run_until_stopped(std::future::pending())
            .await
            .unwrap();
    })
}

struct Log {
    handler: Handler,
}

impl Log {
    fn new(settings: &Settings) -> Self {
        Self {
            handler: Handler::new(orderly_service::app::event_store(settings).unwrap()),
        }
    }

    async fn order(&self, id: &str) -> Order {
        let id = OrderId(id.parse().unwrap());
        let stream = StreamName::parse(streams::order(id)).unwrap();
        self.handler
            .load::<OrderAggregate>(&stream)
            .await
            .unwrap()
            .state
            .unwrap()
    }

    async fn product(&self, sku: &str) -> Product {
        let stream = StreamName::parse(streams::product(&Sku::parse(sku).unwrap())).unwrap();
        self.handler
            .load::<ProductAggregate>(&stream)
            .await
            .unwrap()
            .state
            .unwrap()
    }

    /// Decides `command` on product `sku` as a writer other than the saga would (an operator's
    /// tool, say).
    async fn on_product(&self, sku: &str, command: ProductCommand) {
        let stream = StreamName::parse(streams::product(&Sku::parse(sku).unwrap())).unwrap();
        let envelope = Envelope::request(uuid::Uuid::now_v7(), "operator");
        self.handler
            .execute::<ProductAggregate, _>(&stream, None, &envelope, |loaded| {
                Ok(product::decide(&loaded.state, &command)?)
            })
            .await
            .unwrap();
    }

    /// Waits until the product's reservations are all given back (compensation follows the
    /// cancellation through the log).
    async fn released(&self, sku: &str) -> Product {
        let started = Instant::now();
        loop {
            let product = self.product(sku).await;
            if product.reserved() == 0 || started.elapsed() > Duration::from_secs(10) {
                return product;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the order is cancelled.
    async fn cancelled(&self, id: &str, within: Duration) -> Order {
        let started = Instant::now();
        loop {
            let order = self.order(id).await;
            if order.status == OrderStatus::Cancelled {
                return order;
            }
            assert!(started.elapsed() < within, "never cancelled: {order:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every order is settled, and expects every one confirmed (else says how
    /// each ended).
    async fn confirmed(&self, ids: &[String], within: Duration) {
        let orders = self.settled(ids, within).await;
        assert!(
            orders.iter().all(|o| o.status == OrderStatus::Confirmed),
            "{:?}",
            orders
                .iter()
                .map(|o| (o.status, o.cancellation_reason.clone()))
                .collect::<Vec<_>>()
        );
    }

    /// Waits until every order is confirmed or cancelled.
    async fn settled(&self, ids: &[String], within: Duration) -> Vec<Order> {
        let started = Instant::now();
        loop {
            let mut orders = Vec::new();
            for id in ids {
                orders.push(self.order(id).await);
            }
            let done = orders
                .iter()
                .all(|o| matches!(o.status, OrderStatus::Confirmed | OrderStatus::Cancelled));
            if done {
                return orders;
            }
            assert!(
                started.elapsed() < within,
                "not settled in {within:?}: {:?}",
                orders.iter().map(|o| o.status).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_orders_for_the_last_ten_units_confirm_ten_and_cancel_forty_out_of_stock() {
    let Shop {
        db: _db,
        settings,
        api,
    } = Shop::open().await;
    register(&api, "LAST", 500, "EUR", 10).await;
    let (simulator, _saga) = simulated_saga(&settings);

    let placing = (0..50).map(|i| {
        let api = &api;
        async move {
            place(api, &format!("customer-{i}"), "LAST", 1, "tok_ok")
                .await
                .id
        }
    });
    let ids = futures::future::join_all(placing).await;
    let log = Log::new(&settings);
    let orders = log.settled(&ids, Duration::from_secs(90)).await;
    let confirmed = orders
        .iter()
        .filter(|o| o.status == OrderStatus::Confirmed)
        .count();
    let out_of_stock = orders
        .iter()
        .filter(|o| {
            o.status == OrderStatus::Cancelled
                && o.cancellation_reason
                    .as_ref()
                    .is_some_and(|r| r.as_str() == "out of stock")
        })
        .count();
    assert_eq!((confirmed, out_of_stock), (10, 40));
    assert_eq!(
        simulator.charges(),
        10,
        "only confirmed orders were charged"
    );

    // Never negative at any point: replay the product's stream one event at a time.
    let stream = StreamName::parse("product-LAST").unwrap();
    let events = log
        .handler
        .store()
        .read_stream(
            &stream,
            orderly_event_store::Direction::Forwards,
            None,
            10_000,
        )
        .await
        .unwrap();
    let mut state = None;
    for recorded in events {
        let event = orderly_command_api::decode_event(recorded).unwrap();
        state = <ProductAggregate as orderly_domain::Aggregate>::evolve(state, &event);
        let product = state.as_ref().unwrap();
        assert!(product.reserved() <= product.on_hand(), "{product:?}");
    }
    let product = log.product("LAST").await;
    assert_eq!(
        (product.on_hand(), product.reserved(), product.available()),
        (10, 10, 0)
    );
}

#[tokio::test]
async fn a_declined_payment_cancels_the_order_and_releases_its_stock() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let (simulator, _saga) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 2, "tok_declined").await.id;
    let log = Log::new(&settings);
    let order = log
        .settled(std::slice::from_ref(&id), Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(
        order.cancellation_reason.unwrap().as_str(),
        "payment declined"
    );
    let product = log.released("TEA").await;
    assert_eq!((product.reserved(), product.available()), (0, 5));
    assert_eq!(simulator.charges(), 0);
    // The notice is delivered by the outbox worker, after the cancellation.
    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and delivered_at is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
}

/// The charge goes into the outbox with the commit of the step that requested it: a runner to
/// which the request never comes back through the log still charges and confirms the order
/// (it used to wait for that echo, a hop through the log between order and charge).
#[tokio::test]
async fn a_charge_goes_out_without_waiting_for_its_request_to_come_back_through_the_log() {
    let Shop {
        db: _db,
        settings,
        api,
    } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let simulator = Arc::new(Simulator::default());
    let store = Tampered::hiding(&settings, "PaymentChargeRequested");
    let runner = runner_over(
        &settings,
        quick_config(patient_timing()),
        store,
        simulator.clone(),
    );
    let _saga = tokio::spawn(runner.run_until_stopped(std::future::pending()));
    let id = place(&api, "alice", "TEA", 2, "tok_ok").await.id;
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(20))
        .await;
    assert_eq!(simulator.charges(), 1);
}

/// The store with two faults a test switches on: its subscriptions never hand over events of
/// one type, and reads of the streams named in `unreadable` fail as if the database were away.
struct Tampered {
    inner: Arc<dyn EventStore>,
    hidden: &'static str,
    unreadable: std::sync::Mutex<std::collections::HashSet<StreamName>>,
}

impl Tampered {
    fn hiding(settings: &Settings, event_type: &'static str) -> Arc<Self> {
        Arc::new(Self {
            inner: orderly_service::app::event_store(settings).unwrap(),
            hidden: event_type,
            unreadable: Default::default(),
        })
    }

    fn readable(&self, stream: &StreamName) -> Result<(), StoreError> {
        if self.unreadable.lock().unwrap().contains(stream) {
            return Err(StoreError::Unavailable(
                format!("{stream} made unreadable by the test").into(),
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl StoreLayer for Tampered {
    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.readable(stream)?;
        self.inner.read_stream(stream, direction, from, limit).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        for (stream, _) in requests {
            self.readable(stream)?;
        }
        self.inner.read_streams(requests, limit).await
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        let mut events = self.inner.subscribe(after, filter).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let hidden = self.hidden;
        let task = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let shown = !matches!(&event, Ok(recorded) if recorded.event_type == hidden);
                if shown && tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::from_channel(rx, task))
    }
}

/// Two orders of one lane waiting for a payment that never comes (a 4 s deadline), followed
/// by a runner on a [`Tampered`] store that never shows it its own cancels coming back through
/// the log, so what a tick stores is all the saga knows of them.
struct DueTogether {
    shop: Shop,
    store: Arc<Tampered>,
    client: tokio_postgres::Client,
    first: String,
    second: String,
    _saga: JoinHandle<()>,
}

impl DueTogether {
    async fn open() -> Self {
        let shop = Shop::open().await;
        register(&shop.api, "TEA", 650, "EUR", 50).await;
        let store = Tampered::hiding(&shop.settings, "OrderCancelled");
        let timing = Timing {
            payment_deadline_ms: 4_000,
            ..fast_timing()
        };
        let runner = runner_over(
            &shop.settings,
            quick_config(timing),
            store.clone(),
            Arc::new(NeverAnswers),
        );
        let saga = tokio::spawn(async move {
            runner
                .run_until_stopped(std::future::pending())
                .await
                .unwrap();
        });
        let (first, second) = two_orders_of_one_lane(&shop.api).await;
        let client = shop.db.connect().await.unwrap();
        let due = Self {
            shop,
            store,
            client,
            first,
            second,
            _saga: saga,
        };
        // Both charges requested (and so the payment deadlines set) before a test breaks
        // anything: a stock deadline is due earlier, and a fault before the request would
        // stop the lane instead.
        let within = Instant::now() + Duration::from_secs(20);
        while count(
            &due.shop.db,
            &format!(
                "select count(*) from saga_states where phase = 'awaiting_payment'
                 and order_id in ('{}', '{}')",
                due.first, due.second
            ),
        )
        .await
            < 2
        {
            assert!(
                Instant::now() < within,
                "both orders wait for their payment"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        due
    }

    /// Whether order `id` has a deadline pending.
    async fn due(&self, id: &str) -> bool {
        self.client
            .query_one(
                "select due_at is not null from saga_states where order_id = $1::text::uuid",
                &[&id],
            )
            .await
            .is_ok_and(|row| row.get(0))
    }

    async fn until(&self, id: &str, due: bool, what: &str) {
        let within = Instant::now() + Duration::from_secs(20);
        while self.due(id).await != due {
            assert!(Instant::now() < within, "{what}: {id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A deadline whose check fails in a way that may pass (the order's payment stream cannot be
/// read) is tried again later, and does not keep the other deadlines of its page from being
/// stored: that page used to be handled and then thrown away at every tick until the one
/// order's check passed.
#[tokio::test]
async fn a_deadline_check_that_fails_for_a_while_does_not_hold_back_its_pages_others() {
    let due = DueTogether::open().await;
    let (failing, other) = (&due.first, &due.second);
    let payment = StreamName::parse(streams::payment(OrderId(failing.parse().unwrap()))).unwrap();
    due.store.unreadable.lock().unwrap().insert(payment);

    // The other order is cancelled at its deadline, and its tick stored: no longer due.
    let log = Log::new(&due.shop.settings);
    let order = log.cancelled(other, Duration::from_secs(20)).await;
    assert!(cancelled_for_the_deadline(&order), "{order:?}");
    due.until(other, false, "the other order's tick was stored")
        .await;
    assert!(due.due(failing).await, "the failing order is still due");
    assert_ne!(log.order(failing).await.status, OrderStatus::Cancelled);

    // Once its stream reads again, the failing order's deadline is handled too.
    due.store.unreadable.lock().unwrap().clear();
    let order = log.cancelled(failing, Duration::from_secs(20)).await;
    assert!(cancelled_for_the_deadline(&order), "{order:?}");
}

/// A deadline handled for an order whose new state the database refuses for good is tried
/// again after a pause, and the other deadlines of its page are stored: the page's commit used
/// to fail at every tick.
#[tokio::test]
async fn a_deadline_whose_outcome_the_database_refuses_does_not_hold_back_its_pages_others() {
    let due = DueTogether::open().await;
    let (refused, other) = (&due.first, &due.second);
    let when = format!("new.order_id = '{refused}'");
    refuse_with(&due.client, STATES, "update on saga_states", &when, "22008").await;

    let log = Log::new(&due.shop.settings);
    for id in [refused, other] {
        let order = log.cancelled(id, Duration::from_secs(20)).await;
        assert!(cancelled_for_the_deadline(&order), "{order:?}");
    }
    due.until(other, false, "the other order's tick was stored")
        .await;
    assert!(
        due.due(refused).await,
        "the refused order's state is as it was"
    );
}

/// One card failing on its own is retried, not taken for a provider outage.
#[tokio::test]
async fn a_card_that_keeps_failing_is_retried_until_the_deadline_cancels_and_releases() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let simulator = Arc::new(Simulator::default());
    let gateway = Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let _saga = start_saga_with(&settings, gateway.clone(), fast_timing());
    let id = place(&api, "alice", "TEA", 1, "tok_unavailable").await.id;

    let log = Log::new(&settings);
    let started = Instant::now();
    let mut saw_open = false;
    let order = loop {
        saw_open |= gateway.breaker_state() == BreakerState::Open;
        let order = log.order(&id).await;
        if order.status == OrderStatus::Cancelled {
            break order;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never cancelled: {order:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!saw_open, "one failing card opened the provider's breaker");
    assert!(
        simulator.calls() >= 3,
        "retried: {} calls",
        simulator.calls()
    );
    assert!(cancelled_for_the_deadline(&order), "{order:?}");
    let failures = count(
        &db,
        "select count(*) from events where event_type = 'PaymentFailed'",
    )
    .await;
    assert!(failures >= 1);
    let product = log.released("TEA").await;
    assert_eq!((product.reserved(), product.available()), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_the_runner_mid_flight_never_charges_twice() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let simulator = Arc::new(Simulator::default());
    // A deadline far beyond the slow answers and the outbox lease: only restarts are tested.
    let timing = Timing {
        payment_deadline_ms: 60_000,
        ..fast_timing()
    };
    let gateway = || Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let first = start_saga_with(&settings, gateway(), timing);
    let mut ids = Vec::new();
    for i in 0..6 {
        let token = if i % 2 == 0 { "tok_slow" } else { "tok_ok" };
        ids.push(place(&api, &format!("c{i}"), "TEA", 1, token).await.id);
    }
    // Kill the runner while charges are in flight: at least one taken, not all recorded.
    let started = Instant::now();
    while simulator.charges() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no charge ever made"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.abort();
    let _ = first.await;
    let calls_before = simulator.calls();
    // The slow charges (2 s) were still being answered: some orders not charged in the log.
    let charged_before = count(
        &db,
        "select count(*) from events where event_type = 'PaymentCharged'",
    )
    .await;
    assert!(
        charged_before < ids.len() as i64,
        "every charge was recorded before the restart: {charged_before}"
    );
    let _second = start_saga_with(&settings, gateway(), timing);

    let log = Log::new(&settings);
    log.confirmed(&ids, Duration::from_secs(60)).await;
    assert_eq!(
        simulator.charges(),
        ids.len(),
        "one charge per order at the gateway"
    );
    // Same keys make repeats harmless at a provider, but a charge whose outcome the log held
    // before the restart is not sent again at all.
    let calls_after = simulator.calls() - calls_before;
    let unanswered = ids.len() as u64 - charged_before as u64;
    assert!(
        calls_after <= unanswered,
        "{calls_after} charge calls after the restart for {unanswered} unanswered charges"
    );
    // The restarted runner finished the attempts in flight instead of starting new ones.
    let requested = count(
        &db,
        "select count(*) from events where event_type = 'PaymentChargeRequested'",
    )
    .await;
    assert_eq!(requested, ids.len() as i64, "one charge attempt per order");
    let charged = count(
        &db,
        "select count(*) from events where event_type = 'PaymentCharged'",
    )
    .await;
    assert_eq!(charged, ids.len() as i64, "one PaymentCharged per order");
    let refunds = refunds(&db).await;
    assert_eq!(refunds, 0);
    let confirmed = count(
        &db,
        "select count(*) from events where event_type = 'OrderConfirmed'",
    )
    .await;
    assert_eq!(confirmed, ids.len() as i64);
}

fn cancelled_for_the_deadline(order: &Order) -> bool {
    order
        .cancellation_reason
        .as_ref()
        .is_some_and(|reason| reason.as_str().contains("deadline"))
}

/// The first charge call times out at once; every later one hangs for `hang`, then times out.
/// Nothing is ever charged.
struct SlowRetries {
    calls: std::sync::atomic::AtomicU32,
    hang: Duration,
}

#[async_trait::async_trait]
impl PaymentGateway for SlowRetries {
    async fn charge(&self, _charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            tokio::time::sleep(self.hang).await;
        }
        Err(CommandError::Gateway("gateway call timed out".into()))
    }

    async fn refund(&self, _key: &str, _reference: &str) -> Result<(), CommandError> {
        Ok(())
    }

    async fn lookup(&self, _key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        Ok(None)
    }
}

/// The retry of a failed charge is sent on a tick, and the payment deadline is handled on a
/// later tick while that retry is still unanswered. Both ticks must send commands of their own:
/// when the second took the first's deadline for its own, its cancel was named like the retry,
/// the store refused it as a duplicate and the lane tried it again forever.
#[tokio::test]
async fn a_deadline_that_passes_while_a_retried_charge_is_unanswered_cancels_the_order() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let gateway = Arc::new(SlowRetries {
        calls: Default::default(),
        hang: Duration::from_secs(4),
    });
    let _saga = start_saga_with(&settings, gateway.clone(), fast_timing());
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;

    let log = Log::new(&settings);
    let order = log.cancelled(&id, Duration::from_secs(30)).await;
    assert!(cancelled_for_the_deadline(&order), "{order:?}");
    let requested = count(
        &db,
        "select count(*) from events where event_type = 'PaymentChargeRequested'",
    )
    .await;
    assert!(requested >= 2, "the failed charge was retried: {requested}");
    // The retry's answer comes after the cancel; then the stock goes back.
    let product = log.released("TEA").await;
    assert_eq!((product.reserved(), product.available()), (0, 5));
}

/// Stores `count` saga states that do not decode, due an hour ago, for other orders of the lane
/// of order `id`: their ids share its last four bytes (see `lane_of`).
async fn broken_states_due_in_the_lane_of(db: &TestDb, id: &str, count: u8) {
    let order = *uuid::Uuid::parse_str(id).unwrap().as_bytes();
    let client = db.connect().await.unwrap();
    for n in 1..=count {
        let mut bytes = order;
        bytes[0] ^= n;
        client
            .execute(
                "insert into saga_states (saga_name, order_id, state, correlation_id, due_at)
                 values ('fulfilment', $1, '\"not a state\"', $1, now() - interval '1 hour')",
                &[&uuid::Uuid::from_bytes(bytes)],
            )
            .await
            .unwrap();
    }
}

/// A lane handles its due deadlines a page of a hundred at a time, oldest first. States whose
/// deadline cannot be handled (here: they do not decode) stay due; a page full of them used to
/// be read again on every tick, so the lane's other deadlines never came up.
#[tokio::test]
async fn a_page_of_broken_deadlines_does_not_keep_the_lanes_other_deadlines_waiting() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    broken_states_due_in_the_lane_of(&db, &id, 101).await;
    let gateway = Arc::new(SlowRetries {
        calls: Default::default(),
        hang: Duration::from_secs(60),
    });
    let _saga = start_saga_with(&settings, gateway, fast_timing());

    let order = Log::new(&settings)
        .cancelled(&id, Duration::from_secs(30))
        .await;
    assert!(cancelled_for_the_deadline(&order), "{order:?}");
    // The broken ones are shown to operators as overdue; the handled one is not.
    let client = db.connect().await.unwrap();
    let overdue = maintenance::overdue(&client, "fulfilment").await.unwrap();
    assert_eq!(overdue.count, 101);
    let (oldest, _) = overdue.oldest.unwrap();
    assert_ne!(oldest.to_string(), id);
}

/// Charges like the simulator; every refund fails with the error `refusal` makes.
struct RefundsFail {
    provider: Simulator,
    refusal: fn() -> CommandError,
}

#[async_trait::async_trait]
impl PaymentGateway for RefundsFail {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        self.provider.charge(charge).await
    }

    async fn refund(&self, _key: &str, _reference: &str) -> Result<(), CommandError> {
        Err((self.refusal)())
    }
}

/// A refund dead-lettered by [`refund_dead_lettered`].
struct DeadRefund {
    db: TestDb,
    order_id: String,
    outbox_id: uuid::Uuid,
    attempts: i32,
    error: String,
}

/// An order confirmed, then cancelled by its customer, under a saga (left running) whose
/// refunds fail with `refusal` and whose outbox tries a message `max_attempts` times, once the
/// refund is dead-lettered.
async fn refund_dead_lettered(refusal: fn() -> CommandError, max_attempts: u32) -> DeadRefund {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let config = SagaConfig {
        timing: fast_timing(),
        tick: Duration::from_millis(50),
        outbox_max_attempts: max_attempts,
        ..SagaConfig::default()
    };
    let gateway = RefundsFail {
        provider: Simulator::default(),
        refusal,
    };
    let _saga = start_saga_config(&settings, Arc::new(gateway), config);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    let log = Log::new(&settings);
    let order = log
        .settled(std::slice::from_ref(&id), Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(order.status, OrderStatus::Confirmed);

    let cancelled = api
        .gql(
            Some(&customer("alice")),
            CANCEL,
            json!({ "id": id, "reason": "changed my mind" }),
        )
        .await;
    cancelled.data("cancelOrder");
    eventually(
        &db,
        "select count(*) from outbox where kind = 'refund' and dead_lettered_at is not null",
        1,
        Duration::from_secs(20),
    )
    .await;
    let row = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "select outbox_id, attempts, last_error from outbox where kind = 'refund'",
            &[],
        )
        .await
        .unwrap();
    // Confirmation and cancellation notices.
    eventually(
        &db,
        "select count(*) from outbox where kind = 'notification' and delivered_at is not null",
        2,
        Duration::from_secs(10),
    )
    .await;
    let product = log.released("TEA").await;
    assert_eq!(
        product.reserved(),
        0,
        "the reservation was released all the same"
    );
    DeadRefund {
        db,
        order_id: id,
        outbox_id: row.get(0),
        attempts: row.get(1),
        error: row.get(2),
    }
}

#[tokio::test]
async fn a_confirmed_order_notifies_and_a_refund_that_keeps_failing_is_dead_lettered() {
    let refusal = || CommandError::Gateway("refunds are down".into());
    let refund = refund_dead_lettered(refusal, 2).await;
    assert_eq!(refund.attempts, 2, "tried outbox_max_attempts times");
    assert!(
        refund.error.contains("refunds are down"),
        "{}",
        refund.error
    );
}

/// A refund the provider refuses (a client error: it knows no such charge, say) would be
/// refused again: it is dead-lettered at its first failure, for an operator to look at,
/// instead of being sent the 20 times a provider that is down gets, over many minutes.
#[tokio::test]
async fn a_refund_the_provider_refuses_is_dead_lettered_at_its_first_failure() {
    let refusal =
        || CommandError::Internal("the payment provider refused the refund: 404 Not Found".into());
    let refund = refund_dead_lettered(refusal, 20).await;
    assert_eq!(refund.attempts, 1, "not tried again");
    assert!(
        refund.error.contains("refused the refund"),
        "{}",
        refund.error
    );
}

/// A delivery confirmed after the order's settled saga state was purged (the purge keeps a
/// settled state a week; a parcel can take longer) is passed over. It used to start an
/// instance from itself alone, one with no placement that never settles: open for good in the
/// census, and behind the "stuck" alert.
#[tokio::test]
async fn a_delivery_after_the_saga_state_was_purged_starts_no_instance() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let (simulator, first) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    api.gql(Some(&warehouse()), SHIP, json!({ "id": id }))
        .await
        .data("shipOrder");
    let states = format!("select count(*) from saga_states where order_id = '{id}'");
    eventually(
        &db,
        &format!("{states} and settled"),
        1,
        Duration::from_secs(20),
    )
    .await;
    // Weeks later: the state purged, and the runner that kept it in memory long gone.
    first.abort();
    let _ = first.await;
    db.connect()
        .await
        .unwrap()
        .execute("delete from saga_states", &[])
        .await
        .unwrap();
    let gateway = Arc::new(Resilient::new(simulator, fast_resilience()));
    let _second = start_saga(&settings, gateway);

    api.gql(Some(&warehouse()), DELIVER, json!({ "id": id }))
        .await
        .data("markDelivered");
    let behind = format!(
        "select count(*) from saga_lanes l
         join events e on e.stream = 'order-{id}' and e.event_type = 'OrderDelivered'
         where l.saga_name = 'fulfilment'
         and (l.position_commit, l.position_prepare) < (e.tx_id, e.seq)"
    );
    eventually(&db, &behind, 0, Duration::from_secs(30)).await;
    assert_eq!(count(&db, &states).await, 0, "no instance started");
    assert_eq!(count(&db, "select count(*) from saga_parked").await, 0);
}

/// A dead-lettered refund is not skipped like a mail: skipped, the customer's money stayed
/// taken while nothing said so, and the order's saga waited for the refund for good (in flight
/// in the gauges, compensating for ever). An operator who gave the money back another way says
/// so, and the refund is recorded in the payment's stream: the saga settles.
#[tokio::test]
async fn a_refund_is_skipped_only_once_recorded_as_made_elsewhere() {
    let refusal = || CommandError::Internal("the payment provider refused the refund: 409".into());
    let DeadRefund {
        db,
        order_id,
        outbox_id,
        ..
    } = refund_dead_lettered(refusal, 20).await;
    let client = db.connect().await.unwrap();
    let refused = maintenance::skip(&client, outbox_id).await;
    assert!(
        matches!(&refused, Err(CommandError::InvalidInput { message, .. })
            if message.contains("--refunded-elsewhere")),
        "{refused:?}"
    );
    let skipped = "select count(*) from outbox where kind = 'refund' and skipped_at is not null";
    assert_eq!(count(&db, skipped).await, 0);

    let id = outbox_id.to_string();
    let done = skip_as_settled_elsewhere(
        &db,
        &id,
        "--refunded-elsewhere",
        "PaymentRefunded",
        &order_id,
    )
    .await;
    assert!(done.contains("recorded as made outside Orderly"), "{done}");
    assert_eq!(count(&db, skipped).await, 1);

    // Put back in line afterwards by mistake, it does not pay the money back a second time:
    // delivered without a call to the provider (whose refunds all fail here).
    maintenance::retry(&client, outbox_id).await.unwrap();
    let delivered =
        "select count(*) from outbox where kind = 'refund' and delivered_at is not null";
    eventually(&db, delivered, 1, Duration::from_secs(20)).await;
    let payment = format!("payment-{order_id}");
    assert_eq!(
        events_of(&db, "PaymentRefunded", &payment).await,
        1,
        "refunded once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_runner_takes_over_when_the_leader_dies() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let simulator = Arc::new(Simulator::default());
    let gateway = || Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let leader = start_saga(&settings, gateway());
    // Give the leader the lock before the standby asks for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _standby = start_saga(&settings, gateway());
    let log = Log::new(&settings);
    let first = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    log.settled(std::slice::from_ref(&first), Duration::from_secs(30))
        .await;
    leader.abort();
    let _ = leader.await;
    let second = place(&api, "bob", "TEA", 1, "tok_ok").await.id;
    log.confirmed(&[first, second], Duration::from_secs(30))
        .await;
    assert_eq!(simulator.charges(), 2);
    let reserved = count(
        &db,
        "select count(*) from events where event_type = 'StockReserved'",
    )
    .await;
    assert_eq!(reserved, 2, "each order reserved once");
    // The survivor holds every lane now: the dead runner's share moved to it.
    eventually(
        &db,
        "select count(distinct owner) from saga_lanes where lease_until > now()",
        1,
        Duration::from_secs(20),
    )
    .await;
    eventually(
        &db,
        "select count(*) from saga_lanes where lease_until > now()",
        16,
        Duration::from_secs(20),
    )
    .await;
}

/// A runner that shares its lanes with a process that joins restarts its consumer on the lanes
/// it keeps, from where they stand. It used to start from where they stood when it claimed
/// them: every event since was handed to the saga again, and the outbox messages of those
/// events went back in line once the retention purge had removed them (a charge call and a
/// mail again per order, days later).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_that_gives_lanes_to_a_newcomer_goes_on_from_where_its_lanes_stand() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let simulator = Arc::new(Simulator::default());
    let gateway = || Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let _first = start_saga(&settings, gateway());
    // Enough orders that the lanes the first runner keeps hold some of them.
    let placing = (0..32).map(|i| {
        let api = &api;
        async move { place(api, &format!("c{i}"), "TEA", 1, "tok_ok").await.id }
    });
    let ids = futures::future::join_all(placing).await;
    let log = Log::new(&settings);
    log.confirmed(&ids, Duration::from_secs(60)).await;
    eventually(
        &db,
        "select count(*) from outbox where delivered_at is null",
        0,
        Duration::from_secs(20),
    )
    .await;
    // As the retention purge leaves the outbox a week later.
    db.connect()
        .await
        .unwrap()
        .execute("delete from outbox", &[])
        .await
        .unwrap();

    let _second = start_saga(&settings, gateway());
    eventually(
        &db,
        "select count(distinct owner) from saga_lanes where lease_until > now()",
        2,
        Duration::from_secs(20),
    )
    .await;
    // Time for a consumer that started over to get through the log (it did so in well under
    // a second).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outbox = count(&db, "select count(*) from outbox").await;
    assert_eq!(outbox, 0, "messages of settled orders put back in line");
    assert_eq!(simulator.charges(), ids.len());
}

/// A payment event the runner cannot read may be the charge: the payment deadline is not
/// judged without it. The tick used to skip it, cancel the order "payment not completed", and,
/// the charge unseen, refund nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_event_that_does_not_decode_holds_the_payment_deadline() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let _saga = start_saga_with(&settings, Arc::new(NeverAnswers), fast_timing());
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    let payment = format!("payment-{id}");
    let requested = format!(
        "select count(*) from events where stream = '{payment}' and event_type = 'PaymentChargeRequested'"
    );
    eventually(&db, &requested, 1, Duration::from_secs(20)).await;
    // The charge, as a newer build (or a broken upcaster) wrote it: this one cannot read it.
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into events (event_id, stream, version, event_type, data, metadata)
             values (gen_random_uuid(), $1, 1, 'PaymentCharged', '{\"charged_in\": \"v9\"}', '{}')",
            &[&payment],
        )
        .await
        .unwrap();
    eventually(
        &db,
        "select count(*) from saga_parked where event_type = 'PaymentCharged'",
        1,
        Duration::from_secs(10),
    )
    .await;
    // Well past the 2.5 s payment deadline, with ticks every 100 ms.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let order = Log::new(&settings).order(&id).await;
    assert_eq!(order.status, OrderStatus::StockReserved, "{order:?}");
    let cancels = count(
        &db,
        "select count(*) from events where event_type = 'OrderCancelled'",
    )
    .await;
    assert_eq!(cancels, 0);
}

/// A provider whose charge calls never return.
struct NeverAnswers;

#[async_trait::async_trait]
impl PaymentGateway for NeverAnswers {
    async fn charge(&self, _charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        std::future::pending().await
    }

    async fn refund(&self, _key: &str, _reference: &str) -> Result<(), CommandError> {
        Ok(())
    }

    async fn lookup(&self, _key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        Ok(None)
    }
}

/// The saga's own outage does not count against a customer's payment deadline: a charge that
/// waited in the outbox while no runner ran is tried when one comes back, before the lanes
/// judge the deadline that ran out meanwhile. Here the first runner's provider never answers,
/// and it stops (as a crash would) with the charge in flight; the next one starts past the
/// deadline with a provider that charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_that_waited_out_an_outage_is_tried_before_its_deadline_is_judged() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let timing = Timing {
        payment_deadline_ms: 2_000,
        ..fast_timing()
    };
    let first = start_saga_with(&settings, Arc::new(NeverAnswers), timing);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    eventually(
        &db,
        "select count(*) from outbox where kind = 'charge' and claimed_by is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
    first.abort();
    let _ = first.await;
    // Past the deadline and the first runner's lease.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let simulator = Arc::new(Simulator::default());
    let _second = start_saga_with(&settings, simulator.clone(), timing);
    let order = Log::new(&settings)
        .settled(std::slice::from_ref(&id), Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(order.status, OrderStatus::Confirmed, "{order:?}");
    assert_eq!(simulator.charges(), 1);
}

/// The runner skips writing a state when a step moved only its clock; what it stored must
/// still decide as a state folded from the order's events in the log would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stored_state_of_a_confirmed_order_decides_as_one_rebuilt_from_the_log() {
    use orderly_command_api::saga::lanes::lane_of;
    use orderly_domain::fulfilment::{self, FulfilmentState, SagaInput};
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let (_simulator, _saga) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 2, "tok_ok").await.id;
    let order = Log::new(&settings)
        .settled(std::slice::from_ref(&id), Duration::from_secs(30))
        .await
        .remove(0);
    assert_eq!(order.status, OrderStatus::Confirmed);
    let client = db.connect().await.unwrap();
    let events = client
        .query(
            "select event_type, data, metadata, tx_id, seq from events
             where data->>'order_id' = $1 order by tx_id, seq",
            &[&id],
        )
        .await
        .unwrap();
    let kinds: Vec<String> = events.iter().map(|row| row.get(0)).collect();
    assert_eq!(kinds.last().map(String::as_str), Some("OrderConfirmed"));
    // Every event of the order handled: its lane's checkpoint is past the last one.
    let last = events.last().unwrap();
    let (tx_id, seq): (i64, i64) = (last.get(3), last.get(4));
    let order_id = OrderId(id.parse().unwrap());
    eventually(
        &db,
        &format!(
            "select count(*) from saga_lanes where saga_name = 'fulfilment'
             and lane = {} and (position_commit, position_prepare) >= ({tx_id}, {seq})",
            lane_of(order_id)
        ),
        1,
        Duration::from_secs(10),
    )
    .await;
    let rebuilt = events.into_iter().fold(
        FulfilmentState::with_timing(patient_timing()),
        |state, row| {
            let event_type: String = row.get(0);
            let recorded =
                orderly_event_schemas::decode_recorded(&event_type, row.get(1), row.get(2))
                    .unwrap();
            fulfilment::evolve(state, &SagaInput::Event(&recorded.event))
        },
    );
    let row = client
        .query_one(
            "select state, phase from saga_states where order_id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let (mut stored, phase): (serde_json::Value, Option<String>) = (row.get(0), row.get(1));
    // Stored beside the state for the census of open instances.
    assert_eq!(phase.as_deref(), Some("awaiting_shipment"));
    assert!(serde_json::from_value::<FulfilmentState>(stored.clone()).is_ok());
    // Compared as stored, clocks aside: the echoes of the saga's own commands after the charge
    // move only the clock, but for `OrderConfirmed`, which the customer is told after.
    let mut rebuilt = serde_json::to_value(rebuilt).unwrap();
    for state in [&mut stored, &mut rebuilt] {
        state.as_object_mut().unwrap().remove("clock");
    }
    assert_eq!(stored, rebuilt);
}

#[tokio::test]
async fn the_database_and_the_runner_put_every_order_in_the_same_lane() {
    use orderly_command_api::saga::lanes::{LANE_OF_SQL, lane_of};
    let db = migrated_database().await;
    let client = db.connect().await.unwrap();
    let ids: Vec<uuid::Uuid> = (0..500).map(|_| uuid::Uuid::new_v4()).collect();
    let rows = client
        .query(
            &format!("select order_id, {LANE_OF_SQL} from unnest($1::uuid[]) as t(order_id)"),
            &[&ids],
        )
        .await
        .unwrap();
    for row in rows {
        let id: uuid::Uuid = row.get(0);
        let lane: i64 = row.get(1);
        assert_eq!(lane, i64::from(lane_of(OrderId(id))), "order {id}");
    }
}

/// Events of `event_type` in the log, per order id found in their data.
async fn per_order(db: &TestDb, event_type: &str) -> std::collections::HashMap<String, i64> {
    let client = db.connect().await.unwrap();
    client
        .query(
            "select data->>'order_id', count(*) from events where event_type = $1 group by 1",
            &[&event_type],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_and_a_crash_take_every_order_through_each_step_exactly_once() {
    let Shop { db, settings, api } = Shop::open().await;
    for sku in ["TEA", "MUG", "POT"] {
        register(&api, sku, 500, "EUR", 1000).await;
    }
    let simulator = Arc::new(Simulator::default());
    let gateway = || Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let first = start_saga(&settings, gateway());
    let _second = start_saga(&settings, gateway());

    let placing = (0..120).map(|i| {
        let api = &api;
        let sku = ["TEA", "MUG", "POT"][i % 3];
        async move { place(api, &format!("c{i}"), sku, 1, "tok_ok").await.id }
    });
    let mut ids = futures::future::join_all(placing.clone().take(60)).await;
    // One runner dies mid-burst; its lanes wait out their lease, then the other takes them.
    first.abort();
    let _ = first.await;
    ids.extend(futures::future::join_all(placing.skip(60)).await);

    let log = Log::new(&settings);
    log.confirmed(&ids, Duration::from_secs(90)).await;
    assert_eq!(simulator.charges(), ids.len());
    for event_type in [
        "StockReserved",
        "OrderStockReserved",
        "PaymentChargeRequested",
        "PaymentCharged",
        "OrderPaid",
        "OrderConfirmed",
    ] {
        let counts = per_order(&db, event_type).await;
        assert_eq!(counts.len(), ids.len(), "{event_type} for every order");
        assert!(
            counts.values().all(|n| *n == 1),
            "{event_type} once per order: {counts:?}"
        );
    }
    // Each order's own stream went through its steps in order.
    let client = db.connect().await.unwrap();
    let out_of_order: i64 = client
        .query_one(
            "select count(*) from (
                 select stream, array_agg(event_type order by version) as steps
                 from events where stream like 'order-%' group by stream) s
             where steps <> array['OrderPlaced', 'OrderStockReserved', 'OrderPaid',
                                  'OrderConfirmed']",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(out_of_order, 0);
}

/// A shop with ten units of TEA and one simulated saga runner that holds all 16 lanes.
async fn shop_with_every_lane_held() -> (Shop, Arc<Simulator>, JoinHandle<()>) {
    let shop = Shop::open().await;
    register(&shop.api, "TEA", 650, "EUR", 10).await;
    let (simulator, saga) = simulated_saga(&shop.settings);
    eventually(
        &shop.db,
        "select count(*) from saga_lanes where owner is not null and lease_until > now()",
        16,
        Duration::from_secs(10),
    )
    .await;
    (shop, simulator, saga)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_whose_lanes_were_taken_over_stores_nothing_until_it_holds_them_again() {
    let (Shop { db, settings, api }, simulator, _saga) = shop_with_every_lane_held().await;
    // Another process takes every lane (as after this one paused past its lease).
    let client = db.connect().await.unwrap();
    client
        .execute(
            "update saga_lanes set owner = 'intruder', generation = generation + 1,
                 lease_until = now() + interval '3 seconds'",
            &[],
        )
        .await
        .unwrap();
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let stored = count(
        &db,
        &format!("select count(*) from saga_states where order_id = '{id}'"),
    )
    .await;
    assert_eq!(stored, 0, "a fenced runner stored a saga state");

    // The intruder's lease runs out; the runner claims the lanes again and goes on.
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    assert_eq!(simulator.charges(), 1);
    let owners = count(
        &db,
        "select count(*) from saga_lanes where owner = 'intruder'",
    )
    .await;
    assert_eq!(owners, 0);
}

/// A lane taken over while its step is in flight: the append in flight may land, but the
/// step's next command must not go out, although the runner goes on renewing the lanes it
/// kept while it stops. Here the step of an order's placement reserves a mug, then tea (SKU
/// order); the mug's append is held up past the lease (a trigger sleeps in it) while another
/// process takes every lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_whose_lane_was_taken_over_sends_nothing_more() {
    let (Shop { db, settings, api }, _, _saga) = shop_with_every_lane_held().await;
    register(&api, "MUG", 1200, "EUR", 10).await;
    let client = db.connect().await.unwrap();
    client
        .batch_execute(
            "create function slow_mug() returns trigger language plpgsql
             as $$ begin perform pg_sleep(4); return new; end $$;
             create trigger slow_mug before insert on events for each row
             when (new.event_type = 'StockReserved' and new.stream = 'product-MUG')
             execute function slow_mug();",
        )
        .await
        .unwrap();
    let id = place_mug_and_tea(&api).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .execute(
            "update saga_lanes set owner = 'intruder', generation = generation + 1,
                 lease_until = now() + interval '8 seconds'",
            &[],
        )
        .await
        .unwrap();
    // The mug's append ends about 4 s after it began, past the runner's 2 s lease.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reserved = |sku: &str| {
        format!(
            "select count(*) from events where event_type = 'StockReserved'
             and stream = 'product-{sku}' and data->>'order_id' = '{id}'"
        )
    };
    assert_eq!(
        count(&db, &reserved("MUG")).await,
        1,
        "the append in flight"
    );
    assert_eq!(
        count(&db, &reserved("TEA")).await,
        0,
        "a command sent for a lane another process holds"
    );
    // Once the intruder's lease runs out, the runner takes the lanes back and goes on.
    client
        .batch_execute("drop trigger slow_mug on events")
        .await
        .unwrap();
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
}

/// A runner that cannot renew its leases (here its heartbeat waits behind a lock while its lanes
/// can still write; a process paused or cut off is the same to the others) sends no command
/// once they may have run out: another process may hold its lanes by then, and its commits
/// being fenced does not undo an append. Once it renews, it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_whose_leases_may_have_run_out_sends_nothing_until_it_renews_them() {
    let (Shop { db, settings, api }, _, _saga) = shop_with_every_lane_held().await;
    let locker = db.connect().await.unwrap();
    locker
        .batch_execute("set lock_timeout = 0; begin; lock table saga_members in exclusive mode")
        .await
        .unwrap();
    // Past the 2 s lease of the runner's last renewal.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reserved = format!(
        "select count(*) from events where event_type = 'StockReserved'
         and data->>'order_id' = '{id}'"
    );
    assert_eq!(count(&db, &reserved).await, 0, "reserved without a lease");

    locker.batch_execute("commit").await.unwrap();
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
}

/// A lane checks its deadlines on every tick before it takes its next events. When that check
/// takes longer than the tick period, the next tick is already due when it ends: a lane that
/// always took the tick first never handled another event. Here a stored state that cannot be
/// decoded comes due again on every tick, in the lane of an order placed before the runner
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadline_checks_that_outlast_the_tick_do_not_hold_up_the_lanes_events() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    broken_states_due_in_the_lane_of(&db, &id, 1).await;
    let config = SagaConfig {
        timing: patient_timing(),
        // Shorter than any check's round trips: every check outlasts its period.
        tick: Duration::from_micros(100),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(200),
        ..SagaConfig::default()
    };
    let _saga = start_saga_config(&settings, Arc::new(Simulator::default()), config);
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
}

/// Between batches a lane checks for parked events an operator asked to retry. While that
/// check keeps failing (here the parked table is gone: renamed by hand), the lane still
/// handles its events; a lane used to retry the check until it passed, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_between_batches_that_keeps_failing_does_not_hold_up_the_events() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    db.connect()
        .await
        .unwrap()
        .batch_execute("alter table saga_parked rename to saga_parked_away")
        .await
        .unwrap();
    let (_, _saga) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_fails_for_good_is_parked_and_a_retry_finishes_the_order() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let poisoned = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    // A saga state that no longer decodes: nothing can be decided for this order.
    let client = db.connect().await.unwrap();
    client
        .execute(
            "insert into saga_states (saga_name, order_id, state, correlation_id)
             values ('fulfilment', $1, '\"not a state\"', $1)",
            &[&uuid::Uuid::parse_str(&poisoned).unwrap()],
        )
        .await
        .unwrap();
    let (simulator, _saga) = simulated_saga(&settings);
    let healthy = place(&api, "bob", "TEA", 1, "tok_ok").await.id;
    let log = Log::new(&settings);
    // The lane went on.
    log.confirmed(std::slice::from_ref(&healthy), Duration::from_secs(30))
        .await;

    eventually(
        &db,
        "select count(*) from saga_parked where event_type = 'OrderPlaced'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let parked = maintenance::parked(&client, "fulfilment").await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].order_id.map(|id| id.to_string()),
        Some(poisoned.clone())
    );
    assert!(parked[0].error.contains("does not decode"), "{parked:?}");
    assert_eq!(log.order(&poisoned).await.status, OrderStatus::Placed);

    // The operator repairs the state, then asks for the event again.
    client
        .execute(
            "delete from saga_states where state = '\"not a state\"'",
            &[],
        )
        .await
        .unwrap();
    retry_confirms(&client, &log, parked[0].event_id, &poisoned).await;
    assert_eq!(simulator.charges(), 2);
}

/// Places orders until two share a lane: the first and the second of that lane (with sixteen
/// lanes, at most seventeen placements).
async fn two_orders_of_one_lane(api: &Api) -> (String, String) {
    use orderly_command_api::saga::lanes::lane_of;
    let mut lanes = std::collections::HashMap::new();
    loop {
        let id = place(api, "alice", "TEA", 1, "tok_ok").await.id;
        let lane = lane_of(OrderId(uuid::Uuid::parse_str(&id).unwrap()));
        if let Some(first) = lanes.insert(lane, id.clone()) {
            return (first, id);
        }
    }
}

/// The trigger of the tests below that refuse saga states.
const STATES: &str = "refuse_states";

/// Waits until the saga's step for order `id`'s placement has run: its reservation is in the
/// log, whatever became of the step's commit.
async fn reservation_step_ran(db: &TestDb, id: &str) {
    let reserved = format!(
        "select count(*) from events where event_type = 'StockReserved' and data->>'order_id' = '{id}'"
    );
    eventually(db, &reserved, 1, Duration::from_secs(10)).await;
}

/// Makes the database refuse order `id`'s saga state with SQLSTATE `code` (trigger
/// [`STATES`]); a connection to the shop's database.
async fn refuse_state_of(db: &TestDb, id: &str, code: &str) -> tokio_postgres::Client {
    let client = db.connect().await.unwrap();
    let when = format!("new.order_id = '{id}'");
    refuse_with(
        &client,
        STATES,
        "insert or update on saga_states",
        &when,
        code,
    )
    .await;
    client
}

/// An order whose saga state the database refuses without blaming a value (a trigger's own
/// error, SQLSTATE P0001), alone in its batch, is parked once the database has stored another
/// order's state since: the refusal is then the order's, not the database's, and the orders
/// behind it in its lane go on. The lane used to try it again for ever, every order of the
/// lane waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_refused_alone_is_parked_once_the_database_stores_other_orders() {
    use orderly_command_api::saga::lanes::lane_of;
    let lane = |id: &str| lane_of(OrderId(id.parse().unwrap()));
    let Shop { db, settings, api } = Shop::open().await;
    // Stock for however many orders it takes to land one in the refused order's lane (1 in 16
    // each: with 50 units, about one run in twenty-five ran out first).
    register(&api, "TEA", 650, "EUR", 1_000).await;
    let refused = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    let client = refuse_state_of(&db, &refused, "P0001").await;
    let (_simulator, _saga) = simulated_saga(&settings);
    reservation_step_ran(&db, &refused).await;

    // Orders of other lanes, and one behind the refused order in its lane.
    let mut later = Vec::new();
    while !later.iter().any(|id: &String| lane(id) == lane(&refused))
        || !later.iter().any(|id: &String| lane(id) != lane(&refused))
    {
        later.push(place(&api, "bob", "TEA", 1, "tok_ok").await.id);
    }
    Log::new(&settings)
        .confirmed(&later, Duration::from_secs(30))
        .await;
    let parked = maintenance::parked(&client, "fulfilment").await.unwrap();
    assert!(!parked.is_empty());
    assert!(
        parked.iter().all(|event| {
            event.order_id.map(|id| id.to_string()) == Some(refused.clone())
                && parked_for_its_state(event)
        }),
        "{parked:?}"
    );
    assert!(
        parked
            .iter()
            .any(|event| event.error.contains("refused on purpose")),
        "{parked:?}"
    );
}

/// Whether `event`, of an order whose saga state the database refuses, is parked for that:
/// its placement because the state it started could not be stored, the events after it
/// because no stored instance holds their order (they are not stepped from nothing).
fn parked_for_its_state(event: &maintenance::ParkedEvent) -> bool {
    if event.event_type == "OrderPlaced" {
        event.error.contains("could not be stored")
    } else {
        event.error.contains("no instance of this order")
    }
}

/// An order whose saga state the database refuses to hold (a value out of its range: SQLSTATE
/// class 22) has its events parked, and the lane goes on with its other orders: the batch's
/// commit used to be tried again for ever, and every order of the lane waited behind it.
#[tokio::test]
async fn an_order_whose_state_the_database_refuses_is_parked_and_its_lane_goes_on() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 50).await;
    let (refused, healthy) = two_orders_of_one_lane(&api).await;
    let client = refuse_state_of(&db, &refused, "22008").await;
    let (_simulator, _saga) = simulated_saga(&settings);
    let log = Log::new(&settings);
    log.confirmed(std::slice::from_ref(&healthy), Duration::from_secs(30))
        .await;
    // Its placement and the reservation's answer: all the saga has seen of it.
    eventually(
        &db,
        &format!("select count(*) from saga_parked where order_id = '{refused}'"),
        2,
        Duration::from_secs(10),
    )
    .await;
    let parked = maintenance::parked(&client, "fulfilment").await.unwrap();
    assert!(
        parked.iter().all(|event| {
            event.order_id.map(|id| id.to_string()) == Some(refused.clone())
                && parked_for_its_state(event)
        }),
        "{parked:?}"
    );
    assert_ne!(log.order(&refused).await.status, OrderStatus::Confirmed);
    // Fed again before the repair: refused again, the events stay parked with the attempt
    // counted and wait for the next retry (the retry used to be tried again for ever, and
    // held the lane's other retries).
    for event in &parked {
        let event = ParkedOf::Event(event.event_id);
        maintenance::retry_parked(&client, "fulfilment", event)
            .await
            .unwrap();
    }
    eventually(
        &db,
        &format!(
            "select count(*) from saga_parked where order_id = '{refused}'
             and attempts = 2 and retry_requested_at is null"
        ),
        2,
        Duration::from_secs(20),
    )
    .await;

    // Repaired, every parked event of the order fed again (those its commands' echoes added
    // since too), as `orderly saga parked retry --order` asks: it confirms, charged once.
    accept_again(&client, STATES, "saga_states").await;
    let instance = ParkedOf::Order(refused.parse().unwrap());
    let asked = maintenance::retry_parked(&client, "fulfilment", instance)
        .await
        .unwrap();
    assert!(asked >= 2, "{asked}");
    log.confirmed(std::slice::from_ref(&refused), Duration::from_secs(30))
        .await;
    assert_eq!(
        per_order(&db, "PaymentCharged").await.get(&refused),
        Some(&1)
    );
}

/// When the database refuses every saga state (a table it lacks, a permission: no fault of
/// one order's), nothing is parked: the lane tries again until the database is repaired, then
/// goes on by itself.
#[tokio::test]
async fn a_database_that_refuses_every_state_holds_the_lane_until_repaired() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 50).await;
    let client = db.connect().await.unwrap();
    refuse_for_good(&client, STATES, "insert or update on saga_states", "true").await;
    let (_simulator, _saga) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    // The placement's step ran (its reservation is in the log), its commit was refused.
    reservation_step_ran(&db, &id).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&db, "select count(*) from saga_parked").await, 0);
    assert_eq!(count(&db, "select count(*) from saga_states").await, 0);
    // The lane holds: its checkpoint has not moved past the order's placement, whose step
    // it could not store (the reader's progress moves only the checkpoints of quiet lanes).
    use orderly_command_api::saga::lanes::LANE_OF_SQL;
    let stream = streams::order(OrderId(id.parse().unwrap()));
    let behind = format!(
        "select count(*) from saga_lanes l
         join events e on e.stream = '{stream}' and e.event_type = 'OrderPlaced'
         where l.saga_name = 'fulfilment'
         and l.lane = (select {LANE_OF_SQL} from (select '{id}'::uuid as order_id) o)
         and (l.position_commit, l.position_prepare) < (e.tx_id, e.seq)"
    );
    assert_eq!(
        count(&db, &behind).await,
        1,
        "the lane moved past the order"
    );

    accept_again(&client, STATES, "saga_states").await;
    Log::new(&settings)
        .confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    assert_eq!(count(&db, "select count(*) from saga_parked").await, 0);
}

/// An operator's retry of parked event `event_id`, which must confirm order `id` (well before
/// any stock deadline of these tests' default timing) and leave nothing parked.
async fn retry_confirms(
    client: &tokio_postgres::Client,
    log: &Log,
    event_id: uuid::Uuid,
    id: &str,
) {
    maintenance::retry_parked(client, "fulfilment", ParkedOf::Event(event_id))
        .await
        .unwrap();
    log.confirmed(&[id.to_owned()], Duration::from_secs(20))
        .await;
    assert!(
        maintenance::parked(client, "fulfilment")
            .await
            .unwrap()
            .is_empty()
    );
}

/// [`simulated_saga`] whose stock deadline passes 3 s after the reservations are sent.
fn saga_with_short_stock_deadline(settings: &Settings) -> (Arc<Simulator>, JoinHandle<()>) {
    let simulator = Arc::new(Simulator::default());
    let gateway = Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let timing = Timing {
        stock_deadline_ms: 3_000,
        ..patient_timing()
    };
    (simulator, start_saga_with(settings, gateway, timing))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reservation_whose_step_was_parked_is_read_from_its_product_at_the_stock_deadline() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    // The log refuses the order's "stock reserved" for good (a trigger stands in for a bug):
    // the step of the product's `StockReserved` fails and is parked, and nothing the saga
    // sees will ever answer the reservation again.
    let client = db.connect().await.unwrap();
    refuse_for_good(
        &client,
        "refuse_stock_reserved",
        "insert on events",
        "new.event_type = 'OrderStockReserved'",
    )
    .await;
    let (simulator, _saga) = saga_with_short_stock_deadline(&settings);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    eventually(
        &db,
        "select count(*) from saga_parked where event_type = 'StockReserved'",
        1,
        Duration::from_secs(10),
    )
    .await;
    let log = Log::new(&settings);
    assert_eq!(log.order(&id).await.status, OrderStatus::Placed);
    accept_again(&client, "refuse_stock_reserved", "events").await;

    // No operator: at the stock deadline the saga reads the product's answer and goes on.
    log.confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    assert_eq!(simulator.charges(), 1);
    assert_eq!(log.product("TEA").await.reserved(), 1, "held for shipping");
}

/// A store that fails the first release appended to `product-TEA` as a lost connection would
/// (transient), and hides every `StockReserved` from the saga's feed of the log.
struct TeaReleaseFailsOnce {
    inner: Arc<dyn EventStore>,
    failed: std::sync::atomic::AtomicBool,
}

impl TeaReleaseFailsOnce {
    fn refuses(&self, stream: &StreamName, events: &[NewEvent]) -> bool {
        let release = events
            .iter()
            .any(|event| event.event_type == "StockReservationReleased");
        release
            && stream.to_string() == "product-TEA"
            && !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    fn lost() -> StoreError {
        StoreError::Unavailable("connection lost (injected by the test)".into())
    }
}

#[async_trait::async_trait]
impl StoreLayer for TeaReleaseFailsOnce {
    fn inner(&self) -> &dyn EventStore {
        &*self.inner
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        if self.refuses(stream, &events) {
            return Err(Self::lost());
        }
        self.inner.append(stream, expected, events).await
    }

    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        let refused: Vec<bool> = appends
            .iter()
            .map(|append| self.refuses(&append.stream, &append.events))
            .collect();
        let passed = appends
            .into_iter()
            .zip(&refused)
            .filter(|(_, refused)| !**refused)
            .map(|(append, _)| append)
            .collect();
        let mut results = self.inner.append_many(passed).await.into_iter();
        refused
            .iter()
            .map(|refused| match refused {
                true => Err(Self::lost()),
                false => results.next().unwrap_or_else(|| Err(Self::lost())),
            })
            .collect()
    }
}

/// A check of the products whose try fails after its first release was written sends the
/// rest when tried again. The retry's commands were named by their place in the step: the
/// tea's release took the id of the mug's, already in the log, was refused as a duplicate
/// for good, and the tea stayed reserved for a cancelled order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_of_the_products_tried_again_after_a_failure_releases_what_is_left() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "MUG", 1200, "EUR", 10).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    // The saga never sees the reservations' answers: at the stock deadline it reads both
    // holds, and releases both in one step, the mug's first.
    let store = Arc::new(TeaReleaseFailsOnce {
        inner: Tampered::hiding(&settings, "StockReserved"),
        failed: Default::default(),
    });
    let timing = Timing {
        stock_deadline_ms: 3_000,
        ..patient_timing()
    };
    let runner = runner_over(
        &settings,
        quick_config(timing),
        store.clone(),
        Arc::new(Simulator::default()),
    );
    let _saga = tokio::spawn(runner.run_until_stopped(std::future::pending()));
    let id = place_mug_and_tea(&api).await;
    cancel_as(&api, "alice", &id).await;

    eventually(
        &db,
        &format!("select count(*) from saga_states where order_id = '{id}' and settled"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        store.failed.load(std::sync::atomic::Ordering::SeqCst),
        "the fault happened"
    );
    let log = Log::new(&settings);
    assert_eq!(log.product("MUG").await.reserved(), 0);
    assert_eq!(log.product("TEA").await.reserved(), 0);
}

/// A customer's cancel whose step is parked (the release of its stock refused for good)
/// still cancelled the order: the charge still waiting in line is withdrawn, never sent to
/// the provider to be refunded later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_whose_step_was_parked_still_withdraws_the_charge_never_tried() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 5).await;
    let client = db.connect().await.unwrap();
    // Nothing can be claimed from the outbox: the charge waits in line, untried.
    refuse_for_good(
        &client,
        "no_claims",
        "update on outbox",
        "new.claimed_by is not null",
    )
    .await;
    refuse_for_good(
        &client,
        "no_release",
        "insert on events",
        "new.event_type = 'StockReservationReleased'",
    )
    .await;
    let (simulator, _saga) = simulated_saga(&settings);
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    let charge = format!("select count(*) from outbox where kind = 'charge' and order_id = '{id}'");
    eventually(&db, &charge, 1, Duration::from_secs(10)).await;
    cancel_as(&api, "alice", &id).await;
    eventually(
        &db,
        "select count(*) from saga_parked where event_type = 'OrderCancelled'",
        1,
        Duration::from_secs(10),
    )
    .await;
    eventually(
        &db,
        &format!("{charge} and (payload->>'withdrawn')::boolean"),
        1,
        Duration::from_secs(10),
    )
    .await;
    // Once the outbox can claim again, the withdrawn charge is settled without a call.
    accept_again(&client, "no_claims", "outbox").await;
    eventually(
        &db,
        &format!("{charge} and delivered_at is not null"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(simulator.calls(), 0, "a charge sent for a cancelled order");
}

/// Registers a mug and tea, and makes the log refuse every reservation of tea for good (a
/// trigger, `refuse_reservation`, stands in for a bug): the step of an order's `OrderPlaced`
/// fails at its tea, after its mug (SKU order) was reserved. A connection to the shop's database.
async fn mugs_and_tea_refused(api: &Api, db: &TestDb) -> tokio_postgres::Client {
    register(api, "MUG", 1200, "EUR", 10).await;
    register(api, "TEA", 650, "EUR", 10).await;
    let client = db.connect().await.unwrap();
    refuse_for_good(
        &client,
        "refuse_reservation",
        "insert on events",
        "new.event_type = 'StockReserved' and new.stream = 'product-TEA'",
    )
    .await;
    client
}

/// Places one order of a mug and two teas, paid with `tok_ok`, and waits until the saga has
/// parked its `OrderPlaced` (see [`mugs_and_tea_refused`]); its id.
async fn place_mug_and_tea_until_parked(api: &Api, db: &TestDb) -> String {
    let id = place_mug_and_tea(api).await;
    eventually(
        db,
        "select count(*) from saga_parked where event_type = 'OrderPlaced'",
        1,
        Duration::from_secs(10),
    )
    .await;
    id
}

/// Places one order of a mug and two teas as alice, paid with `tok_ok`; its id.
async fn place_mug_and_tea(api: &Api) -> String {
    let lines = json!([{ "sku": "MUG", "quantity": 1 }, { "sku": "TEA", "quantity": 2 }]);
    let answer = api
        .gql(
            Some(&customer("alice")),
            PLACE,
            order_input(lines, "tok_ok"),
        )
        .await;
    answer.data("placeOrder")["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_placement_whose_step_was_parked_is_cancelled_at_the_stock_deadline_and_gives_back() {
    let Shop { db, settings, api } = Shop::open().await;
    mugs_and_tea_refused(&api, &db).await;
    let (simulator, _saga) = saga_with_short_stock_deadline(&settings);
    let id = place_mug_and_tea_until_parked(&api, &db).await;
    let log = Log::new(&settings);
    assert_eq!(
        log.product("MUG").await.reserved(),
        1,
        "reserved before the failure"
    );

    // No operator: the stock deadline finds no tea held for the order, cancels it and gives
    // the mug back. Before, the placement left no saga state, so no deadline: the order stayed
    // PLACED with the mug held until an operator acted.
    let order = log.cancelled(&id, Duration::from_secs(30)).await;
    assert_eq!(
        order.cancellation_reason.unwrap().as_str(),
        "stock not reserved in time"
    );
    assert_eq!(log.released("MUG").await.reserved(), 0);
    assert_eq!(log.product("TEA").await.reserved(), 0);
    assert_eq!(simulator.charges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_placement_sends_the_reservations_its_failed_step_did_not() {
    let Shop { db, settings, api } = Shop::open().await;
    let client = mugs_and_tea_refused(&api, &db).await;
    let (simulator, _saga) = simulated_saga(&settings);
    let id = place_mug_and_tea_until_parked(&api, &db).await;

    // The operator removes the cause and retries, long before the stock deadline (5 minutes):
    // the tea's reservation, never sent, is sent now; the mug's is not written twice.
    accept_again(&client, "refuse_reservation", "events").await;
    let parked = maintenance::parked(&client, "fulfilment").await.unwrap();
    let log = Log::new(&settings);
    retry_confirms(&client, &log, parked[0].event_id, &id).await;
    assert_eq!(simulator.charges(), 1);
    assert_eq!(log.product("MUG").await.reserved(), 1);
    assert_eq!(log.product("TEA").await.reserved(), 2);
    let reservations = count(
        &db,
        "select count(*) from events where event_type = 'StockReserved'",
    )
    .await;
    assert_eq!(reservations, 2);
}

/// Places an order of two teas as alice, paid with `tok_ok`, and waits until it is confirmed;
/// its id, and the log to follow it in.
async fn two_teas_confirmed(api: &Api, settings: &Settings) -> (String, Log) {
    let id = place(api, "alice", "TEA", 2, "tok_ok").await.id;
    let log = Log::new(settings);
    log.confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    (id, log)
}

/// A confirmed order has no deadline left: a customer's cancel whose step was parked used to
/// keep the money and the stock until an operator retried it (and for good if one skipped it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_cancel_whose_step_was_parked_refunds_and_releases_without_an_operator() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let (simulator, _saga) = simulated_saga(&settings);
    let (id, log) = two_teas_confirmed(&api, &settings).await;

    let client = cancel_with_releases_refused(&api, &db, &id, None).await;
    accept_again(&client, "refuse_release", "events").await;

    // No operator: after the pause of a failed charge's retry, the lane's tick releases.
    assert_eq!(log.released("TEA").await.reserved(), 0);
    assert_eq!(refunds(&db).await, 1);
    assert_eq!(simulator.charges(), 1);
}

/// The answers to a cancelled order's release and refund, whose steps were parked and then
/// skipped by an operator, are read from the product and the payment's stream a stock
/// deadline after the cancel, and the saga settles. Nothing read either again once the order
/// was cancelled: the saga waited for those answers for good, open in the census.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipped_answers_to_a_cancelled_orders_release_and_refund_are_read_again() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let (_simulator, _saga) = saga_with_short_stock_deadline(&settings);
    let (id, log) = two_teas_confirmed(&api, &settings).await;
    // The database refuses a state that records the tea given back or the money (a value out
    // of its range, SQLSTATE class 22): the steps of both answers are parked.
    let answered = format!(
        "new.order_id = '{id}' and (new.state->'lines'->'TEA'->>'stock' = 'released'
                                    or new.state->'payment'->>'refunded' = 'true')"
    );
    let client = db.connect().await.unwrap();
    refuse_with(
        &client,
        STATES,
        "insert or update on saga_states",
        &answered,
        "22008",
    )
    .await;
    cancel_as(&api, "alice", &id).await;
    eventually(
        &db,
        "select count(*) from saga_parked
         where event_type in ('StockReservationReleased', 'PaymentRefunded')",
        2,
        Duration::from_secs(10),
    )
    .await;
    accept_again(&client, STATES, "saga_states").await;
    let order = ParkedOf::Order(id.parse().unwrap());
    maintenance::skip_parked(&client, "fulfilment", order)
        .await
        .unwrap();

    eventually(
        &db,
        &format!("select count(*) from saga_states where order_id = '{id}' and settled"),
        1,
        // A check that met the refusal before it was dropped waits for its growing pause.
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(log.released("TEA").await.reserved(), 0);
    assert_eq!(refunds(&db).await, 1);
}

/// The money goes back first, and the customer hears of the cancel, while the stock cannot be
/// given back: the refund used to wait for the releases before it in the same step, and a
/// parked step's messages (its refund, the cancellation's notice) were dropped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_and_the_cancel_notice_do_not_wait_for_a_release_that_keeps_failing() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let (_simulator, _saga) = simulated_saga(&settings);
    let (id, log) = two_teas_confirmed(&api, &settings).await;

    cancel_with_releases_refused(&api, &db, &id, None).await;
    eventually(
        &db,
        "select count(*) from events where event_type = 'PaymentRefunded'",
        1,
        Duration::from_secs(20),
    )
    .await;
    eventually(
        &db,
        "select count(*) from outbox
         where payload->>'template' = 'order-cancelled' and delivered_at is not null",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(log.product("TEA").await.reserved(), 2, "still refused");
}

/// One product's stream refusing its release for good does not keep another product's stock
/// held: the step's other releases go, and the step is parked after them. The runner used to
/// stop at the first failing command, and MUG's release comes before TEA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_that_keeps_failing_does_not_hold_back_another_products_release() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "MUG", 1200, "EUR", 10).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let (_simulator, _saga) = simulated_saga(&settings);
    let id = place_mug_and_tea(&api).await;
    let log = Log::new(&settings);
    log.confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;

    cancel_with_releases_refused(&api, &db, &id, Some("product-MUG")).await;
    let tea = log.released("TEA").await;
    assert_eq!((tea.reserved(), tea.available()), (0, 10));
    assert_eq!(log.product("MUG").await.reserved(), 1, "still refused");
}

/// A shipment the product refuses (the order's MUG given back by another writer, in a way
/// the saga never saw) leaves stock the saga cannot account for: the step is parked, in sight
/// of an operator, after the order's other shipments went. The lane's tick tries the kept
/// shipment once more, takes the second refusal as final (no deadline left overdue, no error
/// every few minutes), and an operator's retry then finds nothing left to send. The refusal
/// used to be logged and the step taken as done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shipment_the_product_refuses_is_parked_after_the_orders_other_shipments() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "MUG", 1200, "EUR", 10).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let runner = runner_over(
        &settings,
        quick_config(fast_timing()),
        Tampered::hiding(&settings, "StockReservationReleased"),
        Arc::new(Simulator::default()),
    );
    let _saga = tokio::spawn(runner.run_until_stopped(std::future::pending()));
    let id = place_mug_and_tea(&api).await;
    let log = Log::new(&settings);
    log.confirmed(std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    let order_id = OrderId(id.parse().unwrap());
    let released_at = chrono::Utc::now();
    let release = ProductCommand::ReleaseReservation {
        order_id,
        released_at,
    };
    log.on_product("MUG", release).await;

    api.gql(Some(&warehouse()), SHIP, json!({ "id": id }))
        .await
        .data("shipOrder");
    let shipped = "select count(*) from saga_parked where event_type = 'OrderShipped'";
    eventually(&db, shipped, 1, Duration::from_secs(10)).await;
    let tea = log.product("TEA").await;
    assert_eq!((tea.on_hand(), tea.reserved()), (8, 0), "TEA shipped");
    let client = db.connect().await.unwrap();
    // The order's later events (TEA's shipment coming back) try MUG's again, and wait too.
    let parked = maintenance::parked(&client, "fulfilment").await.unwrap();
    assert_eq!(parked[0].event_type, "OrderShipped", "{parked:?}");
    assert!(
        parked.iter().all(|p| p.order_id == Some(order_id.0)
            && p.error.contains("MUG holds no reservation")),
        "{parked:?}"
    );

    // The kept shipment counts as acted on; what stays due (if anything) is the read of the
    // answers of an order that ended, a stock deadline on, never the shipment again.
    let given_up = format!(
        "select count(*) from saga_states
         where order_id = '{id}' and state->>'parked_due_at' is null
           and (due_at is null or due_at > now() + interval '1 minute')"
    );
    eventually(&db, &given_up, 1, Duration::from_secs(10)).await;
    // Every parked event of the order fed again: none has anything left to send.
    let of_order = format!("select count(*) from saga_parked where order_id = '{id}'");
    let waiting = count(&db, &of_order).await;
    let asked = orderly_cli_with(
        &[("ORDERLY_DATABASE_URL", db.url())],
        &["saga", "parked", "retry", "--order", &id],
    );
    assert!(
        asked.starts_with(&format!("{waiting} parked event(s) of order {id}")),
        "{asked}"
    );
    eventually(&db, &of_order, 0, Duration::from_secs(10)).await;
    let tea_shipments = "select count(*) from events
                         where event_type = 'ReservedStockShipped' and stream = 'product-TEA'";
    assert_eq!(count(&db, tea_shipments).await, 1, "TEA shipped once");
    assert_eq!(log.product("MUG").await.on_hand(), 10);
}

/// Makes the log refuse for good every release, or those of `only` (a product's stream), (see
/// [`refuse_for_good`], trigger `refuse_release`), cancels order `id` as its customer and waits
/// until the saga has parked the cancel's step. A connection to the shop's database.
async fn cancel_with_releases_refused(
    api: &Api,
    db: &TestDb,
    id: &str,
    only: Option<&str>,
) -> tokio_postgres::Client {
    let client = db.connect().await.unwrap();
    let mut when = "new.event_type = 'StockReservationReleased'".to_owned();
    if let Some(stream) = only {
        when += &format!(" and new.stream = '{stream}'");
    }
    refuse_for_good(&client, "refuse_release", "insert on events", &when).await;
    cancel_as(api, "alice", id).await;
    eventually(
        db,
        "select count(*) from saga_parked where event_type = 'OrderCancelled'",
        1,
        Duration::from_secs(10),
    )
    .await;
    client
}

async fn refunds(db: &TestDb) -> i64 {
    count(
        db,
        "select count(*) from events where event_type = 'PaymentRefunded'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_placed_while_the_saga_was_down_longer_than_the_payment_deadline_confirm() {
    let Shop { db, settings, api } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        // Slow answers (2 s) too: each still well inside its deadline once it is asked for.
        let token = if i % 2 == 0 { "tok_slow" } else { "tok_ok" };
        ids.push(place(&api, &format!("c{i}"), "TEA", 1, token).await.id);
    }
    let timing = Timing {
        payment_deadline_ms: 6_000,
        ..fast_timing()
    };
    // The saga comes back after longer than the payment deadline: the order's events are all
    // older than it. The deadline runs from the charge request, made now.
    let down = u64::try_from(timing.payment_deadline_ms).unwrap() + 1_000;
    tokio::time::sleep(Duration::from_millis(down)).await;
    let simulator = Arc::new(Simulator::default());
    let gateway = Arc::new(Resilient::new(simulator.clone(), fast_resilience()));
    let _saga = start_saga_with(&settings, gateway, timing);
    let log = Log::new(&settings);
    log.confirmed(&ids, Duration::from_secs(60)).await;
    assert_eq!(simulator.charges(), ids.len());
    let refunds = refunds(&db).await;
    assert_eq!(refunds, 0);
}
