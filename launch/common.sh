# Shared by the launch scripts (sourced, not run): errors, printing-and-running commands, option
# values and the --jobs list. The sourcing script sets DRY_RUN, WORKDIR, CONFIG and JOBS.

die() { echo "error: $*" >&2; exit 2; }
warn() { echo "warning: $*" >&2; }

# Shell-quotes one word so that the printed line can be pasted into a shell.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() {
  local words=() w
  for w in "$@"; do words+=("$(quote "$w")"); done
  printf '%s' "${words[*]}"
}
# Prints a command as "+ cmd" and runs it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote_all "$@")"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}
require_value() {  # OPTION [VALUE]: a value must follow (--*-arg values may start with -)
  [[ $# -ge 2 && ($2 != -* || $1 == --*-arg) ]] || die "$1 needs a value (see --help)"
}
# Checks --workdir, --jobs (and --config when training); sets JOB_LIST.
check_workdir_and_jobs() {
  [[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
  IFS=, read -ra JOB_LIST <<<"$JOBS"
  ((${#JOB_LIST[@]})) || die "--jobs is empty: give e.g. --jobs train,evaluate"
  local job
  for job in "${JOB_LIST[@]}"; do
    case $job in
      train) [[ -n $CONFIG ]] || die "--config is required to train (see --help)" ;;
      evaluate|finetune) ;;
      *) die "--jobs: unknown job '$job'; choose from train, evaluate, finetune" ;;
    esac
  done
}
# --malloc MODE (auto|jemalloc|tcmalloc|system) -> MALLOC_ENV, the environment that preloads it.
# XLA:CPU frees and re-allocates each step's temporaries; glibc returns them to the OS, so the
# step page-faults them again (ssl_jax/allocator.py). auto: jemalloc, else tcmalloc, else system.
# Where to look (SSL_JAX_MALLOC_LIB_DIRS, colon-separated, replaces the list: used by the tests).
IFS=: read -ra MALLOC_LIBS <<<"${SSL_JAX_MALLOC_LIB_DIRS-/usr/lib/x86_64-linux-gnu:/usr/lib/aarch64-linux-gnu:/usr/lib64:/usr/lib}"
find_malloc() {  # NAME -> path of its shared library, or nothing
  local dir l lib
  case $1 in
    jemalloc) lib=(libjemalloc.so.2) ;;
    tcmalloc) lib=(libtcmalloc_minimal.so.4 libtcmalloc.so.4) ;;
  esac
  for dir in "${MALLOC_LIBS[@]}"; do
    for l in "${lib[@]}"; do [[ -e $dir/$l ]] && { echo "$dir/$l"; return 0; }; done
  done
  return 0
}
malloc_env() {  # MODE; sets MALLOC_ENV (VAR=VALUE words for env)
  local mode=$1 path="" name
  MALLOC_ENV=()
  case $mode in
    system) return ;;
    auto) for name in jemalloc tcmalloc; do path=$(find_malloc $name); [[ -n $path ]] && break; done
          [[ -n $path ]] || { warn "no jemalloc/tcmalloc found: CPU steps run ~1.25x slower" \
            "(apt-get install libjemalloc2, or --malloc system to silence this)"; return; } ;;
    jemalloc|tcmalloc) name=$mode; path=$(find_malloc "$mode")
          [[ -n $path ]] || die "--malloc $mode: its library is not installed" \
            "(apt-get install ${mode/jemalloc/libjemalloc2}; tcmalloc: libtcmalloc-minimal4)" ;;
    *) die "--malloc: unknown allocator '$mode'; choose from auto, jemalloc, tcmalloc, system" ;;
  esac
  MALLOC_ENV=("LD_PRELOAD=$path${LD_PRELOAD:+:$LD_PRELOAD}")
  [[ $name == jemalloc ]] && MALLOC_ENV+=("MALLOC_CONF=oversize_threshold:0,background_thread:true")
  return 0
}
