"""Evaluate a policy: avg@k and unbiased pass@k on one or several eval sets (docs/evaluation.md).

    python src/eval.py                                  # the base model on data's validation split
    python src/eval.py ckpt_path=logs/dsrl_smollm2_cpu/runs/<run>      # a checkpoint (file, run folder, last)
    python src/eval.py eval_sets=[svamp,gym_arithmetic] limit=20 samples=4
    python src/eval.py eval_file=/abs/path/problems.jsonl 'question_template="{Body} {Question}"'
    python src/eval.py model=qwen3_4b trainer=gpu eval_sets=[math500,aime] samples=32 max_new_tokens=8192
    python src/eval.py <same overrides> resume_from=logs/eval/runs/<run>  # continue an interrupted evaluation

Exit codes: 0 completed, 130 interrupted (Ctrl-C; resumable), 1 failed.
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

from prerl.console import full_errors, report_error  # noqa: E402
from prerl.evaluate import evaluate  # noqa: E402  (also registers the resolver of hydra.run.dir)
from prerl.evaluation.runner import EvaluationPreempted  # noqa: E402

EXIT_CODE = 0


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="eval")
def main(cfg: DictConfig) -> None:
    # The exit happens after Hydra's run has ended (its callbacks release the run folder's lock).
    global EXIT_CODE
    try:
        evaluate(cfg)
    except KeyboardInterrupt:
        EXIT_CODE = 130  # summary.json (status interrupted) and the resume command are already written
    except EvaluationPreempted:
        EXIT_CODE = 143  # SIGTERM: as train.py, a distinct code so a scheduler requeues; summary.json says preempted
    except Exception as err:
        if full_errors():
            raise
        EXIT_CODE = report_error(err)  # one line, last; the traceback is in the run's log file


if __name__ == "__main__":
    main()
    sys.exit(EXIT_CODE)
