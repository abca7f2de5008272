#!/usr/bin/env bash
# The README's demo command: bootstrap, then examples/demo.ts (needs root: it builds namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "the demo builds network namespaces and needs root" >&2; exit 1; fi
bash scripts/bootstrap.sh
exec node --import tsx examples/demo.ts
