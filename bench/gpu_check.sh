#!/usr/bin/env bash
# The one-command GPU check: is fastlm right on this GPU, and how fast, against whom.
#
#   bench/gpu_check.sh OUTDIR
#
# Run from anywhere on a CUDA machine without network (< 8 minutes on an H200). Steps, each with a time limit and
# its own log in OUTDIR (a failing step does not stop the others; the exit status is non-zero if any failed):
#   env        nvidia-smi, torch / triton / nvcc versions
#   build      pip install --no-deps --no-build-isolation -e . (builds the C++/CUDA extension, MAX_JOBS = cores)
#   tests-gpu  pytest tests -m gpu: the tests that need a GPU (CUDA kernels, bf16 Triton, every autotuning candidate)
#              -> tests-gpu.log, junit-gpu.xml
#   aot        bench/kernel_report.py and csrc/cuda/compile_check.py (CPU-only compiles, run beside those tests)
#   bench      python -m fastlm bench --suite quick -> OUTDIR/bench/{bench.json,*.png}
#   memcheck, racecheck, synccheck
#              compute-sanitizer on small attention (head dims 64, 96, 256), decode and MLP (tensor-core GEMMs and
#              the few-row gemv) cases, where available
#   tests-rest pytest tests -m "not gpu" (on a GPU machine most of them run on the GPU too: Triton at
#              fp32 / fp16, the model, generation) with what time is left -> tests-rest.log, junit-rest.xml
# and prints a short table last: op, shape, fastlm rate, best peer, ratio, max error. The tests run in pytest-xdist
# workers where it is installed, with a per-test timeout where pytest-timeout is, and the Triton kernels at their
# default configurations (FASTLM_TRITON_AUTOTUNE=0, tests/conftest.py). Time limits shrink to fit the 8-minute
# budget after a slow build, in the order of the steps' value; an interrupted bench still writes what it measured.
#
# FASTLM_GPU_CHECK_DRY=1 runs what a CPU machine can (no build, tiny bench shapes, fast tests only), so the script
# itself is exercised before its one GPU run. PYTHON selects the interpreter (default: python3, else python).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
DRY=${FASTLM_GPU_CHECK_DRY:-0}
CORES=$(nproc 2>/dev/null || echo 4)
T0=$(date +%s)
# the whole check must fit in 8 minutes: later steps get what the earlier ones left (FASTLM_GPU_CHECK_BUDGET_S)
DEADLINE=$((T0 + ${FASTLM_GPU_CHECK_BUDGET_S:-470}))
FAILED=()

# limit MAX RESERVE: MAX seconds, or less so that RESERVE seconds remain for the later steps (at least 20)
limit() {
    local left=$((DEADLINE - $(date +%s) - $2))
    if [ "$left" -gt "$1" ]; then left=$1; fi
    if [ "$left" -lt 20 ]; then left=20; fi
    echo "$left"
}

# step NAME LIMIT_S CMD...: run CMD with a time limit (SIGINT first, so pytest and the bench write what they have),
# log to OUTDIR/NAME.log, show the log's tail, record a failure.
step() {
    local name=$1 limit=$2 rc start
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=30 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s (log: $OUT/$name.log)"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name (exit $rc)")
    fi
    return 0
}

env_report() {
    date -u
    echo "repo: $ROOT  commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    elif [ "$DRY" = 1 ]; then
        echo "nvidia-smi: not found (dry run)"
    else
        echo "nvidia-smi: not found"
        return 1
    fi
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
    echo "cores: $CORES"
}

sanitize() {
    local tool=$1
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer: not found, $tool skipped"
        return 0
    fi
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" - <<'EOF'
import os
import torch
from fastlm import ops
from fastlm.benchmark import failure
torch.manual_seed(0)
dev = "cuda"
q = torch.randn(1, 129, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 129, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 129, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
kc, vc = torch.randn(2, 300, 2, 64, device=dev, dtype=torch.bfloat16), torch.randn(2, 300, 2, 64, device=dev,
                                                                                   dtype=torch.bfloat16)
lens = torch.tensor([300, 77], device=dev, dtype=torch.int32)
q1 = q[:, :1].detach().expand(2, 1, 4, 64).contiguous()
# head dim 256: the wgmma kernel's 64-key tiles (CUDA kernels only: the Triton kernels are covered by the first case)
q256, k256, v256 = (torch.randn(1, 200, 2, 256, device=dev, dtype=torch.bfloat16) for _ in "qkv")
# head dim 96 (padded 64-column slabs, TMA boxes wider than the rows), causal with 300 queries on 20 keys: blocks of
# rows that see no key and load nothing
q96, k96, v96 = (torch.randn(1, n, 2, 96, device=dev, dtype=torch.bfloat16) for n in (300, 20, 20))
x = torch.randn(70, 128, device=dev, dtype=torch.bfloat16)
wg, wu, wd = (torch.randn(*s, device=dev, dtype=torch.bfloat16) * 0.1 for s in ((200, 128), (200, 128), (128, 200)))
# "cuda": the wgmma attention / MLP kernels on Hopper; "cuda" with FASTLM_CUDA_KERNELS=mma: the mma.sync ones
for b, kernel in (("triton", "auto"), ("cuda", "auto"), ("cuda", "mma")):
    os.environ["FASTLM_CUDA_KERNELS"] = kernel
    for name, run in (("attention", lambda: ops.attention(q, k, v, causal=True, backend=b).float().sum().backward()),
                      ("attention-d256", lambda: ops.attention(q256, k256, v256, causal=True, backend=b)),
                      ("decode", lambda: ops.decode_attention(q1, kc, vc, lens, backend=b)),
                      ("attention-d96", lambda: ops.attention(q96, k96, v96, causal=True, backend=b)),
                      ("mlp", lambda: ops.mlp_swiglu(x, wg, wu, wd, backend=b)),
                      ("mlp-gemv", lambda: ops.mlp_swiglu(x[:5], wg, wu, wd, backend=b))):  # <= 8 rows
        if name == "attention-d256" and b == "triton":
            continue
        try:
            run()
        except RuntimeError as e:
            if failure(e)[0] != "unavailable":
                raise
            print(f"{name}[{b}, {kernel}]: not available here ({str(e)[:120]})")
            continue
        torch.cuda.synchronize()
        print(f"{name}[{b}, {kernel}]: ran")
EOF
}

export PY DRY ROOT CORES
export -f env_report sanitize
step env 60 bash -c env_report

if [ "$DRY" = 1 ]; then
    echo "=== build: skipped in the dry run (would run: MAX_JOBS=$CORES $PY -m pip install --no-deps" \
        "--no-build-isolation -e .)"
else
    step build 240 env MAX_JOBS="$CORES" "$PY" -m pip install --no-deps --no-build-isolation -v -e .
fi

# CPU-only ahead-of-time reports run beside the GPU tests, side by side, each within the GPU tests' time (so the
# wait for them below cannot push the later steps past the deadline)
AOT_S=$(limit 150 230)
(
    timeout --kill-after=10 "$AOT_S" "$PY" bench/kernel_report.py --check --json "$OUT/kernel_report.json" \
        >"$OUT/kernel_report.log" 2>&1
    echo $? >"$OUT/kernel_report.rc"
) &
AOT_PIDS=($!)
(
    timeout --kill-after=10 "$AOT_S" "$PY" csrc/cuda/compile_check.py --check --jobs 2 >"$OUT/compile_check.log" 2>&1
    echo $? >"$OUT/compile_check.rc"
) &
AOT_PIDS+=($!)

# pytest in parallel processes where pytest-xdist is installed (each compiles the Triton kernels its tests need, and
# a crashing test takes down its worker, not the run), with a per-test timeout where pytest-timeout is
PYTEST=("$PY" -m pytest tests -q -p no:cacheprovider -rfE)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST+=(--timeout="$([ "$DRY" = 1 ] && echo 300 || echo 60)")
fi
if [ "$DRY" = 1 ]; then
    step tests-gpu 300 "${PYTEST[@]}" -x -k "benchmark" --junitxml="$OUT/junit-gpu.xml"
else
    if "$PY" -c "import xdist" >/dev/null 2>&1; then
        PYTEST+=(-n "$((CORES < 8 ? CORES : 8))")
    fi
    step tests-gpu "$(limit 180 200)" "${PYTEST[@]}" -m gpu --junitxml="$OUT/junit-gpu.xml"
fi

wait "${AOT_PIDS[@]}"
for name in kernel_report compile_check; do
    if [ -f "$OUT/$name.rc" ]; then
        rc=$(cat "$OUT/$name.rc")
        echo "=== $name: exit $rc (log: $OUT/$name.log)"
        tail -n 40 "$OUT/$name.log"
        if [ "$rc" != 0 ]; then FAILED+=("$name (exit $rc)"); fi
    fi
done

if [ "$DRY" = 1 ]; then
    step bench 300 "$PY" -m fastlm bench --tiny --no-compile --out "$OUT/bench"
else
    step bench "$(limit 180 80)" "$PY" -m fastlm bench --suite quick --out "$OUT/bench"
fi

if [ "$DRY" = 1 ]; then
    echo "=== sanitizer: skipped in the dry run"
    step tests-rest 300 "${PYTEST[@]}" -m "not gpu" -x -k "gpu_check" --junitxml="$OUT/junit-rest.xml"
else
    step memcheck "$(limit 40 40)" bash -c "sanitize memcheck"
    step racecheck "$(limit 40 0)" bash -c "sanitize racecheck"
    step synccheck "$(limit 40 0)" bash -c "sanitize synccheck"
    step tests-rest "$(limit 240 0)" "${PYTEST[@]}" -m "not gpu" --junitxml="$OUT/junit-rest.xml"
fi

echo
echo "=== fastlm GPU check: $(($(date +%s) - T0)) s; results in $OUT"
if [ -f "$OUT/bench/bench.json" ]; then
    "$PY" -m fastlm bench --summary-of "$OUT/bench/bench.json" | tee "$OUT/summary.txt"
else
    echo "no bench.json: the bench step did not write results"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED steps: ${FAILED[*]}"
    exit 1
fi
echo "all steps passed"
