//! /graphql as a stock GraphQL-over-HTTP client sees it: media types, status codes, GET,
//! automatic persisted queries, compression, and the `graphql-http` package's audit of all
//! of it. None of these requests needs a database.

use reqwest::header;
use serde_json::{Value, json};

const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

/// An app whose database is unreachable: introspection and refusals need none.
async fn start() -> crate::common::Api {
    crate::common::start(&crate::common::settings_for(
        "postgres://postgres@127.0.0.1:1/none",
    ))
    .await
}

fn url(api: &crate::common::Api) -> String {
    format!("{}/graphql", api.base)
}

async fn read(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let media = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, media, body)
}

async fn post(api: &crate::common::Api, accept: &str, body_text: &str) -> (u16, String, Value) {
    let response = api
        .http
        .post(url(api))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, accept)
        .body(body_text.to_owned())
        .send()
        .await
        .unwrap();
    read(response).await
}

#[tokio::test]
async fn the_graphql_http_audit_passes_every_must_and_should_and_may() {
    let api = start().await;
    let target = url(&api);
    let printed = tokio::task::spawn_blocking(move || {
        crate::common::run_node("graphql-http-audit.mjs", &[&target])
    })
    .await
    .unwrap();
    let results: Vec<Value> = serde_json::from_str(printed.trim()).expect("the audit's JSON");
    assert!(results.len() > 40, "too few audits ran: {}", results.len());
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r["status"] != "ok")
        .map(|r| format!("{} {}: {}", r["id"], r["name"], r["reason"]))
        .collect();
    assert!(failed.is_empty(), "audits failed:\n{}", failed.join("\n"));
}

#[tokio::test]
async fn the_new_media_type_answers_with_its_own_type_and_request_errors_as_400() {
    let api = start().await;
    let (status, media, body) = post(&api, GRAPHQL_RESPONSE, r#"{"query":"{ __typename }"}"#).await;
    assert_eq!(status, 200);
    assert!(media.starts_with(GRAPHQL_RESPONSE), "{media}");
    assert_eq!(body["data"]["__typename"], "Query");

    for broken in [r#"{"query":"{"}"#, r#"{"query":"{ noSuchField }"}"#] {
        let (status, media, body) = post(&api, GRAPHQL_RESPONSE, broken).await;
        assert_eq!(status, 400, "{body}");
        assert!(media.starts_with(GRAPHQL_RESPONSE), "{media}");
        assert!(body.get("data").is_none(), "{body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    }
    // The legacy type keeps answering request errors with 200 and `data: null`.
    let (status, media, body) = post(&api, "application/json", r#"{"query":"{"}"#).await;
    assert_eq!((status, media.starts_with("application/json")), (200, true));
    assert!(body["errors"].is_array());
}

#[tokio::test]
async fn refusals_get_the_status_the_specification_gives_them() {
    let api = start().await;
    let no_type = api
        .http
        .post(url(&api))
        .body(r#"{"query":"{ __typename }"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status().as_u16(), 415);

    let (status, _, body) = post(&api, "application/json", r#"{"qeury":"{ __typename }"}"#).await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");

    let html_only = api
        .http
        .post(url(&api))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "text/html")
        .body(r#"{"query":"{ __typename }"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(html_only.status().as_u16(), 406);

    let mutation = api
        .http
        .get(url(&api))
        .query(&[(
            "query",
            "mutation { restock(sku: \"A\", quantity: 1) { id } }",
        )])
        .send()
        .await
        .unwrap();
    assert_eq!(mutation.status().as_u16(), 405);
    assert_eq!(mutation.headers()[header::ALLOW], "POST");
}

#[tokio::test]
async fn a_get_runs_a_query_with_url_encoded_variables() {
    let api = start().await;
    let response = api
        .http
        .get(url(&api))
        .query(&[
            (
                "query",
                "query T($name: String!) { __type(name: $name) { name } }",
            ),
            ("variables", r#"{"name":"Order"}"#),
        ])
        .send()
        .await
        .unwrap();
    let (status, _, body) = read(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["__type"]["name"], "Order");
}

#[tokio::test]
async fn a_persisted_query_is_answered_by_its_hash_once_registered() {
    let api = start().await;
    let query = "{ __typename }";
    // sha256("{ __typename }"), as Apollo's clients compute it.
    let hash = "7f56e67dd21ab3f30d1ff8b7bed08893f0a0db86449836189b361dd1e56ddb4b";
    let persisted = json!({ "persistedQuery": { "version": 1, "sha256Hash": hash } });

    let by_hash = json!({ "extensions": persisted }).to_string();
    let (status, _, body) = post(&api, "application/json", &by_hash).await;
    assert_eq!(status, 200);
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound");

    let with_text = json!({ "query": query, "extensions": persisted }).to_string();
    let (_, _, body) = post(&api, "application/json", &with_text).await;
    assert_eq!(body["data"]["__typename"], "Query", "{body}");

    // Later by hash alone, over GET too.
    let (_, _, body) = post(&api, "application/json", &by_hash).await;
    assert_eq!(body["data"]["__typename"], "Query", "{body}");
    let response = api
        .http
        .get(url(&api))
        .query(&[("extensions", persisted.to_string())])
        .send()
        .await
        .unwrap();
    let (status, _, body) = read(response).await;
    assert_eq!(
        (status, &body["data"]["__typename"]),
        (200, &json!("Query"))
    );

    let wrong = json!({ "query": "{ __schema { queryType { name } } }", "extensions": persisted });
    let (_, _, body) = post(&api, "application/json", &wrong.to_string()).await;
    assert_eq!(
        body["errors"][0]["message"],
        "provided sha does not match query"
    );
}

#[tokio::test]
async fn answers_are_gzipped_for_clients_that_accept_it() {
    let api = start().await;
    let introspection = r#"{"query":"{ __schema { types { name fields { name } } } }"}"#;
    let response = api
        .http
        .post(url(&api))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(introspection)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
    let plain = api
        .http
        .post(url(&api))
        .header(header::CONTENT_TYPE, "application/json")
        .body(introspection)
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
}
