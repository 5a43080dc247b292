"""Turning questions into prompt token ids, and the question-free marginal context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_messages", "render_prompt", "encode_prompt", "resolve_context_ids", "IM_START"]

IM_START = "<|im_start|>"


def build_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """[system (if given), user] chat messages for one question."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return messages


def render_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text: the tokenizer's chat template with ``add_generation_prompt=True``.

    Note: some templates insert their own default system message when none is given
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; prompts are rendered with "
            "tokenizer.apply_chat_template (set tokenizer.chat_template)"
        )
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt),
        tokenize=False,
        add_generation_prompt=True,
        **dict(chat_template_kwargs or {}),
    )


def encode_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the rendered prompt. The template text already holds any BOS/special tokens,
    so no special tokens are added on top."""
    text = render_prompt(tokenizer, question, system_prompt, chat_template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_context_ids(tokenizer: Any, marginal_context: str | Sequence[int] | None = None) -> list[int]:
    """Token ids of the question-free context c used for the marginal log-prob log pi(y | c).

    None: the single token ``<|im_start|>`` if the tokenizer has it (the authors' choice),
    else the BOS token; error if neither. A string is tokenised as-is (no special tokens
    added; special-token strings in it, like "<|im_start|>", map to their ids). A list of
    ints is used verbatim.
    """
    if marginal_context is None:
        vocab = tokenizer.get_vocab()
        if IM_START in vocab:
            return [int(vocab[IM_START])]
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None:
            return [int(bos)]
        raise ValueError(
            f"cannot build the marginal context: tokenizer {type(tokenizer).__name__} has neither a "
            f"{IM_START!r} token nor a BOS token; set marginal_context to a token string"
        )
    if isinstance(marginal_context, str):
        if not marginal_context:
            raise ValueError("marginal_context is an empty string; use None for the default token")
        ids = list(tokenizer(marginal_context, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"marginal_context {marginal_context!r} tokenises to no tokens")
        return [int(i) for i in ids]
    ids = [int(i) for i in marginal_context]
    if not ids:
        raise ValueError("marginal_context is an empty list of token ids")
    return ids
