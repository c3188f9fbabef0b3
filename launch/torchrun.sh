#!/usr/bin/env bash
# One node of a multi-node run under torchrun with c10d rendezvous; run it on every node.
#   launch/torchrun.sh NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE CONFIG [--set KEY=VALUE ...]
# MASTER_ADDR:MASTER_PORT is where the rendezvous lives (node 0's address, a port free on it); RDZV_ID
# (default: pretrain) names the job so that two jobs on the same endpoint do not join each other.
# --resume is always passed: a restarted job continues from the newest complete checkpoint.
set -euo pipefail
if [[ $# -lt 6 ]]; then
  echo "usage: $0 NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE CONFIG [--set KEY=VALUE ...]" >&2
  exit 2
fi
nnodes="$1" node_rank="$2" master_addr="$3" master_port="$4" nproc="$5" config="$6"
shift 6
# The caller's directory stays the working directory: CONFIG and the paths in it are the caller's
# (pretrain reads relative paths from the working directory); the repository goes on the ranks' path.
repo="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)" # CDPATH: cd would print the directory
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
# shellcheck source=launch/stop_on_signal.bash
source "$repo/launch/stop_on_signal.bash"
run_stoppable torchrun --nnodes="$nnodes" --node-rank="$node_rank" --nproc-per-node="$nproc" \
  --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port" --rdzv-id="${RDZV_ID:-pretrain}" \
  -m pretrain train --config "$config" --resume "$@"
