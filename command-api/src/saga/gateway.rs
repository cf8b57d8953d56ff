//! The payment gateway port, its two adapters (an in-process simulator and an HTTP client for
//! an external provider) and [`Resilient`], the wrapper both run behind: a timeout per call,
//! retries with jittered exponential backoff, a circuit breaker and a concurrency limit.
//!
//! Never charge twice: every charge carries the order id as the provider's idempotency key, so
//! a call repeated after a crash or a timeout returns the first outcome instead of charging
//! again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::CommandError;

/// One charge, as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charge {
    /// The order id: the provider answers a repeated key with the first outcome.
    pub idempotency_key: String,
    pub payment_token: String,
    pub amount_minor: i64,
    pub currency: String,
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
/// (the charge may or may not have happened) and the same call may be repeated.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError>;
    /// Pays back the charge with `reference` in full; repeating it is harmless.
    async fn refund(&self, idempotency_key: &str, reference: &str) -> Result<(), CommandError>;
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
}

/// An external provider over HTTP: `POST {base}/charges` and `POST {base}/refunds` with an
/// `Idempotency-Key` header. 2xx answers carry a [`ChargeOutcome`]; 402 is a decline; anything
/// else (5xx, 429, a dropped connection) is transient.
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

#[async_trait]
impl PaymentGateway for HttpGateway {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        let transient = |e: reqwest::Error| CommandError::Gateway(e.without_url().to_string());
        let response = self
            .client
            .post(format!("{}/charges", self.base))
            .header("Idempotency-Key", &charge.idempotency_key)
            .json(charge)
            .send()
            .await
            .map_err(transient)?;
        let status = response.status();
        if status == reqwest::StatusCode::PAYMENT_REQUIRED {
            return Ok(ChargeOutcome::Declined {
                reason: "declined by the payment provider".into(),
            });
        }
        if !status.is_success() {
            return Err(CommandError::Gateway(format!("provider answered {status}")));
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
            .map_err(|e| CommandError::Gateway(e.without_url().to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(CommandError::Gateway(format!(
                "provider answered {}",
                response.status()
            )))
        }
    }
}

/// The circuit breaker's state, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls fail at once until the cool-down ends, sparing a provider that is down.
    Open,
    /// The cool-down ended: one probe call goes through; its outcome closes or reopens.
    HalfOpen,
}

/// A consecutive-failures circuit breaker. Hand-written because it is a few lines of state
/// and the maintained crates (`failsafe`, `recloser`) wrap futures in their own abstractions
/// and release rarely; this one also exposes its state directly.
struct Breaker {
    threshold: u32,
    cool_down: Duration,
    inner: Mutex<BreakerInner>,
}

struct BreakerInner {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    fn state(&self) -> BreakerState {
        let Ok(inner) = self.inner.lock() else {
            return BreakerState::Open;
        };
        match inner.open_until {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go out now; in half-open state only one probe at a time.
    fn allow(&self) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        match inner.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if inner.probing => false,
            Some(_) => {
                inner.probing = true;
                true
            }
        }
    }

    fn record(&self, success: bool) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.probing = false;
        if success {
            inner.failures = 0;
            inner.open_until = None;
        } else {
            inner.failures = inner.failures.saturating_add(1);
            if inner.failures >= self.threshold {
                inner.open_until = Some(Instant::now() + self.cool_down);
            }
        }
    }
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
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    pub breaker_cool_down: Duration,
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
            concurrency: 16,
        }
    }
}

fn count_request(outcome: &'static str) {
    metrics::counter!("orderly_payment_requests_total", "outcome" => outcome).increment(1);
}

/// Any gateway behind a timeout, jittered retries, a circuit breaker and a concurrency limit.
pub struct Resilient {
    inner: Arc<dyn PaymentGateway>,
    policy: Resilience,
    breaker: Breaker,
    permits: Semaphore,
}

impl Resilient {
    pub fn new(inner: Arc<dyn PaymentGateway>, policy: Resilience) -> Self {
        Self {
            inner,
            policy,
            breaker: Breaker {
                threshold: policy.breaker_threshold.max(1),
                cool_down: policy.breaker_cool_down,
                inner: Mutex::new(BreakerInner {
                    failures: 0,
                    open_until: None,
                    probing: false,
                }),
            },
            permits: Semaphore::new(policy.concurrency.max(1)),
        }
    }

    /// Exports the breaker's state before the first call, so a dashboard sees it closed.
    pub fn with_metrics(self) -> Self {
        self.publish_breaker();
        self
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// "Full jitter": a uniform sleep below the exponential bound, so retrying callers
    /// spread out instead of returning in step.
    fn backoff(&self, retry: u32) -> Duration {
        let bound = self
            .policy
            .backoff
            .saturating_mul(1 << retry.min(16))
            .min(self.policy.max_backoff);
        bound.mul_f64(fastrand::f64())
    }

    /// Each attempt is one `orderly_payment_requests_total` (outcome from `succeeded` when it
    /// answers) and, when it went out, one `orderly_payment_request_duration_seconds`.
    async fn call<T, F, Fut>(
        &self,
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
            if !self.breaker.allow() {
                count_request("short_circuited");
                last = CommandError::Gateway("circuit breaker open".into());
                continue;
            }
            let started = std::time::Instant::now();
            let answered = tokio::time::timeout(self.policy.timeout, call()).await;
            let outcome = match &answered {
                Ok(Ok(answer)) => succeeded(answer),
                _ => "failed",
            };
            count_request(outcome);
            metrics::histogram!("orderly_payment_request_duration_seconds", "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            match answered {
                Ok(Ok(answer)) => {
                    self.breaker.record(true);
                    self.publish_breaker();
                    return Ok(answer);
                }
                Ok(Err(error)) => {
                    self.breaker.record(false);
                    last = error;
                }
                Err(_) => {
                    self.breaker.record(false);
                    last = CommandError::Gateway("gateway call timed out".into());
                }
            }
            self.publish_breaker();
        }
        Err(last)
    }

    /// `orderly_payment_breaker_state`: 0 closed, 1 half-open, 2 open. Set after every call;
    /// an open breaker turns half-open by time alone, which shows at the next call.
    fn publish_breaker(&self) {
        let value = match self.breaker.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!("orderly_payment_breaker_state").set(value);
    }
}

#[async_trait]
impl PaymentGateway for Resilient {
    async fn charge(&self, charge: &Charge) -> Result<ChargeOutcome, CommandError> {
        let succeeded = |outcome: &ChargeOutcome| match outcome {
            ChargeOutcome::Charged { .. } => "charged",
            ChargeOutcome::Declined { .. } => "declined",
        };
        self.call(succeeded, || self.inner.charge(charge)).await
    }

    async fn refund(&self, idempotency_key: &str, reference: &str) -> Result<(), CommandError> {
        self.call(
            |_| "refunded",
            || self.inner.refund(idempotency_key, reference),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(token: &str) -> Charge {
        Charge {
            idempotency_key: "order-1".into(),
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
            concurrency: 4,
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

    #[tokio::test]
    async fn an_outage_is_retried_then_opens_the_breaker_which_closes_after_a_good_probe() {
        let simulator = Arc::new(Simulator::default());
        let gateway = Resilient::new(simulator.clone(), fast());
        assert!(gateway.charge(&charge(tokens::UNAVAILABLE)).await.is_err());
        assert_eq!(simulator.calls(), 3, "one call and two retries");
        assert_eq!(gateway.breaker_state(), BreakerState::Open);
        assert!(gateway.charge(&charge(tokens::OK)).await.is_err());
        assert_eq!(simulator.calls(), 3, "an open breaker sends nothing");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(gateway.breaker_state(), BreakerState::HalfOpen);
        assert!(gateway.charge(&charge(tokens::OK)).await.is_ok());
        assert_eq!(gateway.breaker_state(), BreakerState::Closed);
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

    /// A provider on a free port: tok_ok charges, tok_declined answers 402, anything else 503.
    async fn provider() -> String {
        use axum::Json;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use axum::routing::post;
        async fn charges(
            headers: HeaderMap,
            Json(body): Json<serde_json::Value>,
        ) -> axum::response::Response {
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match body["payment_token"].as_str() {
                Some("tok_ok") => Json(
                    serde_json::json!({ "status": "charged", "reference": format!("ref-{key}") }),
                )
                .into_response(),
                Some("tok_declined") => StatusCode::PAYMENT_REQUIRED.into_response(),
                _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
        let router = axum::Router::new()
            .route("/charges", post(charges))
            .route("/refunds", post(|| async { StatusCode::OK }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        base
    }

    #[tokio::test]
    async fn the_http_adapter_maps_charges_declines_and_outages() {
        let gateway = HttpGateway::new(provider().await);
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
        assert!(gateway.refund("order-1", "ref-order-1").await.is_ok());
        let nowhere = HttpGateway::new("http://127.0.0.1:1");
        assert!(matches!(
            nowhere.charge(&charge(tokens::OK)).await,
            Err(CommandError::Gateway(_))
        ));
    }
}
