"""GPU offload: inventory (what GPUs there are), plan (which layers go where, and the bytes).

    from numallm.gpu import OffloadRequest, discover_gpus, make_plan

The inventory and the planner are pure Python (no GPU library). Running offloaded layers needs
the `gpu` extra (pip install 'numallm[gpu]'): numallm.gpu.offload moves a block's declared tensors
to its GPU, numallm.gpu.device runs the model's own forward on them (ops dispatch on device
tensors), numallm.gpu.hybrid runs a GPU block's routed experts on the CPU (--cpu-moe),
numallm.gpu.experts runs them on the GPU, numallm.gpu.cuda_kernels / cuda_ops are the kernels;
numallm.gpu.traffic is the PCIe traffic and decode speed a plan predicts. See docs/gpu.md.
"""
from __future__ import annotations

from .inventory import MIN_COMPUTE_CAPABILITY, GpuDevice, GpuError, discover_gpus, parse_size
from .plan import GPU_TYPES, DeviceUse, LayerPlan, OffloadPlan, OffloadRequest, make_plan
from .sizes import device_buffer_bytes, device_buffers, layer_kv_bytes

__all__ = ["MIN_COMPUTE_CAPABILITY", "GpuDevice", "GpuError", "discover_gpus", "parse_size",
           "GPU_TYPES", "DeviceUse", "LayerPlan", "OffloadPlan", "OffloadRequest",
           "device_buffer_bytes", "device_buffers", "layer_kv_bytes", "make_plan"]
