#!/usr/bin/env python3
"""Draws bench/results.json as bench/results.png: each case's throughput relative to its
baseline (median of the repetitions, whiskers from the lowest to the highest, every
repetition a dot), the latency it adds at one connection, and how the cost grows."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source = sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"
target = sys.argv[2] if len(sys.argv) > 2 else "bench/results.png"
data = json.load(open(source))
cases = data["cases"]
runs = data["runs"]
names = [c["label"] for c in cases]
growth = data.get("growth", [])

fig, axes = plt.subplots(1, 3 if growth else 2, figsize=(19 if growth else 13, 5.5))
left, right = axes[0], axes[1]


def spread(stat):
    return [stat["median"] - stat["min"]], [stat["max"] - stat["median"]]


for i, c in enumerate(cases):
    reference = not c.get("target_ratio")  # Envoy alone, its own filters, empty wasm filters
    colour = "#888888" if reference else "#2a7ab9"
    r = c["ratio"]
    left.barh(i, r["median"], color=colour, xerr=spread(r), ecolor="black", capsize=3)
    dots = [run["ratio"] for run in runs if run["case"] == c["name"]]
    left.plot(dots, [i] * len(dots), "o", color="black", markersize=2.5)
    left.text(r["max"] + 0.02, i, f'{r["median"]:.2f}× ({c["rps"]["median"]:.0f}/s)', va="center", fontsize=8)
    if c.get("target_ratio"):
        met = "green" if c.get("met") else "red"
        left.plot([c["target_ratio"]] * 2, [i - 0.4, i + 0.4], color=met, linewidth=2)
    a = c["added_p50_us_1conn"]
    right.barh(i, max(0, a["median"]), color=colour, xerr=spread(a), ecolor="black", capsize=3)
    right.text(max(0, a["max"]) + 5, i, f'{a["median"]:+.0f} µs', va="center", fontsize=8)
left.set_yticks(range(len(names)), names)
left.set_xlabel("requests/s relative to its baseline, run just before it (target: green met, red missed)")
left.set_xlim(0, max([c["ratio"]["max"] for c in cases] + [1.0]) * 1.3)
left.invert_yaxis()
right.set_yticks(range(len(names)), [])
right.set_xlabel("latency added at one connection (p50, µs; whiskers: lowest to highest)")
right.set_xlim(0, max([max(0, c["added_p50_us_1conn"]["max"]) for c in cases] + [10]) * 1.4)
right.invert_yaxis()

if growth:
    g = axes[2]
    labels = [row["label"] for row in growth]
    g.barh(range(len(growth)), [row["ratio"] for row in growth], color="#2a7ab9")
    for i, row in enumerate(growth):
        g.text(row["ratio"] + 0.01, i,
               f'{row["ratio"]:.2f}×  Envoy {row["envoy_allocated_bytes"] / 1e6:.0f} MB, Redis {row["redis_used_memory_bytes"] / 1e6:.0f} MB',
               va="center", fontsize=8)
    g.set_yticks(range(len(growth)), labels)
    g.set_xlim(0, 1.6)
    g.set_xlabel("how cost grows: ratio to a baseline run just before")
    g.invert_yaxis()

m = data["machine"]
fig.suptitle(f'plan-limits filter: {data["repetitions"]} repetitions of {data["seconds"]} s per case, each after its baseline, '
             f'{data["connections"]} connections, {m["cpus"]} cores shared by wrk, Envoy, nginx, webdis and Redis ({m["cpu"]})', fontsize=9)
fig.tight_layout()
fig.savefig(target, dpi=110)
print(f"wrote {target}")
