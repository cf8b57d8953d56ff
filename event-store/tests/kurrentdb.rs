//! The contract suite against the KurrentDB adapter, when `ORDERLY_KURRENTDB_URL` points at a
//! server (`kurrentdb://admin:changeit@localhost:2113?tls=false`); without it every test says
//! that it skipped and passes. The server must allow appends of `MAX_APPEND_BYTES`
//! (`--max-append-size=8388608`) for the one-MiB event test.
//!
//! KurrentDB has no per-test database, and the contract reads the whole log expecting only its
//! own events. So each test talks to an [`Isolated`] view: every stream name it uses gets a
//! token of its own glued to the front (`order-1` becomes `t<token>order-1`, so the category
//! `order` becomes `t<token>order` and category filters still work), and everything read back
//! is narrowed to that token and stripped of it.

#![cfg(feature = "kurrentdb")]

mod contract;

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use contract::{Fixture, event, stream};
use futures::StreamExt;
use orderly_event_store::kurrentdb::KurrentDbEventStore;
use orderly_event_store::{
    Append, AppendResult, Direction, EventFilter, EventStore, ExpectedVersion, NewEvent, Position,
    RawRecordedEvent, RecordedEvent, StoreError, StreamName, Subscription,
};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

const URL_VAR: &str = "ORDERLY_KURRENTDB_URL";

/// The server's URL, or `None` after saying on the terminal that the test did not run. Written
/// to stderr directly so that the line shows even for a passing test, whose printed output the
/// test harness would swallow.
fn server_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped: {URL_VAR} is not set; the KurrentDB contract suite did not run"
            );
            None
        }
    }
}

/// The fixture future when a server is configured. `contract_tests!` awaits whatever it is
/// given, so `match live() { .., None => return }` below ends a skipped test before it starts.
fn live() -> Option<impl Future<Output = Isolated>> {
    let url = server_url()?;
    Some(async move {
        let store = KurrentDbEventStore::connect(&url).expect("a KurrentDB client");
        Isolated::new(store)
    })
}

contract_tests!(match live() {
    Some(fixture) => fixture,
    None => return,
});

/// A test's own slice of a shared server; see the file's header.
#[derive(Clone)]
struct Isolated {
    inner: KurrentDbEventStore,
    token: Arc<str>,
    /// Position of the last append made through this view: the view's head. The server's head
    /// moves with other tests' writes, so it cannot stand in here; `the_servers_head_...` below
    /// checks the adapter's own `head`.
    head: Arc<Mutex<Position>>,
}

impl Fixture for Isolated {
    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.clone())
    }
}

impl Isolated {
    fn new(inner: KurrentDbEventStore) -> Self {
        // Hex only: a `-` in the token would move the category boundary.
        let token = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
        Self {
            inner,
            token: token.into(),
            head: Arc::new(Mutex::new(Position::START)),
        }
    }

    fn wrap(&self, stream: &StreamName) -> StreamName {
        StreamName::parse(format!("{}{stream}", self.token)).expect("a prefixed name stays valid")
    }

    fn unwrap_name(&self, name: &str) -> Option<String> {
        name.strip_prefix(&*self.token).map(str::to_owned)
    }

    fn wrap_filter(&self, filter: &EventFilter) -> EventFilter {
        match filter {
            EventFilter::All => EventFilter::All,
            EventFilter::Category(category) => {
                EventFilter::Category(format!("{}{category}", self.token))
            }
            EventFilter::Stream(stream) => EventFilter::Stream(self.wrap(stream)),
        }
    }

    /// The event as this test wrote it, or `None` when another test (or anyone else) did.
    fn unwrap_event<J>(&self, mut event: RecordedEvent<J>) -> Option<RecordedEvent<J>> {
        let name = self.unwrap_name(event.stream.as_str())?;
        event.stream = StreamName::parse(name).expect("the test wrote a valid name");
        Some(event)
    }

    /// Pages of the shared log hold other tests' events too; keep reading pages (`read`, from
    /// a position) until `limit` of this test's are found or the log ends, so an empty answer
    /// still means "nothing more".
    async fn read_mine<J, Page>(
        &self,
        after: Position,
        limit: usize,
        read: impl Fn(Position) -> Page,
    ) -> Result<Vec<RecordedEvent<J>>, StoreError>
    where
        Page: Future<Output = Result<Vec<RecordedEvent<J>>, StoreError>>,
    {
        let mut mine = Vec::new();
        let mut from = after;
        while mine.len() < limit {
            let page = read(from).await?;
            let Some(last) = page.last() else { break };
            // The adapter's page is already filtered to this test's category or stream, but
            // not for `All`, where other tests' events take up room.
            from = last.position;
            let full = page.len() >= limit;
            mine.extend(page.into_iter().filter_map(|e| self.unwrap_event(e)));
            if !full {
                break;
            }
        }
        mine.truncate(limit);
        Ok(mine)
    }

    fn unwrap_error(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Conflict {
                stream,
                expected,
                actual,
            } => StoreError::Conflict {
                stream: self
                    .unwrap_name(stream.as_str())
                    .and_then(|n| StreamName::parse(n).ok())
                    .unwrap_or(stream),
                expected,
                actual,
            },
            StoreError::DuplicateEventId {
                id,
                stream,
                version,
            } => StoreError::DuplicateEventId {
                id,
                stream: self.unwrap_name(&stream).unwrap_or(stream),
                version,
            },
            other => other,
        }
    }
}

#[async_trait]
impl EventStore for Isolated {
    async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<AppendResult, StoreError>> {
        orderly_event_store::append_each(self, appends).await
    }

    async fn read_streams(
        &self,
        requests: &[(StreamName, u64)],
        limit: usize,
    ) -> Result<Vec<Vec<RecordedEvent>>, StoreError> {
        orderly_event_store::read_each(self, requests, limit).await
    }

    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let result = self
            .inner
            .append(&self.wrap(stream), expected, events)
            .await
            .map_err(|e| self.unwrap_error(e))?;
        let mut head = self.head.lock().expect("head lock");
        *head = (*head).max(result.position);
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        direction: Direction,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let events = self
            .inner
            .read_stream(&self.wrap(stream), direction, from, limit)
            .await?;
        Ok(events
            .into_iter()
            .filter_map(|e| self.unwrap_event(e))
            .collect())
    }

    async fn read_all(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let filter = self.wrap_filter(filter);
        let filter = &filter;
        self.read_mine(after, limit, |from| {
            self.inner.read_all(from, filter, limit)
        })
        .await
    }

    /// Through the adapter's own `read_all_raw`, so that the contract's text-read test checks
    /// the adapter and not a conversion made here.
    async fn read_all_raw(
        &self,
        after: Position,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<RawRecordedEvent>, StoreError> {
        let filter = self.wrap_filter(filter);
        let filter = &filter;
        self.read_mine(after, limit, |from| {
            self.inner.read_all_raw(from, filter, limit)
        })
        .await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(*self.head.lock().expect("head lock"))
    }

    async fn subscribe(
        &self,
        after: Position,
        filter: EventFilter,
    ) -> Result<Subscription, StoreError> {
        let mut feed = self
            .inner
            .subscribe(after, self.wrap_filter(&filter))
            .await?;
        // Other tests' events are dropped here, so the buffer only holds this test's.
        let (tx, rx) = mpsc::channel(64);
        let view = self.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = feed.next().await {
                let item = match item {
                    Ok(event) => match view.unwrap_event(event) {
                        Some(event) => Ok(event),
                        None => continue,
                    },
                    Err(error) => Err(error),
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::from_channel(rx, task))
    }
}

/// The adapter's own `head`, which the isolated view cannot use: right after an append it has
/// reached that append, and nothing of this test lies beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_head_reaches_the_last_append() {
    let Some(url) = server_url() else { return };
    let store = KurrentDbEventStore::connect(&url).unwrap();
    let s = stream(&format!("headcheck-{}", Uuid::new_v4().simple()));
    let written = store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![event("Probe", json!({}))],
        )
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    assert!(head >= written.position, "{head} < {}", written.position);
    let beyond = store
        .read_all(head, &EventFilter::Stream(s.clone()), 10)
        .await
        .unwrap();
    assert!(beyond.is_empty(), "{beyond:?}");
    let at = store
        .read_all(Position::START, &EventFilter::Stream(s), 10)
        .await
        .unwrap();
    assert_eq!(
        at.iter().map(|e| e.position).collect::<Vec<_>>(),
        vec![written.position]
    );
}

/// Runs everywhere: no server listens on port 1, so this exercises the real client's failure
/// path and its mapping to `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_as_unavailable() {
    let store = KurrentDbEventStore::connect(
        "kurrentdb://127.0.0.1:1?tls=false&maxDiscoverAttempts=1&discoveryInterval=100",
    )
    .unwrap();
    contract::an_unreachable_store_reports_unavailable(&store).await;
}

#[tokio::test]
async fn a_malformed_url_is_refused_at_connect() {
    let refused = KurrentDbEventStore::connect("postgres://nowhere");
    assert!(
        matches!(refused, Err(StoreError::Internal(_))),
        "{:?}",
        refused.err()
    );
}
