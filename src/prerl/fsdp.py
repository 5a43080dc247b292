"""FSDP (FSDP1) for the policy, on GPUs and, for tests, on CPU processes.

How it differs from Lightning's stock ``FSDPStrategy``:
1. The module wraps only its policy (``shard_policy``, called from ``configure_model``), with one
   FSDP unit per transformer block, named by class name so one config serves Llama, Qwen2 and
   Qwen3. The reference model, metrics and objectives stay outside the sharded tree.
2. It runs on CPU (gloo) too: Lightning refuses ``FSDPStrategy`` without a GPU and would give
   FSDP ``device_id=None``; this subclass passes the CPU device, so the sharding code that runs on
   a GPU node is the code the 2-process CPU tests run.
3. Generation under sharding: ``generation_model`` gathers the root's own parameters
   (embeddings, final norm, LM head) while every block gathers its own in its forward; the
   module passes ``synced_gpus=True`` so ranks that finish early keep stepping (no deadlock).
4. Sharded checkpoints are written to a temporary folder and renamed, so a killed save leaves the
   previous checkpoint usable.

    python src/train.py trainer=fsdp trainer.devices=8 model=qwen3_4b objective=dual
    torchrun --nnodes 2 --nproc_per_node 8 ... src/train.py trainer=fsdp trainer.num_nodes=2
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WRAP_POLICIES = ("layers", "peft")


def mixed_precision(param_dtype: str, reduce_dtype: str = "float32", buffer_dtype: str = "float32") -> MixedPrecision:
    """FSDP mixed precision from dtype names (verl's default: bf16 compute, fp32 reduce and buffers)."""
    try:
        return MixedPrecision(
            param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype], buffer_dtype=_DTYPES[buffer_dtype]
        )
    except KeyError as err:
        raise ValueError(f"unknown dtype {err.args[0]!r}; choose one of {sorted(_DTYPES)}") from None


@contextlib.contextmanager
def generation_model(policy: torch.nn.Module):
    """Yield the model to call ``generate`` on.

    For an FSDP root, its own parameters (embeddings, final norm, LM head) are gathered for the
    duration and the wrapped model is yielded; every block still gathers its own in its forward.
    """
    if isinstance(policy, FSDP):
        with FSDP.summon_full_params(policy, recurse=False, writeback=False):
            yield policy.module
    else:
        yield policy


class PolicyFSDPStrategy(FSDPStrategy):
    """Lightning FSDP1 whose policy is sharded per transformer block by the module.

    Args:
        layer_classes: the transformer block classes, as names (``Qwen3DecoderLayer``) or import
            paths (``transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer``); each block
            becomes an FSDP unit. Classes absent from the model are ignored; one must match.
        wrap_policy: ``layers`` (one unit per block) or ``peft`` (peft's LoRA-aware policy, which
            also puts trainable LoRA weights in their own units: use it for (Q)LoRA).
        activation_checkpointing: recompute each block's activations in the backward pass.
        mixed_precision_dtypes: ``{param_dtype, reduce_dtype, buffer_dtype}`` names, or None to
            derive them from the trainer's ``precision``.
        state_dict_type: ``full`` (one file, gathered on rank 0) or ``sharded`` (a folder).
        sharding_strategy, cpu_offload, ...: as Lightning's ``FSDPStrategy``.
    """

    def __init__(
        self,
        layer_classes: Sequence[str] = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"),
        wrap_policy: str = "layers",
        activation_checkpointing: bool = False,
        mixed_precision_dtypes: dict[str, str] | None = None,
        **kwargs: Any,
    ):
        if wrap_policy not in WRAP_POLICIES:
            raise ValueError(f"unknown wrap_policy {wrap_policy!r}; choose one of {WRAP_POLICIES}")
        if mixed_precision_dtypes:
            kwargs["mixed_precision"] = mixed_precision(**mixed_precision_dtypes)
        super().__init__(**kwargs)
        self.layer_classes = list(layer_classes)
        self.wrap_policy = wrap_policy
        self.use_activation_checkpointing = activation_checkpointing

    @property
    def fsdp_device(self) -> torch.device:
        return self.root_device if self.root_device.type == "cuda" else torch.device("cpu")

    def _block_classes(self, policy: torch.nn.Module) -> set[type]:
        # Dotted paths are imported; bare names match the model's module classes by name.
        wanted = {name for name in self.layer_classes if "." not in name}
        classes = {type(m) for m in policy.modules() if type(m).__name__ in wanted}
        for path in (name for name in self.layer_classes if "." in name):
            module_name, _, attr = path.rpartition(".")
            cls = getattr(importlib.import_module(module_name), attr)
            if any(isinstance(m, cls) for m in policy.modules()):
                classes.add(cls)
        if not classes:
            names = sorted({type(m).__name__ for m in policy.modules() if "Layer" in type(m).__name__})
            raise ValueError(
                f"none of trainer.strategy.layer_classes={self.layer_classes} is in the policy; "
                f"its layer classes are {names}"
            )
        return classes

    def shard_policy(self, policy: torch.nn.Module) -> FSDP:
        """Wrap the policy: one FSDP unit per block (or peft's policy), root unit for the rest."""
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        classes = self._block_classes(policy)
        if self.wrap_policy == "peft":
            from peft.utils.other import fsdp_auto_wrap_policy

            auto_wrap = fsdp_auto_wrap_policy(policy)
        else:
            auto_wrap = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
        sharded = FSDP(
            policy,
            auto_wrap_policy=auto_wrap,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            cpu_offload=self.cpu_offload,
            device_id=self.fsdp_device,
            use_orig_params=True,
            limit_all_gathers=True,
        )
        if self.use_activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl,
                apply_activation_checkpointing,
                checkpoint_wrapper,
            )

            apply_activation_checkpointing(
                sharded,
                checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=lambda module: isinstance(module, tuple(classes)),
            )
        log.info("FSDP: policy sharded over %d ranks, units per %s", self.world_size, sorted(c.__name__ for c in classes))
        return sharded

    def _state_dict_context(self):
        # Lightning always offloads to CPU while gathering; on CPU processes that offload
        # segfaults inside torch 2.13's FSDP (measured), and is pointless, so skip it there.
        from torch.distributed.fsdp import StateDictType
        from torch.distributed.fsdp.api import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            ShardedOptimStateDictConfig,
            ShardedStateDictConfig,
        )

        if self._state_dict_type == "sharded":
            return FSDP.state_dict_type(
                self.model, StateDictType.SHARDED_STATE_DICT,
                ShardedStateDictConfig(offload_to_cpu=False), ShardedOptimStateDictConfig(offload_to_cpu=False),
            )
        return FSDP.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.root_device.type != "cpu":
            return super().lightning_module_state_dict()
        with self._state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # unwrap LightningOptimizer
        with self._state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
        if self._state_dict_type == "full" and self.global_rank == 0:
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Sharded checkpoints are folders: write a temporary one, then swap it in on rank 0.
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("prerl_fsdp_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("prerl_fsdp_save_written")
        if self.global_rank == 0:
            old = final.with_name(final.name + ".old")
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("prerl_fsdp_save_done")
