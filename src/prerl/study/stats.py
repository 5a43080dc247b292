"""Uncertainty for the study: bootstrap over problems (and seeds), steps to a threshold.

Pure numpy functions; ``rng`` seeds make every interval reproducible from the same results.
"""

from __future__ import annotations

import numpy as np


def per_problem_accuracy(correct: np.ndarray) -> np.ndarray:
    """(problems, samples) bool -> (problems,) fraction right (the avg@n of each problem)."""
    return np.asarray(correct, dtype=float).mean(axis=1)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of (problems,) values and its percentile bootstrap interval over problems."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap of an empty set of problems")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same (problems,) and its interval, problems resampled jointly
    (the difference of two arms on one problem set is far less noisy than either arm)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same problems: shapes {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, n_boot, level, seed)


def two_level_bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> tuple[float, float, float]:
    """Arm a minus arm b, each (seeds, problems) per-problem values on the same problems: the
    difference of their means and its interval, resampling both the problems (jointly for both
    arms, as in the paired bootstrap) and each arm's training seeds (with replacement), so the
    interval holds the run-to-run spread of training as well as the evaluation's noise
    (a hierarchical bootstrap). With one seed per arm it is ``paired_bootstrap_ci`` exactly."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"two-level bootstrap needs the same, non-empty problems: shapes {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, a.shape[1], size=(n_boot, a.shape[1]))  # drawn first: = bootstrap_ci's draw
    seeds_a = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    seeds_b = rng.integers(0, b.shape[0], size=(n_boot, b.shape[0]))
    diff = a[seeds_a].mean(axis=1) - b[seeds_b].mean(axis=1)  # (n_boot, problems)
    means = np.take_along_axis(diff, problems, axis=1).mean(axis=1)
    alpha = (1 - level) / 2
    point = float((a.mean(axis=0) - b.mean(axis=0)).mean())
    return point, float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def align_problems(per_run: list[tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """Runs' per-problem values on the problems ALL of them evaluated: (ids, (runs, problems))."""
    common = set(per_run[0][0])
    for ids, _ in per_run[1:]:
        common &= set(ids)
    order = [i for i in per_run[0][0] if i in common]
    rows = []
    for ids, values in per_run:
        where = {pid: k for k, pid in enumerate(ids)}
        rows.append(np.array([values[where[i]] for i in order], dtype=float))
    return order, np.stack(rows)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start): (T,) -> (T,)."""
    values = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    csum = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def steps_to_threshold(steps: np.ndarray, values: np.ndarray, threshold: float, window: int) -> int | None:
    """First step whose trailing ``window``-point mean reaches ``threshold`` (None: never).

    The mean starts counting only once ``window`` points exist, so one lucky batch at step 1
    does not count as reaching it."""
    smooth = moving_average(values, window)
    for k in range(window - 1, len(steps)):
        if smooth[k] >= threshold:
            return int(steps[k])
    return None


def verdict(lo: float, hi: float, expected: str) -> str:
    """``held`` / ``did not hold`` / ``inconclusive`` for an interval of a difference whose
    claimed sign is ``expected`` ('>' or '<' zero)."""
    if expected not in (">", "<"):
        raise ValueError(f"expected must be '>' or '<', got {expected!r}")
    above, below = lo > 0, hi < 0
    if (above and expected == ">") or (below and expected == "<"):
        return "held"
    if (below and expected == ">") or (above and expected == "<"):
        return "did not hold"
    return "inconclusive"
