#!/usr/bin/env bash
# Single-node WSM pre-training with torchrun: one process per GPU (or CPU rank).
#
#   CONFIG=configs/gpt-125m.yaml NPROC=8 TP=2 PP=1 launch/torchrun.sh train.lr=6e-4 ...
#
# CONFIG   config file (default configs/tiny-cpu.yaml)
# NPROC    processes on this node (default: the number of GPUs, or 2 without GPUs)
# TP, PP   tensor/pipeline parallel sizes (default: the config's)
# VPP, CP  virtual pipeline stages per rank, context-parallel size (default: the config's)
# DRY_RUN  set to 1 to check the config and print the command without running it
# Further arguments are config overrides (section.key=value) or wsm-train flags.
set -euo pipefail

CONFIG=${CONFIG:-configs/tiny-cpu.yaml}
if [[ -z ${NPROC:-} ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NPROC -gt 0 ]] || NPROC=2
fi

export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron: order TP/SP communication before compute

overrides=()
[[ -n ${TP:-} ]] && overrides+=("parallel.tensor_model_parallel_size=$TP")
[[ -n ${PP:-} ]] && overrides+=("parallel.pipeline_model_parallel_size=$PP")
[[ -n ${VPP:-} ]] && overrides+=("parallel.virtual_pipeline_model_parallel_size=$VPP")
[[ -n ${CP:-} ]] && overrides+=("parallel.context_parallel_size=$CP")

# The resolved configuration is checked here first (no torch import: about a second), so a
# typo is one line before any process starts.
${PYTHON:-python} -m wsm_megatron.cli.train --config "$CONFIG" "${overrides[@]}" "$@" \
  --print-config >/dev/null || exit 2

cmd=(torchrun --standalone --nproc-per-node "$NPROC"
  -m wsm_megatron.cli.train --config "$CONFIG" "${overrides[@]}" "$@")
echo "+ ${cmd[*]}"
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
exec "${cmd[@]}"
