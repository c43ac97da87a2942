# Shared by the GPU machine's scripts (sourced): `cuda_setup NAME RESULTS` unpacks the carried
# binary into a fresh work folder and defines RES (the results file, in $OUT when set), W (the
# work folder), LMX (the binary) and `log` (prints and appends to RES); `fixture_folder ARCH`
# copies the fixture model ARCH into $W/ARCH with a 4-word tokenizer; `word_vocab DIR` gives
# DIR's tokenizer a word per token id (w4, w5, ...), so that generated text shows the ids;
# `same A B` compares two generated texts word by word; `tps OUTPUT` reads a benchmark's rate;
# `launch_setup` points lmx at the machine's NCCL and Open MPI libraries for `lmx launch`
# (NCCL_LIB, MPIRUN; NVLink multicast off); `step_ms MODEL LABEL` logs the mean device time of
# the last 200 recorded steps of a 300-token greedy decode (`LMX_TRACE_STEPS=1`; N=tokens).
cuda_setup() {
  RES=${OUT:-.}/$2
  W=${TMPDIR:-/tmp}/lmx-cuda-$1; rm -rf "$W"; mkdir -p "$W"
  xz -dc target/cuda/release/lmx.xz > "$W/lmx" && chmod +x "$W/lmx"
  LMX="$W/lmx"
  export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:${LD_LIBRARY_PATH:-}
}
log() { echo "$@" | tee -a "$RES"; }
# `same A B`: whether two texts' words are equal, else the first word that differs.
same() { python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None); print('BOTH EMPTY (failed?)' if not a and not b else f'equal ({len(a)} words)' if n is None and len(a) == len(b) else f'DIFFER at {n}')" "$1" "$2"; }
# `tps OUTPUT`: the generation rate in an `lmx benchmark` output, else its last line (an error).
tps() { echo "$1" | grep -oE "generation_tps=[0-9.]*" | tail -1 | cut -d= -f2 | grep . || echo "$1" | tail -1 | cut -c1-160; }
fixture_folder() {
  mkdir -p "$W/$1" && cp "tests/fixtures/$1/config.json" "tests/fixtures/$1/model.safetensors" "$W/$1/"
  echo '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1,"b":2,"c":3},"unk_token":"<unk>"}}' > "$W/$1/tokenizer.json"
}
word_vocab() {
  python3 -c "import json, sys; d = sys.argv[1]; n = json.load(open(d + '/config.json'))['vocab_size']; t = json.load(open(d + '/tokenizer.json')); t['model']['vocab'] = {**{f'w{i}': i for i in range(4, n)}, **t['model']['vocab']}; json.dump(t, open(d + '/tokenizer.json', 'w'))" "$1"
}
launch_setup() {
  export NCCL_NVLS_ENABLE=0
  # NCCL (--backend nccl): candle's cudarc opens `libnccl.so`; PyTorch's wheel ships libnccl.so.2.
  NCCL_LIB=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib'))" 2>/dev/null)
  [ -f "$NCCL_LIB/libnccl.so.2" ] || NCCL_LIB=$(dirname "$(find / -name 'libnccl.so.2' 2>/dev/null | head -1)")
  mkdir -p "$W/nccl" && ln -sf "$NCCL_LIB/libnccl.so.2" "$W/nccl/libnccl.so"
  export LD_LIBRARY_PATH=$W/nccl:$NCCL_LIB:$LD_LIBRARY_PATH
  # lmx opens libmpi.so.40 when a rank starts: point it at mpirun's own when the loader's
  # cache does not know it (HPC-X and other builds outside the system folders).
  MPIRUN=$(command -v mpirun) || { echo "no mpirun on this machine" | tee -a "$RES"; exit 1; }
  if ! ldconfig -p | grep -q 'libmpi.so.40 '; then
    export LMX_MPI_LIBRARY=$(dirname "$(readlink -f "$MPIRUN")")/../lib/libmpi.so.40
  fi
}
step_ms() {
  LMX_TRACE_STEPS=1 $LMX generate --model "$1" --device cuda -p 'a b c' -m "${N:-300}" --temp 0 --ignore-eos --ignore-chat-template 2>&1 >/dev/null | grep "lmx-step.*graph" | tail -200 | awk -v n="$2" '{w+=$7; k++} END {printf "%-34s device %.3f ms a step (n=%d)\n", n, w/k, k}' | tee -a "$RES"
}
