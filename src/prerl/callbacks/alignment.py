"""Track the gradient alignment of P(y) and P(y|x) during training (paper Fig. 2; docs/analysis.md).

Enable with ``callbacks=alignment`` (configs/callbacks/alignment.yaml, the default callbacks plus
this one) or by adding its entry to another callbacks group.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from prerl.analysis.alignment import ProbePairs, alignment_stats
from prerl.checkpointing import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

SOURCES = ("val", "rollout")


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None, recursively, so each line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def scalar_metrics(stats: dict[str, Any], prefix: str = "alignment") -> dict[str, float]:
    """The scalars of ``alignment_stats``' result, flat, for the loggers."""
    s = stats["summary"]
    out = {f"{prefix}/{k}": s[k] for k in (
        "frac_negative", "frac_positive", "inner_mean", "inner_median", "cosine_mean", "cosine_median",
        "cosine_min", "norm_marginal_mean", "norm_conditional_mean")}
    for k, v in stats["token_gap"].items():
        out[f"{prefix}/token_{k}"] = v
    for row in stats["gap_by_entropy"]:
        out[f"{prefix}/gap_by_entropy_q{row['bin']}"] = row["mean_gap"]
    for row in (stats.get("gap_by_entropy_split") or {}).get("late", []):
        out[f"{prefix}/gap_late_by_entropy_q{row['bin']}"] = row["mean_gap"]
    for row in stats["gap_by_position"]:
        hi = "inf" if math.isinf(row["hi"]) else f"{int(row['hi'])}"
        out[f"{prefix}/gap_by_position_{int(row['lo'])}-{hi}"] = row["mean_gap"]
    for name, part in (stats.get("by_reward") or {}).items():
        if part.get("n"):
            out[f"{prefix}/{name}/cosine_mean"] = part["cosine_mean"]
            out[f"{prefix}/{name}/frac_negative"] = part["frac_negative"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


class AlignmentProbe(Callback):
    """Every N optimizer updates, the gradient alignment of log P(y) and log P(y|x) on a fixed set
    of (x, y) pairs, logged to the loggers (``alignment/...``; TensorBoard also gets histograms of
    the cosines and inner products) and appended to a JSON-lines file.

    The probe set is chosen once per run and kept (also in checkpoints, so a resumed run probes
    the same pairs): with ``source="val"`` (default), ``samples_per_prompt`` responses sampled at
    fit start for each of the first prompts of the validation split, with the training rollout's
    settings and a fixed seed, and the first probe is at the starting step (0: the initial
    policy); with ``source="rollout"``, the first ``num_pairs`` responses of the first training
    rollout, probed from the first multiple of N on. Without a validation split ``val`` falls
    back to ``rollout``.

    It leaves the training state as it found it: gradients come from ``torch.autograd.grad``
    (no ``.grad`` is written, the optimizer is never touched), the policy is put in eval mode and
    each submodule's mode is restored, and the python / numpy / torch generator states are saved
    and restored around the probe (sampling the probe set included). Runs on global rank 0 only;
    sharded policies (FSDP) are refused.

    Cost per probe: two forward and two backward passes per pair, batch size 1 (measured on
    SmolLM2-135M, 2-core CPU: about 3 s per pair for all 135M parameters; docs/analysis.md).

    Steps: a probe at ``trainer.global_step`` = g measures the policy after g optimizer updates,
    the policy whose rollout Lightning logs as ``train/*`` at step g, and is logged at step g.

    Args:
        every_n_steps: probe when ``trainer.global_step`` reaches a multiple of it (and once when
            the probe set is first available: step 0 for ``val``, step 1 for ``rollout``).
        num_pairs: size of the probe set.
        params: the parameter subset (``prerl.analysis.alignment.select_parameters``: ``auto``,
            ``trainable``, ``lora``, ``last:K``, or name patterns such as ``layers.*.mlp``).
        source: ``val`` or ``rollout`` (above).
        samples_per_prompt: responses per validation prompt (default: the rollout group size).
        seed: seeds the sampling of the ``val`` probe set (the training RNG is restored after).
        path: the JSON-lines file (default: ``<trainer.default_root_dir>/alignment.jsonl``).
        entropy_bins: quantile bins of the conditional entropy for the token gap.
        histograms: also write TensorBoard histograms.
        per_sample: include the per-pair values in the JSON lines.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        num_pairs: int = 32,
        params: str | Sequence[str] | None = "auto",
        source: str = "val",
        samples_per_prompt: int | None = None,
        seed: int = 0,
        path: str | None = None,
        entropy_bins: int = 5,
        histograms: bool = True,
        per_sample: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        if num_pairs < 1:
            raise ValueError("num_pairs must be >= 1")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if samples_per_prompt is not None and samples_per_prompt < 1:
            raise ValueError("samples_per_prompt must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self.num_pairs = int(num_pairs)
        self.params = params if params is None or isinstance(params, str) else [str(p) for p in params]
        self.source = source
        self.samples_per_prompt = samples_per_prompt
        self.seed = int(seed)
        self.path = path
        self.entropy_bins = int(entropy_bins)
        self.histograms = bool(histograms)
        self.per_sample = bool(per_sample)
        self.pairs: ProbePairs | None = None
        self.last_logged = -1
        self.history: list[dict] = []  # this process's probes (scalars only), for inspection

    # ------------------------------------------------------------------ state in checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"pairs": None if self.pairs is None else self.pairs.state_dict(), "last_logged": self.last_logged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pairs = state_dict.get("pairs")
        self.pairs = None if pairs is None else ProbePairs.from_state_dict(pairs)
        self.last_logged = int(state_dict.get("last_logged", -1))

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "_is_sharded", lambda: False)():
            raise ValueError("AlignmentProbe needs an unsharded policy (it takes per-sample gradients on one "
                             "process); remove it from the callbacks for FSDP runs")

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self.pairs is None and self.source == "val":
            self.pairs = self._pairs_from_val(trainer, pl_module)
        self._maybe_probe(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        if self.pairs is None and getattr(pl_module, "last_rollout", None) is not None:
            rollout = pl_module.last_rollout
            rows = list(range(min(self.num_pairs, rollout.response_ids.shape[0])))
            self.pairs = ProbePairs.from_rollout(rollout, rows)
            log.info("alignment probe: %d pairs from the first training rollout", len(self.pairs))
        self._maybe_probe(trainer, pl_module)

    # ------------------------------------------------------------------ the probe set
    def _pairs_from_val(self, trainer, pl_module) -> ProbePairs | None:
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") else []
        if not loader:
            log.warning("alignment probe: no validation split; the probe set will be the first training rollout")
            return None
        cfg = pl_module.rollout_cfg
        group = int(self.samples_per_prompt or cfg.group_size)
        prompts = -(-self.num_pairs // group)
        pad_id = int(getattr(datamodule, "pad_token_id", None) or 0)
        parts, taken = [], 0
        rng = capture_rng_state()
        try:
            torch.manual_seed(self.seed)
            for batch in loader:
                n = min(prompts - taken, batch["prompt_ids"].shape[0])
                sub = {
                    "prompt_ids": batch["prompt_ids"][:n].to(pl_module.device),
                    "prompt_mask": batch["prompt_mask"][:n].to(pl_module.device),
                    "context_ids": batch["context_ids"][:n].to(pl_module.device),
                    "problems": batch["problems"][:n],
                }
                rollout = pl_module.sample(sub, group, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                           cfg.generation_batch_size)
                parts.append(ProbePairs.from_rollout(rollout))
                taken += n
                if taken >= prompts:
                    break
        finally:
            restore_rng_state(rng)
        pairs = ProbePairs.concat(parts, pad_id).take(self.num_pairs)
        log.info("alignment probe: %d pairs (%d validation prompts x %d responses, seed %d)",
                 len(pairs), taken, group, self.seed)
        return pairs

    # ------------------------------------------------------------------ probing
    def due(self, step: int) -> bool:
        """The first step with a probe set, then each step that reaches a new multiple of N (with
        several optimizer updates per batch the step can jump over the multiple itself)."""
        if step == self.last_logged:
            return False
        return self.last_logged < 0 or step // self.every_n_steps > self.last_logged // self.every_n_steps

    def _maybe_probe(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if self.pairs is None or not self.due(step):
            return
        self.last_logged = step
        self.probe(trainer, pl_module, step)

    def probe(self, trainer, pl_module, step: int) -> dict[str, Any]:
        """Compute the statistics on the probe set now and log them at ``step``."""
        rng = capture_rng_state()
        try:
            stats = alignment_stats(
                pl_module.policy,
                self.pairs,
                params=self.params,
                temperature=pl_module.rollout_cfg.temperature,
                chunk_tokens=pl_module.update_cfg.logprob_chunk_tokens,
                entropy_bins=self.entropy_bins,
                device=pl_module.device,
            )
        finally:
            restore_rng_state(rng)
        metrics = scalar_metrics(stats)
        metrics["alignment/seconds"] = float(stats["seconds"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                rows = stats["per_sample"]
                for key in ("cosine", "inner"):
                    values = torch.tensor([r[key] for r in rows if math.isfinite(r[key])], dtype=torch.float64)
                    if values.numel():
                        logger.experiment.add_histogram(f"alignment/{key}", values, global_step=step)
        record = {
            "step": step, "phase": int(getattr(pl_module, "phase", 0)) + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **{k: v for k, v in stats.items() if self.per_sample or k != "per_sample"},
        }
        path = Path(self.path) if self.path else Path(trainer.default_root_dir) / "alignment.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        s = stats["summary"]
        log.info("alignment probe at step %d: %d pairs, inner<0 for %.1f%%, mean cosine %.3f (%.1f s)",
                 step, s["n"], 100 * s["frac_negative"], s["cosine_mean"], stats["seconds"])
        self.history.append({"step": step, **metrics})
        return stats
