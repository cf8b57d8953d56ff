//! `orderly_commands_total` and `orderly_command_duration_seconds` (names in
//! `deploy/METRICS.md`): each command, from the API or the saga, counted once however many
//! conflict retries it took, with the `command` label taken from the domain's command enums.

use std::time::Instant;

use orderly_domain::order::OrderCommand;
use orderly_domain::payment::PaymentCommand;
use orderly_domain::product::ProductCommand;
use tracing::Instrument;

use crate::CommandError;

/// `<aggregate>.<command>` in snake case: a closed set, so it may be a label.
pub trait CommandName {
    fn command_name(&self) -> &'static str;
}

impl CommandName for OrderCommand {
    fn command_name(&self) -> &'static str {
        match self {
            Self::Place { .. } => "order.place",
            Self::MarkStockReserved { .. } => "order.mark_stock_reserved",
            Self::MarkPaid { .. } => "order.mark_paid",
            Self::Confirm { .. } => "order.confirm",
            Self::Cancel { .. } => "order.cancel",
            Self::Ship { .. } => "order.ship",
            Self::Deliver { .. } => "order.deliver",
        }
    }
}

impl CommandName for ProductCommand {
    fn command_name(&self) -> &'static str {
        match self {
            Self::Register { .. } => "product.register",
            Self::Restock { .. } => "product.restock",
            Self::ChangePrice { .. } => "product.change_price",
            Self::ReserveStock { .. } => "product.reserve_stock",
            Self::ReleaseReservation { .. } => "product.release_reservation",
            Self::ShipReservedStock { .. } => "product.ship_reserved_stock",
        }
    }
}

impl CommandName for PaymentCommand {
    fn command_name(&self) -> &'static str {
        match self {
            Self::RequestCharge { .. } => "payment.request_charge",
            Self::RecordCharge { .. } => "payment.record_charge",
            Self::RecordDecline { .. } => "payment.record_decline",
            Self::RecordFailure { .. } => "payment.record_failure",
            Self::Refund { .. } => "payment.refund",
        }
    }
}

/// Runs one command's handling (`run`: load, decide, append, retries) inside a `command` span,
/// then counts its outcome and records its duration.
pub async fn metered<T>(
    command: &'static str,
    run: impl Future<Output = Result<T, CommandError>>,
) -> Result<T, CommandError> {
    let started = Instant::now();
    // The ids are filled in by the handler, which holds the command's envelope.
    let span = tracing::info_span!(
        "command",
        command,
        outcome = tracing::field::Empty,
        correlation_id = tracing::field::Empty,
        causation_id = tracing::field::Empty,
    );
    let result = run.instrument(span.clone()).await;
    let outcome = outcome(&result);
    span.record("outcome", outcome);
    metrics::counter!("orderly_commands_total", "command" => command, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("orderly_command_duration_seconds", "command" => command)
        .record(started.elapsed().as_secs_f64());
    result
}

/// Counts one command that ran as part of a group (decided with others in one append): its
/// outcome, and the time since `started`, when the group began.
pub fn record(command: &'static str, failure: Option<&CommandError>, started: Instant) {
    let outcome = failure.map_or("ok", error_outcome);
    metrics::counter!("orderly_commands_total", "command" => command, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("orderly_command_duration_seconds", "command" => command)
        .record(started.elapsed().as_secs_f64());
}

fn outcome<T>(result: &Result<T, CommandError>) -> &'static str {
    result.as_ref().err().map_or("ok", error_outcome)
}

fn error_outcome(error: &CommandError) -> &'static str {
    match error {
        CommandError::Conflict { .. } | CommandError::Contended(_) => "conflict",
        CommandError::Unavailable(_)
        | CommandError::Gateway(_)
        | CommandError::InProgress(_)
        | CommandError::Internal(_) => "error",
        // The aggregate refused, or the decision found the caller's input or target wrong.
        _ => "rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_counted_by_how_it_ended() {
        assert_eq!(outcome::<()>(&Ok(())), "ok");
        assert_eq!(outcome::<()>(&Err(CommandError::Contended(8))), "conflict");
        assert_eq!(
            outcome::<()>(&Err(CommandError::NotFound("order"))),
            "rejected"
        );
        assert_eq!(
            outcome::<()>(&Err(CommandError::Unavailable("db".into()))),
            "error"
        );
    }
}
