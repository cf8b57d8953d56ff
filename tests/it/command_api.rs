//! The command API over HTTP: every mutation's success path, each error code of the contract,
//! idempotent retries (also racing ones), and bad input that must never become a 5xx.

use crate::common::*;
use orderly_event_schemas::orders::OrderPlaced;
use orderly_event_schemas::{Event, OrderEvent, decode_recorded};
use orderly_graphql::Role;
use serde_json::json;

/// Every `OrderPlaced` stored, in log order, with the actor of its metadata.
async fn placed_orders(db: &orderly_test_support::TestDb) -> Vec<(OrderPlaced, String)> {
    let rows = db
        .connect()
        .await
        .unwrap()
        .query(
            "select data, metadata from events where event_type = 'OrderPlaced'
             order by tx_id, seq",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let stored = decode_recorded("OrderPlaced", row.get(0), row.get(1)).unwrap();
            let Event::Order(OrderEvent::OrderPlaced(placed)) = stored.event else {
                panic!("not an OrderPlaced");
            };
            (placed, stored.metadata.actor)
        })
        .collect()
}

#[tokio::test]
async fn products_are_registered_restocked_and_repriced_with_versions_and_tokens() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let answer = api
        .gql(
            Some(&admin()),
            REGISTER,
            json!({ "input": { "sku": "TEA-1", "name": "Green tea", "description": "100 g",
                "priceMinor": 650, "currency": "EUR", "initialStock": 5 } }),
        )
        .await;
    let result = answer.data("registerProduct");
    assert_eq!(result["id"], "TEA-1");
    assert_eq!(result["version"], 0);
    assert_eq!(result["events"], json!(["ProductRegistered"]));
    assert_eq!(result["replayed"], false);
    let token = result["token"].as_str().unwrap();
    assert_eq!(token.len(), 32, "{token}");

    let restocked = api
        .gql(
            Some(&warehouse()),
            RESTOCK,
            json!({ "sku": "TEA-1", "q": 10, "v": 0 }),
        )
        .await;
    assert_eq!(restocked.data("restock")["version"], 1);
    assert_eq!(
        restocked.data("restock")["events"],
        json!(["ProductRestocked"])
    );

    let repriced = api
        .gql(
            Some(&admin()),
            CHANGE_PRICE,
            json!({ "sku": "TEA-1", "p": 700 }),
        )
        .await;
    assert_eq!(repriced.data("changePrice")["version"], 2);
    assert_eq!(
        repriced.data("changePrice")["events"],
        json!(["ProductPriceChanged"])
    );
}

#[tokio::test]
async fn a_price_changed_through_the_api_prices_the_next_order_at_once() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let tea = || order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok");
    // The first placement reads the product, and keeps it for the price max age (100 ms).
    api.gql(Some(&alice), PLACE, tea()).await.data("placeOrder");
    let repriced = api
        .gql(
            Some(&admin()),
            CHANGE_PRICE,
            json!({ "sku": "TEA", "p": 700 }),
        )
        .await;
    assert_eq!(repriced.data("changePrice")["version"], 1);
    api.gql(Some(&alice), PLACE, tea()).await.data("placeOrder");
    let totals: Vec<i64> = placed_orders(&db)
        .await
        .iter()
        .map(|(placed, _)| placed.total.amount_minor())
        .collect();
    assert_eq!(totals, [650, 700], "a change made here counts at once");
}

#[tokio::test]
async fn a_stale_expected_version_is_a_conflict_that_names_the_actual_version() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "MUG", 1200, "EUR", 3).await;
    let answer = api
        .gql(
            Some(&warehouse()),
            RESTOCK,
            json!({ "sku": "MUG", "q": 1, "v": 7 }),
        )
        .await;
    assert_eq!(answer.code(), "CONFLICT");
    assert_eq!(answer.error()["extensions"]["actualVersion"], 0);
}

#[tokio::test]
async fn an_order_is_placed_cancelled_by_its_customer_and_a_second_cancel_appends_nothing() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    register(&api, "MUG", 1200, "EUR", 10).await;
    let alice = customer("alice");
    let placed = api
        .gql(
            Some(&alice),
            PLACE,
            order_input(
                json!([{ "sku": "TEA", "quantity": 2 }, { "sku": "MUG", "quantity": 1 }]),
                "tok_ok",
            ),
        )
        .await;
    let result = placed.data("placeOrder");
    assert_eq!(result["events"], json!(["OrderPlaced"]));
    assert_eq!(result["version"], 0);
    let order_id = result["id"].as_str().unwrap().to_owned();

    let placed = placed_orders(&db).await;
    assert_eq!(placed.len(), 1);
    let (p, actor) = &placed[0];
    assert_eq!(actor, "alice");
    assert_eq!(
        p.total.amount_minor(),
        2 * 650 + 1200,
        "prices come from the catalog"
    );

    let mallory = api
        .gql(
            Some(&customer("mallory")),
            CANCEL,
            json!({ "id": order_id, "reason": "mine now" }),
        )
        .await;
    assert_eq!(
        mallory.code(),
        "NOT_FOUND",
        "another customer's order is invisible"
    );

    let cancelled = api
        .gql(
            Some(&alice),
            CANCEL,
            json!({ "id": order_id, "reason": "changed my mind" }),
        )
        .await;
    assert_eq!(
        cancelled.data("cancelOrder")["events"],
        json!(["OrderCancelled"])
    );
    let again = api
        .gql(
            Some(&alice),
            CANCEL,
            json!({ "id": order_id, "reason": "changed my mind" }),
        )
        .await;
    assert_eq!(again.data("cancelOrder")["events"], json!([]));
    assert_eq!(again.data("cancelOrder")["replayed"], true);
    // The log agrees: one cancellation in the order's stream.
    let cancellations = format!(
        "select count(*) from events where stream = 'order-{order_id}' and event_type = 'OrderCancelled'"
    );
    assert_eq!(count(&db, &cancellations).await, 1);
}

#[tokio::test]
async fn shipping_an_unpaid_order_is_rejected_with_a_reason_and_customers_may_not_ship() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let order_id = place_one(&api, "alice", "TEA").await;
    let forbidden = api
        .gql(Some(&customer("alice")), SHIP, json!({ "id": order_id }))
        .await;
    assert_eq!(forbidden.code(), "FORBIDDEN");
    let rejected = api
        .gql(Some(&warehouse()), SHIP, json!({ "id": order_id }))
        .await;
    assert_eq!(rejected.code(), "REJECTED");
    assert!(
        rejected.error()["extensions"]["reason"]
            .as_str()
            .unwrap()
            .contains("ship")
    );
    let undelivered = api
        .gql(Some(&warehouse()), DELIVER, json!({ "id": order_id }))
        .await;
    assert_eq!(undelivered.code(), "REJECTED");
    let missing = api
        .gql(
            Some(&warehouse()),
            DELIVER,
            json!({ "id": uuid::Uuid::now_v7() }),
        )
        .await;
    assert_eq!(missing.code(), "NOT_FOUND");
}

#[tokio::test]
async fn a_retry_with_the_same_key_returns_the_first_result_and_appends_nothing() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let mut input = order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok");
    input["input"]["idempotencyKey"] = json!("checkout-42");
    let first = api.gql(Some(&alice), PLACE, input.clone()).await;
    let first = first.data("placeOrder").clone();
    assert_eq!(first["replayed"], false);
    let second = api.gql(Some(&alice), PLACE, input.clone()).await;
    let second = second.data("placeOrder").clone();
    assert_eq!(second["replayed"], true);
    for field in ["id", "version", "token", "events"] {
        assert_eq!(first[field], second[field], "{field}");
    }
    // Naming herself as the customer is what leaving it out means: the same request.
    let mut spelt_out = input.clone();
    spelt_out["input"]["customerId"] = json!("alice");
    let third = api.gql(Some(&alice), PLACE, spelt_out).await;
    let third = third.data("placeOrder").clone();
    assert_eq!(third["replayed"], true, "{third}");
    assert_eq!(third["id"], first["id"]);
    // The key is scoped per customer: bob's identical key is a different order.
    let bob = api.gql(Some(&customer("bob")), PLACE, input.clone()).await;
    assert_ne!(bob.data("placeOrder")["id"], first["id"]);
    // The same key for a different request is refused.
    let mut other = input.clone();
    other["input"]["lines"][0]["quantity"] = json!(2);
    let reused = api.gql(Some(&alice), PLACE, other).await;
    assert_eq!(reused.code(), "BAD_USER_INPUT");
    assert_eq!(
        reused.error()["extensions"]["field"],
        "input.idempotencyKey"
    );
    let placed = placed_orders(&db).await.len();
    assert_eq!(placed, 2, "alice's order once, bob's once");
}

/// A keyed retry is answered with its first result even where today's prices would refuse the
/// order: a price raised since puts its total past what money holds.
#[tokio::test]
async fn a_keyed_retry_is_answered_after_a_price_change_that_would_refuse_it() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "BULK", 4_000_000, "EUR", 10).await;
    let alice = customer("alice");
    let lines = json!([{ "sku": "BULK", "quantity": 2_000_000_000 }]);
    let mut input = order_input(lines, "tok_ok");
    input["input"]["idempotencyKey"] = json!("bulk-1");
    let first = api.gql(Some(&alice), PLACE, input.clone()).await;
    let first = first.data("placeOrder").clone();
    api.gql(
        Some(&admin()),
        CHANGE_PRICE,
        json!({ "sku": "BULK", "p": 5_000_000 }),
    )
    .await
    .data("changePrice");
    let second = api.gql(Some(&alice), PLACE, input.clone()).await;
    let second = second.data("placeOrder");
    assert_eq!(second["replayed"], true, "{second}");
    for field in ["id", "version", "token", "events"] {
        assert_eq!(first[field], second[field], "{field}");
    }
    // A new key is priced anew, and refused.
    input["input"]["idempotencyKey"] = json!("bulk-2");
    let refused = api.gql(Some(&alice), PLACE, input).await;
    assert_eq!(refused.code(), "BAD_USER_INPUT", "{}", refused.body);
    assert_eq!(placed_orders(&db).await.len(), 1);
}

#[tokio::test]
async fn concurrent_calls_with_one_key_place_one_order() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let alice = customer("alice");
    let mut input = order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok");
    input["input"]["idempotencyKey"] = json!("double-click");
    let calls = (0..8).map(|_| api.gql(Some(&alice), PLACE, input.clone()));
    let answers = futures::future::join_all(calls).await;
    let results: Vec<_> = answers
        .iter()
        .map(|a| a.data("placeOrder").clone())
        .collect();
    assert!(results.iter().all(|r| r["id"] == results[0]["id"]));
    assert!(results.iter().all(|r| r["token"] == results[0]["token"]));
    let fresh = results.iter().filter(|r| r["replayed"] == false).count();
    assert_eq!(fresh, 1, "exactly one call wrote: {results:?}");
    let placed = placed_orders(&db).await.len();
    assert_eq!(placed, 1);
}

#[tokio::test]
async fn racing_calls_with_one_key_and_two_requests_place_one_and_refuse_the_other() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let alice = customer("alice");
    let mut one = order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok");
    one["input"]["idempotencyKey"] = json!("race");
    let mut two = one.clone();
    two["input"]["lines"][0]["quantity"] = json!(3);
    let calls = (0..8).map(|i| {
        let input = if i % 2 == 0 { one.clone() } else { two.clone() };
        api.gql(Some(&alice), PLACE, input)
    });
    let answers = futures::future::join_all(calls).await;
    let placed: Vec<_> = answers
        .iter()
        .filter(|a| a.body.get("errors").is_none())
        .map(|a| a.data("placeOrder").clone())
        .collect();
    let refused = answers
        .iter()
        .filter(|a| a.body.get("errors").is_some())
        .inspect(|a| {
            assert_eq!(a.code(), "BAD_USER_INPUT");
            assert_eq!(a.error()["extensions"]["field"], "input.idempotencyKey");
        })
        .count();
    // The winner's four calls answer its order (one wrote, three replayed); the loser's four
    // are refused, whichever request won.
    let bodies: Vec<_> = answers.iter().map(|a| &a.body).collect();
    assert_eq!((placed.len(), refused), (4, 4), "{bodies:?}");
    assert_eq!(placed.iter().filter(|r| r["replayed"] == false).count(), 1);
    assert!(placed.iter().all(|r| r["id"] == placed[0]["id"]));
    let events = placed_orders(&db).await.len();
    assert_eq!(events, 1);
}

#[tokio::test]
async fn a_key_whose_request_was_refused_may_be_used_for_the_corrected_request() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let mut wrong = order_input(json!([{ "sku": "COFFEE", "quantity": 1 }]), "tok_ok");
    wrong["input"]["idempotencyKey"] = json!("fix-me");
    let refused = api.gql(Some(&alice), PLACE, wrong).await;
    assert_eq!(refused.code(), "BAD_USER_INPUT");
    let mut right = order_input(json!([{ "sku": "TEA", "quantity": 1 }]), "tok_ok");
    right["input"]["idempotencyKey"] = json!("fix-me");
    let placed = api.gql(Some(&alice), PLACE, right).await;
    assert_eq!(placed.data("placeOrder")["replayed"], false);
}

#[tokio::test]
async fn without_a_valid_token_mutations_are_unauthenticated() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let input = json!({ "input": { "sku": "X", "name": "X", "priceMinor": 1, "currency": "EUR", "initialStock": 1 } });
    let anonymous = api.gql(None, REGISTER, input.clone()).await;
    assert_eq!(anonymous.code(), "UNAUTHENTICATED");
    // Before its input is judged: a bad one is none of an anonymous caller's business.
    let bad = json!({ "input": { "sku": "", "name": "X", "priceMinor": -1, "currency": "EUR", "initialStock": 1 } });
    let anonymous = api.gql(None, REGISTER, bad.clone()).await;
    assert_eq!(anonymous.code(), "UNAUTHENTICATED", "{}", anonymous.body);
    let forged = api.gql(Some("not-a-jwt"), REGISTER, input.clone()).await;
    assert_eq!(forged.status, 401);
    assert_eq!(forged.code(), "UNAUTHENTICATED");
    let customer = token("c", &[Role::Customer]);
    let customer_registers = api.gql(Some(&customer), REGISTER, input).await;
    assert_eq!(customer_registers.code(), "FORBIDDEN");
    // A caller without the role is not told what is wrong with the input either.
    let customer_registers = api.gql(Some(&customer), REGISTER, bad).await;
    assert_eq!(
        customer_registers.code(),
        "FORBIDDEN",
        "{}",
        customer_registers.body
    );
}

#[tokio::test]
async fn a_caller_over_its_rate_is_told_when_to_come_back() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.http.rate_limit_per_second = 1;
    settings.http.rate_limit_burst = 2;
    let api = start(&settings).await;
    let alice = customer("alice");
    let query = "{ commandApiStatus }";
    let mut limited = None;
    for _ in 0..5 {
        let answer = api.gql(Some(&alice), query, json!({})).await;
        if answer.status == 429 {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("the limiter never answered 429");
    assert_eq!(limited.code(), "RATE_LIMITED");
    let wait: u64 = limited.retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait));
    // Another caller is not affected.
    let bob = api.gql(Some(&customer("bob")), query, json!({})).await;
    assert_eq!(bob.status, 200);
}

#[tokio::test]
async fn an_unreachable_store_is_unavailable_without_connection_detail() {
    let api = start(&settings_for("postgres://postgres@127.0.0.1:1/nowhere")).await;
    let answer = api
        .gql(Some(&warehouse()), RESTOCK, json!({ "sku": "TEA", "q": 1 }))
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.code(), "UNAVAILABLE");
    assert!(
        !answer.body.to_string().contains("127.0.0.1"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn a_corrupt_stream_is_an_internal_error_that_says_only_the_request_id() {
    let Shop { db, api, .. } = Shop::open().await;
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into events (event_id, stream, version, event_type, data, metadata)
             values (gen_random_uuid(), 'product-BAD', 0, 'ProductRegistered', '{\"secret\": 1}', '{}')",
            &[],
        )
        .await
        .unwrap();
    let answer = api
        .gql(Some(&warehouse()), RESTOCK, json!({ "sku": "BAD", "q": 1 }))
        .await;
    assert_eq!(answer.code(), "INTERNAL");
    assert_eq!(answer.error()["message"], "internal error");
    assert!(answer.error()["extensions"]["requestId"].is_string());
    assert!(!answer.body.to_string().contains("secret"));
}

/// Each bad request answers a contract error with the field named, never a 5xx.
#[tokio::test]
async fn bad_input_of_every_kind_is_a_contract_error_never_a_server_error() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    register(&api, "USD-MUG", 900, "USD", 10).await;
    let alice = customer("alice");
    let line = |sku: &str, q: i64| json!({ "sku": sku, "quantity": q });
    let many: Vec<_> = (0..101).map(|i| line(&format!("SKU-{i}"), 1)).collect();
    let huge = "x".repeat(1024 * 1024);
    let cases: Vec<(&str, Answer, Option<&str>)> = vec![
        ("malformed JSON", api.raw(Some(&alice), "{\"query\": ").await, None),
        ("not GraphQL", api.raw(Some(&alice), "[1,2]").await, None),
        ("wrong type", api.gql(Some(&alice), PLACE, json!({ "input": { "lines": "TEA" } })).await, None),
        ("string quantity", api.gql(Some(&alice), PLACE, order_input(json!([{ "sku": "TEA", "quantity": "two" }]), "tok_ok")).await, None),
        ("zero quantity", api.gql(Some(&alice), PLACE, order_input(json!([line("TEA", 0)]), "tok_ok")).await, Some("input.lines[0].quantity")),
        ("negative quantity", api.gql(Some(&alice), PLACE, order_input(json!([line("TEA", -3)]), "tok_ok")).await, Some("input.lines[0].quantity")),
        ("no lines", api.gql(Some(&alice), PLACE, order_input(json!([]), "tok_ok")).await, Some("input.lines")),
        ("101 lines", api.gql(Some(&alice), PLACE, order_input(json!(many), "tok_ok")).await, Some("input.lines")),
        ("duplicate SKU", api.gql(Some(&alice), PLACE, order_input(json!([line("TEA", 1), line("TEA", 2)]), "tok_ok")).await, Some("input.lines[1].sku")),
        ("unknown SKU", api.gql(Some(&alice), PLACE, order_input(json!([line("NOPE", 1)]), "tok_ok")).await, Some("input.lines")),
        ("mixed currencies", api.gql(Some(&alice), PLACE, order_input(json!([line("TEA", 1), line("USD-MUG", 1)]), "tok_ok")).await, Some("input.lines")),
        ("lowercase SKU", api.gql(Some(&alice), PLACE, order_input(json!([line("tea", 1)]), "tok_ok")).await, Some("input.lines[0].sku")),
        ("bad country", api.gql(Some(&alice), PLACE, json!({ "input": { "lines": [line("TEA", 1)], "paymentToken": "tok_ok", "shippingAddress": { "name": "A", "line1": "B", "city": "C", "postalCode": "1", "country": "Germany" } } })).await, Some("input.shippingAddress.country")),
        ("float price", api.gql(Some(&admin()), CHANGE_PRICE, json!({ "sku": "TEA", "p": 6.5 })).await, None),
        ("negative price", api.gql(Some(&admin()), CHANGE_PRICE, json!({ "sku": "TEA", "p": -1 })).await, Some("priceMinor")),
        ("negative expected version", api.gql(Some(&warehouse()), RESTOCK, json!({ "sku": "TEA", "q": 1, "v": -1 })).await, Some("expectedVersion")),
        ("bad UUID", api.gql(Some(&alice), CANCEL, json!({ "id": "not-a-uuid", "reason": "x" })).await, None),
        ("unknown field", api.gql(Some(&alice), "mutation { placeOrder(input: {}) { nope } }", json!({})).await, None),
        ("1 MB reason", api.gql(Some(&alice), CANCEL, json!({ "id": uuid::Uuid::now_v7(), "reason": huge })).await, None),
        ("too deep", api.gql(Some(&alice), "{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } }", json!({})).await, None),
    ];
    for (name, answer, field) in cases {
        assert!(
            (400..500).contains(&answer.status) || answer.status == 200,
            "{name}: status {} {}",
            answer.status,
            answer.body
        );
        assert_eq!(answer.code(), "BAD_USER_INPUT", "{name}: {}", answer.body);
        if let Some(field) = field {
            assert_eq!(
                answer.error()["extensions"]["field"],
                field,
                "{name}: {}",
                answer.body
            );
        }
    }
}

#[tokio::test]
async fn a_token_printed_by_the_cli_is_accepted_by_the_api() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let token = crate::common::orderly_cli(&[
        "token",
        "--sub",
        "admin-cli",
        "--role",
        "admin",
        "--ttl",
        "5m",
    ]);
    let answer = api
        .gql(
            Some(&token),
            REGISTER,
            json!({ "input": { "sku": "CLI", "name": "Via CLI", "priceMinor": 1, "currency": "EUR", "initialStock": 0 } }),
        )
        .await;
    assert_eq!(answer.data("registerProduct")["id"], "CLI");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(["token", "--sub", "x", "--role", "root"])
        .env("ORDERLY_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "an unknown role is refused");
}

#[tokio::test]
async fn every_event_carries_its_actor_command_and_the_callers_trace() {
    let Shop { db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 1).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = json!({ "query": RESTOCK, "variables": { "sku": "TEA", "q": 2 } });
    let response = api
        .http
        .post(format!("{}/graphql", api.base))
        .bearer_auth(warehouse())
        .header("traceparent", trace)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let row = db
        .connect()
        .await
        .unwrap()
        .query_one(
            "select data, metadata from events where event_type = 'ProductRestocked'",
            &[],
        )
        .await
        .unwrap();
    let stored = decode_recorded("ProductRestocked", row.get(0), row.get(1)).unwrap();
    let metadata = stored.metadata;
    assert_eq!(metadata.actor, "warehouse-1");
    assert_eq!(metadata.traceparent.as_deref(), Some(trace));
    assert_eq!(metadata.correlation_id, metadata.command_id);
    assert_eq!(metadata.causation_id, metadata.command_id);
    assert_ne!(metadata.event_id, metadata.command_id);
}

/// An aggregate that does not exist is NOT_FOUND whatever version the caller expected: a
/// CONFLICT would send a client into a reload loop, a REJECTED would blame the command.
#[tokio::test]
async fn commands_on_an_aggregate_that_does_not_exist_are_not_found_with_or_without_a_version() {
    let Shop { db, api, .. } = Shop::open().await;
    let deliver = "mutation($id: UUID!, $v: Int) {
      markDelivered(orderId: $id, expectedVersion: $v) { id version events replayed } }";
    let missing = uuid::Uuid::now_v7().to_string();
    for version in [None, Some(0), Some(3)] {
        let v = json!(version);
        let calls = [
            (
                "cancelOrder",
                customer("alice"),
                CANCEL,
                json!({ "id": missing, "reason": "nope", "v": v }),
            ),
            (
                "cancelOrder by an admin",
                admin(),
                CANCEL,
                json!({ "id": missing, "reason": "nope", "v": v }),
            ),
            (
                "shipOrder",
                warehouse(),
                SHIP,
                json!({ "id": missing, "v": v }),
            ),
            (
                "markDelivered",
                warehouse(),
                deliver,
                json!({ "id": missing, "v": v }),
            ),
            (
                "restock",
                warehouse(),
                RESTOCK,
                json!({ "sku": "NO-SUCH", "q": 1, "v": v }),
            ),
            (
                "changePrice",
                admin(),
                CHANGE_PRICE,
                json!({ "sku": "NO-SUCH", "p": 100, "v": v }),
            ),
        ];
        for (name, token, query, variables) in calls {
            let answer = api.gql(Some(&token), query, variables).await;
            assert_eq!(
                answer.code(),
                "NOT_FOUND",
                "{name} with expectedVersion {version:?}: {}",
                answer.body
            );
            assert!(
                answer.error()["extensions"]["actualVersion"].is_null(),
                "{name}: {}",
                answer.body
            );
        }
    }
    let written = count(&db, "select count(*) from events").await;
    assert_eq!(written, 0, "nothing was appended");
}

/// Another customer's order looks missing also when a version is expected, so neither its
/// existence nor its version can be probed; the owner still gets CONFLICT for a stale one.
#[tokio::test]
async fn another_customers_order_is_not_found_even_with_an_expected_version() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let order_id = place_one(&api, "alice", "TEA").await;
    for version in [0, 5] {
        let probe = api
            .gql(
                Some(&customer("mallory")),
                CANCEL,
                json!({ "id": order_id, "reason": "probe", "v": version }),
            )
            .await;
        assert_eq!(probe.code(), "NOT_FOUND", "v={version}: {}", probe.body);
        assert!(probe.error()["extensions"]["actualVersion"].is_null());
    }
    let stale = api
        .gql(
            Some(&customer("alice")),
            CANCEL,
            json!({ "id": order_id, "reason": "changed my mind", "v": 5 }),
        )
        .await;
    assert_eq!(stale.code(), "CONFLICT", "{}", stale.body);
    assert_eq!(stale.error()["extensions"]["actualVersion"], 0);
}
