"""Settings that must not change the update: how rows are split into micro-batches (row count or
token budget), skipping the forward of zero-advantage rows, the chunked log-prob path; and the
settings that must: dropout (off by default), no-signal batches (a zero-gradient step)."""

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import prerl.updates as updates_lib
from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.micro_batches import micro_batch_indices
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalNSR
from prerl.scoring import score_responses

# G = 2, 2 prompts per batch: group 0 mixed, group 1 all right (advantage 0 under grpo and mean).
MIXED_AND_UNIFORM = (1, 0, 1, 1)


def _train(objective, steps=2, seed=0, **kwargs):
    """Final policy parameters and the rows each scoring forward received."""
    rows: list[int] = []

    def spy(policy, prefix_ids, *args, **kw):
        rows.append(prefix_ids.shape[0])
        return score_responses(policy, prefix_ids, *args, **kw)

    module = make_module(
        objective, reward=PatternReward(MIXED_AND_UNIFORM), group_size=2, diagnostics_every_n_steps=0,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5), max_new_tokens=10, **kwargs,
    )
    original, updates_lib.score_responses = updates_lib.score_responses, spy
    try:
        L.seed_everything(seed)
        make_trainer(steps).fit(module, datamodule=make_datamodule(module.tokenizer))
    finally:
        updates_lib.score_responses = original
    return {k: v.detach().clone() for k, v in module.policy.named_parameters()}, rows


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


UPDATES = [
    {"micro_batch_size": 4, "max_grad_norm": 1e9},
    {"micro_batch_size": 1, "epochs": 2, "mini_batches": 2, "max_grad_norm": 1e9},
]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("update", UPDATES, ids=["one-update", "2-epochs-x-2-mini-batches"])
def test_skipping_zero_advantage_rows_gives_the_same_update(agg, update):
    skipped, rows_skipped = _train(ConditionalRL(loss_agg=agg), update={**update, "skip_zero_advantage": True})
    full, rows_full = _train(ConditionalRL(loss_agg=agg), update={**update, "skip_zero_advantage": False})
    _assert_same(skipped, full)
    assert sum(rows_skipped) < sum(rows_full)  # the all-right group was never forwarded


def test_no_skipping_when_a_kl_term_gives_zero_advantage_rows_a_gradient():
    objective = lambda: ConditionalRL(kl_coef=0.1)  # noqa: E731
    _, rows_on = _train(objective(), update={"micro_batch_size": 4, "skip_zero_advantage": True})
    _, rows_off = _train(objective(), update={"micro_batch_size": 4, "skip_zero_advantage": False})
    assert rows_on == rows_off


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_budget_micro_batches_give_the_same_update(agg):
    whole, rows_whole = _train(ConditionalRL(loss_agg=agg), update={"micro_batch_size": 8, "max_grad_norm": 1e9})
    packed, rows_packed = _train(
        ConditionalRL(loss_agg=agg), update={"micro_batch_size": 8, "max_tokens_per_micro_batch": 60, "max_grad_norm": 1e9}
    )
    _assert_same(whole, packed)
    assert max(rows_packed) < max(rows_whole)  # the budget really split the batch


def test_chunked_logprobs_give_the_same_update():
    plain, _ = _train(ConditionalRL(), update={"logprob_chunk_tokens": None, "max_grad_norm": 1e9})
    chunked, _ = _train(ConditionalRL(), update={"logprob_chunk_tokens": 3, "max_grad_norm": 1e9})
    _assert_same(plain, chunked)


def test_micro_batch_packing_covers_rows_once_and_respects_the_budget():
    prefix = torch.tensor([5, 3, 4, 6, 2, 5])
    response = torch.tensor([50, 2, 30, 8, 9, 1])
    groups = micro_batch_indices(prefix, response, max_rows=3, max_tokens=70)
    assert sorted(int(i) for g in groups for i in g) == list(range(6))
    for g in groups:
        cost = len(g) * int(prefix[g].max() + response[g].max())
        assert len(g) == 1 or cost <= 70
        assert len(g) <= 3
    assert groups[0].tolist() == [0]  # 55 tokens: alone (two such rows would be 110)
    # without a budget: the rows sorted by response length, max_rows at a time
    assert [g.tolist() for g in micro_batch_indices(prefix, response, max_rows=4)] == [[0, 2, 4, 3], [1, 5]]
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batch_indices(prefix, response, 2, max_tokens=0)


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_while_scoring_unless_kept(disable):
    module = make_module(
        ConditionalRL(), spec_kwargs=(("attention_dropout", 0.1),), disable_dropout=disable,
        update={"recompute_old_logprobs": "always", "micro_batch_size": 4},
    )
    module.configure_model()
    assert module.policy.training
    ids = torch.randint(3, 200, (2, 12))
    ones = torch.ones_like(ids)
    first, second = (score_responses(module.policy, ids[:, :4], ones[:, :4], ids[:, 4:], ones[:, 4:])[0] for _ in "ab")
    assert torch.equal(first, second) == disable
    # recomputed old log-probs equal the current ones exactly only without dropout
    L.seed_everything(0)
    trainer = make_trainer(1)
    trainer.fit(module, datamodule=make_datamodule(module.tokenizer))
    ratio = float(trainer.callback_metrics["train/ratio_mean/conditional"])
    assert (ratio == 1.0) == disable


# ------------------------------------------------------------------ batches without signal
class ScheduledReward(PatternReward):
    """Rewards of call i follow patterns[i] (the last one repeats)."""

    def __init__(self, patterns):
        super().__init__()
        self.patterns = [tuple(float(v) for v in p) for p in patterns]

    def __call__(self, responses, problems):
        self.pattern = self.patterns[min(self.calls, len(self.patterns) - 1)]
        return super().__call__(responses, problems)


class Phases(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, pl_module.phase))


@pytest.mark.parametrize("no_signal", ["step", "skip"])
def test_dsrl_switch_counts_a_batch_without_signal_as_a_step(no_signal):
    """The second batch is all wrong (no NSR-PreRL signal). By default it is an optimizer step and
    counts toward S = 3; with ``no_signal=skip`` it does not, and the switch comes a batch later."""
    reward = ScheduledReward([(1, 0), (0,), (1, 0)])
    schedule = DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=3)
    module = make_module(schedule, reward=reward, diagnostics_every_n_steps=0, no_signal=no_signal)
    phases = Phases()
    L.seed_everything(0)
    make_trainer(5, [phases]).fit(module, datamodule=make_datamodule(module.tokenizer))
    assert module.no_signal_total == 1
    # (global step after the batch, phase the batch trained in): phase 1 makes exactly S = 3 updates
    if no_signal == "step":
        assert phases.seen == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    else:
        assert phases.seen == [(1, 0), (1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
