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

/// A standing fuzz run over the served schema: operations built from the SDL the server
/// serves, every argument filled with hostile values, sent with every kind of token. The
/// properties: no 5xx, no INTERNAL, every error coded, no panic (the connection would drop),
/// and a refused mutation writes nothing. Bounded: a few hundred requests, seconds of work.
mod fuzz {
    use std::collections::HashMap;

    use async_graphql::parser::types::{
        BaseType, FieldDefinition, InputValueDefinition, Type, TypeKind, TypeSystemDefinition,
    };
    use orderly_platform::Role;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

    use super::*;

    /// Where the fuzz test keeps the seeds of the cases that failed it, committed so that a
    /// failure found once (in CI, say) is replayed first on every later run. proptest uses a
    /// `Direct` path as it is, so this resolves against the current directory, which is the
    /// package root when cargo or nextest runs an integration test.
    const HTTP_REGRESSIONS: &str = "tests/regressions/hardening-fuzz-http.txt";

    /// The served schema's types, by name.
    struct Types {
        kinds: HashMap<String, TypeKind>,
        query: Vec<FieldDefinition>,
        mutation: Vec<FieldDefinition>,
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
            Self {
                kinds,
                query,
                mutation,
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

    #[test]
    fn hostile_operations_from_the_served_schema_never_fail_the_server() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let db = runtime.block_on(migrated_database());
        let settings = orderly::settings::Settings {
            // A future consistency token then costs milliseconds, not seconds.
            consistency_max_wait_ms: 20,
            ..settings_for(db.url())
        };
        let (api, sdl, known) = runtime.block_on(async {
            let api = start(&settings).await;
            register(&api, "MUG", 1250, "EUR", 1000).await;
            let order = place_one(&api, "alice", "MUG").await;
            let sdl = api.sdl().await;
            (
                api,
                sdl,
                vec![
                    order,
                    "MUG".to_owned(),
                    "alice".to_owned(),
                    format!("order-{}", uuid::Uuid::nil()),
                ],
            )
        });
        let types = Types::parse(&sdl);
        assert!(
            types.query.len() >= 8 && types.mutation.len() >= 7,
            "schema not read"
        );
        let callers = [
            ("admin", Some(admin())),
            ("customer alice", Some(customer("alice"))),
            ("warehouse", Some(warehouse())),
            ("no role", Some(token("mallory", &[]))),
            ("blank subject", Some(token("", &[Role::Admin]))),
            ("anonymous", None),
        ];
        let mut runner = TestRunner::new(Config {
            cases: 400,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(HTTP_REGRESSIONS))),
            // The seed drives a whole generator: a smaller seed is another case, not a simpler
            // one, so the case that failed is the one worth reporting.
            max_shrink_iters: 0,
            ..Config::default()
        });
        let strategy = (any::<u64>(), any::<bool>(), 0..callers.len());
        let resolved = std::cell::Cell::new(0u32);
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
                let errors = answer.body["errors"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for error in &errors {
                    let code = error["extensions"]["code"].as_str();
                    prop_assert!(code.is_some(), "uncoded error: {}", context());
                    prop_assert!(code != Some("INTERNAL"), "INTERNAL: {}", context());
                }
                // Data, or an error with a path: a resolver ran, past parsing and validation.
                if !answer.body["data"].is_null() || errors.iter().any(|e| e.get("path").is_some())
                {
                    resolved.set(resolved.get() + 1);
                }
                if mutate && !errors.is_empty() {
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
        if let Err(failure) = outcome {
            panic!(
                "{failure}\nThe case's seed is kept in {HTTP_REGRESSIONS} (commit it): it replays \
                 first on every run of `cargo nextest run --test hardening -E 'test(/fuzz/)'`."
            );
        }
        // Mostly refused by validation, the run would prove nothing about the resolvers.
        assert!(
            resolved.get() >= 100,
            "only {} of 400 operations reached a resolver",
            resolved.get()
        );
    }
}
