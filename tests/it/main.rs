//! The integration tests: one binary, so the application is linked once rather than once per
//! area, with one module per area and the helpers they share in [`common`].
//!
//! Each area starts what it tests against a database of its own (cloned from a migrated
//! template, see `common::migrated_database`); `faults` starts private PostgreSQL clusters
//! and `orderly` child processes. nextest runs every test in a process of its own.

mod common;

mod admin_api;
mod command_api;
mod console;
mod faults;
mod graphql_over_http;
mod hardening;
mod metrics_scrape;
mod outbox;
mod read_api;
mod read_side;
mod saga;
mod schema_contract;
mod seed;
mod serve;
mod snapshots;
mod subscriptions;
mod trace_export;
