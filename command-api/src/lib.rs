//! # Layout
//!
//! The command side: command handling, idempotency, authorization, the GraphQL mutations,
//! and the fulfilment saga runner with the payment-gateway port.
//!
//! - `handling`: [`Handler`] loads a stream, folds it, decides, appends with the loaded version
//!   and retries on conflicts, keeping folded states so a load reads only new events;
//!   [`Envelope`] fills every event's metadata and derives event ids from the command id, so a
//!   re-sent command is written once.
//! - `commands`: [`CommandService`], the API's commands: who may send each (roles from the
//!   token), what they load (placeOrder prices lines from the products' streams, as read at
//!   most `ORDERLY_PRICE_MAX_AGE_MS` ago), what they answer. placeOrder's idempotency keys
//!   live in the log: the key names the order (through an HMAC under the server's secret,
//!   [`OrderIds`]), the key and the request name its event ids.
//! - `order_id_scheme`: [`OrderIdScheme`], whether the log may hold orders named the public
//!   way, which keyed placements then look for first.
//! - `snapshots`: [`Snapshots`], the states of long streams (products) kept in PostgreSQL, so
//!   that a handler starting cold reads the latest snapshot that matches the log and the
//!   events after it; [`Handler::with_snapshots`] takes and reads them.
//! - `metering`: commands counted and timed by name (`order.place`, ...), in a span each.
//! - `graphql`: the contract's Mutation type ([`MutationRoot`]), input validation naming the
//!   field, and [`schema`] for the command API alone.
//! - `operator`: [`SagaQuery`] and [`SagaMutation`], the operator's view of the saga (lanes,
//!   members, parked events, outbox dead letters; retry and skip), for admins only, over
//!   `saga::maintenance`; served where [`SagaOperations`] is in the schema's data.
//! - `saga`: the runner that follows the log and drives the domain's fulfilment saga, the
//!   payment gateway port with its resilience wrapper, the outbox worker, the notification
//!   port (log or SMTP), and `saga::maintenance` (outbox dead letters, the retention purge).
//! - `migrations`: this crate's tables (saga lanes and states, outbox, the order-id scheme,
//!   snapshots).
//! - `error`: [`CommandError`], this crate's one error type.

mod commands;
mod error;
mod graphql;
mod handling;
pub mod metering;
mod migrations;
mod operator;
mod order_id_scheme;
pub mod saga;
mod snapshots;

pub use commands::{
    CommandResult, CommandService, DEFAULT_PRICE_MAX_AGE, OrderIds, PlaceOrder, RegisterProduct,
};
pub use error::CommandError;
pub use graphql::{CommandMutation, CommandSchema, MutationRoot, PlaceholderQuery, schema};
pub use handling::{
    ContextEvent, Envelope, Handler, Loaded, MAX_ATTEMPTS, Outcome, Stored, decode as decode_event,
};
pub use migrations::{MIGRATION_TABLE, migrate, migration_fingerprint};
pub use operator::{SagaMutation, SagaOperations, SagaQuery};
pub use order_id_scheme::OrderIdScheme;
pub use snapshots::Snapshots;
