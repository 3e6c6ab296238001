#!/usr/bin/env python3
"""Draws bench/results.json as bench/results.png: throughput relative to bare Envoy, and the
latency each case adds at one connection."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

source = sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"
target = sys.argv[2] if len(sys.argv) > 2 else "bench/results.png"
data = json.load(open(source))
cases = data["cases"]
names = [c["label"] for c in cases]
ratios = [c["ratio"] for c in cases]
added = [max(0, c["added_p50_us_1conn"]) for c in cases]

fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
bars = left.barh(names, ratios, color=["#888888" if c["name"] in ("baseline", "local_ratelimit") else "#2a7ab9" for c in cases])
for bar, c in zip(bars, cases):
    left.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f'{c["ratio"]:.2f}× ({c["rps"]:.0f}/s)', va="center", fontsize=8)
    if c.get("target_ratio"):
        left.plot([c["target_ratio"]] * 2, [bar.get_y(), bar.get_y() + bar.get_height()], color="red", linewidth=2)
left.set_xlabel("requests/s relative to Envoy without filters (red: target)")
left.set_xlim(0, max(ratios + [1.0]) * 1.35)
left.invert_yaxis()
right.barh(names, added, color="#2a7ab9")
for i, c in enumerate(cases):
    right.text(added[i] + 1, i, f'{c["added_p50_us_1conn"]:+.0f} µs p50, {c["added_p99_us_1conn"]:+.0f} µs p99', va="center", fontsize=8)
right.set_xlabel("latency added at one connection (p50, µs)")
right.set_xlim(0, max(added + [10]) * 1.6)
right.invert_yaxis()
right.set_yticklabels([])
m = data["machine"]
fig.suptitle(f'plan-limits filter, {data["seconds"]} s per case, {data["connections"]} connections, '
             f'{m["cpus"]} cores shared by wrk, Envoy, nginx, webdis and Redis ({m["cpu"]})', fontsize=9)
fig.tight_layout()
fig.savefig(target, dpi=110)
print(f"wrote {target}")
