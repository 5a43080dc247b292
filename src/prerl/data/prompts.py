"""Turning questions into prompt token ids, and the question-free marginal context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_messages", "problem_messages", "render_chat", "encode_chat", "render_prompt", "encode_prompt",
           "resolve_context_ids", "IM_START"]

IM_START = "<|im_start|>"


def build_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """[system (if given), user] chat messages for one question."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return messages


def problem_messages(
    problem: Mapping[str, Any], system_prompt: str | None = None, question_template: str | None = None
) -> list[dict[str, str]]:
    """The chat of one problem: its own ``messages`` as they are (verl-style data, system message
    included), else [system_prompt, the question put into ``question_template``'s ``{question}``]."""
    if problem.get("messages"):
        return list(problem["messages"])
    question = problem["question"]
    if question_template is not None:
        question = question_template.replace("{question}", question)
    return build_messages(question, system_prompt)


def render_chat(
    tokenizer: Any, messages: list[dict[str, str]], chat_template_kwargs: Mapping[str, Any] | None = None
) -> str:
    """The prompt text of a chat: the tokenizer's chat template with ``add_generation_prompt=True``.

    Note: some templates insert their own default system message when none is given
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; prompts are rendered with "
            "tokenizer.apply_chat_template (set tokenizer.chat_template)"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or {})
    )


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], chat_template_kwargs: Mapping[str, Any] | None = None
) -> list[int]:
    """Token ids of the rendered chat. The template text already holds any BOS/special tokens, so
    no special tokens are added on top."""
    text = render_chat(tokenizer, messages, chat_template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text of one question (and system prompt); see :func:`render_chat`."""
    return render_chat(tokenizer, build_messages(question, system_prompt), chat_template_kwargs)


def encode_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the rendered prompt of one question; see :func:`encode_chat`."""
    return encode_chat(tokenizer, build_messages(question, system_prompt), chat_template_kwargs)


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
