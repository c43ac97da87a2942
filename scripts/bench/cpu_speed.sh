#!/usr/bin/env bash
# lmx beside llama.cpp on the CPU, in one run from a fresh clone (issue 10, docs/BENCHMARKS.md):
# SmolLM2-135M and a Llama-3.2-1B-shaped model with random weights, MLX 4-bit / 8-bit vs
# llama.cpp Q4_0 / Q8_0 of the same weights, lmx on those same Q4_0 / Q8_0 GGUF files (kept
# packed), bf16 vs BF16, f32 vs F32, both on the default model's own Q4_1 GGUF, both on the
# same Q4_K_M and F16 GGUFs (llama.cpp's own quantizer), and MLX 6-bit vs Q6_K, at 1 and 2 threads.
# 128-token prompt, 64 generated tokens; every figure is the median over ROUNDS rounds of 3
# trials, lmx and llama.cpp alternating first. The roofline column is weights read per token
# over the measured read bandwidth (scripts/bench/membw.rs) at that thread count.
#
# It builds what it needs: lmx (release), llama.cpp (pip llama-cpp-python, compiled here;
# -mno-amx-* on CPUs with AMX, where the native build crashes), the memory probe, and the
# model folders and GGUFs under models/ (kept between runs).
# Usage: scripts/bench/cpu_speed.sh [ROUNDS]     (ROUNDS defaults to 2; MODELS="smollm2" to skip the 1B;
#        KINDS="4bit 8bit" for those formats only; THREADS="2" for one thread count)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-2}
MODELS=${MODELS:-"smollm2 llama-1b-random"}
KINDS=${KINDS:-"4bit Q4_0.gguf 8bit Q8_0.gguf bf16 f32 Q4_1.gguf Q4_K_M.gguf F16.gguf 6bit"}
THREADS=${THREADS:-"1 2"}
P=128; G=64; N=3

if ! python3 -c "import llama_cpp, gguf" 2>/dev/null; then
  if grep -qw amx_tile /proc/cpuinfo; then
    export CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
  fi
  echo "Building llama.cpp (pip install llama-cpp-python==0.3.36 gguf numpy; several minutes)..." >&2
  python3 -m pip install --quiet "llama-cpp-python==0.3.36" "gguf==0.19.0" numpy
fi
[ -x target/release/lmx ] || cargo build --release
[ -x target/membw ] || rustc -O -C target-cpu=native scripts/bench/membw.rs -o target/membw
LMX=target/release/lmx

# Models (each step skipped when its output exists).
scripts/fetch-default-model.sh
SRC=models/SmolLM2-135M-Instruct.Q4_1.gguf
# The default model itself, the "smollm2 Q4_1.gguf" row: both run this very file.
[ -e models/smollm2-Q4_1.gguf ] || ln -s SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-Q4_1.gguf
[ -d models/smollm2-f32 ] || $LMX convert --gguf $SRC --mlx-path models/smollm2-f32
[ -d models/smollm2-bf16 ] || $LMX convert --hf-path models/smollm2-f32 --dtype bfloat16 --mlx-path models/smollm2-bf16
for kind in f32 bf16 q4_0 q8_0; do
  up=$(echo $kind | tr a-z A-Z)
  [ -f models/smollm2-$up.gguf ] || python3 scripts/bench/make_gguf.py $SRC models/smollm2-$up.gguf $kind
done
if [[ " $MODELS " == *" llama-1b-random "* ]] && [ ! -f models/llama-1b-random-BF16.gguf ]; then
  python3 scripts/bench/make_random_llama.py $SRC models/smollm2-bf16 models/llama-1b-random
fi
# A model's bf16 folder: the 1B model's is the one make_random_llama.py writes.
bf16_dir() { if [ "$1" = llama-1b-random ]; then echo models/llama-1b-random; else echo "models/$1-bf16"; fi; }
for m in $MODELS; do
  base=$(bf16_dir $m)
  [ -d models/$m-4bit ] || $LMX convert --hf-path $base -q --mlx-path models/$m-4bit
  [ -d models/$m-8bit ] || $LMX convert --hf-path $base -q --q-bits 8 --mlx-path models/$m-8bit
  [ -d models/$m-6bit ] || $LMX convert --hf-path $base -q --q-bits 6 --mlx-path models/$m-6bit
  # K-quants and F16 by llama.cpp's own quantizer, from the model's F32 / BF16 GGUF.
  full=models/$m-F32.gguf; [ -f $full ] || full=models/$m-BF16.gguf
  for kind in Q4_K_M Q6_K F16; do
    [ -f models/$m-$kind.gguf ] || python3 scripts/bench/make_kquant_gguf.py $full models/$m-$kind.gguf $(echo $kind | tr A-Z a-z)
  done
done

source scripts/bench/common.sh
bytes() { du -cbL "$@" | tail -1 | cut -f1; }

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; lmx $(git rev-parse --short HEAD); llama-cpp-python $(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
echo
echo "| model | threads | lmx prompt / gen tok/s | llama.cpp prompt / gen tok/s | prompt ratio | gen ratio | lmx gen vs roofline |"
echo "|---|---|---|---|---|---|---|"
for m in $MODELS; do
  pairs="4bit:Q4_0 Q4_0.gguf:Q4_0 8bit:Q8_0 Q8_0.gguf:Q8_0 bf16:BF16 Q4_K_M.gguf:Q4_K_M F16.gguf:F16 6bit:Q6_K"
  [ $m = smollm2 ] && pairs="$pairs f32:F32 Q4_1.gguf:Q4_1"
  for pair in $pairs; do
    [[ " $KINDS " == *" ${pair%%:*} "* ]] || continue
    ours=models/$m-${pair%%:*}; theirs=models/$m-${pair##*:}.gguf
    [ ${pair%%:*} = bf16 ] && ours=$(bf16_dir $m)
    # The weights a token reads: a folder's safetensors, or the GGUF file itself.
    if [[ $ours == *.gguf ]]; then weights=$ours; else weights=$(echo $ours/*.safetensors); fi
    for t in $THREADS; do
      bw=$(target/membw $t)
      : > /tmp/lmx_bench_ours; : > /tmp/lmx_bench_theirs
      for r in $(seq "$ROUNDS"); do
        run_ours() { RAYON_NUM_THREADS=$t $LMX benchmark --model $ours -p $P -g $G -n $N 2>/dev/null | tail -1 >> /tmp/lmx_bench_ours; }
        run_theirs() { python3 scripts/bench/peer_llama_cpp.py $theirs $P $G $N $t 2>/dev/null | tail -1 >> /tmp/lmx_bench_theirs; }
        if [ $((r % 2)) = 1 ]; then run_ours; run_theirs; else run_theirs; run_ours; fi
      done
      op=$(field prompt_tps < /tmp/lmx_bench_ours | median); og=$(field generation_tps < /tmp/lmx_bench_ours | median)
      tp=$(field prompt_tps < /tmp/lmx_bench_theirs | median); tg=$(field generation_tps < /tmp/lmx_bench_theirs | median)
      # Roofline: every weight byte once per token (the folder's safetensors or the GGUF) at the measured bandwidth.
      roof=$(python3 -c "print(f'{$bw * 1e9 / $(bytes $weights) :.0f}')")
      python3 -c "print(f'| $m ${pair%%:*} vs ${pair##*:} | $t | {$op:.0f} / {$og:.1f} | {$tp:.0f} / {$tg:.1f} | {$op/$tp:.2f}x | {$og/$tg:.2f}x | {$og/$roof*100:.0f}% of {$roof} ($bw GB/s) |')"
    done
  done
done
