"""What a study's runs left in ``<results_dir>``, loaded for the report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


# Training metrics renamed since results were first committed: {old: new}, and old tag prefixes.
# Curves are read under the new names, whichever a run logged (results/miniature has the old ones).
RENAMED = {"train/entropy_conditional": "train/rollout_entropy/conditional",
           "train/entropy_marginal": "train/rollout_entropy/marginal"}
RENAMED_PREFIXES = {"behaviour/": "z_behaviour/"}


def current_name(tag: str) -> str:
    """A curve's tag under the current metric names."""
    for old, new in RENAMED_PREFIXES.items():
        if tag.startswith(old):
            return new + tag[len(old):]
    return RENAMED.get(tag, tag)


def load_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar a training run logged to TensorBoard: {tag: {step: value}} ({} if none),
    under the current metric names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_dir = Path(run_dir) / "tensorboard"
    if not events_dir.is_dir():
        return {}
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its reader logs "No path found after" per file
    events.Reload()
    return {current_name(tag): {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def eval_metric(summary: dict, key: str) -> float:
    """``<set>/<metric>`` of an evaluation summary, e.g. ``heldout/avg@8``."""
    name, _, metric = key.partition("/")
    try:
        value = summary["datasets"][name]["metrics"][metric]
    except KeyError as err:
        raise KeyError(f"{key!r} is not in the evaluation summary (sets: {sorted(summary.get('datasets', {}))})") from err
    return float(value)


@dataclass
class RunResult:
    """One finished run: its evaluation per set, (trained runs) its training curves, and (studies
    with periodic evaluation) its evaluations after fewer updates, each a RunResult without curves."""

    run_id: str
    arm: str
    seed: int
    eval_summary: dict
    problems: dict[str, list[dict]]                      # set -> per-problem records, in index order
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    train_summary: dict | None = None
    periodic: dict[int, RunResult] = field(default_factory=dict)  # updates -> evaluation then

    def correct_matrix(self, eval_set: str) -> np.ndarray:
        """(problems, samples) bool: which sampled responses were right."""
        return np.array([r["correct"] for r in self.problems[eval_set]], dtype=bool)

    def problem_ids(self, eval_set: str) -> list[str]:
        return [str(r["id"]) for r in self.problems[eval_set]]

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a training curve, sorted by step (empty if never logged), without the
        updates that logged NaN (a metric measured every few updates, e.g. the cross-space
        diagnostics, is NaN in between)."""
        points = {s: v for s, v in self.curves.get(key, {}).items() if np.isfinite(v)}
        steps = np.array(sorted(points), dtype=int)
        return steps, np.array([points[s] for s in steps], dtype=float)


def _load_eval(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(summary, {set: per-problem records in index order}) of an evaluation copied by the runner."""
    problems = {}
    for f in sorted((folder / "problems").glob("*.jsonl")):
        records = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        problems[f.stem] = sorted(records, key=lambda r: r["index"])
    return json.loads((folder / "summary.json").read_text()), problems


def load_run(folder: Path) -> RunResult:
    done = json.loads((folder / "done.json").read_text())
    run_id, arm, seed = done["run"], done["arm"], int(done["seed"])
    curves_file = folder / "curves.json"
    logged = json.loads(curves_file.read_text()) if curves_file.exists() else {}
    curves = {current_name(k): {int(s): v for s, v in p.items()} for k, p in logged.items()}
    train = folder / "train_summary.json"
    periodic = {int(f.name.removeprefix("step")): RunResult(run_id, arm, seed, *_load_eval(f))
                for f in sorted((folder / "periodic").glob("step*"))}
    return RunResult(run_id, arm, seed, *_load_eval(folder / "eval"), curves,
                     json.loads(train.read_text()) if train.exists() else None, periodic)


def load_results(results_dir: Path) -> dict[str, RunResult]:
    """{run id: result} of every finished run (a ``done.json`` marks one)."""
    return {f.parent.name: load_run(f.parent) for f in sorted(Path(results_dir).glob("*/done.json"))}
