"""Summaries of an evaluation: metrics per set from its per-problem records, the console table,
TensorBoard scalars and the pass@k plot."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from prerl.metrics import pass_at_k_curve, pass_at_k_ks

log = logging.getLogger(__name__)

BEHAVIOUR_FAMILY = "z_behaviour"  # training's tag group (prerl.callbacks.behaviours.FAMILY), sorted last

__all__ = ["set_summary", "format_table", "log_to_loggers", "plot_pass_at_k", "curve_of"]


def _behaviour_summary(records: list[dict]) -> dict[str, float] | None:
    counts = [c for rec in records for c in rec.get("behaviours") or []]
    if not counts:
        return None
    try:
        from prerl.analysis.behaviours import summary_from_totals
    except ImportError:  # pragma: no cover - older analysis module: recount from the texts
        from prerl.analysis.behaviours import summarize_behaviours

        return summarize_behaviours([r for rec in records for r in rec["responses"]])
    totals: dict[str, float] = {}
    for c in counts:
        for key, value in c.items():
            totals[key] = totals.get(key, 0) + value
    return summary_from_totals(totals, len(counts))


def set_summary(records: list[dict], samples: int, total: int, stats: dict | None = None) -> dict[str, Any]:
    """Metrics of one set over the problems evaluated so far.

    ``metrics``: ``avg@n`` (mean over problems of c / n), the unbiased ``pass@k`` for k = 1, 2, 4,
    ..., n, ``reward_mean``, ``response_len_mean`` / ``response_len_max`` (tokens, end token
    included), ``truncated_frac``, ``unparsable`` / ``unparsable_frac`` (responses from which the
    reward extracted no answer; scored 0; None when the reward reports no extracted answers),
    ``reward_timeouts``, ``reward_errors``, ``problems``.
    """
    out: dict[str, Any] = {"problems": total, "done": len(records), "samples_per_problem": samples,
                           **({"data": stats} if stats else {})}
    if not records:
        out.update(metrics={}, pass_at_k={}, behaviours=None)
        return out
    counts = [int(rec["num_correct"]) for rec in records]
    ks = pass_at_k_ks(samples)
    curve = pass_at_k_curve(samples, counts, ks)
    rewards = [r for rec in records for r in rec["rewards"]]
    lengths = [n for rec in records for n in rec["lengths"]]
    truncated = [t for rec in records for t in rec["truncated"]]
    extracted = [e for rec in records for e in rec["extracted"]]
    correct = [c for rec in records for c in rec["correct"]]
    missing = sum(e is None for e in extracted)
    # A reward that reports no extracted answers (a plug-in returning plain numbers) would count
    # every response unparsable; a correct response without an extracted answer gives it away.
    reports_extraction = not any(e is None and c for e, c in zip(extracted, correct))
    metrics: dict[str, float | None] = {f"avg@{samples}": sum(c / samples for c in counts) / len(counts)}
    metrics.update({f"pass@{k}": v for k, v in curve.items()})
    metrics.update(
        reward_mean=sum(rewards) / len(rewards),
        response_len_mean=sum(lengths) / len(lengths),
        response_len_max=float(max(lengths)),
        truncated_frac=sum(map(bool, truncated)) / len(truncated),
        unparsable=float(missing) if reports_extraction else None,
        unparsable_frac=missing / len(extracted) if reports_extraction else None,
        reward_timeouts=float(sum(int(rec.get("reward_timeouts", 0)) for rec in records)),
        reward_errors=float(sum(int(rec.get("reward_errors", 0)) for rec in records)),
    )
    out.update(metrics=metrics, pass_at_k={str(k): v for k, v in curve.items()}, behaviours=_behaviour_summary(records))
    return out


def _fmt(value: Any, width: int, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if pct:
        return f"{100 * value:>{width - 1}.1f}%"
    return f"{value:>{width}.4f}" if isinstance(value, float) else f"{value:>{width}}"


def format_table(summaries: dict[str, dict], samples: int) -> str:
    """One row per set: problems done, avg@n, pass@k for every k, mean length, truncated and
    unparsable shares."""
    ks = pass_at_k_ks(samples)
    name_w = max([8] + [len(n) for n in summaries]) + 2
    head = (f"{'set':<{name_w}}{'problems':>10}{f'avg@{samples}':>10}" + "".join(f"{f'pass@{k}':>10}" for k in ks)
            + f"{'len':>8}{'trunc':>8}{'unpars.':>9}")
    lines = ["=" * len(head), head, "-" * len(head)]
    for name, s in summaries.items():
        m = s.get("metrics") or {}
        done = f"{s['done']}/{s['problems']}"
        lines.append(
            f"{name:<{name_w}}{done:>10}{_fmt(m.get(f'avg@{samples}'), 10)}"
            + "".join(_fmt(m.get(f"pass@{k}"), 10) for k in ks)
            + (f"{m['response_len_mean']:>8.1f}" if m else f"{'-':>8}")
            + _fmt(m.get("truncated_frac"), 8, pct=True) + _fmt(m.get("unparsable_frac"), 9, pct=True)
        )
    lines.append("=" * len(head))
    return "\n".join(lines)


def log_to_loggers(loggers: list, summaries: dict[str, dict]) -> None:
    """Every metric as one scalar ``<set>/<metric>`` (step 0), the pass@k curve as
    ``<set>/pass@k_curve`` indexed by k (the step is k), the behaviour summary as
    ``z_behaviour/<set>/<key>`` (training's family, sorted after the sets), and on TensorBoard the
    curve as a figure."""
    for logger in loggers:
        for name, s in summaries.items():
            scalars = {f"{name}/{k}": float(v) for k, v in (s.get("metrics") or {}).items() if v is not None}
            scalars.update({f"{BEHAVIOUR_FAMILY}/{name}/{k}": float(v) for k, v in (s.get("behaviours") or {}).items()})
            if scalars:
                logger.log_metrics(scalars, step=0)
            for k, v in (s.get("pass_at_k") or {}).items():
                logger.log_metrics({f"{name}/pass@k_curve": float(v)}, step=int(k))
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure") and any(s.get("pass_at_k") for s in summaries.values()):
            fig = _figure([("", {n: curve_of(s) for n, s in summaries.items()})])
            if fig is not None:
                experiment.add_figure("pass@k", fig, global_step=0, close=True)
        logger.save()


def curve_of(summary: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in (summary.get("pass_at_k") or {}).items()}


def _figure(runs: list[tuple[str, dict[str, dict[int, float]]]], title: str | None = None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        log.warning("matplotlib is not installed: no pass@k figure")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ks_seen: set[int] = set()
    for label, curves in runs:
        for name, curve in curves.items():
            if not curve:
                continue
            ks = sorted(curve)
            ks_seen.update(ks)
            line = f"{label} / {name}" if label else name
            ax.plot(ks, [curve[k] for k in ks], marker="o", label=line)
    ax.set_xscale("log", base=2)
    if ks_seen:
        ax.set_xticks(sorted(ks_seen))
        ax.set_xticklabels([str(k) for k in sorted(ks_seen)])
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k (unbiased)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_pass_at_k(runs: list[tuple[str, dict[str, dict[int, float]]]], out: str | Path, title: str | None = None) -> Path:
    """A PNG with one line per (run, set): ``runs`` is [(label, {set: {k: pass@k}})]."""
    fig = _figure(runs, title)
    if fig is None:
        raise ImportError("plotting needs matplotlib: pip install matplotlib")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
