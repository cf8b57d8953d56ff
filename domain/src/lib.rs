//! # Layout
//!
//! Pure business logic: the Order, Product (inventory) and Payment aggregates as `decide`/`evolve`
//! functions over plain data, validated newtypes, and the order-fulfilment saga as a pure state
//! machine. No IO, no async runtime, no SQL, no clock: callers fetch what a decision needs (the
//! aggregate's events, the products being ordered, the current time) and pass it in.
//!
//! - [`values`]: the validated newtypes (`Sku::parse`, `Quantity::new`, `Money`, `Address`, ...),
//!   defined beside the event payloads so stored events obey the same rules.
//! - [`product`], [`order`], [`payment`]: one aggregate each, `decide(&state, &command)` and
//!   `evolve(state, &event)`, also reachable generically through [`Aggregate`]. Their events are
//!   the persisted payloads of `orderly_event_schemas`, so there is no mapping layer to drift.
//! - [`fulfilment`]: the saga that drives an order from placement to confirmation or
//!   cancellation, `react(&state, &input)` and `evolve(state, &input)`; its docs say how a runner
//!   drives it.
//! - [`streams`]: stream names `order-<uuid>`, `product-<sku>`, `payment-<order uuid>`.
//! - `rejection`: [`Rejection`], this crate's one error type.
//!
//! Handling a command: load the stream, fold it with `evolve` from `State::default()`, call
//! `decide`, append the events with the loaded version as the expected version, and retry the
//! whole sequence on a version conflict. An `Ok(vec![])` means "already done": commands that the
//! saga may redeliver are idempotent and decide nothing the second time.

// Declares the unit type that implements `Aggregate` with a module's `decide` and `evolve`.
// Defined before the modules so they can use it (macro_rules! scoping is textual).
macro_rules! decider {
    ($(#[$doc:meta])* $name:ident, $state:ty, $command:ty, $event:ty) => {
        $(#[$doc])*
        pub struct $name;

        impl crate::Aggregate for $name {
            type State = $state;
            type Command = $command;
            type Event = $event;

            fn decide(state: &$state, command: &$command) -> Result<Vec<$event>, crate::Rejection> {
                decide(state, command)
            }

            fn evolve(state: $state, event: &$event) -> $state {
                evolve(state, event)
            }
        }
    };
}

pub mod fulfilment;
pub mod order;
pub mod payment;
pub mod product;
mod rejection;
pub mod streams;
#[cfg(test)]
mod testing;

pub use orderly_event_schemas::values;
pub use rejection::Rejection;

/// A decider: the two pure functions of one aggregate.
///
/// `evolve` never fails. It trusts events because `decide` produced them; on a stream it cannot
/// make sense of, it keeps the state as it was rather than invent one.
pub trait Aggregate {
    type State: Default + Clone + std::fmt::Debug + PartialEq;
    type Command: Clone + std::fmt::Debug;
    type Event: Clone + std::fmt::Debug + PartialEq;

    fn decide(state: &Self::State, command: &Self::Command) -> Result<Vec<Self::Event>, Rejection>;

    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// The state after `events`, from the empty state.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State
    where
        Self::Event: 'a,
    {
        events
            .into_iter()
            .fold(Self::State::default(), Self::evolve)
    }
}
