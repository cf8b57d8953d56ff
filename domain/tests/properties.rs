//! Properties over random command sequences: the product invariant, deterministic replay (also
//! through the stored JSON form), and the fulfilment saga under a model of its runner with
//! redelivery, reordering and crashes.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use orderly_domain::fulfilment::{self, Command, FulfilmentState, SagaInput};
use orderly_domain::order::{
    self, CancelledBy, LineRequest, Order, OrderAggregate, OrderCommand, OrderStatus,
};
use orderly_domain::payment::{self, Payment, PaymentAggregate, PaymentCommand, PaymentStatus};
use orderly_domain::product::{self, Hold, Product, ProductAggregate, ProductCommand};
use orderly_domain::values::*;
use orderly_domain::{Aggregate, Rejection};
use orderly_event_schemas::{
    Event, EventMetadata, OrderEvent, PaymentEvent, ProductEvent, decode_recorded, encode,
};
use proptest::prelude::*;
use uuid::Uuid;

fn at(minute: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 11, 3, 9, 0, 0).unwrap() + TimeDelta::minutes(minute)
}

fn eur(amount_minor: i64) -> Money {
    Money::new(amount_minor, Currency::parse("EUR").unwrap()).unwrap()
}

fn sku(n: usize) -> Sku {
    Sku::parse(format!("SKU-{n}")).unwrap()
}

fn text<T: TryFrom<String>>(value: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(value.to_owned()).unwrap()
}

fn order_id(n: u8) -> OrderId {
    OrderId(Uuid::from_u128(u128::from(n) + 1))
}

/// Decides each command in turn against the running state, keeping what was decided.
/// Returns the final state and every event, in order.
fn run<A: Aggregate>(commands: &[A::Command]) -> (A::State, Vec<A::Event>) {
    let mut state = A::State::default();
    let mut log = Vec::new();
    for command in commands {
        if let Ok(events) = A::decide(&state, command) {
            state = events.iter().fold(state, A::evolve);
            log.extend(events);
        }
    }
    (state, log)
}

/// Events back from the store: encoded with metadata, then decoded.
fn through_storage<E: Clone + Into<Event>>(events: &[E]) -> Vec<Event> {
    events
        .iter()
        .map(|event| {
            let event: Event = event.clone().into();
            let metadata = EventMetadata {
                event_id: Uuid::nil(),
                correlation_id: Uuid::nil(),
                causation_id: Uuid::nil(),
                traceparent: None,
                actor: "system:test".into(),
                command_id: Uuid::nil(),
                idempotency_key: None,
                occurred_at: at(0),
            };
            let stored = encode(&event, &metadata).expect("encodes");
            decode_recorded(stored.event_type, stored.data, stored.metadata)
                .expect("decodes")
                .event
        })
        .collect()
}

fn product_command() -> impl Strategy<Value = ProductCommand> {
    let order = (0u8..4).prop_map(order_id);
    let quantity = (1u32..12).prop_map(|n| Quantity::new(n).unwrap());
    prop_oneof![
        (0u32..20).prop_map(|initial_stock| ProductCommand::Register {
            sku: sku(1),
            name: text("Tea"),
            description: None,
            price: eur(650),
            initial_stock,
            registered_at: at(0),
        }),
        quantity
            .clone()
            .prop_map(|quantity| ProductCommand::Restock {
                quantity,
                restocked_at: at(1)
            }),
        (0i64..2000).prop_map(|minor| ProductCommand::ChangePrice {
            price: eur(minor),
            price_changed_at: at(1)
        }),
        (order.clone(), quantity).prop_map(|(order_id, quantity)| ProductCommand::ReserveStock {
            order_id,
            quantity,
            reserved_at: at(2),
            placed_at: None,
        }),
        order
            .clone()
            .prop_map(|order_id| ProductCommand::ReleaseReservation {
                order_id,
                released_at: at(3)
            }),
        order.prop_map(|order_id| ProductCommand::ShipReservedStock {
            order_id,
            shipped_at: at(4)
        }),
    ]
}

fn order_command() -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        Just(()).prop_map(|()| place(&[(1, 2)], &products(&[5]), 0)),
        Just(OrderCommand::MarkStockReserved {
            stock_reserved_at: at(1)
        }),
        Just(OrderCommand::MarkPaid {
            amount: eur(1300),
            gateway_reference: text("ch_1"),
            paid_at: at(2)
        }),
        Just(OrderCommand::Confirm {
            confirmed_at: at(2)
        }),
        Just(OrderCommand::Cancel {
            cancellation_reason: text("changed my mind"),
            cancelled_by: CancelledBy::Customer,
            cancelled_at: at(3),
        }),
        Just(OrderCommand::Ship {
            carrier: text("DHL"),
            tracking_number: text("JD1"),
            shipped_at: at(4)
        }),
        Just(OrderCommand::Deliver {
            delivered_at: at(5)
        }),
    ]
}

fn payment_command() -> impl Strategy<Value = PaymentCommand> {
    prop_oneof![
        (1u32..4).prop_map(|attempt| PaymentCommand::RequestCharge {
            order_id: order_id(0),
            amount: eur(1300),
            payment_token: text("tok_ok"),
            attempt,
            requested_at: at(1),
        }),
        prop_oneof![Just("ch_1"), Just("ch_2")].prop_map(|r| PaymentCommand::RecordCharge {
            gateway_reference: text(r),
            charged_at: at(2)
        }),
        Just(PaymentCommand::RecordDecline {
            reason: text("declined"),
            declined_at: at(2)
        }),
        (1u32..4).prop_map(|attempt| PaymentCommand::RecordFailure {
            reason: text("timeout"),
            attempt,
            failed_at: at(2)
        }),
        Just(PaymentCommand::Refund {
            reason: text("cancelled"),
            refunded_at: at(3)
        }),
    ]
}

proptest! {
    #[test]
    fn any_sequence_of_product_commands_keeps_available_stock_non_negative(
        commands in prop::collection::vec(product_command(), 1..60)
    ) {
        let mut state: Option<Product> = None;
        for command in &commands {
            if let Ok(events) = product::decide(&state, command) {
                state = events.iter().fold(state, product::evolve);
            }
            if let Some(product) = &state {
                prop_assert!(product.reserved() <= product.on_hand());
                let held: u32 = (0u8..4)
                    .filter_map(|n| match product.hold(order_id(n)) {
                        Some(Hold::Reserved { quantity }) => Some(quantity.get()),
                        _ => None,
                    })
                    .sum();
                prop_assert_eq!(held, product.reserved());
                prop_assert_eq!(product.available(), product.on_hand() - product.reserved());
            }
        }
    }

    #[test]
    fn replaying_decided_product_events_rebuilds_the_same_state(
        commands in prop::collection::vec(product_command(), 1..60)
    ) {
        replays_deterministically::<ProductAggregate>(&commands)?;
    }

    /// Every state decisions lead to passes the check a snapshot of it must pass to be
    /// trusted (else every snapshot of it would be thrown away and the stream read whole).
    #[test]
    fn every_decided_product_state_is_consistent(
        commands in prop::collection::vec(product_command(), 1..60)
    ) {
        let (state, _) = run::<ProductAggregate>(&commands);
        prop_assert!(state.as_ref().is_none_or(Product::is_consistent));
    }

    /// A snapshot gives back the state it was taken of (else a restored product would decide
    /// otherwise than the fold of its stream).
    #[test]
    fn every_decided_product_state_survives_its_snapshot_form(
        commands in prop::collection::vec(product_command(), 1..60)
    ) {
        let (state, _) = run::<ProductAggregate>(&commands);
        if let Some(product) = state {
            let form = serde_json::to_string(&product).unwrap();
            prop_assert_eq!(serde_json::from_str::<Product>(&form).unwrap(), product);
        }
    }

    #[test]
    fn replaying_decided_order_events_rebuilds_the_same_state(
        commands in prop::collection::vec(order_command(), 1..30)
    ) {
        replays_deterministically::<OrderAggregate>(&commands)?;
    }

    #[test]
    fn replaying_decided_payment_events_rebuilds_the_same_state_and_charges_at_most_once(
        commands in prop::collection::vec(payment_command(), 1..30)
    ) {
        let log = replays_deterministically::<PaymentAggregate>(&commands)?;
        let charges = log.iter().filter(|e| matches!(e, PaymentEvent::PaymentCharged(_))).count();
        prop_assert!(charges <= 1);
    }
}

/// An aggregate's own events out of the store's [`Event`]; `None` for another context's.
trait FromStored: Sized {
    fn from_stored(event: Event) -> Option<Self>;
}

impl FromStored for OrderEvent {
    fn from_stored(event: Event) -> Option<Self> {
        match event {
            Event::Order(event) => Some(event),
            _ => None,
        }
    }
}

impl FromStored for ProductEvent {
    fn from_stored(event: Event) -> Option<Self> {
        match event {
            Event::Product(event) => Some(event),
            _ => None,
        }
    }
}

impl FromStored for PaymentEvent {
    fn from_stored(event: Event) -> Option<Self> {
        match event {
            Event::Payment(event) => Some(event),
            _ => None,
        }
    }
}

/// Folding the decided events as read back from the store (encoded, decoded) gives the decided
/// state, and the events survive the stored JSON form unchanged. Returns the events.
fn replays_deterministically<A: Aggregate>(
    commands: &[A::Command],
) -> Result<Vec<A::Event>, TestCaseError>
where
    A::Event: Into<Event> + FromStored,
{
    let (state, log) = run::<A>(commands);
    let stored: Vec<A::Event> = through_storage(&log)
        .into_iter()
        .map(|event| A::Event::from_stored(event).expect("an event of the same context"))
        .collect();
    prop_assert_eq!(&A::replay(&stored), &state);
    let original: Vec<Event> = log.iter().cloned().map(Into::into).collect();
    prop_assert_eq!(through_storage(&log), original);
    Ok(log)
}

// ---- The saga under a model of its runner -------------------------------------------------

fn products(stocks: &[u32]) -> BTreeMap<Sku, Option<Product>> {
    stocks
        .iter()
        .enumerate()
        .map(|(n, &initial_stock)| {
            let register = ProductCommand::Register {
                sku: sku(n + 1),
                name: text("Product"),
                description: None,
                price: eur(650),
                initial_stock,
                registered_at: at(0),
            };
            let (state, _) = run::<ProductAggregate>(&[register]);
            (sku(n + 1), state)
        })
        .collect()
}

/// Places an order for `(product number, quantity)` lines, priced from `catalog`.
fn place(
    lines: &[(usize, u32)],
    catalog: &BTreeMap<Sku, Option<Product>>,
    minute: i64,
) -> OrderCommand {
    let requested: Vec<LineRequest> = lines
        .iter()
        .map(|&(n, quantity)| LineRequest {
            sku: sku(n),
            quantity: Quantity::new(quantity).unwrap(),
        })
        .collect();
    let known: Vec<Product> = catalog.values().flatten().cloned().collect();
    OrderCommand::Place {
        order_id: order_id(0),
        customer_id: text("auth0|ada"),
        lines: order::price_lines(&requested, &known).expect("priced"),
        shipping_address: Address {
            name: text("Ada"),
            line1: text("1 Row"),
            line2: None,
            city: text("London"),
            postal_code: text("N1"),
            country: CountryCode::parse("GB").unwrap(),
        },
        payment_token: text("tok"),
        placed_at: at(minute),
    }
}

#[derive(Debug, Clone, Copy)]
enum Gateway {
    Charge,
    Decline,
    Fail,
}

#[derive(Debug, Clone)]
enum Action {
    /// Feed a queued event to the saga. `again`: it stays queued (redelivery). `crash`: the
    /// commands go out but the new state is lost, so the event comes again.
    Deliver {
        pick: usize,
        again: bool,
        crash: bool,
    },
    /// The gateway worker answers a queued charge request.
    Answer {
        pick: usize,
        again: bool,
    },
    /// A queued product or payment event never reaches the saga: its step was parked, and an
    /// operator skipped it. Not a charge: its skip is refused while the saga has not seen one
    /// (and changes nothing once it has). A parked order fact is kept by the saga; not
    /// modelled here.
    Lose {
        pick: usize,
    },
    Tick {
        minutes: i64,
    },
    CustomerCancels,
    WarehouseShips,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        12 => (any::<usize>(), prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(pick, again, crash)| Action::Deliver { pick, again, crash }),
        4 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, again)| Action::Answer { pick, again }),
        1 => any::<usize>().prop_map(|pick| Action::Lose { pick }),
        4 => (0i64..8).prop_map(|minutes| Action::Tick { minutes }),
        // Rare, so that most runs get far enough for the payment paths before a customer cancels.
        1 => Just(Action::CustomerCancels),
        2 => Just(Action::WarehouseShips),
    ]
}

fn gateway() -> impl Strategy<Value = Gateway> {
    prop_oneof![
        Just(Gateway::Charge),
        Just(Gateway::Decline),
        Just(Gateway::Fail)
    ]
}

struct World {
    products: BTreeMap<Sku, Option<Product>>,
    order: Option<Order>,
    payment: Option<Payment>,
    log: Vec<Event>,
    saga: FulfilmentState,
    /// Events not yet fed to the saga, delivered in any order.
    inbox: Vec<Event>,
    /// Charge attempts not yet answered by the gateway.
    charge_requests: Vec<u32>,
    /// Gateway answer per attempt (1-based); past the end, `then`.
    answers: Vec<Gateway>,
    then: Gateway,
    now: i64,
    rejections: Vec<Rejection>,
    /// Every charge attempt the saga asked for, in the order sent (resends included), each with
    /// the attempts whose transient failure (`PaymentFailed`) the log held when it was sent.
    charge_attempts_sent: Vec<(u32, BTreeSet<u32>)>,
    /// Events the saga never saw ([`Action::Lose`]).
    lost: usize,
}

impl World {
    fn record(&mut self, events: Vec<Event>) {
        for event in events {
            if let Event::Payment(PaymentEvent::PaymentChargeRequested(requested)) = &event {
                self.charge_requests.push(requested.attempt);
            }
            self.inbox.push(event.clone());
            self.log.push(event);
        }
    }

    fn execute(&mut self, command: &Command) {
        let decided: Result<Vec<Event>, Rejection> = match command {
            Command::Order { command, .. } => order::decide(&self.order, command).map(|events| {
                self.order = events.iter().fold(self.order.take(), order::evolve);
                events.into_iter().map(Event::from).collect()
            }),
            Command::Product { sku, command } => {
                let state = self.products.entry(sku.clone()).or_default();
                product::decide(state, command).map(|events| {
                    *state = events.iter().fold(state.take(), product::evolve);
                    events.into_iter().map(Event::from).collect()
                })
            }
            Command::Payment { command, .. } => {
                payment::decide(&self.payment, command).map(|events| {
                    self.payment = events.iter().fold(self.payment.take(), payment::evolve);
                    events.into_iter().map(Event::from).collect()
                })
            }
            Command::Notify(_) => Ok(Vec::new()),
        };
        match decided {
            Ok(events) => self.record(events),
            Err(rejection) => self.rejections.push(rejection),
        }
    }

    fn feed(&mut self, input: SagaInput<'_>, crash: bool) {
        let commands = fulfilment::react(&self.saga, &input);
        if !crash {
            self.saga = fulfilment::evolve(self.saga.clone(), &input);
        }
        for command in &commands {
            if let Command::Payment {
                order_id: for_order,
                command: PaymentCommand::RequestCharge { attempt, .. },
            } = command
            {
                assert_eq!(*for_order, order_id(0), "a charge for another order");
                let failed = self
                    .log
                    .iter()
                    .filter_map(|event| match event {
                        Event::Payment(PaymentEvent::PaymentFailed(failed)) => Some(failed.attempt),
                        _ => None,
                    })
                    .collect();
                self.charge_attempts_sent.push((*attempt, failed));
            }
            self.execute(command);
        }
    }

    fn apply(&mut self, action: &Action) {
        match *action {
            Action::Deliver { pick, again, crash } => {
                if self.inbox.is_empty() {
                    return;
                }
                let index = pick % self.inbox.len();
                let event = if again || crash {
                    self.inbox[index].clone()
                } else {
                    self.inbox.remove(index)
                };
                self.feed(SagaInput::Event(&event), crash);
            }
            Action::Answer { pick, again } => {
                if self.charge_requests.is_empty() {
                    return;
                }
                let index = pick % self.charge_requests.len();
                let attempt = if again {
                    self.charge_requests[index]
                } else {
                    self.charge_requests.remove(index)
                };
                self.answer(attempt);
            }
            Action::Lose { pick } => {
                if self.inbox.is_empty() {
                    return;
                }
                let index = pick % self.inbox.len();
                let charge = matches!(
                    self.inbox[index],
                    Event::Payment(PaymentEvent::PaymentCharged(_))
                );
                if matches!(self.inbox[index], Event::Product(_) | Event::Payment(_)) && !charge {
                    self.inbox.remove(index);
                    self.lost += 1;
                }
            }
            Action::Tick { minutes } => {
                self.now += minutes;
                self.tick();
            }
            Action::CustomerCancels => {
                let cancel = OrderCommand::Cancel {
                    cancellation_reason: text("changed my mind"),
                    cancelled_by: CancelledBy::Customer,
                    cancelled_at: at(self.now),
                };
                self.execute(&Command::Order {
                    order_id: order_id(0),
                    command: cancel,
                });
            }
            Action::WarehouseShips => {
                if self
                    .order
                    .as_ref()
                    .is_some_and(|o| o.status == OrderStatus::Confirmed)
                {
                    let ship = OrderCommand::Ship {
                        carrier: text("DHL"),
                        tracking_number: text("JD1"),
                        shipped_at: at(self.now),
                    };
                    self.execute(&Command::Order {
                        order_id: order_id(0),
                        command: ship,
                    });
                }
            }
        }
    }

    /// The passing of time as the runner's lane feeds it: to a saga whose deadline is due, the
    /// payment's stream first, then what the products hold for the lines the saga asks about
    /// (`stock_to_check`), then the tick; to any other, the tick alone (which changes nothing
    /// but its clock).
    fn tick(&mut self) {
        let now = at(self.now);
        if self.saga.next_due_at().is_some_and(|due| due <= now) {
            let payments: Vec<Event> = self
                .log
                .iter()
                .filter(|event| matches!(event, Event::Payment(_)))
                .cloned()
                .collect();
            for event in &payments {
                self.feed(SagaInput::Event(event), false);
            }
            let asked = self.saga.stock_to_check(now);
            if !asked.is_empty() {
                let holds: Vec<(Sku, Hold)> = asked
                    .into_iter()
                    .filter_map(|sku| {
                        let product = self.products.get(&sku)?.as_ref()?;
                        Some((sku, product.hold(order_id(0))?))
                    })
                    .collect();
                self.feed(SagaInput::StockChecked { now, holds: &holds }, false);
            }
        }
        self.feed(SagaInput::Tick { now }, false);
    }

    /// The gateway is idempotent per order (same reference every time), like the real one.
    fn answer(&mut self, attempt: u32) {
        let index = usize::try_from(attempt)
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        let outcome = self.answers.get(index).copied().unwrap_or(self.then);
        let command = match outcome {
            Gateway::Charge => PaymentCommand::RecordCharge {
                gateway_reference: text("ch_1"),
                charged_at: at(self.now),
            },
            Gateway::Decline => PaymentCommand::RecordDecline {
                reason: text("declined"),
                declined_at: at(self.now),
            },
            Gateway::Fail => PaymentCommand::RecordFailure {
                reason: text("timeout"),
                attempt,
                failed_at: at(self.now),
            },
        };
        self.execute(&Command::Payment {
            order_id: order_id(0),
            command,
        });
    }

    /// Delivers everything in order and lets time pass until nothing more happens and no
    /// deadline of the saga is left.
    fn settle(&mut self) {
        for _ in 0..500 {
            if !self.inbox.is_empty() {
                let event = self.inbox.remove(0);
                self.feed(SagaInput::Event(&event), false);
            } else if !self.charge_requests.is_empty() {
                let attempt = self.charge_requests.remove(0);
                self.answer(attempt);
            } else {
                let before = self.log.len();
                self.apply(&Action::Tick { minutes: 20 });
                let quiet = self.log.len() == before && self.inbox.is_empty();
                if quiet && self.saga.next_due_at().is_none() {
                    return;
                }
            }
        }
        panic!(
            "the saga did not settle: {:?}",
            self.order.as_ref().map(|o| o.status)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_saga_never_charges_twice_and_never_leaks_a_reservation(
        // Mostly enough stock: the out-of-stock path needs no help to come up.
        stocks in prop::collection::vec(0u32..12, 3),
        lines in prop::collection::btree_map(1usize..=3, 1u32..4, 1..=3),
        answers in prop::collection::vec(gateway(), 0..4),
        then in gateway(),
        actions in prop::collection::vec(action(), 0..60),
    ) {
        // The gateway's answer to each attempt: `answers`, then `then`. An attempt after the
        // first that is not a transient failure is never needed; with none, the deadline ends it.
        let attempts_allowed = answers
            .iter()
            .position(|answer| !matches!(answer, Gateway::Fail))
            .or_else(|| (!matches!(then, Gateway::Fail)).then_some(answers.len()))
            .map_or(u32::MAX, |first_final| u32::try_from(first_final).unwrap() + 1);
        let catalog = products(&stocks);
        let lines: Vec<(usize, u32)> = lines.into_iter().collect();
        let mut world = World {
            products: catalog.clone(),
            order: None,
            payment: None,
            log: Vec::new(),
            saga: FulfilmentState::default(),
            inbox: Vec::new(),
            charge_requests: Vec::new(),
            answers,
            then,
            now: 0,
            rejections: Vec::new(),
            charge_attempts_sent: Vec::new(),
            lost: 0,
        };
        world.execute(&Command::Order { order_id: order_id(0), command: place(&lines, &catalog, 0) });
        for action in &actions {
            world.apply(action);
        }
        world.settle();

        let charges = world
            .log
            .iter()
            .filter(|e| matches!(e, Event::Payment(PaymentEvent::PaymentCharged(_))))
            .count();
        prop_assert!(charges <= 1, "charged {charges} times");
        // No payment command was refused (a charge request, a gateway answer, a refund): the
        // payment's caps never had to step in for the saga.
        let refused: Vec<&Rejection> = world
            .rejections
            .iter()
            .filter(|rejection| {
                matches!(
                    rejection,
                    Rejection::ChargeNotAllowed { .. }
                        | Rejection::UnexpectedCharge { .. }
                        | Rejection::AttemptOutOfOrder { .. }
                        | Rejection::PaymentNotRequested
                        | Rejection::NotPending { .. }
                        | Rejection::NotCharged { .. }
                )
            })
            .collect();
        prop_assert!(refused.is_empty(), "payment commands refused: {refused:?}");
        // Each new attempt follows the last by one, and only once the log holds that one's
        // transient failure: never two attempts in flight. Resending a known one is harmless.
        let mut highest = 0;
        for (attempt, failed) in &world.charge_attempts_sent {
            if *attempt > highest {
                prop_assert_eq!(*attempt, highest + 1, "an attempt skipped");
                prop_assert!(
                    highest == 0 || failed.contains(&highest),
                    "attempt {} requested while attempt {} was in flight", attempt, highest
                );
                highest = *attempt;
            }
        }
        prop_assert!(
            highest <= attempts_allowed,
            "{highest} attempts where the gateway's answers allow {attempts_allowed}"
        );
        let requested = world
            .log
            .iter()
            .filter(|e| matches!(e, Event::Payment(PaymentEvent::PaymentChargeRequested(_))))
            .count();
        prop_assert_eq!(requested, usize::try_from(highest).unwrap(), "attempts recorded");
        for product in world.products.values().flatten() {
            prop_assert!(product.reserved() <= product.on_hand());
        }

        let order = world.order.clone().expect("placed");
        let payment_status = world.payment.as_ref().map(|p| p.status);
        let holds: Vec<Option<Hold>> = lines
            .iter()
            .map(|&(n, _)| world.products[&sku(n)].as_ref().and_then(|p| p.hold(order.order_id)))
            .collect();
        match order.status {
            OrderStatus::Cancelled => {
                prop_assert!(
                    holds.iter().all(|h| !matches!(h, Some(Hold::Reserved { .. }))),
                    "leaked a reservation: {holds:?}"
                );
                prop_assert!(charges == 0 || payment_status == Some(PaymentStatus::Refunded));
                prop_assert!(world.saga.is_settled());
            }
            OrderStatus::Confirmed => {
                let all_held = holds.iter().all(|h| matches!(h, Some(Hold::Reserved { .. })));
                prop_assert!(all_held, "{holds:?}");
                prop_assert_eq!(payment_status, Some(PaymentStatus::Charged));
            }
            OrderStatus::Shipped | OrderStatus::Delivered => {
                prop_assert!(holds.iter().all(|h| matches!(h, Some(Hold::Shipped))), "{holds:?}");
                prop_assert_eq!(payment_status, Some(PaymentStatus::Charged));
                prop_assert!(world.saga.is_settled());
            }
            stuck => prop_assert!(false, "order stuck in {stuck:?}; rejections {:?}", world.rejections),
        }
        // Nothing fed again changes anything: the settled saga is a fixed point. So is a
        // confirmed one, unless it lost an event: an answer it never saw still calls for its
        // echo (refused by the order, which moved on) and is read once the order ships.
        if world.saga.is_settled() || world.lost == 0 {
            let again: Vec<Event> = world.log.clone();
            for event in &again {
                prop_assert!(fulfilment::react(&world.saga, &SagaInput::Event(event)).is_empty());
            }
        }
    }
}
