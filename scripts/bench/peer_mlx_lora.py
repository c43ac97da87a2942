"""`mlx_lm.lora` training speed on the same data as scripts/bench/peer_peft_lora.py and
`lmx lora`, for docs/BENCHMARKS.md.

Runs MLX LM's own CLI entry point (mlx_lm.lora.main) in this process with
  --train --data D --iters N --batch-size 4 --num-layers 16 --steps-per-report 1
  --steps-per-eval 100000 --val-batches 0 --save-every 100000 --adapter-path /tmp/...
(its defaults otherwise: LoRA rank 8, scale 20, dropout 0, Adam lr 1e-5), with a training
callback that records each step. MLX LM 0.32's console shows only tokens/s and no peak memory,
and mlx_lm.lora.run() drops a callback passed to it (it always uses get_reporting_callbacks),
so the callback goes in by replacing mlx_lm.lora.get_reporting_callbacks.

Timing skips the first --warmup (2) steps (MLX LM's own numbers would include them; its
validation passes at step 1 and step N are outside its train_time). MLX on a Linux CPU is
slow (~30 s per step of 4 x 64 tokens), so use few iterations.
tok_s counts the real target tokens (length - 1 per sequence, what lmx and the PEFT script
count); mlx_tok_s is MLX LM's own count (it also trains the target after the last token, a 0
pad: length per sequence). peak_gb is the process's peak RSS (ru_maxrss); mlx_peak_gb is
mx.get_peak_memory(), what MLX LM reports as peak memory.

Usage: python scripts/bench/peer_mlx_lora.py --model models/SmolLM2-135M-Instruct-bf16
       [--data scripts/bench/data/lora] [--iters 4] [--batch-size 4] [--num-layers 16]
       [-- extra mlx_lm.lora arguments]
Last line: RESULT mlx model=.. iters=.. it_s=.. s_it=.. s_it_median=.. tok_s=.. mlx_tok_s=..
           peak_gb=.. mlx_peak_gb=..
"""
import argparse
import os
import resource
import sys
import tempfile

import mlx.core as mx
import mlx_lm
import mlx_lm.lora as lora
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback

here = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", default=os.path.join(here, "data", "lora"))
p.add_argument("--iters", type=int, default=4)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--num-layers", type=int, default=16)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("extra", nargs="*")
a = p.parse_args()
assert a.iters > a.warmup, "--iters must be larger than --warmup"


class Record(TrainingCallback):
    def __init__(self):
        self.steps = []

    def on_train_loss_report(self, info):
        self.steps.append(info)
        print(f"step {info['iteration']}: loss {info['train_loss']:.3f}, {1 / info['iterations_per_second']:.2f} s, "
              f"{info['tokens_per_second'] / info['iterations_per_second']:.0f} tokens (MLX LM count), "
              f"peak {info['peak_memory']:.2f} GB", flush=True)


rec = Record()
lora.get_reporting_callbacks = lambda *args, **kw: rec
with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
    sys.argv = ["mlx_lm.lora", "--model", a.model, "--train", "--data", a.data, "--iters", str(a.iters),
                "--batch-size", str(a.batch_size), "--num-layers", str(a.num_layers), "--steps-per-report", "1",
                "--steps-per-eval", "100000", "--val-batches", "0", "--save-every", "100000",
                "--adapter-path", os.path.join(tmp, "adapters")] + a.extra
    print(" ".join(sys.argv), flush=True)
    lora.main()

steps = rec.steps[a.warmup:]
secs = [1 / s["iterations_per_second"] for s in steps]
mlx_tokens = [s["tokens_per_second"] / s["iterations_per_second"] for s in steps]
t, n = sum(secs), len(secs)
real = sum(mlx_tokens) - n * a.batch_size  # one pad target per sequence
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
print(f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, device {mx.default_device()}")
print(f"RESULT mlx model={os.path.basename(os.path.normpath(a.model))} iters={n} it_s={n / t:.4f} s_it={t / n:.2f} "
      f"s_it_median={float(np.median(secs)):.2f} tok_s={real / t:.2f} mlx_tok_s={sum(mlx_tokens) / t:.2f} "
      f"peak_gb={peak:.2f} mlx_peak_gb={max(s['peak_memory'] for s in rec.steps):.2f}")
