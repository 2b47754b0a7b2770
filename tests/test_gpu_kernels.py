"""GPU kernels (numallm.gpu.cuda_kernels / cuda_ops) in Numba's CUDA simulator, on tiny shapes,
against gguf-py's dequantizer, the CPU kernel units (numallm_kernels) and the CPU ops (numallm.ops).

tests/conftest.py turns the simulator on (NUMBA_ENABLE_CUDASIM=1) unless the environment says
otherwise, so on a machine with a GPU `NUMBA_ENABLE_CUDASIM=0 pytest tests/test_gpu_kernels.py`
runs the same checks on the device. The simulator starts one Python thread per CUDA thread:
shapes are chosen to exercise every path (partial tiles, grid-stride loops, idle lanes, GQA)
with as few threads as possible.

test_kernels_compile_for_a_real_gpu compiles every kernel to PTX with NVVM (no GPU needed) where
the `gpu` extra is installed, so the simulator cannot hide code a real GPU would reject.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numallm import ops
from numallm.gguf_file import GGMLQuantizationType as T
from numallm.gguf_file import quant_sizes, reference_dequantize, reference_quantize
import numallm_kernels as nk

# not importorskip: CI must run these in the simulator, so a numba without numba.cuda (and no
# numba-cuda installed) fails here instead of skipping quietly
from numba import cuda  # noqa: E402
from numallm.gpu import cuda_kernels as ck  # noqa: E402
from numallm.gpu import cuda_ops as co  # noqa: E402

# several lanes and blocks, so the tree reductions and grid-stride loops all run
LAUNCH = ck.Launch.coverage()
TYPES = [T.F32, T.F16, T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K]
KQ_F16 = {T.Q4_K: (0, 2), T.Q6_K: (208,)}   # byte offsets of the f16 super-scales


@pytest.fixture(autouse=True)
def _pace(request):
    if request.function is test_kernels_compile_for_a_real_gpu:   # needs NVVM, not a device
        yield
        return
    if not cuda.is_available():
        pytest.skip("no CUDA device and the simulator is off (NUMBA_ENABLE_CUDASIM=0)")
    with ck.simulator_pace():
        yield


def nmse(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sum((got - want) ** 2) / np.sum(want ** 2))


def weights(qtype, n, k, rng) -> np.ndarray:
    """Raw GGUF rows uint8 (n, row_bytes). K-quants (gguf-py cannot quantize them): random bytes
    with sane f16 super-scales, so every quant and sub-block-scale bit pattern is exercised."""
    if qtype in KQ_F16:
        bs, ts = quant_sizes(qtype)
        raw = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
        for off in KQ_F16[qtype]:
            raw[:, :, off:off + 2] = rng.uniform(1e-4, 1e-2, (n, k // bs, 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(n, -1)
    vals = rng.standard_normal((n, k)).astype(np.float32)
    return np.ascontiguousarray(reference_quantize(vals, qtype)).reshape(n, -1).view(np.uint8)


def gpu_matmul(qtype, raw, x) -> np.ndarray:
    n, k = raw.shape[0], x.shape[1]
    m = ck.GpuMatrix(qtype, (n, k), cuda.to_device(ck.device_layout(qtype, raw)))
    out = cuda.device_array((x.shape[0], n), np.float32)
    m.matmul(cuda.to_device(x), out, x.shape[0], LAUNCH)
    return out.copy_to_host()


# K: not a multiple of the lanes for F32 (idle lanes, a partial last pass), 2 units for the
# 32-value types, one super-block for K-quants. N = 5 rows: 3 row groups of 2 over a grid of 2
# blocks in the simulator, so the grid-stride loop and a half-empty group both run.
SHAPES = {T.F32: 42, T.F16: 64, T.Q4_0: 64, T.Q8_0: 64, T.Q4_K: 256, T.Q6_K: 256}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_dequantized_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = weights(qtype, 5, SHAPES[qtype], rng)
    w = reference_dequantize(raw, qtype).reshape(5, -1).astype(np.float64)
    for n_tok in (1, 3):
        x = rng.standard_normal((n_tok, SHAPES[qtype])).astype(np.float32)
        got = gpu_matmul(qtype, raw, x)
        # the decoders are exact, so only float32 summation rounding remains
        assert nmse(got, x @ w.T) < 1e-12, (qtype.name, n_tok)


def test_matmul_tiles_past_eight_tokens():
    rng = np.random.default_rng(7)
    raw = weights(T.Q4_0, 3, 32, rng)
    x = rng.standard_normal((9, 32)).astype(np.float32)          # tiles of 8 + 1
    w = reference_dequantize(raw, T.Q4_0).reshape(3, -1).astype(np.float64)
    assert nmse(gpu_matmul(T.Q4_0, raw, x), x @ w.T) < 1e-12


# The CPU units quantize x to int8 for the block types (Q8_0-style for Q4_0/Q8_0, Q8_K for
# K-quants), which costs ~1e-4 of relative error energy; F32/F16 are float on both sides.
CPU_NMSE = {T.F32: 1e-12, T.F16: 1e-12, T.Q4_0: 1e-3, T.Q8_0: 1e-3, T.Q4_K: 1e-3, T.Q6_K: 1e-3}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_matches_the_cpu_unit(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    k = SHAPES[qtype]
    raw = weights(qtype, 5, k, rng)
    x = rng.standard_normal(k).astype(np.float32)
    unit = nk.get(qtype)
    want = np.empty(5, np.float32)
    unit.matvec(unit.prepare(raw), x, want, 0, 5)
    assert nmse(gpu_matmul(qtype, raw, x[None])[0], want) < CPU_NMSE[qtype]


def test_half_decoder_handles_every_class_of_value():
    halves = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.1e-5, 6e-8, -3e-6, np.inf, -np.inf, np.nan],
                      dtype=np.float16)
    raw = np.ascontiguousarray(halves.view(np.uint8).reshape(1, -1))
    out = np.zeros(len(halves), np.float32)

    @cuda.jit
    def decode_all(raw, out):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = ck.f16_at(raw, 0, 2 * i)

    decode_all[1, len(halves)](raw, out)
    want = halves.astype(np.float32)
    assert np.array_equal(out, want, equal_nan=True)
    assert np.array_equal(np.signbit(out), np.signbit(want))


def test_rms_norm_matches_ops_in_place_too():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(40)).astype(np.float32)
    want = ops.rms_norm(x, w, 1e-5)
    dx, dw = cuda.to_device(x), cuda.to_device(w)
    out = cuda.device_array_like(x)
    co.rms_norm(dx, dw, out, 3, 1e-5, LAUNCH)
    assert nmse(out.copy_to_host(), want) < 1e-13
    co.rms_norm(dx, dw, dx, 3, 1e-5, LAUNCH)           # qwen3's q/k norm: in place
    assert nmse(dx.copy_to_host(), want) < 1e-13


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
def test_rope_matches_ops(neox):
    rng = np.random.default_rng(2)
    factors = rng.uniform(1, 4, 4).astype(np.float32)              # Llama-3 style divisors
    rope = ops.Rope(8, 10000.0, neox, freq_scale=0.5, freq_factors=factors)
    x = rng.standard_normal((3, 2, 10)).astype(np.float32)          # rope_dim 8 < head_dim 10
    want = rope(x.copy(), 7)
    dx = cuda.to_device(x)
    co.rope(dx, 7, 3, cuda.to_device(rope.inv_freq), rope.freq_scale, 8, neox, LAUNCH)
    got = dx.copy_to_host()
    assert nmse(got, want) < 1e-13 and np.array_equal(got[..., 8:], x[..., 8:])


def test_yarn_rope_matches_ops():
    """YaRN (deepseek2's and the Qwen long-context GGUFs'): per-pair position scales from the
    ramp, cos/sin times mscale; the device table is inv_freq * pos_scale, as the executor
    uploads it (gpu.device.rope_table)."""
    rng = np.random.default_rng(3)
    lo, hi = ops.yarn_corr_dims(16, 32, 10000.0, 32.0, 1.0)
    rope = ops.Rope(16, 10000.0, False, 0.25, ext_factor=1.0, corr_dims=(lo, hi), mscale=1.3)
    assert len(set(rope.pos_scale.tolist())) > 2                        # a real ramp
    x = rng.standard_normal((4, 3, 16)).astype(np.float32)
    want = rope(x.copy(), 40)
    dx = cuda.to_device(x)
    co.rope(dx, 40, 4, cuda.to_device(rope.inv_freq * rope.pos_scale), 1.0, 16, False, LAUNCH,
            rope.mscale)
    assert nmse(dx.copy_to_host(), want) < 1e-13


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_attention_prefill_then_decode_matches_ops(kv_dtype):
    """GQA 2:1, a 5-token prefill (causal mask, chunks of the 8 simulated threads) and two
    decode steps; the f16 cache adds its rounding (~1e-7 of error energy)."""
    rng = np.random.default_rng(3)
    n_head, n_kv, hd, n_ctx = 4, 2, 8, 16
    cache = ops.KVCache(n_ctx, n_kv, hd, type_k="f32", type_v="f32")   # the host reference
    kc = cuda.to_device(np.zeros((n_kv, n_ctx, hd), kv_dtype))
    vc = cuda.to_device(np.zeros((n_kv, n_ctx, hd), kv_dtype))
    bound = 1e-12 if kv_dtype == np.float32 else 1e-6
    pos = 0
    for n_tok in (5, 1, 1):
        q = rng.standard_normal((n_tok, n_head, hd)).astype(np.float32)
        k = rng.standard_normal((n_tok, n_kv, hd)).astype(np.float32)
        v = rng.standard_normal((n_tok, n_kv, hd)).astype(np.float32)
        want = ops.attention(q, k, v, cache, pos)
        co.kv_store(cuda.to_device(k), cuda.to_device(v), kc, vc, pos, n_tok, LAUNCH)
        out = cuda.device_array((n_tok, n_head * hd), np.float32)
        co.attention(cuda.to_device(q), kc, vc, out, pos, n_tok, LAUNCH)
        assert nmse(out.copy_to_host(), want) < bound, (n_tok, pos)
        pos += n_tok
    assert kc.copy_to_host().dtype == kv_dtype


def test_attention_spans_several_chunks():
    """More cached positions (19) than threads per block (8): the online softmax rescales."""
    rng = np.random.default_rng(4)
    cache = ops.KVCache(24, 1, 8, type_k="f32", type_v="f32")
    q = rng.standard_normal((1, 2, 8)).astype(np.float32) * 3       # peaked scores
    k = rng.standard_normal((19, 1, 8)).astype(np.float32)
    v = rng.standard_normal((19, 1, 8)).astype(np.float32)
    ops.attention(rng.standard_normal((18, 2, 8)).astype(np.float32), k[:18], v[:18], cache, 0)
    want = ops.attention(q, k[18:], v[18:], cache, 18)
    kc, vc = cuda.to_device(cache.k.a), cuda.to_device(cache.v.a)
    out = cuda.device_array((1, 16), np.float32)
    co.attention(cuda.to_device(q), kc, vc, out, 18, 1, LAUNCH)
    assert nmse(out.copy_to_host(), want) < 1e-12


def test_elementwise_ops_match_numpy():
    rng = np.random.default_rng(5)
    g, u = (rng.standard_normal((3, 12)).astype(np.float32) for _ in range(2))
    b = rng.standard_normal(12).astype(np.float32)
    launch = LAUNCH
    d, out = cuda.to_device(g), cuda.to_device(np.zeros_like(g))
    co.swiglu(d, cuda.to_device(u), out, 2, launch)                 # only the first 2 rows
    got = out.copy_to_host()
    assert nmse(got[:2], ops.silu(g[:2]) * u[:2]) < 1e-13 and not got[2].any()
    co.swiglu(d, cuda.to_device(u), d, 3, launch)                   # in place
    assert nmse(d.copy_to_host(), ops.silu(g) * u) < 1e-13
    out = cuda.to_device(np.zeros_like(g))
    co.add(cuda.to_device(g), cuda.to_device(u), out, 3, launch)
    assert np.array_equal(out.copy_to_host(), g + u)
    co.add(cuda.to_device(g), cuda.to_device(b.reshape(1, 12)), out, 2, launch)   # a bias row
    got = out.copy_to_host()
    assert np.array_equal(got[:2], g[:2] + b) and np.array_equal(got[2], g[2] + u[2])

PTX_SCRIPT = textwrap.dedent("""
    import sys, types
    from numba import cuda, types as nt
    if getattr(cuda, "implementation", "") != "NVIDIA":
        print("SKIP the compile check needs NVIDIA's numba-cuda (the gpu extra), not numba's "
              "deprecated built-in CUDA target")
        sys.exit(0)
    cc, why = None, ""
    for want in ((6, 1), (7, 5)):               # the planner's minimum; CUDA 13's NVVM starts at 7.5
        try:
            cuda.compile_ptx(lambda a: None, (nt.float32[::1],), cc=want)
            cc = want
            break
        except Exception as e:                  # no NVVM, or one without this architecture
            why = f"{type(e).__name__}: {e}".replace("\\n", " ")
    if cc is None:
        print("SKIP", why)
        sys.exit(0)
    import numba.cuda.dispatcher as disp
    # device functions compile for "the current device": name one, there is no GPU here
    disp.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    from numallm.gpu import cuda_kernels as ck, cuda_ops as co
    f32, f64, i64 = nt.float32, nt.float64, nt.int64
    a2, a3 = f32[:, ::1], f32[:, :, ::1]
    sigs = [(k.py_func, ({"uint8": nt.uint8, "float32": f32, "float16": nt.float16}[dt.__name__][:, ::1],
                         a2, a2, i64, i64, i64)) for k, dt, _ in ck._KERNELS.values()]
    for kv in (f32, nt.float16):
        sigs += [(co._kv_store.py_func, (a3, a3, kv[:, :, ::1], kv[:, :, ::1], i64, i64)),
                 (co._attention.py_func, (a3, kv[:, :, ::1], kv[:, :, ::1], a2, i64, i64, i64, f32))]
    sigs += [(co._rms_norm.py_func, (a2, f32[::1], a2, i64, i64, f64)),
             (co._rope.py_func, (a3, i64, i64, i64, f64[::1], f64, i64, nt.boolean, f64)),
             (co._swiglu.py_func, (a2, a2, a2, i64)), (co._add.py_func, (a2, a2, a2, i64)),
             (co._sigmoid_gate.py_func, (a2, a2, f32[::1], a2, i64)),
             (co._axpy_row.py_func, (a2, a2, f32, i64)), (co._zero.py_func, (a2, i64))]
    for fn, sig in sigs:
        cuda.compile_ptx(fn, sig, cc=cc)
    print("OK", len(sigs), "kernels for sm_%d%d" % cc)
""")


def test_kernels_compile_for_a_real_gpu():
    """Every kernel, for every argument type the executor passes, through NVVM to PTX for
    sm_61 (or sm_75 where the toolkit has no sm_61)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip()[5:300])
    assert r.stdout.startswith("OK"), r.stdout
    print(r.stdout.strip())


def test_planner_offloads_exactly_the_types_the_kernels_compute():
    from numallm.gpu.plan import GPU_TYPES

    assert GPU_TYPES == ck.SUPPORTED


@pytest.mark.skipif(not ck.simulated(), reason="the simulator's shared arrays")
def test_simulator_shared_arrays_are_one_per_kernel_line_under_a_lock():
    """ck.simulator_pace puts numba's simulator shared-array lookup under a lock (a race gave two
    threads of a block different arrays); it must keep the simulator's keying: one array per
    kernel line, the same for every thread that asks, another for another line."""
    import threading
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    with ck.simulator_pace():
        pass
    shared, got = FakeCUDAShared(0), []

    def ask():
        got.append(shared.array(8, np.float32))    # one line, asked by every thread

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = shared.array(8, np.float32)
    assert all(a is got[0] for a in got) and other is not got[0] and got[0].shape == (8,)
