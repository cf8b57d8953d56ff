//! The contract every event-store adapter passes, written once as functions over
//! `&dyn EventStore`. Each adapter's test file instantiates them all with
//! `contract_tests!(fixture_expression)`, where the fixture gives each test a fresh, empty store.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use orderly_event_store::{
    Append, AppendResult, Direction, EventFilter, EventStore, ExpectedVersion, InvalidInput,
    MAX_EVENT_BYTES, NewEvent, Position, RecordedEvent, StoreError, StreamName, Subscription,
};
use serde_json::json;
use uuid::Uuid;

/// Gives a test a fresh store and keeps whatever backs it alive for the test's duration.
pub trait Fixture: Send + Sync + 'static {
    fn store(&self) -> Arc<dyn EventStore>;
}

#[macro_export]
macro_rules! contract_tests {
    ($fixture:expr) => {
        $crate::contract_tests!(@each $fixture;
            appending_to_a_new_stream_starts_at_version_zero,
            no_stream_expectation_refuses_an_existing_stream,
            stream_exists_expectation_refuses_a_missing_stream,
            exact_expectation_refuses_any_other_version,
            any_expectation_always_appends,
            a_multi_event_append_is_all_or_nothing,
            reappending_the_same_event_ids_writes_nothing,
            reusing_event_ids_elsewhere_is_refused,
            several_appends_at_once_answer_each_as_if_sent_alone,
            appends_to_distinct_streams_at_once_keep_the_order_sent,
            streams_read_forwards_and_backwards,
            several_streams_read_at_once_page_by_page,
            the_log_reads_in_append_order_and_pages_by_position,
            the_log_reads_as_stored_text_the_same_as_parsed,
            head_is_the_last_position,
            subscriptions_catch_up_then_follow_live_with_filters,
            subscribing_from_a_position_starts_after_it,
            payload_and_metadata_round_trip_including_a_one_mib_event,
            bad_input_is_refused_and_nothing_is_written,
            concurrent_writers_are_seen_exactly_once_in_one_order
        );
    };
    (@each $fixture:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fixture = $fixture.await;
                contract::$name(fixture.store()).await;
            }
        )*
    };
}

pub fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("test stream names are valid")
}

pub fn event(event_type: &str, data: serde_json::Value) -> NewEvent {
    NewEvent::new(event_type, data).with_metadata(json!({ "correlation_id": Uuid::now_v7() }))
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event("Numbered", json!({ "n": i })))
        .collect()
}

fn append(stream: &StreamName, expected: ExpectedVersion, events: Vec<NewEvent>) -> Append {
    Append {
        stream: stream.clone(),
        expected,
        events,
    }
}

/// The next event of a subscription, failing the test if none comes within ten seconds.
pub async fn next(sub: &mut Subscription) -> RecordedEvent {
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(error))) => panic!("subscription failed: {error}"),
        Ok(None) => panic!("subscription ended"),
        Err(_) => panic!("no event within 10 s"),
    }
}

/// Every event of the whole log matching `filter`, read page by page.
pub async fn read_everything(store: &dyn EventStore, filter: &EventFilter) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, filter, 7).await.expect("read_all");
        let Some(last) = page.last() else { return all };
        after = last.position;
        all.extend(page);
    }
}

/// Waits until the whole log has reached `position`. A store may hold readers back briefly while
/// older transactions are in flight (in PostgreSQL, any transaction of the cluster, including
/// other tests' databases), so reads right after a write must wait for it to settle.
pub async fn settle(store: &dyn EventStore, position: Position) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.head().await.expect("head") < position {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log never reached {position}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn assert_conflict(result: Result<impl std::fmt::Debug, StoreError>, want_actual: Option<u64>) {
    match result {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, want_actual),
        other => panic!("expected a conflict with actual {want_actual:?}, got {other:?}"),
    }
}

pub async fn appending_to_a_new_stream_starts_at_version_zero(store: Arc<dyn EventStore>) {
    let s = stream("order-new");
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    let first = store
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    assert_eq!(first.next_expected_version, 0);
    assert!(!first.deduplicated);
    let second = store
        .append(&s, ExpectedVersion::Exact(0), events(2))
        .await
        .unwrap();
    assert_eq!(second.next_expected_version, 2);
    assert!(second.first_position > first.position);
    assert!(second.position > second.first_position);
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(2));
}

pub async fn no_stream_expectation_refuses_an_existing_stream(store: Arc<dyn EventStore>) {
    let s = stream("order-nostream");
    store
        .append(&s, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    assert_conflict(
        store.append(&s, ExpectedVersion::NoStream, events(1)).await,
        Some(1),
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(1));
}

pub async fn stream_exists_expectation_refuses_a_missing_stream(store: Arc<dyn EventStore>) {
    let s = stream("order-exists");
    assert_conflict(
        store
            .append(&s, ExpectedVersion::StreamExists, events(1))
            .await,
        None,
    );
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    store
        .append(&s, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    let r = store
        .append(&s, ExpectedVersion::StreamExists, events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, 1);
}

pub async fn exact_expectation_refuses_any_other_version(store: Arc<dyn EventStore>) {
    let s = stream("order-exact");
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(0), events(1)).await,
        None,
    );
    store
        .append(&s, ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(1), events(1)).await,
        Some(2),
    );
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(3), events(1)).await,
        Some(2),
    );
    assert_conflict(
        store
            .append(&s, ExpectedVersion::Exact(u64::MAX), events(1))
            .await,
        Some(2),
    );
    let r = store
        .append(&s, ExpectedVersion::Exact(2), events(1))
        .await
        .unwrap();
    assert_eq!(r.next_expected_version, 3);
}

pub async fn any_expectation_always_appends(store: Arc<dyn EventStore>) {
    let s = stream("order-any");
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(1))
            .await
            .unwrap()
            .next_expected_version,
        0
    );
    assert_eq!(
        store
            .append(&s, ExpectedVersion::Any, events(2))
            .await
            .unwrap()
            .next_expected_version,
        2
    );
}

pub async fn a_multi_event_append_is_all_or_nothing(store: Arc<dyn EventStore>) {
    let s = stream("order-atomic");
    let other = stream("order-atomic2");
    store
        .append(&s, ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    let last = store
        .append(&other, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    settle(&*store, last.position).await;
    let before = read_everything(&*store, &EventFilter::All).await;
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(0), events(5)).await,
        Some(2),
    );
    assert_eq!(
        read_everything(&*store, &EventFilter::All).await,
        before,
        "a refused append wrote something"
    );
    // The three events of the first append sit together in the log, in version order.
    let versions: Vec<(String, u64)> = before
        .iter()
        .map(|e| (e.stream.to_string(), e.version))
        .collect();
    let first_three: Vec<(String, u64)> = (0..3).map(|v| ("order-atomic".to_owned(), v)).collect();
    assert_eq!(versions[..3], first_three[..]);
}

pub async fn reappending_the_same_event_ids_writes_nothing(store: Arc<dyn EventStore>) {
    let s = stream("order-retry");
    let batch = events(3);
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(again.deduplicated);
    assert_eq!(
        (
            again.next_expected_version,
            again.first_position,
            again.position
        ),
        (
            first.next_expected_version,
            first.first_position,
            first.position
        )
    );
    // A retry that raced later appends, sent with `Any`, is recognised too.
    store
        .append(&s, ExpectedVersion::Exact(2), events(1))
        .await
        .unwrap();
    let later = store
        .append(&s, ExpectedVersion::Any, batch.clone())
        .await
        .unwrap();
    assert!(later.deduplicated);
    assert_eq!(later.position, first.position);
    // So is the re-send of a part of it, where it was written.
    let tail = store
        .append(&s, ExpectedVersion::Exact(0), batch[1..].to_vec())
        .await
        .unwrap();
    assert!(tail.deduplicated);
    assert_eq!(tail.position, first.position);
    let single = events(1);
    let one = store
        .append(&s, ExpectedVersion::Exact(3), single.clone())
        .await
        .unwrap();
    let one_again = store
        .append(&s, ExpectedVersion::Exact(3), single)
        .await
        .unwrap();
    assert!(one_again.deduplicated);
    assert_eq!(one_again.position, one.position);
    assert_eq!(
        store
            .read_stream(&s, Direction::Forwards, None, 100)
            .await
            .unwrap()
            .len(),
        5
    );
    // The same ids sent with an expectation that no longer holds are a conflict, not a write.
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(0), batch).await,
        Some(4),
    );
}

pub async fn several_appends_at_once_answer_each_as_if_sent_alone(store: Arc<dyn EventStore>) {
    let (a, b, c) = (
        stream("order-many1"),
        stream("order-many2"),
        stream("order-many3"),
    );
    store
        .append(&c, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let (first_a, first_b) = (events(2), events(1));
    let batch = vec![
        append(&a, ExpectedVersion::NoStream, first_a.clone()),
        append(&b, ExpectedVersion::NoStream, first_b.clone()),
        // After the first append of this call: later appends see the earlier ones.
        append(&a, ExpectedVersion::Exact(1), events(1)),
    ];
    let results = store.append_many(batch).await;
    let results: Vec<AppendResult> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        results
            .iter()
            .map(|r| r.next_expected_version)
            .collect::<Vec<_>>(),
        [1, 0, 2]
    );
    assert!(
        results
            .windows(2)
            .all(|w| w[0].position < w[1].first_position)
    );
    settle(&*store, results[2].position).await;
    let log: Vec<(String, u64)> = read_everything(&*store, &EventFilter::All)
        .await
        .iter()
        .map(|e| (e.stream.to_string(), e.version))
        .collect();
    let want: Vec<(String, u64)> = [
        ("order-many3", 0),
        ("order-many3", 1),
        ("order-many1", 0),
        ("order-many1", 1),
        ("order-many2", 0),
        ("order-many1", 2),
    ]
    .iter()
    .map(|(s, v)| ((*s).to_owned(), *v))
    .collect();
    assert_eq!(
        log, want,
        "the log holds each append once, in the order sent"
    );

    // One refused among several: the others are written, the refused one is a conflict.
    let refused = store
        .append_many(vec![
            append(&b, ExpectedVersion::Exact(0), events(1)),
            append(&c, ExpectedVersion::Exact(0), events(1)),
            append(&a, ExpectedVersion::Exact(2), events(1)),
        ])
        .await;
    assert!(refused[0].is_ok(), "{:?}", refused[0]);
    assert_conflict(refused.into_iter().nth(1).expect("three answers"), Some(1));
    assert_eq!(store.stream_version(&b).await.unwrap(), Some(1));
    assert_eq!(store.stream_version(&a).await.unwrap(), Some(3));
    assert_eq!(store.stream_version(&c).await.unwrap(), Some(1));

    // Sent again, the first batch's appends are replays: nothing written, the first answers.
    let again = store
        .append_many(vec![
            append(&a, ExpectedVersion::NoStream, first_a),
            append(&b, ExpectedVersion::NoStream, first_b),
        ])
        .await;
    for (again, first) in again.into_iter().zip(&results) {
        let again = again.unwrap();
        assert!(again.deduplicated);
        assert_eq!(again.position, first.position);
    }
    assert!(store.append_many(Vec::new()).await.is_empty());
}

pub async fn appends_to_distinct_streams_at_once_keep_the_order_sent(store: Arc<dyn EventStore>) {
    let names = [
        "order-apart1",
        "order-apart2",
        "order-apart3",
        "order-apart4",
    ];
    let [a, b, c, d] = names.map(stream);
    let before = store
        .append(&c, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let results = store
        .append_many(vec![
            append(&a, ExpectedVersion::NoStream, events(3)),
            append(&b, ExpectedVersion::Any, events(1)),
            // Decided on a state the stream is no longer in: refused alone.
            append(&d, ExpectedVersion::Exact(4), events(1)),
            append(&c, ExpectedVersion::Exact(1), events(2)),
        ])
        .await;
    let [a_written, b_written, d_refused, c_written]: [_; 4] =
        results.try_into().expect("four answers");
    assert_conflict(d_refused, None);
    let written = [a_written, b_written, c_written].map(Result::unwrap);
    assert_eq!(written.map(|r| r.next_expected_version), [2, 0, 3]);
    assert!(
        written
            .windows(2)
            .all(|w| w[0].position < w[1].first_position),
        "each append's events follow the previous append's: {written:?}"
    );
    settle(&*store, written[2].position).await;
    let log: Vec<(String, u64, u64)> = read_everything(&*store, &EventFilter::All)
        .await
        .iter()
        .filter(|e| e.position > before.position)
        .map(|e| {
            (
                e.stream.to_string(),
                e.version,
                e.data["n"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [
        ("order-apart1", 0, 0),
        ("order-apart1", 1, 1),
        ("order-apart1", 2, 2),
        ("order-apart2", 0, 0),
        ("order-apart3", 2, 0),
        ("order-apart3", 3, 1),
    ]
    .map(|(s, v, n)| (s.to_owned(), v, n));
    assert_eq!(log, want, "every event once, in the order sent");
    assert_eq!(store.stream_version(&d).await.unwrap(), None);
}

pub async fn reusing_event_ids_elsewhere_is_refused(store: Arc<dyn EventStore>) {
    let s = stream("order-ids");
    let batch = events(2);
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    settle(&*store, first.position).await;
    let elsewhere = store
        .append(&stream("order-ids2"), ExpectedVersion::Any, batch.clone())
        .await;
    assert!(
        matches!(elsewhere, Err(StoreError::DuplicateEventId { .. })),
        "{elsewhere:?}"
    );
    let mut partly = events(1);
    partly.push(batch[1].clone());
    let partial = store.append(&s, ExpectedVersion::Any, partly).await;
    assert!(
        matches!(partial, Err(StoreError::DuplicateEventId { .. })),
        "{partial:?}"
    );
    assert_eq!(read_everything(&*store, &EventFilter::All).await.len(), 2);
}

pub async fn several_streams_read_at_once_page_by_page(store: Arc<dyn EventStore>) {
    let (a, b, missing) = (
        stream("product-A"),
        stream("product-B"),
        stream("product-MISSING"),
    );
    store
        .append(&a, ExpectedVersion::NoStream, events(6))
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let requests = [(b.clone(), 1), (missing.clone(), 0), (a.clone(), 2)];
    let pages = store.read_streams(&requests, 3).await.unwrap();
    let read: Vec<Vec<(String, u64)>> = pages
        .iter()
        .map(|page| {
            page.iter()
                .map(|e| (e.stream.to_string(), e.version))
                .collect()
        })
        .collect();
    let expected: Vec<Vec<(String, u64)>> = vec![
        vec![("product-B".into(), 1)],
        vec![],
        (2..5).map(|v| ("product-A".into(), v)).collect(),
    ];
    assert_eq!(
        read, expected,
        "one page per request, in request order, each limited"
    );
    assert_eq!(pages[2][0].data, json!({ "n": 2 }));
    assert!(store.read_streams(&[], 3).await.unwrap().is_empty());
}

pub async fn streams_read_forwards_and_backwards(store: Arc<dyn EventStore>) {
    let s = stream("order-reads");
    store
        .append(&s, ExpectedVersion::NoStream, events(10))
        .await
        .unwrap();
    store
        .append(&stream("order-noise"), ExpectedVersion::Any, events(3))
        .await
        .unwrap();
    let versions = |evs: Vec<RecordedEvent>| evs.into_iter().map(|e| e.version).collect::<Vec<_>>();
    let fwd = store
        .read_stream(&s, Direction::Forwards, Some(3), 4)
        .await
        .unwrap();
    assert_eq!(versions(fwd), vec![3, 4, 5, 6]);
    let all = store
        .read_stream(&s, Direction::Forwards, None, 100)
        .await
        .unwrap();
    assert_eq!(versions(all.clone()), (0..10).collect::<Vec<_>>());
    assert!(all.iter().all(|e| e.stream == s));
    assert_eq!(all[4].data, json!({ "n": 4 }));
    let back = store
        .read_stream(&s, Direction::Backwards, Some(6), 3)
        .await
        .unwrap();
    assert_eq!(versions(back), vec![6, 5, 4]);
    let last = store
        .read_stream(&s, Direction::Backwards, None, 1)
        .await
        .unwrap();
    assert_eq!(versions(last), vec![9]);
    let past_end = store
        .read_stream(&s, Direction::Forwards, Some(10), 5)
        .await
        .unwrap();
    assert!(past_end.is_empty());
    let missing = store
        .read_stream(&stream("order-missing"), Direction::Forwards, None, 5)
        .await
        .unwrap();
    assert!(missing.is_empty());
}

pub async fn the_log_reads_in_append_order_and_pages_by_position(store: Arc<dyn EventStore>) {
    let mut written = Vec::new();
    let mut last = Position::START;
    for i in 0..12 {
        let s = stream(&format!(
            "{}-{}",
            ["order", "product", "payment"][i % 3],
            i % 4
        ));
        let batch = events(1 + i % 2);
        written.extend(batch.iter().map(|e| e.id));
        last = store
            .append(&s, ExpectedVersion::Any, batch)
            .await
            .unwrap()
            .position;
    }
    settle(&*store, last).await;
    let log = read_everything(&*store, &EventFilter::All).await;
    assert_eq!(log.iter().map(|e| e.id).collect::<Vec<_>>(), written);
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "positions must increase"
    );
    let middle = log[5].position;
    let rest = store
        .read_all(middle, &EventFilter::All, 1000)
        .await
        .unwrap();
    assert_eq!(rest, log[6..].to_vec());
    let products = read_everything(&*store, &EventFilter::Category("product".into())).await;
    assert!(!products.is_empty());
    assert!(products.iter().all(|e| e.stream.category() == "product"));
    let one = read_everything(&*store, &EventFilter::Stream(stream("order-0"))).await;
    assert_eq!(
        one.iter().map(|e| e.version).collect::<Vec<_>>(),
        (0..one.len() as u64).collect::<Vec<_>>()
    );
}

pub async fn the_log_reads_as_stored_text_the_same_as_parsed(store: Arc<dyn EventStore>) {
    let mut last = Position::START;
    for (i, category) in ["order", "product", "order"].iter().enumerate() {
        let nested = event(
            "Nested",
            json!({ "i": i, "text": "é \"quoted\" \u{1F600}", "list": [1, 2.5, null, {"a": []}] }),
        );
        last = store
            .append(
                &stream(&format!("{category}-raw{i}")),
                ExpectedVersion::Any,
                vec![nested],
            )
            .await
            .unwrap()
            .position;
    }
    settle(&*store, last).await;
    for filter in [
        EventFilter::All,
        EventFilter::Category("order".into()),
        EventFilter::Stream(stream("product-raw1")),
    ] {
        let parsed = read_everything(&*store, &filter).await;
        let raw = store
            .read_all_raw(Position::START, &filter, 1000)
            .await
            .unwrap();
        assert!(!raw.is_empty(), "{filter:?}");
        assert_eq!(raw.len(), parsed.len(), "{filter:?}");
        for (raw, parsed) in raw.iter().zip(&parsed) {
            assert_eq!(
                (
                    raw.id,
                    &raw.stream,
                    raw.version,
                    raw.position,
                    &raw.event_type,
                    raw.recorded_at
                ),
                (
                    parsed.id,
                    &parsed.stream,
                    parsed.version,
                    parsed.position,
                    &parsed.event_type,
                    parsed.recorded_at
                ),
            );
            let data: serde_json::Value = serde_json::from_str(raw.data.get()).unwrap();
            let metadata: serde_json::Value = serde_json::from_str(raw.metadata.get()).unwrap();
            assert_eq!((&data, &metadata), (&parsed.data, &parsed.metadata));
        }
    }
    // Paging by position works the same way.
    let all = read_everything(&*store, &EventFilter::All).await;
    let rest = store
        .read_all_raw(all[0].position, &EventFilter::All, 1)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![all[1].id]
    );
}

pub async fn head_is_the_last_position(store: Arc<dyn EventStore>) {
    assert_eq!(store.head().await.unwrap(), Position::START);
    store
        .append(&stream("order-h1"), ExpectedVersion::Any, events(2))
        .await
        .unwrap();
    let r = store
        .append(&stream("order-h2"), ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    settle(&*store, r.position).await;
    assert_eq!(store.head().await.unwrap(), r.position);
    assert!(
        store
            .read_all(r.position, &EventFilter::All, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn subscriptions_catch_up_then_follow_live_with_filters(store: Arc<dyn EventStore>) {
    let (o1, o2, p1) = (stream("order-s1"), stream("order-s2"), stream("product-s1"));
    store
        .append(&o1, ExpectedVersion::Any, events(2))
        .await
        .unwrap();
    store
        .append(&p1, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    store
        .append(&o2, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let mut all = store
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    let mut orders = store
        .subscribe(Position::START, EventFilter::Category("order".into()))
        .await
        .unwrap();
    let mut just_o1 = store
        .subscribe(Position::START, EventFilter::Stream(o1.clone()))
        .await
        .unwrap();
    // Catch-up.
    for _ in 0..4 {
        next(&mut all).await;
    }
    for _ in 0..3 {
        assert_eq!(next(&mut orders).await.stream.category(), "order");
    }
    for v in 0..2 {
        let e = next(&mut just_o1).await;
        assert_eq!((e.stream.clone(), e.version), (o1.clone(), v));
    }
    // Live.
    store
        .append(&p1, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    store
        .append(&o1, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let live: Vec<String> = vec![next(&mut all).await, next(&mut all).await]
        .into_iter()
        .map(|e| e.stream.to_string())
        .collect();
    assert_eq!(live, vec!["product-s1", "order-s1"]);
    let e = next(&mut orders).await;
    assert_eq!(
        (e.stream.to_string(), e.version),
        ("order-s1".to_owned(), 2)
    );
    let e = next(&mut just_o1).await;
    assert_eq!(
        (e.stream.to_string(), e.version),
        ("order-s1".to_owned(), 2)
    );
}

pub async fn subscribing_from_a_position_starts_after_it(store: Arc<dyn EventStore>) {
    let s = stream("order-from");
    let first = store
        .append(&s, ExpectedVersion::Any, events(3))
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let mut sub = store
        .subscribe(first.position, EventFilter::All)
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.version, 3);
    let head = store.head().await.unwrap();
    let mut from_now = store.subscribe(head, EventFilter::All).await.unwrap();
    store
        .append(&s, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    assert_eq!(next(&mut from_now).await.version, 4);
}

pub async fn payload_and_metadata_round_trip_including_a_one_mib_event(store: Arc<dyn EventStore>) {
    let s = stream("order-roundtrip");
    let data = json!({
        "text": "zoë 🚚 \"quoted\" \\ back\nslash",
        "nested": { "list": [1, 2.5, -3, null, true], "empty": {} },
        "big": 9_007_199_254_740_991_i64,
    });
    let metadata =
        json!({ "correlation_id": Uuid::now_v7(), "actor": "customer-1", "traceparent": null });
    let one_mib = json!({ "blob": "x".repeat(1024 * 1024) });
    let batch = vec![
        NewEvent::new("Shaped", data.clone()).with_metadata(metadata.clone()),
        NewEvent::new("Large", one_mib.clone()),
    ];
    let ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
    store
        .append(&s, ExpectedVersion::NoStream, batch)
        .await
        .unwrap();
    let read = store
        .read_stream(&s, Direction::Forwards, None, 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(
        (read[0].id, read[0].event_type.as_str()),
        (ids[0], "Shaped")
    );
    assert_eq!(read[0].data, data);
    assert_eq!(read[0].metadata, metadata);
    assert_eq!((read[1].id, read[1].event_type.as_str()), (ids[1], "Large"));
    assert_eq!(read[1].data, one_mib);
    let age = chrono::Utc::now() - read[0].recorded_at;
    assert!(
        age.num_seconds().abs() < 60,
        "recorded_at is the time of the append"
    );
}

pub async fn bad_input_is_refused_and_nothing_is_written(store: Arc<dyn EventStore>) {
    let s = stream("order-bad");
    let empty = store.append(&s, ExpectedVersion::Any, vec![]).await;
    assert!(
        matches!(
            empty,
            Err(StoreError::InvalidInput(InvalidInput::EmptyAppend))
        ),
        "{empty:?}"
    );
    let huge = vec![
        event("Fine", json!({})),
        NewEvent::new("Huge", json!("y".repeat(MAX_EVENT_BYTES + 1))),
    ];
    let huge = store.append(&s, ExpectedVersion::Any, huge).await;
    assert!(
        matches!(
            huge,
            Err(StoreError::InvalidInput(InvalidInput::EventTooLarge {
                index: 1,
                ..
            }))
        ),
        "{huge:?}"
    );
    let bad_type = store
        .append(&s, ExpectedVersion::Any, vec![event("", json!({}))])
        .await;
    assert!(
        matches!(
            bad_type,
            Err(StoreError::InvalidInput(InvalidInput::EventType { .. }))
        ),
        "{bad_type:?}"
    );
    let e = event("Twice", json!({}));
    let twice = store
        .append(&s, ExpectedVersion::Any, vec![e.clone(), e])
        .await;
    assert!(
        matches!(
            twice,
            Err(StoreError::InvalidInput(
                InvalidInput::RepeatedEventId { .. }
            ))
        ),
        "{twice:?}"
    );
    for name in ["", "$all", "has space", "-leading"] {
        let err = StreamName::parse(name).unwrap_err();
        assert!(err.to_string().contains("invalid stream name"), "{err}");
    }
    let token = "not-a-token".parse::<Position>().unwrap_err();
    assert!(
        token.to_string().contains("invalid position token"),
        "{token}"
    );
    assert!(read_everything(&*store, &EventFilter::All).await.is_empty());
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
}

/// For a store whose server is unreachable: writes and reads fail as `Unavailable` (retry
/// later), never as a conflict or an internal error.
pub async fn an_unreachable_store_reports_unavailable(store: &dyn EventStore) {
    let append = store
        .append(
            &stream("order-x"),
            ExpectedVersion::Any,
            vec![event("X", json!({}))],
        )
        .await;
    assert!(
        matches!(append, Err(StoreError::Unavailable(_))),
        "{append:?}"
    );
    let head = store.head().await;
    assert!(matches!(head, Err(StoreError::Unavailable(_))), "{head:?}");
}

/// One append a writer task made and the store acknowledged.
struct Acked {
    stream: StreamName,
    position: Position,
    expected: ExpectedVersion,
    ids: Vec<Uuid>,
}

pub async fn concurrent_writers_are_seen_exactly_once_in_one_order(store: Arc<dyn EventStore>) {
    const TASKS: usize = 8;
    const APPENDS: usize = 30;
    const STREAMS: usize = 5;
    let mut live = store
        .subscribe(
            store.head().await.unwrap(),
            EventFilter::Category("conc".into()),
        )
        .await
        .unwrap();

    let writers = (0..TASKS).map(|task| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut conflicts = Vec::new();
            for j in 0..APPENDS {
                let s = stream(&format!("conc-{}", (task + j) % STREAMS));
                let expected = match store.stream_version(&s).await.unwrap() {
                    None => ExpectedVersion::NoStream,
                    Some(v) => ExpectedVersion::Exact(v),
                };
                let batch = events(1 + (task + j) % 3);
                let ids = batch.iter().map(|e| e.id).collect();
                match store.append(&s, expected, batch).await {
                    Ok(r) => acked.push(Acked {
                        stream: s,
                        position: r.position,
                        expected,
                        ids,
                    }),
                    Err(StoreError::Conflict { .. }) => conflicts.push((s, expected)),
                    Err(other) => panic!("append failed: {other}"),
                }
                tokio::task::yield_now().await;
            }
            (acked, conflicts)
        })
    });
    let mut acked = Vec::new();
    let mut conflicts = Vec::new();
    for writer in futures::future::join_all(writers).await {
        let (a, c) = writer.expect("writer task");
        acked.extend(a);
        conflicts.extend(c);
    }
    let newest = acked
        .iter()
        .map(|a| a.position)
        .max()
        .expect("some appends succeed");
    settle(&*store, newest).await;
    let acked_ids: HashSet<Uuid> = acked.iter().flat_map(|a| a.ids.iter().copied()).collect();

    // The log holds every acknowledged event once, and nothing else.
    let log = read_everything(&*store, &EventFilter::Category("conc".into())).await;
    let log_ids: Vec<Uuid> = log.iter().map(|e| e.id).collect();
    assert_eq!(
        log_ids.len(),
        acked_ids.len(),
        "log length differs from acknowledged events"
    );
    assert_eq!(log_ids.iter().copied().collect::<HashSet<_>>(), acked_ids);

    // The live subscriber saw the same events, in the same order, exactly once.
    let mut seen = Vec::with_capacity(log_ids.len());
    while seen.len() < log_ids.len() {
        seen.push(next(&mut live).await.id);
    }
    assert_eq!(seen, log_ids, "subscriber order differs from the log");
    let extra = tokio::time::timeout(Duration::from_millis(200), live.next()).await;
    assert!(
        extra.is_err(),
        "subscriber delivered an event beyond the acknowledged ones: {extra:?}"
    );

    // One global order that agrees with every stream's order: positions increase, and each
    // stream's versions appear as 0, 1, 2, ... with every append's events side by side.
    assert!(log.windows(2).all(|w| w[0].position < w[1].position));
    let mut next_version: HashMap<&StreamName, u64> = HashMap::new();
    for e in &log {
        let want = next_version.entry(&e.stream).or_insert(0);
        assert_eq!(
            e.version, *want,
            "stream {} out of order in the log",
            e.stream
        );
        *want += 1;
    }
    let index_of: HashMap<Uuid, usize> =
        log_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    for a in &acked {
        let at: Vec<usize> = a.ids.iter().map(|id| index_of[id]).collect();
        assert!(
            at.windows(2).all(|w| w[1] == w[0] + 1),
            "an append's events were split in the log"
        );
    }
    for (s, want) in &next_version {
        let read = store
            .read_stream(s, Direction::Forwards, None, 10_000)
            .await
            .unwrap();
        let from_log: Vec<Uuid> = log
            .iter()
            .filter(|e| &e.stream == *s)
            .map(|e| e.id)
            .collect();
        assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), from_log);
        assert_eq!(read.len() as u64, *want);
    }

    // A conflict is legitimate only where another writer succeeded with the same expectation.
    let won: BTreeMap<(String, String), usize> = acked.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry((a.stream.to_string(), format!("{:?}", a.expected)))
            .or_default() += 1;
        m
    });
    for (s, expected) in &conflicts {
        let key = (s.to_string(), format!("{expected:?}"));
        assert_eq!(
            won.get(&key),
            Some(&1),
            "conflict on {s} at {expected:?} without a winner"
        );
    }
    for (key, count) in &won {
        assert_eq!(
            *count, 1,
            "two appends both succeeded with the same expectation {key:?}"
        );
    }
    eprintln!(
        "{} appends acknowledged, {} conflicts",
        acked.len(),
        conflicts.len()
    );
}
