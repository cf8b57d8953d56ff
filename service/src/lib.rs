//! # Layout
//!
//! The service wiring: what the `orderly` binary runs, as a library that the integration tests
//! (which start the whole service in-process) and the benchmarks use too.
//!
//! - `settings`: defaults < file < `ORDERLY_*` environment, with secrets kept out of logs.
//! - `app`: builds the service from settings ([`app::App::build`]), binds it, and runs it until a
//!   shutdown signal. Only this crate wires the other crates together.
//! - `health`: `/healthz`, `/readyz` and the readiness gauges.
//! - `read_side`: projection runners (also started by `serve`) and the operator commands for
//!   projections, dead letters and the log tail.
//! - `command_side`: the operator commands for the saga's outbox dead letters.
//! - `run`: what each subcommand does once parsed; the serving ones check connections, migrate,
//!   build their part with `app` and run it until SIGINT or SIGTERM.
//! - `seed`: `orderly seed`, a realistic workload (drawn by `orderly_testdata::shop`) written
//!   through the command path.
//! - `telemetry`: structured logs (JSON or text) and traces (OTLP export).
//!
//! The binary's `src/main.rs` only parses the command line and calls into here.

pub mod app;
pub mod command_side;
pub mod health;
pub mod read_side;
pub mod run;
pub mod seed;
pub mod settings;
pub mod telemetry;
