//! The outbox: side effects the saga asked for, stored with the saga step that asked, and
//! delivered at least once by a worker: gateway charges and refunds (whose outcomes go back
//! into the log as payment events) and customer notifications (through the configured
//! [`Notifier`](super::Notifier): the log by default, or SMTP).
//!
//! A claimed message is leased (invisible to other workers for `outbox_lease`), so a worker
//! that dies mid-delivery leaves it to be delivered again; the gateway's idempotency key makes
//! that safe. A message that fails `outbox_max_attempts` times is dead-lettered with its error.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use orderly_domain::order::OrderAggregate;
use orderly_domain::payment::{self, PaymentAggregate, PaymentCommand};
use orderly_domain::streams;
use orderly_domain::values::{GatewayReference, OrderId, Reason};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::gateway::{Charge, ChargeOutcome};
use super::notify::Notice;
use super::{ACTOR, SagaRunner};
use crate::CommandError;
use crate::handling::{Envelope, stream_name};
use crate::metering::{CommandName, metered};

/// Messages claimed per round.
const BATCH: i64 = 32;

/// First pause before a failed message is tried again; doubles per attempt up to a minute.
const FIRST_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Message {
    Charge {
        order_id: OrderId,
        attempt: u32,
        amount_minor: i64,
        currency: String,
        payment_token: String,
        correlation_id: Uuid,
    },
    Refund {
        order_id: OrderId,
        reason: String,
        correlation_id: Uuid,
    },
    Notification {
        order_id: OrderId,
        template: String,
        customer_id: Option<String>,
        detail: Option<String>,
        correlation_id: Uuid,
    },
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Self::Charge { .. } => "charge",
            Self::Refund { .. } => "refund",
            Self::Notification { .. } => "notification",
        }
    }
}

/// One outbox row; its id derives from the order and the step, so a replayed step adds nothing.
pub(super) struct Row {
    id: Uuid,
    order_id: OrderId,
    message: Message,
}

impl Row {
    pub(super) fn new(order_id: OrderId, step: &str, message: Message) -> Self {
        Self {
            id: Uuid::new_v5(&order_id.0, format!("outbox/{step}").as_bytes()),
            order_id,
            message,
        }
    }

    pub(super) async fn insert(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), CommandError> {
        let payload = serde_json::to_value(&self.message)
            .map_err(|e| CommandError::Internal(e.to_string()))?;
        tx.execute(
            "insert into outbox (outbox_id, order_id, kind, payload) values ($1, $2, $3, $4)
             on conflict (outbox_id) do nothing",
            &[&self.id, &self.order_id.0, &self.message.kind(), &payload],
        )
        .await?;
        Ok(())
    }
}

/// Claims due messages by pushing their next attempt a lease into the future: another worker
/// skips them (skip locked, then the lease), and a worker that dies leaves them to come due.
const CLAIM: &str = "
update outbox set attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $1)
where outbox_id in (
    select outbox_id from outbox
    where delivered_at is null and dead_lettered_at is null and next_attempt_at <= now()
    order by next_attempt_at
    limit $2
    for update skip locked)
returning outbox_id, payload, attempts";

impl SagaRunner {
    pub(super) async fn deliver(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = self.outbox_ready.notified() => {}
                _ = tokio::time::sleep(self.config.tick) => {}
            }
            loop {
                match self.deliver_batch().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "outbox not delivered this round");
                        break;
                    }
                }
            }
        }
    }

    /// Claims and delivers one batch, concurrently; the gateway's own limit bounds the calls.
    async fn deliver_batch(&self) -> Result<usize, CommandError> {
        let claimed = {
            let client = self.pool.get().await?;
            client
                .query(CLAIM, &[&self.config.outbox_lease.as_secs_f64(), &BATCH])
                .await?
        };
        let count = claimed.len();
        let deliveries = claimed.into_iter().map(|row| async move {
            let id: Uuid = row.get(0);
            let attempts: i32 = row.get(2);
            let outcome = match serde_json::from_value::<Message>(row.get(1)) {
                Ok(message) => self.deliver_one(id, message).await,
                Err(e) => Err(CommandError::Internal(format!("outbox message {id}: {e}"))),
            };
            self.settle(id, attempts, outcome).await
        });
        for settled in futures::future::join_all(deliveries).await {
            settled?;
        }
        Ok(count)
    }

    async fn settle(
        &self,
        id: Uuid,
        attempts: i32,
        outcome: Result<(), CommandError>,
    ) -> Result<(), CommandError> {
        let client = self.pool.get().await?;
        match outcome {
            Ok(()) => {
                client
                    .execute(
                        "update outbox set delivered_at = now() where outbox_id = $1",
                        &[&id],
                    )
                    .await?;
            }
            // Out of attempts: parked with its error for an operator; never retried silently.
            Err(error)
                if attempts
                    >= i32::try_from(self.config.outbox_max_attempts).unwrap_or(i32::MAX) =>
            {
                tracing::error!(%error, outbox_id = %id, attempts, "outbox message dead-lettered");
                client
                    .execute(
                        "update outbox set dead_lettered_at = now(), last_error = $2 where outbox_id = $1",
                        &[&id, &error.to_string()],
                    )
                    .await?;
            }
            // Exponential pause so a provider that is down is not hammered by the outbox too.
            Err(error) => {
                let pause = FIRST_RETRY
                    .saturating_mul(1 << attempts.clamp(0, 16))
                    .min(Duration::from_secs(60));
                tracing::warn!(%error, outbox_id = %id, attempts, "outbox delivery failed; will retry");
                client
                    .execute(
                        "update outbox set next_attempt_at = now() + make_interval(secs => $2), last_error = $3
                         where outbox_id = $1",
                        &[&id, &pause.as_secs_f64(), &error.to_string()],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn deliver_one(&self, id: Uuid, message: Message) -> Result<(), CommandError> {
        match message {
            Message::Charge {
                order_id,
                attempt,
                amount_minor,
                currency,
                payment_token,
                correlation_id,
            } => {
                let charge = Charge {
                    idempotency_key: order_id.to_string(),
                    payment_token,
                    amount_minor,
                    currency,
                };
                let now = Utc::now();
                let (outcome, command) = match self.gateway.charge(&charge).await {
                    Ok(ChargeOutcome::Charged { reference }) => (
                        "charged",
                        PaymentCommand::RecordCharge {
                            gateway_reference: GatewayReference::parse(reference).map_err(|e| {
                                CommandError::Internal(format!("gateway reference: {e}"))
                            })?,
                            charged_at: now,
                        },
                    ),
                    Ok(ChargeOutcome::Declined { reason }) => (
                        "declined",
                        PaymentCommand::RecordDecline {
                            reason: reason_or(reason, "declined by the payment provider"),
                            declined_at: now,
                        },
                    ),
                    // Recorded as a fact, so the saga decides: retry later, or cancel at the
                    // deadline. The message itself is done.
                    Err(error) if error.is_transient() => {
                        tracing::info!(%error, %order_id, attempt, "charge failed transiently");
                        (
                            "failed",
                            PaymentCommand::RecordFailure {
                                reason: reason_or(String::new(), "payment gateway unavailable"),
                                attempt,
                                failed_at: now,
                            },
                        )
                    }
                    Err(error) => return Err(error),
                };
                // One id per outcome: a redelivered charge that ends differently (failed,
                // then charged) is a different decision, not a repeat of the first.
                let command_id = Uuid::new_v5(&id, format!("outcome/{outcome}").as_bytes());
                self.record_payment(order_id, command_id, id, correlation_id, command)
                    .await
            }
            Message::Refund {
                order_id,
                reason,
                correlation_id,
            } => {
                // The reference to refund is read at delivery time, from the payment's stream.
                let stream = stream_name(streams::payment(order_id))?;
                let loaded = self.handler.load::<PaymentAggregate>(&stream).await?;
                let Some(reference) = loaded
                    .state
                    .as_ref()
                    .and_then(|payment| payment.gateway_reference.clone())
                else {
                    tracing::warn!(%order_id, "refund asked for a payment that holds no charge");
                    return Ok(());
                };
                self.gateway
                    .refund(&order_id.to_string(), reference.as_str())
                    .await?;
                let command = PaymentCommand::Refund {
                    reason: reason_or(reason, "order cancelled"),
                    refunded_at: Utc::now(),
                };
                let command_id = Uuid::new_v5(&id, b"outcome/refunded");
                self.record_payment(order_id, command_id, id, correlation_id, command)
                    .await
            }
            Message::Notification {
                order_id,
                template,
                customer_id,
                detail,
                correlation_id,
            } => {
                // Cancellations do not carry the customer: read it from the order as it is.
                let customer_id = match customer_id {
                    Some(id) => id,
                    None => self.customer_of(order_id).await?,
                };
                let notice = Notice {
                    order_id,
                    template,
                    customer_id,
                    detail,
                    correlation_id,
                };
                let sent = self.notifier.send(&notice).await;
                let outcome = if sent.is_ok() { "sent" } else { "failed" };
                metrics::counter!("orderly_notifications_total", "outcome" => outcome).increment(1);
                sent
            }
        }
    }

    async fn customer_of(&self, order_id: OrderId) -> Result<String, CommandError> {
        let stream = stream_name(streams::order(order_id))?;
        let loaded = self.handler.load::<OrderAggregate>(&stream).await?;
        loaded
            .state
            .map(|order| order.customer_id.to_string())
            .ok_or_else(|| {
                CommandError::Internal(format!("notification for unknown order {order_id}"))
            })
    }

    async fn record_payment(
        &self,
        order_id: OrderId,
        command_id: Uuid,
        causation_id: Uuid,
        correlation_id: Uuid,
        command: PaymentCommand,
    ) -> Result<(), CommandError> {
        let envelope = Envelope {
            command_id,
            correlation_id,
            causation_id,
            actor: ACTOR.to_owned(),
            idempotency_key: None,
            traceparent: None,
        };
        let stream = stream_name(streams::payment(order_id))?;
        let handled =
            self.handler
                .execute::<PaymentAggregate, _>(&stream, None, &envelope, |loaded| {
                    Ok(payment::decide(&loaded.state, &command)?)
                });
        let recorded = metered(command.command_name(), handled).await;
        match recorded {
            Ok(_) => Ok(()),
            // The payment moved on (a duplicate outcome); nothing to record.
            Err(CommandError::Rejected(rejection)) => {
                tracing::info!(%rejection, %order_id, "payment outcome not recorded");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// Provider texts are free-form; an empty or oversize one is replaced, never refused.
fn reason_or(text: String, fallback: &'static str) -> Reason {
    Reason::parse(text).unwrap_or_else(|_| {
        Reason::parse(fallback).unwrap_or_else(|_| unreachable!("{fallback:?} is a valid reason"))
    })
}
