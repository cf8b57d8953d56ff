//! The payment gateway port, its two adapters (an in-process simulator and an HTTP client for
//! an external provider) and [`Resilient`], the wrapper both run behind: a timeout per call,
//! retries with jittered exponential backoff, circuit breakers (the provider's and one per
//! payment method, see the `breaker` module) and a concurrency limit.
//!
//! Never charge twice: every charge carries the order id as the provider's idempotency key, so
//! a call repeated after a crash or a timeout returns the first outcome instead of charging
//! again. A call that fails leaves its outcome unknown; [`PaymentGateway::lookup`] asks the
//! provider afterwards what it holds for the key.

mod breaker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::CommandError;
pub use breaker::BreakerState;
use breaker::{Breakers, Outcome, Policy, Refusal, Subject};

/// One charge, as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// The order id: the provider answers a repeated key with the first outcome.
    pub idempotency_key: String,
    pub payment_token: String,
    pub amount_minor: i64,
    pub currency: String,
}

impl Charge {
    /// The failure domain the breakers judge the charge in: its payment token, that is one
    /// customer's card or wallet. The narrowest domain that still groups the calls one bad
    /// card makes across its orders; a wider one (card network, issuer) would fit a provider
    /// outage that hits one network, but the port does not carry it, and the provider-wide
    /// breaker covers outages that span domains.
    fn failure_domain(&self) -> &str {
        &self.payment_token
    }
}

/// What the provider said to a charge.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ChargeOutcome {
    Charged {
        reference: String,
    },
    /// Final: retrying the same payment method will not help.
    Declined {
        reason: String,
    },
}

/// The port. `Err(CommandError::Gateway)` is a transient failure: the outcome is unknown
/// (the charge may or may not have happened) and the same call may be repeated. Any other
/// error is final for that call (the provider refused the request itself).
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError>;

    /// Pays back the charge with `reference` in full; repeating it is harmless.
    async fn refund(&self, idempotency_key: &str, reference: &str) -> Result<(), CommandError>;

    /// What the provider holds for the charge with `idempotency_key`: its outcome, or `None`
    /// when it never took a charge with that key. How a failed call's unknown outcome is
    /// learnt afterwards.
    ///
    /// The default cannot tell and says so with a transient error: a caller then retries and
    /// gives up visibly, instead of taking "no answer" for "not charged".
    async fn lookup(&self, _idempotency_key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        Err(CommandError::Gateway(
            "this gateway cannot look charges up".into(),
        ))
    }
}

/// The simulator's tokens (see DESIGN.md, section 4).
pub mod tokens {
    pub const OK: &str = "tok_ok";
    pub const DECLINED: &str = "tok_declined";
    pub const UNAVAILABLE: &str = "tok_unavailable";
    pub const SLOW: &str = "tok_slow";
}

/// How long `tok_slow` takes to answer.
pub const SLOW_ANSWER: Duration = Duration::from_secs(2);

/// An in-process provider: `tok_ok` charges, `tok_declined` declines, `tok_unavailable` fails
/// transiently every time, `tok_slow` charges after [`SLOW_ANSWER`]; other tokens decline. It
/// keeps the outcome per idempotency key like a real provider, and counts calls and charges so
/// tests can prove nothing was charged twice.
#[derive(Default)]
pub struct Simulator {
    charges: Mutex<HashMap<String, String>>,
    calls: AtomicU64,
    refunds: AtomicU64,
}

impl Simulator {
    /// Charge calls received, including repeats and failures.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Distinct charges taken (one per idempotency key at most).
    pub fn charges(&self) -> usize {
        self.charges.lock().map_or(0, |charges| charges.len())
    }

    pub fn refunds(&self) -> u64 {
        self.refunds.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl PaymentGateway for Simulator {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match charge.payment_token.as_str() {
            tokens::OK | tokens::SLOW => {
                if charge.payment_token == tokens::SLOW {
                    tokio::time::sleep(SLOW_ANSWER).await;
                }
                let mut charges = self
                    .charges
                    .lock()
                    .map_err(|_| CommandError::Gateway("simulator state poisoned".into()))?;
                let reference = charges
                    .entry(charge.idempotency_key.clone())
                    .or_insert_with(|| format!("sim_{}", uuid::Uuid::new_v4().simple()));
                Ok(ChargeOutcome::Charged {
                    reference: reference.clone(),
                })
            }
            tokens::UNAVAILABLE => Err(CommandError::Gateway("simulated outage".into())),
            tokens::DECLINED => Ok(ChargeOutcome::Declined {
                reason: "card declined".into(),
            }),
            _ => Ok(ChargeOutcome::Declined {
                reason: "unknown payment token".into(),
            }),
        }
    }

    async fn refund(&self, _key: &str, _reference: &str) -> Result<(), CommandError> {
        self.refunds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Only charges are kept: a declined key reads as never charged, which it was not.
    async fn lookup(&self, idempotency_key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        let charges = self
            .charges
            .lock()
            .map_err(|_| CommandError::Gateway("simulator state poisoned".into()))?;
        Ok(charges
            .get(idempotency_key)
            .map(|reference| ChargeOutcome::Charged {
                reference: reference.clone(),
            }))
    }
}

/// An external provider over HTTP: `POST {base}/charges` and `POST {base}/refunds` with an
/// `Idempotency-Key` header, `GET {base}/charges/{key}` to look a charge up. 2xx answers
/// carry a [`ChargeOutcome`]; 402 is a decline; a lookup's 404 with `{"status":
/// "not_found"}` is "no such charge"; 409 is the idempotency-key convention's "a request with
/// this key is still in progress" ([`CommandError::InProgress`]); other client errors are final
/// (see `is_client_error`); anything else (5xx, 401, 403, 407, 408, 429, a bare 404 to a
/// lookup, a dropped connection) is transient.
pub struct HttpGateway {
    client: reqwest::Client,
    base: String,
}

impl HttpGateway {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            client: reqwest::Client::new(),
            base: base.into().trim_end_matches('/').to_owned(),
        }
    }
}

/// Whether the provider refused the request itself: a 4xx other than 408 (request timeout),
/// 409 (still in progress: the outcome is unknown, see [`unsuccessful`]), 429 (too many
/// requests) and the refusals of Orderly's own
/// credentials, 401, 403 and 407 (a rotated key, a revoked account, a proxy: every call
/// fails alike until someone fixes the integration, an outage that is no customer's doing).
/// The same request would be refused again, and it says nothing about the provider's health,
/// so it is neither retried nor counted by the breakers.
fn is_client_error(status: StatusCode) -> bool {
    status.is_client_error()
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::CONFLICT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::PROXY_AUTHENTICATION_REQUIRED
        )
}

/// Whether the answer carries a JSON body, as the provider's own answers do.
fn is_json(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"))
}

fn transient(error: reqwest::Error) -> CommandError {
    CommandError::Gateway(error.without_url().to_string())
}

/// A non-success answer that is not the provider's refusal: a 409 says the provider is up and
/// still handling an earlier request with the same key, which the breakers must not count as
/// an outage (a slow charge retried would otherwise open them); anything else is transient.
fn unsuccessful(status: StatusCode) -> CommandError {
    if status == StatusCode::CONFLICT {
        CommandError::InProgress("the payment provider is still handling this request".into())
    } else {
        CommandError::Gateway(format!("provider answered {status}"))
    }
}

/// A non-success answer to a refund or lookup: final when the provider refused the request
/// (an operator must look: the outbox dead-letters it), else as [`unsuccessful`].
fn failed_call(what: &str, status: StatusCode) -> CommandError {
    if is_client_error(status) {
        CommandError::Internal(format!("the payment provider refused the {what}: {status}"))
    } else {
        unsuccessful(status)
    }
}

#[async_trait]
impl PaymentGateway for HttpGateway {
    /// A refused charge (400, 422, ...) becomes a decline naming the status: the order then
    /// ends cancelled "payment declined" at once, instead of retrying a request that cannot
    /// succeed until its deadline. A 404 or 405 without the provider's JSON is what a proxy or
    /// load balancer with no route answers (or a wrong base URL): the charge never reached the
    /// provider, so it is an outage (retried, counted by the breakers), never the customer's
    /// decline.
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        let response = self
            .client
            .post(format!("{}/charges", self.base))
            .header("Idempotency-Key", &charge.idempotency_key)
            .json(charge)
            .send()
            .await
            .map_err(transient)?;
        let status = response.status();
        if status == StatusCode::PAYMENT_REQUIRED {
            return Ok(ChargeOutcome::Declined {
                reason: "declined by the payment provider".into(),
            });
        }
        let unrouted = matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) && !is_json(&response);
        if is_client_error(status) && !unrouted {
            return Ok(ChargeOutcome::Declined {
                reason: format!("refused by the payment provider: {status}"),
            });
        }
        if !status.is_success() {
            return Err(unsuccessful(status));
        }
        response.json().await.map_err(transient)
    }

    async fn refund(&self, idempotency_key: &str, reference: &str) -> Result<(), CommandError> {
        let response = self
            .client
            .post(format!("{}/refunds", self.base))
            .header("Idempotency-Key", format!("refund-{idempotency_key}"))
            .json(&serde_json::json!({ "reference": reference }))
            .send()
            .await
            .map_err(transient)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(failed_call("refund", status))
        }
    }

    /// `GET /charges/{key}`: the charge's outcome, as a charge answers it, or 404 with
    /// `{"status": "not_found"}`, the provider's "no charge with this key". A 404 without that
    /// body may come from anything in between (a proxy or load balancer with no route to the
    /// provider) and says nothing about the charge: it stays unknown (a transient error), and
    /// is never taken for "not charged", which would leave money taken unrefunded.
    async fn lookup(&self, idempotency_key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        let mut url = reqwest::Url::parse(&format!("{}/charges", self.base))
            .map_err(|e| CommandError::Internal(format!("payment gateway url: {e}")))?;
        // Pushed as a path segment, so the key is escaped whatever it holds.
        url.path_segments_mut()
            .map_err(|()| CommandError::Internal("payment gateway url has no path".into()))?
            .push(idempotency_key);
        let response = self.client.get(url).send().await.map_err(transient)?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return match response.json::<LookupMiss>().await {
                Ok(LookupMiss::NotFound) => Ok(None),
                Err(_) => Err(CommandError::Gateway(
                    "lookup answered 404 without the provider's not_found: the charge's outcome is unknown".into(),
                )),
            };
        }
        if !status.is_success() {
            return Err(failed_call("lookup", status));
        }
        response.json().await.map(Some).map_err(transient)
    }
}

/// The body of the provider's 404 to a lookup (see [`HttpGateway::lookup`]).
#[derive(Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum LookupMiss {
    NotFound,
}

/// How [`Resilient`] treats the gateway behind it.
#[derive(Debug, Clone, Copy)]
pub struct Resilience {
    /// Longest one call may take; a slower call counts as a transient failure.
    pub timeout: Duration,
    /// Further calls after a transient failure, within one charge.
    pub retries: u32,
    /// First backoff; each retry doubles it, and the sleep is uniformly jittered below it.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Transient failures in a row that open one payment method's breaker, once other
    /// payment methods went through meanwhile (see the `breaker` module).
    pub breaker_threshold: u32,
    /// How long an open breaker, the provider's or a payment method's, refuses calls before
    /// it lets one probe through.
    pub breaker_cool_down: Duration,
    /// The stretch of recent calls the provider's breaker judges.
    pub breaker_window: Duration,
    /// Distinct calls (idempotency keys) the window must hold before the provider's breaker
    /// may open: a handful of failing orders says little about the provider.
    pub breaker_min_calls: u32,
    /// Share of those calls whose latest attempt failed that opens the provider's breaker.
    pub breaker_failure_rate: f64,
    /// Calls in flight at once.
    pub concurrency: usize,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            retries: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(10),
            breaker_window: Duration::from_secs(30),
            breaker_min_calls: 10,
            breaker_failure_rate: 0.5,
            concurrency: 16,
        }
    }
}

impl Resilience {
    fn breaker_policy(&self) -> Policy {
        Policy {
            domain_threshold: self.breaker_threshold.max(1),
            cool_down: self.breaker_cool_down,
            window: self.breaker_window,
            min_calls: self.breaker_min_calls,
            failure_rate: self.breaker_failure_rate,
        }
    }
}

/// The longest the breaker's gauge goes without being set again.
const BREAKER_PUBLISH_PERIOD: Duration = Duration::from_secs(5);

fn count_request(outcome: &'static str) {
    metrics::counter!("orderly_payment_requests_total", "outcome" => outcome).increment(1);
}

/// Any gateway behind a timeout, jittered retries, circuit breakers and a concurrency limit.
pub struct Resilient {
    inner: Arc<dyn PaymentGateway>,
    policy: Resilience,
    breakers: Breakers,
    permits: Semaphore,
}

impl Resilient {
    pub fn new(inner: Arc<dyn PaymentGateway>, policy: Resilience) -> Self {
        Self {
            inner,
            policy,
            breakers: Breakers::new(policy.breaker_policy()),
            permits: Semaphore::new(policy.concurrency.max(1)),
        }
    }

    /// Exports the breaker's state before the first call, so a dashboard sees it closed, then
    /// after every call and every cool-down (at most [`BREAKER_PUBLISH_PERIOD`]) until the
    /// gateway is dropped: an open breaker turns half-open by time alone, and after an outage
    /// that gave up every charge no call may come for hours, while the gauge said open and
    /// the alert on it paged. Needs a Tokio runtime.
    pub fn with_metrics(self) -> Arc<Self> {
        self.publish_breaker();
        let period = self.policy.breaker_cool_down.min(BREAKER_PUBLISH_PERIOD);
        let gateway = Arc::new(self);
        let weak = Arc::downgrade(&gateway);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period.max(Duration::from_millis(10)));
            loop {
                ticks.tick().await;
                let Some(gateway) = weak.upgrade() else {
                    return;
                };
                gateway.publish_breaker();
            }
        });
        gateway
    }

    /// The provider's breaker: open when most recent calls failed, whatever their card.
    pub fn breaker_state(&self) -> BreakerState {
        self.breakers.state()
    }

    /// The breaker of the payment method `payment_token` (its failure domain).
    pub fn payment_method_breaker_state(&self, payment_token: &str) -> BreakerState {
        self.breakers.domain_state(payment_token)
    }

    /// "Full jitter": a uniform sleep below the exponential bound, so retrying callers
    /// spread out instead of returning in step.
    fn backoff(&self, retry: u32) -> Duration {
        let bound = super::doubled(self.policy.backoff, retry, self.policy.max_backoff);
        bound.mul_f64(fastrand::f64())
    }

    /// Each attempt is one `orderly_payment_requests_total` (outcome from `succeeded` when it
    /// answers) and, when it went out, one `orderly_payment_request_duration_seconds`. A
    /// final error (the provider refused the request) ends the call at once.
    async fn call<T, F, Fut>(
        &self,
        subject: Subject<'_>,
        succeeded: fn(&T) -> &'static str,
        call: F,
    ) -> Result<T, CommandError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, CommandError>>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| CommandError::Gateway("gateway closed".into()))?;
        let mut last = CommandError::Gateway("circuit breaker open".into());
        for retry in 0..=self.policy.retries {
            if retry > 0 {
                tokio::time::sleep(self.backoff(retry - 1)).await;
            }
            let pass = match self.breakers.admit(subject) {
                Ok(pass) => pass,
                Err(refusal) => {
                    count_request("short_circuited");
                    last = CommandError::Gateway(short_circuited(refusal).into());
                    continue;
                }
            };
            let started = std::time::Instant::now();
            let answered = tokio::time::timeout(self.policy.timeout, call()).await;
            let (outcome, label) = match &answered {
                Ok(Ok(answer)) => (Outcome::Answered, succeeded(answer)),
                Ok(Err(error)) if !error.is_transient() => (Outcome::Refused, "refused"),
                Ok(Err(CommandError::InProgress(_))) => (Outcome::InProgress, "in_progress"),
                _ => (Outcome::Failed, "failed"),
            };
            count_request(label);
            metrics::histogram!("orderly_payment_request_duration_seconds", "outcome" => label)
                .record(started.elapsed().as_secs_f64());
            self.breakers.record(subject, pass, outcome);
            self.publish_breaker();
            match answered {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) if outcome == Outcome::Refused => return Err(error),
                Ok(Err(error)) => last = error,
                Err(_) => last = CommandError::Gateway("gateway call timed out".into()),
            }
        }
        Err(last)
    }

    /// `orderly_payment_breaker_state`: the provider's breaker, 0 closed, 1 half-open, 2 open.
    /// Set after every call and now and then (see [`Resilient::with_metrics`]). Payment
    /// methods' breakers are not exported: there is one per card.
    fn publish_breaker(&self) {
        let value = match self.breakers.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!("orderly_payment_breaker_state").set(value);
    }
}

fn short_circuited(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Provider => "circuit breaker open",
        Refusal::Domain => "circuit breaker of this payment method open",
    }
}

#[async_trait]
impl PaymentGateway for Resilient {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        let subject = Subject {
            key: &charge.idempotency_key,
            domain: Some(charge.failure_domain()),
        };
        let succeeded = |outcome: &ChargeOutcome| match outcome {
            ChargeOutcome::Charged { .. } => "charged",
            ChargeOutcome::Declined { .. } => "declined",
        };
        self.call(subject, succeeded, || self.inner.charge(charge))
            .await
    }

    async fn refund(&self, idempotency_key: &str, reference: &str) -> Result<(), CommandError> {
        let key = format!("refund/{idempotency_key}");
        let subject = Subject {
            key: &key,
            domain: None,
        };
        self.call(
            subject,
            |_| "refunded",
            || self.inner.refund(idempotency_key, reference),
        )
        .await
    }

    async fn lookup(&self, idempotency_key: &str) -> Result<Option<ChargeOutcome>, CommandError> {
        let key = format!("lookup/{idempotency_key}");
        let subject = Subject {
            key: &key,
            domain: None,
        };
        self.call(
            subject,
            |_| "looked_up",
            || self.inner.lookup(idempotency_key),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use super::*;

    fn charge(token: &str) -> Charge {
        charge_for("order-1", token)
    }

    fn charge_for(key: &str, token: &str) -> Charge {
        Charge {
            idempotency_key: key.into(),
            payment_token: token.into(),
            amount_minor: 100,
            currency: "EUR".into(),
        }
    }

    fn fast() -> Resilience {
        Resilience {
            timeout: Duration::from_millis(200),
            retries: 2,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            breaker_threshold: 3,
            breaker_cool_down: Duration::from_millis(100),
            breaker_window: Duration::from_secs(10),
            breaker_min_calls: 10,
            breaker_failure_rate: 0.5,
            concurrency: 4,
        }
    }

    /// A provider that charges every token except those starting with `tok_unavailable`,
    /// and fails every call while `down`.
    #[derive(Default)]
    struct Provider {
        down: AtomicBool,
        calls: AtomicU64,
    }

    impl Provider {
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl PaymentGateway for Provider {
        async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst)
                || charge.payment_token.starts_with(tokens::UNAVAILABLE)
            {
                return Err(CommandError::Gateway("provider down".into()));
            }
            Ok(ChargeOutcome::Charged {
                reference: format!("ch_{}", charge.idempotency_key),
            })
        }

        async fn refund(&self, _key: &str, _reference: &str) -> Result<(), CommandError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_repeated_charge_with_one_key_charges_once() {
        let simulator = Arc::new(Simulator::default());
        let gateway = Resilient::new(simulator.clone(), fast());
        let first = gateway.charge(&charge(tokens::OK)).await.unwrap();
        let second = gateway.charge(&charge(tokens::OK)).await.unwrap();
        assert_eq!(first, second);
        assert_eq!(simulator.charges(), 1);
        assert_eq!(simulator.calls(), 2);
    }

    /// The fault review's load: one order in nine pays with a card that always fails, and
    /// those orders are retried round after round while the others are done. Played once
    /// with one shared bad token (the simulator's `tok_unavailable`) and once with a bad
    /// card per order (as real tokens are).
    #[tokio::test]
    async fn one_card_in_nine_failing_leaves_the_other_cards_and_the_provider_breaker_alone() {
        let shared = |_: usize| tokens::UNAVAILABLE.to_owned();
        let per_order = |n: usize| format!("{}_{n}", tokens::UNAVAILABLE);
        let bad_tokens: [&dyn Fn(usize) -> String; 2] = [&shared, &per_order];
        for bad_token in bad_tokens {
            let provider = Arc::new(Provider::default());
            let gateway = Resilient::new(provider.clone(), fast());
            let bad: Vec<usize> = (0..90).filter(|n| n % 9 == 0).collect();
            for n in 0..90 {
                let token = if bad.contains(&n) {
                    bad_token(n)
                } else {
                    tokens::OK.to_owned()
                };
                let outcome = gateway
                    .charge(&charge_for(&format!("order-{n}"), &token))
                    .await;
                assert_eq!(outcome.is_ok(), !bad.contains(&n), "order {n}: {outcome:?}");
            }
            // Retry rounds of the bad orders alone, some after the cool-down, then new orders.
            for round in 0..4 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                for &n in &bad {
                    let outcome = gateway
                        .charge(&charge_for(&format!("order-{n}"), &bad_token(n)))
                        .await;
                    assert!(outcome.is_err());
                }
                assert_eq!(
                    gateway.breaker_state(),
                    BreakerState::Closed,
                    "round {round}"
                );
            }
            for n in 90..100 {
                let outcome = gateway
                    .charge(&charge_for(&format!("order-{n}"), tokens::OK))
                    .await;
                assert!(matches!(outcome, Ok(ChargeOutcome::Charged { .. })));
            }
            assert_eq!(gateway.breaker_state(), BreakerState::Closed);
            // Open, or half-open once its cool-down passed on a slow machine: either way it
            // lets at most a probe through.
            assert_ne!(
                gateway.payment_method_breaker_state(&bad_token(bad[1])),
                BreakerState::Closed,
                "a bad card is spared its calls"
            );
            // Good calls and at most the first attempt (three calls) and a probe per round
            // (one call) of each bad card.
            assert!(
                provider.calls() <= 90 - 10 + 10 * (3 + 4) + 10,
                "{} calls",
                provider.calls()
            );
        }
    }

    /// Every order pays with the same token, as in the simulator: a real outage must open
    /// the provider's breaker, not only that token's.
    #[tokio::test]
    async fn a_real_outage_opens_the_provider_breaker_which_closes_after_a_good_probe() {
        let provider = Arc::new(Provider::default());
        let gateway = Resilient::new(provider.clone(), fast());
        for n in 0..20 {
            let key = format!("order-{n}");
            assert!(gateway.charge(&charge_for(&key, tokens::OK)).await.is_ok());
        }
        provider.down.store(true, Ordering::SeqCst);
        let mut n = 20;
        while gateway.breaker_state() != BreakerState::Open {
            let key = format!("order-{n}");
            assert!(gateway.charge(&charge_for(&key, tokens::OK)).await.is_err());
            n += 1;
            assert!(n < 60, "the breaker never opened");
        }
        assert_eq!(
            gateway.payment_method_breaker_state(tokens::OK),
            BreakerState::Closed,
            "the card is not blamed when nothing goes through"
        );
        let calls = provider.calls();
        assert!(
            gateway
                .charge(&charge_for("order-99", tokens::OK))
                .await
                .is_err()
        );
        assert_eq!(provider.calls(), calls, "an open breaker sends nothing");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(gateway.breaker_state(), BreakerState::HalfOpen);
        provider.down.store(false, Ordering::SeqCst);
        assert!(
            gateway
                .charge(&charge_for("order-99", tokens::OK))
                .await
                .is_ok()
        );
        assert_eq!(gateway.breaker_state(), BreakerState::Closed);
    }

    /// After an outage no call may come for a long time; the gauge must still show the open
    /// breaker turning half-open by time alone, or the alert on it goes on paging.
    #[tokio::test]
    async fn the_breaker_gauge_shows_the_cool_down_without_a_call() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = recorder.handle();
        // This test's runtime runs on this thread only, the gauge's task included.
        let _local = metrics::set_default_local_recorder(&recorder);
        let provider = Arc::new(Provider::default());
        let gateway = Resilient::new(provider.clone(), fast()).with_metrics();
        let gauge = || {
            scrape
                .render()
                .lines()
                .find_map(|line| line.strip_prefix("orderly_payment_breaker_state "))
                .map(str::to_owned)
        };
        assert_eq!(gauge().as_deref(), Some("0"));
        provider.down.store(true, Ordering::SeqCst);
        let mut n = 0;
        while gateway.breaker_state() != BreakerState::Open {
            let key = format!("order-{n}");
            assert!(gateway.charge(&charge_for(&key, tokens::OK)).await.is_err());
            n += 1;
            assert!(n < 60, "the breaker never opened");
        }
        assert_eq!(gauge().as_deref(), Some("2"));
        // No call: the cool-down (100 ms) passes, and the gauge says so on its own.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(gauge().as_deref(), Some("1"));
    }

    #[tokio::test]
    async fn a_slow_answer_past_the_timeout_is_a_transient_failure() {
        let gateway = Resilient::new(
            Arc::new(Simulator::default()),
            Resilience {
                retries: 0,
                ..fast()
            },
        );
        let started = Instant::now();
        let outcome = gateway.charge(&charge(tokens::SLOW)).await;
        assert!(matches!(outcome, Err(CommandError::Gateway(_))));
        assert!(started.elapsed() < SLOW_ANSWER);
    }

    #[tokio::test]
    async fn a_decline_is_final_and_not_retried() {
        let simulator = Arc::new(Simulator::default());
        let gateway = Resilient::new(simulator.clone(), fast());
        let outcome = gateway.charge(&charge(tokens::DECLINED)).await.unwrap();
        assert!(matches!(outcome, ChargeOutcome::Declined { .. }));
        assert_eq!(simulator.calls(), 1);
    }

    #[tokio::test]
    async fn the_simulator_looks_up_the_charges_it_took() {
        let gateway = Resilient::new(Arc::new(Simulator::default()), fast());
        let charged = gateway.charge(&charge(tokens::OK)).await.unwrap();
        assert_eq!(gateway.lookup("order-1").await.unwrap(), Some(charged));
        assert_eq!(gateway.lookup("order-2").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_gateway_that_cannot_look_charges_up_says_so_with_a_transient_error() {
        let outcome = Provider::default().lookup("order-1").await;
        assert!(
            matches!(&outcome, Err(error) if error.is_transient()),
            "{outcome:?}"
        );
    }

    /// A provider on a free port: tok_ok charges, tok_declined answers 402, tok_invalid 422,
    /// tok_in_progress 409, tok_throttled 429, tok_unauthorized 401, tok_forbidden 403,
    /// tok_unknown 404 with its JSON, tok_misrouted a bare 404 as a proxy would send,
    /// anything else 503. It knows the charge with key `order-1`, answers lookups of other
    /// keys with its not_found (but for `order-misrouted`, a bare 404 as a proxy would send),
    /// and refunds of reference `ref-unknown` answer 404. Counts what it is sent.
    async fn provider() -> (String, Arc<AtomicU64>) {
        use axum::Json;
        use axum::extract::{Path, State};
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::{IntoResponse, Response};
        use axum::routing::{get, post};

        type Calls = State<Arc<AtomicU64>>;
        async fn charges(
            State(calls): Calls,
            headers: HeaderMap,
            Json(body): Json<serde_json::Value>,
        ) -> Response {
            calls.fetch_add(1, Ordering::SeqCst);
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let status = match body["payment_token"].as_str() {
                Some("tok_ok") => {
                    let charged = serde_json::json!({ "status": "charged", "reference": format!("ref-{key}") });
                    return Json(charged).into_response();
                }
                Some("tok_declined") => StatusCode::PAYMENT_REQUIRED,
                Some("tok_invalid") => StatusCode::UNPROCESSABLE_ENTITY,
                Some("tok_in_progress") => StatusCode::CONFLICT,
                Some("tok_throttled") => StatusCode::TOO_MANY_REQUESTS,
                Some("tok_unauthorized") => StatusCode::UNAUTHORIZED,
                Some("tok_forbidden") => StatusCode::FORBIDDEN,
                Some("tok_unknown") => {
                    let missing = serde_json::json!({ "error": "no such payment method" });
                    return (StatusCode::NOT_FOUND, Json(missing)).into_response();
                }
                Some("tok_misrouted") => {
                    return (StatusCode::NOT_FOUND, "no route").into_response();
                }
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            status.into_response()
        }
        async fn charge(State(calls): Calls, Path(key): Path<String>) -> Response {
            calls.fetch_add(1, Ordering::SeqCst);
            if key == "order-misrouted" {
                // What a proxy with no route to the provider answers.
                return (StatusCode::NOT_FOUND, "no route").into_response();
            }
            if key != "order-1" {
                let missing = serde_json::json!({ "status": "not_found" });
                return (StatusCode::NOT_FOUND, Json(missing)).into_response();
            }
            Json(serde_json::json!({ "status": "charged", "reference": "ref-order-1" }))
                .into_response()
        }
        async fn refunds(State(calls): Calls, Json(body): Json<serde_json::Value>) -> StatusCode {
            calls.fetch_add(1, Ordering::SeqCst);
            if body["reference"] == "ref-unknown" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            }
        }
        let calls = Arc::new(AtomicU64::new(0));
        let router = axum::Router::new()
            .route("/charges", post(charges))
            .route("/charges/{key}", get(charge))
            .route("/refunds", post(refunds))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (base, calls)
    }

    #[tokio::test]
    async fn the_http_adapter_maps_charges_declines_outages_and_lookups() {
        let gateway = HttpGateway::new(provider().await.0);
        assert_eq!(
            gateway.charge(&charge(tokens::OK)).await.unwrap(),
            ChargeOutcome::Charged {
                reference: "ref-order-1".into()
            }
        );
        assert!(matches!(
            gateway.charge(&charge(tokens::DECLINED)).await,
            Ok(ChargeOutcome::Declined { .. })
        ));
        assert!(matches!(
            gateway.charge(&charge(tokens::UNAVAILABLE)).await,
            Err(CommandError::Gateway(_))
        ));
        // The provider's own 404 refuses the card; a bare one never reached the provider.
        assert!(matches!(
            gateway.charge(&charge_for("order-1", "tok_unknown")).await,
            Ok(ChargeOutcome::Declined { .. })
        ));
        let misrouted = gateway
            .charge(&charge_for("order-1", "tok_misrouted"))
            .await;
        assert!(
            matches!(&misrouted, Err(CommandError::Gateway(why)) if why.contains("404")),
            "{misrouted:?}"
        );
        assert!(gateway.refund("order-1", "ref-order-1").await.is_ok());
        assert_eq!(
            gateway.lookup("order-1").await.unwrap(),
            Some(ChargeOutcome::Charged {
                reference: "ref-order-1".into()
            })
        );
        assert_eq!(gateway.lookup("order-2").await.unwrap(), None);
        // A 404 that is not the provider's word leaves the outcome unknown.
        assert!(matches!(
            gateway.lookup("order-misrouted").await,
            Err(CommandError::Gateway(_))
        ));
        let nowhere = HttpGateway::new("http://127.0.0.1:1");
        assert!(matches!(
            nowhere.charge(&charge(tokens::OK)).await,
            Err(CommandError::Gateway(_))
        ));
        assert!(matches!(
            nowhere.lookup("order-1").await,
            Err(CommandError::Gateway(_))
        ));
    }

    /// A provider that refuses Orderly's credentials refuses every order: an outage, which
    /// opens its breaker, not a decline of each customer's card.
    #[tokio::test]
    async fn refused_credentials_are_an_outage_that_opens_the_provider_breaker() {
        let (base, _) = provider().await;
        let gateway = Resilient::new(Arc::new(HttpGateway::new(base)), fast());
        let mut n = 0;
        while gateway.breaker_state() != BreakerState::Open {
            let refused = gateway
                .charge(&charge_for(&format!("order-{n}"), "tok_unauthorized"))
                .await;
            // The provider's answer, until the breaker it opened answers for it.
            assert!(
                matches!(&refused, Err(CommandError::Gateway(why))
                    if why.contains("401") || why.contains("breaker open")),
                "{refused:?}"
            );
            n += 1;
            assert!(n < 60, "the breaker never opened");
        }
    }

    #[tokio::test]
    async fn client_errors_are_final_not_retried_and_kept_off_the_breakers() {
        let (base, calls) = provider().await;
        let policy = Resilience {
            breaker_min_calls: 1,
            ..fast()
        };
        let gateway = Resilient::new(Arc::new(HttpGateway::new(base)), policy);
        for n in 0..5 {
            let refused = gateway
                .charge(&charge_for(&format!("order-{n}"), "tok_invalid"))
                .await;
            assert!(
                matches!(&refused, Ok(ChargeOutcome::Declined { reason }) if reason.contains("422")),
                "{refused:?}"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "each refused once, not retried"
        );
        let refund = gateway.refund("order-1", "ref-unknown").await;
        assert!(
            matches!(&refund, Err(error) if !error.is_transient()),
            "{refund:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        assert_eq!(gateway.breaker_state(), BreakerState::Closed);
        assert_eq!(
            gateway.payment_method_breaker_state("tok_invalid"),
            BreakerState::Closed
        );

        // Throttling and a refusal of Orderly's own credentials are transient: retried,
        // outcome unknown, never the customer's decline.
        for token in ["tok_throttled", "tok_unauthorized", "tok_forbidden"] {
            let before = calls.load(Ordering::SeqCst);
            let outcome = gateway.charge(&charge_for("order-9", token)).await;
            assert!(matches!(outcome, Err(CommandError::Gateway(_))), "{token}");
            assert_eq!(calls.load(Ordering::SeqCst) - before, 3, "{token}: retried");
        }
    }

    /// A 409 says the provider is still handling an earlier request with the same key: it is
    /// retried and its outcome stays unknown, but it is no outage. Counted as failures, a
    /// stretch of slow charges answered 409 used to open the provider's breaker and the card's,
    /// and every other customer's charge was then refused at once.
    #[tokio::test]
    async fn a_request_still_in_progress_is_retried_and_never_opens_a_breaker() {
        let (base, calls) = provider().await;
        let policy = Resilience {
            breaker_threshold: 1,
            breaker_min_calls: 1,
            ..fast()
        };
        let gateway = Resilient::new(Arc::new(HttpGateway::new(base)), policy);
        for n in 0..5 {
            let before = calls.load(Ordering::SeqCst);
            let outcome = gateway
                .charge(&charge_for(&format!("order-{n}"), "tok_in_progress"))
                .await;
            assert!(
                matches!(&outcome, Err(error @ CommandError::InProgress(_)) if error.is_transient()),
                "{outcome:?}"
            );
            assert_eq!(calls.load(Ordering::SeqCst) - before, 3, "retried");
            // Another card goes through meanwhile, as the per-card breaker's rule wants.
            gateway
                .charge(&charge_for(&format!("order-ok-{n}"), tokens::OK))
                .await
                .unwrap();
        }
        assert_eq!(gateway.breaker_state(), BreakerState::Closed);
        assert_eq!(
            gateway.payment_method_breaker_state("tok_in_progress"),
            BreakerState::Closed
        );
    }
}
