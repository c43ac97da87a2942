"""Writes a K-quant GGUF (the files most people download: Q4_K_M, Q5_K_M, Q6_K, ...) with
llama.cpp's own quantizer (`llama_model_quantize`, from the llama-cpp-python build that
scripts/bench/cpu_speed.sh makes), from an F32 / BF16 GGUF of the same weights.

Usage: python scripts/bench/make_kquant_gguf.py SRC.gguf OUT.gguf f16|q8_0|q4_0|q4_k_m|q4_k_s|q5_k_m|q6_k|q3_k_m|q2_k
"""
import ctypes
import os
import sys

import llama_cpp

FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
src, out, kind = sys.argv[1], sys.argv[2], sys.argv[3].lower()
if kind not in FTYPES:
    sys.exit(f"unknown type {kind!r}: one of {', '.join(FTYPES)}")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = FTYPES[kind]
params.nthread = os.cpu_count() or 1
tmp = out + ".partial"
rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
if rc != 0:
    sys.exit(f"llama_model_quantize failed ({rc})")
os.replace(tmp, out)
