"""Worker for tests/test_global_batch.py: one DDP run on N CPU processes with data.batch_size = 8.

    torchrun --nproc_per_node 2 tests/distributed/global_batch.py --devices 2 --out DIR

Records, per optimizer step, the problem ids every rank trained on, and writes them with the final
policy weights to DIR (rank 0). ``run(devices=1, ...)`` is the single-process reference.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "src")]

from helpers import PatternReward, make_datamodule, make_module  # noqa: E402
from prerl.objectives import ConditionalRL  # noqa: E402

BATCH, STEPS = 8, 2


class ProblemIds(Callback):
    """The ids of every rank's batch, gathered per step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = [p["id"] for p in batch["problems"]]
        if torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, ids)
            ids = [i for rank in everyone for i in rank]
        self.steps.append(ids)


def run(devices: int, out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    # top_k=1 samples the argmax, so a rollout depends on the prompt only, never on a rank's RNG;
    # w_reinforce (+0.1 / -1) gives two identical responses a non-zero net gradient. SGD keeps the
    # update linear in the gradient.
    module = make_module(
        ConditionalRL(advantage="w_reinforce"), reward=PatternReward((1, 0)), group_size=2,
        rollout={"top_k": 1}, diagnostics_every_n_steps=0, optimizer=functools.partial(torch.optim.SGD, lr=0.5),
    )
    recorder = ProblemIds()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False, callbacks=[recorder],
    )
    datamodule = make_datamodule(module.tokenizer, n_train=32, batch_size=BATCH)
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in module.policy.state_dict().items()}, out / f"policy_{devices}.pt")
        meta = {"steps": recorder.steps, "per_rank_batch": datamodule.per_rank_batch_size, "global_step": trainer.global_step}
        (out / f"run_{devices}.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run(args.devices, args.out)
