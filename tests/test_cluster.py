"""Runs you can trust on a cluster: the final update saved, SIGTERM on every rank of a 2-process run,
a requeued job continuing in its folder, one live run per folder, no weightless or stale
checkpoints, a resume that restores its run's config, records that survive a full disk, and one
line per settings error."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import prerl.train as train_lib
from prerl.checkpointing import checkpoint_step, resolve_checkpoint
from prerl.run_folder import RunFolderInUseError, RunLock, check_reuse
from prerl.train import check_hardware, train
from test_checkpointing import _smoke
from test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]


def _cli(log_dir: Path, *overrides: str, run_id: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """``src/train.py experiment=smoke`` in its own process group (so a signal can reach all its ranks)."""
    env = dict(os.environ, PRERL_ROOT=str(ROOT), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"), **(env or {}))
    env.pop("PRERL_RUN_ID", None)
    if run_id is not None:
        env["PRERL_RUN_ID"] = run_id
    return subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", "validate_before=false",
         "validate_after=false", "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={log_dir}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"no exit within {timeout} s (a deadlock?):\n{proc.communicate()[0][-3000:]}")


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ------------------------------------------------------------------ 1. the final state is saved
def test_a_completed_run_saves_its_final_update_whatever_the_checkpoint_interval(tmp_path):
    summary = train(_smoke(tmp_path, 5))  # periodic checkpoints every 2 updates: 2, 4
    assert summary["status"] == "completed" and summary["global_step"] == 5
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 5
    assert summary["checkpoint_step"] == 5 and summary["checkpoint"].endswith("last.ckpt")


# ------------------------------------------------------------------ 2. pre-emption on every rank
@pytest.mark.slow
@pytest.mark.parametrize("trainer, who", [("ddp_sim", "group"), ("fsdp_cpu", "rank1")])
def test_sigterm_on_two_ranks_stops_together_saves_once_and_a_requeue_continues(tmp_path, trainer, who):
    """``group``: SIGTERM to every process at once (SLURM, ``timeout``); ``rank1``: to rank 1 alone,
    so rank 0 learns of it only through the ranks' agreement at the end of the step."""
    once = tmp_path / "signalled"
    sender = ("{_target_: helpers.SignalAt, step: 2, signal: SIGTERM, group: true, " if who == "group" else
              "{_target_: helpers.SignalAt, rank: 1, step: 2, signal: SIGTERM, ")
    overrides = [f"trainer={trainer}", "trainer.max_steps=6", "data.batch_size=4",
                 f"+callbacks.signal={sender}once: {once}}}"]
    started = time.monotonic()
    first = _cli(tmp_path, *overrides, run_id="job7")
    out = _finish(first)
    run = tmp_path / "smoke" / "runs" / "job7"
    summary = _summary(run)
    assert first.returncode == 143 and summary["status"] == "preempted", out[-3000:]
    assert summary["global_step"] == 3  # the step under way (the third) was finished, then all stopped
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 3
    assert out.count("SIGTERM received: saved") == 2  # both ranks took part in the one save
    assert time.monotonic() - started < 200

    # The requeued job: the same command and run id continues in the same folder.
    requeued = _cli(tmp_path, *overrides, run_id="job7")
    out = _finish(requeued)
    assert requeued.returncode == 0, out[-3000:]
    assert "continuing run job7 in its own folder" in (run / "smoke.log").read_text()
    assert "not resumable" not in out and "the data position (epoch 0, batch " in (run / "smoke.log").read_text()
    assert _summary(run)["status"] == "completed" and _summary(run)["global_step"] == 6
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 6


def test_sigusr1_slurms_warning_signal_preempts_like_sigterm(tmp_path, monkeypatch):
    from helpers import SignalAt

    original = train_lib.instantiate_group
    monkeypatch.setattr(train_lib, "instantiate_group", lambda cfg, where="callbacks": original(cfg, where) + (
        [SignalAt(1, "SIGUSR1")] if where == "callbacks" else []))
    before = signal.getsignal(signal.SIGUSR1)
    summary = train(_smoke(tmp_path, 5))
    assert summary["status"] == "preempted" and summary["global_step"] == 2  # the step under way finished
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler was restored


# ------------------------------------------------------------------ 6. a hung reward
def test_sigterm_while_a_reward_hangs_saves_the_batch_start_and_stops_at_once(tmp_path):
    started = time.monotonic()
    summary = train(_smoke(tmp_path, 5, "reward._target_=helpers.HangingRandomReward", "+reward.hang_on_call=3"))
    assert time.monotonic() - started < 20  # not the reward's 30 s
    assert summary["status"] == "preempted" and summary["global_step"] == 2
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2  # the state at the start of step 3


# ------------------------------------------------------------------ 3. one live run per folder
def test_a_live_lock_is_refused_and_a_dead_runs_lock_reclaimed(tmp_path, monkeypatch):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunFolderInUseError, match=r"in use by a live run \(pid \d+"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs on this host
    owner = {"pid": dead.pid, "host": socket.gethostname()}
    (tmp_path / ".lock").write_text(json.dumps(owner))
    RunLock(tmp_path).acquire().release()

    other = {"pid": 1, "host": "elsewhere"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    with pytest.raises(RunFolderInUseError):  # another host's lock with a fresh heartbeat
        RunLock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(tmp_path / ".lock", (old, old))
    RunLock(tmp_path).acquire().release()  # no heartbeat for 10 minutes: reclaimed

    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "slurm_job": "99", "slurm_restart": "0"}))
    RunLock(tmp_path).acquire().release()  # the requeued job's earlier incarnation


def test_a_folder_of_a_completed_run_or_of_other_settings_is_refused(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "model": {"name": "tiny"}}))
    check_reuse(tmp_path, {"seed": 1, "model": {"name": "tiny"}, "ckpt_path": "x"})  # the same run: fine
    with pytest.raises(RunFolderInUseError, match=r"other settings \(seed: 1 -> 2\)"):
        check_reuse(tmp_path, {"seed": 2, "model": {"name": "tiny"}})
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(RunFolderInUseError, match="holds a completed run"):
        check_reuse(tmp_path, {"seed": 1, "model": {"name": "tiny"}})


@pytest.mark.slow
def test_a_second_live_run_with_the_same_id_is_refused_before_it_writes_anything(tmp_path):
    first = _cli(tmp_path, "trainer.max_steps=100000", "seed=1", run_id="same")  # runs until stopped below
    run = tmp_path / "smoke" / "runs" / "same"
    deadline = time.monotonic() + 120
    while not list((run / "tensorboard").glob("events.*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the first run is training
    second = _cli(tmp_path, "trainer.max_steps=40", "seed=2", run_id="same")
    out2 = _finish(second)
    os.killpg(first.pid, signal.SIGTERM)
    out1 = _finish(first)
    assert second.returncode == 1 and "in use by a live run" in out2 and "Traceback" not in out2, out2
    assert first.returncode == 143, out1[-3000:]
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"] == 1  # not overwritten
    assert _summary(run)["status"] == "preempted"  # the first run's own summary
    assert (run / "smoke.log").read_text().count("data train: loaded=") == 1  # one run's log, not two interleaved
    assert not (run / ".lock").exists()  # released at the end


# ------------------------------------------------------------------ 4. no stale checkpoints
def test_a_run_that_fails_before_its_first_update_writes_no_checkpoint(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="verifier crashed on call 1"):
        train(_smoke(tmp_path, 3, "reward._target_=helpers.FailingRandomReward", "+reward.fail_on_call=1"))
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["global_step"] == 0 and "checkpoint" not in summary
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert "resume with" not in capsys.readouterr().out


def test_last_skips_weightless_checkpoints_and_other_models_and_names_what_it_took(tmp_path, caplog):
    good = _smoke(tmp_path / "smoke" / "runs" / "a", 2)
    train(good)
    other = tmp_path / "smoke" / "runs" / "b"
    train(_smoke(other, 2, "model.hidden_size=32", "model.intermediate_size=64"))
    (other / ".hydra").mkdir()  # as Hydra records it
    small = compose_train(["experiment=smoke", "model.hidden_size=32", "model.intermediate_size=64"]).model
    (other / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": OmegaConf.to_container(small)}))
    (other / ".hydra" / "overrides.yaml").write_text("[]")
    weightless = tmp_path / "smoke" / "runs" / "c" / "checkpoints" / "last.ckpt"
    weightless.parent.mkdir(parents=True)
    torch.save({"global_step": 0, "state_dict": {}, "prerl_state": {"phase": 0}}, weightless)  # the old 18 KB kind
    cfg = _smoke(tmp_path / "smoke" / "runs" / "d", 3, "ckpt_path=last")
    with caplog.at_level("INFO"):
        found = resolve_checkpoint("last", runs_dir=tmp_path / "smoke" / "runs", accept=train_lib.same_model(cfg))
    assert found == str(tmp_path / "smoke" / "runs" / "a" / "checkpoints" / "last.ckpt")
    assert "holds no weights" in caplog.text and "another model config" in caplog.text
    assert f"ckpt_path=last: {found} (step 2)" in caplog.text


@pytest.mark.slow
def test_a_resume_from_a_run_folder_restores_that_runs_overrides(tmp_path):
    first = _cli(tmp_path, "objective=grpo", "trainer.max_steps=2")
    assert first.wait(timeout=240) == 0
    (run,) = (tmp_path / "smoke" / "runs").iterdir()
    assert run.name.startswith("grpo-seed42-")  # named by what it runs
    resumed = _cli(tmp_path, "trainer.max_steps=3", f"ckpt_path={run}")  # objective=grpo not repeated
    out = _finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    (new,) = {p for p in (tmp_path / "smoke" / "runs").iterdir()} - {run}
    assert yaml.safe_load((new / ".hydra" / "config.yaml").read_text())["objective"]["_target_"].endswith("ConditionalRL")
    log = (new / "smoke.log").read_text()
    assert "its overrides ['objective=grpo'" in log and "trainer.max_steps: 2 -> 3" in log
    assert _summary(new)["global_step"] == 3


# ------------------------------------------------------------------ 5. records survive a full disk
def test_a_full_disk_at_a_save_ends_the_run_failed_with_the_message_and_a_readable_summary(tmp_path, monkeypatch):
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train(_smoke(tmp_path, 4))
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert not [p for p in tmp_path.rglob("*.tmp*")]  # no half-written file left behind


# ------------------------------------------------------------------ 8. one error, once
@pytest.mark.slow
def test_a_settings_error_is_one_line_last_with_the_traceback_in_the_log_file(tmp_path):
    proc = _cli(tmp_path, "module.rollout.temperature=-1")
    out = _finish(proc)
    assert proc.returncode == 1
    lines = [line for line in out.splitlines() if line.strip()]
    assert "Traceback" not in out and out.count("module.rollout.temperature=-1") == 1, out
    assert lines[-2].startswith("error: ValueError: module.rollout.temperature=-1 is not allowed")
    assert lines[-1].startswith("(traceback in ")
    (run,) = (tmp_path / "smoke" / "runs").iterdir()
    assert "Traceback" in (run / "smoke.log").read_text()
    full = _cli(tmp_path, "module.rollout.temperature=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert "Traceback" in _finish(full)


def test_a_gpu_trainer_without_a_gpu_names_the_cpu_alternative(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"no CUDA GPU; on a CPU use trainer=fsdp_cpu"):
        check_hardware(compose_train(["experiment=smoke", "trainer=fsdp"]))
    with pytest.raises(ValueError, match=r"trainer=cpu"):
        check_hardware(compose_train(["experiment=smoke", "trainer=gpu"]))
    check_hardware(compose_train(["experiment=smoke", "trainer=fsdp_cpu"]))
