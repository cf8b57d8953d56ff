//! Subscriptions over graphql-transport-ws against the running app: `orderUpdated` follows an
//! order through the saga and the warehouse, `events` catches up and goes live, and who may
//! follow what.

mod common;

use std::sync::Arc;

use common::*;
use orderly_command_api::saga::SagaRunner;
use serde_json::json;

fn start_saga(settings: &orderly::settings::Settings) {
    let gateway = orderly::app::payment_gateway(settings).unwrap();
    let runner: SagaRunner = orderly::app::saga_runner(settings, gateway as Arc<_>).unwrap();
    tokio::spawn(runner.run_until_stopped(std::future::pending()));
}

const FOLLOW: &str = "subscription($id: UUID!, $after: Int) {
  orderUpdated(orderId: $id, afterVersion: $after) { id status version history { status } } }";

#[tokio::test]
async fn order_updated_pushes_every_status_change_of_an_order_in_order() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let placed = api
        .gql(
            Some(&alice),
            PLACE,
            order_input(json!([{ "sku": "TEA", "quantity": 2 }]), "tok_ok"),
        )
        .await;
    let id = placed.data("placeOrder")["id"].as_str().unwrap().to_owned();

    let mut socket = connect(&api, Some(&alice)).await;
    // Everything after the placement (version 0), whenever the subscription is set up.
    subscribe(&mut socket, "1", FOLLOW, json!({ "id": id, "after": 0 })).await;
    start_saga(&settings);

    let mut statuses = Vec::new();
    let mut versions = Vec::new();
    while statuses.len() < 5 {
        let message = next(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        let order = &message["payload"]["data"]["orderUpdated"];
        let status = order["status"].as_str().unwrap().to_owned();
        let version = order["version"].as_i64().unwrap();
        assert_eq!(
            order["history"].as_array().unwrap().len() as i64,
            version + 1,
            "{order}"
        );
        assert_eq!(
            order["history"].as_array().unwrap().last().unwrap()["status"],
            status.as_str()
        );
        if status == "CONFIRMED" {
            let shipped = api.gql(Some(&warehouse()), SHIP, json!({ "id": id })).await;
            shipped.data("shipOrder");
        }
        if status == "SHIPPED" {
            api.gql(Some(&warehouse()), DELIVER, json!({ "id": id }))
                .await
                .data("markDelivered");
        }
        statuses.push(status);
        versions.push(version);
    }
    assert_eq!(
        statuses,
        [
            "STOCK_RESERVED",
            "PAID",
            "CONFIRMED",
            "SHIPPED",
            "DELIVERED"
        ]
    );
    assert_eq!(versions, [1, 2, 3, 4, 5]);

    // Another customer may not follow it; without a token nobody may.
    let mut bob = connect(&api, Some(&customer("bob"))).await;
    subscribe(&mut bob, "2", FOLLOW, json!({ "id": id })).await;
    assert_eq!(refusal(&next(&mut bob).await), "NOT_FOUND");
    let mut nobody = connect(&api, None).await;
    subscribe(&mut nobody, "3", FOLLOW, json!({ "id": id })).await;
    assert_eq!(refusal(&next(&mut nobody).await), "UNAUTHENTICATED");
}

const EVENTS: &str = "subscription($stream: String, $category: String, $from: ConsistencyToken) {
  events(stream: $stream, category: $category, from: $from) { type stream version position data } }";

#[tokio::test]
async fn events_catch_up_from_a_token_then_follow_the_log_live_with_filters() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let placed = api
        .gql(
            Some(&alice),
            PLACE,
            order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok"),
        )
        .await;
    let id = placed.data("placeOrder")["id"].as_str().unwrap().to_owned();

    // Admin, products only, from the start of the log: the registration, then live events.
    let mut admin_socket = connect(&api, Some(&admin())).await;
    subscribe(
        &mut admin_socket,
        "p",
        EVENTS,
        json!({ "category": "product", "from": "00000000000000000000000000000000" }),
    )
    .await;
    let first = next(&mut admin_socket).await;
    let event = &first["payload"]["data"]["events"];
    assert_eq!(event["type"], "ProductRegistered", "{first}");
    assert_eq!(event["stream"], "product-TEA");
    api.gql(
        Some(&admin()),
        "mutation { restock(sku: \"TEA\", quantity: 3) { token } }",
        json!({}),
    )
    .await
    .data("restock");
    let live = next(&mut admin_socket).await;
    let event = &live["payload"]["data"]["events"];
    assert_eq!(event["type"], "ProductRestocked", "{live}");
    assert_eq!(event["version"], 1);
    assert!(
        event["position"].as_str().unwrap()
            > first["payload"]["data"]["events"]["position"]
                .as_str()
                .unwrap()
    );

    // A customer may follow their own order's stream, not the log.
    let mut socket = connect(&api, Some(&alice)).await;
    subscribe(
        &mut socket,
        "mine",
        EVENTS,
        json!({ "stream": format!("order-{id}"), "from": "00000000000000000000000000000000" }),
    )
    .await;
    let own = next(&mut socket).await;
    assert_eq!(
        own["payload"]["data"]["events"]["type"], "OrderPlaced",
        "{own}"
    );
    subscribe(&mut socket, "all", EVENTS, json!({})).await;
    let refused = next(&mut socket).await;
    assert_eq!(refused["id"], "all");
    assert_eq!(refusal(&refused), "FORBIDDEN");
    let mut bob = connect(&api, Some(&customer("bob"))).await;
    subscribe(
        &mut bob,
        "theirs",
        EVENTS,
        json!({ "stream": format!("order-{id}") }),
    )
    .await;
    assert_eq!(refusal(&next(&mut bob).await), "FORBIDDEN");

    // Contradicting filters are bad input.
    subscribe(
        &mut admin_socket,
        "bad",
        EVENTS,
        json!({ "stream": "product-TEA", "category": "order" }),
    )
    .await;
    assert_eq!(refusal(&next(&mut admin_socket).await), "BAD_USER_INPUT");
    subscribe(
        &mut admin_socket,
        "unknown",
        "subscription { events { nope } }",
        json!({}),
    )
    .await;
    assert_eq!(refusal(&next(&mut admin_socket).await), "BAD_USER_INPUT");
}
