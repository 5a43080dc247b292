"""The LightningModule: the policy, the active objective, and one RL iteration per batch.

How one training step differs from supervised Lightning training:
1. The batch holds prompts only. The policy samples G responses per prompt (no grad, KV cache)
   and a verifier rewards them.
2. Each loss term of the current phase computes advantages, keeps its samples, and scores only
   those, in its own space: after the prompt (P(y|x)) or after the question-free context (P(y)).
   A phase-1 NSR-PreRL step never runs a conditional forward pass.
3. Optimisation is manual: ``epochs x mini_batches`` optimizer updates per rollout batch, each
   accumulated over micro-batches (a row count or a token budget; rows with advantage 0 are not
   forwarded, but their tokens count). ``trainer.global_step`` counts optimizer updates, so the
   DSRL switch step S is a number of updates. A batch without learning signal still makes its
   (zero-gradient) update, as in the authors' code, unless ``no_signal="skip"``.
The step does no file I/O: samples for TensorBoard are kept in memory for a callback.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torchmetrics import MeanMetric, SumMetric

from prerl.checkpointing import capture_rng_state, restore_rng_state
from prerl.config_fields import from_mapping
from prerl.fsdp import generation_model
from prerl.metrics import pass_at_k, rollout_metrics, space_diagnostics
from prerl.micro_batches import micro_batch_indices
from prerl.models.params import disable_dropout
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalRL, Objective, UpdateBatch, phases_of
from prerl.rollout import Rollout, concat_responses, decode, eos_ids, generate
from prerl.scoring import check_chunkable, score_responses

log = logging.getLogger(__name__)


def rewind_to_previous_batch_end(loops: dict) -> None:
    """Make the loop counters of a checkpoint written inside a training batch (after a failure,
    before that batch updated anything) read as those of a checkpoint written at the end of the
    previous batch, where Lightning's periodic checkpoints are taken: ready = started = processed,
    completed = processed - 1, and the logging step one less. The resume then re-runs the batch
    and logs it at its own step. (Lightning 2.6 loop-state layout.)"""
    epoch_loop = loops["fit_loop"]
    progress = epoch_loop["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        done = progress[part]["processed"]
        progress[part].update(ready=done, started=done, completed=max(done - 1, 0))
    state = epoch_loop["epoch_loop.state_dict"]
    state["_batches_that_stepped"] = max(state["_batches_that_stepped"] - 1, 0)


def check_phases(state: dict, num_phases: int) -> None:
    """A checkpoint's training state must fit this run's objective (e.g. a DSRL checkpoint resumed
    with a one-phase objective)."""
    saved = int(state.get("num_phases", int(state["phase"]) + 1))
    if saved != num_phases or int(state["phase"]) >= num_phases:
        kind = lambda n: "DSRL (objective=dual, 2 phases)" if n == 2 else f"a {n}-phase objective"  # noqa: E731
        raise ValueError(
            f"the checkpoint was written by {kind(saved)} (in phase {int(state['phase']) + 1}), this run's objective "
            f"is {kind(num_phases)}: resume with the objective it was trained with, or export its weights "
            "(python -m prerl.export) and start a new run from them with model=hf"
        )


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a NaN or infinite loss or gradient norm."""


class NoLearningSignalError(RuntimeError):
    """Too many consecutive batches in which every kept response had advantage 0."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A one-line settings error naming the key, its value and what is allowed."""
    if not ok:
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")


def _positive(prefix: str, settings: Any, *names: str, optional: tuple[str, ...] = ()) -> None:
    for name in names + optional:
        value = getattr(settings, name)
        if value is None and name in optional:
            continue
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{prefix}.{name}", value,
                 "an integer >= 1" + (" or null" if name in optional else ""))


@dataclass
class RolloutConfig:
    """How responses are sampled for training (docs/method.md: 8 responses at T = 1.0)."""

    group_size: int = 8
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int | None = None

    def __post_init__(self) -> None:
        _positive("module.rollout", self, "group_size", "max_new_tokens", optional=("generation_batch_size",))
        # Training needs samples: T = 0 is greedy (G identical responses, no signal); T < 0 negates the logits.
        _require(self.temperature > 0, "module.rollout.temperature", self.temperature,
                 "> 0 (training samples G responses per prompt; the paper uses 1.0)")
        _require(0 < self.top_p <= 1, "module.rollout.top_p", self.top_p, "in (0, 1]; 1.0 = off")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "module.rollout.top_k", self.top_k, ">= 0; 0 = off")


@dataclass
class UpdateConfig:
    """How a rollout batch is turned into optimizer updates (PreRL: one update per batch)."""

    epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 8
    max_tokens_per_micro_batch: int | None = None
    logprob_chunk_tokens: int | None = 1024
    skip_zero_advantage: bool = True
    max_grad_norm: float = 1.0
    recompute_old_logprobs: str = "auto"

    def __post_init__(self) -> None:
        _positive("module.update", self, "epochs", "mini_batches", "micro_batch_size",
                  optional=("max_tokens_per_micro_batch", "logprob_chunk_tokens"))
        _require(self.max_grad_norm > 0, "module.update.max_grad_norm", self.max_grad_norm, "> 0 (the paper: 1.0)")
        _require(self.recompute_old_logprobs in ("auto", "always"), "module.update.recompute_old_logprobs",
                 self.recompute_old_logprobs, "'auto' or 'always'")


@dataclass
class ValidationConfig:
    """avg@k validation on the held-out split (PreRL reports Avg@32 at T = 1.0)."""

    samples_per_problem: int = 4
    max_new_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int | None = None

    def __post_init__(self) -> None:
        _positive("module.validation", self, "samples_per_problem", "max_new_tokens", optional=("generation_batch_size",))
        _require(self.temperature >= 0, "module.validation.temperature", self.temperature, ">= 0; 0 = greedy")
        _require(0 < self.top_p <= 1, "module.validation.top_p", self.top_p, "in (0, 1]; 1.0 = off")


# Advantages computed within a group of responses to the same prompt: G = 1 gives no signal.
GROUP_ADVANTAGES = ("grpo", "mean")
NO_SIGNAL_MODES = ("step", "skip")


class PreRLModule(LightningModule):
    """Policy + objective(s) for PreRL, NSR-PreRL, DSRL and the post-train baselines.

    Args:
        model: a ``prerl.models`` spec; the network is built in ``configure_model``.
        tokenizer: the spec's tokenizer (pad and eos set).
        objective: an ``Objective`` or a ``DualSpaceSchedule``.
        reward: callable ``(responses, problems) -> RewardResult``.
        optimizer: partial optimizer constructor (e.g. AdamW with lr), completed with parameters.
        rollout, update, validation: dicts of ``RolloutConfig`` / ``UpdateConfig`` /
            ``ValidationConfig`` fields.
        lr_warmup_steps: linear warm-up of the learning rate, then constant (PreRL: 0).
        disable_dropout: set every dropout of the policy to 0 (TRL's ``disable_dropout``), so
            scoring is deterministic and the ratio to the sampling policy is exactly 1.
        no_signal: a batch in which every kept response has advantage 0 makes an optimizer
            step with zero gradients (``step``: the authors' code; AdamW's momentum and weight
            decay still act and the step counts toward ``max_steps`` and the switch step S) or
            makes none (``skip``: not counted).
        diagnostics_every_n_steps: every N updates also score all responses in both spaces
            (entropies, log-prob gap); 0 disables. Costs two extra no-grad forwards.
        max_consecutive_nonfinite: stop after this many skipped non-finite updates in a row.
        max_consecutive_no_signal: stop after this many batches in a row without learning
            signal: the reward never fires or the task is too hard or too easy (with
            ``no_signal="skip"`` a task the policy never solves would otherwise loop forever).
        num_text_samples: responses kept from each rollout for the text-sample logger.
    """

    # Training state saved in checkpoints besides weights and optimizer (the DSRL phase, counters).
    STATE_KEYS = ("phase", "consecutive_nonfinite", "nonfinite_total", "no_signal_total", "consecutive_no_signal")

    def __init__(
        self,
        model,
        tokenizer,
        objective: Objective | DualSpaceSchedule,
        reward: Callable,
        optimizer: Callable[..., torch.optim.Optimizer],
        rollout: dict | None = None,
        update: dict | None = None,
        validation: dict | None = None,
        lr_warmup_steps: int = 0,
        disable_dropout: bool = True,
        no_signal: str = "step",
        diagnostics_every_n_steps: int = 10,
        max_consecutive_nonfinite: int = 3,
        max_consecutive_no_signal: int = 50,
        num_text_samples: int = 4,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model_spec = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.phases = phases_of(objective)
        self.reward = reward
        self.optimizer_factory = optimizer
        self.rollout_cfg = from_mapping(RolloutConfig, rollout, "module.rollout")
        self.update_cfg = from_mapping(UpdateConfig, update, "module.update")
        self.val_cfg = from_mapping(ValidationConfig, validation, "module.validation")
        _require(no_signal in NO_SIGNAL_MODES, "module.no_signal", no_signal, f"one of {NO_SIGNAL_MODES}")
        for phase in self.phases:
            for objective, _ in phase:
                _require(
                    self.rollout_cfg.group_size >= 2 or objective.advantage not in GROUP_ADVANTAGES,
                    "module.rollout.group_size", self.rollout_cfg.group_size,
                    f">= 2 for {objective!r}: its {objective.advantage!r} advantage compares each response "
                    "with the others of its group (the paper: 8)",
                )
        self.lr_warmup_steps = lr_warmup_steps
        self.disable_dropout = bool(disable_dropout)
        self.no_signal = no_signal
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.max_consecutive_no_signal = max_consecutive_no_signal
        self.num_text_samples = num_text_samples
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        self.phase = 0
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0
        self.no_signal_total = 0
        self.consecutive_no_signal = 0
        self._pending_rng: dict | None = None
        # Where the current training batch stands, so a checkpoint written after a crash inside
        # it resumes at its start (same RNG, same data position) and never repeats an update.
        self._rng_at_batch_start: dict | None = None
        self._in_batch = False
        self._updates_in_batch = 0
        self._train_keys: set[str] = set()
        self.last_samples: list[dict[str, Any]] = []
        self.val_accuracy = MeanMetric()
        self.val_pass = MeanMetric()
        self.val_length = MeanMetric()
        self.val_truncated = MeanMetric()
        self.val_timeouts = SumMetric()
        self.val_errors = SumMetric()

    # ---------------------------------------------------------------- model and optimizer
    def configure_model(self) -> None:
        # Built here, not in __init__, so a sharding strategy can wrap it as it is created.
        if self.policy is not None:
            return
        # from_pretrained returns eval mode; Lightning keeps module modes, so train explicitly.
        policy = self.model_spec.build_model().train()
        if self.disable_dropout and disable_dropout(policy):
            log.info("dropout disabled in the policy (module.disable_dropout=true)")
        if self.update_cfg.logprob_chunk_tokens:
            check_chunkable(policy)
        needs_reference = any(obj.kl_coef for phase in self.phases for obj, _ in phase)
        if needs_reference and not hasattr(policy, "disable_adapter"):
            # Full fine-tuning needs a frozen copy; with LoRA the adapter is switched off instead.
            self.ref_policy = self._shard(self.model_spec.build_model().requires_grad_(False).eval())
        self.policy = self._shard(policy)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy.shard_policy(model) if hasattr(strategy, "shard_policy") else model

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters")
        opt = self.optimizer_factory(params=params)
        warmup = max(int(self.lr_warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        # Only fitting needs the switch (validation/test runs would just re-register it).
        if isinstance(self.objective, DualSpaceSchedule) and self.trainer.state.fn == "fit":
            from prerl.callbacks.phase_switch import PhaseSwitch

            return [PhaseSwitch(self.objective.switch_step, self.objective.reset_optimizer)]
        return []

    # ---------------------------------------------------------------- state in checkpoints
    def _trainable_keys(self) -> set[str]:
        # FSDP and activation checkpointing insert wrapper names that state dicts leave out.
        names = (n for n, p in self.named_parameters() if p.requires_grad)
        return {n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "") for n in names}

    def _adapter_only(self) -> bool:
        return hasattr(self.policy, "disable_adapter") or hasattr(getattr(self.policy, "module", None), "disable_adapter")

    def _saved_keys(self) -> set[str] | None:
        """The state-dict entries a checkpoint must hold; None = all (Lightning's default).

        With LoRA only the adapters: the frozen (possibly 4-bit) base is rebuilt from the model
        spec. A frozen KL reference copy is never saved: it is rebuilt too.
        """
        if self._adapter_only():
            return self._trainable_keys()
        if self.ref_policy is not None:
            return {k for k in self.state_dict() if not k.startswith("ref_policy.")}
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._saved_keys()
        if keep is not None and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["prerl_rng"] = self._gather_rng_states()
        checkpoint["prerl_state"] = {key: getattr(self, key) for key in self.STATE_KEYS}
        checkpoint["prerl_state"]["num_phases"] = len(self.phases)
        if self._in_batch and "loops" in checkpoint:
            rewind_to_previous_batch_end(checkpoint["loops"])

    def resumable_mid_batch(self) -> bool:
        """True unless a training batch is under way and has already updated the weights: a
        checkpoint written now would then redo that update on resume."""
        return not (self._in_batch and self._updates_in_batch)

    def _gather_rng_states(self) -> list[dict]:
        """Every rank's generator states, in rank order (each rank samples with its own). Inside a
        training batch, the states at its start: a resume re-runs the batch from there."""
        state = self._rng_at_batch_start if self._in_batch else capture_rng_state()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return [state]
        states: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("prerl_state")
        if state is None:
            raise KeyError("checkpoint has no 'prerl_state': it was not written by PreRLModule")
        check_phases(state, len(self.phases))
        self._check_tensor_shapes(checkpoint.get("state_dict"))
        required = self._saved_keys()
        if required is not None and isinstance(checkpoint.get("state_dict"), dict):
            missing = required - set(checkpoint["state_dict"])
            if missing:
                raise KeyError(f"checkpoint lacks {len(missing)} required tensors, e.g. {sorted(missing)[:3]}")
            self.strict_loading = False  # what the checkpoint leaves out is rebuilt from the model spec
        rng = checkpoint.get("prerl_rng") or []
        world = self.trainer.world_size if self._trainer is not None else 1
        if len(rng) == world:
            self._pending_rng = rng[self.global_rank]
        else:
            log.warning("checkpoint has RNG states for %d ranks, this run has %d: not restored", len(rng), world)
        for key in self.STATE_KEYS:
            setattr(self, key, int(state[key]))

    def _check_tensor_shapes(self, saved: dict | None) -> None:
        """One line naming the first tensor whose shape differs (a checkpoint of another model)."""
        if not isinstance(saved, dict) or self._is_sharded():  # a sharded state_dict() is collective
            return
        own = self.state_dict()
        for key, value in saved.items():
            if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape) and value.numel():
                raise ValueError(
                    f"the checkpoint is from another model: {key} has shape {tuple(value.shape)} there and "
                    f"{tuple(own[key].shape)} in this run's model ({self.model_spec.name}); resume with the model "
                    "config it was trained with"
                )

    def set_phase(self, phase: int) -> None:
        if not 0 <= phase < len(self.phases):
            raise ValueError(f"phase {phase} out of range: this objective has {len(self.phases)} phase(s)")
        self.phase = phase

    @property
    def phase_terms(self) -> list[tuple[Objective, float]]:
        return self.phases[self.phase]

    # ---------------------------------------------------------------- sampling and rewards
    def _is_sharded(self) -> bool:
        # Sharded ranks must keep stepping generate() together until every rank is done.
        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))

    def sample(
        self,
        batch: dict,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        generation_batch_size: int | None = None,
    ) -> Rollout:
        """Sample, decode and reward ``num_samples`` responses per prompt of ``batch``, at most
        ``generation_batch_size`` sequences per ``generate`` call."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            eos = eos_ids(getattr(self.policy, "generation_config", None), self.tokenizer)
            # Generate in chunks of prompts: the KV cache grows with sequences x length.
            chunk = max(1, (generation_batch_size or 10**9) // num_samples)
            pieces = []
            with generation_model(self.policy) as model:
                for start in range(0, batch["prompt_ids"].shape[0], chunk):
                    pieces.append(generate(
                        model,
                        batch["prompt_ids"][start : start + chunk],
                        batch["prompt_mask"][start : start + chunk],
                        num_samples=num_samples,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        eos_token_ids=eos,
                        pad_token_id=self.tokenizer.pad_token_id,
                        synced_gpus=self._is_sharded(),
                    ))
        finally:
            self.policy.train(was_training)
        response_ids, response_mask, truncated = concat_responses(pieces, self.tokenizer.pad_token_id)
        rep = lambda t: t.repeat_interleave(num_samples, dim=0)  # noqa: E731
        rollout = Rollout(
            prompt_ids=rep(batch["prompt_ids"]),
            prompt_mask=rep(batch["prompt_mask"]),
            context_ids=rep(batch["context_ids"]),
            response_ids=response_ids,
            response_mask=response_mask,
            truncated=truncated,
            texts=decode(self.tokenizer, response_ids, response_mask),
            problems=[p for p in batch["problems"] for _ in range(num_samples)],
            group_size=num_samples,
        )
        result = self.reward(rollout.texts, rollout.problems)
        rollout.rewards = result.rewards.to(self.device, torch.float32)
        rollout.reward_timeouts = int(result.timeouts)
        rollout.reward_errors = int(getattr(result, "errors", 0))
        rollout.extracted = list(result.extracted)
        return rollout

    # ---------------------------------------------------------------- scoring helpers
    def _score(self, batch: UpdateBatch, with_entropy: bool = False, model=None):
        return score_responses(
            model if model is not None else self.policy,
            batch.prefix_ids,
            batch.prefix_mask,
            batch.response_ids,
            batch.response_mask,
            temperature=self.rollout_cfg.temperature or 1.0,
            with_entropy=with_entropy,
            chunk_tokens=self.update_cfg.logprob_chunk_tokens,
        )

    def _micro_batches(self, batch: UpdateBatch) -> list[tuple[torch.Tensor, UpdateBatch]]:
        """(row index, sub-batch) of each micro-batch: ``micro_batch_size`` rows, packed under
        ``max_tokens_per_micro_batch`` when it is set."""
        cfg = self.update_cfg
        groups = micro_batch_indices(
            batch.prefix_mask.sum(dim=1), batch.response_mask.sum(dim=1), cfg.micro_batch_size, cfg.max_tokens_per_micro_batch
        )
        return [(index, batch.rows(index)) for index in groups]

    def _forward_index(self, objective: Objective, batch: UpdateBatch) -> torch.Tensor:
        """(m,) the rows whose forward pass can change the update. A row with advantage 0 has a
        zero surrogate loss and gradient (its tokens still count in the denominators, which are
        taken over the whole batch); only a KL or entropy term gives it a gradient."""
        if self.update_cfg.skip_zero_advantage and not objective.kl_coef and not objective.entropy_coef:
            return (batch.advantages != 0).nonzero(as_tuple=True)[0]
        return torch.arange(len(batch), device=batch.advantages.device)

    @torch.no_grad()
    def _score_no_grad(
        self, batch: UpdateBatch, placeholder: UpdateBatch, model=None, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (M, T) [and entropies] of ``batch`` in micro-batches; every rank runs as many
        forward passes (sharded forwards are collective), padding with discarded passes over
        ``placeholder``."""
        logprobs = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        entropy = torch.zeros_like(logprobs) if with_entropy else None
        micro = self._micro_batches(batch)
        for i in range(self._all_max(len(micro))):
            index, part = micro[i] if i < len(micro) else (None, placeholder)
            lp, ent = self._score(part, with_entropy, model=model)
            if index is not None:
                logprobs[index, : lp.shape[1]] = lp
                if with_entropy:
                    entropy[index, : ent.shape[1]] = ent
        return logprobs, entropy

    def _reference_logprobs(self, batch: UpdateBatch, placeholder: UpdateBatch) -> torch.Tensor:
        if self.ref_policy is not None:
            return self._score_no_grad(batch, placeholder, model=self.ref_policy)[0]
        with self.policy.disable_adapter():
            return self._score_no_grad(batch, placeholder)[0]

    def _diagnostics(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Entropy in both spaces and their log-prob gap, over every response of the batch."""
        zeros = torch.zeros_like(rollout.rewards)
        keep_all = torch.ones_like(rollout.rewards, dtype=torch.bool)
        first_row = torch.zeros_like(keep_all)
        first_row[0] = True
        scored = []
        for space in (ConditionalRL(), MarginalRL()):
            full = space.select(rollout, zeros, keep_all)
            scored.append(self._score_no_grad(full, space.select(rollout, zeros, first_row), with_entropy=True))
        (lc, ec), (lm, em) = scored
        return space_diagnostics(lc, lm, ec, em, full.response_mask)

    # ---------------------------------------------------------------- distributed helpers
    def _all_sum(self, value: float) -> float:
        tensor = torch.tensor(float(value), device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op="sum"))

    def _all_max(self, value: int) -> int:
        tensor = torch.tensor(float(value), device=self.device)
        return int(self.trainer.strategy.reduce(tensor, reduce_op="max"))

    def _any(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

    def _all(self, flag: bool) -> bool:
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=True))

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restore sampling randomness as late as possible: right before the first resumed rollout.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        self._rng_at_batch_start = capture_rng_state()
        self._in_batch, self._updates_in_batch = True, 0

    def training_step(self, batch: dict, batch_idx: int) -> None:
        started = time.perf_counter()
        cfg = self.rollout_cfg
        rollout = self.sample(
            batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.generation_batch_size
        )
        sampled = time.perf_counter()
        metrics = rollout_metrics(rollout.rewards, rollout.group_size, rollout.response_mask, rollout.truncated)
        metrics["reward_timeouts"] = torch.tensor(float(rollout.reward_timeouts))
        metrics["reward_errors"] = torch.tensor(float(rollout.reward_errors))
        metrics["phase"] = torch.tensor(float(self.phase + 1))
        self._keep_text_samples(rollout)

        terms = []
        signal = False
        first_row = torch.zeros_like(rollout.rewards, dtype=torch.bool)
        first_row[0] = True
        for objective, weight in self.phase_terms:
            advantages = objective.advantages(rollout.rewards, rollout.group_size)
            keep = objective.keep(advantages)
            metrics[f"kept_frac/{objective.space}"] = keep.float().mean()
            rows = objective.select(rollout, advantages, keep)
            # A one-row batch in this space for ranks that run out of rows (zero weight).
            placeholder = objective.select(rollout, torch.zeros_like(advantages), first_row)
            signal |= bool((rows.advantages != 0).any())
            terms.append((objective, weight, rows, placeholder))
        metrics["kept_frac"] = torch.stack([metrics[f"kept_frac/{o.space}"] for o, _ in self.phase_terms]).mean()

        if self.diagnostics_every_n_steps and self.global_step % self.diagnostics_every_n_steps == 0:
            metrics.update(self._diagnostics(rollout))

        if self._any(signal):
            self.consecutive_no_signal = 0
            metrics.update(self._update(terms))
        else:
            self._count_no_signal()
            if self.no_signal == "step":  # zero gradients: AdamW's momentum and weight decay act
                metrics.update(self._update(terms))
        metrics["no_signal_batches"] = torch.tensor(float(self.no_signal_total))
        metrics["nonfinite_updates"] = torch.tensor(float(self.nonfinite_total))
        metrics["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        finished = time.perf_counter()
        generated = float(rollout.response_mask.sum())
        metrics["time/rollout_s"] = torch.tensor(sampled - started)
        metrics["time/update_s"] = torch.tensor(finished - sampled)
        metrics["perf/sample_tokens_per_s"] = torch.tensor(generated / max(sampled - started, 1e-9))
        batch_size = batch["prompt_ids"].shape[0]
        logged = {f"train/{k}": v for k, v in metrics.items()}
        # Lightning re-emits a key's last value on later steps of the epoch when it is not logged
        # again; metrics that exist only on some steps (diagnostics, one phase's loss terms, no
        # update) are logged as NaN there instead of a stale value.
        self._train_keys |= logged.keys()
        logged.update({key: torch.tensor(float("nan")) for key in self._train_keys - logged.keys()})
        self.log_dict(logged, on_step=True, batch_size=batch_size)
        self.log("train/accuracy_bar", metrics["accuracy"], prog_bar=True, logger=False, batch_size=batch_size)
        self._in_batch = False

    def _count_no_signal(self) -> None:
        # Every kept response has advantage 0 (e.g. all groups all-right or all-wrong).
        self.no_signal_total += 1
        self.consecutive_no_signal += 1
        outcome = "zero-gradient update" if self.no_signal == "step" else "update skipped"
        log.info("step %d: no learning signal in this batch; %s", self.global_step, outcome)
        if self.consecutive_no_signal >= self.max_consecutive_no_signal:
            raise NoLearningSignalError(
                f"{self.consecutive_no_signal} consecutive batches had no learning signal (every group "
                f"all-right or all-wrong for the active objective) at step {self.global_step}. The task "
                "is too hard or too easy for this policy, or the reward never fires: check the "
                "text samples, the verifier's extraction mode and the data difficulty "
                f"(limit: module.max_consecutive_no_signal={self.max_consecutive_no_signal})."
            )

    def _keep_text_samples(self, rollout: Rollout) -> None:
        self.last_samples = [
            {
                "id": rollout.problems[i].get("id"),
                "question": rollout.problems[i].get("question"),
                "gold": rollout.problems[i].get("answer"),
                "response": rollout.texts[i],
                "extracted": rollout.extracted[i] if i < len(rollout.extracted) else None,
                "reward": float(rollout.rewards[i]),
            }
            for i in range(min(self.num_text_samples, len(rollout.texts)))
        ]

    def _update(self, terms: list[tuple[Objective, float, UpdateBatch, UpdateBatch]]) -> dict[str, torch.Tensor]:
        """Run ``epochs x mini_batches`` optimizer updates over the kept rows of each term."""
        cfg = self.update_cfg
        num_updates = cfg.epochs * cfg.mini_batches
        for objective, _, batch, placeholder in terms:
            if cfg.recompute_old_logprobs == "always" or num_updates > 1:
                index = self._forward_index(objective, batch)
                logprobs, _ = self._score_no_grad(batch.rows(index), placeholder)
                batch.old_logprobs = torch.zeros_like(batch.response_mask, dtype=torch.float32)
                batch.old_logprobs[index, : logprobs.shape[1]] = logprobs
            if objective.kl_coef:
                batch.ref_logprobs = self._reference_logprobs(batch, placeholder)
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(cfg.epochs):
            orders = [
                torch.randperm(len(b), device=self.device) if cfg.mini_batches > 1 else torch.arange(len(b), device=self.device)
                for _, _, b, _ in terms
            ]
            for mb in range(cfg.mini_batches):
                chunks = [
                    (objective, weight, batch.rows(order.tensor_split(cfg.mini_batches)[mb]), placeholder)
                    for (objective, weight, batch, placeholder), order in zip(terms, orders)
                ]
                step_metrics = self._optimizer_update(chunks)
                if step_metrics is not None:
                    updates += 1
                    for key, value in step_metrics.items():
                        totals[key] = totals.get(key, 0.0) + value
        return {key: torch.tensor(value / max(updates, 1)) for key, value in totals.items()}

    def _optimizer_update(self, chunks: list[tuple[Objective, float, UpdateBatch, UpdateBatch]]) -> dict[str, float] | None:
        """Accumulate one mini-batch's loss over micro-batches, then take one optimizer step.

        Returns the update's metrics (summed over ranks), or None if the update was skipped for a
        non-finite loss or gradient norm.
        """
        opt = self.optimizers()
        world = self.trainer.world_size
        sums: dict[str, float] = {"loss": 0.0}
        plans = []
        for objective, weight, batch, placeholder in chunks:
            mask = batch.response_mask
            counts = dict(
                num_tokens=self._all_sum(mask.sum()),
                num_seqs=self._all_sum((mask.sum(dim=1) > 0).sum()),
                num_signal_tokens=self._all_sum(mask[batch.advantages != 0].sum()),
            )
            micro = self._micro_batches(batch.rows(self._forward_index(objective, batch)))
            plans.append([objective, weight, placeholder, micro, self._all_max(len(micro)), counts, batch.old_logprobs])
        if not any(plan[4] for plan in plans):
            # Nothing to forward (no learning signal, or every row skipped): one zero-weight pass
            # still gives every trainable parameter a zero gradient, so AdamW steps (momentum,
            # weight decay) as in the authors' code.
            plans[0][4] = 1
        for objective, weight, placeholder, micro, passes, counts, old_logprobs in plans:
            for i in range(passes):
                # A rank with fewer rows runs a zero-weight pass so collectives stay aligned.
                part, scale = (micro[i][1], weight * world) if i < len(micro) else (placeholder, 0.0)
                logprobs, entropy = self._score(part, with_entropy=bool(objective.entropy_coef))
                if old_logprobs is None:  # one update per rollout: on-policy, ratio exactly 1
                    part.old_logprobs = logprobs.detach()
                loss, term_metrics = objective.loss(
                    logprobs, part, counts["num_tokens"], counts["num_seqs"], self.rollout_cfg.max_new_tokens,
                    entropy, counts["num_signal_tokens"],
                )
                # DDP averages gradients over ranks while the counts above are global: scale by world.
                loss = loss * scale
                if not self._all(bool(torch.isfinite(loss))):
                    return self._skip_nonfinite(opt, "loss")
                self.manual_backward(loss)
                sums["loss"] += float(loss.detach()) / world
                for key, value in term_metrics.items():
                    name = f"{key}/{objective.space}"
                    sums[name] = sums.get(name, 0.0) + float(value) * (scale != 0)
        grad_norm = self._clip_gradients(self.update_cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            return self._skip_nonfinite(opt, "gradient norm")
        opt.step()
        self._updates_in_batch += 1
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.consecutive_nonfinite = 0
        keys = sorted(sums)
        totals = self.trainer.strategy.reduce(torch.tensor([sums[k] for k in keys], device=self.device), reduce_op="sum")
        metrics = dict(zip(keys, totals.tolist()))
        metrics["grad_norm"] = grad_norm
        return metrics

    def _clip_gradients(self, max_norm: float) -> float:
        if hasattr(self.policy, "clip_grad_norm_"):  # FSDP1 computes the norm across shards
            return float(self.policy.clip_grad_norm_(max_norm))
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _skip_nonfinite(self, opt, what: str) -> None:
        opt.zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        log.warning(
            "step %d: non-finite %s, update skipped (%d in a row, %d in total)",
            self.global_step, what, self.consecutive_nonfinite, self.nonfinite_total,
        )
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive updates had a non-finite {what} "
                f"(limit max_consecutive_nonfinite={self.max_consecutive_nonfinite}); training stopped "
                f"at step {self.global_step}. No weights were changed by the skipped updates; the last "
                f"checkpoint is intact."
            )
        return None

    # ---------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        cfg = self.val_cfg
        k = cfg.samples_per_problem
        rollout = self.sample(batch, k, cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, cfg.generation_batch_size)
        correct = (rollout.rewards > 0.5).view(-1, k)
        n = correct.shape[0]
        self.val_accuracy.update(correct.float().mean(dim=1), weight=torch.ones(n))
        passed = torch.tensor([pass_at_k(k, int(c), k) for c in correct.sum(dim=1)])
        self.val_pass.update(passed)
        self.val_length.update(rollout.response_mask.sum(dim=1).float())
        self.val_truncated.update(rollout.truncated.float())
        self.val_timeouts.update(torch.tensor(float(rollout.reward_timeouts)))
        self.val_errors.update(torch.tensor(float(rollout.reward_errors)))
        kwargs = dict(on_step=False, on_epoch=True, batch_size=n)
        self.log(f"val/avg@{k}", self.val_accuracy, prog_bar=True, **kwargs)
        self.log(f"val/pass@{k}", self.val_pass, **kwargs)
        self.log("val/response_len_mean", self.val_length, **kwargs)
        self.log("val/truncated_frac", self.val_truncated, **kwargs)
        self.log("val/reward_timeouts", self.val_timeouts, reduce_fx="sum", **kwargs)
        self.log("val/reward_errors", self.val_errors, reduce_fx="sum", **kwargs)
