"""The per-problem JSONL of an evaluation, and reading it back to resume.

One file per eval set, ``<run>/problems/<set>.jsonl``, one JSON object per problem::

    {"set", "index", "chunk", "id", "question", "answer", "prompt", "prompt_tokens",
     "responses": [str], "extracted": [str | null], "rewards": [float], "correct": [bool],
     "num_correct": int, "lengths": [int], "truncated": [bool], "behaviours": [{str: int}],
     "reward_timeouts": int, "reward_errors": int}

Problems are sampled in fixed chunks (``batch_size`` problems, by index); the records of a chunk
are appended together, flushed and fsynced. On resume only complete chunks are kept: a chunk cut
short, or a truncated last line (the process was killed mid-write), is dropped and sampled again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["RecordWriter", "read_records", "complete_chunks", "CorruptRecordsError"]


class CorruptRecordsError(ValueError):
    """A per-problem JSONL cannot be read back (not the truncated last line of an interrupted write)."""


def read_records(path: Path) -> tuple[list[dict], bool]:
    """The records of ``path`` (missing file: none) and whether a truncated last line was dropped.

    A line that is not JSON is an error naming the file and line, unless it is the last line and
    the file does not end with a newline (a write cut short), which is dropped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, dropped = [], False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if lineno == len(lines) and not raw.endswith(b"\n"):
                log.warning("%s: line %d is cut short (an interrupted write): dropped, its chunk is sampled again",
                            path, lineno)
                dropped = True
                continue
            raise CorruptRecordsError(
                f"{path}: line {lineno}: malformed record ({e}); this file is an evaluation's own output: delete the "
                "line (its chunk is then sampled again) or the file, then resume"
            ) from None
        records.append(rec)
    return records, dropped


def complete_chunks(records: Iterable[dict], expected: dict[int, list[str]], path: Path) -> dict[int, list[dict]]:
    """The records of every chunk that is complete: chunk -> records in index order.

    ``expected`` maps each chunk to the problem ids it holds now; a record whose id is not the
    one expected at its chunk means the data changed since the records were written (an error).
    """
    by_chunk: dict[int, dict[str, dict]] = {}
    for rec in records:
        chunk, pid = rec.get("chunk"), rec.get("id")
        if chunk not in expected or pid not in expected[chunk]:
            raise CorruptRecordsError(
                f"{path}: problem {pid!r} (chunk {chunk}) is not one this evaluation samples in that chunk: the data, "
                "its order, the limit or batch_size changed since it was written; evaluate into a new folder"
            )
        by_chunk.setdefault(chunk, {})[pid] = rec
    done = {}
    for chunk, recs in by_chunk.items():
        if set(recs) == set(expected[chunk]):
            done[chunk] = [recs[pid] for pid in expected[chunk]]
    return done


class RecordWriter:
    """Appends the records of one set's chunks to its JSONL, flushed and fsynced per chunk."""

    def __init__(self, path: Path, keep: list[dict] | None = None, rewrite: bool = False) -> None:
        """``keep``: records already there to keep (complete chunks); ``rewrite``: the file holds
        more than ``keep`` (partial chunks, a cut line) and is rewritten with ``keep`` first (atomically)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rewrite:
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            with tmp.open("w", encoding="utf-8") as f:
                for rec in keep or []:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._file = None

    def write(self, records: list[dict]) -> None:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
