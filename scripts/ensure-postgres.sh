#!/usr/bin/env bash
# Make sure callward's own PostgreSQL server answers on 127.0.0.1:${CALLWARD_PG_PORT:-54329}.
# Idempotent: quick when the server is up.
#
# On a fresh Debian 12 machine (as root, no systemd) this installs Debian's
# postgresql, makes a data directory of callward's own (not the distribution's
# cluster), starts the server as the postgres user and waits until it accepts
# connections. The role `callward` (LOGIN CREATEDB) signs in with a password over
# TCP (scram-sha-256); the password is generated once and kept only in a 0600
# libpq password file, never in a URL or in callward.yaml:
#
#   PGPASSFILE=/var/lib/callward-postgres/callward.pgpass
#   url:       postgresql://callward@127.0.0.1:54329/callward
#
# The last line printed on stdout is that URL.
set -euo pipefail

PORT=${CALLWARD_PG_PORT:-54329}
ROOT=${CALLWARD_PG_ROOT:-/var/lib/callward-postgres}
DATA=$ROOT/data
SOCKETS=$ROOT/run
PASSFILE=$ROOT/callward.pgpass
LOG=/var/log/callward-postgres.log

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }

bin_dir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n $found && -x $found/postgres ]] && printf '%s\n' "$found"
}

answers() {
    PGPASSFILE=$PASSFILE PGCONNECT_TIMEOUT=3 psql -X -q -h 127.0.0.1 -p "$PORT" \
        -U callward -d callward -tAc 'SELECT 1' >/dev/null 2>&1
}

if [[ -f $PASSFILE ]] && command -v psql >/dev/null 2>&1 && answers; then
    printf 'postgresql://callward@127.0.0.1:%s/callward\n' "$PORT"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "the server does not answer on 127.0.0.1:$PORT and only root can install or start it"
    exit 2
fi

BIN=$(bin_dir || true)
if [[ -z $BIN ]] || ! command -v psql >/dev/null 2>&1; then
    log "installing postgresql from Debian"
    # Wait for another apt run (another make, unattended upgrades) rather than fail.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends postgresql postgresql-client >/dev/null
    BIN=$(bin_dir)
fi

mkdir -p "$ROOT" "$SOCKETS"
chown postgres:postgres "$ROOT" "$SOCKETS"
chmod 0755 "$ROOT"
chmod 0775 "$SOCKETS"

if [[ ! -s $DATA/PG_VERSION ]]; then
    log "initialising $DATA"
    rm -rf "$DATA"
    install -d -o postgres -g postgres -m 0700 "$DATA"
    runuser -u postgres -- "$BIN/initdb" -D "$DATA" --auth-local=peer \
        --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$DATA/postgresql.conf" <<CONF
# callward's own server (scripts/ensure-postgres.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCKETS'
max_connections = 300
fsync = on
synchronous_commit = on
full_page_writes = on
CONF
fi

if ! runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    rm -f "$DATA/postmaster.pid"
    log "starting the server on 127.0.0.1:$PORT (log: $LOG)"
    touch "$LOG"
    chown postgres:postgres "$LOG"
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null
fi

for _ in $(seq 1 120); do
    if runuser -u postgres -- "$BIN/pg_isready" -q -h "$SOCKETS" -p "$PORT"; then
        break
    fi
    sleep 0.5
done
runuser -u postgres -- "$BIN/pg_isready" -q -h "$SOCKETS" -p "$PORT"

if [[ ! -s $PASSFILE ]]; then
    password=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
    umask 077
    printf '127.0.0.1:%s:*:callward:%s\n' "$PORT" "$password" >"$PASSFILE.new"
    chmod 0600 "$PASSFILE.new"
    mv "$PASSFILE.new" "$PASSFILE"
fi
password=$(cut -d: -f5- "$PASSFILE")
runuser -u postgres -- psql -X -q -h "$SOCKETS" -p "$PORT" -d postgres -v ON_ERROR_STOP=1 \
    -v pw="$password" >/dev/null <<'SQL'
SELECT format('CREATE ROLE callward LOGIN CREATEDB PASSWORD %L', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'callward') \gexec
SELECT format('ALTER ROLE callward LOGIN CREATEDB PASSWORD %L', :'pw') \gexec
SELECT 'CREATE DATABASE callward OWNER callward'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'callward') \gexec
SQL

if ! answers; then
    log "the server runs but callward cannot sign in on 127.0.0.1:$PORT"
    exit 1
fi
log "postgresql answers on 127.0.0.1:$PORT"
printf 'postgresql://callward@127.0.0.1:%s/callward\n' "$PORT"
