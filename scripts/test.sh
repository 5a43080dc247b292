#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU with one torch thread.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The benchmark-only extra (TRL, for tests/test_benchmarks.py): pinned like the rest.
python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -e ".[test,bench]"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -m pytest -q "$@"
