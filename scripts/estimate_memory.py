#!/usr/bin/env python
"""Estimate the peak GPU memory of a training run, phase by phase, from its Hydra config.

No GPU, no torch, no download: the config is composed exactly as `python src/train.py` composes
it, and tools/memory_estimate.py prints what each rank holds in every phase of a step
(generation prefill / decode, training micro-batch, no-grad scoring, optimizer step, validation
generation), the peak, a verdict against the experiment's declared `hardware`, and which standard
GPU sizes it fits.

  python scripts/estimate_memory.py experiment=dsrl_qwen3_4b
  python scripts/estimate_memory.py experiment=qlora_qwen3_4b_24gb module.rollout.generation_batch_size=64
  python scripts/estimate_memory.py experiment=dsrl_qwen3_1p7b_1gpu --json
  python scripts/estimate_memory.py model=hf model.name_or_path=/path/to/Qwen3-8B trainer=fsdp trainer.devices=8 \\
      --gpu-memory-gb 80

Formulas, assumptions and validation: docs/memory.md and tools/memory_estimate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/

from tools.estimate_config import compose_config, estimate_run  # noqa: E402
from tools.memory_estimate import estimate_as_dict, format_report, format_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for src/train.py (e.g. experiment=dsrl_qwen3_4b)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="judge against this GPU size instead of the declared hardware.gpu_memory_gb")
    parser.add_argument("--overhead-gb", type=float, default=1.5, help="CUDA context + allocator slack, GiB (assumed)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes) instead of a table")
    parser.add_argument("--summary", action="store_true", help="a few lines: phase totals, peak, verdict")
    args = parser.parse_args(argv)
    run = estimate_run(compose_config(args.overrides), overhead_gib=args.overhead_gb)
    hardware = run.hardware or {}
    gpu_gib = args.gpu_memory_gb if args.gpu_memory_gb is not None else hardware.get("gpu_memory_gb")
    gpus = hardware.get("gpus") if args.gpu_memory_gb is None else None
    if args.json:
        out = estimate_as_dict(run.estimate)
        out["hardware"] = run.hardware
        out["fits_hardware"] = run.fits_hardware
        print(json.dumps(out, indent=2))
        return 0
    if args.summary:
        print(format_summary(run.estimate, gpu_gib))
        return 0
    print(f"$ python scripts/estimate_memory.py {' '.join(args.overrides)}")
    print(format_report(run.estimate, gpu_gib, gpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
