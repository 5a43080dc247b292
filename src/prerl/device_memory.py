"""Peak accelerator memory of each phase of an RL step, read from the device's caching allocator.

The module logs ``train/memory/rollout_peak_gib`` (sampling and rewards, a sampling copy's build
included), ``train/memory/update_peak_gib`` (scoring, forward + backward, the optimizer step) and
``val/memory/peak_gib``: the phases of ``tools/memory_estimate.py``, so that where the estimate and
the card disagree (issue 14: QLoRA measured 8% over its estimate) the logs say which phase it is.
Devices without a peak counter (CPU, MPS) log none of them.
"""

from __future__ import annotations

from types import ModuleType

import torch

GiB = 2**30
# The process's peak before the latest reset: per-phase resets would otherwise erase the peak of
# the whole run, which the GPU check reports next to the estimate.
_high_water: dict[str, int] = {}


def _key(device: torch.device) -> str:
    return f"{device.type}:{device.index or 0}"  # "cuda" and "cuda:0" are one counter


def peak_backend(device: torch.device) -> ModuleType | None:
    """``torch.cuda`` / ``torch.xpu`` for such a device: the module with the peak counter; None elsewhere."""
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    needed = ("max_memory_allocated", "reset_peak_memory_stats")
    return backend if all(hasattr(backend, name) for name in needed) else None


class PhasePeaks:
    """Peak allocated bytes between consecutive ``lap`` calls on one device.

    ``backend``: an object with ``max_memory_allocated(device)`` and ``reset_peak_memory_stats(device)``
    (default: the device's torch module, see ``peak_backend``)."""

    def __init__(self, device: torch.device, backend=None):
        self.device = device
        self.backend = backend if backend is not None else peak_backend(device)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def lap(self) -> float | None:
        """GiB: the peak since the previous lap (or since the process or the last reset), then a
        reset so the next lap measures its own phase; None without a peak counter."""
        if self.backend is None:
            return None
        peak = int(self.backend.max_memory_allocated(self.device))
        key = _key(self.device)
        _high_water[key] = max(_high_water.get(key, 0), peak)
        self.backend.reset_peak_memory_stats(self.device)
        return peak / GiB


def process_peak_gib(device: torch.device, backend=None) -> float | None:
    """GiB: the peak since ``reset_process_peak`` (or the process start), across every lap's reset."""
    backend = backend if backend is not None else peak_backend(device)
    if backend is None:
        return None
    return max(_high_water.get(_key(device), 0), int(backend.max_memory_allocated(device))) / GiB


def reset_process_peak(device: torch.device, backend=None) -> None:
    """Start a new whole-run peak (the GPU check does before each run it measures)."""
    backend = backend if backend is not None else peak_backend(device)
    _high_water.pop(_key(device), None)
    if backend is not None:
        backend.reset_peak_memory_stats(device)
