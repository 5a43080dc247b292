"""verl-style data read as it is (issue 19, point 5): `prompt` is the chat (system message included),
the gold is reward_model.ground_truth, the set is data_source, `*_20times` repeats are one problem.
Small Parquet files written here; the tiny model for the one evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from prerl.data import FileSource
from prerl.data.prompts import IM_START
from prerl.evaluate import evaluate
from prerl.rewards import build_reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM = "You are a careful mathematician. Put the final answer in \\boxed{}."
PROBLEMS = [("What is 13 + 14?", "27"), ("What is half of one?", "\\frac{1}{2}"), ("How many sides has a hexagon?", "6")]


def verl_rows(source: str, problems, times: int = 1, system: str | None = SYSTEM) -> list[dict]:
    """Rows as verl's preprocessing scripts write them; ``times`` repeats the whole list (``*_20times``)."""
    rows = []
    for _ in range(times):
        for i, (question, gold) in enumerate(problems):
            chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
            rows.append({"data_source": source, "prompt": chat, "ability": "math",
                         "reward_model": {"style": "rule", "ground_truth": gold},
                         "extra_info": {"split": "test", "index": i}})
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def amc(tmp_path) -> Path:
    return write_parquet(tmp_path / "amc2023_4times.parquet", verl_rows("amc23", PROBLEMS, times=4))


def chat_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- reading
def test_the_layout_is_detected_and_read_as_it_is(amc, caplog):
    with caplog.at_level(logging.INFO, logger="prerl.data.sources"):
        problems = FileSource(amc).load()  # the default question/answer fields: the file has neither
    assert "verl-style layout" in caplog.text
    assert "12 records hold 3 distinct problems, each in 4 records" in caplog.text and "samples=4" in caplog.text
    p = problems[1]
    assert p["id"] == "amc23/1" and p["question"] == "What is half of one?" and p["answer"] == "\\frac{1}{2}"
    assert p["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is half of one?"}]
    assert p["meta"]["data_source"] == "amc23" and p["meta"]["extra_info"] == {"split": "test", "index": 1}
    assert "prompt" not in p["meta"]
    assert [q["id"] for q in problems[3:5]] == ["amc23/3", "amc23/4"]  # ids are the record index: unique
    as_jsonl = amc.with_suffix(".jsonl")  # verl's JSONL files are the same rows
    as_jsonl.write_text("".join(json.dumps(r) + "\n" for r in pq.read_table(amc).to_pylist()))
    assert FileSource(as_jsonl).load() == problems


def test_explicit_fields_still_read_fields_and_layout_fields_is_the_old_reading(amc):
    # the command: dotted fields index the message list; no chat is attached (the data
    # config's system prompt applies to such problems, as to any question)
    p = FileSource(amc, question_field="prompt.1.content", answer_field="reward_model.ground_truth").load()[0]
    assert p["question"] == "What is 13 + 14?" and p["answer"] == "27" and "messages" not in p
    with pytest.raises(KeyError, match=r"amc2023_4times.parquet: row 0: missing question field 'question'"):
        FileSource(amc, layout="fields").load()


def test_bad_verl_rows_name_file_row_and_field(tmp_path):
    rows = verl_rows("amc23", PROBLEMS)
    rows[2]["prompt"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": None}]
    bad = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"bad.parquet: row 2: field 'prompt.1' is not a chat message"):
        FileSource(bad, layout="verl").load()
    rows = verl_rows("amc23", PROBLEMS)
    rows[1]["reward_model"]["ground_truth"] = None
    null = write_parquet(tmp_path / "null.parquet", rows)
    with pytest.raises(ValueError, match=r"null.parquet: row 1: answer field 'reward_model.ground_truth' is null"):
        FileSource(null).load()
    system_only = write_parquet(tmp_path / "sys.parquet", [{**rows[0], "prompt": [{"role": "system", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"sys.parquet: row 0: field 'prompt' has no user message"):
        FileSource(system_only, layout="verl").load()


def test_repeats_with_different_golds_are_flagged(tmp_path, caplog):
    rows = verl_rows("amc23", PROBLEMS, times=2)
    rows[4]["reward_model"]["ground_truth"] = "0.5"  # the second copy of problem 1 disagrees
    path = write_parquet(tmp_path / "clash.parquet", rows)
    with caplog.at_level(logging.INFO, logger="prerl.data.sources"):
        FileSource(path).load()
    assert "1 repeated question(s) have different gold answers" in caplog.text and "amc23/1 and amc23/4" in caplog.text


# ----------------------------------------------------------------------------- training data
def test_training_data_config_renders_the_files_chat(tmp_path, amc, tiny_tokenizer, caplog):
    train_file = write_parquet(tmp_path / "train.parquet", verl_rows(
        "math_dapo", [(f"What is {i} + {i}?", str(2 * i)) for i in range(8)], system=None))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=tiny", "data=jsonl", f"data.train.path={train_file}", "data.train.holdout=0",
            f"data.val.path={amc}", "data.val.part=all", "data.batch_size=4",
            "+data.question_template='{question} (not applied)'"])
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tiny_tokenizer)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "8 of 8 problems bring their own chat" in caplog.text
    assert [p["id"] for p in dm.train_problems][:2] == ["math_dapo/0", "math_dapo/1"]
    # the repeats are one problem each, counted as duplicates
    assert dm.stats["val"] == {"loaded": 12, "duplicates_dropped": 9, "too_long_dropped": 0, "final": 3}
    val = dm._val_items[0]
    text = tiny_tokenizer.decode(val["prompt_ids"])
    assert text == chat_text(tiny_tokenizer, val["problem"]["messages"])
    assert SYSTEM in text and cfg.data.system_prompt not in text and "(not applied)" not in text
    train = tiny_tokenizer.decode(dm._train_items[0]["prompt_ids"])  # no system message: none added from the config
    assert train == chat_text(tiny_tokenizer, [{"role": "user", "content": "What is 0 + 0?"}])
    assert dm.context_ids == [tiny_tokenizer.convert_tokens_to_ids(IM_START)]  # P(y)'s context unchanged
    assert [p["answer"] for p in dm.val_problems] == ["27", "\\frac{1}{2}", "6"]


# ----------------------------------------------------------------------------- verifier and evaluation
def test_the_default_reward_scores_a_boxed_answer_against_the_plain_gold(amc):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        reward = build_reward(compose(config_name="train", overrides=["model=tiny"]).reward)
    problems = FileSource(amc).load()[:3]
    responses = ["13 + 14 = 27, so \\boxed{27}.", "Half is \\boxed{0.5}", "A hexagon has \\boxed{5} sides."]
    assert reward(responses, problems).rewards.tolist() == [1.0, 1.0, 0.0]
    # strict \boxed{} extraction: an unboxed answer is not read (DAPO's "Answer:" prompts need
    # reward.math.strict_boxed=false)
    assert reward(["Answer: 27"], problems[:1]).rewards.tolist() == [0.0]


def test_eval_file_gives_one_set_per_data_source_and_one_record_per_problem(tmp_path):
    mixed = write_parquet(tmp_path / "val.parquet", verl_rows("amc23", PROBLEMS, times=4)
                          + verl_rows("aime24", [("Find 2^5.", "32")], times=4, system="Be brief."))
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            "model=tiny", f"eval_file={mixed}", "samples=2", "max_new_tokens=4", "batch_size=4",
            "trainer.enable_progress_bar=false", "plot=false", "behaviours=false"])
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.log_dir = str(out), str(tmp_path)
    summary = evaluate(cfg)
    assert summary["status"] == "completed" and list(summary["datasets"]) == ["amc23", "aime24"]
    amc = summary["datasets"]["amc23"]
    assert amc["problems"] == 3 and amc["data"]["repeats"] == 4 and amc["data"]["duplicates_dropped"] == 9
    assert summary["datasets"]["aime24"]["problems"] == 1
    records = [json.loads(line) for line in (out / "problems" / "amc23.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == ["27", "\\frac{1}{2}", "6"] and len(records[0]["responses"]) == 2
    assert SYSTEM in records[0]["prompt"] and cfg.data.system_prompt not in records[0]["prompt"]
    aime = json.loads((out / "problems" / "aime24.jsonl").read_text())
    assert "Be brief." in aime["prompt"] and aime["id"] == "aime24/12"
