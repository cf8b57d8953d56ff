//! POST /graphql for any async-graphql schema, with the edge rules every API shares: a body
//! limit, bearer authentication, a rate limit per caller, a timeout, and errors that always
//! carry a contract code. Bad input of any kind (malformed JSON, wrong types, unknown fields,
//! oversize bodies) is answered with BAD_USER_INPUT, never a 5xx.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationDefinition, OperationType,
};
use async_graphql::{Executor, Positioned, Response as GqlResponse, ServerError};
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use orderly_observability::trace_context;
use serde_json::json;
use tracing::Instrument;

use crate::auth::{Actor, Authenticator};
use crate::cost::Budget;
use crate::error_codes::ErrorCode;
use crate::input_shapes::InputShapes;
use crate::metrics::{OperationKind, RequestOutcome, record_graphql_request};
use crate::over_http::{self, MediaType, Params};
use crate::persisted_queries::PersistedQueries;
use crate::rate_limit::RateLimiter;
use crate::socket::Sockets;

/// Limits applied to every GraphQL request before and while it runs.
#[derive(Debug, Clone, Copy)]
pub struct GraphqlLimits {
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Longest a request may run; the client then gets UNAVAILABLE. A mutation cut off here
    /// may still have been applied: clients retry with the same idempotency key.
    pub timeout: Duration,
    /// How long a new WebSocket may take to send `connection_init` before it is closed.
    pub init_timeout: Duration,
    /// Subscriptions one WebSocket may hold open at once.
    pub subscriptions_per_socket: usize,
    /// Subscriptions one caller (token subject, else client address) may hold open at once
    /// over all its sockets to this process.
    pub subscriptions_per_subject: usize,
}

impl Default for GraphqlLimits {
    fn default() -> Self {
        Self {
            body_limit: 256 * 1024,
            timeout: Duration::from_secs(10),
            // graphql-ws's default: a client that means to talk sends it at once.
            init_timeout: Duration::from_secs(3),
            subscriptions_per_socket: 20,
            subscriptions_per_subject: 100,
        }
    }
}

/// Request data every resolver can read with `ctx.data::<Caller>()`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` for a request without a token.
    pub actor: Option<Actor>,
    /// Logged with every internal error, and returned as `extensions.requestId` so a report
    /// can be matched with the log.
    pub request_id: String,
    /// The request's W3C trace context: its span's when a tracer runs, else the caller's
    /// `traceparent` header when well-formed (else none), so the events a
    /// request appends carry its trace.
    pub traceparent: Option<String>,
}

struct Gate<E> {
    executor: E,
    /// The same schema with async-graphql's `ValidationMode::Fast`, for queries whose document
    /// passed full validation before; see `run`.
    fast_queries: Option<E>,
    sdl: String,
    auth: Arc<Authenticator>,
    limiter: Arc<RateLimiter>,
    limits: GraphqlLimits,
    documents: DocumentCache,
    /// Query texts of automatic persisted queries, by hash.
    persisted: PersistedQueries,
    /// For the one variable check that fast validation skips and execution does not make;
    /// `None` (an SDL that does not parse) keeps every request on full validation.
    shapes: Option<InputShapes>,
    sockets: Arc<Sockets<E>>,
}

/// Parsed documents by query text, kept once a request of that text ran without an uncoded
/// error, so every document here passed full validation once. Frontends send the same few
/// queries over and over (with other variables), and parsing is a large share of a small
/// query's CPU time.
#[derive(Default)]
struct DocumentCache {
    documents: std::sync::Mutex<std::collections::HashMap<String, Arc<ExecutableDocument>>>,
}

impl DocumentCache {
    /// Enough for every query a set of frontends sends; beyond it, documents are parsed anew.
    const MAX_DOCUMENTS: usize = 512;
    /// Longer queries are rare and not worth the memory.
    const MAX_QUERY_BYTES: usize = 16 * 1024;

    fn get(&self, query: &str) -> Option<Arc<ExecutableDocument>> {
        let documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        documents.get(query).cloned()
    }

    fn keep(&self, query: &str, document: ExecutableDocument) {
        if query.len() > Self::MAX_QUERY_BYTES {
            return;
        }
        let mut documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        if documents.len() < Self::MAX_DOCUMENTS {
            documents.insert(query.to_owned(), Arc::new(document));
        }
    }
}

/// `POST /graphql` (queries and mutations), `GET /graphql` (queries with URL parameters,
/// GraphiQL in a browser when there are none, or subscriptions when the request upgrades to
/// a WebSocket speaking graphql-transport-ws) and `GET /graphql/schema.graphql` (the served
/// SDL) for `executor`, whose SDL is `sdl`. Requests and answers follow GraphQL over HTTP
/// (see [`crate::over_http`]).
///
/// `fast_queries`, when given, is the same schema built with `ValidationMode::Fast`: queries
/// whose text was fully validated before then skip the document rules that cannot have
/// changed (in a small query, validation took about a third of the server's CPU).
pub fn graphql_router<E: Executor>(
    executor: E,
    fast_queries: Option<E>,
    sdl: String,
    auth: Arc<Authenticator>,
    limiter: Arc<RateLimiter>,
    limits: GraphqlLimits,
) -> Router {
    let sockets = Arc::new(Sockets {
        executor: Coded(executor.clone()),
        auth: auth.clone(),
        limiter: limiter.clone(),
        limits,
        open: Default::default(),
    });
    let gate = Arc::new(Gate {
        executor,
        fast_queries,
        auth,
        limiter,
        limits,
        sockets,
        documents: DocumentCache::default(),
        persisted: PersistedQueries::new(),
        shapes: InputShapes::from_sdl(&sdl),
        sdl,
    });
    Router::new()
        .route(
            "/graphql",
            post(execute::<E>).get(graphiql_or_subscribe::<E>),
        )
        .route("/graphql/schema.graphql", get(schema_sdl::<E>))
        .with_state(gate)
}

async fn graphiql_or_subscribe<E: Executor>(
    State(gate): State<Arc<Gate<E>>>,
    request: Request,
) -> Response {
    let upgrading = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if upgrading {
        return crate::socket::upgrade(gate.sockets.clone(), request).await;
    }
    if request.uri().query().is_some_and(|query| !query.is_empty()) {
        return execute(State(gate), request).await;
    }
    orderly_web::graphiql_page()
}

async fn schema_sdl<E: Executor>(State(gate): State<Arc<Gate<E>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        gate.sdl.clone(),
    )
}

/// What `orderly_http_request_duration_seconds` says of one request. A request refused before
/// its document is read (unauthenticated, rate limited, oversize, not JSON) is `invalid`.
struct Seen {
    operation: String,
    kind: OperationKind,
    outcome: RequestOutcome,
}

async fn execute<E: Executor>(State(gate): State<Arc<Gate<E>>>, request: Request) -> Response {
    let started = Instant::now();
    let mut seen = Seen {
        operation: "invalid".to_owned(),
        kind: OperationKind::Query,
        outcome: RequestOutcome::Rejected,
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    // Request, correlation and trace ids reach the logs as fields of this span and of the
    // command spans inside it.
    let span = tracing::info_span!(
        "graphql.request",
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        operation = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let header = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_traceparent(value))
        .map(str::to_owned);
    if let Some(header) = &header {
        trace_context::set_parent(&span, header);
    }
    if let Some(trace_id) = trace_context::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    // The events this request appends carry its span's context (a child of the caller's),
    // or the caller's header as it came when no tracer runs.
    let traceparent = trace_context::traceparent(&span).or(header);
    let Some(media) = MediaType::negotiate(request.headers()) else {
        return over_http::not_acceptable();
    };
    let response = run(&gate, request, media, &request_id, traceparent, &mut seen)
        .instrument(span.clone())
        .await;
    let response = over_http::with_media(media, response);
    let outcome = if response.status().is_server_error() {
        RequestOutcome::Error
    } else {
        seen.outcome
    };
    span.record("operation", seen.operation.as_str());
    span.record("outcome", outcome.as_str());
    // The access log: one line per request, with the span's ids.
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "graphql request"
        );
    });
    record_graphql_request(&seen.operation, seen.kind, outcome, started.elapsed());
    response
}

/// One GraphQL request over HTTP: admit the caller, read the request, parse it (or take the
/// parsed document from the cache), execute it within the time limit, answer.
async fn run<E: Executor>(
    gate: &Gate<E>,
    request: Request,
    media: MediaType,
    request_id: &str,
    traceparent: Option<String>,
    seen: &mut Seen,
) -> Response {
    let (parts, body) = request.into_parts();
    let (actor, key) = match admit(gate, &parts) {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let params = match read_request(gate, &parts, body, media).await {
        Ok(params) => params,
        Err(refused) => return refused,
    };
    let parsed = Parsed::parse(gate, &params);
    // A GET can be sent by a link or a prefetching browser, so it never changes anything.
    let mutation = matches!(parsed.selected, Some((OperationKind::Mutation, _)));
    if mutation && parts.method == axum::http::Method::GET {
        return over_http::mutation_over_get(media);
    }
    let caller = Caller {
        actor,
        request_id: request_id.to_owned(),
        traceparent,
    };
    let budget = Budget::new(gate.limiter.clone(), key, 1);
    let executed = execute_validated(gate, &params, parsed.graphql, parsed.fast, caller, budget);
    let response = match tokio::time::timeout(gate.limits.timeout, executed).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(request_id, "request timed out");
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the request took too long; retry (with the same idempotency key)",
            );
        }
    };
    // Uncoded errors come from validation (or from a type check that fast validation leaves
    // to execution): only a document that ran without one is kept.
    if let Some((query, document)) = parsed.fresh
        && response.errors.iter().all(has_code)
    {
        gate.documents.keep(&query, document);
    }
    (seen.operation, seen.kind, seen.outcome) = classify(parsed.selected, Some(&response));
    answer(media, response)
}

/// Who is asking, and the key their rate limit is counted under: the token's subject, else
/// the client's address. Refused with 401 for a bad token and 429 past the rate.
// The refusal is the answer itself, built once per refused request: boxing it saves nothing.
#[allow(clippy::result_large_err)]
fn admit<E>(
    gate: &Gate<E>,
    parts: &axum::http::request::Parts,
) -> Result<(Option<Actor>, String), Response> {
    let peer: Option<IpAddr> = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let by_address = || peer.map_or_else(|| "anonymous".to_owned(), |ip| format!("ip:{ip}"));
    let authorization = match parts.headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            failure(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                "the Authorization header must be `Bearer <JWT>`",
            )
        })?),
    };
    let actor = match gate.auth.authenticate(authorization) {
        Ok(actor) => actor,
        Err(why) => {
            // Refused tokens count against the address, so guessing tokens is throttled too.
            gate.limiter
                .check(&by_address())
                .map_err(rate_limited_response)?;
            return Err(failure(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                &why.to_string(),
            ));
        }
    };
    let key = match &actor {
        Some(actor) => format!("sub:{}", actor.sub),
        None => by_address(),
    };
    gate.limiter.check(&key).map_err(rate_limited_response)?;
    Ok((actor, key))
}

/// The request's parameters, from a body within the size limit (or the query string), with a
/// persisted query's text filled in. Refused with 413 or 400; an unknown persisted query is
/// answered with an error clients read as "send the text".
async fn read_request<E>(
    gate: &Gate<E>,
    parts: &axum::http::request::Parts,
    body: axum::body::Body,
    media: MediaType,
) -> Result<Params, Response> {
    let Ok(bytes) = axum::body::to_bytes(body, gate.limits.body_limit).await else {
        return Err(failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadUserInput,
            &format!("the request body is over {} bytes", gate.limits.body_limit),
        ));
    };
    let mut params = read_params(parts, &bytes)
        .map_err(|refusal| failure(refusal.status, ErrorCode::BadUserInput, &refusal.message))?;
    if let Err(unresolved) = gate.persisted.resolve(&mut params) {
        // An error in the answer, not a refusal: clients resend the text when they read it.
        let error = ServerError::new(unresolved.message(), None);
        let response = with_codes(GqlResponse::from_errors(vec![error]));
        return Err(over_http::respond(media, response, true));
    }
    if params.query.is_none() {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadUserInput,
            "the request has no `query`",
        ));
    }
    Ok(params)
}

/// A request with its document parsed once (or taken from the cache); the executor reuses it.
struct Parsed {
    graphql: async_graphql::Request,
    /// The operation's kind and root fields, when the document parsed.
    selected: Option<(OperationKind, BTreeSet<String>)>,
    /// A document parsed now rather than taken from the cache, to keep once it ran cleanly.
    fresh: Option<(String, ExecutableDocument)>,
    /// The cached document, when the request may run under fast validation (see
    /// [`execute_validated`]).
    fast: Option<Arc<ExecutableDocument>>,
}

impl Parsed {
    fn parse<E>(gate: &Gate<E>, params: &Params) -> Self {
        let mut graphql = params.to_request();
        let operation_name = graphql.operation_name.clone();
        let cached = gate.documents.get(&graphql.query);
        let known = cached.is_some();
        if let Some(document) = &cached {
            graphql.set_parsed_query(ExecutableDocument::clone(document));
        }
        let query = (!known).then(|| graphql.query.clone());
        // Out of the request while its document is borrowed (parsing borrows the request).
        let variables = std::mem::take(&mut graphql.variables);
        let (selected, fresh, fits) = match graphql.parsed_query() {
            Ok(document) => {
                let operation = operation(document, operation_name.as_deref());
                let selected = root_fields(document, operation);
                // Only a known query may run in fast mode, so only then are its variables
                // looked at.
                let fits = known
                    && matches!(selected.0, OperationKind::Query)
                    && match (&gate.shapes, operation) {
                        (Some(shapes), Some(op)) => shapes.fit(&op.node, &variables),
                        _ => false,
                    };
                (
                    Some(selected),
                    query.map(|query| (query, document.clone())),
                    fits,
                )
            }
            Err(_) => (None, None, false),
        };
        graphql.variables = variables;
        Self {
            graphql,
            selected,
            fresh,
            fast: cached.filter(|_| fits),
        }
    }
}

/// Executes `graphql` as `caller`, spending `budget`.
///
/// Fast validation still checks depth, complexity and fragment cycles, but not variable values
/// against argument types: a wrong-typed variable then fails inside execution, with an uncoded
/// error. A query that ends with one runs again under full validation, which answers exactly
/// as if it had been validated fully the first time: reads have no effects to repeat. The one
/// value execution would accept and validation refuse, an input object with an unknown field,
/// goes to full validation at once (`fast` is set only for a known query whose variables pass
/// `input_shapes`). Mutations always get full validation.
async fn execute_validated<E: Executor>(
    gate: &Gate<E>,
    params: &Params,
    graphql: async_graphql::Request,
    fast: Option<Arc<ExecutableDocument>>,
    caller: Caller,
    budget: Budget,
) -> GqlResponse {
    let graphql = graphql.data(budget.clone());
    let (Some(fast_schema), Some(document)) = (&gate.fast_queries, fast) else {
        return gate.executor.execute(graphql.data(caller)).await;
    };
    let response = fast_schema.execute(graphql.data(caller.clone())).await;
    if response.errors.iter().all(has_code) {
        return response;
    }
    let mut again = params.to_request();
    again.set_parsed_query(ExecutableDocument::clone(&document));
    gate.executor.execute(again.data(caller).data(budget)).await
}

/// The HTTP answer to an executed request: a request refused for its cost is a 429 with
/// Retry-After, as one refused at the door.
fn answer(media: MediaType, response: GqlResponse) -> Response {
    let retry = retry_after(&response);
    let request_error = over_http::is_request_error(&response);
    let answer = over_http::respond(media, with_codes(response), request_error);
    match retry {
        Some(wait) => {
            let mut answer = with_retry_after(answer, wait);
            *answer.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            answer
        }
        None => answer,
    }
}

/// How long a request refused for its cost is told to wait (`extensions.retryAfterSeconds`
/// on an answer without data); `None` for any other answer.
fn retry_after(response: &GqlResponse) -> Option<Duration> {
    if response.data != async_graphql::Value::Null {
        return None;
    }
    response.errors.iter().find_map(|error| {
        match error.extensions.as_ref()?.get("retryAfterSeconds")? {
            async_graphql::Value::Number(seconds) => seconds.as_u64().map(Duration::from_secs),
            _ => None,
        }
    })
}

/// The request's parameters: from the URL of a GET, from the JSON body of anything else.
fn read_params(
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> Result<Params, over_http::Refusal> {
    if parts.method == axum::http::Method::GET {
        Params::from_get(parts.uri.query().unwrap_or_default())
    } else {
        Params::from_post(&parts.headers, body)
    }
}

/// The labels of one operation: what the document selects (`None` when it does not parse)
/// and its first response, before codes are added (`None` when it has not answered yet).
fn classify(
    selected: Option<(OperationKind, BTreeSet<String>)>,
    response: Option<&GqlResponse>,
) -> (String, OperationKind, RequestOutcome) {
    let errors = response.map_or(&[][..], |response| &response.errors[..]);
    // Errors without a code come from parsing and validation: the document was invalid, and
    // its root field names may not be the schema's, so they never become a label.
    let invalid = response.is_some_and(over_http::is_request_error);
    // Uncoded errors (None) count as the caller's, as `with_codes` labels them.
    let outcome = RequestOutcome::of_codes(errors.iter().map(|error| {
        match error.extensions.as_ref().and_then(|e| e.get("code")) {
            Some(async_graphql::Value::String(code)) => Some(code.as_str()),
            _ => None,
        }
    }));
    let Some((kind, fields)) = selected else {
        return ("invalid".to_owned(), OperationKind::Query, outcome);
    };
    let operation = match fields.len() {
        _ if invalid => "invalid".to_owned(),
        1 => fields.into_iter().next().unwrap_or_default(),
        0 => "invalid".to_owned(),
        _ => "multiple".to_owned(),
    };
    (operation, kind, outcome)
}

/// The operation of `document` a request with `operation_name` runs, if there is one.
pub(crate) fn operation<'d>(
    document: &'d ExecutableDocument,
    operation_name: Option<&str>,
) -> Option<&'d Positioned<OperationDefinition>> {
    match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => {
            operations.values().next()
        }
        (DocumentOperations::Multiple(_), None) => None,
    }
}

/// The kind of `operation` and the names of the root fields it selects (through fragments
/// too), for the request metric.
fn root_fields(
    document: &ExecutableDocument,
    operation: Option<&Positioned<OperationDefinition>>,
) -> (OperationKind, BTreeSet<String>) {
    let Some(operation) = operation else {
        return (OperationKind::Query, BTreeSet::new());
    };
    let kind = match operation.node.ty {
        OperationType::Query => OperationKind::Query,
        OperationType::Mutation => OperationKind::Mutation,
        OperationType::Subscription => OperationKind::Subscription,
    };
    let mut fields = BTreeSet::new();
    crate::cost::visit_root_fields(document, &operation.node.selection_set.node, &mut |field| {
        fields.insert(field.node.name.node.to_string());
    });
    (kind, fields)
}

/// An executor whose every response carries contract codes, for the WebSocket transport, where
/// responses do not pass through [`execute`].
#[derive(Clone)]
pub(crate) struct Coded<E>(pub E);

impl<E: Executor> Executor for Coded<E> {
    fn execute(
        &self,
        request: async_graphql::Request,
    ) -> impl std::future::Future<Output = GqlResponse> + Send {
        let response = self.0.execute(request);
        async move { with_codes(response.await) }
    }

    /// Every operation over the socket (a `subscribe` message) is timed as one request, and
    /// a subscription counts as open from its setup until its stream ends or is dropped.
    fn execute_stream(
        &self,
        mut request: async_graphql::Request,
        session_data: Option<Arc<async_graphql::Data>>,
    ) -> futures::stream::BoxStream<'static, GqlResponse> {
        use futures::StreamExt;
        let started = Instant::now();
        let operation_name = request.operation_name.clone();
        let selected = request
            .parsed_query()
            .ok()
            .map(|document| root_fields(document, operation(document, operation_name.as_deref())));
        let mut inner = self.0.execute_stream(request, session_data);
        let mut pending = Some(selected);
        // Held for its drop, which takes the subscription out of the gauge.
        let mut _held: Option<crate::metrics::OpenSubscription> = None;
        futures::stream::poll_fn(move |cx| {
            let polled = inner.poll_next_unpin(cx);
            let subscription = matches!(&pending, Some(Some((OperationKind::Subscription, _))));
            // A subscription is set up by its first poll (validated, its source opened, or
            // refused with errors); a query or mutation is done with its one response.
            let settled = match &polled {
                std::task::Poll::Ready(_) => true,
                std::task::Poll::Pending => subscription,
            };
            if settled && let Some(selected) = pending.take() {
                let response = match &polled {
                    std::task::Poll::Ready(Some(response)) => Some(response),
                    _ => None,
                };
                let (operation, kind, outcome) = classify(selected, response);
                record_graphql_request(&operation, kind, outcome, started.elapsed());
                if kind == OperationKind::Subscription && outcome == RequestOutcome::Ok {
                    _held = Some(crate::metrics::subscription_opened(&operation));
                }
            }
            if matches!(polled, std::task::Poll::Ready(None)) {
                _held = None;
            }
            polled.map(|response| response.map(with_codes))
        })
        .boxed()
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`: anything else is dropped rather than stored in events.
fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// Errors raised by the resolvers carry their code already; the rest come from parsing and
/// validating the query against the schema (wrong types, unknown fields, too deep or too
/// complex), which is the caller's input.
fn with_codes(mut response: GqlResponse) -> GqlResponse {
    for error in &mut response.errors {
        if !has_code(error) {
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", ErrorCode::BadUserInput.as_str());
        }
    }
    response
}

fn has_code(error: &ServerError) -> bool {
    error
        .extensions
        .as_ref()
        .is_some_and(|extensions| extensions.get("code").is_some())
}

/// A GraphQL-shaped answer for a request that was refused before it ran.
/// Labelled with the negotiated media type by `execute`.
pub(crate) fn failure(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    over_http::refuse(MediaType::Json, status, code, message)
}

pub(crate) fn rate_limited_response(wait: Duration) -> Response {
    let error = crate::error_codes::rate_limited(wait);
    let body = json!({ "errors": [error.into_server_error(Default::default())] });
    with_retry_after(
        (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response(),
        wait,
    )
}

fn with_retry_after(mut response: Response, wait: Duration) -> Response {
    let seconds = crate::error_codes::retry_after_seconds(wait);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}
