#!/usr/bin/env bash
# lmx and llama.cpp on a machine that is not idle (issue 10, docs/BENCHMARKS.md): decode and
# prompt speed at every thread count the machine has, with 0, 1 and 2 busy processes beside
# them (a shell loop each, as a build or a second job would be). A thread pool that spins at
# its barriers waits a scheduler slice whenever one of its threads is off its core; this shows
# what that costs each engine. Run scripts/bench/cpu_speed.sh first (it builds the peers and
# the models). Usage: scripts/bench/busy_machine.sh [ROUNDS]   (MODEL=smollm2 KIND=4bit:Q4_0)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
MODEL=${MODEL:-smollm2}
KIND=${KIND:-4bit:Q4_0}
LOADS=${LOADS:-"0 1 2"}
P=128; G=64; N=2
LMX=${LMX:-target/release/lmx}
ours=models/$MODEL-${KIND%%:*}; theirs=models/$MODEL-${KIND##*:}.gguf
[ -e "$ours" ] && [ -e "$theirs" ] || { echo "error: $ours or $theirs is missing: run scripts/bench/cpu_speed.sh first" >&2; exit 1; }

source scripts/bench/common.sh
busy=()
start_busy() { for _ in $(seq "$1"); do sh -c 'while :; do :; done' & busy+=($!); done; }
stop_busy() { for p in "${busy[@]}"; do kill "$p" 2>/dev/null || true; done; wait "${busy[@]}" 2>/dev/null || true; busy=(); }
trap stop_busy EXIT

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; lmx $(git rev-parse --short HEAD); $ours vs $theirs; -p $P -g $G"
echo
echo "| busy processes | threads | lmx prompt / gen tok/s | llama.cpp prompt / gen tok/s | prompt ratio | gen ratio |"
echo "|---|---|---|---|---|---|"
for load in $LOADS; do
  for t in $(seq "$(nproc)" -1 1); do
    : > /tmp/lmx_busy_ours; : > /tmp/lmx_busy_theirs
    start_busy "$load"
    for r in $(seq "$ROUNDS"); do
      run_ours() { RAYON_NUM_THREADS=$t $LMX benchmark --model "$ours" -p $P -g $G -n $N 2>/dev/null | tail -1 >> /tmp/lmx_busy_ours; }
      run_theirs() { python3 scripts/bench/peer_llama_cpp.py "$theirs" $P $G $N "$t" 2>/dev/null | tail -1 >> /tmp/lmx_busy_theirs; }
      if [ $((r % 2)) = 1 ]; then run_ours; run_theirs; else run_theirs; run_ours; fi
    done
    stop_busy
    op=$(field prompt_tps < /tmp/lmx_busy_ours | median); og=$(field generation_tps < /tmp/lmx_busy_ours | median)
    tp=$(field prompt_tps < /tmp/lmx_busy_theirs | median); tg=$(field generation_tps < /tmp/lmx_busy_theirs | median)
    python3 -c "print(f'| $load | $t | {$op:.0f} / {$og:.1f} | {$tp:.0f} / {$tg:.1f} | {$op/$tp:.2f}x | {$og/$tg:.2f}x |')"
  done
done
