"""Adapter-only state dicts and Hugging Face exports of a (Q)LoRA or fully fine-tuned policy.

* :func:`adapter_state_dict`: the LoRA tensors only, in peft's file format (the content of
  ``adapter_model.safetensors``; restore with ``peft.set_peft_model_state_dict``).
* :func:`trainable_state_dict` / :func:`load_trainable_state_dict`: every trainable tensor under
  the policy's own ``state_dict`` names (with LoRA: the adapters, plus biases when
  ``lora.bias != "none"``), for compact training checkpoints of a frozen base.
* :func:`export_pretrained`: a folder that plain transformers (merged) or peft (adapter) loads.

All of these need the full, unsharded policy (gather FSDP shards first; call on one rank).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic_files import write_text_atomic
from .lora import is_lora_model
from .params import unwrap_policy
from .quant import dense_weight, disable_cpu_inference_repacking, is_quantized, linear4bit_modules
from .spec import resolve_dtype

log = logging.getLogger(__name__)

EXPORT_MARKER = "prerl_export.json"  # describes the export; written last, before the rename


def _peft_model(model: torch.nn.Module):
    peft_model = unwrap_policy(model, strip_peft=False)
    if not is_lora_model(peft_model):
        raise ValueError(f"the policy has no LoRA adapters (got {type(peft_model).__name__}); set model.lora")
    return peft_model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter tensors of a peft policy (DDP / compile wrappers are stripped), detached,
    keyed as in ``adapter_model.safetensors`` (``...q_proj.lora_A.weight``, no adapter name).
    Load back with ``peft.set_peft_model_state_dict(model, sd)``. Raises ValueError without LoRA."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: prerl never resizes the vocabulary, and peft's "auto" looks up
    # the base model's config.json on the hub (network retries) at every call.
    sd = get_peft_model_state_dict(_peft_model(model), save_embedding_layers=False)
    return {k: v.detach() for k, v in sd.items()}


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every parameter with ``requires_grad``, detached, under the names of
    ``unwrap_policy(model, strip_peft=False).state_dict()``. With LoRA these are the adapter
    tensors only; without, the whole model. Restore with :func:`load_trainable_state_dict`."""
    inner = unwrap_policy(model, strip_peft=False)
    return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state_dict`) into ``model`` in place. Strict: the keys
    must be exactly the model's trainable parameters (raises KeyError listing the differences)."""
    inner = unwrap_policy(model, strip_peft=False)
    params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"trainable state does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if value.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} != model {tuple(p.shape)}")
            p.copy_(value)


# --------------------------------------------------------------------------- merging
def _default_export_dtype(base: torch.nn.Module) -> torch.dtype:
    """A 4-bit base: its compute dtype (the dtype its matmuls ran in); else the base's dtype."""
    layers = linear4bit_modules(base)
    if layers:
        dtype = getattr(layers[0][1], "compute_dtype", None)
        if dtype is not None:
            return dtype
    for p in base.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _lora_delta(module: torch.nn.Module) -> torch.Tensor | None:
    """Sum of the active, not yet merged adapters' weight deltas (float32), or None."""
    merged = set(getattr(module, "merged_adapters", []))
    delta = None
    for name in module.active_adapters:
        if name in merged or name not in module.lora_A:
            continue
        d = module.get_delta_weight(name).float()
        delta = d if delta is None else delta + d
    return delta


def merged_state_dict(model: torch.nn.Module, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the plain (unquantised, adapter-free) HF causal LM that computes what
    ``model`` computes: each LoRA layer's weight becomes ``W + scale * B @ A`` where W is the base
    weight, de-quantised for a 4-bit base (exactly the weight the QLoRA forward used: merging into
    the original full-precision checkpoint instead would reintroduce the quantisation error the
    adapters were trained against). Sums are taken in float32, then cast to ``dtype`` (default:
    the 4-bit compute dtype, else the model's dtype). Does not modify ``model``."""
    from peft.tuners.lora import LoraLayer

    linear4bit = {id(m) for _, m in linear4bit_modules(model)}
    inner = unwrap_policy(model, strip_peft=False)
    base = unwrap_policy(inner)  # the HF model with LoRA layers in place
    target_dtype = resolve_dtype(dtype) if dtype is not None else _default_export_dtype(base)
    if is_quantized(base):
        disable_cpu_inference_repacking(base)  # dense_weight needs the training layout

    out: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, module in base.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue  # base_layer / lora_A / lora_B of a LoRA layer handled above
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            if not isinstance(layer, torch.nn.Linear):
                raise NotImplementedError(f"merging LoRA into {type(layer).__name__} ({name}) is not supported")
            if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                raise NotImplementedError("merging DoRA adapters is not supported")
            weight = dense_weight(layer).float()
            delta = _lora_delta(module)
            if delta is not None:
                weight = weight + delta.to(weight.device)
        elif id(module) in linear4bit:
            layer = module  # a 4-bit layer without adapters: de-quantise
            weight = dense_weight(layer)
        else:
            continue
        out[f"{name}.weight"] = weight.to(target_dtype)
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().to(target_dtype)
        covered.add(name)
    for key, value in base.state_dict().items():
        if key in out:
            continue
        owner = key.rsplit(".", 1)[0]
        if any(owner == c or owner.startswith(c + ".") for c in covered):
            continue  # base_layer.*, lora_*, 4-bit quant-state entries of the layers handled above
        if not torch.is_floating_point(value):
            out[key] = value.detach()
        else:
            out[key] = value.detach().to(target_dtype)
    return out


def _plain_config(base: torch.nn.Module, dtype: torch.dtype):
    config = copy.deepcopy(base.config)
    config.__dict__.pop("quantization_config", None)
    for attr in ("_pre_quantization_dtype",):
        config.__dict__.pop(attr, None)
    config.dtype = dtype
    return config


def _build_merged_model(model: torch.nn.Module, dtype: str | torch.dtype | None):
    """A plain ``AutoModelForCausalLM`` holding :func:`merged_state_dict` (built on the meta
    device, then given the merged tensors: no random init, no second copy)."""
    from transformers import AutoModelForCausalLM

    base = unwrap_policy(model)
    state = merged_state_dict(model, dtype)
    target_dtype = resolve_dtype(dtype) if dtype is not None else _default_export_dtype(base)
    config = _plain_config(base, target_dtype)
    with torch.device("meta"):
        merged = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    expected = set(merged.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"merged state does not match {type(merged).__name__}: missing {missing}, unexpected {unexpected}")
    merged.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        merged.tie_weights()
    # non-persistent buffers (rotary inv_freq, ...) were created on the meta device: recompute them
    for mod_name, module in merged.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                src = base.get_submodule(mod_name).get_buffer(buf_name)
                module.register_buffer(buf_name, src.detach().clone(), persistent=buf_name not in module._non_persistent_buffers_set)
    merged.generation_config = copy.deepcopy(base.generation_config)
    merged.eval()
    return merged


# --------------------------------------------------------------------------- export
def export_pretrained(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    merge: bool,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the policy as a Hugging Face folder, atomically (temp folder + rename).

    * ``merge=True``: a plain model folder (``AutoModelForCausalLM.from_pretrained(out_dir)``),
      LoRA merged into the weights (:func:`merged_state_dict`; works for an unquantised and for a
      4-bit base, whose weights are de-quantised exactly as trained), in ``dtype`` (default: the
      4-bit compute dtype, else the model's dtype). Without LoRA, the full model is saved.
    * ``merge=False``: the adapters only (peft ``save_pretrained``: ``adapter_config.json`` +
      ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, out_dir)``
      where ``base`` is the same base model, loaded with the same quantisation (a QLoRA adapter
      was trained against the 4-bit weights). Needs LoRA.

    The tokenizer (if given) is saved too, plus ``prerl_export.json`` describing the export. The
    in-memory model is not modified. Raises FileExistsError if ``out_dir`` exists, unless
    ``overwrite``. Returns the resolved ``out_dir``.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    inner = unwrap_policy(model, strip_peft=False)
    lora = is_lora_model(inner)
    quantized = is_quantized(inner)
    if not merge and not lora:
        raise ValueError("adapter-only export (merge=False) needs a LoRA policy; use merge=True to save the full model")
    if quantized and not lora:  # pragma: no cover - ModelSpec forbids it
        raise ValueError("a 4-bit model without LoRA cannot be exported; nothing was trained")

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        base = unwrap_policy(inner)
        if merge:
            plain = _build_merged_model(inner, dtype) if (lora or quantized) else base
            plain.save_pretrained(tmp)
            saved_dtype = _dtype_of(plain)
        else:
            inner.save_pretrained(tmp, save_embedding_layers=False)  # see adapter_state_dict
            saved_dtype = None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        marker = {
            "format": "merged" if merge else "peft-adapter",
            "base_model": getattr(base.config, "_name_or_path", None) or None,
            "base_quantization": _quant_summary(base) if quantized else None,
            "dtype": str(saved_dtype).removeprefix("torch.") if saved_dtype is not None else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_text_atomic(tmp / EXPORT_MARKER, json.dumps(marker, indent=2) + "\n")
        _normal_permissions(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s policy to %s in %.1f s", marker["format"], out, time.perf_counter() - t0)
    return out


def _dtype_of(model: torch.nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return None


def _quant_summary(base: torch.nn.Module) -> dict[str, Any] | None:
    qc = getattr(base.config, "quantization_config", None)
    if qc is None:
        return None
    d = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    keys = ("quant_method", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    return {k: str(d[k]) if isinstance(d.get(k), torch.dtype) else d.get(k) for k in keys if k in d}


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (safetensors writes 0600 files): use the umask defaults."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)
