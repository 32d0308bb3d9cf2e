#!/usr/bin/env bash
# Submits launch/slurm/train.sbatch with the node and GPU counts on the command line.
set -euo pipefail

V4_PROG=launch/slurm/submit.sh
V4_SUMMARY='Submits launch/slurm/train.sbatch: NODES nodes, one training process per GPU. The job
output goes to logs/slurm/<job-name>-<job-id>.out in the repo. --repeat N submits N jobs of the
same name with --dependency=singleton: each starts when the one before ends (time limit,
failure or success) and resumes from the newest checkpoint in --workdir, so a run longer than
the time limit continues by itself. The repo and --workdir must be on a shared file system.'
V4_EPILOG='example:
  launch/slurm/submit.sh --nodes 2 --partition gpu --config configs/v4_scale.py \
      --workdir /shared/runs/a --python /shared/venv/bin/python --config.train.steps=20000
tear down: scancel --name=v4jax (all jobs of that name) or scancel JOBID'
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
V4_OVERRIDES_OK=1

v4_flag --nodes NODES req N '' 'number of nodes'
v4_flag --gpus-per-node GPUS opt N 8 'GPUs per node (= processes per node)'
v4_flag --config CONFIG req PATH '' 'config file, relative to the repo root'
v4_flag --workdir WORKDIR req DIR '' 'run directory on the shared file system'
v4_flag --python PYTHON opt EXE python3 'Python with v4jax installed, as the compute nodes see it'
v4_flag --job-name JOB_NAME opt NAME v4jax 'SLURM job name'
v4_flag --partition PARTITION opt NAME '' 'SLURM partition'
v4_flag --account ACCOUNT opt NAME '' 'SLURM account to charge'
v4_flag --qos QOS opt NAME '' 'SLURM quality of service'
v4_flag --time TIME opt HH:MM:SS 24:00:00 'time limit of each job'
v4_flag --repeat REPEAT opt N 1 'jobs to chain one after another (each resumes the run)'
v4_flag --env ENVS list KEY=VALUE '' 'environment variable for every process'
v4_flag --nccl-ifname NCCL_IFNAME opt IFACE '' 'NCCL_SOCKET_IFNAME for the job, e.g. eth0'
v4_flag --nccl-ib-hca NCCL_HCA opt HCA '' 'NCCL_IB_HCA for the job, e.g. mlx5'
v4_parse "$@"

v4_int --nodes "$NODES"
v4_int --gpus-per-node "$GPUS"
v4_int --repeat "$REPEAT"
for kv in "${ENVS[@]}"; do v4_env_pair "$kv"; done
[[ -f $V4_REPO/$CONFIG ]] || v4_warn "$CONFIG is not a file in $V4_REPO"

# shellcheck disable=SC2054  # --export takes a comma-separated list
sbatch_args=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$GPUS" --gpus-per-node="$GPUS"
  --time="$TIME" --output="$V4_REPO/logs/slurm/%x-%j.out" --chdir="$V4_REPO"
  --export=ALL,V4JAX_REPO="$V4_REPO")
[[ -n $PARTITION ]] && sbatch_args+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && sbatch_args+=(--account="$ACCOUNT")
[[ -n $QOS ]] && sbatch_args+=(--qos="$QOS")
((REPEAT > 1)) && sbatch_args+=(--dependency=singleton)

job_args=(--config "$CONFIG" --workdir "$WORKDIR" --gpus-per-node "$GPUS" --python "$PYTHON")
for kv in "${ENVS[@]}"; do job_args+=(--env "$kv"); done
[[ -n $NCCL_IFNAME ]] && job_args+=(--nccl-ifname "$NCCL_IFNAME")
[[ -n $NCCL_HCA ]] && job_args+=(--nccl-ib-hca "$NCCL_HCA")
((${#V4_TRAIN_EXTRA[@]})) && job_args+=(-- "${V4_TRAIN_EXTRA[@]}")

v4_run mkdir -p "$V4_REPO/logs/slurm"
for ((i = 0; i < REPEAT; i++)); do
  v4_run sbatch "${sbatch_args[@]}" "$V4_REPO/launch/slurm/train.sbatch" "${job_args[@]}"
done
((V4_DRY_RUN)) || echo "follow it: squeue --name=$JOB_NAME; tail -f $V4_REPO/logs/slurm/$JOB_NAME-<jobid>.out" >&2
