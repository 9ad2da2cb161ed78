#!/usr/bin/env bash
# Runs the test suite against a real PostgreSQL server: `scripts/test.sh [cargo test arguments]`.
#
# The server is chosen the way `fhir-sync demo` chooses it (src/localpg.rs): DATABASE_URL if set,
# else the server on 127.0.0.1:5432 if it accepts a connection as `postgres`, else a throwaway
# cluster made with initdb in a temporary directory, started on a free loopback port and removed on
# exit. The tests create and drop their own databases through DATABASE_URL. This script never stops
# or changes a server it did not start.
#
# DATABASE_URL is exported for the tests only: .cargo/config.toml sets SQLX_OFFLINE=true, so sqlx's
# query macros never check queries against it while compiling.
#
# The status page test (tests/it/ops_page.rs) drives headless Chromium through chromedriver. When
# either is missing and the script runs as root with apt-get (CI on a fresh machine), it installs
# Debian's chromium and chromium-driver packages quietly (about 40 s with apt-get update on a
# 2-core machine); otherwise it stops and says what to install.
#
# The outside-server test (tests/it/outside.rs) installs its server itself, from PyPI into
# target/outside-servers/ with scripts/install-sekmet.sh (pinned with hashes; 21 to 36 s the first
# time, then cached), so a filtered `cargo test` gets it too; this script needs no step for it.
#
# FHIR_SYNC_TEST_PG_PORT (default 5432) moves the probe, which exercises the throwaway-cluster path
# on a machine whose own server is running: FHIR_SYNC_TEST_PG_PORT=5499 scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

probe_port="${FHIR_SYNC_TEST_PG_PORT:-5432}"

fail() {
  echo "scripts/test.sh: $*" >&2
  exit 1
}

# Prints the path of a PostgreSQL program: PATH first, then the highest version under
# /usr/lib/postgresql, where Debian installs the server programs without putting them on PATH.
pg_bin() {
  if command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
    return 0
  fi
  local dir
  while IFS= read -r dir; do
    if [[ -x "$dir/$1" ]]; then
      echo "$dir/$1"
      return 0
    fi
  done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r)
  return 1
}

# A real connection, like the demo's probe: pg_isready alone would also accept a server that then
# rejects the `postgres` user. -w never prompts for a password (CI has no stdin).
server_accepts() {
  local psql
  psql="$(pg_bin psql)" || return 1
  PGCONNECT_TIMEOUT=3 "$psql" -w -X -q -A -t -h 127.0.0.1 -p "$probe_port" -U postgres -d postgres \
    -c 'select 1' >/dev/null 2>&1
}

# A loopback port nobody listens on. Ports are drawn below Linux's ephemeral range (32768-60999) so
# outgoing connections do not take them meanwhile; another server still could between this check and
# postgres binding it, and then pg_ctl fails with the log saying so.
free_port() {
  local port _
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  fail "could not find a free port on 127.0.0.1"
}

cluster_dir=""
as_owner=()
pg_ctl=""

stop_throwaway_cluster() {
  # Immediate shutdown: the data is about to be deleted, so there is nothing to flush.
  if [[ -n "$pg_ctl" && -f "$cluster_dir/data/postmaster.pid" ]]; then
    "${as_owner[@]}" "$pg_ctl" -D "$cluster_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$cluster_dir"
}

start_throwaway_cluster() {
  local initdb port
  initdb="$(pg_bin initdb)" ||
    fail "no PostgreSQL server accepts connections on 127.0.0.1:$probe_port and initdb is not on PATH or in /usr/lib/postgresql/*/bin; install PostgreSQL or set DATABASE_URL"
  # pg_ctl from the same installation as initdb, so one major version creates and runs the cluster.
  pg_ctl="$(dirname "$initdb")/pg_ctl"
  [[ -x "$pg_ctl" ]] || pg_ctl="$(pg_bin pg_ctl)" || fail "could not find pg_ctl next to $initdb or on PATH"

  cluster_dir="$(mktemp -d "${TMPDIR:-/tmp}/fhir-sync-test-pg.XXXXXX")"
  trap stop_throwaway_cluster EXIT
  if [[ "$(id -u)" -eq 0 ]]; then
    # initdb and postgres refuse to run as root; Debian's packages create the `postgres` account.
    id postgres >/dev/null 2>&1 || fail "running as root, but there is no postgres user to run the cluster as"
    as_owner=(runuser -u postgres --)
    chown postgres: "$cluster_dir"
    "${as_owner[@]}" test -w "$cluster_dir" ||
      fail "the postgres user cannot write to $cluster_dir; set TMPDIR to a directory it can reach"
  fi

  # Run from the cluster directory: after switching user the caller's directory may be unreadable.
  cd "$cluster_dir"
  # C locale: initdb fails outright when LANG names a locale the machine lacks (common in containers).
  "${as_owner[@]}" "$initdb" -D "$cluster_dir/data" --username=postgres --auth=trust \
    --encoding=UTF8 --locale=C >"$cluster_dir/initdb.log" 2>&1 ||
    { cat "$cluster_dir/initdb.log" >&2; fail "initdb failed"; }

  port="$(free_port)"
  # -l keeps the server's output out of our stdout; -w returns once the server accepts connections.
  "${as_owner[@]}" "$pg_ctl" -D "$cluster_dir/data" -l "$cluster_dir/server.log" -w \
    -o "-p $port -k '$cluster_dir' -c listen_addresses=127.0.0.1" start >/dev/null ||
    { tail -n 20 "$cluster_dir/server.log" >&2; fail "the throwaway cluster did not start"; }
  cd - >/dev/null

  DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "scripts/test.sh: using a throwaway PostgreSQL cluster ($("$pg_ctl" --version)) on 127.0.0.1:$port in $cluster_dir"
}

ensure_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  local install="apt-get install -y chromium chromium-driver"
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    fail "the status page test needs headless Chromium and chromedriver, which are not on PATH; install them (on Debian: sudo $install), or run this script as root to have it install them"
  fi
  echo "scripts/test.sh: installing chromium and chromium-driver for the status page test"
  local started=$SECONDS log
  log="$(mktemp "${TMPDIR:-/tmp}/fhir-sync-apt.XXXXXX")"
  # Waits for the dpkg lock instead of failing when another apt-get is running. The output is
  # shown only when something goes wrong.
  { DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update &&
    DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 install -y \
      chromium chromium-driver; } >"$log" 2>&1 ||
    { tail -n 20 "$log" >&2; rm -f "$log"; fail "could not install chromium and chromium-driver ($install); install them and run again"; }
  rm -f "$log"
  echo "scripts/test.sh: installed $(chromium --version 2>/dev/null || echo chromium) in $((SECONDS - started)) s"
}

ensure_browser

if [[ -n "${DATABASE_URL:-}" ]]; then
  # Only the host part is printed: the URL may carry a password.
  echo "scripts/test.sh: using PostgreSQL from DATABASE_URL (host $(sed -E 's#^[^:]+://([^@/]*@)?([^/?]*).*#\2#' <<<"$DATABASE_URL"))"
elif server_accepts; then
  DATABASE_URL="postgres://postgres@127.0.0.1:$probe_port/postgres"
  echo "scripts/test.sh: using the PostgreSQL server running on 127.0.0.1:$probe_port"
else
  start_throwaway_cluster
fi
export DATABASE_URL

cargo test --locked "$@"
# After the whole suite, the build the quick start's `cargo run -- demo` made must still be the
# one the tests reuse (no dev-dependency enabling more features of a shared crate).
# The container and Kubernetes files cannot be run here (no container engine); they are
# checked against the binary the tests just built instead.
if [[ $# -eq 0 ]]; then
  scripts/check-build-reuse.sh
  if ! python3 -c 'import yaml' 2>/dev/null; then
    echo "scripts/test.sh: installing PyYAML for scripts/check-deploy.py"
    python3 -m pip install --quiet pyyaml ||
      fail "scripts/check-deploy.py needs PyYAML: pip install pyyaml"
  fi
  python3 scripts/check-deploy.py target/debug/fhir-sync
fi
