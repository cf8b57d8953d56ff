//! Operator queries and mutations beyond the contract's, for the console and scripts: the
//! log browsed page by page, the projections' dead letters listed, retried and skipped, and
//! their rebuilds started and followed.
//! All of them are for admins, checked here before anything is read or changed.

use async_graphql::{Context, Object, SimpleObject};
use chrono::{DateTime, Utc};
use orderly_event_store::{EventFilter, Position, StreamName};
use orderly_graphql::{Actor, ConsistencyToken, Long};
use orderly_projections::{ProjectionName, dlq};

use crate::ReadError;
use crate::context::{ReadApi, request_id, signed_in};
use crate::rebuilds::ProjectionRebuild;
use crate::types::EventRecord;

/// Largest page of the log one request returns.
const MAX_LOG_PAGE: usize = 200;
/// Events read past the last match before a filtered page ends short: a filter that matches
/// rarely answers in bounded time, and `endCursor` lets the caller read on.
const MAX_LOG_SCAN: usize = 20_000;

#[derive(Default)]
pub struct AdminQuery;

#[derive(Default)]
pub struct AdminMutation;

/// A page of the log, oldest first.
#[derive(SimpleObject, Debug, Clone)]
pub struct EventPage {
    pub events: Vec<EventRecord>,
    /// Where the page's reading stopped: pass as `after` for the next page. Null when
    /// nothing was read.
    pub end_cursor: Option<ConsistencyToken>,
    /// False when the page reached the log's head.
    pub has_more: bool,
}

/// An event a projection could not apply, parked with the error.
#[derive(SimpleObject, Debug, Clone)]
pub struct DeadLetter {
    pub id: Long,
    pub projection: String,
    pub event_id: uuid::Uuid,
    pub stream: String,
    pub version: Long,
    pub position: ConsistencyToken,
    #[graphql(name = "type")]
    pub event_type: String,
    pub error: String,
    pub parked_at: DateTime<Utc>,
    /// `retried` or `skipped`; null while it waits.
    pub resolution: Option<String>,
    pub resolved_at: Option<DateTime<Utc>>,
}

impl From<dlq::DeadLetter> for DeadLetter {
    fn from(letter: dlq::DeadLetter) -> Self {
        Self {
            id: Long(letter.dead_letter_id),
            projection: letter.projection,
            event_id: letter.event_id,
            stream: letter.stream,
            version: Long(i64::try_from(letter.version).unwrap_or(i64::MAX)),
            position: ConsistencyToken(letter.position),
            event_type: letter.event_type,
            error: letter.error,
            parked_at: letter.parked_at,
            resolution: letter.resolution,
            resolved_at: letter.resolved_at,
        }
    }
}

/// What retrying a dead letter did.
#[derive(SimpleObject, Debug, Clone)]
pub struct RetryResult {
    pub id: Long,
    /// True when the event was applied and the letter resolved.
    pub applied: bool,
    /// Why it was not: the handler's error when it failed again, or that later events of its
    /// stream are applied already (a rebuild gets it in). The letter then stays.
    pub error: Option<String>,
}

/// Runs one admin resolver: refuses anyone but an admin, then maps the error.
async fn as_admin<T>(
    ctx: &Context<'_>,
    body: impl AsyncFnOnce(&ReadApi) -> Result<T, ReadError>,
) -> async_graphql::Result<T> {
    let api = ReadApi::of(ctx)?;
    let run = async {
        let actor: &Actor = signed_in(ctx)?;
        if !actor.is_admin() {
            return Err(ReadError::Forbidden("operator actions are for admins"));
        }
        body(api).await
    };
    run.await.map_err(|error| error.to_graphql(request_id(ctx)))
}

/// A dead letter that is gone (or already resolved) is the caller's to know about.
fn letter_error(error: orderly_projections::ProjectionError) -> ReadError {
    match error {
        orderly_projections::ProjectionError::DeadLetterNotFound(_) => {
            ReadError::NotFound("unresolved dead letter")
        }
        other => other.into(),
    }
}

fn projection(name: &str) -> Result<ProjectionName, ReadError> {
    name.parse()
        .map_err(|_| ReadError::invalid("projection", format!("no projection `{name}`")))
}

#[Object(name = "OperatorQueries")]
impl AdminQuery {
    /// Admin only. The log, oldest first, after `after` (or from its start), optionally only
    /// one stream, one category or one event type.
    async fn events(
        &self,
        ctx: &Context<'_>,
        stream: Option<String>,
        category: Option<String>,
        #[graphql(name = "type")] event_type: Option<String>,
        after: Option<ConsistencyToken>,
        #[graphql(default = 50)] first: i32,
    ) -> async_graphql::Result<EventPage> {
        as_admin(ctx, async |api| {
            let first = usize::try_from(first)
                .ok()
                .filter(|n| (1..=MAX_LOG_PAGE).contains(n))
                .ok_or_else(|| {
                    ReadError::invalid("first", format!("must be 1 to {MAX_LOG_PAGE}"))
                })?;
            let filter = match (stream, category) {
                (Some(_), Some(_)) => {
                    return Err(ReadError::invalid("stream", "give a stream or a category"));
                }
                (Some(stream), None) => EventFilter::Stream(
                    StreamName::parse(stream).map_err(|e| ReadError::invalid("stream", e))?,
                ),
                (None, Some(category)) => EventFilter::Category(category),
                (None, None) => EventFilter::All,
            };
            let mut cursor = after.map_or(Position::START, |token| token.0);
            let mut events = Vec::new();
            let mut scanned = 0;
            loop {
                let chunk = api.events().read_all(cursor, &filter, first).await?;
                let exhausted = chunk.len() < first;
                for event in chunk {
                    scanned += 1;
                    cursor = event.position;
                    if event_type.as_ref().is_none_or(|t| *t == event.event_type) {
                        events.push(EventRecord::from(event));
                        if events.len() == first {
                            break;
                        }
                    }
                }
                if events.len() == first || scanned >= MAX_LOG_SCAN {
                    break Ok(EventPage {
                        events,
                        end_cursor: Some(ConsistencyToken(cursor)),
                        has_more: true,
                    });
                }
                if exhausted {
                    break Ok(EventPage {
                        end_cursor: (scanned > 0).then_some(ConsistencyToken(cursor)),
                        events,
                        has_more: false,
                    });
                }
            }
        })
        .await
    }

    /// Admin only. Events the projections could not apply, oldest first; resolved ones too
    /// when asked.
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        projection: Option<String>,
        #[graphql(default = false)] include_resolved: bool,
    ) -> async_graphql::Result<Vec<DeadLetter>> {
        as_admin(ctx, async |api| {
            let name = projection.as_deref().map(self::projection).transpose()?;
            let client = api.store().client().await?;
            let letters = dlq::list(&client, name, include_resolved).await?;
            Ok(letters.into_iter().map(DeadLetter::from).collect())
        })
        .await
    }

    /// Admin only. The last rebuild of the projection started in this process; null when none
    /// was.
    async fn projection_rebuild(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Option<ProjectionRebuild>> {
        as_admin(ctx, async |api| {
            let name = projection(&name)?;
            Ok(api.rebuilds()?.progress(name))
        })
        .await
    }
}

#[Object(name = "OperatorMutations")]
impl AdminMutation {
    /// Admin only. Applies a dead letter's event again (read anew from the log), in step with
    /// its projection's runner.
    async fn retry_dead_letter(
        &self,
        ctx: &Context<'_>,
        id: Long,
    ) -> async_graphql::Result<RetryResult> {
        as_admin(ctx, async |api| {
            let mut client = api.store().client().await?;
            let outcome = dlq::retry(&mut client, &**api.events(), id.0)
                .await
                .map_err(letter_error)?;
            tracing::info!(dead_letter = id.0, ?outcome, "dead letter retried");
            Ok(match outcome {
                dlq::RetryOutcome::Applied => RetryResult {
                    id,
                    applied: true,
                    error: None,
                },
                dlq::RetryOutcome::FailedAgain(error) | dlq::RetryOutcome::Superseded(error) => {
                    RetryResult {
                        id,
                        applied: false,
                        error: Some(error),
                    }
                }
            })
        })
        .await
    }

    /// Admin only. Resolves a dead letter without applying its event.
    async fn skip_dead_letter(&self, ctx: &Context<'_>, id: Long) -> async_graphql::Result<Long> {
        as_admin(ctx, async |api| {
            let client = api.store().client().await?;
            dlq::skip(&client, id.0).await.map_err(letter_error)?;
            tracing::info!(dead_letter = id.0, "dead letter skipped");
            Ok(id)
        })
        .await
    }

    /// Admin only. Starts rebuilding the projection in a task of this process and answers at
    /// once; `projectionRebuild` follows it.
    async fn start_projection_rebuild(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<ProjectionRebuild> {
        as_admin(ctx, async |api| {
            let name = projection(&name)?;
            let started = api.rebuilds()?.start(name)?;
            tracing::info!(projection = %name, "rebuild started");
            Ok(started)
        })
        .await
    }
}
