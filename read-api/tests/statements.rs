//! The N+1 check: a page of orders with their lines and history costs the same number of
//! statements whether it holds 1 order or 100, counted where every statement is sent.

use std::time::Duration;

use orderly_event_store::memory::MemoryEventStore;
use orderly_graphql::{Actor, Caller, Role};
use orderly_projections::ProjectionHub;
use orderly_read_api::{ReadApi, ReadLimits, ReadStore};
use orderly_test_support::TestDb;

async fn database() -> TestDb {
    TestDb::create(
        "read-api",
        &orderly_projections::fingerprint_with_event_store(),
        |url| async move {
            orderly_projections::migrate_with_event_store(&url.parse()?)
                .await
                .map_err(Into::into)
        },
    )
    .await
    .expect("a test database (is PostgreSQL up? see deploy/local/ensure-postgres.sh)")
}

/// 100 orders of one customer, 3 lines and 2 status changes each, written straight into the
/// read model: this test is about reading it.
async fn seed(db: &TestDb) {
    db.connect()
        .await
        .unwrap()
        .batch_execute(
            "insert into orders (order_id, customer_id, status, total_minor, currency, ship_name,
                 ship_line1, ship_city, ship_postal_code, ship_country, placed_at, updated_at,
                 version)
             select ('00000000-0000-7000-8000-' || lpad(i::text, 12, '0'))::uuid, 'alice',
                    'STOCK_RESERVED', 300, 'EUR', 'Ada', '1 Main St', 'Berlin', '10115', 'DE',
                    now() - i * interval '1 minute', now(), 1
             from generate_series(1, 100) i;
             insert into order_lines
             select order_id, n, 'SKU-' || n, 'Product ' || n, 1, 100, 100, 'EUR'
             from orders, generate_series(1, 3) n;
             insert into order_status_history
             select order_id, v, case v when 0 then 'PLACED' else 'STOCK_RESERVED' end, now(), null
             from orders, generate_series(0, 1) v;
             insert into customers values ('alice', 100, now());",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_page_with_lines_and_history_costs_three_statements_whatever_its_size() {
    let db = database().await;
    seed(&db).await;
    let pool = orderly_graphql::pg_pool(db.config(), 4).unwrap();
    let store = ReadStore::new(pool);
    let api = ReadApi::new(
        store.clone(),
        std::sync::Arc::new(MemoryEventStore::new()),
        ProjectionHub::new(),
        ReadLimits {
            max_consistency_wait: Duration::from_millis(10),
            ..ReadLimits::default()
        },
    );
    let schema = orderly_read_api::schema(api, async_graphql::ValidationMode::Strict);
    let admin = Caller {
        actor: Some(Actor {
            sub: "admin-1".into(),
            roles: vec![Role::Admin],
        }),
        request_id: "test".into(),
        traceparent: None,
    };
    let mut costs = Vec::new();
    for (query, rows) in [
        (
            "{ orders(first: 1) { nodes { id lines { sku } history { status } payment { status } } } }",
            1,
        ),
        (
            "{ orders(first: 100) { nodes { id lines { sku } history { status } payment { status } } } }",
            100,
        ),
        (
            "{ orders(first: 100) { edges { node { id lines { sku } history { status } } } } }",
            100,
        ),
        (
            "{ customer(id: \"alice\") { orders(first: 100) { nodes { lines { sku } } } } }",
            100,
        ),
    ] {
        let before = store.statements();
        let response = schema
            .execute(async_graphql::Request::new(query).data(admin.clone()))
            .await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        let data = response.data.into_json().unwrap();
        let found = data.to_string().matches("SKU-3").count();
        assert_eq!(found, rows, "{query}: every order has its third line");
        costs.push(store.statements() - before);
    }
    // page + lines + history; page + lines + history; page + lines + history;
    // customer + page + lines.
    assert_eq!(costs, [3, 3, 3, 3]);

    // Without children selected, the page alone.
    let before = store.statements();
    let response = schema
        .execute(
            async_graphql::Request::new("{ orders(first: 100) { nodes { id status } } }")
                .data(admin),
        )
        .await;
    assert!(response.errors.is_empty());
    assert_eq!(store.statements() - before, 1);
}
