//! The operator's additions to the API: the log page by page and the projections' dead
//! letters, for admins only.

mod common;

use common::{Api, admin, customer, park, place_one, register, settings_for, start};
use serde_json::{Value, json};

const EVENTS: &str = "query($stream: String, $category: String, $type: String, $after: ConsistencyToken, $first: Int!) {
  events(stream: $stream, category: $category, type: $type, after: $after, first: $first) {
    events { id stream type version position data metadata } endCursor hasMore } }";
const DEAD_LETTERS: &str = "query($all: Boolean!) {
  deadLetters(includeResolved: $all) { id projection stream type error resolution } }";
const RETRY: &str = "mutation($id: Long!) { retryDeadLetter(id: $id) { id applied error } }";
const SKIP: &str = "mutation($id: Long!) { skipDeadLetter(id: $id) }";

fn types(page: &Value) -> Vec<&str> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect()
}

/// Waits, up to 10 s, until the log reads `count` events: a transaction of another test on the
/// same server may hold the log's horizon back for a moment after an append has committed.
async fn log_holds(api: &Api, admin: &str, count: usize) {
    for _ in 0..200 {
        let page = api.gql(Some(admin), EVENTS, json!({ "first": 50 })).await;
        if types(page.data("events")).len() >= count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the log did not show {count} events within 10 s");
}

#[tokio::test]
async fn an_admin_pages_through_the_log_by_category_stream_and_type() {
    let db = common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "LOG-1", 100, "EUR", 10).await;
    register(&api, "LOG-2", 100, "EUR", 10).await;
    let order = place_one(&api, "alice", "LOG-1").await;
    let admin = admin();
    log_holds(&api, &admin, 3).await;

    let all = api.gql(Some(&admin), EVENTS, json!({ "first": 2 })).await;
    let first = all.data("events");
    assert_eq!(types(first), ["ProductRegistered", "ProductRegistered"]);
    assert_eq!(first["hasMore"], true);
    let rest = api
        .gql(
            Some(&admin),
            EVENTS,
            json!({ "first": 50, "after": first["endCursor"] }),
        )
        .await;
    let rest = rest.data("events");
    assert_eq!(types(rest), ["OrderPlaced"]);
    assert_eq!(rest["hasMore"], false);
    assert_eq!(rest["events"][0]["stream"], format!("order-{order}"));

    let products = api
        .gql(
            Some(&admin),
            EVENTS,
            json!({ "first": 50, "category": "product" }),
        )
        .await;
    assert_eq!(types(products.data("events")).len(), 2);
    let stream = api
        .gql(
            Some(&admin),
            EVENTS,
            json!({ "first": 50, "stream": format!("order-{order}") }),
        )
        .await;
    assert_eq!(types(stream.data("events")), ["OrderPlaced"]);
    let by_type = api
        .gql(
            Some(&admin),
            EVENTS,
            json!({ "first": 50, "type": "OrderPlaced" }),
        )
        .await;
    assert_eq!(types(by_type.data("events")), ["OrderPlaced"]);

    let refused = api
        .gql(Some(&customer("alice")), EVENTS, json!({ "first": 5 }))
        .await;
    assert_eq!(refused.code(), "FORBIDDEN");
    let anonymous = api.gql(None, EVENTS, json!({ "first": 5 })).await;
    assert_eq!(anonymous.code(), "UNAUTHENTICATED");
}

#[tokio::test]
async fn an_admin_retries_and_skips_dead_letters_and_nobody_else_may() {
    let db = common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "DLQ-1", 100, "EUR", 10).await;
    let admin = admin();
    log_holds(&api, &admin, 1).await;
    let log = api.gql(Some(&admin), EVENTS, json!({ "first": 1 })).await;
    let event = log.data("events")["events"][0].clone();
    let retried = park(&db, &event, "handler failed: test").await;

    let letters = api
        .gql(Some(&admin), DEAD_LETTERS, json!({ "all": false }))
        .await;
    let letters = letters.data("deadLetters");
    assert_eq!(letters[0]["id"], retried);
    assert_eq!(letters[0]["error"], "handler failed: test");

    for who in [customer("alice"), common::warehouse()] {
        let refused = api.gql(Some(&who), RETRY, json!({ "id": retried })).await;
        assert_eq!(refused.code(), "FORBIDDEN");
        let refused = api
            .gql(Some(&who), DEAD_LETTERS, json!({ "all": true }))
            .await;
        assert_eq!(refused.code(), "FORBIDDEN");
    }

    let outcome = api.gql(Some(&admin), RETRY, json!({ "id": retried })).await;
    assert_eq!(
        outcome.data("retryDeadLetter"),
        &json!({ "id": retried, "applied": true, "error": null })
    );
    let again = api.gql(Some(&admin), RETRY, json!({ "id": retried })).await;
    assert_eq!(again.code(), "NOT_FOUND");

    // Parked again, then skipped.
    db.connect()
        .await
        .unwrap()
        .execute(
            "update dead_letters set resolution = null, resolved_at = null",
            &[],
        )
        .await
        .unwrap();
    let skipped = retried;
    let refused = api
        .gql(Some(&customer("alice")), SKIP, json!({ "id": skipped }))
        .await;
    assert_eq!(refused.code(), "FORBIDDEN");
    let outcome = api.gql(Some(&admin), SKIP, json!({ "id": skipped })).await;
    assert_eq!(outcome.data("skipDeadLetter"), skipped);
    let open = api
        .gql(Some(&admin), DEAD_LETTERS, json!({ "all": false }))
        .await;
    assert_eq!(open.data("deadLetters"), &json!([]));
    let all = api
        .gql(Some(&admin), DEAD_LETTERS, json!({ "all": true }))
        .await;
    assert_eq!(all.data("deadLetters")[0]["resolution"], "skipped");
}
