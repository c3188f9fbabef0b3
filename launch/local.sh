#!/usr/bin/env bash
# One machine, every GPU (or NUM_GPUS of them) under the deepspeed launcher; on a machine without a GPU,
# NUM_GPUS CPU ranks (default 1) with DS_ACCELERATOR=cpu.
#   launch/local.sh CONFIG [--set KEY=VALUE ...]
# --resume is always passed: a re-run continues from the newest complete checkpoint (or starts fresh).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG [--set KEY=VALUE ...]" >&2
  exit 2
fi
config="$1"
shift
# The caller's directory stays the working directory: CONFIG and the paths in it are the caller's
# (pretrain reads relative paths from the working directory); the repository goes on the ranks' path.
repo="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)" # CDPATH: cd would print the directory
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L | grep -c '^GPU ')"
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  gpus=1
fi
# shellcheck source=launch/stop_on_signal.bash
source "$repo/launch/stop_on_signal.bash"
run_stoppable deepspeed --num_gpus "${NUM_GPUS:-$gpus}" --master_port "${MASTER_PORT:-29500}" \
  --module pretrain train --config "$config" --resume "$@"
