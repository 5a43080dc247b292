"""Every command of the README's Usage section runs as written, with the tiny overrides listed
here, and every output line the README quotes (``#   ...`` under a command) has the shape of a
line the command prints (numbers may differ). A command this file does not know fails the test:
a new README command comes with its entry."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Seconds-long training: the tiny random model instead of SmolLM2 (the command's other settings
# stay), one update, no validation.
TINY = ["model=tiny", "trainer.max_steps=1", "data.batch_size=2", "module.rollout.group_size=2",
        "module.rollout.max_new_tokens=8", "validate_before=false", "validate_after=false"]
GPU_ERROR = "no CUDA GPU; on a CPU use"  # a GPU command on this CPU-only machine: the one-line error

# (pattern of the README command, what the test adds to it); first match wins. "skip": why not run.
COMMANDS: list[tuple[str, dict]] = [
    (r"^\. \.venv/bin/activate$", {"skip": "the environment the test already runs in"}),
    (r"src/train\.py$", {"add": TINY}),
    (r"src/train\.py objective=grpo$", {"add": TINY}),
    (r"objective\.switch_step=19$", {"add": TINY}),
    (r"model=qwen3_4b data=math trainer=gpu$", {"error": GPU_ERROR}),
    (r"src/train\.py experiment=dsrl_qwen3_4b$", {"error": GPU_ERROR}),
    (r"experiment=smoke$", {"add": ["trainer.max_steps=2"]}),
    (r"src/train\.py ckpt_path=logs/<task>/runs/<run>$", {"add": [*TINY[:1], "trainer.max_steps=2", *TINY[2:]]}),
    (r"src/train\.py ckpt_path=last$", {"add": [*TINY[:1], "trainer.max_steps=3", *TINY[2:]]}),
    (r"src/eval\.py ckpt_path=logs/<task>/runs/<run> data=math500$", {"add": ["model=tiny", "limit=1", "samples=1",
                                                                            "max_new_tokens=8"]}),
    (r"reward\._target_=my_rewards\.last_number$", {"add": TINY}),
    (r"estimate_memory\.py experiment=dsrl_qwen3_4b$", {"add": []}),
    (r"^tensorboard ", {"skip": "starts a server"}),
    (r"src/eval\.py limit=8 samples=4$", {"add": []}),  # SmolLM2 as written: the quoted line's shape
    (r"src/eval\.py ckpt_path=last limit=8 samples=4$", {"add": ["model=tiny"]}),  # the tiny runs above
    (r"eval_sets=\[svamp", {"add": ["model=tiny", "max_new_tokens=8"]}),
    (r"eval_file=", {"add": ["limit=8"], "nonzero": True}),  # SmolLM2: must score, as the README says
    (r"plot_pass_at_k\.py", {"add": []}),
    (r"plot_behaviours\.py", {"add": []}),
    (r"alignment_probe\.py", {"add": []}),
    (r"src/train\.py callbacks=alignment$", {"add": TINY}),
    (r"adaptive_switch=\{rule:growth", {"add": TINY}),
    (r"adaptive_switch=\{rule:threshold.*\.\.\.$", {"skip": "abbreviated (`...`); the full command and its "
                                                            "output are in docs/analysis.md"}),
]

MY_REWARDS = '''
import re

NUMBER = re.compile(r"-?\\d+(?:\\.\\d+)?")


def last_number(responses, problems, tolerance=0.0):
    rewards = []
    for response, problem in zip(responses, problems):
        numbers = NUMBER.findall(response)
        rewards.append(float(bool(numbers) and abs(float(numbers[-1]) - float(problem["answer"])) <= tolerance))
    return rewards
'''


def usage_commands() -> list[tuple[str, list[str]]]:
    """(command, the output lines the README quotes under it) for each command of the Usage section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Usage"):text.index("## Runs")]
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines = re.sub(r"\\\n\s*", "", block).splitlines()
        indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
        for line in lines:
            at_margin, line = len(line) - len(line.lstrip()) == indent, line.strip()
            if line.startswith("#   ") and at_margin and found:  # quoted output (aligned comments continue a comment)
                found[-1][1].append(line[4:].strip())
            elif line and not line.startswith("#"):
                found.append((re.split(r"\s{2,}#", line)[0].strip(), []))
    return found


NUMBER = r"(?:-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?%?)"  # 7 1,234 0.5 1.361e+04 25.0%


def shape(quoted: str) -> re.Pattern:
    """A quoted output line as a pattern: its words in order, numbers free, spacing free."""
    words = []
    for word in quoted.split():
        parts = re.split(f"({NUMBER})", word)
        words.append("".join(NUMBER if i % 2 else re.escape(part) for i, part in enumerate(parts)))
    return re.compile(r"\s+".join(words))


def entry(command: str) -> dict:
    for pattern, what in COMMANDS:
        if re.search(pattern, command):
            return what
    pytest.fail(f"README command without an entry in tests/test_readme.py COMMANDS: {command}")


def test_every_readme_usage_command_has_an_entry_and_every_pattern_a_command():
    commands = [c for c, _ in usage_commands()]
    assert len(commands) >= 20
    for command in commands:
        entry(command)
    for pattern, _ in COMMANDS:
        assert any(re.search(pattern, c) for c in commands), f"no README command matches {pattern!r}"


def test_a_quoted_line_shape_matches_its_own_kind_of_output_and_not_another():
    quoted = shape("val  8/8  avg@4 0.3750  pass@1 0.3750  trunc 25.0%")
    assert quoted.search("val              4/4    0.5000 avg@4 1.0000") is None
    assert quoted.search("val  4/4  avg@4 0.5  pass@1 1  trunc 0.0%")


def _newest(folder: Path) -> Path:
    return max((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


@pytest.mark.slow
def test_the_readme_usage_commands_run_as_written(tmp_path):
    logs = tmp_path / "logs"
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in [
        {"Body": f"Tom has {a} apples.", "Question": f"He gets {b} more. How many apples does he have now?",
         "Answer": a + b} for a, b in [(2, 3), (4, 1), (1, 1), (3, 3), (5, 2), (6, 1), (2, 2), (1, 4)]]))
    env = dict(os.environ, PRERL_ROOT=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PRERL_RUN_ID", None)
    runs: dict[str, Path] = {}
    for command, quoted in usage_commands():
        what = entry(command)
        if "skip" in what:
            continue
        filled = command
        for holder, run in (("logs/<task>/runs/<run A>", runs.get("train")), ("logs/<task>/runs/<run B>", runs.get("grpo")),
                            ("logs/<task>/runs/<run>", runs.get("train")), ("logs/eval/runs/<base>", runs.get("eval")),
                            ("logs/eval/runs/<dsrl>", runs.get("eval_last")), ("logs/eval/runs/<grpo>", runs.get("eval_last")),
                            ("/abs/path/mine.jsonl", mine)):
            if holder in filled:
                assert run is not None, f"{command}: no earlier command made {holder}"
                filled = filled.replace(holder, str(run))
        argv = shlex.split(filled)
        assert argv[0] in ("python",), command
        hydra = argv[1].startswith("src/") or argv[1] in ("scripts/alignment_probe.py",)
        argv = [sys.executable, str(ROOT / argv[1]), *argv[2:], *what.get("add", []), *([f"paths.log_dir={logs}"] if hydra else [])]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "error" in what:
            assert proc.returncode == 1 and what["error"] in out.strip().splitlines()[-2], f"{command}\n{out[-2000:]}"
            continue
        assert proc.returncode == 0, f"{command}\n{out[-3000:]}"
        for line in quoted:
            assert shape(line).search(out), f"{command}: no output line shaped like the README's\n  {line}\n{out[-2000:]}"
        if argv[1].endswith("src/train.py"):
            task = "smoke" if "experiment=smoke" in command else "dsrl_smollm2_cpu"
            runs.setdefault("grpo" if "objective=grpo" in command else "train", _newest(logs / task / "runs"))
        elif argv[1].endswith("src/eval.py"):
            run = _newest(logs / "eval" / "runs")
            runs.setdefault("eval_last" if "ckpt_path=last" in command else "eval", run)
            if what.get("nonzero"):
                summary = json.loads((run / "summary.json").read_text())
                (scores,) = summary["datasets"].values()
                metrics = scores["metrics"]
                assert metrics["unparsable_frac"] < 0.5 and metrics[f"avg@{scores['samples_per_problem']}"] > 0, metrics
