"""Run a study: every (arm, seed) trained, evaluated and collected in subprocesses, resumably.

A run's stages, each skipped when its result exists (so the runner can be stopped at any point
and started again, across days):

1. train: ``src/train.py`` in ``<work_dir>/<run>/train-<k>``; an attempt that stopped with a
   checkpoint (pre-empted, interrupted, killed) is continued by the next attempt with
   ``ckpt_path=<that folder>``, one without starts over;
2. evaluate the final checkpoint: ``src/eval.py`` in ``<work_dir>/<run>/eval`` (``resume_from``
   when an evaluation was cut off); with ``periodic_eval`` also the weights-only checkpoint saved
   after every k updates, in ``<work_dir>/<run>/eval-step<k>``, the same way;
3. collect: the training summary, every logged scalar curve (from TensorBoard) and the
   evaluations' summaries and per-problem records into ``<results_dir>/<run>/`` (``periodic/
   step<k>/`` for the periodic ones), then ``done.json``; the run's checkpoints are deleted
   (``keep_checkpoints`` keeps them); with ``commit`` the run's results are committed to git at once.

Periodic evaluation evaluates checkpoints after training rather than validating inside it:
in-training validation logs only the mean over problems, while the collapse step of the report
needs per-problem records of the same held-out problems, samples and seeds as the base model's
evaluation (a paired interval); the sampling work is the same either way.

The base model's evaluation (run ``base``) and the alignment probe (``analysis/alignment``) run
first. Creating ``<work_dir>/STOP`` lets the runs under way finish and starts no new one (the
next start continues; delete the file first). ``replicate`` runs (extra seeds; ``best:a,b,c`` is
decided by the held-out score of those arms' first seed) are added as soon as they can be decided.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from prerl.atomic_files import write_text_atomic
from prerl.study.results import eval_metric, load_curves
from prerl.study.spec import BEST_PREFIX, Run, Study, first_runs

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A subprocess of a run failed; its log is named."""


def _env(study: Study) -> dict[str, str]:
    threads = str(study.threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _call(cmd: list[str], log_file: Path, study: Study) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.call(cmd, cwd=study.root, env=_env(study), stdout=out, stderr=subprocess.STDOUT)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


PERIODIC_DIR = "periodic_checkpoints"  # beside checkpoints/: a resume (which reads checkpoints/) never takes these


def _attempts(folder: Path) -> list[Path]:
    """A run's training attempts train-1, train-2, ... in order."""
    return sorted(folder.glob("train-*"), key=lambda p: int(p.name.split("-")[1]))


def _step_name(step: int) -> str:
    return f"step{step:05d}"


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("*.ckpt"))


# ------------------------------------------------------------------------------------------ stages
def train_command(study: Study, run: Run, out: Path, resume: Path | None) -> list[str]:
    arm = study.arms[run.arm]
    cmd = [sys.executable, "src/train.py", *study.train_overrides, *arm.overrides, f"seed={run.seed}",
           f"trainer.max_steps={study.updates}", "validate_before=false", "validate_after=false",
           f"task_name=study_{study.name}", f"tags=[study_{study.name},{run.arm}]", f"hydra.run.dir={out}"]
    if study.periodic_every:  # weights only: a policy to evaluate, a third of a resumable checkpoint's size
        key = "+callbacks.periodic_checkpoint"
        cmd += [f"{key}._target_=lightning.pytorch.callbacks.ModelCheckpoint", f"{key}.dirpath={out / PERIODIC_DIR}",
                f"{key}.filename='step{{step:05d}}'", f"{key}.auto_insert_metric_name=false",
                f"{key}.every_n_train_steps={study.periodic_every}", f"{key}.save_top_k=-1",
                f"{key}.save_weights_only=true"]
    return cmd + ([f"ckpt_path={resume}"] if resume else [])


def _train(study: Study, run: Run) -> Path:
    """The folder of the run's completed training (trains or continues it first)."""
    folder = study.work_dir / run.id
    attempts = _attempts(folder)
    for attempt in attempts:
        if (_json(attempt / "summary.json") or {}).get("status") == "completed":
            return attempt
    resume = next((a for a in reversed(attempts) if _has_checkpoint(a)), None)
    out = folder / f"train-{len(attempts) + 1}"
    log.info("%s: training in %s%s", run.id, out, f" (continuing {resume})" if resume else "")
    code = _call(train_command(study, run, out, resume), folder / "train.out", study)
    summary = _json(out / "summary.json") or {}
    if code != 0 or summary.get("status") != "completed":
        raise StageFailed(f"{run.id}: training ended with exit code {code}, status {summary.get('status')}; "
                          f"see {folder / 'train.out'} ({_next_start(summary)})")
    return out


def _next_start(summary: dict) -> str:
    """What starting the study again does for a run whose training stopped with this summary."""
    if str(summary.get("error", "")).startswith("NoLearningSignalError"):
        # The count of batches without signal is checkpointed: a restart stops again at the next one.
        return ("a collapsed arm: the next start stops again at once; to train it to the planned update, add "
                "module.max_consecutive_no_signal=null to the study's train_overrides and start again")
    return "the next start continues it"


def eval_command(study: Study, ckpt: Path | None, out: Path, resume: bool, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "src/eval.py", *study.eval_overrides, *extra, f"hydra.run.dir={out}"]
    cmd += [f"ckpt_path={ckpt}"] if ckpt else []
    return cmd + ([f"resume_from={out}"] if resume else [])


def _evaluate(study: Study, run: Run, ckpt: Path | None, name: str = "eval", extra: tuple[str, ...] = ()) -> Path:
    """The folder ``<work_dir>/<run>/<name>`` of the completed evaluation of ``ckpt`` (None: the
    base model), evaluating it first or continuing a cut-off one."""
    out = study.work_dir / run.id / name
    if (_json(out / "summary.json") or {}).get("status") == "completed":
        return out
    resume = (out / "eval_settings.json").exists()
    log.info("%s: evaluating %s%s", run.id, ckpt or "the base model", " (resumed)" if resume else "")
    log_file = study.work_dir / run.id / f"{name}.out"
    code = _call(eval_command(study, ckpt, out, resume, extra), log_file, study)
    if code != 0 or (_json(out / "summary.json") or {}).get("status") != "completed":
        raise StageFailed(f"{run.id}: evaluation ended with exit code {code}; see {log_file}")
    return out


def _periodic_checkpoint(study: Study, run: Run, step: int) -> Path:
    """The weights after ``step`` updates; a continued run's later attempt wins (it redid the
    steps after the checkpoint it resumed from)."""
    name = f"{_step_name(step)}.ckpt"
    found = [a / PERIODIC_DIR / name for a in _attempts(study.work_dir / run.id) if (a / PERIODIC_DIR / name).exists()]
    if not found:
        raise StageFailed(f"{run.id}: no {PERIODIC_DIR}/{name} in any training attempt under "
                          f"{study.work_dir / run.id} (trained without periodic_eval?)")
    return found[-1]


def _evaluate_periodic(study: Study, run: Run) -> dict[int, Path]:
    """{step: completed evaluation folder} for the study's periodic steps."""
    extra = study.periodic_overrides
    return {step: _evaluate(study, run, _periodic_checkpoint(study, run, step), f"eval-{_step_name(step)}", extra)
            for step in study.periodic_steps}


def _copy_eval(evaluated: Path, dest: Path) -> None:
    (dest / "problems").mkdir(parents=True)
    shutil.copy(evaluated / "summary.json", dest / "summary.json")
    for f in (evaluated / "problems").glob("*.jsonl"):
        shutil.copy(f, dest / "problems" / f.name)


def _collect(study: Study, run: Run, trained: Path | None, evaluated: Path, periodic: dict[int, Path],
             seconds: dict) -> Path:
    dest = study.results_dir / run.id
    if dest.exists():
        shutil.rmtree(dest)
    _copy_eval(evaluated, dest / "eval")
    for step, folder in periodic.items():
        _copy_eval(folder, dest / "periodic" / _step_name(step))
    if trained is not None:
        shutil.copy(trained / "summary.json", dest / "train_summary.json")
        curves: dict[str, dict[int, float]] = {}
        for attempt in _attempts(trained.parent):  # a continued run's later attempt wins on the steps it redid
            for key, points in load_curves(attempt).items():
                curves.setdefault(key, {}).update(points)
        write_text_atomic(dest / "curves.json", json.dumps({k: {str(s): v for s, v in sorted(p.items())}
                                                             for k, p in sorted(curves.items())}))
    done = {"run": run.id, "arm": run.arm, "seed": run.seed, "seconds": seconds,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(dest / "done.json", json.dumps(done, indent=2))  # written last: the run is collected
    return dest


def _drop_checkpoints(study: Study, run: Run) -> None:
    for attempt in (study.work_dir / run.id).glob("train-*"):
        shutil.rmtree(attempt / "checkpoints", ignore_errors=True)
        shutil.rmtree(attempt / PERIODIC_DIR, ignore_errors=True)


def alignment(study: Study) -> Path | None:
    """The alignment probe of the base model on the study's training task (once)."""
    if study.alignment_args is None:
        return None
    dest = study.results_dir / "analysis" / "alignment"
    if (dest / "alignment.json").exists():
        return dest
    work = study.work_dir / "alignment"
    cmd = [sys.executable, "scripts/alignment_probe.py", *study.train_overrides, *study.alignment_args,
           "--out", str(work), "--threads", str(study.threads)]
    log.info("alignment probe of the base model in %s", work)
    code = _call(cmd, study.work_dir / "alignment.out", study)
    if code != 0 or not (work / "alignment.json").exists():
        raise StageFailed(f"alignment probe exited {code}; see {study.work_dir / 'alignment.out'}")
    dest.mkdir(parents=True, exist_ok=True)
    for f in list(work.glob("*.json")) + list(work.glob("*.png")):
        shutil.copy(f, dest / f.name)
    return dest


def run_one(study: Study, run: Run, keep_checkpoints: bool = False) -> Path:
    """Train (unless base), evaluate and collect one run; return its results folder."""
    done = study.results_dir / run.id / "done.json"
    if done.exists():
        return done.parent
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    trained = None if run.arm == "base" else _train(study, run)
    seconds["train_stage"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluated = _evaluate(study, run, trained / "checkpoints" / "last.ckpt" if trained else None)
    seconds["eval_stage"] = time.perf_counter() - started
    periodic = {}
    if trained and study.periodic_steps:
        started = time.perf_counter()
        periodic = _evaluate_periodic(study, run)
        seconds["periodic_eval_stage"] = time.perf_counter() - started
    dest = _collect(study, run, trained, evaluated, periodic, seconds)
    if not keep_checkpoints:
        _drop_checkpoints(study, run)
    return dest


# ------------------------------------------------------------------------------------- replicates
def replicate_runs(study: Study) -> tuple[list[Run], list[str]]:
    """Extra-seed runs that can be decided now, and the entries still waiting for results."""
    runs, waiting = [], []
    for entry in study.replicate_arms:
        arm = entry
        if entry.startswith(BEST_PREFIX):
            candidates = entry[len(BEST_PREFIX):].split(",")
            scores = {}
            for name in candidates:
                seed = study.arms[name].seeds[0]
                summary = _json(study.results_dir / Run(name, seed).id / "eval" / "summary.json")
                if summary is None:
                    break
                scores[name] = eval_metric(summary, study.select_by)
            if len(scores) < len(candidates):
                waiting.append(entry)
                continue
            arm = max(scores, key=lambda n: (scores[n], -candidates.index(n)))
        runs += [Run(arm, s) for s in study.replicate_seeds if s not in study.arms[arm].seeds]
    return runs, waiting


def planned_runs(study: Study) -> list[Run]:
    """Every run known now, in the order the runner takes them, without duplicates."""
    seen, ordered = set(), []
    for run in first_runs(study) + replicate_runs(study)[0]:
        if run.id not in seen:
            seen.add(run.id)
            ordered.append(run)
    return ordered


# ------------------------------------------------------------------------------------------- driver
class _Committer:
    """Commits a finished run's results (one commit per run, serialised)."""

    def __init__(self, study: Study, enabled: bool) -> None:
        self.study, self.enabled, self.lock = study, enabled, threading.Lock()

    def __call__(self, paths: list[Path], message: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            rel = [str(p.relative_to(self.study.root)) for p in paths if p.exists()]
            for attempt in range(5):  # another git process (a person committing) may hold the index lock
                added = subprocess.call(["git", "add", "--", *rel], cwd=self.study.root)
                if added == 0 and subprocess.call(  # a run skipped as done has nothing new
                        ["git", "diff", "--cached", "--quiet", "--", *rel], cwd=self.study.root) == 0:
                    return
                committed = added == 0 and subprocess.call(
                    ["git", "commit", "-q", "-m", message, "--", *rel], cwd=self.study.root) == 0
                if committed:
                    return
                time.sleep(2 + 3 * attempt)
            log.warning("could not commit %s (left for the next commit)", rel)


def expected_seconds(study: Study, run: Run) -> float | None:
    """Wall seconds a pending run is expected to take: the mean over this study's finished runs of
    its arm (their ``done.json`` stages), else the longest finished trained run of any arm, else
    None (nothing finished yet)."""
    by_arm: dict[str, list[float]] = {}
    for done in study.results_dir.glob("*/done.json"):
        record = _json(done)
        if record and record.get("arm") != "base":
            by_arm.setdefault(record["arm"], []).append(sum(record.get("seconds", {}).values()))
    if run.arm in by_arm:
        return sum(by_arm[run.arm]) / len(by_arm[run.arm])
    return max((max(v) for v in by_arm.values()), default=None)


def run_study(study: Study, jobs: int = 1, commit: bool = False, only: set[str] | None = None,
              keep_checkpoints: bool = False, stop_by: float | None = None) -> dict[str, str]:
    """Run every planned run not yet done, ``jobs`` at a time; return {run id: outcome}.

    ``stop_by`` (a ``time.time()``): a pending run is started only if it is expected
    (:func:`expected_seconds`) to finish by then, so a session that ends then wastes no time on a
    run it would cut off; a later, shorter pending run may start instead."""
    committer = _Committer(study, commit)
    if alignment(study) is not None:
        committer([study.results_dir / "analysis"], f"study {study.name}: alignment probe of the base model")
    outcomes: dict[str, str] = {}
    submitted: set[str] = set()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict[Future, Run] = {}
        while True:
            stop = study.work_dir / "STOP"  # `touch` it: the running runs finish, no new one starts
            for run in [] if stop.exists() else planned_runs(study):
                if run.id in submitted or (only and run.arm not in only and run.arm != "base"):
                    continue
                if len(running) >= jobs:
                    break
                need = None if stop_by is None or (study.results_dir / run.id / "done.json").exists() \
                    else expected_seconds(study, run)
                if need is not None and time.time() + need > stop_by:
                    if run.id not in outcomes:
                        outcomes[run.id] = (f"not started: expected to take {need / 60:.0f} min, "
                                            f"{max(stop_by - time.time(), 0) / 60:.0f} min left before --stop-by")
                        log.info("%s: %s", run.id, outcomes[run.id])
                    continue
                outcomes.pop(run.id, None)
                submitted.add(run.id)
                running[pool.submit(run_one, study, run, keep_checkpoints)] = run
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                try:
                    dest = future.result()
                    outcomes[run.id] = "done"
                    committer([dest], f"study {study.name}: {run.id} trained and evaluated")
                except Exception as err:  # noqa: BLE001 - one failed run does not stop the others
                    outcomes[run.id] = f"failed: {err}"
                    log.error("%s", err)
    waiting = replicate_runs(study)[1]
    for entry in waiting:
        outcomes[entry] = "waiting for the first seed of its arms"
    return outcomes
