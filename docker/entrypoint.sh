#!/usr/bin/env bash
# Container entry point: `entrypoint.sh VERB ARGS...` with VERB one of train, eval, report, compare,
# tokenizer, pretokenize, tasks. ARGS go to `python -m pretrain VERB` untouched (`--set k=v`, `--resume`, ...).
#
# `train` picks its launch from the environment:
#   NNODES / NODE_RANK / MASTER_ADDR set  -> torchrun, c10d rendezvous at MASTER_ADDR:MASTER_PORT
#   SLURM_NNODES set (srun, 1 task a node) -> torchrun, c10d rendezvous on the allocation's first node
#   otherwise                              -> the deepspeed launcher on this machine's GPUs, or one
#                                             process on the CPU when there is none
# The other verbs run as one process. PRETRAIN_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

PYTHON="${PYTHON:-python}"
VERBS="train eval report compare tokenizer pretokenize tasks"

usage() {
  cat >&2 <<USAGE
usage: entrypoint.sh VERB [ARGS...]
  train     --config FILE [--set KEY=VALUE ...] [--resume]
  tokenizer --config FILE [--set KEY=VALUE ...]
  pretokenize --config FILE [--set KEY=VALUE ...]
  eval      --run DIR [--phase N]
  report    --run DIR
  compare   RUN_DIR [RUN_DIR ...] [--out DIR]
  tasks     convert SRC [SRC ...] --out DIR | yaml TASK_DIR [...] --out DIR
environment (train): NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE RDZV_ID, or SLURM_*
USAGE
}

die() {
  echo "entrypoint: $*" >&2
  usage
  exit 2
}

# The value of option $1 (--opt VALUE or --opt=VALUE) among the remaining arguments, or nothing.
option_value() {
  local name="$1"
  shift
  while (($#)); do
    case "$1" in
      "$name") [[ $# -ge 2 ]] && printf '%s' "$2" && return 0 ;;
      "$name="*) printf '%s' "${1#"$name"=}" && return 0 ;;
    esac
    shift
  done
  return 1
}

check_args() {
  local verb="$1"
  shift
  case "$verb" in
    train | tokenizer | pretokenize)
      local config
      config="$(option_value --config "$@")" || die "$verb needs --config FILE"
      [[ -f "$config" ]] || die "config file not found: $config"
      ;;
    eval | report)
      option_value --run "$@" >/dev/null || die "$verb needs --run DIR"
      ;;
    compare)
      (($#)) || die "compare needs at least one run directory"
      ;;
  esac
}

# GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else 0.
gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    local ids
    IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    if [[ "${CUDA_VISIBLE_DEVICES}" == "" || "${ids[0]}" == "-1" ]]; then echo 0; else echo "${#ids[@]}"; fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# First host of a SLURM node list: `scontrol show hostnames` when present, else the simple forms
# "a,b", "node[03-04,07]" and "gpu-[1-2]-x" are expanded far enough to name the first host.
first_host() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  local prefix rest first
  if [[ "$list" =~ ^([^,\[]*)\[([^]]*)\](.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    first="${BASH_REMATCH[2]%%,*}"
    rest="${BASH_REMATCH[3]%%,*}"
    echo "${prefix}${first%%-*}${rest}"
  else
    echo "${list%%,*}"
  fi
}

# Sets nnodes, node_rank, master_addr, master_port, rdzv_id from the environment; returns 1 when
# neither a torchrun-style nor a SLURM multi-node environment is present.
multinode_env() {
  if [[ -n "${NNODES:-}${NODE_RANK:-}${MASTER_ADDR:-}" ]]; then
    nnodes="${NNODES:-1}"
    node_rank="${NODE_RANK:-0}"
    if [[ -z "${MASTER_ADDR:-}" && "$nnodes" != 1 ]]; then
      die "NNODES=$nnodes needs MASTER_ADDR (the address of node 0)"
    fi
    master_addr="${MASTER_ADDR:-127.0.0.1}"
    master_port="${MASTER_PORT:-29500}"
    rdzv_id="${RDZV_ID:-pretrain}"
  elif [[ -n "${SLURM_NNODES:-}" ]]; then
    nnodes="$SLURM_NNODES"
    node_rank="${SLURM_NODEID:-0}"
    local tasks="${SLURM_NTASKS:-$nnodes}"
    if [[ "$tasks" != "$nnodes" ]]; then
      die "SLURM job step has $tasks tasks on $nnodes nodes; start one task a node (srun --ntasks-per-node=1)"
    fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then
      master_addr="$MASTER_ADDR"
    elif [[ -n "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}" ]]; then
      master_addr="$(first_host "${SLURM_JOB_NODELIST:-$SLURM_NODELIST}")"
    else
      die "SLURM_NNODES is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR is"
    fi
    local job="${SLURM_JOB_ID:-0}"
    master_port="${MASTER_PORT:-$((20000 + job % 20000))}"  # per job: two jobs on a node do not clash
    rdzv_id="${RDZV_ID:-slurm-$job}"
  else
    return 1
  fi
  [[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "number of nodes must be a positive integer, got '$nnodes'"
  [[ "$node_rank" =~ ^[0-9]+$ ]] || die "node rank must be a non-negative integer, got '$node_rank'"
  ((node_rank < nnodes)) || die "node rank $node_rank is not below the number of nodes $nnodes"
}

# Fills the array `cmd` with the command that runs `pretrain VERB ARGS`.
build_command() {
  local verb="$1"
  shift
  local gpus nproc
  gpus="$(gpu_count)"
  nproc="${NPROC_PER_NODE:-$gpus}"
  [[ "$nproc" =~ ^[0-9]+$ ]] || die "NPROC_PER_NODE must be an integer, got '$nproc'"
  cmd=()
  if ((gpus == 0)); then
    cmd=(env DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}")
  fi
  if [[ "$verb" != train ]]; then
    cmd+=("$PYTHON" -m pretrain "$verb" "$@")
  elif multinode_env; then
    cmd+=(torchrun --nnodes="$nnodes" --nproc-per-node="$((nproc > 0 ? nproc : 1))"
      --node-rank="$node_rank" --rdzv-backend=c10d --rdzv-endpoint="$master_addr:$master_port"
      --rdzv-id="$rdzv_id" -m pretrain train "$@")
  elif ((nproc > 1)); then
    cmd+=(deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module pretrain train "$@")
  else
    cmd+=("$PYTHON" -m pretrain train "$@")
  fi
}

main() {
  (($#)) || die "no verb given"
  local verb="$1"
  shift
  case "$verb" in
    -h | --help | help)
      usage
      exit 0
      ;;
  esac
  [[ " $VERBS " == *" $verb "* ]] || die "unknown verb '$verb' (one of: $VERBS)"
  check_args "$verb" "$@"
  build_command "$verb" "$@"
  if [[ "${PRETRAIN_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
  fi
  if [[ "$verb" != train ]]; then
    exec "${cmd[@]}"
  fi
  # shellcheck source=launch/stop_on_signal.bash
  source "$(dirname "${BASH_SOURCE[0]}")/../launch/stop_on_signal.bash"
  run_stoppable "${cmd[@]}" # a SIGTERM to the container reaches the ranks through any launcher
}

main "$@"
