#!/usr/bin/env bash
# Installs what tcp-stitch needs on a fresh Debian 12 + Node 20 machine, and nothing already there:
# Debian packages (when root), npm dependencies (npm ci), and the native builds (eBPF object, addon).
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(clang llvm libbpf-dev bpftool make g++ iproute2 ethtool iputils-ping curl iperf3 haproxy python3 util-linux libcap2-bin)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages (run as root to install them): ${missing[*]}" >&2
  fi
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "bootstrap: npm ci"
  npm ci --no-audit --no-fund --loglevel=error   # its postinstall builds the native parts
elif [ ! -f switch/native/build/Release/tcp_stitch_bpf.node ] || [ ! -f sdk/native/build/Release/tcp_stitch_splice.node ] \
  || [ sdk/native/splice_addon.c -nt sdk/native/build/Release/tcp_stitch_splice.node ] || [ switch/native/bpf_addon.c -nt switch/native/build/Release/tcp_stitch_bpf.node ] || { [ -f switch/bpf/Makefile ] && ! make -q -s -C switch/bpf 2>/dev/null; }; then
  node scripts/build-native.js
fi
