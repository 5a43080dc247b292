"""Plot reasoning-behaviour frequencies over training steps: one subplot per behaviour, one line
per run (the ``z_behaviour/*`` scalars of prerl.callbacks.BehaviourLogger, or ``behaviour/*`` of runs
logged before that name; docs/analysis.md).

    python scripts/plot_behaviours.py logs/<task>/runs/<run A> logs/<task>/runs/<run B> --out behaviours.png
    python scripts/plot_behaviours.py RUN... --stat frac --split wrong --labels GRPO,DSRL

A run folder is read from its TensorBoard events (``events.out.tfevents.*`` anywhere under it)
or, when it has none, from a Lightning ``metrics.csv`` under it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DEFAULT_BEHAVIOURS = "reflection,transition,subgoal_setting,enumeration,verification,backtracking"
FAMILY, LEGACY_FAMILY = "z_behaviour/", "behaviour/"  # the tag family, and its name in earlier runs


def metric_key(behaviour: str, stat: str, split: str) -> str:
    prefix = FAMILY + ("" if split == "all" else f"{split}/")
    return prefix + behaviour + ("_frac" if stat == "frac" else "")


def _from_events(folders: list[Path], keys: set[str]) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for key in keys & set(events.Tags()["scalars"]):
            curves.setdefault(key, {}).update({e.step: float(e.value) for e in events.Scalars(key)})
    return curves


def _from_csv(files: list[Path], keys: set[str]) -> dict[str, dict[int, float]]:
    curves: dict[str, dict[int, float]] = {}
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key in keys:
                    if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                        curves.setdefault(key, {})[int(float(row["step"]))] = float(row[key])
    return curves


def read_run(run: Path, keys: list[str]) -> dict[str, dict[int, float]]:
    """``{key: {step: value}}`` of one run (NaN points dropped; missing keys absent); a run logged
    with the earlier family name ``behaviour/`` is read under ``z_behaviour/`` keys."""
    legacy = {k.replace(FAMILY, LEGACY_FAMILY, 1): k for k in keys}
    wanted = set(keys) | set(legacy)
    event_dirs = sorted({p.parent for p in run.rglob("events.out.tfevents.*")})
    if event_dirs:
        curves = _from_events(event_dirs, wanted)
    else:
        curves = _from_csv(sorted(run.rglob("metrics.csv")), wanted)
    curves = {legacy.get(k, k): c for k, c in curves.items()}
    return {k: {s: v for s, v in c.items() if not math.isnan(v)} for k, c in curves.items()}


def plot(runs: dict[str, dict[str, dict[int, float]]], behaviours: list[str], keys: list[str], out: Path, ylabel: str):
    cols = min(3, len(behaviours))
    rows = math.ceil(len(behaviours) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharex=True)
    for ax, behaviour, key in zip(axes.flat, behaviours, keys):
        for label, curves in runs.items():
            points = sorted(curves.get(key, {}).items())
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None, label=label)
        ax.set_title(behaviour.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(behaviours):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if handles else 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, default=Path("behaviours.png"))
    parser.add_argument("--behaviours", default=DEFAULT_BEHAVIOURS, help="comma-separated keys")
    parser.add_argument("--stat", choices=("mean", "frac"), default="mean",
                        help="mean: thoughts per response; frac: fraction of all thoughts")
    parser.add_argument("--split", choices=("all", "correct", "wrong"), default="all")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels (default: folder names)")
    args = parser.parse_args(argv)

    behaviours = [b for b in args.behaviours.split(",") if b]
    keys = [metric_key(b, args.stat, args.split) for b in behaviours]
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"{len(labels)} labels for {len(args.runs)} runs")
    runs = {}
    for label, run in zip(labels, args.runs):
        curves = read_run(run, keys)
        if not curves:
            sys.exit(f"no {FAMILY}* scalars in {run} (is BehaviourLogger among the callbacks?)")
        runs[label] = curves
    ylabel = "thoughts / response" if args.stat == "mean" else "fraction of thoughts"
    plot(runs, behaviours, keys, args.out, ylabel)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
