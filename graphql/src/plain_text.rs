//! One check at the edge for every string a request carries: no control characters (NUL,
//! the rest of C0, DEL, C1). No value of the contract may hold one (SKUs, ids, keys, cursors,
//! search text, addresses), and passed on they end as a database error (PostgreSQL refuses
//! NUL in text and `\u0000` in jsonb) or as a forged line in the log. Refused here, a
//! request naming such a value is BAD_USER_INPUT on both transports, before any resolver runs.
//!
//! The check runs as an async-graphql extension: strings written in the document and the
//! values of its variables are both looked at. A refusal is raised only after validation
//! passed, so a document that validation would refuse still answers as validation says (and
//! a refused document is never cached as a valid one by `http`).

use std::sync::{Arc, Mutex};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation,
};
use async_graphql::parser::types::{
    Directive, ExecutableDocument, Selection, SelectionSet, VariableDefinition,
};
use async_graphql::{Positioned, ServerError, ServerResult, ValidationResult, Variables};
use async_graphql_value::{ConstValue, Value};

use crate::error_codes;

/// How deep a value may nest before the walk stops; parsing and validation bound real
/// documents far below it.
const MAX_NESTING: usize = 64;

/// The extension to add to a schema (`with_limits` does).
pub struct PlainText;

impl ExtensionFactory for PlainText {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(PlainTextCheck::default())
    }
}

/// One request's check: the first offending value found while parsing, reported after
/// validation.
#[derive(Default)]
struct PlainTextCheck {
    refusal: Mutex<Option<ServerError>>,
}

#[async_trait::async_trait]
impl Extension for PlainTextCheck {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        let found = offending_variable(variables).or_else(|| offending_argument(&document));
        if let Some(field) = found {
            let error = error_codes::bad_user_input(&field, "must not contain control characters");
            *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(error.into_server_error(Default::default()));
        }
        Ok(document)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        match self
            .refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(refusal) => Err(vec![refusal]),
            None => Ok(result),
        }
    }
}

/// Whether `text` holds a character no value of the contract may hold.
pub fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// `$name.path` of the first variable value holding a control character.
fn offending_variable(variables: &Variables) -> Option<String> {
    variables
        .iter()
        .find_map(|(name, value)| offending_const(value, format!("${name}"), 0))
}

fn offending_const(value: &ConstValue, path: String, depth: usize) -> Option<String> {
    if depth > MAX_NESTING {
        return None;
    }
    match value {
        ConstValue::String(text) => has_control(text).then_some(path),
        ConstValue::List(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| offending_const(item, format!("{path}[{i}]"), depth + 1)),
        ConstValue::Object(fields) => fields.iter().find_map(|(key, value)| {
            if has_control(key) {
                return Some(path.clone());
            }
            offending_const(value, format!("{path}.{key}"), depth + 1)
        }),
        _ => None,
    }
}

/// A document's value with its variables as null (their values are checked apart), so one
/// walk serves both.
fn constant(value: &Value) -> ConstValue {
    match value
        .clone()
        .into_const_with(|_| Ok::<_, std::convert::Infallible>(ConstValue::Null))
    {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

/// `field.argument.path` of the first string written in the document (arguments, directive
/// arguments, variable defaults) that holds a control character.
fn offending_argument(document: &ExecutableDocument) -> Option<String> {
    let operations = document.operations.iter().map(|(_, operation)| {
        let operation = &operation.node;
        operation
            .variable_definitions
            .iter()
            .find_map(offending_default)
            .or_else(|| offending_directives(&operation.directives))
            .or_else(|| offending_set(&operation.selection_set.node, 0))
    });
    let fragments = document.fragments.values().map(|fragment| {
        offending_directives(&fragment.node.directives)
            .or_else(|| offending_set(&fragment.node.selection_set.node, 0))
    });
    operations.chain(fragments).find_map(|found| found)
}

fn offending_default(definition: &Positioned<VariableDefinition>) -> Option<String> {
    let definition = &definition.node;
    let value = &definition.default_value.as_ref()?.node;
    offending_const(value, format!("${}", definition.name.node), 0)
}

fn offending_directives(directives: &[Positioned<Directive>]) -> Option<String> {
    directives.iter().find_map(|directive| {
        let directive = &directive.node;
        directive.arguments.iter().find_map(|(name, value)| {
            let path = format!("@{}.{}", directive.name.node, name.node);
            offending_const(&constant(&value.node), path, 0)
        })
    })
}

fn offending_set(set: &SelectionSet, depth: usize) -> Option<String> {
    if depth > MAX_NESTING {
        return None;
    }
    set.items.iter().find_map(|item| match &item.node {
        Selection::Field(field) => {
            let field = &field.node;
            field
                .arguments
                .iter()
                .find_map(|(name, value)| {
                    let path = format!("{}.{}", field.name.node, name.node);
                    offending_const(&constant(&value.node), path, 0)
                })
                .or_else(|| offending_directives(&field.directives))
                .or_else(|| offending_set(&field.selection_set.node, depth + 1))
        }
        Selection::InlineFragment(fragment) => offending_directives(&fragment.node.directives)
            .or_else(|| offending_set(&fragment.node.selection_set.node, depth + 1)),
        Selection::FragmentSpread(spread) => offending_directives(&spread.node.directives),
    })
}

#[cfg(test)]
mod tests {
    use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema};
    use serde_json::json;

    use super::*;

    struct Query;

    #[Object]
    impl Query {
        async fn product(&self, sku: String) -> String {
            sku
        }
    }

    fn schema() -> Schema<Query, EmptyMutation, EmptySubscription> {
        Schema::build(Query, EmptyMutation, EmptySubscription)
            .extension(PlainText)
            .finish()
    }

    fn code(response: &async_graphql::Response) -> Option<String> {
        let error = response.errors.first()?;
        match error.extensions.as_ref()?.get("code")? {
            ConstValue::String(code) => Some(code.clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_control_character_in_an_argument_or_a_variable_is_bad_user_input() {
        let inline = schema().execute(r#"{ product(sku: "A\u0000B") }"#).await;
        assert_eq!(
            code(&inline).as_deref(),
            Some("BAD_USER_INPUT"),
            "{inline:?}"
        );
        assert_eq!(inline.data, ConstValue::Null);
        for hostile in [
            "a\u{0}b",
            "line\nbreak",
            "bell\u{7}",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            let request = async_graphql::Request::new("query($s: String!) { product(sku: $s) }")
                .variables(Variables::from_json(json!({ "s": hostile })));
            let response = schema().execute(request).await;
            assert_eq!(
                code(&response).as_deref(),
                Some("BAD_USER_INPUT"),
                "{hostile:?}"
            );
            assert!(
                response.errors[0].message.starts_with("$s:"),
                "{response:?}"
            );
        }
    }

    #[tokio::test]
    async fn plain_text_passes_and_an_invalid_document_answers_as_validation_says() {
        let fine = schema().execute(r#"{ product(sku: "Mug – ü 🫖") }"#).await;
        assert!(fine.errors.is_empty(), "{fine:?}");
        // Validation's own (uncoded) error wins over the control character.
        let invalid = schema()
            .execute(r#"{ product(sku: "A\u0000", x: 1) }"#)
            .await;
        assert_eq!(invalid.errors.len(), 1, "{invalid:?}");
        assert_eq!(code(&invalid), None, "{invalid:?}");
        let message = &invalid.errors[0].message;
        assert!(
            message.contains("Unknown argument") && message.contains("\"x\""),
            "validation names the unknown argument: {message}"
        );
        assert!(!message.contains("control characters"), "{message}");
        assert_eq!(invalid.data, ConstValue::Null);
    }
}
