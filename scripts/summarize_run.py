"""Print a run's per-update training curves from its TensorBoard events.

    python scripts/summarize_run.py logs/dsrl_smollm2_cpu/runs/<run> [--keys train/accuracy,train/phase]
    python scripts/summarize_run.py logs/dsrl_smollm2_cpu          # a task folder (or its runs/): its newest run
"""

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DEFAULT_KEYS = "train/phase,train/accuracy,train/kept_frac,train/response_len_mean,train/truncated_frac,train/grad_norm"


def run_folder(path: Path) -> Path:
    """A run folder as given, or the newest run (by modification time) with events of a task folder
    (logs/<task>) or of its runs/ folder."""
    if (path / "tensorboard").is_dir():
        return path
    runs = path / "runs" if (path / "runs").is_dir() else path
    found = [run for run in runs.iterdir() if (run / "tensorboard").is_dir()] if runs.is_dir() else []
    if not found:
        sys.exit(f"{path}: neither a run folder (with tensorboard/) nor a task folder with runs that have one")
    newest = max(found, key=lambda run: run.stat().st_mtime)
    print(f"{newest}", file=sys.stderr)
    return newest


def curves(run_dir: Path, keys: list[str]) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    missing = [k for k in keys if k not in available]
    if missing:
        sys.exit(f"not logged in {run_dir}: {missing}; available: {sorted(available)}")
    return {k: {e.step: e.value for e in events.Scalars(k)} for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--keys", default=DEFAULT_KEYS)
    args = parser.parse_args()
    keys = args.keys.split(",")
    data = curves(run_folder(args.run_dir), keys)
    steps = sorted(set().union(*(d.keys() for d in data.values())))
    print("step " + " ".join(f"{k.split('/', 1)[-1]:>16}" for k in keys))
    for step in steps:
        print(f"{step:4d} " + " ".join(f"{data[k].get(step, float('nan')):16.4f}" for k in keys))


if __name__ == "__main__":
    main()
