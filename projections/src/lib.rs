//! # Layout
//!
//! The read side: projection runners that turn the event log into PostgreSQL read models, their
//! checkpoints and dead letters, rebuilds with a shadow swap, and live-update notifications.
//!
//! - `model`: [`ProjectionName`] (`orders`, `products`: each a unit of consistency with its
//!   own tables and checkpoint), [`DeadLetterPolicy`], [`Parked`].
//! - `handlers`: load the rows a batch touches, fold the events over them in memory, write back
//!   set-based. Version guards make re-application change nothing.
//! - `batch`: one batch and its checkpoint in one transaction, with a compare on the checkpoint
//!   so that no two writers ever apply the same event; [`Connection`], the projections' own
//!   connections with their prepared statements.
//! - `runner`: [`Runner`]: catch up, then live; one active per projection by advisory lock.
//!   Each batch is a span in the trace of its first event (`orderly_observability`).
//! - `watch`: [`ProjectionHub`]: wait for a position, follow touched order ids; in-process and
//!   across processes (`NOTIFY orderly_projections`).
//! - `metrics`: state, lag, batch and dead-letter series (`deploy/METRICS.md`), through the
//!   `metrics` facade; `orderly_observability` installs the recorder and their buckets.
//! - `dlq`: list, retry and skip dead letters. `status`: [`ProjectionStatus`].
//! - `rebuild`: replay into `orderly_shadow`, verify, swap atomically.
//! - `tail`: follow the log in a terminal.
//! - `vocabulary`: the words the read models store ([`vocabulary::OrderStatus`],
//!   [`vocabulary::PaymentStatus`]), typed, shared with the read API.
//! - `tables`: the read-model tables' names and columns ([`tables::Table`]), which the
//!   handlers insert with and the read API selects with.
//! - `migrations`: the read-model SQL under `migrations/` (see its README for each table).
//! - `error`: [`ProjectionError`], this crate's one error type.

mod batch;
pub mod dlq;
mod error;
mod handlers;
mod metrics;
mod migrations;
mod model;
pub mod rebuild;
mod runner;
mod status;
pub mod tables;
pub mod tail;
pub mod vocabulary;
mod watch;

pub use batch::{Connection, connect};
pub use error::{BoxError, ProjectionError};
pub use migrations::{
    MIGRATION_TABLE, fingerprint_with_event_store, migrate, migrate_with_event_store,
    migration_fingerprint,
};
pub use model::{DeadLetterPolicy, Parked, ProjectionName};
pub use rebuild::{RebuildOptions, RebuildProgress, RebuildReport, rebuild, rebuild_many};
pub use runner::{Runner, RunnerOptions, checkpoint};
pub use status::{ProjectionState, ProjectionStatus, status};
pub use watch::{NOTIFY_CHANNEL, OrderTouched, ProjectionHub, ProjectionUpdate};
