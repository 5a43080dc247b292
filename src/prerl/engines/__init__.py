"""Rollout engines: what samples the G responses per prompt (``module.rollout.engine``).

Every engine returns the same :class:`Generation` layout, so the module, the rewards and the
update never know which one sampled. ``hf`` (the default) is Hugging Face ``generate`` on the
training policy itself. Old log-probs are always recomputed by the training model, whatever the
engine (docs/method.md, "Loss").
"""

from __future__ import annotations

from prerl.engines.base import ENGINES, Generation, RolloutEngine, build_engine
from prerl.engines.hf import HFEngine

__all__ = ["ENGINES", "Generation", "HFEngine", "RolloutEngine", "build_engine"]
