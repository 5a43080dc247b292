"""The gradient-alignment probe (prerl.analysis.alignment, AlignmentProbe, scripts/alignment_probe.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import PatternReward, make_datamodule, make_module, make_trainer, tiny_spec
from prerl.analysis.alignment import (
    ProbePairs,
    alignment_stats,
    gradient_alignment,
    select_parameters,
    summarize_alignment,
    token_gap_by_entropy,
    token_gap_by_position,
)
from prerl.callbacks import AlignmentProbe
from prerl.checkpointing import capture_rng_state
from prerl.objectives import ConditionalRL
from prerl.scoring import score_responses

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n: int = 3, seed: int = 0) -> ProbePairs:
    """Random token pairs with uneven prompt and response lengths (left / right padding)."""
    g = torch.Generator().manual_seed(seed)
    P, T = 9, 7
    prompt_ids = torch.randint(3, 250, (n, P), generator=g)
    prompt_mask = torch.ones(n, P, dtype=torch.long)
    response_ids = torch.randint(3, 250, (n, T), generator=g)
    response_mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        prompt_mask[i, : i * 2] = 0  # left padding
        prompt_ids[i, : i * 2] = 0
        response_mask[i, T - i :] = 0  # right padding
        response_ids[i, T - i :] = 0
        response_ids[i, T - i - 1] = 2  # the end token, scored like any other
    return ProbePairs(prompt_ids, prompt_mask, torch.ones(n, 1, dtype=torch.long), response_ids, response_mask,
                      rewards=torch.tensor([1.0, 0.0, 1.0][:n] + [0.0] * max(0, n - 3)), ids=[f"p{i}" for i in range(n)])


def _logprob_sum(model, prefix_ids, prefix_mask, response_ids, response_mask):
    lp, _ = score_responses(model, prefix_ids, prefix_mask, response_ids, response_mask)
    return lp.sum()


def test_matches_manual_two_backward_computation():
    model = tiny_spec().build_model().eval()
    pairs = _pairs(3)
    stats = alignment_stats(model, pairs, params="trainable")
    params = [p for p in model.parameters() if p.requires_grad]
    for i, row in enumerate(stats["per_sample"]):
        sl = slice(i, i + 1)  # the padded row itself: padding must not change the value
        lc = _logprob_sum(model, pairs.prompt_ids[sl], pairs.prompt_mask[sl], pairs.response_ids[sl], pairs.response_mask[sl])
        gc = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lc, params)])
        lm = _logprob_sum(model, pairs.context_ids[sl], torch.ones_like(pairs.context_ids[sl]),
                          pairs.response_ids[sl], pairs.response_mask[sl])
        gm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm, params)])
        inner = float(gm.double() @ gc.double())
        assert row["inner"] == pytest.approx(inner, rel=1e-4)
        assert row["cosine"] == pytest.approx(inner / float(gm.double().norm() * gc.double().norm()), rel=1e-4)
        assert row["norm_conditional"] == pytest.approx(float(gc.norm()), rel=1e-4)
        assert row["logprob_marginal"] == pytest.approx(float(lm.detach()), abs=1e-4)
        assert row["length"] == int(pairs.response_mask[i].sum())
    s = stats["summary"]
    assert s["n"] == 3 and s["frac_negative"] == pytest.approx(sum(r["inner"] < 0 for r in stats["per_sample"]) / 3)
    assert stats["params"]["numel"] == sum(p.numel() for p in params)
    assert sum(r["count"] for r in stats["gap_by_entropy"]) == int(pairs.response_mask.sum()) == stats["num_tokens"]
    split = stats["gap_by_entropy_split"]
    assert [a["count"] + b["count"] for a, b in zip(split["early"], split["late"])] == [
        r["count"] for r in stats["gap_by_entropy"]]
    assert stats["by_reward"]["correct"]["n"] == 2 and stats["by_reward"]["wrong"]["n"] == 1
    chunked = alignment_stats(model, pairs, params="trainable", chunk_tokens=3)  # the training's chunked LM head
    for a, b in zip(chunked["per_sample"], stats["per_sample"]):
        assert a["inner"] == pytest.approx(b["inner"], rel=1e-4) and a["cosine"] == pytest.approx(b["cosine"], abs=1e-5)


def test_sign_flip_and_self_cosine():
    model = tiny_spec().build_model().eval()
    pairs = _pairs(1)
    r = pairs.row(0)
    params = [p for p in model.parameters()]
    cond = lambda: _logprob_sum(model, r["prompt_ids"], r["prompt_mask"], r["response_ids"], r["response_mask"])  # noqa: E731
    marg = lambda: _logprob_sum(model, r["context_ids"], r["context_mask"], r["response_ids"], r["response_mask"])  # noqa: E731
    plain = gradient_alignment(marg, cond, params)
    flipped = gradient_alignment(lambda: -marg(), cond, params)
    assert flipped["inner"] == pytest.approx(-plain["inner"], rel=1e-6)
    assert flipped["cosine"] == pytest.approx(-plain["cosine"], rel=1e-6)
    same = gradient_alignment(marg, marg, params)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["inner"] == pytest.approx(same["norm_a"] ** 2, rel=1e-5)


def test_parameter_subsets():
    model = tiny_spec().build_model()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in select_parameters(model, "auto")] == names  # no adapters: everything trainable
    last = [n for n, _ in select_parameters(model, "last:1")]
    assert last and all(".layers.1." in n for n in last)
    mlp = [n for n, _ in select_parameters(model, "layers.*.mlp")]
    assert mlp and all(".mlp." in n for n in mlp)
    assert [n for n, _ in select_parameters(model, ["lm_head"])] == ["lm_head.weight"]
    with pytest.raises(ValueError, match="LoRA"):
        select_parameters(model, "lora")
    with pytest.raises(ValueError, match="matches no"):
        select_parameters(model, "nothing_like_this")


def test_lora_subset_uses_only_adapter_parameters():
    from prerl.models import LoraSettings, TinyModelSpec

    policy = TinyModelSpec(lora=LoraSettings(r=4, alpha=8)).build_model()
    adapters = {n for n, p in policy.named_parameters() if "lora_" in n}
    chosen = select_parameters(policy, "lora")
    assert adapters and {n for n, _ in chosen} == adapters
    assert [n for n, _ in select_parameters(policy, "auto")] == [n for n, _ in chosen]
    stats = alignment_stats(policy, _pairs(2), params="lora")
    assert stats["params"]["numel"] == sum(p.numel() for n, p in policy.named_parameters() if n in adapters)
    # peft initialises B = 0: grad wrt A vanishes, grad wrt B does not, so the norms are finite and > 0
    assert all(r["norm_marginal"] > 0 and math.isfinite(r["cosine"]) for r in stats["per_sample"])


def test_stats_leave_grads_and_modes_untouched():
    model = tiny_spec().build_model().train()
    model.model.layers[0].eval()  # a submodule in its own mode must get it back
    stats = alignment_stats(model, _pairs(2))
    assert all(p.grad is None for p in model.parameters())
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert stats["num_pairs"] == 2


def test_token_gap_tables():
    lc = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
    lm = torch.tensor([[-2.0, -2.0, -1.0, 0.0], [-0.5, -1.5, 0.0, 0.0]])
    ent = torch.tensor([[0.05, 0.3, 3.0, 9.0], [0.05, 1.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    fixed = token_gap_by_entropy(lc, lm, ent, mask, bins=[0.0, 0.1, 1.0, 10.0])
    assert [r["count"] for r in fixed] == [2, 1, 2]
    assert fixed[0]["mean_gap"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert fixed[2]["mean_gap"] == pytest.approx(-0.5)  # (-2 + 1) / 2
    assert fixed[2]["mean_abs_gap"] == pytest.approx(1.5)
    quant = token_gap_by_entropy(lc, lm, ent, mask, bins=2)
    assert sum(r["count"] for r in quant) == 5 and quant[0]["kind"] == "quantile"
    late = token_gap_by_entropy(lc, lm, ent, mask, bins=[0.0, 0.1, 1.0, 10.0], positions=(1, None))
    assert [r["count"] for r in late] == [0, 1, 2]  # the first token of each response left out
    pos = token_gap_by_position(lc, lm, mask, edges=[0, 1, 2, math.inf])
    assert [r["count"] for r in pos] == [2, 2, 1]
    assert pos[0]["mean_gap"] == pytest.approx(0.5)
    summary = summarize_alignment([1.0, -2.0, 3.0, 4.0], [0.1, -0.2, float("nan"), 0.5])
    assert summary["frac_negative"] == 0.25 and summary["inner_median"] == 1.0
    assert summary["cosine_mean"] == pytest.approx(0.4 / 3)


def test_probe_pairs_concat_take_and_state_roundtrip():
    a, b = _pairs(2), _pairs(3, seed=1)
    b.prompt_ids, b.prompt_mask = b.prompt_ids[:, 2:], b.prompt_mask[:, 2:]
    both = ProbePairs.concat([a, b]).take(4)
    assert len(both) == 4 and both.ids == ["p0", "p1", "p0", "p1"]
    for i, src in ((0, a.row(0)), (3, b.row(1))):
        assert torch.equal(both.row(i)["prompt_ids"], src["prompt_ids"])
        assert torch.equal(both.row(i)["response_ids"], src["response_ids"])
    again = ProbePairs.from_state_dict(both.state_dict())
    assert torch.equal(again.response_ids, both.response_ids) and again.ids == both.ids


# ------------------------------------------------------------------ the callback
def _train(max_steps: int, callbacks=(), seed: int = 0):
    L.seed_everything(seed)
    module = make_module(ConditionalRL(advantage="grpo"), reward=PatternReward((1, 0)), max_new_tokens=6,
                         diagnostics_every_n_steps=0)
    dm = make_datamodule(module.tokenizer)
    trainer = make_trainer(max_steps, callbacks)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_callback_logs_on_its_steps_and_leaves_training_untouched(tmp_path):
    path = tmp_path / "alignment.jsonl"
    probe = AlignmentProbe(every_n_steps=2, num_pairs=4, samples_per_prompt=2, path=str(path), histograms=False)
    probed, trainer = _train(4, [probe])
    plain, _ = _train(4)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    assert all(line["summary"]["n"] == 4 for line in lines)
    assert lines[0]["per_sample"][0]["id"] == lines[2]["per_sample"][0]["id"]  # the same fixed set
    assert [h["step"] for h in probe.history] == [0, 2, 4]
    # Same weights and optimizer state as the run without the probe: it changed nothing.
    for (name, a), (_, b) in zip(probed.policy.named_parameters(), plain.policy.named_parameters()):
        assert torch.equal(a, b), name
    sa, sb = probed.optimizers().optimizer.state_dict(), plain.optimizers().optimizer.state_dict()
    for key in sa["state"]:
        for field in sa["state"][key]:
            assert torch.equal(torch.as_tensor(sa["state"][key][field]), torch.as_tensor(sb["state"][key][field]))

    # A direct probe: no .grad, the same optimizer state, modes and RNG restored.
    module = probed
    module.policy.train()
    grads = [None if p.grad is None else p.grad.clone() for p in module.policy.parameters()]
    opt_state = {k: {f: torch.as_tensor(v).clone() for f, v in s.items()} for k, s in module.optimizers().optimizer.state.items()}
    rng = capture_rng_state()
    probe.probe(trainer, module, step=99)
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, module.policy.parameters()))
    for k, s in module.optimizers().optimizer.state.items():
        assert all(torch.equal(opt_state[k][f], torch.as_tensor(v)) for f, v in s.items())
    assert module.policy.training
    assert torch.equal(torch.get_rng_state(), rng["torch"])
    assert json.loads(path.read_text().splitlines()[-1])["step"] == 99


def test_callback_rollout_source_and_state(tmp_path):
    probe = AlignmentProbe(every_n_steps=2, num_pairs=3, source="rollout", path=str(tmp_path / "a.jsonl"), histograms=False)
    module, _ = _train(2, [probe])
    assert [h["step"] for h in probe.history] == [1, 2]  # the first rollout exists after the first batch
    assert len(probe.pairs) == 3
    state = probe.state_dict()
    fresh = AlignmentProbe(every_n_steps=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.pairs.response_ids, probe.pairs.response_ids) and fresh.last_logged == 2
    assert not fresh.due(2) and fresh.due(4) and fresh.due(5)
    with pytest.raises(ValueError):
        AlignmentProbe(source="elsewhere")


# ------------------------------------------------------------------ the standalone script
def test_script_writes_json_and_plots(tmp_path):
    spec = importlib.util.spec_from_file_location("alignment_probe_script", ROOT / "scripts" / "alignment_probe.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["experiment=smoke", "--out", str(tmp_path / "probe"), "--prompts", "2", "--samples", "2",
                       "--device", "cpu", "--params", "last:1"])
    result = json.loads((out / "alignment.json").read_text())
    assert result["summary"]["n"] == 4 and len(result["per_sample"]) == 4
    assert result["params"]["spec"] == "last:1" and result["split"] == "val"
    assert {"gap_by_entropy", "gap_by_position", "by_reward"} <= result.keys()
    for name in ("hist_cosine.png", "hist_inner.png", "gap_by_entropy.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
