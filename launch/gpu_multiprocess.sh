#!/usr/bin/env bash
# N JAX processes (one or several hosts, e.g. one per GPU or per node), SLURM-friendly.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_multiprocess.sh --workdir DIR [--config FILE:ARG] [options] [-- TRAIN_ARGS...]

Each process of the run gets the coordinator, the process count and its index through the
environment that ssl_jax reads (SSL_JAX_COORDINATOR, SSL_JAX_NUM_PROCESSES, SSL_JAX_PROCESS_ID),
for every job of --jobs in turn (train, then evaluate, ...). Two ways to start the processes:

  --local        this script starts all N processes on this host in the background, one log per
                 process (LOG_DIR/JOB_process_I.log), waits for all of them and exits non-zero
                 (stopping the others) as soon as one fails.
  (default)      this script is one process: start it once per process, on each host, with
                 --process-id I (or under SLURM with srun, which sets SLURM_PROCID/SLURM_NTASKS).

Options:
  --workdir DIR           run directory, shared by all processes (required)
  --config FILE:ARG       training config (required with train)
  --jobs LIST             in order: train,evaluate,finetune (default: train,evaluate)
  --num-processes N       processes in the run (default under SLURM: $SLURM_NTASKS)
  --process-id I          this process's index, 0..N-1 (default under SLURM: $SLURM_PROCID)
  --coordinator HOST:PORT address of process 0 (default under SLURM: the first host of
                          `scontrol show hostnames $SLURM_JOB_NODELIST`, else 127.0.0.1; :PORT)
  --port PORT             coordinator port when --coordinator is not given (default: 12345)
  --local                 start all --num-processes processes here (see above)
  --gpus-per-process G    set CUDA_VISIBLE_DEVICES to G GPUs per process: process I (with --local)
                          or SLURM local task I ($SLURM_LOCALID) gets GPUs I*G..I*G+G-1
  --log-dir DIR           logs of --local (default: WORKDIR/logs)
  --python PY             Python interpreter (default: $PYTHON or python3)
  --eval-arg ARG          one more argument for ssl_jax.evaluate (repeatable)
  --finetune-arg ARG      one more argument for ssl_jax.finetune (repeatable)
  --dry-run               print each command ("+ " and shell-quoted), run nothing
  -h, --help              this text
Everything after -- goes to ssl_jax.train (--config.KEY=VALUE overrides, --stop_at_step=N).

Examples:
  launch/gpu_multiprocess.sh --local --num-processes 4 --gpus-per-process 2 \
      --config configs/dino.py:data=cifar10 --workdir /shared/runs/dino -- --config.batch_size=512
  srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 launch/gpu_multiprocess.sh \
      --config configs/mae.py:data=imagenet2012 --workdir /shared/runs/mae
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_int() {  # OPTION VALUE MIN
  [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3)) || die "$1 must be an integer >= $3, got '$2'"
}

WORKDIR="" CONFIG="" JOBS="train,evaluate" NUM="" PID_="" COORD="" PORT=12345 LOCAL=0 GPP=""
LOG_DIR="" PY="${PYTHON:-python3}" DRY_RUN=0
EVAL_ARGS=() FINETUNE_ARGS=() TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --opt=value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --workdir) require_value "$@"; WORKDIR=$2; shift 2 ;;
    --config) require_value "$@"; CONFIG=$2; shift 2 ;;
    --jobs) require_value "$@"; JOBS=$2; shift 2 ;;
    --num-processes) require_value "$@"; NUM=$2; shift 2 ;;
    --process-id) require_value "$@"; PID_=$2; shift 2 ;;
    --coordinator) require_value "$@"; COORD=$2; shift 2 ;;
    --port) require_value "$@"; PORT=$2; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --gpus-per-process) require_value "$@"; GPP=$2; shift 2 ;;
    --log-dir) require_value "$@"; LOG_DIR=$2; shift 2 ;;
    --python) require_value "$@"; PY=$2; shift 2 ;;
    --eval-arg) require_value "$@"; EVAL_ARGS+=("$2"); shift 2 ;;
    --finetune-arg) require_value "$@"; FINETUNE_ARGS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) die "unexpected argument $1: arguments for ssl_jax.train go after --" ;;
  esac
done

check_workdir_and_jobs
require_int --port "$PORT" 1
[[ -z $GPP ]] || require_int --gpus-per-process "$GPP" 1

# Process count, index and coordinator: flags first, then SLURM, then this host.
UNDER_SLURM=0
if ((!LOCAL)) && [[ -n ${SLURM_PROCID:-} ]]; then UNDER_SLURM=1; fi
if ((LOCAL)); then
  [[ -n $NUM ]] || die "--local needs --num-processes N"
  [[ -z $PID_ ]] || die "--process-id cannot be combined with --local (it starts all processes)"
else
  if ((UNDER_SLURM)); then
    NUM=${NUM:-${SLURM_NTASKS:-}}
    PID_=${PID_:-$SLURM_PROCID}
    echo "SLURM: task ${SLURM_PROCID} of ${SLURM_NTASKS:-?} on node ${SLURM_NODEID:-?}" >&2
  fi
  [[ -n $NUM ]] || die "--num-processes is required (or run under SLURM with SLURM_NTASKS set)"
  [[ -n $PID_ ]] || die "--process-id is required (or run under SLURM with SLURM_PROCID set)"
fi
require_int --num-processes "$NUM" 1
if ((!LOCAL)); then
  require_int --process-id "$PID_" 0
  ((PID_ < NUM)) || die "--process-id $PID_ must be below --num-processes $NUM"
fi
if [[ -z $COORD ]]; then
  if ((UNDER_SLURM)); then
    [[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set: give --coordinator"
    command -v scontrol >/dev/null || die "scontrol not found: give --coordinator HOST:PORT"
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    COORD="${hosts%%$'\n'*}:$PORT"
  else
    COORD="127.0.0.1:$PORT"
  fi
fi
[[ $COORD =~ ^.+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$COORD'"
GPU_INDEX=""
if [[ -n $GPP ]] && ((!LOCAL)); then
  [[ -n ${SLURM_LOCALID:-} ]] \
    || die "--gpus-per-process needs --local or SLURM_LOCALID; else set CUDA_VISIBLE_DEVICES"
  GPU_INDEX=$SLURM_LOCALID
fi

# job_command JOB I: sets CMD to the command of process I for JOB.
job_command() {
  local env=(env)
  if [[ -n $3 ]]; then
    local gpus=() g
    for ((g = $3 * GPP; g < ($3 + 1) * GPP; g++)); do gpus+=("$g"); done
    env+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${gpus[*]}")")
  fi
  env+=("SSL_JAX_COORDINATOR=$COORD" "SSL_JAX_NUM_PROCESSES=$NUM" "SSL_JAX_PROCESS_ID=$2")
  case $1 in
    train) CMD=("${env[@]}" "$PY" -m ssl_jax.train --config "$CONFIG" --workdir "$WORKDIR"
                ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}) ;;
    evaluate) CMD=("${env[@]}" "$PY" -m ssl_jax.evaluate --workdir "$WORKDIR"
                   ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}) ;;
    finetune) CMD=("${env[@]}" "$PY" -m ssl_jax.finetune --workdir "$WORKDIR"
                   ${FINETUNE_ARGS[@]+"${FINETUNE_ARGS[@]}"}) ;;
  esac
}

if ((!LOCAL)); then
  for job in "${JOB_LIST[@]}"; do
    job_command "$job" "$PID_" "$GPU_INDEX"
    run "${CMD[@]}"
  done
  exit 0
fi

# --local: N background processes per job, all waited for; the first failure stops the rest.
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
[[ $LOG_DIR != *://* ]] || die "--log-dir must be a local directory, got '$LOG_DIR'"
PIDS=()
stop_all() {
  local p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null || true; done
  for p in ${PIDS[@]+"${PIDS[@]}"}; do wait "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

# wait_all JOB: waits for PIDS; on the first failure prints its log's tail, stops the others.
wait_all() {
  local alive=("${!PIDS[@]}") next i status
  while ((${#alive[@]})); do
    next=()
    for i in "${alive[@]}"; do
      if kill -0 "${PIDS[i]}" 2>/dev/null; then next+=("$i"); continue; fi
      status=0
      wait "${PIDS[i]}" || status=$?
      if ((status)); then
        echo "error: $1 process $i exited with status $status; the end of its log" \
             "$LOG_DIR/${1}_process_$i.log:" >&2
        tail -n 20 "$LOG_DIR/${1}_process_$i.log" >&2 || true
        stop_all
        return 1
      fi
    done
    alive=(${next[@]+"${next[@]}"})
    if ((${#alive[@]})); then sleep 1; fi
  done
}

run mkdir -p "$LOG_DIR"
for job in "${JOB_LIST[@]}"; do
  PIDS=()
  for ((i = 0; i < NUM; i++)); do
    job_command "$job" "$i" "${GPP:+$i}"
    log="$LOG_DIR/${job}_process_$i.log"
    printf '+ %s > %s 2>&1 &\n' "$(quote_all "${CMD[@]}")" "$(quote "$log")"
    if ((!DRY_RUN)); then
      "${CMD[@]}" >"$log" 2>&1 &
      PIDS+=("$!")
    fi
  done
  printf '+ wait\n'
  if ((!DRY_RUN)); then
    wait_all "$job" || exit 1
    PIDS=()
  fi
done
