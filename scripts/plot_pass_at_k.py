"""Plot the unbiased pass@k curves of several evaluations (checkpoints, models) on one figure.

    python scripts/plot_pass_at_k.py logs/eval/runs/<base> logs/eval/runs/<trained> --out curve.png
    python scripts/plot_pass_at_k.py <run> <run> --labels base,dsrl --sets svamp --title "SVAMP, n=4"

Each argument is an eval run folder (its summary.json, written by `python src/eval.py`) or a
summary.json file. One line per run and eval set, x axis log2(k); the curve of every run is
printed too. A partial (interrupted) evaluation is plotted over the problems it finished, and
said so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prerl.evaluation.report import curve_of, plot_pass_at_k  # noqa: E402


def load(path: Path) -> dict:
    file = path / "summary.json" if path.is_dir() else path
    if not file.is_file():
        sys.exit(f"{path}: no summary.json (is it an eval run folder written by src/eval.py?)")
    return json.loads(file.read_text())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="eval run folders (or their summary.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG to write (default: pass_at_k_vs.png in the first run's folder, never the "
                             "working directory)")
    parser.add_argument("--labels", default=None, help="comma-separated label per run (default: folder names)")
    parser.add_argument("--sets", default=None, help="comma-separated eval sets to plot (default: all)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [p.name if p.is_dir() else p.parent.name for p in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    wanted = set(args.sets.split(",")) if args.sets else None
    runs = []
    for label, path in zip(labels, args.runs):
        summary = load(path)
        curves = {}
        for name, s in summary.get("datasets", {}).items():
            if wanted is not None and name not in wanted:
                continue
            curve = curve_of(s)
            if not curve:
                continue
            curves[name] = curve
            partial = f" (partial: {s['done']}/{s['problems']} problems)" if s.get("done") != s.get("problems") else ""
            shown = "  ".join(f"pass@{k}={v:.4f}" for k, v in sorted(curve.items()))
            print(f"{label} / {name}{partial}: {shown}")
        if not curves:
            sys.exit(f"{path}: no pass@k curve{' for ' + args.sets if args.sets else ''}")
        runs.append((label, curves))
    first = args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent
    out = plot_pass_at_k(runs, args.out or first / "pass_at_k_vs.png", title=args.title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
