"""The default engine: Hugging Face ``generate`` on the training policy itself (KV cache, no grad)."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from prerl.engines.base import ENGINES, Generation
from prerl.engines.refill import refill_generate
from prerl.engines.sampling_weights import SAMPLING_WEIGHTS, sampling_view
from prerl.fsdp import generation_model
from prerl.padding import cat_right_padded, grouped_rows, responses_from_lists, trim_left_padding
from prerl.rollout import eos_ids, generate

log = logging.getLogger(__name__)


@ENGINES.register("hf")
class HFEngine:
    """Sample with the policy's own ``generate``, in chunks of prompts.

    Args:
        policy: a callable returning the current policy (it may be re-wrapped, e.g. by FSDP).
        tokenizer: gives the pad id and, with the model's generation config, the end ids.
        synced_gpus: keep sharded ranks stepping together until all are done (FSDP).
        static_cache: a preallocated KV cache (fixed shapes) instead of one grown by concatenation.
        compile: ``torch.compile`` the decoding step (implies ``static_cache``; the first call of
            each shape compiles, which takes a while, so it pays off over many steps).
        refill: a row that ends leaves the batch at once and the next pending prompt-sample takes
            its place (prerl.engines.refill), instead of decoding every row of a call until the
            longest ends; ``generation_batch_size`` caps the rows decoding at once. Same sampling
            distribution. Not with ``static_cache`` / ``compile``; under sharding (FSDP, whose
            ranks must step together) ``generate`` is used unless ``sampling_weights`` gathered a copy.
        sampling_weights: ``bfloat16``: sample from a bf16 view of the weights made once per rollout
            (the Linear weights cast; under FSDP a gathered unsharded copy; a 4-bit base de-quantised
            into a copy with LoRA merged), under autocast, when it
            fits in free memory, instead of autocast re-casting (and FSDP re-gathering) them every
            decoded token (prerl.engines.sampling_weights). None (default): the policy as it is.
    Prompts are bucketed by length before they are chunked, so a chunk's padding is as short as
    the batch allows; rows come back in the batch's order. The policy is the model being trained,
    so ``sync_weights`` has nothing to do.
    """

    def __init__(
        self,
        policy: Callable[[], torch.nn.Module],
        tokenizer,
        synced_gpus: Callable[[], bool] = lambda: False,
        static_cache: bool = False,
        compile: bool = False,
        refill: bool = False,
        sampling_weights: str | None = None,
    ):
        if refill and (static_cache or compile):
            raise ValueError("module.rollout.engine_options: refill does not combine with static_cache / compile")
        self._policy = policy
        self.tokenizer = tokenizer
        self._synced_gpus = synced_gpus
        self.static_cache = bool(static_cache)
        self.compile = bool(compile)
        self.refill = bool(refill)
        if sampling_weights not in (None, *SAMPLING_WEIGHTS):
            raise ValueError(f"module.rollout.engine_options.sampling_weights={sampling_weights!r}; use null or one of "
                             f"{SAMPLING_WEIGHTS}")
        self.sampling_weights = sampling_weights
        self._said_no_refill = False

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
        # Longest prompts first; each chunk is trimmed to its own longest prompt (left padding).
        order = torch.sort(prompt_mask.sum(dim=1), descending=True, stable=True).indices
        try:
            eos = eos_ids(getattr(policy, "generation_config", None), self.tokenizer)
            rows = min(generation_batch_size or 10**9, len(prompt_ids) * num_samples)
            with contextlib.ExitStack() as stack:
                model, synced = None, self._synced_gpus()
                if self.sampling_weights:
                    model, synced = stack.enter_context(sampling_view(
                        policy, self.sampling_weights, synced, rows, prompt_ids.shape[1] + max_new_tokens,
                        prompt_ids.device))
                if model is None:
                    model = stack.enter_context(generation_model(policy))
                if self.refill and synced and not self._said_no_refill:
                    log.warning("hf engine: refill is off while sharded ranks must decode in step (FSDP): sampling "
                                "with generate; engine_options.sampling_weights=bfloat16 gathers a copy that can refill")
                    self._said_no_refill = True
                if self.refill and not synced:
                    tokens, _ = refill_generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens,
                                                temperature, top_p, top_k, eos, rows, order=order)
                    return Generation(*responses_from_lists(tokens, eos, self.tokenizer.pad_token_id))
                # Generate in chunks of prompts: the KV cache grows with sequences x length.
                chunk = max(1, rows // num_samples)
                pieces = []
                for start in range(0, prompt_ids.shape[0], chunk):
                    chosen = order[start : start + chunk]
                    pieces.append(generate(
                        model,
                        *trim_left_padding(prompt_ids[chosen], prompt_mask[chosen]),
                        num_samples=num_samples,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                        eos_token_ids=eos,
                        pad_token_id=self.tokenizer.pad_token_id,
                        synced_gpus=synced,
                        static_cache=self.static_cache,
                        compile=self.compile,
                    ))
        finally:
            policy.train(was_training)
        ids, mask, truncated = cat_right_padded(pieces, (self.tokenizer.pad_token_id, 0, False))
        back = grouped_rows(order, num_samples)  # back to the batch's order
        return Generation(ids[back], mask[back], truncated[back])
