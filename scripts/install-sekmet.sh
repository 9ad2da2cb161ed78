#!/usr/bin/env bash
# Installs the outside FHIR server the tests sync from (tests/it/outside.rs, docs/outside-servers.md):
# `scripts/install-sekmet.sh [DIR]` puts sekmet-fhir 0.1.1 and its dependencies, exactly as pinned
# with hashes in tests/outside/sekmet/requirements.txt, into a virtual environment at DIR (default
# target/outside-servers/sekmet), from PyPI with pip. The test helper runs it before each test that
# starts the server, so `cargo test` alone is enough on a fresh machine.
#
# Cached: the environment records the hash of the requirements file and the Python it was made
# with, and a second run with both unchanged returns at once without touching the network. An
# install that was interrupted has no record and is redone from scratch. Concurrent runs (two test
# processes) wait for each other through a lock file next to the environment.
#
# Needs Python 3.11 or newer (FHIR_SYNC_TEST_PYTHON names a particular interpreter) and PyPI,
# or a pip cache that holds the pinned files. Wheels only: nothing is compiled. Without network it
# fails within about a minute and says so; the test then fails with this output.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements="tests/outside/sekmet/requirements.txt"
dir="${1:-target/outside-servers/sekmet}"
venv="$dir/venv"
stamp="$venv/.fhir-sync-installed"

fail() {
  echo "scripts/install-sekmet.sh: $*" >&2
  exit 1
}

# The first interpreter of at least 3.11: sekmet-fhir requires it, and the pins were resolved on it.
find_python() {
  local candidate
  for candidate in ${FHIR_SYNC_TEST_PYTHON:-} python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

python="$(find_python)" ||
  fail "the outside-server test needs Python 3.11 or newer (python3.11 or python3 on PATH, or FHIR_SYNC_TEST_PYTHON); on Debian: apt-get install python3 python3-venv"

mkdir -p "$dir"
# The lock is released when this script exits (the descriptor closes). flock is in util-linux;
# without it concurrent first runs could collide, which only matters for parallel test processes.
exec 9>"$dir/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

want="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/sekmet" ]]; then
  exit 0
fi

started=$SECONDS
echo "scripts/install-sekmet.sh: installing sekmet-fhir into $venv from $requirements ($("$python" --version))" >&2
rm -rf "$venv"
pip=()
if "$python" -m venv "$venv" >/dev/null 2>&1; then
  pip=("$venv/bin/python" -m pip)
else
  # Debian's python3 without python3-venv cannot make an environment with pip in it; one without
  # pip, filled by the interpreter's own pip (22.3 and later can target another environment).
  rm -rf "$venv"
  "$python" -m venv --without-pip "$venv" >/dev/null 2>&1 ||
    fail "could not create a virtual environment with $python (on Debian: apt-get install python3-venv)"
  "$python" -m pip --version >/dev/null 2>&1 ||
    fail "$python has neither venv with pip nor pip itself (on Debian: apt-get install python3-venv)"
  pip=("$python" -m pip --python "$venv/bin/python")
fi

# --no-deps with --require-hashes: every package is in the file, at one version, with its hashes,
# so pip resolves nothing. Short timeouts so that a machine without network fails in about a
# minute rather than after pip's default retries.
log="$dir/install.log"
if ! "${pip[@]}" install --no-input --disable-pip-version-check --require-hashes --no-deps \
  --only-binary=:all: --timeout 20 --retries 2 -r "$requirements" >"$log" 2>&1; then
  tail -n 15 "$log" >&2
  fail "could not install the pinned sekmet-fhir and its dependencies from PyPI (full log: $log); the outside-server test needs PyPI, or a pip cache holding these files"
fi
[[ -x "$venv/bin/sekmet" ]] || fail "pip installed the requirements but $venv/bin/sekmet is missing"
echo "$want" >"$stamp"
echo "scripts/install-sekmet.sh: installed $("$venv/bin/sekmet" --version) in $((SECONDS - started)) s" >&2
