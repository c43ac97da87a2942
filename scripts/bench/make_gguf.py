"""Writes a GGUF of the same weights at another precision, for llama.cpp peer benchmarks:
every tensor of SRC is dequantized and stored as F32, F16, BF16, Q8_0 or Q4_0 (norms stay
F32, as llama.cpp's converter does); all metadata is copied.

Usage: python scripts/bench/make_gguf.py SRC.gguf OUT.gguf f32|f16|bf16|q8_0|q4_0
"""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize

src, out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
reader = gguf.GGUFReader(src)
arch = reader.fields["general.architecture"].contents()
writer = gguf.GGUFWriter(out, arch)
for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
        continue
    value = field.contents()
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, value, vtype)
writer.add_file_type(file_type)
for t in reader.tensors:
    data = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(t.name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(t.name, data.astype(np.float16))
    else:
        writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print("wrote", out)
