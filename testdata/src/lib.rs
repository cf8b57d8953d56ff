//! # Layout
//!
//! Test data, drawn reproducibly from a seed with one generator (fastrand), kept out of the
//! crates that serve requests.
//!
//! - `workload`: [`workload::Workload`], realistic event histories made through the domain's
//!   deciders, one append at a time and reproducible from a seed (the projections' tests, the
//!   rebuild, lag and read benchmarks).
//! - `history`: a product with a long history (orders reserved and shipped), for what must
//!   hold as a product ages (snapshots, the history benchmark).
//! - `shop`: [`shop::ShopDraws`], the catalogue, orders and shipments `orderly seed` sends
//!   through the running command path (`service/src/seed.rs` sends them, retries and counts).

pub mod history;
pub mod shop;
pub mod workload;
