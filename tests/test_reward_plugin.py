"""The reward plug-in contract of prerl.rewards.build_reward: classes and plain functions as
``reward._target_``, the accepted return types, on_error, and import errors."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from prerl import preemption
from prerl.rewards import (
    DispatchReward,
    RewardContractError,
    RewardError,
    RewardResult,
    TimeoutException,
    build_reward,
)

REPO = Path(__file__).resolve().parents[1]
HERE = __name__  # targets below are functions of this test module


def problems(n: int) -> list[dict]:
    return [{"id": f"p/{i}", "question": f"{i} + 1?", "answer": str(i + 1), "verifier": "math", "meta": {}}
            for i in range(n)]


# --------------------------------------------------------------- plug-ins used as targets
def contains_answer(responses, problems, bonus=0.0, weight=1.0):
    """A function reward with keyword arguments; returns a list of floats."""
    return [weight * float(p["answer"] in r) + bonus for r, p in zip(responses, problems)]


def returns_bools(responses, problems):
    return tuple(p["answer"] in r for r, p in zip(responses, problems))


def returns_tensor(responses, problems):
    return torch.tensor([len(r) % 2 for r in responses])  # int64, 1-D


def returns_numpy(responses, problems):
    return np.array([0.25] * len(responses))


def returns_dict(responses, problems):
    return {"rewards": [1.0] * len(responses)}


def returns_strings(responses, problems):
    return ["1"] * len(responses)


def returns_too_few(responses, problems):
    return [1.0] * (len(responses) - 1)


def returns_nan(responses, problems):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def fails_on_poison(responses, problems):
    """Raises on any batch holding a response with "poison", like a parser crashing on odd input."""
    for r in responses:
        if "poison" in r:
            raise ZeroDivisionError("parser crashed")
    return [1.0] * len(responses)


def times_out(responses, problems):
    raise TimeoutException("verification exceeded 0.1 s")


def interrupted(responses, problems):
    raise KeyboardInterrupt


def hangs(responses, problems):
    """Raises on a batch holding a response with "poison", else hangs on one with "hang" (a stuck
    verifier, a dead server); its own ``except Exception`` must not swallow the time limit."""
    if any("poison" in r for r in responses):
        raise ZeroDivisionError("parser crashed")
    if any("hang" in r for r in responses):
        try:
            time.sleep(60)  # "forever" here; bounded so that a broken limit fails the test, not the session
        except Exception:  # noqa: BLE001
            return [1.0] * len(responses)
    return [1.0] * len(responses)


def sleeps(responses, problems):
    time.sleep(3)
    return [1.0] * len(responses)


class LengthReward:
    """A class reward: instantiated with the config's keys, called per batch."""

    def __init__(self, max_len: int, scale: float = 1.0):
        self.max_len, self.scale = max_len, scale

    def __call__(self, responses, problems):
        return RewardResult(torch.tensor([self.scale * (len(r) <= self.max_len) for r in responses]),
                            extracted=[r[:3] for r in responses])


# --------------------------------------------------------------- function and class targets
def test_function_target_is_not_called_at_build_time_and_gets_its_kwargs():
    cfg = OmegaConf.create({"_target_": f"{HERE}.contains_answer", "weight": 2.0, "bonus": 0.5, "on_error": "raise"})
    reward = build_reward(cfg)
    result = reward(["the answer is 1", "no idea"], problems(2))
    assert isinstance(result, RewardResult)
    assert result.rewards.dtype == torch.float32
    assert result.rewards.tolist() == [2.5, 0.5]
    assert result.extracted == [None, None] and result.timeouts == 0 and result.errors == 0


def test_function_target_with_an_unknown_key_fails_at_build_time():
    with pytest.raises(TypeError, match=r"contains_answer.*weigth"):
        build_reward({"_target_": f"{HERE}.contains_answer", "weigth": 2.0})


def test_class_target_is_instantiated_with_its_keys():
    reward = build_reward(OmegaConf.create({"_target_": f"{HERE}.LengthReward", "max_len": 3, "scale": 0.5}))
    result = reward(["abc", "abcdef"], problems(2))
    assert result.rewards.tolist() == [0.5, 0.0] and result.extracted == ["abc", "abc"]


def test_shipped_reward_configs_build_with_nested_targets():
    """configs/reward/*.yaml (DispatchReward with nested sub-rewards) still build and score."""
    reward = build_reward(OmegaConf.load(REPO / "configs" / "reward" / "default.yaml"))
    assert isinstance(reward.fn, DispatchReward)
    assert reward([r"so \boxed{1}", r"\boxed{3}"], problems(2)).rewards.tolist() == [1.0, 0.0]
    for name in ("boxed", "random"):
        assert len(build_reward(OmegaConf.load(REPO / "configs" / "reward" / f"{name}.yaml"))(["x"], problems(1))) == 1
    for path in (REPO / "configs" / "reward").glob("*.yaml"):  # the key is declared (and commented) in each
        assert OmegaConf.load(path).on_error == "raise", path.name


def test_plugin_config_with_a_target_and_added_keys_from_the_command_line():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "reward=plugin", f"reward._target_={HERE}.contains_answer", "+reward.weight=3.0", "reward.on_error=zero",
            "reward.timeout_s=2.5"])
    reward = build_reward(cfg.reward)
    assert reward.on_error == "zero" and reward.timeout_s == 2.5
    assert reward(["1", "x"], problems(2)).rewards.tolist() == [3.0, 0.0]


# --------------------------------------------------------------- return types
@pytest.mark.parametrize("fn, expected", [
    ("contains_answer", [1.0, 0.0, 1.0]),
    ("returns_bools", [1.0, 0.0, 1.0]),
    ("returns_tensor", [1.0, 0.0, 0.0]),
    ("returns_numpy", [0.25, 0.25, 0.25]),
])
def test_accepted_return_types(fn, expected):
    result = build_reward({"_target_": f"{HERE}.{fn}"})(["1", "xx", "3 ok"], problems(3))
    assert result.rewards.dtype == torch.float32 and result.rewards.tolist() == expected


@pytest.mark.parametrize("fn, message", [
    ("returns_dict", r"returns_dict returned dict \{'rewards'"),
    ("returns_strings", r"returns_strings returned a list with a non-number element str '1'"),
    ("returns_too_few", r"returns_too_few returned 2 rewards .* for 3 responses"),
    ("returns_nan", r"returns_nan returned non-finite rewards at positions \[0\]"),
])
def test_wrong_returns_are_errors_naming_the_target(fn, message):
    # a contract violation is a bug in the reward: never zeroed, whatever on_error says
    for on_error in ("raise", "zero"):
        with pytest.raises(RewardContractError, match=message):
            build_reward({"_target_": f"{HERE}.{fn}", "on_error": on_error})(["1", "2", "3"], problems(3))


# --------------------------------------------------------------- on_error
def test_raising_reward_with_on_error_raise_names_the_problem_and_chains_the_cause():
    reward = build_reward({"_target_": f"{HERE}.fails_on_poison", "on_error": "raise"})
    with pytest.raises(RewardError) as info:
        reward(["fine", "poison pill here", "fine too"], problems(3))
    message = str(info.value)
    assert "'p/1'" in message and "poison pill here" in message and "parser crashed" in message
    assert "1 of 3" in message and "p/0" not in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_raising_reward_with_on_error_zero_scores_the_failures_zero_and_counts_them():
    reward = build_reward({"_target_": f"{HERE}.fails_on_poison", "on_error": "zero"})
    result = reward(["poison", "fine", "poison again", "fine"], problems(4))
    assert result.rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert result.errors == 2


def test_timeouts_and_interrupts_are_not_swallowed():
    # TimeoutException and KeyboardInterrupt are BaseExceptions: on_error never catches them
    for fn, exc in (("times_out", TimeoutException), ("interrupted", KeyboardInterrupt)):
        with pytest.raises(exc):
            build_reward({"_target_": f"{HERE}.{fn}", "on_error": "zero"})(["x"], problems(1))


def test_bad_on_error_value():
    with pytest.raises(ValueError, match="on_error='ignore'"):
        build_reward({"_target_": f"{HERE}.contains_answer", "on_error": "ignore"})


# --------------------------------------------------------------- timeout_s and SIGTERM
def test_a_hung_reward_scores_its_call_zero_counts_timeouts_and_the_run_goes_on(caplog):
    reward = build_reward({"_target_": f"{HERE}.hangs", "timeout_s": 0.5})
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="prerl.rewards.plugin"):
        result = reward(["1", "hang", "3", "4"], problems(4))
    assert time.monotonic() - t0 < 2.0
    assert result.rewards.tolist() == [0.0] * 4 and result.timeouts == 4 and result.errors == 0
    assert "reward.timeout_s=0.5" in caplog.text and "hangs" in caplog.text
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # the timer is cleared
    assert reward(["1", "2"], problems(2)).rewards.tolist() == [1.0, 1.0]  # the next call is scored as usual


def test_a_fast_reward_under_a_limit_is_unaffected_and_the_key_is_not_passed_on():
    reward = build_reward(OmegaConf.create({"_target_": f"{HERE}.contains_answer", "weight": 2.0, "timeout_s": 5}))
    assert reward.timeout_s == 5.0 and "timeout_s" not in reward.fn.keywords
    result = reward(["the answer is 1", "no idea"], problems(2))
    assert result.rewards.tolist() == [2.0, 0.0] and result.timeouts == 0 and result.errors == 0
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def test_on_error_zero_does_not_take_a_timeout_for_an_error():
    """The batch raises (poison), so it is re-scored one response at a time, each call under the limit:
    the hung one is a timeout, the poisoned one an error."""
    reward = build_reward({"_target_": f"{HERE}.hangs", "timeout_s": 0.3, "on_error": "zero"})
    result = reward(["poison", "fine", "hang"], problems(3))
    assert result.rewards.tolist() == [0.0, 1.0, 0.0] and result.errors == 1 and result.timeouts == 1


def test_the_limit_of_the_whole_call_holds_math_verify_limits_inside_it(monkeypatch):
    """reward=default with reward.timeout_s: the plug-in limit (0.3 s) fires on time although
    math-verify's own per-response limit (5 s) is set inside it."""
    import math_verify

    monkeypatch.setattr(math_verify, "verify", lambda *a, **kw: time.sleep(3) or True)
    node = OmegaConf.load(REPO / "configs" / "reward" / "default.yaml")
    node.timeout_s = 0.3
    reward = build_reward(node)
    t0 = time.monotonic()
    result = reward([r"\boxed{1}", r"\boxed{2}"], problems(2))
    assert time.monotonic() - t0 < 1.5
    assert result.timeouts == 2 and result.rewards.tolist() == [0.0, 0.0]


def test_a_target_with_its_own_timeout_s_is_warned_that_the_key_is_not_passed_on(caplog):
    with caplog.at_level("WARNING", logger="prerl.rewards.plugin"):
        reward = build_reward({"_target_": "prerl.rewards.MathVerifyReward", "timeout_s": 2})
    assert reward.timeout_s == 2.0 and reward.fn.timeout_s == 5.0
    assert "not passed to prerl.rewards.MathVerifyReward" in caplog.text


@pytest.mark.parametrize("value", [0, -1, "30s", True, float("inf"), float("nan")])
def test_timeout_s_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=r"reward\.timeout_s=.* is not allowed: a positive number of seconds"):
        build_reward({"_target_": f"{HERE}.contains_answer", "timeout_s": value})


def test_off_the_main_thread_no_limit_is_set_and_that_is_said_once(caplog):
    reward = build_reward({"_target_": f"{HERE}.contains_answer", "timeout_s": 0.5})
    out = []

    def work():
        for _ in range(2):
            out.append(reward(["1"], problems(1)).rewards.tolist())

    with caplog.at_level("WARNING", logger="prerl.rewards.plugin"):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(30)
    assert out == [[1.0], [1.0]]
    assert caplog.text.count("off the main thread") == 1


def test_sigterm_stops_a_sleeping_reward_at_once_in_a_single_process_training_step():
    reward = build_reward({"_target_": f"{HERE}.sleeps", "on_error": "zero"})  # no time limit needed
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    preemption.install()
    try:
        preemption.defer(True)  # inside the training loop
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(SIGTERMException):
            reward(["1", "2"], problems(2))
        assert time.monotonic() - t0 < 2.0
    finally:
        timer.cancel()
        preemption.uninstall()
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


# --------------------------------------------------------------- finding the module
def test_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    name = "my_rewards_cwd_test"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def exact(responses, problems, strip=True):
            return [float((r.strip() if strip else r) == p["answer"]) for r, p in zip(responses, problems)]

        class Always:
            def __init__(self, value):
                self.value = value

            def __call__(self, responses, problems):
                return [self.value] * len(responses)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what src/train.py does for the working directory
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert build_reward({"_target_": f"{name}.exact"})([" 1 ", "2"], problems(2)).rewards.tolist() == [1.0, 1.0]
        assert build_reward({"_target_": f"{name}.Always", "value": 0.5})(["a"], problems(1)).rewards.tolist() == [0.5]
    finally:
        sys.modules.pop(name, None)


def test_unimportable_target_says_what_to_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImportError, match=r"no_such_rewards_module.*working directory.*PYTHONPATH"):
        build_reward({"_target_": "no_such_rewards_module.score"})
    with pytest.raises(ImportError, match=r"'prerl.rewards' has no attribute 'no_such_reward'"):
        build_reward({"_target_": "prerl.rewards.no_such_reward"})


def test_import_error_inside_the_plugin_is_not_reported_as_a_missing_plugin(tmp_path, monkeypatch):
    name = "my_rewards_broken_import"
    (tmp_path / f"{name}.py").write_text("import a_dependency_that_is_not_installed\n\ndef score(r, p):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError, match=r"importing .*my_rewards_broken_import.*failed.*a_dependency_that_is_not_installed"):
            build_reward({"_target_": f"{name}.score"})
    finally:
        sys.modules.pop(name, None)


def test_the_documented_example_module_works(tmp_path, monkeypatch):
    """docs/rewards.md's my_rewards.py, built the way its command lines configure it."""
    doc = (REPO / "docs" / "rewards.md").read_text()
    code = next(block for block in doc.split("```python\n")[1:] if block.startswith("# my_rewards.py"))
    name = "my_rewards_doc_example"
    (tmp_path / f"{name}.py").write_text(code.split("```")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        last_number = build_reward({"_target_": f"{name}.last_number", "tolerance": 0.01, "on_error": "raise"})
        assert last_number(["it is 2.005", "1 then 3", "none"], problems(3)).rewards.tolist() == [0.0, 0.0, 0.0]
        assert last_number(["so 1.005", "2", "3"], problems(3)).rewards.tolist() == [1.0, 1.0, 1.0]
        concise = build_reward({"_target_": f"{name}.Concise", "max_words": 3})
        assert concise(["1", "the answer is 2", "3 words here"], problems(3)).rewards.tolist() == [1.0, 0.0, 1.0]
    finally:
        sys.modules.pop(name, None)
