"""Rollout engines: what samples the G responses per prompt (``module.rollout.engine``).

Every engine returns the same :class:`Generation` layout, so the module, the rewards and the
update never know which one sampled. ``hf`` (the default) is Hugging Face ``generate`` on the
training policy itself; ``vllm`` (optional, docs/engines.md) is vLLM colocated in the
training process. Old log-probs are always recomputed by the training model, whatever the
engine (docs/method.md, "Loss").
"""

from __future__ import annotations

from prerl.engines.base import ENGINES, Generation, RolloutEngine, build_engine
from prerl.engines.hf import HFEngine


@ENGINES.register("vllm")
def _vllm_engine(**kwargs):
    """``vllm``: imported only when built, so the name is known without vLLM installed
    (prerl.engines.vllm, docs/engines.md); a missing install is a clear error there."""
    from prerl.engines.vllm import VLLMEngine

    return VLLMEngine(**kwargs)


__all__ = ["ENGINES", "Generation", "HFEngine", "RolloutEngine", "build_engine"]
