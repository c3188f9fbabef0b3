#!/usr/bin/env bash
# Multi-node run with the deepspeed launcher: run once, on the first host of the hostfile; it starts the
# ranks on every host over ssh (pdsh by default).
#   launch/multinode_deepspeed.sh CONFIG [--set KEY=VALUE ...]
# HOSTFILE     hostfile, "HOST slots=GPUS" a line (default: launch/hostfile beside this script; see
#              launch/hostfile.example)
# MASTER_ADDR  address the ranks rendezvous at (default: the first host in the hostfile)
# MASTER_PORT  a port free on that host (default 29500)
# LAUNCHER     the launcher's backend: pdsh, openmpi, mvapich, slurm, ... (default pdsh)
# Environment the remote ranks need (HF_HUB_OFFLINE, NCCL_*, PYTHONPATH...) goes in a .deepspeed_env file
# in the working directory or $HOME, "NAME=VALUE" a line; the launcher exports it on every host.
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

hostfile="${HOSTFILE:-$repo/launch/hostfile}"
if [[ ! -f "$hostfile" ]]; then
  echo "$0: hostfile '$hostfile' not found; copy launch/hostfile.example and set HOSTFILE" >&2
  exit 2
fi
first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")"
if [[ -z "$first_host" ]]; then
  echo "$0: no host in '$hostfile'" >&2
  exit 2
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec deepspeed --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" \
  --master_addr "${MASTER_ADDR:-$first_host}" --master_port "${MASTER_PORT:-29500}" \
  --module pretrain train --config "$config" --resume "$@"
