#!/usr/bin/env bash
# Checks that `cargo test` reuses what `cargo build` (and so `cargo run -- demo`) compiled: every
# crate the binary is built from must be the same compiled unit in both builds (same features,
# dependencies with the same features).
#
# A dev-dependency that enables one more feature of a shared crate (fantoccini's second ICU did
# it to `syn`, tempfile's rustix to `bitflags`) makes `cargo test`, right after `cargo run`,
# rebuild that crate and everything above it: up to a hundred crates, minutes on two cores.
# Cargo reports each unit with its file name, whose hash identifies the unit, also for fresh
# units (`--message-format=json`), so the two lists are compared.
# Run after both builds exist, or it builds what is missing. scripts/test.sh runs it after a
# whole-suite run.
set -euo pipefail
cd "$(dirname "$0")/.."

units() {
  cargo "$@" --locked --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact":
        # The file name carries the unit'"'"'s metadata hash (features, dependencies, host or
        # target): the same name in both builds is the same compiled unit, reused.
        print(msg["package_id"], msg["filenames"][0].rsplit("/", 1)[-1])
' | sort
}

build="$(units build --bin fhir-sync)"
test="$(units test --no-run)"
# Units of the binary's build (other than fhir-sync's own) that the test build does not reuse.
# Crates only the tests need are fine.
diverging="$(python3 - "$build" "$test" <<'PY'
import sys
def parse(text):
    units = {}
    for line in text.splitlines():
        package, name = line.rsplit(" ", 1)
        units.setdefault(package, set()).add(name)
    return units
build, test = parse(sys.argv[1]), parse(sys.argv[2])
for package, names in sorted(build.items()):
    if package.startswith("path+"):
        continue
    if names - test.get(package, set()):
        print(f"{package}: the test build compiles {sorted(test.get(package, set()))} instead of {sorted(names)}")
PY
)"
if [[ -n "$diverging" ]]; then
  echo "scripts/check-build-reuse.sh: cargo test compiles these crates again (other features, or dependencies with other features), so it rebuilds them and what depends on them:" >&2
  echo "$diverging" >&2
  echo "find the dev-dependency that enables them with: cargo tree -e features -i <crate>" >&2
  exit 1
fi
echo "scripts/check-build-reuse.sh: cargo test reuses every crate cargo build compiled ($(wc -l <<<"$build") units)"
