//! The API against hostile input and tokens, over HTTP against a real PostgreSQL: bad values
//! are the caller's (BAD_USER_INPUT, never INTERNAL, nothing written), tokens must carry what
//! the server is configured to require, and a database error says what the database said.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use orderly_command_api::CommandError;
use orderly_read_api::ReadError;
use serde_json::{Value, json};

const ORDERS: &str = "query($f: OrderFilter, $after: String) {
  orders(filter: $f, after: $after) { nodes { id } } }";

async fn events(db: &orderly_test_support::TestDb) -> i64 {
    count(db, "select count(*) from events").await
}

#[tokio::test]
async fn control_characters_in_any_argument_are_bad_user_input_and_write_nothing() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "MUG", 1250, "EUR", 10).await;
    let admin = admin();
    let alice = customer("alice");
    let nul = "a\u{0}b";
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "product",
            "query($s: String!) { product(sku: $s) { sku } }",
            json!({ "s": nul }),
        ),
        (
            "products",
            "query($s: String) { products(search: $s) { nodes { sku } } }",
            json!({ "s": nul }),
        ),
        (
            "products cursor",
            "query($a: String) { products(after: $a) { nodes { sku } } }",
            json!({ "a": nul }),
        ),
        ("orders cursor", ORDERS, json!({ "after": nul })),
        (
            "orders customerId",
            ORDERS,
            json!({ "f": { "customerId": nul } }),
        ),
        (
            "searchOrders",
            "query($q: String!) { searchOrders(query: $q) { nodes { id } } }",
            json!({ "q": nul }),
        ),
        (
            "customer",
            "query($id: String!) { customer(id: $id) { id } }",
            json!({ "id": nul }),
        ),
    ];
    for (what, query, variables) in cases {
        let answer = api.gql(Some(&admin), query, variables).await;
        assert_eq!(answer.status, 200, "{what}: {}", answer.body);
        assert_eq!(answer.code(), "BAD_USER_INPUT", "{what}: {}", answer.body);
    }
    // Inline in the document, too.
    let inline = api
        .gql(None, "{ product(sku: \"MUG\\u0000\") { sku } }", json!({}))
        .await;
    assert_eq!(inline.code(), "BAD_USER_INPUT", "{}", inline.body);

    let before = events(&db).await;
    for key in [nul, "key\u{1b}[31m", "line\nbreak"] {
        let mut input = order_input(json!([{ "sku": "MUG", "quantity": 1 }]), "tok_ok");
        input["input"]["idempotencyKey"] = json!(key);
        let answer = api.gql(Some(&alice), PLACE, input).await;
        assert_eq!(answer.code(), "BAD_USER_INPUT", "{key:?}: {}", answer.body);
    }
    let mut input = order_input(json!([{ "sku": "MUG", "quantity": 1 }]), "tok_ok");
    input["input"]["shippingAddress"]["city"] = json!("Ber\u{0}lin");
    let answer = api.gql(Some(&alice), PLACE, input).await;
    assert_eq!(answer.code(), "BAD_USER_INPUT", "{}", answer.body);
    assert_eq!(
        events(&db).await,
        before,
        "a refused placement wrote events"
    );
}

#[tokio::test]
async fn times_and_cursors_postgres_cannot_hold_are_bad_user_input() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    let admin = admin();
    let far_past = api
        .gql(
            Some(&admin),
            ORDERS,
            json!({ "f": { "placedFrom": "-5000-01-01T00:00:00Z" } }),
        )
        .await;
    assert_eq!(far_past.code(), "BAD_USER_INPUT", "{}", far_past.body);
    assert_eq!(far_past.error()["extensions"]["field"], "filter.placedFrom");
    // The earliest time PostgreSQL stores is still a fine filter.
    let earliest = api
        .gql(
            Some(&admin),
            ORDERS,
            json!({ "f": { "placedFrom": "-4713-11-24T00:00:00Z", "placedTo": "+200000-01-01T00:00:00Z" } }),
        )
        .await;
    earliest.data("orders");
    for forged in [
        format!("o1:-8000000000000000000:{}", uuid::Uuid::nil()),
        format!("o1:9223372036854775807:{}", uuid::Uuid::nil()),
        "p1:MUG:Mu\u{0}g".to_owned(),
    ] {
        let cursor = URL_SAFE_NO_PAD.encode(&forged);
        let answer = api
            .gql(Some(&admin), ORDERS, json!({ "after": cursor }))
            .await;
        assert_eq!(answer.code(), "BAD_USER_INPUT", "{forged}: {}", answer.body);
        let products = api
            .gql(
                None,
                "query($a: String) { products(after: $a) { nodes { sku } } }",
                json!({ "a": cursor }),
            )
            .await;
        assert_eq!(
            products.code(),
            "BAD_USER_INPUT",
            "{forged}: {}",
            products.body
        );
    }
}

#[tokio::test]
async fn only_iso_4217_currencies_are_accepted() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    let before = events(&db).await;
    for currency in ["ZZZ", "XXX", "eur"] {
        let answer = api
            .gql(
                Some(&admin()),
                REGISTER,
                json!({ "input": { "sku": "MUG", "name": "Mug", "priceMinor": 100,
                    "currency": currency, "initialStock": 1 } }),
            )
            .await;
        assert_eq!(
            answer.code(),
            "BAD_USER_INPUT",
            "{currency}: {}",
            answer.body
        );
        assert_eq!(answer.error()["extensions"]["field"], "input.currency");
    }
    assert_eq!(events(&db).await, before);
    register(&api, "MUG", 100, "JPY", 1).await;
}

#[tokio::test]
async fn a_token_without_a_role_reads_nothing_not_even_its_subjects_orders() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "MUG", 1250, "EUR", 10).await;
    let id = place_one(&api, "alice", "MUG").await;
    let roleless = token("alice", &[]);
    let reads = [
        (ORDERS, json!({})),
        (
            "query($id: UUID!) { order(id: $id) { id } }",
            json!({ "id": id }),
        ),
        (
            "query($id: UUID!) { orderEvents(orderId: $id) { type } }",
            json!({ "id": id }),
        ),
        (
            "query { searchOrders(query: \"MUG\") { nodes { id } } }",
            json!({}),
        ),
        ("query { customer(id: \"alice\") { id } }", json!({})),
    ];
    for (query, variables) in reads {
        let answer = api.gql(Some(&roleless), query, variables).await;
        assert_eq!(answer.code(), "FORBIDDEN", "{query}: {}", answer.body);
    }
    // Products stay public.
    let products = api
        .gql(Some(&roleless), "{ products { nodes { sku } } }", json!({}))
        .await;
    products.data("products");
}

#[tokio::test]
async fn a_value_the_database_refuses_is_the_callers_input_and_says_why() {
    let db = migrated_database().await;
    let client = db.connect().await.unwrap();
    let refused = || async {
        client
            .query_one("select $1::text", &[&"a\u{0}b"])
            .await
            .unwrap_err()
    };
    let described = orderly_event_store::postgres::describe(&refused().await);
    assert!(described.contains("22021"), "{described}");
    assert!(described.contains("0x00"), "{described}");
    assert!(matches!(
        ReadError::from(refused().await),
        ReadError::Invalid { .. }
    ));
    assert!(matches!(
        CommandError::from(refused().await),
        CommandError::InvalidInput { .. }
    ));
}

#[tokio::test]
async fn a_server_that_refuses_connections_stops_the_start_with_its_reason_and_the_budget() {
    let db = migrated_database().await;
    let role = format!("refused_{}", uuid::Uuid::new_v4().simple());
    let admin_client = db.connect().await.unwrap();
    // A role's connection limit answers as a full server does: SQLSTATE 53300.
    admin_client
        .batch_execute(&format!("create role {role} login connection limit 0"))
        .await
        .unwrap();
    let settings = orderly::settings::Settings {
        database_url: db.url().replacen("postgres@", &format!("{role}@"), 1),
        ..settings_for(db.url())
    };
    let budget =
        orderly::app::ConnectionBudget::of(&settings, orderly::app::Part::Everything, true);
    let error = orderly::app::check_connections(&settings, &budget)
        .await
        .expect_err("the start must stop")
        .to_string();
    admin_client
        .batch_execute(&format!("drop role {role}"))
        .await
        .unwrap();
    assert!(error.contains("53300"), "{error}");
    assert!(error.contains("too many connections"), "{error}");
    assert!(error.contains(&budget.to_string()), "{error}");
    // A server with room passes.
    orderly::app::check_connections(&settings_for(db.url()), &budget)
        .await
        .unwrap();
}

#[tokio::test]
async fn someone_elses_order_and_a_missing_one_answer_alike_everywhere() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "MUG", 1250, "EUR", 10).await;
    let alices = place_one(&api, "alice", "MUG").await;
    let missing = uuid::Uuid::new_v4().to_string();
    let bob = customer("bob");
    let mut answers = Vec::new();
    for id in [&alices, &missing] {
        let order = api
            .gql(
                Some(&bob),
                "query($id: UUID!) { order(id: $id) { id } }",
                json!({ "id": id }),
            )
            .await;
        let events = api
            .gql(
                Some(&bob),
                "query($id: UUID!) { orderEvents(orderId: $id) { type } }",
                json!({ "id": id }),
            )
            .await;
        let cancel = api
            .gql(
                Some(&bob),
                CANCEL,
                json!({ "id": id, "reason": "mine?", "v": 0 }),
            )
            .await;
        let mut socket = connect(&api, Some(&bob)).await;
        subscribe(
            &mut socket,
            "1",
            "subscription($id: UUID!) { orderUpdated(orderId: $id) { id } }",
            json!({ "id": id }),
        )
        .await;
        let followed = refusal(&next(&mut socket).await).to_owned();
        answers.push((
            order.data("order").clone(),
            events.data("orderEvents").clone(),
            cancel.code().to_owned(),
            cancel.error()["message"].clone(),
            followed,
        ));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].2, "NOT_FOUND");
    assert_eq!(answers[0].4, "NOT_FOUND");
}

#[tokio::test]
async fn no_answer_carries_a_payment_token_whoever_asks() {
    let db = migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "MUG", 1250, "EUR", 10).await;
    let placed = api
        .gql(
            Some(&customer("alice")),
            PLACE,
            order_input(json!([{ "sku": "MUG", "quantity": 1 }]), "tok_ok_4242"),
        )
        .await;
    let id = placed.data("placeOrder")["id"].as_str().unwrap().to_owned();
    for reader in [warehouse(), admin(), customer("alice")] {
        let answer = api
            .gql(
                Some(&reader),
                "query($id: UUID!) { orderEvents(orderId: $id) { type data } }",
                json!({ "id": id }),
            )
            .await;
        let placed = &answer.data("orderEvents")[0];
        assert_eq!(placed["type"], "OrderPlaced");
        assert_eq!(placed["data"]["payment_token"], "[redacted]");
        assert!(
            !answer.body.to_string().contains("tok_ok_4242"),
            "{}",
            answer.body
        );
    }
}
