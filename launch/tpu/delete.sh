#!/usr/bin/env bash
# Deletes a queued resource and every TPU VM in it.
set -euo pipefail

V4_PROG=launch/tpu/delete.sh
# shellcheck disable=SC2016  # backquotes in the help text are literal
V4_SUMMARY='Deletes the queued resource NAME together with its TPU VMs (all slices). Checkpoints in
a gs:// workdir are kept; anything only on the VMs (their ~/v4jax-logs) is lost, so run
launch/tpu/run.sh --collect-only first if you want the logs.'
V4_EPILOG='example:
  launch/tpu/delete.sh --name v4-run --zone us-east5-a --project my-proj'
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

v4_tpu_flags
v4_flag --async ASYNC bool - '' 'return at once instead of waiting until the deletion finished'
v4_parse "$@"
v4_tpu_nodes

cmd=(gcloud compute tpus queued-resources delete "$NAME" "${V4_LOC[@]}" --force --quiet)
((ASYNC)) && cmd+=(--async)
v4_run "${cmd[@]}"
