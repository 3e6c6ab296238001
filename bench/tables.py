#!/usr/bin/env python3
"""Prints docs/performance.md's tables from the bench's results: the cases (`make bench`'s
bench/results.json), the CPU each process used per request, how the cost grows; given a
second file, `make profile`'s layers (bench/profile.json); given a third, one request's
timeline (`plan-limits-bench --timeline`, bench/timeline.json)."""
import json
import sys

results = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"))
layers = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else None
timeline = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None


def spread(stat, fmt="{:.2f}"):
    return f'{fmt.format(stat["min"])}–{fmt.format(stat["max"])}'


def target(case):
    if case.get("target_ratio") is None:
        return "–"
    return f'≥ {case["target_ratio"]}: **{"met" if case.get("met") else "missed"}**'


print("| case | ratio: median (lowest–highest) | req/s (median) | added p50 at 1 conn. (median, lowest–highest) | target |")
print("|---|---|---|---|---|")
for c in results["cases"]:
    a = c["added_p50_us_1conn"]
    print(
        f'| {c["label"]} | **{c["ratio"]["median"]:.2f}** ({spread(c["ratio"])}) | {c["rps"]["median"]:,.0f} '
        f'| {a["median"]:+.0f} µs ({a["min"]:+.0f} to {a["max"]:+.0f}) | {target(c)} |'
    )

print()
processes = ["envoy", "redis", "webdis", "nginx", "wrk"]
# Envoy's CPU per request over the floor: jwt_authn and two empty wasm filters, the least any
# proxy-wasm filter behind jwt_authn costs, measured in the same run.
floor = next((c for c in results["cases"] if c["name"] == "empty_wasm_2"), None)
floor_us = (floor.get("cpu_us_per_request") or {}).get("envoy") if floor else None
print("| case | " + " | ".join(processes) + " | Envoy's baseline | Envoy over the floor |")
print("|---|" + "---|" * (len(processes) + 2))
for c in results["cases"]:
    cpu = c.get("cpu_us_per_request") or {}
    base = (c.get("baseline_cpu_us_per_request") or {}).get("envoy", 0)
    cells = " | ".join(f'{cpu.get(p, 0):.0f}' for p in processes)
    over = "–"
    if floor_us is not None and c["name"].split("@")[0] in ("limited", "limited_eventual", "limited_leased", "limited_many_users", "limited_one_call_each", "unlimited", "denied"):
        over = f'{cpu.get("envoy", 0) - floor_us:+.0f} µs'
    print(f'| {c["label"]} | {cells} | {base:.0f} | {over} |')

print()
print("| growth | req/s | ratio to a baseline just before | added p50 at 1 conn. | Envoy heap | Redis memory |")
print("|---|---|---|---|---|---|")
for g in results.get("growth", []):
    print(
        f'| {g["label"]} | {g["rps"]:,.0f} | {g["ratio"]:.2f} | {g["added_p50_us_1conn"]:+.0f} µs '
        f'| {g["envoy_allocated_bytes"] / 1e6:.1f} MB | {g["redis_used_memory_bytes"] / 1e6:.1f} MB |'
    )

if layers:
    print()
    print("| layer | Envoy CPU per request, µs (median) | of which the wasm code V8 compiled (perf) | ratio (median, lowest–highest) |")
    print("|---|---|---|---|")
    base = [c for c in layers["cases"]][0].get("baseline_cpu_us_per_request", {}).get("envoy", 0)
    print(f"| Envoy alone (the baseline) | {base:.0f} | – | 1 |")
    order = ["identity", "empty_wasm_1", "empty_wasm_2", "unlimited@callbacks-only", "unlimited@reads-only", "unlimited"]
    by_name = {c["name"]: c for c in layers["cases"]}
    for name in order:
        c = by_name.get(name)
        if not c:
            continue
        envoy = c["cpu_us_per_request"]["envoy"]
        runs = [r for r in layers["runs"] if r["case"] == name]
        jit = sorted(r.get("envoy_samples_percent", {}).get("wasm (V8 JIT)", 0) for r in runs)
        jit_share = jit[len(jit) // 2] if jit else 0
        print(f'| {c["label"]} | {envoy:.0f} | {jit_share:.0f} % ({envoy * jit_share / 100:.0f} µs) '
              f'| {c["ratio"]["median"]:.2f} ({spread(c["ratio"])}) |')

if timeline:
    print()
    print("| case | connections | req/s | client waited, p50 (wrk) | in Envoy, p50 | before the upstream: p50 (p90) "
          "| upstream | after the upstream: p50 (p90) | filter's round trip p50: reserve, settle "
          "| Redis per call | Redis calls per request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in timeline["rows"]:
        ph = r["phases"]
        def p50(name):
            v = ph.get(name, {}).get("p50_us")
            return "–" if v is None or v != v else f"{v:,.0f} µs"
        def both(name):
            v = ph.get(name, {})
            if v.get("p50_us") is None or v["p50_us"] != v["p50_us"]:
                return "–"
            return f'{v["p50_us"]:,.0f} µs ({v["p90_us"]:,.0f})'
        def trip(call):
            v = r.get("filter_round_trip_us", {}).get(call, {}).get("p50_us")
            return "–" if v is None else f"{v:,.0f}"
        print(f'| {r["label"]} | {r["connections"]} | {r["rps"]:,.0f} | {r["wrk_p50_us"]:,.0f} µs | {p50("in_envoy")} '
              f'| {both("before_upstream")} | {p50("upstream")} | {both("after_upstream")} '
              f'| {trip("reserve")}, {trip("settle")} µs | {r["redis_us_per_call"]:.0f} µs | {r["redis_calls_per_request"]:.2f} |')
