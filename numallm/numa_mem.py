"""Node-local memory: numpy buffers allocated on a chosen NUMA node, and where their pages are.

    buf = to_node(array, node)          # a copy whose pages live on `node` (libnuma)
    where(buf)                          # {node: pages}, read back from the kernel with move_pages

Allocation goes through libnuma's `numa_alloc_onnode` (an mmap bound with MPOL_BIND), so the
pages land on the node whichever CPU first touches them: no reliance on first touch or on the
page-cache state. Verification calls `move_pages` with no target nodes, which only reports each
page's node. Without libnuma both degrade: buffers come from numpy (placed by first touch) and
`where` returns None; `status()` says which case holds.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
from dataclasses import dataclass

import numpy as np

from .errors import NumallmError

PAGE = mmap.PAGESIZE
# move_pages status of a page that is not yet faulted in (-ENOENT): counted apart from nodes.
NOT_PRESENT = -2
# pages asked about per move_pages call: bounds the two index arrays to a few MB
_CHUNK = 1 << 18
# node blocks at least this large ask for transparent huge pages (madvise), as numpy does for
# its own large arrays: where THP is "madvise" (Debian's default) numa_alloc_onnode's plain mmap
# got 4 KiB pages, and a 3B model's decode ran ~5% slower from slices than from numpy arrays
_HUGE_MIN = 4 << 20
_MADV_HUGEPAGE = 14


@dataclass(frozen=True)
class MemStatus:
    """available: libnuma can allocate on nodes and report pages; nodes: the memory nodes the
    kernel has; note: why placement is a no-op when it is not available."""

    available: bool
    nodes: tuple[int, ...]
    note: str


class _Lib:
    """The libnuma calls numallm needs, typed once. py-libnuma wraps neither allocation nor
    move_pages, so we open the same library through our own handle (its argtypes stay untouched)."""

    def __init__(self):
        import numa  # py-libnuma; raises OSError/AttributeError when libnuma.so is missing

        lib = ctypes.CDLL(numa.LIBNUMA._name, use_errno=True)
        if lib.numa_available() < 0:
            raise OSError("libnuma reports NUMA unavailable (kernel without NUMA)")
        lib.numa_alloc_onnode.restype = ctypes.c_void_p
        lib.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
        lib.numa_free.restype = None
        lib.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.move_pages.restype = ctypes.c_long
        lib.move_pages.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int]
        lib.numa_max_node.restype = ctypes.c_int
        self.lib = lib


_state: tuple[_Lib | None, MemStatus] | None = None


def _memory_nodes() -> tuple[int, ...]:
    """Nodes with memory, from sysfs (libnuma's own view; a node without memory cannot hold pages)."""
    base = "/sys/devices/system/node"
    try:
        with open(f"{base}/has_memory" if os.path.exists(f"{base}/has_memory") else f"{base}/online") as f:
            text = f.read().strip()
    except OSError:
        return (0,)
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return tuple(out)


def _load() -> tuple[_Lib | None, MemStatus]:
    global _state
    if _state is None:
        nodes = _memory_nodes()
        try:
            lib = _Lib()
            _state = (lib, MemStatus(True, nodes, "libnuma: node-local allocation, pages verified"))
        except Exception as e:  # noqa: BLE001 - ImportError, OSError, AttributeError without the .so
            _state = (None, MemStatus(False, nodes, f"libnuma not available ({type(e).__name__}: {e}); "
                                                    f"memory is placed by first touch and not verified"))
    return _state


def status() -> MemStatus:
    return _load()[1]


class _NodeBlock:
    """Owns one numa_alloc_onnode block; numpy arrays made from it keep it alive (as their base)
    and it is freed when the last one goes."""

    def __init__(self, lib: _Lib, nbytes: int, node: int):
        self._lib, self.nbytes, self.node = lib, nbytes, node
        ptr = lib.lib.numa_alloc_onnode(max(nbytes, 1), node)
        if not ptr:
            raise MemoryError(f"numa_alloc_onnode could not allocate {nbytes} bytes on node {node}")
        if nbytes >= _HUGE_MIN:      # before the first touch; a refusal only costs speed
            _libc().madvise(ptr, nbytes, _MADV_HUGEPAGE)
        self.ptr = ptr
        self.__array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1",
                                    "version": 3}

    def __del__(self):
        self._lib.lib.numa_free(self.ptr, max(self.nbytes, 1))


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def empty_on_node(shape: tuple[int, ...], dtype, node: int) -> np.ndarray:
    """An uninitialised C-contiguous array whose pages are bound to memory node `node`.

    Without libnuma: a plain numpy array (first touch decides; `status().note` says so)."""
    lib, st = _load()
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if lib is None:
        return np.empty(shape, dtype)
    if node not in st.nodes:
        # libnuma would print "mbind: Invalid argument" and hand back unbound memory
        raise NumallmError(f"memory node {node} does not exist here (nodes with memory: "
                           f"{','.join(map(str, st.nodes))}); choose nodes from `numallm topo`")
    raw = np.asarray(_NodeBlock(lib, nbytes, node))                      # (nbytes,) uint8
    return raw.view(dtype).reshape(shape) if nbytes else np.empty(shape, dtype)


def to_node(a: np.ndarray, node: int, readonly: bool = True) -> np.ndarray:
    """A C-contiguous copy of `a` on memory node `node`; read-only by default, like the GGUF
    mapping weights come from (kernels compile one signature per array writability). Inside
    `packed()` it is carved out of that node's shared blocks."""
    arena = _arenas.get(node) if _arenas is not None else None
    if arena is None and _arenas is not None and _load()[0] is not None:
        arena = _arenas[node] = _Arena(node)
    out = arena.empty(a.shape, a.dtype) if arena else empty_on_node(a.shape, a.dtype, node)
    np.copyto(out, a)
    out.flags.writeable = not readonly
    return out


def pack(w):
    """Within `packed()`: a kernel unit's prepared weights `w` (an array, or a dataclass of
    arrays) with every array copied into shared blocks that ask for transparent huge pages
    (no node binding); outside, w itself. A model's repacked matrices are arrays of ~1-10 MB
    that numpy gives 4 KiB pages (it asks for huge pages only from 4 MiB, and only whole aligned
    2 MiB ranges get them): TinyLlama Q4_0 decode on one thread ran ~15% faster from packed
    copies on the development VM."""
    if _arenas is None:
        return w
    if isinstance(w, np.ndarray):
        return _packed_copy(w)
    if dataclasses.is_dataclass(w):
        return dataclasses.replace(w, **{f.name: _packed_copy(v) for f in dataclasses.fields(w)
                                         if isinstance(v := getattr(w, f.name), np.ndarray)})
    return w


def _packed_copy(a: np.ndarray) -> np.ndarray:
    arena = _arenas.get(None)
    if arena is None:
        arena = _arenas[None] = _Arena(None)
    out = arena.empty(a.shape, a.dtype)
    np.copyto(out, a)
    out.flags.writeable = a.flags.writeable       # kernels compile per writability
    return out


def _huge_block(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 block (not bound to a node) that asks for huge pages."""
    block = np.empty(nbytes, np.uint8)
    start = block.ctypes.data // PAGE * PAGE
    _libc().madvise(start, block.ctypes.data + nbytes - start, _MADV_HUGEPAGE)
    return block


class _Arena:
    """Arrays carved one after another out of ARENA_BYTES blocks on one node (64-byte aligned).
    A model's weight slices are thousands of arrays of ~1-10 MB: each in its own mmap they got
    few transparent huge pages (a 2 MiB page needs a 2 MiB-aligned range inside one mapping),
    in shared blocks nearly all of them do. A block lives as long as any array cut from it."""

    def __init__(self, node: int | None):
        self.node, self._block, self._used = node, None, 0   # node None: no binding

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes >= ARENA_BYTES // 4:                      # large: a block of its own
            return self._new(nbytes)[:nbytes].view(dtype).reshape(shape)
        at = -(-self._used // 64) * 64
        if self._block is None or at + nbytes > len(self._block):
            self._block = self._new(ARENA_BYTES)
            at = 0
        self._used = at + nbytes
        return self._block[at:at + nbytes].view(dtype).reshape(shape)

    def _new(self, nbytes: int) -> np.ndarray:
        if self.node is None:
            return _huge_block(nbytes)
        return empty_on_node((nbytes,), np.uint8, self.node)


ARENA_BYTES = 64 << 20
_arenas: dict[int, _Arena] | None = None


@contextlib.contextmanager
def packed():
    """Within, `to_node` packs its copies into shared per-node blocks and `pack` into shared
    unbound ones (see _Arena); restored on exit. The blocks' unused tails are never touched, so
    they take no memory."""
    global _arenas
    prev, _arenas = _arenas, {}
    try:
        yield
    finally:
        _arenas = prev


def _span(a: np.ndarray) -> tuple[int, int]:
    """First byte address and byte length of a C-contiguous array's data."""
    if not a.flags.c_contiguous:
        raise ValueError("where() needs a C-contiguous array")
    return a.__array_interface__["data"][0], a.nbytes


def where(a: np.ndarray) -> dict[int, int] | None:
    """Pages of `a` per memory node, as the kernel reports them now: {node: pages}.

    Pages not faulted in yet count under NOT_PRESENT (-2); other negative keys are errnos. None
    when libnuma is not available. Nothing moves: move_pages gets no target nodes."""
    lib, _ = _load()
    if lib is None:
        return None
    addr, nbytes = _span(a)
    if nbytes == 0:
        return {}
    first = addr - addr % PAGE
    pages = np.arange(first, addr + nbytes, PAGE, dtype=np.uint64)       # (n_pages,) addresses
    status_ = np.empty(min(len(pages), _CHUNK), dtype=np.int32)         # (chunk,) node or -errno
    counts: dict[int, int] = {}
    for s in range(0, len(pages), _CHUNK):
        chunk = pages[s:s + _CHUNK]
        st = status_[:len(chunk)]
        rc = lib.lib.move_pages(0, len(chunk), chunk.ctypes.data, None, st.ctypes.data, 0)
        if rc < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"move_pages failed: {os.strerror(err)}")
        vals, cnt = np.unique(st, return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    return counts


_MPOL_MF_MOVE = 2     # move_pages flag: move pages only this process maps


def move(a: np.ndarray, node: int) -> int:
    """Migrate the pages of `a` to memory node `node` (move_pages with targets); returns how many
    ended there. For tests and repairs: it undoes a placement, which `where` then shows. Needs
    libnuma (NumallmError without it)."""
    lib, st = _load()
    if lib is None:
        raise NumallmError(f"cannot move pages: {st.note}")
    if node not in st.nodes:
        raise NumallmError(f"memory node {node} does not exist here (nodes with memory: "
                           f"{','.join(map(str, st.nodes))})")
    addr, nbytes = _span(a)
    first = addr - addr % PAGE
    pages = np.arange(first, addr + nbytes, PAGE, dtype=np.uint64)       # (n_pages,) addresses
    targets = np.full(len(pages), node, dtype=np.int32)                 # (n_pages,)
    st_ = np.empty(len(pages), dtype=np.int32)                          # (n_pages,) node or -errno
    rc = lib.lib.move_pages(0, len(pages), pages.ctypes.data, targets.ctypes.data, st_.ctypes.data,
                            _MPOL_MF_MOVE)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages failed: {os.strerror(err)}")
    return int(np.count_nonzero(st_ == node))


def local_share(a: np.ndarray, node: int) -> float | None:
    """Fraction of `a`'s pages on `node` (0..1); None without libnuma."""
    counts = where(a)
    if counts is None:
        return None
    total = sum(counts.values())
    return counts.get(node, 0) / total if total else 1.0


_MADV_DONTNEED = 4


def release_file_pages(a: np.ndarray) -> int:
    """Drop this process's mapping of the pages fully inside `a` once they have been copied to a
    node: without it the GGUF pages read while copying stay in our RSS, doubling resident memory.
    Only for read-only np.memmap views (the file stays in the page cache; a later read just faults
    the page back in); anything else is left alone. Returns the bytes released."""
    b = a
    while b is not None and not isinstance(b, np.memmap):
        b = b.base
    if b is None or b.mode != "r" or not a.flags.c_contiguous:
        return 0
    addr, nbytes = _span(a)
    start = -(-addr // PAGE) * PAGE                  # whole pages only: neighbours stay mapped
    end = (addr + nbytes) // PAGE * PAGE
    if end <= start:
        return 0
    if _libc().madvise(start, end - start, _MADV_DONTNEED) != 0:
        return 0
    return end - start


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc malloc_trim). Many mid-sized arrays
    (a MoE tensor's experts, prepared one by one) live in the heap rather than in mmaps of their
    own once glibc's adaptive mmap threshold has grown, and freeing them returns nothing to the
    kernel: placement calls this after dropping each build copy it replaced by node slices, so
    the copies do not stay resident next to the slices. No-op without glibc."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass

