//! The KurrentDB adapter (also EventStoreDB 20.6+), through the official `kurrentdb` client.
//!
//! - Append: `ExpectedVersion` maps one to one onto the server's `StreamState`, and event ids
//!   go through unchanged, so the server's own idempotency check recognises a retried append.
//!   The server decides atomicity and conflicts; this side only validates first and reads back.
//! - Positions: the server's commit/prepare pair is a `Position` as it is; both order `$all`
//!   the same way, and the server only shows committed events, in order, so nothing is skipped.
//! - `$all` reads and subscriptions narrow by stream-name regex on the server, then check again
//!   here: system streams and events (names starting with `$`) never leave this module.
//! - The mapping code is pure functions at the top of the file, unit-tested without a server.

use std::time::Duration;

use ::kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, CurrentRevision, EventData, ReadAllOptions,
    ReadStream, ReadStreamOptions, RetryOptions, StreamPosition, StreamState,
    SubscribeToAllOptions, SubscriptionFilter,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::{DeserializeOwned, IgnoredAny};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::EventStore;
use crate::error::{BoxError, StoreError};
use crate::model::{
    Append, AppendResult, Direction, EventFilter, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StreamName, validate_append,
};
use crate::subscription::{Subscription, SubscriptionOptions};

/// Stream-name regex that keeps every user stream and drops system ones (`$...`).
const NON_SYSTEM_STREAMS: &str = "^[^$]";

/// Events read per request while looking for the last user event of the log.
const HEAD_SCAN: usize = 32;

/// The adapter. Cloning shares the client's connection.
#[derive(Clone)]
pub struct KurrentDbEventStore {
    client: Client,
    /// Only `buffer` and `retry_max` apply: the server pushes events itself.
    subscription: SubscriptionOptions,
}

impl KurrentDbEventStore {
    /// Connects lazily to `url` (`kurrentdb://admin:changeit@localhost:2113?tls=false`, or the
    /// `esdb://` form); a server that is down shows up as `Unavailable` on the first call.
    /// Must be called inside a tokio runtime, which the client's connection task runs on.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let settings: ClientSettings = url
            .parse()
            .map_err(|e| StoreError::Internal(format!("bad KurrentDB URL: {e}").into()))?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| StoreError::Internal(Box::new(e)))?;
        let client = Client::with_runtime_handle(runtime, settings)
            .map_err(|e| StoreError::Internal(e.into()))?;
        Ok(Self::new(client, SubscriptionOptions::default()))
    }

    pub fn new(client: Client, subscription: SubscriptionOptions) -> Self {
        Self {
            client,
            subscription,
        }
    }

    /// One request's worth of `$all` from `from`, mapped and filtered; also returns how many
    /// records the server sent and the position of the last, so callers can tell a short page
    /// (end of the log) from one thinned out here.
    async fn page_of_all<J: DeserializeOwned>(
        &self,
        from: Position,
        backwards: bool,
        filter: &EventFilter,
        count: usize,
    ) -> Result<AllPage<J>, StoreError> {
        let start = if backwards {
            StreamPosition::End
        } else if from == Position::START {
            StreamPosition::Start
        } else {
            StreamPosition::Position(to_kurrent_position(from))
        };
        let direction = |o: ReadAllOptions| {
            if backwards {
                o.backwards()
            } else {
                o.forwards()
            }
        };
        let options = direction(ReadAllOptions::default())
            .position(start)
            .filter(subscription_filter(filter))
            .max_count(count);
        let mut read = self.client.read_all(&options).await.map_err(store_error)?;
        let mut page = AllPage {
            events: Vec::new(),
            received: 0,
            last: None,
        };
        while let Some(resolved) = read.next().await.map_err(store_error)? {
            // Without link resolution every record carries its event; a bare link is skipped.
            let Some(stored) = resolved.event.as_ref() else {
                continue;
            };
            page.received += 1;
            page.last = Some(from_kurrent_position(stored.position));
            if let Some(event) = from_stored(stored)?.filter(|e| filter.matches(&e.stream)) {
                page.events.push(event);
            }
        }
        Ok(page)
    }

    /// Reads from `after` itself (the server's reads include their start) and drops what is not
    /// strictly after it; pages thinned out here to nothing are followed by another request, so
    /// an empty answer always means the end of the log.
    async fn read_all_as<J: DeserializeOwned>(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent<J>>, StoreError> {
        let mut events = Vec::new();
        let mut from = after;
        // One more than wanted, since the record at `from` itself comes back and is dropped.
        while events.len() < limit {
            let request = (limit - events.len()).saturating_add(1);
            let page = self.page_of_all(from, false, filter, request).await?;
            events.extend(page.events.into_iter().filter(|e| e.position > from));
            match page.last {
                Some(last) if page.received >= request && last > from => from = last,
                _ => break,
            }
        }
        events.truncate(limit);
        Ok(events)
    }
}

struct AllPage<J> {
    /// What the port may show: user events matching the filter.
    events: Vec<RecordedEvent<J>>,
    /// Records the server sent, shown or not: a page as long as asked for means "read on".
    received: usize,
    /// Position of the last record sent, shown or not: where the next request starts.
    last: Option<Position>,
}

#[async_trait]
impl EventStore for KurrentDbEventStore {
    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        crate::append_each(self, appends).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        crate::read_each(self, requests, limit).await
    }

    /// `deduplicated` comes from comparing the stream's version read just before the append
    /// with the one the server reports: an append that wrote nothing ends at or below where the
    /// stream already was. The server does not say so itself. Positions come from reading the
    /// written events back, since the server reports one position per append, not per event.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(&events)?;
        // Read first even when `expected` cannot hold: the conflict then reports the version.
        let before = self.stream_version(stream).await?;
        let Some(state) = stream_state(expected) else {
            return Err(StoreError::Conflict {
                stream: stream.clone(),
                expected,
                actual: before,
            });
        };
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let data = events
            .into_iter()
            .map(event_data)
            .collect::<Result<Vec<_>, _>>()?;
        let options = AppendToStreamOptions::default().stream_state(state);
        let written = self
            .client
            .append_to_stream(stream.as_str(), &options, data)
            .await
            .map_err(|e| append_error(stream, e))?;
        let last = written.next_expected_version;
        let count = ids.len() as u64;
        // The append's events are the last `count` up to `last`, whether written now or before.
        let first = last.checked_add(1).and_then(|n| n.checked_sub(count));
        let first = first.ok_or_else(|| {
            internal(format!(
                "server reported version {last} after appending {count} events to {stream}"
            ))
        })?;
        let back = self
            .read_stream(stream, Direction::Forwards, Some(first), ids.len())
            .await?;
        let (Some(head), Some(tail)) = (back.first(), back.last()) else {
            return Err(internal(format!(
                "appended events of {stream} not readable"
            )));
        };
        // A stream is append-only, so anything else there means the server's answer was wrong.
        if back.iter().map(|e| e.id).ne(ids.iter().copied()) {
            return Err(internal(format!(
                "events {first}..={last} of {stream} are not the ones just appended"
            )));
        }
        Ok(AppendResult {
            next_expected_version: last,
            first_position: head.position,
            position: tail.position,
            deduplicated: before.is_some_and(|v| last <= v),
        })
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        // A count of 0 is never sent: what the server makes of it is not documented.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let options = ReadStreamOptions::default().max_count(limit);
        let options = match (direction, from) {
            (Direction::Forwards, None) => options.forwards().position(StreamPosition::Start),
            (Direction::Forwards, Some(v)) => {
                options.forwards().position(StreamPosition::Position(v))
            }
            (Direction::Backwards, None) => options.backwards().position(StreamPosition::End),
            (Direction::Backwards, Some(v)) => {
                options.backwards().position(StreamPosition::Position(v))
            }
        };
        match self.client.read_stream(stream.as_str(), &options).await {
            Ok(read) => collect_stream(read).await,
            Err(::kurrentdb::Error::ResourceNotFound) => Ok(Vec::new()),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read_all_as(after, filter, limit).await
    }

    /// The server hands over the JSON as bytes: they become the text without a tree between.
    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        self.read_all_as(after, filter, limit).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        // Backwards from the end, the first user event found is the last one written; system
        // events the server-side filter let through are skipped here.
        // `from` is ignored backwards: the read starts at the end.
        let page = self
            .page_of_all::<IgnoredAny>(Position::START, true, &EventFilter::All, HEAD_SCAN)
            .await?;
        Ok(page
            .events
            .iter()
            .map(|e| e.position)
            .max()
            .unwrap_or(Position::START))
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        let start = if after == Position::START {
            StreamPosition::Start
        } else {
            StreamPosition::Position(to_kurrent_position(after))
        };
        // The client resubscribes after an outage from the last event it delivered, so a
        // dropped connection neither skips nor repeats events.
        let retry = RetryOptions::default()
            .retry_forever()
            .retry_delay(self.subscription.retry_max.min(Duration::from_secs(1)));
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(subscription_filter(&filter))
            .retry_options(retry);
        let mut feed = self.client.subscribe_to_all(&options).await;
        let (tx, rx) = mpsc::channel(self.subscription.buffer.max(1));
        let task = tokio::spawn(async move {
            loop {
                // Also wait for the consumer to go, so an idle feed does not outlive it.
                let next = tokio::select! {
                    next = feed.next() => next,
                    _ = tx.closed() => return,
                };
                let mapped = match next {
                    Ok(resolved) => match resolved.event.as_ref().map(from_stored) {
                        // The start is exclusive on the server too; checked here all the same.
                        Some(Ok(Some(event)))
                            if event.position > after && filter.matches(&event.stream) =>
                        {
                            Ok(event)
                        }
                        Some(Err(error)) => Err(error),
                        _ => continue,
                    },
                    Err(error) => Err(store_error(error)),
                };
                // An error ends the subscription, as the port promises, once it is delivered.
                let last = mapped.is_err();
                if tx.send(mapped).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Subscription::from_channel(rx, task))
    }
}

async fn collect_stream(mut read: ReadStream) -> Result<Vec<RecordedEvent>, StoreError> {
    let mut events = Vec::new();
    loop {
        match read.next().await {
            Ok(Some(resolved)) => {
                if let Some(event) = resolved.event.as_ref().map(from_stored).transpose()? {
                    events.extend(event);
                }
            }
            Ok(None) => return Ok(events),
            // The server may say "no such stream" only once the read has started.
            Err(::kurrentdb::Error::ResourceNotFound) => return Ok(Vec::new()),
            Err(e) => return Err(store_error(e)),
        }
    }
}

/// The event type and content type travel in the server's own metadata; the port's metadata
/// goes as custom metadata, which the server stores as given.
fn event_data(event: NewEvent) -> Result<EventData, StoreError> {
    let data = EventData::json(&event.event_type, &event.data)
        .map_err(|e| StoreError::Internal(Box::new(e)))?
        .id(event.id);
    data.metadata_as_json(&event.metadata)
        .map_err(|e| StoreError::Internal(Box::new(e)))
}

/// The port's event from the client's, with the JSON read as `J`: a parsed tree, the text
/// itself, or skipped.
fn from_stored<J: DeserializeOwned>(
    stored: &::kurrentdb::RecordedEvent,
) -> Result<Option<RecordedEvent<J>>, StoreError> {
    recorded_event(StoredEvent {
        stream: stored.stream_id(),
        id: stored.id,
        revision: stored.revision,
        event_type: &stored.event_type,
        data: &stored.data,
        custom_metadata: &stored.custom_metadata,
        position: from_kurrent_position(stored.position),
        created: stored.created,
    })
}

// ---- Pure mapping, unit-tested below ----

/// The server's state for `expected`; `None` when no stream can be there. Versions above
/// `i64::MAX` must not be sent: the server reads revisions as signed numbers, and `u64::MAX`
/// would arrive as -1, its code for "no stream".
pub(crate) fn stream_state(expected: ExpectedVersion) -> Option<StreamState> {
    match expected {
        ExpectedVersion::Any => Some(StreamState::Any),
        ExpectedVersion::NoStream => Some(StreamState::NoStream),
        ExpectedVersion::StreamExists => Some(StreamState::StreamExists),
        ExpectedVersion::Exact(v) if i64::try_from(v).is_ok() => {
            Some(StreamState::StreamRevision(v))
        }
        ExpectedVersion::Exact(_) => None,
    }
}

/// The way back: the server names the expectation it refused in its answer.
pub(crate) fn expected_version(state: StreamState) -> ExpectedVersion {
    match state {
        StreamState::Any => ExpectedVersion::Any,
        StreamState::NoStream => ExpectedVersion::NoStream,
        StreamState::StreamExists => ExpectedVersion::StreamExists,
        StreamState::StreamRevision(v) => ExpectedVersion::Exact(v),
    }
}

fn current_version(current: CurrentRevision) -> Option<u64> {
    match current {
        CurrentRevision::Current(v) => Some(v),
        CurrentRevision::NoStream => None,
    }
}

/// An append's failure: a wrong expected version is a `Conflict` on `stream`, anything else
/// as [`store_error`].
pub(crate) fn append_error(stream: &StreamName, error: ::kurrentdb::Error) -> StoreError {
    match error {
        ::kurrentdb::Error::WrongExpectedVersion { expected, current } => StoreError::Conflict {
            stream: stream.clone(),
            expected: expected_version(expected),
            actual: current_version(current),
        },
        other => store_error(other),
    }
}

/// Transport trouble, timeouts, a leader change and overload are `Unavailable` (retry with
/// backoff); the rest (access denied, bad requests, parse failures, deleted streams) is
/// `Internal`, since retrying cannot fix it.
pub(crate) fn store_error(error: ::kurrentdb::Error) -> StoreError {
    use ::kurrentdb::Error as E;
    let transient = match &error {
        E::ConnectionClosed
        | E::GrpcConnectionError(_)
        | E::DeadlineExceeded
        | E::NotLeaderException(_) => true,
        // The client folds gRPC's UNAVAILABLE into `ServerError` with tonic's rendering of the
        // status, which starts with the code's name.
        E::ServerError(status) => status.starts_with("status: Unavailable"),
        // The code's name, to avoid depending on tonic for its enum.
        E::Grpc { code, .. } => matches!(
            format!("{code:?}").as_str(),
            "ResourceExhausted" | "Aborted" | "Cancelled" | "Unavailable"
        ),
        _ => false,
    };
    let boxed: BoxError = Box::new(error);
    if transient {
        StoreError::Unavailable(boxed)
    } else {
        StoreError::Internal(boxed)
    }
}

fn internal(message: String) -> StoreError {
    StoreError::Internal(message.into())
}

pub(crate) fn to_kurrent_position(p: Position) -> ::kurrentdb::Position {
    ::kurrentdb::Position {
        commit: p.commit,
        prepare: p.prepare,
    }
}

pub(crate) fn from_kurrent_position(p: ::kurrentdb::Position) -> Position {
    Position::new(p.commit, p.prepare)
}

/// The fields of a stored event this adapter uses. The client's own `RecordedEvent` cannot be
/// built outside the client crate, so the mapping takes its parts and stays testable.
#[derive(Clone, Copy)]
pub(crate) struct StoredEvent<'a> {
    pub stream: &'a str,
    pub id: Uuid,
    pub revision: u64,
    pub event_type: &'a str,
    pub data: &'a [u8],
    pub custom_metadata: &'a [u8],
    pub position: Position,
    pub created: DateTime<Utc>,
}

/// `Ok(None)` for system streams and events, which the port never shows. Anything else that
/// the port cannot represent (a stream name it would refuse, data that is not JSON) was
/// written by someone else and is reported as `Internal` rather than silently dropped.
pub(crate) fn recorded_event<J: DeserializeOwned>(
    stored: StoredEvent<'_>,
) -> Result<Option<RecordedEvent<J>>, StoreError> {
    if stored.stream.starts_with('$') || stored.event_type.starts_with('$') {
        return Ok(None);
    }
    let stream = StreamName::parse(stored.stream).map_err(|e| StoreError::Internal(e.into()))?;
    let json = |bytes: &[u8], what: &str| -> Result<J, StoreError> {
        // Other clients may write no metadata at all; the port's empty metadata is `{}`.
        let bytes = if bytes.is_empty() { b"{}" } else { bytes };
        serde_json::from_slice(bytes).map_err(|e| {
            internal(format!(
                "{what} of event {} in {stream} is not JSON: {e}",
                stored.id
            ))
        })
    };
    Ok(Some(RecordedEvent {
        id: stored.id,
        version: stored.revision,
        position: stored.position,
        event_type: stored.event_type.to_owned(),
        data: json(stored.data, "data")?,
        metadata: json(stored.custom_metadata, "metadata")?,
        recorded_at: stored.created,
        stream,
    }))
}

/// The server-side narrowing of `$all` for `filter`, as a stream-name regex. The caller still
/// applies `filter` itself; this only spares the network what would be dropped.
pub(crate) fn stream_regex(filter: &EventFilter) -> String {
    match filter {
        EventFilter::All => NON_SYSTEM_STREAMS.to_owned(),
        // A category is the text before the first `-`, so `order` covers `order-1` and `order`.
        EventFilter::Category(category) => format!("^{}(-|$)", escape_regex(category)),
        EventFilter::Stream(stream) => format!("^{}$", escape_regex(stream.as_str())),
    }
}

pub(crate) fn subscription_filter(filter: &EventFilter) -> SubscriptionFilter {
    SubscriptionFilter::on_stream_name().regex(stream_regex(filter))
}

/// Escapes .NET regex metacharacters only: .NET refuses an escaped letter, digit or `_`.
fn escape_regex(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    fn stream(name: &str) -> StreamName {
        StreamName::parse(name).unwrap()
    }

    fn stored<'a>(stream: &'a str, event_type: &'a str, data: &'a [u8]) -> StoredEvent<'a> {
        StoredEvent {
            stream,
            id: Uuid::nil(),
            revision: 4,
            event_type,
            data,
            custom_metadata: br#"{"correlation_id":"c"}"#,
            position: Position::new(900, 880),
            created: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    #[test]
    fn expected_versions_map_onto_stream_states_and_back() {
        for expected in [
            ExpectedVersion::Any,
            ExpectedVersion::NoStream,
            ExpectedVersion::StreamExists,
            ExpectedVersion::Exact(0),
            ExpectedVersion::Exact(i64::MAX as u64),
        ] {
            let state = stream_state(expected).unwrap();
            assert_eq!(expected_version(state), expected);
        }
        assert_eq!(
            stream_state(ExpectedVersion::Exact(7)),
            Some(StreamState::StreamRevision(7))
        );
    }

    #[test]
    fn versions_the_server_would_misread_are_never_sent() {
        assert_eq!(stream_state(ExpectedVersion::Exact(u64::MAX)), None);
        assert_eq!(stream_state(ExpectedVersion::Exact(1 << 63)), None);
    }

    #[test]
    fn wrong_expected_version_is_a_conflict_with_the_actual_version() {
        let s = stream("order-1");
        let wrong = |current| ::kurrentdb::Error::WrongExpectedVersion {
            expected: StreamState::StreamRevision(1),
            current,
        };
        match append_error(&s, wrong(CurrentRevision::Current(5))) {
            StoreError::Conflict {
                stream,
                expected,
                actual,
            } => {
                assert_eq!(stream, s);
                assert_eq!(expected, ExpectedVersion::Exact(1));
                assert_eq!(actual, Some(5));
            }
            other => panic!("{other:?}"),
        }
        let missing = append_error(&s, wrong(CurrentRevision::NoStream));
        assert!(
            matches!(missing, StoreError::Conflict { actual: None, .. }),
            "{missing:?}"
        );
    }

    #[test]
    fn outages_are_unavailable_and_the_rest_internal() {
        use ::kurrentdb::Error as E;
        let unavailable = [
            E::ConnectionClosed,
            E::DeadlineExceeded,
            E::GrpcConnectionError(
                ::kurrentdb::GrpcConnectionError::MaxDiscoveryAttemptReached(10),
            ),
            E::ServerError("status: Unavailable, message: \"tcp connect error\"".into()),
        ];
        for error in unavailable {
            let mapped = store_error(error);
            assert!(mapped.is_unavailable(), "{mapped:?}");
        }
        let internal = [
            E::AccessDenied,
            E::ResourceDeleted,
            E::InternalParsingError("bad".into()),
            E::ServerError("status: Internal, message: \"boom\"".into()),
        ];
        for error in internal {
            let mapped = store_error(error);
            assert!(matches!(mapped, StoreError::Internal(_)), "{mapped:?}");
        }
        let not_append = store_error(E::WrongExpectedVersion {
            expected: StreamState::Any,
            current: CurrentRevision::NoStream,
        });
        assert!(matches!(not_append, StoreError::Internal(_)));
    }

    #[test]
    fn stored_events_map_field_by_field() {
        let event = recorded_event::<Value>(stored("order-1", "OrderPlaced", br#"{"n":1}"#))
            .unwrap()
            .unwrap();
        assert_eq!(event.stream, stream("order-1"));
        assert_eq!(
            (event.version, event.position),
            (4, Position::new(900, 880))
        );
        assert_eq!(event.event_type, "OrderPlaced");
        assert_eq!(event.data, json!({ "n": 1 }));
        assert_eq!(event.metadata, json!({ "correlation_id": "c" }));
        assert_eq!(event.recorded_at, DateTime::<Utc>::UNIX_EPOCH);
        // As text, the stored bytes come through unchanged.
        let raw = recorded_event::<Box<RawValue>>(stored("order-1", "OrderPlaced", br#"{"n":1}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            (raw.data.get(), raw.position),
            (r#"{"n":1}"#, event.position)
        );
    }

    #[test]
    fn system_streams_and_events_are_dropped() {
        for (s, t) in [
            ("$stats-127.0.0.1:2113", "$statsCollected"),
            ("$$order-1", "$metadata"),
            ("order-1", "$>"),
        ] {
            assert!(
                recorded_event::<Value>(stored(s, t, b"{}"))
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[test]
    fn missing_metadata_reads_as_empty_and_foreign_data_is_an_error() {
        let mut bare = stored("order-1", "Plain", b"{}");
        bare.custom_metadata = b"";
        let event = recorded_event::<Value>(bare).unwrap().unwrap();
        assert_eq!(event.metadata, json!({}));
        let raw = recorded_event::<Box<RawValue>>(bare).unwrap().unwrap();
        assert_eq!(raw.metadata.get(), "{}");
        let binary = recorded_event::<Value>(stored("order-1", "Blob", &[0xff, 0x00]));
        assert!(matches!(binary, Err(StoreError::Internal(_))));
        let binary = recorded_event::<Box<RawValue>>(stored("order-1", "Blob", &[0xff, 0x00]));
        assert!(matches!(binary, Err(StoreError::Internal(_))));
        let odd_name = recorded_event::<Value>(stored("has space", "Plain", b"{}"));
        assert!(matches!(odd_name, Err(StoreError::Internal(_))));
    }

    #[test]
    fn filters_become_stream_name_regexes() {
        assert_eq!(stream_regex(&EventFilter::All), "^[^$]");
        assert_eq!(
            stream_regex(&EventFilter::Category("order".into())),
            "^order(-|$)"
        );
        assert_eq!(
            stream_regex(&EventFilter::Stream(stream("product-A.1+x_y"))),
            r"^product-A\.1\+x_y$"
        );
        assert_eq!(
            stream_regex(&EventFilter::Stream(stream("a$(b)[c]{d}|e*f?g^h#i\\j"))),
            r"^a\$\(b\)\[c\]\{d\}\|e\*f\?g\^h\#i\\j$"
        );
        let filter = format!("{:?}", subscription_filter(&EventFilter::All));
        assert!(filter.contains("based_on_stream: true"), "{filter}");
        assert!(filter.contains(r#"regex: Some("^[^$]")"#), "{filter}");
    }

    #[test]
    fn positions_cross_unchanged() {
        let p = Position::new(u64::MAX - 1, 3);
        assert_eq!(from_kurrent_position(to_kurrent_position(p)), p);
    }
}
