"""Train a policy with PreRL / NSR-PreRL / DSRL or a post-train baseline.

    python src/train.py                                   # the embedded CPU main job (DSRL)
    python src/train.py objective=grpo trainer=gpu model=qwen3_4b data=math
    python src/train.py experiment=dsrl_qwen3_4b          # the authors' hyper-parameters
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
from prerl.preemption import spawned_by_lightning  # noqa: E402
from prerl.train import EXIT_CODES, train  # noqa: E402

EXIT_CODE = 0


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="train")
def main(cfg: DictConfig) -> None:
    # 0 completed, 143 pre-empted (SIGTERM; checkpoint saved: requeue), 130 interrupted (Ctrl-C), 1 failed;
    # summary.json in the run folder says which. The exit happens after Hydra's run has ended (its
    # callbacks release the run folder's lock).
    global EXIT_CODE
    try:
        EXIT_CODE = EXIT_CODES[train(cfg)["status"]]
    except Exception as err:
        if full_errors():
            raise
        EXIT_CODE = report_error(err)  # one line, last; the traceback is in the run's log file
    if EXIT_CODE in (130, 143) and spawned_by_lightning():
        EXIT_CODE = 0  # the launcher reports the stop; a non-zero rank would make it kill every rank


if __name__ == "__main__":
    main()
    sys.exit(EXIT_CODE)
