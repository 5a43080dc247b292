#!/usr/bin/env python
"""Compare one arm of a study with one arm of another (or the same) study: do they train alike?

    python scripts/compare_arms.py results/miniature:grpo results/engine_check:grpo_vllm

Made for the rollout-engine check of the long study (configs/study/engine_check.yaml): the same
arm trained with HF's ``generate`` (A) and with vLLM (B). Printed:

* each evaluation set the two share: every seed's accuracy and B - A on the common problems with a
  95% interval that resamples problems and each arm's seeds (``two_level_bootstrap_ci``, as the
  study report); "agree" when the interval contains 0;
* each training curve (over all updates and over the last ``--window``): every seed's mean, and
  whether B's seed mean lies inside the range of A's seeds, widened by half that range on each side
  ("within A's seed spread"; with 2-3 seeds per arm a rough test, said as such);
* wall seconds per update of the training stage (``train_summary.json``; runs of different sessions
  ran beside different loads, so a ratio is indicative only).

``--json PATH`` also writes the figures. Nothing is trained; only committed results are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prerl.study.results import RunResult, load_results  # noqa: E402
from prerl.study.stats import align_problems, per_problem_accuracy, two_level_bootstrap_ci  # noqa: E402

CURVES = ("train/accuracy", "train/response_len_mean", "train/truncated_frac", "train/entropy/conditional",
          "train/rollout_entropy/conditional", "train/grad_norm", "train/rollout_mismatch/mean_abs_log_ratio")
TIMES = ("train/time/rollout_s", "train/time/update_s")  # seconds per update: printed, not compared


def load_arm(spec: str) -> tuple[str, list[RunResult]]:
    """``<results_dir>:<arm>`` -> (label, its finished runs by seed)."""
    folder, sep, arm = spec.rpartition(":")
    if not sep or not folder or not arm:
        raise SystemExit(f"compare_arms: {spec!r} is not <results_dir>:<arm>")
    path = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    if not path.is_dir():
        raise SystemExit(f"compare_arms: no results folder {path}")
    runs = sorted((r for r in load_results(path).values() if r.arm == arm), key=lambda r: r.seed)
    if not runs:
        raise SystemExit(f"compare_arms: no finished run of arm {arm!r} in {path}")
    return spec, runs


def eval_rows(a: list[RunResult], b: list[RunResult], n_boot: int) -> list[dict]:
    rows = []
    for name in sorted(set(a[0].problems) & set(b[0].problems)):
        per_seed = [(r.problem_ids(name), per_problem_accuracy(r.correct_matrix(name))) for r in a + b]
        ids, matrix = align_problems(per_seed)
        diff, lo, hi = two_level_bootstrap_ci(matrix[len(a):], matrix[:len(a)], n_boot)
        rows.append({"set": name, "problems": len(ids), "a": matrix[:len(a)].mean(axis=1).tolist(),
                     "b": matrix[len(a):].mean(axis=1).tolist(), "b_minus_a": diff, "lo": lo, "hi": hi,
                     "agree": bool(lo <= 0 <= hi)})
    return rows


def _mean(run: RunResult, key: str, last: int | None) -> float | None:
    values = run.curve(key)[1]
    values = values[-last:] if last else values
    values = values[np.isfinite(values)]  # an update with nothing to measure logs NaN
    return float(values.mean()) if len(values) else None


def curve_rows(a: list[RunResult], b: list[RunResult], window: int) -> list[dict]:
    rows = []
    for key in CURVES:
        for span, last in (("all updates", None), (f"last {window}", window)):
            va = [v for v in (_mean(r, key, last) for r in a) if v is not None]
            vb = [v for v in (_mean(r, key, last) for r in b) if v is not None]
            if not va or not vb:
                continue
            spread = max(va) - min(va)
            lo, hi = min(va) - spread / 2, max(va) + spread / 2
            rows.append({"curve": key, "span": span, "a": va, "b": vb, "within": bool(lo <= np.mean(vb) <= hi)})
    return rows


def _seconds_per_update(runs: list[RunResult]) -> list[float]:
    """Training wall seconds per update of each run (its train_summary.json)."""
    return [float(r.train_summary["train_seconds"]) / max(int(r.train_summary["global_step"]), 1)
            for r in runs if r.train_summary and "train_seconds" in r.train_summary]


def _seeds(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="<results_dir>:<arm>, the reference")
    parser.add_argument("b", help="<results_dir>:<arm>, compared with it")
    parser.add_argument("--window", type=int, default=8, help="trailing updates of the second curve mean")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    (label_a, a), (label_b, b) = load_arm(args.a), load_arm(args.b)
    evals, curves = eval_rows(a, b, args.bootstrap), curve_rows(a, b, args.window)
    speed = {"a": _seconds_per_update(a), "b": _seconds_per_update(b)}
    print(f"A = {label_a} (seeds {[r.seed for r in a]}), B = {label_b} (seeds {[r.seed for r in b]})\n")
    print("| evaluation set | problems | A per seed | B per seed | B - A [95% interval] | |")
    print("|---|---|---|---|---|---|")
    for r in evals:
        print(f"| {r['set']} | {r['problems']} | {_seeds(r['a'])} | {_seeds(r['b'])} | "
              f"{r['b_minus_a']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {'agree' if r['agree'] else 'DIFFER'} |")
    print("\n| training curve | mean over | A per seed | B per seed | B within A's seed spread |")
    print("|---|---|---|---|---|")
    for r in curves:
        print(f"| {r['curve']} | {r['span']} | {_seeds(r['a'])} | {_seeds(r['b'])} | {'yes' if r['within'] else 'NO'} |")
    if speed["a"] and speed["b"]:
        ratio = np.mean(speed["a"]) / np.mean(speed["b"])
        print(f"\ntraining wall seconds per update: A {_seeds(speed['a'])}, B {_seeds(speed['b'])}; "
              f"A / B = {ratio:.2f} (runs of different sessions or loads: indicative only)")
    for key in TIMES:
        ta, tb = [_mean(r, key, None) for r in a], [_mean(r, key, None) for r in b]
        if None not in ta + tb:
            speed[key] = {"a": ta, "b": tb}
            print(f"{key} per update: A {_seeds(ta)}, B {_seeds(tb)}; A / B = {np.mean(ta) / np.mean(tb):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"a": label_a, "b": label_b, "evaluations": evals, "curves": curves,
                                         "seconds_per_update": speed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
