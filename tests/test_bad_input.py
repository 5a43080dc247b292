"""Bad input that used to pass silently now fails early and clearly: a gold answer that is a list
or an object, a prompt that leaves its response no room in the model's context, a DSRL switch
step the run never reaches."""

from __future__ import annotations

import functools
import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import ListSource, PatternReward, make_datamodule, make_module, make_trainer, problems
from prerl.data import FileSource, PromptDataModule, PromptTooLongError, encode_prompt, make_problem
from prerl.models import HFModelSpec, TinyModelSpec
from prerl.module import PreRLModule
from prerl.objectives import ConditionalRL, DualSpaceSchedule, MarginalNSR
from prerl.rewards.math_verify_reward import MathVerifyReward


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------- (a) gold answers that are not one value
def test_a_list_or_object_answer_is_an_error_naming_the_file_line_and_field(tmp_path):
    f = write_jsonl(tmp_path / "lists.jsonl", [{"question": "3+3?", "answer": "6"},
                                               {"question": "4+4?", "answer": ["8", "x"]}])
    with pytest.raises(ValueError, match=(
        r"lists\.jsonl: line 2: answer field 'answer' is a list \(\['8', 'x'\]\), not one answer; store a single "
        r"value, or pick one in every record with answer_field=answer\.0 \(its first element\)$")):
        FileSource(f).load()
    g = tmp_path / "objects.json"
    g.write_text(json.dumps([{"q": "4+4?", "gold": {"value": "8", "unit": "apples"}}]))
    with pytest.raises(ValueError, match=r"objects\.json: item 0: answer field 'gold' is an object with fields "
                                         r"\['unit', 'value'\].*answer_field=gold\.<field>"):
        FileSource(g, question_field="q", answer_field="gold").load()
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"question": "a?", "answer": 8}, {"question": "b?", "answer": 2.5}])
    assert [p["answer"] for p in FileSource(numbers).load()] == ["8", "2.5"]  # numbers are one value


def test_dotted_field_paths_reach_list_elements_and_the_gold_then_scores(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "What is 4+4?", "answer": ["8", "x"], "sol": {"steps": ["4+4", "8"]}},
    ])
    (first,) = FileSource(f, answer_field="answer.0").load()
    assert first["answer"] == "8"
    assert FileSource(f, answer_field="answer.1").load()[0]["answer"] == "x"
    assert FileSource(f, answer_field="sol.steps.1").load()[0]["answer"] == "8"
    templated = FileSource(f, answer_field="answer.0", question_template="{sol.steps.0} = ?").load()[0]
    assert templated["question"] == "4+4 = ?"
    with pytest.raises(KeyError, match=r"line 1: missing answer field 'answer\.2'"):
        FileSource(f, answer_field="answer.2").load()
    # the symptom: a correct \boxed{8} scored 0 against the gold "['8', 'x']"
    assert MathVerifyReward()(["so \\boxed{8}"], [first]).rewards.tolist() == [1.0]


def test_make_problem_rejects_a_list_answer_naming_the_problem():
    with pytest.raises(ValueError, match=r"problem 'src/3': the answer is a list \(\['8', 'x'\]\), not one value"):
        make_problem("src/3", "4+4?", ["8", "x"])
    assert make_problem("src/4", "4+4?", 8.0)["answer"] == "8"


# --------------------------------------------------------------- (b) prompt + response longer than the context
class NeverCalled:
    """A reward that fails the test if anything was generated."""

    def __call__(self, responses, problems):
        raise AssertionError("generated before the prompt-length check")


def module_for(spec, max_new_tokens, val_max_new_tokens, reward=None) -> PreRLModule:
    return PreRLModule(
        model=spec, tokenizer=spec.build_tokenizer(), objective=ConditionalRL(), reward=reward or NeverCalled(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        rollout={"group_size": 2, "max_new_tokens": max_new_tokens}, update={"micro_batch_size": 4},
        validation={"samples_per_problem": 2, "max_new_tokens": val_max_new_tokens},
    )


def prompt_lengths(tokenizer, probs) -> dict[str, int]:
    return {p["id"]: len(encode_prompt(tokenizer, p["question"], "Answer briefly.")) for p in probs}


def test_a_prompt_without_room_for_its_response_stops_before_anything_is_generated():
    module = module_for(TinyModelSpec(max_position_embeddings=96), max_new_tokens=35, val_max_new_tokens=35)
    lengths = prompt_lengths(module.tokenizer, problems(16))  # 61 tokens, 62 from q/10 on (two-digit numbers)
    longest = max(lengths, key=lengths.get)
    n, too_long = lengths[longest], sum(v + 35 > 96 for v in lengths.values())
    assert 0 < too_long < len(lengths)
    with pytest.raises(PromptTooLongError, match=(
        rf"^train prompt {longest} has {n} tokens: with module.rollout.max_new_tokens=35 it needs {n + 35} positions, "
        rf"more than the model's context of 96 \(max_position_embeddings\); lower module.rollout.max_new_tokens to "
        rf"{96 - n} or less, or set data.on_long_prompt=drop to drop the {too_long} train prompt\(s\) that do not "
        rf"fit$")):
        make_trainer(1).fit(module, datamodule=make_datamodule(module.tokenizer))


def test_validation_prompts_are_checked_against_the_validation_length():
    module = module_for(TinyModelSpec(max_position_embeddings=96), max_new_tokens=8, val_max_new_tokens=64)
    with pytest.raises(PromptTooLongError, match=r"^val prompt v/\d+ .* with module.validation.max_new_tokens=64 "):
        make_trainer(1).validate(module, datamodule=make_datamodule(module.tokenizer), verbose=False)


def test_on_long_prompt_drop_drops_the_prompts_without_room_and_logs_how_many(caplog):
    module = module_for(TinyModelSpec(max_position_embeddings=96), max_new_tokens=35, val_max_new_tokens=8,
                        reward=PatternReward())
    lengths = prompt_lengths(module.tokenizer, problems(16))
    fit = [pid for pid, n in lengths.items() if n + 35 <= 96]
    dm = PromptDataModule(ListSource(problems(16)), None, module.tokenizer, "Answer briefly.", batch_size=2,
                          on_long_prompt="drop")
    with caplog.at_level(logging.WARNING, logger="prerl.data.datamodule"):
        make_trainer(1).fit(module, datamodule=dm)
    assert [p["id"] for p in dm.train_problems] == fit and module.global_step == 1
    assert dm.stats["train"]["too_long_dropped"] == 16 - len(fit)
    dropped = f"train: dropped {16 - len(fit)} prompt(s) that leave less than module.rollout.max_new_tokens=35 "
    assert dropped in caplog.text


def test_the_context_is_the_model_configs_not_the_tokenizers_placeholder(tmp_path, tiny_tokenizer):
    # Many checkpoints ship model_max_length = 1e30; max_position_embeddings in config.json is the limit.
    TinyModelSpec(max_position_embeddings=80).build_model().save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": int(1e30)}))
    module = module_for(HFModelSpec(str(tmp_path), dtype="float32"), max_new_tokens=40, val_max_new_tokens=40)
    assert module.tokenizer.model_max_length == int(1e30)
    with pytest.raises(PromptTooLongError, match=r"more than the model's context of 80 \(max_position_embeddings\)"):
        make_trainer(1).fit(module, datamodule=make_datamodule(module.tokenizer))


# --------------------------------------------------------------- (c) a DSRL switch the run never reaches
def dsrl_fit(switch_step, max_steps, caplog, callbacks=(), ckpt_path=None) -> PreRLModule:
    module = make_module(DualSpaceSchedule(MarginalNSR(), ConditionalRL(), switch_step=switch_step),
                         diagnostics_every_n_steps=0)
    L.seed_everything(0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prerl.callbacks.phase_switch"):
        make_trainer(max_steps, callbacks, enable_checkpointing=bool(callbacks)).fit(
            module, datamodule=make_datamodule(module.tokenizer), ckpt_path=ckpt_path)
    return module


def test_an_unreachable_switch_step_warns_at_start_but_a_run_past_the_switch_does_not(tmp_path, caplog):
    dsrl_fit(50, 2, caplog)
    (record,) = caplog.records
    assert record.getMessage().startswith("DSRL: objective.switch_step=50 >= trainer.max_steps=2: the run ends before "
                                          "the switch, so it trains phase 1 (MarginalNSR")
    assert "\n" not in record.getMessage()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    assert dsrl_fit(1, 2, caplog, [checkpoint]).phase == 1 and not caplog.records  # reachable: no warning
    # Resumed in phase 2, with a switch step at or after max_steps: already switched, nothing to warn about.
    resumed = dsrl_fit(3, 3, caplog, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.phase == 1 and resumed.global_step == 3 and not caplog.records
