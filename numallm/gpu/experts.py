"""Routed experts on a GPU (a MoE block offloaded whole): the (E, N, K) tensor's GGUF bytes as
stored, one device array, each expert a GpuMatrix view of its N rows; the router's choice is made
on the host (ops.moe_route reads the logits, n_expert floats per token), and the products run
token by token, expert by expert: gate and up, silu(gate) * up, down, then the weighted add into
the output row (numallm.gpu.cuda_ops.axpy_row). Decode runs k experts of one token; a prefill
runs T * k, each a few small launches (no grouped kernel yet).
"""
from __future__ import annotations

import numpy as np

from .device import DeviceTensor, Gpu, to_gpu


class DeviceExperts:
    """An ExpertLinear (E, N, K) on one GPU, in its GGUF encoding."""

    def __init__(self, src, gpu: Gpu):
        from .cuda_kernels import GpuMatrix, device_layout

        self.name, self.qtype, self.shape, self.nbytes = src.name, src.qtype, src.shape, src.nbytes
        self.gpu = gpu
        n_exp, n, k = src.shape
        dev = gpu.put(device_layout(src.qtype, src.raw), "weights")      # (E * N, row) on the GPU
        self.mats = [GpuMatrix(src.qtype, (n, k), dev[e * n:(e + 1) * n]) for e in range(n_exp)]


def moe_ffn(x, ids: np.ndarray, weights: np.ndarray, gate: DeviceExperts, up: DeviceExperts,
            down: DeviceExperts) -> DeviceTensor:
    """sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j], on the experts'
    GPU. x: (T, K) anywhere; ids, weights: (T, k) on the host -> (T, N) on the GPU."""
    from . import cuda_ops as co

    g = gate.gpu
    with g.active():
        xt = to_gpu(x, g)
        t = xt.shape[0]
        x2 = xt.data.reshape(t, xt.shape[-1])
        n_ff, n_out = gate.shape[1], down.shape[1]
        out = DeviceTensor.new(g, (t, n_out))
        co.zero(out.data, t, g.launch)
        gt, ut = DeviceTensor.new(g, (1, n_ff)), DeviceTensor.new(g, (1, n_ff))
        st, dt = DeviceTensor.new(g, (1, n_ff)), DeviceTensor.new(g, (1, n_out))
        launches = 1
        for r in range(t):
            row = x2[r:r + 1]
            for e, w in zip(ids[r].tolist(), weights[r].tolist()):
                gate.mats[e].matmul(row, gt.data, 1, g.launch)
                up.mats[e].matmul(row, ut.data, 1, g.launch)
                co.swiglu(gt.data, ut.data, st.data, 1, g.launch)
                down.mats[e].matmul(st.data, dt.data, 1, g.launch)
                co.axpy_row(out.data, dt.data, w, r, g.launch)
                launches += 5
        g.launches += launches
    return out
