//! Explicit eventual consistency: waiting for a token, and saying how fresh every answer is.
//!
//! A resolver that reads a read model first calls [`read_point`]: with `consistency.atLeast`
//! it waits, woken by the projection hub (never polling), until the projection answering it has
//! applied that position, for at most the smaller of `timeoutMs` and the server's cap. It then
//! notes the projection's position *before* reading, so the position noted is one the rows read
//! afterwards are known to include. [`Consistent`] turns the notes of one request into
//! `extensions.consistency { token, stale, lagMs }` on every query response.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::parser::types::{DocumentOperations, OperationType};
use async_graphql::{Context, Enum, Executor, InputObject, Request, Response};
use chrono::{DateTime, Utc};
use orderly_event_store::{EventFilter, EventStore, Position};
use orderly_graphql::ConsistencyToken;
use orderly_projections::{ProjectionHub, ProjectionName};
use serde_json::json;
use tokio::time::Instant;

use crate::ReadError;

#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsistencyMode {
    /// Wait up to timeoutMs, then answer anyway with extensions.consistency.stale = true.
    #[default]
    Bounded,
    /// Wait up to timeoutMs, then fail with code STALE_READ.
    Strict,
}

/// Read-your-writes: pass a mutation's `token` as `atLeast`, and the query is answered from
/// read models that include that write, waiting for them if needed. Example:
/// `order(id: $id, consistency: { atLeast: $token, timeoutMs: 1000, mode: STRICT })`.
/// Every query answer says what it saw in `extensions.consistency { token, stale, lagMs }`:
/// `token` a position the answering read models had applied, `stale` true when `atLeast` was
/// not reached in time (BOUNDED only), `lagMs` the age of the oldest event they had not applied.
#[derive(InputObject, Debug, Clone)]
pub struct ConsistencyInput {
    /// Answer only from read models that have applied at least this position.
    pub at_least: ConsistencyToken,
    /// How long the server may wait for the read models to catch up (it may cap this).
    #[graphql(default = 2000)]
    pub timeout_ms: Option<i32>,
    #[graphql(default_with = "Some(ConsistencyMode::Bounded)")]
    pub mode: Option<ConsistencyMode>,
}

/// What the resolvers of one request saw; the extension reports it.
#[derive(Debug, Default)]
pub struct Observed {
    inner: Mutex<ObservedInner>,
}

#[derive(Debug, Default)]
struct ObservedInner {
    /// The lowest position noted by any resolver: every read model that answered had applied
    /// at least this much.
    token: Option<Position>,
    stale: bool,
}

impl Observed {
    fn note(&self, position: Position, stale: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.token = Some(inner.token.map_or(position, |t| t.min(position)));
        inner.stale |= stale;
    }

    fn take(&self) -> (Option<Position>, bool) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.token, inner.stale)
    }
}

/// Waits as `consistency` asks for `projection` to pass its token, then notes the position the
/// answer will reflect. STRICT and not reached in time: STALE_READ.
pub async fn read_point(
    ctx: &Context<'_>,
    hub: &ProjectionHub,
    max_wait: Duration,
    projection: ProjectionName,
    consistency: Option<&ConsistencyInput>,
) -> Result<(), ReadError> {
    let mut stale = false;
    let mut refused = None;
    if let Some(consistency) = consistency {
        let asked = consistency.timeout_ms.unwrap_or(2000);
        let asked = u64::try_from(asked)
            .map_err(|_| ReadError::invalid("consistency.timeoutMs", "must be 0 or more"))?;
        let timeout = Duration::from_millis(asked).min(max_wait);
        let started = Instant::now();
        let reached = hub
            .wait_for(projection, consistency.at_least.0, timeout)
            .await;
        let waited = started.elapsed();
        orderly_graphql::metrics::record_consistency_wait(reached, waited);
        tracing::debug!(
            %projection, reached, waited_ms = waited.as_millis() as u64,
            "consistency wait"
        );
        if !reached {
            stale = true;
            if consistency.mode.unwrap_or_default() == ConsistencyMode::Strict {
                refused = Some(ReadError::Stale {
                    waited_ms: timeout.as_millis() as u64,
                });
            }
        }
    }
    // Noted for a STALE_READ too: its answer's report then says how far the read model got,
    // and that it was short.
    if let Ok(observed) = ctx.data::<Arc<Observed>>() {
        observed.note(hub.position(projection), stale);
    }
    refused.map_or(Ok(()), Err)
}

/// How far behind the log a position is, in milliseconds: the age of the oldest event after it
/// (0 when nothing is after it). The log's head is sampled at most once per `max_age` for all
/// requests together, by whichever request finds the sample old first; the others go on with
/// the sample they have instead of queueing behind it, so answering this costs no statement and
/// no wait on most requests.
pub struct LagGauge {
    store: Arc<dyn EventStore>,
    max_age: Duration,
    sample: Mutex<Sample>,
    /// Held by the one request refreshing the sample.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    taken: Option<Instant>,
    head: Position,
    /// First events after positions asked about since `taken`, the latest few: each answers
    /// exactly every position from the one asked about up to the event's own, so projections
    /// at different places in the log (one rebuilt or failed, one current) each keep theirs.
    oldest: [Option<Oldest>; OLDEST_KEPT],
    /// The slot the next one goes to.
    next: usize,
}

/// The first event after `after`: at `position`, recorded at `recorded_at`.
#[derive(Debug, Clone, Copy)]
struct Oldest {
    after: Position,
    position: Position,
    recorded_at: DateTime<Utc>,
}

/// Enough for the projections and the minimum over them that a query reports.
const OLDEST_KEPT: usize = 4;

impl Sample {
    /// The first event after `applied`, when a kept one is known to be it.
    fn oldest_after(&self, applied: Position) -> Option<DateTime<Utc>> {
        self.oldest
            .iter()
            .flatten()
            .find(|o| o.after <= applied && applied < o.position)
            .map(|o| o.recorded_at)
    }

    fn keep(&mut self, oldest: Oldest) {
        self.oldest[self.next] = Some(oldest);
        self.next = (self.next + 1) % OLDEST_KEPT;
    }
}

impl LagGauge {
    pub fn new(store: Arc<dyn EventStore>, max_age: Duration) -> Self {
        Self {
            store,
            max_age,
            sample: Mutex::default(),
            refreshing: tokio::sync::Mutex::default(),
        }
    }

    fn current(&self) -> Sample {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store_sample(&self, sample: Sample) {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = sample;
    }

    pub async fn lag_ms(&self, applied: Position) -> i64 {
        let mut sample = self.current();
        let old = sample.taken.is_none_or(|t| t.elapsed() > self.max_age);
        // The very first request waits for a sample; later ones only if nobody is taking one.
        let refresh = if sample.taken.is_none() {
            Some(self.refreshing.lock().await)
        } else if old {
            self.refreshing.try_lock().ok()
        } else {
            None
        };
        if let Some(_refreshing) = refresh {
            sample = self.current();
            if sample.taken.is_none_or(|t| t.elapsed() > self.max_age) {
                match self.store.head().await {
                    Ok(head) => {
                        sample = Sample {
                            taken: Some(Instant::now()),
                            head,
                            ..Sample::default()
                        };
                        self.store_sample(sample);
                    }
                    // The last sample (or "caught up" before any) stands until the store answers.
                    Err(error) => tracing::debug!(%error, "cannot sample the log's head"),
                }
            }
        }
        if applied >= sample.head {
            return 0;
        }
        let recorded_at = match sample.oldest_after(applied) {
            Some(at) => at,
            None => match self.store.read_all(applied, &EventFilter::All, 1).await {
                Ok(events) => match events.first() {
                    Some(event) => {
                        let mut latest = self.current();
                        if latest.taken == sample.taken {
                            latest.keep(Oldest {
                                after: applied,
                                position: event.position,
                                recorded_at: event.recorded_at,
                            });
                            self.store_sample(latest);
                        }
                        event.recorded_at
                    }
                    None => return 0,
                },
                Err(error) => {
                    tracing::debug!(%error, "cannot read the oldest unapplied event");
                    return 0;
                }
            },
        };
        (Utc::now() - recorded_at).num_milliseconds().max(0)
    }
}

/// `executor` with `extensions.consistency` added to every query response.
///
/// A wrapper rather than an async-graphql extension: with any extension registered, every
/// field of every answer goes through the extension chain, which costs more than the whole
/// report; this touches each request once.
#[derive(Clone)]
pub struct Consistent<E> {
    inner: E,
    hub: ProjectionHub,
    gauge: Arc<LagGauge>,
}

impl<E> Consistent<E> {
    pub fn new(inner: E, hub: ProjectionHub, gauge: Arc<LagGauge>) -> Self {
        Self { inner, hub, gauge }
    }
}

/// Whether the operation `request` runs is a query (not a mutation, not a subscription).
fn runs_a_query(request: &mut Request) -> bool {
    let name = request.operation_name.clone();
    let Ok(document) = request.parsed_query() else {
        return false;
    };
    let operation = match (&document.operations, name.as_deref()) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name),
        (DocumentOperations::Multiple(operations), None) => operations.values().next(),
    };
    operation.is_some_and(|operation| operation.node.ty == OperationType::Query)
}

impl<E: Executor> Executor for Consistent<E> {
    fn execute(&self, mut request: Request) -> impl Future<Output = Response> + Send {
        let is_query = runs_a_query(&mut request);
        let observed = Arc::new(Observed::default());
        let response = self.inner.execute(request.data(observed.clone()));
        let report = self.report(observed);
        async move {
            let response = response.await;
            if is_query {
                report.add_to(response).await
            } else {
                response
            }
        }
    }

    /// Operations sent over a WebSocket: a query's one response gets its report as over HTTP.
    fn execute_stream(
        &self,
        mut request: Request,
        session_data: Option<Arc<async_graphql::Data>>,
    ) -> futures::stream::BoxStream<'static, Response> {
        use futures::StreamExt;
        if !runs_a_query(&mut request) {
            return self.inner.execute_stream(request, session_data);
        }
        let observed = Arc::new(Observed::default());
        let report = self.report(observed.clone());
        self.inner
            .execute_stream(request.data(observed), session_data)
            .then(move |response| report.clone().add_to(response))
            .boxed()
    }
}

impl<E> Consistent<E> {
    fn report(&self, observed: Arc<Observed>) -> Report {
        Report {
            observed,
            hub: self.hub.clone(),
            gauge: self.gauge.clone(),
        }
    }
}

/// What a query's `extensions.consistency` is made of, gathered while it ran.
#[derive(Clone)]
struct Report {
    observed: Arc<Observed>,
    hub: ProjectionHub,
    gauge: Arc<LagGauge>,
}

impl Report {
    async fn add_to(self, mut response: Response) -> Response {
        let (token, stale) = self.observed.take();
        // A query that read no read model (only the log, or only `__typename`) reports the
        // read side as a whole: the position every projection has passed.
        let token = token.unwrap_or_else(|| {
            ProjectionName::ALL
                .iter()
                .map(|name| self.hub.position(*name))
                .min()
                .unwrap_or(Position::START)
        });
        let lag_ms = self.gauge.lag_ms(token).await;
        let value = json!({ "token": token.to_string(), "stale": stale, "lagMs": lag_ms });
        if let Ok(value) = async_graphql::Value::from_json(value) {
            response.extensions.insert("consistency".to_owned(), value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use orderly_event_store::memory::MemoryEventStore;
    use orderly_event_store::{ExpectedVersion, NewEvent, StreamName};

    use super::*;

    #[tokio::test]
    async fn lag_is_the_age_of_the_oldest_unapplied_event_and_zero_when_caught_up() {
        let store = Arc::new(MemoryEventStore::new());
        let gauge = LagGauge::new(store.clone(), Duration::ZERO);
        assert_eq!(gauge.lag_ms(Position::START).await, 0, "an empty log");
        let stream = StreamName::parse("order-1").unwrap();
        let first = store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("Placed", json!({}))],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let second = store
            .append(
                &stream,
                ExpectedVersion::Any,
                vec![NewEvent::new("Paid", json!({}))],
            )
            .await
            .unwrap();
        // Behind both events: as old as the first; behind only the second: younger than that.
        let behind_both = gauge.lag_ms(Position::START).await;
        assert!(behind_both >= 60, "{behind_both}");
        let behind_one = gauge.lag_ms(first.position).await;
        assert!(behind_one < behind_both, "{behind_one} vs {behind_both}");
        assert_eq!(gauge.lag_ms(second.position).await, 0);
    }

    /// Two projections far apart in the log, read within one sample: each is answered by the
    /// event after its own position, not by the older one the other found.
    #[tokio::test]
    async fn positions_read_within_one_sample_each_get_their_own_lag() {
        let store = Arc::new(MemoryEventStore::new());
        let gauge = LagGauge::new(store.clone(), Duration::from_secs(60));
        let stream = StreamName::parse("order-1").unwrap();
        let mut appended = Vec::new();
        for name in ["Placed", "Paid", "Shipped"] {
            appended.push(
                store
                    .append(
                        &stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::new(name, json!({}))],
                    )
                    .await
                    .unwrap()
                    .position,
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // (Each later call is made a little later: hence lower bounds and differences.)
        let far_behind = gauge.lag_ms(Position::START).await;
        assert!(far_behind >= 450, "{far_behind}");
        let one_behind = gauge.lag_ms(appended[1]).await;
        assert!(one_behind >= 150, "{one_behind}");
        let two_behind = gauge.lag_ms(appended[0]).await;
        assert!(
            two_behind >= one_behind + 100,
            "{two_behind} vs {one_behind}"
        );
        let far_again = gauge.lag_ms(Position::START).await;
        assert!(far_again >= two_behind + 100, "{far_again} vs {two_behind}");
        assert_eq!(gauge.lag_ms(appended[2]).await, 0);
    }
}
