#!/usr/bin/env python
"""Run a reproduction study and write its report (docs/reproduction.md for the miniature one,
docs/reproduction_long.md for the 150-update one, configs/study/long.yaml).

    python scripts/study.py run configs/study/miniature.yaml --jobs 2 --commit   # resumable
    python scripts/study.py status configs/study/miniature.yaml                  # what is done / pending
    python scripts/study.py report configs/study/miniature.yaml                  # tables, verdicts, plots

``run`` skips every run whose results exist and continues cut-off ones (a training run from its
newest checkpoint, an evaluation from its finished chunks), so it can be stopped (Ctrl-C, a
reboot) and started again; ``--commit`` commits each run's results as it finishes. ``--only
grpo,dsrl_s4`` restricts it to some arms. ``touch <work_dir>/STOP`` (logs/study/<name>/STOP)
finishes the runs under way and starts no new one; ``--stop-by 12:55`` starts only runs expected
(from the study's finished runs) to end by then, e.g. before a work session ends. ``report`` needs no model: it reads the results
only (and writes nothing while no run has finished).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from prerl.study.report import load_alignment, write_report  # noqa: E402
from prerl.study.results import load_results  # noqa: E402
from prerl.study.runner import planned_runs, replicate_runs, run_study  # noqa: E402
from prerl.study.spec import load_study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "status", "report"])
    parser.add_argument("study", type=Path, help="a study file, e.g. configs/study/miniature.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with the study's thread count)")
    parser.add_argument("--commit", action="store_true", help="git-commit each run's results when it finishes")
    parser.add_argument("--only", default=None, help="comma-separated arm names (the base evaluation always runs)")
    parser.add_argument("--stop-by", default=None, metavar="HH:MM",
                        help="start only runs expected (from this study's finished runs) to end by then, local "
                             "time (a time already past today means tomorrow): e.g. the end of a work session")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)  # tests: a copy of the project
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    study = load_study(args.study, args.root)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.command == "run":
        only = set(args.only.split(",")) if args.only else None
        unknown = (only or set()) - set(study.arms)
        if unknown:
            parser.error(f"--only names unknown arms {sorted(unknown)}; arms: {sorted(study.arms)}")
        if "module.rollout.engine=vllm" in study.train_overrides and importlib.util.find_spec("vllm") is None:
            parser.error(f"{args.study} samples with vLLM, which this Python ({sys.executable}) lacks: "
                         "bash scripts/setup_vllm.sh, then run it with .venv-vllm/bin/python")
        stop_by = None
        if args.stop_by is not None:
            try:
                clock = datetime.strptime(args.stop_by, "%H:%M").time()
            except ValueError:
                parser.error(f"--stop-by takes a local time HH:MM, got {args.stop_by!r}")
            now = datetime.now()
            when = datetime.combine(now.date(), clock)
            stop_by = (when if when > now else when + timedelta(days=1)).timestamp()
        outcomes = run_study(study, args.jobs, args.commit, only, args.keep_checkpoints, stop_by)
        for run_id, outcome in outcomes.items():
            print(f"{run_id}: {outcome}")
        return 1 if any(o.startswith("failed") for o in outcomes.values()) else 0
    results = load_results(study.results_dir)
    planned = planned_runs(study)
    if args.command == "status":
        for run in planned:
            print(f"{run.id:<28}{'done' if run.id in results else 'pending'}")
        for entry in replicate_runs(study)[1]:
            print(f"{entry:<28}waiting for the first seed of its arms")
        return 0
    if not results:  # no report of nothing (a study's document appears with its first finished run)
        print(f"nothing has run yet: no finished run in {study.results_dir}; no report written. Start the study "
              f"with: python scripts/study.py run {args.study} --jobs 2 --commit")
        return 0
    command = f"python scripts/study.py report {args.study}"
    print(f"wrote {write_report(study, results, planned, load_alignment(study), command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
