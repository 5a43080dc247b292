"""Every config composes and instantiates; `train(cfg)` runs every objective; bad configs fail clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from helpers import tiny_spec
from prerl.checkpointing import AtomicCheckpointIO
from prerl.fsdp import PolicyFSDPStrategy
from prerl.rewards import build_reward
from prerl.train import instantiate_group, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GROUPS = ["model", "data", "reward", "objective", "module", "trainer", "logger", "callbacks", "experiment"]
OBJECTIVES = sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml"))


def compose_train(overrides=(), output_dir=None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
    return cfg


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _has_missing(node) -> bool:
    try:
        OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        return False
    except MissingMandatoryValue:
        return True


def test_expected_options_exist():
    assert set(OBJECTIVES) == {"grpo", "nsr", "psr", "w_reinforce", "prerl", "nsr_prerl", "psr_prerl", "dual", "dual_short", "nsr_warmup_grpo"}
    assert {"default", "cpu", "gpu", "ddp_sim"} <= set(options("trainer"))
    assert "smoke" in options("experiment")


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"], output_dir=tmp_path)
    spec = tiny_spec()
    tok = spec.build_tokenizer()
    targets = [group] if group != "experiment" else ["model", "data", "objective", "module", "trainer"]
    for name in targets:
        node = cfg[name]
        if _has_missing(node):  # templates such as model=hf need the user's value
            with pytest.raises(MissingMandatoryValue):
                hydra.utils.instantiate(node)
            continue
        if name == "data":
            dm = hydra.utils.instantiate(node, tokenizer=tok)
            assert dm.batch_size >= 1
        elif name == "module":
            module = hydra.utils.instantiate(
                node, model=spec, tokenizer=tok, objective=hydra.utils.instantiate(cfg.objective),
                reward=build_reward(cfg.reward),
            )
            assert module.rollout_cfg.group_size >= 1
        elif name == "trainer":
            plugins = [hydra.utils.instantiate(p) for p in node.get("plugins") or []]
            assert any(isinstance(p, AtomicCheckpointIO) for p in plugins)
            if isinstance(node.strategy, DictConfig):
                strategy = hydra.utils.instantiate(node.strategy)
                assert isinstance(strategy, PolicyFSDPStrategy)
                assert strategy._block_classes(spec.build_model())
            if node.accelerator == "gpu" and not torch.cuda.is_available():  # CUDA-only: checked above
                assert node.precision in ("bf16-mixed", "bf16-true")
                continue
            assert hydra.utils.instantiate(node, logger=False, enable_progress_bar=False) is not None
        elif name in ("logger", "callbacks"):
            assert all(item is not None for item in instantiate_group(node))
        elif name == "reward":
            assert build_reward(node) is not None
        else:
            assert hydra.utils.instantiate(node) is not None


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_train_runs_every_objective_on_the_tiny_model(objective, tmp_path):
    overrides = ["experiment=smoke", f"objective={objective}"]
    if objective.startswith("dual"):
        overrides.append("objective.switch_step=1")
    summary = train(compose_train(overrides, output_dir=tmp_path))
    assert summary["global_step"] == 3
    assert summary["final_phase"] == (2 if objective.startswith("dual") else 1)
    assert 0.0 <= summary["before"]["val/avg@2"] <= 1.0 and "val/avg@2" in summary["after"]
    assert (tmp_path / "summary.json").is_file()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_cli_entry_point(tmp_path):
    env = dict(os.environ, PRERL_ROOT=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", "trainer.max_steps=1",
         f"paths.log_dir={tmp_path}", "validate_before=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after" in proc.stdout and list(tmp_path.glob("smoke/runs/*/summary.json"))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_sim", "fsdp_cpu"])
def test_cli_two_process_trainers_run_dsrl(trainer, tmp_path):
    """The multi-process configs run the whole job (validate, DSRL with switch, checkpoint, validate)."""
    env = dict(os.environ, PRERL_ROOT=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "experiment=smoke", f"trainer={trainer}",
         "objective.switch_step=1", "trainer.max_steps=3", f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr + proc.stdout
    (summary,) = tmp_path.glob("smoke/runs/*/summary.json")
    result = json.loads(summary.read_text())
    assert result["global_step"] == 3 and result["final_phase"] == 2
    assert list(tmp_path.glob("smoke/runs/*/checkpoints/last.ckpt"))


# ------------------------------------------------------------------ bad configs
def test_unknown_objective_names_the_options():
    with pytest.raises(MissingConfigException, match="objective/reinforce_pp"):
        compose_train(["objective=reinforce_pp"])


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_train(["module.rollout.no_such_key=1"])


def test_unknown_module_setting_is_rejected(tmp_path):
    cfg = compose_train(["experiment=smoke", "+module.rollout.temprature=0.5"], output_dir=tmp_path)
    with pytest.raises(Exception, match="temprature"):
        train(cfg)


def test_missing_data_file_is_reported(tmp_path):
    cfg = compose_train(["model=tiny", "data=jsonl", f"data.train.path={tmp_path}/nope.jsonl"], output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train(cfg)


def test_missing_model_path_is_reported(tmp_path):
    cfg = compose_train(["experiment=smoke", "model=hf", f"model.name_or_path={tmp_path}/no_model"], output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no_model"):
        train(cfg)


def test_eval_entry_scores_a_training_checkpoint(tmp_path):
    from prerl.evaluate import evaluate

    train(compose_train(["experiment=smoke", "validate_before=false"], output_dir=tmp_path / "train"))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny", "reward=random", "data.val.size=4", "module.validation.samples_per_problem=2",
            "module.validation.max_new_tokens=16", f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    result = evaluate(cfg)
    assert 0.0 <= result["metrics"]["val/avg@2"] <= 1.0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["ckpt_path"].endswith("last.ckpt")
    with open_dict(cfg):
        cfg.ckpt_path = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        evaluate(cfg)
