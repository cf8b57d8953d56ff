//! # Layout
//!
//! Test data for tests and benchmarks, kept out of the crates that run in production.
//!
//! - `workload`: [`workload::Workload`], realistic event histories made through the domain's
//!   deciders, one append at a time and reproducible from a seed (the projections' tests, the
//!   rebuild, lag and read benchmarks).
//!
//! `orderly seed` (`service/src/seed.rs`), which writes a workload through the running command path
//! rather than straight into the store, stays with the service it drives.

pub mod workload;
