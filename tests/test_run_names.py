"""Runs named by what they run, and TensorBoard's HPARAMS view of how each ended."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import prerl.run_folder as run_folder
from prerl.train import train
from test_configs import compose_train

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_folder_is_named_by_objective_switch_step_and_seed_then_time(monkeypatch):
    monkeypatch.delenv("PRERL_RUN_ID", raising=False)
    dsrl, grpo = run_folder.run_name("dual", 8, 42), run_folder.run_name("grpo", None, 1)
    assert re.fullmatch(r"dual_S8-seed42-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", dsrl)
    assert grpo.startswith("grpo-seed1-") and grpo.split("-seed1-")[1] == dsrl.split("-seed42-")[1]  # one stamp a process
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", run_folder.run_name())
    monkeypatch.setenv("PRERL_RUN_ID", "job9")
    assert run_folder.run_name("dual", 8, 42) == "job9"


def _hparams(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: (v.string_value or v.number_value) for k, v in start.hparams.items()}
    return values, {m.name.tag for m in experiment.metric_infos}, events.Tags()["scalars"]


def test_hparams_record_what_the_run_varied_how_it_ended_and_its_validation_columns(tmp_path):
    cfg = compose_train(["experiment=smoke", "objective.switch_step=1", "trainer.max_steps=2", "logger=tensorboard",
                         "seed=3"], output_dir=tmp_path)
    train(cfg)
    values, metrics, scalars = _hparams(tmp_path)
    assert values["objective.switch_step"] == 1 and values["seed"] == 3 and values["status"] == "completed"
    assert values["global_step"] == 2 and values["objective._target_"] == "DualSpaceSchedule"
    assert "val/avg@2" in metrics and set(metrics) <= set(scalars)  # columns read the run's own scalars


def test_a_run_that_fails_while_setting_up_leaves_no_tensorboard_run(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1 + 1?", "answer": "2"}\n{oops\n')
    cfg = compose_train(["experiment=smoke", "logger=tensorboard", "data=jsonl", f"data.train.path={bad}"],
                        output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="line 2"):  # found while the trainer sets up the data
        train(cfg)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_summarize_run_takes_a_task_folder_as_its_newest_run(tmp_path):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("summarize_run", ROOT / "scripts" / "summarize_run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, age in (("grpo-seed1-a", 200), ("dual_S8-seed1-b", 100), ("failed-no-events", 0)):
        (tmp_path / "task" / "runs" / name / ("tensorboard" if "events" not in name else "checkpoints")).mkdir(parents=True)
        os.utime(tmp_path / "task" / "runs" / name, (1e9 - age, 1e9 - age))
    newest = tmp_path / "task" / "runs" / "dual_S8-seed1-b"
    assert script.run_folder(tmp_path / "task") == newest == script.run_folder(tmp_path / "task" / "runs")
    assert script.run_folder(newest) == newest
    with pytest.raises(SystemExit, match="neither a run folder"):
        script.run_folder(tmp_path / "task" / "runs" / "failed-no-events")
