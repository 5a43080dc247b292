"""Evaluate a policy's avg@k / pass@k on the held-out split.

    python src/eval.py                                  # the base model
    python src/eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python src/eval.py model=qwen3_4b data=aime trainer=gpu module.validation.samples_per_problem=32
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without `pip install -e .`
sys.path.insert(0, os.getcwd())  # user plug-ins (rewards, data sources) in the working directory

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from prerl.evaluate import evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
