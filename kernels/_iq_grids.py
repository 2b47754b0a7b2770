"""The codebooks of the IQ types (IQ1_S/IQ1_M, IQ2_XXS/XS/S, IQ3_XXS/S), built at import from
gguf-py's tables (`gguf.quants.<TYPE>.grid`, which gguf-py decodes from its packed hex), so the
numbers exist once, in llama.cpp's own Python package, and never in this repository.

Two forms of each:
  float32 (entries, 8 or 4): the grid values exactly as gguf-py multiplies them (dequantization,
      bit-exact against `gguf.quants.dequantize`);
  integer tables the AVX2 kernels load one entry at a time as one scalar (8 bytes: uint64,
      4 bytes: uint32): IQ2 grids hold 8 unsigned magnitudes (8, 25, 43), IQ3 grids 4 (4..62 for
      IQ3_XXS, 1..15 for IQ3_S), IQ1 grids 8 signed bytes 8 * g (g in -1, 0, 1, so -8, 0, 8: the
      kernel adds +-1 for the +-1/8 delta and the weight times 8 is an int8 in -9..9).
Sign tables: KSIGNS64[i] (i: a 7-bit sign index of IQ2_XXS/IQ2_XS/IQ3_XXS) and SIGNS64[b] (b: an
explicit sign byte of IQ2_S/IQ3_S) as 8 bytes of +1 (0x01) or -1 (0xFF), bit k -> byte k, the
operand vpsignb applies to the activations.
"""
from __future__ import annotations

import numpy as np
from gguf import quants as _q

# IQ1_S / IQ1_M: weight = dl * (g + delta), delta = +-IQ1_DELTA (1/8)
IQ1_DELTA = np.float32(_q.IQ1_S.delta)


def _grid(cls) -> np.ndarray:
    """gguf-py's decoded grid of `cls` as float32 (entries, values per entry), C-contiguous."""
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), dtype=np.float32)


def _packed(grid: np.ndarray, scale: int, dtype) -> np.ndarray:
    """Each entry's values times `scale` as int8 bytes, the entry viewed as one `dtype` scalar."""
    b = np.rint(grid * scale).astype(np.int16)
    if b.min() < -128 or b.max() > 127:
        raise ValueError("grid values do not fit in int8")
    return np.ascontiguousarray(b.astype(np.int8).view(np.uint8).view(dtype).reshape(-1))


# float32 grids (entries, width)
IQ2XXS_GRID = _grid(_q.IQ2_XXS)      # (256, 8)
IQ2XS_GRID = _grid(_q.IQ2_XS)        # (512, 8)
IQ2S_GRID = _grid(_q.IQ2_S)          # (1024, 8)
IQ3XXS_GRID = _grid(_q.IQ3_XXS)      # (256, 4)
IQ3S_GRID = _grid(_q.IQ3_S)          # (512, 4)
IQ1S_GRID = _grid(_q.IQ1_S)          # (2048, 8), IQ1_M shares it

# kernel tables: one scalar per entry
IQ2XXS_U64 = _packed(IQ2XXS_GRID, 1, np.uint64)    # (256,)
IQ2XS_U64 = _packed(IQ2XS_GRID, 1, np.uint64)      # (512,)
IQ2S_U64 = _packed(IQ2S_GRID, 1, np.uint64)        # (1024,)
IQ3XXS_U32 = _packed(IQ3XXS_GRID, 1, np.uint32)    # (256,)
IQ3S_U32 = _packed(IQ3S_GRID, 1, np.uint32)        # (512,)
IQ1S_U64 = _packed(IQ1S_GRID, 8, np.uint64)        # (2048,) 8 * g

# the 7-bit sign index -> its 8 sign bits (the eighth makes the count of minus signs even)
KSIGNS = np.frombuffer(_q.IQ2_XXS.ksigns, dtype=np.uint8).copy()     # (128,)


def _sign_bytes(bits: np.ndarray) -> np.ndarray:
    """Sign bit patterns (n,) -> (n,) uint64 of 8 bytes +1 / -1 (bit k set: byte k is -1)."""
    k = np.arange(8, dtype=np.uint8)
    s = np.where((bits[:, None] >> k) & 1, np.int8(-1), np.int8(1)).astype(np.int8)
    return np.ascontiguousarray(s.view(np.uint64).reshape(-1))


KSIGNS64 = _sign_bytes(KSIGNS)                                 # (128,)
SIGNS64 = _sign_bytes(np.arange(256, dtype=np.uint8))          # (256,)
# IQ1's per-8 delta as a byte added to each 8 * g: +1 or -1 in all 8 bytes
PLUS1_64 = np.int64(0x0101010101010101)
MINUS1_64 = np.int64(-1)


def _codes(grid: np.ndarray, bits: int):
    """Each entry as one uint16 code (value k of the entry in bits bits * k..: its level's rank
    among the grid's distinct values), and the 64-byte table code -> value (any 6-bit slice
    whose low `bits` bits are a rank; the avx512-iq steps' vpermb)."""
    levels = np.unique(grid)
    rank = np.searchsorted(levels, grid).astype(np.uint32)
    code = np.zeros(grid.shape[0], np.uint32)
    for k in range(grid.shape[1]):
        code |= rank[:, k] << (bits * k)
    vals = np.zeros(1 << bits, np.uint8)
    vals[:len(levels)] = levels.astype(np.uint8)
    return code.astype(np.uint16), np.ascontiguousarray(np.tile(vals, 64 >> bits))


IQ2XXS_CODES, IQ2_VALS = _codes(IQ2XXS_GRID, 2)     # (256,) uint16, (64,) uint8
IQ2XS_CODES, _ = _codes(IQ2XS_GRID, 2)              # (512,) uint16 (same values)
IQ2S_CODES, _ = _codes(IQ2S_GRID, 2)                # (1024,) uint16 (same values)
IQ3XXS_CODES, IQ3XXS_VALS = _codes(IQ3XXS_GRID, 3)  # (256,) uint16, (64,) uint8
IQ3S_CODES, IQ3S_VALS = _codes(IQ3S_GRID, 3)        # (512,) uint16, (64,) uint8
