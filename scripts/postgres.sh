#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests, independent of any system service.
#
#   scripts/postgres.sh [start]   start it (if it is not answering yet); print its URL
#   scripts/postgres.sh stop      stop it
#   scripts/postgres.sh status    print its URL if it answers, else exit 1
#   scripts/postgres.sh purge     stop it and delete its directory
#
# The cluster lives in $AIRLOCK_PG_DIR (default /tmp/airlock-pg), listens on 127.0.0.1 only,
# port $AIRLOCK_PG_PORT (default 54329), runs as the `postgres` OS user when started by
# root, trusts every loopback connection (a test cluster: no secrets in it) and runs with
# fsync off. It has a database `airlock_test`. Only the URL goes to standard output.
set -euo pipefail

dir=${AIRLOCK_PG_DIR:-/tmp/airlock-pg}
dir=${dir%/}
port=${AIRLOCK_PG_PORT:-54329}
db=airlock_test
data=$dir/data
url="postgresql+asyncpg://postgres@127.0.0.1:${port}/${db}"

say() { printf 'postgres: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Debian keeps server binaries out of PATH; take the newest installed major version.
bin=$(find /usr/lib/postgresql/*/bin -maxdepth 0 -type d 2>/dev/null | sort -V | tail -n 1)
if [[ -z $bin || ! -x $bin/initdb ]]; then
  initdb_path=$(command -v initdb || true)
  [[ -n $initdb_path ]] ||
    die "no PostgreSQL server under /usr/lib/postgresql/*/bin (scripts/setup.sh --with-postgres installs it)"
  bin=$(dirname "$initdb_path")
fi
major=$("$bin/postgres" --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')

# Root may not run the server: it runs as `postgres`, which owns the directory. The lock
# (fd 9) is closed for it, or the server would hold it for as long as it runs.
as_owner() {
  if ((EUID == 0)); then
    (cd / && runuser -u postgres -- env LC_ALL=C "$@" 9>&-)
  else
    (cd / && env LC_ALL=C "$@" 9>&-)
  fi
}

answering() { "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -t 2; }
ours_running() { [[ -f $data/PG_VERSION ]] && as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }

psql_() {
  PGCONNECT_TIMEOUT=5 "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

ensure_database() {
  local found
  found=$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'") ||
    die "a server answers on 127.0.0.1:$port but does not let user postgres in without a password"
  [[ $found == 1 ]] || psql_ -d postgres -c "CREATE DATABASE $db" >/dev/null
}

start() {
  if answering; then
    ensure_database
    echo "$url"
    return
  fi
  if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (scripts/setup.sh --with-postgres installs PostgreSQL)"
  fi
  mkdir -p "$dir"
  if ((EUID == 0)); then chown postgres: "$dir"; fi
  chmod 700 "$dir"
  as_owner test -w "$dir" ||
    die "the postgres user cannot write $dir (are its parent directories readable?); set AIRLOCK_PG_DIR"

  if [[ -f $data/PG_VERSION && $(<"$data/PG_VERSION") != "$major" ]]; then
    say "$data was made by PostgreSQL $(<"$data/PG_VERSION"); re-creating it for $major"
    if ours_running; then as_owner "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true; fi
    rm -rf "$data"
  fi
  if [[ ! -f $data/PG_VERSION ]]; then
    say "creating a PostgreSQL $major cluster in $data"
    rm -rf "$data"
    as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C \
      --no-sync --no-instructions >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    # A disposable cluster: durability buys nothing, speed does.
    as_owner tee -a "$data/postgresql.conf" >/dev/null <<'EOF'

# --- scripts/postgres.sh: a throwaway test cluster ---
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
max_parallel_workers_per_gather = 0
log_min_messages = warning
EOF
  elif ours_running; then
    # Started earlier on another port, or still starting up: give it a moment, then restart.
    for _ in 1 2 3 4 5; do answering && { ensure_database; echo "$url"; return; }; sleep 0.5; done
    say "the server in $data runs but not on 127.0.0.1:$port; restarting it"
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  fi

  say "starting PostgreSQL $major on 127.0.0.1:$port (data: $data)"
  # Port, address and socket directory on the command line, so they follow the environment.
  if ! as_owner "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir" start >/dev/null; then
    tail -n 20 "$dir/server.log" >&2 || true
    die "PostgreSQL did not start (log: $dir/server.log)"
  fi
  ensure_database
  echo "$url"
}

stop() {
  if ours_running; then
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    say "stopped the server in $data"
  else
    say "no server running from $data"
  fi
}

# One of these at a time: `make test` in two terminals must not initdb twice.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  status) if answering; then echo "$url"; else say "nothing answers on 127.0.0.1:$port"; exit 1; fi ;;
  purge) stop; rm -rf "$dir"; say "removed $dir" ;;
  *) die "usage: $0 [start|stop|status|purge]" ;;
esac
