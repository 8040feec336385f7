#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests, then the GPU benchmarks.
# Each step's log goes to LOG_FOLDER; a failing step does not stop the later ones,
# and the exit status says whether all passed.
#
#   benchmarks/cuda.sh [LOG_FOLDER]
#
# Environment (all optional):
#   STEPS          steps to run, of: gpu tests fem_overhead sparse_product femultigrid_step
#                  inference darcy
#                  (default: all, in that order)
#   DARCY_MINUTES  training budget per Darcy model (default 1)
#   DARCY_MODELS   comma-separated models for benchmarks/darcy.py (default: all five)
#   DARCY_DATA     folder of the generated Darcy store (default /tmp/darcybench): a
#                  second call on the same machine reuses it instead of generating
#   DARCY_ARGS     further arguments for benchmarks/darcy.py (e.g. "--coarsest 22")
#
#   STEPS=darcy DARCY_MODELS=fenop-femultigrid DARCY_MINUTES=8 benchmarks/cuda.sh logs
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-cuda-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
steps=" ${STEPS:-gpu tests fem_overhead sparse_product femultigrid_step inference darcy} "
status=0
step() {  # step NAME COMMAND...: run if selected, log to $logs/NAME.txt, remember a failure
    local name=$1
    shift
    [[ $steps == *" $name "* ]] || return 0
    echo "== $name: $*"
    "$@" 2>&1 | tee "$logs/$name.txt" || status=1
}
step gpu python -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 30, 'GiB')"
step tests python -m pytest -q -rs -k cuda
step fem_overhead python benchmarks/fem_overhead.py --device cuda
step sparse_product python benchmarks/sparse_product.py --device cuda
# FEMultigrid at 85 x 85 with three levels and with benchmarks/darcy.py's four
step femultigrid_step bash -c "python benchmarks/femultigrid_step.py --device cuda \
    --resolution 85 --coarsest 22 && python benchmarks/femultigrid_step.py --device cuda \
    --resolution 85"
step inference python benchmarks/inference.py --device cuda
step darcy python benchmarks/darcy.py --device cuda --resolution 85 \
    --minutes "${DARCY_MINUTES:-1}" --workers "$(nproc)" --data "${DARCY_DATA:-/tmp/darcybench}" \
    --models "${DARCY_MODELS:-neuralop-fno,fenop-fno,fenop-mgno,fenop-lsm,fenop-femultigrid}" \
    ${DARCY_ARGS:-}
exit $status
