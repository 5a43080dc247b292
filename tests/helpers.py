"""Shared builders for module-level tests: a tiny policy, in-memory data, scripted rewards."""

from __future__ import annotations

import functools

import lightning as L
import torch

from prerl.data import PromptDataModule
from prerl.models import TinyModelSpec
from prerl.module import PreRLModule
from prerl.rewards.types import RewardResult


class ListSource:
    """A source of in-memory problems (``load() -> list[dict]``)."""

    def __init__(self, problems: list[dict]):
        self.problems = problems

    def load(self) -> list[dict]:
        return [dict(p) for p in self.problems]


def problems(n: int, prefix: str = "q") -> list[dict]:
    return [
        {"id": f"{prefix}/{i}", "question": f"What is {i} plus {i % 7}?", "answer": str(i + i % 7),
         "verifier": "math", "meta": {}}
        for i in range(n)
    ]


class PatternReward:
    """Scripted rewards: response j of every call gets ``pattern[j % len(pattern)]``.

    With an even group size and pattern (1, 0) every group is mixed; (0,) makes every group
    all-wrong and (1,) all-right.
    """

    def __init__(self, pattern=(1.0, 0.0)):
        self.pattern = tuple(float(p) for p in pattern)
        self.calls = 0

    def __call__(self, responses, problems):
        self.calls += 1
        rewards = torch.tensor([self.pattern[j % len(self.pattern)] for j in range(len(responses))])
        return RewardResult(rewards=rewards, timeouts=0, extracted=[None] * len(responses))


@functools.lru_cache(maxsize=None)
def tiny_spec(**kwargs) -> TinyModelSpec:
    return TinyModelSpec(**kwargs)


def make_module(
    objective, reward=None, lr=1e-3, group_size=4, max_new_tokens=8, spec_kwargs=(), optimizer=None, **kwargs
) -> PreRLModule:
    spec = tiny_spec(**dict(spec_kwargs))
    module = PreRLModule(
        model=spec,
        tokenizer=spec.build_tokenizer(),
        objective=objective,
        reward=reward or PatternReward(),
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0),
        rollout={"group_size": group_size, "max_new_tokens": max_new_tokens, **kwargs.pop("rollout", {})},
        update=kwargs.pop("update", {"micro_batch_size": 4}),
        validation={"samples_per_problem": 2, "max_new_tokens": max_new_tokens,
                    "entropy": kwargs.pop("validation_entropy", False)},
        **kwargs,
    )
    return module


def make_datamodule(tokenizer, n_train=16, n_val=4, batch_size=2) -> PromptDataModule:
    return PromptDataModule(
        train=ListSource(problems(n_train)),
        val=ListSource(problems(n_val, prefix="v")) if n_val else None,
        tokenizer=tokenizer,
        system_prompt="Answer briefly.",
        batch_size=batch_size,
        val_batch_size=batch_size,
        max_prompt_length=256,
    )


def make_trainer(max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **defaults)


class FailingRandomReward:
    """The random reward that raises on its ``fail_on_call``-th call (1-based) in this process."""

    def __init__(self, p: float = 0.5, seed: int = 0, fail_on_call: int = 3):
        from prerl.rewards.random_reward import RandomReward

        self.inner = RandomReward(p=p, seed=seed)
        self.fail_on_call = int(fail_on_call)
        self.calls = 0

    def __call__(self, responses, problems):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(f"verifier crashed on call {self.calls}")
        return self.inner(responses, problems)


class HangingRandomReward(FailingRandomReward):
    """The random reward that, on its ``hang_on_call``-th call, is sent SIGTERM and then hangs (a
    verifier stuck in a loop when the scheduler pre-empts the job)."""

    def __init__(self, p: float = 0.5, seed: int = 0, hang_on_call: int = 3, hang_s: float = 30.0):
        super().__init__(p=p, seed=seed, fail_on_call=0)
        self.hang_on_call, self.hang_s = int(hang_on_call), float(hang_s)

    def __call__(self, responses, problems):
        import os
        import signal
        import time

        if self.calls + 1 == self.hang_on_call:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(self.hang_s)
        return super().__call__(responses, problems)


class SignalAt(L.Callback):
    """A callback that sends this process ``signal`` at the start of the batch after ``step`` updates
    (SIGKILL: the process dies on the spot, as under the OOM killer). ``group``: to every process
    of its process group (all ranks, as SLURM and ``timeout`` do), from rank 0. ``rank``: only that
    rank signals itself. ``once``: a file that marks the signal as sent, so a requeued run with the
    same settings is not signalled again."""

    def __init__(self, step: int = 1, signal: str = "SIGTERM", group: bool = False, rank: int | None = None,
                 once: str | None = None):
        import signal as signals

        self.step = int(step)
        self.signum = getattr(signals, signal)
        self.group = group
        self.rank = 0 if group else rank
        self.once = once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os
        from pathlib import Path

        if trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        if self.once is not None:
            if Path(self.once).exists():
                return
            Path(self.once).touch()
        if self.group:
            os.killpg(os.getpgid(0), self.signum)
        else:
            os.kill(os.getpid(), self.signum)


def torchrun_workers(script: str, out_dir, timeout: float = 300) -> list[dict]:
    """Run ``script --fsdp-worker <out_dir>`` on 2 processes with torch.distributed.run (a free
    port, one thread each) and return each rank's ``rank<r>.json`` written to ``out_dir``."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         script, "--fsdp-worker", str(out_dir)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in (0, 1)]
