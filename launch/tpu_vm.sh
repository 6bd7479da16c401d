#!/usr/bin/env bash
# A Cloud TPU VM or pod slice: create it, install ssl_jax on every worker, run the jobs on all
# workers at once (JAX finds the other hosts itself: SSL_JAX_DISTRIBUTED=auto).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --workdir gs://BUCKET/DIR [--config FILE:ARG]
                        [options] [-- TRAIN_ARGS...]

Steps (each printed as "+ command" before it runs):
  1. with --create: gcloud compute tpus tpu-vm create NAME --accelerator-type --version [--spot]
  2. unless --skip-setup: put the code in ~/REMOTE_DIR on every worker (git clone/pull of a git
     URL, or a local directory copied with `tpu-vm scp --recurse --worker=all` after removing
     the old copy) and pip install -e . "jax[tpu]" gcsfs there
  3. per job of --jobs: gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd REMOTE_DIR
     && SSL_JAX_DISTRIBUTED=auto python3 -m ssl_jax.JOB ..."
  4. with --delete-after: gcloud compute tpus tpu-vm delete NAME (also when a step failed)

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-central2-b (required)
  --workdir DIR            run directory; must be gs://... for a multi-host slice (more than 8
                           cores or chips in the accelerator type), where every worker writes
                           into the same run; a VM-local path on one host only warns (required)
  --config FILE:ARG        training config (required with train)
  --jobs LIST              in order: train,evaluate,finetune (default: train,evaluate)
  --data-dir gs://...      TFDS data dir: --config.data.data_dir for train, TFDS_DATA_DIR for all
  --project PROJECT        Google Cloud project (default: gcloud's configured one)
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16 (required with --create)
  --version VERSION        TPU VM runtime, e.g. tpu-ubuntu2204-base (required with --create)
  --create                 create the TPU VM first
  --spot                   create it as a Spot VM (cheaper, can be preempted; re-running resumes)
  --delete-after           delete the TPU VM at the end (needs a gs:// workdir)
  --repo URL|PATH          git URL to clone, or local directory to copy (default: this checkout)
  --remote-dir DIR         where the code lives on the workers, under ~ (default: ssl_jax)
  --skip-setup             skip copy and install (the workers already have the code)
  --python PY              Python on the workers (default: python3)
  --eval-arg ARG           one more argument for ssl_jax.evaluate (repeatable)
  --finetune-arg ARG       one more argument for ssl_jax.finetune (repeatable)
  --dry-run                print each command ("+ " and shell-quoted), run nothing
  -h, --help               this text
Everything after -- goes to ssl_jax.train (--config.KEY=VALUE overrides, --stop_at_step=N).

Example:
  launch/tpu_vm.sh --create --spot --delete-after --name ssl-v4 --zone us-central2-b \
      --accelerator-type v4-32 --version tpu-ubuntu2204-base --data-dir gs://my-bucket/tfds \
      --workdir gs://my-bucket/runs/dino_in1k --config configs/dino.py:data=imagenet2012
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME="" ZONE="" WORKDIR="" CONFIG="" JOBS="train,evaluate" DATA_DIR="" PROJECT="" ACCEL=""
VERSION="" CREATE=0 SPOT=0 DELETE_AFTER=0 REPO="" REMOTE_DIR="ssl_jax" SKIP_SETUP=0 PY=python3
DRY_RUN=0 EVAL_ARGS=() FINETUNE_ARGS=() TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == --?*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi  # --opt=value
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) require_value "$@"; NAME=$2; shift 2 ;;
    --zone) require_value "$@"; ZONE=$2; shift 2 ;;
    --workdir) require_value "$@"; WORKDIR=$2; shift 2 ;;
    --config) require_value "$@"; CONFIG=$2; shift 2 ;;
    --jobs) require_value "$@"; JOBS=$2; shift 2 ;;
    --data-dir) require_value "$@"; DATA_DIR=$2; shift 2 ;;
    --project) require_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) require_value "$@"; ACCEL=$2; shift 2 ;;
    --version) require_value "$@"; VERSION=$2; shift 2 ;;
    --create) CREATE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --delete-after) DELETE_AFTER=1; shift ;;
    --repo) require_value "$@"; REPO=$2; shift 2 ;;
    --remote-dir) require_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --python) require_value "$@"; PY=$2; shift 2 ;;
    --eval-arg) require_value "$@"; EVAL_ARGS+=("$2"); shift 2 ;;
    --finetune-arg) require_value "$@"; FINETUNE_ARGS+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) die "unexpected argument $1: arguments for ssl_jax.train go after --" ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (see --help)"
[[ -n $ZONE ]] || die "--zone is required (see --help)"
check_workdir_and_jobs
if ((CREATE)); then
  [[ -n $ACCEL ]] || die "--create needs --accelerator-type (e.g. v4-8, v5litepod-16)"
  [[ -n $VERSION ]] || die "--create needs --version (the TPU VM runtime, e.g. tpu-ubuntu2204-base)"
fi
((!SPOT || CREATE)) || die "--spot only applies with --create"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && $REMOTE_DIR != *..* ]] \
  || die "--remote-dir must be a plain relative path under ~, got '$REMOTE_DIR'"

# The workdir: every worker of a multi-host slice writes into the same run, so it must be on GCS.
# The number in the accelerator type counts cores (v2-v4, v5p) or chips (v5e, v6e); up to 8 is
# one host either way.
if [[ $WORKDIR != gs://* ]]; then
  hosts_known=0 multi_host=0
  if [[ $ACCEL =~ -([0-9]+)$ ]]; then
    hosts_known=1
    ((BASH_REMATCH[1] <= 8)) || multi_host=1
  fi
  if ((multi_host)); then
    die "--workdir must be a gs:// path on the multi-host slice $ACCEL (each worker would" \
        "write its own copy of the run), got '$WORKDIR'"
  elif ((DELETE_AFTER)); then
    die "--delete-after with --workdir '$WORKDIR' on the VM's disk would delete the results:" \
        "use a gs:// workdir"
  elif ((hosts_known)); then
    warn "--workdir '$WORKDIR' is on the TPU VM's disk (not gs://): it goes with the VM"
  else
    warn "--workdir '$WORKDIR' is not gs://; on a multi-host slice it must be (give" \
         "--accelerator-type to check)"
  fi
fi
if [[ -n $DATA_DIR && $DATA_DIR != gs://* ]]; then
  warn "--data-dir '$DATA_DIR' is not gs://: every worker needs that data at that path"
fi

# The code on the workers.
if [[ -z $REPO ]]; then REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); fi
if [[ $REPO =~ ^(https?|ssh|git|file)://|^[^/]+@[^/:]+: ]]; then
  REPO_IS_URL=1
else
  REPO_IS_URL=0
  [[ -d $REPO ]] || die "--repo '$REPO' is neither a git URL nor a local directory"
fi

GCLOUD_ZONE=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_ZONE+=("--project=$PROJECT")

# on_all_workers COMMAND: runs a shell command line on every worker of the TPU VM.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_ZONE[@]}" --worker=all "--command=$1"
}

if ((DELETE_AFTER)); then
  delete_vm() {
    local status=$?
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_ZONE[@]}" --quiet || status=1
    exit "$status"
  }
  trap delete_vm EXIT
fi

if ((CREATE)); then
  create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_ZONE[@]}"
          "--accelerator-type=$ACCEL" "--version=$VERSION")
  ((!SPOT)) || create+=(--spot)
  run "${create[@]}"
fi

if ((!SKIP_SETUP)); then
  remote_dir=$(quote "$REMOTE_DIR")
  if ((REPO_IS_URL)); then
    fetch="if [ -d $remote_dir/.git ]; then git -C $remote_dir pull --ff-only;"
    fetch+=" else git clone $(quote "$REPO") $remote_dir; fi && "
  else
    on_all_workers "rm -rf $remote_dir"
    run gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME:$REMOTE_DIR" \
      "${GCLOUD_ZONE[@]}" --worker=all
    fetch=""
  fi
  on_all_workers "${fetch}cd $remote_dir && $(quote "$PY") -m pip install -q -e . 'jax[tpu]' gcsfs"
fi

env_words=(SSL_JAX_DISTRIBUTED=auto)
[[ -z $DATA_DIR ]] || env_words+=("TFDS_DATA_DIR=$DATA_DIR")
for job in "${JOB_LIST[@]}"; do
  case $job in
    train)
      cmd=("$PY" -m ssl_jax.train --config "$CONFIG" --workdir "$WORKDIR")
      [[ -z $DATA_DIR ]] || cmd+=("--config.data.data_dir=$DATA_DIR")
      cmd+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}) ;;
    evaluate) cmd=("$PY" -m ssl_jax.evaluate --workdir "$WORKDIR"
                   ${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}) ;;
    finetune) cmd=("$PY" -m ssl_jax.finetune --workdir "$WORKDIR"
                   ${FINETUNE_ARGS[@]+"${FINETUNE_ARGS[@]}"}) ;;
  esac
  on_all_workers "cd $(quote "$REMOTE_DIR") && $(quote_all "${env_words[@]}" "${cmd[@]}")"
done
