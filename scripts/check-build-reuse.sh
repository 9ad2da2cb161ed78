#!/usr/bin/env bash
# Checks that `cargo test` reuses what `cargo build` (and so `cargo run -- demo`) compiled: every
# crate the binary is built from must be compiled with the same features in both builds.
#
# A dev-dependency that enables one more feature of a shared crate (fantoccini's second ICU did
# it to `syn`) makes `cargo test`, right after `cargo run`, rebuild that crate and everything
# above it: about a hundred crates, minutes on two cores. Cargo reports each compiled unit with
# its features (`--message-format=json`, also for fresh units), so the two lists are compared.
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
        print(msg["package_id"], msg["target"]["name"], ",".join(msg["features"]))
' | sort
}

build="$(units build --bin fhir-sync)"
test="$(units test --no-run)"
# Units of the binary's build that the test build compiles differently (same crate and target,
# other features). Units only the tests need are fine.
diverging="$(python3 - "$build" "$test" <<'PY'
import sys
def parse(text):
    units = {}
    for line in text.splitlines():
        package, target, features = line.rsplit(" ", 2)
        units.setdefault((package, target), set()).add(features)
    return units
build, test = parse(sys.argv[1]), parse(sys.argv[2])
for key, features in sorted(build.items()):
    if key in test and features - test[key]:
        print(f"{key[0]} ({key[1]}): build {sorted(features)} test {sorted(test[key])}")
PY
)"
if [[ -n "$diverging" ]]; then
  echo "scripts/check-build-reuse.sh: cargo test compiles these crates with other features than cargo build, so it rebuilds them (and what depends on them):" >&2
  echo "$diverging" >&2
  echo "find the dev-dependency that enables them with: cargo tree -e features -i <crate>" >&2
  exit 1
fi
echo "scripts/check-build-reuse.sh: cargo test reuses every crate cargo build compiled ($(wc -l <<<"$build") units)"
