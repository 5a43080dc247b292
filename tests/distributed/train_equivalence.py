"""Worker for tests/test_sharding.py: train the tiny model on 2 CPU processes with one strategy.

    torchrun --nproc_per_node 2 tests/distributed/train_equivalence.py --strategy fsdp --out DIR

Trains a conditional (GRPO) and a marginal (NSR-PreRL) objective for 3 updates each from the
same seed and data, and writes per-update losses and the final full state dict to DIR.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "src")]

from helpers import PatternReward, make_datamodule, make_module  # noqa: E402
from prerl.fsdp import PolicyFSDPStrategy  # noqa: E402
from prerl.objectives import ConditionalRL, MarginalNSR  # noqa: E402


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(trainer.callback_metrics["train/loss"]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, objective in (("conditional", ConditionalRL()), ("marginal", MarginalNSR())):
        L.seed_everything(0)
        # SGD: an update linear in the gradient, so the comparison is not at the mercy of
        # AdamW's first steps, which turn 1e-9 gradient noise into lr-sized differences.
        module = make_module(
            objective, reward=PatternReward((1, 0)), diagnostics_every_n_steps=0,
            optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        )
        strategy = (
            PolicyFSDPStrategy(layer_classes=["LlamaDecoderLayer"], state_dict_type="full")
            if args.strategy == "fsdp"
            else DDPStrategy()
        )
        losses = Losses()
        trainer = L.Trainer(
            accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[losses],
        )
        trainer.fit(module, datamodule=make_datamodule(module.tokenizer, batch_size=2))
        path = args.out / f"{args.strategy}_{name}.ckpt"
        trainer.save_checkpoint(path)
        results[name] = losses.values
    if trainer.is_global_zero:
        (args.out / f"{args.strategy}_losses.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
