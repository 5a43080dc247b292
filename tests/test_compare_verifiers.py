"""scripts/compare_verifiers.py on a tiny saved evaluation: the agreement table of two rewards and
the responses they disagree on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from prerl.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_verifiers", ROOT / "scripts" / "compare_verifiers.py")
compare_verifiers = importlib.util.module_from_spec(spec)
sys.modules["compare_verifiers"] = compare_verifiers
spec.loader.exec_module(compare_verifiers)

LONG = "We work through the cases one by one. " * 30  # ~1,100 characters before the answer
# The tiny model's responses are noise: each record's responses are replaced by these, per gold.
# (response, default = math-verify, math_string)
RESPONSES = {
    "16": [(r"\boxed{16}", 1, 1), (LONG + r"\boxed{16.0}", 1, 0), (r"\boxed{15}", 0, 0), ("16", 0, 0)],
    r"\frac{1}{2}": [(r"\boxed{0.5}", 1, 1), (r"\boxed{\dfrac12}", 1, 1), (r"\fbox{1/2}", 1, 0), (r"\boxed{1/2}", 1, 1)],
    r"\text{(C)}": [(r"\boxed{\text{(C)}}", 1, 1), (r"\boxed{x = \text{(C)}}", 0, 1), (r"\boxed{(C)}", 1, 0),
                    (r"\boxed{(D)}", 0, 0)],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny evaluation (4 samples of 3 problems) whose saved responses are then set to RESPONSES."""
    tmp = tmp_path_factory.mktemp("compare")
    data = tmp / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"Problem {i}?", "answer": gold}) + "\n"
                            for i, gold in enumerate(RESPONSES)))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny", "samples=4", "max_new_tokens=4", "trainer.enable_progress_bar=false", "plot=false",
            "behaviours=false", f"eval_file={data}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
        cfg.paths.log_dir = str(tmp)
    evaluate(cfg)
    path = tmp / "run" / "problems" / "mine.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in records] == list(RESPONSES)
    for record in records:
        record["responses"] = [response for response, _, _ in RESPONSES[record["answer"]]]
        record["rewards"] = [float(mv) for _, mv, _ in RESPONSES[record["answer"]]]  # as if scored by default
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp / "run"


def test_agreement_table_and_disagreeing_responses(run, capsys):
    results = compare_verifiers.main([str(run), "--rewards", "default,math_string", "--width", "60"])
    c = results["mine"]
    expected = [(a, b) for rows in RESPONSES.values() for _, a, b in rows]
    assert (c.both_1, c.both_0, c.only_a, c.only_b) == (
        expected.count((1, 1)), expected.count((0, 0)), expected.count((1, 0)), expected.count((0, 1)))
    assert (c.both_1, c.both_0, c.only_a, c.only_b) == (5, 3, 3, 1)
    out = capsys.readouterr().out
    header, row = [line.split() for line in out.splitlines()[3:5]]
    assert header[:8] == ["set", "problems", "responses", "both", "1", "both", "0", "only"]
    assert row == ["mine", "3", "12", "5", "3", "3", "1", "66.7%", f"{8 / 12:.4f}", f"{6 / 12:.4f}"]
    assert "4 responses scored differently; the first 4:" in out
    assert "--- mine/0 sample 1: gold '16'; default 1 (extracted '16.0'), math_string 0 (extracted '16.0')" in out
    assert "\n..." + (LONG + r"\boxed{16.0}")[-60:] + "\n" in out  # the end of a long response
    assert r"gold '\\text{(C)}'; default 0 (extracted 'x = \\text{(C)}'), math_string 1" in out


def test_saved_rewards_sets_and_errors(run, tmp_path, capsys):
    # the evaluation's own rewards against a rescoring with the same reward: all agree
    c = compare_verifiers.main([str(run), "--rewards", "saved,default", "--show", "0"])["mine"]
    assert c.only_a == c.only_b == 0 and c.total == 12
    assert "0 responses scored differently\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--rewards='default': give exactly two"):
        compare_verifiers.main([str(run), "--rewards", "default"])
    with pytest.raises(SystemExit, match=r"--rewards: 'nope' is neither a config in configs/reward \(.*math_string"):
        compare_verifiers.main([str(run), "--rewards", "default,nope"])
    with pytest.raises(SystemExit, match=r"--sets: \['other'\] not in"):
        compare_verifiers.main([str(run), "--sets", "other"])
    (tmp_path / "tensorboard").mkdir()
    with pytest.raises(SystemExit, match="is a training run: training keeps no rollouts on disk.*src/eval.py ckpt_path="):
        compare_verifiers.main([str(tmp_path)])


def test_reasoning_gym_sets_are_skipped(run, tmp_path, capsys):
    rg = tmp_path / "rg"
    (rg / "problems").mkdir(parents=True)
    (rg / "problems" / "mine.jsonl").write_text((run / "problems" / "mine.jsonl").read_text())
    settings = json.loads((run / "eval_settings.json").read_text())
    settings["sets"][0]["spec"] = {"kind": "rg", "task": "basic_arithmetic"}
    (rg / "eval_settings.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit, match="no records to compare"):
        compare_verifiers.main([str(rg)])
    assert "mine: skipped (reasoning-gym problems" in capsys.readouterr().out
