"""reward=math_string, the authors' reward (last box, MATH string normalisation, string equality),
on a corpus built here with the 1/0 that behaviour gives; where it and math-verify differ.

``python tests/test_math_string_reward.py`` prints the corpus' agreement with math-verify per kind
and both rewards' time per 1,000 calls (the figures in docs/rewards.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prerl.rewards import DispatchReward, MathStringReward, MathVerifyReward, build_reward

REPO = Path(__file__).resolve().parents[1]

# MATH-style golds as this project's data has them (the reference solution's last box, raw).
GOLDS = [
    "16", "348", "3003", "27", "5", "-2", "1000000", r"\frac{9}{16}", r"\frac{1}{2}", r"\frac{7}{2}",
    r"-\frac{1}{3}", r"\frac{\sqrt{2}}{2}", r"2\sqrt{3}", "(3, -1)", "[-2, 5)", r"\pi", r"12\pi",
    r"90^\circ", r"10\%", r"\$18.90", "x^2+7x+10", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\text{Sunday}",
    "0.25", "1, 2, 3", r"\infty", r"\{1, 3\}", "y = 2x + 3", r"\text{(C)}", r"6\text{ inches}",
]


def boxed(answer: str) -> str:
    return rf"We simplify step by step and find the result. The final answer is $\boxed{{{answer}}}$."


def other(i: int) -> str:
    """A wrong answer for GOLDS[i]: the next problem's gold (no two golds are the same string)."""
    return GOLDS[(i + 1) % len(GOLDS)]


FILLER = (r"Let $f(x) = x^2 + 3x$. Then $f(a+1) - f(a) = 2a + 4$, and summing over $a$ gives {a telescoping sum}. "
          "We check small cases by hand before generalising. ")


def long_response(answer: str | None, cut: bool = False) -> str:
    """~8,000 characters of reasoning (braces, no box), then the boxed answer (or a box cut short)."""
    body = FILLER * (8000 // len(FILLER))
    if answer is None:
        return body
    return body + (rf"\boxed{{{answer}" if cut else boxed(answer))


def corpus() -> list[tuple[str, str, str, float]]:
    """(kind, response, gold, reward of the authors' behaviour)."""
    cases: list[tuple[str, str, str, float]] = []

    def add(kind, response, gold, expected):
        cases.append((kind, response, gold, float(expected)))

    for i, g in enumerate(GOLDS):
        add("verbatim", boxed(g), g, 1)
        add("wrong", boxed(other(i)), g, 0)
        add("wrong", f"The answer is {g}.", g, 0)  # no box at all
        # equivalent forms the MATH rules map onto the gold: 1
        if ", " in g or " + " in g:
            add("equivalent", boxed(g.replace(" ", "")), g, 1)  # spaces are removed
        if r"\frac" in g:
            add("equivalent", boxed(g.replace(r"\frac", r"\dfrac")), g, 1)
            add("equivalent", boxed(g.replace(r"\frac", r"\tfrac")), g, 1)
        if g[0] in "([":
            add("equivalent", boxed(r"\left" + g[:-1] + r"\right" + g[-1]), g, 1)
        if "=" not in g:
            add("equivalent", boxed(f"x = {g}"), g, 1)  # a short "x =" in front is dropped
        if r"\text{ " not in g:
            add("equivalent", boxed(rf"{g}\text{{ units}}"), g, 1)  # "\text{ unit}" after the value is dropped
            add("equivalent", boxed(f"{g} units"), g, 0)  # a unit without \text{ } is not
        # other ways of writing the same value: 0 (no symbolic check)
        if g.lstrip("-").isdigit():
            add("equivalent", boxed(g + ".0"), g, 0)
            add("equivalent", boxed(f"${g}$"), g, 0)
        if g.isdigit() and len(g) > 3:
            add("equivalent", boxed(f"{int(g):,}"), g, 0)
    equivalent = [  # (response's answer, gold, authors' reward) for single golds
        ("0.5625", r"\frac{9}{16}", 0), ("0.5", r"\frac{1}{2}", 1), ("1/2", r"\frac{1}{2}", 1), (".5", r"\frac{1}{2}", 1),
        ("7/2", r"\frac{7}{2}", 1), (r"\frac72", r"\frac{7}{2}", 1), ("3.5", r"\frac{7}{2}", 0),
        ("-1/3", r"-\frac{1}{3}", 0), (r"\frac{-1}{3}", r"-\frac{1}{3}", 0),
        (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", 0), (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", 0),
        (r"2\sqrt3", r"2\sqrt{3}", 1), (r"\sqrt{12}", r"2\sqrt{3}", 0),
        ("90", r"90^\circ", 1), (r"90^{\circ}", r"90^\circ", 1), ("10", r"10\%", 1), ("10%", r"10\%", 0),
        ("18.90", r"\$18.90", 1), ("18.9", r"\$18.90", 0), ("27 miles", "27", 0), (r"27\text{ miles}", "27", 1),
        ("6", r"6\text{ inches}", 1), (r"6\text{inches}", r"6\text{ inches}", 0),
        ("(x+2)(x+5)", "x^2+7x+10", 0), ("2x + 3", "y = 2x + 3", 1), ("y=2x+3", "y = 2x + 3", 1),
        (".25", "0.25", 1), (r"\frac{1}{4}", "0.25", 0), ("3, 1", r"\{1, 3\}", 0),
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", 1),
        ("Sunday", r"\text{Sunday}", 0), (r"\text{ Sunday}", r"\text{Sunday}", 0),
        ("1 / x", "1/x", 0),  # one "/" between non-integers: the raw strings are compared
        ("1/x", "1/x", 1),
    ]
    for answer, g, expected in equivalent:
        add("equivalent", boxed(answer), g, expected)
    # \text{} golds: this project's raw MATH gold, and the authors' pre-normalised one ({(C)})
    for answer, g, expected in [
        (r"\text{(C)}", r"\text{(C)}", 1), ("(C)", r"\text{(C)}", 0), ("C", r"\text{(C)}", 0),
        ("{(C)}", "{(C)}", 1), ("(C)", "{(C)}", 0), (r"\text{(C)}", "{(C)}", 0),
    ]:
        add("text gold", boxed(answer), g, expected)
    # empty gold (4 of the authors' MATH-train golds): only an empty last box matches it
    for response, expected in [(r"\boxed{}", 1), (r"so \boxed{ }", 1), (r"\boxed{5}", 0), ("no box", 0)]:
        add("empty gold", response, "", expected)
    # where the box is
    for i, g in enumerate(GOLDS[:10]):
        w = other(i)
        add("structure", boxed(w) + " Wait, that is wrong. " + boxed(g), g, 1)  # several boxes: the last
        add("structure", boxed(g) + " Hmm, let me redo it. " + boxed(w), g, 0)
        add("structure", boxed(g) + r" As asked, I put the answer in \boxed{}.", g, 0)  # \boxed{} in prose, last
        add("structure", r"I will write the answer in \boxed{} at the end. " + boxed(g), g, 1)
        add("structure", boxed(g) + r" (the \boxed command marks it)", g, 0)  # last \boxed has no box
        add("structure", boxed(g) + r" So the answer is \boxed{" + g, g, 0)  # unclosed last box
        add("structure", rf"$$\boxed{{\boxed{{{g}}}}}$$", g, 1)  # nested: the inner one ends first
        add("structure", rf"\fbox{{{g}}}", g, 0)  # \fbox is found but not unwrapped
        add("structure", rf"\fbox{{{w}}} so \boxed{{{g}}}", g, 1)
        add("structure", rf"\boxed {{{g}}}", g, 0)  # "\boxed {5}" reads "{5}"
        add("structure", rf"\boxed {g}", g, 0)  # no braces after it: no box
    # ~8k-character responses
    for i, g in enumerate(GOLDS[:10]):
        add("long", long_response(g), g, 1)
        add("long", long_response(other(i)), g, 0)
        add("long", boxed(g) + long_response(None), g, 1)  # the only box is early
        add("long", boxed(other(i)) + long_response(g), g, 1)
        add("long", long_response(g, cut=True), g, 0)  # cut inside the final box
    return cases


def math_problem(gold: str, i: int = 0) -> dict:
    return {"id": f"math/{i}", "question": "?", "answer": gold, "verifier": "math", "meta": {}}


def score(reward, cases) -> list[float]:
    return reward([c[1] for c in cases], [math_problem(c[2], i) for i, c in enumerate(cases)]).rewards.tolist()


def test_the_corpus_gets_the_authors_rewards():
    cases = corpus()
    assert len(cases) > 400 and {c[0] for c in cases} == {
        "verbatim", "wrong", "equivalent", "text gold", "empty gold", "structure", "long"}
    assert all(len(c[1]) > 7900 for c in cases if c[0] == "long")
    got = score(MathStringReward(), cases)
    wrong = [(kind, response[-80:], gold, expected, r) for (kind, response, gold, expected), r in zip(cases, got)
             if r != expected]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ; first: {wrong[:5]}"


def test_extracted_answers_and_a_missing_gold_field():
    result = MathStringReward()([r"\boxed{\frac{1}{2}}", r"\boxed {5}", r"\fbox{5}", "none"],
                                [math_problem("0.5")] * 4)
    assert result.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert result.extracted == [r"\frac{1}{2}", "{5}", None, None] and result.timeouts == 0
    with pytest.raises(KeyError, match="problem 'p' has no gold field 'solution'"):
        MathStringReward(gold_field="solution")([r"\boxed{1}"], [{"id": "p", "answer": "1"}])


# Where the two rewards differ (docs/rewards.md): (response, gold, math_string, math-verify).
DIFFERENCES = [
    (r"\boxed{16.0}", "16", 0, 1), (r"\boxed{$348$}", "348", 0, 1), (r"\boxed{3,003}", "3003", 0, 1),
    (r"\boxed{0.5625}", r"\frac{9}{16}", 0, 1), (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 0, 1),
    (r"\boxed{-1/3}", r"-\frac{1}{3}", 0, 1), (r"\boxed{27 miles}", "27", 0, 1), (r"\boxed{10%}", r"10\%", 0, 1),
    (r"\boxed{(C)}", r"\text{(C)}", 0, 1), (r"\boxed{(C)}", "{(C)}", 0, 1), (r"\fbox{5}", "5", 0, 1),
    (r"\boxed {5}", "5", 0, 1), (r"\boxed 5", "5", 0, 1), (r"\boxed{5} so \boxed{5", "5", 0, 1),
    (r"\boxed{x = \text{(C)}}", r"\text{(C)}", 1, 0), (r"\boxed{\text{(C)}\text{ units}}", r"\text{(C)}", 1, 0),
    (r"\boxed{}", "", 1, 0),
    # and where they agree (an empty last box is no answer for math-verify either)
    (r"\boxed{3/4}", r"\frac34", 1, 1), (r"\boxed{5} in \boxed{}", "5", 0, 0), ("so it is 5", "5", 0, 0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1, 1), (r"\boxed{90^\circ}", "90", 1, 1), (r"\boxed{x = 5}", "5", 1, 1),
    (r"\boxed{6}", "5", 0, 0),
]


def test_where_it_and_math_verify_differ():
    cases = [("", response, gold, 0.0) for response, gold, _, _ in DIFFERENCES]
    assert score(MathStringReward(), cases) == [float(d[2]) for d in DIFFERENCES]
    assert score(MathVerifyReward(timeout_s=None), cases) == [float(d[3]) for d in DIFFERENCES]


def test_reward_config_routes_math_to_it_and_reasoning_gym_to_the_boxed_scorer():
    reward = build_reward(OmegaConf.load(REPO / "configs" / "reward" / "math_string.yaml"))
    assert isinstance(reward.fn, DispatchReward) and set(reward.fn.routes) == {"math", "reasoning_gym"}
    assert isinstance(reward.fn.routes["math"], MathStringReward)
    assert reward.fn.routes["reasoning_gym"].extraction == "boxed"
    result = reward([r"\boxed{16.0}", r"\boxed{16}"], [math_problem("16")] * 2)
    assert result.rewards.tolist() == [0.0, 1.0] and result.extracted == ["16.0", "16"]


def _measure() -> None:
    """Agreement with math-verify on the corpus, per kind, and time per 1,000 calls (one process)."""
    import time
    from collections import Counter

    cases = corpus()
    ours, mv = MathStringReward(), MathVerifyReward(timeout_s=None)
    a, b = score(ours, cases), score(mv, cases)
    total, agree = Counter(), Counter()
    for (kind, *_), x, y in zip(cases, a, b):
        total[kind] += 1
        agree[kind] += x == y
    print("| kind of response | agree | math_string 1, math-verify 0 | math_string 0, math-verify 1 |")
    print("|---|---|---|---|")
    for kind in total:
        only_a = sum(x > y for (k, *_), x, y in zip(cases, a, b) if k == kind)
        only_b = sum(x < y for (k, *_), x, y in zip(cases, a, b) if k == kind)
        print(f"| {kind} | {agree[kind]}/{total[kind]} | {only_a} | {only_b} |")
    print(f"overall {sum(agree.values())}/{len(cases)} = {sum(agree.values()) / len(cases):.1%}")
    for name, reward in (("math_string", ours), ("math-verify", mv)):
        start = time.perf_counter()
        for i, (_, response, gold, _) in enumerate(cases):  # one call per response, as a rollout of 1
            reward([response], [math_problem(gold, i)])
        per_1000 = (time.perf_counter() - start) / len(cases) * 1000
        print(f"{name}: {per_1000:.3f} s per 1,000 calls ({len(cases)} calls)")


if __name__ == "__main__":
    _measure()
