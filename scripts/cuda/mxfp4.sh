#!/usr/bin/env bash
# MXFP4 and expert LoRA on the GPU machine (issues 11 and 15): the gpt-oss MXFP4 fixtures in
# MLX's layout, OpenAI's layout and llama.cpp's GGUF (tests/fixtures/gpt_oss_mxfp4, gguf/gpt-oss.gguf):
# perplexity on the CPU and the GPU in f32 and bf16, greedy tokens on both; then LoRA with
# adapters on the stacked experts (MLX's LoRASwitchLinear) on the Qwen3-MoE MLX fixture, 4-bit:
# the validation losses of a few steps on the CPU and the GPU.
# Usage there: scripts/cuda/mxfp4.sh   (results in $OUT/mxfp4.txt)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda/common.sh
cuda_setup mxfp4 mxfp4.txt
log "# MXFP4 and expert LoRA on CUDA, $(date -u +%F), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), binary sha256 $(sha256sum "$LMX" | cut -c1-12)"
python3 -c "import random; random.seed(0); print(' '.join(random.choice('abc') for _ in range(400)))" > "$W/text.txt"
ppl() { $LMX perplexity --model "$1" --data "$W/text.txt" --sequence-length 12 --device "$2" --dtype "$3" 2>&1 | grep -E "Perplexity|rror" | tr -d '\r' | head -1; }
gen() { $LMX generate --model "$1" --device "$2" --dtype float32 -p 'a b c a' -m 12 --temp 0 --ignore-chat-template 2>/dev/null | head -1; }
fixture_folder llama
for l in mlx hf; do
  mkdir -p "$W/oss-$l" && cp tests/fixtures/gpt_oss_mxfp4/$l/* "$W/oss-$l/" && cp "$W/llama/tokenizer.json" "$W/oss-$l/"
  word_vocab "$W/oss-$l"
done
cp tests/fixtures/gguf/gpt-oss.gguf "$W/oss.gguf"
for m in "$W/oss-mlx" "$W/oss-hf" "$W/oss.gguf"; do
  for dt in float32 bfloat16; do log "perplexity $(basename "$m") $dt: cpu [$(ppl "$m" cpu $dt)] cuda [$(ppl "$m" cuda $dt)]"; done
  log "greedy $(basename "$m") f32: cpu [$(gen "$m" cpu)] cuda [$(gen "$m" cuda)]"
done
# LoRA on the stacked experts of the 4-bit Qwen3-MoE fixture: CPU and GPU validation losses.
mkdir -p "$W/moe" "$W/data" && cp tests/fixtures/qwen3_moe_mlx/q4/* "$W/moe/" && cp "$W/llama/tokenizer.json" "$W/moe/"
python3 -c "import json; c = json.load(open('$W/moe/config.json')); c['eos_token_id'] = 0; json.dump(c, open('$W/moe/config.json', 'w'))"
python3 -c "
import json, random
random.seed(1)
for split, n in [('train', 16), ('valid', 4)]:
    open('$W/data/' + split + '.jsonl', 'w').write('\n'.join(json.dumps({'text': ' '.join(random.choice('abc') for _ in range(10))}) for _ in range(n)))
"
for dev in cpu cuda; do
  log "lora on stacked experts, $dev: $($LMX lora --model "$W/moe" --train --data "$W/data" --device $dev --iters 6 --batch-size 4 --num-layers 3 --learning-rate 1e-3 --steps-per-eval 3 --adapter-path "$W/ad-$dev" 2>&1 | grep -E 'Val loss|rror' | tr '\n' ' ')"
done
python3 -c "
from safetensors.numpy import load_file
import numpy as np
a, b = load_file('$W/ad-cpu/adapters.safetensors'), load_file('$W/ad-cuda/adapters.safetensors')
k = 'model.layers.0.mlp.switch_mlp.gate_proj.lora_b'
print('adapters after 6 steps, largest |cpu - cuda| over', len(a), 'tensors:', max(float(np.abs(a[n] - b[n]).max()) for n in a), '; largest value', max(float(np.abs(a[n]).max()) for n in a), ';', k, a[k].shape)
" 2>&1 | tee -a "$RES"
