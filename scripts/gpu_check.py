"""The GPU check: the chip's own limits, then the rollout engine's modes and the update at real
model shapes, in one call (under 8 minutes on one H200; ``--budget-s`` stops early), and measured
against estimated memory.

1. Chip: a bf16 matmul (8192^3; the update's TFLOP/s are compared with it) and a large
   device-to-device copy (bytes read + written per second; the decode steps' limit); and the peak
   bytes per logit element of every log-prob path (tools/logits_bytes.py; vocabulary 151,936,
   1,024-token chunks on a GPU) next to the estimator's constants, which were measured on CPU.
2. Settings, each one ``train()`` of the project on a random-initialised Qwen3 folder at the real
   shapes (vocab 151936; config written here, weights random, the byte-level ChatML tokenizer: no
   download), with the preset's training regime, ``reward=random`` and long random prompts:
     qwen3-1.7b       experiment=dsrl_qwen3_1p7b_1gpu (fp32 master weights, bf16 autocast)
     qwen3-4b-qlora   experiment=qlora_qwen3_4b_24gb  (NF4 base + LoRA r=16)
   4 prompts x 8 = 32 sequences per rollout. A short warm-up update, then one update per engine
   mode (``module.rollout.engine_options`` of the hf engine, swapped between updates):
     generate (none), refill, bf16 (sampling_weights=bfloat16), refill-bf16, static (static_cache),
     compile (static cache + torch.compile; its first call compiles: not in the default list; give it
     twice, ``--modes generate,static,compile,compile``, and the second row is the compiled speed)
   Per mode: ms per decode step (the rollout's wall time minus its prefill forwards, over its
   one-token forwards), sampled tok/s, the memory-bound limit (bytes a bf16 decode step must read:
   block and head weights, NF4 blocks at 0.5 byte, plus the KV cache at the mean context; over the
   copy bandwidth) and the step's fraction of it, the update's TFLOP/s (train/perf/update_tflops:
   model FLOPs, prerl.flops) and its fraction of the measured matmul rate, with the update's
   micro-batches as large as the card holds by the estimator (``--update-budget largest``:
   ``max_micro_batch_tokens``; ``preset`` keeps the preset's). Per setting: peak
   torch.cuda.max_memory_allocated next to the estimator's figure (the largest over the modes,
   without its assumed allocator overhead).
3. Optional, as before: ``--paths`` (bf16, fsdp, qlora through train() on --model) and ``--presets``
   (each GPU preset at a reduced shape, measured next to estimated memory).

    python scripts/gpu_check.py                                     # the check (GPU, real shapes)
    python scripts/gpu_check.py --device cpu --model tiny --max-new-tokens 8 --prompt-len 48   # CI
    python scripts/gpu_check.py --settings '' --paths bf16,fsdp,qlora --presets dsrl_qwen3_1p7b_1gpu
    python scripts/gpu_check.py --device cpu --model tiny --settings '' --preset-steps 1 \
        --presets dsrl_qwen3_4b,qlora_qwen3_4b_24gb,dsrl_qwen3_1p7b_1gpu          # presets on CPU

On a lent GPU machine without hydra, bitsandbytes or math-verify: ``--bundle logs/gpu_site`` here
copies them into an ignored folder; carry it and run with ``PYTHONPATH=logs/gpu_site``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()  # --budget-s counts from here: the imports below take a while
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from prerl.device_memory import process_peak_gib, reset_process_peak  # noqa: E402
from prerl.flops import ModelShape  # noqa: E402
from prerl.models.params import unwrap_policy  # noqa: E402

from prerl.train import train  # noqa: E402
from tools.estimate_config import estimate_run  # noqa: E402
from tools.logits_bytes import measure_all as logits_bytes  # noqa: E402
from tools.memory_estimate import GiB, max_micro_batch_tokens  # noqa: E402

GPU_PRESETS = ("dsrl_qwen3_4b", "qlora_qwen3_4b_24gb", "dsrl_qwen3_1p7b_1gpu")
# Qwen3 architectures (the models' config.json); "tiny" keeps the vocabulary, shrinks the rest.
QWEN3 = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
QWEN3_COMMON = dict(num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY_COMMON = dict(num_key_value_heads=2, head_dim=16)
# setting -> (Qwen3 model, the preset whose training regime it runs, bytes per block weight in a decode step)
SETTINGS = {"qwen3-1.7b": ("qwen3-1.7b", "dsrl_qwen3_1p7b_1gpu", 2.0),
            "qwen3-4b-qlora": ("qwen3-4b", "qlora_qwen3_4b_24gb", 0.5)}
NO_CHECKPOINT = "++trainer.enable_checkpointing=false"  # a 4B model's weights and AdamW state: minutes of writing
CHAT_OVERHEAD, QUESTION_MIN = 128, 16  # prompt tokens besides the question (byte tokenizer); shortest question
MODES = {"generate": {}, "refill": {"refill": True}, "bf16": {"sampling_weights": "bfloat16"},
         "refill-bf16": {"refill": True, "sampling_weights": "bfloat16"}, "static": {"static_cache": True},
         "compile": {"compile": True}}
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


# ---------------------------------------------------------------- the chip
def _timed(fn, reps: int, device: str) -> float:
    """Seconds per call of ``fn`` (after two warm-up calls; the device synchronised around)."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - started) / reps


def matmul_tflops(device: str, n: int, reps: int = 10) -> float:
    """TFLOP/s of an (n, n) @ (n, n) matmul on random data: bf16 on the GPU, float32 on the CPU."""
    dev, dtype = ("cuda", torch.bfloat16) if device == "gpu" else ("cpu", torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, reps, device) / 1e12


def copy_bandwidth(device: str, nbytes: int, reps: int = 10) -> float:
    """Bytes read + written per second by a copy of ``nbytes`` between two device buffers."""
    dev = "cuda" if device == "gpu" else "cpu"
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    return 2 * nbytes / _timed(lambda: dst.copy_(src), reps, device)


def decode_step_bytes(shape: ModelShape, block_weight_bytes: float, rows: float, context: float) -> float:
    """Bytes one decode step must read: every block weight (``block_weight_bytes`` each: 2 for bf16,
    0.5 for NF4), the bf16 LM head (hidden x vocab), and the bf16 keys and values of ``rows``
    sequences of ``context`` tokens (2 x layers x kv_heads x head_dim each); embeddings read one row."""
    weights = shape.layers * shape.layer_matmul_params * block_weight_bytes + shape.hidden * shape.vocab * 2
    kv_cache = rows * context * 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    return weights + kv_cache


# ---------------------------------------------------------------- model folders and prompts
def qwen3_config(model: str, tiny: bool) -> dict:
    """The config.json fields of a Qwen3 model at its real shapes (``tiny``: 2 small layers, same vocabulary)."""
    shape = QWEN3["tiny" if tiny else model]
    return {**QWEN3_COMMON, **(TINY_COMMON if tiny else {}), **shape, "bos_token_id": 0, "pad_token_id": 0,
            "eos_token_id": 2}  # the byte tokenizer's <|endoftext|> and <|im_end|>


def write_qwen3_folder(folder: Path, fields: dict, device: str) -> Path:
    """A Hugging Face folder of a random-initialised Qwen3 (bf16 safetensors) with the byte-level
    ChatML tokenizer; kept when it already holds the same config."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prerl.models import build_tiny_tokenizer

    marker = folder / "gpu_check_config.json"
    if marker.is_file() and json.loads(marker.read_text()) == fields:
        return folder
    torch.manual_seed(0)
    with torch.device("cuda" if device == "gpu" else "cpu"):  # initialised where it is fast
        model = Qwen3ForCausalLM(Qwen3Config(**fields, dtype="bfloat16")).to(torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    del model
    marker.write_text(json.dumps(fields))
    return folder


def write_long_prompts(path: Path, count: int, length: int) -> Path:
    """``count`` problems whose questions are ``length`` random lowercase bytes (one token each)."""
    rng = torch.Generator().manual_seed(0)
    letters = torch.randint(ord("a"), ord("z") + 1, (count, length), generator=rng)
    path.write_text("".join(json.dumps({"question": bytes(row.tolist()).decode(), "answer": "0"}) + "\n"
                            for row in letters))
    return path


# ---------------------------------------------------------------- engine modes through train()
class EngineModes(Callback):
    """Swaps the hf engine's options between updates and measures each update's rollout and update.

    Update 0 is a warm-up in the first mode (``warmup_tokens`` new tokens); update k samples with
    ``modes[k - 1]``. Set ``EngineModes.plan`` before ``train()`` (Hydra builds the callback).
    Stops training once ``deadline`` (perf_counter) has passed.
    """

    plan: dict = {}

    def __init__(self):
        self.modes, self.warmup_tokens, self.deadline = self.plan["modes"], self.plan["warmup_tokens"], self.plan["deadline"]
        self.rows: list[dict] = []
        self._max_new_tokens = None
        self.plan["instance"] = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from prerl.engines import build_engine

        step = len(self.rows)  # updates measured so far (a skipped non-finite update does not count as a step)
        self.mode = self.modes[max(step - 1, 0)]
        pl_module.engine = build_engine("hf", policy=lambda: pl_module.policy, tokenizer=pl_module.tokenizer,
                                        synced_gpus=pl_module._is_sharded, **MODES[self.mode])
        if step == 0:
            self._max_new_tokens = pl_module.rollout_cfg.max_new_tokens
            pl_module.rollout_cfg.max_new_tokens = self.warmup_tokens
        self.meter = ForwardMeter(unwrap_policy(pl_module.policy), pl_module.device.type == "cuda")
        generate = pl_module.engine.generate

        def timed(*args, **kwargs):
            graphs = dynamo_graphs()
            self.meter.start()
            try:
                self.generation = generate(*args, **kwargs)
            finally:
                self.meter.stop()
                self.graphs = dynamo_graphs() - graphs
            return self.generation

        pl_module.engine.generate = timed
        self.prompt_width = int(batch["prompt_mask"].sum(dim=1).max())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._max_new_tokens is not None:
            pl_module.rollout_cfg.max_new_tokens, self._max_new_tokens = self._max_new_tokens, None
        metrics = trainer.callback_metrics
        lengths = self.generation.response_mask.sum(dim=1).float()
        m = self.meter
        self.rows.append({
            "mode": f"{self.mode} (warm-up)" if not self.rows else self.mode,
            "sequences": len(lengths), "new_tokens_max": int(lengths.max()), "tokens": int(lengths.sum()),
            "rollout_s": m.wall_s, "prefill_s": m.prefill_s, "decode_steps": m.decode_steps,
            "rows_per_step": m.decode_rows / max(m.decode_steps, 1),
            "context_mean": self.prompt_width + float(lengths.mean()) / 2,
            "update_tflops": float(metrics["train/perf/update_tflops"]),
            "update_s": float(metrics["train/time/update_s"]),
            "graphs_compiled": self.graphs,
        })
        self.meter = self.generation = None  # they hold the policy and the rollout's tensors
        if time.perf_counter() > self.deadline:
            trainer.should_stop = True


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a rollout's difference: its compiles
    and recompiles; 0 when nothing runs compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ForwardMeter:
    """Wall time of one ``generate`` call, its prefill forwards' time (synchronised) and its
    one-token (decode) forwards: count and rows. It wraps the forward of the model's class, so it
    also counts the forwards of a sampling copy (``sampling_weights`` under FSDP or with a 4-bit base
    samples from a new instance of the same class)."""

    def __init__(self, model: torch.nn.Module, cuda: bool):
        self.cls, self.sync = type(model), torch.cuda.synchronize if cuda else (lambda: None)
        self.wall_s = self.prefill_s = 0.0
        self.decode_steps = self.decode_rows = 0

    def _pre(self, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._prefill = ids is None or ids.shape[1] > 1
        if self._prefill:
            self.sync()
            self._t = time.perf_counter()
        else:
            self.decode_steps, self.decode_rows = self.decode_steps + 1, self.decode_rows + ids.shape[0]

    def _post(self):
        if self._prefill:
            self.sync()
            self.prefill_s += time.perf_counter() - self._t

    def start(self):
        forward, meter = self.cls.forward, self
        self._forward = forward

        def metered(model, *args, **kwargs):
            meter._pre(args, kwargs)
            out = forward(model, *args, **kwargs)
            meter._post()
            return out

        self.cls.forward = functools.wraps(forward)(metered)
        self.sync()
        self._wall = time.perf_counter()

    def stop(self):
        self.sync()
        self.wall_s += time.perf_counter() - self._wall
        self.cls.forward = self._forward


def setting_overrides(setting: str, folder: Path, prompts: Path, args, modes: list[str]) -> list[str]:
    """The overrides of one setting's run: the preset's regime on ``folder``, reward=random, long
    prompts, 4 prompts x 8, a warm-up update then one per mode; GRPO (conditional, full prompts) after it."""
    preset = SETTINGS[setting][1]
    over = [f"experiment={preset}", f"model.name_or_path={folder}", "reward=random", "data=jsonl",
            f"data.train.path={prompts}", "data.train.holdout=4",
            f"data.max_prompt_length={max(args.prompt_len, QUESTION_MIN + CHAT_OVERHEAD)}", f"data.batch_size={args.prompts}",
            f"module.rollout.group_size={args.group_size}", f"module.rollout.max_new_tokens={args.max_new_tokens}",
            f"module.rollout.generation_batch_size={args.prompts * args.group_size}",
            f"++module.rollout.engine_options={hydra_value(MODES[modes[0]])}",
            "trainer.devices=1", f"trainer.max_steps={1 + len(modes)}", "objective.switch_step=1",
            "validate_before=false", "validate_after=false", "trainer.limit_val_batches=0",
            "logger=csv", "callbacks=none", NO_CHECKPOINT, f"task_name=gpu_check_{setting}"]
    if args.device == "cpu":
        over.append("trainer=cpu")
    return over


def run_setting(setting: str, args, out: Path, peak_tflops: float, bandwidth: float, deadline: float) -> dict:
    model, _, weight_bytes = SETTINGS[setting]
    fields = qwen3_config(model, tiny=args.model == "tiny")
    folder = write_qwen3_folder(out / "models" / f"{model}{'-tiny' if args.model == 'tiny' else ''}", fields, args.device)
    # the chat template and the preset's system prompt take up to CHAT_OVERHEAD of the prompt's tokens
    prompts = write_long_prompts(out / "long_prompts.jsonl", 64, max(args.prompt_len - CHAT_OVERHEAD, QUESTION_MIN))
    modes = [m for m in args.modes.split(",") if m]
    overrides = setting_overrides(setting, folder, prompts, args, modes)
    budget = None
    if args.update_budget == "largest":  # the update's micro-batches as large as the card holds (estimated)
        run = estimate_run(compose_train(overrides))
        gpu_gib = (torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available()
                   else float(run.hardware["gpu_memory_gb"]))
        budget = max_micro_batch_tokens(run.estimate, gpu_gib)
        if budget:
            overrides += [f"module.update.max_tokens_per_micro_batch={budget}",
                          f"module.update.micro_batch_size={run.estimate.setup.sequences_per_rank}"]
    estimates = []
    for mode in modes:  # the estimator counts the sampling copy of sampling_weights
        over = overrides[:]
        over[over.index(f"++module.rollout.engine_options={hydra_value(MODES[modes[0]])}")] = \
            f"++module.rollout.engine_options={hydra_value(MODES[mode])}"
        estimates.append(estimate_run(compose_train(over)).estimate)
    EngineModes.plan = {"modes": modes, "warmup_tokens": min(16, args.max_new_tokens), "deadline": deadline}
    # the measuring callback, and train/perf/update_peak_frac in the run's own logs
    cfg = compose_train([*overrides, "+callbacks.engine_modes._target_=__main__.EngineModes",
                         f"+module.peak_tflops={peak_tflops:.1f}"])
    summary, seconds = _run(cfg, out, setting)
    from transformers import Qwen3Config

    shape = ModelShape.from_config(Qwen3Config(**fields))
    rows = []
    for r in EngineModes.plan["instance"].rows:
        ms_per_step = 1000 * (r["rollout_s"] - r["prefill_s"]) / max(r["decode_steps"], 1)
        limit_ms = 1000 * decode_step_bytes(shape, weight_bytes, r["rows_per_step"], r["context_mean"]) / bandwidth
        rows.append({**r, "ms_per_decode_step": ms_per_step, "tokens_per_s": r["tokens"] / r["rollout_s"],
                     "memory_bound_ms": limit_ms, "of_memory_bound": limit_ms / ms_per_step,
                     "update_of_peak": r["update_tflops"] / peak_tflops})
    largest = max(estimates, key=lambda e: e.peak_phase.total)
    return {"setting": setting, "folder": str(folder), "seconds": round(seconds, 1), "overrides": overrides,
            "update_token_budget": budget,
            "modes": rows, "skipped_modes": modes[max(len(rows) - 1, 0):],  # by --budget-s
            "peak_gpu_mem_gib": _peak_gib(), "estimate_gib": round(largest.peak_phase.total / GiB, 3),
            "estimate_phase": largest.peak_phase.name,
            "measured_phases_gib": measured_phases(summary), "estimate_groups_gib": estimated_phases(largest)}


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
        "trainer.check_val_every_n_epoch=1000", "logger=csv", "callbacks=none", NO_CHECKPOINT,
        f"task_name=gpu_check_{name}",
    ]
    # No checkpoints: drop what the preset sets on callbacks that callbacks=none removed.
    stray = compose_train(over).get("callbacks") or {}
    return over + [f"~callbacks.{key}" for key, node in stray.items() if "_target_" not in node]


def _run(cfg, out: Path, label: str) -> tuple[dict, float]:
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / label)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        reset_process_peak(torch.device("cuda", torch.cuda.current_device()))
    started = time.perf_counter()
    summary = train(cfg)
    return summary, time.perf_counter() - started


def _peak_gib() -> float | None:
    """The run's peak allocated GiB (model load included), across the module's per-phase resets."""
    if not torch.cuda.is_available():
        return None
    return round(process_peak_gib(torch.device("cuda", torch.cuda.current_device())), 3)


# The module's measured phases (prerl.device_memory) and the estimator's phases each one covers.
PHASE_GROUPS = {"rollout": ("generation", "sampling copy"), "update": ("training", "scoring", "optimizer"),
                "validation": ("validation",)}


def measured_phases(summary: dict) -> dict[str, float | None]:
    """GiB per phase group: the last update's rollout and update peaks (AdamW's states exist by
    then, as the estimate assumes) and the final validation's; None where not measured (CPU)."""
    train, val = summary.get("train_metrics", {}), summary.get("after", {})
    return {"rollout": train.get("train/memory/rollout_peak_gib"), "update": train.get("train/memory/update_peak_gib"),
            "validation": val.get("val/memory/peak_gib")}


def estimated_phases(est) -> dict[str, float | None]:
    """GiB per phase group: the estimate's largest phase in each (None: a phase the run has not)."""
    out = {}
    for group, prefixes in PHASE_GROUPS.items():
        totals = [p.total for p in est.phases if p.short.startswith(prefixes)]
        out[group] = round(max(totals) / GiB, 3) if totals else None
    return out


def run_path(path: str, args, out: Path) -> dict:
    overrides = [
        *model_overrides(args.model, args.device), *path_overrides(path, args.model, args.device),
        "objective=dual", f"objective.switch_step={max(args.steps // 2, 1)}", f"trainer.max_steps={args.steps}",
        f"data.batch_size={args.prompts}", "data.train.size=400",
        f"module.rollout.group_size={args.group_size}", f"module.rollout.max_new_tokens={args.max_new_tokens}",
        "module.update.micro_batch_size=16", "module.cross_space_diagnostics_every_n_steps=0",
        "validate_before=false", "validate_after=false", "trainer.limit_val_batches=0",
        "logger=csv", "callbacks=none", NO_CHECKPOINT, f"task_name=gpu_check_{path}",
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
        "measured_phases_gib": measured_phases(summary), "estimate_groups_gib": estimated_phases(est),
    }


def print_settings(chip: dict, settings: list[dict]) -> None:
    print(f"\nchip: {chip['matmul']} {chip['matmul_tflops']:.1f} TFLOP/s; device copy {chip['copy_gb_per_s']:.1f} GB/s "
          "(read + write)")
    head = (f"{'setting':<16}{'mode':<22}{'seqs':>5}{'new tok':>8}{'ms/step':>9}{'tok/s':>9}{'bound ms':>9}"
            f"{'of bound':>9}{'upd TFLOP/s':>12}{'of peak':>8}{'graphs':>7}")
    print(head)
    for r in settings:
        for m in r["modes"]:
            print(f"{r['setting']:<16}{m['mode']:<22}{m['sequences']:>5}{m['new_tokens_max']:>8}"
                  f"{m['ms_per_decode_step']:>9.2f}{m['tokens_per_s']:>9.1f}{m['memory_bound_ms']:>9.3f}"
                  f"{m['of_memory_bound']:>9.3f}{m['update_tflops']:>12.3f}{m['update_of_peak']:>8.3f}"
                  f"{m['graphs_compiled']:>7}")
        if r["skipped_modes"]:
            print(f"{r['setting']:<16}skipped (--budget-s): {','.join(r['skipped_modes'])}")
        if r["update_token_budget"]:
            print(f"{r['setting']:<16}update micro-batches: {r['update_token_budget']}-token budget (the largest the "
                  "card holds, estimated)")
    print("(ms/step: the rollout's wall time minus its prefill forwards, per one-token forward; bound ms: the bytes a "
          "bf16 decode step reads (weights, NF4 blocks at 0.5 byte, KV cache at the mean context) over the copy "
          "bandwidth; upd TFLOP/s: train/perf/update_tflops, model FLOPs over the update's wall time; of peak: over "
          "the matmul above; graphs: torch.compile graphs built during the rollout, compiles and recompiles)")
    print(f"\n{'setting':<16}{'measured GiB':>14}{'estimate GiB':>14}  estimated peak phase")
    for r in settings:
        measured = f"{r['peak_gpu_mem_gib']:.2f}" if r["peak_gpu_mem_gib"] is not None else "-"
        print(f"{r['setting']:<16}{measured:>14}{r['estimate_gib']:>14.2f}  {r['estimate_phase']}")


def print_logits_bytes(rows: list[dict]) -> None:
    print(f"\n{'log-prob path':<28}{'bytes/logit':>12}{'estimator':>10}{'ratio':>7}")
    for r in rows:
        print(f"{r['name']:<28}{r['measured']:>12.2f}{r['constant']:>10}{r['ratio']:>7.3f}")
    print("(peak allocated bytes per logit element while the path runs, tools/logits_bytes.py; estimator: the "
          "LOGITS_* constants of tools/memory_estimate.py, measured on CPU. A ratio above 1 on a GPU is memory the "
          "estimate misses in the scoring and training phases)")


def print_phase_peaks(rows: list[dict]) -> None:
    """Measured next to estimated, per phase group: where the estimate misses, which phase."""
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    print(f"\n{'peak GiB by phase':<22}" + "".join(f"{g + ' meas/est':>22}" for g in PHASE_GROUPS))
    for r in rows:
        cells = [f"{fmt(r['measured_phases_gib'][g])} / {fmt(r['estimate_groups_gib'][g])}" for g in PHASE_GROUPS]
        print(f"{r.get('setting') or r['preset']:<22}" + "".join(f"{c:>22}" for c in cells))
    print("(measured: the module's train/memory/rollout_peak_gib and update_peak_gib at the last update, "
          "val/memory/peak_gib; estimated: the largest estimator phase of each group: rollout = generation and "
          "the sampling copy, update = scoring, training and the optimizer step)")


# Distributions prerl needs that the lent GPU machines' image lacks (its list: /work/.library/device/KINDS.md).
BUNDLED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "math-verify", "latex2sympy2_extended", "bitsandbytes")


def bundle(dest: Path) -> Path:
    """Copy the BUNDLED distributions from this environment (their packages and dist-info, so that
    transformers' version checks find them) into ``dest``, for ``PYTHONPATH=dest`` on a machine
    that cannot install them. bitsandbytes keeps its CPU and CUDA 13 libraries only."""
    skip = shutil.ignore_patterns("__pycache__", "*rocm*", "libbitsandbytes_cuda1[0-2]*")
    dest.mkdir(parents=True, exist_ok=True)
    for name in BUNDLED:
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files if not str(f).startswith(("..", "/"))}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.is_dir():
                shutil.copytree(src, dest / top, ignore=skip, dirs_exist_ok=True)
            elif src.suffix == ".py":
                shutil.copy2(src, dest / top)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"bundled {', '.join(BUNDLED)} into {dest} ({size / 2**20:.1f} MiB)")
    return dest


def _attempt(kind: str, item: str, run, *args) -> dict:
    """One setting, path or preset; a failure is recorded (and its memory freed), the check goes on."""
    try:
        return run(item, *args)
    except Exception as error:  # noqa: BLE001 - one failing item must not cost the others' figures
        traceback.print_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {kind: item, "error": f"{type(error).__name__}: {error}"}


def main(argv=None) -> dict:
    started = STARTED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="tiny: tiny shapes everywhere (CPU/CI); else the settings use real Qwen3 shapes and the "
                             "paths / presets this model (smollm2 | an HF folder)")
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="no further update, setting, path or preset starts after this many seconds")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="engine-mode settings to run ('' for none)")
    parser.add_argument("--modes", default="generate,refill,bf16,refill-bf16", help=f"hf engine modes: {','.join(MODES)}")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per update (settings and paths)")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt (settings and paths)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="response tokens (settings and paths)")
    parser.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (settings)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the matmul benchmark (CPU: 256)")
    parser.add_argument("--update-budget", choices=["largest", "preset"], default="largest",
                        help="settings' update micro-batches: the largest token budget the card holds (estimator: "
                             "max_micro_batch_tokens; on CPU the preset's declared GPU) or the preset's own")
    parser.add_argument("--paths", default="", help="code paths to run: bf16,fsdp,qlora ('' for none)")
    parser.add_argument("--presets", default="", help=f"experiment presets to run: {','.join(GPU_PRESETS)} ('' for none)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer updates per path")
    parser.add_argument("--preset-steps", type=int, default=3, help="optimizer updates per preset")
    parser.add_argument("--preset-prompts", type=int, default=4, help="prompts per step (presets; G is the preset's)")
    parser.add_argument("--preset-val-problems", type=int, default=2, help="problems in the one validation batch")
    parser.add_argument("--preset-prompt-len", type=int, default=512, help="max prompt tokens (longer ones dropped)")
    parser.add_argument("--preset-max-new-tokens", type=int, default=256, help="response tokens, train and validation")
    parser.add_argument("--data", default=None, help="data config for the presets (default: the preset's)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu_check")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="only copy the packages the lent GPU machines lack into this folder, then exit")
    args = parser.parse_args(argv)
    if args.bundle:
        bundle(args.bundle)
        return {}
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device visible: pass --device cpu to exercise the same paths on the CPU")
    unknown = [m for m in args.modes.split(",") if m and m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    deadline = started + args.budget_s
    names = lambda text: [n for n in text.split(",") if n]  # noqa: E731
    gpu = args.device == "gpu"
    n = args.matmul_n if gpu else min(args.matmul_n, 256)
    chip = {"matmul": f"{'bf16' if gpu else 'fp32'} matmul {n}^3", "matmul_tflops": matmul_tflops(args.device, n),
            "copy_gb_per_s": copy_bandwidth(args.device, 2 * 2**30 if gpu else 64 * 2**20) / 1e9}
    try:  # a failure here must not cost the runs' figures
        chip["logits_bytes"] = logits_bytes(torch.device("cuda" if gpu else "cpu"), *((151936, 1024) if gpu else ()))
        print_logits_bytes(chip["logits_bytes"])
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        chip["logits_bytes_error"] = f"{type(error).__name__}: {error}"
    args.out.mkdir(parents=True, exist_ok=True)
    settings, paths, presets, skipped, failed = [], [], [], [], []
    result = {"chip": chip, "settings": settings, "paths": paths, "presets": presets, "skipped": skipped,
              "failed": failed}
    for kind, items, run in (("setting", names(args.settings), run_setting), ("path", names(args.paths), run_path),
                             ("preset", names(args.presets), run_preset)):
        for item in items:
            if time.perf_counter() > deadline:
                skipped.append(f"{kind} {item}")
                continue
            extra = (chip["matmul_tflops"], chip["copy_gb_per_s"] * 1e9, deadline) if kind == "setting" else ()
            row = _attempt(kind, item, run, args, args.out, *extra)
            if "error" in row:
                failed.append(row)
            else:
                {"setting": settings, "path": paths, "preset": presets}[kind].append(row)
                if kind == "setting":  # the figures so far, in case the call is cut short
                    print_settings(chip, [row])
            (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print("\n=== summary")
    print_settings(chip, settings)
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
    if settings or presets:
        print_phase_peaks(settings + presets)
        print("(measured: torch.cuda.max_memory_allocated over the whole run, model load included; estimate: the largest phase of "
              "tools/memory_estimate.py for the same config, without its assumed 1.5 GiB allocator/context overhead)")
        for r in settings + presets:
            print(f"  {r.get('setting') or r['preset']}: python scripts/estimate_memory.py {shlex.join(r['overrides'])}")
    for r in failed:
        print(f"FAILED {r}")
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s (budget {args.budget_s:.0f} s)" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
    result["seconds"] = round(total, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
