"""Tokenizers: a tiny in-memory ChatML tokenizer for tests, and the common post-load setup.

Conventions used across prerl (every spec's ``build_tokenizer`` guarantees them):
  * ``padding_side == "left"`` (prompts are left-padded so generation continues from the right);
  * ``eos_token`` is the end-of-turn token (``<|im_end|>`` for ChatML models), so that
    ``generate`` stops at the end of the assistant turn;
  * ``pad_token`` is set and, where the vocabulary allows, differs from ``eos_token``
    (``<|endoftext|>`` for ChatML models) so a pad-id mask never hides the real eos.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2; bytes follow at 3..258

# ChatML, as used by Qwen / SmolLM2 (without their default system prompts). Extra template kwargs
# such as ``enable_thinking`` are accepted and ignored.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with no merges: every byte is one token, so any text (unicode,
    LaTeX, control characters) round-trips losslessly. Vocabulary: 3 special tokens
    (``<|endoftext|>``=0 pad/bos, ``<|im_start|>``=1, ``<|im_end|>``=2 eos) + 256 bytes = 259.
    Built in memory in about a millisecond; deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_to_char[b]] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=CHATML_TEMPLATE,
    )


# Files that hold a tokenizer's vocabulary, one of which every loadable local folder has (fast:
# tokenizer.json; slow BPE: vocab.json + merges.txt; WordPiece: vocab.txt; sentencepiece: *.model;
# tiktoken: *.tiktoken). tokenizer_config.json alone holds settings, not a vocabulary.
TOKENIZER_VOCAB_PATTERNS = ("tokenizer.json", "vocab.json", "vocab.txt", "*.model", "*.tiktoken")


def missing_tokenizer_message(folder) -> str | None:
    """None if ``folder`` holds tokenizer vocabulary files, else why it cannot give a tokenizer.

    Without this check transformers answers a folder without tokenizer files with "you need to
    have sentencepiece or tiktoken installed", which sends users after the wrong fix."""
    from pathlib import Path

    folder = Path(folder)
    if any(next(folder.glob(pattern), None) is not None for pattern in TOKENIZER_VOCAB_PATTERNS):
        return None
    return (
        f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_VOCAB_PATTERNS)}): copy them next to "
        "config.json from the model's original folder (e.g. `hf download <name> --include 'tokenizer*' "
        "'vocab*' 'merges.txt' '*.model' --local-dir <folder>` where the hub is reachable)"
    )


def configure_chat_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    *,
    eos_token: str | None = None,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerBase:
    """Apply the prerl conventions (see module docstring) to a loaded tokenizer, in place.

    ``eos_token=None`` picks ``<|im_end|>`` when the chat template uses it (ChatML), else keeps the
    tokenizer's own eos."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if eos_token is None and IM_END in vocab and IM_END in (template or ""):
        eos_token = IM_END
    if eos_token is not None:
        if eos_token not in vocab:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer vocabulary")
        tokenizer.eos_token = eos_token
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token; pass eos_token explicitly")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if ENDOFTEXT in vocab and ENDOFTEXT != tokenizer.eos_token:
            tokenizer.pad_token = ENDOFTEXT
        elif tokenizer.pad_token is None:
            log.warning("tokenizer has no pad token; using eos %r as pad", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model_max_length is not None:
        tokenizer.model_max_length = int(model_max_length)
    return tokenizer
