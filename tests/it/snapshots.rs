//! Snapshots of long product streams (`aggregate_snapshots`): a handler starting cold loads
//! from the latest snapshot that matches the log and ends with the state a fold of the whole
//! stream gives; snapshots are taken as the stream grows, by loads and by the saga's appends;
//! and a snapshot the log contradicts, or of another form, is never trusted.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use orderly_command_api::{Envelope, Handler, Loaded, Snapshots};
use orderly_domain::product::{Product, ProductAggregate, ProductCommand};
use orderly_domain::streams;
use orderly_domain::values::{OrderId, ProductName, Quantity, Sku};
use orderly_event_store::{EventStore, StreamName};
use orderly_test_support::TestDb;
use orderly_testdata::history::{append_all, product_history};
use uuid::Uuid;

use crate::common::*;

struct Shop {
    db: TestDb,
    store: Arc<dyn EventStore>,
    snapshots: Snapshots,
    stream: StreamName,
}

impl Shop {
    /// A product with `orders` orders behind it (`2 * orders + 1` events), no snapshot yet.
    async fn with_history(orders: usize) -> Self {
        let db = migrated_database().await;
        let settings = settings_for(db.url());
        let store = orderly_service::app::event_store(&settings).unwrap();
        let config = orderly_service::app::pg_config(&settings).unwrap();
        let snapshots = Snapshots::new(orderly_graphql::pg_pool(&config, 2).unwrap());
        let sku = Sku::parse("MUG-HISTORY").unwrap();
        let stream = StreamName::parse(streams::product(&sku)).unwrap();
        let history = product_history(&sku, orders).unwrap();
        append_all(store.as_ref(), &stream, None, &history)
            .await
            .unwrap();
        Self {
            db,
            store,
            snapshots,
            stream,
        }
    }

    /// A handler as a process starting now has it, with snapshots.
    fn cold(&self) -> Handler {
        Handler::new(self.store.clone()).with_snapshots(self.snapshots.clone())
    }

    /// The product folded from its whole stream, by a handler without snapshots.
    async fn folded(&self) -> Loaded<Option<Product>> {
        Handler::new(self.store.clone())
            .load::<ProductAggregate>(&self.stream)
            .await
            .unwrap()
    }

    async fn load_cold(&self) -> Loaded<Option<Product>> {
        self.cold()
            .load::<ProductAggregate>(&self.stream)
            .await
            .unwrap()
    }

    /// Waits until the stream's snapshot is a good one at `version` (taken in the background):
    /// naming the event the log has there, in this release's form.
    async fn snapshot_at(&self, version: u64) {
        let sql = format!(
            "select count(*) from aggregate_snapshots where stream = '{}' and version = {version}
             and event_id = (select event_id from events where stream = '{}' and version = {version})
             and format = {}",
            self.stream,
            self.stream,
            orderly_domain::product::SNAPSHOT_FORMAT
        );
        eventually(&self.db, &sql, 1, Duration::from_secs(30)).await;
    }

    async fn execute(&self, sql: &str) {
        let client = self.db.connect().await.unwrap();
        client.execute(sql, &[&self.stream.as_str()]).await.unwrap();
    }
}

fn assert_same(loaded: &Loaded<Option<Product>>, folded: &Loaded<Option<Product>>) {
    assert_eq!(loaded.state, folded.state);
    assert_eq!(loaded.version, folded.version);
    assert_eq!(loaded.position, folded.position);
    assert_eq!(loaded.first_event_id, folded.first_event_id);
    assert_eq!(loaded.last_event_id, folded.last_event_id);
}

#[tokio::test]
async fn a_product_loaded_from_its_snapshot_is_the_product_folded_from_its_whole_stream() {
    let shop = Shop::with_history(1_200).await;
    // A first cold load reads all 2,401 events and snapshots the product at its last one.
    let first = shop.load_cold().await;
    assert_eq!(first.version, Some(2_400));
    shop.snapshot_at(2_400).await;
    // The stream moves on past the snapshot by more than a page of a load (500 events).
    let more = product_history(&Sku::parse("MUG-HISTORY").unwrap(), 300).unwrap();
    append_all(shop.store.as_ref(), &shop.stream, Some(2_400), &more[1..])
        .await
        .unwrap();

    let restored = shop.load_cold().await;
    let folded = shop.folded().await;
    assert_eq!(folded.version, Some(3_000));
    assert_same(&restored, &folded);

    // And the load did start from the snapshot: one it was given with another name (the log
    // says nothing of it) shows through. Nothing but a test writes such a snapshot.
    shop.execute(
        "update aggregate_snapshots set state = jsonb_set(state::jsonb, '{name}', '\"Renamed mug\"')::text
         where stream = $1",
    )
    .await;
    let from_snapshot = shop.load_cold().await;
    assert_eq!(
        from_snapshot.state.unwrap().name,
        ProductName::parse("Renamed mug").unwrap()
    );
}

#[tokio::test]
async fn the_saga_s_appends_snapshot_a_product_as_it_grows() {
    let shop = Shop::with_history(1_000).await;
    // The saga's handler: it decides on the state its own appends left.
    let saga = Handler::optimistic(shop.store.clone()).with_snapshots(shop.snapshots.clone());
    saga.load::<ProductAggregate>(&shop.stream).await.unwrap();
    shop.snapshot_at(2_000).await;
    // 500 more orders, reserved and shipped in rounds of 250 reservations: 1,000 events more,
    // none of them read back by the saga.
    for _ in 0..2 {
        let orders: Vec<OrderId> = (0..250).map(|_| OrderId(Uuid::now_v7())).collect();
        let command = |order_id: OrderId, reserve: bool| {
            let envelope = Envelope::request(Uuid::now_v7(), "system:test");
            let command = match reserve {
                true => ProductCommand::ReserveStock {
                    order_id,
                    quantity: Quantity::new(1).unwrap(),
                    reserved_at: Utc::now(),
                    placed_at: None,
                },
                false => ProductCommand::ShipReservedStock {
                    order_id,
                    shipped_at: Utc::now(),
                },
            };
            (envelope, command)
        };
        for reserve in [true, false] {
            let round: Vec<_> = orders.iter().map(|&id| command(id, reserve)).collect();
            let outcomes = saga
                .execute_batch::<ProductAggregate>(&shop.stream, &round)
                .await
                .unwrap();
            assert!(outcomes.iter().all(Result::is_ok));
        }
    }
    // The append that reached version 3,000 took the next snapshot, from the state it left.
    shop.snapshot_at(3_000).await;
    let restored = shop.load_cold().await;
    let folded = shop.folded().await;
    assert_eq!(folded.version, Some(3_000));
    assert_same(&restored, &folded);
    assert_eq!(restored.state.unwrap().reserved(), 0);
}

/// A product with a snapshot at its last event, 1,200, which `spoil` then spoils: a cold load
/// must not trust it, and must replace it with a good one.
async fn a_spoiled_snapshot_is_not_trusted(spoil: &str) {
    let shop = Shop::with_history(600).await;
    shop.load_cold().await;
    shop.snapshot_at(1_200).await;
    // The good snapshot, kept aside to tell its replacement from the spoiled row.
    let client = shop.db.connect().await.unwrap();
    client
        .batch_execute("create table good_snapshot as select * from aggregate_snapshots")
        .await
        .unwrap();
    shop.execute(spoil).await;
    assert_same(&shop.load_cold().await, &shop.folded().await);
    let replaced = format!(
        "select count(*) from aggregate_snapshots s join good_snapshot g using (stream)
         where s.stream = '{}' and s.version = g.version and s.event_id = g.event_id
         and s.format = g.format and s.state::jsonb = g.state::jsonb",
        shop.stream
    );
    eventually(&shop.db, &replaced, 1, Duration::from_secs(30)).await;
    assert_same(&shop.load_cold().await, &shop.folded().await);
}

#[tokio::test]
async fn a_snapshot_the_log_contradicts_is_ignored_and_replaced() {
    // As if the log had been restored from a backup and grown differently since: the event at
    // the snapshot's version is not the one it names (and its stock is wrong).
    a_spoiled_snapshot_is_not_trusted(
        "update aggregate_snapshots
         set event_id = gen_random_uuid(), state = jsonb_set(state::jsonb, '{on_hand}', '7')::text
         where stream = $1",
    )
    .await;
}

#[tokio::test]
async fn a_snapshot_that_breaks_the_product_s_invariants_is_ignored_and_replaced() {
    // Naming the right event, in the right form, but more reserved than the holds add up to.
    a_spoiled_snapshot_is_not_trusted(
        "update aggregate_snapshots set state = jsonb_set(state::jsonb, '{reserved}', '5')::text
         where stream = $1",
    )
    .await;
}

#[tokio::test]
async fn a_snapshot_in_another_form_is_ignored_and_replaced() {
    // Written by another release, in a form this one does not read the same way.
    a_spoiled_snapshot_is_not_trusted(
        "update aggregate_snapshots set format = 999, state = '{\"on_hand\": 7}'
         where stream = $1",
    )
    .await;
}

#[tokio::test]
async fn the_served_command_api_and_saga_both_snapshot_a_long_product() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let api = start(&settings).await;
    register(&api, "MUG-SERVED", 1999, "EUR", 1_000).await;
    // 600 orders behind the product: 1,201 events. (Orders the read models never heard of: the
    // products projection parks them as dead letters, which this test does not look at.)
    let sku = Sku::parse("MUG-SERVED").unwrap();
    let stream = StreamName::parse(streams::product(&sku)).unwrap();
    let store = orderly_service::app::event_store(&settings).unwrap();
    let history = product_history(&sku, 600).unwrap();
    append_all(store.as_ref(), &stream, Some(0), &history[1..])
        .await
        .unwrap();
    let snapshotted = format!(
        "select count(*) from aggregate_snapshots where stream = '{stream}' and version = 1200"
    );

    // The placement prices its line from the product, read whole (nothing cached yet).
    let placed = place(&api, "ada", "MUG-SERVED", 1, "tok_ok").await;
    eventually(&db, &snapshotted, 1, Duration::from_secs(30)).await;
    // Its size is on /metrics: 600 orders' holds, tens of kilobytes of JSON.
    let scraped = api.metrics().await;
    for line in [
        r#"orderly_snapshot_size_bytes_bucket{le="16384"} 0"#,
        r#"orderly_snapshot_size_bytes_bucket{le="268435456"} 1"#,
        "orderly_snapshot_size_bytes_count 1",
    ] {
        assert!(
            scraped.contains(line),
            "no `{line}` on /metrics:\n{scraped}"
        );
    }

    // Without that snapshot, the saga's reservation reads the product whole too, and takes
    // one of its own.
    let client = db.connect().await.unwrap();
    client
        .execute("delete from aggregate_snapshots", &[])
        .await
        .unwrap();
    let gateway = orderly_service::app::payment_gateway(&settings).unwrap();
    let saga = orderly_service::app::saga_runner(&settings, gateway).unwrap();
    tokio::spawn(saga.run_until_stopped(std::future::pending()));
    eventually(&db, &snapshotted, 1, Duration::from_secs(30)).await;
    let confirmed = format!(
        "select count(*) from orders where order_id = '{}' and status = 'CONFIRMED'",
        placed.id
    );
    eventually(&db, &confirmed, 1, Duration::from_secs(30)).await;
}

/// A placement prices its lines from several products at once (`load_many`). One this process
/// holds no state of is loaded from its snapshot when it has one, not read from its start
/// with the others (a long product would cost a page of events read for nothing first).
#[tokio::test]
async fn several_products_loaded_at_once_start_from_the_snapshots_they_have() {
    let shop = Shop::with_history(100).await;
    let other_sku = Sku::parse("MUG-OTHER").unwrap();
    let other = StreamName::parse(streams::product(&other_sku)).unwrap();
    append_all(
        shop.store.as_ref(),
        &other,
        None,
        &product_history(&other_sku, 20).unwrap(),
    )
    .await
    .unwrap();
    // A snapshot at the first product's last event (too short a stream for the handlers to
    // take one: a test writes it), with a name the log never gave, which shows whether the
    // load started from it.
    let folded = shop.folded().await;
    let mut renamed = folded.state.clone().unwrap();
    renamed.name = ProductName::parse("Renamed mug").unwrap();
    let client = shop.db.connect().await.unwrap();
    client
        .execute(
            "insert into aggregate_snapshots
                 (stream, version, event_id, first_event_id, format, state)
             values ($1, $2, $3, $4, $5, $6)",
            &[
                &shop.stream.as_str(),
                &i64::try_from(folded.version.unwrap()).unwrap(),
                &folded.last_event_id.unwrap(),
                &folded.first_event_id.unwrap(),
                &orderly_domain::product::SNAPSHOT_FORMAT,
                &serde_json::to_string(&renamed).unwrap(),
            ],
        )
        .await
        .unwrap();

    let loaded = shop
        .cold()
        .load_many::<ProductAggregate>(&[other.clone(), shop.stream.clone()], Duration::ZERO)
        .await
        .unwrap();
    let other_folded = Handler::new(shop.store.clone())
        .load::<ProductAggregate>(&other)
        .await
        .unwrap();
    assert_same(&loaded[0], &other_folded);
    let from_snapshot = loaded[1].state.as_ref().unwrap();
    assert_eq!(from_snapshot.name, renamed.name);
    assert!(*from_snapshot == renamed, "the rest is the snapshot's too");
    assert_eq!(loaded[1].version, folded.version);
    assert_eq!(loaded[1].last_event_id, folded.last_event_id);
}
