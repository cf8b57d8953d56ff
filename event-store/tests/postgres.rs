//! The contract suite against the PostgreSQL adapter, plus what only this adapter can get
//! wrong: late commits, rolled-back writers, wake-ups across processes, an unreachable server.

mod contract;

use std::sync::Arc;
use std::time::Duration;

use contract::{Fixture, event, next, stream};
use futures::StreamExt;
use orderly_event_store::postgres::{PgEventStore, PgStoreOptions, migrate, migration_fingerprint};
use orderly_event_store::{
    Append, EventFilter, EventStore, ExpectedVersion, Fanout, Position, StoreError, StreamName,
    Subscription, SubscriptionOptions,
};
use orderly_test_support::TestDb;
use serde_json::json;
use uuid::Uuid;

struct Pg {
    store: PgEventStore,
    db: TestDb,
}

impl Fixture for Pg {
    fn store(&self) -> Arc<dyn EventStore> {
        Arc::new(self.store.clone())
    }
}

async fn database() -> TestDb {
    TestDb::create("event-store", &migration_fingerprint(), |url| async move {
        migrate(&url.parse()?).await.map_err(Into::into)
    })
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)")
}

async fn pg() -> Pg {
    let db = database().await;
    let store = PgEventStore::new(db.config().clone(), PgStoreOptions::default()).expect("store");
    Pg { store, db }
}

contract_tests!(pg());

/// Starts an insert in a transaction of its own and leaves it open: the transaction has its id
/// and sequence value, as an append that stalls before its commit would.
async fn stalled_writer(
    db: &TestDb,
    id: Uuid,
    stream_name: &str,
) -> (tokio_postgres::Client, Position) {
    let client = db.connect().await.expect("connect");
    client.batch_execute("begin").await.expect("begin");
    let row = client
        .query_one(
            "insert into events (event_id, stream, version, event_type, data, metadata)
             values ($1, $2, 0, 'Late', '{}', '{}') returning tx_id, seq",
            &[&id, &stream_name],
        )
        .await
        .expect("insert");
    let position = Position::new(row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
    (client, position)
}

/// A late commit in the making, seen from `store`: "Warm" appended and delivered to the live
/// `follower`, then A inserted in a transaction left open, then B appended and committed
/// behind A's place in the log.
struct LateCommit {
    warm: Position,
    writer_a: tokio_postgres::Client,
    a_position: Position,
    a_id: Uuid,
    b_id: Uuid,
}

impl LateCommit {
    async fn begin(store: &dyn EventStore, db: &TestDb, follower: &mut Subscription) -> Self {
        let warm = store
            .append(
                &stream("late-warm"),
                ExpectedVersion::NoStream,
                vec![event("Warm", json!({}))],
            )
            .await
            .unwrap()
            .position;
        assert_eq!(next(follower).await.position, warm, "the follower is live");
        let a_id = Uuid::now_v7();
        let (writer_a, a_position) = stalled_writer(db, a_id, "late-a").await;
        let b_event = event("Early", json!({}));
        let b_id = b_event.id;
        let b = store
            .append(&stream("late-b"), ExpectedVersion::NoStream, vec![b_event])
            .await
            .unwrap();
        assert!(
            a_position < b.position,
            "A took its place in the log before B"
        );
        Self {
            warm,
            writer_a,
            a_position,
            a_id,
            b_id,
        }
    }

    /// B is committed, A is not: `follower` must wait.
    async fn assert_held_back(&self, name: &str, follower: &mut Subscription) {
        let early = tokio::time::timeout(Duration::from_millis(500), follower.next()).await;
        assert!(
            early.is_err(),
            "{name}: B was delivered while A, before it, was still in flight: {early:?}"
        );
    }

    /// Commits A; every follower then gets A before B.
    async fn commit(&self, followers: &mut [(&str, &mut Subscription)]) {
        self.writer_a.batch_execute("commit").await.unwrap();
        for (name, follower) in followers {
            assert_eq!(next(follower).await.id, self.a_id, "{name}: A comes first");
            assert_eq!(next(follower).await.id, self.b_id, "{name}: then B");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_commit_is_not_skipped_by_a_live_subscriber() {
    let f = pg().await;
    let store = &f.store;
    let mut sub = store
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    let late = LateCommit::begin(store, &f.db, &mut sub).await;
    // Neither a subscriber nor a reader may move past A's place.
    late.assert_held_back("subscriber", &mut sub).await;
    assert!(
        store
            .read_all(late.warm, &EventFilter::All, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.head().await.unwrap() < late.a_position);
    late.commit(&mut [("subscriber", &mut sub)]).await;
}

/// The same through a shared reader (`Fanout`), as the saga and the projection runners of one
/// process follow the log: neither a follower already live on the shared reader nor one that
/// joins while the late writer is in flight (and catches up from the store) moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_commit_is_not_skipped_by_followers_of_a_shared_reader() {
    let f = pg().await;
    let fanout = Fanout::new(
        Arc::new(f.store.clone()),
        64,
        SubscriptionOptions::default(),
    );
    let mut live = fanout
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    let late = LateCommit::begin(&fanout, &f.db, &mut live).await;
    let mut joining = fanout
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    assert_eq!(next(&mut joining).await.position, late.warm);
    late.assert_held_back("live", &mut live).await;
    late.assert_held_back("joining", &mut joining).await;
    late.commit(&mut [("live", &mut live), ("joining", &mut joining)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_writer_holds_nothing_back() {
    let f = pg().await;
    let store = &f.store;
    let mut sub = store
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    let (writer_a, _) = stalled_writer(&f.db, Uuid::now_v7(), "gone-a").await;
    let b = store
        .append(
            &stream("gone-b"),
            ExpectedVersion::NoStream,
            vec![event("Kept", json!({}))],
        )
        .await
        .unwrap();
    writer_a.batch_execute("rollback").await.unwrap();
    let got = next(&mut sub).await;
    assert_eq!(got.position, b.position);
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(
        more.is_err(),
        "the rolled-back event must never appear: {more:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_is_woken_by_notification_not_polling() {
    let f = pg().await;
    // The follower polls once a minute, so only a notification can bring the event in time.
    let slow_poll = PgStoreOptions {
        subscription: SubscriptionOptions {
            poll_interval: Duration::from_secs(60),
            ..Default::default()
        },
        ..Default::default()
    };
    let follower = PgEventStore::new(f.db.config().clone(), slow_poll).unwrap();
    let mut sub = follower
        .subscribe(Position::START, EventFilter::All)
        .await
        .unwrap();
    // Let the follower's LISTEN connection come up before the write it must hear about: a
    // fixed pause was too short on a loaded machine, and a notification sent before the LISTEN
    // is lost. Its LISTEN done, not only begun: it takes effect when its statement commits, and
    // a notice sent in between was lost too.
    let observer = f.db.connect().await.expect("connect");
    let started = std::time::Instant::now();
    loop {
        let listening: i64 = observer
            .query_one(
                "select count(*) from pg_stat_activity
                 where datname = current_database() and query ilike 'listen %'
                 and state = 'idle'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if listening > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the follower never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = f
        .store
        .append(
            &stream("notify-1"),
            ExpectedVersion::NoStream,
            vec![event("Heard", json!({}))],
        )
        .await
        .unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(5), next(&mut sub))
        .await
        .expect("woken within 5 s");
    assert_eq!(heard.position, written.position);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_reported_as_unavailable() {
    let options = PgStoreOptions {
        pool_wait: Duration::from_millis(500),
        ..Default::default()
    };
    let store = PgEventStore::connect("postgres://postgres@127.0.0.1:1/nowhere", options).unwrap();
    contract::an_unreachable_store_reports_unavailable(&store).await;
}

/// An append refused among several (its stream moved on) leaves the others to commit together,
/// in the one transaction they would have had without it, instead of sending them one by one:
/// with many saga lanes writing together, one lane's conflict on a product would otherwise cost
/// every other lane's appends a transaction each. The refused one is answered as if alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_among_several_leaves_the_others_to_commit_together() {
    let pg = pg().await;
    let (a, b, hot) = (
        stream("order-together1"),
        stream("order-together2"),
        stream("product-together"),
    );
    pg.store
        .append(
            &hot,
            ExpectedVersion::NoStream,
            vec![event("Registered", json!({}))],
        )
        .await
        .unwrap();
    let append = |stream: &StreamName, expected| Append {
        stream: stream.clone(),
        expected,
        events: vec![event("Numbered", json!({}))],
    };
    let answers = pg
        .store
        .append_many(vec![
            append(&a, ExpectedVersion::NoStream),
            // Decided on a state that another writer has moved past.
            append(&hot, ExpectedVersion::NoStream),
            append(&b, ExpectedVersion::NoStream),
        ])
        .await;
    let [first, refused, last]: [_; 3] = answers.try_into().expect("three answers");
    match refused {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Some(0)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    assert_eq!(
        first.position.commit, last.position.commit,
        "the appends beside the refused one were committed in one transaction"
    );
    assert_eq!(pg.store.stream_version(&hot).await.unwrap(), Some(0));
    assert_eq!(pg.store.stream_version(&a).await.unwrap(), Some(0));
    assert_eq!(pg.store.stream_version(&b).await.unwrap(), Some(0));
}
