//! `orderly seed` writes its workload through the command path, drives it with the saga, and
//! places nothing twice when run again with the same seed.

use std::time::Duration;

use crate::common::*;
use orderly_service::seed::{SeedOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_seed_places_cancels_confirms_ships_and_delivers_through_the_command_path() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.saga.tick = Duration::from_millis(50);
    let options = SeedOptions {
        orders: 40,
        products: 6,
        customers: 12,
        seed: 7,
        declined_share: 0.2,
        cancel_share: 0.2,
        ship_share: 0.8,
        deliver_share: 0.5,
        patience: Duration::from_secs(20),
        ..SeedOptions::default()
    };
    let report = run(&settings, &options).await.unwrap();
    assert_eq!(report.products, 6);
    assert_eq!(report.orders, 40);
    assert_eq!(report.replayed, 0);
    assert_eq!(report.unsettled, 0, "{report:?}");
    assert_eq!(report.confirmed + report.cancelled, 40, "{report:?}");
    assert!(report.cancelled_by_customers > 0, "{report:?}");
    assert!(
        report.shipped > 0 && report.delivered <= report.shipped,
        "{report:?}"
    );

    let events =
        |event_type: &str| format!("select count(*) from events where event_type = '{event_type}'");
    assert_eq!(count(&db, &events("ProductRegistered")).await, 6);
    assert_eq!(count(&db, &events("OrderPlaced")).await, 40);
    assert!(
        count(&db, &events("PaymentDeclined")).await > 0,
        "some tok_declined"
    );
    assert_eq!(
        count(&db, &events("OrderShipped")).await,
        report.shipped as i64
    );
    assert_eq!(
        count(&db, &events("OrderDelivered")).await,
        report.delivered as i64
    );
    // The command path: every placement carries its customer as actor and a seed key.
    assert_eq!(
        count(
            &db,
            "select count(*) from events where event_type = 'OrderPlaced'
             and metadata->>'actor' like 'customer-%'
             and metadata->>'idempotency_key' like 'seed-7-%'
             and data->>'customer_id' = metadata->>'actor'"
        )
        .await,
        40
    );
    assert!(
        count(
            &db,
            "select count(distinct metadata->>'actor') from events where event_type = 'OrderPlaced'"
        )
        .await
            > 1
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from events where event_type = 'OrderShipped'
             and metadata->>'actor' = 'seed-warehouse'"
        )
        .await,
        report.shipped as i64
    );
    // The saga followed the shipments: each shipped order's stock left the shelves.
    assert_eq!(
        count(
            &db,
            "select count(distinct data->>'order_id') from events
             where event_type = 'ReservedStockShipped'"
        )
        .await,
        report.shipped as i64
    );

    let again = run(&settings, &options).await.unwrap();
    assert_eq!((again.products, again.replayed), (0, 40), "{again:?}");
    assert_eq!(count(&db, &events("OrderPlaced")).await, 40);
}
