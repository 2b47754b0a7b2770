"""Node-local allocation and page verification on this machine's real node(s)."""
import gc

import numpy as np
import pytest

from numallm import numa_mem
from numallm.errors import NumallmError

needs_libnuma = pytest.mark.skipif(not numa_mem.status().available, reason=numa_mem.status().note)


@needs_libnuma
@pytest.mark.parametrize("node", numa_mem.status().nodes)
def test_copy_lands_on_node_and_is_verified(node):
    src = np.arange(3 * numa_mem.PAGE + 123, dtype=np.uint8).reshape(-1, 1)  # spans 4+ pages
    buf = numa_mem.to_node(src, node)
    assert np.array_equal(buf, src) and buf.dtype == src.dtype and buf.shape == src.shape
    assert not buf.flags.writeable and buf.flags.c_contiguous
    counts = numa_mem.where(buf)
    assert counts == {node: 4}
    assert numa_mem.local_share(buf, node) == 1.0


@needs_libnuma
def test_untouched_pages_are_reported_absent_not_local():
    node = numa_mem.status().nodes[0]
    buf = numa_mem.empty_on_node((8 * numa_mem.PAGE,), np.uint8, node)   # never touched
    counts = numa_mem.where(buf)
    assert counts.get(numa_mem.NOT_PRESENT, 0) == 8 and counts.get(node, 0) == 0
    buf[: numa_mem.PAGE] = 1                                              # fault one page in
    assert numa_mem.where(buf) == {node: 1, numa_mem.NOT_PRESENT: 7}
    assert numa_mem.local_share(buf, node) == pytest.approx(1 / 8)


@needs_libnuma
def test_ordinary_numpy_memory_is_reported_too():
    a = np.ones(4 * numa_mem.PAGE, np.uint8)
    counts = numa_mem.where(a)
    assert sum(counts.values()) in (4, 5)            # 4 or 5 pages depending on alignment
    assert set(counts) <= set(numa_mem.status().nodes)


@needs_libnuma
def test_views_keep_the_block_alive():
    node = numa_mem.status().nodes[0]
    v = numa_mem.to_node(np.full((64, 100), 7, np.float32), node)[10:20]
    gc.collect()
    assert float(v.sum()) == 7 * 10 * 100


@needs_libnuma
def test_missing_node_is_a_user_error():
    bad = max(numa_mem.status().nodes) + 1
    with pytest.raises(NumallmError, match=f"memory node {bad} does not exist"):
        numa_mem.empty_on_node((10,), np.uint8, bad)


def test_without_libnuma_degrades_with_a_note(monkeypatch):
    def missing():
        raise OSError("libnuma.so.1: cannot open shared object file")

    monkeypatch.setattr(numa_mem, "_state", None)
    monkeypatch.setattr(numa_mem, "_Lib", missing)
    st = numa_mem.status()
    assert not st.available and "OSError" in st.note and "first touch" in st.note
    a = numa_mem.to_node(np.arange(10, dtype=np.int32), 0)
    assert a.tolist() == list(range(10))
    assert numa_mem.where(a) is None and numa_mem.local_share(a, 0) is None


def test_release_file_pages_drops_rss_and_keeps_data(tmp_path):
    import psutil

    f = tmp_path / "w.bin"
    f.write_bytes(np.arange(16 << 20, dtype=np.uint8).tobytes())          # 16 MiB
    m = np.memmap(f, dtype=np.uint8, mode="r").reshape(1024, -1)         # (rows, row_bytes)
    proc = psutil.Process()
    before = proc.memory_info().rss
    total = int(m.sum(dtype=np.uint64))                                   # faults every page in
    touched = proc.memory_info().rss
    assert touched - before > 12 << 20
    assert numa_mem.release_file_pages(m[:512]) == 8 << 20
    assert touched - proc.memory_info().rss > 6 << 20
    assert int(m.sum(dtype=np.uint64)) == total                           # re-read from the file
    anon = np.ones(1 << 20, np.uint8)
    assert numa_mem.release_file_pages(anon) == 0 and anon.all()          # not a file: untouched


@needs_libnuma
def test_move_reports_pages_moved_and_refuses_a_missing_node():
    node = numa_mem.status().nodes[0]
    a = numa_mem.to_node(np.ones(300_000, np.float32), node)       # 1.2 MB: ~293 pages
    pages = sum(numa_mem.where(a).values())
    assert numa_mem.move(a, node) == pages and numa_mem.where(a) == {node: pages}
    with pytest.raises(NumallmError, match="memory node 77 does not exist here"):
        numa_mem.move(a, 77)
    # moving pages to another node for real: tests/system/test_numa_vm.py (2-node VM)


@needs_libnuma
def test_packed_copies_share_node_blocks_and_stay_verifiable():
    """Inside packed(), to_node carves copies out of shared per-node blocks (64-byte aligned,
    kept alive by the copies), so slices can get huge pages; outside, each copy has its own."""
    node = numa_mem.status().nodes[0]
    rng = np.random.default_rng(0)
    srcs = [rng.integers(0, 255, (n, 3), dtype=np.uint8) for n in (5000, 1, 70000)]
    with numa_mem.packed():
        bufs = [numa_mem.to_node(s, node) for s in srcs]
    for s, b in zip(srcs, bufs):
        assert np.array_equal(b, s) and not b.flags.writeable and b.ctypes.data % 64 == 0
        assert numa_mem.local_share(b, node) == 1.0
    roots = [b.base.base for b in bufs]                 # view -> block slice -> the block
    assert all(r is roots[0] for r in roots)
    big = numa_mem.ARENA_BYTES // 2                     # large copies get a block of their own
    with numa_mem.packed():
        own = numa_mem.to_node(np.zeros(big, np.uint8), node)
    assert own.base is not None and own.base.base is not roots[0] and own.nbytes == big
    lone = numa_mem.to_node(srcs[0], node)              # outside: its own block
    assert lone.base.base is not roots[0]
    del bufs, roots
    gc.collect()


def test_pack_copies_prepared_weights_into_shared_blocks():
    """pack() inside packed(): every array of a prepared-weights dataclass copied (values and
    writability kept) into one shared block; outside packed(): the object itself."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class W:
        q: np.ndarray
        d: np.ndarray
        n: int

    q = np.arange(3000, dtype=np.uint8).reshape(100, 30)
    q.flags.writeable = False
    w = W(q, np.linspace(0, 1, 77, dtype=np.float32), 5)
    assert numa_mem.pack(w) is w
    with numa_mem.packed():
        p = numa_mem.pack(w)
        a = numa_mem.pack(np.ones(10, np.float32))
    assert p is not w and p.n == 5
    assert np.array_equal(p.q, w.q) and np.array_equal(p.d, w.d) and (a == 1).all()
    assert not p.q.flags.writeable and p.d.flags.writeable
    assert not np.shares_memory(p.q, w.q)

    def root(x):
        while isinstance(x.base, np.ndarray):
            x = x.base
        return x
    assert root(p.q) is root(p.d) is root(a)                 # one block
