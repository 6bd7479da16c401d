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
