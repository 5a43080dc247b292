"""Build everything from a Hydra config, validate, train, validate again, write a summary.

Thin by design (lightning-hydra-template): all logic lives in the components it instantiates.
Nothing is lost or silent: every config key is checked against what its target accepts before
anything is built, the run folder is this run's alone, and however the run ends (completed,
pre-empted by SIGTERM, interrupted by Ctrl-C, failed) ``summary.json`` says so, with the step
reached and the error, and the log file holds the traceback.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

from prerl import preemption
from prerl.atomic_files import write_text_atomic
from prerl.callbacks import FaultCheckpoint
from prerl.checkpointing import checkpoint_step, resolve_checkpoint
from prerl.console import log_traceback
from prerl.hparams import log_run_hparams
from prerl.module import check_phases
from prerl.rewards import build_reward
from prerl.run_folder import RESTORED, earlier_incarnation, run_folder_of, run_name, saved_config

log = logging.getLogger(__name__)

OmegaConf.register_new_resolver("prerl.run_name", run_name, replace=True)

# Process exit codes of src/train.py by how the run ended ("failed" re-raises: exit code 1). A
# scheduler can requeue a pre-empted run: 143 is the code of a process ended by SIGTERM.
EXIT_CODES = {"completed": 0, "preempted": 143, "interrupted": 130}

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def check_keys(node: Any, where: str, extra: frozenset[str] = frozenset()) -> None:
    """Every key of every ``_target_`` node under ``node`` must be a parameter of its target, else
    a ValueError naming the config path, the unknown keys and the known ones (a typo is never
    silently ignored, and the error comes before anything is built). ``extra``: keys of the root
    node consumed by the caller."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{where}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            target = hydra.utils.get_object(node._target_)
        except Exception as err:
            raise ValueError(f"{where}._target_={node._target_!r} cannot be imported: {err}") from None
        params = inspect.signature(target).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            unknown = set(node.keys()) - _HYDRA_KEYS - set(params) - extra
            if unknown:
                known = sorted(k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
                raise ValueError(f"{where}: {node._target_} does not accept {sorted(unknown)}; its keys: {known}")
    for key in node.keys():
        check_keys(node._get_node(key), f"{where}.{key}")


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, raising the target's own error (one line naming the setting)
    instead of Hydra's wrapper around it."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, Exception):
            raise err.__cause__ from None
        raise


def instantiate_group(cfg: DictConfig | None, where: str = "callbacks") -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers)."""
    if not cfg:
        return []
    items = []
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" not in node:
            # An experiment's settings for an entry the chosen group does not have (e.g.
            # experiment=smoke, which tunes the checkpoint callback, with callbacks=none).
            log.warning("%s.%s has settings %s but no _target_ in this %s group: ignored",
                        where, name, OmegaConf.to_container(node), where)
            continue
        if not isinstance(node, DictConfig):
            raise ValueError(f"config entry {where}.{name} must be a mapping with a _target_")
        check_keys(node, f"{where}.{name}")
        items.append(instantiate(node))
    return items


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data, module and trainer. The network itself is built later in configure_model."""
    for group in ("model", "data", "objective", "module", "trainer"):
        check_keys(cfg[group], group)  # the reward's keys are checked by build_reward
    spec = instantiate(cfg.model)
    tokenizer = spec.build_tokenizer()  # fails early on a bad model path
    # The model's chat-template options (e.g. Qwen3 enable_thinking) complete the data's.
    template_kwargs = {**(cfg.data.get("chat_template_kwargs") or {}), **spec.chat_template_kwargs}
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, chat_template_kwargs=template_kwargs)
    module = instantiate(
        cfg.module,
        model=spec,
        tokenizer=tokenizer,
        objective=instantiate(cfg.objective),
        reward=build_reward(cfg.reward),
    )
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    if cfg.trainer.get("enable_progress_bar", True) is False:  # Lightning refuses a bar callback with the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=instantiate_group(cfg.get("logger"), "logger") or False,
    )
    return datamodule, module, trainer


def runs_dir(cfg: DictConfig) -> Path:
    """Where this task's run folders are (``ckpt_path=last`` takes the newest checkpoint there)."""
    return Path(cfg.paths.log_dir) / cfg.task_name / "runs"


def same_model(cfg: DictConfig):
    """For ``ckpt_path=last``: refuse the checkpoints of runs whose recorded model config differs
    from this run's (their weights would not load, or would be another model's)."""
    model = OmegaConf.to_container(cfg.model, resolve=False)

    def accept(ckpt: Path) -> str | None:
        run = run_folder_of(str(ckpt))
        saved = saved_config(run) if run is not None else None
        if saved is not None and saved.get("model") != model:
            return f"its run ({run.name}) trained another model config"
        return None

    return accept


def resume_point(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint this run starts from: ``ckpt_path`` if given; else, for a requeued run that
    continues in its own folder (the same ``PRERL_RUN_ID``), that folder's newest checkpoint."""
    if cfg.get("ckpt_path") is not None:
        return resolve_checkpoint(cfg.ckpt_path, runs_dir=runs_dir(cfg), accept=same_model(cfg))
    own = output_dir / "checkpoints"
    if own.is_dir() and any(own.glob("*.ckpt")):  # none of them intact: resolve_checkpoint says so, no silent restart
        found = resolve_checkpoint(output_dir)
        log.warning("continuing run %s in its own folder from %s (step %s)", output_dir.name, found,
                    checkpoint_step(found))
        return found
    return None


def saved_training_state(ckpt_path: str) -> dict:
    """The ``prerl_state`` of a checkpoint, read without loading its tensors (mmap; the metadata
    file of a sharded folder); its data position is logged (Lightning's own warning that the
    dataloader is "not resumable" is silenced: PromptDataModule restores the position itself)."""
    path = Path(ckpt_path)
    if path.is_dir():
        state = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if "prerl_state" not in state:
        raise KeyError(f"{ckpt_path} has no 'prerl_state': it was not written by PreRLModule")
    position = state.get("PromptDataModule") or {}
    log.info("resuming from %s at step %s; the data position (epoch %s, batch %s) and random state are restored",
             ckpt_path, state.get("global_step"), position.get("epoch"), position.get("batches"))
    return state["prerl_state"]


def _val_metrics(results: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def format_summary(summary: dict) -> str:
    """A small before/after table for the console."""
    keys = sorted(set(summary.get("before", {})) | set(summary.get("after", {})))
    lines = ["", "=" * 64] + ([f"{'metric':<28}{'before':>12}{'after':>12}{'change':>12}", "-" * 64] if keys else [])
    for key in keys:
        before, after = summary.get("before", {}).get(key), summary.get("after", {}).get(key)
        fmt = lambda v: f"{v:12.4f}" if v is not None else f"{'-':>12}"  # noqa: E731
        change = fmt(after - before) if before is not None and after is not None else f"{'-':>12}"
        lines.append(f"{key:<28}{fmt(before)}{fmt(after)}{change}")
    if keys:
        lines.append("-" * 64)
    lines.append(
        f"status={summary['status']}  steps={summary['global_step']}  phase={summary['final_phase']}  "
        f"train_time={summary['train_seconds']:.0f}s  output={summary['output_dir']}"
    )
    if summary.get("error"):
        lines.append(f"error: {summary['error']}")
    if summary.get("checkpoint"):
        if summary["status"] == "completed":
            lines.append(f"final weights (step {summary['checkpoint_step']}): {summary['checkpoint']}")
        else:
            lines.append(f"resume with: ckpt_path={summary['output_dir']}  (checkpoint of step "
                         f"{summary['checkpoint_step']})")
    lines.append("=" * 64)
    return "\n".join(lines)


def _fault_callback(trainer: L.Trainer | None) -> FaultCheckpoint | None:
    callbacks = trainer.callbacks if trainer is not None else []
    return next((c for c in callbacks if isinstance(c, FaultCheckpoint)), None)


def _newest_checkpoint(trainer: L.Trainer) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint this run wrote: the fault callback's (final, pre-empted,
    interrupted, failed) or the periodic callback's ``last.ckpt``."""
    found = []
    fault = _fault_callback(trainer)
    if fault is not None and fault.saved is not None:
        found.append((str(fault.saved), fault.saved_step))
    periodic = trainer.checkpoint_callback
    step = getattr(periodic, "_last_global_step_saved", 0) if periodic is not None else 0
    if step and (periodic.last_model_path or periodic.best_model_path):
        found.append((periodic.last_model_path or periodic.best_model_path, step))
    return max(found, key=lambda item: item[1]) if found else None


def check_hardware(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: one line naming the CPU alternatives."""
    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        strategy = cfg.trainer.get("strategy")
        fsdp = isinstance(strategy, DictConfig) and "FSDP" in str(strategy.get("_target_", ""))
        raise ValueError(
            f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no CUDA GPU; on a CPU use "
            + ("trainer=fsdp_cpu (the same FSDP code path on 2 CPU processes)" if fsdp else
               "trainer=cpu (or trainer=ddp_sim for 2 processes)"))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; return the summary (also written to summary.json).

    ``summary["status"]`` is ``completed``, ``preempted`` (SIGTERM: a checkpoint of the step under
    way was saved) or ``interrupted`` (Ctrl-C); a failed run writes its summary with status
    ``failed`` and the error, logs the traceback (to the log file), and re-raises. A run whose
    folder holds an earlier incarnation of itself (a requeued job with the same ``PRERL_RUN_ID``)
    continues from that folder's newest checkpoint.
    """
    # ModelCheckpoint warns (with a block of example code) about modules that keep pre-update
    # weights for manual optimization; this module checkpoints after its update on purpose.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, at every step: not ours to fix.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader object has a state_dict;
    # PromptDataModule saves and restores the data position itself (resume = uninterrupted, tested).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    output_dir = Path(cfg.paths.output_dir)
    for note in RESTORED:
        log.warning(note)
    earlier = earlier_incarnation(output_dir) or {}
    summary: dict[str, Any] = {
        "status": "running", "tags": list(cfg.get("tags", [])), "output_dir": str(output_dir),
        "global_step": 0, "final_phase": 1, "train_seconds": 0.0, "train_metrics": {},
    }
    if "before" in earlier:
        summary["before"] = earlier["before"]
    trainer = module = None
    started = time.perf_counter()
    preemption.install()
    try:
        L.seed_everything(cfg.seed, workers=True)
        check_hardware(cfg)
        datamodule, module, trainer = build(cfg)
        preemption.take_over(trainer)
        ckpt_path = resume_point(cfg, output_dir)
        if ckpt_path is not None:  # a mismatch fails now, not after the model is built
            check_phases(saved_training_state(ckpt_path), len(module.phases))
        if cfg.get("validate_before") and ckpt_path is None:  # a resumed run's "before" is its first run's
            summary["before"] = _val_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
        started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        summary["train_seconds"] = time.perf_counter() - started
        summary["train_metrics"] = {  # the last update's values (NaN: not computed on that step)
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and not torch.isnan(v)
        }
        fault = _fault_callback(trainer)
        summary["status"] = (fault.stop_reason if fault else None) or ("preempted" if preemption.requested()
                                                                       else "completed")
        if summary["status"] == "completed" and cfg.get("validate_after"):
            summary["after"] = _val_metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    except SIGTERMException:
        summary["status"] = "preempted"
        log.warning("pre-empted (SIGTERM) at step %d", trainer.global_step if trainer else 0)
    except BaseException as err:
        if preemption.requested() and not isinstance(err, KeyboardInterrupt):
            # Another rank stopped on the same SIGTERM and this one's collective lost its peer.
            summary["status"] = "preempted"
            log.warning("pre-empted (SIGTERM) at step %d: %s", trainer.global_step if trainer else 0, err)
        else:
            fault = _fault_callback(trainer)
            stopped = "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"
            summary["status"] = (fault.stop_reason if fault else None) or stopped
            summary["error"] = f"{type(err).__name__}: {err}"
            log_traceback(err, f"run {summary['status']} at step {trainer.global_step if trainer else 0}")
            raise
    finally:
        preemption.uninstall()
        if trainer is not None:
            summary["global_step"] = trainer.global_step
            summary["final_phase"] = module.phase + 1
            newest = _newest_checkpoint(trainer)
            if newest is not None:
                summary["checkpoint"], summary["checkpoint_step"] = newest
        if not summary["train_seconds"]:
            summary["train_seconds"] = time.perf_counter() - started
        if rank_zero_only.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(output_dir / "summary.json", json.dumps(summary, indent=2))
            if trainer is not None:
                log_run_hparams(trainer, cfg, summary)
            if summary["status"] != "failed" or summary["global_step"] > 0:  # a failure at set-up: one line
                print(format_summary(summary), flush=True)
    return summary
