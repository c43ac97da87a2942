"""Per-kernel GPU time of one decode step from an `ncu --metrics gpu__time_duration.sum --csv`
log of `lmx generate` (scripts/cuda/profile.sh): the kernels between the last two launches of
the model's head (the longest kernel: the vocabulary-wide product), grouped by name and grid,
largest first.
Usage: python3 scripts/cuda/ncu_summary.py LOG.csv"""
import collections
import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
header, data = None, []
for r in rows:
    if r and r[0] == "ID":
        header = r
    elif header and len(r) == len(header):
        data.append(dict(zip(header, r)))
times = [float(d["Metric Value"].replace(",", "")) for d in data]
# The head is the longest kernel of a step; the greedy pick after it does not count as one.
times = [0.0 if "pick" in d["Kernel Name"] else t for d, t in zip(data, times)]
most = max(times)
heads = [i for i, t in enumerate(times) if t > most / 2]
if len(heads) < 2:
    sys.exit(f"{sys.argv[1]}: fewer than two steps found")
step = data[heads[-2] + 1 : heads[-1] + 1]
groups = collections.defaultdict(lambda: [0, 0.0])
for d in step:
    g = groups[(d["Kernel Name"][:60], d["Grid Size"], d["Block Size"])]
    g[0] += 1
    g[1] += float(d["Metric Value"].replace(",", "")) / 1e3
total = sum(v[1] for v in groups.values())
print(f"one decode step: {len(step)} kernels, {total / 1e3:.3f} ms of kernel time")
for (name, grid, block), (n, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
    print(f"{n:5d} x {us / n:8.2f} us = {us:9.1f} us  {name} grid {grid} block {block}")
