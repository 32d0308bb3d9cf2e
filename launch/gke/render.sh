#!/usr/bin/env bash
# Fills in a JobSet template for TPU slices or GPU nodes and applies it with kubectl.
set -euo pipefail

V4_PROG=launch/gke/render.sh
# shellcheck disable=SC2016  # backquotes in the help text are literal
V4_SUMMARY='Renders launch/gke/jobset.<kind>.yaml.tmpl into a JobSet manifest (written to --out,
also under --dry-run) and applies it with `kubectl apply -f`. The cluster needs the JobSet
controller and a node pool of the TPU slice shape or GPU type; the image needs this repo at
--repo-dir with v4jax installed (launch/gke/Dockerfile builds one).
  tpu: one Pod per TPU VM host, one child Job per slice; JAX finds its peers from the TPU
       environment GKE sets; more than one slice also gets the MEGASCALE_* variables.
  gpu: one Pod per node holding all its GPUs (one JAX process per node); Pod 0 is the
       coordinator and every Pod passes --coordinator_address/--num_processes/--process_id.
Running the same render again after a failure resumes from the newest checkpoint in --workdir;
the JobSet itself also restarts up to --max-restarts times.'
V4_EPILOG='examples:
  launch/gke/render.sh --kind tpu --name v4-a --image IMAGE --config configs/v4_scale.py \
      --workdir gs://my-bucket/runs/a --tpu-type tpu-v5p-slice --topology 4x4x4 --num-slices 2
  launch/gke/render.sh --kind gpu --name v4-g --image IMAGE --config configs/v4_scale.py \
      --workdir gs://my-bucket/runs/g --nodes 4 --gpu-type nvidia-h200-141gb
tear down: kubectl delete jobset NAME -n NAMESPACE'
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
V4_OVERRIDES_OK=1

v4_flag --kind TARGET req tpu/gpu '' 'which template: TPU slices or GPU nodes'
v4_flag --name NAME req NAME '' 'JobSet name: lowercase letters, digits and -, at most 40 characters'
v4_flag --image IMAGE req IMAGE '' 'container image with the repo and v4jax installed'
v4_flag --config CONFIG req PATH '' 'config file inside the image, relative to --repo-dir'
v4_flag --workdir WORKDIR req DIR '' 'run directory all Pods share, e.g. gs://BUCKET/runs/a'
v4_flag --namespace NAMESPACE opt NS default 'Kubernetes namespace'
v4_flag --service-account SERVICE_ACCOUNT opt KSA default 'Kubernetes service account (Workload Identity access to the bucket)'
v4_flag --repo-dir REPO_DIR opt DIR /app 'where the image holds the repo (the working directory)'
v4_flag --max-restarts MAX_RESTARTS opt N 3 'JobSet restarts after a failure before it gives up'
v4_flag --env ENVS list KEY=VALUE '' 'environment variable for every training process'
v4_flag --out OUT opt FILE '' 'where the manifest is written (default: v4jax-jobset-NAME.yaml in TMPDIR or /tmp)'
v4_flag --tpu-type TPU_TYPE opt LABEL '' 'tpu: node label cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5p-slice, tpu-v6e-slice'
v4_flag --topology TOPOLOGY opt AxBxC '' 'tpu: slice topology (node label cloud.google.com/gke-tpu-topology), e.g. 4x4x4'
v4_flag --num-slices NUM_SLICES opt N 1 'tpu: number of slices (more than 1: multislice over DCN)'
v4_flag --chips-per-worker CHIPS_PER_WORKER opt N 4 'tpu: TPU chips per host (4 for v4/v5p; 4 or 8 for v5e/v6e)'
v4_flag --megascale-port MS_PORT opt PORT 8080 'tpu multislice: port of the DCN transport'
v4_flag --nodes NODES opt N '' 'gpu: number of nodes (Pods)'
v4_flag --gpus-per-node GPUS_PER_NODE opt N 8 'gpu: GPUs per node'
v4_flag --gpu-type GPU_TYPE opt LABEL nvidia-h200-141gb 'gpu: node label cloud.google.com/gke-accelerator'
v4_flag --coordinator-port COORDINATOR_PORT opt PORT 1234 'gpu: port of the jax.distributed coordinator on Pod 0'
v4_parse "$@"

v4_choice --kind "$TARGET" tpu gpu
[[ $NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
  v4_die "--name must be lowercase letters, digits and -, start with a letter, at most 40 characters; got '$NAME'"
[[ $IMAGE =~ ^[^[:space:]\"\']+$ ]] || v4_die "--image has spaces or quotes: '$IMAGE'"
[[ $NAMESPACE =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || v4_die "--namespace is not a Kubernetes name: '$NAMESPACE'"
[[ $SERVICE_ACCOUNT =~ ^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$ ]] || v4_die "--service-account is not a Kubernetes name: '$SERVICE_ACCOUNT'"
[[ $REPO_DIR == /* ]] || v4_die "--repo-dir must be an absolute path, got '$REPO_DIR'"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || v4_die "--max-restarts must be a non-negative integer, got '$MAX_RESTARTS'"
[[ $WORKDIR == gs://* || $WORKDIR == /* ]] ||
  v4_warn "--workdir $WORKDIR is relative: it lands inside each container and is lost on restart"
OUT=${OUT:-${TMPDIR:-/tmp}/v4jax-jobset-$NAME.yaml}

yaml_env() {  # NAME VALUE -> an env list entry
  printf -- '- name: %s\n  value: %s\n' "$1" "$(v4_json_str "$2")"
}

EXTRA_ENV=''
for kv in "${ENVS[@]}"; do
  v4_env_pair "$kv"
  EXTRA_ENV+=$(yaml_env "${kv%%=*}" "${kv#*=}")$'\n'
done
v4_train_args "$CONFIG" "$WORKDIR"
train=(python -m v4jax.train "${V4_TRAIN_ARGS[@]}")

if [[ $TARGET == tpu ]]; then
  v4_need --tpu-type "$TPU_TYPE" 'with --kind tpu (e.g. tpu-v5p-slice)'
  v4_need --topology "$TOPOLOGY" 'with --kind tpu (e.g. 4x4x4)'
  [[ $TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || v4_die "--topology must look like 2x4 or 4x4x4, got '$TOPOLOGY'"
  v4_int --num-slices "$NUM_SLICES"
  v4_int --chips-per-worker "$CHIPS_PER_WORKER"
  v4_int --megascale-port "$MS_PORT"
  chips=$((${TOPOLOGY//x/*}))
  ((chips % CHIPS_PER_WORKER == 0)) ||
    v4_die "--topology $TOPOLOGY has $chips chips, not a multiple of --chips-per-worker $CHIPS_PER_WORKER"
  # shellcheck disable=SC2034  # this and the other template values are read by v4_render
  WORKERS_PER_SLICE=$((chips / CHIPS_PER_WORKER))
  MEGASCALE_ENV=''
  if ((NUM_SLICES > 1)); then
    MEGASCALE_ENV=$(yaml_env MEGASCALE_COORDINATOR_ADDRESS "$NAME-slice-0-0.$NAME")$'\n'
    MEGASCALE_ENV+=$(yaml_env MEGASCALE_NUM_SLICES "$NUM_SLICES")$'\n'
    MEGASCALE_ENV+=$(yaml_env MEGASCALE_PORT "$MS_PORT")$'\n'
    MEGASCALE_ENV+="- name: MEGASCALE_SLICE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.annotations['jobset.sigs.k8s.io/job-index']"
  fi
  TRAIN_COMMAND=$(v4_json_list "${train[@]}")
  vars=(TPU_TYPE TOPOLOGY NUM_SLICES WORKERS_PER_SLICE CHIPS_PER_WORKER MEGASCALE_ENV)
else
  v4_need --nodes "$NODES" 'with --kind gpu'
  v4_int --nodes "$NODES"
  v4_int --gpus-per-node "$GPUS_PER_NODE"
  v4_int --coordinator-port "$COORDINATOR_PORT"
  [[ $GPU_TYPE =~ ^[-a-z0-9]+$ ]] || v4_die "--gpu-type is not a node label value: '$GPU_TYPE'"
  train+=(--coordinator_address "$NAME-workers-0-0.$NAME:$COORDINATOR_PORT"
    --num_processes "$NODES" --process_id "\$(PROCESS_ID)")
  # shellcheck disable=SC2034  # read by v4_render
  TRAIN_COMMAND=$(v4_json_list "${train[@]}")
  vars=(NODES GPUS_PER_NODE GPU_TYPE COORDINATOR_PORT)
fi

v4_render "$V4_LAUNCH_DIR/gke/jobset.$TARGET.yaml.tmpl" "$OUT" NAME NAMESPACE SERVICE_ACCOUNT IMAGE \
  REPO_DIR MAX_RESTARTS TRAIN_COMMAND EXTRA_ENV "${vars[@]}"
echo "wrote $OUT" >&2
v4_run kubectl apply -f "$OUT"
((V4_DRY_RUN)) || echo "follow it: kubectl get jobset $NAME -n $NAMESPACE; kubectl logs -f -n $NAMESPACE -l jobset.sigs.k8s.io/jobset-name=$NAME --max-log-requests=64 --prefix" >&2
