"""Rollouts: sample G responses per prompt with the policy (no grad, KV cache) and package them.

Sampling is always conditional, y ~ pi(. | x); only the update of a marginal objective moves to
the question-free context (docs/method.md, "Notation").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation import CompileConfig

from prerl.padding import end_at_first_eos, response_mask_from_ids  # noqa: F401  (response_mask_from_ids: public here too)


@dataclass
class Rollout:
    """G responses for each of B prompts, rows grouped by prompt (N = B * G).

    Attributes:
        prompt_ids: (N, P) left-padded prompt of each row.
        prompt_mask: (N, P).
        context_ids: (N, C) question-free context of each row.
        response_ids: (N, T) right-padded response, end token included when generated.
        response_mask: (N, T) 1 on response tokens (through the first end token).
        truncated: (N,) bool, no end token within the length limit.
        texts: decoded responses (special tokens skipped).
        problems: the problem dict of each row.
        group_size: G.
        rewards: (N,) float, filled in by the reward step.
        reward_timeouts: how many rewards timed out (each counted as reward 0).
        reward_errors: how many rewards raised and were scored 0 (``reward.on_error=zero``).
        engine_logprobs: (N, T) the rollout engine's own log-probs of the sampled tokens, or None.
        behaviour_logprobs: (N, T) the training policy's log-probs of them after the prompt,
            computed when ``engine_logprobs`` is set.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    context_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    problems: list[dict]
    group_size: int
    rewards: torch.Tensor | None = None
    reward_timeouts: int = 0
    reward_errors: int = 0
    engine_logprobs: torch.Tensor | None = None
    behaviour_logprobs: torch.Tensor | None = None
    extracted: list[str | None] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return self.response_ids.shape[0] // self.group_size


def eos_ids(generation_config: GenerationConfig, tokenizer) -> list[int]:
    """The ids that end a response: the generation config's, else the tokenizer's eos."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an eos token")
    return [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def generate(
    policy,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_ids: list[int],
    pad_token_id: int,
    top_k: int = 0,
    synced_gpus: bool = False,
    static_cache: bool = False,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` responses per prompt with the KV cache.

    Args:
        policy: a Hugging Face causal LM (or peft wrapper).
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        num_samples: G, responses per prompt; rows of the output are grouped by prompt.
        temperature: 0 means greedy.
        top_k: 0 disables top-k (the model's own generation config is ignored on purpose, so
            the sampling distribution is exactly softmax(logits / temperature) up to top_p).
        synced_gpus: keep sharded ranks stepping together until all are done (FSDP).
        static_cache: a preallocated KV cache of prompt + max_new_tokens positions instead of one
            that grows by concatenation (fixed shapes).
        compile: ``torch.compile`` the decoding step (needs ``static_cache``; on any device).
    Returns:
        response_ids (B*G, T), response_mask (B*G, T), truncated (B*G,) bool.
    """
    compile_config = None
    if compile:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on CUDA-like devices only otherwise
    config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=top_k if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=pad_token_id,
        use_cache=True,
        cache_implementation="static" if static_cache or compile else None,
        compile_config=compile_config,
        disable_compile=not compile,
    )
    input_ids = prompt_ids.repeat_interleave(num_samples, dim=0)
    attention_mask = prompt_mask.repeat_interleave(num_samples, dim=0)
    out = policy.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    return end_at_first_eos(out[:, prompt_ids.shape[1] :], eos_token_ids, pad_token_id)


def decode(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Decode each response's masked tokens, skipping special tokens. (N, T) -> N strings."""
    lengths = response_mask.sum(dim=1).tolist()
    return tokenizer.batch_decode(
        [row[:n].tolist() for row, n in zip(response_ids, lengths)], skip_special_tokens=True
    )
