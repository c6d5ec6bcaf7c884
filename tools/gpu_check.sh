#!/usr/bin/env bash
# One-shot GPU verification of wsm-megatron: about 10 minutes on one GPU.
#
#   tools/gpu_check.sh [--dry-run] [--only STEP,...] [--wheels DIR] [--out DIR] [--gpus N]
#                      [--iters N] [override ...]
#   tools/gpu_check.sh --fetch-wheels DIR     # where a package index is reachable
#
# Steps (each runs even if an earlier one failed; the exit status says whether all passed):
#   1. the environment: GPU, torch, CUDA, megatron-core, Transformer Engine, Triton;
#   2. the `gpu`-marked tests (the Triton kernels on the device);
#   3. GPT-125M (configs/gpt-125m.yaml) in bf16 with the distributed optimizer, Transformer
#      Engine layers when importable, asynchronous saves and the online merge, on the embedded
#      corpus (no data to bring): ITERS iterations, a checkpoint every ITERS/2;
#   4. the resume check: the same command for ITERS/2 more iterations must resume at ITERS;
#      the stop check: a long run past its time budget (train.exit_duration_in_mins=1, the
#      path SIGTERM/SIGUSR1 take) must save the iteration it is at and exit with status 3;
#   5. the same model with selective activation recomputation (and, with 2+ GPUs, PP=2 with
#      2 virtual stages), ITERS/2 iterations, for throughput;
#   6. tokens/s and model TFLOP/s per GPU of each run (median over the logged intervals after
#      the first), then the kernel benchmark table (tools/bench_kernels.py).
# Step names for --only (to rerun what failed): install environment gpu-tests train resume
# stop recompute vpp summary kernels. Results go to OUT (default runs/gpu-check): one log per step
# (summary.log holds the throughput table), metrics files, kernels.png.
#
# A bare machine (Python 3.12 and a CUDA torch, no package index) needs megatron-core carried
# along as wheels: `--fetch-wheels DIR` downloads them (for CPython 3.12, manylinux x86_64) where
# pip can reach an index; `--wheels DIR` installs them into OUT/site before the checks.
# `--dry-run` checks the training configs (no torch import) and prints every command instead of
# running it. Further arguments are config overrides for the training runs (section.key=value).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=$REPO/runs/gpu-check
WHEELS=""
DRY_RUN=0
GPUS=""
ITERS=40
ONLY=""
OVERRIDES=()
MEGATRON_CORE_VERSION=${MEGATRON_CORE_VERSION:-0.19.2}  # the version tested on Python 3.12

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    --gpus) GPUS=${2:?--gpus needs a number}; shift ;;
    --iters) ITERS=${2:?--iters needs a number}; shift ;;
    --only) ONLY=${2:?--only needs step names}; shift ;;
    --fetch-wheels)
      dest=${2:?--fetch-wheels needs a directory}
      exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dest" "megatron-core==$MEGATRON_CORE_VERSION" ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    -*) die "unknown flag $1 (see --help)" ;;
    *=*) OVERRIDES+=("$1") ;;
    *) die "unexpected argument $1: overrides are section.key=value" ;;
  esac
  shift
done
[[ $ITERS =~ ^[0-9]+$ && $ITERS -ge 4 && $((ITERS % 2)) -eq 0 ]] \
  || die "--iters: $ITERS is not an even number >= 4"
[[ -z $WHEELS || -d $WHEELS ]] || die "--wheels: $WHEELS is not a directory"
if [[ -z $GPUS ]]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $GPUS -gt 0 ]] || GPUS=1
fi
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus: $GPUS is not a positive number"

export PYTHONPATH=$OUT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export XDG_CACHE_HOME=$OUT/cache  # the embedded corpus and its tokenizer, built once
HALF=$((ITERS / 2))
FAILED=()
[[ $DRY_RUN == 1 ]] || mkdir -p "$OUT"

# Runs "$@" (or prints it under --dry-run), logging to OUT/<name>.log; records a failure.
step() {
  local name=$1; shift
  [[ -z $ONLY || ,$ONLY, == *,$name,* ]] || return 0
  echo "+ [$name] $*"
  [[ $DRY_RUN == 1 ]] && return 0
  local start=$SECONDS
  if "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "= [$name] passed in $((SECONDS - start)) s"
  else
    echo "= [$name] FAILED after $((SECONDS - start)) s (log: $OUT/$name.log)"
    FAILED+=("$name")
  fi
}

# Sets TRAIN to the torchrun command of run NAME for ITERATIONS, with extra overrides; the
# config is checked first (no torch import), also in a dry run.
train_cmd() {
  local name=$1 iterations=$2; shift 2
  local args=(--config "$REPO/configs/gpt-125m.yaml"
    corpus.name=stdlib data.train_data=null data.tokenizer_model=null
    train.train_iters="$iterations" train.global_batch_size=$((64 * GPUS)) train.micro_batch_size=8
    train.lr_warmup_iters=$((ITERS / 4)) train.eval_interval="$HALF" train.eval_iters=2
    checkpoint.save="$OUT/$name/checkpoints" checkpoint.save_interval="$HALF"
    checkpoint.async_save=true merge.quantity=2 merge.online=true
    logging.log_interval=5 logging.wandb_mode=disabled logging.metrics_file="$OUT/$name.jsonl"
    "$@" "${OVERRIDES[@]}")
  "$PY" -m wsm_megatron.cli.train "${args[@]}" --print-config >/dev/null || exit 2
  # torchrun, through the interpreter that holds torch (its bin/ need not be on PATH)
  TRAIN=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS"
    -m wsm_megatron.cli.train "${args[@]}")
}

# The training runs: name, iterations, extra overrides.
RUNS=("gpt125m $ITERS" "gpt125m $((ITERS + HALF))"
  "stop $((ITERS * 100)) train.exit_duration_in_mins=1"
  "recompute $HALF model.recompute_granularity=selective")
NAMES=(train resume stop recompute)
if [[ $GPUS -ge 2 ]]; then
  RUNS+=("vpp $HALF parallel.pipeline_model_parallel_size=2
    parallel.virtual_pipeline_model_parallel_size=2")
  NAMES+=(vpp)
fi
for run in "${RUNS[@]}"; do train_cmd $run; done  # every config is checked before anything runs

if [[ -n $WHEELS ]]; then
  step install "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$OUT/site" "$WHEELS"/*.whl
fi
step environment "$PY" - <<'EOF'
import importlib, importlib.util
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(" ", i, torch.cuda.get_device_name(i))
for name in ("megatron.core", "transformer_engine", "triton", "apex"):
    if importlib.util.find_spec(name.split(".")[0]) is None:
        print(name, "not installed")
    else:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
assert torch.cuda.is_available(), "no CUDA device visible to torch"
EOF
# Only the files that hold gpu tests: the others import packages a bare image may lack (lm-eval).
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" "$REPO"/tests/*.py)
step gpu-tests "$PY" -m pytest -q -o addopts= -m gpu -p no:cacheprovider "${GPU_TEST_FILES[@]}"
# The stop check's verdict: status 3 and a stop save of the iteration the tracker names.
saved_and_stopped() {
  "$@"
  local status=$? root=$OUT/stop/checkpoints it
  [[ $status == 3 ]] || { echo "stop: FAILED: exit status $status, expected 3"; return 1; }
  it=$(cat "$root/latest_checkpointed_iteration.txt") || return 1
  [[ -f $root/iter_$(printf %07d "$it")/wsm_stop_save.json ]] \
    || { echo "stop: FAILED: iteration $it is no stop save"; return 1; }
  echo "stop: ok: saved iteration $it at the time budget and exited with status 3"
}
for i in "${!RUNS[@]}"; do
  train_cmd ${RUNS[$i]}
  if [[ ${NAMES[$i]} == stop ]]; then
    step stop saved_and_stopped "${TRAIN[@]}"
  else
    step "${NAMES[$i]}" "${TRAIN[@]}"
  fi
done

step summary "$PY" - "$OUT" "$ITERS" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, iters = Path(sys.argv[1]), int(sys.argv[2])
ok = True
for name in ("gpt125m", "recompute", "vpp"):
    path = out / f"{name}.jsonl"
    if not path.exists():
        continue
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    steady = [r for r in train if r["iteration"] > train[0]["iteration"]] or train
    tok = statistics.median(r["tokens_per_s"] for r in steady)
    tflops = statistics.median(r["tflops_per_gpu"] for r in steady)
    merged = [r["merged_loss"] for r in records if "merged_loss" in r]
    print(f"{name:10s} {tok:12,.0f} tokens/s {tflops:8.3g} TFLOP/s/GPU "
          f"last loss {train[-1]['loss']:.4f}"
          + (f" merged loss {merged[-1]:.4f}" if merged else ""))
    if name == "gpt125m":
        resumed = [r["iteration"] for r in train if r["iteration"] > iters]
        first_run = [r["iteration"] for r in train if r["iteration"] <= iters]
        good = bool(resumed) and len(first_run) == len(set(first_run))
        print(f"resume: {'ok' if good else 'FAILED'}: the second run logged iterations "
              f"{resumed[:1]}..{resumed[-1:]} and repeated none of the first's")
        ok &= good
sys.exit(0 if ok else 1)
EOF
step kernels "$PY" "$REPO/tools/bench_kernels.py" --device cuda --plot "$OUT/kernels.png"

if [[ $DRY_RUN == 1 ]]; then
  echo "gpu_check.sh: dry run: the configs are valid; nothing was run"
elif [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_check.sh: FAILED: ${FAILED[*]} (logs in $OUT)"
  exit 1
else
  echo "gpu_check.sh: all checks passed in $SECONDS s (results in $OUT)"
fi
