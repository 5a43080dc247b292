"""The update engine: from the loss terms of one rollout batch to optimizer updates.

1. ``epochs x mini_batches`` optimizer updates per rollout batch (PreRL: one); the rows of each
   term are shuffled and split into mini-batches when there are several.
2. Each update accumulates micro-batches (a row count, or packed under a token budget) with the
   token and sequence counts of the whole mini-batch on all ranks, so how the rows are split over
   micro-batches and ranks never changes the update.
3. Rows whose advantage is 0 are not forwarded (their surrogate loss and gradient are exactly 0;
   their tokens still count), unless a KL or entropy term gives them a gradient.
4. Ranks with fewer micro-batches run zero-weight passes over a one-row placeholder, so sharded
   (collective) forwards stay aligned; an update with nothing to forward still runs one, so every
   parameter gets a zero gradient and AdamW still steps, as in the authors' code.
5. A non-finite loss or gradient norm skips the update (weights untouched); several in a row stop
   training.
6. Every scoring pass adds its model FLOPs (``prerl.flops``: from the rows and padded width it
   forwards) to the update's count: ``perf/update_tflops`` is that count over the wall time of
   ``run`` (per rank), ``perf/update_peak_frac`` its fraction of ``peak_tflops`` when given.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from prerl.algorithms import truncated_is_weights
from prerl.flops import ModelShape, forward_flops, training_flops
from prerl.micro_batches import micro_batch_indices
from prerl.models.lora import is_lora_model
from prerl.models.params import unwrap_policy
from prerl.objectives import Objective, UpdateBatch
from prerl.scoring import score_and_summarize, score_responses
from prerl.settings import UpdateConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a NaN or infinite loss or gradient norm."""


@dataclass
class LossTerm:
    """One loss term of a rollout batch: its objective and weight, the rows it trains on (in its
    own space), and a one-row zero-advantage placeholder for ranks that run out of rows."""

    objective: Objective
    weight: float
    batch: UpdateBatch
    placeholder: UpdateBatch


class Collectives:
    """Sums, maxima and votes over ranks (identities on one process)."""

    def __init__(self, strategy, device: torch.device):
        self.strategy = strategy
        self.device = device

    def sum(self, value: float) -> float:
        return float(self.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="sum"))

    def max(self, value: int) -> int:
        return int(self.strategy.reduce(torch.tensor(float(value), device=self.device), reduce_op="max"))

    def any(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(flag), all=False))

    def all(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(flag), all=True))

    def sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        totals = self.strategy.reduce(torch.tensor([values[k] for k in keys], device=self.device), reduce_op="sum")
        return dict(zip(keys, totals.tolist()))


class PolicyUpdater:
    """Scores update batches with the policy and makes the optimizer updates of one rollout batch.

    Args:
        host: the LightningModule (its policy, reference policy, optimizer, scheduler, trainer).
        cfg: ``module.update`` settings.
        temperature: the sampling temperature (logits are divided by it when scoring).
        norm_length: the constant of ``seq-mean-token-sum-norm`` (the max response length).
        max_consecutive_nonfinite: stop after this many skipped non-finite updates in a row.
        peak_tflops: the device's bf16 matmul rate (measured, e.g. by scripts/gpu_check.py), for
            ``perf/update_peak_frac``; None: not reported.
    State saved in checkpoints: ``consecutive_nonfinite``, ``nonfinite_total``.
    """

    def __init__(self, host, cfg: UpdateConfig, temperature: float, norm_length: int, max_consecutive_nonfinite: int,
                 peak_tflops: float | None = None):
        self.host = host
        self.peak_tflops = peak_tflops
        self.flops = 0  # model FLOPs of the scoring passes since ``run`` began
        self.cfg = cfg
        self.temperature = temperature or 1.0
        self.norm_length = norm_length
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0
        self.updates_in_batch = 0  # optimizer steps since the host's batch began (reset by the host)

    @property
    def collectives(self) -> Collectives:
        return Collectives(self.host.trainer.strategy, self.host.device)

    # ------------------------------------------------------------------ scoring
    def score(self, batch: UpdateBatch, with_entropy: bool = False, model=None):
        """Log-probs (and entropies) (M, T) of ``batch``'s responses after its prefixes."""
        self.flops += self.pass_flops(batch)
        return score_responses(
            model if model is not None else self.host.policy,
            batch.prefix_ids,
            batch.prefix_mask,
            batch.response_ids,
            batch.response_mask,
            temperature=self.temperature,
            with_entropy=with_entropy,
            chunk_tokens=self.cfg.logprob_chunk_tokens,
        )

    def pass_flops(self, batch: UpdateBatch) -> int:
        """Model FLOPs of one scoring pass over ``batch``: forward + backward under autograd, else forward."""
        policy = self.host.policy
        shape = ModelShape.from_config(unwrap_policy(policy).config)
        rows, response_width = batch.response_ids.shape
        width = batch.prefix_ids.shape[1] + response_width
        # the chunked head projects the real response tokens only; else logits_to_keep = width + 1
        head = int(batch.response_mask.sum()) if self.cfg.logprob_chunk_tokens else rows * (response_width + 1)
        if torch.is_grad_enabled():
            return training_flops(shape, rows, width, head, weights_trained=not is_lora_model(policy))
        return forward_flops(shape, rows, width, head)

    def micro_batches(self, batch: UpdateBatch) -> list[tuple[torch.Tensor, UpdateBatch]]:
        """(row index, sub-batch) of each micro-batch: ``micro_batch_size`` rows, packed under
        ``max_tokens_per_micro_batch`` when it is set."""
        groups = micro_batch_indices(
            batch.prefix_mask.sum(dim=1), batch.response_mask.sum(dim=1),
            self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch,
        )
        return [(index, batch.rows(index)) for index in groups]

    def forward_index(self, objective: Objective, batch: UpdateBatch) -> torch.Tensor:
        """(m,) the rows whose forward pass can change the update (see the module docstring, 3)."""
        if self.cfg.skip_zero_advantage and not objective.kl_coef and not objective.entropy_coef:
            return (batch.advantages != 0).nonzero(as_tuple=True)[0]
        return torch.arange(len(batch), device=batch.advantages.device)

    @torch.no_grad()
    def score_no_grad(
        self, batch: UpdateBatch, placeholder: UpdateBatch, model=None, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (M, T) [and entropies] of ``batch`` in micro-batches, as many forward passes
        on every rank (padding with discarded passes over ``placeholder``)."""
        logprobs = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        entropy = torch.zeros_like(logprobs) if with_entropy else None
        micro = self.micro_batches(batch)
        for i in range(self.collectives.max(len(micro))):
            index, part = micro[i] if i < len(micro) else (None, placeholder)
            lp, ent = self.score(part, with_entropy, model=model)
            if index is not None:
                logprobs[index, : lp.shape[1]] = lp
                if with_entropy:
                    entropy[index, : ent.shape[1]] = ent
        return logprobs, entropy

    @torch.no_grad()
    def score_and_summarize_no_grad(
        self, batch: UpdateBatch, placeholder: UpdateBatch, stop_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``score_no_grad`` with entropies, plus each token's top-1/2/3 and end probabilities (M, T, 4)."""
        logprobs = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        entropy = torch.zeros_like(logprobs)
        summary = logprobs.new_zeros(*logprobs.shape, 4)
        micro = self.micro_batches(batch)
        for i in range(self.collectives.max(len(micro))):
            index, part = micro[i] if i < len(micro) else (None, placeholder)
            self.flops += self.pass_flops(part)
            lp, ent, summ = score_and_summarize(
                self.host.policy, part.prefix_ids, part.prefix_mask, part.response_ids, part.response_mask, stop_ids,
                temperature=self.temperature, chunk_tokens=self.cfg.logprob_chunk_tokens,
            )
            if index is not None:
                logprobs[index, : lp.shape[1]] = lp
                entropy[index, : ent.shape[1]] = ent
                summary[index, : summ.shape[1]] = summ
        return logprobs, entropy, summary

    def _reference_logprobs(self, batch: UpdateBatch, placeholder: UpdateBatch) -> torch.Tensor:
        if self.host.ref_policy is not None:
            return self.score_no_grad(batch, placeholder, model=self.host.ref_policy)[0]
        with self.host.lora_reference():  # LoRA: the base model, or the adapter copied at the DSRL switch
            return self.score_no_grad(batch, placeholder)[0]

    # ------------------------------------------------------------------ updates
    def run(self, terms: list[LossTerm], with_entropy: bool = False) -> dict[str, torch.Tensor]:
        """All optimizer updates of one rollout batch; the mean of their metrics. With
        ``with_entropy`` also the mean entropy of the forwarded tokens per space (``entropy/<space>``,
        from the logits the update computes anyway)."""
        cfg = self.cfg
        started, self.flops = time.perf_counter(), 0
        num_updates = cfg.epochs * cfg.mini_batches
        for term in terms:
            batch = term.batch
            if batch.behaviour_logprobs is not None and cfg.rollout_correction == "tis":
                batch.token_weights = truncated_is_weights(
                    batch.behaviour_logprobs, batch.engine_logprobs, cfg.rollout_correction_cap
                )
            if batch.behaviour_logprobs is not None and term.objective.space == "conditional":
                batch.old_logprobs = batch.behaviour_logprobs  # already recomputed by the training model
            elif cfg.recompute_old_logprobs == "always" or num_updates > 1:
                index = self.forward_index(term.objective, term.batch)
                logprobs, _ = self.score_no_grad(term.batch.rows(index), term.placeholder)
                term.batch.old_logprobs = torch.zeros_like(term.batch.response_mask, dtype=torch.float32)
                term.batch.old_logprobs[index, : logprobs.shape[1]] = logprobs
            if term.objective.kl_coef:
                term.batch.ref_logprobs = self._reference_logprobs(term.batch, term.placeholder)
        totals: dict[str, float] = {}
        reported: dict[str, int] = {}  # updates that reported each key (an entropy may be missing from one)
        device = self.host.device
        for _ in range(cfg.epochs):
            orders = [
                torch.randperm(len(t.batch), device=device) if cfg.mini_batches > 1 else torch.arange(len(t.batch), device=device)
                for t in terms
            ]
            for mb in range(cfg.mini_batches):
                chunk = [
                    LossTerm(t.objective, t.weight, t.batch.rows(order.tensor_split(cfg.mini_batches)[mb]), t.placeholder)
                    for t, order in zip(terms, orders)
                ]
                step_metrics = self._optimizer_update(chunk, with_entropy)
                if step_metrics is not None:
                    for key, value in step_metrics.items():
                        totals[key] = totals.get(key, 0.0) + value
                        reported[key] = reported.get(key, 0) + 1
        metrics = {key: torch.tensor(value / reported[key]) for key, value in totals.items()}
        # Each update ends by reading its metrics off the device, so the kernels have finished here.
        tflops = self.flops / max(time.perf_counter() - started, 1e-9) / 1e12
        metrics["perf/update_tflops"] = torch.tensor(tflops)
        if self.peak_tflops:
            metrics["perf/update_peak_frac"] = torch.tensor(tflops / self.peak_tflops)
        return metrics

    def _optimizer_update(self, terms: list[LossTerm], with_entropy: bool) -> dict[str, float] | None:
        """Accumulate one mini-batch's loss over micro-batches, then take one optimizer step.

        Returns the update's metrics (summed over ranks), or None if the update was skipped for a
        non-finite loss or gradient norm.
        """
        host, ranks = self.host, self.collectives
        world = host.trainer.world_size
        sums: dict[str, float] = {"loss": 0.0}
        plans = []
        for term in terms:
            mask = term.batch.response_mask
            counts = dict(
                num_tokens=ranks.sum(mask.sum()),
                num_seqs=ranks.sum((mask.sum(dim=1) > 0).sum()),
                num_signal_tokens=ranks.sum(mask[term.batch.advantages != 0].sum()),
            )
            micro = self.micro_batches(term.batch.rows(self.forward_index(term.objective, term.batch)))
            plans.append([term, micro, ranks.max(len(micro)), counts])
        if not any(passes for _, _, passes, _ in plans):
            plans[0][2] = 1  # nothing to forward: one zero-weight pass (see the module docstring, 4)
        for term, micro, passes, counts in plans:
            objective = term.objective
            entropy_wanted = bool(objective.entropy_coef) or with_entropy
            for i in range(passes):
                # A rank with fewer rows runs a zero-weight pass so collectives stay aligned.
                part, scale = (micro[i][1], term.weight * world) if i < len(micro) else (term.placeholder, 0.0)
                logprobs, entropy = self.score(part, with_entropy=entropy_wanted)
                # One update per rollout (on-policy) or a zero-weight placeholder pass, whose rows
                # carry no old / reference log-probs: ratio exactly 1, KL exactly 0.
                if part.old_logprobs is None:
                    part.old_logprobs = logprobs.detach()
                if objective.kl_coef and part.ref_logprobs is None:
                    part.ref_logprobs = logprobs.detach()
                loss, term_metrics = objective.loss(
                    logprobs, part, counts["num_tokens"], counts["num_seqs"], self.norm_length,
                    entropy if objective.entropy_coef else None, counts["num_signal_tokens"],
                )
                # DDP averages gradients over ranks while the counts above are global: scale by world.
                loss = loss * scale
                if not ranks.all(bool(torch.isfinite(loss))):
                    return self._skip_nonfinite("loss")
                host.manual_backward(loss)
                sums["loss"] += float(loss.detach()) / world
                for key, value in term_metrics.items():
                    name = f"{key}/{objective.space}"
                    sums[name] = sums.get(name, 0.0) + float(value) * (scale != 0)
                if with_entropy:
                    # Token sums (0 for placeholder passes), divided by the token count after the
                    # reduction over ranks; every rank adds the same keys (the reduction is collective).
                    weight = float(scale != 0)
                    for key, value in (("entropy_sum", (entropy.detach() * part.response_mask).sum()),
                                       ("entropy_tokens", part.response_mask.sum())):
                        name = f"{key}/{objective.space}"
                        sums[name] = sums.get(name, 0.0) + float(value) * weight
        grad_norm = self._clip_gradients(self.cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            return self._skip_nonfinite("gradient norm")
        optimizer = host.optimizers()
        optimizer.step()
        self.updates_in_batch += 1
        optimizer.zero_grad(set_to_none=True)
        host.lr_schedulers().step()
        self.consecutive_nonfinite = 0
        metrics = ranks.sum_dict(sums)
        for key in [k for k in metrics if k.startswith("entropy_sum/")]:
            space = key.split("/", 1)[1]
            tokens, total = metrics.pop(f"entropy_tokens/{space}"), metrics.pop(key)
            if tokens > 0:  # else no row of this space was forwarded (no signal): nothing was measured
                metrics[f"entropy/{space}"] = total / tokens
        metrics["grad_norm"] = grad_norm
        return metrics

    def _clip_gradients(self, max_norm: float) -> float:
        policy = self.host.policy
        if hasattr(policy, "clip_grad_norm_"):  # FSDP1 computes the norm across shards
            return float(policy.clip_grad_norm_(max_norm))
        params = [p for p in policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _skip_nonfinite(self, what: str) -> None:
        self.host.optimizers().zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        step = self.host.global_step
        log.warning("step %d: non-finite %s, update skipped (%d in a row, %d in total)",
                    step, what, self.consecutive_nonfinite, self.nonfinite_total)
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive updates had a non-finite {what} "
                f"(limit max_consecutive_nonfinite={self.max_consecutive_nonfinite}); training stopped "
                f"at step {step}. No weights were changed by the skipped updates; the last checkpoint is intact."
            )
        return None
