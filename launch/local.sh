#!/usr/bin/env bash
# One process on this machine (CPU or GPU): pre-train, then evaluate the run.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh --workdir DIR [--config FILE:ARG] [options] [-- TRAIN_ARGS...]

Runs the jobs of --jobs one after the other in one process on this machine, from the
repository root: python -m ssl_jax.train, then python -m ssl_jax.evaluate (and finetune).

Options:
  --workdir DIR         run directory (required)
  --config FILE:ARG     training config, e.g. configs/simclr.py:data=digits (required with train)
  --jobs LIST           comma-separated, run in this order: train,evaluate,finetune
                        (default: train,evaluate)
  --devices N           force N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
                        JAX_PLATFORMS=cpu), e.g. to try the sharded code paths on a laptop
  --python PY           Python interpreter (default: $PYTHON or python3)
  --malloc MODE         heap allocator to preload: auto (jemalloc, else tcmalloc, else the
                        system's), jemalloc, tcmalloc or system (default: auto). XLA:CPU steps
                        run ~1.25x faster on jemalloc/tcmalloc (ssl_jax/allocator.py)
  --eval-arg ARG        one more argument for ssl_jax.evaluate (repeatable),
                        e.g. --eval-arg=--config.eval.knn_k=10
  --finetune-arg ARG    one more argument for ssl_jax.finetune (repeatable)
  --dry-run             print each command ("+ " and shell-quoted), run nothing
  -h, --help            this text
Everything after -- goes to ssl_jax.train: --config.KEY=VALUE overrides, --stop_at_step=N.

Example:
  launch/local.sh --config configs/simclr.py:data=digits --workdir workdirs/simclr_digits \
      --devices 2 -- --config.batch_size=128
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKDIR="" CONFIG="" JOBS="train,evaluate" DEVICES="" PY="${PYTHON:-python3}" DRY_RUN=0 MALLOC=auto
EVAL_ARGS=() FINETUNE_ARGS=() TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --opt=value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --workdir) require_value "$@"; WORKDIR=$2; shift 2 ;;
    --config) require_value "$@"; CONFIG=$2; shift 2 ;;
    --jobs) require_value "$@"; JOBS=$2; shift 2 ;;
    --devices) require_value "$@"; DEVICES=$2; shift 2 ;;
    --python) require_value "$@"; PY=$2; shift 2 ;;
    --malloc) require_value "$@"; MALLOC=$2; shift 2 ;;
    --eval-arg) require_value "$@"; EVAL_ARGS+=("$2"); shift 2 ;;
    --finetune-arg) require_value "$@"; FINETUNE_ARGS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) die "unexpected argument $1: arguments for ssl_jax.train go after --" ;;
  esac
done

check_workdir_and_jobs

ENV=()
if [[ -n $DEVICES ]]; then
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer, got '$DEVICES'"
  xla_flags=""
  for flag in ${XLA_FLAGS:-}; do  # an inherited device count would fight ours
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
  done
  ENV=("XLA_FLAGS=${xla_flags}--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu)
fi
malloc_env "$MALLOC"
ENV+=(${MALLOC_ENV[@]+"${MALLOC_ENV[@]}"})
((${#ENV[@]})) && ENV=(env "${ENV[@]}")

for job in "${JOB_LIST[@]}"; do
  case $job in
    train) cmd=("$PY" -m ssl_jax.train --config "$CONFIG" --workdir "$WORKDIR"
                ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}) ;;
    evaluate) cmd=("$PY" -m ssl_jax.evaluate --workdir "$WORKDIR"
                   ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}) ;;
    finetune) cmd=("$PY" -m ssl_jax.finetune --workdir "$WORKDIR"
                   ${FINETUNE_ARGS[@]+"${FINETUNE_ARGS[@]}"}) ;;
  esac
  run ${ENV[@]+"${ENV[@]}"} "${cmd[@]}"
done
