#!/usr/bin/env bash
# Where a prefill's time goes on the GPU machine (issue 11): a random Llama-3.2-1B-shaped bf16
# model (SHAPE=8b: Llama-3-8B, P=4096: that many tokens), `lmx benchmark -p 2048 -g 1` under
# Nsight Systems (nsys, when the toolkit has it)
# or Nsight Compute (ncu), GPU time summed per kernel name; then the prefill speed of the
# 8B shape's stream settings (own stream with and without event tracking, per-thread).
# MODELS="bf16" profiles only the bf16 folder; STREAMS=0 skips the stream settings.
# Usage there: scripts/cuda/prefill_profile.sh   (results in $OUT/prefill.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup prefill prefill.txt
log "# CUDA prefill profile, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
SH=${SHAPE:-1b}; P=${P:-2048}
SHAPE=$SH BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-$SH" 2>&1 | tail -1 | tee -a "$RES"
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
run() { "$LMX" benchmark --model "$W/llama-$SH-$1" --device cuda -p $P -g 1 -n 1 2>&1 | tail -1; }
log "$SH bf16 prefill $P: $(run bf16)"
log "$SH 4bit prefill $P: $(run 4bit)"
for m in ${MODELS:-bf16 4bit}; do
  if [ -n "$NSYS" ]; then
    "$NSYS" profile -o "$W/p-$m" --force-overwrite true "$LMX" benchmark --model "$W/llama-$SH-$m" --device cuda -p $P -g 1 -n 1 > /dev/null 2>&1
    log "## $m: nsys cuda_gpu_kern_sum (warm-up + 1 trial: two prefills of 2048)"
    "$NSYS" stats --report cuda_gpu_kern_sum --format csv "$W/p-$m.nsys-rep" 2>/dev/null | python3 -c "
import csv, sys
rows = [r for r in csv.reader(sys.stdin) if len(r) > 8]
h = rows[0]; rows = rows[1:]
it = h.index('Total Time (ns)'); ic = h.index('Instances'); iname = h.index('Name')
tot = sum(float(r[it]) for r in rows)
print(f'total GPU kernel time {tot/1e6:.1f} ms')
for r in sorted(rows, key=lambda r: -float(r[it]))[:25]: print(f'{float(r[it])/1e6:9.2f} ms {int(r[ic]):6d} x  {r[iname][:90]}')
" | tee -a "$RES"
    "$NSYS" stats --report cuda_api_sum --format csv "$W/p-$m.nsys-rep" 2>/dev/null | head -12 | tee -a "$RES"
  else
    log "## $m: ncu (no nsys)"
    ncu --metrics gpu__time_duration.sum --csv "$LMX" benchmark --model "$W/llama-$SH-$m" --device cuda -p $P -g 1 -n 1 2>/dev/null > "$W/p-$m.csv"
    python3 -c "
import csv, sys, collections
rows = list(csv.reader(open('$W/p-$m.csv'))); h = None; g = collections.defaultdict(lambda: [0, 0.0])
for r in rows:
    if r and r[0] == 'ID': h = r; continue
    if h and len(r) == len(h):
        d = dict(zip(h, r)); k = g[d['Kernel Name'][:80]]; k[0] += 1; k[1] += float(d['Metric Value'].replace(',', ''))
tot = sum(v[1] for v in g.values())
print(f'total GPU kernel time {tot/1e6:.1f} ms')
for n, (c, t) in sorted(g.items(), key=lambda kv: -kv[1][1])[:25]: print(f'{t/1e6:9.2f} ms {c:6d} x  {n}')
" | tee -a "$RES"
  fi
done
[ "${STREAMS:-1}" = 0 ] || for mode in own own-tracked per-thread; do log "$SH bf16 prefill $P, stream $mode: $(LMX_CUDA_STREAM=$mode run bf16)"; done
