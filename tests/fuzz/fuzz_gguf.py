"""Fuzz the GGUF reader, the model's header arithmetic and construction, and the tokenizer's
metadata with atheris (libFuzzer for Python; `pip install atheris`, issue 13).

    python tests/fuzz/fuzz_gguf.py --seeds tests/fuzz/corpus      # write the seed corpus once
    python tests/fuzz/fuzz_gguf.py tests/fuzz/corpus -max_total_time=60 -rss_limit_mb=3072 -timeout=10
    python tests/fuzz/fuzz_gguf.py tests/fuzz/corpus -runs=1000000 -rss_limit_mb=3072 -timeout=10

Run from the repository root with numallm importable. A finding is any exception other than
numallm's one-line user errors (NumallmError), a hang past -timeout seconds, or a process over
-rss_limit_mb: libFuzzer stops and writes the input as crash-*/timeout-*/oom-* for a test.
Seeds: synthetic tiny models of each architecture (valid, several quant types), the hand-broken
files of tests/test_bad_input.py, and the header of stories260K when ../shared/models has it.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # tests/: test_bad_input's builders

from numallm.errors import NumallmError        # noqa: E402
from numallm.gguf_file import GGUFFile         # noqa: E402

# a file per input in memory-backed storage: GGUFFile maps a path, and a fresh name per input
# keeps a map of the previous input valid however long it lives
SCRATCH = Path(tempfile.mkdtemp(prefix="numallm-fuzz-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, SCRATCH, True)
MAX_MODEL_BYTES = 4 << 20     # build real weights (kernel repacks) only for inputs this small
_count = 0


def one_input(data: bytes) -> None:
    """Everything a hostile file can reach before generation; only NumallmError may escape."""
    global _count
    from numallm.models import get_module
    from numallm.placement import ModelSpec
    from numallm.tokenizer import Tokenizer

    _count += 1
    path = SCRATCH / f"{_count}.gguf"
    path.write_bytes(data)
    try:
        f = GGUFFile(path)
        args = ModelSpec.from_gguf(f).args         # header arithmetic + every tensor's shape
        if sum(t.nbytes for t in f.tensors.values()) <= MAX_MODEL_BYTES:
            get_module(f.architecture).Model(f)    # real construction: views, repacks, RoPE
        if f.get("tokenizer.ggml.model") is not None:
            Tokenizer.from_metadata(f.metadata)
        assert args.kv_bytes_per_token() >= 0
    except NumallmError:
        pass
    finally:
        path.unlink()


def write_seeds(out: Path) -> list[Path]:
    from test_bad_input import CASES, tiny_llama

    from numallm.synth import write_model

    out.mkdir(parents=True, exist_ok=True)
    made = []
    small = {"vocab": 300, "hidden": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "n_ff": 64}
    for arch in ("llama", "qwen2", "qwen3"):
        for qtype in ("F32", "Q8_0", "Q4_0") if arch == "llama" else ("Q8_0", "Q4_0"):
            made.append(write_model(out / f"synth-{arch}-{qtype}.gguf", arch=arch, qtype=qtype,
                                    shape=small, vocab="bytes" if arch != "llama" else "spm"))
    made.append(tiny_llama(out / "tiny-llama.gguf"))
    for name, (build, _) in CASES.items():
        if name != "missing_file":
            made.append(Path(build(out / f"broken-{name}.gguf")))
    stories = HERE.parents[2] / "shared" / "models" / "stories260K.gguf"
    if stories.is_file():
        f = GGUFFile(stories)
        (out / "stories260K-header.gguf").write_bytes(stories.read_bytes()[:f.data_offset])
        made.append(out / "stories260K-header.gguf")
    return [Path(p) for p in made]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--seeds":
        for p in write_seeds(Path(sys.argv[2])):
            print(f"{p} {p.stat().st_size} bytes")
        return
    import atheris

    atheris.Setup(sys.argv, one_input)
    _instrument(atheris, "numallm.gguf_file", "numallm.models", "numallm.models.base",
                "numallm.models.llama", "numallm.models.qwen2", "numallm.models.qwen3",
                "numallm.tokenizer")
    atheris.Fuzz()


def _instrument(atheris, *names: str) -> None:
    """Coverage feedback from the modules a hostile file reaches, patched in place after import:
    importing numallm loads everything at once, and instrumenting the Numba kernels' Python
    source would break their compilation (so instrument_imports and instrument_all do not fit)."""
    import importlib
    import types

    for name in names:
        mod = importlib.import_module(name)
        for obj in list(vars(mod).values()):
            if getattr(obj, "__module__", None) != name:
                continue
            funcs = [obj] if isinstance(obj, types.FunctionType) else []
            if isinstance(obj, type):
                for v in vars(obj).values():
                    v = getattr(v, "__func__", v)                       # class/static methods
                    v = v.fget if isinstance(v, property) else v
                    if isinstance(v, types.FunctionType):
                        funcs.append(v)
            for f in funcs:
                atheris.instrument_func(f)


if __name__ == "__main__":
    main()
