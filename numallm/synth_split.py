"""Split a GGUF into parts the way llama.cpp's gguf-split does (test and benchmark data):

    split_gguf("model.gguf", "out/model.gguf", n_parts=3)
        -> [out/model-00001-of-00003.gguf, ...]

Written with gguf-py's writer (its split_max_tensors mode): the first part carries all the
metadata, every part split.no / split.count / split.tensors.count and a share of the tensors,
bytes copied unchanged. Like synth.py this module may import `gguf`.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from .gguf_file import GGUFFile

__all__ = ["split_gguf"]

_SKIP = {"general.architecture", "general.alignment"}   # the writer sets these itself


def split_gguf(src: str | os.PathLike, dst: str | os.PathLike, n_parts: int) -> list[Path]:
    """Write `src` as `n_parts` parts named after `dst` (its stem + -0000i-of-0000n.gguf)."""
    r = gguf.GGUFReader(str(src))
    f = GGUFFile(src)
    names = list(f.tensors)
    if not 2 <= n_parts <= len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {n_parts} parts")
    w = gguf.GGUFWriter(str(dst), f.architecture, split_max_tensors=-(-len(names) // n_parts))
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name in _SKIP:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub)
    for name in names:
        t = f.tensors[name]
        w.add_tensor_info(name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name in names:
        w.write_tensor_data(np.ascontiguousarray(f.tensors[name].data))
    w.close()
    return w.format_shard_names(Path(dst))
