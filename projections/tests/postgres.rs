//! The read side against a real PostgreSQL: replay equivalence, crashes, poison events,
//! rebuilds under live writes, competing runners, indexes, notifications, the log tail.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use orderly_event_store::postgres::{PgEventStore, PgStoreOptions};
use orderly_event_store::{
    EventFilter, EventStore, ExpectedVersion, NewEvent, Position, StreamName,
};
use orderly_projections::{
    DeadLetterPolicy, ProjectionError, ProjectionHub, ProjectionName, ProjectionState,
    RebuildOptions, RebuildReport, Runner, RunnerOptions, dlq, rebuild, rebuild_many, status,
};
use orderly_test_support::TestDb;
use orderly_testdata::workload::{Workload, WorkloadOptions};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Fixture {
    db: TestDb,
    store: Arc<dyn EventStore>,
}

async fn fixture() -> Fixture {
    let db = TestDb::create(
        "projections",
        &orderly_projections::fingerprint_with_event_store(),
        |url| async move {
            orderly_projections::migrate_with_event_store(&url.parse()?)
                .await
                .map_err(Into::into)
        },
    )
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)");
    // A small pool: a dozen tests run at once against one server shared with other suites.
    let options = PgStoreOptions {
        pool_size: 4,
        ..PgStoreOptions::default()
    };
    let store = PgEventStore::new(db.config().clone(), options).expect("store");
    Fixture {
        db,
        store: Arc::new(store),
    }
}

/// Appends `appends` decisions of a seeded workload through the store, each at the expected
/// version its decider saw.
async fn write_workload(
    store: &dyn EventStore,
    workload: &mut Workload,
    appends: usize,
) -> Position {
    let mut last = Position::START;
    for _ in 0..appends {
        last = workload
            .next_append()
            .append_to(store)
            .await
            .expect("append")
            .position;
    }
    last
}

struct Running {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), ProjectionError>>>,
}

impl Running {
    async fn stop(self) -> Vec<Result<(), ProjectionError>> {
        self.stop.cancel();
        let mut results = Vec::new();
        for task in self.tasks {
            results.push(task.await.expect("runner task"));
        }
        results
    }
}

fn start(f: &Fixture, hub: &ProjectionHub, options: RunnerOptions) -> Running {
    let stop = CancellationToken::new();
    let tasks = ProjectionName::ALL
        .into_iter()
        .map(|name| {
            let runner = Runner::new(
                name,
                f.store.clone(),
                f.db.config().clone(),
                options.clone(),
                hub.clone(),
            );
            tokio::spawn(runner.run_until_stopped(stop.clone()))
        })
        .collect();
    Running { stop, tasks }
}

/// Parks for `projection`, with `error`, the first event of the log that `condition` (over
/// `events e`) selects, as a runner's batch parks one its handler failed on; the letter's id.
async fn park_where(
    client: &tokio_postgres::Client,
    projection: &str,
    error: &str,
    condition: &str,
) -> i64 {
    client
        .query_one(
            &format!(
                "insert into dead_letters (projection, event_id, stream, version,
                     position_commit, position_prepare, event_type, error)
                 select $1::text, e.event_id, e.stream, e.version, e.tx_id, e.seq,
                     e.event_type, $2::text
                 from events e where {condition}
                 limit 1
                 returning dead_letter_id"
            ),
            &[&projection, &error],
        )
        .await
        .unwrap_or_else(|e| panic!("no event where {condition}: {e}"))
        .get(0)
}

/// Retries dead letter `id` as `orderly dlq retry` does, on a connection of its own.
async fn retry(f: &Fixture, id: i64) -> dlq::RetryOutcome {
    let mut client = orderly_projections::connect(f.db.config(), "test")
        .await
        .expect("connect");
    dlq::retry(&mut client, f.store.as_ref(), id)
        .await
        .expect("retry")
}

/// Waits until every projection has passed the last event written. (`EventStore::head` may
/// trail it while a transaction of another test in the same cluster holds the horizon back.)
async fn caught_up(f: &Fixture, hub: &ProjectionHub) {
    let client = f.db.connect().await.expect("connect");
    // Every live checkpoint passes every position of the log (what consistency tokens name).
    let target = last_of(&client, "%").await;
    for name in ProjectionName::ALL {
        assert!(
            hub.wait_for(name, target, Duration::from_secs(60)).await,
            "{name} did not reach {target}"
        );
    }
}

/// The position of the last event written, committed or not yet readable.
async fn last_of(client: &tokio_postgres::Client, category: &str) -> Position {
    let row = client
        .query_one(
            "select tx_id, seq from events where category like $1 order by tx_id desc, seq desc limit 1",
            &[&category],
        )
        .await
        .expect("last");
    Position::new(row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
}

/// Compares two dumps table by table, showing the first rows that differ.
/// The read models once the runners applied `appends` appends of the workload, written first:
/// their dump, the runners stopped.
async fn projected(f: &Fixture, appends: usize) -> Vec<(String, Vec<String>)> {
    let hub = ProjectionHub::new();
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, appends).await;
    let running = start(f, &hub, small_batches());
    caught_up(f, &hub).await;
    running.stop().await;
    dump(f).await
}

fn assert_same(left: &[(String, Vec<String>)], right: &[(String, Vec<String>)]) {
    for ((table, a), (_, b)) in left.iter().zip(right) {
        if a != b {
            let only_a: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(3).collect();
            let only_b: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(3).collect();
            panic!(
                "{table} differs ({} vs {} rows)\nonly left: {only_a:#?}\nonly right: {only_b:#?}",
                a.len(),
                b.len()
            );
        }
    }
}

/// Every read-model table, row by row, in a fixed order; never held to a statement timeout a
/// test set on the database.
async fn dump(f: &Fixture) -> Vec<(String, Vec<String>)> {
    let client = f.db.connect().await.expect("connect");
    client
        .batch_execute("set statement_timeout = 0")
        .await
        .expect("no timeout");
    let mut all = Vec::new();
    for table in ProjectionName::ALL.iter().flat_map(|p| p.tables()) {
        let rows = client
            .query(
                &format!("select t::text from public.{table} t order by 1"),
                &[],
            )
            .await
            .expect("dump");
        all.push(((*table).to_owned(), rows.iter().map(|r| r.get(0)).collect()));
    }
    all
}

/// `rebuild --all`: one pass over the log for both projections.
async fn rebuild_all(f: &Fixture) {
    let reports = rebuild_many(
        f.db.config(),
        f.store.clone(),
        &ProjectionName::ALL,
        &RebuildOptions::default(),
        |_| {},
    )
    .await
    .expect("rebuild");
    assert_eq!(reports.len(), 2);
}

/// The read models as they are equal, row for row, what a rebuild from the log makes.
async fn assert_equals_rebuild(f: &Fixture) {
    let live = dump(f).await;
    rebuild_all(f).await;
    assert_same(&live, &dump(f).await);
}

/// Index and constraint names of the read models, with their definitions.
async fn indexes(f: &Fixture) -> Vec<String> {
    let client = f.db.connect().await.expect("connect");
    client
        .query(
            "select indexname || ': ' || indexdef from pg_indexes
             where schemaname = 'public' and tablename <> 'events' order by 1",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn count(f: &Fixture, sql: &str) -> i64 {
    let client = f.db.connect().await.expect("connect");
    client.query_one(sql, &[]).await.expect("count").get(0)
}

/// The state `orderly projections status` shows for a projection once it has settled: polls
/// until it is `want`, for at most ten seconds, and returns the last state seen.
async fn settled_state(
    f: &Fixture,
    name: ProjectionName,
    want: ProjectionState,
) -> ProjectionState {
    let client = f.db.connect().await.expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let statuses = status(&client).await.expect("status");
        let state = statuses
            .iter()
            .find(|s| s.name == name)
            .expect("a status per projection")
            .state;
        if state == want || tokio::time::Instant::now() > deadline {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn small_batches() -> RunnerOptions {
    RunnerOptions {
        batch_size: 37,
        ..RunnerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_read_models_equal_a_rebuild_row_for_row() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 1500).await;
    caught_up(&f, &hub).await;
    let live = dump(&f).await;
    for result in running.stop().await {
        result.expect("runner");
    }
    assert!(count(&f, "select count(*) from orders").await > 50);
    assert!(count(&f, "select count(*) from orders where status = 'DELIVERED'").await > 0);
    assert!(count(&f, "select count(*) from orders where status = 'CANCELLED'").await > 0);
    assert!(
        count(
            &f,
            "select count(*) from order_payments where status = 'REFUNDED'"
        )
        .await
            > 0
    );
    assert_eq!(count(&f, "select count(*) from dead_letters").await, 0);
    let indexes_before = indexes(&f).await;
    rebuild_all(&f).await;
    assert_same(&live, &dump(&f).await);
    // The swapped-in tables carry the migration's index names and definitions.
    assert_eq!(indexes_before, indexes(&f).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_between_batch_and_commit_loses_and_doubles_nothing() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 400).await;
    let crash = Arc::new(AtomicBool::new(true));
    let running = start(
        &f,
        &hub,
        RunnerOptions {
            fail_before_commit: Some(crash.clone()),
            retry_max: Duration::from_millis(200),
            ..small_batches()
        },
    );
    write_workload(f.store.as_ref(), &mut workload, 400).await;
    caught_up(&f, &hub).await;
    // Both runners shared the flag: one of them crashed its first batch.
    assert!(!crash.load(Ordering::SeqCst));
    crash.store(true, Ordering::SeqCst);
    write_workload(f.store.as_ref(), &mut workload, 200).await;
    caught_up(&f, &hub).await;
    assert!(!crash.load(Ordering::SeqCst));
    running.stop().await;
    assert_equals_rebuild(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reapplying_batches_already_applied_changes_nothing() {
    let f = fixture().await;
    let before = projected(&f, 800).await;
    // Send every checkpoint back to the start: the whole log is applied a second time.
    let client = f.db.connect().await.expect("connect");
    client
        .execute(
            "update projection_checkpoints set position_commit = 0, position_prepare = 0",
            &[],
        )
        .await
        .expect("reset");
    let hub = ProjectionHub::new();
    let running = start(
        &f,
        &hub,
        RunnerOptions {
            batch_size: 101,
            ..RunnerOptions::default()
        },
    );
    caught_up(&f, &hub).await;
    running.stop().await;
    assert_same(&before, &dump(&f).await);
}

async fn append_raw(
    f: &Fixture,
    stream: &str,
    expected: ExpectedVersion,
    event_type: &str,
    data: serde_json::Value,
) {
    f.store
        .append(
            &StreamName::parse(stream).expect("stream"),
            expected,
            vec![NewEvent::new(event_type, data).with_metadata(json!({
                "schema_version": 1,
                "event_id": "00000000-0000-7000-8000-000000000001",
                "correlation_id": "00000000-0000-7000-8000-000000000001",
                "causation_id": "00000000-0000-7000-8000-000000000001",
                "traceparent": null,
                "actor": "test",
                "command_id": "00000000-0000-7000-8000-000000000001",
                "idempotency_key": null,
                "occurred_at": "2026-01-02T00:00:00Z"
            }))],
        )
        .await
        .expect("append");
}

/// Appends an `OrderPaid` that does not decode, in a stream of its own: the poison event
/// the orders projection parks.
async fn append_undecodable(f: &Fixture) {
    append_raw(
        f,
        "order-00000000-0000-0000-0000-000000000001",
        ExpectedVersion::NoStream,
        "OrderPaid",
        json!({"garbage": true}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_whose_last_batch_was_full_reports_running_once_at_the_head() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 40).await;
    let events = count(&f, "select count(*) from events").await;
    // One batch holds exactly the whole log, so the catch-up batch is full and nothing follows.
    let hub = ProjectionHub::new();
    let running = start(
        &f,
        &hub,
        RunnerOptions {
            batch_size: usize::try_from(events).expect("a small log"),
            batch_wait: Duration::from_secs(5),
            ..RunnerOptions::default()
        },
    );
    caught_up(&f, &hub).await;
    for name in ProjectionName::ALL {
        assert_eq!(
            settled_state(&f, name, ProjectionState::Running).await,
            ProjectionState::Running,
            "{name}"
        );
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_parked_while_the_rest_flows() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 300).await;
    append_undecodable(&f).await;
    write_workload(f.store.as_ref(), &mut workload, 300).await;
    caught_up(&f, &hub).await;
    let client = f.db.connect().await.expect("connect");
    let letters = dlq::list(&client, None, false).await.expect("list");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].projection, "orders");
    assert!(
        letters[0].error.contains("cannot decode"),
        "{}",
        letters[0].error
    );
    let statuses = status(&client).await.expect("status");
    let orders = statuses
        .iter()
        .find(|s| s.name == ProjectionName::Orders)
        .expect("orders");
    assert_eq!(orders.dead_letters, 1);
    assert_eq!(
        orders.lag_events,
        Some(0),
        "{orders:?} head {:?}",
        f.store.head().await
    );
    assert_eq!(
        settled_state(&f, ProjectionName::Orders, ProjectionState::Running).await,
        ProjectionState::Running
    );
    // Retrying cannot help a payload that does not decode; skipping resolves it.
    let outcome = retry(&f, letters[0].dead_letter_id).await;
    assert!(matches!(outcome, dlq::RetryOutcome::FailedAgain(_)));
    dlq::skip(&client, letters[0].dead_letter_id)
        .await
        .expect("skip");
    assert_eq!(dlq::count(&client, None).await.expect("count"), 0);
    running.stop().await;
    assert_equals_rebuild(&f).await;
}

/// A dead letter whose stream has later events in the read model (parked under
/// `SkipAndPark`, the stream went on) cannot apply: the row's version admits nothing older.
/// The retry says so and leaves the letter waiting; it used to report it applied and resolve
/// it, though the read model never held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_behind_later_events_of_its_stream_is_not_reported_applied() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 200).await;
    caught_up(&f, &hub).await;
    running.stop().await;
    let before = dump(&f).await;
    // The registration of a product whose row holds later events, parked as a runner would.
    let client = f.db.connect().await.expect("connect");
    let parked = park_where(
        &client,
        "products",
        "handler failed (before a fix)",
        "e.version = 0 and exists (select 1 from products p
                                   where e.stream = 'product-' || p.sku and p.version > 0)",
    )
    .await;
    let outcome = retry(&f, parked).await;
    assert!(
        matches!(&outcome, dlq::RetryOutcome::Superseded(why) if why.contains("rebuild")),
        "{outcome:?}"
    );
    assert_eq!(dlq::count(&client, None).await.expect("count"), 1);
    assert_same(&before, &dump(&f).await);
}

/// A rebuild parks into the same table as the live runner, so a letter can name an event the
/// live runner has not reached. Retried then, it would be applied ahead of the stream's earlier
/// events, which the runner would then skip for good (the row's version admits nothing
/// older). The retry refuses; once the runner has passed it, a retry works as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_ahead_of_the_live_runner_is_not_retried_until_it_has_passed() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 100).await;
    caught_up(&f, &hub).await;
    running.stop().await;
    write_workload(f.store.as_ref(), &mut workload, 200).await;
    // An order event past the live checkpoint, with an earlier event of its stream also past
    // it, parked as a rebuild's batch parks it.
    let client = f.db.connect().await.expect("connect");
    let live = "(select position_commit, position_prepare from projection_checkpoints
                 where projection = 'orders')";
    let parked = park_where(
        &client,
        "orders",
        "handler failed in a rebuild",
        &format!(
            "e.stream like 'order-%' and (e.tx_id, e.seq) > {live}
             and exists (select 1 from events b
                         where b.stream = e.stream and b.version < e.version
                           and (b.tx_id, b.seq) > {live})"
        ),
    )
    .await;
    let outcome = retry(&f, parked).await;
    assert!(
        matches!(&outcome, dlq::RetryOutcome::Superseded(why) if why.contains("not reached")),
        "{outcome:?}"
    );
    assert_eq!(dlq::count(&client, None).await.expect("count"), 1);

    // The runner applies it in its turn (its handler is fine); the retry then finds it
    // applied already.
    let running = start(&f, &hub, small_batches());
    caught_up(&f, &hub).await;
    running.stop().await;
    assert_equals_rebuild(&f).await;
    let outcome = retry(&f, parked).await;
    assert!(
        matches!(&outcome, dlq::RetryOutcome::Superseded(why) if why.contains("later events")),
        "{outcome:?}"
    );
}

/// A rebuild's copy replaces the live tables when it swaps: an event a retry applied to the
/// live tables meanwhile would be gone again, its letter saying `retried`. No retry while a
/// copy exists; and an event a retry resolved that fails again waits for an operator again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_waits_for_a_rebuild_and_a_retried_event_that_fails_again_is_parked_again() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 300).await;
    append_undecodable(&f).await;
    rebuild_all(&f).await;
    let client = f.db.connect().await.expect("connect");
    let letters = dlq::list(&client, None, false).await.expect("list");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let parked = letters[0].dead_letter_id;

    interrupted_orders_rebuild(&f).await;
    let outcome = retry(&f, parked).await;
    assert!(
        matches!(&outcome, dlq::RetryOutcome::Superseded(why) if why.contains("under way")),
        "{outcome:?}"
    );
    assert_eq!(dlq::count(&client, None).await.expect("count"), 1);
    rebuild_orders(&f).await.expect("the rebuild finishes");

    // Resolved by a retry (under a build that could apply it, say), the event fails again in
    // the next rebuild: it is open again, not missing from the copy with its letter resolved.
    client
        .execute(
            "update dead_letters set resolution = 'retried', resolved_at = now()
             where dead_letter_id = $1",
            &[&parked],
        )
        .await
        .expect("resolve");
    assert_eq!(dlq::count(&client, None).await.expect("count"), 0);
    rebuild_orders(&f).await.expect("rebuild");
    let letters = dlq::list(&client, None, false).await.expect("list");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].dead_letter_id, parked);
    assert_eq!(letters[0].resolution, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_the_stop_policy_a_poison_event_stops_the_projection_until_skipped() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 200).await;
    // A shipment for an order that was never placed: decodes, but cannot be applied.
    append_raw(
        &f,
        "order-00000000-0000-0000-0000-000000000002",
        ExpectedVersion::NoStream,
        "OrderDelivered",
        json!({"order_id": "00000000-0000-0000-0000-000000000002", "delivered_at": "2026-01-02T00:00:00Z"}),
    )
    .await;
    write_workload(f.store.as_ref(), &mut workload, 200).await;
    let options = RunnerOptions {
        policy: DeadLetterPolicy::Stop,
        ..small_batches()
    };
    let runner = Runner::new(
        ProjectionName::Orders,
        f.store.clone(),
        f.db.config().clone(),
        options.clone(),
        ProjectionHub::new(),
    );
    let stopped = runner.run_until_stopped(CancellationToken::new()).await;
    assert!(
        matches!(stopped, Err(ProjectionError::Stopped { .. })),
        "{stopped:?}"
    );
    let client = f.db.connect().await.expect("connect");
    let statuses = status(&client).await.expect("status");
    assert_eq!(statuses[0].state, ProjectionState::Failed);
    assert!(statuses[0].lag_events.unwrap_or(0) > 0);
    let letters = dlq::list(&client, Some(ProjectionName::Orders), false)
        .await
        .expect("list");
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].error.contains("no order"),
        "{}",
        letters[0].error
    );
    // The letter the runner stopped at is the next event after its checkpoint: a retry tries
    // it (and it fails again: nothing was fixed).
    let outcome = retry(&f, letters[0].dead_letter_id).await;
    assert!(
        matches!(&outcome, dlq::RetryOutcome::FailedAgain(why) if why.contains("no order")),
        "{outcome:?}"
    );
    dlq::skip(&client, letters[0].dead_letter_id)
        .await
        .expect("skip");
    let hub = ProjectionHub::new();
    let stop = CancellationToken::new();
    let runner = Runner::new(
        ProjectionName::Orders,
        f.store.clone(),
        f.db.config().clone(),
        options,
        hub.clone(),
    );
    let task = tokio::spawn(runner.run_until_stopped(stop.clone()));
    let head = last_of(&client, "%").await;
    assert!(
        hub.wait_for(ProjectionName::Orders, head, Duration::from_secs(30))
            .await
    );
    stop.cancel();
    task.await.expect("task").expect("runner");
}

/// A failure that is not transient (here: a trigger that refuses to move the checkpoint) ends
/// the runner, and its status says `FAILED` and why, for `orderly projections status` and for
/// every process's `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_that_fails_for_good_says_so_in_its_status() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 50).await;
    let client = f.db.connect().await.expect("connect");
    client
        .batch_execute(
            "create function frozen() returns trigger language plpgsql as $$
             begin raise exception 'checkpoints are frozen' using errcode = 'P0001'; end $$;
             create trigger frozen before update on projection_checkpoints for each row
             when (old.position_commit is distinct from new.position_commit)
             execute function frozen();
             -- The first record of the failure fails too (a sequence is not rolled back).
             create sequence failed_records;
             create function refuse_once() returns trigger language plpgsql as $$
             begin
               if nextval('failed_records') = 1 then
                 raise exception 'not this time' using errcode = 'P0001';
               end if;
               return new;
             end $$;
             create trigger refuse_once before update on projection_checkpoints for each row
             when (new.state = 'FAILED') execute function refuse_once();",
        )
        .await
        .expect("the triggers");
    let runner = Runner::new(
        ProjectionName::Orders,
        f.store.clone(),
        f.db.config().clone(),
        small_batches(),
        ProjectionHub::new(),
    );
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        runner.run_until_stopped(CancellationToken::new()),
    )
    .await
    .expect("the runner gives up on a permanent failure");
    assert!(
        matches!(ended, Err(ProjectionError::Database(_))),
        "{ended:?}"
    );
    let statuses = status(&client).await.expect("status");
    let orders = &statuses[0];
    assert_eq!(orders.state, ProjectionState::Failed);
    let why = orders.last_error.as_deref().unwrap_or_default();
    assert!(why.contains("read-model database error"), "{why}");
    let tries: i64 = client
        .query_one("select last_value from failed_records", &[])
        .await
        .expect("tries")
        .get(0);
    assert_eq!(tries, 2, "recorded at the second try");
}

/// A batch that runs past the server's `statement_timeout` would time out again as it is:
/// the runner retries with smaller batches until they fit, and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_that_time_out_are_retried_smaller_until_they_fit() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 600).await;
    let client = f.db.connect().await.expect("connect");
    // Every write of an order row takes 10 ms, and statements may take 300 ms: a statement
    // writing more than about thirty orders cannot finish.
    client
        .batch_execute(&format!(
            "create function slow() returns trigger language plpgsql as $$
             begin perform pg_sleep(0.01); return new; end $$;
             create trigger slow before insert or update on orders for each row
             execute function slow();
             alter database {} set statement_timeout = '300ms';",
            f.db.name()
        ))
        .await
        .expect("slow writes");
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, RunnerOptions::default());
    caught_up(&f, &hub).await;
    for result in running.stop().await {
        result.expect("runner");
    }
    let orders_in_log = count(
        &f,
        "select count(distinct stream) from events where category = 'order'",
    )
    .await;
    assert!(orders_in_log > 60, "{orders_in_log}");
    assert_eq!(
        count(&f, "select count(*) from orders").await,
        orders_in_log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_during_live_writes_leaves_no_gap_at_the_swap() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 600).await;
    let writer_store = f.store.clone();
    let writer = tokio::spawn(async move {
        write_workload(writer_store.as_ref(), &mut workload, 1200).await;
    });
    for name in ProjectionName::ALL {
        let report = rebuild(
            f.db.config(),
            f.store.clone(),
            name,
            &RebuildOptions {
                batch_size: 97,
                ..RebuildOptions::default()
            },
            |_| {},
        )
        .await
        .expect("rebuild");
        assert!(report.events > 0);
    }
    writer.await.expect("writer");
    caught_up(&f, &hub).await;
    running.stop().await;
    assert_eq!(
        count(&f, "select count(*) from projection_rebuilds").await,
        0
    );
    assert_equals_rebuild(&f).await;
}

/// `rebuild orders` with the default options.
async fn rebuild_orders(f: &Fixture) -> Result<RebuildReport, ProjectionError> {
    rebuild(
        f.db.config(),
        f.store.clone(),
        ProjectionName::Orders,
        &RebuildOptions::default(),
        |_| {},
    )
    .await
}

/// Starts a rebuild of the orders projection in batches of 50 and drops it once it has read 200
/// events of the log, leaving its shadow tables and checkpoint behind.
/// A progress callback for a rebuild that runs `sql` (one or more statements) on `client`
/// after page `page` of the replay and waits for it: a fault injected at a known point. The
/// count holds the rows the statements returned once they ran.
fn at_page(
    client: tokio_postgres::Client,
    page: usize,
    sql: &'static str,
) -> (
    impl FnMut(&orderly_projections::RebuildProgress),
    Arc<AtomicU64>,
) {
    let rows = Arc::new(AtomicU64::new(0));
    let (ask, mut asked) = tokio::sync::mpsc::unbounded_channel::<std::sync::mpsc::Sender<u64>>();
    tokio::spawn(async move {
        while let Some(done) = asked.recv().await {
            let messages = client
                .simple_query(sql)
                .await
                .expect("the injected statements");
            let rows = messages
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            let _ = done.send(rows as u64);
        }
    });
    let mut pages = 0;
    let counted = rows.clone();
    let callback = move |_: &orderly_projections::RebuildProgress| {
        pages += 1;
        if pages == page {
            let (done, running) = std::sync::mpsc::channel();
            ask.send(done).expect("the injector runs");
            let n = tokio::task::block_in_place(|| running.recv()).expect("ran");
            counted.store(n, Ordering::SeqCst);
        }
    };
    (callback, rows)
}

/// A rebuild whose connections are all cut in the middle of its replay (a restart, a failover)
/// resumes on its own from its shadow checkpoints, and swaps in what the log makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_whose_connections_are_cut_resumes_on_its_own() {
    let f = fixture().await;
    let live = projected(&f, 300).await;
    let (progress, cut) = at_page(
        f.db.connect().await.expect("connect"),
        2,
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid()",
    );
    let reports = rebuild_many(
        f.db.config(),
        f.store.clone(),
        &ProjectionName::ALL,
        // Fresh: the first attempt starts over; the ones after the cut resume its copy.
        &RebuildOptions {
            batch_size: 50,
            fresh: true,
            ..RebuildOptions::default()
        },
        progress,
    )
    .await
    .expect("the rebuild resumes after its connections are cut");
    let cut = cut.load(Ordering::SeqCst);
    assert!(cut >= 2, "{cut} connections cut");
    assert_eq!(reports.len(), 2);
    assert!(
        reports.iter().all(|report| report.resumed),
        "every projection went on from its shadow checkpoint"
    );
    assert_same(&live, &dump(&f).await);
}

/// A `statement_timeout` the server sets for live traffic would make a rebuild of a large
/// projection impossible (its batches and index builds run as long as the log makes them): a
/// rebuild's connections run without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_is_not_held_to_the_servers_statement_timeout() {
    let f = fixture().await;
    let live = projected(&f, 150).await;
    let client = f.db.connect().await.expect("connect");
    client
        .batch_execute(&format!(
            "alter database {} set statement_timeout = '50ms'",
            f.db.name()
        ))
        .await
        .expect("a short statement timeout");
    // From the second page on, every row the replay writes to the shadow orders takes 5 ms,
    // so each batch's statements run far past 50 ms.
    let (progress, _) = at_page(
        client,
        1,
        "create function slow() returns trigger language plpgsql as $$
         begin perform pg_sleep(0.005); return new; end $$;
         create trigger slow before insert or update on orderly_shadow.orders for each row
         execute function slow()",
    );
    let report = rebuild(
        f.db.config(),
        f.store.clone(),
        ProjectionName::Orders,
        &RebuildOptions {
            batch_size: 400,
            ..RebuildOptions::default()
        },
        progress,
    )
    .await
    .expect("the rebuild finishes in spite of the timeout");
    assert!(!report.resumed, "no attempt timed out");
    assert_same(&live, &dump(&f).await);
}

/// A log of 600 operations rebuilt into the live tables (their dump), then an orders rebuild
/// interrupted half-way, its copy left behind.
async fn rebuilt_then_interrupted() -> (Fixture, Vec<(String, Vec<String>)>) {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 600).await;
    rebuild_all(&f).await;
    let live = dump(&f).await;
    interrupted_orders_rebuild(&f).await;
    (f, live)
}

async fn interrupted_orders_rebuild(f: &Fixture) {
    let config = f.db.config().clone();
    let store = f.store.clone();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_in = seen.clone();
    let first = tokio::spawn(async move {
        rebuild(
            &config,
            store,
            ProjectionName::Orders,
            &RebuildOptions {
                batch_size: 50,
                ..RebuildOptions::default()
            },
            move |p| {
                seen_in.store(p.events, Ordering::SeqCst);
            },
        )
        .await
    });
    while seen.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    // The server releases the first run's lock when its connection closes.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_rebuild_resumes_from_its_shadow_checkpoint() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 600).await;
    interrupted_orders_rebuild(&f).await;
    let report = rebuild_orders(&f).await.expect("resumed rebuild");
    assert!(report.resumed);
    let total = count(&f, "select count(*) from events").await as u64;
    assert!(report.events < total, "{} of {total}", report.events);
    let rebuilt = dump(&f).await;
    rebuild_orders(&f).await.expect("full rebuild");
    assert_same(&rebuilt, &dump(&f).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_that_fails_its_checks_is_left_and_the_live_tables_keep_serving() {
    let (f, live) = rebuilt_then_interrupted().await;
    // An order whose lines went missing: the rows and the running aggregates still agree,
    // only the lines check can see it.
    let client = f.db.connect().await.expect("connect");
    let broken = client
        .execute(
            "delete from orderly_shadow.order_lines
             where order_id = (select order_id from orderly_shadow.orders limit 1)",
            &[],
        )
        .await
        .expect("break the shadow");
    assert!(
        broken > 0,
        "the interrupted rebuild wrote no order lines yet"
    );
    let error = rebuild_orders(&f)
        .await
        .expect_err("a shadow that fails a check is not swapped in");
    match error {
        ProjectionError::Verification { projection, reason } => {
            assert_eq!(projection, "orders");
            assert!(reason.starts_with("orders without lines: 1"), "{reason}");
        }
        other => panic!("expected a failed check, got {other:?}"),
    }
    assert_same(&live, &dump(&f).await);
    let shadow_orders = count(&f, "select count(*) from orderly_shadow.orders").await;
    assert!(shadow_orders > 0, "the shadow is kept for inspection");

    // ... but not resumed: the next rebuild starts over, and its copy passes.
    let report = rebuild_orders(&f)
        .await
        .expect("a rebuild after a failed check starts over");
    assert!(!report.resumed);
    assert_same(&live, &dump(&f).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_rebuild_replaces_what_an_interrupted_one_left() {
    let (f, live) = rebuilt_then_interrupted().await;
    // What an older build of the handlers would have left: a copy that differs from what
    // the log says.
    let client = f.db.connect().await.expect("connect");
    client
        .execute(
            "update orderly_shadow.orders set ship_city = 'Nowhere'",
            &[],
        )
        .await
        .expect("spoil the shadow");
    let report = rebuild(
        f.db.config(),
        f.store.clone(),
        ProjectionName::Orders,
        &RebuildOptions {
            fresh: true,
            ..RebuildOptions::default()
        },
        |_| {},
    )
    .await
    .expect("fresh rebuild");
    assert!(!report.resumed);
    assert_same(&live, &dump(&f).await);
}

/// A runner's session holds its projection's advisory lock. Were the runner's host to vanish,
/// the server must end that session on its own, or no standby could take over for the
/// system's two hours of keepalive silence: its sessions ask the server to probe.
#[tokio::test]
async fn projection_sessions_ask_the_server_to_probe_for_a_vanished_peer() {
    let f = fixture().await;
    let client = orderly_projections::connect(f.db.config(), "test")
        .await
        .expect("connect");
    for (setting, value) in [
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "60000"),
    ] {
        let shown: String = client
            .query_one(&format!("show {setting}"), &[])
            .await
            .expect("show")
            .get(0);
        assert_eq!(shown, value, "{setting}");
    }
}

/// A runner that lost its projection's lock and lives on, a standby now, must not go on
/// exporting the lag it measured: the lag alerts take the highest value across processes, and
/// a stale value would keep them firing.
#[tokio::test]
async fn a_runner_that_lost_its_lock_stops_reporting_its_lag() {
    use metrics_exporter_prometheus::PrometheusHandle;
    /// Waits until the orders projection's lag, as a scrape shows it, is `done`.
    async fn lag_until(scrape: &PrometheusHandle, what: &str, done: fn(Option<&str>) -> bool) {
        let started = std::time::Instant::now();
        loop {
            let text = scrape.render();
            let lag = text.lines().find_map(|line| {
                line.strip_prefix("orderly_projection_lag_seconds{projection=\"orders\"} ")
            });
            if done(lag) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what}: {lag:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let scrape = recorder.handle();
    // This test's runtime runs on this thread only, so the runner's tasks record here.
    let _local = metrics::set_default_local_recorder(&recorder);
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 50).await;
    let stop = CancellationToken::new();
    let runner = Runner::new(
        ProjectionName::Orders,
        f.store.clone(),
        f.db.config().clone(),
        small_batches(),
        ProjectionHub::new(),
    );
    let task = tokio::spawn(runner.run_until_stopped(stop.clone()));
    lag_until(&scrape, "measured while it applies", |lag| {
        lag.is_some_and(|lag| lag != "NaN")
    })
    .await;
    // Its sessions cut (a restart, a partition), and the lock taken by another process before
    // it comes back.
    let other = f.db.connect().await.expect("connect");
    other
        .execute(
            "select pg_terminate_backend(pid, 5000) from pg_stat_activity
             where datname = current_database() and pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("cut");
    other
        .execute(
            "select pg_advisory_lock($1)",
            &[&ProjectionName::Orders.runner_lock()],
        )
        .await
        .expect("lock");
    // The runner finds its session gone at its next batch, and the lock taken.
    write_workload(f.store.as_ref(), &mut workload, 5).await;
    lag_until(&scrape, "not measured once a standby", |lag| {
        lag == Some("NaN")
    })
    .await;
    stop.cancel();
    task.await.expect("joined").expect("stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_of_the_same_projection_never_double_apply() {
    let f = fixture().await;
    let hub_a = ProjectionHub::new();
    let hub_b = ProjectionHub::new();
    let fast = RunnerOptions {
        standby_poll: Duration::from_millis(50),
        ..small_batches()
    };
    let a = start(&f, &hub_a, fast.clone());
    let b = start(&f, &hub_b, fast);
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 700).await;
    // Stop whichever is active half-way; the standby takes over from the checkpoint.
    let a_active = hub_a.position(ProjectionName::Orders) > Position::START;
    let (survivor, hub) = if a_active {
        a.stop().await;
        (b, hub_b)
    } else {
        b.stop().await;
        (a, hub_a)
    };
    write_workload(f.store.as_ref(), &mut workload, 700).await;
    caught_up(&f, &hub).await;
    survivor.stop().await;
    assert_equals_rebuild(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_queries_use_indexes() {
    let f = fixture().await;
    let client = f.db.connect().await.expect("connect");
    client
        .batch_execute("set enable_seqscan = off")
        .await
        .expect("set");
    // The shapes of the statements read-api/src/sql.rs sends (newest orders first).
    let shapes = [
        "select * from orders o left join order_payments p on p.order_id = o.order_id where o.order_id = '00000000-0000-0000-0000-000000000001'",
        "select * from order_lines where order_id = any('{00000000-0000-0000-0000-000000000001}') order by order_id, line_no",
        "select * from order_status_history where order_id = any('{00000000-0000-0000-0000-000000000001}') order by order_id, version",
        "select * from orders o where o.customer_id = 'c' and (o.placed_at, o.order_id) < ('2026-01-01', '00000000-0000-0000-0000-000000000001') order by o.placed_at desc, o.order_id desc limit 21",
        "select * from orders o where o.status = any('{PLACED,PAID}') and o.placed_at >= '2026-01-01' and o.placed_at <= '2026-02-01' order by o.placed_at desc, o.order_id desc limit 21",
        "select * from orders o where (o.placed_at, o.order_id) < ('2026-01-01', '00000000-0000-0000-0000-000000000001') order by o.placed_at desc, o.order_id desc limit 21",
        "select o.* from orders o join order_search s on s.order_id = o.order_id where s.search_document @@ websearch_to_tsquery('simple', 'kettle') order by o.placed_at desc, o.order_id desc limit 21",
        "select * from products where sku = 'SKU-1'",
        "select * from products where to_tsvector('simple', name || ' ' || sku) @@ websearch_to_tsquery('simple', 'tea') order by name, sku limit 51",
        "select * from products where (name, sku) > ('a', 'b') order by name, sku limit 51",
        "select * from customers c left join customer_lifetime_values v on v.customer_id = c.customer_id where c.customer_id = 'c'",
        "select * from daily_sales where date between '2026-01-01' and '2026-01-31' order by date, currency",
    ];
    for sql in shapes {
        let plan: Vec<String> = client
            .query(&format!("explain {sql}"), &[])
            .await
            .expect("explain")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index") && !plan.contains("Seq Scan"),
            "{sql}\n{plan}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listeners_learn_the_checkpoint_and_touched_orders_in_and_across_processes() {
    let f = fixture().await;
    let local = ProjectionHub::new();
    let remote = ProjectionHub::new();
    let follower = remote.follow(f.db.config().clone());
    let mut local_updates = local.updates();
    let mut remote_updates = remote.updates();
    // Let the follower's LISTEN start before the first notification.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = start(&f, &local, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    let head = write_workload(f.store.as_ref(), &mut workload, 100).await;
    assert!(
        remote
            .wait_for(ProjectionName::Orders, head, Duration::from_secs(30))
            .await
    );
    assert!(
        !remote
            .wait_for(
                ProjectionName::Orders,
                Position::new(u64::MAX, 0),
                Duration::from_millis(50)
            )
            .await
    );
    let find_order = |update: orderly_projections::ProjectionUpdate| {
        (update.projection == "orders" && !update.order_ids.is_empty()).then_some(update)
    };
    let local_seen = loop {
        if let Some(u) = find_order(local_updates.recv().await.expect("local")) {
            break u;
        }
    };
    let remote_seen = loop {
        if let Some(u) = find_order(remote_updates.recv().await.expect("remote")) {
            break u;
        }
    };
    assert_eq!(local_seen.order_ids, remote_seen.order_ids);
    running.stop().await;
    follower.abort();
}

/// An order listener in another process must hear of every batch of `orders`, even one whose
/// notice never reached its process: a runner that failed between its commit and its notice,
/// or a notice sent while the follower was reconnecting. Either way the follower finds the
/// checkpoint moved and tells its order listeners to look again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_a_notice_tells_order_listeners_to_look_again() {
    use futures::StreamExt;
    let f = fixture().await;
    let client = f.db.connect().await.expect("connect");
    client
        .execute(
            "insert into projection_checkpoints (projection) values ('orders') \
             on conflict do nothing",
            &[],
        )
        .await
        .expect("a checkpoint row");
    let remote = ProjectionHub::new();
    let follower = remote.follow(f.db.config().clone());
    let hint = Duration::from_secs(10);
    // Listening, and its first reading past (which announces nothing).
    let mut touched = Box::pin(remote.order_updates(uuid::Uuid::now_v7()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while tokio::time::timeout(Duration::from_millis(50), touched.next())
        .await
        .is_ok()
    {}
    // A batch committed with no notice after it: the checkpoint moves, nothing is sent.
    let moved = |commit: i64| {
        let client = &client;
        async move {
            client
                .execute(
                    "update projection_checkpoints set position_commit = $1, \
                     position_prepare = 0 where projection = 'orders'",
                    &[&commit],
                )
                .await
                .expect("moved");
        }
    };
    moved(1_000).await;
    let heard = tokio::time::timeout(hint, touched.next())
        .await
        .expect("told to look again after a batch without a notice")
        .expect("the hub lives");
    assert_eq!(heard.position, Position::new(1_000, 0));
    assert!(heard.traceparent.is_none());
    // The follower's connection cut (a restart, a proxy): notices sent meanwhile are lost.
    let cut = client
        .query(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where datname = current_database() and pid <> pg_backend_pid() \
             and query like 'select projection, position_commit%'",
            &[],
        )
        .await
        .expect("cut");
    assert_eq!(cut.len(), 1, "the follower's one connection");
    moved(2_000).await;
    client
        .execute(
            "select pg_notify('orderly_projections', $1)",
            &[&orderly_projections::ProjectionUpdate {
                projection: "orders".to_owned(),
                position: Position::new(2_000, 0),
                order_ids: Vec::new(),
                truncated: false,
                traceparent: None,
            }
            .to_payload()],
        )
        .await
        .expect("a notice nobody hears");
    let heard = tokio::time::timeout(hint, touched.next())
        .await
        .expect("told to look again after a reconnect")
        .expect("the hub lives");
    assert_eq!(heard.position, Position::new(2_000, 0));
    assert_eq!(
        remote.position(ProjectionName::Orders),
        Position::new(2_000, 0)
    );
    follower.abort();
}

/// A retry applies its event without moving the checkpoint, so nothing else would tell an
/// order's followers in other processes (an `orderUpdated` subscription) that it changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_dead_letter_tells_the_orders_followers() {
    let f = fixture().await;
    let hub = ProjectionHub::new();
    let running = start(&f, &hub, small_batches());
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 100).await;
    caught_up(&f, &hub).await;
    running.stop().await;
    // An order's last event taken back out of the read model and parked, as a runner whose
    // handler failed on it would have left it.
    let client = f.db.connect().await.expect("connect");
    let last = client
        .query_one(
            "select e.event_id, e.stream, e.version
             from events e
             where e.stream like 'order-%' and e.version > 0
               and e.event_type in ('OrderStockReserved', 'OrderPaid', 'OrderConfirmed')
               and not exists (select 1 from events n
                               where n.stream = e.stream and n.version > e.version)
             limit 1",
            &[],
        )
        .await
        .expect("an order whose last event only changes its status");
    let stream: String = last.get(1);
    let version: i64 = last.get(2);
    let order_id = uuid::Uuid::parse_str(&stream["order-".len()..]).expect("an order id");
    client
        .batch_execute(&format!(
            "update orders set version = {version} - 1 where order_id = '{order_id}';
             delete from order_status_history
             where order_id = '{order_id}' and version = {version}"
        ))
        .await
        .expect("take the event out");
    let event_id: uuid::Uuid = last.get(0);
    let parked = park_where(
        &client,
        "orders",
        "handler failed (before a fix)",
        &format!("e.event_id = '{event_id}'"),
    )
    .await;

    // A follower in another process, past its first look at the checkpoints.
    let remote = ProjectionHub::new();
    let follower = remote.follow(f.db.config().clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut updates = remote.updates();
    let outcome = retry(&f, parked).await;
    assert_eq!(outcome, dlq::RetryOutcome::Applied);
    // The notice names the order; a follower's "look again at everything" (when it connects,
    // or finds a checkpoint moved without a notice) would not prove it.
    let told = async {
        loop {
            let update = updates.recv().await.expect("the hub lives");
            if !update.truncated && update.order_ids.contains(&order_id) {
                return update;
            }
        }
    };
    let update = tokio::time::timeout(Duration::from_secs(5), told)
        .await
        .expect("the order's followers are told");
    assert_eq!(update.projection, "orders");
    follower.abort();
    assert_equals_rebuild(&f).await;
}

#[test]
fn notification_payloads_stay_under_the_postgresql_limit() {
    let update = orderly_projections::ProjectionUpdate {
        projection: "orders".to_owned(),
        position: Position::new(u64::MAX, u64::MAX),
        order_ids: (0..5000).map(|_| uuid::Uuid::now_v7()).collect(),
        truncated: false,
        traceparent: Some(format!("00-{}-{}-01", "a".repeat(32), "b".repeat(16))),
    };
    let payload = update.to_payload();
    assert!(payload.len() < 8000, "{}", payload.len());
    let back: orderly_projections::ProjectionUpdate = serde_json::from_str(&payload).expect("json");
    assert!(back.truncated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_catches_up_then_stops_at_its_limit() {
    let f = fixture().await;
    let mut workload = Workload::new(WorkloadOptions::default());
    write_workload(f.store.as_ref(), &mut workload, 60).await;
    let options = orderly_projections::tail::TailOptions {
        filter: EventFilter::Category("product".to_owned()),
        json: true,
        limit: Some(10),
        ..Default::default()
    };
    let mut out: Vec<u8> = Vec::new();
    let written = orderly_projections::tail::tail(
        f.store.as_ref(),
        &options,
        &mut out,
        CancellationToken::new(),
    )
    .await
    .expect("tail");
    assert_eq!(written, 10);
    let text = String::from_utf8(out).expect("utf8");
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("json line");
        assert!(
            record["stream"]
                .as_str()
                .expect("stream")
                .starts_with("product-")
        );
        assert!(record["position"].as_str().expect("position").len() == 32);
    }
}

/// The tables the handlers write and the read API reads are the migrated ones: every column of
/// each (names and types), no more and no fewer.
#[tokio::test]
async fn every_table_here_has_the_columns_of_the_migrated_one() {
    let f = fixture().await;
    let client = f.db.connect().await.expect("connect");
    // How `information_schema` names the types the statements cast to.
    fn udt(sql_type: &'static str) -> &'static str {
        match sql_type {
            "bigint" => "int8",
            "int" => "int4",
            other => other,
        }
    }
    for table in orderly_projections::tables::ALL {
        let mut migrated: Vec<(String, String)> = client
            .query(
                "select column_name::text, udt_name::text from information_schema.columns
                 where table_schema = 'public' and table_name = $1",
                &[&table.name],
            )
            .await
            .expect("columns")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut listed: Vec<(String, String)> = table
            .columns
            .iter()
            .map(|c| (c.name.to_owned(), udt(c.sql_type).to_owned()))
            .collect();
        migrated.sort();
        listed.sort();
        assert_eq!(listed, migrated, "table {}", table.name);
    }
}
