"""GGUF reading: the one module of numallm that uses the `gguf` package.

The header is parsed here with strict bounds checks (a hostile file must never cause a huge
allocation, a hang or a traceback); the `gguf` package supplies the type constants and the
reference dequantizer. Tensors are read-only views into one memory map of the file: nothing is
copied at load.

GGUF layout (little-endian):
    magic "GGUF" | version u32 (2 or 3) | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)            string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims: u32, ne[n_dims]: u64, type: u32, offset: u64)
    padding to general.alignment (default 32), then the tensor data; offsets are relative to it.
ne[0] is the innermost (contiguous) dimension, so a numpy shape is ne reversed.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gguf_quants

from .errors import GGUFError, UnsupportedError

__all__ = ["GGUFFile", "QTensor", "GGMLQuantizationType", "quant_sizes", "type_name",
           "reference_dequantize", "reference_quantize", "split_part_name"]

# Limits far above any real model, far below what would exhaust memory or time.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 42          # 4 T elements in one tensor
MAX_ARRAY = 1 << 28             # elements in one metadata array
MAX_STRING = 1 << 30
MAX_SPLIT = 9999                # parts of one split model (llama.cpp's names have 5 digits)

# llama.cpp's split naming (gguf-split, llama_split_path): PREFIX-00001-of-00003.gguf
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_SCALAR = {  # GGUFValueType -> (struct format, numpy dtype)
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


def quant_sizes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type."""
    return GGML_QUANT_SIZES[qtype]


def type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def reference_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's dequantizer: the correctness oracle for numallm_kernels."""
    return _gguf_quants.dequantize(raw, qtype)


def reference_quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's quantizer (used to build synthetic models and test data)."""
    return _gguf_quants.quantize(values, qtype)


@dataclass(frozen=True)
class QTensor:
    """One tensor of a GGUF file, still in its on-disk encoding.

    data: read-only uint8 view, shape (rows, row_bytes) where rows = prod(shape[:-1]);
    shape: numpy order (outermost first), e.g. (n_out, n_in) for a weight matrix.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int  # byte offset of the tensor in the file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def dequantize(self) -> np.ndarray:
        """float32 copy of the whole tensor (for small tensors: norms, biases, tests)."""
        try:
            flat = reference_dequantize(self.data, self.qtype)
        except NotImplementedError:   # gguf-py reads no integer types (I8...): found by fuzzing
            raise UnsupportedError(f"tensor {self.name} is stored as {self.qtype.name}, which numallm "
                                   f"cannot read as numbers; re-convert the model") from None
        return np.ascontiguousarray(flat, dtype=np.float32).reshape(self.shape)


class _Cursor:
    """Bounds-checked reader over the file header."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} at byte {self.pos}; the file is truncated or not a "
                         f"valid GGUF (re-download it or re-convert the model)")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file ({len(self.buf)} bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if n > MAX_STRING:
            raise self.fail(f"{what} claims a {n}-byte string")
        return bytes(self.take(n, what)).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            v = self.scalar(_SCALAR[vtype][0], f"value of {key}")
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(f"value of {key}")
        if vtype == _ARRAY:
            etype = self.scalar("<I", f"array type of {key}")
            count = self.scalar("<Q", f"array length of {key}")
            if count > MAX_ARRAY:
                raise self.fail(f"metadata array {key} claims {count} elements")
            if etype in _SCALAR:
                fmt, dt = _SCALAR[etype]
                raw = self.take(count * struct.calcsize(fmt), f"array {key}")
                arr = np.frombuffer(raw, dtype=np.dtype(dt).newbyteorder("<"), count=count).copy()
                arr.flags.writeable = False
                return arr
            if etype == _STRING:
                # each string needs at least 8 bytes: reject impossible counts before looping
                if count * 8 > len(self.buf) - self.pos:
                    raise self.fail(f"array {key} of {count} strings runs past the end of the file")
                return [self.string(f"element of {key}") for _ in range(count)]
            raise self.fail(f"metadata array {key} has unsupported element type {etype}")
        raise self.fail(f"metadata key {key} has unknown value type {vtype}")


def split_part_name(first: str, no: int, count: int) -> str:
    """The name of part `no` (0-based) of the split model whose first part is `first`."""
    m = _SPLIT_NAME.match(first)
    if m is None:
        raise ValueError(f"{first} is not named PREFIX-00001-of-0000N.gguf")
    return f"{m.group('prefix')}-{no + 1:05d}-of-{count:05d}.gguf"


def _split_key(f: "GGUFFile", key: str, default: int, hi: int) -> int:
    v = f.metadata.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise GGUFError(f"{f.path}: {key} = {v!r} is not a valid split value; the file is corrupt")
    return v


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict) and `tensors` (name -> QTensor), all validated.

    Numeric metadata arrays are read-only numpy arrays; string arrays are lists of str (bytes that
    are not UTF-8 survive as surrogate escapes).

    A split model (llama.cpp's gguf-split: PREFIX-00001-of-0000N.gguf, keys split.no, split.count,
    split.tensors.count; the first part holds the metadata, every part some tensors) opens from
    its first part: `tensors` then holds every part's tensors, each a view of its own part's
    memory map, and `parts` lists the parts (one GGUFFile each; a single file: just itself).
    """

    def __init__(self, path: str | os.PathLike, *, _part: bool = False):
        self.path = str(path)
        if not os.path.isfile(self.path):   # stat only: a FIFO or device is never opened
            what = "not a regular file" if os.path.exists(self.path) else "no such file"
            raise GGUFError(f"{self.path}: {what}; give the path of a .gguf model file")
        size = os.path.getsize(self.path)
        if size < 24:
            raise GGUFError(f"{self.path}: only {size} bytes, too short to be a GGUF file; "
                            f"re-download it")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}); numallm reads "
                            f"GGUF models (convert with llama.cpp's convert_hf_to_gguf.py)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.file_size = size
        cur = _Cursor(memoryview(self._map), self.path)
        cur.take(4, "magic")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 "
                            f"are); re-convert the model with a current llama.cpp")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", f"type of {key}")
            self.metadata[key] = cur.value(vtype, key)

        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("<I", f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name} has {n_dims} dimensions")
            ne = [cur.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
            qtype = cur.scalar("<I", f"type of {name}")
            offset = cur.scalar("<Q", f"offset of {name}")
            infos.append((name, ne, qtype, offset))

        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise GGUFError(f"{self.path}: general.alignment={align!r} is not a power of two; "
                            f"the file is corrupt")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align

        self.tensors: dict[str, QTensor] = {}
        for name, ne, qtype, offset in infos:
            self.tensors[name] = self._tensor(name, ne, qtype, offset)
        self.own_tensors = len(infos)       # in this file itself (a split model's first part)
        self.parts: tuple[GGUFFile, ...] = (self,)
        if not _part:
            self._join_parts()

    def _join_parts(self) -> None:
        """Open the other parts of a split model (this file must be its first) and take their
        tensors; every mismatch is one line naming the part."""
        count = _split_key(self, "split.count", 1, MAX_SPLIT)
        no = _split_key(self, "split.no", 0, MAX_SPLIT)
        if count <= 1 and no == 0:
            return
        name = os.path.basename(self.path)
        m = _SPLIT_NAME.match(self.path)
        if no != 0 or count < 1 or no >= count:
            first = (split_part_name(self.path, 0, count) if m and count >= 1
                     else "the file named ...-00001-of-....gguf")
            raise GGUFError(f"{self.path}: this is part {no + 1} of {count} of a split model; "
                            f"give its first part ({first})")
        if m is None:
            raise GGUFError(f"{self.path}: the first of {count} parts of a split model, but not named "
                            f"PREFIX-00001-of-{count:05d}.gguf, so its other parts cannot be found; "
                            f"restore the names gguf-split gave the parts")
        total = _split_key(self, "split.tensors.count", 0, MAX_TENSORS)
        parts = [self]
        for i in range(1, count):
            p = split_part_name(self.path, i, count)
            if not os.path.isfile(p):
                raise GGUFError(f"{self.path}: part {i + 1} of {count} ({os.path.basename(p)}) is "
                                f"missing; download every part beside the first (numallm pull "
                                f"fetches them all)")
            part = GGUFFile(p, _part=True)
            got = (_split_key(part, "split.no", -1, MAX_SPLIT), _split_key(part, "split.count", 0, MAX_SPLIT),
                   _split_key(part, "split.tensors.count", 0, MAX_TENSORS))
            if got != (i, count, total):
                raise GGUFError(f"{p}: says it is part {got[0] + 1} of {got[1]} with {got[2]} tensors in "
                                f"all, but {name} expects part {i + 1} of {count} with {total}; the "
                                f"parts are of different models or downloads (get them again together)")
            arch = part.metadata.get("general.architecture")
            if arch is not None and arch != self.metadata.get("general.architecture"):
                raise GGUFError(f"{p}: a {arch} part beside a {self.metadata.get('general.architecture')} "
                                f"first part; the parts are of different models")
            for tname, t in part.tensors.items():
                if tname in self.tensors:
                    raise GGUFError(f"{p}: tensor {tname} is also in an earlier part; the parts are "
                                    f"of different models or downloads")
                self.tensors[tname] = t
            parts.append(part)
        if len(self.tensors) != total:
            raise GGUFError(f"{self.path}: the {count} parts hold {len(self.tensors)} tensors but "
                            f"split.tensors.count says {total}; the parts are of different models "
                            f"or downloads")
        self.parts = tuple(parts)

    @property
    def total_size(self) -> int:
        """Bytes of every part together (a single file: its size)."""
        return sum(p.file_size for p in self.parts)

    def _tensor(self, name: str, ne: list[int], qtype_id: int, offset: int) -> QTensor:
        where = f"{self.path}: tensor {name}"
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise GGUFError(f"{where} has unknown quantization type {qtype_id}; update numallm or "
                            f"re-quantize the model to a common type (Q4_K_M, Q8_0)") from None
        if any(d <= 0 for d in ne):
            raise GGUFError(f"{where} has an empty or negative dimension {ne}; the file is corrupt")
        n = 1
        for d in ne:
            n *= d
            if n > MAX_ELEMENTS:
                raise GGUFError(f"{where} has an absurd shape {ne} (over {MAX_ELEMENTS} elements); "
                                f"the file is corrupt or hostile")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise GGUFError(f"{where}: row length {ne[0]} is not a multiple of the {qtype.name} "
                            f"block size {block}; the file is corrupt")
        row_bytes = ne[0] // block * type_size
        rows = n // ne[0]
        start = self.data_offset + offset
        end = start + rows * row_bytes
        if offset % self.alignment:
            raise GGUFError(f"{where} starts at unaligned offset {offset}; the file is corrupt")
        if end > self.file_size:
            raise GGUFError(f"{where} needs bytes {start}..{end} but the file has {self.file_size}; "
                            f"the file is truncated (re-download it)")
        data = self._map[start:end].reshape(rows, row_bytes)
        shape = tuple(int(d) for d in reversed(ne))
        return QTensor(name, qtype, shape, data, start)

    # -- convenience -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture key; this is not a model file "
                            f"(vocab-only GGUFs cannot generate text)")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> QTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor {name} is missing; the file is incomplete or was "
                            f"converted for another architecture") from None

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"
