#!/usr/bin/env bash
# Training on a Slurm cluster: one torchrun per node, which starts one process per GPU
# (PyTorch DDP over NCCL; fenop picks the backend itself).
#
#   sbatch examples/slurm.sh CONFIG.toml [--resume]
#
# What to change for your cluster: the #SBATCH lines (nodes, GPUs per node, CPUs, time,
# and the partition/account lines your site requires), the environment activation
# below, and PORT if 29500 is taken on the first node. `batch_size` in CONFIG is the
# global batch, split over nodes x GPUs processes; the weights do not depend on that
# number, so a run checkpointed here resumes on another allocation.
#
# Outside Slurm (no SLURM_JOB_ID) the same script runs torchrun on this machine, with
# GPUS_PER_NODE processes (default: the GPUs here, else 1): how it is tested.
#
#SBATCH --job-name=fenop-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-project
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch examples/slurm.sh CONFIG.toml [fenop train options]" >&2
    exit 2
fi
# source ~/venvs/fenop/bin/activate    # the environment fenop is installed in

if [ -n "${SLURM_JOB_ID:-}" ]; then
    nodes=$SLURM_NNODES
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
else
    nodes=1
    head=localhost
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    per_node=${GPUS_PER_NODE:-$((gpus > 0 ? gpus : 1))}
    cpus=$(nproc)
fi
# Each process's share of the node's cores for PyTorch's threads (torchrun sets 1).
export OMP_NUM_THREADS=$((cpus / per_node > 0 ? cpus / per_node : 1))

launch=(
    python -m torch.distributed.run
    --nnodes="$nodes"
    --nproc_per_node="$per_node"
    --rdzv_backend=c10d
    --rdzv_endpoint="$head:${PORT:-29500}"
    --rdzv_id="${SLURM_JOB_ID:-local}"
    -m fenop train "$@"
)
if [ -n "${SLURM_JOB_ID:-}" ]; then
    srun --kill-on-bad-exit=1 "${launch[@]}"   # one launcher per node
else
    "${launch[@]}"
fi
