"""Sample filters: which responses of a rollout batch an objective trains on.

Each filter maps advantages ``(N,)`` to a boolean keep mask ``(N,)``. The authors' marginal
objectives compute the ``mean`` advantage and keep A < 0 (NSR-PreRL), A > 0 (PSR-PreRL) or all
(PreRL); with that convention an all-wrong or all-right group yields no sample at all.
"""

from __future__ import annotations

import torch

from prerl.algorithms.registry import Registry

FILTERS: Registry = Registry("sample filter")


@FILTERS.register("all")
def keep_all(advantages: torch.Tensor) -> torch.Tensor:
    """Keep every response. (N,) -> bool (N,)."""
    return torch.ones_like(advantages, dtype=torch.bool)


@FILTERS.register("negative")
def keep_negative(advantages: torch.Tensor) -> torch.Tensor:
    """Keep responses with A < 0 (NSR). (N,) -> bool (N,)."""
    return advantages < 0


@FILTERS.register("positive")
def keep_positive(advantages: torch.Tensor) -> torch.Tensor:
    """Keep responses with A > 0 (PSR). (N,) -> bool (N,)."""
    return advantages > 0


@FILTERS.register("nonzero")
def keep_nonzero(advantages: torch.Tensor) -> torch.Tensor:
    """Keep responses that carry a learning signal, A != 0. (N,) -> bool (N,)."""
    return advantages != 0
