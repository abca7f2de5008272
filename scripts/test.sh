#!/usr/bin/env bash
# The README's test command: bootstrap, then every test. Privileged tests (namespaces, eBPF) need
# root; without it they skip with a reason, except under CI (CI set), where a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
node_modules/.bin/tsc --noEmit -p .
args=(--reporter ./test/reporter.cjs)
[ -n "${CI:-}" ] && args+=(--forbid-pending)
exec node_modules/.bin/mocha "${args[@]}" "$@" 'test/**/*.test.ts'
