#!/usr/bin/env bash
# The GPU path in one go, at most 8 minutes on one GPU (issue 13). Prints what to record in
# bench/RESULTS.md ("GPU check", with the date):
#   1. the machine: nvidia-smi, torch and its CUDA;
#   2. the GPU-marked tests (tests/gpu: each loss family's step in bf16/fp16 with channels_last,
#      evaluation on the GPU, NCCL reductions, a GPU checkpoint loaded without a GPU, the embedding
#      actor's code on the GPU);
#   3. a short job through `hardbatch run`: resnet18 (CIFAR stem), bf16, train.use_gpu=true, a GPU
#      embedding actor sharing the training GPU (refresh.num_gpus=0.25), on generated 32x32 images;
#      bench/gpu_job.py prints samples/s, peak GPU memory and the graph-refresh times.
#
# Usage: bash bench/gpu_check.sh      (PYTHON=/path/to/python to choose the interpreter)
# Stage 3 needs the whole stack (ray, faiss, mlflow, pydantic: `make install`); where they are
# missing it says which and stops after stage 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'gpus', torch.cuda.device_count())" || exit 1

echo "== 2. GPU tests"
timeout 240 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -o addopts="--import-mode=importlib -ra" \
  --timeout 200 || status=1

echo "== 3. a resnet18 bf16 job on the GPU"
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('ray', 'faiss', 'mlflow', 'pydantic', 'yaml') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "not run: missing Python packages: $missing (make install, or carry their wheels)"
  exit 1
fi
timeout 300 "$PY" bench/gpu_job.py || status=1
echo "== gpu_check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
