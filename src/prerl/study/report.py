"""docs/reproduction.md from a study's results: tables, the paper's claims with a verdict each,
and the plots. Every number here is computed from ``<results_dir>``; nothing is typed in.

Uncertainty: per-problem accuracies are averaged over an arm's seeds, then a percentile
bootstrap over problems gives the interval (paired for differences between arms: the same
problems resampled for both); the spread over seeds is shown where an arm has several.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prerl.study.results import RunResult, eval_metric
from prerl.study.spec import Run, Study
from prerl.study.stats import (
    align_problems,
    bootstrap_ci,
    moving_average,
    per_problem_accuracy,
    steps_to_threshold,
    two_level_bootstrap_ci,
    verdict,
)

ACCURACY = "train/accuracy"
LENGTH = "train/response_len_mean"
PHASE = "train/phase"
PAPER_COLLAPSE = {"psr_prerl": "paper: it does", "prerl": "paper: after tracking GRPO for ~150 steps",
                  "nsr_prerl": "implied by the paper: it does not"}
# module.cross_space_diagnostics_every_n_steps: every response scored in both spaces (results.RENAMED
# maps the names older runs logged to these)
DIAGNOSTICS = (("train/rollout_entropy/conditional", "entropy after the question (conditional)"),
               ("train/rollout_entropy/marginal", "entropy without it (marginal)"),
               (LENGTH, "mean response tokens"),
               ("train/logprob_gap", "log-prob gap, conditional - marginal"))


@dataclass
class ArmView:
    """An arm's finished runs seen together."""

    name: str
    role: str
    runs: list[RunResult]

    def per_problem(self, eval_set: str, value: str = "accuracy") -> tuple[list[str], np.ndarray]:
        """(ids, (problems,)) the arm's per-problem accuracy (or mean length), averaged over seeds."""
        ids, matrix = align_problems(self.per_seed(eval_set, value))
        return ids, matrix.mean(axis=0)

    def per_seed(self, eval_set: str, value: str = "accuracy") -> list[tuple[list[str], np.ndarray]]:
        """[(ids, (problems,))] per seed: per-problem accuracy, its mean over the run's evaluations
        (``accuracy_over_updates``: periodic and final), mean length or a behaviour count."""
        rows = []
        for r in self.runs:
            if value == "accuracy_over_updates":  # the held-out curve's mean: every evaluation of the run
                evaluations = [*r.periodic.values(), r]
                ids, matrix = align_problems([(e.problem_ids(eval_set), per_problem_accuracy(e.correct_matrix(eval_set)))
                                              for e in evaluations])
                rows.append((ids, matrix.mean(axis=0)))
                continue
            if value == "accuracy":
                v = per_problem_accuracy(r.correct_matrix(eval_set))
            elif value == "length":
                v = np.array([np.mean(p["lengths"]) for p in r.problems[eval_set]])
            else:  # a behaviour count: mean per response
                v = np.array([np.mean([b.get(value, 0) for b in p["behaviours"]]) if p["behaviours"] else 0.0
                              for p in r.problems[eval_set]])
            rows.append((r.problem_ids(eval_set), v))
        return rows

    def at(self, step: int, final_step: int) -> ArmView:
        """The arm's evaluations after ``step`` updates (``final_step``: the last one), of the
        seeds that have one."""
        runs = [r if step == final_step else r.periodic[step] for r in self.runs
                if step == final_step or step in r.periodic]
        return ArmView(self.name, self.role, runs)

    def seed_values(self, key: str) -> list[float]:
        """An evaluation metric (``<set>/<metric>``) of every seed."""
        out = []
        for r in self.runs:
            name, _, metric = key.partition("/")
            value = r.eval_summary["datasets"].get(name, {}).get("metrics", {}).get(metric)
            if value is not None:
                out.append(float(value))
        return out


def _shown(path: Path, root: Path) -> Path:
    """A path relative to the project when it is inside it."""
    return path.relative_to(root) if path.is_relative_to(root) else path


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _step_text(step: int | None) -> str:
    return "never" if step is None else str(step)


def _steps_text(steps: list[int | None]) -> str:
    return "[" + ", ".join(map(_step_text, steps)) + "]"


def _paired(a: ArmView, b: ArmView, eval_set: str, value: str, n_boot: int) -> tuple[float, float, float, int]:
    """Arm a minus arm b on their common problems: (difference, lo, hi, problems), the interval
    resampling problems and each arm's seeds (stats.two_level_bootstrap_ci)."""
    rows_a, rows_b = a.per_seed(eval_set, value), b.per_seed(eval_set, value)
    _, matrix = align_problems(rows_a + rows_b)
    return (*two_level_bootstrap_ci(matrix[:len(rows_a)], matrix[len(rows_a):], n_boot), matrix.shape[1])


class Report:
    """Builds the markdown and the figures of one study."""

    def __init__(self, study: Study, results: dict[str, RunResult], planned: list[Run], alignment: dict | None):
        self.study, self.results, self.planned, self.alignment = study, results, planned, alignment
        cfg = study.report
        self.n_boot = int(cfg.get("bootstrap", 2000))
        self.window = int(cfg.get("window", 8))
        self.thresholds = [float(t) for t in cfg.get("thresholds", [])]
        self.ood_sets = list(cfg.get("ood_sets", []))
        self.primary = study.primary_set
        self.base = results.get("base")
        self.arms: dict[str, ArmView] = {}
        for name, arm in study.arms.items():
            runs = sorted((r for r in results.values() if r.arm == name), key=lambda r: r.seed)
            if runs:
                self.arms[name] = ArmView(name, arm.role, runs)
        self.samples = None
        if self.base is not None:
            self.samples = int(self.base.eval_summary["sampling"]["samples"])
        # the updates after which every run is evaluated; the base model stands for update 0
        self.eval_steps = study.periodic_steps + [study.updates] if study.periodic_every else []

    # ------------------------------------------------------------------ helpers
    def _role(self, role: str) -> list[ArmView]:
        return [a for a in self.arms.values() if a.role == role]

    def _arm(self, name: str) -> ArmView | None:
        return self.arms.get(name)

    def _best_dsrl(self) -> ArmView | None:
        arms = self._role("dsrl")
        if not arms:
            return None
        def first_seed(arm: ArmView) -> float:  # the runner's choice (runner.replicate_runs): first seeds only
            first = [r for r in arm.runs if r.seed == self.study.arms[arm.name].seeds[0]]
            return eval_metric(first[0].eval_summary, self.study.select_by) if first else -1.0
        return max(arms, key=first_seed)

    def _base_view(self) -> ArmView | None:
        return ArmView("base", "base", [self.base]) if self.base else None

    def _steps(self, arm: ArmView, threshold: float) -> list[int | None]:
        return [steps_to_threshold(*r.curve(ACCURACY), threshold, self.window) for r in arm.runs]

    # ------------------------------------------------------------------ sections
    def accuracy_table(self) -> list[str]:
        n = self.samples
        sets = [self.primary] + [s for s in self.ood_sets]
        head = ["arm", "seeds", f"{self.primary} avg@{n} [95% CI]", "seed sd"]
        head += [f"{self.primary} pass@{k}" for k in self._ks()]
        head += [f"{s} avg@{n}" for s in sets[1:]] + ["mean length", "truncated"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        views = ([self._base_view()] if self.base else []) + list(self.arms.values())
        for view in views:
            ids, acc = view.per_problem(self.primary)
            mean, lo, hi = bootstrap_ci(acc, self.n_boot)
            seeds = view.seed_values(f"{self.primary}/avg@{n}")
            sd = _fmt(float(np.std(seeds, ddof=1))) if len(seeds) > 1 else "-"
            row = [view.name, ",".join(str(r.seed) for r in view.runs) if view.name != "base" else "-",
                   f"{mean:.3f} [{lo:.3f}, {hi:.3f}]", sd]
            row += [_fmt(float(np.mean(view.seed_values(f"{self.primary}/pass@{k}") or [np.nan]))) for k in self._ks()]
            for s in sets[1:]:
                values = view.seed_values(f"{s}/avg@{n}")
                row.append(_fmt(float(np.mean(values))) if values else "n/a")
            lengths = [float(np.mean([np.mean(p["lengths"]) for p in r.problems[self.primary]])) for r in view.runs]
            trunc = [float(np.mean([np.mean(p["truncated"]) for p in r.problems[self.primary]])) for r in view.runs]
            row += [f"{np.mean(lengths):.1f}", f"{np.mean(trunc):.3f}"]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def _ks(self) -> list[int]:
        if self.base is None:
            return []
        return [int(k) for k in self.base.eval_summary["datasets"][self.primary].get("pass_at_k", {})]

    def training_table(self) -> list[str]:
        w = self.window
        head = ["arm", "seed", f"train acc, first {w}", f"train acc, last {w}", "length first→last",
                "entropy (space updated) first→last"] + [f"steps to {t:g}" for t in self.thresholds] + ["s/update by phase"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in self.arms.values():
            for r in arm.runs:
                _, acc = r.curve(ACCURACY)
                _, length = r.curve(LENGTH)
                _, ent = self._entropy(r)
                row = [arm.name, str(r.seed), _fmt(float(acc[:w].mean())) if acc.size else "n/a",
                       _fmt(float(acc[-w:].mean())) if acc.size else "n/a",
                       f"{length[:w].mean():.1f}→{length[-w:].mean():.1f}" if length.size else "n/a",
                       f"{ent[:w].mean():.3f}→{ent[-w:].mean():.3f}" if ent.size else "n/a"]
                row += [str(s) if s is not None else "never" for s in
                        (steps_to_threshold(*r.curve(ACCURACY), t, w) for t in self.thresholds)]
                row.append(", ".join(f"phase {p}: {s:.1f}" for p, s in self._seconds_by_phase(r).items()) or "n/a")
                lines.append("| " + " | ".join(row) + " |")
        return lines

    @staticmethod
    def _entropy(r: RunResult) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values): the token entropy of the responses each update scored, in the space it
        updated (marginal in PreRL phases, conditional otherwise). Steps without learning signal
        scored no response and are left out (earlier runs logged a 0 there)."""
        cond, marg = r.curves.get("train/entropy/conditional", {}), r.curves.get("train/entropy/marginal", {})
        no_signal = r.curves.get("train/no_signal_batches", {})
        steps, values = [], []
        for s in sorted(set(cond) | set(marg)):
            v = cond.get(s, float("nan"))
            v = marg.get(s, float("nan")) if np.isnan(v) else v
            if not np.isnan(v) and no_signal.get(s, 0.0) == no_signal.get(s - 1, 0.0):
                steps.append(s)
                values.append(v)
        return np.array(steps, dtype=int), np.array(values, dtype=float)

    @staticmethod
    def _seconds_by_phase(r: RunResult, per_token: bool = False) -> dict[int, float]:
        """Median seconds per update (rollout + update) in each phase; ``per_token``: each update's
        seconds over its mean response length (responses per update are fixed), so that phases
        sampling responses of different lengths compare per token."""
        phase = r.curves.get(PHASE, {})
        rollout, update = r.curves.get("train/time/rollout_s", {}), r.curves.get("train/time/update_s", {})
        length = r.curves.get(LENGTH, {}) if per_token else {}
        by: dict[int, list[float]] = {}
        for step in sorted(set(rollout) & set(update) & set(phase) & (set(length) if per_token else set(phase))):
            seconds = rollout[step] + update[step]
            by.setdefault(int(phase[step]), []).append(seconds / max(length[step], 1.0) if per_token else seconds)
        return {p: float(np.median(v)) for p, v in sorted(by.items())}

    def claims(self) -> list[dict[str, str]]:
        """Each of the paper's claims (docs/method.md, "Results to compare against") next to what
        was measured, with its uncertainty and a verdict."""
        rows: list[dict[str, str]] = []
        n, grpo = self.samples, (self._role("grpo") or [None])[0]
        best = self._best_dsrl()
        key = f"{self.primary} avg@{n}"

        def add(claim: str, measured: str, ci: str, verdict_: str) -> None:
            rows.append({"claim": claim, "measured": measured, "uncertainty": ci, "verdict": verdict_})

        def judged(lo: float, hi: float, expected: str, *arms: ArmView) -> str:
            return self._seeded(verdict(lo, hi, expected), *arms)

        def missing(claim: str, needs: str) -> None:
            add(claim, f"not yet run: needs {needs}", "-", "pending")

        def compare(claim: str, a: ArmView | None, b: ArmView | None, expected: str, needs: str) -> None:
            """Held-out accuracy of arm a minus arm b, claimed to be ``expected`` zero."""
            if not (a and b):
                missing(claim, needs)
                return
            d, lo, hi, _ = _paired(a, b, self.primary, "accuracy", self.n_boot)
            add(claim, f"{key}: {a.name} minus {b.name} = {d:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]", judged(lo, hi, expected, a, b))

        claim = "DSRL ends above GRPO (paper, Qwen3-4B Avg@32: 57.54 vs 55.79)"
        if grpo and best:
            d, lo, hi, p = _paired(best, grpo, self.primary, "accuracy", self.n_boot)
            per_seed = "; ".join(f"{arm.name} " + ", ".join(f"{v:.3f}" for v in arm.seed_values(self.study.select_by))
                                 for arm in (best, grpo))
            add(claim, f"{key}: best DSRL arm {best.name} minus {grpo.name} = {d:+.3f} ({p} problems; per seed: {per_seed})",
                f"bootstrap over problems and seeds, 95% CI [{lo:+.3f}, {hi:+.3f}]; seeds {len(best.runs)} / {len(grpo.runs)}",
                judged(lo, hi, ">", best, grpo))
            for other in self._role("dsrl"):
                if other is not best:
                    d, lo, hi, _ = _paired(other, grpo, self.primary, "accuracy", self.n_boot)
                    add(f"(every DSRL arm) {other.name} vs {grpo.name}", f"{key} difference {d:+.3f}",
                        f"[{lo:+.3f}, {hi:+.3f}]", judged(lo, hi, ">", other, grpo))
        else:
            missing(claim, "a GRPO and a DSRL arm")

        control = (self._role("control") or [None])[0]
        compare("NSR warm-up in post-train space, then GRPO, ends below GRPO (54.38 vs 55.79)", control, grpo, "<",
                "the control arm and GRPO")
        compare("The pre-train space matters: DSRL ends above the same warm-up in post-train space", best, control, ">",
                "the control arm and a DSRL arm")

        for t in self.thresholds:
            claim = f"DSRL reaches training accuracy {t:g} in fewer steps than GRPO (paper: 2.5x fewer to 45%, 1.6x to 58%)"
            if not (grpo and best):
                missing(claim, "a GRPO and a DSRL arm")
                continue
            g, b = self._steps(grpo, t), self._steps(best, t)
            g_max = [s if s is not None else self.study.updates + 1 for s in g]
            b_max = [s if s is not None else self.study.updates + 1 for s in b]
            measured = (f"steps (trailing {self.window}-update mean of train/accuracy): {best.name} {_steps_text(b)}, "
                        f"{grpo.name} {_steps_text(g)}")
            if all(s is None for s in g + b):
                add(claim, measured, "neither reached it", self._seeded("inconclusive", best, grpo))
                continue
            ratio = np.median(g_max) / np.median(b_max)
            if min(len(g), len(b)) < 2:  # one seed has no spread: a difference in steps says nothing yet
                v, spread = "inconclusive", "one seed of an arm: no spread to judge by"
            else:
                v = "held" if max(b_max) < min(g_max) else "did not hold" if min(b_max) > max(g_max) else "inconclusive"
                spread = "held / did not hold only when the seeds' ranges do not overlap"
            add(claim, measured + f"; ratio GRPO/DSRL {ratio:.2f} (never = N+1)", spread, self._seeded(v, best, grpo))

        base = self._base_view()
        for name, claim in (("psr_prerl", "PSR-PreRL alone collapses (accuracy falls below the base model's)"),
                            ("prerl", "Full PreRL collapses (paper: after tracking GRPO for ~150 steps)")):
            arm = self._arm(name)
            if arm and base:
                d, lo, hi, _ = _paired(arm, base, self.primary, "accuracy", self.n_boot)
                ent = [self._entropy(r)[1] for r in arm.runs]
                ent_txt = "; entropy first→last " + ", ".join(f"{e[:self.window].mean():.3f}→{e[-self.window:].mean():.3f}"
                                                             for e in ent if e.size)
                add(claim + f" within {self.study.updates} updates", f"{key}: {name} minus base = {d:+.3f}{ent_txt}",
                    f"[{lo:+.3f}, {hi:+.3f}]", judged(lo, hi, "<", arm))
            else:
                missing(claim, f"the {name} arm and the base evaluation")
        psr, nsr = self._arm("psr_prerl"), self._arm("nsr_prerl")
        compare(f"NSR-PreRL alone does not collapse within {self.study.updates} updates (implied: the paper puts the "
                "collapse on PSR-PreRL)", nsr, base, ">", "the nsr_prerl arm and the base evaluation")
        compare("PSR is the cause: PSR-PreRL ends below NSR-PreRL", psr, nsr, "<", "the psr_prerl and nsr_prerl arms")

        claim = "NSR-PreRL lengthens responses"
        if nsr and base:
            d, lo, hi, _ = _paired(nsr, base, self.primary, "length", self.n_boot)
            add(claim, f"{self.primary} mean response tokens: nsr_prerl minus base = {d:+.1f}",
                f"[{lo:+.1f}, {hi:+.1f}]", judged(lo, hi, ">", nsr))
        else:
            missing(claim, "the nsr_prerl arm and the base evaluation")
        for kind, paper in (("transition", "14.89x"), ("reflection", "6.54x")):
            claim = f"NSR-PreRL raises '{kind}' thoughts (paper: {paper} after 20 steps)"
            if nsr and base:
                ids_n, vn = nsr.per_problem(self.primary, kind)
                ids_b, vb = base.per_problem(self.primary, kind)
                _, both = align_problems([(ids_n, vn), (ids_b, vb)])
                _, lo, hi, _ = _paired(nsr, base, self.primary, kind, self.n_boot)
                ratio = f"{both[0].mean() / both[1].mean():.2f}x" if both[1].mean() > 0 else "base has none"
                measured = (f"{kind} thoughts per response: base {both[1].mean():.4f}, nsr_prerl {both[0].mean():.4f} "
                            f"({ratio})")
                v = "inconclusive" if both.max() == 0 else judged(lo, hi, ">", nsr)
                add(claim, measured, f"difference [{lo:+.4f}, {hi:+.4f}]", v)
            else:
                missing(claim, "the nsr_prerl arm and the base evaluation")

        claim = "grad log P(y) and grad log P(y|x) align: inner product > 0 for every rollout, mean cosine 0.44"
        if self.alignment:
            per = [r for r in self.alignment["per_sample"] if r.get("cosine") is not None and not np.isnan(r["cosine"])]
            cos = np.array([r["cosine"] for r in per])
            inner = np.array([r["inner"] for r in self.alignment["per_sample"]])
            m, lo, hi = bootstrap_ci(cos, self.n_boot)
            frac = float((inner > 0).mean())
            v = "held" if frac == 1.0 and lo > 0 else "did not hold" if hi < 0 or frac < 0.5 else "inconclusive"
            add(claim, f"base model, {len(inner)} rollouts ({self.alignment['params']['spec']} parameters): "
                f"inner > 0 for {100 * frac:.1f}%, mean cosine {m:.3f}", f"cosine bootstrap [{lo:.3f}, {hi:.3f}]", v)
        else:
            missing(claim, "the alignment probe")

        for s in self.ood_sets:
            claim = f"DSRL generalises at least as well as GRPO out of distribution ({s})"
            if grpo and best and all(s in r.problems for r in best.runs + grpo.runs):
                d, lo, hi, _ = _paired(best, grpo, s, "accuracy", self.n_boot)
                add(claim, f"{s} avg@{n}: {best.name} minus {grpo.name} = {d:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]",
                    judged(lo, hi, ">", best, grpo))
            else:
                missing(claim, f"GRPO and DSRL evaluated on {s}")

        claim = "Compute: an NSR-PreRL update costs no more than a GRPO update"
        phases, tokens = {}, {}
        for arm in self._role("dsrl"):
            for r in arm.runs:
                for p, sec in self._seconds_by_phase(r).items():
                    phases.setdefault(p, []).append(sec)
                for p, sec in self._seconds_by_phase(r, per_token=True).items():
                    tokens.setdefault(p, []).append(sec)
        if len(phases) >= 2:
            p1, p2 = float(np.median(phases[1])), float(np.median(phases[2]))
            per_token = ""
            if len(tokens) >= 2:
                t1, t2 = float(np.median(tokens[1])), float(np.median(tokens[2]))
                per_token = f"; per response token (an update's seconds over its mean length) ratio {t1 / t2:.2f}"
            add(claim, f"median seconds per update (rollout + update) in DSRL runs: phase 1 (NSR-PreRL) {p1:.1f}, "
                f"phase 2 (GRPO) {p2:.1f}, ratio {p1 / p2:.2f}{per_token}",
                "runs shared the machine; the phases sample responses of different lengths; see "
                "benchmarks/grpo_vs_trl.py for quiet timings", "measured")
        else:
            missing(claim, "a DSRL run")
        return rows

    # ------------------------------------------------------------------ periodic evaluation
    def _minus_base(self, arm: ArmView) -> list[tuple[int, int, float, float, float]]:
        """(update, seeds, difference, lo, hi): the arm's held-out accuracy minus the base model's
        after every evaluated update (the interval resamples problems and the arm's seeds)."""
        rows = []
        for step in self.eval_steps:
            view = arm.at(step, self.study.updates)
            if view.runs:
                rows.append((step, len(view.runs), *_paired(view, self._base_view(), self.primary, "accuracy",
                                                             self.n_boot)[:3]))
        return rows

    def collapse(self, arm: ArmView) -> dict[str, Any]:
        """The arm's collapse step: the first evaluated update whose accuracy is below the base
        model's with the interval of the difference below 0 (None: never), from all its seeds
        together and from each seed alone; ``rows`` are ``_minus_base``'s."""
        def first(rows: list) -> tuple | None:
            return next((row for row in rows if row[4] < 0), None)
        rows = self._minus_base(arm)
        seeds = [first(self._minus_base(ArmView(arm.name, arm.role, [r]))) for r in arm.runs]
        return {"rows": rows, "first": first(rows), "step": (first(rows) or [None])[0],
                "seeds": [None if c is None else c[0] for c in seeds]}

    def _seeded(self, verdict_: str, *arms: ArmView) -> str:
        """A verdict, pending while an arm planned with several seeds has fewer than two finished,
        and marked when it rests on an arm's one planned seed (the base model has none)."""
        for a in (a for a in arms if a.name != "base"):
            planned = sum(r.arm == a.name for r in self.planned)
            if len(a.runs) < min(2, planned):
                return f"pending ({len(a.runs)} of {planned} seeds finished)"
        single = any(a.name != "base" and len(a.runs) < 2 for a in arms)
        return f"{verdict_} (1 seed)" if single and verdict_ != "inconclusive" else verdict_

    def collapse_claims(self) -> list[dict[str, str]]:
        """When each pre-train-space arm falls below the base model, which of PSR-PreRL and
        NSR-PreRL does so first, and the study's ablations."""
        rows, n, last = [], self.samples, self.study.updates
        key = f"{self.primary} avg@{n}"

        def add(claim: str, measured: str, ci: str, verdict_: str) -> None:
            rows.append({"claim": claim, "measured": measured, "uncertainty": ci, "verdict": verdict_})

        collapses = {arm.name: self.collapse(arm) for arm in self._role("prerl_variant")}
        for name, c in collapses.items():
            arm, paper = self.arms[name], PAPER_COLLAPSE.get(name)
            claim = f"{name} falls below the base model within {last} updates" + (f" ({paper})" if paper else "")
            step, _, d, lo, hi = c["first"] or c["rows"][-1]
            own = f"; each seed alone: {_steps_text(c['seeds'])}"
            if c["first"]:
                add(claim, f"collapse step {step}: {key} minus base = {d:+.3f}{own}",
                    f"[{lo:+.3f}, {hi:+.3f}] at update {step}", self._seeded("held", arm))
            else:
                add(claim, f"never; at update {step}: {key} minus base = {d:+.3f}{own}", f"[{lo:+.3f}, {hi:+.3f}]",
                    self._seeded("did not hold" if lo > 0 else "inconclusive", arm))

        claim = "PSR-PreRL falls below the base model before NSR-PreRL (the paper puts the collapse on PSR-PreRL)"
        if {"psr_prerl", "nsr_prerl"} <= set(collapses):
            psr, nsr = self.arms["psr_prerl"], self.arms["nsr_prerl"]
            measured = "collapse steps: " + ", ".join(
                f"{k} {_step_text(collapses[k]['step'])} (seeds {_steps_text(collapses[k]['seeds'])})"
                for k in ("psr_prerl", "nsr_prerl"))
            never = last + 1
            sp, sn = (collapses[k]["step"] or never for k in ("psr_prerl", "nsr_prerl"))
            if sp == sn == never:
                add(claim, measured + "; neither fell below the base", "-", "inconclusive")
            else:
                # the one that falls first must also be below the other there, beyond the noise
                at = min(sp, sn)
                d, lo, hi, _ = _paired(psr.at(at, last), nsr.at(at, last), self.primary, "accuracy", self.n_boot)
                first = "psr_prerl" if sp < sn else "nsr_prerl" if sn < sp else "both at once"
                v = "held" if sp < sn and hi < 0 else "did not hold" if sn < sp and lo > 0 else "inconclusive"
                add(claim, f"{measured}; first: {first}", f"psr_prerl minus nsr_prerl at update {at}: {_ci(d, lo, hi)}",
                    self._seeded(v, psr, nsr))
        else:
            add(claim, "not yet run: needs the psr_prerl and nsr_prerl arms", "-", "pending")

        for ab in self.study.report.get("ablations", []):
            a, b = self.arms.get(ab["arm"]), self.arms.get(ab["against"])
            claim = ab["claim"].strip()
            if not (a and b):
                add(claim, f"not yet run: needs the {ab['arm']} and {ab['against']} arms", "-", "pending")
                continue
            measure = ab.get("measure", "final")  # checked by load_study (spec.ABLATION_MEASURES)
            d, lo, hi, _ = _paired(a, b, self.primary, "accuracy", self.n_boot)
            final = f"{key} at update {last}: {a.name} minus {b.name} = {d:+.3f}"
            steps = "; collapse steps " + ", ".join(
                f"{arm.name} {_step_text((collapses.get(arm.name) or self.collapse(arm))['step'])}" for arm in (a, b))
            if measure == "over_updates":
                unevaluated = [r.run_id for r in a.runs + b.runs if sorted(r.periodic) != self.study.periodic_steps]
                if unevaluated:
                    add(claim, f"periodic evaluations missing for {', '.join(unevaluated)}", "-", "pending")
                    continue
                d, lo, hi, _ = _paired(a, b, self.primary, "accuracy_over_updates", self.n_boot)
                over = ", ".join(map(str, self.eval_steps))
                add(claim, f"{key} averaged over the evaluations after {over} updates: {a.name} minus {b.name} = "
                    f"{d:+.3f}; {final}{steps}", f"[{lo:+.3f}, {hi:+.3f}] (averaged over updates)",
                    self._seeded(verdict(lo, hi, ab["expected"]), a, b))
            else:
                add(claim, final + steps, f"[{lo:+.3f}, {hi:+.3f}]", self._seeded(verdict(lo, hi, ab["expected"]), a, b))
        return rows

    def periodic_tables(self) -> list[str]:
        """Held-out accuracy of every arm over updates, and each pre-train-space arm's difference
        from the base model with its interval."""
        n, last = self.samples, self.study.updates
        base = float(np.mean(self._base_view().seed_values(f"{self.primary}/avg@{n}")))
        head = ["arm", "seeds"] + [str(s) for s in self.eval_steps]
        lines = [f"`{self.primary}` avg@{n} after every {self.study.periodic_every} updates (the base model, update 0: "
                 f"{base:.3f}): mean over seeds (lowest-highest seed where an arm has several).", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in self.arms.values():
            row = [arm.name, ",".join(str(r.seed) for r in arm.runs)]
            for step in self.eval_steps:
                v = arm.at(step, last).seed_values(f"{self.primary}/avg@{n}")
                row.append("n/a" if not v else f"{np.mean(v):.3f}" + (f" ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else ""))
            lines.append("| " + " | ".join(row) + " |")
        variants = self._role("prerl_variant")
        if not variants:
            return lines + ["", "No pre-train-space arm has finished yet: no collapse step to report."]
        head = ["arm", "seeds"] + [f"minus base at {s}" for s in self.eval_steps] + ["collapse step", "each seed alone"]
        lines += ["", "Each pre-train-space arm minus the base model (95% interval over problems and seeds); the "
                  "collapse step is the first evaluation whose interval lies below 0.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in variants:
            c = self.collapse(arm)
            by_step = {row[0]: row for row in c["rows"]}
            row = [arm.name, ",".join(str(r.seed) for r in arm.runs)]
            row += [_ci(*by_step[s][2:]) if s in by_step else "n/a" for s in self.eval_steps]
            row += [_step_text(c["step"]), _steps_text(c["seeds"])]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    # ------------------------------------------------------------------ figures
    def figures(self, out: Path) -> dict[str, Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(self.study.arms)}

        for key, label, fname in ((ACCURACY, f"train accuracy ({self.window}-update mean)", "accuracy.png"),
                                  (LENGTH, "mean response tokens", "length.png"),
                                  (None, f"entropy, space updated ({self.window}-update mean)", "entropy.png")):
            fig, ax = plt.subplots(figsize=(7, 4))
            for arm in self.arms.values():
                curves = []
                for r in arm.runs:
                    steps, values = self._entropy(r) if key is None else r.curve(key)
                    if len(values):
                        curves.append(dict(zip(steps.tolist(),
                                               values if key == LENGTH else moving_average(values, self.window))))
                if not curves:
                    continue
                # several seeds: their mean, and the band between the lowest and the highest seed
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ys = np.array([[c[s] for s in steps] for c in curves])
                legend = arm.name if len(curves) == 1 else f"{arm.name} (mean of {len(curves)} seeds, min-max band)"
                ax.plot(steps, ys.mean(axis=0), color=colours[arm.name], label=legend)
                if len(curves) > 1:
                    ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=colours[arm.name], alpha=0.2)
            ax.set_xlabel("update")
            ax.set_ylabel(label)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            written[fname] = out / fname
            fig.savefig(written[fname], dpi=110)
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        views = ([self._base_view()] if self.base else []) + list(self.arms.values())
        for view in views:
            ks = self._ks()
            values = [float(np.mean(view.seed_values(f"{self.primary}/pass@{k}") or [np.nan])) for k in ks]
            ax.plot(ks, values, "o-", color="black" if view.name == "base" else colours[view.name], label=view.name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel(f"{self.primary} pass@k (unbiased)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written["pass_at_k.png"] = out / "pass_at_k.png"
        fig.savefig(written["pass_at_k.png"], dpi=110)
        plt.close(fig)

        kinds = ["reflection", "transition", "subgoal_setting", "enumeration", "verification", "backtracking"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / max(1, len(views))
        for i, view in enumerate(views):
            means = [float(view.per_problem(self.primary, k)[1].mean()) for k in kinds]
            ax.bar(np.arange(len(kinds)) + i * width, means, width,
                   color="black" if view.name == "base" else colours[view.name], label=view.name)
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, fontsize=8)
        ax.set_ylabel("thoughts per response (held-out)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written["behaviours.png"] = out / "behaviours.png"
        fig.savefig(written["behaviours.png"], dpi=110)
        plt.close(fig)

        if self.eval_steps and self.base is not None:
            written.update(self._periodic_figures(out, colours))

        source = self.study.results_dir / "analysis" / "alignment"
        for png in sorted(source.glob("*.png")):
            written[f"alignment_{png.name}"] = out / f"alignment_{png.name}"
            shutil.copy(png, written[f"alignment_{png.name}"])
        return written

    def _trailing_mean(self, steps: np.ndarray, values: np.ndarray) -> dict[int, float]:
        """{step: mean of the points logged in the ``window`` updates up to it} (diagnostics are
        logged every few updates, so a mean over a number of points would span more updates)."""
        return {int(s): float(values[(steps > s - self.window) & (steps <= s)].mean()) for s in steps}

    def _periodic_figures(self, out: Path, colours: dict) -> dict[str, Path]:
        """Held-out accuracy over updates (every arm), and the collapse's diagnostics (the
        pre-train-space arms, GRPO for reference): the mean over seeds and their min-max band."""
        import matplotlib.pyplot as plt

        def band(ax, arm: ArmView, curves: list[dict[int, float]]) -> None:
            curves = [c for c in curves if c]
            if not curves:
                return
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ys = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, ys.mean(axis=0), "o-" if len(steps) < 20 else "-", color=colours[arm.name], markersize=3,
                    label=arm.name if len(curves) == 1 else f"{arm.name} ({len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(steps, ys.min(axis=0), ys.max(axis=0), color=colours[arm.name], alpha=0.2)

        written, n, last = {}, self.samples, self.study.updates
        base = float(np.mean(self._base_view().seed_values(f"{self.primary}/avg@{n}")))
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm in self.arms.values():
            band(ax, arm, [{0: base, **{s: float(eval_metric((r if s == last else r.periodic[s]).eval_summary,
                                                            f"{self.primary}/avg@{n}"))
                                        for s in self.eval_steps if s == last or s in r.periodic}} for r in arm.runs])
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label="base model")
        ax.set_xlabel("update")
        ax.set_ylabel(f"{self.primary} avg@{n}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written["heldout_over_updates.png"] = out / "heldout_over_updates.png"
        fig.savefig(written["heldout_over_updates.png"], dpi=110)
        plt.close(fig)

        arms = self._role("prerl_variant") + self._role("grpo")
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (key, label) in zip(axes.flat, DIAGNOSTICS):
            for arm in arms:
                band(ax, arm, [self._trailing_mean(*r.curve(key)) for r in arm.runs])
            ax.set_xlabel("update")
            ax.set_ylabel(f"{label}\n({self.window}-update mean)", fontsize=8)
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        written["collapse_curves.png"] = out / "collapse_curves.png"
        fig.savefig(written["collapse_curves.png"], dpi=110)
        plt.close(fig)
        return written

    # ------------------------------------------------------------------ the document
    def markdown(self, figures: dict[str, Path], doc: Path, command: str) -> str:
        study, n = self.study, self.samples
        done = [r for r in self.planned if r.id in self.results]
        pending = [r for r in self.planned if r.id not in self.results]
        rel = lambda p: Path(p).relative_to(doc.parent) if Path(p).is_relative_to(doc.parent) else Path(p)  # noqa: E731
        train_s = sum((r.train_summary or {}).get("train_seconds", 0.0) for r in self.results.values())
        eval_s = sum(float(e.eval_summary.get("seconds", 0.0)) for r in self.results.values()
                     for e in [r, *r.periodic.values()])
        cfg = study.report
        lines = [f"# {cfg.get('title', 'Reproduction in miniature')}", "",
                 f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from `{_shown(study.results_dir, study.root)}`: "
                 f"{len(done)} of {len(self.planned)} planned runs finished. Do not edit by hand: re-run the command.",
                 "", cfg.get("description", "").strip(), "",
                 "## Reproduce", "", "```bash", *cfg.get("commands", []), "```", "",
                 "## Setup", "",
                 f"- updates per arm: N = {study.updates}; torch threads per run: {study.threads}",
                 f"- shared training overrides: `{' '.join(study.train_overrides)}`",
                 f"- evaluation overrides: `{' '.join(study.eval_overrides)}`",
                 f"- held-out set `{self.primary}`, out-of-distribution sets: {', '.join(f'`{s}`' for s in self.ood_sets) or 'none'}",
                 f"- compute used by the finished runs: {train_s / 3600:.2f} h of training, {eval_s / 3600:.2f} h of evaluation",
                 "", "| arm | role | overrides | seeds finished |", "|---|---|---|---|"]
        for arm in study.arms.values():
            seeds = [r.seed for r in self.results.values() if r.arm == arm.name]
            lines.append(f"| {arm.name} | {arm.role} | `{' '.join(arm.overrides)}` | {', '.join(map(str, sorted(seeds))) or 'none'} |")
        lines += ["", "## The paper's claims at this scale", "",
                  "Verdicts: **held** / **did not hold** when the 95% interval excludes zero on the claimed / "
                  "the other side, else **inconclusive**; **pending** when the runs it needs have not finished. "
                  "Intervals are a bootstrap that resamples the evaluation's problems (the same draw for both arms "
                  "of a difference) and, where an arm has several training seeds, its seeds too: with one seed of "
                  "an arm they hold the evaluation's noise, not the run-to-run spread of training, and the verdict "
                  "says **(1 seed)**. The best DSRL arm is the one with the highest "
                  f"`{self.study.select_by}` on its first seed, the same problems it is then judged on: "
                  "the choice itself favours DSRL a little; its extra seeds were run after it was chosen.", "",
                  "| claim | measured | uncertainty | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['measured']} | {c['uncertainty']} | **{c['verdict']}** |" for c in self.claims()]
        if self.eval_steps and self.base is not None:
            lines += ["", "## The collapse over updates", "",
                      f"Every run's policy is also evaluated after {', '.join(map(str, self.eval_steps[:-1]))} updates "
                      f"(the same `{self.primary}` problems and samples as the final evaluation). An arm's **collapse "
                      "step** is the first of these evaluations at which its accuracy is below the base model's with "
                      "the 95% interval of the difference (problems and seeds resampled) below 0; **never** if there is "
                      "none. Figures: `heldout_over_updates.png`, `collapse_curves.png`.", "",
                      "| claim | measured | uncertainty | verdict |", "|---|---|---|---|"]
            lines += [f"| {c['claim']} | {c['measured']} | {c['uncertainty']} | **{c['verdict']}** |"
                      for c in self.collapse_claims()]
            lines += ["", *self.periodic_tables()]
        if self.base is not None:
            lines += ["", f"## Held-out and out-of-distribution accuracy (n = {n} samples per problem)", "",
                      "Intervals: bootstrap over problems of the per-problem accuracy averaged over seeds.", ""]
            lines += self.accuracy_table()
        if self.arms:
            lines += ["", "## Training curves", ""] + self.training_table()
        lines += ["", "## Figures", ""]
        lines += [f"![{name}]({rel(path)})" for name, path in figures.items()]
        if pending:
            lines += ["", "## Not yet run", "", "The same command continues the study with these runs:", ""]
            lines += [f"- `{r.id}`" for r in pending]
        if self.study.report.get("scale_up"):
            lines += ["", "## What a stronger test needs", "", *self.scale_up()]
        return "\n".join(lines + [""]) + "\n"

    def scale_up(self) -> list[str]:
        """An ESTIMATE of the compute of a stronger test on one GPU, from the study file's
        assumptions (``report.scale_up``): 6 x params x tokens for policy updates plus
        2 x params x tokens for sampling, at an assumed fraction of the GPU's peak."""
        s = self.study.report["scale_up"]
        tokens = float(s["prompts"]) * float(s["group_size"]) * float(s["mean_tokens"]) * float(s["updates"])
        flops = (6 + 2) * float(s["params"]) * tokens * float(s["arms"])
        hours = flops / (float(s["gpu_peak_flops"]) * float(s["utilisation"])) / 3600
        return [s.get("text", "").strip(), "",
                f"Estimate (computed, not measured): {s['arms']} arms x {s['updates']} updates x {s['prompts']} prompts x "
                f"{s['group_size']} responses x {s['mean_tokens']} tokens = {tokens * float(s['arms']):.3g} tokens; "
                f"8 x {float(s['params']):.3g} parameters x tokens = {flops:.3g} FLOP; at {100 * float(s['utilisation']):.0f}% "
                f"of {float(s['gpu_peak_flops']):.3g} FLOP/s ({s.get('gpu', 'one GPU')}): about {hours:.0f} GPU-hours."]


def write_report(study: Study, results: dict[str, RunResult], planned: list[Run], alignment: dict | None,
                 command: str) -> Path:
    """Write the figures and the markdown; return the markdown's path."""
    cfg = study.report
    doc = study.root / cfg.get("output", f"docs/{study.name}.md")
    report = Report(study, results, planned, alignment)
    figures = report.figures(study.root / cfg.get("figures", f"docs/{study.name}")) if report.arms or report.base else {}
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(report.markdown(figures, doc, command))
    return doc


def load_alignment(study: Study) -> dict[str, Any] | None:
    """The alignment probe's JSON if the study ran it."""
    path = study.results_dir / "analysis" / "alignment" / "alignment.json"
    return json.loads(path.read_text()) if path.exists() else None
