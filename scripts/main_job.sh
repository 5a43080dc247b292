#!/usr/bin/env bash
# Set up (if needed) and run the embedded main job: DSRL on SmolLM2-135M-Instruct on the CPU.
# Extra arguments are Hydra overrides, e.g. `bash scripts/main_job.sh trainer.max_steps=10`.
# PRERL_ENGINE=vllm also builds vLLM's own environment (scripts/setup_vllm.sh, VLLM_VENV) and runs
# the job there with module.rollout.engine=vllm (2.0x faster sampling here, but a longer set-up:
# docs/engines.md, "Speed on this CPU").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m prerl.models.smollm2 --out data/models/smollm2-135m-instruct
case "${PRERL_ENGINE:-hf}" in
  hf) python src/train.py "$@" ;;   # experiment=dsrl_smollm2_cpu, train.yaml's default
  vllm)
    bash scripts/setup_vllm.sh
    "${VLLM_VENV:-.venv-vllm}/bin/python" src/train.py module.rollout.engine=vllm "$@" ;;
  *) echo "PRERL_ENGINE must be hf or vllm, got '${PRERL_ENGINE}'" >&2; exit 2 ;;
esac
