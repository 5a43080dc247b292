"""The reproduction study's machinery: statistics, the study file, the resumable runner, the
report. The end-to-end test runs configs/study/tiny.yaml (tiny random model) in a temporary folder."""

from __future__ import annotations

import json
import subprocess
import time
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

import prerl.study.runner as runner_lib
from prerl.study.report import Report
from prerl.study.results import RunResult, load_run
from prerl.study.runner import _Committer, planned_runs, replicate_runs, run_one, train_command
from prerl.study.spec import Run, load_study
from prerl.study.stats import (
    align_problems,
    bootstrap_ci,
    moving_average,
    paired_bootstrap_ci,
    per_problem_accuracy,
    steps_to_threshold,
    two_level_bootstrap_ci,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study" / "tiny.yaml"


# ----------------------------------------------------------------------------------- statistics
def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    m, lo, hi = bootstrap_ci(small, 500)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(large, 500)
    assert hi2 - lo2 < (hi - lo) / 4
    assert bootstrap_ci(small, 300, seed=3) == bootstrap_ci(small, 300, seed=3)  # reproducible


def test_paired_bootstrap_sees_a_shift_the_unpaired_noise_would_hide():
    rng = np.random.default_rng(1)
    a = rng.random(200)
    b = a - 0.02  # the same problems, every one 0.02 easier for a
    d, lo, hi = paired_bootstrap_ci(a, b, 500)
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    assert verdict(lo, hi, ">") == "held" and verdict(lo, hi, "<") == "did not hold"
    assert verdict(-0.1, 0.1, ">") == "inconclusive"
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_ci(a, b[:-1])


def test_two_level_bootstrap_is_the_paired_one_for_one_seed_and_widens_with_seed_spread():
    rng = np.random.default_rng(2)
    a, b = rng.random(100), rng.random(100)
    assert two_level_bootstrap_ci(a[None], b[None], 500) == pytest.approx(paired_bootstrap_ci(a, b, 500), abs=1e-12)
    # three seeds of arm a that disagree by +-0.15 overall: the seed means' difference is the same,
    # but the interval must now hold the training spread the problems-only interval cannot see
    seeds = np.stack([a - 0.15, a, a + 0.15])
    d, lo, hi = two_level_bootstrap_ci(seeds, b[None], 500)
    d0, lo0, hi0 = paired_bootstrap_ci(seeds.mean(axis=0), b, 500)
    assert d == pytest.approx(d0) and hi - lo > 1.5 * (hi0 - lo0)
    with pytest.raises(ValueError, match="same, non-empty problems"):
        two_level_bootstrap_ci(seeds, b[None, :-1])


def test_align_problems_keeps_the_common_problems_in_one_order():
    ids, m = align_problems([(["a", "b", "c"], np.array([1.0, 2.0, 3.0])), (["c", "a"], np.array([30.0, 10.0]))])
    assert ids == ["a", "c"]
    np.testing.assert_array_equal(m, [[1.0, 3.0], [10.0, 30.0]])


def test_steps_to_threshold_needs_a_full_window_and_reports_the_first_crossing():
    steps = np.arange(1, 9)
    values = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(moving_average(values, 2), [1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    assert steps_to_threshold(steps, values, 0.9, window=1) == 1
    assert steps_to_threshold(steps, values, 0.9, window=2) == 6  # step 1 alone is not a window of 2
    assert steps_to_threshold(steps, values, 1.1, window=2) is None


def test_entropy_curve_is_the_space_updated_and_leaves_out_steps_without_signal():
    nan = float("nan")
    run = RunResult("dsrl-seed0", "dsrl", 0, {}, {}, curves={
        "train/entropy/marginal": {0: 2.0, 1: 0.0, 2: 1.8, 3: nan},  # step 1: nothing scored (no signal)
        "train/entropy/conditional": {3: 0.9},                        # the switch: phase 2 from step 3
        "train/no_signal_batches": {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0},
    })
    steps, values = Report._entropy(run)
    assert steps.tolist() == [0, 2, 3] and values.tolist() == [2.0, 1.8, 0.9]


# ----------------------------------------------------------------------------------- study file
def _write(tmp_path: Path, **changes) -> Path:
    raw = OmegaConf.to_container(OmegaConf.load(STUDY))
    raw.update(results_dir=str(tmp_path / "results"), work_dir=str(tmp_path / "work"))
    raw["report"].update(output=str(tmp_path / "report.md"), figures=str(tmp_path / "figures"))
    raw.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(OmegaConf.to_yaml(raw))
    return path


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown keys"),
    ({"updates": 0}, "updates must be >= 1"),
    ({"arms": {"grpo": {"role": "winner", "overrides": []}}}, "role must be one of"),
    ({"arms": {"dsrl": {"role": "dsrl", "overrides": []}}}, "role grpo"),
    ({"replicate": {"seeds": [1], "arms": ["best:grpo,nope"]}}, "unknown arms"),
    ({"periodic_eval": {"every": 2}}, r"periodic_eval.every must be in \[1, updates = 2\)"),
    ({"report": {"ablations": [{"arm": "nope", "against": "grpo", "expected": "<", "claim": "c"}]}},
     r"report.ablations\[0\] names arms that are not defined: \['nope'\]"),
    ({"report": {"ablations": [{"arm": "grpo", "against": "grpo", "expected": "lower", "claim": "c"}]}},
     r"report.ablations\[0\].expected must be"),
    ({"report": {"ablations": [{"arm": "grpo", "against": "grpo", "expected": "<", "claim": "c", "measure": "auc"}]}},
     r"report.ablations\[0\].measure must be one of \('final', 'over_updates'\)"),
    ({"periodic_eval": None, "report": {"ablations": [{"arm": "grpo", "against": "grpo", "expected": "<", "claim": "c",
                                                       "measure": "over_updates"}]}}, "needs periodic_eval.every"),
])
def test_bad_study_files_fail_when_read_naming_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_study(_write(tmp_path, **change), ROOT)


def test_periodic_steps_leave_out_the_final_evaluation(tmp_path):
    assert load_study(_write(tmp_path), ROOT).periodic_steps == [1]  # tiny: 2 updates, the final is step 2
    study = load_study(_write(tmp_path, updates=150, periodic_eval={"every": 25}), ROOT)
    assert study.periodic_steps == [25, 50, 75, 100, 125]
    assert load_study(_write(tmp_path, periodic_eval=None), ROOT).periodic_steps == []


def test_long_study_plans_every_verdict_on_two_seeds_with_periodic_evaluation():
    study = load_study(ROOT / "configs" / "study" / "long.yaml", ROOT)
    assert study.updates == 150 and study.periodic_steps == [25, 50, 75, 100, 125]
    assert all(len(arm.seeds) >= 2 for arm in study.arms.values())
    planned = [r.id for r in planned_runs(study)]
    assert len(planned) == 1 + sum(len(arm.seeds) for arm in study.arms.values())
    assert planned.index("nsr_prerl_fixed-seed0") < planned.index("grpo-seed1")  # one seed of every arm first
    for ablation in study.report["ablations"]:
        assert {ablation["arm"], ablation["against"]} <= set(study.arms)


def test_results_reader_gives_renamed_metrics_their_current_names(tmp_path):
    folder = tmp_path / "nsr_prerl-seed0"
    (folder / "eval" / "problems").mkdir(parents=True)
    (folder / "eval" / "summary.json").write_text("{}")
    (folder / "done.json").write_text(json.dumps({"run": folder.name, "arm": "nsr_prerl", "seed": 0}))
    (folder / "curves.json").write_text(json.dumps({  # as logged before the renames
        "train/entropy_marginal": {"0": 2.5}, "behaviour/correct/reflection": {"0": 1.0},
        "train/rollout_entropy/conditional": {"0": 1.5}, "train/entropy/marginal": {"0": 2.0}}))
    assert load_run(folder).curves == {
        "train/rollout_entropy/marginal": {0: 2.5}, "z_behaviour/correct/reflection": {0: 1.0},
        "train/rollout_entropy/conditional": {0: 1.5}, "train/entropy/marginal": {0: 2.0}}  # the update's: kept
    committed = load_run(ROOT / "results" / "miniature" / "nsr_prerl-seed0")  # logged behaviour/*
    assert "z_behaviour/reflection" in committed.curves and not any(k.startswith("behaviour/") for k in committed.curves)


def test_a_curve_skips_the_updates_that_logged_nan(tmp_path):
    """The cross-space diagnostics are logged every k updates and NaN in between: a curve is the
    measured points only, so trailing means over updates are numbers (they were NaN: blank plots)."""
    folder = tmp_path / "grpo-seed0"
    (folder / "eval" / "problems").mkdir(parents=True)
    (folder / "eval" / "summary.json").write_text("{}")
    (folder / "done.json").write_text(json.dumps({"run": folder.name, "arm": "grpo", "seed": 0}))
    gap = {str(s): (0.1 * s if s % 5 == 0 else float("nan")) for s in range(12)}
    (folder / "curves.json").write_text(json.dumps({"train/logprob_gap": gap}))
    steps, values = load_run(folder).curve("train/logprob_gap")
    assert steps.tolist() == [0, 5, 10] and np.allclose(values, [0.0, 0.5, 1.0])


def _evaluated(run_id: str, correct: np.ndarray, periodic: dict[int, np.ndarray] | None = None) -> RunResult:
    """A run whose held-out evaluation has these (problems, samples) right answers."""
    def result(c: np.ndarray) -> RunResult:
        problems = [{"id": f"p{i}", "index": i, "correct": row.tolist(), "lengths": [10] * len(row),
                     "truncated": [False] * len(row), "behaviours": []} for i, row in enumerate(c)]
        summary = {"sampling": {"samples": c.shape[1]},
                   "datasets": {"heldout": {"metrics": {f"avg@{c.shape[1]}": float(c.mean())}, "pass_at_k": {}}}}
        arm, _, seed = run_id.partition("-seed")
        return RunResult(run_id, arm, int(seed or 0), summary, {"heldout": problems})
    run = result(correct)
    run.periodic = {step: result(c) for step, c in (periodic or {}).items()}
    return run


def test_collapse_step_is_the_first_evaluation_clearly_below_the_base_and_the_order_follows(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((48, 4)) < 0.5
    dip = base.copy()
    dip[:2] = False  # two problems fewer right: below the base, but within the noise
    wrong = np.zeros_like(base)
    arms = {"grpo": {"role": "grpo", "overrides": [], "seeds": [0]},
            "psr_prerl": {"role": "prerl_variant", "overrides": [], "seeds": [0, 1]},
            "nsr_prerl": {"role": "prerl_variant", "overrides": [], "seeds": [0, 1]},
            "ablated": {"role": "prerl_variant", "overrides": [], "seeds": [0]}}
    study = load_study(_write(tmp_path, updates=3, periodic_eval={"every": 1}, arms=arms, replicate=None), ROOT)
    study.report["ablations"] = [{"arm": "ablated", "against": "nsr_prerl", "expected": "<", "claim": "Ablation ends lower"}]
    runs = [_evaluated("base", base), _evaluated("grpo-seed0", base, {1: base, 2: base})]
    for seed in (0, 1):  # PSR-PreRL: level, then far below from update 2 on; NSR-PreRL: a dip within the noise
        runs += [_evaluated(f"psr_prerl-seed{seed}", wrong, {1: base, 2: wrong}),
                 _evaluated(f"nsr_prerl-seed{seed}", base, {1: dip, 2: base})]
    runs.append(_evaluated("ablated-seed0", wrong, {1: wrong, 2: wrong}))
    report = Report(study, {r.run_id: r for r in runs}, planned_runs(study), None)
    assert report.eval_steps == [1, 2, 3]
    psr = report.collapse(report.arms["psr_prerl"])
    assert psr["step"] == 2 and psr["seeds"] == [2, 2] and [row[1] for row in psr["rows"]] == [2, 2, 2]
    nsr = report.collapse(report.arms["nsr_prerl"])
    assert nsr["step"] is None and nsr["rows"][0][2] < 0 <= nsr["rows"][0][4]  # below, but 0 not excluded
    claims = {c["claim"].split(" (")[0]: c for c in report.collapse_claims()}
    assert claims["psr_prerl falls below the base model within 3 updates"]["verdict"] == "held"
    assert claims["nsr_prerl falls below the base model within 3 updates"]["verdict"] == "inconclusive"
    assert claims["ablated falls below the base model within 3 updates"]["verdict"] == "held (1 seed)"
    order = claims["PSR-PreRL falls below the base model before NSR-PreRL"]
    assert order["verdict"] == "held" and "first: psr_prerl" in order["measured"] and "at update 2" in order["uncertainty"]
    ablation = claims["Ablation ends lower"]
    assert ablation["verdict"] == "held (1 seed)" and "collapse steps ablated 1, nsr_prerl never" in ablation["measured"]
    tables = "\n".join(report.periodic_tables())
    assert f"| psr_prerl | 0,1 | {base.mean():.3f} (" in tables and "| 2 | [2, 2] |" in tables
    # a verdict waits for a second seed where the study plans several
    del report.results["psr_prerl-seed1"]
    report = Report(study, report.results, planned_runs(study), None)
    claims = {c["claim"].split(" (")[0]: c for c in report.collapse_claims()}
    assert claims["psr_prerl falls below the base model within 3 updates"]["verdict"] == "pending (1 of 2 seeds finished)"
    # before any pre-train-space arm has finished: a sentence, not an empty table
    report = Report(study, {r.run_id: r for r in runs[:2]}, planned_runs(study), None)
    tables = report.periodic_tables()
    assert tables[-1] == "No pre-train-space arm has finished yet: no collapse step to report."
    assert not any(line.startswith("| arm | seeds | minus base") for line in tables)


def test_steps_to_a_training_accuracy_wait_for_the_planned_seeds_then_compare_their_ranges(tmp_path):
    """'DSRL reaches accuracy t in fewer steps': pending while an arm planned with two seeds has one
    (it said 'inconclusive', unlike every other claim), held once both seeds' steps are apart."""
    arms = {"grpo": {"role": "grpo", "overrides": [], "seeds": [0, 1]},
            "dsrl_s1": {"role": "dsrl", "overrides": [], "seeds": [0, 1]}}
    report = {**OmegaConf.to_container(OmegaConf.load(STUDY))["report"], "ablations": []}  # window 1, threshold 0.5
    study = load_study(_write(tmp_path, updates=6, arms=arms, replicate=None, report=report), ROOT)
    correct = np.ones((8, 2), dtype=bool)  # the tiny study's 2 samples per problem
    runs = {}
    for arm, reached in (("grpo", 5), ("dsrl_s1", 2)):  # the first update whose accuracy is >= 0.5
        for seed in (0, 1):
            run = _evaluated(f"{arm}-seed{seed}", correct)
            run.curves = {"train/accuracy": {s: float(s >= reached + seed) for s in range(1, 7)}}
            runs[run.run_id] = run

    def verdict(results: dict) -> dict:
        report = Report(study, results, planned_runs(study), None)
        return next(c for c in report.claims() if c["claim"].startswith("DSRL reaches training accuracy 0.5"))

    first_seeds = {k: v for k, v in runs.items() if k.endswith("seed0")}
    assert verdict(first_seeds)["verdict"] == "pending (1 of 2 seeds finished)"
    both = verdict(runs)
    assert both["verdict"] == "held" and "dsrl_s1 [2, 3], grpo [5, 6]" in both["measured"]


def test_an_ablation_over_updates_sees_an_earlier_fall_that_the_final_evaluation_cannot(tmp_path):
    """Both arms end at 0 (the floor): measured at the last update the ablation is inconclusive;
    averaged over every evaluation, the arm that fell at update 1 instead of 3 is lower (held). A
    run without its periodic evaluations leaves the row pending instead of averaging fewer points."""
    rng = np.random.default_rng(1)
    base = rng.random((48, 4)) < 0.6
    wrong = np.zeros_like(base)
    arms = {"grpo": {"role": "grpo", "overrides": [], "seeds": [0]},
            "slow": {"role": "prerl_variant", "overrides": [], "seeds": [0, 1]},
            "fast": {"role": "prerl_variant", "overrides": [], "seeds": [0, 1]}}
    ablation = {"arm": "fast", "against": "slow", "expected": "<", "claim": "Ablation falls earlier"}
    runs = {"base": _evaluated("base", base), "grpo-seed0": _evaluated("grpo-seed0", base, {1: base, 2: base})}
    for seed in (0, 1):
        for run in (_evaluated(f"slow-seed{seed}", wrong, {1: base, 2: base}), _evaluated(f"fast-seed{seed}", wrong, {1: wrong, 2: wrong})):
            runs[run.run_id] = run

    def row(measure: str, results: dict) -> dict:
        study = load_study(_write(tmp_path, updates=3, periodic_eval={"every": 1}, arms=arms, replicate=None,
                                  report={**OmegaConf.to_container(OmegaConf.load(STUDY))["report"],
                                          "ablations": [{**ablation, "measure": measure}]}), ROOT)
        report = Report(study, results, planned_runs(study), None)
        return next(c for c in report.collapse_claims() if c["claim"] == "Ablation falls earlier")

    final = row("final", runs)
    assert final["verdict"] == "inconclusive" and "at update 3: fast minus slow = +0.000" in final["measured"]
    over = row("over_updates", runs)
    assert over["verdict"] == "held" and "averaged over the evaluations after 1, 2, 3 updates" in over["measured"]
    d = float(over["measured"].split("fast minus slow = ")[1].split(";")[0])
    assert d == pytest.approx(-2 / 3 * per_problem_accuracy(base).mean(), abs=5e-4)  # two of three evaluations at base level
    runs["fast-seed1"].periodic.pop(2)
    assert row("over_updates", runs)["verdict"] == "pending"


def test_plan_is_base_then_seed_by_seed_and_best_arm_waits_for_results(tmp_path):
    study = load_study(_write(tmp_path), ROOT)
    assert [r.id for r in planned_runs(study)] == ["base", "grpo-seed0", "dsrl_s1-seed0", "nsr_prerl-seed0"]
    assert replicate_runs(study) == ([], ["best:dsrl_s1"])


def test_stop_by_starts_only_runs_expected_to_end_in_time(tmp_path, monkeypatch):
    """With --stop-by, a pending run starts only if this study's finished runs (its arm's, else the
    longest of any arm) say it ends in time: after a 5000 s run, an arm known to take 100 s starts,
    an arm never run does not; with room for everything it starts too."""
    study = load_study(_write(tmp_path), ROOT)
    long_arm, short_arm, unknown_arm = study.arms  # grpo, dsrl_s1, nsr_prerl
    started = []

    def finished(run, seconds):
        dest = study.results_dir / run.id
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "done.json").write_text(json.dumps({"run": run.id, "arm": run.arm, "seed": run.seed,
                                                    "seconds": {"train_stage": seconds, "eval_stage": 0.0}}))
        return dest

    def fake_run_one(study, run, keep_checkpoints=False):  # as run_one: a finished run returns at once
        if (study.results_dir / run.id / "done.json").exists():
            return study.results_dir / run.id
        started.append(run.id)
        return finished(run, 100.0 if run.arm == short_arm else 5000.0)

    monkeypatch.setattr(runner_lib, "run_one", fake_run_one)
    monkeypatch.setattr(runner_lib, "alignment", lambda study: None)
    finished(Run(short_arm, 7), 100.0)  # an earlier session's run of the short arm
    outcomes = runner_lib.run_study(study, jobs=1, stop_by=time.time() + 600)
    assert started == ["base", f"{long_arm}-seed0", f"{short_arm}-seed0"]
    assert outcomes[f"{unknown_arm}-seed0"].startswith("not started: expected to take 83 min")
    assert "min left before --stop-by" in outcomes[f"{unknown_arm}-seed0"]
    assert runner_lib.expected_seconds(study, Run(short_arm, 1)) == 100.0
    started.clear()
    runner_lib.run_study(study, jobs=1, stop_by=time.time() + 10_000)  # room for everything
    assert started == [f"{unknown_arm}-seed0"]


def test_a_malformed_stop_by_is_refused(tmp_path):
    proc = _study("run", str(_write(tmp_path)), "--stop-by", "25:99")
    assert proc.returncode == 2 and "--stop-by takes a local time HH:MM, got '25:99'" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_committer_commits_new_results_once_and_a_skipped_run_costs_nothing(tmp_path, caplog):
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "root")
    (tmp_path / "other.txt").write_text("a person's unstaged edit\n")
    run_dir = tmp_path / "results" / "grpo-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "done.json").write_text("{}")
    commit = _Committer(SimpleNamespace(root=tmp_path), enabled=True)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    retries = []
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(runner_lib.time, "sleep", retries.append)  # a failed commit waits before its retry
        commit([run_dir], "grpo-seed0 done")
        assert git("log", "--format=%s").split("\n")[0] == "grpo-seed0 done"
        assert git("show", "--name-only", "--format=").split() == ["results/grpo-seed0/done.json"]
        commit([run_dir], "grpo-seed0 done again")  # a run skipped as done: nothing to commit, no retries
    assert retries == []
    assert git("log", "--format=%s").split("\n")[0] == "grpo-seed0 done"
    assert "could not commit" not in caplog.text
    assert "other.txt" in git("status", "--short")  # the person's file was left alone


# ----------------------------------------------------------------------------------- end to end
def _study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_a_vllm_study_without_vllm_is_refused_before_any_run(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    raw = OmegaConf.to_container(OmegaConf.load(STUDY))
    path = _write(tmp_path, train_overrides=[*raw["train_overrides"], "module.rollout.engine=vllm"])
    proc = _study("run", str(path))
    assert proc.returncode == 2 and "samples with vLLM" in proc.stderr and ".venv-vllm/bin/python" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_tiny_study_runs_resumes_and_reports(tmp_path):
    path = _write(tmp_path)
    study = load_study(path, ROOT)
    nothing = _study("report", str(path))
    assert nothing.returncode == 0 and "nothing has run yet" in nothing.stdout and not (tmp_path / "report.md").exists()

    # a pre-empted training attempt (checkpoint after 1 of 2 updates) is continued, not restarted
    pre = Run("grpo", 0)
    attempt = study.work_dir / pre.id / "train-1"
    first = subprocess.run(train_command(study, pre, attempt, None) + ["trainer.max_steps=1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((attempt / "summary.json").read_text())
    (attempt / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))

    ran = _study("run", str(path), "--jobs", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    results = study.results_dir
    for run_id in ("base", "grpo-seed0", "dsrl_s1-seed0", "nsr_prerl-seed0", "dsrl_s1-seed1"):
        assert (results / run_id / "done.json").exists(), run_id
    continued = json.loads((study.work_dir / "grpo-seed0" / "train-2" / "summary.json").read_text())
    assert continued["status"] == "completed" and continued["global_step"] == 2
    curves = json.loads((results / "grpo-seed0" / "curves.json").read_text())
    assert sorted(int(s) for s in curves["train/accuracy"]) == [0, 1]  # step 0 from the first attempt
    dsrl = json.loads((results / "dsrl_s1-seed0" / "curves.json").read_text())
    assert [dsrl["train/phase"][s] for s in sorted(dsrl["train/phase"], key=int)] == [1.0, 2.0]  # S = 1
    assert not any((study.work_dir / "grpo-seed0").glob("train-*/*checkpoints/*.ckpt"))  # dropped once evaluated
    assert (results / "analysis" / "alignment" / "alignment.json").exists()
    # the policy after update 1 of 2 evaluated too; grpo's from the attempt that made that update
    for run_id in ("grpo-seed0", "dsrl_s1-seed0", "nsr_prerl-seed0", "dsrl_s1-seed1"):
        assert [p.name for p in (results / run_id / "periodic").iterdir()] == ["step00001"], run_id
        assert (results / run_id / "periodic" / "step00001" / "problems" / "heldout.jsonl").exists()
    assert not (results / "base" / "periodic").exists()
    step1 = json.loads((results / "grpo-seed0" / "periodic" / "step00001" / "summary.json").read_text())
    assert "train-1/periodic_checkpoints/step00001.ckpt" in step1["ckpt_path"]

    stamp = (results / "base" / "done.json").stat().st_mtime
    again = _study("run", str(path))
    assert again.returncode == 0 and (results / "base" / "done.json").stat().st_mtime == stamp
    assert "dsrl_s1-seed1: done" in again.stdout  # nothing left to do: every run reported done

    reported = _study("report", str(path))
    assert reported.returncode == 0, reported.stderr[-3000:]
    doc = (tmp_path / "report.md").read_text()
    assert "## The paper's claims at this scale" in doc and "**pending**" in doc  # e.g. no control arm
    base_eval = json.loads((results / "base" / "eval" / "summary.json").read_text())
    avg = base_eval["datasets"]["heldout"]["metrics"]["avg@2"]
    assert f"| base | - | {avg:.3f} [" in doc  # the table is computed from the results
    for png in ("accuracy.png", "length.png", "entropy.png", "pass_at_k.png", "behaviours.png",
                "heldout_over_updates.png", "collapse_curves.png"):
        assert (tmp_path / "figures" / png).stat().st_size > 0
    # the curve over updates and the collapse step, computed from the periodic evaluations
    nsr1 = json.loads((results / "nsr_prerl-seed0" / "periodic" / "step00001" / "summary.json").read_text())
    assert f"| nsr_prerl | 0 | {nsr1['datasets']['heldout']['metrics']['avg@2']:.3f} | " in doc
    collapse = next(line for line in doc.splitlines() if line.startswith("| nsr_prerl falls below the base model"))
    assert collapse.endswith(("**held (1 seed)** |", "**did not hold (1 seed)** |", "**inconclusive** |"))
    assert "| Machinery check: nsr_prerl ends below grpo |" in doc
    status = _study("status", str(path))
    assert "nsr_prerl-seed0" in status.stdout and "pending" not in status.stdout

    (study.work_dir / "STOP").touch()  # with the stop file no run starts: the new seed stays pending
    more = _write(tmp_path, replicate={"seeds": [1, 2], "arms": ["best:dsrl_s1"]})
    stopped = _study("run", str(more))
    assert stopped.returncode == 0 and not (results / "dsrl_s1-seed2").exists()


def test_run_one_names_the_log_when_training_fails(tmp_path):
    study = load_study(_write(tmp_path, train_overrides=["experiment=smoke", "module.rollout.temperature=-1"]), ROOT)
    with pytest.raises(RuntimeError, match="train.out"):
        run_one(study, Run("grpo", 0))


def test_a_run_stopped_for_lack_of_signal_names_the_setting_that_lets_it_finish(tmp_path):
    # reward p=0: every group all-wrong, GRPO has no signal; the limit of 2 stops the run at step 2.
    overrides = ["experiment=smoke", "reward=random", "reward.p=0", "module.max_consecutive_no_signal=2"]
    study = load_study(_write(tmp_path, train_overrides=overrides), ROOT)
    with pytest.raises(RuntimeError, match=r"collapsed arm.*module\.max_consecutive_no_signal=null"):
        run_one(study, Run("grpo", 0))
    study = load_study(_write(tmp_path, train_overrides=[*overrides[:-1], "module.max_consecutive_no_signal=null"]),
                       ROOT)
    run_one(study, Run("grpo", 0))  # the same arm with the null limit trains to N (and is evaluated)


def test_committed_reproduction_report_is_generated_from_the_committed_results(tmp_path):
    """docs/reproduction.md is exactly what `scripts/study.py report` writes from results/miniature
    (apart from the generation date): no number in it was typed in or left stale."""
    committed = ROOT / "docs" / "reproduction.md"
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "study" / "miniature.yaml"))
    raw["report"].update(output=str(tmp_path / "docs" / "reproduction.md"), figures=str(tmp_path / "docs" / "reproduction"))
    path = tmp_path / "miniature.yaml"
    path.write_text(OmegaConf.to_yaml(raw))
    reported = _study("report", str(path))
    assert reported.returncode == 0, reported.stderr[-3000:]
    undated = lambda text: [line for line in text.splitlines() if not line.startswith("Generated by")]  # noqa: E731
    assert undated((tmp_path / "docs" / "reproduction.md").read_text()) == undated(committed.read_text())
    for png in ("accuracy.png", "pass_at_k.png", "behaviours.png"):
        assert (ROOT / "docs" / "reproduction" / png).exists(), png
