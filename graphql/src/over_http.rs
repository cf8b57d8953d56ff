//! GraphQL over HTTP as the GraphQL Foundation's specification has it: which media type an
//! answer is in (`application/graphql-response+json` when the client asks for it, else
//! `application/json`), where a request's parameters come from (a JSON POST body, or the URL
//! of a GET), and which status codes say what. The gate in [`crate::http`] calls these around
//! authentication, limits and execution, which stay its business.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::error_codes::ErrorCode;

/// The media types a GraphQL answer can be encoded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaType {
    /// The specification's own type: request errors get 4xx and no `data`.
    GraphqlResponse,
    /// The legacy type every client understands: request errors still get 200.
    Json,
}

impl MediaType {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::GraphqlResponse => "application/graphql-response+json; charset=utf-8",
            Self::Json => "application/json; charset=utf-8",
        }
    }

    /// The type `accept` ranks highest among those served, `Json` without the header or for
    /// a wildcard (as the specification asks, for clients that predate the new type), `None`
    /// when the client accepts neither.
    pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Self> {
        let Some(accept) = headers.get(header::ACCEPT) else {
            return Some(Self::Json);
        };
        let Ok(accept) = accept.to_str() else {
            return Some(Self::Json);
        };
        let mut best: Option<(f32, Self)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let media = match essence.as_str() {
                "application/graphql-response+json" => Self::GraphqlResponse,
                "application/json" | "application/*" | "*/*" => Self::Json,
                _ => continue,
            };
            // Ties go to the earlier range, which is how clients list their preference.
            if quality > 0.0 && best.is_none_or(|(q, _)| quality > q) {
                best = Some((quality, media));
            }
        }
        if accept.trim().is_empty() {
            return Some(Self::Json);
        }
        best.map(|(_, media)| media)
    }
}

/// A request refused before it ran, with the status the specification gives that case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// The parameters of one GraphQL request, wherever they came from. Kept apart from
/// `async_graphql::Request` so the gate can build that more than once (see `run`).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Params {
    /// `None` when the request sent none (an automatic persisted query may supply it).
    pub(crate) query: Option<String>,
    pub(crate) operation_name: Option<String>,
    pub(crate) variables: Map<String, Value>,
    pub(crate) extensions: Map<String, Value>,
}

impl Params {
    /// A POST: a JSON body, which the content type must announce (a form post or a body
    /// without a type is refused with 415, so a browser form cannot send a mutation).
    pub(crate) fn from_post(headers: &HeaderMap, body: &[u8]) -> Result<Self, Refusal> {
        let unusable = || Refusal {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "send the request as `content-type: application/json`".to_owned(),
        };
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(unusable)?;
        let mut parts = content_type.split(';');
        let essence = parts.next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(unusable());
        }
        // JSON is UTF-8; another declared charset is a body this server would misread.
        let foreign_charset =
            parts
                .filter_map(|p| p.trim().split_once('='))
                .any(|(name, value)| {
                    name.trim().eq_ignore_ascii_case("charset")
                        && !value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
                });
        if foreign_charset {
            return Err(unusable());
        }
        let value: Value = serde_json::from_slice(body).map_err(|error| {
            Refusal::bad_request(format!(
                "the body is not a GraphQL request in JSON: {error}"
            ))
        })?;
        let Value::Object(mut fields) = value else {
            return Err(Refusal::bad_request("the body must be a JSON object"));
        };
        Ok(Self {
            query: optional_string(fields.remove("query"), "query")?,
            operation_name: optional_string(fields.remove("operationName"), "operationName")?,
            variables: optional_map(fields.remove("variables"), "variables")?,
            extensions: optional_map(fields.remove("extensions"), "extensions")?,
        })
    }

    /// A GET: the parameters URL-encoded in the query string, `variables` and `extensions`
    /// as JSON text.
    pub(crate) fn from_get(query_string: &str) -> Result<Self, Refusal> {
        let mut params = Self::default();
        for (name, value) in url::form_urlencoded::parse(query_string.as_bytes()) {
            let json = |what: &str| -> Result<Map<String, Value>, Refusal> {
                let parsed = serde_json::from_str(&value).map_err(|error| {
                    Refusal::bad_request(format!("`{what}` is not JSON: {error}"))
                })?;
                optional_map(Some(parsed), what)
            };
            match name.as_ref() {
                "query" => params.query = Some(value.into_owned()),
                "operationName" => params.operation_name = Some(value.into_owned()),
                "variables" => params.variables = json("variables")?,
                "extensions" => params.extensions = json("extensions")?,
                _ => {}
            }
        }
        Ok(params)
    }

    /// The request to execute; its query must have been settled (see
    /// [`crate::persisted_queries`]).
    pub(crate) fn to_request(&self) -> async_graphql::Request {
        let mut request = async_graphql::Request::new(self.query.clone().unwrap_or_default())
            .variables(async_graphql::Variables::from_json(Value::Object(
                self.variables.clone(),
            )));
        request.operation_name = self.operation_name.clone();
        for (name, value) in &self.extensions {
            if let Ok(value) = async_graphql::Value::from_json(value.clone()) {
                request.extensions.insert(name.clone(), value);
            }
        }
        request
    }
}

fn optional_string(value: Option<Value>, what: &str) -> Result<Option<String>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(Refusal::bad_request(format!("`{what}` must be a string"))),
    }
}

fn optional_map(value: Option<Value>, what: &str) -> Result<Map<String, Value>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(Refusal::bad_request(format!("`{what}` must be an object"))),
    }
}

/// Whether `response` failed before execution began: the document did not parse or
/// validate, or its variables did not coerce. Those errors carry no code of ours (resolvers
/// always set one) and leave no data.
pub(crate) fn is_request_error(response: &async_graphql::Response) -> bool {
    response.data == async_graphql::Value::Null
        && response.errors.iter().any(|error| {
            error
                .extensions
                .as_ref()
                .is_none_or(|e| e.get("code").is_none())
        })
}

/// The HTTP answer for an executed request. Under `application/graphql-response+json` a
/// request error is a 400 without `data`; under `application/json` it stays a 200, as
/// clients of that type expect. `request_error` must be judged before codes are added.
pub(crate) fn respond(
    media: MediaType,
    response: async_graphql::Response,
    request_error: bool,
) -> Response {
    let mut body = match serde_json::to_value(&response) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "a GraphQL response did not serialize");
            return refuse(
                media,
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "the response could not be encoded",
            );
        }
    };
    let status = if request_error && media == MediaType::GraphqlResponse {
        if let Value::Object(fields) = &mut body {
            fields.remove("data");
        }
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    with_media(media, (status, axum::Json(body)).into_response())
}

/// A GraphQL-shaped answer for a request that was refused before it ran.
pub(crate) fn refuse(
    media: MediaType,
    status: StatusCode,
    code: ErrorCode,
    message: &str,
) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": code.as_str() } }]
    });
    with_media(media, (status, axum::Json(body)).into_response())
}

/// Labels a JSON answer with the negotiated type (axum's `Json` says `application/json`).
pub(crate) fn with_media(media: MediaType, mut response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if is_json {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(media.as_str()),
        );
    }
    response
}

/// 406 for a client that accepts no JSON at all.
pub(crate) fn not_acceptable() -> Response {
    let body = serde_json::json!({ "errors": [{
        "message": "GraphQL answers are application/graphql-response+json or application/json",
        "extensions": { "code": ErrorCode::BadUserInput.as_str() },
    }] });
    (StatusCode::NOT_ACCEPTABLE, axum::Json(body)).into_response()
}

/// 405 for a mutation sent over GET, which a link or a prefetching browser could trigger.
pub(crate) fn mutation_over_get(media: MediaType) -> Response {
    let mut response = refuse(
        media,
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadUserInput,
        "mutations are only accepted over POST",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_highest_ranked_served_type_answers() {
        assert_eq!(
            MediaType::negotiate(&HeaderMap::new()),
            Some(MediaType::Json)
        );
        assert_eq!(MediaType::negotiate(&accept("*/*")), Some(MediaType::Json));
        assert_eq!(
            MediaType::negotiate(&accept(
                "application/graphql-response+json, application/json;q=0.9"
            )),
            Some(MediaType::GraphqlResponse)
        );
        assert_eq!(
            MediaType::negotiate(&accept(
                "application/graphql-response+json;q=0.5, application/json"
            )),
            Some(MediaType::Json)
        );
        assert_eq!(MediaType::negotiate(&accept("text/html")), None);
        assert_eq!(
            MediaType::negotiate(&accept("application/graphql-response+json;q=0")),
            None
        );
    }

    #[test]
    fn a_post_needs_a_json_content_type_and_well_typed_parameters() {
        let body = br#"{"query":"{ a }","variables":{"x":1},"extensions":{"e":true}}"#;
        let params = Params::from_post(&content_type("application/json; charset=UTF-8"), body)
            .expect("a JSON post");
        assert_eq!(params.query.as_deref(), Some("{ a }"));
        assert_eq!(params.variables["x"], 1);
        assert_eq!(params.extensions["e"], true);

        let status = |headers: &HeaderMap, body: &[u8]| {
            Params::from_post(headers, body)
                .err()
                .map(|refusal| refusal.status)
        };
        assert_eq!(
            status(&HeaderMap::new(), body),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert_eq!(
            status(&content_type("text/plain"), body),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert_eq!(
            status(&content_type("application/json; charset=latin1"), body),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let json = content_type("application/json");
        for bad in [
            &br#"{ "not json"#[..],
            br#"[]"#,
            br#"{"query":{"obj":"ect"}}"#,
            br#"{"query":"{ a }","variables":"x"}"#,
            br#"{"query":"{ a }","operationName":0}"#,
            br#"{"query":"{ a }","extensions":["array"]}"#,
        ] {
            assert_eq!(status(&json, bad), Some(StatusCode::BAD_REQUEST));
        }
        assert_eq!(
            Params::from_post(&json, br#"{"qeury":"{ a }"}"#)
                .map(|p| p.query)
                .ok(),
            Some(None)
        );
    }

    #[test]
    fn a_get_takes_url_encoded_json_variables_and_extensions() {
        let params = Params::from_get(
            "query=query%20T(%24n%3A%20String!)%20%7B%20a%20%7D&variables=%7B%22n%22%3A%22x%22%7D\
             &operationName=T&extensions=%7B%22e%22%3A1%7D",
        )
        .expect("a GET");
        assert_eq!(params.query.as_deref(), Some("query T($n: String!) { a }"));
        assert_eq!(params.operation_name.as_deref(), Some("T"));
        assert_eq!(params.variables["n"], "x");
        assert_eq!(params.extensions["e"], 1);
        assert!(Params::from_get("query=%7Ba%7D&variables=nope").is_err());
        assert!(Params::from_get("query=%7Ba%7D&variables=%5B%5D").is_err());
    }

    #[test]
    fn request_errors_lose_their_data_only_under_the_new_type() {
        let failed = || {
            async_graphql::Response::from_errors(vec![async_graphql::ServerError::new(
                "unknown field",
                None,
            )])
        };
        assert!(is_request_error(&failed()));
        let strict = respond(MediaType::GraphqlResponse, failed(), true);
        assert_eq!(strict.status(), StatusCode::BAD_REQUEST);
        assert!(
            strict.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/graphql-response+json")
        );
        let legacy = respond(MediaType::Json, failed(), true);
        assert_eq!(legacy.status(), StatusCode::OK);

        let mut coded = async_graphql::ServerError::new("forbidden", None);
        coded
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", "FORBIDDEN");
        let field_error = async_graphql::Response::from_errors(vec![coded]);
        assert!(!is_request_error(&field_error));
    }
}
