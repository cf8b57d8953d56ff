//! The payment aggregate, stream `payment-<order uuid>`: one payment per order.
//!
//! Never charge twice. The gateway worker calls the gateway only for a `PaymentChargeRequested`
//! event, using the order id as the gateway's idempotency key, and a new attempt is only decided
//! after the previous one failed transiently. A charge request is handled so:
//!
//! - an attempt already recorded (a redelivery) decides nothing;
//! - the next attempt while the payment is pending, charged, refunded or declined is rejected
//!   (`ChargeNotAllowed`);
//! - the next attempt after a transient failure is decided (status back to `PENDING`).

use chrono::{DateTime, Utc};
use orderly_event_schemas::PaymentEvent;
use orderly_event_schemas::payments::*;
use serde::{Deserialize, Serialize};

use crate::Rejection;
use crate::values::{GatewayReference, Money, OrderId, PaymentToken, Reason};

/// The contract's `PaymentStatus`, with the same spelling when serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    Pending,
    Charged,
    Declined,
    /// Transient: the saga may ask for another attempt until the payment deadline.
    Failed,
    Refunded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub order_id: OrderId,
    pub amount: Money,
    pub payment_token: PaymentToken,
    pub status: PaymentStatus,
    /// Charge attempts requested so far; the contract's `attempts`.
    pub attempts: u32,
    pub failure_reason: Option<Reason>,
    /// Set once charged; a refund needs it.
    pub gateway_reference: Option<GatewayReference>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCommand {
    RequestCharge {
        order_id: OrderId,
        amount: Money,
        payment_token: PaymentToken,
        /// 1, then one more per retry; see the module docs.
        attempt: u32,
        requested_at: DateTime<Utc>,
    },
    /// The gateway took the money. Also accepted after a transient failure: a timed-out call
    /// may still have charged, and recording it is what lets the saga refund it.
    RecordCharge {
        gateway_reference: GatewayReference,
        charged_at: DateTime<Utc>,
    },
    RecordDecline {
        reason: Reason,
        declined_at: DateTime<Utc>,
    },
    RecordFailure {
        reason: Reason,
        attempt: u32,
        failed_at: DateTime<Utc>,
    },
    /// Sent by the saga; the handler refunds through the gateway first, then records it here.
    Refund {
        reason: Reason,
        refunded_at: DateTime<Utc>,
    },
}

pub fn decide(
    state: &Option<Payment>,
    command: &PaymentCommand,
) -> Result<Vec<PaymentEvent>, Rejection> {
    match command {
        PaymentCommand::RequestCharge {
            order_id,
            amount,
            payment_token,
            attempt,
            requested_at,
        } => match state {
            None => {
                request_first_charge(*order_id, *amount, payment_token, *attempt, *requested_at)
            }
            Some(payment) => request_retry(payment, *attempt, *requested_at),
        },
        PaymentCommand::RecordCharge {
            gateway_reference,
            charged_at,
        } => record_charge(existing(state)?, gateway_reference, *charged_at),
        PaymentCommand::RecordDecline {
            reason,
            declined_at,
        } => record_decline(existing(state)?, reason, *declined_at),
        PaymentCommand::RecordFailure {
            reason,
            attempt,
            failed_at,
        } => record_failure(existing(state)?, reason, *attempt, *failed_at),
        PaymentCommand::Refund {
            reason,
            refunded_at,
        } => refund(existing(state)?, reason, *refunded_at),
    }
}

/// Only a charge request starts a payment; every outcome needs one.
fn existing(state: &Option<Payment>) -> Result<&Payment, Rejection> {
    state.as_ref().ok_or(Rejection::PaymentNotRequested)
}

/// A payment starts with attempt 1.
fn request_first_charge(
    order_id: OrderId,
    amount: Money,
    payment_token: &PaymentToken,
    attempt: u32,
    requested_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    if attempt != 1 {
        return Err(Rejection::AttemptOutOfOrder {
            requested: attempt,
            expected: 1,
        });
    }
    Ok(vec![charge_requested(
        order_id,
        amount,
        payment_token,
        1,
        requested_at,
    )])
}

/// The next attempt is allowed only after a transient failure; see the module docs.
fn request_retry(
    payment: &Payment,
    attempt: u32,
    requested_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    let next = payment.attempts.saturating_add(1);
    // Known attempt: a redelivery, whatever happened to it since.
    if attempt <= payment.attempts {
        return Ok(vec![]);
    }
    if attempt > next {
        return Err(Rejection::AttemptOutOfOrder {
            requested: attempt,
            expected: next,
        });
    }
    if payment.status != PaymentStatus::Failed {
        return Err(Rejection::ChargeNotAllowed {
            status: payment.status,
        });
    }
    // A retry charges what the first request asked for, whatever this request carries.
    Ok(vec![charge_requested(
        payment.order_id,
        payment.amount,
        &payment.payment_token,
        next,
        requested_at,
    )])
}

/// A charge is recorded while pending or after a transient failure; the same charge again
/// decides nothing, any other is rejected.
fn record_charge(
    payment: &Payment,
    gateway_reference: &GatewayReference,
    charged_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    match payment.status {
        PaymentStatus::Pending | PaymentStatus::Failed => Ok(vec![
            PaymentCharged {
                order_id: payment.order_id,
                amount: payment.amount,
                gateway_reference: gateway_reference.clone(),
                charged_at,
            }
            .into(),
        ]),
        PaymentStatus::Charged | PaymentStatus::Refunded
            if payment.gateway_reference.as_ref() == Some(gateway_reference) =>
        {
            Ok(vec![])
        }
        PaymentStatus::Charged | PaymentStatus::Refunded | PaymentStatus::Declined => {
            Err(Rejection::UnexpectedCharge {
                status: payment.status,
            })
        }
    }
}

/// Only a pending payment can be declined.
fn record_decline(
    payment: &Payment,
    reason: &Reason,
    declined_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    match payment.status {
        PaymentStatus::Pending => Ok(vec![
            PaymentDeclined {
                order_id: payment.order_id,
                reason: reason.clone(),
                declined_at,
            }
            .into(),
        ]),
        PaymentStatus::Declined => Ok(vec![]),
        PaymentStatus::Charged | PaymentStatus::Failed | PaymentStatus::Refunded => {
            Err(Rejection::NotPending {
                status: payment.status,
            })
        }
    }
}

/// Only the current attempt of a pending payment can fail.
fn record_failure(
    payment: &Payment,
    reason: &Reason,
    attempt: u32,
    failed_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    // A failure of an attempt already superseded or already recorded changes nothing.
    let stale = attempt < payment.attempts
        || (attempt == payment.attempts && payment.status == PaymentStatus::Failed);
    if stale {
        return Ok(vec![]);
    }
    if payment.status != PaymentStatus::Pending || attempt != payment.attempts {
        return Err(Rejection::NotPending {
            status: payment.status,
        });
    }
    Ok(vec![
        PaymentFailed {
            order_id: payment.order_id,
            reason: reason.clone(),
            attempt,
            failed_at,
        }
        .into(),
    ])
}

/// Only a charged payment is refunded, by the amount and reference it was charged with.
fn refund(
    payment: &Payment,
    reason: &Reason,
    refunded_at: DateTime<Utc>,
) -> Result<Vec<PaymentEvent>, Rejection> {
    match (payment.status, &payment.gateway_reference) {
        (PaymentStatus::Charged, Some(gateway_reference)) => Ok(vec![
            PaymentRefunded {
                order_id: payment.order_id,
                amount: payment.amount,
                gateway_reference: gateway_reference.clone(),
                reason: reason.clone(),
                refunded_at,
            }
            .into(),
        ]),
        (PaymentStatus::Refunded, _) => Ok(vec![]),
        (status, _) => Err(Rejection::NotCharged { status }),
    }
}

fn charge_requested(
    order_id: OrderId,
    amount: Money,
    payment_token: &PaymentToken,
    attempt: u32,
    requested_at: DateTime<Utc>,
) -> PaymentEvent {
    PaymentChargeRequested {
        order_id,
        amount,
        payment_token: payment_token.clone(),
        attempt,
        requested_at,
    }
    .into()
}

pub fn evolve(state: Option<Payment>, event: &PaymentEvent) -> Option<Payment> {
    let mut payment = match (state, event) {
        (None, PaymentEvent::PaymentChargeRequested(requested)) => {
            return Some(Payment {
                order_id: requested.order_id,
                amount: requested.amount,
                payment_token: requested.payment_token.clone(),
                status: PaymentStatus::Pending,
                attempts: requested.attempt,
                failure_reason: None,
                gateway_reference: None,
            });
        }
        // Only a charge request starts a payment stream.
        (None, _) => return None,
        (Some(payment), _) => payment,
    };
    match event {
        PaymentEvent::PaymentChargeRequested(requested) => {
            payment.status = PaymentStatus::Pending;
            payment.attempts = requested.attempt;
        }
        PaymentEvent::PaymentCharged(charged) => {
            payment.status = PaymentStatus::Charged;
            // A late success after a failure: the failure no longer describes the payment.
            payment.failure_reason = None;
            payment.gateway_reference = Some(charged.gateway_reference.clone());
        }
        PaymentEvent::PaymentDeclined(declined) => {
            payment.status = PaymentStatus::Declined;
            payment.failure_reason = Some(declined.reason.clone());
        }
        PaymentEvent::PaymentFailed(failed) => {
            payment.status = PaymentStatus::Failed;
            payment.failure_reason = Some(failed.reason.clone());
        }
        PaymentEvent::PaymentRefunded(_) => payment.status = PaymentStatus::Refunded,
    }
    Some(payment)
}

decider!(
    /// The payment decider for generic callers (command handling, the test harness).
    PaymentAggregate, Option<Payment>, PaymentCommand, PaymentEvent
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::*;
    use crate::testing::{self, Given};

    fn given(history: impl IntoIterator<Item = PaymentEvent>) -> Given<PaymentAggregate> {
        testing::given(history)
    }

    fn request(attempt: u32) -> PaymentCommand {
        PaymentCommand::RequestCharge {
            order_id: order_id(1),
            amount: eur(2500),
            payment_token: token("tok_ok"),
            attempt,
            requested_at: at(attempt.into()),
        }
    }

    fn requested(attempt: u32) -> PaymentEvent {
        charge_requested(
            order_id(1),
            eur(2500),
            &token("tok_ok"),
            attempt,
            at(attempt.into()),
        )
    }

    fn record_charge(gateway_reference: &str) -> PaymentCommand {
        PaymentCommand::RecordCharge {
            gateway_reference: reference(gateway_reference),
            charged_at: at(3),
        }
    }

    fn charged() -> PaymentEvent {
        PaymentCharged {
            order_id: order_id(1),
            amount: eur(2500),
            gateway_reference: reference("ch_1"),
            charged_at: at(3),
        }
        .into()
    }

    fn record_decline() -> PaymentCommand {
        PaymentCommand::RecordDecline {
            reason: reason("insufficient funds"),
            declined_at: at(3),
        }
    }

    fn declined() -> PaymentEvent {
        PaymentDeclined {
            order_id: order_id(1),
            reason: reason("insufficient funds"),
            declined_at: at(3),
        }
        .into()
    }

    fn record_failure(attempt: u32) -> PaymentCommand {
        PaymentCommand::RecordFailure {
            reason: reason("gateway timed out"),
            attempt,
            failed_at: at(3),
        }
    }

    fn failed(attempt: u32) -> PaymentEvent {
        PaymentFailed {
            order_id: order_id(1),
            reason: reason("gateway timed out"),
            attempt,
            failed_at: at(3),
        }
        .into()
    }

    fn refund() -> PaymentCommand {
        PaymentCommand::Refund {
            reason: reason("order cancelled"),
            refunded_at: at(9),
        }
    }

    fn refunded() -> PaymentEvent {
        PaymentRefunded {
            order_id: order_id(1),
            amount: eur(2500),
            gateway_reference: reference("ch_1"),
            reason: reason("order cancelled"),
            refunded_at: at(9),
        }
        .into()
    }

    #[test]
    fn requesting_the_first_charge_makes_the_payment_pending() {
        let payment = given([])
            .when(request(1))
            .then([requested(1)])
            .expect("payment");
        assert_eq!(
            (payment.status, payment.attempts),
            (PaymentStatus::Pending, 1)
        );
    }

    #[test]
    fn a_first_request_that_is_not_attempt_one_is_rejected() {
        given([])
            .when(request(2))
            .then_rejected(Rejection::AttemptOutOfOrder {
                requested: 2,
                expected: 1,
            });
    }

    #[test]
    fn a_redelivered_charge_request_records_nothing() {
        given([requested(1)]).when(request(1)).then_nothing();
        given([requested(1), charged()])
            .when(request(1))
            .then_nothing();
    }

    #[test]
    fn a_new_attempt_while_pending_or_charged_is_rejected() {
        given([requested(1)])
            .when(request(2))
            .then_rejected(Rejection::ChargeNotAllowed {
                status: PaymentStatus::Pending,
            });
        given([requested(1), charged()])
            .when(request(2))
            .then_rejected(Rejection::ChargeNotAllowed {
                status: PaymentStatus::Charged,
            });
    }

    #[test]
    fn skipping_an_attempt_number_is_rejected() {
        given([requested(1), failed(1)])
            .when(request(3))
            .then_rejected(Rejection::AttemptOutOfOrder {
                requested: 3,
                expected: 2,
            });
    }

    #[test]
    fn retrying_after_a_transient_failure_requests_the_next_attempt() {
        let payment = given([requested(1), failed(1)])
            .when(request(2))
            .then([requested(2)])
            .expect("payment");
        assert_eq!(
            (payment.status, payment.attempts),
            (PaymentStatus::Pending, 2)
        );
    }

    #[test]
    fn recording_a_charge_marks_the_payment_charged() {
        let payment = given([requested(1)])
            .when(record_charge("ch_1"))
            .then([charged()])
            .expect("payment");
        assert_eq!(payment.status, PaymentStatus::Charged);
    }

    #[test]
    fn a_late_charge_after_a_transient_failure_is_still_recorded() {
        given([requested(1), failed(1)])
            .when(record_charge("ch_1"))
            .then([charged()]);
    }

    #[test]
    fn recording_the_same_charge_again_records_nothing() {
        given([requested(1), charged()])
            .when(record_charge("ch_1"))
            .then_nothing();
    }

    #[test]
    fn a_second_different_charge_is_rejected_loudly() {
        given([requested(1), charged()])
            .when(record_charge("ch_2"))
            .then_rejected(Rejection::UnexpectedCharge {
                status: PaymentStatus::Charged,
            });
        given([requested(1), declined()])
            .when(record_charge("ch_1"))
            .then_rejected(Rejection::UnexpectedCharge {
                status: PaymentStatus::Declined,
            });
    }

    #[test]
    fn any_outcome_for_a_payment_never_requested_is_rejected() {
        // Which variant a command is; exhaustive, so a new command must be added below.
        fn variant(command: &PaymentCommand) -> usize {
            match command {
                PaymentCommand::RequestCharge { .. } => 0,
                PaymentCommand::RecordCharge { .. } => 1,
                PaymentCommand::RecordDecline { .. } => 2,
                PaymentCommand::RecordFailure { .. } => 3,
                PaymentCommand::Refund { .. } => 4,
            }
        }
        let commands = [
            record_charge("ch_1"),
            record_decline(),
            record_failure(1),
            refund(),
        ];
        crate::testing::each_refused_before_creation::<PaymentAggregate>(
            commands,
            variant,
            4,
            Rejection::PaymentNotRequested,
        );
    }

    #[test]
    fn recording_a_decline_marks_the_payment_declined() {
        let payment = given([requested(1)])
            .when(record_decline())
            .then([declined()])
            .expect("payment");
        assert_eq!(payment.status, PaymentStatus::Declined);
    }

    #[test]
    fn recording_the_decline_again_records_nothing() {
        given([requested(1), declined()])
            .when(record_decline())
            .then_nothing();
    }

    #[test]
    fn a_decline_for_a_payment_not_pending_is_rejected() {
        given([requested(1), charged()])
            .when(record_decline())
            .then_rejected(Rejection::NotPending {
                status: PaymentStatus::Charged,
            });
    }

    #[test]
    fn recording_a_transient_failure_marks_the_payment_failed() {
        let payment = given([requested(1)])
            .when(record_failure(1))
            .then([failed(1)])
            .expect("payment");
        assert_eq!(payment.status, PaymentStatus::Failed);
    }

    #[test]
    fn a_failure_of_an_earlier_or_already_failed_attempt_records_nothing() {
        given([requested(1), failed(1)])
            .when(record_failure(1))
            .then_nothing();
        given([requested(1), failed(1), requested(2)])
            .when(record_failure(1))
            .then_nothing();
    }

    #[test]
    fn a_failure_for_a_payment_not_pending_is_rejected() {
        given([requested(1), charged()])
            .when(record_failure(1))
            .then_rejected(Rejection::NotPending {
                status: PaymentStatus::Charged,
            });
    }

    #[test]
    fn refunding_a_charged_payment_refunds_the_charged_amount() {
        let payment = given([requested(1), charged()])
            .when(refund())
            .then([refunded()])
            .expect("payment");
        assert_eq!(payment.status, PaymentStatus::Refunded);
    }

    #[test]
    fn refunding_again_records_nothing() {
        given([requested(1), charged(), refunded()])
            .when(refund())
            .then_nothing();
    }

    #[test]
    fn refunding_a_payment_that_was_not_charged_is_rejected() {
        given([requested(1)])
            .when(refund())
            .then_rejected(Rejection::NotCharged {
                status: PaymentStatus::Pending,
            });
        given([requested(1), declined()])
            .when(refund())
            .then_rejected(Rejection::NotCharged {
                status: PaymentStatus::Declined,
            });
    }
}
