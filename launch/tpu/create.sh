#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (or several, for a multislice) through a queued resource.
set -euo pipefail

V4_PROG=launch/tpu/create.sh
# shellcheck disable=SC2016  # backquotes in the help text are literal
V4_SUMMARY='Requests a Cloud TPU VM slice through a queued resource (on-demand by default, or
--spot / --reserved). With --num-slices N > 1 it requests N identical slices named NAME-0 ..
NAME-<N-1> that train together as a multislice. The request waits in a queue until capacity is
free; watch it with `gcloud compute tpus queued-resources describe NAME`.'
V4_EPILOG='example:
  launch/tpu/create.sh --name v4-run --zone us-east5-a --project my-proj --accelerator v5p-64 --spot'
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

v4_tpu_flags
v4_slices_flag
v4_flag --accelerator ACCEL req TYPE '' 'TPU type and size of each slice, e.g. v5p-64, v6e-256, v5litepod-16'
v4_flag --runtime-version RUNTIME opt VERSION '' 'TPU VM software version; by default the one for the TPU generation (v4: tpu-ubuntu2204-base, v5p: v2-alpha-tpuv5, v5litepod: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)'
v4_flag --spot SPOT bool - '' 'spot capacity: cheaper, can be preempted at any time'
v4_flag --reserved RESERVED bool - '' 'use the project'"'"'s reservation (committed-use capacity)'
v4_flag --network NETWORK opt NETWORK '' 'VPC network (gcloud default: default)'
v4_flag --subnetwork SUBNET opt SUBNET '' 'VPC subnetwork'
v4_flag --service-account SA opt EMAIL '' 'service account of the TPU VMs (needs access to the gs:// workdir)'
v4_flag --valid-until-duration QUEUE_TTL opt DURATION '' 'give up if not granted within this long, e.g. 6h'
v4_parse "$@"

v4_tpu_nodes
((SPOT && RESERVED)) && v4_die '--spot and --reserved exclude each other (default is on-demand)'
if [[ -z $RUNTIME ]]; then
  case $ACCEL in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) v4_die "--runtime-version is required for accelerator '$ACCEL' (no default known)" ;;
  esac
fi

cmd=(gcloud compute tpus queued-resources create "$NAME" "${V4_LOC[@]}"
  --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
if ((SLICES == 1)); then
  cmd+=(--node-id="$NAME")
else
  cmd+=(--node-count="$SLICES" --node-prefix="$NAME")
fi
((SPOT)) && cmd+=(--spot)
((RESERVED)) && cmd+=(--reserved)
[[ -n $NETWORK ]] && cmd+=(--network="$NETWORK")
[[ -n $SUBNET ]] && cmd+=(--subnetwork="$SUBNET")
[[ -n $SA ]] && cmd+=(--service-account="$SA")
[[ -n $QUEUE_TTL ]] && cmd+=(--valid-until-duration="$QUEUE_TTL")

v4_run "${cmd[@]}"
((V4_DRY_RUN)) || echo "queued; watch it with: $(v4_join gcloud compute tpus queued-resources describe "$NAME" "${V4_LOC[@]}") (state ACTIVE = ready)" >&2
