//! The read API over HTTP against a real PostgreSQL: read-your-writes with consistency tokens,
//! the stale paths, pagination under concurrent inserts, who may read what, and bad input.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::*;
use orderly_service::app::App;
use serde_json::{Value, json};

const ORDER: &str = "query($id: UUID!, $c: ConsistencyInput) {
  order(id: $id, consistency: $c) {
    id customerId status version total { amountMinor currency }
    lines { sku name quantity unitPrice { amountMinor } lineTotal { amountMinor } }
    history { status } shippingAddress { city country } payment { status } shipment { carrier }
  } }";

const ORDERS: &str = "query($f: OrderFilter, $first: Int, $after: String, $c: ConsistencyInput) {
  orders(filter: $f, first: $first, after: $after, consistency: $c) {
    edges { cursor node { id customerId status } }
    nodes { id }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";

fn strict(token: &str) -> Value {
    json!({ "atLeast": token, "timeoutMs": 5000, "mode": "STRICT" })
}

fn consistency(answer: &Answer) -> &Value {
    &answer.body["extensions"]["consistency"]
}

#[tokio::test]
async fn a_query_with_the_mutations_token_sees_the_write_a_hundred_times_in_a_row() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 1000).await;
    let alice = customer("alice");
    for round in 0..100 {
        let Placed { id, token } = place(&api, "alice", "TEA", 1, "tok_ok").await;
        let answer = api
            .gql(
                Some(&alice),
                ORDER,
                json!({ "id": id, "c": strict(&token) }),
            )
            .await;
        let order = answer.data("order");
        assert_eq!(order["id"], json!(id), "round {round}: {}", answer.body);
        assert_eq!(order["status"], "PLACED");
        assert_eq!(order["customerId"], "alice");
        assert_eq!(
            order["total"],
            json!({ "amountMinor": 650, "currency": "EUR" })
        );
        assert_eq!(order["lines"][0]["name"], "Product TEA");
        let seen = consistency(&answer);
        assert_eq!(seen["stale"], false, "round {round}");
        assert!(
            seen["token"].as_str().unwrap() >= token.as_str(),
            "round {round}: answered at {} before the write at {token}",
            seen["token"]
        );

        // The product's stock, written by the same placement's saga-free path, is its own
        // projection: a restock's token makes the products answer include it.
        if round % 25 == 0 {
            let restocked = api
                .gql(
                    Some(&admin()),
                    "mutation { restock(sku: \"TEA\", quantity: 5) { token } }",
                    json!({}),
                )
                .await;
            let token = restocked.data("restock")["token"]
                .as_str()
                .unwrap()
                .to_owned();
            let product = api
                .gql(
                    None,
                    "query($c: ConsistencyInput) { product(sku: \"TEA\", consistency: $c) { onHand version } }",
                    json!({ "c": strict(&token) }),
                )
                .await;
            let expected = 1000 + 5 * (round / 25 + 1);
            assert_eq!(
                product.data("product")["onHand"],
                expected,
                "{}",
                product.body
            );
        }
    }
}

#[tokio::test]
async fn with_the_projections_paused_bounded_reads_say_stale_and_strict_reads_fail() {
    let db = migrated_database().await;
    let mut settings = settings_for(db.url());
    settings.http.consistency_max_wait = Duration::from_millis(300);
    let app = App::build(&settings).await.unwrap().without_projections();
    let api = Api {
        base: format!("http://{}", app.local_addr()),
        http: reqwest::Client::new(),
    };
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    register(&api, "TEA", 650, "EUR", 10).await;
    let alice = customer("alice");
    let Placed { id, token } = place(&api, "alice", "TEA", 1, "tok_ok").await;

    // BOUNDED: waits (capped by the server at 300 ms, though 60 s were asked), then answers
    // from the read model as it is, saying so.
    let bounded = json!({ "atLeast": token, "timeoutMs": 60000, "mode": "BOUNDED" });
    let answer = api
        .gql(Some(&alice), ORDER, json!({ "id": id, "c": bounded }))
        .await;
    assert_eq!(answer.data("order"), &Value::Null);
    assert_eq!(consistency(&answer)["stale"], true, "{}", answer.body);
    assert!(consistency(&answer)["token"].as_str().unwrap() < token.as_str());

    // STRICT: the same wait, then STALE_READ.
    let answer = api
        .gql(
            Some(&alice),
            ORDER,
            json!({ "id": id, "c": strict(&token) }),
        )
        .await;
    assert_eq!(answer.code(), "STALE_READ", "{}", answer.body);
    assert_eq!(answer.status, 200);
    assert_eq!(consistency(&answer)["stale"], true, "{}", answer.body);
    assert!(consistency(&answer)["token"].as_str().unwrap() < token.as_str());

    // Over a WebSocket, a query's answer carries the same report.
    let mut socket = connect(&api, Some(&alice)).await;
    subscribe(&mut socket, "q", ORDER, json!({ "id": id, "c": bounded })).await;
    let answer = next(&mut socket).await;
    let over_socket = &answer["payload"]["extensions"]["consistency"];
    assert_eq!(over_socket["stale"], true, "{answer}");
    assert!(over_socket["token"].as_str().unwrap() < token.as_str());
    assert!(over_socket["lagMs"].is_i64(), "{answer}");

    // No consistency argument: not stale by definition, but the lag says how far behind the
    // read models are: at least the two 300 ms waits above ago, the register was appended.
    // The lag counts only events below the log's horizon, which a long transaction of another
    // test in the same cluster may hold back for a while; hence the retries.
    let started = Instant::now();
    loop {
        let answer = api.gql(Some(&alice), ORDER, json!({ "id": id })).await;
        assert_eq!(consistency(&answer)["stale"], false);
        let lag = consistency(&answer)["lagMs"].as_i64().unwrap();
        if lag >= 600 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "lagMs {lag}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_query_answer_says_how_fresh_it_is_and_a_caught_up_one_has_no_lag() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let Placed { token, .. } = place(&api, "alice", "TEA", 1, "tok_ok").await;
    // Once the read models have the write, a query with no token reports them caught up.
    let waited = api
        .gql(
            Some(&admin()),
            "query($c: ConsistencyInput) { orders(first: 1, consistency: $c) { nodes { id } } products(consistency: $c) { nodes { sku } } }",
            json!({ "c": strict(&token) }),
        )
        .await;
    assert_eq!(waited.data("orders")["nodes"].as_array().unwrap().len(), 1);
    for query in [
        "{ products { nodes { sku } } }",
        "{ __typename }",
        "{ projections { name state deadLetters } }",
    ] {
        let answer = api.gql(Some(&admin()), query, json!({})).await;
        let seen = consistency(&answer);
        assert!(answer.body.get("errors").is_none(), "{}", answer.body);
        assert_eq!(seen["stale"], false, "{query}");
        assert!(seen["token"].as_str().unwrap() >= token.as_str(), "{query}");
        assert_eq!(seen["lagMs"], 0, "{query}: {}", answer.body);
    }
    // Mutations answer with their own token, not with the read side's freshness.
    let mutation = api
        .gql(
            Some(&admin()),
            "mutation { restock(sku: \"TEA\", quantity: 1) { token } }",
            json!({}),
        )
        .await;
    assert!(
        mutation.body["extensions"]["consistency"].is_null(),
        "{}",
        mutation.body
    );
}

#[tokio::test]
async fn paging_while_orders_arrive_loses_and_repeats_nothing() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 10_000).await;
    let mut before = Vec::new();
    let mut last_token = String::new();
    for i in 0..40 {
        let Placed { id, token } = place(&api, &format!("c{}", i % 4), "TEA", 1, "tok_ok").await;
        before.push(id);
        last_token = token;
    }
    // Orders keep arriving while a client pages through what was there.
    let writer = {
        let api = Api {
            base: api.base.clone(),
            http: reqwest::Client::new(),
        };
        tokio::spawn(async move {
            for i in 0..30 {
                place(&api, &format!("n{i}"), "TEA", 1, "tok_ok").await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let answer = api
            .gql(
                Some(&admin()),
                ORDERS,
                json!({ "first": 7, "after": after, "c": strict(&last_token) }),
            )
            .await;
        let page = answer.data("orders");
        let edges = page["edges"].as_array().unwrap();
        assert_eq!(page["nodes"].as_array().unwrap().len(), edges.len());
        assert_eq!(page["pageInfo"]["hasPreviousPage"], after.is_some());
        for edge in edges {
            seen.push(edge["node"]["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if page["pageInfo"]["hasNextPage"] == false {
            assert_eq!(
                page["pageInfo"]["endCursor"],
                edges.last().unwrap()["cursor"]
            );
            break;
        }
        after = Some(page["pageInfo"]["endCursor"].as_str().unwrap().to_owned());
        // Let some of the new orders land between pages.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "an order was repeated across pages"
    );
    for id in &before {
        assert!(unique.contains(id), "order {id} was skipped");
    }
    assert!(pages >= 6);
}

#[tokio::test]
async fn filters_search_customers_and_daily_sales_answer_from_the_read_models() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    register(&api, "MUG", 1200, "EUR", 100).await;
    let alice = customer("alice");
    place(&api, "alice", "TEA", 1, "tok_ok").await;
    let Placed { id: mug_order, .. } = place(&api, "alice", "MUG", 1, "tok_ok").await;
    let Placed { token, .. } = place(&api, "bob", "MUG", 1, "tok_ok").await;
    let c = strict(&token);

    let answer = api
        .gql(
            Some(&admin()),
            ORDERS,
            json!({ "f": { "customerId": "alice", "status": ["PLACED"] }, "c": c }),
        )
        .await;
    assert_eq!(answer.data("orders")["nodes"].as_array().unwrap().len(), 2);

    let search = "query($q: String!, $c: ConsistencyInput) { searchOrders(query: $q, consistency: $c) { nodes { id customerId } } }";
    let answer = api
        .gql(Some(&alice), search, json!({ "q": "MUG", "c": c }))
        .await;
    // Alice searches her own orders only, though bob bought a mug too.
    assert_eq!(
        answer.data("searchOrders")["nodes"],
        json!([{ "id": mug_order, "customerId": "alice" }])
    );
    let answer = api
        .gql(Some(&admin()), search, json!({ "q": "Berlin", "c": c }))
        .await;
    assert_eq!(
        answer.data("searchOrders")["nodes"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let answer = api
        .gql(
            Some(&alice),
            "query($c: ConsistencyInput) { customer(id: \"alice\", consistency: $c) { id orderCount lifetimeValue { amountMinor currency } lastOrderAt orders(first: 1) { nodes { id } pageInfo { hasNextPage } } } }",
            json!({ "c": c }),
        )
        .await;
    let alice_record = answer.data("customer");
    assert_eq!(alice_record["orderCount"], 2);
    assert_eq!(
        alice_record["lifetimeValue"],
        json!([{ "amountMinor": 1850, "currency": "EUR" }])
    );
    assert_eq!(alice_record["orders"]["pageInfo"]["hasNextPage"], true);

    let today = chrono::Utc::now().date_naive().to_string();
    let answer = api
        .gql(
            Some(&admin()),
            "query($d: Date!, $c: ConsistencyInput) { salesByDay(from: $d, to: $d, consistency: $c) { date currency orders cancelled revenue { amountMinor } } }",
            json!({ "d": today, "c": c }),
        )
        .await;
    assert_eq!(
        answer.data("salesByDay"),
        &json!([{ "date": today, "currency": "EUR", "orders": 3, "cancelled": 0, "revenue": { "amountMinor": 3050 } }])
    );

    let products = api
        .gql(
            None,
            // The token covers the registrations too: the products runner may be behind.
            "query($c: ConsistencyInput) { products(search: \"mug\", consistency: $c) { nodes { sku price { amountMinor currency } available } } all: products(first: 1, consistency: $c) { nodes { sku } pageInfo { hasNextPage endCursor } } }",
            json!({ "c": c }),
        )
        .await;
    assert_eq!(
        products.data("products")["nodes"],
        json!([{ "sku": "MUG", "price": { "amountMinor": 1200, "currency": "EUR" }, "available": 100 }])
    );
    let cursor = products.data("all")["pageInfo"]["endCursor"].clone();
    let next = api
        .gql(
            None,
            "query($a: String) { products(first: 5, after: $a) { nodes { sku } pageInfo { hasNextPage } } }",
            json!({ "a": cursor }),
        )
        .await;
    assert_eq!(
        next.data("products"),
        &json!({ "nodes": [{ "sku": "TEA" }], "pageInfo": { "hasNextPage": false } })
    );
}

#[tokio::test]
async fn customers_see_their_own_orders_and_record_only_and_admin_reads_are_admin_only() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "TEA", 650, "EUR", 100).await;
    let alice = customer("alice");
    let bob = customer("bob");
    let Placed { id, token } = place(&api, "alice", "TEA", 1, "tok_ok").await;
    let c = strict(&token);
    let order_of = |answer: &Answer| answer.data("order").clone();

    // order(id): the owner, the warehouse and admins see it; another customer sees nothing.
    for (who, sees) in [
        (&alice, true),
        (&warehouse(), true),
        (&admin(), true),
        (&bob, false),
    ] {
        let answer = api.gql(Some(who), ORDER, json!({ "id": id, "c": c })).await;
        assert_eq!(order_of(&answer).is_null(), !sees, "{}", answer.body);
    }
    let anonymous = api.gql(None, ORDER, json!({ "id": id })).await;
    assert_eq!(anonymous.code(), "UNAUTHENTICATED");

    // orders: a customer asking for another's orders is refused; unfiltered, they get theirs.
    let answer = api
        .gql(
            Some(&bob),
            ORDERS,
            json!({ "f": { "customerId": "alice" } }),
        )
        .await;
    assert_eq!(answer.code(), "FORBIDDEN");
    let answer = api.gql(Some(&bob), ORDERS, json!({ "c": c })).await;
    assert_eq!(answer.data("orders")["nodes"], json!([]));
    let answer = api.gql(Some(&alice), ORDERS, json!({ "c": c })).await;
    assert_eq!(answer.data("orders")["nodes"], json!([{ "id": id }]));

    // customer: the customer themself and admins.
    let record = "query($id: String!) { customer(id: $id) { id orderCount } }";
    let answer = api
        .gql(Some(&alice), record, json!({ "id": "alice" }))
        .await;
    assert_eq!(answer.data("customer")["orderCount"], 1);
    assert_eq!(
        api.gql(Some(&admin()), record, json!({ "id": "alice" }))
            .await
            .data("customer")["id"],
        "alice"
    );
    for who in [&bob, &warehouse()] {
        assert_eq!(
            api.gql(Some(who), record, json!({ "id": "alice" }))
                .await
                .code(),
            "FORBIDDEN"
        );
    }
    assert_eq!(
        api.gql(None, record, json!({ "id": "alice" })).await.code(),
        "UNAUTHENTICATED"
    );

    // orderEvents: the audit trail of one's own order.
    let events =
        "query($id: UUID!) { orderEvents(orderId: $id) { type version stream data metadata } }";
    let answer = api.gql(Some(&alice), events, json!({ "id": id })).await;
    let trail = answer.data("orderEvents");
    assert_eq!(trail[0]["type"], "OrderPlaced");
    assert_eq!(trail[0]["stream"], format!("order-{id}"));
    assert_eq!(trail[0]["data"]["customer_id"], "alice");
    assert_eq!(
        api.gql(Some(&admin()), events, json!({ "id": id }))
            .await
            .data("orderEvents"),
        trail
    );
    assert_eq!(
        api.gql(Some(&bob), events, json!({ "id": id }))
            .await
            .data("orderEvents"),
        &json!([])
    );

    // Products are public.
    let answer = api
        .gql(None, "{ product(sku: \"TEA\") { sku } }", json!({}))
        .await;
    assert!(answer.body.get("errors").is_none(), "{}", answer.body);

    // projections and salesByDay: admins only.
    for query in [
        "{ projections { name state position lagEvents lagMs deadLetters } }",
        "{ salesByDay(from: \"2026-01-01\", to: \"2026-12-31\") { date } }",
    ] {
        assert!(
            api.gql(Some(&admin()), query, json!({}))
                .await
                .body
                .get("errors")
                .is_none()
        );
        for who in [&alice, &warehouse()] {
            assert_eq!(
                api.gql(Some(who), query, json!({})).await.code(),
                "FORBIDDEN",
                "{query}"
            );
        }
        assert_eq!(
            api.gql(None, query, json!({})).await.code(),
            "UNAUTHENTICATED"
        );
    }
    let answer = api
        .gql(Some(&admin()), "{ projections { name state } }", json!({}))
        .await;
    let names: Vec<&str> = answer
        .data("projections")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "products"]);
}

#[tokio::test]
async fn bad_queries_get_contract_errors_never_a_server_error() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let admin = admin();
    let cases: Vec<(&str, String, Value)> = vec![
        ("unknown field", "{ order(id: \"0198a1d2-0000-7000-8000-000000000000\") { nope } }".into(), json!({})),
        ("wrong type", "{ products(first: \"ten\") { nodes { sku } } }".into(), json!({})),
        ("page too large", "{ products(first: 101) { nodes { sku } } }".into(), json!({})),
        ("negative page", "{ orders(first: -1) { nodes { id } } }".into(), json!({})),
        ("foreign cursor", "{ orders(after: \"not-a-cursor\") { nodes { id } } }".into(), json!({})),
        ("bad token", "{ orders(consistency: { atLeast: \"zz\" }) { nodes { id } } }".into(), json!({})),
        ("negative timeout", "{ orders(consistency: { atLeast: \"00000000000000000000000000000000\", timeoutMs: -5 }) { nodes { id } } }".into(), json!({})),
        ("blank search", "{ searchOrders(query: \"   \") { nodes { id } } }".into(), json!({})),
        ("reversed dates", "{ salesByDay(from: \"2026-02-01\", to: \"2026-01-01\") { date } }".into(), json!({})),
        ("bad date", "{ salesByDay(from: \"01.02.2026\", to: \"2026-01-01\") { date } }".into(), json!({})),
        ("bad uuid", "{ order(id: \"123\") { id } }".into(), json!({})),
        ("syntax", "{ orders { ".into(), json!({})),
        ("too deep", deep_query(20), json!({})),
        ("too complex", too_complex(), json!({})),
        ("fragments that multiply", multiplying_fragments(), json!({})),
    ];
    for (what, query, variables) in cases {
        let answer = api.gql(Some(&admin), &query, variables).await;
        assert!(answer.status < 500, "{what}: {}", answer.status);
        let code = &answer.body["errors"][0]["extensions"]["code"];
        assert_eq!(code, "BAD_USER_INPUT", "{what}: {}", answer.body);
    }
    let huge = format!(
        "{{\"query\": \"{{ products(search: \\\"{}\\\") {{ nodes {{ sku }} }} }}\"}}",
        "x".repeat(300_000)
    );
    let answer = api.raw(Some(&admin), huge).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.code(), "BAD_USER_INPUT");
}

/// A query text validated once runs later with lighter validation, which leaves variable
/// types to execution; a wrong-typed variable must still get the answer full validation gives.
#[tokio::test]
async fn a_query_seen_before_checks_its_variables_as_strictly_as_the_first_time() {
    let Shop { db: _db, api, .. } = Shop::open().await;
    let admin = admin();
    let query = "query($first: Int, $consistency: ConsistencyInput) {
        products(first: $first, consistency: $consistency) { nodes { sku } } }";
    let bad = [
        json!({ "first": "ten" }),
        json!({ "first": 1.5 }),
        json!({ "consistency": { "atLeast": "00000000000000000000000000000000", "timeoutMs": "soon" } }),
        json!({ "consistency": { "mode": "STRICT" } }),
        json!({ "consistency": { "atLeast": "00000000000000000000000000000000", "soon": 1 } }),
    ];
    // First sight of the text: full validation (a failed request does not make it known).
    let mut first = Vec::new();
    for variables in &bad {
        let answer = api.gql(Some(&admin), query, variables.clone()).await;
        assert_eq!(
            answer.body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
            "{}",
            answer.body
        );
        first.push(answer.body);
    }
    let good = api.gql(Some(&admin), query, json!({ "first": 5 })).await;
    assert!(good.body["errors"].is_null(), "{}", good.body);
    // Known now: the same bad variables get the same answers, word for word.
    for (variables, first) in bad.iter().zip(&first) {
        let answer = api.gql(Some(&admin), query, variables.clone()).await;
        assert_eq!(answer.body["errors"], first["errors"], "{variables}");
        assert_eq!(answer.body["data"], first["data"], "{variables}");
    }
    let again = api.gql(Some(&admin), query, json!({ "first": 5 })).await;
    assert_eq!(again.body["data"], good.body["data"]);
}

/// Introspection is the schema's one recursion (`ofType`), so it is how a query gets deep.
fn deep_query(depth: usize) -> String {
    format!(
        "{{ __type(name: \"Order\") {{ fields {{ type {{ {} name {} }} }} }} }}",
        "ofType { ".repeat(depth),
        "} ".repeat(depth)
    )
}

/// 4 KB of fragments, each spreading the next a hundred times: 100^8 fields once spread, which
/// a walk spread by spread would not finish.
fn multiplying_fragments() -> String {
    let mut document = String::from("{ ...F0 }");
    for level in 0..8 {
        let body = format!("...F{} ", level + 1).repeat(100);
        document.push_str(&format!(" fragment F{level} on Query {{ {body}}}"));
    }
    document + " fragment F8 on Query { __typename }"
}

/// Three full pages of 100 orders with every field: each is allowed, together they are not.
fn too_complex() -> String {
    let page = "orders(first: 100) { nodes { id customerId status version placedAt updatedAt cancellationReason total { amountMinor currency } lines { sku name quantity unitPrice { amountMinor currency } lineTotal { amountMinor currency } } history { status at reason } shippingAddress { name line1 line2 city postalCode country } payment { status attempts failureReason amount { amountMinor currency } } shipment { carrier trackingNumber shippedAt deliveredAt } } }";
    format!("{{ a: {page} b: {page} c: {page} }}")
}

#[tokio::test]
async fn a_read_api_process_waits_for_runners_in_another_process() {
    let db = migrated_database().await;
    let settings = settings_for(db.url());
    // Mutations and runners in one process, the read API alone in another (same database).
    let writer = start(&settings).await;
    let reader_app = App::build_part(&settings, orderly_service::app::Part::Reads)
        .await
        .unwrap();
    let reader = Api {
        base: format!("http://{}", reader_app.local_addr()),
        http: reqwest::Client::new(),
    };
    tokio::spawn(reader_app.run_until_stopped(std::future::pending()));
    register(&writer, "TEA", 650, "EUR", 100).await;
    let alice = customer("alice");
    for round in 0..20 {
        let Placed { id, token } = place(&writer, "alice", "TEA", 1, "tok_ok").await;
        let answer = reader
            .gql(
                Some(&alice),
                ORDER,
                json!({ "id": id, "c": strict(&token) }),
            )
            .await;
        assert_eq!(answer.data("order")["id"], json!(id), "round {round}");
        assert_eq!(consistency(&answer)["stale"], false);
    }
    // The read API alone takes no mutations.
    let refused = reader
        .gql(
            Some(&admin()),
            "mutation { restock(sku: \"TEA\", quantity: 1) { token } }",
            json!({}),
        )
        .await;
    assert_eq!(refused.code(), "BAD_USER_INPUT");
}

/// `n` copies of `field`, aliased `a0`, `a1`, ...
fn aliased(n: usize, field: &str) -> String {
    (0..n).map(|i| format!("a{i}: {field} ")).collect()
}

#[tokio::test]
async fn amplified_requests_are_refused_by_their_cost_never_answered() {
    let db = migrated_database().await;
    // The default burst of 100 tokens, refilled slowly enough for the test to spend it.
    let mut settings = settings_for(db.url());
    settings.http.rate_limit_per_second = 5;
    settings.http.rate_limit_burst = 100;
    let api = start(&settings).await;
    register(&api, "TEA", 650, "EUR", 10).await;
    let admin = admin();
    let events = || count(&db, "select count(*) from events");
    let before = events().await;

    let cases = [
        (
            "4,900 product reads",
            format!("{{ {} }}", aliased(4900, "product(sku: \"TEA\") { sku }")),
        ),
        (
            "150 restocks",
            format!(
                "mutation {{ {} }}",
                aliased(150, "restock(sku: \"TEA\", quantity: 1) { version }")
            ),
        ),
        (
            "3,000 empty product pages",
            format!(
                "{{ {} }}",
                aliased(3000, "products(first: 0) { nodes { sku } }")
            ),
        ),
        (
            "3,000 pages of a customer's orders",
            format!(
                "{{ customer(id: \"alice\") {{ {} }} }}",
                aliased(3000, "orders(first: 100) { nodes { id } }")
            ),
        ),
        (
            "100 pages of a customer's orders",
            format!(
                "{{ customer(id: \"alice\") {{ {} }} }}",
                aliased(100, "orders(first: 100) { nodes { id } }")
            ),
        ),
    ];
    for (what, query) in cases {
        let answer = api.gql(Some(&admin), &query, json!({})).await;
        assert_eq!(answer.code(), "BAD_USER_INPUT", "{what}: {}", answer.body);
        assert!(answer.body["data"].is_null(), "{what} was answered");
    }
    assert_eq!(events().await, before, "a refused mutation wrote");

    // Within the caps, a request takes a token per read: five requests of twenty reads spend
    // the burst of a hundred, and the sixth is told when to come back.
    let twenty = format!(
        "{{ {} }}",
        aliased(20, "products(first: 0) { nodes { sku } }")
    );
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(api.gql(Some(&admin), &twenty, json!({})).await);
    }
    let limited = answers
        .iter()
        .position(|answer| answer.status == 429)
        .expect("the budget was never spent");
    assert!(limited >= 4, "limited after {limited} requests");
    let refused = &answers[limited];
    assert_eq!(refused.code(), "RATE_LIMITED");
    assert!(refused.body["data"].is_null());
    assert!(refused.error()["extensions"]["retryAfterSeconds"].as_u64() >= Some(1));
    assert!(refused.retry_after.is_some());
    // Twenty restocks cost twenty tokens: within the caps, but the budget is spent.
    let restocks = format!(
        "mutation {{ {} }}",
        aliased(20, "restock(sku: \"TEA\", quantity: 1) { version }")
    );
    let answer = api.gql(Some(&admin), &restocks, json!({})).await;
    assert_eq!(answer.code(), "RATE_LIMITED", "{}", answer.body);
    assert_eq!(events().await, before, "a refused mutation wrote");
}
