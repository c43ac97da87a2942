"""Kernel time per step from an `ncu --metrics gpu__time_duration.sum --csv` log of a whole
run: every kernel summed by name and divided by the number of steps, largest first, with the
launch count per step. Usage: python3 scripts/cuda/kernel_sums.py LOG.csv STEPS [TOP]"""
import collections
import csv
import sys

steps = int(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
header, groups = None, collections.defaultdict(lambda: [0, 0.0])
for r in csv.reader(open(sys.argv[1])):
    if r and r[0] == "ID":
        header = r
    elif header and len(r) == len(header):
        d = dict(zip(header, r))
        g = groups[d["Kernel Name"][:70]]
        g[0] += 1
        g[1] += float(d["Metric Value"].replace(",", "")) / 1e3
n = sum(v[0] for v in groups.values())
total = sum(v[1] for v in groups.values())
print(f"{n / steps:.0f} kernels and {total / steps / 1e3:.1f} ms of kernel time per step ({n} kernels in all)")
for name, (k, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"{k / steps:7.0f} x {us / k:8.2f} us = {us / steps / 1e3:8.2f} ms  {name}")
