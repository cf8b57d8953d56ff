//! Subscriptions over graphql-transport-ws against the running app: `orderUpdated` follows an
//! order through the saga and the warehouse, `events` catches up and goes live, and who may
//! follow what.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::common::*;
use orderly_command_api::saga::SagaRunner;
use serde_json::{Value, json};

fn start_saga(settings: &orderly_service::settings::Settings) {
    let gateway = orderly_service::app::payment_gateway(settings).unwrap();
    let runner: SagaRunner =
        orderly_service::app::saga_runner(settings, gateway as Arc<_>).unwrap();
    tokio::spawn(runner.run_until_stopped(std::future::pending()));
}

const FOLLOW: &str = "subscription($id: UUID!, $after: Int) {
  orderUpdated(orderId: $id, afterVersion: $after) {
    id status version history { status } payment { status } } }";

/// The order as the next `orderUpdated` message shows it.
async fn next_view(socket: &mut Socket) -> Value {
    next(socket).await["payload"]["data"]["orderUpdated"].clone()
}

#[tokio::test]
async fn order_updated_pushes_every_status_change_of_an_order_in_order() {
    let Shop {
        db: _db,
        settings,
        api,
    } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let id = place(&api, "alice", "TEA", 2, "tok_ok").await.id;

    let mut socket = connect(&api, Some(&alice)).await;
    // Everything after the placement (version 0), whenever the subscription is set up.
    subscribe(&mut socket, "1", FOLLOW, json!({ "id": id, "after": 0 })).await;
    start_saga(&settings);

    let mut statuses = Vec::new();
    let mut versions = Vec::new();
    let mut payment = Value::Null;
    while statuses.len() < 5 {
        let message = next(&mut socket).await;
        assert_eq!(message["type"], "next", "{message}");
        let order = &message["payload"]["data"]["orderUpdated"];
        let status = order["status"].as_str().unwrap().to_owned();
        let version = order["version"].as_i64().unwrap();
        // A change of the payment alone (its request, its outcome) comes as one more view of
        // the same version.
        if versions.last() == Some(&version) {
            assert_eq!(statuses.last(), Some(&status), "{order}");
            assert_ne!(order["payment"], payment, "{order}");
            payment = order["payment"].clone();
            continue;
        }
        payment = order["payment"].clone();
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

#[tokio::test]
async fn order_updated_pushes_the_refund_that_follows_a_cancel() {
    let Shop {
        db: _db,
        settings,
        api,
    } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;
    let mut socket = connect(&api, Some(&alice)).await;
    subscribe(&mut socket, "1", FOLLOW, json!({ "id": id, "after": -1 })).await;
    start_saga(&settings);
    let mut order = Value::Null;
    while order["status"] != "CONFIRMED" {
        order = next_view(&mut socket).await;
    }
    assert_eq!(order["payment"]["status"], "CHARGED", "{order}");

    // The refund is an event of the payment's stream only: the order's version stays.
    // (A projection batch may apply the cancel and the refund together: one view then.)
    cancel_as(&api, "alice", &id).await;
    let cancelled = next_view(&mut socket).await;
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    let mut refunded = cancelled.clone();
    while refunded["payment"]["status"] != "REFUNDED" {
        refunded = next_view(&mut socket).await;
        assert_eq!(refunded["status"], "CANCELLED", "{refunded}");
        assert_eq!(refunded["version"], cancelled["version"]);
    }

    // A client that was away for the refund resumes after the last version it saw, and gets
    // the order as it is now once.
    let mut resumed = connect(&api, Some(&alice)).await;
    let after = cancelled["version"].as_i64().unwrap();
    subscribe(
        &mut resumed,
        "2",
        FOLLOW,
        json!({ "id": id, "after": after }),
    )
    .await;
    let current = next_view(&mut resumed).await;
    assert_eq!(current["payment"]["status"], "REFUNDED", "{current}");
    assert_eq!(current["version"], after);
}

const EVENTS: &str = "subscription($stream: String, $category: String, $from: ConsistencyToken) {
  events(stream: $stream, category: $category, from: $from) { type stream version position data } }";

#[tokio::test]
async fn events_catch_up_from_a_token_then_follow_the_log_live_with_filters() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let id = place(&api, "alice", "TEA", 1, "tok_ok").await.id;

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
    // A subscription has one root field, as the specification says.
    subscribe(
        &mut admin_socket,
        "two",
        "subscription { a: events { type } b: events { type } }",
        json!({}),
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

const PRODUCT_EVENTS: &str = "subscription { events(category: \"product\") { type } }";

#[tokio::test]
async fn protocol_violations_close_the_socket_with_the_protocols_codes() {
    let Shop { db: _db, api, .. } = Shop::open().await;

    // Silent after the upgrade: closed once the init timeout (3 s) is over.
    let mut silent = open(&api).await;
    let started = std::time::Instant::now();
    assert_eq!(closed(&mut silent).await.0, 4408);
    assert!(started.elapsed() < std::time::Duration::from_secs(6));

    let mut twice = connect(&api, Some(&admin())).await;
    send(&mut twice, json!({ "type": "connection_init" })).await;
    assert_eq!(closed(&mut twice).await.0, 4429);

    let mut early = open(&api).await;
    subscribe(&mut early, "1", PRODUCT_EVENTS, json!({})).await;
    assert_eq!(closed(&mut early).await.0, 4401);

    let mut garbled = connect(&api, None).await;
    send(&mut garbled, json!({ "type": "subscribe", "payload": {} })).await;
    assert_eq!(closed(&mut garbled).await.0, 4400);

    let mut duplicate = connect(&api, Some(&admin())).await;
    subscribe(&mut duplicate, "same", PRODUCT_EVENTS, json!({})).await;
    subscribe(&mut duplicate, "same", PRODUCT_EVENTS, json!({})).await;
    assert_eq!(closed(&mut duplicate).await.0, 4409);

    let mut forged = open(&api).await;
    send(
        &mut forged,
        json!({ "type": "connection_init", "payload": { "Authorization": "Bearer not.a.jwt" } }),
    )
    .await;
    assert_eq!(closed(&mut forged).await.0, 4403);

    // Once the server said `complete`, the id may be used again.
    let mut reuse = connect(&api, Some(&admin())).await;
    for _ in 0..2 {
        subscribe(
            &mut reuse,
            "q",
            "{ product(sku: \"NONE\") { sku } }",
            json!({}),
        )
        .await;
        for expected in ["next", "complete"] {
            let message = reuse.next().await.unwrap().unwrap();
            let message: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
            assert_eq!(message["type"], expected, "{message}");
        }
    }
}

#[tokio::test]
async fn a_socket_is_closed_when_its_token_expires() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let issuer = orderly_graphql::TokenIssuer::new(&orderly_graphql::JwtConfig {
        secret: Some(SECRET.to_owned()),
        ..Default::default()
    })
    .unwrap();
    let short = issuer
        .issue(
            "admin-1",
            &[orderly_graphql::Role::Admin],
            std::time::Duration::from_secs(1),
        )
        .unwrap();
    let mut socket = connect(&api, Some(&short)).await;
    subscribe(&mut socket, "p", PRODUCT_EVENTS, json!({})).await;
    // `exp` is a second away; tokens are accepted up to 5 s past it (clock skew), over HTTP
    // and here alike.
    let started = std::time::Instant::now();
    let (code, reason) = closed(&mut socket).await;
    assert_eq!(code, 4403, "{reason}");
    assert!(started.elapsed() < std::time::Duration::from_secs(9));
    // Over HTTP, the same token is refused by now too.
    let answer = api
        .gql(Some(&short), "{ projections { name } }", json!({}))
        .await;
    assert_eq!(answer.code(), "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_message_over_the_body_limit_is_refused_before_it_is_read_whole() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let mut socket = connect(&api, Some(&admin())).await;
    // A valid subscription padded with 2 MB of whitespace.
    let padded = format!("{}{}", " ".repeat(2 * 1024 * 1024), PRODUCT_EVENTS);
    subscribe(&mut socket, "big", &padded, json!({})).await;
    let (code, reason) = closed(&mut socket).await;
    assert_eq!(code, 1009, "{reason}");
    // One just under the limit goes through.
    let mut socket = connect(&api, Some(&admin())).await;
    let padded = format!(
        "{}{}",
        " ".repeat(200 * 1024),
        "{ product(sku: \"NONE\") { sku } }"
    );
    subscribe(&mut socket, "fits", &padded, json!({})).await;
    let answer = next(&mut socket).await;
    assert_eq!(answer["type"], "next", "{answer}");
}

#[tokio::test]
async fn operations_over_a_socket_draw_on_the_callers_http_budget_and_time_out() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.http.rate_limit_per_second = 1;
    settings.http.rate_limit_burst = 5;
    settings.http.timeout = Duration::from_millis(500);
    let api = start(&settings).await;
    let alice = customer("alice");
    let mut socket = connect(&api, Some(&alice)).await;
    // Five reads in one HTTP request spend the burst; the socket's next operation is refused.
    let five = "{ a: product(sku: \"A\") { sku } b: product(sku: \"B\") { sku } \
                c: product(sku: \"C\") { sku } d: product(sku: \"D\") { sku } \
                e: product(sku: \"E\") { sku } }";
    api.gql(Some(&alice), five, json!({})).await.data("a");
    subscribe(
        &mut socket,
        "1",
        "{ product(sku: \"NONE\") { sku } }",
        json!({}),
    )
    .await;
    let refused = next(&mut socket).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["id"], "1");
    assert_eq!(refused["payload"][0]["extensions"]["code"], "RATE_LIMITED");
    assert!(refused["payload"][0]["extensions"]["retryAfterSeconds"].as_u64() >= Some(1));

    // Once the budget is back, a query that waits past the timeout is cut off.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let waits = "{ orders(consistency: { atLeast: \"7fffffffffffffff0000000000000000\", \
                 timeoutMs: 3000, mode: STRICT }) { nodes { id } } }";
    let started = std::time::Instant::now();
    subscribe(&mut socket, "2", waits, json!({})).await;
    let timed_out = next(&mut socket).await;
    assert_eq!(timed_out["type"], "error", "{timed_out}");
    assert_eq!(timed_out["payload"][0]["extensions"]["code"], "UNAVAILABLE");
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
}

/// An app started with `settings` on `db`, and one order of alice's for TEA, in the read
/// models.
async fn one_projected_order(
    db: &orderly_test_support::TestDb,
    settings: &orderly_service::settings::Settings,
) -> (Api, String) {
    let api = start(settings).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let id = place_one(&api, "alice", "TEA").await;
    eventually(
        db,
        "select count(*) from orders",
        1,
        Duration::from_secs(10),
    )
    .await;
    (api, id)
}

#[tokio::test]
async fn a_subscription_whose_setup_hangs_ends_with_unavailable_and_gives_its_place_back() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.http.timeout = Duration::from_millis(500);
    settings.http.subscriptions_per_socket = 1;
    let (api, id) = one_projected_order(&db, &settings).await;
    let mut socket = connect(&api, Some(&customer("alice"))).await;

    // The setup reads the order's baseline row, which waits behind a lock held elsewhere.
    let holder = db.connect().await.unwrap();
    holder
        .batch_execute("begin; lock table orders in access exclusive mode")
        .await
        .unwrap();
    subscribe(&mut socket, "hung", FOLLOW, json!({ "id": id })).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), next(&mut socket))
        .await
        .expect("the hung setup ends within a few timeouts");
    assert_eq!(ended["id"], "hung");
    assert_eq!(ended["type"], "error", "{ended}");
    assert_eq!(ended["payload"][0]["extensions"]["code"], "UNAVAILABLE");
    holder.batch_execute("rollback").await.unwrap();

    // The socket's one place is free again; once set up, a subscription outlives the timeout.
    subscribe(
        &mut socket,
        "again",
        FOLLOW,
        json!({ "id": id, "after": -1 }),
    )
    .await;
    let placed = next(&mut socket).await;
    assert_eq!(placed["id"], "again");
    assert_eq!(
        placed["payload"]["data"]["orderUpdated"]["version"], 0,
        "{placed}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel_as(&api, "alice", &id).await;
    let cancelled = next(&mut socket).await;
    assert_eq!(
        cancelled["payload"]["data"]["orderUpdated"]["status"], "CANCELLED",
        "{cancelled}"
    );
}

/// A read that fails because the database did not answer (here its connection is cut while
/// it waits) is read again once the database answers, instead of ending the subscription: the
/// change behind it still reaches the subscriber.
#[tokio::test]
async fn order_updated_reads_again_after_the_database_failed_to_answer() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    let (api, id) = one_projected_order(&db, &settings).await;
    let mut socket = connect(&api, Some(&customer("alice"))).await;
    subscribe(&mut socket, "1", FOLLOW, json!({ "id": id, "after": -1 })).await;
    let placed = next(&mut socket).await;
    assert_eq!(
        placed["payload"]["data"]["orderUpdated"]["version"], 0,
        "{placed}"
    );

    // The read models locked: the cancellation waits to be projected, and the follower's read
    // of the order, woken by a notice of that order, waits behind the lock too.
    let holder = db.connect().await.unwrap();
    holder
        .batch_execute("begin; lock table orders in access exclusive mode")
        .await
        .unwrap();
    cancel_as(&api, "alice", &id).await;
    let notice = json!({ "projection": "orders", "position": "00000000000000000000000000000000",
        "order_ids": [id] });
    let admin = db.connect().await.unwrap();
    admin
        .execute(
            "select pg_notify('orderly_projections', $1)",
            &[&notice.to_string()],
        )
        .await
        .unwrap();
    // The follower's read of the order, waiting behind the lock.
    let waiting = "from pg_stat_activity where datname = current_database() \
         and wait_event_type = 'Lock' and query like '%from orders o left join order_payments%'";
    eventually(
        &db,
        &format!("select count(*) {waiting}"),
        1,
        Duration::from_secs(10),
    )
    .await;
    // Its connection cut while it waits: the read fails as unavailable.
    let cut = admin
        .query(&format!("select pg_terminate_backend(pid) {waiting}"), &[])
        .await
        .unwrap();
    assert_eq!(cut.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.batch_execute("rollback").await.unwrap();

    let cancelled = tokio::time::timeout(Duration::from_secs(15), next(&mut socket))
        .await
        .expect("the cancellation pushed once the database answers");
    assert_eq!(cancelled["type"], "next", "{cancelled}");
    assert_eq!(
        cancelled["payload"]["data"]["orderUpdated"]["status"], "CANCELLED",
        "{cancelled}"
    );
}

#[tokio::test]
async fn subscriptions_are_capped_per_socket_and_per_caller() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.http.subscriptions_per_socket = 2;
    settings.http.subscriptions_per_subject = 3;
    let api = start(&settings).await;
    let too_many = |message: &Value| {
        assert_eq!(message["type"], "error", "{message}");
        assert_eq!(message["payload"][0]["extensions"]["code"], "RATE_LIMITED");
        assert_eq!(
            message["payload"][0]["extensions"]["reason"],
            "TOO_MANY_SUBSCRIPTIONS"
        );
    };
    let mut first = connect(&api, Some(&admin())).await;
    subscribe(&mut first, "a", PRODUCT_EVENTS, json!({})).await;
    subscribe(&mut first, "b", PRODUCT_EVENTS, json!({})).await;
    subscribe(&mut first, "c", PRODUCT_EVENTS, json!({})).await;
    too_many(&next(&mut first).await);
    // Queries are not subscriptions: they still run.
    subscribe(
        &mut first,
        "q",
        "{ product(sku: \"NONE\") { sku } }",
        json!({}),
    )
    .await;
    assert_eq!(next(&mut first).await["type"], "next");

    let mut second = connect(&api, Some(&admin())).await;
    subscribe(&mut second, "d", PRODUCT_EVENTS, json!({})).await;
    subscribe(&mut second, "e", PRODUCT_EVENTS, json!({})).await;
    too_many(&next(&mut second).await);
    // Another caller has places of its own.
    let mut other = connect(
        &api,
        Some(&token("admin-2", &[orderly_graphql::Role::Admin])),
    )
    .await;
    subscribe(&mut other, "x", PRODUCT_EVENTS, json!({})).await;

    // Closing a socket gives its places back: two more fit, not three.
    drop(first);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut third = connect(&api, Some(&admin())).await;
    for id in ["f", "g"] {
        subscribe(&mut third, id, PRODUCT_EVENTS, json!({})).await;
        let probe = format!("probe-{id}");
        subscribe(
            &mut third,
            &probe,
            "{ product(sku: \"NONE\") { sku } }",
            json!({}),
        )
        .await;
        assert_eq!(next(&mut third).await["type"], "next", "{id}");
    }
    let mut fourth = connect(&api, Some(&admin())).await;
    subscribe(&mut fourth, "i", PRODUCT_EVENTS, json!({})).await;
    too_many(&next(&mut fourth).await);
    // Completing one gives its place back at once.
    send(&mut third, json!({ "type": "complete", "id": "f" })).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    subscribe(&mut second, "h", PRODUCT_EVENTS, json!({})).await;
    subscribe(
        &mut second,
        "probe-h",
        "{ product(sku: \"NONE\") { sku } }",
        json!({}),
    )
    .await;
    assert_eq!(next(&mut second).await["type"], "next");
    subscribe(&mut other, "y", PRODUCT_EVENTS, json!({})).await;
    subscribe(
        &mut other,
        "probe-y",
        "{ product(sku: \"NONE\") { sku } }",
        json!({}),
    )
    .await;
    assert_eq!(next(&mut other).await["type"], "next");
}
