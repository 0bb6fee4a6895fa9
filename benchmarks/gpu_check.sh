#!/usr/bin/env bash
# One command on a GPU node: does clmae install and work here, end to end, and does it keep the GPU busy?
#
#   benchmarks/gpu_check.sh                             # a CUDA node; the checkout's .venv (or --python)
#   benchmarks/gpu_check.sh --wheelhouse wheelhouse     # first `make setup WHEELHOUSE=wheelhouse` (no network)
#   benchmarks/gpu_check.sh --device cpu                # every part that needs no CUDA, at tiny sizes (CI)
#
# Parts, each with its log in the report directory (default runs/gpu_check-<host>-<time>/):
#   env         GPU, driver, CUDA, torch, DeepSpeed, FFCV, timm, MLflow and clmae versions (env.txt)
#   pytest-gpu  `pytest -m gpu` (skipped with --device cpu)
#   throughput  benchmarks/gpu_throughput.py: ViT-B/L/H, MAE and CL-MAE, the plain PyTorch step beside each
#   e2e         through the real loader, with the installed commands, from the report directory: a generated
#               image set (256 px on CUDA) -> clmae-prep -> clmae-pretrain (vitb, bf16, 300 steps, checkpoints)
#               killed with SIGKILL mid-way (CLMAE_FAULT=kill_all@N: every rank SIGKILLs itself as step N begins,
#               as a node failure would, at a step fixed in advance) -> the same command resumes it ->
#               clmae-export -> clmae-eval knn. Checks that the resumed run continued at the step after its checkpoint on the
#               same data (the steps run twice have the same loss) and compares the loader-fed img/s with the
#               synthetic img/s of the same model and batch (on CUDA it must reach 90%).
#   summary     one line per part (summary.txt); exit 0 when no part failed.
# On one H200 the whole check is sized for about 8 minutes. --device cpu takes about 4 on 2 cores.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEVICE=cuda
PY=
WHEELHOUSE=
REPORT=

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; echo "options: --device cuda|cpu  --python PATH  --wheelhouse DIR  --report DIR"; }
die() { echo "error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --device) DEVICE=${2:-}; shift 2 ;;
        --python) PY=${2:-}; shift 2 ;;
        --wheelhouse) WHEELHOUSE=${2:-}; shift 2 ;;
        --report) REPORT=${2:-}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ $DEVICE == cuda || $DEVICE == cpu ]] || die "--device: '$DEVICE' is neither cuda nor cpu"

if [[ -n $WHEELHOUSE ]]; then
    [[ -z $PY ]] || die "--python and --wheelhouse exclude each other (--wheelhouse installs into $ROOT/.venv)"
    make -C "$ROOT" setup WHEELHOUSE="$(cd "$WHEELHOUSE" 2>/dev/null && pwd || echo "$WHEELHOUSE")" || die "the offline install from $WHEELHOUSE failed"
    PY=$ROOT/.venv/bin/python
fi
if [[ -z $PY ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
PY=$(command -v "$PY") || die "no Python interpreter '$PY'"
BIN=$(dirname "$PY")
REPORT=${REPORT:-$ROOT/runs/gpu_check-$(hostname -s)-$(date +%Y%m%d-%H%M%S)}
if [[ -e $REPORT && -n $(ls -A "$REPORT" 2>/dev/null) ]]; then die "--report $REPORT exists and is not empty"; fi
mkdir -p "$REPORT" || die "cannot create $REPORT"
REPORT=$(cd "$REPORT" && pwd)

# The sizes of each mode. CUDA: ViT-B/16 CL-MAE at 64 a step on 3,200 generated 224-px images (50 steps an
# epoch), 6 epochs = 300 steps, a checkpoint every 50, killed as step 131 begins (so it resumes from step 100
# and runs 101-130 again). CPU: the tiny model on 40-px images, 60 steps, killed as step 16 begins.
if [[ $DEVICE == cuda ]]; then
    CONFIG=vitb DS_CONFIG=zero2_bf16 DTYPE=bf16 BATCH=64 TRAIN_IMAGES=3200 VAL_IMAGES=640 IMAGE_PX=256
    EPOCHS=6 CHECKPOINT_EVERY=50 LOG_EVERY=10 KILL_AFTER=130 LOADER_WORKERS=8
    MODELS="vit_base_patch16 vit_large_patch16 vit_huge_patch14" E2E_MODEL=vit_base_patch16 ITERS=5 WARMUP=2
else
    CONFIG=tiny_digits DS_CONFIG=zero2_fp32 DTYPE=fp32 BATCH=8 TRAIN_IMAGES=240 VAL_IMAGES=60 IMAGE_PX=40
    EPOCHS=2 CHECKPOINT_EVERY=10 LOG_EVERY=1 KILL_AFTER=15 LOADER_WORKERS=1
    MODELS=vit_tiny E2E_MODEL=vit_tiny ITERS=2 WARMUP=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

declare -a SUMMARY=()
record() {  # part outcome detail
    SUMMARY+=("$(printf '%-11s %-5s %s' "$1" "$2" "$3")")
    printf '[%s] %-11s %-5s %s\n' "$(date '+%T')" "$1" "$2" "$3"
}
command_for() {  # the installed console script if there is one, else the module
    if [[ -x $BIN/$1 ]]; then echo "$BIN/$1"; else echo "$PY -m $2"; fi
}
echo "gpu_check: --device $DEVICE, python $PY, report $REPORT"

# ---------------------------------------------------------------------------------------------------- env
{
    echo "date: $(date -Is)"
    echo "host: $(hostname)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    else
        echo "gpu: none (no nvidia-smi)"
    fi
    # From the report directory: the installed clmae, not the checkout's source tree, is the one imported.
    (cd "$REPORT" && "$PY" - "$DEVICE") <<'EOF'
import importlib.metadata as md
import sys

import clmae
import torch

print(f"python: {sys.version.split()[0]} ({sys.executable})")
print(f"torch: {torch.__version__} ({torch.__file__}); CUDA {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}; bf16 supported: {torch.cuda.is_bf16_supported()}")
for name in ("deepspeed", "ffcv", "timm", "mlflow", "numpy", "clmae"):
    module = __import__(name)
    print(f"{name}: {md.version(name)} ({module.__file__})")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"summary: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); clmae from {clmae.__file__}")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    print("error: no CUDA device is visible to torch (--device cpu checks the rest)")
    sys.exit(1)
EOF
} >"$REPORT/env.txt" 2>&1
env_rc=$?
if [[ $env_rc -eq 0 ]]; then
    record env PASS "$(sed -n 's/^summary: //p' "$REPORT/env.txt")"
else
    record env FAIL "$(tail -1 "$REPORT/env.txt") (env.txt)"
fi

# --------------------------------------------------------------------------------------------- pytest-gpu
if [[ $DEVICE == cpu ]]; then
    record pytest-gpu SKIP "needs CUDA"
elif (cd "$ROOT" && timeout 600 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests) >"$REPORT/pytest-gpu.log" 2>&1; then
    record pytest-gpu PASS "$(tail -1 "$REPORT/pytest-gpu.log")"
else
    record pytest-gpu FAIL "$(tail -1 "$REPORT/pytest-gpu.log") (pytest-gpu.log)"
fi

# --------------------------------------------------------------------------------------------- throughput
# shellcheck disable=SC2086  # MODELS is a list
if timeout 900 "$PY" "$ROOT/benchmarks/gpu_throughput.py" --device "$DEVICE" --dtype "$DTYPE" --models $MODELS \
    --batch-size "$BATCH" --iters "$ITERS" --warmup "$WARMUP" --out "$REPORT/throughput.json" >"$REPORT/throughput.log" 2>&1; then
    record throughput PASS "$("$PY" - "$REPORT/throughput.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("; ".join(f"{r['model']} {r['method']} {r['timed']['images_per_s']:.0f} img/s ({r['vs_plain']:.2f}x plain)" for r in rows))
EOF
)"
else
    record throughput FAIL "$(tail -1 "$REPORT/throughput.log") (throughput.log)"
fi

# -------------------------------------------------------------------------------------------------- e2e
E2E=$REPORT/e2e
mkdir -p "$E2E"
e2e() {
    cd "$E2E" || return 1  # away from the checkout: the installed clmae, not the source tree, is imported
    echo ">> generating $TRAIN_IMAGES + $VAL_IMAGES images of $IMAGE_PX px"
    "$PY" - "$E2E/images" "$TRAIN_IMAGES" "$VAL_IMAGES" "$IMAGE_PX" <<'EOF' || return 1
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, counts, size = Path(sys.argv[1]), {"train": int(sys.argv[2]), "val": int(sys.argv[3])}, int(sys.argv[4])
rng = np.random.default_rng(0)
classes = 10
for split, count in counts.items():
    for i in range(count):
        label = i % classes
        # A class-coloured gradient with noise and a bright square: JPEG-compressible, and not all alike.
        ramp = np.linspace(0, 1, size)[None, :, None] * (np.arange(3) + label) * 20
        pixels = rng.normal(90 + 12 * label, 30, (size, size, 3)) + ramp
        x, y = rng.integers(0, size // 2, 2)
        pixels[y : y + size // 4, x : x + size // 4] = 255
        folder = root / split / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{i:06d}.JPEG", quality=90)
EOF
    echo ">> clmae-prep"
    $(command_for clmae-prep data_prep.cli) imagenet "$E2E/images" "$E2E/data" --write-mode jpg \
        --max-resolution "$IMAGE_PX" --workers "$LOADER_WORKERS" || return 1
    local train=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m clmae.train --config "$CONFIG"
        run.output_dir="$E2E/runs" run.name=e2e train.ds_config="$DS_CONFIG" data.train_path="$E2E/data/train.beton"
        data.val_path="$E2E/data/val.beton" data.batch_size="$BATCH" data.num_workers="$LOADER_WORKERS"
        train.accum_steps=1 train.epochs="$EPOCHS" optim.warmup_epochs=1 train.log_every="$LOG_EVERY"
        checkpoint.every_steps="$CHECKPOINT_EVERY" tracking.system_metrics=false tracking.mask_images_every_epochs=0)
    echo ">> clmae-pretrain, killed as step $((KILL_AFTER + 1)) begins: ${train[*]}"
    CLMAE_FAULT=kill_all@$((KILL_AFTER + 1)) timeout 900 "${train[@]}" >"$E2E/pretrain-killed.log" 2>&1
    grep -q "step $KILL_AFTER (epoch" "$E2E/pretrain-killed.log" || { echo "no step $KILL_AFTER before the kill"; tail -20 "$E2E/pretrain-killed.log"; return 1; }
    echo ">> killed after step $KILL_AFTER; the same command again, to the end"
    timeout 900 "${train[@]}" >"$E2E/pretrain-resumed.log" 2>&1 || { tail -20 "$E2E/pretrain-resumed.log"; return 1; }
    echo ">> clmae-export, clmae-eval knn"
    $(command_for clmae-export clmae.export) "$E2E/runs/e2e" --out "$E2E/encoder.safetensors" >"$E2E/export.log" 2>&1 \
        || { tail -20 "$E2E/export.log"; return 1; }
    $(command_for clmae-eval clmae.evaluate) knn "$E2E/runs/e2e" >"$E2E/eval.log" 2>&1 || { tail -20 "$E2E/eval.log"; return 1; }
}
if (e2e) >"$REPORT/e2e.log" 2>&1; then
    # The verdicts: the resume (step and data), the loader's rate against the synthetic one, the k-NN result.
    verdict=$("$PY" - "$E2E" "$REPORT/throughput.json" "$DEVICE" "$E2E_MODEL" "$LOG_EVERY" <<'EOF'
import json
import re
import statistics
import sys
from pathlib import Path

e2e, throughput, device, model, log_every = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
line = re.compile(r"step (\d+) \(epoch \d+\) \| mae ([0-9.]+) .*?\| ([0-9.]+) img/s")
killed = {int(m[1]): (m[2], float(m[3])) for m in line.finditer((e2e / "pretrain-killed.log").read_text())}
resumed_log = (e2e / "pretrain-resumed.log").read_text()
resumed = {int(m[1]): (m[2], float(m[3])) for m in line.finditer(resumed_log)}
problems = []
start = re.search(r"resumed from \S+ \(epoch \d+, step \d+ of it, global step (\d+)\)", resumed_log)
if start is None:
    print("FAIL the second start did not resume from a checkpoint")
    sys.exit()
resumed_at = int(start[1])
if min(resumed) != resumed_at + log_every:
    problems.append(f"the first step logged after resuming at {resumed_at} is {min(resumed)}")
again = sorted(set(killed) & set(resumed))
if not again:
    problems.append(f"no step ran both before the kill and after the resume (resumed at {resumed_at})")
for step in again:
    first, second = float(killed[step][0]), float(resumed[step][0])
    # Same checkpoint, same images: CPU runs repeat bitwise; CUDA kernels may add rounding noise.
    tolerance = 0.0 if device == "cpu" else (1e-3 if step == again[0] else 2e-2) * max(1.0, abs(first))
    if abs(first - second) > tolerance:
        problems.append(f"step {step}: loss {first} before the kill, {second} after the resume")
rates = [rate for step, (_, rate) in sorted(resumed.items()) if step > resumed_at + 2 * log_every]
fed = statistics.median(rates) if rates else float("nan")
synthetic = None
if throughput.exists():
    rows = [r for r in json.loads(throughput.read_text())["rows"] if r["model"] == model and r["method"] == "clmae"]
    synthetic = rows[0]["timed"].get("images_per_s") if rows else None
ratio = fed / synthetic if synthetic else float("nan")
if device == "cuda" and not ratio >= 0.9:
    problems.append(f"the loader-fed rate is {100 * ratio:.0f}% of the synthetic one (at least 90% expected)")
knn = json.loads(next((e2e / "runs/e2e/eval").rglob("knn.json")).read_text())["results"]
detail = (
    f"resumed at step {resumed_at}, steps {again[0] if again else '-'}-{again[-1] if again else '-'} ran again with the "
    f"same loss; loader-fed {fed:.1f} img/s, synthetic {synthetic or float('nan'):.1f} ({100 * ratio:.0f}%); "
    f"k-NN top-1 {knn['knn_l2_k5/acc1']:.1f}%"
)
print(("FAIL " + "; ".join(problems)) if problems else ("PASS " + detail))
EOF
)
    if [[ $verdict == PASS\ * || $verdict == FAIL\ * ]]; then
        record e2e "${verdict%% *}" "${verdict#* }"
    else
        record e2e FAIL "the verdict could not be made: ${verdict:-no output}"
    fi
else
    record e2e FAIL "$(tail -1 "$REPORT/e2e.log") (e2e.log)"
fi

# ---------------------------------------------------------------------------------------------- summary
printf '%s\n' "${SUMMARY[@]}" >"$REPORT/summary.txt"
echo
echo "gpu_check summary ($DEVICE; $REPORT):"
cat "$REPORT/summary.txt"
if grep -q '^[a-z0-9-]* *FAIL' "$REPORT/summary.txt"; then exit 1; fi
exit 0
