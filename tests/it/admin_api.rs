//! The operator's additions to the API: the log page by page, the projections' dead letters
//! and their rebuilds, the saga's lanes, parked events and outbox dead letters, for admins
//! only.

use crate::common::{
    Api, admin, customer, dead_letter_outbox, park_registration, park_saga_event, place_one,
    register, settings_for, start, start_with_saga, warehouse,
};
use serde_json::{Value, json};

const EVENTS: &str = "query($stream: String, $category: String, $type: String, $after: ConsistencyToken, $first: Int!) {
  events(stream: $stream, category: $category, type: $type, after: $after, first: $first) {
    events { id stream type version position data metadata } endCursor hasMore } }";
const DEAD_LETTERS: &str = "query($all: Boolean!) {
  deadLetters(includeResolved: $all) { id projection stream type error resolution } }";
const RETRY: &str = "mutation($id: Long!) { retryDeadLetter(id: $id) { id applied error } }";
const SKIP: &str = "mutation($id: Long!) { skipDeadLetter(id: $id) }";
const REBUILD: &str = "mutation($name: String!) {
  startProjectionRebuild(name: $name) { projection state events } }";
const REBUILD_PROGRESS: &str = "query($name: String!) {
  projectionRebuild(name: $name) {
    projection state events total position eventsPerSecond startedAt finishedAt error } }";
const SAGA_STATUS: &str = "{ sagaStatus {
  name lanes { lane owner generation checkpoint caughtUp behindSeconds } members parked inFlight
  overdue oldestOverdueOrderId } }";
const SAGA_PARKED: &str = "{ sagaParkedEvents {
  eventId orderId stream type error attempts parkedAt retryRequestedAt } }";
const RETRY_PARKED: &str = "mutation($id: UUID!) { retryParkedSagaEvent(eventId: $id) }";
const SKIP_PARKED: &str = "mutation($id: UUID!) { skipParkedSagaEvent(eventId: $id) }";
const RETRY_ORDER: &str = "mutation($id: UUID!) { retryParkedSagaEventsOfOrder(orderId: $id) }";
const SKIP_ORDER: &str = "mutation($id: UUID!) { skipParkedSagaEventsOfOrder(orderId: $id) }";
const OUTBOX: &str = "query($all: Boolean!) { outboxDeadLetters(includePending: $all) {
  outboxId orderId kind state attempts lastError createdAt deadLetteredAt } }";
const RETRY_OUTBOX: &str = "mutation($id: UUID!) { retryOutboxMessage(outboxId: $id) }";
const SKIP_OUTBOX: &str = "mutation($id: UUID!) { skipOutboxMessage(outboxId: $id) }";
/// The orders projection's read model as one text, row by row in a fixed order.
const ORDERS_MODEL: &str = "select concat_ws(' / ',
  (select string_agg(t::text, ';' order by t::text) from orders t),
  (select string_agg(t::text, ';' order by t::text) from order_lines t),
  (select string_agg(t::text, ';' order by t::text) from order_status_history t),
  (select string_agg(t::text, ';' order by t::text) from customers t))";

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
    let db = crate::common::migrated_database().await;
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
    let db = crate::common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "DLQ-1", 100, "EUR", 10).await;
    let admin = admin();
    log_holds(&api, &admin, 1).await;
    let log = api.gql(Some(&admin), EVENTS, json!({ "first": 1 })).await;
    let event = log.data("events")["events"][0].clone();
    let retried = park_registration(&db, &event, "handler failed: test").await;

    let letters = api
        .gql(Some(&admin), DEAD_LETTERS, json!({ "all": false }))
        .await;
    let letters = letters.data("deadLetters");
    assert_eq!(letters[0]["id"], retried);
    assert_eq!(letters[0]["error"], "handler failed: test");

    for who in [customer("alice"), warehouse()] {
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
    assert_eq!(
        crate::common::count(&db, "select count(*) from products where sku = 'DLQ-1'").await,
        1,
        "the registration is in the read model again"
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

/// Polls the rebuild of `name` until it has stopped running (30 s at most); its last record.
async fn rebuilt(api: &Api, admin: &str, name: &str) -> Value {
    for _ in 0..300 {
        let answer = api
            .gql(Some(admin), REBUILD_PROGRESS, json!({ "name": name }))
            .await;
        let progress = answer.data("projectionRebuild");
        if progress["state"] != "RUNNING" {
            return progress.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the rebuild of {name} still ran after 30 s");
}

/// The read model's text once it holds `orders` orders.
async fn orders_model(db: &orderly_test_support::TestDb, orders: i64) -> String {
    crate::common::eventually(
        db,
        "select count(*) from orders",
        orders,
        std::time::Duration::from_secs(10),
    )
    .await;
    let client = db.connect().await.unwrap();
    client.query_one(ORDERS_MODEL, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn an_admin_rebuilds_a_projection_and_follows_it_to_the_swap() {
    let db = crate::common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "RB-1", 100, "EUR", 10).await;
    for who in ["alice", "bob", "alice"] {
        place_one(&api, who, "RB-1").await;
    }
    let before = orders_model(&db, 3).await;
    let admin = admin();
    let orders = json!({ "name": "orders" });

    for who in [customer("alice"), warehouse()] {
        let refused = api.gql(Some(&who), REBUILD, orders.clone()).await;
        assert_eq!(refused.code(), "FORBIDDEN");
        let refused = api.gql(Some(&who), REBUILD_PROGRESS, orders.clone()).await;
        assert_eq!(refused.code(), "FORBIDDEN");
    }
    let anonymous = api.gql(None, REBUILD, orders.clone()).await;
    assert_eq!(anonymous.code(), "UNAUTHENTICATED");
    let unknown = api
        .gql(Some(&admin), REBUILD, json!({ "name": "invoices" }))
        .await;
    assert_eq!(unknown.code(), "BAD_USER_INPUT");
    let none_yet = api
        .gql(Some(&admin), REBUILD_PROGRESS, orders.clone())
        .await;
    assert_eq!(none_yet.data("projectionRebuild"), &Value::Null);

    // The rebuild's first statement waits behind this lock, so it is still running when the
    // second start arrives.
    let holder = db.connect().await.unwrap();
    holder
        .batch_execute("begin; lock table projection_rebuilds in access exclusive mode")
        .await
        .unwrap();
    let started = api.gql(Some(&admin), REBUILD, orders.clone()).await;
    assert_eq!(
        started.data("startProjectionRebuild"),
        &json!({ "projection": "orders", "state": "RUNNING", "events": 0 })
    );
    let second = api.gql(Some(&admin), REBUILD, orders.clone()).await;
    assert_eq!(second.code(), "CONFLICT");
    holder.batch_execute("commit").await.unwrap();

    let progress = rebuilt(&api, &admin, "orders").await;
    assert_eq!(progress["state"], "DONE", "{progress}");
    assert_eq!(progress["error"], Value::Null);
    // Every event the projection reads counts, the three orders' among them.
    assert!(progress["events"].as_i64() >= Some(3), "{progress}");
    assert_eq!(progress["total"], progress["events"]);
    assert!(progress["finishedAt"].is_string(), "{progress}");
    assert!(progress["position"].is_string(), "{progress}");
    assert_eq!(orders_model(&db, 3).await, before);

    // Once done, the projection may be rebuilt again.
    let again = api.gql(Some(&admin), REBUILD, orders).await;
    assert_eq!(again.data("startProjectionRebuild")["state"], "RUNNING");
    assert_eq!(rebuilt(&api, &admin, "orders").await["state"], "DONE");
}

#[tokio::test]
async fn a_rebuild_another_process_holds_fails_with_why_and_the_next_start_swaps_in() {
    let db = crate::common::migrated_database().await;
    let settings = settings_for(db.url());
    let api = start(&settings).await;
    register(&api, "RB-2", 100, "EUR", 10).await;
    place_one(&api, "alice", "RB-2").await;
    let before = orders_model(&db, 1).await;
    let admin = admin();
    let orders = json!({ "name": "orders" });

    // Another process's rebuild: it takes the projection's rebuild lock, then waits behind the
    // held table (once it waits, it holds the lock) until this test lets it go.
    let holder = db.connect().await.unwrap();
    holder
        .batch_execute("begin; lock table projection_rebuilds in access exclusive mode")
        .await
        .unwrap();
    let pg_config = orderly_service::app::pg_config(&settings).unwrap();
    let store = orderly_service::app::event_store(&settings).unwrap();
    let other = tokio::spawn(async move {
        orderly_projections::rebuild(
            &pg_config,
            store,
            orderly_projections::ProjectionName::Orders,
            &orderly_projections::RebuildOptions::default(),
            |_| {},
        )
        .await
    });
    crate::common::eventually(
        &db,
        "select count(*) from pg_locks
         where relation = 'projection_rebuilds'::regclass and not granted",
        1,
        std::time::Duration::from_secs(10),
    )
    .await;

    let started = api.gql(Some(&admin), REBUILD, orders.clone()).await;
    assert_eq!(started.data("startProjectionRebuild")["state"], "RUNNING");
    let failed = rebuilt(&api, &admin, "orders").await;
    assert_eq!(failed["state"], "FAILED", "{failed}");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("another process is rebuilding"), "{why}");
    assert!(failed["finishedAt"].is_string(), "{failed}");

    holder.batch_execute("commit").await.unwrap();
    other.await.unwrap().unwrap();
    let again = api.gql(Some(&admin), REBUILD, orders).await;
    assert_eq!(again.data("startProjectionRebuild")["state"], "RUNNING");
    assert_eq!(rebuilt(&api, &admin, "orders").await["state"], "DONE");
    assert_eq!(orders_model(&db, 1).await, before);
}

#[tokio::test]
async fn the_sagas_operations_are_refused_to_everyone_but_admins() {
    let db = crate::common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    let id = json!({ "id": uuid::Uuid::new_v4() });
    let operations = [
        (SAGA_STATUS, json!({})),
        (SAGA_PARKED, json!({})),
        (OUTBOX, json!({ "all": true })),
        (RETRY_PARKED, id.clone()),
        (SKIP_PARKED, id.clone()),
        (RETRY_OUTBOX, id.clone()),
        (SKIP_OUTBOX, id),
    ];
    for (operation, variables) in operations {
        for who in [customer("alice"), warehouse()] {
            let refused = api.gql(Some(&who), operation, variables.clone()).await;
            assert_eq!(refused.code(), "FORBIDDEN", "{operation}");
        }
        let anonymous = api.gql(None, operation, variables).await;
        assert_eq!(anonymous.code(), "UNAUTHENTICATED", "{operation}");
    }
}

#[tokio::test]
async fn an_admin_sees_the_sagas_sixteen_lanes_and_the_member_holding_them() {
    let db = crate::common::migrated_database().await;
    let api = start_with_saga(&settings_for(db.url())).await;
    let admin = admin();
    // The runner creates the lanes and takes their leases as it starts.
    let mut status = Value::Null;
    for _ in 0..200 {
        let answer = api.gql(Some(&admin), SAGA_STATUS, json!({})).await;
        status = answer.data("sagaStatus").clone();
        let lanes = status["lanes"].as_array().unwrap();
        if lanes.len() == 16 && lanes.iter().all(|lane| !lane["owner"].is_null()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status["name"], "fulfilment");
    let lanes = status["lanes"].as_array().unwrap();
    let numbers: Vec<i64> = lanes.iter().map(|l| l["lane"].as_i64().unwrap()).collect();
    assert_eq!(numbers, (0..16).collect::<Vec<_>>());
    let members = status["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{status}");
    assert!(
        lanes.iter().all(|lane| lane["owner"] == members[0]),
        "{status}"
    );
    assert!(
        lanes
            .iter()
            .all(|lane| lane["generation"].as_i64() >= Some(1))
    );
    // Nothing in the log yet: every lane has read it all.
    assert!(
        lanes.iter().all(|lane| lane["caughtUp"] == true),
        "{status}"
    );
    assert!(lanes.iter().all(|lane| lane["behindSeconds"].is_null()));
    assert_eq!(status["parked"], 0);
    assert_eq!(status["inFlight"], 0);
}

#[tokio::test]
async fn an_admin_retries_and_skips_parked_saga_events() {
    let db = crate::common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    register(&api, "PARK-1", 100, "EUR", 10).await;
    let order = place_one(&api, "alice", "PARK-1").await;
    let admin = admin();
    log_holds(&api, &admin, 2).await;
    let log = api.gql(Some(&admin), EVENTS, json!({ "first": 2 })).await;
    let events = &log.data("events")["events"];
    let registered = park_saga_event(&db, &events[0], "step failed: test").await;
    let placed = park_saga_event(&db, &events[1], "step failed: test").await;

    let parked = api.gql(Some(&admin), SAGA_PARKED, json!({})).await;
    let parked = parked.data("sagaParkedEvents");
    assert_eq!(parked[0]["eventId"], registered);
    assert_eq!(parked[0]["orderId"], Value::Null);
    assert_eq!(parked[1]["eventId"], placed);
    assert_eq!(parked[1]["orderId"], order);
    assert_eq!(parked[1]["type"], "OrderPlaced");
    assert_eq!(parked[1]["error"], "step failed: test");
    assert_eq!(parked[1]["retryRequestedAt"], Value::Null);
    // One instance open, one settled: only the first is in flight. One open instance's
    // deadline passed an hour ago, another's a moment ago: only the first is overdue.
    let overdue = uuid::Uuid::new_v4();
    db.connect()
        .await
        .unwrap()
        .execute(
            "insert into saga_states (saga_name, order_id, state, correlation_id, settled, due_at)
             values ('fulfilment', gen_random_uuid(), '{}', gen_random_uuid(), false, null),
                    ('fulfilment', gen_random_uuid(), '{}', gen_random_uuid(), true, null),
                    ('fulfilment', $1, '{}', gen_random_uuid(), false,
                     now() - interval '1 hour'),
                    ('fulfilment', gen_random_uuid(), '{}', gen_random_uuid(), false,
                     now() - interval '1 second')",
            &[&overdue],
        )
        .await
        .unwrap();
    let status = api.gql(Some(&admin), SAGA_STATUS, json!({})).await;
    let status = status.data("sagaStatus");
    assert_eq!(status["parked"], 2);
    assert_eq!(status["inFlight"], 3);
    assert_eq!(status["overdue"], 1);
    assert_eq!(status["oldestOverdueOrderId"], overdue.to_string());

    let retried = api
        .gql(Some(&admin), RETRY_PARKED, json!({ "id": placed }))
        .await;
    assert_eq!(retried.data("retryParkedSagaEvent"), true);
    let skipped = api
        .gql(Some(&admin), SKIP_PARKED, json!({ "id": registered }))
        .await;
    assert_eq!(skipped.data("skipParkedSagaEvent"), true);
    // No runner here feeds the retried event again: it stays listed, marked.
    let parked = api.gql(Some(&admin), SAGA_PARKED, json!({})).await;
    let parked = parked.data("sagaParkedEvents").as_array().unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0]["eventId"], placed);
    assert!(parked[0]["retryRequestedAt"].is_string());

    let again = api
        .gql(Some(&admin), SKIP_PARKED, json!({ "id": registered }))
        .await;
    assert_eq!(again.code(), "NOT_FOUND");
    let unknown = api
        .gql(
            Some(&admin),
            RETRY_PARKED,
            json!({ "id": uuid::Uuid::new_v4() }),
        )
        .await;
    assert_eq!(unknown.code(), "NOT_FOUND");

    // The order's events all at once: its one parked event, whose retry is under way in a
    // running saga process (one whose lease holds), so not skipped: the retry's commands may
    // be going out, and its success would delete the skipped row...
    let retried = api
        .gql(Some(&admin), RETRY_ORDER, json!({ "id": order }))
        .await;
    assert_eq!(retried.data("retryParkedSagaEventsOfOrder"), 1);
    let client = db.connect().await.unwrap();
    client
        .execute(
            "insert into saga_members (saga_name, member_id, lease_until)
             values ('fulfilment', 'a running process', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let busy = api
        .gql(Some(&admin), SKIP_ORDER, json!({ "id": order }))
        .await;
    assert_eq!(busy.code(), "UNAVAILABLE");
    let message = busy.error()["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("retry of 1 of these parked events is under way"),
        "{message}"
    );
    // ...until no saga process is alive to feed it (its lease ran out): then it is skipped,
    // and none is left.
    client
        .execute(
            "update saga_members set lease_until = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let skipped = api
        .gql(Some(&admin), SKIP_ORDER, json!({ "id": order }))
        .await;
    assert_eq!(skipped.data("skipParkedSagaEventsOfOrder"), 1);
    let none = api
        .gql(Some(&admin), SKIP_ORDER, json!({ "id": order }))
        .await;
    assert_eq!(none.code(), "NOT_FOUND");
    let refused = api
        .gql(
            Some(&customer("alice")),
            RETRY_ORDER,
            json!({ "id": order }),
        )
        .await;
    assert_eq!(refused.code(), "FORBIDDEN");
}

#[tokio::test]
async fn an_admin_retries_and_skips_outbox_dead_letters() {
    let db = crate::common::migrated_database().await;
    let api = start(&settings_for(db.url())).await;
    let admin = admin();
    let empty = api.gql(Some(&admin), OUTBOX, json!({ "all": false })).await;
    assert_eq!(empty.data("outboxDeadLetters"), &json!([]));
    let charge = dead_letter_outbox(&db, "charge", "gateway: 503").await;
    let notification = dead_letter_outbox(&db, "notification", "smtp: refused").await;

    let letters = api.gql(Some(&admin), OUTBOX, json!({ "all": false })).await;
    let letters = letters.data("outboxDeadLetters").as_array().unwrap();
    let ids: Vec<&Value> = letters.iter().map(|l| &l["outboxId"]).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&&json!(charge)) && ids.contains(&&json!(notification)));
    let letter = letters.iter().find(|l| l["outboxId"] == charge).unwrap();
    assert_eq!(letter["state"], "dead-lettered");
    assert_eq!(letter["attempts"], 5);
    assert_eq!(letter["lastError"], "gateway: 503");

    let retried = api
        .gql(Some(&admin), RETRY_OUTBOX, json!({ "id": charge }))
        .await;
    assert_eq!(retried.data("retryOutboxMessage"), true);
    let skipped = api
        .gql(Some(&admin), SKIP_OUTBOX, json!({ "id": notification }))
        .await;
    assert_eq!(skipped.data("skipOutboxMessage"), true);
    let open = api.gql(Some(&admin), OUTBOX, json!({ "all": false })).await;
    assert_eq!(open.data("outboxDeadLetters"), &json!([]));
    let all = api.gql(Some(&admin), OUTBOX, json!({ "all": true })).await;
    let states: Vec<(&Value, &Value)> = all
        .data("outboxDeadLetters")
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (&l["outboxId"], &l["state"]))
        .collect();
    assert!(
        states.contains(&(&json!(charge), &json!("pending"))),
        "{states:?}"
    );
    assert!(
        states.contains(&(&json!(notification), &json!("skipped"))),
        "{states:?}"
    );

    let again = api
        .gql(Some(&admin), SKIP_OUTBOX, json!({ "id": notification }))
        .await;
    assert_eq!(again.code(), "NOT_FOUND");
}
