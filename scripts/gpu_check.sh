#!/usr/bin/env bash
# The whole GPU check of minimask in one run (about 9 minutes at most on one H100/H200):
#
#     bash scripts/gpu_check.sh OUTDIR
#
# run from the repository root.  Every step runs, whatever the ones before it did; each one's
# output goes to OUTDIR/<step>.log and its exit status, time and a line of result to
# OUTDIR/summary.txt and OUTDIR/summary.json.  The script exits 0 only if every step passed.
#
# Steps: carried wheels (.whl/*.whl, e.g. pycocotools, installed first into /tmp/site); the
# environment (Python, CuPy, CUDA runtime and driver, the device; env.json); the NVRTC compile test
# of every CUDA kernel; `pytest -m gpu` with a per-test timeout; `bench gpu` in FP32 (--json); a
# short `train --config shapes --device gpu` (loss falling, then its COCO evaluation on the GPU)
# and the same checkpoint evaluated on the CPU, the two APs compared; `bench gpu` in TF32.  The
# order puts first what matters most when time runs short: the FP32 numbers are the ones the
# targets are measured in.
#
# Each step has a time cap, and none starts past the overall budget (GPU_CHECK_BUDGET_S, 530 s),
# so the whole run ends in time even when a step hangs.  Environment: PYTHON (default python3).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR   (from the repository root)" >&2
    exit 2
fi
if [ ! -f minimask/cli.py ]; then
    echo "gpu_check: run it from the repository root (no minimask/cli.py here)" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-530}
START=$SECONDS
DATA=/tmp/minimask_gpu_check/shapes      # generated here, not in the repository's data/
ITERS=300
PER_TEST=150                             # seconds for one GPU test
export OUT PY DATA ITERS PER_TEST PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this tree's minimask, installed or not
: >"$OUT/summary.txt"
: >"$OUT/steps.tsv"
echo "gpu_check: writing to $OUT (budget ${BUDGET} s)"

# step NAME CAP_S COMMAND...: run COMMAND with its output in OUT/NAME.log, under `timeout` with
# CAP_S or what is left of the budget, and record its exit status (124: out of time).
step() {
    local name=$1 cap=$2 left t0 rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    [ "$cap" -gt "$left" ] && cap=$left
    t0=$SECONDS
    if [ "$cap" -lt 15 ]; then
        echo "not started: the ${BUDGET} s budget is spent" >"$OUT/$name.log"
        rc=124
    else
        echo "== $name (at most ${cap} s): $*" | tee "$OUT/$name.log"
        # bash -c: the steps are shell functions (exported below); timeout ends the whole group
        timeout --kill-after=10 "$cap" bash -c '"$@"' step "$@" >>"$OUT/$name.log" 2>&1
        rc=$?
    fi
    local last
    last=$(tr '\r\t' '\n ' <"$OUT/$name.log" | grep -v '^\s*$' | tail -n 1 | cut -c1-300)  # \r: progress bars
    [ "$rc" -eq 124 ] && last="TIMED OUT after ${cap} s; last line: $last"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$last" >>"$OUT/steps.tsv"
    printf '%-12s exit %3s  %4s s  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$last" | tee -a "$OUT/summary.txt"
    return 0
}

mm() { "$PY" -m minimask.cli "$@"; }

# Stops a GPU step with require_gpu's message (no traceback) where there is no GPU.
needs_gpu() {
    "$PY" - "$1" <<'EOF'
import sys
from minimask.backend import require_gpu
try:
    require_gpu(sys.argv[1])
except RuntimeError as e:
    sys.exit(f"error: {e}")
EOF
}

# ---- 1. carried wheels ------------------------------------------------------------------------
install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/*.whl: nothing to install"
        return 0
    fi
    ls -1 .whl/
    local pip="$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
    $pip .whl/*.whl && return 0
    # One wheel not for this Python stops them all: put in, one by one, those that fit (the step
    # still fails, and env.json says what is missing).
    local w
    for w in .whl/*.whl; do $pip "$w" 2>/dev/null && echo "installed $w" || echo "NOT installed: $w"; done
    echo "error: not every wheel in .whl/ installs on $("$PY" -V 2>&1) (see above)"
    return 1
}
export -f mm needs_gpu install_wheels
step wheels 90 install_wheels
if [ -d /tmp/site ]; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# ---- 2. the environment -----------------------------------------------------------------------
environment() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -n 20; else echo "no nvidia-smi here"; fi
    "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys

env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for name in ("numpy", "numba", "pycocotools", "torch", "torchvision", "pytest_timeout"):
    try:
        module = __import__(name)
        env[name] = getattr(module, "__version__", "present")
    except Exception as e:
        env[name] = f"missing ({type(e).__name__}: {e})"
from minimask import backend
env["driver_cuda"] = backend.driver_cuda_version()
env["cupy_wheels"] = backend._installed_cupy_wheels()
ok = backend.gpu_available()
if ok:
    import cupy

    rt = cupy.cuda.runtime
    env["cupy"] = cupy.__version__
    env["cuda_runtime"] = rt.runtimeGetVersion()
    env["cuda_driver"] = rt.driverGetVersion()
    env["device"] = backend.gpu_name()
    props = rt.getDeviceProperties(cupy.cuda.Device().id)
    env["compute_capability"] = f"{props['major']}.{props['minor']}"
    env["memory_gb"] = round(props["totalGlobalMem"] / 2**30, 1)
    try:
        env["nvrtc"] = cupy.cuda.nvrtc.getVersion()
    except Exception as e:  # where CuPy's NVRTC is missing, the kernels will not compile
        env["nvrtc"] = f"not loaded ({type(e).__name__}: {e})"
else:
    env["gpu"] = backend._cupy_problem
for key, value in env.items():
    print(f"{key:20s} {value}")
json.dump(env, open(sys.argv[1], "w"), indent=1, default=str)
if not ok:
    try:
        backend.require_gpu("the GPU check")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
print(f"GPU: {env['device']}, CuPy {env['cupy']}, CUDA runtime {env['cuda_runtime']}, driver {env['cuda_driver']}")
EOF
}
export -f environment
step environment 60 environment

# The synthetic data (the defaults of `data shapes`) are drawn on the CPU while the GPU tests run.
mkdir -p "$(dirname "$DATA")"
if [ -f "$DATA/val.json" ]; then
    (echo "$DATA is there already"; echo 0 >"$OUT/data.rc") >"$OUT/data_gen.log" &
elif [ $((BUDGET - (SECONDS - START))) -lt 60 ]; then
    (echo "not drawn: the ${BUDGET} s budget is (nearly) spent"; echo 124 >"$OUT/data.rc") >"$OUT/data_gen.log" &
else
    (timeout 240 "$PY" -m minimask.cli data shapes --out "$DATA"; echo $? >"$OUT/data.rc") >"$OUT/data_gen.log" 2>&1 &
fi
DATA_PID=$!

# ---- 3. every CUDA kernel compiles (NVRTC; no GPU needed) --------------------------------------
step nvrtc 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_nvrtc.py

# ---- 4. the GPU tests, each test at most PER_TEST s --------------------------------------------
gpu_tests() {
    needs_gpu "pytest -m gpu" || return 1
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        "$PY" -m pytest -v -p no:cacheprovider -m gpu --timeout="$PER_TEST" --durations=15 \
            --junitxml="$OUT/pytest_gpu.xml" tests
    else  # no pytest-timeout: `timeout` per file instead
        local rc=0 f
        for f in $(grep -l -E '@gpu|mark\.gpu' tests/test_*.py); do
            timeout --kill-after=10 "$((2 * PER_TEST))" "$PY" -m pytest -v -p no:cacheprovider -m gpu "$f"
            local r=$?
            [ $r -eq 5 ] && r=0  # no test selected in that file
            [ $r -ne 0 ] && rc=$r
        done
        return $rc
    fi
}
export -f gpu_tests
step pytest_gpu 240 gpu_tests

# ---- 5. minimask beside torchvision on this GPU in FP32 (the targets' precision) ----------------
step bench_fp32 170 mm bench gpu --repeat 5 --json "$OUT/bench_fp32.json"

# ---- 6. a short training run on the GPU, evaluated on the GPU and on the CPU -------------------
wait "$DATA_PID"  # here, in this shell (its parent); it ends within its own 240 s
data_done() {
    cat "$OUT/data_gen.log"
    return "$(cat "$OUT/data.rc" 2>/dev/null || echo 1)"
}
export -f data_done
step data 15 data_done

train_gpu() {
    needs_gpu "train --device gpu" || return 1
    [ -f "$DATA/train.json" ] || { echo "error: no $DATA/train.json (the data step failed)"; return 1; }
    mm train --config shapes --device gpu --train-ann "$DATA/train.json" --val-ann "$DATA/val.json" \
        --iters "$ITERS" --set "milestones=(225,275)" --out "$OUT/train"
}
export -f train_gpu
step train_gpu 120 train_gpu

# The loss falls: the median total loss of the last 20 iterations below 60% of the first 20's.
loss_falls() {
    "$PY" - "$OUT/train/metrics.jsonl" <<'EOF'
import json, os, statistics, sys

path = sys.argv[1]
if not os.path.isfile(path):
    sys.exit(f"error: no {path}: the training step did not run")
records = [json.loads(line) for line in open(path)]
if len(records) < 40:
    sys.exit(f"error: only {len(records)} iterations in {path}")
first = statistics.median(r["total"] for r in records[:20])
last = statistics.median(r["total"] for r in records[-20:])
print(f"total loss, median of 20 iterations: {first:.4f} at the start, {last:.4f} at iteration {len(records)}")
sys.exit(0 if last < 0.6 * first else "error: the loss did not fall to below 60% of its start")
EOF
}
export -f loss_falls
step loss_falls 30 loss_falls

eval_cpu() {
    local ckpt
    ckpt=$(printf '%s/train/model_%07d.npz' "$OUT" "$ITERS")
    [ -f "$ckpt" ] || { echo "error: no checkpoint $ckpt (the training step failed)"; return 1; }
    mm eval --checkpoint "$ckpt" --ann "$DATA/val.json" --device cpu --out "$OUT/eval_cpu"
}
export -f eval_cpu
step eval_cpu 100 eval_cpu

# The GPU's evaluation (at the end of training) and the CPU's of the same checkpoint agree.
same_ap() {
    "$PY" - "$(printf '%s/train/eval_%07d/coco_eval.json' "$OUT" "$ITERS")" "$OUT/eval_cpu/coco_eval.json" <<'EOF'
import json, os, sys

missing = [p for p in sys.argv[1:] if not os.path.isfile(p)]
if missing:
    sys.exit(f"error: no {' and no '.join(missing)}: an evaluation step did not run")
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:])
worst = 0.0
for kind in cpu:
    diff = abs(gpu[kind]["AP"] - cpu[kind]["AP"])
    worst = max(worst, diff)
    print(f"{kind} AP: GPU {gpu[kind]['AP']:.4f}, CPU {cpu[kind]['AP']:.4f} (difference {diff:.4f})")
sys.exit(0 if worst <= 0.01 else "error: the GPU's and the CPU's AP of one checkpoint differ by more than 0.01")
EOF
}
export -f same_ap
step same_ap 30 same_ap

# ---- 7. the same comparison in TF32 ------------------------------------------------------------
step bench_tf32 120 mm bench gpu --tf32 --repeat 3 --json "$OUT/bench_tf32.json"

# ---- summary --------------------------------------------------------------------------------------
"$PY" - "$OUT/steps.tsv" "$OUT/summary.json" "$((SECONDS - START))" <<'EOF'
import json, sys

steps = []
for line in open(sys.argv[1]):
    name, rc, seconds, last = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "exit": int(rc), "seconds": int(seconds), "last_line": last})
failed = [s["step"] for s in steps if s["exit"] != 0]
json.dump({"steps": steps, "failed": failed, "seconds": int(sys.argv[3])}, open(sys.argv[2], "w"), indent=1)
EOF
failed=$(awk -F'\t' '$2 != 0 {printf "%s ", $1}' "$OUT/steps.tsv")
echo "total $((SECONDS - START)) s; failed: ${failed:-none}" | tee -a "$OUT/summary.txt"
[ -z "$failed" ]
