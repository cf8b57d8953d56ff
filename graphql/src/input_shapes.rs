//! The one check of full validation that depends on a request's variables and that execution
//! does not repeat: a variable's input object must name only fields its type declares.
//!
//! async-graphql's `ValidationMode::Fast` skips the checks of variable values against their
//! types. Execution parses every argument again, and where parsing refuses a value (a wrong
//! scalar, a missing required field) the request ends with an uncoded error and `http::run`
//! runs it again under full validation. Parsing an input object, though, reads the fields it
//! knows and ignores the others, where full validation refuses the value: without this check
//! a misspelled field, as in `consistency: {atLeast: ..., timeotMs: 10}`, would be refused
//! the first time a query text is seen and answered (with the default timeout) once the text
//! is known.

use std::collections::HashMap;

use async_graphql::Variables;
use async_graphql::parser::types::{
    BaseType, OperationDefinition, Type, TypeKind, TypeSystemDefinition,
};
use async_graphql::{Name, Value};

/// The fields of every input object of a schema, by type name.
#[derive(Debug)]
pub(crate) struct InputShapes {
    objects: HashMap<Name, HashMap<Name, Type>>,
}

/// How deep an input value may nest before the check gives up (and full validation decides).
const MAX_NESTING: usize = 32;

impl InputShapes {
    /// Reads the input objects of `sdl`; `None` when it does not parse.
    pub(crate) fn from_sdl(sdl: &str) -> Option<Self> {
        let document = async_graphql::parser::parse_schema(sdl).ok()?;
        let objects = document
            .definitions
            .into_iter()
            .filter_map(|definition| match definition {
                TypeSystemDefinition::Type(ty) => Some(ty.node),
                _ => None,
            })
            .filter_map(|ty| match ty.kind {
                TypeKind::InputObject(object) => Some((
                    ty.name.node,
                    object
                        .fields
                        .into_iter()
                        .map(|field| (field.node.name.node, field.node.ty.node))
                        .collect(),
                )),
                _ => None,
            })
            .collect();
        Some(Self { objects })
    }

    /// Whether every variable `operation` declares holds input objects with known fields
    /// only. Values of other kinds are left to execution, which parses them as strictly as
    /// validation would.
    pub(crate) fn fit(&self, operation: &OperationDefinition, variables: &Variables) -> bool {
        operation.variable_definitions.iter().all(|definition| {
            let definition = &definition.node;
            variables
                .get(&definition.name.node)
                .is_none_or(|value| self.fits(value, &definition.var_type.node, 0))
        })
    }

    fn fits(&self, value: &Value, ty: &Type, depth: usize) -> bool {
        if depth > MAX_NESTING {
            return false;
        }
        match (&ty.base, value) {
            (_, Value::Null) => true,
            // A single value where a list is expected stands for a list of one.
            (BaseType::List(item), Value::List(items)) => {
                items.iter().all(|value| self.fits(value, item, depth + 1))
            }
            (BaseType::List(item), value) => self.fits(value, item, depth + 1),
            (BaseType::Named(name), value) => match self.objects.get(name) {
                None => true,
                Some(fields) => match value {
                    Value::Object(object) => object.iter().all(|(key, value)| {
                        fields
                            .get(key)
                            .is_some_and(|ty| self.fits(value, ty, depth + 1))
                    }),
                    // Not an object where one is expected: parsing refuses it.
                    _ => true,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;
    use async_graphql::parser::types::DocumentOperations;
    use serde_json::json;

    use super::*;

    const SDL: &str = "
        input Window { from: Int, to: Int }
        input Filter { status: [String!], window: Window, windows: [Window!] }
        type Query { orders(filter: Filter, first: Int): [String!]! }";

    fn check(variables: serde_json::Value) -> bool {
        let shapes = InputShapes::from_sdl(SDL).expect("the test schema parses");
        let document = parse_query(
            "query($filter: Filter, $first: Int) { orders(filter: $filter, first: $first) }",
        )
        .expect("the test query parses");
        let DocumentOperations::Single(operation) = &document.operations else {
            panic!("one operation");
        };
        shapes.fit(&operation.node, &Variables::from_json(variables))
    }

    #[test]
    fn variables_with_known_fields_fit() {
        assert!(check(json!({})));
        assert!(check(json!({ "first": 3, "filter": null })));
        assert!(check(
            json!({ "filter": { "status": ["PLACED"], "window": { "from": 1 } } })
        ));
        assert!(check(
            json!({ "filter": { "windows": [{ "to": 2 }, { "from": 1 }] } })
        ));
        assert!(check(json!({ "filter": { "windows": { "to": 2 } } })));
    }

    #[test]
    fn wrong_types_are_left_to_execution() {
        assert!(check(
            json!({ "first": "three", "filter": { "status": 7 } })
        ));
        assert!(check(json!({ "filter": "PLACED" })));
    }

    #[test]
    fn an_unknown_field_at_any_depth_does_not_fit() {
        assert!(!check(json!({ "filter": { "stauts": ["PLACED"] } })));
        assert!(!check(
            json!({ "filter": { "window": { "from": 1, "until": 2 } } })
        ));
        assert!(!check(
            json!({ "filter": { "windows": [{ "to": 2 }, { "size": 1 }] } })
        ));
    }
}
