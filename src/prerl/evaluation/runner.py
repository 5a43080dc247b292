"""Sampling an evaluation chunk by chunk inside ``Trainer.predict``.

Lightning builds the policy (``configure_model``) and restores a checkpoint exactly as it does for
``validate`` (full, adapter-only or sharded); :class:`EvalModule` is the training module with a
``predict_step`` that samples one *chunk*: ``batch_size`` consecutive problems of one set. Each
chunk is seeded from ``(seed, set name, chunk index)`` before it is sampled, so its responses do
not depend on which chunks ran before it: a resumed evaluation, which skips the chunks already
written, samples the remaining ones exactly as an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prerl.data.collate import collate_prompts
from prerl.module import PreRLModule
from prerl.rollout import decode

from .records import RecordWriter
from .sets import EvalSet

log = logging.getLogger(__name__)

__all__ = ["EvalModule", "Sampling", "ChunkSampler", "chunk_seed"]


@dataclass(frozen=True)
class Sampling:
    """How each problem is sampled: ``samples`` responses at ``temperature`` / ``top_p`` / ``top_k``
    (temperature 0 = greedy, then ``samples`` is 1)."""

    samples: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    generation_batch_size: int | None


def chunk_seed(seed: int, set_name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{int(seed)}\x00{set_name}\x00{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def _seed_all(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # every device's generator


class ChunkSampler:
    """Samples, scores and writes the chunks of the eval sets (called from ``predict_step``)."""

    def __init__(self, sets: list[EvalSet], writers: dict[str, RecordWriter], sampling: Sampling, seed: int,
                 batch_size: int, pad_token_id: int, context_ids: list[int], behaviours: bool = True) -> None:
        self.sets = {s.name: s for s in sets}
        self.writers = writers
        self.sampling = sampling
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.pad_token_id = int(pad_token_id)
        self.context_ids = list(context_ids)
        self.behaviours = behaviours
        self.chunks_done = 0
        self.chunks_total = 0  # chunks this run samples (set by prerl.evaluate), for the progress log
        if behaviours:
            from prerl.analysis.behaviours import behaviour_counts

            self._behaviour_counts = behaviour_counts

    def items(self, set_name: str, chunk: int) -> list[dict]:
        items = self.sets[set_name].items
        return items[chunk * self.batch_size : (chunk + 1) * self.batch_size]

    @torch.no_grad()
    def run_chunk(self, module: PreRLModule, set_name: str, chunk: int) -> list[dict]:
        s = self.sampling
        started = time.perf_counter()
        items = self.items(set_name, chunk)
        _seed_all(chunk_seed(self.seed, set_name, chunk))
        batch = collate_prompts(items, self.pad_token_id, self.context_ids)
        device = module.device
        gen = module.engine.generate(
            batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), s.samples, s.max_new_tokens,
            s.temperature, s.top_p, s.top_k, s.generation_batch_size,
        )
        texts = decode(module.tokenizer, gen.response_ids, gen.response_mask)
        lengths = gen.response_mask.sum(dim=1).tolist()
        truncated = gen.truncated.tolist()
        records = []
        first_index = chunk * self.batch_size
        for j, item in enumerate(items):
            problem = item["problem"]
            rows = slice(j * s.samples, (j + 1) * s.samples)
            responses = texts[rows]
            result = module.reward(responses, [problem] * s.samples)  # one call per problem: its own counts
            rewards = [float(r) for r in result.rewards.tolist()]
            extracted = list(result.extracted) if result.extracted else [None] * len(responses)
            correct = [r > 0.5 for r in rewards]  # as training's accuracy metrics count
            records.append({
                "set": set_name,
                "index": first_index + j,
                "chunk": chunk,
                "id": problem["id"],
                "question": problem["question"],
                "answer": problem["answer"],
                "prompt": item["prompt"],
                "prompt_tokens": len(item["prompt_ids"]),
                "responses": responses,
                "extracted": extracted,
                "rewards": rewards,
                "correct": correct,
                "num_correct": sum(correct),
                "lengths": [int(n) for n in lengths[rows]],
                "truncated": [bool(t) for t in truncated[rows]],
                "behaviours": [self._behaviour_counts(r) for r in responses] if self.behaviours else [],
                "reward_timeouts": int(result.timeouts),
                "reward_errors": int(getattr(result, "errors", 0)),
            })
        self.writers[set_name].write(records)
        self.chunks_done += 1
        log.info("%s: chunk %d (problems %d-%d) written, %d/%d correct, %.1f s; %d/%d chunks of this run done",
                 set_name, chunk, first_index, first_index + len(items) - 1, sum(r["num_correct"] for r in records),
                 len(items) * s.samples, time.perf_counter() - started, self.chunks_done, self.chunks_total)
        return records


class EvaluationPreempted(RuntimeError):
    """SIGTERM arrived: the evaluation stops before its next chunk (every finished chunk is on disk)."""


class EvalModule(PreRLModule):
    """The training module, evaluating: ``predict_step`` samples the chunk a batch names.

    The training phase stored in a checkpoint does not matter here, so a checkpoint of any
    objective (GRPO, DSRL in either phase) loads whatever objective the eval config names.
    """

    chunk_sampler: ChunkSampler | None = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("prerl_state")
        if state is not None:
            state = {**state, "num_phases": len(self.phases), "phase": 0}
            checkpoint = {**checkpoint, "prerl_state": state}
        super().on_load_checkpoint(checkpoint)

    def on_predict_start(self) -> None:
        self.engine.sync_weights(self.policy)  # an engine other than hf samples the loaded weights

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        if self.chunk_sampler is None:
            raise RuntimeError("EvalModule.predict_step needs a chunk_sampler (set by prerl.evaluate)")
        if getattr(self.trainer, "received_sigterm", False):  # Lightning only notes SIGTERM during predict
            raise EvaluationPreempted("SIGTERM received: stopped before the next chunk")
        set_name, chunk = batch["set"], int(batch["chunk"])
        self.chunk_sampler.run_chunk(self, set_name if isinstance(set_name, str) else set_name[0], chunk)
        return None
