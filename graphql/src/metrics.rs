//! The GraphQL edge's own series in `deploy/METRICS.md`: requests and open subscriptions
//! (recorded by the `/graphql` handler and its WebSocket executor), responses by status class,
//! and the read API's consistency waits ([`record_consistency_wait`]); and `GET /metrics`, which
//! serves what `orderly_observability::metrics` renders. The recorder, its buckets and every
//! help text live there.

use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use metrics::{counter, gauge};
use orderly_observability::metrics::Metrics;

/// `GET /metrics`: the scrape of `metrics`.
pub fn router(metrics: &Metrics) -> Router {
    let metrics = metrics.clone();
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    )
}

/// Counts every response by status class; wrap the whole router with
/// `axum::middleware::from_fn(count_responses)`.
pub async fn count_responses(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    counter!("orderly_http_responses_total", "status" => status_class(response.status()))
        .increment(1);
    response
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `kind` of a GraphQL request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    Query,
    Mutation,
    Subscription,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "query",
            Self::Mutation => "mutation",
            Self::Subscription => "subscription",
        }
    }
}

/// `outcome` of a GraphQL request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// No errors in the response.
    Ok,
    /// Errors the client caused (bad input, authentication, a business rejection, a conflict).
    Rejected,
    /// The server failed (INTERNAL, UNAVAILABLE, a timeout, a 5xx).
    Error,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Error => "error",
        }
    }

    /// The outcome of a response whose errors carry these `extensions.code` values.
    pub fn of_codes<'a>(codes: impl IntoIterator<Item = Option<&'a str>>) -> Self {
        let mut outcome = Self::Ok;
        for code in codes {
            match code {
                Some("INTERNAL" | "UNAVAILABLE") => return Self::Error,
                _ => outcome = Self::Rejected,
            }
        }
        outcome
    }
}

/// One GraphQL request: `operation` is the root field selected, `multiple` or `invalid`
/// (never the client's free-text operationName); for a subscription, the time until its
/// stream was set up.
pub fn record_graphql_request(
    operation: &str,
    kind: OperationKind,
    outcome: RequestOutcome,
    elapsed: Duration,
) {
    metrics::histogram!(
        "orderly_http_request_duration_seconds",
        "operation" => operation.to_owned(),
        "kind" => kind.as_str(),
        "outcome" => outcome.as_str()
    )
    .record(elapsed.as_secs_f64());
}

/// Holds one open subscription in `orderly_graphql_subscriptions_active`; dropping it (the
/// stream ended or the socket closed) takes it out again.
#[must_use = "the subscription counts as open while this guard lives"]
pub struct OpenSubscription {
    operation: String,
}

/// A subscription on root field `operation` (`orderUpdated`, `events`) is now open.
pub fn subscription_opened(operation: &str) -> OpenSubscription {
    gauge!("orderly_graphql_subscriptions_active", "operation" => operation.to_owned())
        .increment(1.0);
    OpenSubscription {
        operation: operation.to_owned(),
    }
}

impl Drop for OpenSubscription {
    fn drop(&mut self) {
        gauge!("orderly_graphql_subscriptions_active", "operation" => self.operation.clone())
            .decrement(1.0);
    }
}

/// A query with `consistency.atLeast` waited `waited`; `reached` is false when it gave up at
/// its timeout.
pub fn record_consistency_wait(reached: bool, waited: Duration) {
    let outcome = if reached { "reached" } else { "timeout" };
    metrics::histogram!("orderly_consistency_wait_seconds", "outcome" => outcome)
        .record(waited.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_error_codes() {
        assert_eq!(RequestOutcome::of_codes([]), RequestOutcome::Ok);
        assert_eq!(
            RequestOutcome::of_codes([Some("CONFLICT"), None]),
            RequestOutcome::Rejected
        );
        assert_eq!(
            RequestOutcome::of_codes([Some("NOT_FOUND"), Some("UNAVAILABLE")]),
            RequestOutcome::Error
        );
    }

    #[test]
    fn statuses_are_counted_by_class() {
        assert_eq!(status_class(StatusCode::OK), "2xx");
        assert_eq!(status_class(StatusCode::TOO_MANY_REQUESTS), "4xx");
        assert_eq!(status_class(StatusCode::SERVICE_UNAVAILABLE), "5xx");
    }
}
