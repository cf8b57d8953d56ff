//! # Layout
//!
//! `orderly-bench`: programs that measure Orderly and, in the same run, raw PostgreSQL doing the
//! same work, so that every figure in BENCHMARKS.md comes with its yardstick.
//!
//! - `append`: event-store appends (single events to fresh streams with an expected-version
//!   check, and 10-event batches) at several writer counts, next to plain INSERTs of the same
//!   rows into the same table, with the same indexes and durability.
//! - `lag`: commit -> read model lag of the live projection runners at the maximum append
//!   rate (apply rate, backlog, whether the lag grows) and at half of it.
//! - `rebuild`: `rebuild --all` of every read model from a log of N valid domain events, next to
//!   COPY of the event table out and a set-based INSERT ... SELECT of the same rows.
//! - `place_order`: placeOrder through GraphQL over HTTP (the command API served in-process)
//!   at several client counts, next to the single-event append rate of the same run.
//! - `read`: `order(id)` and a 20-order page through GraphQL over HTTP at 64 connections, next
//!   to a bare axum + tokio-postgres handler sending the same SQL; and the visibility lag from
//!   an acknowledged placeOrder to the STRICT query that sees it.
//! - `fulfil`: the fulfilment saga end to end against `orderly serve` running as a process of
//!   its own: placements and settlements per second, place -> settled latency, conflicts and
//!   round trips per order, peak RSS, next to the single-event append rate of the same run.
//! - `history`: one product's decisions (the placement's load, the saga's reservation) and
//!   cold loads as the orders in its history grow, next to a bare select of the same rows.
//! - `subscribers`: database transactions per second of a read API process with 1 and with
//!   1,000 idle `events` subscriptions over WebSockets, next to 1,000 subscriptions made
//!   straight on the store (one reader each).
//!
//! Each run works in a database of its own, created from a template and dropped after.

// GraphQL answers are built from many small allocations; mimalloc serves them markedly
// faster than the system allocator under concurrent load (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod append;
mod cpu;
mod fulfil;
mod history;
mod lag;
mod place_order;
mod read;
mod rebuild;
mod report;
mod subscribers;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "orderly-bench",
    about = "Measure Orderly next to raw PostgreSQL doing the same work"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Event-store appends versus raw INSERTs (server: ORDERLY_TEST_DATABASE_URL, see README).
    Append(append::Args),
    /// Rebuild of every read model versus COPY out and INSERT ... SELECT of the same events.
    Rebuild(rebuild::Args),
    /// Live lag from an append's commit to the orders read model, at the maximum append rate
    /// (do the runners keep up?) and at half of it.
    Lag(lag::Args),
    /// placeOrder through GraphQL over HTTP at several client counts, next to the
    /// single-event append rate in the same run.
    PlaceOrder(place_order::Args),
    /// order(id) and a 20-order page through GraphQL next to a bare handler running the same
    /// SQL, then the lag from placeOrder's acknowledgement to a query that sees the order.
    Read(read::Args),
    /// The fulfilment saga end to end against an `orderly serve` subprocess: burst, hot SKU
    /// and paced placements, settled through the read model.
    Fulfil(fulfil::Args),
    /// One product's decisions and loads as the orders in its history grow, in memory and
    /// from PostgreSQL, next to a bare select of the same rows.
    History(history::Args),
    /// Database transactions per second with 1 and with many idle subscriptions over
    /// WebSockets (one shared log reader), next to as many made straight on the store.
    Subscribers(subscribers::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Append(args) => append::run(args).await,
        Command::Rebuild(args) => rebuild::run(args).await,
        Command::Lag(args) => lag::run(args).await,
        Command::PlaceOrder(args) => place_order::run(args).await,
        Command::Read(args) => read::run(args).await,
        Command::Fulfil(args) => fulfil::run(args).await,
        Command::History(args) => history::run(args).await,
        Command::Subscribers(args) => subscribers::run(args).await,
    }
}
