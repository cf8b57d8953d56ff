//! The served schema against the contract kept in the repository (`api/schema.graphql`), and
//! that copy against the public contract it promises to keep (`../shared/api/schema.graphql`,
//! when the repository sits beside it): every type, field, argument, default and enum value of
//! the contract must be there with the same name and type. Additions are allowed only where
//! they break no client: new types and fields, new arguments and input fields that are optional.

use std::collections::HashMap;

use async_graphql::parser::parse_schema;
use async_graphql::parser::types::{
    InputValueDefinition, ServiceDocument, TypeDefinition, TypeKind, TypeSystemDefinition,
};

/// The repository's copy: the source of truth for what is served.
const CONTRACT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/api/schema.graphql");
/// The public contract, kept outside the repository by the people who write clients against it.
const PUBLIC_CONTRACT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/api/schema.graphql");

fn types(document: &ServiceDocument) -> HashMap<String, &TypeDefinition> {
    document
        .definitions
        .iter()
        .filter_map(|definition| match definition {
            TypeSystemDefinition::Type(t) => Some((t.node.name.node.to_string(), &t.node)),
            _ => None,
        })
        .collect()
}

fn kind_name(kind: &TypeKind) -> &'static str {
    match kind {
        TypeKind::Scalar => "scalar",
        TypeKind::Object(_) => "type",
        TypeKind::Interface(_) => "interface",
        TypeKind::Union(_) => "union",
        TypeKind::Enum(_) => "enum",
        TypeKind::InputObject(_) => "input",
    }
}

/// Compares one argument list (or input object's fields); `at` names where, for messages.
fn compare_inputs(
    at: &str,
    contract: &[async_graphql::Positioned<InputValueDefinition>],
    served: &[async_graphql::Positioned<InputValueDefinition>],
    problems: &mut Vec<String>,
) {
    let served_by_name: HashMap<String, &InputValueDefinition> = served
        .iter()
        .map(|v| (v.node.name.node.to_string(), &v.node))
        .collect();
    for wanted in contract {
        let name = wanted.node.name.node.to_string();
        let Some(got) = served_by_name.get(&name) else {
            problems.push(format!("{at}: `{name}` is missing"));
            continue;
        };
        if wanted.node.ty.node.to_string() != got.ty.node.to_string() {
            problems.push(format!(
                "{at}: `{name}` is {}, the contract says {}",
                got.ty.node, wanted.node.ty.node
            ));
        }
        let default = |v: &InputValueDefinition| v.default_value.as_ref().map(|d| d.node.clone());
        if default(&wanted.node) != default(got) {
            problems.push(format!(
                "{at}: `{name}` defaults to {:?}, the contract says {:?}",
                default(got),
                default(&wanted.node)
            ));
        }
    }
    let known: Vec<String> = contract
        .iter()
        .map(|v| v.node.name.node.to_string())
        .collect();
    for extra in served {
        let required = !extra.node.ty.node.nullable && extra.node.default_value.is_none();
        if required && !known.contains(&extra.node.name.node.to_string()) {
            problems.push(format!(
                "{at}: `{}` is an added required input, which breaks existing clients",
                extra.node.name.node
            ));
        }
    }
}

/// Everything in `contract` that `served` lacks or changes.
fn differences(contract: &ServiceDocument, served: &ServiceDocument) -> Vec<String> {
    let served_types = types(served);
    let mut problems = Vec::new();
    for (name, wanted) in types(contract) {
        let Some(got) = served_types.get(&name) else {
            problems.push(format!("{} {name} is missing", kind_name(&wanted.kind)));
            continue;
        };
        match (&wanted.kind, &got.kind) {
            (TypeKind::Scalar, TypeKind::Scalar) => {}
            (TypeKind::Enum(wanted), TypeKind::Enum(got)) => {
                let values: Vec<String> = got
                    .values
                    .iter()
                    .map(|v| v.node.value.node.to_string())
                    .collect();
                for value in &wanted.values {
                    if !values.contains(&value.node.value.node.to_string()) {
                        problems.push(format!("enum {name}: {} is missing", value.node.value.node));
                    }
                }
            }
            (TypeKind::InputObject(wanted), TypeKind::InputObject(got)) => {
                compare_inputs(
                    &format!("input {name}"),
                    &wanted.fields,
                    &got.fields,
                    &mut problems,
                );
            }
            (TypeKind::Object(wanted), TypeKind::Object(got)) => {
                let fields: HashMap<String, _> = got
                    .fields
                    .iter()
                    .map(|f| (f.node.name.node.to_string(), &f.node))
                    .collect();
                for field in &wanted.fields {
                    let field_name = field.node.name.node.to_string();
                    let Some(served_field) = fields.get(&field_name) else {
                        problems.push(format!("type {name}: field `{field_name}` is missing"));
                        continue;
                    };
                    if field.node.ty.node.to_string() != served_field.ty.node.to_string() {
                        problems.push(format!(
                            "type {name}: `{field_name}` is {}, the contract says {}",
                            served_field.ty.node, field.node.ty.node
                        ));
                    }
                    compare_inputs(
                        &format!("{name}.{field_name}"),
                        &field.node.arguments,
                        &served_field.arguments,
                        &mut problems,
                    );
                }
            }
            (wanted, got) => problems.push(format!(
                "{name} is a {}, the contract says {}",
                kind_name(got),
                kind_name(wanted)
            )),
        }
    }
    problems
}

#[tokio::test]
async fn the_served_schema_contains_the_whole_contract_unchanged() {
    let contract = std::fs::read_to_string(CONTRACT)
        .unwrap_or_else(|e| panic!("the repository's contract {CONTRACT}: {e}"));
    // The schema as a client gets it over HTTP; no database is needed to serve it.
    let api = crate::common::start(&crate::common::settings_for(
        "postgres://postgres@127.0.0.1:1/none",
    ))
    .await;
    let served = api.sdl().await;
    let contract = parse_schema(&contract).expect("the contract parses");
    let served = parse_schema(&served).expect("the served schema parses");
    let problems = differences(&contract, &served);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_repository_copy_keeps_the_public_contract_unchanged() {
    let public = match std::fs::read_to_string(PUBLIC_CONTRACT) {
        Ok(public) => public,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A clone on its own has only its copy; the comparison runs where both are, and
            // CI (`.ci/run`) always has both.
            assert!(
                std::env::var_os("ORDERLY_REQUIRE_PUBLIC_CONTRACT").is_none(),
                "no public contract at {PUBLIC_CONTRACT}, and ORDERLY_REQUIRE_PUBLIC_CONTRACT is set"
            );
            eprintln!("skipped: no public contract at {PUBLIC_CONTRACT}");
            return;
        }
        Err(e) => panic!("the public contract {PUBLIC_CONTRACT}: {e}"),
    };
    let copy = std::fs::read_to_string(CONTRACT)
        .unwrap_or_else(|e| panic!("the repository's contract {CONTRACT}: {e}"));
    let public = parse_schema(&public).expect("the public contract parses");
    let copy = parse_schema(&copy).expect("the repository's contract parses");
    let problems = differences(&public, &copy);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_comparison_notices_what_clients_would_notice() {
    let contract = parse_schema(
        "enum Mode { A B }
         input In { a: Int = 2 }
         type Query { f(x: Int = 20, y: String): [Int!]! g: Mode }",
    )
    .unwrap();
    let same_plus_additions = parse_schema(
        "enum Mode { A B C }
         input In { a: Int = 2, extra: String }
         type Query { f(x: Int = 20, y: String, z: Int): [Int!]! g: Mode, h: Int }
         type Other { x: Int }",
    )
    .unwrap();
    assert!(differences(&contract, &same_plus_additions).is_empty());

    for (broken, what) in [
        (
            "enum Mode { A } input In { a: Int = 2 } type Query { f(x: Int = 20, y: String): [Int!]! g: Mode }",
            "Mode: B",
        ),
        (
            "enum Mode { A B } input In { a: Int = 3 } type Query { f(x: Int = 20, y: String): [Int!]! g: Mode }",
            "defaults",
        ),
        (
            "enum Mode { A B } input In { a: Int = 2 } type Query { f(x: Int = 20, y: String): [Int!] g: Mode }",
            "[Int!]",
        ),
        (
            "enum Mode { A B } input In { a: Int = 2 } type Query { f(x: Int = 20): [Int!]! g: Mode }",
            "`y` is missing",
        ),
        (
            "enum Mode { A B } input In { a: Int = 2 } type Query { f(x: Int = 20, y: String, z: Int!): [Int!]! g: Mode }",
            "added required",
        ),
        (
            "enum Mode { A B } input In { a: Int = 2 } type Query { f(x: Int = 20, y: String): [Int!]! }",
            "`g` is missing",
        ),
        (
            "enum Mode { A B } type Query { f(x: Int = 20, y: String): [Int!]! g: Mode }",
            "In is missing",
        ),
    ] {
        let problems = differences(&contract, &parse_schema(broken).unwrap());
        assert!(
            problems.iter().any(|p| p.contains(what)),
            "{what} not noticed in {problems:?}"
        );
    }
}
