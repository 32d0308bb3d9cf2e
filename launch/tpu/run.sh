#!/usr/bin/env bash
# Puts the code on every TPU VM worker, trains on all of them at once, and collects the logs.
set -euo pipefail

V4_PROG=launch/tpu/run.sh
# shellcheck disable=SC2016  # backquotes in the help text are literal
V4_SUMMARY='Runs `python -m v4jax.train` on every worker of a TPU slice (or of every slice of a
multislice) made by launch/tpu/create.sh. Steps, each a gcloud command:
  1. setup: copy this checkout to every worker (--source copy, the default) or clone it there
     (--source git), make the venv ~/v4jax-venv and `pip install -e .[tpu]` in it;
  2. train: one `gcloud compute tpus tpu-vm ssh --worker=all` per slice, all slices at once;
     each worker appends its output to ~/v4jax-logs/train-<hostname>.log;
  3. collect: copy every worker'"'"'s log to LOGDIR/<node>/ here, also when training failed.
JAX finds its peers by itself (v4jax calls jax.distributed.initialize() on Cloud TPU). For a
multislice, run.sh sets MEGASCALE_COORDINATOR_ADDRESS (worker 0 of slice 0, looked up with
`gcloud compute tpus tpu-vm describe` unless --coordinator-ip is given), MEGASCALE_NUM_SLICES,
MEGASCALE_SLICE_ID and MEGASCALE_PORT on every worker. Running the same command again resumes
from the newest checkpoint in --workdir, which every worker must share: use gs://BUCKET/PATH.'
V4_EPILOG='examples:
  launch/tpu/run.sh --name v4-run --zone us-east5-a --project my-proj \
      --config configs/v4_scale.py --workdir gs://my-bucket/runs/a --config.train.steps=2000
  launch/tpu/run.sh ... --skip-setup          # resume after a crash, code already there
  launch/tpu/run.sh ... --collect-only        # fetch the logs of a run still going'
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
V4_OVERRIDES_OK=1

v4_tpu_flags
v4_slices_flag
v4_flag --config CONFIG req PATH '' 'config file, relative to the repo root, e.g. configs/v4_scale.py'
v4_flag --workdir WORKDIR req DIR '' 'run directory all workers share (checkpoints, events), e.g. gs://BUCKET/runs/a'
v4_flag --source SOURCE opt copy/git copy 'how the code gets to the workers: copy this checkout, or git clone'
v4_flag --git-url GIT_URL opt URL '' 'repository to clone with --source git'
v4_flag --git-ref GIT_REF opt REF main 'branch or tag to clone with --source git'
v4_flag --python PYTHON opt EXE python3 'Python (>= 3.11) on the workers that makes the venv'
v4_flag --env ENVS list KEY=VALUE '' 'environment variable for training on every worker, e.g. LIBTPU_INIT_ARGS=...'
v4_flag --coordinator-ip COORD_IP opt IP '' 'multislice: internal IP of worker 0 of slice 0 (default: looked up; --dry-run shows @COORD_IP@)'
v4_flag --megascale-port MS_PORT opt PORT 8080 'multislice: port of the DCN transport'
v4_flag --logdir LOGDIR opt DIR '' 'where the workers'"'"' logs are collected (default: logs/NAME)'
v4_flag --skip-setup SKIP_SETUP bool - '' 'skip step 1 (code and venv already on the workers)'
v4_flag --collect-only COLLECT_ONLY bool - '' 'only step 3: fetch the logs'
v4_parse "$@"

v4_tpu_nodes
v4_choice --source "$SOURCE" copy git
[[ $SOURCE == git && -z $GIT_URL ]] && v4_die '--git-url is required with --source git'
[[ $SOURCE == copy && -n $GIT_URL ]] && v4_die '--git-url needs --source git'
[[ -f $V4_REPO/$CONFIG ]] || v4_warn "$CONFIG is not a file in $V4_REPO; the workers must have it"
[[ $WORKDIR == gs://* ]] || v4_warn "--workdir $WORKDIR is not gs://: multi-host slices need one directory all workers share"
v4_int --megascale-port "$MS_PORT"
for kv in "${ENVS[@]}"; do v4_env_pair "$kv"; done
LOGDIR=${LOGDIR:-logs/$NAME}
TARBALL=${TMPDIR:-/tmp}/v4jax-src-$NAME.tgz

# Step 1: code and venv on every worker.
setup() {
  local node fetch
  if [[ $SOURCE == copy ]]; then
    v4_run tar -czf "$TARBALL" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache --exclude=./.whl --exclude=./runs --exclude=./logs --exclude=./.venv \
      --exclude=./venv -C "$V4_REPO" .
    fetch="mkdir -p ~/v4jax && tar -xzf ~/v4jax-src.tgz -C ~/v4jax"
  else
    fetch="git clone --quiet --depth=1 --branch=$(v4_quote "$GIT_REF") $(v4_quote "$GIT_URL") ~/v4jax"
  fi
  local remote="set -euo pipefail; rm -rf ~/v4jax; $fetch; cd ~/v4jax"
  remote+="; $(v4_quote "$PYTHON") -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
  remote+=" || { echo 'v4jax needs Python >= 3.11 on the workers: pass --python' >&2; exit 1; }"
  remote+="; [ -x ~/v4jax-venv/bin/python ] || $(v4_quote "$PYTHON") -m venv ~/v4jax-venv"
  remote+="; ~/v4jax-venv/bin/pip install --quiet --upgrade pip"
  remote+="; ~/v4jax-venv/bin/pip install --quiet -e '.[tpu]'"
  for node in "${V4_NODES[@]}"; do
    [[ $SOURCE == copy ]] &&
      v4_run gcloud compute tpus tpu-vm scp "$TARBALL" "$node:v4jax-src.tgz" --worker=all "${V4_LOC[@]}"
    v4_run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${V4_LOC[@]}" --command="$remote"
  done
}

# The shell line each worker of slice $1 runs.
train_command() {
  local slice=$1 kv exports=()
  if ((SLICES > 1)); then
    exports+=("MEGASCALE_COORDINATOR_ADDRESS=$COORD_IP:$MS_PORT" "MEGASCALE_NUM_SLICES=$SLICES"
      "MEGASCALE_SLICE_ID=$slice" "MEGASCALE_PORT=$MS_PORT")
  fi
  exports+=(PYTHONUNBUFFERED=1 "${ENVS[@]}")
  v4_train_args "$CONFIG" "$WORKDIR"
  local line="set -o pipefail; mkdir -p ~/v4jax-logs; cd ~/v4jax"
  for kv in "${exports[@]}"; do line+="; export ${kv%%=*}=$(v4_quote "${kv#*=}")"; done
  line+="; ~/v4jax-venv/bin/python -m v4jax.train $(v4_join "${V4_TRAIN_ARGS[@]}")"
  # shellcheck disable=SC2016  # $(hostname) runs on the worker
  line+=' 2>&1 | tee -a ~/v4jax-logs/train-$(hostname).log'
  printf '%s' "$line"
}

# Step 2: all workers of all slices at once; returns the first failure's status.
train() {
  local i
  if ((SLICES > 1)) && [[ -z $COORD_IP ]]; then
    v4_capture COORD_IP gcloud compute tpus tpu-vm describe "${V4_NODES[0]}" "${V4_LOC[@]}" \
      '--format=value(networkEndpoints[0].ipAddress)'
  fi
  if ((SLICES == 1)); then
    v4_run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${V4_LOC[@]}" --command="$(train_command 0)"
    return
  fi
  for i in "${!V4_NODES[@]}"; do
    v4_run_bg gcloud compute tpus tpu-vm ssh "${V4_NODES[i]}" --worker=all "${V4_LOC[@]}" \
      --command="$(train_command "$i")"
  done
  v4_wait
}

# Step 3: every worker's log into LOGDIR/<node>/; tries every node even after a failure.
collect() {
  local node ok=0
  for node in "${V4_NODES[@]}"; do
    v4_run mkdir -p "$LOGDIR/$node" || ok=1
    v4_run gcloud compute tpus tpu-vm scp "$node:v4jax-logs/*" "$LOGDIR/$node/" --worker=all "${V4_LOC[@]}" || ok=1
  done
  return "$ok"
}

rc=0
if ((!COLLECT_ONLY)); then
  ((SKIP_SETUP)) || setup
  train || rc=$?
fi
collect || v4_warn "could not collect every log into $LOGDIR"
((rc == 0)) || v4_warn "training exited with status $rc; logs are in $LOGDIR"
exit "$rc"
