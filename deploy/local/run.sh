#!/usr/bin/env bash
# Orderly quick start: make sure PostgreSQL is there, apply migrations, then
# serve everything in one process (GraphQL at /graphql, projections, saga).
#
#   deploy/local/run.sh [--config FILE]   (passed to `orderly migrate` and `orderly serve`,
#                                          whose only options are the global ones)
#
# Listens on ORDERLY_HTTP_ADDR (default 127.0.0.1:8080). Database selection:
# see deploy/local/README.md; the database chosen there is exported as ORDERLY_DATABASE_URL,
# which overrides a `database_url` in FILE (the environment wins over the file).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo_root}"

# shellcheck source-path=SCRIPTDIR source=ensure-postgres.sh
source "${repo_root}/deploy/local/ensure-postgres.sh"

echo "run: applying migrations" >&2
cargo run --release --locked --bin orderly -- migrate "$@"

echo "run: serving on http://${ORDERLY_HTTP_ADDR:-127.0.0.1:8080} (GraphQL at /graphql; Ctrl-C stops)" >&2
exec cargo run --release --locked --bin orderly -- serve "$@"
