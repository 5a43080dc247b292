"""Tests for prerl.rewards: extraction, math-verify reward (incl. timeouts), reasoning-gym reward, dispatch."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import math_verify
from math_verify.errors import TimeoutException

from prerl.rewards import (
    DispatchReward,
    MathVerifyReward,
    ReasoningGymReward,
    RewardResult,
    extract_answer,
    last_answer_tag,
    last_boxed,
    last_number,
)

REPO = Path(__file__).resolve().parents[1]


def mp(answer, i=0):
    return {"id": f"m/{i}", "question": "q", "answer": answer, "verifier": "math", "meta": {}}


@pytest.fixture(scope="module")
def rg_problems():
    from prerl.data import ReasoningGymSource

    cs = ReasoningGymSource("chain_sum", 4, seed=5, config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}).load()
    ba = ReasoningGymSource("basic_arithmetic", 4, seed=5, config={"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                                    "max_digits": 1, "operators": ["+", "-"],
                                                                    "allow_parentheses": False, "allow_negation": False}).load()
    return cs + ba


# ----------------------------------------------------------------------------- extraction
def test_last_boxed():
    assert last_boxed(r"x \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert last_boxed(r"\boxed{a^{b^{c}}} tail") == "a^{b^{c}}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces are literal
    assert last_boxed(r"$\boxed 2$.") == "2"  # MATH sometimes omits the braces
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"\boxed{ 5 }") == "5"
    assert last_boxed("The answer is 72") is None
    assert last_boxed(r"\boxed{12") is None  # unterminated (e.g. truncated response)
    assert last_boxed(r"\boxed{}") is None
    assert last_boxed(r"\boxedx{3}") is None


def test_answer_tag_and_last_number():
    assert last_answer_tag("<answer>1</answer> then <answer> 42 </answer>") == "42"
    assert last_answer_tag("<answer>unclosed") is None
    assert last_number("2 + 3 = 5, so the answer is 5.") == "5"
    assert last_number("total 1,234.5 dollars") == "1234.5"
    assert last_number("7 - 9 = -2") == "-2"
    assert last_number("5-3") == "3"
    assert last_number("no digits") is None
    assert extract_answer(r"\boxed{3}", "boxed") == "3"
    with pytest.raises(ValueError, match="unknown extraction mode"):
        extract_answer("x", "nope")


# ----------------------------------------------------------------------------- math-verify
@pytest.fixture(scope="module")
def mv():
    return MathVerifyReward(timeout_s=5.0)


def test_math_verify_gold_first_correctness(mv):
    cases = [
        (r"so $\boxed{0.5}$", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"The answer is \boxed{72}", "72", 1.0),
        (r"The answer is \boxed{73}", "72", 0.0),
        ("The answer is 72", "72", 0.0),  # strict: no box, no reward
        (r"$\frac{1}{2}$", r"\frac{1}{2}", 0.0),  # math but not boxed
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{1} ... final: \boxed{2}", "1", 0.0),  # only the LAST box counts
        (r"\boxed{x = 5}", "5", 1.0),
        (r"\boxed{5", "5", 0.0),  # truncated box
    ]
    res = mv([c[0] for c in cases], [mp(c[1], i) for i, c in enumerate(cases)])
    assert isinstance(res, RewardResult)
    assert res.rewards.dtype == torch.float32 and res.rewards.shape == (len(cases),)
    assert res.rewards.tolist() == [c[2] for c in cases]
    assert res.timeouts == 0
    assert res.extracted[2] == "72" and res.extracted[4] is None


def test_math_verify_calls_gold_first(monkeypatch, mv):
    calls = []
    real = math_verify.verify

    def spy(gold, target, **kw):
        calls.append((gold, target))
        return real(gold, target, **kw)

    monkeypatch.setattr(math_verify, "verify", spy)
    r = MathVerifyReward()
    assert r([r"\boxed{3}"], [mp("7")]).rewards.tolist() == [0.0]
    g, t = calls[0]
    assert str(g) == "7" and str(t) == "3"


def test_math_verify_lenient_mode():
    r = MathVerifyReward(strict_boxed=False)
    assert r(["The final answer is $72$"], [mp("72")]).rewards.tolist() == [1.0]


def test_math_verify_timeout_from_library_counts_as_zero(monkeypatch):
    def boom(*a, **kw):
        raise TimeoutException("simulated")

    monkeypatch.setattr(math_verify, "verify", boom)
    r = MathVerifyReward()
    res = r([r"\boxed{1}", "no box"], [mp("1"), mp("1")])
    assert res.rewards.tolist() == [0.0, 0.0]
    assert res.timeouts == 1  # the unboxed one never reaches verification


def test_math_verify_real_timer_interrupts_slow_verification(monkeypatch):
    def slow(*a, **kw):
        time.sleep(5)
        return True

    monkeypatch.setattr(math_verify, "verify", slow)
    r = MathVerifyReward(timeout_s=0.2)
    t0 = time.monotonic()
    res = r([r"\boxed{1}", r"\boxed{2}"], [mp("1"), mp("2")])
    assert time.monotonic() - t0 < 2.0
    assert res.rewards.tolist() == [0.0, 0.0] and res.timeouts == 2
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0  # timer cleared afterwards


def test_math_verify_genuinely_slow_expression_times_out():
    # sympy needs ~25 s on these machines to compare these (equal!) expressions
    r = MathVerifyReward(timeout_s=0.1)
    t0 = time.monotonic()
    res = r([r"\boxed{\sum_{k=0}^{200} \binom{200}{k} x^k}", r"\boxed{3}"], [mp("(x+1)^{200}"), mp("3")])
    assert time.monotonic() - t0 < 5.0
    assert res.rewards.tolist() == [0.0, 1.0] and res.timeouts == 1


class OuterLimit(BaseException):
    pass


class InnerLimit(BaseException):
    pass


def test_nested_time_limits_each_fire_on_time():
    """reward.timeout_s around math-verify's per-response limit: whichever is due first fires first,
    by its own exception, and both timers and the SIGALRM handler are restored afterwards."""
    from prerl.rewards.time_limit import time_limit

    handler = signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(OuterLimit):  # the enclosing limit is due first: it fires inside the inner block
        with time_limit(0.3, OuterLimit), time_limit(5.0, InnerLimit):
            time.sleep(3)
    assert time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    with pytest.raises(OuterLimit):  # the inner one is due first; the enclosing one keeps its deadline
        with time_limit(0.6, OuterLimit):
            with pytest.raises(InnerLimit):
                with time_limit(0.1, InnerLimit):
                    time.sleep(3)
            assert time.monotonic() - t0 < 0.5
            time.sleep(3)
    assert 0.5 < time.monotonic() - t0 < 1.5
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0 and signal.getsignal(signal.SIGALRM) is handler


def test_math_verify_off_main_thread():
    out = {}

    def work():
        try:
            out["res"] = MathVerifyReward(timeout_s=1.0)([r"\boxed{0.5}"], [mp(r"\frac{1}{2}")])
            MathVerifyReward(timeout_s=1.0, off_main_thread="error")([r"\boxed{1}"], [mp("1")])
        except BaseException as e:  # noqa: BLE001
            out["err"] = e

    th = threading.Thread(target=work)
    th.start()
    th.join(60)
    assert out["res"].rewards.tolist() == [1.0]  # no crash: verified without a timeout
    assert isinstance(out["err"], RuntimeError) and "main thread" in str(out["err"])


def test_math_verify_length_mismatch(mv):
    with pytest.raises(ValueError, match="2 responses but 1 problems"):
        mv(["a", "b"], [mp("1")])


# ----------------------------------------------------------------------------- reasoning-gym
def test_gym_reward_right_and_wrong(rg_problems):
    r = ReasoningGymReward()
    right = [rf"so the result is \boxed{{{p['answer']}}}" for p in rg_problems]
    wrong = [rf"\boxed{{{int(p['answer']) + 1}}}" for p in rg_problems]
    assert r(right, rg_problems).rewards.tolist() == [1.0] * len(rg_problems)
    res = r(wrong, rg_problems)
    assert res.rewards.tolist() == [0.0] * len(rg_problems)
    assert res.extracted == [str(int(p["answer"]) + 1) for p in rg_problems]
    unboxed = r([f"The answer is {p['answer']}" for p in rg_problems], rg_problems)
    assert unboxed.rewards.sum() == 0 and unboxed.extracted == [None] * len(rg_problems)


def test_gym_reward_extraction_modes(rg_problems):
    p = rg_problems[0]
    lenient = ReasoningGymReward(extraction="last_number")
    assert lenient([f"I think it is {p['answer']}."], [p]).rewards.tolist() == [1.0]
    tag = ReasoningGymReward(extraction="answer_tag")
    assert tag([f"<answer>{p['answer']}</answer>"], [p]).rewards.tolist() == [1.0]


def test_gym_reward_uses_task_scorer_and_threshold(rg_problems):
    ba = next(p for p in rg_problems if p["meta"]["metadata"]["source_dataset"] == "basic_arithmetic")
    cs = next(p for p in rg_problems if p["meta"]["metadata"]["source_dataset"] == "chain_sum")
    strict = ReasoningGymReward()
    # chain_sum's scorer compares decimals: "+0012.0" equals "12"
    assert strict([rf"\boxed{{+0{cs['answer']}.0}}"], [cs]).rewards.tolist() == [1.0]
    # basic_arithmetic's default scorer gives partial credit len(gold)/len(answer) when the
    # gold is a substring: binarised at threshold 1 this is wrong, at 0.5 it is right
    padded = rf"\boxed{{{ba['answer']} ok}}"
    partial = len(ba["answer"]) / len(f"{ba['answer']} ok")
    assert strict.score(f"{ba['answer']} ok", ba["meta"]) == pytest.approx(partial)
    assert strict([padded], [ba]).rewards.tolist() == [0.0]
    assert ReasoningGymReward(threshold=partial)([padded], [ba]).rewards.tolist() == [1.0]


def test_gym_reward_needs_entry():
    with pytest.raises(ValueError, match="no reasoning-gym entry"):
        ReasoningGymReward()([r"\boxed{1}"], [{"id": "x", "answer": "1", "verifier": "reasoning_gym", "meta": {}}])


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_routes_and_keeps_order(rg_problems, monkeypatch):
    d = DispatchReward(math=MathVerifyReward(), reasoning_gym=ReasoningGymReward())
    g = rg_problems[0]
    problems = [mp(r"\frac{1}{2}", 0), g, mp("3", 1), g]
    responses = [r"\boxed{0.5}", rf"\boxed{{{g['answer']}}}", r"\boxed{4}", "nothing"]
    res = d(responses, problems)
    assert res.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert res.extracted == ["0.5", g["answer"], "4", None]
    # a gym problem's gold would also pass math-verify, but "half" would not pass either:
    # routing is by the verifier field only
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: (_ for _ in ()).throw(TimeoutException("x")))
    assert d(responses, problems).timeouts == 2


def test_dispatch_unknown_verifier():
    d = DispatchReward(math=MathVerifyReward())
    with pytest.raises(ValueError, match=r"verifier 'code'.*only handles \['math'\]"):
        d(["x"], [{**mp("1"), "verifier": "code"}])
    with pytest.raises(ValueError, match="verifier 'reasoning_gym'"):
        d(["x"], [{**mp("1"), "verifier": "reasoning_gym"}])


@pytest.mark.parametrize("name", ["default", "boxed"])
def test_reward_configs_instantiate(name, rg_problems):
    from omegaconf import OmegaConf

    from prerl.rewards import build_reward

    d = build_reward(OmegaConf.load(REPO / "configs" / "reward" / f"{name}.yaml"))
    assert isinstance(d.fn, DispatchReward)
    assert set(d.fn.routes) == {"math", "reasoning_gym"}
    g = rg_problems[0]
    responses = [r"\boxed{72}", rf"\boxed{{{g['answer']}}}", f"so it is {g['answer']}", "72"]
    expected_gym_unboxed = 1.0 if name == "default" else 0.0  # default: last_number for gym
    assert d(responses, [mp("72"), g, g, mp("72")]).rewards.tolist() == [1.0, 1.0, expected_gym_unboxed, 0.0]


def test_random_reward_is_a_seeded_pure_function_of_its_inputs():
    from prerl.rewards.random_reward import RandomReward

    problems = [{"id": f"p{i}"} for i in range(400)]
    responses = [f"answer {i}" for i in range(400)]
    first = RandomReward(p=0.3, seed=1)(responses, problems).rewards
    assert torch.equal(first, RandomReward(p=0.3, seed=1)(responses, problems).rewards)  # no hidden state
    assert 0.22 < float(first.mean()) < 0.38
    assert not torch.equal(first, RandomReward(p=0.3, seed=2)(responses, problems).rewards)
    assert float(RandomReward(p=0.0)(responses, problems).rewards.sum()) == 0.0
    with pytest.raises(ValueError, match="p must be in"):
        RandomReward(p=1.5)
