//! # Layout
//!
//! The browser pages the HTTP server serves beside `/graphql`, every file embedded in the
//! binary at compile time, so that they work where the servers cannot reach the internet
//! and the build needs neither a network nor Node.js.
//!
//! - `vendor/`: the production builds of GraphiQL, React, ReactDOM and graphql-ws, taken
//!   unchanged from npm, with their licences and versions (`vendor/README.md`). Served under
//!   paths that carry the version, so browsers may keep them for good.
//! - `graphiql/`: the GraphiQL page (`GET /graphql` without parameters) and its start script.
//! - `console/`: the operator console at `/console`: plain HTML, CSS and JavaScript modules
//!   over the public GraphQL API, without a build step.
//! - this file: the table of embedded files and the router that serves them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    /// Under `/assets/`.
    path: &'static str,
    media: &'static str,
    body: &'static [u8],
    /// True for vendored files, whose path changes with their version.
    immutable: bool,
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

macro_rules! asset {
    ($path:literal, $file:literal, $media:expr, $immutable:literal) => {
        Asset {
            path: $path,
            media: $media,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $file)),
            immutable: $immutable,
        }
    };
}

const ASSETS: &[Asset] = &[
    asset!(
        "graphiql-4.1.2/graphiql.min.js",
        "vendor/graphiql/graphiql.min.js",
        JS,
        true
    ),
    asset!(
        "graphiql-4.1.2/graphiql.min.css",
        "vendor/graphiql/graphiql.min.css",
        CSS,
        true
    ),
    asset!(
        "react-18.3.1/react.production.min.js",
        "vendor/react/react.production.min.js",
        JS,
        true
    ),
    asset!(
        "react-dom-18.3.1/react-dom.production.min.js",
        "vendor/react-dom/react-dom.production.min.js",
        JS,
        true
    ),
    asset!(
        "graphql-ws-5.16.2/graphql-ws.min.js",
        "vendor/graphql-ws/graphql-ws.min.js",
        JS,
        true
    ),
    asset!("graphiql/start.js", "graphiql/start.js", JS, false),
    asset!("console/console.css", "console/console.css", CSS, false),
    asset!("console/api.js", "console/api.js", JS, false),
    asset!("console/main.js", "console/main.js", JS, false),
    asset!("console/pages.js", "console/pages.js", JS, false),
];

const GRAPHIQL_PAGE: &str = include_str!("../graphiql/index.html");
const CONSOLE_PAGE: &str = include_str!("../console/index.html");

/// The GraphiQL page, for `GET /graphql` without parameters.
pub fn graphiql_page() -> Response {
    page(GRAPHIQL_PAGE)
}

/// `GET /assets/...` (the files the pages load) and, when `console` is set, `GET /console`.
pub fn router(console: bool) -> Router {
    let table: HashMap<&'static str, Served> = ASSETS
        .iter()
        .map(|asset| (asset.path, Served::new(asset)))
        .collect();
    let router = Router::new()
        .route("/assets/{*path}", get(serve_asset))
        .with_state(Arc::new(table));
    if console {
        router.route("/console", get(|| async { page(CONSOLE_PAGE) }))
    } else {
        router
    }
}

/// An asset with the headers it is served with.
struct Served {
    asset: &'static Asset,
    etag: HeaderValue,
}

impl Served {
    fn new(asset: &'static Asset) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        asset.body.hash(&mut hasher);
        let etag = HeaderValue::from_str(&format!("\"{:016x}\"", hasher.finish()))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
        Self { asset, etag }
    }
}

async fn serve_asset(
    State(table): State<Arc<HashMap<&'static str, Served>>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(served) = table.get(path.as_str()) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    // Our own files change with the binary: browsers ask again each time, and a 304 keeps
    // that cheap. Vendored ones change only with their versioned path.
    let cache = if served.asset.immutable {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|tag| tag == served.etag);
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (header::ETAG, served.etag.clone()),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(served.asset.media),
        )],
        served.asset.body,
    )
        .into_response()
}

/// A page of ours: never cached (it names the assets of this binary's version), never framed
/// by another site, and allowed to load only from this server.
fn page(html: &'static str) -> Response {
    let policy = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                  font-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                  frame-ancestors 'none'";
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(html),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `src` and `href` in `html`.
    fn references(html: &str) -> Vec<&str> {
        let mut found = Vec::new();
        for attribute in ["src=\"", "href=\""] {
            let mut rest = html;
            while let Some(at) = rest.find(attribute) {
                rest = &rest[at + attribute.len()..];
                let end = rest.find('"').unwrap_or(rest.len());
                found.push(&rest[..end]);
            }
        }
        found
    }

    #[test]
    fn the_pages_load_only_embedded_files_of_this_server() {
        let paths: Vec<&str> = ASSETS.iter().map(|asset| asset.path).collect();
        for html in [GRAPHIQL_PAGE, CONSOLE_PAGE] {
            let references = references(html);
            assert!(!references.is_empty());
            for reference in references {
                // In-page links and inline data stay on the page.
                if reference.starts_with('#') || reference.starts_with("data:") {
                    continue;
                }
                // Anything else is a path on this server (`//host` would be another host).
                assert!(
                    reference.starts_with('/') && !reference.starts_with("//"),
                    "{reference} leaves this server"
                );
                if let Some(path) = reference.strip_prefix("/assets/") {
                    assert!(
                        paths.contains(&path),
                        "{reference} is not an embedded asset"
                    );
                }
            }
        }
    }

    #[test]
    fn vendored_files_are_the_production_builds() {
        for asset in ASSETS.iter().filter(|asset| asset.immutable) {
            let text = String::from_utf8_lossy(asset.body);
            // React's development builds name themselves in their headers; production ones do not.
            assert!(
                !text.contains("development"),
                "{} is a development build",
                asset.path
            );
            assert!(asset.path.contains(".min."), "{}", asset.path);
        }
    }
}
