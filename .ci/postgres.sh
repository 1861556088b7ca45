#!/usr/bin/env bash
# A throwaway PostgreSQL server for the storage tests (collector, registry), from Debian's packages.
#   pg_env="$(bash .ci/postgres.sh start)" && eval "$pg_env"   # initdb + start on a free port; prints exports
#   bash .ci/postgres.sh stop              # stop it and delete its data
# The cluster lives in $M3DM_PG_DIR (default /tmp/m3dm-ci-pg), listens on loopback only, and has one role
# `m3dm` (password auth, CREATEDB: each test session creates and drops its own database) and a database
# `m3dm_test`. fsync is off (a test server: only an OS crash could lose commits). Run as root, it runs
# the server as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
dir="${M3DM_PG_DIR:-/tmp/m3dm-ci-pg}"
bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
if [ -z "$bin" ]; then echo "postgres.sh: PostgreSQL is not installed (.ci/install installs it)" >&2; exit 1; fi
as_owner() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
start)
    if [ -f "$dir/data/postmaster.pid" ]; then as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$dir"
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    password="m3dm-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
    as_owner bash -c "echo postgres-$password > '$dir/pwfile'"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" --auth=scram-sha-256 -E UTF8 >"$dir/initdb.log"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null
    PGPASSWORD="postgres-$password" "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE m3dm LOGIN CREATEDB PASSWORD '$password'" -c "CREATE DATABASE m3dm_test OWNER m3dm" >/dev/null
    echo "export M3DM_TEST_PG_URL='postgresql+psycopg://m3dm:$password@127.0.0.1:$port/m3dm_test'"
    echo "export M3DM_PG_DIR='$dir'"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true; fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: postgres.sh start|stop" >&2
    exit 2
    ;;
esac
