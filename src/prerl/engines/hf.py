"""The default engine: Hugging Face ``generate`` on the training policy itself (KV cache, no grad)."""

from __future__ import annotations

from typing import Callable

import torch

from prerl.engines.base import ENGINES, Generation
from prerl.fsdp import generation_model
from prerl.rollout import concat_responses, eos_ids, generate


@ENGINES.register("hf")
class HFEngine:
    """Sample with the policy's own ``generate``, in chunks of prompts.

    Args:
        policy: a callable returning the current policy (it may be re-wrapped, e.g. by FSDP).
        tokenizer: gives the pad id and, with the model's generation config, the end ids.
        synced_gpus: keep sharded ranks stepping together until all are done (FSDP).
    The policy is the model being trained, so ``sync_weights`` has nothing to do.
    """

    def __init__(self, policy: Callable[[], torch.nn.Module], tokenizer, synced_gpus: Callable[[], bool] = lambda: False):
        self._policy = policy
        self.tokenizer = tokenizer
        self._synced_gpus = synced_gpus

    def sync_weights(self, policy: torch.nn.Module) -> None:
        return None

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        generation_batch_size: int | None = None,
    ) -> Generation:
        policy = self._policy()
        was_training = policy.training
        policy.eval()
        try:
            eos = eos_ids(getattr(policy, "generation_config", None), self.tokenizer)
            # Generate in chunks of prompts: the KV cache grows with sequences x length.
            chunk = max(1, (generation_batch_size or 10**9) // num_samples)
            pieces = []
            with generation_model(policy) as model:
                for start in range(0, prompt_ids.shape[0], chunk):
                    pieces.append(generate(
                        model,
                        prompt_ids[start : start + chunk],
                        prompt_mask[start : start + chunk],
                        num_samples=num_samples,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        eos_token_ids=eos,
                        pad_token_id=self.tokenizer.pad_token_id,
                        synced_gpus=self._synced_gpus(),
                    ))
        finally:
            policy.train(was_training)
        return Generation(*concat_responses(pieces, self.tokenizer.pad_token_id))
