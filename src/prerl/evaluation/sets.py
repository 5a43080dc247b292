"""Evaluation sets: what ``data=``, ``eval_sets=[...]`` and ``eval_file=`` name, turned into problems
and prompts.

An :class:`EvalSet` is a named source of problems with its prompt settings. The entries of
``eval_sets`` may be

- a data config name (``configs/data/<name>.yaml``: ``math500``, ``aime``, ``gsm8k``, ``svamp``,
  ``gsm_hard``, ``asdiv``, ``mawps``, ``gym_arithmetic``, ``jsonl``, yours): its validation split,
  with its own system prompt and prompt limits;
- a packaged dataset (``prerl.data.PACKAGED_DATASETS``: ``aime24``, ``aime25``, ...; ``<name>/<split>``
  such as ``math/test`` or ``gsm8k/train`` for another split);
- ``rg:<task>``: 100 problems of a reasoning-gym task (seed 0, default difficulty);
- a file path (``.jsonl``, ``.ndjson``, ``.json``, ``.parquet``): every record, read with the
  top-level ``question_field`` / ``answer_field`` / ``question_template`` / ``answer_transform``
  / ``verifier`` / ``id_field`` / ``layout`` / ``data_source`` keys (a verl-style file's chat is
  its prompt as it is: see ``FileSource``'s ``layout``);
- a mapping, for full control: ``{name: ..., data | packaged | rg | file | source: ..., limit,
  system_prompt, prompt_template, max_prompt_length, on_long_prompt, chat_template_kwargs, ...}``
  (see :func:`resolve_entry`).

Sets that are not data configs take their prompt settings from the eval's ``data`` config;
problems that bring their own chat (verl layout) are rendered as they are. Every set is
de-duplicated on the normalised question (as validation is: a problem repeated in several
records, as in verl's ``*_20times`` files, is one problem sampled ``samples`` times; its
``repeats`` stat says how many records it had) and cut to ``limit``. ``eval_file`` of a verl-style
file gives one set per ``data_source`` (named by it), as verl reports its validation.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prerl.data.prompts import encode_chat, problem_messages, render_chat
from prerl.data.sources import PACKAGED_DATASETS, FileSource, PackagedSource, ReasoningGymSource, Source, to_plain
from prerl.data.splits import dedupe, find_repeats

log = logging.getLogger(__name__)

__all__ = ["EvalSet", "resolve_eval_sets", "CONFIG_DIR", "FILE_SUFFIXES", "PromptTooLongError"]

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")
KINDS = ("data", "packaged", "rg", "file", "source")
PROMPT_KEYS = ("system_prompt", "prompt_template", "chat_template_kwargs", "max_prompt_length", "on_long_prompt")
FILE_KEYS = ("question_field", "answer_field", "question_template", "answer_transform", "verifier", "id_field",
             "layout", "data_source")
RG_DEFAULT_SIZE = 100


class PromptTooLongError(ValueError):
    """A rendered prompt of an eval set is longer than its ``max_prompt_length``."""


@dataclass
class EvalSet:
    """One named evaluation set.

    spec: a JSON-able description of how the problems are made (saved with the run: a resumed
    evaluation must describe its sets the same way). prompt_template: the user message with a
    ``{question}`` field (the data module's ``question_template``), or None for the question as is.
    """

    name: str
    source: Source
    spec: dict
    system_prompt: str | None = None
    prompt_template: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)
    max_prompt_length: int | None = None
    on_long_prompt: str = "error"
    limit: int | None = None
    # filled by prepare()
    problems: list[dict] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)  # {"prompt_ids", "prompt", "problem"}
    stats: dict = field(default_factory=dict)

    def prompt_settings(self) -> dict:
        return {k: getattr(self, k) for k in PROMPT_KEYS} | {"limit": self.limit}

    def prepare(self, tokenizer: Any, model_template_kwargs: Mapping[str, Any] | None = None) -> None:
        """Load, de-duplicate, cut to ``limit``, render and tokenise the prompts."""
        loaded = self.source.load()
        repeats = find_repeats(loaded).most
        problems, duplicates = dedupe(loaded)
        ids = [p["id"] for p in problems]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            clash = sorted({pid for pid in ids if pid in seen or seen.add(pid)})[:5]
            raise ValueError(f"eval set {self.name!r}: problem ids are not unique (e.g. {clash}); give the source "
                             "an id_field with unique values, or none (ids are then the record index)")
        if self.limit is not None:
            problems = problems[: self.limit]
        kwargs = {**self.chat_template_kwargs, **dict(model_template_kwargs or {})}
        own_chat = sum(bool(p.get("messages")) for p in problems)
        if own_chat:
            log.info("eval set %s: %d of %d problems bring their own chat (verl-style 'prompt'): rendered as they are, "
                     "without system_prompt / prompt_template", self.name, own_chat, len(problems))
        items, too_long = [], []
        for p in problems:
            messages = problem_messages(p, self.system_prompt, self.prompt_template)
            text = render_chat(tokenizer, messages, kwargs)
            ids = encode_chat(tokenizer, messages, kwargs)
            if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
                too_long.append((p["id"], len(ids)))
                continue
            items.append({"prompt_ids": ids, "prompt": text, "problem": p})
        if too_long and self.on_long_prompt == "error":
            shown = ", ".join(f"{pid} ({n} tokens)" for pid, n in too_long[:5])
            raise PromptTooLongError(
                f"eval set {self.name!r}: {len(too_long)} prompt(s) exceed max_prompt_length={self.max_prompt_length}: "
                f"{shown}; raise it (e.g. data.max_prompt_length=1024, or max_prompt_length in the set's entry) or "
                "set on_long_prompt=drop"
            )
        if not items:
            raise ValueError(f"eval set {self.name!r} has no problems left (loaded {len(loaded)}, "
                             f"{duplicates} duplicates, {len(too_long)} too long)")
        self.problems = [it["problem"] for it in items]
        self.items = items
        self.stats = {"loaded": len(loaded), "duplicates_dropped": duplicates, "too_long_dropped": len(too_long),
                      "problems": len(items), "repeats": repeats}  # repeats: most records one problem had


# ----------------------------------------------------------------------------------------------- helpers
def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return to_plain(node)


def data_config(name: str, cfg: DictConfig) -> DictConfig:
    """``configs/data/<name>.yaml`` as a node of a copy of ``cfg`` (so ``${paths...}`` and the
    configs' relative interpolations resolve as they would under ``data=<name>``)."""
    path = CONFIG_DIR / "data" / f"{name}.yaml"
    node = OmegaConf.load(path)
    if "defaults" in node:
        raise ValueError(f"eval set {name!r}: {path} has a defaults list, which eval_sets cannot compose; "
                         f"evaluate it alone with data={name}")
    root = copy.deepcopy(cfg)
    OmegaConf.set_struct(root, False)
    root.data = node
    return root.data


def data_config_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))


class DataModuleVal(Source):
    """The validation split of a data config whose ``val`` is null (carved out of ``train`` by
    ``val_size``): the data module is set up and its validation problems returned."""

    def __init__(self, node: DictConfig, tokenizer: Any) -> None:
        self.node, self.tokenizer = node, tokenizer
        self.name = "datamodule-val"

    def load(self) -> list[dict]:
        import hydra

        dm = hydra.utils.instantiate(self.node, tokenizer=self.tokenizer)
        dm.setup("validate")
        if not dm.val_problems:
            raise ValueError("the data config has no validation split: its val is null and val_size is not set")
        return [dict(p) for p in dm.val_problems]


def _instantiate_source(node: Any, where: str) -> Source:
    from prerl.train import check_keys, instantiate

    node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
    if "_target_" not in node:
        raise ValueError(f"{where}: a source needs a _target_, e.g. prerl.data.FileSource (got keys {sorted(node)})")
    check_keys(node, where)
    source = instantiate(node)
    if not callable(getattr(source, "load", None)):
        raise TypeError(f"{where}: {node._target_} has no load() method; a source's load() returns the problems")
    return source


def _prompt_defaults(node: DictConfig) -> dict:
    """Prompt settings of a data config node."""
    return {
        "system_prompt": node.get("system_prompt"),
        "prompt_template": node.get("question_template"),
        "chat_template_kwargs": dict(_plain(node.get("chat_template_kwargs")) or {}),
        "max_prompt_length": node.get("max_prompt_length"),
        "on_long_prompt": node.get("on_long_prompt", "error"),
    }


def _from_data_node(name: str, node: DictConfig, tokenizer: Any, where: str) -> tuple[Source, dict, dict]:
    val = node.get("val")
    if val is None:
        source: Source = DataModuleVal(node, tokenizer)
        spec = {"kind": "data", "val": None, "data": _plain(node)}
    else:
        source = _instantiate_source(val, f"{where}.val")
        spec = {"kind": "data", "val": _plain(val)}
    return source, spec, _prompt_defaults(node)


def _file_kwargs(values: Mapping[str, Any]) -> dict:
    kwargs = {k: values[k] for k in FILE_KEYS if k in values and values[k] is not None}
    return kwargs


def _file_set(path: str, kwargs: dict, where: str) -> tuple[Source, dict]:
    path = str(Path(path).expanduser().resolve())
    params = inspect.signature(FileSource).parameters
    unknown = sorted(set(kwargs) - set(params) | {"path"} & set(kwargs))
    if unknown:
        raise ValueError(f"{where}: FileSource does not accept {unknown} here; its keys: "
                         f"{sorted(set(params) - {'path'})}")
    return FileSource(path, **kwargs), {"kind": "file", "path": path, **_plain(kwargs)}


def _packaged_set(value: str, extra: dict, where: str) -> tuple[Source, dict]:
    name, _, split = value.partition("/")
    if name not in PACKAGED_DATASETS:
        raise ValueError(f"{where}: unknown packaged dataset {name!r}; available: {sorted(PACKAGED_DATASETS)}")
    split = split or extra.pop("split", None) or ("test" if "test" in PACKAGED_DATASETS[name][0]
                                                   else PACKAGED_DATASETS[name][0][0])
    unknown = sorted(set(extra) - {"question_template"})
    if unknown:
        raise ValueError(f"{where}: a packaged set takes split and question_template, not {unknown}")
    source = PackagedSource(name, split, question_template=extra.get("question_template"))
    return source, {"kind": "packaged", "name": name, "split": split, **extra}


def _rg_set(task: str, extra: dict, limit: int | None, where: str) -> tuple[Source, dict]:
    size = int(extra.pop("size", None) or max(limit or 0, RG_DEFAULT_SIZE))
    seed = int(extra.pop("seed", 0))
    config = _plain(extra.pop("config", None)) or {}
    if extra:
        raise ValueError(f"{where}: a reasoning-gym set takes size, seed and config, not {sorted(extra)}")
    return ReasoningGymSource(task, size=size, seed=seed, config=config), {
        "kind": "rg", "task": task, "size": size, "seed": seed, "config": config}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "set"


# ----------------------------------------------------------------------------------------------- entries
def resolve_entry(entry: Any, index: int, cfg: DictConfig, tokenizer: Any) -> EvalSet:
    """One entry of ``eval_sets`` -> an EvalSet (not yet prepared)."""
    where = f"eval_sets[{index}]"
    defaults = _prompt_defaults(cfg.data)
    top_file = {k: cfg.get(k) for k in FILE_KEYS}
    limit = cfg.get("limit")
    if isinstance(entry, str):
        entry_map: dict = {}
        value = entry.strip()
        if Path(value).suffix.lower() in FILE_SUFFIXES or "/" in value and Path(value).exists():
            kind = "file"
        elif value.startswith("rg:"):
            kind, value = "rg", value[3:]
        elif (CONFIG_DIR / "data" / f"{value}.yaml").is_file():
            kind = "data"
        elif value.partition("/")[0] in PACKAGED_DATASETS:
            kind = "packaged"
        else:
            raise ValueError(
                f"{where}={entry!r} is not a data config ({', '.join(data_config_names())}), a packaged dataset "
                f"({', '.join(sorted(PACKAGED_DATASETS))}, or <name>/<split>), rg:<reasoning-gym task>, or a "
                f"file ({'/'.join(FILE_SUFFIXES)})"
            )
        name = Path(value).stem if kind == "file" else (f"rg_{value}" if kind == "rg" else value)
    elif isinstance(entry, (Mapping, DictConfig)):
        entry_map = dict(_plain(entry)) if isinstance(entry, DictConfig) else dict(to_plain(entry))
        kinds = [k for k in KINDS if k in entry_map]
        if len(kinds) != 1:
            raise ValueError(f"{where}: a mapping entry needs exactly one of {KINDS}, got keys {sorted(entry_map)}")
        kind = kinds[0]
        value = entry_map.pop(kind)
        name = entry_map.pop("name", None)
        if name is None:
            if kind == "source":
                raise ValueError(f"{where}: an entry with a source needs a name")
            name = Path(str(value)).stem if kind == "file" else (f"rg_{value}" if kind == "rg" else str(value))
        if "limit" in entry_map:
            limit = entry_map.pop("limit")
    else:
        raise ValueError(f"{where}: expected a name, a file path or a mapping, got {type(entry).__name__}")

    prompt = dict(defaults)
    if kind == "data":
        node = data_config(str(value), cfg)
        source, spec, prompt = _from_data_node(str(name), node, tokenizer, f"{where} (data={value})")
        spec["config"] = str(value)
    elif kind == "packaged":
        extra = {k: entry_map.pop(k) for k in ("split", "question_template") if k in entry_map}
        source, spec = _packaged_set(str(value), extra, where)
    elif kind == "rg":
        extra = {k: entry_map.pop(k) for k in ("size", "seed", "config") if k in entry_map}
        source, spec = _rg_set(str(value), extra, limit, where)
    elif kind == "file":
        kwargs = {**_file_kwargs(top_file), **{k: entry_map.pop(k) for k in list(entry_map) if k not in PROMPT_KEYS}}
        source, spec = _file_set(str(value), kwargs, where)
    else:
        source = _instantiate_source(value, f"{where}.source")
        spec = {"kind": "source", "source": value}
    prompt = _global_prompt(prompt, cfg)
    for key in PROMPT_KEYS:  # the entry's own settings win
        if key in entry_map:
            prompt[key] = entry_map.pop(key)
    if entry_map:
        raise ValueError(f"{where}: unknown keys {sorted(entry_map)}")
    return _make_set(str(name), source, spec, prompt, limit, cfg)


def _global_prompt(prompt: dict, cfg: DictConfig) -> dict:
    """The top-level ``system_prompt``, when set, replaces every set's own."""
    if cfg.get("system_prompt") is not None:
        prompt = {**prompt, "system_prompt": cfg.system_prompt}
    return prompt


def _make_set(name: str, source: Source, spec: dict, prompt: dict, limit: Any, cfg: DictConfig) -> EvalSet:
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or int(limit) <= 0):
        raise ValueError(f"eval set {name!r}: limit must be a positive number of problems or null, got {limit!r}")
    template = prompt.get("prompt_template")
    if template is not None and "{question}" not in template:
        raise ValueError(f"eval set {name!r}: prompt_template must contain the field '{{question}}'")
    if prompt.get("on_long_prompt", "error") not in ("error", "drop"):
        raise ValueError(f"eval set {name!r}: on_long_prompt must be 'error' or 'drop', got {prompt['on_long_prompt']!r}")
    return EvalSet(
        name=name, source=source, spec=spec,
        system_prompt=prompt.get("system_prompt"), prompt_template=template,
        chat_template_kwargs=dict(prompt.get("chat_template_kwargs") or {}),
        max_prompt_length=None if prompt.get("max_prompt_length") is None else int(prompt["max_prompt_length"]),
        on_long_prompt=prompt.get("on_long_prompt", "error"), limit=None if limit is None else int(limit),
    )


def resolve_eval_sets(cfg: DictConfig, tokenizer: Any) -> list[EvalSet]:
    """The sets one evaluation covers: ``eval_sets`` entries, then ``eval_file``; with neither,
    the validation split of ``data`` (a set named ``val``, so its metrics are ``val/avg@k`` as in
    training)."""
    entries = cfg.get("eval_sets")
    if isinstance(entries, str):
        entries = [entries]
    sets: list[EvalSet] = []
    for i, entry in enumerate(entries or []):
        sets.append(resolve_entry(entry, i, cfg, tokenizer))
    if cfg.get("eval_file"):
        path = str(cfg.eval_file)
        kwargs = _file_kwargs({k: cfg.get(k) for k in FILE_KEYS})
        source, spec = _file_set(path, kwargs, "eval_file")
        prompt = _global_prompt(_prompt_defaults(cfg.data), cfg)
        names = source.data_sources()
        if names is None:
            sets.append(_make_set(Path(path).stem, source, spec, prompt, cfg.get("limit"), cfg))
        else:  # a verl-style file: one set per data_source, named by it
            for name in names:
                source, spec = _file_set(path, {**kwargs, "data_source": name}, "eval_file")
                sets.append(_make_set(name, source, spec, prompt, cfg.get("limit"), cfg))
    if not sets:
        source, spec, prompt = _from_data_node("val", cfg.data, tokenizer, "data")
        sets.append(_make_set("val", source, spec, _global_prompt(prompt, cfg), cfg.get("limit"), cfg))
    names = [s.name for s in sets]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"eval sets share the name(s) {clashes}; give mapping entries distinct `name`s")
    files = [_safe_name(n) for n in names]
    if len(set(files)) != len(files):
        raise ValueError(f"eval set names {names} map to the same output file names {files}; rename one")
    return sets


def output_name(name: str) -> str:
    """The file stem of a set's per-problem JSONL."""
    return _safe_name(name)
