#!/usr/bin/env python
"""Estimate the peak GPU memory (and a rough time) of one RL training step. No GPU, no download.

Examples:
  # Does QLoRA on Qwen3-4B with 8 responses of 2k tokens fit in 24 GB?
  python scripts/estimate_memory.py --check-qwen3-4b-qlora
  # the same, spelled out
  python scripts/estimate_memory.py --model qwen3-4b --preset qlora --prompts-per-step 1 --group-size 8 \\
      --prompt-len 1024 --response-len 2048 --micro-batch 2 --gradient-checkpointing --gpu rtx4090
  # full fine-tuning of Qwen3-4B with the authors' rollout (128 prompts x 8, 8k responses) on 8 x 80 GB
  python scripts/estimate_memory.py --model qwen3-4b --preset full --gpus 8 --gpu h100-80gb
  # any local model
  python scripts/estimate_memory.py --model /path/to/model/config.json --preset lora --lora-r 32

Formulas, assumptions and validation: docs/memory.md and src/prerl/memory_estimate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from prerl.memory_estimate import (  # noqa: E402
    MODEL_PRESETS,
    TrainingSetup,
    estimate_as_dict,
    estimate_memory,
    estimate_time,
    format_report,
    max_micro_batch,
    model_geometry,
)

# Vendor datasheet peaks (dense bf16 tensor TFLOP/s, memory bandwidth GB/s), memory in GiB.
GPUS = {
    "rtx4090": {"gpu_memory_gb": 24.0, "tflops": 165.0, "bandwidth_gbs": 1008.0},
    "a100-80gb": {"gpu_memory_gb": 80.0, "tflops": 312.0, "bandwidth_gbs": 2039.0},
    "h100-80gb": {"gpu_memory_gb": 80.0, "tflops": 989.0, "bandwidth_gbs": 3350.0},
}

# The question "does the QLoRA preset for Qwen3-4B with 8 responses of 2k tokens fit in 24 GB?".
QWEN3_4B_QLORA_CHECK = {
    "model": "qwen3-4b", "preset": "qlora", "gpus": 1, "prompt_len": 1024, "response_len": 2048,
    "prompts_per_step": 1, "group_size": 8, "micro_batch": 2, "lora_r": 16,
    "gradient_checkpointing": True, "gpu": "rtx4090",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Peak GPU memory of one RL step (generation, training micro-batch, optimizer step), "
        "broken down, with a fits / does-not-fit verdict. Defaults: the PreRL authors' rollout "
        "(128 prompts x 8 responses, 1,024 + 8,192 tokens) and this project's module defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="qwen3-4b",
                   help=f"built-in ({', '.join(MODEL_PRESETS)}) or a config.json / model folder")
    p.add_argument("--preset", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel ranks (FSDP-sharded unless --no-fsdp)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                   help="shard weights/grads/optimizer over --gpus (else DDP replicas)")
    p.add_argument("--prompt-len", type=int, default=1024, help="max prompt tokens")
    p.add_argument("--response-len", type=int, default=8192, help="max response tokens (all assumed to reach it)")
    p.add_argument("--prompts-per-step", type=int, default=128, help="prompts per RL step, all GPUs together")
    p.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (lora/qlora), all-linear")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--master-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="full preset: weight/grad/AdamW dtype (this project's Qwen3 experiment uses fp32)")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast (trainer.precision=bf16-mixed)")
    p.add_argument("--padding-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="padded batches: SDPA gets a mask (k/v repeated to all heads, s x s mask saved)")
    p.add_argument("--logits-positions", choices=["response", "all"], default="response",
                   help="positions whose logits are materialised in training (this project: response)")
    p.add_argument("--generation-batch", type=int, default=None,
                   help="sequences per generate call (default: all of a GPU's sequences at once, as prerl does)")
    p.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=True,
                   help="the module's periodic no-grad scoring with entropies (diagnostics_every_n_steps > 0)")
    p.add_argument("--entropy-bonus", action="store_true", help="the loss has an entropy term (entropy_coef != 0)")
    p.add_argument("--overhead-gb", type=float, default=1.5, help="CUDA context + allocator slack, GiB")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None,
                   help="sets --gpu-memory-gb, --tflops and --bandwidth-gbs (explicit flags win)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory in GiB (default 80)")
    p.add_argument("--tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default 989, H100)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth GB/s (default 3350, H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for prefill and training")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes) instead of a table")
    p.add_argument("--check-qwen3-4b-qlora", action="store_true",
                   help="shortcut: Qwen3-4B, QLoRA r=16, 1 prompt x G=8, 1,024 + 2,048 tokens, micro-batch 2, "
                   "gradient checkpointing, 24 GB (RTX 4090 numbers); other flags still override")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check-qwen3-4b-qlora" in argv:
        parser.set_defaults(**QWEN3_4B_QLORA_CHECK)
    args = parser.parse_args(argv)
    gpu = GPUS.get(args.gpu or "h100-80gb")
    for key in ("gpu_memory_gb", "tflops", "bandwidth_gbs"):
        if getattr(args, key) is None:
            setattr(args, key, gpu[key])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    geometry = model_geometry(args.model)
    setup = TrainingSetup(
        preset=args.preset,
        gpus=args.gpus,
        fsdp=args.fsdp,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        micro_batch=args.micro_batch,
        lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing,
        master_dtype=args.master_dtype,
        autocast=args.autocast,
        padding_mask=args.padding_mask,
        logits_positions=args.logits_positions,
        generation_batch=args.generation_batch,
        diagnostics=args.diagnostics,
        entropy_bonus=args.entropy_bonus,
        overhead_gib=args.overhead_gb,
    )
    est = estimate_memory(geometry, setup)
    if args.json:
        print(json.dumps(estimate_as_dict(est), indent=2))
        return 0
    time = estimate_time(geometry, setup, args.tflops, args.bandwidth_gbs, args.mfu)
    best = max_micro_batch(geometry, setup, args.gpu_memory_gb)
    print(f"GPU: {args.gpu_memory_gb:g} GiB, {args.tflops:g} TFLOP/s bf16, {args.bandwidth_gbs:g} GB/s"
          f"{f' ({args.gpu})' if args.gpu else ''}; MFU {args.mfu:g}")
    print(format_report(est, args.gpu_memory_gb, time, best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
