"""scripts/compare_arms.py on the committed miniature study: an arm against itself agrees
everywhere; GRPO against DSRL (S = 8) differs where the report says they do (DSRL's responses end
much shorter)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_arms.py"


def _compare(a: str, b: str, tmp_path) -> tuple[str, dict]:
    out = tmp_path / f"{a.split(':')[1]}-{b.split(':')[1]}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), a, b, "--bootstrap", "200", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_an_arm_agrees_with_itself_and_grpo_differs_from_dsrl(tmp_path):
    _, same = _compare("results/miniature:grpo", "results/miniature:grpo", tmp_path)
    assert {e["set"] for e in same["evaluations"]} == {"heldout", "three_terms", "division", "mawps"}
    assert all(e["agree"] and e["b_minus_a"] == 0 and e["a"] == e["b"] for e in same["evaluations"])
    assert same["curves"] and all(c["within"] for c in same["curves"])
    text, other = _compare("results/miniature:grpo", "results/miniature:dsrl_s8", tmp_path)
    lengths = {c["span"]: c for c in other["curves"] if c["curve"] == "train/response_len_mean"}
    assert not lengths["last 8"]["within"] and max(lengths["last 8"]["b"]) < min(lengths["last 8"]["a"])
    assert "| heldout | 64 |" in text and "A / B" in text


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, message in ((["results/miniature"], "not <results_dir>:<arm>"),
                          (["results/nowhere:grpo"], "no results folder"),
                          (["results/miniature:no_such_arm"], "no finished run of arm 'no_such_arm'")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args, "results/miniature:grpo"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
