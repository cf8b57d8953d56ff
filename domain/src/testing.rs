//! Given / when / then for aggregates and the saga, so each rule reads as one sentence.

use std::fmt::Debug;

use crate::{Aggregate, Rejection};

pub struct Given<A: Aggregate> {
    state: A::State,
}

pub struct When<A: Aggregate> {
    state: A::State,
    outcome: Result<Vec<A::Event>, Rejection>,
}

pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let history: Vec<A::Event> = history.into_iter().collect();
    Given {
        state: A::replay(&history),
    }
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> When<A> {
        let outcome = A::decide(&self.state, &command);
        When {
            state: self.state,
            outcome,
        }
    }
}

impl<A: Aggregate> When<A> {
    /// Asserts the events decided, and returns the state after them for further checks.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A::State {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        assert_eq!(self.outcome, Ok(expected));
        let events = self.outcome.unwrap_or_default();
        events.iter().fold(self.state, A::evolve)
    }

    #[track_caller]
    pub fn then_nothing(self) {
        assert_eq!(self.outcome, Ok(Vec::new()), "expected no events");
    }

    #[track_caller]
    pub fn then_rejected(self, rejection: Rejection)
    where
        A::Event: Debug,
    {
        assert_eq!(self.outcome, Err(rejection));
    }
}

/// Asserts that each of `commands`, decided on an empty history, is refused with `rejection`,
/// and that they cover every command of the aggregate but the one that creates it. `variant`
/// numbers a command's variant, 0 for the creating one and 1 to `others` for the rest, with an
/// exhaustive match, so a command added to the aggregate must be added to the test.
#[track_caller]
pub fn each_refused_before_creation<A: Aggregate>(
    commands: impl IntoIterator<Item = A::Command>,
    variant: fn(&A::Command) -> usize,
    others: usize,
    rejection: Rejection,
) where
    A::Event: Debug,
{
    let commands: Vec<A::Command> = commands.into_iter().collect();
    let covered: std::collections::BTreeSet<usize> = commands.iter().map(variant).collect();
    assert_eq!(covered, (1..=others).collect(), "commands not covered");
    for command in commands {
        given::<A>([])
            .when(command)
            .then_rejected(rejection.clone());
    }
}

/// Small constructors for readable tests; they panic on bad literals, which is a test bug.
pub mod fixtures {
    use chrono::{DateTime, TimeZone, Utc};
    use uuid::Uuid;

    use crate::values::*;

    /// Minutes after a fixed instant, so tests read in relative time.
    pub fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 11, 3, 9, 0, 0).unwrap() + chrono::TimeDelta::minutes(minute)
    }

    pub fn eur(amount_minor: i64) -> Money {
        Money::new(amount_minor, Currency::parse("EUR").unwrap()).unwrap()
    }

    pub fn usd(amount_minor: i64) -> Money {
        Money::new(amount_minor, Currency::parse("USD").unwrap()).unwrap()
    }

    pub fn sku(value: &str) -> Sku {
        Sku::parse(value).unwrap()
    }

    pub fn qty(value: u32) -> Quantity {
        Quantity::new(value).unwrap()
    }

    pub fn order_id(n: u128) -> OrderId {
        OrderId(Uuid::from_u128(n))
    }

    pub fn reason(text: &str) -> Reason {
        Reason::parse(text).unwrap()
    }

    pub fn name(text: &str) -> ProductName {
        ProductName::parse(text).unwrap()
    }

    pub fn customer() -> CustomerId {
        CustomerId::parse("auth0|ada").unwrap()
    }

    pub fn token(text: &str) -> PaymentToken {
        PaymentToken::parse(text).unwrap()
    }

    pub fn reference(text: &str) -> GatewayReference {
        GatewayReference::parse(text).unwrap()
    }

    pub fn address() -> Address {
        let line = |text: &str| AddressLine::parse(text).unwrap();
        Address {
            name: line("Ada Lovelace"),
            line1: line("12 Analytical Row"),
            line2: None,
            city: line("London"),
            postal_code: PostalCode::parse("N1 9GU").unwrap(),
            country: CountryCode::parse("GB").unwrap(),
        }
    }
}

/// Given / when / then for the fulfilment saga.
pub mod saga {
    use chrono::{DateTime, Utc};
    use orderly_event_schemas::Event;

    use crate::fulfilment::{self, Command, FulfilmentState, SagaInput};
    use crate::product::Hold;
    use crate::values::Sku;

    /// An owned saga input, so tests can list histories.
    pub enum Step {
        Event(Box<Event>),
        Tick(DateTime<Utc>),
        StockChecked(DateTime<Utc>, Vec<(Sku, Hold)>),
        /// The event's step failed for good at the time given; its event was parked.
        Parked(Box<Event>, DateTime<Utc>),
        /// An operator's retry of a parked event, at the time given.
        Retried(Box<Event>, DateTime<Utc>),
    }

    impl Step {
        pub(crate) fn input(&self) -> SagaInput<'_> {
            match self {
                Step::Event(event) | Step::Parked(event, _) | Step::Retried(event, _) => {
                    SagaInput::Event(event)
                }
                Step::Tick(now) => SagaInput::Tick { now: *now },
                Step::StockChecked(now, holds) => SagaInput::StockChecked { now: *now, holds },
            }
        }

        /// What a runner does with this step: the state after it and the commands sent.
        pub(crate) fn apply(&self, state: FulfilmentState) -> (FulfilmentState, Vec<Command>) {
            match self {
                Step::Parked(_, at) => (fulfilment::parked(state, &self.input(), *at), Vec::new()),
                Step::Retried(_, at) => fulfilment::step_retried(state, &self.input(), *at),
                _ => fulfilment::step(state, &self.input()),
            }
        }

        /// The same event, parked at `at` instead of handled.
        pub fn parked_at(self, at: DateTime<Utc>) -> Step {
            Step::Parked(self.into_event(), at)
        }

        /// The same event, retried by an operator at `at`.
        pub fn retried_at(self, at: DateTime<Utc>) -> Step {
            Step::Retried(self.into_event(), at)
        }

        fn into_event(self) -> Box<Event> {
            match self {
                Step::Event(event) | Step::Parked(event, _) | Step::Retried(event, _) => event,
                Step::Tick(_) | Step::StockChecked(..) => panic!("only an event can be parked"),
            }
        }
    }

    impl<E: Into<Event>> From<E> for Step {
        fn from(event: E) -> Step {
            Step::Event(Box::new(event.into()))
        }
    }

    pub struct Given {
        state: FulfilmentState,
    }

    pub struct When {
        state: FulfilmentState,
        commands: Vec<Command>,
    }

    pub fn given(history: impl IntoIterator<Item = Step>) -> Given {
        let state = history
            .into_iter()
            .fold(FulfilmentState::default(), |state, step| {
                step.apply(state).0
            });
        Given { state }
    }

    impl Given {
        pub fn when(self, step: impl Into<Step>) -> When {
            let (state, commands) = step.into().apply(self.state);
            When { state, commands }
        }
    }

    impl When {
        #[track_caller]
        pub fn then(self, expected: impl IntoIterator<Item = Command>) -> FulfilmentState {
            assert_eq!(self.commands, expected.into_iter().collect::<Vec<_>>());
            self.state
        }

        #[track_caller]
        pub fn then_nothing(self) -> FulfilmentState {
            self.then([])
        }
    }
}
