"""Whether llama.cpp (through llama-cpp-python, an optional dependency: the tests' numerics
oracle and `numallm bench --vs-llama-cpp`) can run on this CPU, and bench's llama.cpp runner.

pip builds llama-cpp-python with -march=native, so on a CPU that lists AMX it compiles llama.cpp's
AMX matrix kernels in and uses them for Q4_0/Q8_0/K-quant weights. On the development VM (an
Intel Xeon whose /proc/cpuinfo lists amx_tile and amx_int8) the first such product segfaults
(in ggml_backend_amx_mul_mat), which kills the calling process: a test run or a benchmark would
end with no message at all. So before the first use, an AMX build evaluates a tiny model in a
child process; if that dies, `problem()` says why and how to rebuild without AMX.
"""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import tempfile
import time

import numpy as np

from .cache_types import DEFAULT_CACHE_TYPE
from .errors import NumallmError

# a build without AMX that keeps the other x86 paths (AVX-512 VNNI, llama.cpp's repacking)
REBUILD = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
           '-DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON '
           '-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF" '
           'pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python')

_PROBE = """
import sys
import llama_cpp
from numallm import synth
path = synth.write_model(sys.argv[1] + "/probe.gguf", qtype="Q4_0", shape="tiny")
llm = llama_cpp.Llama(str(path), n_ctx=32, n_threads=1, verbose=False)
llm.eval([1, 2, 3, 4])
llm.eval([5])
llm.close()
"""


def has_amx_kernels() -> bool:
    """The installed llama-cpp-python was built with llama.cpp's AMX kernels."""
    import llama_cpp

    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


@functools.lru_cache(maxsize=None)
def problem() -> str | None:
    """None when llama.cpp can evaluate a model here; else one line: what is wrong and what to
    do. Checked once per process (an AMX build: a child process evaluates a tiny model)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if not has_amx_kernels():
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE, d], capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            return "llama.cpp did not evaluate a tiny model within 10 minutes"
    if r.returncode == 0:
        return None
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
    return (f"this llama-cpp-python build's AMX kernels crash on this CPU ({how} evaluating a tiny "
            f"model); rebuild it without AMX: {REBUILD}")


class LlamaCppRunner:
    """The same tests through llama-cpp-python's Llama.eval on the same file."""

    engine = "llama.cpp"
    N_BATCH = 512
    numa = ""                # llama.cpp's own NUMA handling is not driven from here
    last_sync_s = None

    # numallm.cache_types name -> llama.cpp's ggml_type (type_k / type_v)
    GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}

    def __init__(self, path: str, n_threads: int, n_ctx: int,
                 cache_types: tuple[str, str] = (DEFAULT_CACHE_TYPE, DEFAULT_CACHE_TYPE)):
        """The KV cache in cache_types, as numallm's; a quantized V needs llama.cpp's flash
        attention, turned on only then (llama-cpp-python's default is off)."""
        why = problem()
        if why:
            raise NumallmError(f"--vs-llama-cpp: {why}")
        import llama_cpp

        tk, tv = cache_types
        try:
            self.llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=n_threads,
                                       n_threads_batch=n_threads, n_batch=self.N_BATCH,
                                       type_k=self.GGML_TYPES[tk], type_v=self.GGML_TYPES[tv],
                                       flash_attn=tv == "q8_0", verbose=False)
        except (ValueError, RuntimeError) as e:
            raise NumallmError(f"llama.cpp cannot load {path} ({e}); run without --vs-llama-cpp") from e

    def prefill(self, tokens: np.ndarray, pos0: int = 0) -> tuple[float, int]:
        self.llm.n_tokens = pos0   # eval drops the KV cells from n_tokens on (0: reset)
        # llama_decode on the CPU backend returns when the graph is computed: no sync needed
        t0 = time.perf_counter()
        self.llm.eval(tokens.tolist())
        return time.perf_counter() - t0, -(-len(tokens) // self.N_BATCH)

    def decode(self, prompt: np.ndarray, tokens: np.ndarray) -> float:
        self.prime(prompt)
        return self.decode_at(len(prompt), tokens)

    def prime(self, tokens: np.ndarray) -> None:
        self.llm.reset()
        self.llm.eval(tokens.tolist())

    def decode_at(self, pos0: int, tokens: np.ndarray) -> float:
        self.llm.n_tokens = pos0
        ids = tokens.tolist()
        t0 = time.perf_counter()
        for t in ids:
            self.llm.eval([t])
        return time.perf_counter() - t0

    def non_kernel_s(self, prompt: np.ndarray | None, tokens: np.ndarray, pos0: int = 0) -> None:
        return None       # not measurable from outside llama.cpp

    def close(self) -> None:
        self.llm.close()
