//! The outbox: side effects the saga asked for, stored with the saga step that asked, and
//! delivered at least once by a worker: gateway charges and refunds (whose outcomes go back
//! into the log as payment events), resolutions of charges whose outcome is unknown, and
//! customer notifications (through the configured [`Notifier`](super::Notifier): the log by
//! default, or SMTP).
//!
//! A charge call that fails (a timeout above all) leaves its outcome unknown: the provider may
//! have taken the money. While the order waits for payment, the saga's next attempt carries the
//! same idempotency key and learns the first outcome. Once the order is cancelled no attempt
//! follows, so a `resolve` message asks the provider ([`PaymentGateway::lookup`]) and records
//! a charge it finds, which the saga then refunds like any charge that arrives after a cancel.
//! It asks about a charge that has no outcome at all as well: one whose delivery was
//! dead-lettered may have taken money that was never recorded. It asks only once the call is
//! `charge_settle` behind it (two minutes by default): a provider still finishing a charge
//! whose call timed out answers that it holds none, and a charge that lands after that answer
//! would never be looked for again.
//!
//! [`PaymentGateway::lookup`]: super::gateway::PaymentGateway::lookup
//!
//! A claimed message is leased (invisible to other workers for `outbox_lease`), so a worker
//! that dies mid-delivery leaves it to be delivered again; the gateway's idempotency key makes
//! that safe. The claim names the saga member that made it, and a live member gives back the
//! claims of one whose membership lease ran out at its next heartbeat, so a crash delays a
//! message by seconds, not by the claim's lease. A message whose delivery fails transiently
//! `outbox_max_attempts` times is dead-lettered with its error, and one that fails in a way
//! its next attempt would meet again (see [`needs_an_operator`]) at once.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use orderly_domain::Rejection;
use orderly_domain::fulfilment::fixed_reason;
use orderly_domain::order::{Order, OrderAggregate, OrderStatus};
use orderly_domain::payment::{self, Payment, PaymentAggregate, PaymentCommand, PaymentStatus};
use orderly_domain::streams;
use orderly_domain::values::{CustomerId, GatewayReference, OrderId, Reason};
use orderly_event_schemas::{Event, OrderEvent, PaymentEvent};
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

/// First pause before a failed message is tried again; doubles per attempt up to
/// [`LONGEST_RETRY`], then jittered (see [`retry_pause`]).
const FIRST_RETRY: Duration = Duration::from_millis(200);

const LONGEST_RETRY: Duration = Duration::from_secs(60);

/// How long the worker keeps trying to record a delivery's outcome while the database is
/// unavailable. The call was made; a row whose outcome is not recorded stays claimed and
/// waits out its lease (a minute by default) before any worker looks at it again.
const RECORDING_PATIENCE: Duration = Duration::from_secs(30);

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
        /// Set by [`Row::withdraw_charges`] when the order was cancelled before the charge
        /// went out: its delivery records the attempt failed instead of calling the provider.
        #[serde(default)]
        withdrawn: bool,
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
    /// Finds out whether the order's last charge attempt, whose call failed, took the money
    /// after all, once the order is cancelled (see the module docs).
    Resolve {
        order_id: OrderId,
        correlation_id: Uuid,
    },
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Self::Charge { .. } => "charge",
            Self::Refund { .. } => "refund",
            Self::Notification { .. } => "notification",
            Self::Resolve { .. } => "resolve",
        }
    }
}

const INSERT_ROWS: &str = "
insert into outbox (outbox_id, order_id, kind, payload, next_attempt_at)
select outbox_id, order_id, kind, payload, now() + make_interval(secs => due_in)
from unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::float8[])
    as r(outbox_id, order_id, kind, payload, due_in)
on conflict (outbox_id) do nothing";

/// Marks the never-tried charges `$1` withdrawn (see [`Row::withdraw_charges`]). A charge
/// claimed, or tried before, is left alone: it may have reached the provider, and what it took
/// is refunded like any charge that lands after a cancel.
const WITHDRAW_CHARGES: &str = "
update outbox set payload = payload || '{\"withdrawn\": true}'
where outbox_id = any($1) and kind = 'charge' and attempts = 0 and last_error is null
  and delivered_at is null and dead_lettered_at is null";

/// One outbox row; its id derives from the order and the step, so a replayed step adds nothing.
pub(super) struct Row {
    id: Uuid,
    order_id: OrderId,
    message: Message,
}

impl Row {
    pub(super) fn new(order_id: OrderId, step: &str, message: Message) -> Self {
        Self {
            id: Self::id(order_id, step),
            order_id,
            message,
        }
    }

    /// The id of the row of the order's charge attempt `attempt`, the same whichever step
    /// stored it (see [`rows_for_event`]).
    pub(super) fn charge_id(order_id: OrderId, attempt: u32) -> Uuid {
        Self::id(order_id, &format!("charge/{attempt}"))
    }

    fn id(order_id: OrderId, step: &str) -> Uuid {
        Uuid::new_v5(&order_id.0, format!("outbox/{step}").as_bytes())
    }

    /// A refund of the order's charge, asked for by a saga step.
    pub(super) fn refund(order_id: OrderId, reason: &Reason, correlation_id: Uuid) -> Self {
        Self::new(
            order_id,
            "refund",
            Message::Refund {
                order_id,
                reason: reason.to_string(),
                correlation_id,
            },
        )
    }

    /// The customer's notice that the order is confirmed.
    pub(super) fn order_confirmed(
        order_id: OrderId,
        customer_id: &CustomerId,
        correlation_id: Uuid,
    ) -> Self {
        Self::new(
            order_id,
            "notify/order-confirmed",
            Message::Notification {
                order_id,
                template: "order-confirmed".into(),
                customer_id: Some(customer_id.to_string()),
                detail: None,
                correlation_id,
            },
        )
    }

    /// How long after it is stored the row is first due: a resolution `charge_settle`, when
    /// the provider has finished whatever the call it asks about started; the others at once.
    fn due_in(&self, charge_settle: Duration) -> Duration {
        match self.message {
            Message::Resolve { .. } => charge_settle,
            _ => Duration::ZERO,
        }
    }

    /// Stores `rows` in one statement (a replayed step's rows are there already: kept).
    pub(super) async fn insert_all<'a>(
        tx: &deadpool_postgres::Transaction<'_>,
        rows: impl Iterator<Item = &'a Row>,
        charge_settle: Duration,
    ) -> Result<(), CommandError> {
        let (mut ids, mut orders, mut kinds, mut payloads, mut due) =
            (vec![], vec![], vec![], vec![], vec![]);
        for row in rows {
            ids.push(row.id);
            orders.push(row.order_id.0);
            kinds.push(row.message.kind());
            payloads.push(
                serde_json::to_value(&row.message)
                    .map_err(|e| CommandError::Internal(e.to_string()))?,
            );
            due.push(row.due_in(charge_settle).as_secs_f64());
        }
        if ids.is_empty() {
            return Ok(());
        }
        let insert = tx.prepare_cached(INSERT_ROWS).await?;
        tx.execute(&insert, &[&ids, &orders, &kinds, &payloads, &due])
            .await?;
        Ok(())
    }

    /// Withdraws the charges `ids` ([`Self::charge_id`]) of orders cancelled while their
    /// last attempt waited in the outbox: a provider slow to answer, or down, holds the
    /// outbox back, and a charge sent after the cancel takes money only to give it back. A
    /// withdrawn charge is recorded as a failed attempt, which is what the cancelled saga
    /// waits for to settle.
    pub(super) async fn withdraw_charges(
        tx: &deadpool_postgres::Transaction<'_>,
        ids: &[Uuid],
    ) -> Result<u64, CommandError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let withdraw = tx.prepare_cached(WITHDRAW_CHARGES).await?;
        Ok(tx.execute(&withdraw, &[&ids]).await?)
    }
}

/// The outbox rows a recorded event asks for by itself, whatever the saga's state: the
/// gateway is called for a `PaymentChargeRequested`, and a cancellation is told to the
/// customer. A charge's row is made from the request as appended (a retry charges what the
/// first request asked for, whatever the command carried), by the step that appended it and
/// again when the event comes back through the log (a crash between the append and the step's
/// commit leaves only the second): the same id either way, so a request appended once is
/// charged once, however often the command was sent.
///
/// A charge attempt whose outcome is unknown is resolved once the order is cancelled, and
/// either event may come last: the cancellation (the attempt failed before it) or the failure
/// (the attempt was still in flight when the order was cancelled). Both ask; the delivery
/// checks the other half, so the one that comes first finds nothing to do.
pub(super) fn rows_for_event(event: &Event, correlation: Uuid) -> Vec<Row> {
    let resolve = |order_id| Message::Resolve {
        order_id,
        correlation_id: correlation,
    };
    match event {
        Event::Payment(PaymentEvent::PaymentChargeRequested(requested)) => vec![Row {
            id: Row::charge_id(requested.order_id, requested.attempt),
            order_id: requested.order_id,
            message: Message::Charge {
                order_id: requested.order_id,
                attempt: requested.attempt,
                amount_minor: requested.amount.amount_minor(),
                currency: requested.amount.currency().to_string(),
                payment_token: requested.payment_token.to_string(),
                correlation_id: correlation,
                withdrawn: false,
            },
        }],
        Event::Order(OrderEvent::OrderCancelled(cancelled)) => vec![
            Row::new(
                cancelled.order_id,
                "notify/order-cancelled",
                Message::Notification {
                    order_id: cancelled.order_id,
                    template: "order-cancelled".into(),
                    customer_id: None,
                    detail: Some(cancelled.cancellation_reason.to_string()),
                    correlation_id: correlation,
                },
            ),
            Row::new(
                cancelled.order_id,
                "resolve/order-cancelled",
                resolve(cancelled.order_id),
            ),
        ],
        // An operator who looked at the provider and found no charge is not asked again: the
        // provider that made the resolution fail would fail this one the same way.
        Event::Payment(PaymentEvent::PaymentFailed(failed))
            if failed.reason.as_str() != NOT_CHARGED_AS_AN_OPERATOR_FOUND =>
        {
            vec![Row::new(
                failed.order_id,
                &format!("resolve/failed/{}", failed.attempt),
                resolve(failed.order_id),
            )]
        }
        _ => Vec::new(),
    }
}

/// The reason of the failure `orderly saga outbox skip --not-charged` records (see
/// `maintenance::SettledElsewhere`).
pub(super) const NOT_CHARGED_AS_AN_OPERATOR_FOUND: &str =
    "no charge at the payment provider, as an operator found";

/// Claims due messages by pushing their next attempt a lease into the future: another worker
/// skips them (skip locked, then the lease), and a worker that dies leaves them to come due,
/// at once when a live member sees its lease ran out ([`FREE_CLAIMS_OF_THE_DEAD`]).
const CLAIM: &str = "
update outbox set attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $1),
    claimed_by = $3
where outbox_id in (
    select outbox_id from outbox
    where delivered_at is null and dead_lettered_at is null and next_attempt_at <= now()
    order by next_attempt_at
    limit $2
    for update skip locked)
returning outbox_id, payload, attempts, last_error is not null";

const MARK_DELIVERED: &str = "
update outbox o set delivered_at = now(), claimed_by = null
from unnest($1::uuid[], $2::int[]) as d(outbox_id, attempts)
where o.outbox_id = d.outbox_id and o.attempts = d.attempts";

/// Gives back the claims of saga members whose lease ran out (a crashed or stalled process):
/// due at once instead of after their own lease. A member that is only slow and renews later
/// finds its claim taken (its attempts moved on), as when the claim's lease runs out, and
/// records nothing; the gateway's idempotency key makes the second call safe. Members
/// forgotten altogether (a minute after their lease) are left to the claims' own lease,
/// which has run out by then.
const FREE_CLAIMS_OF_THE_DEAD: &str = "
update outbox o set next_attempt_at = now(), claimed_by = null
where o.delivered_at is null and o.dead_lettered_at is null and o.next_attempt_at > now()
  and o.claimed_by is not null
  and exists (
    select 1 from saga_members m where m.member_id = o.claimed_by and m.lease_until < now())";

/// Gives back every claim of one member, due at once: what it claimed and could not record
/// when it stopped.
const GIVE_BACK_CLAIMS: &str = "
update outbox set next_attempt_at = now(), claimed_by = null
where claimed_by = $1 and delivered_at is null and dead_lettered_at is null";

/// A message this worker claimed: its id, and its attempts counted with this claim, which
/// also tell whether another worker claimed it since (a lease that ran out).
#[derive(Debug, Clone, Copy)]
struct Claim {
    id: Uuid,
    attempts: i32,
    /// Whether a delivery of the message failed before: an operator's retry of a dead letter
    /// starts its attempts again from zero, and keeps the last error.
    failed_before: bool,
}

impl Claim {
    /// Whether an earlier claim tried this message: its outcome may be recorded already.
    fn is_redelivery(self) -> bool {
        self.attempts > 1 || self.failed_before
    }
}

impl SagaRunner {
    /// See [`FREE_CLAIMS_OF_THE_DEAD`]; run at every heartbeat, after this member's own
    /// renewal. A failure is logged and tried again at the next one.
    pub(super) async fn free_claims_of_the_dead(&self, client: &tokio_postgres::Client) {
        match client.execute(FREE_CLAIMS_OF_THE_DEAD, &[]).await {
            Ok(0) => {}
            Ok(freed) => tracing::info!(
                messages = freed,
                "outbox messages claimed by a saga process whose lease ran out put back in line"
            ),
            Err(error) => tracing::warn!(%error, "outbox claims of stopped processes not checked"),
        }
    }

    /// See [`GIVE_BACK_CLAIMS`]: for a member leaving once its outbox worker has ended, so
    /// that no delivery of these is under way.
    pub(super) async fn give_back_claims(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<(), CommandError> {
        let given = client.execute(GIVE_BACK_CLAIMS, &[&self.member.id]).await?;
        if given > 0 {
            tracing::info!(
                messages = given,
                "outbox messages this process claimed and did not record put back in line"
            );
        }
        Ok(())
    }

    /// Delivers due messages, a batch at a time, until `stop`: the batch in hand is finished
    /// and recorded, no other is claimed. The first pass starts at once: after an outage the
    /// charges that waited in line are tried before the lanes judge their deadlines.
    pub(super) async fn deliver(
        self: Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = self.outbox_ready.notified() => {}
                    _ = tokio::time::sleep(self.config.tick) => {}
                }
            }
            while !*stop.borrow() {
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
        let claimed = async {
            let client = self.pool.get().await?;
            Ok::<_, CommandError>(
                client
                    .query(
                        CLAIM,
                        &[
                            &self.config.outbox_lease.as_secs_f64(),
                            &BATCH,
                            &self.member.id,
                        ],
                    )
                    .await?,
            )
        }
        .await;
        // A claim short of full took every message due before it: the line was drained once,
        // for the lanes that wait for it (see `outbox_passes`). A failed one counts too: what
        // fails it fails the lanes' deadlines alike.
        if !matches!(&claimed, Ok(rows) if i64::try_from(rows.len()).is_ok_and(|n| n >= BATCH)) {
            self.outbox_passes.send_modify(|passes| *passes += 1);
        }
        let claimed = claimed?;
        let count = claimed.len();
        // Notifications are recorded as soon as they are all sent, not after the slowest call
        // to the payment provider beside them (a timeout and its retries take seconds): a
        // crash between sending a mail and recording it sends that mail again, so the window
        // stays as short as the mails' own.
        let (mails, calls): (Vec<_>, Vec<_>) = claimed
            .into_iter()
            .map(decode)
            .partition(|(_, message)| matches!(message, Ok(Message::Notification { .. })));
        let (mails, calls) = futures::join!(self.deliver_all(mails), self.deliver_all(calls));
        mails.and(calls).map(|()| count)
    }

    /// Delivers `claimed` at once and records the outcomes: deliveries in one statement,
    /// failures (rare) one by one, each whatever became of the others: a failure that cannot
    /// be recorded must not leave the messages delivered beside it to be delivered again when
    /// their lease runs out.
    async fn deliver_all(
        &self,
        claimed: Vec<(Claim, Result<Message, CommandError>)>,
    ) -> Result<(), CommandError> {
        if claimed.is_empty() {
            return Ok(());
        }
        let deliveries = claimed.into_iter().map(|(claim, message)| async move {
            let outcome = match message {
                Ok(message) => self.deliver_one(claim, message).await,
                Err(error) => Err(error),
            };
            (claim, outcome)
        });
        let mut delivered = Vec::new();
        let mut failed = Vec::new();
        for (claim, outcome) in futures::future::join_all(deliveries).await {
            match outcome {
                Ok(()) => delivered.push(claim),
                Err(error) => failed.push((claim, error)),
            }
        }
        let mut unrecorded = None;
        if !delivered.is_empty()
            && let Err(error) = recording(|| self.mark_delivered(&delivered)).await
        {
            unrecorded = Some(error);
        }
        for (claim, error) in &failed {
            if let Err(error) = recording(|| self.settle_failure(*claim, error)).await {
                unrecorded.get_or_insert(error);
            }
        }
        unrecorded.map_or(Ok(()), Err)
    }

    /// Marks `delivered` done where each is still in the hands of this claim: a worker whose
    /// lease ran out (a slow gateway, a pause) and whose message another worker claimed meanwhile
    /// leaves the row to that worker.
    async fn mark_delivered(&self, delivered: &[Claim]) -> Result<(), CommandError> {
        let (ids, attempts): (Vec<Uuid>, Vec<i32>) = delivered
            .iter()
            .map(|claim| (claim.id, claim.attempts))
            .unzip();
        let client = self.pool.get().await?;
        client.execute(MARK_DELIVERED, &[&ids, &attempts]).await?;
        Ok(())
    }

    /// Records a failed delivery: tried again after [`retry_pause`], or dead-lettered once out
    /// of attempts; like [`Self::mark_delivered`], only while the claim still holds the row.
    async fn settle_failure(&self, claim: Claim, error: &CommandError) -> Result<(), CommandError> {
        let Claim { id, attempts, .. } = claim;
        let client = self.pool.get().await?;
        // Out of attempts: parked with its error for an operator; never retried silently.
        let out_of_attempts =
            attempts >= i32::try_from(self.config.outbox_max_attempts).unwrap_or(i32::MAX);
        if out_of_attempts || needs_an_operator(error) {
            tracing::error!(%error, outbox_id = %id, attempts, "outbox message dead-lettered");
            client
                .execute(
                    "update outbox set dead_lettered_at = now(), last_error = $3, claimed_by = null
                     where outbox_id = $1 and attempts = $2",
                    &[&id, &attempts, &error.to_string()],
                )
                .await?;
        } else {
            let pause = retry_pause(attempts);
            tracing::warn!(%error, outbox_id = %id, attempts, "outbox delivery failed; will retry");
            client
                .execute(
                    "update outbox set next_attempt_at = now() + make_interval(secs => $3),
                         last_error = $4, claimed_by = null
                     where outbox_id = $1 and attempts = $2",
                    &[&id, &attempts, &pause.as_secs_f64(), &error.to_string()],
                )
                .await?;
        }
        Ok(())
    }

    /// Delivers message `id`: one call to the gateway or the notifier, and the outcome
    /// recorded where the saga will see it.
    async fn deliver_one(&self, claim: Claim, message: Message) -> Result<(), CommandError> {
        let id = claim.id;
        match message {
            Message::Charge {
                order_id,
                attempt,
                correlation_id,
                withdrawn: true,
                ..
            } => self.withdrawn(id, order_id, attempt, correlation_id).await,
            Message::Charge {
                order_id,
                attempt,
                amount_minor,
                currency,
                payment_token,
                correlation_id,
                withdrawn: false,
            } => {
                let charge = Charge {
                    idempotency_key: order_id.to_string(),
                    payment_token,
                    amount_minor,
                    currency,
                };
                self.charge(claim, order_id, attempt, &charge, correlation_id)
                    .await
            }
            Message::Refund {
                order_id,
                reason,
                correlation_id,
            } => self.refund(id, order_id, reason, correlation_id).await,
            Message::Resolve {
                order_id,
                correlation_id,
            } => self.resolve(id, order_id, correlation_id).await,
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
                    id,
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

    /// Charges attempt `attempt` and records the outcome in the payment's stream: charged,
    /// declined, or failed transiently (a fact the saga decides on: retry later, or cancel at
    /// the deadline). Any other failure fails the delivery, to be tried again.
    async fn charge(
        &self,
        claim: Claim,
        order_id: OrderId,
        attempt: u32,
        charge: &Charge,
        correlation_id: Uuid,
    ) -> Result<(), CommandError> {
        let id = claim.id;
        // A message delivered again may have had its outcome recorded by a worker that died, or
        // whose lease ran out, before marking it delivered. Calling the provider once more after
        // the payment moved on could take money that nothing would give back: if that call timed
        // out, its failure would record nothing (this attempt's outcome is in already), so no
        // resolution would ever look for it.
        if claim.is_redelivery() && !self.awaits_outcome(order_id, attempt).await? {
            tracing::info!(%order_id, attempt, "charge attempt already settled; the provider is not called again");
            return Ok(());
        }
        let now = Utc::now();
        let (outcome, command) = match self.gateway.charge(charge).await {
            Ok(ChargeOutcome::Charged { reference }) => ("charged", record_charge(reference, now)?),
            Ok(ChargeOutcome::Declined { reason }) => (
                "declined",
                PaymentCommand::RecordDecline {
                    reason: reason_or(reason, "declined by the payment provider"),
                    declined_at: now,
                },
            ),
            Err(error) if error.is_transient() => {
                tracing::info!(%error, %order_id, attempt, "charge failed transiently");
                (
                    "failed",
                    PaymentCommand::RecordFailure {
                        reason: fixed_reason("payment gateway unavailable"),
                        attempt,
                        failed_at: now,
                    },
                )
            }
            Err(error) => return Err(error),
        };
        self.record_outcome(id, order_id, correlation_id, outcome, command)
            .await
    }

    /// Records charge attempt `attempt`, withdrawn before any claim of it (see
    /// [`Row::withdraw_charges`]), as failed; the provider never heard of it.
    async fn withdrawn(
        &self,
        id: Uuid,
        order_id: OrderId,
        attempt: u32,
        correlation_id: Uuid,
    ) -> Result<(), CommandError> {
        tracing::info!(%order_id, attempt, "charge withdrawn: the order was cancelled before it was sent");
        let command = PaymentCommand::RecordFailure {
            reason: fixed_reason("charge withdrawn: the order was cancelled before it was sent"),
            attempt,
            failed_at: Utc::now(),
        };
        self.record_outcome(id, order_id, correlation_id, "withdrawn", command)
            .await
    }

    /// Refunds the charge the payment's stream holds (read at delivery time) and records the
    /// refund; a payment that holds no charge has nothing to refund.
    async fn refund(
        &self,
        id: Uuid,
        order_id: OrderId,
        reason: String,
        correlation_id: Uuid,
    ) -> Result<(), CommandError> {
        let Some(payment) = self.payment(order_id).await? else {
            tracing::warn!(%order_id, "refund asked for a payment that holds no charge");
            return Ok(());
        };
        // Refunded already (this message delivered before, or the refund recorded by an
        // operator as made elsewhere): the provider is not asked to pay it back again.
        if payment.status == PaymentStatus::Refunded {
            tracing::info!(%order_id, "refund already recorded; the provider is not called again");
            return Ok(());
        }
        let Some(reference) = payment.gateway_reference else {
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
        self.record_outcome(id, order_id, correlation_id, "refunded", command)
            .await
    }

    /// Asks the provider about the order's last charge attempt when the log holds no outcome
    /// for it (its call failed, or it was never answered) and the order is cancelled, and
    /// records a charge it took so the saga refunds it. A provider that cannot be reached fails
    /// the delivery: retried with the outbox's backoff, then dead-lettered for an operator,
    /// never taken for "not charged".
    ///
    /// An attempt with no outcome at all that the provider holds no charge for is recorded as
    /// failed: its cancelled saga waits for an answer to that attempt before it settles (a
    /// charge whose delivery was dead-lettered before the call has none of its own), and
    /// without one it stayed open for good. A charge the provider still finishes after this
    /// answer is not lost: the recorded failure asks for a resolution of its own
    /// ([`rows_for_event`]), another `charge_settle` later, which finds it and has it refunded.
    async fn resolve(
        &self,
        id: Uuid,
        order_id: OrderId,
        correlation_id: Uuid,
    ) -> Result<(), CommandError> {
        let Some((attempt, answered)) = self.unsettled_attempt(order_id).await? else {
            return Ok(());
        };
        // While the order waits, its next attempt asks the provider with the same key.
        if !self.is_cancelled(order_id).await? {
            return Ok(());
        }
        match self.gateway.lookup(&order_id.to_string()).await? {
            Some(ChargeOutcome::Charged { reference }) => {
                tracing::warn!(%order_id, attempt, "a charge whose outcome was unknown went through; recording it to refund it");
                let command = record_charge(reference, Utc::now())?;
                self.record_outcome(id, order_id, correlation_id, "charged", command)
                    .await
            }
            Some(ChargeOutcome::Declined { .. }) | None if answered => {
                tracing::info!(%order_id, attempt, "a charge whose outcome was unknown took no money");
                Ok(())
            }
            Some(ChargeOutcome::Declined { .. }) | None => {
                tracing::info!(%order_id, attempt, "a charge that never had an outcome took no money; recording it failed");
                let command = PaymentCommand::RecordFailure {
                    reason: fixed_reason("no charge found at the payment provider"),
                    attempt,
                    failed_at: Utc::now(),
                };
                self.record_outcome(id, order_id, correlation_id, "not-found", command)
                    .await
            }
        }
    }

    /// Whether the order's payment still waits for the outcome of charge attempt `attempt`.
    async fn awaits_outcome(&self, order_id: OrderId, attempt: u32) -> Result<bool, CommandError> {
        Ok(self.payment(order_id).await?.is_some_and(|payment| {
            payment.status == PaymentStatus::Pending && payment.attempts == attempt
        }))
    }

    /// The last attempt of the order's payment when the log does not say whether it took
    /// money, and whether it has an outcome at all: it failed transiently (answered), or it has
    /// none (still under way, or its delivery was dead-lettered, say after the provider charged
    /// and the outcome could not be recorded). An answer still under way that charges later is
    /// recorded, and refunded, then.
    async fn unsettled_attempt(
        &self,
        order_id: OrderId,
    ) -> Result<Option<(u32, bool)>, CommandError> {
        Ok(self
            .payment(order_id)
            .await?
            .and_then(|payment| match payment.status {
                PaymentStatus::Failed => Some((payment.attempts, true)),
                PaymentStatus::Pending => Some((payment.attempts, false)),
                _ => None,
            }))
    }

    async fn is_cancelled(&self, order_id: OrderId) -> Result<bool, CommandError> {
        Ok(self
            .order(order_id)
            .await?
            .is_some_and(|order| order.status == OrderStatus::Cancelled))
    }

    async fn customer_of(&self, order_id: OrderId) -> Result<String, CommandError> {
        self.order(order_id)
            .await?
            .map(|order| order.customer_id.to_string())
            .ok_or_else(|| {
                CommandError::Internal(format!("notification for unknown order {order_id}"))
            })
    }

    /// The order's payment as its stream holds it now.
    async fn payment(&self, order_id: OrderId) -> Result<Option<Payment>, CommandError> {
        let stream = stream_name(streams::payment(order_id))?;
        Ok(self.handler.load::<PaymentAggregate>(&stream).await?.state)
    }

    /// The order as its stream holds it now.
    async fn order(&self, order_id: OrderId) -> Result<Option<Order>, CommandError> {
        let stream = stream_name(streams::order(order_id))?;
        Ok(self.handler.load::<OrderAggregate>(&stream).await?.state)
    }

    /// Records on the order's payment what message `id` found, `outcome`, under a command id
    /// of its own: a redelivery records it once, and a redelivered charge that ends
    /// differently (failed, then charged) is a different decision, not a repeat of the first.
    async fn record_outcome(
        &self,
        id: Uuid,
        order_id: OrderId,
        correlation_id: Uuid,
        outcome: &str,
        command: PaymentCommand,
    ) -> Result<(), CommandError> {
        let command_id = Uuid::new_v5(&id, format!("outcome/{outcome}").as_bytes());
        let causation_id = id;
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
            // The provider took money the payment cannot hold (it was declined, or charged under
            // another reference): never dropped as a repeat. The delivery fails, and the
            // message waits, dead-lettered with this error, for an operator (see
            // [`needs_an_operator`]).
            Err(CommandError::Rejected(rejection @ Rejection::UnexpectedCharge { .. })) => {
                tracing::error!(%rejection, %order_id, "the provider charged a payment that cannot record it");
                Err(CommandError::Rejected(rejection))
            }
            // The payment moved on (a duplicate outcome); nothing to record.
            Err(CommandError::Rejected(rejection)) => {
                tracing::info!(%rejection, %order_id, "payment outcome not recorded");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

/// A claimed row: its claim, and its message as decoded (an error for a payload that does not
/// decode, which fails its delivery).
fn decode(row: tokio_postgres::Row) -> (Claim, Result<Message, CommandError>) {
    let claim = Claim {
        id: row.get(0),
        attempts: row.get(2),
        failed_before: row.get(3),
    };
    let message = serde_json::from_value::<Message>(row.get(1))
        .map_err(|e| CommandError::Internal(format!("outbox message {}: {e}", claim.id)));
    (claim, message)
}

/// Whether a failed delivery is dead-lettered at once, whatever attempts it has left: any
/// failure but a transient one. Another attempt would meet it again: the provider refused the
/// refund or lookup (a client error), the payload does not decode, a notice names an order the
/// log does not hold; retried 20 times (the default), they stayed hidden from the dead-letter
/// gauge and its alert for some thirteen minutes of backoff. Above all, money the
/// provider took that the payment refused to record: a later attempt would find the payment
/// settled and mark the message done (see [`SagaRunner::charge`]), leaving the money in a log
/// line only.
fn needs_an_operator(error: &CommandError) -> bool {
    !error.is_transient()
}

/// Runs `record` (writing a delivery's outcome to the outbox) again while it fails
/// transiently, from 100 ms doubling up to 2 s with jitter, for [`RECORDING_PATIENCE`].
async fn recording<Fut>(record: impl FnMut() -> Fut) -> Result<(), CommandError>
where
    Fut: Future<Output = Result<(), CommandError>>,
{
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(RECORDING_PATIENCE));
    record
        .retry(backoff)
        .when(CommandError::is_transient)
        .notify(|error, pause| {
            tracing::warn!(%error, ?pause, "outbox outcome not recorded; trying again");
        })
        .await
}

/// The pause before a failed message's next attempt: [`FIRST_RETRY`] doubled per attempt (a
/// provider that is down is not hammered by the outbox too) up to [`LONGEST_RETRY`], then
/// moved by up to ±20 % at random, so messages that failed together (an outage, a restart)
/// do not all come due again in the same round.
fn retry_pause(attempts: i32) -> Duration {
    let doublings = u32::try_from(attempts).unwrap_or(0);
    let nominal = super::doubled(FIRST_RETRY, doublings, LONGEST_RETRY);
    nominal.mul_f64(0.8 + 0.4 * fastrand::f64())
}

fn record_charge(
    reference: String,
    charged_at: DateTime<Utc>,
) -> Result<PaymentCommand, CommandError> {
    let gateway_reference = GatewayReference::parse(reference)
        .map_err(|e| CommandError::Internal(format!("gateway reference: {e}")))?;
    Ok(PaymentCommand::RecordCharge {
        gateway_reference,
        charged_at,
    })
}

/// Provider texts are free-form; an empty or oversize one is replaced, never refused.
fn reason_or(text: String, fallback: &'static str) -> Reason {
    Reason::parse(text).unwrap_or_else(|_| fixed_reason(fallback))
}

#[cfg(test)]
mod tests {
    use orderly_event_schemas::orders::{CancelledBy, OrderCancelled};
    use orderly_event_schemas::payments::PaymentFailed;

    use super::*;

    fn order() -> OrderId {
        OrderId(Uuid::from_u128(1))
    }

    fn failed(attempt: u32) -> Event {
        PaymentFailed {
            order_id: order(),
            reason: Reason::parse("gateway call timed out").unwrap(),
            attempt,
            failed_at: Utc::now(),
        }
        .into()
    }

    fn kinds(rows: &[Row]) -> Vec<&'static str> {
        rows.iter().map(|row| row.message.kind()).collect()
    }

    #[test]
    fn a_cancellation_notifies_the_customer_and_resolves_an_unknown_charge() {
        let cancelled: Event = OrderCancelled {
            order_id: order(),
            cancellation_reason: Reason::parse("payment not completed before the deadline")
                .unwrap(),
            cancelled_by: CancelledBy::Fulfilment,
            cancelled_at: Utc::now(),
        }
        .into();
        let rows = rows_for_event(&cancelled, Uuid::nil());
        assert_eq!(kinds(&rows), ["notification", "resolve"]);
    }

    #[test]
    fn each_failed_attempt_asks_for_its_own_resolution_once() {
        let first = rows_for_event(&failed(1), Uuid::nil());
        let again = rows_for_event(&failed(1), Uuid::nil());
        let second = rows_for_event(&failed(2), Uuid::nil());
        assert_eq!(kinds(&first), ["resolve"]);
        assert_eq!(first[0].id, again[0].id, "a replayed event adds nothing");
        assert_ne!(first[0].id, second[0].id);
    }

    /// The pauses of the default attempts, without their spread: an outage shorter than this
    /// dead-letters nothing. Five attempts, the old default, gave up after 6 s, before the
    /// provider's breaker (10 s cool-down) let a single probe through.
    #[test]
    fn the_default_attempts_outlast_a_ten_minute_outage() {
        let max = i32::try_from(crate::saga::DEFAULT_OUTBOX_MAX_ATTEMPTS).unwrap();
        let nominal: Duration = (1..max)
            .map(|attempts| {
                let doublings = u32::try_from(attempts).unwrap();
                crate::saga::doubled(FIRST_RETRY, doublings, LONGEST_RETRY)
            })
            .sum();
        assert!(nominal >= Duration::from_secs(600), "{nominal:?}");
        assert!(nominal <= Duration::from_secs(20 * 60), "{nominal:?}");
    }

    #[test]
    fn retry_pauses_double_up_to_a_minute_and_spread_a_fifth_either_side() {
        for (attempts, nominal) in [(1, 0.4), (3, 1.6), (8, 51.2), (9, 60.0), (40, 60.0)] {
            let pauses: Vec<f64> = (0..200)
                .map(|_| retry_pause(attempts).as_secs_f64())
                .collect();
            assert!(
                pauses
                    .iter()
                    .all(|p| *p >= nominal * 0.8 - 1e-9 && *p <= nominal * 1.2 + 1e-9),
                "attempts {attempts}: {pauses:?}"
            );
            let early = pauses.iter().filter(|p| **p < nominal * 0.95).count();
            let late = pauses.iter().filter(|p| **p > nominal * 1.05).count();
            assert!(early > 20 && late > 20, "attempts {attempts}: not spread");
        }
    }
}
