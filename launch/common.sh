# shellcheck shell=bash
# Shared by every launch script: the flag table, --help, one-line errors and --dry-run.
#
# A script sets V4_PROG, V4_SUMMARY and V4_EPILOG, declares its flags with `v4_flag`, then calls
# `v4_parse "$@"`. Every command it would run goes through `v4_run` / `v4_run_bg` / `v4_capture`,
# which under --dry-run print the command (one line, shell-quoted, copy-pasteable) instead.

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "${0##*/}: error: needs bash >= 4.4 (macOS: brew install bash, then run it with that bash)" >&2
  exit 2
fi

V4_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
V4_REPO=$(cd "$V4_LAUNCH_DIR/.." && pwd)
V4_PROG=${V4_PROG:-${0##*/}}
V4_SUMMARY=${V4_SUMMARY:-}
V4_EPILOG=${V4_EPILOG:-}
V4_DRY_RUN=0
V4_OVERRIDES_OK=0     # 1: the script forwards --config.KEY=VALUE and `-- ARGS` to v4jax.train
V4_TRAIN_EXTRA=()     # those forwarded arguments, in the order given
V4_FLAG_NAMES=() V4_FLAG_VARS=() V4_FLAG_KINDS=() V4_FLAG_METAS=() V4_FLAG_HELPS=()
V4_BG_PIDS=()

v4_die() {
  echo "$V4_PROG: error: $*" >&2
  exit 2
}

v4_warn() {
  echo "$V4_PROG: warning: $*" >&2
}

# v4_flag --name VAR KIND META DEFAULT HELP
#   KIND: req (value, must be given) | opt (value) | bool (no value; sets VAR=1) | list (repeatable)
v4_flag() {
  local name=$1 var=$2 kind=$3 meta=$4 default=$5 help=$6
  V4_FLAG_NAMES+=("$name") V4_FLAG_VARS+=("$var") V4_FLAG_KINDS+=("$kind")
  V4_FLAG_METAS+=("$meta") V4_FLAG_HELPS+=("$help")
  case $kind in
    list) eval "$var=()" ;;
    bool) printf -v "$var" '%s' 0 ;;
    *) printf -v "$var" '%s' "$default" ;;
  esac
}

v4_help() {
  local i left
  echo "usage: $V4_PROG [flags]$( ((V4_OVERRIDES_OK)) && echo ' [--config.KEY=VALUE ...] [-- TRAIN_ARGS ...]')"
  echo
  echo "$V4_SUMMARY"
  echo
  echo "flags:"
  for i in "${!V4_FLAG_NAMES[@]}"; do
    left=${V4_FLAG_NAMES[i]}
    [[ ${V4_FLAG_KINDS[i]} == bool ]] || left+=" ${V4_FLAG_METAS[i]}"
    printf '  %-28s %s' "$left" "${V4_FLAG_HELPS[i]}"
    case ${V4_FLAG_KINDS[i]} in
      req) printf ' (required)' ;;
      list) printf ' (repeatable)' ;;
      opt) [[ -n ${!V4_FLAG_VARS[i]} ]] && printf ' (default: %s)' "${!V4_FLAG_VARS[i]}" ;;
    esac
    echo
  done
  if ((V4_OVERRIDES_OK)); then
    printf '  %-28s %s\n' '--config.KEY=VALUE' 'config override passed to v4jax.train unchanged (repeatable)'
    printf '  %-28s %s\n' '-- ARGS' 'everything after -- is passed to v4jax.train unchanged'
  fi
  printf '  %-28s %s\n' '--dry-run' 'print the commands, one per line, and run nothing'
  printf '  %-28s %s\n' '-h, --help' 'show this help'
  [[ -z $V4_EPILOG ]] || printf '\n%s\n' "$V4_EPILOG"
}

v4_flag_index() {
  local i
  for i in "${!V4_FLAG_NAMES[@]}"; do
    [[ ${V4_FLAG_NAMES[i]} == "$1" ]] && { echo "$i"; return 0; }
  done
  return 1
}

v4_parse() {
  local arg name value i kind
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help) v4_help; exit 0 ;;
      --dry-run) V4_DRY_RUN=1 ;;
      --)
        ((V4_OVERRIDES_OK)) || v4_die "unexpected '--' (see --help)"
        V4_TRAIN_EXTRA+=("$@")
        break
        ;;
      --config.*)
        ((V4_OVERRIDES_OK)) || v4_die "unknown flag ${arg%%=*} (see --help)"
        if [[ $arg == *=* ]]; then
          V4_TRAIN_EXTRA+=("$arg")
        else
          (($#)) || v4_die "$arg needs a value"
          V4_TRAIN_EXTRA+=("$arg=$1")
          shift
        fi
        ;;
      --*)
        name=${arg%%=*}
        i=$(v4_flag_index "$name") || v4_die "unknown flag $name (see --help)"
        kind=${V4_FLAG_KINDS[i]}
        if [[ $kind == bool ]]; then
          [[ $arg == *=* ]] && v4_die "$name takes no value"
          printf -v "${V4_FLAG_VARS[i]}" '%s' 1
          continue
        fi
        if [[ $arg == *=* ]]; then
          value=${arg#*=}
        else
          [[ $# -gt 0 && $1 != --* ]] || v4_die "$name needs a value (${V4_FLAG_METAS[i]})"
          value=$1
          shift
        fi
        [[ -n $value ]] || v4_die "$name needs a non-empty value (${V4_FLAG_METAS[i]})"
        if [[ $kind == list ]]; then
          eval "${V4_FLAG_VARS[i]}+=(\"\$value\")"
        else
          printf -v "${V4_FLAG_VARS[i]}" '%s' "$value"
        fi
        ;;
      *) v4_die "unexpected argument '$arg' (flags start with --; see --help)" ;;
    esac
  done
  for i in "${!V4_FLAG_NAMES[@]}"; do
    [[ ${V4_FLAG_KINDS[i]} == req && -z ${!V4_FLAG_VARS[i]} ]] &&
      v4_die "${V4_FLAG_NAMES[i]} is required (${V4_FLAG_METAS[i]}; see --help)"
  done
  return 0
}

# Checks used after parsing.
v4_need() { [[ -n $2 ]] || v4_die "$1 is required $3"; }
v4_int() { [[ $2 =~ ^[1-9][0-9]*$ ]] || v4_die "$1 must be a positive integer, got '$2'"; }
v4_choice() {
  local flag=$1 value=$2 c
  shift 2
  for c in "$@"; do [[ $value == "$c" ]] && return 0; done
  v4_die "$flag must be one of: $*; got '$value'"
}
v4_env_pair() { [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || v4_die "--env takes KEY=VALUE, got '$1'"; }

# One word, shell-quoted only when it needs it: --flag=VALUE keeps the flag bare.
v4_quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    v4_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Words joined into one shell command line.
v4_join() {
  local out=() w
  for w in "$@"; do out+=("$(v4_quote "$w")"); done
  printf '%s' "${out[*]}"
}

v4_run() {
  if ((V4_DRY_RUN)); then
    printf '%s\n' "$(v4_join "$@")"
  else
    "$@"
  fi
}

# Runs in the background; v4_wait waits for all of them and fails if any failed.
v4_run_bg() {
  if ((V4_DRY_RUN)); then
    printf '%s &\n' "$(v4_join "$@")"
  else
    "$@" &
    V4_BG_PIDS+=("$!")
  fi
}

v4_wait() {
  local pid rc=0
  if ((V4_DRY_RUN)); then
    echo wait
    return 0
  fi
  for pid in "${V4_BG_PIDS[@]}"; do wait "$pid" || rc=$?; done
  V4_BG_PIDS=()
  return "$rc"
}

# v4_capture VAR cmd...: VAR=$(cmd); under --dry-run prints `VAR=$(cmd)` and sets VAR to @VAR@.
v4_capture() {
  local var=$1
  shift
  if ((V4_DRY_RUN)); then
    # shellcheck disable=SC2016  # the $(...) is printed, not run
    printf '%s=$(%s)\n' "$var" "$(v4_join "$@")"
    printf -v "$var" '@%s@' "$var"
  else
    local captured
    captured=$("$@") || v4_die "failed ($?): $(v4_join "$@")"
    [[ -n $captured ]] || v4_die "no output from: $(v4_join "$@")"
    printf -v "$var" '%s' "$captured"
  fi
}

# The v4jax.train argument list: config, workdir, then the forwarded overrides.
v4_train_args() {
  # shellcheck disable=SC2034  # read by the caller
  V4_TRAIN_ARGS=(--config "$1" --workdir "$2" "${V4_TRAIN_EXTRA[@]}")
}

# A JSON string (for YAML flow lists and quoted values in manifests).
v4_json_str() {
  local s=$1
  [[ $s != *$'\n'* ]] || v4_die "value must be one line: '$s'"
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

v4_json_list() {
  local out=() w
  for w in "$@"; do out+=("$(v4_json_str "$w")"); done
  local IFS=,
  printf '[%s]' "${out[*]}"
}

# v4_render TEMPLATE OUT VAR...: writes TEMPLATE with each ${VAR} replaced by that shell variable.
# A placeholder alone on its line takes a multi-line value, each line indented like the
# placeholder (blank lines dropped); an empty one drops the line. A ${NAME} left without a value
# is an error.
v4_render() {
  local template=$1 dest=$2 line n=0 var val indent rendered=()
  shift 2
  [[ -f $template ]] || v4_die "template $template not found"
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    if [[ $line =~ ^([[:space:]]*)\$\{([A-Z_][A-Z0-9_]*)\}[[:space:]]*$ ]] &&
       v4_listed "${BASH_REMATCH[2]}" "$@"; then
      indent=${BASH_REMATCH[1]}
      val=${!BASH_REMATCH[2]}
      [[ -z $val ]] && continue
      while IFS= read -r var; do [[ -z $var ]] || rendered+=("$indent$var"); done <<<"$val"
      continue
    fi
    for var in "$@"; do
      val=${!var}
      line=${line//"\${$var}"/"$val"}
    done
    [[ $line =~ \$\{([A-Za-z_][A-Za-z0-9_]*)\} ]] &&
      v4_die "$template line $n: no value for \${${BASH_REMATCH[1]}}"
    rendered+=("$line")
  done <"$template"
  mkdir -p "$(dirname "$dest")"
  printf '%s\n' "${rendered[@]}" >"$dest"
}

v4_listed() {
  local x=$1 y
  shift
  for y in "$@"; do [[ $x == "$y" ]] && return 0; done
  return 1
}

# Flags shared by the launch/tpu scripts, and the node names they act on.
v4_tpu_flags() {
  v4_flag --name NAME req NAME '' 'queued-resource name; the slice is TPU VM NAME (multislice: NAME-0 .. NAME-<N-1>)'
  v4_flag --zone ZONE req ZONE '' 'zone of the TPUs, e.g. us-east5-a'
  v4_flag --project PROJECT req PROJECT '' 'Google Cloud project id'
}

v4_slices_flag() {
  v4_flag --num-slices SLICES opt N 1 'number of slices; more than 1 is a multislice over DCN'
}

# shellcheck disable=SC2153  # NAME, ZONE, PROJECT and SLICES are set by the flags above
v4_tpu_nodes() {
  local i
  SLICES=${SLICES:-1}
  v4_int --num-slices "$SLICES"
  V4_NODES=()
  if ((SLICES == 1)); then
    V4_NODES=("$NAME")
  else
    for ((i = 0; i < SLICES; i++)); do V4_NODES+=("$NAME-$i"); done
  fi
  # shellcheck disable=SC2034  # read by the caller
  V4_LOC=(--zone="$ZONE" --project="$PROJECT")
}
