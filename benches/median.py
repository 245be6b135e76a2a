"""One table row per target: the median of its interleaved rounds (by
req/s), as ratios to nginx as a reverse proxy in the same run.

usage: median.py <conns> <target>:<rps>,<p50_ms>,<p99_ms>,<non2xx> ...
"""
import sys

c = sys.argv[1]
runs = {}
for cell in sys.argv[2:]:
    t, v = cell.split(":", 1)
    rps, p50, p99, bad = v.split(",")
    runs.setdefault(t, []).append((float(rps), float(p50), float(p99), int(bad)))


def median_round(rs):
    return sorted(rs, key=lambda r: r[0])[len(rs) // 2]


prx = median_round(runs["proxy"])
for t, rs in runs.items():
    rps, p50, p99, bad = median_round(rs)
    every = "/".join(f"{r[0]:.0f}" for r in rs)
    print(f"| {t} | {c} | {rps:.0f} | {p50:.3f} | {p99:.3f} | {bad} | "
          f"{rps / prx[0]:.2f}x | {p50 - prx[1]:+.3f} ms | {p99 / prx[2]:.2f}x | {every} |")
