"""The LightningModule: the policy, the active objective, and one RL iteration per batch.

How one training step differs from supervised Lightning training:
1. The batch holds prompts only. The rollout engine samples G responses per prompt (no grad,
   KV cache) and a verifier rewards them.
2. Each loss term of the current phase computes advantages, keeps its samples, and scores only
   those, in its own space: after the prompt (P(y|x)) or after the question-free context (P(y)).
   A phase-1 NSR-PreRL step never runs a conditional forward pass.
3. The update engine (``prerl.updates``) makes ``epochs x mini_batches`` optimizer updates per
   rollout batch. ``trainer.global_step`` counts optimizer updates, so the DSRL switch step S is
   a number of updates. A batch without learning signal still makes its (zero-gradient) update,
   as in the authors' code, unless ``no_signal="skip"``.
The step does no file I/O: samples for TensorBoard are kept in memory for a callback.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torchmetrics import MeanMetric, SumMetric

from prerl.algorithms import masked_mean
from prerl.checkpointing import capture_rng_state, check_phases, restore_rng_state, rewind_to_previous_batch_end
from prerl.config_fields import from_mapping
from prerl.device_memory import PhasePeaks
import prerl.console  # noqa: F401  (its import installs the filter of Lightning's tips)
from prerl.engines import build_engine
from prerl.metrics import engine_mismatch, pass_at_k, rollout_metrics, space_diagnostics
from prerl.models.params import count_parameters, disable_dropout
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalRL, Objective, phases_of
from prerl.rollout import Rollout, decode, eos_ids
from prerl.scoring import check_chunkable
from prerl.settings import RolloutConfig, UpdateConfig, ValidationConfig, require
from prerl.updates import LossTerm, NonFiniteLossError, PolicyUpdater

log = logging.getLogger(__name__)


__all__ = ["NoLearningSignalError", "NonFiniteLossError", "PreRLModule"]

# Advantages computed within a group of responses to the same prompt: G = 1 gives no signal.
GROUP_ADVANTAGES = ("grpo", "mean")
NO_SIGNAL_MODES = ("step", "skip")


class NoLearningSignalError(RuntimeError):
    """Too many consecutive batches in which every kept response had advantage 0."""


class PreRLModule(LightningModule):
    """Policy + objective(s) for PreRL, NSR-PreRL, DSRL and the post-train baselines.

    Args:
        model: a ``prerl.models`` spec; the network is built in ``configure_model``.
        tokenizer: the spec's tokenizer (pad and eos set).
        objective: an ``Objective`` or a ``DualSpaceSchedule``.
        reward: callable ``(responses, problems) -> RewardResult``.
        optimizer: partial optimizer constructor (e.g. AdamW with lr), completed with parameters.
        rollout, update, validation: dicts of ``RolloutConfig`` / ``UpdateConfig`` /
            ``ValidationConfig`` fields (``prerl.settings``).
        lr_warmup_steps: linear warm-up of the learning rate, then constant (PreRL: 0).
        disable_dropout: set every dropout of the policy to 0 (TRL's ``disable_dropout``), so
            scoring is deterministic and the ratio to the sampling policy is exactly 1.
        no_signal: a batch in which every kept response has advantage 0 makes an optimizer
            step with zero gradients (``step``: the authors' code; AdamW's momentum and weight
            decay still act and the step counts toward ``max_steps`` and the switch step S) or
            makes none (``skip``: not counted).
        diagnostics_every_n_steps: every N updates also log the mean entropy of the tokens the
            update scores, per space (``train/entropy/<space>``), from the logits it computes
            anyway; 0 disables.
        cross_space_diagnostics_every_n_steps: every N updates score every response in both
            spaces (two extra no-grad passes): entropies (``train/rollout_entropy/<space>``), the
            log-prob gap, and under P(y) the top-1/2/3 and end-of-response probabilities
            (``train/marginal_probs/*``, as the authors log); 0 disables.
        max_consecutive_nonfinite: stop after this many skipped non-finite updates in a row.
        max_consecutive_no_signal: stop after this many batches in a row without learning
            signal: the reward never fires or the task is too hard or too easy (with
            ``no_signal="skip"`` a task the policy never solves would otherwise loop forever).
            None: never stop (with ``no_signal="step"`` only): a study whose policy may collapse
            to all-wrong keeps making its zero-gradient updates to the planned step.
        num_text_samples: responses kept from each rollout for the text-sample logger (the whole
            latest rollout is ``last_rollout``, for analysis callbacks).
        peak_tflops: the device's measured bf16 matmul TFLOP/s (scripts/gpu_check.py prints it); when
            set, ``train/perf/update_peak_frac`` is the update's share of it.
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
        diagnostics_every_n_steps: int = 1,
        cross_space_diagnostics_every_n_steps: int = 0,
        max_consecutive_nonfinite: int = 3,
        max_consecutive_no_signal: int | None = 50,
        num_text_samples: int = 4,
        peak_tflops: float | None = None,
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
        require(no_signal in NO_SIGNAL_MODES, "module.no_signal", no_signal, f"one of {NO_SIGNAL_MODES}")
        require(max_consecutive_no_signal is None or max_consecutive_no_signal >= 1, "module.max_consecutive_no_signal",
                max_consecutive_no_signal, "an integer >= 1, or null (never stop)")
        require(max_consecutive_no_signal is not None or no_signal == "step", "module.max_consecutive_no_signal",
                max_consecutive_no_signal, "a limit with module.no_signal=skip: a skipped batch makes no update, so a "
                "run without signal would never end")
        for phase in self.phases:
            for term_objective, _ in phase:
                require(
                    self.rollout_cfg.group_size >= 2 or term_objective.advantage not in GROUP_ADVANTAGES,
                    "module.rollout.group_size", self.rollout_cfg.group_size,
                    f">= 2 for {term_objective!r}: its {term_objective.advantage!r} advantage compares each "
                    "response with the others of its group (the paper: 8)",
                )
        self.lr_warmup_steps = lr_warmup_steps
        self.disable_dropout = bool(disable_dropout)
        self.no_signal = no_signal
        self.diagnostics_every_n_steps = diagnostics_every_n_steps
        self.cross_space_diagnostics_every_n_steps = cross_space_diagnostics_every_n_steps
        self.max_consecutive_no_signal = max_consecutive_no_signal
        self.num_text_samples = num_text_samples
        self.updater = PolicyUpdater(
            self, self.update_cfg, self.rollout_cfg.temperature, self.rollout_cfg.max_new_tokens, max_consecutive_nonfinite,
            peak_tflops,
        )
        self.engine = None
        self.policy: torch.nn.Module | None = None
        self.ref_policy: torch.nn.Module | None = None
        # The KL reference copied from the policy (DSRL's reference_at_switch=policy): the update at
        # which it was copied (-1: the initial model) and, with LoRA, the adapter tensors it had then.
        self.reference_step = -1
        self.ref_adapter: dict[str, torch.Tensor] | None = None
        self.phase = 0
        self.no_signal_total = 0
        self.consecutive_no_signal = 0
        self._pending_rng: dict | None = None
        # Where the current training batch stands, so a checkpoint written after a crash inside
        # it resumes at its start (same RNG, same data position) and never repeats an update.
        self._rng_at_batch_start: dict | None = None
        self._in_batch = False
        self._train_keys: set[str] = set()
        self._memory: PhasePeaks | None = None
        self.last_samples: list[dict[str, Any]] = []
        self.last_rollout: Rollout | None = None  # the latest training rollout, for analysis callbacks
        self.val_accuracy = MeanMetric()
        self.val_pass = MeanMetric()
        self.val_length = MeanMetric()
        self.val_truncated = MeanMetric()
        self.val_timeouts = SumMetric()
        self.val_errors = SumMetric()
        self.val_rare = MeanMetric()
        self.val_entropy = MeanMetric()

    # The update engine's counters are training state like the module's own (STATE_KEYS).
    @property
    def consecutive_nonfinite(self) -> int:
        return self.updater.consecutive_nonfinite

    @consecutive_nonfinite.setter
    def consecutive_nonfinite(self, value: int) -> None:
        self.updater.consecutive_nonfinite = value

    @property
    def nonfinite_total(self) -> int:
        return self.updater.nonfinite_total

    @nonfinite_total.setter
    def nonfinite_total(self, value: int) -> None:
        self.updater.nonfinite_total = value

    # ---------------------------------------------------------------- model and optimizer
    def configure_model(self) -> None:
        # Built here, not in __init__, so a sharding strategy can wrap it as it is created.
        if self.policy is not None:
            return
        # from_pretrained returns eval mode; Lightning keeps module modes, so train explicitly.
        policy = self.model_spec.build_model().train()
        # Instead of Lightning's model summary (trainer.enable_model_summary=false): its rows are this
        # module's validation metrics and the policy, and its FLOPs are 0 for a model it never runs.
        log.info("policy: %s, %s parameters", type(policy).__name__, count_parameters(policy))
        if self.disable_dropout and disable_dropout(policy):
            log.info("dropout disabled in the policy (module.disable_dropout=true)")
        if self.update_cfg.logprob_chunk_tokens:
            check_chunkable(policy)
        if self._needs_reference() and not hasattr(policy, "disable_adapter"):
            # Full fine-tuning needs a frozen copy; with LoRA the adapter is switched off instead.
            self.ref_policy = self._shard(self.model_spec.build_model().requires_grad_(False).eval())
        if (self._needs_reference() and hasattr(policy, "disable_adapter") and self._is_sharded()
                and getattr(self.objective, "reference_at_switch", "base") == "policy"):
            raise ValueError("objective.reference_at_switch=policy: a sharded LoRA policy's adapter cannot be copied "
                             "into the KL reference (each rank holds a shard); set objective.reference_at_switch=base")
        self.policy = self._shard(policy)
        self.engine = build_engine(
            self.rollout_cfg.engine, policy=lambda: self.policy, tokenizer=self.tokenizer, synced_gpus=self._is_sharded,
            **dict(self.rollout_cfg.engine_options),
        )

    def _needs_reference(self) -> bool:
        return any(obj.kl_coef for phase in self.phases for obj, _ in phase)

    @torch.no_grad()
    def reference_from_policy(self) -> bool:
        """Make the KL reference a frozen copy of the policy as it is now (the authors'
        ``update_ref_from_actor`` at the DSRL switch); False when no term has a KL penalty."""
        if not self._needs_reference():
            return False
        if self.ref_policy is not None:
            # Both were built from the spec and sharded alike: the same parameters, in order.
            for (name, ref), (_, own) in zip(self._named_tensors(self.ref_policy), self._named_tensors(self.policy),
                                             strict=True):
                if ref.shape != own.shape:
                    raise RuntimeError(f"KL reference and policy differ at {name}: {tuple(ref.shape)} vs {tuple(own.shape)}")
                ref.copy_(own)
        else:
            self.ref_adapter = {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        self.reference_step = self.global_step
        return True

    @staticmethod
    def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*model.named_parameters(), *model.named_buffers()]

    @contextlib.contextmanager
    def lora_reference(self) -> Iterator[None]:
        """The LoRA policy as its KL reference: the adapter switched off (the base model), or the
        adapter's tensors of the switch swapped in for the duration (reference_at_switch=policy)."""
        if self.ref_adapter is None:
            with self.policy.disable_adapter():
                yield
            return
        params = dict(self.policy.named_parameters())
        current = {n: params[n].detach().clone() for n in self.ref_adapter}
        with torch.no_grad():
            for n, value in self.ref_adapter.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in current.items():
                    params[n].copy_(value)

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy.shard_policy(model) if hasattr(strategy, "shard_policy") else model

    def _is_sharded(self) -> bool:
        # Sharded ranks must keep stepping generate() together until every rank is done.
        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))

    def response_room(self) -> tuple[int | None, dict[str, tuple[str, int]]]:
        """The model's context (None: unknown) and, per data split, the key and value of the longest
        response generated after its prompts: PromptDataModule.setup checks that every prompt leaves
        it that room, before anything is generated."""
        return self.model_spec.context_length(), {
            "train": ("module.rollout.max_new_tokens", self.rollout_cfg.max_new_tokens),
            "val": ("module.validation.max_new_tokens", self.val_cfg.max_new_tokens),
        }

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
            from prerl.switch_rules import SwitchRule

            adaptive = self.objective.adaptive_switch
            rule = SwitchRule(**adaptive) if adaptive else None
            return [PhaseSwitch(self.objective.switch_step, self.objective.reset_optimizer, rule,
                                reference_from_policy=self.objective.reference_at_switch == "policy")]
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
        spec. A frozen KL reference copy of the initial model is not saved: it is rebuilt too; one
        copied from the policy at the DSRL switch is (with LoRA: its adapter, ``prerl_ref_adapter``).
        """
        if self._adapter_only():
            return self._trainable_keys()
        if self.ref_policy is not None and self.reference_step < 0:
            return {k for k in self.state_dict() if not k.startswith("ref_policy.")}
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._saved_keys()
        if keep is not None and isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["prerl_rng"] = self._gather_rng_states()
        checkpoint["prerl_state"] = {key: getattr(self, key) for key in self.STATE_KEYS}
        checkpoint["prerl_state"]["num_phases"] = len(self.phases)
        checkpoint["prerl_state"]["reference_step"] = self.reference_step
        if self.ref_adapter is not None:
            checkpoint["prerl_ref_adapter"] = {n: v.cpu() for n, v in self.ref_adapter.items()}
        if self._in_batch and "loops" in checkpoint:
            rewind_to_previous_batch_end(checkpoint["loops"])

    def resumable_mid_batch(self) -> bool:
        """True unless a training batch is under way and has already updated the weights: a
        checkpoint written now would then redo that update on resume."""
        return not (self._in_batch and self.updater.updates_in_batch)

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
        # Before the required keys: a reference copied from the policy is in the checkpoint.
        self.reference_step = int(state.get("reference_step", -1))
        self.ref_adapter = checkpoint.get("prerl_ref_adapter")
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
        out = self.engine.generate(
            batch["prompt_ids"], batch["prompt_mask"], num_samples, max_new_tokens, temperature, top_p, top_k,
            generation_batch_size,
        )
        rep = lambda t: t.repeat_interleave(num_samples, dim=0)  # noqa: E731
        rollout = Rollout(
            prompt_ids=rep(batch["prompt_ids"]),
            prompt_mask=rep(batch["prompt_mask"]),
            context_ids=rep(batch["context_ids"]),
            response_ids=out.response_ids,
            response_mask=out.response_mask,
            truncated=out.truncated,
            texts=decode(self.tokenizer, out.response_ids, out.response_mask),
            problems=[p for p in batch["problems"] for _ in range(num_samples)],
            group_size=num_samples,
        )
        result = self.reward(rollout.texts, rollout.problems)
        rollout.rewards = result.rewards.to(self.device, torch.float32)
        rollout.reward_timeouts = int(result.timeouts)
        rollout.reward_errors = int(getattr(result, "errors", 0))
        rollout.extracted = list(result.extracted)
        rollout.engine_logprobs = out.logprobs
        return rollout

    def _behaviour_logprobs(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Another engine sampled the responses: score them with the training policy after the
        prompt (the old log-probs are always the training model's) and measure the mismatch."""
        zeros = torch.zeros_like(rollout.rewards)
        first_row = torch.zeros_like(rollout.rewards, dtype=torch.bool)
        first_row[0] = True
        space = ConditionalRL()
        full = space.select(rollout, zeros, torch.ones_like(first_row))
        rollout.behaviour_logprobs, _ = self.updater.score_no_grad(full, space.select(rollout, zeros, first_row))
        mismatch = engine_mismatch(rollout.behaviour_logprobs, rollout.engine_logprobs, rollout.response_mask)
        return {f"rollout_mismatch/{k}": v for k, v in mismatch.items()}

    def _loss_terms(self, rollout: Rollout, metrics: dict) -> list[LossTerm]:
        """The active phase's loss terms: advantages, kept rows in each term's space."""
        terms = []
        first_row = torch.zeros_like(rollout.rewards, dtype=torch.bool)
        first_row[0] = True
        for objective, weight in self.phase_terms:
            advantages = objective.advantages(rollout.rewards, rollout.group_size)
            keep = objective.keep(advantages)
            metrics[f"kept_frac/{objective.space}"] = keep.float().mean()
            # A one-row batch in this space for ranks that run out of rows (zero weight).
            placeholder = objective.select(rollout, torch.zeros_like(advantages), first_row)
            terms.append(LossTerm(objective, weight, objective.select(rollout, advantages, keep), placeholder))
        metrics["kept_frac"] = torch.stack([metrics[f"kept_frac/{t.objective.space}"] for t in terms]).mean()
        return terms

    def _cross_space_diagnostics(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Entropy in both spaces and their log-prob gap, over every response of the batch; from the
        question-free pass also the top-1/2/3 and end-of-response probabilities under P(y) that the
        authors log (``marginal_probs/*``)."""
        zeros = torch.zeros_like(rollout.rewards)
        keep_all = torch.ones_like(rollout.rewards, dtype=torch.bool)
        first_row = torch.zeros_like(keep_all)
        first_row[0] = True
        conditional, marginal = ConditionalRL(), MarginalRL()
        full = conditional.select(rollout, zeros, keep_all)
        lc, ec = self.updater.score_no_grad(full, conditional.select(rollout, zeros, first_row), with_entropy=True)
        full = marginal.select(rollout, zeros, keep_all)
        stop_ids = eos_ids(getattr(self.policy, "generation_config", None), self.tokenizer)
        lm, em, summary = self.updater.score_and_summarize_no_grad(
            full, marginal.select(rollout, zeros, first_row), stop_ids)
        metrics = space_diagnostics(lc, lm, ec, em, full.response_mask)
        for i, key in enumerate(("top1", "top2", "top3", "eos")):
            metrics[f"marginal_probs/{key}"] = masked_mean(summary[..., i], full.response_mask)
        return metrics

    def _response_entropy(self, rollout: Rollout) -> torch.Tensor:
        """(N, T) entropy of the policy at each sampled token, after the prompt (0 on padding)."""
        zeros = torch.zeros_like(rollout.rewards)
        first_row = torch.zeros_like(rollout.rewards, dtype=torch.bool)
        first_row[0] = True
        space = ConditionalRL()
        full = space.select(rollout, zeros, torch.ones_like(first_row))
        _, entropy = self.updater.score_no_grad(full, space.select(rollout, zeros, first_row), with_entropy=True)
        return entropy * full.response_mask

    @property
    def memory(self) -> PhasePeaks:
        """The accelerator's peak memory per phase (nothing on CPU): prerl.device_memory."""
        if self._memory is None or self._memory.device != self.device:
            self._memory = PhasePeaks(self.device)
        return self._memory

    @staticmethod
    def _every(n: int, step: int) -> bool:
        return bool(n) and step % n == 0

    # ---------------------------------------------------------------- the loggers' step
    def _set_logging_step(self) -> None:
        """Every point is logged at the number of optimizer updates of the policy it measures: a
        batch's ``train/*`` (its rollout, then its update) at the updates made before it, validation
        after k updates at k, as the alignment probe. Lightning logs ``self.log`` values at its count
        of finished training batches (``_batches_that_stepped``, which only loggers read): that
        counts batches, not updates, and lags by one in the validations inside ``fit``."""
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step

    def on_validation_start(self) -> None:
        self._set_logging_step()
        self.memory.lap()  # validation's peak is its own, not the step's before it

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._set_logging_step()
        # Restore sampling randomness as late as possible: right before the first resumed rollout.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        self._rng_at_batch_start = capture_rng_state()
        self._in_batch, self.updater.updates_in_batch = True, 0

    def training_step(self, batch: dict, batch_idx: int) -> None:
        started = time.perf_counter()
        self.memory.lap()  # the peaks below are this step's own
        cfg = self.rollout_cfg
        rollout = self.sample(
            batch, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.generation_batch_size
        )
        sampled = time.perf_counter()
        rollout_peak = self.memory.lap()
        metrics = rollout_metrics(rollout.rewards, rollout.group_size, rollout.response_mask, rollout.truncated)
        metrics["reward_timeouts"] = torch.tensor(float(rollout.reward_timeouts))
        metrics["reward_errors"] = torch.tensor(float(rollout.reward_errors))
        metrics["phase"] = torch.tensor(float(self.phase + 1))
        self._keep_text_samples(rollout)
        if rollout.engine_logprobs is not None:
            metrics.update(self._behaviour_logprobs(rollout))

        terms = self._loss_terms(rollout, metrics)
        if self._every(self.cross_space_diagnostics_every_n_steps, self.global_step):
            metrics.update(self._cross_space_diagnostics(rollout))
        with_entropy = self._every(self.diagnostics_every_n_steps, self.global_step)
        signal = any(bool((t.batch.advantages != 0).any()) for t in terms)
        if self.updater.collectives.any(signal):
            self.consecutive_no_signal = 0
            metrics.update(self.updater.run(terms, with_entropy))
        else:
            self._count_no_signal()
            if self.no_signal == "step":  # zero gradients: AdamW's momentum and weight decay act
                metrics.update(self.updater.run(terms, with_entropy))

        if self.updater.updates_in_batch:
            self.engine.sync_weights(self.policy)  # the next rollout samples from the updated policy
        metrics["no_signal_batches"] = torch.tensor(float(self.no_signal_total))
        metrics["nonfinite_updates"] = torch.tensor(float(self.nonfinite_total))
        metrics["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        finished = time.perf_counter()
        metrics["time/rollout_s"] = torch.tensor(sampled - started)
        metrics["time/update_s"] = torch.tensor(finished - sampled)
        metrics["perf/sample_tokens_per_s"] = torch.tensor(float(rollout.response_mask.sum()) / max(sampled - started, 1e-9))
        if self.memory.enabled:
            metrics["memory/rollout_peak_gib"] = torch.tensor(rollout_peak)
            metrics["memory/update_peak_gib"] = torch.tensor(self.memory.lap())
        self._log_train(metrics, batch["prompt_ids"].shape[0])
        self._in_batch = False

    def _log_train(self, metrics: dict[str, torch.Tensor], batch_size: int) -> None:
        logged = {f"train/{k}": v for k, v in metrics.items()}
        # Lightning re-emits a key's last value on later steps of the epoch when it is not logged
        # again; metrics that exist only on some steps (diagnostics, one phase's loss terms, no
        # update) are logged as NaN there instead of a stale value.
        self._train_keys |= logged.keys()
        logged.update({key: torch.tensor(float("nan")) for key in self._train_keys - logged.keys()})
        self.log_dict(logged, on_step=True, batch_size=batch_size)
        self.log("train/accuracy_bar", metrics["accuracy"], prog_bar=True, logger=False, batch_size=batch_size)

    def _count_no_signal(self) -> None:
        # Every kept response has advantage 0 (e.g. all groups all-right or all-wrong).
        self.no_signal_total += 1
        self.consecutive_no_signal += 1
        outcome = "zero-gradient update" if self.no_signal == "step" else "update skipped"
        log.info("step %d: no learning signal in this batch; %s", self.global_step, outcome)
        if self.max_consecutive_no_signal is not None and self.consecutive_no_signal >= self.max_consecutive_no_signal:
            raise NoLearningSignalError(
                f"{self.consecutive_no_signal} consecutive batches had no learning signal (every group "
                f"all-right or all-wrong for the active objective) at step {self.global_step}. The task "
                "is too hard or too easy for this policy, or the reward never fires: check the "
                "text samples, the verifier's extraction mode and the data difficulty "
                f"(limit: module.max_consecutive_no_signal={self.max_consecutive_no_signal})."
            )

    def _keep_text_samples(self, rollout: Rollout) -> None:
        self.last_rollout = rollout
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
        # Problems solved by exactly one of the k samples: the rare solutions NSR may prune.
        self.val_rare.update((correct.sum(dim=1) == 1).float())
        self.val_length.update(rollout.response_mask.sum(dim=1).float())
        self.val_truncated.update(rollout.truncated.float())
        self.val_timeouts.update(torch.tensor(float(rollout.reward_timeouts)))
        self.val_errors.update(torch.tensor(float(rollout.reward_errors)))
        kwargs = dict(on_step=False, on_epoch=True, batch_size=n)
        if cfg.entropy:
            tokens = rollout.response_mask.sum()
            entropy = self._response_entropy(rollout)
            self.val_entropy.update(entropy.sum() / tokens.clamp(min=1), weight=tokens)
            self.log("val/entropy", self.val_entropy, **kwargs)
        if self.memory.enabled:
            self.log("val/memory/peak_gib", self.memory.lap(), reduce_fx="max", **kwargs)
        self.log(f"val/avg@{k}", self.val_accuracy, prog_bar=True, **kwargs)
        self.log(f"val/pass@{k}", self.val_pass, **kwargs)
        self.log("val/rare_solutions", self.val_rare, **kwargs)
        self.log("val/response_len_mean", self.val_length, **kwargs)
        self.log("val/truncated_frac", self.val_truncated, **kwargs)
        self.log("val/reward_timeouts", self.val_timeouts, reduce_fx="sum", **kwargs)
        self.log("val/reward_errors", self.val_errors, reduce_fx="sum", **kwargs)
