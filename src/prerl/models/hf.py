"""``HFModelSpec``: any Hugging Face causal LM, by hub name or local folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .spec import ModelSpec
from .tokenizer import configure_chat_tokenizer, missing_tokenizer_message


class ModelUnavailableError(OSError):
    """A hub model name that cannot be resolved (not cached, hub unreachable or offline)."""


class NotAModelFolderError(FileNotFoundError):
    """A local folder that is not a Hugging Face model folder (it has no ``config.json``)."""


def _not_a_model_folder_message(name: str, path: Path, shown: int = 12) -> str:
    """Say what is missing and what IS there: an empty folder, a parent of model folders, an adapter."""
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    listing = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:shown])
    listing = (listing + (f", ... ({len(entries)} entries)" if len(entries) > shown else "")) or "nothing (empty)"
    hint = ""
    nested = [p.name for p in entries if (p / "config.json").is_file()]
    if nested:
        hint = f" Model folders inside it: {', '.join(nested[:5])}; point model.name_or_path at one of them."
    elif (path / "adapter_config.json").is_file():
        hint = (" It looks like a PEFT adapter: set model.name_or_path to its base model (adapter_config.json:"
                " base_model_name_or_path).")
    return (f"model.name_or_path={name!r}: not a model folder: {path} has no config.json (it holds: {listing})."
            f"{hint} A Hugging Face model folder has config.json, the weights (*.safetensors) and the tokenizer files.")


def looks_like_local_path(name_or_path: str) -> bool:
    """True for anything that cannot be a hub id or clearly points at the filesystem: starts with
    '/', './', '../', '~'; exists; has more than one '/'; or its first component is an existing
    folder (``data/models/x`` where ``data/`` exists). Hub ids are ``name`` or ``org/name``."""
    s = name_or_path
    if s in (".", "..") or s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.sep != "/" and os.sep in s:
        return True
    if Path(s).expanduser().exists():
        return True
    parts = s.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _hub_offline() -> bool:
    """Read the env var live (huggingface_hub caches it at import time), or the library flag."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _unavailable_message(name: str, revision: str | None, reason: str) -> str:
    from huggingface_hub import constants

    rev = f" (revision {revision})" if revision else ""
    return (
        f"cannot load model {name!r}{rev}: it is not a local folder and {reason}. "
        f"Hugging Face cache searched: {constants.HF_HUB_CACHE}. No model hub is reachable from "
        f"this machine: download the model where the hub is reachable (e.g. `hf download {name} "
        f"--local-dir /path/to/{name.split('/')[-1]}`), copy it here and set "
        f"model.name_or_path=/path/to/{name.split('/')[-1]}; or use model=smollm2 / model=tiny, "
        "which need no download."
    )


class HFModelSpec(ModelSpec):
    """Any causal LM loadable with ``AutoModelForCausalLM.from_pretrained``.

    ``build_tokenizer`` checks the name early: a local-looking path that does not exist raises
    ``FileNotFoundError``; a hub name that is not in the local HF cache while offline (or that the
    hub cannot serve) raises :class:`ModelUnavailableError` (an ``OSError``). Set
    ``HF_HUB_OFFLINE=1`` to fail immediately instead of after transformers' network retries.

    Args:
        name_or_path: hub id (``Qwen/Qwen3-4B``) or local folder.
        dtype: default "bfloat16".
        revision: hub branch / tag / commit.
        trust_remote_code: allow custom modelling code from the checkpoint.
        eos_token: override the end-of-turn token (None: ``<|im_end|>`` for ChatML templates,
            else the tokenizer's eos).
        **common: see :class:`ModelSpec`.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "bfloat16",
        revision: str | None = None,
        trust_remote_code: bool = False,
        eos_token: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(dtype=dtype, **common)
        if not name_or_path or not isinstance(name_or_path, str):
            raise ValueError(f"model.name_or_path must be a non-empty string, got {name_or_path!r}")
        self.name_or_path = name_or_path
        self.revision = revision
        self.trust_remote_code = bool(trust_remote_code)
        self.eos_token = eos_token

    @property
    def name(self) -> str:
        return self.name_or_path.rstrip("/").split("/")[-1]

    def _repr_fields(self) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path, "revision": self.revision}

    def resolve(self) -> str:
        """The string to pass to ``from_pretrained``; raises early and clearly if it cannot work."""
        s = self.name_or_path
        if looks_like_local_path(s):
            path = Path(s).expanduser().resolve()
            if not path.exists():
                raise FileNotFoundError(f"model.name_or_path={s!r}: local path {path} does not exist")
            if not path.is_dir():
                raise NotADirectoryError(f"model.name_or_path={s!r}: {path} is not a folder")
            if not (path / "config.json").is_file():
                raise NotAModelFolderError(_not_a_model_folder_message(s, path))
            return str(path)
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(s)
        except HFValidationError as e:
            raise ValueError(f"model.name_or_path={s!r} is neither an existing folder nor a valid hub id: {e}") from None
        if _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(s, "config.json", revision=self.revision or "main")
            if not isinstance(cached, str):
                raise ModelUnavailableError(
                    _unavailable_message(s, self.revision, "it is not in the local Hugging Face cache (HF_HUB_OFFLINE=1)")
                )
        return s

    def _from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs

    def context_length(self) -> int | None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.resolve(), **self._from_pretrained_kwargs()).get_text_config()
        return getattr(config, "max_position_embeddings", None)

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        source = self.resolve()
        if looks_like_local_path(self.name_or_path) and not self.trust_remote_code:  # custom code may name its own files
            problem = missing_tokenizer_message(source)
            if problem is not None:
                raise NotAModelFolderError(f"model.name_or_path={self.name_or_path!r}: {problem}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **self._from_pretrained_kwargs())
        except OSError as e:
            if looks_like_local_path(self.name_or_path):
                raise
            raise ModelUnavailableError(
                _unavailable_message(self.name_or_path, self.revision, f"the hub could not serve it ({e})")
            ) from e
        return configure_chat_tokenizer(tokenizer, eos_token=self.eos_token)

    def _build_base_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.resolve(),
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            **self._quantization_kwargs(),
            **self._from_pretrained_kwargs(),
        )
