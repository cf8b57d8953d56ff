#!/usr/bin/env bash
# The whole Orderly test suite against a real PostgreSQL server.
#
#   deploy/local/test.sh [extra test-runner arguments]
#
# Uses `cargo nextest run` when cargo-nextest is installed (plus the doc tests,
# which nextest does not run), otherwise `cargo test`. Extra arguments go to
# the test runner; with extra arguments the separate doc-test pass is skipped.
# Database selection: see deploy/local/README.md.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo_root}"

# Exports ORDERLY_DATABASE_URL and ORDERLY_TEST_DATABASE_URL.
# shellcheck source-path=SCRIPTDIR source=ensure-postgres.sh
source "${repo_root}/deploy/local/ensure-postgres.sh"
export ORDERLY_DATABASE_URL ORDERLY_TEST_DATABASE_URL

# Installs Debian package $1 quietly (its output shown only on failure); $2 says which
# tests need it, which fail without it.
install_for_tests() {
    local package="$1" why="$2" apt_log
    local as_root=()
    if [[ "$(id -u)" -ne 0 ]]; then
        as_root=(sudo --)
    fi
    echo "test: installing ${package} for ${why}" >&2
    apt_log="$(mktemp /tmp/orderly-apt.XXXXXX)"
    if ! { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 \
            install -y --no-install-recommends "${package}"; } >"${apt_log}" 2>&1; then
        tail -n 30 "${apt_log}" >&2
        echo "test: could not install ${package}; ${why} will fail" >&2
    fi
    rm -f "${apt_log}"
}

# The metrics test checks a scrape with promtool (Debian's prometheus package) and fails
# without it.
if ! command -v promtool >/dev/null 2>&1; then
    install_for_tests prometheus "the metrics test (promtool)"
fi

# The fault tests (tests/it/faults.rs) restart and crash PostgreSQL, so each starts a private
# cluster of its own: they need the server binaries even when the database above is on
# another machine.
have_server_binaries() {
    local bindir
    for bindir in /usr/lib/postgresql/*/bin; do
        if [[ -x "${bindir}/initdb" && -x "${bindir}/pg_ctl" && -x "${bindir}/postgres" ]]; then
            return 0
        fi
    done
    return 1
}
if ! have_server_binaries; then
    install_for_tests postgresql "the fault tests (tests/it/faults.rs: initdb, pg_ctl, postgres)"
fi

# tests/it/graphql_over_http.rs runs the `graphql-http` package's audit under Node.js, and
# tests/it/console.rs drives a browser with `playwright-core`: the
# packages of tests/node/package.json are installed once into a cache outside the repository,
# again whenever their lock file changes.
if ! command -v node >/dev/null 2>&1; then
    install_for_tests nodejs "the GraphQL-over-HTTP audit (Node.js)"
fi
if ! command -v npm >/dev/null 2>&1; then
    install_for_tests npm "the GraphQL-over-HTTP audit (npm)"
fi
export ORDERLY_NODE_DIR="${ORDERLY_NODE_DIR:-${XDG_CACHE_HOME:-${HOME}/.cache}/orderly/node}"
if [[ ! -d "${ORDERLY_NODE_DIR}/node_modules" ]] ||
    ! cmp -s tests/node/package-lock.json "${ORDERLY_NODE_DIR}/package-lock.json"; then
    echo "test: installing tests/node packages into ${ORDERLY_NODE_DIR}" >&2
    mkdir -p "${ORDERLY_NODE_DIR}"
    cp tests/node/package.json tests/node/package-lock.json "${ORDERLY_NODE_DIR}/"
    if ! (cd "${ORDERLY_NODE_DIR}" && npm ci --no-audit --no-fund --loglevel=error >&2); then
        echo "test: npm could not install tests/node's packages; the tests that use them will fail" >&2
    fi
fi

# tests/it/console.rs drives the console and GraphiQL in Debian's Chromium (through the
# playwright-core package installed above) and fails without it.
if [[ ! -x /usr/bin/chromium ]]; then
    install_for_tests chromium "the browser test (tests/it/console.rs)"
fi

# Tests open many connections in parallel. The private cluster is configured
# with max_connections=300; another server keeps its own setting, so check it.
readonly MIN_CONNECTIONS=200
server_info="$(env -u PGPASSWORD PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
    psql -X -w -At -F '|' -d "${ORDERLY_TEST_DATABASE_URL}" -c \
    "SELECT split_part(current_setting('server_version'), ' ', 1), coalesce(host(inet_server_addr()), 'unix-socket'),
            coalesce(inet_server_port(), 0), current_setting('max_connections')" 2>/dev/null || true)"
if [[ -n "${server_info}" ]]; then
    IFS='|' read -r pg_version pg_host pg_port max_connections <<<"${server_info}"
    echo "test: database server PostgreSQL ${pg_version} at ${pg_host}:${pg_port}, max_connections=${max_connections}" >&2
    if ((max_connections < MIN_CONNECTIONS)); then
        echo "test: WARNING: max_connections=${max_connections} is below ${MIN_CONNECTIONS}; parallel tests may run out of connections." >&2
        echo "test:          raise it on that server, or use the private cluster: unset ORDERLY_DATABASE_URL and run with ORDERLY_PG_PROBE_PORT=off" >&2
    fi
else
    echo "test: WARNING: cannot query the test server through ORDERLY_TEST_DATABASE_URL; database tests will likely fail" >&2
fi

status=0
if cargo nextest --version >/dev/null 2>&1; then
    echo "test: cargo nextest run --workspace --locked --no-fail-fast $*" >&2
    cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
    if (($# == 0)); then
        echo "test: cargo test --doc --workspace --locked --no-fail-fast (nextest does not run doc tests)" >&2
        cargo test --doc --workspace --locked --no-fail-fast || status=$?
    fi
else
    echo "test: cargo test --workspace --locked --no-fail-fast $* (install cargo-nextest for faster runs)" >&2
    cargo test --workspace --locked --no-fail-fast "$@" || status=$?
fi

if ((status != 0)); then
    echo "test: FAILED (exit ${status})" >&2
else
    echo "test: all tests passed" >&2
fi
exit "${status}"
