"""Model FLOPs of the update (prerl.flops) against a hand computation and torch's FlopCounterMode;
the update's forwards counted (none that is not needed) and its TFLOP/s logged."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from helpers import PatternReward, make_datamodule, make_module, make_trainer
from prerl.flops import ModelShape, forward_flops, training_flops
from prerl.models import TinyModelSpec
from prerl.objectives import ConditionalRL
from prerl.scoring import score_responses

QWEN3_1P7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def test_qwen3_1p7b_flops_by_hand():
    shape = ModelShape.from_config(Qwen3Config(**QWEN3_1P7B))
    assert shape == ModelShape(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
                               vocab=151936)
    # per block: q, o 2048 x 2048; k, v 2048 x 1024; gate, up, down 2048 x 6144
    block = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144
    assert block == 50_331_648
    with torch.device("meta"):  # the real module's block weights: the 1.41B non-embedding parameters
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_1P7B))
    linears = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert linears == 28 * block == 1_409_286_144
    # 2 rows of 1,000 padded tokens, 600-token responses: logits_to_keep = 601 head positions each
    dense = 6 * 1_409_286_144 * 2_000
    head = 6 * 2048 * 151936 * 1_202
    attention = 12 * 28 * 16 * 128 * 2 * 1000**2
    assert training_flops(shape, 2, 1000, 1_202) == dense + head + attention
    assert forward_flops(shape, 2, 1000, 1_202) == (dense + head + attention) // 3
    # frozen base (LoRA): input gradients only for the weight matmuls
    assert training_flops(shape, 2, 1000, 1_202, weights_trained=False) == (dense + head) * 2 // 3 + attention


def _scoring_batch():
    g = torch.Generator().manual_seed(0)
    prefix_ids, response_ids = torch.randint(3, 200, (3, 5), generator=g), torch.randint(3, 200, (3, 7), generator=g)
    prefix_mask, response_mask = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)
    prefix_mask[0, :2] = 0
    response_mask[1, 4:] = 0
    return prefix_ids, prefix_mask, response_ids, response_mask


@pytest.mark.parametrize("chunk", [None, 4], ids=["plain", "chunked"])
@pytest.mark.parametrize("trained", [True, False], ids=["full", "frozen-base"])
def test_training_flops_match_torch_flop_counter(chunk, trained):
    """Equal within 0.1% to what FlopCounterMode counts in one scoring forward + backward of the tiny
    model (eager attention: torch counts no CPU SDPA kernel); the chunked head's recomputed chunks
    are work the hardware does again, not model FLOPs: they are the difference."""
    model = TinyModelSpec(attn_implementation="eager").build_model().train()
    if not trained:  # a frozen base; the embedding trains so that gradients reach every block's input
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    batch = _scoring_batch()
    with FlopCounterMode(display=False) as counter:
        logprobs, _ = score_responses(model, *batch, chunk_tokens=chunk)
        logprobs.sum().backward()
    shape = ModelShape.from_config(model.config)
    rows, width, real = batch[0].shape[0], batch[0].shape[1] + batch[2].shape[1], int(batch[3].sum())
    head = real if chunk else rows * (batch[2].shape[1] + 1)
    expected = training_flops(shape, rows, width, head, weights_trained=trained)
    recomputed = 2 * shape.hidden * shape.vocab * real if chunk else 0
    assert counter.get_total_flops() == pytest.approx(expected + recomputed, rel=1e-3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        score_responses(model, *batch, chunk_tokens=chunk)
    assert counter.get_total_flops() == pytest.approx(forward_flops(shape, rows, width, head), rel=1e-3)


class ScoringForwards(Callback):
    """Counts the policy's scoring forwards (``use_cache=False``; sampling's use the cache),
    whether each ran under autograd and its model FLOPs; keeps the logged train metrics."""

    def __init__(self):
        self.forwards: list[bool] = []
        self.flops = 0
        self.metrics: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        shape = ModelShape.from_config(pl_module.policy.config)

        def hook(_, args, kwargs):
            if kwargs.get("use_cache") is False:
                grad = torch.is_grad_enabled()
                self.forwards.append(grad)
                rows, width = kwargs["input_ids"].shape
                head = int(kwargs["attention_mask"][:, width - kwargs["logits_to_keep"] + 1:].sum())  # chunked head
                self.flops += (training_flops if grad else forward_flops)(shape, rows, width, head)
        self.handle = pl_module.policy.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.handle.remove()
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/perf/")}


@pytest.mark.parametrize("epochs, expected", [(1, [True, True]), (2, [False, False] + [True] * 4)],
                         ids=["on-policy", "2-epochs"])
def test_update_runs_no_forward_that_is_not_needed(epochs, expected):
    """One update per rollout: only the two micro-batches' forward + backward passes (the old
    log-probs are their own detached output, the entropy diagnostics come from their logits); two
    epochs: the old log-probs are scored once first (no grad), then each epoch's passes."""
    module = make_module(ConditionalRL(), reward=PatternReward((1, 0)), peak_tflops=2.0,
                         update={"micro_batch_size": 4, "epochs": epochs})
    seen = ScoringForwards()
    L.seed_everything(0)
    make_trainer(1, [seen]).fit(module, datamodule=make_datamodule(module.tokenizer))
    assert seen.forwards == expected  # 2 prompts x 4 samples, every group mixed: 8 rows in 2 micro-batches
    assert module.updater.flops == seen.flops
    tflops = seen.metrics["train/perf/update_tflops"]
    assert tflops > 0 and seen.metrics["train/perf/update_peak_frac"] == pytest.approx(tflops / 2.0)
