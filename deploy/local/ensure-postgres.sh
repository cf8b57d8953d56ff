#!/usr/bin/env bash
# Make sure a PostgreSQL server is reachable for Orderly, then export:
#
#   ORDERLY_DATABASE_URL       database `orderly` (created if missing)
#   ORDERLY_TEST_DATABASE_URL  the same server's `postgres` maintenance database
#                              (tests create and drop their own databases through it)
#
# Usage:
#   source deploy/local/ensure-postgres.sh     # exports both variables into this shell
#   deploy/local/ensure-postgres.sh            # prints ORDERLY_DATABASE_URL on stdout
#   deploy/local/ensure-postgres.sh --env      # prints `export ...` lines (for eval)
#   deploy/local/ensure-postgres.sh --stop     # stops the private cluster, if running
#
# Order of preference:
#   a) ORDERLY_DATABASE_URL is set and answers: keep it.
#   b) a server on 127.0.0.1:$ORDERLY_PG_PROBE_PORT (default 5432) accepts user
#      `postgres` without a password: use it.
#   c) a private cluster in $ORDERLY_PG_DATA (default /var/tmp/orderly-pg) on
#      127.0.0.1:$ORDERLY_PG_PORT (default 55432), run by the `postgres` OS user;
#      PostgreSQL is installed with apt-get if needed; reused when already running.
#
# Progress goes to stderr; passwords are never printed there.

# ---------------------------------------------------------------------------
# Sourced: do the work in a child bash (so `set -euo pipefail` and helper
# functions never leak into the caller's shell), then export its answer here.
# ---------------------------------------------------------------------------
if [[ "${BASH_SOURCE[0]}" != "${0}" ]]; then
    _orderly_ensure_postgres() {
        local self="${BASH_SOURCE[0]}" out
        out="$(
            ORDERLY_DATABASE_URL="${ORDERLY_DATABASE_URL:-}" \
            ORDERLY_TEST_DATABASE_URL="${ORDERLY_TEST_DATABASE_URL:-}" \
            ORDERLY_PG_DATA="${ORDERLY_PG_DATA:-}" \
            ORDERLY_PG_PORT="${ORDERLY_PG_PORT:-}" \
            ORDERLY_PG_PROBE_PORT="${ORDERLY_PG_PROBE_PORT:-}" \
            ORDERLY_PG_WAIT_SECONDS="${ORDERLY_PG_WAIT_SECONDS:-}" \
            bash "${self}" --env
        )" || {
            printf 'ensure-postgres: FAILED, no database available\n' >&2
            return 1
        }
        eval "${out}"
    }
    if _orderly_ensure_postgres; then
        unset -f _orderly_ensure_postgres
        return 0
    else
        unset -f _orderly_ensure_postgres
        return 1
    fi
fi

set -euo pipefail

readonly PG_DATA_DEFAULT=/var/tmp/orderly-pg
readonly PG_PORT_DEFAULT=55432
readonly PROBE_PORT_DEFAULT=5432

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }
die() {
    printf 'ensure-postgres: ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

# Hide the password of a URL (or key=value conninfo) before printing it.
redact() {
    local s="$1"
    s="$(printf '%s' "${s}" | sed -E \
        -e 's#^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?]*):[^@/?]*@#\1:***@#' \
        -e 's#([?&]password=)[^&]*#\1***#g' \
        -e "s#(^|[[:space:]])password[[:space:]]*=[[:space:]]*('[^']*'|[^[:space:]]*)#\\1password=***#g")"
    printf '%s' "${s}"
}

is_root() { [[ "$(id -u)" -eq 0 ]]; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root (directly, or through sudo).
as_root() {
    if is_root; then
        "$@"
    elif have sudo; then
        sudo -- "$@"
    else
        die "need root privileges for: $* (run as root, or install and configure sudo)"
    fi
}

# Run a command as the `postgres` OS user, from `/` (it may not be able to read the cwd).
as_pg() {
    if [[ "$(id -un)" == postgres ]]; then
        (cd / && "$@")
    elif is_root; then
        if have runuser; then
            (cd / && runuser -u postgres -- "$@")
        else
            local cmd
            cmd="$(printf '%q ' "$@")"
            (cd / && su postgres -s /bin/sh -c "${cmd}")
        fi
    elif have sudo; then
        (cd / && sudo -u postgres -- "$@")
    else
        die "need root or sudo to run PostgreSQL as the postgres user"
    fi
}

# Fail early, with a clear message, when neither root nor sudo is available.
require_privileges() {
    is_root || have sudo ||
        die "$* needs root privileges: run as root, or as a user with sudo (or set ORDERLY_DATABASE_URL to a server you run yourself)"
}

APT_UPDATED=0
# Run apt-get quietly: its output goes to a log file, shown only on failure.
apt_get() {
    local logfile rc=0
    logfile="$(mktemp /tmp/orderly-apt.XXXXXX)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@" >"${logfile}" 2>&1 || rc=$?
    if ((rc != 0)); then
        tail -n 30 "${logfile}" >&2
        rm -f "${logfile}"
        die "apt-get $* failed (exit ${rc})"
    fi
    rm -f "${logfile}"
}

apt_install() {
    have apt-get || die "apt-get not found; install PostgreSQL ($*) yourself"
    require_privileges "installing $*"
    if [[ "${APT_UPDATED}" -eq 0 ]]; then
        log "apt-get update"
        apt_get update
        APT_UPDATED=1
    fi
    log "installing $* with apt-get (this can take a minute)"
    apt_get install -y --no-install-recommends "$@"
}

# Newest PostgreSQL server bin dir (Debian layout), or nothing.
newest_server_bindir() {
    local d best=""
    while IFS= read -r d; do
        if [[ -x "${d}/postgres" && -x "${d}/initdb" && -x "${d}/pg_ctl" ]]; then
            best="${d}"
        fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V)
    printf '%s' "${best}"
}

# ---------------------------------------------------------------------------
# Client tools
# ---------------------------------------------------------------------------
PSQL=""
PG_ISREADY=""
find_client_tools() {
    local bindir
    PSQL="$(command -v psql || true)"
    PG_ISREADY="$(command -v pg_isready || true)"
    bindir="$(newest_server_bindir)"
    if [[ -z "${PSQL}" && -n "${bindir}" && -x "${bindir}/psql" ]]; then PSQL="${bindir}/psql"; fi
    if [[ -z "${PG_ISREADY}" && -n "${bindir}" && -x "${bindir}/pg_isready" ]]; then
        PG_ISREADY="${bindir}/pg_isready"
    fi
    [[ -n "${PSQL}" && -n "${PG_ISREADY}" ]]
}

ensure_client_tools() {
    if ! find_client_tools; then
        log "psql/pg_isready not found"
        apt_install postgresql-client
        hash -r
        find_client_tools || die "psql/pg_isready still missing after installing postgresql-client"
    fi
}

# psql isolated from the caller's PG* environment and password files, so a
# probe succeeds only if the URL alone is enough (as it is for the service).
pgq() {
    env -u PGPASSWORD -u PGHOST -u PGHOSTADDR -u PGPORT -u PGUSER -u PGDATABASE \
        -u PGSERVICE -u PGOPTIONS PGPASSFILE=/dev/null PGCONNECT_TIMEOUT=5 \
        "${PSQL}" -X -q -w -v ON_ERROR_STOP=1 "$@"
}

answers() { pgq -d "$1" -Atc 'SELECT 1' >/dev/null 2>&1; }

# ---------------------------------------------------------------------------
# URL helpers (postgres://user[:pass]@host[:port]/db?params, or key=value form)
# ---------------------------------------------------------------------------
readonly URL_RE='^([A-Za-z][A-Za-z0-9+.-]*://)([^/?]*)(/[^?]*)?(\?.*)?$'

url_dbname() {
    local url="$1"
    if [[ "${url}" =~ ${URL_RE} ]]; then
        local path="${BASH_REMATCH[3]}"
        printf '%s' "${path#/}"
    elif [[ "${url}" =~ (^|[[:space:]])dbname[[:space:]]*=[[:space:]]*([^[:space:]]+) ]]; then
        printf '%s' "${BASH_REMATCH[2]}"
    fi
}

url_with_dbname() {
    local url="$1" db="$2"
    if [[ "${url}" =~ ${URL_RE} ]]; then
        printf '%s%s/%s%s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${db}" "${BASH_REMATCH[4]}"
    elif [[ "${url}" =~ (^|[[:space:]])dbname[[:space:]]*= ]]; then
        printf '%s' "${url}" | sed -E "s/(^|[[:space:]])dbname[[:space:]]*=[[:space:]]*[^[:space:]]+/\\1dbname=${db}/"
    else
        printf '%s dbname=%s' "${url}" "${db}"
    fi
}

# Create database $2 through maintenance URL $1 unless it exists.
db_exists() {
    [[ "$(pgq -d "$1" -v db="$2" -At 2>/dev/null <<'SQL'
SELECT count(*) FROM pg_database WHERE datname = :'db';
SQL
    )" == 1 ]]
}

ensure_database() {
    local maint="$1" db="$2" err
    db_exists "${maint}" "${db}" && return 0
    log "creating database ${db}"
    if err="$(pgq -d "${maint}" -v db="${db}" 2>&1 >/dev/null <<'SQL'
SELECT format('CREATE DATABASE %I', :'db') \gexec
SQL
    )"; then
        return 0
    fi
    # A concurrent run may have created it in the meantime.
    db_exists "${maint}" "${db}" && return 0
    log "could not create database ${db}: ${err//$'\n'/ }"
    return 1
}

# Decide ORDERLY_TEST_DATABASE_URL: keep a caller-provided one that answers,
# else the maintenance database of the chosen server.
choose_test_url() {
    local derived="$1"
    if [[ -n "${ORDERLY_TEST_DATABASE_URL:-}" ]]; then
        if answers "${ORDERLY_TEST_DATABASE_URL}"; then
            log "keeping ORDERLY_TEST_DATABASE_URL ($(redact "${ORDERLY_TEST_DATABASE_URL}"))"
            TEST_URL="${ORDERLY_TEST_DATABASE_URL}"
            return
        fi
        log "WARNING: ORDERLY_TEST_DATABASE_URL ($(redact "${ORDERLY_TEST_DATABASE_URL}")) does not answer; using $(redact "${derived}")"
    fi
    TEST_URL="${derived}"
    if ! answers "${TEST_URL}"; then
        log "WARNING: test maintenance database $(redact "${TEST_URL}") does not answer; database tests will fail"
    fi
}

# ---------------------------------------------------------------------------
# (a) ORDERLY_DATABASE_URL already set
# ---------------------------------------------------------------------------
try_given_url() {
    local url="${ORDERLY_DATABASE_URL:-}" db maint
    [[ -n "${url}" ]] || return 1
    db="$(url_dbname "${url}")"
    maint="$(url_with_dbname "${url}" postgres)"
    if ! answers "${url}"; then
        if [[ -n "${db}" ]] && answers "${maint}"; then
            log "the server of ORDERLY_DATABASE_URL answers, but database ${db} is missing"
            ensure_database "${maint}" "${db}" || return 1
        fi
        if ! answers "${url}"; then
            log "WARNING: ORDERLY_DATABASE_URL is set ($(redact "${url}")) but does not answer; looking for another server"
            return 1
        fi
    fi
    log "using ORDERLY_DATABASE_URL ($(redact "${url}"))"
    DB_URL="${url}"
    choose_test_url "${maint}"
}

# ---------------------------------------------------------------------------
# (b) a server on 127.0.0.1:probe-port with trust auth for user postgres
# ---------------------------------------------------------------------------
try_local_server() {
    local port="${ORDERLY_PG_PROBE_PORT:-${PROBE_PORT_DEFAULT}}" maint
    if [[ "${port}" == off ]]; then
        log "probe of an existing local server disabled (ORDERLY_PG_PROBE_PORT=off)"
        return 1
    fi
    [[ "${port}" =~ ^[0-9]+$ ]] || die "ORDERLY_PG_PROBE_PORT must be a port number or 'off' (got '${port}')"
    if ! "${PG_ISREADY}" -q -U postgres -d postgres -h 127.0.0.1 -p "${port}" -t 3 >/dev/null 2>&1; then
        log "no server answering on 127.0.0.1:${port}"
        return 1
    fi
    maint="postgres://postgres@127.0.0.1:${port}/postgres"
    if ! answers "${maint}"; then
        log "a server answers on 127.0.0.1:${port} but not as user postgres without a password; not using it"
        return 1
    fi
    ensure_database "${maint}" orderly || return 1
    DB_URL="postgres://postgres@127.0.0.1:${port}/orderly"
    log "using the server on 127.0.0.1:${port} (user postgres, trust auth)"
    choose_test_url "${maint}"
}

# ---------------------------------------------------------------------------
# (c) private cluster
# ---------------------------------------------------------------------------
data_dir() {
    local dir="${ORDERLY_PG_DATA:-${PG_DATA_DEFAULT}}"
    [[ "${dir}" == /* ]] || dir="${PWD}/${dir}"
    printf '%s' "${dir%/}"
}

# bin dir matching an existing cluster's major version, or the newest one.
cluster_bindir() {
    local dir="$1" ver
    if as_pg test -f "${dir}/PG_VERSION"; then
        ver="$(as_pg cat "${dir}/PG_VERSION")"
        if [[ -x "/usr/lib/postgresql/${ver}/bin/pg_ctl" && -x "/usr/lib/postgresql/${ver}/bin/postgres" ]]; then
            printf '%s' "/usr/lib/postgresql/${ver}/bin"
            return 0
        fi
        die "${dir} holds a PostgreSQL ${ver} cluster but /usr/lib/postgresql/${ver}/bin is missing; install postgresql-${ver}, or stop that cluster and delete ${dir}"
    fi
    newest_server_bindir
}

ensure_server_installed() {
    if [[ -z "$(newest_server_bindir)" ]]; then
        log "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
        apt_install postgresql
        [[ -n "$(newest_server_bindir)" ]] || die "PostgreSQL server binaries still missing after apt-get install postgresql"
    fi
    getent passwd postgres >/dev/null || die "the postgres OS user does not exist (normally created by the postgresql-common package)"
}

wait_ready() {
    local port="$1" dir="$2" deadline
    deadline=$((SECONDS + ${ORDERLY_PG_WAIT_SECONDS:-60}))
    until "${PG_ISREADY}" -q -U postgres -d postgres -h 127.0.0.1 -p "${port}" -t 2 >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "last lines of ${dir}/server.log:"
            as_pg tail -n 20 "${dir}/server.log" >&2 || true
            die "PostgreSQL on 127.0.0.1:${port} did not answer within ${ORDERLY_PG_WAIT_SECONDS:-60}s"
        fi
        sleep 1
    done
}

write_cluster_conf() {
    local dir="$1" port="$2" sockdir="$3"
    as_pg tee "${dir}/orderly.conf" >/dev/null <<EOF
# Settings for the Orderly private development/test cluster.
# Rewritten by deploy/local/ensure-postgres.sh each time it starts the cluster.
listen_addresses = '127.0.0.1'
port = ${port}
unix_socket_directories = '${sockdir}'
max_connections = 300
shared_buffers = 256MB
# Durability stays on: benchmarks measure real commits.
fsync = on
synchronous_commit = on
full_page_writes = on
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
EOF
    if ! as_pg grep -q "^include_if_exists = 'orderly.conf'" "${dir}/postgresql.conf"; then
        printf "\n# Orderly settings\ninclude_if_exists = 'orderly.conf'\n" |
            as_pg tee -a "${dir}/postgresql.conf" >/dev/null
    fi
}

start_private_cluster() {
    local dir port bindir owner sockdir running_port maint
    dir="$(data_dir)"
    port="${ORDERLY_PG_PORT:-${PG_PORT_DEFAULT}}"
    [[ "${port}" =~ ^[0-9]+$ ]] || die "ORDERLY_PG_PORT must be a port number (got '${port}')"
    require_privileges "a private PostgreSQL cluster"

    ensure_server_installed

    # Data directory, owned by postgres.
    if [[ ! -e "${dir}" ]]; then
        log "creating ${dir}"
        as_root install -d -m 0700 -o postgres -g postgres "${dir}"
    fi
    [[ -d "${dir}" ]] || die "${dir} exists and is not a directory"
    owner="$(stat -c %U "${dir}")"
    if [[ "${owner}" != postgres ]]; then
        if [[ -z "$(as_root ls -A "${dir}")" ]]; then
            as_root chown postgres:postgres "${dir}"
            as_root chmod 0700 "${dir}"
        else
            die "${dir} is owned by ${owner}, not postgres, and is not empty; choose another ORDERLY_PG_DATA"
        fi
    fi
    as_pg test -w "${dir}" ||
        die "the postgres user cannot write ${dir} (check the permissions of its parent directories)"

    bindir="$(cluster_bindir "${dir}")"

    # Already running? Reuse it, on whatever port it listens.
    if as_pg "${bindir}/pg_ctl" -D "${dir}" status >/dev/null 2>&1; then
        running_port="$(as_pg sed -n 4p "${dir}/postmaster.pid")"
        [[ "${running_port}" =~ ^[0-9]+$ ]] || die "cannot read the port from ${dir}/postmaster.pid"
        if [[ "${running_port}" != "${port}" ]]; then
            log "NOTE: the private cluster already runs on port ${running_port} (ORDERLY_PG_PORT=${port} ignored; stop it to change ports)"
        fi
        port="${running_port}"
        log "reusing the private cluster in ${dir} (127.0.0.1:${port})"
    else
        if ! as_pg test -f "${dir}/PG_VERSION"; then
            if [[ -n "$(as_pg ls -A "${dir}")" ]]; then
                die "${dir} is not empty and holds no PostgreSQL cluster; choose another ORDERLY_PG_DATA"
            fi
            log "initdb ${dir} ($("${bindir}/postgres" --version))"
            as_pg "${bindir}/initdb" -D "${dir}" -U postgres --auth=trust -E UTF8 --locale=C \
                >"/tmp/orderly-initdb.$$.log" 2>&1 || {
                cat "/tmp/orderly-initdb.$$.log" >&2
                rm -f "/tmp/orderly-initdb.$$.log"
                die "initdb failed"
            }
            rm -f "/tmp/orderly-initdb.$$.log"
        fi
        # Unix socket in the data dir unless the path would be too long for a socket.
        sockdir="${dir}"
        if ((${#dir} > 80)); then sockdir=/tmp; fi
        write_cluster_conf "${dir}" "${port}" "${sockdir}"
        log "starting the private cluster in ${dir} on 127.0.0.1:${port} (log: ${dir}/server.log)"
        if ! as_pg "${bindir}/pg_ctl" -D "${dir}" -l "${dir}/server.log" -w \
            -t "${ORDERLY_PG_WAIT_SECONDS:-60}" start >/dev/null 2>&1; then
            log "last lines of ${dir}/server.log:"
            as_pg tail -n 20 "${dir}/server.log" >&2 || true
            die "could not start PostgreSQL in ${dir} (is port ${port} in use? set ORDERLY_PG_PORT)"
        fi
    fi

    wait_ready "${port}" "${dir}"
    maint="postgres://postgres@127.0.0.1:${port}/postgres"
    answers "${maint}" || die "private cluster on 127.0.0.1:${port} answers pg_isready but refuses user postgres"
    ensure_database "${maint}" orderly || die "could not create database orderly"
    DB_URL="postgres://postgres@127.0.0.1:${port}/orderly"
    log "private cluster ready: 127.0.0.1:${port}, database orderly"
    choose_test_url "${maint}"
}

stop_private_cluster() {
    local dir bindir
    dir="$(data_dir)"
    require_privileges "stopping the private cluster"
    if ! as_pg test -f "${dir}/PG_VERSION"; then
        log "no private cluster in ${dir}"
        return 0
    fi
    bindir="$(cluster_bindir "${dir}")"
    if as_pg "${bindir}/pg_ctl" -D "${dir}" status >/dev/null 2>&1; then
        log "stopping the private cluster in ${dir}"
        as_pg "${bindir}/pg_ctl" -D "${dir}" -m fast -w stop >&2
    else
        log "the private cluster in ${dir} is not running"
    fi
}

main() {
    local mode="url"
    case "${1:-}" in
        "") ;;
        --env) mode="env" ;;
        --stop)
            stop_private_cluster
            return 0
            ;;
        -h | --help)
            usage
            return 0
            ;;
        *)
            usage
            die "unknown argument: $1"
            ;;
    esac

    [[ "${ORDERLY_PG_WAIT_SECONDS:-60}" =~ ^[0-9]+$ ]] ||
        die "ORDERLY_PG_WAIT_SECONDS must be a number of seconds (got '${ORDERLY_PG_WAIT_SECONDS}')"
    DB_URL=""
    TEST_URL=""
    ensure_client_tools
    try_given_url || try_local_server || start_private_cluster

    case "${mode}" in
        url) printf '%s\n' "${DB_URL}" ;;
        env)
            printf 'export ORDERLY_DATABASE_URL=%q\n' "${DB_URL}"
            printf 'export ORDERLY_TEST_DATABASE_URL=%q\n' "${TEST_URL}"
            ;;
    esac
}

main "$@"
