#!/usr/bin/env bash
# Usage: orderly-probe [PATH]   (default /healthz)
# Exits 0 when Orderly answers PATH on ORDERLY_HTTP_ADDR's port with HTTP 200, 1 otherwise.
# For container health checks: the runtime image carries no curl or wget, and bash's /dev/tcp
# is enough for one GET on loopback.
set -euo pipefail

path="${1:-/healthz}"
addr="${ORDERLY_HTTP_ADDR:-127.0.0.1:8080}"
port="${addr##*:}"

exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n' "${path}" >&3
IFS= read -r -t 5 status <&3
exec 3<&-
[[ "${status}" =~ ^HTTP/1\.[01]\ 200 ]]
