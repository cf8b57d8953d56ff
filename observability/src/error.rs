//! The crate's one error type: the metrics recorder could not be set up. Recording itself
//! never fails (the `metrics` facade drops what no recorder takes).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ObservabilityError {
    /// Another recorder already holds the process, a histogram was given no buckets, or a
    /// thread panicked while installing.
    ///
    /// Handling: a wiring fault, not an operating condition; stop the process and fix it.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}
