"""Build the reward of a run from its ``cfg.reward`` node: built-in classes and user plug-ins alike.

``hydra.utils.instantiate`` alone cannot take a plain reward function (it would call it with no
arguments), and it trusts whatever the reward returns. :func:`build_reward` instead:

- ``_target_`` names a CLASS: instantiated by Hydra with the other keys (nested ``_target_``
  nodes, e.g. DispatchReward's sub-rewards, are instantiated too);
- ``_target_`` names any other callable, e.g. a FUNCTION ``fn(responses, problems, **kwargs)``:
  it is not called now; the other keys are bound as its keyword arguments (checked against its
  signature now, so a misspelt key fails before training starts);
- ``on_error`` (``raise`` | ``zero``, default ``raise``) and ``timeout_s`` (seconds, or None for
  no limit) are consumed here, never passed on.

The callable it returns, :class:`PluginReward`, checks every result (:class:`RewardResult`, or a
list/tuple of numbers, a 1-D tensor or a numpy array of length N, all finite) and handles
exceptions raised by the reward according to ``on_error``. Only ``Exception`` is handled:
``KeyboardInterrupt``, ``SystemExit`` (Lightning's ``SIGTERMException`` included) and
math-verify's ``TimeoutException`` (a ``BaseException``, handled inside :class:`MathVerifyReward`)
pass through untouched. Each call of the reward is bounded by ``timeout_s`` (a call that exceeds
it scores its responses 0, counted as timeouts) and, in a single-process training run, stopped at
once by a SIGTERM (:func:`prerl.preemption.interruptible`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from prerl import preemption

from .time_limit import signals_usable, time_limit
from .types import RewardResult, check_lengths

log = logging.getLogger(__name__)

__all__ = ["build_reward", "PluginReward", "RewardError", "RewardContractError", "RewardTimeout", "ON_ERROR_MODES",
           "locate"]

ON_ERROR_MODES = ("raise", "zero")
_HYDRA_FLAGS = ("_partial_", "_convert_", "_recursive_")  # Hydra's own keys; never kwargs of a function


class RewardError(RuntimeError):
    """A reward raised an exception while scoring; the message names the sample that failed."""


class RewardContractError(TypeError, ValueError):
    """A reward returned something other than one finite number per response (a bug in the reward,
    never scored 0 by ``on_error=zero``). Both a TypeError and a ValueError."""


class RewardTimeout(BaseException):
    """A call of the reward exceeded ``reward.timeout_s``. A BaseException, like KeyboardInterrupt,
    so that neither the reward's own ``except Exception`` nor ``on_error`` takes it for an error;
    only :class:`PluginReward` catches it."""


def check_timeout(value: Any) -> float | None:
    """``reward.timeout_s`` as seconds (None: no limit); anything but a positive number is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"reward.timeout_s={value!r} is not allowed: a positive number of seconds (the limit on "
                         "each call of the reward), or null for no limit")
    return float(value)


def locate(target: str) -> Any:
    """Import ``package.module.attr[.attr...]`` and return the object, with errors that say why.

    The longest importable module prefix is imported, the rest is looked up as attributes. An
    ImportError raised *inside* a module that exists (one of its own imports failing) is re-raised
    as such, not reported as "module not found".
    """
    if not isinstance(target, str) or not target.strip() or target.startswith(".") or target.endswith("."):
        raise ValueError(f"reward._target_ must be a dotted import path like 'my_rewards.score', got {target!r}")
    parts = target.split(".")
    module, missing = None, None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # e.name is the module that was not found; if it is not `name` or one of its parents,
            # `name` exists but one of ITS imports failed: that is the user's error to see.
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise ImportError(f"reward._target_={target!r}: importing {name!r} failed: {e}") from e
            missing = e  # ends as the shortest prefix: the top-level module
            continue
        obj = module
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                where = ".".join(parts[:j])
                public = sorted(a for a in dir(obj) if not a.startswith("_"))
                raise ImportError(
                    f"reward._target_={target!r}: {where!r} has no attribute {attr!r}"
                    f" (it has: {', '.join(public[:15])}{', ...' if len(public) > 15 else ''})"
                )
            obj = getattr(obj, attr)
        if obj is module and i == len(parts):
            raise TypeError(f"reward._target_={target!r} is a module; name a function or class inside it")
        return obj
    cwd = os.getcwd()
    on_path = any(os.path.abspath(p or ".") == cwd for p in sys.path)
    raise ImportError(
        f"reward._target_={target!r}: cannot import module {parts[0]!r} ({missing}). Put "
        f"{parts[0]}.py (or the package {parts[0]}/) in the working directory ({cwd}"
        f"{'' if on_path else ', which is NOT on sys.path here'}) or in a folder on PYTHONPATH "
        f"(e.g. PYTHONPATH=/path/to/folder python src/train.py ...), or pip install it"
    ) from missing


def _to_plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)  # `???`: MissingMandatoryValue
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        pass
    return node


def build_reward(node: Any) -> "PluginReward":
    """``cfg.reward`` (a DictConfig or a plain mapping with ``_target_``) -> a checked reward callable.

    Returns a :class:`PluginReward`: ``reward(responses: list[str], problems: list[dict]) -> RewardResult``
    with ``len(result) == len(responses)``. See the module docstring for the contract.
    """
    if node is None:
        raise ValueError("cfg.reward is missing: choose one with reward=<default|boxed|random> or set reward._target_")
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
        raise TypeError(f"cfg.reward must be a mapping with a _target_, got {type(node).__name__}")
    spec = dict(_to_plain(node))
    target = spec.pop("_target_", None)
    if target is None:
        raise ValueError(f"cfg.reward has no _target_ (keys: {sorted(spec)}); name a reward class or function")
    on_error = spec.pop("on_error", "raise")
    if on_error not in ON_ERROR_MODES:
        raise ValueError(f"reward.on_error={on_error!r}; choose one of {ON_ERROR_MODES}")
    timeout_s = check_timeout(spec.pop("timeout_s", None))
    obj = locate(target)
    if timeout_s is not None and _takes_timeout(obj):
        log.warning("reward.timeout_s=%s limits each call of the whole reward; it is not passed to %s, whose own "
                    "timeout_s argument keeps its default", timeout_s, target)

    if inspect.isclass(obj):
        import hydra.utils

        # Hydra builds the class and any nested _target_ nodes (DispatchReward's sub-rewards).
        fn = hydra.utils.instantiate({"_target_": target, **spec})
        if not callable(fn):
            raise TypeError(f"reward {target}: an instance of this class is not callable (it needs __call__(responses, problems))")
    elif callable(obj):
        if "_args_" in spec:
            raise ValueError(f"reward {target}: a function reward takes keyword arguments only; remove _args_")
        for flag in _HYDRA_FLAGS:
            spec.pop(flag, None)
        if _has_target(spec):
            import hydra.utils

            spec = hydra.utils.instantiate(spec, _convert_="all")  # objects given as keyword arguments
        _check_signature(obj, target, spec)
        fn = functools.partial(obj, **spec) if spec else obj
    else:
        raise TypeError(f"reward._target_={target!r} is a {type(obj).__name__}, not a class or function")
    return PluginReward(fn, target=target, on_error=on_error, timeout_s=timeout_s)


def _takes_timeout(obj: Any) -> bool:
    try:
        return "timeout_s" in inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _has_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_target(v) for v in value)
    return False


def _check_signature(fn: Callable, target: str, kwargs: dict) -> None:
    """Fail now, not at the first rollout, if ``fn(responses, problems, **kwargs)`` cannot be called."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    try:
        sig.bind([], [], **kwargs)
    except TypeError as e:
        raise TypeError(
            f"reward {target}{sig} cannot be called as {target}(responses, problems"
            f"{''.join(f', {k}=...' for k in kwargs)}): {e}. The keys of cfg.reward other than "
            "_target_, on_error and timeout_s are passed as keyword arguments"
        ) from None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:120]}{'...' if len(text) > 120 else ''}"


def _as_rewards(out: Any, n: int, target: str) -> RewardResult:
    """Normalise what a reward returned into a RewardResult of length ``n`` with finite float32 rewards."""
    if isinstance(out, RewardResult):
        result = out
        rewards = result.rewards
    else:
        rewards = None
        if isinstance(out, torch.Tensor):
            if out.dim() == 1 and (out.dtype.is_floating_point or out.dtype in (torch.bool, torch.int8, torch.int16,
                                                                               torch.int32, torch.int64, torch.uint8)):
                rewards = out
        elif type(out).__module__ == "numpy" and hasattr(out, "ndim") and hasattr(out, "dtype"):
            if out.ndim == 1 and out.dtype.kind in "biuf":
                rewards = torch.from_numpy(out.astype("float32"))
        elif isinstance(out, (list, tuple)):
            if all(isinstance(v, numbers.Real) for v in out):
                rewards = torch.tensor([float(v) for v in out], dtype=torch.float32)
            else:
                bad = next(v for v in out if not isinstance(v, numbers.Real))
                raise RewardContractError(
                    f"reward {target} returned a {type(out).__name__} with a non-number element {_describe(bad)}; "
                    "each reward must be a float, int or bool"
                )
        if rewards is None:
            raise RewardContractError(
                f"reward {target} returned {_describe(out)}; expected a RewardResult, a list/tuple of numbers, "
                "a 1-D tensor or a 1-D numpy array with one reward per response"
            )
        result = RewardResult(rewards=rewards)
    rewards = torch.as_tensor(result.rewards).detach().to("cpu", torch.float32)
    if rewards.dim() != 1 or rewards.numel() != n:
        raise RewardContractError(
            f"reward {target} returned {rewards.numel()} rewards of shape {tuple(rewards.shape)} for {n} responses; "
            "return one reward per response, in order"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardContractError(
            f"reward {target} returned non-finite rewards at positions {bad[:10]} "
            f"(values {[float(rewards[i]) for i in bad[:10]]}); rewards must be finite numbers"
        )
    extracted = list(result.extracted) if result.extracted else [None] * n
    return RewardResult(rewards=rewards, timeouts=int(result.timeouts), extracted=extracted,
                        errors=int(getattr(result, "errors", 0)))


class PluginReward:
    """A reward callable with its contract enforced; built by :func:`build_reward`.

    ``__call__(responses: list[str], problems: list[dict]) -> RewardResult`` with rewards of shape
    (N,), float32, finite. When the wrapped reward raises an ``Exception``, the batch is re-scored
    one sample at a time to find the failing sample(s); then ``on_error="raise"`` raises
    :class:`RewardError` (naming the first failing problem id and response, the original
    exception chained) and ``on_error="zero"`` scores the failing samples 0 and counts them in
    ``RewardResult.errors``. A wrong return type, length or a non-finite value always raises:
    those are bugs in the reward, not in the sample.

    With ``timeout_s``, each call of the reward (the batch, and each call of the re-scoring) that
    runs longer scores all its responses 0 and counts them in ``RewardResult.timeouts``, with a
    warning (main thread only: elsewhere no limit can be set, which is logged once).
    """

    def __init__(self, fn: Callable, target: str, on_error: str = "raise", timeout_s: float | None = None) -> None:
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR_MODES}")
        self.fn = fn
        self.target = target
        self.on_error = on_error
        self.timeout_s = check_timeout(timeout_s)
        self._warned_thread = False

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        try:
            out = self._call(responses, problems)
        except RewardTimeout:
            return self._timed_out(len(responses))
        except Exception as batch_error:  # noqa: BLE001 - BaseException (timeouts, Ctrl-C) passes through
            return self._rescore(responses, problems, batch_error)
        return _as_rewards(out, len(responses), self.target)

    def _call(self, responses: list[str], problems: list[dict]) -> Any:
        """One call of the reward: bounded by ``timeout_s``, and stopped by a SIGTERM in a
        single-process training run (a hung reward would otherwise keep the run from stopping)."""
        if self.timeout_s is not None and not signals_usable() and not self._warned_thread:
            log.warning("reward %s called off the main thread: reward.timeout_s=%s cannot be applied there "
                        "(signal.setitimer works on the main thread only); scoring without a time limit",
                        self.target, self.timeout_s)
            self._warned_thread = True
        with preemption.interruptible(), time_limit(self.timeout_s, RewardTimeout):
            return self.fn(responses, problems)

    def _timed_out(self, n: int) -> RewardResult:
        log.warning("reward %s exceeded reward.timeout_s=%s s on a call with %d response(s): scored 0 "
                    "(counted in */reward_timeouts)", self.target, self.timeout_s, n)
        return RewardResult(rewards=torch.zeros(n, dtype=torch.float32), timeouts=n, extracted=[None] * n)

    def _rescore(self, responses: list[str], problems: list[dict], batch_error: Exception) -> RewardResult:
        """Score sample by sample after the batch call raised ``batch_error``."""
        results: list[RewardResult | None] = []
        failures: list[tuple[int, Exception]] = []
        for i, (response, problem) in enumerate(zip(responses, problems)):
            try:
                results.append(_as_rewards(self._call([response], [problem]), 1, self.target))
            except RewardTimeout:
                results.append(self._timed_out(1))
            except RewardContractError:
                raise  # a bug in the reward, not a failing sample
            except Exception as e:  # noqa: BLE001
                results.append(None)
                failures.append((i, e))
        n = len(responses)
        if not failures:
            if self.on_error == "raise":
                raise RewardError(
                    f"reward {self.target} raised {type(batch_error).__name__}: {batch_error} on a batch of {n} "
                    "responses, but on none of them scored one at a time; the reward fails on batches"
                ) from batch_error
            log.warning("reward %s raised on a batch of %d (%r) but not on any single sample; "
                        "using the per-sample scores", self.target, n, batch_error)
        elif self.on_error == "raise":
            i, error = failures[0]
            raise RewardError(
                f"reward {self.target} raised {type(error).__name__}: {error} on {len(failures)} of {n} responses; "
                f"first: problem {problems[i].get('id', '?')!r}, response {_start(responses[i])}"
                f"{_others(failures, problems)}. Fix the reward, or set reward.on_error=zero to score such "
                "responses 0 (counted in */reward_errors)"
            ) from error
        else:
            i, error = failures[0]
            log.warning(
                "reward %s raised on %d of %d responses, scored 0 (reward.on_error=zero); first: problem %r, "
                "response %s: %s: %s", self.target, len(failures), n, problems[i].get("id", "?"),
                _start(responses[i]), type(error).__name__, error,
            )
        rewards = torch.zeros(n, dtype=torch.float32)
        extracted: list[str | None] = [None] * n
        timeouts = errors = 0
        for i, r in enumerate(results):
            if r is None:
                continue
            rewards[i] = r.rewards[0]
            extracted[i] = r.extracted[0] if r.extracted else None
            timeouts += r.timeouts
            errors += r.errors
        return RewardResult(rewards=rewards, timeouts=timeouts, extracted=extracted, errors=errors + len(failures))

    def __repr__(self) -> str:
        inner = self.fn if not inspect.isfunction(self.fn) and not isinstance(self.fn, functools.partial) else self.target
        kwargs = f", kwargs={self.fn.keywords}" if isinstance(self.fn, functools.partial) else ""
        limit = f", timeout_s={self.timeout_s}" if self.timeout_s is not None else ""
        return f"PluginReward({inner}{kwargs}, on_error={self.on_error!r}{limit})"


def _start(response: str, n: int = 80) -> str:
    return repr(response[:n] + ("..." if len(response) > n else ""))


def _others(failures: list[tuple[int, Exception]], problems: list[dict]) -> str:
    if len(failures) < 2:
        return ""
    ids = [problems[i].get("id", "?") for i, _ in failures[1:6]]
    return f"; also {ids}{' ...' if len(failures) > 6 else ''}"

