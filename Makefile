# Plan limits at the edge. `make run` starts the gateway, `make test` runs every test.
SHELL := /bin/bash
WASM_RAW := target/wasm32-wasip1/wasm/plan_limits_filter.wasm
WASM := target/plan_limits_filter.wasm
WASM_HOSTCALLS := target/plan_limits_filter_redis_hostcalls.wasm
OPT := wasm-opt -Oz --enable-bulk-memory --enable-sign-ext

.PHONY: deps deps-test build build-stock build-hostcalls gateway-files oci run reload test soak adversary bench bench-smoke profile scale lint schema envoy-yaml clean

deps:
	@scripts/install-deps.sh

## deps-test: what only the tests need: Debian's chromium (the usage page) and promtool
deps-test: deps
	@scripts/install-deps.sh --test

## build: the optimized filter .wasm Envoy loads, and the build for the Higress Redis host calls;
## then the files the repository's envoy.yaml names, so `envoy --mode validate -c envoy.yaml`
## passes from the root
build: build-hostcalls build-stock gateway-files

build-stock: deps
	env -u PLAN_LIMITS_BENCH_STOP cargo build --profile wasm --locked -p plan-limits-filter --target wasm32-wasip1
	$(OPT) $(WASM_RAW) -o $(WASM)
	@echo "filter for stock Envoy (webdis): $(WASM) ($$(stat -c %s $(WASM)) bytes)"

build-hostcalls: deps
	env -u PLAN_LIMITS_BENCH_STOP cargo build --profile wasm --locked -p plan-limits-filter --target wasm32-wasip1 --features redis-hostcalls
	$(OPT) $(WASM_RAW) -o $(WASM_HOSTCALLS)
	@echo "filter for Redis host calls: $(WASM_HOSTCALLS) ($$(stat -c %s $(WASM_HOSTCALLS)) bytes)"

## gateway-files: what envoy.yaml names besides itself, in .gateway/ as `make run` keeps it: the
## dev key's JWKS (the key made if none) and the filters' ECDS files (written if absent)
gateway-files: build-stock
	cargo build --locked --profile launcher -p plan-limits-tools --no-default-features --bin plan-limits-gateway
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) target/launcher/plan-limits-gateway --prepare

## oci: both builds packed as OCI image layouts (the compat variant Istio and Envoy Gateway pull)
## in target/oci/; push with `skopeo copy oci:target/oci/plan-limits-filter:TAG docker://...`
oci: build
	cargo build --locked --profile launcher -p plan-limits-tools --no-default-features --bin plan-limits
	target/launcher/plan-limits oci $(WASM) --out target/oci/plan-limits-filter
	target/launcher/plan-limits oci $(WASM_HOSTCALLS) --out target/oci/plan-limits-filter-redis-hostcalls

## run: Redis, webdis, the demo upstream and Envoy in the foreground; Ctrl-C stops them all.
## Compiles only what it runs: the stock .wasm and the launcher (which has no wasmtime).
run: deps
	@echo "==> 1/3 the filter for stock Envoy (release, wasm32)"
	@$(MAKE) --no-print-directory build-stock
	@echo "==> 2/3 the launcher"
	cargo build --locked --profile launcher -p plan-limits-tools --no-default-features --bin plan-limits-gateway
	@echo "==> 3/3 starting the gateway"
	@PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) target/launcher/plan-limits-gateway

## reload: swap the plans.json `make run` was started with (PLANS_JSON, or plans.json), and a
## rebuilt .wasm, into the gateway it started, without restarting Envoy; a plans.json the
## filter refuses is refused here, naming the field.
reload: build-stock
	cargo build --locked --profile launcher -p plan-limits-tools --no-default-features --bin plan-limits
	target/launcher/plan-limits reload --ecds-dir .gateway/envoy-ecds --wasm $(WASM)

## test: unit tests of the core, then end-to-end tests through real Envoy and Redis
test: build lint deps-test
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) PLAN_LIMITS_WASM_HOSTCALLS=$(CURDIR)/$(WASM_HOSTCALLS) \
		cargo test --locked --workspace
	$(MAKE) --no-print-directory bench-smoke

## bench: every case 3 times for 5 s, each right after its baseline, then the growth table;
## prints the tables, writes bench/results.{json,png}; then one request's timeline of the
## limited cases (one busy user, many users, leased, a call per reservation) and the unlimited
## one at 1, 4, 32 and 128 connections (bench/timeline.json)
bench: build
	@.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check matplotlib
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo run --locked -q -p plan-limits-tools --bin plan-limits-bench -- --seconds 5 --repetitions 3
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo run --locked -q -p plan-limits-tools --bin plan-limits-bench -- --seconds 5 \
		--cases limited,limited_one_call_each,limited_leased,limited_many_users,unlimited \
		--timeline 1,4,32,128 --out bench
	.venv/bin/python bench/chart.py bench/results.json bench/results.png
	cargo bench --locked -p plan-limits-core --features testing --bench decision

## profile: where Envoy's CPU goes per request, one layer at a time, in one rotation: Envoy
## alone, jwt_authn, one and two empty wasm filters, our filter stopped after its callbacks
## (`callbacks-only`) and after reading headers and claims (`reads-only`), the whole unlimited
## path; then the 429 and limited paths. CPU per request of every process, and perf's share of
## Envoy's samples by shared object (needs `perf`: apt-get install linux-perf).
PROFILE := target/profile
profile: build
	@command -v perf >/dev/null || { echo "make profile needs perf (apt-get install linux-perf)"; exit 2; }
	@mkdir -p $(PROFILE)
	for stop in sdk:callbacks-only read:reads-only; do \
		PLAN_LIMITS_BENCH_STOP=$${stop%%:*} cargo build -q --profile wasm --locked -p plan-limits-filter \
			--target wasm32-wasip1 --target-dir $(PROFILE)/build && \
		$(OPT) $(PROFILE)/build/wasm32-wasip1/wasm/plan_limits_filter.wasm -o $(PROFILE)/$${stop##*:}.wasm || exit 1; \
	done
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo run --locked -q -p plan-limits-tools --bin plan-limits-bench -- \
		--seconds 5 --repetitions 3 --cases identity,empty_wasm_1,empty_wasm_2,unlimited \
		--compare $(PROFILE)/callbacks-only.wasm,$(PROFILE)/reads-only.wasm \
		--growth-users '' --growth-routes '' --perf 999 --out $(PROFILE)/layers
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo run --locked -q -p plan-limits-tools --bin plan-limits-bench -- \
		--seconds 5 --repetitions 1 --cases denied,limited \
		--growth-users '' --growth-routes '' --perf 999 --out $(PROFILE)/paths

# A one-second run of every case: checks the benchmark works, times nothing. The bench binary
# is the one `cargo test --workspace` built (same features, so no second build of its
# dependencies).
bench-smoke:
	cargo test --locked -q --workspace --no-run
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) target/debug/plan-limits-bench \
		--seconds 1 --repetitions 1 --growth-users 1,10 --growth-routes 10 --out target/bench-smoke
	cargo bench --locked -q -p plan-limits-core --features testing --bench decision -- --test

## soak: 60 s of load (wrk) with Redis restarted in the middle; prints the figures
soak: build
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) cargo test --locked -p plan-limits-tests --test soak -- --ignored --nocapture

## adversary: the long budget of the adversary (issue 17): SEEDS fresh seeds (a count, default 20;
## or a comma list of seeds to run again) of REQUESTS requests each (600) from CLIENTS clients
## (6), with FAULTS faults (5) of FAULT_KINDS (all: redis-pause, redis-restart, webdis-restart,
## envoy-kill, upstream-pause), the ledger invariant checked after each; prints the seeds, the
## requests, the client behaviours and faults covered, and how to reproduce any violation
SEEDS ?= 20
REQUESTS ?= 600
FAULTS ?= 5
CLIENTS ?= 6
FAULT_KINDS ?= all
adversary: build
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) ADVERSARY_SEEDS=$(SEEDS) ADVERSARY_REQUESTS=$(REQUESTS) \
		ADVERSARY_FAULTS=$(FAULTS) ADVERSARY_CLIENTS=$(CLIENTS) ADVERSARY_FAULT_KINDS=$(FAULT_KINDS) \
		cargo test --locked -p plan-limits-tests --test adversary -- --nocapture

## envoy-yaml: envoy.yaml written again from plans.json by Envoy's config builder
## (services/src/envoy.rs), for `make run`'s ports and paths (a test fails when stale)
envoy-yaml:
	cargo build --locked --profile launcher -p plan-limits-tools --no-default-features --bin plan-limits
	target/launcher/plan-limits render envoy plans.json > envoy.yaml.new
	mv envoy.yaml.new envoy.yaml

## schema: plans.schema.json and docs/configuration.md written again from the config's Rust
## types (a test fails when either is stale)
schema:
	cargo run --locked -q -p plan-limits-tools --bin plan-limits -- schema > plans.schema.json.new
	mv plans.schema.json.new plans.schema.json
	cargo run --locked -q -p plan-limits-tools --bin plan-limits -- schema --markdown > docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md

## scale: Redis's figures on a local three-master cluster: keys and bytes per active user,
## bytes per usage event, calls per second one master takes (docs/operating.md, Redis Cluster)
scale: build
	PLAN_LIMITS_WASM=$(CURDIR)/$(WASM) PLAN_LIMITS_WASM_HOSTCALLS=$(CURDIR)/$(WASM_HOSTCALLS) \
		cargo test --locked -p plan-limits-tests --test redis_cluster scale_figures -- --ignored --nocapture

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --workspace --all-targets -- -D warnings
	cargo clippy --locked -p plan-limits-core --all-targets --features testing -- -D warnings
	cargo clippy --locked -p plan-limits-filter --target wasm32-wasip1 -- -D warnings
	cargo clippy --locked -p plan-limits-filter --target wasm32-wasip1 --features redis-hostcalls -- -D warnings

clean:
	cargo clean
