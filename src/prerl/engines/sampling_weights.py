"""Sampling from a bf16 view of the weights, made once per rollout (``hf`` engine,
``engine_options.sampling_weights: bfloat16``).

Under ``bf16-mixed`` the policy keeps float32 master weights and autocast casts them to bf16 for
every matmul; under FSDP each block is also all-gathered in every forward, i.e. once per decoded
token. Here the cast (and the gather) happens once per rollout:

* **unsharded policy** (plain, LoRA, DDP): for the rollout, every float32 ``nn.Linear`` weight and
  bias (LoRA's A and B included) is replaced by a bf16 copy, and put back afterwards. The matmuls
  get exactly the operands autocast would give them (norms and embeddings stay float32, as they
  do under autocast), so under ``bf16-mixed`` the tokens are the same as without the option.
* **4-bit policy** (QLoRA, unsharded): bitsandbytes de-quantises every weight at every matmul of
  every decoded token and LoRA adds two more matmuls per layer. Instead the base is de-quantised
  once per rollout, exactly as the training forward de-quantises it, with the adapters merged
  (``W + scale * B @ A``: :func:`prerl.models.export.merged_state_dict`), into a plain copy with
  bf16 ``nn.Linear`` weights. The copy computes what the policy computes up to bf16 rounding of
  the merged sum (the policy adds the adapters' output in its compute dtype), so its tokens may
  differ from the 4-bit path's where two candidates are within rounding of each other.
* **sharded policy** (FSDP, whose ranks step every forward together): the full weights are gathered
  once (``hf_state_dict``: every rank, LoRA merged) into an unsharded copy of the model whose
  ``nn.Linear`` weights are bf16, which samples without collectives, so each rank runs at its own
  pace (``synced_gpus`` off, ``refill`` possible).

Sampling runs under ``torch.autocast(bf16)`` either way (with ``precision=32`` the option
therefore samples in bf16 where training computes in float32). The copy is dropped when the
rollout ends. When the copy plus the sampling's KV cache and logits would not fit in the device's
free memory (with a 10% margin), or the policy is sharded and 4-bit (QLoRA under FSDP), the rollout
uses the policy as it is (logged).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

SAMPLING_WEIGHTS = ("bfloat16",)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA driver's view, else the host's available RAM (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def sampling_bytes(config, rows: int, length: int) -> int:
    """The bf16 KV cache of ``rows`` sequences of ``length`` tokens plus one step's float32 logits."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return rows * length * config.num_hidden_layers * 2 * heads * head_dim * 2 + rows * config.vocab_size * 4


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32]


@contextlib.contextmanager
def _cast_linears(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Swap every float32 Linear's weight and bias for a ``dtype`` copy; put the originals back."""
    saved = []
    try:
        for module in _linears(model):
            saved.append((module, dict(module._parameters)))
            for name in ("weight", "bias"):
                if module._parameters.get(name) is not None:
                    module._parameters[name] = torch.nn.Parameter(module._parameters[name].detach().to(dtype),
                                                                  requires_grad=False)
        yield
    finally:
        for module, params in saved:
            module._parameters.update(params)


def _dense_copy(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain, unsharded eval-mode copy of a sharded or 4-bit policy (LoRA merged, a 4-bit base
    de-quantised): Linear weights in ``dtype``, everything else as :func:`hf_state_dict` gives it.
    A collective when sharded: every rank calls it."""
    from prerl.engines.vllm import hf_name, hf_state_dict
    from prerl.models.params import unwrap_policy

    base = unwrap_policy(policy)
    with torch.device("meta"):
        copy = type(base)(base.config)
    linear = {f"{name}.{p}" for name, m in copy.named_modules() if isinstance(m, torch.nn.Linear) for p in ("weight", "bias")}
    state = {k: v.to(dtype) if k in linear and v.is_floating_point() else v for k, v in hf_state_dict(policy).items()}
    copy.load_state_dict(state, strict=False, assign=True)
    for name, buffer in base.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        owner, _, attr = hf_name(name).rpartition(".")
        copy.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    missing = [n for n, p in copy.named_parameters() if p.is_meta] + [n for n, b in copy.named_buffers() if b.is_meta]
    if missing:
        raise RuntimeError(f"sampling_weights: the gathered state misses {missing[:5]}")
    copy.generation_config = base.generation_config
    return copy.eval().requires_grad_(False)


def _param_count(policy: torch.nn.Module, rebuilt: bool) -> tuple[int, int]:
    """(Linear weight elements, all elements) of the full model (of a meta build of the plain
    model when ``rebuilt``: sharded or 4-bit)."""
    from prerl.models.params import unwrap_policy

    model = unwrap_policy(policy)
    if rebuilt:
        with torch.device("meta"):
            model = type(model)(model.config)
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in _linears(model))
    return linear, sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def sampling_view(policy: torch.nn.Module, dtype_name: str, sharded: bool, rows: int, length: int,
                  device: torch.device) -> Iterator[tuple[torch.nn.Module | None, bool]]:
    """The model to sample from for one rollout and whether its ranks must step together.

    Args:
        policy: the training policy (possibly FSDP-wrapped).
        dtype_name: ``bfloat16``.
        sharded: the policy is sharded (FSDP): a gathered copy; a 4-bit policy: a de-quantised,
            merged copy; else the Linear weights swapped in place.
        rows, length: sequences decoding at once and their prompt + response length (the fit check).
    Yields:
        (a model to call ``generate`` on, False), or (None, sharded) when the copy does not fit:
        then sample from the policy as usual.
    """
    if dtype_name not in SAMPLING_WEIGHTS:
        raise ValueError(f"module.rollout.engine_options.sampling_weights={dtype_name!r}; use one of {SAMPLING_WEIGHTS}")
    from prerl.models.export import _default_export_dtype
    from prerl.models.params import unwrap_policy
    from prerl.models.quant import is_quantized

    dtype = getattr(torch, dtype_name)
    quantized = is_quantized(policy)
    dense = sharded or quantized  # a plain copy is built (else the Linear weights are swapped in place)
    if sharded and quantized:
        reason = "a sharded 4-bit policy is not gathered"  # hf_state_dict does not de-quantise FSDP shards
    else:
        linear, total = _param_count(policy, dense)
        trained = next(p for p in policy.parameters() if p.is_floating_point()).dtype.itemsize
        if sharded:  # the gathered state (transient) and the copy (bf16 Linears, the rest as trained)
            copy_bytes = total * trained + linear * dtype.itemsize + (total - linear) * trained
        elif quantized:  # the de-quantised, merged copy (bf16 Linears, the rest in the 4-bit compute dtype)
            compute = _default_export_dtype(unwrap_policy(policy)).itemsize
            copy_bytes = linear * dtype.itemsize + (total - linear) * compute
        else:  # the bf16 Linears
            copy_bytes = linear * dtype.itemsize
        need = copy_bytes + sampling_bytes(unwrap_policy(policy).config, rows, length)
        free = free_memory(device)
        reason = f"the copy and the KV cache need {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free" \
            if need > 0.9 * free else None
    if reason:
        log.info("sampling_weights=%s: %s: sampling from the policy as it is", dtype_name, reason)
        yield None, sharded
        return
    # cache_enabled=False: a cast autocast cached here would outlive the rollout inside Lightning's autocast
    with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
        if dense:
            copy = _dense_copy(policy, dtype)
            try:
                yield copy, False
            finally:
                del copy
        else:
            with _cast_linears(policy, dtype):
                yield policy, False
