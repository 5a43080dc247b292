"""Peak bytes per logit element of prerl's log-prob paths, measured on a device.

These are the ``LOGITS_*_BYTES_PER_ELEMENT`` constants of ``tools/memory_estimate.py``, which were
measured with the CPU allocator. ``tests/test_memory_estimate.py`` re-measures them on CPU;
``scripts/gpu_check.py`` measures them on the GPU and prints them next to the constants, so a GPU
session sees whether the CUDA kernels of the same ATen composites allocate what the CPU's do (the
logits dominate the training peak of the Qwen3 presets, 151,936-entry vocabulary).

A peak is the allocator's largest live total while the measured function runs, relative to its
start: ``torch.cuda.max_memory_allocated`` on CUDA, ``torch.profiler`` memory events on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tools.memory_estimate import (
    LOGITS_CHUNKED_SCORING_BYTES_PER_ELEMENT,
    LOGITS_CHUNKED_SCORING_ENTROPY_BYTES_PER_ELEMENT,
    LOGITS_CHUNKED_TRAIN_BYTES_PER_ELEMENT,
    LOGITS_SCORING_BYTES_PER_ELEMENT,
    LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT,
    LOGITS_TRAIN_BYTES_PER_ELEMENT,
    LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT,
)


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Largest live allocation total while ``fn`` runs, above what was live at its start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"no peak counter for device {device}: cuda or cpu")
    return cpu_peak_and_end(fn)[0]


def cpu_peak_and_end(fn: Callable[[], None]) -> tuple[int, int]:
    """The CPU allocator's peak live bytes while ``fn`` runs and the bytes still live at its end,
    both relative to its start (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, live


def plain_bytes_per_element(device: torch.device, train: bool, entropy: bool,
                            vocab: int = 16384, rows: int = 2, tokens: int = 64, hidden: int = 32) -> float:
    """The whole (rows, tokens, vocab) bf16 logits through ``token_logprobs`` (and
    ``entropy_from_logits``), forward and, with ``train``, backward."""
    from prerl.algorithms import entropy_from_logits, token_logprobs

    W = torch.randn(vocab, hidden, dtype=torch.bfloat16, device=device, requires_grad=train)
    x = torch.randn(rows, tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=train)
    labels = torch.randint(0, vocab, (rows, tokens), device=device)

    def run():
        with torch.set_grad_enabled(train):
            logits = x @ W.t()  # the lm head, bf16 out
            out = token_logprobs(logits, labels).sum()
            if entropy:
                out = out + entropy_from_logits(logits).sum()
            del logits
            if train:
                out.backward()

    return peak_bytes(run, device) / (rows * tokens * vocab)


def chunked_bytes_per_element(device: torch.device, train: bool, entropy: bool, vocab: int = 8192,
                              rows: int = 2, tokens: int = 256, hidden: int = 16, chunk: int = 128) -> float:
    """``chunked_token_logprobs`` (each chunk checkpointed): per element of one chunk, chunk x vocab."""
    from prerl.algorithms import chunked_token_logprobs

    W = torch.randn(vocab, hidden, dtype=torch.bfloat16, device=device, requires_grad=train)
    x = torch.randn(rows, tokens, hidden, dtype=torch.bfloat16, device=device, requires_grad=train)
    labels = torch.randint(0, vocab, (rows, tokens), device=device)
    mask = torch.ones(rows, tokens, dtype=torch.long, device=device)

    def run():
        with torch.set_grad_enabled(train):
            logprobs, ent = chunked_token_logprobs(x, W, labels, mask, chunk_tokens=chunk, with_entropy=entropy)
            if train:
                (logprobs.sum() + (ent.sum() if entropy else 0)).backward()

    return peak_bytes(run, device) / (chunk * vocab)


@dataclass(frozen=True)
class Case:
    name: str
    chunked: bool
    train: bool
    entropy: bool
    constant: float  # the estimator's bytes per element


CASES = (
    Case("plain train", False, True, False, LOGITS_TRAIN_BYTES_PER_ELEMENT),
    Case("plain train + entropy", False, True, True, LOGITS_TRAIN_ENTROPY_BYTES_PER_ELEMENT),
    Case("plain scoring", False, False, False, LOGITS_SCORING_BYTES_PER_ELEMENT),
    Case("plain scoring + entropy", False, False, True, LOGITS_SCORING_ENTROPY_BYTES_PER_ELEMENT),
    Case("chunked train", True, True, False, LOGITS_CHUNKED_TRAIN_BYTES_PER_ELEMENT),
    Case("chunked train + entropy", True, True, True, LOGITS_CHUNKED_TRAIN_BYTES_PER_ELEMENT),
    Case("chunked scoring", True, False, False, LOGITS_CHUNKED_SCORING_BYTES_PER_ELEMENT),
    Case("chunked scoring + entropy", True, False, True, LOGITS_CHUNKED_SCORING_ENTROPY_BYTES_PER_ELEMENT),
)


def measure(case: Case, device: torch.device, **shape) -> float:
    fn = chunked_bytes_per_element if case.chunked else plain_bytes_per_element
    return fn(device, case.train, case.entropy, **shape)


def measure_all(device: torch.device, vocab: int | None = None, chunk: int | None = None) -> list[dict]:
    """Every case on ``device``: {name, measured, constant, ratio}. ``vocab`` / ``chunk`` set the
    shapes (on a GPU the presets': 151,936 and 1,024); None keeps the tests' CPU shapes."""
    rows = []
    for case in CASES:
        shape = {}
        if vocab:
            shape["vocab"] = vocab
        if chunk and case.chunked:
            shape["chunk"], shape["tokens"] = chunk, 2 * chunk
        measured = measure(case, device, **shape)
        rows.append({"name": case.name, "measured": round(measured, 2), "constant": case.constant,
                     "ratio": round(measured / case.constant, 3)})
    return rows
