#!/usr/bin/env bash
# The prepared device check of issue 18: run it once on a machine with an NVIDIA GPU, from the
# repository root, with no network:
#
#     bash benchmarks/gpu_check.sh            # (OUT=dir to keep the logs and the table there)
#
# 1. puts numallm (this checkout, through a folder of links) and any wheels at hand (WHEELS=dir,
#    default .whl/, installed with --target, never from the network) on the system Python's
#    path, and the `gpu` extra (numba-cuda, nvidia-ml-py): the system's where it has them, else
#    from the wheels;
# 2. checks that CUDA is usable (not the simulator) and prints the device;
# 3. runs the GPU tests with the simulator off (NUMBA_ENABLE_CUDASIM=0): kernels, offload, hybrid MoE;
# 4. writes two synthetic models (numallm.synth; nothing is downloaded), in the background while
#    the tests run: a TinyLlama-1.1B-shape Q4_0 and the MoE bench shape, Qwen3-30B-A3B's layer
#    (synth "qwen3-30b-a3b", 128 experts, top 8) with MOE_LAYERS layers (default 2), Q4_0; and
#    DeepSeek-V2-Lite's layer shape (synth_deepseek "v2-lite-4l": MLA with a 512 + 64 latent, 64
#    experts, top 6, 2 shared; a 32000-token vocabulary) with DS_LAYERS layers (default 2: the dense
#    one and one MoE), Q4_0;
# 5. benchmarks decode (numallm bench -p 0 -n 16 -r 2) CPU-only against `-ngl all` (dense) and against
#    `-ngl all --cpu-moe` (MoE and deepseek2: attention (MLA), router, shared experts and the KV
#    cache on the GPU, routed experts on the CPU), and prints one table.
#
# Each step has its own time limit, all together under 10 minutes (run it with the device tool's
# timeout_s=600); a step that fails or runs out says which and the script goes on where that
# makes sense (the table lists what was measured). Exit status: 0 all steps passed, 1 a step
# failed, 2 no GPU here.
#
# Wheels the device image may lack (the gpu machines of this workplace have numba, numba-cuda,
# nvidia-ml-py, psutil, jinja2, tokenizers, threadpoolctl, huggingface_hub, tqdm, pytest; not
# gguf or py-libnuma): fetch them where pip has a network, into .whl/ (ignored by git), e.g.
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         gguf==0.19.0 py_libnuma
# (py-libnuma is optional at run time: without it memory placement is by first touch.)
set -euo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-/tmp/numallm-gpu-check}
mkdir -p "$OUT_DIR"
WHEELS=${WHEELS:-.whl}
VPY=${PYTHON:-python3}
SHIM=${SHIM:-/tmp/numallm-gpu-check-path}
SITE=${SITE:-/tmp/numallm-gpu-check-site}
MODELS=${MODELS:-/tmp/numallm-gpu-check-models}
THREADS=${THREADS:-$(nproc)}
export MOE_LAYERS=${MOE_LAYERS:-2} DS_LAYERS=${DS_LAYERS:-2}
FAILED=()

step() { printf '\n== %s (limit %ss)\n' "$1" "$2"; }
# run LIMIT NAME CMD...: CMD under a time limit, its output also in $OUT_DIR/NAME.log
run() {
    local limit=$1 name=$2
    shift 2
    set +e
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "!! $name: ran past its ${limit}s limit"
        FAILED+=("$name (time limit)")
    elif [ "$rc" -ne 0 ]; then
        echo "!! $name: exit status $rc"
        FAILED+=("$name (exit $rc)")
    fi
    return 0
}

step "1/5 packages" 240
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no NVIDIA GPU here (nvidia-smi finds none): nothing to check"
    exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,pci.bus_id --format=csv
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# numallm runs from this checkout (no build, no pip: the image's Python may itself be a venv,
# whose packages a nested --system-site-packages venv would not see): a folder of links puts
# numallm and numallm_kernels (kernels/) on the path, over the system's packages
mkdir -p "$SHIM" "$SITE"
ln -sfn "$PWD/numallm" "$SHIM/numallm"
ln -sfn "$PWD/kernels" "$SHIM/numallm_kernels"
export PYTHONPATH="$SHIM:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    timeout 180 "$VPY" -m pip install -q --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || \
        echo "note: some wheels in $WHEELS did not install (see above)"
fi
# the gpu extra (numba-cuda, nvidia-ml-py): the system's where it has them, else from the wheels
if "$VPY" -c "import numba_cuda, pynvml" 2>/dev/null || "$VPY" -c "import numba.cuda, pynvml" 2>/dev/null; then
    echo "gpu extra: numba-cuda and nvidia-ml-py are installed ($("$VPY" -m pip show numba-cuda 2>/dev/null | sed -n 2p))"
elif timeout 180 "$VPY" -m pip install -q --target "$SITE" --find-links "$WHEELS" 'numba-cuda[cu12]>=0.30' 'nvidia-ml-py>=12'; then
    echo "gpu extra: installed from $WHEELS"
else
    echo "note: the gpu extra is neither installed nor in $WHEELS; step 2 will say what is missing"
fi

step "2/5 CUDA" 120
export NUMBA_ENABLE_CUDASIM=0 PYTHONUNBUFFERED=1
if ! timeout 120 "$VPY" - <<'EOF'
import importlib, sys
missing = [m for m in ("numpy", "numba", "gguf", "psutil", "threadpoolctl", "tokenizers", "jinja2",
                       "numallm", "numallm_kernels") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (put their wheels in .whl/, see the header)")
from numba import cuda
if not cuda.is_available():
    sys.exit(f"CUDA is not usable from numba: {cuda.cuda_error()}")
d = cuda.get_current_device()
import numba
print(f"numba {numba.__version__}, device {d.name.decode() if isinstance(d.name, bytes) else d.name}, "
      f"cc {d.compute_capability}")
from numallm.gpu import discover_gpus
print("numallm inventory:", discover_gpus())
EOF
then
    echo "!! CUDA is not usable from this Python (above): the GPU steps cannot run"
    exit 1
fi

# step 4 runs beside the tests (CPU work; the tests are GPU work)
mkdir -p "$MODELS"
run 300 models "$VPY" - "$MODELS" "$MOE_LAYERS" >/dev/null <<'EOF' &
import dataclasses, sys
from numallm.synth import SHAPES, cached_model
d, layers = sys.argv[1], int(sys.argv[2])
print(cached_model(d, arch="llama", qtype="Q4_0", shape="tinyllama-1.1b"), flush=True)
moe = dataclasses.replace(SHAPES["qwen3-30b-a3b"], n_layers=layers)
print(cached_model(d, arch="qwen3moe", qtype="Q4_0", shape=moe), flush=True)
EOF
MODELS_PID=$!
run 300 models-ds "$VPY" - "$MODELS" "$DS_LAYERS" >/dev/null <<'EOF' &
import dataclasses, sys
from numallm.synth_deepseek import SHAPES, cached_deepseek
d, layers = sys.argv[1], int(sys.argv[2])
# a 32000-token vocabulary: the layers are the case; V2-Lite's 102400 x 2048 embedding and head
# would be 2 x 210M more values to write
print(cached_deepseek(d, "Q4_0", dataclasses.replace(SHAPES["v2-lite-4l"], n_layers=layers, vocab=32000)),
      flush=True)
EOF
DS_PID=$!

step "3/5 GPU tests, simulator off" 240
run 240 tests "$VPY" -m pytest -q -x -p no:cacheprovider tests/test_gpu_kernels.py \
    tests/test_gpu_offload.py tests/test_gpu_hybrid.py tests/test_gpu_deepseek.py

step "4/5 synthetic models (started beside the tests)" 300
wait "$MODELS_PID" || true
wait "$DS_PID" || true
cat "$OUT_DIR/models.log" "$OUT_DIR/models-ds.log"

step "5/5 decode benchmarks, CPU-only vs offloaded" 240
DENSE=$(sed -n 1p "$OUT_DIR/models.log" 2>/dev/null || true)
MOE=$(sed -n 2p "$OUT_DIR/models.log" 2>/dev/null || true)
DS=$(sed -n 1p "$OUT_DIR/models-ds.log" 2>/dev/null || true)
bench() {   # bench NAME MODEL FLAGS...: one JSON result file per case
    local name=$1 model=$2
    shift 2
    [ -f "$model" ] || { echo "!! $name: no model"; FAILED+=("$name (no model)"); return 0; }
    set +e
    timeout --kill-after=10 60 "$VPY" -m numallm bench "$model" -p 0 -n 16 -r 2 -t "$THREADS" \
        --numa off --json "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.err"
    local rc=$?
    set -e
    tail -3 "$OUT_DIR/$name.err"
    [ "$rc" -eq 0 ] || { echo "!! $name: exit status $rc"; FAILED+=("$name (exit $rc)"); }
    return 0
}
bench dense-cpu "$DENSE"
bench dense-gpu "$DENSE" -ngl all
bench moe-cpu "$MOE"
bench moe-hybrid "$MOE" -ngl all --cpu-moe
bench ds-cpu "$DS"
bench ds-hybrid "$DS" -ngl all --cpu-moe
"$VPY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/table.md"
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
layers = os.environ.get("MOE_LAYERS", "2")
ds_layers = os.environ.get("DS_LAYERS", "2")

def tps(name):
    try:
        rows = json.loads((out / f"{name}.json").read_text())
        return next(r["tokens_per_s"] for r in rows if r["engine"] == "numallm" and r["test"].startswith("tg"))
    except Exception:
        return None

print("| model | flags | CPU-only tok/s | offloaded tok/s | ratio |")
print("|---|---|--:|--:|--:|")
for label, flags, cpu, gpu in (("TinyLlama-1.1B-shape Q4_0", "-ngl all", "dense-cpu", "dense-gpu"),
                               (f"Qwen3-30B-A3B layer x {layers} Q4_0", "-ngl all --cpu-moe", "moe-cpu", "moe-hybrid"),
                               (f"DeepSeek-V2-Lite layer x {ds_layers} Q4_0", "-ngl all --cpu-moe", "ds-cpu", "ds-hybrid")):
    a, b = tps(cpu), tps(gpu)
    fmt = lambda v: "failed" if v is None else f"{v:.2f}"
    print(f"| {label} | {flags} | {fmt(a)} | {fmt(b)} | {fmt(b / a) if a and b else '-'} |")
EOF

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: every step passed; logs and table.md in $OUT_DIR"
    exit 0
fi
echo "gpu_check: failed steps: ${FAILED[*]}; logs in $OUT_DIR"
exit 1
