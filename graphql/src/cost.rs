//! What an operation costs, counted in database work rather than in HTTP requests.
//!
//! The cost is async-graphql's complexity with these weights: a field whose resolver reads or
//! writes the database weighs [`READ`] or [`WRITE`] plus what it selects, a page weighs that
//! plus its size times what each row selects ([`page`]), every other field 1. Aliases and
//! fragment spreads count each time they appear. Four limits follow from it:
//!
//! - a document may select at most [`MAX_SPREAD_FIELDS`] fields with its fragments spread in
//!   (BAD_USER_INPUT, before anything else looks at it: see [`spread_fields`]);
//! - an operation may select at most [`MAX_ROOT_FIELDS`] root fields (BAD_USER_INPUT);
//! - its cost may reach at most [`crate::MAX_COMPLEXITY`] (BAD_USER_INPUT, from validation);
//! - it takes [`tokens`] from its caller's rate-limit budget, one per [`PER_TOKEN`] units
//!   (RATE_LIMITED with `retryAfterSeconds` when the budget is short), before it runs.
//!
//! [`CostLimit`] applies the first two and the last to every served schema; the transports put a
//! [`Budget`] into each request's data to say whose budget pays.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest,
    NextValidation,
};
use async_graphql::parser::types::{ExecutableDocument, Field, Selection, SelectionSet};
use async_graphql::{
    Pos, Positioned, Request, ServerError, ServerResult, ValidationResult, Variables,
};

use crate::error_codes::{ErrorCode, rate_limited};
use crate::rate_limit::{RateLimiter, Refusal};

/// Weight of a field whose resolver reads the database or the event store (a statement or
/// two): what one rate-limit token pays for.
pub const READ: usize = 100;
/// Weight of a mutation: it loads aggregates and appends to the log.
pub const WRITE: usize = 100;
/// Cost units per rate-limit token: one database read or write, with a small selection.
pub const PER_TOKEN: usize = 100;
/// Most root fields (aliases included) one operation may select: a screen's worth of data or
/// a few writes, not a batch job hidden in one request.
pub const MAX_ROOT_FIELDS: usize = 20;
/// Most fields a document may select with its fragments spread in, every spread counting its
/// fragment's fields once more. Above what any operation within [`crate::MAX_COMPLEXITY`]
/// selects (every field but `__typename` costs at least one), so it refuses only documents
/// built to multiply: a few kilobytes of fragments each spreading the next a hundred times
/// select 100^8 fields, and async-graphql's own checks, which walk a fragment again at every
/// spread, would keep a worker busy for hours on one.
pub const MAX_SPREAD_FIELDS: usize = crate::MAX_COMPLEXITY;

/// The rate-limit tokens an operation of cost `complexity` takes: one per [`PER_TOKEN`]
/// units, rounded down, at least one.
pub fn tokens(complexity: usize) -> u32 {
    u32::try_from(complexity / PER_TOKEN)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The cost of a page read in one statement: [`READ`] plus its size (`first`, else
/// `default`, counted at least 1 so that an empty page is not free) times what each row
/// selects.
pub fn page(first: Option<i32>, default: i32, child_complexity: usize) -> usize {
    let rows = usize::try_from(first.unwrap_or(default))
        .unwrap_or(0)
        .max(1);
    READ.saturating_add(rows.saturating_mul(child_complexity))
}

/// Whose rate-limit budget pays for a request, put into its data by the transport.
#[derive(Clone)]
pub struct Budget {
    limiter: Arc<RateLimiter>,
    key: String,
    /// Tokens the transport took already, at the door, before it read the request.
    prepaid: u32,
    /// Set once charged: a request the HTTP gate runs a second time (see `http::run`) is
    /// charged once.
    charged: Arc<AtomicBool>,
}

impl Budget {
    pub fn new(limiter: Arc<RateLimiter>, key: String, prepaid: u32) -> Self {
        Self {
            limiter,
            key,
            prepaid,
            charged: Arc::new(AtomicBool::new(false)),
        }
    }

    fn charge(&self, complexity: usize) -> Result<(), ServerError> {
        if self.charged.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let tokens = tokens(complexity);
        match self
            .limiter
            .charge(&self.key, tokens.saturating_sub(self.prepaid))
        {
            Ok(()) => Ok(()),
            Err(Refusal::Wait(wait)) => Err(rate_limited(wait).into_server_error(Pos::default())),
            Err(Refusal::OverBurst { burst }) => Err(ErrorCode::BadUserInput
                .error(format!(
                    "this operation costs {tokens} requests of a budget of {burst}; \
                     ask for fewer fields or smaller pages"
                ))
                .into_server_error(Pos::default())),
        }
    }
}

/// The async-graphql extension that refuses operations with too many root fields and charges
/// the caller's [`Budget`] by cost once an operation has passed validation.
pub struct CostLimit;

impl ExtensionFactory for CostLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(CostLimit)
    }
}

#[async_trait::async_trait]
impl Extension for CostLimit {
    /// Parses the document (async-graphql then uses this parse rather than its own) and
    /// refuses it when it spreads to more than [`MAX_SPREAD_FIELDS`], before async-graphql's
    /// depth check and validation walk it spread by spread. A document that does not parse is
    /// left to async-graphql, which reports why.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        if let Ok(document) = request.parsed_query() {
            let fields = spread_fields(document);
            if fields > MAX_SPREAD_FIELDS {
                return Err(ErrorCode::BadUserInput
                    .error(format!(
                        "a document may select at most {MAX_SPREAD_FIELDS} fields with its \
                         fragments spread in; this one selects {}",
                        if fields == usize::MAX {
                            "more than can be counted".to_owned()
                        } else {
                            fields.to_string()
                        }
                    ))
                    .into_server_error(Pos::default()));
            }
        }
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        // Every operation of the document, not only the one that runs: the operation name is
        // not known here, and a document has no reason to hold an oversize one.
        let widest = document
            .operations
            .iter()
            .map(|(_, operation)| {
                let mut count = 0;
                visit_root_fields(&document, &operation.node.selection_set.node, &mut |_| {
                    count += 1
                });
                count
            })
            .max()
            .unwrap_or(0);
        if widest > MAX_ROOT_FIELDS {
            return Err(ErrorCode::BadUserInput
                .error(format!(
                    "an operation may select at most {MAX_ROOT_FIELDS} root fields \
                     (aliases count); this one selects {widest}"
                ))
                .into_server_error(Pos::default()));
        }
        Ok(document)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        if let Some(budget) = ctx.data_opt::<Budget>() {
            budget.charge(result.complexity).map_err(|e| vec![e])?;
        }
        Ok(result)
    }
}

/// Calls `visit` for every field `set` selects at its own level, through inline fragments and
/// fragment spreads, once per appearance, for the first [`MAX_SPREAD_FIELDS`] selections it
/// meets: the transports call it before the schema has refused a document that spreads to
/// more (see [`CostLimit::prepare_request`]), and a walk of such a document must end.
pub(crate) fn visit_root_fields(
    document: &ExecutableDocument,
    set: &SelectionSet,
    visit: &mut impl FnMut(&Positioned<Field>),
) {
    let mut budget = MAX_SPREAD_FIELDS;
    visit_level(document, set, visit, 0, &mut budget);
}

fn visit_level(
    document: &ExecutableDocument,
    set: &SelectionSet,
    visit: &mut impl FnMut(&Positioned<Field>),
    depth: usize,
    budget: &mut usize,
) {
    // Fragments may spread each other in a cycle; validation rejects that later, this only
    // must not loop.
    if depth > 8 {
        return;
    }
    for item in &set.items {
        let Some(left) = budget.checked_sub(1) else {
            return;
        };
        *budget = left;
        match &item.node {
            Selection::Field(field) => visit(field),
            Selection::InlineFragment(fragment) => {
                visit_level(
                    document,
                    &fragment.node.selection_set.node,
                    visit,
                    depth + 1,
                    budget,
                );
            }
            Selection::FragmentSpread(spread) => {
                if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node) {
                    visit_level(
                        document,
                        &fragment.node.selection_set.node,
                        visit,
                        depth + 1,
                        budget,
                    );
                }
            }
        }
    }
}

/// How many fields `document` selects with its fragments spread in: the most of any of its
/// operations and fragments, each spread counting its fragment's fields once more, saturating
/// at `usize::MAX`. Each fragment is counted once and remembered, so the count takes time in
/// proportion to the document's text however much it multiplies. A spread inside a cycle of
/// fragments counts nothing (validation refuses cycles).
pub(crate) fn spread_fields(document: &ExecutableDocument) -> usize {
    let mut counted = HashMap::new();
    let operations = document
        .operations
        .iter()
        .map(|(_, operation)| &operation.node.selection_set.node);
    let fragments = document
        .fragments
        .values()
        .map(|fragment| &fragment.node.selection_set.node);
    operations
        .chain(fragments)
        .map(|set| fields_of(document, set, &mut counted))
        .max()
        .unwrap_or(0)
}

/// A fragment being counted (`None`, so a spread of it inside itself counts nothing) or its
/// count, by name.
type Counted<'d> = HashMap<&'d str, Option<usize>>;

fn fields_of<'d>(
    document: &'d ExecutableDocument,
    set: &'d SelectionSet,
    counted: &mut Counted<'d>,
) -> usize {
    set.items.iter().fold(0, |total, item| {
        let fields = match &item.node {
            Selection::Field(field) => {
                fields_of(document, &field.node.selection_set.node, counted).saturating_add(1)
            }
            Selection::InlineFragment(fragment) => {
                fields_of(document, &fragment.node.selection_set.node, counted)
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.node.fragment_name.node.as_str();
                match (counted.get(name), document.fragments.get(name)) {
                    (Some(known), _) => known.unwrap_or(0),
                    (None, Some(fragment)) => {
                        counted.insert(name, None);
                        let fields =
                            fields_of(document, &fragment.node.selection_set.node, counted);
                        counted.insert(name, Some(fields));
                        fields
                    }
                    (None, None) => 0,
                }
            }
        };
        total.saturating_add(fields)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimit;
    use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema};

    struct Query;

    #[Object]
    impl Query {
        #[graphql(complexity = "READ + child_complexity")]
        async fn item(&self) -> i32 {
            1
        }
        #[graphql(complexity = "page(first, 20, child_complexity)")]
        async fn items(&self, first: Option<i32>) -> Vec<i32> {
            vec![0; usize::try_from(first.unwrap_or(20)).unwrap_or(0)]
        }
    }

    fn schema() -> Schema<Query, EmptyMutation, EmptySubscription> {
        crate::with_limits(Schema::build(Query, EmptyMutation, EmptySubscription)).finish()
    }

    fn code(response: &async_graphql::Response) -> Option<String> {
        let error = response.errors.first()?;
        match error.extensions.as_ref()?.get("code")? {
            async_graphql::Value::String(code) => Some(code.clone()),
            _ => None,
        }
    }

    fn aliases(n: usize, field: &str) -> String {
        let fields: Vec<String> = (0..n).map(|i| format!("a{i}: {field}")).collect();
        format!("{{ {} }}", fields.join(" "))
    }

    /// A document of `levels` fragments each spreading the next `times` times, the last
    /// selecting one field: `times^levels` fields in a few kilobytes.
    fn multiplying(levels: usize, times: usize) -> String {
        let mut document = String::from("{ ...F0 }");
        for level in 0..levels {
            let body = format!("...F{} ", level + 1).repeat(times);
            document.push_str(&format!(" fragment F{level} on Query {{ {body}}}"));
        }
        document.push_str(&format!(" fragment F{levels} on Query {{ item }}"));
        document
    }

    fn parsed(document: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(document).expect("the test's document parses")
    }

    #[test]
    fn spread_fields_counts_each_spread_and_each_nested_field() {
        // x (1) + its y and z (2) + A: w (1) + B twice (1 each) = 6; A alone 3; B 1.
        let document = parsed(
            "{ x { y z } ...A } fragment A on Query { w ...B ... on Query { ...B } } \
             fragment B on Query { v }",
        );
        assert_eq!(spread_fields(&document), 6);
        // The most of any operation, not their sum.
        let document = parsed("query One { a b c } query Two { d }");
        assert_eq!(spread_fields(&document), 3);
        assert_eq!(spread_fields(&parsed(&multiplying(3, 10))), 1_000);
        assert_eq!(
            spread_fields(&parsed(&multiplying(8, 100))),
            100_usize.pow(8)
        );
        // Past what a usize holds it saturates rather than wraps to something small.
        assert_eq!(spread_fields(&parsed(&multiplying(12, 100))), usize::MAX);
    }

    #[test]
    fn a_cycle_of_fragments_is_counted_without_looping() {
        let document =
            parsed("{ ...A } fragment A on Query { a ...B } fragment B on Query { b ...A ...A }");
        // A's a and B (b, with A inside itself counting nothing); B as written: b and A twice.
        assert_eq!(spread_fields(&document), 5);
    }

    /// Runs `work` on a thread of its own and waits a minute for it: a walk that never ends
    /// fails the test instead of hanging it.
    fn within_a_minute<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(work());
        });
        result
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("done within a minute")
    }

    #[test]
    fn the_root_field_walk_stops_after_the_spread_limit() {
        // 100^7 root fields, at the deepest level the walk follows.
        let seen = within_a_minute(|| {
            let document = parsed(&multiplying(7, 100));
            let (_, operation) = document.operations.iter().next().expect("one operation");
            let mut seen = 0_usize;
            visit_root_fields(&document, &operation.node.selection_set.node, &mut |_| {
                seen += 1
            });
            seen
        });
        assert!(seen > 0 && seen <= MAX_SPREAD_FIELDS, "{seen}");
    }

    #[test]
    fn a_document_that_multiplies_is_refused_before_it_is_walked_spread_by_spread() {
        let response =
            within_a_minute(|| futures::executor::block_on(schema().execute(multiplying(8, 100))));
        assert_eq!(code(&response).as_deref(), Some("BAD_USER_INPUT"));
        assert!(
            response.errors[0].message.contains("fragments spread in"),
            "{:?}",
            response.errors
        );
        assert_eq!(response.data, async_graphql::Value::Null);
        // One level less multiplies to 100^2 = 10,000 fields, at the limit: not refused by
        // this check (the root-field cap refuses it instead, as it did before).
        let response = futures::executor::block_on(schema().execute(multiplying(2, 100)));
        assert!(
            response
                .errors
                .iter()
                .all(|e| !e.message.contains("fragments spread in")),
            "{:?}",
            response.errors
        );
    }

    #[test]
    fn tokens_are_one_per_read_and_never_zero() {
        assert_eq!(tokens(0), 1);
        assert_eq!(tokens(READ + 3), 1);
        assert_eq!(tokens(20 * (READ + 1)), 20);
        assert_eq!(page(Some(0), 20, 5), READ + 5);
        assert_eq!(page(None, 20, 5), READ + 100);
    }

    #[tokio::test]
    async fn more_root_fields_than_the_cap_are_refused_through_fragments_too() {
        let schema = schema();
        let answer = schema.execute(aliases(MAX_ROOT_FIELDS, "item")).await;
        assert!(answer.errors.is_empty(), "{:?}", answer.errors);
        let answer = schema.execute(aliases(MAX_ROOT_FIELDS + 1, "item")).await;
        assert_eq!(code(&answer).as_deref(), Some("BAD_USER_INPUT"));
        assert_eq!(answer.data, async_graphql::Value::Null);
        let spread = "{ ...F ...F } fragment F on Query { a: item b: item c: item \
             d: item e: item f: item g: item h: item i: item j: item k: item }";
        let answer = schema.execute(spread).await;
        assert_eq!(
            code(&answer).as_deref(),
            Some("BAD_USER_INPUT"),
            "{:?}",
            answer.errors
        );
    }

    #[tokio::test]
    async fn an_operation_takes_its_cost_from_the_budget_before_it_runs() {
        let limiter = Arc::new(
            RateLimiter::new(RateLimit {
                per_second: 1,
                burst: 30,
            })
            .unwrap(),
        );
        let schema = schema();
        let run = |query: String| {
            let budget = Budget::new(limiter.clone(), "sub:alice".into(), 0);
            schema.execute(async_graphql::Request::new(query).data(budget))
        };
        // Twenty reads take twenty tokens of thirty; the next twenty do not fit.
        let answer = run(aliases(20, "item")).await;
        assert!(answer.errors.is_empty(), "{:?}", answer.errors);
        let answer = run(aliases(20, "item")).await;
        assert_eq!(code(&answer).as_deref(), Some("RATE_LIMITED"));
        let retry = answer.errors[0]
            .extensions
            .as_ref()
            .and_then(|e| e.get("retryAfterSeconds").cloned());
        assert!(retry.is_some(), "{:?}", answer.errors);
        assert_eq!(answer.data, async_graphql::Value::Null);
        // A page of 0 still costs a read; several do add up.
        let answer = run(aliases(12, "items(first: 0)")).await;
        assert_eq!(
            code(&answer).as_deref(),
            Some("RATE_LIMITED"),
            "{:?}",
            answer.errors
        );
        // More than the whole burst can never pass, so it is the caller's input to fix.
        let small = Arc::new(
            RateLimiter::new(RateLimit {
                per_second: 1,
                burst: 5,
            })
            .unwrap(),
        );
        let budget = Budget::new(small, "sub:bob".into(), 0);
        let request = async_graphql::Request::new(aliases(10, "item")).data(budget);
        let answer = schema.execute(request).await;
        assert_eq!(
            code(&answer).as_deref(),
            Some("BAD_USER_INPUT"),
            "{:?}",
            answer.errors
        );
    }
}
