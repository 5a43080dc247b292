"""benchmarks/engine_agreement.py on the tiny model (CI smoke): every engine's figures, every
pair's intervals, and a verdict that follows them; bad engine lists are refused."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "engine_agreement.py"


def _run(*args, out=None):
    cmd = [sys.executable, str(SCRIPT), "--overrides", "experiment=study_miniature", "model=tiny", "--prompts", "2",
           "--samples", "2", *args] + (["--out", str(out)] if out else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={"OMP_NUM_THREADS": "1",
                          "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


def test_two_hf_samplings_are_compared_prompt_by_prompt(tmp_path):
    proc = _run("--engines", "hf,hf-refill,hf", out=tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["engines"] == ["0:hf", "1:hf-refill", "2:hf"] and [p["b"] for p in report["pairs"]] == ["1:hf-refill", "2:hf"]
    for means in report["means"].values():
        assert 0 <= means["right"] <= 1 and 0 < means["length"] <= 64 and means["logprob"] < 0
    cells = [p[m] for p in report["pairs"] for m in ("right", "length", "truncated", "logprob")]
    assert all(c["lo"] <= c["diff"] <= c["hi"] for c in cells)
    assert report["agree"] == all(c["lo"] <= 0 <= c["hi"] for c in cells)
    assert ("agree: every interval contains 0" if report["agree"] else "DIFFER: an interval excludes 0") in proc.stdout


def test_an_unknown_engine_is_refused():
    proc = _run("--engines", "hf,sglang")
    assert proc.returncode == 2 and "--engines needs two or more of" in proc.stderr
