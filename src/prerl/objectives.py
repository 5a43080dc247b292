"""Objectives: swappable policy-gradient loss terms in post-train or pre-train space.

An objective decides three things (docs/method.md, "Objectives"):
1. the advantage of each response (``grpo``, ``mean``, ``nsr``, ``psr``, ``w_reinforce``);
2. which responses it trains on (a sample filter on the advantages);
3. the space of the update: ``ConditionalRL`` scores y after the prompt x, log P(y|x);
   ``MarginalRL`` scores y after a question-free context c, log P(y) (PreRL).
``MarginalNSR`` is NSR-PreRL. ``DualSpaceSchedule`` chains NSR-PreRL and GRPO (DSRL); the
switch itself is made by ``prerl.callbacks.PhaseSwitch``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prerl.algorithms import (
    ADVANTAGES,
    AGG_MODES,
    FILTERS,
    aggregate,
    clipped_surrogate,
    kl_penalty,
)
from prerl.rollout import Rollout

REFERENCE_AT_SWITCH = ("policy", "base")  # DualSpaceSchedule.reference_at_switch

@dataclass
class UpdateBatch:
    """The rows one objective trains on, in its own space.

    Attributes:
        prefix_ids, prefix_mask: (M, P) the prompt (conditional) or context (marginal).
        response_ids, response_mask: (M, T) trimmed to the longest kept response.
        advantages: (M,).
        old_logprobs: (M, T) of the sampling policy in the same space, or None until computed.
        ref_logprobs: (M, T) of the KL reference, or None.
        engine_logprobs: (M, T) of the sampled tokens as the rollout engine computed them, or None
            (an engine other than the policy itself, e.g. vLLM).
        behaviour_logprobs: (M, T) of the sampled tokens under the training policy, after the
            prompt (the space they were sampled in), when ``engine_logprobs`` is set.
        token_weights: (M, T) importance weights of each token's loss (truncated importance
            sampling for an engine's off-policy samples), or None.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    behaviour_logprobs: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def rows(self, index: torch.Tensor) -> "UpdateBatch":
        """The sub-batch at ``index`` (M',), trimmed to its longest prefix and response (the
        prefix is left-padded, so only padding columns are dropped)."""
        mask = self.response_mask[index]
        length = max(int(mask.sum(dim=1).max().item()), 1) if len(index) else 1
        width = max(int(self.prefix_mask[index].sum(dim=1).max().item()), 1) if len(index) else 1
        pick = lambda t: None if t is None else t[index][:, :length]  # noqa: E731
        return UpdateBatch(
            prefix_ids=self.prefix_ids[index][:, -width:],
            prefix_mask=self.prefix_mask[index][:, -width:],
            response_ids=self.response_ids[index][:, :length],
            response_mask=mask[:, :length],
            advantages=self.advantages[index],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            engine_logprobs=pick(self.engine_logprobs),
            behaviour_logprobs=pick(self.behaviour_logprobs),
            token_weights=pick(self.token_weights),
        )


class Objective:
    """One policy-gradient loss term (see the module docstring).

    Args:
        advantage: name in ``prerl.algorithms.ADVANTAGES``.
        sample_filter: name in ``prerl.algorithms.FILTERS``.
        loss_coef: multiplies the loss (0.01 for the marginal term in the PreRL code).
        clip_low, clip_high: PPO epsilons (0.2 / 0.2 in the PreRL paper).
        dual_clip: dual-clip constant c for A < 0 (10 in the PreRL code), None to disable.
        loss_agg: one of ``prerl.algorithms.AGG_MODES`` (PreRL: token-mean).
        kl_coef: weight of a KL penalty to the reference policy (0 in the PreRL paper).
        kl_estimator: k1, k2 or k3.
        entropy_coef: weight of an entropy bonus (0 in the PreRL paper).
        advantage_kwargs: extra arguments of the advantage function (e.g. positive_weight).
    """

    space: str = ""

    def __init__(
        self,
        advantage: str = "grpo",
        sample_filter: str = "all",
        loss_coef: float = 1.0,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = 10.0,
        loss_agg: str = "token-mean",
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        advantage_kwargs: dict | None = None,
    ):
        self._advantage_fn = ADVANTAGES.get(advantage)
        self._filter_fn = FILTERS.get(sample_filter)
        if loss_agg not in AGG_MODES:
            raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {AGG_MODES}")
        if kl_coef:
            kl_penalty(torch.zeros(1), torch.zeros(1), kl_estimator)  # validate the name now
        self.advantage = advantage
        self.sample_filter = sample_filter
        self.loss_coef = float(loss_coef)
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.dual_clip = dual_clip
        self.loss_agg = loss_agg
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef
        self.advantage_kwargs = dict(advantage_kwargs or {})

    @property
    def name(self) -> str:
        return f"{self.space}:{self.advantage}/{self.sample_filter}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, coef={self.loss_coef})"

    # --- selection -------------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """Advantages of a rollout batch. rewards (N,) -> (N,)."""
        return self._advantage_fn(rewards, group_size, **self.advantage_kwargs)

    def keep(self, advantages: torch.Tensor) -> torch.Tensor:
        """Which responses this objective trains on. (N,) -> bool (N,)."""
        return self._filter_fn(advantages)

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The (N, P) prefix ids and mask that the responses are scored after."""
        raise NotImplementedError

    def select(self, rollout: Rollout, advantages: torch.Tensor, keep: torch.Tensor) -> UpdateBatch:
        """Gather only the kept rows, in this objective's space (nothing else is ever scored)."""
        prefix_ids, prefix_mask = self.prefix(rollout)
        full = UpdateBatch(
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            response_ids=rollout.response_ids,
            response_mask=rollout.response_mask,
            advantages=advantages,
            engine_logprobs=rollout.engine_logprobs,
            behaviour_logprobs=rollout.behaviour_logprobs,
        )
        return full.rows(keep.nonzero(as_tuple=True)[0])

    # --- loss ------------------------------------------------------------------------------
    def loss(
        self,
        logprobs: torch.Tensor,
        batch: UpdateBatch,
        num_tokens: torch.Tensor | float,
        num_seqs: torch.Tensor | float,
        norm_length: int,
        entropy: torch.Tensor | None = None,
        num_signal_tokens: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, normalised by its whole mini-batch's counts.

        Args:
            logprobs: (M, T) current log-probs in this objective's space (with grad).
            batch: the micro-batch; ``old_logprobs`` set.
            num_tokens, num_seqs: kept tokens / sequences of the whole mini-batch (all ranks).
            norm_length: constant of ``seq-mean-token-sum-norm`` (the max response length).
            entropy: (M, T) with grad, needed only when ``entropy_coef`` is set.
            num_signal_tokens: kept tokens of rows with a non-zero advantage in the whole
                mini-batch (all ranks), the denominator of ``clip_frac`` and ``ratio_mean``
                (default: num_tokens).
        Returns:
            scalar loss (already multiplied by ``loss_coef``), and detached metrics. Each metric
            sums over micro-batches and ranks to the mini-batch's value.
        """
        mask = batch.response_mask
        per_token, clipped = clipped_surrogate(
            logprobs, batch.old_logprobs, batch.advantages, self.clip_low, self.clip_high, self.dual_clip
        )
        if batch.token_weights is not None:  # importance weights of an engine's off-policy tokens
            per_token = per_token * batch.token_weights
        agg = dict(mode=self.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
        pg_loss = aggregate(per_token, mask, **agg)
        loss = pg_loss
        # Clip fraction and ratio: token means over the tokens that carry a gradient (rows with
        # A != 0), which are the rows forwarded when zero-advantage rows are skipped.
        signal = mask * (batch.advantages != 0).unsqueeze(-1)
        stat = dict(mode="token-mean", num_tokens=num_tokens if num_signal_tokens is None else num_signal_tokens)
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": aggregate(clipped.float(), signal, **stat).detach(),
            "ratio_mean": aggregate(torch.exp(logprobs - batch.old_logprobs).detach(), signal, **stat),
        }
        if self.kl_coef:
            kl = aggregate(kl_penalty(logprobs, batch.ref_logprobs, self.kl_estimator), mask, **agg)
            loss = loss + self.kl_coef * kl
            metrics["kl"] = kl.detach()
        if self.entropy_coef:
            ent = aggregate(entropy, mask, **agg)
            loss = loss - self.entropy_coef * ent
            metrics["entropy_bonus"] = ent.detach()
        return loss * self.loss_coef, metrics


class ConditionalRL(Objective):
    """RL on P(y|x) (post-train space): responses scored after their prompt."""

    space = "conditional"

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        return rollout.prompt_ids, rollout.prompt_mask


class MarginalRL(Objective):
    """PreRL: RL on P(y) (pre-train space): responses scored after the question-free context.

    The prompt never enters the forward pass, so no prompt token can receive gradient.
    Defaults follow the authors' code: ``mean`` advantage, marginal loss coefficient 0.01.
    """

    space = "marginal"

    def __init__(self, advantage: str = "mean", sample_filter: str = "all", loss_coef: float = 0.01, **kwargs):
        super().__init__(advantage=advantage, sample_filter=sample_filter, loss_coef=loss_coef, **kwargs)

    def prefix(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        return rollout.context_ids, torch.ones_like(rollout.context_ids)


class MarginalNSR(MarginalRL):
    """NSR-PreRL: the marginal objective on negative samples only.

    ``convention="group_mean"`` (authors' code, default): keep responses whose ``mean``
    advantage is < 0, weighted by it, so all-wrong groups give no gradient.
    ``convention="fixed"`` (NSR paper): every wrong response gets advantage -1.
    """

    CONVENTIONS = {"group_mean": "mean", "fixed": "nsr"}

    def __init__(self, convention: str = "group_mean", **kwargs):
        if convention not in self.CONVENTIONS:
            raise ValueError(f"unknown NSR convention {convention!r}; choose one of {sorted(self.CONVENTIONS)}")
        kwargs.setdefault("advantage", self.CONVENTIONS[convention])
        kwargs.setdefault("sample_filter", "negative")
        super().__init__(**kwargs)
        self.convention = convention


class DualSpaceSchedule:
    """Dual Space RL: ``warmup`` (NSR-PreRL) for ``switch_step`` optimizer updates, then ``main``.

    Args:
        warmup: the phase-1 objective (MarginalNSR in the paper).
        main: the phase-2 objective (GRPO on P(y|x)).
        switch_step: number of phase-1 updates S (paper: 20; the released code runs 19).
        warmup_conditional_coef: weight of ``main`` added to phase 1 (0 in the paper's code).
        reset_optimizer: clear the optimizer state at the switch (the paper resets nothing).
        adaptive_switch: None (the paper's fixed step), or the fields of a
            ``prerl.switch_rules.SwitchRule`` (rule, metric, value, ...): switch earlier when it
            fires; ``switch_step`` is then the latest switch.
        reference_at_switch: the KL reference of phase 2 when a term has a KL penalty: ``policy``
            (the authors' ``update_ref_from_actor``: a copy of the policy made at the switch) or
            ``base`` (the initial model throughout). Without a KL term there is no reference.
    """

    def __init__(
        self,
        warmup: Objective,
        main: Objective,
        switch_step: int = 20,
        warmup_conditional_coef: float = 0.0,
        reset_optimizer: bool = False,
        adaptive_switch: dict | None = None,
        reference_at_switch: str = "policy",
    ):
        if switch_step < 0:
            raise ValueError(f"switch_step must be >= 0, got {switch_step}")
        if reference_at_switch not in REFERENCE_AT_SWITCH:
            raise ValueError(f"objective.reference_at_switch={reference_at_switch!r}: choose policy (a copy of the "
                             "policy at the switch, the authors') or base (the initial model)")
        self.adaptive_switch = dict(adaptive_switch) if adaptive_switch else None
        if self.adaptive_switch:
            from prerl.switch_rules import SwitchRule

            SwitchRule(**self.adaptive_switch)  # a bad rule fails when the config is built
        self.warmup = warmup
        self.main = main
        self.switch_step = int(switch_step)
        self.warmup_conditional_coef = float(warmup_conditional_coef)
        self.reset_optimizer = reset_optimizer
        self.reference_at_switch = reference_at_switch

    def phases(self) -> list[list[tuple[Objective, float]]]:
        """Loss terms (objective, weight) of each phase."""
        phase1 = [(self.warmup, 1.0)]
        if self.warmup_conditional_coef:
            phase1.append((self.main, self.warmup_conditional_coef))
        return [phase1, [(self.main, 1.0)]]


def phases_of(objective: Objective | DualSpaceSchedule) -> list[list[tuple[Objective, float]]]:
    """A single objective is a one-phase schedule."""
    if isinstance(objective, DualSpaceSchedule):
        return objective.phases()
    if isinstance(objective, Objective):
        return [[(objective, 1.0)]]
    raise TypeError(f"expected an Objective or DualSpaceSchedule, got {type(objective).__name__}")
