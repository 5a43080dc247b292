"""Nothing lost, nothing silent: run folders, checkpoints and summaries on every kind of stop,
settings checked before the model is built, clear errors on resume."""

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import prerl.models.tiny as tiny_lib
import prerl.train as train_lib
from helpers import SignalAt
from prerl.run_folder import run_name
from prerl.train import build, train
from test_checkpointing import _metrics, _smoke
from test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]
FAILING_REWARD = ["reward._target_=helpers.FailingRandomReward", "+reward.fail_on_call=3"]


def _same_run(full_dir, resumed_dir, steps):
    full, resumed = _metrics(full_dir), _metrics(resumed_dir)
    assert sorted(resumed) == steps
    for step in steps:
        for key in ("train/reward_mean", "train/loss", "train/response_len_mean", "train/phase", "train/grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value)


# ------------------------------------------------------------------ failures and interrupts
@pytest.mark.slow
def test_a_failing_reward_saves_the_last_update_and_the_resume_is_exact(tmp_path, caplog):
    full_dir, crashed_dir, resumed_dir = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    train(_smoke(full_dir, 5))
    with pytest.raises(RuntimeError, match="verifier crashed on call 3"):
        train(_smoke(crashed_dir, 5, *FAILING_REWARD))  # the reward of step 3 raises (before its update)
    summary = json.loads((crashed_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["global_step"] == 2
    assert "verifier crashed" in summary["error"]
    assert "Traceback" in caplog.text and "verifier crashed on call 3" in caplog.text  # the log file's handler
    saved = torch.load(crashed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2 and saved["PromptDataModule"] == {"epoch": 0, "batches": 2}
    train(_smoke(resumed_dir, 5, f"ckpt_path={crashed_dir}"))  # a run folder is accepted
    _same_run(full_dir, resumed_dir, [2, 3, 4])


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_stops_and_the_resume_is_exact(tmp_path, monkeypatch):
    full_dir, stopped_dir, resumed_dir = tmp_path / "full", tmp_path / "stopped", tmp_path / "resumed"
    train(_smoke(full_dir, 5))
    original = train_lib.instantiate_group
    monkeypatch.setattr(
        train_lib, "instantiate_group",
        lambda cfg, where="callbacks": original(cfg, where) + ([SignalAt(1, "SIGINT")] if where == "callbacks" else []),
    )
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when pytest runs as a background job
    summary = train(_smoke(stopped_dir, 5))
    monkeypatch.setattr(train_lib, "instantiate_group", original)
    assert summary["status"] == "interrupted" and summary["global_step"] == 2  # step 1 was finished
    assert signal.getsignal(signal.SIGINT) is before  # the handler was restored
    train(_smoke(resumed_dir, 5, f"ckpt_path={stopped_dir / 'checkpoints' / 'last.ckpt'}"))
    _same_run(full_dir, resumed_dir, [2, 3, 4])


def _cli(tmp_path, *overrides, timeout=300):
    env = dict(os.environ, PRERL_ROOT=str(ROOT), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", "validate_before=false",
         "validate_after=false", f"paths.log_dir={tmp_path}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


@pytest.mark.slow
def test_cli_exit_codes_log_files_and_no_tensorboard_point_lost_after_sigkill(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    signal_at = lambda step, sig: f"+callbacks.signal={{_target_: helpers.SignalAt, step: {step}, signal: {sig}}}"  # noqa: E731
    # Two runs started together: each gets its own folder. One is pre-empted (SIGTERM) at step 1,
    # the other killed (SIGKILL, no chance to save) after its checkpoint of step 2.
    term = _cli(tmp_path / "term", "trainer.max_steps=5", signal_at(1, "SIGTERM"))
    kill = _cli(tmp_path / "kill", "trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=2",
                signal_at(3, "SIGKILL"))
    fail = _cli(tmp_path / "fail", "trainer.max_steps=5", *FAILING_REWARD)
    term_out, kill_out, fail_out = (p.communicate(timeout=300) for p in (term, kill, fail))
    assert term.returncode == 143, term_out[1][-3000:]
    assert fail.returncode == 1, fail_out[1][-3000:]
    (failed_run,) = (tmp_path / "fail" / "smoke" / "runs").iterdir()
    assert json.loads((failed_run / "summary.json").read_text())["status"] == "failed"
    log_text = (failed_run / "smoke.log").read_text()
    assert "Traceback" in log_text and "verifier crashed on call 3" in log_text  # in the run's log file
    assert kill.returncode == -signal.SIGKILL
    (term_run,) = (tmp_path / "term" / "smoke" / "runs").iterdir()
    assert json.loads((term_run / "summary.json").read_text())["status"] == "preempted"
    (killed_run,) = (tmp_path / "kill" / "smoke" / "runs").iterdir()
    assert not (killed_run / "summary.json").exists()
    # The resume restores the killed run's overrides; today's override moves its SIGKILL past the end.
    resume = _cli(tmp_path / "kill", "trainer.max_steps=5", f"ckpt_path={killed_run}", "++callbacks.signal.step=99")
    out = resume.communicate(timeout=300)
    assert resume.returncode == 0, out[1][-3000:]
    steps = set()
    for run in (tmp_path / "kill" / "smoke" / "runs").iterdir():
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        steps |= {e.step for e in events.Scalars("train/loss")}
    assert steps == {0, 1, 2, 3, 4}


def test_run_names_are_unique_per_run_and_fixed_per_process():
    assert run_name() == run_name()  # one name per process, however often Hydra resolves it
    names = {subprocess.run([sys.executable, "-c", "from prerl.run_folder import run_name; print(run_name())"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))).stdout
             for _ in range(2)}
    assert len(names) == 2  # started within the same second, yet different


# ------------------------------------------------------------------ settings, before the model is built
@pytest.fixture
def no_model_build(monkeypatch):
    def refuse(self):
        raise AssertionError("the model was built before the settings were checked")

    monkeypatch.setattr(tiny_lib.TinyModelSpec, "_build_base_model", lambda self, tok: refuse(self))


@pytest.mark.parametrize("override, message", [
    ("module.rollout.temperature=-1", r"module.rollout.temperature=-1.* > 0"),
    ("module.rollout.temperature=0", r"module.rollout.temperature=0.* > 0"),
    ("module.rollout.group_size=1", r"module.rollout.group_size=1.* >= 2 .*'mean' advantage"),
    ("module.rollout.group_size=0", r"module.rollout.group_size=0.* integer >= 1"),
    ("module.rollout.top_p=0", r"module.rollout.top_p=0.* \(0, 1\]"),
    ("module.validation.top_p=1.5", r"module.validation.top_p=1.5"),
    ("module.update.micro_batch_size=0", r"module.update.micro_batch_size=0.* integer >= 1"),
    ("module.validation.samples_per_problem=0", r"module.validation.samples_per_problem=0"),
    ("module.update.max_tokens_per_micro_batch=0", r"max_tokens_per_micro_batch=0.* or null"),
    ("+module.foo=1", r"module: prerl.module.PreRLModule does not accept \['foo'\]; its keys: .*'rollout'"),
    ("+data.train.colour=red", r"data.train: prerl.data.ReasoningGymSource does not accept \['colour'\]"),
])
def test_bad_settings_fail_early_with_the_key_named(override, message, tmp_path, no_model_build):
    cfg = compose_train(["experiment=smoke", override], output_dir=tmp_path)
    with pytest.raises(ValueError, match=message):
        build(cfg)


def test_grpo_with_one_response_per_prompt_fails_before_validation(tmp_path, no_model_build):
    cfg = compose_train(["experiment=smoke", "objective=grpo", "module.rollout.group_size=1"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"group_size=1.* 'grpo' advantage"):
        train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_resuming_with_another_objective_or_model_is_one_clear_line(tmp_path):
    train(_smoke(tmp_path / "dsrl", 2))
    ckpt = tmp_path / "dsrl" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"DSRL \(objective=dual, 2 phases\).* a 1-phase objective"):
        train(compose_train(["experiment=smoke", "objective=grpo", f"ckpt_path={ckpt}"], output_dir=tmp_path / "grpo"))
    with pytest.raises(ValueError, match=r"another model: policy\.\S+ has shape \(\d+, 64\) there and \(\d+, 32\)"):
        train(_smoke(tmp_path / "small", 3, "model.hidden_size=32", "model.intermediate_size=64", f"ckpt_path={ckpt}"))


def test_summary_keeps_the_training_metrics_and_no_manual_optimisation_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(compose_train(["experiment=smoke", "trainer.max_steps=2"], output_dir=tmp_path))
    assert summary["status"] == "completed" and "after" in summary
    assert summary["train_metrics"]["train/reward_mean"] >= 0 and "train/loss" in summary["train_metrics"]
    assert not [w for w in caught if "manual optimization" in str(w.message)]
