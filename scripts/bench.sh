#!/usr/bin/env bash
# `npm run bench`: bootstrap, then bench/run.ts (needs root: it builds namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "the bench builds network namespaces and needs root" >&2; exit 1; fi
bash scripts/bootstrap.sh
exec node --import tsx bench/run.ts
