"""A study file (configs/study/*.yaml) as plain dataclasses, checked when it is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

BEST_PREFIX = "best:"  # replicate entry "best:a,b,c": the arm of a, b, c with the best held-out score


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]  # Hydra overrides of src/train.py added to the study's train_overrides
    seeds: tuple[int, ...]
    role: str                   # what the report compares it as: grpo | dsrl | control | prerl_variant


@dataclass(frozen=True)
class Run:
    arm: str                    # "base" for the untrained model's evaluation
    seed: int

    @property
    def id(self) -> str:
        return "base" if self.arm == "base" else f"{self.arm}-seed{self.seed}"


@dataclass
class Study:
    name: str
    root: Path                          # project root; relative paths below are under it
    results_dir: Path                   # light results, committed: curves, summaries, per-problem evals
    work_dir: Path                      # run folders with checkpoints, never committed
    train_overrides: tuple[str, ...]
    eval_overrides: tuple[str, ...]
    alignment_args: tuple[str, ...] | None  # scripts/alignment_probe.py arguments (None: no probe)
    updates: int
    threads: int
    arms: dict[str, Arm]
    replicate_seeds: tuple[int, ...]
    replicate_arms: tuple[str, ...]     # arm names or "best:a,b,c"
    select_by: str                      # eval metric that picks "best:" arms, e.g. heldout/avg@8
    report: dict[str, Any] = field(default_factory=dict)
    periodic_every: int | None = None   # also evaluate the policy after every k updates (None: final only)
    periodic_overrides: tuple[str, ...] = ()  # added to eval_overrides for those evaluations

    @property
    def primary_set(self) -> str:
        return self.select_by.split("/")[0]

    @property
    def periodic_steps(self) -> list[int]:
        """Updates after which a run's policy is evaluated besides its last one (step N is the
        final evaluation itself, step 0 the base model's)."""
        return list(range(self.periodic_every, self.updates, self.periodic_every)) if self.periodic_every else []


ROLES = ("grpo", "dsrl", "control", "prerl_variant")
# report.ablations[].measure: the held-out accuracy after the last update, or its mean over every
# evaluation of the run (periodic and final: earlier and deeper falls count, not only the end point)
ABLATION_MEASURES = ("final", "over_updates")


def load_study(path: str | Path, root: str | Path) -> Study:
    """Read and check a study file; every error names the file and the key."""
    path, root = Path(path), Path(root)
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    where = str(path)
    known = {"name", "results_dir", "work_dir", "train_overrides", "eval_overrides", "alignment", "updates",
             "threads", "arms", "replicate", "select_by", "report", "periodic_eval"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    updates = int(raw.get("updates", 0))
    if updates < 1:
        raise ValueError(f"{where}: updates must be >= 1, got {updates}")
    arms: dict[str, Arm] = {}
    for name, node in (raw.get("arms") or {}).items():
        if name == "base" or "-" in name:
            raise ValueError(f"{where}: arm name {name!r} is reserved or has a '-' (run ids are <arm>-seed<k>)")
        role = node.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: arms.{name}.role must be one of {ROLES}, got {role!r}")
        seeds = tuple(int(s) for s in node.get("seeds", [0]))
        if not seeds:
            raise ValueError(f"{where}: arms.{name}.seeds is empty")
        arms[name] = Arm(name, tuple(node.get("overrides", [])), seeds, role)
    if not arms:
        raise ValueError(f"{where}: no arms")
    if not any(a.role == "grpo" for a in arms.values()):
        raise ValueError(f"{where}: the report compares against an arm with role grpo; none is defined")
    replicate = raw.get("replicate") or {}
    replicate_arms = tuple(replicate.get("arms", []))
    for entry in replicate_arms:
        names = entry[len(BEST_PREFIX):].split(",") if entry.startswith(BEST_PREFIX) else [entry]
        missing = [n for n in names if n not in arms]
        if missing:
            raise ValueError(f"{where}: replicate.arms entry {entry!r} names unknown arms {missing}")
    periodic = raw.get("periodic_eval") or {}
    every = periodic.get("every")
    if every is not None and not 1 <= int(every) < updates:
        raise ValueError(f"{where}: periodic_eval.every must be in [1, updates = {updates}), got {every}")
    for i, ab in enumerate((raw.get("report") or {}).get("ablations") or []):
        key = f"{where}: report.ablations[{i}]"
        missing = [ab.get(k) for k in ("arm", "against") if ab.get(k) not in arms]
        if missing:
            raise ValueError(f"{key} names arms that are not defined: {missing}")
        if not str(ab.get("claim") or "").strip():
            raise ValueError(f"{key}.claim is missing: the sentence the report judges")
        if ab.get("expected") not in ("<", ">"):
            raise ValueError(f"{key}.expected must be '<' or '>', got {ab.get('expected')!r}")
        measure = ab.get("measure", "final")
        if measure not in ABLATION_MEASURES:
            raise ValueError(f"{key}.measure must be one of {ABLATION_MEASURES}, got {measure!r}")
        if measure == "over_updates" and every is None:
            raise ValueError(f"{key}.measure over_updates needs periodic_eval.every")
    alignment = raw.get("alignment")
    return Study(
        name=str(raw.get("name") or path.stem),
        root=root,
        results_dir=root / raw.get("results_dir", f"results/{path.stem}"),
        work_dir=root / raw.get("work_dir", f"logs/study/{path.stem}"),
        train_overrides=tuple(raw.get("train_overrides", [])),
        eval_overrides=tuple(raw.get("eval_overrides", [])),
        alignment_args=None if alignment is None else tuple(alignment.get("args", [])),
        updates=updates,
        threads=int(raw.get("threads", 1)),
        arms=arms,
        replicate_seeds=tuple(int(s) for s in replicate.get("seeds", [])),
        replicate_arms=replicate_arms,
        select_by=str(raw.get("select_by", "heldout/avg@4")),
        report=dict(raw.get("report") or {}),
        periodic_every=None if every is None else int(every),
        periodic_overrides=tuple(periodic.get("overrides", [])),
    )


def first_runs(study: Study) -> list[Run]:
    """The runs known before any result: the base evaluation, then every arm's own seeds (seed by
    seed, so an interrupted study has one seed of every arm before a second of any)."""
    runs = [Run("base", 0)]
    for seed in sorted({s for a in study.arms.values() for s in a.seeds}):
        runs += [Run(a.name, seed) for a in study.arms.values() if seed in a.seeds]
    return runs
