"""One folder per run: a unique name, a lock held while the run is alive, continuation of a requeued
run in its own folder, and the saved config of a run folder that a resume names.

Hydra writes the run's config and log file before the task starts, so the checks that must come
before anything is written run in :class:`RunFolderCallback`, a Hydra callback (configs/hydra).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

_STAMP: str | None = None
LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0  # the lock's modification time is refreshed this often while the run lives
STALE_AFTER_S = 120.0  # a lock of another host older than this belongs to a dead run


def run_name(objective: str | None = None, switch_step: int | None = None, seed: int | None = None) -> str:
    """This process's run folder name: ``$PRERL_RUN_ID`` if set, else what the run runs, then when:
    ``<objective>[_S<switch step>]-seed<seed>-<YYYY-mm-dd_HH-MM-SS>_<6 hex digits>``, e.g.
    ``dual_S8-seed42-2026-12-05_08-10-00_3fa2c1`` (no arguments: the time and id alone).

    The random suffix keeps two runs started in the same second apart. Processes launched by
    Lightning get the parent's folder from Lightning; processes of a torchrun / SLURM job compose
    their configs separately, so set ``PRERL_RUN_ID`` (e.g. to ``$SLURM_JOB_ID``) to give them one
    folder; a requeued job with the same id continues in it. The time and id are fixed once per
    process (Hydra resolves the run folder more than once).
    """
    global _STAMP
    if os.environ.get("PRERL_RUN_ID"):
        return os.environ["PRERL_RUN_ID"]
    if _STAMP is None:
        _STAMP = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
    what = f"{objective}{f'_S{switch_step}' if switch_step is not None else ''}" if objective else ""
    return "-".join(part for part in (what, f"seed{seed}" if seed is not None else "", _STAMP) if part)


class RunFolderInUseError(RuntimeError):
    """The run folder belongs to a live run, a completed run, or a run with other settings."""


# ---------------------------------------------------------------------------- the lock
def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(owner: dict[str, Any], age_s: float) -> bool:
    """Whether the process that wrote a lock may still run."""
    if owner.get("slurm_job") and owner["slurm_job"] == os.environ.get("SLURM_JOB_ID") and \
            owner.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return False  # an earlier incarnation of this requeued SLURM job: SLURM runs one at a time
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, TypeError, ValueError):
            pass
        return True
    return age_s < STALE_AFTER_S  # another host: alive while its heartbeat is fresh


class RunLock:
    """``<run folder>/.lock``, created exclusively, its age refreshed by a heartbeat thread.

    A lock whose process is gone (same host: no such pid; another host: no heartbeat for
    ``STALE_AFTER_S``; the same SLURM job, requeued) is reclaimed; a live one is refused.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._reclaim_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_owner(), f)
            threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
            return self
        raise RunFolderInUseError(f"{self.path.parent}: could not take the run lock {self.path} (contended)")

    def _reclaim_or_refuse(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            owner = {}  # being written right now, or garbage: judged by its age alone
        if _alive(owner, age):
            raise RunFolderInUseError(
                f"{self.path.parent} is in use by a live run (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')} since {owner.get('since', '?')}): two runs with one PRERL_RUN_ID "
                "would mix their logs and checkpoints; give this run another PRERL_RUN_ID")
        log.warning("reclaiming the stale lock of a dead run (pid %s on %s)", owner.get("pid"), owner.get("host"))
        try:  # a rename succeeds in one process only: two reclaimers cannot both take the lock
            os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}"))
            self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}").unlink()
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- a folder's earlier run
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(saved: dict, now: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: saved -> now`` for every dotted key whose value differs (``ignore``: key prefixes)."""
    a, b = _flatten(saved), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if not any(k == p or k.startswith(p + ".") for p in ignore))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys if a.get(k, "<unset>") != b.get(k, "<unset>")]


def saved_config(run: Path) -> dict | None:
    """The composed config (unresolved) that a run folder's ``.hydra/config.yaml`` recorded."""
    path = run / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


RESUME_KEYS = ("ckpt_path", "resume_from")  # how a run continues (train, eval): not a different setting


def check_reuse(folder: Path, config: dict) -> None:
    """A folder that already holds a run may be continued only by the same run, unfinished: one
    line, before anything is written, otherwise."""
    summary = folder / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, json.JSONDecodeError):
            status = None
        if status == "completed":
            raise RunFolderInUseError(f"{folder} holds a completed run; give this run another PRERL_RUN_ID "
                                      f"(or resume from it in a new folder with ckpt_path={folder})")
    saved = saved_config(folder)
    if saved is not None:
        differ = config_differences(saved, config, ignore=RESUME_KEYS)
        if differ:
            raise RunFolderInUseError(
                f"{folder} holds a run with other settings ({'; '.join(differ[:4])}"
                f"{f'; {len(differ) - 4} more' if len(differ) > 4 else ''}); give this run another PRERL_RUN_ID")


def earlier_incarnation(folder: Path) -> dict | None:
    """The summary left by an earlier incarnation of this run in its own folder (a requeued job
    with the same ``PRERL_RUN_ID``), or None for a new run."""
    path = Path(folder) / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------- resume: the run's own config
RESTORED: list[str] = []  # what the resume restored, for prerl.train to log once logging is set up


def run_folder_of(ckpt_path: str) -> Path | None:
    """The run folder that holds ``ckpt_path`` (a run folder, its checkpoints/ or a file in it)."""
    path = Path(ckpt_path).expanduser().resolve()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / ".hydra" / "overrides.yaml").is_file():
            return candidate
    return None


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def restore_config(config: DictConfig, config_name: str | None) -> None:
    """``ckpt_path=<a run's folder or checkpoint>``: compose the config again from that run's own
    command-line overrides, then today's (which win), so a resume needs no repeated overrides.
    ``config`` is changed in place; ``RESTORED`` says what was restored and which keys differ."""
    ckpt = config.get("ckpt_path")
    run = run_folder_of(str(ckpt)) if ckpt not in (None, "last") and config_name == "train" else None
    if run is None:
        return
    from hydra import compose

    saved = list(yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or [])
    now = list(config.hydra.overrides.task)
    given = {_key(o) for o in now}
    added = [o for o in saved if _key(o) not in given and _key(o) != "ckpt_path" and not _key(o).startswith("hydra.")]
    if not added:
        return
    composed = compose(config_name=config_name, overrides=added + now)
    with open_dict(config):
        for key in [k for k in config if k != "hydra" and k not in composed]:
            del config[key]
        for key in composed:
            config[key] = composed[key]
        config.hydra.overrides.task = added + now
    RESTORED.append(f"resuming {run}: its overrides {added} restored")
    before = saved_config(run) or {}
    now_cfg = OmegaConf.to_container(config, resolve=False)
    now_cfg.pop("hydra", None)
    differ = config_differences(before, now_cfg, ignore=("ckpt_path",))
    if differ:
        RESTORED.append("settings that differ from that run's (today's overrides win): " + "; ".join(differ))


# ---------------------------------------------------------------------------- the Hydra callback
def launching_process() -> bool:
    """The process that owns the run folder: not a rank Lightning, torchrun or SLURM started beside it."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"))


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a core dependency
    _HydraCallback = object


class RunFolderCallback(_HydraCallback):
    """Before Hydra writes anything to the run folder: restore a resumed run's own config (every
    process), take the folder's lock and refuse a folder of a live, completed or different run
    (the launching process); release the lock when the run ends."""

    def __init__(self) -> None:
        self.lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and runs the job anyway: a refusal
        # must end the process here, with its one line.
        try:
            self._start(config, kwargs.get("config_name"))
        except Exception as err:
            if self.lock is not None:
                self.lock.release()
            from prerl.console import full_errors, report_error

            if full_errors():
                raise SystemExit(1) from err
            raise SystemExit(report_error(err, logged=False)) from None  # nothing written yet: no log file

    def _start(self, config: DictConfig, config_name: str | None) -> None:
        restore_config(config, config_name)
        if not launching_process():
            return
        folder = Path(str(config.hydra.run.dir))
        self.lock = RunLock(folder).acquire()
        task = OmegaConf.to_container(config, resolve=False)
        task.pop("hydra", None)
        check_reuse(folder, task)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()
