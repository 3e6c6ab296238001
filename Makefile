# Plan limits at the edge. `make run` starts the gateway, `make test` runs every test.
SHELL := /bin/bash
WASM_RAW := target/wasm32-wasip1/release/plan_limits_filter.wasm
WASM := target/plan_limits_filter.wasm

.PHONY: deps build run test lint clean

deps:
	@scripts/install-deps.sh

## build: the optimized filter .wasm Envoy loads
build: deps
	cargo build --release --locked -p plan-limits-filter --target wasm32-wasip1
	wasm-opt -Oz --enable-bulk-memory --enable-sign-ext $(WASM_RAW) -o $(WASM)
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

## run: Redis, webdis, the demo upstreams and Envoy in the foreground; Ctrl-C stops them all
run: build
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo run --locked -q -p host-tests --bin plan-limits-gateway

## test: unit tests of the core, then end-to-end tests through real Envoy and Redis
test: build lint
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo test --locked --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked -p plan-limits-filter --target wasm32-wasip1 -- -D warnings

clean:
	cargo clean
