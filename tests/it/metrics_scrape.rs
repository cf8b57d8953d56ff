//! `GET /metrics` after real traffic: an order placed, paid, shipped and delivered through the
//! API, the saga and the projections. The scrape must pass `promtool check metrics` and hold
//! every name `deploy/METRICS.md` lists for these roles, with the documented buckets.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::json;

/// Names the test below does not provoke: subscriptions have a test of their own, and the
/// read API records consistency waits (through `orderly_graphql::metrics`).
const NOT_HERE: [&str; 6] = [
    "orderly_graphql_subscriptions_active",
    "orderly_consistency_wait_seconds",
    // Counted only when a saga step fails for good or is retried after a failure.
    "orderly_saga_parked_total",
    "orderly_saga_retries_total",
    // Counted only for streams of a thousand events and more (`snapshots` has its tests).
    "orderly_snapshots_total",
    "orderly_snapshot_size_bytes",
];

/// Every `orderly_*` name in the contract's tables, read from the contract itself so that a
/// name added there and not exported fails here.
fn documented_names() -> Vec<String> {
    let contract =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/METRICS.md")).unwrap();
    let mut names: Vec<String> = contract
        .lines()
        .filter(|line| line.starts_with("| `orderly_"))
        .filter_map(|line| line.split('`').nth(1).map(str::to_owned))
        .collect();
    names.extend(
        [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ]
        .map(str::to_owned),
    );
    names
}

async fn scrape(api: &Api) -> String {
    let response = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool(text: &str) -> (bool, String) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = spawned.unwrap_or_else(|error| {
        panic!(
            "promtool is needed by this test and could not run ({error}); install it with \
             `apt-get install prometheus` (deploy/local/test.sh does)"
        )
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scrape_after_an_order_passes_promtool_and_holds_every_documented_name() {
    let db = migrated_database().await;
    let api = start_with_saga(&settings_for(db.url())).await;

    register(&api, "MUG-1", 1250, "EUR", 10).await;
    let placed = api
        .gql(
            Some(&customer("alice")),
            PLACE,
            order_input(json!([{ "sku": "MUG-1", "quantity": 2 }]), "tok_ok"),
        )
        .await;
    let order_id = placed.data("placeOrder")["id"].as_str().unwrap().to_owned();
    eventually(
        &db,
        "select count(*) from orders where status = 'CONFIRMED'",
        1,
        Duration::from_secs(30),
    )
    .await;
    api.gql(Some(&warehouse()), SHIP, json!({ "id": order_id }))
        .await
        .data("shipOrder");
    api.gql(Some(&warehouse()), DELIVER, json!({ "id": order_id }))
        .await
        .data("markDelivered");
    eventually(
        &db,
        "select count(*) from saga_states where settled",
        1,
        Duration::from_secs(30),
    )
    .await;
    // A rejection, a request that does not validate, and one refused before it is read.
    api.gql(
        Some(&customer("bob")),
        CANCEL,
        json!({ "id": order_id, "reason": "x" }),
    )
    .await;
    api.gql(None, "{ nosuchField }", json!({})).await;
    api.raw(None, "not json").await;
    let ready = reqwest::get(format!("{}/readyz", api.base)).await.unwrap();
    assert_eq!(ready.status(), 200);

    // Conflicts need writers racing on one stream: concurrent restocks of one product, in
    // rounds until the store has refused one (almost always in the first).
    let warehouse = warehouse();
    for _ in 0..20 {
        let restocks =
            (0..8).map(|_| api.gql(Some(&warehouse), RESTOCK, json!({ "sku": "MUG-1", "q": 1 })));
        futures::future::join_all(restocks).await;
        if scrape(&api)
            .await
            .contains("orderly_append_conflicts_total{")
        {
            break;
        }
    }
    // Projection lag and the saga's census are sampled; the first samples come at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&api).await;

    let (passed, said) = promtool(&text);
    assert!(passed, "promtool check metrics: {said}\n{text}");

    for name in documented_names() {
        if NOT_HERE.contains(&name.as_str()) {
            continue;
        }
        let typed = format!("# TYPE {name} ");
        assert!(
            text.contains(&typed),
            "{name} missing from the scrape:\n{text}"
        );
    }
    for series in [
        r#"orderly_http_request_duration_seconds_bucket{operation="placeOrder",kind="mutation",outcome="ok",le="0.001"}"#,
        r#"operation="cancelOrder",kind="mutation",outcome="rejected""#,
        r#"operation="invalid",kind="query",outcome="rejected""#,
        r#"orderly_http_responses_total{status="2xx"}"#,
        r#"orderly_http_responses_total{status="4xx"}"#,
        r#"orderly_commands_total{command="order.place",outcome="ok"} 1"#,
        r#"orderly_commands_total{command="order.confirm",outcome="ok"} 1"#,
        r#"orderly_commands_total{command="product.ship_reserved_stock",outcome="ok"} 1"#,
        r#"orderly_event_store_append_duration_seconds_bucket{store="postgres",outcome="ok",le="0.0005"}"#,
        r#"orderly_event_store_appended_events_total{category="order"}"#,
        r#"orderly_projection_batch_size_bucket{projection="orders",le="1"}"#,
        r#"orderly_projection_state{projection="orders",state="running"} 1"#,
        r#"orderly_projection_state{projection="orders",state="standby"} 0"#,
        r#"orderly_dead_letters{projection="orders"} 0"#,
        r#"orderly_saga_settled_total{outcome="delivered"} 1"#,
        r#"orderly_saga_instances{state="reserving"}"#,
        r#"orderly_payment_requests_total{outcome="charged"} 1"#,
        r#"orderly_payment_breaker_state 0"#,
        r#"orderly_outbox_dead_letters 0"#,
        r#"orderly_notifications_total{outcome="sent"} 1"#,
        r#"orderly_readiness_check{check="projections"} 1"#,
        r#"orderly_db_pool_max_connections{pool="event_store"} 8"#,
        r#"orderly_db_pool_max_connections{pool="read_models"} 8"#,
        r#"orderly_db_pool_connections{pool="read_models",state="idle"}"#,
        r#"orderly_build_info{version="0.1.0",event_store="postgres"} 1"#,
        r#"orderly_tokio_probe_delay_seconds_bucket{le="0.0001"}"#,
    ] {
        assert!(text.contains(series), "no {series} in the scrape:\n{text}");
    }
    // This test's runtime has four workers.
    assert!(text.contains("orderly_tokio_workers 4"), "{text}");
}

#[test]
fn promtool_refuses_a_broken_exposition() {
    let (passed, _) = promtool("# TYPE orderly_x counter\norderly_x{le=} 1\n");
    assert!(
        !passed,
        "promtool must catch malformed text, or the test above proves nothing"
    );
}

/// The value of `series` (a name with its labels) in a scrape.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn an_open_subscription_counts_until_its_socket_closes() {
    use futures::StreamExt;

    let Shop { db: _db, api, .. } = Shop::open().await;
    let mut socket = connect(&api, Some(&admin())).await;
    let query = "subscription { events(category: \"product\") { type } }";
    subscribe(&mut socket, "1", query, json!({})).await;
    let active = r#"orderly_graphql_subscriptions_active{operation="events"}"#;
    let mut open = None;
    for _ in 0..100 {
        open = value(&scrape(&api).await, active);
        if open == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open, Some(1.0), "the subscription never counted as open");
    let text = scrape(&api).await;
    assert!(
        text.contains(r#"orderly_http_request_duration_seconds_count{operation="events",kind="subscription",outcome="ok"} 1"#),
        "{text}"
    );

    socket.close(None).await.unwrap();
    while socket.next().await.is_some() {}
    for _ in 0..100 {
        open = value(&scrape(&api).await, active);
        if open == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open,
        Some(0.0),
        "a closed subscription still counts as open"
    );
}
