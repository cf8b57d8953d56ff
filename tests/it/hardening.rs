//! The API against hostile input and tokens, over HTTP (and, fuzzed, over WebSocket) against
//! a real PostgreSQL: bad values are the caller's (BAD_USER_INPUT, never INTERNAL, nothing
//! written), tokens must carry what the server is configured to require, and a database error
//! says what the database said.

use crate::common::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
    let Shop { db, api, .. } = Shop::open().await;
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
    let Shop { db: _db, api, .. } = Shop::open().await;
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
    let Shop { db, api, .. } = Shop::open().await;
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
    let Shop { db: _db, api, .. } = Shop::open().await;
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
    let mut settings = settings_for(db.url());
    settings.store.database_url = db
        .url()
        .replacen("postgres@", &format!("{role}@"), 1)
        .into();
    let budget = orderly_service::app::ConnectionBudget::of(
        &settings,
        orderly_service::app::Part::Everything,
        true,
    );
    let error = orderly_service::app::check_connections(&settings, &budget)
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
    // A login the server refuses (class 28) is no matter of pool sizes.
    settings.store.database_url = db
        .url()
        .replacen("postgres@", &format!("{role}@"), 1)
        .into();
    let error = orderly_service::app::check_connections(&settings, &budget)
        .await
        .expect_err("the start must stop")
        .to_string();
    assert!(error.contains("28000"), "{error}");
    assert!(error.contains("refused the login"), "{error}");
    assert!(!error.contains("POOL_SIZE"), "{error}");
    // A server with room passes.
    orderly_service::app::check_connections(&settings_for(db.url()), &budget)
        .await
        .unwrap();
}

#[tokio::test]
async fn someone_elses_order_and_a_missing_one_answer_alike_everywhere() {
    let Shop { db: _db, api, .. } = Shop::open().await;
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
    let Shop { db: _db, api, .. } = Shop::open().await;
    register(&api, "MUG", 1250, "EUR", 10).await;
    let id = place(&api, "alice", "MUG", 1, "tok_ok_4242").await.id;
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

/// A standing fuzz run over the served schema: operations built from the SDL the server
/// serves, every argument filled with hostile values, sent with every kind of token. The
/// properties: no 5xx, no INTERNAL, every error coded, no panic (the connection would drop),
/// and a refused mutation writes nothing. Bounded: a few hundred requests, seconds of work.
mod fuzz {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::fmt::Debug;
    use std::time::Duration;

    use async_graphql::parser::types::{
        BaseType, FieldDefinition, InputValueDefinition, Type, TypeKind, TypeSystemDefinition,
    };
    use futures::StreamExt;
    use orderly_graphql::Role;
    use orderly_test_support::TestDb;
    use proptest::prelude::*;
    use proptest::test_runner::{
        Config, FileFailurePersistence, TestCaseError, TestError, TestRunner,
    };
    use tokio::runtime::Runtime;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    /// Where each fuzz test keeps the seeds of the cases that failed it, committed so that a
    /// failure found once (in CI, say) is replayed first on every later run. proptest uses a
    /// `Direct` path as it is, so these resolve against the current directory, which is the
    /// package root when cargo or nextest runs an integration test.
    const HTTP_REGRESSIONS: &str = "tests/regressions/hardening-fuzz-http.txt";
    const SOCKET_REGRESSIONS: &str = "tests/regressions/hardening-fuzz-socket.txt";

    /// The served schema's types, by name.
    struct Types {
        kinds: HashMap<String, TypeKind>,
        query: Vec<FieldDefinition>,
        mutation: Vec<FieldDefinition>,
        subscription: Vec<FieldDefinition>,
    }

    impl Types {
        fn parse(sdl: &str) -> Self {
            let document = async_graphql::parser::parse_schema(sdl).expect("served SDL parses");
            let mut kinds = HashMap::new();
            for definition in document.definitions {
                if let TypeSystemDefinition::Type(ty) = definition {
                    kinds.insert(ty.node.name.node.to_string(), ty.node.kind);
                }
            }
            let fields = |name: &str| match kinds.get(name) {
                Some(TypeKind::Object(object)) => {
                    object.fields.iter().map(|f| f.node.clone()).collect()
                }
                _ => Vec::new(),
            };
            let (query, mutation) = (fields("Query"), fields("Mutation"));
            let subscription = fields("Subscription");
            Self {
                kinds,
                query,
                mutation,
                subscription,
            }
        }

        /// A selection of `ty`'s leaves, and of its objects' leaves two levels down.
        fn selection(&self, ty: &Type, depth: usize) -> String {
            let name = match &ty.base {
                BaseType::Named(name) => name.to_string(),
                BaseType::List(item) => return self.selection(item, depth),
            };
            let Some(TypeKind::Object(object)) = self.kinds.get(&name) else {
                return String::new();
            };
            let fields: Vec<String> = object
                .fields
                .iter()
                .map(|f| &f.node)
                .filter(|f| f.arguments.iter().all(|a| a.node.ty.node.nullable))
                .filter_map(|f| {
                    let inner = self.selection(&f.ty.node, depth + 1);
                    match (self.is_object(&f.ty.node), depth < 2) {
                        (false, _) => Some(f.name.node.to_string()),
                        (true, true) if !inner.is_empty() => {
                            Some(format!("{} {inner}", f.name.node))
                        }
                        _ => None,
                    }
                })
                .collect();
            if fields.is_empty() {
                String::new()
            } else {
                format!("{{ {} }}", fields.join(" "))
            }
        }

        fn is_object(&self, ty: &Type) -> bool {
            match &ty.base {
                BaseType::Named(name) => {
                    matches!(self.kinds.get(name.as_str()), Some(TypeKind::Object(_)))
                }
                BaseType::List(item) => self.is_object(item),
            }
        }

        /// A hostile value of `ty` (sometimes the wrong kind altogether).
        fn value(
            &self,
            ty: &Type,
            rng: &mut fastrand::Rng,
            known: &[String],
            depth: usize,
        ) -> Value {
            if ty.nullable && rng.u8(..8) == 0 {
                return Value::Null;
            }
            match &ty.base {
                BaseType::List(item) => {
                    let len = if depth > 3 { 0 } else { rng.usize(..4) };
                    Value::Array(
                        (0..len)
                            .map(|_| self.value(item, rng, known, depth + 1))
                            .collect(),
                    )
                }
                BaseType::Named(name) => self.named(name, rng, known, depth),
            }
        }

        fn named(
            &self,
            name: &str,
            rng: &mut fastrand::Rng,
            known: &[String],
            depth: usize,
        ) -> Value {
            match self.kinds.get(name) {
                Some(TypeKind::Enum(values)) => {
                    if rng.u8(..6) == 0 {
                        return json!("NOT_A_VALUE");
                    }
                    let i = rng.usize(..values.values.len().max(1));
                    values
                        .values
                        .get(i)
                        .map_or(Value::Null, |v| json!(v.node.value.node.as_str()))
                }
                Some(TypeKind::InputObject(input)) => {
                    let mut object = serde_json::Map::new();
                    for field in &input.fields {
                        let field: &InputValueDefinition = &field.node;
                        if field.ty.node.nullable && rng.bool() {
                            continue;
                        }
                        object.insert(
                            field.name.node.to_string(),
                            self.value(&field.ty.node, rng, known, depth + 1),
                        );
                    }
                    Value::Object(object)
                }
                _ => scalar(name, rng, known),
            }
        }
    }

    /// Strings that broke servers before: control characters, escapes, SQL and LIKE
    /// metacharacters, huge and odd Unicode, ids and cursors that are almost right.
    fn hostile_text(rng: &mut fastrand::Rng, known: &[String]) -> String {
        let fixed = [
            "",
            " ",
            "\u{0}",
            "a\u{0}b",
            "\u{1b}[31m",
            "line\nbreak",
            "\u{7f}",
            "\u{85}",
            "'; drop table events; --",
            "%",
            "_",
            "\\",
            "🦀",
            "ｅｕｒ",
            "EUR",
            "ZZZ",
            "XXX",
            "-1",
            "99999999999999999999999",
            "order-",
            "$all",
            "-",
            "o1",
            "bzE6LTgwMDAwMDAwMDAwMDAwMDAwMDA6MDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAw",
            "cDE6TVVHOk11AGc",
            "00000000000000000000000000000000",
            "ffffffffffffffffffffffffffffffff",
            "\u{202e}evil",
            "tok_ok",
            "tok_declined",
            "DE",
            "de",
        ];
        match rng.u8(..10) {
            0 => "A".repeat(rng.usize(200..20_000)),
            1 => (0..rng.usize(1..40))
                .map(|_| char::from_u32(rng.u32(..0x11_0000)).unwrap_or('?'))
                .collect(),
            2 | 3 if !known.is_empty() => known[rng.usize(..known.len())].clone(),
            _ => fixed[rng.usize(..fixed.len())].to_owned(),
        }
    }

    fn scalar(name: &str, rng: &mut fastrand::Rng, known: &[String]) -> Value {
        let pick =
            |rng: &mut fastrand::Rng, values: &[Value]| values[rng.usize(..values.len())].clone();
        let wrong = rng.u8(..10) == 0;
        match name {
            _ if wrong => pick(
                rng,
                &[json!(1.5), json!(true), json!([]), json!({}), json!("x")],
            ),
            "Int" => pick(
                rng,
                &[
                    json!(0),
                    json!(-1),
                    json!(1),
                    json!(100),
                    json!(101),
                    json!(i32::MAX),
                    json!(i32::MIN),
                ],
            ),
            "Long" => pick(
                rng,
                &[
                    json!(0),
                    json!(-1),
                    json!((1i64 << 53) - 1),
                    json!(-((1i64 << 53) - 1)),
                    json!(1i64 << 53),
                    json!(1e300),
                ],
            ),
            "Boolean" => json!(rng.bool()),
            "DateTime" => pick(
                rng,
                &[
                    json!("-5000-01-01T00:00:00Z"),
                    json!("-4713-11-24T00:00:00Z"),
                    json!("+262143-12-31T23:59:59Z"),
                    json!("2026-12-03T08:00:00Z"),
                    json!("2026-13-01T00:00:00Z"),
                    json!("now"),
                ],
            ),
            "Date" => pick(
                rng,
                &[
                    json!("0000-01-01"),
                    json!("9999-12-31"),
                    json!("2026-02-30"),
                    json!("2026-12-03"),
                    json!("-0001-01-01"),
                ],
            ),
            "UUID" => match rng.u8(..4) {
                0 => json!(uuid::Uuid::nil()),
                1 => json!("not-a-uuid"),
                // From the case's generator, so that its seed reproduces it.
                _ => json!(uuid::Uuid::from_u128(rng.u128(..))),
            },
            "ConsistencyToken" => pick(
                rng,
                &[
                    json!("0".repeat(32)),
                    json!("f".repeat(32)),
                    json!("zz"),
                    json!(""),
                ],
            ),
            "JSON" => json!({ "a": [hostile_text(rng, known)] }),
            _ => json!(hostile_text(rng, known)),
        }
    }

    /// One operation on `field` with hostile variables: its text and variables.
    fn operation(
        types: &Types,
        kind: &str,
        field: &FieldDefinition,
        rng: &mut fastrand::Rng,
        known: &[String],
    ) -> (String, Value) {
        let mut declared = Vec::new();
        let mut passed = Vec::new();
        let mut variables = serde_json::Map::new();
        for (i, argument) in field.arguments.iter().enumerate() {
            let argument = &argument.node;
            if argument.ty.node.nullable && rng.u8(..3) == 0 {
                continue;
            }
            declared.push(format!("$v{i}: {}", argument.ty.node));
            passed.push(format!("{}: $v{i}", argument.name.node));
            variables.insert(
                format!("v{i}"),
                types.value(&argument.ty.node, rng, known, 0),
            );
        }
        let list = |items: &[String]| {
            if items.is_empty() {
                String::new()
            } else {
                format!("({})", items.join(", "))
            }
        };
        let text = format!(
            "{kind}{} {{ {}{} {} }}",
            list(&declared),
            field.name.node,
            list(&passed),
            types.selection(&field.ty.node, 0)
        );
        (text, Value::Object(variables))
    }

    /// The app with a product and an order, its schema, and what the generators may aim at.
    struct Fixture {
        runtime: Runtime,
        db: TestDb,
        api: Api,
        types: Types,
        /// Ids and names that exist, so that some cases get past "not found".
        known: Vec<String>,
    }

    fn fixture() -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let db = runtime.block_on(migrated_database());
        let mut settings = settings_for(db.url());
        // A future consistency token then costs milliseconds, not seconds.
        settings.http.consistency_max_wait = Duration::from_millis(20);
        // Each subscription must give its place back for the next one on its socket.
        settings.http.subscriptions_per_socket = 1;
        let (api, sdl, known) = runtime.block_on(async {
            let api = start(&settings).await;
            register(&api, "MUG", 1250, "EUR", 1000).await;
            let order = place_one(&api, "alice", "MUG").await;
            let sdl = api.sdl().await;
            (
                api,
                sdl,
                vec![
                    order.clone(),
                    "MUG".to_owned(),
                    "alice".to_owned(),
                    format!("order-{}", uuid::Uuid::nil()),
                    format!("order-{order}"),
                ],
            )
        });
        let types = Types::parse(&sdl);
        assert!(
            types.query.len() >= 8 && types.mutation.len() >= 7 && !types.subscription.is_empty(),
            "schema not read"
        );
        Fixture {
            runtime,
            db,
            api,
            types,
            known,
        }
    }

    /// Each kind of caller, by name: every role, a token without one, a token the server
    /// refuses (a blank subject), and nobody.
    fn callers() -> [(&'static str, Option<String>); 6] {
        [
            ("admin", Some(admin())),
            ("customer alice", Some(customer("alice"))),
            ("warehouse", Some(warehouse())),
            ("no role", Some(token("mallory", &[]))),
            ("blank subject", Some(token("", &[Role::Admin]))),
            ("anonymous", None),
        ]
    }

    /// A runner of `cases` new cases after the ones `regressions` holds.
    fn runner(cases: u32, regressions: &'static str) -> TestRunner {
        TestRunner::new(Config {
            cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            // The seed drives a whole generator: a smaller seed is another case, not a simpler
            // one, so the case that failed is the one worth reporting.
            max_shrink_iters: 0,
            ..Config::default()
        })
    }

    /// Fails the test with the failing case and how to run it again.
    fn report<T: Debug>(outcome: Result<(), TestError<T>>, regressions: &str) {
        if let Err(failure) = outcome {
            panic!(
                "{failure}\nThe case's seed is kept in {regressions} (commit it): it replays \
                 first on every run of `cargo nextest run --test hardening -E 'test(/fuzz/)'`."
            );
        }
    }

    /// Whether `response` has data, or an error with a path: a resolver ran, past parsing and
    /// validation.
    fn reached_a_resolver(response: &Value) -> bool {
        let with_path = response["errors"]
            .as_array()
            .is_some_and(|errors| errors.iter().any(|e| e.get("path").is_some()));
        !response["data"].is_null() || with_path
    }

    /// The contract's codes on every error of `errors`, and never INTERNAL.
    fn coded(errors: &Value, context: &dyn Fn() -> String) -> Result<(), TestCaseError> {
        for error in errors.as_array().into_iter().flatten() {
            let code = error["extensions"]["code"].as_str();
            prop_assert!(code.is_some(), "uncoded error: {}", context());
            prop_assert!(code != Some("INTERNAL"), "INTERNAL: {}", context());
        }
        Ok(())
    }

    #[test]
    fn hostile_operations_from_the_served_schema_never_fail_the_server() {
        let Fixture {
            runtime,
            db,
            api,
            types,
            known,
        } = fixture();
        let callers = callers();
        let mut runner = runner(400, HTTP_REGRESSIONS);
        let strategy = (any::<u64>(), any::<bool>(), 0..callers.len());
        let resolved = Cell::new(0u32);
        let outcome = runner.run(&strategy, |(seed, mutate, who)| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (kind, fields) = if mutate {
                ("mutation", &types.mutation)
            } else {
                ("query", &types.query)
            };
            let field = &fields[rng.usize(..fields.len())];
            let (text, variables) = operation(&types, kind, field, &mut rng, &known);
            let (caller, token) = &callers[who];
            runtime.block_on(async {
                let before = events(&db).await;
                let answer = api.gql(token.as_deref(), &text, variables.clone()).await;
                let context = || {
                    format!(
                        "as {caller}: {text}\n{variables}\n-> {} {}",
                        answer.status, answer.body
                    )
                };
                prop_assert!(answer.status < 500, "5xx: {}", context());
                let errors = &answer.body["errors"];
                coded(errors, &context)?;
                if reached_a_resolver(&answer.body) {
                    resolved.set(resolved.get() + 1);
                }
                if mutate && errors.as_array().is_some_and(|errors| !errors.is_empty()) {
                    prop_assert_eq!(
                        events(&db).await,
                        before,
                        "a refused mutation wrote: {}",
                        context()
                    );
                }
                Ok::<(), TestCaseError>(())
            })
        });
        report(outcome, HTTP_REGRESSIONS);
        // Mostly refused by validation, the run would prove nothing about the resolvers.
        assert!(
            resolved.get() >= 100,
            "only {} of 400 operations reached a resolver",
            resolved.get()
        );
    }

    /// How long a subscription may stay silent before the client completes it: enough for a
    /// setup that fails to say so, not a bound on anything the server does.
    const QUIET: Duration = Duration::from_millis(100);

    #[test]
    fn hostile_subscriptions_from_the_served_schema_never_fail_the_socket() {
        // The database lives as long as the binding: `..` would drop it here.
        let Fixture {
            runtime,
            db: _db,
            api,
            types,
            known,
        } = fixture();
        let callers = callers();
        // One socket per caller, kept over the run, as a client keeps it.
        let sockets: RefCell<Vec<Option<Socket>>> =
            RefCell::new(callers.iter().map(|_| None).collect());
        let mut runner = runner(100, SOCKET_REGRESSIONS);
        let strategy = (any::<u64>(), 0..callers.len());
        let (serial, resolved) = (Cell::new(0u32), Cell::new(0u32));
        let outcome = runner.run(&strategy, |(seed, who)| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let field = &types.subscription[rng.usize(..types.subscription.len())];
            let (text, variables) = operation(&types, "subscription", field, &mut rng, &known);
            let (caller, token) = &callers[who];
            serial.set(serial.get() + 1);
            let id = format!("s{}", serial.get());
            let context = |got: &str| format!("as {caller}: {text}\n{variables}\n-> {got}");
            runtime.block_on(async {
                // Taken out for the case (no borrow is held across an await), put back after.
                let kept = sockets.borrow_mut()[who].take();
                let mut socket = match kept {
                    Some(socket) => socket,
                    None => match join(&api, token.as_deref()).await {
                        Ok(socket) => socket,
                        // The protocol's answer to a refused token.
                        Err(4403) => return Ok(()),
                        Err(code) => {
                            return Err(TestCaseError::fail(context(&format!(
                                "connection_init closed with {code}"
                            ))));
                        }
                    },
                };
                subscribe(&mut socket, &id, &text, variables.clone()).await;
                match answer(&mut socket, &id, QUIET).await {
                    Heard::Message(message) => {
                        let got = message.to_string();
                        let errors = match message["type"].as_str() {
                            Some("error") => &message["payload"],
                            _ => &message["payload"]["errors"],
                        };
                        coded(errors, &|| context(&got))?;
                        // Rate limits are off: this is the cap, held by an earlier one.
                        let capped = errors
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|error| error["extensions"]["code"] == "RATE_LIMITED");
                        prop_assert!(!capped, "a place still taken: {}", context(&got));
                        if reached_a_resolver(&message["payload"]) {
                            resolved.set(resolved.get() + 1);
                        }
                    }
                    // Set up, and waiting for something to happen.
                    Heard::Nothing => resolved.set(resolved.get() + 1),
                    Heard::Closed(why) => return Err(TestCaseError::fail(context(&why))),
                }
                // Completed by the client whatever it said; a probe then proves the socket
                // still serves.
                send(&mut socket, json!({ "type": "complete", "id": id })).await;
                let probe = format!("probe-{id}");
                subscribe(&mut socket, &probe, "{ __typename }", json!({})).await;
                match answer(&mut socket, &probe, Duration::from_secs(10)).await {
                    Heard::Message(message) if message["type"] == "next" => {}
                    other => {
                        let got = format!("then a probe got {other:?}");
                        return Err(TestCaseError::fail(context(&got)));
                    }
                }
                sockets.borrow_mut()[who] = Some(socket);
                Ok::<(), TestCaseError>(())
            })
        });
        report(outcome, SOCKET_REGRESSIONS);
        // Mostly refused by validation, the run would prove nothing about the resolvers.
        assert!(
            resolved.get() >= 30,
            "only {} of 100 subscriptions reached a resolver",
            resolved.get()
        );
    }

    /// A graphql-transport-ws connection as `token`, or the code it was closed with.
    async fn join(api: &Api, token: Option<&str>) -> Result<Socket, u16> {
        let mut socket = open(api).await;
        init(&mut socket, token).await;
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("connection_ack") => Ok(socket),
            Some(Ok(Message::Close(Some(frame)))) => Err(u16::from(frame.code)),
            other => panic!("neither an ack nor a close: {other:?}"),
        }
    }

    /// What the server said about one operation.
    #[derive(Debug)]
    enum Heard {
        Message(Value),
        Nothing,
        /// The socket ended, and how.
        Closed(String),
    }

    /// The first message for operation `id` within `wait`; messages for other (earlier,
    /// completed) operations are skipped and pings answered.
    async fn answer(socket: &mut Socket, id: &str, wait: Duration) -> Heard {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = match tokio::time::timeout_at(deadline, socket.next()).await {
                Err(_) => return Heard::Nothing,
                Ok(None) => return Heard::Closed("the socket ended without a close".into()),
                Ok(Some(Err(error))) => {
                    return Heard::Closed(format!("the socket failed: {error}"));
                }
                Ok(Some(Ok(message))) => message,
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => return Heard::Closed(format!("closed: {frame:?}")),
                _ => continue,
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] == "ping" {
                send(socket, json!({ "type": "pong" })).await;
            } else if value["id"] == id {
                return Heard::Message(value);
            }
        }
    }
}
