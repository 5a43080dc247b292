#!/usr/bin/env bash
# Set up (if needed) and run the embedded main job: DSRL on SmolLM2-135M-Instruct on the CPU.
# Extra arguments are Hydra overrides, e.g. `bash scripts/main_job.sh trainer.max_steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m prerl.models.smollm2 --out data/models/smollm2-135m-instruct
python src/train.py "$@"   # experiment=dsrl_smollm2_cpu, train.yaml's default
