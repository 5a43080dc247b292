"""Evaluate a policy (its initial weights or a training checkpoint) on one or several eval sets.

``evaluate(cfg)`` (``python src/eval.py``, config ``configs/eval.yaml``; docs/evaluation.md):

1. builds data, module and trainer with ``prerl.train.build`` (the module as
   :class:`prerl.evaluation.runner.EvalModule`), resolves ``ckpt_path`` (a file, a run folder or
   ``last``);
2. resolves the eval sets (``data``'s validation split, ``eval_sets=[...]``, ``eval_file=``),
   de-duplicates them, cuts them to ``limit`` and tokenises the prompts;
3. samples ``samples`` responses per problem (or one greedy one) in seeded chunks of
   ``batch_size`` problems inside ``Trainer.predict`` (so Lightning loads the checkpoint as
   for validation), appending each chunk's per-problem records to
   ``<run>/problems/<set>.jsonl``;
4. summarises every set (avg@n, unbiased pass@k for k = 1, 2, 4, ..., n, lengths, truncation,
   unparsable answers, reasoning behaviours): a table on stdout, TensorBoard scalars, the pass@k
   plot ``pass_at_k.png`` and ``summary.json``.

``resume_from=<eval run folder>`` continues an interrupted evaluation in that folder: the same
command plus ``resume_from`` (settings that change results must not differ; they are checked
against the folder's ``eval_settings.json``); complete chunks are kept, the rest is sampled, and
the result equals an uninterrupted run's.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from prerl.atomic_files import write_text_atomic
from prerl.checkpointing import SHARDED_METADATA, resolve_checkpoint
from prerl.console import log_traceback
from prerl.data.prompts import resolve_context_ids
from prerl.evaluation.records import RecordWriter, complete_chunks, read_records
from prerl.evaluation.report import curve_of, format_table, log_to_loggers, plot_pass_at_k, set_summary
from prerl.evaluation.runner import ChunkSampler, EvaluationPreempted, Sampling
from prerl.evaluation.sets import EvalSet, output_name, resolve_eval_sets
from prerl.train import build, same_model

log = logging.getLogger(__name__)

__all__ = ["evaluate", "EvalSettingsMismatch", "SETTINGS_FILE"]

SETTINGS_FILE = "eval_settings.json"
EVAL_MODULE = "prerl.evaluation.runner.EvalModule"

# hydra.run.dir of configs/eval.yaml: the folder being resumed, else a new run folder.
OmegaConf.register_new_resolver("prerl.eval_dir", lambda resume, default: str(resume) if resume else default,
                                replace=True)


class EvalSettingsMismatch(ValueError):
    """``resume_from`` names an evaluation made with other settings."""


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _sampling(cfg: DictConfig) -> Sampling:
    greedy = bool(cfg.get("greedy", False))
    samples = 1 if greedy else int(cfg.samples)
    temperature = 0.0 if greedy else float(cfg.temperature)
    top_p = 1.0 if greedy else float(cfg.top_p)
    if samples < 1:
        raise ValueError(f"samples={samples} is not allowed: an integer >= 1 (responses per problem)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed: >= 0 (0 = greedy; or greedy=true)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is not allowed: in (0, 1]")
    if int(cfg.max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} is not allowed: an integer >= 1")
    if temperature == 0 and samples > 1:
        log.warning("temperature 0 is greedy: the %d samples per problem are identical; use greedy=true for one",
                    samples)
    gbs = cfg.get("generation_batch_size")
    return Sampling(samples, temperature, top_p, int(cfg.get("top_k") or 0), int(cfg.max_new_tokens),
                    None if gbs is None else int(gbs))


def _checkpoint_info(ckpt_path: str | None) -> dict | None:
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size if path.is_file() else None}


def _checkpoint_origin(ckpt_path: str | None) -> dict | None:
    """What summary.json records of the checkpoint: its path, the run folder it came from (the one
    holding its ``checkpoints/``; None for a checkpoint kept elsewhere) and its ``global_step``."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).resolve()
    if path.is_dir():  # a sharded FSDP checkpoint: the step is in its metadata file
        state = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=False)
    else:  # mmap: the pickled metadata is read, the tensors are not
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {"path": str(path), "run": str(path.parent.parent) if path.parent.name == "checkpoints" else None,
            "global_step": state.get("global_step")}


def _settings(cfg: DictConfig, ckpt_path: str | None, sampling: Sampling, sets: list[EvalSet]) -> dict:
    """What decides the results (saved with the run; a resume must match it)."""
    rollout = cfg.module.get("rollout") or {}
    settings = {
        "model": _plain(cfg.model),
        "checkpoint": _checkpoint_info(ckpt_path),
        "seed": int(cfg.seed),
        "sampling": asdict(sampling),
        "batch_size": int(cfg.batch_size),
        "engine": {"name": rollout.get("engine", "hf"), "options": _plain(rollout.get("engine_options")) or {}},
        "reward": _plain(cfg.reward),
        "behaviours": bool(cfg.get("behaviours", True)),
        "sets": [{"name": s.name, "spec": s.spec, "prompt": s.prompt_settings()} for s in sets],
    }
    return json.loads(json.dumps(settings, default=str))


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if saved == now else [f"{where}: {json.dumps(saved)[:120]} then, {json.dumps(now)[:120]} now"]


def _check_settings(out: Path, settings: dict, resuming: bool) -> None:
    path = out / SETTINGS_FILE
    if not path.exists():
        if resuming:
            raise FileNotFoundError(f"resume_from={out}: no {SETTINGS_FILE} there; it is not an evaluation's folder "
                                    "(or the evaluation stopped before sampling anything: start it again)")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(settings, indent=2))
        return
    if not resuming:
        raise FileExistsError(f"{out} already holds an evaluation ({SETTINGS_FILE}); to continue it pass "
                              f"resume_from={out}, else evaluate into a new folder")
    saved = json.loads(path.read_text())
    diffs = _differences(saved, settings)
    if diffs:
        raise EvalSettingsMismatch(
            f"resume_from={out}: this command's settings differ from that evaluation's, so the results would not "
            "be those of one uninterrupted run: " + "; ".join(diffs[:6])
            + ("; ..." if len(diffs) > 6 else "") + ". Resume with the same command (plus resume_from), or evaluate "
            "into a new folder"
        )


def _resume_hint(out: Path) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume_from=")]
        return "python src/eval.py " + " ".join(shlex.quote(o) for o in overrides + [f"resume_from={out}"])
    except Exception:  # noqa: BLE001 - not under Hydra
        return f"the same command with resume_from={out}"


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("tokenizer has neither a pad token nor an EOS token to pad prompts with")


def _summaries(sets: list[EvalSet], files: dict[str, Path], samples: int) -> dict[str, dict]:
    out = {}
    for s in sets:
        records, _ = read_records(files[s.name])
        out[s.name] = set_summary(sorted(records, key=lambda r: r["index"]), samples, len(s.items), s.stats)
        out[s.name]["file"] = str(files[s.name])
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; return the summary (also written to ``summary.json``). See the module docstring."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"predict returned None")
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    resume_from = cfg.get("resume_from")
    out = Path(resume_from or cfg.paths.output_dir).expanduser().resolve()
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.module._target_ = EVAL_MODULE  # predict_step samples the chunks
        cfg.paths.output_dir = str(out)  # TensorBoard and checkpoints of a resumed run land in its folder
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.perf_counter()
    _, module, trainer = build(cfg)
    if trainer.world_size > 1:
        raise ValueError(
            f"evaluation runs in one process, this trainer has {trainer.world_size} (trainer.devices x num_nodes): "
            "use trainer.devices=1 (a sharded FSDP checkpoint loads on one device with its strategy), or evaluate "
            "disjoint eval_sets / limit ranges in separate runs"
        )
    runs = Path(cfg.paths.log_dir) / cfg.get("checkpoints_of", cfg.task_name) / "runs"  # for ckpt_path=last
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), runs_dir=runs, accept=same_model(cfg))
    checkpoint = _checkpoint_origin(ckpt_path)
    sampling = _sampling(cfg)
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: problems per chunk, an integer >= 1")

    tokenizer = module.tokenizer
    sets = resolve_eval_sets(cfg, tokenizer)
    model_kwargs = dict(module.model_spec.chat_template_kwargs or {})
    for s in sets:
        s.prepare(tokenizer, model_kwargs)
        log.info("eval set %s: %s", s.name, ", ".join(f"{k}={v}" for k, v in s.stats.items()))
    settings = _settings(cfg, ckpt_path, sampling, sets)
    _check_settings(out, settings, resuming=bool(resume_from))

    # What is already written (resume), and the chunks still to sample.
    files = {s.name: out / "problems" / f"{output_name(s.name)}.jsonl" for s in sets}
    writers, pending, kept_total = {}, [], 0
    for s in sets:
        chunks = {c: [it["problem"]["id"] for it in s.items[c * batch_size : (c + 1) * batch_size]]
                  for c in range(-(-len(s.items) // batch_size))}
        records, cut = read_records(files[s.name])
        done = complete_chunks(records, chunks, files[s.name])
        keep = [rec for c in sorted(done) for rec in done[c]]
        kept_total += len(keep)
        writers[s.name] = RecordWriter(files[s.name], keep, rewrite=cut or len(keep) != len(records))
        pending += [{"set": s.name, "chunk": c} for c in sorted(chunks) if c not in done]
    if resume_from:
        log.info("resuming %s: %d problems already evaluated, %d chunk(s) of %d problems to sample",
                 out, kept_total, len(pending), batch_size)
        for logger in trainer.loggers:  # the summary logged at the end replaces the interrupted run's scalars
            log_dir = getattr(logger, "log_dir", None)
            for old in Path(log_dir).glob("events.out.tfevents.*") if log_dir else []:
                old.unlink()

    context = resolve_context_ids(tokenizer, _plain(cfg.data.get("marginal_context")))
    module.chunk_sampler = ChunkSampler(sets, writers, sampling, cfg.seed, batch_size, _pad_id(tokenizer), context,
                                        behaviours=bool(cfg.get("behaviours", True)))
    module.chunk_sampler.chunks_total = len(pending)
    status, error = "completed", None
    sigint = signal.getsignal(signal.SIGINT)
    try:
        if pending:
            loader = DataLoader(pending, batch_size=None, shuffle=False)
            trainer.predict(module, dataloaders=loader, ckpt_path=ckpt_path, return_predictions=False)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        status, error = "interrupted", "interrupted (Ctrl-C / SIGINT)"
    except EvaluationPreempted as err:  # a scheduler's SIGTERM: exit 143 so it requeues, resume later
        status, error = "preempted", str(err)
    except BaseException as err:
        status, error = "failed", f"{type(err).__name__}: {err}"
        log_traceback(err, "evaluation failed")
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # Lightning ignores Ctrl-C once it caught one
            signal.signal(signal.SIGINT, sigint)
        for w in writers.values():
            w.close()
        summary = _finish(cfg, out, sets, files, sampling, ckpt_path, checkpoint, status, error, trainer,
                          time.perf_counter() - started)
    if status == "interrupted":
        raise KeyboardInterrupt(f"evaluation interrupted; resume with: {summary['resume']}")
    if status == "preempted":
        raise EvaluationPreempted(f"evaluation pre-empted; resume with: {summary['resume']}")
    return summary


def _finish(cfg: DictConfig, out: Path, sets: list[EvalSet], files: dict[str, Path], sampling: Sampling,
            ckpt_path: str | None, checkpoint: dict | None, status: str, error: str | None, trainer: L.Trainer,
            seconds: float) -> dict[str, Any]:
    summaries = _summaries(sets, files, sampling.samples)
    metrics = {f"{name}/{k}": v for name, s in summaries.items() for k, v in (s.get("metrics") or {}).items()}
    summary: dict[str, Any] = {
        "status": status,
        "output_dir": str(out),
        "ckpt_path": ckpt_path,
        "checkpoint": checkpoint,  # {path, run, global_step}; None: the model's initial weights
        "model": getattr(cfg.model, "_target_", None),
        "sampling": asdict(sampling),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "seconds": seconds,
        "metrics": metrics,
        "datasets": summaries,
    }
    if error:
        summary["error"] = error
    if status != "completed":
        summary["resume"] = _resume_hint(out)
    if any(s.get("pass_at_k") for s in summaries.values()) and cfg.get("plot", True):
        try:
            summary["plot"] = str(plot_pass_at_k([("", {n: curve_of(s) for n, s in summaries.items()})],
                                                 out / "pass_at_k.png", title=f"pass@k ({out.name})"))
        except Exception:  # noqa: BLE001 - a plot never loses the numbers
            log.warning("could not plot pass@k", exc_info=True)
    loggers = list(trainer.loggers) if trainer is not None else []
    try:
        log_to_loggers(loggers, summaries)
    except Exception:  # noqa: BLE001
        log.warning("could not log the summary to the loggers", exc_info=True)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    table = format_table(summaries, sampling.samples)
    lines = [table, f"status={status}  ckpt_path={ckpt_path}  samples={sampling.samples}  T={sampling.temperature}  "
             f"top_p={sampling.top_p}  max_new_tokens={sampling.max_new_tokens}  time={seconds:.0f}s",
             f"output: {out}  (per-problem records in problems/, summary.json)"]
    if checkpoint is not None:
        run = checkpoint["run"] or "unknown: not in a run's checkpoints/"
        lines.insert(1, f"evaluated {checkpoint['path']} (run {run}, step {checkpoint['global_step']})")
    if error:
        lines.append(f"error: {error}")
    if status != "completed":
        lines.append(f"resume with: {summary['resume']}")
    print("\n".join(lines), flush=True)
    return summary
