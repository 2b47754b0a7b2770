"""The kernel-unit interface and its registry (keyed by GGMLQuantizationType)."""
from __future__ import annotations

import functools
import hashlib
import threading
import types
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_REGISTRY: dict[GGMLQuantizationType, "KernelUnit"] = {}

# Rows dequantized at once by the generic matmul path: bounds the float32 scratch to a few MB.
TILE_ROWS = 256


class XForm:
    """An activation encoding: `fill` (njit, nogil) writes the encoding of x float32 (T, K) into
    arrays made by `alloc`; calling the form does both. Decode reuses the arrays token after
    token (ops' cached dispatches), so filling must not depend on their old contents. Each
    array's first axis is the token, and each token is encoded on its own: filling rows
    [a, b) of every array from x[a:b] gives those rows of the whole (Activations.split)."""

    def __init__(self, fill, parts: Callable[[int, int], list[tuple[tuple[int, ...], type]]]):
        self.fill, self.parts = fill, parts

    def alloc(self, n_t: int, k: int) -> tuple[np.ndarray, ...]:
        return tuple(np.empty(shape, dtype) for shape, dtype in self.parts(n_t, k))

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        arrays = self.alloc(*x.shape)
        self.fill(x, *arrays)
        return arrays


class Activations:
    """The input of one product, x float32 (T, K), with the encodings kernels derive from it
    (e.g. int8 blocks with their scales). A caller makes one per input and hands it to every
    matrix that reads that input (q, k and v; gate and up), so x is encoded once per input, not
    once per matrix and row range. Forms are made on the caller's thread by `prepare_x`, before
    the row ranges run: the workers only read them."""

    def __init__(self, x: np.ndarray):
        self.x = x            # float32 (T, K), C-contiguous
        self._forms: dict = {}
        self.makers: dict = {}   # key -> the maker of each form made
        # split(fill, x, arrays), or None: fills an XForm's arrays from x over row ranges at
        # once (a caller with several threads and many tokens sets it; see XForm)
        self.split: Callable | None = None

    def form(self, key: str, make):
        """The encoding called `key`, made by make(x) on first request."""
        f = self._forms.get(key)
        if f is None:
            if self.split is not None and isinstance(make, XForm):
                f = make.alloc(*self.x.shape)
                self.split(make.fill, self.x, f)
            else:
                f = make(self.x)
            self._forms[key] = f
            self.makers[key] = make
        return f

    @property
    def refillable(self) -> bool:
        """Every form made so far can be refilled in place (all XForm)."""
        return all(isinstance(m, XForm) for m in self.makers.values())

    def refill(self, x: np.ndarray) -> None:
        """Encode a new x of the same shape into the existing forms (see `refillable`). x is
        copied into the existing buffer, so `columns` views stay valid."""
        np.copyto(self.x, x)
        for key, make in self.makers.items():
            make.fill(self.x, *self._forms[key])

    def row(self, j: int) -> "Activations":
        """Token j of this input as a one-token input sharing its memory: x and every form made
        so far, sliced (every form array is (T, m)); `refill` of this one updates it."""
        sub = Activations(self.x[j:j + 1])
        sub._forms = {key: tuple(a[j:j + 1] for a in arrays) for key, arrays in self._forms.items()}
        return sub

    def rows(self, a: int, b: int) -> "Activations":
        """Tokens [a, b) of this input sharing its memory: x and every form made so far, sliced
        (each stays C-contiguous)."""
        sub = Activations(self.x[a:b])
        sub._forms = {key: tuple(arr[a:b] for arr in arrays) for key, arrays in self._forms.items()}
        return sub

    def take(self, idx: np.ndarray) -> "Activations":
        """An input of the tokens idx (int (R,), repeats allowed): x and every form made so far,
        their rows gathered (forms are per-token encodings, so a gathered form is the form of
        the gathered rows, bit for bit)."""
        sub = Activations(self.x[idx])
        sub._forms = {key: tuple(arr[idx] for arr in arrays) for key, arrays in self._forms.items()}
        return sub

    def columns(self, a: int, b: int) -> "Activations":
        """Input columns [a, b) of a one-token input, sharing this one's memory: x and every
        form made so far, sliced, so a matrix split by columns reads its part of one encoding
        (a row's columns are contiguous only for T = 1). A form array (T, m) holds m/K entries
        per column: [a, b) must cover whole entries of each (whole quant blocks)."""
        t, k = self.x.shape
        if t != 1:
            raise ValueError(f"column views of a {t}-token input (one token only)")
        sub = Activations(self.x[:, a:b])
        for key, arrays in self._forms.items():
            views = []
            for arr in arrays:
                m = arr.shape[1]
                if a * m % k or b * m % k:
                    raise ValueError(f"columns [{a}, {b}) cut the {key!r} form's {k // m}-column units")
                views.append(arr[:, a * m // k:b * m // k])
            sub._forms[key] = tuple(views)
        return sub


class KernelUnit:
    """Kernels for one GGML type. Subclasses set `qtype` and implement `dequantize`; the generic
    `matvec`/`matmul` below dequantize a tile of rows and use BLAS, and fast units override them.

    The engine's path is `prepare_x(acts)` once per input on the caller's thread, then
    `matmul_x(w, acts, out, r0, r1)` per row range (possibly concurrently); the defaults fall back
    to matvec/matmul, so a unit that encodes nothing needs neither."""

    qtype: GGMLQuantizationType
    variant = "generic"
    # prepare() copies the rows into a new layout and keeps no reference to `raw`: the caller may
    # drop raw's file pages once prepared (the weights then occupy memory once, not twice)
    repacks = False
    # row ranges starting at multiples of this are computed without redoing a shared row group
    row_multiple = 1
    # decode kernels take a software prefetch distance (variant_task's pf), which calibration
    # times per CPU with and without (`_calibrate`)
    prefetches = False
    # True for units that offer several variants and let `_calibrate` pick one by timing them
    # (they then implement `variants()`, `run(variant, ...)`, `synthetic(n, k, rng)`).
    calibrated = False
    # variant -> ISA features it needs (names as llvmlite.binding.get_host_cpu_features spells them)
    features: dict[str, tuple[str, ...]] = {}

    def variants(self) -> list[str]:
        return [self.variant]

    def hot_kernels(self) -> list[tuple[object, tuple]]:
        """(njit dispatcher, argument types) of the kernels whose machine code should be vector
        code on this CPU (checked by tests/test_kernels_asm.py). Empty when none applies."""
        return []

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

    def prepare_x(self, acts: Activations) -> None:
        """Make (in `acts`) the encodings of x that matmul_x will read; default: none."""

    def prepare_x_parts(self, acts: Activations, sizes) -> None:
        """Make in `acts` the encodings that products over parts of its rows, of `sizes` rows
        each, read (a MoE prefill encodes its tokens once, then groups them by expert)."""
        self.prepare_x(acts)

    def matmul_x(self, w, acts: Activations, out: np.ndarray, r0: int, r1: int) -> None:
        """out[:, r0:r1] = acts.x @ W[r0:r1].T; out: float32 (T, N). Reads only what prepare_x
        made, so row ranges may run concurrently."""
        if acts.x.shape[0] == 1:
            self.matvec(w, acts.x[0], out[0], r0, r1)
        else:
            self.matmul(w, acts.x, out, r0, r1)

    def native_task(self, w, acts: Activations, out: np.ndarray, r0: int, r1: int):
        """The same product as matmul_x as a task of `_native` (slot, q, xq, dx, xaux, out, r0,
        r1[, pf]) that a pool thread runs without the GIL, or None where the unit has none (then the
        pool calls matmul_x). Only after prepare_x."""
        return None


class CalibratedUnit(KernelUnit):
    """A unit with several variants; `_calibrate` picks one per CPU (or NUMALLM_KERNEL forces it).
    Subclasses implement `variants()`, `prepare_variant_x(variant, acts)`,
    `run_x(variant, w, acts, out, r0, r1)` (out: (T, N)) and `synthetic(n, k, rng)` (raw rows
    for timing)."""

    calibrated = True

    def __init__(self):
        self._choice = None
        self._lock = threading.Lock()

    @property
    def variant(self) -> str:
        return self.choice().matvec

    def choice(self):
        """The `_calibrate.Choice` for this unit, made on first use (thread-safe)."""
        if self._choice is None:
            from . import _calibrate

            with self._lock:
                if self._choice is None:
                    self._choice = _calibrate.choose(self)
        return self._choice

    def prepare_variant_x(self, variant: str, acts: Activations) -> None:
        """Make the encodings of acts.x that `variant` reads; default: none."""

    def run_x(self, variant: str, w, acts: Activations, out, r0, r1) -> None:
        raise NotImplementedError

    def run(self, variant: str, w, x, out, r0, r1) -> None:
        """out[:, r0:r1] = x @ W[r0:r1].T with a given variant; x: float32 (T, K), out (T, N)."""
        acts = Activations(np.ascontiguousarray(x, dtype=np.float32))
        self.prepare_variant_x(variant, acts)
        self.run_x(variant, w, acts, out, r0, r1)

    def synthetic(self, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def variant_task(self, variant: str, w, acts: Activations, out, r0, r1, pf: int = 0):
        """`native_task` for a given variant (after prepare_variant_x), or None where that
        variant has no native kernel (the pool then calls run_x). pf: decode's software
        prefetch distance in bytes (0: none; units with `prefetches` use it)."""
        return None

    def native_task(self, w, acts: Activations, out, r0, r1):
        choice, n_t = self.choice(), acts.x.shape[0]
        return self.variant_task(choice.for_tokens(n_t), w, acts, out, r0, r1,
                                 choice.prefetch if n_t == 1 else 0)

    def matvec(self, w, x, out, r0, r1):
        self.run(self.choice().matvec, w, x.reshape(1, -1), out.reshape(1, -1), r0, r1)

    def matmul(self, w, x, out, r0, r1):
        self.run(self.choice().for_tokens(x.shape[0]), w, x, out, r0, r1)

    def prepare_x(self, acts: Activations) -> None:
        self.prepare_variant_x(self.choice().for_tokens(acts.x.shape[0]), acts)

    def prepare_x_parts(self, acts: Activations, sizes) -> None:
        for v in {self.choice().for_tokens(n) for n in sizes}:
            self.prepare_variant_x(v, acts)

    def matmul_x(self, w, acts: Activations, out, r0, r1) -> None:
        self.run_x(self.choice().for_tokens(acts.x.shape[0]), w, acts, out, r0, r1)


def register(cls: type[KernelUnit]) -> type[KernelUnit]:
    """Class decorator: instantiate the unit and make it the one for its type."""
    _REGISTRY[cls.qtype] = cls()
    return cls


def get(qtype: GGMLQuantizationType) -> KernelUnit:
    """The unit for `qtype`; KeyError if numallm has no kernels for it."""
    return _REGISTRY[GGMLQuantizationType(qtype)]


def registered_types() -> list[GGMLQuantizationType]:
    return sorted(_REGISTRY, key=int)


def hot_kernels(qtype: GGMLQuantizationType) -> list[tuple[object, tuple]]:
    """The registered unit's hot kernels: [(njit dispatcher, argument types)]."""
    return get(qtype).hot_kernels()


def fresh_asm(dispatcher, argtypes: tuple) -> str:
    """Assembly of `dispatcher` compiled for `argtypes`. Numba cannot show the code of a function
    loaded from its on-disk cache, so this compiles an uncached copy with the same options."""
    from numba import njit

    opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = njit(**opts)(dispatcher.py_func)
    fresh.compile(argtypes)
    return fresh.inspect_asm(argtypes)


def specialize(template, name: str, **consts):
    """An njit(nogil, cache) copy of the function `template` in which the global names `consts`
    are compile-time constants (e.g. a per-type decoder or block size).

    One template then serves several types without a branch in the inner loop. Each copy gets
    its own `name`, which keys Numba's on-disk cache, so copies never share cache entries (a
    closure would not be cached at all). Numba checks a cached copy only against the template's
    own source file, not against the intrinsics and decoders it inlines from other files, so the
    name also carries a digest of this package's sources: editing any kernel file recompiles
    every copy instead of loading stale machine code."""
    from numba import njit

    name = f"{name}_{_sources_digest()}"
    fn = types.FunctionType(template.__code__, dict(template.__globals__, **consts), name,
                            template.__defaults__)
    fn.__qualname__ = name
    return njit(nogil=True, cache=True)(fn)


def drop_stale_caches() -> None:
    """Delete this package's Numba cache files when any of its sources changed since they were
    written. Numba checks a cached function only against its own file's time stamp, but a
    kernel inlines code from other files (fused_decode's attention, every unit's steps): after a
    `git pull` that edits attention.py and not fused_decode.py, the old attention would still
    run (seen once as wrong bits in a test). `specialize` names its copies by the sources digest;
    this covers the plain `@njit(cache=True)` functions, in the folder Numba writes them to
    (`__pycache__` here, or under $NUMBA_CACHE_DIR). A cache it cannot write is left alone."""
    import os

    digest = _sources_digest()
    here = Path(__file__).parent
    dirs = [here / "__pycache__"]
    if os.environ.get("NUMBA_CACHE_DIR"):
        try:
            from numba.core.caching import _CacheLocator
            dirs = [Path(os.environ["NUMBA_CACHE_DIR"]) /
                    _CacheLocator.get_suitable_cache_subpath(str(here / "base.py"))]
        except (ImportError, AttributeError):    # another Numba's private layout: leave it
            return
    for d in dirs:
        stamp = d / "numallm_kernels.sources"
        try:
            if stamp.is_file() and stamp.read_text() == digest:
                continue
            if d.is_dir():
                for f in d.iterdir():
                    if f.suffix in (".nbi", ".nbc"):
                        f.unlink(missing_ok=True)
            d.mkdir(parents=True, exist_ok=True)     # stamped before the first cache file
            tmp = d / f"numallm_kernels.sources.{os.getpid()}"
            tmp.write_text(digest)
            tmp.replace(stamp)
        except OSError:
            continue


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """A short hash of every .py file of this package (their bytes)."""
    h = hashlib.sha1()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def describe(calibrate: bool = True) -> list[dict]:
    """One dict per registered type for `numallm kernels`: type, chosen decode variant (`decode`:
    with "+pf" where decode prefetches), prefill
    variants by token count, ISA features the decode variant needs, its decode GB/s end to end
    by thread count (`e2e`, {threads: GB/s}; `gbs`: at the most threads timed; None when not
    measured). With calibrate=False, uncalibrated units report without timing."""
    rows = []
    for qtype in registered_types():
        unit = get(qtype)
        row = {"type": qtype.name, "variant": unit.variant if not unit.calibrated else None,
               "decode": unit.variant if not unit.calibrated else None,
               "prefill": None, "features": [], "gbs": None, "e2e": {}, "source": "fixed"}
        if unit.calibrated and (calibrate or unit._choice is not None):
            c = unit.choice()
            e2e = c.e2e.get(c.decode, {})
            row.update(variant=c.matvec, decode=c.decode, prefill=[list(p) for p in c.prefill],
                       gbs=e2e[max(e2e)] if e2e else None, e2e=dict(sorted(e2e.items())),
                       source=c.source)
        if row["variant"] is not None:
            row["features"] = list(unit.features.get(row["variant"], ()))
        rows.append(row)
    return rows
