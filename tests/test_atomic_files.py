"""prerl.atomic_files.write_text_atomic: a full disk (ENOSPC) leaves the previous file whole."""

from __future__ import annotations

import errno
import json
import os

import pytest

from prerl.atomic_files import write_text_atomic


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_writes_the_text_with_the_usual_permissions_and_no_leftovers(tmp_path):
    path = tmp_path / "summary.json"
    assert write_text_atomic(path, json.dumps({"status": "completed", "name": "é"})) == path
    assert json.loads(path.read_text(encoding="utf-8")) == {"status": "completed", "name": "é"}
    write_text_atomic(path, "second")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["summary.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_keeps_the_previous_file_and_raises(tmp_path, monkeypatch, where):
    path = tmp_path / "done.json"
    path.write_text('{"run": "old"}')
    if where == "write":  # half the bytes reach the disk, then it is full
        real_write = os.write
        calls = []

        def write(fd, data):
            if calls:
                _no_space()
            calls.append(fd)
            return real_write(fd, bytes(data[: len(data) // 2]))

        monkeypatch.setattr(os, "write", write)
    else:  # delayed allocation: the error surfaces at fsync
        monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError) as info:
        write_text_atomic(path, json.dumps({"run": "new", "padding": "x" * 10_000}))
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == '{"run": "old"}'
    assert os.listdir(tmp_path) == ["done.json"]  # no temporary file left behind


def test_a_failure_without_a_previous_file_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "curves.json", "{}")
    assert os.listdir(tmp_path) == []
