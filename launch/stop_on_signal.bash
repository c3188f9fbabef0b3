# shellcheck shell=bash
# Sourced by the launch scripts and the container entry point; defines run_stoppable.
#
# run_stoppable CMD [ARGS...]: runs CMD (a launcher and its ranks) so that a SIGTERM or SIGINT to this
# shell stops the run the way a signal to the ranks does: every rank finishes its step, checkpoints and
# exits 75. Launchers do not pass the signal on faithfully -- the deepspeed launcher on one machine not at
# all (as a container's PID 1 it ignores SIGTERM, and killed, it leaves its ranks running); torchrun's
# agent SIGKILLs them after a grace (below) -- so the stop is handed to the ranks as a file they look for at
# every micro-step (PRETRAIN_STOP_FILE, pretrain/preemption.py). Returns CMD's status, or 75 when a stop
# was asked for, CMD failed and the ranks wrote their stop checkpoint (PRETRAIN_STOP_FILE.saved):
# launchers report a rank's 75 as 1, and a scheduler requeues on 75.
#
# torchrun's agent, signalled itself (a scheduler signals every process of the job), SIGKILLs its workers
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later, by default 30: a stop checkpoint of a large model takes
# longer. 900 here, so the scheduler's own grace (SLURM's KillWait or GraceTime, Kubernetes'
# terminationGracePeriodSeconds, `docker stop -t`) is what limits the checkpoint; set it to change that.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"
run_stoppable() {
  local stop_dir pid status
  stop_dir="$(mktemp -d "${TMPDIR:-/tmp}/pretrain-stop.XXXXXX")"
  export PRETRAIN_STOP_FILE="$stop_dir/stop"
  trap 'touch "$PRETRAIN_STOP_FILE"' TERM INT
  "$@" &
  pid=$!
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break # alive: a trapped signal ended the wait, the ranks are stopping
  done
  wait "$pid" && status=0 || status=$? # its own status, should the signal and its exit have crossed
  trap - TERM INT
  local stopped=0 saved=0
  [[ -e "$PRETRAIN_STOP_FILE" ]] && stopped=1
  [[ -e "$PRETRAIN_STOP_FILE.saved" ]] && saved=1 # the ranks write it once their stop checkpoint is
  rm -rf "$stop_dir"
  if ((stopped && status != 0 && saved)); then
    echo "run_stoppable: stopped on request (launcher status $status): exiting 75 so the job is requeued" >&2
    return 75
  fi
  if ((stopped && status != 0)); then # 75 would requeue a job that resumes from the same checkpoint
    echo "run_stoppable: asked to stop, but the ranks failed (status $status) without writing their stop" \
      "checkpoint: not a stop to requeue" >&2
  fi
  return "$status"
}
