"""The kernel-unit interface and its registry (keyed by GGMLQuantizationType)."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_REGISTRY: dict[GGMLQuantizationType, "KernelUnit"] = {}

# Rows dequantized at once by the generic matmul path: bounds the float32 scratch to a few MB.
TILE_ROWS = 256


class KernelUnit:
    """Kernels for one GGML type. Subclasses set `qtype` and implement `dequantize`; the generic
    `matvec`/`matmul` below dequantize a tile of rows and use BLAS, and fast units override them."""

    qtype: GGMLQuantizationType
    variant = "generic"

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    def prepare(self, raw: np.ndarray):
        """raw: uint8 (N, row_bytes), read-only. Returns the object the other methods take."""
        return raw

    def n_cols(self, w) -> int:
        return w.shape[1] // self.type_size * self.block_size

    def dequantize(self, w, out: np.ndarray, r0: int, r1: int) -> None:
        raise NotImplementedError

    def matvec(self, w, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
        self.matmul(w, x.reshape(1, -1), out.reshape(1, -1), r0, r1)

    def matmul(self, w, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
        tile = np.empty((min(TILE_ROWS, r1 - r0), x.shape[1]), dtype=np.float32)  # (rows, K)
        for a in range(r0, r1, TILE_ROWS):
            b = min(a + TILE_ROWS, r1)
            t = tile[: b - a]
            self.dequantize(w, t, a, b)
            out[:, a:b] = x @ t.T


def register(cls: type[KernelUnit]) -> type[KernelUnit]:
    """Class decorator: instantiate the unit and make it the one for its type."""
    _REGISTRY[cls.qtype] = cls()
    return cls


def get(qtype: GGMLQuantizationType) -> KernelUnit:
    """The unit for `qtype`; KeyError if numallm has no kernels for it."""
    return _REGISTRY[GGMLQuantizationType(qtype)]


def registered_types() -> list[GGMLQuantizationType]:
    return sorted(_REGISTRY, key=int)
