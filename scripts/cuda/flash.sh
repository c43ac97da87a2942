#!/usr/bin/env bash
# Flash attention for causal bf16 prompts (issue 11) on the GPU machine: lmx-core's GPU unit
# test (the flash kernel against f32 attention on the CPU: head sizes 16-128, grouped heads,
# chunks after cached positions, windows, soft-capping), fixture perplexities on the CPU and the
# GPU with the flash kernel and without it (LMX_CUDA_FLASH=0: two products around the fused
# softmax), then prefill speed of the random Llama-3.2-1B and Llama-3-8B shapes, both ways
# (and the kernel compiled for 3 blocks a multiprocessor: LMX_CUDA_FLASH_BLOCKS=3).
# Build here with `scripts/build-cuda.sh --tests`. Usage there: scripts/cuda/flash.sh
# (results in $OUT/flash.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup flash flash.txt
log "# CUDA flash attention, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
xz -dc target/cuda/release/lmx-core-tests.xz > "$W/tests" && chmod +x "$W/tests"
log "$("$W/tests" flash_attention --nocapture --test-threads 1 2>&1 | grep -E 'max error|test result|panicked|FAILED|skipped')"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 64 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
for a in llama gemma2 mistral phi3; do
  fixture_folder $a
  log "perplexity $a: cpu f32 [$(ppl "$W/$a" cpu float32)] cpu bf16 [$(ppl "$W/$a" cpu bfloat16)] cuda bf16 flash [$(ppl "$W/$a" cuda bfloat16)] without [$(LMX_CUDA_FLASH=0 ppl "$W/$a" cuda bfloat16)]"
done
# f32 (no flash kernel; the prompt's rotation and cache write in one kernel): greedy tokens on
# the GPU equal the CPU's.
word_vocab "$W/llama"
g32() { $LMX generate --model "$W/llama" --device "$1" --dtype float32 -p 'a b c a b c c b a' -m 100 --temp 0 --ignore-eos --ignore-chat-template 2>/dev/null | head -1; }
[ "$(g32 cpu)" = "$(g32 cuda)" ] && log "llama f32 greedy, 100 tokens: cuda equals cpu" || log "llama f32 greedy, 100 tokens: cuda DIFFERS from cpu"
SHAPE=1b BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-1b" 2>&1 | tail -1 | tee -a "$RES"
bench() { $LMX benchmark --model "$W/$1" --device cuda $2 2>&1 | tail -1; }
# Greedy tokens of a 1,500-token prompt with and without (bf16: may part after a while).
long=$(python3 -c "import random; random.seed(1); print(' '.join(random.choice('abc') for _ in range(1500)))")
gen() { $LMX generate --model "$W/llama-1b-bf16" --device cuda -p "$long" -m 24 --temp 0 --ignore-chat-template --ignore-eos 2>/dev/null | head -1 | cut -c1-300; }
word_vocab "$W/llama-1b-bf16"
log "1b greedy flash:   $(gen)"
log "1b greedy without: $(LMX_CUDA_FLASH=0 gen)"
for m in llama-1b-bf16 llama-1b-4bit; do
  for p in 2048 4096; do
    log "$m prefill $p flash:   $(bench $m "-p $p -g 1 -n 2")"
    log "$m prefill $p flash, 3 blocks/SM: $(LMX_CUDA_FLASH_BLOCKS=3 bench $m "-p $p -g 1 -n 2")"
    log "$m prefill $p without: $(LMX_CUDA_FLASH=0 bench $m "-p $p -g 1 -n 2")"
  done
done
BITS=4 python3 scripts/cuda/make_random_llama.py "$W/llama-8b" 2>&1 | tail -1 | tee -a "$RES"
for m in llama-8b-bf16 llama-8b-4bit; do
  log "$m prefill 4096 flash:   $(bench $m "-p 4096 -g 1 -n 2")"
  log "$m prefill 4096 flash, 3 blocks/SM: $(LMX_CUDA_FLASH_BLOCKS=3 bench $m "-p 4096 -g 1 -n 2")"
  log "$m prefill 4096 without: $(LMX_CUDA_FLASH=0 bench $m "-p 4096 -g 1 -n 2")"
done
log "llama-8b-4bit decode (graphs): $(bench llama-8b-4bit '-p 128 -g 256 -n 2')"
